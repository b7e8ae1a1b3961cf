"""The HTTP API and pages: a FastAPI app the BentoML service mounts at `/`.

Routes only translate HTTP to the plain modules (scoring, cohort, store,
audit, access); each interface stands in a module of its own under
`serving/routes/`, over the shared caller check (`routes/common.py`) and error
handling (`routes/errors.py`, `middleware.py`). Every route checks the caller's
role (401 without a valid key, 403 for the wrong role or, for a GP, another
site); every patient read and every export is written to the audit log before
the data leaves. Bad input is a 4xx naming the field, never a 500; no route
logs an identifier.
"""

from __future__ import annotations

from fastapi import FastAPI

from chronorisk.serving.middleware import CatchAll, ConnectionRecycle, MetricsMiddleware, PayloadLimit
from chronorisk.serving.routes import cds_hooks, cohort, fhir, patients, score, system, whatif
from chronorisk.serving.routes.errors import install_error_handlers


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
    for router in (system.router, score.router, patients.router, cohort.router, fhir.router,
                   cds_hooks.router, whatif.router):
        app.include_router(router)
    app.include_router(pages)

    def limit_of(scope) -> int:
        state = getattr(scope["app"].state, "serving", None) if "app" in scope else None
        mb = state.config.max_payload_mb if state is not None else 5.0
        return int(mb * 1_000_000)

    def keepalive_of(_scope) -> int:
        state = getattr(app.state, "serving", None)
        return state.config.keepalive_max_requests if state is not None else 0

    app.add_middleware(CatchAll)
    app.add_middleware(PayloadLimit, get_limit=lambda scope: limit_of({"app": app, **scope}))
    app.add_middleware(ConnectionRecycle, get_limit=keepalive_of)
    app.add_middleware(MetricsMiddleware)
    return app


def _version() -> str:
    from chronorisk import __version__

    return __version__

