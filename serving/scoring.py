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
tiers in `serve.explain_tiers`, and writes scores, patient facts (read off
the feature table) and the chunk's checkpoints in one transaction. A re-run
skips chunks already scored by the same model version (resumable) and
replaces rows by primary key (idempotent).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from chronorisk.data import codes as vocab
from chronorisk.data.meds_io import EVENT_SCHEMA
from chronorisk.errors import ChronoriskError, InputError
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

    @property
    def feature_names(self) -> list[str]:
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
    from chronorisk.data.fhir import convert
    from chronorisk.data.pseudonym import Pseudonymizer

    # a throwaway key: the subject id of an on-demand score is never stored or shown
    ctx = convert.BundleContext(Pseudonymizer(secrets.token_bytes(32)), {}, {})
    rows = bundle_rows(bundle, ctx, convert)
    subjects = {r[0] for r in rows}
    if len(subjects) > 1:
        raise InputError("fhir.entry", "one patient per request (the bundle references several patients)")
    if not rows:
        raise InputError("fhir.entry", "no convertible Patient, Encounter, Condition, Observation or MedicationRequest")
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
    return frame.with_columns(pl.col("time").cast(_US))


def bundle_rows(bundle: dict, ctx, convert) -> list[tuple]:
    """Rows of every convertible resource; a resource the converter rejects is a 4xx naming it."""
    entries = bundle.get("entry") or []
    ctx.reset_bundle()
    # transaction bundles reference the patient and medications by entry fullUrl (the maps ingestion
    # builds per bundle: data/fhir/worker.py `_index_bundle`)
    for entry in entries:
        res = entry.get("resource") or {}
        url, rid = entry.get("fullUrl"), res.get("id")
        if res.get("resourceType") == "Patient" and isinstance(url, str) and url:
            ctx.patient_urls[url] = rid if isinstance(rid, str) and rid else url.rsplit(":", 1)[-1]
        elif res.get("resourceType") == "Medication":
            for key in (url, f"Medication/{rid}" if isinstance(rid, str) else None):
                if isinstance(key, str):
                    ctx.medications[key] = res.get("code")
    rows: list[tuple] = []
    for i, entry in enumerate(entries):
        res = entry.get("resource") or {}
        converter = convert.CONVERTERS.get(res.get("resourceType"))
        if converter is None:
            continue
        try:
            if res.get("resourceType") == "Patient":
                rows.extend(convert.patient_rows(res, ctx, entry.get("fullUrl")))
            else:
                rows.extend(converter(res, ctx))
        except convert.Rejected as exc:
            raise InputError(f"fhir.entry[{i}].resource", f"{exc.category}: {exc.detail}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"fhir.entry[{i}].resource", f"cannot be read ({type(exc).__name__})") from None
    return rows


def check_event_frame(events: pl.DataFrame, prediction_time: datetime) -> None:
    """Patient-level checks the row validators cannot make (a birth after the prediction time)."""
    births = events.filter(pl.col("code") == vocab.BIRTH)["time"]
    if births.len() and births.min() is not None and births.min() > prediction_time:
        raise InputError("events", "MEDS_BIRTH is after the prediction time (a negative age)")


def features_from_events(model: ServedModel, events: pl.DataFrame, prediction_time: datetime):
    """(features frame or None, reason): None when the patient is not in the task population."""
    from chronorisk.features.labels import eligible_index
    from chronorisk.features.pipeline import transform

    lazy = events.lazy()
    index = eligible_index(lazy, model.task_def, [prediction_time]).collect()
    if index.height == 0:
        return None, "not in the task population at the prediction time"
    feats = transform(model.spec, lazy, index.lazy()).collect()
    return feats, None


def features_from_dict(model: ServedModel, values: dict[str, float | None]) -> np.ndarray:
    """One row of ready-made features in the model's column order (absent or null: NaN, not measured).

    A plain float64 row: the bundle scores it without building a 400-column frame per request."""
    get = values.get
    row = [get(n) for n in model.feature_names]
    return np.array([[np.nan if v is None else v for v in row]], dtype=np.float64)


def check_feature_names(models: Sequence[ServedModel], values: dict[str, float | None]) -> None:
    """Unknown names and impossible values of ready-made features are refused, naming the feature."""
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


_MEAS_VALUE = re.compile(r"^meas_(?P<m>[a-z0-9_]+?)_(last|mean_\d+d|min_\d+d|max_\d+d)$")
_NON_NEGATIVE_UNITS = {"days", "years", "measurements", "encounters", "prescriptions", "records"}


def impossible_feature_value(name: str, value: float, info) -> str | None:
    """Why a ready-made feature value cannot be true (None when it can): ranges from data/codes.py."""
    match = _MEAS_VALUE.match(name)
    if match and match["m"] in vocab.MEASUREMENTS:
        m = vocab.MEASUREMENTS[match["m"]]
        lo, hi = m.plausible
        if not lo <= value <= hi:
            return f"{value:g} {m.unit} is impossible for {m.display} (accepted {lo:g}-{hi:g} {m.unit})"
        return None
    if name == "demo_age_years" and not 0 <= value <= 130:
        return f"age {value:g} years is impossible (accepted 0-130)"
    unit = getattr(info, "unit", "") or ""
    if unit in _NON_NEGATIVE_UNITS and value < 0:
        return f"{value:g} {unit} is impossible (a {unit} value is never negative)"
    if unit == "fraction" and not 0 <= value <= 1:
        return f"{value:g} is impossible for a fraction (accepted 0-1)"
    if unit.startswith("1 = ") and value not in (0.0, 1.0):
        return f"{value:g} is impossible for a yes/no feature (accepted 0 or 1)"
    if "_std_" in name and value < 0:
        return "a standard deviation is never negative"
    return None


def predict(model: ServedModel, feats, *, explain: bool, top_k: int, prediction_time: datetime | None = None):
    """Risks, tiers and (if asked) factors of every row of `feats` (a frame, or an ordered float row
    matrix whose factors are dated from `prediction_time`)."""
    risk = np.asarray(model.bundle.predict_risk(feats), dtype=float)
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
) -> list[TaskResult]:
    """Score one patient for each task (from events or from ready-made features).

    `on_scored(model, features, risk, tiers)` is called per scored task (monitoring)."""
    chosen = [models[t] for t in tasks]
    if features is not None:
        check_feature_names(chosen, features)
    if events is not None:
        check_event_frame(events, prediction_time)
    results = []
    for model in chosen:
        if features is not None:
            feats, reason = features_from_dict(model, features), None
        else:
            feats, reason = features_from_events(model, events, prediction_time)
        if feats is None:
            results.append(TaskResult(model.task, False, reason, model_name=model.name, model_version=model.version))
            continue
        risk, tiers, factors = predict(model, feats, explain=explain, top_k=top_k, prediction_time=prediction_time)
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
    per chunk the features, predictions, site, time and model version; the
    monitoring log turns the subject id into a keyed join key and keeps no identifier.
    Shards are scored in chunks of up to `chunk_events` events; each chunk is
    one transaction and one checkpoint. `max_shards` stops after that many newly
    scored chunks (to test resumption).
    """
    from chronorisk.data.meds_io import site_ids

    if not models:
        raise ChronoriskError("no model to score with: train and promote a champion, or set serve.model_dir")
    chosen = list(sites) if sites else site_ids(meds_root)
    if not chosen:
        raise InputError("--meds", f"no MEDS sites under {meds_root}/sites")
    report = BatchReport(prediction_time)
    started = time.perf_counter()
    done = store.done_chunks(prediction_time)
    withdrawn = store.withdrawn_subjects()
    scored_shards = 0
    for site in chosen:
        shards = site_shards(meds_root, site)
        if not shards:
            raise InputError("--sites", f"site {site} has no MEDS data under {meds_root}")
        stats = report.sites.setdefault(site, {"scored": 0, "explained": 0, "chunks": 0, "skipped": 0})
        for shard in shard_chunks(shards, chunk_events):
            chunk = chunk_name(shard)
            todo = [m for m in models.values() if done.get((site, chunk, m.task)) != m.version]
            if not todo:
                report.skipped_chunks += 1
                stats["skipped"] += 1
                continue
            if max_shards is not None and scored_shards >= max_shards:
                return _finish(report, started)
            n, n_explained = _score_shard(
                store, todo, shard, site, chunk, prediction_time, withdrawn, explain_tiers, top_k, monitor
            )
            scored_shards += 1
            report.scored_chunks += 1
            stats["scored"] += n
            stats["explained"] += n_explained
            stats["chunks"] += 1
            if progress:
                progress(f"{site} {chunk}: {n} scores ({n_explained} explained)")
    return _finish(report, started)


def _finish(report: BatchReport, started: float) -> BatchReport:
    report.seconds = time.perf_counter() - started
    return report


def _score_shard(
    store: ScoreStore,
    models: Sequence[ServedModel],
    shard: Sequence[Path],
    site: str,
    chunk: str,
    prediction_time: datetime,
    withdrawn: set[int],
    explain_tiers: Sequence[str],
    top_k: int,
    monitor,
) -> tuple[int, int]:
    from chronorisk.features.labels import eligible_index
    from chronorisk.features.pipeline import transform

    # only what was recorded before the prediction time can matter (features, eligibility, facts)
    keep = pl.col("time").is_null() | (pl.col("time") < prediction_time)
    if withdrawn:
        keep &= ~pl.col("subject_id").is_in(list(withdrawn))
    events = pl.scan_parquet(list(shard)).select(list(EVENT_SCHEMA)).filter(keep).collect().lazy()
    scored_at = utcnow()
    score_rows: list[dict] = []
    checkpoints: list[dict] = []
    facts: list[pl.DataFrame] = []
    n_explained = 0
    summary = eligibility_events(events)
    for model in models:
        index = eligible_index(summary, model.task_def, [prediction_time]).collect()
        if index.height:
            mine = events.join(index.lazy().select("subject_id"), on="subject_id", how="semi")
            feats = transform(model.spec, mine, index.lazy()).collect()
            risk, tiers, _ = predict(model, feats, explain=False, top_k=top_k)
            tiers_arr = np.asarray(tiers)
            factors: list[str | None] = [None] * feats.height
            wanted = np.flatnonzero(np.isin(tiers_arr, list(explain_tiers)))
            if wanted.size:
                explained = model.bundle.explain(feats[wanted], top_k)
                for pos, f in zip(wanted.tolist(), explained, strict=True):
                    factors[pos] = to_json_factors(f)
                n_explained += int(wanted.size)
            ids = feats["subject_id"].to_list()
            facts.append(facts_from_features(model, feats, prediction_time))
            score_rows.extend(
                {
                    "site": site, "subject_id": sid, "task": model.task, "prediction_time": prediction_time,
                    "risk": float(r), "tier": t, "age_band": None, "model_name": model.name,
                    "model_version": model.version, "scored_at": scored_at, "factors": f,
                }
                for sid, r, t, f in zip(ids, risk.tolist(), tiers, factors, strict=True)
            )
            if monitor is not None:
                part = re.sub(r"[^A-Za-z0-9._=-]", "_", f"batch-{prediction_time:%Y%m%d}-{site}-{chunk}")[:120]
                monitor.batch(monitoring_records(model, feats, risk, tiers, site, prediction_time), model, part)
        checkpoints.append(
            {"prediction_time": prediction_time, "site": site, "chunk": chunk, "task": model.task,
             "model_version": model.version, "n_scored": index.height, "finished_at": utcnow()}
        )
    patient_rows, bands = _patient_rows(facts, site, prediction_time, scored_at)
    for row in score_rows:
        row["age_band"] = bands.get(row["subject_id"])
    store.write_chunk(score_rows, patient_rows, checkpoints)
    return len(score_rows), n_explained


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
    table (demographics and condition-present features), so no second pass over the events."""
    names = sorted(c.name for c in model.spec.conditions if f"cond_{c.name}_present" in feats.columns)
    flags = [pl.when(pl.col(f"cond_{n}_present") == 1).then(pl.lit(f"{n},")).otherwise(pl.lit("")) for n in names]
    age = pl.col("demo_age_years") if "demo_age_years" in feats.columns else pl.lit(None, dtype=pl.Float32)
    female = pl.col("demo_sex_female") if "demo_sex_female" in feats.columns else pl.lit(None, dtype=pl.Float32)
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


