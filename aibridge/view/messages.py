"""Anthropic Messages API bodies as readable text: the view's Messages renderer.

A request (``POST /v1/messages``) becomes its model, flags, thinking and other settings, the
system prompt (each block shortened), the declared tools and the messages as a transcript,
one line or block per content block: text, ``[thinking]``, ``→ tool(input)``,
``← tool_use_id: result``, images and documents as placeholders. The prompt the log records
is marked ``[prompt]``: the block that ``anthropic_messages.prompt_from_messages`` itself
picks, found by identity, so the mark is where the log took it from.

A response becomes its id, model, the status the log records, the stop reason, usage and
the content blocks: a buffered message as sent, a stored stream assembled per block (text
from ``text_delta``, thinking from ``thinking_delta``, tool inputs from
``input_json_delta``). Status and usage come from the log's own ``MessagesAccumulator``,
fed what the stream tee feeds it, so the numbers are the log's.

Bounds, for a 100 MB or hostile body: the transcript keeps the latest messages up to
:data:`TRANSCRIPT_LIMIT` characters; a stream keeps at most :data:`MESSAGE_LIMIT` characters
of each block's text, :data:`INPUT_LIMIT` of each tool input (:data:`STREAM_INPUT_LIMIT` in
all) and :data:`STREAM_BLOCKS` blocks; every string shown is shortened.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from aibridge.apis import anthropic_messages as am
from aibridge.apis.common import ResponseResult, count
from aibridge.transport.sse import SSEParser
from aibridge.transport.tee import MAX_EVENT_BYTES
from aibridge.view.common import (
    CALL_ARGS_LIMIT,
    CONTENT_LIMIT,
    DROPPED_HEAD,
    INDENT,
    INPUT_LIMIT,
    INSTRUCTIONS_LIMIT,
    LABEL_LIMIT,
    LIST_SHOWN,
    MALFORMED_NOTES,
    MESSAGE_LIMIT,
    PRETTY_LIMIT,
    STREAM_INPUT_LIMIT,
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
    logged_prompt_line,
    malformed_note,
    names_line,
    nonempty,
    plural,
    pretty,
    render_request_with,
    render_response_with,
    short_label,
    shorten,
    shown_positions,
    sse_events,
    unreadable,
    value_text,
)

API: Final = "messages"  # the interceptions.api value (aibridge.apis.anthropic_messages)
TITLE: Final = "Messages API"

BLOCKS_HEAD: Final = 20  # of a message with many blocks, the first ones shown…
BLOCKS_TAIL: Final = 60  # …and the last ones (where the typed text and tool results are)
NESTING_LIMIT: Final = 4  # tool results inside tool results, before they are only counted
STREAM_BLOCKS: Final = 1000  # content blocks of one stream tracked
# Where a message's prompt is, besides a block position: nowhere, or its string content.
NO_PROMPT: Final = -2
STRING_PROMPT: Final = -1
REMINDER: Final = "<system-reminder>"  # Claude Code's boilerplate blocks: shortened hard
# Top-level request fields shown as they are, when set.
SETTINGS: Final = (
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "service_tier",
    "output_config",
    "context_management",
    "container",
    "inference_geo",
    "speed",
)
STREAM_EVENTS: Final = frozenset(
    {
        am.MESSAGE_START,
        am.CONTENT_BLOCK_START,
        am.CONTENT_BLOCK_DELTA,
        am.CONTENT_BLOCK_STOP,
        am.MESSAGE_DELTA,
        am.MESSAGE_STOP,
        am.PING,
    }
)


# ---------------------------------------------------------------------------- body parts


def _is_text(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "text"


def _content_block(
    item: Any,
    *,
    prompt: bool = False,
    text_limit: int = MESSAGE_LIMIT,
    response: bool = False,
    depth: int = 0,
) -> str:
    """One content block as a transcript line (or block of lines).

    ``prompt`` marks the block the log records as the prompt; ``response`` shows text as the
    assistant's and tool inputs pretty-printed, as in a response.
    """
    if isinstance(item, str):  # not the API's shape, but shown rather than hidden
        return block("", shorten(item, text_limit) or "(empty)")
    if not isinstance(item, dict):
        return f"[?] {compact(item, VALUE_LIMIT)}"
    kind = item.get("type")
    if kind == "text":
        return _text_block(item, prompt=prompt, limit=text_limit, response=response)
    if kind == "thinking":
        thinking = item.get("thinking")
        text = thinking if isinstance(thinking, str) else compact(thinking, VALUE_LIMIT)
        return _thinking(shorten(text, MESSAGE_LIMIT))
    if kind == "redacted_thinking":
        data = item.get("data")
        size = f"{len(data)} chars, encrypted" if isinstance(data, str) else "encrypted"
        return f"[redacted_thinking] ({size})"
    if isinstance(kind, str) and kind.endswith("tool_use"):
        return _tool_use(item, item.get("input"), response=response)
    if isinstance(kind, str) and kind.endswith("tool_result"):
        return _tool_result(item, depth)
    if kind in ("image", "document"):
        return _source(kind, item)
    name = shorten(kind, 60) if isinstance(kind, str) else "?"
    rest = {k: v for k, v in item.items() if k not in ("type", "cache_control")}
    return f"[{name}] {compact(rest, VALUE_LIMIT)}" if rest else f"[{name}]"


def _text_block(item: dict[str, Any], *, prompt: bool, limit: int, response: bool) -> str:
    text = item.get("text")
    if not isinstance(text, str):
        return f"[text] {compact(text, VALUE_LIMIT)}"
    if text.startswith(REMINDER):
        limit = min(limit, INSTRUCTIONS_LIMIT)
    head = "[prompt] " if prompt else "assistant: " if response else ""
    citations = item.get("citations")
    if isinstance(citations, list) and citations:
        head = f"{head}[{plural(len(citations), 'citation')}] "
    return block(head, shorten(text, limit) or "(empty)")


def _thinking(text: str, suffix: str = "") -> str:
    # Empty when the client asked for none to be shown (Claude Code: display "omitted").
    return block(f"[thinking]{suffix} ", text or "(empty)")


def _tool_use(item: dict[str, Any], tool_input: Any, *, response: bool, suffix: str = "") -> str:
    """A tool call; ``tool_input`` is its parsed input (or, from a stream, the text shown)."""
    kind = short_label(item.get("type")) or "tool_use"
    name = short_label(item.get("name")) or kind
    if server := short_label(item.get("server_name")):  # MCP: the server the tool lives on
        name = f"{server}: {name}"
    tags = f" [{kind}]" if kind != "tool_use" else ""
    call_id = short_label(item.get("id"))
    ident = f"  id={call_id}" if call_id else ""
    if not response:
        args = compact(tool_input, CALL_ARGS_LIMIT) if tool_input is not None else ""
        return block(f"→ {name}{tags}(", f"{args}){ident}")
    lines = [f"→ {name}{tags}{ident}{suffix}"]
    if isinstance(tool_input, str):
        lines.append(indented(shorten(tool_input, PRETTY_LIMIT)))
    elif tool_input is not None:
        lines.append(indented(pretty(tool_input)))
    return "\n".join(lines)


def _tool_result(item: dict[str, Any], depth: int) -> str:
    kind = short_label(item.get("type")) or "tool_result"
    head = f"← {short_label(item.get('tool_use_id')) or '?'}"
    if kind != "tool_result":
        head += f" [{kind}]"
    if item.get("is_error") is True:
        head += " (error)"
    text = _result_text(item.get("content"), depth + 1)
    return block(f"{head}: ", shorten(text, TOOL_OUTPUT_LIMIT) or "(empty)")


def _result_text(content: Any, depth: int) -> str:
    """What a tool result says: its text, search results by title, errors by code."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if depth > NESTING_LIMIT:
        return "[…]"
    if isinstance(content, dict):
        kind = content.get("type")
        if isinstance(kind, str) and kind.endswith("_error"):
            return f"error: {short_label(content.get('error_code')) or shorten(kind, 60)}"
        return _result_item(content, depth)
    if not isinstance(content, list):
        return compact(content, VALUE_LIMIT)
    parts = [_result_item(part, depth) for part in content[:LIST_SHOWN]]
    if len(content) > LIST_SHOWN:
        parts.append(f"… [{len(content) - LIST_SHOWN} more items]")
    return "\n".join(p for p in parts if p)


