"""CPU cost of the failed-authentication guard's check, run before every key authentication.

`rate_limit_storage: store` (counters in the score store, shared by every worker) reads the store once
per check; `memory://` (the `limits` package, per worker) does not. Both are timed on a SQLite store
in a temporary folder, with no failures recorded (the common case) and with the key id just under its
lockout (failure rows to read). Writes `benchmarks/results/auth_guard.json`.

    .venv/bin/python benchmarks/auth_guard_bench.py [--checks 5000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench_common import write_result


def cpu_per_check(guard, checks: int, key_id: str) -> float:
    start = time.process_time()
    for _ in range(checks):
        guard.check("127.0.0.1", key_id)
    return (time.process_time() - start) / checks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=5000)
    args = parser.parse_args()
    from chronorisk.serving.access import AuthGuard, AuthLimits
    from chronorisk.serving.store import ScoreStore

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ScoreStore.open(f"sqlite:///{Path(tmp) / 'store.db'}")
        for storage in ("store", "memory://"):
            guard = AuthGuard(AuthLimits(failures_per_minute=1000, lockout_failures=5, storage=storage),
                              engine=store.engine)
            clean = cpu_per_check(guard, args.checks, "cleankey")
            for _ in range(4):
                guard.failed("127.0.0.2", "hotkey", "bench")
            hot = cpu_per_check(guard, args.checks, "hotkey")
            results[storage] = {"cpu_us_per_check_no_failures": round(clean, 1),
                                "cpu_us_per_check_4_failures": round(hot, 1)}
        store.dispose()
    record = {"benchmark": "auth_guard", "checks": args.checks, "load_average_1m": round(os.getloadavg()[0], 2),
              "store": "sqlite (temporary file)", "results": results}
    write_result(Path(__file__).resolve().parent / "results" / "auth_guard.json", record)
    print(record)


if __name__ == "__main__":
    main()
