"""`chronorisk devices replay`: publish generated readings to the broker in time order at a given rate."""

from __future__ import annotations

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
                     progress: Callable[[int], None] | None = None) -> int:
    """Publish every reading (QoS 1) at `rate` per second, in time order; returns how many were acknowledged."""
    if rate <= 0:
        raise InputError("--rate", f"{rate:g} is not a positive number of readings per second")
    client = make_client(cfg, client_id)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    try:
        client.connect(cfg.host, cfg.port, keepalive=30)
    except OSError as exc:
        raise ChronoriskError(f"MQTT broker {cfg.host}:{cfg.port} unreachable ({type(exc).__name__})") from None
    client.loop_start()
    infos = []
    started = time.monotonic()
    try:
        for i, row in enumerate(readings.iter_rows(named=True)):
            due = started + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            obs = observation(row["reading_id"], row["device_id"], row["kind"], row["time"], row["value"],
                              row["value2"], row["unit"], sent_at=utcnow())
            infos.append(client.publish(observation_topic(cfg.topic_prefix, row["site"], row["device_id"]),
                                        orjson.dumps(obs), qos=1))
            if progress is not None and (i + 1) % 1000 == 0:
                progress(i + 1)
        deadline = time.monotonic() + 30
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        return sum(1 for info in infos if info.is_published())
    finally:
        client.disconnect()
        client.loop_stop()
