"""`chronorisk features`: fit the feature spec and write one feature table per task and site.

For each task: labels come from `--labels DIR` (MEDS label parquet from
anywhere) or are extracted and written to `<work>/labels/<task>/<site>.parquet`;
the spec is `--spec` or is fitted on the TRAIN split of every site (pooled code
summaries: counts, no records); the table `<work>/features/<task>/<site>.parquet`
holds subject_id, prediction_time, site, split, boolean_value and the features.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from chronorisk.features.labels_cli import LABELS_HELP

log = logging.getLogger("chronorisk.features")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meds", type=Path, default=None, help="MEDS root (default <work>/meds)")
    parser.add_argument("--task", action="append", default=None,
                        help="task name or YAML file; repeatable (default: params labels.tasks)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="supplied labels, " + LABELS_HELP + " (default: extract into <work>/labels)")
    parser.add_argument("--spec", type=Path, default=None, help="use this fitted spec.json instead of fitting")
    parser.add_argument("--sites", nargs="+", default=None, help="only these sites")
    parser.add_argument("--out", type=Path, default=None, help="features root (default <work>/features)")
    parser.add_argument("--chunk-subjects", type=int, default=None,
                        help="index rows transformed at a time (default: params features.chunk_subjects)")
    parser.add_argument("--workers", type=int, default=None,
                        help="chunks computed at once, in threads (default: params features.workers)")


def run(args: argparse.Namespace, ctx) -> int:
    import time

    from chronorisk.errors import ConfigError
    from chronorisk.features.build import (
        feature_table_for_site,
        fit_spec_on_train,
        keep_spec_columns,
        labels_for_site,
    )
    from chronorisk.features.concepts import load_concepts
    from chronorisk.features.labels import check_labels_for_tasks
    from chronorisk.features.labels_cli import selected_tasks
    from chronorisk.features.pruning import FitStats, dropped_lines, without_useless
    from chronorisk.features.sources import find_sites
    from chronorisk.features.spec import FeatureSpec

    config = ctx.params.features
    chunk = args.chunk_subjects or config.chunk_subjects
    if chunk <= 0:
        raise ConfigError(f"--chunk-subjects: must be positive, got {chunk}")
    workers = args.workers or config.workers
    if workers <= 0:
        raise ConfigError(f"--workers: must be positive, got {workers}")
    meds_root = args.meds or ctx.paths.meds
    out_root = args.out or ctx.paths.features
    sites = find_sites(meds_root, args.sites)
    cmap = load_concepts(config.concepts)
    tasks = selected_tasks(args, ctx)
    check_labels_for_tasks(args.labels, [t.name for t in tasks])
    given_spec = FeatureSpec.load(args.spec) if args.spec else None
    fitted = None
    for task in tasks:
        if given_spec is not None:
            spec = given_spec
        else:
            if fitted is None:
                fitted = fit_spec_on_train(sites, config, cmap)
            spec = fitted(task)
        stats = FitStats(spec) if given_spec is None else None
        paths = []
        for source in sites:
            started = time.perf_counter()
            labels = labels_for_site(source, task, args.labels, ctx.paths.labels, cmap)
            path = out_root / task.name / f"{source.site}.parquet"
            n = feature_table_for_site(spec, source, labels, path, chunk, workers, stats)
            paths.append(path)
            print(f"{task.name:<18} {source.site:<16} rows {n:>9,}  features {spec.n_features}  "
                  f"{time.perf_counter() - started:6.1f} s")
            _print_value_checks(spec, source, task.name)
        if stats is not None:
            spec = without_useless(spec, stats.useless())
            if spec.n_features < len(stats.names):
                for path in paths:
                    keep_spec_columns(spec, path)
            for line in dropped_lines(spec):
                print(f"{task.name:<18} {line}")
        spec.save(out_root / task.name / "spec.json")
    return 0


def _print_value_checks(spec, source, task: str) -> None:
    """Say which numbers of the site the features drop (impossible, per code) or clip (fitted quantiles)."""
    import polars as pl  # here, not at the top: the CLI imports every command's module to parse

    from chronorisk.features.vocabulary import value_checks

    checks = value_checks(spec, source.scan())
    dropped = checks.filter(pl.col("dropped") > 0).sort("dropped", "code", descending=[True, False])
    if dropped.height:
        print(f"{task:<18} {source.site:<16} impossible values dropped: "
              + ", ".join(f"{code} {n:,}" for code, n in dropped.select("code", "dropped").iter_rows()))
    clipped = checks.filter(pl.col("clipped") > 0).sort("clipped", "code", descending=[True, False])
    if clipped.height:
        most = ", ".join(f"{code} {n:,}" for code, n in clipped.select("code", "clipped").head(3).iter_rows())
        print(f"{task:<18} {source.site:<16} values clipped to their fitted 0.1-99.9 % range: "
              f"{int(clipped['clipped'].sum()):,} in {clipped.height} codes (most: {most})")
