"""The fitted feature spec: everything `transform` needs, as one JSON artifact.

Fit once (vocabulary and code selection from code summaries), save, and ship
the same file to training, serving and federated clients: the spec embeds the
concept map it was fitted with, so a later edit of `concepts.yaml` cannot
silently change what a saved model sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from chronorisk.data.files import write_text_atomic
from chronorisk.errors import InputError

SPEC_VERSION = 2

Family = Literal[
    "demographics", "conditions", "measurements", "medications", "encounters",
    "missingness", "smoking", "codes",
]
FeatureKind = Literal["binary", "count", "value", "elapsed_days", "age", "category", "proportion"]


class FeatureInfo(BaseModel):
    """What one feature means: how to show it, what kind of number it is, what it belongs to.

    `date_feature` names a days-since-last feature (days before the prediction
    time); the date of the value is prediction_time - that many days.
    `kind` says what the number is (a yes/no flag, a count, a measured value, days
    elapsed, an age, a text category flag, a proportion); `concept` the concept-map
    name it belongs to ("sbp", "diabetes", "statin", "smoking") or, for the
    data-driven vocabulary, the MEDS code itself (`code` is then that code too);
    `aggregate` how the events were summarized ("last", "mean", "count", "present",
    "days_since_last", "pdc", "text", ...) over `window_days` (None: all history).
    `bounds` is the plausible range of the value in `unit` (serving refuses values
    outside it); `grows_with_clock` marks features that change as time passes with no
    new event (age, days since last); `concept_display` names the concept for clinicians.
    Serving and monitoring read these fields: no code parses feature names.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    display: str
    unit: str = ""
    family: Family
    date_feature: str | None = None
    kind: FeatureKind
    concept: str | None = None
    code: str | None = None
    aggregate: str | None = None
    window_days: int | None = None
    bounds: tuple[float, float] | None = None
    grows_with_clock: bool = False
    concept_display: str | None = None

    @model_validator(mode="after")
    def _ordered_bounds(self) -> FeatureInfo:
        if self.bounds is not None and not self.bounds[0] <= self.bounds[1]:
            raise ValueError(f"bounds {self.bounds} are not (low, high)")
        return self


class MeasurementSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    display: str
    unit: str
    codes: tuple[str, ...]


class ConditionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    display: str
    codes: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()


class DrugClassSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    display: str
    codes: tuple[str, ...]


class FeatureSpec(BaseModel):
    """Fitted, JSON-serializable description of every feature, in column order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = SPEC_VERSION
    task: str | None = None
    windows_days: tuple[int, ...]
    pdc_days: int = 365
    conditions: tuple[ConditionSpec, ...]
    measurements: tuple[MeasurementSpec, ...]
    drug_classes: tuple[DrugClassSpec, ...]
    encounter_classes: tuple[str, ...]
    vocabulary: tuple[str, ...] = Field((), description="codes selected as data-driven count features")
    feature_names: tuple[str, ...]
    features: dict[str, FeatureInfo]
    fit_info: dict = Field(default_factory=dict, description="what the fit saw (counts only, no records)")

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError("feature_names has duplicates")
        missing = [n for n in self.feature_names if n not in self.features]
        if missing:
            raise ValueError(f"features has no entry for {missing[:5]}")
        dangling = [
            n for n, f in self.features.items() if f.date_feature and f.date_feature not in self.features
        ]
        if dangling:
            raise ValueError(f"date_feature of {dangling[:5]} names no feature")
        return self

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def family_of(self, name: str) -> str:
        return self.features[name].family

    def info(self, name: str) -> FeatureInfo:
        """The meaning of feature `name`; InputError naming it when the spec has no such feature."""
        found = self.features.get(name)
        if found is None:
            raise InputError(f"features.{name[:80]}", "unknown feature for this feature spec")
        return found

    def clock_features(self) -> tuple[str, ...]:
        """Features that change as time passes with no new event (age, days since last), in column order."""
        return tuple(n for n in self.feature_names if self.features[n].grows_with_clock)

    def features_of_concept(self, concept: str) -> tuple[str, ...]:
        """Every feature of one concept (or data-driven code), in column order."""
        return tuple(n for n in self.feature_names if self.features[n].concept == concept)

    def features_where(self, **fields) -> tuple[str, ...]:
        """Features whose FeatureInfo has all these field values, e.g. `features_where(kind="age")`."""
        return tuple(
            n for n in self.feature_names
            if all(getattr(self.features[n], k) == v for k, v in fields.items())
        )

    # ---- serialization -------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, source: str = "feature spec") -> FeatureSpec:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(source, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(raw, dict):
            raise InputError(source, "a feature spec must be a JSON object")
        if raw.get("version") != SPEC_VERSION:
            raise InputError(source, f"spec version {raw.get('version')!r} is not supported (expected {SPEC_VERSION}; "
                                     "refit the features with this version of chronorisk)")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
            )
            raise InputError(source, problems) from None

    def save(self, path: Path | str) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> FeatureSpec:
        path = Path(path)
        if not path.is_file():
            raise InputError(str(path), "feature spec file does not exist")
        return cls.from_json(path.read_text(), source=str(path))
