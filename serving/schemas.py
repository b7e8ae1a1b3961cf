"""Request and response models of every endpoint (pydantic), with the limits of sane input.

Invalid input never reaches scoring: wrong types, impossible values
(systolic BP 1200, birth dates in the future, so negative ages), dates in the
future, malformed or unknown codes and oversized lists are refused with a
4xx naming the field (`events[3].numeric_value: ...`).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

from chronorisk.data import codes as vocab
from chronorisk.data.time_bounds import (  # noqa: F401  (re-exported: one rule for every path)
    CLOCK_SKEW,
    EARLIEST,
    check_past,
    check_past_date,
    naive_utc,
    utcnow_naive,
)
from chronorisk.serving.store import AGE_BANDS

INT64_MAX = 2**63 - 1
ID_MAX = INT64_MAX  # subject ids are positive int64 (data/pseudonym.py)
MAX_EVENTS = 200_000
MAX_FHIR_ENTRIES = 50_000
MAX_FEATURES = 10_000

Tier = Literal["low", "medium", "high"]
AgeBand = Literal[AGE_BANDS]  # type: ignore[valid-type]
Sex = Literal["F", "M"]

_SITE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # fullmatch: no trailing newline or space
_TASK_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PLAIN_INT_RE = re.compile(r"[0-9]{1,19}")
# VOCAB -> accepted shape of the value part; a code outside these is "unknown"
CODE_PATTERNS: dict[str, re.Pattern[str]] = {
    "LOINC": re.compile(r"^\d{1,7}-\d$"),
    "SNOMED": re.compile(r"^\d{6,18}$"),
    "ICD10CM": re.compile(r"^[A-TV-Z]\d[0-9A-Z](\.?[0-9A-Z]{1,4})?$"),
    "ICD9CM": re.compile(r"^(\d{3}|[EV]\d{2,3})(\.?\d{1,2})?$"),
    "RXNORM": re.compile(r"^\d{1,10}$"),
    "ENCOUNTER": re.compile(r"^(" + "|".join(vocab.ENCOUNTER_CLASSES) + r")$"),
    "GENDER": re.compile(r"^[FM]$"),
    "LOCAL": re.compile(r"^[A-Za-z0-9_.-]{1,64}$"),
}
SPECIAL_CODES = (vocab.BIRTH, vocab.DEATH)
# the same rule as `check_code`, for the OpenAPI document (check_code gives the friendlier error)
CODE_PATTERN = "^(" + "|".join(
    [*SPECIAL_CODES, *(f"{v}//(?:{p.pattern[1:-1]})" for v, p in CODE_PATTERNS.items())]
) + ")$"


def check_code(code: str) -> str:
    """A MEDS code of a known vocabulary with a well-formed value; else ValueError naming what is accepted."""
    if code in SPECIAL_CODES:
        return code
    vocab_part, sep, value = code.partition("//")
    if not sep:
        raise ValueError(f"code {code[:40]!r} is not VOCAB//value (or MEDS_BIRTH / MEDS_DEATH)")
    pattern = CODE_PATTERNS.get(vocab_part)
    if pattern is None:
        raise ValueError(f"unknown vocabulary {vocab_part[:20]!r}; accepted: {', '.join(CODE_PATTERNS)}")
    if not pattern.match(value):
        raise ValueError(f"unknown {vocab_part} code {value[:40]!r}")
    return code


def check_site(value: str | None) -> str | None:
    if value is not None and not _SITE_RE.fullmatch(value):
        raise ValueError("a site id is 1-64 letters, digits, '_', '-' or '.'")
    return value


def check_task(value: str) -> str:
    if not _TASK_RE.fullmatch(value):
        raise ValueError("a task name is 1-64 letters, digits, '_', '-' or '.'")
    return value


def iso_time(value: Any) -> Any:
    """Times are ISO 8601 text only ('2024-03-01', '2024-03-01T09:00', '2024-03-01T09:00:00+02:00'): never a
    number read as a Unix time. The zone rule: a time with an offset is converted to UTC; a time without one
    is read as UTC (MEDS times are naive UTC)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("a time is ISO 8601 text such as 2024-03-01T09:00:00Z (numbers are not accepted)")
    text = value.strip()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ][0-9:.]+(Z|[+-]\d{2}:?\d{2})?)?", text):
        raise ValueError(f"{value[:40]!r} is not an ISO 8601 time (e.g. 2024-03-01T09:00:00Z)")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value[:40]!r} is not a valid date or time") from None


