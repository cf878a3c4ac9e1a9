"""OpenAI Responses API bodies as readable text: the view's Responses renderer.

A request body becomes its model, flags, shortened instructions, declared tools and the
``input`` items as a transcript; a response body (a buffered JSON object or a stored
``text/event-stream``) becomes its id, model, status, usage, notes on anything odd, and the
output items. Tool calls and usage are read with the functions the audit log uses
(``aibridge.apis.openai_responses``), so the view shows what the database holds. Past
:data:`TRANSCRIPT_LIMIT` characters the earliest input items, and past :data:`CONTENT_LIMIT`
the last output items, are only counted, so a huge body renders to a bounded text.

:func:`render_request` and :func:`render_response` are pure and never raise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from aibridge.apis.openai_responses import token_usage_row, tool_usage_row
from aibridge.transport.sse import SSEParser
from aibridge.view.common import (
    CALL_ARGS_LIMIT,
    CONTENT_LIMIT,
    INDENT,
    INSTRUCTIONS_LIMIT,
    LABEL_LIMIT,
    MALFORMED_NOTES,
    MESSAGE_LIMIT,
    PRETTY_LIMIT,
    TOOL_OUTPUT_LIMIT,
    VALUE_LIMIT,
    Renderer,
    block,
    compact,
    error_text,
    flag,
    indented,
    labelled,
    latest_first,
    load_object,
    malformed_note,
    names_line,
    nonempty,
    plural,
    pretty,
    render_response_with,
    shorten,
    sse_events,
    unreadable,
    value_text,
)

API: Final = "responses"
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


# ------------------------------------------------------------------------------ body parts


def _content_text(content: Any) -> str:
    """The readable text of a message's ``content`` (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        return compact(content, VALUE_LIMIT)
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict):
            parts.append(part_text(part))
    return "\n".join(p for p in parts if p)


def part_text(part: dict[str, Any]) -> str:
    """One content part (text, refusal, image, file) as readable text."""
    kind = part.get("type")
    text = part.get("text")
    if isinstance(text, str):
        return text
    if kind == "refusal":
        return f"[refusal] {part.get('refusal')}"
    if kind == "input_image":
        url = nonempty(part.get("image_url"))
        if url and url.startswith("data:"):
            # A data URL is the image itself: show its type and size, not the base64.
            return f"[image {url.split(',', 1)[0]}, {len(url)} chars]"
        return labelled("image", url or nonempty(part.get("file_id")))
    if kind == "input_file":
        name = (
            nonempty(part.get("filename"))
            or nonempty(part.get("file_id"))
            or nonempty(part.get("file_url"))
        )
        return labelled("file", name)
    return f"[{kind if isinstance(kind, str) else 'part'}]"


def _summary_text(item: dict[str, Any]) -> str:
    """A reasoning item's summary texts (else its reasoning text, as some models send)."""
    for key in ("summary", "content"):
        parts = item.get(key)
        if isinstance(parts, list):
            texts = [p["text"] for p in parts if isinstance(p, dict) and nonempty(p.get("text"))]
            if texts:
                return "\n\n".join(texts)
    return "(no summary)"


def _status_suffix(item: dict[str, Any]) -> str:
    status = item.get("status")
    return f" ({status})" if nonempty(status) and status != "completed" else ""


# --------------------------------------------------------------------------------- request


def render_request(data: bytes) -> str:
    """A Responses API request body (``POST /v1/responses``) as readable text. Never raises."""
    try:
        return _render_request(data)
    except Exception as exc:  # the view must show something for any body
        return unreadable("AI Bridge could not render this request", repr(exc), data)


def _render_request(data: bytes) -> str:
    obj, why = load_object(data)
    if obj is None:
        return unreadable("Not a Responses API request", why, data)
    return request_text(obj)


