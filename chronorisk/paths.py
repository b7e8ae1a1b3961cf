"""Where every generated file lives: one gitignored work folder.

Raw data is immutable once written; each stage writes its own sub-folder.
Tool homes (BentoML, Flower, DVC site cache, MLflow) live here too, never in `~`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WORK_ENV = "CHRONORISK_WORK"


def project_root() -> Path:
    """The repository root: the folder holding params.yaml (searched upwards from cwd)."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "params.yaml").is_file() and (candidate / "pyproject.toml").is_file():
            return candidate
    return here


def default_work_dir() -> Path:
    """`$CHRONORISK_WORK` if set, else `<project root>/work`."""
    env = os.environ.get(WORK_ENV)
    return Path(env).resolve() if env else project_root() / "work"


@dataclass(frozen=True)
class WorkPaths:
    """Named locations under the work folder; nothing here creates folders."""

    root: Path

    @property
    def meds(self) -> Path:
        """Generated MEDS, one dataset per site: `meds/sites/<site_id>/`."""
        return self.root / "meds"

    @property
    def truth(self) -> Path:
        """Generator ground truth (true risk); training never reads it."""
        return self.root / "truth"

    @property
    def fhir(self) -> Path:
        """Generated FHIR R4 bundles, `fhir/<site_id>/*.json.gz`."""
        return self.root / "fhir"

    @property
    def ingested(self) -> Path:
        """MEDS produced by `chronorisk ingest`, one dataset per site."""
        return self.root / "ingested"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def metrics(self) -> Path:
        """Small JSON metrics files that DVC tracks."""
        return self.root / "metrics"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def store_url(self) -> str:
        """Default score store and audit log: SQLite under the work folder."""
        return f"sqlite:///{self.root / 'serving' / 'chronorisk.db'}"

    @property
    def serving(self) -> Path:
        return self.root / "serving"

    @property
    def monitoring(self) -> Path:
        return self.root / "monitoring"

    @property
    def federated(self) -> Path:
        return self.root / "federated"

    @property
    def secrets(self) -> Path:
        """Demo-only secrets (pseudonymization key, token key); real sites use env vars."""
        return self.root / "secrets"

    @property
    def bentoml_home(self) -> Path:
        return self.root / "bentoml"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    def site_dir(self, base: Path, site_id: str) -> Path:
        return base / "sites" / site_id
