"""Helpers of the device-stream tests: the CLI in a subprocess, the consumer process, a publisher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from sqlalchemy import create_engine, text

from chronorisk.devices.config import StreamConfig

REPO = Path(__file__).resolve().parents[2]
SECRET = "device-tests-secret-0123456789"


def env(broker=None) -> dict[str, str]:
    e = {**os.environ, "CHRONORISK_SERVE_SECRET": SECRET}
    e.pop("CHRONORISK_DEMO", None)
    e.pop("CHRONORISK_MQTT_PASSWORD", None)  # another test's broker's (broker_config sets it in this process)
    if broker is not None:
        e.update(broker.env)
    return e


def cli(work: Path, *argv: str, broker=None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "chronorisk.cli", "--work", str(work), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(broker), timeout=timeout)


def broker_args(broker) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(broker.port), "--username", "chronorisk"]


def broker_config(broker, **extra) -> StreamConfig:
    os.environ.update(broker.env)
    return StreamConfig(host="127.0.0.1", port=broker.port, username="chronorisk", **extra)


STARTED: list[ConsumerProcess] = []  # stopped after each test (conftest), whatever its outcome


class ConsumerProcess:
    """`chronorisk stream` in its own process group; its output in a log file."""

    def __init__(self, work: Path, world, store_url: str, broker, *extra: str):
        STARTED.append(self)
        self.cmd = [sys.executable, "-m", "chronorisk.cli", "--work", str(work), "stream", "--store", store_url,
                    "--meds", str(world.meds), "--model-dir", str(world.models), *broker_args(broker), *extra]
        self.broker = broker
        self.log = work / "stream.log"
        work.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> ConsumerProcess:
        fh = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env(self.broker), stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        fh.close()
        deadline = time.monotonic() + 60
        while "connected (session present" not in self.output():
            assert self.proc.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.1)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def count(url: str, sql: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar() or 0)
    finally:
        engine.dispose()


def rows(url: str, sql: str) -> list[dict]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(sql)).mappings().all()]
    finally:
        engine.dispose()


def wait_for(predicate, timeout: float = 90, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def readings(world, n: int) -> pl.DataFrame:
    from chronorisk.devices.replay import load_readings

    return load_readings(world.devices / "readings.parquet", n)


def expected_events(frame: pl.DataFrame) -> int:
    """MEDS events of these readings: a blood-pressure panel is two (systolic, diastolic)."""
    return int(frame.select(pl.when(pl.col("kind") == "bp").then(2).otherwise(1).sum()).item())