def plain_int(value: Any) -> Any:
    """Ids are plain decimal integers: '1_000', '+5', ' 7', '1e3' and floats are refused."""
    if isinstance(value, bool):
        raise ValueError("an id is a plain integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _PLAIN_INT_RE.fullmatch(value):
        return int(value)
    raise ValueError("an id is a plain decimal integer (digits only)")


def utc_text(value: datetime) -> str:
    """Answers carry times as RFC 3339 with the zone: naive store times are UTC."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat().replace("+00:00", "Z")


def iso_date(value: Any) -> Any:
    """Dates are ISO 8601 text 'YYYY-MM-DD' only (never a number)."""
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("a date is ISO 8601 text YYYY-MM-DD")
    return value


IsoDate = Annotated[date, BeforeValidator(iso_date)]
UtcDatetime = Annotated[datetime, PlainSerializer(utc_text, return_type=str, when_used="json")]
PastDatetime = Annotated[datetime, BeforeValidator(iso_time), AfterValidator(check_past)]
_NAME_PATTERN = "^[A-Za-z0-9_.-]{1,64}$"  # the rule of _SITE_RE / _TASK_RE, in the OpenAPI document too
SiteId = Annotated[str, Field(min_length=1, max_length=64, pattern=_NAME_PATTERN), AfterValidator(check_site)]
TaskName = Annotated[str, Field(min_length=1, max_length=64, pattern=_NAME_PATTERN), AfterValidator(check_task)]
SubjectId = Annotated[int, Strict(), Field(ge=0, le=ID_MAX)]  # a JSON integer (paths: `plain_int`)
Number = Annotated[float, Strict()]  # JSON numbers only: true, false and "3" are refused


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- input: MEDS events --------------------------------------------------------------------


class MedsEvent(_Strict):
    """One MEDS event of the patient being scored (time null for static facts such as sex)."""

    subject_id: SubjectId | None = Field(None, description="optional; a request carries one patient")
    time: PastDatetime | None = None
    code: str = Field(min_length=3, max_length=128, examples=["LOINC//4548-4"],
                      json_schema_extra={"pattern": CODE_PATTERN})
    numeric_value: Number | None = Field(None, description="in the canonical unit of the code (data/codes.py)")
    text_value: str | None = Field(None, max_length=256)

    @field_validator("code")
    @classmethod
    def _code_known(cls, value: str) -> str:
        return check_code(value)

    @field_validator("numeric_value")
    @classmethod
    def _plausible(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        code = info.data.get("code") or ""
        m = vocab.MEASUREMENT_BY_CODE.get(code)
        if m is not None:
            lo, hi = m.plausible
            if not lo <= value <= hi:
                raise ValueError(
                    f"{value:g} {m.unit} is impossible for {m.display} (accepted {lo:g}-{hi:g} {m.unit})"
                )
        if code.startswith("RXNORM//") and not 0 <= value <= 400:
            raise ValueError("a medication request's numeric_value is days supplied (0-400)")
        return value

    @model_validator(mode="after")
    def _birth_dated(self) -> MedsEvent:
        if self.code == vocab.BIRTH and self.time is None:
            raise ValueError("MEDS_BIRTH needs a time (the birth date)")
        return self


# -- input: FHIR R4 -------------------------------------------------------------------------


class FhirEntry(BaseModel):
    """A bundle entry; the resource is checked by the FHIR converter (per resource, with reasons)."""

    model_config = ConfigDict(extra="allow")

    fullUrl: str | None = Field(None, max_length=512)
    resource: dict[str, Any]

    @field_validator("resource")
    @classmethod
    def _resource_type(cls, value: dict[str, Any]) -> dict[str, Any]:
        rtype = value.get("resourceType")
        if not isinstance(rtype, str) or not rtype:
            raise ValueError("resource needs a resourceType")
        return value


class FhirBundle(BaseModel):
    """A FHIR R4 Bundle holding one patient (transaction or collection, Synthea-shaped)."""

    model_config = ConfigDict(extra="allow")

    resourceType: Literal["Bundle"]
    type: Literal["transaction", "collection", "batch", "searchset", "document"] | None = None
    entry: list[FhirEntry] = Field(default_factory=list, max_length=MAX_FHIR_ENTRIES)


# -- /score ---------------------------------------------------------------------------------


class ScoreRequest(_Strict):
    """A patient to score: exactly one of `events` (MEDS rows), `fhir` (a bundle) or `features`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": [given], "properties": {other: {"type": "null"} for other in ("events", "fhir", "features")
                                             if other != given}}
        for given in ("events", "fhir", "features")
    ]})

    prediction_time: PastDatetime | None = Field(None, description="default: now")
    site: SiteId | None = Field(None, description="default: the caller's site")
    tasks: list[TaskName] | None = Field(None, max_length=16, description="default: every served task")
    events: list[MedsEvent] | None = Field(None, max_length=MAX_EVENTS)
    fhir: FhirBundle | None = None
    features: dict[str, Number | None] | None = Field(
        None, description="ready-made features by name (missing ones are treated as not measured)"
    )
    explain: bool = Field(True, strict=True)
    top_k: int = Field(5, ge=1, le=20, strict=True)

    @field_validator("features")
    @classmethod
    def _features_finite(cls, value: dict[str, float | None] | None):
        if value is None:
            return value
        if len(value) > MAX_FEATURES:
            raise ValueError(f"at most {MAX_FEATURES} features")
        if max(map(len, value), default=0) > 200:
            raise ValueError("a feature name is at most 200 characters")
        # one C-speed sum of the non-zero values: NaN or inf in it (or an overflow) means a closer look
        if math.isfinite(sum(filter(None, value.values()))):
            return value
        for name, v in value.items():
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name[:60]}: must be a finite number or null")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ScoreRequest:
        given = [n for n in ("events", "fhir", "features") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of events, fhir or features")
        if self.events is not None:
            ids = {e.subject_id for e in self.events if e.subject_id is not None}
            if len(ids) > 1:
                raise ValueError("events: one patient per request (several subject_id values)")
        return self


class Factor(BaseModel):
    feature: str
    display: str | None = None
    value: float | None = None
    unit: str | None = None
    date: str | None = None
    direction: str | None = None
    contribution: float | None = None
    text: str | None = None


class TaskScore(BaseModel):
    task: str
    eligible: bool
    reason: str | None = None
    risk: float | None = None
    tier: Tier | None = None
    factors: list[Factor] | None = None
    model_name: str | None = None
    model_version: str | None = None


class ScoreResponse(BaseModel):
    prediction_time: UtcDatetime
    site: str | None
    results: list[TaskScore]


# -- /patients ------------------------------------------------------------------------------


class StoredScore(BaseModel):
    task: str
    prediction_time: UtcDatetime
    risk: float
    tier: Tier
    model_name: str
    model_version: str
    scored_at: UtcDatetime
    factors: list[Factor] | None = None


class PatientTask(BaseModel):
    task: str
    latest: StoredScore
    trend: list[StoredScore]


class PatientResponse(BaseModel):
    subject_id: int
    site: str
    sex: str | None = None
    age: int | None = None
    age_band: str | None = None
    conditions: list[str] = Field(default_factory=list)
    consent_withdrawn_at: UtcDatetime | None = None
    tasks: list[PatientTask]


class WorklistRow(BaseModel):
    subject_id: int
    task: str
    prediction_time: UtcDatetime
    risk: float
    tier: Tier
    age_band: str | None = None
    sex: str | None = None
    conditions: list[str] = Field(default_factory=list)
    model_version: str


class WorklistResponse(BaseModel):
    site: str
    rows: list[WorklistRow]


# -- /cohort --------------------------------------------------------------------------------


def _known_conditions(schema: dict) -> None:
    """The OpenAPI document lists the condition names a cohort accepts (cohort.check_conditions checks them)."""
    from chronorisk.features.concepts import load_concepts

    schema["enum"] = sorted(load_concepts().condition_names())


class CohortQuery(_Strict):
    """Filters of a cohort; every given filter must hold (AND)."""

    task: TaskName
    sites: list[SiteId] | None = Field(None, max_length=500)
    prediction_time: IsoDate | None = Field(None, description="scores of this date; default the latest")
    tiers: list[Tier] | None = Field(None, max_length=3)
    min_risk: Number | None = Field(None, ge=0, le=1)
    age_bands: list[AgeBand] | None = Field(None, max_length=len(AGE_BANDS))
    sex: Sex | None = None
    conditions: list[Annotated[str, Field(min_length=1, max_length=64, json_schema_extra=_known_conditions)]] | None \
        = Field(None, max_length=20, description="condition names of the concept map, all required")
    limit: int = Field(1000, ge=1, le=100_000, strict=True)

    @field_validator("prediction_time")
    @classmethod
    def _not_future(cls, value: date | None) -> date | None:
        return check_past_date(value)


GroupDim = Literal["site", "tier", "age_band", "sex"]


class AggregateQuery(CohortQuery):
    group_by: list[GroupDim] = Field(default_factory=lambda: ["site", "tier"], min_length=1, max_length=4,
                                     json_schema_extra={"uniqueItems": True})

    @field_validator("group_by")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("name each dimension once")
        return value


class ExportQuery(CohortQuery):
    format: Literal["csv", "parquet"] = "csv"


class CohortRow(BaseModel):
    record_id: str = Field(description="random for this release only; never the store's subject id")
    site: str = Field(description="'*' when withheld for k-anonymity")
    task: str
    prediction_time: date
    risk: float = Field(description="rounded to 0.01")
    tier: str
    age_band: str | None = None
    sex: str | None = None
    conditions: str = Field(description="';'-joined condition names, '*' when withheld")
    model_name: str
    model_version: str


class Deidentification(BaseModel):
    k: int
    quasi_identifiers: list[str]
    generalized: list[str] = Field(description="generalizations applied, least first")
    suppressed_rows: str = Field(description="rows left out (in groups under k); '1-(k-1)' when few")
    record_id: str


class CohortResponse(BaseModel):
    query: dict[str, Any]
    prediction_time: UtcDatetime | None
    n: int
    truncated: bool
    model_versions: list[str]
    rows: list[CohortRow]
    deidentification: Deidentification


class AggregateCell(BaseModel):
    group: dict[str, str | None]
    count: int | None = Field(description="noisy count; null when suppressed (under the small-cell limit)")
    suppressed: bool


class PrivacyRelease(BaseModel):
    mechanism: str
    epsilon: float = Field(description="privacy cost of this release")
    noise_scale: float = Field(description="scale of the discrete Laplace noise on every count (1 / epsilon)")
    budget: float
    budget_days: int
    budget_left: float = Field(description="epsilon the caller may still spend in the period")


class AggregateResponse(BaseModel):
    query: dict[str, Any]
    prediction_time: UtcDatetime | None
    small_cell: int
    total: int | None = Field(description="sum of the noisy counts of every cell")
    cells: list[AggregateCell]
    model_versions: list[str]
    privacy: PrivacyRelease


# -- /consent -------------------------------------------------------------------------------


class ConsentWithdrawal(_Strict):
    subject_id: SubjectId
    site: SiteId | None = Field(None, description="default: every site (a GP: their own site)")


class ConsentResponse(BaseModel):
    withdrawn_at: UtcDatetime
    site: str | None


class ConsentRenewalResponse(BaseModel):
    renewed_at: UtcDatetime
    site: str | None


class FactorsResponse(BaseModel):
    task: str
    prediction_time: UtcDatetime
    factors: list[Factor]
    model_version: str
    computed: Literal["stored", "on demand"]
    scored_by: str | None = None


class WhoAmI(BaseModel):
    key_id: str
    role: str
    site: str | None


class ErrorItem(BaseModel):
    field: str
    problem: str


class ErrorResponse(BaseModel):
    error: str
    fields: list[ErrorItem] = Field(default_factory=list)


ERROR_MEANINGS = {
    400: "the request cannot be handled as sent (e.g. a Content-Length that is not a number)",
    401: "no valid API key or session",
    403: "the caller's role may not do this",
    404: "no such patient (also for another site's patient) or score",
    409: "conflicts with the patient's state (consent withdrawn, cannot explain)",
    410: "the patient withdrew consent: no risk or factors are shown",
    413: "the body is larger than serve.max_payload_mb",
    422: "invalid input: `fields` names each bad field and the problem",
    429: "too many failed keys from this address, a locked key, or a spent privacy budget (Retry-After)",
    503: "the service is starting, or no model is loaded for the task",
}


def error_responses(*extra: int) -> dict[int, dict]:
    """The OpenAPI `responses` of a keyed route: every error is an ErrorResponse body."""
    codes = sorted({400, 401, 403, 422, 429, *extra})
    return {code: {"model": ErrorResponse, "description": ERROR_MEANINGS[code]} for code in codes}


def field_path(loc: tuple | list) -> str:
    """('body', 'events', 3, 'numeric_value') -> 'events[3].numeric_value'."""
    out = ""
    for part in loc:
        if part in ("body",) and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


# -- CDS Hooks 2.0 --------------------------------------------------------------------------


class CdsContext(BaseModel):
    """The `patient-view` hook's context (other fields a client sends are kept, not read)."""

    model_config = ConfigDict(extra="allow")

    userId: str = Field(min_length=1, max_length=256, description="PractitionerRole/123 or Practitioner/abc")
    patientId: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9\-.]{1,64}$",
                           description="the FHIR id of the patient in view")
    encounterId: str | None = Field(None, max_length=64)


