"""Performance estimated without labels: what the calibrated risks say the window's figures will be.

Outcomes arrive a year or two after a score. Until then, if the model is
calibrated where it is used, each row's risk p is the probability that its
outcome is positive, so the expected confusion counts at any threshold t
are sums of risks: expected true positives sum(p >= t) p, false positives
sum(p >= t) (1 - p), false negatives sum(p < t) p. This is
confidence-based performance estimation (CBPE, as NannyML's CBPE does it;
NannyML itself cannot be installed beside the pinned stack: it pins an
older LightGBM and pulls in telemetry, so the estimates are computed here
and a test checks them against figures worked out by hand):

- expected AUROC: the area under the expected ROC curve, rows in
  descending risk, each row adding p to the expected positives and 1 - p
  to the expected negatives (ties share their step);
- expected sensitivity and PPV at each tier threshold (`medium`, `high`);
- expected prevalence: the mean risk (calibration in the large: once
  outcomes arrive the observed prevalence is compared with it).

Uncertainty: outcomes are drawn from the risks themselves (`draws` times,
seeded) and each figure is computed on every draw; the standard deviation
and the 2.5-97.5% range of the draws say how far the realized figure may
fall from the estimate by chance alone. The estimate is only as good as
the calibration at the site: a site whose outcomes are not what its risks
say (a new region) needs its own recalibration (`models/site_calibration.py`)
before the estimate can be trusted, and the realized figures beside it
show when it cannot. A recalibration fitted on few local cases is itself
uncertain, and the estimate from its risks inherits that: `chronorisk
evaluate --new-site` (`training/new_site_evaluation.py`) reports that
spread beside the one here.

It lives in training/ so that evaluation (`evaluate --new-site`) and
monitoring (`serving/monitoring/estimate.py`, which adds the floor and its
alert) share one implementation under the one-way imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np


def rounded(value, digits: int = 4):
    """A figure for reports: rounded to `digits`, None when it is missing, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else round(value, digits)


@dataclass(frozen=True)
class Spread:
    """A figure's standard deviation and 95% range over outcomes drawn from the risks."""

    sd: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, draws: np.ndarray) -> Spread:
        d = draws[np.isfinite(draws)]
        if d.size < 2:
            return cls(None, None, None)
        return cls(rounded(d.std(ddof=1)), rounded(np.quantile(d, 0.025)), rounded(np.quantile(d, 0.975)))


@dataclass(frozen=True)
class ThresholdEstimate:
    """Expected sensitivity and PPV of flagging risks >= `threshold` (a tier's lower bound)."""

    tier: str
    threshold: float
    flagged_share: float | None
    sensitivity: float | None
    sensitivity_spread: Spread
    ppv: float | None
    ppv_spread: Spread
    realized_sensitivity: float | None = None
    realized_ppv: float | None = None


@dataclass(frozen=True)
class PerformanceEstimate:
    """The label-free estimate of one (site, window), and the realized figures beside it once labels arrive."""

    n: int
    auroc: float | None
    auroc_spread: Spread
    prevalence: float | None
    prevalence_spread: Spread
    thresholds: list[ThresholdEstimate] = field(default_factory=list)
    n_outcomes: int = 0
    realized_auroc: float | None = None
    realized_prevalence: float | None = None
    floor: float | None = None
    below_floor: str | None = None  # None, "warning" (below, within chance) or "alert" (below beyond chance)

    def to_dict(self) -> dict:
        return asdict(self)


def expected_auroc(risk: np.ndarray) -> float:
    """The area under the expected ROC curve of calibrated risks (NaN when every risk is 0 or every risk 1).

    Rows in descending risk; a row adds p to the expected positives above
    the next ones and 1 - p to the expected negatives. Each negative mass
    (1 - p) counts the positive mass ranked above it, plus half of that of
    its own tie group (ties are steps of the curve, as in the AUROC's ties).
    """
    p = np.sort(np.asarray(risk, dtype=float))[::-1]
    if p.size == 0:
        return math.nan
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
    pos = np.add.reduceat(p, starts)
    neg = np.add.reduceat(1.0 - p, starts)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return math.nan
    above = np.cumsum(pos) - pos
    return float(np.sum(neg * (above + 0.5 * pos)) / (total_pos * total_neg))


