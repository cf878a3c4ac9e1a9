"""What each person and group has used in the current periods, kept in memory (DESIGN §9).

The request hook asks the ledger before every request, so it never touches SQLite: totals
are seeded from the log at start-up, topped up with every row the log gains (this bridge's
and other bridges'), and this bridge's own finished exchanges count at once, before their
rows reach the file. An exchange counted at once is *pending* until its row shows up in the
log; then the log's amount replaces it, so nothing counts twice.

The ledger is shared by the event loop (reads, local uses) and the thread that reads the log;
one lock guards it, held for a few dictionary operations at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from aibridge.governance.limits import Governance
from aibridge.governance.periods import PERIODS, Period, bounds, parse_instant, spelled

Owner = tuple[str, str]  # ("user", "alice") or ("group", "eng")
# (scope, owner, period, period start as recorded): [USD, tokens]
TotalKey = tuple[str, str, Period, str]


@dataclass(frozen=True, slots=True)
class Use:
    """One exchange's cost: who, when it started (as recorded) and what it used."""

    interception_id: str
    user_id: str
    started_at: str
    usd: float
    tokens: int


@dataclass(frozen=True, slots=True)
class Window:
    """One current period: its bounds as recorded text and as epoch seconds."""

    start: str
    end: str
    end_epoch: float
    start_instant: datetime
    end_instant: datetime


class Ledger:
    def __init__(self, governance: Governance) -> None:
        self.governance = governance
        self._lock = threading.Lock()
        self._totals: dict[TotalKey, list[float]] = {}
        self._pending: dict[str, Use] = {}
        self._windows: dict[Period, Window] = {}
        self._rolls_at = float("-inf")
        # Which groups with shared budgets a user is in (their totals are kept too).
        self._sharing: dict[str, tuple[str, ...]] = {}
        self._sharing_groups = tuple(g for g in governance.groups if g.shared_limits.budgets)

    # ---- periods ---------------------------------------------------------------------------

    def windows(self, now: float) -> dict[Period, Window]:
        """The current periods at `now` (epoch seconds); recomputed when one ends."""
        if now >= self._rolls_at:
            with self._lock:
                self._roll(now)
        return self._windows

    def _roll(self, now: float) -> None:
        at = datetime.fromtimestamp(now, UTC)
        zone = self.governance.zone
        windows: dict[Period, Window] = {}
        for period in PERIODS:
            start, end = bounds(period, at, zone)
            windows[period] = Window(spelled(start), spelled(end), end.timestamp(), start, end)
        self._windows = windows
        self._rolls_at = min(w.end_epoch for w in windows.values())
        # Totals of periods that are over are never read again.
        current = {(p, w.start) for p, w in windows.items()}
        stale = [
            k for k in self._totals if (k[2], k[3]) not in current and k[3] < windows[k[2]].start
        ]
        for key in stale:
            del self._totals[key]
        earliest = min(w.start for w in windows.values())
        for interception_id in [i for i, u in self._pending.items() if u.started_at < earliest]:
            del self._pending[interception_id]

    def _bucket(self, period: Period, started_at: str) -> str | None:
        """The start of the period that holds `started_at`: the current one, a later one (a
        row that started after a change of period this ledger has not seen yet), or None for
        one that is over."""
        window = self._windows[period]
        if window.start <= started_at < window.end:
            return window.start
        if started_at < window.start:
            return None
        instant = parse_instant(started_at)
        if instant is None:
            return None
        return spelled(bounds(period, instant, self.governance.zone)[0])

    # ---- reading ---------------------------------------------------------------------------

    def used(self, scope: str, owner: str, period: Period, now: float) -> tuple[float, float]:
        """(USD, tokens) that `owner` used in the current `period`."""
        window = self.windows(now)[period]
        found = self._totals.get((scope, owner, period, window.start))
        return (found[0], found[1]) if found is not None else (0.0, 0.0)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    # ---- counting --------------------------------------------------------------------------

    def _owners(self, user_id: str) -> Iterable[tuple[str, str]]:
        yield "user", user_id
        groups = self._sharing.get(user_id)
        if groups is None:
            groups = tuple(g.name for g in self._sharing_groups if g.has_member(user_id))
            if len(self._sharing) < 100_000:  # BYOK identities are many: bound the memo
                self._sharing[user_id] = groups
        for name in groups:
            yield "group", name

    def _add(
        self,
        user_id: str,
        started_at: str,
        usd: float,
        tokens: float,
        totals: dict[TotalKey, list[float]] | None = None,
    ) -> None:
        if not self._windows:
            return
        into = self._totals if totals is None else totals
        for period in PERIODS:
            start = self._bucket(period, started_at)
            if start is None:
                continue
            for scope, owner in self._owners(user_id):
                total = into.setdefault((scope, owner, period, start), [0.0, 0.0])
                total[0] += usd
                total[1] += tokens

    def add_local(self, use: Use, now: float) -> None:
        """This bridge's own finished exchange: counted now, pending until the log has it."""
        self.windows(now)
        with self._lock:
            self._add(use.user_id, use.started_at, use.usd, use.tokens)
            previous = self._pending.get(use.interception_id)
            if previous is not None:  # a second usage row of one exchange: pending together
                use = replace(use, usd=previous.usd + use.usd, tokens=previous.tokens + use.tokens)
            self._pending[use.interception_id] = use

    def add_logged(self, uses: Iterable[Use], now: float) -> None:
        """Rows the log gained since the last read. A pending exchange's row replaces it."""
        self.windows(now)
        with self._lock:
            for use in uses:
                pending = self._pending.pop(use.interception_id, None)
                if pending is not None and (pending.user_id, pending.started_at) == (
                    use.user_id,
                    use.started_at,
                ):
                    # One step: used() reads without the lock, and must not see the total
                    # without this exchange between taking the pending amount out and
                    # putting the logged one in.
                    usd, tokens = use.usd - pending.usd, use.tokens - pending.tokens
                    if usd or tokens:  # nearly always the same amounts: nothing to change
                        self._add(use.user_id, use.started_at, usd, tokens)
                    continue
                if pending is not None:
                    self._add(pending.user_id, pending.started_at, -pending.usd, -pending.tokens)
                self._add(use.user_id, use.started_at, use.usd, use.tokens)

    def reseed(
        self,
        per_user: Mapping[tuple[str, Period, str], tuple[float, float]],
        confirmed: Iterable[str],
        now: float,
    ) -> None:
        """Replace every total with what the log holds (`per_user`: (user, period, period
        start) → (USD, tokens)), then count again the pending exchanges the log does not hold
        yet. `confirmed`: the pending ids the same read of the log found there."""
        self.windows(now)
        with self._lock:
            for interception_id in confirmed:
                self._pending.pop(interception_id, None)
            totals: dict[TotalKey, list[float]] = {}
            for (user_id, period, start), (usd, tokens) in per_user.items():
                for scope, owner in self._owners(user_id):
                    total = totals.setdefault((scope, owner, period, start), [0.0, 0.0])
                    total[0] += usd
                    total[1] += tokens
            for use in self._pending.values():
                self._add(use.user_id, use.started_at, use.usd, use.tokens, totals)
            # Swapped in whole: used() reads without the lock and must never see the totals
            # half built (a spent budget read as zero).
            self._totals = totals
