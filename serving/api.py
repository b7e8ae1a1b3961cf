"""The HTTP API and pages: a FastAPI app the BentoML service mounts at `/`.

Routes only translate HTTP to the plain modules (scoring, cohort, store,
audit, access). Every route checks the caller's role (401 without a valid
key, 403 for the wrong role or, for a GP, another site); every patient read
and every export is written to the audit log before the data leaves. Bad
input is a 4xx naming the field, never a 500; no route logs an identifier.

BentoML's own request metrics label requests by raw path, which would put
subject ids (`/patients/<id>`) into `/metrics`; the service switches them off
and this app exports its own Prometheus metrics labelled by route template.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from chronorisk.errors import ChronoriskError, InputError
from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.state import ServingState
from chronorisk.serving.store import utcnow

log = logging.getLogger(__name__)

SESSION_COOKIE = "chronorisk_session"
bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer crk_<id>_<secret>`")


# -- state and callers ----------------------------------------------------------------------


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


# -- errors ---------------------------------------------------------------------------------


def error_body(message: str, fields: list[dict] | None = None) -> dict:
    return {"error": message, "fields": fields or []}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        fields = []
        for err in exc.errors()[:50]:
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            fields.append({"field": S.field_path(err.get("loc", ())), "problem": msg})
        first = fields[0] if fields else {"field": "body", "problem": "invalid"}
        return JSONResponse(
            error_body(f"{first['field']}: {first['problem']}", fields), status_code=422
        )

    @app.exception_handler(InputError)
    async def _input(_request: Request, exc: InputError):
        return JSONResponse(error_body(str(exc), [{"field": exc.field, "problem": exc.problem}]), status_code=422)

    @app.exception_handler(ChronoriskError)
    async def _user(_request: Request, exc: ChronoriskError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith("/ui"):
            from chronorisk.serving.web.pages import error_page

            return error_page(request, exc.status_code, str(exc.detail))
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))



class CatchAll:
    """The last line: an exception no handler took is a bug. Answer 500 and log the exception's class
    and place only, never its message (messages can carry data values), and do not re-raise, so that
    no server layer above logs it with its message either."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
            log.error("internal error %s at %s on %s", type(exc).__name__, where, _route_of(scope))
            if not started:
                await _send_json(send, 500, error_body("internal error"))


# -- request size and metrics ---------------------------------------------------------------


class PayloadLimit:
    """Refuse bodies over `serve.max_payload_mb` with 413, by header or while streaming."""

    def __init__(self, app, get_limit):
        self.app = app
        self.get_limit = get_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.get_limit(scope)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _send_json(send, 400, error_body("content-length: not a number"))
            if too_big:
                return await _send_json(send, 413, _too_large(limit))
        seen = 0
        over = False
        replaced = False

        async def limited_receive():
            # past the limit the app sees the body end (never more data), and its answer is replaced by 413
            nonlocal seen, over
            if over:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            nonlocal replaced
            if over:
                if message["type"] == "http.response.start" and not replaced:
                    replaced = True
                    await _send_json(send, 413, _too_large(limit))
                return
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def _too_large(limit: int) -> dict:
    return error_body(
        f"body: larger than the limit of {limit / 1e6:g} MB (serve.max_payload_mb)",
        [{"field": "body", "problem": "too large"}],
    )


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _route_of(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class Metrics:
    """Prometheus metrics labelled by route template (never by a path holding an id)."""

    def __init__(self):
        self._made = False
        self._lock = threading.Lock()

    def _make(self) -> None:
        # created on first use: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker before that
        with self._lock:
            if self._made:
                return
            from prometheus_client import Counter, Histogram

            self.requests = Counter("chronorisk_http_requests", "HTTP requests", ["route", "method", "status"])
            self.latency = Histogram(
                "chronorisk_http_request_seconds", "HTTP request latency", ["route"],
                buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            )
            self.scores = Counter("chronorisk_scores", "patients scored on request", ["task", "tier"])
            self._made = True

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if not self._made:
            self._make()
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def scored(self, task: str, tier: str | None) -> None:
        if not self._made:
            self._make()
        self.scores.labels(task, tier or "none").inc()


METRICS = Metrics()


_SAFE_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]


