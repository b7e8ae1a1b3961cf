"""Scoring: patient events / FHIR / ready-made features -> risk, tier and factors.

A plain module used by the service (one patient per request) and by
`chronorisk score` (every eligible patient of every site at a date). Feature
logic lives in `chronorisk.features` and model logic in `chronorisk.models`;
this module only wires them: the same `transform` that training used, the
same bundle's calibrated `predict_risk`, `tier` and `explain`.

Batch scoring walks each site's MEDS shards (a subject lives in exactly one
shard) in chunks of consecutive shards: per chunk it reads the events before
the prediction time once, decides every task's eligibility from first/last
times, computes features per task, predicts vectorized, explains only the
tiers in `serve.explain_tiers`, and builds the rows as frames (no per-row
Python). A background thread writes each chunk while the next one is
computed: its monitoring-log part (a fixed name per chunk), then scores,
patient facts (read off the feature table) and the chunk's checkpoints in
one transaction. A re-run skips chunks already scored by the same model
version (resumable) and replaces rows by primary key (idempotent).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from chronorisk.caching import IdentityCache
from chronorisk.data import codes as vocab
from chronorisk.data.meds_io import EVENT_SCHEMA
from chronorisk.errors import ChronoriskError, InputError
from chronorisk.frames import pick_columns
from chronorisk.serving.patient_batch import PatientBatcher
from chronorisk.serving.store import ScoreStore, to_json_factors, utcnow

log = logging.getLogger(__name__)

_US = pl.Datetime("us")


# -- models ---------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """One task's champion bundle and what scoring needs from it."""

    task: str
    bundle: object  # chronorisk.models.ModelBundle
    name: str
    version: str

    @property
    def spec(self):
        return self.bundle.spec

    @property
    def task_def(self):
        return self.bundle.task

    @cached_property
    def feature_names(self) -> list[str]:
        """The model's column order, built once (every request lays its features out in it)."""
        return list(self.bundle.spec.feature_names)


def _bundle_meta(bundle, key: str, default: str) -> str:
    meta = getattr(bundle, "metadata", None)
    if isinstance(meta, dict) and meta.get(key) is not None:
        return str(meta[key])
    value = getattr(bundle, key, None)
    if value is None and meta is not None:
        value = getattr(meta, key, None)
    return str(value) if value is not None else default


def served_model(task: str, bundle) -> ServedModel:
    return ServedModel(
        task=task,
        bundle=bundle,
        name=_bundle_meta(bundle, "name", f"chronorisk-{task}"),
        version=_bundle_meta(bundle, "version", "unversioned"),
    )


def load_models(
    tasks: Sequence[str],
    *,
    source: str = "registry",
    model_dir: Path | str | None = None,
    alias: str = "champion",
    required: bool = False,
    work: Path | None = None,
    tracking_uri: str | None = None,
) -> dict[str, ServedModel]:
    """Each task's bundle, from an exported folder (`<model_dir>/<task>/`) or the MLflow registry
    (`tracking_uri`, else the work folder's embedded backend).

    A task without a model is skipped with a warning (the service still serves
    stored scores), unless `required`.
    """
    models: dict[str, ServedModel] = {}
    try:
        from chronorisk.models.bundle import ModelBundle
    except ImportError as exc:
        if required:
            raise ChronoriskError(f"the models package cannot be imported ({exc.name})") from None
        log.warning("no models: the models package cannot be imported")
        return models
    for task in tasks:
        try:
            if source == "folder":
                if model_dir is None:
                    raise InputError("serve.model_dir", "model_source is 'folder' but no model_dir is set")
                path = Path(model_dir) / task
                if not path.is_dir():
                    raise InputError("serve.model_dir", f"no exported model for task {task} at {path}")
                models[task] = served_model(task, ModelBundle.load(path))
            else:
                from chronorisk.paths import WorkPaths
                from chronorisk.training.registry import fetch_bundle

                paths = WorkPaths(Path(work)) if work is not None else None
                folder, registered = fetch_bundle(task, alias, paths=paths, tracking_uri=tracking_uri)
                models[task] = ServedModel(task, ModelBundle.load(folder), registered.name, str(registered.version))
        except ChronoriskError as exc:
            if required:
                raise
            log.warning("task %s: no model loaded (%s)", task, exc)
            continue
        log.info("task %s: serving %s version %s", task, models[task].name, models[task].version)
    return models


