"""OpenAI Chat Completions bodies as readable text: the view's Chat Completions renderer.

A request (``POST /v1/chat/completions``) becomes its model, stream flag (and whether it asks
for usage, ``stream_options.include_usage``), settings, declared tools and the messages as a
transcript: ``system``/``developer`` shortened, user parts (text, image, audio and file
placeholders), assistant text, ``[reasoning]`` a host echoes, ``[refusal]``, tool calls as
``→ name(args)``, tool results as ``← tool_call_id: content``. The prompt the log records is
marked ``[prompt]``: on the message ``openai_chat.prompt_from_messages`` takes it from (the
last one after trailing system/developer messages; all its text parts, joined, are the prompt).

A response becomes its id, model, the status the log records, the finish reasons, usage and
each choice: reasoning text, content, refusal, tool calls with their arguments
pretty-printed when JSON. A stored stream (``data:`` chunks ending with ``data: [DONE]``) is
assembled per choice, tool calls by their ``index``. Status, usage, id and model come from
the log's own ``ChatAccumulator``, fed what the stream tee feeds it, so the numbers are the
log's.

Bounds, for a 100 MB or hostile body: the transcript keeps the latest messages up to
:data:`TRANSCRIPT_LIMIT` characters; a response keeps at most :data:`MESSAGE_LIMIT`
characters of each choice's content, reasoning and refusal, :data:`INPUT_LIMIT` of each
call's arguments (:data:`STREAM_INPUT_LIMIT` in all), :data:`CHOICES_TRACKED` choices and
:data:`CALLS_TRACKED` calls; every string shown is shortened.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from aibridge.apis import openai_chat as oc
from aibridge.apis.common import MAX_COUNT, RequestError, ResponseResult
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
    flag,
    indented,
    labelled,
    latest_first,
    load_object,
    logged_prompt_line,
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

API: Final = oc.API.name  # the interceptions.api value: "chat_completions"
TITLE: Final = "Chat Completions"

PARTS_HEAD: Final = 20  # of a message with many parts, the first ones shown…
PARTS_TAIL: Final = 60  # …and the last ones (where the typed text is)
CHOICES_TRACKED: Final = 64  # choices of one response shown
CALLS_TRACKED: Final = 1000  # tool calls of one response shown, over all its choices
LOGGED_ERROR_LIMIT: Final = 1000  # the log's error text (a provider's message, a refusal)
# Of a request's messages, how many (from the end) and how many parts of each are looked at
# to tell an Anthropic body from a Chat one: enough for any real body, bounded for a hostile one.
SNIFF_MESSAGES: Final = 500
SNIFF_PARTS: Final = 100
CHUNK_OBJECTS: Final = frozenset({"chat.completion.chunk", "chat.completion"})
# Top-level request fields shown as they are, when set (tools, tool_choice and
# response_format have lines of their own).
SETTINGS: Final = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "reasoning_effort",
    "n",
    "seed",
    "stop",
    "service_tier",
    "parallel_tool_calls",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "verbosity",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "store",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    # OpenAI-compatible hosts' own knobs (vLLM, OpenRouter, Zhipu).
    "top_k",
    "min_p",
    "repetition_penalty",
    "reasoning",
    "thinking",
)
# What only an Anthropic Messages body has: top-level fields, content block types.
ANTHROPIC_FIELDS: Final = (
    "system",
    "stop_sequences",
    "anthropic_version",
    "anthropic_beta",
    "mcp_servers",
    "container",
    "context_management",
)
ANTHROPIC_BLOCKS: Final = frozenset(
    {
        "tool_use",
        "tool_result",
        "server_tool_use",
        "mcp_tool_use",
        "thinking",
        "redacted_thinking",
        "image",
        "document",
        "search_result",
        "container_upload",
    }
)
ANTHROPIC_TOOL_CHOICES: Final = frozenset({"auto", "any", "tool", "none"})
# What only a Chat body has: top-level fields, message roles and keys, content part types.
CHAT_FIELDS: Final = (
    "stream_options",
    "max_completion_tokens",
    "n",
    "response_format",
    "reasoning_effort",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "seed",
    "parallel_tool_calls",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "functions",
    "function_call",
    "verbosity",
    "safety_identifier",
    "prompt_cache_key",
)
CHAT_ROLES: Final = frozenset({"system", "developer", "tool", "function"})
CHAT_MESSAGE_KEYS: Final = ("tool_calls", "tool_call_id", "refusal", "reasoning_content")
CHAT_PARTS: Final = frozenset({"image_url", "input_audio", "file", "refusal"})
# Anthropic's server tools are named by a dated type (web_search_20250305).
_DATED_TYPE: Final = re.compile(r"_\d{8}\Z")
# Reasoning text as hosts send it, in the order the log reads it (openai_chat).
REASONING_FIELDS: Final = ("reasoning_content", "reasoning")


# ---------------------------------------------------------------------------- body parts


def _is_index(value: Any) -> bool:
    # As the log reads a choice's or a call's index.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _data_url(url: str) -> str:
    """A ``data:`` URL as its media type and size, never its base64."""
    media = url[5:200].split(",", 1)[0].split(";", 1)[0]  # the head only: never copy it all
    return f"{shorten(media, 60) or '?'}, base64 {len(url)} chars"


def _part(part: Any, limit: int) -> str:
    """One part of a message's content: its text, or a placeholder for anything else."""
    if isinstance(part, str):  # not the API's shape, but shown rather than hidden
        return shorten(part, limit)
    if not isinstance(part, dict):
        return f"[?] {compact(part, VALUE_LIMIT)}"
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        return shorten(text, limit) if isinstance(text, str) else f"[text] {compact(text, 60)}"
    if kind == "refusal":
        return _refusal(part.get("refusal"))
    if kind == "image_url":
        image = part.get("image_url")
        url = nonempty(image.get("url") if isinstance(image, dict) else image)
        if url is not None and url.startswith("data:"):
            shown = f"[image {_data_url(url)}"
        else:
            shown = f"[image {shorten(url, LABEL_LIMIT)}" if url else "[image"
        detail = short_label(image.get("detail")) if isinstance(image, dict) else None
        return f"{shown}, detail {detail}]" if detail and detail != "auto" else f"{shown}]"
    if kind == "input_audio":
        audio = part.get("input_audio")
        audio = audio if isinstance(audio, dict) else {}
        data = audio.get("data")
        size = f", base64 {len(data)} chars" if isinstance(data, str) else ""
        return f"[input_audio {short_label(audio.get('format')) or '?'}{size}]"
    if kind == "file":
        file = part.get("file")
        file = file if isinstance(file, dict) else {}
        name = short_label(file.get("filename"))
        label = f"file {name!r}" if name else "file"
        data = file.get("file_data")
        if isinstance(data, str):
            size = _data_url(data) if data.startswith("data:") else f"{len(data)} chars"
            return f"[{label} {size}]"
        return labelled(label, short_label(file.get("file_id")))
    name = shorten(kind, 60) if isinstance(kind, str) else "?"
    rest = {k: v for k, v in part.items() if k not in ("type", "cache_control")}
    return f"[{name}] {compact(rest, VALUE_LIMIT)}" if rest else f"[{name}]"


