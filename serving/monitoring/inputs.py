"""Impossible input values: per (site, window) and code, the share of numbers the features dropped.

The features drop numbers outside a known measurement's plausible range
(`data/codes.py`; counted by `features.vocabulary.input_checks` when scores
are logged). Dropped values never reach the prediction log, so the drift
tests cannot see them; this module judges their counts instead.

Reference share: what the fit saw, from the spec's `fit_info`
(`values_out_of_range` / `values_of_known_codes` of the fitting data), with
add-one smoothing, (dropped + 1) / (values + 2), so a code without impossible
values in training still has a positive null share. Specs fitted before
`values_of_known_codes` existed fall back to `UNKNOWN_REFERENCE_SHARE`.

A code is flagged when its window share is >= `monitor.impossible_share`
and a one-sided binomial test against the reference share gives
p < `monitor.significance`. A flagged code makes the window an alert; when
the dropped values' median times a pure-scale conversion of data/codes.py
lands in the plausible range, the reason says which unit they probably are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from chronorisk.serving.monitoring.statistics import binomial_p, p_value, rounded

if TYPE_CHECKING:
    from chronorisk.serving.config import MonitorConfig

UNKNOWN_REFERENCE_SHARE = 0.001  # specs without the fitting data's value counts: a small null share


def scale_conversions(measurement) -> list[tuple[str, float]]:
    """(unit, factor to the canonical unit) of a measurement's pure-scale conversions (not 1:1, not affine)."""
    out = []
    for unit, conv in measurement.conversions.items():
        zero, one = conv(0.0), conv(1.0)
        if abs(zero) < 1e-9 and abs(one - 1.0) > 1e-6:
            out.append((unit, float(one)))
    return out


def input_code_reference(spec) -> dict[str, dict[str, Any]]:
    """Per code whose impossible numbers the spec drops: display, unit, plausible range, the fit's counts
    and the features that read it (by meaning: the measurement's concept, or the code's own features)."""
    from chronorisk.data.codes import MEASUREMENT_BY_CODE
    from chronorisk.features.vocabulary import dropping_codes

    fit = spec.fit_info or {}
    dropped, seen = fit.get("values_out_of_range") or {}, fit.get("values_of_known_codes")
    out = {}
    for code, lo, hi in dropping_codes(spec).iter_rows():
        m = MEASUREMENT_BY_CODE[code]
        concepts = [ms.name for ms in spec.measurements if code in ms.codes] + [code]
        features = list(dict.fromkeys(f for c in concepts for f in spec.features_of_concept(c)))
        out[code] = {"display": m.display, "unit": m.unit, "plausible": [lo, hi], "features": features,
                     "n_values": None if seen is None else int(seen.get(code, 0)),
                     "n_dropped": int(dropped.get(code, 0))}
    return out


def reference_share(ref: dict[str, Any]) -> float:
    """The null share of impossible values of a code (module doc)."""
    if ref.get("n_values") is None:
        return UNKNOWN_REFERENCE_SHARE
    return (ref["n_dropped"] + 1) / (ref["n_values"] + 2)


def window_totals(checks: pl.DataFrame) -> pl.DataFrame:
    """Per code: values read and dropped over the window's logged checks, and the median of the dropped
    values (the per-day medians weighted by how many they summarize)."""
    if checks.height == 0:
        return pl.DataFrame(schema={"code": pl.String, "n_values": pl.Int64, "n_dropped": pl.Int64,
                                    "dropped_median": pl.Float64})
    weighted = pl.col("dropped_median").filter(pl.col("n_dropped") > 0)
    weights = pl.col("n_dropped").filter(pl.col("n_dropped") > 0)
    return checks.group_by("code").agg(
        pl.col("n_values").sum().cast(pl.Int64), pl.col("n_dropped").sum().cast(pl.Int64),
        _weighted_median(weighted, weights).alias("dropped_median"),
    ).sort("code")


def _weighted_median(values: pl.Expr, weights: pl.Expr) -> pl.Expr:
    order = values.arg_sort()
    cum = weights.gather(order).cum_sum()
    return values.gather(order).filter(cum >= cum.max() / 2).first()


def probable_unit(code: str, median: float | None) -> str | None:
    """'<unit>' when the dropped values' median, converted from that unit, is plausible for the code."""
    from chronorisk.data.codes import MEASUREMENT_BY_CODE

    m = MEASUREMENT_BY_CODE.get(code)
    if m is None or median is None:
        return None
    lo, hi = m.plausible
    for unit, factor in scale_conversions(m):
        if lo <= median * factor <= hi:
            return unit
    return None


def judge_inputs(checks: pl.DataFrame | None, codes: dict[str, dict], config: MonitorConfig) -> dict[str, Any]:
    """The window's verdict per code (counts, shares, test, probable unit) and the flagged ones."""
    verdicts = []
    totals = window_totals(checks) if checks is not None else window_totals(pl.DataFrame())
    for row in totals.iter_rows(named=True):
        ref = codes.get(row["code"])
        if ref is None or not row["n_values"]:
            continue
        share, p0 = row["n_dropped"] / row["n_values"], reference_share(ref)
        p = binomial_p(row["n_dropped"], row["n_values"], p0)
        flagged = bool(share >= config.impossible_share and share > p0 and p < config.significance)
        verdicts.append({
            "code": row["code"], "display": ref["display"], "unit": ref["unit"], "plausible": ref["plausible"],
            "n_values": row["n_values"], "n_dropped": row["n_dropped"], "share": rounded(share),
            "reference_share": rounded(p0), "p": p_value(p), "dropped_median": rounded(row["dropped_median"]),
            "probable_unit": probable_unit(row["code"], row["dropped_median"]) if flagged else None,
            "features": ref["features"], "flagged": flagged,
        })
    flagged = [v for v in verdicts if v["flagged"]]
    return {"threshold": config.impossible_share, "codes": verdicts,
            "flagged_codes": [v["code"] for v in flagged],
            "affected_features": list(dict.fromkeys(f for v in flagged for f in v["features"]))}


def describe(v: dict[str, Any]) -> str:
    """The alert's reason for one flagged code."""
    lo, hi = v["plausible"]
    text = (f"impossible values of {v['display']} ({v['code']}): {v['n_dropped']:,} of {v['n_values']:,} "
            f"({100 * v['share']:.1f}%) outside the plausible {lo:g}-{hi:g} {v['unit']}, dropped by the features "
            f"(reference {100 * v['reference_share']:.2f}%, p={v['p']:.2g}); median dropped value "
            f"{v['dropped_median']:.3g}")
    if v.get("probable_unit"):
        text += f"; probably {v['probable_unit']} instead of {v['unit']}"
    names = v["features"]
    return text + (f"; affects {', '.join(names[:6])}" + (" ..." if len(names) > 6 else "") if names else "")
