"""The statistics monitoring runs: drift scores and p-values, the cheap screen, realized performance.

Distribution tests come from maintained libraries: scipy.stats for the
binomial and normal tails, the two-proportion (chi-square) test and the
two-sample KS test of other drift methods; Evidently for any other drift
method (`drift_scorer`). One exception, measured: the default method's
normed Wasserstein distance and its KS p-value are computed together on the
sorted samples (`_wasserstein_and_ks`), six times faster than the two scipy
calls, which made half of a monitor run's CPU. Figures are rounded for the JSON outputs here too
(`rounded`, `p_value`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from scipy.special import kolmogorov

from chronorisk.training.metrics import auroc_standard_error as auroc_se
from chronorisk.training.performance_estimate import rounded  # one rounding rule for reports

if TYPE_CHECKING:
    from chronorisk.serving.config import MonitorConfig
    from chronorisk.serving.monitoring.reference import FeatureBaseline, SiteBaseline


def seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=4).digest(), "big")


def shares(col: pl.Series) -> dict[str, float]:
    if col.len() == 0:
        return {}
    counts = col.value_counts()
    total = counts["count"].sum()
    return {str(k): round(float(c) / total, 4) for k, c in zip(counts[col.name], counts["count"], strict=True)}


def drift_scorer(method: str):
    """score(reference_sorted, current_sorted) -> drift score of Evidently's method `method`.

    "wasserstein" is Evidently's normed Wasserstein distance (W1 divided by
    the reference's standard deviation, at least 0.001), computed on the
    sorted samples together with the KS test (`_wasserstein_and_ks`: the
    library calls were half a monitor run's CPU); the HTML reports show
    Evidently's own figure and a test checks they agree. Other methods go
    through Evidently's registered StatTest.
    """
    if method == "wasserstein":
        return _normed_wasserstein
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    test = get_registered_stattest(method, ColumnType.Numerical)

    def score(reference: np.ndarray, current: np.ndarray) -> float:
        return float(test(_series(reference), _series(current), ColumnType.Numerical, None).drift_score)

    return score


def _normed_wasserstein(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> float:
    """W1(reference, current) / max(SD(reference), 0.001), both samples sorted."""
    return _wasserstein_and_ks(ref_sorted, cur_sorted)[0]


def _wasserstein_and_ks(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> tuple[float, float]:
    """(normed W1, asymptotic two-sample KS p-value) from one pass over the two sorted samples.

    Hand-written on purpose, the one statistic kept so: both are made of the gap between the two
    empirical CDFs on the pooled values, so one merge gives both. scipy.stats.wasserstein_distance
    plus scipy.stats.ks_2samp take 2.5 ms a call on 5,000 + 5,000 values against 0.41 ms here (this
    machine, 500 calls); a monitor run over 1,000,000 logged scores makes about 8,000 such calls,
    and through scipy they were half of the run's CPU time (benchmarks/monitor_bench.py:
    39.6 CPU-s with scipy, `monitor_scipy_stats.json`). Tests check the figures against scipy's and
    Evidently's.
    """
    grid = np.sort(np.concatenate([ref_sorted, cur_sorted]), kind="stable")  # merges two sorted runs
    gap = np.abs(np.searchsorted(ref_sorted, grid, side="right") / ref_sorted.size
                 - np.searchsorted(cur_sorted, grid, side="right") / cur_sorted.size)
    w = float(np.dot(gap[:-1], np.diff(grid)) / max(float(np.std(ref_sorted)), 0.001))
    n, m = ref_sorted.size, cur_sorted.size
    return w, float(kolmogorov(math.sqrt(n * m / (n + m)) * float(gap.max())))


def distance_and_p(wasserstein: Callable[[np.ndarray, np.ndarray], float], ref_sorted: np.ndarray,
                   cur_sorted: np.ndarray) -> tuple[float, float]:
    """The drift score of `wasserstein` (see `drift_scorer`) and the two-sample KS p-value; fused for the
    default method (see `_wasserstein_and_ks`)."""
    if wasserstein is _normed_wasserstein:
        return _wasserstein_and_ks(ref_sorted, cur_sorted)
    return wasserstein(ref_sorted, cur_sorted), ks_p(ref_sorted, cur_sorted)


def screen_features(matrix: np.ndarray, features: Sequence[str], baseline: SiteBaseline) -> dict[str, dict]:
    """Cheap statistics of every feature over the whole window (rows x features, NaN = missing), vectorized."""
    if not features:
        return {}
    n = matrix.shape[0]
    valid = ~np.isnan(matrix)
    present = valid.sum(axis=0)
    with np.errstate(invalid="ignore"):
        sums = np.sum(matrix, axis=0, where=valid)  # nansum without its copy of the window
        lo = np.array([baseline.features[f].lo for f in features])
        hi = np.array([baseline.features[f].hi for f in features])
        out = ((matrix < lo) | (matrix > hi)).sum(axis=0)  # NaN compares False: never out of range
    stats = {}
    for j, f in enumerate(features):
        k = int(present[j])
        stats[f] = {
            "n": k, "missing_share": (n - k) / n if n else math.nan, "mean": float(sums[j] / k) if k else None,
            "out_of_range_share": int(out[j]) / k if k else 0.0, "out_of_range_count": int(out[j]),
        }
    return stats


def screened_features(stats: dict[str, dict], baseline: SiteBaseline, config: MonitorConfig) -> list[str]:
    """Features whose cheap statistics moved by half a drift and beyond chance (p < 0.001): test them fully."""
    flagged = []
    for f, s in stats.items():
        b = baseline.features[f]
        if s["n"] and s["mean"] is not None and b.std > 0:
            z = abs(s["mean"] - b.mean) / (b.std / math.sqrt(s["n"]))
            if abs(s["mean"] - b.mean) / b.std >= config.screen_smd and normal_sf(z) < 0.001:
                flagged.append(f)
                continue
        if s["n"] and not math.isnan(b.lo):
            p0 = expected_outside(b, config)
            if (s["out_of_range_share"] >= max(2 * p0, p0 + 0.01)
                    and binomial_p(s["out_of_range_count"], s["n"], p0) < 0.001):
                flagged.append(f)
                continue
        if not math.isnan(b.missing) and abs(s["missing_share"] - b.missing) >= config.missing_share_change / 2:
            n = round(s["n"] / (1 - s["missing_share"])) if s["missing_share"] < 1 else s["n"]
            if two_proportion_p(s["missing_share"], max(n, 1), b.missing, b.n) < 0.001:
                flagged.append(f)
    return flagged


def binomial_p(k: int, n: int, p0: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p0) (scipy.stats.binom)."""
    from scipy.stats import binom

    if n == 0 or k <= 0:
        return 1.0
    return float(binom.sf(k - 1, n, min(max(p0, 1e-12), 1 - 1e-12)))