def _refusal(text: Any) -> str:
    return block("[refusal] ", shorten(text, MESSAGE_LIMIT) if isinstance(text, str) else "?")


def _content_text(content: Any, limit: int) -> str:
    """A string content, or a list of parts each on its own line (a tool's result)."""
    if isinstance(content, str):
        return shorten(content, limit)
    if content is None:
        return ""
    if not isinstance(content, list):
        return compact(content, VALUE_LIMIT)
    parts = [_part(p, limit) for p in content[:LIST_SHOWN]]
    if len(content) > LIST_SHOWN:
        parts.append(f"… [{len(content) - LIST_SHOWN} more parts]")
    return "\n".join(p for p in parts if p)


def _call_parts(call: Any) -> tuple[str, str | None, str | None, Any]:
    """A tool call's type, name, id and arguments (``function``, ``custom`` or legacy)."""
    if not isinstance(call, dict):
        return "?", None, None, call
    kind = short_label(call.get("type")) or "function"
    body = call.get("function")
    if not isinstance(body, dict):
        body = call.get("custom")
    body = body if isinstance(body, dict) else {}
    args = body.get("arguments")
    if args is None:
        args = body.get("input")  # custom tools
    return kind, short_label(body.get("name")), short_label(call.get("id")), args


def _request_call(call: Any, kind: str | None = None) -> str:
    """A call in the request's history, on one line: ``→ name(args)  id=…``."""
    call_kind, name, call_id, args = _call_parts(call)
    kind = kind or call_kind
    tags = f" [{kind}]" if kind != "function" else ""
    text = shorten(args, CALL_ARGS_LIMIT) if isinstance(args, str) else ""
    if args is not None and not isinstance(args, str):
        text = compact(args, CALL_ARGS_LIMIT)
    ident = f"  id={call_id}" if call_id else ""
    return block(f"→ {name or kind}{tags}(", f"{text}){ident}")


# -------------------------------------------------------------------------------- request


def render_request(data: bytes) -> str:
    """A Chat Completions request body as readable text. Never raises."""
    return render_request_with(data, _render_request)


