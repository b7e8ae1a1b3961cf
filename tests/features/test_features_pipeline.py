"""Fit (vocabulary selection), the spec artifact, and transform: determinism, serving = batch, shards."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from features_support import events
from polars.testing import assert_frame_equal

from chronorisk.errors import InputError
from chronorisk.features.config import FeatureConfig
from chronorisk.features.families import FEW_ROWS
from chronorisk.features.pipeline import (
    code_summary,
    fit_spec,
    merge_summaries,
    transform,
    transform_frame,
    transform_shards,
)
from chronorisk.features.spec import FeatureSpec
from chronorisk.features.tasks import load_task

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.random_meds import write_random_meds

T = datetime(2024, 7, 1)


@pytest.fixture(scope="module")
def meds(tmp_path_factory) -> list[Path]:
    return write_random_meds(tmp_path_factory.mktemp("meds"), 600, seed=3, shard_size=250)


@pytest.fixture(scope="module")
def spec(meds) -> FeatureSpec:
    summary = code_summary(pl.scan_parquet(meds))
    return fit_spec(summary, FeatureConfig(min_code_subjects=5, max_codes=50), load_task("onset_2y"))


@pytest.fixture(scope="module")
def index(meds) -> pl.DataFrame:
    ids = pl.scan_parquet(meds).select(pl.col("subject_id").unique().sort()).collect()["subject_id"]
    # two prediction times for every third subject, a passthrough column, and a shuffled order
    rows = [(s, T, i % 2 == 0) for i, s in enumerate(ids)] + [(s, datetime(2023, 1, 1), True) for s in ids[::3]]
    frame = pl.DataFrame(rows, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"),
                                       "boolean_value": pl.Boolean}, orient="row")
    return frame.sample(fraction=1.0, shuffle=True, seed=1)


# ---- fit ------------------------------------------------------------------------------------
def test_vocabulary_selection():
    ev = events(
        [(s, datetime(2020, 1, 1), "SNOMED//1") for s in range(5)]  # 5 subjects
        + [(s, datetime(2020, 1, 1), "SNOMED//2") for s in range(3)]  # 3 subjects
        + [(s, datetime(2020, 1, 1), "SNOMED//3") for s in range(3)]  # 3 subjects, ties by code
        + [(s, datetime(2020, 1, 1), "SNOMED//4") for s in range(1)]  # too rare
        + [(s, datetime(2020, 1, 1), "SNOMED//44054006") for s in range(9)]  # a concept: built in
        + [(s, datetime(2020, 1, 1), "ICD10CM//E11.8") for s in range(9)]  # a concept by prefix
        + [(s, datetime(2020, 1, 1), "LOINC//4548-4", 7.0) for s in range(9)]  # a measurement
    )
    spec = fit_spec(code_summary(ev), FeatureConfig(min_code_subjects=3, max_codes=2))
    assert spec.vocabulary == ("SNOMED//1", "SNOMED//2")
    assert spec.feature_names[-5:] == ("code_SNOMED_2_present", "code_SNOMED_2_count_90d", "code_SNOMED_2_count_365d",
                                       "code_SNOMED_2_count_1095d", "code_SNOMED_2_days_since_last")
    assert spec.fit_info["codes_over_max_codes"] == 1 and spec.fit_info["codes_under_min_subjects"] == 1


def test_summaries_from_sites_add_up():
    a = pl.DataFrame({"code": ["A//1", "B//1"], "n_subjects": [3, 1]})
    b = pl.DataFrame({"code": ["A//1", "C//1"], "n_subjects": [2, 4]})
    merged = merge_summaries([a, b])
    assert dict(merged.select("code", "n_subjects").iter_rows()) == {"A//1": 5, "B//1": 1, "C//1": 4}
    spec = fit_spec(pl.concat([a, b]), FeatureConfig(min_code_subjects=4))
    assert spec.vocabulary == ("A//1", "C//1")


def test_code_summary_has_counts_only(meds):
    summary = code_summary(pl.scan_parquet(meds))
    assert summary.columns == ["code", "text", "n_subjects", "n_value_subjects", "n_values", "n_out_of_range",
                               "value_lo", "value_hi"]
    assert summary["n_subjects"].max() <= 600 and summary["n_value_subjects"].max() <= 600


# ---- the spec artifact ------------------------------------------------------------------------
def test_spec_round_trip(tmp_path, spec):
    path = tmp_path / "spec.json"
    spec.save(path)
    again = FeatureSpec.load(path)
    assert again == spec
    assert FeatureSpec.from_json(spec.to_json()) == spec
    assert again.feature_names == spec.feature_names and again.task == "onset_2y"
    info = again.features["meas_hba1c_last"]
    assert (info.display, info.unit, info.family, info.date_feature) == (
        "HbA1c, last value", "%", "measurements", "meas_hba1c_days_since_last"
    )


def test_bad_spec_files(tmp_path, spec):
    path = tmp_path / "spec.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        FeatureSpec.load(path)
    raw = spec.model_dump(mode="json")
    raw["feature_names"] = [*raw["feature_names"], "no_such_feature"]
    path.write_text(__import__("json").dumps(raw))
    with pytest.raises(InputError, match="no_such_feature"):
        FeatureSpec.load(path)
    with pytest.raises(InputError, match="does not exist"):
        FeatureSpec.load(tmp_path / "missing.json")


# ---- transform --------------------------------------------------------------------------------
def test_rows_order_and_passthrough(meds, spec, index):
    out = transform(spec, pl.scan_parquet(meds), index.lazy()).collect()
    assert out.height == index.height
    assert out.select("subject_id", "prediction_time", "boolean_value").equals(index)
    assert out.columns == [*index.columns, *spec.feature_names]


def test_deterministic(meds, spec, index):
    a = transform(spec, pl.scan_parquet(meds), index.lazy()).collect()
    b = transform(spec, pl.scan_parquet(meds), index.lazy()).collect()
    assert_frame_equal(a, b)


def test_serving_single_patient_equals_batch(meds, spec, index):
    """Serving (`transform_frame` on one patient's events, and a few patients at once) gives exactly the
    batch's features (a batch of this size takes the many-rows path: joins and polars expressions)."""
    batch = transform(spec, pl.scan_parquet(meds), index.lazy()).collect()
    assert batch.height > FEW_ROWS
    all_events = pl.read_parquet(meds)
    for i in [*range(0, index.height, 37), index.height - 1]:
        row = index.slice(i, 1)
        mine = all_events.filter(pl.col("subject_id") == row["subject_id"][0])
        # serving gets a small DataFrame, in any order
        shuffled = mine.sample(fraction=1.0, shuffle=True, seed=i)
        assert_frame_equal(transform(spec, shuffled, row).collect(), batch.slice(i, 1), check_exact=True)
        assert_frame_equal(transform_frame(spec, shuffled, row), batch.slice(i, 1), check_exact=True)
    few = index.slice(40, 12)  # a few rows over every patient's events: most events belong to no row
    assert_frame_equal(transform_frame(spec, all_events, few), batch.slice(40, 12), check_exact=True)


@pytest.mark.parametrize(
    ("chunk", "workers"), [(70, 1), (400, 1), (10_000, 1), (70, 2)]
)  # split big shards / group small ones / all in one / chunks in two threads
def test_shards_in_chunks_equal_one_transform(meds, spec, index, chunk, workers):
    whole = transform(spec, pl.scan_parquet(meds), index.lazy()).collect()
    parts = pl.concat(list(transform_shards(spec, meds, index, chunk_subjects=chunk, workers=workers)))
    key = ["subject_id", "prediction_time"]
    assert_frame_equal(parts.sort(key), whole.sort(key))


def test_bad_index_and_events(spec):
    ev = events([(1, datetime(2020, 1, 1), "SNOMED//1")])
    with pytest.raises(InputError, match="index: missing column prediction_time"):
        transform(spec, ev, pl.DataFrame({"subject_id": [1]}))
    with pytest.raises(InputError, match="prediction_time has type"):
        transform(spec, ev, pl.DataFrame({"subject_id": [1], "prediction_time": ["2020-01-01"]}))
    with pytest.raises(InputError, match="events: missing column code"):
        transform(spec, ev.drop("code"), pl.DataFrame({"subject_id": [1], "prediction_time": [T]}))


def test_events_without_value_columns(spec):
    ev = pl.DataFrame({"subject_id": [1], "time": [datetime(2020, 1, 1)], "code": ["ENCOUNTER//AMB"]})
    out = transform(spec, ev, pl.DataFrame({"subject_id": [1], "prediction_time": [T]})).collect()
    assert out["enc_amb_count_1095d"].to_list() == [0.0]
    assert out["enc_amb_days_since_last"][0] == pytest.approx((T - datetime(2020, 1, 1)).days)


def test_finishing_few_rows_equals_many_rows(spec):
    """The numpy finishing of a few rows (serving) gives what the polars expressions give (batches)."""
    import numpy as np

    from chronorisk.features.pipeline import _final_plan, _finish_small

    plan = _final_plan(spec, spec.feature_names)
    values = np.random.default_rng(0).normal(size=(5, len(plan.sources)))
    values[values < -0.5] = np.nan  # "no value" from the numpy families
    wide = pl.DataFrame(values, schema=list(plan.sources), orient="row")
    wide = wide.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(None).otherwise(pl.all()).name.keep())
    expected = wide.select(plan.exprs)
    assert expected.null_count().sum_horizontal().item() > 0  # nulls from NaN and from null both occur
    assert_frame_equal(_finish_small(wide, plan), expected)
