"""FHIR R4 resources -> MEDS rows: pure functions, one per resource type.

A converter returns the rows of one resource or raises `Rejected` with a
short category (counted in the report) and a detail (written to the
quarantine beside the raw record). An observation's parts (its own value and
each component) convert independently: the parts that convert are kept, each
part that does not is left in `BundleContext.partial` (quarantined alone,
named); only when no part converts is the observation rejected whole.
`bundle_rows` converts one in-memory Bundle (what serving needs).

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
  A text value (valueString, or a code) over `max_text_bytes` is rejected.
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
    accepted_spellings,
    unit_of_spelling,
)
from chronorisk.data.pseudonym import Pseudonymizer
from chronorisk.data.time_bounds import bounds_us

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
DEFAULT_MAX_TEXT_BYTES = 64 * 1024  # params.yaml ingest.max_text_kib
_UNITS_BY_CODE = {code: frozenset(m.units()) for code, m in MEASUREMENT_BY_CODE.items()}
_UNSUPPORTED_VALUES = (
    "valueRange", "valueRatio", "valueSampledData", "valueTime", "valueDateTime", "valuePeriod",
    "valueAttachment", "valueReference",
)


class Rejected(Exception):
    """A resource (or, with `part`, one component of it) that cannot be converted: `category` for
    counts, `detail` for the quarantine."""

    def __init__(self, category: str, detail: str, part: str | None = None):
        self.category = category
        self.detail = detail
        self.part = part
        super().__init__(f"{category}: {detail}")


class BundleContext:
    """What converting one file's resources needs: the key, reference maps, caches.

    `patient_urls` maps a bundle entry's fullUrl to the Patient's logical id
    (transaction bundles reference patients by `urn:uuid:` fullUrl);
    `patient_ids` holds the logical ids of the bundle's Patients: a subject
    must be one of them. For bulk-export NDJSON (`reset_export`) a subject must
    be a Patient of the export's files (`export_patients`) instead.
    `medications` maps fullUrl / `Medication/<id>` to the Medication's code.
    `partial` collects the components a converter left out (one `Rejected`
    each, with `part` naming the component) while converting the rest.
    """

    __slots__ = (
        "_times", "bundle_org", "displays", "earliest_us", "export_patients", "latest_us", "max_text_bytes",
        "medications", "notes", "partial", "patient_ids", "patient_urls", "pseudonymizer", "subjects",
    )

    def __init__(self, pseudonymizer: Pseudonymizer, displays: dict[str, str], notes: dict[str, int],
                 max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES):
        self.pseudonymizer = pseudonymizer
        self.displays = displays
        self.notes = notes
        self.max_text_bytes = max_text_bytes
        self.patient_urls: dict[str, str] = {}
        self.patient_ids: set[str] | None = None  # set by index_bundle: a subject must be one of them
        self.export_patients: frozenset[str] | None = None  # set by reset_export (None: not checked)
        self.medications: dict[str, dict] = {}
        self.bundle_org: str | None = None  # the key of the bundle's only Organization, if exactly one
        self.subjects: dict[str, int] = {}  # reference string -> subject id, within one bundle / file
        self.partial: list[Rejected] = []
        self._times: dict[str, int] = {}
        # accepted dates (data/time_bounds.py: 1900 to now plus a day), read again at each bundle: a context
        # may live for days (the device stream's), and "now" must move with it
        self.earliest_us, self.latest_us = bounds_us()

    def reset_bundle(self) -> None:
        """Forget the previous bundle (subjects are not checked until `index_bundle` or `reset_export`)."""
        self.patient_urls = {}
        self.patient_ids = None
        self.export_patients = None
        self.medications = {}
        self.bundle_org = None
        self.subjects = {}
        self.earliest_us, self.latest_us = bounds_us()
        if len(self._times) > 100_000:
            self._times = {}

    def reset_export(self, export_patients: frozenset[str] | None) -> None:
        """Resolve subjects against the Patient ids of a bulk export's files (None: do not check)."""
        self.reset_bundle()
        self.export_patients = export_patients

    def note(self, key: str) -> None:
        self.notes[key] = self.notes.get(key, 0) + 1

    def time(self, value: object, field: str) -> int:
        """Microseconds since the epoch (UTC) of a FHIR date or dateTime; Rejected if unparseable or outside
        the accepted dates (before 1900, after now plus a day: `implausible_date`)."""
        if isinstance(value, str):
            hit = self._times.get(value)
            if hit is not None:
                return hit
        us = parse_time(value, field)
        if not self.earliest_us <= us <= self.latest_us:
            which = "is before 1900" if us < self.earliest_us else "is in the future"
            raise Rejected("implausible_date", f"{field}: {value!r} {which}; accepted 1900 to now")
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


