"""Feature families: what each feature means, and how to compute it from tagged events.

Each family is two functions. `declare_<family>(...)` names its features with
a display name and unit (in column order) when the spec is fitted;
`<family>(spec, ev)` computes them as LazyFrames keyed by `_ix`, the row
number of the prediction index. `ev` is the tagged event frame built by
`pipeline.tag_events`, which already holds only events strictly before each
prediction time (and static rows without a time):

    _ix   UInt32   index row the event belongs to (sorted)
    days  Float64  days from the event to the prediction time (> 0; null for static rows)
    kind  UInt8    which family the code feeds (KIND_* below)
    idx   Int32    position of the code's concept/measurement/class/code in the spec
    value Float64  numeric_value
    text_value String

Conventions: a count with nothing to count is 0; a value that cannot be known
(no measurement, one value for a std) is null; `days_since_last` features
date the values of their family (FeatureInfo.date_feature).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from chronorisk.caching import IdentityCache
from chronorisk.data import codes as vocab
from chronorisk.features.spec import (
    ConditionSpec,
    DrugClassSpec,
    FeatureInfo,
    FeatureSpec,
    MeasurementSpec,
)

KIND_BIRTH, KIND_SEX, KIND_COND, KIND_MEAS, KIND_MED, KIND_ENC, KIND_SMOKE, KIND_CODE = range(8)
DAYS_PER_YEAR = 365.25
ENCOUNTER_DISPLAY = {"AMB": "Ambulatory", "EMER": "Emergency", "IMP": "Inpatient"}
WINDOW_STATS = ("mean", "min", "max", "std", "count", "slope")
SMOKING_STATES = ("never", "former", "current")  # coded 0, 1, 2

Declared = dict[str, FeatureInfo]
Parts = list["pl.LazyFrame | NumpyPart"]


def feature_safe(text: str) -> str:
    """A column-name-safe form of a code (LightGBM refuses JSON special characters)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


# ---- declarations -------------------------------------------------------------------------
# Bounds of what a feature can hold (serving refuses values outside them). Elapsed times end at
# the longest human life; a count has no natural ceiling, so COUNT_MAX only refuses the absurd.
YEARS_MAX = 130.0
DAYS_MAX = YEARS_MAX * DAYS_PER_YEAR
COUNT_MAX = 1e6
FLAG = (0.0, 1.0)


def _elapsed(display: str, family: str, concept: str | None, concept_display: str | None,
             aggregate: str = "days_since_last", **extra) -> FeatureInfo:
    years = aggregate.startswith("years")
    return FeatureInfo(
        display=display, unit="years" if years else "days", family=family, kind="elapsed_days",
        concept=concept, concept_display=concept_display, aggregate=aggregate,
        bounds=(0.0, YEARS_MAX if years else DAYS_MAX), grows_with_clock=True, **extra,
    )


def declare_demographics() -> Declared:
    return {
        "demo_age_years": FeatureInfo(display="Age", unit="years", family="demographics", kind="age",
                                      concept="age", concept_display="Age", bounds=(0.0, YEARS_MAX),
                                      grows_with_clock=True),
        "demo_sex_female": FeatureInfo(display="Female sex", unit="1 = female, 0 = male", family="demographics",
                                       kind="binary", concept="sex", concept_display="Sex", bounds=FLAG),
    }


def declare_conditions(conditions: tuple[ConditionSpec, ...]) -> Declared:
    out: Declared = {}
    for c in conditions:
        last = f"cond_{c.name}_days_since_last"
        about = {"concept": c.name, "concept_display": c.display}
        out[f"cond_{c.name}_present"] = FeatureInfo(
            display=f"{c.display} recorded", unit="1 = yes", family="conditions", date_feature=last,
            kind="binary", aggregate="present", bounds=FLAG, **about,
        )
        out[f"cond_{c.name}_years_since_first"] = _elapsed(
            f"{c.display}: years since first recorded", "conditions", aggregate="years_since_first", **about
        )
        out[last] = _elapsed(f"{c.display}: days since last recorded", "conditions", **about)
    return out


STAT_WORDS = {"mean": "mean", "min": "lowest", "max": "highest", "std": "standard deviation",
              "count": "number of measurements", "slope": "trend"}
