"""The device tables of the score store: registry, readings, quarantine, alerts and worklist visits.

They live on the score store's `metadata` (same database, SQLite or PostgreSQL by URL) and are
created by `ensure_tables`. Readings are keyed by (device, reading id, code): a reading delivered
twice is stored once. Subject ids are the pseudonymous MEDS ids; nothing here logs them.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Float, Index, Integer, String, Table, Text

from chronorisk.serving.store import ScoreStore, metadata

devices = Table(
    "devices",
    metadata,
    Column("device_id", String(128), primary_key=True),
    Column("site", String(64), nullable=False),
    Column("subject_id", BigInteger, nullable=False),
    Column("kind", String(32), nullable=True),
    Column("registered_at", DateTime, nullable=False),
    Column("revoked_at", DateTime, nullable=True),
    Index("ix_devices_subject", "site", "subject_id"),
)

device_readings = Table(
    "device_readings",
    metadata,
    Column("device_id", String(128), primary_key=True),
    Column("reading_id", String(128), primary_key=True),
    Column("code", String(64), primary_key=True),
    Column("site", String(64), nullable=False),
    Column("subject_id", BigInteger, nullable=False),
    Column("time", DateTime, nullable=False),
    Column("numeric_value", Float, nullable=True),
    Column("text_value", String(256), nullable=True),
    Column("sent_at", DateTime, nullable=True),  # meta.lastUpdated: when the device or gateway sent it
    Column("received_at", DateTime, nullable=False),
    Column("stored_at", DateTime, nullable=False),  # written, with the scores it changed
    Index("ix_device_readings_subject", "site", "subject_id", "time"),
)

device_quarantine = Table(
    "device_quarantine",
    metadata,
    Column("message_key", String(64), primary_key=True),  # sha256 of topic and payload: a redelivery is one row
    Column("topic", String(512), nullable=False),
    Column("device_id", String(128), nullable=True),
    Column("category", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("payload", Text, nullable=True),  # as received (at most 64 KiB), for the site to fix and resend
    Column("received_at", DateTime, nullable=False),
)

device_alerts = Table(
    "device_alerts",
    metadata,
    Column("alert_id", Integer, primary_key=True, autoincrement=True),
    Column("site", String(64), nullable=False),
    Column("subject_id", BigInteger, nullable=False),
    Column("task", String(64), nullable=False),
    Column("from_tier", String(8), nullable=False),
    Column("to_tier", String(8), nullable=False),
    Column("risk", Float, nullable=False),
    Column("prediction_time", DateTime, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("published_at", DateTime, nullable=True),
    Index("ix_device_alerts_site", "site", "created_at"),
    Index("ix_device_alerts_subject", "site", "subject_id", "task", "created_at"),
)

worklist_visits = Table(
    "worklist_visits",
    metadata,
    Column("actor", String(64), primary_key=True),
    Column("site", String(64), primary_key=True),
    Column("visited_at", DateTime, nullable=False),
)

DEVICE_TABLES = (devices, device_readings, device_quarantine, device_alerts, worklist_visits)


def ensure_tables(store: ScoreStore) -> None:
    """Create the device tables that are missing (idempotent)."""
    metadata.create_all(store.engine, tables=list(DEVICE_TABLES))
