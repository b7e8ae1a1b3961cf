"""One micro-batch of MQTT messages: convert, store once, re-score touched patients, decide alerts.

`process_batch` is the whole unit of work between receiving messages and acknowledging them:
readings and quarantine rows (idempotent on the reading's key and on the message's hash), the
new scores and the alerts are written in ONE transaction, so after a crash the broker's
redelivery either finds everything stored (counted as redelivered, nothing re-done) or nothing.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import polars as pl
from sqlalchemy import and_, func, select, tuple_

from chronorisk.devices import registry as reg
from chronorisk.devices.readings import Message, Quarantined, Reading, convert_message, parse_topic
from chronorisk.devices.rescore import BaseEvents, readings_frame, score_patients, tier_rose
from chronorisk.devices.tables import device_alerts, device_quarantine, device_readings
from chronorisk.serving.store import ScoreStore, bulk_upsert, scores, utcnow, writer

log = logging.getLogger(__name__)
_CHUNK = 400  # keys per IN (...) query


@dataclass
class StreamContext:
    """What processing a batch needs: the store, the champion models, patients' MEDS events, settings."""

    store: ScoreStore
    models: dict
    base: BaseEvents
    prefix: str = "chronorisk"
    damping: timedelta = timedelta(hours=24)
    explain_tiers: Sequence[str] = ("medium", "high")
    top_k: int = 5


@dataclass
class BatchResult:
    received: int = 0
    stored: int = 0  # new readings
    redelivered: int = 0  # readings or quarantined messages already stored
    quarantined: Counter = field(default_factory=Counter)  # new quarantine rows by category
    scored: int = 0
    alerts: list[dict] = field(default_factory=list)
    sent_at: list[datetime | None] = field(default_factory=list)  # of each new reading (latency)
    received_at: list[datetime] = field(default_factory=list)
    committed_at: datetime | None = None


def process_batch(ctx: StreamContext, messages: Sequence[Message]) -> BatchResult:
    """Store, score and alert for `messages`; the caller acknowledges them once this returns."""
    result = BatchResult(received=len(messages))
    devices = {w[1] for m in messages if (w := parse_topic(ctx.prefix, m.topic)) is not None}
    registry = reg.lookup(ctx.store, devices)
    converted = [convert_message(ctx.prefix, m, registry) for m in messages]
    readings = _first_of_each(r for r in converted if isinstance(r, Reading))
    quarantined = {q.key: q for q in converted if isinstance(q, Quarantined)}
    quarantined.update((q.key, q) for r in readings.values() for q in r.left_out)
    with ctx.store.engine.connect() as conn:
        known = _stored_reading_keys(conn, list(readings))
        known_q = _stored_quarantine_keys(conn, list(quarantined))
    new = [r for k, r in readings.items() if k not in known]
    new_q = [q for k, q in quarantined.items() if k not in known_q]
    # a redelivered message counts once (a stored reading's left-out components are not messages)
    result.redelivered = (len(readings) - len(new)) + sum(
        1 for k, q in quarantined.items() if k in known_q and q.part is None)
    now = utcnow()
    score_rows, alerts = _rescore(ctx, new, now) if new else ([], [])
    with writer(ctx.store.engine) as conn, conn.begin():
        _insert_new(conn, device_readings, _reading_rows(new, utcnow()))
        _insert_new(conn, device_quarantine, [_quarantine_row(q) for q in new_q])
        if score_rows:
            bulk_upsert(conn, scores, score_rows, ("site", "subject_id", "task", "prediction_time"))
        for a in alerts:
            a["alert_id"] = conn.execute(device_alerts.insert().values(**a)).inserted_primary_key[0]
    result.committed_at = utcnow()
    result.stored = len(new)
    result.quarantined = Counter(q.category for q in new_q)
    result.scored = len(score_rows)
    result.alerts = alerts
    result.sent_at = [r.sent_at for r in new]
    result.received_at = [r.received_at for r in new]
    return result


def _first_of_each(readings) -> dict[tuple[str, str], Reading]:
    out: dict[tuple[str, str], Reading] = {}
    for r in readings:
        out.setdefault((r.device_id, r.reading_id), r)
    return out


