"""Drift and performance monitoring on hand-built feature frames: known answers, statuses, idempotency, labels.

The frames mimic the feature tables (a few measurement, demographic and
count features per site); the drift scenario on the real generator chain
is in test_monitor_scenario.py.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from chronorisk.serving import monitoring as M
from chronorisk.serving import monitoring_page as page
from chronorisk.serving.config import MonitorConfig
from chronorisk.serving.monitoring import judging as J
from chronorisk.serving.monitoring import run as R
from chronorisk.serving.monitoring import statistics as S
from chronorisk.serving.prediction_log import PredictionLog

FEATURES = ["age", "sex_female", "glucose_last_90d", "glucose_min_90d", "hba1c_last_365d", "sbp_mean_365d",
            "bmi_last_365d", "encounters_365d"]
INFOS = {
    "age": {"display": "Age", "unit": "years", "kind": "age", "grows_with_clock": True},
    "glucose_last_90d": {"display": "Fasting glucose, last value (90 days)", "unit": "mg/dL"},
    "glucose_min_90d": {"display": "Fasting glucose, lowest value (90 days)", "unit": "mg/dL"},
}
SITES = ("chc_a", "chc_b", "hosp_c")
KEY = b"monitor-test-key-0123456789abcdef"
START = datetime(2024, 1, 1)  # a Monday
WEEKS = 12
CHANGE_WEEK = 10  # first drifted window: 2024-W11


def _frame(rng, n: int, site: str, when: datetime, *, units: float = 0.0, older: float = 0.0) -> pl.DataFrame:
    """Features, risk, tier and outcome of `n` patients; `units` = share of glucose sent in mmol/L."""
    age = rng.normal(52 + older, 14, n)
    glucose = rng.normal(104, 22, n)
    measured = rng.uniform(size=n) < 0.45
    g_last = np.where(measured, glucose, np.nan)
    g_min = np.where(measured, glucose - np.abs(rng.normal(0, 6, n)), np.nan)
    moved = measured & (rng.uniform(size=n) < units / 0.45)
    g_last = np.where(moved, g_last / 18.016, g_last)
    g_min = np.where(moved, g_min / 18.016, g_min)
    z = -3.1 + 0.045 * (age - 52) + 0.03 * (glucose - 104)
    risk = 1 / (1 + np.exp(-z))
    return pl.DataFrame({
        "subject_id": rng.integers(1, 2**40, n), "prediction_time": [when] * n, "site": [site] * n,
        "age": age, "sex_female": (rng.uniform(size=n) < 0.52).astype(float),
        "glucose_last_90d": g_last, "glucose_min_90d": g_min, "hba1c_last_365d": rng.normal(5.7, 0.5, n),
        "sbp_mean_365d": rng.normal(131, 14, n), "bmi_last_365d": rng.normal(28, 5, n),
        "encounters_365d": rng.poisson(4, n).astype(float),
        "risk": risk, "tier": np.where(risk > 0.2, "high", np.where(risk > 0.05, "medium", "low")),
        "boolean_value": rng.uniform(size=n) < risk,
    })


def _reference(rng) -> M.Reference:
    parts = []
    for site in SITES:
        for when in (datetime(2022, 7, 1), datetime(2023, 1, 1), datetime(2023, 7, 1)):
            parts.append(_frame(rng, 2500, site, when).with_columns(pl.lit("train").alias("split")))
        parts.append(_frame(rng, 3000, site, datetime(2023, 7, 1)).with_columns(pl.lit("held_out").alias("split")))
    table = pl.concat(parts)
    return M.reference_from_frame(
        table.drop("risk"), table["risk"].to_numpy(), task="onset_2y", model_version="4", feature_names=FEATURES,
        importance={f: float(len(FEATURES) - i) for i, f in enumerate(FEATURES)}, infos=INFOS,
        rows_per_site=4000, recent_times=2, seed=0,
    )


def _log_weeks(log: PredictionLog, rng, *, weeks=WEEKS, n=700, outcomes=True) -> None:
    for w in range(weeks):
        for site in SITES:
            when = START + timedelta(days=7 * w + 2)
            drift = {}
            if w >= CHANGE_WEEK and site == "chc_b":
                drift = {"units": 0.08}
            if w >= CHANGE_WEEK and site == "hosp_c":
                drift = {"older": 9.0}
            frame = _frame(rng, n, site, when, **drift)
            log.append(frame.drop("boolean_value"), "onset_2y", "4", "batch", feature_names=FEATURES,
                       part=f"batch-{w}-{site}")
            if outcomes:
                log.append_outcomes(frame.select("subject_id", "prediction_time", "boolean_value"), "onset_2y",
                                    horizon=timedelta(days=730), part=f"labels-{w}-{site}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A logged year-start (12 weeks x 3 sites), monitored once without outcomes, HTML off."""
    work = tmp_path_factory.mktemp("monitor-world")
    rng = np.random.default_rng(20240101)
    reference = _reference(rng)
    log = PredictionLog.for_work(work, key=KEY)
    _log_weeks(log, rng, outcomes=True)
    config = MonitorConfig()
    opts = M.MonitorOptions(task="onset_2y", as_of=datetime(2024, 6, 1), html="none")
    section = M.run_monitor(log, reference, work / "monitoring", config, opts)
    return {"work": work, "log": log, "reference": reference, "config": config, "section": section}


