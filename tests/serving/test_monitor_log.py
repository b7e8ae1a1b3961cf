"""The monitoring prediction log: append-only parts, no identifiers, idempotent batches, delayed outcomes."""

from __future__ import annotations

import os
import stat
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronorisk.errors import InputError
from chronorisk.serving import prediction_log
from chronorisk.serving.prediction_log import BufferedPredictionLog, PredictionLog, join_keys

KEY = b"k" * 32
SUBJECTS = [7_340_000_000_001, 7_340_000_000_002, 7_340_000_000_003]


def _records(times=None, **extra) -> pl.DataFrame:
    times = times or [datetime(2025, 1, 6), datetime(2025, 1, 6), datetime(2025, 1, 7)]
    n = len(times)
    return pl.DataFrame(
        {
            "subject_id": SUBJECTS[:n],
            "prediction_time": times,
            "site": ["chc_a", "chc_a", "hosp_c"][:n],
            "risk": [0.1, 0.5, 0.9][:n],
            "tier": ["low", "medium", "high"][:n],
            "age": [51.0, 62.0, 73.0][:n],
            "glucose_last_90d": [101.0, None, 143.0][:n],
            **extra,
        }
    )


def _all_text(folder) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*.parquet")))


def test_append_then_scan_returns_features_and_prediction_without_identifier(work):
    log = PredictionLog.for_work(work, key=KEY)
    written = log.append(_records(), "onset_2y", 3, "batch", model_name="chronorisk-onset_2y")
    assert [p.parent.name for p in written] == ["date=2025-01-06", "date=2025-01-07"]
    rows = log.scan("onset_2y").collect().sort("risk")
    assert rows["risk"].to_list() == [0.1, 0.5, 0.9]
    assert rows["tier"].to_list() == ["low", "medium", "high"]
    assert rows["model_version"].unique().to_list() == ["3"]
    assert rows["source"].unique().to_list() == ["batch"]
    assert rows["site"].to_list() == ["chc_a", "chc_a", "hosp_c"]
    assert rows["age"].dtype == pl.Float32 and rows["glucose_last_90d"].null_count() == 1
    assert "subject_id" not in rows.columns
    assert rows["join_key"].null_count() == 0 and rows["join_key"].n_unique() == 3
    # no subject id anywhere in the files, in any encoding we can think of
    raw = _all_text(work / "monitoring")
    for sid in SUBJECTS:
        assert str(sid).encode() not in raw
        assert sid.to_bytes(8, "little") not in raw


def test_same_part_name_replaces_the_file_instead_of_adding_rows(work):
    log = PredictionLog.for_work(work, key=KEY)
    for _ in range(3):
        log.append(_records(), "onset_2y", 3, "batch", part="batch-20250106-chc_a-0")
    assert log.scan("onset_2y").collect().height == 3
    log.append(_records(), "onset_2y", 3, "batch")  # random part name: a second copy
    assert log.scan("onset_2y").collect().height == 6


def test_scan_window_is_half_open_and_reads_only_its_dates(work):
    log = PredictionLog.for_work(work, key=KEY)
    times = [datetime(2025, 1, 5, 23, 59), datetime(2025, 1, 6), datetime(2025, 1, 12, 23)]
    log.append(_records(times), "t", 1, "api")
    assert log.scan("t", datetime(2025, 1, 6), datetime(2025, 1, 13)).collect().height == 2
    assert log.scan("t", date(2025, 1, 6), date(2025, 1, 12)).collect().height == 1
    assert log.scan("t", None, datetime(2025, 1, 6)).collect().height == 1
    assert len(log.partitions("t", date(2025, 1, 6), date(2025, 1, 6))) == 1
    assert log.scan("other").collect().height == 0


def test_versions_with_different_features_concatenate(work):
    log = PredictionLog.for_work(work, key=KEY)
    log.append(_records(), "t", 1, "batch")
    log.append(_records().drop("age").with_columns(pl.lit(2.0).alias("new_feature")), "t", 2, "batch")
    rows = log.scan("t").collect()
    assert rows.height == 6
    assert rows.filter(pl.col("model_version") == "2")["age"].null_count() == 3
    assert rows.filter(pl.col("model_version") == "1")["new_feature"].null_count() == 3


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"patient_id": [1, 2, 3]}, "patient_id"),
        ({"person_name": ["a", "b", "c"]}, "person_name"),
        ({"mrn": ["x", "y", "z"]}, "mrn"),
        ({"note": ["a", "b", "c"]}, "note"),  # text is never logged
    ],
)
def test_identifier_like_and_text_columns_are_refused(work, extra, field):
    log = PredictionLog.for_work(work, key=KEY)
    with pytest.raises(InputError) as err:
        log.append(_records(**extra), "t", 1, "api")
    assert err.value.field == field
    assert not (work / "monitoring" / "log").exists()