def normal_sf(z: float) -> float:
    """P(Z >= z), Z standard normal (scipy.stats.norm)."""
    from scipy.stats import norm

    return float(norm.sf(z))


def two_proportion_p(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two-sided p-value of a difference of two proportions: the chi-square test of the 2x2 table
    (scipy.stats.chi2_contingency without continuity correction, the pooled two-proportion z-test squared)."""
    from scipy.stats import chi2_contingency

    k1, k2 = p1 * n1, p2 * n2
    table = np.array([[k1, n1 - k1], [k2, n2 - k2]], dtype=float)
    if n1 == 0 or n2 == 0 or (table.sum(axis=0) <= 0).any():
        return 1.0  # one group empty, or nobody (everybody) missing in both: no evidence of a difference
    return float(chi2_contingency(table, correction=False).pvalue)


def expected_outside(baseline: FeatureBaseline, config: MonitorConfig) -> float:
    """The share of new values expected outside the baseline's range if nothing changed.

    At least the baseline's own share, the two tails (each at least
    `out_of_range_min_tail` baseline values), and 2/(n+1): with n baseline
    values, a new one falls beyond their extremes that often (ties at a bound,
    or a small baseline, would otherwise make any value "rare").
    """
    tail = max(config.out_of_range_quantile, config.out_of_range_min_tail / max(baseline.values.size, 1))
    return max(baseline.outside, 2 * min(tail, 0.25), 2 / (baseline.values.size + 1))


def sorted_median(values: np.ndarray) -> float | None:
    """Median of already sorted values (None when empty)."""
    n = values.size
    if n == 0:
        return None
    return float(values[n // 2]) if n % 2 else float((values[n // 2 - 1] + values[n // 2]) / 2)


def _series(values: np.ndarray):
    import pandas as pd

    return pd.Series(values, copy=False)


def ks_p(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov p-value, asymptotic distribution (scipy.stats.ks_2samp)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(ref_sorted, cur_sorted, method="asymp").pvalue)


def p_value(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else float(f"{value:.3g}")


def realized_performance(outcome: np.ndarray, risk: np.ndarray, config: MonitorConfig) -> dict[str, Any] | None:
    """AUROC, calibration slope / intercept, ECE and Brier (training/metrics.py definitions); None if too few.

    Each figure carries what its significance test needs (AUROC standard
    error, slope standard error, the ECE's p-value if the model were
    calibrated): weekly windows hold a few hundred outcomes, so AUROC and ECE
    move by chance alone.
    """
    from chronorisk.training import metrics as tm

    y = np.asarray(outcome, dtype=float)
    p = np.clip(np.asarray(risk, dtype=float), 1e-6, 1 - 1e-6)
    positives = int(y.sum())
    if y.size < config.min_outcomes or positives < config.min_positive_outcomes or positives == y.size:
        return None
    auroc = float(tm.auroc(y, p))
    ece = float(tm.ece(y, p))
    return {
        "n": int(y.size), "positives": positives, "prevalence": rounded(y.mean()), "mean_risk": rounded(p.mean()),
        "auroc": rounded(auroc), "auroc_se": rounded(auroc_se(auroc, positives, y.size - positives)),
        "calibration_slope": rounded(tm.calibration_slope(y, p)), "calibration_slope_se": rounded(_slope_se(y, p)),
        "calibration_intercept": rounded(tm.calibration_intercept(y, p)),
        "ece": rounded(ece), "ece_null_p": p_value(_ece_null_p(ece, p, seed_of(config.seed, "ece", y.size, positives))),
        "brier": rounded(tm.brier(y, p)),
    }


def _slope_se(y: np.ndarray, p: np.ndarray) -> float:
    """Standard error of the calibration slope b in logit P(y) = a + b logit(p) (Newton fit, Fisher information)."""
    x = np.log(p / (1 - p))
    design = np.column_stack([np.ones_like(x), x])
    beta = np.array([0.0, 1.0])
    for _ in range(50):  # starts at the identity, where a calibrated model sits
        mu = 1 / (1 + np.exp(-np.clip(design @ beta, -30, 30)))
        info = design.T @ (design * (mu * (1 - mu))[:, None])
        try:
            step = np.linalg.solve(info, design.T @ (y - mu))
        except np.linalg.LinAlgError:
            return math.nan
        beta = beta + step
        if np.max(np.abs(step)) < 1e-8:
            break
    mu = 1 / (1 + np.exp(-np.clip(design @ beta, -30, 30)))
    info = design.T @ (design * (mu * (1 - mu))[:, None])
    try:
        return math.sqrt(float(np.linalg.inv(info)[1, 1]))
    except (np.linalg.LinAlgError, ValueError):
        return math.nan


def _ece_null_p(ece: float, p: np.ndarray, seed: int, draws: int = 200) -> float:
    """P(ECE >= observed) if the model were perfectly calibrated: outcomes drawn from the risks themselves.

    Uses the same equal-mass bins as training/metrics.ece.
    """
    from chronorisk.training.metrics import ece_bins

    bins = ece_bins(p)
    n_bins = int(bins.max()) + 1
    rng = np.random.default_rng(seed)
    resid = (rng.random((draws, p.size)) < p) - p  # (draws, n)
    flat = bins[None, :] + n_bins * np.arange(draws)[:, None]
    per_bin = np.bincount(flat.ravel(), weights=resid.ravel(), minlength=draws * n_bins).reshape(draws, n_bins)
    null = np.abs(per_bin).sum(axis=1) / p.size
    return float((np.sum(null >= ece - 1e-12) + 1) / (draws + 1))


def sample_index(n: int, k: int, seed: int) -> np.ndarray | None:
    """Sorted row indices of a seeded sample of k of n rows (None = all rows)."""
    if n <= k:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
