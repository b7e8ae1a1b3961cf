"""What the serving subcommands share: the store option, the secret, the admin's audit identity."""

from __future__ import annotations

import argparse
import getpass
import json
import os
from pathlib import Path


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", default=None, metavar="URL",
        help="score store URL (default: serve.store_url, else SQLite in the work folder; "
        "PostgreSQL: postgresql+psycopg://user@host:5432/db)",
    )


def add_demo_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--demo", action="store_true",
        help="demo mode: create the service secret (and demo keys) under <work>/secrets",
    )


def open_store(args, ctx):
    from chronorisk.serving.config import resolve_store_url
    from chronorisk.serving.store import ScoreStore

    return ScoreStore.open(resolve_store_url(ctx.params, ctx.paths.root, getattr(args, "store", None)))


def service_secret(args, ctx) -> bytes:
    from chronorisk.serving.access import is_demo, load_secret

    cfg = ctx.params.serve
    return load_secret(cfg.secret_env, cfg.secret_file, ctx.paths.root, demo=is_demo(getattr(args, "demo", False)))


def audit_log(args, ctx, store):
    from chronorisk.serving.audit import AuditLog
    from chronorisk.serving.state import checkpoint_files

    return AuditLog(store.engine, service_secret(args, ctx), checkpoint_files(ctx.paths.root, ctx.params.serve))


def audit_if_possible(args, ctx, store):
    """The audit log when the service secret is at hand, else None with a warning (writes go unrecorded
    and `audit verify` will name them)."""
    import sys

    from chronorisk.errors import ChronoriskError

    try:
        return audit_log(args, ctx, store)
    except ChronoriskError:
        print("warning: no service secret: these score writes are not recorded in the audit log "
              "(set CHRONORISK_SERVE_SECRET or serve.secret_file, or use --demo)", file=sys.stderr)
        return None


def cli_actor() -> str:
    """The audit identity of an admin command: the operating-system user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


DEMO_KEYS = "demo-keys.json"


def ensure_demo_keys(store, secrets_dir: Path, sites: list[str], audit=None) -> Path:
    """One key per role (a GP key for the first site), created once (audited) and written to
    `<work>/secrets/demo-keys.json` with mode 0600 in a 0700 folder; returns that file's path."""
    from chronorisk.serving.access import ROLES, create_key, list_keys

    path = secrets_dir / DEMO_KEYS
    existing = {}
    if path.is_file():
        existing = json.loads(path.read_text())
        live = {k["key_id"] for k in list_keys(store.engine) if k["revoked_at"] is None}
        existing = {role: v for role, v in existing.items() if v.get("key_id") in live}
    site = sites[0] if sites else "demo_site"
    missing = [role for role in ROLES if role not in existing]
    for role in missing:
        key_id, key = create_key(store.engine, role, site if role == "gp" else None, label="demo", audit=audit,
                                 actor=cli_actor())
        existing[role] = {"key_id": key_id, "key": key, "site": site if role == "gp" else None}
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    if missing or not path.is_file():
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(existing, fh, indent=1)
        os.replace(tmp, path)
    return path
