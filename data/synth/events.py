"""Columnar event buffers shared by the simulator and the MEDS and FHIR writers.

An event is (patient index in the chunk, time in seconds since 1970 or null,
code, value in the *site's* unit, unit, text). Codes, units and texts are
small integer indices into the tables below, so a chunk of ten million
events is a handful of numpy arrays. Values stay in the site's units (what
the site's system would send, already rounded to the site's precision);
`meds_values()` converts them to the canonical unit with
`data.codes.Measurement` conversions, exactly as FHIR ingestion does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from chronorisk.data.codes import (
    BIRTH,
    DEATH,
    DIAGNOSES,
    ENCOUNTER_CLASSES,
    ENCOUNTER_PREFIX,
    MEASUREMENT_BY_CODE,
    MEASUREMENTS,
    MEDICATIONS,
    SEX_FEMALE,
    SEX_MALE,
    SMOKING_CURRENT,
    SMOKING_FORMER,
    SMOKING_NEVER,
    SMOKING_STATUS,
)

NULL_TIME = np.iinfo(np.int64).min

# Every code the generator can emit, sorted: the index is also the sort rank,
# so sorting by index sorts like the code strings (MEDS order subject, time, code).
CODES: tuple[str, ...] = tuple(sorted({
    SEX_FEMALE, SEX_MALE, BIRTH, DEATH, SMOKING_STATUS,
    *(ENCOUNTER_PREFIX + c for c in ENCOUNTER_CLASSES),
    *(MEASUREMENTS[name].code for name in (
        "sbp", "dbp", "hba1c", "glucose", "bmi", "ldl", "hdl", "total_chol", "creatinine", "egfr")),
    *(d.snomed for d in DIAGNOSES.values()), *(d.icd10 for d in DIAGNOSES.values()),
    *(m.code for m in MEDICATIONS.values()),
}))
CODE_INDEX = {c: i for i, c in enumerate(CODES)}
assert len(CODES) < 64, "the sort key keeps 6 bits for the code rank"

TEXTS: tuple[str, ...] = (SMOKING_NEVER[0], SMOKING_FORMER[0], SMOKING_CURRENT[0], SMOKING_CURRENT[2])
TEXT_INDEX = {t: i for i, t in enumerate(TEXTS)}

DAYS_UNIT = "d"


def _identity(v: np.ndarray) -> np.ndarray:
    return v


# Canonical -> site unit, and decimals the site reports (rounding happens in site units).
SITE_UNITS: dict[str, dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]]] = {
    "sbp": {"mm[Hg]": (_identity, 0), "mmHg": (_identity, 0)},
    "dbp": {"mm[Hg]": (_identity, 0), "mmHg": (_identity, 0)},
    "hba1c": {"%": (_identity, 1), "mmol/mol": (lambda v: (v - 2.152) / 0.09148, 0)},
    "glucose": {"mg/dL": (_identity, 0), "mmol/L": (lambda v: v / 18.016, 1)},
    "bmi": {"kg/m2": (_identity, 1)},
    "ldl": {"mg/dL": (_identity, 0), "mmol/L": (lambda v: v / 38.67, 2)},
    "hdl": {"mg/dL": (_identity, 0), "mmol/L": (lambda v: v / 38.67, 2)},
    "total_chol": {"mg/dL": (_identity, 0), "mmol/L": (lambda v: v / 38.67, 2)},
    "creatinine": {"mg/dL": (_identity, 2), "umol/L": (lambda v: v * 88.42, 0)},
    "egfr": {"mL/min/{1.73_m2}": (_identity, 0)},
}
UNITS: tuple[str, ...] = tuple(sorted({u for units in SITE_UNITS.values() for u in units} | {DAYS_UNIT}))
UNIT_INDEX = {u: i for i, u in enumerate(UNITS)}
assert len(UNITS) < 63, "meds_values packs the unit in 6 bits, 63 meaning none"


def to_site_unit(name: str, canonical: np.ndarray, unit: str) -> np.ndarray:
    """Canonical values of measurement `name` as the site reports them in `unit` (rounded)."""
    convert, decimals = SITE_UNITS[name][unit]
    return np.round(convert(np.asarray(canonical, dtype=np.float64)), decimals)


@dataclass
class EventArrays:
    """A chunk's events, unsorted; all arrays have the same length."""

    subject: np.ndarray  # int32 index of the patient in the chunk
    time: np.ndarray  # int64 seconds since 1970, NULL_TIME for static rows
    code: np.ndarray  # int16 index into CODES
    value: np.ndarray  # float64 value in site units, NaN when none
    unit: np.ndarray  # int8 index into UNITS, -1 when none
    text: np.ndarray  # int8 index into TEXTS, -1 when none

    def __len__(self) -> int:
        return int(self.subject.shape[0])

    def take(self, idx: np.ndarray) -> EventArrays:
        return EventArrays(*(getattr(self, f)[idx] for f in ("subject", "time", "code", "value", "unit", "text")))


class EventBuffer:
    """Appends events as arrays (scalars broadcast) and concatenates them once at the end."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, ...]] = []

    def add(
        self,
        subject: np.ndarray,
        time: np.ndarray | int,
        code: int | np.ndarray,
        value: np.ndarray | float | None = None,
        unit: int | np.ndarray | None = None,
        text: np.ndarray | int | None = None,
    ) -> None:
        n = subject.shape[0]
        if n == 0:
            return

        def col(x, dtype, fill):
            if x is None:
                return np.full(n, fill, dtype=dtype)
            arr = np.asarray(x, dtype=dtype)
            return np.broadcast_to(arr, (n,)).copy() if arr.ndim == 0 else arr

        self._parts.append((
            subject.astype(np.int32, copy=False),
            col(time, np.int64, NULL_TIME),
            col(code, np.int16, -1),
            col(value, np.float64, np.nan),
            col(unit, np.int8, -1),
            col(text, np.int8, -1),
        ))

    def arrays(self) -> EventArrays:
        if not self._parts:
            empty = [np.empty(0, dtype=d) for d in (np.int32, np.int64, np.int16, np.float64, np.int8, np.int8)]
            return EventArrays(*empty)
        cols = [np.concatenate([p[i] for p in self._parts]) for i in range(6)]
        self._parts = []
        return EventArrays(*cols)


def meds_values(events: EventArrays) -> np.ndarray:
    """MEDS numeric_value (float32, NaN = null): site values converted to canonical units.

    Uses the conversion functions of `data.codes` (the same arithmetic FHIR
    ingestion applies), one vectorized call per (code, unit) pair that needs one.
    """
    out = events.value.copy()
    pair = events.code.astype(np.int32) * 64 + (events.unit.astype(np.int32) & 63)
    counts = np.bincount(pair, minlength=len(CODES) * 64)
    for p in np.flatnonzero(counts):
        code, unit_i = CODES[p // 64], p % 64
        measurement = MEASUREMENT_BY_CODE.get(code)
        if measurement is None or unit_i == 63:
            continue
        unit = UNITS[unit_i]
        if unit == measurement.unit:
            continue
        if unit not in measurement.conversions:
            raise ValueError(f"unit {unit!r} for {code} has no conversion in data.codes")
        sel = pair == p
        out[sel] = measurement.conversions[unit](out[sel])
    return out.astype(np.float32)
