"""Ground truth: P(the task's outcome is recorded within the horizon | everything up to t).

For each prediction time t (a grid month) and each patient in a task's
population, `task_risk()` runs the hazard model forward from the patient's
state at t along the *expected path* of the risk factors (no random walk,
medication coverage at the patient's expected adherence, conditions and
treatments held as they are at t) and propagates a three-state chain month
by month (`hazards.chain_step`): no outcome condition / present but not yet
recorded / recorded, with death absorbing. It never looks at the realized
future. The approximation is that the factors' random walk and any new
condition or treatment inside the horizon are averaged out; the test suite
checks that mean true risk matches the realized label rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from chronorisk.data.synth import dynamics as dyn
from chronorisk.data.synth.hazards import (
    CHRONIC_VISIT_FACTOR,
    COEFFICIENTS,
    COMPLICATION_OUTCOMES,
    COND_INDEX,
    DETECTION_GROUPS,
    IMMEDIATE,
    ONSET_CONDITIONS,
    OUTCOMES,
    chain_step,
    covariates,
    monthly_probability,
    yearly_hazards,
)


def _coef(outcome: str, covariate: str) -> float:
    return COEFFICIENTS[outcome].get(covariate, 0.0)


def walk_variance(lat: dyn.Latent, vals: dict[str, np.ndarray]) -> np.ndarray:
    """(outcomes, n): variance added per month to each log-hazard by the factors' random walk.

    The log-hazards are linear in the latent factors, each of which takes a
    Gaussian step of SD `dynamics.NOISE_SD` every month; k months ahead the
    linear predictor is Gaussian around its expected path with variance
    k * this, so the expected hazard is exp(eta + k * this / 2).
    """
    dm = lat.present[COND_INDEX["diabetes"]]
    sd = dyn.NOISE_SD
    ldl_scale = vals["ldl"] / lat.ldl  # treatment scales the LDL walk
    below_60 = vals["egfr"] < 60.0
    rows = []
    for o in OUTCOMES:
        g_coef = _coef(o, "hba1c_pre") + _coef(o, "hba1c7_dm") * dm + _coef(o, "glucose10") * 2.8
        egfr_coef = _coef(o, "egfr60") + _coef(o, "egfr30") + _coef(o, "egfr_low") * below_60
        rows.append(
            (_coef(o, "sbp10") / 10.0 * sd["p"]) ** 2
            + (g_coef * sd["g"]) ** 2
            + (_coef(o, "bmi5") / 5.0 * sd["bmi"]) ** 2
            + (_coef(o, "ldl40") / 40.0 * sd["ldl"] * ldl_scale) ** 2
            + (_coef(o, "hdl15") / 15.0 * sd["hdl"]) ** 2
            + (egfr_coef / 10.0 * sd["egfr"]) ** 2
        )
    return np.stack(rows)


QUARTER = 3
ONSET_IDX = np.array([COND_INDEX[c] for c in ONSET_CONDITIONS])
COMPLICATION_IDX = np.array([COND_INDEX[c] for c in COMPLICATION_OUTCOMES])


@dataclass(frozen=True)
class Care:
    """What the clinician knows, so that the expected path can anticipate treatment changes.

    `recorded` (conditions, n) is what is on record, `slot_start` (slots, n) the month each
    medication line started, `missing` (n,) the chance a scheduled panel is not measured.
    """

    recorded: np.ndarray
    slot_start: np.ndarray
    missing: np.ndarray
    noise_sd: dict[str, float] | None = None  # measurement error behind the rules' thresholds


def _above(value: np.ndarray, threshold: float, sd: float) -> np.ndarray:
    """P(a measurement of `value` with error SD `sd` reads at least `threshold`)."""
    if sd <= 0:
        return (value >= threshold).astype(np.float64)
    return ndtr((value - threshold) / sd)


def anticipate_treatment(active: np.ndarray, lat: dyn.Latent, care: Care, vals: dict[str, np.ndarray],
                         age: np.ndarray, month: int, fire: np.ndarray | float) -> None:
    """Raise `active` (slots, n: probability each line is running) where the treatment rules
    of the simulation would start a line at a visit this quarter; `fire` is the probability
    that such a visit, with the panel measured, happens in the quarter."""
    rec = care.recorded
    since = month - care.slot_start
    htn, dm = rec[COND_INDEX["hypertension"]], rec[COND_INDEX["diabetes"]]
    vascular = rec[COND_INDEX["chd"]] | rec[COND_INDEX["mi"]] | rec[COND_INDEX["stroke"]]
    ah1, met = dyn.SLOT_INDEX["ah1"], dyn.SLOT_INDEX["metformin"]
    sd = care.noise_sd or {}
    ldl_high = _above(vals["ldl"], 190.0, sd.get("ldl", 0.0))
    due = {
        "ah1": htn.astype(np.float64),
        "ah2": (htn & (active[ah1] > 0) & (since[ah1] >= 6)) * _above(vals["sbp"], 150.0, sd.get("sbp", 0.0)),
        "metformin": dm.astype(np.float64),
        "insulin": (dm & (active[met] > 0) & (since[met] >= 6)) * _above(vals["hba1c"], 8.5, sd.get("hba1c", 0.0)),
        "statin": np.maximum(((dm & (age >= 40.0)) | vascular).astype(np.float64), ldl_high),
    }
    statin = dyn.SLOT_INDEX["statin"]
    new_statin = (due["statin"] > 0) & (active[statin] == 0)
    lat.slot_drug[statin, new_statin] = np.where(vascular[new_statin], dyn.DRUG_INDEX["atorvastatin"],
                                                 dyn.DRUG_INDEX["simvastatin"])
    for slot, cond in due.items():
        s = dyn.SLOT_INDEX[slot]
        active[s] += (1.0 - active[s]) * fire * cond


@dataclass(frozen=True)
class TaskHorizon:
    """Which task is evaluated and for how many months (0 = not at this date)."""

    onset_months: int
    complication_months: int


def hazards_now(lat: dyn.Latent, month: int, day: int, hidden: np.ndarray | None):
    """(age, treated values, onset hazards, death hazard) of every patient at the start of `month`.

    `hidden` is the (outcomes, n) hidden log-hazard shift, or None (ideal mode).
    """
    age = dyn.age_years(lat, day)
    vals = dyn.treated(lat, age)
    x = covariates(
        age=age, female=lat.female, sbp=vals["sbp"], hba1c=vals["hba1c"], glucose=vals["glucose"],
        bmi=vals["bmi"], ldl=vals["ldl"], hdl=vals["hdl"], egfr=vals["egfr"],
        smoker=lat.smoke == dyn.SMOKE_CURRENT, present=lat.present, dm_years=dyn.dm_years(lat, month),
        statin=vals["statin"],
    )
    lam, death = yearly_hazards(x, lat.present, hidden)
    return age, vals, lam, death


def task_risk(
    lat: dyn.Latent,
    *,
    month: int,
    month_start: np.ndarray,
    hidden: np.ndarray | None,
    visit_rate: np.ndarray,
    ideal: bool,
    horizon: TaskHorizon,
    care: Care | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(onset risk, complication risk) for every patient of `lat` at the start of `month`.

    `lat` is modified (pass a copy: `Latent.take`). `visit_rate` is the
    routine-visit rate per year of a patient without recorded diabetes or
    hypertension. With `care`, medication lines the treatment rules would
    start inside the horizon are anticipated (with the probability that a
    visit measures what triggers them). Each risk is computed for every row;
    the caller keeps the rows that belong to the task's population.
    """
    n = lat.female.shape[0]
    months = max(horizon.onset_months, horizon.complication_months)
    present = lat.present
    chains = {}
    for task, idx in (("onset", ONSET_IDX), ("complication", COMPLICATION_IDX)):
        b = present[idx].any(axis=0).astype(np.float64)
        chains[task] = [1.0 - b, b, np.zeros(n)]
    imm_onset = np.ones((len(ONSET_IDX), 1)) if ideal else np.zeros((len(ONSET_IDX), 1))
    imm_comp = np.array([[1.0 if ideal else IMMEDIATE.get(c, 0.0)] for c in COMPLICATION_OUTCOMES])
    if ideal:
        q_onset = q_comp = 0.0
    else:
        q_onset = monthly_probability(visit_rate) * DETECTION_GROUPS["metabolic"][1]
        q_comp = monthly_probability(visit_rate * CHRONIC_VISIT_FACTOR) * DETECTION_GROUPS["complication"][1]
    active = lat.slot_active.astype(np.float64)
    expected_coverage = active * lat.alpha[None, :]
    fire: np.ndarray | float = 1.0
    if care is not None and not ideal:
        chronic = care.recorded[COND_INDEX["hypertension"]] | care.recorded[COND_INDEX["diabetes"]]
        monthly = monthly_probability(visit_rate * np.where(chronic, CHRONIC_VISIT_FACTOR, 1.0))
        fire = 1.0 - (1.0 - monthly * (1.0 - care.missing)) ** QUARTER
    # Hazards are evaluated at the middle month of each quarter and held for its three months
    # (midpoint rule); the expected path moves a quarter at a time between midpoints.
    age = dyn.age_years(lat, int(month_start[month]))
    dyn.advance(lat, age, dyn.treated(lat, age), expected_coverage, rng=None, months=1)
    variance = None
    for block in range(0, months, QUARTER):
        mid = block + 1
        m = month + mid
        age, vals, lam, death = hazards_now(lat, m, int(month_start[m]), hidden)
        if variance is None:
            variance = walk_variance(lat, vals)
        spread = np.exp(0.5 * mid * variance)
        p_death = monthly_probability(death * spread[-1])
        p_onset = monthly_probability(lam * spread[:-1])
        for k in range(block, block + QUARTER):
            if k < horizon.onset_months:
                chains["onset"] = list(chain_step(*chains["onset"], p_death=p_death,
                                                  p_onset=p_onset[ONSET_IDX], immediate=imm_onset,
                                                  q_detect=q_onset))
            if k < horizon.complication_months:
                chains["complication"] = list(chain_step(
                    *chains["complication"], p_death=p_death, p_onset=p_onset[COMPLICATION_IDX],
                    immediate=imm_comp, q_detect=q_comp))
        if block + QUARTER < months:
            if care is not None:
                anticipate_treatment(active, lat, care, vals, age, m, fire)
                expected_coverage = active * lat.alpha[None, :]
            dyn.advance(lat, age, vals, expected_coverage, rng=None, months=QUARTER)
    return chains["onset"][2], chains["complication"][2]
