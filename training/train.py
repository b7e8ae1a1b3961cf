"""Centralized training of one task: feature table in, calibrated model bundle out.

The feature table holds one row per (subject, prediction time) with `site`,
`split` (MEDS train / tuning / held_out, by subject) and the label
`boolean_value`. The booster learns from the train split and the tuning
split stops boosting early. The calibrator (`model.calibration_rows`) is
fitted by default on cross-fitted margins of every train and tuning patient
(`RiskModel.cross_fitted_margins`): about 85% of the patients instead of the
15% of the tuning split, so its slope is estimated with a standard error
about 2.4 times smaller, and not on the rows early stopping already chose
the tree count on. (On the 20,000-patient cohort the tuning split of
`complication_1y` has about 330 outcomes: a Platt slope from it alone has a
standard error near 0.08, as large as the 0.9-1.1 target band's half-width.)
The held-out split is never touched here (`evaluate` and `promote` use it).
The generator's ground truth is never read by this module.

Two sources give the same `TaskData`:
- `load_feature_tables`: what `chronorisk features` wrote under
  `<work>/features/<task>/` (spec.json and one parquet per site);
- `compute_task_data`: MEDS data and labels from elsewhere (`--meds DIR
  --labels DIR --task NAME`), features computed on the fly by the features
  package, the spec fitted on the train split's code counts only.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from chronorisk.errors import ChronoriskError, InputError

if TYPE_CHECKING:
    from chronorisk.features.config import FeatureConfig
    from chronorisk.features.spec import FeatureSpec
    from chronorisk.features.tasks import TaskDefinition
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.models.config import ModelConfig
    from chronorisk.models.risk_model import RiskModel
    from chronorisk.training.config import TrainConfig

log = logging.getLogger(__name__)

TRAIN, TUNING, HELD_OUT = "train", "tuning", "held_out"
KEY_COLUMNS = ("subject_id", "prediction_time", "site", "split", "boolean_value")
INDEX_ORDER = ["subject_id", "prediction_time", "site", "boolean_value"]  # rows in this order: reproducible
SPEC_FILE = "spec.json"


@dataclass
class TaskData:
    """One task's rows and the spec that made their feature columns."""

    task: TaskDefinition
    spec: FeatureSpec
    frame: pl.DataFrame  # KEY_COLUMNS + spec.feature_names (+ anything else, ignored)
    source: str  # where the rows came from (for logs, MLflow and the model card)
    meds_root: Path | None = None  # the MEDS data the features were computed from, when known
    supplied_labels: dict | None = None  # `describe_labels` of label files given with --labels

    def split(self, name: str) -> pl.DataFrame:
        return self.frame.filter(pl.col("split") == name)

    def only(self, name: str) -> TaskData:
        """The same task and spec with the rows of one split."""
        return dataclasses.replace(self, frame=self.split(name))

    @property
    def feature_names(self) -> list[str]:
        return list(self.spec.feature_names)


# ---- loading ---------------------------------------------------------------------------------
def load_feature_tables(features_root: Path, task: str | TaskDefinition) -> TaskData:
    """`<features_root>/<task>/spec.json` and its per-site tables, checked against each other."""
    from chronorisk.features.spec import FeatureSpec
    from chronorisk.features.tasks import load_task

    task_def = load_task(task)
    folder = Path(features_root) / task_def.name
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise InputError(
            "--features", f"{folder} has no {SPEC_FILE}; run `chronorisk features` first (or give --meds)"
        )
    spec = FeatureSpec.load(spec_path)
    tables = sorted(folder.glob("*.parquet"))
    if not tables:
        raise InputError("--features", f"{folder} has no feature tables (<site>.parquet)")
    frame = pl.concat([pl.read_parquet(t) for t in tables], how="diagonal_relaxed")
    check_table(frame, spec, str(folder))
    frame = frame.sort(INDEX_ORDER, maintain_order=True)
    return TaskData(task=task_def, spec=spec, frame=frame, source=str(folder))


