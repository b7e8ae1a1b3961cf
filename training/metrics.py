"""Evaluation metrics: pure numpy functions of outcomes `y` (0/1) and risks `p`.

Every metric takes optional case weights `w`, either one weight per row (n,)
or a matrix (B, n) of B weight vectors, and then returns B values at once.
The bootstrap uses this: a resample is a vector of counts (how often each row,
or each patient, was drawn), so all B resamples are scored in a few array
operations instead of B Python loops (`bootstrap_intervals`).

Definitions (each has a known-answer test in tests/training/test_metrics.py):

- AUROC: Mann-Whitney probability that a random case scores above a random
  non-case, ties counted one half (equals sklearn's `roc_auc_score`).
- AUPRC: average precision, sum over distinct thresholds of
  (recall_k - recall_k-1) * precision_k (equals sklearn's `average_precision_score`).
- Brier: mean squared difference between risk and outcome.
- calibration slope: b in the logistic recalibration logit P(y=1) = a + b * logit(p)
  (Cox 1958), fitted without penalty by Newton's method; 1 when calibrated,
  below 1 when risks are too extreme.
- calibration intercept: calibration-in-the-large, a in logit P(y=1) = a + logit(p)
  (slope fixed at 1, logit(p) as offset); 0 when the mean risk is right,
  negative when risks are too high. (The intercept of the joint fit above
  depends on the slope and is not reported.)
- ECE: expected calibration error over 10 equal-mass bins of predicted risk
  (deciles: rows sorted by risk, cut into 10 groups of equal weight; rows
  with equal risk share a bin): sum over bins of
  (bin weight share) * |observed rate - mean risk|.
- at a risk threshold t (the high-risk tier): a row is flagged when p >= t;
  sensitivity = flagged cases / cases; PPV = flagged cases / flagged;
  number needed to screen = 1 / PPV, the patients flagged (and so followed up)
  per true case found; flagged share = flagged / all.
- net benefit at t (decision curve analysis, Vickers & Elkin 2006):
  (TP - FP * t / (1 - t)) / n; "treat all" is prevalence - (1 - prevalence) * t / (1 - t).

Risks are clipped to [1e-6, 1 - 1e-6] where a logit is taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from chronorisk.models.calibration import fit_logistic_1d, logit

ECE_BINS = 10
Metric = Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray | float]


# ---- input handling ----------------------------------------------------------------------
def _prepare(y: object, p: object, w: object | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    yy = np.asarray(y)
    yy = yy.astype(float) if yy.dtype == bool else np.asarray(yy, dtype=float)
    pp = np.asarray(p, dtype=float)
    if yy.ndim != 1 or yy.shape != pp.shape:
        raise ValueError(f"y and p must be 1-D of the same length, got {yy.shape} and {pp.shape}")
    if not np.all((yy == 0) | (yy == 1)):
        raise ValueError("y: outcomes must be 0/1 or boolean")
    if np.isnan(pp).any():
        raise ValueError("p: NaN risks")
    if w is None:
        return yy, pp, np.ones((1, yy.size)), True
    ww = np.asarray(w, dtype=float)
    squeeze = ww.ndim == 1
    ww = np.atleast_2d(ww)
    if ww.shape[1] != yy.size:
        raise ValueError(f"w: {ww.shape[1]} weights per replicate for {yy.size} rows")
    return yy, pp, ww, squeeze


def _out(values: np.ndarray, squeeze: bool) -> np.ndarray | float:
    return float(values[0]) if squeeze else values


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _tie_groups(s: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Ascending order of `s` (None when already sorted) and the start of each run of equal scores."""
    if s.size == 0:
        return None, np.zeros(0, dtype=np.int64)
    if np.all(s[1:] >= s[:-1]):
        order, ss = None, s
    else:
        order = np.argsort(s, kind="stable")
        ss = s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    return order, starts


