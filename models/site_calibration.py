"""Per-site recalibration: a site's own intercept and slope on the global model's log-odds, shrunk when cases are few.

A model moved to a new region ranks patients about as well as at home but
its risks can be off: the region's baseline rate differs (intercept), or its
case mix spreads the scores differently (slope). With its own labels a site
gets risk = sigmoid(a + b * logit(global risk)), where the global risk is
the model's calibrated risk (so a = 0, b = 1 is the global calibration
itself, unchanged).

Few local cases cannot pin down a and b: 25 outcomes give a slope with a
standard error near 0.3. The fit is therefore shrunk towards the global
calibration by pseudo-rows: the site's own rows once more, with the outcome
the global calibration expects (their global risk, a fractional outcome),
weighted so that they carry `prior_cases` expected cases. With few local
cases the pseudo-rows dominate and the map stays near the identity; as local
cases accumulate the site's own outcomes take over (after 4 x `prior_cases`
cases the pseudo-rows weigh a fifth). It is the same weighted logistic fit as
Platt scaling (`calibration.fit_logistic_1d`), so rows and binned tables
(federated: a site sends counts per cell, never rows) fit alike.

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

PRIOR_CASES = 10.0  # expected cases the global calibration counts for in a site's fit
MIN_SITE_CASES = 5  # fewer local cases (or non-cases): no site recalibration at all


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
                           prior_cases: float = PRIOR_CASES) -> SiteRecalibration:
    """A site's recalibration from its own rows: the global model's risk and the outcome that followed."""
    risk = np.asarray(global_risk, dtype=float)
    y = np.asarray(outcome, dtype=float)
    if risk.shape != y.shape or risk.ndim != 1:
        raise ValueError(f"global_risk and outcome must be 1-D of the same length, got {risk.shape} and {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("outcome must be 0/1")
    return fit_site_recalibration_from_cells(site, WeightedOutcomes.from_rows(logit(risk), y),
                                             prior_cases=prior_cases)


def fit_site_recalibration_from_cells(site: str, cells: WeightedOutcomes, *,
                                      prior_cases: float = PRIOR_CASES) -> SiteRecalibration:
    """The same fit on weighted rows whose `margin` is logit(global risk): raw rows, or a site's binned table."""
    n, cases = cells.total, cells.positives
    if min(cases, n - cases) < MIN_SITE_CASES:
        raise ValueError(f"site {site}: {cases:g} cases and {n - cases:g} non-cases; a recalibration needs "
                         f"at least {MIN_SITE_CASES} of each")
    if prior_cases < 0:
        raise ValueError(f"prior_cases must be >= 0, got {prior_cases}")
    expected = sigmoid(cells.margin)
    pseudo = prior_cases / max(float(cells.weight @ expected), 1e-12)  # pseudo-rows carry prior_cases cases
    x = np.r_[cells.margin, cells.margin]
    y = np.r_[cells.y, expected]
    w = np.r_[cells.weight, cells.weight * pseudo]
    a, b = fit_logistic_1d(x, y, w)
    if not (math.isfinite(float(a)) and math.isfinite(float(b))) or float(b) <= 0:
        raise ValueError(f"site {site}: the recalibration did not converge (intercept {a}, slope {b})")
    local_a, local_b = fit_logistic_1d(cells.margin, cells.y, cells.weight)
    info = {"unshrunk_intercept": round(float(local_a), 4), "unshrunk_slope": round(float(local_b), 4),
            "observed_rate": round(cases / n, 5), "expected_rate": round(float(cells.weight @ expected) / n, 5)}
    return SiteRecalibration(site, float(a), float(b), float(n), float(cases), float(prior_cases), info)


def site_column(features: object) -> Iterable[str] | None:
    """The `site` column of a polars or pandas table, as an array (None when there is none)."""
    columns = getattr(features, "columns", None)
    if columns is None or "site" not in list(columns):
        return None
    col = features["site"]
    return np.asarray(col.to_list() if hasattr(col, "to_list") else list(col), dtype=object)
