"""Model card (markdown) from a bundle's metadata and its evaluation records.

Sections follow Mitchell et al. (2019), "Model Cards for Model Reporting":
model details, intended use, population, data, metrics per site with 95%
intervals, calibration, fairness (by sex and age band), most influential
features, limitations. Every figure comes from the inputs; nothing is typed in.
Evaluation records are those of `chronorisk.training.evaluation.evaluate`
(plain dicts, so this module needs no training code).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

INTENDED_USE = {
    "complication_1y": (
        "Flag adults with diabetes or hypertension whose risk of a first complication (CKD stage 3+ or "
        "diabetic nephropathy, retinopathy, neuropathy, myocardial infarction, stroke, heart failure) "
        "within one year is high, so that their GP can review them sooner (worklist ordering, recall)."
    ),
    "onset_2y": (
        "Flag adults without diabetes or hypertension whose risk of a new diagnosis of either within "
        "two years is high, so that they can be offered screening (blood pressure, HbA1c)."
    ),
}
GENERAL_USE = (
    "Decision support for clinicians and public-health staff: it orders and explains, it does not decide. "
    "Not for diagnosis, not for withholding care, not for patients outside the population below."
)


def render_model_card(
    metadata: Mapping,
    records: Sequence[Mapping] = (),
    *,
    task: object | None = None,
    importance: Mapping[str, float] | None = None,
    limitations: Sequence[str] = (),
    baseline: Mapping | None = None,
) -> str:
    """Markdown text of the model card.

    A model that failed training's checks (`metadata["unfit"]`, kept only with `--allow-unfit`) opens
    with "not fit for use" and the reasons; a feature list whose contributions are all zero is not shown.
    """
    task_name = str(metadata.get("task") or _get(task, "name") or "?")
    name = metadata.get("name") or f"chronorisk-{task_name}"
    lines = [f"# Model card: {name} (version {metadata.get('version', '?')})", ""]
    unfit = metadata.get("unfit") or []
    if unfit:
        lines += ["**Not fit for use.** This model failed training's checks and was kept for experiments only "
                  "(`--allow-unfit`):", "", *[f"- {_md(r)}" for r in unfit], ""]
    lines += _details(metadata)
    lines += ["## Intended use", "", INTENDED_USE.get(task_name, _get(task, "description") or ""), "", GENERAL_USE, ""]
    lines += _population(task)
    lines += _supplied_labels(metadata)
    lines += _data(metadata, records)
    lines += _tiers_section(metadata)
    lines += _metrics_section(records)
    lines += _baseline(baseline)
    lines += _calibration(metadata, records)
    lines += _fairness(records)
    if importance and not unfit and any(abs(v) > 0 for v in importance.values()):
        how = ("exact linear contributions coef x (value - training mean)" if metadata.get("model_kind") == "logistic"
               else "LightGBM's exact TreeSHAP")
        lines += ["## Most influential features", "",
                  f"Mean |contribution| (log-odds) over the evaluation rows, from {how}.", "",
                  "| feature | mean abs. contribution |", "|---|---:|"]
        lines += [f"| {_md(k)} | {v:.4f} |" for k, v in list(importance.items())[:15]]
        lines.append("")
    lines += _limitations(records, limitations)
    return "\n".join(lines).rstrip() + "\n"


def _details(m: Mapping) -> list[str]:
    versions = m.get("versions") or {}
    tiers = m.get("tiers") or {}
    n_features = len(m.get("feature_names") or [])
    selection = m.get("model_selection") or {}
    losses = selection.get("cv_log_loss") or {}
    chosen = ("; chosen by cross-validated log loss on the training data ("
              + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()) + ")") if len(losses) > 1 else ""
    model = (f"penalized logistic regression (median imputation, missing indicators, standardized; "
             f"C={(m.get('logistic_params') or {}).get('C', '?')}), {n_features} features"
             if m.get("model_kind") == "logistic"
             else f"LightGBM gradient-boosted trees, {m.get('n_trees', '?')} trees, {n_features} features")
    how = ("exact linear contributions coef x (value - training mean)" if m.get("model_kind") == "logistic"
           else "top factors from LightGBM pred_contrib (exact TreeSHAP)")
    explanations = f"{how}, with the patient's values and their dates"
    rows = [
        ("task", m.get("task")),
        ("model", model + chosen),
        ("calibration", m.get("calibration_method") or (m.get("calibration") or {}).get("method")),
        ("risk tiers", f"medium at >= {tiers.get('medium'):.4g}, high at >= {tiers.get('high'):.4g}"
                       f" ({_tier_rule_words(m.get('tier_rule'))})" if tiers else None),
        ("trained at", m.get("trained_at")),
        ("training data fingerprint", f"`{m.get('data_fingerprint')}`" if m.get("data_fingerprint") else None),
        ("libraries", ", ".join(f"{k} {v}" for k, v in versions.items()) or None),
        ("explanations", explanations),
    ]
    out = ["## Model details", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_md(v)} |" for k, v in rows if v is not None]
    return [*out, ""]


def _supplied_labels(m: Mapping) -> list[str]:
    """What the supplied label files held (instead of an outcome definition)."""
    info = m.get("supplied_labels")
    if not isinstance(info, Mapping):
        return []
    return [
        "## Supplied labels", "",
        "The outcome was not defined here: labels came from files supplied with `--labels`.", "",
        "| | |", "|---|---|",
        f"| files | {_md(', '.join(info.get('files') or []))} |",
        f"| fingerprint | `{info.get('fingerprint')}` |",
        f"| rows | {info.get('rows')} ({info.get('subjects')} subjects) |",
        f"| cases | {info.get('cases')} (prevalence {100 * float(info.get('prevalence') or 0):.1f}%) |",
        f"| prediction times | {info.get('first_prediction_time')} to {info.get('last_prediction_time')} |",
        "",
    ]


def _baseline(b: Mapping | None) -> list[str]:
    """Which of the model and its baseline (the other kind, same rows) is better, and by how much."""
    if not b:
        return []
    if "difference" not in b:
        return ["## Baseline", "", _md(b.get("note", "no baseline")), ""]
    names = {"logistic": "penalized logistic regression", "lightgbm": "LightGBM"}
    lo, hi = b.get("difference_lo"), b.get("difference_hi")
    ci = f" (95% paired bootstrap {lo:+.3f} to {hi:+.3f})" if _finite(lo) and _finite(hi) else ""
    better = names.get(b.get("better"), b.get("better"))
    return [
        "## Baseline", "",
        f"The same features and held-out rows ({b.get('n')} rows, {b.get('n_positive')} cases), the other model "
        "kind refitted on the same training rows:", "",
        "| model | AUROC | ECE |", "|---|---:|---:|",
        f"| this model ({names.get(b.get('model_kind'))}) | {b['model_auroc']:.3f} | {b.get('model_ece', 0):.3f} |",
        f"| baseline ({names.get(b.get('baseline_kind'))}) | {b['baseline_auroc']:.3f} "
        f"| {b.get('baseline_ece', 0):.3f} |",
        "",
        f"AUROC difference (this model minus baseline): {b['difference']:+.3f}{ci}. Better: {better}.", "",
    ]


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _tier_rule_words(rule: Mapping | None) -> str:
    """How the thresholds were set, in words."""
    if not rule or rule.get("rule") == "cutoffs":
        return "fixed risk cut-offs"
    if rule.get("rule") == "top_percent":
        return (f"fitted on validation rows: top {rule['high']:g}% flagged high, top {rule['medium']:g}% medium "
                "or higher")
    return (f"fitted on validation rows: sensitivity {rule['high']:g} at high, {rule['medium']:g} at medium "
            "or higher")


def _tiers_section(m: Mapping) -> list[str]:
    """What each tier means on the validation rows: share flagged, sensitivity, PPV (at or above it)."""
    rows = (m.get("metrics") or {}).get("tiers") if isinstance(m.get("metrics"), Mapping) else None
    if not rows:
        return []

    def pct(v) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    out = ["## Risk tiers", "", f"Thresholds: {_tier_rule_words(m.get('tier_rule'))}. On the validation "
           "(tuning) rows, patients at or above each tier:", "",
           "| tier | risk threshold | share flagged | sensitivity | PPV |", "|---|---:|---:|---:|---:|"]
    out += [f"| {r['tier']} or higher | {r['threshold']:.4g} | {pct(r['share_flagged'])} | {pct(r['sensitivity'])} "
            f"| {pct(r['ppv'])} |".replace("high or higher", "high") for r in rows]
    return [*out, ""]


def _population(task: object | None) -> list[str]:
    if task is None:
        return []
    pop = _get(task, "population")
    out = ["## Population", ""]
    if pop is not None:
        any_of, none_of = _get(pop, "any_of") or (), _get(pop, "none_of") or ()
        lo, hi = _get(pop, "min_age_years"), _get(pop, "max_age_years")
        if any_of:
            out.append(f"- at the prediction time, recorded before it: any of {', '.join(any_of)}")
        if none_of:
            out.append(f"- none of {', '.join(none_of)} recorded before the prediction time")
        if lo is not None or hi is not None:
            out.append(f"- age {lo if lo is not None else 0} to {hi if hi is not None else 'any'} years")
    outcome = _get(task, "outcome")
    if outcome is not None:
        out.append(f"- outcome: first record of {', '.join(_get(outcome, 'concepts') or ())} "
                   f"within {_get(task, 'horizon_days')} days of the prediction time")
    out.append("- features use only events strictly before the prediction time")
    return [*out, ""]


def _data(m: Mapping, records: Sequence[Mapping]) -> list[str]:
    out = ["## Data", ""]
    train = m.get("training") or {}
    if not isinstance(train, Mapping):  # e.g. "federated": how, not what
        out.append(f"- training: {_md(train)}" + (f" ({_md(m.get('strategy'))})" if m.get("strategy") else ""))
        sizes = m.get("site_sizes")
        if isinstance(sizes, Mapping):
            out.append("- sites: " + ", ".join(f"{_md(k)} ({v} rows)" for k, v in sizes.items()))
        train = {}
    for key, label in (("n_train", "training rows"), ("n_valid", "validation (early stopping) rows"),
                       ("sites", "sites"), ("first_prediction_time", "first prediction time"),
                       ("last_prediction_time", "last prediction time")):
        if train.get(key) is not None:
            value = ", ".join(train[key]) if isinstance(train[key], list) else train[key]
            out.append(f"- {label}: {_md(value)}")
    overall = _overall(records)
    if overall:
        out.append(f"- evaluation rows: {overall.get('n')} ({overall.get('n_positive')} with the outcome, "
                   f"prevalence {_f(overall.get('prevalence'), 3)}), validation: {overall.get('validation')}"
                   + (f", generated data ({overall.get('mode')})" if overall.get("mode") else ""))
    if len(out) == 2:
        out.append("- (no data description recorded)")
    return [*out, ""]


def _metrics_section(records: Sequence[Mapping]) -> list[str]:
    rows = [r for r in records if r.get("group") in ("all", "site")]
    if not rows:
        return ["## Metrics", "", "No evaluation records.", ""]
    out = ["## Metrics per site (95% bootstrap intervals)", "",
           "| site | n | AUROC | oracle AUROC | AUPRC | Brier | sensitivity | PPV | NNS | net benefit |",
           "|---|---:|---|---:|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {_md(r.get('site'))} | {r.get('n')} | {_ci(r, 'auroc')} | {_f(r.get('oracle_auroc'), 3)} | "
            f"{_ci(r, 'auprc')} | {_ci(r, 'brier', 4)} | {_ci(r, 'sensitivity', 2)} | {_ci(r, 'ppv', 2)} | "
            f"{_ci(r, 'nns', 1)} | {_ci(r, 'net_benefit', 4)} |"
        )
    t = _overall(records) or rows[0]
    out.append("")
    out.append(f"Sensitivity, PPV, number needed to screen (patients flagged per true case, 1/PPV) and net "
               f"benefit at the high-risk threshold {_f(t.get('threshold'), 2)}.")
    return [*out, ""]


def _calibration(m: Mapping, records: Sequence[Mapping]) -> list[str]:
    info = m.get("calibration") or {}
    out = ["## Calibration", ""]
    method = m.get("calibration_method") or info.get("method")
    if method:
        where = {
            "cross_fit": "out-of-fold rows (cross-fitted margins of the train and tuning patients)",
            "tuning": "tuning-split rows",
        }.get(info.get("rows"), "held-out rows")
        line = f"Calibrator: {method}, fitted on {info.get('n', '?')} {where}"
        scores = info.get("cross_fitted")
        if scores:
            line += (" (chosen by cross-fitted log loss: platt "
                     f"{_f(scores['platt']['log_loss'], 4)}, isotonic {_f(scores['isotonic']['log_loss'], 4)})")
        out += [line + ".", ""]
    rows = [r for r in records if r.get("group") in ("all", "site")]
    if rows:
        out += ["| site | calibration slope | calibration intercept | ECE | mean risk | observed rate |",
                "|---|---|---|---|---:|---:|"]
        out += [
            f"| {_md(r.get('site'))} | {_ci(r, 'calibration_slope', 2)} | {_ci(r, 'calibration_intercept', 2)} | "
            f"{_ci(r, 'ece')} | {_f(r.get('mean_risk'), 3)} | {_f(r.get('prevalence'), 3)} |"
            for r in rows
        ]
        out.append("")
    return out


def _fairness(records: Sequence[Mapping]) -> list[str]:
    rows = [r for r in records if r.get("group") in ("sex", "age_band")]
    if not rows:
        return []
    out = ["## Fairness: by sex and age band", "",
           "| group | n | prevalence | AUROC | calibration slope | ECE | sensitivity | PPV |",
           "|---|---:|---:|---|---|---|---|---|"]
    for r in rows:
        label = f"sex {r.get('sex')}" if r.get("group") == "sex" else f"age {r.get('age_band')}"
        out.append(
            f"| {_md(label)} | {r.get('n')} | {_f(r.get('prevalence'), 3)} | {_ci(r, 'auroc')} | "
            f"{_ci(r, 'calibration_slope', 2)} | {_ci(r, 'ece')} | {_ci(r, 'sensitivity', 2)} | {_ci(r, 'ppv', 2)} |"
        )
    return [*out, ""]


def _limitations(records: Sequence[Mapping], extra: Sequence[str]) -> list[str]:
    out = ["## Limitations", ""]
    overall = _overall(records)
    if overall and overall.get("mode"):
        out.append("- Trained and evaluated on generated (synthetic) records; performance on real records "
                   "must be checked with `chronorisk evaluate --meds ... --labels ...` before clinical use.")
    if overall and overall.get("auroc_ratio") is not None:
        out.append(f"- The model reaches {_f(overall['auroc_ratio'], 3)} of the oracle AUROC: missing and noisy "
                   "measurements (community sites miss many dynamic values) limit what any model can see.")
    out += [
        "- Risks are calibrated to the sites and years it was trained on; a new site, a change of units or "
        "coding, or a shift in the population can miscalibrate it (watched by `chronorisk monitor`).",
        "- Explanations describe the model, not causes: a factor that raises the predicted risk is not "
        "necessarily something to treat.",
        "- Groups with too few rows are not reported; wide intervals mean little data, not proof of fairness.",
    ]
    out += [f"- {x}" for x in extra]
    return [*out, ""]


# ---- helpers -----------------------------------------------------------------------------
def _overall(records: Sequence[Mapping]) -> Mapping | None:
    return next((r for r in records if r.get("group") == "all"), None)


def _get(obj: object, name: str) -> object:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _f(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "-" if not math.isfinite(v) else f"{v:.{digits}f}"


def _ci(r: Mapping, key: str, digits: int = 3) -> str:
    text = _f(r.get(key), digits)
    lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
    if text != "-" and lo is not None and hi is not None:
        text += f" ({_f(lo, digits)}-{_f(hi, digits)})"
    return text


def _md(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
