"""CDS Hooks 2.0 routes: discovery, the patient-view service, and card feedback.

Errors follow the rest of the API (`{"error", "fields"}`): 401 without a valid client JWT, 403 for a
client whose role may not read patients, 404 for an unknown service, 422 naming the malformed field.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from chronorisk.serving import cds_hooks
from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.explanations import units_of
from chronorisk.serving.routes.common import FastJSON, StateDep
from chronorisk.serving.state import ServingState

router = APIRouter()
_ERRORS = S.error_responses(404, 413, 503)
_BUILD = threading.Lock()


class CdsState:
    """What the CDS routes keep per worker: the clients' keys, the used token ids, the pseudonymizer."""

    def __init__(self, state: ServingState):
        from chronorisk.data.pseudonym import Pseudonymizer, load_key
        from chronorisk.serving.access import is_demo

        self.clients = cds_hooks.load_clients(state.config.cds_clients)
        self.seen = cds_hooks.SeenTokens(state.store.engine)
        self.results = cds_hooks.RecentResults(state.config.cds_cache_records)
        try:
            key, _ = load_key(secret_file=None, env_var=state.config.pseudonym_key_env, demo=is_demo(False),
                              secrets_dir=state.work / "secrets")
            self.pseudonymizer = Pseudonymizer(key)
        except Exception as exc:  # no key: the service cannot map the EHR's ids; said per call (503)
            self.pseudonymizer = None
            self.no_key = str(exc)


def cds_state(state: ServingState) -> CdsState:
    found = getattr(state, "_cds", None)
    if found is None:
        with _BUILD:
            found = getattr(state, "_cds", None)
            if found is None:
                found = CdsState(state)
                state._cds = found  # type: ignore[attr-defined]
    return found


def public_base(request: Request, state: ServingState) -> str:
    return (state.config.public_url or str(request.base_url)).rstrip("/")


def client_principal(request: Request, state: ServingState, audience: str) -> Principal:
    """The calling EHR client as a principal of its role and site (401 / 403)."""
    cds = cds_state(state)
    try:
        client = cds_hooks.verify_token(request.headers.get("authorization"), cds.clients, audience, cds.seen)
    except cds_hooks.AuthProblem as exc:
        raise HTTPException(exc.status, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    principal = Principal(key_id=f"cds:{client.iss}"[:80], role=client.role, site=client.site)
    if not principal.can("patient_read"):
        raise HTTPException(403, f"role {principal.role} may not read patients")
    return principal


def known_service(service_id: str) -> str:
    if service_id != cds_hooks.SERVICE_ID:
        raise HTTPException(404, f"no CDS service {service_id[:64]!r}; offered: {cds_hooks.SERVICE_ID}")
    return service_id


ServiceId = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="a service id of the discovery")]


@router.get("/cds-services", tags=["cds-hooks"])
async def cds_discovery() -> dict:
    """The CDS Hooks discovery document (public, as the spec requires)."""
    return cds_hooks.discovery()


@router.post("/cds-services/{service_id}", tags=["cds-hooks"], responses=_ERRORS)
async def cds_call(service_id: ServiceId, request: Request, state: StateDep) -> Response:
    """Cards for the patient in view: risk, tier and grouped factors per task (none if consent is withdrawn)."""
    principal = client_principal(request, state, f"{public_base(request, state)}/cds-services/{service_id}")
    known_service(service_id)
    body = await parsed(request, S.CdsRequest)
    return FastJSON({"cards": await run_in_threadpool(cards_for, body, principal, state,
                                                      public_base(request, state))})


@router.post("/cds-services/{service_id}/feedback", tags=["cds-hooks"], responses=_ERRORS)
async def cds_feedback(service_id: ServiceId, request: Request, state: StateDep) -> dict:
    """Whether the clinician accepted or overrode a card: written to the audit log (no patient data)."""
    principal = client_principal(request, state, f"{public_base(request, state)}/cds-services/{service_id}/feedback")
    known_service(service_id)
    body = await parsed(request, S.CdsFeedback)
    for item in body.feedback:
        reason = (item.overrideReason or {}).get("reason")
        state.audit.append(actor=principal.actor, role=principal.role, site=principal.site, action="cds_feedback",
                           detail={"card": item.card, "outcome": item.outcome,
                                   "reason": reason.get("code") if isinstance(reason, dict) else None})
    return {}


