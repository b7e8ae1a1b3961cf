"""Generator throughput: patients/s, events/s and peak memory of `chronorisk generate`.

Each size runs the real command in a fresh process (`python -m chronorisk.cli generate`, default
params: realistic mode, 5 sites, 2 worker processes, chunks of 50,000) into a temporary work
folder that is deleted afterwards. Recorded per size: wall seconds, CPU seconds of the whole
process tree, patients/s and events/s (wall), the CPU split by phase (simulate, sort, write) as
the generator reports it, peak resident memory of the process tree (sum over the parent and its
workers, sampled every 0.2 s) and of the largest single process, bytes written, and the load
average when the run started (the machine is shared: wall time is noisy, CPU time much less).

    .venv/bin/python benchmarks/generate_bench.py [--quick] [--sizes 100000 1000000] [--work DIR]

Full sizes: 100,000 and 1,000,000 patients -> benchmarks/results/generate.json.
`--quick`: 20,000 patients -> benchmarks/results/generate_quick.json.
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
    args = parser.parse_args(argv)
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, target)
    print(f"wrote {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
