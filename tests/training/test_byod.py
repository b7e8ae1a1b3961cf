"""Bring your own data, end to end through the real CLI: docs/byod.md's worked example.

`docs/examples/make_byod_example.py` writes a two-site cohort study as MEDS (ten classic risk factors,
smoking as text) with a supplied 10-year label from a logistic truth model, and a task YAML that says
`labels: supplied`. The tests train, evaluate and federate it with `--labels` given as a file, a
task's folder and a labels root holding two tasks, with the task given by its absolute path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docs" / "examples" / "make_byod_example.py"
TASK = "cvd_10y"


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600, check=False)


def cli(work: Path, *args: str, params: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--params", str(params)] if params else []
    return run("-m", "chronorisk.cli", "--work", str(work), *extra, *args)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


def make(out: Path, *args: str) -> dict:
    ok(run(str(SCRIPT), "--out", str(out), *args))
    return json.loads((out / "reference.json").read_text())


@pytest.fixture(scope="module")
def byod(tmp_path_factory):
    """The worked example (2,000 subjects), plus a labels root that also holds a second task's labels."""
    root = tmp_path_factory.mktemp("byod")
    reference = make(root)
    labels = pl.read_parquet(root / "labels" / TASK / "labels.parquet")
    other = labels.with_columns(~pl.col("boolean_value"))  # a second task on the same subjects
    (root / "labels" / "other_task").mkdir()
    other.write_parquet(root / "labels" / "other_task" / "labels.parquet")
    return root, reference


def _meta(work: Path) -> dict:
    return json.loads((work / "models" / TASK / "bundle.json").read_text())


def test_supplied_labels_train_with_auto_picking_logistic_and_evaluate_with_a_baseline(byod, tmp_path):
    root, reference = byod
    work = tmp_path / "w"
    task = str((root / f"{TASK}.yaml").resolve())  # an absolute task path
    out = ok(cli(work, "train", "--meds", str(root / "meds"), "--labels", str(root / "labels"), "--task", task,
                 "--no-mlflow"))
    assert "logistic regression" in out and "chosen by cross-validated log loss" in out
    meta = _meta(work)
    assert meta["model_kind"] == "logistic" and (work / "models" / TASK / "linear.json").is_file()
    selection = meta["model_selection"]
    assert selection["chosen"] == "logistic"
    assert selection["cv_log_loss"]["logistic"] < selection["cv_log_loss"]["lightgbm"]
    # the reference: 5-fold CV AUROC of a logistic regression on the ten raw factors (smoking included,
    # which reaches the features only as text categories); the model's own cross-validated AUROC over
    # the train and tuning patients is near it (measured: 0.772 against 0.789, with smoking's text answers
    # reaching the model as categories)
    assert selection["cv_auroc"]["logistic"] > reference["logistic_cv_auroc_on_the_ten_factors"] - 0.025
    supplied = meta["supplied_labels"]
    assert supplied["rows"] == 2000 and supplied["cases"] == reference["cases"]
    assert supplied["fingerprint"].startswith("sha256:")

    out = ok(cli(work, "evaluate", "--meds", str(root / "meds"), "--labels", str(root / "labels"), "--task", task,
                 "--no-mlflow", "--bootstrap", "50"))
    assert "Baseline: LightGBM AUROC" in out
    card = (work / "reports" / f"model_card_{TASK}.md").read_text()
    assert "## Supplied labels" in card and supplied["fingerprint"] in card
    assert "## Baseline" in card and "Better:" in card and "penalized logistic regression" in card
    assert "outcome: first record of" not in card  # no made-up outcome
    report = json.loads((work / "reports" / f"evaluation_{TASK}.json").read_text())
    base = report["baseline"]
    assert base["baseline_kind"] == "lightgbm" and base["difference_lo"] <= base["difference"] <= base["difference_hi"]
    overall = next(r for r in report["records"] if r["group"] == "all" and r["validation"] == "holdout")
    assert 0.5 < overall["auroc_within_site"] < 1 and 0.4 < overall["auroc_site_prevalence"] < 0.7
    for r in report["records"]:  # every reported group has 10 cases and 10 non-cases
        assert r["n_positive"] >= 10 and r["n"] - r["n_positive"] >= 10
        for m in ("auroc", "ece", "brier"):
            if r.get(f"{m}_lo") is not None:
                assert r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"]


