"""`chronorisk federated compare`: centralized vs federated vs site-local, on the same held-out patients.

For every task, with one feature spec (the one the federation agrees on
from the sites' summaries) and the MEDS splits of every site:

- centralized: one `RiskModel` on the pooled training rows of all sites
  (early stopping and calibration on the pooled tuning rows): what pooling
  the records would give, and the reference federated training must reach;
- federated: each strategy, trained in simulation (simulation.py), with the
  calibration agreed from binned statistics;
- site-local: one `RiskModel` per site on that site's rows only;
- baseline: the penalized logistic regression (`models/logistic.py`) on the
  pooled training rows, calibrated on the pooled tuning rows: what a linear
  model of the same features gives (federated training itself stays LightGBM).

Every model is scored on each site's held-out rows (and on all of them
together) with the centralized evaluation's metric functions: AUROC,
calibration slope and intercept, ECE, Brier. The comparison reads all sites'
feature tables in one process, so it is a development tool for synthetic or
consented pooled data; the federated models themselves never need it.

Output: `<work>/reports/federated_compare.json` and `.html`.
"""

from __future__ import annotations

import html
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chronorisk.data.files import write_text_atomic
from chronorisk.federated.site import HELD_OUT_SPLIT, TRAIN_SPLIT, TUNING_SPLIT, SiteTable, feature_table

if TYPE_CHECKING:
    from chronorisk.config import Params
    from chronorisk.paths import WorkPaths

log = logging.getLogger("chronorisk.federated.compare")
METRICS = ("auroc", "calibration_slope", "calibration_intercept", "ece", "brier")


def score(y: np.ndarray, risk: np.ndarray) -> dict[str, float]:
    from chronorisk.training import metrics as m

    if y.size == 0:
        return {"n": 0}
    out = {"n": int(y.size), "positives": int(y.sum())}
    for name in METRICS:
        out[name] = float(getattr(m, name)(y, np.clip(risk, 1e-6, 1 - 1e-6)))
    return out


