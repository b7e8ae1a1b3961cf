"""Prediction tasks declared in YAML: who, when, what outcome, over which horizon.

A task says who is in the population at a prediction time t (concepts
recorded before t, age), when predictions are made (a 1 January / 1 July
calendar grid from data start + lookback to data end - horizon), which
concepts make the outcome, what excludes a subject and how a record that
ends early is labelled. Built-ins live in `features/tasks/*.yaml`.

Time rules (shared with `labels.py`):
- "before t" means strictly before t: what features may see.
- alive at t: no death recorded at or before t.
- outcome: an outcome concept recorded at a time in [t, t + horizon].
- censoring, for subjects without the outcome in the horizon: a death in the
  horizon -> `censoring.death`; otherwise a record that ends before t + horizon
  -> `censoring.end_of_record` (`exclude` drops the row, `negative` labels it
  False). A record ends at the subject's last event, except that a subject seen
  within `censoring.followup_grace_days` of the end of the data (its last event,
  births aside) is followed to the end of the data: with a visit or two a year,
  "no event after t + horizon" near the end of the data means "not seen yet",
  not "lost" (without this, the last prediction times would keep almost only
  positives).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chronorisk.data import codes as vocab
from chronorisk.data.files import write_text_atomic
from chronorisk.errors import InputError

TASKS_DIR = Path(__file__).with_name("tasks")
_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Population(_Strict):
    """Who is eligible at t, from what was recorded strictly before t."""

    any_of: tuple[str, ...] = Field((), description="at least one of these concepts recorded before t")
    all_of: tuple[str, ...] = Field((), description="every one of these concepts recorded before t")
    none_of: tuple[str, ...] = Field((), description="none of these concepts recorded before t")
    min_age_years: float | None = Field(None, ge=0, le=130)
    max_age_years: float | None = Field(None, gt=0, le=130)

    @model_validator(mode="after")
    def _ages_ordered(self) -> Population:
        if (
            self.min_age_years is not None
            and self.max_age_years is not None
            and self.min_age_years >= self.max_age_years
        ):
            raise ValueError("min_age_years must be below max_age_years")
        return self


class Schedule(_Strict):
    """Prediction times on a calendar grid (first day of the given months)."""

    months: tuple[int, ...] = (1, 7)
    lookback_years: int = Field(2, ge=0, le=50)
    start: date | None = Field(None, description="first prediction time; default data start + lookback")
    end: date | None = Field(None, description="last prediction time; default data end - horizon")

    @field_validator("months")
    @classmethod
    def _valid_months(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("at least one month is needed")
        bad = [m for m in value if not 1 <= m <= 12]
        if bad:
            raise ValueError(f"months must be 1..12, got {bad}")
        return tuple(sorted(set(value)))


class Outcome(_Strict):
    concepts: tuple[str, ...] = Field(min_length=1)


class Exclusions(_Strict):
    prior_outcome: bool = Field(True, description="an outcome concept recorded before t excludes")
    concepts: tuple[str, ...] = Field((), description="any of these recorded before t excludes")


class Censoring(_Strict):
    death: Literal["negative", "exclude"] = "negative"
    end_of_record: Literal["exclude", "negative"] = "exclude"
    followup_grace_days: int = Field(
        730, ge=0, le=36500,
        description="a subject whose last event is this close to the end of the data is taken as "
        "followed to the end of the data (sparse visits are not a lost record)",
    )


class TaskDefinition(_Strict):
    """One prediction task (see the module docstring for the time rules).

    `labels: supplied` says the labels come from elsewhere (`--labels`): population and outcome are
    then optional (only described), labels are never extracted, and the model card describes the
    supplied label files instead of an outcome definition.
    """

    name: str = Field(pattern=_NAME_PATTERN)
    description: str = ""
    labels: Literal["extracted", "supplied"] = Field(
        "extracted", description="extracted: from the outcome concepts; supplied: label files given with --labels"
    )
    population: Population = Field(default_factory=Population)
    schedule: Schedule = Field(default_factory=Schedule)
    horizon_days: int | None = Field(None, gt=0, le=36500, description="needed unless labels are supplied")
    outcome: Outcome | None = Field(None, description="needed unless labels are supplied")
    exclusions: Exclusions = Field(default_factory=Exclusions)
    censoring: Censoring = Field(default_factory=Censoring)

    @model_validator(mode="after")
    def _extracted_needs_outcome(self) -> TaskDefinition:
        if self.labels == "extracted":
            missing = [k for k in ("horizon_days", "outcome") if getattr(self, k) is None]
            if missing:
                raise ValueError(
                    f"{' and '.join(missing)} needed to extract labels (or say `labels: supplied` and give --labels)"
                )
        return self

    @property
    def labels_supplied(self) -> bool:
        return self.labels == "supplied"

    @property
    def outcome_concepts(self) -> tuple[str, ...]:
        return self.outcome.concepts if self.outcome is not None else ()

    # ---- serialization -------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path | str) -> None:
        write_text_atomic(path, self.to_yaml())

    @classmethod
    def from_yaml(cls, text: str, source: str = "task") -> TaskDefinition:
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(source, f"not valid YAML ({exc.__class__.__name__})") from None
        return cls.from_dict(raw, source)

    @classmethod
    def from_dict(cls, raw: object, source: str = "task") -> TaskDefinition:
        if not isinstance(raw, dict):
            raise InputError(source, "a task definition must be a YAML mapping (name, horizon_days, outcome, ...)")
        try:
            task = cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'task'}: {err['msg']}" for err in exc.errors()
            )
            raise InputError(source, problems) from None
        task.check_concepts(source)
        return task

    # ---- concepts --------------------------------------------------------------------
    def concepts_used(self) -> set[str]:
        p = self.population
        return {
            *p.any_of, *p.all_of, *p.none_of, *self.outcome_concepts, *self.exclusions.concepts,
        }

    def excluding_concepts(self) -> tuple[str, ...]:
        """Concepts whose record before t removes a subject (exclusions, prior outcome)."""
        extra = self.outcome_concepts if self.exclusions.prior_outcome else ()
        return tuple(dict.fromkeys((*self.exclusions.concepts, *extra)))

    def check_concepts(self, source: str = "task") -> None:
        from chronorisk.features.concepts import load_concepts

        known = set(load_concepts().condition_names())
        unknown = sorted(self.concepts_used() - known)
        if unknown:
            raise InputError(
                source, f"unknown concept(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )

    # ---- schedule --------------------------------------------------------------------
    @property
    def horizon(self) -> timedelta:
        return timedelta(days=self.horizon_days or 0)

    def require_extractable(self) -> None:
        """Raise when labels cannot be extracted for this task (supplied labels)."""
        if self.labels_supplied:
            raise InputError("--labels", f"task {self.name} has supplied labels (labels: supplied): give --labels")

    def prediction_times(self, data_start: datetime, data_end: datetime) -> list[datetime]:
        """Grid dates from data start + lookback (or schedule.start) to data end - horizon (or .end).

        The start counts from the day the data starts (a first visit at 04:59 on 1 January
        still makes 1 January + lookback the first prediction time).
        """
        first = _as_datetime(self.schedule.start) if self.schedule.start else _add_years(
            _as_datetime(data_start.date()), self.schedule.lookback_years
        )
        last = _as_datetime(self.schedule.end) if self.schedule.end else data_end - self.horizon
        return [t for t in grid_dates(first.year, last.year, self.schedule.months) if first <= t <= last]

    def schedule_from_events(self, events: pl.LazyFrame | pl.DataFrame) -> list[datetime]:
        """Prediction times for the data span of `events` (timed events other than birth)."""
        start, end = data_span(events)
        if start is None or end is None:
            return []
        return self.prediction_times(start, end)


def data_span(events: pl.LazyFrame | pl.DataFrame) -> tuple[datetime | None, datetime | None]:
    """When the data starts and ends: the span prediction times are scheduled in.

    Start: the first encounter or numeric measurement (recorded activity), else the
    first timed event. Diagnoses can carry onset dates from long before the data
    begins (a problem list's "diabetes since 2008") and births always do, so
    neither sets the start. End: the last timed event other than a birth.
    """
    timed = events.lazy().filter(pl.col("time").is_not_null() & (pl.col("code") != vocab.BIRTH))
    activity = pl.col("code").str.starts_with(vocab.ENCOUNTER_PREFIX) | pl.col("numeric_value").is_not_null()
    span = timed.select(
        pl.col("time").filter(activity).min().alias("activity_start"),
        pl.col("time").min().alias("start"),
        pl.col("time").max().alias("end"),
    ).collect()
    start = span["activity_start"][0] if span["activity_start"][0] is not None else span["start"][0]
    return start, span["end"][0]


def grid_dates(first_year: int, last_year: int, months: Iterable[int] = (1, 7)) -> list[datetime]:
    return [datetime(y, m, 1) for y in range(first_year, last_year + 1) for m in sorted(months)]


def _as_datetime(d: date | datetime) -> datetime:
    return d if isinstance(d, datetime) else datetime(d.year, d.month, d.day)


def _add_years(t: datetime, years: int) -> datetime:
    try:
        return t.replace(year=t.year + years)
    except ValueError:  # 29 February
        return t.replace(year=t.year + years, day=28)


# ---- loading ----------------------------------------------------------------------------
def builtin_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_task(name_or_path: str | Path | TaskDefinition) -> TaskDefinition:
    """A built-in task by name, or a task YAML file; errors name the file and the problem."""
    if isinstance(name_or_path, TaskDefinition):
        return name_or_path
    text = str(name_or_path)
    if text in builtin_task_names():
        path = TASKS_DIR / f"{text}.yaml"
    else:
        path = Path(text)
        if not path.is_file():
            raise InputError(
                "task",
                f"{text!r} is neither a built-in task ({', '.join(builtin_task_names())}) nor a task YAML file",
            )
    return TaskDefinition.from_yaml(path.read_text(), source=str(path))
