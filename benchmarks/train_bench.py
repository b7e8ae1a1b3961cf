"""Training time of one task's model on a synthetic feature matrix of realistic size.

The matrix imitates a feature table of the pipeline (100,000 rows x 300
features by default; 20,000 x 300 with --quick): a third of the columns are
measurement summaries with 40% missing (as at community sites), a third
counts and days-since-last values, the rest binary flags and noise. The
outcome follows a logistic model of 15 columns with a few non-linear terms
and interactions (prevalence about 23%). Split 70 / 15 / 15 into training,
validation (early stopping, calibration) and test rows.

Recorded per thread count: seconds to build the LightGBM datasets and boost
(`RiskModel.fit_booster`, early stopping on the validation rows, default
`ModelConfig` parameters; wall and CPU seconds), seconds to calibrate (`calibration: auto`, 5-fold
cross-fitted choice), trees kept, test AUROC, and the load average at the
start. The machine is shared with other work: timings are noisy.

    .venv/bin/python benchmarks/train_bench.py [--quick] [--rows N] [--features P] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train.json"


def synthetic_matrix(n: int, p: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X float64 with NaN for missing, y 0/1, column names) shaped like a feature table."""
    rng = np.random.default_rng(seed)
    third = p // 3
    meas = rng.normal(0, 1, (n, third))
    meas[rng.random((n, third)) < 0.4] = np.nan
    counts = rng.poisson(2.0, (n, third // 2)).astype(float)
    days = rng.uniform(0, 1095, (n, third - third // 2))
    days[rng.random(days.shape) < 0.3] = np.nan
    rest = p - 2 * third
    flags = (rng.random((n, rest // 2)) < 0.15).astype(float)
    noise = rng.normal(size=(n, rest - rest // 2))
    X = np.column_stack([meas, counts, days, flags, noise])
    z = np.nan_to_num(meas[:, :8], nan=0.0)
    logit = (
        -3.2 + 0.6 * z[:, 0] + 0.5 * z[:, 1] + 0.4 * z[:, 2] ** 2 - 0.4 * z[:, 3]
        + 0.3 * z[:, 4] * z[:, 5] + 0.25 * np.tanh(2 * z[:, 6]) + 0.2 * z[:, 7]
        + 0.15 * counts[:, 0] + 0.8 * flags[:, 0] + 0.5 * flags[:, 1] - 0.3 * flags[:, 2]
        + 0.002 * np.nan_to_num(days[:, 0], nan=900.0) - 1.0 * np.isnan(meas[:, 0])
        + 0.3 * (counts[:, 1] > 3)
    )
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    names = [f"f{i:03d}" for i in range(X.shape[1])]
    return X, y, names


def split(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    a, b = int(0.7 * n), int(0.85 * n)
    return idx[:a], idx[a:b], idx[b:]


def machine() -> dict:
    info = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def run(rows: int, features: int, threads: list[int]) -> dict:
    import lightgbm as lgb

    from chronorisk.models.config import ModelConfig
    from chronorisk.models.risk_model import RiskModel
    from chronorisk.training import metrics

    X, y, names = synthetic_matrix(rows, features)
    tr, va, te = split(rows)
    out = []
    for t in threads:
        config = ModelConfig(lightgbm={"num_threads": t})
        load = os.getloadavg()[0]
        model = RiskModel(config)
        started, cpu_started = time.perf_counter(), time.process_time()
        model.fit_booster(X[tr], y[tr], X[va], y[va], names)
        boost_s = time.perf_counter() - started
        boost_cpu = time.process_time() - cpu_started
        started = time.perf_counter()
        model.fit_calibration(X[va], y[va])
        cal_s = time.perf_counter() - started
        p = model.predict_risk(X[te])
        out.append(
            {
                "num_threads": t,
                "load_average_1m": round(load, 2),
                "boost_seconds": round(boost_s, 2),
                "boost_cpu_seconds": round(boost_cpu, 2),
                "calibration_seconds": round(cal_s, 2),
                "trees": model.n_trees_,
                "trees_trained": model.n_trees_ + config.early_stopping_rounds,
                "ms_per_tree": round(1000 * boost_s / (model.n_trees_ + config.early_stopping_rounds), 2),
                "calibration": model.calibrator_.method,
                "test_auroc": round(float(metrics.auroc(y[te], p)), 4),
                "test_ece": round(float(metrics.ece(y[te], p)), 4),
            }
        )
        print(json.dumps(out[-1]), file=sys.stderr)
    return {
        "rows": rows,
        "features": X.shape[1],
        "train_rows": int(tr.size),
        "valid_rows": int(va.size),
        "prevalence": round(float(y.mean()), 4),
        "lightgbm": lgb.__version__,
        "params": ModelConfig().lightgbm_params(),
        "num_boost_round": ModelConfig().num_boost_round,
        "early_stopping_rounds": ModelConfig().early_stopping_rounds,
        "runs": out,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 rows instead of 100,000")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--features", type=int, default=300)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts to time")
    ap.add_argument("--out", type=Path, default=None, help="default results/train.json (train_quick.json)")
    args = ap.parse_args(argv)
    rows = args.rows or (20_000 if args.quick else 100_000)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    record = {
        "benchmark": "train",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **run(rows, args.features, threads),
        "note": "shared 2-core machine; other work was running, so the timings are noisy upper bounds",
    }
    out = args.out or (RESULTS.with_name("train_quick.json") if args.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out)
    print(json.dumps(record["runs"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
