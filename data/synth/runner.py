"""Generate the whole cohort: chunks in parallel processes, then metadata and ground truth.

Layout under the output root (see docs/architecture.md):
`meds/sites/<site>/data/<chunk:04d>.parquet` and `meds/sites/<site>/metadata/`,
`truth/<task>.parquet` (subject_id, prediction_time, site, true_risk), and
with FHIR `fhir/<site>/<uuid>.json.gz`. Everything is written into a staging
folder first and moved into place at the end, so a failed or interrupted run
leaves the previous cohort intact, never half a new one.

Each chunk draws from its own random stream (seed, chunk index), so the
output does not depend on the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from chronorisk.data.config import GenerateConfig
from chronorisk.data.synth import hazards, messy
from chronorisk.data.synth.events import CODES
from chronorisk.data.synth.fhir_writer import write_site_bundles
from chronorisk.data.synth.meds_writer import events_table, sort_order, write_shard, write_site_metadata
from chronorisk.data.synth.simulate import DAY, TASKS, Calendar, SimSpec, simulate_chunk

log = logging.getLogger(__name__)

TRUTH_SCHEMA = pa.schema([
    ("subject_id", pa.int64()),
    ("prediction_time", pa.timestamp("us")),
    ("site", pa.string()),
    ("true_risk", pa.float64()),
])
GENERATED = ("meds", "truth", "fhir")


@dataclass
class ChunkSummary:
    chunk: int
    events_by_site: dict[str, int]
    subjects_by_site: dict[str, np.ndarray]
    codes_by_site: dict[str, set[str]]
    bundles: int
    deaths: int
    cpu_seconds: float
    phase_cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class GenerateSummary:
    """What a run produced (counts only: no identifiers)."""

    patients_by_site: dict[str, int]
    events_by_site: dict[str, int]
    truth_rows: dict[str, int]
    bundles: int
    deaths: int
    seconds: float
    cpu_seconds: float
    chunks: int
    workers: int
    extra: dict = field(default_factory=dict)

    @property
    def patients(self) -> int:
        return sum(self.patients_by_site.values())

    @property
    def events(self) -> int:
        return sum(self.events_by_site.values())


def _limit_threads() -> None:
    """Worker initializer: one BLAS thread per process (the chunks are the parallelism)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


def run_chunk(spec: SimSpec, chunk: int, n: int, first_id: int, staging: Path, fhir: bool) -> ChunkSummary:
    """Simulate one chunk and write its MEDS shards, truth parts and (optionally) FHIR bundles."""
    cpu0 = time.process_time()
    result = simulate_chunk(spec, chunk, n)
    cpu_sim = time.process_time()
    subject_ids = first_id + np.arange(n, dtype=np.int64)
    events = result.events.take(sort_order(result.events))
    cpu_sort = time.process_time()
    fhir_cpu = 0.0
    site_ids = [s.site_id for s in spec.sites]
    # Patients are sorted by site, so each site's events are one slice of the sorted events.
    patient_bounds = np.searchsorted(result.site, np.arange(len(site_ids) + 1))
    event_bounds = np.searchsorted(events.subject, patient_bounds)
    summary = ChunkSummary(chunk, {}, {}, {}, 0, result.deaths, 0.0)
    for s, site_id in enumerate(site_ids):
        lo, hi = event_bounds[s], event_bounds[s + 1]
        part = events.take(np.arange(lo, hi))
        summary.subjects_by_site[site_id] = subject_ids[patient_bounds[s]:patient_bounds[s + 1]]
        summary.events_by_site[site_id] = hi - lo
        summary.codes_by_site[site_id] = {CODES[i] for i in np.unique(part.code)}
        if hi > lo:
            table = events_table(part, subject_ids)
            if spec.realistic_codes:
                table, added = messy.make_messy(table, frailty=result.frailty, first_id=first_id, site_index=s,
                                                seed=spec.seed, chunk=chunk)
                summary.codes_by_site[site_id] |= added
                summary.events_by_site[site_id] = table.num_rows
            write_shard(table, staging / "meds" / "sites" / site_id / "data" / f"{chunk:04d}.parquet")
        if fhir:
            f0 = time.process_time()
            summary.bundles += write_site_bundles(part, subject_ids, site=spec.sites[s], seed=spec.seed,
                                                  out_dir=staging / "fhir" / site_id)
            fhir_cpu += time.process_time() - f0
    cal = Calendar.build(spec)
    for task in TASKS:
        patient, month, risk = result.truth[task]
        order = np.lexsort((month, patient))
        patient, month, risk = patient[order], month[order], risk[order]
        table = pa.table({
            "subject_id": pa.array(subject_ids[patient], pa.int64()),
            "prediction_time": pa.array(cal.month_start[month] * DAY * 1_000_000, pa.timestamp("us")),
            "site": pa.array(np.array(site_ids, dtype=object)[result.site[patient]].tolist(), pa.string()),
            "true_risk": pa.array(risk, pa.float64()),
        }, schema=TRUTH_SCHEMA)
        pq.write_table(table, staging / "truth" / task / f"{chunk:04d}.parquet", compression="zstd")
    end = time.process_time()
    summary.cpu_seconds = end - cpu0
    summary.phase_cpu = {"simulate": cpu_sim - cpu0, "sort": cpu_sort - cpu_sim, "fhir": fhir_cpu,
                         "write": end - cpu_sort - fhir_cpu}
    return summary


MIN_CHUNKS, MIN_CHUNK_PATIENTS = 4, 5_000


