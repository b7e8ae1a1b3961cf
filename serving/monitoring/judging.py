"""Judging one (site, window): each feature's verdict, the two comparisons, performance, the status."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from chronorisk.serving.monitoring.estimate import (
    PerformanceEstimate,
    estimate_performance,
    judged_against_floor,
    with_realized,
)
from chronorisk.serving.monitoring.inputs import describe as describe_inputs
from chronorisk.serving.monitoring.inputs import judge_inputs, scale_conversions
from chronorisk.serving.monitoring.reference import (
    FeatureBaseline,
    Reference,
    SiteBaseline,
    align_elapsed,
    aligned_matrix,
    baseline_from_frame,
    calendar_features,
    feature_matrix,
)
from chronorisk.serving.monitoring.statistics import (
    binomial_p,
    distance_and_p,
    drift_scorer,
    expected_outside,
    normal_sf,
    p_value,
    realized_performance,
    rounded,
    sample_index,
    screen_features,
    screened_features,
    seed_of,
    shares,
    sorted_median,
    two_proportion_p,
)
from chronorisk.serving.monitoring.windows import Window

if TYPE_CHECKING:
    from chronorisk.serving.config import MonitorConfig


STATUSES = ("ok", "warning", "alert")


STATUS_RANK = {s: i for i, s in enumerate(STATUSES)}


def judge_feature(
    name: str,
    current: np.ndarray,
    n_rows: int,
    stats: dict,
    baseline: FeatureBaseline,
    config: MonitorConfig,
    wasserstein,
    values: np.ndarray | None = None,
) -> dict:
    """One feature's drift verdict: scores, which tests fired, and how strongly.

    `current` is the window's (sampled) values, `values` the same without
    missing values, sorted, when the caller has them already; `wasserstein`
    scores the distribution shift (see `drift_scorer`), the two-sample KS
    p-value (asymptotic) its significance, both on the sorted samples because
    they run thousands of times per monitor run.
    """
    if values is None:
        values = np.sort(current[~np.isnan(current)])
    out: dict[str, Any] = {
        "feature": name, "n": int(stats["n"]), "missing_share": rounded(stats["missing_share"]),
        "reference_missing_share": rounded(baseline.missing), "median": rounded(sorted_median(values)),
        "reference_median": rounded(baseline.median), "mean": rounded(stats["mean"]),
        "reference_mean": rounded(baseline.mean),
        "reference_range": [rounded(baseline.lo), rounded(baseline.hi)],
        "out_of_range_share": rounded(stats["out_of_range_share"]),
        "reference_out_of_range_share": rounded(baseline.outside),
        "wasserstein": None, "ks_p": None, "kinds": [], "severe": False,
    }
    if values.size >= config.min_feature_rows and baseline.values.size >= config.min_feature_rows:
        w, p = distance_and_p(wasserstein, baseline.values, values)
        out["wasserstein"], out["ks_p"] = rounded(w), p_value(p)
        if w >= config.feature_drift_threshold and p < config.significance:
            out["kinds"].append("distribution")
            out["severe"] |= bool(w >= config.severe_drift_threshold and p < config.severe_significance)
    if (stats["n"] >= config.min_feature_rows and not math.isnan(baseline.lo)
            and baseline.values.size >= config.min_feature_rows):
        share = stats["out_of_range_share"]
        outside = values[(values < baseline.lo) | (values > baseline.hi)]
        out["out_of_range_median"] = rounded(sorted_median(outside))
        p0 = expected_outside(baseline, config)
        p_oor = binomial_p(stats["out_of_range_count"], stats["n"], p0)
        out["out_of_range_p"] = p_value(p_oor)
        if share >= max(config.out_of_range_share, 3 * p0) and p_oor < config.significance:
            out["kinds"].append("out_of_range")
            out["severe"] |= bool(share >= config.severe_out_of_range_share and p_oor < config.severe_significance)
    if not math.isnan(baseline.missing):
        p_miss = two_proportion_p(stats["missing_share"], n_rows, baseline.missing, baseline.n)
        out["missing_p"] = p_value(p_miss)
        moved = abs(stats["missing_share"] - baseline.missing)
        if moved >= config.missing_share_change and p_miss < config.significance:
            out["kinds"].append("missingness")
    out["drifted"] = bool(out["kinds"])
    return out


@dataclass
class WindowInput:
    """One site's rows in one window, ready to judge."""

    task: str
    site: str
    window: Window
    rows: pl.DataFrame  # features, risk, tier, source, model_version, join_key
    outcomes: pl.DataFrame | None = None  # join_key, outcome (only those known by as_of)
    recent: pl.DataFrame | None = None  # the same site's rows of its previous windows (sampled)
    recent_labels: tuple[str, ...] = ()
    input_checks: pl.DataFrame | None = None  # logged input checks of the site's window (code, counts, median)


