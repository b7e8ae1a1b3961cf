"""Monthly simulation of one chunk of patients, vectorized over the chunk with numpy.

A chunk is simulated from a burn-in start (`burn_in_years` before the data
start, so that treatments, diagnoses and their dates are in equilibrium at
the start) to the end date, one month at a time. Each month, in this order:

1. at a prediction-grid month, the ground truth of both tasks (`truth.task_risk`);
2. death (from the data start on; death is absorbing);
3. onsets of conditions (`hazards.yearly_hazards`), and immediate recording of
   acute ones (MI, stroke: emergency + inpatient encounter; heart failure:
   admission, half the time) or of every onset in ideal mode;
4. a routine (AMB) visit with probability 1 - exp(-rate / 12) (realistic) or
   every third month (ideal): screening records present-but-unrecorded
   conditions, the measurement panel is taken (missingness and noise in
   realistic mode), and treatment rules start medications;
5. a background emergency visit now and then (rate grows with comorbidity);
6. medication refills: each request supplies the site's `days_supply` days,
   the next one comes after a gap drawn so that the expected proportion of
   days covered equals the patient's adherence;
7. the latent factors move one month (`dynamics.advance`).

Event days fall on days 1-28 of a month, so that month-based horizons match
the label windows (t, t + 365 d] and (t, t + 730 d] exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

from chronorisk.data.codes import DIAGNOSES, MEASUREMENTS, MEDICATIONS
from chronorisk.data.config import DriftConfig, GenerateConfig, SiteConfig
from chronorisk.data.synth import drift as drift_mod
from chronorisk.data.synth import dynamics as dyn
from chronorisk.data.synth import messy
from chronorisk.data.synth.events import (
    CODE_INDEX,
    SITE_UNITS,
    TEXT_INDEX,
    UNIT_INDEX,
    EventArrays,
    EventBuffer,
    to_site_unit,
)
from chronorisk.data.synth.hazards import (
    CHRONIC_VISIT_FACTOR,
    COMPLICATION_OUTCOMES,
    COND_INDEX,
    CONDITIONS,
    DETECTION_GROUPS,
    FRAILTY_SD,
    IMMEDIATE,
    HiddenTerms,
    monthly_probability,
)
from chronorisk.data.synth.truth import Care, TaskHorizon, hazards_now, task_risk

EPOCH = date(1970, 1, 1)
DAY = 86_400
OFFICE_START, OFFICE_SECONDS = 8 * 3600, 10 * 3600
HISTORIC_RECORDING = 0.85  # share of (non-acute) conditions present at the burn-in start that are on record
OBESITY_RECORDING = 0.4  # P(obesity coded at a visit where BMI >= 30), realistic mode
BACKGROUND_EMER_RATE = 0.08  # per year, times exp(0.35 * number of major conditions)
TASKS = ("complication_1y", "onset_2y")
HORIZON_DAYS = {"complication_1y": 365, "onset_2y": 730}

# Measurement noise (SD, canonical units) in realistic mode; creatinine is multiplicative.
MEASUREMENT_SD = {"sbp": 7.0, "dbp": 5.0, "bmi": 0.4, "hba1c": 0.15, "glucose": 8.0, "ldl": 8.0,
                  "hdl": 3.0, "total_chol": 5.0, "creatinine": 0.05}
# Panels are measured or missed together: (panel, measurements).
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bp", ("sbp", "dbp")), ("bmi", ("bmi",)), ("smoking", ()), ("hba1c", ("hba1c",)),
    ("glucose", ("glucose",)), ("lipids", ("ldl", "hdl", "total_chol")), ("renal", ("creatinine", "egfr")),
)
SCHEDULED_VALUES = sum(max(len(m), 1) for _, m in PANELS)  # values of a complete panel: 11


def _days(d: date) -> int:
    return (d - EPOCH).days


def _add_months(d: date, months: int) -> date:
    y, m = divmod(d.month - 1 + months, 12)
    return date(d.year + y, m + 1, 1)


@dataclass(frozen=True)
class SimSpec:
    """Everything a worker needs to simulate a chunk (picklable)."""

    seed: int
    start: date
    end: date
    ideal: bool
    sites: tuple[SiteConfig, ...]
    drift: tuple[DriftConfig, ...] = ()
    burn_in_years: int = 3
    realistic_codes: bool = False

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> SimSpec:
        return cls(seed=cfg.seed, start=cfg.start, end=cfg.end, ideal=cfg.ideal, sites=tuple(cfg.sites),
                   drift=tuple(cfg.drift), realistic_codes=cfg.realistic_codes)


@dataclass(frozen=True)
class GridDate:
    month: int
    when: date
    horizon: TaskHorizon


@dataclass(frozen=True)
class Calendar:
    """Month boundaries (days since 1970) from the burn-in start to the end date."""

    first: date
    month_start: np.ndarray  # int64, n_months + 1 entries
    max_day: np.ndarray  # event days available in each month (28, fewer in the end month)
    data_start: int
    grid: tuple[GridDate, ...]

    @property
    def n_months(self) -> int:
        return int(self.month_start.shape[0] - 1)

    def month_of(self, d: date) -> int:
        return (d.year - self.first.year) * 12 + d.month - self.first.month

    @classmethod
    def build(cls, spec: SimSpec) -> Calendar:
        first = date(spec.start.year - spec.burn_in_years, spec.start.month, 1)
        n_months = (spec.end.year - first.year) * 12 + spec.end.month - first.month + 1
        starts = np.array([_days(_add_months(first, k)) for k in range(n_months + 1)], dtype=np.int64)
        max_day = np.full(n_months, 28, dtype=np.int64)
        max_day[-1] = min(28, spec.end.day)
        data_start = spec.burn_in_years * 12
        first_grid = date(spec.start.year + 2, spec.start.month, 1)
        grid = []
        for m in range(data_start, n_months):
            when = _add_months(first, m)
            if when.month not in (1, 7) or when < first_grid:
                continue
            onset = 24 if when + timedelta(days=HORIZON_DAYS["onset_2y"]) <= spec.end else 0
            comp = 12 if when + timedelta(days=HORIZON_DAYS["complication_1y"]) <= spec.end else 0
            if onset or comp:
                grid.append(GridDate(m, when, TaskHorizon(onset, comp)))
        return cls(first, starts, max_day, data_start, tuple(grid))


@dataclass
class ChunkResult:
    """A simulated chunk: events (unsorted), patients, ground truth."""

    events: EventArrays
    site: np.ndarray  # int8 per patient (patients are sorted by site)
    truth: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # task -> (patient, month, risk)
    deaths: int = 0
    frailty: np.ndarray | None = None  # hidden per-patient frailty (data/synth/messy.py reads it)


class _SiteTables:
    """Per-site lookups as arrays indexed by site number."""

    def __init__(self, sites: tuple[SiteConfig, ...], drift: dict[str, drift_mod.SiteDrift]):
        def arr(values, dtype=np.float64):
            return np.array(values, dtype=dtype)

        self.share = arr([s.share for s in sites])
        self.share = self.share / self.share.sum()
        self.mean_age = arr([s.mean_age for s in sites])
        self.female = arr([s.female_share for s in sites])
        self.risk_shift = arr([s.risk_shift for s in sites])
        self.outcome_shift = arr([s.outcome_shift for s in sites])
        self.visits = arr([s.visits_per_year for s in sites])
        self.missing = arr([s.missing_rate for s in sites])
        self.supply = arr([s.days_supply for s in sites], np.int64)
        self.community = arr([s.kind == "community" for s in sites], bool)
        unit_field = {"sbp": "bp_unit", "dbp": "bp_unit", "hba1c": "hba1c_unit", "glucose": "glucose_unit",
                      "ldl": "cholesterol_unit", "hdl": "cholesterol_unit", "total_chol": "cholesterol_unit",
                      "creatinine": "creatinine_unit"}
        self.unit: dict[str, np.ndarray] = {}
        for name, units in SITE_UNITS.items():
            if name in unit_field:
                self.unit[name] = arr([UNIT_INDEX[getattr(s, unit_field[name])] for s in sites], np.int8)
            else:
                self.unit[name] = np.full(len(sites), UNIT_INDEX[next(iter(units))], dtype=np.int8)
        names = [*CONDITIONS, "obesity", "hyperlipidemia"]
        self.diag_code = {
            name: arr([CODE_INDEX[DIAGNOSES[name].icd10 if s.diagnosis_vocab == "ICD10CM" else DIAGNOSES[name].snomed]
                       for s in sites], np.int16)
            for name in names
        }
        never = np.iinfo(np.int64).max

        def seconds(d: date | None) -> int:
            return never if d is None else _days(d) * DAY

        self.units_from = arr([seconds(drift[s.site_id].units_from) for s in sites], np.int64)
        self.lab_bias_from = arr([seconds(drift[s.site_id].lab_bias_from) for s in sites], np.int64)
        self.population_from = [drift[s.site_id].population_from for s in sites]


def simulate_chunk(spec: SimSpec, chunk_index: int, n: int) -> ChunkResult:
    """Simulate `n` patients; deterministic in (spec, chunk_index, n)."""
    return _Chunk(spec, chunk_index, n).run()


class _Chunk:
    def __init__(self, spec: SimSpec, chunk_index: int, n: int):
        self.spec = spec
        self.ideal = spec.ideal
        self.n = n
        self.rng = np.random.default_rng(np.random.SeedSequence([spec.seed, chunk_index]))
        self.cal = Calendar.build(spec)
        self.sites = _SiteTables(spec.sites, drift_mod.drift_by_site(spec.drift, [s.site_id for s in spec.sites]))
        self.buf = EventBuffer()
        self.truth: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {t: [] for t in TASKS}
        self.deaths = 0
        self._init_patients()

    # ----------------------------------------------------------------- set-up
    def _init_patients(self) -> None:
        rng, n, st, cal = self.rng, self.n, self.sites, self.cal
        site = np.sort(rng.choice(st.share.shape[0], size=n, p=st.share)).astype(np.int8)
        self.site = site
        female = rng.random(n) < st.female[site]
        age_start = np.clip(rng.normal(st.mean_age[site], 15.0), 18.0, 95.0)
        arrival = np.zeros(n, dtype=bool)
        records_from = np.zeros(n, dtype=np.int64)
        reg_day = np.zeros(n, dtype=np.int64)
        for s_idx, when in enumerate(st.population_from):
            u = rng.random(n)
            offsets = rng.integers(0, drift_mod.ARRIVAL_WINDOW_DAYS, n)
            if when is None:
                continue
            sel = (site == s_idx) & (u < drift_mod.ARRIVAL_SHARE)
            arrival |= sel
            age_start[sel] = np.minimum(age_start[sel] + drift_mod.ARRIVAL_AGE_YEARS, 95.0)
            for i in np.flatnonzero(sel):
                r = when + timedelta(days=int(offsets[i]))
                if r.day > 28:
                    r = _add_months(r, 1)
                records_from[i] = cal.month_of(r) if r <= self.spec.end else cal.n_months
                reg_day[i] = r.day - 1
        start_day = _days(self.spec.start)
        birth_day = start_day - np.floor(age_start * 365.25).astype(np.int64)
        age_b = (cal.month_start[0] - birth_day) / 365.25
        rs = st.risk_shift[site] + drift_mod.ARRIVAL_RISK_SHIFT * arrival
        bmi = np.clip(rng.normal(26.0 + 0.05 * (age_b - 45.0) + 1.5 * rs + drift_mod.ARRIVAL_BMI * arrival, 4.5),
                      17.0, 60.0)
        g = rng.normal(5.35 + 0.006 * (age_b - 45.0) + 0.04 * (bmi - 26.0) + 0.12 * rs, 0.3)
        p = rng.normal(117.0 + 0.5 * (age_b - 45.0) + 0.7 * (bmi - 26.0) - 4.0 * female + 3.0 * rs, 11.0)
        ldl = np.clip(rng.normal(118.0 + 0.3 * (age_b - 45.0), 28.0), 50.0, 300.0)
        hdl = np.clip(rng.normal(47.0 + 10.0 * female - 0.6 * (bmi - 26.0), 10.0), 20.0, 110.0)
        egfr = np.clip(rng.normal(116.0 - 0.85 * (age_b - 20.0), 11.0), 20.0, 135.0)
        p_current = np.clip(0.22 - 0.002 * (age_b - 45.0) + 0.05 * rs, 0.05, 0.4)
        p_former = np.clip(0.15 + 0.003 * (age_b - 45.0), 0.05, 0.35)
        u = rng.random(n)
        smoke = np.where(u < p_current, dyn.SMOKE_CURRENT,
                         np.where(u < p_current + p_former, dyn.SMOKE_FORMER, dyn.SMOKE_NEVER)).astype(np.int8)
        # Conditions already present at the burn-in start (a cross-sectional logistic model).
        age10 = (age_b - 55.0) / 10.0
        male = ~female
        smoker = smoke == dyn.SMOKE_CURRENT
        K = len(CONDITIONS)
        present = np.zeros((K, n), dtype=bool)

        def draw(logit):
            return rng.random(n) < 1.0 / (1.0 + np.exp(-logit))

        dm = draw(-3.6 + 0.45 * age10 + 0.5 * (bmi - 27.0) / 5.0 + 0.5 * rs + 4.0 * (g - 5.35))
        g = np.where(dm, g + np.clip(rng.normal(1.4, 0.6, n), 0.5, None), g)
        htn = draw((p - 138.0) / 5.0)
        p = p + 6.0 * htn
        chd = draw(-4.9 + 0.7 * age10 + 0.5 * male + 0.4 * smoker + 0.5 * dm)
        mi = draw(-5.0 + 0.6 * age10 + 0.8 * male + 1.5 * chd)
        chd |= mi
        present[COND_INDEX["hypertension"]] = htn
        present[COND_INDEX["diabetes"]] = dm
        present[COND_INDEX["chd"]] = chd
        present[COND_INDEX["mi"]] = mi
        present[COND_INDEX["ckd3"]] = draw((60.0 - egfr) / 3.0)
        present[COND_INDEX["heart_failure"]] = draw(-5.9 + 0.8 * age10 + 0.8 * chd)
        present[COND_INDEX["stroke"]] = draw(-5.5 + 0.8 * age10 + 0.4 * htn)
        for name, b0 in (("retinopathy", -2.5), ("neuropathy", -2.7), ("nephropathy", -3.0)):
            present[COND_INDEX[name]] = dm & draw(b0 + 0.3 * age10 + 0.5 * (g - 7.0))
        onset_month = np.where(present, -rng.integers(6, 120, (K, n)), np.iinfo(np.int32).min).astype(np.int32)

        alpha = np.clip(rng.beta(6.0, 2.0, n), 0.05, 0.995)
        S = len(dyn.SLOTS)
        self.lat = dyn.Latent(
            female=female, birth_day=birth_day, alpha=alpha,
            dbp_off=rng.normal(0.0, 5.0, n), glu_off=rng.normal(0.0, 6.0, n), tg_off=rng.normal(0.0, 25.0, n),
            bmi=bmi, g=np.clip(g, 4.3, 14.0), p=np.clip(p, 100.0, 230.0), ldl=ldl, hdl=hdl, egfr=egfr, smoke=smoke,
            present=present, onset_month=onset_month,
            slot_active=np.zeros((S, n), dtype=bool), slot_drug=np.zeros((S, n), dtype=np.int8),
            slot_s=np.zeros((S, n)),
        )
        frailty = rng.normal(0.0, messy.FRAILTY_SD if self.spec.realistic_codes else FRAILTY_SD, n)
        self.frailty = frailty
        self.hidden = None if self.ideal else \
            HiddenTerms(st.risk_shift[site], st.outcome_shift[site], frailty).log_hazard_shift()
        self.arrival, self.records_from, self.reg_day = arrival, records_from, reg_day
        self.phase = rng.integers(0, 3, n)
        self.recorded = np.zeros((K, n), dtype=bool)
        self.obesity = np.zeros(n, dtype=bool)
        self.hyperlipidemia = np.zeros(n, dtype=bool)
        self.alive = np.ones(n, dtype=bool)
        self.slot_start = np.zeros((S, n), dtype=np.int64)
        self.cov_start = np.zeros((S, n), dtype=np.int64)
        self.cov_end = np.zeros((S, n), dtype=np.int64)
        self.next_refill = np.zeros((S, n), dtype=np.int64)
        self.cov_days = np.zeros((S, n))
        # Historic records: conditions present at the burn-in start, coded before it.
        acute = np.array([IMMEDIATE.get(c, 0.0) >= 1.0 for c in CONDITIONS])[:, None]  # MI, stroke: always coded
        on_record = present & ((rng.random((K, n)) < HISTORIC_RECORDING) | self.ideal | acute) & ~arrival[None, :]
        for k, name in enumerate(CONDITIONS):
            ix = np.flatnonzero(on_record[k])
            days = cal.month_start[0] + np.floor(onset_month[k, ix] * 30.4375).astype(np.int64)
            days += rng.integers(0, 28, ix.shape[0])
            self._record(name, ix, days * DAY + OFFICE_START + rng.integers(0, OFFICE_SECONDS, ix.shape[0]))
        # Treatment already running at the burn-in start.
        rec = self.recorded
        statin_due = (rec[COND_INDEX["diabetes"]] & (age_b >= 40.0)) | rec[COND_INDEX["chd"]] | \
            rec[COND_INDEX["mi"]] | rec[COND_INDEX["stroke"]]
        start_t = np.full(n, cal.month_start[0] * DAY)
        self._start_drugs(np.arange(n), start_t, month=-12, emit=False, draw_back=True, starts={
            "ah1": rec[COND_INDEX["hypertension"]],
            "ah2": rec[COND_INDEX["hypertension"]] & (self.lat.p > 155.0),
            "metformin": rec[COND_INDEX["diabetes"]],
            "insulin": rec[COND_INDEX["diabetes"]] & (self.lat.g > 9.5),
            "statin": statin_due,
        })
        self.lat.slot_s = self.lat.slot_active * alpha[None, :]

    # ---------------------------------------------------------------- helpers
    def _times(self, m: int, k: int, office: bool = True) -> np.ndarray:
        day = self.rng.integers(0, self.cal.max_day[m], k)
        sec = OFFICE_START + self.rng.integers(0, OFFICE_SECONDS, k) if office else self.rng.integers(0, DAY, k)
        return (self.cal.month_start[m] + day) * DAY + sec

    def _record(self, name: str, ix: np.ndarray, t: np.ndarray) -> None:
        """Put condition `name` on record for patients `ix` at times `t` (skips those already coded)."""
        if ix.shape[0] == 0:
            return
        if name in ("obesity", "hyperlipidemia"):
            flags = getattr(self, name)
            keep = ~flags[ix]
            ix, t = ix[keep], t[keep]
            flags[ix] = True
        else:
            k = COND_INDEX[name]
            keep = ~self.recorded[k, ix]
            ix, t = ix[keep], t[keep]
            self.recorded[k, ix] = True
        self.buf.add(ix, t, self.sites.diag_code[name][self.site[ix]])

    def _encounter(self, ix: np.ndarray, t: np.ndarray, cls: str) -> None:
        self.buf.add(ix, t, CODE_INDEX["ENCOUNTER//" + cls])

    # ------------------------------------------------------------ medications
    def _start_drugs(self, ix, t, *, month: int, emit: bool, starts: dict[str, np.ndarray],
                     draw_back: bool = False) -> None:
        """Start the medication slots flagged in `starts` (bool arrays over `ix`) at times `t`."""
        rng, lat = self.rng, self.lat
        rec = self.recorded[:, ix]
        for slot, flag in starts.items():
            s = dyn.SLOT_INDEX[slot]
            sel = flag & ~lat.slot_active[s, ix]
            who, when = ix[sel], t[sel]
            if who.shape[0] == 0:
                continue
            k = who.shape[0]
            if slot == "ah1":
                drug = rng.choice([dyn.DRUG_INDEX[d] for d in ("lisinopril", "amlodipine", "hydrochlorothiazide")],
                                  size=k, p=[0.55, 0.30, 0.15])
            elif slot == "ah2":
                cardiac = rec[COND_INDEX["chd"], sel] | rec[COND_INDEX["mi"], sel]
                first = lat.slot_drug[dyn.SLOT_INDEX["ah1"], who]
                drug = np.where(cardiac, dyn.DRUG_INDEX["metoprolol"],
                                np.where(first == dyn.DRUG_INDEX["amlodipine"], dyn.DRUG_INDEX["hydrochlorothiazide"],
                                         dyn.DRUG_INDEX["amlodipine"]))
            elif slot == "statin":
                vascular = rec[COND_INDEX["chd"], sel] | rec[COND_INDEX["mi"], sel] | rec[COND_INDEX["stroke"], sel]
                drug = np.where(vascular | (rng.random(k) < 0.5), dyn.DRUG_INDEX["atorvastatin"],
                                dyn.DRUG_INDEX["simvastatin"])
                self._record("hyperlipidemia", who, when)
            else:
                drug = np.full(k, dyn.DRUG_INDEX[slot])
            lat.slot_active[s, who] = True
            lat.slot_drug[s, who] = drug
            self.slot_start[s, who] = month
            supply = self.sites.supply[self.site[who]]
            day = when // DAY
            if draw_back:  # already on treatment: somewhere inside a supply period
                day = day - rng.integers(0, supply)
            self._fill(s, who, day, supply, emit=emit, t=when, month=None if draw_back else month)

    def _fill(self, s: int, who: np.ndarray, day: np.ndarray, supply: np.ndarray, *, emit: bool,
              t: np.ndarray, month: int | None) -> None:
        """A medication request on `day` covering `supply` days; schedule the next one.

        With `month`, the days of the new supply inside that month count towards its coverage.
        """
        lat = self.lat
        alpha = lat.alpha[who]
        gap = np.rint(self.rng.exponential(1.0, who.shape[0]) * supply * (1.0 - alpha) / alpha).astype(np.int64)
        self.cov_start[s, who] = day
        self.cov_end[s, who] = day + supply
        self.next_refill[s, who] = day + supply + gap
        if month is not None:
            self._coverage_add(s, who, month)
        if emit:
            self.buf.add(who, t, DRUG_CODE[lat.slot_drug[s, who]], supply.astype(np.float64), UNIT_INDEX["d"])

    def _coverage_add(self, s: int, who: np.ndarray, m: int) -> None:
        """Add the days of the current supply of slot `s` that fall in month `m`."""
        ms, me = self.cal.month_start[m], self.cal.month_start[m + 1]
        lo = np.maximum(self.cov_start[s, who], ms)
        hi = np.minimum(self.cov_end[s, who], me)
        self.cov_days[s, who] += np.maximum(hi - lo, 0)

    def _refills(self, m: int, emit: bool) -> None:
        me = self.cal.month_start[m + 1]
        active = self.lat.slot_active & self.alive[None, :]
        for s in range(len(dyn.SLOTS)):
            for _ in range(3):
                who = np.flatnonzero(active[s] & (self.next_refill[s] < me))
                if who.shape[0] == 0:
                    break
                day = self.next_refill[s, who]
                t = day * DAY + OFFICE_START + self.rng.integers(0, OFFICE_SECONDS, who.shape[0])
                self._fill(s, who, day, self.sites.supply[self.site[who]], emit=emit, t=t, month=m)

    def _rules(self, ix: np.ndarray, t: np.ndarray, m: int, measured: dict[str, np.ndarray], age: np.ndarray,
               emit: bool) -> None:
        """Treatment rules at an encounter, on what the clinician has on record and just measured."""
        rec = self.recorded[:, ix]
        act = self.lat.slot_active[:, ix]
        since = m - self.slot_start[:, ix]
        htn, dm = rec[COND_INDEX["hypertension"]], rec[COND_INDEX["diabetes"]]
        ah1, met = dyn.SLOT_INDEX["ah1"], dyn.SLOT_INDEX["metformin"]
        with np.errstate(invalid="ignore"):
            starts = {
                "ah1": htn,
                "ah2": htn & act[ah1] & (since[ah1] >= 6) & (measured["sbp"] >= 150.0),
                "metformin": dm,
                "insulin": dm & act[met] & (since[met] >= 6) & (measured["hba1c"] >= 8.5),
                "statin": (dm & (age >= 40.0)) | (measured["ldl"] >= 190.0) | rec[COND_INDEX["chd"]]
                | rec[COND_INDEX["mi"]] | rec[COND_INDEX["stroke"]],
            }
        self._start_drugs(ix, t, month=m, emit=emit, starts=starts)

    # ------------------------------------------------------------ measurement
    def _panel(self, ix: np.ndarray, t: np.ndarray, vals: dict[str, np.ndarray], age: np.ndarray,
               emit: bool) -> dict[str, np.ndarray]:
        """Measure the panel at encounters `ix`/`t`; emit what was recorded; return measured values (NaN = missing)."""
        rng, k = self.rng, ix.shape[0]
        site = self.site[ix]
        v = {name: arr[ix] for name, arr in vals.items()}
        v["creatinine"] = dyn.ckd_epi_creatinine(v["egfr"], age[ix], self.lat.female[ix])
        if self.ideal:
            taken = np.ones((len(PANELS), k), dtype=bool)
            meas = {name: v[name] for name in MEASUREMENT_SD}
            meas["egfr"] = v["egfr"]
        else:
            p_miss = self.sites.missing[site]
            dm_on_record = self.recorded[COND_INDEX["diabetes"], ix]
            u = rng.random((len(PANELS), k))
            taken = u >= p_miss[None, :]
            for j, (panel, _) in enumerate(PANELS):
                if panel in ("hba1c", "glucose"):  # diabetics get their glycaemia checked more often
                    taken[j] = u[j] >= np.where(dm_on_record, 0.5 * p_miss, p_miss)
            e = rng.standard_normal((len(MEASUREMENT_SD), k))
            meas = {}
            for j, (name, sd) in enumerate(MEASUREMENT_SD.items()):
                if name == "creatinine":
                    meas[name] = v[name] * np.exp(sd * e[j])
                elif name == "total_chol":
                    meas[name] = v[name] + (meas["ldl"] - v["ldl"]) + (meas["hdl"] - v["hdl"]) + sd * e[j]
                else:
                    meas[name] = v[name] + sd * e[j]
            meas["egfr"] = dyn.ckd_epi_egfr(meas["creatinine"], age[ix], self.lat.female[ix])
        for name in meas:  # inside the plausible range, with room for unit rounding
            lo, hi = MEASUREMENTS[name].plausible
            meas[name] = np.clip(meas[name], 1.1 * lo, 0.9 * hi)
        biased = t >= self.sites.lab_bias_from[site]
        if biased.any():
            for name, bias in drift_mod.LAB_BIAS.items():
                meas[name] = np.where(biased, meas[name] + bias, meas[name])
        if emit:
            self._emit_panel(ix, t, site, meas, taken)
        seen = {}
        for j, (_, names) in enumerate(PANELS):
            for name in names:
                seen[name] = np.where(taken[j], meas[name], np.nan)
        return seen

    def _emit_panel(self, ix, t, site, meas, taken) -> None:
        for j, (panel, names) in enumerate(PANELS):
            sel = taken[j]
            if not sel.any():
                continue
            who, when, where = ix[sel], t[sel], site[sel]
            if panel == "smoking":
                smoke = self.lat.smoke[who]
                text = np.where(smoke == dyn.SMOKE_NEVER, TEXT_INDEX[_SMOKE_TEXT[0]],
                                np.where(smoke == dyn.SMOKE_FORMER, TEXT_INDEX[_SMOKE_TEXT[1]],
                                         np.where(self.sites.community[where], TEXT_INDEX[_SMOKE_TEXT[3]],
                                                  TEXT_INDEX[_SMOKE_TEXT[2]])))
                self.buf.add(who, when, CODE_INDEX["LOINC//72166-2"], text=text.astype(np.int8))
                continue
            for name in names:
                canonical = meas[name][sel]
                unit = self.sites.unit[name][where].copy()
                value = np.empty(canonical.shape[0])
                for unit_name in SITE_UNITS[name]:
                    u_sel = unit == UNIT_INDEX[unit_name]
                    if u_sel.any():
                        value[u_sel] = to_site_unit(name, canonical[u_sel], unit_name)
                if name == "glucose":
                    raw = when >= self.sites.units_from[where]
                    if raw.any():  # unannounced mmol/L, labelled as the canonical unit
                        value[raw] = to_site_unit("glucose", canonical[raw], "mmol/L")
                        unit[raw] = UNIT_INDEX[MEASUREMENTS["glucose"].unit]
                self.buf.add(who, when, CODE_INDEX[MEASUREMENTS[name].code], value, unit)

    # ------------------------------------------------------------------ truth
    def _truth(self, grid: GridDate) -> None:
        m = grid.month
        rec = self.recorded
        started = self.alive & (self.records_from < m)
        diagnosed = rec[COND_INDEX["hypertension"]] | rec[COND_INDEX["diabetes"]]
        complicated = rec[[COND_INDEX[c] for c in COMPLICATION_OUTCOMES]].any(axis=0)
        onset_pop = started & ~diagnosed if grid.horizon.onset_months else np.zeros(self.n, bool)
        comp_pop = started & diagnosed & ~complicated if grid.horizon.complication_months else np.zeros(self.n, bool)
        idx = np.flatnonzero(onset_pop | comp_pop)
        if idx.shape[0] == 0:
            return
        hidden = None if self.hidden is None else self.hidden[:, idx]
        missing = np.zeros(idx.shape[0]) if self.ideal else self.sites.missing[self.site[idx]]
        care = Care(recorded=self.recorded[:, idx], slot_start=self.slot_start[:, idx], missing=missing,
                    noise_sd=None if self.ideal else MEASUREMENT_SD)
        r_onset, r_comp = task_risk(
            self.lat.take(idx), month=m, month_start=self.cal.month_start, hidden=hidden,
            visit_rate=self.sites.visits[self.site[idx]], ideal=self.ideal, horizon=grid.horizon, care=care,
        )
        for task, pop, risk in (("onset_2y", onset_pop, r_onset), ("complication_1y", comp_pop, r_comp)):
            keep = pop[idx]
            if keep.any():
                self.truth[task].append((idx[keep].astype(np.int32), np.full(int(keep.sum()), m), risk[keep]))

    # ------------------------------------------------------------- main loop
    def run(self) -> ChunkResult:
        self._static_events()
        grid = {g.month: g for g in self.cal.grid}
        for m in range(self.cal.n_months):
            if m in grid:
                self._truth(grid[m])
            self._month(m)
        truth = {}
        for task in TASKS:
            parts = self.truth[task]
            if parts:
                truth[task] = tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
            else:
                truth[task] = (np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0))
        return ChunkResult(events=self.buf.arrays(), site=self.site, truth=truth, deaths=self.deaths,
                           frailty=self.frailty)

    def _static_events(self) -> None:
        ix = np.arange(self.n)
        sex = np.where(self.lat.female, CODE_INDEX["GENDER//F"], CODE_INDEX["GENDER//M"]).astype(np.int16)
        self.buf.add(ix, None, sex)
        self.buf.add(ix, self.lat.birth_day * DAY, CODE_INDEX["MEDS_BIRTH"])

    def _month(self, m: int) -> None:
        rng, lat, cal, n = self.rng, self.lat, self.cal, self.n
        in_data = m >= cal.data_start
        day0 = int(cal.month_start[m])
        age, vals, lam, death = hazards_now(lat, m, day0, self.hidden)
        self.cov_days[:] = 0.0
        active = lat.slot_active
        for s in range(len(dyn.SLOTS)):
            who = np.flatnonzero(active[s])
            self._coverage_add(s, who, m)
        # 2. death
        if in_data:  # arrivals of a population drift are known to be alive when they register
            die = self.alive & (m >= self.records_from) & (rng.random(n) < monthly_probability(death))
            ix = np.flatnonzero(die)
            if ix.shape[0]:
                self.buf.add(ix, self._times(m, ix.shape[0], office=False), CODE_INDEX["MEDS_DEATH"])
                self.alive[ix] = False
                self.deaths += int(ix.shape[0])
        alive = self.alive
        recordable = alive & (m >= self.records_from)
        # 3. onsets
        new = (rng.random(lam.shape) < monthly_probability(lam)) & alive[None, :]
        mi, chd = COND_INDEX["mi"], COND_INDEX["chd"]
        new[chd] &= ~new[mi]
        lat.present |= new
        lat.onset_month[new] = m
        chd_with_mi = new[mi] & ~lat.present[chd]
        lat.present[chd] |= new[mi]
        lat.onset_month[chd, chd_with_mi] = m
        for k, name in enumerate(CONDITIONS):
            p_now = 1.0 if self.ideal else IMMEDIATE.get(name, 0.0)
            if p_now <= 0.0:
                continue
            cand = new[k] & recordable
            if not cand.any():
                continue
            ix = np.flatnonzero(cand)
            if p_now < 1.0:
                ix = ix[rng.random(ix.shape[0]) < p_now]
            self._acute(name, ix, m, in_data, age, vals)
        # 4. routine visits
        if self.ideal:
            visit = recordable & ((m - self.phase) % 3 == 0)
        else:
            chronic = self.recorded[COND_INDEX["hypertension"]] | self.recorded[COND_INDEX["diabetes"]]
            rate = self.sites.visits[self.site] * np.where(chronic, CHRONIC_VISIT_FACTOR, 1.0)
            visit = recordable & (rng.random(n) < monthly_probability(rate))
        registering = alive & self.arrival & (self.records_from == m)
        visit |= registering
        ix = np.flatnonzero(visit)
        if ix.shape[0]:
            t = self._times(m, ix.shape[0])
            reg = registering[ix]
            if reg.any():
                t[reg] = (cal.month_start[m] + self.reg_day[ix[reg]]) * DAY + OFFICE_START + \
                    rng.integers(0, OFFICE_SECONDS, int(reg.sum()))
            self._routine(ix, t, m, in_data, age, vals, reg)
        # 5. background emergency visits
        if in_data:
            major = lat.present[[COND_INDEX[c] for c in ("diabetes", "hypertension", "chd", "ckd3", "heart_failure",
                                                         "mi", "stroke")]].sum(axis=0)
            emer = recordable & (rng.random(n) < monthly_probability(BACKGROUND_EMER_RATE * np.exp(0.35 * major)))
            ix = np.flatnonzero(emer)
            if ix.shape[0]:
                t = self._times(m, ix.shape[0], office=False)
                self._encounter(ix, t, "EMER")
                self._panel(ix, t, vals, age, emit=True)
        # 6. refills, coverage, 7. latent step
        self._refills(m, emit=in_data)
        month_len = cal.month_start[m + 1] - cal.month_start[m]
        coverage = np.where(lat.slot_active, np.minimum(self.cov_days / month_len, 1.0), 0.0)
        dyn.advance(lat, age, vals, coverage, rng)

    def _acute(self, name: str, ix: np.ndarray, m: int, in_data: bool, age, vals) -> None:
        """Record onsets at once: MI/stroke via the emergency department, heart failure via admission,
        anything else (ideal mode) at an ambulatory encounter on the day of onset."""
        if ix.shape[0] == 0:
            return
        acute = name in ("mi", "stroke")
        t = self._times(m, ix.shape[0], office=not acute and name != "heart_failure")
        if in_data:
            cls = "EMER" if acute else ("IMP" if name == "heart_failure" else "AMB")
            self._encounter(ix, t, cls)
            measured = self._panel(ix, t, vals, age, emit=True)
            if acute:
                self._encounter(ix, t + 3 * 3600, "IMP")
        else:
            measured = self._panel(ix, t, vals, age, emit=False)
        self._record(name, ix, t)
        if name == "mi":
            self._record("chd", ix, t)
        self._rules(ix, t, m, measured, age[ix], emit=in_data)

    def _routine(self, ix, t, m, in_data, age, vals, registering) -> None:
        rng = self.rng
        if in_data:
            self._encounter(ix, t, "AMB")
        for names, p_detect in DETECTION_GROUPS.values():
            found = np.zeros(ix.shape[0], bool) if self.ideal else rng.random(ix.shape[0]) < p_detect
            for name in names:
                k = COND_INDEX[name]
                sel = found & self.lat.present[k, ix] & ~self.recorded[k, ix]
                if sel.any():
                    self._record(name, ix[sel], t[sel])
        if registering.any():  # a new patient's history is taken: everything present goes on record
            for k, name in enumerate(CONDITIONS):
                sel = registering & self.lat.present[k, ix]
                if sel.any():
                    self._record(name, ix[sel], t[sel])
        measured = self._panel(ix, t, vals, age, emit=in_data)
        with np.errstate(invalid="ignore"):
            obese = measured["bmi"] >= 30.0
        if not self.ideal:
            obese &= rng.random(ix.shape[0]) < OBESITY_RECORDING
        self._record("obesity", ix[obese], t[obese])
        self._rules(ix, t, m, measured, age[ix], emit=in_data)


_SMOKE_TEXT = tuple(TEXT_INDEX)  # never, former, current (hospital), current (community)
DRUG_CODE = np.array([CODE_INDEX[MEDICATIONS[d].code] for d in dyn.DRUGS], dtype=np.int16)
