"""POST /score: risk, tier and top factors per task for one patient."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from chronorisk.errors import InputError
from chronorisk.frames import pick_columns, without_column
from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.middleware import METRICS
from chronorisk.serving.routes.common import FastJSON, StateDep, require
from chronorisk.serving.state import ServingState
from chronorisk.serving.store import utcnow

router = APIRouter()
log = logging.getLogger(__name__)


@router.post(
    "/score", response_model=S.ScoreResponse, tags=["scoring"], responses=S.error_responses(409, 413, 503),
)
async def score(
    body: S.ScoreRequest,
    principal: Annotated[Principal, Depends(require("score"))],
    state: StateDep,
) -> Response:
    """Risk, tier and top factors per task for one patient (events, FHIR bundle or features)."""
    if body.features is not None:
        # about a millisecond of numpy and LightGBM: cheaper on the event loop than a thread hop
        return score_response(body, principal, state)
    # events: polars releases the GIL while it builds the features, so other requests go on meanwhile
    return await run_in_threadpool(score_response, body, principal, state)


def score_response(body: S.ScoreRequest, principal: Principal, state: ServingState) -> Response:
    """The /score answer: validate the request against the served models, score, log for monitoring."""
    when, site, results = score_results(body, principal, state)
    return FastJSON({"prediction_time": when, "site": site, "results": [r.as_dict() for r in results]})


def score_results(body: S.ScoreRequest, principal: Principal, state: ServingState, events=None) -> tuple:
    """(prediction time, site, TaskResults) of one scoring request, logged for monitoring; `events`
    already converted (FHIR `$score`, CDS Hooks) replace the body's events or bundle."""
    from chronorisk.serving import scoring

    if principal.role == "gp" and body.site and body.site != principal.site:
        raise HTTPException(403, "a GP scores for their own site only")
    site = body.site or principal.site
    when = body.prediction_time or utcnow()
    if body.events is not None and len(body.events) > state.config.max_events:
        raise InputError("events", f"at most {state.config.max_events} events per request (serve.max_events)")
    subject = None
    given = events
    if events is not None:
        pass
    elif body.events is not None:
        subject = next((e.subject_id for e in body.events if e.subject_id is not None), None)
        if subject is not None and state.store.patient_consent(subject).withdrawn_at(site) is not None:
            # neither scored nor logged for monitoring
            raise HTTPException(409, "this patient withdrew consent: they are not scored")
        events = scoring.events_frame([e.__dict__ for e in body.events], subject or 0)
    elif body.fhir is not None:
        events = scoring.fhir_events(body.fhir.model_dump(exclude_none=True))
    tasks = _served_tasks(state, body.tasks)

    def log_for_monitoring(model, feats, risk, tiers) -> None:
        if state.monitor is not None:
            known = feats
            if subject is None and hasattr(feats, "drop"):  # no id given: no join key either
                known = without_column(feats, "subject_id")
            state.monitor.live(model, known, risk, tiers, site, when)
            if events is not None and hasattr(feats, "columns"):  # values the features read and dropped
                live_input_checks(state.monitor.log, model, events, feats, site)

    results = scoring.score_one(
        state.models, tasks, events=events, features=body.features, prediction_time=when,
        explain=body.explain, top_k=body.top_k, on_scored=log_for_monitoring, site=site,
    )
    for r in results:
        METRICS.scored(r.task, r.tier)
    state.audit.append(actor=principal.actor, role=principal.role, site=site, action="score", subject_id=subject,
                       detail={"tasks": tasks, "source": "given events" if given is not None else "events"
                               if body.events is not None else "fhir" if body.fhir is not None else "features"})
    return when, site, results


def live_input_checks(prediction_log, model, events, feats, site: str | None) -> None:
    """Count the request's impossible input values (the rule of every scoring path) into the buffered
    input-check log, which checks the requests it holds together when it writes them; monitoring never
    fails a score."""
    from chronorisk.serving.prediction_log import input_check_buffer

    try:
        rows = pick_columns(feats, ["subject_id", "prediction_time"])
        input_check_buffer(prediction_log).add_request(model.spec, events, rows, model.task, site or "unknown")
    except Exception as exc:
        log.warning("prediction log: input checks failed (%s)", type(exc).__name__)


def _served_tasks(state: ServingState, asked: list[str] | None) -> list[str]:
    if not asked:
        if not state.models:
            raise HTTPException(503, "no model is loaded: train and promote a champion first")
        return list(state.models)
    for i, task in enumerate(asked):
        if task not in state.config.tasks:
            raise InputError(f"tasks[{i}]", f"unknown task {task!r}; served: {', '.join(state.config.tasks)}")
        if task not in state.models:
            raise HTTPException(503, f"no model is loaded for task {task}")
    return list(dict.fromkeys(asked))
