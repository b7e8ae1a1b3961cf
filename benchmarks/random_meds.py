"""Random but realistic MEDS events for feature benchmarks (not the cohort generator).

About 150 events per patient over 5 years across the codes of data/codes.py:
visits with encounters, blood pressure, weight/BMI, labs, smoking status,
medication refills (days supplied as numeric_value), diagnoses in SNOMED or
ICD-10-CM and a long tail of other codes (every tenth with a number). Values have a per-patient level
plus noise; nothing here has a clinical model behind it: it exists so the
feature pipeline and the pandas baseline are timed on data of the right
shape and size. Written in shards of `shard_size` subjects, sorted by
subject and time, with `chronorisk.data.meds_io.write_events`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from chronorisk.data import codes as vocab
from chronorisk.data.meds_io import write_events

START = datetime(2020, 1, 1)
END = datetime(2025, 1, 1)
_US_PER_DAY = 86_400_000_000

# (measurement, mean, sd of patient level, sd of visit noise, probability per visit)
_MEASURES = [
    ("sbp", 132, 14, 9, 0.8), ("dbp", 81, 8, 6, 0.8), ("weight", 82, 15, 1.5, 0.5),
    ("bmi", 28.5, 5, 0.5, 0.5), ("height", 170, 9, 0.5, 0.1), ("hba1c", 6.1, 1.0, 0.3, 0.3),
    ("glucose", 108, 25, 12, 0.3), ("total_chol", 195, 30, 12, 0.3), ("ldl", 115, 28, 10, 0.3),
    ("hdl", 50, 12, 4, 0.3), ("triglycerides", 150, 50, 25, 0.3), ("creatinine", 1.0, 0.25, 0.08, 0.3),
    ("egfr", 82, 18, 5, 0.3),
]
_DIAGNOSES = list(vocab.DIAGNOSES.values())
_MEDS = list(vocab.MEDICATIONS.values())
_SMOKING = [*vocab.SMOKING_CURRENT[:1], *vocab.SMOKING_FORMER, *vocab.SMOKING_NEVER]


def _events_for(ids: np.ndarray, rng: np.random.Generator, n_codes: int = 3000) -> pl.DataFrame:
    n = len(ids)
    span = (END - START).total_seconds() * 1e6
    t0 = np.datetime64(START, "us").astype(np.int64)
    frames: list[pl.DataFrame] = []

    def add(subj_idx: np.ndarray, times: np.ndarray | None, codes, values=None, texts=None) -> None:
        frames.append(
            pl.DataFrame(
                {
                    "subject_id": ids[subj_idx],
                    "time": None if times is None else times.astype("datetime64[us]"),
                    "code": codes,
                    "numeric_value": values,
                    "text_value": texts,
                },
                schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                        "numeric_value": pl.Float32, "text_value": pl.String},
            )
        )

    everyone = np.arange(n)
    add(everyone, None, np.where(rng.random(n) < 0.52, vocab.SEX_FEMALE, vocab.SEX_MALE))
    age_days = rng.uniform(20, 90, n) * 365.25
    add(everyone, t0 - (age_days * _US_PER_DAY).astype(np.int64), np.full(n, vocab.BIRTH))

    visits = rng.poisson(13, n) + 1
    v_subj = np.repeat(everyone, visits)
    v_time = t0 + (rng.random(len(v_subj)) * span).astype(np.int64)
    v_time -= v_time % _US_PER_DAY  # visits at midnight, like date-only sources
    enc = rng.choice(["ENCOUNTER//AMB", "ENCOUNTER//EMER", "ENCOUNTER//IMP"], len(v_subj), p=[0.9, 0.07, 0.03])
    add(v_subj, v_time, enc)
    for name, mean, sd_level, sd_noise, p in _MEASURES:
        m = vocab.MEASUREMENTS[name]
        level = rng.normal(mean, sd_level, n)
        take = rng.random(len(v_subj)) < p
        s = v_subj[take]
        values = np.clip(level[s] + rng.normal(0, sd_noise, len(s)), *m.plausible)
        add(s, v_time[take] + 600_000_000, np.full(len(s), m.code), values.astype(np.float32))
    take = rng.random(len(v_subj)) < 0.3
    add(v_subj[take], v_time[take], np.full(take.sum(), vocab.SMOKING_STATUS),
        texts=rng.choice(_SMOKING, take.sum()))

    # medication refills: 0-3 chronic drugs per patient, a refill every 30-90 days
    n_drugs = rng.choice(4, n, p=[0.35, 0.3, 0.2, 0.15])
    d_subj = np.repeat(everyone, n_drugs)
    d_code = rng.choice([m.code for m in _MEDS], len(d_subj))
    refills = rng.integers(8, 25, len(d_subj))
    r_subj = np.repeat(d_subj, refills)
    r_code = np.repeat(d_code, refills)
    r_time = t0 + (rng.random(len(r_subj)) * span).astype(np.int64)
    supply = rng.choice([30.0, 60.0, 90.0], len(r_subj), p=[0.6, 0.2, 0.2]).astype(np.float32)
    add(r_subj, r_time, r_code, supply)

    # diagnoses: 0-4 per patient, half SNOMED, half ICD-10-CM
    n_dx = rng.choice(5, n, p=[0.3, 0.3, 0.2, 0.12, 0.08])
    x_subj = np.repeat(everyone, n_dx)
    dx = rng.integers(0, len(_DIAGNOSES), len(x_subj))
    use_icd = rng.random(len(x_subj)) < 0.5
    x_code = np.where(use_icd, [_DIAGNOSES[i].icd10 for i in dx], [_DIAGNOSES[i].snomed for i in dx])
    add(x_subj, t0 + (rng.random(len(x_subj)) * span).astype(np.int64), x_code)

    # a long tail of other codes (procedures, other observations), Zipf-like frequencies
    n_other = rng.poisson(32, n)
    o_subj = np.repeat(everyone, n_other)
    rank = np.minimum(rng.zipf(1.3, len(o_subj)), n_codes)
    o_code = np.char.add("SNOMED//", (100000 + rank).astype(str))
    # every tenth of these codes carries a number (a local lab), around a level of its own
    o_value = np.where(rank % 10 == 0, rng.normal(50 + rank % 97, 10, len(o_subj)), np.nan).astype(np.float32)
    add(o_subj, t0 + (rng.random(len(o_subj)) * span).astype(np.int64), o_code, o_value)
    return pl.concat(frames, how="vertical")


def write_random_meds(out: Path, n_patients: int, seed: int = 0, shard_size: int = 50_000,
                      first_id: int = 1_000_000, n_codes: int = 3000) -> list[Path]:
    """Write `n_patients` subjects' events as MEDS shards `out/data/<i>.parquet`; returns the paths.

    The long tail draws from `n_codes` distinct codes (Zipf-like: nearly all appear from ~50,000
    patients on)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, lo in enumerate(range(0, n_patients, shard_size)):
        ids = np.arange(first_id + lo, first_id + min(lo + shard_size, n_patients), dtype=np.int64)
        path = Path(out) / "data" / f"{i}.parquet"
        write_events(_events_for(ids, rng, n_codes), path)
        paths.append(path)
    return paths