# ------------------------------------------------------------------------ known answers
def test_windows_are_iso_weeks_and_days():
    w = M.window_of(datetime(2024, 12, 31, 15), "week")
    assert (w.start, w.end, w.label) == (datetime(2024, 12, 30), datetime(2025, 1, 6), "2025-W01")
    d = M.window_of(date(2024, 2, 29), "day")
    assert (d.start, d.end, d.label) == (datetime(2024, 2, 29), datetime(2024, 3, 1), "2024-02-29")
    assert [x.label for x in M.windows_for_days([date(2024, 1, 1), date(2024, 1, 7), date(2024, 1, 8)], "week")] \
        == ["2024-W01", "2024-W02"]
    with pytest.raises(Exception, match="'month' is not a window"):
        M.window_of(date(2024, 1, 1), "month")


def _baseline(values: np.ndarray, q: float = 0.005) -> M.FeatureBaseline:
    lo, hi = np.quantile(values, [q, 1 - q])
    return M.FeatureBaseline(values, values.size, 0.0, lo, hi, float(np.mean((values < lo) | (values > hi))),
                             values.mean(), values.std(), float(np.median(values)))


def _judge(current: np.ndarray, base: M.FeatureBaseline, name="x", config=None):
    config = config or MonitorConfig()
    b = M.SiteBaseline("s", False, base.n, {name: base}, np.array([]), {}, None)
    stats = M.screen_features(current.reshape(-1, 1), [name], b)[name]
    return M.judge_feature(name, current, current.size, stats, base, config, M.drift_scorer(config.stattest))


def test_a_shift_of_more_than_one_sd_is_a_severe_distribution_drift():
    rng = np.random.default_rng(1)
    base = _baseline(rng.normal(0, 1, 5000))
    same = _judge(rng.normal(0, 1, 2000), base)
    assert not same["drifted"] and same["wasserstein"] < 0.1
    half = _judge(rng.normal(0.5, 1, 2000), base)
    assert half["kinds"] == ["distribution"] and not half["severe"] and 0.4 < half["wasserstein"] < 0.6
    shifted = _judge(rng.normal(1.3, 1, 2000), base)
    assert shifted["kinds"][0] == "distribution" and shifted["severe"]
    assert 1.2 < shifted["wasserstein"] < 1.4


def test_a_small_shift_in_a_big_window_is_not_drift():
    """Significance alone is not enough: 0.1 SD is significant at n=20000 but below the effect size."""
    rng = np.random.default_rng(2)
    base = _baseline(rng.normal(0, 1, 20000))
    v = _judge(rng.normal(0.1, 1, 20000), base)
    assert v["ks_p"] < 1e-4 and not v["drifted"]


