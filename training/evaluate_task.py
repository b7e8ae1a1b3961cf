"""Everything `chronorisk evaluate` computes for one task, as plain functions.

- held-out evaluation of the trained bundle: overall, per site, sex and age
  band, bootstrap 95% intervals (patients resampled);
- temporal validation: a model refitted on rows whose outcome was known
  before `evaluate.temporal_split` (prediction time + horizon <= split date),
  tested on held-out patients at or after it;
- leave-one-site-out: for each site, a model refitted on the other sites'
  train / tuning splits, tested on every row of the left-out site;
- on generated data, the oracle: AUROC of the generator's true risk on the
  same rows (`<work>/truth/<task>.parquet`, read here and never by training),
  with `mode` ideal or realistic from the generator's metadata.

Refitted models use the same parameters and feature spec as the bundle;
they are scaffolding for the estimate and are not saved. They are calibrated
on their tuning rows (`model.calibration_rows: tuning`), not cross-fitted:
five more boosters per refit would triple the cost of `evaluate`, and the
calibration error of a model moved to another site or a later period is
dominated by that shift, not by the calibrator's sampling error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from chronorisk.training.train import HELD_OUT, TRAIN, TUNING, TaskData, fit_model

if TYPE_CHECKING:
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.models.config import ModelConfig
    from chronorisk.training.config import EvaluateConfig

log = logging.getLogger(__name__)

SHAP_ROWS = 5000  # rows explained for the SHAP summary (a seeded sample of the held-out rows)
MIN_REFIT_ROWS = 50


@dataclass
class TaskEvaluation:
    task: str
    mode: str | None
    holdout: list[dict]
    temporal: list[dict] = field(default_factory=list)
    leave_one_site_out: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    importance: dict[str, float] = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)  # the other model kind on the same rows (see `baseline`)
    frame: pl.DataFrame | None = None  # held-out evaluation rows: y, risk, site, true_risk (no identifiers kept)

    @property
    def records(self) -> list[dict]:
        return [*self.holdout, *self.temporal, *self.leave_one_site_out]

    def overall(self) -> dict | None:
        return next((r for r in self.holdout if r.get("group") == "all"), None)


# ---- ground truth ----------------------------------------------------------------------------
def read_truth(truth_dir: Path, task: str) -> pl.DataFrame | None:
    """The generator's true risk for `task` (subject_id, prediction_time, true_risk), or None."""
    path = Path(truth_dir) / f"{task}.parquet"
    if not path.is_file():
        return None
    return pl.read_parquet(path, columns=["subject_id", "prediction_time", "true_risk"]).with_columns(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    )


def generator_mode(truth_dir: Path, meds_root: Path | None = None) -> str | None:
    """'ideal' or 'realistic' from the generator's metadata (truth/generator.json, else a site's dataset.json)."""
    candidates = [Path(truth_dir) / "generator.json"]
    if meds_root is not None:
        candidates += sorted(Path(meds_root).glob("sites/*/metadata/dataset.json"))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            gen = json.loads(path.read_text()).get("generator")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(gen, dict) and "ideal" in gen:
            return "ideal" if gen["ideal"] else "realistic"
    return None


def attach_truth(
    frame: pl.DataFrame, truth: pl.DataFrame | None, min_match: float = 0.99
) -> tuple[pl.DataFrame, str | None]:
    """`frame` with `true_risk` joined on (subject_id, prediction_time), when nearly every row matches.

    Rows of another dataset (ingested FHIR has pseudonymized ids) would match
    by accident or not at all; then no oracle is reported, with a note why.
    """
    if truth is None or frame.height == 0:
        return frame, None
    joined = frame.join(truth, on=["subject_id", "prediction_time"], how="left")
    share = 1.0 - joined["true_risk"].null_count() / joined.height
    if share < min_match:
        return frame, (f"no oracle: only {share:.1%} of the evaluated rows have a generator truth row "
                       "(not the generator's own MEDS?)")
    return joined, None


