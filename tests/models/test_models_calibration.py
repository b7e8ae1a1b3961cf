"""Calibrators: known coefficients, JSON round trips, the auto choice, and a miscalibrated model fixed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from models_support import NAMES, small_config

from chronorisk.models.calibration import (
    IsotonicCalibrator,
    PlattCalibrator,
    calibrator_from_dict,
    fit_calibrator,
    fit_logistic_1d,
    sigmoid,
)
from chronorisk.models.risk_model import RiskModel
from chronorisk.training import metrics as M


def test_platt_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    m = rng.normal(0, 1.5, 60000)
    y = (rng.random(m.size) < sigmoid(0.5 + 2.0 * m)).astype(float)
    cal = PlattCalibrator.fit(m, y)
    assert cal.intercept == pytest.approx(0.5, abs=0.05)
    assert cal.slope == pytest.approx(2.0, abs=0.06)


def test_logistic_fit_vectorized_over_weight_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=400)
    y = (rng.random(400) < sigmoid(x)).astype(float)
    W = rng.integers(0, 3, (4, 400)).astype(float)
    a, b = fit_logistic_1d(x, y, W)
    for r in range(4):
        ar, br = fit_logistic_1d(x, y, W[r])
        assert (a[r], b[r]) == pytest.approx((ar, br), rel=1e-8)


def test_isotonic_is_monotone_and_bounded():
    rng = np.random.default_rng(2)
    m = rng.normal(size=3000)
    y = (rng.random(m.size) < sigmoid(3 * np.sign(m))).astype(float)
    cal = IsotonicCalibrator.fit(m, y)
    grid = np.linspace(-5, 5, 500)
    p = cal.predict(grid)
    assert np.all(np.diff(p) >= 0)
    assert p.min() >= 0 and p.max() <= 1
    assert cal.predict(np.array([-100.0]))[0] == pytest.approx(cal.y_thresholds[0])  # flat outside


@pytest.mark.parametrize("cls", [PlattCalibrator, IsotonicCalibrator])
def test_json_round_trip_gives_identical_predictions(cls):
    rng = np.random.default_rng(3)
    m = rng.normal(size=2000)
    y = (rng.random(m.size) < sigmoid(m - 1)).astype(float)
    cal = cls.fit(m, y)
    back = calibrator_from_dict(json.loads(json.dumps(cal.to_dict())))
    x = rng.normal(size=100)
    np.testing.assert_array_equal(back.predict(x), cal.predict(x))


@pytest.mark.parametrize(
    "raw, message",
    [
        ("nope", "JSON object"),
        ({"method": "beta"}, "not one of"),
        ({"method": "platt", "intercept": "x", "slope": 1}, "numeric"),
        ({"method": "isotonic", "x_thresholds": [0, 1], "y_thresholds": [0.5]}, "same length"),
        ({"method": "isotonic", "x_thresholds": [0, 1], "y_thresholds": [0.5, 0.2]}, "non-decreasing"),
    ],
)
def test_bad_calibrator_json_is_named(raw, message):
    with pytest.raises(ValueError, match=message):
        calibrator_from_dict(raw)


def test_auto_picks_isotonic_for_a_step_shaped_truth():
    rng = np.random.default_rng(4)
    m = rng.normal(size=20000)
    y = (rng.random(m.size) < np.where(m > 0.5, 0.6, 0.05)).astype(float)  # not logistic in m
    cal = fit_calibrator(m, y, "auto", seed=0)
    assert cal.method == "isotonic"
    scores = cal.info["cross_fitted"]
    assert scores["isotonic"]["log_loss"] < scores["platt"]["log_loss"]


def test_auto_picks_platt_for_few_rows_of_a_logistic_truth():
    rng = np.random.default_rng(5)
    m = rng.normal(size=300)
    y = (rng.random(m.size) < sigmoid(m - 1)).astype(float)
    cal = fit_calibrator(m, y, "auto", seed=0)
    assert cal.method == "platt"
    assert cal.info["requested"] == "auto" and cal.info["n"] == 300


def test_calibrator_needs_both_outcomes():
    with pytest.raises(ValueError, match="both outcomes"):
        fit_calibrator(np.zeros(10), np.zeros(10), "platt")


def test_calibration_fixes_a_deliberately_miscalibrated_model(data):
    """Up-weighting cases 8x makes LightGBM's own probabilities far too high; the calibrator fixes that."""
    X, y, _ = data["train"]
    Xv, yv, _ = data["valid"]
    Xt, yt, _ = data["test"]
    for method in ("platt", "isotonic"):
        model = RiskModel(small_config(lightgbm={"scale_pos_weight": 8.0}, calibration=method))
        model.fit(X, y, Xv, yv, NAMES)
        raw_p = sigmoid(model.predict_raw(Xt))
        cal_p = model.predict_risk(Xt)
        assert raw_p.mean() > 1.5 * yt.mean()  # badly over-predicting
        assert M.ece(yt, raw_p) > 0.06
        assert M.ece(yt, cal_p) < min(0.03, M.ece(yt, raw_p) / 3), method
        assert abs(cal_p.mean() - yt.mean()) < 0.02
        assert M.auroc(yt, cal_p) == pytest.approx(M.auroc(yt, raw_p), abs=0.01)  # monotone: ranking kept


