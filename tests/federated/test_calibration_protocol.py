"""Federated calibration from bins, the message codec, and the sites' quantile sketches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronorisk.federated import calibration as C
from chronorisk.federated.protocol import Payload, ProtocolError, from_records, to_records
from chronorisk.federated.site import auroc, merge_sketches
from chronorisk.training import metrics


def _rows(n, a, b, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(-1.5, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(a * s + b)))).astype(float)
    return s, y


def test_platt_on_bins_recovers_the_generating_map():
    s, y = _rows(200_000, 0.6, -0.4, 0)
    cal = C.fit_platt(C.BinnedScores.from_rows(s, y))
    assert cal.a == pytest.approx(0.6, abs=0.02)
    assert cal.b == pytest.approx(-0.4, abs=0.03)


def test_isotonic_on_bins_is_monotone_and_matches_rates():
    s, y = _rows(50_000, 1.3, 0.2, 1)
    cal = C.fit_isotonic(C.BinnedScores.from_rows(s, y))
    grid = np.linspace(-8, 5, 500)
    assert np.all(np.diff(cal(grid)) >= -1e-12)
    assert (cal(s) * 1.0).mean() == pytest.approx(y.mean(), abs=0.002)  # calibration in the large


def test_auto_prefers_platt_when_the_margin_is_logistic():
    s, y = _rows(4_000, 0.8, 0.1, 2)
    half = np.random.default_rng(3).random(s.size) < 0.5
    cal, info = C.choose_calibrator(C.BinnedScores.from_rows(s[half], y[half]),
                                    C.BinnedScores.from_rows(s[~half], y[~half]))
    assert info["method"] == "platt" and cal.method == "platt"
    assert {"cv_logloss_platt", "cv_logloss_isotonic"} <= set(info)


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
    cal = C.Calibrator("platt", a=1.0, b=0.0)
    got = C.binned_metrics(C.BinnedScores.from_rows(s, y), cal)
    p = cal(s)
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
        C.choose_calibrator(C.BinnedScores(), C.BinnedScores(), "beta")
    assert C.Calibrator.from_dict(C.Calibrator("platt", a=2, b=1).to_dict()).a == 2


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
