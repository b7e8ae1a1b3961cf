"""A site that joined late: how the global model does there before labels, and after its first local cases.

`chronorisk evaluate --new-site SITE` and benchmarks/new_region_bench.py
both call `evaluate_new_site` on the site's rows from the date it joined
(rows the global model never saw) with the global model's calibrated risk
(no site layer). It reports:

1. `before_labels`: the global model's realized AUROC, calibration slope and
   intercept, ECE and observed / expected rate there (what the service
   cannot know yet), and per prediction time (`by_window`: a time trend in
   the site's rate shows there);
2. `label_free_global`: per window (one prediction time with at least
   `min_window_rows` rows) the AUROC estimated from the risks without labels
   (`performance_estimate`) beside the realized one;
3. `recalibrated`: after the first 25, 50 and 100 local cases (positive
   outcomes with the non-cases seen alongside them, from the first
   prediction times; `repeats` random orders), the site recalibration
   (`models/site_calibration.py`) fitted on them and judged on the site's
   other patients at later times: slope, ECE (beside the ECE a perfectly
   calibrated model would show on as many rows, `ece_noise_floor`), and the
   label-free estimate from the risks as served after the site layer;
4. `label_free_recalibrated`: the windows of (2) for those other patients,
   estimated from the risks as served after the largest recalibration
   (first repeat).

Every label-free estimate carries its uncertainty: `outcome_sd`, the
spread of the realized AUROC around the estimate by chance alone (outcomes
drawn from the risks); `recalibration_sd`, the spread of the estimate over
refits of the site recalibration on resampled local cases (the few cases
leave the slope uncertain, and the estimate inherits it); and the realized
AUROC's own standard error (Hanley and McNeil, 1982). A window's error is
`within_2sd` when it is within two standard deviations of the estimate
minus the realized figure, sqrt(realized_sd^2 + recalibration_sd^2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

from chronorisk.models.site_calibration import design_effect, fit_site_recalibration, resampled_site_recalibrations
from chronorisk.training import metrics as tm
from chronorisk.training.performance_estimate import estimate_performance, expected_auroc, rounded

CASES = (25, 50, 100)
MIN_WINDOW_ROWS = 500
RESAMPLES = 200  # refits of a site recalibration for its estimate's uncertainty
NOISE_FLOOR_DRAWS = 50
ECE_FLOOR_NOTE = 0.015  # a note when the rows judged are so few that chance alone gives an ECE above this


@dataclass(frozen=True)
class SiteFigures:
    """Realized figures of risks against outcomes (training.metrics)."""

    n: int
    cases: int
    auroc: float | None
    calibration_slope: float | None
    calibration_intercept: float | None
    ece: float | None
    observed_over_expected: float | None

    @classmethod
    def of(cls, y: np.ndarray, risk: np.ndarray) -> SiteFigures:
        y, risk = np.asarray(y, dtype=float), np.asarray(risk, dtype=float)
        return cls(int(y.size), int(y.sum()), rounded(tm.auroc(y, risk)), rounded(tm.calibration_slope(y, risk), 3),
                   rounded(tm.calibration_intercept(y, risk), 3), rounded(tm.ece(y, risk)),
                   rounded(y.mean() / risk.mean(), 3) if y.size and risk.mean() > 0 else None)


@dataclass(frozen=True)
class WindowFigures:
    """One prediction time's observed and expected rate: a time trend at the site shows here."""

    window: str
    n: int
    observed_rate: float | None
    expected_rate: float | None
    observed_over_expected: float | None


@dataclass(frozen=True)
class WindowEstimate:
    """The label-free AUROC of one window beside the realized one, with the spreads of both."""

    window: str
    n: int
    estimated_auroc: float | None
    outcome_sd: float | None  # realized AUROC around the estimate by chance (outcomes drawn from the risks)
    recalibration_sd: float | None  # the estimate over refits of the site recalibration (None: global risks)
    realized_auroc: float | None
    realized_auroc_sd: float | None  # the realized AUROC's standard error (Hanley and McNeil)
    error: float | None  # estimated minus realized
    error_sd: float | None  # sqrt(realized_auroc_sd^2 + recalibration_sd^2)
    within_2sd: bool | None


@dataclass(frozen=True)
class WindowSummary:
    windows: int
    max_abs_error: float | None
    mean_abs_error: float | None
    within_0_03: int
    within_2sd: int
    detail: list[WindowEstimate] = field(default_factory=list)


