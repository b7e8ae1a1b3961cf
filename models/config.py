"""Typed configuration of the model, parsed from params.yaml (`model:` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# LightGBM keys the wrapper sets itself; a params.yaml value would be silently ignored or conflict.
_RESERVED_LIGHTGBM_KEYS = ("num_iterations", "num_boost_round", "n_estimators", "early_stopping_round")


def default_lightgbm_params() -> dict:
    """Defaults for a few hundred thousand rows of a few hundred features (see README, Models).

    `max_depth: 8` bounds the cost of exact TreeSHAP (linear in depth squared
    per leaf) so that one patient's explanation stays within a few ms.
    """
    return {
        "objective": "binary",
        "learning_rate": 0.05,
        "num_leaves": 31,
        "max_depth": 8,
        "min_data_in_leaf": 50,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "verbose": -1,
        "num_threads": 2,
    }


class TierThresholds(BaseModel):
    """Calibrated risk at or above `medium` is medium, at or above `high` is high."""

    model_config = ConfigDict(extra="forbid")

    medium: float = Field(0.10, gt=0, lt=1)
    high: float = Field(0.25, gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> TierThresholds:
        if self.medium >= self.high:
            raise ValueError(f"medium ({self.medium}) must be below high ({self.high})")
        return self


class TierRule(BaseModel):
    """How a task's tier thresholds are fitted on the validation (tuning) rows instead of fixed cut-offs.

    `top_percent`: `high` and `medium` are the percent of validation patients flagged at or above each
    tier (e.g. high 5, medium 20). `sensitivity`: they are the share of the validation outcomes caught
    at or above each tier (e.g. high 0.5, medium 0.8). Either way high flags fewer than medium.
    """

    model_config = ConfigDict(extra="forbid")

    rule: Literal["top_percent", "sensitivity"]
    high: float = Field(gt=0)
    medium: float = Field(gt=0)

    @model_validator(mode="after")
    def _in_range(self) -> TierRule:
        top = 100.0 if self.rule == "top_percent" else 1.0
        if not self.high < self.medium < top:
            unit = "percent of patients" if self.rule == "top_percent" else "share of the outcomes"
            raise ValueError(f"{self.rule}: need 0 < high ({self.high}) < medium ({self.medium}) < {top:g} "
                             f"({unit} flagged at or above the tier)")
        return self


class TuneSpace(BaseModel):
    """Ranges of the optional random search (`train.tune`); learning rate drawn log-uniformly."""

    model_config = ConfigDict(extra="forbid")

    num_leaves: tuple[int, int] = (15, 127)
    learning_rate: tuple[float, float] = (0.02, 0.2)
    min_data_in_leaf: tuple[int, int] = (20, 400)

    @field_validator("num_leaves", "learning_rate", "min_data_in_leaf")
    @classmethod
    def _increasing(cls, value: tuple) -> tuple:
        if not (0 < value[0] <= value[1]):
            raise ValueError(f"expected two increasing positive numbers, got {list(value)}")
        return value


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "lightgbm", "logistic"] = Field(
        "auto",
        description="auto: LightGBM or the penalized logistic regression, whichever has the lower cross-validated "
        "log loss on the training data (small cohorts with a few linear risk factors are not lost to trees)",
    )
    logistic_cs: tuple[float, ...] = Field(
        (0.01, 0.1, 1.0), min_length=1, description="inverse L2 penalties tried by the logistic model (grouped CV)"
    )
    lightgbm: dict = Field(
        default_factory=default_lightgbm_params,
        description="LightGBM parameters; keys given here replace the defaults one by one",
    )
    num_boost_round: int = Field(1000, gt=0, description="upper bound on trees; early stopping picks the number")
    early_stopping_rounds: int = Field(50, gt=0, description="stop when validation log loss has not improved")
    calibration: Literal["auto", "isotonic", "platt"] = Field(
        "auto", description="auto: the one with lower cross-fitted log loss on the calibration rows"
    )
    calibration_folds: int = Field(5, ge=2, le=20, description="folds of the cross-fitted choice (auto)")
    calibration_rows: Literal["cross_fit", "tuning"] = Field(
        "cross_fit",
        description="cross_fit: out-of-fold margins of every train and tuning patient (fold models of the final "
        "model's size and tree count); tuning: the tuning split's margins only",
    )
    cross_fit_folds: int = Field(5, ge=2, le=20, description="patient folds of the cross-fitted calibration rows")
    top_k_factors: int = Field(5, ge=1, description="factors shown per prediction")
    seed: int = Field(0, description="seed of LightGBM bagging, the tuning search and calibration folds")
    tune_space: TuneSpace = Field(default_factory=TuneSpace)
    tiers: dict[str, TierThresholds] = Field(
        default_factory=lambda: {
            "complication_1y": TierThresholds(medium=0.10, high=0.25),
            "onset_2y": TierThresholds(medium=0.10, high=0.25),
        }
    )
    tier_rules: dict[str, TierRule] = Field(
        default_factory=dict,
        description="tasks whose tiers are fitted on the validation rows (top percent or sensitivity); "
        "other tasks use the fixed cut-offs of `tiers`",
    )

    @field_validator("lightgbm", mode="before")
    @classmethod
    def _merge_defaults(cls, value: object) -> dict:
        if value is None:
            return default_lightgbm_params()
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of LightGBM parameters, got {type(value).__name__}")
        bad = [k for k in value if k in _RESERVED_LIGHTGBM_KEYS]
        if bad:
            raise ValueError(
                f"{', '.join(bad)}: set by chronorisk; use model.num_boost_round / model.early_stopping_rounds"
            )
        objective = value.get("objective", "binary")
        if objective not in ("binary", "cross_entropy"):
            raise ValueError(f"objective {objective!r}: only binary objectives are supported (binary)")
        return {**default_lightgbm_params(), **value}

    def tier_thresholds(self, task: str) -> TierThresholds:
        """The task's thresholds; the defaults when the task is not listed (a task from elsewhere)."""
        return self.tiers.get(task, TierThresholds())

    def tier_rule(self, task: str) -> TierRule | TierThresholds:
        """The task's tier rule: fitted on validation rows (`tier_rules`), else the fixed cut-offs."""
        return self.tier_rules.get(task) or self.tier_thresholds(task)

    def lightgbm_params(self) -> dict:
        """LightGBM parameters with the seed applied (a copy: callers may change it)."""
        params = dict(self.lightgbm)
        params.setdefault("seed", self.seed)
        params.setdefault("num_threads", 2)
        return params
