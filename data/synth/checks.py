"""Checks of a generated cohort, read back from its MEDS output (used by tests and benchmarks).

These re-derive from the *written* records what the generator promises:
how many scheduled values are missing per site, and whether the ground truth
is calibrated against the outcomes that actually got recorded. They are the
generator's own checks, independent of the feature pipeline's label code.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chronorisk.data.codes import DIAGNOSES, MEASUREMENTS, SMOKING_STATUS
from chronorisk.data.meds_io import scan_site
from chronorisk.data.synth.hazards import COMPLICATION_OUTCOMES, ONSET_CONDITIONS
from chronorisk.data.synth.simulate import HORIZON_DAYS, SCHEDULED_VALUES

PANEL_CODES = [*(MEASUREMENTS[n].code for n in ("sbp", "dbp", "bmi", "hba1c", "glucose", "ldl", "hdl",
                                                 "total_chol", "creatinine", "egfr")), SMOKING_STATUS]
TASK_OUTCOMES = {"onset_2y": ONSET_CONDITIONS, "complication_1y": COMPLICATION_OUTCOMES}


def diagnosis_codes(names) -> list[str]:
    return [c for n in names for c in (DIAGNOSES[n].snomed, DIAGNOSES[n].icd10)]


def missing_share(meds_root: Path, site: str, encounter: str = "AMB") -> float:
    """Share of the scheduled panel values (11 per encounter) not recorded at `encounter` visits."""
    events = scan_site(meds_root, site)
    visits = events.filter(pl.col("code") == f"ENCOUNTER//{encounter}").select("subject_id", "time").unique()
    values = events.filter(pl.col("code").is_in(PANEL_CODES)).select("subject_id", "time")
    n_visits = visits.select(pl.len()).collect().item()
    if n_visits == 0:
        return float("nan")
    recorded = values.join(visits, on=["subject_id", "time"], how="semi").select(pl.len()).collect().item()
    return 1.0 - recorded / (n_visits * SCHEDULED_VALUES)


def realized_outcomes(meds_root: Path, truth_path: Path, task: str, sites: list[str]) -> pl.DataFrame:
    """Truth rows with `outcome`: an outcome diagnosis recorded in (t, t + horizon]."""
    truth = pl.scan_parquet(truth_path)
    horizon = pl.duration(days=HORIZON_DAYS[task])
    codes = diagnosis_codes(TASK_OUTCOMES[task])
    dx = pl.concat([scan_site(meds_root, s) for s in sites]).filter(pl.col("code").is_in(codes))
    hits = (
        truth.select("subject_id", "prediction_time")
        .join(dx.select("subject_id", "time"), on="subject_id")
        .filter((pl.col("time") > pl.col("prediction_time")) & (pl.col("time") <= pl.col("prediction_time") + horizon))
        .select("subject_id", "prediction_time").unique().with_columns(pl.lit(True).alias("outcome"))
    )
    return (truth.join(hits, on=["subject_id", "prediction_time"], how="left")
            .with_columns(pl.col("outcome").fill_null(False)).collect())
