"""FHIR R4 output of the generator: one Synthea-shaped transaction bundle per patient.

Each bundle (`fhir/<site>/<patient uuid>.json.gz`) holds the site's
Organization (identifier system `urn:chronorisk:site`, value = site id), the
Patient (with a fake name, address, phone and identifiers, so that
ingestion's de-identification has something to remove; birthDate, gender,
deceasedDateTime), and one resource per MEDS event of that patient:
Encounter (class AMB/EMER/IMP, serviceProvider = the site), Condition (the
site's vocabulary, onsetDateTime = recordedDate = the time it was coded),
Observation (valueQuantity in the *site's* units; blood pressure as the
panel 55284-4 with components 8480-6 / 8462-4; smoking status 72166-2 as a
valueCodeableConcept) and MedicationRequest (RxNorm, authoredOn,
dispenseRequest.expectedSupplyDuration in days). Nothing else: ingesting the
bundles must give back exactly the generator's MEDS events.

Times are UTC with second precision. Resource ids are UUIDs drawn from a
generator seeded by (seed, subject_id); gzip headers carry no timestamp, so
the same seed writes the same bytes.
"""

from __future__ import annotations

import gzip
import uuid
from pathlib import Path

import numpy as np
import orjson

from chronorisk.data.codes import (
    DIAGNOSES,
    MEASUREMENT_BY_CODE,
    MEDICATIONS,
    SMOKING_STATUS,
    SYSTEM_BY_VOCAB,
)
from chronorisk.data.config import SiteConfig
from chronorisk.data.synth.events import CODES, NULL_TIME, TEXTS, UNITS, EventArrays

UCUM = "http://unitsofmeasure.org"
ORG_SYSTEM = "urn:chronorisk:site"
ENCOUNTER_TYPE = {
    "AMB": ("185349003", "Encounter for check up (procedure)"),
    "EMER": ("50849002", "Emergency room admission (procedure)"),
    "IMP": ("32485007", "Hospital admission (procedure)"),
}
ENCOUNTER_MINUTES = {"AMB": 20, "EMER": 180, "IMP": 4 * 24 * 60}
BP_PANEL = ("55284-4", "Blood pressure panel with all children optional")
SBP_CODE, DBP_CODE = "LOINC//8480-6", "LOINC//8462-4"
SMOKING_DISPLAY = {
    "SNOMED//266919005": "Never smoked tobacco (finding)",
    "SNOMED//8517006": "Ex-smoker (finding)",
    "SNOMED//449868002": "Smokes tobacco daily (finding)",
    "SNOMED//77176002": "Smoker (finding)",
}
LAB_NAMES = {"hba1c", "glucose", "ldl", "hdl", "total_chol", "creatinine", "egfr"}

GIVEN_F = ("Ada", "Bea", "Cora", "Dina", "Edda", "Fay", "Gwen", "Hana", "Iris", "Juno", "Kaia", "Lena", "Mira",
           "Nora", "Opal", "Pia", "Rhea", "Sofi", "Tess", "Uma", "Vera", "Wren", "Yara", "Zoe")
GIVEN_M = ("Abel", "Bram", "Cal", "Dov", "Eli", "Finn", "Gus", "Hugo", "Ivo", "Jonas", "Kai", "Leo", "Milo",
           "Nils", "Otto", "Per", "Rafe", "Sol", "Theo", "Ugo", "Vik", "Wes", "Yann", "Zev")
FAMILY = ("Alder", "Brook", "Corran", "Dale", "Ember", "Fenwick", "Garrow", "Hollis", "Ingle", "Jarrow",
          "Kestrel", "Lark", "Marlow", "Nettle", "Orrin", "Pell", "Quill", "Rook", "Sorrel", "Thorne", "Umber",
          "Vance", "Wilde", "Yarrow")
STREETS = ("Mill Lane", "Harbour Road", "River Walk", "Hill Street", "Station Road", "Orchard Way", "Bridge Row")
CITIES = ("Northvale", "Eastmere", "Riverton", "Hillcrest", "Harbourside")


def _code_kinds() -> list[tuple]:
    """Per code index: how the code becomes FHIR."""
    kinds: list[tuple] = []
    diag = {c: d for d in DIAGNOSES.values() for c in (d.snomed, d.icd10)}
    meds = {m.code: m for m in MEDICATIONS.values()}
    for code in CODES:
        vocab, _, value = code.partition("//")
        if code in ("GENDER//F", "GENDER//M", "MEDS_BIRTH", "MEDS_DEATH"):
            kinds.append(("patient",))
        elif vocab == "ENCOUNTER":
            kinds.append(("encounter", value))
        elif code == SMOKING_STATUS:
            kinds.append(("smoking", value))
        elif code in (SBP_CODE, DBP_CODE):
            kinds.append(("bp", code))
        elif code in MEASUREMENT_BY_CODE:
            m = MEASUREMENT_BY_CODE[code]
            kinds.append(("obs", value, m.display, "laboratory" if m.name in LAB_NAMES else "vital-signs"))
        elif code in diag:
            kinds.append(("condition", SYSTEM_BY_VOCAB[vocab], value, diag[code].display))
        elif code in meds:
            kinds.append(("medication", value, meds[code].display))
        else:
            raise ValueError(f"no FHIR mapping for generated code {code}")
    return kinds


