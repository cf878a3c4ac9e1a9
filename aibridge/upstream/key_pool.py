"""Several keys for one provider (DESIGN §10): pure, the clocks injected.

- ``choose`` goes round robin over the keys usable now: ACTIVE, or PARKED whose time has passed
  (it is ACTIVE again). When none is usable it answers ``AllParked`` with the shortest wait.
- ``answered`` with 429 parks the key for the answer's Retry-After (capped at
  ``max_park_seconds``) or ``park_seconds`` without one; a parked key stays parked until the
  later of the two ends. 401 or 403 disables the key until restart, unless it is the last key
  not disabled: that one stays in use ("kept_last"), so clients see the provider's own error
  rather than the bridge refusing everything, and ``choose`` always has a key to wait for.
  Other statuses change nothing, and so does any answer for a key disabled already.

Parking is timed on the monotonic ``clock``; an HTTP-date Retry-After is read against
``wall_clock``. ``choose`` and ``answered`` run on the event loop, ``snapshot`` may run on a
metrics thread: one lock guards the keys. A key never appears in a repr or a snapshot, only
its hint.
"""

from __future__ import annotations

import enum
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final, Literal

from aibridge.hints import hint

# Longer than any honest value (an HTTP-date is 29 characters): not worth parsing.
_MAX_HEADER_TEXT: Final = 64
# ASCII digits only: float() would also take "1_000", "1e9", "nan", "inf" and Arabic digits.
_DECIMAL: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    # A 429 without a usable Retry-After parks the key this long.
    park_seconds: float = 60.0
    # A Retry-After is capped to this: a hostile or buggy value parks no key for a year.
    max_park_seconds: float = 3600.0

    def __post_init__(self) -> None:
        # The config validates these with file and key; this guards other callers.
        for name in ("park_seconds", "max_park_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, not {value}")


class KeyState(enum.Enum):
    ACTIVE = "active"
    PARKED = "parked"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class KeyChoice:
    index: int
    key: str = field(repr=False)
    # aibridge.hints.hint(key): what logs and records show.
    hint: str


@dataclass(frozen=True, slots=True)
class AllParked:
    provider: str
    # The shortest wait, whole seconds >= 1.
    retry_after: int
    parked: int


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """What ``answered`` changed, for the caller to log: "parked" at warning level, "disabled"
    and "kept_last" at error level."""

    kind: Literal["parked", "disabled", "kept_last"]
    provider: str
    index: int
    hint: str
    status: int
    # How long the key is parked from now ("parked" only).
    seconds: float | None


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    provider: str
    index: int
    hint: str
    state: KeyState
    # Whole seconds it stays parked; 0 when it is not.
    parked_for: int
    parks: int
    disabled_status: int | None


@dataclass(slots=True)
class _Key:
    key: str = field(repr=False)
    hint: str
    state: KeyState = KeyState.ACTIVE
    parked_until: float = 0.0
    parks: int = 0
    disabled_status: int | None = None


def _whole_seconds(left: float) -> int:
    """A wait in whole seconds, rounded up. `until - now` of `until = now + 1800` is not
    exactly 1800 in floating point (248.3 + 1800 - 248.3 > 1800): the microseconds are
    rounded first, so a park of the maximum never reads as a second longer."""
    return math.ceil(round(left, 6))


class KeyPool:
    def __init__(
        self,
        provider: str,
        keys: Sequence[str],
        settings: PoolSettings,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError(f"provider {provider!r}: a key pool needs at least one key")
        self.provider = provider
        self.settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        self._keys = [_Key(k, hint(k)) for k in keys]
        self._next = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        hints = [k.hint for k in self._keys]
        return f"KeyPool({self.provider!r}, keys={hints!r})"

    def choose(self) -> KeyChoice | AllParked:
        with self._lock:
            now = self._clock()
            n = len(self._keys)
            for step in range(n):
                i = (self._next + step) % n
                k = self._keys[i]
                if k.state is KeyState.PARKED and k.parked_until <= now:
                    k.state = KeyState.ACTIVE
                if k.state is KeyState.ACTIVE:
                    self._next = (i + 1) % n
                    return KeyChoice(i, k.key, k.hint)
            # Never empty: the last key not disabled is kept (see answered).
            waits = [k.parked_until - now for k in self._keys if k.state is KeyState.PARKED]
            return AllParked(self.provider, max(1, _whole_seconds(min(waits))), len(waits))

    def answered(
        self, choice: KeyChoice, status: int, headers: Mapping[str, str]
    ) -> KeyEvent | None:
        if status not in (401, 403, 429):
            return None
        # Read the header before taking the lock: it is the only costly part.
        wait = retry_after_seconds(headers, self._wall_clock()) if status == 429 else None
        with self._lock:
            if not 0 <= choice.index < len(self._keys):
                return None
            k = self._keys[choice.index]
            if k.key != choice.key or k.state is KeyState.DISABLED:
                return None  # another pool's choice, or disabled already
            if status == 429:
                now = self._clock()
                seconds = (
                    self.settings.park_seconds
                    if wait is None
                    else min(wait, self.settings.max_park_seconds)
                )
                until = now + seconds
                if k.state is KeyState.PARKED:
                    until = max(until, k.parked_until)
                k.state = KeyState.PARKED
                k.parked_until = until
                k.parks += 1
                return KeyEvent("parked", self.provider, choice.index, k.hint, status, until - now)
            others = sum(1 for o in self._keys if o is not k and o.state is not KeyState.DISABLED)
            if others == 0:
                return KeyEvent("kept_last", self.provider, choice.index, k.hint, status, None)
            k.state = KeyState.DISABLED
            k.disabled_status = status
            return KeyEvent("disabled", self.provider, choice.index, k.hint, status, None)

    def snapshot(self) -> list[KeySnapshot]:
        with self._lock:
            now = self._clock()
            out = []
            for i, k in enumerate(self._keys):
                state = k.state
                left = k.parked_until - now
                if state is KeyState.PARKED and left <= 0:
                    state = KeyState.ACTIVE  # what choose() would make of it
                parked_for = _whole_seconds(left) if state is KeyState.PARKED else 0
                out.append(
                    KeySnapshot(
                        self.provider, i, k.hint, state, parked_for, k.parks, k.disabled_status
                    )
                )
            return out


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """How long an answer asks to wait, in seconds: ``retry-after-ms`` (OpenAI) first, then
    ``retry-after`` as delta-seconds or an HTTP-date read against ``now`` (a wall-clock epoch;
    a date in the past is 0). None when neither header holds a usable value."""
    ms = _decimal(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    text = headers.get("retry-after")
    seconds = _decimal(text)
    if seconds is not None:
        return seconds
    if text is None or len(text) > _MAX_HEADER_TEXT:
        return None
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC with no claim about the local zone (RFC 5322)
        when = when.replace(tzinfo=UTC)
    try:
        left = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    return max(0.0, left) if math.isfinite(left) else None


def _decimal(text: str | None) -> float | None:
    if text is None or len(text) > _MAX_HEADER_TEXT:
        return None
    text = text.strip(" \t")
    if not _DECIMAL.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None
