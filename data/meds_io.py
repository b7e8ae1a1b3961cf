"""MEDS datasets on disk: one dataset per site under `<root>/sites/<site_id>/`.

Layout (MEDS 0.4): `data/*.parquet` shards with subject_id, time, code,
numeric_value, text_value (a subject lives in exactly one shard, rows sorted
by subject then time, static rows with null time first), plus
`metadata/codes.parquet`, `metadata/dataset.json` and
`metadata/subject_splits.parquet`. Readers return polars LazyFrames so that
feature pipelines stay lazy end to end.

The MEDS layout and arrow schemas are the `meds` package's (`meds.DataSchema` ...), written out here so that
writing a dataset does not import `meds` (it imports jsonschema and pyarrow.compute: ~0.08 CPU-s, a tenth of
a small `chronorisk ingest`); tests/data/test_meds_io_schemas.py checks that they equal the package's, and
`validate_site` validates with the package itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from chronorisk.data.files import atomic_output, write_text_atomic

EVENT_SCHEMA = pl.Schema(
    {
        "subject_id": pl.Int64,
        "time": pl.Datetime("us"),
        "code": pl.String,
        "numeric_value": pl.Float32,
        "text_value": pl.String,
    }
)
LABEL_SCHEMA = pl.Schema({"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean})
# MEDS 0.4 (the `meds` package's values; tests/data/test_meds_io_schemas.py checks them against it)
TRAIN_SPLIT, TUNING_SPLIT, HELD_OUT_SPLIT = "train", "tuning", "held_out"
SPLITS = (TRAIN_SPLIT, TUNING_SPLIT, HELD_OUT_SPLIT)
DATA_SUBDIRECTORY = "data"
CODE_METADATA_FILEPATH = "metadata/codes.parquet"
SUBJECT_SPLITS_FILEPATH = "metadata/subject_splits.parquet"
DATASET_METADATA_FILEPATH = "metadata/dataset.json"
DATA_ARROW_SCHEMA = pa.schema([
    ("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()),
    ("numeric_value", pa.float32()), ("text_value", pa.large_string()),
])
SUBJECT_SPLIT_ARROW_SCHEMA = pa.schema([("subject_id", pa.int64()), ("split", pa.string())])
CODE_METADATA_ARROW_SCHEMA = pa.schema([
    ("code", pa.string()), ("description", pa.string()), ("parent_codes", pa.list_(pa.string())),
])
LABEL_ARROW_SCHEMA = pa.schema([
    ("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")), ("boolean_value", pa.bool_()),
    ("integer_value", pa.int64()), ("float_value", pa.float32()), ("categorical_value", pa.string()),
])


def site_root(root: Path, site_id: str) -> Path:
    return Path(root) / "sites" / site_id


def site_ids(root: Path) -> list[str]:
    """Sites present under `root` (sorted), i.e. folders of `root/sites` holding MEDS data."""
    sites = Path(root) / "sites"
    if not sites.is_dir():
        return []
    return sorted(p.name for p in sites.iterdir() if (p / DATA_SUBDIRECTORY).is_dir())


def conform_events(df: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Cast to the MEDS event schema and sort (subject, time with statics first, code); rows equal on those
    keep their order (a stable sort: a writer that orders them itself gets its order)."""
    frame = df.lazy() if isinstance(df, pl.DataFrame) else df
    for col, dtype in EVENT_SCHEMA.items():
        if col not in frame.collect_schema().names():
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(col))
    return (
        frame.select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])
        .sort(["subject_id", "time", "code"], nulls_last=False, maintain_order=True)
        .collect()
    )


def events_table(df: pl.DataFrame) -> pa.Table:
    """Events already in the MEDS event schema as an arrow table with the exact MEDS arrow schema."""
    table = df.to_arrow()
    return table.cast(pa.schema([DATA_ARROW_SCHEMA.field(n) for n in table.column_names]))


def write_events_table(table: pa.Table, path: Path) -> None:
    """Write one MEDS data shard atomically from an `events_table` (or a slice of one) already in MEDS order."""
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_events(df: pl.DataFrame, path: Path) -> None:
    """Write one MEDS data shard atomically, with the exact MEDS arrow schema."""
    write_events_table(events_table(conform_events(df)), path)


def write_labels(df: pl.DataFrame, path: Path) -> None:
    """Write MEDS label parquet (subject_id, prediction_time, boolean_value) atomically."""
    table = df.select([pl.col(c).cast(t) for c, t in LABEL_SCHEMA.items()]).to_arrow()
    table = table.cast(pa.schema([LABEL_ARROW_SCHEMA.field(n).with_nullable(False) for n in table.column_names]))
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


def split_of(subject_ids: pl.Expr, seed: int = 0) -> pl.Expr:
    """Deterministic split from the subject id: 70% train, 15% tuning, 15% held_out."""
    bucket = (subject_ids.hash(seed=seed) % 100).cast(pl.Int32)
    return (
        pl.when(bucket < 70)
        .then(pl.lit(TRAIN_SPLIT))
        .when(bucket < 85)
        .then(pl.lit(TUNING_SPLIT))
        .otherwise(pl.lit(HELD_OUT_SPLIT))
    )