@dataclass
class WindowResult:
    """The verdict of one (site, window); `to_dict` is its JSON report (sections as documented there)."""

    task: str
    site: str
    window: str
    window_kind: str
    window_start: str
    window_end: str
    n_rows: int
    model_versions: dict[str, int]
    sources: dict[str, float]
    reference: dict[str, Any]
    performance: dict[str, Any]
    estimated_performance: PerformanceEstimate | None
    tested: bool = False
    status: str = "ok"
    reasons: list[str] = field(default_factory=list)
    data_drift: dict[str, Any] | None = None  # vs the training reference
    prediction_drift: dict[str, Any] | None = None  # the risk distribution vs the training reference
    change: dict[str, Any] | None = None  # vs the site's recent windows
    input_checks: dict[str, Any] | None = None  # impossible values dropped per code (monitoring/inputs.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_window(inp: WindowInput, reference: Reference, baseline: SiteBaseline,
                    config: MonitorConfig) -> WindowResult:
    """The verdict of one (site, window): drift vs training and vs recent windows, performance, impossible
    input values (an alert whatever the window's size: the binomial test needs significance), status."""
    result = _drift_and_performance(inp, reference, baseline, config)
    result.input_checks = judge_inputs(inp.input_checks, reference.meta.get("input_codes") or {}, config)
    flagged = [v for v in result.input_checks["codes"] if v["flagged"]]
    if flagged:
        reasons = result.reasons[1:] if result.reasons and result.reasons[0].startswith("ok:") else result.reasons
        result.status, result.reasons = "alert", [*(describe_inputs(v) for v in flagged), *reasons]
    return result


