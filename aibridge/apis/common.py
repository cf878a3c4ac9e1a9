"""What every API module shares: the facts read from a request and a response, request
checks, token counts, and the event loop of an accumulator (decode one event, count what is
malformed, never raise)."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from aibridge import strict_json

# SQLite's INTEGER is signed 64-bit; a larger count cannot be stored as a number.
MAX_COUNT: Final = 2**63 - 1
# A service tier longer than this is not one (the APIs' are "default", "flex", "standard"…).
MAX_TIER_CHARS: Final = 32


@dataclass(slots=True)
class RequestInfo:
    """What the interception records from a request body, whatever the API."""

    model: str | None
    stream: bool
    background: bool
    prompt: str | None
    correlating_tool_call_id: str | None
    previous_response_id: str | None
    session_id: str | None
    # Facts for ``interceptions.metadata`` besides the bridge's own (Chat Completions: whether
    # a stream's usage was requested, see openai_chat.amend_request).
    metadata: dict[str, Any] | None = None


@dataclass(slots=True)
class ResponseResult:
    """What an accumulator yields at the end: the interception's outcome and the rows of
    ``token_usages``, ``tool_usages`` and ``model_thoughts`` (without ids and times)."""

    response_id: str | None
    response_model: str | None
    status: str | None
    error: str | None
    token_usage: dict[str, Any] | None
    tool_usages: list[dict[str, Any]]
    thoughts: list[dict[str, Any]]
    malformed_events: int
    terminal_seen: bool
    error_code: str | None = None


class Accumulator(Protocol):
    """Collects the records of one response from its stream events or its buffered body."""

    malformed_events: int

    @property
    def ended(self) -> bool:
        """The response is over by the API's protocol (a terminal event or an error)."""
        ...

    def feed_event(self, event_name: str | None, data: str | bytes) -> None: ...

    def feed_response_object(self, obj: Any) -> None: ...

    def result(self) -> ResponseResult: ...


@dataclass(frozen=True, slots=True)
class Api:
    """What differs between the APIs the bridge speaks: one per module in ``aibridge.apis``.

    Everything else (routing, identity, the tee, outcome, rows, the recorder) is written
    against this and never asks which API it has.
    """

    name: str  # the ``interceptions.api`` value
    title: str  # for messages: "the response held no <title> object"
    path: str  # the API path of the POST request that is bridged and recorded
    provider_types: frozenset[str]  # the provider types that serve it
    # Decode and check a request body (RequestError → 400); the original bytes are forwarded.
    parse_request: Callable[[bytes], tuple[dict[str, Any], RequestInfo]]
    # A request the bridge cannot bridge although it is valid: (status, message), else None.
    refusal: Callable[[RequestInfo], tuple[int, str] | None]
    new_accumulator: Callable[[], Accumulator]
    # SSE event names the records need (events without a name are always fed; None: every
    # named event too), and the unwanted ones that come by the hundred, which the SSE parser
    # passes over in runs.
    wanted_events: frozenset[str] | None
    delta_events: frozenset[str]
    error_body: Callable[[int, str], bytes]  # the bridge's own errors, in the API's shape
    passthrough: tuple[str, ...] = ()  # its provider paths let through by default
    # A WebSocket mode on its path (GET with Upgrade), read by aibridge.transport.websocket.
    websocket: bool = False
    # The one edit the bridge may make to a request body (DESIGN §2): (body, info, config,
    # whether the body is compressed) → the bytes to forward instead, or None to keep them.
    amend_request: Callable[[bytes, RequestInfo, Any, bool], bytes | None] | None = None
    # Whole events, by their bytes, that no record needs whatever their name (text deltas in
    # their provider's exact spelling): the SSE parser passes over runs of them undecoded.
    skippable_events: re.Pattern[bytes] | None = None
    # A buffered response body decoded as the records read it (ValueError if it is not
    # JSON): an API whose response objects carry much that no record needs decodes less.
    decode_response: Callable[[bytes], Any] = orjson.loads


# The inside of a JSON string, as bytes, that every parser reads as one and orjson accepts:
# no quote, backslash or control byte outside a valid escape, no escaped surrogate (left to
# a full decode). Any byte above ASCII: the stream tee decodes them with replacement, which
# never touches an ASCII byte. The byte tests of the stream tee are built on it.
STRING_INSIDE: Final = re.compile(
    rb'[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u(?![dD][89a-fA-F])[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*'
)


class RequestError(ValueError):
    """The request body cannot be bridged; the message is meant for a 400 to the client."""


def load_body(body: bytes, watched: frozenset[str]) -> dict[str, Any]:
    """A request body decoded strictly (strict_json): a JSON object whose `watched` fields
    appear once each, else a RequestError saying what is wrong."""
    if not body:
        raise RequestError("empty request body")
    try:
        return strict_json.loads_object(body, watched=watched)
    except strict_json.DuplicateKey as exc:
        raise RequestError(f"request body is ambiguous: {exc}") from None
    except strict_json.NotAnObject:
        raise RequestError("request body must be a JSON object") from None
    except strict_json.StrictJSONError as exc:
        if not body.strip():
            raise RequestError("empty request body") from None
        raise RequestError(f"request body is not valid JSON: {exc}") from None


