"""Monitoring windows: ISO weeks or days of prediction time, and the safe folder name of a site."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from chronorisk.errors import InputError


@dataclass(frozen=True, order=True)
class Window:
    """A half-open time window [start, end) of prediction times."""

    start: datetime
    end: datetime
    kind: str

    @property
    def label(self) -> str:
        if self.kind == "week":
            year, week, _ = self.start.isocalendar()
            return f"{year}-W{week:02d}"
        return self.start.date().isoformat()


def window_of(moment: datetime | date, kind: str) -> Window:
    """The day or ISO week (Monday to Monday) holding `moment`."""
    if kind not in ("day", "week"):
        raise InputError("window", f"{kind!r} is not a window; use 'day' or 'week'")
    day = moment.date() if isinstance(moment, datetime) else moment
    if kind == "week":
        day = day - timedelta(days=day.weekday())
    start = datetime(day.year, day.month, day.day)
    return Window(start, start + timedelta(days=7 if kind == "week" else 1), kind)


def windows_for_days(days: Iterable[date], kind: str) -> list[Window]:
    return sorted({window_of(d, kind) for d in days})


def safe_name(site: str) -> str:
    text = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in site)
    if not text or text.startswith("."):
        raise InputError("site", f"{site!r} cannot name a report folder")
    return text
