"""Request validation: impossible values, future dates, unknown codes are refused naming the field."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from chronorisk.serving.schemas import (
    AggregateQuery,
    CohortQuery,
    MedsEvent,
    ScoreRequest,
    check_code,
    field_path,
)


def errors_of(model, data) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return [(field_path(e["loc"]), e["msg"]) for e in info.value.errors()]


@pytest.mark.parametrize(
    ("event", "field", "words"),
    [
        ({"code": "LOINC//8480-6", "numeric_value": 1200, "time": "2024-01-01"}, "numeric_value", "impossible"),
        ({"code": "LOINC//4548-4", "numeric_value": -2, "time": "2024-01-01"}, "numeric_value", "impossible"),
        ({"code": "LOINC//2339-0", "numeric_value": float("inf")}, "numeric_value", "finite"),
        ({"code": "LOINC//4548-4", "time": "2999-01-01"}, "time", "future"),
        ({"code": "LOINC//4548-4", "time": "1850-01-01"}, "time", "1900"),
        ({"code": "MEDS_BIRTH"}, "events[0]", "birth"),
        ({"code": "XYZ//1"}, "code", "unknown vocabulary"),
        ({"code": "SNOMED//abc"}, "code", "unknown SNOMED"),
        ({"code": "ENCOUNTER//SPACESHIP"}, "code", "unknown ENCOUNTER"),
        ({"code": "no-separator"}, "code", "VOCAB//value"),
        ({"code": "RXNORM//860975", "numeric_value": 5000}, "numeric_value", "days supplied"),
        ({"code": "LOINC//4548-4", "color": "red"}, "color", "Extra"),
    ],
)
def test_event_errors_name_the_field(event, field, words):
    found = errors_of(ScoreRequest, {"events": [event]})
    assert any(field in path and words.lower() in msg.lower() for path, msg in found), found


def test_valid_events_pass():
    req = ScoreRequest.model_validate(
        {
            "events": [
                {"code": "MEDS_BIRTH", "time": "1960-05-01"},
                {"code": "GENDER//F"},
                {"code": "LOINC//8480-6", "numeric_value": 142, "time": "2024-01-01T08:30:00Z"},
                {"code": "ICD10CM//E11.9", "time": "2020-01-01"},
                {"code": "SNOMED//44054006", "time": "2020-01-01"},
                {"code": "RXNORM//860975", "numeric_value": 30, "time": "2023-01-01"},
                {"code": "ENCOUNTER//AMB", "time": "2023-01-01"},
                {"code": "LOCAL//HTN", "time": "2023-01-01"},
            ],
            "prediction_time": "2024-06-01T00:00:00+02:00",
        }
    )
    assert req.prediction_time == datetime(2024, 5, 31, 22, 0)  # naive UTC
    assert req.events[2].time.tzinfo is None


def test_exactly_one_source():
    assert any("exactly one" in m for _, m in errors_of(ScoreRequest, {}))
    assert any("exactly one" in m for _, m in errors_of(ScoreRequest, {"features": {}, "events": []}))
    found = errors_of(ScoreRequest, {"events": [{"code": "GENDER//F", "subject_id": 1},
                                                {"code": "GENDER//F", "subject_id": 2}]})
    assert any("one patient" in m for _, m in found)


def test_features_must_be_finite_numbers():
    assert errors_of(ScoreRequest, {"features": {"a": "x"}})[0][0] == "features.a"
    assert ScoreRequest.model_validate({"features": {"a": None, "b": 1}}).features == {"a": None, "b": 1.0}


def test_fhir_bundle_shape():
    assert errors_of(ScoreRequest, {"fhir": {"resourceType": "Patient"}})[0][0] == "fhir.resourceType"
    found = errors_of(ScoreRequest, {"fhir": {"resourceType": "Bundle", "entry": [{"resource": {}}]}})
    assert found[0][0] == "fhir.entry[0].resource"


def test_cohort_query_limits():
    assert errors_of(CohortQuery, {"task": "x", "min_risk": 1.5})[0][0] == "min_risk"
    assert errors_of(CohortQuery, {"task": "x", "age_bands": ["20-25"]})[0][0] == "age_bands[0]"
    assert errors_of(CohortQuery, {"task": "x", "tiers": ["extreme"]})[0][0] == "tiers[0]"
    future = (datetime.now() + timedelta(days=30)).date().isoformat()
    assert errors_of(CohortQuery, {"task": "x", "prediction_time": future})[0][0] == "prediction_time"
    assert errors_of(CohortQuery, {"task": "bad task!"})[0][0] == "task"
    assert errors_of(AggregateQuery, {"task": "x", "group_by": []})[0][0] == "group_by"


def test_field_paths():
    assert field_path(("body", "events", 3, "numeric_value")) == "events[3].numeric_value"
    assert field_path(("body",)) == "body"
    assert field_path(("query", "limit")) == "query.limit"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_code_text_is_accepted_or_refused_cleanly(text):
    try:
        assert check_code(text) == text
    except ValueError as exc:
        assert len(str(exc)) < 400  # a short message, never an echo of a huge input


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["code", "time", "numeric_value", "text_value", "subject_id", "x"]),
        st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20), st.booleans()),
    )
)
def test_any_event_dict_validates_or_raises_validation_error(raw):
    with contextlib.suppress(ValidationError):
        MedsEvent.model_validate(raw)
