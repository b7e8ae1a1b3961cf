"""Label extraction: eligibility, outcome in the horizon, censoring and death, on hand-built patients."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import pytest
from features_support import events

from chronorisk.data.meds_io import write_labels
from chronorisk.errors import InputError
from chronorisk.features.labels import eligible_index, eligible_indexes, extract_labels, read_labels
from chronorisk.features.tasks import load_task

T = datetime(2022, 1, 1)
DM, HTN, MI, STROKE = "SNOMED//44054006", "ICD10CM//I10", "SNOMED//22298006", "ICD10CM//I63.9"
VISIT = "ENCOUNTER//AMB"
LATE = datetime(2023, 6, 1)  # a visit that keeps the record open past T + 365 days


def _labels(rows, task, times=(T,)) -> dict[int, bool]:
    out = extract_labels(events(rows).lazy(), load_task(task), list(times))
    assert out.schema == pl.Schema(
        {"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean}
    )
    return {r["subject_id"]: r["boolean_value"] for r in out.iter_rows(named=True)}


COMPLICATION = [
    # 1: diabetes, MI within the horizon -> True
    (1, datetime(2020, 5, 1), DM), (1, datetime(2022, 6, 1), MI), (1, LATE, VISIT),
    # 2: hypertension, no outcome, record continues -> False
    (2, datetime(2019, 3, 1), HTN), (2, LATE, VISIT),
    # 3: hypertension, record ends before T + 365 d without outcome -> excluded
    (3, datetime(2019, 3, 1), HTN), (3, datetime(2022, 5, 1), VISIT),
    # 4: hypertension, dies in the horizon without outcome -> False
    (4, datetime(2019, 3, 1), HTN), (4, datetime(2022, 8, 1), "MEDS_DEATH"),
    # 5: a stroke before T: not a first diagnosis -> excluded
    (5, datetime(2019, 3, 1), DM), (5, datetime(2021, 3, 1), STROKE), (5, LATE, VISIT),
    # 6: neither diabetes nor hypertension -> not in the population
    (6, datetime(2019, 3, 1), VISIT), (6, LATE, VISIT),
    # 7: died before T -> not alive
    (7, datetime(2019, 3, 1), DM), (7, datetime(2021, 6, 1), "MEDS_DEATH"),
    # 8: diabetes recorded exactly at T is not "before T" -> not in the population
    (8, T, DM), (8, LATE, VISIT),
    # 9: outcome exactly at T + 365 days is within the horizon -> True
    (9, datetime(2019, 3, 1), DM), (9, datetime(2023, 1, 1), "SNOMED//88805009"),
    # 10: outcome one day after the horizon -> False (record continues)
    (10, datetime(2019, 3, 1), DM), (10, datetime(2023, 1, 2), MI), (10, LATE, VISIT),
    # 11: retinopathy as an ICD-10-CM sub-code (prefix E11.3) in the horizon -> True
    (11, datetime(2019, 3, 1), "ICD10CM//E11.9"), (11, datetime(2022, 3, 1), "ICD10CM//E11.319"),
    # 12: outcome exactly at T counts (features see only what is strictly before T)
    (12, datetime(2019, 3, 1), HTN), (12, T, "SNOMED//433144002"),
    # 99: not in the population; the data end (2026-01-01) is its last visit, so 3 is lost, not "not seen yet"
    (99, datetime(2026, 1, 1), VISIT),
]


def test_complication_known_answers():
    labels = _labels(COMPLICATION, "complication_1y")
    assert labels == {1: True, 2: False, 4: False, 9: True, 10: False, 11: True, 12: True}


ONSET = [
    # 21: adult, hypertension 700 days after T -> True
    (21, datetime(1970, 1, 1), "MEDS_BIRTH"), (21, datetime(2020, 1, 1), VISIT),
    (21, datetime(2023, 12, 2), HTN),
    # 22: adult with diabetes before T -> not in the population
    (22, datetime(1970, 1, 1), "MEDS_BIRTH"), (22, datetime(2020, 1, 1), DM), (22, datetime(2024, 6, 1), VISIT),
    # 23: 17 years old at T -> not in the population
    (23, datetime(2004, 6, 1), "MEDS_BIRTH"), (23, datetime(2020, 1, 1), VISIT), (23, datetime(2024, 6, 1), VISIT),
    # 24: adult, nothing happens, record continues -> False
    (24, datetime(1980, 1, 1), "MEDS_BIRTH"), (24, datetime(2020, 1, 1), VISIT), (24, datetime(2024, 6, 1), VISIT),
    # 25: no birth on record: age unknown -> not in the population
    (25, datetime(2020, 1, 1), VISIT), (25, datetime(2024, 6, 1), VISIT),
    # 26: adult with no event before T (only birth) -> not in the population
    (26, datetime(1980, 1, 1), "MEDS_BIRTH"), (26, datetime(2024, 6, 1), VISIT),
]


def test_onset_known_answers():
    assert _labels(ONSET, "onset_2y") == {21: True, 24: False}


def test_censoring_rules_are_configurable():
    task = load_task("complication_1y").model_copy(
        update={"censoring": load_task("complication_1y").censoring.model_copy(
            update={"death": "exclude", "end_of_record": "negative"})}
    )
    labels = _labels(COMPLICATION, task)
    assert 4 not in labels  # death excluded
    assert labels[3] is False  # short record labelled negative


def test_schedule_from_data_span():
    rows = [
        (1, datetime(2019, 1, 1), VISIT), (1, datetime(2025, 12, 31), VISIT), (1, datetime(1950, 1, 1), "MEDS_BIRTH")
    ]
    task = load_task("complication_1y")
    times = task.schedule_from_events(events(rows).lazy())
    assert times[0] == datetime(2021, 1, 1) and times[-1] == datetime(2024, 7, 1)
    assert len(times) == 8
    onset = load_task("onset_2y").schedule_from_events(events(rows).lazy())
    assert onset[-1] == datetime(2024, 1, 1) and len(onset) == 7


def test_followup_grace_near_the_end_of_the_data():
    # data end 2023-06-01; subject 3 was last seen 2022-05-01, within 730 days of it:
    # followed to the end of the data, so a negative, not a lost record
    rows = [r for r in COMPLICATION if r[0] != 99]
    assert _labels(rows, "complication_1y")[3] is False
    strict = load_task("complication_1y").model_copy(
        update={"censoring": load_task("complication_1y").censoring.model_copy(update={"followup_grace_days": 0})}
    )
    assert 3 not in _labels(rows, strict)


def test_default_times_follow_the_schedule():
    # the data start is the first visit or measurement, not an old diagnosis date
    rows = [(2, datetime(2008, 1, 1), HTN), (2, datetime(2019, 1, 1), VISIT), (2, datetime(2025, 12, 31), VISIT)]
    out = extract_labels(events(rows).lazy(), "complication_1y")
    assert out["prediction_time"].to_list() == [datetime(y, m, 1) for y in range(2021, 2025) for m in (1, 7)]
    assert not out["boolean_value"].any()


def test_eligible_index_needs_no_outcome():
    idx = eligible_index(events(COMPLICATION).lazy(), "complication_1y", [T]).collect()
    # the population at T, whatever happens later: 3 (short record) and 4 (dies) are eligible
    assert sorted(idx["subject_id"].to_list()) == [1, 2, 3, 4, 9, 10, 11, 12]
    assert idx.columns == ["subject_id", "prediction_time"]


def test_every_tasks_eligibility_at_once_is_each_tasks_alone():
    """`eligible_indexes` (one subject table for several tasks, as serving asks) gives each task's
    `eligible_index`, at several times, for the known-answer cohort, dotless and WHO ICD codes included."""
    rows = [*COMPLICATION, (20, datetime(2019, 3, 1), "ICD10//E11.9"), (20, LATE, VISIT),
            (21, datetime(2019, 3, 1), "ICD9//250.00"), (21, LATE, VISIT), (22, datetime(2019, 3, 1), "ICD10CM//I109")]
    ev = events(rows)
    tasks = [load_task("complication_1y"), load_task("onset_2y")]
    times = [T, datetime(2020, 1, 1), datetime(2023, 1, 1, 12)]
    together = eligible_indexes(ev, tasks, times)
    for task, got in zip(tasks, together, strict=True):
        assert got.equals(eligible_index(ev.lazy(), task, times).collect()), task.name
    assert {20, 21, 22} <= set(together[0].filter(pl.col("prediction_time") == T)["subject_id"])


def test_label_file_round_trip(tmp_path):
    out = extract_labels(events(COMPLICATION).lazy(), "complication_1y", [T])
    write_labels(out, tmp_path / "labels" / "a.parquet")
    back = read_labels(tmp_path / "labels")
    assert back.equals(out)


def test_bad_label_files_are_named(tmp_path):
    missing = tmp_path / "missing.parquet"
    pl.DataFrame({"subject_id": [1], "prediction_time": [T]}).write_parquet(missing)
    with pytest.raises(InputError, match=r"missing\.parquet: missing column\(s\) boolean_value"):
        read_labels(missing)
    wrong = tmp_path / "wrong.parquet"
    pl.DataFrame({"subject_id": [1], "prediction_time": [T], "boolean_value": [1]}).write_parquet(wrong)
    with pytest.raises(InputError, match="boolean_value has type"):
        read_labels(wrong)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a parquet file"):
        read_labels(junk)
    with pytest.raises(InputError, match="does not exist"):
        read_labels(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.parquet label files"):
        read_labels(tmp_path / "empty")


def _label_frame(ids: list[int], value: bool) -> pl.DataFrame:
    return pl.DataFrame({"subject_id": ids, "prediction_time": [datetime(2020, 1, 1)] * len(ids),
                         "boolean_value": [value] * len(ids)})


def test_labels_path_means_one_task_in_every_form(tmp_path):
    from chronorisk.data.meds_io import write_labels
    from chronorisk.features.labels import check_labels_for_tasks, label_files, read_task_labels

    root = tmp_path / "root"
    write_labels(_label_frame([3, 1], True), root / "a" / "site_x.parquet")
    write_labels(_label_frame([2], False), root / "a" / "site_y.parquet")
    write_labels(_label_frame([1, 2, 3], False), root / "b" / "all.parquet")
    write_labels(_label_frame([9], True), root / "c.parquet")
    assert read_task_labels(root, "a")["subject_id"].to_list() == [1, 2, 3]  # sorted, task b never mixed in
    assert label_files(root, "b") == [root / "b" / "all.parquet"]
    assert label_files(root, "c") == [root / "c.parquet"]
    assert label_files(root / "a", "anything") == sorted((root / "a").glob("*.parquet"))  # one task's folder
    assert label_files(root / "c.parquet", "anything") == [root / "c.parquet"]
    with pytest.raises(InputError, match=r"holds no labels of task 'd': it is a labels root with a, b"):
        label_files(_only_folders(root, tmp_path), "d")
    with pytest.raises(InputError, match="does not exist"):
        label_files(tmp_path / "nowhere", "a")
    check_labels_for_tasks(root, ["a", "b", "c"])
    with pytest.raises(InputError, match=r"no labels of task\(s\) d"):
        check_labels_for_tasks(root, ["a", "d"])
    with pytest.raises(InputError, match="with several tasks give a labels root"):
        check_labels_for_tasks(root / "c.parquet", ["a", "b"])


def _only_folders(root, tmp_path):
    """A labels root without top-level files (the `c.parquet` of `root` left out)."""
    import shutil

    out = tmp_path / "folders_only"
    for name in ("a", "b"):
        shutil.copytree(root / name, out / name)
    return out


def test_a_task_with_supplied_labels_needs_no_outcome_and_is_never_extracted(tmp_path):
    from chronorisk.features.tasks import TaskDefinition

    task = TaskDefinition.from_yaml("name: study\nlabels: supplied\n", source="study.yaml")
    assert task.labels_supplied and task.outcome is None and task.concepts_used() == set()
    with pytest.raises(InputError, match="supplied labels"):
        extract_labels(pl.LazyFrame(schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                                            "numeric_value": pl.Float32, "text_value": pl.String}), task)
    with pytest.raises(InputError, match="outcome needed to extract labels"):
        TaskDefinition.from_yaml("name: x\nhorizon_days: 30\n", source="x.yaml")
