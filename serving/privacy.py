"""Differentially private counts for public health, with a privacy budget per analyst.

An aggregate release is a histogram of cohort rows over the full domain of its
group-by dimensions (every site of the store, every tier, age band and sex,
empty cells included, so that which cells exist reveals nothing). OpenDP's
discrete Laplace mechanism adds integer noise of scale `1 / epsilon` to every
cell; the privacy unit is one patient's record at one site (a row of the
score table at one prediction time), which changes one cell by one, so each
release costs `serve.dp_epsilon`. Cells whose *noisy* count is under
`serve.small_cell` are then suppressed (post-processing costs nothing).

Each analyst (the API key, or the operating-system user of the CLI) has
`serve.dp_budget` of epsilon per `serve.dp_budget_days`; a release that
would exceed it is refused (429), and every release states its noise scale,
its epsilon and the budget left. The ledger is a table of the store, written
in the transaction that checks it, so concurrent releases cannot overspend.

Why this stops differencing: two queries that differ by one patient now give
answers that each carry independent noise of standard deviation about
`sqrt(2) / epsilon` (2.8 at epsilon 0.5), so their difference no longer is the
suppressed count; averaging many repeats to remove the noise spends the
budget, and the budget runs out first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Column, DateTime, Float, Index, Integer, String, Table, func, select

from chronorisk.errors import ChronoriskError
from chronorisk.serving.store import metadata, utcnow, writer

privacy_ledger = Table(
    "privacy_ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("analyst", String(64), nullable=False),
    Column("epsilon", Float, nullable=False),
    Column("spent_at", DateTime, nullable=False),
    Column("query", String(2000), nullable=False),
    Index("ix_privacy_ledger_analyst", "analyst", "spent_at"),
)


class BudgetExhausted(ChronoriskError):
    """The analyst's privacy budget cannot pay for this release (the API answers 429)."""


@dataclass(frozen=True)
class PrivacyBudget:
    epsilon: float  # per release
    budget: float  # per analyst per period
    days: int

    @property
    def scale(self) -> float:
        return 1.0 / self.epsilon


def spent(conn, analyst: str, since: datetime) -> float:
    return float(conn.execute(
        select(func.coalesce(func.sum(privacy_ledger.c.epsilon), 0.0))
        .where(privacy_ledger.c.analyst == analyst).where(privacy_ledger.c.spent_at >= since)
    ).scalar() or 0.0)


def charge(engine, analyst: str, budget: PrivacyBudget, query: str) -> float:
    """Spend one release's epsilon of `analyst`'s budget; returns the budget left. Raises BudgetExhausted."""
    now = utcnow()
    since = now - timedelta(days=budget.days)
    with writer(engine) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("LOCK TABLE privacy_ledger IN EXCLUSIVE MODE")
        used = spent(conn, analyst, since)
        if used + budget.epsilon > budget.budget + 1e-9:
            raise BudgetExhausted(
                f"privacy budget spent: {used:g} of epsilon {budget.budget:g} used in the last {budget.days} days "
                f"(each aggregate costs {budget.epsilon:g}); ask an admin, or wait for older releases to expire"
            )
        conn.execute(privacy_ledger.insert().values(analyst=analyst[:64], epsilon=budget.epsilon, spent_at=now,
                                                    query=query[:2000]))
    return round(budget.budget - used - budget.epsilon, 6)


def budget_left(engine, analyst: str, budget: PrivacyBudget) -> float:
    with engine.connect() as conn:
        used = spent(conn, analyst, utcnow() - timedelta(days=budget.days))
    return round(budget.budget - used, 6)


def noisy_counts(counts: list[int], epsilon: float) -> list[int]:
    """Counts with discrete Laplace noise of scale 1/epsilon (OpenDP), sensitivity one record, clamped at 0."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    if not counts:
        return []
    mechanism = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int),
                                  scale=1.0 / epsilon)
    return [max(0, int(v)) for v in mechanism([int(c) for c in counts])]