def _render_request(data: bytes) -> str:
    obj, why = load_object(data)
    if obj is None:
        return unreadable(f"Not a {TITLE} request", why, data)
    lines = [f"{TITLE} request", f"model: {value_text(obj.get('model'))}"]
    stream = f"stream: {flag(obj, 'stream')}"
    if obj.get("stream") is True:
        options = obj.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            stream += " · usage: requested (stream_options.include_usage)"
        else:
            stream += " · usage: not requested (the provider reports none)"
    elif obj.get("stream_options") is not None:
        stream += f" · stream_options: {value_text(obj['stream_options'])}"
    lines.append(stream)
    if settings := [f"{k}={value_text(obj[k])}" for k in SETTINGS if obj.get(k) is not None]:
        lines.append(f"settings: {', '.join(settings)}")
    if (response_format := obj.get("response_format")) is not None:
        lines.append(f"response_format: {_response_format(response_format)}")
    try:
        info = oc.request_info(obj)
    except RequestError as exc:  # as the bridge answers it: 400, nothing sent upstream
        info = None
        lines.append(f"note: the bridge refuses this request (400): {shorten(str(exc), 200)}")
    if info is not None and info.session_id:
        lines.append(f"session: {shorten(info.session_id, LABEL_LIMIT)}")
    lines.append(names_line("tools", obj.get("tools"), _tool_name))
    if (functions := obj.get("functions")) is not None:  # the legacy form of tools
        lines.append(names_line("functions", functions, _tool_name))
    for key in ("tool_choice", "function_call"):
        choice = obj.get(key)
        if choice is not None and choice != "auto":
            lines.append(f"{key}: {compact(choice, VALUE_LIMIT)}")

    messages = obj.get("messages")
    prompt = oc.prompt_from_messages(messages)
    call_id = oc.correlating_tool_call_id(messages)
    lines.append(logged_prompt_line(prompt, call_id, "tool_call_id", LABEL_LIMIT))

    transcript: list[str] = []
    if isinstance(messages, list):
        heading = f"messages ({len(messages)}):"
        at = _prompt_at(messages) if prompt is not None else None
        transcript = _transcript(messages, at)
    elif messages is None:
        heading = "messages: none"
    else:
        heading = f"messages: {compact(messages, VALUE_LIMIT)}"
    return "\n".join(lines) + "\n\n" + "\n\n".join([heading, *transcript])


def _response_format(value: Any) -> str:
    """Its kind, and a JSON schema's name: ``json_schema (weather)``."""
    if not isinstance(value, dict):
        return value_text(value)
    kind = short_label(value.get("type")) or "?"
    schema = value.get("json_schema")
    name = short_label(schema.get("name")) if isinstance(schema, dict) else None
    return f"{kind} ({name})" if name else kind


def _tool_name(tool: Any) -> str:
    """``tools[].function.name`` (``custom.name``; a legacy function's ``name``), else its type."""
    if not isinstance(tool, dict):
        return compact(tool, 60)
    kind = short_label(tool.get("type"))
    for key in ("function", "custom"):
        body = tool.get(key)
        if isinstance(body, dict) and (name := short_label(body.get("name"))):
            return name if key == "function" else f"{name} (custom)"
    return short_label(tool.get("name")) or kind or "?"


def _prompt_at(messages: list[Any]) -> int | None:
    """The position of the message the logged prompt comes from, found as
    openai_chat.prompt_from_messages finds it: the last one, trailing system and developer
    messages skipped, if it is a user's."""
    for position in range(len(messages) - 1, -1, -1):
        message = messages[position]
        if not isinstance(message, dict):
            return None
        if message.get("role") in ("system", "developer"):
            continue
        return position if message.get("role") == "user" else None
    return None


def _transcript(messages: list[Any], prompt_at: int | None) -> list[str]:
    """The messages as entries (``latest_first``)."""
    return latest_first(
        len(messages), lambda position: _message(messages[position], prompt=position == prompt_at)
    )


