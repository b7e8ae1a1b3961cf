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
import threading
from dataclasses import dataclass, field
from pathlib import Path

from chronorisk.serving.access import KeyRing, is_demo, load_secret
from chronorisk.serving.audit import AuditLog
from chronorisk.serving.config import resolve_store_url
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


class MonitoringSink:
    """Feeds the monitoring log (`serving/prediction_log.py`): batch chunks whole, live requests buffered.

    A live request only appends its row to a list; a background thread turns
    the rows into one table per model and writes it every `flush_seconds` or
    `flush_rows`, so no request pays for a parquet write. Monitoring must
    never fail a score: an error is logged (its class only) and dropped.
    """

    def __init__(self, work: Path, *, flush_rows: int = 500, flush_seconds: float = 10.0):
        from chronorisk.serving.prediction_log import PredictionLog

        self.log = PredictionLog.for_work(work)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._rows: list[tuple] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def batch(self, records, model: ServedModel, part: str) -> None:
        try:
            self.log.append(records, model.task, model.version, "batch", model_name=model.name,
                            feature_names=model.feature_names, part=part)
        except Exception as exc:
            log.warning("prediction log: batch append failed (%s)", type(exc).__name__)

    def live(self, model: ServedModel, feats, risk, tiers, site, when) -> None:
        with self._lock:
            self._rows.append((model, feats, risk, tiers, site, when))
            n = len(self._rows)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
                self._thread.start()
        if n >= self.flush_rows:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write what is buffered: one table per model, built at once (ready-made feature rows are
        stacked into one matrix; per-request frames of the events path are concatenated)."""
        import numpy as np

        from chronorisk.frames import stack

        with self._lock:
            rows, self._rows = self._rows, []
        by_model: dict[str, list] = {}
        for row in rows:
            by_model.setdefault(row[0].task, []).append(row)
        for group in by_model.values():
            model = group[0][0]
            try:
                matrix = [g for g in group if isinstance(g[1], np.ndarray)]
                tables = [g for g in group if not isinstance(g[1], np.ndarray)]
                frames = []
                if matrix:
                    frames.append(_stacked_records(model, matrix, np.vstack([g[1] for g in matrix])))
                if tables:  # one concat and one select for all requests, not one select per request
                    frames.append(_stacked_records(model, tables, stack([g[1] for g in tables])))
                self.log.append(stack(frames), model.task, model.version, "api",
                                model_name=model.name, feature_names=model.feature_names)
            except Exception as exc:
                log.warning("prediction log: append failed (%s)", type(exc).__name__)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self.flush()


def _stacked_records(model, rows: list[tuple], feats):
    """Monitoring records of many buffered requests at once: `feats` stacks their feature rows in order."""
    import numpy as np
    import polars as pl

    from chronorisk.serving.scoring import monitoring_records

    return monitoring_records(
        model, feats, np.concatenate([g[2] for g in rows]), [t for g in rows for t in g[3]], None, rows[0][5],
    ).with_columns(
        pl.Series("site", [g[4] or "unknown" for g in rows for _ in g[3]], dtype=pl.String),
        pl.Series("prediction_time", [g[5] for g in rows for _ in g[3]], dtype=pl.Datetime("us")),
    )


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
        models = load_models(cfg.tasks, source=source, model_dir=folder, alias=cfg.model_alias, work=work,
                             tracking_uri=params.train.tracking_uri)
    root = meds_root or (Path(os.environ["CHRONORISK_MEDS_ROOT"]) if os.environ.get("CHRONORISK_MEDS_ROOT") else None)
    if root is None:
        root = work / "meds"
    audit = AuditLog(store.engine, secret, checkpoint_files(work, cfg))
    return ServingState(
        params=params,
        work=work,
        store=store,
        audit=audit,
        keys=KeyRing(store.engine, secret, cache_seconds=cfg.key_cache_seconds, session_hours=cfg.session_hours,
                     guard=auth_guard(cfg, audit)),
        secret=secret,
        models=models,
        meds_root=root,
        monitor=monitoring_sink(work),
    )


def checkpoint_files(work: Path, cfg) -> list[Path]:
    """Where the audit log's signed checkpoints go: the work folder's file and any configured others."""
    return [Path(work) / "audit" / "checkpoints.jsonl", *(Path(p) for p in cfg.audit_checkpoint_files)]


def auth_guard(cfg, audit: AuditLog):
    """Rate limits of failed keys and sign-ins, audited."""
    from chronorisk.serving.access import AuthGuard, AuthLimits

    def on_event(action: str, detail: dict) -> None:
        try:
            audit.append(actor=f"key:{detail.get('key_id') or 'unknown'}", role="unauthenticated", action=action,
                         detail=detail)
        except Exception as exc:  # an audit failure must not turn a 401 into a 500
            log.warning("audit of %s failed (%s)", action, type(exc).__name__)

    return AuthGuard(AuthLimits(cfg.auth_failures_per_minute, cfg.key_lockout_failures, cfg.key_lockout_minutes,
                                cfg.rate_limit_storage), on_event, engine=audit.engine)


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
