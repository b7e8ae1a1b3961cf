"""FHIR R4 resources -> MEDS rows: pure functions, one per resource type.

A converter returns the rows of one resource or raises `Rejected` with a
short category (counted in the report) and a detail (written to the
quarantine beside the raw record). A resource is converted whole or not at
all: no half-converted observation reaches MEDS.

Rows are tuples `(subject_id, time_us, code, numeric_value, text_value, org)`,
`time_us` microseconds since 1970-01-01 UTC (None for static facts) and `org`
a normalized Organization key used to place the patient at a site, never
written to MEDS: on an encounter row its serviceProvider; on the birth row the
Patient's managingOrganization, else the bundle's only Organization (the
fallback for patients without encounters).

Mapping (codes and units from `chronorisk.data.codes`):

- Patient: `MEDS_BIRTH` at birthDate; `GENDER//F|M` static (gender `other`
  or `unknown` writes no sex row, counted as a note); `MEDS_DEATH` at
  deceasedDateTime (deceasedBoolean without a date: no row, counted as a note).
  Names, addresses, telecom and identifiers are never read.
- Encounter: `ENCOUNTER//<class code>` at period.start.
- Condition: the first coding in a known vocabulary at onsetDateTime, else
  onsetPeriod.start, else recordedDate.
- Observation (effectiveDateTime, else effectivePeriod.start, effectiveInstant,
  issued): valueQuantity of a code in `MEASUREMENTS` is converted to the
  canonical unit and checked against the plausible range; any other code keeps
  its number as sent, NOT unit-normalized (its unit is not stored).
  valueCodeableConcept -> text_value `VOCAB//code` (smoking 72166-2 ->
  `SNOMED//...`); valueString -> text_value as sent; valueBoolean -> 1/0;
  valueInteger -> number. Components (BP panel 55284-4 -> 8480-6 and 8462-4)
  become one event each under the component's code; the panel code itself is
  not written. Components without a value are skipped (counted as a note).
- MedicationRequest: `RXNORM//<code>` (or the first known vocabulary) at
  authoredOn, numeric_value = dispenseRequest.expectedSupplyDuration in days
  (null when absent).
- Codes keep their vocabulary (`VOCAB_BY_SYSTEM`); measurement aliases map to
  the measurement's canonical code (serum creatinine 2160-0 -> 38483-4).
- Dates: FHIR date / dateTime; partial dates take the first day of the period;
  times with an offset are converted to UTC, times without one are taken as UTC.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, date, datetime

from chronorisk.data.codes import (
    BIRTH,
    DEATH,
    ENCOUNTER_PREFIX,
    MEASUREMENT_BY_CODE,
    SEX_FEMALE,
    SEX_MALE,
    VOCAB_BY_SYSTEM,
)
from chronorisk.data.pseudonym import Pseudonymizer

Row = tuple[int, int | None, str, float | None, str | None, str | None]

SITE_IDENTIFIER_SYSTEM = "urn:chronorisk:site"
CORE_TYPES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DATE = date(1970, 1, 1)
_US_PER_DAY = 86_400_000_000
_FLOAT32_MAX = 3.4028234e38
_FHIR_DATETIME = re.compile(
    r"\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_ACCEPTED_SYSTEMS = ", ".join(sorted(VOCAB_BY_SYSTEM))
# Supply duration units (UCUM codes and common spellings) -> days. A month is 30 days.
_DAYS_PER_UNIT = {
    "d": 1.0, "day": 1.0, "days": 1.0,
    "wk": 7.0, "week": 7.0, "weeks": 7.0,
    "mo": 30.0, "month": 30.0, "months": 30.0,
    "a": 365.0, "year": 365.0, "years": 365.0,
    "h": 1 / 24, "hour": 1 / 24, "hours": 1 / 24,
}
_VOID_STATUSES = {"entered-in-error", "cancelled", "refuted"}
_UNITS_BY_CODE = {code: frozenset(m.units()) for code, m in MEASUREMENT_BY_CODE.items()}
_UNSUPPORTED_VALUES = (
    "valueRange", "valueRatio", "valueSampledData", "valueTime", "valueDateTime", "valuePeriod",
    "valueAttachment", "valueReference",
)


class Rejected(Exception):
    """A resource that cannot be converted: `category` for counts, `detail` for the quarantine."""

    def __init__(self, category: str, detail: str):
        self.category = category
        self.detail = detail
        super().__init__(f"{category}: {detail}")


class BundleContext:
    """What converting one file's resources needs: the key, reference maps, caches.

    `patient_urls` maps a bundle entry's fullUrl to the Patient's logical id
    (transaction bundles reference patients by `urn:uuid:` fullUrl);
    `medications` maps fullUrl / `Medication/<id>` to the Medication's code.
    """

    __slots__ = (
        "_times", "bundle_org", "displays", "medications", "notes", "patient_urls", "pseudonymizer", "subjects",
    )

    def __init__(self, pseudonymizer: Pseudonymizer, displays: dict[str, str], notes: dict[str, int]):
        self.pseudonymizer = pseudonymizer
        self.displays = displays
        self.notes = notes
        self.patient_urls: dict[str, str] = {}
        self.medications: dict[str, dict] = {}
        self.bundle_org: str | None = None  # the key of the bundle's only Organization, if exactly one
        self.subjects: dict[str, int] = {}  # reference string -> subject id, within one bundle / file
        self._times: dict[str, int] = {}

    def reset_bundle(self) -> None:
        self.patient_urls = {}
        self.medications = {}
        self.bundle_org = None
        self.subjects = {}
        if len(self._times) > 100_000:
            self._times = {}

    def note(self, key: str) -> None:
        self.notes[key] = self.notes.get(key, 0) + 1

    def time(self, value: object, field: str) -> int:
        """Microseconds since the epoch (UTC) of a FHIR date or dateTime; Rejected if unparseable."""
        if isinstance(value, str):
            hit = self._times.get(value)
            if hit is not None:
                return hit
        us = parse_time(value, field)
        self._times[value] = us  # type: ignore[index]
        return us


# ---------------------------------------------------------------- primitives


def parse_time(value: object, field: str) -> int:
    """FHIR date/dateTime -> microseconds since 1970-01-01 UTC.

    Partial dates (`2019`, `2019-05`) take the first day; an offset is applied
    (stored times are UTC); a time without an offset is taken as UTC.
    """
    if not isinstance(value, str) or not _FHIR_DATETIME.fullmatch(value):
        raise Rejected("bad_date", f"{field}: {value!r} is not a FHIR date or dateTime")
    try:
        if len(value) <= 10:
            y = int(value[:4])
            m = int(value[5:7]) if len(value) >= 7 else 1
            d = int(value[8:10]) if len(value) == 10 else 1
            return (date(y, m, d) - _EPOCH_DATE).days * _US_PER_DAY
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise Rejected("bad_date", f"{field}: {value!r} is not a valid date") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def pick_code(concept: object, field: str, ctx: BundleContext | None = None) -> str:
    """`VOCAB//code` of the first coding in a known vocabulary; Rejected if none."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not codings or not isinstance(codings, list):
        raise Rejected("no_code", f"{field} has no coding")
    for coding in codings:
        if not isinstance(coding, dict):
            continue
        vocab = VOCAB_BY_SYSTEM.get(coding.get("system"))  # type: ignore[arg-type]
        value = coding.get("code")
        if vocab is not None and isinstance(value, str) and value:
            code = f"{vocab}//{value}"
            if ctx is not None and code not in ctx.displays:
                display = coding.get("display")
                ctx.displays[code] = display if isinstance(display, str) else ""
            return code
    systems = sorted({str(c.get("system")) for c in codings if isinstance(c, dict)})
    raise Rejected(
        "unknown_code_system",
        f"{field}: no coding in a known system (got {', '.join(systems) or 'none'}); accepted: {_ACCEPTED_SYSTEMS}",
    )


