"""Typed configuration of labels and features, parsed from params.yaml."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FeatureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    windows_days: list[int] = Field(default_factory=lambda: [90, 365, 1095])
    min_code_subjects: int = Field(20, ge=1, description="a code becomes a feature when this many subjects have it")
    max_codes: int = Field(200, ge=0, description="at most this many data-driven code features")
    prediction_interval_days: int = Field(182, gt=0)


class LabelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: ["complication_1y", "onset_2y"])