def check_table(frame: pl.DataFrame, spec: FeatureSpec, source: str) -> None:
    """Every key column and every spec feature present; splits known; labels not null."""
    missing = [c for c in (*KEY_COLUMNS, *spec.feature_names) if c not in frame.columns]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(source, f"feature table lacks {len(missing)} column(s): {shown}")
    unknown = sorted(set(frame["split"].drop_nulls().unique().to_list()) - {TRAIN, TUNING, HELD_OUT})
    if unknown or frame["split"].null_count():
        raise InputError(source, f"split must be one of train, tuning, held_out; found {unknown or 'nulls'}")
    if frame["boolean_value"].null_count():
        raise InputError(source, "boolean_value (the label) has nulls")


def read_meds(meds: Path) -> tuple[pl.LazyFrame, pl.DataFrame]:
    """Events (with `site`) and subject splits of a MEDS root: our `sites/<site>/` layout or one dataset.

    Sites and splits are found the way `chronorisk labels` / `features` find
    them (`features.sources`): a subject without a split in
    `metadata/subject_splits.parquet` gets the deterministic one of its id.
    """
    from chronorisk.data.meds_io import EVENT_SCHEMA
    from chronorisk.features.sources import find_sites

    try:
        sources = find_sites(Path(meds))
    except InputError as exc:
        raise InputError("--meds", exc.problem) from None
    events = pl.concat(
        [s.scan().select(list(EVENT_SCHEMA)).with_columns(pl.lit(s.site).alias("site")) for s in sources],
        how="vertical_relaxed",
    )
    splits = pl.concat([s.splits().select("subject_id", "split") for s in sources])
    return events, splits


