"""Explanations: each patient's top factors from LightGBM's exact TreeSHAP (`pred_contrib`).

LightGBM computes exact TreeSHAP itself (`Booster.predict(pred_contrib=True)`):
per row one contribution per feature, in log-odds, plus the expected value in
the last column; they sum to the raw margin. The `shap` package gives the same
numbers (a test checks it) but is not used here: it is slower and heavy to import.

A factor is a feature with a non-zero contribution, ranked by |contribution|:
its name and display name, the patient's value and unit, the date that value
was measured (prediction time minus the feature's `date_feature`, a days-since-
last feature, when the spec names one and it is recorded), the direction
("raises" / "lowers" risk), the contribution, and a sentence for the GP:
"HbA1c 9.1 %, last measured 2026-03-02, raises risk".

One patient: the booster is called with a 1-row float64 matrix on one thread
(no pandas, no thread start-up); see benchmarks/explain_bench.py. Many rows:
one `pred_contrib` call and vectorized ranking and dating.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import numpy as np

BOOLEAN_UNITS = frozenset({"yes/no", "flag", "bool", "boolean"})
DATE_WORDS = {  # how the date of a value is introduced, by feature family
    "measurements": "last measured",
    "missingness": "last measured",
    "conditions": "last recorded",
    "medications": "last prescribed",
    "encounters": "last visit",
    "smoking": "recorded",
}
_US_PER_DAY = 86_400_000_000


@dataclass(frozen=True)
class FactorArrays:
    """Top-k factors of n rows as arrays (k columns; unused slots have index -1)."""

    index: np.ndarray  # (n, k) int64 feature index, -1 = no factor
    contribution: np.ndarray  # (n, k) float64 log-odds
    value: np.ndarray  # (n, k) float64, NaN = not recorded
    date: np.ndarray  # (n, k) datetime64[D], NaT = no date
    expected_value: np.ndarray  # (n,) the model's mean margin (last pred_contrib column)


class Explainer:
    """Ranks and describes the contributions of one booster; build once, reuse for every request."""

    def __init__(self, booster: object, feature_names: Sequence[str], infos: Mapping[str, object] | None = None):
        self.booster = booster
        self.feature_names = tuple(feature_names)
        infos = infos or {}
        position = {n: i for i, n in enumerate(self.feature_names)}
        self.display = tuple(_attr(infos.get(n), "display") or n for n in self.feature_names)
        self.units = tuple(_attr(infos.get(n), "unit") or "" for n in self.feature_names)
        self.families = tuple(_attr(infos.get(n), "family") for n in self.feature_names)
        self.date_index = np.array(
            [position.get(_attr(infos.get(n), "date_feature") or "", -1) for n in self.feature_names],
            dtype=np.int64,
        )

    # ---- contributions ---------------------------------------------------------------
    def contributions(self, M: np.ndarray) -> np.ndarray:
        """(n, p + 1) exact TreeSHAP values in log-odds; the last column is the expected value."""
        M = np.ascontiguousarray(M, dtype=np.float64)
        if M.ndim != 2 or M.shape[1] != len(self.feature_names):
            raise ValueError(f"features: expected (rows, {len(self.feature_names)}) values, got {M.shape}")
        if M.shape[0] == 1:
            return self.booster.predict(M, pred_contrib=True, num_threads=1)
        return self.booster.predict(M, pred_contrib=True)

    def top_factors(
        self, M: np.ndarray, prediction_time: object = None, top_k: int = 5, contrib: np.ndarray | None = None
    ) -> FactorArrays:
        """The top-k factors of every row as arrays (vectorized; see `factors` for dicts)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        M = np.ascontiguousarray(M, dtype=np.float64)
        c = self.contributions(M) if contrib is None else contrib
        phi = c[:, :-1]
        n, p = phi.shape
        k = min(top_k, p)
        mag = np.abs(phi)
        part = np.argpartition(-mag, k - 1, axis=1)[:, :k] if k < p else np.broadcast_to(np.arange(p), (n, p)).copy()
        order = np.argsort(-np.take_along_axis(mag, part, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)
        contribution = np.take_along_axis(phi, idx, axis=1)
        rows = np.arange(n)[:, None]
        value = M[rows, idx]
        date_col = self.date_index[idx]
        days = np.where(date_col >= 0, M[rows, np.maximum(date_col, 0)], np.nan)
        dates = measured_dates(prediction_time, days, n)
        idx = np.where(contribution != 0, idx, -1)
        return FactorArrays(idx, contribution, value, dates, c[:, -1].copy())

    # ---- plain words -----------------------------------------------------------------
    def factors(self, M: np.ndarray, prediction_time: object = None, top_k: int = 5) -> list[list[dict]]:
        """Per row, a list of factor dicts: feature, display, value, unit, date, direction, contribution, text."""
        arrays = self.top_factors(M, prediction_time, top_k)
        return self.to_dicts(arrays)

    def to_dicts(self, arrays: FactorArrays) -> list[list[dict]]:
        out: list[list[dict]] = []
        index, contribution, value = arrays.index.tolist(), arrays.contribution.tolist(), arrays.value.tolist()
        dates = arrays.date.astype(object).tolist()  # datetime.date or None (NaT)
        for r in range(len(index)):
            row = []
            for j, f in enumerate(index[r]):
                if f < 0:
                    continue
                row.append(self._factor(f, value[r][j], dates[r][j], contribution[r][j]))
            out.append(row)
        return out

    def _factor(self, f: int, value: float, when: date | None, contribution: float) -> dict:
        recorded = not math.isnan(value)
        direction = "raises" if contribution > 0 else "lowers"
        unit = self.units[f]
        iso = when.isoformat() if (when is not None and recorded) else None
        return {
            "feature": self.feature_names[f],
            "display": self.display[f],
            "value": float(value) if recorded else None,
            "unit": unit,
            "date": iso,
            "direction": direction,
            "contribution": float(contribution),
            "text": sentence(self.display[f], value if recorded else None, unit, iso, direction, self.families[f]),
        }


def sentence(
    display: str, value: float | None, unit: str, when: str | None, direction: str, family: str | None = None
) -> str:
    """'HbA1c 9.1 %, last measured 2026-03-02, raises risk' (or '... not recorded, lowers risk').

    Flags (unit '1 = yes', '1 = female, 0 = male', ...) read yes / no; a
    'fraction' reads as a percentage; the date is introduced by what dates it
    in that family (measured, recorded, prescribed, visit).
    """
    if value is None:
        return f"{display} not recorded, {direction} risk"
    if is_flag_unit(unit):
        shown = f"{display}: {'yes' if value >= 0.5 else 'no'}"
    elif unit == "fraction":
        shown = f"{display} {format_value(100 * value)} %"
    else:
        shown = f"{display} {format_value(value)}" + (f" {unit}" if unit else "")
    dated = f", {DATE_WORDS.get(family or '', 'last recorded')} {when}" if when else ""
    return f"{shown}{dated}, {direction} risk"


def is_flag_unit(unit: str) -> bool:
    """A 0/1 feature: units like '1 = yes' or 'yes/no'."""
    return unit in BOOLEAN_UNITS or unit.startswith("1 = ")


def format_value(value: float) -> str:
    """Three significant figures at most, no trailing zeros, no exponent: 9.1, 142, 0.35, 1234."""
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if v == round(v) and abs(v) < 1e15:
        return str(round(v))
    a = abs(v)
    decimals = 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 0.1 else 3
    text = f"{v:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def measured_dates(prediction_time: object, days: np.ndarray, n: int) -> np.ndarray:
    """prediction_time - days (in days, fractional allowed) as datetime64[D]; NaT where unknown."""
    pt = prediction_times(prediction_time, n)
    finite = np.isfinite(days) & ~np.isnat(pt)[:, None]
    us = np.where(finite, np.round(np.nan_to_num(days) * _US_PER_DAY), 0).astype(np.int64)
    when = (pt[:, None] - us.astype("timedelta64[us]")).astype("datetime64[D]")
    return np.where(finite, when, np.datetime64("NaT", "D"))


def prediction_times(value: object, n: int) -> np.ndarray:
    """(n,) datetime64[us] from None, a datetime/date, a numpy array, a list or a polars/pandas Series."""
    if value is None:
        return np.full(n, np.datetime64("NaT", "us"))
    if isinstance(value, datetime | date | np.datetime64 | str):
        return np.full(n, np.datetime64(value, "us"))
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    arr = np.asarray(value)
    if arr.dtype.kind != "M":
        arr = np.array([np.datetime64("NaT") if v is None else np.datetime64(v, "us") for v in arr.tolist()])
    arr = arr.astype("datetime64[us]")
    if arr.shape != (n,):
        raise ValueError(f"prediction_time: {arr.shape[0] if arr.ndim else 1} values for {n} rows")
    return arr


def _attr(info: object, name: str) -> object:
    if info is None:
        return None
    if isinstance(info, Mapping):
        return info.get(name)
    return getattr(info, name, None)
