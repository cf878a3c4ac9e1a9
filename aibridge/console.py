"""What the bridge says on its console: one line per finished exchange, a summary at the end.

An operator tailing ``mitmdump`` (or ``journalctl -u aibridge``) sees who asked what and what
it cost without opening the log; the lines are built here, from plain values, so they are
tested without a proxy. Under load they are written in batches (``LineBatch``): mitmproxy
turns every log record into an event dispatched to all its addons on the event loop, which
cost about 0.3 ms of CPU per exchange when each line was a record of its own.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
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


class LineBatch:
    """Lines for the log, written at once when none was written for ``every`` seconds, else
    gathered and written together, one record, when ``flush`` is called (the caller
    schedules it ``every`` seconds after ``add`` asked for it). A line written later than it
    was made carries the time it was made, as mitmproxy prints it."""

    def __init__(
        self,
        write: Callable[[str], None],
        every: float = 0.5,
        most: int = 500,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._write = write
        self.every = every
        self._most = most  # gathered lines never grow beyond this: written at once then
        self._clock = clock
        self._wall_clock = wall_clock
        self._last = -float("inf")
        self._pending: list[str] = []
        self._second = -1  # the wall-clock second _second_text spells
        self._second_text = ""

    def add(self, line: str) -> bool:
        """Write or gather `line`; True when the caller must call ``flush`` in ``every`` s."""
        now = self._clock()
        if not self._pending and now - self._last >= self.every:
            self._last = now
            self._write(line)
            return False
        self._pending.append(f"[{self._stamp(self._wall_clock())}] {line}")
        if len(self._pending) >= self._most:
            self.flush()
            return False
        return len(self._pending) == 1

    def _stamp(self, epoch: float) -> str:
        """``HH:MM:SS.mmm`` local time, as mitmproxy prints it (strftime once a second)."""
        second = int(epoch)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%H:%M:%S", time.localtime(second))
        # A float epoch holds a quarter of a microsecond: .007 s reads as 6.99997 ms.
        millis = min(999, int(round((epoch - second) * 1000, 2)))
        return f"{self._second_text}.{millis:03d}"

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        self._last = self._clock()
        # The record's own time stamp heads the first line: its copy goes.
        lines[0] = lines[0].partition("] ")[2]
        self._write("\n".join(lines))
