"""The in-memory ledger (aibridge.governance.ledger): local uses, logged rows, reseeds, groups
and the change of period. Every call takes `now`; no clock is read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aibridge.governance.ledger import Ledger, Use
from aibridge.governance.limits import Governance, Group, Limits
from aibridge.governance.periods import spelled

# Wednesday 13 May 2026, noon UTC: the day, the week (Monday 11 May) and the month are well
# inside their bounds.
NOON = datetime(2026, 5, 13, 12, tzinfo=UTC)
SHARED = Limits(budgets={("spend_usd", "day"): 100.0})


def at(moment: datetime, **delta: float) -> float:
    return (moment + timedelta(**delta)).timestamp()


def started(moment: datetime, **delta: float) -> str:
    return spelled(moment + timedelta(**delta))


def ledger(*groups: Group, time_zone: str = "UTC") -> Ledger:
    return Ledger(Governance(time_zone=time_zone, groups=groups))


def use(iid: str, user: str, usd: float, tokens: int, when: datetime = NOON, **delta: Any) -> Use:
    return Use(iid, user, started(when, **delta), usd, tokens)


def totals(book: Ledger, owner: str, now: float, scope: str = "user") -> dict[str, tuple]:
    return {p: book.used(scope, owner, p, now) for p in ("day", "week", "month")}  # type: ignore[arg-type]


def same(owner_totals: dict[str, tuple], usd: float, tokens: float) -> None:
    for period, (got_usd, got_tokens) in owner_totals.items():
        assert got_usd == pytest.approx(usd), period
        assert got_tokens == tokens, period


# ---- local uses and logged rows ----------------------------------------------------------


def test_a_local_use_counts_at_once_then_the_logged_row_replaces_it() -> None:
    book = ledger()
    now = at(NOON, minutes=1)
    book.add_local(use("i1", "alice", 1.5, 100), now)
    same(totals(book, "alice", now), 1.5, 100)
    assert book.pending == 1 and book.pending_ids() == ["i1"]
    # The log's amount (prices recomputed, say) replaces the local one; nothing counts twice.
    book.add_logged([use("i1", "alice", 1.75, 120)], now)
    same(totals(book, "alice", now), 1.75, 120)
    assert book.pending == 0
    # Another read that does not hold it changes nothing.
    book.add_logged([], now)
    same(totals(book, "alice", now), 1.75, 120)
    same(totals(book, "bob", now), 0, 0)


def test_a_logged_row_of_another_bridge() -> None:
    book = ledger()
    now = at(NOON, minutes=1)
    book.add_local(use("mine", "alice", 1.0, 10), now)
    book.add_logged([use("theirs", "alice", 2.0, 20), use("bobs", "bob", 4.0, 40)], now)
    same(totals(book, "alice", now), 3.0, 30)
    same(totals(book, "bob", now), 4.0, 40)
    assert book.pending_ids() == ["mine"]  # still waiting for its own row


def test_two_usage_rows_of_one_exchange() -> None:
    """An exchange with two token_usages rows (two upstream responses): counted at once as
    one pending sum; the log's two rows replace it, in one read or in two."""
    now = at(NOON, minutes=1)
    one_read = ledger()
    one_read.add_local(use("i1", "alice", 1.0, 10), now)
    one_read.add_local(use("i1", "alice", 0.5, 5), now)
    assert one_read.pending == 1
    same(totals(one_read, "alice", now), 1.5, 15)
    one_read.add_logged([use("i1", "alice", 1.0, 10), use("i1", "alice", 0.5, 5)], now)
    same(totals(one_read, "alice", now), 1.5, 15)
    assert one_read.pending == 0

    two_reads = ledger()
    two_reads.add_local(use("i1", "alice", 1.0, 10), now)
    two_reads.add_logged([use("i1", "alice", 1.0, 10)], now)
    two_reads.add_local(use("i1", "alice", 0.5, 5), now)  # the second row, after the first
    same(totals(two_reads, "alice", now), 1.5, 15)
    two_reads.add_logged([use("i1", "alice", 0.5, 5)], now)
    same(totals(two_reads, "alice", now), 1.5, 15)
    assert two_reads.pending == 0


