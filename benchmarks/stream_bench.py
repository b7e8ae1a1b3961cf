"""Home-device stream end to end on this machine: publish, store, re-score, alert.

A generated cohort (N patients, every diagnosed one with home devices) with a small model per task
trained here, batch-scored at 2025-07-01 into a fresh SQLite store, its devices registered; a private
Mosquitto (persistence on, password auth); `chronorisk stream` as its own process. This process
publishes the generated readings in time order at a fixed rate (QoS 1, `devices.replay`, each
Observation stamped with its sending time in meta.lastUpdated) for the given duration, then waits
for the consumer to store everything. Figures:

- sustained rate: readings stored per second over the publishing period, and per 10 s window
  (the slowest window counts: target >= 1,000 readings/s for >= 60 s);
- reading-to-new-score latency: `stored_at - sent_at` of every reading (stored_at is taken after
  the patient's new score is computed, just before the transaction that writes reading, score and
  alert commits): p50, p99 (target p99 <= 2 s);
- the consumer's CPU seconds per 1,000 readings (its process's user + system time, psutil), which
  does not depend on the machine's other load; scores written and alerts raised;
- the province estimate: 50 communities x 50,000 readings/day = 2.5 M/day (29/s mean), at a peak
  of 10x the mean, in cores and 2-core machines at 50% headroom, from the CPU cost measured here.

    .venv/bin/python benchmarks/stream_bench.py [--quick] [--rate 1000] [--seconds 70] [--patients 8000]

Writes benchmarks/results/stream.json (--quick: stream_quick.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from bench_common import public_argv, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "serving"))

PROVINCE_READINGS_PER_DAY = 50 * 50_000  # the seed volume: 50 communities x 50,000 readings a day
PEAK_FACTOR = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 readings/s for 15 s on 3,000 patients")
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    rate = args.rate or (500.0 if args.quick else 1000.0)
    seconds = args.seconds or (15.0 if args.quick else 70.0)
    patients = args.patients or (3000 if args.quick else 8000)
    work = args.work or Path(tempfile.mkdtemp(prefix="stream-bench-", dir=os.environ.get("CHRONORISK_WORK")))
    record = run(work, rate, seconds, patients)
    record["argv"] = public_argv(sys.argv[1:] if argv is None else argv)
    out = REPO / "benchmarks" / "results" / ("stream_quick.json" if args.quick else "stream.json")
    write_result(out, record)
    print(f"wrote {out.relative_to(REPO)}")
    return 0


def prepare(work: Path, patients: int) -> tuple[Path, Path, str]:
    from serving_support import generate_cohort, train_bundles

    from chronorisk.data.synth.devices import write_devices

    meds = generate_cohort(work / "world", patients=patients, seed=11)
    write_devices(work / "world", 1.0, 11, date(2025, 12, 31))
    models = train_bundles(meds, work / "world" / "models")
    url = f"sqlite:///{work / 'store.db'}"
    for argv in (["score", "--date", "2025-07-01", "--meds", str(meds), "--model-dir", str(models), "--store", url],
                 ["devices", "--store", url, "register", "--file", str(work / "world" / "devices" /
                                                                      "devices.parquet")]):
        out = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work / "w"), *argv],
                             capture_output=True, text=True, env=_env(), cwd=REPO)
        if out.returncode != 0:
            raise SystemExit(f"{argv[0]} failed: {out.stderr[-2000:]}")
    return meds, models, url


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "CHRONORISK_SERVE_SECRET": "stream-benchmark-secret-0123456789", **(extra or {})}


def run(work: Path, rate: float, seconds: float, patients: int) -> dict:
    import psutil

    from chronorisk.devices.broker import PrivateBroker, free_port
    from chronorisk.devices.config import StreamConfig
    from chronorisk.devices.replay import load_readings, publish_readings

    started = time.perf_counter()
    meds, models, url = prepare(work, patients)
    prepare_s = time.perf_counter() - started
    readings = load_readings(work / "world" / "devices" / "readings.parquet", int(rate * seconds))
    if readings.height < int(rate * seconds):
        raise SystemExit(f"only {readings.height} readings generated; raise --patients")
    broker = PrivateBroker(work / "broker").start()
    os.environ.update(broker.env)
    cfg = StreamConfig(host="127.0.0.1", port=broker.port, username="chronorisk")
    log = open(work / "stream.log", "wb")  # noqa: SIM115
    consumer = subprocess.Popen(
        [sys.executable, "-m", "chronorisk.cli", "--work", str(work / "w"), "stream", "--store", url, "--meds",
         str(meds), "--model-dir", str(models), "--host", "127.0.0.1", "--port", str(broker.port), "--username",
         "chronorisk", "--metrics-port", str(free_port())], env=_env(broker.env), stdout=log, stderr=subprocess.STDOUT,
        cwd=REPO)
    try:
        _wait_connected(work / "stream.log", consumer)
        proc = psutil.Process(consumer.pid)
        cpu0 = _cpu(proc)
        load0 = os.getloadavg()[0]
        t0 = time.time()
        acked = publish_readings(cfg, readings, rate, wait_s=120)
        publish_s = time.time() - t0
        stored = _wait_stored(url, readings.height, timeout=300)
        cpu = _cpu(proc) - cpu0
        load1 = os.getloadavg()[0]
    finally:
        consumer.terminate()
        consumer.wait(30)
        log.close()
        broker.stop()
    return summarize(url, readings.height, acked, stored, rate, seconds, publish_s, cpu, load0, load1, patients,
                     prepare_s)


def _cpu(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _wait_connected(log: Path, proc) -> None:
    deadline = time.monotonic() + 120
    while "connected (session present" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the consumer did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def _count(url: str, sql: str):
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).all()
    finally:
        engine.dispose()


def _wait_stored(url: str, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    sql = "SELECT count(*) FROM (SELECT DISTINCT device_id, reading_id FROM device_readings) AS r"
    while True:
        stored = _count(url, sql)[0][0]
        if stored >= n or time.monotonic() > deadline:
            return stored
        time.sleep(0.5)


def summarize(url, n, acked, stored, rate, seconds, publish_s, cpu, load0, load1, patients, prepare_s) -> dict:
    from datetime import datetime

    rows = _count(url, "SELECT device_id, reading_id, min(sent_at), min(stored_at) FROM device_readings "
                       "GROUP BY device_id, reading_id")
    sent = np.array([_ts(r[2]) for r in rows])
    done = np.array([_ts(r[3]) for r in rows])
    latency = done - sent
    start, end = sent.min(), done.max()
    windows = np.histogram(done, bins=np.arange(start, end + 10, 10))[0]
    full_windows = windows[1:-1] if len(windows) > 2 else windows
    scores = _count(url, "SELECT count(*) FROM scores WHERE prediction_time > '2025-07-01 00:00:00'")[0][0]
    alerts = _count(url, "SELECT count(*) FROM device_alerts")[0][0]
    cpu_per_1000 = cpu / stored * 1000 if stored else None
    per_core = 1000 / cpu_per_1000 if cpu_per_1000 else None
    peak = PROVINCE_READINGS_PER_DAY / 86_400 * PEAK_FACTOR
    cores = peak / per_core if per_core else None
    record = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": round(load0, 2), "load_average_after": round(load1, 2)},
        "cohort_patients": patients, "prepare_seconds": round(prepare_s, 1),
        "published": n, "acknowledged_by_broker": acked, "stored_once": int(stored),
        "target_rate_per_s": rate, "publish_seconds": round(publish_s, 1),
        "stored_per_s_overall": round(stored / (end - start), 1),
        "stored_per_s_10s_windows": {"min": int(full_windows.min()) / 10, "median": float(np.median(full_windows)) / 10,
                                     "max": int(full_windows.max()) / 10, "windows": len(full_windows)},
        "sustained_seconds": round(end - start, 1),
        "latency_s": {"p50": round(float(np.percentile(latency, 50)), 3),
                      "p99": round(float(np.percentile(latency, 99)), 3),
                      "max": round(float(latency.max()), 3)},
        "stream_scores": int(scores), "alerts": int(alerts),
        "consumer_cpu_seconds": round(cpu, 1),
        "consumer_cpu_seconds_per_1000_readings": round(cpu_per_1000, 3) if cpu_per_1000 else None,
        "province": {
            "readings_per_day": PROVINCE_READINGS_PER_DAY,
            "mean_per_s": round(PROVINCE_READINGS_PER_DAY / 86_400, 1),
            "peak_factor": PEAK_FACTOR, "peak_per_s": round(peak, 1),
            "readings_per_s_per_core": round(per_core, 1) if per_core else None,
            "cores_at_peak": round(cores, 2) if cores else None,
            # a 2-core machine run at most half busy gives the stream one core
            "machines_2_cores_50pct_headroom": int(np.ceil(cores)) if cores else None,
        },
    }
    print(record)
    return record


def _ts(value) -> float:
    from datetime import UTC, datetime

    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return when.replace(tzinfo=UTC).timestamp()


if __name__ == "__main__":
    raise SystemExit(main())
