"""RiskModel: fitting, early stopping, validation, continuation, tuning, contributions vs shap, tiers."""

from __future__ import annotations

import numpy as np
import pytest
from models_support import NAMES, frame, make_data, small_config

from chronorisk.models.config import ModelConfig, TierThresholds
from chronorisk.models.risk_model import RiskModel, tuning_candidates
from chronorisk.models.tiers import tier_of
from chronorisk.training import metrics as M


def test_fitted_model_ranks_close_to_the_truth(fitted, data):
    Xt, yt, rt = data["test"]
    p = fitted.predict_risk(Xt)
    assert M.auroc(yt, p) > 0.95 * M.auroc(yt, rt)
    assert 0.7 < M.calibration_slope(yt, p) < 1.3
    assert fitted.calibrator_.method in ("platt", "isotonic")
    assert fitted.feature_names_ == NAMES
    assert fitted.n_trees_ == fitted.best_iteration_


def test_early_stopping_stops_and_keeps_the_best_trees():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4))
    y = (rng.random(3000) < 0.2).astype(float)  # pure noise: validation loss gets worse quickly
    Xv = rng.normal(size=(1500, 4))
    yv = (rng.random(1500) < 0.2).astype(float)
    model = RiskModel(small_config(num_boost_round=500, early_stopping_rounds=10))
    model.fit_booster(X, y, Xv, yv, ["a", "b", "c", "d"])
    assert model.best_iteration_ < 100
    assert model.n_trees_ == model.best_iteration_  # trees after the best iteration are dropped


def test_polars_and_pandas_inputs_select_columns_by_name(fitted, data):
    Xt, _, _ = data["test"]
    df = frame(Xt[:50])
    shuffled = df.select(list(reversed(df.columns)))
    expected = fitted.predict_risk(Xt[:50].astype(np.float32))
    np.testing.assert_allclose(fitted.predict_risk(shuffled), expected)
    np.testing.assert_allclose(fitted.predict_risk(df.to_pandas()), expected)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda X, y: (X, y[:-1]), "labels for"),
        (lambda X, y: (X, np.zeros_like(y)), "both outcomes"),
        (lambda X, y: (X, y * 2), "0/1"),
        (lambda X, y: (X[:, :3], y), "columns"),
        (lambda X, y: (np.where(X > 80, np.inf, X), y), "infinite"),
    ],
)
def test_bad_training_input_is_named(data, mutate, message):
    X, y, _ = data["valid"]
    Xb, yb = mutate(X.copy(), y.copy())
    with pytest.raises(ValueError, match=message):
        RiskModel(small_config()).fit(Xb, yb, X, y, NAMES)


def test_missing_named_column_is_reported(fitted, data):
    df = frame(data["test"][0][:5]).drop("hba1c_last")
    with pytest.raises(ValueError, match="hba1c_last"):
        fitted.predict_risk(df)


def test_unfitted_model_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        RiskModel().predict_raw(np.zeros((1, 3)))


def test_continue_boosting_from_a_global_model(data):
    """Federated bagging: a site boosts more trees on top of the current global model."""
    X, y, _ = data["train"]
    Xv, yv, _ = data["valid"]
    first = RiskModel(small_config(num_boost_round=15)).fit_booster(X, y, Xv, yv, NAMES, early_stopping=False)
    assert first.n_trees_ == 15
    more = RiskModel(small_config(num_boost_round=10)).fit_booster(
        X[:3000], y[:3000], Xv, yv, NAMES, init_model=first.booster_, early_stopping=False,
        keep_training_booster=True,
    )
    assert more.n_trees_ == 25
    # the first 15 trees are the global model's: same margins when only they are used
    np.testing.assert_allclose(
        more.booster_.predict(Xv[:20], raw_score=True, num_iteration=15),
        first.booster_.predict(Xv[:20], raw_score=True),
        rtol=1e-10,
    )
    # a model string works as init_model too
    again = RiskModel(small_config(num_boost_round=5)).fit_booster(
        X, y, Xv, yv, NAMES, init_model=first.booster_.model_to_string(), early_stopping=False
    )
    assert again.n_trees_ == 20