def test_normed_wasserstein_is_evidentlys():
    import pandas as pd
    from evidently.legacy.calculations.stattests import wasserstein_stat_test
    from evidently.legacy.core import ColumnType

    rng = np.random.default_rng(8)
    pairs = [(rng.normal(0, 1, 3000), rng.normal(0.4, 1.3, 700)), (rng.poisson(3, 500) * 1.0, rng.poisson(4, 90) * 1.0)]
    for a, b in pairs:
        ours = M.drift_scorer("wasserstein")(np.sort(a), np.sort(b))
        theirs = wasserstein_stat_test(pd.Series(a), pd.Series(b), ColumnType.Numerical, 0.1).drift_score
        assert ours == pytest.approx(theirs, rel=1e-9)
    psi = M.drift_scorer("psi")(np.sort(a), np.sort(b))  # other methods go through Evidently itself
    assert psi > 0


def test_ks_p_value_matches_scipy():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(7)
    a, b = np.sort(rng.normal(0, 1, 3000)), np.sort(rng.normal(0.08, 1, 1200))
    # scipy's "asymp" uses the finite-n Kolmogorov distribution at round(n*m/(n+m)): same to within 10%
    assert np.isclose(S.ks_p(a, b), ks_2samp(a, b, method="asymp").pvalue, rtol=0.1)
    assert np.isclose(S.ks_p(a, a), 1.0)
    # the fused pass of the default method (hand-written for speed) gives scipy's figures
    from scipy.stats import wasserstein_distance

    w, p = S.distance_and_p(M.drift_scorer("wasserstein"), a, b)
    assert w == pytest.approx(wasserstein_distance(a, b) / np.std(a), rel=1e-9)
    assert np.isclose(p, ks_2samp(a, b, method="asymp").pvalue, rtol=0.1)


def test_a_large_shift_in_a_tiny_sample_is_not_drift():
    """An effect size alone is not enough: 40 values can sit 0.3 SD off by chance."""
    rng = np.random.default_rng(3)
    base = _baseline(rng.normal(0, 1, 5000))
    hits = sum(_judge(rng.normal(0, 1, 35), base)["drifted"] for _ in range(30))
    assert hits == 0


def test_a_part_of_values_in_another_unit_is_out_of_range_with_a_unit_hint():
    rng = np.random.default_rng(4)
    base = _baseline(rng.normal(104, 22, 5000))
    current = rng.normal(104, 22, 1500)
    current[:120] /= 18.016  # 8% of the values sent in mmol/L
    ref = M.Reference("t", "1", ["glucose_last_90d"], {}, INFOS, pl.DataFrame(), pl.DataFrame())
    v = _judge(current, base, "glucose_last_90d")
    assert "out_of_range" in v["kinds"] and v["out_of_range_share"] > 0.07
    hint = J.unit_hint("glucose_last_90d", v, ref)
    assert hint and "mmol/L instead of mg/dL" in hint
    assert J.unit_hint("age", {**v, "feature": "age"}, ref) is None  # age has no unit factor


def test_missing_share_change_is_drift():
    rng = np.random.default_rng(5)
    values = rng.normal(0, 1, 4000)
    base = M.FeatureBaseline(values, 5000, 0.2, *np.quantile(values, [0.005, 0.995]), 0.01, 0.0, 1.0, 0.0)
    current = np.where(rng.uniform(size=3000) < 0.5, np.nan, rng.normal(0, 1, 3000))
    assert "missingness" in _judge(current, base)["kinds"]


def test_performance_figures_known_answers():
    rng = np.random.default_rng(6)
    p = rng.uniform(0.01, 0.6, 20000)
    y = (rng.uniform(size=p.size) < p).astype(float)
    perf = S.realized_performance(y, p, MonitorConfig())
    assert abs(perf["calibration_slope"] - 1) < 0.1 and abs(perf["calibration_intercept"]) < 0.1
    assert perf["ece"] < 0.015 and perf["ece_null_p"] > 0.01
    logit = np.log(p / (1 - p))
    over = 1 / (1 + np.exp(-2 * logit))  # overconfident: slope 0.5
    assert abs(S.realized_performance(y, over, MonitorConfig())["calibration_slope"] - 0.5) < 0.06
    # Hanley-McNeil: AUROC 0.5 with 100 positives and 100 negatives has SE ~0.041
    assert abs(S.auroc_se(0.5, 100, 100) - 0.0408) < 0.001
    assert S.realized_performance(y[:50], p[:50], MonitorConfig()) is None  # too few outcomes


