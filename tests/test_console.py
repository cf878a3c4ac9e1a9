"""The console's line per finished exchange and its summary at shutdown (issue 15)."""

import pytest

from aibridge.console import MAX_ERROR_CHARS, ExchangeTally, FinishedExchange, exchange_line


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
