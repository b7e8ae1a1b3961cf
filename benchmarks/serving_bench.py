"""Serving benchmarks over real HTTP, and batch scoring, on this machine.

What is timed (targets from the serving issue):

1. `score_features`: POST /score with ready-made features and explanations (top 5 factors) of real
   patients, closed loop at increasing concurrency; sustained throughput = the highest request rate
   whose p99 stays at or under 50 ms (target >= 300 requests/s).
2. `score_events`: POST /score with a patient's raw MEDS events (three years of records before the
   prediction time, plus birth and sex), both tasks, explanations on: p50 and p99 (target p99 <= 100 ms).
3. `get_patient`: GET /patients/{id} from the score store (each read is also an audit-log append),
   closed loop at increasing concurrency (target >= 500 requests/s).
4. `batch`: `chronorisk score`'s code path (scoring.batch_score) over a generated cohort of N patients
   (1,000,000; --quick 100,000), features included, into a fresh SQLite store and the monitoring
   log, as `chronorisk score` does: without explanations (target >= 10,000 patients/s) and with
   explanations stored for medium and high tiers. Wall time needs a quiet machine (the load average
   before and after is recorded); patients per CPU-second of this process (all its threads) does not.

The server is `chronorisk serve` (BentoML, `--workers`, default 2) on a free loopback port, with a
small model trained here on a generated cohort. The load generator is `wrk` (one thread, a Lua
script rotating the request bodies or paths; installed with apt-get when missing and running as
root), so that the client takes little of the 2 cores; without it, a raw asyncio HTTP/1.1
keep-alive client in this process. Client, server workers and everything else share the machine's
2 cores: every run records the server's CPU milliseconds per request (its processes' user+sys,
comparable across machine loads), the client's, and the load average.

    .venv/bin/python benchmarks/serving_bench.py [--quick] [--work DIR] [--batch-patients N] [--skip-batch]
        [--skip-http] [--python-client]

Writes benchmarks/results/serving.json (--quick: serving_quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from bench_common import write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "serving"))

WHEN = datetime(2024, 1, 1)
P99_TARGET_MS = 50.0


def machine() -> dict:
    import psutil

    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- load generator -------------------------------------------------------------------------


async def _one_connection(host, port, requests, counted_from, deadline, latencies, statuses):
    """Closed-loop calls on one keep-alive connection until `deadline`; calls started before
    `counted_from` (the warm-up) are not counted. A connection the server closes is opened again."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        i = random.randrange(len(requests))
        while time.perf_counter() < deadline:
            raw = requests[i % len(requests)]
            i += 1
            start = time.perf_counter()
            if reader is None:  # the next call opens a new connection: its latency includes the connect
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            chunked = closing = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    closing = True
            if chunked:
                while True:
                    size = int((await reader.readline()).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
            if start >= counted_from:
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1
            if closing:  # the server ended this connection (serve.keepalive_max_requests)
                writer.close()
                reader = None
    finally:
        writer.close()


async def _load(host, port, requests, concurrency, seconds):
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    # a warm-up second on the same connections, not counted (the server may meanwhile spread them
    # over its workers, as it would for a client that has been connected a while)
    start = time.perf_counter() + 1.0
    deadline = start + seconds
    await asyncio.gather(*(_one_connection(host, port, requests, start, deadline, latencies, statuses)
                           for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p90_ms": round(float(np.percentile(lat, 90)), 2) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "max_ms": round(float(lat.max()), 2) if lat.size else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


WRK_SCRIPT = r"""
local reqs = {}
local idx = 0
function init(args)
  local mode, file, method, path, key = args[1], args[2], args[3], args[4], args[5]
  local headers = {["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json"}
  for line in io.lines(file) do
    if #line > 0 then
      if mode == "body" then
        reqs[#reqs + 1] = wrk.format(method, path, headers, line)
      else
        reqs[#reqs + 1] = wrk.format(method, line, headers, nil)
      end
    end
  end
  idx = math.random(#reqs)
end
function request()
  idx = idx % #reqs + 1
  return reqs[idx]
end
function done(summary, latency, requests)
  io.write(string.format('WRK_JSON {"requests":%d,"duration_us":%d,"non_2xx":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


def ensure_wrk() -> str | None:
    """`wrk` on PATH; installed from the Debian archive when missing and running as root (as the
    Makefile's browser-deps does for chromium); None: use the Python client."""
    import subprocess

    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", "wrk"], ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "wrk"]):
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if shutil.which("wrk"):
            break
    return shutil.which("wrk")


@dataclass
class Requests:
    """What one benchmark sends: a method and a path with rotating JSON bodies, or rotating paths."""

    method: str
    key: str
    path: str = "/"
    bodies: list[bytes] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def raw(self) -> list[bytes]:
        """Whole HTTP/1.1 requests for the Python client."""
        if self.bodies:
            return [http_request(self.method, self.path, self.key, b) for b in self.bodies]
        return [http_request(self.method, p, self.key) for p in self.paths]

    def wrk_args(self, folder: Path) -> list[str]:
        """The Lua script's arguments; the bodies or paths go to a file, one per line."""
        items = self.bodies or [p.encode() for p in self.paths]
        data = folder / f"wrk-{abs(hash(tuple(items))) % 10**8}.txt"
        data.write_bytes(b"\n".join(items) + b"\n")
        return ["body" if self.bodies else "path", str(data), self.method, self.path, self.key]


def wrk_load(wrk: str, url: str, reqs: Requests, concurrency: int, seconds: float, folder: Path,
             before=lambda: None) -> dict:
    """Closed-loop load by wrk (one thread, `concurrency` keep-alive connections) after a 1 s warm-up;
    `before()` runs between the two (the CPU counters start there)."""
    import subprocess

    script = folder / "rotate.lua"
    script.write_text(WRK_SCRIPT)
    args = reqs.wrk_args(folder)

    def run(duration: float) -> dict:
        cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
               "-s", str(script), url, "--", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result: {out.stderr[-500:]}")
        return json.loads(line.removeprefix("WRK_JSON "))

    run(1.0)
    before()
    r = run(seconds)
    elapsed = r["duration_us"] / 1e6
    errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    return {
        "client": "wrk",
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": r["requests"],
        "requests_per_s": round(r["requests"] / elapsed, 1),
        "p50_ms": round(r["p50_us"] / 1000, 2),
        "p90_ms": round(r["p90_us"] / 1000, 2),
        "p99_ms": round(r["p99_us"] / 1000, 2),
        "max_ms": round(r["max_us"] / 1000, 2),
        "statuses": {"2xx": r["requests"] - r["non_2xx"], **({"non_2xx": r["non_2xx"]} if r["non_2xx"] else {})},
        "socket_errors": errors,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


SERVER_PID: int | None = None
WRK: str | None = None
SCRATCH: Path | None = None


def _server_processes() -> list:
    """The server's processes (the BentoML arbiter and its workers); none before the server started."""
    import psutil

    if SERVER_PID is None:
        return []
    try:
        root = psutil.Process(SERVER_PID)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _worker_cpu() -> dict[int, float]:
    """CPU seconds so far of each of the server's processes, by pid."""
    import psutil

    out = {}
    for p in _server_processes():
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def _server_cpu() -> float:
    """CPU seconds used so far by the server's processes (the BentoML arbiter and its workers)."""
    return sum(_worker_cpu().values())


def _connections_by_worker(port: int) -> list[int]:
    """How many established client connections each server process holds on `port` (largest first)."""
    import psutil

    counts = []
    for p in _server_processes():
        try:
            held = sum(1 for c in p.net_connections(kind="tcp")
                       if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)
        except psutil.NoSuchProcess:
            continue
        counts.append(held)
    return sorted((c for c in counts if c), reverse=True)


def _client_cpu() -> float:
    """CPU seconds of this process and its finished children (wrk)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def load(url: str, reqs: Requests, concurrency: int, seconds: float) -> dict:
    """Closed-loop load; also the server's CPU per request (comparable across machine loads)."""
    host, port = url.removeprefix("http://").split(":")
    cpu = {}

    def start() -> None:
        cpu["server"], cpu["client"] = _server_cpu(), _client_cpu()

    seen: list[list[int]] = []  # connections held per worker, sampled each second during the run
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            seen.append(_connections_by_worker(int(port)))

    sampler = threading.Thread(target=sample, daemon=True)
    workers_before = _worker_cpu()
    sampler.start()
    try:
        if WRK is not None:
            result = wrk_load(WRK, url, reqs, concurrency, seconds, SCRATCH, before=start)
        else:  # its warm-up second runs inside: the CPU figures include it (slight overestimates)
            start()
            result = asyncio.run(_load(host, int(port), reqs.raw(), concurrency, seconds))
            result = {"client": "python", **result, "socket_errors": 0}
    finally:
        stop.set()
        sampler.join()
    before_server, before_client = cpu["server"], cpu["client"]
    n = result["requests"] or 1
    workers_after = _worker_cpu()
    result["server_cpu_s_by_process"] = sorted(
        (round(workers_after[pid] - workers_before.get(pid, 0.0), 2) for pid in workers_after), reverse=True)
    result["connections_by_worker"] = seen
    result["server_cpu_ms_per_request"] = round(1000 * (sum(workers_after.values()) - before_server) / n, 3)
    result["client_cpu_ms_per_request"] = round(1000 * (_client_cpu() - before_client) / n, 3)
    return result


def http_request(method: str, path: str, key: str, body: bytes | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {key}",
             "Connection: keep-alive"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def sweep(url, requests, levels, seconds, label) -> dict:
    runs = []
    for c in levels:
        r = load(url, requests, c, seconds)
        print(f"  {label} concurrency {c:>3}: {r['requests_per_s']:>8.1f} req/s  p50 {r['p50_ms']} ms  "
              f"p99 {r['p99_ms']} ms  server cpu {r['server_cpu_ms_per_request']} ms/req  "
              f"statuses {r['statuses']}", flush=True)
        runs.append(r)
    ok = [r for r in runs if r["p99_ms"] is not None and r["p99_ms"] <= P99_TARGET_MS
          and set(r["statuses"]) <= {"200", "2xx"} and not r["socket_errors"]]
    best = max(ok, key=lambda r: r["requests_per_s"]) if ok else None
    return {"runs": runs, "sustained_at_p99_50ms": best}


# -- set-up ---------------------------------------------------------------------------------


def prepare(work: Path, patients: int):
    """A generated cohort, a small model per task, the cohort batch-scored into a store, keys."""
    from serving_support import generate_cohort, train_bundles

    from chronorisk.serving import access, scoring
    from chronorisk.serving.store import ScoreStore

    meds = work / "cohort" / "meds"
    if not meds.is_dir():
        print(f"generating {patients:,} patients for the HTTP benchmarks ...", flush=True)
        generate_cohort(work / "cohort", patients=patients, seed=11)
    models = work / "models"
    if not (models / "onset_2y" / "bundle.json").is_file():
        print("training a small model per task ...", flush=True)
        train_bundles(meds, models, rounds=200)
    url = f"sqlite:///{work / 'store.db'}"
    store = ScoreStore.open(url)
    served = scoring.load_models(["complication_1y", "onset_2y"], source="folder", model_dir=models,
                                 required=True)
    if store.count_scores() == 0:
        scoring.batch_score(store, served, meds, WHEN)
    keys = {role: access.create_key(store.engine, role, None if role != "gp" else "x")[1]
            for role in ("admin", "data_scientist")}
    store.dispose()
    return meds, models, url, keys, served


def feature_bodies(meds: Path, served, n: int = 300) -> list[bytes]:
    """Ready-made feature rows of real eligible patients (measured values only) as /score bodies."""
    import polars as pl

    from chronorisk.data.meds_io import scan_sites
    from chronorisk.features.labels import eligible_index
    from chronorisk.features.pipeline import transform

    events = scan_sites(meds).drop("site").collect().lazy()
    bodies = []
    for task, model in served.items():
        idx = eligible_index(events, model.task_def, [WHEN]).collect().head(n // 2)
        feats = transform(model.spec, events, idx.lazy()).collect()
        for row in feats.select(model.feature_names).iter_rows(named=True):
            values = {k: float(v) for k, v in row.items() if v is not None and not np.isnan(v)}
            bodies.append(json.dumps({"features": values, "tasks": [task], "prediction_time": WHEN.isoformat(),
                                      "explain": True, "top_k": 5}).encode())
    random.Random(1).shuffle(bodies)
    assert pl is not None
    return bodies


def event_bodies(meds: Path, served, n: int = 100) -> tuple[list[bytes], dict]:
    """Raw events of patients with three years of records before the prediction time."""
    import polars as pl

    from chronorisk.data.meds_io import scan_sites
    from chronorisk.features.labels import eligible_index

    events = scan_sites(meds).drop("site").collect()
    start = datetime(WHEN.year - 3, WHEN.month, WHEN.day)
    model = served["complication_1y"]
    idx = eligible_index(events.lazy(), model.task_def, [WHEN]).collect()
    spans = (events.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))
             .group_by("subject_id").agg(pl.col("time").min().alias("first")))
    chosen = idx.join(spans, on="subject_id").filter(pl.col("first") <= start)["subject_id"].head(n).to_list()
    bodies, sizes = [], []
    for sid in chosen:
        ev = events.filter((pl.col("subject_id") == sid)
                           & (pl.col("time").is_null() | (pl.col("code") == "MEDS_BIRTH")
                              | ((pl.col("time") >= start) & (pl.col("time") < WHEN))))
        rows = []
        for r in ev.iter_rows(named=True):
            e = {"code": r["code"]}
            if r["time"] is not None:
                e["time"] = r["time"].isoformat()
            if r["numeric_value"] is not None:
                e["numeric_value"] = float(r["numeric_value"])
            if r["text_value"] is not None:
                e["text_value"] = r["text_value"]
            rows.append(e)
        sizes.append(len(rows))
        bodies.append(json.dumps({"events": rows, "prediction_time": WHEN.isoformat(), "explain": True}).encode())
    return bodies, {"patients": len(bodies), "events_per_request_median": int(np.median(sizes)) if sizes else 0,
                    "events_per_request_max": int(max(sizes)) if sizes else 0, "record_years": 3}


def read_subjects(meds: Path, site: str) -> list[int]:
    from chronorisk.data.meds_io import read_splits

    return read_splits(meds, site)["subject_id"].to_list()


def patient_paths(url: str, n: int = 2000) -> list[str]:
    from sqlalchemy import select

    from chronorisk.serving.store import ScoreStore, patients

    store = ScoreStore.open(url)
    with store.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(select(patients.c.subject_id).limit(n))]
    store.dispose()
    return [f"/patients/{i}" for i in ids]


# -- batch ----------------------------------------------------------------------------------


def batch(work: Path, patients: int, served) -> dict:
    from chronorisk.data.meds_io import site_ids
    from chronorisk.serving import scoring
    from chronorisk.serving.state import monitoring_sink
    from chronorisk.serving.store import ScoreStore

    root = work / f"batch-{patients}"
    meds = root / "meds"
    gen = {}
    if not meds.is_dir():
        from chronorisk.data.config import GenerateConfig
        from chronorisk.data.synth.runner import generate

        print(f"generating {patients:,} patients for the batch benchmark ...", flush=True)
        t = time.perf_counter()
        generate(GenerateConfig(patients=patients, seed=5), root, workers=2)
        gen = {"generate_seconds": round(time.perf_counter() - t, 1)}
    import pyarrow.parquet as pq

    n_events = sum(pq.ParquetFile(p).metadata.num_rows for s in site_ids(meds)
                   for p in scoring.site_shards(meds, s))
    out = {"patients": patients, "events": n_events, **gen}
    for label, tiers in (("without_explanations", []), ("with_explanations", ["medium", "high"])):
        db = root / f"store-{label}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        store = ScoreStore.open(f"sqlite:///{db}")
        # as `chronorisk score` does: every chunk also goes to the monitoring log (keyed join keys only)
        shutil.rmtree(root / "w" / "monitoring" / "log", ignore_errors=True)
        monitor = monitoring_sink(root / "w")
        print(f"batch scoring {patients:,} patients {label.replace('_', ' ')} ...", flush=True)
        load_before = [round(x, 2) for x in os.getloadavg()]
        t = time.perf_counter()
        cpu = time.process_time()
        report = scoring.batch_score(store, served, meds, WHEN, explain_tiers=tiers, monitor=monitor)
        seconds = time.perf_counter() - t
        rows = report.total()
        out[label] = {
            "seconds": round(seconds, 1),
            "cpu_seconds_this_process": round(time.process_time() - cpu, 1),
            "scored_rows": rows,
            "explained_rows": report.total("explained"),
            "patients_per_s": round(patients / seconds, 1),
            # the work itself, whatever else the shared machine runs: patients per CPU-second of this process
            "patients_per_cpu_s": round(patients / max(time.process_time() - cpu, 1e-9), 1),
            "scored_rows_per_s": round(rows / seconds, 1),
            "chunks": report.scored_chunks,
            "monitoring_log": monitor is not None,
            "load_average_before": load_before,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        print(f"  {out[label]}", flush=True)
        store.dispose()
    out["peak_rss_gib_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def http_benchmarks(args, work: Path, meds: Path, models: Path, url: str, keys: dict, served, seconds: float) -> dict:
    """The three HTTP benchmarks against one server; the load generator and what it cost the client."""
    from serving_support import Server, write_params

    global SERVER_PID, WRK, SCRATCH
    WRK = None if args.python_client else ensure_wrk()
    SCRATCH = work / "load"
    SCRATCH.mkdir(parents=True, exist_ok=True)
    print(f"load generator: {WRK or 'python asyncio client (wrk not available)'}", flush=True)
    params = write_params(work / "params.yaml", key_cache_seconds=2)
    server = Server(work=work / "w", store_url=url, params=params, model_dir=models, meds_root=meds,
                    workers=args.workers).start(timeout=300)
    SERVER_PID = server.proc.pid
    sections = {}
    try:
        key = keys["admin"]
        print("score with explanations from ready-made features:", flush=True)
        reqs = Requests("POST", key, "/score", bodies=feature_bodies(meds, served))
        sections["score_features"] = sweep(server.url, reqs, [1, 2, 4, 8, 16, 32], seconds, "features")
        sections["score_features"]["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        print("score with explanations from raw events (3 years of records):", flush=True)
        raw, info = event_bodies(meds, served)
        reqs = Requests("POST", key, "/score", bodies=raw)
        runs = []
        for c in (1, 2, 4):
            r = load(server.url, reqs, c, seconds * 1.5)
            print(f"  events concurrency {r['concurrency']}: {r['requests_per_s']} req/s p50 {r['p50_ms']} ms "
                  f"p99 {r['p99_ms']} ms server cpu {r['server_cpu_ms_per_request']} ms/req "
                  f"statuses {r['statuses']}", flush=True)
            runs.append(r)
        sections["score_events"] = {"requests": info, "runs": runs,
                                    "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
        print("GET /patients/{id} (store read + audit append):", flush=True)
        reqs = Requests("GET", key, paths=patient_paths(url))
        sections["get_patient"] = sweep(server.url, reqs, [2, 4, 8, 16, 32], seconds, "patients")
        sections["get_patient"]["best_requests_per_s"] = max(r["requests_per_s"]
                                                             for r in sections["get_patient"]["runs"])
        sections["get_patient"]["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    finally:
        server.stop()
    return {"load_generator": "wrk -t1 (Lua body rotation)" if WRK else "python asyncio client",
            "workers": args.workers, "sections": sections}


def summary(result: dict) -> dict:
    """The headline figure of each target (None for a section not run), next to its target."""
    out: dict = {}
    features = result.get("score_features") or {}
    best = features.get("sustained_at_p99_50ms")
    if features:
        one = features["runs"][0]
        out["score_features"] = {"sustained_requests_per_s_at_p99_50ms": best["requests_per_s"] if best else None,
                                 "server_cpu_ms_per_request_at_concurrency_1": one["server_cpu_ms_per_request"],
                                 "target": ">= 300 req/s with p99 <= 50 ms"}
    events = result.get("score_events") or {}
    if events:
        one = events["runs"][0]
        out["score_events"] = {"p50_ms": one["p50_ms"], "p99_ms": one["p99_ms"], "concurrency": 1,
                               "server_cpu_ms_per_request": one["server_cpu_ms_per_request"],
                               "target": "p99 <= 100 ms"}
    patients = result.get("get_patient") or {}
    if patients:
        out["get_patient"] = {"best_requests_per_s": patients["best_requests_per_s"],
                              "server_cpu_ms_per_request_min": min(r["server_cpu_ms_per_request"]
                                                                   for r in patients["runs"]),
                              "target": ">= 500 req/s"}
    batch = result.get("batch") or {}
    if batch:
        plain = batch["without_explanations"]
        out["batch"] = {"patients": batch["patients"], "patients_per_s": plain["patients_per_s"],
                        "patients_per_cpu_s": plain["patients_per_cpu_s"],
                        "seconds_with_explanations": batch["with_explanations"]["seconds"],
                        "target": ">= 10,000 patients/s without explanations"}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="kept between runs (default: a temp folder)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-patients", type=int, default=None)
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--python-client", action="store_true", help="load from this process, not wrk")
    args = parser.parse_args(argv)

    from chronorisk.environment import configure_environment

    work = args.work or Path(tempfile.mkdtemp(prefix="serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    configure_environment(work / "w")
    os.environ["CHRONORISK_SERVE_SECRET"] = "bench-secret-0123456789abcdef"
    seconds = 5.0 if args.quick else 10.0
    result = {
        "benchmark": "serving",
        "command": "benchmarks/serving_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "workers": args.workers,
        "targets": {"score_features": ">= 300 req/s with p99 <= 50 ms", "score_events": "p99 <= 100 ms",
                    "get_patient": ">= 500 req/s", "batch": ">= 10,000 patients/s without explanations"},
    }
    http_patients = 3000 if args.quick else 10000
    meds, models, url, keys, served = prepare(work, http_patients)
    from chronorisk.data.meds_io import site_ids

    result["http_cohort"] = {
        "patients": sum(len(read_subjects(meds, s)) for s in site_ids(meds)),
        "note": "generated here (an existing --work cohort is reused whatever its size), batch-scored at "
                f"{WHEN:%Y-%m-%d} into the SQLite store the server reads",
    }
    if not args.skip_http:
        result["http"] = http_benchmarks(args, work, meds, models, url, keys, served, seconds)
        result.update(result["http"].pop("sections"))
    if not args.skip_batch:
        n = args.batch_patients or (100_000 if args.quick else 1_000_000)
        result["batch"] = batch(work, n, served)
        result["batch"]["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    name = "serving_quick.json" if args.quick else "serving.json"
    target = REPO / "benchmarks" / "results" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    merged = result
    if (args.skip_http or args.skip_batch) and target.is_file():
        # a partial run keeps the other sections of the last full file (each says when it was measured)
        merged = {**json.loads(target.read_text()), **result}
    merged["summary"] = summary(merged)
    write_result(target, merged, indent=1)
    print(f"wrote {target}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
