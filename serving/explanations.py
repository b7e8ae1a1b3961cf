"""Explanations a clinician reads in one glance: the model's factors grouped by clinical concept.

The one place of the service's wording, used by the patient page, the FHIR
RiskAssessment `note` and the CDS Hooks card. A factor (a model feature with
its value, date and log-odds contribution, `models/explain.py`) belongs to a
concept (`FeatureInfo.concept` of the feature spec: "sbp", "hba1c",
"diabetes", ...); the factors of one concept become one line:

    Systolic blood pressure: 3-year mean 145 mmHg, highest 157, last 2025-01-15 - raises risk (moderately)

Windows read in words (3-year, 1-year, 90-day), units in display form (mmHg,
not the UCUM code mm[Hg]), and the direction and size of the concept's summed
contribution in words. The raw factors stay in the API answers beside it.
A feature spec without the meaning fields (`concept`, `aggregate`,
`window_days`) falls back to one line per factor, in the factor's own words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from chronorisk.models.explain import format_value, is_flag_unit

# UCUM codes -> how a clinician writes them
DISPLAY_UNITS = {
    "mm[Hg]": "mmHg",
    "kg/m2": "kg/m²",
    "mL/min/{1.73_m2}": "mL/min/1.73 m²",
    "mL/min/1.73m2": "mL/min/1.73 m²",
    "10*3/uL": "×10³/µL",
    "10*9/L": "×10⁹/L",
    "ug/L": "µg/L",
    "umol/L": "µmol/L",
    "{beats}/min": "beats/min",
    "/min": "/min",
    "Cel": "°C",
}
# what an aggregate is called in a line (None: the value alone)
AGGREGATE_WORDS = {
    "last": "latest", "mean": "mean", "min": "lowest", "max": "highest", "trend": "trend",
    "std": "variability", "count": "records", "present": None, "days_since_last": None, "pdc": "days covered",
    "years_since_first": "years since first recorded",
}
# log-odds size of a concept's summed contribution -> words (an odds ratio of ~1.1, ~1.5)
SIZE_WORDS = ((0.1, "slightly"), (0.4, "moderately"), (math.inf, "strongly"))


@dataclass(frozen=True)
class SiteUnit:
    """A measurement shown in the site's unit: site value = canonical value * scale + offset."""

    unit: str
    scale: float
    offset: float


def site_units(choices: Mapping[str, str]) -> dict[str, SiteUnit]:
    """`serve.display_units` ({measurement: unit}) as conversions from the canonical unit, inverting the
    ingestion's own (affine) conversions of `data/codes.py`; InputError naming a unit it cannot show."""
    from chronorisk.data.codes import MEASUREMENTS
    from chronorisk.errors import InputError

    out: dict[str, SiteUnit] = {}
    for name, unit in choices.items():
        m = MEASUREMENTS.get(name)
        if m is None:
            raise InputError(f"serve.display_units.{name}", f"not a measurement; known: {', '.join(MEASUREMENTS)}")
        if unit == m.unit:
            continue
        if unit not in m.conversions:
            raise InputError(f"serve.display_units.{name}",
                             f"{unit!r} cannot be shown; accepted: {', '.join(m.units())}")
        to_canonical = m.conversions[unit]
        at0, at1, at100 = (float(to_canonical(x)) for x in (0.0, 1.0, 100.0))
        slope = at1 - at0
        if slope == 0 or abs(at0 + 100 * slope - at100) > 1e-6 * max(1.0, abs(at100)):
            raise InputError(f"serve.display_units.{name}", f"the conversion to {unit!r} is not linear")
        out[name] = SiteUnit(unit, 1 / slope, -at0 / slope)
    return out


def display_unit(unit: str | None) -> str:
    """The unit as a clinician writes it: 'mm[Hg]' -> 'mmHg', 'mm[Hg] per year' -> 'mmHg per year';
    unknown units as they are."""
    if not unit:
        return ""
    head, sep, rest = unit.partition(" per ")
    return DISPLAY_UNITS.get(head, head) + sep + rest