STAT_AGGREGATE = {"slope": "trend"}  # aggregate names of FeatureInfo where they differ from the column's


def value_info(display: str, unit: str, stat: str, bounds: tuple[float, float] | None, *, family: str,
               concept: str, concept_display: str, window: int | None, date_feature: str,
               code: str | None = None) -> FeatureInfo:
    """One value aggregate (last/mean/min/max/std/count/slope) of a measured quantity."""
    kind, unit_of, bounds_of = "value", unit, bounds
    if stat == "count":
        kind, unit_of, bounds_of = "count", "measurements", (0.0, COUNT_MAX)
    elif stat == "slope":
        unit_of, bounds_of = f"{unit} per year".strip(), None
    elif stat == "std":
        bounds_of = None if bounds is None else (0.0, bounds[1] - bounds[0])
    words = "last value" if stat == "last" else (
        f"{STAT_WORDS[stat]} over {window} days" if window else STAT_WORDS[stat])
    return FeatureInfo(
        display=f"{display}, {words}", unit=unit_of, family=family, date_feature=date_feature, kind=kind,
        concept=concept, code=code, aggregate=STAT_AGGREGATE.get(stat, stat), window_days=window,
        bounds=bounds_of, concept_display=concept_display,
    )


def declare_measurements(measurements: tuple[MeasurementSpec, ...], windows: tuple[int, ...]) -> Declared:
    out: Declared = {}
    for m in measurements:
        last = f"meas_{m.name}_days_since_last"
        plausible = vocab.MEASUREMENTS[m.name].plausible if m.name in vocab.MEASUREMENTS else None
        bounds = None if plausible is None else (float(plausible[0]), float(plausible[1]))
        about = {"family": "measurements", "concept": m.name, "concept_display": m.display, "date_feature": last}
        out[f"meas_{m.name}_last"] = value_info(m.display, m.unit, "last", bounds, window=None, **about)
        out[last] = _elapsed(f"{m.display}: days since last measured", "measurements", m.name, m.display)
        for w in windows:
            for stat in WINDOW_STATS:
                out[f"meas_{m.name}_{stat}_{w}d"] = value_info(m.display, m.unit, stat, bounds, window=w, **about)
    return out


def declare_missingness(measurements: tuple[MeasurementSpec, ...]) -> Declared:
    out: Declared = {}
    for m in measurements:
        last = f"meas_{m.name}_days_since_last"
        about = {"concept": m.name, "concept_display": m.display}
        out[f"miss_{m.name}_never"] = FeatureInfo(
            display=f"{m.display} never measured", unit="1 = never", family="missingness", kind="binary",
            aggregate="never", bounds=FLAG, **about,
        )
        out[f"miss_{m.name}_count"] = FeatureInfo(
            display=f"{m.display}: measurements on record", unit="measurements", family="missingness",
            date_feature=last, kind="count", aggregate="count", bounds=(0.0, COUNT_MAX), **about,
        )
    return out


def declare_medications(classes: tuple[DrugClassSpec, ...], pdc_days: int) -> Declared:
    out: Declared = {}
    for k in classes:
        last = f"med_{k.name}_days_since_last"
        about = {"family": "medications", "concept": k.name, "concept_display": k.display}
        out[f"med_{k.name}_active"] = FeatureInfo(
            display=f"{k.display}: supply active", unit="1 = yes", date_feature=last, kind="binary",
            aggregate="active", bounds=FLAG, **about,
        )
        out[f"med_{k.name}_count_{pdc_days}d"] = FeatureInfo(
            display=f"{k.display}: prescriptions in {pdc_days} days", unit="prescriptions", date_feature=last,
            kind="count", aggregate="count", window_days=pdc_days, bounds=(0.0, COUNT_MAX), **about,
        )
        out[last] = _elapsed(f"{k.display}: days since last prescription", "medications", k.name, k.display)
        out[f"med_{k.name}_pdc_{pdc_days}d"] = FeatureInfo(
            display=f"{k.display}: proportion of days covered, {pdc_days} days", unit="fraction",
            date_feature=last, kind="proportion", aggregate="pdc", window_days=pdc_days, bounds=FLAG, **about,
        )
    return out


