"""Promotion rule: known answers on hand-made figures (the CLI end to end is in test_promote_cli.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chronorisk.training.config import PromoteConfig
from chronorisk.training.promote import Figures, decide, render

TOL = PromoteConfig(auroc_tolerance=0.005, ece_tolerance=0.01, brier_tolerance=0.002)


def fig(version: int, auroc: float, ece: float, n: int = 1000, pos: int = 100, brier: float = 0.08) -> Figures:
    return Figures(version=version, n=n, n_positive=pos, auroc=auroc, ece=ece, brier=brier)


def test_first_promotion_needs_no_champion():
    d = decide("t", fig(1, 0.70, 0.05), None, TOL)
    assert d.accepted and d.reasons == ("no champion yet",)


@pytest.mark.parametrize(
    ("cand", "champ", "accepted"),
    [
        ((0.800, 0.020), (0.800, 0.020), True),  # same
        ((0.810, 0.010), (0.800, 0.020), True),  # better on both
        ((0.797, 0.020), (0.800, 0.020), True),  # AUROC lower, within 0.005
        ((0.790, 0.020), (0.800, 0.020), False),  # AUROC lower by 0.010
        ((0.800, 0.028), (0.800, 0.020), True),  # ECE higher, within 0.01
        ((0.800, 0.035), (0.800, 0.020), False),  # ECE higher by 0.015
        ((0.900, 0.040), (0.800, 0.020), False),  # much better AUROC does not buy worse calibration
    ],
)
def test_tolerances(cand, champ, accepted):
    d = decide("t", fig(2, *cand), fig(1, *champ), TOL)
    assert d.accepted is accepted


@pytest.mark.parametrize(
    ("cand_brier", "accepted"),
    [
        (0.0815, True),  # higher by 0.0015, within 0.002
        (0.0790, True),  # better
        (0.0830, False),  # higher by 0.003
    ],
)
def test_brier_tolerance_with_auroc_and_ece_unchanged(cand_brier, accepted):
    d = decide("t", fig(2, 0.8, 0.02, brier=cand_brier), fig(1, 0.8, 0.02, brier=0.08), TOL)
    assert d.accepted is accepted
    if not accepted:
        assert d.reasons == ("Brier 0.0830 is above the champion's 0.0800 by 0.0030 (tolerance 0.002)",)


def test_refusal_names_each_failed_figure_with_both_values():
    d = decide("t", fig(2, 0.75, 0.05), fig(1, 0.80, 0.02), TOL)
    assert not d.accepted
    assert len(d.reasons) == 2
    assert "AUROC 0.7500 is below the champion's 0.8000 by 0.0500" in d.reasons[0]
    assert "ECE 0.0500 is above the champion's 0.0200 by 0.0300" in d.reasons[1]


def test_undefined_candidate_figures_are_refused():
    d = decide("t", fig(2, math.nan, 0.01, pos=0), fig(1, 0.8, 0.02), TOL)
    assert not d.accepted and "undefined" in d.reasons[0]
    assert not decide("t", fig(1, math.nan, 0.01, pos=0), None, TOL).accepted


def test_repromoting_the_champion_is_a_no_op_success():
    d = decide("t", fig(3, 0.7, 0.1), fig(3, 0.7, 0.1), TOL)
    assert d.accepted and "already the champion" in d.reasons[0]


def test_render_shows_both_columns_and_the_verdict():
    text = render(decide("t", fig(2, 0.75, 0.05), fig(1, 0.80, 0.02), TOL))
    assert "candidate" in text and "champion" in text
    assert "0.7500" in text and "0.8000" in text and "0.0500" in text and "0.0200" in text
    assert "REFUSED" in text
    assert "PROMOTED" in render(decide("t", fig(1, 0.75, 0.05), None, TOL))


unit = st.floats(0, 1, allow_nan=False)


@given(a1=unit, e1=unit, b1=unit, a2=unit, e2=unit, b2=unit)
def test_never_worse_beyond_tolerance_when_accepted(a1, e1, b1, a2, e2, b2):
    d = decide("t", fig(2, a2, e2, brier=b2), fig(1, a1, e1, brier=b1), TOL)
    assert d.accepted == (
        a2 >= a1 - TOL.auroc_tolerance and e2 <= e1 + TOL.ece_tolerance and b2 <= b1 + TOL.brier_tolerance
    )
    # a candidate identical to the champion is always accepted
    assert decide("t", fig(2, a1, e1, brier=b1), fig(1, a1, e1, brier=b1), TOL).accepted


# ---- on real bundles: the champion is scored with its own feature spec, on the same rows -----------

TASK = "complication_1y"


def test_champion_with_another_spec_is_scored_on_the_same_rows(generated_meds_600, tmp_path):
    from chronorisk.errors import ChronoriskError
    from chronorisk.features.config import FeatureConfig
    from chronorisk.models.config import ModelConfig
    from chronorisk.paths import WorkPaths
    from chronorisk.training import registry, tracking
    from chronorisk.training.config import TrainConfig
    from chronorisk.training.promote import figures, promote_task
    from chronorisk.training.train import HELD_OUT, compute_task_data, same_spec, train_task

    paths = WorkPaths(tmp_path / "work")
    track = tracking.configure_tracking(paths, experiment="promote-test")
    model_config = ModelConfig(num_boost_round=60, early_stopping_rounds=10)
    data_a = compute_task_data(generated_meds_600, TASK, FeatureConfig(windows_days=[365]))  # one window: fewer columns
    data_b = compute_task_data(generated_meds_600, TASK, FeatureConfig())
    assert not same_spec(data_a.spec, data_b.spec)
    bundles = []
    for tag, data in (("a", data_a), ("b", data_b)):
        bundle = train_task(data, model_config, TrainConfig(allow_unfit=True)).bundle  # 600 patients
        bundle.save(tmp_path / tag)
        bundles.append(bundle)
        registry.register_bundle(track, tmp_path / tag, task=TASK)
    registry.set_alias(track, TASK, "champion", 1)

    decision = promote_task(track, paths, TASK, data_b, PromoteConfig(), meds_root=generated_meds_600)
    held_a, held_b = data_a.split(HELD_OUT), data_b.split(HELD_OUT)
    assert decision.candidate.version == 2 and decision.champion.version == 1
    assert decision.candidate.n == decision.champion.n == held_b.height == held_a.height
    expected = figures(1, held_a["boolean_value"].to_numpy(), bundles[0].predict_risk(held_a))
    assert decision.champion.auroc == pytest.approx(expected.auroc)
    assert decision.champion.ece == pytest.approx(expected.ece)
    alias = registry.get_version_by_alias(track, TASK, "champion").version
    assert alias == (2 if decision.accepted else 1)
    record = (paths.reports / f"promotion_{TASK}.json").read_text()
    assert '"accepted"' in record

    # without MEDS data the champion's features cannot be made: a clear error, nothing moved
    registry.set_alias(track, TASK, "champion", 1)
    tables_only = dataclasses.replace(data_b, meds_root=None)  # e.g. feature tables copied elsewhere
    with pytest.raises(ChronoriskError, match="another feature spec"):
        promote_task(track, paths, TASK, tables_only, PromoteConfig(), meds_root=None)
    assert registry.get_version_by_alias(track, TASK, "champion").version == 1
