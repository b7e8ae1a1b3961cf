"""The device registry: a device id bound to one (pseudonymous) patient and site, until revoked.

Admin operations (`chronorisk devices register|list|revoke`) go through these functions, each
with its audit entry in the same transaction: the whole row inserted, or the columns set
(`record_insert` / `record_update`), so that `chronorisk audit verify` rebuilds the bindings from the
log and names one inserted, edited or deleted directly in the database. A reading is attached to a
patient only through an active registration of its device at the topic's site; anything else is
quarantined.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from chronorisk.devices.tables import devices
from chronorisk.errors import InputError
from chronorisk.serving.store import ScoreStore, utcnow, writer

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SITE_ID = re.compile(r"^[a-z0-9_]{1,64}$")
KINDS = ("bp", "glucose", "weight", "multi")


@dataclass(frozen=True)
class Registration:
    device_id: str
    site: str
    subject_id: int
    kind: str | None
    registered_at: datetime
    revoked_at: datetime | None

    def active_at(self, when: datetime) -> bool:
        return self.revoked_at is None or when < self.revoked_at


def check_device_id(device_id: str, field: str = "--device") -> str:
    if not isinstance(device_id, str) or not DEVICE_ID.match(device_id):
        raise InputError(field, f"{device_id!r} is not a device id (letters, digits, '.', '_', ':', '-'; "
                                "at most 128 characters, no '/', '+' or '#')")
    return device_id


def check_registration(device_id: str, site: str, subject_id: int, kind: str | None) -> None:
    check_device_id(device_id)
    if not isinstance(site, str) or not SITE_ID.match(site):
        raise InputError("--site", f"{site!r} is not a site id (lower-case letters, digits and '_')")
    if isinstance(subject_id, bool) or not isinstance(subject_id, int) or not 0 <= subject_id < 2**63:
        raise InputError("--subject", f"{subject_id!r} is not a pseudonymous subject id (a non-negative 64-bit int)")
    if kind is not None and kind not in KINDS:
        raise InputError("--kind", f"{kind!r} is not a device kind; accepted: {', '.join(KINDS)}")


def register(store: ScoreStore, rows: Sequence[dict], audit, actor: str) -> int:
    """Register (or re-bind after a revocation) devices, each with an audit entry, in one transaction.

    A device id already active for another patient or site is refused: revoke it first."""
    for r in rows:
        check_registration(r["device_id"], r["site"], r["subject_id"], r.get("kind"))
    now = utcnow()
    with writer(store.engine) as conn, conn.begin():
        current = _registrations(conn, [r["device_id"] for r in rows])
        for r in rows:
            old = current.get(r["device_id"])
            if old is not None and old.revoked_at is None:
                if (old.site, old.subject_id) == (r["site"], r["subject_id"]):
                    continue  # already registered: registering again changes nothing
                raise InputError("--device", f"device {r['device_id']} is registered to another patient; revoke it "
                                             "first")
            values = {"site": r["site"], "subject_id": int(r["subject_id"]), "kind": r.get("kind"),
                      "registered_at": now, "revoked_at": None}
            who = {"actor": actor, "role": "admin", "action": "device_register", "site": r["site"]}
            if old is None:
                row = {"device_id": r["device_id"], **values}
                conn.execute(devices.insert().values(**row))
                audit.record_insert(conn, devices, row, subject_id=int(r["subject_id"]), **who)
            else:
                conn.execute(update(devices).where(devices.c.device_id == r["device_id"]).values(**values))
                audit.record_update(conn, devices, r["device_id"], values, subject_id=int(r["subject_id"]), **who)
    return len(rows)


def revoke(store: ScoreStore, device_id: str, audit, actor: str) -> bool:
    """Revoke an active device (its later readings are quarantined); False if none was active."""
    check_device_id(device_id)
    with writer(store.engine) as conn, conn.begin():
        reg = _registrations(conn, [device_id]).get(device_id)
        if reg is None or reg.revoked_at is not None:
            return False
        values = {"revoked_at": utcnow()}
        conn.execute(update(devices).where(devices.c.device_id == device_id).values(**values))
        audit.record_update(conn, devices, device_id, values, actor=actor, role="admin", action="device_revoke",
                            site=reg.site, subject_id=reg.subject_id)
    return True


def list_devices(store: ScoreStore, site: str | None = None) -> list[Registration]:
    q = select(devices).order_by(devices.c.site, devices.c.device_id)
    if site:
        q = q.where(devices.c.site == site)
    with store.engine.connect() as conn:
        return [Registration(**r) for r in conn.execute(q).mappings().all()]


def lookup(store: ScoreStore, device_ids: Iterable[str]) -> dict[str, Registration]:
    """The registrations of these device ids (unknown ids are absent)."""
    with store.engine.connect() as conn:
        return _registrations(conn, device_ids)


def _registrations(conn, device_ids: Iterable[str]) -> dict[str, Registration]:
    ids = sorted(set(device_ids))
    found: dict[str, Registration] = {}
    for start in range(0, len(ids), 500):
        rows = conn.execute(select(devices).where(devices.c.device_id.in_(ids[start:start + 500]))).mappings().all()
        found.update({r["device_id"]: Registration(**r) for r in rows})
    return found
