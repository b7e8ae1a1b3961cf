"""The score store: scores, patients, consent, API keys and scoring checkpoints.

SQLAlchemy Core over SQLite (default, a file in the work folder) or
PostgreSQL (`postgresql+psycopg://...`). Every write is one transaction, so
a reader sees all of a batch or none of it. Subject IDs here are the
pseudonymous MEDS `subject_id`s; nothing in this module logs them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from chronorisk.errors import ChronoriskError, InputError

log = logging.getLogger(__name__)

metadata = MetaData()

scores = Table(
    "scores",
    metadata,
    Column("site", String(64), primary_key=True),
    Column("subject_id", BigInteger, primary_key=True, autoincrement=False),
    Column("task", String(64), primary_key=True),
    Column("prediction_time", DateTime, primary_key=True),
    Column("risk", Float, nullable=False),
    Column("tier", String(8), nullable=False),
    Column("age_band", String(8), nullable=True),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("scored_at", DateTime, nullable=False),
    Column("factors", Text, nullable=True),  # JSON list, stored for medium/high tiers
    Index("ix_scores_worklist", "site", "task", "prediction_time", "risk"),
    Index("ix_scores_subject", "subject_id"),
)

patients = Table(
    "patients",
    metadata,
    Column("site", String(64), primary_key=True),
    Column("subject_id", BigInteger, primary_key=True, autoincrement=False),
    Column("sex", String(1), nullable=True),
    Column("birth_year", Integer, nullable=True),
    Column("conditions", Text, nullable=False, default=","),  # ",diabetes,hypertension,"
    Column("as_of", DateTime, nullable=True),
    Column("updated_at", DateTime, nullable=False),
    Index("ix_patients_subject", "subject_id"),
)

consent = Table(
    "consent",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subject_id", BigInteger, nullable=False),
    Column("site", String(64), nullable=True),  # null: every site
    Column("withdrawn_at", DateTime, nullable=False),
    Column("recorded_by", String(32), nullable=True),
    Column("recorded_at", DateTime, nullable=False),
    Index("ix_consent_subject", "subject_id"),
)

consent_renewals = Table(
    "consent_renewals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subject_id", BigInteger, nullable=False),
    Column("site", String(64), nullable=True),  # null: every site
    Column("renewed_at", DateTime, nullable=False),
    Column("recorded_by", String(32), nullable=True),
    Column("recorded_at", DateTime, nullable=False),
    Index("ix_consent_renewals_subject", "subject_id"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("secret_hash", String(64), nullable=False),
    Column("role", String(32), nullable=False),
    Column("site", String(64), nullable=True),
    Column("label", String(128), nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("revoked_at", DateTime, nullable=True),
)

score_runs = Table(
    "score_runs",
    metadata,
    Column("prediction_time", DateTime, primary_key=True),
    Column("site", String(64), primary_key=True),
    Column("chunk", String(255), primary_key=True),
    Column("task", String(64), primary_key=True),
    Column("model_version", String(64), nullable=False),
    Column("n_scored", Integer, nullable=False),
    Column("finished_at", DateTime, nullable=False),
)

TIERS = ("low", "medium", "high")
WRITER_CACHE_KIB = 128 * 1024  # SQLite page cache of a connection that writes score chunks
AGE_BANDS = ("0-17", "18-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80+")


def utcnow() -> datetime:
    """Naive UTC (the store keeps naive UTC timestamps everywhere)."""
    return datetime.now(UTC).replace(tzinfo=None)


def age_band(age_years: float | None) -> str | None:
    """Ten-year age band of an age in years; None when the age is unknown."""
    if age_years is None or (isinstance(age_years, float) and math.isnan(age_years)) or age_years < 0:
        return None
    if age_years < 18:
        return AGE_BANDS[0]
    if age_years < 30:
        return AGE_BANDS[1]
    if age_years >= 80:
        return AGE_BANDS[-1]
    return AGE_BANDS[int(age_years // 10) - 1]


def conditions_text(names: Iterable[str]) -> str:
    """Conditions as ',a,b,' so that one portable LIKE '%,a,%' finds a patient with condition a."""
    names = sorted({n for n in names if n})
    return "," + ",".join(names) + ("," if names else "")


def conditions_list(text: str | None) -> list[str]:
    return [c for c in (text or "").split(",") if c]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Autocommit at the driver level: SQLAlchemy's "begin" event below issues BEGIN itself,
    # so that writers can take the write lock up front (BEGIN IMMEDIATE) and never deadlock.
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get WAL, a busy timeout and explicit BEGINs."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InputError("store_url", "not a database URL (sqlite:///path or postgresql+psycopg://...)") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        return create_engine(url, pool_size=5, max_overflow=10, pool_pre_ping=True)
    raise InputError("store_url", f"backend {backend!r} is not supported; use sqlite or postgresql+psycopg")


@contextmanager
def writer(engine: Engine) -> Iterator[Connection]:
    """A connection for one write transaction, holding the store's write lock while open.

    SQLite lets one writer in at a time (BEGIN IMMEDIATE takes the lock up front). A writer that
    finds the lock taken waits in SQLite's busy handler, which sleeps in growing steps of up to
    100 ms. With two service workers auditing every patient read into the same file, those sleeps
    made the p99 of `GET /patients` 72-225 ms at concurrency 2-32 (p50 1-23 ms; serving
    benchmark). So writers of one SQLite file first queue on an flock beside it
    (`<file>-writer.lock`), which wakes the next one as soon as the lock is free. The busy
    handler stays as the fallback for writers from elsewhere. PostgreSQL queues its lock waiters
    itself; there it is a plain connection.
    """
    with _sqlite_write_lock(engine), engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
        yield conn


class _FileLock:
    """An exclusive lock on one file across processes (flock) and this process's threads (an RLock).

    The file is opened once per process (never inherited across fork: a child shares the
    parent's open file and its flock would not exclude the parent). A writer opened inside
    another on the same thread does not wait for itself here; it meets SQLite's own lock (and
    its busy timeout) as before, and the flock is let go only when the outer writer ends."""

    def __init__(self, path: Path):
        self.path = path
        self.threads = threading.RLock()
        self.fd: int | None = None
        self.pid = 0
        self.depth = 0

    def __enter__(self) -> _FileLock:
        self.threads.acquire()
        try:
            if self.depth == 0:
                if self.fd is None or self.pid != os.getpid():
                    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                    self.pid = os.getpid()
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.depth += 1
        except BaseException:
            self.threads.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.depth -= 1
            if self.depth == 0:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.threads.release()


_FILE_LOCKS: dict[str, _FileLock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _sqlite_write_lock(engine: Engine) -> AbstractContextManager:
    """The write lock of `engine`'s SQLite file; nothing to hold for PostgreSQL or an in-memory SQLite."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return nullcontext()
    where = database if os.path.isabs(database) else (os.getcwd(), database)
    lock = _LOCK_OF_DATABASE.get(where)  # resolving the path on every write cost more than the write's lock
    if lock is not None:
        return lock
    path = str(Path(database).resolve()) + "-writer.lock"
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(path)
        if lock is None:
            lock = _FILE_LOCKS[path] = _FileLock(Path(path))
        _LOCK_OF_DATABASE[where] = lock
    return lock