# ---- evaluation frame ------------------------------------------------------------------------
def evaluation_frame(rows: pl.DataFrame, risk: np.ndarray) -> pl.DataFrame:
    """What `evaluation.evaluate` needs: y, risk, site, sex, age, prediction_time, subject_id."""
    sex = (
        pl.when(pl.col("demo_sex_female") == 1).then(pl.lit("F"))
        .when(pl.col("demo_sex_female") == 0).then(pl.lit("M"))
        .otherwise(pl.lit("unknown"))
        if "demo_sex_female" in rows.columns else pl.lit("unknown")
    )
    age = pl.col("demo_age_years") if "demo_age_years" in rows.columns else pl.lit(None, dtype=pl.Float64)
    return rows.select(
        "subject_id",
        "prediction_time",
        pl.col("site").cast(pl.String),
        pl.col("boolean_value").cast(pl.Float64).alias("y"),
        pl.Series("risk", np.asarray(risk, dtype=float)),
        sex.alias("sex"),
        age.cast(pl.Float64).alias("age"),
    )


def _evaluate(frame: pl.DataFrame, task: str, threshold: float, mode: str | None, config: EvaluateConfig,
              validation: str, groups: tuple[str, ...]) -> list[dict]:
    from chronorisk.training.evaluation import evaluate

    return evaluate(
        frame, task=task, threshold=threshold, mode=mode, validation=validation, n_boot=config.bootstrap,
        seed=config.seed, min_group_size=config.min_group_size, min_group_cases=config.min_group_cases,
        groups=groups,
    )


def _both_outcomes(frame: pl.DataFrame, column: str = "boolean_value") -> bool:
    n_pos = int(frame[column].sum()) if frame.height else 0
    return frame.height >= MIN_REFIT_ROWS and 0 < n_pos < frame.height


# ---- the three validations -------------------------------------------------------------------
def holdout(data: TaskData, bundle: ModelBundle, config: EvaluateConfig, truth: pl.DataFrame | None,
            mode: str | None) -> TaskEvaluation:
    """The bundle on the held-out split: every group, plus the SHAP summary."""
    task = data.task.name
    rows = data.split(HELD_OUT)
    result = TaskEvaluation(task=task, mode=mode, holdout=[])
    if rows.height == 0:
        result.notes.append("the held-out split is empty: nothing to evaluate")
        return result
    frame = evaluation_frame(rows, bundle.predict_risk(rows))
    frame, note = attach_truth(frame, truth)
    if note:
        result.notes.append(note)
    if "true_risk" not in frame.columns:
        result.mode = mode = None
    groups = ("all", "site", "sex", "age_band")
    result.holdout = _evaluate(frame, task, bundle.tiers.high, mode, config, "holdout", groups)
    overall = result.overall()
    if overall and overall.get("auroc_within_site") is not None:
        result.notes.append(
            f"Pooled AUROC {overall['auroc']:.3f} over sites; within sites (case/non-case pairs of the same site "
            f"only) {overall['auroc_within_site']:.3f}; site prevalence alone gives "
            f"{overall['auroc_site_prevalence']:.3f}, so site membership explains part of the pooled figure."
        )
    result.frame = frame.drop("subject_id")
    result.importance = shap_summary(bundle, rows, seed=config.seed)
    return result


def shap_summary(bundle: ModelBundle, rows: pl.DataFrame, seed: int = 0) -> dict[str, float]:
    """Mean |SHAP contribution| per feature (display names) over a seeded sample of `rows`."""
    from chronorisk.training.report import shap_importance

    sample = rows if rows.height <= SHAP_ROWS else rows.sample(SHAP_ROWS, seed=seed)
    contributions = bundle.contributions(sample)
    return shap_importance(contributions, display_names(bundle))


def display_names(bundle: ModelBundle) -> list[str]:
    """Each feature's display name (with its unit), or its column name where displays would collide."""
    infos = bundle.spec.features
    shown = [infos[n].display for n in bundle.feature_names]
    counts: dict[str, int] = {}
    for s in shown:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else n for s, n in zip(shown, bundle.feature_names, strict=True)]


