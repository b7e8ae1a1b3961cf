"""Concurrent one-patient requests share one run of the feature pipeline (group commit).

For one patient the feature transform's cost is almost all per-query overhead
(each of its ~100 polars operations costs 40-100 µs whatever the frame's size),
so k patients in one run cost little more than one. A request thread queues
its patient and, if no run is going on, runs the queue itself; requests that
arrive meanwhile wait and are run together by the next one in line. Nothing
waits for company: a request alone is run at once (the plain one-patient path),
so latency at low load is unchanged.

The batch is the batch path itself (the same `eligible_index` and `transform`
as training and nightly scoring, over the patients' events side by side, each
under its own subject id), so a patient's features are those of a run of its
own: every feature of a row is computed from that row's events only
(tests/serving/test_serving_scoring.py compares the two on many patients).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

MAX_PATIENTS = 32  # per run: well within the pipeline's few-rows path (features.families.FEW_ROWS)


@dataclass(eq=False)
class _Job:
    models: tuple
    events: pl.DataFrame
    prediction_time: datetime
    wake: threading.Event = field(default_factory=threading.Event)
    result: list | None = None
    error: BaseException | None = None
    finished: bool = False


class PatientBatcher:
    """`features(models, events, time)`: each model's feature frame of one patient (None where the patient
    is not in the task population), computed together with whatever other requests are waiting."""

    def __init__(self, max_patients: int = MAX_PATIENTS):
        self.max_patients = max_patients
        self._lock = threading.Lock()
        self._pending: list[_Job] = []
        self._busy = False
        self.runs = 0  # runs of the pipeline, and patients they held (read by tests and benchmarks)
        self.patients = 0

    def features(self, models: Sequence, events: pl.DataFrame, prediction_time: datetime) -> list:
        job = _Job(tuple(models), events, prediction_time)
        with self._lock:
            self._pending.append(job)
            lead = not self._busy
            self._busy = True
        while not lead:
            job.wake.wait()
            job.wake.clear()
            if job.finished:
                return _outcome(job)
            lead = True  # the previous runner handed the queue over
        with self._lock:
            batch, self._pending = self._pending[: self.max_patients], self._pending[self.max_patients:]
        try:
            self._run(batch)
        finally:
            with self._lock:
                if self._pending:
                    self._pending[0].wake.set()  # the next in line runs the queue
                else:
                    self._busy = False
        return _outcome(job)

    def _run(self, batch: list[_Job]) -> None:
        groups: dict[tuple, list[_Job]] = {}
        for job in batch:
            groups.setdefault(tuple(id(m) for m in job.models), []).append(job)
        for jobs in groups.values():
            try:
                results = features_together(jobs[0].models, [j.events for j in jobs],
                                            [j.prediction_time for j in jobs])
                for job, result in zip(jobs, results, strict=True):
                    job.result = result
            except BaseException as exc:  # every waiting request gets the failure, not a hang
                for job in jobs:
                    job.error = exc
            with self._lock:
                self.runs += 1
                self.patients += len(jobs)
            for job in jobs:
                job.finished = True
                job.wake.set()


def _outcome(job: _Job) -> list:
    if job.error is not None:
        raise job.error
    return job.result


def features_together(models: Sequence, events: Sequence[pl.DataFrame], times: Sequence[datetime]) -> list[list]:
    """Per patient, each model's feature frame (one row) or None, from one run over every patient's events.

    Patient k's events run under subject id k; its rows get its own subject id back."""
    from chronorisk.serving.scoring import eligible_indexes, features_of_events

    if len(events) == 1:
        return [features_of_events(models, events[0], eligible_indexes(models, events[0], times[0]))]
    originals = [e.get_column("subject_id")[0] if e.height else 0 for e in events]
    together = pl.concat(
        [e.with_columns(pl.lit(k, dtype=pl.Int64).alias("subject_id")) for k, e in enumerate(events)],
        how="diagonal_relaxed",  # frames from different paths may differ in value columns or their types
    )
    distinct = sorted(set(times))
    own = pl.DataFrame({"subject_id": list(range(len(events))), "prediction_time": list(times)},
                       schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})
    # every patient at every time of the batch, then each at its own time only
    indexes = [index.join(own, on=["subject_id", "prediction_time"], how="semi", maintain_order="left")
               for index in eligible_indexes(models, together, distinct)]
    frames = features_of_events(models, together, indexes)
    out: list[list] = [[None] * len(models) for _ in events]
    for i, frame in enumerate(frames):
        if frame is None:
            continue
        for part in frame.partition_by("subject_id", maintain_order=True):
            k = int(part.get_column("subject_id")[0])
            own_id = pl.Series("subject_id", [originals[k]] * part.height, dtype=part.schema["subject_id"])
            out[k][i] = part.replace_column(part.get_column_index("subject_id"), own_id)  # cheaper than with_columns
    return out
