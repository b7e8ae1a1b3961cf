"""A new region joins late: how the global model does there before labels, and with the first local cases.

Set-up: `chronorisk generate --new-site` (the founding five sites plus
`chc_newregion`, unlike them in population, code system, units and care
pattern, data/synth/new_site.py) and `chronorisk features --task T` into
WORK, unless they are there. The global model is trained as `chronorisk
train` does (`training.train.train_task`, params.yaml) on the founding sites
only: the new site joins at `new_site.JOINS`, after it (saved in WORK and reused by later runs).

Reported for the new site (its rows from the join date on, which the global
model never saw):

1. `before_labels`: the global model's realized AUROC, calibration slope,
   ECE and observed / expected rate there (what the service cannot know yet);
2. `label_free`: per window (one prediction time, >= 500 rows) the AUROC
   estimated from the calibrated risks without labels
   (serving/monitoring/estimate.py) beside the realized one, at the
   founding sites (held-out rows) and at the new site, before and after its
   recalibration;
3. `recalibrated`: after the first 25, 50 and 100 local cases (positive
   outcomes, with the non-cases seen alongside them, from the first
   prediction time after joining; `--repeats` random orders of those rows),
   the site recalibration (models/site_calibration.py) fitted on them and
   judged on the site's other patients: slope, ECE, AUROC;
4. `federated`: the site joins federated training (simulation, every site
   with all its data): its held-out figures with the federated calibration,
   and with its own site recalibration from its tuning bins.

Targets (issue 15): label-free AUROC within 0.03 of realized for windows of
>= 500 rows; new site slope 0.9-1.1 and ECE <= 0.02 after 100 local cases.

    .venv/bin/python benchmarks/new_region_bench.py --work WORK [--patients 30000] [--task onset_2y] [--quick]
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
import polars as pl
from bench_common import children_cpu_seconds, public_argv, write_result

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CASES = (25, 50, 100)
MIN_WINDOW_ROWS = 500


def _chronorisk(work: Path, params: Path, *args: str) -> float:
    import subprocess

    before = children_cpu_seconds()
    cmd = [sys.executable, "-m", "chronorisk.cli", "--params", str(params), "--work", str(work), *args]
    subprocess.run(cmd, check=True, cwd=REPO)
    return round(children_cpu_seconds() - before, 2)


def prepare(work: Path, params: Path, patients: int, seed: int, task: str) -> dict:
    steps = {}
    if not (work / "truth" / "generator.json").is_file():
        steps["generate_cpu_seconds"] = _chronorisk(work, params, "generate", "--new-site", "--patients",
                                                    str(patients), "--seed", str(seed))
    if not (work / "features" / task / "spec.json").is_file():
        steps["features_cpu_seconds"] = _chronorisk(work, params, "features", "--task", task)
    return steps


def figures(y: np.ndarray, risk: np.ndarray) -> dict:
    """Realized AUROC, calibration slope and intercept, ECE, observed / expected rate (training.metrics)."""
    from chronorisk.training import metrics as tm

    return {"n": int(y.size), "cases": int(y.sum()), "auroc": round(float(tm.auroc(y, risk)), 4),
            "calibration_slope": round(float(tm.calibration_slope(y, risk)), 3),
            "calibration_intercept": round(float(tm.calibration_intercept(y, risk)), 3),
            "ece": round(float(tm.ece(y, risk)), 4), "observed_over_expected": round(float(y.mean() / risk.mean()), 3)}


def label_free_windows(rows: pl.DataFrame, risk: np.ndarray, seed: int) -> list[dict]:
    """Per prediction time of >= MIN_WINDOW_ROWS rows: the estimate from the risks and the realized AUROC."""
    from chronorisk.serving.monitoring.estimate import estimate_performance
    from chronorisk.training import metrics as tm

    frame = rows.select("prediction_time", "boolean_value").with_columns(pl.Series("risk", risk))
    out = []
    for (when,), part in frame.sort("prediction_time").group_by("prediction_time", maintain_order=True):
        if part.height < MIN_WINDOW_ROWS:
            continue
        y = part["boolean_value"].cast(pl.Float64).to_numpy()
        r = part["risk"].to_numpy()
        est = estimate_performance(r, {}, draws=200, seed=seed)
        realized = float(tm.auroc(y, r))
        out.append({"window": str(when)[:10], "n": part.height, "estimated_auroc": est.auroc,
                    "estimated_auroc_sd": est.auroc_spread.sd, "realized_auroc": round(realized, 4),
                    "error": round(est.auroc - realized, 4)})
    return out


def _summary(windows: list[dict]) -> dict:
    errors = np.abs([w["error"] for w in windows]) if windows else np.zeros(0)
    return {"windows": len(windows), "max_abs_error": round(float(errors.max()), 4) if errors.size else None,
            "mean_abs_error": round(float(errors.mean()), 4) if errors.size else None,
            "within_0_03": int((errors <= 0.03).sum()), "detail": windows}


def local_cases(rows: pl.DataFrame, risk: np.ndarray, cases: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(local rows, evaluation rows) masks: the first prediction times' rows in a random order until `cases`
    cases; the evaluation rows are the later rows of the site's other patients."""
    rng = np.random.default_rng(seed)
    times = rows["prediction_time"].to_numpy()
    y = rows["boolean_value"].cast(pl.Float64).to_numpy()
    order = np.lexsort((rng.random(rows.height), times))  # earliest prediction time first, shuffled within
    seen = np.cumsum(y[order])
    k = int(np.searchsorted(seen, cases)) + 1
    if k >= rows.height:
        raise SystemExit(f"the new site has {int(y.sum())} cases after joining: fewer than {cases} (more patients)")
    local = np.zeros(rows.height, dtype=bool)
    local[order[:k]] = True
    subjects = set(rows["subject_id"].filter(pl.Series(local)).to_list())
    later = times > times[order[k - 1]]
    evaluate = later & ~rows["subject_id"].is_in(list(subjects)).to_numpy()
    return local, evaluate