def _result_item(part: Any, depth: int) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return shorten(part["text"], TOOL_OUTPUT_LIMIT)
    if isinstance(part, dict) and part.get("type") == "web_search_result":
        title = short_label(part.get("title")) or "(untitled)"
        url = short_label(part.get("url"))
        return f"{title} <{url}>" if url else title
    return shorten(_content_block(part, text_limit=TOOL_OUTPUT_LIMIT, depth=depth), VALUE_LIMIT)


def _source(kind: str, item: dict[str, Any]) -> str:
    """An image or document as a placeholder: its type and size, never the base64."""
    source = item.get("source")
    title = short_label(item.get("title"))
    label = f"{kind} {title!r}" if title else kind
    if not isinstance(source, dict):
        return f"[{label}]"
    source_type = source.get("type")
    data = source.get("data")
    if source_type == "base64":
        media = short_label(source.get("media_type")) or "?"
        size = len(data) if isinstance(data, str) else 0
        return f"[{label} {media}, base64 {size} chars]"
    if source_type == "url":
        return labelled(label, nonempty(source.get("url")))
    if source_type == "file":
        return labelled(label, f"file {short_label(source.get('file_id')) or '?'}")
    if source_type == "text" and isinstance(data, str):
        return f"[{label} text, {len(data)} chars]"
    return f"[{label} {short_label(source_type) or '?'} source]"


