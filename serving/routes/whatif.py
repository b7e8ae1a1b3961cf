"""What-if: the model's risk for a patient's record with a changed modifiable value (audited read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.routes.common import (
    StateDep,
    SubjectPath,
    latest_stored_score,
    readable_site,
    require,
    served_model_and_events,
)
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
    return whatif_for(state, principal, subject_id, body.site, body.task, dict(body.changes), via="api",
                      units=body.units)


def patient_record_events(state: ServingState, subject_id: int, site: str, task: str):
    """(model, the patient's events, the latest stored prediction time of `task`); 410 / 404 / 503 otherwise."""
    latest = latest_stored_score(state, subject_id, site, task, refusal="they are not scored")
    model, events = served_model_and_events(state, subject_id, site, task)
    return model, events, latest["prediction_time"]


def whatif_for(state: ServingState, principal: Principal, subject_id: int, site: str | None, task: str,
               changes: dict[str, float], *, via: str, units: dict[str, str] | None = None) -> dict:
    from chronorisk.serving import whatif

    chosen = readable_site(state, principal, subject_id, site, "/patients/{subject_id}/whatif")
    model, events, when = patient_record_events(state, subject_id, chosen, task)
    result = whatif.what_if(model, events, when, changes, units)
    state.audit.append(actor=principal.actor, role=principal.role, site=chosen, action="patient_whatif",
                       subject_id=subject_id, detail={"task": task, "changed": sorted(changes), "via": via})
    return result