def declare_encounters(classes: tuple[str, ...], windows: tuple[int, ...]) -> Declared:
    out: Declared = {}
    for e in classes:
        name = ENCOUNTER_DISPLAY.get(e, e.title())
        last = f"enc_{feature_safe(e).lower()}_days_since_last"
        about = {"family": "encounters", "concept": f"encounter_{feature_safe(e).lower()}",
                 "code": f"{vocab.ENCOUNTER_PREFIX}{e}", "concept_display": f"{name} encounters"}
        for w in windows:
            out[f"enc_{feature_safe(e).lower()}_count_{w}d"] = FeatureInfo(
                display=f"{name} encounters in {w} days", unit="encounters", date_feature=last, kind="count",
                aggregate="count", window_days=w, bounds=(0.0, COUNT_MAX), **about,
            )
        out[last] = _elapsed(f"{name} encounter: days since last", **about)
    return out


def declare_smoking() -> Declared:
    last = "smoking_days_since_last"
    about = {"family": "smoking", "concept": "smoking", "concept_display": "Smoking status"}
    out: Declared = {
        f"smoking_{s}": FeatureInfo(display=f"Smoking status: {s} smoker", unit="1 = yes", date_feature=last,
                                    kind="binary", aggregate="last", bounds=FLAG, **about)
        for s in reversed(SMOKING_STATES)
    }
    out[last] = _elapsed("Smoking status: days since recorded", **about)
    return out


# ---- computations -------------------------------------------------------------------------
# Families aggregate with plain column aggregations (polars' fast path) over one
# combined key, `key = _ix * n + idx`, and then scatter the long result into one
# column per (statistic, concept) with numpy: a polars pivot of this shape is
# two orders of magnitude slower.


_PER_SPEC = IdentityCache(64)  # (spec, what) -> names and arrays a family derives from the spec alone


def per_spec(spec: FeatureSpec, what: str, build: Callable[[], object]):
    """`build()`, made once per spec object (a spec never changes): a family's names and arrays, which
    for one patient being served would otherwise be rebuilt on every call."""
    hit = _PER_SPEC.get((spec,), what)
    return hit if hit is not None else _PER_SPEC.put((spec,), what, build())


def _of(ev: pl.LazyFrame, kind: int) -> pl.LazyFrame:
    return ev.filter(pl.col("kind") == kind)


def _in(days: int) -> pl.Expr:
    return pl.col("days") <= days


def _key_expr(n: int) -> pl.Expr:
    return (pl.col("_ix").cast(pl.UInt64) * n + pl.col("idx").cast(pl.UInt64)).alias("key")


def _keyed(frame: pl.LazyFrame, n: int) -> pl.LazyFrame:
    return frame.with_columns(_key_expr(n))


