"""Explanations on a hand-made spec: the patient's value, its date, direction, ranking and wording."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest
from models_support import NAMES, PREDICTION_TIME, frame

from chronorisk.models.explain import Explainer, format_value, measured_dates, sentence

COL = {n: i for i, n in enumerate(NAMES)}


def patient(**values) -> np.ndarray:
    row = {"age": 55.0, "hba1c_last": 6.5, "hba1c_days_since_last": 120.0, "sbp_last": 130.0,
           "sbp_days_since_last": 30.0, "noise_a": 0.0, "noise_b": 0.0, **values}
    return np.array([[row[n] for n in NAMES]], dtype=float)


@pytest.fixture(scope="module")
def explainer(fitted, spec):
    return Explainer(fitted.booster_, spec.feature_names, spec.features)


def test_value_date_and_direction_of_a_high_hba1c(explainer):
    X = patient(hba1c_last=11.0, hba1c_days_since_last=121.0)
    factors = explainer.factors(X, PREDICTION_TIME, top_k=3)[0]
    top = factors[0]
    assert top["feature"] == "hba1c_last"
    assert top["display"] == "HbA1c" and top["unit"] == "%"
    assert top["value"] == 11.0
    assert top["date"] == "2026-03-02"  # 2026-07-01 minus 121 days
    assert top["direction"] == "raises" and top["contribution"] > 0
    assert top["text"] == "HbA1c 11 %, last measured 2026-03-02, raises risk"


def test_young_age_lowers_risk_and_has_no_date(explainer):
    factors = explainer.factors(patient(age=22.0), PREDICTION_TIME, top_k=7)[0]
    age = next(f for f in factors if f["feature"] == "age")
    assert age["direction"] == "lowers" and age["contribution"] < 0
    assert age["date"] is None
    assert age["text"] == "Age 22 years, lowers risk"


def test_missing_value_is_not_recorded_without_a_date(explainer):
    X = patient(hba1c_last=np.nan, hba1c_days_since_last=np.nan)
    factors = explainer.factors(X, PREDICTION_TIME, top_k=7)[0]
    hba1c = [f for f in factors if f["feature"] == "hba1c_last"]
    for f in hba1c:
        assert f["value"] is None and f["date"] is None
        assert f["text"] == f"HbA1c not recorded, {f['direction']} risk"


def test_factors_are_the_largest_contributions_in_order(explainer, fitted, data):
    X = data["test"][0][:30]
    contrib = fitted.booster_.predict(X, pred_contrib=True)[:, :-1]
    factors = explainer.factors(X, PREDICTION_TIME, top_k=3)
    for r, row in enumerate(factors):
        want = [NAMES[j] for j in np.argsort(-np.abs(contrib[r]), kind="stable")[:3] if contrib[r, j] != 0]
        assert [f["feature"] for f in row] == want
        for f in row:
            j = COL[f["feature"]]
            assert f["contribution"] == pytest.approx(contrib[r, j])
            assert f["direction"] == ("raises" if contrib[r, j] > 0 else "lowers")
            if not np.isnan(X[r, j]):
                assert f["value"] == pytest.approx(X[r, j])


def test_batch_equals_one_row_at_a_time_and_dates_per_row(explainer, data):
    X = data["test"][0][:12]
    times = np.array([np.datetime64("2025-01-01") + np.timedelta64(30 * i, "D") for i in range(12)])
    batch = explainer.factors(X, times, top_k=4)
    for r in range(12):
        one = explainer.factors(X[r : r + 1], times[r], top_k=4)[0]
        assert [(f["feature"], f["date"], f["text"]) for f in one] == [
            (f["feature"], f["date"], f["text"]) for f in batch[r]
        ]
        assert [f["contribution"] for f in one] == pytest.approx([f["contribution"] for f in batch[r]], rel=1e-9)


def test_without_prediction_time_there_are_no_dates(explainer):
    factors = explainer.factors(patient(hba1c_last=11.0), None, top_k=2)[0]
    assert all(f["date"] is None for f in factors)
    assert factors[0]["text"] == "HbA1c 11 %, raises risk"


def test_measured_dates_subtract_days():
    days = np.array([[0.0, 1.0, 365.0, np.nan]])
    got = measured_dates(datetime(2024, 3, 1), days, 1)[0]
    assert [str(d) for d in got] == ["2024-03-01", "2024-02-29", "2023-03-02", "NaT"]


@pytest.mark.parametrize(
    "value, text",
    [(9.1, "9.1"), (142.0, "142"), (141.6, "142"), (0.35, "0.35"), (12.34, "12.3"), (1234.5, "1234"),
     (0.0123, "0.012"), (-1.5, "-1.5"), (3.0, "3")],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_sentences():
    assert (sentence("HbA1c", 9.1, "%", "2026-03-02", "raises", "measurements")
            == "HbA1c 9.1 %, last measured 2026-03-02, raises risk")
    assert sentence("Diabetes", 1.0, "yes/no", None, "raises") == "Diabetes: yes, raises risk"
    assert (sentence("Diabetes recorded", 1.0, "1 = yes", "2024-05-01", "raises", "conditions")
            == "Diabetes recorded: yes, last recorded 2024-05-01, raises risk")
    assert sentence("Female sex", 0.0, "1 = female, 0 = male", None, "lowers") == "Female sex: no, lowers risk"
    assert (sentence("Statin: proportion of days covered", 0.853, "fraction", "2025-01-02", "lowers", "medications")
            == "Statin: proportion of days covered 85.3 %, last prescribed 2025-01-02, lowers risk")
    assert (sentence("Emergency encounters in 365 days", 2.0, "encounters", "2025-02-03", "raises", "encounters")
            == "Emergency encounters in 365 days 2 encounters, last visit 2025-02-03, raises risk")
    assert sentence("Emergency visits (1 y)", 2.0, "", None, "raises") == "Emergency visits (1 y) 2, raises risk"
    assert sentence("LDL", None, "mmol/L", None, "lowers") == "LDL not recorded, lowers risk"


def test_bundle_frame_uses_its_prediction_time_column(fitted, spec, task):
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.models.config import TierThresholds

    bundle = ModelBundle.from_model(fitted, spec, task, TierThresholds())
    df = frame(patient(hba1c_last=11.0, hba1c_days_since_last=121.0), prediction_time=datetime(2025, 1, 1))
    top = bundle.explain(df, top_k=1)[0][0]
    assert top["date"] == "2024-09-02"
    # without the column, an explicit prediction time is used
    top2 = bundle.explain(df.drop("prediction_time"), top_k=1, prediction_time=PREDICTION_TIME)[0][0]
    assert top2["date"] == "2026-03-02"
