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
from chronorisk.features.labels import read_labels, write_site_labels
from chronorisk.features.pipeline import code_summary, fit_spec, merge_summaries, transform_shards
from chronorisk.features.pruning import FitStats
from chronorisk.features.sources import SiteSource
from chronorisk.features.spec import FeatureSpec
from chronorisk.features.tasks import TaskDefinition

log = logging.getLogger("chronorisk.features")
TRAIN = "train"
UNKNOWN_SPLIT = "held_out"  # a subject missing from subject_splits.parquet is never trained on
INDEX_COLUMNS = ("subject_id", "prediction_time", "site", "split", "boolean_value")  # before the features


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
    """Labels from `given` (files from elsewhere) or extracted and written to labels_root/<task>/<site>.parquet."""
    if given is None:
        return write_site_labels(source, task, labels_root / task.name / f"{source.site}.parquet", cmap)
    for candidate in (given / task.name / f"{source.site}.parquet", given / task.name, given / f"{task.name}.parquet"):
        if candidate.exists():
            labels = read_labels(candidate)
            break
    else:
        raise InputError(
            "--labels", f"no labels for task {task.name} under {given} "
            f"(looked for {task.name}/{source.site}.parquet, {task.name}/ and {task.name}.parquet)"
        )
    subjects = source.splits().select("subject_id")
    return labels.join(subjects, on="subject_id", how="semi")


def feature_table_for_site(
    spec: FeatureSpec, source: SiteSource, labels: pl.DataFrame, path: Path, chunk_subjects: int, workers: int = 1,
    stats: FitStats | None = None,
) -> int:
    """Write subject_id, prediction_time, site, split, boolean_value + features; returns rows written.

    With `stats`, the TRAIN rows are added to it as they are written (see `pruning`)."""
    index = (
        labels.join(source.splits(), on="subject_id", how="left")
        .select(
            "subject_id", "prediction_time", pl.lit(source.site).alias("site"),
            pl.col("split").fill_null(UNKNOWN_SPLIT), "boolean_value",
        )
        .select(INDEX_COLUMNS)
        .sort("subject_id", "prediction_time")
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
