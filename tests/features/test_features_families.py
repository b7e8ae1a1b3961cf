"""Known answers for every feature family, on hand-built patients (numbers worked out here)."""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from features_support import T, after, before, events, index, spec_for

from chronorisk.features.pipeline import transform

HBA1C, LDL, CREAT_ALIAS = "LOINC//4548-4", "LOINC//18262-6", "LOINC//2160-0"
SMOKING = "LOINC//72166-2"
ATORVASTATIN, METFORMIN, METOPROLOL = "RXNORM//259255", "RXNORM//860975", "RXNORM//866414"
TAIL = "SNOMED//999999"

# Patient 1: a woman born exactly 60 years before T, with some of everything.
P1 = [
    (1, None, "GENDER//F"),
    (1, datetime(1964, 1, 1), "MEDS_BIRTH"),
    # HbA1c: 7, 8, 9 at 400, 200, 30 days before T; 12 at T and 15 after T are not visible
    (1, before(400), HBA1C, 7.0), (1, before(200), HBA1C, 8.0), (1, before(30), HBA1C, 9.0),
    (1, T, HBA1C, 12.0), (1, after(10), HBA1C, 15.0),
    # creatinine under its alias code
    (1, before(10), CREAT_ALIAS, 1.4),
    # diabetes first as an ICD-10-CM sub-code (prefix E11), later as SNOMED; hypertension only after T
    (1, datetime(2021, 1, 1), "ICD10CM//E11.65"),
    (1, before(100), "SNOMED//44054006"),
    (1, after(1), "SNOMED//38341003"),
    # a diabetic kidney complication code is both diabetes and nephropathy
    (1, before(50), "ICD10CM//E11.21"),
    # statin fills: 90 days at -400, -100, -30 (the last starts when the one before ends, at -10)
    (1, before(400), ATORVASTATIN, 90.0), (1, before(100), ATORVASTATIN, 90.0),
    (1, before(30), ATORVASTATIN, 90.0), (1, T, ATORVASTATIN, 90.0),
    # metformin without days supplied: 30 days by default
    (1, before(20), METFORMIN),
    # beta blocker long ago
    (1, before(500), METOPROLOL, 30.0),
    # encounters
    (1, before(10), "ENCOUNTER//AMB"), (1, before(100), "ENCOUNTER//AMB"), (1, before(500), "ENCOUNTER//AMB"),
    (1, before(2000), "ENCOUNTER//AMB"), (1, before(50), "ENCOUNTER//EMER"), (1, after(5), "ENCOUNTER//IMP"),
    # smoking: former 300 days ago, current 20 days ago, "never" after T is not visible
    (1, before(300), SMOKING, None, "SNOMED//8517006"),
    (1, before(20), SMOKING, None, "SNOMED//449868002"),
    (1, after(1), SMOKING, None, "SNOMED//266919005"),
    # a data-driven code: twice before T, once after
    (1, before(5), TAIL), (1, before(5000), TAIL), (1, after(1), TAIL),
]
# Patient 2: a man with nothing else on record.
P2 = [(2, None, "GENDER//M")]


@pytest.fixture(scope="module")
def row():
    ev = events(P1 + P2)
    spec = spec_for(ev)
    out = transform(spec, ev.lazy(), index([1, 2])).collect()
    assert out.height == 2
    return {"p1": out.row(0, named=True), "p2": out.row(1, named=True), "spec": spec}


def approx(value, expected, rel=1e-6):
    assert value is not None, "feature is null"
    assert value == pytest.approx(expected, rel=rel, abs=1e-6)


def test_every_feature_is_float32_and_known(row):
    spec = row["spec"]
    ev = events(P1 + P2)
    out = transform(spec, ev.lazy(), index([1, 2])).collect()
    assert out.columns == ["subject_id", "prediction_time", *spec.feature_names]
    assert all(str(out.schema[n]) == "Float32" for n in spec.feature_names)
    assert all(spec.features[n].display for n in spec.feature_names)


def test_demographics(row):
    p1, p2 = row["p1"], row["p2"]
    approx(p1["demo_age_years"], (60 * 365 + 15) / 365.25)  # 15 leap days between 1964 and 2024
    assert p1["demo_sex_female"] == 1.0
    assert p2["demo_sex_female"] == 0.0
    assert p2["demo_age_years"] is None  # no birth on record


def test_condition_history(row):
    p1 = row["p1"]
    assert p1["cond_diabetes_present"] == 1.0
    approx(p1["cond_diabetes_years_since_first"], 1095 / 365.25)  # 2021-01-01 to 2024-01-01
    approx(p1["cond_diabetes_days_since_last"], 50)  # E11.21 is diabetes too
    assert p1["cond_nephropathy_present"] == 1.0
    approx(p1["cond_nephropathy_days_since_last"], 50)
    assert p1["cond_hypertension_present"] == 0.0  # recorded only after T
    assert p1["cond_hypertension_years_since_first"] is None
    assert row["p2"]["cond_diabetes_present"] == 0.0