# ------------------------------------------------------------------------ the scenario
def _history(section, site):
    return {h["window"]: h for h in section["sites"][site]["history"]}


def test_stable_site_stays_ok_for_every_window(world):
    hist = _history(world["section"], "chc_a")
    assert len(hist) == WEEKS
    assert {h["status"] for h in hist.values()} == {"ok"}
    for site in ("chc_b", "hosp_c"):  # the others before their change
        before = [h for h in _history(world["section"], site).values() if h["window"] < "2024-W11"]
        assert len(before) == CHANGE_WEEK and {h["status"] for h in before} == {"ok"}


def test_unit_change_alerts_in_the_first_window_naming_glucose(world):
    first = _history(world["section"], "chc_b")["2024-W11"]
    assert first["status"] == "alert"
    assert set(first["drifted_features"]) == {"glucose_last_90d", "glucose_min_90d"}
    result = json.loads((world["work"] / "monitoring" / first["json"]).read_text())
    assert any("mmol/L instead of mg/dL" in r for r in result["reasons"])
    assert any("glucose_last_90d" in r for r in result["reasons"])


def test_population_shift_alerts_naming_age_and_the_risk(world):
    first = _history(world["section"], "hosp_c")["2024-W11"]
    assert first["status"] == "alert"
    assert "age" in first["drifted_features"]
    result = json.loads((world["work"] / "monitoring" / first["json"]).read_text())
    assert result["prediction_drift"]["drifted"]
    assert any("prediction drift" in r for r in result["reasons"])


def test_json_holds_the_tests_and_no_identifier(world):
    path = world["work"] / "monitoring" / "reports" / "onset_2y" / "chc_b" / "2024-W11.json"
    result = json.loads(path.read_text())
    assert result["n_rows"] == 700 and result["tested"]
    dd = result["data_drift"]
    assert dd["method"] == "wasserstein" and dd["n_tested"] == len(FEATURES)  # fewer features than top_features
    glucose = next(v for v in dd["features"] if v["feature"] == "glucose_last_90d")
    assert glucose["out_of_range_share"] > 0.05 and glucose["severe"]
    assert result["performance"]["status"] == "pending"  # as_of before any outcome is known
    text = path.read_text()
    assert "subject_id" not in text and "join_key" not in text


def test_summary_metrics_and_status_per_site(world):
    summary = M.write_summary(world["work"] / "monitoring", "onset_2y", world["section"])
    sites = summary["tasks"]["onset_2y"]["week"]["sites"]
    assert {s: v["status"] for s, v in sites.items()} == {"chc_a": "ok", "chc_b": "alert", "hosp_c": "alert"}
    assert summary["overall_status"] == "alert"
    text = M.metrics_text(summary)
    assert 'chronorisk_monitor_drifted_feature_share{site="chc_b",task="onset_2y",window="week"}' in text
    assert 'chronorisk_monitor_status{site="chc_a",task="onset_2y",window="week"} 0.0' in text
    path = M.write_metrics(world["work"] / "monitoring", summary)
    assert path.read_text() == text


def test_collector_serves_the_latest_summary_on_a_registry(world):
    from prometheus_client import CollectorRegistry, generate_latest

    M.write_summary(world["work"] / "monitoring", "onset_2y", world["section"])
    registry = CollectorRegistry()
    registry.register(M.MonitoringCollector(world["work"] / "monitoring"))
    assert b'chronorisk_monitor_status{site="hosp_c",task="onset_2y",window="week"} 2.0' in generate_latest(registry)


def test_rerun_is_idempotent_and_leaves_files_untouched(world):
    reports = world["work"] / "monitoring" / "reports" / "onset_2y"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in reports.rglob("*.json")}
    opts = M.MonitorOptions(task="onset_2y", as_of=datetime(2024, 6, 1), html="none")
    again = M.run_monitor(world["log"], world["reference"], world["work"] / "monitoring", world["config"], opts)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in reports.rglob("*.json")}
    assert after == before
    assert again == world["section"]


