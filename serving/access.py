"""Who may do what: API keys carrying a role (and a site for GPs), signed page sessions.

A key is `crk_<key_id>_<secret>`; the store keeps only the SHA-256 of the
secret, so a copy of the database does not give working keys. The browser
pages use a signed session cookie (HMAC with the service secret) naming a
server-side session row; each request re-checks that the session is not
revoked (sign-out revokes it) and that its key is not revoked (a worker
trusts a lookup for `serve.key_cache_seconds`).

Failed keys and sign-ins are rate limited: per client
address `serve.auth_failures_per_minute`, and per key id
`serve.key_lockout_failures` in `serve.key_lockout_minutes`, after which the
key id is locked (429 with Retry-After, even with the right secret) until the
window passes. Failures and lockouts are audited. The counters live in the score
store's database by default (`serve.rate_limit_storage: store`, the `auth_failures`
table: one row per failure, counted over a moving window), so every worker and
replica on the same store shares them; a `limits` storage URL instead (`redis://...`,
shared; `memory://`, per worker) uses that library.

The service secret (session signatures, audit head) comes from an
environment variable or a file outside the repository; in demo mode it is
created under `<work>/secrets/`. Roles:

| role | may |
|---|---|
| gp | score; read and list patients of their own site; withdraw consent at their site |
| public_health | de-identified cohorts and exports (cohort.py), noisy budgeted aggregates (privacy.py) |
| data_scientist | score; the same cohorts, exports and aggregates |
| mlops | score (checks); service and monitoring pages |
| admin | everything, at every site |
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as pysecrets
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Column, DateTime, Float, Index, Integer, String, Table, delete, select, text, update

from chronorisk.errors import ChronoriskError, InputError
from chronorisk.serving.store import api_keys, metadata, utcnow, writer

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(32), primary_key=True),
    Column("key_id", String(32), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Column("revoked_at", DateTime, nullable=True),
)

# failed authentications, when `serve.rate_limit_storage` is `store` (AuthGuard, StoreCounters)
auth_failures = Table(
    "auth_failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("bucket", String(32), nullable=False),  # hash of "<address|key>:<value>", kept one window at most
    Column("at", Float, nullable=False),  # Unix time of the failure (every worker's clock is the machine's)
    Index("ix_auth_failures_bucket", "bucket", "at"),
    Index("ix_auth_failures_at", "at"),
)

ROLES = ("gp", "public_health", "data_scientist", "mlops", "admin")
KEY_PREFIX = "crk"

PERMISSIONS: dict[str, frozenset[str]] = {
    "gp": frozenset({"score", "patient_read", "worklist", "consent"}),
    "public_health": frozenset({"cohort", "export"}),
    "data_scientist": frozenset({"score", "cohort", "export"}),
    "mlops": frozenset({"score", "ops"}),
    "admin": frozenset({"score", "patient_read", "worklist", "consent", "cohort", "export", "ops", "admin"}),
}


@dataclass(frozen=True)
class Principal:
    """The caller: key id (never the secret), role and, for GPs, their site."""

    key_id: str
    role: str
    site: str | None
    label: str | None = None

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, frozenset())

    def may_read_site(self, site: str) -> bool:
        """GPs read their own site only; other roles with patient access read every site."""
        if not self.can("patient_read"):
            return False
        return self.role != "gp" or self.site == site

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}"


# -- the service secret ---------------------------------------------------------------------


def load_secret(env_var: str, secret_file: str | None, work: Path | None, *, demo: bool) -> bytes:
    """The signing secret: env var, else a file outside the repo, else (demo only) `<work>/secrets/`."""
    value = os.environ.get(env_var)
    if value:
        if len(value) < 16:
            raise InputError(env_var, "the service secret must be at least 16 characters")
        return value.encode()
    if secret_file:
        path = Path(secret_file).expanduser().resolve()
        _refuse_inside_repo(path)
        if not path.is_file():
            raise InputError("serve.secret_file", f"{path} does not exist")
        data = path.read_bytes().strip()
        if len(data) < 16:
            raise InputError("serve.secret_file", "the service secret must be at least 16 bytes")
        return data
    if demo and work is not None:
        return _demo_secret(Path(work) / "secrets" / "serve.key")
    raise ChronoriskError(
        f"no service secret: set {env_var} or serve.secret_file (a file outside the repository); "
        "demo mode (--demo or CHRONORISK_DEMO=1) creates one in the work folder"
    )


def _refuse_inside_repo(path: Path) -> None:
    from chronorisk.paths import project_root

    root = project_root()
    work = os.environ.get("CHRONORISK_WORK")
    inside_work = bool(work) and path.is_relative_to(Path(work).resolve())
    if path.is_relative_to(root) and not inside_work:
        raise InputError("serve.secret_file", "must be outside the repository (secrets are never committed)")


def _demo_secret(path: Path) -> bytes:
    if path.is_file():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, stat.S_IRWXU)
    value = pysecrets.token_urlsafe(32).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(value)
    try:
        os.link(tmp, path)  # atomic and refuses to replace: concurrent starters agree on one secret
    except FileExistsError:
        value = path.read_bytes().strip()
    finally:
        tmp.unlink()
    return value


def is_demo(flag: bool = False) -> bool:
    return flag or os.environ.get("CHRONORISK_DEMO") == "1"


# -- API keys --------------------------------------------------------------------------------


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(raw: str) -> tuple[str, str] | None:
    parts = raw.strip().split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    if len(parts[1]) > 32 or len(parts[2]) > 128:
        return None
    return parts[1], parts[2]


def validate_role(role: str, site: str | None) -> None:
    if role not in ROLES:
        raise InputError("role", f"unknown role {role!r}; accepted: {', '.join(ROLES)}")
    if role == "gp" and not site:
        raise InputError("site", "a gp key needs --site (a GP reads only their own site)")


def create_key(engine, role: str, site: str | None = None, label: str | None = None, *, audit=None,
               actor: str = "unknown") -> tuple[str, str]:
    """Create a key; returns (key_id, full key). The full key is shown once and never stored. With
    `audit` the new row is recorded in the audit log in the same transaction (`audit verify` replays it)."""
    validate_role(role, site)
    key_id = pysecrets.token_hex(6)
    secret = pysecrets.token_urlsafe(24).replace("_", "x")
    row = {"key_id": key_id, "secret_hash": _hash_secret(secret), "role": role,
           "site": site if role == "gp" else None, "label": label, "created_at": utcnow(), "revoked_at": None}
    with writer(engine) as conn, conn.begin():
        conn.execute(api_keys.insert().values(**row))
        if audit is not None:
            audit.record_insert(conn, api_keys, row, actor=actor, role="admin", action="key_create", site=row["site"])
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def revoke_key(engine, key_id: str, *, audit=None, actor: str = "unknown") -> bool:
    at = utcnow()
    with writer(engine) as conn, conn.begin():
        res = conn.execute(
            api_keys.update()
            .where(api_keys.c.key_id == key_id)
            .where(api_keys.c.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        if res.rowcount > 0 and audit is not None:
            audit.record_update(conn, api_keys, key_id, {"revoked_at": at}, actor=actor, role="admin",
                                action="key_revoke")
    return res.rowcount > 0


def list_keys(engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(api_keys.c.key_id, api_keys.c.role, api_keys.c.site, api_keys.c.label,
                   api_keys.c.created_at, api_keys.c.revoked_at).order_by(api_keys.c.created_at)
        ).mappings().all()
    return [dict(r) for r in rows]


class TooManyAttempts(ChronoriskError):
    """Too many failed keys from this address, or a locked key id: answer 429 with Retry-After."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed attempts: try again in {retry_after} s")
        self.retry_after = retry_after


