"""Append-only, hash-chained audit log of patient reads, exports, admin actions and state changes.

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

Two more guards close what a chain inside the database cannot:

* **Checkpoints outside the database.** After every committed append, a
  signed line `{seq, hash, mac}` is appended to each checkpoint file
  (`<work>/audit/checkpoints.jsonl`, plus `serve.audit_checkpoint_files`, e.g.
  on another machine's mount or append-only storage). `verify` checks the
  database against the latest valid checkpoint, so a wiped table, a truncated
  tail or an older head written back (all of which leave a valid shorter chain
  with a valid head) are caught.
* **State replay.** Consent withdrawals and renewals, API keys (created,
  revoked) and device bindings (registered, re-bound, revoked) are recorded as
  entries carrying the whole row (`record_insert`, `record_update`), and each
  batch-scored chunk as its row count and the sum of its rows' SHA-256
  (`record_scores`), in the transaction that writes the rows. `verify` rebuilds
  those tables from the log and compares them with the database: a deleted
  consent row, an inserted or edited key or device binding, a score edited,
  deleted or added directly is named.
* **Model promotions.** Each move of a task's `champion` alias made by
  `chronorisk promote` is an entry (`serving/promotions.py`: from which version
  to which, with the version's run and source). `verify` replays them: each
  move must start where the previous one ended, and the registry's champions
  now (a `RegistryView` read by the caller) must be the last recorded ones, so a
  promotion made directly in MLflow, or a promotion entry deleted, is named.

What it does not protect against (README, security): someone holding the
service secret AND write access to the database AND every checkpoint store
can rewrite everything consistently; a change made and undone between two
verifications leaves no trace in the tables; the entries after the latest
checkpoint that survived are only as safe as the chain and head (checkpoint
lines are not fsynced; one is written as its transaction commits, so a
database failure at that instant shows as a checkpoint ahead of the log, a
false alarm on the safe side); patient facts are not replayed; a model's
artifacts changed in place in the artifact store, and aliases other than
`champion` (the `challenger` moves with every training run), are not covered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from sqlalchemy import BigInteger, Column, Integer, String, Table, Text, event, select, text

from chronorisk.devices.tables import devices
from chronorisk.serving.store import api_keys, consent, consent_renewals, metadata, utcnow, writer

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
_HEAD_GENESIS = text(
    "INSERT INTO audit_head (id, seq, hash, mac) VALUES (1, 0, :hash, :mac) ON CONFLICT (id) DO NOTHING"
)
_HEAD_UPDATE = text("UPDATE audit_head SET seq = :seq, hash = :hash, mac = :mac WHERE id = 1")


def canonical_detail(detail: dict | None) -> str:
    return json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), default=str)


def entry_hash(entry: dict) -> str:
    """SHA-256 over the entry's fields in a fixed order (the previous hash included)."""
    payload = json.dumps([entry[k] for k in FIELDS], separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def head_mac(secret: bytes, seq: int, digest: str) -> str:
    return hmac.new(secret, f"audit-head:{seq}:{digest}".encode(), hashlib.sha256).hexdigest()


def checkpoint_mac(secret: bytes, seq: int, digest: str) -> str:
    return hmac.new(secret, f"audit-checkpoint:{seq}:{digest}".encode(), hashlib.sha256).hexdigest()


# tables whose rows `verify` rebuilds from the log, by the column naming a row
REPLAYED: dict[str, tuple[Table, str]] = {
    "consent": (consent, "id"),
    "consent_renewals": (consent_renewals, "id"),
    "api_keys": (api_keys, "key_id"),
    "devices": (devices, "device_id"),
}
# the registry alias whose moves are audit entries (`chronorisk promote`) and that `verify` replays
PROMOTED_ALIAS = "champion"
PROMOTION = "model_promote"


def row_json(row: dict) -> dict:
    """A row as JSON values, the same whether it came from the code that wrote it or from the table."""
    out = {}
    for k, v in row.items():
        if isinstance(v, datetime | date):
            v = v.isoformat()
        out[k] = v
    return out


class AuditLog:
    """Append and verify entries on the store's engine; `secret` keys the head MAC."""

    def __init__(self, engine, secret: bytes, checkpoints: Sequence[Path] = ()):
        self.engine = engine
        self.secret = secret
        self.checkpoints = [Path(p) for p in checkpoints]
        if self.checkpoints:
            _listen_commits(engine)

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
            # first entry ever: every starter inserts the genesis head (the losers wait for the winner's
            # commit, then skip), then locks it. A LOCK TABLE here deadlocked: each starter already held
            # the table's ROW SHARE lock from the SELECT ... FOR UPDATE above.
            conn.execute(_HEAD_GENESIS, {"hash": GENESIS, "mac": head_mac(self.secret, 0, GENESIS)})
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
        if self.checkpoints:
            # written when the transaction commits (a rolled-back entry leaves no checkpoint)
            conn.info["audit_checkpoint"] = (self, entry["seq"], entry["hash"])
        return entry["seq"]

    def record_insert(self, conn, table: Table, row: dict, *, actor: str, role: str, action: str,
                      site: str | None = None, subject_id: int | None = None) -> int:
        """Append the entry of a state change that inserted `row` into `table` (in the caller's transaction)."""
        return self.append_in(conn, actor=actor, role=role, action=action, site=site, subject_id=subject_id,
                              detail={"table": table.name, "insert": row_json(row)})

    def record_update(self, conn, table: Table, key: str, values: dict, *, actor: str, role: str, action: str,
                      site: str | None = None, subject_id: int | None = None) -> int:
        """Append the entry of a state change that set `values` on the row named `key` of `table`."""
        return self.append_in(conn, actor=actor, role=role, action=action, site=site, subject_id=subject_id,
                              detail={"table": table.name, "key": key, "update": row_json(values)})

    def record_promotion(self, *, task: str, from_version: int | None, to: dict | None, actor: str,
                         role: str = "admin", acknowledged: bool = False) -> int:
        """Append the entry of a move of `task`'s champion alias: from `from_version` (None: there was
        none) to `to` ({version, run_id, source}; None: the alias was removed). `acknowledged`: not a move
        made by chronorisk, but one found in the registry and accepted by an admin (`audit
        record-champions`)."""
        detail = {"registry_alias": PROMOTED_ALIAS, "task": task, "from_version": from_version,
                  "to": None if to is None else {k: to.get(k) for k in ("version", "run_id", "source")}}
        if acknowledged:
            detail["acknowledged"] = True
        return self.append(actor=actor, role=role, action=PROMOTION, detail=detail)

    def acknowledge_champions(self, registry: RegistryView, actor: str) -> list[str]:
        """Record every champion of `registry` that differs from the last recorded one (a promotion made
        before promotions were audited, or without the secret) as an acknowledged move; returns the tasks."""
        replay = StateReplay()
        for e in self.entries():
            if e["action"] == PROMOTION:
                replay.apply(e)
        done = []
        for task in sorted(set(replay.champions) | set(registry.champions)):
            recorded = replay.champions.get(task, (None, None))[1]
            actual = registry.champions.get(task)
            if recorded != actual:
                self.record_promotion(task=task, from_version=recorded["version"] if recorded else None, to=actual,
                                      actor=actor, acknowledged=True)
                done.append(task)
        return done

    def record_scores(self, conn, score_rows, checkpoints) -> None:
        """One entry per (site, task, prediction time) of a written chunk: its row count and the digest
        of its rows (`scores_digest`), so that `verify` finds score rows edited, deleted or added later."""
        for (site, task, when), (n, digest) in scores_digest(_score_tuples(score_rows)).items():
            chunk = next((c["chunk"] for c in checkpoints if c.get("task") == task), None) or f"direct:{digest[:16]}"
            self.append_in(conn, actor="batch", role="system", action="scores_write", site=site,
                           detail={"table": "scores", "task": task, "prediction_time": when, "chunk": chunk,
                                   "rows": n, "digest": digest})

    def write_checkpoint(self, seq: int, digest: str) -> None:
        """Append one signed line to every checkpoint file (O_APPEND: whole lines from any worker)."""
        line = json.dumps({"seq": seq, "hash": digest, "at": utcnow().isoformat(timespec="seconds"),
                           "mac": checkpoint_mac(self.secret, seq, digest)}, separators=(",", ":")) + "\n"
        data = line.encode()
        for path in self.checkpoints:
            os.write(_append_fd(path), data)

    def checkpoint_now(self) -> int:
        """Checkpoint the current head (after a verification or before a backup); returns its seq."""
        with self.engine.connect() as conn:
            head = conn.execute(_HEAD).first()
        if head is None:
            return 0
        self.write_checkpoint(int(head[0]), head[1])
        return int(head[0])

    def latest_checkpoint(self, problems: list[str]) -> tuple[int, str] | None:
        """The highest signed checkpoint over every file; lines with a bad signature are problems."""
        best: tuple[int, str] | None = None
        for path in self.checkpoints:
            if not path.is_file():
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                try:
                    cp = json.loads(line)
                    seq, digest, mac = int(cp["seq"]), str(cp["hash"]), str(cp["mac"])
                except (ValueError, KeyError, TypeError):
                    problems.append(f"checkpoint file {path.name} line {n}: unreadable")
                    continue
                if not hmac.compare_digest(mac, checkpoint_mac(self.secret, seq, digest)):
                    problems.append(f"checkpoint file {path.name} line {n}: signature invalid")
                    continue
                if best is None or seq > best[0]:
                    best = (seq, digest)
        return best

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

    def verify(self, registry: RegistryView | None = None) -> VerifyResult:
        """Walk the chain; the result names every entry that was edited, deleted or inserted, and every
        replayed table row (and, given `registry`, every champion) that differs from what the log says."""
        result = VerifyResult()
        checkpoint = self.latest_checkpoint(result.problems)
        checkpoint_hash = None
        replay = StateReplay()
        expected_seq, prev_hash = 1, GENESIS
        for e in self.entries():
            result.n_entries += 1
            replay.apply(e)
            if checkpoint is not None and e["seq"] == checkpoint[0]:
                checkpoint_hash = e["hash"]
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
        self._check_checkpoint(result, checkpoint, checkpoint_hash, last_seq)
        with self.engine.connect() as conn:
            result.problems.extend(replay.compare(conn))
        result.problems.extend(replay.promotion_problems)
        if registry is not None:
            result.problems.extend(replay.compare_registry(registry))
            result.registry_checked = registry.where
        result.n_promotions = len(replay.champions)
        return result

    def _check_checkpoint(self, result: VerifyResult, checkpoint, checkpoint_hash, last_seq: int) -> None:
        if checkpoint is None:
            result.checkpoint = None
            if self.checkpoints and last_seq:
                result.problems.append(
                    f"no checkpoint found in {', '.join(p.name for p in self.checkpoints)} although the log holds "
                    f"{last_seq} entries: the checkpoint file was deleted, or the log was written elsewhere"
                )
            return
        seq, digest = checkpoint
        result.checkpoint = seq
        if last_seq < seq:
            result.problems.append(
                f"the log ends at entry {last_seq} but a signed checkpoint records entry {seq}: "
                "entries were deleted and the head rolled back (or the table wiped)"
            )
        elif checkpoint_hash != digest:
            result.problems.append(f"entry {seq}: differs from the signed checkpoint (the log was rewritten)")


SCORE_FIELDS = ("site", "subject_id", "task", "prediction_time", "risk", "tier", "model_version")
_MOD = 2**256


def _score_tuples(rows):
    """(site, subject, task, time, risk, tier, version) of score rows: dicts or a polars frame."""
    if type(rows).__module__.startswith("polars"):
        return zip(*(rows.get_column(c).to_list() for c in SCORE_FIELDS), strict=True)
    return (tuple(r[c] for c in SCORE_FIELDS) for r in rows)


def scores_digest(tuples) -> dict[tuple[str, str, str], tuple[int, str]]:
    """Per (site, task, prediction time): the row count and the sum of the rows' SHA-256 (mod 2**256).
    A sum, so that chunks written separately add up to what the table holds."""
    sums: dict[tuple[str, str, str], list[int]] = {}
    for site, sid, task, when, risk, tier, version in tuples:
        key = (site, task, when.isoformat() if isinstance(when, datetime) else str(when))
        line = f"{site}|{int(sid)}|{task}|{key[2]}|{float(risk)!r}|{tier}|{version}".encode()
        acc = sums.setdefault(key, [0, 0])
        acc[0] += 1
        acc[1] = (acc[1] + int.from_bytes(hashlib.sha256(line).digest(), "big")) % _MOD
    return {k: (n, f"{d:064x}") for k, (n, d) in sums.items()}


@dataclass(frozen=True)
class RegistryView:
    """What the model registry holds now: per task (registered model `chronorisk-<task>`), the version its
    champion alias points at ({version, run_id, source}, None when it has none), and the versions set to
    an MLflow stage (task, version, stage): chronorisk sets none, so each one was set outside it."""

    where: str  # the registry, for messages (no password)
    champions: dict[str, dict | None] = field(default_factory=dict)
    staged: tuple[tuple[str, int, str], ...] = ()


# entries written before device bindings were replayed: (device_id in the detail, nothing else)
_LEGACY_DEVICE_ACTIONS = ("device_register", "device_revoke")


class StateReplay:
    """The consent, key, device and score tables and the champions as the audit log says they are,
    compared with the database and the registry."""

    def __init__(self):
        self.rows: dict[str, dict[str, tuple[int, dict]]] = {name: {} for name in REPLAYED}
        self.score_chunks: dict[tuple[str, str, str, str], tuple[int, int, str]] = {}
        self.champions: dict[str, tuple[int, dict | None]] = {}  # task -> (seq, {version, run_id, source})
        self.promotion_problems: list[str] = []

    def apply(self, entry: dict) -> None:
        if entry["action"] in _LEGACY_DEVICE_ACTIONS and '"table"' not in entry["detail"]:
            self._apply_legacy_device(entry)
            return
        if entry["action"] == PROMOTION:
            self._apply_promotion(entry)
            return
        if '"table"' not in entry["detail"]:
            return
        try:
            detail = json.loads(entry["detail"])
        except ValueError:
            return
        name = detail.get("table")
        if name == "scores":
            key = (entry["site"], detail.get("task"), detail.get("prediction_time"), detail.get("chunk"))
            self.score_chunks[key] = (entry["seq"], int(detail.get("rows", 0)), str(detail.get("digest")))
            return
        if name not in self.rows:
            return
        key_col = REPLAYED[name][1]
        if "insert" in detail:
            row = detail["insert"]
            self.rows[name][str(row.get(key_col))] = (entry["seq"], row)
        elif "update" in detail:
            seq_row = self.rows[name].get(str(detail.get("key")))
            if seq_row is not None:
                self.rows[name][str(detail.get("key"))] = (entry["seq"], {**seq_row[1], **detail["update"]})

    def _apply_legacy_device(self, entry: dict) -> None:
        """A device entry of the older form: the columns it names are checked, its times are not."""
        try:
            device_id = str(json.loads(entry["detail"]).get("device_id"))
        except (ValueError, AttributeError):
            return
        rows = self.rows["devices"]
        if entry["action"] == "device_register":
            kind = json.loads(entry["detail"]).get("kind")
            rows[device_id] = (entry["seq"], {"device_id": device_id, "site": entry["site"],
                                              "subject_id": entry["subject_id"], "kind": kind, "revoked_at": None})
        elif device_id in rows:
            seq_row = rows[device_id][1]
            rows[device_id] = (entry["seq"], {k: v for k, v in seq_row.items() if k != "revoked_at"})

    def _apply_promotion(self, entry: dict) -> None:
        try:
            detail = json.loads(entry["detail"])
            task, before, to = str(detail["task"]), detail.get("from_version"), detail.get("to")
        except (ValueError, KeyError, TypeError):
            self.promotion_problems.append(f"entry {entry['seq']}: a promotion entry that cannot be read")
            return
        previous = self.champions.get(task)
        recorded = previous[1]["version"] if previous and previous[1] else None
        if before != recorded:
            since = f"entry {previous[0]} recorded version {recorded}" if previous else "no earlier promotion"
            self.promotion_problems.append(
                f"champion of {task}: entry {entry['seq']} moved it from version {before}, but {since}: "
                "a promotion in between was made outside `chronorisk promote` (or its entry deleted)")
        self.champions[task] = (entry["seq"], to)

    def compare_registry(self, registry: RegistryView) -> list[str]:
        problems = []
        for task in sorted(set(self.champions) | set(registry.champions)):
            actual = registry.champions.get(task)
            seq, recorded = self.champions.get(task, (None, None))
            where = f"chronorisk-{task} in the registry"
            if recorded is None and actual is None:
                continue
            if seq is None:
                problems.append(f"{where}: champion is version {actual['version']} but no promotion is recorded in "
                                "the audit log (promoted directly in MLflow, or before promotions were audited: "
                                "`chronorisk audit record-champions` records it as acknowledged)")
            elif actual is None:
                problems.append(f"{where}: no champion, but audit entry {seq} recorded version {recorded['version']}"
                                " (the alias or model was removed directly, or verify reads another registry: "
                                "--tracking-uri)")
            elif recorded is None:
                problems.append(f"{where}: champion is version {actual['version']} but audit entry {seq} recorded "
                                "its removal")
            else:
                changed = sorted(k for k in ("version", "run_id", "source") if recorded.get(k) != actual.get(k))
                if changed:
                    problems.append(f"{where}: champion {', '.join(changed)} differ from audit entry {seq} (version "
                                    f"{actual['version']} now, {recorded['version']} recorded): promoted outside "
                                    "`chronorisk promote`")
        for task, version, stage in registry.staged:
            problems.append(f"chronorisk-{task} version {version} is in MLflow stage {stage!r}: chronorisk sets no "
                            "stages, so it was set directly in MLflow")
        return problems

    def compare(self, conn) -> list[str]:
        problems = []
        for name, (table, key_col) in REPLAYED.items():
            expected = self.rows[name]
            actual = {str(r[key_col]): row_json(dict(r)) for r in conn.execute(select(table)).mappings()}
            for key, row in actual.items():
                if key not in expected:
                    problems.append(f"{name} row {key_col}={key}: not recorded in the audit log (inserted directly)")
                    continue
                seq, recorded = expected[key]
                changed = sorted(c for c in recorded if recorded[c] != row.get(c))
                if changed:
                    problems.append(f"{name} row {key_col}={key}: {', '.join(changed)} differ from audit entry {seq} "
                                    "(edited)")
            for key, (seq, _row) in expected.items():
                if key not in actual:
                    problems.append(f"{name} row {key_col}={key}: recorded by audit entry {seq} but missing (deleted)")
        return problems + self.compare_scores(conn)

    def compare_scores(self, conn) -> list[str]:
        from chronorisk.serving.store import scores

        expected: dict[tuple[str, str, str], list[int]] = {}
        for (site, task, when, _chunk), (_seq, n, digest) in self.score_chunks.items():
            acc = expected.setdefault((site, task, when), [0, 0])
            acc[0] += n
            acc[1] = (acc[1] + int(digest, 16)) % _MOD
        rows = conn.execute(select(*(scores.c[c] for c in SCORE_FIELDS))).all()
        actual = scores_digest(tuple(r) for r in rows)
        problems = []
        for key in sorted(set(expected) | set(actual)):
            what = f"scores of {key[0]} {key[1]} at {key[2][:10]}"
            if key not in expected:
                problems.append(f"{what}: {actual[key][0]} rows not recorded in the audit log (written directly)")
            elif key not in actual:
                problems.append(f"{what}: recorded in the audit log but missing (deleted)")
            elif actual[key][0] != expected[key][0]:
                problems.append(f"{what}: {actual[key][0]} rows, the audit log recorded {expected[key][0]}")
            elif int(actual[key][1], 16) != expected[key][1]:
                problems.append(f"{what}: rows differ from those recorded (edited)")
        return problems


_FDS: dict[tuple[int, str], int] = {}


def _append_fd(path: Path) -> int:
    """This process's O_APPEND descriptor of a checkpoint file (opened once; a forked worker opens its own)."""
    key = (os.getpid(), str(path))
    fd = _FDS.get(key)
    if fd is not None and os.fstat(fd).st_nlink == 0:  # deleted or rotated away: write to the new file
        os.close(fd)
        fd = None
    if fd is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _FDS[key] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return fd


def _on_commit(conn) -> None:
    pending = conn.info.pop("audit_checkpoint", None)
    if pending is not None:
        log, seq, digest = pending
        log.write_checkpoint(seq, digest)


def _on_rollback(conn) -> None:
    conn.info.pop("audit_checkpoint", None)


def _listen_commits(engine) -> None:
    """Write the pending checkpoint of a connection when its transaction commits; drop it on rollback."""
    if not event.contains(engine, "commit", _on_commit):
        event.listen(engine, "commit", _on_commit)
        event.listen(engine, "rollback", _on_rollback)


@dataclass
class VerifyResult:
    n_entries: int = 0
    last_seq: int = 0
    checkpoint: int | None = None
    problems: list[str] = field(default_factory=list)
    n_promotions: int = 0  # tasks with a recorded champion
    registry_checked: str | None = None  # the registry the champions were compared with

    @property
    def ok(self) -> bool:
        return not self.problems
