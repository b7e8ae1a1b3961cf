"""`chronorisk devices export`: every stored reading into its site's MEDS data, for the next batch run.

Written whole and atomically as `<meds>/sites/<site>/data/home_devices.parquet` from the readings
table (the one source of truth), so re-running gives the same file and a reading is never in it
twice. Batch scoring and training read it with the site's other shards; the stream itself reads
readings from the table, never from this file.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from sqlalchemy import select

from chronorisk.data.meds_io import site_root, write_events
from chronorisk.devices.rescore import DEVICE_SHARD, readings_frame
from chronorisk.devices.tables import device_readings
from chronorisk.serving.store import ScoreStore


def export_readings(store: ScoreStore, meds_root: Path) -> dict[str, int]:
    """Events written per site (only sites that have MEDS data)."""
    cols = (device_readings.c.subject_id, device_readings.c.time, device_readings.c.code,
            device_readings.c.numeric_value, device_readings.c.text_value)
    with store.engine.connect() as conn:
        sites = [r[0] for r in conn.execute(select(device_readings.c.site).distinct()).all()]
        written = {}
        for site in sorted(sites):
            data = site_root(meds_root, site) / "data"
            if not data.is_dir():
                continue
            rows = conn.execute(select(*cols).where(device_readings.c.site == site)).all()
            frame = readings_frame([tuple(r) for r in rows])
            write_events(frame.cast({"numeric_value": pl.Float32}), data / DEVICE_SHARD)
            written[site] = frame.height
    return written