def test_forced_recompute_gives_the_same_results(world, tmp_path):
    forced = M.run_monitor(world["log"], world["reference"], tmp_path / "monitoring", world["config"],
                           M.MonitorOptions(task="onset_2y", as_of=datetime(2024, 6, 1), html="none"))
    assert forced["sites"] == json.loads(json.dumps(world["section"]["sites"]).replace(
        str(world["work"]), str(tmp_path)))


def test_delayed_outcomes_give_realized_performance_per_window(world, tmp_path):
    opts = M.MonitorOptions(task="onset_2y", as_of=datetime(2026, 6, 1), html="none")
    section = M.run_monitor(world["log"], world["reference"], tmp_path / "monitoring", world["config"], opts)
    hist = _history(section, "chc_a")
    assert all(h["n_outcomes"] == 700 for h in hist.values())
    assert all(0.6 < h["auroc"] < 0.95 for h in hist.values())
    assert section["sites"]["chc_a"]["performance_to_date"]["n"] == 700 * WEEKS
    result = json.loads((tmp_path / "monitoring" / hist["2024-W05"]["json"]).read_text())
    perf = result["performance"]
    assert perf["status"] == "evaluated" and perf["reference"]["auroc"] > 0.6
    assert {"auroc", "auroc_se", "calibration_slope", "calibration_intercept", "ece", "brier"} <= set(perf)


def test_outcomes_that_contradict_the_model_raise_a_performance_alert(tmp_path):
    rng = np.random.default_rng(11)
    reference = _reference(rng)
    log = PredictionLog.for_work(tmp_path, key=KEY)
    for w in range(2):
        frame = _frame(rng, 1500, "chc_a", START + timedelta(days=7 * w))
        log.append(frame.drop("boolean_value"), "onset_2y", "4", "batch", feature_names=FEATURES)
        flipped = frame.with_columns((pl.col("risk") < 0.05).alias("boolean_value"))  # the low-risk fall ill
        outcomes = flipped if w == 1 else frame
        log.append_outcomes(outcomes.select("subject_id", "prediction_time", "boolean_value"), "onset_2y",
                            available_at=datetime(2025, 1, 1))
    section = M.run_monitor(log, reference, tmp_path / "monitoring", MonitorConfig(),
                            M.MonitorOptions(task="onset_2y", html="none"))
    hist = _history(section, "chc_a")
    assert hist["2024-W01"]["status"] == "ok"
    assert hist["2024-W02"]["status"] == "alert" and hist["2024-W02"]["auroc"] < 0.5
    assert any("realized AUROC" in r for r in section["sites"]["chc_a"]["reasons"])


def test_small_windows_are_not_tested_and_new_sites_use_the_pooled_reference(tmp_path):
    rng = np.random.default_rng(12)
    reference = _reference(rng)
    log = PredictionLog.for_work(tmp_path, key=KEY)
    log.append(_frame(rng, 30, "chc_a", START).drop("boolean_value"), "onset_2y", "4", "api",
               feature_names=FEATURES)
    log.append(_frame(rng, 800, "new_site", START).drop("boolean_value"), "onset_2y", "4", "api",
               feature_names=FEATURES)
    section = M.run_monitor(log, reference, tmp_path / "monitoring", MonitorConfig(),
                            M.MonitorOptions(task="onset_2y", html="none"))
    small = section["sites"]["chc_a"]
    assert small["status"] == "ok" and not small["tested"] and "not tested" in small["reasons"][0]
    new = json.loads((tmp_path / "monitoring" / section["sites"]["new_site"]["report_json"]).read_text())
    assert new["reference"]["pooled_sites"] and new["tested"]


