"""Cohorts (rows, aggregates, exports) and consent withdrawal."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.routes.common import StateDep, require
from chronorisk.serving.state import ServingState
from chronorisk.serving.store import utcnow

router = APIRouter()


@router.post("/cohort", response_model=S.CohortResponse, tags=["cohorts"],
          responses={401: {"model": S.ErrorResponse}, 403: {"model": S.ErrorResponse},
                     422: {"model": S.ErrorResponse}})
def cohort_rows(
    body: S.CohortQuery,
    principal: Annotated[Principal, Depends(require("cohort"))],
    state: StateDep,
) -> dict:
    """Pseudonymous rows of a cohort (highest risk first; `limit` rows, `n` counts all)."""
    from chronorisk.serving import cohort

    limit = min(body.limit, state.config.cohort_row_limit)
    result = cohort.cohort(state.store, body, limit=limit)
    state.audit.append(actor=principal.actor, role=principal.role, action="cohort_read",
                       detail={"query": result.query, "n": result.n, "rows": len(result.rows),
                               "model_versions": result.model_versions})
    return {"query": result.query, "prediction_time": result.prediction_time, "n": result.n,
            "truncated": result.truncated, "model_versions": result.model_versions, "rows": result.rows}


@router.post("/cohort/aggregate", response_model=S.AggregateResponse, tags=["cohorts"],
          responses={401: {"model": S.ErrorResponse}, 403: {"model": S.ErrorResponse},
                     422: {"model": S.ErrorResponse}})
def cohort_aggregate(
    body: S.AggregateQuery,
    principal: Annotated[Principal, Depends(require("cohort"))],
    state: StateDep,
) -> dict:
    """Counts by site / tier / age band / sex; counts under `serve.small_cell` suppressed."""
    from chronorisk.serving import cohort

    result = cohort.aggregate(state.store, body, small_cell=state.config.small_cell)
    state.audit.append(actor=principal.actor, role=principal.role, action="cohort_aggregate",
                       detail={"query": result["query"], "model_versions": result["model_versions"]})
    return result


@router.post("/cohort/export", tags=["cohorts"],
          responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}},
                     401: {"model": S.ErrorResponse}, 403: {"model": S.ErrorResponse},
                     422: {"model": S.ErrorResponse}})
def cohort_export(
    body: S.ExportQuery,
    principal: Annotated[Principal, Depends(require("export"))],
    state: StateDep,
) -> Response:
    """The whole cohort as CSV or Parquet; the query and model versions go with it and to the audit log."""
    return export_response(state, principal, body, via="api")


def export_response(state: ServingState, principal: Principal, body: S.ExportQuery, *, via: str) -> Response:
    import json

    from chronorisk.serving import cohort

    result = cohort.cohort(state.store, body, limit=None)
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
             "model_versions": meta["model_versions"], "n_rows": meta["n_rows"], "audit_entry": seq},
            separators=(",", ":"),
        ),
    }
    return Response(data, media_type=media, headers=headers)


@router.post("/consent/withdraw", response_model=S.ConsentResponse, tags=["consent"],
          responses={401: {"model": S.ErrorResponse}, 403: {"model": S.ErrorResponse},
                     404: {"model": S.ErrorResponse}, 422: {"model": S.ErrorResponse}})
def withdraw_consent(
    body: S.ConsentWithdrawal,
    principal: Annotated[Principal, Depends(require("consent"))],
    state: StateDep,
) -> dict:
    """Record a withdrawal: from now on the patient is left out of exports, cohorts and worklists."""
    site = body.site
    if principal.role == "gp":
        if site is not None and site != principal.site:
            raise HTTPException(403, "a GP records withdrawals for their own site's patients only")
        site = principal.site
        if site not in state.store.patient_sites(body.subject_id):
            raise HTTPException(404, "no such patient at your site")
    at = state.store.withdraw_consent(body.subject_id, site=site, by=principal.actor)
    state.audit.append(actor=principal.actor, role=principal.role, site=site, action="consent_withdraw",
                       subject_id=body.subject_id, detail={"withdrawn_at": at.isoformat()})
    return {"withdrawn_at": at, "site": site}

