"""Cohorts for public health: filtered pseudonymous rows, exports, and suppressed aggregates.

Rows carry the pseudonymous subject id, site, age band (never a birth date),
sex, conditions, risk, tier and the model that produced the score. Patients
who withdrew consent are left out of every row, export and count from the
moment of withdrawal. Aggregate cells under `serve.small_cell` are
suppressed, and when exactly one cell would be suppressed the next smallest
one is too, so that the published total cannot reveal it by subtraction.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl
from sqlalchemy import and_, func, select

from chronorisk.errors import InputError
from chronorisk.serving.schemas import AggregateQuery, CohortQuery
from chronorisk.serving.store import ScoreStore, consent_withdrawn, patients, scores, utcnow

ROW_COLUMNS = (
    "subject_id", "site", "task", "prediction_time", "risk", "tier", "age_band", "sex", "conditions",
    "model_name", "model_version",
)


def known_conditions() -> list[str]:
    """Condition names a cohort can filter on (the features package's concept map)."""
    from chronorisk.features.concepts import load_concepts

    return load_concepts().condition_names()


def check_conditions(names: list[str] | None) -> None:
    if not names:
        return
    known = set(known_conditions())
    for i, name in enumerate(names):
        if name not in known:
            raise InputError(f"conditions[{i}]", f"unknown condition {name[:40]!r}; known: {', '.join(sorted(known))}")


def resolve_time(store: ScoreStore, query: CohortQuery) -> tuple[datetime, datetime] | None:
    """The [start, end) window of the scores the query reads: its date, else the task's latest date."""
    if query.prediction_time is not None:
        start = datetime(query.prediction_time.year, query.prediction_time.month, query.prediction_time.day)
    else:
        latest = store.latest_prediction_time(query.task)
        if latest is None:
            return None
        start = datetime(latest.year, latest.month, latest.day)
    return start, start + timedelta(days=1)


def _filtered(query: CohortQuery, window: tuple[datetime, datetime], now: datetime, columns):
    q = (
        select(*columns)
        .select_from(
            scores.outerjoin(
                patients, and_(patients.c.site == scores.c.site, patients.c.subject_id == scores.c.subject_id)
            )
        )
        .where(scores.c.task == query.task)
        .where(scores.c.prediction_time >= window[0])
        .where(scores.c.prediction_time < window[1])
        .where(~consent_withdrawn(scores.c.subject_id, scores.c.site, now))
    )
    if query.sites:
        q = q.where(scores.c.site.in_(query.sites))
    if query.tiers:
        q = q.where(scores.c.tier.in_(query.tiers))
    if query.min_risk is not None:
        q = q.where(scores.c.risk >= query.min_risk)
    if query.age_bands:
        q = q.where(scores.c.age_band.in_(query.age_bands))
    if query.sex:
        q = q.where(patients.c.sex == query.sex)
    for name in query.conditions or ():
        q = q.where(patients.c.conditions.like(f"%,{name},%"))
    return q


_ROW_COLS = (
    scores.c.subject_id, scores.c.site, scores.c.task, scores.c.prediction_time, scores.c.risk, scores.c.tier,
    scores.c.age_band, patients.c.sex, patients.c.conditions, scores.c.model_name, scores.c.model_version,
)


@dataclass
class CohortResult:
    query: dict
    prediction_time: datetime | None
    n: int
    rows: list[dict]
    model_versions: list[str]

    @property
    def truncated(self) -> bool:
        return self.n > len(self.rows)


def query_record(query: CohortQuery) -> dict:
    """The query as recorded with an export and in the audit log (JSON-safe)."""
    return json.loads(query.model_dump_json(exclude_none=True))


def cohort(
    store: ScoreStore, query: CohortQuery, *, limit: int | None = None, now: datetime | None = None
) -> CohortResult:
    """Rows of the cohort, highest risk first (at most `limit`; `n` counts them all)."""
    check_conditions(query.conditions)
    now = now or utcnow()
    window = resolve_time(store, query)
    record = query_record(query)
    if window is None:
        return CohortResult(record, None, 0, [], [])
    base = _filtered(query, window, now, _ROW_COLS)
    with store.engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(base.subquery())).scalar() or 0
        q = base.order_by(scores.c.risk.desc(), scores.c.site, scores.c.subject_id)
        if limit is not None:
            q = q.limit(limit)
        rows = [_row(r) for r in conn.execute(q).mappings().all()]
        versions = conn.execute(
            select(scores.c.model_name, scores.c.model_version).distinct()
            .where(scores.c.task == query.task)
            .where(scores.c.prediction_time >= window[0]).where(scores.c.prediction_time < window[1])
        ).all()
    return CohortResult(record, window[0], int(n), rows, sorted(f"{a}:{b}" for a, b in versions))


