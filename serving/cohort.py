"""Cohorts for public health: de-identified rows and exports, differentially private aggregates.

Rows never carry the store's pseudonymous subject id: each row of a release
gets a random `record_id` drawn for that release only, so two exports (or an
export and a GP's worklist) cannot be joined on it. The quasi-identifiers
(site, age band, sex, conditions) are made k-anonymous (`serve.k_anonymity`,
default 10): the least generalization that leaves at most
`serve.export_max_suppressed_share` of the rows in groups under k is chosen
(ages in 20-year bands, then conditions withheld, then sites withheld), and
the rows still in groups under k are suppressed. The release says which
generalization was applied and roughly how many rows were suppressed. Risks
are rounded to 0.01 and dates to the day.

Aggregates come from `privacy.py` (discrete Laplace noise, a privacy budget
per analyst) with small cells suppressed on the noisy counts. Patients who
withdrew consent are left out of every row, export and count from the
moment of withdrawal.
"""

from __future__ import annotations

import io
import itertools
import json
import secrets
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import polars as pl
from sqlalchemy import and_, func, select

from chronorisk.errors import InputError
from chronorisk.serving import privacy
from chronorisk.serving.schemas import AggregateQuery, CohortQuery
from chronorisk.serving.store import AGE_BANDS, TIERS, ScoreStore, consent_withdrawn, patients, scores, utcnow

ROW_COLUMNS = (
    "record_id", "site", "task", "prediction_time", "risk", "tier", "age_band", "sex", "conditions",
    "model_name", "model_version",
)
QUASI_IDENTIFIERS = ("site", "age_band", "sex", "conditions")
WIDE_AGE_BANDS = {"0-17": "0-17", "18-29": "18-39", "30-39": "18-39", "40-49": "40-59", "50-59": "40-59",
                  "60-69": "60-79", "70-79": "60-79", "80+": "80+"}
WITHHELD = "*"


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
    scores.c.site, scores.c.task, scores.c.prediction_time, scores.c.risk, scores.c.tier,
    scores.c.age_band, patients.c.sex, patients.c.conditions, scores.c.model_name, scores.c.model_version,
)


@dataclass
class CohortResult:
    query: dict
    prediction_time: datetime | None
    n: int  # rows released (after k-anonymity)
    rows: list[dict]
    model_versions: list[str]
    deidentification: dict = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.n > len(self.rows)


def query_record(query: CohortQuery) -> dict:
    """The query as recorded with an export and in the audit log (JSON-safe)."""
    return json.loads(query.model_dump_json(exclude_none=True))


def cohort(
    store: ScoreStore, query: CohortQuery, *, k: int, max_suppressed_share: float = 0.05,
    limit: int | None = None, now: datetime | None = None,
) -> CohortResult:
    """De-identified rows of the cohort, highest risk first (at most `limit`; `n` counts every released row)."""
    check_conditions(query.conditions)
    now = now or utcnow()
    window = resolve_time(store, query)
    record = query_record(query)
    if window is None:
        return CohortResult(record, None, 0, [], [], deidentify([], k, max_suppressed_share)[1])
    base = _filtered(query, window, now, _ROW_COLS)
    with store.engine.connect() as conn:
        raw = [_raw_row(r) for r in conn.execute(base).mappings().all()]
        versions = conn.execute(
            select(scores.c.model_name, scores.c.model_version).distinct()
            .where(scores.c.task == query.task)
            .where(scores.c.prediction_time >= window[0]).where(scores.c.prediction_time < window[1])
        ).all()
    rows, report = deidentify(raw, k, max_suppressed_share)
    rows.sort(key=lambda r: (-r["risk"], r["record_id"]))
    shown = rows if limit is None else rows[:limit]
    return CohortResult(record, window[0], len(rows), shown, sorted(f"{a}:{b}" for a, b in versions), report)


def _raw_row(r) -> dict:
    return {
        "site": r["site"], "task": r["task"], "prediction_time": r["prediction_time"].date(),
        "risk": round(float(r["risk"]), 2), "tier": r["tier"], "age_band": r["age_band"], "sex": r["sex"],
        "conditions": ";".join(c for c in (r["conditions"] or "").split(",") if c),
        "model_name": r["model_name"], "model_version": r["model_version"],
    }


# generalization steps, least first: what each does to a row's quasi-identifiers
GENERALIZATIONS = (
    ("age bands widened to 20 years", lambda r: {**r, "age_band": WIDE_AGE_BANDS.get(r["age_band"], r["age_band"])}),
    ("conditions withheld", lambda r: {**r, "conditions": WITHHELD}),
    ("sites withheld", lambda r: {**r, "site": WITHHELD}),
)


