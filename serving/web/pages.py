"""Server-rendered pages: GP worklist and patient page, public-health cohort builder.

Plain HTML from Jinja2 templates, an inline SVG trend, no JavaScript and no
front-end build. Sign-in takes an API key once and keeps a signed session
cookie (HttpOnly, SameSite=Strict); forms that act (export, sign-out) carry a
token derived from the session, so another site cannot submit them. The
same access rules and audit entries as the API apply.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from chronorisk.errors import InputError
from chronorisk.serving import schemas as S
from chronorisk.serving.access import Principal
from chronorisk.serving.state import ServingState
from chronorisk.serving.store import AGE_BANDS, TIERS
from chronorisk.serving.web.charts import trend_svg

pages = APIRouter(prefix="/ui", include_in_schema=False)

TEMPLATES = Path(__file__).with_name("templates")
TASK_TITLES = {
    "complication_1y": "Complication within 1 year",
    "onset_2y": "New diabetes or hypertension within 2 years",
}
MAX_FORM_BYTES = 64_000


@lru_cache(maxsize=1)
def _env():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = lambda v: "" if v is None else f"{v * 100:.1f}%"
    env.filters["day"] = lambda v: "" if v is None else f"{v:%Y-%m-%d}"
    env.globals["task_title"] = task_title
    return env


def task_title(task: str) -> str:
    return TASK_TITLES.get(task, task.replace("_", " "))


# the pages use no script, no frame and no outside resource: say so to the browser
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def render(template: str, status_code: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(_env().get_template(template).render(**context), status_code=status_code,
                        headers=PAGE_HEADERS)


def error_page(request: Request, status: int, message: str) -> Response:
    if status == 401:
        return RedirectResponse("/ui/login", status_code=303)
    principal = getattr(request.state, "principal", None)
    state = getattr(request.app.state, "serving", None)
    csrf = csrf_token(state, request) if state is not None else ""
    return render("error.html", status, status=status, message=message, principal=principal, csrf=csrf)


# -- sessions -------------------------------------------------------------------------------


def _state(request: Request) -> ServingState:
    state = getattr(request.app.state, "serving", None)
    if state is None:
        raise HTTPException(503, "the service is starting")
    return state


def csrf_token(state: ServingState, request: Request) -> str:
    session = request.cookies.get("chronorisk_session", "")
    return hmac.new(state.secret, f"csrf:{session}".encode(), hashlib.sha256).hexdigest()[:32]


def page_user(permission: str | None = None):
    """Dependency: the signed-in user (redirect to sign-in when there is none)."""

    def dependency(request: Request) -> Principal:
        from chronorisk.serving.routes.common import authenticate

        state = _state(request)
        principal = authenticate(request, state)
        if principal is None:
            raise HTTPException(401, "sign in first")
        request.state.principal = principal
        if permission is not None and not principal.can(permission):
            raise HTTPException(403, f"your role ({principal.role.replace('_', ' ')}) cannot open this page")
        return principal

    return dependency


async def form_data(request: Request) -> dict[str, list[str]]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=False, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "the form could not be read") from None


def check_csrf(state: ServingState, request: Request, form: dict[str, list[str]]) -> None:
    sent = (form.get("csrf") or [""])[0]
    if not hmac.compare_digest(sent, csrf_token(state, request)):
        raise HTTPException(403, "the form has expired; open the page again")


# -- sign-in --------------------------------------------------------------------------------


LOGIN_COOKIE = "chronorisk_login"  # a random nonce: the sign-in form's CSRF token is derived from it


def login_csrf(state: ServingState, nonce: str) -> str:
    return hmac.new(state.secret, f"login-csrf:{nonce}".encode(), hashlib.sha256).hexdigest()[:32]


def secure_cookie(state: ServingState, request: Request) -> bool:
    """serve.cookie_secure: always / never / auto (the request came over HTTPS, directly or via a proxy
    that says so in X-Forwarded-Proto)."""
    mode = state.config.cookie_secure
    if mode != "auto":
        return mode == "always"
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _login_form(state: ServingState, request: Request, status: int = 200, message: str | None = None) -> Response:
    import secrets

    nonce = secrets.token_hex(16)
    response = render("login.html", status, principal=None, csrf=login_csrf(state, nonce), message=message)
    response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict", max_age=3600, path="/ui/login",
                        secure=secure_cookie(state, request))
    return response


@pages.get("/login")
def login_page(request: Request) -> Response:
    return _login_form(_state(request), request)


@pages.post("/login")
async def login(request: Request) -> Response:
    from chronorisk.serving.access import TooManyAttempts

    state = _state(request)
    form = await form_data(request)
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    sent = (form.get("csrf") or [""])[0]
    if not nonce or not hmac.compare_digest(sent, login_csrf(state, nonce)):
        return _login_form(state, request, 403, "The sign-in form has expired; please try again.")
    key = (form.get("api_key") or [""])[0].strip()
    address = request.client.host if request.client else "unknown"
    try:
        principal = state.keys.authenticate_key(key, address, via="page")
    except TooManyAttempts as exc:
        response = _login_form(state, request, 429, f"Too many failed sign-ins: try again in {exc.retry_after} s.")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if principal is None:
        return _login_form(state, request, 401, "That access key is not valid.")
    state.audit.append(actor=principal.actor, role=principal.role, site=principal.site, action="login",
                       detail={"via": "page"})
    response = RedirectResponse("/ui/", status_code=303)
    response.set_cookie(
        "chronorisk_session", state.keys.issue_session(principal), httponly=True, samesite="strict",
        max_age=int(state.config.session_hours * 3600), path="/", secure=secure_cookie(state, request),
    )
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


@pages.post("/logout")
async def logout(request: Request, principal: Annotated[Principal, Depends(page_user())]) -> Response:
    """Sign-out revokes the session on the server: a copied cookie stops working too."""
    state = _state(request)
    check_csrf(state, request, await form_data(request))
    token = request.cookies.get("chronorisk_session", "")
    if state.keys.revoke_session(token):
        state.audit.append(actor=principal.actor, role=principal.role, site=principal.site, action="logout",
                           detail={"via": "page"})
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie("chronorisk_session", path="/")
    return response


@pages.get("/")
def home(principal: Annotated[Principal, Depends(page_user())]) -> Response:
    if principal.can("worklist") and principal.role == "gp":
        return RedirectResponse("/ui/worklist", status_code=303)
    if principal.can("cohort"):
        return RedirectResponse("/ui/cohort", status_code=303)
    if principal.role == "admin":
        return RedirectResponse("/ui/worklist", status_code=303)
    return RedirectResponse("/ui/ops", status_code=303)


# -- GP pages -------------------------------------------------------------------------------


@pages.get("/worklist")
def worklist_page(request: Request, principal: Annotated[Principal, Depends(page_user("worklist"))]) -> Response:
    from chronorisk.serving.routes.patients import _worklist_row, worklist_audit, worklist_site

    state = _state(request)
    q = request.query_params
    site = q.get("site") or None
    if principal.role != "gp" and site is None:
        sites = state.store.sites()
        site = sites[0] if sites else None
        if site is None:
            return render("worklist.html", principal=principal, csrf=csrf_token(state, request), site=None,
                          rows=[], filters={}, tasks=state.config.tasks, tiers=TIERS, sites=[])
    try:
        site = worklist_site(principal, S.check_site(site))
        task = q.get("task") or None
        if task is not None and task not in state.config.tasks:
            raise InputError("task", "unknown task")
        tiers = [t for t in q.getlist("tier") if t in TIERS] or None
        min_risk = _percent(q.get("min_risk"))
    except (ValueError, InputError) as exc:
        raise HTTPException(422, f"filter: {exc}") from None
    rows = state.store.worklist(site, task=task, tiers=tiers, min_risk=min_risk, limit=200)
    alerts, last_visit = worklist_alerts(state.store.engine, site, principal.actor)
    state.audit.append(actor=principal.actor, role=principal.role, site=site, action="worklist_read",
                       detail={**worklist_audit(task, tiers, min_risk, rows, "page"), "n_alerts": len(alerts)})
    filters = {"task": task, "tiers": tiers or [], "min_risk": q.get("min_risk") or ""}
    return render(
        "worklist.html", principal=principal, csrf=csrf_token(state, request), site=site,
        rows=[_worklist_row(r) for r in rows], filters=filters, tasks=state.config.tasks, tiers=TIERS,
        sites=state.store.sites() if principal.role != "gp" else [site], alerts=alerts, last_visit=last_visit,
    )


def worklist_alerts(engine, site: str, actor: str) -> tuple[list[dict], object]:
    """Home-device alerts of the site new since this user's last worklist visit (the stream's one read here)."""
    from chronorisk.devices.alerts import worklist_alerts as read_alerts

    return read_alerts(engine, site, actor)


def _percent(text: str | None) -> float | None:
    """'25' or '25%' -> 0.25; empty -> None."""
    if not text:
        return None
    value = float(text.strip().rstrip("%"))
    if not 0 <= value <= 100:
        raise ValueError("minimum risk is a percentage from 0 to 100")
    return value / 100


@pages.get("/patients/{subject_id}")
def patient_page(
    request: Request, subject_id: str, principal: Annotated[Principal, Depends(page_user("patient_read"))]
) -> Response:
    """Score history per task (prediction and scoring dates labelled), the factors grouped by concept,
    the patient's recent values, and the what-if form (`?whatif=<task>&hba1c=...`)."""
    from chronorisk.serving.routes.patients import explain_on_demand, read_patient_audited

    state = _state(request)
    try:
        subject_id = S.plain_int(subject_id)
    except ValueError:
        raise HTTPException(404, "no such patient") from None
    if not 0 <= subject_id <= S.ID_MAX:
        raise HTTPException(404, "no such patient")
    q = request.query_params
    explain_task = q.get("explain")
    view = read_patient_audited(state, principal, subject_id, None, "page", {"explained": explain_task or None})
    site = view["site"]
    on_demand = {}
    if explain_task and any(t["task"] == explain_task for t in view["tasks"]):
        on_demand[explain_task] = explain_on_demand(state, subject_id, site, explain_task)
    sections = [_patient_section(state, t, on_demand) for t in view["tasks"]]
    status = 200
    for section in sections:
        status = max(status, _add_whatif(state, principal, subject_id, site, section, q))
    return render("patient.html", status, principal=principal, csrf=csrf_token(state, request), view=view,
                  sections=sections)