@pytest.mark.parametrize(("column", "values"), [("risk", [0.1, 1.5, 0.2]), ("risk", [0.1, None, 0.2]),
                                                 ("site", ["a", None, "b"])])
def test_bad_prediction_rows_are_refused_whole(work, column, values):
    log = PredictionLog.for_work(work, key=KEY)
    with pytest.raises(InputError) as err:
        log.append(_records().with_columns(pl.Series(column, values)), "t", 1, "api")
    assert err.value.field == column
    assert log.scan("t").collect().height == 0


def test_task_and_version_can_come_from_the_records(work):
    frame = _records().with_columns(pl.lit("onset_2y").alias("task"), pl.lit("7").alias("model_version"),
                                    pl.lit("chronorisk-onset_2y").alias("model_name"))
    prediction_log.append(frame, source="batch", work=work)
    rows = prediction_log.scan("onset_2y", work=work).collect()
    assert rows.height == 3 and rows["model_version"].unique().to_list() == ["7"]
    with pytest.raises(InputError):
        prediction_log.append(_records(), source="batch", work=work)


def test_monitoring_key_file_is_private_and_stable(work, monkeypatch):
    monkeypatch.delenv(prediction_log.KEY_ENV, raising=False)
    first = PredictionLog.for_work(work).key
    path = work / "secrets" / "monitoring.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert PredictionLog.for_work(work).key == first
    monkeypatch.setenv(prediction_log.KEY_ENV, "an-environment-key-0123456789")
    assert PredictionLog.for_work(work).key == b"an-environment-key-0123456789"


def test_join_key_depends_on_the_key_subject_and_time():
    sids = pl.Series([1, 1, 2])
    times = pl.Series([datetime(2025, 1, 1), datetime(2025, 7, 1), datetime(2025, 1, 1)])
    a = join_keys(sids, times, KEY).to_list()
    assert len(set(a)) == 3
    assert join_keys(sids, times, KEY).to_list() == a
    assert set(join_keys(sids, times, b"other-key-0123456789").to_list()).isdisjoint(a)
    aware = times.dt.replace_time_zone("UTC").dt.convert_time_zone("Europe/Paris")
    assert join_keys(sids, aware, KEY).to_list() == a  # same instant, same key


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 10**6)), min_size=1, max_size=30, unique=True))
def test_join_keys_are_distinct_for_distinct_subject_times(pairs):
    sids = pl.Series([p[0] for p in pairs], dtype=pl.Int64)
    times = pl.Series([datetime(2020, 1, 1) + timedelta(minutes=p[1]) for p in pairs])
    keys = join_keys(sids, times, KEY)
    assert keys.n_unique() == len(pairs)


def test_delayed_outcomes_attach_by_join_key_only(work):
    log = PredictionLog.for_work(work, key=KEY)
    records = _records()
    log.append(records, "t", 1, "batch")
    labels = records.select("subject_id", "prediction_time", pl.Series("boolean_value", [True, False, True]))
    path = log.append_outcomes(labels, "t", horizon=timedelta(days=365))
    again = log.append_outcomes(labels, "t", horizon=timedelta(days=365))
    assert path == again  # same labels, same part: no duplicate
    stored = pl.read_parquet(path)
    assert stored.columns == ["join_key", "outcome", "available_at"]
    assert str(SUBJECTS[0]).encode() not in path.read_bytes()
    joined = log.scan("t").collect().join(log.scan_outcomes("t").collect(), on="join_key")
    assert joined.sort("risk")["outcome"].to_list() == [True, False, True]
    # known only once the horizon has passed
    assert log.scan_outcomes("t", as_of=datetime(2025, 6, 1)).collect().height == 0
    assert log.scan_outcomes("t", as_of=datetime(2026, 1, 6)).collect().height == 2


