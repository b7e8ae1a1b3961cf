"""MEDS output of the generator: one data shard per site per chunk, plus metadata per site.

The shards hold exactly the MEDS 0.4 data schema (`meds.DataSchema`) and
the row order `meds_io.write_events` produces (subject, then time with
static rows first, then code), but are built straight from the numpy event
arrays: one integer sort key instead of a three-column sort, and codes and
texts materialized by `take` from small dictionaries. Same seed, same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from chronorisk.data.codes import display_for
from chronorisk.data.files import atomic_output
from chronorisk.data.meds_io import write_metadata
from chronorisk.data.synth.events import CODES, NULL_TIME, TEXTS, EventArrays, meds_values

_T0 = int((datetime(1900, 1, 1) - datetime(1970, 1, 1)).total_seconds())
_SUBJECT_SHIFT, _TIME_SHIFT = 40, 6
_ARROW_SCHEMA = meds.DataSchema.schema()
_CODE_DICT = pa.array(CODES, type=pa.string())
_TEXT_DICT = pa.array(TEXTS, type=pa.large_string())

CODE_DESCRIPTIONS_EXTRA = {
    "GENDER//F": "Sex: female",
    "GENDER//M": "Sex: male",
    "MEDS_BIRTH": "Birth",
    "MEDS_DEATH": "Death",
    "ENCOUNTER//AMB": "Ambulatory encounter",
    "ENCOUNTER//EMER": "Emergency encounter",
    "ENCOUNTER//IMP": "Inpatient encounter",
    "LOINC//72166-2": "Tobacco smoking status",
}


def sort_order(events: EventArrays) -> np.ndarray:
    """Permutation sorting events by (patient, time with static rows first, code)."""
    if len(events) and int(events.subject.max()) >= 1 << (63 - _SUBJECT_SHIFT):
        raise ValueError("chunk too large for the sort key")
    t = events.time
    rel = np.where(t == NULL_TIME, 0, t - _T0 + 1)
    if len(events) and (rel.min() < 0 or rel.max() >= 1 << (_SUBJECT_SHIFT - _TIME_SHIFT)):
        raise ValueError("event time outside 1900-2444")
    key = (events.subject.astype(np.int64) << _SUBJECT_SHIFT) | (rel << _TIME_SHIFT) | events.code.astype(np.int64)
    return np.argsort(key)  # keys are unique per event in practice; quicksort is deterministic anyway


def events_table(events: EventArrays, subject_ids: np.ndarray) -> pa.Table:
    """Sorted events as an arrow table with the exact MEDS data schema.

    `subject_ids[i]` is the MEDS subject_id of chunk patient i.
    """
    t = events.time
    null_time = t == NULL_TIME
    micros = np.where(null_time, 0, t) * 1_000_000
    values = meds_values(events)
    text_idx = events.text.astype(np.int32)
    columns = {
        "subject_id": pa.array(subject_ids[events.subject], type=pa.int64()),
        "time": pa.array(micros, type=pa.timestamp("us"), mask=null_time),
        "code": pc.take(_CODE_DICT, pa.array(events.code.astype(np.int32))),
        "numeric_value": pa.array(values, type=pa.float32(), mask=np.isnan(values)),
        "text_value": pc.take(_TEXT_DICT, pa.array(text_idx, mask=text_idx < 0)),
    }
    return pa.table(columns, schema=_ARROW_SCHEMA)


def write_shard(table: pa.Table, path: Path) -> None:
    """One MEDS data shard, written atomically (zstd, fixed writer options: deterministic bytes)."""
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["code", "text_value"],
                       row_group_size=1 << 20)


def write_site_metadata(
    site_dir: Path,
    *,
    site_id: str,
    subject_ids: np.ndarray,
    codes: Iterable[str],
    extra: dict,
) -> None:
    """codes.parquet, dataset.json and subject_splits.parquet for one generated site."""
    descriptions = {c: CODE_DESCRIPTIONS_EXTRA.get(c) or display_for(c) for c in sorted(codes)}
    write_metadata(
        site_dir,
        dataset_name=f"chronorisk-synthetic-{site_id}",
        etl_name="chronorisk.generate",
        subject_ids=subject_ids,
        code_descriptions=descriptions,
        extra=extra,
    )
