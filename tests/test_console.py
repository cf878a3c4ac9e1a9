"""The console's line per finished exchange and its summary at shutdown (issue 15)."""

import time

import pytest

from aibridge.console import (
    MAX_ERROR_CHARS,
    ExchangeTally,
    FinishedExchange,
    LineBatch,
    exchange_line,
)
from tests.harness import FakeClock as Clock


def test_a_completed_exchange() -> None:
    line = exchange_line(
        FinishedExchange(
            "alice", "openai", "responses", "gpt-5", "completed", 200, 1234, 56, 0.0123, 2.3456
        )
    )
    assert line == (
        "AI Bridge: alice · openai responses gpt-5 · completed 200 · 1,234 in / 56 out tokens"
        " · $0.0123 · 2,346 ms"
    )


def test_a_rejection_says_why_on_one_line() -> None:
    line = exchange_line(
        FinishedExchange(
            "", "anthropic", "messages", "", "rejected", 403, error="budget\nused up\r\n  now"
        )
    )
    assert line == (
        "AI Bridge: unknown client · anthropic messages ? · rejected 403 · budget used up now"
    )


def test_a_long_error_is_cut() -> None:
    line = exchange_line(FinishedExchange("u", "p", "chat", "m", "failed", 500, error="x" * 5000))
    assert line.endswith("x…") and len(line) < MAX_ERROR_CHARS + 80


def test_a_completed_exchange_shows_no_error() -> None:
    line = exchange_line(FinishedExchange("u", "p", "chat", "m", "completed", 200, error="noted"))
    assert "noted" not in line


@pytest.mark.parametrize(
    ("cost", "shown"),
    [
        (0.0, "$0"),
        (0.00001, "<$0.0001"),
        (0.5, "$0.5000"),
        (12.345, "$12.35"),
        (1234.5, "$1,234.50"),
    ],
)
def test_costs(cost: float, shown: str) -> None:
    line = exchange_line(FinishedExchange("u", "p", "chat", "m", "completed", 200, cost_usd=cost))
    assert line.endswith(" · " + shown)


def test_unknown_usage_and_duration_are_left_out() -> None:
    line = exchange_line(FinishedExchange("u", "p", "responses", "m", "cut"))
    assert line == "AI Bridge: u · p responses m · cut"


def test_the_summary() -> None:
    tally = ExchangeTally()
    assert tally.summary(None) == "AI Bridge: 0 exchanges"
    for status in ("completed", "completed", "rejected", "failed", "completed"):
        tally.add(status)
    assert tally.summary({"written": 1234, "dropped": 1}) == (
        "AI Bridge: 5 exchanges (3 completed, 1 rejected, 1 failed); 1,234 rows written, 1 lost"
    )
    one = ExchangeTally()
    one.add("completed")
    assert one.summary({"written": 1, "dropped": 0}) == (
        "AI Bridge: 1 exchange (1 completed); 1 row written, 0 lost"
    )


def batch(clock: Clock, **kw: int) -> tuple[LineBatch, list[str]]:
    written: list[str] = []
    wall = 1_700_000_000.25  # a known wall clock: lines made later show their own time
    return LineBatch(
        written.append, clock=clock, wall_clock=lambda: wall + clock.now, **kw
    ), written


def test_a_line_after_a_quiet_spell_is_written_at_once() -> None:
    clock = Clock()
    lines, written = batch(clock)
    assert lines.add("one") is False and written == ["one"]
    clock.now += 0.5
    assert lines.add("two") is False and written == ["one", "two"]


def test_lines_under_load_are_gathered_into_one_record() -> None:
    clock = Clock()
    lines, written = batch(clock)
    lines.add("first")
    clock.now += 0.1
    assert lines.add("second") is True  # schedule a flush
    clock.now += 0.1
    assert lines.add("third") is False  # one is scheduled already
    assert written == ["first"]
    lines.flush()
    assert len(written) == 2
    second, third = written[1].split("\n")
    assert second == "second"  # the record's own time stamp heads it
    assert third.endswith("] third") and third.startswith("[")
    lines.flush()  # nothing pending: nothing written
    assert len(written) == 2
    clock.now += 0.1
    assert lines.add("fourth") is True  # right after a flush: gathered again


def test_gathered_lines_are_bounded() -> None:
    clock = Clock()
    lines, written = batch(clock, most=3)
    lines.add("a")
    for line in ("b", "c", "d"):
        lines.add(line)
    assert len(written) == 2 and written[1].count("\n") == 2  # b, c, d written at the bound
    assert lines.add("e") is True


def test_a_gathered_line_shows_the_time_it_was_made() -> None:
    clock = Clock()
    written: list[str] = []
    made = [1_700_000_000.25, 1_700_000_000.5, 1_700_000_001.007]
    times = iter(made)
    lines = LineBatch(written.append, clock=clock, wall_clock=lambda: next(times))
    lines.add("quiet spell")  # written at once: no stamp of its own taken
    for line in ("a", "b", "c"):
        lines.add(line)
    lines.flush()
    stamps = [
        time.strftime("%H:%M:%S", time.localtime(int(t))) + f".{round(t % 1 * 1000):03d}"
        for t in made
    ]
    assert written[1] == f"a\n[{stamps[1]}] b\n[{stamps[2]}] c"
    assert stamps[2].endswith(".007")
