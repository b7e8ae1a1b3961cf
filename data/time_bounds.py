"""The dates an event may carry, one rule for every path into the data.

An event dated before 1900 or after now (plus a day of clock skew: sites'
clocks and time zones) is not a record of care: `chronorisk ingest`
quarantines it (`implausible_date`), the API refuses it (4xx naming the
field). The same bounds hold for prediction times.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

EARLIEST = datetime(1900, 1, 1)
CLOCK_SKEW = timedelta(days=1)  # "in the future" means beyond a day
_EPOCH = datetime(1970, 1, 1)
_US_PER_SECOND = 1_000_000


def utcnow_naive() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def latest(now: datetime | None = None) -> datetime:
    """The latest accepted time (naive UTC): now plus the clock skew."""
    return (now or utcnow_naive()) + CLOCK_SKEW


def naive_utc(value: datetime) -> datetime:
    """Aware datetimes become naive UTC (MEDS times are naive)."""
    if value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def check_past(value: datetime | None) -> datetime | None:
    """`value` as naive UTC; ValueError saying which bound it breaks."""
    if value is None:
        return None
    value = naive_utc(value)
    if value > latest():
        raise ValueError("is in the future")
    if value < EARLIEST:
        raise ValueError("is before 1900")
    return value


def check_past_date(value: date | None) -> date | None:
    """The same bounds for a calendar date."""
    if value is not None and value > latest().date():
        raise ValueError("is in the future")
    if value is not None and value < EARLIEST.date():
        raise ValueError("is before 1900")
    return value


def bounds_us(now: datetime | None = None) -> tuple[int, int]:
    """(earliest, latest) accepted times in microseconds since 1970-01-01 UTC, for converters working in them."""
    def to_us(value: datetime) -> int:
        delta = value - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * _US_PER_SECOND + delta.microseconds

    return to_us(EARLIEST), to_us(latest(now))
