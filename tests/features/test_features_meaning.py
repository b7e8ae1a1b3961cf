"""The spec carries the meaning of every feature: kind, concept, aggregate, window, bounds, clock."""

from __future__ import annotations

import json

import polars as pl
import pytest

from chronorisk.data import codes as vocab
from chronorisk.errors import InputError
from chronorisk.features.config import FeatureConfig
from chronorisk.features.pipeline import fit_spec
from chronorisk.features.spec import FeatureSpec


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    summary = pl.DataFrame({"code": ["LOCAL//X1"], "n_subjects": [30]})
    return fit_spec(summary, FeatureConfig(min_code_subjects=20))


def test_every_feature_has_kind_and_concept(spec):
    for name in spec.feature_names:
        info = spec.info(name)
        assert info.kind and info.concept and info.concept_display, name
        if info.bounds is not None:
            assert info.bounds[0] <= info.bounds[1], name
        if info.kind in ("binary", "proportion"):
            assert info.bounds == (0.0, 1.0), name


def test_measurement_meaning_known_answer(spec):
    info = spec.info("meas_sbp_mean_365d")
    assert (info.kind, info.concept, info.aggregate, info.window_days) == ("value", "sbp", "mean", 365)
    assert info.bounds == tuple(float(b) for b in vocab.MEASUREMENTS["sbp"].plausible)
    assert info.concept_display == "Systolic blood pressure" and not info.grows_with_clock
    assert spec.info("meas_sbp_slope_90d").aggregate == "trend"
    assert spec.info("meas_sbp_count_90d").kind == "count"
    assert "meas_sbp_last" in spec.features_of_concept("sbp")
    assert spec.info("cond_diabetes_present").kind == "binary"


def test_clock_features_are_ages_and_elapsed_times(spec):
    clock = set(spec.clock_features())
    assert "demo_age_years" in clock and "cond_diabetes_days_since_last" in clock
    assert "cond_diabetes_years_since_first" in clock and "smoking_days_since_last" in clock
    assert "meas_sbp_last" not in clock and "demo_sex_female" not in clock
    assert all(spec.info(n).kind in ("age", "elapsed_days") for n in clock)


def test_unknown_feature_and_old_spec_refused(spec):
    with pytest.raises(InputError, match="unknown feature"):
        spec.info("no_such_feature")
    raw = json.loads(spec.to_json())
    raw["version"] = 1
    with pytest.raises(InputError, match="version 1 is not supported"):
        FeatureSpec.from_json(json.dumps(raw))
