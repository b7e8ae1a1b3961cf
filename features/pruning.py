"""Features that say nothing in the fitting data are dropped from the spec, with the reason.

A feature is dropped when, over the TRAIN rows of every site, it is entirely null,
or constant (one value and no null: a null beside a value still says "not
measured"), or a window that repeats another feature of the same concept exactly
(same value or both null in every row: the 1,095-day mean of a code measured
once equals its last value). Of two equal features the first in column order
stays (`last` before the windows, shorter windows before longer ones).

`FitStats` accumulates what this needs chunk by chunk (per column: non-null
count, lowest and highest value; per candidate pair: still equal so far), so
the feature tables are read once, as they are written.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import polars as pl

from chronorisk.features.spec import FeatureSpec

REPEATABLE = {"value": ("last", "mean", "min", "max"), "count": ("count",)}
_PAIR_BLOCK = 512  # pairs compared at a time (memory: rows x block booleans)
_FIRST_ROWS = 2048


def repeat_candidates(spec: FeatureSpec) -> list[tuple[int, int]]:
    """(earlier, later) column positions of features that may repeat each other: same family, concept and
    kind; `last` or the same aggregate over another window."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for j, name in enumerate(spec.feature_names):
        info = spec.features[name]
        if info.aggregate in REPEATABLE.get(info.kind, ()):
            groups[(info.family, info.concept, info.kind)].append(j)
    pairs = []
    for members in groups.values():
        for b_pos, b in enumerate(members):
            agg_b = spec.features[spec.feature_names[b]].aggregate
            for a in members[:b_pos]:
                agg_a = spec.features[spec.feature_names[a]].aggregate
                if agg_a == agg_b or agg_a == "last":
                    pairs.append((a, b))
    return pairs


class FitStats:
    """What `useless` needs, accumulated over frames of fitting rows (each with every spec feature)."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.names = list(spec.feature_names)
        n = len(self.names)
        self.rows = 0
        self.non_null = np.zeros(n, dtype=np.int64)
        self.lo = np.full(n, np.inf)
        self.hi = np.full(n, -np.inf)
        pairs = np.array(repeat_candidates(spec), dtype=np.intp).reshape(-1, 2)
        self.first, self.second = pairs[:, 0], pairs[:, 1]

    def add(self, frame: pl.DataFrame) -> None:
        if frame.height == 0:
            return
        values = frame.select(self.names).to_numpy()  # Float32 features; null -> NaN
        missing = np.isnan(values)
        self.rows += len(values)
        self.non_null += len(values) - missing.sum(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, which fmin/fmax skip
            self.lo = np.fmin(self.lo, np.nanmin(values, axis=0))
            self.hi = np.fmax(self.hi, np.nanmax(values, axis=0))
        for rows in (slice(0, _FIRST_ROWS), slice(_FIRST_ROWS, None)):  # most pairs differ in the first rows
            self._still_equal(values[rows], missing[rows])

    def _still_equal(self, values: np.ndarray, missing: np.ndarray) -> None:
        if len(values) == 0 or len(self.first) == 0:
            return
        keep = np.ones(len(self.first), dtype=bool)
        for start in range(0, len(self.first), _PAIR_BLOCK):
            a, b = self.first[start:start + _PAIR_BLOCK], self.second[start:start + _PAIR_BLOCK]
            same = (values[:, a] == values[:, b]) | (missing[:, a] & missing[:, b])
            keep[start:start + _PAIR_BLOCK] = same.all(axis=0)
        self.first, self.second = self.first[keep], self.second[keep]

    def useless(self) -> dict[str, str]:
        """Feature -> why it says nothing ("entirely null", "constant 0", "repeats <feature>"), column order."""
        if self.rows == 0:
            return {}
        out: dict[str, str] = {}
        for j, name in enumerate(self.names):
            if self.non_null[j] == 0:
                out[name] = "entirely null"
            elif self.non_null[j] == self.rows and self.lo[j] == self.hi[j]:
                out[name] = f"constant {self.lo[j]:g}"
        for a, b in sorted(zip(self.first.tolist(), self.second.tolist(), strict=True), key=lambda p: (p[1], p[0])):
            kept_a, name_b = self.names[a], self.names[b]
            if name_b not in out and kept_a not in out:
                out[name_b] = f"repeats {kept_a}"
        return dict(sorted(out.items(), key=lambda kv: self.names.index(kv[0])))


def without_useless(spec: FeatureSpec, reasons: dict[str, str]) -> FeatureSpec:
    """The spec without the features of `reasons`; `fit_info.dropped` counts them by reason and lists them."""
    if not reasons:
        return spec.model_copy(update={"fit_info": {**spec.fit_info, "dropped": _dropped_info({})}})
    kept = tuple(n for n in spec.feature_names if n not in reasons)
    features = {}
    for name in kept:
        info = spec.features[name]
        if info.date_feature is not None and info.date_feature in reasons:
            info = info.model_copy(update={"date_feature": None})
        features[name] = info
    return FeatureSpec.model_validate({
        **spec.model_dump(), "feature_names": kept, "features": features,
        "fit_info": {**spec.fit_info, "dropped": _dropped_info(reasons)},
    })


def _dropped_info(reasons: dict[str, str]) -> dict:
    by_reason: dict[str, int] = defaultdict(int)
    for why in reasons.values():
        by_reason[why.split(" ", 1)[0] if why.startswith(("repeats", "constant")) else why] += 1
    return {"count": len(reasons), "by_reason": dict(sorted(by_reason.items())), "features": reasons}


def dropped_lines(spec: FeatureSpec) -> list[str]:
    """What the fit dropped or flagged, for the CLI: features without information, impossible values,
    codes and text values left out of the vocabulary."""
    info = spec.fit_info
    lines = []
    dropped = info.get("dropped")
    if dropped:
        parts = ", ".join(f"{n} {why}" for why, n in dropped["by_reason"].items())
        lines.append(f"dropped {dropped['count']} features that say nothing in the training rows"
                     + (f" ({parts})" if parts else ""))
    out_of_range = info.get("values_out_of_range") or {}
    if out_of_range:
        lines.append("impossible values dropped (outside data/codes.py ranges, training subjects): "
                     + ", ".join(f"{code} {n}" for code, n in sorted(out_of_range.items())))
    if info.get("codes_over_max_codes"):
        lines.append(f"{info['codes_over_max_codes']} frequent codes over features.max_codes={info.get('max_codes')}"
                     " left out (the most frequent are kept)")
    if info.get("codes_under_min_subjects"):
        lines.append(f"{info['codes_under_min_subjects']} codes seen in fewer than "
                     f"{info.get('subjects_for_selection_min')} training subjects: no features of their own")
    if info.get("text_values_without_feature"):
        lines.append(f"{info['text_values_without_feature']} text values (rare, or beyond "
                     f"features.max_texts_per_code) without a category feature")
    return lines
