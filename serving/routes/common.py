"""What every route module shares: the serving state, the caller (API key or page session), the role
check (401 without a valid key, 403 for the wrong role), the site a caller may read, and fast JSON."""

from __future__ import annotations

from typing import Annotated

from annotated_types import Ge, Le
from fastapi import Depends, HTTPException, Path, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BeforeValidator, WithJsonSchema

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
    """The caller from an API key header, else from the page session cookie. Failed keys are counted per
    client address and key id; over the limit the answer is 429 with Retry-After (access.AuthGuard)."""
    from chronorisk.serving.access import TooManyAttempts

    address = request.client.host if request.client else "unknown"
    try:
        auth = request.headers.get("authorization")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer":
                return None
            return state.keys.authenticate_key(value, address)
        key = request.headers.get("x-api-key")
        if key:
            return state.keys.authenticate_key(key, address)
    except TooManyAttempts as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        return state.keys.authenticate_session(token)
    return None


def require(permission: str):
    """Dependency: the authenticated caller, who must hold `permission` (401 / 403 otherwise; 403s audited)."""

    async def dependency(  # async: a key look-up is a cache hit or one indexed query, no thread hop
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        state: Annotated[ServingState, Depends(get_state)],
    ) -> Principal:
        principal = authenticate(request, state)
        if principal is None:
            raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
        if not principal.can(permission):
            audit_denied(state, principal, route_of(request.scope), f"role lacks {permission}")
            raise HTTPException(403, f"role {principal.role} may not {permission.replace('_', ' ')}")
        return principal

    return dependency


def route_of(scope) -> str:
    """The route template of a request (never its path, which can hold an id)."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


def audit_denied(state: ServingState, principal: Principal, route: str, reason: str,
                 subject_id: int | None = None) -> None:
    """Record a refused request (wrong role, another site's patient) in the audit log."""
    state.audit.append(actor=principal.actor, role=principal.role, site=principal.site, action="access_denied",
                       subject_id=subject_id, detail={"route": route, "reason": reason})


class FastJSON(Response):
    """orjson-rendered JSON. Hot routes return it directly, skipping FastAPI's second validation
    of the answer against `response_model` (which stays for the OpenAPI document)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        import orjson

        # naive store times are UTC: written with their zone (RFC 3339), as the OpenAPI document says
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z)


StateDep = Annotated[ServingState, Depends(get_state)]
SubjectPath = Annotated[int, BeforeValidator(S.plain_int), Ge(0), Le(S.ID_MAX),
                        WithJsonSchema({"type": "integer", "minimum": 0, "maximum": S.ID_MAX}),
                        Path(description="pseudonymous subject id (digits only)")]


class NotYours(HTTPException):
    """Another site's patient: answered exactly like an unknown one (404), but audited as a denial."""

    def __init__(self):
        super().__init__(404, NO_SUCH_PATIENT)


NO_SUCH_PATIENT = "no such patient"


def choose_site(principal: Principal, sites: list[str], site: str | None) -> str:
    """The site whose record the caller may read. The same 404 for an unknown patient and for another
    site's patient (NotYours, which callers audit), so that a GP cannot learn which ids exist elsewhere."""
    if not sites or (site is not None and site not in sites):
        raise HTTPException(404, NO_SUCH_PATIENT)
    readable = [s for s in sites if principal.may_read_site(s)]
    if site is not None:
        readable = [s for s in readable if s == site]
    if not readable:
        raise NotYours()
    return readable[0]


def readable_site(state: ServingState, principal: Principal, subject_id: int, site: str | None,
                  route: str = "unknown") -> str:
    try:
        return choose_site(principal, state.store.patient_sites(subject_id), site)
    except NotYours:
        audit_denied(state, principal, route, "another site's patient", subject_id)
        raise


def latest_stored_score(state: ServingState, subject_id: int, site: str, task: str, *, refusal: str) -> dict:
    """The patient's latest stored score of `task` at `site`; 410 (`refusal` says what is not done) after a
    consent withdrawal, 404 without a stored score."""
    record = state.store.patient_record(subject_id, [site]) or {"scores": [], "consent_withdrawn_at": None}
    if record["consent_withdrawn_at"] is not None:
        raise HTTPException(410, f"the patient withdrew consent at this site: {refusal}")
    rows = [r for r in record["scores"] if r["task"] == task]
    if not rows:
        raise HTTPException(404, f"no stored score for task {task}")
    return rows[-1]


def served_model_and_events(state: ServingState, subject_id: int, site: str, task: str):
    """(the served model of `task`, the patient's events at `site`); 503 without a model, 404 without records."""
    from chronorisk.serving import scoring

    model = state.models.get(task)
    if model is None:
        raise HTTPException(503, f"no model is loaded for task {task}")
    events = scoring.subject_events(state.meds_root, site, subject_id)
    if events is None or events.height == 0:
        raise HTTPException(404, "the patient's records are not available to this service")
    return model, events


def error_body(message: str, fields: list[dict] | None = None) -> dict:
    return {"error": message, "fields": fields or []}