# -- one patient ----------------------------------------------------------------------------


@dataclass
class TaskResult:
    task: str
    eligible: bool
    reason: str | None = None
    risk: float | None = None
    tier: str | None = None
    factors: list[dict] | None = None
    model_name: str | None = None
    model_version: str | None = None

    def as_dict(self) -> dict:
        return {
            "task": self.task, "eligible": self.eligible, "reason": self.reason, "risk": self.risk,
            "tier": self.tier, "factors": self.factors, "model_name": self.model_name,
            "model_version": self.model_version,
        }


def events_frame(rows: Sequence[dict], subject_id: int = 0) -> pl.DataFrame:
    """Validated event dicts (time, code, numeric_value, text_value) -> MEDS events of one subject."""
    data = {
        "subject_id": [subject_id] * len(rows),
        "time": [r.get("time") for r in rows],
        "code": [r["code"] for r in rows],
        "numeric_value": [r.get("numeric_value") for r in rows],
        "text_value": [r.get("text_value") for r in rows],
    }
    return pl.DataFrame(data, schema=EVENT_SCHEMA)


def fhir_events(bundle: dict) -> pl.DataFrame:
    """A FHIR R4 bundle of one patient -> MEDS events, or InputError naming the first bad entry."""
    return fhir_record(bundle).events


@dataclass(frozen=True)
class FhirRecord:
    """One patient's FHIR bundle as MEDS events, and which entry (type, logical id) gave each code."""

    events: pl.DataFrame
    sources: dict[str, list[tuple[str, str, int | None]]]  # MEDS code -> [(type, id, time in µs)], ids only
    patient_id: str | None  # the Patient's logical id, when the bundle has one


def fhir_record(bundle: dict, field: str = "fhir") -> FhirRecord:
    """Convert a bundle with the ingestion's converter (`data/fhir/bundle.py`): InputError naming the
    first entry it cannot convert, or a bundle of several (or no) patients."""
    from chronorisk.data.fhir.bundle import EntryRejected, strict_bundle_entries
    from chronorisk.data.fhir.convert import BundleContext
    from chronorisk.data.pseudonym import Pseudonymizer

    # a throwaway key: the subject id of an on-demand score is never stored or shown
    ctx = BundleContext(Pseudonymizer(secrets.token_bytes(32)), {}, {})
    try:
        converted = strict_bundle_entries(bundle, ctx)
    except EntryRejected as exc:
        raise InputError(f"{field}.entry[{exc.index}].resource", f"{exc.category}: {exc.detail}") from None
    rows = [row for entry in converted for row in entry.rows]
    if len({r[0] for r in rows}) > 1:
        raise InputError(f"{field}.entry", "one patient per request (the bundle references several patients)")
    if not rows:
        raise InputError(f"{field}.entry",
                         "no convertible Patient, Encounter, Condition, Observation or MedicationRequest")
    sources: dict[str, list[tuple[str, str, int | None]]] = {}
    for entry in converted:
        if entry.resource_id and entry.resource_type in ("Observation", "Condition", "MedicationRequest"):
            for code, when in dict.fromkeys((r[2], r[1]) for r in entry.rows):
                sources.setdefault(code, []).append((entry.resource_type, entry.resource_id, when))
    patient_id = next((e.resource_id for e in converted if e.resource_type == "Patient"), None)
    frame = pl.DataFrame(
        {
            "subject_id": [0] * len(rows),
            "time": [r[1] for r in rows],
            "code": [r[2] for r in rows],
            "numeric_value": [r[3] for r in rows],
            "text_value": [r[4] for r in rows],
        },
        schema={"subject_id": pl.Int64, "time": pl.Int64, "code": pl.String, "numeric_value": pl.Float32,
                "text_value": pl.String},
    )
    return FhirRecord(frame.with_columns(pl.col("time").cast(_US)), sources, patient_id)


def check_event_frame(events: pl.DataFrame, prediction_time: datetime) -> None:
    """Patient-level checks the row validators cannot make (a birth after the prediction time)."""
    births = events.get_column("time").filter(events.get_column("code") == vocab.BIRTH)  # eager: no plan
    if births.len() and births.min() is not None and births.min() > prediction_time:
        raise InputError("events", "MEDS_BIRTH is after the prediction time (a negative age)")