STORE_COUNTERS = "store"


@dataclass(frozen=True)
class AuthLimits:
    """Rate limits of failed authentication (see the module docstring)."""

    failures_per_minute: int = 10
    lockout_failures: int = 5
    lockout_minutes: int = 15
    storage: str = STORE_COUNTERS


@dataclass(frozen=True)
class Rule:
    """At most `limit` failures of one bucket (kind, value) within `seconds`."""

    kind: str  # "address" or "key"
    value: str
    limit: int
    seconds: int

    @property
    def bucket(self) -> str:
        return hashlib.sha256(f"{self.kind}:{self.value}".encode()).hexdigest()[:32]


# the failures of one bucket (an address) or two (an address and a key id) since a time
_RECENT_FAILURES = [
    text("SELECT bucket, at FROM auth_failures WHERE bucket IN (" + ", ".join(f":b{i}" for i in range(n))
         + ") AND at > :since ORDER BY at")
    for n in (1, 2)
]


class StoreCounters:
    """Failures as rows of the store's `auth_failures` table, counted over a moving window: shared by every
    worker and replica on the same database (SQLite or PostgreSQL). Rows older than the longest window
    are deleted as new failures come in."""

    def __init__(self, engine, keep_seconds: int):
        self.engine = engine
        self.keep_seconds = keep_seconds

    def retry_after(self, rules: list[Rule], now: float) -> float | None:
        """Seconds until the first over-limit rule allows a try again; None when none is over its limit."""
        longest = max(r.seconds for r in rules)
        buckets = [r.bucket for r in rules]
        with self.engine.connect() as conn:  # prepared text (run before every key authentication)
            found = conn.execute(_RECENT_FAILURES[len(buckets) - 1],
                                 {"since": now - longest, **{f"b{i}": b for i, b in enumerate(buckets)}}).all()
        waits = []
        for rule in rules:
            times = [at for bucket, at in found if bucket == rule.bucket and at > now - rule.seconds]
            if len(times) >= rule.limit:  # allowed again once enough of them leave the window
                waits.append(times[len(times) - rule.limit] + rule.seconds - now)
        return max(waits) if waits else None

    def hit(self, rules: list[Rule], now: float) -> None:
        with writer(self.engine) as conn, conn.begin():
            conn.execute(delete(auth_failures).where(auth_failures.c.at < now - self.keep_seconds))
            conn.execute(auth_failures.insert(), [{"bucket": r.bucket, "at": now} for r in rules])