# -------------------------------------------------------------------------------- request


def render_request(data: bytes) -> str:
    """A Messages API request body (``POST /v1/messages``) as readable text. Never raises."""
    return render_request_with(data, _render_request)


def _render_request(data: bytes) -> str:
    obj, why = load_object(data)
    if obj is None:
        return unreadable(f"Not a {TITLE} request", why, data)
    lines = [f"{TITLE} request", f"model: {value_text(obj.get('model'))}"]
    lines.append(f"stream: {flag(obj, 'stream')} · max_tokens: {flag(obj, 'max_tokens')}")
    thinking = obj.get("thinking")
    if isinstance(thinking, dict) and thinking:
        settings = [f"{value_text(k, 60)}={value_text(v)}" for k, v in list(thinking.items())[:20]]
        lines.append(f"thinking: {', '.join(settings)}")
    elif thinking is not None:
        lines.append(f"thinking: {value_text(thinking)}")
    if settings := [f"{k}={value_text(obj[k])}" for k in SETTINGS if obj.get(k) is not None]:
        lines.append(f"settings: {', '.join(settings)}")
    if session := am.session_id_from_metadata(obj.get("metadata")):
        lines.append(f"session: {shorten(session, LABEL_LIMIT)}")
    lines.extend(_system_lines(obj.get("system")))
    lines.append(names_line("tools", obj.get("tools"), _tool_name))
    if (servers := obj.get("mcp_servers")) is not None:
        lines.append(names_line("mcp_servers", servers, _server_name))
    choice = obj.get("tool_choice")
    if choice is not None and choice != {"type": "auto"}:
        lines.append(f"tool_choice: {compact(choice, VALUE_LIMIT)}")

    messages = obj.get("messages")
    prompt = am.prompt_from_messages(messages)
    call_id = am.correlating_tool_call_id(messages)
    lines.append(logged_prompt_line(prompt, call_id, "tool_use_id", LABEL_LIMIT))

    transcript: list[str] = []
    if isinstance(messages, list):
        heading = f"messages ({len(messages)}):"
        transcript = _transcript(messages, _prompt_at(messages, prompt))
    elif messages is None:
        heading = "messages: none"
    else:
        heading = f"messages: {compact(messages, VALUE_LIMIT)}"
    return "\n".join(lines) + "\n\n" + "\n\n".join([heading, *transcript])


