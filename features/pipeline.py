"""Fit once, transform everywhere: the feature pipeline.

- `code_summary(events)` (from `vocabulary.py`): per code, how many subjects have
  it, with numbers and with each text value. A site's summary holds counts only,
  never records, so federated sites can share it.
- `fit_spec(summary, config, task)`: the vocabulary (data-driven code features)
  and every feature's name and meaning, as a `FeatureSpec`. Summaries of
  several sites can be concatenated: counts are summed per code.
- `transform(spec, events, index)`: one row per index row, every feature as
  Float32, from events strictly before each row's prediction time. It returns
  a LazyFrame; collecting it reads `events` once, tags each event with the
  family and concept it feeds (`tag_events`), and composes the family
  functions of `families.py` (each a LazyFrame -> LazyFrame function of the
  tagged events). Training, serving (one patient's events) and federated
  clients all call this one function.
- `transform_shards(...)`: the same, run in subject chunks over MEDS shards
  so that a million patients fit in memory (a subject lives in one shard).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from chronorisk.caching import IdentityCache
from chronorisk.data import codes as vocab
from chronorisk.errors import InputError
from chronorisk.features import families as fam
from chronorisk.features.code_families import codes as code_features
from chronorisk.features.code_families import declare_codes
from chronorisk.features.concepts import ICD_PREFIXES, ConceptMap, load_concepts, match_form
from chronorisk.features.config import FeatureConfig
from chronorisk.features.spec import (
    ConditionSpec,
    DrugClassSpec,
    FeatureInfo,
    FeatureSpec,
    MeasurementSpec,
)
from chronorisk.features.tasks import TaskDefinition
from chronorisk.features.vocabulary import code_summary, merge_summaries, select_codes

__all__ = ["code_summary", "fit_spec", "merge_summaries", "transform", "transform_frame", "transform_shards"]

FAMILIES = (*fam.FAMILIES, code_features)  # each a (spec, tagged events) -> LazyFrames function
_US = pl.Datetime("us")
_US_PER_DAY = 86_400_000_000.0
EVENT_COLUMNS = {
    "subject_id": pl.Int64,
    "time": _US,
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
}


# ---- fit ------------------------------------------------------------------------------------
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
    codes, left_out = select_codes(summary, config, cmap)
    features: dict[str, FeatureInfo] = {}
    features.update(fam.declare_demographics())
    features.update(fam.declare_conditions(conditions))
    features.update(fam.declare_measurements(measurements, windows))
    features.update(fam.declare_missingness(measurements))
    features.update(fam.declare_medications(classes, config.pdc_days))
    features.update(fam.declare_encounters(encounter_classes, windows))
    features.update(fam.declare_smoking())
    features.update(declare_codes(tuple(codes), windows))
    return FeatureSpec(
        task=task.name if task is not None else None,
        windows_days=windows,
        pdc_days=config.pdc_days,
        conditions=conditions,
        measurements=measurements,
        drug_classes=classes,
        encounter_classes=encounter_classes,
        codes=tuple(codes),
        feature_names=tuple(features),
        features=features,
        fit_info={
            **left_out,
            "subjects_for_selection_min": config.min_code_subjects,
            "max_codes": config.max_codes,
            "max_texts_per_code": config.max_texts_per_code,
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
    rows += [(c.code, fam.KIND_CODE, i) for i, c in enumerate(spec.codes)]
    # an exact code may also fall in another condition's code family (prefix): known now, not per event
    known = {code for code, _, _ in rows}
    rows += _condition_matches(spec, sorted(known), set(rows))
    table = pl.DataFrame(rows, schema={"code": pl.String, "kind": pl.UInt8, "idx": pl.Int32}, orient="row")
    return table.unique(maintain_order=True)


_SLOT_CACHE: dict[tuple, tuple[FeatureSpec, _CodeSlots]] = {}  # a spec is immutable: build its slots once


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

    def extra_of(self, slot_type: pl.DataType) -> tuple[pl.DataFrame, pl.Series]:
        """`extra` with its slot column of `slot_type`, and its distinct slots as one list (made once)."""
        hit = self._extra_by_type.get(slot_type)
        if hit is None:
            extra = self.extra.with_columns(pl.col("slot").cast(slot_type))
            hit = self._extra_by_type[slot_type] = (extra, extra.get_column("slot").unique().implode())
        return hit

    @cached_property
    def _extra_by_type(self) -> dict:
        return {}

    @cached_property
    def exact_conditions(self) -> set[tuple[str, int, int]]:
        """(code, kind, idx) of the exact condition mappings."""
        return set(self.exact.filter(pl.col("kind") == fam.KIND_COND).select("code", "kind", "idx").iter_rows())

    @classmethod
    def of(cls, spec: FeatureSpec, kinds: set[int] | None = None) -> _CodeSlots:
        """Slots of the codes feeding `kinds` (default: every family); cached per spec object."""
        key = (id(spec), None if kinds is None else frozenset(kinds))
        hit = _SLOT_CACHE.get(key)
        if hit is not None and hit[0] is spec:
            return hit[1]
        slots = cls._build(spec, kinds)
        if len(_SLOT_CACHE) >= 16:
            _SLOT_CACHE.pop(next(iter(_SLOT_CACHE)))
        _SLOT_CACHE[key] = (spec, slots)
        return slots

    @classmethod
    def _build(cls, spec: FeatureSpec, kinds: set[int] | None) -> _CodeSlots:
        table = _exact_code_table(spec)
        if kinds is not None:
            table = table.filter(pl.col("kind").is_in(sorted(kinds)))
        codes = table.get_column("code").unique(maintain_order=True)
        slot_of = {c: i for i, c in enumerate(codes)}
        with_slot = table.with_columns(
            pl.col("code").replace_strict(slot_of, return_dtype=pl.UInt32).alias("slot")
        ).with_columns(pl.int_range(pl.len()).over("slot").alias("nth"))
        first = with_slot.filter(pl.col("nth") == 0).sort("slot")
        vocabs = sorted({p.split("//", 1)[0] + "//" for c in spec.conditions for p in c.prefixes} | set(ICD_PREFIXES))
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


def _prefix_table(spec: FeatureSpec, codes: pl.Series | list[str], exact: pl.DataFrame,
                  known: set | None = None) -> pl.DataFrame:
    """(code, kind, idx) of condition matches (prefixes, ICD codes with or without dots) among the
    distinct `codes`, beyond exact ones (`known`: the exact condition rows of `exact`, when known)."""
    if known is None:
        known = set(exact.filter(pl.col("kind") == fam.KIND_COND).select("code", "kind", "idx").iter_rows())
    distinct = codes.unique().drop_nulls().to_list() if isinstance(codes, pl.Series) else codes
    rows = _condition_matches(spec, distinct, known)
    return pl.DataFrame(rows, schema={"code": pl.String, "kind": pl.UInt8, "idx": pl.Int32}, orient="row")


def _condition_matches(spec: FeatureSpec, codes: list[str], known: set) -> list[tuple[str, int, int]]:
    """(code, KIND_COND, condition index) of every condition each code matches, not already in `known`."""
    matchers = [
        (i, frozenset(match_form(c) for c in cond.codes), tuple(match_form(p) for p in cond.prefixes))
        for i, cond in enumerate(spec.conditions)
    ]
    rows = []
    for code in dict.fromkeys(codes):
        form = match_form(code)
        for i, exact, prefixes in matchers:
            if (form in exact or form.startswith(prefixes)) and (code, fam.KIND_COND, i) not in known:
                rows.append((code, fam.KIND_COND, i))
    return rows


def code_table(spec: FeatureSpec, events: pl.LazyFrame) -> pl.LazyFrame:
    """(code, kind, idx) for every code of `events` a feature uses (exact codes and prefix matches)."""
    exact = _exact_code_table(spec)
    distinct = events.select(pl.col("code").unique()).collect().get_column("code")
    return pl.concat([exact, _prefix_table(spec, distinct, exact)]).lazy()


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
    ev = conform_events_lazy(events).collect(**run_options(keys.height))
    ev = ev.with_columns(ev.get_column("code").cast(slots.enum, strict=False).to_physical().alias("slot"))
    one_time_each = keys.get_column("subject_id").is_unique().all()
    if one_time_each:  # nightly scoring: look rows up instead of joining
        ev = ev.with_columns(_row_of_subject(ev.get_column("subject_id"), keys.get_column("subject_id")))
    columns = ["subject_id", "time", "kind", "idx", "numeric_value", "text_value", "_ix"]
    exact = ev.lazy().filter(pl.col("slot").is_not_null()).drop("code")
    parts = [
        exact.with_columns(
            pl.lit(slots.kind).gather(pl.col("slot")).alias("kind"),
            pl.lit(slots.idx).gather(pl.col("slot")).alias("idx"),
        )
    ]
    if slots.extra.height:
        extra, extra_slots = slots.extra_of(ev.schema["slot"])
        if ev.get_column("slot").is_in(extra_slots).any():  # codes with several mappings: their other rows
            several = exact.filter(pl.col("slot").is_in(extra_slots))
            parts.append(several.join(extra.lazy(), on="slot", how="inner"))
    if slots.prefix_vocabs:
        # codes the spec does not know exactly, but which may fall in a condition's code family
        unknown = ev.filter(pl.col("slot").is_null()).get_column("code").unique()
        candidates = [c for c in unknown.to_list() if c is not None and c.startswith(slots.prefix_vocabs)]
        table = _prefix_table(spec, candidates, slots.exact, slots.exact_conditions) if candidates else None
        if table is not None and table.height:
            parts.append(ev.lazy().filter(pl.col("slot").is_null()).join(table.lazy(), on="code"))
    if not one_time_each:
        columns.remove("_ix")
    located = [_locate(p.select(columns), keys, one_time_each) for p in parts]
    return pl.concat(pl.collect_all(located, **run_options(keys.height)), how="vertical", rechunk=False)


def _row_of_subject(subjects: pl.Series, index_subjects: pl.Series) -> pl.Series:
    """Each event's index row (null when its subject is not in the index), when subjects are unique.

    Events come grouped by subject (MEDS), so the lookup runs once per run of equal subjects; for the
    index of a few patients (serving) a binary search over it is cheaper than finding the runs.
    """
    if 0 < len(index_subjects) <= fam.FEW_ROWS:
        keys = index_subjects.to_numpy()
        order = np.argsort(keys, kind="stable")
        values = subjects.to_numpy()
        at = np.minimum(np.searchsorted(keys, values, sorter=order), len(keys) - 1)
        row = order[at]
        found = keys[row] == values
        if found.all():
            return pl.Series("_ix", row, dtype=pl.UInt32)
        return pl.Series("_ix", np.where(found, row, np.nan), nan_to_null=True).cast(pl.UInt32)
    runs = subjects.rle_id()
    run_subject = subjects.rle().struct.field("value")
    rows = pl.Series(range(len(index_subjects)), dtype=pl.UInt32)
    run_row = run_subject.replace_strict(index_subjects, rows, default=None, return_dtype=pl.UInt32)
    return run_row.gather(runs).alias("_ix")


def _locate(frame: pl.LazyFrame, keys: pl.DataFrame, has_row: bool) -> pl.LazyFrame:
    """Attach each event to its index row(s) and keep what lies strictly before the prediction time."""
    t = pl.col("time")
    pt = pl.col("prediction_time")
    if has_row:
        frame = frame.filter(pl.col("_ix").is_not_null()).with_columns(
            pl.lit(keys.get_column("prediction_time")).gather(pl.col("_ix")).alias("prediction_time")
        )
    else:
        frame = frame.join(keys.lazy(), on="subject_id", how="inner")
    return frame.filter((t < pt) | (t.is_null() & (pl.col("kind") == fam.KIND_SEX))).select(
        "_ix",
        ((pt - t).dt.total_microseconds().cast(pl.Float64) / _US_PER_DAY).alias("days"),
        "kind",
        "idx",
        pl.col("numeric_value").cast(pl.Float64).alias("value"),
        "text_value",
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


def transform_frame(
    spec: FeatureSpec, events: pl.DataFrame, index: pl.DataFrame, families: Iterable[str] | None = None
) -> pl.DataFrame:
    """`transform(spec, events, index, families).collect()` for events already in memory (a patient being
    served): the same computation without the lazy plan around it, which for a few rows costs as much
    as a family (the events are conformed once, by `tag_events`)."""
    chosen = _chosen_families(families)
    idx = _conform_index(index).collect(**run_options(index.height))
    names = [n for n in spec.feature_names if spec.features[n].family in chosen["output"]]
    return _features(spec, events, idx, chosen, names)


def _features(
    spec: FeatureSpec, events: pl.DataFrame, idx: pl.DataFrame, chosen: dict[str, set[str]], names: list[str]
) -> pl.DataFrame:
    """The features of every index row from the (materialized) events: tag once, run the families.

    Every family part is a frame keyed by `_ix` (only the rows it has events of). For a few rows (one
    patient being served) the parts are collected in one go and placed by `_ix` with numpy; for many,
    each part is left-joined to the index rows and finished by polars expressions. Same values."""
    with_ix = idx.with_row_index("_ix")
    kinds = None if chosen["compute"] >= {f.__name__ for f in FAMILIES} else fam.kinds_of(chosen["compute"])
    tagged = tag_events(spec, events, with_ix.select("_ix", "subject_id", "prediction_time"), kinds)
    plan = _final_plan(spec, tuple(names))
    if idx.height <= fam.FEW_ROWS:
        # a family without events of its kinds gives no row (all "no value"): not run at all
        present = set(tagged.get_column("kind").unique().to_list())
        parts = [part for family in FAMILIES if family.__name__ in chosen["compute"]
                 and fam.kinds_of({family.__name__}) & present for part in family(spec, tagged.lazy())]
        plans = [part.rows if isinstance(part, fam.NumpyPart) else part for part in parts]
        frames = pl.collect_all(plans, **run_options(idx.height))
        return pl.concat([idx, _finish_matrix(_placed_sources(parts, frames, idx.height, plan), plan)],
                         how="horizontal")
    lazy = tagged.lazy()
    parts = [part.frame() if isinstance(part, fam.NumpyPart) else part
             for family in FAMILIES if family.__name__ in chosen["compute"] for part in family(spec, lazy)]
    ixs = with_ix.lazy().select("_ix")
    aligned = [ixs.join(part, on="_ix", how="left", maintain_order="left").drop("_ix") for part in parts]
    out = pl.concat([idx, *pl.collect_all(aligned, **run_options(idx.height))], how="horizontal")
    return out.select(*idx.columns, *plan.exprs)


def run_options(index_rows: int) -> dict:
    """How to run plans over the events of `index_rows` predictions. For a few (one patient being
    served) the in-memory engine starts a plan faster than the streaming one and the optimizer passes
    cost more than they save; same results either way."""
    if index_rows <= fam.FEW_ROWS:
        return {"engine": "in-memory", "optimizations": pl.QueryOptFlags.none()}
    return {}


_FINAL_CACHE = IdentityCache(16)  # (spec, names) -> _FinalPlan


@dataclass(frozen=True)
class _FinalPlan:
    """How each output feature comes from the family columns: its source column and its treatment.

    Treatments (numpy families mark "no value" with NaN, which becomes null): `zero` counts and flags
    are 0 when absent, `never` is 1 when the source count is missing, the others stay null.
    One description, two executors: polars expressions (`exprs`, for many rows) and numpy
    (`_finish_small`, for a few rows, where ~400 expressions cost milliseconds per call).
    """

    names: tuple[str, ...]
    sources: tuple[str, ...]  # distinct source columns
    gather: np.ndarray  # position in `sources` of each output's source column
    zero: np.ndarray  # bool per output
    never: np.ndarray  # bool per output

    def positions(self, columns: tuple[str, ...]) -> np.ndarray:
        """Position in `sources` of each of a family part's columns: -2 for `_ix`, -1 for one not used."""
        hit = self._positions.get(columns)
        if hit is None:
            at = {s: i for i, s in enumerate(self.sources)}
            hit = np.array([-2 if c == "_ix" else at.get(c, -1) for c in columns], dtype=np.intp)
            self._positions[columns] = hit
        return hit

    @cached_property
    def _positions(self) -> dict[tuple[str, ...], np.ndarray]:
        return {}

    @cached_property
    def exprs(self) -> list[pl.Expr]:
        """Float32 feature columns as polars expressions (built once per plan)."""
        out = []
        for j, name in enumerate(self.names):
            expr = pl.col(self.sources[self.gather[j]]).fill_nan(None)
            if self.never[j]:
                expr = expr.is_null()
            elif self.zero[j]:
                expr = expr.fill_null(0)
            out.append(expr.cast(pl.Float32).alias(name))
        return out


