"""`chronorisk summary`: a per-site overview of a MEDS root (counts only, no identifiers).

Conditions are matched through the concept map, as the features and labels do (codes and
prefixes: diabetes is SNOMED 44054006, ICD-10-CM E11* and ICD-9-CM 250*, ...), and `--meds`
takes the roots `labels`, `features` and `train` take (ours with `sites/<site>/`, or one MEDS
dataset). With `--labels` (supplied labels, same meaning as everywhere) each task's label rows,
cases and prevalence are shown per site.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chronorisk.features.labels_cli import LABELS_HELP

CONDITIONS = ("diabetes", "hypertension")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meds", type=Path, default=None,
                        help="MEDS root: sites/<site>/ or one MEDS dataset (default: <work>/meds)")
    parser.add_argument("--labels", type=Path, default=None, help="also summarize supplied labels, " + LABELS_HELP)
    parser.add_argument("--task", action="append", default=None,
                        help="task(s) of --labels (repeatable; default: params labels.tasks)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")


def site_summary(root: Path, concepts=None) -> list[dict]:
    """One row per site: subjects, events, span, share with diabetes / hypertension, lab coverage."""
    import polars as pl

    from chronorisk.data import codes
    from chronorisk.features.concepts import load_concepts
    from chronorisk.features.sources import find_sites

    cmap = concepts or load_concepts()
    hba1c = codes.MEASUREMENTS["hba1c"].code
    rows = []
    for source in find_sites(Path(root)):
        events = source.scan()
        stats = (
            events.select(
                pl.col("subject_id").n_unique().alias("subjects"),
                pl.len().alias("events"),
                pl.col("time").min().alias("first"),
                pl.col("time").max().alias("last"),
                *[pl.col("subject_id").filter(cmap.condition_expr(name)).n_unique().alias(name)
                  for name in CONDITIONS],
                pl.col("subject_id").filter(pl.col("code") == hba1c).n_unique().alias("with_hba1c"),
                pl.col("code").n_unique().alias("codes"),
            )
            .collect()
            .row(0, named=True)
        )
        n = max(stats["subjects"], 1)
        rows.append(
            {
                "site": source.site,
                "subjects": stats["subjects"],
                "events": stats["events"],
                "events_per_subject": round(stats["events"] / n, 1),
                "codes": stats["codes"],
                "first": str(stats["first"].date()) if stats["first"] else None,
                "last": str(stats["last"].date()) if stats["last"] else None,
                **{f"{name}_pct": round(100 * stats[name] / n, 1) for name in CONDITIONS},
                "hba1c_measured_pct": round(100 * stats["with_hba1c"] / n, 1),
            }
        )
    return rows


def label_summary(root: Path, given: Path, tasks: list[str]) -> list[dict]:
    """Per task and site: label rows, subjects, cases and prevalence of the supplied labels."""
    import polars as pl

    from chronorisk.features.labels import check_labels_for_tasks, read_task_labels
    from chronorisk.features.sources import find_sites
    from chronorisk.features.tasks import load_task

    names = [load_task(t).name for t in tasks]
    check_labels_for_tasks(given, names)
    sites = find_sites(Path(root))
    rows = []
    for name in names:
        labels = read_task_labels(given, name)
        for source in sites:
            ids = source.scan().select(pl.col("subject_id").unique()).collect()
            mine = labels.join(ids, on="subject_id", how="semi")
            cases = int(mine["boolean_value"].sum())
            rows.append({"task": name, "site": source.site, "rows": mine.height,
                         "subjects": mine["subject_id"].n_unique(), "cases": cases,
                         "prevalence_pct": round(100 * cases / max(mine.height, 1), 1)})
        matched = sum(r["rows"] for r in rows if r["task"] == name)
        if matched < labels.height:
            rows.append({"task": name, "site": "(no MEDS subject)", "rows": labels.height - matched,
                         "subjects": None, "cases": None, "prevalence_pct": None})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no sites)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    body = ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([line, "  ".join("-" * widths[c] for c in cols), *body])


def run(args: argparse.Namespace, ctx) -> int:
    import json

    from chronorisk.data.files import write_text_atomic
    from chronorisk.errors import InputError
    from chronorisk.features.concepts import load_concepts

    root = args.meds or ctx.paths.meds
    try:
        rows = site_summary(root, load_concepts(ctx.params.features.concepts))
    except InputError as exc:
        raise InputError("--meds", exc.problem) from None
    print(format_table(rows))
    out: object = rows
    if args.labels is not None:
        labels = label_summary(root, args.labels, list(args.task or ctx.params.labels.tasks))
        print()
        print(format_table(labels))
        out = {"sites": rows, "labels": labels}
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=2))
    return 0
