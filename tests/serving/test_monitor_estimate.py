"""Performance estimated without labels: known answers, and the estimate tracking realized AUROC under drift."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from chronorisk.serving import monitoring as M
from chronorisk.serving import monitoring_page as page
from chronorisk.serving.config import MonitorConfig
from chronorisk.serving.monitoring.estimate import estimate_performance, expected_auroc, with_realized
from chronorisk.serving.prediction_log import PredictionLog
from chronorisk.training import metrics as tm

KEY = b"estimate-test-key-0123456789abcdef"
START = datetime(2024, 1, 1)  # a Monday
TIERS = {"medium": 0.10, "high": 0.25}


def test_expected_auroc_known_answer_by_hand():
    """Risks 0.9, 0.5, 0.5, 0.1: expected positives 2.0 and negatives 2.0; the negative mass below each
    positive mass (ties count one half) sums to 0.1*0.45 + 1.0*(0.9 + 0.5) + 0.9*(1.9 + 0.05) = 3.2."""
    assert expected_auroc(np.array([0.5, 0.1, 0.9, 0.5])) == pytest.approx(3.2 / 4.0)


def test_expected_figures_are_the_metrics_of_rows_weighted_by_their_risk():
    """Each row as a positive of weight p and a negative of weight 1 - p: the evaluation's own AUROC on
    those rows is the expected AUROC, and the expected confusion counts give sensitivity and PPV."""
    rng = np.random.default_rng(0)
    p = 1 / (1 + np.exp(-rng.normal(-2.2, 1.1, 3000)))
    p[:300] = np.round(p[:300], 2)  # ties, as isotonic calibration makes them
    y = np.r_[np.ones_like(p), np.zeros_like(p)]
    w = np.r_[p, 1 - p]
    assert expected_auroc(p) == pytest.approx(float(tm.auroc(y, np.r_[p, p], w)), abs=1e-12)
    est = estimate_performance(p, TIERS, draws=50)
    medium = next(t for t in est.thresholds if t.tier == "medium")
    flagged = p >= 0.10
    assert medium.sensitivity == pytest.approx(p[flagged].sum() / p.sum(), abs=1e-4)
    assert medium.ppv == pytest.approx(p[flagged].mean(), abs=1e-4)
    assert est.prevalence == pytest.approx(p.mean(), abs=1e-4)


def test_spread_is_the_spread_of_realized_figures_when_calibrated():
    rng = np.random.default_rng(1)
    p = 1 / (1 + np.exp(-rng.normal(-2.0, 1.2, 1500)))
    est = estimate_performance(p, TIERS, draws=300, seed=2)
    realized = []
    for _ in range(300):
        y = (rng.random(p.size) < p).astype(float)
        realized.append(float(tm.auroc(y, p)))
    assert np.mean(realized) == pytest.approx(est.auroc, abs=0.003)
    assert est.auroc_spread.sd == pytest.approx(np.std(realized), rel=0.2)
    y = (rng.random(p.size) < p).astype(float)
    both = with_realized(est, y, p, float(tm.auroc(y, p)))
    high = next(t for t in both.thresholds if t.tier == "high")
    assert high.realized_sensitivity == pytest.approx(y[p >= 0.25].sum() / y.sum(), abs=1e-4)
    assert both.n_outcomes == p.size and both.realized_prevalence == pytest.approx(y.mean(), abs=1e-4)


# ------------------------------------------------------------------ known drift, end to end
def _frame(rng, n: int, when: datetime, spread: float) -> pl.DataFrame:
    """A calibrated model: risk = sigmoid(-2.3 + x), x ~ N(0, spread); outcomes drawn from the risk."""
    x = rng.normal(0.0, spread, n)
    risk = 1 / (1 + np.exp(-(-2.3 + x)))
    return pl.DataFrame({
        "subject_id": rng.integers(1, 2**40, n), "prediction_time": [when] * n, "site": ["chc_new"] * n,
        "x": x, "risk": risk, "tier": np.where(risk >= 0.25, "high", np.where(risk >= 0.10, "medium", "low")),
        "boolean_value": rng.uniform(size=n) < risk,
    })


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    """Six weeks at one site; from week 3 the case mix narrows (x spread 1.4 -> 0.6): AUROC falls, calibration holds."""
    work = tmp_path_factory.mktemp("estimate")
    rng = np.random.default_rng(7)
    train = pl.concat([_frame(rng, 3000, datetime(2023, 7, 1), 1.4).with_columns(pl.lit(s).alias("split"))
                       for s in ("train", "held_out")])
    reference = M.reference_from_frame(train.drop("risk"), train["risk"].to_numpy(), task="onset_2y",
                                       model_version="1", feature_names=["x"], importance={"x": 1.0},
                                       infos={"x": {"display": "x", "unit": ""}}, tiers=TIERS)
    log = PredictionLog.for_work(work, key=KEY)
    for w in range(6):
        frame = _frame(rng, 2000, START + timedelta(days=7 * w + 2), 1.4 if w < 3 else 0.6)
        log.append(frame.drop("boolean_value"), "onset_2y", "1", "batch", feature_names=["x"], part=f"b{w}")
        log.append_outcomes(frame.select("subject_id", "prediction_time", "boolean_value"), "onset_2y",
                            horizon=timedelta(days=730), part=f"y{w}")
    config = MonitorConfig(estimated_auroc_floor=0.75)
    opts = M.MonitorOptions(task="onset_2y", as_of=datetime(2026, 6, 1), html="none")
    section = M.run_monitor(log, reference, work / "monitoring", config, opts)
    results = [json.loads(p.read_text()) for p in sorted((work / "monitoring" / "reports" / "onset_2y" /
                                                          "chc_new").glob("*.json"))]
    return {"section": section, "results": results, "work": work}


def test_the_label_free_estimate_tracks_realized_auroc_under_known_drift(drifted):
    results = drifted["results"]
    assert len(results) == 6
    est = [r["estimated_performance"] for r in results]
    for e in est:  # each window: the realized AUROC within chance of the estimate made without labels
        assert e["realized_auroc"] is not None and e["n_outcomes"] == 2000
        assert abs(e["auroc"] - e["realized_auroc"]) < max(3 * e["auroc_spread"]["sd"], 0.03)
    before = np.mean([e["auroc"] for e in est[:3]])
    after = np.mean([e["auroc"] for e in est[3:]])
    realized_drop = np.mean([e["realized_auroc"] for e in est[:3]]) - np.mean([e["realized_auroc"] for e in est[3:]])
    assert before - after > 0.08  # the estimate saw the fall without a single label
    assert (before - after) == pytest.approx(realized_drop, abs=0.03)


def test_an_estimate_below_the_floor_alerts_with_its_reason(drifted):
    results = drifted["results"]
    assert all(r["estimated_performance"]["below_floor"] is None for r in results[:3])
    for r in results[3:]:
        assert r["estimated_performance"]["below_floor"] == "alert" and r["status"] == "alert"
        assert r["reasons"][0].startswith("estimated AUROC without labels")
        assert "below the floor 0.750" in r["reasons"][0]


def test_estimates_reach_the_summary_gauges_and_page(drifted):
    site = drifted["section"]["sites"]["chc_new"]
    est = site["estimated_performance"]
    assert est["auroc"] < 0.75 and {t["tier"] for t in est["thresholds"]} == {"medium", "high"}
    summary = M.write_summary(drifted["work"] / "monitoring", "onset_2y", drifted["section"])
    text = M.metrics_text(summary)
    assert f'chronorisk_monitor_estimated_auroc{{site="chc_new",task="onset_2y",window="week"}} {est["auroc"]}' \
        in text
    assert 'chronorisk_monitor_estimated_ppv{site="chc_new",task="onset_2y",tier="high",window="week"}' in text
    html = page.mlops_fragment(summary)
    assert "Estimated AUROC, no labels" in html and f"{est['auroc']:.3f}" in html and "below floor 0.75" in html
