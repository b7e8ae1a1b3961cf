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
SPEC_FILE = "spec.json"


@dataclass
class TaskData:
    """One task's rows and the spec that made their feature columns."""

    task: TaskDefinition
    spec: FeatureSpec
    frame: pl.DataFrame  # KEY_COLUMNS + spec.feature_names (+ anything else, ignored)
    source: str  # where the rows came from (for logs, MLflow and the model card)
    meds_root: Path | None = None  # the MEDS data the features were computed from, when known

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
    splits = pl.concat([s.splits().select("subject_id", "split") for s in sources]).unique("subject_id", keep="first")
    return events, splits


def attach_splits(index: pl.DataFrame, events: pl.LazyFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """Index rows with their subject's `site` and `split` (subjects without events are dropped).

    A subject the split file does not list is held out: never trained on (as `chronorisk features` does).
    """
    sites = events.select("subject_id", "site").unique("subject_id").collect()
    out = index.join(sites, on="subject_id", how="inner").join(splits, on="subject_id", how="left")
    return out.with_columns(pl.col("split").fill_null(HELD_OUT))


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
    from chronorisk.features.labels import read_labels
    from chronorisk.features.pipeline import code_summary, fit_spec, transform
    from chronorisk.features.tasks import load_task

    task_def = load_task(task)
    events, splits = read_meds(meds)
    label_rows = read_labels(labels) if labels is not None else site_labels(meds, task_def)
    if label_rows.height == 0:
        raise InputError("--labels" if labels else "--task", f"no labelled rows for task {task_def.name}")
    index = attach_splits(label_rows, events, splits)
    if index.height == 0:
        raise InputError("--labels", "no label row belongs to a subject of the MEDS data (subject_id mismatch?)")
    if only_split is not None:  # e.g. promotion compares on held-out rows only: featurize only those
        index = index.filter(pl.col("split") == only_split)
    if spec is None:
        train_subjects = splits.filter(pl.col("split") == TRAIN).select("subject_id")
        summary = code_summary(events.join(train_subjects.lazy(), on="subject_id", how="semi"))
        spec = fit_spec(summary, config, task_def)
    frame = transform(spec, events.drop("site"), index.lazy()).collect()
    check_table(frame, spec, "computed features")
    return TaskData(
        task=task_def,
        spec=spec,
        frame=frame,
        source=str(meds) + (f" + labels {labels}" if labels else ""),
        meds_root=Path(meds),
    )


def site_labels(meds: Path, task: TaskDefinition) -> pl.DataFrame:
    """Labels extracted site by site, each on its own data span (what `chronorisk features` does)."""
    from chronorisk.features.labels import extract_labels
    from chronorisk.features.sources import find_sites

    frames = [extract_labels(source.scan(), task) for source in find_sites(Path(meds))]
    return pl.concat(frames).sort("subject_id", "prediction_time")


# ---- training --------------------------------------------------------------------------------
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
    """Boost on `train` with early stopping on `tuning`, then calibrate (see the module docstring)."""
    from chronorisk.models.risk_model import RiskModel

    model = RiskModel(model_config, tune=tune, tune_trials=tune_trials)
    model.fit_booster(
        train.select(feature_names), train["boolean_value"].to_numpy(),
        tuning.select(feature_names), tuning["boolean_value"].to_numpy(),
        feature_names,
    )
    if model_config.calibration_rows == "tuning":
        return model.fit_calibration(tuning.select(feature_names), tuning["boolean_value"].to_numpy(), rows="tuning")
    both = pl.concat([train.select("subject_id", "boolean_value", *feature_names),
                      tuning.select("subject_id", "boolean_value", *feature_names)])
    margins = model.cross_fitted_margins(
        both.select(feature_names), both["boolean_value"].to_numpy(), both["subject_id"].to_numpy(),
        folds=model_config.cross_fit_folds, seed=model_config.seed,
    )
    return model.fit_calibration_margins(margins, both["boolean_value"].to_numpy(), rows="cross_fit")


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

    train, tuning = training_rows(data)
    names = data.feature_names
    model = fit_model(train, tuning, names, model_config, tune=train_config.tune, tune_trials=train_config.tune_trials)
    y_tune = tuning["boolean_value"].to_numpy().astype(float)
    p_tune = model.predict_risk(tuning.select(names))
    tuning_metrics = {
        "auroc": float(metrics.auroc(y_tune, p_tune)),
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
        extra={"training": info, "tier_rule": rule.model_dump() if isinstance(rule, TierRule) else
               {"rule": "cutoffs", **rule.model_dump()}, **(extra_metadata or {})},
    )
    return TrainResult(model=model, bundle=bundle, tuning_metrics=tuning_metrics, training_info=info)


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
    return TaskData(task=data.task, spec=spec, frame=frame, source=f"{root} (recomputed for the model's spec)",
                    meds_root=Path(root))
