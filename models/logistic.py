"""`LinearModel`: a penalized logistic regression that a bundle saves, serves and explains like a booster.

Fitted with scikit-learn (`SimpleImputer(median, add_indicator=True)` ->
`StandardScaler` -> `LogisticRegression`, L2 penalty with C chosen by
patient-grouped cross-validated log loss), then reduced to plain numbers: per
feature its median, mean and scale, per feature with missing training values
its indicator's mean, scale and coefficient, and the intercept. Those numbers
are the model (saved as JSON, no pickle, byte-identical for identical fits);
prediction is numpy arithmetic, identical to the scikit-learn pipeline's.

It answers the few `lightgbm.Booster` methods the bundle, the explainer, the
registry and monitoring call (`predict(raw_score=...)`, `predict(pred_contrib=True)`,
`num_feature`, `num_trees`, `feature_name`, `feature_importance`,
`model_to_string`), so everything that takes a booster takes it.

Explanations keep TreeSHAP's shape: (n, p + 1) in log-odds, the last column the
base value. For a linear model the exact Shapley values against the training
mean are coef * (x - mean) in the standardized space: feature j contributes
w_j / s_j * (x_j - mu_j) (x_j imputed by the median when missing) plus its
missing indicator's v_j / t_j * (m_j - nu_j); the base value is the intercept
(the mean training margin, every column being centered); they sum to the margin.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

FORMAT = "chronorisk-logistic-1"
DEFAULT_CS = (0.01, 0.1, 1.0)


class LinearModel:
    def __init__(self, feature_names: Sequence[str], median: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                 coef: np.ndarray, indicator: dict[str, np.ndarray], intercept: float, info: dict | None = None):
        self.feature_names_ = tuple(feature_names)
        self.median = np.asarray(median, dtype=np.float64)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)
        # features with missing training values: their index, and their indicator's mean, scale, coef
        self.ind_index = np.asarray(indicator.get("index", []), dtype=np.int64)
        self.ind_mean = np.asarray(indicator.get("mean", []), dtype=np.float64)
        self.ind_scale = np.asarray(indicator.get("scale", []), dtype=np.float64)
        self.ind_coef = np.asarray(indicator.get("coef", []), dtype=np.float64)
        self.intercept = float(intercept)
        self.info = dict(info or {})
        p = len(self.feature_names_)
        if not (self.median.shape == self.mean.shape == self.scale.shape == self.coef.shape == (p,)):
            raise ValueError(f"linear model: every per-feature array needs {p} values")

    # ---- fitting ---------------------------------------------------------------------
    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, feature_names: Sequence[str], *, C: float | None = None,
            groups: np.ndarray | None = None, Cs: Sequence[float] = DEFAULT_CS, folds: int = 3,
            seed: int = 0) -> LinearModel:
        """Fit on (X, y); C is chosen by grouped cross-validated log loss over `Cs` unless given."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        tried: dict[str, float] = {}
        if C is None and y.size > CV_MAX_ROWS:
            C = max(Cs)
        if C is None:
            tried = cv_log_loss_by_c(X, y, groups, Cs, folds, seed)
            C = min(tried, key=lambda c: (tried[c], -c)) if tried else 1.0
        used = informative_columns(X)
        pipe = _pipeline(float(C), X[:, used].shape).fit(X[:, used], y)
        model = cls.from_pipeline(pipe, feature_names, used)
        model.info = {"C": float(C), "cv_log_loss_by_C": {str(k): v for k, v in tried.items()},
                      "n_train": int(y.size), "n_constant_features": int(len(feature_names) - used.size)}
        return model

    @classmethod
    def from_pipeline(cls, pipe, feature_names: Sequence[str], used: np.ndarray | None = None) -> LinearModel:
        """From a fitted `_pipeline` on the columns `used` of `feature_names` (the others get coefficient 0)."""
        imputer, scaler, lr = (pipe.named_steps[k] for k in ("impute", "scale", "logistic"))
        p = len(feature_names)
        used = np.arange(p) if used is None else np.asarray(used, dtype=np.int64)
        q = used.size
        ind = imputer.indicator_.features_ if imputer.indicator_ is not None else np.zeros(0, dtype=np.int64)
        coef = lr.coef_[0]
        full = {"median": np.zeros(p), "mean": np.zeros(p), "scale": np.ones(p), "coef": np.zeros(p)}
        for name, values in (("median", imputer.statistics_), ("mean", scaler.mean_[:q]),
                             ("scale", scaler.scale_[:q]), ("coef", coef[:q])):
            full[name][used] = values
        return cls(
            feature_names, **full,
            indicator={"index": used[ind], "mean": scaler.mean_[q:], "scale": scaler.scale_[q:], "coef": coef[q:]},
            intercept=float(lr.intercept_[0]),
        )

    # ---- the booster methods ---------------------------------------------------------------
    def predict(self, X: object, raw_score: bool = False, pred_contrib: bool = False, **_: object) -> np.ndarray:
        """Margins (`raw_score`), contributions (`pred_contrib`, (n, p + 1)) or probabilities."""
        contrib = self.contributions(X)
        if pred_contrib:
            return contrib
        margin = contrib.sum(axis=1)
        return margin if raw_score else 1.0 / (1.0 + np.exp(-margin))

    def contributions(self, X: object) -> np.ndarray:
        M = np.asarray(X, dtype=np.float64)
        if M.ndim != 2 or M.shape[1] != len(self.feature_names_):
            raise ValueError(f"features: expected (rows, {len(self.feature_names_)}) values, got {M.shape}")
        missing = np.isnan(M)
        filled = np.where(missing, self.median, M)
        out = np.empty((M.shape[0], M.shape[1] + 1))
        out[:, :-1] = (filled - self.mean) * (self.coef / self.scale)
        if self.ind_index.size:
            m = missing[:, self.ind_index].astype(np.float64)
            out[:, self.ind_index] += (m - self.ind_mean) * (self.ind_coef / self.ind_scale)
        out[:, -1] = self.intercept
        return out

    def num_feature(self) -> int:
        return len(self.feature_names_)

    def num_trees(self) -> int:
        return 0

    def current_iteration(self) -> int:
        return 0

    def feature_name(self) -> list[str]:
        return list(self.feature_names_)

    def feature_importance(self, importance_type: str = "gain") -> np.ndarray:
        """|standardized coefficient| per feature (value and missing indicator added)."""
        imp = np.abs(self.coef).copy()
        if self.ind_index.size:
            np.add.at(imp, self.ind_index, np.abs(self.ind_coef))
        return imp

    # ---- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "feature_names": list(self.feature_names_),
            "intercept": self.intercept,
            "median": self.median.tolist(), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "indicator": {"index": self.ind_index.tolist(), "mean": self.ind_mean.tolist(),
                          "scale": self.ind_scale.tolist(), "coef": self.ind_coef.tolist()},
            "info": self.info,
        }

    def model_to_string(self, **_: object) -> str:
        """Canonical JSON (floats in shortest round-trip form): the same fit gives the same bytes."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_string(cls, text: str) -> LinearModel:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"not a chronorisk logistic model (format {FORMAT} expected)")
        return cls(raw["feature_names"], raw["median"], raw["mean"], raw["scale"], raw["coef"],
                   raw["indicator"], raw["intercept"], raw.get("info"))


NEWTON_WORK = 5e9  # rows x columns^2 up to which Newton's method (exact, few iterations) beats L-BFGS
CV_MAX_ROWS = 20_000  # above this C is not searched: the largest of `Cs` (the penalty matters little)


def _pipeline(C: float, shape: tuple[int, int] = (0, 0)):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([
        ("impute", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)),
        ("scale", StandardScaler()),
        ("logistic", LogisticRegression(C=C, solver=_solver(shape), max_iter=500)),
    ])


def informative_columns(X: np.ndarray) -> np.ndarray:
    """Indices of the columns that vary in X (two distinct values, or some missing and some not)."""
    nan = np.isnan(X)
    lo = np.where(nan, np.inf, X).min(axis=0, initial=np.inf)
    hi = np.where(nan, -np.inf, X).max(axis=0, initial=-np.inf)
    missing = nan.sum(axis=0)
    varies = (hi > lo) | ((missing > 0) & (missing < X.shape[0]))
    return np.flatnonzero(varies)


def _solver(shape: tuple[int, int]) -> str:
    n, p = shape
    return "newton-cholesky" if n * (2 * p) ** 2 <= NEWTON_WORK else "lbfgs"


def out_of_fold_margins(X: np.ndarray, y: np.ndarray, fold_of: np.ndarray, C: float) -> np.ndarray:
    """Margins of every row from a model fitted on the other folds (fold numbers in `fold_of`)."""
    margins = np.empty(y.size)
    for k in np.unique(fold_of):
        held = fold_of == k
        if np.unique(y[~held]).size < 2:
            raise ValueError(f"cross-fitting: fold {k} leaves rows with one outcome only (too few cases)")
        used = informative_columns(X[~held])
        pipe = _pipeline(C, X[:, used].shape).fit(X[~held][:, used], y[~held])
        margins[held] = pipe.decision_function(X[held][:, used])
    return margins


def cv_log_loss_by_c(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, Cs: Sequence[float],
                     folds: int, seed: int) -> dict[float, float]:
    """Grouped cross-validated log loss of each C (rows of one patient in one fold)."""
    from chronorisk.models.risk_model import group_folds

    fold_of = group_folds(np.arange(y.size) if groups is None else groups, folds, seed)
    out = {}
    for C in Cs:
        try:
            out[float(C)] = margin_log_loss(out_of_fold_margins(X, y, fold_of, float(C)), y)
        except ValueError:
            return {}
    return out


def margin_log_loss(margin: np.ndarray, y: np.ndarray) -> float:
    """Mean binary log loss of sigmoid(margin) (stable form)."""
    m = np.asarray(margin, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, m) - np.asarray(y, dtype=np.float64) * m))
