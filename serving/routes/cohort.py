"""Cohorts (rows, aggregates, exports) and consent withdrawal."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.consent_files import purge_monitoring, sync_withdrawn
from chronorisk.serving.routes.common import StateDep, require
from chronorisk.serving.state import ServingState
from chronorisk.serving.store import utcnow

log = logging.getLogger(__name__)

router = APIRouter()


@router.post("/cohort", response_model=S.CohortResponse, tags=["cohorts"], responses=S.error_responses(413))
def cohort_rows(
    body: S.CohortQuery,
    principal: Annotated[Principal, Depends(require("cohort"))],
    state: StateDep,
) -> dict:
    """De-identified rows of a cohort (per-release record ids, k-anonymous; highest risk first; `limit` rows,
    `n` counts every released row; `deidentification` says what was generalized and suppressed)."""

    limit = min(body.limit, state.config.cohort_row_limit)
    result = deidentified_cohort(state, body, limit)
    state.audit.append(actor=principal.actor, role=principal.role, action="cohort_read",
                       detail={"query": result.query, "n": result.n, "rows": len(result.rows),
                               "model_versions": result.model_versions, "deidentification": result.deidentification})
    return {"query": result.query, "prediction_time": result.prediction_time, "n": result.n,
            "truncated": result.truncated, "model_versions": result.model_versions, "rows": result.rows,
            "deidentification": result.deidentification}


def deidentified_cohort(state: ServingState, body: S.CohortQuery, limit: int | None):
    from chronorisk.serving import cohort

    return cohort.cohort(state.store, body, k=state.config.k_anonymity, limit=limit,
                         max_suppressed_share=state.config.export_max_suppressed_share)


def privacy_budget(state: ServingState):
    from chronorisk.serving.privacy import PrivacyBudget

    cfg = state.config
    return PrivacyBudget(cfg.dp_epsilon, cfg.dp_budget, cfg.dp_budget_days)


def private_aggregate(state: ServingState, principal: Principal, body: S.AggregateQuery) -> dict:
    """Noisy counts charged to the caller's privacy budget (429 when it is spent)."""
    from chronorisk.serving import cohort
    from chronorisk.serving.privacy import BudgetExhausted

    try:
        return cohort.aggregate(state.store, body, small_cell=state.config.small_cell,
                                budget=privacy_budget(state), analyst=principal.actor)
    except BudgetExhausted as exc:
        raise HTTPException(429, str(exc)) from None


@router.post("/cohort/aggregate", response_model=S.AggregateResponse, tags=["cohorts"],
             responses=S.error_responses(413))
def cohort_aggregate(
    body: S.AggregateQuery,
    principal: Annotated[Principal, Depends(require("cohort"))],
    state: StateDep,
) -> dict:
    """Counts by site / tier / age band / sex with differentially private noise (`privacy` says the epsilon,
    the noise scale and the budget left); noisy counts under `serve.small_cell` suppressed."""
    result = private_aggregate(state, principal, body)
    state.audit.append(actor=principal.actor, role=principal.role, action="cohort_aggregate",
                       detail={"query": result["query"], "model_versions": result["model_versions"],
                               "epsilon": result["privacy"]["epsilon"]})
    return result


@router.post("/cohort/export", tags=["cohorts"],
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}},
                                          "application/vnd.apache.parquet": {"schema": {"type": "string",
                                                                                        "format": "binary"}}}},
                        **S.error_responses(413)})
def cohort_export(
    body: S.ExportQuery,
    principal: Annotated[Principal, Depends(require("export"))],
    state: StateDep,
) -> Response:
    """The whole cohort, de-identified as /cohort, as CSV or Parquet; the query, the model versions and what
    de-identification did go with it (X-Chronorisk-Export, Parquet metadata) and to the audit log."""
    return export_response(state, principal, body, via="api")


def export_response(state: ServingState, principal: Principal, body: S.ExportQuery, *, via: str) -> Response:
    import json

    from chronorisk.serving import cohort

    result = deidentified_cohort(state, body, None)
    data = cohort.export_bytes(result, body.format)
    meta = cohort.export_metadata(result)
    seq = state.audit.append(actor=principal.actor, role=principal.role, action="export",
                             detail={"format": body.format, "via": via, **meta})
    stamp = (result.prediction_time or utcnow()).strftime("%Y%m%d")
    name = f"cohort-{body.task}-{stamp}.{body.format}"
    media = "text/csv" if body.format == "csv" else "application/vnd.apache.parquet"
    headers = {
        "Content-Disposition": f'attachment; filename="{name}"',
        "X-Chronorisk-Export": json.dumps(
            {"query": meta["query"], "prediction_time": meta["prediction_time"],
             "model_versions": meta["model_versions"], "n_rows": meta["n_rows"], "audit_entry": seq,
             "deidentification": meta["deidentification"]},
            separators=(",", ":"),
        ),
    }
    return Response(data, media_type=media, headers=headers)


@router.post("/consent/withdraw", response_model=S.ConsentResponse, tags=["consent"],
             responses=S.error_responses(404, 413))
def withdraw_consent(
    body: S.ConsentWithdrawal,
    principal: Annotated[Principal, Depends(require("consent"))],
    state: StateDep,
) -> dict:
    """Record a withdrawal at the patient's site (exactly one of their sites; default every site, a GP's
    own site): from now on no stored score, factor, worklist row, cohort, export or score of theirs."""
    from chronorisk.serving.store import UnknownSubject

    site = body.site
    if principal.role == "gp":
        if site is not None and site != principal.site:
            raise HTTPException(403, "a GP records withdrawals for their own site's patients only")
        site = principal.site
        if site not in state.store.patient_sites(body.subject_id):
            raise HTTPException(404, "no such patient at your site")
    try:
        at = state.store.withdraw_consent(body.subject_id, site=site, by=principal.actor, audit=state.audit,
                                          role=principal.role)
    except UnknownSubject:
        raise HTTPException(404, "no such patient") from None
    sync_withdrawn(state.store, state.meds_root)  # the next training and federated runs leave them out
    _purge_monitoring(state, principal, body.subject_id)
    return {"withdrawn_at": at, "site": site}


def _purge_monitoring(state, principal: Principal, subject_id: int) -> None:
    """The patient's earlier rows leave the monitoring log now (this worker's buffered rows written first);
    a failure is logged, not answered: `chronorisk monitor` purges again before it reads."""
    try:
        if state.monitor is not None:
            state.monitor.flush()
        purge_monitoring(state.store, state.work, state.audit, actor=principal.actor, role=principal.role,
                         subject_id=subject_id)
    except Exception as exc:
        log.warning("monitoring purge after a withdrawal failed (%s)", type(exc).__name__)


@router.post("/consent/renew", response_model=S.ConsentRenewalResponse, tags=["consent"],
             responses=S.error_responses(404, 413))
def renew_consent(
    body: S.ConsentWithdrawal,
    principal: Annotated[Principal, Depends(require("admin"))],
    state: StateDep,
) -> dict:
    """An admin records that a patient who withdrew consents again (at `site`, default every site)."""
    from chronorisk.serving.store import UnknownSubject

    if not state.store.patient_sites(body.subject_id):
        raise HTTPException(404, "no such patient")
    try:
        at = state.store.renew_consent(body.subject_id, site=body.site, by=principal.actor, audit=state.audit,
                                       role=principal.role)
    except UnknownSubject:
        raise HTTPException(404, "no such patient") from None
    sync_withdrawn(state.store, state.meds_root)
    return {"renewed_at": at, "site": body.site}
