"""One ingestion task (a few files, or a slice of an NDJSON file) in a worker process.

A task converts its resources to MEDS rows and spills them, every
`flush_rows` rows, into staging parquet parts bucketed by subject
(`<staging>/events/b<bucket>/...`), so a worker's memory is bounded by
`flush_rows` whatever the size of the input. Per-subject outcome counts go to
`<staging>/counts/` (for the per-site report once sites are known).
Quarantine lines go to the task's own part file. What comes back to the
parent is small: counts, the organizations seen (for site resolution) and
code displays.

Each staged row also carries what the parent needs to keep one copy of a
resource sent twice (same type and id, per patient): `rtype`, `rid` (the
resource id, null without one), `occ` (which occurrence: task and position,
in input order) and `updated` (meta.lastUpdated).
"""

from __future__ import annotations

import gc
import os
import pickle
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from chronorisk.data.fhir.convert import (
    CONVERTERS,
    CORE_TYPES,
    READ_WHOLE,
    SUBJECT_KEYS,
    BundleContext,
    Rejected,
    Row,
    convert_resource,
    index_bundle,
    organization_site,
    parse_time,
    subject_if_any,
)
from chronorisk.data.fhir.quarantine import QuarantineWriter
from chronorisk.data.fhir.sources import FileProblem, Source, json_problem, ndjson_lines, read_bundle
from chronorisk.data.pseudonym import Pseudonymizer

CONVERTED, QUARANTINED, SKIPPED, DUPLICATE = "converted", "quarantined", "skipped", "duplicate"
LEAN_SHARE = 0.25  # a task reads bundles lean while this share of their entries, so far, is of types not read whole
TYPE_INDEX = {t: i for i, t in enumerate(CORE_TYPES)}


@dataclass(frozen=True)
class WorkerSettings:
    staging: str
    quarantine_parts: str
    n_buckets: int
    max_bytes: int
    flush_rows: int
    max_text_bytes: int = 64 * 1024
    light: bool = False  # small input: stage rows as pickles, the parent writes the parquet
    export_patients: frozenset[str] | None = None  # Patient ids of the NDJSON files (None: no NDJSON)


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
    part_categories: Counter = field(default_factory=Counter)  # components left out: (resource_type, category)
    empty_bundles: int = 0
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


def staging_columns(rows: list[Row], keys: list, outcomes: dict) -> tuple:
    """Spilled rows as columns (what `staging_frames` takes; transposed in the worker, where it runs in
    parallel, rather than in the parent): (event columns or None, outcome columns or None)."""
    events = None
    if rows:
        events = (*zip(*rows, strict=True), *zip(*keys, strict=True))
    counts = None
    if outcomes:
        subject, rtype, outcome = zip(*outcomes, strict=True)
        counts = (subject, rtype, outcome, tuple(outcomes.values()))
    return events, counts


def staging_frames(columns: tuple, n_buckets: int) -> tuple[dict, object]:
    """Staging frames of `staging_columns`: ({bucket: event rows of its subjects}, per-subject outcome counts
    or None)."""
    import polars as pl

    event_columns, count_columns = columns
    events: dict[int, pl.DataFrame] = {}
    if event_columns is not None:
        subject, times, code, number, text, org, rtype, rid, occ, updated = event_columns
        frame = pl.DataFrame(
            {
                "subject_id": pl.Series(subject, dtype=pl.Int64),
                "time": pl.Series(times, dtype=pl.Int64).cast(pl.Datetime("us")),
                "code": pl.Series(code, dtype=pl.String),
                "numeric_value": pl.Series(number, dtype=pl.Float64).cast(pl.Float32),
                "text_value": pl.Series(text, dtype=pl.String),
                "org": pl.Series(org, dtype=pl.String),
                "rtype": pl.Series(rtype, dtype=pl.Int8),
                "rid": pl.Series(rid, dtype=pl.String),
                "occ": pl.Series(occ, dtype=pl.Int64),
                "updated": pl.Series(updated, dtype=pl.Int64),
            }
        )
        if n_buckets == 1:  # (small inputs)
            events[0] = frame
        else:
            buckets = frame.get_column("subject_id") % n_buckets
            for (bucket,), part in frame.with_columns(buckets.alias("_b")).partition_by("_b", as_dict=True).items():
                events[bucket] = part.drop("_b")
    counts = None
    if count_columns is not None:
        subject, rtype, outcome, n = count_columns
        counts = pl.DataFrame(
            {
                "subject_id": pl.Series(subject, dtype=pl.Int64),
                "resource_type": pl.Series(rtype, dtype=pl.String),
                "outcome": pl.Series(outcome, dtype=pl.String),
                "n": pl.Series(n, dtype=pl.Int64),
            }
        )
    return events, counts


def write_staging(staging: Path, name: str, rows: list[Row], keys: list, outcomes: dict, n_buckets: int) -> None:
    """Staging parquet of spilled rows (bucketed by subject: `events/b<bucket>/<name>.parquet`) and of the
    per-subject outcome counts (`counts/<name>.parquet`)."""
    events, counts = staging_frames(staging_columns(rows, keys, outcomes), n_buckets)
    for bucket, part in events.items():
        target = staging / "events" / f"b{bucket:05d}" / f"{name}.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        part.write_parquet(target, compression="lz4", statistics=False)
    if counts is not None:
        target = staging / "counts" / f"{name}.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        counts.write_parquet(target, compression="lz4", statistics=False)


