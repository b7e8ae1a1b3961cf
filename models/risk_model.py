"""`RiskModel`: one task's LightGBM booster plus its calibrator, scikit-learn style.

Arguments are stored by `__init__` (from `ModelConfig`), checked by `fit`;
what is learned ends in `_`. `fit` boosts on the training rows with early
stopping on the validation rows (binary log loss), then fits the calibrator
on held-out rows: `X_cal, y_cal` when given, else the validation rows (the
tuning split: the booster never trained on them; early stopping only chose
the number of trees from them).

`cross_fitted_margins` gives the calibrator many more rows (see
`training.train.fit_model`): the train and tuning patients are split into k
folds, and each fold's margins come from a booster trained on the other folds
with the final model's parameters and tree count, so it is a model like the
final one that never saw those patients.

`model.kind: logistic` (or `auto` choosing it, see `training.train.fit_model`)
fits a penalized logistic regression instead (`fit_logistic`,
`models/logistic.py`): `booster_` is then a `LinearModel`, which answers the
booster methods used here and downstream, so calibration, bundles, serving and
explanations are the same code for both kinds.

For federated training the two steps are separate: `fit_booster` can continue
boosting from a global model (`init_model`) and keep the booster trainable
(`keep_training_booster`), and `fit_calibration` / `from_parts` take a
calibrator fitted elsewhere.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np

from chronorisk.models.calibration import Calibrator, as_calibrator, fit_calibrator
from chronorisk.models.config import ModelConfig

log = logging.getLogger(__name__)


def as_matrix(X: object, feature_names: Sequence[str] | None = None) -> np.ndarray:
    """A float64 C-contiguous matrix from numpy, polars or pandas (columns in `feature_names` order)."""
    if isinstance(X, np.ndarray):
        arr = X
    elif hasattr(X, "to_numpy") and hasattr(X, "columns"):
        if feature_names is not None:
            columns = set(X.columns)
            missing = [n for n in feature_names if n not in columns]
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise ValueError(f"{len(missing)} feature column(s) missing: {shown}")
            X = X[list(feature_names)]
        arr = X.to_numpy()
    else:
        arr = np.asarray(X)
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"features must be a 2-D table, got {arr.ndim} dimension(s)")
    return arr


class RiskModel:
    """LightGBM + calibrator for one task.

    Parameters
    ----------
    config: LightGBM parameters, boosting rounds, early stopping, calibration method.
    tune: run a random search of num_leaves / learning_rate / min_data_in_leaf first.
    tune_trials: parameter sets tried when tuning (the configured defaults are the first).
    """

    def __init__(self, config: ModelConfig | None = None, *, tune: bool = False, tune_trials: int = 10):
        self.config = config
        self.tune = tune
        self.tune_trials = tune_trials

    kind_ = "lightgbm"

    # ---- fitting -----------------------------------------------------------------------
    def fit_logistic(self, X: object, y: object, feature_names: Sequence[str], *, groups: object = None) -> RiskModel:
        """Fit `booster_` as a penalized logistic regression (`LinearModel`; C by grouped CV on these rows)."""
        from chronorisk.models.logistic import LinearModel

        config = self.config or ModelConfig()
        names = _check_names(feature_names)
        Xtr, ytr = _check_xy(X, y, names, "X")
        started = time.perf_counter()
        self.booster_ = LinearModel.fit(Xtr, ytr, names, groups=None if groups is None else np.asarray(groups),
                                        Cs=config.logistic_cs, seed=config.seed)
        self.kind_ = "logistic"
        self.feature_names_ = names
        self.params_ = {"C": self.booster_.info["C"]}
        self.best_iteration_ = 0
        self.n_trees_ = 0
        self.tuning_trials_ = []
        self.fit_seconds_ = time.perf_counter() - started
        self.n_train_ = int(ytr.size)
        log.info("logistic regression (C=%g) on %d rows in %.1f s", self.params_["C"], ytr.size, self.fit_seconds_)
        return self

    def fit(
        self,
        X: object,
        y: object,
        X_val: object,
        y_val: object,
        feature_names: Sequence[str],
        *,
        X_cal: object | None = None,
        y_cal: object | None = None,
        init_model: object | None = None,
    ) -> RiskModel:
        """Boost with early stopping on (X_val, y_val), then calibrate on (X_cal, y_cal) or the validation rows."""
        self.fit_booster(X, y, X_val, y_val, feature_names, init_model=init_model)
        if X_cal is None:
            X_cal, y_cal = X_val, y_val
        elif y_cal is None:
            raise ValueError("y_cal: needed when X_cal is given")
        self.fit_calibration(X_cal, y_cal)
        return self

    def fit_booster(
        self,
        X: object,
        y: object,
        X_val: object,
        y_val: object,
        feature_names: Sequence[str],
        *,
        init_model: object | None = None,
        keep_training_booster: bool = False,
        num_boost_round: int | None = None,
        early_stopping: bool = True,
    ) -> RiskModel:
        """Fit `booster_` (optionally continuing `init_model`: a Booster, a model string or a file)."""
        import lightgbm as lgb

        config = self.config or ModelConfig()
        names = _check_names(feature_names)
        Xtr, ytr = _check_xy(X, y, names, "X")
        Xva, yva = _check_xy(X_val, y_val, names, "X_val")
        if init_model is not None and isinstance(init_model, str) and "\n" in init_model:
            init_model = lgb.Booster(model_str=init_model)
        rounds = int(num_boost_round or config.num_boost_round)
        started = time.perf_counter()
        base = config.lightgbm_params()
        trials: list[dict] = []
        candidates = tuning_candidates(config, self.tune_trials) if self.tune else [base]
        best: tuple[float, object, dict] | None = None
        for params in candidates:
            booster, score = _train_one(
                lgb, params, Xtr, ytr, Xva, yva, names, rounds, config.early_stopping_rounds,
                init_model, keep_training_booster, early_stopping,
            )
            trials.append({**_tuned_keys(params), "valid_log_loss": score, "trees": booster.current_iteration()})
            if best is None or score < best[0]:
                best = (score, booster, params)
        assert best is not None
        score, booster, params = best
        self.booster_ = booster
        self.feature_names_ = names
        self.params_ = params
        self.best_iteration_ = int(booster.best_iteration or booster.current_iteration())
        self.n_trees_ = int(booster.num_trees())
        self.valid_log_loss_ = float(score)
        self.tuning_trials_ = trials if self.tune else []
        self.fit_seconds_ = time.perf_counter() - started
        self.n_train_ = int(ytr.size)
        self.n_valid_ = int(yva.size)
        log.info(
            "boosted %d trees (best iteration %d, validation log loss %.4f) in %.1f s",
            self.n_trees_, self.best_iteration_, self.valid_log_loss_, self.fit_seconds_,
        )
        return self

    def fit_calibration(self, X_cal: object, y_cal: object, *, rows: str = "given") -> RiskModel:
        """Fit `calibrator_` on held-out rows (never the booster's training rows); `rows` names them."""
        self._check_fitted("booster_")
        Xc, yc = _check_xy(X_cal, y_cal, self.feature_names_, "X_cal")
        return self.fit_calibration_margins(self.predict_raw(Xc), yc, rows=rows)

    def cross_fitted_margins(
        self, X: object, y: object, groups: object, *, folds: int = 5, seed: int = 0
    ) -> np.ndarray:
        """Out-of-fold raw margins of every row of (X, y): rows of one group (patient) share a fold.

        Each fold is predicted by a booster with this model's parameters and
        exactly its number of trees (no early stopping: the held-out fold
        never chooses anything), trained on the other folds. With k folds over
        the train and tuning patients each fold model learns from about as
        many patients as the final model (train split), so its margins are
        distributed like the final model's on new patients.
        """
        import lightgbm as lgb

        self._check_fitted("booster_")
        M, yy = _check_xy(X, y, self.feature_names_, "X")
        fold_of = group_folds(groups, folds, seed)
        if fold_of.size != yy.size:
            raise ValueError(f"groups: {fold_of.size} values for {yy.size} rows")
        if self.kind_ == "logistic":
            from chronorisk.models.logistic import out_of_fold_margins

            return out_of_fold_margins(M, yy, fold_of, self.params_["C"])
        params = {**self.params_, "verbose": -1}
        params.pop("metric", None)
        full = lgb.Dataset(M, label=yy, feature_name=list(self.feature_names_), free_raw_data=False, params=params)
        full.construct()  # bin once; every fold model trains on a subset of these bins
        margins = np.empty(yy.size)
        for k in range(folds):
            held = fold_of == k
            if not held.any():
                continue
            if np.unique(yy[~held]).size < 2:
                raise ValueError(f"cross-fitting: fold {k} leaves rows with one outcome only (too few cases)")
            train_set = full.subset(np.flatnonzero(~held).tolist())
            booster = lgb.train(params, train_set, num_boost_round=self.best_iteration_)
            margins[held] = booster.predict(M[held], raw_score=True)
        return margins

    def fit_calibration_margins(self, margin: object, y: object, *, rows: str = "given") -> RiskModel:
        """Fit `calibrator_` on raw margins computed elsewhere (e.g. `cross_fitted_margins`)."""
        self._check_fitted("booster_")
        config = self.config or ModelConfig()
        m = np.asarray(margin, dtype=float)
        yy = np.asarray(y).astype(float)
        self.calibrator_ = fit_calibrator(m, yy, config.calibration, folds=config.calibration_folds, seed=config.seed)
        self.calibrator_.info["rows"] = rows
        log.info("calibration: %s on %d %s rows", self.calibrator_.info.get("method"), yy.size, rows)
        return self

    @classmethod
    def from_parts(
        cls, booster: object, calibrator: Calibrator | None, feature_names: Sequence[str],
        config: ModelConfig | None = None,
    ) -> RiskModel:
        """A fitted model from a booster trained elsewhere (e.g. merged by the federated server)."""
        model = cls(config)
        model.booster_ = booster
        model.feature_names_ = _check_names(feature_names)
        if booster.num_feature() != len(model.feature_names_):
            raise ValueError(
                f"booster has {booster.num_feature()} features, feature_names has {len(model.feature_names_)}"
            )
        model.best_iteration_ = int(booster.current_iteration())
        model.n_trees_ = int(booster.num_trees())
        if calibrator is not None:
            model.calibrator_ = as_calibrator(calibrator)
        return model

    # ---- prediction --------------------------------------------------------------------
    def predict_raw(self, X: object) -> np.ndarray:
        """Raw margin (log-odds) of the booster."""
        self._check_fitted("booster_")
        M = as_matrix(X, self.feature_names_)
        _check_width(M, self.feature_names_)
        return self.booster_.predict(M, raw_score=True)

    def predict_risk(self, X: object) -> np.ndarray:
        """Calibrated risk in [0, 1]."""
        self._check_fitted("calibrator_")
        return self.calibrator_.predict(self.predict_raw(X))

    def contributions(self, X: object) -> np.ndarray:
        """Exact TreeSHAP contributions (n, p + 1) in log-odds; the last column is the expected value."""
        self._check_fitted("booster_")
        M = as_matrix(X, self.feature_names_)
        _check_width(M, self.feature_names_)
        return self.booster_.predict(M, pred_contrib=True)

    def _check_fitted(self, attr: str) -> None:
        if not hasattr(self, attr):
            what = "calibrated (fit or fit_calibration)" if attr == "calibrator_" else "fitted"
            raise RuntimeError(f"this RiskModel is not {what} yet")


def group_folds(groups: object, folds: int, seed: int) -> np.ndarray:
    """Fold number (0 .. folds-1) of every row; all rows of a group (patient) in one fold, seeded."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    g = np.asarray(groups)
    _, codes = np.unique(g, return_inverse=True)
    n_groups = int(codes.max()) + 1 if codes.size else 0
    fold_of_group = np.random.default_rng(seed).permutation(n_groups) % folds
    return fold_of_group[codes]


def tuning_candidates(config: ModelConfig, trials: int) -> list[dict]:
    """The configured parameters first, then `trials - 1` seeded random draws from `config.tune_space`."""
    if trials < 1:
        raise ValueError(f"tune_trials must be at least 1, got {trials}")
    base = config.lightgbm_params()
    space = config.tune_space
    rng = np.random.default_rng(config.seed)
    out = [base]
    for _ in range(trials - 1):
        lo, hi = space.learning_rate
        out.append(
            {
                **base,
                "num_leaves": int(rng.integers(space.num_leaves[0], space.num_leaves[1] + 1)),
                "learning_rate": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
                "min_data_in_leaf": int(rng.integers(space.min_data_in_leaf[0], space.min_data_in_leaf[1] + 1)),
            }
        )
    return out


def _tuned_keys(params: dict) -> dict:
    return {k: params.get(k) for k in ("num_leaves", "learning_rate", "min_data_in_leaf")}


def _train_one(lgb, params, Xtr, ytr, Xva, yva, names, rounds, stopping, init_model, keep, early_stopping):
    params = {**params, "metric": "binary_logloss"}
    train_set = lgb.Dataset(Xtr, label=ytr, feature_name=list(names), free_raw_data=False)
    valid_set = lgb.Dataset(Xva, label=yva, reference=train_set, free_raw_data=False)
    callbacks = [lgb.early_stopping(stopping, verbose=False)] if early_stopping else []
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=rounds,
        valid_sets=[valid_set],
        valid_names=["valid"],
        init_model=init_model,
        keep_training_booster=keep,
        callbacks=callbacks,
    )
    best = booster.best_score.get("valid", {}).get("binary_logloss") if booster.best_score else None
    if not keep and booster.best_iteration and booster.best_iteration < booster.current_iteration():
        # keep only the trees up to the best iteration: what was validated is what is saved and
        # explained (a booster that must stay trainable keeps them; predict uses best_iteration)
        booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=booster.best_iteration))
    if best is None:
        margin = booster.predict(Xva, raw_score=True)
        p = np.clip(1.0 / (1.0 + np.exp(-margin)), 1e-15, 1 - 1e-15)
        best = float(-np.mean(yva * np.log(p) + (1 - yva) * np.log1p(-p)))
    return booster, float(best)


def _check_names(feature_names: Sequence[str]) -> tuple[str, ...]:
    if feature_names is None or isinstance(feature_names, str):
        raise ValueError("feature_names: a sequence of column names is needed")
    names = tuple(str(n) for n in feature_names)
    if not names:
        raise ValueError("feature_names: at least one feature is needed")
    if len(set(names)) != len(names):
        raise ValueError("feature_names: duplicates")
    return names


def _check_xy(X: object, y: object, names: tuple[str, ...], field: str) -> tuple[np.ndarray, np.ndarray]:
    M = as_matrix(X, names)
    _check_width(M, names, field)
    yy = np.asarray(y)
    if yy.dtype == bool:
        yy = yy.astype(float)
    yy = np.asarray(yy, dtype=float).ravel()
    label = "y" if field == "X" else f"y{field[1:]}"
    if yy.size != M.shape[0]:
        raise ValueError(f"{label}: {yy.size} labels for {M.shape[0]} rows of {field}")
    if not np.all((yy == 0) | (yy == 1)):
        raise ValueError(f"{label}: labels must be 0/1 or boolean")
    if M.shape[0] == 0:
        raise ValueError(f"{field}: no rows")
    if np.unique(yy).size < 2:
        raise ValueError(f"{label}: both outcomes are needed, all {yy.size} rows have outcome {int(yy[0])}")
    if np.isinf(M).any():
        raise ValueError(f"{field}: infinite values (use NaN for missing)")
    return M, yy


def _check_width(M: np.ndarray, names: Sequence[str], field: str = "X") -> None:
    if M.shape[1] != len(names):
        raise ValueError(f"{field}: {M.shape[1]} columns, the model has {len(names)} features")