def temporal(data: TaskData, bundle: ModelBundle, model_config: ModelConfig, config: EvaluateConfig,
             truth: pl.DataFrame | None, mode: str | None) -> tuple[list[dict], str | None]:
    """Refit on outcomes known before the split date; test on held-out patients from the date on."""
    if config.temporal_split is None:
        return [], None
    if data.task.horizon_days is None:
        return [], "temporal validation skipped: the task's labels are supplied without horizon_days"
    split = datetime(config.temporal_split.year, config.temporal_split.month, config.temporal_split.day)
    known = pl.col("prediction_time") + pl.duration(days=data.task.horizon_days) <= split
    train = data.frame.filter((pl.col("split") == TRAIN) & known)
    tuning = data.frame.filter((pl.col("split") == TUNING) & known)
    test = data.frame.filter((pl.col("split") == HELD_OUT) & (pl.col("prediction_time") >= split))
    why = _refit_problem({"train": train, "tuning": tuning, "test": test})
    if why:
        return [], f"temporal validation at {config.temporal_split} skipped: {why}"
    model = fit_model(train, tuning, data.feature_names, _refit_config(model_config, bundle))
    frame, _ = attach_truth(evaluation_frame(test, model.predict_risk(test.select(data.feature_names))), truth)
    records = _evaluate(frame, data.task.name, bundle.tiers.high, mode if "true_risk" in frame.columns else None,
                        config, "temporal", ("all", "site"))
    last_train = train["prediction_time"].max()
    note = (f"temporal validation: refitted on {train.height:,} rows with prediction times up to "
            f"{_day(last_train)} (outcomes known by {config.temporal_split}), tested on {test.height:,} held-out "
            f"rows from {config.temporal_split}")
    return records, note


def leave_one_site_out(data: TaskData, bundle: ModelBundle, model_config: ModelConfig, config: EvaluateConfig,
                       truth: pl.DataFrame | None, mode: str | None) -> tuple[list[dict], list[str]]:
    """For each site: refit on the other sites, test on all of its rows."""
    if not config.leave_one_site_out:
        return [], []
    sites = sorted(data.frame["site"].unique().to_list())
    if len(sites) < 2:
        return [], ["leave-one-site-out skipped: one site only"]
    records: list[dict] = []
    notes: list[str] = []
    for site in sites:
        others = data.frame.filter(pl.col("site") != site)
        train, tuning = others.filter(pl.col("split") == TRAIN), others.filter(pl.col("split") == TUNING)
        test = data.frame.filter(pl.col("site") == site)
        why = _refit_problem({"train": train, "tuning": tuning, "test": test})
        if why:
            notes.append(f"leave-one-site-out for {site} skipped: {why}")
            continue
        model = fit_model(train, tuning, data.feature_names, _refit_config(model_config, bundle))
        risk = model.predict_risk(test.select(data.feature_names))
        frame, _ = attach_truth(evaluation_frame(test, risk), truth)
        records += _evaluate(frame, data.task.name, bundle.tiers.high,
                             mode if "true_risk" in frame.columns else None, config, "leave_one_site_out", ("site",))
    return records, notes


def _refit_config(model_config: ModelConfig, bundle: ModelBundle) -> ModelConfig:
    """The bundle's model kind and parameters, calibrated on the tuning rows (see the module docstring)."""
    return model_config.model_copy(update={"calibration_rows": "tuning", "kind": bundle.kind})


def _refit_problem(parts: dict[str, pl.DataFrame]) -> str | None:
    for name, part in parts.items():
        if not _both_outcomes(part):
            n_pos = int(part["boolean_value"].sum()) if part.height else 0
            return f"{name} rows: {part.height} with {n_pos} outcomes (need {MIN_REFIT_ROWS}+ rows, both outcomes)"
    return None


def _day(value: object) -> str:
    if isinstance(value, datetime):
        return value.date().isoformat()
    return str(value)


def baseline(data: TaskData, bundle: ModelBundle, model_config: ModelConfig, config: EvaluateConfig) -> dict:
    """The other model kind, refitted on the bundle's train / tuning rows, beside the bundle on the held-out rows.

    A LightGBM bundle is compared with the penalized logistic regression (median imputation plus missing
    indicators, standardized; `models/logistic.py`), a logistic bundle with LightGBM. The AUROC difference
    (bundle minus baseline) has a paired bootstrap interval: the same resampled patients score both.
    """
    from chronorisk.training import metrics

    test = data.split(HELD_OUT)
    train, tuning = data.split(TRAIN), data.split(TUNING)
    why = _refit_problem({"train": train, "tuning": tuning, "held-out": test})
    if why:
        return {"note": f"baseline skipped: {why}"}
    other = "logistic" if bundle.kind == "lightgbm" else "lightgbm"
    config_other = model_config.model_copy(update={"calibration_rows": "tuning", "kind": other})
    model = fit_model(train, tuning, data.feature_names, config_other)
    y = test["boolean_value"].to_numpy().astype(float)
    p = bundle.predict_risk(test)
    q = model.predict_risk(test.select(data.feature_names))
    fns = {
        "model_auroc": lambda yy, pp, w=None: metrics.auroc(yy, pp, w),
        "baseline_auroc": lambda yy, _pp, w=None: metrics.auroc(yy, q, w),
        "difference": lambda yy, pp, w=None: np.asarray(metrics.auroc(yy, pp, w)) - np.asarray(metrics.auroc(yy, q, w)),
    }
    cis = metrics.bootstrap_intervals(fns, y, p, n_boot=max(config.bootstrap, 1) if config.bootstrap else 0,
                                      seed=config.seed, clusters=test["subject_id"].to_numpy())
    out: dict = {"model_kind": bundle.kind, "baseline_kind": other, "n": int(y.size), "n_positive": int(y.sum()),
                 "baseline_ece": float(metrics.ece(y, q)), "model_ece": float(metrics.ece(y, p))}
    for name, fn in fns.items():
        out[name] = float(fn(y, p))
        out[f"{name}_lo"], out[f"{name}_hi"] = cis[name]
    lo, hi = out["difference_lo"], out["difference_hi"]
    out["better"] = (bundle.kind if lo > 0 else other if hi < 0 else "neither (interval includes 0)") \
        if np.isfinite(lo) and np.isfinite(hi) else (bundle.kind if out["difference"] > 0 else other)
    return out