def attach_splits(index: pl.DataFrame, events: pl.LazyFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """Index rows with their subject's `site` and `split` (subjects without events are dropped).

    The split is `features.build.assign_splits`'s (the one rule); a subject seen at two sites gets the
    first site by name. The rows come back sorted: nothing depends on the order of files or rows.
    """
    from chronorisk.features.build import assign_splits

    sites = events.group_by("subject_id").agg(pl.col("site").min()).collect()
    return assign_splits(index.join(sites, on="subject_id", how="inner"), splits)


def compute_task_data(
    meds: Path,
    task: str | TaskDefinition,
    config: FeatureConfig,
    *,
    labels: Path | None = None,
    spec: FeatureSpec | None = None,
    only_split: str | None = None,
) -> TaskData:
    """Feature rows for `task` from a MEDS dataset and MEDS labels (extracted when `labels` is None).

    Without `spec` the spec is fitted on the code counts of the train split
    only (the vocabulary never sees a held-out subject); with `spec` (a
    trained bundle's) nothing is fitted. `only_split` keeps the rows of one split.
    """
    from chronorisk.features.build import subject_splits
    from chronorisk.features.labels import label_files, read_labels_files
    from chronorisk.features.pipeline import code_summary, fit_spec, transform
    from chronorisk.features.pruning import FitStats, without_useless
    from chronorisk.features.tasks import load_task

    task_def = load_task(task)
    events, splits = read_meds(meds)
    files = label_files(labels, task_def.name) if labels is not None else []
    if labels is None:
        task_def.require_extractable()
    label_rows = read_labels_files(files) if labels is not None else site_labels(meds, task_def)
    if label_rows.height == 0:
        raise InputError("--labels" if labels else "--task", f"no labelled rows for task {task_def.name}")
    index = attach_splits(label_rows, events, splits)
    if index.height == 0:
        raise InputError("--labels", "no label row belongs to a subject of the MEDS data (subject_id mismatch?)")
    if only_split is not None:  # e.g. promotion compares on held-out rows only: featurize only those
        index = index.filter(pl.col("split") == only_split)
    fitted = spec is None
    if fitted:
        train_subjects = subject_splits(splits).filter(pl.col("split") == TRAIN).select("subject_id")
        summary = code_summary(events.join(train_subjects.lazy(), on="subject_id", how="semi"))
        spec = fit_spec(summary, config, task_def)
    frame = transform(spec, events.drop("site"), index.lazy()).collect().sort(INDEX_ORDER, maintain_order=True)
    if fitted:  # as `chronorisk features` does: drop what says nothing in the TRAIN rows, with the reason
        stats = FitStats(spec)
        stats.add(frame.filter(pl.col("split") == TRAIN))
        spec = without_useless(spec, stats.useless())
        frame = frame.select([c for c in frame.columns if c not in stats.names or c in spec.features])
    check_table(frame, spec, "computed features")
    return TaskData(
        task=task_def,
        spec=spec,
        frame=frame,
        source=str(meds) + (f" + labels {labels}" if labels else ""),
        meds_root=Path(meds),
        supplied_labels=describe_labels(label_rows, files) if labels is not None else None,
    )


def describe_labels(labels: pl.DataFrame, files: list[Path]) -> dict:
    """What the model card says about supplied labels: fingerprint, rows, cases, prevalence, time span."""
    from chronorisk.models.bundle import data_fingerprint

    n_pos = int(labels["boolean_value"].sum())
    times = labels["prediction_time"]
    return {
        "files": [f.name for f in files],
        "fingerprint": data_fingerprint(labels.select("subject_id", "prediction_time", "boolean_value")),
        "rows": labels.height,
        "subjects": labels["subject_id"].n_unique(),
        "cases": n_pos,
        "prevalence": round(n_pos / max(labels.height, 1), 4),
        "first_prediction_time": _iso(times.min()),
        "last_prediction_time": _iso(times.max()),
    }


def site_labels(meds: Path, task: TaskDefinition) -> pl.DataFrame:
    """Labels extracted site by site, each on its own data span (what `chronorisk features` does)."""
    from chronorisk.features.labels import extract_labels
    from chronorisk.features.sources import find_sites

    frames = [extract_labels(source.scan(), task) for source in find_sites(Path(meds))]
    return pl.concat(frames).sort("subject_id", "prediction_time")


# ---- training --------------------------------------------------------------------------------
class UnfitModelError(ChronoriskError):
    """Training made a model that must not be handed over (too few cases, no better than chance)."""

    exit_code = 4


def unfit_reasons_before(train: pl.DataFrame, tuning: pl.DataFrame, config: TrainConfig) -> list[str]:
    """Reasons known before fitting: fewer outcomes than `train.min_cases` in the train and tuning splits."""
    cases = int(train["boolean_value"].sum()) + int(tuning["boolean_value"].sum())
    if cases < config.min_cases:
        return [f"only {cases} outcomes in the train and tuning splits; at least train.min_cases = "
                f"{config.min_cases} are needed for a model worth handing over"]
    return []


def unfit_reasons_after(y_tune, p_tune, subjects, seed: int) -> tuple[list[str], tuple[float, float]]:
    """The tuning AUROC's 95% interval (patients resampled); a reason when it includes 0.5."""
    from chronorisk.training import metrics

    lo, hi = metrics.bootstrap_intervals({"auroc": metrics.auroc}, y_tune, p_tune, n_boot=200, seed=seed,
                                         clusters=subjects)["auroc"]
    if not (lo > 0.5):
        return [f"the tuning AUROC's 95% interval ({lo:.3f} to {hi:.3f}) includes 0.5: no better than chance"], (lo, hi)
    return [], (lo, hi)


@dataclass
class TrainResult:
    model: RiskModel
    bundle: ModelBundle
    tuning_metrics: dict
    training_info: dict


def training_rows(data: TaskData) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Train and tuning rows, each with both outcomes (LightGBM and the calibrator need them)."""
    train, tuning = data.split(TRAIN), data.split(TUNING)
    for name, part in (("train", train), ("tuning", tuning)):
        n_pos = int(part["boolean_value"].sum()) if part.height else 0
        if part.height == 0 or n_pos in (0, part.height):
            raise ChronoriskError(
                f"task {data.task.name}: the {name} split has {part.height} rows with {n_pos} outcomes; "
                "both outcomes are needed (more patients, or another task)"
            )
    return train, tuning


def fit_model(
    train: pl.DataFrame, tuning: pl.DataFrame, feature_names: list[str], model_config: ModelConfig,
    *, tune: bool = False, tune_trials: int = 10,
) -> RiskModel:
    """Fit the configured kind (or both, for `auto`), then calibrate (see the module docstring).

    LightGBM boosts on `train` with early stopping on `tuning`; the logistic regression learns from
    `train` (its penalty by grouped CV there). `auto` fits both and keeps the one whose out-of-fold
    margins over the train and tuning patients (`RiskModel.cross_fitted_margins`, the rows the
    calibrator is fitted on anyway) have the lower log loss; the choice and both losses are kept in
    `model.selection_`.
    """
    from chronorisk.models.logistic import margin_log_loss
    from chronorisk.training import metrics

    kinds = ["lightgbm", "logistic"] if model_config.kind == "auto" else [model_config.kind]
    both = pl.concat([train.select("subject_id", "boolean_value", *feature_names),
                      tuning.select("subject_id", "boolean_value", *feature_names)])
    y_both = both["boolean_value"].to_numpy()
    fitted: dict[str, tuple[RiskModel, object]] = {}
    for kind in kinds:
        model = _fit_kind(kind, train, tuning, feature_names, model_config, tune, tune_trials)
        margins = None
        if model_config.calibration_rows == "cross_fit" or len(kinds) > 1:
            margins = model.cross_fitted_margins(
                both.select(feature_names), y_both, both["subject_id"].to_numpy(),
                folds=model_config.cross_fit_folds, seed=model_config.seed,
            )
        fitted[kind] = (model, margins)
    losses = {k: margin_log_loss(m, y_both) for k, (_, m) in fitted.items() if m is not None}
    chosen = min(losses, key=lambda k: (losses[k], k)) if len(kinds) > 1 else kinds[0]
    model, margins = fitted[chosen]
    model.selection_ = {"configured": model_config.kind, "chosen": chosen,
                        "cv_log_loss": {k: round(v, 6) for k, v in losses.items()},
                        "cv_auroc": {k: round(float(metrics.auroc(y_both, m)), 6)
                                     for k, (_, m) in fitted.items() if m is not None}}
    if model_config.calibration_rows == "tuning":
        return model.fit_calibration(tuning.select(feature_names), tuning["boolean_value"].to_numpy(), rows="tuning")
    return model.fit_calibration_margins(margins, y_both, rows="cross_fit")


def _fit_kind(kind: str, train: pl.DataFrame, tuning: pl.DataFrame, names: list[str], model_config: ModelConfig,
              tune: bool, tune_trials: int) -> RiskModel:
    from chronorisk.models.risk_model import RiskModel

    model = RiskModel(model_config, tune=tune, tune_trials=tune_trials)
    if kind == "logistic":
        return model.fit_logistic(train.select(names), train["boolean_value"].to_numpy(), names,
                                  groups=train["subject_id"].to_numpy())
    return model.fit_booster(
        train.select(names), train["boolean_value"].to_numpy(),
        tuning.select(names), tuning["boolean_value"].to_numpy(), names,
    )


def train_task(
    data: TaskData,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    version: str | int = "0",
    extra_metadata: dict | None = None,
) -> TrainResult:
    """A calibrated `RiskModel` and its bundle (not yet saved) for one task."""
    from chronorisk.models.bundle import ModelBundle, data_fingerprint
    from chronorisk.models.config import TierRule
    from chronorisk.models.tiers import fit_thresholds, tier_table
    from chronorisk.training import metrics

    unfit = unfit_reasons_before(data.split(TRAIN), data.split(TUNING), train_config)
    if unfit and not train_config.allow_unfit:
        raise UnfitModelError(_refusal(data.task.name, unfit))
    train, tuning = training_rows(data)
    names = data.feature_names
    model = fit_model(train, tuning, names, model_config, tune=train_config.tune, tune_trials=train_config.tune_trials)
    y_tune = tuning["boolean_value"].to_numpy().astype(float)
    p_tune = model.predict_risk(tuning.select(names))
    more, (auroc_lo, auroc_hi) = unfit_reasons_after(y_tune, p_tune, tuning["subject_id"].to_numpy(), model_config.seed)
    unfit += more
    if unfit and not train_config.allow_unfit:
        raise UnfitModelError(_refusal(data.task.name, unfit))
    tuning_metrics = {
        "auroc": float(metrics.auroc(y_tune, p_tune)),
        "auroc_lo": auroc_lo,
        "auroc_hi": auroc_hi,
        "ece": float(metrics.ece(y_tune, p_tune)),
        "brier": float(metrics.brier(y_tune, p_tune)),
        "log_loss": float(metrics.log_loss(y_tune, p_tune)),
        "calibration_slope": float(metrics.calibration_slope(y_tune, p_tune)),
    }
    info = {
        "n_train": train.height,
        "n_valid": tuning.height,
        "n_train_positive": int(train["boolean_value"].sum()),
        "n_valid_positive": int(tuning["boolean_value"].sum()),
        "n_train_subjects": train["subject_id"].n_unique(),
        "sites": sorted(data.frame["site"].unique().to_list()),
        "first_prediction_time": _iso(train["prediction_time"].min()),
        "last_prediction_time": _iso(train["prediction_time"].max()),
        "source": data.source,
        "fit_seconds": round(float(getattr(model, "fit_seconds_", 0.0)), 3),
    }
    fingerprint = data_fingerprint(
        pl.concat([train, tuning]).select("subject_id", "prediction_time", "boolean_value", *names)
    )
    rule = model_config.tier_rule(data.task.name)
    thresholds = fit_thresholds(rule, y_tune, p_tune)
    bundle = ModelBundle.from_model(
        model,
        data.spec,
        data.task,
        thresholds,
        version=version,
        data_fingerprint=fingerprint,
        metrics={"tuning": tuning_metrics, "tiers": tier_table(y_tune, p_tune, thresholds)},
        extra={"training": info, "supplied_labels": data.supplied_labels, "unfit": unfit,
               "tier_rule": (rule.model_dump() if isinstance(rule, TierRule)
                             else {"rule": "cutoffs", **rule.model_dump()}),
               **(extra_metadata or {})},
    )
    return TrainResult(model=model, bundle=bundle, tuning_metrics=tuning_metrics, training_info=info)


def _refusal(task: str, reasons: list[str]) -> str:
    return (f"task {task}: no model registered: " + "; ".join(reasons)
            + " (more patients or cases, another task; --allow-unfit keeps it for experiments, marked not fit for use)")


def _iso(value: object) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else None


def same_spec(a: FeatureSpec, b: FeatureSpec) -> bool:
    """True when two specs compute the same columns the same way (when they were fitted does not matter)."""
    return a.model_dump(exclude={"fit_info"}) == b.model_dump(exclude={"fit_info"})


def with_spec(data: TaskData, spec: FeatureSpec, meds_root: Path | None) -> TaskData:
    """`data`'s rows (same index, labels, sites, splits) with features computed by `spec`.

    Reuses the table when `spec` is the one that made it; otherwise
    recomputes from the MEDS events (a model trained on an older spec may
    select other codes).
    """
    from chronorisk.features.pipeline import transform

    if same_spec(spec, data.spec):
        return data
    root = meds_root or data.meds_root
    if root is None or not Path(root).exists():
        raise ChronoriskError(
            f"task {data.task.name}: the model was trained with another feature spec than {data.source} holds, "
            "and no MEDS data to recompute its features from (give --meds DIR)"
        )
    events, _ = read_meds(Path(root))
    index = data.frame.select(*KEY_COLUMNS)
    frame = transform(spec, events.drop("site"), index.lazy()).collect()
    check_table(frame, spec, f"features recomputed from {root}")
    return dataclasses.replace(data, spec=spec, frame=frame, source=f"{root} (recomputed for the model's spec)",
                               meds_root=Path(root))