def _message(message: Any, *, prompt: bool) -> str:
    """One message as a transcript entry; ``prompt`` marks the one the log's prompt is from."""
    if not isinstance(message, dict):
        return f"[?] {compact(message, VALUE_LIMIT)}"
    role = short_label(message.get("role")) or "?"
    content = message.get("content")
    if role == "tool":
        head = f"← {short_label(message.get('tool_call_id')) or '?'}"
        text = _content_text(content, TOOL_OUTPUT_LIMIT)
        return block(f"{head}: ", shorten(text, TOOL_OUTPUT_LIMIT) or "(empty)")
    if role == "function":  # the legacy form of a tool result: named by its function
        head = f"← {short_label(message.get('name')) or '?'} [function]"
        text = _content_text(content, TOOL_OUTPUT_LIMIT)
        return block(f"{head}: ", shorten(text, TOOL_OUTPUT_LIMIT) or "(empty)")
    head = role
    if name := short_label(message.get("name")):
        head += f" ({name})"
    if prompt:
        head += " [prompt]"
    # System and developer messages are instructions (OpenCode's runs to 30,000 characters).
    limit = INSTRUCTIONS_LIMIT if role in ("system", "developer") else MESSAGE_LIMIT
    reasoning, pieces = _message_pieces(message, limit)
    text = content
    if isinstance(content, list) and len(content) == 1:
        only = content[0]
        if isinstance(only, dict) and only.get("type") == "text":
            text = only.get("text")  # a lone text part goes on the role's line
    if isinstance(text, str) and not pieces and reasoning is None:
        return block(f"{head}: ", shorten(text, limit) or "(empty)")
    entries = [reasoning] if reasoning is not None else []
    if isinstance(text, str):
        if text:  # "" beside tool calls is how OpenAI's SDKs echo a turn of calls only
            entries.append(shorten(text, limit))
    elif isinstance(content, list):
        head += f" ({plural(len(content), 'part')})"
        for index in shown_positions(len(content), PARTS_HEAD, PARTS_TAIL):
            if index < 0:
                hidden = len(content) - PARTS_HEAD - PARTS_TAIL
                entries.append(f"… [{plural(hidden, 'part')} not shown]")
            else:
                entries.append(_part(content[index], limit))
    elif content is not None:
        entries.append(f"[content] {compact(content, VALUE_LIMIT)}")
    entries.extend(pieces)
    if not entries:
        return f"{head}: (empty)"
    return "\n".join([f"{head}:", *(indented(e) for e in entries)])


def _message_pieces(message: dict[str, Any], limit: int) -> tuple[str | None, list[str]]:
    """An (assistant) message's parts besides its content: the reasoning a host echoes
    (shown first), and its refusal, audio and tool calls (shown after the content)."""
    reasoning = None
    for key in REASONING_FIELDS:
        if isinstance(text := message.get(key), str) and text:
            reasoning = block("[reasoning] ", shorten(text, limit))
            break
    pieces: list[str] = []
    if nonempty(refusal := message.get("refusal")):
        pieces.append(_refusal(refusal))
    audio = message.get("audio")
    if isinstance(audio, dict):
        pieces.append(labelled("audio", short_label(audio.get("id"))))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        pieces.extend(_request_call(call) for call in calls[:LIST_SHOWN])
        if len(calls) > LIST_SHOWN:
            pieces.append(f"… [{len(calls) - LIST_SHOWN} more tool calls]")
    elif calls is not None:
        pieces.append(f"[tool_calls] {compact(calls, VALUE_LIMIT)}")
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        pieces.append(_request_call({"function": legacy}, "function_call"))
    return reasoning, pieces


# ------------------------------------------------------------------------------- response


def render_response(data: bytes, content_type: str) -> str:
    """A Chat Completions response body (stream or buffered JSON) as text. Never raises."""
    return render_response_with(data, content_type, _render_stream, _render_buffered)


@dataclass(slots=True)
class _Text:
    """Pieces of one text (content, reasoning, a refusal): the first MESSAGE_LIMIT
    characters kept, the rest only counted."""

    pieces: list[str] = field(default_factory=list)
    kept: int = 0
    total: int = 0

    def keep(self, piece: str) -> None:
        self.total += len(piece)
        room = MESSAGE_LIMIT - self.kept
        if room > 0:
            part = piece[:room]
            self.pieces.append(part)
            self.kept += len(part)

    def shown(self) -> str:
        text = "".join(self.pieces)
        return text + (f"… [{self.total - self.kept} more chars]" if self.total > self.kept else "")


@dataclass(slots=True)
class _Call:
    """One tool call, as its deltas (or the buffered message) gave it; bounded arguments."""

    kind: str = "function"
    call_id: str | None = None
    name: str | None = None
    pieces: list[str] = field(default_factory=list)  # the arguments as they came
    kept: int = 0
    total: int = 0
    dropped: bool = False  # over its limit: only the head kept, not parsed


@dataclass(slots=True)
class _Choice:
    """What one choice (``index``) of the response gave."""

    role: str | None = None
    content: _Text = field(default_factory=_Text)
    reasoning: _Text = field(default_factory=_Text)
    refusal: _Text = field(default_factory=_Text)
    transcript: _Text = field(default_factory=_Text)  # of an audio answer
    calls: dict[Any, _Call] = field(default_factory=dict)  # keyed as the log keys them
    finish_reason: Any = None
    annotations: int = 0


