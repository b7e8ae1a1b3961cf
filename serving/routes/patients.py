"""Patients: one patient's stored scores (audited), their factors, and the site's worklist."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response

from chronorisk.errors import InputError
from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.routes.common import (
    FastJSON,
    NotYours,
    StateDep,
    SubjectPath,
    audit_denied,
    choose_site,
    latest_stored_score,
    readable_site,
    require,
    route_of,
    served_model_and_events,
)
from chronorisk.serving.state import ServingState
from chronorisk.serving.store import utcnow

router = APIRouter()


def patient_view(state: ServingState, subject_id: int, site: str) -> dict:
    return view_of(state.store.patient_record(subject_id, [site]) or _EMPTY, subject_id, site)


_EMPTY = {"patient": None, "scores": [], "consent_withdrawn_at": None}


def view_of(record: dict, subject_id: int, site: str) -> dict:
    """What GET /patients/{id} and the patient page show of one site's record."""
    from chronorisk.serving.store import conditions_list

    patient = record["patient"] or {}
    by_task: dict[str, list[dict]] = {}
    # consent withdrawn at this site: no stored risk, trend or factor is shown any more
    for row in record["scores"] if record["consent_withdrawn_at"] is None else ():
        by_task.setdefault(row["task"], []).append(row)
    tasks = []
    for task, rows in by_task.items():
        trend = [_stored(r) for r in rows]
        tasks.append({"task": task, "latest": trend[-1], "trend": trend})
    birth_year = patient.get("birth_year")
    latest_time = max((t["latest"]["prediction_time"] for t in tasks), default=None)
    age = None
    if birth_year is not None:
        age = (latest_time or utcnow()).year - birth_year
    band = next((r["age_band"] for rows in by_task.values() for r in reversed(rows) if r.get("age_band")), None)
    return {
        "subject_id": subject_id,
        "site": site,
        "sex": patient.get("sex"),
        "age": age,
        "age_band": band,
        "conditions": conditions_list(patient.get("conditions")),
        "consent_withdrawn_at": record["consent_withdrawn_at"],
        "tasks": tasks,
    }


def read_patient_audited(state: ServingState, principal: Principal, subject_id: int, site: str | None,
                         via: str, extra: dict | None = None) -> dict:
    """Read one patient and append the audit entry in ONE transaction: no read without its entry."""
    from chronorisk.serving.store import writer

    try:
        with writer(state.store.engine) as conn, conn.begin():
            data = state.store.read_patient(conn, subject_id)
            chosen = choose_site(principal, data.sites, site)
            view = view_of(data.at(chosen), subject_id, chosen)
            state.audit.append_in(conn, actor=principal.actor, role=principal.role, site=chosen,
                                  action="patient_read", subject_id=subject_id, detail={"via": via, **(extra or {})})
    except NotYours:
        audit_denied(state, principal, f"patient read via {via}", "another site's patient", subject_id)
        raise
    return view


def _stored(r: dict) -> dict:
    return {k: r[k] for k in ("task", "prediction_time", "risk", "tier", "model_name", "model_version",
                              "scored_at", "factors")}


@router.get(
    "/patients/{subject_id}", response_model=S.PatientResponse, tags=["patients"],
    responses=S.error_responses(404),
)
async def get_patient(  # async on purpose: a few indexed queries, cheaper than a thread hop
    subject_id: SubjectPath,
    principal: Annotated[Principal, Depends(require("patient_read"))],
    state: StateDep,
    site: Annotated[S.SiteId | None, Query(description="the site's record (default: the caller's)")] = None,
) -> Response:
    """Latest stored scores of a patient per task, their trend and factors (audited)."""
    return FastJSON(read_patient_audited(state, principal, subject_id, site, "api"))


@router.get(
    "/patients/{subject_id}/factors", tags=["patients"],
    response_model=S.FactorsResponse, responses=S.error_responses(404, 409, 410, 503),
)
def patient_factors(
    request: Request,
    subject_id: SubjectPath,
    task: Annotated[S.TaskName, Query()],
    principal: Annotated[Principal, Depends(require("patient_read"))],
    state: StateDep,
    site: Annotated[S.SiteId | None, Query()] = None,
) -> dict:
    """Factors of the latest stored score, computed on demand when not stored (low tier)."""
    chosen = readable_site(state, principal, subject_id, site, route_of(request.scope))
    result = explain_on_demand(state, subject_id, chosen, task)
    state.audit.append(actor=principal.actor, role=principal.role, site=chosen, action="patient_explain",
                       subject_id=subject_id, detail={"task": task, "via": "api"})
    return result


def explain_on_demand(state: ServingState, subject_id: int, site: str, task: str) -> dict:
    from chronorisk.serving import scoring

    latest = latest_stored_score(state, subject_id, site, task, refusal="no risk or factors are shown")
    if latest["factors"] is not None:
        return {"task": task, "prediction_time": latest["prediction_time"], "factors": latest["factors"],
                "model_version": latest["model_version"], "computed": "stored"}
    model, events = served_model_and_events(state, subject_id, site, task)
    feats, reason = scoring.features_from_events(model, events, latest["prediction_time"])
    if feats is None:
        raise HTTPException(409, f"cannot explain: {reason}")
    _, _, factors = scoring.predict(model, feats, explain=True, top_k=state.top_k)
    return {"task": task, "prediction_time": latest["prediction_time"],
            "factors": factors[0], "model_version": model.version,
            "scored_by": latest["model_version"], "computed": "on demand"}


@router.get("/worklist", response_model=S.WorklistResponse, tags=["patients"], responses=S.error_responses())
def worklist(
    principal: Annotated[Principal, Depends(require("worklist"))],
    state: StateDep,
    task: Annotated[S.TaskName | None, Query()] = None,
    tier: Annotated[list[S.Tier] | None, Query(max_length=3)] = None,
    min_risk: Annotated[float | None, Query(ge=0, le=1)] = None,
    site: Annotated[S.SiteId | None, Query(description="admins choose a site; GPs see their own")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> dict:
    """The site's patients by risk (latest score per task), consent-withdrawn patients left out."""
    chosen = worklist_site(principal, site)
    rows = state.store.worklist(chosen, task=task, tiers=tier, min_risk=min_risk, limit=limit, offset=offset)
    state.audit.append(actor=principal.actor, role=principal.role, site=chosen, action="worklist_read",
                       detail=worklist_audit(task, tier, min_risk, rows, "api"))
    return {"site": chosen, "rows": [_worklist_row(r) for r in rows]}


def worklist_audit(task, tier, min_risk, rows: list[dict], via: str) -> dict:
    """The audit detail of a worklist: the filters and which patients were listed."""
    return {"task": task, "tier": tier, "min_risk": min_risk, "n_rows": len(rows), "via": via,
            "subjects": sorted({int(r["subject_id"]) for r in rows})}


def worklist_site(principal: Principal, site: str | None) -> str:
    if principal.role == "gp":
        if site is not None and site != principal.site:
            raise HTTPException(403, "a GP reads only the patients of their own site")
        return principal.site
    if site is None:
        raise InputError("site", "choose a site")
    return site


def _worklist_row(r: dict) -> dict:
    return {k: r.get(k) for k in ("subject_id", "task", "prediction_time", "risk", "tier", "age_band", "sex",
                                  "model_version")} | {"conditions": r.get("conditions") or []}