def _chunks(patients: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(chunk index, size, first subject id) for every chunk.

    `chunk_size` is the largest chunk; a cohort that fits in one is still cut in up to
    `MIN_CHUNKS` chunks of about `MIN_CHUNK_PATIENTS` or more, so that the workers share it. The
    cut depends only on (patients, chunk_size), never on the number of workers, so the
    output does not either.
    """
    count = max(-(-patients // chunk_size), min(MIN_CHUNKS, -(-patients // MIN_CHUNK_PATIENTS)))
    base, extra = divmod(patients, count)
    out, first = [], 0
    for c in range(count):
        n = base + (1 if c < extra else 0)
        out.append((c, n, first + 1))
        first += n
    return out


def generate(cfg: GenerateConfig, out: Path, *, workers: int | None = None) -> GenerateSummary:
    """Generate the cohort of `cfg` under `out`; replaces a previous cohort there only on success."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = SimSpec.from_config(cfg)
    chunks = _chunks(cfg.patients, cfg.chunk_size)
    n_workers = max(1, min(workers or cfg.workers, len(chunks), os.cpu_count() or 1))
    staging = out / f".generate-staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        for task in TASKS:
            (staging / "truth" / task).mkdir(parents=True)
        summaries = _run_chunks(spec, chunks, staging, cfg.fhir, n_workers)
        result = _finish(cfg, spec, summaries, staging, n_workers, t0)
        _swap_into_place(staging, out, fhir=cfg.fhir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    return result


def _run_chunks(spec, chunks, staging: Path, fhir: bool, n_workers: int) -> list[ChunkSummary]:
    if n_workers == 1:
        _limit_threads()
        return [run_chunk(spec, c, n, first, staging, fhir) for c, n, first in chunks]
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=get_context("spawn"),
                             initializer=_limit_threads) as pool:
        futures = [pool.submit(run_chunk, spec, c, n, first, staging, fhir) for c, n, first in chunks]
        return [f.result() for f in futures]


def _finish(cfg: GenerateConfig, spec: SimSpec, summaries: list[ChunkSummary], staging: Path, n_workers: int,
            t0: float) -> GenerateSummary:
    site_ids = [s.site_id for s in cfg.sites]
    patients = {s: int(sum(len(c.subjects_by_site[s]) for c in summaries)) for s in site_ids}
    events = {s: int(sum(c.events_by_site[s] for c in summaries)) for s in site_ids}
    generator_info = {
        "generator": {
            "seed": cfg.seed, "patients": cfg.patients, "start": str(cfg.start), "end": str(cfg.end),
            "ideal": cfg.ideal, "realistic_codes": cfg.realistic_codes, "chunk_size": cfg.chunk_size,
            "drift": [{"site": d.site, "from": str(d.start), "kind": d.kind} for d in cfg.drift],
            "hazard_model": "docs/generator.md",
        },
    }
    for s, site in zip(site_ids, cfg.sites, strict=True):
        subjects = np.concatenate([c.subjects_by_site[s] for c in summaries]) if summaries else np.empty(0)
        codes = set().union(*(c.codes_by_site[s] for c in summaries))
        write_site_metadata(staging / "meds" / "sites" / s, site_id=s, subject_ids=subjects, codes=codes,
                            extra={**generator_info, "site": site.model_dump(mode="json")})
    truth_rows = {}
    for task in TASKS:
        truth_rows[task] = _merge_truth(staging / "truth" / task, staging / "truth" / f"{task}.parquet")
    summary = GenerateSummary(
        patients_by_site=patients, events_by_site=events, truth_rows=truth_rows,
        bundles=sum(c.bundles for c in summaries), deaths=sum(c.deaths for c in summaries),
        seconds=time.perf_counter() - t0, cpu_seconds=sum(c.cpu_seconds for c in summaries),
        chunks=len(summaries), workers=n_workers,
        extra={"phase_cpu_seconds": {k: round(sum(c.phase_cpu.get(k, 0.0) for c in summaries), 2)
                                     for k in ("simulate", "sort", "write", "fhir")}},
    )
    info = {**generator_info, "truth_rows": truth_rows, "tasks": {
        "complication_1y": {"horizon_days": 365, "outcomes": list(hazards.COMPLICATION_OUTCOMES)},
        "onset_2y": {"horizon_days": 730, "outcomes": list(hazards.ONSET_CONDITIONS)},
    }, "patients_by_site": patients, "events_by_site": events, "deaths": summary.deaths,
        "bundles": summary.bundles, "workers": n_workers, "chunks": len(summaries),
        "cpu_seconds": round(summary.cpu_seconds, 2), **summary.extra}
    (staging / "truth" / "generator.json").write_text(json.dumps(info, indent=2))
    return summary


def _merge_truth(parts_dir: Path, target: Path) -> int:
    """Concatenate the per-chunk truth parts (in chunk order) into one parquet file."""
    rows = 0
    with pq.ParquetWriter(target, TRUTH_SCHEMA, compression="zstd") as writer:
        for part in sorted(parts_dir.glob("*.parquet")):
            table = pq.read_table(part)
            rows += table.num_rows
            writer.write_table(table)
    shutil.rmtree(parts_dir)
    return rows


def _swap_into_place(staging: Path, out: Path, *, fhir: bool) -> None:
    """Replace the previous generated folders by the staged ones (a stale fhir/ goes too)."""
    for name in GENERATED:
        target = out / name
        if target.exists() and ((staging / name).exists() or name == "fhir"):
            shutil.rmtree(target)
    for name in GENERATED:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    if fhir and not (out / "fhir").exists():
        (out / "fhir").mkdir()