def _drift_and_performance(inp: WindowInput, reference: Reference, baseline: SiteBaseline,
                           config: MonitorConfig) -> WindowResult:
    rows = inp.rows
    performance = window_performance(inp, baseline, config)
    estimate = window_estimate(inp, reference, performance, config)
    result = WindowResult(
        task=inp.task, site=inp.site, window=inp.window.label, window_kind=inp.window.kind,
        window_start=inp.window.start.date().isoformat(), window_end=inp.window.end.date().isoformat(),
        n_rows=rows.height, model_versions=_versions(rows), sources=_sources(rows),
        reference={"model_version": reference.model_version, "n_rows": baseline.n,
                   "pooled_sites": baseline.pooled, "time": reference.meta.get("reference_time")},
        performance=performance, estimated_performance=estimate,
    )
    if rows.height < config.min_window_rows:
        status, reasons = "ok", [f"not tested: {rows.height} rows < min_window_rows {config.min_window_rows}"]
        status, reasons = _merge_performance_status(status, reasons, performance, config)
        result.status, result.reasons = _estimate_status(status, reasons, estimate)
        return result
    have = set(rows.columns)
    features = [f for f in reference.feature_names if f in have]
    matrix = feature_matrix(rows, features)
    index = sample_index(rows.height, config.sample_rows, seed_of(config.seed, inp.task, inp.site, inp.window.label))
    sampled = matrix[index] if index is not None else matrix
    risk = rows["risk"].cast(pl.Float64).to_numpy()
    risk = risk[index] if index is not None else risk
    training = baseline
    if baseline.calendar is None:  # fixed per site for the run
        baseline.calendar = calendar_features(baseline, reference, config)
    calendar = baseline.calendar
    recent, aligned, elapsed, column_set = None, matrix, {}, set(features)
    if (inp.recent is not None and len(inp.recent_labels) >= config.recent_min_windows
            and inp.recent.height >= 2 * config.min_window_rows):
        elapsed = {f: d for f, d in reference.elapsed.items() if f in column_set}
        when = inp.window.start
        recent = baseline_from_frame(align_elapsed(inp.recent, elapsed, when), features, config, site=inp.site)
        aligned = aligned_matrix(matrix, rows, features, elapsed, when)
    stats = {"training": screen_features(matrix, features, training)}
    if recent is not None:
        stats["recent"] = screen_features(aligned, features, recent)
    rank = reference.rank
    top = sorted(stats["training"], key=rank.__getitem__)[: config.top_features]
    screened = set(screened_features(stats["training"], training, config))
    if recent is not None:
        screened |= set(screened_features(stats["recent"], recent, config))
    tested = top + sorted(screened - set(top), key=rank.__getitem__)
    column = {f: j for j, f in enumerate(features)}
    wasserstein = drift_scorer(config.stattest)
    batch_share = result.sources.get("batch", 0.0)
    counts = "all" if batch_share >= config.min_batch_share else "unit changes"
    samples = {"training": sampled, "recent": aligned[index] if index is not None else aligned}
    sorted_values: dict[tuple[str, bool], np.ndarray] = {}  # both comparisons share all but the aligned columns

    def values_of(f: str, which: str) -> tuple[np.ndarray, np.ndarray]:
        current = samples[which][:, column[f]]
        key = (f, which == "recent" and f in elapsed)
        if key not in sorted_values:
            sorted_values[key] = np.sort(current[~np.isnan(current)])
        return current, sorted_values[key]

    def compare(base: SiteBaseline, which: str) -> dict[str, Any]:
        verdicts = []
        for f in tested:
            current, values = values_of(f, which)
            v = judge_feature(f, current, rows.height, stats[which][f], base.features[f], config, wasserstein,
                              values)
            v["display"] = reference.display(f)
            v["importance_rank"] = rank[f]
            hint = unit_hint(f, v, reference)
            if hint and (v.get("out_of_range_p") or 1.0) < config.severe_significance:
                v["hint"], v["severe"] = hint, True  # values at a known unit factor: a unit change alerts alone
            if which == "training" and f in calendar and v["drifted"] and not v.get("hint"):
                v["calendar"], v["kinds"] = v["kinds"], []  # moved as the clock moves it: reported, not counted
                v["drifted"] = v["severe"] = False
            verdicts.append(v)
        drifted = [v for v in verdicts if v["drifted"]]
        return {
            "method": config.stattest, "threshold": config.feature_drift_threshold,
            "n_features": len(features), "n_tested": len(tested), "n_screened_in": len(set(tested) - set(top)),
            "n_drifted": len(drifted), "drift_share": rounded(len(drifted) / len(tested)) if tested else 0.0,
            "drifted_features": [v["feature"] for v in drifted], "features": verdicts,
            "prediction_drift": _prediction_drift(risk, rows, base, config, wasserstein),
        }

    result.tested = True
    result.data_drift = compare(training, "training")
    result.data_drift.update(counts=counts, batch_share=rounded(batch_share),
                             calendar_features=sorted(calendar & set(tested)),
                             moved_with_calendar=[v["feature"] for v in result.data_drift["features"]
                                                  if v.get("calendar")])
    result.prediction_drift = result.data_drift["prediction_drift"]
    if recent is not None:
        result.change = compare(recent, "recent")
        result.change.update(baseline_windows=list(inp.recent_labels), baseline_rows=recent.n)
    status, reasons = _drift_status(result.data_drift, result.change, config)
    status, reasons = _merge_performance_status(status, reasons, performance, config)
    result.status, result.reasons = _estimate_status(status, reasons, estimate)
    return result


def _versions(rows: pl.DataFrame) -> dict[str, int]:
    if "model_version" not in rows.columns or rows.height == 0:
        return {}
    counts = rows["model_version"].cast(pl.String).value_counts(sort=True)
    return {str(k): int(c) for k, c in zip(counts["model_version"], counts["count"], strict=True)}


def _sources(rows: pl.DataFrame) -> dict[str, float]:
    """Share of the window's rows per source (batch, api, ...)."""
    if "source" not in rows.columns or rows.height == 0:
        return {"batch": 1.0} if rows.height else {}
    return shares(rows["source"].cast(pl.String).fill_null("unknown"))


