"""FHIR R4 RiskAssessment: every stored score of a patient, and `$score` of a patient's FHIR bundle.

Role, site scope, consent and the audit log are those of `/patients` (a read) and `/score` (a score):
the same functions, not a second copy of the rules.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from chronorisk.errors import InputError
from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.explanations import units_of
from chronorisk.serving.routes.common import StateDep, require
from chronorisk.serving.state import ServingState

router = APIRouter()

FHIR_JSON = "application/fhir+json"
_SUBJECT = re.compile(r"^(?:Patient/)?(\d{1,19})\Z")  # \Z: no trailing newline
_ERRORS = S.error_responses(404, 409, 413, 503)


class FhirJSON(Response):
    media_type = FHIR_JSON

    def render(self, content) -> bytes:
        import orjson

        return orjson.dumps(content)


def subject_of(reference: str) -> int:
    """The pseudonymous subject id of `Patient/<id>` (or `<id>`); InputError naming `subject` otherwise."""
    match = _SUBJECT.match(reference.strip())
    if match is None or int(match[1]) > S.INT64_MAX:
        raise InputError("subject", f"expected Patient/<pseudonymous subject id>, got {reference[:40]!r}")
    return int(match[1])


def stored_resource_id(subject_id: int, task: str, prediction_time: datetime) -> str:
    return f"{subject_id}-{task.replace('_', '-')}-{prediction_time:%Y%m%d}"


@router.get("/fhir/RiskAssessment", tags=["fhir"], responses=_ERRORS)
async def search_risk_assessments(
    request: Request,
    subject: Annotated[str, Query(max_length=27, pattern=r"^(Patient/)?[0-9]{1,19}$",
                                  description="Patient/<pseudonymous subject id>")],
    principal: Annotated[Principal, Depends(require("patient_read"))],
    state: StateDep,
    site: Annotated[S.SiteId | None, Query(description="the site's record (default: the caller's)")] = None,
) -> Response:
    """A searchset Bundle: one RiskAssessment per stored score of the patient (every task and date)."""
    from chronorisk.serving.routes.patients import read_patient_audited

    subject_id = subject_of(subject)
    view = read_patient_audited(state, principal, subject_id, site, "fhir")
    base = str(request.base_url).rstrip("/")
    return FhirJSON(searchset_of(state, view, subject_id, base))


def searchset_of(state: ServingState, view: dict, subject_id: int, base_url: str) -> dict:
    from chronorisk.serving import fhir_risk

    resources = []
    for task in view["tasks"]:
        task_def, spec = task_meaning(state, task["task"])
        for score in task["trend"]:
            resources.append(fhir_risk.risk_assessment(
                task_def=task_def, spec=spec, subject=f"Patient/{subject_id}",
                prediction_time=score["prediction_time"], risk=score["risk"], tier=score["tier"],
                model_name=score["model_name"], model_version=score["model_version"],
                factors=factors_of(score["factors"]),
                resource_id=stored_resource_id(subject_id, task["task"], score["prediction_time"]),
                units=units_of(state.config),
            ))
    return fhir_risk.searchset(resources, base_url)


def factors_of(stored) -> list[dict] | None:
    if stored is None or isinstance(stored, list):
        return stored
    import json

    return json.loads(stored)


def task_meaning(state: ServingState, task: str):
    """(task definition, feature spec or None) of a task: the served model's, else the task file's."""
    model = state.models.get(task)
    if model is not None:
        return model.task_def, model.spec
    from chronorisk.features.tasks import load_task

    return load_task(task), None


@router.post("/fhir/RiskAssessment/$score", tags=["fhir"], responses=_ERRORS)
async def score_bundle(
    body: S.FhirBundle,
    principal: Annotated[Principal, Depends(require("score"))],
    state: StateDep,
    task: Annotated[S.TaskName | None, Query(description="one task (default: every served task)")] = None,
    prediction_time: Annotated[S.PastDatetime | None, Query(description="default: now")] = None,
    site: Annotated[S.SiteId | None, Query(description="default: the caller's site")] = None,
) -> Response:
    """Score a patient's FHIR Bundle: a RiskAssessment for the `task` asked, else a collection Bundle of
    one per served task whose population the patient is in."""
    return await run_in_threadpool(score_bundle_response, body, principal, state, task, prediction_time, site)


def score_bundle_response(body: S.FhirBundle, principal: Principal, state: ServingState, task: str | None,
                          prediction_time: datetime | None, site: str | None) -> Response:
    resources = assess_bundle(body.model_dump(exclude_none=True), principal, state,
                              [task] if task else None, prediction_time, site)
    if task is not None:
        if not resources:
            raise InputError("task", f"the patient is not in the {task} population at the prediction time")
        return FhirJSON(resources[0])
    return FhirJSON({"resourceType": "Bundle", "type": "collection",
                     "entry": [{"resource": r} for r in resources]})


def refuse_withdrawn(state: ServingState, patient_id: str | None, site: str | None) -> None:
    """409 for a bundle of a patient who withdrew consent, when the service can map the EHR's id to the
    pseudonym (the ingestion's key, as CDS Hooks does); without the key the id cannot be known here."""
    from chronorisk.serving.routes.cds_hooks import cds_state

    pseudonymizer = cds_state(state).pseudonymizer
    if pseudonymizer is None or not patient_id:
        return
    if state.store.patient_consent(pseudonymizer.subject_id(patient_id)).withdrawn_at(site) is not None:
        raise HTTPException(409, "this patient withdrew consent: they are not scored")


def assess_bundle(bundle: dict, principal: Principal, state: ServingState, tasks: list[str] | None,
                  prediction_time: datetime | None, site: str | None, field: str = "body") -> list[dict]:
    """RiskAssessments of every eligible task of one patient's bundle (scored like /score)."""
    from chronorisk.serving import fhir_risk, scoring
    from chronorisk.serving.routes.score import score_results

    record = scoring.fhir_record(bundle, field)
    refuse_withdrawn(state, record.patient_id, site or principal.site)
    request = S.ScoreRequest.model_construct(tasks=tasks, prediction_time=prediction_time, site=site, explain=True,
                                             top_k=state.top_k, events=None, fhir=None, features=None)
    when, _, results = score_results(request, principal, state, events=record.events)
    subject = f"Patient/{record.patient_id}" if record.patient_id else None
    out = []
    for r in results:
        if not r.eligible:
            continue
        model = state.models[r.task]
        resource = fhir_risk.risk_assessment(
            task_def=model.task_def, spec=model.spec, subject=subject or "Patient/unknown",
            prediction_time=when, risk=r.risk, tier=r.tier, model_name=r.model_name,
            model_version=r.model_version, factors=r.factors,
            basis=fhir_risk.basis_references(r.factors, model.spec, record.sources, when),
            units=units_of(state.config),
        )
        if subject is None:
            resource["subject"] = {"display": "the patient of the submitted bundle"}
        out.append(resource)
    return out
