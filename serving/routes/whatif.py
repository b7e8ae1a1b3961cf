"""What-if: the model's risk for a patient's record with a changed modifiable value (audited read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException

from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.routes.common import StateDep, SubjectPath, readable_site, require
from chronorisk.serving.state import ServingState

router = APIRouter()


@router.post(
    "/patients/{subject_id}/whatif", tags=["patients"],
    responses=S.error_responses(404, 410, 413, 503),
)
def patient_whatif(
    subject_id: SubjectPath,
    body: S.WhatIfRequest,
    principal: Annotated[Principal, Depends(require("patient_read"))],
    state: StateDep,
) -> dict:
    """Current risk and the model's estimate with the changed values, at the latest stored prediction time
    (labelled: the model's estimate, not a treatment effect)."""
    return whatif_for(state, principal, subject_id, body.site, body.task, dict(body.changes), via="api")


def patient_record_events(state: ServingState, subject_id: int, site: str, task: str):
    """(model, the patient's events, the latest stored prediction time of `task`); 404 / 503 otherwise."""
    from chronorisk.serving import scoring

    record = state.store.patient_record(subject_id, [site]) or {"scores": [], "consent_withdrawn_at": None}
    if record["consent_withdrawn_at"] is not None:
        raise HTTPException(410, "the patient withdrew consent at this site: they are not scored")
    rows = [r for r in record["scores"] if r["task"] == task]
    if not rows:
        raise HTTPException(404, f"no stored score for task {task}")
    model = state.models.get(task)
    if model is None:
        raise HTTPException(503, f"no model is loaded for task {task}")
    events = scoring.subject_events(state.meds_root, site, subject_id)
    if events is None or events.height == 0:
        raise HTTPException(404, "the patient's records are not available to this service")
    return model, events, rows[-1]["prediction_time"]


def whatif_for(state: ServingState, principal: Principal, subject_id: int, site: str | None, task: str,
               changes: dict[str, float], *, via: str) -> dict:
    from chronorisk.serving import whatif

    chosen = readable_site(state, principal, subject_id, site, "/patients/{subject_id}/whatif")
    model, events, when = patient_record_events(state, subject_id, chosen, task)
    result = whatif.what_if(model, events, when, changes)
    state.audit.append(actor=principal.actor, role=principal.role, site=chosen, action="patient_whatif",
                       subject_id=subject_id, detail={"task": task, "changed": sorted(changes), "via": via})
    return result
