"""Fixtures of the device-stream tests: a generated cohort with home devices and tiny models, a private
Mosquitto broker per test (persistence on, so that it can be restarted), and a store batch-scored once."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))

from devices_support import SECRET, cli

from chronorisk.devices.broker import PrivateBroker


@pytest.fixture(scope="session")
def device_world(tmp_path_factory):
    """1,200 generated patients, 20% of the diagnosed ones with devices, a tiny model per task, and a
    store batch-scored at 2025-07-01 with every device registered (copied per test by `scored_store`)."""
    from datetime import date

    from serving_support import generate_cohort, train_bundles

    from chronorisk.data.synth.devices import write_devices

    root = tmp_path_factory.mktemp("device-world")
    meds = generate_cohort(root, patients=1200)
    write_devices(root, 0.2, 7, date(2025, 12, 31))
    models = train_bundles(meds, root / "models")
    store = root / "store.db"
    url = f"sqlite:///{store}"
    work = root / "w"
    out = cli(work, "score", "--date", "2025-07-01", "--meds", str(meds), "--model-dir", str(models), "--store", url)
    assert out.returncode == 0, out.stderr[-2000:]
    out = cli(work, "devices", "--store", url, "register", "--file", str(root / "devices" / "devices.parquet"))
    assert out.returncode == 0, out.stderr[-2000:]
    return SimpleNamespace(root=root, meds=meds, models=models, store=store, devices=root / "devices")


@pytest.fixture
def scored_store(device_world, tmp_path):
    """A copy of the world's batch-scored store with the devices registered: (url, path)."""
    path = tmp_path / "store.db"
    shutil.copy(device_world.store, path)
    return f"sqlite:///{path}"


@pytest.fixture(autouse=True)
def _stop_consumers():
    """No consumer outlives its test, even a failed one."""
    from devices_support import STARTED

    yield
    while STARTED:
        STARTED.pop().stop()


@pytest.fixture
def broker(tmp_path):
    b = PrivateBroker(tmp_path / "broker").start()
    yield b
    b.stop()


__all__ = ["SECRET"]