def _prediction_drift(risk: np.ndarray, rows: pl.DataFrame, baseline: SiteBaseline, config: MonitorConfig,
                      wasserstein: Callable[[np.ndarray, np.ndarray], float]) -> dict[str, Any] | None:
    """The risk distribution vs the baseline's: the drift score, KS p-value, tier shares."""
    if baseline.risk.size < config.min_feature_rows:
        return None
    cur = np.sort(risk)
    w, p = distance_and_p(wasserstein, baseline.risk, cur)
    drifted = bool(w >= config.prediction_drift_threshold and p < config.significance)
    return {
        "method": config.stattest, "threshold": config.prediction_drift_threshold, "wasserstein": rounded(w),
        "ks_p": p_value(p), "drifted": drifted, "mean_risk": rounded(rows["risk"].mean()),
        "reference_mean_risk": rounded(baseline.risk.mean()), "median_risk": rounded(rows["risk"].median()),
        "reference_median_risk": rounded(np.median(baseline.risk)),
        "tiers": shares(rows["tier"]) if "tier" in rows.columns else {}, "reference_tiers": baseline.tiers,
    }


def _describe(v: dict) -> str:
    parts = []
    if "distribution" in v["kinds"]:
        parts.append(f"distribution shifted by {v['wasserstein']:.2f} SDs (normed Wasserstein)")
    if "out_of_range" in v["kinds"]:
        lo, hi = v["reference_range"]
        parts.append(f"{100 * v['out_of_range_share']:.1f}% of values outside [{_fmt(lo)}, {_fmt(hi)}] "
                     f"(baseline {100 * v['reference_out_of_range_share']:.1f}%)")
    if "missingness" in v["kinds"]:
        parts.append(f"missing {100 * v['missing_share']:.0f}% vs {100 * v['reference_missing_share']:.0f}%")
    if v.get("median") is not None and v.get("reference_median") is not None:
        parts.append(f"median {_fmt(v['median'])} vs {_fmt(v['reference_median'])}")
    text = f"{v['feature']} [{v['display']}]: " + "; ".join(parts)
    return text + (f"; {v['hint']}" if v.get("hint") else "")


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _section_status(section: dict, config: MonitorConfig, label: str, counts: str) -> tuple[str, list[str], list[dict]]:
    """Status, reasons and the findings that count, of one comparison (vs training or vs recent windows)."""
    drifted = [v for v in section["features"] if v["drifted"]]
    if counts != "all":  # scores at visits differ from the training schedule by design: only unit changes count
        hinted = [v for v in drifted if v.get("hint")]
        if not hinted:
            return "ok", [], []
        return "alert", [f"{label}: values in another unit in " + ", ".join(v["feature"] for v in hinted[:12])], hinted
    severe = [v for v in drifted if v["severe"]]
    share, pd_ = section["drift_share"], section["prediction_drift"]
    status, reasons = "ok", []
    names = ", ".join(v["feature"] for v in drifted[:12]) + (" ..." if len(drifted) > 12 else "")
    for level, limit in (("alert", config.drift_share_alert), ("warning", config.drift_share_warning)):
        if share >= limit:
            status = level
            reasons.append(f"{label}: {len(drifted)} of {section['n_tested']} tested features drifted "
                           f"(share {share:.2f} >= {level} {limit}): {names}")
            break
    if severe:
        status = "alert"
        reasons.append(f"{label}: severe drift in " + ", ".join(v["feature"] for v in severe[:12]))
    if pd_ and pd_["drifted"]:
        status = worst_status(status, "alert" if config.prediction_drift_alert else "warning")
        reasons.append(f"{label}: prediction drift, risk distribution shifted by {pd_['wasserstein']:.2f} SDs; "
                       f"mean risk {pd_['mean_risk']:.3f} vs {pd_['reference_mean_risk']:.3f}")
    return status, reasons, (drifted if status != "ok" else [])


