"""One ingestion task (a few files, or a slice of an NDJSON file) in a worker process.

A task converts its resources to MEDS rows and spills them, every
`flush_rows` rows, into staging parquet parts bucketed by subject
(`<staging>/events/b<bucket>/...`), so a worker's memory is bounded by
`flush_rows` whatever the size of the input. Per-subject outcome counts go to
`<staging>/counts/` (for the per-site report once sites are known).
Quarantine lines go to the task's own part file. What comes back to the
parent is small: counts, the organizations seen (for site resolution) and
code displays.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from chronorisk.data.fhir.bundle import convert_resource, index_bundle
from chronorisk.data.fhir.convert import (
    BundleContext,
    Rejected,
    Row,
    organization_site,
    subject_if_any,
)
from chronorisk.data.fhir.quarantine import QuarantineWriter
from chronorisk.data.fhir.sources import FileProblem, Source, ndjson_lines, read_bundle
from chronorisk.data.pseudonym import Pseudonymizer

CONVERTED, QUARANTINED, SKIPPED = "converted", "quarantined", "skipped"


@dataclass(frozen=True)
class WorkerSettings:
    staging: str
    quarantine_parts: str
    n_buckets: int
    max_bytes: int
    flush_rows: int


@dataclass
class TaskResult:
    """What a task sends back: counts and small lookup tables, never records."""

    index: int
    files: int = 0
    bytes_in: int = 0
    rows: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)  # (resource_type, outcome) -> n
    categories: Counter = field(default_factory=Counter)  # (resource_type, category) -> n
    file_problems: Counter = field(default_factory=Counter)  # category -> n
    line_problems: Counter = field(default_factory=Counter)  # category -> n (NDJSON lines)
    notes: dict[str, int] = field(default_factory=dict)
    orgs: dict[str, str | None] = field(default_factory=dict)  # reference key -> site
    organizations: int = 0
    displays: dict[str, str] = field(default_factory=dict)
    peak_rss_mb: float = 0.0  # of the process that ran the task, at its end


_STATE: dict[str, object] = {}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def init_worker(key: bytes, settings: WorkerSettings, single_threaded: bool = True) -> None:
    """Process initializer: keep polars to one thread per worker, build the pseudonymizer."""
    if single_threaded:
        os.environ["POLARS_MAX_THREADS"] = "1"
    _STATE["pseudonymizer"] = Pseudonymizer(key)
    _STATE["settings"] = settings


class _Spill:
    """Rows and per-subject outcome counts, written to staging parquet every `flush_rows` rows."""

    def __init__(self, settings: WorkerSettings, task: int):
        self.settings = settings
        self.task = task
        self.rows: list[Row] = []
        self.subject_outcomes: Counter = Counter()
        self.parts = 0
        self.total = 0

    def add(self, rows: list[Row]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= self.settings.flush_rows:
            self.flush()

    def flush(self) -> None:
        import polars as pl

        name = f"t{self.task:06d}p{self.parts:04d}.parquet"
        staging = Path(self.settings.staging)
        if self.rows:
            subject, times, code, number, text, org = zip(*self.rows, strict=True)
            frame = pl.DataFrame(
                {
                    "subject_id": pl.Series(subject, dtype=pl.Int64),
                    "time": pl.Series(times, dtype=pl.Int64).cast(pl.Datetime("us")),
                    "code": pl.Series(code, dtype=pl.String),
                    "numeric_value": pl.Series(number, dtype=pl.Float64).cast(pl.Float32),
                    "text_value": pl.Series(text, dtype=pl.String),
                    "org": pl.Series(org, dtype=pl.String),
                }
            )
            buckets = frame.get_column("subject_id") % self.settings.n_buckets
            for (bucket,), part in frame.with_columns(buckets.alias("_b")).partition_by("_b", as_dict=True).items():
                target = staging / "events" / f"b{bucket:05d}" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                part.drop("_b").write_parquet(target, compression="lz4", statistics=False)
            self.total += len(self.rows)
            self.rows = []
        if self.subject_outcomes:
            keys = list(self.subject_outcomes)
            counts = pl.DataFrame(
                {
                    "subject_id": pl.Series([k[0] for k in keys], dtype=pl.Int64),
                    "resource_type": pl.Series([k[1] for k in keys], dtype=pl.String),
                    "outcome": pl.Series([k[2] for k in keys], dtype=pl.String),
                    "n": pl.Series(list(self.subject_outcomes.values()), dtype=pl.Int64),
                }
            )
            target = staging / "counts" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            counts.write_parquet(target, compression="lz4", statistics=False)
            self.subject_outcomes = Counter()
        self.parts += 1


class _Task:
    def __init__(self, index: int, settings: WorkerSettings, pseudonymizer: Pseudonymizer):
        self.result = TaskResult(index=index)
        self.settings = settings
        self.ctx = BundleContext(pseudonymizer, self.result.displays, self.result.notes)
        self.spill = _Spill(settings, index)
        self.quarantine = QuarantineWriter(Path(settings.quarantine_parts) / f"{index:06d}.ndjson")

    def outcome(self, rtype: str, outcome: str, subject: int | None) -> None:
        self.result.outcomes[(rtype, outcome)] += 1
        self.spill.subject_outcomes[(subject, rtype, outcome)] += 1

    def _subject_quietly(self, resource: dict) -> int | None:
        try:
            return subject_if_any(resource, self.ctx)
        except Exception:
            return None

    def resource(self, resource: dict, full_url: object, file: str, location: str) -> None:
        """Convert, quarantine or count as skipped one resource; never raises."""
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or not rtype:
            self.quarantine.record(file, location, None, "no_resource_type", "no resourceType", resource)
            self.result.categories[("(none)", "no_resource_type")] += 1
            self.outcome("(none)", QUARANTINED, None)
            return
        try:
            rows = convert_resource(resource, self.ctx, full_url)
        except Rejected as exc:
            self._reject(rtype, exc.category, exc.detail, resource, file, location)
            return
        except Exception as exc:  # malformed shapes a converter did not foresee: still one record
            self._reject(rtype, "malformed", f"{type(exc).__name__} while converting (unexpected structure)",
                         resource, file, location)
            return
        if rows is None:  # a type that is not converted
            if rtype == "Organization":
                self._organization(resource, full_url)
            self.outcome(rtype, SKIPPED, self._subject_quietly(resource))
            return
        self.outcome(rtype, CONVERTED, rows[0][0])
        self.spill.add(rows)

    def _reject(self, rtype: str, category: str, detail: str, resource: dict, file: str, location: str) -> None:
        self.quarantine.record(file, location, rtype, category, detail, resource)
        self.result.categories[(rtype, category)] += 1
        self.outcome(rtype, QUARANTINED, self._subject_quietly(resource))

    def _organization(self, resource: dict, full_url: object) -> None:
        keys, site = organization_site(resource, full_url if isinstance(full_url, str) else None)
        self.result.organizations += 1
        for key in keys:
            self.result.orgs.setdefault(key, site)

    def bundle(self, source: Source) -> None:
        try:
            doc = read_bundle(source, self.settings.max_bytes)
        except FileProblem as problem:
            self.quarantine.file_problem(source.name, problem.category, problem.detail)
            self.result.file_problems[problem.category] += 1
            return
        entries = doc.get("entry") or []
        index_bundle(entries, self.ctx)
        for i, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                self.ctx.note("Bundle: entry without a resource (skipped)")
                continue
            self.resource(resource, entry.get("fullUrl"), source.name, f"entry {i}")

    def ndjson(self, source: Source) -> None:
        self.ctx.reset_bundle()
        max_bytes = self.settings.max_bytes
        try:
            for offset, line in ndjson_lines(source):
                location = f"byte {offset}"
                if len(line) > max_bytes:
                    self.quarantine.file_problem(source.name, "oversize", "line is over max_file_mb", location)
                    self.result.line_problems["oversize"] += 1
                    continue
                try:
                    resource = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    self.quarantine.file_problem(source.name, "not_json", f"line is not valid JSON ({exc})",
                                                 location, raw_line=line)
                    self.result.line_problems["not_json"] += 1
                    continue
                if not isinstance(resource, dict):
                    self.quarantine.file_problem(source.name, "not_a_resource", "line is not a JSON object",
                                                 location, raw_line=line)
                    self.result.line_problems["not_a_resource"] += 1
                    continue
                self.resource(resource, None, source.name, location)
        except FileProblem as problem:
            self.quarantine.file_problem(source.name, problem.category, problem.detail)
            self.result.file_problems[problem.category] += 1

    def run(self, sources: list[Source]) -> TaskResult:
        started = time.perf_counter()
        # Parsed bundles are millions of acyclic containers: reference counting frees them, and the
        # cyclic collector only re-scans them over and over (~40% of parse time), so pause it.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for source in sources:
                if source.start == 0:
                    self.result.files += 1
                self.result.bytes_in += source.nbytes
                if source.kind == "bundle":
                    self.bundle(source)
                else:
                    self.ndjson(source)
            self.spill.flush()
        finally:
            self.quarantine.close()
            if gc_was_enabled:
                gc.enable()
        self.result.rows = self.spill.total
        self.result.seconds = time.perf_counter() - started
        self.result.peak_rss_mb = peak_rss_mb()
        return self.result


def run_task(index: int, sources: list[Source]) -> TaskResult:
    """Entry point for the pool (after `init_worker`) and for in-process runs."""
    settings = _STATE["settings"]
    pseudonymizer = _STATE["pseudonymizer"]
    return _Task(index, settings, pseudonymizer).run(sources)  # type: ignore[arg-type]
