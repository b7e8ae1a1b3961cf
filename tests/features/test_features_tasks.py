"""Task definitions (YAML round trip, clear errors) and the concept map."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import pytest

from chronorisk.data import codes as vocab
from chronorisk.errors import InputError
from chronorisk.features.concepts import load_concepts
from chronorisk.features.tasks import TaskDefinition, builtin_task_names, load_task


def test_builtins():
    assert builtin_task_names() == ["complication_1y", "onset_2y"]
    comp = load_task("complication_1y")
    assert comp.horizon_days == 365
    assert set(comp.population.any_of) == {"diabetes", "hypertension"}
    assert set(comp.outcome.concepts) == {
        "ckd3plus", "nephropathy", "retinopathy", "neuropathy", "mi", "stroke", "heart_failure"
    }
    onset = load_task("onset_2y")
    assert onset.horizon_days == 730 and onset.population.min_age_years == 18
    assert set(onset.population.none_of) == {"diabetes", "hypertension"}


@pytest.mark.parametrize("name", ["complication_1y", "onset_2y"])
def test_yaml_round_trip(tmp_path, name):
    task = load_task(name)
    path = tmp_path / f"{name}.yaml"
    task.save(path)
    again = load_task(path)
    assert again == task
    assert TaskDefinition.from_yaml(task.to_yaml()) == task


def test_custom_task_file(tmp_path):
    path = tmp_path / "stroke_5y.yaml"
    path.write_text(
        "name: stroke_5y\nhorizon_days: 1826\npopulation: {any_of: [hypertension], min_age_years: 40}\n"
        "outcome: {concepts: [stroke]}\nschedule: {months: [1], lookback_years: 1}\n"
    )
    task = load_task(str(path))
    assert task.name == "stroke_5y"
    # first: 2019-03-01 + 1 year -> next 1 January is 2021-01-01; last: 2026-12-31 - 1826 days = 2021-12-31
    assert task.prediction_times(datetime(2019, 3, 1), datetime(2026, 12, 31)) == [datetime(2021, 1, 1)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nhorizon_days: -5\noutcome: {concepts: [mi]}\n", "horizon_days: Input should be greater than 0"),
        ("name: x\nhorizon_days: 30\n", "outcome needed to extract labels"),
        ("name: x\nhorizon_days: 30\noutcome: {concepts: [not_a_concept]}\n", "unknown concept"),
        ("name: x\nhorizon_days: 30\noutcome: {concepts: [mi]}\nschedule: {months: [13]}\n", "months must be 1..12"),
        ("name: X Y\nhorizon_days: 30\noutcome: {concepts: [mi]}\n", "name: String should match pattern"),
        ("name: x\nhorizon_days: 30\noutcome: {concepts: [mi]}\ncolour: blue\n", "colour: Extra inputs"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_task_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_task(path)
    assert str(path) in str(err.value)


def test_unknown_task_name():
    with pytest.raises(InputError, match="neither a built-in task"):
        load_task("no_such_task")


# ---- concept map ----------------------------------------------------------------------------
def test_prefix_and_vocabularies():
    cmap = load_concepts()
    assert cmap.concepts_of("ICD10CM//E11.65") == ["diabetes"]
    assert set(cmap.concepts_of("ICD10CM//E11.21")) == {"diabetes", "nephropathy"}
    assert set(cmap.concepts_of("ICD10CM//N18.31")) == {"ckd", "ckd3plus"}
    assert cmap.concepts_of("ICD10CM//N18.2") == ["ckd"]
    assert cmap.concepts_of("ICD9CM//250.00") == ["diabetes"]
    assert cmap.concepts_of("ICD9CM//401.9") == ["hypertension"]
    assert cmap.concepts_of("SNOMED//999") == []


@pytest.mark.parametrize(
    ("code", "concept"),
    [  # codes Synthea writes (read off ../shared/data/synthea-r4)
        ("SNOMED//38341003", "hypertension"), ("SNOMED//44054006", "diabetes"),
        ("SNOMED//431855005", "ckd"), ("SNOMED//433144002", "ckd3plus"), ("SNOMED//46177005", "ckd3plus"),
        ("SNOMED//127013003", "nephropathy"), ("SNOMED//1551000119108", "retinopathy"),
        ("SNOMED//368581000119106", "neuropathy"), ("SNOMED//22298006", "mi"),
        ("SNOMED//230690007", "stroke"), ("SNOMED//88805009", "heart_failure"), ("SNOMED//53741008", "chd"),
        ("SNOMED//15777000", "prediabetes"), ("SNOMED//162864005", "obesity"),
    ],
)
def test_synthea_codes(code, concept):
    assert concept in load_concepts().concepts_of(code)


def test_every_codes_py_diagnosis_is_mapped():
    cmap = load_concepts()
    for dx in vocab.DIAGNOSES.values():
        assert cmap.concepts_of(dx.snomed), dx.snomed
        assert cmap.concepts_of(dx.icd10), dx.icd10


def test_measurements_and_drug_classes_include_codes_py():
    cmap = load_concepts()
    assert "LOINC//2160-0" in cmap.measurement_codes()["creatinine"]
    assert cmap.measurement_codes()["hba1c"][0] == "LOINC//4548-4"
    classes = cmap.drug_class_codes()
    for med in vocab.MEDICATIONS.values():
        assert med.code in classes[med.drug_class]
    assert "RXNORM//312961" in classes["statin"]


def test_concept_table_on_distinct_codes():
    codes = pl.LazyFrame({"code": ["ICD10CM//E11.21", "ICD10CM//E11.21", "SNOMED//38341003", "X//1"]})
    table = load_concepts().concept_table(codes).collect().sort("concept")
    assert table.rows() == [
        ("ICD10CM//E11.21", "diabetes"), ("SNOMED//38341003", "hypertension"), ("ICD10CM//E11.21", "nephropathy"),
    ]


def test_match_form_expression_is_match_form():
    """The polars form of `match_form` (literal prefix tests) gives what the Python one gives."""
    from chronorisk.features.concepts import match_form, match_form_expr

    codes = ["ICD10//E11.9", "ICD10CM//E11.9", "ICD9//250.00", "ICD9CM//25000", "SNOMED//1.2", "X//ICD10//a.b",
             "ICD10", "ICD10CM//", "ICD9//", "LOINC//4548-4", "icd10//E11.9", None]
    got = pl.DataFrame({"code": codes}).select(match_form_expr(pl.col("code"))).to_series().to_list()
    assert got == [None if c is None else match_form(c) for c in codes]


def test_bad_concept_map(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("conditions:\n  x:\n    display: X\n    codes: [no-vocab]\n")
    with pytest.raises(InputError, match="not of the form VOCAB//value"):
        load_concepts(bad)
    bad.write_text("conditions: {}\nmeasurements:\n  unobtainium: [LOINC//1]\n")
    with pytest.raises(InputError, match="unobtainium"):
        load_concepts(bad)