def _final_plan(spec: FeatureSpec, names: tuple[str, ...]) -> _FinalPlan:
    """The finishing plan of `names` (cached per spec: a spec is immutable)."""
    hit = _FINAL_CACHE.get((spec,), names)
    if hit is not None:
        return hit
    zero = set(fam.zero_filled(spec))
    never = [spec.features[name].aggregate == "never" for name in names]
    source_of = [n.removesuffix("_never") + "_count" if nv else n for n, nv in zip(names, never, strict=True)]
    sources = tuple(dict.fromkeys(source_of))
    position = {s: i for i, s in enumerate(sources)}
    plan = _FinalPlan(
        names=names,
        sources=sources,
        gather=np.array([position[s] for s in source_of], dtype=np.intp),
        zero=np.array([n in zero and not nv for n, nv in zip(names, never, strict=True)], dtype=bool),
        never=np.array(never, dtype=bool),
    )
    return _FINAL_CACHE.put((spec,), names, plan)


def _finish_small(out: pl.DataFrame, plan: _FinalPlan) -> pl.DataFrame:
    """`plan.exprs` computed with numpy: same values (NaN and null are both "no value" here)."""
    by_name = {column.name: column for column in out.get_columns()}  # no select: ~400 expressions cost
    values = np.column_stack([by_name[name].to_numpy() for name in plan.sources])
    if values.dtype != np.float64:  # the families give Float64 (null -> NaN); any other type is cast
        values = out.select(plan.sources).cast(pl.Float64).to_numpy()
    return _finish_matrix(values, plan)


