"""The MLOps page: per task and site, the monitoring status, its reasons, history and reports.

Rendered from `<work>/monitoring/summary.json` (written by `chronorisk
monitor`), plain HTML with inline SVG, no JavaScript. The service mounts:

- `GET /ui/mlops` -> `mlops_fragment(load_summary(dir), report_url="/ui/mlops/reports")`
  inside its page layout (or `mlops_page(...)`, a whole document);
- `GET /ui/mlops/reports/{path:path}` -> the file `report_file(dir, path)`
  (an Evidently HTML or a window's JSON; None = 404).

Everything shown comes from the summary: statuses, reasons, figures; no
patient data is on the page (the log holds none).
"""

from __future__ import annotations

from html import escape
from pathlib import Path

_STATUS_STYLE = {
    "ok": ("#1d5b2a", "#e6f4ea"),
    "warning": ("#7a4a00", "#fff3dc"),
    "alert": ("#8a0018", "#fde8ec"),
}
STYLE = """
.mlops .status { font-weight: bold; padding: 0.1em 0.5em; border-radius: 0.3em; border: 2px solid; }
.mlops .status-ok { color: #1d5b2a; border-color: #1d5b2a; background: #e6f4ea; }
.mlops .status-warning { color: #7a4a00; border-color: #7a4a00; background: #fff3dc; }
.mlops .status-alert { color: #8a0018; border-color: #8a0018; background: #fde8ec; }
.mlops ul.reasons { margin: 0.2em 0 0.2em 1.2em; padding: 0; }
.mlops ul.reasons li { margin: 0.15em 0; }
.mlops td.num { text-align: right; }
.mlops details { margin: 0.4em 0 1em; }
.mlops .history td, .mlops .history th { font-size: 0.9em; padding: 0.2em 0.5em; }
"""


def _status(status: str) -> str:
    return f'<span class="status status-{escape(status)}">{escape(status)}</span>'


def _num(value, fmt: str = "{:.2f}") -> str:
    return "" if value is None else escape(fmt.format(value))


def _share_cell(s: dict) -> str:
    """The drift share, or 'not tested' for a window below min_window_rows (not a silent blank)."""
    if not s.get("tested", True) and s.get("drift_share") is None:
        return '<span class="note" title="fewer rows than monitor.min_window_rows">not tested</span>'
    return _num(s.get("drift_share"))


def _link(report_url: str, rel: str | None, text: str) -> str:
    if not rel:
        return ""
    href = f"{report_url.rstrip('/')}/{rel.removeprefix('reports/')}"
    return f'<a href="{escape(href, quote=True)}">{escape(text)}</a>'


