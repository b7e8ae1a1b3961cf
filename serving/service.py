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
        _tune_garbage_collector()

    def __is_ready__(self) -> bool:
        return self.state.store.ping()

    @bentoml.on_shutdown
    def flush(self) -> None:
        """Write what the monitoring log still buffers; close the store's connections."""
        if self.state.monitor is not None:
            self.state.monitor.close()
        self.state.store.dispose()


GC_YOUNG_THRESHOLD = 50_000  # allocations between young-generation collections (Python's default: 700)


def _tune_garbage_collector() -> None:
    """Move everything loaded so far out of the collector's view, and collect the young less often.

    A worker holds millions of long-lived objects after import and model load;
    every full collection walks them all, which shows up as 50-100 ms pauses
    in a request's tail latency. `gc.freeze` (the documented remedy for
    pre-loaded servers) leaves them alone; objects made later are collected as usual.

    A request builds tens of thousands of containers (a CDS Hooks prefetch of 3 years is
    ~60 kB of JSON): at the default threshold the collector runs every 700 of them, walking the
    half-built, still-live structure again and again and promoting it to older generations. At
    50,000 most of a request's temporaries are freed by reference counting before a collection
    comes: parsing that prefetch went from 0.53 to 0.16 ms of CPU, a CDS call from 6.6 to 6.0 ms
    in process (measured on the cds benchmark's records). Cycles are still collected.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
