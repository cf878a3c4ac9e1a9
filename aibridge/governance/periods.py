"""Calendar periods of budgets (DESIGN §9): a day, an ISO week (Monday first) or a month in
the configured time zone, as the UTC instants where they begin and end.

A period begins at local midnight. Where a time zone skips midnight (a DST change at 00:00,
as Cuba and Chile have had), the day begins at the first instant that exists, the moment of
the change; where midnight happens twice, at the first of them. Pure functions: no clock.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Final, Literal

Period = Literal["day", "week", "month"]
PERIODS: Final[tuple[Period, ...]] = ("day", "week", "month")

# How the records spell an instant (interceptions.started_at); compared as text, so every
# bound is spelled the same way.
_TIMESPEC: Final = "microseconds"

ADJECTIVE: Final[dict[str, str]] = {"day": "daily", "week": "weekly", "month": "monthly"}


def _first_day(period: Period, day: date) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _next_first_day(period: Period, first: date) -> date:
    if period == "day":
        return first + timedelta(days=1)
    if period == "week":
        return first + timedelta(days=7)
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def local_midnight(day: date, zone: tzinfo) -> datetime:
    """The UTC instant at which `day` begins in `zone`."""
    # fold=0: in a gap, the offset before the change, which names the instant of the change
    # itself; when midnight repeats, its first occurrence.
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def bounds(period: Period, at: datetime, zone: tzinfo) -> tuple[datetime, datetime]:
    """The period holding instant `at` (aware): its first instant and the first of the next,
    both in UTC."""
    if at.tzinfo is None:
        raise ValueError("bounds() needs an aware datetime")
    first = _first_day(period, at.astimezone(zone).date())
    start = local_midnight(first, zone)
    end = local_midnight(_next_first_day(period, first), zone)
    instant = at.astimezone(UTC)
    if instant < start:
        # A local date whose midnight came later than `at` (a repeated midnight's second
        # pass cannot do this, a zone's odd history could): the period before.
        return bounds(period, start - timedelta(microseconds=1), zone)
    while instant >= end:
        # A clock set back past midnight (St John's at 00:01 until 2011, Casey in 2010):
        # the local date reads the day before again, but the next day began at the first
        # midnight, already passed.
        first = _next_first_day(period, first)
        start, end = end, local_midnight(_next_first_day(period, first), zone)
    return start, end


def spelled(instant: datetime) -> str:
    """An instant as the records spell it: UTC, ISO 8601, microseconds."""
    return instant.astimezone(UTC).isoformat(timespec=_TIMESPEC)


def parse_instant(text: str) -> datetime | None:
    """A recorded instant back as an aware datetime (None if it is not one)."""
    try:
        parsed = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def describe_local(instant: datetime, zone: tzinfo, zone_name: str) -> str:
    """An instant for people: local time and the zone's name, e.g. "2026-12-02 00:00 UTC"."""
    return f"{instant.astimezone(zone):%Y-%m-%d %H:%M} {zone_name}"


def describe_wait(seconds: float) -> str:
    """A coarse duration for people: "3 h 12 min", "45 s", "2 d 4 h"."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"