NOT_ELIGIBLE = "not in the task population at the prediction time"
PATIENTS = PatientBatcher()  # this process's one-patient requests, run together when they come at once


def features_from_events(model: ServedModel, events: pl.DataFrame, prediction_time: datetime):
    """(features frame or None, reason): None when the patient is not in the task population."""
    feats = features_of_events([model], events, eligible_indexes([model], events, prediction_time))[0]
    return (feats, None) if feats is not None else (None, NOT_ELIGIBLE)


def features_of_events(models: Sequence[ServedModel], events: pl.DataFrame, indexes: Sequence[pl.DataFrame]):
    """Each model's feature frame from the events (one patient's, or a few patients' run together); None
    where no one is in that task's population. The batch transform on frames in memory (`transform_frame`):
    for a few patients the plan around it, not the arithmetic, would be most of the cost."""
    from chronorisk.features.pipeline import transform_frame

    return [transform_frame(model.spec, events, index) if index.height else None
            for model, index in zip(models, indexes, strict=True)]


def eligible_indexes(models: Sequence[ServedModel], events: pl.DataFrame,
                     prediction_time: datetime | Sequence[datetime]):
    """Every task's eligible index of these events at the prediction time(s), from one subject table of the
    events (one pass, not one per task)."""
    from chronorisk.features import labels
    from chronorisk.features.pipeline import run_options

    times = [prediction_time] if isinstance(prediction_time, datetime) else list(prediction_time)
    return labels.eligible_indexes(events, [m.task_def for m in models], times, **run_options(1))


def features_from_dict(model: ServedModel, values: dict[str, float | None]) -> np.ndarray:
    """One row of ready-made features in the model's column order (absent or null: NaN, not measured).

    A plain float64 row: the bundle scores it without building a 400-column frame per request."""
    return np.array(list(map(values.get, model.feature_names)), dtype=np.float64).reshape(1, -1)


def check_feature_names(models: Sequence[ServedModel], values: dict[str, float | None]) -> None:
    """Unknown names and impossible values of ready-made features are refused, naming the feature.

    Checked at once against bounds prepared per set of models; only a request that fails is walked
    feature by feature, for the message of its first problem."""
    if not values:
        return
    bounds = feature_bounds(models)
    if values.keys() - bounds.position.keys():
        _first_feature_problem(models, values)
    idx = np.fromiter(map(bounds.position.__getitem__, values), dtype=np.intp, count=len(values))
    v = np.array(list(values.values()), dtype=np.float64)
    bad = (v < bounds.lo[idx]) | (v > bounds.hi[idx]) | (bounds.binary[idx] & (v != 0) & (v != 1))
    if (bad & ~np.isnan(v)).any():
        _first_feature_problem(models, values)


@dataclass(frozen=True)
class FeatureBounds:
    """Accepted range of every feature of a set of models (`impossible_feature_value` as arrays)."""

    position: dict[str, int]
    lo: np.ndarray
    hi: np.ndarray
    binary: np.ndarray


_BOUNDS = IdentityCache(32)  # models -> FeatureBounds


def feature_bounds(models: Sequence[ServedModel]) -> FeatureBounds:
    """The bounds of these models' features, cached (a service asks for the same few task sets)."""
    hit = _BOUNDS.get(models)
    if hit is not None:
        return hit
    infos: dict = {}
    for m in models:
        infos.update(m.spec.features)
    rows = [feature_range(name, info) for name, info in infos.items()]
    bounds = FeatureBounds(
        position={name: i for i, name in enumerate(infos)},
        lo=np.array([r[0] for r in rows], dtype=np.float64),
        hi=np.array([r[1] for r in rows], dtype=np.float64),
        binary=np.array([r[2] for r in rows], dtype=bool),
    )
    return _BOUNDS.put(models, None, bounds)


def feature_range(name: str, info) -> tuple[float, float, bool]:
    """(lowest, highest, yes/no only) accepted value of a feature, from its spec entry (bounds, kind):
    the rules of `impossible_feature_value`."""
    lo, hi = info.bounds if info.bounds is not None else (-np.inf, np.inf)
    return float(lo), float(hi), info.kind in _YES_NO_KINDS