def _drift_status(dd: dict, ch: dict | None, config: MonitorConfig) -> tuple[str, list[str]]:
    """The worse of the two comparisons (vs training `dd`, vs recent windows `ch`), reasons first, then the
    features that made them."""
    status, reasons, findings = _section_status(dd, config, "vs training", dd.get("counts", "all"))
    summary = [f"vs training: {dd['n_drifted']} of {dd['n_tested']} tested features drifted"
               + ("" if dd.get("counts", "all") == "all" else " (scores at visits: only unit changes count)")]
    moved = dd.get("moved_with_calendar") or []
    if moved:  # say what the clock moved, so that "ok" a year after training is not read as "nothing moved"
        summary[0] += (f", {len(moved)} moved as the calendar moves them (reported, not counted): "
                       + ", ".join(moved[:4]) + (" ..." if len(moved) > 4 else ""))
    if ch is None and config.recent_windows:
        summary.append(f"no recent baseline (needs {config.recent_min_windows} earlier windows, "
                       f"{2 * config.min_window_rows} rows)")
    else:
        label = f"vs the previous {len(ch['baseline_windows'])} windows"
        s2, r2, f2 = _section_status(ch, config, label, "all")
        status, reasons, findings = worst_status(status, s2), reasons + r2, findings + f2
        summary.append(f"{label}: {ch['n_drifted']} changed")
    if status == "ok":
        return status, [f"ok: {'; '.join(summary)}"]
    seen, details = set(), []
    for v in sorted(findings, key=lambda v: (not v["severe"], v["importance_rank"])):
        if v["feature"] not in seen:
            seen.add(v["feature"])
            details.append(_describe(v))
    return status, reasons + details[:15]


def _labelled(inp: WindowInput) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows with a join key, those of them whose outcome arrived: join_key, risk, outcome)."""
    keyed = inp.rows.filter(pl.col("join_key").is_not_null()) if "join_key" in inp.rows.columns else inp.rows.head(0)
    if inp.outcomes is None or inp.outcomes.height == 0 or keyed.height == 0:
        return keyed, pl.DataFrame(schema={"join_key": pl.String, "risk": pl.Float64, "outcome": pl.Boolean})
    joined = keyed.select("join_key", "risk").join(inp.outcomes.select("join_key", "outcome"), on="join_key")
    return keyed, joined


def window_performance(inp: WindowInput, baseline: SiteBaseline, config: MonitorConfig) -> dict[str, Any]:
    keyed, joined = _labelled(inp)
    out: dict[str, Any] = {"n_scored_with_key": keyed.height, "n_outcomes": 0, "reference": baseline.performance}
    if joined.height == 0:
        out["status"] = "pending"
        return out
    out["n_outcomes"] = joined.height
    metrics = realized_performance(joined["outcome"].to_numpy(), joined["risk"].to_numpy(), config)
    if metrics is None:
        out["status"] = "pending"
        out["positives"] = int(joined["outcome"].sum()) if joined.height else 0
        return out
    out.update(metrics)
    out["status"] = "evaluated"
    return out


def window_estimate(inp: WindowInput, reference: Reference, performance: dict[str, Any],
                    config: MonitorConfig) -> PerformanceEstimate | None:
    """The label-free estimate of the window (all its rows), the realized figures beside it, the floor's verdict."""
    if inp.rows.height < config.estimate_min_rows:
        return None
    risk = inp.rows["risk"].cast(pl.Float64).to_numpy()
    est = estimate_performance(risk, reference.meta.get("tiers") or {}, draws=config.estimate_draws,
                               seed=seed_of(config.seed, "estimate", inp.task, inp.site, inp.window.label))
    _, joined = _labelled(inp)
    if joined.height:
        est = with_realized(est, joined["outcome"].cast(pl.Float64).to_numpy(), joined["risk"].to_numpy(),
                            performance.get("auroc"))
    return judged_against_floor(est, config.estimated_auroc_floor)


def _estimate_status(status: str, reasons: list[str], est: PerformanceEstimate | None) -> tuple[str, list[str]]:
    if est is None or est.below_floor is None:
        return status, reasons
    spread = est.auroc_spread
    text = (f"estimated AUROC without labels {est.auroc:.3f} (95% of chance outcomes {spread.low:.3f}-"
            f"{spread.high:.3f}) is below the floor {est.floor:.3f} ({est.n} rows)")
    if status == "ok" and reasons and reasons[0].startswith("ok:"):
        reasons = reasons[1:]
    return worst_status(status, est.below_floor), [text, *reasons]