def test_tuning_tries_the_configured_parameters_first_and_keeps_the_best(data):
    X, y, _ = data["train"]
    Xv, yv, _ = data["valid"]
    config = small_config(num_boost_round=60)
    cands = tuning_candidates(config, 3)
    assert cands[0] == config.lightgbm_params()
    assert cands == tuning_candidates(config, 3)  # seeded
    model = RiskModel(config, tune=True, tune_trials=3).fit(X, y, Xv, yv, NAMES)
    losses = [t["valid_log_loss"] for t in model.tuning_trials_]
    assert len(losses) == 3
    assert model.valid_log_loss_ == pytest.approx(min(losses))


def test_pred_contrib_sums_to_the_margin_and_agrees_with_shap(fitted, data):
    import shap

    Xt, _, _ = data["test"]
    rows = Xt[:40]
    contrib = fitted.contributions(rows)
    assert contrib.shape == (40, len(NAMES) + 1)
    np.testing.assert_allclose(contrib.sum(axis=1), fitted.predict_raw(rows), rtol=1e-9, atol=1e-9)
    explainer = shap.TreeExplainer(fitted.booster_)
    sv = explainer.shap_values(rows)
    sv = sv[1] if isinstance(sv, list) else sv
    np.testing.assert_allclose(contrib[:, :-1], sv, atol=1e-6)
    assert np.ravel(explainer.expected_value)[-1] == pytest.approx(contrib[0, -1], abs=1e-6)


def test_tiers_from_thresholds():
    t = TierThresholds(medium=0.1, high=0.25)
    assert list(tier_of([0.0, 0.0999, 0.1, 0.2499, 0.25, 1.0], t)) == [
        "low", "low", "medium", "medium", "high", "high"
    ]
    with pytest.raises(ValueError, match="risk"):
        tier_of([np.nan], t)
    with pytest.raises(ValueError, match="below high"):
        TierThresholds(medium=0.3, high=0.2)


def test_config_merges_lightgbm_defaults_and_refuses_reserved_keys():
    config = ModelConfig(lightgbm={"num_leaves": 7})
    assert config.lightgbm["num_leaves"] == 7 and config.lightgbm["num_threads"] == 2
    with pytest.raises(ValueError, match="num_boost_round"):
        ModelConfig(lightgbm={"num_iterations": 10})
    with pytest.raises(ValueError, match="binary"):
        ModelConfig(lightgbm={"objective": "regression"})
    assert ModelConfig().tier_thresholds("a_task_from_elsewhere") == TierThresholds()


def test_data_without_missingness_still_trains():
    X, y, _ = make_data(2000, 7, missing=0.0)
    Xv, yv, _ = make_data(1000, 8, missing=0.0)
    model = RiskModel(small_config(num_boost_round=30)).fit(X, y, Xv, yv, NAMES)
    assert model.predict_risk(Xv).shape == (1000,)


def test_group_folds_keep_a_patients_rows_together_and_are_seeded():
    from chronorisk.models.risk_model import group_folds

    groups = np.repeat(np.arange(200), 3)
    folds = group_folds(groups, 5, seed=4)
    assert all(np.unique(folds[groups == g]).size == 1 for g in range(200))
    assert np.bincount(folds).tolist() == [120] * 5  # 40 patients of 3 rows each per fold
    assert np.array_equal(folds, group_folds(groups, 5, seed=4))
    assert not np.array_equal(folds, group_folds(groups, 5, seed=5))


def test_cross_fitted_margins_never_come_from_a_model_that_saw_the_patient():
    """On pure noise an in-sample margin still ranks its own rows (memorized); an out-of-fold one cannot."""
    rng = np.random.default_rng(7)
    n = 3000
    X = rng.normal(size=(n, len(NAMES)))
    y = (rng.random(n) < 0.3).astype(float)
    groups = np.arange(n) // 2  # two rows per patient, identical features: memorizing one predicts the other
    X[1::2] = X[0::2]
    y[1::2] = y[0::2]
    config = small_config(lightgbm={"min_data_in_leaf": 2, "num_leaves": 31})
    model = RiskModel(config).fit_booster(X, y, X[:500], y[:500], NAMES, num_boost_round=60, early_stopping=False)
    in_sample = M.auroc(y, model.predict_raw(X))
    oof = model.cross_fitted_margins(X, y, groups, folds=5, seed=0)
    assert in_sample > 0.8
    assert abs(M.auroc(y, oof) - 0.5) < 0.05
    model.fit_calibration_margins(oof, y, rows="cross_fit")
    assert model.calibrator_.info["rows"] == "cross_fit" and model.calibrator_.info["n"] == n