def _placed_sources(parts: list, frames: list[pl.DataFrame], n_rows: int, plan: _FinalPlan) -> np.ndarray:
    """The (row, source column) matrix of the family parts, from `frames` (each part's plan collected: the
    part itself, keyed by `_ix` with the rows it has events of, or a NumpyPart's rows, which its `compute`
    turns into a matrix), NaN where a part has no row: what left-joining each part to the index rows gives."""
    values = np.full((n_rows, len(plan.sources)), np.nan)
    for part, frame in zip(parts, frames, strict=True):
        if frame.height == 0:
            continue
        if isinstance(part, fam.NumpyPart):
            ix, matrix = part.compute(frame)
            where = plan.positions(part.names)
            rows, matrix = ix.astype(np.intp), matrix.T
        else:
            where = plan.positions(tuple(frame.columns))  # position of each column in `plan.sources`
            matrix = frame.to_numpy()  # `_ix` (UInt32) and Float64 columns: one Float64 matrix, null -> NaN
            if matrix.dtype != np.float64:  # the families give Float64; any other type is cast
                matrix = frame.cast(pl.Float64).to_numpy()
            rows = matrix[:, where == -2][:, 0].astype(np.intp)
        used = where >= 0  # -1: a column not used by the features asked for; -2: `_ix`
        if len(rows) and used.any():
            values[np.ix_(rows, where[used])] = matrix[:, used]
    return values