# ---- reseeding ---------------------------------------------------------------------------


def seed_of(book: Ledger, now: float, **per_user: tuple[float, float]) -> dict[Any, Any]:
    """A seed as SpendLog.seed gives it: the same amounts in each current period."""
    windows = book.windows(now)
    return {(u, p, w.start): amounts for u, amounts in per_user.items() for p, w in windows.items()}


def test_reseed_with_pending_ids_confirmed_or_not() -> None:
    book = ledger()
    now = at(NOON, minutes=1)
    book.add_local(use("i1", "alice", 1.0, 10), now)
    book.add_local(use("i2", "alice", 2.0, 20), now)
    book.add_logged([use("old", "alice", 7.0, 70)], now)
    # The log holds i1 (in its totals, 5 + 1) but not i2 yet: i2 is counted again on top.
    book.reseed(seed_of(book, now, alice=(6.0, 60)), ["i1"], now)
    same(totals(book, "alice", now), 8.0, 80)
    assert book.pending_ids() == ["i2"]
    # Neither confirmed: both counted on top of what the log says.
    book.add_local(use("i3", "bob", 0.25, 1), now)
    book.reseed(seed_of(book, now, alice=(5.0, 50)), [], now)
    same(totals(book, "alice", now), 7.0, 70)
    same(totals(book, "bob", now), 0.25, 1)
    # An id the ledger never had, confirmed: ignored.
    book.reseed(seed_of(book, now, alice=(5.0, 50)), ["nobody", "i2", "i3"], now)
    same(totals(book, "alice", now), 5.0, 50)
    same(totals(book, "bob", now), 0, 0)
    assert book.pending == 0
    # The totals are replaced, not added to: a user missing from the seed has none.
    book.reseed({}, [], now)
    same(totals(book, "alice", now), 0, 0)


def test_a_reader_never_sees_a_half_built_reseed() -> None:
    """used() reads without the lock (the event loop) while the log's thread reseeds: at any
    point of the reseed it sees the old totals or the new, never none. The read is made at
    each step of the rebuild, where a thread switch could put it."""
    group = Group("eng", frozenset({"alice", "bob"}), shared_limits=SHARED)
    book = ledger(group)
    now = at(NOON, minutes=1)
    book.add_logged([use("a", "alice", 5.0, 50), use("b", "bob", 1.0, 10)], now)
    book.add_local(use("p", "alice", 1.0, 10), now)
    seen: list[tuple[float, float]] = []
    owners = book._owners

    def reading_owners(user_id: str) -> Any:
        seen.append(book.used("user", "alice", "day", now))
        seen.append(book.used("group", "eng", "day", now))
        yield from owners(user_id)

    book._owners = reading_owners  # type: ignore[method-assign]
    book.reseed(seed_of(book, now, alice=(5.0, 50), bob=(1.0, 10)), [], now)
    assert seen
    assert {s for s in seen[::2]} == {(6.0, 60)}  # alice: old == new
    assert {s for s in seen[1::2]} == {(7.0, 70)}  # the group: old == new


def test_a_reader_never_sees_a_pending_use_taken_out_before_its_row_is_in() -> None:
    """The logged row replaces the pending use in one step, for the same reason."""
    book = ledger()
    now = at(NOON, minutes=1)
    book.add_logged([use("other", "alice", 3.0, 30)], now)
    book.add_local(use("i1", "alice", 1.0, 10), now)
    seen: list[tuple[float, float]] = []
    add = book._add

    def reading_add(*args: Any) -> None:
        add(*args)
        seen.append(book.used("user", "alice", "day", now))

    book._add = reading_add  # type: ignore[method-assign]
    book.add_logged([use("i1", "alice", 1.25, 12)], now)
    assert seen and all(s in ((4.0, 40), (4.25, 42)) for s in seen), seen
    assert seen[-1] == (4.25, 42)


# ---- groups ------------------------------------------------------------------------------


