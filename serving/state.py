"""What a serving process holds: config, store, audit log, key ring, models.

Built once per worker (the BentoML service's `__init__`) from environment
variables that `chronorisk serve` sets, so that `bentoml serve` of the
service module works on its own too:

| variable | meaning | default |
|---|---|---|
| CHRONORISK_WORK | work folder | ./work |
| CHRONORISK_PARAMS | params.yaml | project root's |
| CHRONORISK_STORE_URL | score store URL | serve.store_url, else SQLite in the work folder |
| CHRONORISK_MODEL_SOURCE | registry / folder | serve.model_source |
| CHRONORISK_MODEL_DIR | exported models (`<dir>/<task>/`) | serve.model_dir |
| CHRONORISK_MEDS_ROOT | MEDS root for on-demand explanations | `<work>/meds` |
| CHRONORISK_DEMO | 1: create the service secret under `<work>/secrets` | off |
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from chronorisk.serving.access import KeyRing, is_demo, load_secret
from chronorisk.serving.audit import AuditLog
from chronorisk.serving.scoring import ServedModel, load_models
from chronorisk.serving.store import ScoreStore, utcnow

log = logging.getLogger(__name__)


@dataclass
class ServingState:
    params: object  # chronorisk.config.Params
    work: Path
    store: ScoreStore
    audit: AuditLog
    keys: KeyRing
    secret: bytes
    models: dict[str, ServedModel]
    meds_root: Path | None
    monitor: MonitoringSink | None = None
    started_at: object = field(default_factory=utcnow)

    @property
    def config(self):
        return self.params.serve

    @property
    def top_k(self) -> int:
        return int(self.params.model.top_k_factors)


def resolve_store_url(params, work: Path, override: str | None = None) -> str:
    from chronorisk.paths import WorkPaths

    return override or os.environ.get("CHRONORISK_STORE_URL") or params.serve.store_url or WorkPaths(work).store_url


class MonitoringSink:
    """Feeds the monitoring log (`serving/prediction_log.py`): batch chunks whole, live requests buffered.

    Monitoring must never fail a score: an error is logged (its class only) and dropped.
    """

    def __init__(self, work: Path):
        from chronorisk.serving.prediction_log import BufferedPredictionLog, PredictionLog

        self.log = PredictionLog.for_work(work)
        self.buffer = BufferedPredictionLog(self.log)

    def batch(self, records, model: ServedModel, part: str) -> None:
        try:
            self.log.append(records, model.task, model.version, "batch", model_name=model.name,
                            feature_names=model.feature_names, part=part)
        except Exception as exc:
            log.warning("prediction log: batch append failed (%s)", type(exc).__name__)

    def live(self, records, model: ServedModel) -> None:
        try:
            self.buffer.add(records, model.task, model.version, "api", model_name=model.name,
                            feature_names=model.feature_names)
        except Exception as exc:
            log.warning("prediction log: append failed (%s)", type(exc).__name__)

    def close(self) -> None:
        try:
            self.buffer.close()
        except Exception as exc:
            log.warning("prediction log: final flush failed (%s)", type(exc).__name__)


def monitoring_sink(work: Path) -> MonitoringSink | None:
    """The monitoring log of the work folder, if the monitoring module is present."""
    try:
        return MonitoringSink(work)
    except ImportError:
        return None


def build_state(
    params,
    work: Path,
    *,
    store_url: str | None = None,
    demo: bool = False,
    models: dict[str, ServedModel] | None = None,
    model_source: str | None = None,
    model_dir: str | None = None,
    meds_root: Path | None = None,
) -> ServingState:
    cfg = params.serve
    secret = load_secret(cfg.secret_env, cfg.secret_file, work, demo=is_demo(demo))
    store = ScoreStore.open(resolve_store_url(params, work, store_url))
    if models is None:
        source = model_source or os.environ.get("CHRONORISK_MODEL_SOURCE") or cfg.model_source
        folder = model_dir or os.environ.get("CHRONORISK_MODEL_DIR") or cfg.model_dir
        if folder and not (model_source or os.environ.get("CHRONORISK_MODEL_SOURCE")):
            source = "folder"
        models = load_models(cfg.tasks, source=source, model_dir=folder, alias=cfg.model_alias)
    root = meds_root or (Path(os.environ["CHRONORISK_MEDS_ROOT"]) if os.environ.get("CHRONORISK_MEDS_ROOT") else None)
    if root is None:
        root = work / "meds"
    return ServingState(
        params=params,
        work=work,
        store=store,
        audit=AuditLog(store.engine, secret),
        keys=KeyRing(store.engine, secret, cache_seconds=cfg.key_cache_seconds, session_hours=cfg.session_hours),
        secret=secret,
        models=models,
        meds_root=root,
        monitor=monitoring_sink(work),
    )


def state_from_env() -> ServingState:
    """The state of a service worker, from the variables `chronorisk serve` exports."""
    from chronorisk.config import load_params
    from chronorisk.environment import configure_environment
    from chronorisk.paths import default_work_dir, project_root

    work = default_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    configure_environment(work)
    given = os.environ.get("CHRONORISK_PARAMS")
    params_path = Path(given) if given else project_root() / "params.yaml"
    return build_state(load_params(params_path), work)
