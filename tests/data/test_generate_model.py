"""The generator's hazard model and ground truth: known answers, monotonicity, documentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronorisk.data.codes import MEASUREMENTS
from chronorisk.data.config import GenerateConfig
from chronorisk.data.synth import dynamics as dyn
from chronorisk.data.synth.events import SITE_UNITS, to_site_unit
from chronorisk.data.synth.hazards import (
    COND_INDEX,
    CONDITIONS,
    chain_step,
    coefficient_table_markdown,
    covariates,
    monthly_probability,
    yearly_hazards,
)
from chronorisk.data.synth.simulate import Calendar, SimSpec, _Chunk
from chronorisk.data.synth.truth import TaskHorizon, task_risk

DOCS = Path(__file__).resolve().parents[2] / "docs" / "generator.md"
CAL = Calendar.build(SimSpec.from_config(GenerateConfig()))
GRID = CAL.grid[0]


def make_latent(rows: list[dict]) -> dyn.Latent:
    """Hand-built patients at the first grid date (keys: age, female, bmi, g, p, ldl, hdl, egfr, smoker,
    present, dm_years, statin, alpha)."""
    n = len(rows)
    K, S = len(CONDITIONS), len(dyn.SLOTS)
    day = int(CAL.month_start[GRID.month])

    def col(key, default):
        return np.array([r.get(key, default) for r in rows], dtype=float)

    present = np.zeros((K, n), bool)
    onset = np.full((K, n), np.iinfo(np.int32).min, dtype=np.int32)
    for i, r in enumerate(rows):
        for name in r.get("present", ()):
            present[COND_INDEX[name], i] = True
            onset[COND_INDEX[name], i] = GRID.month - int(12 * r.get("dm_years", 2.0))
    active = np.zeros((S, n), bool)
    active[dyn.SLOT_INDEX["statin"]] = col("statin", 0.0) > 0
    alpha = col("alpha", 0.8)
    return dyn.Latent(
        female=col("female", 0.0) > 0, birth_day=(day - col("age", 60.0) * 365.25).astype(np.int64),
        alpha=alpha, dbp_off=np.zeros(n), glu_off=np.zeros(n), tg_off=np.zeros(n),
        bmi=col("bmi", 28.0), g=col("g", 5.6), p=col("p", 130.0), ldl=col("ldl", 120.0), hdl=col("hdl", 50.0),
        egfr=col("egfr", 85.0),
        smoke=np.where(col("smoker", 0.0) > 0, dyn.SMOKE_CURRENT, dyn.SMOKE_NEVER).astype(np.int8),
        present=present, onset_month=onset, slot_active=active, slot_drug=np.zeros((S, n), np.int8),
        slot_s=active * alpha[None, :],
    )


def increases(r: np.ndarray) -> bool:
    """r[1] above r[0]; merely not below once the hazard saturates (capped log-hazard)."""
    return bool(r[1] > r[0] or (r[0] > 0.5 and r[1] >= r[0]))


def risks(rows: list[dict], ideal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    lat = make_latent(rows)
    return task_risk(lat, month=GRID.month, month_start=CAL.month_start, hidden=None,
                     visit_rate=np.full(len(rows), 3.0), ideal=ideal, horizon=TaskHorizon(24, 12))


def test_chain_step_known_answer():
    a, b, o = chain_step(np.array([1.0]), np.array([0.0]), np.array([0.0]), p_death=np.array([0.1]),
                         p_onset=np.array([[0.2], [0.1]]), immediate=np.array([[1.0], [0.0]]), q_detect=0.5)
    # survive 0.9; no onset 0.72; no immediate recording 0.8
    assert a == pytest.approx([0.648]) and b == pytest.approx([0.036]) and o == pytest.approx([0.216])
    assert a + b + o == pytest.approx([0.9])


def test_hazards_skip_present_conditions_and_missing_prerequisites():
    lat = make_latent([{"present": ["diabetes"]}, {}])
    vals = dyn.treated(lat, np.array([60.0, 60.0]))
    x = covariates(age=np.array([60.0, 60.0]), female=lat.female, sbp=vals["sbp"], hba1c=vals["hba1c"],
                   glucose=vals["glucose"], bmi=vals["bmi"], ldl=vals["ldl"], hdl=vals["hdl"], egfr=vals["egfr"],
                   smoker=np.zeros(2, bool), present=lat.present, dm_years=np.array([2.0, 0.0]),
                   statin=vals["statin"])
    lam, death = yearly_hazards(x, lat.present, None)
    assert lam[COND_INDEX["diabetes"], 0] == 0 and lam[COND_INDEX["diabetes"], 1] > 0
    assert lam[COND_INDEX["retinopathy"], 0] > 0 and lam[COND_INDEX["retinopathy"], 1] == 0
    assert lam[COND_INDEX["ckd4"]].max() == 0  # needs CKD stage 3
    assert (death > 0).all()
    assert monthly_probability(12.0) == pytest.approx(1 - np.exp(-1.0))


def test_ideal_mode_records_at_onset_so_risk_is_higher():
    onset_real, comp_real = risks([{"present": ["hypertension", "diabetes"], "g": 7.5}, {"p": 150.0}])
    onset_ideal, comp_ideal = risks([{"present": ["hypertension", "diabetes"], "g": 7.5}, {"p": 150.0}], ideal=True)
    assert comp_ideal[0] > comp_real[0] and onset_ideal[1] > onset_real[1]


def test_a_present_unrecorded_condition_is_likely_recorded_soon():
    onset, _ = risks([{"present": ["diabetes"]}, {}])
    q = monthly_probability(3.0) * 0.5
    assert onset[0] > 1 - (1 - q) ** 24 - 0.05 and onset[0] > 5 * onset[1]


base_patient = st.fixed_dictionaries({
    "age": st.floats(25, 85), "female": st.booleans(), "bmi": st.floats(19, 45), "g": st.floats(4.6, 9.5),
    "p": st.floats(100, 185), "ldl": st.floats(60, 220), "hdl": st.floats(30, 80), "egfr": st.floats(35, 120),
    "smoker": st.booleans(), "statin": st.booleans(), "alpha": st.floats(0.2, 0.99),
})


@settings(max_examples=40, deadline=None)
@given(base_patient, st.floats(0.2, 2.5))
def test_higher_hba1c_means_higher_true_risk(patient, delta):
    higher = {**patient, "g": patient["g"] + delta}
    onset, _ = risks([patient, higher])
    assert increases(onset)
    diabetic = [{**patient, "present": ["diabetes"]}, {**higher, "present": ["diabetes"]}]
    _, comp = risks(diabetic)
    assert increases(comp)


@settings(max_examples=40, deadline=None)
@given(base_patient, st.floats(5, 40))
def test_higher_blood_pressure_means_higher_true_risk(patient, delta):
    onset, _ = risks([patient, {**patient, "p": patient["p"] + delta}])
    assert increases(onset)
    sick = {**patient, "present": ["hypertension"]}
    _, comp = risks([sick, {**sick, "p": patient["p"] + delta}])
    assert increases(comp)


@settings(max_examples=40, deadline=None)
@given(base_patient, st.floats(5, 30))
def test_lower_egfr_means_higher_complication_risk(patient, delta):
    sick = {**patient, "present": ["hypertension"]}
    _, comp = risks([sick, {**sick, "egfr": patient["egfr"] - delta}])
    assert increases(comp)


@settings(max_examples=30, deadline=None)
@given(base_patient, st.floats(2, 12))
def test_higher_bmi_means_higher_onset_risk(patient, delta):
    onset, _ = risks([patient, {**patient, "bmi": patient["bmi"] + delta}])
    assert increases(onset)


def test_ideal_chunk_records_every_condition_at_onset():
    spec = SimSpec.from_config(GenerateConfig(ideal=True, seed=4))
    chunk = _Chunk(spec, 0, 400)
    chunk.run()
    assert chunk.lat.present.sum() > 100
    assert (chunk.recorded == chunk.lat.present).all()


def test_realistic_chunk_leaves_some_conditions_undiagnosed():
    spec = SimSpec.from_config(GenerateConfig(seed=4))
    chunk = _Chunk(spec, 0, 400)
    chunk.run()
    assert (chunk.recorded <= chunk.lat.present).all()
    assert (chunk.lat.present & ~chunk.recorded).sum() > 5
    for acute in ("mi", "stroke"):  # recorded when they happen: never waiting for a screening
        k = COND_INDEX[acute]
        assert not (chunk.lat.present[k] & ~chunk.recorded[k]).any()


@pytest.mark.parametrize("name", sorted(SITE_UNITS))
def test_site_units_convert_back_with_the_shared_conversions(name):
    m = MEASUREMENTS[name]
    lo, hi = m.plausible
    canonical = np.linspace(1.2 * lo, 0.8 * hi, 50)
    for unit, (_, decimals) in SITE_UNITS[name].items():
        sent = to_site_unit(name, canonical, unit)
        back = np.array([m.to_canonical(v, unit) for v in sent])
        step = 0.5 * 10.0 ** -decimals * abs(m.to_canonical(1.0, unit) - m.to_canonical(0.0, unit))
        assert np.all(np.abs(back - canonical) <= step * 1.0001 + 1e-9), (name, unit)


def test_ckd_epi_inverse():
    egfr = np.linspace(8, 130, 40)
    for female in (True, False):
        sex = np.full(40, female)
        creat = dyn.ckd_epi_creatinine(egfr, np.full(40, 63.0), sex)
        assert np.allclose(dyn.ckd_epi_egfr(creat, np.full(40, 63.0), sex), egfr)


def test_docs_show_the_coefficients_in_the_code():
    assert coefficient_table_markdown() in DOCS.read_text()
