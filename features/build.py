"""The steps of `chronorisk features`, as plain functions (the CLI only wires them)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from chronorisk.data.files import atomic_output
from chronorisk.errors import InputError
from chronorisk.features.concepts import ConceptMap
from chronorisk.features.config import FeatureConfig
from chronorisk.features.labels import read_task_labels, write_site_labels
from chronorisk.features.pipeline import code_summary, fit_spec, merge_summaries, transform_shards
from chronorisk.features.pruning import FitStats
from chronorisk.features.sources import SiteSource
from chronorisk.features.spec import FeatureSpec
from chronorisk.features.tasks import TaskDefinition

log = logging.getLogger("chronorisk.features")
TRAIN = "train"
UNKNOWN_SPLIT = "held_out"  # a subject missing from subject_splits.parquet is never trained on
INDEX_COLUMNS = ("subject_id", "prediction_time", "site", "split", "boolean_value")  # before the features
INDEX_ORDER = ("subject_id", "prediction_time")


def subject_splits(splits: pl.DataFrame) -> pl.DataFrame:
    """One (subject_id, split) per subject, whatever the order of the split files and their rows.

    A subject listed twice (two sites' files) keeps its first split in name order (held_out < train <
    tuning): never a coin flip between runs.
    """
    return (
        splits.select(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
        .sort("subject_id", "split")
        .unique("subject_id", keep="first", maintain_order=True)
    )


def assign_splits(index: pl.DataFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """THE split rule of every command: each labelled row gets its subject's split from `splits`.

    A subject the split file does not list is held out (never trained on). The rows come back sorted by
    (subject_id, prediction_time) so that what is trained on does not depend on the order of the
    input files or their rows (training, `features` and the federated sites all call this).
    """
    out = index.join(subject_splits(splits), on="subject_id", how="left")
    order = [c for c in (*INDEX_ORDER, "boolean_value") if c in out.columns]
    return out.with_columns(pl.col("split").fill_null(UNKNOWN_SPLIT)).sort(order, maintain_order=True)


def train_summary(source: SiteSource) -> pl.DataFrame:
    """Code summary (code, n_subjects) of a site's TRAIN subjects: counts only."""
    train = source.splits().filter(pl.col("split") == TRAIN).select("subject_id")
    return code_summary(source.scan().join(train.lazy(), on="subject_id", how="semi"))


def fit_spec_on_train(
    sites: list[SiteSource], config: FeatureConfig, cmap: ConceptMap
) -> Callable[[TaskDefinition], FeatureSpec]:
    """Pool the sites' train summaries once; return a spec maker per task (same vocabulary)."""
    pooled = merge_summaries(train_summary(s) for s in sites)
    if pooled.height == 0:
        raise InputError("--meds", "no events of TRAIN subjects in any site: cannot fit the feature spec")
    return lambda task: fit_spec(pooled, config, task, cmap)


def labels_for_site(
    source: SiteSource, task: TaskDefinition, given: Path | None, labels_root: Path, cmap: ConceptMap
) -> pl.DataFrame:
    """The site's labels: from `given` (`--labels`, see `labels.label_files`) or extracted to labels_root.

    Extracted labels are written to labels_root/<task>/<site>.parquet; supplied ones are the task's
    label rows of this site's subjects.
    """
    if given is None:
        if task.labels_supplied:
            raise InputError("--labels", f"task {task.name} has supplied labels (labels: supplied): give --labels")
        return write_site_labels(source, task, labels_root / task.name / f"{source.site}.parquet", cmap)
    labels = read_task_labels(given, task.name)
    subjects = source.splits().select(pl.col("subject_id").cast(pl.Int64))
    return labels.join(subjects, on="subject_id", how="semi")


def feature_table_for_site(
    spec: FeatureSpec, source: SiteSource, labels: pl.DataFrame, path: Path, chunk_subjects: int, workers: int = 1,
    stats: FitStats | None = None,
) -> int:
    """Write subject_id, prediction_time, site, split, boolean_value + features; returns rows written.

    With `stats`, the TRAIN rows are added to it as they are written (see `pruning`)."""
    index = assign_splits(labels, source.splits()).select(
        "subject_id", "prediction_time", pl.lit(source.site).alias("site"), "split", "boolean_value",
    )
    written = 0
    with atomic_output(path) as tmp:
        writer = None
        try:
            for frame in transform_shards(spec, source.shards, index, chunk_subjects, workers):
                table = frame.to_arrow()
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
                written += frame.height
                if stats is not None:
                    stats.add(frame.filter(pl.col("split") == TRAIN))
            if writer is None:  # no rows: still a valid, empty table with every column
                empty = pl.DataFrame(schema={**index.schema, **dict.fromkeys(spec.feature_names, pl.Float32)})
                pq.write_table(empty.to_arrow(), tmp)
        finally:
            if writer is not None:
                writer.close()
    missing = index.height - written
    if missing:
        log.warning("%s: %d label rows had no events in the MEDS shards and were left out", source.site, missing)
    return written


def keep_spec_columns(spec: FeatureSpec, path: Path) -> None:
    """Rewrite a feature table with only the spec's features (after dropping those that say nothing)."""
    with atomic_output(path) as tmp:
        pl.scan_parquet(path).select(*INDEX_COLUMNS, *spec.feature_names).sink_parquet(tmp, compression="zstd")
