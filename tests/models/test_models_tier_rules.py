"""Tier thresholds by a user-chosen rule, fitted on validation rows, and what each tier means."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from chronorisk.errors import InputError
from chronorisk.models.config import ModelConfig, TierRule, TierThresholds
from chronorisk.models.model_card import render_model_card
from chronorisk.models.tiers import fit_thresholds, tier_of, tier_table


def rows(n: int = 1000, seed: int = 3):
    rng = np.random.default_rng(seed)
    risk = rng.uniform(0.001, 0.6, n)
    y = (rng.uniform(0, 1, n) < risk).astype(float)
    return y, risk


def test_top_percent_flags_that_share_of_the_validation_patients():
    y, risk = rows()
    t = fit_thresholds(TierRule(rule="top_percent", high=5, medium=20), y, risk)
    tiers = tier_of(risk, t)
    assert (tiers == "high").mean() == pytest.approx(0.05, abs=0.002)
    assert np.isin(tiers, ["medium", "high"]).mean() == pytest.approx(0.20, abs=0.002)
    table = {r["tier"]: r for r in tier_table(y, risk, t)}
    assert table["high"]["share_flagged"] == pytest.approx(0.05, abs=0.002)


def test_a_sensitivity_target_catches_that_share_of_the_outcomes():
    y, risk = rows()
    t = fit_thresholds(TierRule(rule="sensitivity", high=0.5, medium=0.8), y, risk)
    table = {r["tier"]: r for r in tier_table(y, risk, t)}
    assert table["high"]["sensitivity"] >= 0.5 and table["high"]["sensitivity"] < 0.5 + 2 / y.sum()
    assert table["medium"]["sensitivity"] >= 0.8 and table["medium"]["sensitivity"] < 0.8 + 2 / y.sum()
    # PPV by hand at the high threshold
    flagged = risk >= t.high
    assert table["high"]["ppv"] == pytest.approx(y[flagged].mean())
    assert table["high"]["n_flagged"] == flagged.sum()


def test_fixed_cutoffs_stay_and_rules_are_checked():
    y, risk = rows()
    fixed = TierThresholds(medium=0.1, high=0.25)
    assert fit_thresholds(fixed, y, risk) is fixed
    assert ModelConfig().tier_rule("onset_2y") == fixed
    rule = TierRule(rule="top_percent", high=2, medium=10)
    assert ModelConfig(tier_rules={"onset_2y": rule}).tier_rule("onset_2y") == rule
    with pytest.raises(ValidationError, match="high"):
        TierRule(rule="top_percent", high=20, medium=5)
    with pytest.raises(ValidationError, match="< 1"):
        TierRule(rule="sensitivity", high=0.5, medium=1.5)
    with pytest.raises(InputError, match="at least 10 validation outcomes"):
        fit_thresholds(TierRule(rule="sensitivity", high=0.5, medium=0.8), np.zeros(50), risk[:50])


def test_the_model_card_reports_each_tier():
    y, risk = rows()
    t = fit_thresholds(TierRule(rule="top_percent", high=5, medium=20), y, risk)
    meta = {"task": "onset_2y", "name": "m", "version": "3", "tiers": t.model_dump(),
            "tier_rule": {"rule": "top_percent", "high": 5, "medium": 20},
            "metrics": {"tiers": tier_table(y, risk, t)}}
    card = render_model_card(meta)
    assert "## Risk tiers" in card and "top 5% flagged high" in card
    high = next(line for line in card.splitlines() if line.startswith("| high |"))
    share, sensitivity, ppv = (float(c.strip().rstrip("%")) for c in high.split("|")[3:6])
    assert share == pytest.approx(5.0, abs=0.2) and 0 < sensitivity < 100 and 0 < ppv <= 100
