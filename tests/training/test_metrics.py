"""Known-answer tests of the evaluation metrics (hand-computed cases and scikit-learn cross-checks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from chronorisk.training import metrics as M

Y4 = np.array([0, 0, 1, 1])
S4 = np.array([0.1, 0.4, 0.35, 0.8])


# ---- discrimination -----------------------------------------------------------------------
def test_auroc_hand_computed():
    # pairs (case, non-case): (0.35 > 0.1) yes, (0.35 > 0.4) no, (0.8 > both) yes, yes -> 3 of 4
    assert M.auroc(Y4, S4) == pytest.approx(0.75)


def test_auroc_ties_count_half():
    assert M.auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert M.auroc([0, 1, 1], [0.2, 0.2, 0.9]) == pytest.approx(0.75)


def test_auroc_undefined_without_both_outcomes():
    assert math.isnan(M.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(M.auroc([], []))


def test_auprc_hand_computed():
    # descending: 0.8 case (P=1, R=.5), 0.4 non-case, 0.35 case (P=2/3, R=1): AP = .5*1 + .5*2/3
    assert M.auprc(Y4, S4) == pytest.approx(0.5 + 0.5 * 2 / 3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 6), st.integers(0, 3)), min_size=2, max_size=40)
)
def test_auroc_auprc_match_sklearn_with_ties_and_weights(rows):
    y = np.array([r[0] for r in rows], dtype=float)
    s = np.array([r[1] for r in rows], dtype=float) / 6  # few distinct values: many ties
    w = np.array([r[2] for r in rows], dtype=float)
    if not (0 < y.sum() < y.size):
        return
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert M.auprc(y, s) == pytest.approx(average_precision_score(y, s))
    if (w * y).sum() > 0 and (w * (1 - y)).sum() > 0:
        assert M.auroc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w))
        assert M.auprc(y, s, w) == pytest.approx(average_precision_score(y, s, sample_weight=w))


def test_weights_equal_repeated_rows():
    rng = np.random.default_rng(3)
    y = (rng.random(60) < 0.3).astype(float)
    p = np.round(rng.random(60), 1)
    w = rng.integers(0, 4, 60).astype(float)
    yr, pr = np.repeat(y, w.astype(int)), np.repeat(p, w.astype(int))
    for fn in (M.auroc, M.auprc, M.brier, M.log_loss, M.calibration_slope, M.calibration_intercept):
        assert fn(y, p, w) == pytest.approx(fn(yr, pr), rel=1e-9), fn.__name__
    assert M.net_benefit(y, p, 0.3, w) == pytest.approx(M.net_benefit(yr, pr, 0.3))


def test_matrix_of_weights_gives_one_value_per_row():
    rng = np.random.default_rng(4)
    y = (rng.random(100) < 0.4).astype(float)
    p = rng.random(100)
    W = rng.integers(0, 3, (5, 100)).astype(float)
    for fn in (M.auroc, M.auprc, M.brier, M.ece, M.calibration_slope):
        many = fn(y, p, W)
        assert many.shape == (5,)
        for b in range(5):
            assert many[b] == pytest.approx(fn(y, p, W[b]), rel=1e-9, nan_ok=True)


# ---- accuracy and calibration ---------------------------------------------------------------
def test_brier_hand_computed_and_sklearn():
    assert M.brier([0, 1], [0.2, 0.6]) == pytest.approx((0.04 + 0.16) / 2)
    rng = np.random.default_rng(0)
    p = rng.random(200)
    y = (rng.random(200) < p).astype(int)
    assert M.brier(y, p) == pytest.approx(brier_score_loss(y, p))


def test_calibration_intercept_is_log_odds_gap():
    # constant risk 0.2, observed rate 0.5: a = logit(0.5) - logit(0.2) = log(4)
    y = np.array([0, 1] * 50)
    p = np.full(100, 0.2)
    assert M.calibration_intercept(y, p) == pytest.approx(math.log(4), abs=1e-8)


def test_calibration_slope_matches_unpenalized_logistic_regression():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.02, 0.9, 3000)
    y = (rng.random(3000) < p).astype(int)
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(M.logit(p)[:, None], y)
    assert M.calibration_slope(y, p) == pytest.approx(lr.coef_[0, 0], abs=1e-5)


def test_calibration_slope_detects_overconfidence():
    rng = np.random.default_rng(2)
    true = rng.uniform(0.02, 0.6, 40000)
    y = (rng.random(true.size) < true).astype(int)
    assert M.calibration_slope(y, true) == pytest.approx(1.0, abs=0.06)
    assert M.calibration_intercept(y, true) == pytest.approx(0.0, abs=0.05)
    overconfident = 1 / (1 + np.exp(-2 * M.logit(true)))  # logit doubled: slope 1/2
    assert M.calibration_slope(y, overconfident) == pytest.approx(0.5, abs=0.03)


def test_ece_hand_computed():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    y = np.array([0, 0, 1, 1])
    # two equal-mass bins: |0 - .15| * .5 + |1 - .35| * .5
    assert M.ece(y, p, n_bins=2) == pytest.approx(0.4)
    # one row per bin: mean |y - p|
    assert M.ece(y, p, n_bins=4) == pytest.approx(np.mean(np.abs(y - p)))
    # default: 10 equal-mass bins; a calibrated constant risk has ECE 0
    assert M.ECE_BINS == 10
    assert M.ece([0, 1, 0, 1], [0.5] * 4) == pytest.approx(0.0)


def test_ece_small_when_calibrated_large_when_not():
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 0.5, 50000)
    y = (rng.random(p.size) < p).astype(int)
    assert M.ece(y, p) < 0.01
    assert M.ece(y, np.clip(p * 1.5, 0, 1)) == pytest.approx(0.5 * p.mean(), abs=0.01)


# ---- at a threshold ---------------------------------------------------------------------------
def test_threshold_metrics_hand_computed():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.1, 0.55])
    # flagged at 0.5: rows 0, 1, 3, 7 -> TP 2, FP 2; cases 3
    assert M.sensitivity(y, p, 0.5) == pytest.approx(2 / 3)
    assert M.ppv(y, p, 0.5) == pytest.approx(0.5)
    assert M.number_needed_to_screen(y, p, 0.5) == pytest.approx(2.0)
    assert M.flagged_share(y, p, 0.5) == pytest.approx(0.5)


def test_net_benefit_hand_computed():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.6, 0.6, 0.2, 0.1])
    assert M.net_benefit(y, p, 0.5) == pytest.approx((1 - 1 * 1) / 4)
    assert M.net_benefit(y, p, 0.25) == pytest.approx((1 - 1 / 3) / 4)
    # treat all at t: prevalence - (1 - prevalence) t / (1 - t)
    assert M.net_benefit_treat_all(y, 0.25) == pytest.approx(0.5 - 0.5 / 3)
    dc = M.decision_curve(y, p, [0.25, 0.5])
    assert dc["model"] == pytest.approx([1 / 6, 0.0])
    assert dc["treat_none"] == [0.0, 0.0]


def test_threshold_must_be_a_probability():
    with pytest.raises(ValueError, match="threshold"):
        M.sensitivity([0, 1], [0.1, 0.9], 1.5)


# ---- curves -----------------------------------------------------------------------------------
def test_roc_curve_endpoints_and_area():
    fpr, tpr = M.roc_curve(Y4, S4)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.auroc(Y4, S4))


def test_calibration_curve_bins_are_equal_mass():
    p = np.linspace(0.01, 0.99, 100)
    y = (p > 0.5).astype(float)
    cc = M.calibration_curve(y, p, n_bins=4)
    assert list(cc["n"]) == [25, 25, 25, 25]
    assert cc["observed"][0] == 0 and cc["observed"][-1] == 1


# ---- bootstrap --------------------------------------------------------------------------------
def test_bootstrap_weights_are_resample_counts():
    rng = np.random.default_rng(0)
    W = M.bootstrap_weights(50, 7, rng)
    assert W.shape == (7, 50)
    assert np.all(W.sum(axis=1) == 50)
    clusters = np.repeat(np.arange(10), 5)
    Wc = M.bootstrap_weights(50, 7, rng, clusters)
    assert np.all(Wc.sum(axis=1) == 50)
    for b in range(7):  # every row of a patient carries that patient's draw count
        assert np.all(Wc[b].reshape(10, 5) == Wc[b].reshape(10, 5)[:, :1])


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(8)
    p = rng.random(800)
    y = (rng.random(800) < p).astype(float)
    fns = {"auroc": M.auroc, "brier": M.brier, "ece": M.ece}
    a = M.bootstrap_intervals(fns, y, p, n_boot=100, seed=3)
    b = M.bootstrap_intervals(fns, y, p, n_boot=100, seed=3, max_cells=5000)  # other chunking, same draws
    for name in fns:
        assert a[name] == pytest.approx(b[name], rel=1e-12)
    c = M.bootstrap_intervals(fns, y, p, n_boot=100, seed=4)
    assert a["auroc"] != c["auroc"]
    lo, hi = a["auroc"]
    assert lo < M.auroc(y, p) < hi
    # the sampling SE of an AUROC near 0.83 with 800 rows is about 0.015: a 95% interval of ~0.06
    assert 0.03 < hi - lo < 0.10


def test_bootstrap_equals_explicit_resampling():
    rng = np.random.default_rng(9)
    p = rng.random(120)
    y = (rng.random(120) < p).astype(float)
    W = M.bootstrap_weights(120, 20, np.random.default_rng(1))
    vec = M.auroc(y, p, W)
    for b in range(20):
        idx = np.repeat(np.arange(120), W[b].astype(int))
        assert vec[b] == pytest.approx(roc_auc_score(y[idx], p[idx]))


def test_summarize_has_every_metric_with_interval():
    rng = np.random.default_rng(10)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(float)
    row = M.summarize(y, p, threshold=0.5, n_boot=50, seed=0)
    for name in M.standard_metrics(0.5):
        assert name in row and f"{name}_lo" in row and f"{name}_hi" in row
    assert row["n"] == 300 and row["n_positive"] == int(y.sum())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same length"):
        M.auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0/1"):
        M.brier([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.brier([0, 1], [0.1, float("nan")])


def test_ece_does_not_depend_on_row_order_with_tied_risks():
    rng = np.random.default_rng(11)
    p = np.round(rng.random(500), 1)  # step-shaped risks, as isotonic calibration gives
    y = (rng.random(500) < p).astype(float)
    perm = rng.permutation(500)
    assert M.ece(y, p) == pytest.approx(M.ece(y[perm], p[perm]))
    assert M.ece(y, p) == pytest.approx(M.ece(y, p, np.ones(500)))
