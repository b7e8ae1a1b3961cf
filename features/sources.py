"""Where a MEDS root's sites, shards and splits are, for the labels and features commands.

A root is either ours (`<root>/sites/<site>/data/*.parquet`, one dataset per
site) or a single MEDS dataset from elsewhere (`<root>/data/...`), which is
then one site named after its folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import meds
import polars as pl

from chronorisk.data.consent import read_site_withdrawn
from chronorisk.data.meds_io import site_ids, split_of
from chronorisk.errors import InputError


@dataclass(frozen=True)
class SiteSource:
    site: str
    root: Path  # the MEDS dataset folder (holds data/ and metadata/)

    @property
    def shards(self) -> list[Path]:
        return sorted((self.root / meds.data_subdirectory).glob("**/*.parquet"))

    def scan(self) -> pl.LazyFrame:
        """The site's events, without those of patients whose consent withdrawal is in effect
        (`data/consent.py`)."""
        shards = self.shards
        if not shards:
            raise InputError(str(self.root), "no MEDS data shards (data/*.parquet)")
        events = pl.scan_parquet(shards)
        withdrawn = read_site_withdrawn(self.root)
        return events.join(withdrawn.lazy(), on="subject_id", how="anti") if withdrawn.height else events

    def splits(self) -> pl.DataFrame:
        """subject_id -> split, from metadata/subject_splits.parquet, else the deterministic default; never
        a subject whose consent withdrawal is in effect."""
        path = self.root / meds.subject_splits_filepath
        if path.is_file():
            splits = pl.read_parquet(path, columns=["subject_id", "split"]).with_columns(
                pl.col("subject_id").cast(pl.Int64)
            )
            withdrawn = read_site_withdrawn(self.root)
            return splits.join(withdrawn, on="subject_id", how="anti") if withdrawn.height else splits
        ids = self.scan().select(pl.col("subject_id").unique()).collect()
        return ids.with_columns(split_of(pl.col("subject_id")).alias("split"))


def find_sites(root: Path, only: list[str] | None = None) -> list[SiteSource]:
    """The sites of a MEDS root (ours or a single dataset from elsewhere), optionally a subset."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(str(root), "MEDS root does not exist")
    names = site_ids(root)
    if names:
        found = [SiteSource(s, root / "sites" / s) for s in names]
    elif (root / meds.data_subdirectory).is_dir():
        found = [SiteSource(root.name, root)]
    else:
        raise InputError(str(root), "no MEDS data: expected sites/<site>/data/ or data/ below it")
    if only:
        unknown = sorted(set(only) - {s.site for s in found})
        if unknown:
            raise InputError("--sites", f"unknown site(s) {', '.join(unknown)}; present: "
                             f"{', '.join(s.site for s in found)}")
        found = [s for s in found if s.site in only]
    return found