def _finish_matrix(values: np.ndarray, plan: _FinalPlan) -> pl.DataFrame:
    """The output features from the (row, source column) matrix (see `_FinalPlan`)."""
    values = values[:, plan.gather]
    missing = np.isnan(values)
    values = np.where(plan.never, missing, np.where(plan.zero & missing, 0.0, values)).astype(np.float32)
    return fam.frame_of_columns(values.T, list(plan.names), nan_to_null=True)


def _chosen_families(families: Iterable[str] | None) -> dict[str, set[str]]:
    """Which family functions to run and which features to output (missingness comes with measurements)."""
    every = {f.__name__ for f in FAMILIES} | {"missingness"}
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
    chunk_subjects: int = 15_000,
    workers: int = 1,
) -> Iterator[pl.DataFrame]:
    """Feature frames for `index` over MEDS shards, about `chunk_subjects` index rows at a time.

    A MEDS subject lives in exactly one shard, so a chunk is whole shards (small
    ones grouped together) or a subject range of one big shard (read with a
    range filter the parquet statistics can prune). Index rows whose subject is
    in no shard are not returned. With `workers` > 1, that many chunks are
    computed at once in threads (polars and numpy release the GIL), in order.
    """
    index = _conform_index(index).collect()
    jobs = _chunks(list(shards), index, chunk_subjects)
    if workers <= 1:
        for files, ids, id_range in jobs:
            yield _transform_files(spec, files, index, ids, id_range)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for files, ids, id_range in jobs:
            pending.append(pool.submit(_transform_files, spec, files, index, ids, id_range))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunks(
    shards: list[Path], index: pl.DataFrame, chunk_subjects: int
) -> Iterator[tuple[list[Path], pl.Series, tuple[int, int] | None]]:
    """(files, subject ids, optional id range) of each chunk."""
    wanted = index.get_column("subject_id").unique()
    # a chunk holds about `chunk_subjects` index rows: with several prediction times per
    # subject (training) every event is repeated per time, so take fewer subjects
    chunk_subjects = max(1, int(chunk_subjects * len(wanted) / max(index.height, 1)))
    group: list[Path] = []
    group_ids: list[pl.Series] = []
    for shard in shards:
        ids = pl.scan_parquet(shard).select(pl.col("subject_id").unique()).collect().get_column("subject_id")
        ids = ids.filter(ids.is_in(wanted.implode()))
        if ids.is_empty():
            continue
        if sum(len(g) for g in group_ids) + len(ids) > chunk_subjects and group:
            yield group, pl.concat(group_ids), None
            group, group_ids = [], []
        if len(ids) <= chunk_subjects:
            group.append(shard)
            group_ids.append(ids)
            continue
        ids = ids.sort()
        for lo in range(0, len(ids), chunk_subjects):
            chunk = ids[lo : lo + chunk_subjects]
            yield [shard], chunk, (chunk[0], chunk[-1])
    if group:
        yield group, pl.concat(group_ids), None


def _transform_files(
    spec: FeatureSpec, files: list[Path], index: pl.DataFrame, ids: pl.Series,
    id_range: tuple[int, int] | None = None,
) -> pl.DataFrame:
    events = pl.scan_parquet(files)
    if id_range is not None:
        events = events.filter(pl.col("subject_id").is_between(*id_range))
    rows = index.filter(pl.col("subject_id").is_in(ids.implode()))
    return transform(spec, events, rows).collect()