def window_words(days: int | None) -> str:
    """'3-year', '1-year', '6-month', '90-day' ('' when not windowed): '3-year mean', '4 records in 1-year'."""
    if not days:
        return ""
    if days % 365 == 0:
        return f"{days // 365}-year"
    if days in (180, 182, 183):
        return "6-month"
    return f"{days}-day"


def window_phrase(days: int | None) -> str:
    """'the last 3 years', 'the last year', 'the last 90 days'."""
    if not days:
        return ""
    if days % 365 == 0:
        years = days // 365
        return "the last year" if years == 1 else f"the last {years} years"
    return f"the last {days} days"


def size_words(contribution: float) -> str:
    """How much a summed log-odds contribution moves the risk, in words."""
    size = abs(contribution)
    return next(word for limit, word in SIZE_WORDS if size < limit)


@dataclass
class ConceptLine:
    """The factors of one concept, as one line."""

    concept: str
    title: str
    contribution: float = 0.0
    parts: list[str] = field(default_factory=list)
    last_date: str | None = None
    features: list[str] = field(default_factory=list)
    units_shown: set[str] = field(default_factory=set)
    window_shown: int | None = None

    @property
    def direction(self) -> str:
        return "raises" if self.contribution > 0 else "lowers"

    @property
    def text(self) -> str:
        detail = ", ".join(self.parts)
        dated = f", last {self.last_date}" if self.last_date else ""
        head = f"{self.title}: {detail}{dated}" if detail else f"{self.title}{dated}"
        return f"{head} - {self.direction} risk ({size_words(self.contribution)})"

    def as_dict(self) -> dict:
        return {"concept": self.concept, "title": self.title, "direction": self.direction,
                "size": size_words(self.contribution), "contribution": self.contribution,
                "last_date": self.last_date, "features": self.features, "text": self.text}


def _info(infos: Mapping[str, object] | None, name: str) -> object | None:
    return infos.get(name) if infos else None


def _get(info: object, key: str) -> object:
    return getattr(info, key, None) if info is not None else None


def group_factors(factors: Sequence[dict] | None, infos: Mapping[str, object] | None = None,
                  units: Mapping[str, SiteUnit] | None = None) -> list[ConceptLine]:
    """The factors grouped by concept, in the order of each concept's largest factor (the model's
    ranking), each concept's contributions summed. `infos` is the spec's FeatureInfo by feature name;
    `units` the site's display units by measurement (`site_units`)."""
    lines: dict[str, ConceptLine] = {}
    for f in factors or []:
        info = _info(infos, f.get("feature", ""))
        concept = _get(info, "concept") or f.get("feature") or f.get("display", "?")
        line = lines.get(concept)
        if line is None:
            title = _get(info, "concept_display") or (f.get("display") if _get(info, "concept") is None else None)
            line = lines[concept] = ConceptLine(concept, str(title or concept.replace("_", " ").capitalize()))
        line.contribution += float(f.get("contribution") or 0.0)
        line.features.append(f.get("feature", ""))
        part = _part(_in_site_unit(f, info, units), info, line)
        if part:
            line.parts.append(part)
        when = f.get("date")
        if when and (line.last_date is None or when > line.last_date):
            line.last_date = when
    return list(lines.values())


def _in_site_unit(f: dict, info: object, units: Mapping[str, SiteUnit] | None) -> dict:
    """The factor with its value in the site's unit for that measurement (differences: scale only)."""
    choice = units.get(_get(info, "concept")) if units else None
    if choice is None or _get(info, "kind") != "value" or f.get("value") is None:
        return f
    aggregate = _get(info, "aggregate")
    difference = aggregate in ("trend", "std")
    value = f["value"] * choice.scale + (0.0 if difference else choice.offset)
    return {**f, "value": value, "unit": choice.unit + (" per year" if aggregate == "trend" else "")}


