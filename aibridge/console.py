"""What the bridge says on its console: one line per finished exchange, a summary at the end.

An operator tailing ``mitmdump`` (or ``journalctl -u aibridge``) sees who asked what and what
it cost without opening the log; the lines are built here, from plain values, so they are
tested without a proxy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FinishedExchange:
    user: str
    provider: str
    api: str
    model: str
    status: str  # as recorded: completed, failed, cut, rejected, shutdown, ...
    http_status: int | None = None
    input_tokens: int | None = None  # all input, cached included
    output_tokens: int | None = None
    cost_usd: float | None = None
    seconds: float | None = None
    error: str | None = None


# An error is cut to this on the console; the log keeps it whole.
MAX_ERROR_CHARS = 160


def exchange_line(done: FinishedExchange) -> str:
    """``alice · openai responses gpt-5 · completed 200 · 1,234 in / 56 out tokens · $0.0123
    · 2,345 ms``"""
    parts = [
        done.user or "unknown client",
        f"{done.provider} {done.api} {done.model or '?'}",
        done.status if done.http_status is None else f"{done.status} {done.http_status}",
    ]
    if done.input_tokens is not None or done.output_tokens is not None:
        parts.append(f"{done.input_tokens or 0:,} in / {done.output_tokens or 0:,} out tokens")
    if done.cost_usd is not None:
        parts.append(_dollars(done.cost_usd))
    if done.seconds is not None:
        parts.append(f"{done.seconds * 1000:,.0f} ms")
    if done.error and done.status != "completed":
        error = " ".join(done.error.split())  # one line, whatever upstream put in it
        if len(error) > MAX_ERROR_CHARS:
            error = error[: MAX_ERROR_CHARS - 1] + "…"
        parts.append(error)
    return "AI Bridge: " + " · ".join(parts)


def _dollars(amount: float) -> str:
    if amount == 0:
        return "$0"
    if amount < 0.0001:
        return "<$0.0001"
    return f"${amount:,.4f}" if amount < 10 else f"${amount:,.2f}"


class ExchangeTally:
    """Exchanges counted by status, for the summary at shutdown."""

    def __init__(self) -> None:
        self.by_status: Counter[str] = Counter()

    def add(self, status: str) -> None:
        self.by_status[status] += 1

    def summary(self, recorder_stats: Mapping[str, int] | None) -> str:
        total = sum(self.by_status.values())
        counts = ", ".join(f"{n:,} {status}" for status, n in self.by_status.most_common())
        line = f"AI Bridge: {total:,} exchange{'' if total == 1 else 's'}"
        if counts:
            line += f" ({counts})"
        if recorder_stats is not None:
            written, lost = recorder_stats.get("written", 0), recorder_stats.get("dropped", 0)
            line += f"; {written:,} row{'' if written == 1 else 's'} written, {lost:,} lost"
        return line
