"""`chronorisk train`, `evaluate` and `promote` end to end through the real CLI, on a tiny generated cohort.

One module-scoped work folder: generate 600 patients and their feature
tables once, then each test runs the commands as a user would
(subprocesses, exit codes, printed output) and checks what landed on disk
and in MLflow's registry (SQLite; PostgreSQL in the `postgres` test).
The `--meds DIR --labels DIR` path (data from elsewhere) has tests of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import yaml

from chronorisk.paths import WorkPaths
from chronorisk.training import registry, tracking

REPO = Path(__file__).resolve().parents[2]
TASK = "complication_1y"
PATIENTS = 600


def chronorisk(work: Path, *args: str, params: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "chronorisk.cli", "--work", str(work)]
    if params is not None:
        cmd += ["--params", str(params)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def small_params(path: Path) -> Path:
    """params.yaml with fewer bootstrap resamples and boosting rounds: same code paths, less time."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"].update(min_group_cases=2)  # a tiny cohort: groups with 2 cases still shown
    params["evaluate"].update(bootstrap=20, leave_one_site_out=True)
    params["model"].update(num_boost_round=200, early_stopping_rounds=20)
    params["train"].update(allow_unfit=True)  # 600 patients: the mechanics are tested, not a model fit for use
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(work, params): a generated 600-patient cohort with its feature tables, and the small params file."""
    root = tmp_path_factory.mktemp("train-cli")
    work = root / "work"
    params = small_params(root / "params.yaml")
    chronorisk(work, "generate", "--patients", str(PATIENTS), params=params)
    chronorisk(work, "features", "--task", TASK, params=params)
    return work, params


@pytest.fixture(scope="module")
def trained(cohort):
    """Train and evaluate the task from the feature tables."""
    work, params = cohort
    train = chronorisk(work, "train", "--task", TASK, params=params)
    evaluate = chronorisk(work, "evaluate", "--task", TASK, params=params)
    return work, params, train, evaluate


def _tracking(work: Path) -> tracking.Tracking:
    return tracking.connect(tracking.default_tracking_uri(WorkPaths(work)))


def test_train_saves_the_bundle_logs_the_run_and_registers_a_challenger(trained):
    work, _, train, _ = trained
    assert f"{TASK}:" in train.stdout and "registered chronorisk-complication_1y version 1" in train.stdout
    bundle_dir = work / "models" / TASK
    assert {"booster.txt", "calibrator.json", "spec.json", "task.yaml", "bundle.json"} <= {
        p.name for p in bundle_dir.iterdir()
    }
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["version"] == "1" and meta["data_fingerprint"].startswith("sha256:")
    assert meta["training"]["n_train"] > 0 and meta["training"]["n_valid"] > 0

    track = _tracking(work)
    challenger = registry.get_version_by_alias(track, TASK, "challenger")
    assert challenger.version == 1 and registry.get_version_by_alias(track, TASK, "champion") is None
    run = track.client().get_run(challenger.run_id)
    assert run.info.run_id == meta["mlflow"]["run_id"]
    assert run.data.params["model.num_boost_round"] == "200"
    assert 0.0 <= run.data.metrics["tuning.auroc"] <= 1.0
    artifacts = {a.path for a in track.client().list_artifacts(run.info.run_id)}
    assert {"feature_spec", "task", "bundle", "evaluation"} <= artifacts
    # the embedded backend and the artifacts are in the work folder, nowhere else
    assert (work / "mlflow" / "mlflow.db").is_file() and any((work / "mlflow" / "artifacts").rglob("MLmodel"))
    assert not (REPO / "mlruns").exists()


def test_registered_version_scores_like_the_local_bundle(trained):
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.training.train import load_feature_tables

    work, _, _, _ = trained
    local = ModelBundle.load(work / "models" / TASK)
    fetched = registry.load_bundle(TASK, "challenger", paths=WorkPaths(work))
    rows = load_feature_tables(work / "features", TASK).split("held_out")
    assert np.array_equal(fetched.predict_risk(rows), local.predict_risk(rows))
    # and through MLflow's own pyfunc interface
    uri = tracking.default_tracking_uri(WorkPaths(work))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{registry.registered_name(TASK)}@challenger")
    assert np.allclose(np.asarray(model.predict(rows.to_pandas())), local.predict_risk(rows))


def test_evaluate_writes_reports_metrics_and_prints_the_table_per_site(trained):
    work, _, _, evaluate = trained
    doc = json.loads((work / "reports" / f"evaluation_{TASK}.json").read_text())
    validations = {r["validation"] for r in doc["records"]}
    assert "holdout" in validations and "leave_one_site_out" in validations
    overall = next(r for r in doc["records"] if r["validation"] == "holdout" and r["group"] == "all")
    for key in ("task", "site", "n", "auroc", "oracle_auroc", "mode", "calibration_slope", "ece"):
        assert key in overall
    # the generator's truth matches these rows: the oracle is reported, in realistic mode
    assert overall["mode"] == "realistic" and 0.5 < overall["oracle_auroc"] <= 1.0
    sites = sorted(p.name for p in (work / "meds" / "sites").iterdir())
    loso_sites = {r["site"] for r in doc["records"] if r["validation"] == "leave_one_site_out"}
    assert loso_sites <= set(sites) and len(loso_sites) >= 3

    html = (work / "reports" / f"evaluation_{TASK}.html").read_text()
    assert "<img" in html and "AUROC" in html
    card = (work / "reports" / f"model_card_{TASK}.md").read_text()
    assert card.startswith("# Model card: chronorisk-complication_1y (version 1)")
    metrics = json.loads((work / "metrics" / f"{TASK}.json").read_text())
    assert metrics["holdout"]["n"] == overall["n"] and "holdout_site" in metrics

    header = next(line for line in evaluate.stdout.splitlines() if line.startswith("task"))
    assert "site" in header and "AUROC" in header and "oracle" in header
    for site in {r["site"] for r in doc["records"] if r["validation"] == "holdout" and r["group"] == "site"}:
        assert site in evaluate.stdout

    track = _tracking(work)
    run = track.client().get_run(registry.get_version_by_alias(track, TASK, "challenger").run_id)
    assert run.data.metrics["eval.holdout.auroc"] == pytest.approx(overall["auroc"])
    evaluation = {a.path for a in track.client().list_artifacts(run.info.run_id, "evaluation")}
    assert f"evaluation/model_card_{TASK}.md" in evaluation and f"evaluation/evaluation_{TASK}.html" in evaluation


def test_no_identifier_leaves_in_outputs(trained):
    """Reports, metrics and the MLflow files carry aggregates, never subject ids of the cohort."""
    work, _, _, _ = trained
    ids = pl.read_parquet(work / "truth" / f"{TASK}.parquet")["subject_id"].unique().to_list()
    doc = json.loads((work / "reports" / f"evaluation_{TASK}.json").read_text())
    assert all("subject_id" not in r for r in doc["records"])
    text = (work / "reports" / f"model_card_{TASK}.md").read_text()
    assert "subject_id" not in text
    assert len(ids) > 100  # the check above is meaningful only with a real cohort


def test_promote_first_then_refuses_a_worse_candidate_then_accepts_a_version_again(trained, tmp_path):
    work, params, _, _ = trained
    first = chronorisk(work, "promote", "--task", TASK, params=params)
    assert "PROMOTED" in first.stdout and "no champion yet" in first.stdout
    track = _tracking(work)
    assert registry.get_version_by_alias(track, TASK, "champion").version == 1

    worse = _register_worse_candidate(work, params)
    refused = chronorisk(work, "promote", "--task", TASK, params=params, check=False)
    assert refused.returncode == 3, refused.stderr
    assert "REFUSED" in refused.stdout and "refused" in refused.stderr
    table = refused.stdout
    assert "candidate" in table and "champion" in table
    row = next(line for line in table.splitlines() if line.strip().startswith("version"))
    assert row.split()[1:] == [str(worse), "1"]
    assert registry.get_version_by_alias(track, TASK, "champion").version == 1
    record = json.loads((work / "reports" / f"promotion_{TASK}.json").read_text())
    assert record["accepted"] is False and record["champion"]["version"] == 1
    # worse by construction: it predicts the chance of *no* outcome, so its calibration and Brier score fail
    # whatever the small cohort's AUROCs are (see _register_worse_candidate)
    assert any(reason.startswith("ECE ") for reason in record["reasons"]), record["reasons"]
    assert any(reason.startswith("Brier ") for reason in record["reasons"]), record["reasons"]
    assert record["candidate"]["n"] == record["champion"]["n"]
    assert track.client().get_model_version(registry.registered_name(TASK), str(worse)).tags[
        "chronorisk.promotion"] == "refused"

    again = chronorisk(work, "promote", "--task", TASK, "--version", "1", params=params)
    assert "already the champion" in again.stdout


def _register_worse_candidate(work: Path, params_path: Path) -> int:
    """A model trained with every label inverted, with the champion's parameters, registered as the challenger.

    Worse by construction, not by luck: the booster learns the mirror image of
    the champion's (binary log loss is symmetric under flipping the labels, so
    with the same seed its margins are the champion's negated) and the
    calibrator maps them to P(no outcome). On the held-out rows its risks are
    about 1 - the champion's, so its AUROC is about 1 - the champion's, and
    with an outcome rate far below one half its mean risk is far above the
    observed rate: ECE and Brier score far above the champion's. (A model
    trained on shuffled labels was not reliably worse: on a 600-patient
    cohort the champion itself is weak and its held-out AUROC and ECE noisy.)
    """
    from chronorisk.config import load_params
    from chronorisk.training.train import load_feature_tables, train_task

    params = load_params(params_path)
    data = load_feature_tables(work / "features", TASK)
    assert data.frame["boolean_value"].mean() < 0.3  # the argument above needs a rare outcome
    data.frame = data.frame.with_columns(~pl.col("boolean_value"))
    result = train_task(data, params.model, params.train)
    folder = work / "worse-bundle"
    result.bundle.save(folder)
    track = tracking.configure_tracking(WorkPaths(work), experiment="chronorisk")
    return registry.register_bundle(track, folder, task=TASK, booster=result.bundle.booster).version


def test_meds_from_elsewhere_trains_and_evaluates_without_ground_truth(cohort, tmp_path):
    """--meds: features on the fly (spec fitted on the train split); another work folder has no truth."""
    work, params = cohort
    other = tmp_path / "work"
    meds = str(work / "meds")
    trained = chronorisk(other, "train", "--meds", meds, "--task", TASK, "--no-mlflow", params=params)
    # the fit on the fly drops what says nothing, as `chronorisk features` does, and says so
    assert f"{TASK}: dropped " in trained.stdout and "features that say nothing" in trained.stdout
    out = chronorisk(other, "evaluate", "--meds", meds, "--task", TASK, "--no-mlflow", "--bootstrap", "0",
                     "--no-temporal", "--no-leave-one-site-out", params=params)
    doc = json.loads((other / "reports" / f"evaluation_{TASK}.json").read_text())
    overall = next(r for r in doc["records"] if r["group"] == "all")
    assert overall["mode"] is None and overall["oracle_auroc"] is None and overall["n"] > 0
    assert {r["validation"] for r in doc["records"]} == {"holdout"}
    assert "oracle AUROC not reported" in out.stdout
    spec = json.loads((other / "models" / TASK / "spec.json").read_text())
    assert spec["fit_info"]["codes_in_summary"] > 0
    assert spec["fit_info"]["dropped"]["count"] > 0
    assert not set(spec["fit_info"]["dropped"]["features"]) & set(spec["feature_names"])


def test_external_labels_are_used_as_given(cohort, tmp_path):
    """--meds with --labels: the label file decides the rows (here: only 2023 prediction times)."""

    from chronorisk.data.meds_io import write_labels
    from chronorisk.features.labels import extract_labels
    from chronorisk.features.tasks import load_task
    from chronorisk.training.train import read_meds

    work, params = cohort
    events, _ = read_meds(work / "meds")
    labels = extract_labels(events, load_task(TASK)).filter(pl.col("prediction_time").dt.year() == 2023)
    write_labels(labels, tmp_path / "labels" / "part-0.parquet")
    other = tmp_path / "work"
    out = chronorisk(other, "train", "--meds", str(work / "meds"), "--labels", str(tmp_path / "labels"),
                     "--task", TASK, "--no-mlflow", params=params)
    meta = json.loads((other / "models" / TASK / "bundle.json").read_text())
    assert meta["training"]["first_prediction_time"].startswith("2023")
    assert meta["training"]["last_prediction_time"].startswith("2023")
    assert "registered" not in out.stdout and not (other / "mlflow" / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "--labels", "x", "--task", TASK), "--labels: needs --meds"),
        (("train", "--meds", "/nonexistent/meds", "--task", TASK), "--meds: /nonexistent/meds does not exist"),
        (("train", "--task", TASK, "--no-mlflow"), "run `chronorisk features` first"),
        (("train", "--task", "no_such_task", "--no-mlflow"), "task: 'no_such_task' is neither a built-in task"),
        (("evaluate", "--task", TASK, "--no-mlflow", "--models", "/nonexistent"), "--models:"),
        (("promote", "--task", TASK, "--version", "0"), "--version: registered versions start at 1"),
        (("train", "--tracking-uri", "ftp://x", "--task", TASK), "--tracking-uri: scheme 'ftp'"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, args, message):
    proc = chronorisk(tmp_path / "work", *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.postgres
def test_train_and_promote_with_postgres_as_the_tracking_backend(cohort, tmp_path):
    """The same commands with `--tracking-uri postgresql+psycopg://...` (a database of its own, dropped after)."""
    psycopg = pytest.importorskip("psycopg")
    database = "chronorisk_mlflow_cli_test"
    admin = "postgresql://postgres@127.0.0.1:5432/test"

    def sql(statement: str) -> None:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(statement)

    sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    sql(f"CREATE DATABASE {database}")
    try:
        work, params = cohort
        other = tmp_path / "work"
        uri = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
        features = str(work / "features")
        train = chronorisk(other, "train", "--task", TASK, "--features", features, "--tracking-uri", uri,
                           params=params)
        assert "registered chronorisk-complication_1y version 1" in train.stdout
        promote = chronorisk(other, "promote", "--task", TASK, "--features", features, "--tracking-uri", uri,
                             params=params)
        assert "PROMOTED" in promote.stdout
        assert not (other / "mlflow" / "mlflow.db").exists()  # nothing went to the embedded default
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}") as conn:
            rows = conn.execute("SELECT alias, version FROM registered_model_aliases ORDER BY alias").fetchall()
        assert rows == [("challenger", 1), ("champion", 1)]
    finally:
        sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