def recalibration_after(rows: pl.DataFrame, risk: np.ndarray, repeats: int) -> list[dict]:
    from chronorisk.models.site_calibration import fit_site_recalibration
    from chronorisk.serving.monitoring.estimate import expected_auroc
    from chronorisk.training import metrics as tm

    y = rows["boolean_value"].cast(pl.Float64).to_numpy()
    out = []
    for cases in CASES:
        runs = []
        for r in range(repeats):
            local, evaluate = local_cases(rows, risk, cases, seed=1000 * cases + r)
            recal = fit_site_recalibration("new", risk[local], y[local])
            after = recal.apply(risk[evaluate])
            runs.append({"local_rows": int(local.sum()), "eval_rows": int(evaluate.sum()),
                         "intercept": round(recal.intercept, 3), "slope": round(recal.slope, 3),
                         "before": figures(y[evaluate], risk[evaluate]), "after": figures(y[evaluate], after),
                         "estimated_auroc_after": round(expected_auroc(after), 4),
                         "realized_auroc": round(float(tm.auroc(y[evaluate], after)), 4)})
        slopes = [x["after"]["calibration_slope"] for x in runs]
        eces = [x["after"]["ece"] for x in runs]
        out.append({"local_cases": cases, "repeats": repeats,
                    "calibration_slope_mean": round(float(np.mean(slopes)), 3),
                    "calibration_slope_range": [min(slopes), max(slopes)],
                    "ece_mean": round(float(np.mean(eces)), 4), "ece_range": [min(eces), max(eces)],
                    "estimated_minus_realized_auroc_mean": round(float(np.mean(
                        [x["estimated_auroc_after"] - x["realized_auroc"] for x in runs])), 4),
                    "runs": runs})
    return out


def federated_join(work: Path, params, task: str, site: str) -> dict:
    """Every site, the new one included, in federated training (simulation): the new site's held-out figures."""
    from chronorisk.federated.pipeline import train_federated
    from chronorisk.federated.simulation import LocalTransport, site_contexts

    started = time.perf_counter()
    transport = LocalTransport(site_contexts(work / "meds", work / "federated" / "nodes",
                                             threads=params.federated.site_threads))
    result = train_federated(transport, params, tasks=[task]).tasks[task]
    keep = ("n", "positives", "auroc", "calibration_slope", "calibration_intercept", "ece")
    return {"wall_seconds": round(time.perf_counter() - started, 1),
            "calibration": result.calibration_info.get("method"),
            "new_site": {k: result.site_metrics.get(site, {}).get(k) for k in keep},
            "new_site_recalibrated": {k: result.site_metrics_recalibrated.get(site, {}).get(k) for k in keep},
            "new_site_recalibration": result.site_layer.sites[site].to_dict() if site in result.site_layer.sites
            else None,
            "founding_sites": {s: {k: m.get(k) for k in ("auroc", "calibration_slope", "ece")}
                               for s, m in result.site_metrics.items() if s != site}}


