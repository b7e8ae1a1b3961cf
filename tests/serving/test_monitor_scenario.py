"""The drift scenario end to end: generator drift injection -> features -> model -> scores logged -> monitor CLI.

12,000 patients over 5 sites; from Monday 2025-03-03 chc_riverside sends
fasting glucose in mmol/L without saying so (`kind=units`) and hosp_east
gets a new catchment (`kind=population`). Scores are made as patients are
seen: every patient with an encounter in a week is scored the day after
(source `api`, as the service logs a GP's look-up), for 12 weeks before the
change and 2 after, in weekly windows. The monitor must alert on each drifted
site in the first window after the change (2025-W10), naming the drifted
features, and keep every window of the stable sites ok. The mmol/L glucose
values are impossible in mg/dL, so the features drop them: the monitor sees
them through the input checks logged beside the scores (as the service does).

Window sizes at this scale are 40-170 scores per site and week, so the
params used here lower `monitor.min_window_rows` to 40 (the smallest site,
chc_harbour, stays below it and is reported "not tested").
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TASK = "onset_2y"
CHANGE = datetime(2025, 3, 3)  # a Monday: 2025-W10 is the first window after the change
WEEKS_BEFORE = 12
UNITS_SITE, POPULATION_SITE = "chc_riverside", "hosp_east"
STABLE_SITES = ("hosp_central", "chc_hillview")


def _cli(work: Path, params: Path, *args: str) -> str:
    """`chronorisk <args>` through the CLI's entry point, in this process (as `chronorisk demo` runs its stages).

    In process, not a subprocess per stage: each fresh interpreter re-imports
    polars, LightGBM, MLflow and scipy (about 6 CPU-s, minutes of wall time on
    a loaded machine). The environment the CLI sets (tool homes under the work
    folder) is restored afterwards. Returns what the command printed.
    """
    from chronorisk.cli import main

    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--params", str(params), "--work", str(work), *args])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0, f"chronorisk {args[0]} failed (exit {code}):\n{err.getvalue()[-3000:]}"
    return out.getvalue()


def _score_visits(work: Path) -> int:
    """Score each patient seen in a week the day after the visit, as the service would, into the log."""
    from chronorisk.data.meds_io import site_ids
    from chronorisk.features import labels, pipeline
    from chronorisk.features.vocabulary import input_checks
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.serving.prediction_log import PredictionLog

    bundle = ModelBundle.load(work / "models" / TASK)
    log = PredictionLog.for_work(work)
    start, end = CHANGE - timedelta(weeks=WEEKS_BEFORE), CHANGE + timedelta(weeks=2)
    total = 0
    for site in site_ids(work / "meds"):
        events = pl.read_parquet(str(work / "meds" / "sites" / site / "data" / "*.parquet"))
        visits = (
            events.filter(pl.col("code").str.starts_with("ENCOUNTER//") & pl.col("time").is_between(start, end,
                                                                                                   closed="left"))
            .select("subject_id", (pl.col("time").dt.truncate("1d") + timedelta(days=1)).alias("prediction_time"))
            .with_columns(pl.col("prediction_time").dt.truncate("1w").alias("week"))
            .sort("prediction_time").unique(["subject_id", "week"], keep="first").drop("week")
            .filter(pl.col("prediction_time") < end)  # whole weeks only
        )
        seen = events.filter(pl.col("subject_id").is_in(visits["subject_id"].unique().implode())).lazy()
        days = sorted(visits["prediction_time"].unique().to_list())
        index = visits.join(labels.eligible_index(seen, bundle.task, days).collect(),
                            on=["subject_id", "prediction_time"]).sort("subject_id", "prediction_time")
        feats = pipeline.transform(bundle.spec, seen, index.lazy()).collect()
        risk = bundle.predict_risk(feats)
        records = feats.with_columns(pl.lit(site).alias("site"), pl.Series("risk", risk),
                                     pl.Series("tier", [str(t) for t in bundle.tier(risk)]))
        log.append(records, TASK, bundle.version, "api", model_name=bundle.name,
                   feature_names=list(bundle.feature_names), part=f"visits-{site}")
        log.append_input_checks(input_checks(bundle.spec, seen, index), TASK, site, part=f"visits-{site}")
        total += records.height
    return total


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift-scenario")
    work, params = root / "work", root / "params.yaml"
    settings = yaml.safe_load((REPO / "params.yaml").read_text())
    settings["labels"]["tasks"] = [TASK]
    # the model's quality is not the point: few trees, one calibration method
    settings["model"].update(num_boost_round=80, early_stopping_rounds=10, calibration="platt")
    settings["monitor"]["min_window_rows"] = 40
    params.write_text(yaml.safe_dump(settings))
    _cli(work, params, "generate", "--patients", "12000", "--seed", "5",
         "--drift", f"site={UNITS_SITE},from={CHANGE:%Y-%m-%d},kind=units",
         "--drift", f"site={POPULATION_SITE},from={CHANGE:%Y-%m-%d},kind=population")
    _cli(work, params, "features", "--task", TASK)
    _cli(work, params, "train", "--task", TASK, "--no-mlflow")
    scored = _score_visits(work)
    out = _cli(work, params, "monitor", "--task", TASK, "--model-dir", str(work / "models"), "--html", "none")
    summary = json.loads((work / "monitoring" / "summary.json").read_text())
    return {"work": work, "params": params, "scored": scored, "stdout": out,
            "sites": summary["tasks"][TASK]["week"]["sites"], "summary": summary}


def _windows(scenario, site) -> dict[str, dict]:
    return {h["window"]: h for h in scenario["sites"][site]["history"]}


def _result(scenario, site, window) -> dict:
    path = scenario["work"] / "monitoring" / "reports" / TASK / site / f"{window}.json"
    return json.loads(path.read_text())


def test_unit_change_alerts_in_the_first_window_naming_glucose(scenario):
    first = _windows(scenario, UNITS_SITE)["2025-W10"]
    assert first["status"] == "alert"
    glucose = [f for f in first["drifted_features"] if f.startswith("meas_glucose_")]
    assert glucose, first["drifted_features"]
    reasons = " ".join(_result(scenario, UNITS_SITE, "2025-W10")["reasons"])
    assert "mmol/L instead of mg/dL" in reasons and "meas_glucose_" in reasons


def test_population_shift_alerts_in_the_first_window_naming_features(scenario):
    first = _windows(scenario, POPULATION_SITE)["2025-W10"]
    assert first["status"] == "alert"
    assert len(first["drifted_features"]) >= 3
    result = _result(scenario, POPULATION_SITE, "2025-W10")
    assert result["change"]["baseline_windows"] == ["2025-W06", "2025-W07", "2025-W08", "2025-W09"]
    assert any(r.startswith("vs the previous 4 windows") for r in result["reasons"])


def test_drifted_sites_were_ok_before_the_change(scenario):
    for site in (UNITS_SITE, POPULATION_SITE):
        before = [h for w, h in _windows(scenario, site).items() if w < "2025-W10"]
        assert len(before) == WEEKS_BEFORE
        assert {h["status"] for h in before} == {"ok"}, [(h["window"], h["reasons"][:2]) for h in before
                                                         if h["status"] != "ok"]


def test_stable_sites_stay_ok_over_every_window(scenario):
    for site in STABLE_SITES:
        windows = _windows(scenario, site)
        tested = [h for h in windows.values() if h["tested"]]
        assert len(tested) >= 10, (site, len(tested))
        bad = [(h["window"], h["reasons"][:2]) for h in windows.values() if h["status"] != "ok"]
        assert not bad, (site, bad)
    assert scenario["sites"]["chc_harbour"]["status"] == "ok"  # too small to test at this scale


def test_cli_prints_statuses_and_writes_metrics(scenario):
    out = scenario["stdout"]
    assert f"{UNITS_SITE}" in out and "alert" in out and "overall status: alert" in out
    metrics = (scenario["work"] / "monitoring" / "metrics.prom").read_text()
    assert f'chronorisk_monitor_status{{site="{UNITS_SITE}",task="{TASK}",window="week"}} 2.0' in metrics
    assert f'chronorisk_monitor_status{{site="hosp_central",task="{TASK}",window="week"}} 0.0' in metrics
    # impossible values: a gauge per site and code, a line of the CLI, a table on the MLOps page
    assert f'chronorisk_monitor_impossible_value_share{{code="LOINC//2339-0",site="{UNITS_SITE}"' in metrics
    assert "impossible values dropped: Fasting glucose" in out
    from chronorisk.serving.monitoring_page import mlops_fragment

    html = mlops_fragment(scenario["summary"])
    assert "Impossible input values" in html and "alert: probably mmol/L" in html
    # no identifier reaches the monitoring folder (the log tests check distinctive ids byte for byte)
    for path in (scenario["work"] / "monitoring" / "log").rglob("*.parquet"):
        assert "subject_id" not in pl.read_parquet_schema(path), path
    for path in (scenario["work"] / "monitoring" / "reports").rglob("*.json"):
        assert b"subject_id" not in path.read_bytes(), path


def test_rerun_of_the_cli_changes_nothing(scenario):
    reports = scenario["work"] / "monitoring" / "reports"
    before = {p: p.stat().st_mtime_ns for p in reports.rglob("*.json")}
    _cli(scenario["work"], scenario["params"], "monitor", "--task", TASK,
         "--model-dir", str(scenario["work"] / "models"), "--html", "none")
    assert {p: p.stat().st_mtime_ns for p in reports.rglob("*.json")} == before
