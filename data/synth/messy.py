"""`chronorisk generate --realistic-codes`: records as messy as real ones, added to a site's MEDS events.

Real records are not 39 codes of a concept map. With this option each site's
events (per chunk, after simulation) get, deterministically from (seed, chunk, site):

- a long tail: about `TAIL_PER_PATIENT` extra records per patient between their first
  and last visit, with codes drawn Zipf-like (probability ~ 1/rank^1.1) from `TAIL_CODES`
  local codes `LOCAL//Z0001`...; every tenth carries a number (noise: no risk in it);
- a measurement outside the concept map whose values carry part of the risk:
  high-sensitivity CRP (`LOINC//30522-7`, mg/L) at about a third of ambulatory
  visits, log-normal around a level set by the patient's hidden frailty (the term
  of every log-hazard that no concept feature sees; docs/generator.md), whose sd is
  `FRAILTY_SD` in this mode;
- at `LOCAL_LAB_SITE`: fasting glucose under a local code, `LOCAL//GLU`, in mmol/L
  (not mapped to LOINC, so not the glucose concept);
- at `SMOKING_TEXT_SITE`: smoking status as words ("Current every day smoker",
  "Former smoker", "Never smoker"), and `UNKNOWN_SMOKING_SHARE` of them as an
  answer no table knows ("Tobacco use: declined to answer");
- at `ICD9_SITE`: diagnoses as ICD-9-CM codes without their dot (`ICD9CM//25000`).

Nothing else changes: the ground truth and the other events stay as simulated.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from chronorisk.data import codes as vocab

TAIL_CODES = 5_000
TAIL_PER_PATIENT = 8.0
TAIL_VALUE_EVERY = 10  # every tenth tail code carries a number
CRP = "LOINC//30522-7"
CRP_VISIT_SHARE = 0.35
# With realistic codes the hidden frailty is larger (sd 1.2 instead of 0.6), so that the lab that reveals
# it carries a share of the risk worth finding; the simulation draws the same random numbers either way.
FRAILTY_SD = 1.2
CRP_LOG_SD = 0.9  # sd of log(CRP) explained by frailty; measurement noise sd 0.3
LOCAL_GLUCOSE = "LOCAL//GLU"
MMOL_PER_MG_GLUCOSE = 1 / 18.016
LOCAL_LAB_SITE, ICD9_SITE, SMOKING_TEXT_SITE = 1, 2, 3  # positions in the site list
UNKNOWN_SMOKING = "Tobacco use: declined to answer"
UNKNOWN_SMOKING_SHARE = 0.03
SMOKING_WORDS = {
    **dict.fromkeys(vocab.SMOKING_CURRENT, "Current every day smoker"),
    **dict.fromkeys(vocab.SMOKING_FORMER, "Former smoker"),
    **dict.fromkeys(vocab.SMOKING_NEVER, "Never smoker"),
}
ICD9_OF_DIAGNOSIS = {  # data/codes.py diagnosis -> ICD-9-CM (the same concepts in concepts.yaml)
    "hypertension": "401.9", "diabetes": "250.00", "prediabetes": "790.29", "hyperlipidemia": "272.4",
    "obesity": "278.00", "ckd3": "585.3", "ckd4": "585.4", "nephropathy": "250.40", "retinopathy": "250.50",
    "neuropathy": "250.60", "chd": "414.01", "mi": "410.90", "stroke": "434.91", "heart_failure": "428.0",
}


def tail_codes() -> list[str]:
    return [f"LOCAL//Z{k:04d}" for k in range(1, TAIL_CODES + 1)]


def icd9_codes() -> dict[str, str]:
    """SNOMED and ICD-10-CM diagnosis codes of data/codes.py -> ICD-9-CM without the dot."""
    out = {}
    for name, dx in vocab.DIAGNOSES.items():
        icd9 = f"ICD9CM//{ICD9_OF_DIAGNOSIS[name].replace('.', '')}"
        out[dx.snomed] = icd9
        out[dx.icd10] = icd9
    return out


def make_messy(table: pa.Table, *, frailty: np.ndarray, first_id: int, site_index: int, seed: int,
               chunk: int) -> tuple[pa.Table, set[str]]:
    """The site's events with the messy records (module doc), in MEDS order; and the codes added.

    `frailty[subject_id - first_id]` is a subject's hidden frailty."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk, site_index, 7011]))
    events = pl.from_arrow(table)
    parts = [_recode(events, site_index, rng), _tail(events, rng), _crp(events, frailty, first_id, rng)]
    out = pl.concat(parts, how="vertical_relaxed").sort(["subject_id", "time", "code"], nulls_last=False)
    added = set(out.get_column("code").unique().to_list()) - set(events.get_column("code").unique().to_list())
    return out.to_arrow().cast(table.schema), added


