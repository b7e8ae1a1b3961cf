"""Helpers for the federated tests: synthetic non-IID sites as ready feature tables."""

from __future__ import annotations

import numpy as np

from chronorisk.federated.config import FederatedConfig
from chronorisk.federated.protocol import EVALUATE, SUMMARY, TRAIN, Payload
from chronorisk.federated.site import SiteContext, SiteTable, evaluate_task, train_task

FEATURES = tuple(f"f{i}" for i in range(6))
LGB = {"objective": "binary", "learning_rate": 0.1, "num_leaves": 15, "min_data_in_leaf": 20,
       "verbose": -1, "num_threads": 1}


def true_logit(X: np.ndarray) -> np.ndarray:
    return -2.0 + 1.2 * X[:, 0] + 0.8 * np.tanh(2 * X[:, 1]) - 0.6 * X[:, 2] ** 2 + 0.5 * X[:, 3] * X[:, 4]


def make_site(n: int, shift: float, base: float, seed: int) -> SiteTable:
    """One site: its own covariate shift and base rate (non-IID), 70/15/15 split, two tuning halves."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(FEATURES))) + shift
    X[rng.random(X.shape) < 0.1] = np.nan  # some missingness
    logit = true_logit(np.nan_to_num(X)) + base
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    u = rng.random(n)
    split = np.where(u < 0.7, "train", np.where(u < 0.85, "tuning", "held_out"))
    return SiteTable(X=X.astype(np.float32), y=y, split=split, half=(rng.random(n) < 0.5).astype(np.int8),
                     feature_names=FEATURES)


def synthetic_sites() -> dict[str, SiteTable]:
    return {
        "big": make_site(6000, 0.0, 0.0, 1),
        "mid": make_site(3000, 0.3, 0.3, 2),
        "east": make_site(2500, -0.3, -0.2, 3),
        "small": make_site(600, 0.5, 0.5, 4),
    }


def table_handler(tables: dict[str, SiteTable]):
    """A site handler over ready tables: the real per-task train/evaluate code, a fixed summary."""

    def handler(kind: str, request: Payload, ctx: SiteContext) -> Payload:
        table = tables[ctx.site]
        if kind == SUMMARY:
            reply = Payload(config={"n_subjects": int(table.y.size), "span": ["2019-01-01T00:00:00",
                                                                             "2025-12-31T00:00:00"]})
        elif kind == TRAIN:
            reply = Payload(config={"tasks": {}})
            for task in request.config["tasks"]:
                train_task(reply, task, table, request, site=ctx.site, threads=1)
        elif kind == EVALUATE:
            reply = Payload(config={"tasks": {}})
            for task in request.config["tasks"]:
                evaluate_task(reply, task, table, request)
        else:
            raise ValueError(kind)
        reply.config["site"] = ctx.site
        reply.config["seconds"] = 0.0
        return reply

    return handler


def contexts(names, tmp_path) -> list[SiteContext]:
    return [SiteContext(site=s, meds_root=tmp_path, cache_dir=tmp_path / s) for s in names]


def trainer_kwargs(lgb: dict | None = None) -> dict:
    return {
        "tasks": ["t"],
        "lgb_params": {**LGB, **(lgb or {})},
        "fit_spec": lambda task, summaries: '{"synthetic": true}',
        "schedule": lambda task, start, end: [start.isoformat()],
    }


def fed_config(**kw) -> FederatedConfig:
    base = {"rounds": 4, "trees_per_round": 25, "min_sites": 3, "round_timeout_s": 5, "straggler_wait_s": 0,
            "connect_timeout_s": 1}
    return FederatedConfig(**{**base, **kw})
