"""Generator throughput: patients/s, events/s and peak memory of `chronorisk generate`.

Each size runs the real command in a fresh process (`python -m chronorisk.cli generate`, default
params: realistic mode, 5 sites, 2 worker processes, chunks of 50,000) into a temporary work
folder that is deleted afterwards. Recorded per size: wall seconds, CPU seconds of the whole
process tree, patients/s and events/s (wall), the CPU split by phase (simulate, sort, write) as
the generator reports it, peak resident memory of the process tree (sum over the parent and its
workers, sampled every 0.2 s) and of the largest single process, bytes written, and the load
average when the run started (the machine is shared: wall time is noisy, CPU time much less).

    .venv/bin/python benchmarks/generate_bench.py [--quick] [--sizes 100000 1000000] [--work DIR]
    .venv/bin/python benchmarks/generate_bench.py --ideal-check [--quick]

Full sizes: 100,000 and 1,000,000 patients -> benchmarks/results/generate.json.
`--quick`: 20,000 patients -> benchmarks/results/generate_quick.json.
`--ideal-check`: is the ideal mode learnable? 20,000 ideal patients (5,000 with --quick); a plain
LightGBM on simple features (last value and value a year earlier of each measurement, age, sex,
smoking, days since each diagnosis, proportion of days covered per drug over a year) is trained on
80% of the subjects' labels and its held-out AUROC compared with the oracle (true risk) AUROC on
the same rows -> benchmarks/results/generate_ideal_check.json. (The real feature pipeline is in
`features/`; this only shows that what drives the risk is in the records.)
Up to 200,000 patients the cohort is also read back (`data/synth/checks.py`): missing share of the
scheduled values per site, and per task the recorded outcome rate, mean true risk and oracle AUROC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
from bench_common import write_result

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_once(patients: int, work: Path) -> dict:
    cmd = [sys.executable, "-m", "chronorisk.cli", "--work", str(work), "generate", "--patients", str(patients)]
    load = os.getloadavg()[0]
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak = max(peak, _tree_rss(ps))
            except psutil.Error:
                break
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"generate failed ({proc.returncode}): {err.strip()[-800:]}")
    total = re.search(r"total\s+([\d,]+) patients\s+([\d,]+) events", out)
    events = int(total.group(2).replace(",", ""))
    info = json.loads((work / "truth" / "generator.json").read_text())
    cpu = (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime)
    return {
        "patients": patients,
        "events": events,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "patients_per_second": round(patients / wall),
        "events_per_second": round(events / wall),
        "patients_per_cpu_second": round(patients / cpu),
        "cpu_seconds_by_phase": info.get("phase_cpu_seconds"),
        "peak_rss_tree_gib": round(peak / 2**30, 2),
        "peak_rss_single_process_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
        "output_gib": round(_disk_bytes(work) / 2**30, 2),
        "truth_rows": info.get("truth_rows"),
        "load_average_at_start": round(load, 2),
        "targets": {"wall_seconds_at_1M": 300, "peak_rss_gib": 8},
        "command": " ".join(["chronorisk", "generate", "--patients", str(patients)]),
        "stdout": out.strip().splitlines(),
    }


def quality(work: Path) -> dict:
    """Truth calibration, oracle AUROC and missingness of the generated cohort, read back from MEDS."""
    from sklearn.metrics import roc_auc_score

    from chronorisk.data.meds_io import site_ids
    from chronorisk.data.synth.checks import missing_share, realized_outcomes

    sites = site_ids(work / "meds")
    out: dict = {"missing_share_at_routine_visits": {s: round(missing_share(work / "meds", s), 3) for s in sites}}
    for task in ("onset_2y", "complication_1y"):
        df = realized_outcomes(work / "meds", work / "truth" / f"{task}.parquet", task, sites)
        y, p = df["outcome"].to_numpy(), df["true_risk"].to_numpy()
        out[task] = {"rows": df.height, "recorded_outcome_rate": round(float(y.mean()), 4),
                     "mean_true_risk": round(float(p.mean()), 4),
                     "oracle_auroc": round(float(roc_auc_score(y, p)), 4)}
    return out


MEASURE_CODES = ("LOINC//8480-6", "LOINC//8462-4", "LOINC//4548-4", "LOINC//2339-0", "LOINC//39156-5",
                 "LOINC//18262-6", "LOINC//2085-9", "LOINC//2093-3", "LOINC//33914-3", "LOINC//38483-4")
DRUG_CODES = ("RXNORM//860975", "RXNORM//106892", "RXNORM//259255", "RXNORM//316672", "RXNORM//314076",
              "RXNORM//197361", "RXNORM//316049", "RXNORM//866414")
DX_NAMES = ("hypertension", "diabetes", "chd", "mi", "stroke", "heart_failure", "ckd3", "obesity", "hyperlipidemia")


def simple_features(work: Path, task: str):
    """Truth rows with outcome and simple features computed from events before the prediction time."""
    import polars as pl

    from chronorisk.data.meds_io import scan_sites, site_ids
    from chronorisk.data.synth.checks import diagnosis_codes, realized_outcomes

    rows = realized_outcomes(work / "meds", work / "truth" / f"{task}.parquet", task, site_ids(work / "meds"))
    events = scan_sites(work / "meds").collect()
    feats = rows.sort("subject_id", "prediction_time")

    def asof(frame, values, on, name):
        values = values.sort("subject_id", on)
        return frame.join_asof(values.rename({on: "_t"}), left_on="prediction_time", right_on="_t",
                               by="subject_id", strategy="backward", allow_exact_matches=False,
                               check_sortedness=False).drop("_t")

    for code in MEASURE_CODES:
        x = events.filter(pl.col("code") == code).select("subject_id", "time", pl.col("numeric_value").alias(code))
        feats = asof(feats, x, "time", code)
        year_ago = x.select("subject_id", (pl.col("time") + pl.duration(days=365)).alias("time"),
                            pl.col(code).alias(code + "_1y"))
        feats = asof(feats, year_ago, "time", code + "_1y")
    smoker = events.filter(pl.col("code") == "LOINC//72166-2").select(
        "subject_id", "time", pl.col("text_value").is_in(["SNOMED//449868002", "SNOMED//77176002"])
        .cast(pl.Int8).alias("smoker"))
    feats = asof(feats, smoker, "time", "smoker")
    birth = events.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", pl.col("time").alias("birth"))
    female = events.filter(pl.col("code") == "GENDER//F").select("subject_id", pl.lit(1).alias("female"))
    feats = (feats.join(birth, on="subject_id").join(female, on="subject_id", how="left")
             .with_columns(((pl.col("prediction_time") - pl.col("birth")).dt.total_days() / 365.25).alias("age"),
                           pl.col("female").fill_null(0)).drop("birth"))
    for name in DX_NAMES:
        first = (events.filter(pl.col("code").is_in(diagnosis_codes([name])))
                 .group_by("subject_id").agg(pl.col("time").min().alias("dx")))
        feats = feats.join(first, on="subject_id", how="left").with_columns(
            pl.when(pl.col("dx") < pl.col("prediction_time"))
            .then((pl.col("prediction_time") - pl.col("dx")).dt.total_days()).alias(name + "_days")).drop("dx")
    keys = feats.select("subject_id", "prediction_time")
    for code in DRUG_CODES:
        supplied = (keys.join(events.filter(pl.col("code") == code).select("subject_id", "time", "numeric_value"),
                              on="subject_id")
                    .filter((pl.col("time") < pl.col("prediction_time"))
                            & (pl.col("time") >= pl.col("prediction_time") - pl.duration(days=365)))
                    .group_by("subject_id", "prediction_time").agg((pl.col("numeric_value").sum() / 365)
                                                                   .alias(code + "_pdc")))
        feats = feats.join(supplied, on=["subject_id", "prediction_time"], how="left")
    return feats


def ideal_check(patients: int, work: Path) -> dict:
    import lightgbm as lgb
    import numpy as np
    from sklearn.metrics import roc_auc_score

    cmd = [sys.executable, "-m", "chronorisk.cli", "--work", str(work), "generate", "--patients", str(patients),
           "--ideal"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    out: dict = {"patients": patients, "command": " ".join(["chronorisk", *cmd[5:]])}
    for task in ("onset_2y", "complication_1y"):
        feats = simple_features(work, task)
        x = feats.drop("subject_id", "prediction_time", "site", "outcome", "true_risk").to_pandas()
        y, oracle = feats["outcome"].to_numpy(), feats["true_risk"].to_numpy()
        test = (feats["subject_id"].to_numpy() % 5) == 0
        model = lgb.LGBMClassifier(n_estimators=400, learning_rate=0.03, num_leaves=31, min_child_samples=50,
                                   n_jobs=2, verbose=-1)
        model.fit(x[~test], y[~test])
        auroc = roc_auc_score(y[test], model.predict_proba(x[test])[:, 1])
        best = roc_auc_score(y[test], oracle[test])
        out[task] = {"train_rows": int((~test).sum()), "test_rows": int(test.sum()),
                     "test_positives": int(y[test].sum()), "features": x.shape[1],
                     "model_auroc": round(float(auroc), 4), "oracle_auroc": round(float(best), 4),
                     "ratio": round(float(auroc / best), 4),
                     "oracle_corr_of_model_fit_on_truth": round(float(np.corrcoef(
                         lgb.LGBMRegressor(n_estimators=400, learning_rate=0.03, min_child_samples=50, n_jobs=2,
                                           verbose=-1).fit(x[~test], oracle[~test]).predict(x[test]),
                         oracle[test])[0, 1]), 4)}
    return out


def machine() -> dict:
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "shared": "other sessions ran on the same 2 cores; see load_average_at_start",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 patients only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--ideal-check", action="store_true", help="is the ideal mode learnable? (see above)")
    args = parser.parse_args(argv)
    if args.ideal_check:
        return _run_ideal_check(args)
    sizes = args.sizes or ([20_000] if args.quick else [100_000, 1_000_000])
    base = args.work or Path(tempfile.mkdtemp(prefix="chronorisk-genbench-"))
    runs = []
    try:
        for n in sizes:
            work = base / f"n{n}"
            shutil.rmtree(work, ignore_errors=True)
            result = run_once(n, work)
            if n <= 200_000:
                result["quality"] = quality(work)
            print(f"{n:>9,} patients: {result['wall_seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU, "
                  f"{result['patients_per_second']:,} patients/s, {result['events_per_second']:,} events/s, "
                  f"peak {result['peak_rss_tree_gib']} GiB (tree)", flush=True)
            runs.append(result)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(base, ignore_errors=True)
    record = {"benchmark": "generate", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": machine(), "runs": runs,
              "invocation": "benchmarks/generate_bench.py" + (" --quick" if args.quick else "")}
    target = RESULTS / ("generate_quick.json" if args.quick else "generate.json")
    write_result(target, record)
    print(f"wrote {target.relative_to(REPO)}")
    return 0


def _run_ideal_check(args) -> int:
    base = args.work or Path(tempfile.mkdtemp(prefix="chronorisk-idealcheck-"))
    try:
        result = ideal_check(5_000 if args.quick else 20_000, base / "ideal")
    finally:
        if args.work is None:
            shutil.rmtree(base, ignore_errors=True)
    for task in ("onset_2y", "complication_1y"):
        r = result[task]
        print(f"{task}: model AUROC {r['model_auroc']} vs oracle {r['oracle_auroc']} (ratio {r['ratio']})")
    record = {"benchmark": "generate_ideal_check", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": machine(), **result,
              "invocation": "benchmarks/generate_bench.py --ideal-check" + (" --quick" if args.quick else "")}
    target = RESULTS / ("generate_ideal_check_quick.json" if args.quick else "generate_ideal_check.json")
    write_result(target, record)
    print(f"wrote {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
