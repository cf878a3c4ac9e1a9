"""The Responses API over WebSocket (Codex's first choice of transport).

One socket carries many responses: each client ``response.create`` message is a request
(validated like a POST body, one interception each) and the server's messages are the same
events an SSE stream carries, one JSON object per message.

Client messages are judged by what they decode to, never by how they are spelled, since the
provider decodes them too: a message whose ``type`` decodes to ``response.create`` (escaped,
spaced or ordered any way) is a turn; one the bridge cannot read the way the provider will is
refused and never forwarded (see read_turn).

Server events are credited by response id. A turn takes the id of the first event naming one
it does not know (normally its ``response.created``): responses are answered in order, so
that is the oldest turn without an id yet. An event naming an id goes to that id's turn; one
naming none (deltas, an ``error``, anything undecodable) to the turn streaming now (the
newest with an id), else to the oldest open one. So an ``error`` without id ends the
response being streamed or, before any ``response.created``, the turn waiting longest: in
either case the one the provider is answering.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from aibridge import strict_json
from aibridge.apis.common import NOT_EVENTS, Api, RequestError, RequestInfo
from aibridge.apis.openai_responses import WANTED_EVENTS, decode_event, request_info
from aibridge.auth import Identity
from aibridge.config import Provider

log = logging.getLogger(__name__)

CREATE: Final = "response.create"
# The event type sits at the start of nearly every server message; reading it there lets the
# bridge skip decoding the thousands of text deltas a response carries. Whitespace is JSON's.
_TYPE_AT_START: Final = re.compile(
    rb'[ \t\r\n]*\{[ \t\r\n]*"type"[ \t\r\n]*:[ \t\r\n]*"([^"\\]{1,100})"'
)
_WANTED_TYPES: Final = frozenset(name.encode() for name in WANTED_EVENTS)
# Ids of finished responses kept, so that a late event of one never takes a newer turn.
_FINISHED_IDS_KEPT: Final = 64
# Ids no turn answers to, logged once each (bounded: the provider could name many).
_STRAY_IDS_LOGGED: Final = 256


@dataclass(slots=True)
class SocketState:
    """What the bridge keeps about one bridged WebSocket."""

    provider: Provider
    identity: Identity
    api: Api  # the API whose turns the socket carries (Responses)
    open_turns: deque[Any] = field(default_factory=deque)  # Exchanges, oldest first
    # Open turns by the response id they answer, and those ids by the turn's interception id
    _turn_of: dict[str, Any] = field(default_factory=dict, repr=False)
    _response_of: dict[str, str] = field(default_factory=dict, repr=False)
    _finished: deque[str] = field(
        default_factory=lambda: deque(maxlen=_FINISHED_IDS_KEPT), repr=False
    )
    _strays: set[str] = field(default_factory=set, repr=False)

    def turn_for(self, event: Any) -> Any | None:
        """The open turn a server event (decoded by read_server_event) belongs to; None for an
        event of no open turn."""
        response_id = event_response_id(event)
        if response_id is None:
            return self._streaming()
        turn = self._turn_of.get(response_id)
        if turn is not None:
            return turn
        if response_id in self._finished:
            return None  # a late event of a response already recorded
        for turn in self.open_turns:
            if turn.interception_id not in self._response_of:
                self._turn_of[response_id] = turn
                self._response_of[turn.interception_id] = response_id
                return turn
        if response_id not in self._strays and len(self._strays) < _STRAY_IDS_LOGGED:
            self._strays.add(response_id)
            log.warning(
                "AI Bridge: the provider sent events of response %r, which no recorded turn "
                "on this WebSocket started",
                response_id,
            )
        return None

    def _streaming(self) -> Any | None:
        for turn in reversed(self.open_turns):
            if turn.interception_id in self._response_of:
                return turn
        return self.open_turns[0] if self.open_turns else None

    def close(self, turn: Any) -> None:
        """The turn ended: nothing more is credited to it."""
        self.open_turns = deque(t for t in self.open_turns if t is not turn)
        response_id = self._response_of.pop(turn.interception_id, None)
        if response_id is not None:
            del self._turn_of[response_id]
            self._finished.append(response_id)


def read_turn(content: bytes, is_text: bool) -> RequestInfo | None:
    """The request a client message makes, or None for another client event (forwarded as is).

    Raises RequestError (answered with a 400 error event; the message is never forwarded) for
    a message whose ``response.create`` body is invalid, and for one the bridge cannot judge:
    a binary message (the provider takes JSON text; refusing is the safe side), anything
    strict_json refuses (invalid JSON, invalid UTF-8, not an object), or an object with a
    top-level key given twice (a second ``type``, ``background``…), whatever that key.

    Duplicates nested deeper (inside ``input`` items, ``metadata``) are not refused: whether a
    message is a turn, and its ``background``, are top-level fields, so nested copies cannot
    hide a turn or a refusal. They can only decide which copy of a prompt, call id or session
    id the record shows, and the bridge reads the last copy, as JSON.parse, serde_json's
    maps, Go and Python do. (A message in orjson's own encoding, as Codex sends, is proven
    free of duplicates at every depth anyway.)
    """
    if not is_text:
        raise RequestError("binary WebSocket messages are not accepted: send events as JSON text")
    try:
        event = strict_json.loads_object(content)
    except strict_json.DuplicateKey as e:
        raise RequestError(f"WebSocket message is ambiguous: {e}") from None
    except strict_json.NotAnObject:
        raise RequestError("WebSocket message must be a JSON object") from None
    except strict_json.StrictJSONError as e:
        raise RequestError(f"WebSocket message is not valid JSON: {e}") from None
    if event.get("type") != CREATE:
        return None
    return request_info(event)


def read_server_event(content: bytes) -> Any:
    """A server event decoded once, for both the turn it belongs to and the turn's accumulator
    (``feed_decoded``); None when it is not JSON (the accumulator counts it as malformed)."""
    try:
        return decode_event(content)
    except ValueError:
        return None


def event_response_id(event: Any) -> str | None:
    """The id of the response a decoded server event names (``response.id``, else
    ``response_id``)."""
    if not isinstance(event, dict):
        return None
    response = event.get("response")
    response_id = response.get("id") if isinstance(response, dict) else None
    if not isinstance(response_id, str) or not response_id:
        response_id = event.get("response_id")
    return response_id if isinstance(response_id, str) and response_id else None


def worth_decoding(content: bytes) -> bool:
    """False only for server events the records never need (deltas and the like, and the
    empty or ``[DONE]`` messages a stream's accumulator ignores).

    Skipping is only an optimisation, so any doubt decodes: the type read at the start must
    be the event's only possible top-level ``type`` (a decoder keeps the last duplicate), so
    an event with another quoted ``"type"`` after it, or a ``\\u00`` escape (the only other
    way to spell the key), is decoded.
    """
    match = _TYPE_AT_START.match(content)
    if match is None:
        return content not in NOT_EVENTS
    if match.group(1) in _WANTED_TYPES:
        return True
    end = match.end()
    return content.find(b'"type"', end) >= 0 or content.find(b"\\u00", end) >= 0
