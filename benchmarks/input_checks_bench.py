"""Cost of counting impossible input values while batch scoring (`features.vocabulary.input_checks`).

Batch scoring reads a chunk's events once, then per task builds the features
(`features.pipeline.transform`) and, when a monitor is attached, counts the
values those features read and dropped (`input_checks`, on the same events
in memory). This times both on the same chunk of random MEDS events
(benchmarks/random_meds.py, about 150 events a patient; every patient scored
at one prediction time, as in `chronorisk score`), so the added share of the
feature work is measured directly; a batch of 1M patients is ~20 such chunks.

    .venv/bin/python benchmarks/input_checks_bench.py [--quick] [--patients N] [--work DIR]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from bench_common import public_argv, write_result
from random_meds import write_random_meds

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WHEN = datetime(2025, 1, 1)


def _best_of(runs: int, fn) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=50_000, help="patients in the chunk (batch scoring's chunk size)")
    ap.add_argument("--quick", action="store_true", help="10,000 patients")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    n = 10_000 if args.quick else args.patients

    from chronorisk.features.config import FeatureConfig
    from chronorisk.features.pipeline import fit_spec, transform
    from chronorisk.features.vocabulary import code_summary, input_checks

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        paths = write_random_meds(Path(tmp), n, shard_size=n)
        events = pl.read_parquet(paths).filter(pl.col("time").is_null() | (pl.col("time") < WHEN))
        spec = fit_spec(code_summary(events), FeatureConfig(min_code_subjects=max(20, n // 500)))
        index = events.select("subject_id").unique().with_columns(
            pl.lit(WHEN).cast(pl.Datetime("us")).alias("prediction_time")).sort("subject_id")
        lazy = events.lazy()
        features = _best_of(args.runs, lambda: transform(spec, lazy, index.lazy()).collect())
        checks = _best_of(args.runs, lambda: input_checks(spec, lazy, index))
        counted = input_checks(spec, lazy, index)
    record = {
        "benchmark": "input_checks", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": public_argv(sys.argv[1:]), "machine": platform.machine(), "python": platform.python_version(),
        "patients": n, "events": events.height, "feature_columns": len(spec.feature_names),
        "codes_checked": counted["code"].n_unique(), "values_counted": int(counted["n_values"].sum()),
        "features_seconds": round(features, 3), "input_checks_seconds": round(checks, 3),
        "added_share_of_features": round(checks / features, 4),
        "note": "best of --runs, in process, events in memory as in serving.scoring.score_chunk; 2 shared cores",
    }
    name = "input_checks_quick.json" if args.quick else "input_checks.json"
    write_result(RESULTS / name, record)
    print(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
