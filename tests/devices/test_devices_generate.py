"""`chronorisk generate --devices SHARE`: a deterministic share of diagnosed patients get devices and readings."""

from __future__ import annotations

import polars as pl
from devices_support import cli


def test_generate_with_devices(tmp_path):
    work = tmp_path / "w"
    bad = cli(work, "generate", "--patients", "300", "--devices", "1.5")
    assert bad.returncode == 2 and "--devices" in bad.stderr and "between 0 and 1" in bad.stderr
    out = cli(work, "generate", "--patients", "600", "--workers", "1", "--devices", "0.5", "--seed", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "home devices:" in out.stdout
    devices = pl.read_parquet(work / "devices" / "devices.parquet")
    found = pl.read_parquet(work / "devices" / "readings.parquet")
    assert devices.height > 0 and devices["device_id"].n_unique() == devices.height
    assert set(found["device_id"]) == set(devices["device_id"])
    assert found["reading_id"].n_unique() == found.height
    bp = found.filter(pl.col("kind") == "bp")
    assert (bp["value"] > bp["value2"]).all()  # systolic above diastolic
    # diagnosed patients only, about half of them, and the same again from the same seed
    from chronorisk.data.synth.devices import simulate

    again, readings_again = simulate(work / "meds", 0.5, 3, __import__("datetime").date(2025, 12, 31))
    assert again.equals(devices) and readings_again.equals(found)
