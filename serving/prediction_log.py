"""Append-only log of every score, for drift and performance monitoring.

Why a log of its own: the score store answers "what is this patient's risk";
monitoring asks "how do this week's inputs and outputs at site X compare
with what the model was trained on", which needs the model's *features* and
no identity at all. So every scored request and every batch score is
appended here with its features, risk, tier, site, task, time scored,
prediction time, model name and version, and never an identifier.

Layout (under `<work>/monitoring/`)::

    log/task=<task>/date=<YYYY-MM-DD>/part-<id>.parquet      scores
    input_checks/task=<task>/date=<YYYY-MM-DD>/part-<id>.parquet
                                                             impossible input values
    outcomes/task=<task>/part-<id>.parquet                   delayed labels

Input checks: per (site, prediction day, code) the numbers the scored rows'
features read and how many of them were dropped as impossible, with the
median of those dropped (`features.vocabulary.input_checks`, one rule for
every scoring path). Counts only, no identifiers; written with the same part
name as the scores they go with, so a re-scored chunk replaces both.

`date` is the calendar date of `prediction_time` (the as-of time of the
features; for a live request it is the time scored, for a backfill it is the
historical date), so a monitoring window reads only its own partitions.
Each part file is written whole or not at all (`atomic_output`). Batch
scoring passes a deterministic `part` name (e.g. `batch-<date>-<site>-<chunk>`),
so re-scoring a chunk replaces its file instead of adding a duplicate; live
requests get a random part name, buffered by `BufferedPredictionLog` so that
one request does not make one file.

Delayed labels without identifiers: a row carries `join_key`, a keyed
one-way hash (BLAKE2b-128 keyed MAC) of `subject_id` and `prediction_time`.
The key is the monitoring key (env `CHRONORISK_MONITORING_KEY`, else the file
`<work>/secrets/monitoring.key`, created with mode 0600 on first use). When
outcomes arrive (MEDS label rows: subject_id, prediction_time,
boolean_value), `append_outcomes` computes the same key and stores only
(join_key, outcome, available_at); the monitor joins scores and outcomes on
`join_key`. Neither file holds a subject_id, and without the key a join key
cannot be turned back into one (subject ids are small integers, so the key
is what stops a dictionary attack: it never leaves the work folder).

Consent withdrawal (`purge_subjects`): with the key, the rows of given
subjects are found again (their join keys at each logged prediction time)
and removed: every score part holding one is rewritten without them (a new
file renamed over the old, or the file deleted when nothing is left), and
their delayed outcomes with them. Input checks are counts per site, day and
code, with no row of anyone, and stay.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl

from chronorisk.data.files import atomic_output
from chronorisk.errors import ChronoriskError, InputError

KEY_ENV = "CHRONORISK_MONITORING_KEY"
KEY_FILE = Path("secrets") / "monitoring.key"

# Columns the log writes besides features; a feature may not take one of these names.
META_SCHEMA: dict[str, pl.DataType] = {
    "task": pl.String(),
    "site": pl.String(),
    "prediction_time": pl.Datetime("us"),
    "scored_at": pl.Datetime("us"),
    "model_name": pl.String(),
    "model_version": pl.String(),
    "source": pl.String(),
    "risk": pl.Float64(),
    "tier": pl.String(),
    "join_key": pl.String(),
}
CHECK_SCHEMA: dict[str, pl.DataType] = {
    "task": pl.String(),
    "site": pl.String(),
    "date": pl.Date(),
    "code": pl.String(),
    "n_values": pl.Int64(),
    "n_dropped": pl.Int64(),
    "dropped_median": pl.Float64(),
}
OUTCOME_SCHEMA: dict[str, pl.DataType] = {
    "join_key": pl.String(),
    "outcome": pl.Boolean(),
    "available_at": pl.Datetime("us"),
}
# Consumed (subject_id -> join_key) or dropped on purpose (feature-table passthrough columns).
_CONSUMED = {"subject_id"}
_DROPPED = {"split", "boolean_value"}
# Names that look like identifiers are refused outright, whatever their type.
_IDENTIFIER_NAME = re.compile(
    r"(^|_)(patient|person|subject|member|mrn|nhs|ssn|name|address|phone|email|identifier)(_|$)|(^|_)id$",
    re.IGNORECASE,
)
_PART_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,120}$")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


def monitoring_key(work: Path) -> bytes:
    """The secret of the join keys: env var, else `<work>/secrets/monitoring.key` (made once)."""
    env = os.environ.get(KEY_ENV)
    if env:
        if len(env) < 16:
            raise ChronoriskError(f"{KEY_ENV}: the monitoring key must be at least 16 characters")
        return env.encode()
    path = Path(work) / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
    text = path.read_text().strip()
    if len(text) < 16:
        raise ChronoriskError(f"{path}: the monitoring key must be at least 16 characters")
    return text.encode()


def _time_text(times: pl.Series) -> list[str]:
    """Canonical text of prediction times (naive UTC, microseconds) so both sides hash alike."""
    return times.dt.strftime("%Y-%m-%dT%H:%M:%S%.6f").to_list()


def join_keys(subject_ids: pl.Series, prediction_times: pl.Series, key: bytes) -> pl.Series:
    """One-way pseudonymous keys of (subject, prediction time): keyed BLAKE2b, 128 bits, hex."""
    times = _naive_utc(prediction_times)
    keyed = _keyed(key)
    out = []
    for sid, ts in zip(subject_ids.cast(pl.Int64).to_list(), _time_text(times), strict=True):
        if sid is None or ts is None:
            out.append(None)
            continue
        out.append(_join_key(sid, ts, keyed))
    return pl.Series("join_key", out, dtype=pl.String)


def _naive_utc(times: pl.Series) -> pl.Series:
    dtype = times.dtype
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        times = times.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    elif isinstance(dtype, pl.Date):
        times = times.cast(pl.Datetime("us"))
    elif not isinstance(dtype, pl.Datetime):
        raise InputError("prediction_time", f"must be a datetime, got {dtype}")
    return times.cast(pl.Datetime("us"))


def _check_name(value: str, field: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise InputError(field, f"{value!r} is not accepted (letters, digits, '_', '.', '-')")
    return value


class PredictionLog:
    """The monitoring log under one folder (`<work>/monitoring`); cheap to construct.

    The key is read lazily, the first time a join key is needed.
    """

    def __init__(self, root: Path | str, key: bytes | None = None, *, work: Path | str | None = None):
        self.root = Path(root)
        self._key = key
        self._work = Path(work) if work is not None else self.root.parent

    @classmethod
    def for_work(cls, work: Path | str, key: bytes | None = None) -> PredictionLog:
        return cls(Path(work) / "monitoring", key, work=work)

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = monitoring_key(self._work)
        return self._key

    # ------------------------------------------------------------------ scores
    def log_dir(self, task: str) -> Path:
        return self.root / "log" / f"task={_check_name(task, 'task', _TASK_NAME)}"

    def append(
        self,
        records: pl.DataFrame,
        task: str | None = None,
        model_version: str | int | None = None,
        source: str = "api",
        *,
        model_name: str | None = None,
        feature_names: Sequence[str] | None = None,
        part: str | None = None,
    ) -> list[Path]:
        """Append scored rows; returns the part files written (one per prediction date).

        `records` has `prediction_time`, `site`, `risk`, `tier`, the feature
        columns, and optionally `subject_id` (turned into `join_key`, never
        stored) and `scored_at` (default: now, UTC). `feature_names` picks the
        features explicitly; otherwise every other numeric column is one.
        `task`, `model_version` and `model_name` default to the records'
        columns of those names. A deterministic `part` makes the write
        idempotent (same name, same file).
        """
        if not isinstance(records, pl.DataFrame):
            raise InputError("records", f"must be a polars DataFrame, got {type(records).__name__}")
        if part is not None:
            _check_name(part, "part", _PART_NAME)
        name = part or uuid.uuid4().hex
        groups = self._groups(records, task, model_version, model_name)
        written = []
        for i, (g_task, g_version, g_name, rows) in enumerate(groups):
            frame = self.prepare(rows, g_task, g_version, source, model_name=g_name, feature_names=feature_names)
            if frame.height:
                written += self.write_prepared(frame, g_task, name if len(groups) == 1 else f"{name}-{i}")
        return written

    @staticmethod
    def _groups(records: pl.DataFrame, task, model_version, model_name) -> list[tuple]:
        """(task, version, name, rows) groups: the arguments, else the records' own columns."""
        keys = {"task": task, "model_version": model_version, "model_name": model_name}
        by = [k for k, v in keys.items() if v is None and k in records.columns]
        for k in ("task", "model_version"):
            if keys[k] is None and k not in records.columns:
                raise InputError(k, "not given and not a column of the records")
        if not by:
            return [(task, model_version, model_name, records)]
        out = []
        for values, rows in records.group_by(by, maintain_order=True):
            found = dict(zip(by, values, strict=True))
            out.append((found.get("task", task), found.get("model_version", model_version),
                        found.get("model_name", model_name), rows))
        return out

    def write_prepared(self, frame: pl.DataFrame, task: str, name: str) -> list[Path]:
        """Write rows from `prepare` as `part-<name>.parquet`, one file per prediction date."""
        written = []
        by_date = frame.with_columns(pl.col("prediction_time").dt.date().alias("_date"))
        for (day,), chunk in by_date.sort("_date").group_by("_date", maintain_order=True):
            path = self.log_dir(task) / f"date={day.isoformat()}" / f"part-{name}.parquet"
            with atomic_output(path) as tmp:
                chunk.drop("_date").write_parquet(tmp, compression="zstd", statistics=True)
            written.append(path)
        return written

    def prepare(
        self,
        records: pl.DataFrame,
        task: str,
        model_version: str | int,
        source: str,
        *,
        model_name: str | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> pl.DataFrame:
        """The rows exactly as the log stores them (identifier consumed, types fixed)."""
        if not isinstance(records, pl.DataFrame):
            raise InputError("records", f"must be a polars DataFrame, got {type(records).__name__}")
        _check_name(task, "task", _TASK_NAME)
        _check_name(source, "source", _TASK_NAME)
        for required in ("prediction_time", "site", "risk", "tier"):
            if required not in records.columns:
                raise InputError(required, "missing from the records to log")
        features = self._feature_columns(records, feature_names)
        now = datetime.now(UTC).replace(tzinfo=None)
        scored_at = (
            _naive_utc(records["scored_at"]) if "scored_at" in records.columns
            else pl.Series("scored_at", [now] * records.height, dtype=pl.Datetime("us"))
        )
        prediction_time = _naive_utc(records["prediction_time"]).alias("prediction_time")
        if "subject_id" in records.columns:
            keys = join_keys(records["subject_id"], prediction_time, self.key)
        else:
            keys = pl.Series("join_key", [None] * records.height, dtype=pl.String)
        meta = pl.DataFrame(
            {
                "task": [task] * records.height,
                "site": records["site"].cast(pl.String),
                "prediction_time": prediction_time,
                "scored_at": scored_at.alias("scored_at"),
                "model_name": [model_name or f"chronorisk-{task}"] * records.height,
                "model_version": [str(model_version)] * records.height,
                "source": [source] * records.height,
                "risk": records["risk"].cast(pl.Float64),
                "tier": records["tier"].cast(pl.String),
                "join_key": keys,
            },
            schema=META_SCHEMA,
        )
        if meta["risk"].is_null().any() or not meta["risk"].drop_nulls().is_between(0, 1).all():
            raise InputError("risk", "must be a probability between 0 and 1 on every row")
        if meta["site"].is_null().any():
            raise InputError("site", "must be set on every row")
        return pl.concat([meta, records.select([pl.col(f).cast(pl.Float32) for f in features])],
                         how="horizontal")

    @staticmethod
    def _feature_columns(records: pl.DataFrame, feature_names: Sequence[str] | None) -> list[str]:
        meta = set(META_SCHEMA) | _CONSUMED | _DROPPED
        # `columns` and `schema` are built anew on each access: read them once, not once per feature
        columns = records.columns
        present = set(columns)
        for col in columns:
            if col not in meta and _IDENTIFIER_NAME.search(col):
                raise InputError(col, "looks like an identifier; the monitoring log never stores one")
        if feature_names is not None:
            features = list(feature_names)
            for f in features:
                if f in META_SCHEMA or f in _CONSUMED:
                    raise InputError(f, "is a reserved column of the monitoring log, not a feature")
                if f not in present:
                    raise InputError(f, "feature missing from the records to log")
        else:
            features = [c for c in columns if c not in meta]
        schema = records.schema
        for f in features:
            if not schema[f].is_numeric() and schema[f] != pl.Boolean:
                raise InputError(f, f"features must be numeric; got {schema[f]} (text is never logged)")
        return features

    def partitions(self, task: str, start: date | None = None, end: date | None = None) -> list[Path]:
        """Part files of `task` whose prediction date is in [start, end] (dates, inclusive)."""
        base = self.log_dir(task)
        if not base.is_dir():
            return []
        files = []
        for folder in sorted(base.glob("date=*")):
            try:
                day = date.fromisoformat(folder.name.removeprefix("date="))
            except ValueError:
                continue
            if (start is None or day >= start) and (end is None or day <= end):
                files.extend(sorted(folder.glob("part-*.parquet")))
        return files

    def scan(self, task: str, start: datetime | date | None = None, end: datetime | date | None = None) -> pl.LazyFrame:
        """Logged rows of `task` with start <= prediction_time < end (either bound optional).

        Part files written by different model versions may hold different
        feature columns: they are concatenated diagonally (absent = null).
        """
        start_dt, end_dt = _as_datetime(start), _as_datetime(end)
        last_day = None
        if end_dt is not None:
            last_day = (end_dt - timedelta(microseconds=1)).date()
        files = self.partitions(task, start_dt.date() if start_dt else None, last_day)
        if not files:
            return pl.LazyFrame(schema=META_SCHEMA)
        frame = pl.concat([pl.scan_parquet(f) for f in files], how="diagonal_relaxed")
        if start_dt is not None:
            frame = frame.filter(pl.col("prediction_time") >= start_dt)
        if end_dt is not None:
            frame = frame.filter(pl.col("prediction_time") < end_dt)
        return frame

    def tasks(self) -> list[str]:
        base = self.root / "log"
        if not base.is_dir():
            return []
        return sorted(p.name.removeprefix("task=") for p in base.glob("task=*") if p.is_dir())

    # ------------------------------------------------------------ input checks
    def checks_dir(self, task: str) -> Path:
        return self.root / "input_checks" / f"task={_check_name(task, 'task', _TASK_NAME)}"

    def append_input_checks(self, checks: pl.DataFrame, task: str, site: str, part: str | None = None) -> list[Path]:
        """Store `features.vocabulary.input_checks` rows of one site (date, code, counts, median);
        one file per prediction date, named like the scores' part (deterministic = idempotent)."""
        name = _check_name(part, "part", _PART_NAME) if part is not None else uuid.uuid4().hex
        missing = {"date", "code", "n_values", "n_dropped", "dropped_median"} - set(checks.columns)
        if missing:
            raise InputError("checks", f"missing columns {sorted(missing)}")
        if not isinstance(site, str) or not site:
            raise InputError("site", "must be set for input checks")
        frame = checks.with_columns(pl.lit(task).alias("task"), pl.lit(site).alias("site"))
        frame = frame.select([pl.col(c).cast(t) for c, t in CHECK_SCHEMA.items()])
        written = []
        for (day,), chunk in frame.sort("date").group_by("date", maintain_order=True):
            path = self.checks_dir(task) / f"date={day.isoformat()}" / f"part-{name}.parquet"
            with atomic_output(path) as tmp:
                chunk.write_parquet(tmp, compression="zstd")
            written.append(path)
        return written

    def scan_input_checks(self, task: str, start: datetime | date | None = None,
                          end: datetime | date | None = None) -> pl.LazyFrame:
        """Input-check rows of `task` with start <= date < end (prediction days; either bound optional)."""
        files = self.check_files(task, _as_datetime(start), _as_datetime(end))
        if not files:
            return pl.LazyFrame(schema=CHECK_SCHEMA)
        return pl.scan_parquet(files)

    def check_files(self, task: str, start: datetime | None, end: datetime | None) -> list[Path]:
        """The input-check part files of the days in [start, end) (their identity keys a window's result)."""
        base = self.checks_dir(task)
        out = []
        for folder in sorted(base.glob("date=*")) if base.is_dir() else []:
            try:
                day = datetime.fromisoformat(folder.name.removeprefix("date="))
            except ValueError:
                continue
            if (start is None or day >= start.replace(hour=0, minute=0, second=0, microsecond=0)) and (
                    end is None or day < end):
                out.extend(sorted(folder.glob("part-*.parquet")))
        return out

    # ---------------------------------------------------------------- outcomes
    def outcomes_dir(self, task: str) -> Path:
        return self.root / "outcomes" / f"task={_check_name(task, 'task', _TASK_NAME)}"

    def append_outcomes(
        self,
        labels: pl.DataFrame,
        task: str,
        *,
        available_at: datetime | None = None,
        horizon: timedelta | None = None,
        part: str | None = None,
    ) -> Path | None:
        """Store delayed outcomes (MEDS label rows) by join key only; returns the part file.

        When an outcome became known: `available_at` if given, else
        prediction_time + `horizon` (a label is final only once its horizon has
        passed), else now. A deterministic `part` (default: a hash of the rows)
        makes re-adding the same labels a no-op.
        """
        for required in ("subject_id", "prediction_time", "boolean_value"):
            if required not in labels.columns:
                raise InputError(required, "missing from the outcome labels")
        if labels.height == 0:
            return None
        times = _naive_utc(labels["prediction_time"])
        if available_at is not None:
            avail = pl.Series("available_at", [available_at.replace(tzinfo=None)] * labels.height,
                              dtype=pl.Datetime("us"))
        elif horizon is not None:
            avail = (times + horizon).alias("available_at")
        else:
            now = datetime.now(UTC).replace(tzinfo=None)
            avail = pl.Series("available_at", [now] * labels.height, dtype=pl.Datetime("us"))
        frame = pl.DataFrame(
            {
                "join_key": join_keys(labels["subject_id"], times, self.key),
                "outcome": labels["boolean_value"].cast(pl.Boolean),
                "available_at": avail,
            },
            schema=OUTCOME_SCHEMA,
        ).unique("join_key", keep="first", maintain_order=True)
        if part is None:
            digest = hashlib.blake2b(digest_size=12)
            for col in ("join_key", "outcome", "available_at"):
                digest.update(frame[col].cast(pl.String).str.join("\n").item().encode())
            part = digest.hexdigest()
        _check_name(part, "part", _PART_NAME)
        path = self.outcomes_dir(task) / f"part-{part}.parquet"
        with atomic_output(path) as tmp:
            frame.write_parquet(tmp, compression="zstd")
        return path

    def scan_outcomes(self, task: str, as_of: datetime | None = None) -> pl.LazyFrame:
        """Outcomes known by `as_of` (all when None), one row per join key."""
        base = self.outcomes_dir(task)
        files = sorted(base.glob("part-*.parquet")) if base.is_dir() else []
        if not files:
            return pl.LazyFrame(schema=OUTCOME_SCHEMA)
        frame = pl.scan_parquet(files)
        if as_of is not None:
            frame = frame.filter(pl.col("available_at") <= _as_datetime(as_of))
        return frame.sort("available_at").unique("join_key", keep="first")

    # ------------------------------------------------------------ withdrawal
    def purge_subjects(self, subjects_at: Callable[[str], set[int]],
                       already_clean: Callable[[Path], bool] | None = None) -> Purged:
        """Remove every logged row and outcome of the subjects `subjects_at(site)` names for each site of the log
        (parts for which `already_clean(path)` holds are not read).

        Rows are found by their join key: for each part, the keys of those subjects at the part's own prediction
        times. Outcomes go first (they are found through the rows' keys), then the parts, each rewritten whole
        (`atomic_output`: never a half-written file) or deleted when empty; an interrupted purge leaves rows
        that the next one finds again. Rows logged without a subject id have no join key and are not found."""
        keyed = _keyed(self.key)
        cache: dict[str, set[int]] = {}
        plans: list[tuple[Path, list[str]]] = []  # (part, the join keys to remove from it)
        for task in self.tasks():
            for path in self.partitions(task):
                if already_clean is not None and already_clean(path):
                    continue
                frame = pl.read_parquet(path, columns=["site", "prediction_time", "join_key"])
                if frame["join_key"].null_count() == frame.height:
                    continue
                wanted: set[str] = set()
                for (site,), group in frame.select("site", "prediction_time").unique().group_by("site"):
                    if site not in cache:
                        cache[site] = set(subjects_at(site))
                    times = _time_text(_naive_utc(group["prediction_time"]))
                    wanted |= {_join_key(sid, ts, keyed) for ts in times for sid in cache[site]}
                hits = frame.filter(pl.col("join_key").is_in(list(wanted)))["join_key"].unique().to_list()
                if hits:
                    plans.append((path, hits))
        found = [k for _, hits in plans for k in hits]
        outcomes = 0
        for task in self.tasks() if found else ():
            base = self.outcomes_dir(task)
            for path in sorted(base.glob("part-*.parquet")) if base.is_dir() else []:
                frame = pl.read_parquet(path)
                hit = frame["join_key"].is_in(found)
                if hit.any():
                    _replace_part(path, frame.filter(~hit))
                    outcomes += int(hit.sum())
        rows = 0
        rewritten = []
        for path, hits in plans:
            frame = pl.read_parquet(path)
            hit = frame["join_key"].is_in(hits)
            if _replace_part(path, frame.filter(~hit)):
                rewritten.append(path)
            rows += int(hit.sum())
        return Purged(rows=rows, parts=len(plans), outcomes=outcomes, rewritten=tuple(rewritten))


@dataclass(frozen=True)
class Purged:
    """What `purge_subjects` removed."""

    rows: int = 0
    parts: int = 0
    outcomes: int = 0
    rewritten: tuple[Path, ...] = ()  # score parts written anew (those left empty are deleted)


def _keyed(key: bytes):
    """The keyed BLAKE2b-128 of the join keys, before any input (copied for each key: cheaper than anew)."""
    return hashlib.blake2b(key=key[:64], digest_size=16)


def _join_key(subject_id: int, time_text: str, keyed) -> str:
    h = keyed.copy()
    h.update(f"{subject_id}|{time_text}".encode())
    return h.hexdigest()


def _replace_part(path: Path, kept: pl.DataFrame) -> bool:
    """Rewrite a part file with the rows kept (flushed to disk before the rename), or delete it if none is;
    True when it was rewritten."""
    if kept.height == 0:
        path.unlink(missing_ok=True)
        return False
    with atomic_output(path) as tmp:
        kept.write_parquet(tmp, compression="zstd", statistics=True)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return True


def _as_datetime(value: datetime | date | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    return datetime(value.year, value.month, value.day)


class BufferedPredictionLog:
    """Collects live requests and writes them in batches: one part file per flush, not per request.

    Thread-safe. Flushes when `max_rows` rows are buffered or the oldest is
    `max_seconds` old (checked on each `add` and by `flush_if_due`), and on
    `close`. Rows still buffered when a process is killed are lost: the log
    is for monitoring, where a few missing requests do not change a drift
    test, and the score store keeps the authoritative copy.
    """

    def __init__(self, log: PredictionLog, *, max_rows: int = 500, max_seconds: float = 30.0):
        if max_rows < 1:
            raise InputError("max_rows", f"must be at least 1, got {max_rows}")
        self.log = log
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._buffers: dict[tuple, list[pl.DataFrame]] = {}
        self._rows = 0
        self._oldest: float | None = None

    def add(self, records: pl.DataFrame, task: str, model_version: str | int, source: str = "api",
            *, model_name: str | None = None, feature_names: Sequence[str] | None = None) -> None:
        prepared = self.log.prepare(records, task, model_version, source, model_name=model_name,
                                    feature_names=feature_names)
        with self._lock:
            self._buffers.setdefault((task, str(model_version), source, model_name), []).append(prepared)
            self._rows += prepared.height
            self._oldest = self._oldest or time.monotonic()
        self.flush_if_due()

    def flush_if_due(self) -> None:
        with self._lock:
            due = self._rows >= self.max_rows or (
                self._oldest is not None and time.monotonic() - self._oldest >= self.max_seconds
            )
        if due:
            self.flush()

    def flush(self) -> list[Path]:
        with self._lock:
            buffers, self._buffers = self._buffers, {}
            self._rows, self._oldest = 0, None
        written = []
        for (task, *_rest), frames in buffers.items():
            # rows are already prepared (join key computed, identifiers gone): write them as they are
            frame = pl.concat(frames, how="diagonal_relaxed")
            written.extend(self.log.write_prepared(frame, task, uuid.uuid4().hex))
        return written

    def close(self) -> None:
        self.flush()


class InputCheckBuffer:
    """Collects live requests' input checks and writes them in batches (one part file per (task, site)
    per flush, not one per request). Flushes on `add` once `max_rows` rows are held or the oldest is
    `max_seconds` old, and at interpreter exit; like the score buffer, rows of a killed process are lost."""

    def __init__(self, log: PredictionLog, *, max_rows: int = 2000, max_seconds: float = 30.0):
        self.log, self.max_rows, self.max_seconds = log, max_rows, max_seconds
        self._lock = threading.Lock()
        self._frames: dict[tuple[str, str], list[pl.DataFrame]] = {}
        self._requests: dict[tuple, tuple] = {}  # (spec id, task, site) -> (spec, [(events, index)])
        self._rows, self._oldest = 0, None

    def add(self, checks: pl.DataFrame, task: str, site: str) -> None:
        if checks.height == 0:
            return
        with self._lock:
            self._frames.setdefault((task, site), []).append(checks)
            due = self._held(checks.height)
        if due:
            self.flush()

    def add_request(self, spec, events: pl.DataFrame, index: pl.DataFrame, task: str, site: str) -> None:
        """A scored request's events and rows, checked at the next flush together with the other requests
        held (`input_checks` per subject: the same rows as checking each alone, at a fraction of the cost)."""
        with self._lock:
            self._requests.setdefault((id(spec), task, site), (spec, []))[1].append((events, index))
            due = self._held(1)
        if due:
            self.flush()

    def _held(self, rows: int) -> bool:
        """Count `rows` more (called under the lock); whether a flush is due."""
        self._rows += rows
        self._oldest = self._oldest or time.monotonic()
        return self._rows >= self.max_rows or time.monotonic() - self._oldest >= self.max_seconds

    def flush(self) -> list[Path]:
        with self._lock:
            frames, self._frames = self._frames, {}
            requests, self._requests = self._requests, {}
            self._rows, self._oldest = 0, None
        for (_, task, site), (spec, held) in requests.items():
            checks = _checks_of_requests(spec, held)
            if checks.height:
                frames.setdefault((task, site), []).append(checks)
        written = []
        for (task, site), parts in frames.items():
            written += self.log.append_input_checks(pl.concat(parts, how="vertical_relaxed"), task, site)
        return written


def _checks_of_requests(spec, held: list[tuple[pl.DataFrame, pl.DataFrame]]) -> pl.DataFrame:
    """`input_checks` of each held request (events, index), in one run: request k under subject id k."""
    from chronorisk.features.vocabulary import input_checks

    events = pl.concat([e.select("subject_id", "time", "code", "numeric_value")
                        .with_columns(pl.lit(k, dtype=pl.Int64).alias("subject_id"))
                        for k, (e, _) in enumerate(held)], how="vertical_relaxed")
    index = pl.concat([i.select(pl.lit(k, dtype=pl.Int64).alias("subject_id"),
                                pl.col("prediction_time").cast(pl.Datetime("us")))
                       for k, (_, i) in enumerate(held)])
    return input_checks(spec, events, index, per_subject=True).drop("subject_id")


_CHECK_BUFFERS: dict[Path, InputCheckBuffer] = {}


def input_check_buffer(log: PredictionLog) -> InputCheckBuffer:
    """The process's input-check buffer of `log`'s folder (made once; flushed at exit)."""
    with _BUFFERS_LOCK:
        found = _CHECK_BUFFERS.get(log.root)
        if found is None:
            import atexit

            found = _CHECK_BUFFERS[log.root] = InputCheckBuffer(log)
            atexit.register(found.flush)
        return found


_BUFFERS_LOCK = threading.Lock()


def append(
    records: pl.DataFrame,
    task: str | None = None,
    model_version: str | int | None = None,
    source: str = "api",
    *,
    work: Path | str | None = None,
    model_name: str | None = None,
    feature_names: Sequence[str] | None = None,
    part: str | None = None,
) -> list[Path]:
    """Append scored rows to the log of the work folder (default: `$CHRONORISK_WORK`)."""
    return _default_log(work).append(records, task, model_version, source, model_name=model_name,
                                     feature_names=feature_names, part=part)


def scan(task: str, start: datetime | date | None = None, end: datetime | date | None = None,
         *, work: Path | str | None = None) -> pl.LazyFrame:
    """Logged rows of `task` with start <= prediction_time < end."""
    return _default_log(work).scan(task, start, end)


def _default_log(work: Path | str | None) -> PredictionLog:
    from chronorisk.paths import default_work_dir

    return PredictionLog.for_work(Path(work) if work is not None else default_work_dir())