_YES_NO_KINDS = frozenset({"binary", "category"})


def _first_feature_problem(models: Sequence[ServedModel], values: dict[str, float | None]) -> None:
    """Raise InputError for the first unknown or impossible feature, in the request's order."""
    infos: dict = {}
    for m in models:
        infos.update(m.spec.features)
    for name, value in values.items():
        info = infos.get(name)
        if info is None:
            raise InputError(f"features.{name[:80]}", "unknown feature for the requested tasks")
        if value is not None:
            problem = impossible_feature_value(name, float(value), info)
            if problem:
                raise InputError(f"features.{name}", problem)


def impossible_feature_value(name: str, value: float, info) -> str | None:
    """Why a ready-made feature value cannot be true (None when it can), from the feature's spec entry:
    its bounds (measurement ranges come from data/codes.py) and its kind."""
    lo, hi, yes_no = feature_range(name, info)
    if yes_no and value not in (0.0, 1.0):
        return f"{value:g} is impossible for a yes/no feature (accepted 0 or 1)"
    if lo <= value <= hi:
        return None
    what = info.concept_display or info.display
    unit = f" {info.unit}" if info.unit and not info.unit.startswith("1 = ") else ""
    if info.kind == "age":
        return f"age {value:g} years is impossible (accepted {lo:g}-{hi:g})"
    if lo == 0 and value < 0:
        return f"{value:g}{unit} is impossible for {what} (never negative)"
    return f"{value:g}{unit} is impossible for {what} (accepted {lo:g}-{hi:g}{unit})"


def predict(model: ServedModel, feats, *, explain: bool, top_k: int, prediction_time: datetime | None = None,
            site: str | None = None):
    """Risks, tiers and (if asked) factors of every row of `feats` (a frame, or an ordered float row
    matrix whose factors are dated from `prediction_time`); `site` picks the model's site recalibration."""
    risk = np.asarray(model.bundle.predict_risk(feats, site=site), dtype=float)
    tiers = [str(t) for t in model.bundle.tier(risk)]
    factors = None
    if explain:
        when = prediction_time if isinstance(feats, np.ndarray) else None
        factors = model.bundle.explain(feats, top_k, prediction_time=when)
    return risk, tiers, factors


def score_one(
    models: dict[str, ServedModel],
    tasks: Sequence[str],
    *,
    events: pl.DataFrame | None = None,
    features: dict[str, float | None] | None = None,
    prediction_time: datetime,
    explain: bool = True,
    top_k: int = 5,
    on_scored: Callable | None = None,
    site: str | None = None,
) -> list[TaskResult]:
    """Score one patient for each task (from events or from ready-made features).

    `on_scored(model, features, risk, tiers)` is called per scored task (monitoring)."""
    chosen = [models[t] for t in tasks]
    if features is not None:
        check_feature_names(chosen, features)
    from_events = None
    if events is not None:
        check_event_frame(events, prediction_time)
        from_events = PATIENTS.features(chosen, events, prediction_time)  # with concurrent requests
    results = []
    for i, model in enumerate(chosen):
        if features is not None:
            feats, reason = features_from_dict(model, features), None
        else:
            feats = from_events[i]
            reason = None if feats is not None else NOT_ELIGIBLE
        if feats is None:
            results.append(TaskResult(model.task, False, reason, model_name=model.name, model_version=model.version))
            continue
        risk, tiers, factors = predict(model, feats, explain=explain, top_k=top_k, prediction_time=prediction_time,
                                       site=site)
        if on_scored is not None:
            on_scored(model, feats, risk, tiers)
        results.append(
            TaskResult(
                model.task, True, None, float(risk[0]), tiers[0],
                factors[0] if factors is not None else None, model.name, model.version,
            )
        )
    return results


# -- every patient of every site ------------------------------------------------------------


@dataclass
class BatchReport:
    prediction_time: datetime
    sites: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    skipped_chunks: int = 0
    scored_chunks: int = 0

    def total(self, key: str = "scored") -> int:
        return sum(s.get(key, 0) for s in self.sites.values())


