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
