"""Hand-built MEDS events for the feature and label tests."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl

from chronorisk.features.config import FeatureConfig
from chronorisk.features.pipeline import code_summary, fit_spec

EVENT_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
}
T = datetime(2024, 1, 1)  # the prediction time of most tests


def before(days: float, at: datetime = T) -> datetime:
    return at - timedelta(days=days)


def after(days: float, at: datetime = T) -> datetime:
    return at + timedelta(days=days)


def events(rows: list[tuple]) -> pl.DataFrame:
    """Rows (subject_id, time, code[, numeric_value[, text_value]]) -> a MEDS event frame."""
    full = [(*r, *([None] * (5 - len(r)))) for r in rows]
    return pl.DataFrame(full, schema=EVENT_SCHEMA, orient="row")


def index(subjects: list[int], at: datetime = T) -> pl.DataFrame:
    return pl.DataFrame(
        {"subject_id": subjects, "prediction_time": [at] * len(subjects)},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    )


def spec_for(ev: pl.DataFrame, **config):
    """A spec fitted on `ev` with every code of >= 1 subject eligible for the vocabulary."""
    cfg = FeatureConfig(**{"min_code_subjects": 1, **config})
    return fit_spec(code_summary(ev), cfg)