def site_shards(meds_root: Path, site: str) -> list[Path]:
    from chronorisk.data.meds_io import site_root

    data = site_root(meds_root, site) / "data"
    return sorted(data.glob("**/*.parquet"))


def shard_chunks(shards: Sequence[Path], max_events: int) -> list[list[Path]]:
    """Consecutive shards grouped up to `max_events` rows (parquet metadata): fewer, larger feature
    runs, whose fixed cost is then paid once per chunk rather than once per small shard."""
    import pyarrow.parquet as pq

    chunks: list[list[Path]] = []
    current: list[Path] = []
    size = 0
    for shard in shards:
        rows = pq.ParquetFile(shard).metadata.num_rows
        if current and size + rows > max_events:
            chunks.append(current)
            current, size = [], 0
        current.append(shard)
        size += rows
    if current:
        chunks.append(current)
    return chunks


def chunk_name(chunk: Sequence[Path]) -> str:
    """A stable name of a chunk of shards (its first and last shard, relative to the site)."""
    first = str(chunk[0].relative_to(chunk[0].parents[1]))
    if len(chunk) == 1:
        return first
    return f"{first}..{chunk[-1].relative_to(chunk[-1].parents[1])}"


def batch_score(
    store: ScoreStore,
    models: dict[str, ServedModel],
    meds_root: Path,
    prediction_time: datetime,
    *,
    sites: Sequence[str] | None = None,
    explain_tiers: Sequence[str] = ("medium", "high"),
    top_k: int = 5,
    monitor=None,
    progress: Callable[[str], None] | None = None,
    max_shards: int | None = None,
    chunk_events: int = 10_000_000,
) -> BatchReport:
    """Score every eligible patient of every site at `prediction_time` into the store.

    `monitor.batch(records, model, part)` (serving.state.MonitoringSink) receives
    per chunk the features, predictions, site, time and model version, under a
    fixed part name per chunk (a re-run replaces the file); the monitoring log
    turns the subject id into a keyed join key and keeps no identifier.
    Shards are scored in chunks of up to `chunk_events` events; each chunk is
    one transaction and one checkpoint, written by a background thread while
    the next chunk's features are computed. `max_shards` stops after that many
    newly scored chunks (to test resumption).
    """
    from chronorisk.data.meds_io import site_ids

    if not models:
        raise ChronoriskError("no model to score with: train and promote a champion, or set serve.model_dir")
    chosen = list(sites) if sites else site_ids(meds_root)
    if not chosen:
        raise InputError("--meds", f"no MEDS sites under {meds_root}/sites")
    report = BatchReport(prediction_time)
    started = time.perf_counter()
    plan = _chunk_plan(store, models, meds_root, chosen, prediction_time, chunk_events, report)
    withdrawn = store.withdrawn_subjects()
    with ChunkWriter(store, monitor) as chunk_writer:
        for site, shard, todo in plan:
            if max_shards is not None and report.scored_chunks >= max_shards:
                break
            scored = score_chunk(todo, shard, site, prediction_time, withdrawn, explain_tiers, top_k,
                                 keep_features=monitor is not None)
            chunk_writer.submit(scored)
            stats = report.sites[site]
            report.scored_chunks += 1
            stats["scored"] += scored.n_scored
            stats["explained"] += scored.n_explained
            stats["chunks"] += 1
            if progress:
                progress(f"{site} {scored.chunk}: {scored.n_scored} scores ({scored.n_explained} explained)")
    report.seconds = time.perf_counter() - started
    return report


def _chunk_plan(store, models, meds_root, sites, prediction_time, chunk_events, report) -> list[tuple]:
    """(site, shards, models to run) of every chunk not yet scored by the current model versions;
    chunks already done are counted as skipped (the resumable part of a re-run)."""
    done = store.done_chunks(prediction_time)
    plan = []
    for site in sites:
        shards = site_shards(meds_root, site)
        if not shards:
            raise InputError("--sites", f"site {site} has no MEDS data under {meds_root}")
        stats = report.sites.setdefault(site, {"scored": 0, "explained": 0, "chunks": 0, "skipped": 0})
        for shard in shard_chunks(shards, chunk_events):
            chunk = chunk_name(shard)
            todo = [m for m in models.values() if done.get((site, chunk, m.task)) != m.version]
            if todo:
                plan.append((site, shard, todo))
            else:
                report.skipped_chunks += 1
                stats["skipped"] += 1
    return plan