def _stack(tables: dict[str, SiteTable], split: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.vstack([t.X[t.split == split] for t in tables.values()])
    y = np.concatenate([t.y[t.split == split] for t in tables.values()])
    return X, y


def _single_thread(params: Params):
    """The same model parameters with one LightGBM thread (results equal; no OpenMP oversubscription)."""
    lgb = {**params.model.lightgbm, "num_threads": 1}
    return params.model.model_copy(update={"lightgbm": lgb})


def fit_risk_model(tables: dict[str, SiteTable], params: Params):
    """A RiskModel on the training rows of `tables`, early-stopped and calibrated on their tuning rows."""
    from chronorisk.models.risk_model import RiskModel

    X, y = _stack(tables, TRAIN_SPLIT)
    Xv, yv = _stack(tables, TUNING_SPLIT)
    names = next(iter(tables.values())).feature_names
    return RiskModel(_single_thread(params)).fit(X, y, Xv, yv, names)


def fit_logistic_baseline(tables: dict[str, SiteTable], params: Params):
    """The logistic baseline on the pooled training rows, calibrated on the pooled tuning rows."""
    from chronorisk.models.risk_model import RiskModel

    X, y = _stack(tables, TRAIN_SPLIT)
    Xv, yv = _stack(tables, TUNING_SPLIT)
    names = next(iter(tables.values())).feature_names
    return RiskModel(params.model).fit_logistic(X, y, names).fit_calibration(Xv, yv, rows="tuning")


def run_compare(
    params: Params,
    paths: WorkPaths,
    *,
    meds_root: Path | None = None,
    strategies: list[str] | None = None,
    tasks: list[str] | None = None,
    sites: list[str] | None = None,
    labels: Path | None = None,
) -> dict:
    from chronorisk.errors import ChronoriskError
    from chronorisk.federated.simulation import run_simulation, site_contexts
    from chronorisk.models.bundle import ModelBundle

    meds_root = meds_root or paths.meds
    strategies = list(strategies or ("bagging", "cyclic"))
    tasks = list(tasks or params.labels.tasks)
    contexts = site_contexts(meds_root, paths.federated / "nodes", sites, threads=1, labels=labels)
    if len(contexts) < 2:
        raise ChronoriskError(f"compare needs at least two sites under {meds_root}/sites")
    started = time.monotonic()
    federated: dict[str, dict] = {}
    for strategy in strategies:
        federated[strategy] = run_simulation(
            params, paths, meds_root=meds_root, sites=sites, strategy=strategy, tasks=tasks, register=False,
            out_dir=paths.federated / "compare" / strategy, labels=labels,
        )
    report: dict = {
        "created_at": datetime.now().isoformat(timespec="seconds"),
        "meds": str(meds_root),
        "labels": str(labels) if labels is not None else None,
        "strategies": strategies,
        "federated_config": params.federated.model_dump(),
        "tasks": {},
    }
    for task in tasks:
        first = federated[strategies[0]]
        spec_path = Path(first["bundles"][task]) / "spec.json"
        spec_json = spec_path.read_text()
        times = _times(first, task)
        tables = {c.site: feature_table(c, task, spec_json, times) for c in contexts}
        models: dict[str, object] = {"centralized": fit_risk_model(tables, params),
                                     "logistic-baseline": fit_logistic_baseline(tables, params)}
        for strategy in strategies:
            models[f"federated-{strategy}"] = ModelBundle.load(federated[strategy]["bundles"][task])
        local = {}
        for site, table in tables.items():
            try:
                local[site] = fit_risk_model({site: table}, params)
            except ValueError as exc:  # a site with a single outcome in a split cannot train alone
                log.warning("%s: no site-local model for %s (%s)", task, site, exc)
        per_site: dict[str, dict[str, dict]] = {}
        pooled_pred: dict[str, list[np.ndarray]] = {name: [] for name in [*models, "site-local"]}
        pooled_y = []
        for site, table in tables.items():
            ho = table.split == HELD_OUT_SPLIT
            X, y = table.X[ho], table.y[ho]
            pooled_y.append(y)
            per_site[site] = {}
            for name, model in models.items():
                risk = model.predict_risk(X)
                pooled_pred[name].append(risk)
                per_site[site][name] = score(y, risk)
            if site in local:
                risk = local[site].predict_risk(X)
                per_site[site]["site-local"] = score(y, risk)
            else:
                risk = np.full(y.size, np.nan)
            pooled_pred["site-local"].append(risk)
        y_all = np.concatenate(pooled_y)
        overall = {}
        for name, parts in pooled_pred.items():
            risk = np.concatenate(parts)
            ok = ~np.isnan(risk)
            overall[name] = score(y_all[ok], risk[ok])
        sizes = {site: int((t.split == TRAIN_SPLIT).sum()) for site, t in tables.items()}
        smallest = min(sizes, key=sizes.get)
        report["tasks"][task] = {
            "train_rows": sizes,
            "smallest_site": smallest,
            "overall": overall,
            "sites": per_site,
            "checks": _checks(overall, per_site, smallest, strategies),
            "trees": {name: int(getattr(m, "booster", getattr(m, "booster_", None)).num_trees())
                      for name, m in models.items()},
        }
    report["wall_s"] = round(time.monotonic() - started, 1)
    out_json = paths.reports / "federated_compare.json"
    out_html = paths.reports / "federated_compare.html"
    report["html"] = str(out_html)
    write_text_atomic(out_json, json.dumps(report, indent=1))
    write_text_atomic(out_html, render_html(report))
    return report


def _times(summary: dict, task: str) -> list[str]:
    """The prediction times the federated run used (agreed from the sites' data spans)."""
    return list(summary["tasks"][task]["times"])


def _checks(overall: dict, per_site: dict, smallest: str, strategies: list[str]) -> dict:
    """The issue's acceptance figures: gap to centralized overall, gain over local at the smallest site."""
    out = {}
    for strategy in strategies:
        name = f"federated-{strategy}"
        gap = overall["centralized"]["auroc"] - overall[name]["auroc"]
        gain = float("nan")
        if "site-local" in per_site[smallest]:
            gain = per_site[smallest][name]["auroc"] - per_site[smallest]["site-local"]["auroc"]
        out[strategy] = {
            "auroc_gap_to_centralized": round(gap, 4),
            "within_0.01_of_centralized": bool(gap <= 0.01),
            "smallest_site_gain_over_local": round(gain, 4),
            "smallest_site_gain_at_least_0.03": bool(gain >= 0.03),
        }
    return out


def render_html(report: dict) -> str:
    """A plain page: per task, a table of AUROC and calibration per site and model."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>chronorisk: federated vs centralized vs local"
        "</title><style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .6em;text-align:right}th:first-child,"
        "td:first-child{text-align:left}.ok{color:#063}.no{color:#a00}</style></head><body>",
        "<h1>Federated vs centralized vs site-local</h1>",
        f"<p>Created {html.escape(report['created_at'])}; strategies: "
        f"{html.escape(', '.join(report['strategies']))}. Every model is scored on the same held-out "
        "patients of each site (MEDS held_out split).</p>",
    ]
    for task, info in report["tasks"].items():
        models = list(info["overall"])
        parts.append(f"<h2>{html.escape(task)}</h2>")
        for strategy, check in info["checks"].items():
            ok1, ok2 = check["within_0.01_of_centralized"], check["smallest_site_gain_at_least_0.03"]
            parts.append(
                f"<p>{html.escape(strategy)}: AUROC gap to centralized "
                f"<b class='{'ok' if ok1 else 'no'}'>{check['auroc_gap_to_centralized']:+.4f}</b>; "
                f"gain over the site-local model at the smallest site ({html.escape(info['smallest_site'])}) "
                f"<b class='{'ok' if ok2 else 'no'}'>{check['smallest_site_gain_over_local']:+.4f}</b></p>"
            )
        for metric in ("auroc", "calibration_slope", "ece"):
            parts.append(f"<table><caption>{metric}</caption><tr><th>site</th><th>train rows</th>"
                         + "".join(f"<th>{html.escape(m)}</th>" for m in models) + "</tr>")
            for site in [*info["sites"], "all"]:
                cells = info["overall"] if site == "all" else info["sites"][site]
                rows = sum(info["train_rows"].values()) if site == "all" else info["train_rows"][site]
                parts.append(
                    f"<tr><td>{html.escape(site)}</td><td>{rows}</td>"
                    + "".join(
                        f"<td>{cells[m][metric]:.3f}</td>" if m in cells and metric in cells[m] else "<td>-</td>"
                        for m in models
                    )
                    + "</tr>"
                )
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
