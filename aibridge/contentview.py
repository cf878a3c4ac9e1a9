"""The "AI Bridge" contentview: OpenAI Responses API bodies shown as a readable conversation.

For mitmweb and mitmproxy (and mitmdump at ``flow_detail`` 4). A request body becomes its
model, flags, shortened instructions, declared tools and the ``input`` items as a
transcript; a response body (a buffered JSON object or a stored ``text/event-stream``)
becomes its id, model, status, usage, notes on anything odd, and the output items.

:func:`render_request` and :func:`render_response` are pure and never raise; the view only
picks one of them. Tool calls and usage are read with the same functions the audit log uses
(``aibridge.apis.openai_responses``), so the view shows what the database holds.

The bridge streams every SSE response, and mitmproxy keeps a streamed body only with
``--set store_streamed_bodies=true``; without it a streamed response has no body to show.

Register it with the :class:`AIBridgeView` addon (or :func:`register` / :func:`unregister`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from mitmproxy import contentviews, http
from mitmproxy.contentviews import Contentview, Metadata

from aibridge.apis.openai_responses import token_usage_row, tool_usage_row
from aibridge.sse import SSEParser

NAME: Final = "AI Bridge"
# The key bridge.AIBridge notes on every bridged flow (bridge.METADATA_KEY); not imported,
# so that loading the view never pulls in the recorder and its thread machinery.
FLOW_METADATA_KEY: Final = "aibridge"
# Above the JSON view (1) and raw (0.1), so Responses API flows open in this view.
PRIORITY: Final = 2.0

# Display limits, in characters: enough to read, small enough that a long Codex history
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

INDENT: Final = "    "
JSON_TYPES: Final = frozenset({"application/json", "application/json-rpc"})
SSE_TYPE: Final = "text/event-stream"
TERMINAL_EVENTS: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
PROGRESS_EVENTS: Final = frozenset({"response.created", "response.in_progress", "response.queued"})
# Streamed pieces of an unfinished output item, by event type: what they fill in.
TEXT_DELTA: Final = "response.output_text.delta"
SUMMARY_DELTA: Final = "response.reasoning_summary_text.delta"
ARGS_DELTAS: Final = frozenset(
    {
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.mcp_call_arguments.delta",
    }
)


# ---------------------------------------------------------------------------- text helpers


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more chars]"


def _block(head: str, text: str) -> str:
    """``head`` followed by ``text``, its later lines indented under it."""
    first, *rest = text.split("\n")
    lines = [head + first]
    lines.extend(INDENT + line if line.strip() else "" for line in rest)
    return "\n".join(lines).rstrip()


def _indented(text: str) -> str:
    return "\n".join(INDENT + line if line.strip() else "" for line in text.split("\n"))


def _clip(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON value small enough to show: long strings, lists and nesting cut."""
    if isinstance(value, str):
        return shorten(value, VALUE_LIMIT)
    if depth >= DEPTH_LIMIT and isinstance(value, dict | list):
        return "…"
    if isinstance(value, dict):
        return {str(k): _clip(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        clipped = [_clip(v, depth + 1) for v in value[:LIST_LIMIT]]
        if len(value) > LIST_LIMIT:
            clipped.append(f"… [{len(value) - LIST_LIMIT} more items]")
        return clipped
    return value


def _pretty(value: Any) -> str:
    try:
        text = orjson.dumps(_clip(value), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONEncodeError, TypeError):
        text = repr(value)
    return shorten(text, PRETTY_LIMIT)


def _compact(value: Any, limit: int) -> str:
    try:
        text = orjson.dumps(_clip(value)).decode()
    except (orjson.JSONEncodeError, TypeError):
        text = repr(value)
    return shorten(text, limit)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _preview(data: bytes) -> str:
    return shorten(data[: PREVIEW_LIMIT * 4].decode("utf-8", "replace"), PREVIEW_LIMIT)


def _unreadable(what: str, reason: str, data: bytes) -> str:
    text = f"{what}: {reason}"
    if data:
        text += f"\n\n{_preview(data)}"
    return text


def _load_object(data: bytes) -> tuple[dict[str, Any] | None, str]:
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


def _content_text(content: Any) -> str:
    """The readable text of a message's ``content`` (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        return _compact(content, VALUE_LIMIT)
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict):
            parts.append(_part_text(part))
    return "\n".join(p for p in parts if p)


def _part_text(part: dict[str, Any]) -> str:
    kind = part.get("type")
    text = part.get("text")
    if isinstance(text, str):
        return text
    if kind == "refusal":
        return f"[refusal] {part.get('refusal')}"
    if kind == "input_image":
        url = _str(part.get("image_url"))
        if url and url.startswith("data:"):
            # A data URL is the image itself: show its type and size, not the base64.
            return f"[image {url.split(',', 1)[0]}, {len(url)} chars]"
        return _labelled("image", url or _str(part.get("file_id")))
    if kind == "input_file":
        name = _str(part.get("filename")) or _str(part.get("file_id")) or _str(part.get("file_url"))
        return _labelled("file", name)
    return f"[{kind if isinstance(kind, str) else 'part'}]"


def _labelled(what: str, label: str | None) -> str:
    return f"[{what} {shorten(label, 120)}]" if label else f"[{what}]"


def _summary_text(item: dict[str, Any]) -> str:
    """A reasoning item's summary texts (else its reasoning text, as some models send)."""
    for key in ("summary", "content"):
        parts = item.get(key)
        if isinstance(parts, list):
            texts = [p["text"] for p in parts if isinstance(p, dict) and _str(p.get("text"))]
            if texts:
                return "\n\n".join(texts)
    return "(no summary)"


def _status_suffix(item: dict[str, Any]) -> str:
    status = item.get("status")
    return f" ({status})" if _str(status) and status != "completed" else ""


# --------------------------------------------------------------------------------- request


def render_request(data: bytes) -> str:
    """A Responses API request body (``POST /v1/responses``) as readable text. Never raises."""
    try:
        return _render_request(data)
    except Exception as exc:  # the view must show something for any body
        return _unreadable("AI Bridge could not render this request", repr(exc), data)


def _render_request(data: bytes) -> str:
    obj, why = _load_object(data)
    if obj is None:
        return _unreadable("Not a Responses API request", why, data)
    lines = ["Responses API request"]
    lines.append(f"model: {obj.get('model')}")
    lines.append(f"stream: {_flag(obj, 'stream')} · store: {_flag(obj, 'store')}")
    if obj.get("background") is True:
        lines.append("background: true")
    if prev := _str(obj.get("previous_response_id")):
        lines.append(f"previous_response_id: {prev}")
    reasoning = obj.get("reasoning")
    if isinstance(reasoning, dict) and (
        settings := [f"{k}={v}" for k, v in reasoning.items() if v is not None]
    ):
        lines.append(f"reasoning: {', '.join(settings)}")
    instructions = obj.get("instructions")
    if isinstance(instructions, str) and instructions:
        lines.append(_block("instructions: ", shorten(instructions, INSTRUCTIONS_LIMIT)))
    tools = obj.get("tools")
    names = [_tool_name(t) for t in tools] if isinstance(tools, list) else []
    lines.append(f"tools ({len(names)}): {', '.join(names)}" if names else "tools: none")
    choice = obj.get("tool_choice")
    if choice is not None and choice != "auto":
        lines.append(f"tool_choice: {_compact(choice, VALUE_LIMIT)}")

    items = obj.get("input")
    transcript: list[str]
    if isinstance(items, str):
        heading = "input:"
        transcript = [_block("user: ", shorten(items, MESSAGE_LIMIT))]
    elif isinstance(items, list):
        heading = f"input ({len(items)} item{'s' if len(items) != 1 else ''}):"
        transcript = [_input_item(item) for item in items]
    else:
        heading = "input: none" if items is None else f"input: {_compact(items, VALUE_LIMIT)}"
        transcript = []
    return "\n".join(lines) + "\n\n" + "\n\n".join([heading, *transcript])


def _flag(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "unset" if value is None else _compact(value, 40)


def _tool_name(tool: Any) -> str:
    if not isinstance(tool, dict):
        return _compact(tool, 60)
    kind = _str(tool.get("type"))
    if kind == "mcp" and (label := _str(tool.get("server_label"))):
        return f"mcp:{label}"
    return _str(tool.get("name")) or kind or "?"


def _input_item(item: Any) -> str:
    """One ``input`` item as a transcript entry."""
    if isinstance(item, str):
        return _block("user: ", shorten(item, MESSAGE_LIMIT))
    if not isinstance(item, dict):
        return f"[?] {_compact(item, VALUE_LIMIT)}"
    kind = item.get("type")
    role = _str(item.get("role"))
    if kind in (None, "message") and role:
        head = role
        if phase := _str(item.get("phase")):
            head += f" [{phase}]"
        text = _content_text(item.get("content")) or "(empty)"
        return _block(f"{head}: ", shorten(text, MESSAGE_LIMIT))
    if not isinstance(kind, str):
        return f"[?] {_compact(item, VALUE_LIMIT)}"
    if kind == "reasoning":
        return _block("[reasoning] ", shorten(_summary_text(item), MESSAGE_LIMIT))
    if kind in ("function_call", "custom_tool_call"):
        name = _str(item.get("name")) or kind
        args = item.get("arguments" if kind == "function_call" else "input")
        text = args if isinstance(args, str) else _compact(args, CALL_ARGS_LIMIT)
        return _block(f"→ {name}(", shorten(text, CALL_ARGS_LIMIT) + ")")
    if kind.endswith("_output"):
        call_id = _str(item.get("call_id")) or _str(item.get("id")) or kind
        output = item.get("output")
        text = output if isinstance(output, str) else _content_text(output)
        return _block(f"← {call_id}: ", shorten(text, TOOL_OUTPUT_LIMIT))
    if kind.endswith("_call"):
        row = tool_usage_row(item) or {}
        return f"→ {row.get('tool') or kind}({_compact(row.get('args'), CALL_ARGS_LIMIT)})"
    if kind == "item_reference":
        return f"[item_reference {item.get('id')}]"
    rest = {k: v for k, v in item.items() if k not in ("type", "id")}
    return f"[{kind}] {_compact(rest, VALUE_LIMIT)}" if rest else f"[{kind}]"


# -------------------------------------------------------------------------------- response


def render_response(data: bytes, content_type: str) -> str:
    """A Responses API response body as readable text. Never raises.

    ``content_type`` decides between a ``text/event-stream`` and a buffered JSON body
    (parameters such as ``charset`` are ignored); when it says neither, the body is sniffed.
    """
    try:
        if _is_sse(data, content_type):
            return _render_stream(data)
        return _render_buffered(data)
    except Exception as exc:  # the view must show something for any body
        return _unreadable("AI Bridge could not render this response", repr(exc), data)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_sse(data: bytes, content_type: str | None) -> bool:
    media = _media_type(content_type)
    if media == SSE_TYPE:
        return True
    if media in JSON_TYPES or media.endswith("+json"):
        return False
    head = data[:64].lstrip()
    return head.startswith((b"event:", b"data:", b"id:", b":"))


def _render_buffered(data: bytes) -> str:
    obj, why = _load_object(data)
    if obj is None:
        return _unreadable("Not a Responses API response", why, data)
    output = obj.get("output")
    if "error" in obj and obj.get("object") != "response" and output is None:
        # An API error body: {"error": {...}} (and the bridge's own flat code/message).
        return "\n".join(["Responses API error", f"error: {_error_text(obj)}"])
    items = output if isinstance(output, list) else []
    return _render_outcome("Responses API response", obj, items, None, [])


def _error_text(obj: Any) -> str:
    """``code: message`` of an error event, an API error body or a response's ``error``."""
    if isinstance(obj, dict):
        nested = obj.get("error")
        if isinstance(nested, dict) and not _str(obj.get("message")):
            obj = nested
        message = obj.get("message")
        code = obj.get("code") or obj.get("type")
        message_text = message if isinstance(message, str) else _compact(message, VALUE_LIMIT)
        if code is not None and not isinstance(code, dict | list):
            return f"{code}: {message_text}" if message is not None else str(code)
        if message is not None:
            return message_text
    return _compact(obj, VALUE_LIMIT)


@dataclass
class _StreamState:
    """What a stored event stream says, event by event."""

    events: int = 0
    malformed: int = 0
    malformed_notes: list[str] = field(default_factory=list)
    response: dict[str, Any] | None = None  # the latest progress snapshot
    terminal: dict[str, Any] | None = None
    error: str | None = None
    # Output items by position, as added, replaced when done; streamed pieces of the rest.
    items: dict[tuple[int, int, str], dict[str, Any]] = field(default_factory=dict)
    done: set[tuple[int, int, str]] = field(default_factory=set)
    text: dict[tuple[int, int, str], list[str]] = field(default_factory=dict)
    summaries: dict[tuple[int, int, str], dict[int, list[str]]] = field(default_factory=dict)
    args: dict[tuple[int, int, str], list[str]] = field(default_factory=dict)

    def note_malformed(self, name: str | None, why: str) -> None:
        self.malformed += 1
        if len(self.malformed_notes) < MALFORMED_NOTES:
            self.malformed_notes.append(f"event {name or '(unnamed)'}: {shorten(why, 120)}")


def _render_stream(data: bytes) -> str:
    parser = SSEParser()
    state = _StreamState()
    events = parser.feed(data)
    events.extend(parser.close())
    for event in events:
        if event.data == "[DONE]":
            continue
        state.events += 1
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError as exc:
            state.note_malformed(event.event, str(exc))
            continue
        if not isinstance(obj, dict):
            state.note_malformed(event.event, f"JSON {type(obj).__name__}, not an object")
            continue
        kind = obj.get("type")
        _apply_event(state, kind if isinstance(kind, str) else event.event, obj)

    notes: list[str] = []
    if state.malformed:
        notes.append(f"{state.malformed} malformed event(s) skipped")
        notes.extend(INDENT + n for n in state.malformed_notes)
    if parser.oversized_events:
        notes.append(f"{parser.oversized_events} oversized event(s) skipped")
    terminal = state.terminal
    response = terminal if terminal is not None else dict(state.response or {})
    if terminal is None and state.error is not None:
        response["status"] = "error"  # OpenAI ends the stream after an error event
    elif terminal is None:
        notes.append(
            "the stream has no terminal event (response.completed, .incomplete or .failed): "
            "showing what arrived"
        )
    output = terminal.get("output") if terminal is not None else None
    if not (isinstance(output, list) and output):
        output = _streamed_items(state)
    title = f"Responses API response (streamed: {state.events} events)"
    return _render_outcome(title, response, output, state.error, notes)


def _item_key(obj: dict[str, Any]) -> tuple[int, int, str]:
    """Where an event's output item sits: its ``output_index``, else its item id."""
    index = obj.get("output_index")
    if isinstance(index, int) and not isinstance(index, bool):
        return (0, index, "")
    item = obj.get("item")
    item_id = obj.get("item_id") or (item.get("id") if isinstance(item, dict) else None)
    return (1, 0, str(item_id))


def _apply_event(state: _StreamState, kind: str | None, obj: dict[str, Any]) -> None:
    if kind in PROGRESS_EVENTS:
        if isinstance(response := obj.get("response"), dict):
            state.response = response
    elif kind in TERMINAL_EVENTS:
        if isinstance(response := obj.get("response"), dict) and state.terminal is None:
            state.terminal = response
    elif kind == "error":
        state.error = _error_text(obj)
    elif kind in ("response.output_item.added", "response.output_item.done"):
        if isinstance(item := obj.get("item"), dict):
            key = _item_key(obj)
            if key not in state.done:
                state.items[key] = item
            if kind == "response.output_item.done":
                state.done.add(key)
    elif kind == TEXT_DELTA:
        if isinstance(delta := obj.get("delta"), str):
            state.text.setdefault(_item_key(obj), []).append(delta)
    elif kind == SUMMARY_DELTA:
        index = obj.get("summary_index")
        if isinstance(delta := obj.get("delta"), str):
            parts = state.summaries.setdefault(_item_key(obj), {})
            parts.setdefault(index if isinstance(index, int) else 0, []).append(delta)
    elif kind in ARGS_DELTAS and isinstance(delta := obj.get("delta"), str):
        state.args.setdefault(_item_key(obj), []).append(delta)


def _streamed_items(state: _StreamState) -> list[dict[str, Any]]:
    """The output as the events built it: finished items whole, unfinished ones from deltas."""
    keys = state.items.keys() | state.text.keys() | state.summaries.keys() | state.args.keys()
    out: list[dict[str, Any]] = []
    for key in sorted(keys):
        if key in state.done:
            out.append(state.items[key])
            continue
        item = dict(state.items.get(key) or {})
        item.setdefault("status", "in_progress")
        if key in state.text:
            item.setdefault("type", "message")
            item.setdefault("role", "assistant")
            item["content"] = [{"type": "output_text", "text": "".join(state.text[key])}]
        if key in state.summaries:
            item.setdefault("type", "reasoning")
            parts = state.summaries[key]
            item["summary"] = [{"text": "".join(parts[i])} for i in sorted(parts)]
        if key in state.args:
            joined = "".join(state.args[key])
            item["input" if item.get("type") == "custom_tool_call" else "arguments"] = joined
        out.append(item)
    return out


def _render_outcome(
    title: str,
    response: dict[str, Any],
    output: Iterable[Any],
    stream_error: str | None,
    notes: list[str],
) -> str:
    lines = [title]
    for key in ("id", "model", "status"):
        if (value := response.get(key)) is not None:
            lines.append(f"{key}: {value}")
    if usage := _usage_line(response.get("usage")):
        lines.append(f"usage: {usage}")
    if response.get("error"):
        lines.append(f"error: {_error_text(response['error'])}")
    if stream_error:
        lines.append(f"error: {stream_error}")
    details = response.get("incomplete_details")
    if isinstance(details, dict) and details.get("reason"):
        lines.append(f"incomplete: {details['reason']}")
    lines.extend(f"note: {n}" if not n.startswith(INDENT) else n for n in notes)
    items = list(output)
    if not items:
        return "\n".join([*lines, "", "output: none"])
    entries = [_output_item(item) for item in items]
    heading = f"output ({len(items)} item{'s' if len(items) != 1 else ''}):"
    return "\n".join(lines) + "\n\n" + "\n\n".join([heading, *entries])


def _usage_line(usage: Any) -> str | None:
    row = token_usage_row(usage)
    if row is None:
        return None

    def count(key: str) -> str:
        value = row.get(key)
        return "?" if value is None else str(value)

    input_parts = [f"cached {count('cache_read_input_tokens')}"]
    if row.get("cache_write_input_tokens") is not None:
        input_parts.append(f"cache write {count('cache_write_input_tokens')}")
    return (
        f"input {count('input_tokens')} ({', '.join(input_parts)}) · "
        f"output {count('output_tokens')} (reasoning {count('reasoning_tokens')}) · "
        f"total {count('total_tokens')}"
    )


def _output_item(item: Any) -> str:
    """One output item: assistant text, reasoning summary, commentary or a tool call."""
    if not isinstance(item, dict):
        return f"[?] {_compact(item, VALUE_LIMIT)}"
    kind = item.get("type")
    suffix = _status_suffix(item)
    if kind == "message" or (kind is None and _str(item.get("role"))):
        head = _str(item.get("role")) or "assistant"
        # The final answer is the plain reply; any other phase (commentary) is labelled.
        if (phase := _str(item.get("phase"))) and phase != "final_answer":
            head += f" [{phase}]"
        text = _content_text(item.get("content")) or "(empty)"
        return _block(f"{head}{suffix}: ", shorten(text, MESSAGE_LIMIT))
    if kind == "reasoning":
        return _block(f"[reasoning]{suffix} ", shorten(_summary_text(item), MESSAGE_LIMIT))
    row = tool_usage_row(item) if isinstance(kind, str) else None
    if row is None:
        rest = {k: v for k, v in item.items() if k not in ("type", "id")}
        return _block(f"[{kind}] ", _compact(rest, VALUE_LIMIT)) if rest else f"[{kind}]"
    tool = row["tool"]
    if row.get("server_url"):  # MCP: the server label names where the tool lives
        tool = f"{row['server_url']}: {tool}"
    head = f"→ {tool}"
    if tool != kind and kind != "function_call":
        head += f" [{kind}]"
    if row.get("call_id"):
        head += f"  call_id={row['call_id']}"
    lines = [head + suffix]
    args = row.get("args")
    if isinstance(args, str):
        lines.append(_indented(shorten(args, PRETTY_LIMIT)))
    elif args is not None:
        lines.append(_indented(_pretty(args)))
    if row.get("invocation_error"):
        lines.append(f"{INDENT}error: {shorten(row['invocation_error'], VALUE_LIMIT)}")
    if kind == "mcp_call" and _str(item.get("output")):
        lines.append(_block(f"{INDENT}output: ", shorten(item["output"], TOOL_OUTPUT_LIMIT)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ view


def is_responses_flow(flow: Any) -> bool:
    """A flow of the Responses API: bridged by AI Bridge, or its path ends in /responses."""
    if not isinstance(flow, http.HTTPFlow):
        return False
    if FLOW_METADATA_KEY in flow.metadata:
        return True
    path = flow.request.path.split("?", 1)[0].rstrip("/")
    return path.endswith("/responses")


class AIBridgeContentview(Contentview):
    """Shows Responses API requests and responses as a conversation."""

    @property
    def name(self) -> str:
        return NAME

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        message = metadata.http_message
        if isinstance(message, http.Request):
            return render_request(data)
        if isinstance(message, http.Response):
            return render_response(data, metadata.content_type or "")
        return render_body(data, metadata.content_type)

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        # Cheap on purpose: called for every body mitmproxy shows; nothing is parsed here.
        if not data or metadata.http_message is None or not is_responses_flow(metadata.flow):
            return 0
        media = _media_type(metadata.content_type)
        if media in JSON_TYPES or media.endswith("+json") or media == SSE_TYPE:
            return PRIORITY
        if not media and data[:64].lstrip().startswith((b"{", b"event:", b"data:")):
            return PRIORITY  # clients and servers that leave the content type out
        return 0


def render_body(data: bytes, content_type: str | None = None) -> str:
    """A body whose direction is unknown: a stream or an object with ``output`` is a response."""
    try:
        if _is_sse(data, content_type):
            return render_response(data, SSE_TYPE)
        obj, _ = _load_object(data)
        if obj is not None and ("output" in obj or obj.get("object") == "response"):
            return render_response(data, "application/json")
        return render_request(data)
    except Exception as exc:  # the view must show something for any body
        return _unreadable("AI Bridge could not render this body", repr(exc), data)


VIEW: Final = AIBridgeContentview()


def register() -> None:
    """Add the view to mitmproxy's registry (again: it replaces itself by name)."""
    contentviews.add(VIEW)


def unregister() -> None:
    """Take the view out of mitmproxy's registry, if it is ours that is there."""
    # mitmproxy 12 has no public way to remove a view (contentviews.remove is a deprecated
    # no-op), so drop the registry entry directly; a registry without it is left alone.
    by_name = getattr(contentviews.registry, "_by_name", None)
    key = NAME.lower()
    if isinstance(by_name, dict) and by_name.get(key) is VIEW:
        del by_name[key]


class AIBridgeView:
    """Addon: the "AI Bridge" contentview is registered while this addon is loaded.

    Loading registers it, ``done`` (shutdown, or the script being reloaded) removes it, so a
    hot reload of addon.py leaves exactly one view.
    """

    def load(self, loader: Any) -> None:
        register()

    def done(self) -> None:
        unregister()
