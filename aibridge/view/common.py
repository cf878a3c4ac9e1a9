"""What the view's renderers share: display limits, text helpers, body loading, stored
streams read in bounded steps, and the :class:`Renderer` record each API module fills in.

Nothing here knows an API; every function is pure and none raises on any input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

from aibridge.transport.sse import SSEEvent, SSEParser

# Display limits, in characters: enough to read, small enough that a long agent history
# stays cheap to render and to ship to the browser.
INSTRUCTIONS_LIMIT: Final = 300
MESSAGE_LIMIT: Final = 6000
CALL_ARGS_LIMIT: Final = 600  # a call's arguments on one line in the request transcript
TOOL_OUTPUT_LIMIT: Final = 600
PRETTY_LIMIT: Final = 4000  # a pretty-printed value (tool arguments, unknown items)
VALUE_LIMIT: Final = 400  # one string inside a pretty-printed value (base64 images, logs)
LIST_LIMIT: Final = 50  # items of one list inside a pretty-printed value
DEPTH_LIMIT: Final = 24  # nesting inside a pretty-printed value (orjson writes at most ~255)
PREVIEW_LIMIT: Final = 2000  # raw text shown when a body cannot be read
MALFORMED_NOTES: Final = 3  # malformed events described one by one; the rest only counted
TRANSCRIPT_LIMIT: Final = 200_000  # characters of messages shown; earlier ones left out
CONTENT_LIMIT: Final = 200_000  # characters of a response's content shown
LIST_SHOWN: Final = 100  # items of a request's list (tools, system blocks, ...) named
LABEL_LIMIT: Final = 120  # a name, an id, a finish or stop reason
INPUT_LIMIT: Final = 256 << 10  # characters of one streamed tool input kept to parse
DROPPED_HEAD: Final = PRETTY_LIMIT - 200  # what is shown of a longer one (room for the note)
STREAM_INPUT_LIMIT: Final = 8 << 20  # characters of all streamed tool inputs kept
# A stored stream is handed to the SSE parser this much at a time, so that a 100 MB body
# becomes events a chunk's worth at a time, never one list of a million events.
STREAM_CHUNK: Final = 1 << 20

INDENT: Final = "    "
JSON_TYPES: Final = frozenset({"application/json", "application/json-rpc"})
SSE_TYPE: Final = "text/event-stream"
JSON_TYPE: Final = "application/json"


@dataclass(frozen=True, slots=True)
class Renderer:
    """One API's part of the view. ``claims_*`` answer from a body's shape alone, for a flow
    whose API neither the bridge's note nor the path tells."""

    api: str  # as the bridge notes it: flow.metadata["aibridge"]["api"]
    path_suffix: str  # a request path ending so (query aside) is this API's
    render_request: Callable[[bytes], str]
    render_response: Callable[[bytes, str], str]  # body, content type
    claims_request: Callable[[dict[str, Any]], bool]
    claims_response: Callable[[dict[str, Any]], bool]
    claims_event: Callable[[str], bool]  # an event type only this API's streams send


# ---------------------------------------------------------------------------- text helpers


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more chars]"


def block(head: str, text: str) -> str:
    """``head`` followed by ``text``, its later lines indented under it."""
    first, *rest = text.split("\n")
    lines = [head + first]
    lines.extend(INDENT + line if line.strip() else "" for line in rest)
    return "\n".join(lines).rstrip()


def indented(text: str, levels: int = 1) -> str:
    prefix = INDENT * levels
    return "\n".join(prefix + line if line.strip() else "" for line in text.split("\n"))