def test_labels_mean_one_task_whatever_the_form(byod, tmp_path):
    """A file, the task's folder and a root with two tasks give the same rows; a root without it is refused."""
    root, _ = byod
    task = str(root / f"{TASK}.yaml")
    fingerprints = set()
    for i, labels in enumerate([root / "labels" / TASK / "labels.parquet", root / "labels" / TASK, root / "labels"]):
        work = tmp_path / f"w{i}"
        ok(cli(work, "train", "--meds", str(root / "meds"), "--labels", str(labels), "--task", task, "--no-mlflow"))
        meta = _meta(work)
        assert meta["supplied_labels"]["rows"] == 2000  # never the second task's rows as well
        fingerprints.add((meta["supplied_labels"]["fingerprint"], meta["data_fingerprint"]))
    assert len(fingerprints) == 1
    only_other = tmp_path / "only_other"
    (only_other / "other_task").mkdir(parents=True)
    (only_other / "other_task" / "labels.parquet").write_bytes(
        (root / "labels" / "other_task" / "labels.parquet").read_bytes())
    for command in (("train",), ("evaluate",), ("features",), ("labels",)):
        proc = cli(tmp_path / "wx", *command, "--meds", str(root / "meds"), "--labels", str(only_other),
                   "--task", task, *(["--no-mlflow"] if command[0] in ("train", "evaluate") else []))
        assert proc.returncode == 2, proc.stderr
        assert "holds no labels of task 'cvd_10y'" in proc.stderr and "other_task/" in proc.stderr, proc.stderr

    # labels and features read the root the same way: the task's rows split per site
    work = tmp_path / "wf"
    ok(cli(work, "labels", "--meds", str(root / "meds"), "--labels", str(root / "labels"), "--task", task))
    per_site = [pl.read_parquet(p) for p in sorted((work / "labels" / TASK).glob("*.parquet"))]
    assert [p.stem for p in sorted((work / "labels" / TASK).glob("*.parquet"))] == ["site_a", "site_b"]
    assert sum(f.height for f in per_site) == 2000
    ok(cli(work, "features", "--meds", str(root / "meds"), "--labels", str(root / "labels"), "--task", task))
    tables = [pl.read_parquet(p) for p in sorted((work / "features" / TASK).glob("site_*.parquet"))]
    assert sum(t.height for t in tables) == 2000
    # summary: conditions through the concept map (ICD10CM//E11.9 is diabetes), labels per site
    out = ok(cli(work, "summary", "--meds", str(root / "meds"), "--labels", str(root / "labels"), "--task", task))
    assert "site_a" in out and "prevalence_pct" in out
    summary_json = tmp_path / "summary.json"
    ok(cli(work, "summary", "--meds", str(root / "meds" / "sites" / "site_a"), "--json", str(summary_json)))
    rows = json.loads(summary_json.read_text())
    assert rows[0]["site"] == "site_a" and rows[0]["diabetes_pct"] > 2


