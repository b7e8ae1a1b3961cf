"""`chronorisk audit verify`: check the audit log (chain, signed head, latest signed checkpoint outside the
database, the consent, key, device and score tables replayed from it, and the model registry's champions
against the recorded promotions); exit 1 naming every problem found.

It needs the service secret that signed the head and the checkpoints: CHRONORISK_SERVE_SECRET (or the
variable `serve.secret_env` names), `serve.secret_file`, or `--demo` for the demo's secret in the work folder.
"""

from __future__ import annotations

import argparse

from chronorisk.serving.cli_common import add_demo_argument, add_store_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    add_demo_argument(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="verify the chain, the signed head, the latest checkpoint, the replayed "
                            "consent, key, device and score tables and the registry's champions (needs the service "
                            "secret: CHRONORISK_SERVE_SECRET, serve.secret_file or --demo)")
    verify.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="the MLflow registry `chronorisk promote` writes to (default: train.tracking_uri, "
                        "else the work folder's)")
    sub.add_parser("checkpoint", help="write a signed checkpoint of the current head (e.g. before a backup)")
    ack = sub.add_parser("record-champions", help="record the registry's champions that differ from the audited "
                         "promotions as acknowledged entries (champions set before promotions were audited, or "
                         "by a promote without the secret); verify names them until then")
    ack.add_argument("--tracking-uri", default=None, metavar="URI", help="the MLflow registry (as for verify)")
    show = sub.add_parser("show", help="print the latest entries (actions, roles, sites; subject ids hidden)")
    show.add_argument("--last", type=int, default=20)


def run(args, ctx) -> int:
    from chronorisk.errors import ChronoriskError
    from chronorisk.serving.cli_common import audit_log, open_store, service_secret

    try:
        service_secret(args, ctx)
    except ChronoriskError as exc:
        raise ChronoriskError(
            f"{exc}. audit verify checks signatures made with the service's secret: give the same one, e.g. "
            f"`{ctx.params.serve.secret_env}=... chronorisk audit verify`, or `chronorisk audit --demo verify` "
            "for a demo work folder"
        ) from None
    store = open_store(args, ctx)
    try:
        audit = audit_log(args, ctx, store)
        if args.action == "record-champions":
            from chronorisk.serving.cli_common import cli_actor
            from chronorisk.serving.promotions import registry_view

            tasks = audit.acknowledge_champions(registry_view(ctx, args.tracking_uri), cli_actor())
            print(f"champions of {', '.join(tasks)} recorded as acknowledged" if tasks else
                  "every champion is already recorded")
            return 0
        if args.action == "checkpoint":
            print(f"checkpoint written at entry {audit.checkpoint_now()}")
            return 0
        if args.action == "verify":
            from chronorisk.serving.promotions import registry_view

            result = audit.verify(registry_view(ctx, args.tracking_uri))
            if result.ok:
                cp = f"checkpoint at entry {result.checkpoint}" if result.checkpoint else "no checkpoint yet"
                print(f"audit log ok: {result.n_entries} entries; chain, signed head, {cp}, replayed consent, key, "
                      f"device and score tables and the champions of {result.registry_checked} verified")
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
