"""One federated training, end to end, whatever carries the messages.

`train_federated` builds the round loop (runner.py) from the typed params:
the feature spec is fitted from the summed site summaries with the same
`features.pipeline.fit_spec` the centralized model uses, and every site
boosts with the same LightGBM parameters (`model.lightgbm`, with the
`federated.learning_rate` override). `finish` turns the result into what a
centrally trained model also gets: a `ModelBundle` per task, an MLflow run
per task (per-round metrics per site, the per-site evaluation table, the
round timings) and a registered version `chronorisk-<task>` tagged
`chronorisk.training=federated`, so it is promoted and served the same way.

`run_on_grid` is the ServerApp's body in deployment mode: it reads the run
config, trains over a `FlowerTransport`, and writes
`<work>/federated/runs/<tag>/result.json` (status, per-site table, rounds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chronorisk.data.files import write_text_atomic
from chronorisk.federated.runner import FederatedResult, FederatedTrainer, RoundLog, TaskResult, Transport

if TYPE_CHECKING:
    from chronorisk.config import Params
    from chronorisk.federated.protocol import Payload
    from chronorisk.paths import WorkPaths

log = logging.getLogger("chronorisk.federated")


# ---- spec and schedule from summaries ---------------------------------------------------


def pooled_summary(summaries: dict[str, Payload]):
    """Subjects per code summed over sites: the same table `code_summary` gives on pooled data."""
    import polars as pl

    from chronorisk.features.pipeline import merge_summaries
    from chronorisk.features.vocabulary import SUMMARY_SCHEMA

    def table(p: Payload) -> pl.DataFrame:
        if "summary" in p.config:  # the whole summary (features.vocabulary.code_summary)
            return pl.DataFrame(p.config["summary"], schema=SUMMARY_SCHEMA)
        return pl.DataFrame({"code": p.config.get("codes", []),
                             "n_subjects": np.asarray(p.arrays.get("code_subjects", []), dtype=np.int64)},
                            schema={"code": pl.String, "n_subjects": pl.Int64})

    return merge_summaries(table(p) for p in summaries.values())


def pooled_quantiles(summaries: dict[str, Payload]) -> dict[str, list[float]]:
    """Deciles of every numeric code over all sites, merged from the sites' quantile sketches."""
    from chronorisk.federated.site import merge_sketches

    by_code: dict[str, list[tuple[np.ndarray, float]]] = {}
    for p in summaries.values():
        codes = p.config.get("sketch_codes", [])
        sk = p.arrays.get("sketches", np.zeros((0, 0)))
        ns = p.arrays.get("sketch_n", np.zeros(0))
        for i, code in enumerate(codes):
            by_code.setdefault(code, []).append((sk[i], float(ns[i])))
    out = {}
    for code, parts in sorted(by_code.items()):
        merged = merge_sketches(parts)
        out[code] = [round(float(v), 6) for v in merged[::10]]
    return out


def make_spec_fitter(params: Params):
    """(task, summaries) -> spec JSON, via the features package's own fit on the pooled counts."""
    from chronorisk.features.pipeline import fit_spec
    from chronorisk.features.tasks import load_task

    def fit(task: str, summaries: dict[str, Payload]) -> str:
        spec = fit_spec(pooled_summary(summaries), params.features, load_task(task))
        info = dict(spec.fit_info)
        info["federated"] = {
            "sites": sorted(summaries),
            "subjects": int(sum(int(p.config.get("n_subjects", 0)) for p in summaries.values())),
            "measurement_deciles": pooled_quantiles(summaries),
        }
        return spec.model_copy(update={"fit_info": info}).to_json()

    return fit


SUPPLIED_TIMES = "supplied"  # a task with supplied labels: each site's label files give its prediction times


def schedule(task: str, start: datetime, end: datetime) -> list[str]:
    """The task's prediction times over the federation's data span (as for pooled data)."""
    from chronorisk.features.tasks import load_task

    task_def = load_task(task)
    if task_def.labels_supplied:
        return [SUPPLIED_TIMES]
    return [t.isoformat() for t in task_def.prediction_times(start, end)]


def lgb_params(params: Params) -> dict:
    base = params.model.lightgbm_params()
    if params.federated.learning_rate is not None:
        base["learning_rate"] = params.federated.learning_rate
    return base


# ---- training ----------------------------------------------------------------------------


