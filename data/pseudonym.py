"""Pseudonymous subject ids: a keyed HMAC of the source patient id.

Source systems identify a patient by a logical id (FHIR `Patient.id`) that can
be linked back to the person; MEDS must not carry it. Ingestion replaces it by

    subject_id = int.from_bytes(HMAC-SHA256(key, source_id)[:8], "big") & (2**63 - 1)

a positive int64 that is stable for a given key (re-ingesting the same site
gives the same ids, so scores and labels keep lining up) and that cannot be
reversed or recomputed without the key. The key is site-held: it comes from
an environment variable (`CHRONORISK_PSEUDONYM_KEY` by default) or a file
outside the repository. Only demo runs may create one, in
`<work>/secrets/pseudonym.key` with owner-only permissions.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from chronorisk.errors import ChronoriskError, InputError

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
DEMO_KEY_NAME = "pseudonym.key"
_MASK63 = (1 << 63) - 1


class Pseudonymizer:
    """Maps source patient ids to subject ids with HMAC-SHA256 under one key.

    The mapping is cached (bounded) because one patient's resources repeat the
    same reference many times.
    """

    def __init__(self, key: bytes, cache_size: int = 200_000):
        if len(key) < MIN_KEY_BYTES:
            raise ChronoriskError(
                f"pseudonymization key is {len(key)} bytes; at least {MIN_KEY_BYTES} are required"
            )
        self._key = bytes(key)
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size

    def subject_id(self, source_id: str) -> int:
        """The positive int64 subject id of `source_id` (never 0)."""
        hit = self._cache.get(source_id)
        if hit is not None:
            return hit
        digest = hmac.new(self._key, source_id.encode("utf-8"), hashlib.sha256).digest()
        value = (int.from_bytes(digest[:8], "big") & _MASK63) or 1
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[source_id] = value
        return value

    def __repr__(self) -> str:  # never show the key
        return "Pseudonymizer(key=<hidden>)"


def _read_key_file(path: Path, field: str) -> bytes:
    if not path.is_file():
        raise InputError(field, f"key file {path} does not exist")
    key = path.read_bytes().strip()
    if not key:
        raise InputError(field, f"key file {path} is empty")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("pseudonymization key file %s is readable by group or others; chmod 600 it", path)
    return key


def create_demo_key(secrets_dir: Path) -> Path:
    """Create (once) a random demo key with owner-only permissions; return its path."""
    path = Path(secrets_dir) / DEMO_KEY_NAME
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it meanwhile
        return path
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return path


def load_key(
    *,
    secret_file: Path | None,
    env_var: str,
    demo: bool,
    secrets_dir: Path,
) -> tuple[bytes, str]:
    """The pseudonymization key and where it came from (for the report; never the key).

    Order: `--secret-file`, then the environment variable, then (demo mode
    only) the demo key under the work folder. Outside demo mode a missing key
    is an error: ingesting with an ad-hoc key would silently change every
    subject id.
    """
    if secret_file is not None:
        return _read_key_file(Path(secret_file), "--secret-file"), "file"
    value = os.environ.get(env_var, "").strip()
    if value:
        return value.encode("utf-8"), f"env:{env_var}"
    if demo:
        path = create_demo_key(secrets_dir)
        return _read_key_file(path, "demo key"), "demo"
    raise ChronoriskError(
        f"no pseudonymization key: set the environment variable {env_var} or pass --secret-file PATH "
        "(demo data only: --demo creates one under the work folder)"
    )