class LimitsCounters:
    """The `limits` package's moving window on one of its storages (`redis://...` shared, `memory://` per
    worker)."""

    def __init__(self, url: str):
        from limits import storage, strategies

        self.limiter = strategies.MovingWindowRateLimiter(storage.storage_from_string(url))

    @staticmethod
    def _item(rule: Rule):
        from limits import RateLimitItemPerSecond

        return RateLimitItemPerSecond(rule.limit, rule.seconds)

    def retry_after(self, rules: list[Rule], now: float) -> float | None:
        waits = [self.limiter.get_window_stats(self._item(r), r.kind, r.value).reset_time - now
                 for r in rules if not self.limiter.test(self._item(r), r.kind, r.value)]
        return max(waits) if waits else None

    def hit(self, rules: list[Rule], now: float) -> None:
        for r in rules:
            self.limiter.hit(self._item(r), r.kind, r.value)


class AuthGuard:
    """Counts failed keys per client address and per key id; says when to refuse with 429.

    `engine` is the store's, where the counters live unless `limits_cfg.storage` names a `limits` URL."""

    def __init__(self, limits_cfg: AuthLimits, on_event=None, engine=None):
        self.cfg = limits_cfg
        if limits_cfg.storage == STORE_COUNTERS:
            if engine is None:
                raise ChronoriskError("rate_limit_storage: 'store' needs the score store's engine")
            self.counters = StoreCounters(engine, keep_seconds=max(60, limits_cfg.lockout_minutes * 60))
        else:
            self.counters = LimitsCounters(limits_cfg.storage)
        self.on_event = on_event  # callable(action, detail): the audit log

    def _rules(self, address: str, key_id: str | None) -> list[Rule]:
        rules = [Rule("address", address, self.cfg.failures_per_minute, 60)]
        if key_id:
            rules.append(Rule("key", key_id, self.cfg.lockout_failures, self.cfg.lockout_minutes * 60))
        return rules

    def check(self, address: str, key_id: str | None) -> None:
        """Raise TooManyAttempts when this address is over its limit or this key id is locked."""
        wait = self.counters.retry_after(self._rules(address, key_id), time.time())
        if wait is not None:
            raise TooManyAttempts(max(1, int(wait) + 1))

    def failed(self, address: str, key_id: str | None, via: str) -> None:
        """Count a failure; audit it, and audit a lockout when a limit is reached."""
        self._audit("auth_failed", {"via": via, "key_id": key_id})
        rules = self._rules(address, key_id)
        now = time.time()
        self.counters.hit(rules, now)
        for rule in rules:
            if self.counters.retry_after([rule], now) is not None:
                self._audit("auth_locked", {"via": via, "by": rule.kind, "key_id": key_id,
                                            "window_minutes": rule.seconds // 60})

    def _audit(self, action: str, detail: dict) -> None:
        if self.on_event is not None:
            self.on_event(action, detail)


class KeyRing:
    """Authenticates keys and sessions against the store, with a short per-worker cache."""

    def __init__(self, engine, secret: bytes, *, cache_seconds: float = 2.0, session_hours: float = 8.0,
                 guard: AuthGuard | None = None):
        self.engine = engine
        self.secret = secret
        self.cache_seconds = cache_seconds
        self.session_seconds = session_hours * 3600
        self.guard = guard
        self._cache: dict[str, tuple[float, dict | None]] = {}

    def _row(self, table, column, value: str) -> dict | None:
        now = time.monotonic()
        cache_key = f"{table.name}:{value}"
        hit = self._cache.get(cache_key)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(column == value)).mappings().first()
        result = dict(row) if row else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[cache_key] = (now, result)
        return result

    def _key_row(self, key_id: str) -> dict | None:
        return self._row(api_keys, api_keys.c.key_id, key_id)

    def authenticate_key(self, raw: str, address: str = "unknown", via: str = "api") -> Principal | None:
        """The principal of a valid key; None (a failure, counted) otherwise; TooManyAttempts when locked."""
        parsed = parse_key(raw)
        key_id = parsed[0] if parsed else None
        if self.guard is not None:
            self.guard.check(address, key_id)
        principal = self._principal_of(parsed)
        if principal is None and self.guard is not None:
            self.guard.failed(address, key_id, via)
        return principal

    def _principal_of(self, parsed: tuple[str, str] | None) -> Principal | None:
        if parsed is None:
            return None
        key_id, secret = parsed
        row = self._key_row(key_id)
        if row is None or row["revoked_at"] is not None:
            return None
        if not hmac.compare_digest(row["secret_hash"], _hash_secret(secret)):
            return None
        return Principal(key_id=key_id, role=row["role"], site=row["site"], label=row["label"])

    # server-side sessions for the pages; the cookie is "<session_id>.<expiry>.<mac>"
    def issue_session(self, principal: Principal) -> str:
        now = utcnow()
        expiry = int(time.time() + self.session_seconds)
        session_id = pysecrets.token_hex(16)
        with writer(self.engine) as conn, conn.begin():
            conn.execute(sessions.delete().where(sessions.c.expires_at < now))  # expired ones are of no use
            conn.execute(sessions.insert().values(
                session_id=session_id, key_id=principal.key_id, created_at=now,
                expires_at=datetime.fromtimestamp(expiry, UTC).replace(tzinfo=None), revoked_at=None))
        body = f"{session_id}.{expiry}"
        return f"{body}.{self._mac(body)}"

    def authenticate_session(self, token: str) -> Principal | None:
        session = self._session_row(token)
        if session is None:
            return None
        row = self._key_row(session["key_id"])
        if row is None or row["revoked_at"] is not None:
            return None
        return Principal(key_id=row["key_id"], role=row["role"], site=row["site"], label=row["label"])

    def revoke_session(self, token: str) -> bool:
        """Sign-out: the session stops working on every worker (after at most `key_cache_seconds`)."""
        session = self._session_row(token)
        if session is None:
            return False
        with writer(self.engine) as conn, conn.begin():
            conn.execute(update(sessions).where(sessions.c.session_id == session["session_id"])
                         .values(revoked_at=utcnow()))
        self._cache.pop(f"sessions:{session['session_id']}", None)
        return True

    def _session_row(self, token: str) -> dict | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        session_id, expiry, mac = parts
        if not hmac.compare_digest(mac, self._mac(f"{session_id}.{expiry}")):
            return None
        if not expiry.isdigit() or int(expiry) < time.time():
            return None
        row = self._row(sessions, sessions.c.session_id, session_id)
        if row is None or row["revoked_at"] is not None or row["expires_at"] < utcnow():
            return None
        return row

    def _mac(self, body: str) -> str:
        digest = hmac.new(self.secret, f"session:{body}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
