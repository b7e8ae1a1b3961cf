"""The logistic model: the scikit-learn pipeline's numbers, exact linear contributions, bytes that round-trip,
and a bundle that scores and explains like a LightGBM one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from models_support import NAMES, frame, make_spec, small_config

from chronorisk.models.bundle import BundleError, ModelBundle
from chronorisk.models.config import TierThresholds
from chronorisk.models.logistic import LinearModel, _pipeline, informative_columns
from chronorisk.models.risk_model import RiskModel


def test_predictions_equal_the_sklearn_pipeline_and_contributions_are_exact(data):
    X, y, _ = data["train"]
    Xt, _, _ = data["test"]
    X = X.copy()
    X[:, 6] = 3.0  # a constant column: coefficient 0, and no effect on the others
    model = LinearModel.fit(X, y, NAMES, C=0.5)
    used = informative_columns(X)
    assert 6 not in used and model.coef[6] == 0.0
    pipe = _pipeline(0.5, X[:, used].shape).fit(X[:, used], y)
    np.testing.assert_allclose(model.predict(Xt, raw_score=True), pipe.decision_function(Xt[:, used]), atol=1e-10)
    contrib = model.predict(Xt, pred_contrib=True)
    assert contrib.shape == (Xt.shape[0], len(NAMES) + 1)
    np.testing.assert_allclose(contrib.sum(axis=1), model.predict(Xt, raw_score=True), atol=1e-12)
    # the base value is the intercept, the mean margin of the training rows (every column centered)
    assert np.allclose(contrib[:, -1], model.intercept)
    assert abs(model.predict(X, raw_score=True).mean() - model.intercept) < 1e-8
    # a feature at its training mean (imputed value not missing) contributes nothing
    row = np.nanmean(X, axis=0, keepdims=True)
    row[0, 1] = model.mean[1]
    assert abs(model.predict(row, pred_contrib=True)[0, 0]) < 1e-12
    # missing hba1c: the median plus its missing indicator's part, in hba1c's own column
    gone = Xt[np.isnan(Xt[:, 1])][:1]
    filled = gone.copy()
    filled[0, 1] = model.median[1]
    assert model.ind_index.tolist() == [1, 2]
    delta = model.predict(gone, pred_contrib=True)[0, 1] - model.predict(filled, pred_contrib=True)[0, 1]
    assert abs(delta) > 0


def test_text_round_trip_is_byte_identical_and_c_is_chosen_by_grouped_cv(data):
    X, y, _ = data["train"]
    groups = np.arange(y.size) // 2
    a = LinearModel.fit(X, y, NAMES, groups=groups, Cs=(0.001, 1.0))
    b = LinearModel.fit(X, y, NAMES, groups=groups, Cs=(0.001, 1.0))
    assert a.model_to_string() == b.model_to_string()
    assert LinearModel.from_string(a.model_to_string()).model_to_string() == a.model_to_string()
    tried = a.info["cv_log_loss_by_C"]
    assert set(tried) == {"0.001", "1.0"} and a.info["C"] == float(min(tried, key=tried.get))


def test_logistic_bundle_saves_loads_scores_and_explains(data, task, tmp_path):
    X, y, _ = data["train"]
    Xv, yv, _ = data["valid"]
    Xt, yt, _ = data["test"]
    model = RiskModel(small_config()).fit_logistic(X, y, NAMES).fit_calibration(Xv, yv)
    bundle = ModelBundle.from_model(model, make_spec(), task, TierThresholds(), version=3)
    assert bundle.kind == "logistic" and bundle.metadata["n_trees"] == 0
    bundle.save(tmp_path / "b")
    files = {p.name for p in (tmp_path / "b").iterdir()}
    assert "linear.json" in files and "booster.txt" not in files
    back = ModelBundle.load(tmp_path / "b")
    assert back.kind == "logistic"
    rows = frame(Xt[:50])
    np.testing.assert_allclose(back.predict_risk(rows), bundle.predict_risk(rows))
    from chronorisk.training.metrics import auroc

    assert auroc(yt, back.predict_risk(frame(Xt))) > 0.75
    factors = back.explain(rows, top_k=3)
    assert len(factors) == 50 and all(len(f) <= 3 for f in factors)
    first = factors[0][0]
    assert {"feature", "display", "value", "direction", "contribution", "text"} <= set(first)
    c = back.contributions(rows)
    np.testing.assert_allclose(c.sum(axis=1), back.predict_raw(rows), atol=1e-9)
    # monitoring reads importances through the booster methods
    imp = dict(zip(back.booster.feature_name(), back.booster.feature_importance("gain"), strict=True))
    assert imp["hba1c_last"] > imp["noise_a"]
    edited = json.loads((tmp_path / "b" / "linear.json").read_text())
    edited["intercept"] += 1
    (tmp_path / "b" / "linear.json").write_text(json.dumps(edited))
    with pytest.raises(BundleError, match=r"linear\.json is corrupt"):
        ModelBundle.load(tmp_path / "b")