def _row(r) -> dict:
    d = {k: r[k] for k in ROW_COLUMNS}
    d["conditions"] = [c for c in (d["conditions"] or "").split(",") if c]
    d["risk"] = round(float(d["risk"]), 5)
    return d


def aggregate(
    store: ScoreStore, query: AggregateQuery, *, small_cell: int, now: datetime | None = None
) -> dict:
    """Counts by `group_by` with small cells suppressed (count None, suppressed True)."""
    check_conditions(query.conditions)
    now = now or utcnow()
    window = resolve_time(store, query)
    record = query_record(query)
    if window is None:
        return {"query": record, "prediction_time": None, "small_cell": small_cell, "total": 0,
                "cells": [], "model_versions": []}
    dims = {"site": scores.c.site, "tier": scores.c.tier, "age_band": scores.c.age_band, "sex": patients.c.sex}
    cols = [dims[d].label(d) for d in query.group_by]
    base = _filtered(query, window, now, [*cols, scores.c.model_name, scores.c.model_version]).subquery()
    group_cols = [base.c[d] for d in query.group_by]
    with store.engine.connect() as conn:
        counts = conn.execute(
            select(*group_cols, func.count().label("n")).group_by(*group_cols).order_by(*group_cols)
        ).mappings().all()
        versions = conn.execute(select(base.c.model_name, base.c.model_version).distinct()).all()
    cells = [{"group": {d: r[d] for d in query.group_by}, "count": int(r["n"])} for r in counts]
    total = sum(c["count"] for c in cells)
    suppress_small_cells(cells, small_cell)
    return {
        "query": record,
        "prediction_time": window[0],
        "small_cell": small_cell,
        "total": total if total >= small_cell or total == 0 else None,
        "cells": cells,
        "model_versions": sorted(f"{a}:{b}" for a, b in versions),
    }


def suppress_small_cells(cells: list[dict], small_cell: int) -> None:
    """Primary suppression of counts under `small_cell`, and secondary suppression of one more
    cell when only one was suppressed (else the total minus the shown cells would reveal it)."""
    primary = [c for c in cells if 0 < c["count"] < small_cell]
    for c in cells:
        c["suppressed"] = c in primary
    if len(primary) == 1:
        shown = sorted((c for c in cells if not c["suppressed"]), key=lambda c: c["count"])
        if shown:
            shown[0]["suppressed"] = True
    for c in cells:
        if c["suppressed"]:
            c["count"] = None


def export_frame(result: CohortResult) -> pl.DataFrame:
    """Export rows as a table (conditions joined with ';')."""
    schema = {
        "subject_id": pl.Int64, "site": pl.String, "task": pl.String, "prediction_time": pl.Datetime("us"),
        "risk": pl.Float64, "tier": pl.String, "age_band": pl.String, "sex": pl.String,
        "conditions": pl.String, "model_name": pl.String, "model_version": pl.String,
    }
    rows = [{**r, "conditions": ";".join(r["conditions"])} for r in result.rows]
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def export_metadata(result: CohortResult) -> dict:
    """What is recorded with every export: the query, the score date, the model versions, the time."""
    return {
        "query": result.query,
        "prediction_time": result.prediction_time.isoformat() if result.prediction_time else None,
        "model_versions": result.model_versions,
        "n_rows": result.n,
        "exported_at": utcnow().isoformat(timespec="seconds"),
        "identifiers": "pseudonymous subject_id only; age bands, no birth dates",
    }


def export_bytes(result: CohortResult, fmt: str) -> bytes:
    """CSV or Parquet bytes; Parquet carries the export metadata in its schema metadata."""
    frame = export_frame(result)
    buf = io.BytesIO()
    if fmt == "csv":
        frame.write_csv(buf)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        table = frame.to_arrow()
        meta = dict(table.schema.metadata or {})
        meta[b"chronorisk.export"] = json.dumps(export_metadata(result)).encode()
        pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    else:
        raise InputError("format", f"unknown export format {fmt!r}; accepted: csv, parquet")
    return buf.getvalue()
