"""Consent withdrawals as the MEDS data see them: one file per site dataset, read by every data consumer.

The score store (serving) records withdrawals and renewals; whenever they change, it writes the
subjects whose withdrawal is in effect at a site to that site's
`metadata/consent_withdrawn.parquet` (`write_site_withdrawn`). `features.sources.SiteSource` leaves
their events and split rows out, so `labels`, `features`, `train`, `evaluate`, `summary` and the
federated sites (each reading its own dataset) exclude them from the next run on. A site whose
records live on another machine gets the file from `chronorisk access withdrawn --meds ROOT` there.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import polars as pl

from chronorisk.data.files import atomic_output

CONSENT_FILE = Path("metadata") / "consent_withdrawn.parquet"
SCHEMA = {"subject_id": pl.Int64}


def withdrawn_path(site_dir: Path) -> Path:
    return Path(site_dir) / CONSENT_FILE


def read_site_withdrawn(site_dir: Path) -> pl.DataFrame:
    """subject_id of every withdrawal in effect at this site dataset (empty when there is no file)."""
    path = withdrawn_path(site_dir)
    if not path.is_file():
        return pl.DataFrame(schema=SCHEMA)
    return pl.read_parquet(path, columns=["subject_id"]).with_columns(pl.col("subject_id").cast(pl.Int64))


def write_site_withdrawn(site_dir: Path, subject_ids: Iterable[int]) -> int:
    """Replace the site's withdrawn list (sorted, atomically); returns how many subjects it holds."""
    frame = pl.DataFrame({"subject_id": sorted({int(s) for s in subject_ids})}, schema=SCHEMA)
    path = withdrawn_path(site_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        frame.write_parquet(tmp)
    return frame.height
