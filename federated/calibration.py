"""Federated calibration and evaluation from per-site binned statistics, never records.

Every site scores its own rows with the global model and reports, on a grid
of the model's raw score (log-odds) that all parties know in advance, how
many rows fall in each bin, how many of them are positive, and the sum of
their raw scores. Those counts are sums over rows, so the server adds the
sites' tables and fits on the total exactly as it would on pooled bins.

No cell reveals a handful of patients' outcomes: before a table leaves a
site, cells with fewer than `min_cell_rows` rows (params.yaml
`federated.min_cell_rows`, default 5) are pooled with their neighbours in
score order (counts, positives and score sums added, filed under the bin of
the pooled mean score); a site with fewer rows than that sends nothing.

The calibrator itself is fitted by the models package's one calibration
core (`chronorisk.models.calibration.fit_calibrator_from_folds`): each bin
becomes weighted rows at its mean score, the sites' two tuning halves are
the folds of its `auto` rule (isotonic only when it beats Platt by more than
two standard errors), and its guarantees (pooled end blocks, never a risk of
exactly 0 or 1) hold here as they do centrally.

Evaluation uses the same tables of held-out rows, per site: every bin
becomes two weighted rows (its positives and its negatives at the bin's
calibrated risk) fed to the centralized evaluation's own metric functions;
pairs within one bin tie, and bins are 0.02 log-odds wide, far finer than
any score difference that matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from chronorisk.models.calibration import Calibrator, WeightedOutcomes
    from chronorisk.models.site_calibration import SiteLayer, SiteRecalibration

# Raw-score grid shared by every site: 0.02 log-odds wide bins, plus one
# overflow bin at each end (LightGBM binary margins stay well inside).
GRID_LOW = -15.0
GRID_HIGH = 15.0
GRID_WIDTH = 0.02
N_BINS = round((GRID_HIGH - GRID_LOW) / GRID_WIDTH) + 2
MIN_CELL_ROWS = 5  # default of params.yaml federated.min_cell_rows


def bin_index(raw_scores: np.ndarray) -> np.ndarray:
    """Bin of each raw score on the shared grid (0 and N_BINS-1 are the overflow bins)."""
    s = np.asarray(raw_scores, dtype=np.float64)
    idx = np.floor((s - GRID_LOW) / GRID_WIDTH).astype(np.int64) + 1
    return np.clip(idx, 0, N_BINS - 1)


@dataclass
class BinnedScores:
    """Per-bin count, positives and sum of raw scores: a sufficient summary of (score, label) rows."""

    n: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))
    pos: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))
    score_sum: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))

    @classmethod
    def from_rows(cls, raw_scores: np.ndarray, labels: np.ndarray) -> BinnedScores:
        s = np.asarray(raw_scores, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        if s.shape != y.shape:
            raise ValueError(f"scores and labels differ in length ({s.shape} vs {y.shape})")
        idx = bin_index(s)
        return cls(
            n=np.bincount(idx, minlength=N_BINS).astype(np.float64),
            pos=np.bincount(idx, weights=y, minlength=N_BINS),
            score_sum=np.bincount(idx, weights=s, minlength=N_BINS),
        )

    @classmethod
    def from_arrays(cls, n: np.ndarray, pos: np.ndarray, score_sum: np.ndarray) -> BinnedScores:
        arrays = [np.asarray(a, dtype=np.float64) for a in (n, pos, score_sum)]
        if any(a.shape != (N_BINS,) for a in arrays):
            raise ValueError(f"binned statistics must have {N_BINS} bins")
        if (arrays[0] < 0).any() or (arrays[1] < 0).any() or (arrays[1] > arrays[0] + 1e-9).any():
            raise ValueError("binned statistics are inconsistent (negative counts or positives above counts)")
        return cls(*arrays)

    def __add__(self, other: BinnedScores) -> BinnedScores:
        return BinnedScores(self.n + other.n, self.pos + other.pos, self.score_sum + other.score_sum)

    @property
    def total(self) -> float:
        return float(self.n.sum())

    @property
    def positives(self) -> float:
        return float(self.pos.sum())

    def as_outcomes(self) -> WeightedOutcomes:
        """The table as weighted rows for the calibration core: positives and negatives at each bin's mean score."""
        from chronorisk.models.calibration import WeightedOutcomes

        return WeightedOutcomes.from_cells(*self.occupied())

    def with_small_cells_pooled(self, min_rows: int = MIN_CELL_ROWS) -> BinnedScores:
        """Cells of fewer than `min_rows` rows pooled with their neighbours; nothing at all below `min_rows` rows.

        Occupied bins are taken in score order and gathered into groups of at
        least `min_rows` rows (a short last group joins the one before); each
        group's sums are filed under the bin of its mean score, which lies in
        the group's own span, so groups never collide and sums over sites
        stay sums of rows.
        """
        if min_rows <= 1:
            return self
        out = BinnedScores()
        if self.total < min_rows:
            return out
        keep = self.n > 0
        groups = _groups_of_at_least(self.n[keep], min_rows)
        n = np.bincount(groups, weights=self.n[keep])
        pos = np.bincount(groups, weights=self.pos[keep])
        score_sum = np.bincount(groups, weights=self.score_sum[keep])
        target = bin_index(score_sum / n)
        np.add.at(out.n, target, n)
        np.add.at(out.pos, target, pos)
        np.add.at(out.score_sum, target, score_sum)
        return out

    def occupied(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean raw score, count, positives) of the non-empty bins, in score order."""
        keep = self.n > 0
        return self.score_sum[keep] / self.n[keep], self.n[keep], self.pos[keep]


def _groups_of_at_least(n: np.ndarray, min_rows: int) -> np.ndarray:
    """Group number of every bin count (in bin order): consecutive runs holding at least `min_rows` rows."""
    counts = n
    groups = np.empty(counts.size, dtype=np.int64)
    group, held = 0, 0.0
    for i, c in enumerate(counts):
        groups[i] = group
        held += c
        if held >= min_rows:
            group, held = group + 1, 0.0
    if held > 0 and group > 0:  # a short last run joins the group before it
        groups[groups == group] = group - 1
    return groups


def sum_binned(tables: list[BinnedScores]) -> BinnedScores:
    total = BinnedScores()
    for t in tables:
        total = total + t
    return total


# ---- calibration ----------------------------------------------------------------------


def fit_from_tables(folds: list[BinnedScores], method: str = "auto") -> tuple[Calibrator, dict]:
    """The models package's calibrator, fitted on the summed tables of each fold (the tuning halves)."""
    from chronorisk.models.calibration import fit_calibrator_from_folds

    cal = fit_calibrator_from_folds([t.as_outcomes() for t in folds], method)
    cal.info["federated"] = True
    return cal, cal.info


