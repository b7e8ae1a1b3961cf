"""FHIR RiskAssessment and the CDS Hooks service through the real HTTP server, with the tiny model.

RiskAssessments are validated with the `fhir.resources` models (FHIR R4B: the RiskAssessment and
Bundle definitions are those of R4). Hook requests are recorded files shaped like the CDS Hooks 2.0
specification's examples (`cds_requests/`), signed as an EHR client would sign them.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.riskassessment import RiskAssessment
from serving_support import SECRET, Server, factor, make_keys, seed_store, subject_id, write_params

from chronorisk.data.pseudonym import Pseudonymizer
from chronorisk.errors import InputError
from chronorisk.serving.audit import AuditLog
from chronorisk.serving.store import ScoreStore

HERE = Path(__file__).parent
PSEUDONYM_KEY = "test-pseudonym-key-0123456789"
EHR = "https://ehr.test"
SERVICE = "chronorisk-risk"
STORED_EHR_ID = "ehr-1288992"
WITHDRAWN_EHR_ID = "ehr-withdrawn-7"
CACHED_EHR_ID = "ehr-opened-twice-5"
RISK_CODES = {"low": "low", "medium": "moderate", "high": "high"}


def recorded(name: str) -> dict:
    return json.loads((HERE / "cds_requests" / name).read_text())


def pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class PseudonymServer(Server):
    def env(self) -> dict[str, str]:
        return {**super().env(), "CHRONORISK_PSEUDONYM_KEY": PSEUDONYM_KEY}


@pytest.fixture(scope="session")
def cds_world(tiny_world, tmp_path_factory):
    """A server with the tiny models over a seeded store, two registered EHR clients (a GP site client
    and a public-health one), and two patients known by their EHR ids: one scored, one withdrawn."""
    work = tmp_path_factory.mktemp("cds")
    gp_key, ph_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    (work / "ehr.pem").write_bytes(pem(gp_key))
    (work / "ph.pem").write_bytes(pem(ph_key))
    clients = [{"iss": EHR, "public_key_file": str(work / "ehr.pem"), "role": "gp", "site": "chc_a"},
               {"iss": "https://ph.test", "public_key_file": str(work / "ph.pem"), "role": "public_health"}]
    params = write_params(work / "params.yaml", cds_clients=clients)
    url = f"sqlite:///{work / 'store.db'}"
    store = ScoreStore.open(url)
    seed_store(store)
    ids = Pseudonymizer(PSEUDONYM_KEY.encode()).subject_id
    stored, withdrawn, cached = ids(STORED_EHR_ID), ids(WITHDRAWN_EHR_ID), ids(CACHED_EHR_ID)
    when = datetime(2025, 7, 1)
    rows = [{"site": "chc_a", "subject_id": sid, "task": "complication_1y", "prediction_time": when, "risk": risk,
             "tier": tier, "age_band": "70-79", "model_name": "chronorisk-complication_1y", "model_version": "1",
             "scored_at": when, "factors": json.dumps([factor(8.9, "2025-06-10")])}
            for sid, risk, tier in ((stored, 0.31, "high"), (withdrawn, 0.12, "medium"), (cached, 0.05, "low"))]
    facts = [{"site": "chc_a", "subject_id": sid, "sex": "F", "birth_year": 1950, "conditions": ",diabetes,",
              "as_of": when, "updated_at": when} for sid in (stored, withdrawn, cached)]
    store.write_chunk(rows, facts, [])
    store.withdraw_consent(withdrawn, site="chc_a", by="test")
    keys = make_keys(store)
    store.dispose()
    server = PseudonymServer(work=work / "w", store_url=url, params=params, model_dir=tiny_world.models).start()
    yield SimpleNamespace(server=server, keys=keys, gp_key=gp_key, ph_key=ph_key, url=url, stored=stored,
                          withdrawn=withdrawn, cached=cached)
    server.stop()


def api(world, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=world.server.url, headers=headers, timeout=60)


def signed(world, path: str, *, key=None, iss: str = EHR, aud: str | None = None, exp_in: int = 300,
           jti: str | None = None, drop: str | None = None) -> dict:
    now = int(time.time())
    claims = {"iss": iss, "aud": aud or f"{world.server.url}{path}", "exp": now + exp_in, "iat": now,
              "jti": jti or uuid.uuid4().hex}
    if drop:
        claims.pop(drop)
    token = jwt.encode(claims, key or world.gp_key, algorithm="ES384")
    return {"Authorization": f"Bearer {token}"}


def hook_call(world, body: dict, **token) -> httpx.Response:
    path = f"/cds-services/{SERVICE}"
    with api(world) as c:
        return c.post(path, json=body, headers=signed(world, path, **token))


def bundle_of(prefetch: dict) -> dict:
    """The prefetched resources as the patient's record bundle ($score's input), each resource once (the
    recent Conditions and the active problem list overlap)."""
    entries = [{"fullUrl": "urn:uuid:p", "resource": prefetch["patient"]}]
    ids = set()
    for key in ("observations", "conditions", "problems", "medications"):
        for e in prefetch[key]["entry"]:
            if (e["resource"]["resourceType"], e["resource"]["id"]) not in ids:
                ids.add((e["resource"]["resourceType"], e["resource"]["id"]))
                entries.append({"resource": e["resource"]})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


# -- FHIR RiskAssessment ----------------------------------------------------------------------


def test_score_a_bundle_returns_a_valid_r4_risk_assessment(cds_world):
    prefetch = recorded("patient-view-prefetch.json")["prefetch"]
    bundle = bundle_of(prefetch)
    with api(cds_world, cds_world.keys["gp"]) as c:
        r = c.post("/fhir/RiskAssessment/$score", json=bundle,
                   params={"task": "complication_1y", "prediction_time": "2025-07-01"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/fhir+json")
        ra = RiskAssessment.model_validate(r.json())  # the FHIR definitions, not hand-written checks
        same = c.post("/score", json={"fhir": bundle, "prediction_time": "2025-07-01",
                                      "tasks": ["complication_1y"]}).json()["results"][0]
    assert ra.status == "final" and ra.subject.reference == f"Patient/{STORED_EHR_ID}"
    assert ra.occurrenceDateTime.isoformat().startswith("2025-07-01T00:00:00")
    prediction = ra.prediction[0]
    assert float(prediction.probabilityDecimal) == pytest.approx(same["risk"], abs=1e-6)  # one converter, one model
    assert prediction.qualitativeRisk.coding[0].code == RISK_CODES[same["tier"]]
    assert prediction.qualitativeRisk.coding[0].system == "http://terminology.hl7.org/CodeSystem/risk-probability"
    assert prediction.outcome.coding[0].code == "complication_1y" and "within 1 year" in prediction.outcome.text
    assert (prediction.whenPeriod.end - prediction.whenPeriod.start).days == 365
    assert ra.method.coding[0].code == same["model_name"] and ra.method.coding[0].version == same["model_version"]
    input_ids = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    assert {b.reference for b in ra.basis or []} <= input_ids
    assert ra.note[0].text.startswith("The model's estimate")
    assert "mm[Hg]" not in ra.note[0].text  # display units in the clinician's words


def test_score_a_bundle_refuses_bad_input_and_callers(cds_world):
    bundle = bundle_of(recorded("patient-view-prefetch.json")["prefetch"])
    bad = copy.deepcopy(bundle)
    bad["entry"][1]["resource"]["valueQuantity"] = {"value": 8.9, "unit": "furlongs", "code": "furlongs"}
    with api(cds_world, cds_world.keys["gp"]) as c:
        r = c.post("/fhir/RiskAssessment/$score", json=bad, params={"task": "complication_1y"})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "body.entry[1].resource", r.text
        r = c.post("/fhir/RiskAssessment/$score", json={"resourceType": "Patient"})
        assert r.status_code == 422 and "resourceType" in r.json()["error"]
        # two tasks served, none asked: a collection Bundle of the eligible ones
        r = c.post("/fhir/RiskAssessment/$score", json=bundle, params={"prediction_time": "2025-07-01"})
        assert r.status_code == 200 and Bundle.model_validate(r.json()).type == "collection"
    with api(cds_world) as c:
        assert c.post("/fhir/RiskAssessment/$score", json=bundle).status_code == 401
    with api(cds_world, cds_world.keys["public_health"]) as c:
        assert c.post("/fhir/RiskAssessment/$score", json=bundle).status_code == 403


def test_search_gives_every_stored_score_as_a_searchset(cds_world):
    sid = subject_id(0, 3)  # seeded at chc_a: two tasks at two dates
    with api(cds_world, cds_world.keys["gp"]) as c:
        r = c.get("/fhir/RiskAssessment", params={"subject": f"Patient/{sid}"})
        assert r.status_code == 200, r.text
        bundle = Bundle.model_validate(r.json())
        assert bundle.type == "searchset" and bundle.total == 4 and len(bundle.entry) == 4
        got = {(e.resource.prediction[0].outcome.coding[0].code, e.resource.occurrenceDateTime.date().isoformat())
               for e in bundle.entry}
        assert got == {(t, d) for t in ("complication_1y", "onset_2y") for d in ("2024-01-01", "2024-07-01")}
        assert all(e.resource.subject.reference == f"Patient/{sid}" for e in bundle.entry)
        assert c.get("/fhir/RiskAssessment", params={"subject": "Observation/1"}).status_code == 422
        assert c.get("/fhir/RiskAssessment", params={"subject": "Patient/999"}).status_code == 404
    with api(cds_world, cds_world.keys["gp_b"]) as c:  # another site's GP: the same 404 as an unknown patient
        assert c.get("/fhir/RiskAssessment", params={"subject": f"Patient/{sid}"}).status_code == 404
    with api(cds_world) as c:
        assert c.get("/fhir/RiskAssessment", params={"subject": f"Patient/{sid}"}).status_code == 401
    audit = AuditLog(ScoreStore.open(cds_world.url).engine, SECRET.encode())
    entries = [e for e in audit.entries() if e["subject_id"] == sid and e["action"] == "patient_read"]
    assert any(json.loads(e["detail"]).get("via") == "fhir" for e in entries)


# -- CDS Hooks --------------------------------------------------------------------------------


def test_discovery_offers_one_patient_view_service(cds_world):
    with api(cds_world) as c:
        services = c.get("/cds-services").json()["services"]
    assert [s["hook"] for s in services] == ["patient-view"] and services[0]["id"] == SERVICE
    prefetch = services[0]["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    for key in ("observations", "conditions", "medications"):  # the last 3 years of each
        assert "=ge{{today() - 3 years}}" in prefetch[key], key
    assert prefetch["conditions"] == "Condition?patient={{context.patientId}}&recorded-date=ge{{today() - 3 years}}"
    # and the active problem list whatever its age: an old chronic diagnosis still counts
    assert prefetch["problems"] == "Condition?patient={{context.patientId}}&clinical-status=active"


def test_recent_conditions_and_the_problem_list_are_merged_once_each():
    """`prefetch_bundle` takes both Condition searches; a Condition in both enters once; an old diagnosis
    found only on the problem list is in the record."""
    from chronorisk.serving.cds_hooks import prefetch_bundle

    prefetch = recorded("patient-view-prefetch.json")["prefetch"]
    bundle = prefetch_bundle(prefetch, STORED_EHR_ID)
    conditions = [e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition"]
    assert sorted(conditions) == ["cond-htn", "cond-t2d"]  # cond-htn is in both searches
    assert len(bundle["entry"]) == 1 + 3 + 2 + 1
    only_recent = prefetch_bundle({k: v for k, v in prefetch.items() if k != "problems"}, STORED_EHR_ID)
    assert [e["resource"]["id"] for e in only_recent["entry"] if e["resource"]["resourceType"] == "Condition"] == [
        "cond-htn"]
    prefetch["problems"] = {"resourceType": "Observation"}
    with pytest.raises(InputError) as refused:
        prefetch_bundle(prefetch, STORED_EHR_ID)
    assert refused.value.field == "prefetch.problems"


def test_a_hook_with_prefetch_is_scored_into_cards(cds_world):
    body = recorded("patient-view-prefetch.json")
    r = hook_call(cds_world, body)
    assert r.status_code == 200, r.text
    cards = r.json()["cards"]
    with api(cds_world, cds_world.keys["gp"]) as c:
        ra = c.post("/fhir/RiskAssessment/$score", json=bundle_of(body["prefetch"])).json()
    assert Bundle.model_validate(ra).type == "collection"
    eligible = ra["entry"]
    assert len(cards) == len(eligible) >= 1
    for card in cards:
        assert len(card["summary"]) < 140 and "%" in card["summary"]
        assert card["indicator"] in ("info", "warning", "critical")
        assert "not a diagnosis" in card["detail"] and card["source"]["label"].startswith("chronorisk")
        assert card["links"][0]["url"] == f"{cds_world.server.url}/ui/patients/{cds_world.stored}?site=chc_a"
        uuid.UUID(card["uuid"])
    tiers = {e["resource"]["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] for e in eligible}
    by_code = {"low": "info", "moderate": "warning", "high": "critical"}
    assert {c["indicator"] for c in cards} == {by_code[t] for t in tiers}


def test_a_hook_without_prefetch_reads_the_store(cds_world):
    r = hook_call(cds_world, recorded("patient-view-no-prefetch.json"))
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    assert card["indicator"] == "critical" and "31%" in card["summary"] and "(high)" in card["summary"]
    assert "HbA1c" in card["detail"] and "2025-06-10" in card["detail"]
    unknown = recorded("patient-view-no-prefetch.json")
    unknown["context"]["patientId"] = "never-seen"
    assert hook_call(cds_world, unknown).json() == {"cards": []}


def test_withdrawn_consent_gives_no_card(cds_world):
    for name in ("patient-view-no-prefetch.json", "patient-view-prefetch.json"):
        body = json.loads(json.dumps(recorded(name)).replace(STORED_EHR_ID, WITHDRAWN_EHR_ID))
        r = hook_call(cds_world, body)
        assert r.status_code == 200 and r.json() == {"cards": []}, r.text


def test_a_chart_opened_again_reuses_the_scores_but_not_past_a_withdrawal(cds_world):
    body = json.loads(json.dumps(recorded("patient-view-prefetch.json")).replace(STORED_EHR_ID, CACHED_EHR_ID))
    r = hook_call(cds_world, body)
    assert r.status_code == 200, r.text
    first = r.json()["cards"]
    again = hook_call(cds_world, body).json()["cards"]
    assert first and [c["summary"] for c in again] == [c["summary"] for c in first]
    assert [c["detail"] for c in again] == [c["detail"] for c in first]
    assert {c["uuid"] for c in again}.isdisjoint(c["uuid"] for c in first)  # a card id is never reused
    with api(cds_world, cds_world.keys["gp"]) as c:
        r = c.post("/consent/withdraw", json={"subject_id": cds_world.cached})
        assert r.status_code == 200, r.text
    assert hook_call(cds_world, body).json() == {"cards": []}


def test_the_client_jwt_is_checked(cds_world):
    body = recorded("patient-view-no-prefetch.json")
    path = f"/cds-services/{SERVICE}"
    with api(cds_world) as c:
        assert c.post(path, json=body).status_code == 401  # no token
    assert hook_call(cds_world, body, exp_in=-120).status_code == 401  # expired
    assert hook_call(cds_world, body, aud="https://elsewhere.test/cds-services/x").status_code == 401
    assert hook_call(cds_world, body, drop="jti").status_code == 401
    assert hook_call(cds_world, body, key=ec.generate_private_key(ec.SECP384R1())).status_code == 401  # forged
    assert hook_call(cds_world, body, iss="https://unknown.test").status_code == 401
    jti = uuid.uuid4().hex
    assert hook_call(cds_world, body, jti=jti).status_code == 200
    replay = hook_call(cds_world, body, jti=jti)
    assert replay.status_code == 401 and "jti" in replay.json()["error"]
    # a client bound to a role that may not read patients
    assert hook_call(cds_world, body, iss="https://ph.test", key=cds_world.ph_key).status_code == 403
    # an unknown service
    with api(cds_world) as c:
        r = c.post("/cds-services/nope", json=body, headers=signed(cds_world, "/cds-services/nope"))
    assert r.status_code == 404 and SERVICE in r.json()["error"]


def test_a_malformed_hook_is_a_4xx_naming_the_field(cds_world):
    body = recorded("patient-view-prefetch.json")
    del body["context"]["patientId"]
    r = hook_call(cds_world, body)
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "context.patientId", r.text
    body = recorded("patient-view-prefetch.json")
    body["hook"] = "order-sign"
    r = hook_call(cds_world, body)
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "hook", r.text
    body = recorded("patient-view-prefetch.json")
    body["prefetch"]["patient"] = {"resourceType": "Observation"}
    r = hook_call(cds_world, body)
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "prefetch.patient", r.text
    body = recorded("patient-view-prefetch.json")
    body["context"]["patientId"] = "someone-else"  # a prefetch of another patient than the one in view
    r = hook_call(cds_world, body)
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "prefetch.patient.id", r.text
    body = recorded("patient-view-prefetch.json")
    body["prefetch"]["observations"]["entry"][0]["resource"]["valueQuantity"].update(unit="furlongs", code="furlongs")
    r = hook_call(cds_world, body)
    assert r.status_code == 422 and r.json()["fields"][0]["field"].startswith("prefetch.entry["), r.text


def test_feedback_is_recorded_without_patient_data(cds_world):
    path = f"/cds-services/{SERVICE}/feedback"
    card = str(uuid.uuid4())
    body = {"feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:00:00Z",
                          "overrideReason": {"reason": {"code": "not-relevant", "system": "urn:test"}}}]}
    with api(cds_world) as c:
        assert c.post(path, json=body).status_code == 401
        r = c.post(path, json=body, headers=signed(cds_world, path))
        assert r.status_code == 200 and r.json() == {}
        bad = {"feedback": [{**body["feedback"][0], "outcome": "maybe"}]}
        r = c.post(path, json=bad, headers=signed(cds_world, path))
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "feedback[0].outcome"
    audit = AuditLog(ScoreStore.open(cds_world.url).engine, SECRET.encode())
    (entry,) = [e for e in audit.entries() if e["action"] == "cds_feedback"]
    assert json.loads(entry["detail"]) == {"card": card, "outcome": "overridden", "reason": "not-relevant"}
    assert entry["subject_id"] is None and entry["site"] == "chc_a"


def test_score_a_bundle_of_a_patient_who_withdrew_is_refused(cds_world):
    """$score maps the bundle's patient id to the pseudonym (the ingestion key) and honours a withdrawal."""
    prefetch = json.loads(json.dumps(recorded("patient-view-prefetch.json")["prefetch"])
                          .replace(STORED_EHR_ID, WITHDRAWN_EHR_ID))
    with api(cds_world, cds_world.keys["gp"]) as c:
        r = c.post("/fhir/RiskAssessment/$score", json=bundle_of(prefetch),
                   params={"task": "complication_1y", "prediction_time": "2025-07-01"})
    assert r.status_code == 409 and "withdrew consent" in r.json()["error"], r.text


def test_a_token_id_is_used_once_across_workers(tmp_path):
    """Two workers (two ledgers over one store): the second use of a jti is refused by either."""
    from chronorisk.serving.cds_hooks import SeenTokens

    store = ScoreStore.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        one, two = SeenTokens(store.engine), SeenTokens(store.engine)
        exp = time.time() + 300
        assert one.first_use(EHR, "jti-1", exp)
        assert not two.first_use(EHR, "jti-1", exp) and not one.first_use(EHR, "jti-1", exp)
        assert two.first_use(EHR, "jti-2", exp) and two.first_use("https://other.test", "jti-1", exp)
    finally:
        store.dispose()