_KINDS = _code_kinds()


def _iso(seconds: np.ndarray) -> list[str]:
    return [s + "+00:00" for s in np.datetime_as_string(seconds.astype("datetime64[s]"), unit="s")]


def site_organization(site: SiteConfig) -> tuple[str, dict]:
    """(uuid, Organization resource) of a site; the uuid depends only on the site id."""
    oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ORG_SYSTEM}:{site.site_id}"))
    return oid, {
        "resourceType": "Organization",
        "id": oid,
        "identifier": [{"system": ORG_SYSTEM, "value": site.site_id}],
        "active": True,
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type",
                              "code": "prov", "display": "Healthcare Provider"}], "text": "Healthcare Provider"}],
        "name": f"{'Hospital' if site.kind == 'hospital' else 'Community health centre'} {site.site_id}",
    }


def _entry(resource: dict) -> dict:
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"]}}


def _quantity(value: float, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _coding(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


class _Ids:
    """Deterministic version-4 UUIDs for one patient's resources (from 16 random bytes each)."""

    def __init__(self, rng: np.random.Generator, count: int):
        self._hex = rng.bytes(16 * count).hex()
        self._i = 0

    def next(self) -> str:
        h = self._hex[32 * self._i: 32 * self._i + 32]
        self._i += 1
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _patient(pid: str, rng: np.random.Generator, site: SiteConfig, female: bool, birth: str,
             death: str | None) -> dict:
    given = (GIVEN_F if female else GIVEN_M)[int(rng.integers(len(GIVEN_F)))]
    family = FAMILY[int(rng.integers(len(FAMILY)))]
    digits = rng.integers(0, 10, 21)
    num = "".join(str(int(d)) for d in digits)
    patient = {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [
            {"type": _coding("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical Record Number"),
             "system": f"urn:chronorisk:mrn:{site.site_id}", "value": f"MRN{num[:8]}"},
            {"type": _coding("http://terminology.hl7.org/CodeSystem/v2-0203", "SS", "Social Security Number"),
             "system": "http://hl7.org/fhir/sid/us-ssn", "value": f"999-{num[8:10]}-{num[10:14]}"},
        ],
        "name": [{"use": "official", "family": family, "given": [given], "prefix": ["Ms." if female else "Mr."]}],
        "telecom": [{"system": "phone", "value": f"555-{num[14:17]}-{num[17:21]}", "use": "home"}],
        "gender": "female" if female else "male",
        "birthDate": birth,
        "address": [{"line": [f"{int(digits[0]) * 10 + int(digits[1]) + 1} {STREETS[int(digits[2]) % len(STREETS)]}"],
                     "city": CITIES[int(digits[3]) % len(CITIES)], "postalCode": num[4:9], "country": "US"}],
    }
    if death is not None:
        patient["deceasedDateTime"] = death
    return patient


def patient_bundle(
    *,
    subject_id: int,
    seed: int,
    site: SiteConfig,
    org: tuple[str, dict],
    code: list[int],
    times: list[str | None],
    seconds: list[int],
    value: list[float],
    unit: list[int],
    text: list[int],
) -> tuple[str, dict]:
    """(patient uuid, transaction bundle) from one patient's events (sorted by time)."""
    rng = np.random.default_rng([seed, subject_id, 0xF41])
    ids = _Ids(rng, len(code) + 1)
    pid = ids.next()
    subject = {"reference": f"urn:uuid:{pid}"}
    org_id, org_resource = org
    provider = {"reference": f"urn:uuid:{org_id}"}
    female, birth, death = False, "", None
    entries: list[dict] = []
    encounter_at: dict[int, str] = {}
    pending_bp: dict[int, dict] = {}
    for i, c in enumerate(code):
        kind = _KINDS[c]
        tag = kind[0]
        when = times[i]
        if tag == "patient":
            name = CODES[c]
            if name == "GENDER//F":
                female = True
            elif name == "MEDS_BIRTH":
                birth = when[:10]
            elif name == "MEDS_DEATH":
                death = when
            continue
        rid = ids.next()
        enc = encounter_at.get(seconds[i])
        if tag == "encounter":
            cls = kind[1]
            end = np.datetime64(seconds[i] + 60 * ENCOUNTER_MINUTES[cls], "s")
            resource = {
                "resourceType": "Encounter", "id": rid, "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": cls},
                "type": [_coding("http://snomed.info/sct", *ENCOUNTER_TYPE[cls])],
                "subject": subject,
                "period": {"start": when, "end": str(end) + "+00:00"},
                "serviceProvider": provider,
            }
            encounter_at.setdefault(seconds[i], f"urn:uuid:{rid}")
        elif tag == "condition":
            _, system, value_code, display = kind
            resource = {
                "resourceType": "Condition", "id": rid,
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                               "code": "active"}]},
                "verificationStatus": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
                "code": _coding(system, value_code, display),
                "subject": subject,
                "onsetDateTime": when,
                "recordedDate": when,
            }
        elif tag == "medication":
            _, rx, display = kind
            resource = {
                "resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
                "medicationCodeableConcept": _coding("http://www.nlm.nih.gov/research/umls/rxnorm", rx, display),
                "subject": subject,
                "authoredOn": when,
                "dispenseRequest": {"expectedSupplyDuration": {"value": value[i], "unit": "days", "system": UCUM,
                                                               "code": "d"}},
            }
        elif tag == "bp":
            component = {"code": _coding("http://loinc.org", CODES[c].split("//")[1],
                                         MEASUREMENT_BY_CODE[CODES[c]].display),
                         "valueQuantity": _quantity(value[i], UNITS[unit[i]])}
            panel = pending_bp.get(seconds[i])
            if panel is not None and len(panel["component"]) < 2:
                panel["component"].append(component)
                continue
            resource = {
                "resourceType": "Observation", "id": rid, "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "vital-signs", "display": "vital-signs"}]}],
                "code": _coding("http://loinc.org", *BP_PANEL),
                "subject": subject,
                "effectiveDateTime": when,
                "issued": when,
                "component": [component],
            }
            pending_bp[seconds[i]] = resource
        elif tag == "smoking":
            answer = TEXTS[text[i]]
            resource = {
                "resourceType": "Observation", "id": rid, "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "social-history", "display": "social-history"}]}],
                "code": _coding("http://loinc.org", SMOKING_STATUS.split("//")[1], "Tobacco smoking status"),
                "subject": subject,
                "effectiveDateTime": when,
                "issued": when,
                "valueCodeableConcept": _coding("http://snomed.info/sct", answer.split("//")[1],
                                                SMOKING_DISPLAY[answer]),
            }
        else:  # numeric observation
            _, loinc, display, category = kind
            resource = {
                "resourceType": "Observation", "id": rid, "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": category, "display": category}]}],
                "code": _coding("http://loinc.org", loinc, display),
                "subject": subject,
                "effectiveDateTime": when,
                "issued": when,
                "valueQuantity": _quantity(value[i], UNITS[unit[i]]),
            }
        if enc is not None and tag != "encounter":
            resource["encounter"] = {"reference": enc}
        entries.append(_entry(resource))
    patient = _patient(pid, rng, site, female, birth, death)
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [_entry(patient), _entry(org_resource), *entries]}
    return pid, bundle