def deidentify(rows: list[dict], k: int, max_suppressed_share: float) -> tuple[list[dict], dict]:
    """k-anonymous rows with per-release random ids, and the report of what was generalized and suppressed.

    Generalizations are applied in order until rows in quasi-identifier groups under `k` are at most
    `max_suppressed_share` of all; those rows are then suppressed."""
    applied: list[str] = []
    current = rows
    small = _rows_in_small_groups(current, k)
    for name, step in GENERALIZATIONS:
        if len(small) <= max_suppressed_share * len(current):
            break
        current = [step(r) for r in current]
        applied.append(name)
        small = _rows_in_small_groups(current, k)
    released = [{"record_id": secrets.token_hex(8), **r} for j, r in enumerate(current) if j not in small]
    n_suppressed = len(current) - len(released)
    return released, {
        "k": k,
        "quasi_identifiers": list(QUASI_IDENTIFIERS),
        "generalized": applied,
        # an exact small count would itself be a small cell: said as a range under k
        "suppressed_rows": str(n_suppressed) if n_suppressed == 0 or n_suppressed >= k else f"1-{k - 1}",
        "record_id": "random per release; never the store's subject id",
    }


def _rows_in_small_groups(rows: list[dict], k: int) -> set[int]:
    keys = [tuple(r[q] for q in QUASI_IDENTIFIERS) for r in rows]
    sizes = Counter(keys)
    return {j for j, key in enumerate(keys) if sizes[key] < k}


def aggregate(
    store: ScoreStore, query: AggregateQuery, *, small_cell: int, budget: privacy.PrivacyBudget, analyst: str,
    now: datetime | None = None,
) -> dict:
    """Counts by `group_by` over the dimensions' full domain, with differentially private noise, the
    analyst's budget charged, and noisy counts under `small_cell` suppressed (count None)."""
    check_conditions(query.conditions)
    now = now or utcnow()
    window = resolve_time(store, query)
    record = query_record(query)
    true_counts, versions = _true_counts(store, query, window, now)
    groups = list(itertools.product(*(_domains(store, query)[d] for d in query.group_by)))
    left = privacy.charge(store.engine, analyst, budget, json.dumps(record, sort_keys=True))
    noisy = privacy.noisy_counts([true_counts.get(g, 0) for g in groups], budget.epsilon)
    cells = [{"group": dict(zip(query.group_by, g, strict=True)), "count": c if c >= small_cell else None,
              "suppressed": c < small_cell} for g, c in zip(groups, noisy, strict=True)]
    return {
        "query": record,
        "prediction_time": window[0] if window else None,
        "small_cell": small_cell,
        "total": sum(noisy),
        "cells": cells,
        "model_versions": versions,
        "privacy": {
            "mechanism": "discrete Laplace (OpenDP); unit: one patient's record at one site",
            "epsilon": budget.epsilon, "noise_scale": budget.scale, "budget": budget.budget,
            "budget_days": budget.days, "budget_left": left,
        },
    }


def _true_counts(store: ScoreStore, query: AggregateQuery, window, now) -> tuple[dict[tuple, int], list[str]]:
    if window is None:
        return {}, []
    dims = {"site": scores.c.site, "tier": scores.c.tier, "age_band": scores.c.age_band, "sex": patients.c.sex}
    cols = [dims[d].label(d) for d in query.group_by]
    base = _filtered(query, window, now, [*cols, scores.c.model_name, scores.c.model_version]).subquery()
    group_cols = [base.c[d] for d in query.group_by]
    with store.engine.connect() as conn:
        counts = conn.execute(select(*group_cols, func.count().label("n")).group_by(*group_cols)).mappings().all()
        versions = conn.execute(select(base.c.model_name, base.c.model_version).distinct()).all()
    return ({tuple(r[d] for d in query.group_by): int(r["n"]) for r in counts},
            sorted(f"{a}:{b}" for a, b in versions))


def _domains(store: ScoreStore, query: AggregateQuery) -> dict[str, list]:
    """Every value a group-by dimension can take (empty cells are released too, with noise)."""
    return {
        "site": list(query.sites) if query.sites else store.sites(),
        "tier": list(query.tiers) if query.tiers else list(TIERS),
        "age_band": list(query.age_bands) if query.age_bands else [*AGE_BANDS, None],
        "sex": [query.sex] if query.sex else ["F", "M", None],
    }


def export_frame(result: CohortResult) -> pl.DataFrame:
    """Export rows as a table (conditions joined with ';', or '*' when withheld)."""
    schema = {
        "record_id": pl.String, "site": pl.String, "task": pl.String, "prediction_time": pl.Date,
        "risk": pl.Float64, "tier": pl.String, "age_band": pl.String, "sex": pl.String,
        "conditions": pl.String, "model_name": pl.String, "model_version": pl.String,
    }
    rows = [{c: r[c] for c in ROW_COLUMNS} for r in result.rows]
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


def export_metadata(result: CohortResult) -> dict:
    """What is recorded with every export: the query, the score date, the model versions, the time,
    and what de-identification did."""
    return {
        "query": result.query,
        "prediction_time": result.prediction_time.isoformat() if result.prediction_time else None,
        "model_versions": result.model_versions,
        "n_rows": result.n,
        "exported_at": utcnow().isoformat(timespec="seconds"),
        "identifiers": "random per-export record ids; k-anonymous quasi-identifiers; age bands, no birth dates",
        "deidentification": result.deidentification,
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