def _part(f: dict, info: object, line: ConceptLine) -> str:
    """One factor's words inside its concept's line: '3-year mean 145 mmHg', 'highest 157', 'recorded'."""
    value = f.get("value")
    unit = f.get("unit") or ""
    aggregate = _get(info, "aggregate")
    if aggregate is None:  # no meaning fields: the factor's own words, as before
        if value is None:
            return "not recorded"
        return ("yes" if value >= 0.5 else "no") if is_flag_unit(unit) else _number(value, unit, line)
    window = _get(info, "window_days")
    if aggregate == "days_since_last":  # its date is the line's 'last'; without one, the days in words
        return "" if f.get("date") or value is None else f"last recorded {format_value(value)} days before"
    if value is None:
        label = " ".join(w for w in (window_words(window), AGGREGATE_WORDS.get(str(aggregate))) if w)
        return f"{label} not recorded".strip() if aggregate not in ("present", "never", "active") else "not recorded"
    kind = _get(info, "kind")
    if kind == "binary":
        return _flag_words(aggregate, value, f.get("display") or "", _get(info, "concept_display"), unit)
    if kind == "proportion":
        return f"{format_value(100 * value)} % of days covered" + (f" in {window_phrase(window)}" if window else "")
    if kind == "count":
        return f"{format_value(value)} {display_unit(unit)}" + (f" in {window_phrase(window)}" if window else "")
    if kind == "elapsed_days":
        return f"first recorded {format_value(value)} years ago" if aggregate == "years_since_first" else ""
    if kind == "age":
        return _number(value, unit, line)
    words = AGGREGATE_WORDS.get(str(aggregate), str(aggregate).replace("_", " "))
    said = window_words(window) if window != line.window_shown else ""  # '3-year mean 145, highest 157'
    line.window_shown = window
    label = " ".join(w for w in (said, words) if w)
    return f"{label} {_number(value, unit, line)}".strip()


def _number(value: float, unit: str, line: ConceptLine) -> str:
    """The value with its display unit the first time the line shows that unit, bare after that."""
    shown = display_unit(unit)
    if not shown or shown in line.units_shown:
        return format_value(value)
    line.units_shown.add(shown)
    return f"{format_value(value)} {shown}"


def _flag_words(aggregate: str, value: float, display: str, concept_display: str | None, unit: str) -> str:
    """A yes/no feature in words: 'recorded', 'never measured', 'supply active', 'current smoker', 'female'."""
    yes = value >= 0.5
    if aggregate == "present":
        return "recorded" if yes else "not recorded"
    if aggregate == "never":
        return "never measured" if yes else "measured"
    if aggregate == "active":
        return "supply active" if yes else "no active supply"
    if unit.startswith("1 = ") and ", 0 = " in unit:  # '1 = female, 0 = male'
        one, zero = unit[4:].split(", 0 = ", 1)
        return one if yes else zero
    state = display.split(": ", 1)[1] if concept_display and display.startswith(f"{concept_display}: ") else display
    return state if yes else f"not {state}"


def clinician_text(factors: Sequence[dict] | None, infos: Mapping[str, object] | None = None,
                   limit: int | None = None, units: Mapping[str, SiteUnit] | None = None) -> list[str]:
    """The grouped lines' texts, most important concept first."""
    lines = group_factors(factors, infos, units)
    return [line.text for line in lines[:limit]]


@lru_cache(maxsize=8)
def _site_units_cached(choices: tuple[tuple[str, str], ...]) -> dict[str, SiteUnit]:
    return site_units(dict(choices))


def units_of(config) -> dict[str, SiteUnit]:
    """The service's display units (`serve.display_units`), converted once."""
    return _site_units_cached(tuple(sorted(config.display_units.items())))


def infos_of(models: Mapping[str, object], task: str) -> Mapping[str, object] | None:
    """The FeatureInfo of every feature of the model serving `task` (None when not served)."""
    model = models.get(task)
    return model.spec.features if model is not None else None
