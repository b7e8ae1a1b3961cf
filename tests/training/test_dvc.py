"""`dvc repro` runs the pipeline end to end, and a second run does nothing.

The repository's dvc.yaml, .dvc/config, .dvcignore and the code folders the
stages depend on are copied into a fresh git repository under tmp_path,
with params.yaml shrunk to a 600-patient cohort (the smallest that still
has outcomes in every split); the stages call the installed `chronorisk`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COPIED = ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "data", "features", "models", "training")


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CHRONORISK_WORK")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_SITE_CACHE_DIR"] = str(root / "work" / "dvc-site-cache")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dvc") / "project"
    root.mkdir()
    for name in COPIED:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"].update(patients=600)
    params["evaluate"].update(min_group_cases=2)  # a tiny cohort: groups with 2 cases still shown
    params["evaluate"].update(bootstrap=20)
    params["model"].update(num_boost_round=200, early_stopping_rounds=20)
    params["train"].update(allow_unfit=True)  # 600 patients: the mechanics, not a model fit for use
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.mark.slow
def test_repro_end_to_end_then_nothing_to_do(project):
    first = dvc(project, "repro")
    tasks = yaml.safe_load((project / "params.yaml").read_text())["labels"]["tasks"]
    for stage in ("generate", "ingest", "features", *(f"train@{t}" for t in tasks), *(f"evaluate@{t}" for t in tasks)):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    work = project / "work"
    for task in tasks:
        assert (work / "models" / task / "bundle.json").is_file()
        metrics = json.loads((work / "metrics" / f"{task}.json").read_text())
        assert 0.0 <= metrics["holdout"]["auroc"] <= 1.0
    assert any((work / "ingested" / "sites").iterdir())
    assert (project / "dvc.lock").is_file()
    # the cache is in the work folder, not in the repository
    assert (work / "dvc-cache").is_dir() and not (project / ".dvc" / "cache").exists()

    bundle_mtime = (work / "models" / tasks[0] / "bundle.json").stat().st_mtime_ns
    second = dvc(project, "repro")
    assert "Running stage" not in second.stdout, second.stdout
    assert "Data and pipelines are up to date" in second.stdout
    assert (work / "models" / tasks[0] / "bundle.json").stat().st_mtime_ns == bundle_mtime

    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    assert any(f"work/metrics/{tasks[0]}.json" in str(v) for v in shown.values())

    # a change to the evaluation parameters makes only the evaluate stages stale
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["bootstrap"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = dvc(project, "status").stdout
    assert all(f"evaluate@{t}" in stale for t in tasks)
    assert "train@" not in stale and "features:" not in stale and "generate:" not in stale
