"""Typed configuration of training, evaluation and promotion, parsed from params.yaml."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tune: bool = False
    tune_trials: int = Field(10, ge=1)
    experiment: str = "chronorisk"


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap: int = Field(200, ge=0)
    temporal_split: date | None = date(2024, 1, 1)
    leave_one_site_out: bool = True


class PromoteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    auroc_tolerance: float = Field(0.005, ge=0)
    ece_tolerance: float = Field(0.01, ge=0)
