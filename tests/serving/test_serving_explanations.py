"""The clinician's wording of factors: grouped by concept, windows and units in words, direction and size."""

from __future__ import annotations

import pytest

from chronorisk.errors import InputError
from chronorisk.features.families import declare_conditions, declare_demographics, declare_measurements
from chronorisk.features.spec import ConditionSpec, MeasurementSpec
from chronorisk.serving.explanations import clinician_text, display_unit, group_factors, window_words

SBP = MeasurementSpec(name="sbp", display="Systolic blood pressure", unit="mm[Hg]", codes=("LOINC//8480-6",))
DIABETES = ConditionSpec(name="diabetes", display="Type 2 diabetes", codes=("SNOMED//44054006",))
INFOS = {**declare_measurements((SBP,), (365, 1095)), **declare_conditions((DIABETES,)), **declare_demographics()}


def factor(feature: str, value, contribution: float, date: str | None = None, unit: str | None = None) -> dict:
    return {"feature": feature, "display": INFOS[feature].display, "value": value,
            "unit": INFOS[feature].unit if unit is None else unit, "date": date, "contribution": contribution,
            "direction": "raises" if contribution > 0 else "lowers"}


# the five lines: three of them the same blood pressure
FACTORS = [
    factor("meas_sbp_mean_1095d", 145, 0.30, "2025-01-15"),
    factor("demo_age_years", 79.9, 0.25),
    factor("meas_sbp_max_1095d", 157, 0.12, "2025-01-15"),
    factor("cond_diabetes_present", 1.0, -0.05, "2019-03-01"),
    factor("meas_sbp_min_365d", 146, 0.04, "2025-01-15"),
]


def test_factors_of_one_concept_make_one_line_in_clinician_words():
    lines = clinician_text(FACTORS, INFOS)
    assert lines == [
        "Systolic blood pressure: 3-year mean 145 mmHg, highest 157, 1-year lowest 146, last 2025-01-15"
        " - raises risk (strongly)",
        "Age: 79.9 years - raises risk (moderately)",
        "Type 2 diabetes: recorded, last 2019-03-01 - lowers risk (slightly)",
    ]


def test_a_group_sums_its_contributions_and_keeps_the_features():
    (sbp, _age, diabetes) = group_factors(FACTORS, INFOS)
    assert sbp.contribution == 0.30 + 0.12 + 0.04 and sbp.features == [
        "meas_sbp_mean_1095d", "meas_sbp_max_1095d", "meas_sbp_min_365d"]
    assert sbp.as_dict()["direction"] == "raises" and diabetes.direction == "lowers"
    # opposite signs within a concept: the sum decides
    mixed = group_factors([factor("meas_sbp_mean_1095d", 120, -0.2), factor("meas_sbp_max_1095d", 150, 0.05)],
                          INFOS)
    assert len(mixed) == 1 and mixed[0].direction == "lowers"


def test_missing_values_and_windows_and_units_in_words():
    line = clinician_text([factor("meas_sbp_mean_365d", None, 0.05)], INFOS)[0]
    assert line == "Systolic blood pressure: 1-year mean not recorded - lowers risk (slightly)".replace(
        "lowers", "raises")
    assert window_words(1095) == "3-year" and window_words(365) == "1-year" and window_words(90) == "90-day"
    assert display_unit("mm[Hg]") == "mmHg" and display_unit("mm[Hg] per year") == "mmHg per year"
    assert display_unit("mL/min/{1.73_m2}") == "mL/min/1.73 m²" and display_unit("%") == "%"


def test_a_spec_without_meaning_fields_keeps_one_line_per_factor():
    old = [{"feature": "hba1c_last_365d", "display": "HbA1c", "value": 9.1, "unit": "%", "date": "2024-03-02",
            "contribution": 0.31}]
    assert clinician_text(old, None) == ["HbA1c: 9.1 %, last 2024-03-02 - raises risk (moderately)"]


def test_a_site_sees_its_own_units():
    from chronorisk.serving.explanations import site_units

    hba1c = MeasurementSpec(name="hba1c", display="HbA1c", unit="%", codes=("LOINC//4548-4",))
    infos = declare_measurements((hba1c, SBP), (365,))
    factors = [{"feature": "meas_hba1c_mean_365d", "value": 9.1, "unit": "%", "date": "2025-06-10",
                "contribution": 0.3},
               {"feature": "meas_hba1c_slope_365d", "value": 0.5, "unit": "% per year", "contribution": 0.1},
               {"feature": "meas_sbp_last", "value": 150, "unit": "mm[Hg]", "contribution": 0.1}]
    units = site_units({"hba1c": "mmol/mol", "sbp": "mm[Hg]"})
    (hba1c_line, sbp_line) = clinician_text(factors, infos, units=units)
    # IFCC = (NGSP - 2.15) / 0.0915: 9.1 % -> 76 mmol/mol; a trend converts by the slope only
    assert hba1c_line.startswith("HbA1c: 1-year mean 76 mmol/mol, trend 5.47 mmol/mol per year, last 2025-06-10")
    assert sbp_line.startswith("Systolic blood pressure: latest 150 mmHg")
    with pytest.raises(InputError, match=r"serve\.display_units\.glucose"):
        site_units({"glucose": "furlongs"})