def _system_lines(system: Any) -> list[str]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [block("system: ", shorten(system, INSTRUCTIONS_LIMIT))]
    if not isinstance(system, list):
        return [f"system: {compact(system, VALUE_LIMIT)}"]
    chars = sum(len(b["text"]) for b in system if _is_text(b) and isinstance(b.get("text"), str))
    lines = [f"system ({plural(len(system), 'block')}, {chars} chars):"]
    for item in system[:LIST_SHOWN]:
        lines.append(indented(_content_block(item, text_limit=INSTRUCTIONS_LIMIT)))
    if len(system) > LIST_SHOWN:
        lines.append(f"{INDENT}… [{len(system) - LIST_SHOWN} more blocks]")
    return lines


def _tool_name(tool: Any) -> str:
    if not isinstance(tool, dict):
        return compact(tool, 60)
    name, kind = short_label(tool.get("name")), short_label(tool.get("type"))
    if name and kind and kind != "custom":  # a server tool: its versioned type says which
        return f"{name} ({kind})"
    return name or kind or "?"


def _server_name(server: Any) -> str:
    if not isinstance(server, dict):
        return compact(server, 60)
    return short_label(server.get("name")) or short_label(server.get("url")) or "?"


def _prompt_at(messages: list[Any], prompt: str | None) -> tuple[int, int | None] | None:
    """Where the logged prompt came from: (message, block) positions, block None for string
    content. Found by identity with the string prompt_from_messages returned, from the end."""
    if prompt is None:
        return None
    for position in range(len(messages) - 1, -1, -1):
        message = messages[position]
        content = message.get("content") if isinstance(message, dict) else None
        if content is prompt:
            return position, None
        if isinstance(content, list):
            for index in range(len(content) - 1, -1, -1):
                item = content[index]
                if isinstance(item, dict) and item.get("text") is prompt:
                    return position, index
    return None


def _transcript(messages: list[Any], prompt_at: tuple[int, int | None] | None) -> list[str]:
    """The messages as entries (``latest_first``)."""

    def entry(position: int) -> str:
        mark = NO_PROMPT
        if prompt_at is not None and prompt_at[0] == position:
            mark = STRING_PROMPT if prompt_at[1] is None else prompt_at[1]
        return _message(messages[position], mark)

    return latest_first(len(messages), entry)


def _message(message: Any, mark: int) -> str:
    """One message; ``mark`` is the position of its prompt block, or STRING_PROMPT (its
    string content is the prompt) or NO_PROMPT."""
    if not isinstance(message, dict):
        return f"[?] {compact(message, VALUE_LIMIT)}"
    role = short_label(message.get("role")) or "?"
    content = message.get("content")
    # A system-role message (Claude Code's environment) is boilerplate, like the system prompt.
    limit = INSTRUCTIONS_LIMIT if role == "system" else MESSAGE_LIMIT
    # String content, or a lone text block, goes on the role's line.
    text, prompt = content, mark == STRING_PROMPT
    if isinstance(content, list) and len(content) == 1 and _is_text(content[0]):
        text, prompt = content[0].get("text"), mark == 0
    if isinstance(text, str):
        if text.startswith(REMINDER):
            limit = min(limit, INSTRUCTIONS_LIMIT)
        head = f"{role} [prompt]: " if prompt else f"{role}: "
        return block(head, shorten(text, limit) or "(empty)")
    if not isinstance(content, list):
        return f"{role}: {'(empty)' if content is None else compact(content, VALUE_LIMIT)}"
    lines = [f"{role} ({plural(len(content), 'block')}):"]
    for index in shown_positions(len(content), BLOCKS_HEAD, BLOCKS_TAIL):
        if index < 0:
            hidden = len(content) - BLOCKS_HEAD - BLOCKS_TAIL
            lines.append(f"{INDENT}… [{plural(hidden, 'block')} not shown]")
            continue
        item = _content_block(content[index], prompt=mark == index, text_limit=limit)
        lines.append(indented(item))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- response


