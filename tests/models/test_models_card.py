"""Model card: sections and figures come from the bundle metadata and evaluation records."""

from __future__ import annotations

import numpy as np
import polars as pl

from chronorisk.models.model_card import render_model_card
from chronorisk.training import evaluation as E


def test_model_card_sections_and_figures(fitted, spec, task, tmp_path):
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.models.config import TierThresholds

    bundle = ModelBundle.from_model(fitted, spec, task, TierThresholds(), version=5, data_fingerprint="sha256:ab")
    bundle.save(tmp_path / "b")
    rng = np.random.default_rng(0)
    n = 2000
    true = 1 / (1 + np.exp(-rng.normal(-2, 1, n)))
    df = pl.DataFrame({"y": rng.random(n) < true, "risk": true, "site": rng.choice(["north", "south"], n),
                       "sex": rng.choice(["F", "M"], n), "age": rng.uniform(20, 90, n), "true_risk": true})
    recs = E.evaluate(df, task="complication_1y", threshold=0.25, mode="realistic", n_boot=20)
    card = render_model_card(bundle.metadata, recs, task=task, importance={"HbA1c": 0.5, "Age": 0.3})
    for heading in ("# Model card: chronorisk-complication_1y (version 5)", "## Intended use", "## Population",
                    "## Data", "## Metrics per site", "## Calibration", "## Fairness: by sex and age band",
                    "## Most influential features", "## Limitations"):
        assert heading in card, heading
    overall = recs[0]
    assert f"{overall['auroc']:.3f} ({overall['auroc_lo']:.3f}-{overall['auroc_hi']:.3f})" in card
    assert "| north |" in card and "| sex F |" in card and "| age 70+ |" in card
    assert "sha256:ab" in card and "diabetes, hypertension" in card
    assert "generated (synthetic)" in card


def test_model_card_of_a_federated_bundle():
    meta = {"name": "chronorisk-onset_2y", "version": "1", "task": "onset_2y", "training": "federated",
            "strategy": "bagging", "site_sizes": {"north": 100, "south": 50}}
    card = render_model_card(meta, [])
    assert "- training: federated (bagging)" in card and "north (100 rows)" in card
    assert "No evaluation records." in card