_LOCK_OF_DATABASE: dict[object, _FileLock] = {}  # the database as named (relative: with the cwd) -> its lock


def _insert(engine_or_conn):
    """The dialect's INSERT with ON CONFLICT support."""
    name = engine_or_conn.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # pragma: no cover - make_engine refuses other backends
        raise ChronoriskError(f"unsupported database {name}")
    return insert


def upsert(conn: Connection, table: Table, rows: Sequence[dict], keys: Sequence[str]) -> int:
    """Insert `rows`, replacing those whose primary key exists (idempotent re-runs)."""
    if not rows:
        return 0
    insert = _insert(conn)
    stmt = insert(table)
    updates = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=updates)
    conn.execute(stmt, list(rows))
    return len(rows)


def bulk_upsert(conn: Connection, table: Table, rows, keys: Sequence[str]) -> int:
    """`upsert` for many rows at driver speed: SQLite executemany of tuples, PostgreSQL COPY into a
    temporary table then one INSERT ... ON CONFLICT. `rows` is a sequence of dicts or a polars
    DataFrame (batch scoring: columns converted whole, no per-row dict). Values go through the
    columns' own bind processors, so stored datetimes are exactly what SQLAlchemy writes and compares."""
    if len(rows) == 0:
        return 0
    columns = [c.name for c in table.columns]
    frame = rows if _is_frame(rows) else None
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
    conflict = f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    if conn.dialect.name == "sqlite":
        sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
               f"{conflict}")
        values = _frame_tuples(conn, table, frame) if frame is not None else _dict_tuples(conn, table, rows)
        conn.exec_driver_sql(sql, values)
        return len(rows)
    if conn.dialect.name == "postgresql":
        import secrets

        tmp = f"tmp_{table.name}_{secrets.token_hex(4)}"
        cols = ", ".join(columns)
        raw = conn.connection.driver_connection
        with raw.cursor() as cur:
            cur.execute(f"CREATE TEMP TABLE {tmp} (LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DROP")
            if frame is not None:
                # one CSV text of the whole frame: COPY parses it server-side (empty unquoted = NULL)
                data = frame.select(columns).write_csv(include_header=False, datetime_format="%Y-%m-%d %H:%M:%S%.6f")
                with cur.copy(f"COPY {tmp} ({cols}) FROM STDIN (FORMAT csv)") as copy:
                    copy.write(data)
            else:
                with cur.copy(f"COPY {tmp} ({cols}) FROM STDIN") as copy:
                    for row in _dict_tuples(conn, table, rows):
                        copy.write_row(row)
            cur.execute(f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM {tmp} {conflict}")
            cur.execute(f"DROP TABLE {tmp}")
        return len(rows)
    return upsert(conn, table, rows, keys)  # pragma: no cover - other dialects are refused earlier


def _is_frame(rows) -> bool:
    return type(rows).__module__.startswith("polars") and hasattr(rows, "get_column")


def _processors(conn: Connection, table: Table) -> list:
    return [c.type.dialect_impl(conn.dialect).bind_processor(conn.dialect) for c in table.columns]


def _dict_tuples(conn: Connection, table: Table, rows: Sequence[dict]) -> list[tuple]:
    columns = [c.name for c in table.columns]
    # a chunk repeats few distinct values in the converted columns (its times): convert each once
    convert = [(i, _memoized(p)) for i, p in enumerate(_processors(conn, table)) if p is not None]

    def as_tuple(row: dict) -> tuple:
        values = [row.get(name) for name in columns]
        for i, p in convert:
            values[i] = p(values[i])
        return tuple(values)

    return [as_tuple(r) for r in rows]


def _frame_tuples(conn: Connection, table: Table, frame) -> list[tuple]:
    """Row tuples of a frame, column by column: a column the bind processor converts (times) and
    that holds one value (the chunk's prediction and scoring times) is converted once."""
    out = []
    for column, processor in zip(table.columns, _processors(conn, table), strict=True):
        if column.name not in frame.columns:
            out.append([None] * frame.height)
            continue
        series = frame.get_column(column.name)
        if processor is None:
            out.append(series.to_list())
        elif series.n_unique() == 1:
            out.append([processor(series[0])] * frame.height)
        else:
            convert = _memoized(processor)
            out.append([convert(v) for v in series.to_list()])
    return list(zip(*out, strict=True))


def _memoized(fn):
    cache: dict = {}

    def convert(value):
        try:
            return cache[value]
        except KeyError:
            out = cache[value] = fn(value)
            return out
        except TypeError:  # unhashable
            return fn(value)

    return convert


@dataclass(frozen=True)
class StoreInfo:
    backend: str
    url_safe: str


class ScoreStore:
    """Tables of the score store on one engine; methods are small queries in their own transactions."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.audit = None  # an AuditLog: score writes are then recorded (`audit verify` replays them)

    @classmethod
    def open(cls, url: str, *, create: bool = True) -> ScoreStore:
        """Connect to `url` and create missing tables (the audit tables included)."""
        from chronorisk.serving import access, audit, privacy  # noqa: F401  (register their tables)

        engine = make_engine(url)
        store = cls(engine)
        if create:
            try:
                metadata.create_all(engine)
            except OperationalError as exc:
                raise ChronoriskError(
                    f"score store {store.info().url_safe}: cannot connect or create tables "
                    f"({type(exc.orig).__name__ if exc.orig else 'OperationalError'})"
                ) from None
        return store

    def info(self) -> StoreInfo:
        return StoreInfo(self.engine.dialect.name, self.engine.url.render_as_string(hide_password=True))

    def in_memory(self) -> bool:
        """An in-memory SQLite database (one per connection: no other thread sees it)."""
        return self.engine.dialect.name == "sqlite" and self.engine.url.database in (None, "", ":memory:")

    def dispose(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
            return True
        except SQLAlchemyError:
            return False

    # -- scores -----------------------------------------------------------------------------

    def write_chunk(
        self,
        score_rows: Sequence[dict],
        patient_rows: Sequence[dict],
        checkpoints: Sequence[dict] = (),
    ) -> None:
        """Scores, patients and the chunk's checkpoints in ONE transaction: all or nothing.

        Rows are dicts or polars frames (batch scoring); columns not in a table are ignored."""
        with writer(self.engine) as conn:
            if conn.dialect.name == "sqlite":
                # a million-patient batch updates three indexes of a table that outgrows the default
                # 2 MiB page cache; a larger cache on the writing connection keeps those pages in memory
                # (on the driver connection: a SQLAlchemy statement here would begin a transaction)
                conn.connection.driver_connection.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
            with conn.begin():
                bulk_upsert(conn, patients, patient_rows, ("site", "subject_id"))
                bulk_upsert(conn, scores, score_rows, ("site", "subject_id", "task", "prediction_time"))
                upsert(conn, score_runs, list(checkpoints), ("prediction_time", "site", "chunk", "task"))
                if self.audit is not None:
                    self.audit.record_scores(conn, score_rows, checkpoints)

    def done_chunks(self, prediction_time: datetime) -> dict[tuple[str, str, str], str]:
        """(site, chunk, task) -> model version of the chunks already scored at this time."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(score_runs.c.site, score_runs.c.chunk, score_runs.c.task, score_runs.c.model_version)
                .where(score_runs.c.prediction_time == prediction_time)
            ).all()
        return {(r.site, r.chunk, r.task): r.model_version for r in rows}

    def read_patient(self, conn: Connection, subject_id: int) -> PatientData:
        """Every site's facts and scores of a subject, and its consent withdrawal, on `conn`.

        Three prepared textual queries (the hot path of GET /patients: no statement building)."""
        facts = conn.execute(_PATIENT_FACTS, {"sid": subject_id}).mappings().all()
        rows = conn.execute(_PATIENT_SCORES, {"sid": subject_id}).mappings().all()
        return PatientData(
            facts={r["site"]: dict(r) for r in facts},
            scores=[_score_row(r) for r in rows],
            consent=ConsentHistory.of(conn, subject_id),
        )

    def patient_sites(self, subject_id: int) -> list[str]:
        """Sites that hold scores or facts of this subject."""
        with self.engine.connect() as conn:
            return _subject_sites(conn, subject_id)

    def patient_record(self, subject_id: int, sites: Sequence[str] | None) -> dict | None:
        """Facts and every stored score of a subject (optionally only at `sites`); None if unknown."""
        with self.engine.connect() as conn:
            pq = select(patients).where(patients.c.subject_id == subject_id)
            sq = select(scores).where(scores.c.subject_id == subject_id)
            if sites is not None:
                pq = pq.where(patients.c.site.in_(list(sites)))
                sq = sq.where(scores.c.site.in_(list(sites)))
            prow = conn.execute(pq.order_by(patients.c.updated_at.desc()).limit(1)).mappings().first()
            srows = conn.execute(sq.order_by(scores.c.task, scores.c.prediction_time)).mappings().all()
            history = ConsentHistory.of(conn, subject_id)
        if prow is None and not srows:
            return None
        site = prow["site"] if prow else srows[-1]["site"]
        return {
            "patient": dict(prow) if prow else None,
            "scores": [_score_row(r) for r in srows],
            "consent_withdrawn_at": history.withdrawn_at(site if sites is not None else None),
        }

    def worklist(
        self,
        site: str,
        *,
        task: str | None = None,
        tiers: Sequence[str] | None = None,
        min_risk: float | None = None,
        limit: int = 200,
        offset: int = 0,
        now: datetime | None = None,
    ) -> list[dict]:
        """Latest score per (subject, task) at one site, highest risk first; consent-withdrawn excluded."""
        now = now or utcnow()
        latest = (
            select(scores.c.subject_id, scores.c.task, func.max(scores.c.prediction_time).label("pt"))
            .where(scores.c.site == site)
            .group_by(scores.c.subject_id, scores.c.task)
        )
        if task:
            latest = latest.where(scores.c.task == task)
        latest = latest.subquery()
        q = (
            select(scores, patients.c.sex, patients.c.birth_year, patients.c.conditions)
            .join(
                latest,
                and_(
                    scores.c.subject_id == latest.c.subject_id,
                    scores.c.task == latest.c.task,
                    scores.c.prediction_time == latest.c.pt,
                ),
            )
            .outerjoin(patients, and_(patients.c.site == scores.c.site, patients.c.subject_id == scores.c.subject_id))
            .where(scores.c.site == site)
            .where(~consent_withdrawn(scores.c.subject_id, scores.c.site, now))
        )
        if tiers:
            q = q.where(scores.c.tier.in_(list(tiers)))
        if min_risk is not None:
            q = q.where(scores.c.risk >= min_risk)
        q = q.order_by(scores.c.risk.desc(), scores.c.subject_id).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [_score_row(r) for r in rows]

    def latest_prediction_time(self, task: str | None = None) -> datetime | None:
        q = select(func.max(scores.c.prediction_time))
        if task:
            q = q.where(scores.c.task == task)
        with self.engine.connect() as conn:
            return conn.execute(q).scalar()

    def sites(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(select(scores.c.site).distinct()).all())

    def count_scores(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(scores)).scalar() or 0)

    # -- consent ---------------------------------------------------------------------------

    def withdraw_consent(
        self, subject_id: int, *, site: str | None = None, at: datetime | None = None, by: str | None = None,
        audit=None, role: str = "admin", allow_unknown: bool = False,
    ) -> datetime:
        """Record a withdrawal (effective from `at`, default now) at `site` (None: every site); returns
        the effective time. The subject must be in the store (`allow_unknown` for one never scored yet)
        and `site` one of its sites, exactly. With `audit` (an AuditLog) the row is recorded in the
        audit log in the same transaction, so that `audit verify` can replay it."""
        at = at or utcnow()
        with writer(self.engine) as conn, conn.begin():
            self._check_subject_site(conn, subject_id, site, allow_unknown)
            row = {"subject_id": int(subject_id), "site": site, "withdrawn_at": at, "recorded_by": by,
                   "recorded_at": utcnow()}
            row["id"] = conn.execute(consent.insert().values(**row)).inserted_primary_key[0]
            if audit is not None:
                audit.record_insert(conn, consent, row, actor=by or "unknown", role=role, action="consent_withdraw",
                                    site=site, subject_id=subject_id)
        return at

    def renew_consent(
        self, subject_id: int, *, site: str | None = None, at: datetime | None = None, by: str | None = None,
        audit=None, role: str = "admin",
    ) -> datetime:
        """Record a renewed consent (a patient who withdrew consents again) from `at` (default now):
        the withdrawals before it stop applying at `site` (None: every site). Refused when no
        withdrawal of this subject is in effect there."""
        at = at or utcnow()
        with writer(self.engine) as conn, conn.begin():
            self._check_subject_site(conn, subject_id, site, allow_unknown=True)
            if ConsentHistory.of(conn, subject_id).withdrawn_at(site, at) is None:
                raise InputError("subject_id", "no consent withdrawal of this patient is in effect "
                                 + (f"at {site}" if site else "") + " to renew")
            row = {"subject_id": int(subject_id), "site": site, "renewed_at": at, "recorded_by": by,
                   "recorded_at": utcnow()}
            row["id"] = conn.execute(consent_renewals.insert().values(**row)).inserted_primary_key[0]
            if audit is not None:
                audit.record_insert(conn, consent_renewals, row, actor=by or "unknown", role=role,
                                    action="consent_renew", site=site, subject_id=subject_id)
        return at

    def _check_subject_site(self, conn: Connection, subject_id: int, site: str | None, allow_unknown: bool) -> None:
        known = _subject_sites(conn, subject_id)
        if not known and not allow_unknown:
            raise UnknownSubject("no such patient in the score store")
        if site is not None and known and site not in known:
            raise InputError("site", f"the patient has no record at site {site[:64]!r} (exact site id expected)")

    def withdrawn_subjects(self, now: datetime | None = None, site: str | None = None) -> set[int]:
        """Subjects whose consent withdrawal is in effect at `now`: at `site`, or at any site when None.
        Batch scoring and monitoring leave these out; training can read the same set (see README)."""
        now = now or utcnow()
        with self.engine.connect() as conn:
            histories = ConsentHistory.all(conn)
        return {sid for sid, h in histories.items() if h.withdrawn_at(site, now) is not None}

    def patient_consent(self, subject_id: int) -> ConsentHistory:
        with self.engine.connect() as conn:
            return ConsentHistory.of(conn, subject_id)