def _stored_reading_keys(conn, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for i in range(0, len(keys), _CHUNK):
        part = keys[i:i + _CHUNK]
        rows = conn.execute(select(device_readings.c.device_id, device_readings.c.reading_id).distinct().where(
            tuple_(device_readings.c.device_id, device_readings.c.reading_id).in_(part))).all()
        found.update((r[0], r[1]) for r in rows)
    return found


def _stored_quarantine_keys(conn, keys: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(keys), _CHUNK):
        rows = conn.execute(select(device_quarantine.c.message_key).where(
            device_quarantine.c.message_key.in_(keys[i:i + _CHUNK]))).all()
        found.update(r[0] for r in rows)
    return found


def _reading_rows(readings: Sequence[Reading], now: datetime) -> list[dict]:
    return [
        {"device_id": r.device_id, "reading_id": r.reading_id, "code": code, "site": r.site,
         "subject_id": r.subject_id, "time": when, "numeric_value": value, "text_value": text,
         "sent_at": r.sent_at, "received_at": r.received_at, "stored_at": now}
        for r in readings for when, code, value, text in r.events
    ]


def _quarantine_row(q: Quarantined) -> dict:
    return {"message_key": q.key, "topic": q.topic[:512], "device_id": q.device_id, "category": q.category,
            "reason": q.reason, "payload": q.payload.decode("utf-8", errors="replace"), "received_at": q.received_at}


def _insert_new(conn, table, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING (a row already there stays as it was)."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(insert(table).on_conflict_do_nothing(), rows)


def _rescore(ctx: StreamContext, new: list[Reading], now: datetime) -> tuple[list[dict], list[dict]]:
    """Score rows and alerts of every patient the new readings touched.

    All sites' patients are scored in one polars run (its fixed cost is most of a small batch's):
    each (site, subject) gets a batch-local id, as one subject id may be a patient at two sites.
    One prediction time for the batch: just after its latest reading (features use events strictly
    before it)."""
    withdrawn = ctx.store.withdrawn_subjects(now)
    by_site: dict[str, list[Reading]] = defaultdict(list)
    for r in new:
        if r.subject_id not in withdrawn:
            by_site[r.site].append(r)
    if not by_site:
        return [], []
    when = (max(r.time for group in by_site.values() for r in group) + timedelta(seconds=1)).replace(microsecond=0)
    local: dict[int, tuple[str, int]] = {}
    frames = []
    for site, group in by_site.items():
        subjects = sorted({r.subject_id for r in group})
        ids = {s: len(local) + i for i, s in enumerate(subjects)}
        local.update({k: (site, s) for s, k in ids.items()})
        events = _patient_events(ctx, site, subjects, group)
        frames.append(events.with_columns(pl.col("subject_id").replace_strict(ids, return_dtype=pl.Int64)))
    rows = score_patients(ctx.models, pl.concat(frames, how="vertical"), when, explain_tiers=ctx.explain_tiers,
                          top_k=ctx.top_k)
    for row in rows:
        row["site"], row["subject_id"] = local[row["subject_id"]]
        row.update(prediction_time=when, scored_at=now)
    return rows, _alerts(ctx, rows, when, now)


def _alerts(ctx: StreamContext, rows: list[dict], when: datetime, now: datetime) -> list[dict]:
    """An alert for each score whose tier rose above the patient's latest stored one, unless damped."""
    alerts = []
    for site in sorted({r["site"] for r in rows}):
        subjects = sorted({r["subject_id"] for r in rows if r["site"] == site})
        before = _latest_tiers(ctx.store, site, subjects)
        damped = _recently_alerted(ctx.store, site, subjects, now - ctx.damping)
        for row in rows:
            key = (row["subject_id"], row["task"])
            if row["site"] == site and tier_rose(before.get(key), row["tier"]) and key not in damped:
                alerts.append({"site": site, "subject_id": row["subject_id"], "task": row["task"],
                               "from_tier": before[key], "to_tier": row["tier"], "risk": row["risk"],
                               "prediction_time": when, "created_at": now, "published_at": None})
    return alerts


def _patient_events(ctx: StreamContext, site: str, subjects: list[int], new: list[Reading]) -> pl.DataFrame:
    """MEDS events of these patients: their site's data, their stored readings and the new ones."""
    stored = []
    with ctx.store.engine.connect() as conn:
        for i in range(0, len(subjects), _CHUNK):
            stored += conn.execute(
                select(device_readings.c.subject_id, device_readings.c.time, device_readings.c.code,
                       device_readings.c.numeric_value, device_readings.c.text_value)
                .where(device_readings.c.site == site)
                .where(device_readings.c.subject_id.in_(subjects[i:i + _CHUNK]))).all()
    fresh = [(r.subject_id, when, code, value, text) for r in new for when, code, value, text in r.events]
    frames = [*ctx.base.frames(site, subjects), readings_frame([tuple(s) for s in stored] + fresh)]
    return pl.concat(frames, how="vertical")


def _latest_tiers(store: ScoreStore, site: str, subjects: list[int]) -> dict[tuple[int, str], str]:
    """The tier of each (subject, task)'s latest stored score."""
    out: dict[tuple[int, str], str] = {}
    with store.engine.connect() as conn:
        for i in range(0, len(subjects), _CHUNK):
            part = subjects[i:i + _CHUNK]
            latest = (select(scores.c.subject_id, scores.c.task, func.max(scores.c.prediction_time).label("pt"))
                      .where(scores.c.site == site).where(scores.c.subject_id.in_(part))
                      .group_by(scores.c.subject_id, scores.c.task).subquery())
            rows = conn.execute(select(scores.c.subject_id, scores.c.task, scores.c.tier).join(latest, and_(
                scores.c.subject_id == latest.c.subject_id, scores.c.task == latest.c.task,
                scores.c.prediction_time == latest.c.pt)).where(scores.c.site == site)).all()
            out.update({(int(r[0]), r[1]): r[2] for r in rows})
    return out


def _recently_alerted(store: ScoreStore, site: str, subjects: list[int], since: datetime) -> set[tuple[int, str]]:
    out: set[tuple[int, str]] = set()
    with store.engine.connect() as conn:
        for i in range(0, len(subjects), _CHUNK):
            rows = conn.execute(select(device_alerts.c.subject_id, device_alerts.c.task)
                                .where(device_alerts.c.site == site)
                                .where(device_alerts.c.subject_id.in_(subjects[i:i + _CHUNK]))
                                .where(device_alerts.c.created_at >= since)).all()
            out.update((int(r[0]), r[1]) for r in rows)
    return out
