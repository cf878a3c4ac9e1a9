"""Enforcing budgets and limits before a request leaves (DESIGN §9).

``Governor.admit`` runs in the request hook for every bridged request: it reads the in-memory
ledger and per-user counters only, never SQLite. A thread reads the log every
``refresh_seconds`` (what other bridges spent) and reads it whole again at every change of
period and every ``RESEED_SECONDS`` (prices recomputed, rows removed).

Overshoot, stated: a budget is checked when a request starts, so the requests a person has in
flight when it is crossed all finish (at most ``concurrent_requests`` of them, when set); and
another bridge's spend is seen here up to ``refresh_seconds`` plus that bridge's writer delay
(its batch, normally under a second) after its exchange ended. Requests per minute and
concurrency are counted by each bridge on its own.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aibridge.governance.ledger import Ledger, Use
from aibridge.governance.limits import Budget, EffectiveLimits, Governance
from aibridge.governance.periods import describe_local, describe_wait
from aibridge.governance.spend_log import (
    PAID_BY_THE_BRIDGE,
    PostgresSpendLog,
    SpendLog,
    open_spend_log,
)

log = logging.getLogger(__name__)

RESEED_SECONDS: Final = 900.0
# How long a client is asked to wait when all its concurrent slots are taken.
CONCURRENCY_RETRY_SECONDS: Final = 1
WARNING_HEADER: Final = "x-aibridge-budget-warning"
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_EFFECTIVE_MEMO_MAX: Final = 10_000
_RECENT_USERS_MAX: Final = 10_000


@dataclass(slots=True)
class Admission:
    """A request let through: the slot it holds and the warnings its response carries."""

    user_id: str
    # The in-flight counts of the governor that gave the slot, when it holds one: released
    # there even after a new configuration replaced that governor.
    slots: dict[str, int] | None = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)
    released: bool = False

    @property
    def holds_slot(self) -> bool:
        return self.slots is not None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused by a limit: the answer, and what the record keeps about it."""

    status: int
    message: str
    headers: dict[str, str]
    detail: dict[str, Any]


# Admitted without anything to release or report: most requests of most configurations.
FREE_ADMISSION: Final = Admission("", released=True)


