"""Training time and held-out quality: a synthetic feature matrix, or a generated cohort (`--cohort`).

Two benchmarks in one script; every record of either carries the keys the
evaluation records carry (`task`, `site` (or `all`), `n`, `auroc`,
`oracle_auroc`, `mode`, `calibration_slope`, `ece`).

**Synthetic matrix** (default; `train.json`, `train_quick.json`):

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
start. The true risk of the matrix is known, so `oracle_auroc` is its AUROC on
the test rows (`mode` is null: this is not the generator's cohort).

**Generated cohort** (`--cohort WORK`; `train_cohort_<mode>_<patients>.json`):
`chronorisk generate` and `chronorisk features` are run into WORK first when
its feature tables are missing (their CPU seconds recorded apart), then each
task is trained as `chronorisk train` does (`training.train.train_task`,
params.yaml, `--threads` LightGBM threads) and its held-out patients are
evaluated overall and per site with the generator's true risk as the oracle
(`training.evaluation.evaluate`). The truth coverage (share of held-out rows
with a generator truth row) is recorded beside.

    .venv/bin/python benchmarks/train_bench.py [--quick] [--rows N] [--features P] [--threads 1,2]
    .venv/bin/python benchmarks/train_bench.py --cohort WORK --patients 20000 [--ideal] [--seed 42] [--threads 1]
        [--kinds lightgbm,logistic,auto]   # the LightGBM, logistic-baseline and auto models side by side
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
from bench_common import children_cpu_seconds, write_result

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


def true_logit(X: np.ndarray) -> np.ndarray:
    """The logit `synthetic_matrix` drew the outcome from (the oracle of the synthetic benchmark)."""
    third = X.shape[1] // 3
    meas, counts = X[:, :third], X[:, third:third + third // 2]
    days = X[:, third + third // 2:2 * third]
    flags = X[:, 2 * third:]
    z = np.nan_to_num(meas[:, :8], nan=0.0)
    return (
        -3.2 + 0.6 * z[:, 0] + 0.5 * z[:, 1] + 0.4 * z[:, 2] ** 2 - 0.4 * z[:, 3]
        + 0.3 * z[:, 4] * z[:, 5] + 0.25 * np.tanh(2 * z[:, 6]) + 0.2 * z[:, 7]
        + 0.15 * counts[:, 0] + 0.8 * flags[:, 0] + 0.5 * flags[:, 1] - 0.3 * flags[:, 2]
        + 0.002 * np.nan_to_num(days[:, 0], nan=900.0) - 1.0 * np.isnan(meas[:, 0])
        + 0.3 * (counts[:, 1] > 3)
    )


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
                "task": "synthetic",
                "site": "all",
                "mode": None,
                "n": int(te.size),
                "auroc": round(float(metrics.auroc(y[te], p)), 4),
                "oracle_auroc": round(float(metrics.auroc(y[te], true_logit(X[te]))), 4),
                "calibration_slope": round(float(metrics.calibration_slope(y[te], p)), 3),
                "ece": round(float(metrics.ece(y[te], p)), 4),
                "num_threads": t,
                "load_average_1m": round(load, 2),
                "boost_seconds": round(boost_s, 2),
                "boost_cpu_seconds": round(boost_cpu, 2),
                "calibration_seconds": round(cal_s, 2),
                "trees": model.n_trees_,
                "trees_trained": model.n_trees_ + config.early_stopping_rounds,
                "ms_per_tree": round(1000 * boost_s / (model.n_trees_ + config.early_stopping_rounds), 2),
                "calibration": model.calibrator_.method,
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


def _chronorisk(work: Path, params: Path, *args: str) -> float:
    """Run one `chronorisk` command into `work`; its CPU seconds (user + system)."""
    import subprocess

    before = children_cpu_seconds()
    cmd = [sys.executable, "-m", "chronorisk.cli", "--params", str(params), "--work", str(work), *args]
    subprocess.run(cmd, check=True, cwd=REPO)
    return round(children_cpu_seconds() - before, 2)


def prepare_cohort(work: Path, params: Path, patients: int, seed: int, ideal: bool, tasks: list[str]) -> dict:
    """Generate the cohort and its feature tables into `work` unless they are there; CPU seconds of each step."""
    steps: dict = {}
    if not (work / "truth" / "generator.json").is_file():
        extra = ["--ideal"] if ideal else []
        steps["generate_cpu_seconds"] = _chronorisk(
            work, params, "generate", "--patients", str(patients), "--seed", str(seed), *extra)
    missing = [t for t in tasks if not (work / "features" / t / "spec.json").is_file()]
    for task in missing:
        steps[f"features_{task}_cpu_seconds"] = _chronorisk(work, params, "features", "--task", task)
    return steps


def cohort_task(work: Path, task: str, params, threads: int, n_boot: int,
                kind: str | None = None) -> tuple[list[dict], dict]:
    """Train one task as `chronorisk train` does; evaluation records (all, per site) of its held-out rows.

    `kind` (lightgbm, logistic, auto) replaces params.yaml's `model.kind`.
    """
    from chronorisk.training.evaluate_task import attach_truth, evaluation_frame, generator_mode, read_truth
    from chronorisk.training.evaluation import evaluate
    from chronorisk.training.train import HELD_OUT, load_feature_tables, train_task

    data = load_feature_tables(work / "features", task)
    model_config = params.model.model_copy(update={"lightgbm": {**params.model.lightgbm, "num_threads": threads},
                                                   "kind": kind or params.model.kind})
    load = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train_task(data, model_config, params.train)
    info = {
        "task": task,
        "configured_kind": model_config.kind,
        "model_kind": result.bundle.kind,
        "model_selection": result.bundle.metadata.get("model_selection"),
        "num_threads": threads,
        "load_average_1m": round(load, 2),
        "train_seconds": round(time.perf_counter() - started, 2),
        "train_cpu_seconds": round(time.process_time() - cpu_started, 2),
        "trees": result.bundle.metadata.get("n_trees"),
        "calibration": result.bundle.calibrator.method,
        **{k: result.training_info[k] for k in ("n_train", "n_valid", "n_train_positive", "n_valid_positive")},
    }
    rows = data.split(HELD_OUT)
    truth = read_truth(work / "truth", task)
    frame, note = attach_truth(evaluation_frame(rows, result.bundle.predict_risk(rows)), truth)
    if truth is not None and rows.height:
        matched = rows.join(truth, on=["subject_id", "prediction_time"], how="semi").height
        info["truth_coverage"] = round(matched / rows.height, 4)
    mode = generator_mode(work / "truth") if "true_risk" in frame.columns else None
    if note:
        info["note"] = note
    records = evaluate(frame, task=task, threshold=result.bundle.tiers.high, mode=mode, n_boot=n_boot,
                       seed=params.evaluate.seed, min_group_size=params.evaluate.min_group_size,
                       groups=("all", "site"))
    for r in records:
        r["configured_kind"], r["model_kind"] = model_config.kind, result.bundle.kind
    keep = ("task", "configured_kind", "model_kind", "site", "mode", "n", "n_positive", "auroc", "auroc_lo", "auroc_hi",
            "oracle_auroc",
            "auroc_ratio", "calibration_slope", "calibration_slope_lo", "calibration_slope_hi",
            "calibration_intercept", "ece", "ece_lo", "ece_hi", "brier", "oracle_calibration_slope")
    return [{k: r.get(k) for k in keep} for r in records], info


def run_cohort(args: argparse.Namespace) -> dict:
    from chronorisk.config import load_params

    params = load_params(args.params)
    tasks = list(params.labels.tasks)
    work = args.cohort.resolve()
    steps = prepare_cohort(work, args.params, args.patients, args.seed, args.ideal, tasks)
    records, runs = [], []
    for task in tasks:
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()] or [None]:
            recs, info = cohort_task(work, task, params, int(args.threads.split(",")[0]), args.bootstrap, kind)
            records += recs
            runs.append(info)
            print(json.dumps(info), file=sys.stderr)
    gen = json.loads((work / "truth" / "generator.json").read_text()).get("generator", {})
    return {"patients": gen.get("patients"), "seed": gen.get("seed"), "ideal": gen.get("ideal"),
            "preparation": steps, "runs": runs, "records": records}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 rows instead of 100,000")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--features", type=int, default=300)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts to time (--cohort: the first)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default results/train.json (train_quick.json; --cohort: train_cohort_<mode>_<patients>.json)")
    ap.add_argument("--cohort", type=Path, default=None, metavar="WORK",
                    help="a generated cohort's work folder (generated and featurized there when missing)")
    ap.add_argument("--patients", type=int, default=20_000, help="--cohort: patients to generate")
    ap.add_argument("--seed", type=int, default=42, help="--cohort: generator seed")
    ap.add_argument("--ideal", action="store_true", help="--cohort: generate with --ideal")
    ap.add_argument("--bootstrap", type=int, default=200, help="--cohort: bootstrap resamples of the intervals")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="--cohort: params.yaml")
    ap.add_argument("--kinds", default="", help="--cohort: model kinds to train, e.g. lightgbm,logistic,auto "
                    "(default: params.yaml model.kind)")
    args = ap.parse_args(argv)
    record = {
        "benchmark": "train_cohort" if args.cohort else "train",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    if args.cohort is not None:
        record.update(run_cohort(args))
        mode = "ideal" if record.get("ideal") else "realistic"
        out = args.out or RESULTS.with_name(f"train_cohort_{mode}_{record.get('patients')}.json")
    else:
        rows = args.rows or (20_000 if args.quick else 100_000)
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
        record.update(run(rows, args.features, threads))
        out = args.out or (RESULTS.with_name("train_quick.json") if args.quick else RESULTS)
    record["note"] = "shared 2-core machine; other work was running, so the timings are noisy upper bounds"
    write_result(out, record)
    print(json.dumps(record.get("records") or record["runs"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
