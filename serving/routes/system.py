"""Service routes: Prometheus metrics, the caller's identity, and the root redirect."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials

from chronorisk.serving import schemas as S
from chronorisk.serving.middleware import metrics_text
from chronorisk.serving.routes.common import StateDep, authenticate, bearer

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus metrics: an mlops or admin key unless `serve.metrics_access: open` (private bind only)."""
    state = getattr(request.app.state, "serving", None)
    if state is not None and state.config.metrics_access == "key":
        principal = authenticate(request, state)
        if principal is None:
            raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
        if not principal.can("ops"):
            raise HTTPException(403, f"role {principal.role} may not read metrics")
    body, content_type = metrics_text(state.work / "monitoring" if state is not None else None)
    return Response(body, media_type=content_type)


@router.get("/whoami", tags=["access"], summary="the caller's role and site", response_model=S.WhoAmI,
            responses=S.error_responses())
async def whoami_route(request: Request, state: StateDep,
                 _c: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> dict:
    principal = authenticate(request, state)
    if principal is None:
        raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
    return {"key_id": principal.key_id, "role": principal.role, "site": principal.site}


@router.get("/", include_in_schema=False)
def root() -> Response:
    return Response(status_code=303, headers={"Location": "/ui/"})