def reference_target(reference: object, expected_type: str) -> tuple[str, str] | None:
    """(kind, value) of a FHIR reference string: ('url', fullUrl) or ('id', logical id).

    Returns None when the reference is not a string or is a contained (`#x`)
    or conditional (`Type?query`) reference. Raises Rejected when it points at
    another resource type than `expected_type`.
    """
    if not isinstance(reference, str) or not reference or reference.startswith("#"):
        return None
    if reference.startswith(("urn:uuid:", "urn:oid:")):
        return ("url", reference)
    if "?" in reference:
        return None
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) < 2:
        return None
    rtype, rid = parts[-2], parts[-1]
    if rtype != expected_type:
        raise Rejected("bad_reference", f"reference points at a {rtype}, not a {expected_type}")
    return ("id", rid)


def subject_of(resource: dict, ctx: BundleContext, key: str = "subject") -> int:
    """The pseudonymous subject id of the patient a resource is about; Rejected if none."""
    ref = resource.get(key)
    if ref is None and key == "subject":
        ref = resource.get("patient")
    if not isinstance(ref, dict):
        raise Rejected("no_subject", f"no {key} reference")
    reference = ref.get("reference")
    hit = ctx.subjects.get(reference) if isinstance(reference, str) else None
    if hit is not None:  # a bundle repeats one reference hundreds of times
        return hit
    target = reference_target(reference, "Patient")
    if target is None:
        raise Rejected("no_subject", f"{key} has no resolvable Patient reference (contained, conditional or missing)")
    kind, value = target
    if kind == "url":
        value = ctx.patient_urls.get(value) or value.rsplit(":", 1)[-1]
    subject = ctx.pseudonymizer.subject_id(value)
    if len(ctx.subjects) >= 100_000:  # NDJSON files reference many patients: keep memory bounded
        ctx.subjects.clear()
    ctx.subjects[reference] = subject
    return subject


