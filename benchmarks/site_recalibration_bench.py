"""Site recalibration rules on simulated sites whose true miscalibration is known.

A site's global risks p are drawn (logit normal, mean -2.6, SD 0.9: a mean
risk near 0.09, as at the generated new region) and its outcomes from
sigmoid(shift + slope * logit(p)): calibrated (0, 1); rate x1.4 (0.4, 1);
rate and slope (0.4, 0.85); slope (0, 0.7). Each rule of
models/site_calibration.py (`UPDATES`), and recalibration in the large
alone as a reference, is fitted on the first 25 or 100 cases (with the
non-cases alongside) and judged on 20,000 further rows by the mean absolute
difference between its risk and the true risk (no binning, no outcome
noise: what ECE estimates, without its floor). 40 sites per cell, seeded.

    .venv/bin/python benchmarks/site_recalibration_bench.py [--sites 40] [--no-save]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from bench_common import public_argv, write_result

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SCENARIOS = {"calibrated": (0.0, 1.0), "rate x1.4": (0.4, 1.0), "rate x1.4, slope 0.85": (0.4, 0.85),
             "slope 0.7": (0.0, 0.7)}
CASES = (25, 100)
PREVALENCE = 0.1  # local rows are drawn until about this many per case
EVAL_ROWS = 20_000


def run(sites: int) -> dict:
    from chronorisk.models.calibration import fit_logistic_1d, logit, sigmoid
    from chronorisk.models.site_calibration import UPDATES, fit_site_recalibration

    rules = [*UPDATES, "intercept_only"]
    table: dict = {}
    for name, (shift, slope) in SCENARIOS.items():
        for cases in CASES:
            errors = {rule: [] for rule in rules}
            for k in range(sites):
                rng = np.random.default_rng(k)
                n = int(cases / PREVALENCE)
                risk = sigmoid(rng.normal(-2.6, 0.9, n + EVAL_ROWS))
                y = (rng.random(risk.size) < sigmoid(shift + slope * logit(risk))).astype(float)
                local, later = slice(0, n), slice(n, None)
                truth = sigmoid(shift + slope * logit(risk[later]))
                for rule in rules:
                    if rule == "intercept_only":
                        a, _ = fit_logistic_1d(logit(risk[local]), y[local], fixed_slope=1.0)
                        served = sigmoid(float(a) + logit(risk[later]))
                    else:
                        served = fit_site_recalibration("s", risk[local], y[local], update=rule).apply(risk[later])
                    errors[rule].append(float(np.mean(np.abs(served - truth))))
            table[f"{name}, {cases} cases"] = {rule: round(float(np.mean(v)), 4) for rule, v in errors.items()}
    totals = {rule: round(sum(row[rule] for row in table.values()), 4) for rule in rules}
    return {"mean_absolute_error_vs_true_risk": table, "total": totals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=40)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    started, cpu = time.perf_counter(), time.process_time()
    record = {"benchmark": "site_recalibration",
              "command": " ".join(["benchmarks/site_recalibration_bench.py", *public_argv(sys.argv[1:])]),
              "when": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_start": round(os.getloadavg()[0], 2)},
              "sites_per_cell": args.sites, **run(args.sites)}
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    record["cpu_seconds"] = round(time.process_time() - cpu, 1)
    print(record["total"])
    if not args.no_save:
        write_result(RESULTS / "site_recalibration.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