def _auroc_of_draws(starts: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Realized AUROC of each row of drawn outcomes `y` (draws x rows, rows in descending risk; ties by group)."""
    pos = np.add.reduceat(y, starts, axis=1)
    neg = np.add.reduceat(1.0 - y, starts, axis=1)
    above = np.cumsum(pos, axis=1) - pos
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(neg * (above + 0.5 * pos), axis=1) / (n_pos * n_neg)


def _at_threshold(flag: np.ndarray, p_or_y: np.ndarray) -> tuple[float, float]:
    """(sensitivity, PPV) of flagging `flag` rows when outcomes (or their probabilities) are `p_or_y`."""
    tp = float(p_or_y[flag].sum())
    positives = float(p_or_y.sum())
    flagged = int(flag.sum())
    return (tp / positives if positives > 0 else math.nan), (tp / flagged if flagged else math.nan)


def estimate_performance(risk: np.ndarray, thresholds: Mapping[str, float], *, draws: int = 200,
                         seed: int = 0) -> PerformanceEstimate:
    """Expected AUROC, prevalence and, at each threshold, sensitivity and PPV of calibrated risks, with spreads."""
    p = np.sort(np.clip(np.asarray(risk, dtype=float), 0.0, 1.0))[::-1]
    n = int(p.size)
    if n == 0:
        return PerformanceEstimate(0, None, Spread.of(np.zeros(0)), None, Spread.of(np.zeros(0)))
    cuts = sorted(thresholds.items(), key=lambda kv: kv[1])
    flags = np.stack([p >= t for _, t in cuts]) if cuts else np.zeros((0, n), dtype=bool)
    drawn = _drawn_figures(p, flags, draws, seed)
    out = []
    for j, (tier, t) in enumerate(cuts):
        sens, ppv = _at_threshold(flags[j], p)
        flagged = int(flags[j].sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            sens_d = drawn["tp"][:, j] / drawn["positives"]
        ppv_d = drawn["tp"][:, j] / flagged if flagged else np.full(draws, np.nan)
        out.append(ThresholdEstimate(tier, float(t), rounded(flags[j].mean()), rounded(sens), Spread.of(sens_d),
                                     rounded(ppv), Spread.of(ppv_d)))
    return PerformanceEstimate(
        n=n, auroc=rounded(expected_auroc(p)), auroc_spread=Spread.of(drawn["auroc"]),
        prevalence=rounded(p.mean()), prevalence_spread=Spread.of(drawn["positives"] / n), thresholds=out,
    )


def _drawn_figures(p_desc: np.ndarray, flags: np.ndarray, draws: int, seed: int,
                   cells: int = 4_000_000) -> dict[str, np.ndarray]:
    """AUROC, positives and true positives at each threshold of `draws` outcome vectors drawn from the risks.

    Drawn in chunks of at most `cells` draws x rows (memory stays ~32 MB whatever the window's size).
    """
    n = p_desc.size
    starts = np.flatnonzero(np.r_[True, p_desc[1:] != p_desc[:-1]])
    rng = np.random.default_rng(seed)
    chunk = max(1, cells // n)
    parts: dict[str, list[np.ndarray]] = {"auroc": [], "positives": [], "tp": []}
    for first in range(0, draws, chunk):
        y = (rng.random((min(chunk, draws - first), n)) < p_desc).astype(float)
        parts["auroc"].append(_auroc_of_draws(starts, y))
        parts["positives"].append(y.sum(axis=1))
        parts["tp"].append(y @ flags.T.astype(float))
    return {k: np.concatenate(v) for k, v in parts.items()}


def with_realized(est: PerformanceEstimate, outcome: np.ndarray, risk: np.ndarray,
                  realized_auroc: float | None) -> PerformanceEstimate:
    """The estimate with the realized figures of the rows whose outcomes arrived beside it."""
    y = np.asarray(outcome, dtype=float)
    r = np.asarray(risk, dtype=float)
    if y.size == 0:
        return est
    tiers = []
    for t in est.thresholds:
        sens, ppv = _at_threshold(r >= t.threshold, y)
        tiers.append(replace(t, realized_sensitivity=rounded(sens), realized_ppv=rounded(ppv)))
    return replace(est, thresholds=tiers, n_outcomes=int(y.size), realized_auroc=realized_auroc,
                   realized_prevalence=rounded(y.mean()))