@dataclass(frozen=True)
class RecalibrationRun:
    """One random order of the first local cases: the recalibration fitted on them, judged on other patients."""

    local_rows: int
    local_cases: int
    eval_rows: int
    update: str
    intercept: float
    slope: float
    before: SiteFigures
    after: SiteFigures
    ece_noise_floor: float | None  # ECE of exactly calibrated risks on as many rows (outcomes drawn from them)
    estimated_auroc_after: float | None
    estimated_auroc_after_sd: float | None  # over refits of the recalibration
    realized_auroc: float | None
    realized_auroc_sd: float | None
    estimate_within_2sd: bool | None  # |estimated - realized| <= 2 sqrt(estimated_after_sd^2 + realized_sd^2)


@dataclass(frozen=True)
class RecalibrationAfter:
    """The runs after `local_cases` cases, summarized."""

    local_cases: int
    repeats: int
    calibration_slope_mean: float | None
    calibration_slope_range: tuple[float | None, float | None]
    ece_mean: float | None
    ece_range: tuple[float | None, float | None]
    ece_noise_floor_mean: float | None
    observed_over_expected_mean: float | None
    updates: dict[str, int]
    estimated_minus_realized_auroc_mean: float | None
    estimates_within_2sd: int
    runs: list[RecalibrationRun] = field(default_factory=list)


@dataclass(frozen=True)
class NewSiteEvaluation:
    site: str
    since: str
    rows: int
    cases: int
    before_labels: SiteFigures
    ece_noise_floor: float | None
    by_window: list[WindowFigures]
    label_free_global: WindowSummary
    recalibrated: list[RecalibrationAfter]
    label_free_recalibrated: WindowSummary | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def auroc_standard_error(y: np.ndarray, score: np.ndarray) -> float | None:
    """Hanley and McNeil's (1982) standard error of the AUROC for this many cases and non-cases."""
    y = np.asarray(y, dtype=float)
    n1, n0 = float(y.sum()), float(y.size - y.sum())
    a = float(tm.auroc(y, score))
    if n1 < 1 or n0 < 1 or not math.isfinite(a):
        return None
    return float(tm.auroc_standard_error(a, n1, n0))


def ece_noise_floor(risk: np.ndarray, *, draws: int = NOISE_FLOOR_DRAWS, seed: int = 0) -> float | None:
    """The mean ECE of these risks over outcomes drawn from them: what an exactly calibrated model scores
    on this many rows by chance alone (10 equal-mass bins of ~n/10 rows each are never empty of noise)."""
    p = np.asarray(risk, dtype=float)
    if p.size == 0:
        return None
    rng = np.random.default_rng(seed)
    y = (rng.random((draws, p.size)) < p).astype(float)
    return rounded(np.mean([tm.ece(row, p) for row in y]))


def window_figures(times: np.ndarray, y: np.ndarray, risk: np.ndarray) -> list[WindowFigures]:
    out = []
    for when in np.unique(times):
        m = times == when
        obs, exp = float(y[m].mean()), float(risk[m].mean())
        out.append(WindowFigures(str(when)[:10], int(m.sum()), rounded(obs), rounded(exp),
                                 rounded(obs / exp, 3) if exp > 0 else None))
    return out


def label_free_windows(times: np.ndarray, y: np.ndarray, risk: np.ndarray, *, seed: int = 0,
                       risk_refits: Sequence[np.ndarray] = (), min_rows: int = MIN_WINDOW_ROWS) -> WindowSummary:
    """Per prediction time of >= `min_rows` rows: the estimate from the served risks beside the realized AUROC.

    `risk_refits`: the same rows' risks under refits of the site recalibration
    (each an array like `risk`); their spread of the estimate is `recalibration_sd`.
    """
    detail = []
    for when in np.unique(times):
        m = times == when
        if int(m.sum()) < min_rows:
            continue
        est = estimate_performance(risk[m], {}, draws=200, seed=seed)
        refit_sd = None
        if len(risk_refits) > 1:
            refit_sd = rounded(np.nanstd([expected_auroc(r[m]) for r in risk_refits], ddof=1))
        realized = rounded(tm.auroc(y[m], risk[m]))
        realized_sd = rounded(auroc_standard_error(y[m], risk[m]))
        error = rounded(est.auroc - realized) if est.auroc is not None and realized is not None else None
        error_sd = rounded(math.hypot(realized_sd or 0.0, refit_sd or 0.0)) if realized_sd is not None else None
        within = None if error is None or error_sd is None else abs(error) <= 2 * error_sd
        detail.append(WindowEstimate(str(when)[:10], int(m.sum()), est.auroc, est.auroc_spread.sd, refit_sd,
                                     realized, realized_sd, error, error_sd, within))
    errors = np.abs([d.error for d in detail if d.error is not None])
    return WindowSummary(len(detail), rounded(errors.max()) if errors.size else None,
                         rounded(errors.mean()) if errors.size else None, int((errors <= 0.03).sum()),
                         sum(1 for d in detail if d.within_2sd), detail)


