"""Features of the data-driven vocabulary (`spec.codes`): presence, counts, values and text categories.

Per code (`CodeSpec`), in this column order:

- with `counts`: `code_<C>_present` (ever recorded before t, 0/1), `code_<C>_count_<w>d`
  per window, `code_<C>_days_since_last`;
- with `values`: `code_<C>_last`, `code_<C>_{mean,min,max}_<w>d` per window and
  `code_<C>_trend` (least-squares slope per year over the longest window, when it
  holds at least `TREND_MIN_VALUES` values), numbers clipped to the fitted `clip`;
- per text category T: `code_<C>__<T>`, 1 when T is the latest text value of the
  code before t, 0 when another text is, null when the code never had a text.

Events arrive tagged as `KIND_CODE` with `idx` = the code's position in `spec.codes`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from chronorisk.features import families as fam
from chronorisk.features.spec import CodeSpec, FeatureInfo, FeatureSpec

TREND_MIN_VALUES = 3
VALUE_STATS = ("mean", "min", "max")


def _numbered(stems: list[str]) -> list[str]:
    """Each stem as a name, numbered (`_2`, `_3`, ...) when an earlier one already took it."""
    out: list[str] = []
    for stem in stems:
        name, i = stem, 1
        while name in out:
            i += 1
            name = f"{stem}_{i}"
        out.append(name)
    return out


def code_base_names(codes: tuple[CodeSpec, ...]) -> list[str]:
    """The column-name stem of each code (`code_<safe code>`, numbered when two codes look alike)."""
    return _numbered([f"code_{fam.feature_safe(c.code)}" for c in codes])


def text_feature_names(base: str, texts: tuple[str, ...]) -> list[str]:
    return _numbered([f"{base}__{fam.feature_safe(t)[:40] or 'text'}" for t in texts])


def declare_codes(codes: tuple[CodeSpec, ...], windows: tuple[int, ...]) -> dict[str, FeatureInfo]:
    out: dict[str, FeatureInfo] = {}
    longest = max(windows)
    for c, base in zip(codes, code_base_names(codes), strict=True):
        last = f"{base}_days_since_last" if c.counts else None
        about = {"family": "codes", "concept": c.code, "code": c.code, "concept_display": c.display}
        if c.counts:
            out[f"{base}_present"] = FeatureInfo(
                display=f"{c.display} recorded", unit="1 = yes", date_feature=last, kind="binary",
                aggregate="present", bounds=fam.FLAG, **about)
            for w in windows:
                out[f"{base}_count_{w}d"] = FeatureInfo(
                    display=f"{c.display}: records in {w} days", unit="records", date_feature=last, kind="count",
                    aggregate="count", window_days=w, bounds=(0.0, fam.COUNT_MAX), **about)
            out[last] = fam.FeatureInfo(
                display=f"{c.display}: days since last recorded", unit="days", kind="elapsed_days",
                aggregate="days_since_last", bounds=(0.0, fam.DAYS_MAX), grows_with_clock=True, **about)
        if c.values:
            value = {"concept": c.code, "concept_display": c.display, "code": c.code, "family": "codes",
                     "date_feature": last}
            out[f"{base}_last"] = fam.value_info(c.display, c.unit, "last", None, window=None, **value)
            for w in windows:
                for stat in VALUE_STATS:
                    out[f"{base}_{stat}_{w}d"] = fam.value_info(c.display, c.unit, stat, None, window=w, **value)
            out[f"{base}_trend"] = fam.value_info(c.display, c.unit, "slope", None, window=longest, **value)
        for text, name in zip(c.texts, text_feature_names(base, c.texts), strict=True):
            out[name] = FeatureInfo(
                display=f"{c.display}: latest text is {text!r}", unit="1 = yes", kind="category",
                aggregate="text", bounds=fam.FLAG, **about)
    return out


# ---- computations -----------------------------------------------------------------------------
def codes(spec: FeatureSpec, ev: pl.LazyFrame) -> fam.Parts:
    """Every feature of the data-driven vocabulary (see module doc)."""
    if not spec.codes:
        return []
    rows = ev.filter(pl.col("kind") == fam.KIND_CODE)
    bases = fam.per_spec(spec, "code_bases", lambda: code_base_names(spec.codes))
    return [*_counts(spec, rows, bases), *_values(spec, rows, bases), *_texts(spec, rows, bases)]


def _counts(spec: FeatureSpec, rows: pl.LazyFrame, bases: list[str]) -> fam.Parts:
    n = len(spec.codes)
    if not any(c.counts for c in spec.codes):
        return []
    windows = spec.windows_days
    long = fam._keyed(rows, n).group_by("key").agg(
        pl.lit(1.0).alias("present"),
        *[(pl.col("days") <= w).sum().alias(f"count_{w}") for w in windows],
        pl.col("days").min().alias("last"),
    )
    unused = [f"_unused_{i}" for i in range(n)]  # codes without count features (a concept's code)

    def named(suffix: str) -> list[str]:
        return [f"{b}{suffix}" if c.counts else f"{u}{suffix}" for b, c, u in zip(bases, spec.codes, unused,
                                                                                   strict=True)]

    columns = {"present": named("_present"), "last": named("_days_since_last")}
    for w in windows:
        columns[f"count_{w}"] = named(f"_count_{w}d")
    return [fam._widen(long, n, columns)]


def _values(spec: FeatureSpec, rows: pl.LazyFrame, bases: list[str]) -> fam.Parts:
    """Value aggregates with the numpy scatter reductions of the measurements family."""
    with_values = [i for i, c in enumerate(spec.codes) if c.values]
    if not with_values:
        return []
    slot = np.full(len(spec.codes), -1, dtype=np.intp)
    slot[with_values] = np.arange(len(with_values))
    lo = np.array([(spec.codes[i].clip or (-np.inf, np.inf))[0] for i in with_values])
    hi = np.array([(spec.codes[i].clip or (-np.inf, np.inf))[1] for i in with_values])
    n = len(with_values)
    windows = tuple(spec.windows_days)
    longest = windows[-1]
    names = [bases[i] for i in with_values]
    columns = {"last": [f"{b}_last" for b in names]}
    for w in windows:
        for stat in VALUE_STATS:
            columns[f"{stat}_{w}"] = [f"{b}_{stat}_{w}d" for b in names]
    columns["trend"] = [f"{b}_trend" for b in names]
    feature_names = tuple(f for feats in columns.values() for f in feats)
    valued = rows.filter(pl.col("value").is_not_null() & pl.col("value").is_finite()).select(
        "_ix", "idx", "days", "value")

    def compute(df: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        s = slot[df["idx"].to_numpy().astype(np.intp)]
        keep = s >= 0
        if not keep.any():
            return fam.no_rows(len(feature_names))
        s = s[keep]
        ix = df["_ix"].to_numpy()[keep].astype(np.intp)
        v = np.clip(df["value"].to_numpy()[keep], lo[s], hi[s])
        n_rows = int(ix.max()) + 1
        stats = fam._measurement_stats(df["days"].to_numpy()[keep], v, s * n_rows + ix, n * n_rows, windows)
        stats["trend"] = np.where(stats[f"count_{longest}"] >= TREND_MIN_VALUES, stats[f"slope_{longest}"], np.nan)
        present = np.nan_to_num(stats["n_all"]).reshape(n, n_rows).sum(axis=0) > 0
        matrix = np.concatenate([stats[stat].reshape(n, n_rows)[:, present] for stat in columns])
        return np.flatnonzero(present), matrix

    return [fam.NumpyPart(valued, compute, feature_names)]


def _texts(spec: FeatureSpec, rows: pl.LazyFrame, bases: list[str]) -> fam.Parts:
    """Latest text value per code as one-hot categories (0 for the code's other categories)."""
    cats = [(i, t, name) for i, (c, b) in enumerate(zip(spec.codes, bases, strict=True))
            for t, name in zip(c.texts, text_feature_names(b, c.texts), strict=True)]
    if not cats:
        return []
    names = [name for _, _, name in cats]
    n_cat = len(cats)
    table = pl.DataFrame({"idx": [i for i, _, _ in cats], "text_value": [t for _, t, _ in cats],
                          "cat": list(range(n_cat))},
                         schema={"idx": pl.Int32, "text_value": pl.String, "cat": pl.Int64})
    first = np.full(len(spec.codes), 0, dtype=np.intp)  # each code's categories are contiguous
    count = np.zeros(len(spec.codes), dtype=np.intp)
    for c, (i, _, _) in enumerate(cats):
        if count[i] == 0:
            first[i] = c
        count[i] += 1
    with_text = rows.filter(pl.col("text_value").is_not_null() & pl.col("idx").is_in(sorted({i for i, _, _ in cats})))
    latest = (
        with_text.filter(pl.col("days") == pl.col("days").min().over("_ix", "idx"))
        .select("_ix", "idx", "text_value")
        .join(table.lazy(), on=["idx", "text_value"], how="left")
    )

    def compute(df: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        if df.height == 0:
            return fam.no_rows(n_cat)
        ix = df["_ix"].to_numpy().astype(np.intp)
        rows_present, row = np.unique(ix, return_inverse=True)
        dense = np.full((n_cat, len(rows_present)), np.nan)
        code = df["idx"].to_numpy().astype(np.intp)
        k = count[code]  # every category of a code seen with a text is 0 ...
        cat_of = np.repeat(first[code], k) + (np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k))
        dense[cat_of, np.repeat(row, k)] = 0.0
        hit = df["cat"].to_numpy(allow_copy=True)  # ... and the latest text's category 1
        ok = ~np.isnan(hit.astype(np.float64))
        dense[hit[ok].astype(np.intp), row[ok]] = 1.0
        return rows_present, dense

    return [fam.NumpyPart(latest, compute, tuple(names))]