class MetricsMiddleware:
    """Per-request metrics by route template, and the headers every answer carries."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def wrapped(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # health data: never cached by a browser or proxy; no content sniffing
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *_SAFE_HEADERS]
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            route = _route_of(scope)
            if route != "/metrics":
                METRICS.observe(route, scope.get("method", "?"), status, time.perf_counter() - started)


def metrics_text(monitoring_dir=None) -> tuple[bytes, str]:
    """Every worker's metrics (multiprocess collector when BentoML runs several workers), and the
    monitoring gauges of the latest `chronorisk monitor` run (drifted-feature share per site, ...)."""
    import os

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        body = generate_latest(REGISTRY)
    if monitoring_dir is not None:
        try:
            from chronorisk.serving.monitoring import MonitoringCollector

            extra = CollectorRegistry()
            extra.register(MonitoringCollector(monitoring_dir))
            body += generate_latest(extra)
        except Exception as exc:  # monitoring must never break /metrics
            log.warning("monitoring gauges unavailable (%s)", type(exc).__name__)
    return body, CONTENT_TYPE_LATEST


# -- API routes -----------------------------------------------------------------------------

api = APIRouter()


@api.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    state = getattr(request.app.state, "serving", None)
    body, content_type = metrics_text(state.work / "monitoring" if state is not None else None)
    return Response(body, media_type=content_type)


@api.get("/whoami", tags=["access"], summary="the caller's role and site")
async def whoami_route(request: Request, state: StateDep,
                 _c: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> dict:
    principal = authenticate(request, state)
    if principal is None:
        raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
    return {"key_id": principal.key_id, "role": principal.role, "site": principal.site}


@api.post(
    "/score", response_model=S.ScoreResponse, tags=["scoring"],
    responses={401: {"model": S.ErrorResponse}, 403: {"model": S.ErrorResponse},
               413: {"model": S.ErrorResponse}, 422: {"model": S.ErrorResponse}, 503: {"model": S.ErrorResponse}},
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
    from chronorisk.serving import scoring

    tasks = _served_tasks(state, body.tasks)
    if principal.role == "gp" and body.site and body.site != principal.site:
        raise HTTPException(403, "a GP scores for their own site only")
    site = body.site or principal.site
    when = body.prediction_time or utcnow()
    if body.events is not None and len(body.events) > state.config.max_events:
        raise InputError("events", f"at most {state.config.max_events} events per request (serve.max_events)")
    events = None
    subject = None
    if body.events is not None:
        subject = next((e.subject_id for e in body.events if e.subject_id is not None), None)
        events = scoring.events_frame([e.__dict__ for e in body.events], subject or 0)
    elif body.fhir is not None:
        events = scoring.fhir_events(body.fhir.model_dump(exclude_none=True))

    def log_for_monitoring(model, feats, risk, tiers) -> None:
        if state.monitor is not None:
            known = feats
            if subject is None and hasattr(feats, "drop"):  # no id given: no join key either
                known = feats.drop("subject_id", strict=False)
            state.monitor.live(model, known, risk, tiers, site, when)

    results = scoring.score_one(
        state.models, tasks, events=events, features=body.features, prediction_time=when,
        explain=body.explain, top_k=body.top_k, on_scored=log_for_monitoring, site=site,
    )
    for r in results:
        METRICS.scored(r.task, r.tier)
    return FastJSON({"prediction_time": when, "site": site, "results": [r.as_dict() for r in results]})


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


def patient_view(state: ServingState, subject_id: int, site: str) -> dict:
    return view_of(state.store.patient_record(subject_id, [site]) or _EMPTY, subject_id, site)


_EMPTY = {"patient": None, "scores": [], "consent_withdrawn_at": None}


def view_of(record: dict, subject_id: int, site: str) -> dict:
    """What GET /patients/{id} and the patient page show of one site's record."""
    from chronorisk.serving.store import conditions_list

    patient = record["patient"] or {}
    by_task: dict[str, list[dict]] = {}
    for row in record["scores"]:
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

    with writer(state.store.engine) as conn, conn.begin():
        data = state.store.read_patient(conn, subject_id)
        chosen = choose_site(principal, data.sites, site)
        view = view_of(data.at(chosen), subject_id, chosen)
        state.audit.append_in(conn, actor=principal.actor, role=principal.role, site=chosen,
                              action="patient_read", subject_id=subject_id, detail={"via": via, **(extra or {})})
    return view


def _stored(r: dict) -> dict:
    return {k: r[k] for k in ("task", "prediction_time", "risk", "tier", "model_name", "model_version",
                              "scored_at", "factors")}