def _patient_rows(facts: list[pl.DataFrame], site, prediction_time, updated_at):
    if not facts:
        return [], {}
    table = pl.concat(facts, how="vertical").unique("subject_id", keep="first", maintain_order=True)
    rows, bands = [], {}
    for sid, sex, birth_year, band, conditions in table.iter_rows():
        bands[sid] = band
        rows.append({"site": site, "subject_id": sid, "sex": sex, "birth_year": birth_year,
                     "conditions": conditions, "as_of": prediction_time, "updated_at": updated_at})
    return rows, bands


def monitoring_records(
    model: ServedModel, feats, risk, tiers, site: str | None, prediction_time: datetime
) -> pl.DataFrame:
    """Rows for the monitoring log: features, prediction, site, time, model. The subject id (when
    there is one) is passed only so that the log can derive its keyed join key; it is never stored."""
    if isinstance(feats, np.ndarray):
        frame = pl.DataFrame(feats, schema=model.feature_names, orient="row")
    else:
        cols = [c for c in model.feature_names if c in feats.columns]
        if "subject_id" in feats.columns:
            cols = ["subject_id", *cols]
        frame = feats.select(cols)
    return frame.with_columns(
        pl.lit(site or "unknown").alias("site"),
        pl.lit(prediction_time).cast(_US).alias("prediction_time"),
        pl.Series("risk", np.asarray(risk, dtype=float)),
        pl.Series("tier", list(tiers), dtype=pl.String),
    )


def subject_events(meds_root: Path | None, site: str, subject_id: int) -> pl.DataFrame | None:
    """One subject's events from a site's MEDS data (for explanations on demand); None if unavailable."""
    from chronorisk.data.meds_io import scan_site, site_root

    if meds_root is None or not (site_root(meds_root, site) / "data").is_dir():
        return None
    return scan_site(meds_root, site).filter(pl.col("subject_id") == subject_id).collect()