def test_group_shared_totals() -> None:
    eng = Group("eng", frozenset({"alice", "bob"}), shared_limits=SHARED)
    ml = Group("ml", frozenset({"bob"}), shared_limits=SHARED)
    plain = Group("plain", frozenset({"alice"}), limits=SHARED)  # per person: no shared total
    everyone = Group("all", frozenset({"*"}), shared_limits=SHARED)
    book = ledger(eng, ml, plain, everyone)
    now = at(NOON, minutes=1)
    book.add_local(use("i1", "alice", 1.0, 10), now)
    book.add_logged([use("i2", "bob", 2.0, 20), use("i3", "zoe", 4.0, 40)], now)
    same(totals(book, "eng", now, "group"), 3.0, 30)
    same(totals(book, "ml", now, "group"), 2.0, 20)
    same(totals(book, "all", now, "group"), 7.0, 70)
    same(totals(book, "plain", now, "group"), 0, 0)
    same(totals(book, "alice", now), 1.0, 10)
    # The pending use is replaced in the group's total too.
    book.add_logged([use("i1", "alice", 1.5, 15)], now)
    same(totals(book, "eng", now, "group"), 3.5, 35)
    # A seed gives users; the groups are summed from them.
    book.reseed(seed_of(book, now, alice=(10.0, 1), bob=(20.0, 2), zoe=(40.0, 4)), [], now)
    same(totals(book, "eng", now, "group"), 30.0, 3)
    same(totals(book, "ml", now, "group"), 20.0, 2)
    same(totals(book, "all", now, "group"), 70.0, 7)


# ---- periods -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "kept", "reset"),
    [
        # Wednesday -> Thursday: the day only.
        (datetime(2026, 5, 13, 23, 59, 59, 999999, tzinfo=UTC), ("week", "month"), ("day",)),
        # Sunday 17 May -> Monday 18 May: the day and the week.
        (datetime(2026, 5, 17, 23, 59, 59, 999999, tzinfo=UTC), ("month",), ("day", "week")),
        # Thursday 30 April -> Friday 1 May: the day and the month, the week goes on.
        (datetime(2026, 4, 30, 23, 59, 59, 999999, tzinfo=UTC), ("week",), ("day", "month")),
        # Thursday 31 December -> Friday 1 January.
        (datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), ("week",), ("day", "month")),
    ],
)
def test_rollover_at_a_period_end(
    last: datetime, kept: tuple[str, ...], reset: tuple[str, ...]
) -> None:
    book = ledger()
    before = last.timestamp()
    book.add_logged([use("i1", "alice", 2.0, 20, when=last, hours=-1)], before)
    book.add_local(use("i2", "alice", 1.0, 10, when=last, hours=-1), before)
    same(totals(book, "alice", before), 3.0, 30)
    after = (last + timedelta(microseconds=1)).timestamp()
    now_totals = totals(book, "alice", after)
    for period in kept:
        assert now_totals[period] == (3.0, 30)
    for period in reset:
        assert now_totals[period] == (0.0, 0.0)
    # The old period's totals are gone, not only unread.
    assert all(key[3] >= book.windows(after)[key[2]].start for key in book._totals)
    # The pending use's row arrives after the change: it leaves what is kept as it was
    # (the logged amount replaces it) and adds nothing to the new period.
    book.add_logged([use("i2", "alice", 1.0, 10, when=last, hours=-1)], after)
    assert totals(book, "alice", after) == now_totals
    # A row that started in the old period and is read now is not counted in a new one.
    book.add_logged([use("late", "alice", 5.0, 50, when=last)], after)
    for period in reset:
        assert book.used("user", "alice", period, after) == (0.0, 0.0)  # type: ignore[arg-type]
    for period in kept:
        assert book.used("user", "alice", period, after) == (8.0, 80)  # type: ignore[arg-type]


def test_rollover_in_a_time_zone() -> None:
    """Berlin: a row at 22:30Z on 13 May is the Berlin day of the 14th."""
    book = ledger(time_zone="Europe/Berlin")
    evening = datetime(2026, 5, 13, 21, 30, tzinfo=UTC)  # 23:30 in Berlin
    book.add_logged([use("i1", "alice", 1.0, 1, when=evening)], evening.timestamp())
    assert book.used("user", "alice", "day", evening.timestamp()) == (1.0, 1)
    later = evening + timedelta(hours=1)  # 00:30 in Berlin, still the 13th in UTC
    assert book.used("user", "alice", "day", later.timestamp()) == (0.0, 0.0)
    assert book.used("user", "alice", "week", later.timestamp()) == (1.0, 1)
    assert book.windows(later.timestamp())["day"].start == "2026-05-13T22:00:00.000000+00:00"


