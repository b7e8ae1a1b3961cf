"""Append-only, hash-chained audit log of patient reads, exports and admin actions.

Each entry stores the SHA-256 of its own canonical content *including the
previous entry's hash*, so editing an entry breaks its own hash and deleting
one breaks the link of the next. Deleting the newest entries leaves a valid
shorter chain; to catch that, a one-row `audit_head` table keeps the last
sequence number and hash under an HMAC with the service secret, written in
the same transaction as every append. `verify()` walks the chain and names
the first entry that does not check out.

Appends are serialized: SQLite takes the write lock at BEGIN (IMMEDIATE),
PostgreSQL locks the head row (SELECT ... FOR UPDATE), so two workers never
chain onto the same predecessor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import BigInteger, Column, Integer, String, Table, Text, select, text

from chronorisk.serving.store import metadata, utcnow, writer

GENESIS = "0" * 64

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at", String(32), nullable=False),  # ISO text: hashed exactly as stored
    Column("actor", String(64), nullable=False),  # key id, or "cli:<user>" for admin commands
    Column("role", String(32), nullable=False),
    Column("site", String(64), nullable=True),
    Column("action", String(32), nullable=False),
    Column("subject_id", BigInteger, nullable=True),
    Column("detail", Text, nullable=False),  # canonical JSON
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("mac", String(64), nullable=False),
)

FIELDS = ("seq", "at", "actor", "role", "site", "action", "subject_id", "detail", "prev_hash")

# prepared statements of the append path (run on every patient read)
_HEAD = text("SELECT seq, hash FROM audit_head WHERE id = 1")
_HEAD_FOR_UPDATE = text("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
_INSERT = text(
    "INSERT INTO audit_log (seq, at, actor, role, site, action, subject_id, detail, prev_hash, hash) "
    "VALUES (:seq, :at, :actor, :role, :site, :action, :subject_id, :detail, :prev_hash, :hash)"
)
_HEAD_INSERT = text("INSERT INTO audit_head (id, seq, hash, mac) VALUES (1, :seq, :hash, :mac)")
_HEAD_UPDATE = text("UPDATE audit_head SET seq = :seq, hash = :hash, mac = :mac WHERE id = 1")


def canonical_detail(detail: dict | None) -> str:
    return json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), default=str)


def entry_hash(entry: dict) -> str:
    """SHA-256 over the entry's fields in a fixed order (the previous hash included)."""
    payload = json.dumps([entry[k] for k in FIELDS], separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def head_mac(secret: bytes, seq: int, digest: str) -> str:
    return hmac.new(secret, f"audit-head:{seq}:{digest}".encode(), hashlib.sha256).hexdigest()


class AuditLog:
    """Append and verify entries on the store's engine; `secret` keys the head MAC."""

    def __init__(self, engine, secret: bytes):
        self.engine = engine
        self.secret = secret

    def append(
        self,
        *,
        actor: str,
        role: str,
        action: str,
        site: str | None = None,
        subject_id: int | None = None,
        detail: dict | None = None,
    ) -> int:
        """Append one entry; returns its sequence number."""
        with writer(self.engine) as conn, conn.begin():
            return self.append_in(conn, actor=actor, role=role, action=action, site=site,
                                  subject_id=subject_id, detail=detail)

    def append_in(self, conn, *, actor, role, action, site=None, subject_id=None, detail=None) -> int:
        """Append inside the caller's transaction (so a read or an export and its entry commit together)."""
        postgres = conn.dialect.name == "postgresql"
        head = conn.execute(_HEAD_FOR_UPDATE if postgres else _HEAD).first()
        if head is None and postgres:
            # first entry ever: serialize the creation of the head row
            conn.exec_driver_sql("LOCK TABLE audit_head IN EXCLUSIVE MODE")
            head = conn.execute(_HEAD_FOR_UPDATE).first()
        prev_seq, prev_hash = (head[0], head[1]) if head else (0, GENESIS)
        entry = {
            "seq": int(prev_seq) + 1,
            "at": utcnow().isoformat(timespec="microseconds"),
            "actor": str(actor),
            "role": str(role),
            "site": site,
            "action": str(action),
            "subject_id": int(subject_id) if subject_id is not None else None,
            "detail": canonical_detail(detail),
            "prev_hash": prev_hash,
        }
        entry["hash"] = entry_hash(entry)
        conn.execute(_INSERT, entry)
        mac = head_mac(self.secret, entry["seq"], entry["hash"])
        conn.execute(_HEAD_INSERT if head is None else _HEAD_UPDATE,
                     {"seq": entry["seq"], "hash": entry["hash"], "mac": mac})
        return entry["seq"]

    def entries(self, batch: int = 10_000) -> Iterator[dict]:
        """Every entry in sequence order (streamed in batches)."""
        last = 0
        with self.engine.connect() as conn:
            while True:
                rows = conn.execute(
                    select(audit_log).where(audit_log.c.seq > last).order_by(audit_log.c.seq).limit(batch)
                ).mappings().all()
                if not rows:
                    return
                for r in rows:
                    yield dict(r)
                last = rows[-1]["seq"]

    def verify(self) -> VerifyResult:
        """Walk the chain; the result names every entry that was edited, deleted or inserted."""
        result = VerifyResult()
        expected_seq, prev_hash = 1, GENESIS
        for e in self.entries():
            result.n_entries += 1
            if e["seq"] != expected_seq:
                missing = f"{expected_seq}" if e["seq"] == expected_seq + 1 else f"{expected_seq}-{e['seq'] - 1}"
                result.problems.append(f"entry {missing} deleted (sequence jumps to {e['seq']})")
            elif e["prev_hash"] != prev_hash:
                result.problems.append(f"entry {e['seq']}: link to the previous entry broken")
            if entry_hash(e) != e["hash"]:
                result.problems.append(f"entry {e['seq']}: content does not match its hash (edited)")
            expected_seq, prev_hash = e["seq"] + 1, e["hash"]
        last_seq = expected_seq - 1
        with self.engine.connect() as conn:
            head = conn.execute(select(audit_head).where(audit_head.c.id == 1)).mappings().first()
        if head is None:
            if result.n_entries:
                result.problems.append("audit head missing: the log cannot be checked for truncation")
        else:
            if not hmac.compare_digest(head["mac"], head_mac(self.secret, head["seq"], head["hash"])):
                result.problems.append("audit head: signature invalid (edited, or a different secret)")
            if head["seq"] > last_seq:
                result.problems.append(
                    f"entries {last_seq + 1}-{head['seq']} deleted (the head records {head['seq']} entries)"
                )
            elif head["seq"] < last_seq:
                result.problems.append(f"entries after {head['seq']} were not appended through the log")
            elif head["hash"] != prev_hash:
                result.problems.append(f"entry {last_seq}: hash differs from the signed head (replaced)")
        result.last_seq = last_seq
        return result


@dataclass
class VerifyResult:
    n_entries: int = 0
    last_seq: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems
