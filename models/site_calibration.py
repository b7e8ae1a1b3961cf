"""Per-site recalibration: a site's own intercept and slope on the global model's log-odds, shrunk when cases are few.

A model moved to a new region ranks patients about as well as at home but
its risks can be off: the region's baseline rate differs (intercept), or its
case mix spreads the scores differently (slope). With its own labels a site
gets risk = sigmoid(a + b * logit(global risk)), where the global risk is
the model's calibrated risk (so a = 0, b = 1 is the global calibration
itself, unchanged).

Few local cases cannot pin down a and b: 100 cases give a slope with a
standard error near 0.1, 25 cases near 0.25, while the intercept (the
site's rate) is pinned down far sooner. The update is therefore chosen as
clinical prediction models are updated (`update="closed_test"`, the
default; Vergouwe et al., Stat Med 2017, with the shrinkage of Steyerberg's
"Clinical Prediction Models", ch. 20):

- closed testing by likelihood ratios keeps the global calibration unless
  the site's own fit is better beyond chance (level `alpha`), and adds the
  slope to the intercept only when the slope, too, differs beyond chance;
- a chosen slope is shrunk towards 1 by the empirical-Bayes (heuristic,
  van Houwelingen and le Cessie) factor (LR - 1) / LR of its own test: a
  slope barely past the test keeps little of its departure from 1, a clear
  one nearly all of it;
- the intercept is then refitted with the slope held, so the site's
  observed rate is matched exactly: the rate is what few cases estimate
  best and what a new region most often gets wrong.

When patients contribute several rows (several prediction times), the
tests' statistics are divided by the rows per patient (`design_effect`),
so all of a site's labelled rows can be used without overstating them.

The earlier rule (`update="intercept_slope"`) fits both always and shrinks
them together by pseudo-rows (the site's rows once more with the outcome
the global calibration expects, carrying `prior_cases` cases); it pulls
the intercept back too, leaving the site's rate off by about prior_cases /
cases of the miscalibration (4% of an O/E of 1.48 with 100 cases), which
the closed test does not. Both are weighted logistic fits
(`calibration.fit_logistic_1d`), so rows and binned tables (federated: a
site sends counts per cell, never rows) fit alike.

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
CLOSED_TEST_ALPHA = 0.05  # update "closed_test": level of the likelihood-ratio tests
UPDATES = ("closed_test", "intercept_slope")


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
                           update: str = "closed_test", alpha: float = CLOSED_TEST_ALPHA,
                           prior_cases: float = PRIOR_CASES, design_effect: float = 1.0) -> SiteRecalibration:
    """A site's recalibration from its own rows: the global model's risk and the outcome that followed.

    `update`: "closed_test" (default: no update, intercept, or intercept and
    slope, chosen by closed testing at level `alpha`, the slope shrunk by its
    empirical-Bayes factor) or "intercept_slope" (both always, shrunk by
    `prior_cases` pseudo-cases). `design_effect`: rows per independent unit
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


def fit_site_recalibration_from_cells(site: str, cells: WeightedOutcomes, *, update: str = "closed_test",
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
    if update == "closed_test":
        choice = closed_test(fits, alpha=alpha, design_effect=design_effect)
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
    """The update closed testing chose, its tests and the slope's shrinkage factor."""

    update: str  # "none", "intercept" or "intercept_slope"
    intercept: float
    slope: float
    lr_any: float  # likelihood ratio statistic, intercept_slope against none (2 df)
    p_any: float
    lr_slope: float  # intercept_slope against intercept (1 df)
    p_slope: float
    shrinkage: float  # the share of the slope's departure from 1 that is kept (1: none, 0: all shrunk away)

    def info(self) -> dict:
        return {"update": self.update, "lr_any": round(self.lr_any, 3), "p_any": round(self.p_any, 5),
                "lr_slope": round(self.lr_slope, 3), "p_slope": round(self.p_slope, 5),
                "slope_shrinkage": round(self.shrinkage, 4)}


def closed_test(fits: CandidateUpdates, *, alpha: float = CLOSED_TEST_ALPHA,
                design_effect: float = 1.0) -> UpdateChoice:
    """Vergouwe et al. (2017): the most extensive update is tested first, so that level `alpha` holds overall.

    1. intercept_slope against none (likelihood ratio, 2 df): not significant,
       no update (the global calibration stays);
    2. intercept_slope against intercept (1 df): significant, intercept and
       slope; else the intercept only (recalibration in the large).

    A chosen slope is shrunk towards 1 by the heuristic (van Houwelingen and
    le Cessie) factor s = (LR - 1) / LR of its own test, the empirical-Bayes
    positive-part factor 1 - se^2 / (b - 1)^2 with the Wald statistic
    replaced by the likelihood ratio; the intercept is then refitted with the
    shrunk slope held fixed, so the site's observed rate is matched exactly
    (shrinking the intercept too would leave the rate off, the bias of the
    pseudo-row prior). The statistics are divided by `design_effect` when
    patients contribute several rows each.
    """
    from scipy.stats import chi2

    lr_any = max(0.0, 2 * (fits.loglik_intercept_slope - fits.loglik_none)) / design_effect
    lr_slope = max(0.0, 2 * (fits.loglik_intercept_slope - fits.loglik_intercept)) / design_effect
    p_any, p_slope = float(chi2.sf(lr_any, 2)), float(chi2.sf(lr_slope, 1))
    if p_any >= alpha:
        return UpdateChoice("none", 0.0, 1.0, lr_any, p_any, lr_slope, p_slope, 0.0)
    if p_slope >= alpha:
        return UpdateChoice("intercept", fits.intercept, 1.0, lr_any, p_any, lr_slope, p_slope, 0.0)
    shrinkage = max(0.0, (lr_slope - 1.0) / lr_slope)
    slope = 1.0 + shrinkage * (fits.intercept_slope[1] - 1.0)
    rows = fits.rows
    a, _ = fit_logistic_1d(rows.margin, rows.y, rows.weight, fixed_slope=slope,
                           start=(fits.intercept_slope[0], slope))
    return UpdateChoice("intercept_slope", float(a), float(slope), lr_any, p_any, lr_slope, p_slope, shrinkage)


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
