"""Calendar periods of budgets (aibridge.governance.periods): pure functions, no clock.

Every expected bound below is written out as a UTC instant, worked out from the zone's rules
(and checked against the zoneinfo data the tests run on): historical dates only, so a later
tzdata release cannot move them.
"""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from aibridge.governance.periods import (
    PERIODS,
    Period,
    bounds,
    describe_local,
    describe_wait,
    local_midnight,
    parse_instant,
    spelled,
)

US = timedelta(microseconds=1)


def utc(text: str) -> datetime:
    """'2026-05-13T15:04' (or with seconds) as an aware UTC instant."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def local(zone: str, text: str, fold: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone), fold=fold)


def span(period: Period, at: datetime, zone: str) -> tuple[str, str]:
    start, end = bounds(period, at, ZoneInfo(zone))
    assert start.tzinfo is UTC and end.tzinfo is UTC
    return start.isoformat(timespec="minutes"), end.isoformat(timespec="minutes")


def assert_tiles(period: Period, at: datetime, zone: ZoneInfo) -> None:
    """The period holds `at`, and its neighbours meet it exactly at its bounds."""
    start, end = bounds(period, at, zone)
    assert start <= at < end, (period, at, start, end)
    assert bounds(period, start, zone) == (start, end)
    assert bounds(period, end - US, zone) == (start, end)
    assert bounds(period, end, zone)[0] == end
    assert bounds(period, start - US, zone)[1] == start


# ---- UTC ---------------------------------------------------------------------------------


def test_utc_day_week_month() -> None:
    at = utc("2026-05-13T15:04:05.123456")  # a Wednesday
    assert span("day", at, "UTC") == ("2026-05-13T00:00+00:00", "2026-05-14T00:00+00:00")
    assert span("week", at, "UTC") == ("2026-05-11T00:00+00:00", "2026-05-18T00:00+00:00")
    assert span("month", at, "UTC") == ("2026-05-01T00:00+00:00", "2026-06-01T00:00+00:00")


def test_any_aware_input_gives_the_same_utc_bounds() -> None:
    at = utc("2026-05-13T23:30")
    zone = ZoneInfo("Europe/Berlin")
    for same in (at, at.astimezone(zone), at.astimezone(timezone(timedelta(hours=-7)))):
        assert bounds("day", same, zone) == bounds("day", at, zone)
    # 01:30 on the 14th in Berlin: the Berlin day of the 14th.
    assert span("day", at, "Europe/Berlin") == ("2026-05-13T22:00+00:00", "2026-05-14T22:00+00:00")


def test_a_naive_instant_is_refused() -> None:
    for period in PERIODS:
        with pytest.raises(ValueError, match="aware"):
            bounds(period, datetime(2026, 5, 13, 12), ZoneInfo("UTC"))


# ---- DST at 02:00 or 03:00 local ---------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "at", "day", "hours"),
    [
        # Berlin, spring: 02:00 CET -> 03:00 CEST on Sunday 29 March 2026, a 23-hour day.
        ("Europe/Berlin", "2026-03-29T12:00", ("2026-03-28T23:00", "2026-03-29T22:00"), 23),
        ("Europe/Berlin", "2026-03-29T00:30", ("2026-03-28T23:00", "2026-03-29T22:00"), 23),
        # Berlin, autumn: 03:00 CEST -> 02:00 CET on Sunday 25 October 2026, 25 hours.
        ("Europe/Berlin", "2026-10-25T12:00", ("2026-10-24T22:00", "2026-10-25T23:00"), 25),
        ("Europe/Berlin", "2026-10-25T00:30", ("2026-10-24T22:00", "2026-10-25T23:00"), 25),
        # New York, spring: 02:00 EST -> 03:00 EDT on Sunday 8 March 2026.
        ("America/New_York", "2026-03-08T12:00", ("2026-03-08T05:00", "2026-03-09T04:00"), 23),
        # New York, autumn: 02:00 EDT -> 01:00 EST on Sunday 1 November 2026.
        ("America/New_York", "2026-11-01T05:30", ("2026-11-01T04:00", "2026-11-02T05:00"), 25),
        ("America/New_York", "2026-11-01T06:30", ("2026-11-01T04:00", "2026-11-02T05:00"), 25),
    ],
)
def test_day_of_a_dst_change(zone: str, at: str, day: tuple[str, str], hours: int) -> None:
    start, end = bounds("day", utc(at), ZoneInfo(zone))
    assert (start, end) == (utc(day[0]), utc(day[1]))
    assert end - start == timedelta(hours=hours)
    # Both bounds are local midnights.
    for bound in (start, end):
        assert bound.astimezone(ZoneInfo(zone)).time().isoformat() == "00:00:00"


def test_week_and_month_across_dst_changes() -> None:
    berlin, new_york = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")
    # The week of Monday 23 March 2026 begins in CET and ends in CEST: 167 hours.
    start, end = bounds("week", utc("2026-03-26T12:00"), berlin)
    assert (start, end) == (utc("2026-03-22T23:00"), utc("2026-03-29T22:00"))
    assert end - start == timedelta(hours=7 * 24 - 1)
    # The week of the autumn change: 169 hours.
    start, end = bounds("week", utc("2026-10-25T12:00"), berlin)
    assert (start, end) == (utc("2026-10-18T22:00"), utc("2026-10-25T23:00"))
    assert end - start == timedelta(hours=7 * 24 + 1)
    assert span("month", utc("2026-03-15T12:00"), "Europe/Berlin") == (
        "2026-02-28T23:00+00:00",
        "2026-03-31T22:00+00:00",
    )
    assert span("month", utc("2026-11-15T12:00"), "America/New_York") == (
        "2026-11-01T04:00+00:00",
        "2026-12-01T05:00+00:00",
    )
    for at in ("2026-03-08T07:00", "2026-11-01T05:30", "2026-11-01T06:30"):
        for period in PERIODS:
            assert_tiles(period, utc(at), new_york)


# ---- DST at midnight: the day begins at the first instant that exists ---------------------


@pytest.mark.parametrize(
    ("zone", "day", "first_instant", "local_start", "next_day"),
    [
        # Havana, Sunday 10 March 2013: 00:00 CST -> 01:00 CDT, midnight never happens.
        ("America/Havana", "2013-03-10", "2013-03-10T05:00", "01:00", "2013-03-11T04:00"),
        # Santiago, Sunday 2 September 2012: 00:00 -04 -> 01:00 -03.
        ("America/Santiago", "2012-09-02", "2012-09-02T04:00", "01:00", "2012-09-03T03:00"),
        # Beirut, Sunday 28 March 2010: 00:00 EET -> 01:00 EEST.
        ("Asia/Beirut", "2010-03-28", "2010-03-27T22:00", "01:00", "2010-03-28T21:00"),
        # Havana, Sunday 1 April 2012: the month of April begins at 01:00 too.
        ("America/Havana", "2012-04-01", "2012-04-01T05:00", "01:00", "2012-04-02T04:00"),
    ],
)
def test_skipped_midnight(
    zone: str, day: str, first_instant: str, local_start: str, next_day: str
) -> None:
    tz = ZoneInfo(zone)
    first = utc(first_instant)
    # zoneinfo agrees that midnight does not exist: it does not survive a round trip.
    midnight = local(zone, f"{day}T00:00")
    assert midnight.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != midnight.replace(
        tzinfo=None
    )
    assert first.astimezone(tz).strftime("%Y-%m-%d %H:%M") == f"{day} {local_start}"
    assert (first - US).astimezone(tz).date() < first.astimezone(tz).date()
    assert local_midnight(datetime.fromisoformat(day).date(), tz) == first
    for at in (first, first + timedelta(minutes=30), first + timedelta(hours=12)):
        assert bounds("day", at, tz) == (first, utc(next_day))
    # The instant before belongs to the day before, which ends where this one begins.
    assert bounds("day", first - US, tz)[1] == first
    if day.endswith("-01"):
        assert bounds("month", first + timedelta(days=3), tz)[0] == first
        assert bounds("month", first - US, tz)[1] == first
    for period in PERIODS:
        assert_tiles(period, first, tz)


def test_repeated_midnight_havana() -> None:
    """Havana, Sunday 3 November 2013: 01:00 CDT -> 00:00 CST, so 00:00 happens at 04:00Z
    and again at 05:00Z. The day begins at the first."""
    tz = ZoneInfo("America/Havana")
    first, second = utc("2013-11-03T04:00"), utc("2013-11-03T05:00")
    assert first.astimezone(tz).strftime("%d %H:%M") == second.astimezone(tz).strftime("%d %H:%M")
    assert first.astimezone(tz).strftime("%d %H:%M") == "03 00:00"
    sunday = (first, utc("2013-11-04T05:00"))
    for at in (first, first + timedelta(minutes=30), second, second + timedelta(minutes=30)):
        assert bounds("day", at, tz) == sunday
    assert sunday[1] - sunday[0] == timedelta(hours=25)
    assert bounds("day", first - US, tz) == (utc("2013-11-02T04:00"), first)
    # The week of Monday 28 October 2013 ends on Monday 4 November (CST).
    assert bounds("week", second, tz) == (utc("2013-10-28T04:00"), utc("2013-11-04T05:00"))
    for period in PERIODS:
        for at in (first, second):
            assert_tiles(period, at, tz)


@pytest.mark.parametrize(
    ("zone", "repeated", "saturday", "sunday_starts"),
    [
        # Santiago, 28 April 2012 at 24:00 -03 -> 23:00 -04: Saturday's last hour repeats.
        ("America/Santiago", "2012-04-29T03:30", "2012-04-28T03:00", "2012-04-29T04:00"),
        # Beirut, 30 October 2010 at 24:00 EEST -> 23:00 EET.
        ("Asia/Beirut", "2010-10-30T21:30", "2010-10-29T21:00", "2010-10-30T22:00"),
    ],
)
def test_clock_set_back_at_midnight(
    zone: str, repeated: str, saturday: str, sunday_starts: str
) -> None:
    """The second pass of Saturday's 23:xx is still Saturday; Sunday's midnight happens
    once, after it."""
    tz = ZoneInfo(zone)
    at = utc(repeated)
    assert at.astimezone(tz).strftime("%H:%M") == "23:30"
    assert (at - timedelta(hours=1)).astimezone(tz).strftime("%H:%M") == "23:30"
    assert bounds("day", at, tz) == (utc(saturday), utc(sunday_starts))
    assert bounds("day", at - timedelta(hours=1), tz) == (utc(saturday), utc(sunday_starts))
    assert bounds("day", utc(sunday_starts), tz)[0] == utc(sunday_starts)
    assert utc(sunday_starts) - utc(saturday) == timedelta(hours=25)


@pytest.mark.parametrize(
    ("zone", "at", "day"),
    [
        # St John's, 7 November 2010 at 00:01 NDT -> 23:01 NST: Sunday's midnight came at
        # 02:30Z, then the clocks read Saturday 23:01 to 23:59 again (02:31Z to 03:30Z).
        ("America/St_Johns", "2010-11-07T02:45", ("2010-11-07T02:30", "2010-11-08T03:30")),
        ("America/St_Johns", "2010-11-07T03:29", ("2010-11-07T02:30", "2010-11-08T03:30")),
        ("America/St_Johns", "2010-11-07T02:30", ("2010-11-07T02:30", "2010-11-08T03:30")),
        # Casey, 5 March 2010: +11 -> +08 at 02:00, the clocks read 4 March 23:00 again.
        ("Antarctica/Casey", "2010-03-04T15:30", ("2010-03-04T13:00", "2010-03-05T16:00")),
    ],
)
def test_clock_set_back_past_midnight(zone: str, at: str, day: tuple[str, str]) -> None:
    """The local date reads the day before again, but the next day began at the first
    midnight: the instant is in that day (it used to get the day before, which ended
    before it)."""
    tz = ZoneInfo(zone)
    instant = utc(at)
    start, end = bounds("day", instant, tz)
    assert (start, end) == (utc(day[0]), utc(day[1]))
    for period in PERIODS:
        assert_tiles(period, instant, tz)


# ---- offsets that are not whole hours ----------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "offset"),
    [("Asia/Kolkata", "05:30"), ("Asia/Kathmandu", "05:45"), ("Australia/Eucla", "08:45")],
)
def test_offsets_of_half_and_three_quarter_hours(zone: str, offset: str) -> None:
    hours, minutes = map(int, offset.split(":"))
    shift = timedelta(hours=hours, minutes=minutes)
    tz = ZoneInfo(zone)
    at = utc("2026-05-13T12:00")
    assert bounds("day", at, tz) == (
        utc("2026-05-13T00:00") - shift,
        utc("2026-05-14T00:00") - shift,
    )
    assert bounds("week", at, tz) == (
        utc("2026-05-11T00:00") - shift,
        utc("2026-05-18T00:00") - shift,
    )
    assert bounds("month", at, tz) == (
        utc("2026-05-01T00:00") - shift,
        utc("2026-06-01T00:00") - shift,
    )
    # Just after local midnight it is already the next local day, while UTC is still the day
    # before.
    early = utc("2026-05-13T00:00") - shift + timedelta(minutes=1)
    assert early.day == 12
    assert bounds("day", early, tz)[0] == utc("2026-05-13T00:00") - shift
    assert bounds("day", early - timedelta(minutes=2), tz)[1] == utc("2026-05-13T00:00") - shift


# ---- the calendar ------------------------------------------------------------------------


def test_leap_day_2028() -> None:
    at = utc("2028-02-29T10:00")  # a Tuesday
    assert span("day", at, "UTC") == ("2028-02-29T00:00+00:00", "2028-03-01T00:00+00:00")
    assert span("week", at, "UTC") == ("2028-02-28T00:00+00:00", "2028-03-06T00:00+00:00")
    assert span("month", at, "UTC") == ("2028-02-01T00:00+00:00", "2028-03-01T00:00+00:00")
    assert span("day", utc("2028-02-28T23:59:59.999999"), "UTC")[1] == "2028-02-29T00:00+00:00"
    # February of a year that is not a leap year ends on the 28th.
    assert span("month", utc("2027-02-28T23:59"), "UTC")[1] == "2027-03-01T00:00+00:00"
    # In a zone east of UTC the leap day begins on the 28th, UTC.
    assert span("day", at, "Asia/Kolkata") == ("2028-02-28T18:30+00:00", "2028-02-29T18:30+00:00")


@pytest.mark.parametrize(
    ("last_instant", "month_start", "next_month"),
    [
        ("2026-04-30T23:59:59.999999", "2026-04-01", "2026-05-01"),  # 30 days
        ("2026-01-31T23:59:59.999999", "2026-01-01", "2026-02-01"),  # 31 days
        ("2026-06-30T23:59:59.999999", "2026-06-01", "2026-07-01"),
        ("2026-07-31T23:59:59.999999", "2026-07-01", "2026-08-01"),
        ("2026-12-31T23:59:59.999999", "2026-12-01", "2027-01-01"),  # December -> January
        ("2028-02-29T23:59:59.999999", "2028-02-01", "2028-03-01"),
    ],
)
def test_month_ends(last_instant: str, month_start: str, next_month: str) -> None:
    zone = ZoneInfo("UTC")
    last = utc(last_instant)
    assert bounds("month", last, zone) == (utc(month_start), utc(next_month))
    following = bounds("month", last + US, zone)
    assert following[0] == utc(next_month)
    assert following[1].day == 1 and following[1] > following[0] + timedelta(days=27)


def test_weeks_crossing_a_month_and_a_year() -> None:
    # Wednesday 1 April 2026: the week began on Monday 30 March.
    assert span("week", utc("2026-04-01T08:00"), "UTC") == (
        "2026-03-30T00:00+00:00",
        "2026-04-06T00:00+00:00",
    )
    # Thursday 31 December 2026 and Friday 1 January 2027: one week, Monday 28 December to
    # Monday 4 January.
    week = ("2026-12-28T00:00+00:00", "2027-01-04T00:00+00:00")
    assert span("week", utc("2026-12-31T23:59:59.999999"), "UTC") == week
    assert span("week", utc("2027-01-01T00:00"), "UTC") == week
    # ISO week 1 of 2027 begins on 4 January; Sunday 3 January is still the old week.
    assert span("week", utc("2027-01-03T23:59:59.999999"), "UTC") == week
    assert span("week", utc("2027-01-04T00:00"), "UTC")[0] == "2027-01-04T00:00+00:00"
    # A Monday is the first day of its own week.
    assert span("week", utc("2026-05-11T00:00"), "UTC")[0] == "2026-05-11T00:00+00:00"
    # New York: the week's Monday midnight is 05:00Z in winter.
    assert span("week", utc("2027-01-01T12:00"), "America/New_York") == (
        "2026-12-28T05:00+00:00",
        "2027-01-04T05:00+00:00",
    )


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kathmandu"])
@pytest.mark.parametrize("period", PERIODS)
def test_an_instant_at_a_bound_belongs_to_the_new_period(zone: str, period: Period) -> None:
    tz = ZoneInfo(zone)
    for at in ("2026-01-01T12:00", "2026-03-29T12:00", "2026-10-31T12:00", "2028-02-29T12:00"):
        start, end = bounds(period, utc(at), tz)
        assert bounds(period, end, tz)[0] == end
        assert bounds(period, end - US, tz) == (start, end)
        assert bounds(period, start, tz) == (start, end)
        assert bounds(period, start - US, tz)[1] == start


def test_periods_tile_the_timeline_in_many_zones() -> None:
    """Over random instants of 2000-2040 in zones with odd histories: each instant is in its
    period, and the neighbouring periods meet it at its bounds."""
    rng = random.Random(14)
    zones = [
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "America/Havana",
        "America/Santiago",
        "Asia/Beirut",
        "Asia/Kathmandu",
        "Pacific/Apia",  # skipped 30 December 2011 entirely
        "Pacific/Chatham",
        "America/St_Johns",
    ]
    low, high = utc("2000-01-01T00:00").timestamp(), utc("2040-01-01T00:00").timestamp()
    for zone in zones:
        tz = ZoneInfo(zone)
        for _ in range(150):
            at = datetime.fromtimestamp(rng.uniform(low, high), UTC)
            for period in PERIODS:
                assert_tiles(period, at, tz)


def test_samoa_skipped_a_whole_day() -> None:
    """Apia went from -10 to +14 at the end of 29 December 2011: there was no 30 December.
    The 29th ends where the 31st begins."""
    tz = ZoneInfo("Pacific/Apia")
    end_of_29 = bounds("day", utc("2011-12-30T09:00"), tz)[1]
    assert end_of_29 == utc("2011-12-30T10:00")
    assert end_of_29.astimezone(tz).strftime("%Y-%m-%d %H:%M") == "2011-12-31 00:00"
    assert bounds("day", end_of_29, tz) == (end_of_29, end_of_29 + timedelta(hours=24))


# ---- how the records spell an instant ----------------------------------------------------


def test_spelled() -> None:
    at = datetime(2026, 5, 13, 14, 4, 5, tzinfo=ZoneInfo("Europe/Berlin"))
    assert spelled(at) == "2026-05-13T12:04:05.000000+00:00"
    assert spelled(utc("2026-05-13T12:04:05.5")) == "2026-05-13T12:04:05.500000+00:00"


def test_spelled_compares_as_text_as_the_instants_compare() -> None:
    rng = random.Random(9)
    zones = [
        UTC,
        ZoneInfo("Asia/Kathmandu"),
        ZoneInfo("America/Havana"),
        timezone(-timedelta(hours=11)),
    ]
    instants: list[datetime] = []
    base = utc("2026-05-13T00:00")
    for _ in range(3000):
        # Spread over decades, and clustered within one second (microseconds decide).
        if rng.random() < 0.5:
            at = base + timedelta(seconds=rng.uniform(-20 * 365 * 86400, 20 * 365 * 86400))
        else:
            at = base + timedelta(microseconds=rng.randrange(0, 2_000_000))
        if rng.random() < 0.2:
            at = at.replace(microsecond=0)
        instants.append(at.astimezone(rng.choice(zones)))
    texts = [spelled(at) for at in instants]
    assert len({len(t) for t in texts}) == 1  # one fixed width
    assert all(t.endswith("+00:00") for t in texts)
    assert sorted(instants) == sorted(instants, key=spelled)
    for a, b in itertools.pairwise(instants):
        assert (a < b) == (spelled(a) < spelled(b))
        assert (a == b) == (spelled(a) == spelled(b))
    # A bound spelled is compared against recorded started_at values as text: the bound
    # itself is inside, one microsecond before is outside.
    start, end = bounds("day", base, UTC)
    assert spelled(start) <= spelled(start) < spelled(end)
    assert spelled(start - US) < spelled(start)
    assert spelled(end - US) < spelled(end)


def test_parse_instant() -> None:
    at = utc("2026-05-13T12:04:05.123456")
    assert parse_instant(spelled(at)) == at
    assert parse_instant("2026-05-13T12:04:05.123Z") == utc("2026-05-13T12:04:05.123")
    assert parse_instant("2026-05-13T12:04:05") == utc("2026-05-13T12:04:05")  # naive: UTC
    assert parse_instant("2026-05-13T14:04:05+02:00") == utc("2026-05-13T12:04:05")
    for bad in ("", "yesterday", "2026-13-01T00:00:00", "2026-05-13T25:00", None, 12):
        assert parse_instant(bad) is None  # type: ignore[arg-type]


# ---- for people --------------------------------------------------------------------------


def test_describe_local() -> None:
    at = utc("2026-12-01T23:00")
    assert describe_local(at, ZoneInfo("UTC"), "UTC") == "2026-12-01 23:00 UTC"
    assert describe_local(at, ZoneInfo("Europe/Berlin"), "Europe/Berlin") == (
        "2026-12-02 00:00 Europe/Berlin"
    )
    assert describe_local(at, ZoneInfo("Asia/Kathmandu"), "Asia/Kathmandu") == (
        "2026-12-02 04:45 Asia/Kathmandu"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "0 s"),
        (0, "0 s"),
        (0.9, "0 s"),
        (45, "45 s"),
        (59.99, "59 s"),
        (60, "1 min"),
        (61, "1 min"),
        (3599, "59 min"),
        (3600, "1 h 0 min"),
        (3 * 3600 + 12 * 60 + 30, "3 h 12 min"),
        (86399, "23 h 59 min"),
        (86400, "1 d 0 h"),
        (2 * 86400 + 4 * 3600 + 59, "2 d 4 h"),
        (31 * 86400, "31 d 0 h"),
    ],
)
def test_describe_wait(seconds: float, text: str) -> None:
    assert describe_wait(seconds) == text