@dataclass
class _State:
    """What a response says, choice by choice: a stream chunk by chunk, or a buffered body."""

    chunks: int = 0
    bad_chunks: int = 0  # not JSON, not an object: skipped
    bad_fields: int = 0  # a field of the wrong shape inside a chunk or body: ignored
    malformed_notes: list[str] = field(default_factory=list)
    choices: dict[int, _Choice] = field(default_factory=dict)
    untracked_choices: int = 0  # past CHOICES_TRACKED
    untracked_calls: int = 0  # past CALLS_TRACKED
    calls: int = 0
    args_kept: int = 0  # characters of arguments kept, over all calls
    done: bool = False  # data: [DONE]
    error: bool = False  # an error chunk
    after_end: int = 0  # chunks after either: the log reads none of them
    named: int = 0  # events with an event: name, which the tee passes over

    def note_bad_chunk(self, why: str) -> None:
        self.bad_chunks += 1
        self._describe(f"chunk {self.chunks}: {why}")

    def note_malformed(self, why: str) -> None:
        self.bad_fields += 1
        self._describe(f"chunk {self.chunks}: {why}" if self.chunks else why)

    def _describe(self, text: str) -> None:
        if len(self.malformed_notes) < MALFORMED_NOTES:
            self.malformed_notes.append(shorten(text, 160))

    def choice(self, index: int) -> _Choice | None:
        choice = self.choices.get(index)
        if choice is None:
            if len(self.choices) >= CHOICES_TRACKED:
                self.untracked_choices += 1
                return None
            choice = self.choices[index] = _Choice()
        return choice


def _is_error_body(obj: dict[str, Any]) -> bool:
    # As ChatAccumulator judges a body or a chunk: {"error": {...}} without choices.
    return obj.get("error") is not None and "choices" not in obj


def _render_buffered(data: bytes) -> str:
    obj, why = load_object(data)
    if obj is None:
        return unreadable(f"Not a {TITLE} response", why, data)
    accumulator = oc.ChatAccumulator()
    accumulator.feed_response_object(obj)
    result = accumulator.result()
    if _is_error_body(obj):
        return _render_error(obj, result)
    state = _State()
    notes: list[str] = []
    choices = obj.get("choices")
    if isinstance(choices, list):
        for position, entry in enumerate(choices):
            if not isinstance(entry, dict):
                state.note_malformed(f"choice {position} is not an object")
                continue
            index = entry.get("index", position)
            choice = state.choice(index if _is_index(index) else position)
            if choice is None:
                continue
            message = entry.get("message")
            if isinstance(message, dict):
                _take_message(state, choice, message, streamed=False)
            elif message is not None:
                state.note_malformed(f"choice {position}: message is not an object")
            _take_finish(choice, entry.get("finish_reason"))
    elif choices is not None:
        notes.append(f"choices is not a list: {compact(choices, VALUE_LIMIT)}")
    notes.extend(_state_notes(state))
    if result.token_usage is None:
        notes.append("no usage in the body: the log records no token usage")
    return _render_outcome(f"{TITLE} response", result, state, notes, streamed=False)


def _render_error(obj: dict[str, Any], result: ResponseResult) -> str:
    """An API error body (4xx/5xx), or the bridge's own: the log's error code and text."""
    lines = [f"{TITLE} error", f"error: {_logged_error(result, obj)}"]
    nested = obj.get("error")
    if isinstance(nested, dict):
        facts = [
            f"{key}: {label}"
            for key in ("type", "param")
            if (label := short_label(nested.get(key))) and label != result.error_code
        ]
        if facts:
            lines.append(" · ".join(facts))
    return "\n".join(lines)


def _logged_error(result: ResponseResult, obj: dict[str, Any] | None = None) -> str:
    """``code: message`` as the log has them (error_code, error)."""
    code, message = result.error_code, result.error
    text = message or code or ""
    if code and message and message != code:
        text = f"{code}: {message}"
    if not text and obj is not None and not isinstance(obj.get("error"), dict):
        text = compact(obj.get("error"), VALUE_LIMIT)  # a number, a list: shown as sent
    return shorten(text, LOGGED_ERROR_LIMIT) or "(no message)"