def train_federated(
    transport: Transport,
    params: Params,
    *,
    tasks: list[str] | None = None,
    strategy: str | None = None,
    rounds: int | None = None,
    on_round=None,
) -> FederatedResult:
    cfg = params.federated
    updates = {k: v for k, v in (("strategy", strategy), ("rounds", rounds)) if v}
    if updates:
        cfg = cfg.model_copy(update=updates)
    trainer = FederatedTrainer(
        transport,
        cfg,
        tasks=list(tasks or params.labels.tasks),
        lgb_params=lgb_params(params),
        fit_spec=make_spec_fitter(params),
        schedule=schedule,
        calibration=params.model.calibration,
        on_round=on_round,
    )
    return trainer.run()


def build_bundle(result: TaskResult, params: Params, *, strategy: str, version: str = "0"):
    """A `ModelBundle` of one task's federated model, like the centrally trained ones."""
    import lightgbm as lgb

    from chronorisk.features.spec import FeatureSpec
    from chronorisk.features.tasks import load_task
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.models.risk_model import RiskModel

    spec = FeatureSpec.from_json(result.spec_json)
    task_def = load_task(result.task)
    booster = lgb.Booster(model_str=result.model_text)
    model = RiskModel.from_parts(booster, result.calibrator, spec.feature_names, params.model)
    fingerprint = "federated:" + hashlib.sha256(
        json.dumps([result.spec_json, sorted(result.site_sizes.items())]).encode()
    ).hexdigest()[:32]
    layer = result.site_layer if params.federated.site_recalibration and result.site_layer else None
    return ModelBundle.from_model(
        model,
        spec,
        task_def,
        params.model.tier_thresholds(task_def.name),
        version=version,
        data_fingerprint=fingerprint,
        metrics={"held_out": result.overall, "sites": result.site_metrics},
        extra={"training": "federated", "strategy": strategy, "site_sizes": result.site_sizes,
               **({"site_calibration": layer.to_dict()} if layer else {})},
    )


# ---- outputs: files, MLflow, registry -----------------------------------------------------


class RoundLogger:
    """Per-round metrics per site into one MLflow run per task (step = round)."""

    def __init__(self, tracking, tasks: list[str], strategy: str, tags: dict[str, str] | None = None):
        from chronorisk.training.tracking import TAG_PREFIX

        self.tracking = tracking
        self.client = tracking.client()
        self.run_ids = {}
        for task in tasks:
            run = self.client.create_run(
                tracking.experiment_id,
                run_name=f"federated-{strategy}-{task}",
                tags={f"{TAG_PREFIX}task": task, f"{TAG_PREFIX}training": "federated",
                      f"{TAG_PREFIX}strategy": strategy, **(tags or {})},
            )
            self.run_ids[task] = run.info.run_id
        self.step = 0

    def __call__(self, entry: RoundLog) -> None:
        from mlflow.entities import Metric

        self.step += 1
        now = int(time.time() * 1000)
        for task, run_id in self.run_ids.items():
            metrics = [
                Metric(f"round.{k}", float(v), now, self.step)
                for k, v in (("wall_s", entry.wall_s), ("local_s", entry.local_s),
                             ("overhead_s", entry.overhead_s), ("bytes_out", entry.bytes_out),
                             ("bytes_in", entry.bytes_in), ("sites", len(entry.sites)))
            ]
            for site, values in entry.site_metrics.items():
                for key, value in values.items():
                    if key.startswith(task + ".") and np.isfinite(value):
                        name = f"site.{_safe(site)}.{key[len(task) + 1:]}"
                        metrics.append(Metric(name, float(value), now, self.step))
            for site, seconds in entry.site_seconds.items():
                metrics.append(Metric(f"site.{_safe(site)}.seconds", float(seconds), now, self.step))
            self.client.log_batch(run_id, metrics=metrics)

    def fail(self) -> None:
        for run_id in self.run_ids.values():
            self.client.set_terminated(run_id, status="FAILED")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in name)


def finish(
    result: FederatedResult,
    params: Params,
    paths: WorkPaths,
    *,
    out_dir: Path,
    tracking=None,
    round_logger: RoundLogger | None = None,
    register: bool = True,
) -> dict:
    """Bundles, result.json, MLflow metrics and registration; returns the summary written."""
    summary = result.summary()
    summary["status"] = "finished"
    summary["bundles"] = {}
    summary["registered"] = {}
    for task, task_result in result.tasks.items():
        bundle = build_bundle(task_result, params, strategy=result.strategy)
        bundle_dir = out_dir / "models" / bundle.task.name  # `task` may be a YAML path
        bundle.save(bundle_dir)
        summary["bundles"][task] = str(bundle_dir)
        if tracking is not None and round_logger is not None:
            summary["registered"][task] = _log_task(
                tracking, round_logger.run_ids[task], task_result, bundle, bundle_dir, result, register
            )
    write_text_atomic(out_dir / "result.json", json.dumps(summary, indent=1, default=str))
    return summary