def render_response(data: bytes, content_type: str) -> str:
    """A Messages API response body (a stream or buffered JSON) as readable text. Never raises."""
    return render_response_with(data, content_type, _render_stream, _render_buffered)


def _is_error_body(obj: dict[str, Any]) -> bool:
    # As MessagesAccumulator judges it: {"type": "error", "error": {...}}, sent with a 4xx/5xx.
    return obj.get("type") == "error" or (obj.get("error") is not None and "content" not in obj)


def _error_text(obj: dict[str, Any]) -> str:
    """``type: message`` of an error body or event; the text itself when ``error`` is one."""
    error = obj.get("error")
    return shorten(error if isinstance(error, str) else error_text(obj), VALUE_LIMIT)


def _render_buffered(data: bytes) -> str:
    obj, why = load_object(data)
    if obj is None:
        return unreadable(f"Not a {TITLE} response", why, data)
    if _is_error_body(obj):
        lines = [f"{TITLE} error", f"error: {_error_text(obj)}"]
        if request_id := short_label(obj.get("request_id")):
            lines.append(f"request_id: {request_id}")
        return "\n".join(lines)
    accumulator = am.MessagesAccumulator()
    accumulator.feed_response_object(obj)
    content = obj.get("content")
    notes = []
    if content is not None and not isinstance(content, list):
        notes.append(f"content is not a list: {compact(content, VALUE_LIMIT)}")
    items = content if isinstance(content, list) else []
    entries = (_content_block(item, response=True) for item in items)
    facts = {key: obj.get(key) for key in ("id", "model", "stop_reason", "stop_sequence")}
    return _render_outcome(
        f"{TITLE} response", facts, accumulator.result(), entries, len(items), None, notes
    )


def _render_outcome(
    title: str,
    facts: dict[str, Any],
    result: ResponseResult,
    entries: Iterable[str],
    n_blocks: int,
    stream_error: str | None,
    notes: list[str],
) -> str:
    lines = [title]
    for key in ("id", "model"):
        if facts.get(key) is not None:
            lines.append(f"{key}: {value_text(facts[key])}")
    if result.status is not None:
        lines.append(f"status: {result.status}")
    if facts.get("stop_reason") is not None:
        stop = f"stop_reason: {value_text(facts['stop_reason'])}"
        if facts.get("stop_sequence") is not None:
            stop += f" (stop_sequence {value_text(facts['stop_sequence'])})"
        lines.append(stop)
    lines.extend(_usage_lines(result.token_usage))
    if stream_error:
        lines.append(f"error: {stream_error}")
    lines.extend(f"note: {n}" if not n.startswith(INDENT) else n for n in notes)
    if not n_blocks:
        return "\n".join([*lines, "", "content: none"])
    shown: list[str] = []
    used = 0
    for entry in entries:
        if used > CONTENT_LIMIT:
            shown.append(f"… [{plural(n_blocks - len(shown), 'more block')} not shown]")
            break
        shown.append(entry)
        used += len(entry)
    heading = f"content ({plural(n_blocks, 'block')}):"
    return "\n".join(lines) + "\n\n" + "\n\n".join([heading, *shown])


