"""FHIR R4 -> MEDS per site: plan, convert in a process pool, place patients at sites, write.

1. Discover the input files and cut them into tasks (`sources.plan_tasks`);
   read the Patient ids of NDJSON files (a bulk export's subjects resolve
   across its files).
2. Workers convert each task's resources and spill rows to staging parquet,
   bucketed by subject (`worker.run_task`); records that cannot be converted
   go to the quarantine. Memory stays flat: a worker holds at most
   `flush_rows` rows, the parent only counts (and holds one bucket when
   writing). Small inputs run in-process (`inline_below_mb`), or with workers
   that hand their rows to the parent, which keeps them in memory
   (`light_workers_below_mb`).
3. Sites. With `--site`, every patient goes there. Otherwise each encounter's
   serviceProvider names an Organization (found in any input file: Synthea
   writes them in the patient bundle and in `hospitalInformation*.json`); its
   site is the value of its `urn:chronorisk:site` identifier, else its name
   slugified. A patient goes to ONE site: the site of most of their encounters
   (ties: the alphabetically first site); a patient with no such encounter
   goes to the site of their Patient.managingOrganization, else of the only
   Organization in their bundle, else to `ingest.unassigned_site`. Resources that name no patient are
   counted under "(no subject)".
4. Duplicates: a resource sent twice for one patient (same type and id, in
   one file or in several) is kept once, the copy with the latest
   meta.lastUpdated, else the first in input order; the others are counted
   as `duplicate` in the report.
5. Each staging bucket becomes one MEDS shard per site (a subject lives in
   exactly one shard), then metadata, the quarantine file (beside `--out`:
   `<out>_quarantine/<run>/`) and the report.

Everything is written into a temporary folder beside `--out` and swapped in
at the end, so a failed run leaves the previous output untouched and a re-run
replaces it whole.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

from chronorisk.data.config import IngestConfig
from chronorisk.data.fhir.convert import CORE_TYPES, keep_display
from chronorisk.data.fhir.quarantine import QUARANTINE_FILE, merge_parts
from chronorisk.data.fhir.report import REPORT_FILE, build_report, report_json
from chronorisk.data.fhir.sources import Source, discover, export_patient_ids, plan_tasks
from chronorisk.data.fhir.worker import (
    CONVERTED,
    DUPLICATE,
    TaskResult,
    WorkerSettings,
    init_worker,
    peak_rss_mb,
    read_light_staging,
    run_task,
)
from chronorisk.data.files import write_text_atomic
from chronorisk.errors import ChronoriskError, InputError

log = logging.getLogger(__name__)
NO_SUBJECT = "(no subject)"
_WRITER_THREADS = 2  # site files written at once (Synthea sample, 188 files: 1 thread 0.114 s, 2: 0.105 s, 4: 0.118 s)


@dataclass(frozen=True)
class IngestOptions:
    input: Path
    out: Path
    quarantine_root: Path | None = None  # None: beside the output, `<out>_quarantine`
    site: str | None = None
    workers: int | None = None  # None: config.workers


def quarantine_root_for(out: Path) -> Path:
    """Where the quarantine of an output folder goes: beside it (`<out>_quarantine/<run>/`), not inside it."""
    out = Path(out).resolve()
    return out.parent / f"{out.name}_quarantine"


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier ingest output (or empty)."""
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_FILE).is_file():
        raise InputError("--out", f"{out} is not empty and holds no {REPORT_FILE}: refusing to replace it")


def _run_tasks(tasks: list[list[Source]], key: bytes, settings: WorkerSettings, workers: int,
               context) -> list[TaskResult]:
    try:
        return _run_tasks_unguarded(tasks, key, settings, workers, context)
    except OSError as exc:  # disk full, permissions: the input is fine, the output cannot be written
        raise ChronoriskError(
            f"cannot write staging or quarantine files ({exc.strerror or type(exc).__name__})"
        ) from None


