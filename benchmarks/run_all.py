"""Run every benchmark in turn, each in its own process, and say which ones failed.

The benchmarks share the machine's two cores, so they run one after another
(never at once: each would slow the others down and its figures would mean
nothing). Each script writes its own JSON under `benchmarks/results/`; this
runner only sequences them and prints a one-line verdict per script.

    .venv/bin/python benchmarks/run_all.py            # full sizes (about an hour on 2 quiet cores)
    .venv/bin/python benchmarks/run_all.py --quick    # small sizes, a few minutes each
    .venv/bin/python benchmarks/run_all.py --only features serving
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# In dependency-free order: cheap, self-contained ones first.
BENCHMARKS = ("train", "calibration", "explain", "ingest", "generate", "features", "monitor", "serving", "federated")


def benchmark_command(name: str, quick: bool) -> list[str]:
    """The command line that runs one benchmark script with this interpreter."""
    command = [sys.executable, str(HERE / f"{name}_bench.py")]
    return [*command, "--quick"] if quick else command


def run_benchmark(name: str, quick: bool) -> tuple[int, float]:
    """Run one benchmark; return its exit code and wall seconds (its output goes straight to the terminal)."""
    start = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"== {name} ({'quick' if quick else 'full'}; load average {load:.1f})", flush=True)
    code = subprocess.call(benchmark_command(name, quick), cwd=HERE.parent)
    return code, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks and return non-zero if any of them failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark at its small size")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, help="run only these")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only or BENCHMARKS:
        code, seconds = run_benchmark(name, args.quick)
        print(f"== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
