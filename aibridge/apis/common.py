"""What every API module shares: request checks, token counts, and the event loop of an
accumulator (decode one event, count what is malformed, never raise)."""

from __future__ import annotations

import math
from typing import Any, Final

import orjson

# SQLite's INTEGER is signed 64-bit; a larger count cannot be stored as a number.
MAX_COUNT: Final = 2**63 - 1
# A service tier longer than this is not one (the APIs' are "default", "flex", "standard"…).
MAX_TIER_CHARS: Final = 32


class RequestError(ValueError):
    """The request body cannot be bridged; the message is meant for a 400 to the client."""


def checked(obj: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """``obj[key]`` if absent, null or of `kind`; else a RequestError naming the field."""
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise RequestError(f"'{key}' must be {what}")
    return value


def count(value: Any) -> int | None:
    """A token count as SQLite can store it; None for anything that is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_COUNT else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value) if 0 <= value <= MAX_COUNT else None
    return None


class EventAccumulator:
    """The part of an API's accumulator that takes stream events: each is decoded on its
    own and handed to ``_dispatch`` with its type (the ``type`` field, else the SSE event
    name). Bad JSON, a non-object or an event without a type counts as malformed."""

    __slots__ = ("malformed_events",)

    def __init__(self) -> None:
        self.malformed_events = 0

    def feed_event(self, event_name: str | None, data: str | bytes) -> None:
        """Take one event; never raises."""
        if not data or data in ("[DONE]", b"[DONE]") or not self._accepts_events():
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.malformed_events += 1
            return
        if not isinstance(event, dict):
            self.malformed_events += 1
            return
        event_type = event.get("type")
        if not isinstance(event_type, str):
            event_type = event_name
        if event_type is None:
            self.malformed_events += 1
            return
        try:
            self._dispatch(event_type, event)
        except Exception:
            # Last line of defence: the extraction is written not to raise on any JSON,
            # but an audit log must never break a client's stream.
            self.malformed_events += 1

    def _accepts_events(self) -> bool:
        """False once nothing more belongs to this response."""
        return True

    def _dispatch(self, event_type: str, event: dict[str, Any]) -> None:
        raise NotImplementedError