def _performance_findings(perf: dict, config: MonitorConfig) -> list[tuple[str, str]]:
    """(level, reason) for each performance figure past its threshold AND beyond chance."""
    found: list[tuple[str, str]] = []
    sig = config.performance_significance
    ref = perf.get("reference") or {}
    if ref.get("auroc") is not None:
        drop = ref["auroc"] - perf["auroc"]
        se = math.hypot(perf.get("auroc_se") or 0.0, ref.get("auroc_se") or 0.0)
        p = normal_sf(drop / se) if se > 0 else (0.0 if drop > 0 else 1.0)
        text = (f"realized AUROC {perf['auroc']:.3f} is {drop:.3f} below the reference {ref['auroc']:.3f} "
                f"(p={p:.2g}, {perf['n']} outcomes)")
        if drop >= config.auroc_drop_alert and p < sig:
            found.append(("alert", text))
        elif drop >= config.auroc_drop_warning and p < sig:
            found.append(("warning", text))
    null_p = perf.get("ece_null_p")
    if null_p is not None and null_p < sig:
        text = f"calibration: ECE {perf['ece']:.3f} (p={null_p:.2g} if calibrated)"
        if perf["ece"] >= config.ece_alert:
            found.append(("alert", text))
        elif perf["ece"] >= config.ece_warning:
            found.append(("warning", text))
    lo, hi = config.calibration_slope_range
    slope, se = perf.get("calibration_slope"), perf.get("calibration_slope_se")
    if slope is not None and se and not lo <= slope <= hi:
        bound = lo if slope < lo else hi
        p = normal_sf(abs(slope - bound) / se)
        if p < sig:
            found.append(("warning", f"calibration slope {slope:.2f} outside [{lo}, {hi}] (p={p:.2g})"))
    return found


def _merge_performance_status(status: str, reasons: list[str], perf: dict,
                              config: MonitorConfig) -> tuple[str, list[str]]:
    if perf.get("status") != "evaluated":
        return status, reasons
    found = _performance_findings(perf, config)
    if not found:
        return status, [*reasons, f"performance ok on {perf['n']} outcomes: AUROC {perf['auroc']:.3f}, "
                                  f"ECE {perf['ece']:.3f}, calibration slope {perf['calibration_slope']:.2f}"]
    for level, _text in found:
        status = worst_status(status, level)
    if status != "ok" and reasons and reasons[0].startswith("ok:"):
        reasons = reasons[1:]
    return status, [*(t for _, t in found), *reasons]


def worst_status(a: str, b: str) -> str:
    return a if STATUS_RANK[a] >= STATUS_RANK[b] else b


_UNIT_FACTORS: list[tuple[str, str, str, float]] | None = None


def unit_hint(feature: str, verdict: dict, reference: Reference) -> str | None:
    """'values look like mmol/L, not mg/dL' when the moved values sit at a known conversion factor.

    The ratio is taken on the values outside the reference range when those
    drifted (a part of the values changed unit), else on the medians.
    """
    if not verdict["drifted"] or not verdict.get("reference_median"):
        return None
    moved = verdict.get("out_of_range_median") if "out_of_range" in verdict["kinds"] else verdict.get("median")
    if moved is None or moved <= 0 or verdict["reference_median"] <= 0:
        return None
    ratio = moved / verdict["reference_median"]
    info = reference.infos.get(feature) or {}
    text = (info.get("display") or feature).lower()
    for keyword, canonical, sent, factor in _unit_factors():
        if keyword not in text or (info.get("unit") and info["unit"] != canonical):
            continue
        if abs(math.log(ratio * factor)) < math.log(1.25):
            return (f"values look like {sent} instead of {canonical} "
                    f"(about 1/{factor:g} of the reference): a unit change?")
    return None


def _unit_factors() -> list[tuple[str, str, str, float]]:
    """(keyword, canonical unit, other unit, factor) of every pure-scale unit conversion in data/codes.py."""
    global _UNIT_FACTORS
    if _UNIT_FACTORS is None:
        from chronorisk.data.codes import MEASUREMENTS

        _UNIT_FACTORS = [(m.display.split()[-1].lower(), m.unit, unit, factor)
                         for m in MEASUREMENTS.values() for unit, factor in scale_conversions(m)]
    return _UNIT_FACTORS