def test_evidently_html_for_flagged_and_latest_windows(tmp_path):
    rng = np.random.default_rng(13)
    reference = _reference(rng)
    log = PredictionLog.for_work(tmp_path, key=KEY)
    for w, units in ((0, 0.0), (1, 0.1), (2, 0.0)):
        frame = _frame(rng, 600, "chc_b", START + timedelta(days=7 * w), units=units)
        log.append(frame.drop("boolean_value"), "onset_2y", "4", "batch", feature_names=FEATURES)
    section = M.run_monitor(log, reference, tmp_path / "monitoring", MonitorConfig(),
                            M.MonitorOptions(task="onset_2y", html="flagged"))
    folder = tmp_path / "monitoring" / "reports" / "onset_2y" / "chc_b"
    assert sorted(p.name for p in folder.glob("*.html")) == ["2024-W02.html", "2024-W03.html"]
    html = (folder / "2024-W02.html").read_text()
    assert "glucose_last_90d" in html and "Wasserstein distance (normed)" in html
    assert section["sites"]["chc_b"]["report_html"] == "reports/onset_2y/chc_b/2024-W03.html"


# ------------------------------------------------------------------------------ page
def test_page_lists_statuses_reasons_and_report_links(world):
    summary = M.write_summary(world["work"] / "monitoring", "onset_2y", world["section"])
    html = page.mlops_page(summary, report_url="/ui/mlops/reports")
    assert "Model monitoring" in html and "status-alert" in html and "status-ok" in html
    assert "chc_b" in html and "glucose_last_90d" in html and "mmol/L instead of mg/dL" in html
    assert 'href="/ui/mlops/reports/onset_2y/chc_b/2024-W11.json"' in html
    assert "<svg" in html and "<script" not in html


def test_page_escapes_what_it_shows():
    summary = {"tasks": {"t": {"week": {"sites": {"<b>x</b>": {
        "status": "alert", "window": "2024-W01", "reasons": ["<script>alert(1)</script>"], "n_rows": 5,
        "history": [], "drifted_features": ["<i>f</i>"]}}}}}}
    html = page.mlops_fragment(summary)
    assert "<script>alert" not in html and "&lt;script&gt;" in html and "<b>x</b>" not in html


def test_empty_page_says_what_to_run():
    assert "chronorisk monitor" in page.mlops_fragment({"tasks": {}})


def test_report_file_only_serves_reports(world):
    mon = world["work"] / "monitoring"
    assert page.report_file(mon, "onset_2y/chc_a/2024-W01.json") is not None
    assert page.report_file(mon, "reports/onset_2y/chc_a/2024-W01.json") is not None
    for bad in ("../summary.json", "onset_2y/../../metrics.prom", "/etc/passwd", "onset_2y/chc_a/x.parquet", ""):
        assert page.report_file(mon, bad) is None


# ------------------------------------------------------------- baselines and protocol
def test_reference_round_trip_keeps_its_identity(tmp_path):
    reference = _reference(np.random.default_rng(21))
    reference.save(tmp_path / "ref")
    loaded = M.Reference.load(tmp_path / "ref")
    assert loaded.fingerprint == reference.fingerprint
    assert loaded.drift.height == reference.drift.height and loaded.feature_names == FEATURES
    assert loaded.meta["trends"] == reference.meta["trends"]


def _trend_reference(rng) -> M.Reference:
    """Training data where `records_on_record` grows 3 a year, as counts of everything on record do."""
    parts = []
    for k, when in enumerate([datetime(2021, 1, 1), datetime(2022, 1, 1), datetime(2023, 1, 1), datetime(2024, 1, 1)]):
        frame = _frame(rng, 2000, "chc_a", when).with_columns(
            pl.Series("records_on_record", rng.poisson(10 + 3 * k, 2000).astype(float)), pl.lit("train").alias("split"))
        parts.append(frame)
    table = pl.concat(parts)
    names = [*FEATURES, "records_on_record"]
    return M.reference_from_frame(table.drop("risk"), table["risk"].to_numpy(), task="onset_2y", model_version="4",
                                  feature_names=names, importance={f: 1.0 for f in names},
                                  infos={"records_on_record": {"display": "Labs on record", "unit": "measurements"}},
                                  recent_times=1)


