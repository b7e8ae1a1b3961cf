"""`chronorisk labels`: extract task labels from MEDS, per site, as MEDS label parquet."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("chronorisk.labels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meds", type=Path, default=None, help="MEDS root (default <work>/meds)")
    parser.add_argument("--task", action="append", default=None,
                        help="task name or YAML file; repeatable (default: params labels.tasks)")
    parser.add_argument("--sites", nargs="+", default=None, help="only these sites")
    parser.add_argument("--out", type=Path, default=None, help="labels root (default <work>/labels)")


def selected_tasks(args: argparse.Namespace, ctx) -> list:
    from chronorisk.features.tasks import load_task

    return [load_task(t) for t in (args.task or ctx.params.labels.tasks)]


def run(args: argparse.Namespace, ctx) -> int:
    from chronorisk.features.concepts import load_concepts
    from chronorisk.features.labels import write_site_labels
    from chronorisk.features.sources import find_sites

    meds_root = args.meds or ctx.paths.meds
    out = args.out or ctx.paths.labels
    sites = find_sites(meds_root, args.sites)
    cmap = load_concepts(ctx.params.features.concepts)
    for task in selected_tasks(args, ctx):
        for source in sites:
            labels = write_site_labels(source, task, out / task.name / f"{source.site}.parquet", cmap)
            n_pos = int(labels["boolean_value"].sum())
            print(f"{task.name:<18} {source.site:<16} rows {labels.height:>9,}  positive {n_pos:>7,} "
                  f"({n_pos / max(labels.height, 1):.1%})")
    return 0
