"""The label-free performance estimate in monitoring: the estimate itself, and its alert against a floor.

The estimate (confidence-based performance estimation from the calibrated
risks, with its uncertainty) is computed by
`chronorisk.training.performance_estimate`, shared with `chronorisk
evaluate --new-site`; monitoring adds the realized figures as labels arrive
(`with_realized`) and judges the estimate against the configured floor.
"""

from __future__ import annotations

from dataclasses import replace

from chronorisk.training.performance_estimate import (  # noqa: F401 - the monitoring package's names for them
    PerformanceEstimate,
    Spread,
    ThresholdEstimate,
    estimate_performance,
    expected_auroc,
    with_realized,
)


def judged_against_floor(est: PerformanceEstimate, floor: float | None) -> PerformanceEstimate:
    """`below_floor`: "alert" when the expected AUROC is below the floor beyond chance (its 97.5% draw too),
    "warning" when below it within chance, None otherwise (or without a floor)."""
    if floor is None or est.auroc is None:
        return est
    level = None
    if est.auroc < floor:
        high = est.auroc_spread.high
        level = "alert" if high is not None and high < floor else "warning"
    return replace(est, floor=floor, below_floor=level)
