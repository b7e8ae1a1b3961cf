"""`chronorisk audit verify`: check the hash chain of the audit log; exit 1 naming any tampered entry."""

from __future__ import annotations

import argparse

from chronorisk.serving.cli_common import add_demo_argument, add_store_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    add_demo_argument(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("verify", help="verify every entry's hash, the links between entries and the signed head")
    show = sub.add_parser("show", help="print the latest entries (actions, roles, sites; subject ids hidden)")
    show.add_argument("--last", type=int, default=20)


def run(args, ctx) -> int:
    from chronorisk.serving.cli_common import audit_log, open_store

    store = open_store(args, ctx)
    try:
        audit = audit_log(args, ctx, store)
        if args.action == "verify":
            result = audit.verify()
            if result.ok:
                print(f"audit log ok: {result.n_entries} entries, chain and signed head verified")
                return 0
            print(f"audit log FAILED verification ({result.n_entries} entries read):")
            for problem in result.problems:
                print(f"  {problem}")
            return 1
        if args.action == "show":
            entries = list(audit.entries())[-max(args.last, 0):] if args.last > 0 else []
            for e in entries:
                who = "patient" if e["subject_id"] is not None else "-"
                print(f"{e['seq']:>8} {e['at'][:19]} {e['actor']:<22} {e['role']:<15} {e['site'] or '-':<16} "
                      f"{e['action']:<18} {who}")
            return 0
    finally:
        store.dispose()
    return 2
