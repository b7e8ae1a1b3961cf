"""The site's raw-score cache: reusing the last global model's scores gives the same numbers as scoring afresh."""

from __future__ import annotations

import dataclasses

import numpy as np
from fed_helpers import LGB, make_site

from chronorisk.federated import strategies
from chronorisk.federated.site import checkpoint_losses, evaluate_table, model_raw, train_on_table


def _grow(table, model: str | None, trees: int, seed: int, **params) -> str:
    """One bagging round of one site: its new trees appended to the model at full weight."""
    _, new, _ = train_on_table(table, model, trees, {**LGB, "seed": seed, **params})
    return strategies.merge_bagging(strategies.parse_model(model) if model else None,
                                    [(strategies.parse_model(new), 1)]).to_text()


def test_cached_raw_scores_equal_fresh_ones_across_rounds_and_a_cut(tmp_path):
    fresh = make_site(1500, 0.0, 0.0, 11)
    cached = dataclasses.replace(fresh, raw_cache=tmp_path / "t.raw.npz")
    m1 = _grow(fresh, None, 8, 1)
    m2 = _grow(fresh, m1, 8, 2)
    m3 = _grow(fresh, m2, 8, 3)
    for model in (m1, m2, m3):  # the rounds a site sees, in order: each reuses the one before
        np.testing.assert_allclose(model_raw(cached, model), model_raw(fresh, model), rtol=0, atol=1e-9)
    assert (tmp_path / "t.raw.npz").is_file()
    # checkpoints of the last round and the model cut inside it (early stopping)
    n2, n3 = strategies.parse_model(m2).num_trees, strategies.parse_model(m3).num_trees
    checkpoints = list(range(n2 + 1, n3 + 1))
    got, rows = checkpoint_losses(cached, m3, checkpoints)
    want, rows_fresh = checkpoint_losses(fresh, m3, checkpoints)
    assert rows == rows_fresh > 0
    np.testing.assert_allclose(got, want, rtol=1e-12)
    cut = strategies.truncate(strategies.parse_model(m3), n2 + 3).to_text()
    a, _, _ = evaluate_table(cached, cut)
    b, _, _ = evaluate_table(fresh, cut)
    for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-9)


def test_a_different_model_does_not_reuse_the_cache(tmp_path):
    table = dataclasses.replace(make_site(800, 0.2, 0.1, 12), raw_cache=tmp_path / "t.raw.npz")
    fresh = dataclasses.replace(table, raw_cache=None)
    m_a = _grow(fresh, None, 6, 1)
    m_b = _grow(fresh, None, 6, 1, learning_rate=0.3)  # other trees, same count
    model_raw(table, m_a)
    np.testing.assert_allclose(model_raw(table, m_b), model_raw(fresh, m_b), rtol=0, atol=1e-9)
    assert not np.allclose(model_raw(fresh, m_a), model_raw(fresh, m_b))