def local_and_evaluation_rows(times: np.ndarray, y: np.ndarray, subjects: np.ndarray, cases: int,
                              seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(local rows, evaluation rows) masks, or None when the site has fewer than `cases` cases.

    Local: the earliest prediction times' rows, in a seeded random order
    within a time, until `cases` cases. Evaluation: the rows at later times
    of the site's other patients (what the recalibrated model will meet).
    """
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(y.size), times))  # earliest prediction time first, shuffled within
    k = int(np.searchsorted(np.cumsum(y[order]), cases)) + 1
    if k >= y.size:
        return None
    local = np.zeros(y.size, dtype=bool)
    local[order[:k]] = True
    later = times > times[order[k - 1]]
    evaluate = later & ~np.isin(subjects, np.unique(subjects[local]))
    if not evaluate.any() or y[evaluate].min() == y[evaluate].max():
        return None
    return local, evaluate


def recalibration_runs(times: np.ndarray, y: np.ndarray, subjects: np.ndarray, risk: np.ndarray, *, site: str,
                       cases: int, repeats: int, seed: int, update: str = "empirical_bayes",
                       resamples: int = RESAMPLES) -> RecalibrationAfter | None:
    """`repeats` random orders of the first `cases` local cases: recalibrate, judge on the other patients."""
    runs = []
    for r in range(repeats):
        split = local_and_evaluation_rows(times, y, subjects, cases, seed=seed + 1000 * cases + r)
        if split is None:
            return None
        local, ev = split
        options = {"update": update, "design_effect": design_effect(subjects[local])}
        recal = fit_site_recalibration(site, risk[local], y[local], **options)
        after = recal.apply(risk[ev])
        refits = resampled_site_recalibrations(site, risk[local], y[local], draws=resamples, seed=seed + r,
                                               **options)
        refit_estimates = [expected_auroc(x.apply(risk[ev])) for x in refits]
        estimated, realized = rounded(expected_auroc(after)), rounded(tm.auroc(y[ev], after))
        estimated_sd = rounded(np.nanstd(refit_estimates, ddof=1)) if len(refit_estimates) > 1 else None
        realized_sd = rounded(auroc_standard_error(y[ev], after))
        within = None
        if None not in (estimated, realized, realized_sd):
            within = abs(estimated - realized) <= 2 * math.hypot(estimated_sd or 0.0, realized_sd)
        runs.append(RecalibrationRun(
            int(local.sum()), int(y[local].sum()), int(ev.sum()), str(recal.info.get("update", update)),
            round(recal.intercept, 4), round(recal.slope, 4), SiteFigures.of(y[ev], risk[ev]),
            SiteFigures.of(y[ev], after), ece_noise_floor(after, seed=seed + r), estimated, estimated_sd, realized,
            realized_sd, within))
    return _summarized(cases, runs)


def _summarized(cases: int, runs: list[RecalibrationRun]) -> RecalibrationAfter:
    def mean(values):
        v = [x for x in values if x is not None]
        return rounded(np.mean(v)) if v else None

    slopes = [x.after.calibration_slope for x in runs if x.after.calibration_slope is not None]
    eces = [x.after.ece for x in runs if x.after.ece is not None]
    updates: dict[str, int] = {}
    for x in runs:
        updates[x.update] = updates.get(x.update, 0) + 1
    gaps = [x.estimated_auroc_after - x.realized_auroc for x in runs
            if x.estimated_auroc_after is not None and x.realized_auroc is not None]
    return RecalibrationAfter(
        cases, len(runs), mean(slopes), (min(slopes, default=None), max(slopes, default=None)), mean(eces),
        (min(eces, default=None), max(eces, default=None)), mean(x.ece_noise_floor for x in runs),
        mean(x.after.observed_over_expected for x in runs), updates, mean(gaps),
        sum(1 for x in runs if x.estimate_within_2sd), runs)


def evaluate_new_site(rows: pl.DataFrame, global_risk: np.ndarray, *, site: str, since: str,
                      cases: Sequence[int] = CASES, repeats: int = 5, seed: int = 0, update: str = "empirical_bayes",
                      min_window_rows: int = MIN_WINDOW_ROWS, resamples: int = RESAMPLES) -> NewSiteEvaluation:
    """The new site's figures from its rows since it joined (`prediction_time`, `boolean_value`,
    `subject_id`) and the global model's calibrated risk of each (no site layer)."""
    times = rows["prediction_time"].to_numpy()
    y = rows["boolean_value"].cast(pl.Float64).to_numpy()
    subjects = rows["subject_id"].to_numpy()
    risk = np.asarray(global_risk, dtype=float)
    if risk.shape != y.shape:
        raise ValueError(f"global_risk: {risk.size} risks for {y.size} rows")
    notes: list[str] = []
    recalibrated = []
    for count in sorted(cases):
        after = recalibration_runs(times, y, subjects, risk, site=site, cases=count, repeats=repeats, seed=seed,
                                   update=update, resamples=resamples)
        if after is None:
            notes.append(f"{count} local cases: the site has too few cases after {since} (or no other "
                         f"patients left to judge on)")
            continue
        recalibrated.append(after)
        if after.ece_noise_floor_mean is not None and after.ece_noise_floor_mean > ECE_FLOOR_NOTE:
            rows_judged = int(np.mean([r.eval_rows for r in after.runs]))
            notes.append(f"{count} local cases: judged on ~{rows_judged:,} rows, where even exactly calibrated "
                         f"risks show an ECE of {after.ece_noise_floor_mean:.3f} by chance: too few to judge "
                         f"an ECE of 0.02 (more patients)")
    label_free_after = None
    if recalibrated:
        largest = recalibrated[-1].local_cases
        local, ev = local_and_evaluation_rows(times, y, subjects, largest, seed=seed + 1000 * largest)
        options = {"update": update, "design_effect": design_effect(subjects[local])}
        recal = fit_site_recalibration(site, risk[local], y[local], **options)
        refits = resampled_site_recalibrations(site, risk[local], y[local], draws=resamples, seed=seed, **options)
        label_free_after = label_free_windows(times[ev], y[ev], recal.apply(risk[ev]), seed=seed,
                                              risk_refits=[x.apply(risk[ev]) for x in refits],
                                              min_rows=min_window_rows)
    return NewSiteEvaluation(
        site=site, since=since, rows=int(y.size), cases=int(y.sum()), before_labels=SiteFigures.of(y, risk),
        ece_noise_floor=ece_noise_floor(risk, seed=seed), by_window=window_figures(times, y, risk),
        label_free_global=label_free_windows(times, y, risk, seed=seed, min_rows=min_window_rows),
        recalibrated=recalibrated, label_free_recalibrated=label_free_after, notes=notes)


