"""The app's ASGI middleware: the last-line 500, the payload limit, per-route metrics and safe headers.

BentoML's own request metrics label requests by raw path, which would put
subject ids (`/patients/<id>`) into `/metrics`; the service switches them off
and this app exports its own Prometheus metrics labelled by route template.
"""

from __future__ import annotations

import logging
import threading
import time

from chronorisk.serving.routes.common import error_body

log = logging.getLogger(__name__)


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


class ConnectionRecycle:
    """Close a keep-alive connection after at most `serve.keepalive_max_requests` answers (`Connection: close`).

    BentoML's workers accept from one shared listening socket, and a worker's event loop takes every
    connection waiting when it wakes: 8 clients that connect together all land on one worker while the
    other stays idle (measured: 8/0 in every run of benchmarks/cds_bench.py). Persistent connections
    keep that split for their whole life. Ending each after a bounded number of answers (as nginx's
    `keepalive_requests` and Envoy's `max_requests_per_connection` do) lets the client's next
    connection go to whichever worker is free to accept it, so the load evens out within seconds.

    Each connection's quota is drawn between half the limit and the limit (gRPC jitters its maximum
    connection age the same way): connections opened together would otherwise all end together, and
    their reconnections arrive as one burst that a single worker takes again. Counted per client
    address and port in this worker; an answer already closing is left alone."""

    MAX_TRACKED = 4096  # connections counted at once; the oldest count is forgotten beyond that

    def __init__(self, app, get_limit):
        import random

        self.app = app
        self.get_limit = get_limit
        self._answers: dict[tuple, tuple[int, int]] = {}  # client -> (answers so far, this connection's quota)
        self._quota = random.Random()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("client"):
            return await self.app(scope, receive, send)
        limit = self.get_limit(scope)
        if limit <= 0:
            return await self.app(scope, receive, send)
        client = tuple(scope["client"])
        answers, quota = self._answers.pop(client, None) or (0, self._quota.randint((limit + 1) // 2, limit))
        answers += 1
        closing = answers >= quota
        if not closing:
            self._answers[client] = (answers, quota)  # re-inserted: the dict's order is the order of last use
            if len(self._answers) > self.MAX_TRACKED:
                del self._answers[next(iter(self._answers))]

        async def recycling_send(message):
            if closing and message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, recycling_send)


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

