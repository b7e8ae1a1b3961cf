"""The consumer's Prometheus metrics, on its own registry and its own `/metrics` port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class StreamMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("chronorisk_stream_readings_received", "MQTT messages received", registry=r)
        self.stored = Counter("chronorisk_stream_readings_stored", "readings stored (once each)", registry=r)
        self.quarantined = Counter("chronorisk_stream_readings_quarantined", "messages quarantined", ["category"],
                                   registry=r)
        self.redelivered = Counter("chronorisk_stream_readings_redelivered",
                                   "messages received again after being stored (not stored twice)", registry=r)
        self.scored = Counter("chronorisk_stream_scores", "patient-task scores written by the stream", registry=r)
        self.alerts = Counter("chronorisk_stream_alerts", "alerts of a rising tier", ["task", "to_tier"], registry=r)
        self.batches = Counter("chronorisk_stream_batches", "micro-batches committed", registry=r)
        self.lag = Gauge("chronorisk_stream_consumer_lag_seconds",
                         "age of the oldest received reading not yet stored and acknowledged", registry=r)
        self.pending = Gauge("chronorisk_stream_pending_messages", "received, not yet acknowledged", registry=r)
        self.latency = Histogram("chronorisk_stream_reading_to_score_seconds",
                                 "from the reading's sending (meta.lastUpdated, else its receipt) to its new score "
                                 "committed", buckets=LATENCY_BUCKETS, registry=r)

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