def _usage_lines(row: dict[str, Any] | None) -> list[str]:
    """The log's token_usages row (anthropic_messages.token_usage_row) in one line."""
    if row is None:
        return []

    def number(key: str) -> str:
        value = row.get(key)
        return "?" if value is None else str(value)

    raw = row.get("usage") if isinstance(row.get("usage"), dict) else {}
    write = f"cache write {number('cache_write_input_tokens')}"
    split = raw.get("cache_creation")
    if isinstance(split, dict):  # priced apart: 5-minute and 1-hour cache writes
        parts = [
            f"{label} {n}"
            for key, label in (
                ("ephemeral_5m_input_tokens", "5m"),
                ("ephemeral_1h_input_tokens", "1h"),
            )
            if (n := count(split.get(key))) is not None
        ]
        if parts:
            write += f" [{', '.join(parts)}]"
    line = (
        f"usage: input {number('input_tokens')} (uncached {number('uncached_input_tokens')}, "
        f"cache read {number('cache_read_input_tokens')}, {write}) · "
        f"output {number('output_tokens')} · total {number('total_tokens')}"
    )
    if tier := row.get("service_tier"):
        line += f" · tier {tier}"
    lines = [line]
    server = raw.get("server_tool_use")
    if isinstance(server, dict) and server:
        uses = [f"{value_text(k, 60)} {value_text(v, 40)}" for k, v in list(server.items())[:10]]
        lines.append(f"server tools: {', '.join(uses)}")
    return lines


# --------------------------------------------------------------------------------- stream


@dataclass(slots=True)
class _StreamBlock:
    """One content block of a stream, as its events built it; only a bounded part kept."""

    kind: str  # "text", "thinking", "tool" or "whole" (shown as its start gave it)
    start: dict[str, Any]  # for a tool: type, id, name, server_name (shortened)
    whole: str = ""  # a "whole" block, rendered at its start
    start_input: Any = None  # a tool's input as content_block_start gave it, pretty-printed
    text: list[str] = field(default_factory=list)  # text, thinking or input pieces kept
    kept: int = 0  # characters in ``text``
    total: int = 0  # characters received
    dropped: bool = False  # a tool input over its limit: only its head kept
    citations: int = 0
    closed: bool = False

    def keep_text(self, piece: str) -> None:
        self.total += len(piece)
        room = MESSAGE_LIMIT - self.kept
        if room > 0:
            part = piece[:room]
            self.text.append(part)
            self.kept += len(part)

    def shown_text(self) -> str:
        text = "".join(self.text)
        return text + (f"… [{self.total - self.kept} more chars]" if self.total > self.kept else "")


@dataclass
class _StreamState:
    """What a stored Messages stream says, event by event."""

    events: int = 0
    malformed: int = 0
    malformed_notes: list[str] = field(default_factory=list)
    message: dict[str, Any] = field(default_factory=dict)  # message_start's id and model
    started: bool = False
    stop_reason: Any = None
    stop_sequence: Any = None
    stopped: bool = False
    error: str | None = None
    after_error: int = 0
    unknown: int = 0
    unknown_names: list[str] = field(default_factory=list)
    blocks: dict[int, _StreamBlock] = field(default_factory=dict)
    untracked: int = 0  # blocks past STREAM_BLOCKS
    input_kept: int = 0  # characters of tool input kept, over all blocks

    def note_malformed(self, name: str | None, why: str) -> None:
        self.malformed += 1
        if len(self.malformed_notes) < MALFORMED_NOTES:
            self.malformed_notes.append(malformed_note(name, why))


