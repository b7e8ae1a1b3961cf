"""A new region joins late: how the global model does there before labels, and with the first local cases.

Set-up: `chronorisk generate --new-site` (the founding five sites plus
`chc_newregion`, unlike them in population, code system, units and care
pattern, data/synth/new_site.py) and `chronorisk features --task T` into
WORK, unless they are there. The global model is trained as `chronorisk
train` does (`training.train.train_task`, params.yaml) on the founding sites
only: the new site joins at `new_site.JOINS`, after it (saved in WORK and reused by later runs).

Reported (the new site's part by `training.new_site_evaluation.evaluate_new_site`, the code behind
`chronorisk evaluate --new-site`; see its docstring for each figure):

1. `founding_held_out` and `label_free.founding_sites`: the founding sites' held-out rows, realized
   figures and per-window label-free AUROC estimates beside the realized ones;
2. `new_site`: the new site's rows from the join date on, which the global model never saw: figures
   before local labels (and per prediction time), label-free estimates per window from the global
   calibration, the site recalibration after 25, 50 and 100 local cases (`--repeats` random orders)
   judged on the site's other patients at later times (with the ECE a calibrated model would show on
   as many rows), and the label-free estimates from the risks as served after the site layer, with
   the recalibration's own uncertainty;
3. `federated`: the site joins federated training (simulation, every site with all its data): its
   held-out figures with the federated calibration, and with its own site recalibration from its
   tuning bins.

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
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from bench_common import children_cpu_seconds, public_argv, write_result

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


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


def update_rules(joined: pl.DataFrame, risk, repeats: int, seed: int) -> dict:
    """The site's ECE, slope and O/E after 25 / 50 / 100 cases under each update rule of
    models/site_calibration.py (same local orders; few refits: only the figures, not the estimate's spread)."""
    from chronorisk.models.site_calibration import UPDATES
    from chronorisk.training.new_site_evaluation import CASES, recalibration_runs

    times = joined["prediction_time"].to_numpy()
    y = joined["boolean_value"].cast(pl.Float64).to_numpy()
    subjects = joined["subject_id"].to_numpy()
    out = {}
    for rule in UPDATES:
        out[rule] = {}
        for cases in CASES:
            r = recalibration_runs(times, y, subjects, risk, site="new", cases=cases, repeats=repeats, seed=seed,
                                   update=rule, resamples=2)
            if r is not None:
                out[rule][str(cases)] = {"ece_mean": r.ece_mean, "ece_noise_floor_mean": r.ece_noise_floor_mean,
                                         "calibration_slope_mean": r.calibration_slope_mean,
                                         "calibration_slope_range": r.calibration_slope_range,
                                         "observed_over_expected_mean": r.observed_over_expected_mean,
                                         "updates": r.updates}
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
    from chronorisk.training.new_site_evaluation import CASES, SiteFigures, evaluate_new_site, label_free_windows
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
    held_y = held["boolean_value"].cast(pl.Float64).to_numpy()
    new_risk = bundle.predict_risk(joined.drop("site"))  # the global calibration: no site layer yet
    cpu = time.process_time()
    new_site = evaluate_new_site(joined, new_risk, site=NEW_SITE_ID, since=str(JOINS), cases=CASES,
                                 repeats=args.repeats, seed=args.seed)
    record = {
        "task": args.task, "site": NEW_SITE_ID, "joins": str(JOINS), "train_seconds": train_seconds,
        "preparation": steps, "rows": {"founding_held_out": held.height, "new_site_after_joining": joined.height},
        "founding_held_out": asdict(SiteFigures.of(held_y, held_risk)),
        "label_free_founding_sites": asdict(label_free_windows(held["prediction_time"].to_numpy(), held_y, held_risk,
                                                               seed=args.seed)),
        "new_site": new_site.to_dict(),
        "new_site_cpu_seconds": round(time.process_time() - cpu, 1),
        "global_model": "trained in this run" if train_seconds is not None
        else "trained by an earlier run on this WORK (same cohort), loaded",
        "update_rules": update_rules(joined, new_risk, args.repeats, args.seed),
    }
    if not args.skip_federated:
        record["federated"] = federated_join(work, params, args.task, NEW_SITE_ID)
    best = new_site.recalibrated[-1] if new_site.recalibrated else None
    founding_error = record["label_free_founding_sites"]["max_abs_error"]
    def all_within(summary) -> bool:  # every window within 0.03 (and at least one window)
        return summary is not None and summary.windows > 0 and summary.within_0_03 == summary.windows

    record["targets"] = {
        "label_free_within_0_03_founding": founding_error is not None and founding_error <= 0.03,
        "label_free_within_0_03_new_site_global": all_within(new_site.label_free_global),
        "label_free_within_0_03_new_site_recalibrated": all_within(new_site.label_free_recalibrated),
        "slope_0_9_to_1_1_after_100_cases": best is not None and best.local_cases == CASES[-1]
        and 0.9 <= best.calibration_slope_mean <= 1.1,
        "ece_at_most_0_02_after_100_cases": best is not None and best.local_cases == CASES[-1]
        and best.ece_mean <= 0.02,
    }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--patients", type=int, default=30000)
    parser.add_argument("--quick", action="store_true", help="12,000 patients, 5 repeats, no federated run")
    parser.add_argument("--task", default="onset_2y")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-federated", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.patients, args.repeats, args.skip_federated = 12000, 5, True
    started = time.perf_counter()
    record = {"benchmark": "new_region", "mode": "quick" if args.quick else "full",
              "command": " ".join(["benchmarks/new_region_bench.py", *public_argv(sys.argv[1:])]),
              "when": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_start": round(os.getloadavg()[0], 2)},
              "patients": args.patients, **run(args)}
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({"before_labels": record["new_site"]["before_labels"], "targets": record["targets"]}, indent=1))
    if not args.no_save:
        seed = "" if args.seed == 42 else f"_seed{args.seed}"  # another cohort: a file of its own
        write_result(RESULTS / f"new_region{'_quick' if args.quick else ''}{seed}.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
