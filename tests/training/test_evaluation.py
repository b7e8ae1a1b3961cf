"""Grouped evaluation: groups, keys, oracle, intervals, JSON safety."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from chronorisk.errors import InputError
from chronorisk.training import evaluation as E
from chronorisk.training import metrics as M

ISSUE_KEYS = ("task", "site", "n", "auroc", "oracle_auroc", "mode", "calibration_slope", "ece")


def cohort(n: int = 4000, seed: int = 0, with_truth: bool = True) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    true = 1 / (1 + np.exp(-(rng.normal(-2.2, 1.2, n))))
    y = rng.random(n) < true
    noisy = 1 / (1 + np.exp(-(np.log(true / (1 - true)) + rng.normal(0, 0.8, n))))  # a weaker model
    df = pl.DataFrame(
        {
            "subject_id": rng.integers(0, n // 2, n),
            "prediction_time": [datetime(2023 + int(i % 2), 1, 1) for i in range(n)],
            "y": y,
            "risk": noisy,
            "site": rng.choice(["north", "south", "east"], n),
            "sex": rng.choice(["F", "M"], n),
            "age": rng.uniform(18, 95, n),
        }
    )
    return df.with_columns(pl.Series("true_risk", true)) if with_truth else df


def test_age_bands_at_the_boundaries():
    ages = [17.9, 18, 39.99, 40, 54.9, 55, 69.99, 70, 101, None]
    want = ["<18", "18-39", "18-39", "40-54", "40-54", "55-69", "55-69", "70+", "70+", None]
    assert list(E.age_band(np.array(ages, dtype=float))) == want
    got = pl.DataFrame({"age": ages}, schema={"age": pl.Float64}).select(E.age_band_expr())["age_band"].to_list()
    assert got == want


def test_records_per_group_with_issue_keys():
    df = cohort()
    recs = E.evaluate(df, task="onset_2y", threshold=0.25, mode="realistic", n_boot=30, seed=1)
    groups = [(r["group"], r["site"], r["sex"], r["age_band"]) for r in recs]
    assert groups[0] == ("all", "all", "all", "all")
    assert {g[1] for g in groups if g[0] == "site"} == {"north", "south", "east"}
    assert {g[2] for g in groups if g[0] == "sex"} == {"F", "M"}
    assert {g[3] for g in groups if g[0] == "age_band"} == {"18-39", "40-54", "55-69", "70+"}
    for r in recs:
        for key in ISSUE_KEYS:
            assert key in r
        assert r["task"] == "onset_2y" and r["mode"] == "realistic"
    assert sum(r["n"] for r in recs if r["group"] == "site") == df.height
    assert sum(r["n"] for r in recs if r["group"] == "age_band") == df.height
    json.dumps(recs, allow_nan=False)  # JSON-safe: no NaN


def test_overall_figures_equal_the_metric_functions():
    df = cohort()
    overall = E.evaluate(df, task="t", threshold=0.25, n_boot=0)[0]
    y, p, t = df["y"].to_numpy().astype(float), df["risk"].to_numpy(), df["true_risk"].to_numpy()
    assert overall["auroc"] == pytest.approx(M.auroc(y, p))
    assert overall["ece"] == pytest.approx(M.ece(y, p))
    assert overall["calibration_slope"] == pytest.approx(M.calibration_slope(y, p))
    assert overall["oracle_auroc"] == pytest.approx(M.auroc(y, t))
    assert overall["auroc_ratio"] == pytest.approx(M.auroc(y, p) / M.auroc(y, t))
    assert overall["auroc_lo"] is None  # no bootstrap asked


def test_oracle_beats_a_noisy_model_and_intervals_are_paired():
    df = cohort(6000, seed=3)
    overall = E.evaluate(df, task="t", threshold=0.25, n_boot=60, seed=0)[0]
    assert overall["oracle_auroc"] > overall["auroc"]
    assert overall["auroc_ratio_lo"] < overall["auroc_ratio"] < overall["auroc_ratio_hi"] < 1.0
    assert overall["oracle_auroc_lo"] < overall["oracle_auroc"] < overall["oracle_auroc_hi"]
    assert overall["n_subjects"] == df["subject_id"].n_unique()


def test_true_risk_is_calibrated_by_construction():
    df = cohort(20000, seed=4).with_columns(pl.col("true_risk").alias("risk"))
    overall = E.evaluate(df, task="t", threshold=0.25, n_boot=40, seed=0)[0]
    assert overall["calibration_slope_lo"] < 1.0 < overall["calibration_slope_hi"]
    assert overall["ece"] < 0.02


def test_without_truth_oracle_is_none():
    recs = E.evaluate(cohort(with_truth=False), task="t", threshold=0.25, n_boot=0)
    assert all(r["oracle_auroc"] is None and r["auroc_ratio"] is None for r in recs)


def test_small_groups_are_left_out_and_extra_keys_added():
    df = cohort(600).with_columns(
        pl.when(pl.col("site") == "east").then(pl.lit("tiny")).otherwise(pl.col("site")).alias("site")
    ).filter((pl.col("site") != "tiny") | (pl.int_range(pl.len()) < 20))
    recs = E.evaluate(df, task="t", threshold=0.25, n_boot=0, min_group_size=30, extra={"model_version": "3"},
                      validation="temporal")
    assert "tiny" not in {r["site"] for r in recs}
    assert all(r["model_version"] == "3" and r["validation"] == "temporal" for r in recs)


def test_bad_input_named():
    with pytest.raises(InputError, match="missing column"):
        E.evaluate(cohort().drop("site"), task="t", threshold=0.25)
    with pytest.raises(InputError, match="mode"):
        E.evaluate(cohort(), task="t", threshold=0.25, mode="perfect")


def test_boolean_value_column_is_accepted_and_headline_table():
    df = cohort(800).rename({"y": "boolean_value"})
    recs = E.evaluate(df, task="onset_2y", threshold=0.25, n_boot=0, mode="ideal")
    table = E.headline_table(recs)
    assert "onset_2y" in table and "north" in table and "AUROC" in table