def _render_stream(data: bytes) -> str:
    parser = SSEParser(max_event_bytes=MAX_EVENT_BYTES)  # as the tee: what the log drops
    state = _StreamState()
    accumulator = am.MessagesAccumulator()
    for event in sse_events(parser, data):
        name, payload = event.event, event.data
        # The log's side, fed as the tee feeds it (a text delta or ping in Anthropic's own
        # spelling changes nothing there, so it is not decoded twice).
        if (name is None or name in am.WANTED_EVENTS) and am.worth_decoding(payload):
            accumulator.feed_event(name, payload)
        if payload == "[DONE]":
            continue
        state.events += 1
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            state.note_malformed(name, str(exc))
            continue
        if not isinstance(obj, dict):
            state.note_malformed(name, f"JSON {type(obj).__name__}, not an object")
            continue
        kind = obj.get("type")
        kind = kind if isinstance(kind, str) else name
        if kind is None:
            state.note_malformed(name, "no type")
            continue
        if state.error is not None:
            state.after_error += 1
        _apply_event(state, kind, obj)

    notes: list[str] = []
    if state.malformed:
        notes.append(f"{state.malformed} malformed event(s) skipped")
        notes.extend(INDENT + n for n in state.malformed_notes)
    if parser.oversized_events:
        notes.append(f"{parser.oversized_events} oversized event(s) skipped")
    if state.unknown:
        names = ", ".join(state.unknown_names)
        notes.append(f"{state.unknown} event(s) of a type this view does not know: {names}")
    if state.after_error:
        notes.append(f"{state.after_error} event(s) after the error event (the log stops there)")
    if state.untracked:
        notes.append(
            f"{state.untracked} content block(s) past the view's {STREAM_BLOCKS} not shown"
        )
    if not state.stopped and state.error is None:
        notes.append("the stream has no message_stop: showing what arrived")
    facts = {
        **state.message,
        "stop_reason": state.stop_reason,
        "stop_sequence": state.stop_sequence,
    }
    positions = sorted(state.blocks)
    entries = (_streamed_block(state.blocks[i]) for i in positions)
    title = f"{TITLE} response (streamed: {state.events} events)"
    result = accumulator.result()
    return _render_outcome(title, facts, result, entries, len(positions), state.error, notes)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _apply_event(state: _StreamState, kind: str, obj: dict[str, Any]) -> None:
    if kind == am.CONTENT_BLOCK_DELTA:
        _apply_delta(state, obj)
    elif kind == am.CONTENT_BLOCK_START:
        index, content = obj.get("index"), obj.get("content_block")
        if not _is_index(index) or not isinstance(content, dict):
            state.note_malformed(kind, "no index or content_block")
        elif index in state.blocks:
            state.note_malformed(kind, f"block {index} started twice")
        else:
            _start_block(state, index, content)
    elif kind == am.CONTENT_BLOCK_STOP:
        index = obj.get("index")
        if not _is_index(index):
            state.note_malformed(kind, "no index")
        elif (started := state.blocks.get(index)) is not None:
            started.closed = True
    elif kind == am.MESSAGE_START:
        message = obj.get("message")
        if not isinstance(message, dict) or state.started:
            state.note_malformed(kind, "no message" if not state.started else "a second one")
            return
        state.started = True
        state.message = {key: message.get(key) for key in ("id", "model")}
    elif kind == am.MESSAGE_DELTA:
        delta = obj.get("delta")
        if not isinstance(delta, dict) and not isinstance(obj.get("usage"), dict):
            state.note_malformed(kind, "no delta or usage")
        elif isinstance(delta, dict):
            if delta.get("stop_reason") is not None:
                state.stop_reason = delta["stop_reason"]
            if delta.get("stop_sequence") is not None:
                state.stop_sequence = delta["stop_sequence"]
    elif kind == am.MESSAGE_STOP:
        state.stopped = True
    elif kind == am.ERROR_EVENT:
        if state.error is None:
            state.error = _error_text(obj)
    elif kind not in STREAM_EVENTS:
        state.unknown += 1
        if len(state.unknown_names) < MALFORMED_NOTES:
            state.unknown_names.append(shorten(kind, 60))


def _start_block(state: _StreamState, index: int, content: dict[str, Any]) -> None:
    if len(state.blocks) >= STREAM_BLOCKS:
        state.untracked += 1
        return
    kind = content.get("type")
    if kind == "text":
        started = _StreamBlock("text", {})
        if isinstance(text := content.get("text"), str):
            started.keep_text(text)
    elif kind == "thinking":
        started = _StreamBlock("thinking", {})
        if isinstance(text := content.get("thinking"), str):
            started.keep_text(text)
    elif isinstance(kind, str) and kind.endswith("tool_use"):
        keys = ("type", "id", "name", "server_name")
        started = _StreamBlock("tool", {k: short_label(content.get(k)) for k in keys})
        if (start_input := content.get("input")) not in (None, {}):
            started.start_input = pretty(start_input)  # shown if no delta follows
    else:  # results, redacted thinking, blocks of the future: whole at their start
        started = _StreamBlock("whole", {}, whole=_content_block(content, response=True))
    state.blocks[index] = started


