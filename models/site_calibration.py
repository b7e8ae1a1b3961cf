"""Per-site recalibration: a site's own intercept and slope on the global model's log-odds, shrunk when cases are few.

A model moved to a new region ranks patients about as well as at home but
its risks can be off: the region's baseline rate differs (intercept), or its
case mix spreads the scores differently (slope). With its own labels a site
gets risk = sigmoid(a + b * logit(global risk)), where the global risk is
the model's calibrated risk (so a = 0, b = 1 is the global calibration
itself, unchanged).

Few local cases cannot pin down a and b: 100 cases give a slope with a
standard error near 0.1, 25 cases near 0.25, while the intercept (the
site's rate) is pinned down sooner. How much of each to take from the site
is decided as clinical prediction models are updated (Steyerberg,
"Clinical Prediction Models", ch. 20; Vergouwe et al., Stat Med 2017):

- `update="empirical_bayes"` (the default): the slope's departure from 1
  is kept in the share (LR - 1) / LR of its own likelihood ratio against
  the intercept-only fit, then the intercept is refitted with that slope
  held and its departure from 0 kept in the same way (`empirical_bayes`).
  The shrinkage strength comes from the site's own evidence, not a fixed
  prior: a calibrated site keeps about the global calibration, a clear
  shift in rate is taken nearly whole;
- `update="closed_test"`: Vergouwe's closed testing: no update unless
  intercept and slope beat the global calibration at level `alpha` (2 df),
  then the slope only if it beats the intercept-only fit (1 df); a kept
  slope is shrunk as above and the intercept refitted in full;
- `update="intercept_slope"`: the earlier rule: both always, shrunk together
  by pseudo-rows (the site's rows once more with the outcome the global
  calibration expects, carrying `prior_cases` cases). It pulls the intercept
  back by a fixed amount whatever the evidence, leaving the rate of a clearly
  shifted site off (O/E 1.03 after 100 cases, 1.13 after 25, at the
  generated new region) and moving a calibrated site as much as a shifted one.

Measured: on simulated sites of known miscalibration (benchmarks/
site_recalibration_bench.py: calibrated; rate x1.4; rate and slope 0.85;
slope 0.7; 25 and 100 cases; mean absolute error against the true risk)
empirical_bayes had the lowest total error (0.112 against 0.120 for
pseudo-rows, 0.124 closed testing, 0.131 the intercept alone) and moved a
calibrated site least but for closed testing (0.008 against 0.013 for
pseudo-rows with 25 cases). On the generated new region (benchmarks/
new_region_bench.py, `update_rules`, 10 random orders of the first local
cases, ECE on ~6,000 later rows where exactly calibrated risks show 0.010 by
chance) the ECE after 25 / 50 / 100 cases was 0.023 / 0.018 / 0.017 with
empirical_bayes, 0.022 / 0.017 / 0.016 with pseudo-rows and 0.029 / 0.024 /
0.019 with closed testing (seed 7: 0.022 / 0.021 / 0.016, 0.019 / 0.017 /
0.013, 0.032 / 0.027 / 0.018; there the site's rate falls after it joins, O/E
1.46 to 1.32, which favours a rule that corrects the rate less). Closed
testing is too timid with 25 cases: its 2-df first test often keeps the
global calibration although the site's O/E is 1.4.

When patients contribute several rows (several prediction times), the
likelihood ratios are divided by the rows per patient (`design_effect`), so
all of a site's labelled rows can be used without overstating them. All the
fits are weighted logistic fits (`calibration.fit_logistic_1d`), so rows and
binned tables (federated: a site sends counts per cell, never rows) fit alike.

A `SiteLayer` holds the sites' recalibrations; the model bundle applies it in
`predict_risk(..., site=...)` so batch, online, FHIR and CDS outputs all get
it, and a bundle with a new layer is a new model version, promoted like any.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from chronorisk.models.calibration import WeightedOutcomes, fit_logistic_1d, logit, sigmoid

PRIOR_CASES = 10.0  # update "intercept_slope": expected cases the global calibration counts for in a site's fit
MIN_SITE_CASES = 5  # fewer local cases (or non-cases): no site recalibration at all
CLOSED_TEST_ALPHA = 0.05  # update "closed_test": level of its likelihood-ratio tests
UPDATES = ("empirical_bayes", "closed_test", "intercept_slope")


@dataclass(frozen=True)
class SiteRecalibration:
    """risk = sigmoid(intercept + slope * logit(global risk)) at `site`, fitted on `n` rows with `cases` cases."""

    site: str
    intercept: float
    slope: float
    n: float
    cases: float
    prior_cases: float
    info: dict = field(default_factory=dict)

    def apply(self, risk: np.ndarray) -> np.ndarray:
        return sigmoid(self.intercept + self.slope * logit(np.asarray(risk, dtype=float)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping) -> SiteRecalibration:
        try:
            out = cls(str(raw["site"]), float(raw["intercept"]), float(raw["slope"]), float(raw["n"]),
                      float(raw["cases"]), float(raw["prior_cases"]), dict(raw.get("info") or {}))
        except (KeyError, TypeError, ValueError):
            raise ValueError("a site recalibration needs site, intercept, slope, n, cases and prior_cases") from None
        if not (math.isfinite(out.intercept) and math.isfinite(out.slope)) or out.slope <= 0:
            raise ValueError(f"site {out.site}: recalibration needs a finite intercept and a positive slope")
        return out


@dataclass(frozen=True)
class SiteLayer:
    """The per-site recalibrations of one model; sites without one keep the global calibration."""

    sites: dict[str, SiteRecalibration] = field(default_factory=dict)

    def apply(self, risk: np.ndarray, site: str | Sequence[str] | np.ndarray | None) -> np.ndarray:
        """Each row's risk at its site (`site` one name for every row, or one per row; None: global)."""
        risk = np.asarray(risk, dtype=float)
        if not self.sites or site is None:
            return risk
        if isinstance(site, str):
            recal = self.sites.get(site)
            return recal.apply(risk) if recal is not None else risk
        sites = np.asarray(site, dtype=object)
        if sites.shape != risk.shape:
            raise ValueError(f"site: {sites.size} site names for {risk.size} risks")
        out = risk.copy()
        for name, recal in self.sites.items():
            rows = sites == name
            if rows.any():
                out[rows] = recal.apply(risk[rows])
        return out

    def with_site(self, recal: SiteRecalibration) -> SiteLayer:
        return SiteLayer({**self.sites, recal.site: recal})

    def to_dict(self) -> dict:
        return {name: r.to_dict() for name, r in sorted(self.sites.items())}

    @classmethod
    def from_dict(cls, raw: object) -> SiteLayer:
        if not raw:
            return cls()
        if not isinstance(raw, Mapping):
            raise ValueError("site_calibration must be an object of site: recalibration")
        return cls({str(site): SiteRecalibration.from_dict(r) for site, r in raw.items()})


