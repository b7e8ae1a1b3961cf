"""Site recalibration: few cases move a miscalibrated site towards slope 1, shrinkage, the bundle's site layer."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from models_support import frame

from chronorisk.federated.calibration import BinnedScores
from chronorisk.models.bundle import BundleError, ModelBundle
from chronorisk.models.calibration import WeightedOutcomes, logit, sigmoid
from chronorisk.models.config import TierThresholds
from chronorisk.models.site_calibration import (
    SiteLayer,
    design_effect,
    fit_site_recalibration,
    fit_site_recalibration_from_cells,
    resampled_site_recalibrations,
)
from chronorisk.training import metrics as tm


def _site(n: int, seed: int, *, slope: float = 0.5, shift: float = -0.4):
    """A site where the global risks are too extreme (true slope 0.5): outcome ~ sigmoid(shift + slope * logit)."""
    rng = np.random.default_rng(seed)
    global_risk = sigmoid(rng.normal(-2.0, 1.5, n))
    y = (rng.random(n) < sigmoid(shift + slope * logit(global_risk))).astype(float)
    return global_risk, y


@pytest.mark.parametrize("seed", range(5))
def test_few_cases_move_a_miscalibrated_sites_slope_towards_1(seed):
    risk, y = _site(100_000, 100 + seed)  # the site's future patients, where the slope is measured
    before = float(tm.calibration_slope(y, risk))
    assert before == pytest.approx(0.5, abs=0.03)
    local_risk, local_y = _site(200, seed)  # about 40 local cases
    recal = fit_site_recalibration("chc_new", local_risk, local_y)
    assert 25 <= recal.cases <= 60
    after = float(tm.calibration_slope(y, recal.apply(risk)))
    assert abs(after - 1) < abs(before - 1) - 0.15  # from 0.5 to about 0.8 with 40 cases
    assert float(tm.ece(y, recal.apply(risk))) < float(tm.ece(y, risk))


def test_shrinkage_keeps_a_site_with_very_few_cases_near_the_global_calibration():
    local_risk, local_y = _site(80, 3)
    recal = fit_site_recalibration("chc_new", local_risk, local_y)
    unshrunk = recal.info["unshrunk_slope"]
    assert abs(recal.slope - 1) < abs(unshrunk - 1)  # between the site's own fit and the global map
    none = fit_site_recalibration("chc_new", local_risk, local_y, update="intercept_slope", prior_cases=0)
    assert none.slope == pytest.approx(unshrunk, abs=1e-4)
    calibrated = sigmoid(np.random.default_rng(4).normal(-2, 1.5, 3000))
    y = (np.random.default_rng(5).random(calibrated.size) < calibrated).astype(float)
    keep = fit_site_recalibration("hosp", calibrated, y)  # a calibrated site stays about as it is
    assert keep.slope == pytest.approx(1, abs=0.15) and keep.intercept == pytest.approx(0, abs=0.2)


def test_fit_from_a_sites_binned_table_equals_the_fit_from_its_rows():
    """Federated: the site sends counts per cell of logit(global risk); cells of distinct values lose nothing."""
    rng = np.random.default_rng(6)
    x = np.round(rng.normal(-2.0, 1.2, 4000) / 0.02) * 0.02 + 0.01  # on the shared grid's bin centres
    y = (rng.random(x.size) < sigmoid(-0.3 + 0.6 * x)).astype(float)
    rows = fit_site_recalibration("s", sigmoid(x), y)
    table = BinnedScores.from_rows(x, y)
    cells = fit_site_recalibration_from_cells("s", table.as_outcomes())
    assert (cells.intercept, cells.slope) == pytest.approx((rows.intercept, rows.slope), rel=1e-6)


def test_too_few_cases_are_refused_by_name():
    with pytest.raises(ValueError, match="site chc_new: 2 cases"):
        fit_site_recalibration("chc_new", np.full(50, 0.1), np.r_[np.ones(2), np.zeros(48)])
    with pytest.raises(ValueError, match="0/1"):
        fit_site_recalibration("s", np.full(3, 0.1), np.array([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="positive slope"):
        SiteLayer.from_dict({"s": {"site": "s", "intercept": 0, "slope": -1, "n": 1, "cases": 1, "prior_cases": 1}})
    assert WeightedOutcomes.from_rows([0.0], [1.0]).total == 1


def test_the_bundles_site_layer_applies_to_its_site_only_and_survives_save_load(fitted, spec, task, data, tmp_path):
    bundle = ModelBundle.from_model(fitted, spec, task, TierThresholds(medium=0.1, high=0.25), version=1)
    X, _, _ = data["test"]
    rows = frame(X[:200]).with_columns(pl.Series("site", ["chc_new", "hosp"] * 100))
    global_risk = bundle.predict_risk(rows.drop("site"))
    recal = fit_site_recalibration("chc_new", *_site(3000, 9))
    layered = bundle.with_site_layer(SiteLayer().with_site(recal), version=2)
    back = ModelBundle.load(layered.save(tmp_path / "b"))
    assert back.version == "2"
    risk = back.predict_risk(rows)  # each row at its own site (the table's site column)
    new = np.arange(200) % 2 == 0
    np.testing.assert_allclose(risk[new], recal.apply(global_risk[new]))
    np.testing.assert_allclose(risk[~new], global_risk[~new])
    np.testing.assert_allclose(back.predict_risk(rows.drop("site"), site="chc_new"), recal.apply(global_risk))
    np.testing.assert_allclose(back.predict_risk(rows.drop("site")), global_risk)  # no site: global calibration
    raw = (tmp_path / "b" / "bundle.json").read_text().replace('"slope": ', '"slope": -')
    (tmp_path / "b" / "bundle.json").write_text(raw)
    with pytest.raises(BundleError, match="site_calibration"):
        ModelBundle.load(tmp_path / "b")


def test_promotion_scores_the_site_layer_and_refuses_a_harmful_one(fitted, spec, task, data):
    """Promotion scores candidate and champion on the same rows through predict_risk: the layer counts."""
    from models_support import make_data, true_logit

    from chronorisk.models.site_calibration import SiteRecalibration
    from chronorisk.training.config import PromoteConfig
    from chronorisk.training.promote import decide, score

    champion = ModelBundle.from_model(fitted, spec, task, TierThresholds(medium=0.1, high=0.25), version=1)
    X, _, _ = make_data(6000, 21)
    rng = np.random.default_rng(22)
    y = rng.random(X.shape[0]) < sigmoid(true_logit(X) + 1.0)  # a site with more outcomes than the model says
    rows = frame(X).with_columns(pl.Series("site", ["chc_new"] * X.shape[0]), pl.Series("boolean_value", y))
    local, held = rows[:3000], rows[3000:]
    recal = fit_site_recalibration("chc_new", champion.predict_risk(local.drop("site")),
                                   local["boolean_value"].cast(pl.Float64).to_numpy())
    good = champion.with_site_layer(SiteLayer().with_site(recal), version=2)
    bad = champion.with_site_layer(SiteLayer().with_site(SiteRecalibration("chc_new", -1.5, 1.0, 1, 1, 0)), version=3)
    tol = PromoteConfig()
    base = score(1, champion, held)
    assert decide("t", score(2, good, held), base, tol).accepted
    assert score(2, good, held).ece < base.ece - 0.02
    refused = decide("t", score(3, bad, held), base, tol)
    assert not refused.accepted and any("ECE" in r for r in refused.reasons)


# ---- empirical-Bayes shrinkage (the default) and closed testing (Vergouwe et al. 2017) -----------------------------


def _loglik(risk, y, a, b):
    eta = a + b * logit(risk)
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


def test_empirical_bayes_keeps_each_departure_in_the_share_its_likelihood_ratio_shows():
    """Known answer: slope 1 + (LR_s - 1) / LR_s * (b - 1), then intercept (LR_a - 1) / LR_a * a(slope)."""
    from chronorisk.models.calibration import fit_logistic_1d

    risk, y = _site(1200, 40, slope=0.7, shift=0.3)
    recal = fit_site_recalibration("s", risk, y)
    x = logit(risk)
    a1, _ = fit_logistic_1d(x, y, fixed_slope=1.0)
    a2, b2 = fit_logistic_1d(x, y)
    lr_s = 2 * (_loglik(risk, y, float(a2), float(b2)) - _loglik(risk, y, float(a1), 1.0))
    slope = 1 + (lr_s - 1) / lr_s * (float(b2) - 1)
    a_at, _ = fit_logistic_1d(x, y, fixed_slope=slope)
    lr_a = 2 * (_loglik(risk, y, float(a_at), slope) - _loglik(risk, y, 0.0, slope))
    assert recal.info["update"] == "intercept_slope"
    assert recal.slope == pytest.approx(slope, rel=1e-6)
    assert recal.intercept == pytest.approx((lr_a - 1) / lr_a * float(a_at), rel=1e-6)
    assert recal.info["lr_slope"] == pytest.approx(lr_s, rel=1e-4)


def test_empirical_bayes_barely_moves_a_calibrated_site_and_takes_a_clear_shift_nearly_whole():
    moved, moved_pseudo = [], []
    for seed in range(60):  # outcomes drawn from the global risks themselves (~90 cases a site)
        rng = np.random.default_rng(2000 + seed)
        risk = sigmoid(rng.normal(-2.0, 1.0, 600))
        y = (rng.random(risk.size) < risk).astype(float)
        recal = fit_site_recalibration("s", risk, y)
        moved.append(np.mean(np.abs(recal.apply(risk) - risk)))
        pseudo = fit_site_recalibration("s", risk, y, update="intercept_slope")
        moved_pseudo.append(np.mean(np.abs(pseudo.apply(risk) - risk)))
        if recal.info["update"] == "none":
            assert (recal.intercept, recal.slope) == (0.0, 1.0)
    # measured 0.0074 against 0.0131 for the pseudo-row prior (risks of 0.15 on average)
    assert np.mean(moved) < 0.65 * np.mean(moved_pseudo) and np.mean(moved) < 0.009
    risk, y = _site(4000, 41, slope=1.0, shift=0.5)  # rate x1.5, about 800 cases: the intercept all but whole
    recal = fit_site_recalibration("s", risk, y)
    assert recal.info["intercept_shrinkage"] > 0.98
    assert recal.apply(risk).sum() == pytest.approx(y.sum(), rel=0.01)


def test_closed_testing_keeps_a_calibrated_site_at_the_tests_level():
    """Outcomes drawn from the global risks themselves: an update is chosen by chance only, about alpha = 5%."""
    updated = 0
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        risk = sigmoid(rng.normal(-2.0, 1.0, 600))
        y = (rng.random(risk.size) < risk).astype(float)
        recal = fit_site_recalibration("s", risk, y, update="closed_test")
        updated += recal.info["update"] != "none"
        if recal.info["update"] == "none":
            assert (recal.intercept, recal.slope) == (0.0, 1.0)
    assert updated <= 200 * 0.05 + 3 * np.sqrt(200 * 0.05 * 0.95)  # binomial(200, 0.05): mean 10, sd 3.1


def test_closed_testing_recalibrates_a_shifted_rate_in_the_large_and_matches_it_exactly():
    """Slope right, rate off (O/E about 1.5): the intercept only, and the local cases equal the expected ones."""
    risk, y = _site(1500, 31, slope=1.0, shift=0.5)
    recal = fit_site_recalibration("s", risk, y, update="closed_test")
    assert recal.info["update"] == "intercept" and recal.slope == 1.0
    assert recal.apply(risk).sum() == pytest.approx(y.sum(), rel=1e-8)
    assert recal.intercept == pytest.approx(float(tm.calibration_intercept(y, risk)), abs=1e-8)


def test_closed_testing_keeps_a_clear_slope_shrunk_by_its_own_likelihood_ratio():
    """True slope 0.5 on 3,000 rows: intercept and slope; slope = 1 + (LR - 1) / LR * (unshrunk - 1); rate exact."""
    risk, y = _site(3000, 32)
    recal = fit_site_recalibration("s", risk, y, update="closed_test")
    info = recal.info
    assert info["update"] == "intercept_slope" and info["p_slope"] < 0.05
    lr = info["lr_slope"]
    assert info["slope_shrinkage"] == pytest.approx((lr - 1) / lr, abs=1e-4)
    assert recal.slope == pytest.approx(1 + (lr - 1) / lr * (info["unshrunk_slope"] - 1), abs=1e-3)
    assert 0.45 < recal.slope < 0.65
    assert recal.apply(risk).sum() == pytest.approx(y.sum(), rel=1e-8)


@pytest.mark.parametrize("update", ["empirical_bayes", "closed_test"])
def test_the_update_on_binned_cells_equals_the_update_on_rows(update):
    rng = np.random.default_rng(33)
    x = np.round(rng.normal(-2.0, 1.2, 3000) / 0.02) * 0.02 + 0.01
    y = (rng.random(x.size) < sigmoid(0.4 + 0.7 * x)).astype(float)
    rows = fit_site_recalibration("s", sigmoid(x), y, update=update)
    cells = fit_site_recalibration_from_cells("s", BinnedScores.from_rows(x, y).as_outcomes(), update=update)
    assert rows.info["update"] == cells.info["update"]
    assert rows.info["lr_slope"] == pytest.approx(cells.info["lr_slope"], rel=1e-4)
    assert (cells.intercept, cells.slope) == pytest.approx((rows.intercept, rows.slope), rel=1e-6)


@pytest.mark.parametrize("update", ["empirical_bayes", "closed_test"])
def test_repeated_rows_of_the_same_patients_are_not_counted_as_new_evidence(update):
    """Each row three times with design effect 3: the same statistics and the same recalibration as once."""
    risk, y = _site(400, 34, slope=0.6, shift=0.3)
    once = fit_site_recalibration("s", risk, y, update=update)
    patients = np.tile(np.arange(400), 3)
    assert design_effect(patients) == 3.0
    thrice = fit_site_recalibration("s", np.tile(risk, 3), np.tile(y, 3), update=update,
                                    design_effect=design_effect(patients))
    assert thrice.info["update"] == once.info["update"]
    assert thrice.info["lr_slope"] == pytest.approx(once.info["lr_slope"], rel=1e-4)
    assert (thrice.intercept, thrice.slope) == pytest.approx((once.intercept, once.slope), rel=1e-5)


def test_resampled_recalibrations_are_seeded_and_spread_around_the_fit():
    risk, y = _site(800, 35, slope=0.6, shift=0.3)
    fit = fit_site_recalibration("s", risk, y)
    a = resampled_site_recalibrations("s", risk, y, draws=60, seed=1)
    b = resampled_site_recalibrations("s", risk, y, draws=60, seed=1)
    assert len(a) == 60 and [r.slope for r in a] == [r.slope for r in b]
    slopes = np.array([r.slope for r in a])
    assert slopes.std() > 0.02 and abs(np.median(slopes) - fit.slope) < 2 * slopes.std()


def test_unknown_update_and_bad_options_are_named():
    risk, y = _site(300, 36)
    with pytest.raises(ValueError, match="update 'both' is not one of empirical_bayes, closed_test, intercept_slope"):
        fit_site_recalibration("s", risk, y, update="both")
    with pytest.raises(ValueError, match="design_effect must be >= 1"):
        fit_site_recalibration("s", risk, y, design_effect=0.5)
    with pytest.raises(ValueError, match="alpha must be between 0 and 1"):
        fit_site_recalibration("s", risk, y, alpha=1.5)
