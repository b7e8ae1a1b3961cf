"""Home devices for a share of the generated patients, and their readings (`chronorisk generate --devices`).

Patients with hypertension or type 2 diabetes recorded before the reading window get a device
(a blood-pressure monitor; a glucometer too when diabetic) with the probability `share`. Over
the last `days` days of the cohort's span each device reads once a day, around the patient's
last clinic values: most patients stay stable (measurement noise), a third deteriorate
linearly (systolic +25 to +50 mmHg, glucose x1.4 to x2.0 by the window's end), which is what
moves risks and raises tiers in the demo. Deterministic from the seed.

Writes `<out>/devices/devices.parquet` (device_id, site, subject_id, kind) and
`<out>/devices/readings.parquet` (device_id, site, reading_id, time, kind, value, value2, unit;
`bp`: value systolic, value2 diastolic).
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from chronorisk.data.codes import MEASUREMENTS
from chronorisk.data.files import atomic_output
from chronorisk.data.meds_io import scan_site, site_ids

HYPERTENSION = ("SNOMED//38341003", "ICD10CM//I10")
DIABETES = ("SNOMED//44054006", "ICD10CM//E11.9")
DETERIORATING = 1 / 3


def write_devices(out: Path, share: float, seed: int, end: date, days: int = 60) -> tuple[int, int]:
    """Devices and readings of the cohort under `out/meds`; returns (devices, readings)."""
    devices, readings = simulate(out / "meds", share, seed, end, days)
    folder = Path(out) / "devices"
    for name, frame in (("devices.parquet", devices), ("readings.parquet", readings)):
        with atomic_output(folder / name) as tmp:
            frame.write_parquet(tmp)
    return devices.height, readings.height


def simulate(meds_root: Path, share: float, seed: int, end: date, days: int = 60) -> tuple[pl.DataFrame, pl.DataFrame]:
    if not 0 <= share <= 1:
        raise ValueError(f"share {share} must be between 0 and 1")
    start = datetime(end.year, end.month, end.day) - timedelta(days=days)
    devices, readings = [], []
    for site in site_ids(meds_root):
        people = _candidates(meds_root, site, start)
        rng = np.random.default_rng([seed, _site_number(site)])
        chosen = people.filter(pl.Series(rng.random(people.height) < share))
        for p in chosen.iter_rows(named=True):
            d, r = _patient_devices(p, site, seed, start, days, rng)
            devices += d
            readings += r
    return (pl.DataFrame(devices, schema={"device_id": pl.String, "site": pl.String, "subject_id": pl.Int64,
                                          "kind": pl.String}),
            pl.DataFrame(readings, schema={"device_id": pl.String, "site": pl.String, "reading_id": pl.String,
                                           "time": pl.Datetime("us"), "kind": pl.String, "value": pl.Float64,
                                           "value2": pl.Float64, "unit": pl.String}, orient="row"))


def _site_number(site: str) -> int:
    return int.from_bytes(hashlib.sha256(site.encode()).digest()[:4], "big")


def _candidates(meds_root: Path, site: str, start: datetime) -> pl.DataFrame:
    """Living patients diagnosed with hypertension or diabetes before `start`, with their last values."""
    sbp, dbp, glucose = (MEASUREMENTS[m].code for m in ("sbp", "dbp", "glucose"))
    before = scan_site(meds_root, site).filter(pl.col("time").is_null() | (pl.col("time") < start))
    per = before.group_by("subject_id").agg(
        pl.col("code").is_in(HYPERTENSION).any().alias("hypertension"),
        pl.col("code").is_in(DIABETES).any().alias("diabetes"),
        (pl.col("code") == "MEDS_DEATH").any().alias("dead"),
        *[pl.col("numeric_value").filter(pl.col("code") == code).last().alias(name)
          for name, code in (("sbp", sbp), ("dbp", dbp), ("glucose", glucose))],
    )
    return (per.filter((pl.col("hypertension") | pl.col("diabetes")) & ~pl.col("dead"))
            .sort("subject_id").collect())


def _patient_devices(p: dict, site: str, seed: int, start: datetime, days: int, rng) -> tuple[list, list]:
    tag = hashlib.sha256(f"{seed}:{site}:{p['subject_id']}".encode()).hexdigest()[:12]
    worse = rng.random() < DETERIORATING
    sbp0 = p["sbp"] or 135.0
    dbp0 = p["dbp"] or 85.0
    rise = rng.uniform(25, 50) if worse else 0.0
    devices = [{"device_id": f"bp-{tag}", "site": site, "subject_id": p["subject_id"], "kind": "bp"}]
    readings = []
    minutes = rng.integers(7 * 60, 9 * 60, size=days)
    for day in range(days):
        trend = (day + 1) / days
        s = float(np.clip(sbp0 + rise * trend + rng.normal(0, 8), 80, 260))
        d = float(np.clip(dbp0 + rise / 2 * trend + rng.normal(0, 5), 45, min(s - 15, 160)))
        when = start + timedelta(days=day, minutes=int(minutes[day]))
        readings.append((f"bp-{tag}", site, f"bp-{tag}-{day:04d}", when, "bp", round(s), round(d), "mm[Hg]"))
    if p["diabetes"]:
        devices.append({"device_id": f"gl-{tag}", "site": site, "subject_id": p["subject_id"], "kind": "glucose"})
        g0 = p["glucose"] or 140.0
        factor = rng.uniform(1.4, 2.0) if worse else 1.0
        for day in range(days):
            g = float(np.clip(g0 * (1 + (factor - 1) * (day + 1) / days) * rng.lognormal(0, 0.1), 50, 600))
            when = start + timedelta(days=day, minutes=int(minutes[day]) + 5)
            readings.append((f"gl-{tag}", site, f"gl-{tag}-{day:04d}", when, "glucose", round(g), None, "mg/dL"))
    return devices, readings
