"""Risk tiers: low / medium / high from calibrated risk and the task's thresholds.

A risk at or above `high` is high, at or above `medium` (and below `high`)
is medium, anything below `medium` is low. A missing risk has no tier and
raises: a GP must never read "low" for a patient the model could not score.

The thresholds follow a rule the user chooses per task (`model.tiers` fixed
risk cut-offs, or `model.tier_rules`: flag the top k% of patients, or reach a
sensitivity target), fitted on the validation (tuning) rows and stored with
the model; `tier_table` says what each tier means on those rows: the share of
patients flagged at or above it, the share of outcomes caught (sensitivity)
and the share of flagged patients who had the outcome (PPV).
"""

from __future__ import annotations

import numpy as np

from chronorisk.errors import InputError
from chronorisk.models.config import TierRule, TierThresholds

TIERS = ("low", "medium", "high")
MIN_POSITIVES = 10  # validation outcomes a sensitivity rule needs


def tier_of(risk: object, thresholds: TierThresholds) -> np.ndarray:
    """Tier name of each risk (array of str); ValueError for NaN or risks outside [0, 1]."""
    r = np.atleast_1d(np.asarray(risk, dtype=float))
    if r.size and (np.isnan(r).any() or r.min() < 0 or r.max() > 1):
        raise ValueError("risk: every risk must be a number in [0, 1]")
    idx = (r >= thresholds.medium).astype(np.int64) + (r >= thresholds.high).astype(np.int64)
    return np.asarray(TIERS, dtype=object)[idx]


def fit_thresholds(rule: TierRule | TierThresholds, y: object, risk: object) -> TierThresholds:
    """The thresholds of `rule` on validation outcomes `y` (0/1) and calibrated risks; fixed cut-offs
    (`TierThresholds`) are returned as they are."""
    if isinstance(rule, TierThresholds):
        return rule
    y = np.asarray(y, dtype=float)
    p = np.asarray(risk, dtype=float)
    if p.size == 0:
        raise InputError("model.tier_rules", "no validation rows to fit the tier thresholds on")
    if rule.rule == "top_percent":
        high, medium = (_top_share_cut(p, share / 100) for share in (rule.high, rule.medium))
    else:
        positives = p[y == 1]
        if positives.size < MIN_POSITIVES:
            raise InputError("model.tier_rules", f"a sensitivity rule needs at least {MIN_POSITIVES} validation "
                                                 f"outcomes, got {positives.size}")
        high, medium = (_top_share_cut(positives, target) for target in (rule.high, rule.medium))
    return _ordered(medium, high, rule)


def _top_share_cut(values: np.ndarray, share: float) -> float:
    """The highest risk r such that at least `share` of `values` are >= r."""
    ordered = np.sort(values)[::-1]
    k = max(1, int(np.ceil(share * ordered.size)))
    return float(ordered[k - 1])


def _ordered(medium: float, high: float, rule: TierRule) -> TierThresholds:
    low_end, high_end = 1e-6, 1 - 1e-6
    high = min(max(high, 2 * low_end), high_end)
    medium = min(max(medium, low_end), high)
    if medium >= high:
        raise InputError("model.tier_rules", f"{rule.rule} {rule.high} and {rule.medium} give the same risk "
                                             f"threshold ({high:.4g}) on the validation rows: choose rules further "
                                             "apart")
    return TierThresholds(medium=medium, high=high)


def tier_table(y: object, risk: object, thresholds: TierThresholds) -> list[dict]:
    """At or above each tier threshold on these rows: share flagged, sensitivity, PPV (None when undefined)."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(risk, dtype=float)
    positives = float(y.sum())
    rows = []
    for tier, cut in (("high", thresholds.high), ("medium", thresholds.medium)):
        flagged = p >= cut
        n = int(flagged.sum())
        caught = float(y[flagged].sum())
        rows.append({
            "tier": tier, "threshold": cut, "n_flagged": n,
            "share_flagged": n / p.size if p.size else None,
            "sensitivity": caught / positives if positives else None,
            "ppv": caught / n if n else None,
        })
    return rows