def keep_display(displays: dict[str, str], code: str, display: str) -> None:
    """Record `display` for `code` if it is the one to keep: of the displays files give a code (Synthea's vary),
    the first in sort order that is not empty, whatever the order the files are read in."""
    seen = displays.get(code)
    if seen is None or (display and (not seen or display < seen)):
        displays[code] = display


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
            if ctx is not None:
                _check_text_size(value, f"{field} code", ctx.max_text_bytes)
            code = f"{vocab}//{value}"
            if ctx is not None:
                display = coding.get("display")
                display = display if isinstance(display, str) else ""
                if ctx.displays.get(code) != display:  # (nearly always equal: the rule only for another one)
                    keep_display(ctx.displays, code, display)
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
    if ctx.patient_ids is not None:  # a bundle: the Patient must be in it
        if kind == "url":  # an entry's fullUrl, else a urn:uuid: naming the Patient's id itself
            value = ctx.patient_urls.get(value) or value.rsplit(":", 1)[-1]
        if value not in ctx.patient_ids:
            raise Rejected("subject_not_in_bundle", f"subject not in bundle: {key} names no Patient of this bundle")
    else:
        value = (ctx.patient_urls.get(value) or value.rsplit(":", 1)[-1]) if kind == "url" else value
        if ctx.export_patients is not None and value not in ctx.export_patients:
            raise Rejected("subject_not_in_export",
                           f"subject not in export: {key} names no Patient of the export's files")
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
        chosen = unit_of_spelling(ucum)
        if chosen not in accepted:
            chosen = unit_of_spelling(unit)
        if chosen not in accepted:
            sent = ucum if ucum is not None else unit
            if sent is None:
                raise Rejected(
                    "no_unit",
                    f"{where}: {measurement.display} has no unit; accepted: {accepted_spellings(measurement)}",
                )
            raise Rejected(
                "unit_not_convertible",
                f"{where}: unit {sent!r} for {measurement.display} cannot be converted; "
                f"accepted: {accepted_spellings(measurement)}",
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


def _check_text_size(text: str, where: str, max_bytes: int) -> None:
    """Rejected when a text value is over `max_bytes` in UTF-8 (params.yaml ingest.max_text_kib)."""
    if len(text) * 4 <= max_bytes:  # a character is at most 4 bytes: no need to encode
        return
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise Rejected("text_too_long", f"{where} is {size:,} bytes, over the {max_bytes:,}-byte cap "
                                        "(ingest.max_text_kib)")


def _value_row(
    code: str, holder: dict, subject: int, time_us: int, where: str, ctx: BundleContext
) -> Row | None:
    """The row of `holder`'s value[x] (an observation or a component); None if it has no value."""
    quantity = holder.get("valueQuantity")
    if quantity is not None:
        out_code, number = _quantity_row(code, quantity, where)
        comparator = quantity.get("comparator")
        if comparator is not None:  # "<5.5": the bound is kept as the value, and counted (never silently)
            ctx.note(f"valueQuantity.comparator {str(comparator)[:8]!r}: the bound kept as the value ({out_code})")
        return (subject, time_us, out_code, number, None, None)
    concept = holder.get("valueCodeableConcept")
    if concept is not None:
        text = pick_code(concept, f"{where}.valueCodeableConcept", ctx)
        _check_text_size(text, f"{where}.valueCodeableConcept", ctx.max_text_bytes)
        return (subject, time_us, code, None, text, None)
    text = holder.get("valueString")
    if text is not None:
        if not isinstance(text, str):
            raise Rejected("bad_value", f"{where}: valueString is not a string")
        _check_text_size(text, f"{where}.valueString", ctx.max_text_bytes)
        return (subject, time_us, code, None, text, None)
    flag = holder.get("valueBoolean")
    if flag is not None:
        if not isinstance(flag, bool):
            raise Rejected("bad_value", f"{where}: valueBoolean is not a boolean")
        return (subject, time_us, code, 1.0 if flag else 0.0, None, None)
    integer = holder.get("valueInteger")
    if integer is not None:
        if isinstance(integer, bool) or not isinstance(integer, int | float) or integer != int(integer):
            raise Rejected("bad_value", f"{where}: valueInteger {str(integer)[:40]} is not an integer")
        if not -(2**31) <= integer < 2**31:  # FHIR's integer is a signed 32-bit number
            raise Rejected("bad_value", f"{where}: valueInteger {integer:.6g} is outside FHIR's integer range "
                                        "(-2,147,483,648 to 2,147,483,647)")
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
    bad: list[Rejected] = []
    try:
        row = _value_row(code, resource, subject, time_us, "value", ctx)
    except Rejected as exc:  # the observation's own value is one part; its components are the others
        bad.append(Rejected(exc.category, exc.detail, "value"))
        row = None
    if row is not None:
        rows.append(row)
    components = resource.get("component")
    if components:
        if not isinstance(components, list):
            raise Rejected("bad_value", "component is not a list")
        for i, component in enumerate(components):
            try:
                row = _component_row(component, i, subject, time_us, ctx)
            except Rejected as exc:
                bad.append(Rejected(exc.category, exc.detail, f"component[{i}]"))
                continue
            if row is None:
                ctx.note("Observation: component without a value (skipped)")
            else:
                rows.append(row)
    if not rows:
        if bad:  # nothing converted: the resource is quarantined whole, naming every bad component
            raise Rejected(bad[0].category, "; ".join(b.detail for b in bad))
        raise Rejected("no_value", "Observation has no value and no component with a value")
    ctx.partial.extend(bad)  # the good components are kept; each bad one is quarantined on its own
    return rows


def _component_row(component: object, i: int, subject: int, time_us: int, ctx: BundleContext) -> Row | None:
    where = f"component[{i}]"
    if not isinstance(component, dict):
        raise Rejected("bad_value", f"{where} is not an object")
    component_code = pick_code(component.get("code"), f"{where}.code", ctx)
    return _value_row(component_code, component, subject, time_us, f"{where} ({component_code})", ctx)


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
# Where `subject_if_any` looks for the patient of a resource of any type.
SUBJECT_KEYS = ("subject", "patient", "beneficiary")
# The types whose content conversion reads beyond those keys: the converted ones, and what `index_bundle`
# and site resolution read (Medication codes, Organizations). Ingestion need not build the rest whole.
READ_WHOLE = frozenset(CONVERTERS) | {"Medication", "Organization"}


def convert_resource(resource: dict, ctx: BundleContext, full_url: object = None) -> list[Row]:
    """Rows of one core resource (Rejected if it cannot be converted); the components left out of a
    resource that converts are in `ctx.partial` afterwards. KeyError if the type is not converted."""
    if ctx.partial:
        ctx.partial = []
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        return patient_rows(resource, ctx, full_url if isinstance(full_url, str) else None)
    return CONVERTERS[rtype](resource, ctx)  # type: ignore[index]


def index_bundle(entries: list, ctx: BundleContext) -> None:
    """Start a bundle: its Patients (fullUrl -> id, and the ids a subject must be one of), its Medications
    (fullUrl / `Medication/<id>` -> code) and its Organization when there is exactly one."""
    ctx.reset_bundle()
    ctx.patient_ids = set()
    org_keys: set[str] = set()
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        rtype = resource.get("resourceType")
        if rtype == "Patient":
            url, rid = entry.get("fullUrl"), resource.get("id")
            if not (isinstance(rid, str) and rid) and isinstance(url, str) and url.startswith("urn:uuid:"):
                rid = url.rsplit(":", 1)[-1]  # what patient_rows takes as the id
            if isinstance(rid, str) and rid:
                ctx.patient_ids.add(rid)  # type: ignore[union-attr]
                if isinstance(url, str) and url:
                    ctx.patient_urls[url] = rid
        elif rtype == "Medication":
            url, rid = entry.get("fullUrl"), resource.get("id")
            for key in (url, f"Medication/{rid}" if isinstance(rid, str) else None):
                if isinstance(key, str):
                    ctx.medications[key] = resource.get("code")
        elif rtype == "Organization":
            keys, _ = organization_site(resource, entry.get("fullUrl"))
            if keys:
                org_keys.add(keys[0])
    ctx.bundle_org = next(iter(org_keys)) if len(org_keys) == 1 else None


def bundle_rows(bundle: dict, ctx: BundleContext) -> tuple[list[Row], list[tuple[int, str, Rejected]]]:
    """One in-memory FHIR Bundle (dict) -> (rows, problems), the conversion `chronorisk ingest` applies.

    Rows of every Patient, Encounter, Condition, Observation and MedicationRequest that converts
    (other types are skipped); `problems` lists `(entry index, resource type, Rejected)` for each
    resource that does not, and for each component left out of a panel that does (`Rejected.part`
    names it). Duplicates (same type and id) are not removed here (ingestion removes them per patient).
    """
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    entries = entries if isinstance(entries, list) else []
    index_bundle(entries, ctx)
    rows: list[Row] = []
    problems: list[tuple[int, str, Rejected]] = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if rtype not in CONVERTERS:
            continue
        try:
            rows.extend(convert_resource(resource, ctx, entry.get("fullUrl")))  # type: ignore[union-attr]
        except Rejected as exc:
            problems.append((i, rtype, exc))  # type: ignore[arg-type]
            continue
        except Exception as exc:  # malformed shapes a converter did not foresee
            problems.append((i, rtype, Rejected("malformed", f"{type(exc).__name__} while converting "
                                                             "(unexpected structure)")))  # type: ignore[arg-type]
            continue
        problems.extend((i, rtype, part) for part in ctx.partial)  # type: ignore[misc]
    return rows, problems


def subject_if_any(resource: dict, ctx: BundleContext) -> int | None:
    """The subject of any resource (skipped types too) for per-site counts; None if none."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return ctx.pseudonymizer.subject_id(rid) if isinstance(rid, str) and rid else None
    for key in SUBJECT_KEYS:
        if key in resource:
            try:
                return subject_of(resource, ctx, key)
            except Rejected:
                return None
    return None