def request_text(obj: dict[str, Any], title: str = "Responses API request") -> str:
    """A decoded request (a POST body, or a WebSocket ``response.create``) as readable text."""
    lines = [title]
    lines.append(f"model: {obj.get('model')}")
    lines.append(f"stream: {flag(obj, 'stream')} · store: {flag(obj, 'store')}")
    if obj.get("background") is True:
        lines.append("background: true")
    if prev := nonempty(obj.get("previous_response_id")):
        lines.append(f"previous_response_id: {prev}")
    reasoning = obj.get("reasoning")
    if isinstance(reasoning, dict) and (
        settings := [f"{k}={v}" for k, v in reasoning.items() if v is not None]
    ):
        lines.append(f"reasoning: {', '.join(settings)}")
    instructions = obj.get("instructions")
    if isinstance(instructions, str) and instructions:
        lines.append(block("instructions: ", shorten(instructions, INSTRUCTIONS_LIMIT)))
    lines.append(names_line("tools", obj.get("tools"), _tool_name))
    choice = obj.get("tool_choice")
    if choice is not None and choice != "auto":
        lines.append(f"tool_choice: {compact(choice, VALUE_LIMIT)}")

    items = obj.get("input")
    transcript: list[str]
    if isinstance(items, str):
        heading = "input:"
        transcript = [block("user: ", shorten(items, MESSAGE_LIMIT))]
    elif isinstance(items, list):
        heading = f"input ({len(items)} item{'s' if len(items) != 1 else ''}):"
        transcript = latest_first(len(items), lambda i: _input_item(items[i]))
    else:
        heading = "input: none" if items is None else f"input: {compact(items, VALUE_LIMIT)}"
        transcript = []
    return "\n".join(lines) + "\n\n" + "\n\n".join([heading, *transcript])


def _tool_name(tool: Any) -> str:
    if not isinstance(tool, dict):
        return compact(tool, 60)
    kind = nonempty(tool.get("type"))
    if kind == "mcp" and (label := nonempty(tool.get("server_label"))):
        return f"mcp:{shorten(label, LABEL_LIMIT)}"
    return shorten(nonempty(tool.get("name")) or kind or "?", LABEL_LIMIT)


def _input_item(item: Any) -> str:
    """One ``input`` item as a transcript entry."""
    if isinstance(item, str):
        return block("user: ", shorten(item, MESSAGE_LIMIT))
    if not isinstance(item, dict):
        return f"[?] {compact(item, VALUE_LIMIT)}"
    kind = item.get("type")
    role = nonempty(item.get("role"))
    if kind in (None, "message") and role:
        head = role
        if phase := nonempty(item.get("phase")):
            head += f" [{phase}]"
        text = _content_text(item.get("content")) or "(empty)"
        return block(f"{head}: ", shorten(text, MESSAGE_LIMIT))
    if not isinstance(kind, str):
        return f"[?] {compact(item, VALUE_LIMIT)}"
    if kind == "reasoning":
        return block("[reasoning] ", shorten(_summary_text(item), MESSAGE_LIMIT))
    if kind in ("function_call", "custom_tool_call"):
        name = nonempty(item.get("name")) or kind
        args = item.get("arguments" if kind == "function_call" else "input")
        text = args if isinstance(args, str) else compact(args, CALL_ARGS_LIMIT)
        return block(f"→ {name}(", shorten(text, CALL_ARGS_LIMIT) + ")")
    if kind.endswith("_output"):
        call_id = nonempty(item.get("call_id")) or nonempty(item.get("id")) or kind
        output = item.get("output")
        text = output if isinstance(output, str) else _content_text(output)
        return block(f"← {call_id}: ", shorten(text, TOOL_OUTPUT_LIMIT))
    if kind.endswith("_call"):
        row = tool_usage_row(item) or {}
        return f"→ {row.get('tool') or kind}({compact(row.get('args'), CALL_ARGS_LIMIT)})"
    if kind == "item_reference":
        return f"[item_reference {item.get('id')}]"
    rest = {k: v for k, v in item.items() if k not in ("type", "id")}
    return f"[{kind}] {compact(rest, VALUE_LIMIT)}" if rest else f"[{kind}]"


# -------------------------------------------------------------------------------- response


def render_response(data: bytes, content_type: str) -> str:
    """A Responses API response body (a stream or buffered JSON) as readable text. Never raises."""
    return render_response_with(data, content_type, _render_stream, _render_buffered)


