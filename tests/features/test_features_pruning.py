"""Features that say nothing in the fitting rows are dropped, with the reason, and the CLI says so."""

from __future__ import annotations

from features_support import before, events, index

from chronorisk.features.config import FeatureConfig
from chronorisk.features.pipeline import code_summary, fit_spec, transform
from chronorisk.features.pruning import FitStats, dropped_lines, without_useless

HR = "LOCAL//HR"


def test_null_constant_and_repeated_windows_are_dropped():
    # one heart rate per subject, 10-39 days before t: every window's mean/min/max equals the last value
    ev = events([(s, before(10 + s), HR, 60.0 + s) for s in range(30)] + [(s, None, "GENDER//F") for s in range(30)])
    spec = fit_spec(code_summary(ev), FeatureConfig(min_code_subjects=20))
    frame = transform(spec, ev.lazy(), index(list(range(30)))).collect()
    stats = FitStats(spec)
    stats.add(frame[:17])  # chunk by chunk, as the tables are written
    stats.add(frame[17:])
    reasons = stats.useless()
    assert reasons["code_LOCAL_HR_mean_90d"] == "repeats code_LOCAL_HR_last"
    assert reasons["code_LOCAL_HR_max_1095d"] == "repeats code_LOCAL_HR_last"
    assert reasons["code_LOCAL_HR_count_365d"] == "constant 1"  # one record each, in every window
    assert reasons["demo_sex_female"] == "constant 1" and reasons["demo_age_years"] == "entirely null"
    assert reasons["code_LOCAL_HR_present"] == "constant 1"
    kept = {"code_LOCAL_HR_last", "code_LOCAL_HR_days_since_last"}
    assert kept.isdisjoint(reasons)
    pruned = without_useless(spec, reasons)
    assert kept <= set(pruned.feature_names) and not set(reasons) & set(pruned.feature_names)
    assert pruned.fit_info["dropped"]["count"] == len(reasons)
    assert "dropped" in dropped_lines(pruned)[0]
    # the pruned spec computes the same values for what it keeps
    again = transform(pruned, ev.lazy(), index(list(range(30)))).collect()
    assert again.select(pruned.feature_names).equals(frame.select(pruned.feature_names))


def test_a_feature_that_varies_is_kept():
    ev = events([(s, before(10 + s), HR, 60.0 + s) for s in range(30)] + [(s, before(500), HR, 70.0)
                                                                           for s in range(0, 30, 2)])
    spec = fit_spec(code_summary(ev), FeatureConfig(min_code_subjects=20))
    stats = FitStats(spec)
    stats.add(transform(spec, ev.lazy(), index(list(range(30)))).collect())
    reasons = stats.useless()
    for name in ("code_LOCAL_HR_last", "code_LOCAL_HR_mean_1095d", "code_LOCAL_HR_count_1095d"):
        assert name not in reasons