def _log_task(tracking, run_id, task_result: TaskResult, bundle, bundle_dir, result, register) -> dict | None:
    import mlflow

    from chronorisk.training.tracking import log_metrics, log_params, start_run

    with start_run(tracking, name="", run_id=run_id):
        log_params({"strategy": result.strategy, "sites": ",".join(result.sites),
                    "num_trees": task_result.num_trees,
                    "calibration": task_result.calibration_info.get("method")}, prefix="federated.")
        log_metrics(task_result.overall, prefix="held_out.")
        for site, values in task_result.site_metrics.items():
            log_metrics(values, prefix=f"held_out.site.{_safe(site)}.")
        mlflow.log_dict(result.summary(), "federated/result.json")
        if not register:
            return None
        from chronorisk.training.registry import register_bundle

        reg = register_bundle(
            tracking, bundle_dir, task=bundle.task.name, booster=bundle.booster,
            tags={"chronorisk.training": "federated", "chronorisk.strategy": result.strategy},
            description=f"federated ({result.strategy}) over {len(result.sites)} sites",
        )
        return {"name": reg.name, "version": reg.version}


def open_tracking(params: Params, paths: WorkPaths, tasks: list[str], strategy: str, mode: str):
    """(Tracking, RoundLogger) for a federated run: MLflow set up, one run per task opened."""
    from chronorisk.training.tracking import configure_tracking, resolve_tracking_uri

    tracking = configure_tracking(
        paths, uri=resolve_tracking_uri(paths, configured=params.train.tracking_uri),
        experiment=params.train.experiment,
    )
    return tracking, RoundLogger(tracking, tasks, strategy, tags={"chronorisk.mode": mode})


def run_on_grid(grid: Any, run_config: dict) -> dict:
    """The ServerApp body: train over the Flower Grid and write `<work>/federated/runs/<tag>/`.

    MLflow is opened in a background thread while the summary round is out
    (importing MLflow and opening its database takes seconds the sites would
    otherwise wait for).
    """
    from concurrent.futures import ThreadPoolExecutor

    from chronorisk.config import load_params
    from chronorisk.environment import configure_environment
    from chronorisk.federated.runner import FlowerTransport
    from chronorisk.paths import WorkPaths

    if not str(run_config.get("work") or ""):
        raise ValueError("run config 'work' is empty: start the run with `chronorisk federated run`")
    work = Path(str(run_config["work"])).expanduser()
    configure_environment(work)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    paths = WorkPaths(work)
    params = load_params(Path(str(run_config["params"])) if run_config.get("params") else None)
    strategy = str(run_config.get("strategy") or "") or params.federated.strategy
    tag = str(run_config.get("tag") or datetime.now().strftime("%Y%m%d-%H%M%S"))
    out_dir = paths.federated / "runs" / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "status.json", json.dumps({"status": "running", "tag": tag}))
    transport = FlowerTransport(grid, poll_interval_s=params.federated.poll_interval_s)
    pool = ThreadPoolExecutor(max_workers=1)
    opening = (pool.submit(open_tracking, params, paths, list(params.labels.tasks), strategy, "deployment")
               if params.federated.mlflow else None)

    def tracking_parts():
        return opening.result() if opening is not None else (None, None)

    def on_round(entry: RoundLog) -> None:
        _, round_logger = tracking_parts()
        if round_logger is not None:
            round_logger(entry)
        write_text_atomic(out_dir / "status.json", json.dumps({
            "status": "running", "tag": tag, "phase": entry.phase, "round": entry.round,
            "sites": entry.sites, "missing": entry.missing,
        }))

    try:
        result = train_federated(
            transport, params, strategy=strategy,
            rounds=int(run_config.get("rounds") or 0) or None, on_round=on_round,
        )
        tracking, round_logger = tracking_parts()
        summary = finish(result, params, paths, out_dir=out_dir, tracking=tracking, round_logger=round_logger,
                         register=params.federated.register_model)
        write_text_atomic(out_dir / "status.json", json.dumps({"status": "finished", "tag": tag}))
        return summary
    except Exception as exc:
        try:
            _, round_logger = tracking_parts()
            if round_logger is not None:
                round_logger.fail()
        except Exception:  # MLflow itself failed: the status file still says why the run stopped
            pass
        write_text_atomic(out_dir / "status.json", json.dumps({
            "status": "failed", "tag": tag, "error": f"{type(exc).__name__}: {exc}"[:2000],
            "where": traceback.format_exc(limit=3)[-2000:],
        }))
        raise
    finally:
        pool.shutdown(wait=False)
