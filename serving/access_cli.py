"""`chronorisk access`: API keys (create, revoke, list) and consent (withdraw, renew), for admins.

Every change is written to the audit log with the operating-system user as
the actor. A new key is printed once; only its hash is stored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chronorisk.serving.cli_common import add_demo_argument, add_store_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    add_demo_argument(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create-key", help="create an API key for a role (printed once)")
    create.add_argument("--role", required=True, help="gp, public_health, data_scientist, mlops or admin")
    create.add_argument("--site", default=None, help="the GP's site (required for --role gp)")
    create.add_argument("--label", default=None, help="a note to recognise the key by (no personal data)")
    revoke = sub.add_parser("revoke", help="revoke a key by its id (the part after crk_)")
    revoke.add_argument("key_id")
    sub.add_parser("list", help="list keys (ids, roles, sites; never the secrets)")
    withdraw = sub.add_parser("withdraw-consent", help="exclude a patient from exports and cohorts from now on")
    withdraw.add_argument("--subject", required=True, type=int, help="pseudonymous subject id")
    withdraw.add_argument("--site", default=None, help="only at this site (default: every site)")
    withdraw.add_argument("--at", default=None, help="effective time, ISO 8601 (default: now)")
    listed = sub.add_parser("withdrawn", help="write (site, subject_id) of every withdrawal in effect to a "
                            "parquet file: what training and federated runs leave out")
    listed.add_argument("--out", type=Path, default=None, help="parquet file to write")
    listed.add_argument("--meds", type=Path, default=None,
                        help="also write each site's list into this MEDS root (metadata/consent_withdrawn.parquet), "
                             "which features, training and federated sites read; withdraw and renew do it for "
                             "the work folder's MEDS")
    renew = sub.add_parser("renew-consent", help="record that a patient who withdrew consents again")
    renew.add_argument("--subject", required=True, type=int, help="pseudonymous subject id")
    renew.add_argument("--site", default=None, help="only at this site (default: every site)")
    renew.add_argument("--at", default=None, help="effective time, ISO 8601 (default: now)")


def run(args, ctx) -> int:
    from chronorisk.errors import InputError
    from chronorisk.serving import access
    from chronorisk.serving.cli_common import audit_log, cli_actor, open_store
    from chronorisk.serving.consent_files import purge_monitoring, sync_withdrawn

    store = open_store(args, ctx)
    try:
        audit = audit_log(args, ctx, store)
        if args.action == "create-key":
            access.validate_role(args.role, args.site)
            key_id, key = access.create_key(store.engine, args.role, args.site, args.label, audit=audit,
                                            actor=cli_actor())
            print(f"key id {key_id} for role {args.role}{' at ' + args.site if args.site else ''}")
            print(key)
            print("(shown once: store it safely; `chronorisk access revoke " + key_id + "` disables it)")
            return 0
        if args.action == "revoke":
            if not access.revoke_key(store.engine, args.key_id, audit=audit, actor=cli_actor()):
                raise InputError("key_id", "no active key with that id")
            print(f"revoked {args.key_id}")
            return 0
        if args.action == "list":
            for k in access.list_keys(store.engine):
                state = f"revoked {k['revoked_at']:%Y-%m-%d}" if k["revoked_at"] else "active"
                print(f"{k['key_id']}  {k['role']:<15} {k['site'] or '-':<16} {state:<18} {k['label'] or ''}")
            return 0
        if args.action == "withdrawn":
            if args.out is None and args.meds is None:
                raise InputError("--out", "give --out FILE, --meds ROOT or both")
            if args.out is not None:
                n = write_withdrawn(store, args.out)
                print(f"{n} (site, patient) pairs with consent withdrawn written to {args.out.name}")
            if args.meds is not None:
                if not args.meds.is_dir():
                    raise InputError("--meds", "MEDS root does not exist")
                _print_synced(sync_withdrawn(store, args.meds))
            return 0
        if args.action in ("withdraw-consent", "renew-consent"):
            at = _parse_time(args.at)
            if args.subject < 0 or args.subject > 2**63 - 1:
                raise InputError("--subject", "a subject id is a non-negative 64-bit integer")
            site = check_site_arg(args.site)
            if args.action == "withdraw-consent":
                when = store.withdraw_consent(args.subject, site=site, at=at, by=cli_actor(), audit=audit)
                print(f"consent withdrawal recorded, effective {when:%Y-%m-%d %H:%M:%S} UTC")
                purged = purge_monitoring(store, ctx.paths.root, audit, actor=cli_actor(), role="admin",
                                          subject_id=args.subject)
                if purged.rows:
                    print(f"monitoring log: {purged.rows} earlier row(s) of the patient removed")
            else:
                when = store.renew_consent(args.subject, site=site, at=at, by=cli_actor(), audit=audit)
                print(f"renewed consent recorded, effective {when:%Y-%m-%d %H:%M:%S} UTC")
            _print_synced(sync_withdrawn(store, ctx.paths.meds))
            return 0
    finally:
        store.dispose()
    return 2


def _print_synced(counts: dict[str, int]) -> None:
    if counts:
        print("withdrawn lists of the MEDS sites (left out of the next features, training and federated run): "
              + ", ".join(f"{site} {n}" for site, n in sorted(counts.items())))


def _parse_time(text: str | None):
    from datetime import datetime

    from chronorisk.errors import InputError
    from chronorisk.serving.schemas import naive_utc

    if text is None:
        return None
    try:
        return naive_utc(datetime.fromisoformat(text))
    except ValueError:
        raise InputError("--at", f"{text!r} is not an ISO 8601 time (e.g. 2026-03-01T09:00)") from None


def check_site_arg(site: str | None) -> str | None:
    from chronorisk.errors import InputError
    from chronorisk.serving.schemas import check_site

    try:
        return check_site(site)
    except ValueError as exc:
        raise InputError("--site", str(exc)) from None


def write_withdrawn(store, out: Path) -> int:
    """(site, subject_id) of each withdrawal in effect now, one row per store site it covers (training
    reads this file: the one-way imports keep training from importing the serving store)."""
    import polars as pl

    from chronorisk.data.files import atomic_output

    rows = [(site, sid) for site in store.sites() for sid in sorted(store.withdrawn_subjects(site=site))]
    frame = pl.DataFrame(rows, schema={"site": pl.String, "subject_id": pl.Int64}, orient="row")
    with atomic_output(out) as tmp:
        frame.write_parquet(tmp)
    return frame.height
