"""`chronorisk devices replay`: publish generated readings to the broker in time order at a given rate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import polars as pl

from chronorisk.devices.config import StreamConfig
from chronorisk.devices.fhir import observation
from chronorisk.devices.mqtt import make_client
from chronorisk.devices.readings import observation_topic
from chronorisk.errors import ChronoriskError, InputError
from chronorisk.serving.store import utcnow

READING_COLUMNS = ("device_id", "site", "reading_id", "time", "kind", "value", "value2", "unit")


def load_readings(path: Path, limit: int | None = None) -> pl.DataFrame:
    if not Path(path).is_file():
        raise InputError("--readings", f"{path} does not exist (generate with --devices)")
    frame = pl.read_parquet(path)
    missing = [c for c in READING_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError("--readings", f"{path} lacks columns {', '.join(missing)}")
    frame = frame.sort("time", "device_id", "reading_id")
    return frame.head(limit) if limit else frame


def publish_readings(cfg: StreamConfig, readings: pl.DataFrame, rate: float, *, client_id: str = "chronorisk-replay",
                     wait_s: float = 60.0, progress: Callable[[int], None] | None = None) -> int:
    """Publish every reading (QoS 1) at `rate` per second, in time order; returns how many were acknowledged."""
    if rate <= 0:
        raise InputError("--rate", f"{rate:g} is not a positive number of readings per second")
    client = make_client(cfg, client_id)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    outstanding: set[int] = set()  # published, not yet acknowledged by the broker
    early: set[int] = set()  # acknowledged before `publish` returned its id
    lock = threading.Lock()  # never held while calling paho (paho calls on_publish under its own lock)

    def on_publish(_c, _u, mid, _reason, _props):
        with lock:
            if mid in outstanding:
                outstanding.discard(mid)
            else:
                early.add(mid)

    client.on_publish = on_publish
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    try:
        client.connect(cfg.host, cfg.port, keepalive=30)
    except OSError as exc:
        raise ChronoriskError(f"MQTT broker {cfg.host}:{cfg.port} unreachable ({type(exc).__name__})") from None
    client.loop_start()
    started = time.monotonic()
    try:
        for i, row in enumerate(readings.iter_rows(named=True)):
            due = started + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            obs = observation(row["reading_id"], row["device_id"], row["kind"], row["time"], row["value"],
                              row["value2"], row["unit"], sent_at=utcnow())
            # while the broker is away paho keeps the message and sends it on reconnection
            info = client.publish(observation_topic(cfg.topic_prefix, row["site"], row["device_id"]),
                                  orjson.dumps(obs), qos=1)
            with lock:
                if info.mid in early:
                    early.discard(info.mid)
                else:
                    outstanding.add(info.mid)
            if progress is not None and (i + 1) % 1000 == 0:
                progress(i + 1)
        deadline = time.monotonic() + wait_s
        while outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
        return readings.height - len(outstanding)
    finally:
        client.disconnect()
        client.loop_stop()