class UnknownSubject(ChronoriskError):
    """A subject the store holds nothing of (the API answers 404)."""


def _subject_sites(conn: Connection, subject_id: int) -> list[str]:
    rows = conn.execute(
        select(patients.c.site).where(patients.c.subject_id == subject_id)
        .union(select(scores.c.site).where(scores.c.subject_id == subject_id))
    ).all()
    return sorted({r[0] for r in rows})


def _covers(scope: str | None, site: str | None) -> bool:
    """A consent record at `scope` (None: every site) applies to `site` (None: any site)."""
    return scope is None or site is None or scope == site


@dataclass
class ConsentHistory:
    """One subject's withdrawals and renewals as (site or None, time) pairs: the rule of which is in
    effect, shared by the patient reads (in Python) and `consent_withdrawn` (the same rule in SQL)."""

    withdrawals: list[tuple[str | None, datetime]] = field(default_factory=list)
    renewals: list[tuple[str | None, datetime]] = field(default_factory=list)

    @classmethod
    def of(cls, conn: Connection, subject_id: int) -> ConsentHistory:
        w = conn.execute(_SUBJECT_WITHDRAWALS, {"sid": subject_id}).all()
        r = conn.execute(_SUBJECT_RENEWALS, {"sid": subject_id}).all()
        return cls([(x[0], x[1]) for x in w], [(x[0], x[1]) for x in r])

    @classmethod
    def all(cls, conn: Connection) -> dict[int, ConsentHistory]:
        out: dict[int, ConsentHistory] = {}
        for sid, site, at in conn.execute(select(consent.c.subject_id, consent.c.site, consent.c.withdrawn_at)):
            out.setdefault(int(sid), cls()).withdrawals.append((site, at))
        for sid, site, at in conn.execute(
            select(consent_renewals.c.subject_id, consent_renewals.c.site, consent_renewals.c.renewed_at)
        ):
            if int(sid) in out:
                out[int(sid)].renewals.append((site, at))
        return out

    def withdrawn_at(self, site: str | None = None, now: datetime | None = None) -> datetime | None:
        """Earliest withdrawal in effect at `site` (None: at any site) at `now`; None when consent holds.
        A withdrawal (for one site or every site) applies from its time until a later renewal for every
        site, for the withdrawal's own site, or for the site asked about."""
        now = now or utcnow()

        def lifted(scope: str | None, at: datetime) -> bool:
            return any(at < r_at <= now and r_scope in (None, scope, site or scope) for r_scope, r_at in self.renewals)

        return min((at for scope, at in self.withdrawals
                    if at <= now and _covers(scope, site) and not lifted(scope, at)), default=None)