# Deltas that build a block: the field that carries the piece, and the kind of block it fills.
_DELTAS: Final = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("thinking", "thinking"),
    "input_json_delta": ("partial_json", "tool"),
}


def _apply_delta(state: _StreamState, obj: dict[str, Any]) -> None:
    index, delta = obj.get("index"), obj.get("delta")
    if not _is_index(index) or not isinstance(delta, dict):
        state.note_malformed(am.CONTENT_BLOCK_DELTA, "no index or delta")
        return
    kind = delta.get("type")
    field_name, block_kind = _DELTAS.get(kind if isinstance(kind, str) else "", ("", ""))
    target = state.blocks.get(index)
    if kind == "citations_delta":
        if target is not None:
            target.citations += 1
        return
    if not field_name:
        return  # signature_delta and deltas of the future: nothing to show
    piece = delta.get(field_name)
    if not isinstance(piece, str):
        state.note_malformed(am.CONTENT_BLOCK_DELTA, f"{kind} without a string {field_name}")
        return
    if target is None:  # a delta without its content_block_start: shown all the same
        if len(state.blocks) >= STREAM_BLOCKS:
            state.untracked += 1
            return
        target = state.blocks[index] = _StreamBlock(block_kind, {"type": "tool_use"})
    if target.kind != block_kind:
        state.note_malformed(am.CONTENT_BLOCK_DELTA, f"{kind} for a {target.kind} block")
    elif block_kind == "tool":
        _keep_input(state, target, piece)
    else:
        target.keep_text(piece)


def _keep_input(state: _StreamState, target: _StreamBlock, piece: str) -> None:
    """Keep a piece of tool input whole while it fits the limits; past them only its head."""
    target.total += len(piece)
    if target.dropped:
        return
    if (
        target.kept + len(piece) <= INPUT_LIMIT
        and state.input_kept + len(piece) <= STREAM_INPUT_LIMIT
    ):
        target.text.append(piece)
        target.kept += len(piece)
        state.input_kept += len(piece)
        return
    head = "".join(target.text)[:DROPPED_HEAD]
    state.input_kept -= target.kept
    target.text, target.kept, target.dropped = [head], len(head), True


def _streamed_block(started: _StreamBlock) -> str:
    suffix = "" if started.closed else " (in_progress)"
    if started.kind == "whole":
        return started.whole
    if started.kind == "thinking":
        return _thinking(started.shown_text(), suffix)
    if started.kind == "text":
        head = f"assistant{suffix}: "
        if started.citations:
            head += f"[{plural(started.citations, 'citation')}] "
        return block(head, started.shown_text() or "(empty)")
    raw = "".join(started.text)
    tool_input: Any = started.start_input
    if started.dropped:
        more = started.total - started.kept
        tool_input = f"{raw}… [{more} more chars; over {INPUT_LIMIT >> 10} KiB, not parsed]"
    elif raw.strip():
        try:
            tool_input = orjson.loads(raw)
        except orjson.JSONDecodeError:
            tool_input = raw  # cut, or not JSON: shown as it came
    return _tool_use(started.start, tool_input, response=True, suffix=suffix)


# ----------------------------------------------------------------------------- body shape


def claims_request(obj: dict[str, Any]) -> bool:
    return isinstance(obj.get("messages"), list) and "input" not in obj


def claims_response(obj: dict[str, Any]) -> bool:
    # Anthropic's bodies say what they are; OpenAI's buffered bodies carry no "type".
    return obj.get("type") in ("message", "error")


def claims_event(event_type: str) -> bool:
    return event_type in STREAM_EVENTS


RENDERER: Final = Renderer(
    api=API,
    path_suffix="/messages",
    render_request=render_request,
    render_response=render_response,
    claims_request=claims_request,
    claims_response=claims_response,
    claims_event=claims_event,
)
