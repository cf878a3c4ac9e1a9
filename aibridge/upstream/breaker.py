"""A circuit breaker per (provider, model) (DESIGN §10): pure, the clock injected.

Every request asks ``admit`` first and gives its ``Pass`` back to ``settle`` exactly once with
the upstream status (a trial slot not given back stays taken).

- Disabled settings: ``admit`` always passes, ``settle`` does nothing, ``snapshot`` is empty.
- A failure is a status in ``TRIPPING_STATUSES`` or ``unreachable`` (the bridge could not reach
  upstream). Any other status (2xx, 4xx, 500, 502...) is a success. ``status=None`` without
  ``unreachable`` is no verdict (the client went away, a bridge error): it changes no count and
  only frees a trial slot.
- CLOSED: a failure adds to the consecutive count, a success resets it to 0; ``failures`` in a
  row open the circuit for ``cool_down_seconds`` (Transition CLOSED→OPEN).
- OPEN: ``admit`` refuses with the cool-down left. Once it has passed, ``admit`` moves the
  circuit to HALF_OPEN (no Transition) and lets ``half_open_requests`` trials through at once;
  more are refused (retry_after 1) while those are in flight.
- HALF_OPEN: a trial's success closes the circuit (HALF_OPEN→CLOSED, count 0), its failure opens
  it for another cool-down (HALF_OPEN→OPEN), no verdict frees its slot.
- Every opening bumps the circuit's generation (from one counter for all circuits, so it only
  grows). A result for a Pass of an older generation is ignored: a late success does not close
  an open circuit, a late failure does not extend it.

Memory: model names come from clients, so only circuits that have seen a failure are tracked,
at most ``max_circuits``. A closed circuit back at 0 failures is forgotten unless it has tripped
(then it is kept for its ``trips`` count). When the table is full the least recently used
closed circuit is dropped (its trips with it); if none is closed, the new failing circuit is
not tracked: the breaker fails open and never refuses a circuit it does not track.

``admit`` and ``settle`` run on the event loop; ``snapshot`` may run on a metrics thread, so
every method holds one lock for a few dictionary operations.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

TRIPPING_STATUSES: Final = frozenset({503, 504, 529})


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    enabled: bool = True
    # Consecutive failed answers that open a circuit.
    failures: int = 5
    # How long an open circuit refuses before it lets trials through.
    cool_down_seconds: float = 30.0
    # Trial requests let through at once after the cool-down.
    half_open_requests: int = 1

    def __post_init__(self) -> None:
        # The config validates these with file and key; this guards other callers.
        if self.failures < 1:
            raise ValueError(f"failures must be >= 1, not {self.failures}")
        if not (math.isfinite(self.cool_down_seconds) and self.cool_down_seconds > 0):
            raise ValueError(f"cool_down_seconds must be > 0, not {self.cool_down_seconds}")
        if self.half_open_requests < 1:
            raise ValueError(f"half_open_requests must be >= 1, not {self.half_open_requests}")


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Pass:
    """What ``admit`` gives an admitted request; ``settle`` takes it back."""

    provider: str
    model: str
    generation: int
    trial: bool


@dataclass(frozen=True, slots=True)
class CircuitOpen:
    """``admit`` refused: the circuit is open, or half-open with its trials in flight."""

    provider: str
    model: str
    state: CircuitState
    # The consecutive failures that opened it.
    failures: int
    # The last failing status (None: upstream unreachable).
    last_status: int | None
    # Whole seconds >= 1 until a request may be let through.
    retry_after: int


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change, for the caller to log and count. ``failures`` and ``last_status`` are
    those that opened the circuit (on closing: those that had kept it open)."""

    provider: str
    model: str
    old: CircuitState
    new: CircuitState
    failures: int
    last_status: int | None


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    provider: str
    model: str
    state: CircuitState
    consecutive_failures: int
    # How many times it has opened (CLOSED→OPEN and HALF_OPEN→OPEN).
    trips: int
    # What admit would answer now if it refused; 0 when it would pass.
    retry_after: int


@dataclass(slots=True)
class _Circuit:
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    last_status: int | None = None
    generation: int = 0
    open_until: float = 0.0
    trials: int = 0
    trips: int = 0


_Key = tuple[str, str]


