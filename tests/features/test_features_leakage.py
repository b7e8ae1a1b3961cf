"""Leakage: nothing at or after the prediction time may change any feature.

Hypothesis builds patients from codes of every family, then changes, adds or
deletes events at or after the prediction time (including exactly at it);
every feature of every row must stay identical (nulls included).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
from features_support import events, spec_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from chronorisk.data import codes as vocab
from chronorisk.features.pipeline import transform

T1, T2 = datetime(2023, 1, 1), datetime(2024, 7, 1)
CODES = [
    "MEDS_BIRTH", "LOINC//4548-4", "LOINC//8480-6", "LOINC//2160-0", "LOINC//33914-3",
    "SNOMED//44054006", "ICD10CM//E11.21", "ICD10CM//I10", "SNOMED//22298006", "ICD9CM//250.00",
    "RXNORM//259255", "RXNORM//860975", "RXNORM//314076", "ENCOUNTER//AMB", "ENCOUNTER//EMER",
    vocab.SMOKING_STATUS, "SNOMED//424144002", "LOCAL//XYZ", "GENDER//F",
]
SMOKING_TEXT = [*vocab.SMOKING_CURRENT, *vocab.SMOKING_FORMER, *vocab.SMOKING_NEVER, "SNOMED//1"]
BASE = datetime(2018, 1, 1)

day_offsets = st.floats(min_value=0, max_value=7 * 365, allow_nan=False)


@st.composite
def an_event(draw, subject: int, lo: datetime | None = None):
    code = draw(st.sampled_from(CODES))
    if lo is None:
        t = BASE + timedelta(days=draw(day_offsets))
    else:  # at or after `lo`, sometimes exactly at it
        t = lo + timedelta(days=draw(st.one_of(st.just(0.0), st.floats(0, 800, allow_nan=False))))
    value = draw(st.one_of(st.none(), st.floats(-50, 500, allow_nan=False, width=32)))
    text = draw(st.sampled_from(SMOKING_TEXT)) if code == vocab.SMOKING_STATUS else None
    return (subject, t, code, value, text)


@st.composite
def patients_and_change(draw):
    rows = []
    for subject in (1, 2, 3):
        rows += draw(st.lists(an_event(subject), min_size=0, max_size=25))
    rows.append((1, None, "GENDER//M", None, None))
    subject = draw(st.sampled_from([1, 2, 3]))
    cutoff = T1 if subject in (1, 2) else T2  # the earliest prediction time of that subject
    late = [i for i, r in enumerate(rows) if r[0] == subject and r[1] is not None and r[1] >= cutoff]
    kind = draw(st.sampled_from(["add", "delete", "change"] if late else ["add"]))
    changed = list(rows)
    if kind == "add":
        changed += draw(st.lists(an_event(subject, cutoff), min_size=1, max_size=5))
    elif kind == "delete":
        del changed[draw(st.sampled_from(late))]
    else:
        i = draw(st.sampled_from(late))
        changed[i] = draw(an_event(subject, cutoff))
    return rows, changed, subject


def _index() -> pl.DataFrame:
    # subjects 1 and 2 at T1 and T2, subject 3 at T2 only
    return pl.DataFrame(
        {"subject_id": [1, 1, 2, 2, 3], "prediction_time": [T1, T2, T1, T2, T2]},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    )


SPEC_EVENTS = events([(9, BASE, c) for c in CODES])
SPEC = spec_for(SPEC_EVENTS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patients_and_change())
def test_events_at_or_after_prediction_time_change_nothing(case):
    rows, changed, changed_subject = case
    idx = _index()
    # only rows whose prediction time is after every change are protected: for subjects 1 and 2
    # a change after T1 may legitimately move their T2 features, so compare T1 rows for them
    before = transform(SPEC, events(rows).lazy(), idx).collect()
    after = transform(SPEC, events(changed).lazy(), idx).collect()
    protected = pl.lit(True)
    if changed_subject in (1, 2):
        protected = (pl.col("subject_id") != changed_subject) | (pl.col("prediction_time") == T1)
    assert_frame_equal(before.filter(protected), after.filter(protected))


@settings(max_examples=30, deadline=None)
@given(st.lists(an_event(1), min_size=1, max_size=30), st.lists(an_event(1, T2), min_size=1, max_size=10))
def test_future_only_events_change_nothing(past, future):
    # one prediction time per subject: the lookup path of tagging (the other test uses the join path)
    idx = _index().filter((pl.col("subject_id") == 1) & (pl.col("prediction_time") == T2))
    base = transform(SPEC, events(past).lazy(), idx).collect()
    more = transform(SPEC, events(past + future).lazy(), idx).collect()
    assert_frame_equal(base, more)
