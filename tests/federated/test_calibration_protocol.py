"""Federated calibration from bins (the models' calibration core), small-cell pooling, the message codec,
and the sites' quantile sketches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronorisk.federated import calibration as C
from chronorisk.federated.protocol import Payload, ProtocolError, from_records, to_records
from chronorisk.federated.site import auroc, merge_sketches
from chronorisk.models.calibration import PlattCalibrator, fit_calibrator, stratified_folds
from chronorisk.training import metrics


def _rows(n, a, b, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(-1.5, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(a * s + b)))).astype(float)
    return s, y


def _on_grid(n, a, b, seed, values=300):
    """Rows whose raw scores are bin centres of the shared grid: binning them loses nothing."""
    rng = np.random.default_rng(seed)
    centres = C.GRID_LOW + (np.arange(C.N_BINS - 2) + 0.5) * C.GRID_WIDTH
    grid = np.sort(rng.choice(centres[(centres > -6) & (centres < 3)], values, replace=False))
    s = grid[rng.integers(0, values, n)]
    y = (rng.random(n) < 1 / (1 + np.exp(-(a * s + b)))).astype(float)
    return s, y


def _same_calibrator(fed, cen):
    assert fed.method == cen.method
    assert fed.info["cross_fitted"]["isotonic_gain"] == pytest.approx(cen.info["cross_fitted"]["isotonic_gain"])
    grid = np.linspace(-8, 5, 701)
    np.testing.assert_allclose(fed.predict(grid), cen.predict(grid), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("shape", ["logistic", "step"])
def test_federated_and_central_calibration_agree_on_the_same_rows(shape):
    """Tables binned at full resolution, split like the central folds: the same calibrator, same choice."""
    s, y = _on_grid(40_000, 0.9, -0.5, 11, values=120)
    if shape == "step":  # a non-logistic map: isotonic wins by far more than two standard errors
        y = (np.random.default_rng(12).random(s.size) < np.where(s > -1.0, 0.6, 0.03)).astype(float)
    central = fit_calibrator(s, y, "auto", folds=2, seed=4)
    fold_of = stratified_folds(y, 2, 4)
    site = np.arange(s.size) % 3
    raw = [[C.BinnedScores.from_rows(s[(fold_of == k) & (site == j)], y[(fold_of == k) & (site == j)])
            for k in range(2)] for j in range(3)]
    site_tables = [[t.with_small_cells_pooled(5) for t in tables] for tables in raw]
    for sent, kept in zip(site_tables, raw, strict=True):
        for a, b in zip(sent, kept, strict=True):
            np.testing.assert_array_equal(a.n, b.n)  # every cell already holds 5 rows: pooling changed nothing
    folds = [C.sum_binned([tables[k] for tables in site_tables]) for k in range(2)]
    federated, info = C.fit_from_tables(folds, "auto")
    assert info["federated"] and info["method"] == ("platt" if shape == "logistic" else "isotonic")
    _same_calibrator(federated, central)


def test_no_calibrated_risk_is_exactly_0_or_1_from_tables():
    """Bins where nobody (or everybody) had the outcome: the federated isotonic map keeps off 0 and 1."""
    rng = np.random.default_rng(5)
    s = rng.normal(0, 2, 20_000)
    y = (s > 0.5).astype(float)  # separable: plain pool-adjacent-violators gives blocks at exactly 0 and 1
    y[rng.random(s.size) < 0.02] = 1.0
    halves = rng.random(s.size) < 0.5
    cal, _ = C.fit_from_tables([C.BinnedScores.from_rows(s[h], y[h]) for h in (halves, ~halves)], "isotonic")
    p = cal.predict(np.linspace(-20, 20, 2001))
    assert p.min() > 0 and p.max() < 1
    assert np.all(np.diff(p) >= 0)


def test_small_cells_are_pooled_before_a_table_leaves_the_site():
    rng = np.random.default_rng(6)
    s = rng.normal(-1, 2, 3000)
    y = (rng.random(s.size) < 0.2).astype(float)
    raw = C.BinnedScores.from_rows(s, y)
    assert ((raw.n > 0) & (raw.n < 5)).any()  # many thin cells before
    sent = raw.with_small_cells_pooled(5)
    assert not ((sent.n > 0) & (sent.n < 5)).any()
    assert sent.total == raw.total and sent.positives == raw.positives
    assert sent.score_sum.sum() == pytest.approx(raw.score_sum.sum())
    assert np.all(np.diff(sent.score_sum[sent.n > 0] / sent.n[sent.n > 0]) > 0)  # still in score order
    tiny = C.BinnedScores.from_rows(s[:4], y[:4]).with_small_cells_pooled(5)
    assert tiny.total == 0  # a site with fewer rows than a cell may hold sends nothing


def test_auto_prefers_platt_when_the_margin_is_logistic():
    s, y = _rows(4_000, 0.8, 0.1, 2)
    half = np.random.default_rng(3).random(s.size) < 0.5
    cal, info = C.fit_from_tables([C.BinnedScores.from_rows(s[half], y[half]),
                                   C.BinnedScores.from_rows(s[~half], y[~half])])
    assert info["method"] == "platt" and cal.method == "platt"
    assert cal.slope == pytest.approx(0.8, abs=0.1)
    assert {"platt", "isotonic", "isotonic_gain_se"} <= set(info["cross_fitted"])


def test_sums_of_site_bins_equal_bins_of_pooled_rows():
    s1, y1 = _rows(1000, 1, 0, 4)
    s2, y2 = _rows(700, 1, 0, 5)
    summed = C.BinnedScores.from_rows(s1, y1) + C.BinnedScores.from_rows(s2, y2)
    pooled = C.BinnedScores.from_rows(np.r_[s1, s2], np.r_[y1, y2])
    for field in ("n", "pos", "score_sum"):
        np.testing.assert_allclose(getattr(summed, field), getattr(pooled, field))


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0.2, max_value=3.0))
def test_binned_auroc_is_close_to_exact(seed, separation):
    rng = np.random.default_rng(seed)
    y = (rng.random(3000) < 0.2).astype(float)
    if y.min() == y.max():
        return
    s = rng.normal(separation * y, 1.0)
    assert C.binned_auroc(C.BinnedScores.from_rows(s, y)) == pytest.approx(auroc(y, s), abs=0.003)


def test_binned_metrics_agree_with_row_metrics():
    s, y = _rows(30_000, 1.0, 0.0, 6)
    cal = PlattCalibrator(intercept=0.0, slope=1.0)
    got = C.binned_metrics(C.BinnedScores.from_rows(s, y), cal)
    p = cal.predict(s)
    assert got["auroc"] == pytest.approx(metrics.auroc(y, p), abs=0.002)
    assert got["brier"] == pytest.approx(metrics.brier(y, p), abs=1e-4)
    assert got["calibration_slope"] == pytest.approx(metrics.calibration_slope(y, p), abs=0.02)
    assert got["ece"] == pytest.approx(metrics.ece(y, p), abs=0.005)
    assert got["n"] == s.size


def test_bad_bins_are_refused():
    n = np.zeros(C.N_BINS)
    with pytest.raises(ValueError, match="bins"):
        C.BinnedScores.from_arrays(n[:5], n[:5], n[:5])
    pos = n.copy()
    pos[3] = 2
    with pytest.raises(ValueError, match="inconsistent"):
        C.BinnedScores.from_arrays(n, pos, n)
    with pytest.raises(ValueError, match="not one of"):
        C.fit_from_tables([C.BinnedScores(), C.BinnedScores()], "beta")
    with pytest.raises(ValueError, match="no rows"):
        C.fit_from_tables([C.BinnedScores(), C.BinnedScores()], "auto")


def test_payload_round_trips_through_flower_records():
    payload = Payload(
        config={"site": "north", "tasks": {"t": {"n_train": 3}}, "span": ["2020-01-01", None]},
        blobs={"model:t": b"tree\n" * 1000},
        arrays={"t:held_out:n": np.arange(5.0), "codes": np.array([1, 2], dtype=np.int64)},
        metrics={"t.auroc": 0.75},
    )
    back = from_records(to_records(payload))
    assert back.config == payload.config
    assert back.blobs == payload.blobs
    np.testing.assert_array_equal(back.arrays["t:held_out:n"], payload.arrays["t:held_out:n"])
    assert back.metrics == {"t.auroc": 0.75}
    assert payload.nbytes() < 5000  # blobs are compressed on the wire


def test_foreign_records_are_refused():
    from flwr.app import ConfigRecord, RecordDict

    with pytest.raises(ProtocolError, match="no chronorisk config"):
        from_records(RecordDict({"x": ConfigRecord({"a": 1})}))
    with pytest.raises(ProtocolError, match="protocol version"):
        from_records(RecordDict({"config": ConfigRecord({"json": '{"protocol": 99}'})}))


def test_merged_sketches_approximate_pooled_quantiles():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0, 1, 4000), rng.normal(4, 2, 16000)
    qs = np.linspace(0, 1, 101)
    merged = merge_sketches([(np.quantile(a, qs), a.size), (np.quantile(b, qs), b.size)])
    truth = np.quantile(np.r_[a, b], qs)
    assert np.abs(merged - truth)[5:-5].max() < 0.15
    assert merged[0] == pytest.approx(truth[0]) and merged[-1] == pytest.approx(truth[-1])
    assert np.isnan(merge_sketches([])).all()


def test_site_layer_from_binned_tables_recalibrates_the_miscalibrated_site_only():
    rng = np.random.default_rng(9)
    cal = PlattCalibrator(intercept=0.0, slope=1.0)
    tables = {}
    for site, slope in (("home", 1.0), ("new", 0.5)):
        s = rng.normal(-2.0, 1.5, 6000)
        y = (rng.random(s.size) < 1 / (1 + np.exp(-slope * s))).astype(float)
        tables[site] = C.BinnedScores.from_rows(s, y).with_small_cells_pooled(5)
    tables["tiny"] = C.BinnedScores.from_rows(np.array([-2.0, -1.0, 0.5]), np.array([0.0, 0.0, 1.0]))
    layer = C.site_layer_from_tables(cal, tables)
    assert set(layer.sites) == {"home", "new"}  # too few cases: the global calibration
    assert layer.sites["home"].slope == pytest.approx(1.0, abs=0.1)
    assert layer.sites["new"].slope == pytest.approx(0.5, abs=0.1)
