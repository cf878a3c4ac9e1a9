"""Messages of the Responses API over WebSocket (Codex's transport) as readable text.

One message is one event (aibridge.transport.websocket): a client ``response.create`` is
shown as the request it carries, with the Responses renderer's request layout; a server
event as its type and what it says: a text, reasoning or argument delta, an output item, a
finished response with its usage and output, an error. Other client events and event types
this view does not know are shown by their type and fields. A message that is binary, not
JSON, not an object or too large to decode is described and shown raw, bounded.

:func:`render_message` is pure and never raises.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from aibridge.view.common import (
    INDENT,
    LABEL_LIMIT,
    MESSAGE_LIMIT,
    VALUE_LIMIT,
    block,
    compact,
    error_text,
    plural,
    pretty,
    shorten,
    unreadable,
    value_text,
)
from aibridge.view.responses import (
    PROGRESS_EVENTS,
    TERMINAL_EVENTS,
    outcome_text,
    output_item_text,
    part_text,
    request_text,
)

CREATE: Final = "response.create"
# Larger messages are only previewed: decoding one costs the UI thread ~2 ms per MB, and a
# turn's real events (even response.completed with its whole output) stay far below this.
DECODE_LIMIT: Final = 16 << 20
BINARY_SHOWN: Final = 256  # bytes of a binary message shown, in hex
# Where an event's piece sits, in the order shown on its first line.
POSITION_FIELDS: Final = (
    ("output_index", "output"),
    ("content_index", "content"),
    ("summary_index", "summary"),
    ("item_id", "item"),
)
# Fields of a streamed piece (delta or done event): the text it carries, by name.
PIECE_FIELDS: Final = ("delta", "text", "arguments", "input", "refusal")
# Fields already shown in an event's first line, left out of the "other fields" shown.
SHOWN_ELSEWHERE: Final = frozenset({"type", "sequence_number", *(f for f, _ in POSITION_FIELDS)})


def render_message(data: bytes, *, from_client: bool, is_text: bool = True) -> str:
    """One WebSocket message of a Responses API socket as readable text. Never raises."""
    side = "client" if from_client else "server"
    try:
        return _render(data, side, is_text)
    except Exception as exc:  # the view must show something for any message
        return unreadable(f"AI Bridge could not render this {side} message", repr(exc), data)


def _render(data: bytes, side: str, is_text: bool) -> str:
    if not is_text:
        return _binary(data, side)
    if len(data) > DECODE_LIMIT:
        reason = f"{len(data)} bytes, too large to decode here (over {DECODE_LIMIT >> 20} MiB)"
        return unreadable(f"WebSocket {side} message", reason, data)
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return unreadable(f"WebSocket {side} message", f"not valid JSON ({exc})", data)
    if not isinstance(obj, dict):
        return unreadable(
            f"WebSocket {side} message", f"JSON {type(obj).__name__}, not an object", data
        )
    kind = obj.get("type")
    name = shorten(kind, LABEL_LIMIT) if isinstance(kind, str) and kind else None
    if side == "client":
        return _client_event(name, obj)
    return _server_event(name, obj)


def _binary(data: bytes, side: str) -> str:
    lines = [f"WebSocket {side} message: binary, {plural(len(data), 'byte')}"]
    if side == "client":
        lines.append("note: the bridge refuses binary client messages (events are JSON text)")
    if data:
        shown = data[:BINARY_SHOWN].hex(" ")
        more = f" … [{len(data) - BINARY_SHOWN} more bytes]" if len(data) > BINARY_SHOWN else ""
        lines.extend(["", shown + more])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- client


def _client_event(name: str | None, obj: dict[str, Any]) -> str:
    if name == CREATE:
        # Codex puts the request's fields beside ``type``; a nested ``response`` object (as
        # the Realtime API nests it) is read when the top level carries none of them.
        body = {k: v for k, v in obj.items() if k != "type"}
        nested = body.get("response")
        if isinstance(nested, dict) and "input" not in body and "model" not in body:
            body = nested
        return request_text(body, f"Responses API request (WebSocket {CREATE})")
    return _fields_event(f"WebSocket client event {name or '(no type)'}", obj)


# ---------------------------------------------------------------------------------- server


def _server_event(name: str | None, obj: dict[str, Any]) -> str:
    head = _head(name, obj)
    if name == "error" or (name is None and "error" in obj):
        lines = [head, f"error: {error_text(obj)}"]
        if (status := obj.get("status")) is not None:
            lines.append(f"status: {value_text(status)}")
        return "\n".join(lines)
    response = obj.get("response")
    if name in TERMINAL_EVENTS or name in PROGRESS_EVENTS:
        if not isinstance(response, dict):
            return f"{head}\nresponse: {value_text(response, VALUE_LIMIT)}"
        if name in PROGRESS_EVENTS:
            # A snapshot of a response under way: what it is, not its (empty) output.
            lines = [head]
            for key in ("id", "model", "status"):
                if (value := response.get(key)) is not None:
                    lines.append(f"{key}: {value_text(value)}")
            return "\n".join(lines)
        output = response.get("output")
        return outcome_text(head, response, output if isinstance(output, list) else [], None, [])
    lines = [head]
    if "item" in obj:
        lines.append(output_item_text(obj["item"]))
    if "part" in obj:
        lines.append(block("part: ", _part(obj["part"])))
    for key in PIECE_FIELDS:
        if key in obj:
            lines.append(block(f"{key}: ", _piece(obj[key])))
    rest = {
        k: v
        for k, v in obj.items()
        if k not in SHOWN_ELSEWHERE and k not in PIECE_FIELDS and k not in ("item", "part")
    }
    if len(lines) == 1 and rest:
        lines.append(block("fields: ", pretty(rest)))  # an event type this view does not know
    elif rest:
        lines.append(f"{INDENT}other fields: {compact(rest, VALUE_LIMIT)}")
    return "\n".join(lines)


def _head(name: str | None, obj: dict[str, Any]) -> str:
    """``server event <type> · output 0 · item msg_1``."""
    parts = [f"server event {name or '(no type)'}"]
    for key, label in POSITION_FIELDS:
        if (value := obj.get(key)) is not None:
            parts.append(f"{label} {value_text(value, LABEL_LIMIT)}")
    return " · ".join(parts)


def _part(part: Any) -> str:
    """A content part being added or finished: its text, else its type (a new part is
    empty until its deltas arrive)."""
    if not isinstance(part, dict):
        return compact(part, VALUE_LIMIT)
    text = part_text(part)
    return shorten(text, MESSAGE_LIMIT) if text else f"[{value_text(part.get('type'))}] (empty)"


def _piece(value: Any) -> str:
    """A streamed piece's text, quoted when it is only blank (a lone space or newline)."""
    if not isinstance(value, str):
        return compact(value, VALUE_LIMIT)
    if not value.strip():
        return orjson.dumps(value).decode()
    return shorten(value, MESSAGE_LIMIT)


def _fields_event(head: str, obj: dict[str, Any]) -> str:
    rest = {k: v for k, v in obj.items() if k != "type"}
    if not rest:
        return head
    return block(f"{head}\nfields: ", pretty(rest))