def baseline_sentence(b: dict) -> str:
    """'Baseline: logistic regression AUROC 0.741 vs lightgbm 0.763 on the same held-out rows; ...'."""
    if not b or "difference" not in b:
        return str((b or {}).get("note", "no baseline"))
    names = {"logistic": "logistic regression", "lightgbm": "LightGBM"}
    ci = (f" (95% paired bootstrap {b['difference_lo']:+.3f} to {b['difference_hi']:+.3f})"
          if np.isfinite(b.get("difference_lo", float("nan"))) else "")
    return (f"Baseline: {names[b['baseline_kind']]} AUROC {b['baseline_auroc']:.3f} beside this model's "
            f"{names[b['model_kind']]} {b['model_auroc']:.3f} on the same {b['n']:,} held-out rows; difference "
            f"{b['difference']:+.3f}{ci}; better: {names.get(b['better'], b['better'])}.")


def evaluate_all(data: TaskData, bundle: ModelBundle, model_config: ModelConfig, config: EvaluateConfig, *,
                 truth_dir: Path | None) -> TaskEvaluation:
    """Held-out (with the baseline beside it), temporal and leave-one-site-out evaluation of one task."""
    truth = read_truth(truth_dir, data.task.name) if truth_dir is not None else None
    mode = generator_mode(truth_dir, data.meds_root) if truth is not None else None
    result = holdout(data, bundle, config, truth, mode)
    result.baseline = baseline(data, bundle, model_config, config)
    result.notes.append(baseline_sentence(result.baseline))
    if truth is None:
        result.notes.append("no generator truth for this task: oracle AUROC not reported")
    records, note = temporal(data, bundle, model_config, config, truth, result.mode)
    result.temporal = records
    if note:
        result.notes.append(note)
    records, notes = leave_one_site_out(data, bundle, model_config, config, truth, result.mode)
    result.leave_one_site_out = records
    result.notes += notes
    return result


# ---- summaries -------------------------------------------------------------------------------
HEADLINE_KEYS = ("n", "n_positive", "auroc", "auroc_lo", "auroc_hi", "auroc_within_site", "auroc_site_prevalence",
                 "auprc", "brier", "calibration_slope",
                 "calibration_intercept", "ece", "ece_lo", "ece_hi", "oracle_auroc", "auroc_ratio",
                 "sensitivity", "ppv", "net_benefit")


def metrics_summary(result: TaskEvaluation) -> dict:
    """Small nested numbers-only dict for DVC (`<work>/metrics/<task>.json`) and MLflow."""
    def pick(r: dict) -> dict:
        return {k: r[k] for k in HEADLINE_KEYS if isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool)}

    out: dict = {}
    overall = result.overall()
    if overall:
        out["holdout"] = pick(overall)
    out["holdout_site"] = {r["site"]: pick(r) for r in result.holdout if r.get("group") == "site"}
    temporal_all = next((r for r in result.temporal if r.get("group") == "all"), None)
    if temporal_all:
        out["temporal"] = pick(temporal_all)
    if result.leave_one_site_out:
        out["leave_one_site_out"] = {r["site"]: pick(r) for r in result.leave_one_site_out}
    if "difference" in result.baseline:
        out["baseline"] = {k: v for k, v in result.baseline.items() if isinstance(v, int | float)}
    return out
