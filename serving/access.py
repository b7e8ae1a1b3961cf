"""Who may do what: API keys carrying a role (and a site for GPs), signed page sessions.

A key is `crk_<key_id>_<secret>`; the store keeps only the SHA-256 of the
secret, so a copy of the database does not give working keys. The browser
pages use a signed session cookie (HMAC with the service secret) naming the
key; each request re-checks that the key is not revoked (a worker trusts a
lookup for `serve.key_cache_seconds`).

The service secret (session signatures, audit head) comes from an
environment variable or a file outside the repository; in demo mode it is
created under `<work>/secrets/`. Roles:

| role | may |
|---|---|
| gp | score; read and list patients of their own site; withdraw consent at their site |
| public_health | cohorts, aggregates and exports (pseudonymous, age bands) |
| data_scientist | score; cohorts and exports |
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
from pathlib import Path

from sqlalchemy import select

from chronorisk.errors import ChronoriskError, InputError
from chronorisk.serving.store import api_keys, utcnow, writer

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


def create_key(engine, role: str, site: str | None = None, label: str | None = None) -> tuple[str, str]:
    """Create a key; returns (key_id, full key). The full key is shown once and never stored."""
    validate_role(role, site)
    key_id = pysecrets.token_hex(6)
    secret = pysecrets.token_urlsafe(24).replace("_", "x")
    with writer(engine) as conn, conn.begin():
        conn.execute(
            api_keys.insert().values(
                key_id=key_id, secret_hash=_hash_secret(secret), role=role,
                site=site if role == "gp" else None, label=label, created_at=utcnow(),
            )
        )
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def revoke_key(engine, key_id: str) -> bool:
    with writer(engine) as conn, conn.begin():
        res = conn.execute(
            api_keys.update()
            .where(api_keys.c.key_id == key_id)
            .where(api_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
    return res.rowcount > 0


def list_keys(engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(api_keys.c.key_id, api_keys.c.role, api_keys.c.site, api_keys.c.label,
                   api_keys.c.created_at, api_keys.c.revoked_at).order_by(api_keys.c.created_at)
        ).mappings().all()
    return [dict(r) for r in rows]


class KeyRing:
    """Authenticates keys and sessions against the store, with a short per-worker cache."""

    def __init__(self, engine, secret: bytes, *, cache_seconds: float = 2.0, session_hours: float = 8.0):
        self.engine = engine
        self.secret = secret
        self.cache_seconds = cache_seconds
        self.session_seconds = session_hours * 3600
        self._cache: dict[str, tuple[float, dict | None]] = {}

    def _row(self, key_id: str) -> dict | None:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).mappings().first()
        value = dict(row) if row else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key_id] = (now, value)
        return value

    def authenticate_key(self, raw: str) -> Principal | None:
        parsed = parse_key(raw)
        if parsed is None:
            return None
        key_id, secret = parsed
        row = self._row(key_id)
        if row is None or row["revoked_at"] is not None:
            return None
        if not hmac.compare_digest(row["secret_hash"], _hash_secret(secret)):
            return None
        return Principal(key_id=key_id, role=row["role"], site=row["site"], label=row["label"])

    # signed sessions for the pages: "<key_id>.<expiry>.<mac>"
    def issue_session(self, principal: Principal) -> str:
        expiry = int(time.time() + self.session_seconds)
        body = f"{principal.key_id}.{expiry}"
        return f"{body}.{self._mac(body)}"

    def authenticate_session(self, token: str) -> Principal | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        key_id, expiry, mac = parts
        body = f"{key_id}.{expiry}"
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        if not expiry.isdigit() or int(expiry) < time.time():
            return None
        row = self._row(key_id)
        if row is None or row["revoked_at"] is not None:
            return None
        return Principal(key_id=key_id, role=row["role"], site=row["site"], label=row["label"])

    def _mac(self, body: str) -> str:
        digest = hmac.new(self.secret, f"session:{body}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
