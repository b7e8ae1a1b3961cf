"""Promotion rule: known answers on hand-made figures (the CLI end to end is in test_promote_cli.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chronorisk.training.config import PromoteConfig
from chronorisk.training.promote import Figures, decide, render

TOL = PromoteConfig(auroc_tolerance=0.005, ece_tolerance=0.01)


def fig(version: int, auroc: float, ece: float, n: int = 1000, pos: int = 100) -> Figures:
    return Figures(version=version, n=n, n_positive=pos, auroc=auroc, ece=ece, brier=0.08)


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


@given(a1=unit, e1=unit, a2=unit, e2=unit)
def test_never_worse_beyond_tolerance_when_accepted(a1, e1, a2, e2):
    d = decide("t", fig(2, a2, e2), fig(1, a1, e1), TOL)
    assert d.accepted == (a2 >= a1 - TOL.auroc_tolerance and e2 <= e1 + TOL.ece_tolerance)
    # a candidate identical to the champion is always accepted
    assert decide("t", fig(2, a1, e1), fig(1, a1, e1), TOL).accepted
