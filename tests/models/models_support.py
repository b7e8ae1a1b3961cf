"""Hand-made feature spec and synthetic feature tables for the model tests (no generator needed)."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl

from chronorisk.features.spec import FeatureInfo, FeatureSpec
from chronorisk.models.config import ModelConfig

FEATURES = {
    "age": FeatureInfo(display="Age", unit="years", family="demographics", kind="age", grows_with_clock=True),
    "hba1c_last": FeatureInfo(
        display="HbA1c", unit="%", family="measurements", date_feature="hba1c_days_since_last", kind="value"
    ),
    "hba1c_days_since_last": FeatureInfo(display="Days since last HbA1c", unit="days", family="measurements",
                                         kind="elapsed_days", grows_with_clock=True),
    "sbp_last": FeatureInfo(
        display="Systolic BP", unit="mmHg", family="measurements", date_feature="sbp_days_since_last", kind="value"
    ),
    "sbp_days_since_last": FeatureInfo(display="Days since last systolic BP", unit="days", family="measurements",
                                         kind="elapsed_days", grows_with_clock=True),
    "noise_a": FeatureInfo(display="Noise A", unit="", family="codes", kind="count"),
    "noise_b": FeatureInfo(display="Noise B", unit="", family="codes", kind="count"),
}
NAMES = tuple(FEATURES)
PREDICTION_TIME = datetime(2026, 7, 1)


def make_spec(names: tuple[str, ...] = NAMES) -> FeatureSpec:
    return FeatureSpec(
        task="complication_1y",
        windows_days=(90, 365, 1095),
        conditions=(),
        measurements=(),
        drug_classes=(),
        encounter_classes=(),
        feature_names=names,
        features={n: FEATURES[n] for n in names},
    )


def true_logit(X: np.ndarray) -> np.ndarray:
    age, hba1c, sbp = X[:, 0], np.nan_to_num(X[:, 1], nan=6.0), np.nan_to_num(X[:, 3], nan=130.0)
    return -3.0 + 0.05 * (age - 55) + 0.8 * (hba1c - 6.5) + 0.03 * (sbp - 130)


def make_data(n: int, seed: int = 0, missing: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature matrix in NAMES order, outcomes and true risks."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, n)
    hba1c = rng.normal(6.8, 1.3, n)
    hba1c_days = rng.uniform(1, 1000, n)
    sbp = rng.normal(135, 18, n)
    sbp_days = rng.uniform(1, 400, n)
    X = np.column_stack([age, hba1c, hba1c_days, sbp, sbp_days, rng.normal(size=n), rng.normal(size=n)])
    gone = rng.random(n) < missing
    X[gone, 1] = np.nan
    X[gone, 2] = np.nan
    risk = 1 / (1 + np.exp(-true_logit(X)))
    y = (rng.random(n) < risk).astype(float)
    return X, y, risk


def frame(X: np.ndarray, names: tuple[str, ...] = NAMES, prediction_time: datetime = PREDICTION_TIME) -> pl.DataFrame:
    df = pl.DataFrame({n: X[:, i].astype(np.float32) for i, n in enumerate(names)}, nan_to_null=True)
    return df.with_columns(pl.lit(prediction_time).alias("prediction_time"))


def small_config(**overrides) -> ModelConfig:
    """One thread (the suite shares 2 cores), few rounds: seconds, not minutes."""
    lightgbm = {"num_threads": 1, "learning_rate": 0.1, **overrides.pop("lightgbm", {})}
    return ModelConfig(lightgbm=lightgbm, **{"num_boost_round": 200, "early_stopping_rounds": 20, **overrides})