def test_buffered_log_writes_one_part_per_flush(work):
    log = PredictionLog.for_work(work, key=KEY)
    buffered = BufferedPredictionLog(log, max_rows=6, max_seconds=3600)
    one = _records([datetime(2025, 1, 6)])
    for _ in range(5):
        buffered.add(one, "t", 1)
    assert log.scan("t").collect().height == 0
    buffered.add(one, "t", 1)  # the sixth row flushes
    assert len(log.partitions("t")) == 1 and log.scan("t").collect().height == 6
    buffered.add(one, "t", 1)
    buffered.close()
    assert log.scan("t").collect().height == 7


def test_scored_at_defaults_to_now_in_utc(work):
    log = PredictionLog.for_work(work, key=KEY)
    before = datetime.now(UTC).replace(tzinfo=None)
    log.append(_records(), "t", 1, "api")
    scored = log.scan("t").collect()["scored_at"]
    assert scored.min() >= before - timedelta(seconds=1)


def test_live_sink_logs_feature_rows_and_event_frames_of_many_requests_in_order(work):
    """The server's sink: ready-made feature rows and per-request frames (events path) land as one
    table per model, each request's risk, tier, site and time on its own row, no subject id."""
    from types import SimpleNamespace

    import numpy as np

    from chronorisk.serving.state import MonitoringSink

    model = SimpleNamespace(task="onset_2y", version=4, name="chronorisk-onset_2y", feature_names=["age", "bmi_last"])
    sink = MonitoringSink(work, flush_rows=10_000, flush_seconds=3600)
    t1, t2, t3 = datetime(2025, 3, 3, 9), datetime(2025, 3, 3, 10), datetime(2025, 3, 4, 11)
    sink.live(model, np.array([[51.0, 30.5]]), np.array([0.2]), ["medium"], "chc_a", t1)
    frame = pl.DataFrame({"subject_id": [SUBJECTS[0]], "age": [62.0], "bmi_last": [None], "extra": [1.0]})
    sink.live(model, frame, np.array([0.7]), ["high"], "hosp_c", t2)
    sink.live(model, frame.drop("subject_id").with_columns(age=pl.lit(70.0)), np.array([0.05]), ["low"], None, t3)
    sink.close()
    rows = PredictionLog.for_work(work).scan("onset_2y").collect().sort("risk")
    assert rows["risk"].to_list() == [0.05, 0.2, 0.7]
    assert rows["tier"].to_list() == ["low", "medium", "high"]
    assert rows["site"].to_list() == ["unknown", "chc_a", "hosp_c"]
    assert rows["age"].to_list() == [70.0, 51.0, 62.0]
    assert rows["bmi_last"].to_list()[1:] == [30.5, None]
    assert rows["prediction_time"].dt.hour().to_list() == [11, 9, 10]
    assert "subject_id" not in rows.columns and "extra" not in rows.columns


def test_input_checks_count_the_values_each_day_read_and_dropped_once():
    """Known answers: glucose (plausible 10-1500 mg/dL) in a 365-day look-back; an event read by two rows of
    one day counts once; events after the prediction time or before the look-back are not read."""
    from chronorisk.features.config import FeatureConfig
    from chronorisk.features.pipeline import fit_spec
    from chronorisk.features.vocabulary import code_summary, input_checks

    glucose, hba1c = "LOINC//2339-0", "LOINC//4548-4"
    day = datetime(2025, 3, 10)
    rows = [  # (subject, days before `day`, code, value)
        (1, 3, glucose, 5.5), (1, 30, glucose, 100.0), (1, 60, glucose, 6.5), (1, 400, glucose, 4.0),
        (1, -1, glucose, 5.0), (2, 3, glucose, 110.0), (2, 3, hba1c, 6.0), (3, 10, glucose, 7.5),
    ]
    events = pl.DataFrame(
        {"subject_id": [r[0] for r in rows], "time": [day - timedelta(days=r[1]) for r in rows],
         "code": [r[2] for r in rows], "numeric_value": [r[3] for r in rows]},
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float64},
    )
    spec = fit_spec(code_summary(events), FeatureConfig(windows_days=[90, 365]))
    index = pl.DataFrame({"subject_id": [1, 2, 1, 3], "prediction_time": [day, day, day, day + timedelta(days=1)]})
    out = input_checks(spec, events, index)
    got = {(r["date"], r["code"]): (r["n_values"], r["n_dropped"], r["dropped_median"]) for r in out.to_dicts()}
    assert got == {
        (date(2025, 3, 10), glucose): (4, 2, 6.0),  # subject 1 (indexed twice): 5.5, 100, 6.5 once; 2: 110
        (date(2025, 3, 10), hba1c): (1, 0, None),
        (date(2025, 3, 11), glucose): (1, 1, 7.5),
    }, got