def test_features_that_grow_with_the_clock_are_reported_not_counted_against_training(tmp_path):
    rng = np.random.default_rng(22)
    reference = _trend_reference(rng)
    assert reference.meta["trends"]["chc_a"]["records_on_record"] == pytest.approx(3.0, abs=0.3)
    log = PredictionLog.for_work(tmp_path, key=KEY)
    frame = _frame(rng, 800, "chc_a", datetime(2025, 6, 3)).with_columns(
        pl.Series("records_on_record", rng.poisson(24, 800).astype(float)))  # 1.5 years after training
    log.append(frame.drop("boolean_value"), "onset_2y", "4", "batch", feature_names=[*FEATURES, "records_on_record"])
    section = M.run_monitor(log, reference, tmp_path / "monitoring", MonitorConfig(),
                            M.MonitorOptions(task="onset_2y", html="none"))
    result = json.loads((tmp_path / "monitoring" / section["sites"]["chc_a"]["report_json"]).read_text())
    assert result["status"] == "ok"
    assert result["data_drift"]["moved_with_calendar"] == ["records_on_record"]
    assert "records_on_record" in result["data_drift"]["calendar_features"]


def test_visit_scores_count_only_unit_changes_against_training(tmp_path):
    rng = np.random.default_rng(23)
    reference = _reference(rng)
    log = PredictionLog.for_work(tmp_path, key=KEY)
    older = _frame(rng, 600, "chc_a", START, older=12.0)  # visitors are older than "everyone on 1 January"
    log.append(older.drop("boolean_value"), "onset_2y", "4", "api", feature_names=FEATURES)
    units = _frame(rng, 600, "chc_b", START, units=0.15)
    log.append(units.drop("boolean_value"), "onset_2y", "4", "api", feature_names=FEATURES)
    section = M.run_monitor(log, reference, tmp_path / "monitoring", MonitorConfig(),
                            M.MonitorOptions(task="onset_2y", html="none"))
    visit = json.loads((tmp_path / "monitoring" / section["sites"]["chc_a"]["report_json"]).read_text())
    assert visit["status"] == "ok" and visit["data_drift"]["counts"] == "unit changes"
    assert "age" in visit["data_drift"]["moved_with_calendar"]  # reported all the same (age grows with the clock)
    assert section["sites"]["chc_b"]["status"] == "alert"
    assert any("another unit" in r for r in section["sites"]["chc_b"]["reasons"])


def test_a_sudden_change_against_recent_windows_alerts_and_is_named(tmp_path):
    rng = np.random.default_rng(24)
    reference = _reference(rng)
    log = PredictionLog.for_work(tmp_path, key=KEY)
    for w in range(6):
        frame = _frame(rng, 400, "chc_a", START + timedelta(days=7 * w + 3), older=12.0 if w == 5 else 0.0)
        log.append(frame.drop("boolean_value"), "onset_2y", "4", "api", feature_names=FEATURES)
    section = M.run_monitor(log, reference, tmp_path / "monitoring", MonitorConfig(),
                            M.MonitorOptions(task="onset_2y", html="none"))
    hist = _history(section, "chc_a")
    assert [hist[w]["status"] for w in sorted(hist)] == ["ok"] * 5 + ["alert"]
    last = json.loads((tmp_path / "monitoring" / hist["2024-W06"]["json"]).read_text())
    assert last["change"]["baseline_windows"] == ["2024-W02", "2024-W03", "2024-W04", "2024-W05"]
    assert "age" in last["change"]["drifted_features"]


def test_clock_driven_features_come_from_the_feature_spec():
    """Read from the spec's meaning (grows_with_clock, aggregate, kind), never from feature names."""
    from chronorisk.features.config import FeatureConfig
    from chronorisk.features.pipeline import fit_spec
    from chronorisk.serving.monitoring.reference import feature_infos

    spec = fit_spec(pl.DataFrame({"code": ["LOCAL//X1"], "n_subjects": [30]}), FeatureConfig(min_code_subjects=20))
    clock = M.clock_driven(feature_infos(spec))
    assert clock.elapsed["demo_age_years"] == 365.25
    first = [f for f in spec.clock_features() if spec.info(f).aggregate != "days_since_last"]
    assert first and all(f in clock.elapsed for f in first)  # ages and times since a first event
    assert not any(spec.info(f).aggregate == "days_since_last" for f in clock.elapsed)  # a visit resets those
    assert "miss_glucose_count" in clock.accumulating and "miss_glucose_count" not in clock.elapsed
    assert "meas_sbp_mean_365d" not in clock.accumulating
    renamed = {"x1": feature_infos(spec)["demo_age_years"], "age_like_name": {"display": "Age", "unit": "years"}}
    assert set(M.clock_driven(renamed).elapsed) == {"x1"}  # the meaning decides, not the name


