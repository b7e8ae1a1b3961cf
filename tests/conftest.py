"""Shared fixtures. Every test runs with telemetry off and tool homes in a temp work folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chronorisk.environment import configure_environment

REPO = Path(__file__).resolve().parents[1]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea-r4"


def slow_scale() -> float:
    """Size factor for `slow` tests: 1.0 locally unless set, reduced in CI."""
    default = "0.2" if os.environ.get("CI") else "1.0"
    return float(os.environ.get("CHRONORISK_SLOW_SCALE", default))


@pytest.fixture(autouse=True, scope="session")
def _health_data_environment(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    configure_environment(work)
    yield


@pytest.fixture
def work(tmp_path) -> Path:
    """A fresh work folder for one test."""
    w = tmp_path / "work"
    w.mkdir()
    return w


@pytest.fixture(scope="session")
def synthea_dir() -> Path:
    if not SYNTHEA.is_dir():
        pytest.fail(f"the shared Synthea sample is missing: expected {SYNTHEA.relative_to(REPO.parent)}")
    return SYNTHEA