def test_batch_scoring_logs_input_checks_per_chunk_as_the_one_counting_rule_gives(tiny_world, tmp_path):
    """Batch scoring stores each chunk's input checks beside its scores (same part name, no identifier);
    summed over chunks they equal `input_checks` of the whole site's events for the scored subjects, and a
    re-run replaces the files."""
    from chronorisk.data.meds_io import scan_site, site_ids
    from chronorisk.features.vocabulary import input_checks
    from chronorisk.serving import scoring
    from chronorisk.serving.state import MonitoringSink
    from chronorisk.serving.store import ScoreStore

    when = datetime(2024, 1, 1)
    models = scoring.load_models(["onset_2y"], source="folder", model_dir=tiny_world.models)
    site = site_ids(tiny_world.meds)[0]
    work = tmp_path / "w"
    store = ScoreStore.open(f"sqlite:///{tmp_path / 's.db'}")
    scoring.batch_score(store, models, tiny_world.meds, when, sites=[site], monitor=MonitoringSink(work))
    with store.engine.connect() as conn:
        scored = pl.DataFrame([tuple(r) for r in conn.exec_driver_sql("SELECT subject_id FROM scores")],
                              schema={"subject_id": pl.Int64}, orient="row")
    store.dispose()
    folder = work / "monitoring" / "input_checks" / "task=onset_2y"
    files = sorted(folder.rglob("*.parquet"))
    assert files and all(f.name.startswith(f"part-batch-20240101-{site}-") for f in files)
    logged = pl.read_parquet(files)
    assert set(logged.columns) == set(prediction_log.CHECK_SCHEMA) and set(logged["site"]) == {site}
    index = scored.with_columns(pl.lit(when).cast(pl.Datetime("us")).alias("prediction_time"))
    expected = input_checks(models["onset_2y"].spec, scan_site(tiny_world.meds, site), index)
    assert expected["n_values"].sum() > 0
    got = logged.group_by("code").agg(pl.col("n_values").sum(), pl.col("n_dropped").sum()).sort("code")
    assert got.to_dicts() == expected.select("code", "n_values", "n_dropped").sort("code").to_dicts()
    store = ScoreStore.open(f"sqlite:///{tmp_path / 'again.db'}")
    scoring.batch_score(store, models, tiny_world.meds, when, sites=[site], monitor=MonitoringSink(work))
    store.dispose()
    assert sorted(folder.rglob("*.parquet")) == files and pl.read_parquet(files).height == logged.height


def test_live_input_checks_are_buffered_into_one_file_per_site(work):
    log = PredictionLog.for_work(work)
    buffer = prediction_log.InputCheckBuffer(log, max_rows=10**6, max_seconds=3600)
    row = pl.DataFrame({"date": [date(2025, 3, 3)], "code": ["LOINC//2339-0"], "n_values": [3], "n_dropped": [1],
                        "dropped_median": [5.5]})
    for site in ("a", "b", "a"):
        buffer.add(row, "onset_2y", site)
    assert not list(work.rglob("*.parquet"))  # buffered: no file per request
    assert len(buffer.flush()) == 2
    checks = log.scan_input_checks("onset_2y", date(2025, 3, 3), date(2025, 3, 4)).collect()
    assert sorted(checks.group_by("site").agg(pl.col("n_values").sum()).rows()) == [("a", 6), ("b", 3)]


