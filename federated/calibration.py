"""Federated calibration and evaluation from per-site binned statistics, never records.

Every site scores its own rows with the global model and reports, on a grid
of the model's raw score (log-odds) that all parties know in advance, how
many rows fall in each bin, how many of them are positive, and the sum of
their raw scores. Those counts are sums over rows, so the server adds the
sites' tables and fits on the total exactly as it would on pooled bins:

- Platt scaling: p = sigmoid(a * s + b), weighted logistic regression on the
  bin means (Newton steps);
- isotonic regression: pool-adjacent-violators over the bins, interpolated
  linearly between bin means;
- the method is chosen like the centralized model chooses it: each site
  splits its tuning rows into two halves by subject, each method is fitted
  on one half and scored (log-loss) on the other, both ways; the winner is
  refitted on both halves.

Evaluation uses the same tables of held-out rows, per site: every bin
becomes two weighted rows (its positives and its negatives at the bin's
calibrated risk) fed to the centralized evaluation's own metric functions;
pairs within one bin tie, and bins are 0.02 log-odds wide, far finer than
any score difference that matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Raw-score grid shared by every site: 0.02 log-odds wide bins, plus one
# overflow bin at each end (LightGBM binary margins stay well inside).
GRID_LOW = -15.0
GRID_HIGH = 15.0
GRID_WIDTH = 0.02
N_BINS = round((GRID_HIGH - GRID_LOW) / GRID_WIDTH) + 2
_EPS = 1e-12


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

    def occupied(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean raw score, count, positives) of the non-empty bins, in score order."""
        keep = self.n > 0
        return self.score_sum[keep] / self.n[keep], self.n[keep], self.pos[keep]


def sum_binned(tables: list[BinnedScores]) -> BinnedScores:
    total = BinnedScores()
    for t in tables:
        total = total + t
    return total


# ---- calibrators -----------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -35, 35)))


@dataclass(frozen=True)
class Calibrator:
    """A fitted map from raw score (log-odds) to calibrated risk."""

    method: str  # "platt" or "isotonic"
    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __call__(self, raw_scores: np.ndarray) -> np.ndarray:
        s = np.asarray(raw_scores, dtype=np.float64)
        if self.method == "platt":
            return _sigmoid(self.a * s + self.b)
        return np.interp(s, np.asarray(self.x), np.asarray(self.y))

    def to_dict(self) -> dict:
        if self.method == "platt":
            return {"method": "platt", "a": self.a, "b": self.b}
        return {"method": "isotonic", "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, raw: dict) -> Calibrator:
        if raw.get("method") == "platt":
            return cls("platt", a=float(raw["a"]), b=float(raw["b"]))
        if raw.get("method") == "isotonic":
            return cls("isotonic", x=tuple(map(float, raw["x"])), y=tuple(map(float, raw["y"])))
        raise ValueError(f"calibrator method {raw.get('method')!r} is not one of platt, isotonic")


def fit_platt(table: BinnedScores, iterations: int = 50) -> Calibrator:
    """Weighted logistic regression of the label on the raw score, over bins (Newton-Raphson)."""
    s, n, k = table.occupied()
    if n.sum() == 0:
        raise ValueError("no rows to calibrate on")
    a, b = 1.0, 0.0
    ridge = 1e-6
    for _ in range(iterations):
        p = _sigmoid(a * s + b)
        w = n * p * (1 - p)
        g = np.array([np.sum((n * p - k) * s), np.sum(n * p - k)])
        h = np.array([[np.sum(w * s * s) + ridge, np.sum(w * s)], [np.sum(w * s), np.sum(w) + ridge]])
        try:
            step = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            break
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return Calibrator("platt", a=float(a), b=float(b))


def fit_isotonic(table: BinnedScores) -> Calibrator:
    """Pool-adjacent-violators over the bins (weights = counts), non-decreasing in the raw score."""
    s, n, k = table.occupied()
    if n.sum() == 0:
        raise ValueError("no rows to calibrate on")
    # blocks: [weight, positives, first score, last score]
    weights: list[float] = []
    positives: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    for si, ni, ki in zip(s, n, k, strict=True):
        weights.append(ni)
        positives.append(ki)
        lo.append(si)
        hi.append(si)
        while len(weights) > 1 and positives[-2] / weights[-2] >= positives[-1] / weights[-1]:
            w, p, h = weights.pop(), positives.pop(), hi.pop()
            lo.pop()
            weights[-1] += w
            positives[-1] += p
            hi[-1] = h
    xs: list[float] = []
    ys: list[float] = []
    for w, p, a, b in zip(weights, positives, lo, hi, strict=True):
        rate = p / w
        xs.append(a)
        ys.append(rate)
        if b > a:
            xs.append(b)
            ys.append(rate)
    return Calibrator("isotonic", x=tuple(xs), y=tuple(ys))


def log_loss(cal: Calibrator, table: BinnedScores) -> float:
    s, n, k = table.occupied()
    p = np.clip(cal(s), 1e-6, 1 - 1e-6)
    return float(-(k * np.log(p) + (n - k) * np.log(1 - p)).sum() / max(n.sum(), _EPS))


def choose_calibrator(half_a: BinnedScores, half_b: BinnedScores, method: str = "auto") -> tuple[Calibrator, dict]:
    """Fit the calibrator on pooled tuning bins; `auto` picks by two-fold log-loss between halves."""
    both = half_a + half_b
    fitters = {"platt": fit_platt, "isotonic": fit_isotonic}
    if method in fitters:
        return fitters[method](both), {"method": method}
    if method != "auto":
        raise ValueError(f"calibration method {method!r} is not one of auto, platt, isotonic")
    scores = {}
    for name, fit in fitters.items():
        losses = []
        for train, test in ((half_a, half_b), (half_b, half_a)):
            if train.total == 0 or test.total == 0:
                continue
            losses.append(log_loss(fit(train), test))
        scores[name] = float(np.mean(losses)) if losses else float("inf")
    best = min(scores, key=lambda m: (scores[m], m != "platt"))
    return fitters[best](both), {"method": best, **{f"cv_logloss_{m}": v for m, v in scores.items()}}


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


def binned_metrics(table: BinnedScores, cal: Calibrator) -> dict[str, float]:
    """The centralized evaluation's metrics (training.metrics) on the bins, each bin as two weighted rows.

    A bin becomes a row of positives and a row of negatives at the bin's
    calibrated risk, weighted by their counts: AUROC (ties within a bin count
    one half), AUPRC, Brier score, equal-mass ECE, calibration slope and
    intercept are then computed by the very functions `chronorisk evaluate`
    uses, so federated and centralized figures mean the same thing.
    """
    from chronorisk.training import metrics as m

    n_rows = table.total
    if n_rows == 0:
        return {"n": 0.0}
    s, n, k = table.occupied()
    p = np.clip(cal(s), 1e-6, 1 - 1e-6)
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
