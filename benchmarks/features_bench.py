"""Feature pipeline benchmark: the nightly scoring case and a pandas baseline.

    python benchmarks/features_bench.py            # 1,000,000 generated patients
    python benchmarks/features_bench.py --quick    # 20,000 patients, a quick look
    python benchmarks/features_bench.py --realistic-codes --no-pandas \
        --out benchmarks/results/features_realistic_codes.json     # 1M messy patients (issue 11)
    python benchmarks/features_bench.py --source random --patients 100000 --codes 5000 --no-pandas \
        --target-seconds 60 --out benchmarks/results/features_100k_5000_codes.json

1. Data: `chronorisk generate --patients N` (the project's generator) into a
   scratch folder, reused if already there (`--source random` uses
   benchmarks/random_meds.py instead, with `--codes` distinct long-tail codes;
   `--realistic-codes` generates with the messy records of data/synth/messy.py:
   a 5,000-code tail, local lab codes, text values; the data-driven vocabulary
   then adds its features).
2. Fit: code summary of every site and `fit_spec` (timed on its own).
3. Transform (the target): every patient at one prediction time (the last
   1 January / 1 July on or before the data end), all sites, all feature
   families, in subject chunks, each chunk written to parquet as the CLI
   does. Wall and CPU time and peak memory (max RSS of the process that ran
   only this phase). Target: 1,000,000 patients in <= 120 s, <= 12 GiB
   (`--target-seconds`: 100,000 random patients with 5,000 codes in <= 60 s).
4. Pandas baseline: the numeric-window features of `measurements` (last,
   days since last, and per 90/365/1095-day window mean, min, max, std,
   count and least-squares slope per year) written as a straightforward
   pandas groupby (`pandas_straightforward`: agg, last(), apply(np.polyfit)),
   and, for honesty, as hand-vectorized pandas (`pandas_vectorized`), on the
   first `--pandas-patients` patients; our pipeline computes the same
   features (measurements family only) on the same events, the tables are
   compared value by value, and both time ratios are reported. Target:
   ours >= 10x faster than the straightforward version.

Each phase runs in its own subprocess so its peak memory is its own. The
machine is shared (2 cores; other jobs may be running): the JSON records the
load average before and after, so noisy figures can be recognised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "features.json"
TARGET_SECONDS, TARGET_GIB, TARGET_SPEEDUP = 120.0, 12.0, 10.0


# ---- helpers ----------------------------------------------------------------------------------
def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _shards(data: Path) -> list[Path]:
    return sorted((data / "meds" / "sites").glob("*/data/**/*.parquet"))


def _machine() -> dict:
    import psutil

    cpu_model = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu_model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "polars": __import__("polars").__version__,
        "pandas": __import__("pandas").__version__,
        "numpy": __import__("numpy").__version__,
    }


def _phase(name: str, args: argparse.Namespace, **extra) -> dict:
    """Run one phase in a fresh interpreter; it prints one JSON line."""
    cmd = [sys.executable, __file__, "--phase", name, "--data", str(args.data), "--patients", str(args.patients),
           "--pandas-patients", str(args.pandas_patients), "--chunk-subjects", str(args.chunk_subjects),
           "--workers", str(args.workers), "--codes", str(args.codes)]
    if args.realistic_codes:
        cmd.append("--realistic-codes")
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"phase {name} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- phases (each in its own process) --------------------------------------------------------
def phase_data(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.source == "random":
        sys.path.insert(0, str(REPO))
        from benchmarks.random_meds import write_random_meds

        write_random_meds(args.data / "meds" / "sites" / "random", args.patients, seed=7, shard_size=50_000,
                          n_codes=args.codes)
    else:
        cmd = [sys.executable, "-m", "chronorisk.cli", "--work", str(args.data), "generate",
               "--patients", str(args.patients), "--seed", "7"]
        if args.realistic_codes:
            cmd.append("--realistic-codes")
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    return {"seconds": round(time.perf_counter() - started, 1)}


def _prediction_time(shards: list[Path]):
    import polars as pl

    from chronorisk.features.tasks import grid_dates

    end = pl.scan_parquet(shards).select(pl.col("time").max()).collect().item()
    return max(t for t in grid_dates(end.year - 1, end.year) if t <= end)


def _index(shards: list[Path], limit: int | None = None):
    import polars as pl

    ids = pl.scan_parquet(shards).select(pl.col("subject_id").unique().sort()).collect()
    if limit is not None:
        ids = ids.head(limit)
    return ids.with_columns(pl.lit(_prediction_time(shards)).cast(pl.Datetime("us")).alias("prediction_time"))


def phase_fit(args: argparse.Namespace) -> dict:
    import polars as pl

    from chronorisk.features.pipeline import code_summary, fit_spec, merge_summaries

    shards = _shards(args.data)
    started, cpu = time.perf_counter(), _cpu_seconds()
    sites = sorted(p for p in (args.data / "meds" / "sites").iterdir() if (p / "data").is_dir())
    summaries = [code_summary(pl.scan_parquet(sorted((s / "data").glob("**/*.parquet")))) for s in sites]
    spec = fit_spec(merge_summaries(summaries))
    spec.save(args.data / "bench_spec.json")
    stats = pl.scan_parquet(shards).select(pl.len(), pl.col("subject_id").n_unique()).collect()
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(_cpu_seconds() - cpu, 2),
        "sites": len(sites),
        "features": spec.n_features,
        "vocabulary": len(spec.vocabulary),
        "events": int(stats[0, 0]),
        "patients": int(stats[0, 1]),
    }


def phase_transform(args: argparse.Namespace) -> dict:
    from chronorisk.features.pipeline import transform_shards
    from chronorisk.features.spec import FeatureSpec

    shards = _shards(args.data)
    spec = FeatureSpec.load(args.data / "bench_spec.json")
    index = _index(shards)
    out = Path(tempfile.mkdtemp(prefix="features-", dir=args.data))
    started, cpu = time.perf_counter(), _cpu_seconds()
    rows = 0
    for i, frame in enumerate(transform_shards(spec, shards, index, args.chunk_subjects, args.workers)):
        frame.write_parquet(out / f"part-{i:04d}.parquet")
        rows += frame.height
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(out)  # the tables were written to be timed, not kept
    return {
        "patients": index.height,
        "rows": rows,
        "features": spec.n_features,
        "prediction_time": index["prediction_time"][0].isoformat(),
        "chunk_subjects": args.chunk_subjects,
        "workers": args.workers,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu, 1),
        "user_seconds": round(usage.ru_utime, 1),
        "system_seconds": round(usage.ru_stime, 1),
        "patients_per_second": round(rows / wall),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
    }


def _subset_events(args: argparse.Namespace):
    import polars as pl

    shards = _shards(args.data)
    index = _index(shards, args.pandas_patients)
    events = pl.scan_parquet(shards).join(index.lazy().select("subject_id"), on="subject_id", how="semi").collect()
    return events, index


def phase_ours_numeric(args: argparse.Namespace) -> dict:
    from chronorisk.features.pipeline import transform
    from chronorisk.features.spec import FeatureSpec

    spec = FeatureSpec.load(args.data / "bench_spec.json")
    events, index = _subset_events(args)
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        table = transform(spec, events.lazy(), index.lazy(), families=["measurements"]).collect()
        best = min(best, time.perf_counter() - started)
    table.write_parquet(args.data / "bench_ours_numeric.parquet")
    return {"patients": index.height, "events": events.height, "seconds": round(best, 3),
            "features": table.width - 2}


def _pandas_window_input(events, index, measurements):
    """Measurement rows of the index subjects before their prediction time, with `days` before it."""
    code_to_name = {c: name for name, codes in measurements.items() for c in codes}
    ev = events[events["code"].isin(code_to_name)].copy()
    ev["name"] = ev["code"].map(code_to_name)
    ev = ev.merge(index, on="subject_id")
    ev = ev[(ev["time"] < ev["prediction_time"]) & ev["numeric_value"].notna()].copy()
    ev["days"] = (ev["prediction_time"] - ev["time"]).dt.total_seconds() / 86400.0
    ev["value"] = ev["numeric_value"].astype("float64")
    return ev


def _pandas_wide(out, index):
    wide = out.unstack("name")
    wide.columns = [f"meas_{name}_{stat}" for stat, name in wide.columns]
    wide = index.set_index(["subject_id", "prediction_time"]).join(wide).reset_index()
    counts = [c for c in wide.columns if "_count_" in c]
    wide[counts] = wide[counts].fillna(0.0)
    return wide


def pandas_straightforward(events, index, measurements, windows):
    """The baseline of the target: the features as a data scientist would first write them in pandas.

    groupby().agg for the standard statistics, sort + groupby().last() for the last value,
    and groupby().apply(np.polyfit) for the slope.
    """
    import numpy as np
    import pandas as pd

    ev = _pandas_window_input(events, index, measurements).sort_values("time")
    keys = ["subject_id", "prediction_time", "name"]
    g = ev.groupby(keys)
    out = pd.DataFrame({"last": g["value"].last(), "days_since_last": g["days"].min()})

    def slope(group):
        if len(group) < 2 or group["days"].nunique() < 2:
            return np.nan
        return np.polyfit(-group["days"] / 365.25, group["value"], 1)[0]

    for w in windows:
        win = ev[ev["days"] <= w]
        gw = win.groupby(keys)
        agg = gw["value"].agg(["mean", "min", "max", "std", "count"])
        agg["slope"] = gw[["days", "value"]].apply(slope)
        for stat in ("mean", "min", "max", "std", "count", "slope"):
            out[f"{stat}_{w}d"] = agg[stat]
    return _pandas_wide(out, index)


def pandas_vectorized(events, index, measurements, windows):
    """A faster pandas version (for honesty: the ratio against it is reported too).

    Same features; the slope from per-group sums instead of apply, `last` as the mean
    of the values at the latest time (our rule for same-time duplicates).
    """
    import numpy as np
    import pandas as pd

    ev = _pandas_window_input(events, index, measurements)
    keys = ["subject_id", "prediction_time", "name"]
    g = ev.groupby(keys)
    latest = ev[ev["days"] == g["days"].transform("min")]
    out = pd.DataFrame({"last": latest.groupby(keys)["value"].mean(), "days_since_last": g["days"].min()})
    for w in windows:
        win = ev[ev["days"] <= w].copy()
        win["x"] = -win["days"] / 365.25
        win["xx"] = win["x"] ** 2
        win["xv"] = win["x"] * win["value"]
        agg = win.groupby(keys).agg(
            mean=("value", "mean"), min=("value", "min"), max=("value", "max"), std=("value", "std"),
            count=("value", "count"), sv=("value", "sum"), sx=("x", "sum"), sxx=("xx", "sum"), sxv=("xv", "sum"),
        )
        n = agg["count"]
        den = n * agg["sxx"] - agg["sx"] ** 2
        agg["slope"] = np.where(den > 1e-8 * n * n, (n * agg["sxv"] - agg["sx"] * agg["sv"]) / den, np.nan)
        for stat in ("mean", "min", "max", "std", "count", "slope"):
            out[f"{stat}_{w}d"] = agg[stat]
    return _pandas_wide(out, index)


def phase_pandas(args: argparse.Namespace) -> dict:
    import polars as pl

    from chronorisk.features.spec import FeatureSpec

    spec = FeatureSpec.load(args.data / "bench_spec.json")
    events, index = _subset_events(args)
    ev_pd = events.to_pandas()
    idx_pd = index.to_pandas()
    measurements = {m.name: list(m.codes) for m in spec.measurements}
    ours = pl.read_parquet(args.data / "bench_ours_numeric.parquet")
    result = {"patients": index.height}
    for name, fn in (("straightforward", pandas_straightforward), ("vectorized", pandas_vectorized)):
        best = float("inf")
        for _ in range(1 if name == "straightforward" else args.repeats):  # the slow one runs once
            started = time.perf_counter()
            wide = fn(ev_pd, idx_pd, measurements, spec.windows_days)
            best = min(best, time.perf_counter() - started)
        result[name] = {"seconds": round(best, 3), **_compare(ours, pl.from_pandas(wide))}
    return result


def _compare(ours, theirs) -> dict:
    """How many numeric-window features agree (float32 tolerance), as a check that both compute the same."""
    import numpy as np
    import polars as pl

    key = ["subject_id", "prediction_time"]
    cols = [c for c in theirs.columns if c in ours.columns and c not in key]
    joined = ours.sort(key).select(key + cols).join(theirs.select(key + cols), on=key, suffix="_pd")
    mismatched = []
    for c in cols:
        a = joined[c].cast(pl.Float64).to_numpy()
        b = joined[f"{c}_pd"].cast(pl.Float64).to_numpy()
        if not np.allclose(a, b, rtol=1e-4, atol=1e-4, equal_nan=True):
            mismatched.append(c)
    return {"columns_compared": len(cols), "columns_mismatched": mismatched}


PHASES = {
    "data": phase_data, "fit": phase_fit, "transform": phase_transform,
    "ours_numeric": phase_ours_numeric, "pandas": phase_pandas,
}


# ---- driver -----------------------------------------------------------------------------------
def _pandas_comparison(args: argparse.Namespace) -> dict:
    ours = _phase("ours_numeric", args, repeats=args.repeats)
    theirs = _phase("pandas", args, repeats=args.repeats)
    comparison = {
        "what": "numeric-window features of the measurements family (13 measurements x "
                "(last, days since last, 3 windows x mean/min/max/std/count/slope)), same events",
        "patients": ours["patients"],
        "events": ours["events"],
        "ours_seconds": ours["seconds"],
        "pandas_straightforward": {
            "how": "groupby().agg, sort + groupby().last(), groupby().apply(np.polyfit) for the slope",
            "differences": "np.polyfit fits a slope even when a window's times lie within minutes of each "
                           "other; ours is null below a time variance of 1e-8 year^2, so a few slope cells "
                           "differ (null vs +-1e2..1e4 per year)",
            **theirs["straightforward"],
            "speedup": round(theirs["straightforward"]["seconds"] / ours["seconds"], 1),
        },
        "pandas_vectorized": {
            "how": "groupby().agg only: slope from per-group sums, last as mean at the latest time",
            **theirs["vectorized"],
            "speedup": round(theirs["vectorized"]["seconds"] / ours["seconds"], 1),
        },
        "speedup": round(theirs["straightforward"]["seconds"] / ours["seconds"], 1),
        "timing": f"best of {args.repeats} (the straightforward pandas version: one run)",
    }
    print(f"pandas comparison: {comparison}", flush=True)
    return comparison


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 patients, pandas on 1,000")
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--pandas-patients", type=int, default=None)
    parser.add_argument("--chunk-subjects", type=int, default=15_000)
    parser.add_argument("--workers", type=int, default=2, help="chunks computed at once (threads)")
    parser.add_argument("--repeats", type=int, default=None, help="pandas/ours numeric timing repeats (best of)")
    parser.add_argument("--source", choices=["generator", "random"], default="generator")
    parser.add_argument("--codes", type=int, default=3000, help="distinct long-tail codes of --source random")
    parser.add_argument("--realistic-codes", action="store_true", help="generate with --realistic-codes")
    parser.add_argument("--no-pandas", action="store_true", help="skip the pandas comparison")
    parser.add_argument("--target-seconds", type=float, default=TARGET_SECONDS)
    parser.add_argument("--data", type=Path, default=None, help="scratch folder (default /tmp/chronorisk-bench-...)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--phase", choices=sorted(PHASES), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.patients = args.patients or (20_000 if args.quick else 1_000_000)
    args.pandas_patients = args.pandas_patients or (1_000 if args.quick else 5_000)
    args.repeats = args.repeats or (1 if args.patients >= 1_000_000 else 2)
    kind = args.source + ("-messy" if args.realistic_codes else "") + (
        f"-{args.codes}codes" if args.source == "random" else "")
    args.data = args.data or Path(tempfile.gettempdir()) / f"chronorisk-bench-{kind}-{args.patients}"

    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return 0

    from chronorisk.environment import configure_environment

    args.data.mkdir(parents=True, exist_ok=True)
    configure_environment(args.data)
    load_before = os.getloadavg()
    result: dict = {
        "benchmark": "features",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/features_bench.py", *(argv or sys.argv[1:])]),
        "machine": _machine(),
        "source": args.source,
        "realistic_codes": args.realistic_codes,
        "long_tail_codes": args.codes if args.source == "random" else None,
    }
    if not _shards(args.data):
        print(f"generating {args.patients:,} patients into {args.data} ...", flush=True)
        result["data_seconds"] = _phase("data", args, source=args.source)["seconds"]
    result["fit"] = _phase("fit", args)
    print(f"fit: {result['fit']}", flush=True)
    result["transform"] = _phase("transform", args)
    print(f"transform: {result['transform']}", flush=True)
    t = result["transform"]
    met = {"transform_seconds": t["wall_seconds"] <= args.target_seconds,
           "peak_rss_gib": t["peak_rss_gib"] <= TARGET_GIB}
    if not args.no_pandas:
        result["pandas_comparison"] = _pandas_comparison(args)
        met["pandas_speedup"] = result["pandas_comparison"]["speedup"] >= TARGET_SPEEDUP
    result["targets"] = {
        "transform_seconds": args.target_seconds, "peak_rss_gib": TARGET_GIB, "pandas_speedup": TARGET_SPEEDUP,
        "applies": args.patients >= 1_000_000 or args.target_seconds != TARGET_SECONDS,
        "met": met,
    }
    result["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    out = args.out if not args.quick or args.out != RESULTS else RESULTS.with_name("features_quick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