def _recode(events: pl.DataFrame, site_index: int, rng: np.random.Generator) -> pl.DataFrame:
    code = pl.col("code")
    if site_index == LOCAL_LAB_SITE:
        glucose = code == vocab.MEASUREMENTS["glucose"].code
        events = events.with_columns(
            pl.when(glucose).then(pl.lit(LOCAL_GLUCOSE)).otherwise(code).alias("code"),
            pl.when(glucose).then((pl.col("numeric_value") * MMOL_PER_MG_GLUCOSE).round(1))
            .otherwise(pl.col("numeric_value")).cast(pl.Float32).alias("numeric_value"),
        )
    if site_index == ICD9_SITE:
        events = events.with_columns(code.replace(icd9_codes()).alias("code"))
    if site_index == SMOKING_TEXT_SITE:
        smoking = code == vocab.SMOKING_STATUS
        unknown = pl.Series(rng.random(events.height) < UNKNOWN_SMOKING_SHARE)
        words = pl.col("text_value").replace(SMOKING_WORDS)
        events = events.with_columns(
            pl.when(smoking & unknown).then(pl.lit(UNKNOWN_SMOKING))
            .when(smoking).then(words).otherwise(pl.col("text_value")).alias("text_value")
        )
    return events


def _spans(events: pl.DataFrame) -> pl.DataFrame:
    """Each subject's span of recorded activity: first to last encounter (diagnoses and births carry
    dates from long before the data starts; a tail there would move every task's start back)."""
    timed = events.filter(pl.col("code").str.starts_with(vocab.ENCOUNTER_PREFIX) & pl.col("time").is_not_null())
    return timed.group_by("subject_id", maintain_order=True).agg(
        pl.col("time").min().alias("first"), pl.col("time").max().alias("last")
    )


def _tail(events: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    spans = _spans(events)
    per = rng.poisson(TAIL_PER_PATIENT, spans.height)
    who = np.repeat(np.arange(spans.height), per)
    first = spans["first"].to_numpy().astype("datetime64[us]").astype(np.int64)[who]
    last = spans["last"].to_numpy().astype("datetime64[us]").astype(np.int64)[who]
    day = 86_400_000_000
    t = first + (rng.random(len(who)) * (last - first)).astype(np.int64)
    t = np.maximum(t - t % day, first)  # a date-only record, never before the record starts
    ranks = np.arange(1, TAIL_CODES + 1)
    p = 1.0 / ranks**1.1
    k = rng.choice(TAIL_CODES, len(who), p=p / p.sum())
    codes = np.array(tail_codes(), dtype=object)[k]
    has_value = (k + 1) % TAIL_VALUE_EVERY == 0
    values = np.where(has_value, np.round(rng.normal(50 + (k % 97), 10, len(who)), 1), np.nan)
    return _frame(spans["subject_id"].to_numpy()[who], t, codes, values)


def _crp(events: pl.DataFrame, frailty: np.ndarray, first_id: int, rng: np.random.Generator) -> pl.DataFrame:
    visits = events.filter(pl.col("code") == f"{vocab.ENCOUNTER_PREFIX}AMB").select("subject_id", "time")
    take = rng.random(visits.height) < CRP_VISIT_SHARE
    visits = visits.filter(pl.Series(take))
    subject = visits["subject_id"].to_numpy()
    z = frailty[subject - first_id]
    log_crp = np.log(1.5) + CRP_LOG_SD * z / FRAILTY_SD + rng.normal(0, 0.3, len(subject))
    values = np.round(np.exp(log_crp), 2)
    t = visits["time"].to_numpy().astype("datetime64[us]").astype(np.int64) + 1_800_000_000  # 30 minutes later
    return _frame(subject, t, np.full(len(subject), CRP, dtype=object), values)


def _frame(subject: np.ndarray, time_us: np.ndarray, codes: np.ndarray, values: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({
        "subject_id": pl.Series(subject, dtype=pl.Int64),
        "time": pl.Series(time_us, dtype=pl.Int64).cast(pl.Datetime("us")),
        "code": pl.Series(codes.tolist(), dtype=pl.String),
        "numeric_value": pl.Series(values, dtype=pl.Float32, nan_to_null=True),
        "text_value": pl.Series([None] * len(subject), dtype=pl.String),
    })