def _pool_context():
    """`fork` on Linux when this process runs no thread and has not imported polars or pyarrow (they
    start threads; forking a process with threads can deadlock the child), else `spawn`. Forked
    workers start in milliseconds; spawned ones start a new interpreter and re-import (~0.5 s each)."""
    threads_free = threading.active_count() == 1 and not {"polars", "pyarrow"} & set(sys.modules)
    if sys.platform == "linux" and "fork" in get_all_start_methods() and threads_free:
        return get_context("fork")
    return get_context("spawn")


def _pool_name(context, light: bool) -> str:
    """How the tasks ran, for the report: `in-process`, `fork`, `spawn` (+ ` (light workers)`)."""
    if context is None:
        return "in-process"
    return context.get_start_method() + (" (light workers)" if light else "")


def _run_tasks_unguarded(tasks: list[list[Source]], key: bytes, settings: WorkerSettings,
                         workers: int, context) -> list[TaskResult]:
    results: list[TaskResult] = []
    started = time.perf_counter()
    if workers <= 1:
        init_worker(key, settings, single_threaded=False)
        for i, task in enumerate(tasks):
            results.append(run_task(i, task))
        return results
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=init_worker, initargs=(key, settings)
    )
    try:
        futures = [pool.submit(run_task, i, task) for i, task in enumerate(tasks)]
        # The writer's imports (pyarrow, meds: ~1 s) overlap the workers instead of following them.
        import chronorisk.data.meds_io  # noqa: F401

        for done, future in enumerate(as_completed(futures), 1):
            results.append(future.result())
            if done % 50 == 0:
                log.info("ingest: %d/%d tasks done (%.0f s)", done, len(tasks), time.perf_counter() - started)
    except BrokenProcessPool:
        raise ChronoriskError(
            "a worker process died (out of memory?); lower ingest.flush_rows or ingest.workers"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sorted(results, key=lambda r: r.index)


def _merge(results: list[TaskResult]) -> dict:
    merged = {
        "files": 0, "bytes_in": 0, "rows": 0, "worker_seconds": 0.0, "organizations": 0, "worker_peak_rss_mb": 0.0,
        "empty_bundles": 0, "outcomes": Counter(), "categories": Counter(), "part_categories": Counter(),
        "file_problems": Counter(), "line_problems": Counter(), "notes": Counter(), "orgs": {}, "displays": {},
    }
    for r in results:
        for key in ("files", "bytes_in", "rows", "organizations", "empty_bundles"):
            merged[key] += getattr(r, key)
        merged["worker_seconds"] += r.seconds
        merged["worker_peak_rss_mb"] = max(merged["worker_peak_rss_mb"], r.peak_rss_mb)
        for key in ("outcomes", "categories", "part_categories", "file_problems", "line_problems"):
            merged[key].update(getattr(r, key))
        merged["notes"].update(r.notes)
        for k, v in r.orgs.items():
            if merged["orgs"].get(k) is None:
                merged["orgs"][k] = v
        for k, v in r.displays.items():
            keep_display(merged["displays"], k, v)
    return merged


@dataclass(frozen=True)
class _Staged:
    """The staged rows: event frames per bucket (`b<bucket>` -> LazyFrame; a patient's rows all in one bucket),
    and the per-subject outcome counts (None: none)."""

    buckets: dict
    counts: object

    @staticmethod
    def on_disk(staging: Path) -> _Staged:
        import polars as pl

        buckets = {d.name: pl.scan_parquet(sorted(d.glob("*.parquet")))
                   for d in sorted((staging / "events").glob("b*"))}
        files = sorted((staging / "counts").glob("*.parquet"))
        return _Staged(buckets, pl.scan_parquet(files) if files else None)

    @staticmethod
    def in_memory(events: dict[str, list], counts: list) -> _Staged:
        """Light workers' rows, never written as parquet (small inputs: the parent holds them all)."""
        import polars as pl

        buckets = {name: pl.concat(events[name]).lazy() for name in sorted(events)}
        return _Staged(buckets, pl.concat(counts).lazy() if counts else None)


def _duplicates(staged: _Staged):
    """(subject_id, rtype, occ) of the copies to drop: of a resource (type and id) staged more than once
    for a patient, every occurrence but the one with the latest meta.lastUpdated, else the first."""
    import polars as pl

    found = [pl.DataFrame(schema={"subject_id": pl.Int64, "rtype": pl.Int8, "occ": pl.Int64})]
    for bucket in staged.buckets.values():  # a patient's rows are all in one bucket
        rows = bucket.filter(pl.col("rid").is_not_null())
        # a 64-bit hash of (patient, type, id) finds the candidates in one light pass (usually none);
        # the candidates are then compared on the exact values (a hash collision costs nothing)
        key = pl.struct("subject_id", "rtype", "rid").hash(seed=1).alias("key")
        repeated = (
            rows.select(key, "occ").group_by("key").agg(pl.col("occ").n_unique().alias("copies"))
            .filter(pl.col("copies") > 1).select("key").collect()
        )
        if repeated.is_empty():
            continue
        found.append(
            rows.select(key, "occ", "updated", "subject_id", "rtype", "rid")
            .join(repeated.lazy(), on="key", how="semi")
            .group_by("occ").agg(pl.col("updated", "subject_id", "rtype", "rid").first())
            .sort(["updated", "occ"], descending=[True, False], nulls_last=True)
            .filter(pl.int_range(pl.len()).over("subject_id", "rtype", "rid") > 0)
            .select("subject_id", "rtype", "occ")
            .collect()
        )
    return pl.concat(found)


def _without(frame, duplicates):
    """A staging frame without the rows of the duplicate occurrences."""
    return frame if duplicates.is_empty() else frame.join(duplicates.lazy().select("occ"), on="occ", how="anti")


def _site_map(staged: _Staged, orgs: dict[str, str | None], site: str | None, duplicates):
    """subject_id -> site (most encounters at that site's organizations; ties: first by name)."""
    import polars as pl

    schema = {"subject_id": pl.Int64, "site": pl.String}
    if site is not None or not staged.buckets:
        return pl.DataFrame(schema=schema)
    org_table = pl.DataFrame(
        {"org": list(orgs), "site": list(orgs.values())}, schema={"org": pl.String, "site": pl.String}
    ).drop_nulls()
    votes = (
        _without(pl.concat(list(staged.buckets.values())), duplicates)
        .drop_nulls("org")
        .select(
            "subject_id", "org",
            # encounters vote first; the patient's own organization only when no encounter resolves
            pl.when(pl.col("code").str.starts_with("ENCOUNTER//")).then(0).otherwise(1).alias("rank"),
        )
        .join(org_table.lazy(), on="org", how="inner")
        .group_by("subject_id", "rank", "site")
        .len()
        .sort(["subject_id", "rank", "len", "site"], descending=[False, False, True, False])
        .group_by("subject_id", maintain_order=True)
        .first()
        .select("subject_id", "site")
    )
    return votes.collect()


def _write_sites(tmp_out: Path, staged: _Staged, site_map, site: str | None, unassigned: str, displays: dict,
                 run_id: str, duplicates) -> dict[str, dict]:
    """One MEDS shard per (bucket, site) plus metadata per site; returns per-site subjects/events."""
    import polars as pl

    from chronorisk.data.codes import display_for
    from chronorisk.data.meds_io import (
        EVENT_SCHEMA,
        codes_table,
        dataset_metadata,
        events_table,
        site_root,
        subject_splits_table,
        write_events_table,
        write_metadata_tables,
    )

    site_subjects, site_codes = [], []
    events: Counter = Counter()
    shards: Counter = Counter()
    # many small sites, several small files each: written by threads (parquet writes release the GIL, and much
    # of a small file's time is the file system's)
    writers = ThreadPoolExecutor(max_workers=_WRITER_THREADS)
    pending = []
    try:
        for bucket_name, bucket in staged.buckets.items():
            for future in pending:  # the previous bucket written before this one is read: one bucket in memory
                future.result()
            pending = []
            frame = _without(bucket, duplicates)
            if site is not None:
                frame = frame.with_columns(pl.lit(site).alias("site"))
            else:
                frame = frame.join(site_map.lazy(), on="subject_id", how="left").with_columns(
                    pl.col("site").fill_null(unassigned)
                )
            # one bucket in memory at a time (about shard_input_mb of input: a few MB of rows), read once, sorted
            # once: by site, then in MEDS order (subject, time with statics first, code), then on the values, so
            # that equal subject, time and code (two readings at one instant) come in one order whatever the
            # order of the input files and of the engine's work. Each site's rows are then one slice.
            rows = frame.select("site", *EVENT_SCHEMA).sort(["site", *EVENT_SCHEMA], nulls_last=False).collect()
            table = events_table(rows.drop("site"))
            offset = 0
            for site_id, n in rows.group_by("site", maintain_order=True).len().iter_rows():
                target = site_root(tmp_out, site_id) / "data" / f"{bucket_name[1:]}.parquet"
                pending.append(writers.submit(write_events_table, table.slice(offset, n), target))
                offset += n
                events[site_id] += n
                shards[site_id] += 1
            site_subjects.append(rows.select("site", "subject_id").unique())
            site_codes.append(rows.select("site", "code").unique())
            rows, table = None, None
        if not site_subjects:
            return {}
        # every site's metadata rows built at once (sorted by site: each site's rows are one slice; while the
        # last bucket's shards are being written), then written
        subjects = pl.concat(site_subjects).unique().sort("site", "subject_id")
        codes = pl.concat(site_codes).unique().sort("site", "code")
        codes = codes.with_columns(pl.Series("description", [
            display_for(c) or displays.get(c) or None for c in codes.get_column("code").to_list()
        ], dtype=pl.String))
        splits_all, codes_all = subject_splits_table(subjects), codes_table(codes)
        subject_counts = dict(subjects.group_by("site", maintain_order=True).len().iter_rows())
        code_counts = dict(codes.group_by("site", maintain_order=True).len().iter_rows())
        summary = {}
        subject_offset = code_offset = 0
        for site_id in sorted(subject_counts):
            n_subjects, n_codes = subject_counts[site_id], code_counts[site_id]
            pending.append(writers.submit(
                write_metadata_tables,
                site_root(tmp_out, site_id),
                splits_all.slice(subject_offset, n_subjects),
                codes_all.slice(code_offset, n_codes),
                dataset_metadata(f"chronorisk-fhir-{site_id}", "chronorisk ingest (FHIR R4)",
                                 {"site_id": site_id, "source": "fhir-r4", "ingest_run": run_id}),
            ))
            subject_offset += n_subjects
            code_offset += n_codes
            summary[site_id] = {"subjects": n_subjects, "events": events[site_id], "shards": shards[site_id]}
        for future in pending:
            future.result()  # re-raises a failed write here
    finally:
        writers.shutdown(wait=True, cancel_futures=True)
    return summary


def _duplicate_counts(duplicates):
    """Per-subject outcome corrections: each dropped copy moves from `converted` to `duplicate`."""
    import polars as pl

    per_type = duplicates.group_by("subject_id", "rtype").len().with_columns(
        pl.col("rtype").replace_strict(list(range(len(CORE_TYPES))), list(CORE_TYPES),
                                       return_dtype=pl.String).alias("resource_type"),
        pl.col("len").cast(pl.Int64).alias("n"),
    )
    return pl.concat([
        per_type.select("subject_id", "resource_type", pl.lit(CONVERTED).alias("outcome"), -pl.col("n")),
        per_type.select("subject_id", "resource_type", pl.lit(DUPLICATE).alias("outcome"), "n"),
    ])


def _site_outcomes(staged: _Staged, site_map, site: str | None, unassigned: str, duplicates) -> dict:
    """{site: {resource_type: {outcome: n}}} from the per-subject outcome counts."""
    import polars as pl

    if staged.counts is None:
        return {}
    frame = staged.counts
    if not duplicates.is_empty():
        frame = pl.concat([frame, _duplicate_counts(duplicates).lazy()], how="vertical_relaxed")
    if site is not None:
        frame = frame.with_columns(pl.lit(site).alias("site"))
    else:
        frame = frame.join(site_map.lazy(), on="subject_id", how="left").with_columns(
            pl.when(pl.col("subject_id").is_null()).then(pl.lit(NO_SUBJECT))
            .otherwise(pl.col("site").fill_null(unassigned)).alias("site")
        )
    table = frame.group_by("site", "resource_type", "outcome").agg(pl.col("n").sum()).collect()
    out: dict = {}
    for row in table.iter_rows(named=True):
        out.setdefault(row["site"], {}).setdefault(row["resource_type"], {})[row["outcome"]] = row["n"]
    return out


def _swap_in(tmp_out: Path, out: Path, run_id: str) -> None:
    old = out.parent / f".{out.name}.old-{run_id}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp_out, out)
    if old.exists():
        shutil.rmtree(old)


def ingest(options: IngestOptions, config: IngestConfig, key: bytes, key_source: str = "") -> dict:
    """Run one ingestion; return the report (also written to `<out>/ingest_report.json`)."""
    started_at = datetime.now(UTC)
    t0 = time.perf_counter()
    sources, ignored = discover(options.input)
    out = Path(options.out).resolve()
    _check_out(out)
    run_id = new_run_id()
    tmp_out = out.parent / f".{out.name}.tmp-{run_id}"
    staging = tmp_out / "_staging"
    quarantine_dir = Path(options.quarantine_root or quarantine_root_for(out)) / run_id
    workers = options.workers or config.workers
    total_bytes = sum(s.size for s in sources)
    if total_bytes < config.inline_below_mb * 1e6:
        workers = 1
    n_buckets = max(1, math.ceil(total_bytes / (config.shard_input_mb * 1e6)))
    settings = WorkerSettings(
        staging=str(staging), quarantine_parts=str(quarantine_dir / ".parts"), n_buckets=n_buckets,
        max_bytes=int(config.max_file_mb * 1e6), flush_rows=config.flush_rows,
        max_text_bytes=int(config.max_text_kib * 1024), export_patients=export_patient_ids(sources),
        light=workers > 1 and total_bytes < config.light_workers_below_mb * 1e6,
    )
    tasks = plan_tasks(sources, int(config.task_mb * 1e6), workers)
    log.info("ingest: %d file(s), %.1f MB, %d task(s), %d worker(s)", len(sources), total_bytes / 1e6,
             len(tasks), workers)
    tmp_out.mkdir(parents=True)
    done = False
    try:
        context = _pool_context() if workers > 1 else None
        results = _run_tasks(tasks, key, settings, workers, context)
        staged = (_Staged.in_memory(*read_light_staging(staging, n_buckets)) if settings.light
                  else _Staged.on_disk(staging))
        t_convert = time.perf_counter() - t0
        merged = _merge(results)
        duplicates = _duplicates(staged)
        for rtype_index, n in duplicates.group_by("rtype").len().iter_rows():
            merged["outcomes"][(CORE_TYPES[rtype_index], CONVERTED)] -= n
            merged["outcomes"][(CORE_TYPES[rtype_index], DUPLICATE)] += n
        site_map = _site_map(staged, merged["orgs"], options.site, duplicates)
        sites = _write_sites(tmp_out, staged, site_map, options.site, config.unassigned_site,
                             merged["displays"], run_id, duplicates)
        per_site = _site_outcomes(staged, site_map, options.site, config.unassigned_site, duplicates)
        shutil.rmtree(staging, ignore_errors=True)
        quarantined_lines = merge_parts(quarantine_dir / ".parts", quarantine_dir / QUARANTINE_FILE)
        seconds = time.perf_counter() - t0
        report = build_report(
            run_id=run_id, started_at=started_at, seconds=seconds, convert_seconds=t_convert,
            input_path=Path(options.input).resolve(), out=out, quarantine_file=quarantine_dir / QUARANTINE_FILE,
            key_source=key_source, site=options.site, workers=workers, n_sources=len(sources), ignored=ignored,
            pool=_pool_name(context, settings.light),
            merged=merged, sites=sites, per_site=per_site, quarantined_lines=quarantined_lines,
            parent_peak_rss_mb=peak_rss_mb(),
        )
        write_text_atomic(tmp_out / REPORT_FILE, report_json(report))
        _swap_in(tmp_out, out, run_id)
        done = True
    finally:
        if tmp_out.exists():
            shutil.rmtree(tmp_out, ignore_errors=True)
        if not done:  # a failed run leaves no half-written quarantine either
            shutil.rmtree(quarantine_dir, ignore_errors=True)
    return report