def _scatter(keys: np.ndarray, n: int, columns: dict[str, list[str]],
             values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Long rows (key = ix * n + idx) -> (the ix present, a (column, row) matrix: one column per (value, idx))."""
    rows, inverse = np.unique(keys // n, return_inverse=True)
    j = (keys % n).astype(np.intp)
    dense = np.full((len(columns) * n, len(rows)), np.nan)
    for c, col in enumerate(columns):
        dense[c * n + j, inverse] = values[col]
    return rows, dense


@dataclass(frozen=True)
class NumpyPart:
    """A family part computed with numpy from the rows of one plan: `compute(rows frame)` gives the `_ix`
    present and a (column, row) matrix of Float64 columns `names` (NaN: no value).

    `frame()` is the part as a LazyFrame keyed by `_ix` (one column per name), as every other part; for a
    few rows the pipeline runs `rows` and places the matrix itself (building a frame of some hundred
    columns, only to read them back, costs more than the arithmetic)."""

    rows: pl.LazyFrame
    compute: Callable[[pl.DataFrame], tuple[np.ndarray, np.ndarray]]
    names: tuple[str, ...]

    def frame(self) -> pl.LazyFrame:
        schema = {"_ix": pl.UInt32, **dict.fromkeys(self.names, pl.Float64)}
        names = list(self.names)

        def run(df: pl.DataFrame) -> pl.DataFrame:
            ix, matrix = self.compute(df)
            if len(ix) == 0:
                return pl.DataFrame(schema=schema)
            return frame_of_columns(matrix, names).insert_column(0, pl.Series("_ix", ix, dtype=pl.UInt32))

        return self.rows.map_batches(run, schema=schema)


def no_rows(width: int) -> tuple[np.ndarray, np.ndarray]:
    """What a NumpyPart's `compute` gives when no row has a value."""
    return np.zeros(0, dtype=np.intp), np.zeros((width, 0))


FEW_ROWS = 256  # up to this many rows (one patient being served), per-column and per-expression costs dominate


def frame_of_columns(matrix: np.ndarray, names: list[str], *, nan_to_null: bool = False) -> pl.DataFrame:
    """`pl.from_numpy(matrix, schema=names, orient="col")` (one column per matrix row), values unchanged
    (NaN becomes null with `nan_to_null`).

    For a few rows (one patient being served) the frame is made from one Series reshaped to an
    array column and unnested: from_numpy builds each of some hundred columns in Python, ~1 ms;
    for many rows from_numpy is the faster one.
    """
    if matrix.shape[1] > FEW_ROWS:
        # one column: from_numpy(orient="col") makes a 1 x 1 frame of an array (polars 1.x), so build it directly
        frame = (pl.DataFrame({names[0]: matrix[0]}) if len(names) == 1
                 else pl.from_numpy(matrix, schema=names, orient="col"))
        return frame.fill_nan(None) if nan_to_null else frame
    flat = pl.Series(np.ascontiguousarray(matrix.T).ravel(), nan_to_null=nan_to_null)
    return flat.reshape((matrix.shape[1], matrix.shape[0])).arr.to_struct(fields=names).struct.unnest()


def _widen(long: pl.LazyFrame, n: int, columns: dict[str, list[str]]) -> NumpyPart:
    """(key, aggregates) rows -> one row per `_ix` present, one column per (aggregate, idx).

    `columns[agg]` lists the feature name of `agg` for idx 0..n-1.
    """
    names = tuple(name for feats in columns.values() for name in feats)

    def scatter(df: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        if df.height == 0:
            return no_rows(len(names))
        values = {col: df[col].cast(pl.Float64).to_numpy() for col in columns}
        return _scatter(df["key"].to_numpy(), n, columns, values)

    return NumpyPart(long, scatter, names)


def demographics(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    rows = ev.filter(pl.col("kind").is_in([KIND_BIRTH, KIND_SEX])).with_columns(
        pl.when(pl.col("kind") == KIND_BIRTH).then(pl.col("days")).alias("birth_days"),
        pl.when(pl.col("kind") == KIND_SEX).then(pl.col("idx")).alias("female"),
    )
    return [
        rows.group_by("_ix").agg(
            (pl.col("birth_days").max() / DAYS_PER_YEAR).alias("demo_age_years"),
            pl.col("female").max().cast(pl.Float64).alias("demo_sex_female"),
        )
    ]


def conditions(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    n = len(spec.conditions)
    if n == 0:
        return []
    long = _keyed(_of(ev, KIND_COND), n).group_by("key").agg(
        pl.lit(1.0).alias("present"),
        (pl.col("days").max() / DAYS_PER_YEAR).alias("first"),
        pl.col("days").min().alias("last"),
    )
    names = [c.name for c in spec.conditions]
    return [
        _widen(long, n, {
            "present": [f"cond_{c}_present" for c in names],
            "first": [f"cond_{c}_years_since_first" for c in names],
            "last": [f"cond_{c}_days_since_last" for c in names],
        })
    ]


def measurements(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    """Last value, days since last, and per window mean/min/max/std/count/least-squares slope.

    Computed with numpy scatter reductions (`bincount`, `minimum.at`) into a dense
    (window band, measurement, row) grid: no sort and no group_by, which is what
    makes this family about ten times cheaper than a polars group_by with 30
    statistics. Rows without a finite value are not measurements. Same-time
    duplicates at the latest time: `last` is their mean.
    The slope (per year) is null when the window's times do not spread
    (variance under 1e-8 year^2).
    """
    n = len(spec.measurements)
    if n == 0:
        return []
    rows = _of(ev, KIND_MEAS).filter(pl.col("value").is_not_null() & pl.col("value").is_finite())
    rows = rows.select("_ix", "idx", "days", "value")
    windows = tuple(spec.windows_days)
    lo, hi, columns, feature_names = per_spec(spec, "measurements", lambda: _measurement_columns(spec))

    def compute(df: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        idx, value = df["idx"].to_numpy().astype(np.intp), df["value"].to_numpy()
        plausible = (value >= lo[idx]) & (value <= hi[idx])  # impossible values are dropped (and counted)
        if not plausible.any():
            return no_rows(len(feature_names))
        ix = df["_ix"].to_numpy().astype(np.intp)[plausible]
        n_rows = int(ix.max()) + 1
        stats = _measurement_stats(
            df["days"].to_numpy()[plausible], value[plausible], idx[plausible] * n_rows + ix, n * n_rows, windows,
        )
        present = np.nan_to_num(stats["n_all"]).reshape(n, n_rows).sum(axis=0) > 0
        matrix = np.concatenate([stats[stat].reshape(n, n_rows)[:, present] for stat in columns])
        return np.flatnonzero(present), matrix

    return [NumpyPart(rows, compute, feature_names)]


def _measurement_columns(spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]], tuple[str, ...]]:
    """(lowest and highest plausible values, feature names per statistic, every name in order)."""
    lo, hi = plausible_arrays(spec.measurements)
    names = [m.name for m in spec.measurements]
    columns = {
        "last": [f"meas_{m}_last" for m in names],
        "days_since_last": [f"meas_{m}_days_since_last" for m in names],
        "n_all": [f"miss_{m}_count" for m in names],
    }
    for w in spec.windows_days:
        for stat in WINDOW_STATS:
            columns[f"{stat}_{w}"] = [f"meas_{m}_{stat}_{w}d" for m in names]
    return lo, hi, columns, tuple(f for feats in columns.values() for f in feats)


def plausible_arrays(measurements: tuple[MeasurementSpec, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) plausible value of each measurement (data/codes.py; unbounded if unknown)."""
    ranges = [vocab.MEASUREMENTS[m.name].plausible if m.name in vocab.MEASUREMENTS else (-np.inf, np.inf)
              for m in measurements]
    return np.array([r[0] for r in ranges], dtype=np.float64), np.array([r[1] for r in ranges], dtype=np.float64)


_BLOCK = 1 << 18  # rows per block: the temporaries of a block stay in cache and are reused


def _measurement_stats(
    days: np.ndarray, v: np.ndarray, key: np.ndarray, n_keys: int, windows: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Statistics of `measurements` for every key in [0, n_keys) (NaN where undefined).

    Windows are nested, so each row gets a band (the smallest window holding it);
    sums, minima and maxima are accumulated per (band, key) with `ufunc.at` and
    then over bands, which gives every window at once. Rows are processed in
    blocks so that temporaries stay small (fresh large arrays cost page faults,
    which on this kind of machine cost more than the arithmetic). Values are
    centred on each key's mean before sums of squares (numerical stability).
    """
    nw = len(windows)
    edges = np.asarray(windows, dtype=np.float64)
    size = nw * n_keys
    blocks = [slice(i, i + _BLOCK) for i in range(0, len(v), _BLOCK)]
    n_all, total = np.zeros(n_keys), np.zeros(n_keys)
    dmin = np.full(n_keys, np.inf)
    for b in blocks:  # pass 1: counts, centres, latest time
        k = key[b]
        np.add.at(n_all, k, 1.0)
        np.add.at(total, k, v[b])
        np.minimum.at(dmin, k, days[b])
    none_at_all = n_all == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.where(none_at_all, 0.0, total / n_all)
    sums = np.zeros((6, size))  # count, v, v^2, x, x^2, x*v (v centred, x = -days in years)
    vmin, vmax = np.full(size, np.inf), np.full(size, -np.inf)
    last_sum, last_n = np.zeros(n_keys), np.zeros(n_keys)
    for b in blocks:  # pass 2: per (band, key) sums and extremes; the latest values
        k, d, val = key[b], days[b], v[b]
        latest = d == dmin[k]
        np.add.at(last_sum, k[latest], val[latest])
        np.add.at(last_n, k[latest], 1.0)
        band = np.searchsorted(edges, d, side="left")
        inside = band < nw
        k, d, val, band = k[inside], d[inside], val[inside], band[inside]
        cell = band * n_keys + k
        vc = val - centre[k]
        x = d * (-1.0 / DAYS_PER_YEAR)
        np.add.at(sums[0], cell, 1.0)
        np.add.at(sums[1], cell, vc)
        np.add.at(sums[2], cell, vc * vc)
        np.add.at(sums[3], cell, x)
        np.add.at(sums[4], cell, x * x)
        np.add.at(sums[5], cell, x * vc)
        np.minimum.at(vmin, cell, val)
        np.maximum.at(vmax, cell, val)
    sums = sums.reshape(6, nw, n_keys)
    vmin, vmax = vmin.reshape(nw, n_keys), vmax.reshape(nw, n_keys)
    for i in range(1, nw):  # window i holds bands 0..i
        np.add(sums[:, i], sums[:, i - 1], out=sums[:, i])
        np.minimum(vmin[i], vmin[i - 1], out=vmin[i])
        np.maximum(vmax[i], vmax[i - 1], out=vmax[i])
    cnt, sv, svv, sx, sxx, sxv = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        out: dict[str, np.ndarray] = {
            "last": last_sum / last_n,
            "days_since_last": np.where(none_at_all, np.nan, dmin),
            "n_all": np.where(none_at_all, np.nan, n_all),  # null: never measured (see pipeline)
        }
        for i, w in enumerate(windows):
            c = cnt[i]
            none = c == 0
            mean_c = sv[i] / c
            out[f"count_{w}"] = c
            out[f"mean_{w}"] = np.where(none, np.nan, mean_c + centre)
            out[f"min_{w}"] = np.where(none, np.nan, vmin[i])
            out[f"max_{w}"] = np.where(none, np.nan, vmax[i])
            var = np.maximum(svv[i] - sv[i] * mean_c, 0.0) / (c - 1)
            out[f"std_{w}"] = np.where(c >= 2, np.sqrt(var), np.nan)
            den = c * sxx[i] - sx[i] ** 2
            num = c * sxv[i] - sx[i] * sv[i]
            out[f"slope_{w}"] = np.where(den > 1e-8 * c * c, num / den, np.nan)
    return out


def medications(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    """Per drug class; proportion of days covered shifts overlapping refills forward (standard PDC).

    With fills ordered by start s_i (days relative to t, negative) and supplies d_i,
    fill i ends at e_i = max(s_i, e_{i-1}) + d_i, which unrolls to
    e_i = C_i + max_{j<=i}(s_j - C_{j-1}) with C the cumulative supply: a
    cumulative max per group, no loop. Covered days are counted in [t - P, t).
    """
    if not spec.drug_classes:
        return []
    x = per_spec(spec, "medications", lambda: _medication_exprs(spec))
    rows = _of(ev, KIND_MED).with_columns(x["key"]).with_columns(x["supply"]).sort("key", "start", "supply")
    chained = rows.with_columns(x["cum"]).with_columns(x["end"])
    long = chained.with_columns(x["covered"]).group_by("key").agg(x["aggs"])
    return [_widen(long, len(spec.drug_classes), x["columns"])]


def _medication_exprs(spec: FeatureSpec) -> dict:
    """The expressions of `medications` (a spec's: built once, expressions never change)."""
    n = len(spec.drug_classes)
    P = spec.pdc_days
    supply = pl.col("value").fill_nan(None).fill_null(vocab.DEFAULT_DAYS_SUPPLY).clip(0, 3650)
    cum = pl.col("supply").cum_sum().over("key")
    covered = (
        pl.col("end").clip(upper_bound=0) - (pl.col("end") - pl.col("supply")).clip(lower_bound=-P)
    ).clip(lower_bound=0)
    names = [k.name for k in spec.drug_classes]
    return {
        "key": _key_expr(n),
        "supply": [supply.alias("supply"), (-pl.col("days")).alias("start")],
        "cum": cum.alias("cum"),
        "end": (pl.col("cum") + (pl.col("start") - (pl.col("cum") - pl.col("supply"))).cum_max().over("key")
                ).alias("end"),
        "covered": [covered.alias("covered"), _in(P).alias("in_p")],
        "aggs": [
            (pl.col("end").max() > 0).cast(pl.Float64).alias("active"),
            pl.col("in_p").sum().alias("count"),
            pl.col("days").min().alias("last"),
            (pl.col("covered").sum() / P).clip(upper_bound=1.0).alias("pdc"),
        ],
        "columns": {
            "active": [f"med_{k}_active" for k in names],
            "count": [f"med_{k}_count_{P}d" for k in names],
            "last": [f"med_{k}_days_since_last" for k in names],
            "pdc": [f"med_{k}_pdc_{P}d" for k in names],
        },
    }


def encounters(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    n = len(spec.encounter_classes)
    if n == 0:
        return []
    rows = _keyed(_of(ev, KIND_ENC), n).with_columns(_in(w).alias(f"in{w}") for w in spec.windows_days)
    long = rows.group_by("key").agg(
        *[pl.col(f"in{w}").sum().alias(f"count_{w}") for w in spec.windows_days],
        pl.col("days").min().alias("last"),
    )
    prefixes = [f"enc_{feature_safe(e).lower()}" for e in spec.encounter_classes]
    columns = {f"count_{w}": [f"{p}_count_{w}d" for p in prefixes] for w in spec.windows_days}
    columns["last"] = [f"{p}_days_since_last" for p in prefixes]
    return [_widen(long, n, columns)]


_SMOKING_ANSWERS = {
    **{c.removeprefix("SNOMED//").lower(): status for status, codes in
       ((2, vocab.SMOKING_CURRENT), (1, vocab.SMOKING_FORMER), (0, vocab.SMOKING_NEVER)) for c in codes},
    **vocab.SMOKING_TEXT_ANSWERS,
}


def smoking_status_expr(text: pl.Expr) -> pl.Expr:
    """Smoking answer (SNOMED code with or without `SNOMED//`, or words such as "Former smoker")
    -> 0 never, 1 former, 2 current, null unknown (`data.codes.smoking_status_of_text` as an expression)."""
    words = text.str.strip_prefix("SNOMED//").str.to_lowercase().str.strip_suffix("(finding)").str.strip_chars()
    return words.replace_strict(_SMOKING_ANSWERS, default=None, return_dtype=pl.Int32)


def smoking(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    """Latest recorded smoking status before t (same-time ties: the worse status)."""
    rows = _of(ev, KIND_SMOKE).with_columns(_SMOKING["status"])
    rows = rows.filter(pl.col("status").is_not_null()).with_columns(_SMOKING["latest"])
    return [rows.group_by("_ix").agg(_SMOKING["aggs"])]


def _smoking_exprs() -> dict:
    """The expressions of `smoking` (the same for every spec: built once)."""
    status = pl.col("latest").max()
    return {
        "status": smoking_status_expr(pl.col("text_value")).alias("status"),
        "latest": pl.when(pl.col("days") == pl.col("days").min().over("_ix")).then(pl.col("status")).alias("latest"),
        "aggs": [
            *[(status == code).cast(pl.Float64).alias(f"smoking_{s}") for code, s in enumerate(SMOKING_STATES)],
            pl.col("days").min().alias("smoking_days_since_last"),
        ],
    }


_SMOKING = _smoking_exprs()


FAMILIES = (demographics, conditions, measurements, medications, encounters, smoking)  # + code_families.codes
_KINDS = {
    "demographics": {KIND_BIRTH, KIND_SEX}, "conditions": {KIND_COND}, "measurements": {KIND_MEAS},
    "medications": {KIND_MED}, "encounters": {KIND_ENC}, "smoking": {KIND_SMOKE}, "codes": {KIND_CODE},
}


def kinds_of(families: set[str]) -> set[int]:
    """The event kinds the named family functions read."""
    return set().union(*(_KINDS[f] for f in families))


ZERO_WHEN_ABSENT = frozenset({"present", "active", "pdc"})  # flags of something recorded: absent means 0


def zero_filled(spec: FeatureSpec) -> list[str]:
    """Features whose absence means 0 (counts, flags of something recorded), not unknown."""
    return [
        name for name in spec.feature_names
        if spec.features[name].kind == "count" or spec.features[name].aggregate in ZERO_WHEN_ABSENT
    ]
