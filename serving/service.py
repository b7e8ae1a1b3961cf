"""The BentoML service: loads each task's champion once per worker and mounts the API and pages.

Run it with `chronorisk serve` (which sets the environment, see
`serving/state.py`) or directly with
`bentoml serve chronorisk.serving.service:ChronoriskService`.
`/healthz`, `/livez` and `/readyz` come from BentoML, as does the OpenAPI
document at `/docs.json` (it includes the mounted app's routes). BentoML's
request metrics and access log are switched off because they record raw
paths, which hold pseudonymous subject ids; the mounted app serves
`/metrics` labelled by route template instead. No feature logic here.
"""

from __future__ import annotations

import bentoml

from chronorisk.serving.api import create_app

app = create_app()


@bentoml.service(
    workers=2,
    traffic={"timeout": 120},
    metrics={"enabled": False},
    logging={"access": {"enabled": False}},
    # nothing is traced (no exporter, health data): skip the tracing middleware's per-request work too
    tracing={"excluded_urls": ".*"},
)
@bentoml.asgi_app(app, path="/")
class ChronoriskService:
    """Chronic-disease risk: scores, patients, cohorts, consent, pages."""

    def __init__(self) -> None:
        from chronorisk.serving.state import state_from_env

        self.state = state_from_env()
        app.state.serving = self.state
        _freeze_loaded_objects()

    def __is_ready__(self) -> bool:
        return self.state.store.ping()

    @bentoml.on_shutdown
    def flush(self) -> None:
        """Write what the monitoring log still buffers; close the store's connections."""
        if self.state.monitor is not None:
            self.state.monitor.close()
        self.state.store.dispose()


def _freeze_loaded_objects() -> None:
    """Move everything loaded so far (models, libraries) out of the garbage collector's view.

    A worker holds millions of long-lived objects after import and model load;
    every full collection walks them all, which shows up as 50-100 ms pauses
    in a request's tail latency. `gc.freeze` (the documented remedy for
    pre-loaded servers) leaves them alone; objects made later are collected as usual.
    """
    import gc

    gc.collect()
    gc.freeze()
