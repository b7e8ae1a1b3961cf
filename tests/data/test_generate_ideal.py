"""`--ideal`: every scheduled value measured, without noise, at visits at least quarterly."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
import pytest

from chronorisk.data import meds_io
from chronorisk.data.config import GenerateConfig
from chronorisk.data.synth import dynamics as dyn
from chronorisk.data.synth.checks import missing_share, realized_outcomes
from chronorisk.data.synth.runner import generate


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ideal")
    generate(GenerateConfig(patients=900, seed=8, chunk_size=900, ideal=True), root / "ideal", workers=1)
    generate(GenerateConfig(patients=900, seed=8, chunk_size=900), root / "real", workers=1)
    return root / "ideal", root / "real"


def test_no_scheduled_value_is_missing(cohorts):
    ideal, real = cohorts
    for site in meds_io.site_ids(ideal / "meds"):
        for encounter in ("AMB", "EMER"):
            assert missing_share(ideal / "meds", site, encounter) == 0.0, (site, encounter)
        assert missing_share(real / "meds", site) > 0.1


def test_visits_are_at_least_quarterly(cohorts):
    ideal, _ = cohorts
    visits = (meds_io.scan_sites(ideal / "meds")
              .filter((pl.col("code") == "ENCOUNTER//AMB") & (pl.col("time") >= datetime(2019, 1, 1)))
              .select("subject_id", "time").unique().sort("subject_id", "time").collect())
    gaps = visits.with_columns(pl.col("time").diff().over("subject_id").dt.total_days().alias("gap"))
    assert gaps["gap"].max() <= 3 * 31 + 27
    first = visits.group_by("subject_id").agg(pl.col("time").min())
    assert first["time"].max() < datetime(2019, 4, 1)


def _egfr_vs_creatinine(root):
    """Relative gap between reported eGFR and CKD-EPI 2021 from the reported creatinine."""
    df = meds_io.scan_sites(root / "meds").filter(
        pl.col("code").is_in(["LOINC//38483-4", "LOINC//33914-3", "MEDS_BIRTH", "GENDER//F"])).collect()
    birth = df.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", pl.col("time").alias("birth"))
    female = set(df.filter(pl.col("code") == "GENDER//F")["subject_id"])
    creatinine = df.filter(pl.col("code") == "LOINC//38483-4").select(
        "subject_id", "time", pl.col("numeric_value").alias("creatinine"))
    egfr = df.filter(pl.col("code") == "LOINC//33914-3").select(
        "subject_id", "time", pl.col("numeric_value").alias("egfr"))
    labs = creatinine.join(egfr, on=["subject_id", "time"]).join(birth, on="subject_id")
    age = ((labs["time"].dt.truncate("1mo") - labs["birth"]).dt.total_days() / 365.25).to_numpy()
    sex = labs["subject_id"].is_in(list(female)).to_numpy()
    computed = dyn.ckd_epi_egfr(labs["creatinine"].to_numpy().astype(float), age, sex)
    return np.abs(computed - labs["egfr"].to_numpy()) / labs["egfr"].to_numpy()


def _visit_to_visit_sbp_change(root) -> float:
    sbp = (meds_io.scan_sites(root / "meds").filter(pl.col("code") == "LOINC//8480-6")
           .select("subject_id", "time", "numeric_value").sort("subject_id", "time").collect())
    change = sbp.with_columns(pl.col("numeric_value").diff().over("subject_id").abs().alias("d"))
    return float(change["d"].median())


def test_measurements_carry_no_noise(cohorts):
    ideal, real = cohorts
    assert np.quantile(_egfr_vs_creatinine(ideal), 0.99) < 0.03  # labs agree up to unit rounding
    assert _visit_to_visit_sbp_change(ideal) < 3.0  # the latent walk only (0.8 mm[Hg] a month)
    assert _visit_to_visit_sbp_change(real) > 5.0  # plus a 7 mm[Hg] measurement error


def test_ideal_truth_is_calibrated(cohorts):
    ideal, _ = cohorts
    sites = meds_io.site_ids(ideal / "meds")
    for task in ("onset_2y", "complication_1y"):
        df = realized_outcomes(ideal / "meds", ideal / "truth" / f"{task}.parquet", task, sites)
        assert abs(df["outcome"].mean() - df["true_risk"].mean()) < 0.02, task