_SUBJECT_WITHDRAWALS = text("SELECT site, withdrawn_at FROM consent WHERE subject_id = :sid").columns(
    withdrawn_at=DateTime)
_SUBJECT_RENEWALS = text("SELECT site, renewed_at FROM consent_renewals WHERE subject_id = :sid").columns(
    renewed_at=DateTime)


@dataclass
class PatientData:
    facts: dict[str, dict]
    scores: list[dict]
    consent: ConsentHistory

    @property
    def sites(self) -> list[str]:
        return sorted(set(self.facts) | {r["site"] for r in self.scores})

    def at(self, site: str) -> dict:
        """The record at one site, in `patient_record`'s shape."""
        return {
            "patient": self.facts.get(site),
            "scores": [r for r in self.scores if r["site"] == site],
            "consent_withdrawn_at": self.consent.withdrawn_at(site),
        }


_SCORE_COLUMNS = ", ".join(c.name for c in scores.columns)
_PATIENT_FACTS = text(
    "SELECT site, subject_id, sex, birth_year, conditions, as_of, updated_at FROM patients "
    "WHERE subject_id = :sid"
).columns(as_of=DateTime, updated_at=DateTime)
_PATIENT_SCORES = text(
    f"SELECT {_SCORE_COLUMNS} FROM scores WHERE subject_id = :sid ORDER BY site, task, prediction_time"
).columns(prediction_time=DateTime, scored_at=DateTime)