def read_light_staging(staging: Path, n_buckets: int) -> tuple[dict[str, list], list]:
    """In the parent: the pickled rows of light workers as in-memory staging frames, in the order (and with the
    bucket names) the staging parquet would have: ({"b<bucket>": [frames]}, [count frames]). Pickles removed."""
    events: dict[str, list] = {}
    counts: list = []
    for path in sorted((Path(staging) / "light").glob("*.pickle")):
        with open(path, "rb") as fh:
            columns = pickle.load(fh)  # written by this run's own workers, in its staging folder
        parts, part_counts = staging_frames(columns, n_buckets)
        for bucket, part in parts.items():
            events.setdefault(f"b{bucket:05d}", []).append(part)
        if part_counts is not None:
            counts.append(part_counts)
        path.unlink()
    return events, counts


class _Spill:
    """Rows and per-subject outcome counts, written to staging every `flush_rows` rows (parquet, or with
    `light` a pickle the parent turns into parquet)."""

    def __init__(self, settings: WorkerSettings, task: int):
        self.settings = settings
        self.task = task
        self.rows: list[Row] = []
        self.keys: list[tuple[int, str | None, int, int | None]] = []  # (rtype, rid, occ, updated) per row
        self.subject_outcomes: Counter = Counter()
        self.parts = 0
        self.total = 0

    def add(self, rows: list[Row], key: tuple[int, str | None, int, int | None]) -> None:
        self.rows.extend(rows)
        self.keys.extend([key] * len(rows))
        if len(self.rows) >= self.settings.flush_rows:
            self.flush()

    def flush(self) -> None:
        name = f"t{self.task:06d}p{self.parts:04d}"
        staging = Path(self.settings.staging)
        if not self.rows and not self.subject_outcomes:
            pass
        elif self.settings.light:  # small input: the parent writes the parquet (no polars import here)
            target = staging / "light" / f"{name}.pickle"
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                pickle.dump(staging_columns(self.rows, self.keys, self.subject_outcomes), fh,
                            protocol=pickle.HIGHEST_PROTOCOL)
        else:
            write_staging(staging, name, self.rows, self.keys, self.subject_outcomes, self.settings.n_buckets)
        self.total += len(self.rows)
        self.rows, self.keys, self.subject_outcomes = [], [], Counter()
        self.parts += 1


class _Task:
    def __init__(self, index: int, settings: WorkerSettings, pseudonymizer: Pseudonymizer):
        self.result = TaskResult(index=index)
        self.settings = settings
        self.ctx = BundleContext(pseudonymizer, self.result.displays, self.result.notes, settings.max_text_bytes)
        self.seq = 0
        self.spill = _Spill(settings, index)
        self.quarantine = QuarantineWriter(Path(settings.quarantine_parts) / f"{index:06d}.ndjson")
        self.entries = 0  # bundle entries read so far, and how many of them hold a type conversion does not read
        self.others = 0

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
        converter = CONVERTERS.get(rtype)
        if converter is None:
            if rtype == "Organization":
                self._organization(resource, full_url)
            self.outcome(rtype, SKIPPED, self._subject_quietly(resource))
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
        self.outcome(rtype, CONVERTED, rows[0][0])
        for part in self.ctx.partial:  # components left out of a panel that converts: each quarantined alone
            self.quarantine.record(file, location, rtype, part.category, part.detail, resource, part=part.part)
            self.result.part_categories[(rtype, part.category)] += 1
        self.seq += 1
        rid, meta = resource.get("id"), resource.get("meta")
        self.spill.add(rows, (TYPE_INDEX[rtype], rid if isinstance(rid, str) and rid else None,
                              (self.result.index << 32) | self.seq, _last_updated(meta) if meta else None))

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
        # Resources of types conversion does not read are only counted (by subject): they need not be built
        # whole. That saves time when they are many (a Synthea bundle: 40% of the entries, 60% of the bytes, in
        # claims and explanations of benefit: -8% CPU), and costs it when they are few (simdjson builds dicts
        # slower than orjson: +22% on generated bundles): read lean while they are at least LEAN_SHARE so far.
        lean = self.others >= LEAN_SHARE * self.entries
        try:
            doc = read_bundle(source, self.settings.max_bytes, whole=READ_WHOLE if lean else None,
                              kept_keys=SUBJECT_KEYS)
        except FileProblem as problem:
            self.quarantine.file_problem(source.name, problem.category, problem.detail)
            self.result.file_problems[problem.category] += 1
            return
        entries = doc.get("entry") or []
        if not entries:
            self.quarantine.file_problem(source.name, "empty_bundle", "Bundle has no entries")
            self.result.empty_bundles += 1
            return
        index_bundle(entries, self.ctx)
        others = 0
        for i, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                self.ctx.note("Bundle: entry without a resource (skipped)")
                continue
            others += resource.get("resourceType") not in READ_WHOLE
            self.resource(resource, entry.get("fullUrl"), source.name, f"entry {i}")
        self.entries += len(entries)
        self.others += others

    def ndjson(self, source: Source) -> None:
        self.ctx.reset_export(self.settings.export_patients)
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
                    self.quarantine.file_problem(source.name, "not_json", "line: " + json_problem(line, exc),
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


def _last_updated(meta: object) -> int | None:
    """meta.lastUpdated in microseconds (None if absent or not a valid instant: then input order decides)."""
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if value is None:
        return None
    try:
        return parse_time(value, "meta.lastUpdated")
    except Rejected:
        return None


def run_task(index: int, sources: list[Source]) -> TaskResult:
    """Entry point for the pool (after `init_worker`) and for in-process runs."""
    settings = _STATE["settings"]
    pseudonymizer = _STATE["pseudonymizer"]
    return _Task(index, settings, pseudonymizer).run(sources)  # type: ignore[arg-type]
