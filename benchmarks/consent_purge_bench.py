"""CPU and wall time of purging withdrawn patients from the monitoring log (`serving/consent_files.py`).

A synthetic log of `--parts` live-like parts (`--rows` rows each, every row its own prediction time, 20
features) at two sites, and a SQLite store with `--withdrawn` withdrawals. Timed: the purge a withdrawal
runs (one patient, every part read), a full sweep (`chronorisk monitor` with changed withdrawals), and the
next sweep under the same withdrawals (only new parts read). Writes `benchmarks/results/consent_purge.json`.

    .venv/bin/python benchmarks/consent_purge_bench.py [--parts 400 --rows 500 --withdrawn 100]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from bench_common import write_result


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - wall, 3), round(time.process_time() - cpu, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=400)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--withdrawn", type=int, default=100)
    args = parser.parse_args()
    import numpy as np
    import polars as pl

    from chronorisk.serving.consent_files import purge_monitoring
    from chronorisk.serving.prediction_log import PredictionLog
    from chronorisk.serving.store import ScoreStore, consent, writer

    rng = np.random.default_rng(0)
    start = datetime(2025, 1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plog = PredictionLog.for_work(work)
        for i in range(args.parts):
            n = args.rows
            frame = pl.DataFrame({
                "subject_id": rng.integers(0, 20_000, n),
                "site": ["site_a" if i % 2 else "site_b"] * n,
                "prediction_time": [start + timedelta(minutes=i * 10, seconds=j) for j in range(n)],
                "risk": rng.random(n), "tier": ["low"] * n,
                **{f"f{k}": rng.random(n) for k in range(20)},
            })
            plog.append(frame, "onset_2y", 1, part=f"bench-{i}")
        store = ScoreStore.open(f"sqlite:///{work / 'store.db'}")
        with writer(store.engine) as conn, conn.begin():
            conn.execute(consent.insert(), [{"subject_id": s, "site": None, "withdrawn_at": start,
                                             "recorded_by": "bench", "recorded_at": start}
                                            for s in range(args.withdrawn)])
        one, one_wall, one_cpu = timed(lambda: purge_monitoring(store, work, None, actor="b", role="admin",
                                                                subject_id=0))
        full, full_wall, full_cpu = timed(lambda: purge_monitoring(store, work, None, actor="b", role="admin"))
        again, again_wall, again_cpu = timed(lambda: purge_monitoring(store, work, None, actor="b", role="admin"))
        store.dispose()
    record = {
        "benchmark": "consent_purge", "parts": args.parts, "rows_per_part": args.rows,
        "withdrawn_patients": args.withdrawn, "load_average_1m": round(os.getloadavg()[0], 2),
        "withdrawal_one_patient": {"wall_s": one_wall, "cpu_s": one_cpu, "rows_removed": one.rows},
        "sweep_full": {"wall_s": full_wall, "cpu_s": full_cpu, "rows_removed": full.rows},
        "sweep_unchanged_withdrawals": {"wall_s": again_wall, "cpu_s": again_cpu, "rows_removed": again.rows},
    }
    write_result(Path(__file__).resolve().parent / "results" / "consent_purge.json", record)
    print(record)


if __name__ == "__main__":
    main()
