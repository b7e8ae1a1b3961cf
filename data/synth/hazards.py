"""The generator's hazard model: what makes diagnoses, complications and deaths happen.

Every event rate is a proportional-hazards model on the patient's *latent*
(true, noise-free) state at the start of each monthly step:

    lambda_k(t) = exp( b0_k + sum_j beta_kj * x_j(t) + site_k + frailty_k )   [events per year]

and the probability of the event in a month is 1 - exp(-lambda_k / 12).
`x_j` are the covariates of `covariates()` (age, sex, blood pressure, HbA1c,
glucose, BMI, lipids, eGFR, smoking, statin adherence, diabetes duration and
the conditions already present); `b0` and `beta` are in `COEFFICIENTS`.
`site_k` is the site's `risk_shift` (onset of diabetes and hypertension) or
`outcome_shift` (complications), and `frailty_k` a hidden per-patient
log-hazard term; both are *unobservable* and are switched off in ideal mode.

A condition happens at most once (`onset`), only to patients who have its
prerequisite (`REQUIRES`), and becomes part of the record either at once
(`IMMEDIATE`: acute events, and everything in ideal mode) or at a later
routine visit, where a screening step with probability `DETECTION[group]`
records every present-but-unrecorded condition of that group (realistic mode).

`task_risk()` turns this into the ground truth of the two tasks: the
probability that the task's outcome is *recorded* within the horizon, given
everything generated up to the prediction time (latent conditions included),
by running a small Markov chain month by month along the expected path of
the risk factors (see docs/generator.md). The same functions drive the
simulation, so the truth and the data come from one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Conditions the generator tracks, by their `data.codes.DIAGNOSES` name.
CONDITIONS: tuple[str, ...] = (
    "hypertension", "diabetes", "chd", "ckd3", "ckd4", "nephropathy", "retinopathy", "neuropathy",
    "mi", "stroke", "heart_failure",
)
COND_INDEX = {name: i for i, name in enumerate(CONDITIONS)}
ONSET_CONDITIONS = ("hypertension", "diabetes")
COMPLICATION_OUTCOMES = ("ckd3", "ckd4", "nephropathy", "retinopathy", "neuropathy", "mi", "stroke", "heart_failure")

# Condition -> condition that must already be present (latent) for it to start.
REQUIRES: dict[str, str] = {
    "ckd4": "ckd3", "nephropathy": "diabetes", "retinopathy": "diabetes", "neuropathy": "diabetes",
}

# Probability that an onset is recorded at once (realistic mode); the rest wait for screening.
IMMEDIATE: dict[str, float] = {"mi": 1.0, "stroke": 1.0, "heart_failure": 0.5}

# Screening groups: at a routine (AMB) visit, with probability p, every present
# but unrecorded condition of the group is recorded (realistic mode).
DETECTION_GROUPS: dict[str, tuple[tuple[str, ...], float]] = {
    "metabolic": (("hypertension", "diabetes"), 0.5),
    "complication": (("chd", "ckd3", "ckd4", "nephropathy", "retinopathy", "neuropathy", "heart_failure"), 0.4),
}

# Hidden per-patient frailty (realistic mode): z ~ N(0, FRAILTY_SD^2), loaded per outcome kind.
FRAILTY_SD = 0.6
FRAILTY_LOADING = {"onset": 0.5, "complication": 1.0, "death": 0.7}

# Routine visits: patients with recorded diabetes or hypertension come this much more often.
CHRONIC_VISIT_FACTOR = 1.5

# Log-hazard coefficients (events per year). Covariates are defined in `covariates()`.
COEFFICIENTS: dict[str, dict[str, float]] = {
    "hypertension": {"intercept": -3.3, "age10": 0.35, "sbp10": 0.9, "bmi5": 0.25, "dm": 0.2, "smoker": 0.1},
    "diabetes": {"intercept": -4.8, "age10": 0.15, "hba1c_pre": 2.6, "glucose10": 0.12, "bmi5": 0.35,
                 "htn": 0.2},
    "chd": {"intercept": -5.2, "age10": 0.5, "male": 0.5, "sbp10": 0.15, "ldl40": 0.35, "hdl15": -0.3,
            "smoker": 0.5, "dm": 0.4},
    "ckd3": {"intercept": -3.2, "egfr60": 1.6, "dm": 0.3, "sbp10": 0.15, "age10": 0.1},
    "ckd4": {"intercept": -3.0, "egfr30": 1.6, "dm": 0.2},
    "nephropathy": {"intercept": -4.0, "hba1c7_dm": 0.45, "sbp10": 0.2, "egfr_low": 0.4, "dm_years10": 0.3},
    "retinopathy": {"intercept": -3.7, "hba1c7_dm": 0.55, "sbp10": 0.2, "dm_years10": 0.5},
    "neuropathy": {"intercept": -4.0, "hba1c7_dm": 0.4, "age10": 0.2, "dm_years10": 0.4, "smoker": 0.3,
                   "bmi5": 0.1},
    "mi": {"intercept": -5.8, "age10": 0.45, "male": 0.55, "sbp10": 0.2, "ldl40": 0.35, "hdl15": -0.25,
           "smoker": 0.6, "dm": 0.45, "hba1c7_dm": 0.15, "chd": 1.1, "statin": -0.3, "egfr_low": 0.2},
    "stroke": {"intercept": -5.7, "age10": 0.55, "sbp10": 0.35, "smoker": 0.45, "dm": 0.35, "htn": 0.3,
               "hdl15": -0.1, "statin": -0.15},
    "heart_failure": {"intercept": -5.6, "age10": 0.6, "male": 0.25, "sbp10": 0.2, "bmi5": 0.3, "dm": 0.35,
                      "chd": 0.9, "mi": 1.0, "egfr_low": 0.3, "hba1c7_dm": 0.1},
    "death": {"intercept": -5.5, "age10": 0.95, "male": 0.35, "smoker": 0.55, "dm": 0.3, "hf": 0.8,
              "stroke": 0.5, "mi": 0.5, "ckd3": 0.35, "ckd4": 0.7},
}

COVARIATE_DOCS: dict[str, str] = {
    "age10": "(age - 60) / 10, years",
    "male": "1 if male",
    "sbp10": "(systolic BP - 130) / 10, mm[Hg], after treatment",
    "hba1c_pre": "HbA1c - 5.7, %, after treatment",
    "hba1c7_dm": "(HbA1c - 7) if diabetic else 0",
    "glucose10": "(fasting glucose - 100) / 10, mg/dL",
    "bmi5": "(BMI - 27) / 5, kg/m2",
    "ldl40": "(LDL - 130) / 40, mg/dL, after treatment",
    "hdl15": "(HDL - 50) / 15, mg/dL",
    "egfr60": "(60 - eGFR) / 10, mL/min/1.73m2",
    "egfr30": "(30 - eGFR) / 10",
    "egfr_low": "max(0, 60 - eGFR) / 10",
    "smoker": "1 if current smoker",
    "dm": "1 if diabetes present (latent)",
    "htn": "1 if hypertension present (latent)",
    "chd": "1 if coronary heart disease present",
    "mi": "1 if a myocardial infarction happened",
    "stroke": "1 if a stroke happened",
    "hf": "1 if heart failure present",
    "ckd3": "1 if CKD stage 3 present",
    "ckd4": "1 if CKD stage 4 present",
    "dm_years10": "years since diabetes onset / 10 (0 without diabetes)",
    "statin": "smoothed statin coverage in [0, 1] (adherence)",
}


@dataclass(frozen=True)
class HiddenTerms:
    """Per-patient unobservable log-hazard terms (zero in ideal mode)."""

    risk_shift: np.ndarray  # site's onset shift
    outcome_shift: np.ndarray  # site's complication shift
    frailty: np.ndarray  # z

    def log_hazard_shift(self) -> np.ndarray:
        """(conditions + death, n): the hidden part of every log-hazard, constant in time."""
        rows = []
        for name in OUTCOMES:
            if name in ONSET_CONDITIONS:
                rows.append(self.risk_shift + FRAILTY_LOADING["onset"] * self.frailty)
            elif name == "death":
                rows.append(FRAILTY_LOADING["death"] * self.frailty)
            else:
                rows.append(self.outcome_shift + FRAILTY_LOADING["complication"] * self.frailty)
        return np.stack(rows)


OUTCOMES: tuple[str, ...] = (*CONDITIONS, "death")
COVARIATES: tuple[str, ...] = tuple(COVARIATE_DOCS)
assert {k for c in COEFFICIENTS.values() for k in c} - {"intercept"} <= set(COVARIATES)
# (outcomes, covariates) coefficient matrix and intercepts, built once from COEFFICIENTS.
# float32: the hazards are the simulation's hot loop, and 7 digits are plenty for probabilities.
_BETA = np.array([[COEFFICIENTS[o].get(c, 0.0) for c in COVARIATES] for o in OUTCOMES], dtype=np.float32)
_B0 = np.array([COEFFICIENTS[o]["intercept"] for o in OUTCOMES], dtype=np.float32)
_REQUIRED = np.array([COND_INDEX.get(REQUIRES.get(c, ""), -1) for c in CONDITIONS])


def covariates(
    *,
    age: np.ndarray,
    female: np.ndarray,
    sbp: np.ndarray,
    hba1c: np.ndarray,
    glucose: np.ndarray,
    bmi: np.ndarray,
    ldl: np.ndarray,
    hdl: np.ndarray,
    egfr: np.ndarray,
    smoker: np.ndarray,
    present: np.ndarray,
    dm_years: np.ndarray,
    statin: np.ndarray,
) -> np.ndarray:
    """The covariates of `COVARIATE_DOCS` as a (covariates, n) float32 matrix; `present` is (conditions, n)."""
    n = age.shape[0]
    x = np.empty((len(COVARIATES), n), dtype=np.float32)
    dm = present[COND_INDEX["diabetes"]]
    row = {c: x[i] for i, c in enumerate(COVARIATES)}
    np.subtract(age, 60.0, out=row["age10"])
    row["age10"] /= 10.0
    np.subtract(1.0, female, out=row["male"])
    np.subtract(sbp, 130.0, out=row["sbp10"])
    row["sbp10"] /= 10.0
    np.subtract(hba1c, 5.7, out=row["hba1c_pre"])
    np.multiply(hba1c - 7.0, dm, out=row["hba1c7_dm"])
    np.subtract(glucose, 100.0, out=row["glucose10"])
    row["glucose10"] /= 10.0
    np.subtract(bmi, 27.0, out=row["bmi5"])
    row["bmi5"] /= 5.0
    np.subtract(ldl, 130.0, out=row["ldl40"])
    row["ldl40"] /= 40.0
    np.subtract(hdl, 50.0, out=row["hdl15"])
    row["hdl15"] /= 15.0
    np.subtract(60.0, egfr, out=row["egfr60"])
    row["egfr60"] /= 10.0
    np.subtract(30.0, egfr, out=row["egfr30"])
    row["egfr30"] /= 10.0
    np.maximum(row["egfr60"], 0.0, out=row["egfr_low"])
    row["smoker"][:] = smoker
    for key, cond in (("dm", "diabetes"), ("htn", "hypertension"), ("chd", "chd"), ("mi", "mi"),
                      ("stroke", "stroke"), ("hf", "heart_failure"), ("ckd3", "ckd3"), ("ckd4", "ckd4")):
        row[key][:] = present[COND_INDEX[cond]]
    np.multiply(np.minimum(dm_years, 40.0), dm, out=row["dm_years10"])
    row["dm_years10"] /= 10.0
    row["statin"][:] = statin
    return x


def yearly_hazards(
    x: np.ndarray, present: np.ndarray, hidden_shift: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(onset hazards (conditions, n), death hazard (n,)) in events per year.

    `x` is the covariate matrix of `covariates()`, `hidden_shift` the
    (outcomes, n) matrix of `HiddenTerms.log_hazard_shift()` or None. A
    condition already present, or whose prerequisite is absent, has hazard 0.
    """
    eta = _BETA @ x
    eta += _B0[:, None]
    if hidden_shift is not None:
        eta += hidden_shift
    np.minimum(eta, np.float32(5.0), out=eta)
    rate = np.exp(eta)
    lam = rate[:-1]
    eligible = ~present
    needs = _REQUIRED >= 0
    eligible[needs] &= present[_REQUIRED[needs]]
    lam *= eligible
    return lam, rate[-1]