def site_layer_from_tables(cal: Calibrator, tables: dict[str, BinnedScores]) -> SiteLayer:
    """Each site's recalibration on the global calibrated log-odds, from its binned (tuning) table.

    Sites with too few cases (or non-cases) for a recalibration keep the global calibration; the update
    itself (none, intercept, or intercept and slope) is chosen as for rows (`fit_site_recalibration_from_cells`).
    """
    from chronorisk.models.calibration import WeightedOutcomes, logit
    from chronorisk.models.site_calibration import SiteLayer, fit_site_recalibration_from_cells

    layer = SiteLayer()
    for site, table in sorted(tables.items()):
        s, n, k = table.occupied()
        if s.size == 0:
            continue
        cells = WeightedOutcomes.from_cells(logit(cal.predict(s)), n, k)
        try:
            recal = fit_site_recalibration_from_cells(site, cells)
        except ValueError:
            continue
        layer = layer.with_site(recal)
    return layer


# ---- evaluation from bins ---------------------------------------------------------------


def binned_auroc(table: BinnedScores) -> float:
    """AUROC from per-bin positives and negatives (ties within a bin count one half)."""
    pos = table.pos
    neg = table.n - table.pos
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (n_pos * n_neg))


def binned_metrics(table: BinnedScores, cal: Calibrator, recal: SiteRecalibration | None = None) -> dict[str, float]:
    """The centralized evaluation's metrics (training.metrics) on the bins, each bin as two weighted rows.

    A bin becomes a row of positives and a row of negatives at the bin's
    calibrated risk, weighted by their counts: AUROC (ties within a bin count
    one half), AUPRC, Brier score, equal-mass ECE, calibration slope and
    intercept are then computed by the very functions `chronorisk evaluate`
    uses, so federated and centralized figures mean the same thing. `recal`: the site's own
    recalibration on top of the global calibrator.
    """
    from chronorisk.training import metrics as m

    n_rows = table.total
    if n_rows == 0:
        return {"n": 0.0}
    s, n, k = table.occupied()
    p = cal.predict(s) if recal is None else recal.apply(cal.predict(s))
    p = np.clip(p, 1e-6, 1 - 1e-6)
    y = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    pp = np.concatenate([p, p])
    w = np.concatenate([k, n - k])
    keep = w > 0
    y, pp, w = y[keep], pp[keep], w[keep]
    return {
        "n": float(n_rows),
        "positives": float(k.sum()),
        "prevalence": float(k.sum() / n_rows),
        "mean_risk": float((n * p).sum() / n_rows),
        "auroc": float(m.auroc(y, pp, w)),
        "auprc": float(m.auprc(y, pp, w)),
        "brier": float(m.brier(y, pp, w)),
        "ece": float(m.ece(y, pp, w)),
        "calibration_slope": float(m.calibration_slope(y, pp, w)),
        "calibration_intercept": float(m.calibration_intercept(y, pp, w)),
    }