def consent_withdrawn(subject_col, site_col, now: datetime):
    """SQL condition: the row's subject has a withdrawal in effect at the row's site at `now` (the rule of
    `ConsentHistory`: a withdrawal for that site or every site, not followed by a renewal covering it)."""
    w = consent.alias("w")
    r = consent_renewals.alias("r")
    renewed = (
        select(r.c.id)
        .where(r.c.subject_id == subject_col)
        .where(r.c.renewed_at > w.c.withdrawn_at)
        .where(r.c.renewed_at <= now)
        .where(r.c.site.is_(None) | (r.c.site == site_col))
        .exists()
    )
    return (
        select(w.c.id)
        .where(w.c.subject_id == subject_col)
        .where(w.c.site.is_(None) | (w.c.site == site_col))
        .where(w.c.withdrawn_at <= now)
        .where(~renewed)
        .exists()
    )


def _score_row(r) -> dict:
    d = dict(r)
    factors = d.get("factors")
    d["factors"] = json.loads(factors) if factors else None
    if "conditions" in d:
        d["conditions"] = conditions_list(d["conditions"])
    return d


def to_json_factors(factors: list[dict] | None) -> str | None:
    """Factors as compact JSON (dates as ISO strings, floats finite or null)."""
    if factors is None:
        return None
    return json.dumps([_clean_factor(f) for f in factors], separators=(",", ":"), default=_json_default)


def _clean_factor(f: dict) -> dict:
    out = {}
    for k, v in f.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def _json_default(v):
    if isinstance(v, datetime | date):
        return v.isoformat()
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    return str(v)
