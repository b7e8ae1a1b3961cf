"""Latent risk-factor trajectories: one monthly step of every patient's true physiology.

The latent state is what the patient *is* (untreated BMI, HbA1c, systolic
BP, LDL, HDL, eGFR, smoking, medication coverage); measured values are the
treated values of `treated()` plus measurement noise (realistic mode).
`advance()` moves the state one month: a drift that depends on age, BMI and
the conditions present, plus a small Gaussian random walk (`NOISE_SD`). With
`noise=None` it follows the *expected path* (no random walk, medication
coverage at the patient's expected adherence), which is what the ground
truth integrates the hazards along.

Kidney function uses the CKD-EPI 2021 creatinine equation (race-free;
Inker et al., N Engl J Med 2021;385:1737-49) to turn latent eGFR into the
serum creatinine a lab would report, and measured creatinine back into eGFR.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from chronorisk.data.synth.hazards import COND_INDEX

# Medication slots: one per therapeutic line; `DRUGS` are `data.codes.MEDICATIONS` names.
SLOTS: tuple[str, ...] = ("ah1", "ah2", "metformin", "insulin", "statin")
SLOT_INDEX = {name: i for i, name in enumerate(SLOTS)}
DRUGS: tuple[str, ...] = (
    "lisinopril", "amlodipine", "hydrochlorothiazide", "metoprolol", "metformin", "insulin",
    "atorvastatin", "simvastatin",
)
DRUG_INDEX = {name: i for i, name in enumerate(DRUGS)}

# Full-adherence treatment effects.
SBP_LOWERING = {"ah1": 12.0, "ah2": 8.0}  # mm[Hg] per antihypertensive line
HBA1C_LOWERING = {"metformin": 0.9, "insulin": 1.5}  # HbA1c percentage points
LDL_REDUCTION = {"atorvastatin": 0.45, "simvastatin": 0.30}  # fraction of LDL
COVERAGE_SMOOTHING = 0.5  # effect(m) = 0.5 * effect(m-1) + 0.5 * coverage(m)

# Monthly random-walk standard deviations of the latent factors (realistic and ideal alike).
NOISE_SD = {"bmi": 0.15, "g": 0.03, "p": 0.8, "ldl": 1.5, "hdl": 0.4, "egfr": 0.35}
# Monthly smoking transitions.
QUIT_RATE, RELAPSE_RATE, START_RATE_UNDER_40 = 0.005, 0.002, 0.0004
SMOKE_NEVER, SMOKE_FORMER, SMOKE_CURRENT = 0, 1, 2

# Plausible latent ranges (values are clipped into them after each step).
BOUNDS = {"bmi": (17.0, 70.0), "g": (4.3, 14.0), "p": (100.0, 230.0), "ldl": (50.0, 320.0),
          "hdl": (18.0, 120.0), "egfr": (4.0, 140.0)}


@dataclass
class Latent:
    """The true state of n patients (arrays of length n, or (k, n) for conditions/slots)."""

    female: np.ndarray
    birth_day: np.ndarray  # days since 1970-01-01
    alpha: np.ndarray  # expected adherence (proportion of days covered)
    dbp_off: np.ndarray
    glu_off: np.ndarray
    tg_off: np.ndarray
    bmi: np.ndarray
    g: np.ndarray  # untreated HbA1c, %
    p: np.ndarray  # untreated systolic BP, mm[Hg]
    ldl: np.ndarray  # untreated LDL, mg/dL
    hdl: np.ndarray
    egfr: np.ndarray
    smoke: np.ndarray  # int8: never / former / current
    present: np.ndarray  # (conditions, n) bool: latent condition present
    onset_month: np.ndarray  # (conditions, n) int32 month index of onset (may be negative)
    slot_active: np.ndarray  # (slots, n) bool
    slot_drug: np.ndarray  # (slots, n) int8 index into DRUGS
    slot_s: np.ndarray  # (slots, n) smoothed coverage (the effect level)

    def take(self, idx: np.ndarray) -> Latent:
        """A copy restricted to patients `idx` (the truth runs its expected path on it)."""
        out = {}
        for f in fields(self):
            arr = getattr(self, f.name)
            out[f.name] = arr[:, idx].copy() if arr.ndim == 2 else arr[idx].copy()
        return Latent(**out)


def age_years(lat: Latent, day: int) -> np.ndarray:
    return (day - lat.birth_day) / 365.25


def ckd_epi_egfr(creatinine: np.ndarray, age: np.ndarray, female: np.ndarray) -> np.ndarray:
    """CKD-EPI 2021 eGFR (mL/min/1.73m2) from serum creatinine (mg/dL)."""
    kappa = np.where(female, 0.7, 0.9)
    alpha = np.where(female, -0.241, -0.302)
    r = creatinine / kappa
    return (142.0 * np.minimum(r, 1.0) ** alpha * np.maximum(r, 1.0) ** -1.2
            * 0.9938 ** age * np.where(female, 1.012, 1.0))


def ckd_epi_creatinine(egfr: np.ndarray, age: np.ndarray, female: np.ndarray) -> np.ndarray:
    """Inverse of `ckd_epi_egfr`: the creatinine that gives this eGFR."""
    kappa = np.where(female, 0.7, 0.9)
    alpha = np.where(female, -0.241, -0.302)
    a = egfr / (142.0 * 0.9938 ** age * np.where(female, 1.012, 1.0))
    r = np.where(a >= 1.0, a ** (1.0 / alpha), a ** (-1.0 / 1.2))
    return kappa * r


def treated(lat: Latent, age: np.ndarray) -> dict[str, np.ndarray]:
    """Latent values after treatment: what a perfect instrument would measure now.

    Creatinine is left out (costly, and only needed where measured): `ckd_epi_creatinine`.
    """
    s = lat.slot_s
    sbp = lat.p - SBP_LOWERING["ah1"] * s[SLOT_INDEX["ah1"]] - SBP_LOWERING["ah2"] * s[SLOT_INDEX["ah2"]]
    dbp = 0.45 * sbp + 22.0 - 0.15 * (age - 50.0) + lat.dbp_off
    hba1c = np.maximum(
        lat.g - HBA1C_LOWERING["metformin"] * s[SLOT_INDEX["metformin"]]
        - HBA1C_LOWERING["insulin"] * s[SLOT_INDEX["insulin"]],
        4.5,
    )
    glucose = np.maximum(100.0 + 28.0 * (hba1c - 5.5) + lat.glu_off, 65.0)
    statin = SLOT_INDEX["statin"]
    efficacy = np.where(lat.slot_drug[statin] == DRUG_INDEX["atorvastatin"],
                        LDL_REDUCTION["atorvastatin"], LDL_REDUCTION["simvastatin"])
    ldl = lat.ldl * (1.0 - efficacy * s[statin])
    tg = np.maximum(120.0 + 5.0 * (lat.bmi - 27.0) + lat.tg_off, 40.0)
    return {
        "sbp": sbp,
        "dbp": np.clip(dbp, 35.0, 150.0),
        "hba1c": hba1c,
        "glucose": glucose,
        "bmi": lat.bmi,
        "ldl": ldl,
        "hdl": lat.hdl,
        "total_chol": ldl + lat.hdl + tg / 5.0,
        "egfr": lat.egfr,
        "statin": s[statin],
    }


def advance(
    lat: Latent,
    age: np.ndarray,
    vals: dict[str, np.ndarray],
    coverage: np.ndarray,
    rng: np.random.Generator | None,
    months: int = 1,
) -> None:
    """Move the latent state one month, in place.

    `coverage` is (slots, n) this month's proportion of days covered (the
    expected path passes `alpha` for active slots). `rng=None` follows the
    expected path: no random walk, no smoking transitions; there `months`
    can take several months in one (Euler) step, with the drift of now.
    """
    if rng is not None and months != 1:
        raise ValueError("the stochastic step moves one month at a time")
    dm = lat.present[COND_INDEX["diabetes"]]
    htn = lat.present[COND_INDEX["hypertension"]]
    ckd3 = lat.present[COND_INDEX["ckd3"]]
    bmi5 = (lat.bmi - 27.0) / 5.0
    drift = {
        "bmi": 0.012 - 0.0006 * (age - 50.0),
        "g": 0.0008 + 0.002 * bmi5 + 0.012 * dm,
        "p": 0.035 + 0.0015 * (age - 50.0) + 0.02 * bmi5 + 0.05 * htn,
        "ldl": np.full_like(age, 0.02),
        "hdl": np.zeros_like(age),
        "egfr": -(0.06 + 0.08 * dm + 0.006 * np.maximum(0.0, vals["sbp"] - 130.0)
                  + 0.03 * dm * np.maximum(0.0, vals["hba1c"] - 7.0) + 0.05 * ckd3),
    }
    n = age.shape[0]
    noise = rng.standard_normal((len(NOISE_SD), n)) if rng is not None else None
    for j, (name, sd) in enumerate(NOISE_SD.items()):
        value = getattr(lat, name) + months * drift[name]
        if noise is not None:
            value = value + sd * noise[j]
        lo, hi = BOUNDS[name]
        setattr(lat, name, np.clip(value, lo, hi))
    keep = COVERAGE_SMOOTHING ** months
    lat.slot_s = keep * lat.slot_s + (1.0 - keep) * coverage
    if rng is not None:
        u = rng.random(n)
        smoke = lat.smoke
        quit_ = (smoke == SMOKE_CURRENT) & (u < QUIT_RATE)
        relapse = (smoke == SMOKE_FORMER) & (u < RELAPSE_RATE)
        start = (smoke == SMOKE_NEVER) & (age < 40.0) & (u < START_RATE_UNDER_40)
        smoke = smoke.copy()
        smoke[quit_] = SMOKE_FORMER
        smoke[relapse | start] = SMOKE_CURRENT
        lat.smoke = smoke


def dm_years(lat: Latent, month: int) -> np.ndarray:
    """Years since diabetes onset at `month` (0 without diabetes)."""
    i = COND_INDEX["diabetes"]
    return np.where(lat.present[i], (month - lat.onset_month[i]) / 12.0, 0.0)