@dataclass
class ScoredChunk:
    """One chunk's results, ready to write: store rows as frames, checkpoints, monitoring inputs."""

    site: str
    chunk: str
    scores: pl.DataFrame
    patients: pl.DataFrame
    checkpoints: list[dict]
    monitoring: list[tuple]  # (model, features, risk, tiers, input checks) per task, when a monitor is attached
    n_explained: int = 0

    @property
    def n_scored(self) -> int:
        return self.scores.height

    @property
    def part(self) -> str:
        """The monitoring log's part name of this chunk: the same on a re-run, so its file is replaced."""
        return re.sub(r"[^A-Za-z0-9._=-]", "_", f"batch-{self.checkpoints[0]['prediction_time']:%Y%m%d}-"
                      f"{self.site}-{self.chunk}")[:120]


class ChunkWriter:
    """Writes scored chunks (monitoring log, then the store with the checkpoint) on one background
    thread, so that writing chunk i overlaps the features of chunk i+1 (polars, LightGBM, SQLite
    and parquet writes all run outside the GIL). `submit` waits for the previous write first: at
    most one chunk is pending, and a failed write surfaces at the next submit or at exit."""

    def __init__(self, store: ScoreStore, monitor=None):
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self.monitor = monitor
        # an in-memory SQLite database exists once per connection (thread): write on the caller's
        self._pool = None if store.in_memory() else ThreadPoolExecutor(1, thread_name_prefix="chunk-writer")
        self._pending = None

    def submit(self, scored: ScoredChunk) -> None:
        self.wait()
        if self._pool is None:
            self._write(scored)
        else:
            self._pending = self._pool.submit(self._write, scored)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, scored: ScoredChunk) -> None:
        # the log first: a checkpointed chunk (skipped by a re-run) always has its monitoring rows
        if self.monitor is not None:
            for model, feats, risk, tiers, checks in scored.monitoring:
                records = monitoring_records(model, feats, risk, tiers, scored.site, scored.checkpoints[0]
                                             ["prediction_time"])
                self.monitor.batch(records, model, scored.part)
                log_input_checks(self.monitor.log, checks, model.task, scored.site, scored.part)
        self.store.write_chunk(scored.scores, scored.patients, scored.checkpoints)

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:  # the run already failed: let the pending chunk finish, keep the first error
                try:
                    self.wait()
                except Exception as late:
                    log.warning("the last chunk's write failed too (%s)", type(late).__name__)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def score_chunk(
    models: Sequence[ServedModel],
    shard: Sequence[Path],
    site: str,
    prediction_time: datetime,
    withdrawn: set[int],
    explain_tiers: Sequence[str],
    top_k: int,
    *,
    keep_features: bool = False,
) -> ScoredChunk:
    """Features, risks, tiers, stored factors and patient facts of one chunk of shards, as frames.

    Everything is columnar (no per-row Python except the JSON of stored explanations); the chunk's
    events are read once and every task shares the eligibility summary."""
    from chronorisk.features.labels import eligible_index
    from chronorisk.features.pipeline import transform
    from chronorisk.features.vocabulary import input_checks

    # only what was recorded before the prediction time can matter (features, eligibility, facts)
    keep = pl.col("time").is_null() | (pl.col("time") < prediction_time)
    if withdrawn:
        keep &= ~pl.col("subject_id").is_in(list(withdrawn))
    events = pl.scan_parquet(list(shard)).select(list(EVENT_SCHEMA)).filter(keep).collect().lazy()
    scored_at = utcnow()
    summary = eligibility_events(events)
    frames, facts, checkpoints, monitoring = [], [], [], []
    n_explained = 0
    for model in models:
        index = eligible_index(summary, model.task_def, [prediction_time]).collect()
        if index.height:
            mine = events.join(index.lazy().select("subject_id"), on="subject_id", how="semi")
            feats = transform(model.spec, mine, index.lazy()).collect()
            risk, tiers, _ = predict(model, feats, explain=False, top_k=top_k, site=site)
            factors, explained = stored_factors(model, feats, tiers, explain_tiers, top_k)
            n_explained += explained
            facts.append(facts_from_features(model, feats, prediction_time))
            frames.append(pl.DataFrame({
                "subject_id": feats["subject_id"], "risk": pl.Series(risk, dtype=pl.Float64),
                "tier": pl.Series(tiers, dtype=pl.String), "factors": factors,
            }).with_columns(pl.lit(model.task, dtype=pl.String).alias("task"),
                            pl.lit(model.name, dtype=pl.String).alias("model_name"),
                            pl.lit(model.version, dtype=pl.String).alias("model_version")))
            if keep_features:
                monitoring.append((model, feats, risk, tiers, input_checks(model.spec, mine, index)))
        checkpoints.append(
            {"prediction_time": prediction_time, "site": site, "chunk": chunk_name(shard), "task": model.task,
             "model_version": model.version, "n_scored": index.height, "finished_at": utcnow()}
        )
    patients = patient_frame(facts, site, prediction_time, scored_at)
    return ScoredChunk(site, chunk_name(shard), score_frame(frames, patients, site, prediction_time, scored_at),
                       patients, checkpoints, monitoring, n_explained)