class CircuitBreakers:
    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float] = time.monotonic,
        max_circuits: int = 10_000,
    ) -> None:
        if max_circuits < 1:
            raise ValueError(f"max_circuits must be >= 1, not {max_circuits}")
        self.settings = settings
        self._clock = clock
        self._max = max_circuits
        self._circuits: dict[_Key, _Circuit] = {}
        # The tracked circuits that are closed, least recently used first: what may be dropped.
        self._closed_lru: OrderedDict[_Key, None] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CircuitBreakers({self.settings!r}, tracked={len(self._circuits)})"

    @staticmethod
    def is_failure(status: int | None, unreachable: bool) -> bool:
        return unreachable or status in TRIPPING_STATUSES

    def admit(self, provider: str, model: str) -> Pass | CircuitOpen:
        if not self.settings.enabled:
            return Pass(provider, model, 0, False)
        key = (provider, model)
        with self._lock:
            c = self._circuits.get(key)
            if c is None:
                return Pass(provider, model, 0, False)
            if c.state is CircuitState.CLOSED:
                self._closed_lru.move_to_end(key)
                return Pass(provider, model, c.generation, False)
            if c.state is CircuitState.OPEN:
                left = c.open_until - self._clock()
                if left > 0:
                    return CircuitOpen(
                        provider, model, c.state, c.failures, c.last_status, _whole(left)
                    )
                c.state = CircuitState.HALF_OPEN
                c.trials = 0
            if c.trials >= self.settings.half_open_requests:
                return CircuitOpen(provider, model, c.state, c.failures, c.last_status, 1)
            c.trials += 1
            return Pass(provider, model, c.generation, True)

    def settle(
        self, ticket: Pass, status: int | None, *, unreachable: bool = False
    ) -> Transition | None:
        if not self.settings.enabled:
            return None
        failed = self.is_failure(status, unreachable)
        if not failed and status is None:
            verdict: bool | None = None
        else:
            verdict = not failed  # True: success
        key = (ticket.provider, ticket.model)
        with self._lock:
            c = self._circuits.get(key)
            if c is None:
                return self._first_failure(key, status) if failed else None
            if ticket.generation < c.generation:
                return None  # admitted before the circuit last opened
            if c.state is CircuitState.CLOSED:
                return self._settle_closed(key, c, verdict, status)
            if c.state is CircuitState.HALF_OPEN and ticket.trial:
                c.trials = max(0, c.trials - 1)
                if verdict is None:
                    return None
                if verdict:
                    t = Transition(*key, c.state, CircuitState.CLOSED, c.failures, c.last_status)
                    c.state = CircuitState.CLOSED
                    c.failures = 0
                    c.trials = 0
                    self._closed_lru[key] = None
                    return t
                c.failures += 1
                c.last_status = status
                return self._open(key, c)
            # OPEN, or a non-trial in HALF_OPEN: only passes of an older generation get here.
            return None

    def snapshot(self) -> list[CircuitSnapshot]:
        with self._lock:
            now = self._clock()
            return [
                CircuitSnapshot(
                    provider,
                    model,
                    c.state,
                    c.failures,
                    c.trips,
                    self._retry_after(c, now),
                )
                for (provider, model), c in self._circuits.items()
            ]

    # -- under the lock ------------------------------------------------------------------------

    def _retry_after(self, c: _Circuit, now: float) -> int:
        if c.state is CircuitState.OPEN:
            left = c.open_until - now
            return _whole(left) if left > 0 else 0
        if c.state is CircuitState.HALF_OPEN:
            return 1 if c.trials >= self.settings.half_open_requests else 0
        return 0

    def _first_failure(self, key: _Key, status: int | None) -> Transition | None:
        if len(self._circuits) >= self._max:
            if not self._closed_lru:
                return None  # every tracked circuit is open or half-open: fail open, not grow
            dropped, _ = self._closed_lru.popitem(last=False)
            del self._circuits[dropped]
        c = _Circuit()
        self._circuits[key] = c
        self._closed_lru[key] = None
        return self._settle_closed(key, c, False, status)

    def _settle_closed(
        self, key: _Key, c: _Circuit, verdict: bool | None, status: int | None
    ) -> Transition | None:
        if verdict is None:
            return None
        if verdict:
            c.failures = 0
            if c.trips == 0:
                # Nothing worth remembering: untracked is the same as closed at 0.
                del self._circuits[key]
                del self._closed_lru[key]
            else:
                self._closed_lru.move_to_end(key)
            return None
        c.failures += 1
        c.last_status = status
        if c.failures < self.settings.failures:
            self._closed_lru.move_to_end(key)
            return None
        del self._closed_lru[key]
        return self._open(key, c)

    def _open(self, key: _Key, c: _Circuit) -> Transition:
        old = c.state
        self._generation += 1
        c.generation = self._generation
        c.state = CircuitState.OPEN
        c.open_until = self._clock() + self.settings.cool_down_seconds
        c.trials = 0
        c.trips += 1
        return Transition(*key, old, CircuitState.OPEN, c.failures, c.last_status)


def _whole(seconds: float) -> int:
    """Whole seconds to wait, at least 1: a client told 0 would come straight back."""
    return max(1, math.ceil(seconds))
