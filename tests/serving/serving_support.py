"""Helpers of the serving tests: a seeded score store, a real server process, PostgreSQL schemas."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from chronorisk.serving import access
from chronorisk.serving.store import ScoreStore, age_band, conditions_text

REPO = Path(__file__).resolve().parents[2]
SECRET = "test-secret-0123456789abcdef"
PG_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SITES = ("chc_a", "chc_b", "hosp_c")
TIMES = (datetime(2024, 1, 1), datetime(2024, 7, 1))
# distinctive ids: a log line holding one is easy to find
BASE_ID = 7_340_000_000_000


def subject_id(site_index: int, i: int) -> int:
    return BASE_ID + site_index * 10_000 + i


def tier_of(risk: float) -> str:
    return "high" if risk >= 0.25 else "medium" if risk >= 0.10 else "low"


def factor(value: float, when: str) -> dict:
    return {
        "feature": "hba1c_last_365d", "display": "HbA1c", "value": value, "unit": "%", "date": when,
        "direction": "raises", "contribution": 0.31,
        "text": f"HbA1c {value} %, last measured {when}, raises risk",
    }


def seed_store(store: ScoreStore, n_per_site: int = 30) -> dict:
    """Scores at two dates for two tasks at three sites, patient facts; returns what was written.
    The writes are recorded in the audit log (as batch scoring with the service secret does)."""
    from chronorisk.serving.audit import AuditLog

    store.audit = AuditLog(store.engine, SECRET.encode())
    written = {"subjects": {}, "n_scores": 0}
    for s_idx, site in enumerate(SITES):
        patients, scores = [], []
        # hosp_c: few patients so that some aggregate cells fall under 10
        n = n_per_site if site != "hosp_c" else 12
        for i in range(n):
            sid = subject_id(s_idx, i)
            birth_year = 1940 + (i * 3) % 50
            conds = ["diabetes"] if i % 2 == 0 else ["hypertension"]
            if i % 5 == 0:
                conds.append("ckd")
            patients.append({
                "site": site, "subject_id": sid, "sex": "F" if i % 2 else "M", "birth_year": birth_year,
                "conditions": conditions_text(conds), "as_of": TIMES[-1], "updated_at": TIMES[-1],
            })
            written["subjects"][sid] = site
            for t_idx, when in enumerate(TIMES):
                for task, scale in (("complication_1y", 0.40), ("onset_2y", 0.20)):
                    risk = round(min(0.95, scale * (i + 1) / n + 0.02 * t_idx), 4)
                    tier = tier_of(risk)
                    scores.append({
                        "site": site, "subject_id": sid, "task": task, "prediction_time": when, "risk": risk,
                        "tier": tier, "age_band": age_band(when.year - birth_year),
                        "model_name": f"chronorisk-{task}", "model_version": str(1 + t_idx),
                        "scored_at": when, "factors": json.dumps([factor(9.1, "2024-03-02")])
                        if tier != "low" else None,
                    })
        store.write_chunk(scores, patients, [])
        written["n_scores"] += len(scores)
    store.audit = None
    return written


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """`chronorisk serve` in its own process group, on a free loopback port."""

    work: Path
    store_url: str
    params: Path
    model_dir: Path | None = None
    meds_root: Path | None = None
    workers: int = 1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CHRONORISK_SERVE_SECRET"] = SECRET
        env.pop("CHRONORISK_DEMO", None)
        return env

    def start(self, timeout: float = 90.0) -> Server:
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "chronorisk.cli", "--work", str(self.work), "--params", str(self.params),
               "serve", "--port", str(self.port), "--workers", str(self.workers), "--store", self.store_url]
        if self.model_dir is not None:
            cmd += ["--model-dir", str(self.model_dir)]
        if self.meds_root is not None:
            cmd += ["--meds", str(self.meds_root)]
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def make_keys(store: ScoreStore) -> dict[str, str]:
    """One key per role and a second site's GP, created through the audit log (as `chronorisk access` does)."""
    from chronorisk.serving.audit import AuditLog

    audit = AuditLog(store.engine, SECRET.encode())
    keys = {}
    for role in access.ROLES:
        _, keys[role] = access.create_key(store.engine, role, "chc_a" if role == "gp" else None, label="test",
                                          audit=audit, actor="test")
    _, keys["gp_b"] = access.create_key(store.engine, "gp", "chc_b", label="test", audit=audit, actor="test")
    return keys


def write_params(path: Path, **serve) -> Path:
    """params.yaml = the project's, with `serve:` overrides (fast key revocation for tests)."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text()) or {}
    raw.setdefault("serve", {}).update({"key_cache_seconds": 0, **serve})
    path.write_text(yaml.safe_dump(raw))
    return path


def pg_schema_url(schema: str) -> str:
    return f"{PG_BASE}?options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def pg_schema():
    """A fresh PostgreSQL schema of our own, dropped afterwards."""
    import sqlalchemy as sa

    name = f"serving_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_BASE)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        yield pg_schema_url(name)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        engine.dispose()


# -- a tiny model, trained here (no training CLI needed) ---------------------------------------


def generate_cohort(out: Path, patients: int = 1500, seed: int = 7) -> Path:
    """A small synthetic multi-site cohort (MEDS under `out/meds`)."""
    from chronorisk.data.config import GenerateConfig
    from chronorisk.data.synth.runner import generate

    generate(GenerateConfig(patients=patients, seed=seed, chunk_size=max(500, patients // 2)), out, workers=1)
    return out / "meds"


TRAIN_TIMES = (datetime(2021, 7, 1), datetime(2022, 7, 1), datetime(2023, 1, 1))


def train_bundles(meds_root: Path, out: Path, tasks=("complication_1y", "onset_2y"), rounds: int = 60,
                  times=TRAIN_TIMES) -> Path:
    """One small calibrated LightGBM bundle per task, saved as `out/<task>/` (the exported-folder layout).

    Labels at a few dates only, so that one `transform` call per task builds the training table."""
    import polars as pl

    from chronorisk.data.meds_io import scan_sites
    from chronorisk.features.config import FeatureConfig
    from chronorisk.features.labels import extract_labels
    from chronorisk.features.pipeline import code_summary, fit_spec, transform
    from chronorisk.features.tasks import load_task
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.models.config import ModelConfig
    from chronorisk.models.risk_model import RiskModel

    events = scan_sites(meds_root).drop("site").collect().lazy()
    summary = code_summary(events)
    config = ModelConfig(num_boost_round=rounds, early_stopping_rounds=20, calibration="platt")
    for name in tasks:
        task = load_task(name)
        labels = extract_labels(events, task, list(times))
        spec = fit_spec(summary, FeatureConfig(), task)
        feats = transform(spec, events, labels.lazy()).collect()
        bucket = feats["subject_id"].hash(seed=3) % 10
        train, valid = feats.filter(bucket < 7), feats.filter(bucket >= 7)
        names = list(spec.feature_names)
        model = RiskModel(config).fit(
            train.select(names), train["boolean_value"].cast(pl.Int8).to_numpy(),
            valid.select(names), valid["boolean_value"].cast(pl.Int8).to_numpy(), names,
        )
        ModelBundle.from_model(model, spec, task, config.tiers[name], version="1").save(out / name)
    return out