def fit_site_recalibration(site: str, global_risk: np.ndarray, outcome: np.ndarray, *,
                           update: str = "empirical_bayes", alpha: float = CLOSED_TEST_ALPHA,
                           prior_cases: float = PRIOR_CASES, design_effect: float = 1.0) -> SiteRecalibration:
    """A site's recalibration from its own rows: the global model's risk and the outcome that followed.

    `update`: "empirical_bayes" (default: slope, then intercept, each shrunk
    towards the global calibration by its own likelihood ratio), "closed_test"
    (no update, intercept, or intercept and slope, chosen by closed testing at
    level `alpha`) or "intercept_slope" (both always, shrunk by `prior_cases`
    pseudo-cases). `design_effect`: rows per independent unit
    when a patient contributes several rows (the tests' statistics are
    divided by it), see `design_effect`.
    """
    risk = np.asarray(global_risk, dtype=float)
    y = np.asarray(outcome, dtype=float)
    if risk.shape != y.shape or risk.ndim != 1:
        raise ValueError(f"global_risk and outcome must be 1-D of the same length, got {risk.shape} and {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("outcome must be 0/1")
    return fit_site_recalibration_from_cells(site, WeightedOutcomes.from_rows(logit(risk), y), update=update,
                                             alpha=alpha, prior_cases=prior_cases, design_effect=design_effect)


def fit_site_recalibration_from_cells(site: str, cells: WeightedOutcomes, *, update: str = "empirical_bayes",
                                      alpha: float = CLOSED_TEST_ALPHA, prior_cases: float = PRIOR_CASES,
                                      design_effect: float = 1.0) -> SiteRecalibration:
    """The same fit on weighted rows whose `margin` is logit(global risk): raw rows, or a site's binned table."""
    n, cases = cells.total, cells.positives
    if min(cases, n - cases) < MIN_SITE_CASES:
        raise ValueError(f"site {site}: {cases:g} cases and {n - cases:g} non-cases; a recalibration needs "
                         f"at least {MIN_SITE_CASES} of each")
    if update not in UPDATES:
        raise ValueError(f"update {update!r} is not one of {', '.join(UPDATES)}")
    if prior_cases < 0:
        raise ValueError(f"prior_cases must be >= 0, got {prior_cases}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if not design_effect >= 1:
        raise ValueError(f"design_effect must be >= 1, got {design_effect}")
    expected = float(cells.weight @ sigmoid(cells.margin))
    fits = candidate_updates(cells)
    info = {"unshrunk_intercept": round(fits.intercept_slope[0], 4),
            "unshrunk_slope": round(fits.intercept_slope[1], 4), "observed_rate": round(cases / n, 5),
            "expected_rate": round(expected / n, 5)}
    if update in ("closed_test", "empirical_bayes"):
        choice = closed_test(fits, alpha=alpha, design_effect=design_effect) if update == "closed_test" \
            else empirical_bayes(fits, design_effect=design_effect)
        a, b = choice.intercept, choice.slope
        info.update(choice.info())
        prior = 0.0
    else:
        a, b = _pseudo_row_fit(cells, prior_cases)
        info["update"], prior = "intercept_slope", float(prior_cases)
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        raise ValueError(f"site {site}: the recalibration did not converge (intercept {a}, slope {b})")
    return SiteRecalibration(site, float(a), float(b), float(n), float(cases), prior, info)


@dataclass(frozen=True)
class CandidateUpdates:
    """The three nested updates fitted on one site's rows, with their log-likelihoods.

    none: the global calibration (intercept 0, slope 1); intercept:
    recalibration in the large (slope held at 1); intercept_slope: logistic
    recalibration. `rows` are the weighted rows, kept to refit the intercept
    once the slope is shrunk.
    """

    rows: WeightedOutcomes
    loglik_none: float
    intercept: float
    loglik_intercept: float
    intercept_slope: tuple[float, float]
    loglik_intercept_slope: float


def candidate_updates(cells: WeightedOutcomes) -> CandidateUpdates:
    a1, _ = fit_logistic_1d(cells.margin, cells.y, cells.weight, fixed_slope=1.0)
    a2, b2 = fit_logistic_1d(cells.margin, cells.y, cells.weight)
    a1, a2, b2 = float(a1), float(a2), float(b2)
    return CandidateUpdates(cells, _loglik(cells, 0.0, 1.0), a1, _loglik(cells, a1, 1.0), (a2, b2),
                            _loglik(cells, a2, b2))


@dataclass(frozen=True)
class UpdateChoice:
    """The update chosen for a site, with the statistics that chose it."""

    update: str  # "none", "intercept" or "intercept_slope"
    intercept: float
    slope: float
    statistics: dict = field(default_factory=dict)

    def info(self) -> dict:
        return {"update": self.update, **{k: round(float(v), 5) for k, v in self.statistics.items()}}


def empirical_bayes(fits: CandidateUpdates, *, design_effect: float = 1.0) -> UpdateChoice:
    """Slope, then intercept, each shrunk towards the global calibration by the evidence for it.

    1. the slope's departure from 1 is kept in the share s = (LR - 1) / LR
       (0 when LR <= 1) of its likelihood ratio against the intercept-only
       fit (1 df): the heuristic shrinkage of van Houwelingen and le Cessie,
       the empirical-Bayes positive-part factor 1 - se^2 / (b - 1)^2 with the
       squared Wald statistic replaced by the likelihood ratio;
    2. the intercept is refitted with that slope held, and its departure from
       0 is kept in the same way by its own likelihood ratio (1 df).

    A calibrated site keeps about the global calibration (both ratios near
    1); a clear shift in rate (what a new region most often has, and what
    few cases estimate best) is kept nearly whole; a slope is kept only as
    far as the site's cases show it. The statistics are divided by
    `design_effect` when patients contribute several rows each.
    """
    rows = fits.rows
    lr_slope = max(0.0, 2 * (fits.loglik_intercept_slope - fits.loglik_intercept)) / design_effect
    slope_kept = _kept_share(lr_slope)
    slope = 1.0 + slope_kept * (fits.intercept_slope[1] - 1.0)
    a_at_slope, _ = fit_logistic_1d(rows.margin, rows.y, rows.weight, fixed_slope=slope,
                                    start=(fits.intercept, slope))
    a_at_slope = float(a_at_slope)
    lr_intercept = max(0.0, 2 * (_loglik(rows, a_at_slope, slope) - _loglik(rows, 0.0, slope))) / design_effect
    intercept_kept = _kept_share(lr_intercept)
    update = "intercept_slope" if slope_kept > 0 else ("intercept" if intercept_kept > 0 else "none")
    return UpdateChoice(update, intercept_kept * a_at_slope, slope,
                        {"lr_slope": lr_slope, "slope_shrinkage": slope_kept, "lr_intercept": lr_intercept,
                         "intercept_shrinkage": intercept_kept})


def _kept_share(lr: float) -> float:
    """The heuristic shrinkage factor (LR - 1) / LR of a 1-df likelihood ratio, 0 at or below 1."""
    return max(0.0, (lr - 1.0) / lr) if lr > 0 else 0.0


def closed_test(fits: CandidateUpdates, *, alpha: float = CLOSED_TEST_ALPHA,
                design_effect: float = 1.0) -> UpdateChoice:
    """Vergouwe et al. (2017): the most extensive update is tested first, so that level `alpha` holds overall.

    1. intercept_slope against none (likelihood ratio, 2 df): not significant,
       no update (the global calibration stays);
    2. intercept_slope against intercept (1 df): significant, intercept and
       slope; else the intercept only (recalibration in the large).

    A chosen slope is shrunk towards 1 by the heuristic factor of its own
    test (see `empirical_bayes`) and the intercept refitted with it held, so
    the site's observed rate is matched exactly. The statistics are divided
    by `design_effect` when patients contribute several rows each.
    """
    from scipy.stats import chi2

    lr_any = max(0.0, 2 * (fits.loglik_intercept_slope - fits.loglik_none)) / design_effect
    lr_slope = max(0.0, 2 * (fits.loglik_intercept_slope - fits.loglik_intercept)) / design_effect
    p_any, p_slope = float(chi2.sf(lr_any, 2)), float(chi2.sf(lr_slope, 1))
    stats = {"lr_any": lr_any, "p_any": p_any, "lr_slope": lr_slope, "p_slope": p_slope}
    if p_any >= alpha:
        return UpdateChoice("none", 0.0, 1.0, {**stats, "slope_shrinkage": 0.0})
    if p_slope >= alpha:
        return UpdateChoice("intercept", fits.intercept, 1.0, {**stats, "slope_shrinkage": 0.0})
    shrinkage = _kept_share(lr_slope)
    slope = 1.0 + shrinkage * (fits.intercept_slope[1] - 1.0)
    rows = fits.rows
    a, _ = fit_logistic_1d(rows.margin, rows.y, rows.weight, fixed_slope=slope,
                           start=(fits.intercept_slope[0], slope))
    return UpdateChoice("intercept_slope", float(a), float(slope), {**stats, "slope_shrinkage": shrinkage})


def design_effect(groups: Sequence[object] | np.ndarray) -> float:
    """Rows per independent unit: a site's rows of several prediction times per patient are not independent.

    The mean number of rows per group (patient): the tests treat the rows
    as that many times fewer independent observations (a conservative
    design effect: it assumes a patient's rows repeat one another fully).
    """
    g = np.asarray(groups, dtype=object)
    if g.size == 0:
        return 1.0
    return float(g.size / len(set(g.tolist())))


def _loglik(cells: WeightedOutcomes, a: float, b: float) -> float:
    eta = a + b * cells.margin
    return float(cells.weight @ (cells.y * eta - np.logaddexp(0.0, eta)))


def _pseudo_row_fit(cells: WeightedOutcomes, prior_cases: float) -> tuple[float, float]:
    """Intercept and slope shrunk by pseudo-rows: the site's rows once more, with the outcome the global
    calibration expects, weighted to carry `prior_cases` expected cases."""
    expected = sigmoid(cells.margin)
    pseudo = prior_cases / max(float(cells.weight @ expected), 1e-12)
    x = np.r_[cells.margin, cells.margin]
    y = np.r_[cells.y, expected]
    w = np.r_[cells.weight, cells.weight * pseudo]
    a, b = fit_logistic_1d(x, y, w)
    return float(a), float(b)


def site_column(features: object) -> Iterable[str] | None:
    """The `site` column of a polars or pandas table, as an array (None when there is none)."""
    columns = getattr(features, "columns", None)
    if columns is None or "site" not in list(columns):
        return None
    col = features["site"]
    return np.asarray(col.to_list() if hasattr(col, "to_list") else list(col), dtype=object)


def resampled_site_recalibrations(site: str, global_risk: np.ndarray, outcome: np.ndarray, *, draws: int = 200,
                                  seed: int = 0, **fit_options) -> list[SiteRecalibration]:
    """The site's recalibration refitted on `draws` resamples of its rows (Poisson(1) weights, seeded).

    The spread of anything computed from the recalibrated risks over these
    refits (the expected AUROC of a window, say) is the uncertainty the few
    local cases leave in it, the choice of update included. Resamples with
    too few cases or non-cases for a fit are skipped.
    """
    risk = np.asarray(global_risk, dtype=float)
    y = np.asarray(outcome, dtype=float)
    rows = WeightedOutcomes.from_rows(logit(risk), y)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        w = rng.poisson(1.0, y.size).astype(float)
        try:
            out.append(fit_site_recalibration_from_cells(site, WeightedOutcomes(rows.margin, rows.y, w),
                                                         **fit_options))
        except ValueError:
            continue
    return out