def test_federated_calibrator_dicts_are_understood():
    """The federated package's calibrators ({a: slope, b: intercept} / {x, y}) load as ours."""
    from chronorisk.models.calibration import as_calibrator

    platt = calibrator_from_dict({"method": "platt", "a": 2.0, "b": -1.0})
    assert platt.predict(np.array([0.5]))[0] == pytest.approx(sigmoid(np.array([0.0]))[0])
    iso = calibrator_from_dict({"method": "isotonic", "x": [-1.0, 0.0, 0.0, 1.0], "y": [0.1, 0.1, 0.3, 0.3]})
    assert iso.predict(np.array([-5.0, 5.0])) == pytest.approx([0.1, 0.3])

    class Foreign:
        def to_dict(self):
            return {"method": "platt", "a": 1.0, "b": 0.0}

    assert as_calibrator(Foreign()).predict(np.array([0.0]))[0] == pytest.approx(0.5)


def test_isotonic_end_blocks_are_pooled_until_they_hold_ten_cases_and_ten_non_cases():
    """PAV blocks (rows, cases): 100/0, 100/5, 100/30, 60/50, 20/20. The lowest block alone would
    predict 0 and the highest 1; pooled, the three lowest give 35/300 and the two highest 70/80."""
    y = np.r_[np.zeros(100), np.ones(5), np.zeros(95), np.ones(30), np.zeros(70), np.ones(50), np.zeros(10),
              np.ones(20)]
    m = np.arange(y.size, dtype=float)
    cal = IsotonicCalibrator.fit(m, y)
    p = cal.predict(m)
    np.testing.assert_allclose(p[:300], 35 / 300)
    np.testing.assert_allclose(p[300:], 70 / 80)


def test_isotonic_with_few_cases_is_one_pooled_rate_never_zero_or_one():
    m = np.arange(100, dtype=float)
    y = np.r_[np.zeros(60), np.ones(4), np.zeros(30), np.ones(6)]  # 10 cases, but PAV leaves a case-free bottom
    p = IsotonicCalibrator.fit(m, y).predict(m)
    assert p.min() > 0 and p.max() < 1
    assert np.all(np.diff(p) >= 0)
    y_few = np.r_[np.zeros(90), np.ones(5), np.zeros(5)]  # 5 cases: fewer than 10, one block at the rate
    np.testing.assert_allclose(IsotonicCalibrator.fit(m, y_few).predict(m), 0.05)


def test_auto_keeps_platt_unless_isotonic_is_clearly_better():
    rng = np.random.default_rng(6)
    m = rng.normal(-2.5, 1.0, 4000)
    y = (rng.random(m.size) < sigmoid(m)).astype(float)  # Platt is the true model
    cal = fit_calibrator(m, y, "auto", seed=0)
    scores = cal.info["cross_fitted"]
    assert cal.method == "platt"
    assert scores["isotonic_gain"] <= 2 * scores["isotonic_gain_se"]
