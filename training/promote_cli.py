"""`chronorisk promote --task T [--version N]` / `--all`: make a registered version the champion, if not worse.

The candidate (`--version N`, default the `challenger`) and the current
champion are scored now on the same held-out rows (the feature tables, or
`--meds DIR [--labels DIR]`); the `champion` alias moves only when the
candidate's AUROC, ECE and Brier score are within `promote.auroc_tolerance` /
`promote.ece_tolerance` / `promote.brier_tolerance` of the champion's or better. Otherwise nothing
changes, both sets of figures are printed, and the exit status is 3
(`--all`: every task is tried; 3 when any was refused). The first promotion
of a task (no champion yet) succeeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chronorisk.features.labels_cli import LABELS_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", metavar="NAME", help="task name or task YAML file")
    which.add_argument("--all", action="store_true", help="every task of params.yaml labels.tasks (each checked)")
    parser.add_argument("--version", type=int, default=None,
                        help="registered version to promote (default: the one with alias challenger)")
    parser.add_argument("--features", type=Path, default=None, metavar="DIR",
                        help="feature tables root with the held-out rows (default: <work>/features)")
    parser.add_argument("--meds", type=Path, default=None, metavar="DIR",
                        help="MEDS data from elsewhere to compare on (features computed per model)")
    parser.add_argument("--labels", type=Path, default=None, metavar="PATH", help="with --meds: " + LABELS_HELP)
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking server or database (default: sqlite in the work folder)")


def run(args: argparse.Namespace, ctx) -> int:
    from chronorisk.errors import InputError
    from chronorisk.training.promote import REFUSED_EXIT
    from chronorisk.training.tracking import configure_tracking, resolve_tracking_uri
    from chronorisk.training.train_cli import check_labels_argument

    params = ctx.params
    if args.version is not None and args.version < 1:
        raise InputError("--version", f"registered versions start at 1, got {args.version}")
    if args.version is not None and args.all:
        raise InputError("--version", "a version number belongs to one task: use --task with --version")
    for flag, path in (("--meds", args.meds), ("--features", args.features)):
        if path is not None and not path.exists():
            raise InputError(flag, f"{path} does not exist")
    check_labels_argument(args, list(params.labels.tasks) if args.all else [args.task])
    tracking = configure_tracking(
        ctx.paths, uri=resolve_tracking_uri(ctx.paths, args.tracking_uri, params.train.tracking_uri),
        experiment=params.train.experiment,
    )
    tasks = list(params.labels.tasks) if args.all else [args.task]
    refused = [task for task in tasks if not _promote_one(task, args, ctx, tracking)]
    return REFUSED_EXIT if refused else 0


def _promote_one(task_arg: str, args, ctx, tracking) -> bool:
    """Promote one task; prints both sets of figures; True when the champion moved (or stayed)."""
    import sys

    from chronorisk.features.tasks import load_task
    from chronorisk.training import promote
    from chronorisk.training import train as tr

    params = ctx.params
    task = load_task(task_arg).name
    if args.meds is not None:
        data = tr.compute_task_data(args.meds, task_arg, params.features, labels=args.labels,
                                    spec=_candidate_spec(tracking, ctx, task, args.version), only_split=tr.HELD_OUT)
        meds_root = args.meds
    else:
        data = tr.load_feature_tables(args.features or ctx.paths.features, task_arg)
        meds_root = data.meds_root or (Path(ctx.paths.meds) if Path(ctx.paths.meds).exists() else None)
    decision = promote.promote_task(
        tracking, ctx.paths, task, data, params.promote, version=args.version, meds_root=meds_root
    )
    print(promote.render(decision))
    if not decision.accepted:
        where = "out" if decision.champion is None else f"behind champion version {decision.champion.version}"
        print(f"chronorisk promote: refused: chronorisk-{task} version {decision.candidate.version} stays {where}",
              file=sys.stderr)
    return decision.accepted


def _candidate_spec(tracking, ctx, task: str, version: int | None):
    """The candidate's feature spec, so external data is featurized once the way the candidate needs."""
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.training.registry import CHALLENGER, bundle_cache, download_bundle, resolve

    registered = resolve(tracking, task, alias=CHALLENGER, version=version)
    return ModelBundle.load(download_bundle(tracking, registered, bundle_cache(ctx.paths))).spec