def test_measurement_windows(row):
    p1 = row["p1"]
    approx(p1["meas_hba1c_last"], 9.0)
    approx(p1["meas_hba1c_days_since_last"], 30)
    # 90 days: only the 9.0
    assert p1["meas_hba1c_count_90d"] == 1.0
    approx(p1["meas_hba1c_mean_90d"], 9.0)
    assert p1["meas_hba1c_std_90d"] is None and p1["meas_hba1c_slope_90d"] is None
    # 365 days: 8 (day -200) and 9 (day -30)
    assert p1["meas_hba1c_count_365d"] == 2.0
    approx(p1["meas_hba1c_mean_365d"], 8.5)
    approx(p1["meas_hba1c_min_365d"], 8.0)
    approx(p1["meas_hba1c_max_365d"], 9.0)
    approx(p1["meas_hba1c_std_365d"], math.sqrt(0.5))
    approx(p1["meas_hba1c_slope_365d"], 1.0 / (170 / 365.25))  # +1 % over 170 days, per year
    # 1095 days: 7, 8, 9 at days -400, -200, -30. Least squares in days: mean day -210,
    # deviations (-190, 10, 180) and (-1, 0, 1): slope = 370 / 68600 per day.
    assert p1["meas_hba1c_count_1095d"] == 3.0
    approx(p1["meas_hba1c_mean_1095d"], 8.0)
    approx(p1["meas_hba1c_min_1095d"], 7.0)
    approx(p1["meas_hba1c_max_1095d"], 9.0)
    approx(p1["meas_hba1c_std_1095d"], 1.0)
    approx(p1["meas_hba1c_slope_1095d"], 370 / 68600 * 365.25, rel=1e-5)
    # an alias code feeds its measurement
    approx(p1["meas_creatinine_last"], 1.4)


def test_missingness(row):
    p1, p2 = row["p1"], row["p2"]
    assert p1["miss_hba1c_never"] == 0.0 and p1["miss_hba1c_count"] == 3.0
    assert p1["miss_ldl_never"] == 1.0 and p1["miss_ldl_count"] == 0.0
    assert p1["meas_ldl_last"] is None and p1["meas_ldl_count_365d"] == 0.0
    assert p2["miss_hba1c_never"] == 1.0


def test_medications(row):
    p1 = row["p1"]
    # statin coverage in [-365, 0): [-365, -310) + [-100, -10) + [-10, 0) = 55 + 90 + 10 days
    approx(p1["med_statin_pdc_365d"], 155 / 365)
    assert p1["med_statin_active"] == 1.0  # the shifted last fill runs to day +80
    assert p1["med_statin_count_365d"] == 2.0
    approx(p1["med_statin_days_since_last"], 30)
    # metformin without days supplied: 30 days from day -20
    approx(p1["med_biguanide_pdc_365d"], 20 / 365)
    assert p1["med_biguanide_active"] == 1.0
    # beta blocker 500 days ago
    assert p1["med_beta_blocker_active"] == 0.0
    assert p1["med_beta_blocker_count_365d"] == 0.0
    assert p1["med_beta_blocker_pdc_365d"] == 0.0
    approx(p1["med_beta_blocker_days_since_last"], 500)
    assert p1["med_insulin_active"] == 0.0 and p1["med_insulin_days_since_last"] is None


def test_encounters(row):
    p1 = row["p1"]
    assert (p1["enc_amb_count_90d"], p1["enc_amb_count_365d"], p1["enc_amb_count_1095d"]) == (1.0, 2.0, 3.0)
    approx(p1["enc_amb_days_since_last"], 10)
    assert p1["enc_emer_count_90d"] == 1.0
    assert p1["enc_imp_count_1095d"] == 0.0 and p1["enc_imp_days_since_last"] is None


def test_smoking(row):
    p1, p2 = row["p1"], row["p2"]
    assert (p1["smoking_current"], p1["smoking_former"], p1["smoking_never"]) == (1.0, 0.0, 0.0)
    approx(p1["smoking_days_since_last"], 20)
    assert p2["smoking_current"] is None and p2["smoking_days_since_last"] is None


def test_code_counts(row):
    spec = row["spec"]
    assert TAIL in spec.vocabulary
    assert row["p1"]["code_SNOMED_999999_count_1095d"] == 1.0  # the record after T does not count
    assert row["p1"]["code_SNOMED_999999_present"] == 1.0  # nor does it, 5,000 days before T it does
    assert row["p1"]["code_SNOMED_999999_days_since_last"] == 5.0
    assert row["p2"]["code_SNOMED_999999_count_1095d"] == 0.0 and row["p2"]["code_SNOMED_999999_present"] == 0.0


def test_date_features_name_days_since_last(row):
    spec = row["spec"]
    info = spec.features["meas_hba1c_mean_365d"]
    assert info.date_feature == "meas_hba1c_days_since_last"
    assert info.unit == "%"
    assert spec.features["med_statin_pdc_365d"].date_feature == "med_statin_days_since_last"
    assert spec.features["smoking_current"].date_feature == "smoking_days_since_last"


def test_same_time_duplicates_average_for_last():
    ev = events([(1, before(3), HBA1C, 7.0), (1, before(3), HBA1C, 8.0), (1, before(100), HBA1C, 5.0)])
    out = transform(spec_for(ev), ev.lazy(), index([1])).collect().row(0, named=True)
    approx(out["meas_hba1c_last"], 7.5)
    assert out["meas_hba1c_count_1095d"] == 3.0


def test_slope_null_when_all_on_one_day():
    ev = events([(1, before(3), HBA1C, 7.0), (1, before(3), HBA1C, 9.0)])
    out = transform(spec_for(ev), ev.lazy(), index([1])).collect().row(0, named=True)
    assert out["meas_hba1c_slope_90d"] is None
    approx(out["meas_hba1c_std_90d"], math.sqrt(2.0))
