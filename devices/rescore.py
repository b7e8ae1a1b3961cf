"""Re-scoring the patients a micro-batch touched, with the batch scorer's own functions.

A patient's events are their site's MEDS events (read once per patient and kept: they change
only with a new batch extract) plus every stored reading of theirs. Features, risks, tiers and
stored explanations come from `chronorisk.serving.scoring`'s public functions (the same
eligibility, `features.pipeline.transform` and bundle as batch and online scoring), all touched
patients of a site in one polars run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import polars as pl

from chronorisk.data.meds_io import EVENT_SCHEMA
from chronorisk.serving import scoring

DEVICE_SHARD = "home_devices.parquet"  # the readings exported to a site's MEDS data (`chronorisk devices export`)
TIER_RANK = {"low": 0, "medium": 1, "high": 2}


class BaseEvents:
    """Each patient's MEDS events without the exported device readings, loaded on first use."""

    def __init__(self, meds_root: Path | None, max_patients: int = 200_000):
        self.meds_root = meds_root
        self.max_patients = max_patients
        self._cache: dict[tuple[str, int], pl.DataFrame] = {}

    def frames(self, site: str, subjects: Iterable[int]) -> list[pl.DataFrame]:
        wanted = sorted(set(subjects))
        missing = [s for s in wanted if (site, s) not in self._cache]
        if missing:
            self._load(site, missing)
        return [self._cache[(site, s)] for s in wanted if self._cache[(site, s)].height]

    def _load(self, site: str, subjects: list[int]) -> None:
        if len(self._cache) + len(subjects) > self.max_patients:
            self._cache.clear()
        files = [f for f in self._shards(site) if f.name != DEVICE_SHARD]
        found: dict[int, pl.DataFrame] = {}
        if files:
            frame = (pl.scan_parquet(files).select(list(EVENT_SCHEMA))
                     .filter(pl.col("subject_id").is_in(subjects)).collect())
            found = {int(k[0]): v for k, v in frame.partition_by("subject_id", as_dict=True).items()}
        empty = pl.DataFrame(schema=EVENT_SCHEMA)
        for s in subjects:
            self._cache[(site, s)] = found.get(s, empty)

    def _shards(self, site: str) -> list[Path]:
        if self.meds_root is None:
            return []
        return scoring.site_shards(self.meds_root, site)


def readings_frame(rows: Sequence[tuple]) -> pl.DataFrame:
    """(subject_id, time, code, numeric_value, text_value) rows -> MEDS events."""
    cols = list(zip(*rows, strict=True)) if rows else [[], [], [], [], []]
    return pl.DataFrame(dict(zip(EVENT_SCHEMA.names(), cols, strict=True)), schema=EVENT_SCHEMA)


def score_patients(models: dict, events: pl.DataFrame, prediction_time: datetime, *, explain_tiers: Sequence[str],
                   top_k: int) -> list[dict]:
    """Score rows (subject_id, task, risk, tier, age_band, factors, model) of every eligible patient in `events`."""
    chosen = list(models.values())
    if not chosen or events.height == 0:
        return []
    # as batch scoring: only what was recorded before the prediction time, eligibility from each code's
    # first and last times
    events = events.filter(pl.col("time").is_null() | (pl.col("time") < prediction_time))
    summary = scoring.eligibility_events(events.lazy()).collect()
    indexes = scoring.eligible_indexes(chosen, summary, prediction_time)
    feats_by_model = scoring.features_of_events(chosen, events, indexes)
    rows: list[dict] = []
    for model, feats in zip(chosen, feats_by_model, strict=True):
        if feats is None or feats.height == 0:
            continue
        risk, tiers, _ = scoring.predict(model, feats, explain=False, top_k=top_k)
        factors, _ = scoring.stored_factors(model, feats, tiers, explain_tiers, top_k)
        bands = scoring.facts_from_features(model, feats, prediction_time)["age_band"].to_list()
        for sid, r, t, f, band in zip(feats["subject_id"].to_list(), risk.tolist(), tiers, factors.to_list(), bands,
                                      strict=True):
            rows.append({"subject_id": int(sid), "task": model.task, "risk": float(r), "tier": t, "factors": f,
                         "age_band": band, "model_name": model.name, "model_version": model.version})
    return rows


def tier_rose(before: str | None, after: str) -> bool:
    """A rise from low to medium or high, or from medium to high (no earlier score: no rise)."""
    return before is not None and TIER_RANK.get(after, 0) > TIER_RANK.get(before, 0)
