"""Typed configuration of training, evaluation and promotion, parsed from params.yaml."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tune: bool = Field(False, description="run a small random search of LightGBM parameters first")
    tune_trials: int = Field(10, ge=1, description="parameter sets tried when `tune` is on")
    seed: int = Field(0, description="seed of the parameter search and LightGBM's bagging")
    experiment: str = Field("chronorisk", min_length=1, description="MLflow experiment of the runs")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; null = SQLite under the work folder (--tracking-uri wins)"
    )
    min_cases: int = Field(20, ge=1, description="fewer outcomes than this in train + tuning: no model is registered")
    allow_unfit: bool = Field(
        False, description="register a model that fails the checks anyway (experiments; its card says not fit for use)"
    )


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap: int = Field(200, ge=0, description="bootstrap resamples for the 95% intervals (0 = none)")
    seed: int = Field(0, description="seed of the bootstrap")
    temporal_split: date | None = Field(
        date(2024, 1, 1), description="temporal validation: train before this date, test after (null = skip)"
    )
    leave_one_site_out: bool = Field(True, description="also train on all sites but one and test on that one")
    min_group_size: int = Field(30, ge=1, description="groups (site, sex, age band) smaller than this are skipped")
    min_group_cases: int = Field(
        10, ge=1, description="groups with fewer cases or fewer non-cases than this are not reported"
    )


class PromoteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    auroc_tolerance: float = Field(0.005, ge=0, description="candidate AUROC may be this much below the champion's")
    ece_tolerance: float = Field(0.01, ge=0, description="candidate ECE may be this much above the champion's")
    brier_tolerance: float = Field(
        0.002, ge=0, description="candidate Brier score may be this much above the champion's"
    )
