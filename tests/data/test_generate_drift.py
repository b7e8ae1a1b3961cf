"""Drift injection: visible at the drifted site from the date on, and nowhere before it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from chronorisk.data import meds_io
from chronorisk.data.config import DriftConfig, GenerateConfig
from chronorisk.data.synth.drift import parse_drift
from chronorisk.data.synth.runner import generate
from chronorisk.errors import InputError

WHEN = datetime(2023, 1, 1)
BASE = {"patients": 1200, "seed": 21, "chunk_size": 1200}


def _cohort(root: Path, drift: list[str]) -> pl.DataFrame:
    cfg = GenerateConfig(**BASE, drift=[parse_drift(d) for d in drift])
    generate(cfg, root, workers=1)
    return meds_io.scan_sites(root / "meds").collect()


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, pl.DataFrame]:
    root = tmp_path_factory.mktemp("drift")
    return {
        "none": _cohort(root / "none", []),
        "units": _cohort(root / "units", ["site=chc_riverside,from=2023-01-01,kind=units"]),
        "lab_bias": _cohort(root / "lab", ["site=hosp_central,from=2023-01-01,kind=lab_bias"]),
        "population": _cohort(root / "pop", ["site=chc_harbour,from=2023-01-01,kind=population"]),
    }


def test_parse_drift():
    d = parse_drift("site=hosp_east, from=2024-03-01, kind=lab_bias")
    assert d == DriftConfig(site="hosp_east", start="2024-03-01", kind="lab_bias")
    for bad in ("hosp_east", "site=a,from=2024-01-01", "site=a,from=x,kind=units", "site=a,from=2024-01-01,kind=x",
                "site=a,site=b,from=2024-01-01,kind=units", "site=a,from=2024-01-01,kind=units,when=now"):
        with pytest.raises(InputError, match="--drift"):
            parse_drift(bad)


def test_units_drift_sends_raw_mmol_values_after_the_date_only(cohorts):
    base, drift = cohorts["none"], cohorts["units"]
    assert base.select("subject_id", "time", "code").equals(drift.select("subject_id", "time", "code"))
    changed = base["numeric_value"].ne_missing(drift["numeric_value"])
    rows = base.filter(changed)
    assert set(rows["code"]) == {"LOINC//2339-0"} and set(rows["site"]) == {"chc_riverside"}
    assert rows["time"].min() >= WHEN
    glucose = (base.with_columns(drift["numeric_value"].alias("drifted"))
               .filter((pl.col("code") == "LOINC//2339-0") & (pl.col("site") == "chc_riverside")))
    after = glucose.filter(pl.col("time") >= WHEN)
    assert after.height == rows.height > 100  # every glucose value after the date
    ratio = (after["numeric_value"] / after["drifted"]).to_numpy()
    assert np.median(ratio) == pytest.approx(18.0, rel=0.02)
    assert 3 < after["drifted"].median() < 8


def test_lab_bias_raises_hba1c_and_glucose_after_the_date_only(cohorts):
    base, drift = cohorts["none"], cohorts["lab_bias"]
    before_b, before_d = base.filter(pl.col("time") < WHEN), drift.filter(pl.col("time") < WHEN)
    assert before_b.equals(before_d)

    def mean(df, site, code):
        return df.filter((pl.col("time") >= WHEN) & (pl.col("site") == site) & (pl.col("code") == code))[
            "numeric_value"].mean()

    assert mean(drift, "hosp_central", "LOINC//4548-4") - mean(base, "hosp_central", "LOINC//4548-4") == \
        pytest.approx(0.6, abs=0.12)
    assert mean(drift, "hosp_central", "LOINC//2339-0") - mean(base, "hosp_central", "LOINC//2339-0") == \
        pytest.approx(15.0, abs=3.0)
    for site in ("hosp_east", "chc_riverside"):
        assert abs(mean(drift, site, "LOINC//4548-4") - mean(base, site, "LOINC//4548-4")) < 0.1


def test_population_drift_brings_older_heavier_patients_from_the_date(cohorts):
    df = cohorts["population"].filter(pl.col("site") == "chc_harbour")
    dynamic = df.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))
    first = dynamic.group_by("subject_id").agg(pl.col("time").min().alias("first"))
    arrivals = set(first.filter(pl.col("first") >= WHEN)["subject_id"])
    regulars = set(first.filter(pl.col("first") < WHEN)["subject_id"])
    share = len(arrivals) / df["subject_id"].n_unique()
    assert 0.3 < share < 0.5
    assert first.filter(pl.col("subject_id").is_in(list(arrivals)))["first"].max() < datetime(2023, 4, 2)
    age = (df.filter(pl.col("code") == "MEDS_BIRTH")
           .with_columns(((pl.lit(WHEN) - pl.col("time")).dt.total_days() / 365.25).alias("age")))

    def mean_of(frame, who, col="age"):
        return frame.filter(pl.col("subject_id").is_in(list(who)))[col].mean()

    assert mean_of(age, arrivals) - mean_of(age, regulars) > 7
    bmi = df.filter((pl.col("code") == "LOINC//39156-5") & (pl.col("time") >= WHEN))
    assert mean_of(bmi, arrivals, "numeric_value") - mean_of(bmi, regulars, "numeric_value") > 2.5
    base = cohorts["none"].filter(pl.col("site") == "chc_harbour")
    before = base.filter(pl.col("time") < WHEN)["subject_id"].n_unique()
    assert before == base["subject_id"].n_unique()  # without drift everyone has records before the date


def test_population_drift_truth_starts_after_registration(tmp_path):
    drift = [parse_drift("site=chc_riverside,from=2022-03-01,kind=population")]
    cfg = GenerateConfig(**{**BASE, "patients": 500}, drift=drift)
    generate(cfg, tmp_path, workers=1)
    events = meds_io.scan_site(tmp_path / "meds", "chc_riverside").collect()
    first = (events.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))
             .group_by("subject_id").agg(pl.col("time").min().alias("first")))
    truth = pl.concat([pl.read_parquet(tmp_path / "truth" / f"{t}.parquet") for t in ("onset_2y", "complication_1y")])
    arrivals = first.filter(pl.col("first") >= datetime(2022, 3, 1))
    assert arrivals.height > 10
    joined = truth.join(arrivals, on="subject_id")
    assert joined.height > 0 and (joined["prediction_time"] > joined["first"]).all()
    assert truth.filter(pl.col("subject_id").is_in(arrivals["subject_id"].to_list()))["prediction_time"].min() >= \
        datetime(2022, 7, 1)
