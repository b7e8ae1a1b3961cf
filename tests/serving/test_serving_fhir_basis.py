"""RiskAssessment.basis: the input resources each factor was computed from."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

from chronorisk.features.families import declare_conditions, declare_measurements
from chronorisk.features.spec import ConditionSpec, MeasurementSpec
from chronorisk.serving.fhir_risk import _us, basis_references

SBP = MeasurementSpec(name="sbp", display="Systolic blood pressure", unit="mm[Hg]", codes=("LOINC//8480-6",))
T2D = ConditionSpec(name="diabetes", display="Type 2 diabetes", codes=("SNOMED//44054006",), prefixes=("ICD10CM//E11",))
SPEC = SimpleNamespace(features={**declare_measurements((SBP,), (365,)), **declare_conditions((T2D,))},
                       measurements=(SBP,), conditions=(T2D,), drug_classes=())
WHEN = datetime(2025, 7, 1)
SOURCES = {
    "LOINC//8480-6": [("Observation", "bp-old", _us(datetime(2023, 1, 5))),
                      ("Observation", "bp-recent", _us(datetime(2025, 1, 15))),
                      ("Observation", "bp-latest", _us(datetime(2025, 6, 2))),
                      ("Observation", "bp-after", _us(datetime(2025, 8, 1)))],
    "ICD10CM//E11.9": [("Condition", "t2d", _us(datetime(2015, 3, 1)))],
    "LOINC//4548-4": [("Observation", "hba1c", _us(datetime(2025, 6, 1)))],
}


def refs(*features: str) -> list[str]:
    return basis_references([{"feature": f} for f in features], SPEC, SOURCES, WHEN)


def test_each_factor_points_at_what_it_was_computed_from():
    assert refs("meas_sbp_last") == ["Observation/bp-latest"]  # the latest before the prediction time
    assert refs("meas_sbp_mean_365d") == ["Observation/bp-recent", "Observation/bp-latest"]  # its window
    assert refs("cond_diabetes_present") == ["Condition/t2d"]  # by code prefix, whenever recorded
    assert refs("meas_sbp_last", "cond_diabetes_present") == ["Observation/bp-latest", "Condition/t2d"]
    assert refs("no_such_feature") == [] and basis_references([{"feature": "meas_sbp_last"}], SPEC, {}) == []