def subject_splits_table(subjects: pl.DataFrame, split_seed: int = 0) -> pa.Table:
    """The subject_splits rows of `subjects` (its `subject_id` column, in its order) as arrow with the MEDS
    schema; a slice of it is one site's when the frame holds several."""
    splits = subjects.select(pl.col("subject_id").cast(pl.Int64)).with_columns(
        split_of(pl.col("subject_id"), split_seed).alias("split")
    )
    return splits.to_arrow().cast(SUBJECT_SPLIT_ARROW_SCHEMA)


_NO_PARENT_CODES = pl.lit(pl.Series([[]], dtype=pl.List(pl.String))).first()


def codes_table(codes: pl.DataFrame) -> pa.Table:
    """The codes metadata rows of `codes` (`code`, `description` columns, in its order; no parent codes) as
    arrow with the MEDS schema; a slice of it is one site's when the frame holds several."""
    frame = codes.select(pl.col("code").cast(pl.String), pl.col("description").cast(pl.String),
                         _NO_PARENT_CODES.alias("parent_codes"))
    return frame.to_arrow().cast(CODE_METADATA_ARROW_SCHEMA)


def dataset_metadata(dataset_name: str, etl_name: str, extra: dict | None = None) -> dict:
    """The content of one site's dataset.json."""
    return {
        "dataset_name": dataset_name,
        "dataset_version": "1",
        "etl_name": etl_name,
        "etl_version": _package_version(),
        "meds_version": meds_version(),
        "created_at": datetime.now(UTC).isoformat(),
        **(extra or {}),
    }


def write_metadata_tables(site_dir: Path, splits: pa.Table, codes: pa.Table, dataset: dict) -> None:
    """Write one site's subject_splits.parquet and codes.parquet (from `subject_splits_table` / `codes_table`,
    or slices of them) and dataset.json (`dataset_metadata`), each atomically."""
    site_dir = Path(site_dir)
    with atomic_output(site_dir / SUBJECT_SPLITS_FILEPATH) as tmp:
        pq.write_table(splits, tmp)
    with atomic_output(site_dir / CODE_METADATA_FILEPATH) as tmp:
        pq.write_table(codes, tmp)
    write_text_atomic(site_dir / DATASET_METADATA_FILEPATH, json.dumps(dataset, indent=2, default=str))


def write_metadata(
    site_dir: Path,
    *,
    dataset_name: str,
    etl_name: str,
    subject_ids: Iterable[int] | pl.Series,
    code_descriptions: dict[str, str | None],
    extra: dict | None = None,
    split_seed: int = 0,
) -> None:
    """Write codes.parquet, dataset.json and subject_splits.parquet for one site."""
    ids = pl.Series("subject_id", list(subject_ids) if not isinstance(subject_ids, pl.Series) else subject_ids)
    codes = pl.DataFrame({"code": list(code_descriptions), "description": list(code_descriptions.values())},
                         schema={"code": pl.String, "description": pl.String})
    write_metadata_tables(site_dir, subject_splits_table(ids.to_frame("subject_id"), split_seed), codes_table(codes),
                          dataset_metadata(dataset_name, etl_name, extra))


@functools.cache
def meds_version() -> str:
    """The installed `meds` package's version (read from its distribution metadata: no import of `meds`)."""
    try:
        return version("meds")
    except PackageNotFoundError:
        return "0.4"


def _package_version() -> str:
    from chronorisk import __version__

    return __version__


def scan_site(root: Path, site_id: str) -> pl.LazyFrame:
    """All events of one site as a LazyFrame in the MEDS event schema."""
    data = site_root(root, site_id) / DATA_SUBDIRECTORY
    files = sorted(data.glob("**/*.parquet"))
    if not files:
        return pl.LazyFrame(schema=EVENT_SCHEMA)
    return pl.scan_parquet(files).select(list(EVENT_SCHEMA))


def scan_sites(root: Path, sites: Iterable[str] | None = None) -> pl.LazyFrame:
    """The pooled view: every site's events with a `site` column (centralized baseline only)."""
    chosen = list(sites) if sites is not None else site_ids(root)
    frames = [scan_site(root, s).with_columns(pl.lit(s).alias("site")) for s in chosen]
    if not frames:
        return pl.LazyFrame(schema={**EVENT_SCHEMA, "site": pl.String})
    return pl.concat(frames, how="vertical")


def read_splits(root: Path, site_id: str) -> pl.DataFrame:
    path = site_root(root, site_id) / SUBJECT_SPLITS_FILEPATH
    return pl.read_parquet(path)


def read_dataset_metadata(root: Path, site_id: str) -> dict:
    path = site_root(root, site_id) / DATASET_METADATA_FILEPATH
    return json.loads(path.read_text()) if path.is_file() else {}


def validate_site(root: Path, site_id: str) -> None:
    """Check every shard and metadata file against the `meds` package's schemas (raises on failure)."""
    import meds

    base = site_root(root, site_id)
    for shard in sorted((base / meds.data_subdirectory).glob("**/*.parquet")):
        meds.DataSchema.validate(pq.read_table(shard))
    meds.CodeMetadataSchema.validate(pq.read_table(base / meds.code_metadata_filepath))
    meds.SubjectSplitSchema.validate(pq.read_table(base / meds.subject_splits_filepath))
    meds.DatasetMetadataSchema.validate(json.loads((base / meds.dataset_metadata_filepath).read_text()))


def fingerprint(paths: Iterable[Path]) -> str:
    """Content fingerprint of files (sha256 over names, sizes and bytes); for model provenance."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
