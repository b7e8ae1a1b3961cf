"""What every route module shares: the serving state, the caller (API key or page session), the role
check (401 without a valid key, 403 for the wrong role), the site a caller may read, and fast JSON."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.state import ServingState

SESSION_COOKIE = "chronorisk_session"
bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer crk_<id>_<secret>`")

async def get_state(request: Request) -> ServingState:
    state = getattr(request.app.state, "serving", None)
    if state is None:
        raise HTTPException(503, "the service is starting")
    return state


def authenticate(request: Request, state: ServingState) -> Principal | None:
    """The caller from an API key header, else from the page session cookie."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        return state.keys.authenticate_key(value) if scheme.lower() == "bearer" else None
    key = request.headers.get("x-api-key")
    if key:
        return state.keys.authenticate_key(key)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        return state.keys.authenticate_session(token)
    return None


def require(permission: str):
    """Dependency: the authenticated caller, who must hold `permission` (401 / 403 otherwise)."""

    async def dependency(  # async: a key look-up is a cache hit or one indexed query, no thread hop
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        state: Annotated[ServingState, Depends(get_state)],
    ) -> Principal:
        principal = authenticate(request, state)
        if principal is None:
            raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
        if not principal.can(permission):
            raise HTTPException(403, f"role {principal.role} may not {permission.replace('_', ' ')}")
        return principal

    return dependency


class FastJSON(Response):
    """orjson-rendered JSON. Hot routes return it directly, skipping FastAPI's second validation
    of the answer against `response_model` (which stays for the OpenAPI document)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        import orjson

        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


StateDep = Annotated[ServingState, Depends(get_state)]
SubjectPath = Annotated[int, Path(ge=0, le=S.INT64_MAX, description="pseudonymous subject id")]


def choose_site(principal: Principal, sites: list[str], site: str | None) -> str:
    """The site whose record the caller may read: 404 unknown patient, 403 another site's patient."""
    if not sites or (site is not None and site not in sites):
        raise HTTPException(404, "no such patient")
    readable = [s for s in sites if principal.may_read_site(s)]
    if site is not None:
        readable = [s for s in readable if s == site]
    if not readable:
        raise HTTPException(403, "a GP reads only the patients of their own site")
    return readable[0]


def readable_site(state: ServingState, principal: Principal, subject_id: int, site: str | None) -> str:
    return choose_site(principal, state.store.patient_sites(subject_id), site)



def error_body(message: str, fields: list[dict] | None = None) -> dict:
    return {"error": message, "fields": fields or []}