def history_svg(history: list[dict], *, width: int = 560, height: int = 150) -> str:
    """Drift share (bars, coloured by status) and realized AUROC (line) per window."""
    if not history:
        return ""
    pad_l, pad_r, pad_t, pad_b = 40, 40, 10, 26
    inner_w, inner_h = width - pad_l - pad_r, height - pad_t - pad_b
    n = len(history)
    step = inner_w / n
    parts = [
        f'<svg role="img" aria-label="Drift share and realized AUROC per window" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        "<title>Drift share (bars) and realized AUROC (line) per window</title>",
        f'<rect x="{pad_l}" y="{pad_t}" width="{inner_w}" height="{inner_h}" fill="#fafafa" stroke="#999"/>',
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="11" text-anchor="end">100%</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + inner_h}" font-size="11" text-anchor="end">0</text>',
        f'<text x="{pad_l + inner_w + 4}" y="{pad_t + 10}" font-size="11">AUC 1</text>',
        f'<text x="{pad_l + inner_w + 4}" y="{pad_t + inner_h}" font-size="11">0.5</text>',
    ]
    points = []
    for i, h in enumerate(history):
        x = pad_l + i * step
        share = h.get("drift_share") or 0.0
        colour = _STATUS_STYLE.get(h.get("status", "ok"), _STATUS_STYLE["ok"])[0]
        bar_h = max(inner_h * min(share, 1.0), 1.0)
        parts.append(
            f'<rect x="{x + step * 0.15:.1f}" y="{pad_t + inner_h - bar_h:.1f}" width="{max(step * 0.7, 1):.1f}" '
            f'height="{bar_h:.1f}" fill="{colour}"><title>{escape(h["window"])}: {escape(h.get("status", ""))}, '
            f'drift share {share:.2f}</title></rect>'
        )
        if h.get("auroc") is not None:
            y = pad_t + inner_h * (1 - (min(max(h["auroc"], 0.5), 1.0) - 0.5) / 0.5)
            points.append((x + step / 2, y, h))
    if len(points) > 1:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="#1f4e8c" stroke-width="2"/>')
    for x, y, h in points:
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#1f4e8c"><title>{escape(h["window"])}: '
                     f'AUROC {h["auroc"]:.3f}</title></circle>')
    parts.append(f'<text x="{pad_l}" y="{height - 6}" font-size="11">{escape(history[0]["window"])}</text>')
    parts.append(f'<text x="{pad_l + inner_w}" y="{height - 6}" font-size="11" text-anchor="end">'
                 f'{escape(history[-1]["window"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def mlops_fragment(summary: dict, *, report_url: str = "/ui/mlops/reports", max_history: int = 26) -> str:
    """The page body: a status table per task and window kind, then each site's reasons and history."""
    out = ['<div class="mlops">', f"<style>{STYLE}</style>", "<h1>Model monitoring</h1>"]
    tasks = summary.get("tasks") or {}
    if not tasks:
        out.append('<p class="note">No monitoring results yet: run <code>chronorisk monitor</code> after scoring.</p>')
        out.append("</div>")
        return "".join(out)
    overall = summary.get("overall_status", "ok")
    out.append(f"<p>Overall status: {_status(overall)}</p>")
    for task, kinds in sorted(tasks.items()):
        for kind, section in sorted(kinds.items()):
            out.append(_task_section(task, kind, section, report_url, max_history))
    out.append("</div>")
    return "".join(out)


def _task_section(task: str, kind: str, section: dict, report_url: str, max_history: int) -> str:
    sites = section.get("sites") or {}
    out = [f"<h2>{escape(task)} <small>({escape(kind)}ly windows)</small></h2>",
           "<table><thead><tr><th>Site</th><th>Status</th><th>Latest window</th><th>Last not ok</th>"
           "<th class='num'>Scores</th>"
           "<th class='num'>Drift share</th><th>Drifted features</th><th class='num'>Prediction drift</th>"
           "<th class='num'>Realized AUROC (reference)</th><th class='num'>Estimated AUROC, no labels (95%)</th>"
           "<th>Estimated sensitivity / PPV by tier</th><th>Report</th></tr></thead><tbody>"]
    for site, s in sorted(sites.items()):
        perf = s.get("performance_to_date") or {}
        drifted = s.get("drifted_features") or []
        auroc = ""
        if perf.get("auroc_weighted") is not None:
            auroc = f"{perf['auroc_weighted']:.3f}"
            if perf.get("reference_auroc") is not None:
                auroc += f" ({perf['reference_auroc']:.3f})"
        out.append(
            f"<tr><td>{escape(site)}</td><td>{_status(s['status'])}</td><td>{escape(s['window'])}</td>"
            f"<td>{escape(s.get('last_not_ok') or '')}</td>"
            f"<td class='num'>{s['n_rows']:,}</td><td class='num'>{_share_cell(s)}</td>"
            f"<td>{escape(', '.join(drifted[:6]))}{' ...' if len(drifted) > 6 else ''}</td>"
            f"<td class='num'>{_num(s.get('prediction_drift'))}</td><td class='num'>{escape(auroc)}</td>"
            f"{_estimate_cells(s.get('estimated_performance'))}"
            f"<td>{_link(report_url, s.get('report_html'), 'Evidently report')} "
            f"{_link(report_url, s.get('report_json'), 'JSON')}</td></tr>"
        )
    out.append("</tbody></table>")
    for site, s in sorted(sites.items()):
        out.append(_site_details(site, s, report_url, max_history))
    return "".join(out)


def _estimate_cells(est: dict | None) -> str:
    """The label-free estimate of the latest window: AUROC with its 95% range, sensitivity / PPV per tier."""
    if not est or est.get("auroc") is None:
        return "<td class='num'></td><td></td>"
    auroc = f"{est['auroc']:.3f}"
    if est.get("auroc_low") is not None:
        auroc += f" ({est['auroc_low']:.3f}-{est['auroc_high']:.3f})"
    if est.get("below_floor"):
        auroc += f" below floor {est['floor']:.2f}"
    tiers = "; ".join(f"{t['tier']} >= {t['threshold']:g}: {_num(t.get('sensitivity'))} / {_num(t.get('ppv'))}"
                      for t in est.get("thresholds", []))
    return f"<td class='num'>{escape(auroc)}</td><td>{escape(tiers)}</td>"


def _site_details(site: str, s: dict, report_url: str, max_history: int) -> str:
    history = (s.get("history") or [])[-max_history:]
    open_attr = " open" if s["status"] != "ok" else ""
    out = [f"<details{open_attr}><summary><strong>{escape(site)}</strong>: {_status(s['status'])} "
           f"in {escape(s['window'])}</summary>",
           '<p class="note">Drift share: the larger of the shares of tested features that drifted against the '
           "training reference (when it counts: scores on the training schedule) and against the site's recent "
           "windows.</p>", '<ul class="reasons">']
    out += [f"<li>{escape(r)}</li>" for r in s.get("reasons", [])[:12]]
    out.append("</ul>")
    out.append(impossible_values_table(s.get("impossible_values") or []))
    out.append(history_svg(history))
    out.append('<table class="history"><thead><tr><th>Window</th><th>Status</th><th class="num">Scores</th>'
               '<th class="num">Drift share</th><th class="num">vs training</th><th class="num">vs recent</th>'
               '<th>Drifted</th><th class="num">Pred. drift</th>'
               '<th class="num">Outcomes</th><th class="num">AUROC</th><th class="num">Estimated AUROC</th>'
               '<th class="num">ECE</th>'
               '<th class="num">Cal. slope</th><th>Report</th></tr></thead><tbody>')
    for h in reversed(history):
        drifted = h.get("drifted_features") or []
        out.append(
            f"<tr><td>{escape(h['window'])}</td><td>{_status(h['status'])}</td><td class='num'>{h['n_rows']:,}</td>"
            f"<td class='num'>{_share_cell(h)}</td>"
            f"<td class='num'>{_num(h.get('training_drift_share'))}</td>"
            f"<td class='num'>{_num(h.get('change_share'))}</td>"
            f"<td>{escape(', '.join(drifted[:4]))}{' ...' if len(drifted) > 4 else ''}</td>"
            f"<td class='num'>{_num(h.get('prediction_drift'))}</td><td class='num'>{h.get('n_outcomes') or 0:,}</td>"
            f"<td class='num'>{_num(h.get('auroc'), '{:.3f}')}</td>"
            f"<td class='num'>{_num(h.get('estimated_auroc'), '{:.3f}')}</td>"
            f"<td class='num'>{_num(h.get('ece'), '{:.3f}')}</td>"
            f"<td class='num'>{_num(h.get('calibration_slope'))}</td>"
            f"<td>{_link(report_url, h.get('html'), 'HTML')} {_link(report_url, h.get('json'), 'JSON')}</td></tr>"
        )
    out.append("</tbody></table></details>")
    return "".join(out)


def impossible_values_table(rows: list[dict]) -> str:
    """The latest window's codes with values dropped as impossible (outside the plausible range)."""
    if not rows:
        return ""
    out = ['<table class="impossible"><caption>Impossible input values dropped by the features, latest window'
           '</caption><thead><tr><th>Measurement</th><th>Code</th><th class="num">Dropped</th>'
           '<th class="num">Values</th><th class="num">Share</th><th class="num">Training share</th>'
           '<th>Verdict</th></tr></thead><tbody>']
    for v in rows:
        verdict = "alert" if v.get("flagged") else "ok"
        if v.get("probable_unit"):
            verdict += f": probably {v['probable_unit']}"
        out.append(
            f"<tr><td>{escape(v.get('display') or '')}</td><td>{escape(v['code'])}</td>"
            f"<td class='num'>{v['n_dropped']:,}</td><td class='num'>{v['n_values']:,}</td>"
            f"<td class='num'>{_num(v.get('share'), '{:.1%}')}</td>"
            f"<td class='num'>{_num(v.get('reference_share'), '{:.2%}')}</td><td>{escape(verdict)}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def mlops_page(summary: dict, *, report_url: str = "/ui/mlops/reports", title: str = "Model monitoring") -> str:
    """A whole HTML document around `mlops_fragment` (for use without the service's layout)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · chronorisk</title><style>"
        "body{font-family:system-ui,'Segoe UI',Arial,sans-serif;font-size:18px;line-height:1.45;margin:1em 1.2em;}"
        "table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #bbb;padding:.35em .7em;text-align:left;"
        "vertical-align:top}th{background:#eef2f7}</style></head><body>"
        + mlops_fragment(summary, report_url=report_url)
        + "</body></html>"
    )


def report_file(monitoring_dir: Path | str, relpath: str) -> Path | None:
    """The report file a link points at, or None: only `.html`/`.json` under `<monitoring>/reports/`."""
    base = (Path(monitoring_dir) / "reports").resolve()
    if not relpath or "\x00" in relpath:
        return None
    candidate = (base / relpath.removeprefix("reports/")).resolve()
    if base not in candidate.parents or candidate.suffix not in (".html", ".json") or not candidate.is_file():
        return None
    return candidate