def checked(obj: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """``obj[key]`` if absent, null or of `kind`; else a RequestError naming the field."""
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise RequestError(f"'{key}' must be {what}")
    return value


def content_text(content: Any, part_type: str) -> str | None:
    """A message's text: string content as is, else the texts of its `part_type` parts joined
    with newlines (images, files and anything else skipped); None when it has no text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = [
        part["text"]
        for part in content
        if isinstance(part, dict)
        and part.get("type") == part_type
        and isinstance(part.get("text"), str)
    ]
    return "\n".join(texts) if texts else None


def count(value: Any) -> int | None:
    """A token count as SQLite can store it; None for anything that is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_COUNT else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value) if 0 <= value <= MAX_COUNT else None
    return None


# Data that is no event: taken by no accumulator, counted by none as malformed (compared by
# equality, so a long event's data is never hashed for it).
NOT_EVENTS: Final = ("[DONE]", b"[DONE]", "", b"")


class EventAccumulator:
    """The part of an API's accumulator that takes what upstream sent: stream events, each
    decoded on its own and handed to ``_dispatch`` with its type (the ``type`` field, else
    the SSE event name), or a buffered body, handed to ``_feed_object``. Bad JSON, a
    non-object or an event without a type counts as malformed."""

    __slots__ = ("malformed_events",)

    # How an event's data is decoded (ValueError if it is not JSON); an API may decode less.
    decode_event: Callable[[str | bytes], Any] = staticmethod(orjson.loads)
    decode_response: Callable[[bytes], Any] = staticmethod(orjson.loads)

    def __init__(self) -> None:
        self.malformed_events = 0

    def feed_event(self, event_name: str | None, data: str | bytes) -> None:
        """Take one event; never raises."""
        if not data or data in NOT_EVENTS or not self._accepts_events():
            return
        try:
            event = self.decode_event(data)
        except ValueError:
            self.malformed_events += 1
            return
        self._take(event_name, event)

    def feed_decoded(self, event_name: str | None, event: Any) -> None:
        """Take one event already decoded with ``decode_event`` (by a caller that read it
        first); None stands for data that would not decode. Never raises."""
        if self._accepts_events():
            self._take(event_name, event)

    def _take(self, event_name: str | None, event: Any) -> None:
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

    def feed_response_body(self, body: bytes) -> None:
        """Take a buffered response body as received; undecodable JSON counts as malformed."""
        try:
            obj = self.decode_response(body)
        except ValueError:
            self.malformed_events += 1
            return
        self.feed_response_object(obj)

    def feed_response_object(self, obj: Any) -> None:
        """Take a buffered (non-streamed) body already decoded: the API's response object, or
        its error body (4xx/5xx); never raises."""
        try:
            self._feed_object(obj)
        except Exception:
            self.malformed_events += 1

    def _accepts_events(self) -> bool:
        """False once nothing more belongs to this response."""
        return True

    def _dispatch(self, event_type: str, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def _feed_object(self, obj: Any) -> None:
        raise NotImplementedError


# orjson writes containers nested this deep at most (it reads 1024).
_MAX_DEPTH: Final = 254
_CONTAINER_COST: Final = 56
_ITEM_COST: Final = 8


def json_cost(value: Any, limit: int) -> int | None:
    """About the bytes ``value`` holds in memory, or None when orjson could not write it.

    Counting stops past ``limit`` (the number returned is then above it). A walk, not
    ``orjson.dumps``: dumps reserves 16 bytes per character of a string, so measuring an
    8 MiB value that way would cost 128 MiB. The walk is as deep as the value, never more.
    """
    cost = 0
    stack: list[Iterator[Any]] = [iter((value,))]
    while stack:
        for item in stack[-1]:
            if isinstance(item, str):
                cost += sys.getsizeof(item)
            elif isinstance(item, dict | list):
                if len(stack) > _MAX_DEPTH:
                    return None
                cost += _CONTAINER_COST + _ITEM_COST * len(item)
                if isinstance(item, dict):
                    for key in item:
                        if not isinstance(key, str):
                            return None
                        cost += sys.getsizeof(key)
                if cost > limit:
                    return cost
                stack.append(iter(item.values() if isinstance(item, dict) else item))
                break
            elif item is None or isinstance(item, bool | float):
                cost += _ITEM_COST
            elif isinstance(item, int):
                if not -(2**63) <= item < 2**64:
                    return None
                cost += _ITEM_COST
            else:
                return None
            if cost > limit:
                return cost
        else:
            stack.pop()
    return cost