def new_site_table(result: NewSiteEvaluation) -> str:
    """The evaluation as a few lines of text for the terminal."""
    b = result.before_labels
    lines = [f"site {result.site} from {result.since}: {result.rows:,} rows, {result.cases:,} cases",
             f"  before local labels  AUROC {_f(b.auroc)}  slope {_f(b.calibration_slope)}  ECE {_f(b.ece)}  "
             f"O/E {_f(b.observed_over_expected)}  (ECE of a calibrated model on as many rows: "
             f"{_f(result.ece_noise_floor)})"]
    for name, summary in (("global", result.label_free_global), ("recalibrated", result.label_free_recalibrated)):
        if summary is None:
            continue
        for w in summary.detail:
            lines.append(f"  label-free ({name}) {w.window}  n {w.n:>6,}  estimated {_f(w.estimated_auroc)}  "
                         f"realized {_f(w.realized_auroc)} +/- {_f(w.realized_auroc_sd)}  error {_f(w.error)}"
                         f"{'' if w.within_2sd else '  (beyond 2 SD)'}")
    for r in result.recalibrated:
        lines.append(f"  after {r.local_cases:>3} local cases ({r.repeats} orders)  "
                     f"slope {_f(r.calibration_slope_mean)}  ECE {_f(r.ece_mean)} "
                     f"(floor {_f(r.ece_noise_floor_mean)})  "
                     f"O/E {_f(r.observed_over_expected_mean)}  updates {r.updates}")
    lines.extend(f"  note: {n}" for n in result.notes)
    return "\n".join(lines)


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"
