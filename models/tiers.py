"""Risk tiers: low / medium / high from calibrated risk and the task's thresholds.

A risk at or above `high` is high, at or above `medium` (and below `high`)
is medium, anything below `medium` is low. A missing risk has no tier and
raises: a GP must never read "low" for a patient the model could not score.
"""

from __future__ import annotations

import numpy as np

from chronorisk.models.config import TierThresholds

TIERS = ("low", "medium", "high")


def tier_of(risk: object, thresholds: TierThresholds) -> np.ndarray:
    """Tier name of each risk (array of str); ValueError for NaN or risks outside [0, 1]."""
    r = np.atleast_1d(np.asarray(risk, dtype=float))
    if r.size and (np.isnan(r).any() or r.min() < 0 or r.max() > 1):
        raise ValueError("risk: every risk must be a number in [0, 1]")
    idx = (r >= thresholds.medium).astype(np.int64) + (r >= thresholds.high).astype(np.int64)
    return np.asarray(TIERS, dtype=object)[idx]