def clip(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON value small enough to show: long strings, lists and nesting cut."""
    if isinstance(value, str):
        return shorten(value, VALUE_LIMIT)
    if depth >= DEPTH_LIMIT and isinstance(value, dict | list):
        return "…"
    if isinstance(value, dict):
        return {str(k): clip(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        clipped = [clip(v, depth + 1) for v in value[:LIST_LIMIT]]
        if len(value) > LIST_LIMIT:
            clipped.append(f"… [{len(value) - LIST_LIMIT} more items]")
        return clipped
    return value


def pretty(value: Any) -> str:
    try:
        text = orjson.dumps(clip(value), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONEncodeError, TypeError):
        text = repr(value)
    return shorten(text, PRETTY_LIMIT)


def compact(value: Any, limit: int) -> str:
    try:
        text = orjson.dumps(clip(value)).decode()
    except (orjson.JSONEncodeError, TypeError):
        text = repr(value)
    return shorten(text, limit)


def nonempty(value: Any) -> str | None:
    """``value`` if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def labelled(what: str, label: str | None) -> str:
    return f"[{what} {shorten(label, 120)}]" if label else f"[{what}]"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def flag(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "unset" if value is None else compact(value, 40)


def malformed_note(name: str | None, why: str) -> str:
    return f"event {shorten(name, 60) if name else '(unnamed)'}: {shorten(why, 120)}"


def error_text(obj: Any) -> str:
    """``code: message`` of an error event, an API error body or a response's ``error``."""
    if isinstance(obj, dict):
        nested = obj.get("error")
        if isinstance(nested, dict) and not nonempty(obj.get("message")):
            obj = nested
        message = obj.get("message")
        code = obj.get("code") or obj.get("type")
        message_text = message if isinstance(message, str) else compact(message, VALUE_LIMIT)
        if code is not None and not isinstance(code, dict | list):
            return f"{code}: {message_text}" if message is not None else str(code)
        if message is not None:
            return message_text
    return compact(obj, VALUE_LIMIT)


# ---------------------------------------------------------------------------------- bodies


def preview(data: bytes) -> str:
    return shorten(data[: PREVIEW_LIMIT * 4].decode("utf-8", "replace"), PREVIEW_LIMIT)


def unreadable(what: str, reason: str, data: bytes) -> str:
    text = f"{what}: {reason}"
    if data:
        text += f"\n\n{preview(data)}"
    return text


def load_object(data: bytes) -> tuple[dict[str, Any] | None, str]:
    """The body as a JSON object, or None and why not."""
    if not data.strip():
        return None, "empty body"
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(obj, dict):
        return None, f"JSON {type(obj).__name__}, not an object"
    return obj, ""


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_sse(data: bytes, content_type: str | None) -> bool:
    """A ``text/event-stream`` body; without a telling content type, sniffed from its start."""
    media = media_type(content_type)
    if media == SSE_TYPE:
        return True
    if media in JSON_TYPES or media.endswith("+json"):
        return False
    head = data[:64].lstrip()
    return head.startswith((b"event:", b"data:", b"id:", b":"))


def sse_events(parser: SSEParser, data: bytes) -> Iterator[SSEEvent]:
    """The events of a stored stream, ``STREAM_CHUNK`` bytes at a time, then the trailing one."""
    for start in range(0, len(data), STREAM_CHUNK):
        yield from parser.feed(data[start : start + STREAM_CHUNK])
    yield from parser.close()


def shown_positions(n: int, head: int, tail: int) -> Iterable[int]:
    """The first `head` and last `tail` positions of ``n`` items, -1 for the gap between."""
    if n <= head + tail:
        return range(n)
    return [*range(head), -1, *range(n - tail, n)]


def render_response_with(
    data: bytes,
    content_type: str,
    stream: Callable[[bytes], str],
    buffered: Callable[[bytes], str],
) -> str:
    """A response body rendered by `stream` (a ``text/event-stream``) or `buffered` (JSON), as
    ``content_type`` says (parameters such as ``charset`` ignored; neither: sniffed). Never
    raises: the view must show something for any body."""
    try:
        if is_sse(data, content_type):
            return stream(data)
        return buffered(data)
    except Exception as exc:
        return unreadable("AI Bridge could not render this response", repr(exc), data)


def logged_prompt_line(prompt: str | None, call_id: str | None, id_name: str, id_limit: int) -> str:
    """What the log took as the prompt: its text, else the tool call id the turn answers
    (named `id_name`, as the API names it), else none."""
    if prompt is not None:
        return block("logged prompt: ", shorten(prompt, INSTRUCTIONS_LIMIT) or "(empty)")
    if call_id is not None:
        return f"logged prompt: none (answers {id_name} {shorten(call_id, id_limit)})"
    return "logged prompt: none"


def short_label(value: Any) -> str | None:
    """A short string field (a name, an id) fit to show, or None."""
    text = nonempty(value)
    return shorten(text, LABEL_LIMIT) if text is not None else None


def value_text(value: Any, limit: int = LABEL_LIMIT) -> str:
    if value is None:
        return "unset"
    return shorten(value, limit) if isinstance(value, str) else compact(value, limit)


def names_line(what: str, items: Any, name: Callable[[Any], str]) -> str:
    """``what (n): a, b, …``: the items of a request's list, named by `name`."""
    if not items:
        return f"{what}: none"
    if not isinstance(items, list):
        return f"{what}: {compact(items, VALUE_LIMIT)}"
    names = [name(item) for item in items[:LIST_SHOWN]]
    if len(items) > LIST_SHOWN:
        names.append(f"… [{len(items) - LIST_SHOWN} more]")
    return f"{what} ({len(items)}): {', '.join(names)}"


def render_request_with(data: bytes, render: Callable[[bytes], str]) -> str:
    """A request body rendered by `render`. Never raises: the view must show something for
    any body."""
    try:
        return render(data)
    except Exception as exc:
        return unreadable("AI Bridge could not render this request", repr(exc), data)


def latest_first(count: int, entry: Callable[[int], str]) -> list[str]:
    """The entries of positions 0 to count - 1, built from the last: past TRANSCRIPT_LIMIT
    characters the earlier ones are only counted (a long agent history ends with what
    matters)."""
    entries: list[str] = []
    used = 0
    for position in range(count - 1, -1, -1):
        if used > TRANSCRIPT_LIMIT:
            entries.append(f"… [{plural(position + 1, 'earlier message')} not shown]")
            break
        text = entry(position)
        entries.append(text)
        used += len(text)
    entries.reverse()
    return entries
