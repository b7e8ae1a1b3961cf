"""Federated training on Flower's deployment engine: wall time per round, local work vs Flower overhead.

Generates the 5-site demo cohort (20,000 patients; 2,000 with --quick), runs
`chronorisk federated up` (SuperLink + 5 SuperNodes, TLS, SuperNode
authentication), then `chronorisk federated run` twice, both tasks each time:

- `cold`: the SuperNodes build their feature tables inside the first train
  round (nothing cached yet);
- `warm`: the same training again; the feature tables come from each
  SuperNode's cache (keyed by spec content, prediction times and data version).

Per exchange (summary, train rounds, evaluate) it records the wall time, the
critical path of local work (the slowest site's handler time), the rest
(Flower overhead: message delivery, the SuperNode's 3 s idle poll, a fresh
`flwr-clientapp` process per message, aggregation), the ClientApp process
start-up seconds, the CPU seconds of the site handlers and of the ClientApp
processes before their handlers ran, and the payload bytes sent to and from
the sites; per run, the CPU seconds of every federation process (SuperLink with
the ServerApp, SuperNodes with every ClientApp process), which unlike wall
time do not move with what else runs on the machine. Then
`chronorisk federated down`. Last, `chronorisk federated sim` on the same data
checks that simulation reproduces the deployed training (same trees, same figures) when every
site answered every round.

Timings on a shared 2-core machine are noisy: the load average at start and
end is recorded with every run.

    .venv/bin/python benchmarks/federated_bench.py [--quick] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from bench_common import children_cpu_seconds, public_argv

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "federated.json"


def _cli(work: Path, params: Path, *args: str, timeout: float = 3600) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "chronorisk.cli", "--work", str(work), "--params", str(params), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return wall, proc


def _rounds(result: dict) -> list[dict]:
    out = []
    for r in result["rounds"]:
        cpu = r.get("site_cpu_seconds", {})
        startup_cpu = r.get("site_startup_cpu_seconds", {})
        out.append({
            "phase": r["phase"],
            "round": r["round"],
            "sites": len(r["sites"]),
            "wall_s": r["wall_s"],
            "local_s": r["local_s"],
            "flower_overhead_s": r["overhead_s"],
            "clientapp_startup_s_max": max(r["site_startup_seconds"].values(), default=0.0),
            "local_cpu_s_sum": round(sum(cpu.values()), 3),
            "local_cpu_s_max": round(max(cpu.values(), default=0.0), 3),
            "clientapp_startup_cpu_s_sum": round(sum(startup_cpu.values()), 3),
            "bytes_to_sites": r["bytes_out"],
            "bytes_from_sites": r["bytes_in"],
        })
    return out


def _federation_cpu(work: Path) -> float:
    """CPU seconds (user + system) used so far by the SuperLink, the supervisor and everything under them.

    Reaped children (every per-message ClientApp process) count in their
    parent's children times, so the difference of two readings is the CPU the
    federation spent in between, whatever else ran on the machine.
    """
    import psutil

    state = json.loads((work / "federated" / "state.json").read_text())
    roots = [state.get("superlink", {}).get("pid"), state.get("supervisor", {}).get("pid")]
    total = 0.0
    for pid in filter(None, roots):
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _run(work: Path, params: Path, label: str) -> dict:
    load_start = os.getloadavg()
    fed_cpu, cli_cpu = _federation_cpu(work), children_cpu_seconds()
    wall, _ = _cli(work, params, "federated", "run", "--timeout", "3000")
    fed_cpu, cli_cpu = _federation_cpu(work) - fed_cpu, children_cpu_seconds() - cli_cpu
    runs = sorted((work / "federated" / "runs").glob("*/result.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(runs[-1].read_text())
    rounds = _rounds(result)
    local = sum(r["local_s"] for r in rounds)
    overhead = sum(r["flower_overhead_s"] for r in rounds)
    return {
        "label": label,
        "wall_s": round(wall, 2),
        "server_loop_s": result["wall_s"],
        "exchanges": len(rounds),
        "local_s_total": round(local, 2),
        "flower_overhead_s_total": round(overhead, 2),
        "cpu_s": {
            "federation": round(fed_cpu, 2),
            "run_command": round(cli_cpu, 2),
            "site_handlers": round(sum(r["local_cpu_s_sum"] for r in rounds), 2),
            "clientapp_startup": round(sum(r["clientapp_startup_cpu_s_sum"] for r in rounds), 2),
            "note": "federation = SuperLink (with the ServerApp) + SuperNodes (with every ClientApp process); "
                    "run_command = `chronorisk federated run` and `flwr run`; site_handlers and "
                    "clientapp_startup are parts of federation",
        },
        "bytes_to_sites_total": sum(r["bytes_to_sites"] for r in rounds),
        "bytes_from_sites_total": sum(r["bytes_from_sites"] for r in rounds),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "rounds": rounds,
        "tasks": {
            task: {
                "num_trees": info["num_trees"],
                "early_stopping": info["early_stopping"],
                "held_out_auroc": info["overall"].get("auroc"),
                "calibration_slope": info["overall"].get("calibration_slope"),
            }
            for task, info in result["tasks"].items()
        },
        "events": result["events"],
    }


def _same_as_simulation(work: Path, params: Path, deployed: dict) -> dict:
    """`federated sim` on the same data and caches: the same trees and figures when every site answered."""
    start = time.monotonic()
    _cli(work, params, "federated", "sim", "--no-register")
    sims = sorted((work / "federated" / "runs").glob("sim-*/result.json"), key=lambda p: p.stat().st_mtime)
    sim = json.loads(sims[-1].read_text())
    out: dict = {"simulation_wall_s": round(time.monotonic() - start, 2),
                 "all_sites_in_every_deployed_round": all(r["sites"] == 5 for r in deployed["rounds"])}
    for task, info in deployed["tasks"].items():
        s_info = sim["tasks"][task]
        out[task] = {
            "num_trees": [info["num_trees"], s_info["num_trees"]],
            "held_out_auroc": [info["held_out_auroc"], s_info["overall"].get("auroc")],
            "identical": info["num_trees"] == s_info["num_trees"]
            and abs(info["held_out_auroc"] - s_info["overall"].get("auroc")) < 1e-9,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 patients instead of 20,000")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    patients = 2000 if args.quick else 20000
    work = args.work or Path(tempfile.mkdtemp(prefix="chronorisk-fedbench-"))
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["federated"].update({"superlink_port": 0})
    params_path = work / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    record: dict = {
        "benchmark": "federated",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *public_argv(sys.argv)]),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "flwr": _version("flwr"),
            "lightgbm": _version("lightgbm"),
        },
        "cohort": {"patients": patients, "sites": 5, "quick": args.quick},
        "federated_config": params["federated"],
        "note": "shared 2-core machine; other jobs ran at the same time (see load averages): timings are noisy",
    }
    try:
        gen_wall, _ = _cli(work, params_path, "generate", "--patients", str(patients))
        record["generate_s"] = round(gen_wall, 2)
        up_wall, _ = _cli(work, params_path, "federated", "up")
        record["up_s"] = round(up_wall, 2)
        record["runs"] = [_run(work, params_path, "cold"), _run(work, params_path, "warm")]
        record["simulation_vs_deployment"] = _same_as_simulation(work, params_path, record["runs"][-1])
    finally:
        try:
            _cli(work, params_path, "federated", "down", timeout=300)
        finally:
            if not args.keep and args.work is None:
                shutil.rmtree(work, ignore_errors=True)
    record["target"] = {"whole_training_both_tasks_max_s": 180,
                        "met_cold": record["runs"][0]["wall_s"] <= 180,
                        "met_warm": record["runs"][1]["wall_s"] <= 180}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1))
    for run in record["runs"]:
        print(f"{run['label']}: {run['wall_s']:.1f} s wall, {run['exchanges']} exchanges, local "
              f"{run['local_s_total']:.1f} s, Flower overhead {run['flower_overhead_s_total']:.1f} s, "
              f"{run['bytes_to_sites_total'] / 1e6:.2f} MB to sites, load {run['load_average_start'][0]:.1f}")
    print(f"-> {RESULTS}")
    return 0


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
