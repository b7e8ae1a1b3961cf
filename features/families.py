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

import numpy as np
import polars as pl

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
Parts = list[pl.LazyFrame]


def feature_safe(text: str) -> str:
    """A column-name-safe form of a code (LightGBM refuses JSON special characters)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


# ---- declarations -------------------------------------------------------------------------
def declare_demographics() -> Declared:
    return {
        "demo_age_years": FeatureInfo(display="Age", unit="years", family="demographics"),
        "demo_sex_female": FeatureInfo(display="Female sex", unit="1 = female, 0 = male", family="demographics"),
    }


def declare_conditions(conditions: tuple[ConditionSpec, ...]) -> Declared:
    out: Declared = {}
    for c in conditions:
        last = f"cond_{c.name}_days_since_last"
        out[f"cond_{c.name}_present"] = FeatureInfo(
            display=f"{c.display} recorded", unit="1 = yes", family="conditions", date_feature=last
        )
        out[f"cond_{c.name}_years_since_first"] = FeatureInfo(
            display=f"{c.display}: years since first recorded", unit="years", family="conditions"
        )
        out[last] = FeatureInfo(
            display=f"{c.display}: days since last recorded", unit="days", family="conditions"
        )
    return out


def declare_measurements(measurements: tuple[MeasurementSpec, ...], windows: tuple[int, ...]) -> Declared:
    out: Declared = {}
    for m in measurements:
        last = f"meas_{m.name}_days_since_last"
        out[f"meas_{m.name}_last"] = FeatureInfo(
            display=f"{m.display}, last value", unit=m.unit, family="measurements", date_feature=last
        )
        out[last] = FeatureInfo(display=f"{m.display}: days since last measured", unit="days",
                                family="measurements")
        for w in windows:
            units = {"count": "measurements", "slope": f"{m.unit} per year"}
            labels = {"mean": "mean", "min": "lowest", "max": "highest", "std": "standard deviation",
                      "count": "number of measurements", "slope": "trend"}
            for stat in WINDOW_STATS:
                out[f"meas_{m.name}_{stat}_{w}d"] = FeatureInfo(
                    display=f"{m.display}, {labels[stat]} over {w} days",
                    unit=units.get(stat, m.unit),
                    family="measurements",
                    date_feature=last,
                )
    return out


def declare_missingness(measurements: tuple[MeasurementSpec, ...]) -> Declared:
    out: Declared = {}
    for m in measurements:
        last = f"meas_{m.name}_days_since_last"
        out[f"miss_{m.name}_never"] = FeatureInfo(
            display=f"{m.display} never measured", unit="1 = never", family="missingness"
        )
        out[f"miss_{m.name}_count"] = FeatureInfo(
            display=f"{m.display}: measurements on record", unit="measurements", family="missingness",
            date_feature=last,
        )
    return out


def declare_medications(classes: tuple[DrugClassSpec, ...], pdc_days: int) -> Declared:
    out: Declared = {}
    for k in classes:
        last = f"med_{k.name}_days_since_last"
        out[f"med_{k.name}_active"] = FeatureInfo(
            display=f"{k.display}: supply active", unit="1 = yes", family="medications", date_feature=last
        )
        out[f"med_{k.name}_count_{pdc_days}d"] = FeatureInfo(
            display=f"{k.display}: prescriptions in {pdc_days} days", unit="prescriptions",
            family="medications", date_feature=last,
        )
        out[last] = FeatureInfo(display=f"{k.display}: days since last prescription", unit="days",
                                family="medications")
        out[f"med_{k.name}_pdc_{pdc_days}d"] = FeatureInfo(
            display=f"{k.display}: proportion of days covered, {pdc_days} days", unit="fraction",
            family="medications", date_feature=last,
        )
    return out


def declare_encounters(classes: tuple[str, ...], windows: tuple[int, ...]) -> Declared:
    out: Declared = {}
    for e in classes:
        name = ENCOUNTER_DISPLAY.get(e, e.title())
        last = f"enc_{feature_safe(e).lower()}_days_since_last"
        for w in windows:
            out[f"enc_{feature_safe(e).lower()}_count_{w}d"] = FeatureInfo(
                display=f"{name} encounters in {w} days", unit="encounters", family="encounters",
                date_feature=last,
            )
        out[last] = FeatureInfo(display=f"{name} encounter: days since last", unit="days", family="encounters")
    return out


def declare_smoking() -> Declared:
    last = "smoking_days_since_last"
    out: Declared = {
        f"smoking_{s}": FeatureInfo(display=f"Smoking status: {s} smoker", unit="1 = yes", family="smoking",
                                    date_feature=last)
        for s in reversed(SMOKING_STATES)
    }
    out[last] = FeatureInfo(display="Smoking status: days since recorded", unit="days", family="smoking")
    return out


def declare_codes(vocabulary: tuple[str, ...]) -> tuple[Declared, list[str]]:
    """Features for the selected codes; returns (declared, column names in vocabulary order)."""
    out: Declared = {}
    names: list[str] = []
    for code in vocabulary:
        base = f"code_{feature_safe(code)}"
        name, i = base, 1
        while name in out:
            i += 1
            name = f"{base}_{i}"
        display = vocab.display_for(code) or code
        out[name] = FeatureInfo(display=f"{display}: records", unit="records", family="codes")
        names.append(name)
    return out, names


# ---- computations -------------------------------------------------------------------------
def _of(ev: pl.LazyFrame, kind: int, idx: int | None = None) -> pl.LazyFrame:
    cond = pl.col("kind") == kind
    if idx is not None:
        cond &= pl.col("idx") == idx
    return ev.filter(cond)


def _in(days: int) -> pl.Expr:
    return pl.col("days") <= days


def _by_ix(frame: pl.LazyFrame, *aggs: pl.Expr) -> pl.LazyFrame:
    return frame.group_by("_ix").agg(*aggs)


def demographics(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    rows = ev.filter(pl.col("kind").is_in([KIND_BIRTH, KIND_SEX]))
    return [
        _by_ix(
            rows,
            (pl.col("days").filter(pl.col("kind") == KIND_BIRTH).max() / DAYS_PER_YEAR).alias("demo_age_years"),
            pl.col("idx").filter(pl.col("kind") == KIND_SEX).max().cast(pl.Float64).alias("demo_sex_female"),
        )
    ]


def conditions(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    parts = []
    for i, c in enumerate(spec.conditions):
        parts.append(
            _by_ix(
                _of(ev, KIND_COND, i),
                pl.lit(1.0).alias(f"cond_{c.name}_present"),
                (pl.col("days").max() / DAYS_PER_YEAR).alias(f"cond_{c.name}_years_since_first"),
                pl.col("days").min().alias(f"cond_{c.name}_days_since_last"),
            )
        )
    return parts


def _slope(w: int) -> pl.Expr:
    """Least-squares slope of value against time (per year) within the window; null if undefined."""
    x = (-pl.col("days") / DAYS_PER_YEAR).filter(_in(w))
    v = pl.col("value").filter(_in(w))
    var = x.var()
    return pl.when(var > 1e-9).then(pl.cov(x, v) / var)


def measurements(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    parts = []
    for i, m in enumerate(spec.measurements):
        p = f"meas_{m.name}"
        aggs = [
            pl.col("value").filter(pl.col("days") == pl.col("days").min()).mean().alias(f"{p}_last"),
            pl.col("days").min().alias(f"{p}_days_since_last"),
            pl.len().cast(pl.Float64).alias(f"miss_{m.name}_count"),
        ]
        for w in spec.windows_days:
            v = pl.col("value").filter(_in(w))
            aggs += [
                v.mean().alias(f"{p}_mean_{w}d"),
                v.min().alias(f"{p}_min_{w}d"),
                v.max().alias(f"{p}_max_{w}d"),
                v.std().alias(f"{p}_std_{w}d"),
                _in(w).sum().cast(pl.Float64).alias(f"{p}_count_{w}d"),
                _slope(w).alias(f"{p}_slope_{w}d"),
            ]
        parts.append(_by_ix(_of(ev, KIND_MEAS, i), *aggs))
    return parts


def medications(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    """Per drug class; proportion of days covered shifts overlapping refills forward (standard PDC).

    With fills ordered by start s_i and supplies d_i, fill i ends at
    e_i = max(s_i, e_{i-1}) + d_i, which unrolls to C_i + max_{j<=i}(s_j - C_{j-1})
    (C = cumulative supply): a cumulative max, so no loop is needed.
    """
    P = spec.pdc_days
    parts = []
    for i, k in enumerate(spec.drug_classes):
        p = f"med_{k.name}"
        order = -pl.col("days")
        start = order.sort()
        supply = pl.col("supply").sort_by(order)
        cum = supply.cum_sum()
        end = cum + (start - (cum - supply)).cum_max()
        covered = (end.clip(upper_bound=0) - (end - supply).clip(lower_bound=-P)).clip(lower_bound=0)
        rows = _of(ev, KIND_MED, i).with_columns(
            pl.col("value").fill_null(vocab.DEFAULT_DAYS_SUPPLY).clip(0, 3650).alias("supply")
        )
        parts.append(
            _by_ix(
                rows,
                (end.max() > 0).cast(pl.Float64).alias(f"{p}_active"),
                _in(P).sum().cast(pl.Float64).alias(f"{p}_count_{P}d"),
                pl.col("days").min().alias(f"{p}_days_since_last"),
                (covered.sum() / P).clip(upper_bound=1.0).alias(f"{p}_pdc_{P}d"),
            )
        )
    return parts


def encounters(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    parts = []
    for i, e in enumerate(spec.encounter_classes):
        p = f"enc_{feature_safe(e).lower()}"
        parts.append(
            _by_ix(
                _of(ev, KIND_ENC, i),
                *[_in(w).sum().cast(pl.Float64).alias(f"{p}_count_{w}d") for w in spec.windows_days],
                pl.col("days").min().alias(f"{p}_days_since_last"),
            )
        )
    return parts


def smoking_status_expr(text: pl.Expr) -> pl.Expr:
    """Smoking answer code (with or without `SNOMED//`) -> 0 never, 1 former, 2 current, null unknown."""
    code = text.str.strip_prefix("SNOMED//")

    def bare(codes: tuple[str, ...]) -> list[str]:
        return [c.removeprefix("SNOMED//") for c in codes]

    return (
        pl.when(code.is_in(bare(vocab.SMOKING_CURRENT))).then(pl.lit(2))
        .when(code.is_in(bare(vocab.SMOKING_FORMER))).then(pl.lit(1))
        .when(code.is_in(bare(vocab.SMOKING_NEVER))).then(pl.lit(0))
    )


def smoking(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    rows = _of(ev, KIND_SMOKE).with_columns(smoking_status_expr(pl.col("text_value")).alias("status"))
    rows = rows.filter(pl.col("status").is_not_null())
    latest = pl.col("days").min()
    status = pl.col("status").filter(pl.col("days") == latest).max()  # same-time ties: the worse status
    return [
        _by_ix(
            rows,
            *[(status == code).cast(pl.Float64).alias(f"smoking_{s}") for code, s in enumerate(SMOKING_STATES)],
            latest.alias("smoking_days_since_last"),
        )
    ]


def codes(spec: FeatureSpec, ev: pl.LazyFrame) -> Parts:
    """Counts of each selected code, scattered into one column per code (no pivot: it is slow)."""
    names = list(code_feature_names(spec))
    if not names:
        return []
    long = _of(ev, KIND_CODE).group_by("_ix", "idx").agg(pl.len().alias("n"))
    schema = {"_ix": pl.UInt32, **dict.fromkeys(names, pl.Float64)}
    return [long.map_batches(lambda df: _scatter_counts(df, names), schema=schema)]


def _scatter_counts(long: pl.DataFrame, names: list[str]) -> pl.DataFrame:
    """(ix, idx, n) rows -> one row per ix seen, one column per code (0 where absent)."""
    if long.height == 0:
        return pl.DataFrame(schema={"_ix": pl.UInt32, **dict.fromkeys(names, pl.Float64)})
    ix = long["_ix"].to_numpy()
    rows, inverse = np.unique(ix, return_inverse=True)
    dense = np.zeros((len(names), len(rows)), dtype=np.float64)
    dense[long["idx"].to_numpy(), inverse] = long["n"].to_numpy()
    return pl.DataFrame(
        [pl.Series("_ix", rows, dtype=pl.UInt32)] + [pl.Series(n, dense[j]) for j, n in enumerate(names)]
    )


def code_feature_names(spec: FeatureSpec) -> tuple[str, ...]:
    return tuple(n for n in spec.feature_names if spec.features[n].family == "codes")


FAMILIES = (demographics, conditions, measurements, medications, encounters, smoking, codes)


def zero_filled(spec: FeatureSpec) -> list[str]:
    """Features whose absence means 0 (counts, flags of something recorded), not unknown."""
    out = []
    for name in spec.feature_names:
        fam = spec.features[name].family
        if (
            fam == "codes"
            or name.endswith("_present")
            or "_count_" in name
            or (fam == "missingness" and name.endswith("_count"))
            or (fam == "medications" and (name.endswith("_active") or "_pdc_" in name))
        ):
            out.append(name)
    return out
