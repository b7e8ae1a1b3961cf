"""Held-out calibration over replicate cohorts: how far one cohort's slope can move by chance.

The risk-model issue asks for a held-out calibration slope between 0.9 and
1.1 on the 20,000-patient demo cohort. Its held-out split has about 300
complication cases, and a slope estimated from 300 cases has a standard
error near 0.1: the whole width of that band. One cohort's figure therefore
says little on its own. This benchmark trains and evaluates exactly as
`train_bench.py --cohort` does (`chronorisk generate`, `chronorisk features`,
then `training.train.train_task` with params.yaml) on several independent
cohorts, the demo seed among them. For each task it puts the model's held-out
slope beside the slope of the generator's true risk on the same rows.

The true risk is the best any model could do. Where it falls outside the band,
the held-out sample is what moved the figure. The model's slope minus the
oracle's slope on the same rows is the model's own share of the deviation.

Records (`calibration.json`; `calibration_quick.json` with --quick) carry the
evaluation keys (`task`, `site`, `n`, `auroc`, `oracle_auroc`, `mode`,
`calibration_slope`, `ece`) plus `seed`; `summary` has per task the mean and
spread of the model's slope, of the oracle's slope and of their difference,
and how many cohorts each puts inside 0.9-1.1.

    .venv/bin/python benchmarks/calibration_bench.py [--seeds 1,2,3,4,5,6,7,8,42] [--patients 20000]
    .venv/bin/python benchmarks/calibration_bench.py --quick     # 3 cohorts of 5,000 patients

A variant of the defaults is run with `--set KEY=VALUE` (a params.yaml key, dotted; the value
is read as YAML) and `--name` (written to `calibration_<name>.json`), e.g. the settings tried
against the defaults on the development cohorts 1-8, complication_1y only:

    .venv/bin/python benchmarks/calibration_bench.py --seeds 1,2,3,4,5,6,7,8 --task complication_1y \\
        --name lr002 --set model.lightgbm.learning_rate=0.02
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import write_result  # noqa: E402 (a sibling script's module)
from train_bench import cohort_task, machine, prepare_cohort  # noqa: E402

RESULTS = HERE / "results" / "calibration.json"
BAND = (0.9, 1.1)


def params_with(path: Path, settings: list[str], scratch: Path) -> Path:
    """`path`, or a copy of it under `scratch` with each dotted `KEY=VALUE` (VALUE read as YAML) set."""
    import yaml

    if not settings:
        return path
    raw = yaml.safe_load(path.read_text()) or {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {setting!r}: expected KEY=VALUE, e.g. model.lightgbm.learning_rate=0.02")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    out = scratch / "params.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def replicate_records(
    work: Path, params_path: Path, seed: int, patients: int, n_boot: int, tasks: list[str] | None = None,
) -> list[dict]:
    """One cohort: generate, featurize, train each task; its held-out records over all sites, with `seed`."""
    from chronorisk.config import load_params

    params = load_params(params_path)
    tasks = tasks or list(params.labels.tasks)
    prepare_cohort(work, params_path, patients, seed, False, tasks)
    records = []
    for task in tasks:
        recs, info = cohort_task(work, task, params, 2, n_boot)
        overall = next(r for r in recs if r["site"] == "all")
        records.append({**overall, "seed": seed, "calibration": info["calibration"], "trees": info["trees"]})
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    return records


def in_band(values: np.ndarray) -> int:
    return int(((values >= BAND[0]) & (values <= BAND[1])).sum())


def summary(records: list[dict]) -> dict:
    """Per task: spread of the model's and the oracle's held-out slopes over the cohorts."""
    out = {}
    for task in sorted({r["task"] for r in records}):
        rows = [r for r in records if r["task"] == task]
        model = np.array([r["calibration_slope"] for r in rows], dtype=float)
        oracle = np.array([r["oracle_calibration_slope"] for r in rows], dtype=float)
        ece = np.array([r["ece"] for r in rows], dtype=float)
        out[task] = {
            "cohorts": len(rows),
            "mean_positives": float(np.mean([r["n_positive"] for r in rows])),
            "model_slope_mean": float(model.mean()),
            "model_slope_sd": float(model.std(ddof=1)) if len(rows) > 1 else None,
            "oracle_slope_mean": float(oracle.mean()),
            "oracle_slope_sd": float(oracle.std(ddof=1)) if len(rows) > 1 else None,
            "model_minus_oracle_mean": float((model - oracle).mean()),
            "model_minus_oracle_sd": float((model - oracle).std(ddof=1)) if len(rows) > 1 else None,
            "model_minus_oracle_abs_mean": float(np.abs(model - oracle).mean()),
            "brier_mean": float(np.mean([r["brier"] for r in rows])),
            "auroc_mean": float(np.mean([r["auroc"] for r in rows])),
            "model_in_band": in_band(model),
            "oracle_in_band": in_band(oracle),
            "ece_max": float(ece.max()),
            "auroc_ratio_mean": float(np.mean([r["auroc_ratio"] for r in rows])),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 cohorts of 5,000 patients")
    ap.add_argument("--seeds", default=None, help="comma-separated generator seeds (default 1..8 and 42)")
    ap.add_argument("--patients", type=int, default=None, help="patients per cohort (default 20,000)")
    ap.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples of each interval")
    ap.add_argument("--work", type=Path, default=None, help="folder of the cohorts (default: a temporary folder)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--task", action="append", default=None, help="only this task (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml setting to vary")
    ap.add_argument("--name", default=None, help="variant name: results in calibration_<name>.json")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in (args.seeds or ("1,2,42" if args.quick else "1,2,3,4,5,6,7,8,42")).split(",")]
    patients = args.patients or (5_000 if args.quick else 20_000)
    record = {
        "benchmark": "calibration_replicates",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "patients": patients,
        "seeds": seeds,
        "band": list(BAND),
        "settings": args.set,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chronorisk-calibration-") as scratch:
        root = args.work or Path(scratch)
        params_path = params_with(args.params.resolve(), args.set, Path(scratch))
        records = []
        for seed in seeds:
            records += replicate_records(root / f"seed{seed}", params_path, seed, patients, args.bootstrap, args.task)
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    record["records"] = records
    record["summary"] = summary(records)
    stem = "_".join(["calibration", *([args.name] if args.name else []), *(["quick"] if args.quick else [])])
    write_result(args.out or RESULTS.with_name(f"{stem}.json"), record)
    print(json.dumps(record["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