def _grouped_counts(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted positives and negatives per distinct score, ascending: two (B, G) arrays."""
    order, starts = _tie_groups(s)
    yo = y if order is None else y[order]
    Wo = W if order is None else W[:, order]
    pos = Wo * yo
    if starts.size == y.size:  # no ties: one row per group
        return pos, Wo - pos
    pos = np.add.reduceat(pos, starts, axis=1)
    return pos, np.add.reduceat(Wo, starts, axis=1) - pos


# ---- discrimination ----------------------------------------------------------------------
def auroc(y: object, score: object, w: object | None = None) -> np.ndarray | float:
    """Area under the ROC curve (NaN when either outcome is absent)."""
    y, s, W, squeeze = _prepare(y, score, w)
    if y.size == 0:
        return _out(np.full(W.shape[0], np.nan), squeeze)
    pos, neg = _grouped_counts(y, s, W)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    return _out(_ratio(num, pos.sum(axis=1) * neg.sum(axis=1)), squeeze)


def auprc(y: object, score: object, w: object | None = None) -> np.ndarray | float:
    """Average precision (area under the precision-recall curve, step-wise); NaN without cases."""
    y, s, W, squeeze = _prepare(y, score, w)
    if y.size == 0:
        return _out(np.full(W.shape[0], np.nan), squeeze)
    pos, neg = _grouped_counts(y, s, W)
    pos, neg = pos[:, ::-1], neg[:, ::-1]  # descending score: thresholds from strict to lenient
    tp = np.cumsum(pos, axis=1)
    fp = np.cumsum(neg, axis=1)
    precision = np.nan_to_num(_ratio(tp, tp + fp))
    return _out(_ratio((pos * precision).sum(axis=1), pos.sum(axis=1)), squeeze)


# ---- accuracy and calibration ------------------------------------------------------------
def brier(y: object, p: object, w: object | None = None) -> np.ndarray | float:
    y, p, W, squeeze = _prepare(y, p, w)
    return _out(_ratio(W @ ((p - y) ** 2), W.sum(axis=1)), squeeze)


def log_loss(y: object, p: object, w: object | None = None) -> np.ndarray | float:
    y, p, W, squeeze = _prepare(y, p, w)
    pc = np.clip(p, 1e-15, 1 - 1e-15)
    loss = -(y * np.log(pc) + (1 - y) * np.log1p(-pc))
    return _out(_ratio(W @ loss, W.sum(axis=1)), squeeze)


def calibration_slope(y: object, p: object, w: object | None = None) -> np.ndarray | float:
    """b of logit P(y) = a + b logit(p); NaN when an outcome is absent."""
    y, p, W, squeeze = _prepare(y, p, w)
    x = logit(p)
    if W.shape[0] > 1:  # bootstrap replicates: start at the point estimate, stop at 1e-8
        _, b = fit_logistic_1d(x, y, W, start=fit_logistic_1d(x, y), tol=1e-8)
    else:
        _, b = fit_logistic_1d(x, y, W)
    return _out(_defined(np.atleast_1d(b), y, W), squeeze)


def calibration_intercept(y: object, p: object, w: object | None = None) -> np.ndarray | float:
    """a of logit P(y) = a + logit(p) (calibration-in-the-large); NaN when an outcome is absent."""
    y, p, W, squeeze = _prepare(y, p, w)
    x = logit(p)
    if W.shape[0] > 1:
        start = fit_logistic_1d(x, y, fixed_slope=1.0)
        a, _ = fit_logistic_1d(x, y, W, fixed_slope=1.0, start=start, tol=1e-8)
    else:
        a, _ = fit_logistic_1d(x, y, W, fixed_slope=1.0)
    return _out(_defined(np.atleast_1d(a), y, W), squeeze)


def _defined(values: np.ndarray, y: np.ndarray, W: np.ndarray) -> np.ndarray:
    """NaN where a replicate has no cases or no non-cases (a logistic fit has no finite answer)."""
    cases = W @ y
    has_both = (cases > 0) & (W.sum(axis=1) - cases > 0)
    return np.where(has_both, values, np.nan)


def ece(y: object, p: object, w: object | None = None, n_bins: int = ECE_BINS) -> np.ndarray | float:
    """Expected calibration error over `n_bins` equal-mass bins of predicted risk.

    Rows are sorted by risk and cut into bins of equal weight; rows with the
    same risk always share a bin (the bin of their run's middle), so the
    result does not depend on row order and step-shaped (isotonic) risks are
    not split arbitrarily.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y, p, W, squeeze = _prepare(y, p, w)
    if y.size == 0:
        return _out(np.full(W.shape[0], np.nan), squeeze)
    order, starts = _tie_groups(p)
    Wo = W if order is None else W[:, order]
    r = y - p if order is None else (y - p)[order]
    if starts.size == y.size:
        Wg, resid = Wo, Wo * r
    else:
        Wg = np.add.reduceat(Wo, starts, axis=1)
        resid = np.add.reduceat(Wo * r, starts, axis=1)
    total = Wg.sum(axis=1, keepdims=True)
    mid = np.cumsum(Wg, axis=1) - 0.5 * Wg  # weight below each run's middle
    bins = np.minimum(np.floor(np.nan_to_num(_ratio(mid, total)) * n_bins), n_bins - 1).astype(np.int64)
    flat = bins + n_bins * np.arange(W.shape[0])[:, None]
    per_bin = np.bincount(flat.ravel(), weights=resid.ravel(), minlength=W.shape[0] * n_bins)
    per_bin = per_bin.reshape(W.shape[0], n_bins)
    return _out(_ratio(np.abs(per_bin).sum(axis=1), total[:, 0]), squeeze)


def ece_bins(p: object, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin number (0 .. n_bins-1) of every row, as `ece` assigns them (unweighted)."""
    pp = np.asarray(p, dtype=float)
    if pp.size == 0:
        return np.zeros(0, dtype=np.int64)
    order, starts = _tie_groups(pp)
    sizes = np.diff(np.r_[starts, pp.size])
    mid = np.cumsum(sizes) - 0.5 * sizes
    group_bin = np.minimum(np.floor(mid / pp.size * n_bins), n_bins - 1).astype(np.int64)
    bins = np.empty(pp.size, dtype=np.int64)
    bins[order] = np.repeat(group_bin, sizes)
    return bins


# ---- at a threshold ----------------------------------------------------------------------
def _confusion(y, p, threshold, w):
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    y, p, W, squeeze = _prepare(y, p, w)
    flagged = (p >= threshold).astype(float)
    tp = W @ (y * flagged)
    fp = W @ flagged - tp
    cases = W @ y
    total = W.sum(axis=1)
    return tp, fp, cases, total, squeeze


def sensitivity(y: object, p: object, threshold: float, w: object | None = None) -> np.ndarray | float:
    tp, _, cases, _, squeeze = _confusion(y, p, threshold, w)
    return _out(_ratio(tp, cases), squeeze)


def ppv(y: object, p: object, threshold: float, w: object | None = None) -> np.ndarray | float:
    tp, fp, _, _, squeeze = _confusion(y, p, threshold, w)
    return _out(_ratio(tp, tp + fp), squeeze)


def number_needed_to_screen(y: object, p: object, threshold: float, w: object | None = None) -> np.ndarray | float:
    """Patients flagged (risk >= threshold) per true case among them: 1 / PPV (NaN when no case is flagged)."""
    tp, fp, _, _, squeeze = _confusion(y, p, threshold, w)
    return _out(_ratio(tp + fp, tp), squeeze)


def flagged_share(y: object, p: object, threshold: float, w: object | None = None) -> np.ndarray | float:
    tp, fp, _, total, squeeze = _confusion(y, p, threshold, w)
    return _out(_ratio(tp + fp, total), squeeze)


def net_benefit(y: object, p: object, threshold: float, w: object | None = None) -> np.ndarray | float:
    """Decision-curve net benefit of acting on p >= threshold: (TP - FP t/(1-t)) / n."""
    tp, fp, _, total, squeeze = _confusion(y, p, threshold, w)
    return _out(_ratio(tp - fp * threshold / (1 - threshold), total), squeeze)


def net_benefit_treat_all(y: object, threshold: float, w: object | None = None) -> np.ndarray | float:
    """Net benefit of acting on everyone: prevalence - (1 - prevalence) t / (1 - t)."""
    yy = np.asarray(y, dtype=float)
    return net_benefit(yy, np.ones_like(yy), threshold, w)


def decision_curve(y: object, p: object, thresholds: Sequence[float]) -> dict[str, list[float]]:
    """Net benefit of the model, of treating all and of treating none over `thresholds`."""
    ts = [float(t) for t in thresholds]
    return {
        "threshold": ts,
        "model": [float(net_benefit(y, p, t)) for t in ts],
        "treat_all": [float(net_benefit_treat_all(y, t)) for t in ts],
        "treat_none": [0.0 for _ in ts],
    }


# ---- curves (for plots) --------------------------------------------------------------------
def roc_curve(y: object, score: object) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    yy, s, W, _ = _prepare(y, score, None)
    pos, neg = _grouped_counts(yy, s, W)
    pos, neg = pos[0, ::-1], neg[0, ::-1]
    tpr = np.r_[0.0, np.cumsum(pos)] / max(pos.sum(), 1e-300)
    fpr = np.r_[0.0, np.cumsum(neg)] / max(neg.sum(), 1e-300)
    return fpr, tpr


def calibration_curve(y: object, p: object, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Mean risk, observed rate and rows per equal-mass bin (the bins of `ece`)."""
    yy, pp, _, _ = _prepare(y, p, None)
    bins = ece_bins(pp, n_bins)
    count = np.bincount(bins, minlength=n_bins).astype(float)
    mean_p = _ratio(np.bincount(bins, weights=pp, minlength=n_bins), count)
    observed = _ratio(np.bincount(bins, weights=yy, minlength=n_bins), count)
    keep = count > 0
    return {"mean_risk": mean_p[keep], "observed": observed[keep], "n": count[keep]}


# ---- bootstrap -----------------------------------------------------------------------------
def bootstrap_weights(
    n: int, n_boot: int, rng: np.random.Generator, clusters: np.ndarray | None = None
) -> np.ndarray:
    """(n_boot, n) resample counts: rows drawn with replacement, or whole clusters (patients) when given."""
    if clusters is None:
        draws = rng.integers(0, n, size=(n_boot, n))
        flat = draws + n * np.arange(n_boot)[:, None]
        return np.bincount(flat.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    m = int(codes.max()) + 1 if codes.size else 0
    draws = rng.integers(0, m, size=(n_boot, m))
    flat = draws + m * np.arange(n_boot)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_boot * m).reshape(n_boot, m).astype(float)
    return counts[:, codes]


def bootstrap_intervals(
    metrics: Mapping[str, Metric],
    y: object,
    p: object,
    *,
    n_boot: int = 200,
    seed: int = 0,
    clusters: object | None = None,
    level: float = 0.95,
    max_cells: int = 1_000_000,
) -> dict[str, tuple[float, float]]:
    """Bias-corrected percentile intervals of each metric over `n_boot` seeded resamples (rows or `clusters`).

    Each metric is called as `metric(y, p, W)` with a (b, n) weight matrix;
    resamples are processed in chunks of at most `max_cells` weights. A
    replicate where a metric is undefined (no case drawn) is left out; when
    fewer than half are defined the interval is (NaN, NaN).

    Plain percentile intervals of a biased statistic can miss its own point
    estimate (ECE, a mean absolute gap, is larger on almost every resample
    than on the data). The percentiles are therefore bias-corrected (Efron's
    BC: shifted by twice the normal quantile of the share of replicates below
    the point estimate), and an interval is widened to its point estimate
    when it still misses it: an interval always contains its point.
    """
    yy = np.asarray(y, dtype=float)
    pp = np.asarray(p, dtype=float)
    n = yy.size
    if n_boot <= 0 or n == 0:
        return {name: (float("nan"), float("nan")) for name in metrics}
    cl = None if clusters is None else np.asarray(clusters)
    if cl is not None and cl.shape != yy.shape:
        raise ValueError(f"clusters: {cl.shape[0]} values for {n} rows")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, max_cells // max(n, 1)))
    values: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        W = bootstrap_weights(n, b, rng, cl)
        for name, fn in metrics.items():
            values[name].append(np.atleast_1d(np.asarray(fn(yy, pp, W), dtype=float)))
        done += b
    out = {}
    for name, parts in values.items():
        v = np.concatenate(parts)
        v = v[np.isfinite(v)]
        if v.size < max(1, n_boot // 2):
            out[name] = (float("nan"), float("nan"))
            continue
        point = float(np.asarray(metrics[name](yy, pp)))
        out[name] = bias_corrected_interval(v, point, level)
    return out


def bias_corrected_interval(replicates: np.ndarray, point: float, level: float = 0.95) -> tuple[float, float]:
    """Efron's bias-corrected percentile interval, widened to contain `point` (see `bootstrap_intervals`)."""
    from scipy.stats import norm

    v = np.asarray(replicates, dtype=float)
    if not math.isfinite(point):
        lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)
    share = (np.sum(v < point) + 0.5 * np.sum(v == point)) / v.size
    share = min(max(share, 1 / (v.size + 1)), v.size / (v.size + 1))
    z0 = norm.ppf(share)
    z = norm.ppf((1 + level) / 2)
    lo, hi = np.quantile(v, [norm.cdf(2 * z0 - z), norm.cdf(2 * z0 + z)])
    return float(min(lo, point)), float(max(hi, point))


def auroc_standard_error(auc: float, n_cases: float, n_noncases: float) -> float:
    """Standard error of an AUROC of `auc` over this many cases and non-cases (Hanley and McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_cases - 1) * (q1 - auc * auc) + (n_noncases - 1) * (q2 - auc * auc)) \
        / (n_cases * n_noncases)
    return math.sqrt(max(var, 0.0))


def within_group_auroc(y: object, score: object, groups: object) -> float:
    """AUROC over case/non-case pairs of the same group only (e.g. site): the stratified Mann-Whitney.

    The per-group AUROCs averaged with weights cases x non-cases (each group's number of pairs); groups
    with one outcome only contribute no pair. NaN when no group has both outcomes.
    """
    yy = np.asarray(y, dtype=float)
    ss = np.asarray(score, dtype=float)
    g = np.asarray(groups)
    total = weight = 0.0
    for key in np.unique(g):
        mask = g == key
        pos = float(yy[mask].sum())
        pairs = pos * float(mask.sum() - pos)
        if pairs > 0:
            total += pairs * float(auroc(yy[mask], ss[mask]))
            weight += pairs
    return total / weight if weight else float("nan")


def group_prevalence_auroc(y: object, groups: object) -> float:
    """AUROC of each row's group prevalence as its score: what knowing only the group (site) achieves."""
    yy = np.asarray(y, dtype=float)
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    prevalence = np.bincount(codes, weights=yy) / np.bincount(codes)
    return float(auroc(yy, prevalence[codes]))


def standard_metrics(threshold: float) -> dict[str, Metric]:
    """The metrics every evaluation row reports, with the high-risk threshold bound."""
    return {
        "auroc": auroc,
        "auprc": auprc,
        "brier": brier,
        "calibration_slope": calibration_slope,
        "calibration_intercept": calibration_intercept,
        "ece": ece,
        "sensitivity": lambda y, p, w=None: sensitivity(y, p, threshold, w),
        "ppv": lambda y, p, w=None: ppv(y, p, threshold, w),
        "nns": lambda y, p, w=None: number_needed_to_screen(y, p, threshold, w),
        "flagged_share": lambda y, p, w=None: flagged_share(y, p, threshold, w),
        "net_benefit": lambda y, p, w=None: net_benefit(y, p, threshold, w),
    }


def summarize(
    y: object,
    p: object,
    *,
    threshold: float,
    n_boot: int = 0,
    seed: int = 0,
    clusters: object | None = None,
) -> dict[str, float | int | None]:
    """Point estimates of `standard_metrics(threshold)` with `<name>_lo` / `<name>_hi` 95% intervals."""
    yy = np.asarray(y, dtype=float)
    pp = np.asarray(p, dtype=float)
    fns = standard_metrics(threshold)
    row: dict[str, float | int | None] = {
        "n": int(yy.size),
        "n_positive": int(yy.sum()),
        "prevalence": float(yy.mean()) if yy.size else float("nan"),
        "mean_risk": float(pp.mean()) if pp.size else float("nan"),
        "threshold": float(threshold),
        "net_benefit_treat_all": float(net_benefit_treat_all(yy, threshold)) if yy.size else float("nan"),
    }
    for name, fn in fns.items():
        row[name] = float(fn(yy, pp)) if yy.size else float("nan")
    cis = bootstrap_intervals(fns, yy, pp, n_boot=n_boot, seed=seed, clusters=clusters)
    for name, (lo, hi) in cis.items():
        row[f"{name}_lo"] = lo
        row[f"{name}_hi"] = hi
    return row
