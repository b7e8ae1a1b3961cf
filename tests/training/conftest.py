"""Fixtures shared by the training tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def generated_meds_600(tmp_path_factory):
    """A 600-patient generated cohort (MEDS root), made once through the real CLI; tests only read it."""
    work = tmp_path_factory.mktemp("generated600") / "work"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work), "generate", "--patients", "600"],
                   check=True, capture_output=True, env=env)
    return work / "meds"