async def parsed(request: Request, model):
    """The body as `model`, after authentication (FastAPI would validate before the dependency ran)."""
    import orjson
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    try:
        raw = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise RequestValidationError([{"loc": ("body",), "msg": "not JSON", "type": "json_invalid"}]) from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def cards_for(body: S.CdsRequest, principal: Principal, state: ServingState, base: str) -> list[dict]:
    """The cards of one call: scored from the prefetch when there is one, else the stored scores."""
    cds = cds_state(state)
    if cds.pseudonymizer is None:
        raise HTTPException(503, f"CDS Hooks cannot map the EHR's patient ids: {cds.no_key}")
    subject_id = cds.pseudonymizer.subject_id(body.context.patientId)
    site = principal.site
    if state.store.patient_consent(subject_id).withdrawn_at(site) is not None:  # at this client's site
        return []
    page = f"{base}/ui/patients/{subject_id}" + (f"?site={site}" if site else "")
    bundle = cds_hooks.prefetch_bundle(body.prefetch or {}, body.context.patientId)
    if bundle is not None:
        return prefetch_cards(bundle, principal, state, page)
    return stored_cards(state, principal, subject_id, page)


def prefetch_cards(bundle: dict, principal: Principal, state: ServingState, page: str) -> list[dict]:
    """Cards scored from the prefetch at today's date; the same record seen again today (the chart opened
    again) reuses its scores, with new card ids."""
    from chronorisk.serving import scoring
    from chronorisk.serving.routes.score import score_results
    from chronorisk.serving.store import utcnow

    when = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    cds = cds_state(state)
    key = results = None
    if cds.results.size:  # the digest of the record is only worth making when scores are kept
        key = cds_hooks.record_key(bundle, when, principal.site,
                                   [(m.task, m.version) for m in state.models.values()])
        results = cds.results.get(key)
    if results is None:
        record = scoring.fhir_record(bundle, "prefetch")
        request = S.ScoreRequest.model_construct(tasks=None, prediction_time=when, site=None, explain=True,
                                                 top_k=state.top_k, events=None, fhir=None, features=None)
        _, _, scored = score_results(request, principal, state, events=record.events)
        results = [r for r in scored if r.eligible]
        if key is not None:
            cds.results.put(key, results)
    cards = []
    for r in results:
        model = state.models[r.task]
        cards.append(cds_hooks.card(task_def=model.task_def, spec=model.spec, risk=r.risk, tier=r.tier,
                                    factors=r.factors, model_name=r.model_name, model_version=r.model_version,
                                    prediction_time=when, page_url=page,
                                    units=units_of(state.config)))
    return cards


def stored_cards(state: ServingState, principal: Principal, subject_id: int, page: str) -> list[dict]:
    """Cards of the latest stored score per task (audited as a patient read); none for an unknown patient."""
    from chronorisk.serving.routes.fhir import factors_of, task_meaning
    from chronorisk.serving.routes.patients import read_patient_audited

    try:
        view = read_patient_audited(state, principal, subject_id, principal.site, "cds")
    except HTTPException as exc:
        if exc.status_code == 404:
            return []
        raise
    cards = []
    for task in view["tasks"]:
        latest = task["latest"]
        task_def, spec = task_meaning(state, task["task"])
        cards.append(cds_hooks.card(task_def=task_def, spec=spec, risk=latest["risk"], tier=latest["tier"],
                                    factors=factors_of(latest["factors"]), model_name=latest["model_name"],
                                    model_version=latest["model_version"],
                                    prediction_time=latest["prediction_time"], page_url=page,
                                    units=units_of(state.config)))
    return cards
