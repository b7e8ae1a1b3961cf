"""Alerts of a rising tier: the outbox to `<prefix>/<site>/alerts` and the GP worklist's read.

The consumer stores alerts in the same transaction as the score that raised them; publishing
is an outbox: every alert not yet confirmed by the broker (`published_at` null) is published
again at the next batch and after a restart, so subscribers may see an alert twice (its
`alert_id` tells) but never miss one.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import orjson
from sqlalchemy import func, select, update

from chronorisk.devices.tables import device_alerts, worklist_visits
from chronorisk.serving.store import utcnow, writer


def alert_payload(alert: dict) -> bytes:
    """The JSON published for an alert (pseudonymous subject id, no other identifier)."""
    return orjson.dumps({
        "alert_id": alert["alert_id"], "site": alert["site"], "subject_id": alert["subject_id"],
        "task": alert["task"], "from_tier": alert["from_tier"], "to_tier": alert["to_tier"],
        "risk": round(float(alert["risk"]), 4),
        "prediction_time": alert["prediction_time"].isoformat(), "created_at": alert["created_at"].isoformat(),
    })


def unpublished(engine, limit: int = 1000) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(select(device_alerts).where(device_alerts.c.published_at.is_(None))
                            .order_by(device_alerts.c.alert_id).limit(limit)).mappings().all()
    return [dict(r) for r in rows]


def mark_published(engine, alert_ids: Iterable[int]) -> None:
    ids = sorted(set(alert_ids))
    if not ids:
        return
    with writer(engine) as conn, conn.begin():
        conn.execute(update(device_alerts).where(device_alerts.c.alert_id.in_(ids)).values(published_at=utcnow()))


def count_alerts(engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(device_alerts)).scalar() or 0)


def worklist_alerts(engine, site: str, actor: str, *, limit: int = 50) -> tuple[list[dict], datetime | None]:
    """The site's alerts since this user's previous worklist visit (newest first), and that visit's time;
    records this visit. Without the device tables (no stream ever ran) there is nothing to show."""
    from sqlalchemy import inspect

    if not inspect(engine).has_table(device_alerts.name):
        return [], None
    now = utcnow()
    with writer(engine) as conn, conn.begin():
        last = conn.execute(select(worklist_visits.c.visited_at).where(worklist_visits.c.actor == actor[:64])
                            .where(worklist_visits.c.site == site)).scalar()
        q = select(device_alerts).where(device_alerts.c.site == site)
        if last is not None:
            q = q.where(device_alerts.c.created_at > last)
        rows = conn.execute(q.order_by(device_alerts.c.created_at.desc()).limit(limit)).mappings().all()
        if last is None:
            conn.execute(worklist_visits.insert().values(actor=actor[:64], site=site, visited_at=now))
        else:
            conn.execute(update(worklist_visits).where(worklist_visits.c.actor == actor[:64])
                         .where(worklist_visits.c.site == site).values(visited_at=now))
    return [dict(r) for r in rows], last
