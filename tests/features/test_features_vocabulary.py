"""The data-driven vocabulary: values and text of codes outside the concept map, merged vocabularies,
values checked on the way in (known answers on hand-built patients)."""

from __future__ import annotations

import polars as pl
import pytest
from features_support import T, after, before, events, index

from chronorisk.features.config import FeatureConfig
from chronorisk.features.pipeline import code_summary, fit_spec, transform

HR = "LOCAL//HR"  # a measurement the concept map does not know
STATUS = "LOCAL//EXERCISE_ANGINA"  # a text-valued attribute
SMOKING = "LOINC//72166-2"
BMI = "LOINC//39156-5"


def _cohort() -> list[tuple]:
    rows = []
    for s in range(1, 21):  # 20 subjects: heart rate 60..79 (+ a second, earlier value for subject 1)
        rows.append((s, before(10), HR, 60.0 + s - 1))
        rows.append((s, before(10), STATUS, None, "yes" if s % 2 else "no"))
        rows.append((s, before(100), BMI, 25.0))
    rows += [(1, before(400), HR, 100.0), (1, before(200), HR, 90.0), (1, after(1), HR, 300.0)]
    rows += [(1, before(300), STATUS, None, "no")]
    rows += [(2, before(5), BMI, 4649.0)]  # impossible: dropped, counted
    rows += [(3, before(5), SMOKING, None, "Current every day smoker"), (4, before(5), SMOKING, None, "Never smoker"),
             (5, before(5), SMOKING, None, "Former smoker (finding)")]
    rows += [(s, before(5), SMOKING, None, "Refused to answer") for s in range(6, 10)]  # unknown text: a category
    rows += [(11, before(50), "ICD9CM//25000"), (12, before(50), "ICD10CM//E119"), (13, before(50), "ICD9CM//250.40"),
             (14, before(50), "ICD10CM//E1121"), (15, before(50), "ICD10//E11.9")]
    return rows


@pytest.fixture(scope="module")
def fitted():
    ev = events(_cohort())
    spec = fit_spec(code_summary(ev), FeatureConfig(min_code_subjects=4, max_texts_per_code=3))
    out = transform(spec, ev.lazy(), index(list(range(1, 21)))).collect()
    return spec, {r["subject_id"]: r for r in out.iter_rows(named=True)}


def test_values_of_an_unmapped_code_become_features(fitted):
    spec, rows = fitted
    info = spec.info("code_LOCAL_HR_last")
    assert (info.kind, info.code, info.aggregate) == ("value", HR, "last")
    assert rows[5]["code_LOCAL_HR_last"] == 64.0
    r = rows[1]  # 100 at -400 d, 90 at -200 d, 60 at -10 d; 300 after T is not visible
    assert r["code_LOCAL_HR_last"] == 60.0 and r["code_LOCAL_HR_max_365d"] == 90.0
    assert r["code_LOCAL_HR_mean_1095d"] == pytest.approx(250 / 3)
    assert r["code_LOCAL_HR_count_1095d"] == 3.0 and r["code_LOCAL_HR_present"] == 1.0
    assert r["code_LOCAL_HR_trend"] < 0  # falling
    assert rows[5]["code_LOCAL_HR_trend"] is None  # one value: no trend


def test_text_values_become_categories_of_the_latest(fitted):
    spec, rows = fitted
    assert spec.info("code_LOCAL_EXERCISE_ANGINA__yes").kind == "category"
    assert rows[1]["code_LOCAL_EXERCISE_ANGINA__yes"] == 1.0  # "yes" now, "no" 300 days ago
    assert rows[1]["code_LOCAL_EXERCISE_ANGINA__no"] == 0.0
    assert rows[2]["code_LOCAL_EXERCISE_ANGINA__no"] == 1.0


def test_smoking_text_answers_reach_the_smoking_concept(fitted):
    spec, rows = fitted
    assert rows[3]["smoking_current"] == 1.0 and rows[4]["smoking_never"] == 1.0 and rows[5]["smoking_former"] == 1.0
    # an answer no table knows is not dropped: it is a category of the smoking code
    name = "code_LOINC_72166_2__Refused_to_answer"
    assert spec.info(name).code == SMOKING and rows[6][name] == 1.0 and rows[6]["smoking_current"] is None
    assert rows[3][name] == 0.0 and rows[10][name] is None


def test_icd_codes_with_and_without_dots_and_icd9_merge_into_concepts(fitted):
    _, rows = fitted
    for s in (11, 12, 13, 14, 15):
        assert rows[s]["cond_diabetes_present"] == 1.0, s
    assert rows[13]["cond_nephropathy_present"] == 1.0 and rows[14]["cond_nephropathy_present"] == 1.0
    assert rows[12]["cond_nephropathy_present"] == 0.0


def test_out_of_range_value_dropped_and_counted(fitted):
    spec, rows = fitted
    assert spec.fit_info["values_out_of_range"] == {BMI: 1}
    assert rows[2]["meas_bmi_last"] == 25.0 and rows[2]["meas_bmi_max_90d"] is None  # 4,649 is not a BMI
    assert rows[2]["miss_bmi_count"] == 1.0


def test_unmapped_numbers_are_clipped_to_fitted_quantiles():
    rows = [(s, before(10), HR, float(s)) for s in range(1, 1001)]
    ev = events([*rows, (1001, before(10), HR, 1e6)])
    spec = fit_spec(code_summary(ev), FeatureConfig(min_code_subjects=20))
    (code,) = [c for c in spec.codes if c.code == HR]
    assert code.values and code.clip[1] < 1e6
    out = transform(spec, ev.lazy(), index([1001], at=T)).collect()
    assert out["code_LOCAL_HR_last"][0] == pytest.approx(code.clip[1], rel=1e-6)


def test_site_summaries_add_up_to_the_pooled_summary():
    from chronorisk.features.pipeline import merge_summaries

    rows = _cohort()
    site_a = events([r for r in rows if r[0] <= 10])
    site_b = events([r for r in rows if r[0] > 10])
    counts = ["code", "text", "n_subjects", "n_value_subjects", "n_values", "n_out_of_range"]
    merged = merge_summaries([code_summary(site_a), code_summary(site_b)]).select(counts)
    pooled = code_summary(pl.concat([site_a, site_b])).select(counts)
    assert merged.equals(pooled)
