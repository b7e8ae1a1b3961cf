"""`chronorisk evaluate --new-site SITE` end to end on a small generated cohort, and its module's known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import yaml
from test_train_cli import chronorisk, small_params

from chronorisk.data.synth.new_site import JOINS, NEW_SITE_ID
from chronorisk.models.calibration import logit, sigmoid
from chronorisk.training import metrics as tm
from chronorisk.training.new_site_evaluation import (
    auroc_standard_error,
    ece_noise_floor,
    evaluate_new_site,
    label_free_windows,
    local_and_evaluation_rows,
)

TASK = "onset_2y"


@pytest.fixture(scope="module")
def new_site_work(tmp_path_factory):
    """A 1,500-patient cohort with the late-joining site, its features and a model trained with --no-mlflow
    (LightGBM only, 60 rounds, Platt: the mechanics are tested, not the model)."""
    root = tmp_path_factory.mktemp("new-site")
    work = root / "work"
    params = small_params(root / "params.yaml")
    raw = yaml.safe_load(params.read_text())
    raw["model"].update(kind="lightgbm", num_boost_round=60, early_stopping_rounds=10, calibration="platt",
                        calibration_folds=2)
    params.write_text(yaml.safe_dump(raw))
    chronorisk(work, "generate", "--new-site", "--patients", "1500", params=params)
    chronorisk(work, "features", "--task", TASK, params=params)
    chronorisk(work, "train", "--task", TASK, "--no-mlflow", params=params)
    return work, params


def test_evaluate_new_site_reports_before_label_free_and_recalibrated_figures(new_site_work):
    work, params = new_site_work
    proc = chronorisk(work, "evaluate", "--task", TASK, "--new-site", NEW_SITE_ID, "--cases", "5,10",
                      "--repeats", "2", "--no-mlflow", params=params)
    out = json.loads((work / "reports" / f"new_site_{NEW_SITE_ID}_{TASK}.json").read_text())
    assert out["site"] == NEW_SITE_ID and out["since"] == JOINS.isoformat()
    before = out["before_labels"]
    assert before["n"] == out["rows"] and 0 < before["cases"] == out["cases"]
    assert sum(w["n"] for w in out["by_window"]) == out["rows"]
    assert min(w["window"] for w in out["by_window"]) >= JOINS.isoformat()
    assert [r["local_cases"] for r in out["recalibrated"]] == [5, 10]
    for r in out["recalibrated"]:
        assert r["repeats"] == 2 and sum(r["updates"].values()) == 2
        for run in r["runs"]:
            assert run["local_cases"] >= r["local_cases"]
            assert run["update"] in ("none", "intercept", "intercept_slope")
            # the site layer is monotone: ranking, hence the realized AUROC, is the global model's
            assert run["after"]["auroc"] == run["before"]["auroc"]
    assert "trained on rows of" in " ".join(out["notes"])  # `chronorisk train` saw every site: said so
    assert f"site {NEW_SITE_ID} from {JOINS.isoformat()}" in proc.stdout and "after   5 local cases" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--new-site", "nowhere"], "--new-site: no rows of site 'nowhere'"),
    (["--new-site", NEW_SITE_ID, "--cases", "5,x"], "--cases: must be whole numbers"),
    (["--new-site", NEW_SITE_ID, "--since", "2099-01-01"], "--since: site chc_newregion has no rows"),
])
def test_bad_new_site_arguments_are_one_clear_line(new_site_work, args, message):
    work, params = new_site_work
    proc = chronorisk(work, "evaluate", "--task", TASK, "--no-mlflow", *args, params=params, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


# ---- the module's known answers ------------------------------------------------------------------------------------


def _site_rows(n_subjects: int, times: int, seed: int, *, shift: float = 0.5, slope: float = 0.8):
    """Rows of one site: each subject at `times` prediction times; outcomes ~ sigmoid(shift + slope logit(risk))."""
    rng = np.random.default_rng(seed)
    when = np.repeat(np.array([f"202{2 + t // 2}-{'01' if t % 2 == 0 else '07'}-01" for t in range(times)],
                              dtype="datetime64[D]"), n_subjects)
    subject = np.tile(np.arange(n_subjects), times)
    risk = sigmoid(rng.normal(-2.2, 1.0, when.size))
    y = (rng.random(when.size) < sigmoid(shift + slope * logit(risk))).astype(float)
    rows = pl.DataFrame({"prediction_time": when.astype("datetime64[us]"), "boolean_value": y.astype(bool),
                         "subject_id": subject})
    return rows, risk, y


def test_hanley_mcneil_standard_error_known_answer():
    """AUROC 0.5 with n1 cases and n0 non-cases: var = (0.25 + (n1-1)(1/3-1/4) + (n0-1)(1/3-1/4)) / (n1 n0)."""
    y = np.r_[np.ones(50), np.zeros(150)]
    score = np.r_[np.arange(50) % 2, np.arange(150) % 2].astype(float)  # half of each group high: AUROC 0.5
    assert float(tm.auroc(y, score)) == pytest.approx(0.5)
    expected = math.sqrt((0.25 + 49 / 12 + 149 / 12) / (50 * 150))
    assert auroc_standard_error(y, score) == pytest.approx(expected, rel=1e-12)


def test_ece_noise_floor_is_what_a_calibrated_model_scores_by_chance():
    """Exactly calibrated risks: the ECE of outcomes drawn from them sits at the floor, and it halves with 4x rows."""
    rng = np.random.default_rng(3)
    small, large = sigmoid(rng.normal(-2, 1, 2000)), sigmoid(rng.normal(-2, 1, 8000))
    f_small, f_large = ece_noise_floor(small, seed=1), ece_noise_floor(large, seed=1)
    assert f_large == pytest.approx(f_small / 2, rel=0.2)
    y = (np.random.default_rng(4).random(large.size) < large).astype(float)
    assert float(tm.ece(y, large)) == pytest.approx(f_large, abs=3 * f_large / 4)


def test_local_rows_come_first_and_evaluation_rows_are_other_patients_later():
    rows, _, y = _site_rows(400, 4, 5)
    times, subjects = rows["prediction_time"].to_numpy(), rows["subject_id"].to_numpy()
    local, ev = local_and_evaluation_rows(times, y, subjects, 30, seed=1)
    assert y[local].sum() == 30 and y[local][-1:].size  # exactly 30 cases (the last local row is the 30th)
    assert times[local].max() < times[ev].min()
    assert not set(subjects[local]) & set(subjects[ev])
    assert local_and_evaluation_rows(times, y, subjects, int(y.sum()) + 1, seed=1) is None


def test_label_free_windows_of_calibrated_risks_are_within_two_sd():
    """Outcomes drawn from the risks themselves: the estimate errs by chance only, within 2 SD in most windows."""
    rows, risk, y = _site_rows(3000, 4, 7, shift=0.0, slope=1.0)
    summary = label_free_windows(rows["prediction_time"].to_numpy(), y, risk, seed=2)
    assert summary.windows == 4 and summary.within_2sd >= 3
    for w in summary.detail:
        assert w.realized_auroc_sd == pytest.approx(w.outcome_sd, rel=0.35)  # two routes to the same chance spread
        assert w.recalibration_sd is None and w.error_sd == w.realized_auroc_sd


def test_recalibration_moves_a_shifted_site_and_its_estimate_carries_the_refits_spread():
    rows, risk, _ = _site_rows(2500, 4, 11, shift=0.6, slope=1.0)  # the model under-predicts: O/E about 1.6
    result = evaluate_new_site(rows, risk, site="new", since="2022-01-01", cases=(50,), repeats=2, seed=0,
                               min_window_rows=400, resamples=50)
    assert result.before_labels.observed_over_expected > 1.4
    after = result.recalibrated[0]
    assert after.updates.get("intercept", 0) + after.updates.get("intercept_slope", 0) == 2
    assert 0.8 < after.observed_over_expected_mean < 1.25
    assert after.ece_mean < result.before_labels.ece
    recal = result.label_free_recalibrated
    assert recal is not None and recal.windows >= 1
    assert all(w.recalibration_sd is not None and w.recalibration_sd > 0 for w in recal.detail)
    assert all(w.error_sd >= w.realized_auroc_sd for w in recal.detail)
    assert after.estimates_within_2sd == sum(1 for r in after.runs if r.estimate_within_2sd)
    for r in after.runs:  # each run's gap judged against both spreads
        bound = 2 * math.hypot(r.estimated_auroc_after_sd, r.realized_auroc_sd)
        assert r.estimate_within_2sd == (abs(r.estimated_auroc_after - r.realized_auroc) <= bound)
