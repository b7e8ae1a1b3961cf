"""Single-patient explanation latency (target: at most 5 ms) and batch explanation throughput.

A model is trained on the synthetic 300-feature matrix of `train_bench.py`
(50,000 rows; 20,000 with --quick) with the default `ModelConfig` (early
stopping picks the number of trees), wrapped in a `ModelBundle` with a spec
whose measurement columns are dated by days-since-last columns, and timed:

- `pred_contrib`: `Booster.predict(row, pred_contrib=True, num_threads=1)` on a 1-row float64 array
  (LightGBM's exact TreeSHAP alone);
- `explain_matrix`: `Explainer.factors` on a 1-row numpy array (TreeSHAP + ranking + dicts + sentences);
- `explain_bundle`: `ModelBundle.explain` on a 1-row polars DataFrame with `prediction_time`
  (what serving calls: column selection, TreeSHAP, ranking, dating, wording);
- batch: `ModelBundle.explain` on 5,000 rows, rows per second.

Each latency is measured over many calls (after a warm-up) on rows drawn from the
test split; p50 / p95 / p99 / mean in ms of wall time, and of this thread's CPU
time (`cpu_*`: the work itself, which other processes on the machine do not inflate).
The same is repeated for a model with unlimited depth (`max_depth: -1`, LightGBM's
default) to show why the default caps depth at 8: TreeSHAP's cost grows with
depth squared per leaf. `--bundle DIR
--features FILE.parquet` times a real saved bundle on a real feature table instead.
The machine is shared: the load average is recorded and timings are noisy.

    .venv/bin/python benchmarks/explain_bench.py [--quick] [--calls N] [--bundle DIR --features FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_result
from train_bench import machine, split, synthetic_matrix

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "explain.json"
PREDICTION_TIME = datetime(2025, 7, 1)


def synthetic_bundle(X, y, names, max_depth: int):
    from chronorisk.features.spec import FeatureInfo, FeatureSpec
    from chronorisk.features.tasks import load_task
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.models.config import ModelConfig
    from chronorisk.models.risk_model import RiskModel

    tr, va, _ = split(len(y))
    config = ModelConfig(lightgbm={"max_depth": max_depth, "num_threads": 1})  # 1 thread: shared machine
    model = RiskModel(config).fit(X[tr], y[tr], X[va], y[va], names)
    third = len(names) // 3
    days_cols = names[third + third // 2 : 2 * third]
    infos = {}
    for i, n in enumerate(names):
        if i < third:
            infos[n] = FeatureInfo(display=f"Measurement {i}", unit="mmol/L", family="measurements",
                                   date_feature=days_cols[i % len(days_cols)], kind="value")
        else:
            infos[n] = FeatureInfo(display=f"Feature {i}", unit="", family="codes", kind="count")
    spec = FeatureSpec(windows_days=(90, 365, 1095), conditions=(), measurements=(), drug_classes=(),
                       encounter_classes=(), feature_names=tuple(names), features=infos)
    task = load_task("complication_1y")
    return ModelBundle.from_model(model, spec, task, config.tier_thresholds(task.name))


def latency(fn, args_list, calls: int) -> dict:
    """Wall and CPU (this thread) milliseconds per call; CPU time is what contention does not inflate."""
    for a in args_list[:20]:
        fn(a)
    wall, cpu = [], []
    for i in range(calls):
        a = args_list[i % len(args_list)]
        c = time.thread_time()
        t = time.perf_counter()
        fn(a)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    w, c = np.array(wall), np.array(cpu)
    return {
        "calls": calls,
        "p50_ms": round(float(np.percentile(w, 50)), 3),
        "p95_ms": round(float(np.percentile(w, 95)), 3),
        "p99_ms": round(float(np.percentile(w, 99)), 3),
        "mean_ms": round(float(w.mean()), 3),
        "max_ms": round(float(w.max()), 3),
        "cpu_p50_ms": round(float(np.percentile(c, 50)), 3),
        "cpu_p99_ms": round(float(np.percentile(c, 99)), 3),
        "cpu_mean_ms": round(float(c.mean()), 3),
    }


def time_bundle(bundle, table, calls: int) -> dict:
    import polars as pl

    names = list(bundle.feature_names)
    if "prediction_time" not in table.columns:
        table = table.with_columns(pl.lit(PREDICTION_TIME).alias("prediction_time"))
    rows = [table.slice(i, 1) for i in range(min(200, table.height))]
    mats = [np.ascontiguousarray(r.select(names).to_numpy(), dtype=np.float64) for r in rows]
    times = [r["prediction_time"][0] for r in rows]
    booster, explainer = bundle.booster, bundle.explainer
    load = os.getloadavg()[0]
    result = {
        "trees": int(booster.num_trees()),
        "features": len(names),
        "max_depth": bundle.metadata.get("lightgbm_params", {}).get("max_depth"),
        "load_average_1m": round(load, 2),
        "pred_contrib": latency(lambda m: booster.predict(m, pred_contrib=True, num_threads=1), mats, calls),
        "explain_matrix": latency(
            lambda i: explainer.factors(mats[i], times[i], 5), list(range(len(mats))), calls
        ),
        "explain_bundle": latency(lambda r: bundle.explain(r, 5), rows, calls),
    }
    batch = table.head(5000)
    t = time.perf_counter()
    out = bundle.explain(batch, 5)
    secs = time.perf_counter() - t
    result["batch"] = {"rows": batch.height, "seconds": round(secs, 3), "rows_per_second": round(batch.height / secs)}
    assert len(out) == batch.height
    return result


def main(argv: list[str] | None = None) -> int:
    import polars as pl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 training rows, fewer calls")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per latency (default 1000; 200 quick)")
    ap.add_argument("--bundle", type=Path, default=None, help="a saved model bundle folder")
    ap.add_argument("--features", type=Path, default=None, help="feature table parquet for --bundle")
    ap.add_argument("--out", type=Path, default=None, help="default results/explain.json (explain_quick.json)")
    args = ap.parse_args(argv)
    calls = args.calls or (200 if args.quick else 1000)
    record = {
        "benchmark": "explain",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "target_ms": 5.0,
        "models": {},
    }
    if args.bundle is not None:
        from chronorisk.models.bundle import ModelBundle

        if args.features is None:
            ap.error("--bundle needs --features FILE.parquet")
        bundle = ModelBundle.load(args.bundle)
        record["source"] = {"bundle": str(args.bundle), "features": str(args.features),
                            "model": bundle.name, "calibration": bundle.calibrator.method}
        record["models"]["bundle"] = time_bundle(bundle, pl.read_parquet(args.features), calls)
    else:
        rows = 20_000 if args.quick else 50_000
        X, y, names = synthetic_matrix(rows, 300)
        _, _, te = split(rows)
        table = pl.DataFrame({n: X[te, i] for i, n in enumerate(names)}, nan_to_null=True)
        record["training_rows"] = rows
        for label, depth in (("default_max_depth_8", 8), ("unlimited_depth", -1)):
            bundle = synthetic_bundle(X, y, names, depth)
            record["models"][label] = time_bundle(bundle, table, calls)
            print(label, json.dumps(record["models"][label]), file=sys.stderr)
    record["note"] = "shared 2-core machine with other work running: latencies are noisy upper bounds"
    out = args.out or (RESULTS.with_name("explain_quick.json") if args.quick else RESULTS)
    write_result(out, record)
    print(json.dumps({k: {m: v.get(m) for m in ("trees", "pred_contrib", "explain_bundle")}
                      for k, v in record["models"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
