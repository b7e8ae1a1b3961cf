"""Evaluation report: one self-contained HTML file (plots as inline PNG, no external assets).

Per task: ROC curves (overall and per site, the oracle dashed when the true
risk is known), calibration curve (equal-mass deciles, the bins of ECE),
decision curve (net benefit of the model vs treating all), SHAP summary
(mean |contribution| per feature, log-odds) and the per-site / sex / age-band
table with 95% bootstrap intervals. Plots are drawn with matplotlib's Agg
canvas on `Figure` objects (no pyplot global state), so report writing is
safe in any thread and needs no display. MPLCONFIGDIR is set under the work
folder by `configure_environment`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from chronorisk.training import metrics

TABLE_COLUMNS = (
    ("group", "group", None),
    ("site", "site", None),
    ("sex", "sex", None),
    ("age_band", "age", None),
    ("n", "n", None),
    ("prevalence", "prevalence", 3),
    ("auroc", "AUROC", 3),
    ("oracle_auroc", "oracle AUROC", 3),
    ("auroc_ratio", "ratio", 3),
    ("auprc", "AUPRC", 3),
    ("brier", "Brier", 4),
    ("calibration_slope", "cal. slope", 2),
    ("calibration_intercept", "cal. intercept", 2),
    ("ece", "ECE", 3),
    ("sensitivity", "sensitivity", 2),
    ("ppv", "PPV", 2),
    ("nns", "NNS", 1),
    ("net_benefit", "net benefit", 4),
)


@dataclass
class TaskReport:
    """What the report shows for one task (arrays are the evaluated rows, in any order)."""

    task: str
    records: list[dict]
    y: np.ndarray
    risk: np.ndarray
    site: np.ndarray | None = None
    true_risk: np.ndarray | None = None
    importance: Mapping[str, float] | None = None  # display name -> mean |contribution|
    metadata: Mapping | None = None
    notes: list[str] = field(default_factory=list)


def shap_importance(contributions: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Mean |contribution| per feature (log-odds), largest first; the expected-value column is dropped."""
    c = np.asarray(contributions, dtype=float)
    if c.shape[1] == len(names) + 1:
        c = c[:, :-1]
    if c.shape[1] != len(names):
        raise ValueError(f"contributions have {c.shape[1]} columns for {len(names)} names")
    mean_abs = np.abs(c).mean(axis=0) if c.shape[0] else np.zeros(len(names))
    order = np.argsort(-mean_abs, kind="stable")
    return {str(names[i]): float(mean_abs[i]) for i in order}


