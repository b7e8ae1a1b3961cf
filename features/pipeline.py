"""Fit once, transform everywhere: the feature pipeline.

- `code_summary(events)`: per code, how many subjects have it. A site's
  summary holds counts only, never records, so federated sites can share it.
- `fit_spec(summary, config, task)`: the vocabulary (data-driven code features)
  and every feature's name, display and unit, as a `FeatureSpec`. Summaries of
  several sites can be concatenated: counts are summed per code.
- `transform(spec, events, index)`: one row per index row, every feature as
  Float32, from events strictly before each row's prediction time. A pure
  LazyFrame -> LazyFrame composition of the family functions in
  `families.py`; training, serving (one patient's events) and federated
  clients all call this one function.
- `transform_shards(...)`: the same, run in subject chunks over MEDS shards
  so that a million patients fit in memory (a subject lives in one shard).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from chronorisk.data import codes as vocab
from chronorisk.errors import InputError
from chronorisk.features import families as fam
from chronorisk.features.concepts import ConceptMap, load_concepts
from chronorisk.features.config import FeatureConfig
from chronorisk.features.spec import (
    ConditionSpec,
    DrugClassSpec,
    FeatureInfo,
    FeatureSpec,
    MeasurementSpec,
)
from chronorisk.features.tasks import TaskDefinition

_US = pl.Datetime("us")
_US_PER_DAY = 86_400_000_000.0
EVENT_COLUMNS = {
    "subject_id": pl.Int64,
    "time": _US,
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
}
_SUMMARY_SCHEMA = {"code": pl.String, "n_subjects": pl.Int64}


# ---- fit ------------------------------------------------------------------------------------
def code_summary(events: pl.LazyFrame | pl.DataFrame, min_subjects: int = 1) -> pl.DataFrame:
    """(code, n_subjects): distinct subjects per code; codes under `min_subjects` are left out."""
    return (
        events.lazy()
        .select("subject_id", "code")
        .filter(pl.col("code").is_not_null())
        .group_by("code")
        .agg(pl.col("subject_id").n_unique().cast(pl.Int64).alias("n_subjects"))
        .filter(pl.col("n_subjects") >= min_subjects)
        .sort("code")
        .collect()
    )


def merge_summaries(summaries: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """Sum per-site code summaries (each site counts its own subjects; sites do not share subjects)."""
    frames = [s.select(pl.col("code").cast(pl.String), pl.col("n_subjects").cast(pl.Int64)) for s in summaries]
    if not frames:
        return pl.DataFrame(schema=_SUMMARY_SCHEMA)
    return pl.concat(frames).group_by("code").agg(pl.col("n_subjects").sum()).sort("code")


def _builtin_code(code: str, cmap: ConceptMap, known: set[str]) -> bool:
    return (
        code in known
        or code in (vocab.BIRTH, vocab.DEATH, vocab.SEX_FEMALE, vocab.SEX_MALE, vocab.SMOKING_STATUS)
        or code in {f"{vocab.ENCOUNTER_PREFIX}{e}" for e in vocab.ENCOUNTER_CLASSES}
        or cmap.is_condition_code(code)
    )


def select_vocabulary(summary: pl.DataFrame, config: FeatureConfig, cmap: ConceptMap) -> list[str]:
    """Top `max_codes` codes by subjects (ties by code), with >= `min_code_subjects`, not built in."""
    if not {"code", "n_subjects"} <= set(summary.columns):
        raise InputError("summary", f"needs columns code and n_subjects, got {summary.columns}")
    merged = merge_summaries([summary]).filter(pl.col("n_subjects") >= config.min_code_subjects)
    known = cmap.known_codes()
    candidates = [
        (n, code) for code, n in merged.iter_rows() if not _builtin_code(code, cmap, known)
    ]
    candidates.sort(key=lambda x: (-x[0], x[1]))
    return [code for _, code in candidates[: config.max_codes]]


def fit_spec(
    summary: pl.DataFrame,
    config: FeatureConfig | None = None,
    task: TaskDefinition | None = None,
    concepts: ConceptMap | None = None,
) -> FeatureSpec:
    """The feature spec: built-in concept features plus the selected code vocabulary."""
    config = config or FeatureConfig()
    cmap = concepts or load_concepts()
    windows = tuple(sorted(set(config.windows_days)))
    conditions = tuple(
        ConditionSpec(name=n, display=c.display, codes=c.codes, prefixes=c.prefixes)
        for n, c in cmap.conditions.items()
    )
    measurements = tuple(
        MeasurementSpec(name=n, display=vocab.MEASUREMENTS[n].display, unit=vocab.MEASUREMENTS[n].unit,
                        codes=tuple(codes))
        for n, codes in cmap.measurement_codes().items()
    )
    classes = tuple(
        DrugClassSpec(name=n, display=cmap.drug_class_display(n), codes=tuple(codes))
        for n, codes in cmap.drug_class_codes().items()
    )
    encounter_classes = tuple(vocab.ENCOUNTER_CLASSES)
    vocabulary = tuple(select_vocabulary(summary, config, cmap))
    features: dict[str, FeatureInfo] = {}
    features.update(fam.declare_demographics())
    features.update(fam.declare_conditions(conditions))
    features.update(fam.declare_measurements(measurements, windows))
    features.update(fam.declare_missingness(measurements))
    features.update(fam.declare_medications(classes, config.pdc_days))
    features.update(fam.declare_encounters(encounter_classes, windows))
    features.update(fam.declare_smoking())
    code_features, _ = fam.declare_codes(vocabulary)
    features.update(code_features)
    return FeatureSpec(
        task=task.name if task is not None else None,
        windows_days=windows,
        pdc_days=config.pdc_days,
        conditions=conditions,
        measurements=measurements,
        drug_classes=classes,
        encounter_classes=encounter_classes,
        vocabulary=vocabulary,
        feature_names=tuple(features),
        features=features,
        fit_info={
            "codes_in_summary": summary.height,
            "subjects_for_selection_min": config.min_code_subjects,
            "max_codes": config.max_codes,
            "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


# ---- transform ------------------------------------------------------------------------------
def _exact_code_table(spec: FeatureSpec) -> pl.DataFrame:
    """(code, kind, idx) for every exact code a feature uses; a code may have several rows."""
    rows: list[tuple[str, int, int]] = [
        (vocab.BIRTH, fam.KIND_BIRTH, 0),
        (vocab.SEX_FEMALE, fam.KIND_SEX, 1),
        (vocab.SEX_MALE, fam.KIND_SEX, 0),
        (vocab.SMOKING_STATUS, fam.KIND_SMOKE, 0),
    ]
    rows += [(f"{vocab.ENCOUNTER_PREFIX}{e}", fam.KIND_ENC, i) for i, e in enumerate(spec.encounter_classes)]
    rows += [(c, fam.KIND_MEAS, i) for i, m in enumerate(spec.measurements) for c in m.codes]
    rows += [(c, fam.KIND_MED, i) for i, k in enumerate(spec.drug_classes) for c in k.codes]
    rows += [(c, fam.KIND_COND, i) for i, cond in enumerate(spec.conditions) for c in cond.codes]
    rows += [(c, fam.KIND_CODE, i) for i, c in enumerate(spec.vocabulary)]
    table = pl.DataFrame(rows, schema={"code": pl.String, "kind": pl.UInt8, "idx": pl.Int32}, orient="row")
    return table.unique(maintain_order=True)


@dataclass(frozen=True)
class _CodeSlots:
    """Exact codes as an Enum: a code's slot (its Enum position) gives its (kind, idx) by lookup.

    Casting to an Enum and gathering is several times cheaper than a string join;
    the few codes with several mappings get their extra rows from `extra`, and
    codes of prefix families (ICD-10-CM/ICD-9-CM) are matched on their distinct values.
    """

    enum: pl.Enum
    kind: pl.Series
    idx: pl.Series
    extra: pl.DataFrame  # (slot, kind, idx): mappings beyond a code's first
    exact: pl.DataFrame  # (code, kind, idx): every exact mapping
    prefix_vocabs: tuple[str, ...]

    @classmethod
    def of(cls, spec: FeatureSpec, kinds: set[int] | None = None) -> _CodeSlots:
        """Slots of the codes feeding `kinds` (default: every family)."""
        table = _exact_code_table(spec)
        if kinds is not None:
            table = table.filter(pl.col("kind").is_in(sorted(kinds)))
        codes = table.get_column("code").unique(maintain_order=True)
        slot_of = {c: i for i, c in enumerate(codes)}
        with_slot = table.with_columns(
            pl.col("code").replace_strict(slot_of, return_dtype=pl.UInt32).alias("slot")
        ).with_columns(pl.int_range(pl.len()).over("slot").alias("nth"))
        first = with_slot.filter(pl.col("nth") == 0).sort("slot")
        vocabs = sorted({p.split("//", 1)[0] + "//" for c in spec.conditions for p in c.prefixes})
        if kinds is not None and fam.KIND_COND not in kinds:
            vocabs = []
        return cls(
            enum=pl.Enum(codes.to_list()),
            kind=first.get_column("kind"),
            idx=first.get_column("idx"),
            extra=with_slot.filter(pl.col("nth") > 0).select("slot", "kind", "idx"),
            exact=table,
            prefix_vocabs=tuple(vocabs),
        )


def _prefix_table(spec: FeatureSpec, codes: pl.LazyFrame, exact: pl.DataFrame) -> pl.LazyFrame:
    """(code, kind, idx) of condition prefix matches among the distinct `codes`, beyond exact ones."""
    distinct = codes.select("code").unique()
    parts = []
    for i, cond in enumerate(spec.conditions):
        if cond.prefixes:
            hit = pl.any_horizontal([pl.col("code").str.starts_with(p) for p in cond.prefixes])
            parts.append(distinct.filter(hit).select(
                "code", pl.lit(fam.KIND_COND, pl.UInt8).alias("kind"), pl.lit(i, pl.Int32).alias("idx")
            ))
    if not parts:
        return pl.LazyFrame(schema={"code": pl.String, "kind": pl.UInt8, "idx": pl.Int32})
    return pl.concat(parts).join(exact.lazy(), on=["code", "kind", "idx"], how="anti")


def code_table(spec: FeatureSpec, events: pl.LazyFrame) -> pl.LazyFrame:
    """(code, kind, idx) for every code of `events` a feature uses (exact codes and prefix matches)."""
    exact = _exact_code_table(spec)
    return pl.concat([exact.lazy(), _prefix_table(spec, events, exact)])


def conform_events_lazy(events: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """MEDS event columns with their types (missing value columns become nulls)."""
    frame = events.lazy()
    names = frame.collect_schema().names()
    for col in ("subject_id", "time", "code"):
        if col not in names:
            raise InputError("events", f"missing column {col}; MEDS events need subject_id, time, code")
    return frame.select(
        pl.col(c).cast(t) if c in names else pl.lit(None, dtype=t).alias(c) for c, t in EVENT_COLUMNS.items()
    )


def _conform_index(index: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    frame = index.lazy()
    schema = frame.collect_schema()
    for col in ("subject_id", "prediction_time"):
        if col not in schema:
            raise InputError("index", f"missing column {col}; the index needs subject_id and prediction_time")
    if not isinstance(schema["prediction_time"], pl.Datetime):
        raise InputError("index", f"prediction_time has type {schema['prediction_time']}, expected a datetime")
    return frame.with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(_US))


def tag_events(
    spec: FeatureSpec, events: pl.LazyFrame | pl.DataFrame, keys: pl.DataFrame, kinds: set[int] | None = None
) -> pl.DataFrame:
    """Events tagged for the families (see families.py), strictly before each prediction time.

    `keys` is (_ix, subject_id, prediction_time). Static rows (null time) are kept only for sex.
    When every subject has one prediction time (nightly scoring), subjects map to their row by a
    lookup instead of a join. `kinds` limits the tagging to the codes of some families.
    """
    slots = _CodeSlots.of(spec, kinds)
    ev = conform_events_lazy(events).with_columns(
        pl.col("code").cast(slots.enum, strict=False).to_physical().alias("slot")
    ).collect()
    exact = ev.lazy().filter(pl.col("slot").is_not_null())
    parts = [
        exact.with_columns(
            pl.lit(slots.kind).gather(pl.col("slot")).alias("kind"),
            pl.lit(slots.idx).gather(pl.col("slot")).alias("idx"),
        )
    ]
    if slots.extra.height:
        extra = slots.extra.with_columns(pl.col("slot").cast(ev.schema["slot"]))
        several = exact.filter(pl.col("slot").is_in(extra.get_column("slot").unique().implode()))
        parts.append(several.join(extra.lazy(), on="slot", how="inner"))
    if slots.prefix_vocabs:
        candidates = ev.lazy().filter(
            pl.any_horizontal([pl.col("code").str.starts_with(v) for v in slots.prefix_vocabs])
        )
        parts.append(candidates.join(_prefix_table(spec, candidates, slots.exact), on="code", how="inner"))
    columns = ["subject_id", "time", "kind", "idx", "numeric_value", "text_value"]
    tagged = pl.concat([p.select(columns) for p in parts], how="vertical")
    t = pl.col("time")
    pt = pl.col("prediction_time")
    if keys.get_column("subject_id").is_unique().all():
        ix = pl.Series(range(keys.height), dtype=pl.UInt32)
        tagged = tagged.with_columns(
            pl.col("subject_id").replace_strict(keys.get_column("subject_id"), ix, default=None).alias("_ix")
        ).filter(pl.col("_ix").is_not_null())
        tagged = tagged.with_columns(
            pl.lit(keys.get_column("prediction_time")).gather(pl.col("_ix")).alias("prediction_time")
        )
    else:
        tagged = tagged.join(keys.lazy(), on="subject_id", how="inner")
    return (
        tagged.filter((t < pt) | (t.is_null() & (pl.col("kind") == fam.KIND_SEX)))
        .select(
            "_ix",
            ((pt - t).dt.total_microseconds().cast(pl.Float64) / _US_PER_DAY).alias("days"),
            "kind",
            "idx",
            pl.col("numeric_value").cast(pl.Float64).alias("value"),
            "text_value",
        )
        .collect()
    )


def transform(
    spec: FeatureSpec,
    events: pl.LazyFrame | pl.DataFrame,
    index: pl.LazyFrame | pl.DataFrame,
    families: Iterable[str] | None = None,
) -> pl.LazyFrame:
    """Index rows (same order, all their columns) plus `spec.feature_names` as Float32.

    The returned LazyFrame reads `events` once (only the MEDS columns) and
    computes the families on the tagged events of that one read: polars would
    otherwise re-run the shared part of the plan for some of the families.
    The index is collected here (it is small: one row per prediction).
    `families` (names as in FeatureInfo.family) restricts the output to those
    families' features, e.g. for a benchmark of one family; default: all.
    """
    chosen = _chosen_families(families)
    idx = _conform_index(index).collect()
    names = [n for n in spec.feature_names if spec.features[n].family in chosen["output"]]
    schema = {**idx.schema, **dict.fromkeys(names, pl.Float32)}
    return conform_events_lazy(events).map_batches(
        lambda ev: _features(spec, ev, idx, chosen, names), schema=schema
    )


def _features(
    spec: FeatureSpec, events: pl.DataFrame, idx: pl.DataFrame, chosen: dict[str, set[str]], names: list[str]
) -> pl.DataFrame:
    """The features of every index row from the (materialized) events: tag once, run the families."""
    with_ix = idx.with_row_index("_ix")
    kinds = None if chosen["compute"] >= {f.__name__ for f in fam.FAMILIES} else fam.kinds_of(chosen["compute"])
    tagged = tag_events(spec, events, with_ix.select("_ix", "subject_id", "prediction_time"), kinds).lazy()
    ixs = with_ix.lazy().select("_ix")
    aligned = [
        ixs.join(part, on="_ix", how="left", maintain_order="left").drop("_ix")
        for family in fam.FAMILIES
        if family.__name__ in chosen["compute"]
        for part in family(spec, tagged)
    ]
    out = pl.concat([idx, *pl.collect_all(aligned)], how="horizontal")
    zero = set(fam.zero_filled(spec))
    feature_exprs = []
    for name in names:
        if name.startswith("miss_") and name.endswith("_never"):
            expr = pl.col(name.removesuffix("_never") + "_count").is_null()
        elif name in zero:
            expr = pl.col(name).fill_null(0)
        else:
            expr = pl.col(name)
        feature_exprs.append(expr.cast(pl.Float32).alias(name))
    return out.select(*idx.columns, *feature_exprs)


def _chosen_families(families: Iterable[str] | None) -> dict[str, set[str]]:
    """Which family functions to run and which features to output (missingness comes with measurements)."""
    every = {f.__name__ for f in fam.FAMILIES} | {"missingness"}
    wanted = set(every if families is None else families)
    unknown = wanted - every
    if unknown:
        raise InputError("families", f"unknown {sorted(unknown)}; known: {sorted(every)}")
    compute = {f for f in wanted if f != "missingness"}
    if "missingness" in wanted:
        compute.add("measurements")
    return {"compute": compute, "output": wanted}


# ---- batch runs over MEDS shards ---------------------------------------------------------------
def transform_shards(
    spec: FeatureSpec,
    shards: Iterable[Path],
    index: pl.DataFrame,
    chunk_subjects: int = 100_000,
) -> Iterator[pl.DataFrame]:
    """Feature frames for `index` over MEDS shards, about `chunk_subjects` subjects at a time.

    A MEDS subject lives in exactly one shard, so a chunk is whole shards (small
    ones grouped together) or a subject range of one big shard (read with a
    range filter the parquet statistics can prune). Index rows whose subject is
    in no shard are not returned.
    """
    index = _conform_index(index).collect()
    wanted = index.get_column("subject_id").unique()
    group: list[Path] = []
    group_ids: list[pl.Series] = []
    for shard in shards:
        ids = pl.scan_parquet(shard).select(pl.col("subject_id").unique()).collect().get_column("subject_id")
        ids = ids.filter(ids.is_in(wanted.implode()))
        if ids.is_empty():
            continue
        if sum(len(g) for g in group_ids) + len(ids) > chunk_subjects and group:
            yield _transform_files(spec, group, index, pl.concat(group_ids))
            group, group_ids = [], []
        if len(ids) <= chunk_subjects:
            group.append(shard)
            group_ids.append(ids)
            continue
        ids = ids.sort()
        for lo in range(0, len(ids), chunk_subjects):
            chunk = ids[lo : lo + chunk_subjects]
            yield _transform_files(spec, [shard], index, chunk, (chunk[0], chunk[-1]))
    if group:
        yield _transform_files(spec, group, index, pl.concat(group_ids))


def _transform_files(
    spec: FeatureSpec, files: list[Path], index: pl.DataFrame, ids: pl.Series,
    id_range: tuple[int, int] | None = None,
) -> pl.DataFrame:
    events = pl.scan_parquet(files)
    if id_range is not None:
        events = events.filter(pl.col("subject_id").is_between(*id_range))
    rows = index.filter(pl.col("subject_id").is_in(ids.implode()))
    return transform(spec, events, rows).collect()