def test_a_cohort_without_signal_or_cases_is_refused(tmp_path):
    few = tmp_path / "few"
    make(few, "--subjects", "100", "--signal", "0", "--seed", "1")
    task = str(few / f"{TASK}.yaml")
    args = ("train", "--meds", str(few / "meds"), "--labels", str(few / "labels"), "--task", task, "--no-mlflow")
    proc = cli(tmp_path / "w", *args)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "no model registered" in proc.stderr and "train.min_cases = 20" in proc.stderr
    assert not (tmp_path / "w" / "models" / TASK).exists()

    noise = tmp_path / "noise"
    ref = make(noise, "--subjects", "1200", "--signal", "0", "--seed", "2")
    assert ref["cases"] >= 20
    task = str(noise / f"{TASK}.yaml")
    args = ("train", "--meds", str(noise / "meds"), "--labels", str(noise / "labels"), "--task", task, "--no-mlflow")
    proc = cli(tmp_path / "w2", *args)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "includes 0.5: no better than chance" in proc.stderr

    out = ok(cli(tmp_path / "w2", *args, "--allow-unfit"))
    assert "NOT FIT FOR USE" in out
    ok(cli(tmp_path / "w2", "evaluate", "--meds", str(noise / "meds"), "--labels", str(noise / "labels"),
           "--task", task, "--no-mlflow", "--bootstrap", "20"))
    card = (tmp_path / "w2" / "reports" / f"model_card_{TASK}.md").read_text()
    assert card.split("\n", 2)[2].startswith("**Not fit for use.**")
    assert "Most influential features" not in card


def test_federated_simulation_and_compare_with_supplied_labels_and_an_absolute_task_path(byod, tmp_path):
    root, _ = byod
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["federated"].update({"rounds": 2, "trees_per_round": 5, "min_sites": 2, "mlflow": False})
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    task = str((root / f"{TASK}.yaml").resolve())
    work = tmp_path / "w"
    out = ok(cli(work, "federated", "sim", "--meds", str(root / "meds"), "--labels", str(root / "labels"),
                 "--tasks", task, "--no-register", params=params_path))
    assert "site_a" in out and "site_b" in out
    result = json.loads(sorted((work / "federated" / "runs").glob("sim-*/result.json"))[-1].read_text())
    bundle = Path(result["bundles"][task])
    assert bundle.name == TASK and (bundle / "booster.txt").is_file()  # federated stays LightGBM
    # the sites' caches are under the task's name, not its path
    assert {p.parent.name for p in (work / "federated" / "nodes").glob("*/cache/*/*.parquet")} == {TASK}
    proc = cli(work, "federated", "sim", "--meds", str(root / "meds"), "--tasks", task, "--no-register",
               params=params_path)
    assert proc.returncode != 0 and "supplied labels" in proc.stderr + proc.stdout

    out = ok(cli(work, "federated", "compare", "--meds", str(root / "meds"), "--labels", str(root / "labels"),
                 "--tasks", task, "--strategies", "bagging", params=params_path))
    report = json.loads((work / "reports" / "federated_compare.json").read_text())
    overall = report["tasks"][task]["overall"]
    assert {"centralized", "logistic-baseline", "federated-bagging"} <= set(overall)
    assert overall["logistic-baseline"]["auroc"] > 0.7


def test_serving_scores_and_explains_a_logistic_bundle(byod, tmp_path):
    """The serving path (`serving.scoring.score_one`) takes either model kind through the bundle interface."""
    from datetime import datetime

    from chronorisk.models.bundle import ModelBundle
    from chronorisk.serving import scoring

    root, _ = byod
    work = tmp_path / "w"
    task = str(root / f"{TASK}.yaml")
    ok(cli(work, "train", "--meds", str(root / "meds"), "--labels", str(root / "labels"), "--task", task,
           "--no-mlflow"))
    bundle = ModelBundle.load(work / "models" / TASK)
    assert bundle.kind == "logistic"
    events = pl.read_parquet(root / "meds" / "sites" / "site_a" / "data" / "0.parquet")
    one = events.filter(pl.col("subject_id") == events["subject_id"][0])
    models = {TASK: scoring.served_model(TASK, bundle)}
    [result] = scoring.score_one(models, [TASK], events=one, prediction_time=datetime(2016, 1, 1), top_k=3)
    assert result.eligible and 0 < result.risk < 1 and result.tier in ("low", "medium", "high")
    assert result.factors and all(f["text"].endswith("risk") for f in result.factors)
    feats, _ = scoring.features_from_events(models[TASK], one, datetime(2016, 1, 1))
    assert abs(bundle.contributions(feats).sum() - float(bundle.predict_raw(feats)[0])) < 1e-9