@api.get(
    "/patients/{subject_id}", response_model=S.PatientResponse, tags=["patients"],
    responses={401: {"model": S.ErrorResponse}, 403: {"model": S.ErrorResponse}, 404: {"model": S.ErrorResponse}},
)
async def get_patient(  # async on purpose: a few indexed queries, cheaper than a thread hop
    subject_id: SubjectPath,
    principal: Annotated[Principal, Depends(require("patient_read"))],
    state: StateDep,
    site: Annotated[S.SiteId | None, Query(description="the site's record (default: the caller's)")] = None,
) -> Response:
    """Latest stored scores of a patient per task, their trend and factors (audited)."""
    return FastJSON(read_patient_audited(state, principal, subject_id, site, "api"))


@api.get(
    "/patients/{subject_id}/factors", tags=["patients"],
    responses={401: {"model": S.ErrorResponse}, 403: {"model": S.ErrorResponse}, 404: {"model": S.ErrorResponse}},
)
def patient_factors(
    subject_id: SubjectPath,
    task: Annotated[S.TaskName, Query()],
    principal: Annotated[Principal, Depends(require("patient_read"))],
    state: StateDep,
    site: Annotated[S.SiteId | None, Query()] = None,
) -> dict:
    """Factors of the latest stored score, computed on demand when not stored (low tier)."""
    chosen = readable_site(state, principal, subject_id, site)
    result = explain_on_demand(state, subject_id, chosen, task)
    state.audit.append(actor=principal.actor, role=principal.role, site=chosen, action="patient_explain",
                       subject_id=subject_id, detail={"task": task, "via": "api"})
    return result


def explain_on_demand(state: ServingState, subject_id: int, site: str, task: str) -> dict:
    from chronorisk.serving import scoring

    record = state.store.patient_record(subject_id, [site])
    rows = [r for r in record["scores"] if r["task"] == task]
    if not rows:
        raise HTTPException(404, f"no stored score for task {task}")
    latest = rows[-1]
    if latest["factors"] is not None:
        return {"task": task, "prediction_time": latest["prediction_time"], "factors": latest["factors"],
                "model_version": latest["model_version"], "computed": "stored"}
    model = state.models.get(task)
    if model is None:
        raise HTTPException(503, f"no model is loaded for task {task}")
    events = scoring.subject_events(state.meds_root, site, subject_id)
    if events is None or events.height == 0:
        raise HTTPException(404, "the patient's records are not available to this service")
    feats, reason = scoring.features_from_events(model, events, latest["prediction_time"])
    if feats is None:
        raise HTTPException(409, f"cannot explain: {reason}")
    _, _, factors = scoring.predict(model, feats, explain=True, top_k=state.top_k)
    return {"task": task, "prediction_time": latest["prediction_time"],
            "factors": factors[0], "model_version": model.version,
            "scored_by": latest["model_version"], "computed": "on demand"}


@api.get("/worklist", response_model=S.WorklistResponse, tags=["patients"],
         responses={401: {"model": S.ErrorResponse}, 403: {"model": S.ErrorResponse}})
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
                       detail={"task": task, "tier": tier, "min_risk": min_risk, "n_rows": len(rows), "via": "api"})
    return {"site": chosen, "rows": [_worklist_row(r) for r in rows]}


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


@api.post("/cohort", response_model=S.CohortResponse, tags=["cohorts"],
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


@api.post("/cohort/aggregate", response_model=S.AggregateResponse, tags=["cohorts"],
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


@api.post("/cohort/export", tags=["cohorts"],
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


@api.post("/consent/withdraw", response_model=S.ConsentResponse, tags=["consent"],
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


@api.get("/", include_in_schema=False)
def root() -> Response:
    return Response(status_code=303, headers={"Location": "/ui/"})


# -- the app --------------------------------------------------------------------------------


def create_app() -> FastAPI:
    """The app (no state yet: the service sets `app.state.serving` when its worker starts)."""
    from chronorisk.serving.web.pages import pages

    app = FastAPI(
        title="chronorisk",
        version=_version(),
        description="Chronic-disease risk scores: scoring, patients, cohorts, consent.",
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(pages)

    def limit_of(scope) -> int:
        state = getattr(scope["app"].state, "serving", None) if "app" in scope else None
        mb = state.config.max_payload_mb if state is not None else 5.0
        return int(mb * 1_000_000)

    app.add_middleware(CatchAll)
    app.add_middleware(PayloadLimit, get_limit=lambda scope: limit_of({"app": app, **scope}))
    app.add_middleware(MetricsMiddleware)
    return app


def _version() -> str:
    from chronorisk import __version__

    return __version__