class Governor:
    def __init__(
        self,
        governance: Governance,
        db_path: str | None,
        publish: Callable[[float], None] | None = None,
    ) -> None:
        self.governance = governance
        self.enabled = governance.enabled  # asked for every request
        # Puts the limits and their current periods into the log (the `budgets` table), at
        # start-up and at each new period, so that readers of the log see them.
        self._publish = publish
        self.ledger = Ledger(governance)
        self._db_path = db_path
        self._effective: dict[str, EffectiveLimits] = {}
        self._recent: dict[str, deque[float]] = {}  # admitted request times, per user
        self._in_flight: dict[str, int] = {}
        self._warned: set[tuple[str, str, str, str, str]] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._read_failure: str | None = None
        self.reads = 0

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Seed the totals from the log (before the first request is judged), then keep
        reading it on a thread of its own."""
        if not self.enabled or self._db_path is None:
            return
        started = time.perf_counter()
        spend_log = open_spend_log(self._db_path)
        now = time.time()
        self._reseed(spend_log, now)
        self._published(now)
        took = 1000 * (time.perf_counter() - started)
        log.info(f"AI Bridge: budgets seeded from the log in {took:.0f} ms")
        self._thread = threading.Thread(
            target=self._read_log, args=(spend_log,), name="aibridge-budgets", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _published(self, now: float) -> None:
        if self._publish is None:
            return
        try:
            self._publish(now)
        except Exception:  # the log of limits is for readers: enforcement goes on without it
            log.exception("AI Bridge: could not write the budgets into the log")

    def _reseed(self, spend_log: SpendLog | PostgresSpendLog, now: float) -> None:
        windows = {p: (w.start, w.end) for p, w in self.ledger.windows(now).items()}
        seed = spend_log.seed(windows, self.ledger.pending_ids)
        self.ledger.reseed(seed.per_user, seed.confirmed, now)
        self.reads += 1

    def refresh(self, spend_log: SpendLog | PostgresSpendLog, *, whole: bool = False) -> None:
        """One read of the log: the rows it gained, or all of it again."""
        now = time.time()
        uses = None if whole else spend_log.new_uses()
        if uses is None:
            self._reseed(spend_log, now)
        else:
            self.ledger.add_logged(uses, now)
            self.reads += 1

    def _read_log(self, spend_log: SpendLog | PostgresSpendLog) -> None:
        last_seed = time.monotonic()
        period_starts = {p: w.start for p, w in self.ledger.windows(time.time()).items()}
        try:
            while not self._stop.wait(self.governance.refresh_seconds):
                now_starts = {p: w.start for p, w in self.ledger.windows(time.time()).items()}
                whole = now_starts != period_starts or time.monotonic() - last_seed > RESEED_SECONDS
                try:
                    self.refresh(spend_log, whole=whole)
                except Exception as e:  # a locked or replaced file: try again next time
                    spend_log.close()
                    if str(e) != self._read_failure:
                        log.warning(f"AI Bridge: budgets cannot read the log ({e}); retrying")
                        self._read_failure = str(e)
                    continue
                if self._read_failure is not None:
                    log.info("AI Bridge: budgets read the log again")
                    self._read_failure = None
                if whole:
                    if now_starts != period_starts:
                        self._published(time.time())
                    last_seed, period_starts = time.monotonic(), now_starts
        finally:
            spend_log.close()

    # ---- the request hook ------------------------------------------------------------------

    def limits_for(self, user_id: str) -> EffectiveLimits:
        limits = self._effective.get(user_id)
        if limits is None:
            limits = self.governance.effective(user_id)
            if len(self._effective) >= _EFFECTIVE_MEMO_MAX:
                self._effective.clear()
            self._effective[user_id] = limits
        return limits

    def admit(
        self, user_id: str, credential_kind: str, now: float | None = None
    ) -> Admission | Refusal:
        """Let a request through (holding a concurrency slot when one is limited) or refuse
        it: a spent budget first (403, final), then the rate (429), then concurrency (429)."""
        limits = self.limits_for(user_id)
        if limits.empty:
            return FREE_ADMISSION
        now = time.time() if now is None else now
        warnings: list[str] = []
        if limits.budgets and credential_kind == PAID_BY_THE_BRIDGE:
            for budget in limits.budgets:
                refusal = self._judge_budget(budget, now, warnings)
                if refusal is not None:
                    return refusal
        rpm = limits.requests_per_minute
        if rpm == 0 or limits.concurrent_requests == 0:
            return self._suspended(
                user_id, "requests_per_minute" if rpm == 0 else "concurrent_requests"
            )
        recent = None
        if rpm is not None:
            recent = self._recent.get(user_id)
            if recent is None:
                if len(self._recent) >= _RECENT_USERS_MAX:
                    self._forget_idle(now)
                recent = self._recent[user_id] = deque()
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= rpm:
                return self._rate_refusal(user_id, rpm, recent, now)
        concurrent = limits.concurrent_requests
        if concurrent is not None:
            in_flight = self._in_flight.get(user_id, 0)
            if in_flight >= concurrent:
                return self._concurrency_refusal(user_id, concurrent, in_flight)
            self._in_flight[user_id] = in_flight + 1
        if recent is not None:
            recent.append(now)
        slots = self._in_flight if concurrent is not None else None
        return Admission(user_id, slots, warnings)

    def _forget_idle(self, now: float) -> None:
        """Identities are unbounded (BYOK keys, proxyauth names): windows with nothing in the
        last minute are dropped."""
        for user_id in [
            u for u, times in self._recent.items() if not times or times[-1] <= now - 60
        ]:
            del self._recent[user_id]

    def release(self, admission: Admission | None) -> None:
        """The admitted request ended (however): its slot is free again. Idempotent."""
        if admission is None or admission.released:
            return
        admission.released = True
        slots = admission.slots
        if slots is not None:
            left = slots.get(admission.user_id, 0) - 1
            if left > 0:
                slots[admission.user_id] = left
            else:
                slots.pop(admission.user_id, None)

    def record_use(
        self,
        user_id: str,
        credential_kind: str | None,
        interception_id: str,
        started_at: str,
        usd: float,
        tokens: int,
    ) -> None:
        """An exchange of this bridge finished with a cost: counted now, not at the next read."""
        if not self.enabled or credential_kind != PAID_BY_THE_BRIDGE or not (usd or tokens):
            return
        self.ledger.add_local(Use(interception_id, user_id, started_at, usd, tokens), time.time())

    # ---- verdicts --------------------------------------------------------------------------

    def _judge_budget(self, budget: Budget, now: float, warnings: list[str]) -> Refusal | None:
        usd, tokens = self.ledger.used(budget.scope, budget.owner, budget.period, now)
        used = usd if budget.metric == "spend_usd" else tokens
        warn_at = self.governance.warn_at
        if used < budget.limit and (warn_at is None or used < warn_at * budget.limit):
            return None  # nearly every request: nothing to say, nothing to format
        window = self.ledger.windows(now)[budget.period]
        zone, zone_name = self.governance.zone, self.governance.time_zone
        resets = describe_local(window.end_instant, zone, zone_name)
        if used >= budget.limit:
            message = (
                f"AI Bridge: {budget.title()} is used up ({budget.amount(used)} of "
                f"{budget.amount(budget.limit)} since "
                f"{describe_local(window.start_instant, zone, zone_name)}). Requests are refused "
                f"until it resets at {resets} (in {describe_wait(window.end_epoch - now)}); "
                f"to raise it, ask the bridge's operator ({budget.source})."
            )
            self._log_once(budget, window.start, "spent", message)
            return Refusal(
                403,
                message,
                {
                    "x-aibridge-limit": f"{budget.metric}.{budget.period}",
                    "x-aibridge-budget-resets": window.end,
                },
                self._detail(budget, used, window.end),
            )
        share = math.floor(100 * used / budget.limit)  # 99.7% used is not "100%" yet
        text = (
            f"{share}% of {budget.title()} is used ({budget.amount(used)} of "
            f"{budget.amount(budget.limit)}), resets at {resets}"
        )
        warnings.append(text)
        self._log_once(budget, window.start, "warning", text)
        return None

    def _log_once(self, budget: Budget, period_start: str, kind: str, text: str) -> None:
        """One log line per budget, period and kind (warning, spent), not one per request."""
        key = (budget.scope, budget.owner, f"{budget.metric}.{budget.period}", period_start, kind)
        if key in self._warned:
            return
        if len(self._warned) >= 100_000:
            self._warned.clear()
        self._warned.add(key)
        log.warning(f"AI Bridge: budget {kind}: {text}")

    @staticmethod
    def _detail(budget: Budget, used: float, resets_at: str) -> dict[str, Any]:
        return {
            "limit": f"{budget.metric}.{budget.period}",
            "scope": budget.scope,
            "owner": budget.owner,
            "limit_value": budget.limit,
            "used": round(used, 6),
            "resets_at": resets_at,
            "source": budget.source,
        }

    @staticmethod
    def _suspended(user_id: str, limit: str) -> Refusal:
        """A rate or concurrency of 0: no retry can succeed, so the answer is final (403)."""
        message = (
            f"AI Bridge: user {user_id} may send no requests ({limit} is 0); "
            "to change that, ask the bridge's operator"
        )
        detail = {"limit": limit, "scope": "user", "owner": user_id, "limit_value": 0}
        return Refusal(403, message, {"x-aibridge-limit": limit}, detail)

    @staticmethod
    def _rate_refusal(user_id: str, rpm: int, recent: deque[float], now: float) -> Refusal:
        wait = max(1, math.ceil(recent[0] + 60 - now)) if recent else 60
        message = (
            f"AI Bridge: user {user_id} may send {rpm} requests per minute and sent {len(recent)} "
            f"in the last minute: retry in {wait} s"
        )
        detail = {"limit": "requests_per_minute", "scope": "user", "owner": user_id}
        detail |= {"limit_value": rpm, "used": len(recent), "retry_after": wait}
        return Refusal(
            429,
            message,
            {"retry-after": str(wait), "x-aibridge-limit": "requests_per_minute"},
            detail,
        )

    @staticmethod
    def _concurrency_refusal(user_id: str, limit: int, in_flight: int) -> Refusal:
        wait = CONCURRENCY_RETRY_SECONDS
        message = (
            f"AI Bridge: user {user_id} may have {limit} request{'s' * (limit != 1)} in flight "
            f"at once and has {in_flight}: retry when one of them has finished"
        )
        detail = {"limit": "concurrent_requests", "scope": "user", "owner": user_id}
        detail |= {"limit_value": limit, "used": in_flight, "retry_after": wait}
        return Refusal(
            429,
            message,
            {"retry-after": str(wait), "x-aibridge-limit": "concurrent_requests"},
            detail,
        )


def warning_header(warnings: list[str]) -> str:
    """The warning header's value: ASCII only (a user id may not be), one warning per item."""
    text = "; ".join(warnings).encode("ascii", "backslashreplace").decode("ascii")
    # CR and LF would end the header (a proxyauth name can hold anything): escaped as well.
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
