"""Training fits a task's tier rule on its tuning rows and stores the thresholds and their meaning."""

from __future__ import annotations

import numpy as np
import pytest

TASK = "onset_2y"


def test_a_top_percent_rule_is_fitted_on_the_tuning_rows_and_reported(generated_meds_600, tmp_path):
    from chronorisk.features.config import FeatureConfig
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.models.config import ModelConfig, TierRule
    from chronorisk.models.model_card import render_model_card
    from chronorisk.training.config import TrainConfig
    from chronorisk.training.train import compute_task_data, train_task, training_rows

    data = compute_task_data(generated_meds_600, TASK, FeatureConfig(windows_days=[365]))
    config = ModelConfig(num_boost_round=40, early_stopping_rounds=10,
                         tier_rules={TASK: TierRule(rule="top_percent", high=5, medium=20)})
    bundle = train_task(data, config, TrainConfig()).bundle
    bundle.save(tmp_path / "b")
    loaded = ModelBundle.load(tmp_path / "b")
    _, tuning = training_rows(data)
    risk = loaded.predict_risk(tuning.select(data.feature_names))
    # the stored thresholds flag the chosen shares of the tuning rows
    assert np.mean(risk >= loaded.tiers.high) == pytest.approx(0.05, abs=0.02)
    assert np.mean(risk >= loaded.tiers.medium) == pytest.approx(0.20, abs=0.03)
    assert loaded.tiers != config.tier_thresholds(TASK)  # not the fixed cut-offs
    rows = {r["tier"]: r for r in loaded.metadata["metrics"]["tiers"]}
    y = tuning["boolean_value"].to_numpy().astype(float)
    flagged = risk >= loaded.tiers.high
    assert rows["high"]["share_flagged"] == pytest.approx(flagged.mean())
    assert rows["high"]["sensitivity"] == pytest.approx(y[flagged].sum() / y.sum())
    assert loaded.metadata["tier_rule"] == {"rule": "top_percent", "high": 5.0, "medium": 20.0}
    card = render_model_card(loaded.metadata)
    assert "## Risk tiers" in card and "top 5% flagged high" in card