def monthly_probability(rate_per_year: np.ndarray | float) -> np.ndarray:
    """P(at least one event in a month) for a constant yearly rate."""
    return -np.expm1(-np.asarray(rate_per_year) / 12.0)


def chain_step(
    a: np.ndarray,
    b: np.ndarray,
    o: np.ndarray,
    *,
    p_death: np.ndarray,
    p_onset: np.ndarray,
    immediate: np.ndarray,
    q_detect: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One month of the truth chain.

    States: `a` no outcome condition present, `b` present but unrecorded,
    `o` outcome recorded (absorbing); death absorbs the rest. `p_onset` is
    (outcome conditions, n) monthly onset probabilities (0 when present),
    `immediate` the matching probabilities of immediate recording, `q_detect`
    P(screened at a routine visit this month). Order inside a month matches
    the simulation: death, then onsets, then the visit.
    """
    survive = 1.0 - p_death
    p_none = np.prod(1.0 - p_onset, axis=0)
    p_stay_unrecorded = np.prod(1.0 - p_onset * immediate, axis=0)
    o = o + (a + b) * survive * (1.0 - p_stay_unrecorded)
    b_new = b * survive * p_stay_unrecorded + a * survive * (p_stay_unrecorded - p_none)
    a_new = a * survive * p_none
    o = o + b_new * q_detect
    return a_new, b_new * (1.0 - q_detect), o


def coefficient_table_markdown() -> str:
    """The coefficient table as markdown (docs/generator.md embeds it; a test keeps them equal)."""
    names = [*CONDITIONS, "death"]
    keys: list[str] = []
    for name in names:
        for key in COEFFICIENTS[name]:
            if key not in keys:
                keys.append(key)
    lines = ["| covariate | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        cells = [f"{COEFFICIENTS[n][key]:+.2f}" if key in COEFFICIENTS[n] else "" for n in names]
        label = "b0 (intercept)" if key == "intercept" else f"`{key}`"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