def _render_buffered(data: bytes) -> str:
    obj, why = load_object(data)
    if obj is None:
        return unreadable("Not a Responses API response", why, data)
    output = obj.get("output")
    if "error" in obj and obj.get("object") != "response" and output is None:
        # An API error body: {"error": {...}} (and the bridge's own flat code/message).
        return "\n".join(["Responses API error", f"error: {error_text(obj)}"])
    items = output if isinstance(output, list) else []
    return outcome_text("Responses API response", obj, items, None, [])


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
            self.malformed_notes.append(malformed_note(name, why))


def _render_stream(data: bytes) -> str:
    parser = SSEParser()
    state = _StreamState()
    for event in sse_events(parser, data):
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
    return outcome_text(title, response, output, state.error, notes)


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
        state.error = error_text(obj)
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


def outcome_text(
    title: str,
    response: dict[str, Any],
    output: Iterable[Any],
    stream_error: str | None,
    notes: list[str],
) -> str:
    """A response object (buffered, a stream's terminal event, a WebSocket event) as text."""
    lines = [title]
    for key in ("id", "model", "status"):
        if (value := response.get(key)) is not None:
            lines.append(f"{key}: {value_text(value)}")
    if usage := usage_line(response.get("usage")):
        lines.append(f"usage: {usage}")
    if response.get("error"):
        lines.append(f"error: {error_text(response['error'])}")
    if stream_error:
        lines.append(f"error: {stream_error}")
    details = response.get("incomplete_details")
    if isinstance(details, dict) and details.get("reason"):
        lines.append(f"incomplete: {value_text(details['reason'])}")
    lines.extend(f"note: {n}" if not n.startswith(INDENT) else n for n in notes)
    items = list(output)
    if not items:
        return "\n".join([*lines, "", "output: none"])
    entries: list[str] = []
    used = 0
    for item in items:
        if used > CONTENT_LIMIT:
            entries.append(f"… [{plural(len(items) - len(entries), 'more item')} not shown]")
            break
        entries.append(output_item_text(item))
        used += len(entries[-1])
    heading = f"output ({len(items)} item{'s' if len(items) != 1 else ''}):"
    return "\n".join(lines) + "\n\n" + "\n\n".join([heading, *entries])


def usage_line(usage: Any) -> str | None:
    """A response's usage, counted as the log counts it; None without one."""
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


def output_item_text(item: Any) -> str:
    """One output item: assistant text, reasoning summary, commentary or a tool call."""
    if not isinstance(item, dict):
        return f"[?] {compact(item, VALUE_LIMIT)}"
    kind = item.get("type")
    suffix = _status_suffix(item)
    if kind == "message" or (kind is None and nonempty(item.get("role"))):
        head = nonempty(item.get("role")) or "assistant"
        # The final answer is the plain reply; any other phase (commentary) is labelled.
        if (phase := nonempty(item.get("phase"))) and phase != "final_answer":
            head += f" [{phase}]"
        text = _content_text(item.get("content")) or "(empty)"
        return block(f"{head}{suffix}: ", shorten(text, MESSAGE_LIMIT))
    if kind == "reasoning":
        return block(f"[reasoning]{suffix} ", shorten(_summary_text(item), MESSAGE_LIMIT))
    row = tool_usage_row(item) if isinstance(kind, str) else None
    if row is None:
        rest = {k: v for k, v in item.items() if k not in ("type", "id")}
        return block(f"[{kind}] ", compact(rest, VALUE_LIMIT)) if rest else f"[{kind}]"
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
        lines.append(indented(shorten(args, PRETTY_LIMIT)))
    elif args is not None:
        lines.append(indented(pretty(args)))
    if row.get("invocation_error"):
        lines.append(f"{INDENT}error: {shorten(row['invocation_error'], VALUE_LIMIT)}")
    if kind == "mcp_call" and nonempty(item.get("output")):
        lines.append(block(f"{INDENT}output: ", shorten(item["output"], TOOL_OUTPUT_LIMIT)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ body shape


def claims_request(obj: dict[str, Any]) -> bool:
    return "input" in obj


def claims_response(obj: dict[str, Any]) -> bool:
    return "output" in obj or obj.get("object") == "response"


def claims_event(event_type: str) -> bool:
    return event_type.startswith("response.")


RENDERER: Final = Renderer(
    api=API,
    path_suffix="/responses",
    render_request=render_request,
    render_response=render_response,
    claims_request=claims_request,
    claims_response=claims_response,
    claims_event=claims_event,
)