def stored_factors(model: ServedModel, feats: pl.DataFrame, tiers, explain_tiers: Sequence[str],
                   top_k: int) -> tuple[pl.Series, int]:
    """JSON factors of the rows whose tier is stored with its explanation (null elsewhere: those
    are computed on demand), and how many were explained."""
    factors: list[str | None] = [None] * feats.height
    wanted = np.flatnonzero(np.isin(np.asarray(tiers, dtype=object), list(explain_tiers))) if explain_tiers else []
    if len(wanted):
        for pos, f in zip(wanted.tolist(), model.bundle.explain(feats[wanted], top_k), strict=True):
            factors[pos] = to_json_factors(f)
    return pl.Series("factors", factors, dtype=pl.String), len(wanted)


def score_frame(frames: list[pl.DataFrame], patients: pl.DataFrame, site: str, prediction_time: datetime,
                scored_at: datetime) -> pl.DataFrame:
    """The chunk's `scores` rows in the table's column order, in primary-key order (B-tree friendly),
    with each subject's age band from its facts."""
    from chronorisk.serving.store import scores

    if not frames:
        return pl.DataFrame(schema={c.name: pl.Null for c in scores.columns})
    table = pl.concat(frames, how="vertical_relaxed").join(
        patients.select("subject_id", "age_band"), on="subject_id", how="left"
    )
    return table.with_columns(
        pl.lit(site, dtype=pl.String).alias("site"),
        pl.lit(prediction_time).cast(_US).alias("prediction_time"),
        pl.lit(scored_at).cast(_US).alias("scored_at"),
    ).select([c.name for c in scores.columns]).sort("subject_id", "task")


def patient_frame(facts: list[pl.DataFrame], site: str, prediction_time: datetime,
                  updated_at: datetime) -> pl.DataFrame:
    """One `patients` row per scored subject (the first task's facts), plus the age band the scores
    carry."""
    if not facts:
        return pl.DataFrame(schema={"site": pl.String, "subject_id": pl.Int64, "sex": pl.String,
                                    "birth_year": pl.Int32, "conditions": pl.String, "as_of": _US,
                                    "updated_at": _US, "age_band": pl.String})
    table = pl.concat(facts, how="vertical").unique("subject_id", keep="first", maintain_order=True)
    return table.with_columns(
        pl.lit(site, dtype=pl.String).alias("site"),
        pl.lit(prediction_time).cast(_US).alias("as_of"),
        pl.lit(updated_at).cast(_US).alias("updated_at"),
    ).select("site", "subject_id", "sex", "birth_year", "conditions", "as_of", "updated_at",
             "age_band").sort("subject_id")


def eligibility_events(events: pl.LazyFrame) -> pl.LazyFrame:
    """The first and the last time of each (subject, code): all that task eligibility reads.

    `features.labels.eligible_index` decides from one table per subject (birth, death, first and
    last event, first time of each concept), i.e. from minimum and maximum times, which these two
    rows per code preserve; computed once per chunk and shared by every task, it is several times
    smaller than the events. A test checks that the index is the same as from the full events.
    """
    return (
        events.filter(pl.col("time").is_not_null())
        .group_by("subject_id", "code")
        .agg(pl.col("time").min().alias("first"), pl.col("time").max().alias("last"))
        .unpivot(index=["subject_id", "code"], on=["first", "last"], value_name="time")
        .select("subject_id", "time", "code")
        .collect()
        .lazy()
    )


