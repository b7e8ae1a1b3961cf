"""FHIR resource -> MEDS rows: known answers on hand-built resources, plus property tests
on unit conversion, date parsing and the pseudonymous subject id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chronorisk.data.codes import MEASUREMENTS
from chronorisk.data.fhir.convert import (
    BundleContext,
    Rejected,
    condition_rows,
    encounter_rows,
    medication_request_rows,
    observation_rows,
    org_key,
    organization_site,
    parse_time,
    patient_rows,
    slugify,
    subject_if_any,
)
from chronorisk.data.pseudonym import Pseudonymizer, create_demo_key, load_key
from chronorisk.errors import ChronoriskError

KEY = b"chronorisk-test-key-0123456789"
PSEUDO = Pseudonymizer(KEY)
SID = PSEUDO.subject_id("p1")


def us(text: str) -> int:
    """Microseconds since the epoch of an ISO datetime (naive = UTC)."""
    dt = datetime.fromisoformat(text)
    dt = dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def ctx() -> BundleContext:
    return BundleContext(PSEUDO, {}, {})


def obs(code: str, when: str = "2020-03-01T10:00:00+00:00", **value) -> dict:
    return {
        "resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": when, **value,
    }


def quantity(value, unit) -> dict:
    return {"valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}


# ---------------------------------------------------------------- resources


def test_patient_birth_sex_death_and_nothing_identifying():
    patient = {
        "resourceType": "Patient", "id": "p1", "birthDate": "1960-05-17", "gender": "female",
        "deceasedDateTime": "2021-02-03T04:05:06-05:00",
        "name": [{"family": "Secretname"}], "identifier": [{"value": "MRN-42"}],
        "address": [{"city": "Hiddenville"}], "telecom": [{"value": "555-0100"}],
    }
    rows = patient_rows(patient, ctx())
    assert rows == [
        (SID, us("1960-05-17T00:00:00"), "MEDS_BIRTH", None, None, None),
        (SID, None, "GENDER//F", None, None, None),
        (SID, us("2021-02-03T09:05:06"), "MEDS_DEATH", None, None, None),  # offset applied: UTC
    ]
    assert "Secretname" not in repr(rows) and "MRN-42" not in repr(rows) and "p1" not in repr(rows)


def test_patient_other_gender_writes_no_sex_row_and_is_noted():
    c = ctx()
    rows = patient_rows({"resourceType": "Patient", "id": "p1", "birthDate": "1960", "gender": "other"}, c)
    assert rows == [(SID, us("1960-01-01T00:00:00"), "MEDS_BIRTH", None, None, None)]
    assert c.notes == {"Patient: gender other (no GENDER row)": 1}


def test_patient_without_birth_date_is_rejected():
    with pytest.raises(Rejected) as exc:
        patient_rows({"resourceType": "Patient", "id": "p1", "gender": "male"}, ctx())
    assert exc.value.category == "no_time"


def test_encounter_class_at_start_with_service_provider():
    enc = {
        "resourceType": "Encounter", "id": "e1", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
        "subject": {"reference": "urn:uuid:p1"}, "period": {"start": "2020-01-02T03:04:05Z"},
        "serviceProvider": {"reference": "Organization/org-9"},
    }
    assert encounter_rows(enc, ctx()) == [(SID, us("2020-01-02T03:04:05"), "ENCOUNTER//EMER", None, None, "id:org-9")]


def test_condition_onset_then_recorded_date_and_vocabularies():
    cond = {
        "resourceType": "Condition", "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://example.org/local", "code": "X"},
                            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"}]},
        "recordedDate": "2019-06-01",
    }
    assert condition_rows(cond, ctx()) == [(SID, us("2019-06-01T00:00:00"), "ICD10CM//E11.9", None, None, None)]
    cond["onsetDateTime"] = "2018-02-01T00:00:00+00:00"
    assert condition_rows(cond, ctx())[0][1] == us("2018-02-01T00:00:00")


def test_unknown_code_system_is_rejected_naming_it():
    cond = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}, "recordedDate": "2019-06-01",
            "code": {"coding": [{"system": "http://example.org/local", "code": "X"}]}}
    with pytest.raises(Rejected) as exc:
        condition_rows(cond, ctx())
    assert exc.value.category == "unknown_code_system"
    assert "http://example.org/local" in exc.value.detail and "http://snomed.info/sct" in exc.value.detail


@pytest.mark.parametrize(
    ("code", "value", "unit", "expected_code", "expected"),
    [
        ("4548-4", 7.1, "%", "LOINC//4548-4", 7.1),
        ("4548-4", 48.0, "mmol/mol", "LOINC//4548-4", 0.09148 * 48 + 2.152),  # IFCC -> NGSP
        ("2339-0", 7.0, "mmol/L", "LOINC//2339-0", 7.0 * 18.016),
        ("38483-4", 88.42, "umol/L", "LOINC//38483-4", 1.0),
        ("2160-0", 1.3, "mg/dL", "LOINC//38483-4", 1.3),  # alias -> canonical code
        ("29463-7", 150.0, "[lb_av]", "LOINC//29463-7", 150 * 0.45359237),
        ("33914-3", 75.0, "mL/min", "LOINC//33914-3", 75.0),
        ("8310-5", 37.2, "Cel", "LOINC//8310-5", 37.2),  # not a MEASUREMENT: kept as sent
    ],
)
def test_observation_quantity_in_canonical_unit(code, value, unit, expected_code, expected):
    ((sid, time, out_code, number, text, org),) = observation_rows(obs(code, **quantity(value, unit)), ctx())
    assert (sid, time, out_code, text, org) == (SID, us("2020-03-01T10:00:00"), expected_code, None, None)
    assert number == pytest.approx(expected, rel=1e-12)


def test_observation_unit_not_convertible_names_unit_and_accepted():
    with pytest.raises(Rejected) as exc:
        observation_rows(obs("2339-0", **quantity(5.5, "g/L")), ctx())
    assert exc.value.category == "unit_not_convertible"
    assert "'g/L'" in exc.value.detail and "accepted: mg/dL (mg/dl), mmol/L (mmol/l)" in exc.value.detail


def test_observation_implausible_value_is_rejected():
    with pytest.raises(Rejected) as exc:
        observation_rows(obs("8480-6", **quantity(1200, "mm[Hg]")), ctx())
    assert exc.value.category == "implausible_value"
    assert "1200" in exc.value.detail and "[40, 300]" in exc.value.detail


def test_bp_panel_gives_one_event_per_component():
    panel = obs("55284-4", component=[
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}, **quantity(81, "mm[Hg]")},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, **quantity(132, "mmHg")},
    ])
    assert observation_rows(panel, ctx()) == [
        (SID, us("2020-03-01T10:00:00"), "LOINC//8462-4", 81.0, None, None),
        (SID, us("2020-03-01T10:00:00"), "LOINC//8480-6", 132.0, None, None),
    ]


def test_bp_panel_keeps_its_good_component_and_names_the_bad_one():
    panel = obs("55284-4", component=[
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}, **quantity(81, "mm[Hg]")},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": 132}},
    ])
    c = ctx()
    assert observation_rows(panel, c) == [(SID, us("2020-03-01T10:00:00"), "LOINC//8462-4", 81.0, None, None)]
    [bad] = c.partial
    assert (bad.category, bad.part) == ("no_unit", "component[1]")
    assert bad.detail.startswith("component[1] (LOINC//8480-6): Systolic blood pressure has no unit")


def test_bp_panel_with_every_component_bad_is_rejected_whole_naming_each():
    panel = obs("55284-4", component=[
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}, **quantity(81, "kPa")},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": 132}},
    ])
    with pytest.raises(Rejected) as exc:
        observation_rows(panel, ctx())
    assert exc.value.category == "unit_not_convertible"
    assert "component[0] (LOINC//8462-4): unit 'kPa'" in exc.value.detail
    assert "component[1] (LOINC//8480-6): Systolic blood pressure has no unit" in exc.value.detail


def test_smoking_status_answer_is_text_value():
    smoking = obs("72166-2", valueCodeableConcept={
        "coding": [{"system": "http://snomed.info/sct", "code": "449868002", "display": "Smokes tobacco daily"}]})
    assert observation_rows(smoking, ctx()) == [
        (SID, us("2020-03-01T10:00:00"), "LOINC//72166-2", None, "SNOMED//449868002", None)
    ]


def test_observation_without_value_or_subject_or_with_bad_date():
    with pytest.raises(Rejected) as exc:
        observation_rows(obs("8480-6"), ctx())
    assert exc.value.category == "no_value"
    no_subject = obs("8480-6", **quantity(120, "mm[Hg]"))
    del no_subject["subject"]
    with pytest.raises(Rejected) as exc:
        observation_rows(no_subject, ctx())
    assert exc.value.category == "no_subject"
    with pytest.raises(Rejected) as exc:
        observation_rows(obs("8480-6", when="2020-13-45T99:00:00Z", **quantity(120, "mm[Hg]")), ctx())
    assert exc.value.category == "bad_date" and "effectiveDateTime" in exc.value.detail


def test_subject_must_be_a_patient():
    wrong = obs("8480-6", **quantity(120, "mm[Hg]"))
    wrong["subject"] = {"reference": "Group/g1"}
    with pytest.raises(Rejected) as exc:
        observation_rows(wrong, ctx())
    assert exc.value.category == "bad_reference"


def test_medication_request_supply_days():
    request = {
        "resourceType": "MedicationRequest", "status": "active", "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                  "code": "860975"}]},
        "authoredOn": "2021-04-05T06:07:08+00:00",
    }
    assert medication_request_rows(request, ctx()) == [
        (SID, us("2021-04-05T06:07:08"), "RXNORM//860975", None, None, None)
    ]
    request["dispenseRequest"] = {"expectedSupplyDuration": {"value": 3, "unit": "weeks"}}
    assert medication_request_rows(request, ctx())[0][3] == 21.0
    request["dispenseRequest"] = {"expectedSupplyDuration": {"value": 3, "code": "fortnight"}}
    with pytest.raises(Rejected) as exc:
        medication_request_rows(request, ctx())
    assert exc.value.category == "unit_not_convertible" and "'fortnight'" in exc.value.detail


def test_medication_reference_to_contained_medication():
    request = {
        "resourceType": "MedicationRequest", "status": "active", "subject": {"reference": "Patient/p1"},
        "contained": [{"resourceType": "Medication", "id": "m", "code": {"coding": [
            {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "259255"}]}}],
        "medicationReference": {"reference": "#m"}, "authoredOn": "2021-04-05",
    }
    assert medication_request_rows(request, ctx())[0][2] == "RXNORM//259255"


def test_entered_in_error_is_rejected_not_converted():
    with pytest.raises(Rejected) as exc:
        observation_rows({**obs("8480-6", **quantity(120, "mm[Hg]")), "status": "entered-in-error"}, ctx())
    assert exc.value.category == "void_status"


def test_references_and_organizations():
    c = ctx()
    c.patient_urls["urn:uuid:abc"] = "p1"
    assert subject_if_any({"resourceType": "Claim", "patient": {"reference": "urn:uuid:abc"}}, c) == SID
    assert subject_if_any({"resourceType": "Claim", "patient": {"reference": "Patient/p1/_history/2"}}, c) == SID
    assert subject_if_any({"resourceType": "Practitioner"}, c) is None
    assert org_key("urn:uuid:o-1") == org_key("Organization/o-1") == "id:o-1"
    assert org_key("Organization?identifier=https://github.com/synthetichealth/synthea|o-1") == (
        "identifier:https://github.com/synthetichealth/synthea|o-1")
    keys, site = organization_site({"resourceType": "Organization", "id": "o-1", "name": "St. Anne's Hospital",
                                    "identifier": [{"system": "urn:chronorisk:site", "value": "chc_harbour"}]})
    assert site == "chc_harbour" and "id:o-1" in keys and "identifier:urn:chronorisk:site|chc_harbour" in keys
    assert organization_site({"id": "o-2", "name": "St. Anne's Hospital"})[1] == "st_anne_s_hospital"
    assert slugify("Hôpital Saint-Éloi -") == "hopital_saint_eloi"


# ---------------------------------------------------------------- properties


@given(
    when=st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2100, 1, 1)),
    offset_minutes=st.integers(min_value=-14 * 60, max_value=14 * 60),
)
@settings(max_examples=200, deadline=None)
def test_parse_time_matches_python_for_any_offset(when, offset_minutes):
    tz = timezone(timedelta(minutes=offset_minutes))
    aware = when.replace(tzinfo=tz)
    text = aware.isoformat()
    assert parse_time(text, "f") == (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


@pytest.mark.parametrize(
    "bad", ["", "yesterday", "2020-02-30", "2020-1-5", "20200105", "2020-01-05T25:00:00Z", 20200105]
)
def test_parse_time_rejects_non_fhir_dates(bad):
    with pytest.raises(Rejected) as exc:
        parse_time(bad, "birthDate")
    assert exc.value.category == "bad_date" and "birthDate" in exc.value.detail


CONVERSIONS = [(m, unit) for m in MEASUREMENTS.values() for unit in m.units()]


@pytest.mark.parametrize(("measurement", "unit"), CONVERSIONS, ids=[f"{m.name}-{u}" for m, u in CONVERSIONS])
@given(a=st.floats(0, 1e4, allow_nan=False), b=st.floats(0, 1e4, allow_nan=False))
@settings(max_examples=50, deadline=None)
def test_conversions_are_increasing_and_plausibility_is_checked_after_conversion(measurement, unit, a, b):
    lo, hi = sorted((a, b))
    assert measurement.to_canonical(lo, unit) <= measurement.to_canonical(hi, unit)
    canonical = measurement.to_canonical(a, unit)
    resource = obs(measurement.code.split("//")[1], **quantity(a, unit))
    low, high = measurement.plausible
    if low <= canonical <= high:
        assert observation_rows(resource, ctx())[0][3] == pytest.approx(canonical)
    else:
        with pytest.raises(Rejected, match="implausible_value"):
            observation_rows(resource, ctx())


@given(source_id=st.text(min_size=1, max_size=80))
@settings(max_examples=300, deadline=None)
def test_subject_id_is_stable_positive_int64_and_keyed(source_id):
    sid = Pseudonymizer(KEY).subject_id(source_id)
    assert 1 <= sid < 2**63
    assert PSEUDO.subject_id(source_id) == sid  # stable across instances and the cache
    assert Pseudonymizer(KEY + b"x").subject_id(source_id) != sid  # another key, another id


def test_subject_id_known_answer():
    # HMAC-SHA256(key, "p1")[:8] as a big-endian int, top bit cleared; pins the scheme.
    import hashlib
    import hmac

    digest = hmac.new(KEY, b"p1", hashlib.sha256).digest()
    assert int.from_bytes(digest[:8], "big") & (2**63 - 1) == SID


def test_key_sources_and_refusal(tmp_path, monkeypatch):
    monkeypatch.delenv("CHRONORISK_PSEUDONYM_KEY", raising=False)
    with pytest.raises(ChronoriskError, match="CHRONORISK_PSEUDONYM_KEY"):
        load_key(secret_file=None, env_var="CHRONORISK_PSEUDONYM_KEY", demo=False, secrets_dir=tmp_path / "s")
    monkeypatch.setenv("CHRONORISK_PSEUDONYM_KEY", "k" * 20)
    assert load_key(secret_file=None, env_var="CHRONORISK_PSEUDONYM_KEY", demo=False,
                    secrets_dir=tmp_path / "s") == (b"k" * 20, "env:CHRONORISK_PSEUDONYM_KEY")
    key_file = tmp_path / "key"
    key_file.write_text("f" * 32 + "\n")
    assert load_key(secret_file=key_file, env_var="X", demo=False, secrets_dir=tmp_path)[0] == b"f" * 32
    monkeypatch.delenv("CHRONORISK_PSEUDONYM_KEY")
    key, source = load_key(secret_file=None, env_var="CHRONORISK_PSEUDONYM_KEY", demo=True,
                           secrets_dir=tmp_path / "secrets")
    path = tmp_path / "secrets" / "pseudonym.key"
    assert source == "demo" and path.stat().st_mode & 0o777 == 0o600 and len(key) == 64
    assert create_demo_key(tmp_path / "secrets") == path and path.read_bytes().strip() == key  # reused
    with pytest.raises(ChronoriskError, match="at least 16"):
        Pseudonymizer(b"short")


# any JSON shape: converted, quarantined or skipped, never an exception that stops the batch
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["2020-01-01", "2020-01-01T00:00:00Z", "urn:uuid:p1", "Patient/p1", "http://loinc.org",
                       "4548-4", "%", "mmol/mol", "final"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["code", "coding", "system", "value", "unit", "reference", "start", "valueQuantity",
                         "component", "subject", "class", "period", "effectiveDateTime", "status", "id"]),
        inner, max_size=4),
    max_leaves=12,
)


@given(
    rtype=st.sampled_from(["Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Claim",
                           "Organization", 7, None]),
    body=st.dictionaries(
        st.sampled_from(["id", "subject", "patient", "code", "class", "period", "birthDate", "gender",
                         "deceasedDateTime", "effectiveDateTime", "valueQuantity", "valueCodeableConcept",
                         "valueString", "component", "authoredOn", "medicationCodeableConcept",
                         "medicationReference", "dispenseRequest", "onsetDateTime", "recordedDate", "status",
                         "serviceProvider", "identifier", "name", "verificationStatus", "contained"]),
        _json, max_size=8),
)
@example(rtype="Organization", body={"identifier": 1})  # once raised TypeError: identifier not a list
@example(rtype="MedicationRequest", body={"medicationReference": {"reference": "#m"}, "contained": 7})
@settings(max_examples=300, deadline=None)
def test_any_shape_is_converted_quarantined_or_skipped(tmp_path_factory, rtype, body):
    from chronorisk.data.fhir.worker import WorkerSettings, _Task

    folder = tmp_path_factory.getbasetemp() / "fuzz"  # shared by the examples: only appended to
    settings_ = WorkerSettings(staging=str(folder / "s"), quarantine_parts=str(folder / "q"), n_buckets=1,
                               max_bytes=10**6, flush_rows=10**6)
    task = _Task(0, settings_, PSEUDO)
    task.resource({"resourceType": rtype, **body}, "urn:uuid:p1", "f.json", "entry 0")
    task.quarantine.close()
    assert sum(task.result.outcomes.values()) == 1
    (outcome,) = {o for (_, o) in task.result.outcomes}
    assert (task.quarantine.lines == 1) == (outcome == "quarantined")


def test_an_observation_with_a_bad_value_keeps_its_good_components():
    panel = obs("55284-4", valueQuantity={"value": "high"}, component=[
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, **quantity(140, "mmHg")}])
    c = ctx()
    assert observation_rows(panel, c) == [(SID, us("2020-03-01T10:00:00"), "LOINC//8480-6", 140.0, None, None)]
    [bad] = c.partial
    assert (bad.category, bad.part) == ("bad_value", "value")


def test_a_code_over_the_text_cap_is_rejected():
    huge = obs("72166-2", valueCodeableConcept={"coding": [{"system": "http://snomed.info/sct", "code": "9" * 70_000}]})
    with pytest.raises(Rejected) as exc:
        observation_rows(huge, ctx())
    assert exc.value.category == "text_too_long" and "70,000 bytes" in exc.value.detail


def test_subjects_must_be_patients_of_the_bundle():
    from chronorisk.data.fhir.convert import bundle_rows

    bundle = {"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"}},  # no fullUrl
        {"resource": obs("4548-4", subject={"reference": "urn:uuid:p1"}, **quantity(6.0, "%"))},
        {"resource": obs("4548-4", subject={"reference": "Patient/p1"}, **quantity(6.1, "%"))},
        {"resource": obs("4548-4", subject={"reference": "Patient/p2"}, **quantity(6.2, "%"))},
    ]}
    rows, problems = bundle_rows(bundle, ctx())
    assert [r[3] for r in rows if r[2] == "LOINC//4548-4"] == [6.0, 6.1]
    [(entry, rtype, rejected)] = problems
    assert (entry, rtype, rejected.category) == (3, "Observation", "subject_not_in_bundle")
    assert rejected.detail.startswith("subject not in bundle")


def test_a_long_lived_context_reads_the_clock_at_each_bundle(monkeypatch):
    """The date bounds follow the clock: a context kept for days (the device stream keeps one) accepts
    today's readings after `reset_bundle`, not only those of the day it was made."""
    from datetime import datetime, timedelta

    from chronorisk.data import time_bounds
    from chronorisk.data.fhir.convert import BundleContext, Rejected
    from chronorisk.data.pseudonym import Pseudonymizer

    made = datetime(2026, 1, 1)
    monkeypatch.setattr(time_bounds, "utcnow_naive", lambda: made)
    ctx = BundleContext(Pseudonymizer(b"k" * 32), {}, {})
    with pytest.raises(Rejected, match="is in the future"):
        ctx.time("2026-01-10", "effectiveDateTime")
    monkeypatch.setattr(time_bounds, "utcnow_naive", lambda: made + timedelta(days=30))
    ctx.reset_bundle()
    assert ctx.time("2026-01-10", "effectiveDateTime") == ctx.time("2026-01-10T00:00:00Z", "effectiveDateTime")