def _patient_section(state: ServingState, t: dict, on_demand: dict) -> dict:
    from chronorisk.serving.explanations import group_factors, infos_of, units_of

    thresholds = _thresholds(state, t["task"])
    points = [(s["prediction_time"], s["risk"]) for s in t["trend"]]
    factors = t["latest"]["factors"]
    computed = None
    if factors is None and t["task"] in on_demand:
        factors = on_demand[t["task"]]["factors"]
        computed = on_demand[t["task"]]
    lines = (group_factors(factors, infos_of(state.models, t["task"]), units_of(state.config))
             if factors is not None else None)
    return {
        "task": t["task"], "latest": t["latest"], "trend": t["trend"],
        "svg": trend_svg(points, medium=thresholds[0], high=thresholds[1],
                         label=f"{task_title(t['task'])}: risk over time"),
        "factors": [line.text for line in lines] if lines is not None else None,
        "concepts": [line.concept for line in lines or []],
        "computed": computed, "recent": [], "whatif": None, "whatif_error": None, "modifiable": [],
    }


def _add_whatif(state: ServingState, principal: Principal, subject_id: int, site: str, section: dict, q) -> int:
    """The recent values and the what-if form of a section (and its answer when asked); the page's status."""
    from chronorisk.serving import scoring, whatif
    from chronorisk.serving.explanations import display_unit, units_of
    from chronorisk.serving.routes.whatif import patient_record_events, whatif_for

    try:
        model, events, when = patient_record_events(state, subject_id, site, section["task"])
    except HTTPException:
        return 200  # no model or no records here: the page shows the stored scores only
    feats, _ = scoring.features_from_events(model, events, when)
    allowed = whatif.modifiables(model.spec)
    if feats is not None:
        section["recent"] = whatif.recent_values(model, feats, when, [*section["concepts"], *whatif.MEASURED],
                                                 units_of(state.config))
    # the what-if form takes each value in the site's display unit (serve.display_units), else the model's
    site_units = units_of(state.config)
    given_units = {m.name: site_units[m.name].unit for m in allowed.values() if m.name in site_units}
    recent = {r["concept"]: r["value"] for r in whatif.recent_values(model, feats, when, whatif.MEASURED,
                                                                     site_units)} if feats is not None else {}
    section["modifiable"] = []
    for m in allowed.values():
        shown = site_units.get(m.name)
        low, high = sorted(x * shown.scale + shown.offset for x in (m.low, m.high)) if shown else (m.low, m.high)
        value = recent.get(m.name)
        section["modifiable"].append({
            "name": m.name, "display": m.display, "unit": shown.unit if shown else display_unit(m.unit),
            "low": float(f"{low:.3g}"), "high": float(f"{high:.3g}"), "flag": m.unit == "1 = yes",
            "value": q.get(m.name) or ("" if value is None else f"{value:.4g}")})
    if q.get("whatif") != section["task"]:
        return 200
    changes = {}
    try:
        for m in allowed.values():
            text = (q.get(m.name) or "").strip()
            if not text:
                continue
            try:
                value = float(text)
            except ValueError:
                raise InputError(f"changes.{m.name}", f"{text[:20]!r} is not a number") from None
            # the prefilled value (as shown) is no change
            if m.unit == "1 = yes" or recent.get(m.name) is None or value != float(f"{recent[m.name]:.4g}"):
                changes[m.name] = value
        if not changes:
            raise InputError("changes", "change at least one value")
        section["whatif"] = whatif_for(state, principal, subject_id, site, section["task"], changes, via="page",
                                       units={n: u for n, u in given_units.items() if n in changes} or None)
    except InputError as exc:
        section["whatif_error"] = str(exc)
        return 422
    return 200


