"""Typed configuration of the model, parsed from params.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TierThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    medium: float = Field(0.10, gt=0, lt=1)
    high: float = Field(0.25, gt=0, lt=1)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lightgbm: dict = Field(
        default_factory=lambda: {
            "objective": "binary",
            "learning_rate": 0.05,
            "num_leaves": 31,
            "min_data_in_leaf": 50,
            "feature_fraction": 0.8,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "lambda_l2": 1.0,
            "verbose": -1,
            "num_threads": 2,
        }
    )
    num_boost_round: int = Field(1000, gt=0)
    early_stopping_rounds: int = Field(50, gt=0)
    calibration: Literal["auto", "isotonic", "platt"] = "auto"
    top_k_factors: int = Field(5, ge=1)
    tiers: dict[str, TierThresholds] = Field(
        default_factory=lambda: {
            "complication_1y": TierThresholds(medium=0.10, high=0.25),
            "onset_2y": TierThresholds(medium=0.10, high=0.25),
        }
    )