def test_score_route_counts_a_requests_impossible_glucose(tiny_world, tmp_path):
    """The /score path's hook (`routes.score.live_input_checks`) counts the request's events by the same rule:
    a glucose of 6 (mg/dL code, mmol/L value) a week before the prediction time is read and dropped."""
    from chronorisk.data.meds_io import scan_site, site_ids
    from chronorisk.serving import scoring
    from chronorisk.serving.routes.score import live_input_checks

    when = datetime(2024, 1, 1)
    models = scoring.load_models(["onset_2y"], source="folder", model_dir=tiny_world.models)
    log = PredictionLog.for_work(tmp_path)
    site = site_ids(tiny_world.meds)[0]
    events = scan_site(tiny_world.meds, site).collect()
    for sid in events["subject_id"].unique().sort().to_list()[:60]:
        mine = events.filter(pl.col("subject_id") == sid)
        extra = mine.head(1).with_columns(pl.lit(when - timedelta(days=7)).cast(mine.schema["time"]).alias("time"),
                                          pl.lit("LOINC//2339-0").alias("code"),
                                          pl.lit(6.0).cast(mine.schema["numeric_value"]).alias("numeric_value"))
        mine = pl.concat([mine, extra]).sort("time", nulls_last=False)
        results = scoring.score_one(models, ["onset_2y"], events=mine, prediction_time=when, explain=False,
                                    on_scored=lambda m, f, r, t, ev=mine: live_input_checks(log, m, ev, f, site))
        if results[0].eligible:
            break
    else:
        pytest.fail("no eligible subject among the first 60")
    prediction_log.input_check_buffer(log).flush()
    checks = log.scan_input_checks("onset_2y").collect()
    glucose = checks.filter(pl.col("code") == "LOINC//2339-0")
    assert glucose["n_dropped"].sum() == 1 and glucose["dropped_median"].item() == 6.0
    assert set(checks["site"]) == {site} and glucose["n_values"].sum() >= 1


def test_requests_held_for_input_checks_give_the_rows_of_checking_each_alone(tiny_world, tmp_path):
    """`InputCheckBuffer.add_request` checks the held requests together at the flush (each request under its
    own subject id): the same rows as `input_checks` of each request alone, per (task, site)."""
    from chronorisk.data.meds_io import scan_site, site_ids
    from chronorisk.features.vocabulary import input_checks
    from chronorisk.serving import scoring

    spec = scoring.load_models(["onset_2y"], source="folder", model_dir=tiny_world.models)["onset_2y"].spec
    events = scan_site(tiny_world.meds, site_ids(tiny_world.meds)[0]).collect()
    glucose = events.filter(pl.col("code") == "LOINC//2339-0")["subject_id"].unique().sort().to_list()[:12]
    times = (datetime(2024, 1, 1), datetime(2022, 5, 5, 8, 0))
    requests = []
    for i, sid in enumerate(glucose):
        mine = events.filter(pl.col("subject_id") == sid)
        if i % 3 == 0:  # an impossible value to drop, and every request seen as subject 0 (a FHIR bundle's)
            extra = mine.head(1).with_columns(pl.lit(times[i % 2] - timedelta(days=3)).cast(mine.schema["time"])
                                              .alias("time"), pl.lit("LOINC//2339-0").alias("code"),
                                              pl.lit(4.0).cast(mine.schema["numeric_value"]).alias("numeric_value"))
            mine = pl.concat([mine, extra]).with_columns(pl.lit(0, dtype=pl.Int64).alias("subject_id"))
        index = pl.DataFrame({"subject_id": [mine["subject_id"][0]], "prediction_time": [times[i % 2]]})
        requests.append((mine, index, "a" if i % 4 else "b"))
    held = prediction_log.InputCheckBuffer(PredictionLog.for_work(tmp_path / "held"), max_rows=10**6,
                                           max_seconds=3600)
    alone = prediction_log.InputCheckBuffer(PredictionLog.for_work(tmp_path / "alone"), max_rows=10**6,
                                            max_seconds=3600)
    for mine, index, site in requests:
        held.add_request(spec, mine, index, "onset_2y", site)
        alone.add(input_checks(spec, mine, index), "onset_2y", site)
    assert len(held.flush()) == len(alone.flush()) >= 2  # a file per (site, date)
    order = ["site", "date", "code", "n_values", "n_dropped", "dropped_median"]
    got = held.log.scan_input_checks("onset_2y").collect().select(order).sort(order, nulls_last=True)
    expected = alone.log.scan_input_checks("onset_2y").collect().select(order).sort(order, nulls_last=True)
    assert got.height > len(requests) // 2 and got["n_dropped"].sum() >= 4
    assert got.to_dicts() == expected.to_dicts()
