"""`chronorisk labels`: task labels per site as MEDS label parquet, extracted from MEDS or supplied.

With `--labels PATH` (supplied labels, see `LABELS_HELP`) the task's rows are split by site into
`<out>/<task>/<site>.parquet` instead of being extracted, so that `features` and the rest read them
like extracted ones; a task whose YAML says `labels: supplied` needs `--labels`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("chronorisk.labels")

# what `--labels PATH` means in every command (resolved by `features.labels.label_files`)
LABELS_HELP = (
    "MEDS label parquet: a file, a folder of one task's label files, or a labels root holding <task>/ "
    "(never mixes tasks)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meds", type=Path, default=None, help="MEDS root (default <work>/meds)")
    parser.add_argument("--task", action="append", default=None,
                        help="task name or YAML file; repeatable (default: params labels.tasks)")
    parser.add_argument("--sites", nargs="+", default=None, help="only these sites")
    parser.add_argument("--out", type=Path, default=None, help="labels root (default <work>/labels)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="supplied labels instead of extraction, " + LABELS_HELP)


def selected_tasks(args: argparse.Namespace, ctx) -> list:
    from chronorisk.features.tasks import load_task

    return [load_task(t) for t in (args.task or ctx.params.labels.tasks)]


def run(args: argparse.Namespace, ctx) -> int:
    from chronorisk.data.meds_io import write_labels
    from chronorisk.features.build import labels_for_site
    from chronorisk.features.concepts import load_concepts
    from chronorisk.features.labels import check_labels_for_tasks
    from chronorisk.features.sources import find_sites

    meds_root = args.meds or ctx.paths.meds
    out = args.out or ctx.paths.labels
    sites = find_sites(meds_root, args.sites)
    cmap = load_concepts(ctx.params.features.concepts)
    tasks = selected_tasks(args, ctx)
    check_labels_for_tasks(args.labels, [t.name for t in tasks])
    for task in tasks:
        for source in sites:
            labels = labels_for_site(source, task, args.labels, out, cmap)
            if args.labels is not None:
                write_labels(labels, out / task.name / f"{source.site}.parquet")
            n_pos = int(labels["boolean_value"].sum())
            print(f"{task.name:<18} {source.site:<16} rows {labels.height:>9,}  positive {n_pos:>7,} "
                  f"({n_pos / max(labels.height, 1):.1%})")
    return 0