def render_report(tasks: Sequence[TaskReport], title: str = "chronorisk evaluation", notes: Sequence[str] = ()) -> str:
    """The whole HTML document as a string."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='meta'>generated {datetime.now(UTC).isoformat(timespec='seconds')}</p>",
    ]
    parts += [f"<p class='note'>{_e(n)}</p>" for n in notes]
    if tasks:
        parts.append("<nav>" + " | ".join(f"<a href='#{_e(t.task)}'>{_e(t.task)}</a>" for t in tasks) + "</nav>")
    for t in tasks:
        parts.append(_task_section(t))
    parts.append(_GLOSSARY)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: Path | str, tasks: Sequence[TaskReport], title: str = "chronorisk evaluation",
                 notes: Sequence[str] = ()) -> Path:
    from chronorisk.data.files import write_text_atomic

    path = Path(path)
    write_text_atomic(path, render_report(tasks, title, notes))
    return path


# ---- sections --------------------------------------------------------------------------
def _task_section(t: TaskReport) -> str:
    y = np.asarray(t.y, dtype=float)
    p = np.asarray(t.risk, dtype=float)
    out = [f"<section id='{_e(t.task)}'><h2>{_e(t.task)}</h2>"]
    if t.metadata:
        meta = {k: t.metadata.get(k) for k in ("name", "version", "trained_at", "calibration_method", "n_trees")}
        out.append("<p class='meta'>" + ", ".join(f"{_e(k)}: {_e(v)}" for k, v in meta.items() if v is not None)
                   + "</p>")
    out += [f"<p class='note'>{_e(n)}</p>" for n in t.notes]
    out.append(_headline(t.records))
    plots = []
    if y.size and 0 < y.sum() < y.size:
        plots.append(("ROC", _roc_png(y, p, t.site, t.true_risk)))
        plots.append(("Calibration (equal-mass deciles)", _calibration_png(y, p, t.site)))
        plots.append(("Decision curve", _decision_png(y, p, _threshold(t.records))))
    else:
        out.append("<p class='note'>Both outcomes are needed for the ROC, calibration and decision curves.</p>")
    if t.importance:
        plots.append(("SHAP summary: mean |contribution| (log-odds)", _importance_png(t.importance)))
    out.append("<div class='plots'>")
    for caption, png in plots:
        out.append(f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{png}'>"
                   f"<figcaption>{_e(caption)}</figcaption></figure>")
    out.append("</div>")
    out.append("<h3>By site, sex and age band (95% bootstrap intervals)</h3>")
    out.append(_table(t.records))
    out.append("</section>")
    return "\n".join(out)


def _headline(records: Sequence[Mapping]) -> str:
    overall = [r for r in records if r.get("group") == "all"]
    if not overall:
        return ""
    r = overall[0]
    items = [
        ("AUROC", _ci(r, "auroc", 3)),
        ("oracle AUROC", _fmt(r.get("oracle_auroc"), 3)),
        ("calibration slope", _ci(r, "calibration_slope", 2)),
        ("ECE", _ci(r, "ece", 3)),
        ("rows", _fmt(r.get("n"))),
        ("prevalence", _fmt(r.get("prevalence"), 3)),
    ]
    return "<p class='headline'>" + " &middot; ".join(f"<b>{_e(k)}</b> {_e(v)}" for k, v in items) + "</p>"


def _table(records: Sequence[Mapping]) -> str:
    head = "".join(f"<th>{_e(label)}</th>" for _, label, _ in TABLE_COLUMNS)
    body = []
    for r in records:
        cells = []
        for key, _, digits in TABLE_COLUMNS:
            text = _ci(r, key, digits) if digits is not None and f"{key}_lo" in r else _fmt(r.get(key), digits)
            cls = " class='num'" if digits is not None or key == "n" else ""
            cells.append(f"<td{cls}>{_e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ---- plots ------------------------------------------------------------------------------
def _figure(width: float = 5.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _sites(site: np.ndarray | None) -> list[str]:
    if site is None:
        return []
    return sorted({str(s) for s in np.asarray(site, dtype=object).tolist() if s is not None})


def _roc_png(y, p, site, true_risk) -> str:
    fig, ax = _figure()
    fpr, tpr = metrics.roc_curve(y, p)
    ax.plot(fpr, tpr, color="black", lw=2, label=f"all (AUROC {metrics.auroc(y, p):.3f})")
    if true_risk is not None:
        t = np.asarray(true_risk, dtype=float)
        ok = ~np.isnan(t)
        if ok.any() and 0 < y[ok].sum() < ok.sum():
            f2, t2 = metrics.roc_curve(y[ok], t[ok])
            ax.plot(f2, t2, color="grey", lw=1.5, ls="--", label=f"oracle ({metrics.auroc(y[ok], t[ok]):.3f})")
    s_arr = None if site is None else np.asarray(site, dtype=object)
    for s in _sites(site):
        m = s_arr == s
        if 0 < y[m].sum() < m.sum():
            f, tp = metrics.roc_curve(y[m], p[m])
            ax.plot(f, tp, lw=1, alpha=0.8, label=f"{s} ({metrics.auroc(y[m], p[m]):.3f})")
    ax.plot([0, 1], [0, 1], color="lightgrey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _calibration_png(y, p, site) -> str:
    fig, ax = _figure()
    cc = metrics.calibration_curve(y, p)
    ax.plot(cc["mean_risk"], cc["observed"], "o-", color="black", lw=2, label="all")
    s_arr = None if site is None else np.asarray(site, dtype=object)
    for s in _sites(site):
        m = s_arr == s
        if m.sum() >= 50:
            c = metrics.calibration_curve(y[m], p[m])
            ax.plot(c["mean_risk"], c["observed"], ".-", lw=1, alpha=0.8, label=s)
    hi = float(max(np.nanmax(cc["mean_risk"]), np.nanmax(cc["observed"]), 0.05)) * 1.05
    ax.plot([0, hi], [0, hi], color="lightgrey", lw=1)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("mean predicted risk")
    ax.set_ylabel("observed rate")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def _decision_png(y, p, threshold: float | None) -> str:
    fig, ax = _figure()
    top = float(min(0.99, max(0.05, np.quantile(p, 0.99))))
    ts = np.linspace(0.01, top, 40)
    dc = metrics.decision_curve(y, p, ts)
    ax.plot(ts, dc["model"], color="black", lw=2, label="model")
    ax.plot(ts, dc["treat_all"], color="grey", lw=1, ls="--", label="treat all")
    ax.axhline(0, color="lightgrey", lw=1, label="treat none")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", lw=1, ls=":", label=f"high-risk threshold {threshold:g}")
    prevalence = float(np.mean(y))
    ax.set_ylim(-0.05 * max(prevalence, 0.01), max(prevalence, 0.01) * 1.1)
    ax.set_xlabel("threshold risk")
    ax.set_ylabel("net benefit")
    ax.legend(fontsize=7)
    return _png(fig)


def _importance_png(importance: Mapping[str, float], top: int = 20) -> str:
    items = list(importance.items())[:top][::-1]
    fig, ax = _figure(6.0, max(2.5, 0.28 * len(items) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel("mean |contribution| (log-odds)")
    ax.tick_params(axis="y", labelsize=7)
    return _png(fig)


# ---- formatting ------------------------------------------------------------------------
def _threshold(records: Sequence[Mapping]) -> float | None:
    for r in records:
        if r.get("threshold") is not None:
            return float(r["threshold"])
    return None


def _fmt(value: object, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | np.floating):
        if not math.isfinite(float(value)):
            return "-"
        return f"{float(value):.{digits if digits is not None else 3}f}"
    return str(value)


def _ci(r: Mapping, key: str, digits: int) -> str:
    point, lo, hi = r.get(key), r.get(f"{key}_lo"), r.get(f"{key}_hi")
    text = _fmt(point, digits)
    if lo is not None and hi is not None and text != "-":
        text += f" [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"
    return text


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body{font-family:system-ui,Arial,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.meta{color:#666;font-size:.9em}.note{background:#f6f6f0;padding:.4em .6em;border-left:3px solid #cc9}
.headline{font-size:1.05em}.plots{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}figcaption{text-align:center;font-size:.85em;color:#444}
table{border-collapse:collapse;font-size:.8em;margin-top:.5em}
th,td{border:1px solid #ddd;padding:.25em .45em}th{background:#f2f2f2}td.num{text-align:right;white-space:nowrap}
"""

_GLOSSARY = """
<h2>How to read this</h2>
<ul>
<li><b>AUROC</b>: probability that a patient with the outcome is ranked above one without.
<b>oracle AUROC</b>: the same for the generator's true risk (generated data only): the best any model could do.</li>
<li><b>calibration slope</b> (1 is ideal; below 1: risks too extreme) and <b>intercept</b>
(calibration-in-the-large, 0 is ideal) from a logistic recalibration on logit(risk).
<b>ECE</b>: mean |observed rate - mean risk| over 10 equal-mass bins of risk.</li>
<li><b>sensitivity, PPV, NNS</b> at the high-risk threshold:
NNS = patients flagged per true case among them (1/PPV).</li>
<li><b>net benefit</b> (decision curve): (true positives - false positives x t/(1-t)) / n at threshold t.</li>
<li>Intervals: 95% percentile bootstrap, resampling patients.</li>
</ul>
"""