def _render_stream(data: bytes) -> str:
    parser = SSEParser(max_event_bytes=MAX_EVENT_BYTES)  # as the tee: what the log drops
    state = _State()
    accumulator = oc.ChatAccumulator()
    for event in sse_events(parser, data):
        if event.event is not None:
            # The tee's parser passes over named events (the API wants none): so does the view.
            state.named += 1
            continue
        payload = event.data
        if not payload:
            continue  # nothing to read, for the log either
        accumulator.feed_event(None, payload)
        if state.done or state.error:
            state.after_end += 1
            continue
        if payload == "[DONE]":
            state.done = True
            continue
        state.chunks += 1
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            state.note_bad_chunk(str(exc))
            continue
        if not isinstance(chunk, dict):
            state.note_bad_chunk(f"JSON {type(chunk).__name__}, not an object")
            continue
        _apply_chunk(state, chunk)

    result = accumulator.result()
    notes = _state_notes(state)
    if parser.oversized_events:
        notes.append(f"{parser.oversized_events} oversized event(s) skipped")
    if state.named:
        notes.append(f"{state.named} named event(s) skipped (the log reads unnamed data: only)")
    if state.after_end:
        end = "data: [DONE]" if state.done else "the error chunk"
        notes.append(f"{state.after_end} chunk(s) after {end} (the log stops there)")
    if not state.done and not state.error:
        if result.status is not None:
            notes.append("no data: [DONE]: every choice has a finish_reason, so the log ends it")
        else:
            notes.append(
                "the stream has no data: [DONE] and not every choice has a finish_reason: "
                "showing what arrived"
            )
    if result.token_usage is None and not state.error:
        notes.append("no usage chunk: the log records no token usage")
    title = f"{TITLE} response (streamed: {plural(state.chunks, 'chunk')})"
    return _render_outcome(title, result, state, notes, streamed=True)


def _apply_chunk(state: _State, chunk: dict[str, Any]) -> None:
    if _is_error_body(chunk):
        state.error = True
        return
    choices = chunk.get("choices")
    if choices is None:
        return  # a usage chunk of a host that leaves choices out, or a keep-alive object
    if not isinstance(choices, list):
        state.note_malformed("choices is not a list")
        return
    for entry in choices:
        index = entry.get("index", 0) if isinstance(entry, dict) else None
        if not _is_index(index):
            state.note_malformed("a choice without an index")
            continue
        choice = state.choice(index)
        if choice is None:
            continue
        delta = entry.get("delta")
        if isinstance(delta, dict):
            _take_message(state, choice, delta, streamed=True)
        elif delta is not None:
            state.note_malformed(f"choice {index}: delta is not an object")
        _take_finish(choice, entry.get("finish_reason"))


def _take_finish(choice: _Choice, reason: Any) -> None:
    if reason is not None and choice.finish_reason is None:  # the first one decides, as logged
        choice.finish_reason = reason


def _take_message(
    state: _State, choice: _Choice, message: dict[str, Any], *, streamed: bool
) -> None:
    """A stream's ``delta`` or a buffered ``message``: each piece kept where it belongs."""
    if (role := short_label(message.get("role"))) and choice.role is None:
        choice.role = role
    content = message.get("content")
    if isinstance(content, str):
        choice.content.keep(content)
    elif isinstance(content, list):  # hosts that answer in parts
        for part in content:
            if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                choice.content.keep(text)
    elif content is not None:
        state.note_malformed("content is not a string")
    for key in REASONING_FIELDS:
        if isinstance(text := message.get(key), str) and text:
            choice.reasoning.keep(text)
            break  # a host sends one of them; both would be the same text
    if isinstance(refusal := message.get("refusal"), str):
        choice.refusal.keep(refusal)
    audio = message.get("audio")
    if isinstance(audio, dict) and isinstance(transcript := audio.get("transcript"), str):
        choice.transcript.keep(transcript)
    if isinstance(annotations := message.get("annotations"), list):
        choice.annotations += len(annotations)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for position, entry in enumerate(calls):
            if not isinstance(entry, dict):
                state.note_malformed("a tool call is not an object")
                continue
            # Keyed as the log keys them: a stream's by index, a buffered body's by position.
            key = entry.get("index") if streamed else position
            if not _is_index(key):
                key = ("whole", len(choice.calls))  # whole calls without an index
            _take_call(state, choice, key, entry)
    elif calls is not None:
        state.note_malformed("tool_calls is not a list")
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        _take_call(state, choice, "function_call", {"type": "function_call", "function": legacy})


def _take_call(state: _State, choice: _Choice, key: Any, entry: dict[str, Any]) -> None:
    call = choice.calls.get(key)
    if call is None:
        if state.calls >= CALLS_TRACKED:
            state.untracked_calls += 1
            return
        state.calls += 1
        call = choice.calls[key] = _Call()
    if (call_id := short_label(entry.get("id"))) and call.call_id is None:
        call.call_id = call_id
    if kind := short_label(entry.get("type")):
        call.kind = kind
    body = entry.get("function")
    if not isinstance(body, dict):
        body = entry.get("custom")
    if not isinstance(body, dict):
        return
    if (name := short_label(body.get("name"))) and call.name is None:
        call.name = name
    piece = body.get("arguments")
    if piece is None:
        piece = body.get("input")  # custom tools
    if isinstance(piece, str):
        _keep_args(state, call, piece)
    elif piece is not None:
        # A host that sends structured arguments: kept as their JSON, as the log keeps them.
        try:
            _keep_args(state, call, orjson.dumps(piece).decode())
        except orjson.JSONEncodeError:
            state.note_malformed("tool call arguments orjson cannot write")