def run(args: argparse.Namespace) -> dict:
    from chronorisk.config import load_params
    from chronorisk.data.synth.new_site import JOINS, NEW_SITE_ID
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.training.train import HELD_OUT, load_feature_tables, train_task

    params = load_params(args.params)
    work = args.work.resolve()
    steps = prepare(work, args.params, args.patients, args.seed, args.task)
    data = load_feature_tables(work / "features", args.task)
    site = pl.col("site") == NEW_SITE_ID
    founding = data.frame.filter(~site)
    joined = data.frame.filter(site & (pl.col("prediction_time") >= datetime.combine(JOINS, datetime.min.time())))
    started = time.perf_counter()
    cached = work / "new_region_global_model" / args.task
    if (cached / "bundle.json").is_file():  # the founding sites' model of an earlier run on this cohort
        bundle, train_seconds = ModelBundle.load(cached), None
    else:
        model_config = params.model.model_copy(update={"lightgbm": {**params.model.lightgbm,
                                                                   "num_threads": args.threads}})
        bundle = train_task(type(data)(data.task, data.spec, founding, data.source), model_config,
                            params.train).bundle
        bundle.save(cached)
        train_seconds = round(time.perf_counter() - started, 1)
    held = founding.filter(pl.col("split") == HELD_OUT)
    held_risk = bundle.predict_risk(held)
    new_risk = bundle.predict_risk(joined.drop("site"))  # the global calibration: no site layer yet
    y_new = joined["boolean_value"].cast(pl.Float64).to_numpy()
    record = {
        "task": args.task, "new_site": NEW_SITE_ID, "joins": str(JOINS), "train_seconds": train_seconds,
        "preparation": steps, "rows": {"founding_held_out": held.height, "new_site_after_joining": joined.height},
        "founding_held_out": figures(held["boolean_value"].cast(pl.Float64).to_numpy(), held_risk),
        "before_labels": figures(y_new, new_risk),
        "label_free": {"founding_sites": _summary(label_free_windows(held, held_risk, args.seed)),
                       "new_site_global_calibration": _summary(label_free_windows(joined, new_risk, args.seed))},
        "recalibrated": recalibration_after(joined, new_risk, args.repeats),
    }
    best = record["recalibrated"][-1]
    local, evaluate = local_cases(joined, new_risk, CASES[-1], seed=1000 * CASES[-1])
    from chronorisk.models.site_calibration import fit_site_recalibration

    recal = fit_site_recalibration(NEW_SITE_ID, new_risk[local], y_new[local])
    record["label_free"]["new_site_after_100_cases"] = _summary(label_free_windows(
        joined.filter(pl.Series(evaluate)), recal.apply(new_risk[evaluate]), args.seed))
    if not args.skip_federated:
        record["federated"] = federated_join(work, params, args.task, NEW_SITE_ID)
    record["targets"] = {
        "label_free_within_0_03_founding": record["label_free"]["founding_sites"]["max_abs_error"] is not None
        and record["label_free"]["founding_sites"]["max_abs_error"] <= 0.03,
        "slope_0_9_to_1_1_after_100_cases": 0.9 <= best["calibration_slope_mean"] <= 1.1,
        "ece_at_most_0_02_after_100_cases": best["ece_mean"] <= 0.02,
    }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--patients", type=int, default=30000)
    parser.add_argument("--quick", action="store_true", help="12,000 patients, 2 repeats, no federated run")
    parser.add_argument("--task", default="onset_2y")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-federated", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.patients, args.repeats, args.skip_federated = 12000, 2, True
    started = time.perf_counter()
    record = {"benchmark": "new_region", "mode": "quick" if args.quick else "full",
              "command": " ".join(["benchmarks/new_region_bench.py", *public_argv(sys.argv[1:])]),
              "when": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_start": round(os.getloadavg()[0], 2)},
              "patients": args.patients, **run(args)}
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: record[k] for k in ("before_labels", "targets")}, indent=1))
    if not args.no_save:
        write_result(RESULTS / f"new_region{'_quick' if args.quick else ''}.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
