"""`chronorisk stream`'s loop: a persistent MQTT session, micro-batches, acknowledgements after storing.

paho's network thread only queues messages. The main thread takes a micro-batch (up to
`batch_max` messages, closed `batch_ms` after its first), hands it to `batch.process_batch`
(one transaction: readings, quarantine, scores, alerts) and only then acknowledges each message
(paho manual acks). A crash before the acknowledgement makes the broker redeliver; the reading
is then found stored and not stored again. An acknowledgement is sent only on the connection
the message came on: after a reconnection the broker redelivers, and an old packet id could
name another message.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from datetime import datetime

from chronorisk.devices import alerts as alert_outbox
from chronorisk.devices.batch import BatchResult, StreamContext, process_batch
from chronorisk.devices.config import StreamConfig
from chronorisk.devices.metrics import StreamMetrics
from chronorisk.devices.mqtt import make_client, session_properties
from chronorisk.devices.readings import Message, alert_topic, subscription
from chronorisk.errors import ChronoriskError
from chronorisk.serving.store import utcnow

log = logging.getLogger(__name__)


class Consumer:
    def __init__(self, cfg: StreamConfig, ctx: StreamContext, metrics: StreamMetrics, *, sites: list[str] | None = None,
                 idle_exit: float | None = None):
        self.cfg = cfg
        self.ctx = ctx
        self.metrics = metrics
        self.sites = sites
        self.idle_exit = idle_exit
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.generation = 0
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self.published: queue.Queue[int] = queue.Queue()
        self._mid_alert: dict[int, int] = {}
        self._lock = threading.Lock()
        self.client = make_client(cfg, cfg.client_id, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._session_present = False
        self.client.on_publish = self._on_publish
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.totals = BatchResult()

    # -- paho callbacks (network thread) --------------------------------------------------------

    def _on_connect(self, client, _userdata, flags, reason_code, _props):
        if reason_code.is_failure:
            log.error("MQTT connection refused: %s", reason_code)
            return
        with self._lock:
            self.generation += 1
        self._session_present = bool(flags.session_present)
        # Ready only once the broker has granted the subscription (SUBACK, `_on_subscribe`): a reading published
        # between CONNACK and SUBACK of a first session would match no subscription and be lost to this consumer.
        client.subscribe([(topic, 1) for topic in subscription(self.cfg.topic_prefix, self.sites)])

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _props):
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("MQTT subscription refused: %s", ", ".join(refused))
            return
        self.connected.set()
        log.info("connected (session present: %s), subscribed", self._session_present)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props):
        self.connected.clear()
        if not self.stopping.is_set():
            log.warning("MQTT connection lost (%s); reconnecting", reason_code)

    def _on_message(self, _client, _userdata, msg):
        self.inbox.put(Message(msg.topic, bytes(msg.payload), utcnow(), msg.mid, self.generation, bool(msg.dup),
                               time.monotonic()))
        self.metrics.received.inc()

    def _on_publish(self, _client, _userdata, mid, _reason_code, _props):
        self.published.put(mid)

    # -- the loop (main thread) -----------------------------------------------------------------

    def run(self) -> BatchResult:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            self.client.connect(self.cfg.host, self.cfg.port, keepalive=30, clean_start=False,
                                properties=session_properties(self.cfg, self.cfg.batch_max * 2))
        except OSError as exc:
            raise ChronoriskError(f"MQTT broker {self.cfg.host}:{self.cfg.port} unreachable "
                                  f"({type(exc).__name__})") from None
        self.client.loop_start()
        try:
            if not self.connected.wait(15):
                raise ChronoriskError(f"MQTT broker {self.cfg.host}:{self.cfg.port} did not accept the connection "
                                      "or the subscription (credentials? topic ACL?)")
            self._publish_alerts()
            idle_since = time.monotonic()
            while not self.stopping.is_set():
                batch = self._take()
                if batch:
                    self._handle(batch)
                    idle_since = time.monotonic()
                elif self.idle_exit is not None and time.monotonic() - idle_since > self.idle_exit:
                    break
                self._confirm_published()
        finally:
            self._confirm_published(wait=1.0)
            self.stopping.set()
            self.client.disconnect()
            self.client.loop_stop()
        return self.totals

    def _take(self) -> list[Message]:
        try:
            first = self.inbox.get(timeout=0.5)
        except queue.Empty:
            return []
        batch = [first]
        closes = first.received_clock + self.cfg.batch_ms / 1000
        while len(batch) < self.cfg.batch_max:
            left = closes - time.monotonic()
            try:
                batch.append(self.inbox.get(timeout=left) if left > 0 else self.inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _handle(self, batch: list[Message]) -> None:
        m = self.metrics
        m.lag.set(max(0.0, time.monotonic() - batch[0].received_clock))
        m.pending.set(len(batch) + self.inbox.qsize())
        result = process_batch(self.ctx, batch)
        with self._lock:
            current = self.generation
        for msg in batch:
            if msg.generation == current:
                self.client.ack(msg.mid, 1)
        self._count(result)
        if result.alerts:
            self._publish_alerts()

    def _count(self, result: BatchResult) -> None:
        m, t = self.metrics, self.totals
        m.batches.inc()
        m.stored.inc(result.stored)
        m.redelivered.inc(result.redelivered)
        m.scored.inc(result.scored)
        for category, n in result.quarantined.items():
            m.quarantined.labels(category).inc(n)
        for a in result.alerts:
            m.alerts.labels(a["task"], a["to_tier"]).inc()
        committed = result.committed_at or utcnow()
        for sent, received in zip(result.sent_at, result.received_at, strict=True):
            start = sent if isinstance(sent, datetime) and sent <= committed else received
            m.latency.observe((committed - start).total_seconds())
        t.received += result.received
        t.stored += result.stored
        t.redelivered += result.redelivered
        t.quarantined.update(result.quarantined)
        t.scored += result.scored
        t.alerts.extend(result.alerts)

    def _publish_alerts(self) -> None:
        for alert in alert_outbox.unpublished(self.ctx.store.engine):
            if alert["alert_id"] in self._mid_alert.values():
                continue
            info = self.client.publish(alert_topic(self.cfg.topic_prefix, alert["site"]),
                                       alert_outbox.alert_payload(alert), qos=1)
            self._mid_alert[info.mid] = alert["alert_id"]

    def _confirm_published(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + wait
        done = []
        while True:
            try:
                mid = self.published.get(timeout=max(0.0, deadline - time.monotonic())) if wait else \
                    self.published.get_nowait()
            except queue.Empty:
                break
            if mid in self._mid_alert:
                done.append(self._mid_alert.pop(mid))
            if wait and not self._mid_alert:
                break
        alert_outbox.mark_published(self.ctx.store.engine, done)