def _keep_args(state: _State, call: _Call, piece: str) -> None:
    """Keep a piece of arguments whole while it fits the limits; past them only their head."""
    call.total += len(piece)
    if call.dropped:
        return
    if call.kept + len(piece) <= INPUT_LIMIT and state.args_kept + len(piece) <= STREAM_INPUT_LIMIT:
        call.pieces.append(piece)
        call.kept += len(piece)
        state.args_kept += len(piece)
        return
    head = "".join(call.pieces)[:DROPPED_HEAD]
    state.args_kept -= call.kept
    call.pieces, call.kept, call.dropped = [head], len(head), True


def _state_notes(state: _State) -> list[str]:
    notes: list[str] = []
    if state.bad_chunks:
        notes.append(f"{state.bad_chunks} malformed chunk(s) skipped")
    if state.bad_fields:
        notes.append(f"{state.bad_fields} malformed field(s) ignored")
    notes.extend(INDENT + n for n in state.malformed_notes)
    if state.untracked_choices:
        notes.append(f"{state.untracked_choices} choice(s) past the view's {CHOICES_TRACKED}")
    if state.untracked_calls:
        notes.append(f"{state.untracked_calls} tool call(s) past the view's {CALLS_TRACKED}")
    return notes


def _render_outcome(
    title: str, result: ResponseResult, state: _State, notes: list[str], *, streamed: bool
) -> str:
    lines = [title]
    if result.response_id:
        lines.append(f"id: {shorten(result.response_id, LABEL_LIMIT)}")
    if result.response_model:
        lines.append(f"model: {shorten(result.response_model, LABEL_LIMIT)}")
    if result.status is not None:
        lines.append(f"status: {result.status}")
    positions = sorted(state.choices)
    reasons = [state.choices[i].finish_reason for i in positions]
    if len(reasons) == 1 and reasons[0] is not None:
        lines.append(f"finish_reason: {value_text(reasons[0])}")
    elif len(reasons) > 1:
        lines.append(f"finish_reasons: {', '.join(_finish(r) for r in reasons)}")
    lines.extend(_usage_lines(result.token_usage))
    if result.status == "error":
        lines.append(f"error: {_logged_error(result)}")
    elif result.error and result.error not in reasons:  # a refusal, the caps' note
        lines.append(block("error: ", shorten(result.error, LOGGED_ERROR_LIMIT)))
    lines.extend(f"note: {n}" if not n.startswith(INDENT) else n for n in notes)
    if not positions:
        return "\n".join([*lines, "", "choices: none"])
    several = len(positions) > 1
    entries: Iterator[str] = (
        _choice_entry(i, state.choices[i], streamed=streamed, several=several) for i in positions
    )
    shown: list[str] = []
    used = 0
    for entry in entries:
        if used > CONTENT_LIMIT:
            shown.append(f"… [{plural(len(positions) - len(shown), 'more choice')} not shown]")
            break
        shown.append(entry)
        used += len(entry)
    return "\n".join(lines) + "\n\n" + "\n\n".join(shown)


def _finish(reason: Any) -> str:
    return "none" if reason is None else value_text(reason, 60)


def _choice_entry(index: int, choice: _Choice, *, streamed: bool, several: bool) -> str:
    """One choice: its reasoning, content, refusal and tool calls, in that order; with a
    heading when the response has several."""
    suffix = " (in_progress)" if streamed and choice.finish_reason is None else ""
    parts: list[str] = []
    if choice.reasoning.total:
        parts.append(block(f"[reasoning]{suffix} ", choice.reasoning.shown()))
    role = choice.role or "assistant"
    nothing_else = not (choice.refusal.total or choice.calls or choice.transcript.total)
    if choice.content.total or (nothing_else and not parts):
        head = f"{role}{suffix}: "
        if choice.annotations:
            head += f"[{plural(choice.annotations, 'annotation')}] "
        parts.append(block(head, choice.content.shown() or "(empty)"))
    if choice.refusal.total:
        parts.append(block(f"[refusal]{suffix} ", choice.refusal.shown()))
    if choice.transcript.total:
        parts.append(block(f"[audio]{suffix} ", choice.transcript.shown()))
    parts.extend(_response_call(call, suffix) for call in choice.calls.values())
    if not several:
        return "\n\n".join(parts)
    heading = f"choice {index} ({_finish(choice.finish_reason)}):"
    return "\n".join([heading, *(indented(p) for p in parts)])


