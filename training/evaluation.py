"""Grouped evaluation: every metric overall, per site, per sex and per age band, with bootstrap 95% CIs.

Input: one row per (subject, prediction time) with the outcome `y`, the
model's calibrated `risk`, `site`, `sex`, `age` (years at the prediction
time), `prediction_time`, optionally `subject_id` (then the bootstrap
resamples patients, not rows, because a patient's rows are not independent)
and, on generated data, `true_risk` (the generator's ground truth; then
`oracle_auroc`, the AUROC of the true risk on the same rows, and the ratio
`auroc_ratio` = model / oracle, with a paired bootstrap interval).

Output: a list of JSON-safe records (NaN becomes None), one per group, each
with the keys the issue fixes (`task`, `site` (or `all`), `n`, `auroc`,
`oracle_auroc`, `mode`, `calibration_slope`, `ece`) plus `group` (all /
site / sex / age_band), `sex`, `age_band`, `validation`, every metric of
`chronorisk.training.metrics.standard_metrics` and its `_lo` / `_hi` bounds.
Groups with fewer than `min_group_size` rows, or fewer than `min_group_cases`
cases or non-cases, are left out (too few to say anything; the count is
logged). The overall row of several sites adds the within-site AUROC and the
AUROC of site prevalence alone. Intervals are bias-corrected bootstrap
percentiles that always contain their point estimate (`metrics.bootstrap_intervals`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from chronorisk.errors import InputError
from chronorisk.training import metrics

log = logging.getLogger(__name__)

AGE_BANDS: tuple[tuple[float, float, str], ...] = (
    (18, 40, "18-39"),
    (40, 55, "40-54"),
    (55, 70, "55-69"),
    (70, math.inf, "70+"),
)
UNDER_AGE_BAND = "<18"
MODES = ("ideal", "realistic")
GROUPS = ("all", "site", "sex", "age_band")


def age_band_expr(age: str | pl.Expr = "age") -> pl.Expr:
    """Polars expression `age_band`: the band of an age in years (18-39, 40-54, 55-69, 70+; <18 below)."""
    col = pl.col(age) if isinstance(age, str) else age
    expr = pl.when(col < AGE_BANDS[0][0]).then(pl.lit(UNDER_AGE_BAND))
    for lo, hi, label in AGE_BANDS:
        expr = expr.when((col >= lo) & (col < hi)).then(pl.lit(label))
    return expr.otherwise(pl.lit(None, dtype=pl.String)).alias("age_band")


def age_band(age: object) -> np.ndarray:
    """The age band label of each age (numpy), None for a missing age."""
    a = np.asarray(age, dtype=float)
    out = np.full(a.shape, None, dtype=object)
    out[a < AGE_BANDS[0][0]] = UNDER_AGE_BAND
    for lo, hi, label in AGE_BANDS:
        out[(a >= lo) & (a < hi)] = label
    return out


def evaluate(
    frame: pl.DataFrame,
    *,
    task: str,
    threshold: float,
    mode: str | None = None,
    validation: str = "holdout",
    n_boot: int = 200,
    seed: int = 0,
    min_group_size: int = 30,
    min_group_cases: int = 10,
    groups: Sequence[str] = GROUPS,
    extra: Mapping[str, object] | None = None,
) -> list[dict]:
    """One record per group (overall, each site, each sex, each age band) of `frame`.

    A group is reported only with at least `min_group_size` rows and `min_group_cases` cases AND
    non-cases (an AUROC from one case says nothing). With several sites the overall row also has
    `auroc_within_site` (pairs of the same site only) and `auroc_site_prevalence` (the site's
    prevalence as the only score): site prevalence explains part of a pooled AUROC.
    """
    if mode is not None and mode not in MODES:
        raise InputError("mode", f"{mode!r} is not one of {', '.join(MODES)} (or none for external data)")
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise InputError("groups", f"{bad} not among {', '.join(GROUPS)}")
    df = _normalize(frame)
    records = []
    for group, key, part in _group_frames(df, groups):
        if part.height < min_group_size:
            log.info("%s: %s=%s skipped (%d rows < %d)", task, group, key, part.height, min_group_size)
            continue
        cases = int(part["y"].sum())
        if min(cases, part.height - cases) < min_group_cases:
            log.info("%s: %s=%s skipped (%d cases, %d non-cases; %d of each needed)", task, group, key,
                     cases, part.height - cases, min_group_cases)
            continue
        row = {
            "task": task,
            "mode": mode,
            "validation": validation,
            "group": group,
            "site": key if group == "site" else "all",
            "sex": key if group == "sex" else "all",
            "age_band": key if group == "age_band" else "all",
            **_group_metrics(part, threshold, n_boot, seed),
            **(_site_parts(part) if group == "all" else {}),
            **dict(extra or {}),
        }
        records.append(json_safe(row))
    return records


def _normalize(frame: pl.DataFrame) -> pl.DataFrame:
    if not isinstance(frame, pl.DataFrame):
        raise InputError("evaluation frame", f"expected a polars DataFrame, got {type(frame).__name__}")
    df = frame
    if "y" not in df.columns and "boolean_value" in df.columns:
        df = df.rename({"boolean_value": "y"})
    required = ("y", "risk", "site", "sex", "age")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError("evaluation frame", f"missing column(s) {', '.join(missing)}; needs {', '.join(required)}")
    df = df.with_columns(
        pl.col("y").cast(pl.Float64),
        pl.col("risk").cast(pl.Float64),
        pl.col("site").cast(pl.String),
        pl.col("sex").cast(pl.String),
        age_band_expr(pl.col("age").cast(pl.Float64)),
    )
    nulls = {c: df[c].null_count() for c in ("y", "risk")}
    if any(nulls.values()):
        raise InputError("evaluation frame", f"null outcomes or risks: {nulls}")
    return df


def _group_frames(df: pl.DataFrame, groups: Sequence[str]):
    if "all" in groups:
        yield "all", "all", df
    for group in ("site", "sex", "age_band"):
        if group not in groups:
            continue
        for key in sorted(k for k in df[group].unique().to_list() if k is not None):
            yield group, key, df.filter(pl.col(group) == key)


def _group_metrics(part: pl.DataFrame, threshold: float, n_boot: int, seed: int) -> dict:
    y = part["y"].to_numpy()
    p = part["risk"].to_numpy()
    clusters = part["subject_id"].to_numpy() if "subject_id" in part.columns else None
    fns = metrics.standard_metrics(threshold)
    row: dict = {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_subjects": int(np.unique(clusters).size) if clusters is not None else None,
        "prevalence": float(y.mean()),
        "mean_risk": float(p.mean()),
        "threshold": float(threshold),
        "net_benefit_treat_all": float(metrics.net_benefit_treat_all(y, threshold)),
    }
    if "prediction_time" in part.columns:
        row["first_prediction_time"] = _iso(part["prediction_time"].min())
        row["last_prediction_time"] = _iso(part["prediction_time"].max())
    for name, fn in fns.items():
        row[name] = float(fn(y, p))
    truth = _truth(part)
    row["oracle_auroc"] = None
    row["auroc_ratio"] = None
    if truth is not None:
        t, complete = truth
        has = ~np.isnan(t)
        row["n_oracle"] = int(has.sum())
        if has.any():
            row["oracle_auroc"] = float(metrics.auroc(y[has], t[has]))
            row["oracle_calibration_slope"] = float(metrics.calibration_slope(y[has], t[has]))
            model_on_same = float(metrics.auroc(y[has], p[has]))
            row["auroc_ratio"] = _div(model_on_same, row["oracle_auroc"])
        if complete:  # paired intervals: the same resamples score the model and the oracle
            fns = {
                **fns,
                "oracle_auroc": lambda yy, _pp, w=None: metrics.auroc(yy, t, w),
                "auroc_ratio": lambda yy, pp, w=None: np.asarray(metrics.auroc(yy, pp, w))
                / np.asarray(metrics.auroc(yy, t, w)),
            }
    cis = metrics.bootstrap_intervals(fns, y, p, n_boot=n_boot, seed=seed, clusters=clusters)
    for name, (lo, hi) in cis.items():
        row[f"{name}_lo"] = lo
        row[f"{name}_hi"] = hi
    return row


def _site_parts(part: pl.DataFrame) -> dict:
    """Within-site AUROC and the AUROC of site prevalence alone, when the rows come from several sites."""
    site = part["site"].to_numpy()
    if np.unique(site).size < 2:
        return {}
    y, p = part["y"].to_numpy(), part["risk"].to_numpy()
    return {
        "auroc_within_site": metrics.within_group_auroc(y, p, site),
        "auroc_site_prevalence": metrics.group_prevalence_auroc(y, site),
    }


def _truth(part: pl.DataFrame) -> tuple[np.ndarray, bool] | None:
    if "true_risk" not in part.columns:
        return None
    t = part["true_risk"].cast(pl.Float64).to_numpy()
    return t, bool(not np.isnan(t).any())


def _div(a: float, b: float | None) -> float | None:
    if b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def _iso(value: object) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else (None if value is None else str(value))


def json_safe(record: Mapping) -> dict:
    """NaN / inf -> None, numpy scalars -> Python numbers (JSON has no NaN)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def headline_table(records: Sequence[Mapping], groups: Sequence[str] = ("all", "site")) -> str:
    """A plain-text table of the headline figures (task, site, n, AUROC [CI], oracle, ratio, slope, ECE)."""
    header = ("task", "mode", "validation", "site", "n", "AUROC [95% CI]", "oracle", "ratio", "slope", "ECE")
    rows = [header]
    for r in records:
        if r.get("group") not in groups:
            continue
        rows.append(
            (
                str(r.get("task")),
                str(r.get("mode") or "-"),
                str(r.get("validation") or "-"),
                str(r.get("site")),
                str(r.get("n")),
                f"{_f(r.get('auroc'))} [{_f(r.get('auroc_lo'))}, {_f(r.get('auroc_hi'))}]",
                _f(r.get("oracle_auroc")),
                _f(r.get("auroc_ratio")),
                _f(r.get("calibration_slope"), 2),
                _f(r.get("ece")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows)


def _f(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{float(value):.{digits}f}"