def org_key(reference: object) -> str | None:
    """Normalized key of an Organization reference (`id:<id>` or `identifier:<sys>|<value>`)."""
    if not isinstance(reference, str) or not reference:
        return None
    if reference.startswith("Organization?"):
        query = reference.split("?", 1)[1]
        for part in query.split("&"):
            if part.startswith("identifier="):
                return "identifier:" + part[len("identifier="):]
        return None
    if reference.startswith(("urn:uuid:", "urn:oid:")):
        return "id:" + reference.rsplit(":", 1)[-1]
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == "Organization":
        return "id:" + parts[-1]
    return None


def slugify(text: str) -> str:
    """A site id from a name: ASCII lower case, runs of other characters -> '_'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[:64]


def organization_site(resource: dict, full_url: str | None = None) -> tuple[list[str], str | None]:
    """(reference keys, site id) of an Organization.

    The site is the value of its identifier with system `urn:chronorisk:site`
    (what the generator writes), else its name slugified, else None.
    """
    keys: list[str] = []
    rid = resource.get("id")
    if isinstance(rid, str) and rid:
        keys.append("id:" + rid)
    if isinstance(full_url, str) and full_url.startswith(("urn:uuid:", "urn:oid:")):
        keys.append("id:" + full_url.rsplit(":", 1)[-1])
    site = None
    identifiers = resource.get("identifier")
    if isinstance(identifiers, dict):  # one identifier where FHIR has a list: read it all the same
        identifiers = [identifiers]
    for ident in identifiers if isinstance(identifiers, list) else ():
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        system, value = ident.get("system"), ident["value"]
        keys.append(f"identifier:{system}|{value}" if system else f"identifier:{value}")
        keys.append(f"identifier:{value}")
        if system == SITE_IDENTIFIER_SYSTEM and site is None:
            site = slugify(value) or None
    if site is None and isinstance(resource.get("name"), str):
        site = slugify(resource["name"]) or None
    return keys, site


def _status_check(resource: dict, rtype: str) -> None:
    status = resource.get("status")
    if isinstance(status, str) and status in _VOID_STATUSES:
        raise Rejected("void_status", f"{rtype} status is {status!r}")


# ---------------------------------------------------------------- values


def _quantity_row(code: str, quantity: object, where: str) -> tuple[str, float]:
    """(code, numeric value) of a valueQuantity, canonical when the code is a known measurement."""
    if not isinstance(quantity, dict):
        raise Rejected("bad_value", f"{where}: valueQuantity is not an object")
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected("bad_value", f"{where}: valueQuantity.value {value!r} is not a number")
    measurement = MEASUREMENT_BY_CODE.get(code)
    if measurement is None:
        number = float(value)
    else:
        ucum, unit = quantity.get("code"), quantity.get("unit")
        accepted = _UNITS_BY_CODE[code]
        chosen = ucum if ucum in accepted else unit if unit in accepted else None
        if chosen is None:
            sent = ucum if ucum is not None else unit
            if sent is None:
                raise Rejected(
                    "no_unit",
                    f"{where}: {measurement.display} has no unit; accepted: {', '.join(measurement.units())}",
                )
            raise Rejected(
                "unit_not_convertible",
                f"{where}: unit {sent!r} for {measurement.display} cannot be converted; "
                f"accepted: {', '.join(measurement.units())}",
            )
        number = measurement.to_canonical(float(value), chosen)
        low, high = measurement.plausible
        if not low <= number <= high:
            raise Rejected(
                "implausible_value",
                f"{where}: {measurement.display} {number:g} {measurement.unit} is outside the plausible "
                f"range [{low:g}, {high:g}]",
            )
        code = measurement.code
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise Rejected("bad_value", f"{where}: value {number!r} does not fit a float32")
    return code, number


def _value_row(
    code: str, holder: dict, subject: int, time_us: int, where: str, ctx: BundleContext
) -> Row | None:
    """The row of `holder`'s value[x] (an observation or a component); None if it has no value."""
    quantity = holder.get("valueQuantity")
    if quantity is not None:
        out_code, number = _quantity_row(code, quantity, where)
        return (subject, time_us, out_code, number, None, None)
    concept = holder.get("valueCodeableConcept")
    if concept is not None:
        return (subject, time_us, code, None, pick_code(concept, f"{where}.valueCodeableConcept", ctx), None)
    text = holder.get("valueString")
    if text is not None:
        if not isinstance(text, str):
            raise Rejected("bad_value", f"{where}: valueString is not a string")
        return (subject, time_us, code, None, text, None)
    flag = holder.get("valueBoolean")
    if flag is not None:
        if not isinstance(flag, bool):
            raise Rejected("bad_value", f"{where}: valueBoolean is not a boolean")
        return (subject, time_us, code, 1.0 if flag else 0.0, None, None)
    integer = holder.get("valueInteger")
    if integer is not None:
        if isinstance(integer, bool) or not isinstance(integer, int):
            raise Rejected("bad_value", f"{where}: valueInteger is not an integer")
        return (subject, time_us, code, float(integer), None, None)
    for key in _UNSUPPORTED_VALUES:
        if key in holder:
            raise Rejected("unsupported_value", f"{where}: {key} is not supported")
    return None