def test_monitor_cli_refuses_clearly_without_logged_scores(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(tmp_path), "monitor"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no logged scores" in out.stderr and "Traceback" not in out.stderr
    bad = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(tmp_path), "monitor",
                          "--task", "onset_2y", "--start", "2025-13-01"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--start" in bad.stderr


def test_start_and_end_limit_the_windows(world, tmp_path):
    opts = M.MonitorOptions(task="onset_2y", start=datetime(2024, 1, 15), end=datetime(2024, 1, 29), html="none")
    section = M.run_monitor(world["log"], world["reference"], tmp_path / "monitoring", world["config"], opts)
    assert sorted(_history(section, "chc_a")) == ["2024-W03", "2024-W04"]


def test_a_rescored_patient_counts_once_with_the_latest_score():
    t = datetime(2024, 1, 2)
    rows = pl.DataFrame({
        "site": ["chc_a"] * 4, "prediction_time": [t] * 4, "model_version": ["4", "4", "4", "5"],
        "join_key": ["k1", "k1", "k2", "k1"], "risk": [0.1, 0.2, 0.3, 0.4],
        "scored_at": [t, t + timedelta(hours=1), t, t],
    })
    deduped = R.dedupe(rows)
    assert deduped.height == 3
    assert deduped.filter((pl.col("join_key") == "k1") & (pl.col("model_version") == "4"))["risk"].to_list() == [0.2]
    unique = rows.filter(pl.col("risk") != 0.1)
    assert R.dedupe(unique).equals(unique)  # nothing re-scored: the rows as logged


def test_impossible_values_alert_with_the_probable_unit_and_the_affected_features():
    """Known answers of the impossible-value test: 40 of 200 glucose values dropped (median 6.1, i.e. 110 mg/dL
    if mmol/L) against a training share of 1/1002 alerts; 2 of 200 (1 %) stays under impossible_share."""
    from chronorisk.serving.monitoring import inputs as I

    codes = {"LOINC//2339-0": {"display": "Fasting glucose", "unit": "mg/dL", "plausible": [10.0, 1500.0],
                               "features": ["meas_glucose_last", "meas_glucose_mean_90d"],
                               "n_values": 1000, "n_dropped": 0}}
    config = MonitorConfig()

    def checks(dropped: int, medians: list[float]) -> pl.DataFrame:
        per_day = [dropped - dropped // 2, dropped // 2]
        return pl.DataFrame({"date": [date(2025, 3, 3), date(2025, 3, 4)], "code": ["LOINC//2339-0"] * 2,
                             "n_values": [100, 100], "n_dropped": per_day, "dropped_median": medians})

    shifted = I.judge_inputs(checks(40, [6.1, 5.0]), codes, config)
    (v,) = shifted["codes"]
    assert (v["n_values"], v["n_dropped"], v["share"], v["flagged"]) == (200, 40, 0.2, True)
    assert v["reference_share"] == round(1 / 1002, 4) and v["dropped_median"] == 5.0  # 20 at 6.1, 20 at 5.0
    assert v["probable_unit"] == "mmol/L"
    assert shifted["affected_features"] == ["meas_glucose_last", "meas_glucose_mean_90d"]
    reason = I.describe(v)
    assert "40 of 200 (20.0%)" in reason and "probably mmol/L instead of mg/dL" in reason
    assert "meas_glucose_last" in reason
    stable = I.judge_inputs(checks(2, [4000.0, 3000.0]), codes, config)
    assert stable["codes"][0]["flagged"] is False and stable["affected_features"] == []
    assert I.probable_unit("LOINC//2339-0", 4000.0) is None  # no unit makes 4000 plausible glucose
