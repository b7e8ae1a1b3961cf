"""The quarantine: every record (or file) ingestion could not convert, with the reason.

One JSON object a line in `<out>_quarantine/<run>/quarantine.ndjson` (beside the
MEDS output; `ingest_report.json` records the path):

- a record: `{"file", "location", "resource_type", "category", "reason", "resource"}`
  where `resource` is the raw FHIR resource exactly as received, so that the
  site can fix and resend it;
- one component left out of a resource whose other components were converted
  (a BP panel with one bad component): the same, plus `"component": "component[i]"`;
- a whole file: `{"file", "location": null, "resource_type": null, "category",
  "reason"}` (truncated JSON, not a bundle, random bytes, oversize...): its
  content is not copied (an empty Bundle too: category `empty_bundle`);
- an NDJSON line that is not JSON: as a file line with `location` its byte
  offset and `raw_line` (at most `MAX_RAW_LINE` bytes, decoded leniently).

Privacy: the raw records are source data and may carry names, addresses and
identifiers, and source file names may carry patient names (Synthea's do).
That is why the quarantine lives beside the site's MEDS output (not inside
it: MEDS is pseudonymized, the quarantine is not), under the same protection
as the source data, and why nothing of it (file names, reasons with values,
records) is copied into MEDS, the report or logs; those only count
quarantined records by resource type and category.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson

from chronorisk.data.files import atomic_output

QUARANTINE_FILE = "quarantine.ndjson"
MAX_RAW_LINE = 1 << 20


class QuarantineWriter:
    """Appends quarantine lines to one part file; opened on first use, so clean tasks write nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None
        self.lines = 0

    def _write(self, record: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab")  # noqa: SIM115
        self._fh.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        self.lines += 1

    def record(self, file: str, location: str, resource_type: str | None, category: str, reason: str,
               resource: object, part: str | None = None) -> None:
        line = {"file": file, "location": location, "resource_type": resource_type,
                "category": category, "reason": reason, "resource": resource}
        if part is not None:
            line["component"] = part
        self._write(line)

    def file_problem(self, file: str, category: str, reason: str, location: str | None = None,
                     raw_line: bytes | None = None) -> None:
        record = {"file": file, "location": location, "resource_type": None, "category": category,
                  "reason": reason}
        if raw_line is not None:
            record["raw_line"] = raw_line[:MAX_RAW_LINE].decode("utf-8", errors="replace")
            record["raw_line_truncated"] = len(raw_line) > MAX_RAW_LINE
        self._write(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def merge_parts(parts_dir: Path, target: Path) -> int:
    """Concatenate the part files (in name order) into `target` atomically; return the line count."""
    lines = 0
    with atomic_output(target) as tmp, open(tmp, "wb") as out:
        for part in sorted(Path(parts_dir).glob("*.ndjson")) if Path(parts_dir).is_dir() else ():
            with open(part, "rb") as fh:
                for line in fh:
                    out.write(line)
                    lines += 1
    if Path(parts_dir).is_dir():
        shutil.rmtree(parts_dir)
    return lines


def read_quarantine(path: Path) -> list[dict]:
    """All lines of a quarantine file (tests and tooling)."""
    with open(path, "rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]