# ---------------------------------------------------------------- resources


def patient_rows(resource: dict, ctx: BundleContext, full_url: str | None = None) -> list[Row]:
    source_id = resource.get("id")
    if not isinstance(source_id, str) or not source_id:
        if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
            source_id = full_url.rsplit(":", 1)[-1]
        else:
            raise Rejected("no_id", "Patient has no id")
    subject = ctx.pseudonymizer.subject_id(source_id)
    birth = resource.get("birthDate")
    if birth is None:
        raise Rejected("no_time", "Patient has no birthDate")
    managing = resource.get("managingOrganization")
    org = (org_key(managing.get("reference")) if isinstance(managing, dict) else None) or ctx.bundle_org
    rows: list[Row] = [(subject, ctx.time(birth, "birthDate"), BIRTH, None, None, org)]
    gender = resource.get("gender")
    if gender == "female":
        rows.append((subject, None, SEX_FEMALE, None, None, None))
    elif gender == "male":
        rows.append((subject, None, SEX_MALE, None, None, None))
    else:
        ctx.note(f"Patient: gender {gender if isinstance(gender, str) else 'missing'} (no GENDER row)")
    death = resource.get("deceasedDateTime")
    if death is not None:
        rows.append((subject, ctx.time(death, "deceasedDateTime"), DEATH, None, None, None))
    elif resource.get("deceasedBoolean") is True:
        ctx.note("Patient: deceasedBoolean without a date (no MEDS_DEATH row)")
    return rows


def encounter_rows(resource: dict, ctx: BundleContext) -> list[Row]:
    _status_check(resource, "Encounter")
    subject = subject_of(resource, ctx)
    cls = resource.get("class")
    if isinstance(cls, list):  # R5 shape: list of CodeableConcept
        cls = next(iter(cls[0].get("coding") or ()), None) if cls and isinstance(cls[0], dict) else None
    code = cls.get("code") if isinstance(cls, dict) else None
    if not isinstance(code, str) or not code:
        raise Rejected("no_code", "Encounter has no class code")
    period = resource.get("period")
    start = period.get("start") if isinstance(period, dict) else None
    if start is None:
        raise Rejected("no_time", "Encounter has no period.start")
    provider = resource.get("serviceProvider")
    org = org_key(provider.get("reference")) if isinstance(provider, dict) else None
    return [(subject, ctx.time(start, "period.start"), ENCOUNTER_PREFIX + code, None, None, org)]


def condition_rows(resource: dict, ctx: BundleContext) -> list[Row]:
    verification = resource.get("verificationStatus")
    for coding in (verification.get("coding") or ()) if isinstance(verification, dict) else ():
        if isinstance(coding, dict) and isinstance(coding.get("code"), str) and coding["code"] in _VOID_STATUSES:
            raise Rejected("void_status", f"Condition verificationStatus is {coding.get('code')!r}")
    subject = subject_of(resource, ctx)
    code = pick_code(resource.get("code"), "code", ctx)
    onset_period = resource.get("onsetPeriod")
    for field, value in (
        ("onsetDateTime", resource.get("onsetDateTime")),
        ("onsetPeriod.start", onset_period.get("start") if isinstance(onset_period, dict) else None),
        ("recordedDate", resource.get("recordedDate")),
    ):
        if value is not None:
            return [(subject, ctx.time(value, field), code, None, None, None)]
    raise Rejected("no_time", "Condition has no onsetDateTime, onsetPeriod.start or recordedDate")