def facts_from_features(model: ServedModel, feats: pl.DataFrame, prediction_time: datetime) -> pl.DataFrame:
    """Per scored subject: sex, birth year, age band and recorded conditions, read off the feature
    table (the spec's age, sex and condition-present features), so no second pass over the events."""
    spec = model.spec
    present = set(feats.columns)
    conditions = sorted(
        (spec.features[n].concept, n) for n in spec.features_where(family="conditions", aggregate="present")
        if n in present
    )
    flags = [pl.when(pl.col(n) == 1).then(pl.lit(f"{c},")).otherwise(pl.lit("")) for c, n in conditions]
    age = _fact_column(spec.features_where(kind="age"), present)
    female = _fact_column(spec.features_where(concept="sex", kind="binary"), present)
    born = pl.lit(prediction_time).cast(_US) - pl.duration(microseconds=(age.cast(pl.Float64) * 365.25 * 86_400e6)
                                                            .cast(pl.Int64))
    band = pl.when(age < 0).then(None)
    for low, label in ((18, "0-17"), (30, "18-29"), (40, "30-39"), (50, "40-49"), (60, "50-59"), (70, "60-69"),
                       (80, "70-79")):
        band = band.when(age < low).then(pl.lit(label))
    band = band.when(age >= 80).then(pl.lit("80+")).otherwise(None)
    return feats.select(
        "subject_id",
        pl.when(female == 1).then(pl.lit("F")).when(female == 0).then(pl.lit("M")).otherwise(None).alias("sex"),
        born.dt.year().cast(pl.Int32).alias("birth_year"),
        band.alias("age_band"),
        pl.concat_str([pl.lit(","), *flags]).alias("conditions"),
    )


def _fact_column(names: tuple[str, ...], present: set[str]) -> pl.Expr:
    """The first of `names` that the feature table holds, else a null column."""
    found = [n for n in names if n in present]
    return pl.col(found[0]) if found else pl.lit(None, dtype=pl.Float32)


def monitoring_records(
    model: ServedModel, feats, risk, tiers, site: str | None, prediction_time: datetime
) -> pl.DataFrame:
    """Rows for the monitoring log: features, prediction, site, time, model. The subject id (when
    there is one) is passed only so that the log can derive its keyed join key; it is never stored."""
    if isinstance(feats, np.ndarray):
        frame = pl.DataFrame(feats, schema=model.feature_names, orient="row")
    else:
        present = set(feats.columns)  # `columns` builds a new list on each access
        cols = [c for c in model.feature_names if c in present]
        if "subject_id" in present:
            cols = ["subject_id", *cols]
        frame = pick_columns(feats, cols)
    return frame.with_columns(
        pl.lit(site or "unknown").alias("site"),
        pl.lit(prediction_time).cast(_US).alias("prediction_time"),
        pl.Series("risk", np.asarray(risk, dtype=float)),
        pl.Series("tier", list(tiers), dtype=pl.String),
    )


def log_input_checks(prediction_log, checks: pl.DataFrame | None, task: str, site: str | None,
                     part: str | None = None) -> None:
    """Store a scoring's input checks (`features.vocabulary.input_checks`) beside its monitoring rows; like
    the log itself, a failure is logged (its class only) and never fails a score."""
    if checks is None or checks.height == 0:
        return
    try:
        prediction_log.append_input_checks(checks, task, site or "unknown", part)
    except Exception as exc:
        log.warning("prediction log: input checks append failed (%s)", type(exc).__name__)


def subject_events(meds_root: Path | None, site: str, subject_id: int) -> pl.DataFrame | None:
    """One subject's events from a site's MEDS data (for explanations on demand); None if unavailable."""
    from chronorisk.data.meds_io import scan_site, site_root

    if meds_root is None or not (site_root(meds_root, site) / "data").is_dir():
        return None
    return scan_site(meds_root, site).filter(pl.col("subject_id") == subject_id).collect()
