"""`chronorisk federated` through the real CLI on a small generated cohort (simulation mode)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _cli(work: Path, params: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chronorisk.cli", "--work", str(work), "--params", str(params), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedcli")
    work = root / "work"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["federated"].update({"rounds": 2, "trees_per_round": 5, "cyclic_trees": 3, "superlink_port": 0})
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    gen = _cli(work, params_path, "generate", "--patients", "700", "--seed", "3")
    assert gen.returncode == 0, gen.stderr[-2000:]
    return work, params_path


def test_sim_trains_logs_and_registers(cohort):
    work, params = cohort
    proc = _cli(work, params, "federated", "sim")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "complication_1y" in proc.stdout and "onset_2y" in proc.stdout
    result_file = sorted((work / "federated" / "runs").glob("sim-bagging-*/result.json"))[-1]
    result = json.loads(result_file.read_text())
    assert result["status"] == "finished" and len(result["sites"]) == 5
    for task in ("complication_1y", "onset_2y"):
        bundle = Path(result["bundles"][task])
        assert {"booster.txt", "calibrator.json", "spec.json", "task.yaml", "bundle.json"} <= {
            p.name for p in bundle.iterdir()}
        meta = json.loads((bundle / "bundle.json").read_text())
        assert meta.get("training") == "federated"
        assert result["registered"][task]["name"] == f"chronorisk-{task}"
    # one cached feature table per site and task, on the SuperNode side
    caches = list((work / "federated" / "nodes").glob("*/cache/*/*.parquet"))
    assert len(caches) == 10

    # MLflow: per-round metrics per site in each task's run, and the registered version
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`chronorisk.training` = 'federated'",
    )
    assert {r.data.tags["chronorisk.task"] for r in runs} == {"complication_1y", "onset_2y"}
    run = next(r for r in runs if r.data.tags["chronorisk.task"] == "onset_2y")
    site_metrics = [k for k in run.data.metrics if k.startswith("site.") and k.endswith(".tune_auroc_local")]
    assert len(site_metrics) >= 3  # a tiny site may have one outcome only in its tuning rows (AUROC undefined)
    history = client.get_metric_history(run.info.run_id, "round.wall_s")
    assert len(history) >= 3  # summary, train rounds, evaluate
    assert "held_out.auroc" in run.data.metrics
    versions = client.search_model_versions("name = 'chronorisk-onset_2y'")
    assert versions and versions[0].tags.get("chronorisk.training") == "federated"


def test_compare_writes_json_and_html(cohort):
    work, params = cohort
    proc = _cli(work, params, "federated", "compare", "--strategies", "bagging", "--tasks", "onset_2y")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((work / "reports" / "federated_compare.json").read_text())
    info = report["tasks"]["onset_2y"]
    assert set(info["overall"]) == {"centralized", "logistic-baseline", "federated-bagging", "site-local"}
    assert set(info["sites"]) == set(info["train_rows"]) and len(info["sites"]) == 5
    for cells in info["sites"].values():  # NaN: a tiny site without a case among its held-out rows
        assert math.isnan(cells["centralized"]["auroc"]) or 0 <= cells["centralized"]["auroc"] <= 1
    assert 0.5 < info["overall"]["centralized"]["auroc"] <= 1
    assert "bagging" in info["checks"]
    page = (work / "reports" / "federated_compare.html").read_text()
    assert "<table>" in page and "federated-bagging" in page and "subject" not in page.lower()


def test_clear_errors(tmp_path):
    params = REPO / "params.yaml"
    proc = _cli(tmp_path / "empty", params, "federated", "run")
    assert proc.returncode == 2 and "chronorisk federated up" in proc.stderr
    proc = _cli(tmp_path / "empty", params, "federated", "sim")
    assert proc.returncode == 2 and "no MEDS site" in proc.stderr
    proc = _cli(tmp_path / "empty", params, "federated", "down")
    assert proc.returncode == 0 and "nothing was running" in proc.stdout
    assert "Traceback" not in proc.stderr
