"""Typed configuration of labels and features, parsed from params.yaml."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FeatureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    windows_days: list[int] = Field(default_factory=lambda: [90, 365, 1095])
    min_code_subjects: int = Field(20, ge=1, description="a code becomes a feature when this many subjects have it")
    max_codes: int = Field(200, ge=0, description="at most this many data-driven codes (the most frequent)")
    max_texts_per_code: int = Field(
        10, ge=0, description="text values of a code that become categories (the most frequent)"
    )
    pdc_days: int = Field(365, gt=0, description="window of medication counts and proportion of days covered")
    chunk_subjects: int = Field(
        15_000, gt=0, description="index rows (subject x prediction time) transformed at a time (memory bound)"
    )
    workers: int = Field(2, ge=1, le=16, description="chunks computed at once (threads); memory grows with it")
    concepts: str | None = Field(None, description="concept map YAML (default: the built-in features/concepts.yaml)")

    @field_validator("windows_days")
    @classmethod
    def _positive_windows(cls, value: list[int]) -> list[int]:
        if not value or any(w <= 0 for w in value):
            raise ValueError(f"windows_days must be positive day counts, got {value}")
        return sorted(set(value))


class LabelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: ["complication_1y", "onset_2y"])