def test_a_row_that_started_in_the_next_period_before_the_ledger_rolled() -> None:
    """Another bridge's row that started just after midnight, read while this ledger's `now`
    is still before it: kept for the new day, not counted in the old one."""
    book = ledger()
    last = datetime(2026, 5, 31, 23, 59, 59, 900000, tzinfo=UTC)  # Sunday, end of May
    midnight = datetime(2026, 6, 1, tzinfo=UTC)
    book.add_logged(
        [
            use("early", "alice", 2.0, 20, when=midnight),
            use("just", "alice", 4.0, 40, when=midnight, microseconds=1),
            use("old", "alice", 1.0, 10, when=last),
        ],
        last.timestamp(),
    )
    same(totals(book, "alice", last.timestamp()), 1.0, 10)
    same(totals(book, "alice", midnight.timestamp()), 6.0, 60)  # day, week and month all new


def test_rows_of_periods_that_are_over_are_ignored() -> None:
    book = ledger()
    now = at(NOON, minutes=1)
    book.add_logged(
        [
            use("last-month", "alice", 100.0, 1000, days=-20),
            use("last-week", "alice", 10.0, 100, days=-3),  # Sunday 10 May
            use("yesterday", "alice", 1.0, 10, days=-1),
            use("today", "alice", 0.5, 5),
        ],
        now,
    )
    assert totals(book, "alice", now) == {
        "day": (0.5, 5),
        "week": (1.5, 15),
        "month": (11.5, 115),
    }
    # An exchange of this bridge that started yesterday and ended today: yesterday's.
    book.add_local(use("long", "alice", 2.0, 20, hours=-13), now)
    assert totals(book, "alice", now)["day"] == (0.5, 5)
    assert totals(book, "alice", now)["week"] == (3.5, 35)


def test_pending_uses_of_periods_that_are_over_are_dropped() -> None:
    book = ledger()
    book.add_local(use("lost", "alice", 1.0, 10), at(NOON))  # its row never arrives
    assert book.pending == 1
    book.windows(at(NOON, days=6))  # Tuesday 19 May: the week of 11 May is over, not May
    assert book.pending == 1
    book.windows(datetime(2026, 6, 1, tzinfo=UTC).timestamp())
    assert book.pending == 0


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2026-05-13", "9999-99-99T00:00:00", "zzz", "2026-05-13T12:00"]
)
def test_rows_whose_start_cannot_be_read(text: str) -> None:
    """A started_at that is not an instant spelled as the bridge spells it: counted only if it
    compares inside the current period as text (as the log's own totals count it), never a
    crash."""
    book = ledger()
    now = at(NOON, minutes=1)
    book.add_logged([Use("odd", "alice", text, 1.0, 1)], now)
    book.add_logged([use("fine", "alice", 2.0, 2)], now)
    day = book.windows(now)["day"]
    inside = day.start <= text < day.end
    assert book.used("user", "alice", "day", now) == ((3.0, 3) if inside else (2.0, 2))


def test_windows_are_spelled_as_the_records_spell_instants() -> None:
    book = ledger(time_zone="Asia/Kathmandu")
    windows = book.windows(at(NOON))
    assert windows["day"].start == "2026-05-12T18:15:00.000000+00:00"
    assert windows["day"].end == "2026-05-13T18:15:00.000000+00:00"
    assert windows["week"].start == "2026-05-10T18:15:00.000000+00:00"
    assert windows["month"].end == "2026-05-31T18:15:00.000000+00:00"
    assert windows["day"].end_epoch == datetime(2026, 5, 13, 18, 15, tzinfo=UTC).timestamp()
    # Asked again before the day ends: the same windows, not recomputed.
    assert book.windows(at(NOON, hours=6)) is windows
    assert book.windows(windows["day"].end_epoch) is not windows