def _observation_time(resource: dict, ctx: BundleContext) -> int:
    value = resource.get("effectiveDateTime")
    if value is not None:
        return ctx.time(value, "effectiveDateTime")
    period = resource.get("effectivePeriod")
    if isinstance(period, dict) and period.get("start") is not None:
        return ctx.time(period["start"], "effectivePeriod.start")
    for field in ("effectiveInstant", "issued"):
        if resource.get(field) is not None:
            return ctx.time(resource[field], field)
    raise Rejected("no_time", "Observation has no effectiveDateTime, effectivePeriod.start, effectiveInstant or issued")


def observation_rows(resource: dict, ctx: BundleContext) -> list[Row]:
    _status_check(resource, "Observation")
    subject = subject_of(resource, ctx)
    code = pick_code(resource.get("code"), "code", ctx)
    time_us = _observation_time(resource, ctx)
    rows: list[Row] = []
    row = _value_row(code, resource, subject, time_us, "value", ctx)
    if row is not None:
        rows.append(row)
    components = resource.get("component")
    if components:
        if not isinstance(components, list):
            raise Rejected("bad_value", "component is not a list")
        for i, component in enumerate(components):
            if not isinstance(component, dict):
                raise Rejected("bad_value", f"component[{i}] is not an object")
            where = f"component[{i}]"
            component_code = pick_code(component.get("code"), f"{where}.code", ctx)
            row = _value_row(component_code, component, subject, time_us, where, ctx)
            if row is None:
                ctx.note("Observation: component without a value (skipped)")
            else:
                rows.append(row)
    if not rows:
        raise Rejected("no_value", "Observation has no value and no component with a value")
    return rows


def _supply_days(request: dict) -> float | None:
    dispense = request.get("dispenseRequest")
    duration = dispense.get("expectedSupplyDuration") if isinstance(dispense, dict) else None
    if duration is None:
        return None
    value = duration.get("value") if isinstance(duration, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise Rejected("bad_value", f"expectedSupplyDuration.value {value!r} is not a non-negative number")
    unit = duration.get("code") or duration.get("unit")
    factor = _DAYS_PER_UNIT.get(unit) if isinstance(unit, str) else None
    if factor is None:
        raise Rejected(
            "unit_not_convertible",
            f"expectedSupplyDuration unit {unit!r} cannot be converted to days; accepted: "
            f"{', '.join(_DAYS_PER_UNIT)}",
        )
    return float(value) * factor


def _medication_code(resource: dict, ctx: BundleContext) -> str:
    concept = resource.get("medicationCodeableConcept")
    if concept is not None:
        return pick_code(concept, "medicationCodeableConcept", ctx)
    ref = resource.get("medicationReference")
    target = ref.get("reference") if isinstance(ref, dict) else None
    if isinstance(target, str) and target.startswith("#"):
        contained_list = resource.get("contained")
        for contained in contained_list if isinstance(contained_list, list) else ():
            if isinstance(contained, dict) and contained.get("id") == target[1:]:
                return pick_code(contained.get("code"), "contained Medication.code", ctx)
    elif isinstance(target, str) and target in ctx.medications:
        return pick_code(ctx.medications[target], "Medication.code", ctx)
    raise Rejected(
        "no_code",
        "MedicationRequest has no medicationCodeableConcept and its medicationReference "
        "does not resolve to a Medication contained or in the same bundle",
    )


def medication_request_rows(resource: dict, ctx: BundleContext) -> list[Row]:
    _status_check(resource, "MedicationRequest")
    subject = subject_of(resource, ctx)
    code = _medication_code(resource, ctx)
    authored = resource.get("authoredOn")
    if authored is None:
        raise Rejected("no_time", "MedicationRequest has no authoredOn")
    return [(subject, ctx.time(authored, "authoredOn"), code, _supply_days(resource), None, None)]


CONVERTERS: dict[str, Callable[[dict, BundleContext], list[Row]]] = {
    "Patient": patient_rows,
    "Encounter": encounter_rows,
    "Condition": condition_rows,
    "Observation": observation_rows,
    "MedicationRequest": medication_request_rows,
}


def subject_if_any(resource: dict, ctx: BundleContext) -> int | None:
    """The subject of any resource (skipped types too) for per-site counts; None if none."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return ctx.pseudonymizer.subject_id(rid) if isinstance(rid, str) and rid else None
    for key in ("subject", "patient", "beneficiary"):
        if key in resource:
            try:
                return subject_of(resource, ctx, key)
            except Rejected:
                return None
    return None
