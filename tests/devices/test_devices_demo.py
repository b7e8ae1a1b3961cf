"""The demo's home-device stage in a reduced form: a few seconds of one site's readings through a private
broker and `chronorisk stream`; the GP of that site finds the alerts on the worklist."""

from __future__ import annotations

import shutil

from devices_support import cli, count


def test_devices_demo_stage_ends_with_alerts_for_the_demo_gp(device_world, scored_store, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(device_world.devices, work / "devices")
    # the tiny world's site with the most devices (the demo's 20,000-patient cohort has many at every site)
    site = "hosp_central"
    out = cli(work, "devices", "--store", scored_store, "demo", "--minutes", "0.25", "--rate", "300", "--site", site,
              "--meds", str(device_world.meds), "--model-dir", str(device_world.models))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    first_site = site
    assert f"alert(s) at {first_site}" in out.stdout
    assert count(scored_store, f"SELECT count(*) FROM device_alerts WHERE site = '{first_site}'") > 0
    assert count(scored_store, "SELECT count(*) FROM device_readings") > 0
    assert (device_world.meds / "sites" / first_site / "data" / "home_devices.parquet").is_file()
