"""`chronorisk promote`: training's checked promotion (`training/promote_cli.py`), recorded in the audit log.

Every move of a task's `champion` alias that the command makes is an audit entry (`serving/promotions.py`),
so that `chronorisk audit verify` names a champion moved any other way. Recording needs the service
secret (CHRONORISK_SERVE_SECRET, `serve.secret_file`, or `--demo`) and the score store (`--store`); without
the secret the promotion still runs, with a warning, and `audit verify` will name it.
"""

from __future__ import annotations

import argparse
import sys

from chronorisk.serving.cli_common import add_demo_argument, add_store_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from chronorisk.training import promote_cli

    promote_cli.add_arguments(parser)
    add_store_argument(parser)
    add_demo_argument(parser)


def run(args: argparse.Namespace, ctx) -> int:
    from chronorisk.errors import ChronoriskError
    from chronorisk.features.tasks import load_task
    from chronorisk.serving.cli_common import service_secret
    from chronorisk.serving.promotions import champions_now
    from chronorisk.training import promote_cli
    from chronorisk.training.tracking import resolve_tracking_uri

    try:
        service_secret(args, ctx)
        audited = True
    except ChronoriskError:
        audited = False
        print("warning: no service secret: this promotion is not recorded in the audit log and `chronorisk audit "
              "verify` will name it (set CHRONORISK_SERVE_SECRET or serve.secret_file, or use --demo)",
              file=sys.stderr)
    if not audited:
        return promote_cli.run(args, ctx)
    uri = resolve_tracking_uri(ctx.paths, args.tracking_uri, ctx.params.train.tracking_uri)
    tasks = list(ctx.params.labels.tasks) if args.all else [load_task(args.task).name]
    before = champions_now(uri, tasks)
    try:
        return promote_cli.run(args, ctx)
    finally:  # also when a later task of --all failed: the moves made so far are recorded
        _record(args, ctx, uri, tasks, before)


def _record(args, ctx, uri: str, tasks: list[str], before: dict) -> None:
    """Append one entry per champion that moved since `before`; a failure here is said, never raised over
    the promotion's own outcome (`audit verify` will name an unrecorded move)."""
    from chronorisk.errors import ChronoriskError
    from chronorisk.serving.cli_common import audit_log, cli_actor, open_store
    from chronorisk.serving.promotions import champions_now, record_moves

    try:
        after = champions_now(uri, tasks)
        if after == before:
            return
        store = open_store(args, ctx)
        try:
            moved = record_moves(audit_log(args, ctx, store), before, after, cli_actor())
        finally:
            store.dispose()
    except Exception as exc:  # a registry or store failure: the promotion's own outcome stands
        reason = str(exc) if isinstance(exc, ChronoriskError) else type(exc).__name__
        print(f"warning: the champion moves could not be recorded in the audit log ({reason}); "
              "`chronorisk audit verify` will name them", file=sys.stderr)
        return
    print(f"audit log: champion moves of {', '.join(moved)} recorded")