def _thresholds(state: ServingState, task: str) -> tuple[float | None, float | None]:
    """The tier thresholds of the served model (fitted by its rule), else the configured cut-offs."""
    model = state.models.get(task)
    tiers = model.bundle.tiers if model is not None else state.params.model.tiers.get(task)
    if tiers is None:
        return None, None
    return tiers.medium, tiers.high


def factor_sentence(f: dict) -> str:
    """'HbA1c 9.1 %, last measured 2026-03-02, raises risk' (the model's own text when it gives one)."""
    if f.get("text"):
        return str(f["text"])
    name = f.get("display") or f.get("feature") or "a factor"
    value = f.get("value")
    parts = [name if value is None else f"{name} {_number(value)}{(' ' + f['unit']) if f.get('unit') else ''}"]
    if f.get("date"):
        parts.append(f"last measured {str(f['date'])[:10]}")
    direction = f.get("direction")
    if direction:
        parts.append("raises risk" if str(direction).startswith(("up", "rais", "incr", "+")) else "lowers risk")
    return ", ".join(parts)


def _number(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


# -- public-health pages --------------------------------------------------------------------


def _cohort_query(params: dict[str, list[str]], cls=S.AggregateQuery, **extra):
    def many(key):
        return [v for v in params.get(key, []) if v]

    def one(key):
        values = many(key)
        return values[0] if values else None

    raw = {
        "task": one("task"),
        "sites": many("site") or None,
        "tiers": many("tier") or None,
        "min_risk": _percent(one("min_risk")),
        "age_bands": many("age_band") or None,
        "sex": one("sex"),
        "conditions": many("condition") or None,
        **extra,
    }
    return cls.model_validate({k: v for k, v in raw.items() if v is not None})


@pages.get("/cohort")
def cohort_page(request: Request, principal: Annotated[Principal, Depends(page_user("cohort"))]) -> Response:
    from chronorisk.serving import cohort
    from chronorisk.serving.routes.cohort import private_aggregate

    state = _state(request)
    params = {k: request.query_params.getlist(k) for k in request.query_params}
    conditions = cohort.known_conditions()
    ctx = {
        "principal": principal, "csrf": csrf_token(state, request), "tasks": state.config.tasks,
        "sites": state.store.sites(), "tiers": TIERS, "age_bands": AGE_BANDS, "conditions": conditions,
        "params": params, "result": None, "error": None, "export_fields": [],
        "small_cell": state.config.small_cell,
    }
    if params.get("task"):
        try:
            query = _cohort_query(params, group_by=["site", "tier"])
            result = private_aggregate(state, principal, query)
        except ValidationError as exc:
            err = exc.errors()[0]
            ctx["error"] = f"{S.field_path(err['loc'])}: {str(err['msg']).removeprefix('Value error, ')}"
            return render("cohort.html", 422, **ctx)
        except (InputError, ValueError) as exc:
            ctx["error"] = str(exc)
            return render("cohort.html", 422, **ctx)
        state.audit.append(actor=principal.actor, role=principal.role, action="cohort_aggregate",
                           detail={"query": result["query"], "via": "page"})
        ctx["result"] = result
        ctx["table"] = _site_tier_table(result)
        ctx["export_fields"] = [(k, v) for k, values in params.items() for v in values if k != "csrf"]
    return render("cohort.html", **ctx)


def _site_tier_table(result: dict) -> list[dict]:
    rows: dict[str, dict] = {}
    for cell in result["cells"]:
        site = cell["group"].get("site") or "?"
        row = rows.setdefault(site, {"site": site})
        row[cell["group"].get("tier")] = "<" + str(result["small_cell"]) if cell["suppressed"] else cell["count"]
    return [rows[k] for k in sorted(rows)]


@pages.post("/cohort/export")
async def cohort_export_page(
    request: Request, principal: Annotated[Principal, Depends(page_user("export"))]
) -> Response:
    from chronorisk.serving.routes.cohort import export_response

    state = _state(request)
    form = await form_data(request)
    check_csrf(state, request, form)
    fmt = (form.get("format") or ["csv"])[0]
    try:
        query = _cohort_query(form, cls=S.ExportQuery, format=fmt)
    except (ValidationError, ValueError) as exc:
        raise HTTPException(422, f"export: {str(exc).splitlines()[0]}") from None
    return export_response(state, principal, query, via="page")


@pages.get("/ops")
def ops_page(request: Request, principal: Annotated[Principal, Depends(page_user("ops"))]) -> Response:
    state = _state(request)
    models = [{"task": m.task, "name": m.name, "version": m.version} for m in state.models.values()]
    return render("ops.html", principal=principal, csrf=csrf_token(state, request), models=models,
                  store=state.store.info().backend, started=state.started_at)


@pages.get("/mlops")
def mlops_page(request: Request, principal: Annotated[Principal, Depends(page_user("ops"))]) -> Response:
    """The monitoring helper's MLOps view (statuses, reasons, drift history) inside the page layout."""
    from chronorisk.serving.monitoring import load_summary
    from chronorisk.serving.monitoring_page import mlops_fragment

    state = _state(request)
    fragment = mlops_fragment(load_summary(state.work / "monitoring"), report_url="/ui/mlops/reports")
    return render("mlops.html", principal=principal, csrf=csrf_token(state, request), fragment=fragment)


@pages.get("/mlops/reports/{path:path}")
def mlops_report(
    request: Request, path: str, principal: Annotated[Principal, Depends(page_user("ops"))]
) -> Response:
    from fastapi.responses import FileResponse

    from chronorisk.serving.monitoring_page import report_file

    found = report_file(_state(request).work / "monitoring", path)
    if found is None:
        raise HTTPException(404, "no such report")
    return FileResponse(found)


def query_string(params: dict) -> str:
    return urlencode(params, doseq=True)