def write_site_bundles(
    events: EventArrays,
    subject_ids: np.ndarray,
    *,
    site: SiteConfig,
    seed: int,
    out_dir: Path,
) -> int:
    """Write one bundle per patient of `events` (sorted, one site) into `out_dir`; returns the count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(events) == 0:
        return 0
    org = site_organization(site)
    t = events.time
    has_time = t != NULL_TIME
    iso = np.full(t.shape[0], None, dtype=object)
    iso[has_time] = _iso(t[has_time])
    code, times, secs = events.code.tolist(), iso.tolist(), t.tolist()
    value, unit, text = events.value.tolist(), events.unit.tolist(), events.text.tolist()
    subj = events.subject
    bounds = np.flatnonzero(np.diff(subj)) + 1
    starts = np.concatenate([[0], bounds]).tolist()
    ends = np.concatenate([bounds, [subj.shape[0]]]).tolist()
    written = 0
    for a, b in zip(starts, ends, strict=True):
        pid, bundle = patient_bundle(
            subject_id=int(subject_ids[subj[a]]), seed=seed, site=site, org=org, code=code[a:b],
            times=times[a:b], seconds=secs[a:b], value=value[a:b], unit=unit[a:b], text=text[a:b],
        )
        data = gzip.compress(orjson.dumps(bundle), compresslevel=1, mtime=0)
        (out_dir / f"{pid}.json.gz").write_bytes(data)
        written += 1
    return written