class CdsRequest(BaseModel):
    """A CDS Hooks call: the hook, its instance, context and (optionally) prefetched FHIR resources."""

    model_config = ConfigDict(extra="allow")

    hook: Literal["patient-view"]
    hookInstance: str = Field(min_length=1, max_length=128)
    fhirServer: str | None = Field(None, max_length=2048)
    context: CdsContext
    prefetch: dict[str, dict[str, Any] | None] | None = None


class CdsFeedbackItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    card: str = Field(min_length=1, max_length=128, description="the card's uuid")
    outcome: Literal["accepted", "overridden"]
    outcomeTimestamp: datetime
    overrideReason: dict[str, Any] | None = None


class CdsFeedback(BaseModel):
    model_config = ConfigDict(extra="allow")

    feedback: list[CdsFeedbackItem] = Field(min_length=1, max_length=100)


# -- what-if --------------------------------------------------------------------------------


WhatIfName = Literal["hba1c", "sbp", "ldl", "bmi", "smoking", "statin", "antihypertensive"]


class WhatIfRequest(_Strict):
    """Recent values to change for the model's estimate (numbers in the measurement's unit, or in the unit
    `units` names; smoking and the two drug classes 1 = yes / 0 = no)."""

    task: TaskName
    changes: dict[WhatIfName, float] = Field(min_length=1, max_length=7)
    units: dict[WhatIfName, Annotated[str, Field(min_length=1, max_length=32)]] | None = Field(
        None, description="the unit of a value given in another unit than the model's, e.g. {ldl: mmol/L, "
        "hba1c: mmol/mol} (converted with the ingestion's units table)")
    site: SiteId | None = None
