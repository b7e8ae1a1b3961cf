"""Known-answer tests of the tree-merging strategies on LightGBM model text."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronorisk.federated import strategies as S

PARAMS = {"objective": "binary", "num_leaves": 4, "min_data_in_leaf": 5, "verbose": -1, "num_threads": 1}


def _data(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(size=n) > 0).astype(float)
    return X, y


def _boost(X, y, rounds, init=None):
    return lgb.train(PARAMS, lgb.Dataset(X, y, init_score=init), num_boost_round=rounds)


def test_text_round_trip_predicts_the_same():
    X, y = _data(0)
    b = _boost(X, y, 3)
    m = S.parse_model(b.model_to_string())
    assert m.num_trees == 3
    back = lgb.Booster(model_str=m.to_text())
    np.testing.assert_allclose(back.predict(X, raw_score=True), b.predict(X, raw_score=True))
    assert all(v == "none" for v in back.model_to_string().split("feature_infos=")[1].split("\n")[0].split())


def test_bagging_is_the_size_weighted_average_of_site_updates():
    X, y = _data(1, 600)
    g = _boost(X, y, 2)
    G = S.parse_model(g.model_to_string())
    parts = [(slice(0, 100), 100), (slice(100, 600), 500)]
    updates, boosters = [], []
    for sl, n in parts:
        b = _boost(X[sl], y[sl], 3, init=g.predict(X[sl], raw_score=True))
        updates.append((S.parse_model(b.model_to_string()), n))
        boosters.append(b)
    merged = lgb.Booster(model_str=S.merge_bagging(G, updates).to_text())
    expected = g.predict(X, raw_score=True) + (
        100 * boosters[0].predict(X, raw_score=True) + 500 * boosters[1].predict(X, raw_score=True)
    ) / 600
    np.testing.assert_allclose(merged.predict(X, raw_score=True), expected, atol=1e-12)
    assert merged.num_trees() == 2 + 3 + 3
    # SHAP contributions still add up to the margin after scaling
    contrib = merged.predict(X[:20], pred_contrib=True)
    np.testing.assert_allclose(contrib.sum(axis=1), merged.predict(X[:20], raw_score=True), atol=1e-9)


def test_cyclic_appends_at_full_weight():
    X, y = _data(2)
    a = _boost(X, y, 2)
    b = _boost(X, y, 2, init=a.predict(X, raw_score=True))
    both = S.append_cyclic(S.parse_model(a.model_to_string()), S.parse_model(b.model_to_string()))
    got = lgb.Booster(model_str=both.to_text()).predict(X, raw_score=True)
    np.testing.assert_allclose(got, a.predict(X, raw_score=True) + b.predict(X, raw_score=True), atol=1e-12)
    assert S.append_cyclic(None, S.parse_model(b.model_to_string())).num_trees == 2


@settings(max_examples=25, deadline=None)
@given(st.floats(min_value=-3, max_value=3, allow_nan=False).filter(lambda f: abs(f) > 1e-6))
def test_scaling_a_tree_scales_its_output(factor):
    X, y = _data(3)
    m = S.parse_model(_boost(X, y, 1).model_to_string())
    scaled = S.TreeModel(header=m.header, trees=tuple(S.scale_tree(t, factor) for t in m.trees))
    base = lgb.Booster(model_str=m.to_text()).predict(X, raw_score=True)
    got = lgb.Booster(model_str=scaled.to_text()).predict(X, raw_score=True)
    np.testing.assert_allclose(got, factor * base, rtol=1e-9, atol=1e-12)


def test_models_over_different_features_do_not_merge():
    X, y = _data(4)
    a = S.parse_model(_boost(X, y, 1).model_to_string())
    b = S.parse_model(_boost(X[:, :2], y, 1).model_to_string())
    with pytest.raises(S.ModelTextError, match="feature"):
        S.merge_bagging(a, [(b, 10)])
    with pytest.raises(S.ModelTextError, match="feature"):
        S.append_cyclic(a, b)


def test_bad_inputs_are_refused():
    with pytest.raises(S.ModelTextError, match="not a LightGBM text model"):
        S.parse_model("hello")
    X, y = _data(5)
    m = S.parse_model(_boost(X, y, 1).model_to_string())
    with pytest.raises(S.ModelTextError, match="positive"):
        S.merge_bagging(None, [(m, 0)])
    with pytest.raises(S.ModelTextError, match="at least one"):
        S.merge_bagging(m, [])


def test_site_weights_and_cyclic_order():
    assert S.site_weights({"a": 1, "b": 3}) == {"a": 0.25, "b": 0.75}
    assert S.cyclic_order(["c", "a", "b"], 0) == ["a", "b", "c"]
    assert S.cyclic_order(["c", "a", "b"], 1) == ["b", "c", "a"]
    assert S.cyclic_order([], 3) == []
