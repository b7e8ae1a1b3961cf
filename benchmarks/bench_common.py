"""What the benchmark scripts share: CPU clocks of child processes, the command line as recorded
(without this machine's paths), and writing a result file whole."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children (each CLI call a benchmark ran)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def public_argv(argv: list[str]) -> list[str]:
    """`argv` with the work folder (a path of this machine) shown as `<work>`, in either option form."""
    out, hide = [], False
    for arg in argv:
        out.append("<work>" if hide else ("--work=<work>" if arg.startswith("--work=") else arg))
        hide = arg == "--work"
    return out


def write_result(path: Path, record: dict, *, indent: int = 2) -> None:
    """Write `record` as JSON to `path` through a temporary file: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=indent, default=str) + "\n")
    os.replace(tmp, path)


def speed_probe_ms() -> float:
    """CPU milliseconds of a fixed single-threaded workload (a chain of 300,000 SHA-256 digests, best of 3).

    This machine's speed drifts by tens of percent between runs (a shared host), so a result records the
    probe beside its figures: two runs compare after scaling by their probes. About 95 ms here when fast,
    up to ~130 ms when slow (2026-12-05)."""
    import hashlib
    import time

    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        digest = b"chronorisk"
        for _ in range(300_000):
            digest = hashlib.sha256(digest).digest()
        best = min(best, time.process_time() - start)
    return round(best * 1000, 1)