def _response_call(call: _Call, suffix: str) -> str:
    """A call as the response gave it, its arguments pretty-printed when they are JSON."""
    name = call.name or call.kind
    tags = f" [{call.kind}]" if call.kind != "function" and call.name else ""
    ident = f"  id={call.call_id}" if call.call_id else ""
    lines = [f"→ {name}{tags}{ident}{suffix}"]
    raw = "".join(call.pieces)
    if call.dropped:
        more = call.total - call.kept
        lines.append(
            indented(f"{raw}… [{more} more chars; over {INPUT_LIMIT >> 10} KiB, not parsed]")
        )
    elif raw.strip():
        try:
            lines.append(indented(pretty(orjson.loads(raw))))
        except orjson.JSONDecodeError:
            lines.append(indented(shorten(raw, PRETTY_LIMIT)))  # cut, or not JSON: as it came
    return "\n".join(lines)


def _usage_lines(row: dict[str, Any] | None) -> list[str]:
    """The log's token_usages row (openai_chat.token_usage_row) in one line: OpenAI's prompt
    tokens include the cached ones, its completion tokens the reasoning ones."""
    if row is None:
        return []

    def number(key: str) -> str:
        value = row.get(key)
        return "?" if value is None else str(value)

    cache = f"cached {number('cache_read_input_tokens')}"
    if row.get("cache_write_input_tokens") is not None:
        cache += f", cache write {number('cache_write_input_tokens')}"
    line = (
        f"usage: input {number('input_tokens')} ({cache}) · "
        f"output {number('output_tokens')} (reasoning {number('reasoning_tokens')}) · "
        f"total {number('total_tokens')}"
    )
    if tier := row.get("service_tier"):
        line += f" · tier {shorten(tier, LABEL_LIMIT)}"
    return [line]


# ----------------------------------------------------------------------------- body shape


def _anthropic_looking(obj: dict[str, Any]) -> bool:
    """Something only an Anthropic Messages body has: a top-level system prompt (or another
    field of its own), tools declared with ``input_schema`` or by a dated type, its
    ``tool_choice`` object, or content blocks of its own types (tool_use, tool_result, …)."""
    if any(obj.get(key) is not None for key in ANTHROPIC_FIELDS):
        return True
    tools = obj.get("tools")
    if isinstance(tools, list):
        for tool in tools[:SNIFF_PARTS]:
            if not isinstance(tool, dict):
                continue
            kind = tool.get("type")
            if "input_schema" in tool or (isinstance(kind, str) and _DATED_TYPE.search(kind)):
                return True
    choice = obj.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ANTHROPIC_TOOL_CHOICES:
        return True
    messages = obj.get("messages")
    for message in messages[-SNIFF_MESSAGES:] if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for item in content[:SNIFF_PARTS]:
            kind = item.get("type") if isinstance(item, dict) else None
            if isinstance(kind, str) and (
                kind in ANTHROPIC_BLOCKS or kind.endswith("_tool_result")
            ):
                return True
    return False


def _chat_looking(obj: dict[str, Any]) -> bool:
    """Something only a Chat body has: a field of its own, a tool declared as ``function``,
    a ``tool_choice`` string, a system/developer/tool message, tool calls, image_url parts."""
    if any(obj.get(key) is not None for key in CHAT_FIELDS):
        return True
    if isinstance(obj.get("tool_choice"), str):
        return True
    tools = obj.get("tools")
    if isinstance(tools, list) and any(
        isinstance(tool, dict) and "function" in tool for tool in tools[:SNIFF_PARTS]
    ):
        return True
    messages = obj.get("messages")
    for message in messages[-SNIFF_MESSAGES:] if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        if message.get("role") in CHAT_ROLES or any(k in message for k in CHAT_MESSAGE_KEYS):
            return True
        content = message.get("content")
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") in CHAT_PARTS
            for part in content[:SNIFF_PARTS]
        ):
            return True
    return False


def claims_request(obj: dict[str, Any]) -> bool:
    """Both APIs send ``messages`` (Chat is asked first: aibridge.view.RENDERERS). Anything
    Anthropic-only makes it Messages'; so does ``max_tokens``, which Anthropic requires, when
    nothing Chat-only is there too (``{"max_tokens", "messages": [user text]}`` is either)."""
    if not isinstance(obj.get("messages"), list) or "input" in obj or _anthropic_looking(obj):
        return False
    return obj.get("max_tokens") is None or _chat_looking(obj)


def claims_response(obj: dict[str, Any]) -> bool:
    return obj.get("object") == "chat.completion" or isinstance(obj.get("choices"), list)


def claims_event(event_type: str) -> bool:
    # Chunks carry no type: aibridge.view sniffs a stream by their "object" instead.
    return event_type in CHUNK_OBJECTS


RENDERER: Final = Renderer(
    api=API,
    path_suffix="/chat/completions",
    render_request=render_request,
    render_response=render_response,
    claims_request=claims_request,
    claims_response=claims_response,
    claims_event=claims_event,
)
