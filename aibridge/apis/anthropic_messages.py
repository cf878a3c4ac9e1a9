"""What the audit log records from one Anthropic Messages API exchange (DESIGN.md §3.3).

Pure functions over decoded JSON, like aibridge.extract (the Responses version, whose
RequestInfo, ResponseResult, RequestError and count helpers are shared): no mitmproxy, no I/O.

- the request: :func:`parse_request` validates a ``POST /v1/messages`` body and reads the
  model, stream flag, prompt, correlating tool call id and session id;
- the response: :class:`MessagesAccumulator` is fed the stream's events one at a time (or a
  buffered body once) and keeps only what the records need: tool inputs and thinking text
  are assembled per content block, text deltas are dropped;
- :func:`error_body` and :func:`upstream_error_text`: Anthropic's error shape, ours and theirs.

The rules where DESIGN is silent are those of ``tests/fixtures/anthropic_messages/README.md``
(prompt: the last text block of the last ``user`` message; session id from
``metadata.user_id``; usage merged from ``message_start`` and every ``message_delta``;
``message_stop`` or ``error`` ends the exchange). Further choices, made here:

- The status is decided by the first ``message_stop`` (from the stop reason known then);
  content blocks that still follow are recorded, as a client's SDK would still take them.
  Nothing after an ``error`` event is read (Anthropic sends nothing after one, and the SDKs
  stop there). A stop reason this module does not know gives ``completed`` with the reason
  kept in ``error``, as for ``refusal``: visible, never lost.
- Result blocks (``*_tool_result``) give the ``invocation_error`` of the call they answer:
  ``is_error: true`` gives its text, a content of a ``*_error`` type gives its ``error_code``.
- Everything upstream sends is untrusted and nothing here raises on any JSON.

What the stream tee may skip without decoding: ``ping`` by its name, and nothing else by name.
The event that comes by the hundred, ``content_block_delta``, carries the tool inputs
(``input_json_delta``) and thoughts (``thinking_delta``) as well as the text deltas, so
:data:`DELTA_EVENTS` is empty. Instead, :func:`worth_decoding` recognises a text delta (or a
ping) by its bytes: it says False only for data that is, in full, Anthropic's compact
spelling of such an event, which no parser can read as anything else. Any other spelling,
however harmless, is decoded. Runs of such text deltas whose text is also valid JSON text
(:data:`SKIPPABLE_EVENTS`) are passed over by the SSE parser itself, one regex match each.

Memory per exchange is bounded: at most :data:`MAX_BLOCK_BYTES` of assembled input or
thinking per content block, :data:`MAX_EXCHANGE_BYTES` of everything kept in all,
:data:`MAX_BLOCKS` content blocks tracked and :data:`MAX_USAGE_BYTES` of raw usage JSON.
Past a block's cap its content is dropped whole, since a prefix of JSON is not the call's
arguments: the row stays, with ``args`` (or a thought's ``content``) null, and ``error`` says
how many blocks lost their content. Blocks past the count cap get no row, also said in
``error``. Assembled content is kept as UTF-8 bytes and parsed only in :meth:`result`.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Final

import orjson

from aibridge.apis.common import (
    MAX_COUNT,
    MAX_TIER_CHARS,
    STRING_INSIDE,
    Api,
    EventAccumulator,
    RequestError,
    RequestInfo,
    ResponseResult,
    checked,
    count,
    json_cost,
    load_body,
)

MESSAGE_START: Final = "message_start"
CONTENT_BLOCK_START: Final = "content_block_start"
CONTENT_BLOCK_DELTA: Final = "content_block_delta"
CONTENT_BLOCK_STOP: Final = "content_block_stop"
MESSAGE_DELTA: Final = "message_delta"
MESSAGE_STOP: Final = "message_stop"
ERROR_EVENT: Final = "error"
PING: Final = "ping"

# The events the stream tee must decode (all but ping); events without a name are always fed.
WANTED_EVENTS: Final[frozenset[str]] = frozenset(
    {
        MESSAGE_START,
        CONTENT_BLOCK_START,
        CONTENT_BLOCK_DELTA,
        CONTENT_BLOCK_STOP,
        MESSAGE_DELTA,
        MESSAGE_STOP,
        ERROR_EVENT,
    }
)
# Runs of unwanted events the SSE parser may pass over by name: none (see the module docstring).
DELTA_EVENTS: Final[frozenset[str]] = frozenset()

MAX_BLOCK_BYTES: Final = 4 << 20
MAX_EXCHANGE_BYTES: Final = 16 << 20
MAX_BLOCKS: Final = 4096
MAX_USAGE_BYTES: Final = 64 << 10
# Charged per tracked block besides its strings: the Python objects that hold it.
_BLOCK_OVERHEAD: Final = 512
# An invocation error is a message; a longer one is cut (many result blocks may carry one).
_MAX_ERROR_CHARS: Final = 4096
# A stop reason longer than this is not one (the API's are a few words).
_MAX_REASON_CHARS: Final = 64
# A session id longer than this is not one (Claude Code's are UUIDs).
_MAX_SESSION_CHARS: Final = 256

_COMPLETED_REASONS: Final = frozenset({"end_turn", "tool_use", "stop_sequence", "pause_turn"})
_INCOMPLETE_REASONS: Final = frozenset({"max_tokens", "model_context_window_exceeded"})
# What a usage JSON trimmed to its size cap keeps: the fields the columns come from.
_USAGE_COUNTED: Final = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
    "service_tier",
    "cache_creation",  # the 5-minute / 1-hour split of cache writes (priced apart)
    "speed",  # "fast" mode is billed at its own rate
)

# --------------------------------------------------------------------------- request

# The top-level fields the bridge reads, or that decide what the provider does and bills
# (tools it runs, service tier, effort). Given twice, the provider may read the other copy
# than the bridge did, so such a body is refused.
CHECKED_FIELDS: Final = frozenset(
    {
        "model",
        "stream",
        "messages",
        "system",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "max_tokens",
        "mcp_servers",
        "service_tier",
        "inference_geo",
        "speed",
        "container",
        "context_management",
        "output_config",
    }
)

# Claude Code before 2.x: user_<hash>_account_<uuid or empty>_session_<uuid>.
_LEGACY_USER_ID: Final = re.compile(
    rf"user_[0-9a-fA-F]+_account_[0-9a-fA-F-]*_session_([0-9a-fA-F-]{{1,{_MAX_SESSION_CHARS}}})"
)


def parse_request(body: bytes) -> tuple[dict[str, Any], RequestInfo]:
    """Decode and check a ``POST /v1/messages`` body; the caller forwards the original bytes.

    As strict as extract.parse_request: only the fields read here are type-checked, a field
    absent or ``null`` is as if not sent, and a field of CHECKED_FIELDS given twice is refused.
    """
    obj = load_body(body, CHECKED_FIELDS)
    return obj, request_info(obj)


def request_info(obj: dict[str, Any]) -> RequestInfo:
    """parse_request's checks and reading, on a body decoded already."""
    model = checked(obj, "model", str, "a string")
    stream = checked(obj, "stream", bool, "a boolean")
    messages = checked(obj, "messages", list, "an array of messages")
    metadata = checked(obj, "metadata", dict, "an object")
    if metadata is not None and not isinstance(metadata.get("user_id"), str | None):
        raise RequestError("'metadata.user_id' must be a string")
    return RequestInfo(
        model=model,
        stream=bool(stream),
        background=False,  # Messages has no background mode
        prompt=prompt_from_messages(messages),
        correlating_tool_call_id=correlating_tool_call_id(messages),
        previous_response_id=None,  # nor server-side conversation state
        session_id=session_id_from_metadata(metadata),
    )


def _last_user_message(messages: Any) -> dict[str, Any] | None:
    """The last message, skipping ``system``-role messages after it, if its role is ``user``."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "system":
            continue  # Claude Code appends its environment as one
        if isinstance(message, dict) and message.get("role") == "user":
            return message
        return None
    return None


def prompt_from_messages(messages: Any) -> str | None:
    """The prompt of DESIGN §3.3: string content as is, else the last ``text`` block alone.

    Claude Code puts its ``<system-reminder>`` blocks before what the person typed, so the
    last block is the typed text; joining would bury it.
    """
    message = _last_user_message(messages)
    if message is None:
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    for block in reversed(content):
        if _is_text_block(block):
            return block["text"]
    return None


def correlating_tool_call_id(messages: Any) -> str | None:
    """The ``tool_use_id`` of the last ``tool_result`` of a last user message without text."""
    message = _last_user_message(messages)
    content = message.get("content") if message is not None else None
    if not isinstance(content, list) or any(_is_text_block(block) for block in content):
        return None
    for block in reversed(content):
        if isinstance(block, dict) and block.get("type") == "tool_result":
            call_id = block.get("tool_use_id")
            return call_id if isinstance(call_id, str) and call_id else None
    return None


def _is_text_block(block: Any) -> bool:
    return (
        isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
    )


def session_id_from_metadata(metadata: Any) -> str | None:
    """The session in ``metadata.user_id``: Claude Code 2.x's JSON string, or the older form.

    (Claude Code's ``X-Claude-Code-Session-Id`` header, preferred, is read by aibridge.clients.)
    """
    if not isinstance(metadata, dict):
        return None
    user_id = metadata.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        return None
    if user_id.startswith("{"):
        try:
            parsed = orjson.loads(user_id)
        except orjson.JSONDecodeError:
            return None
        value = parsed.get("session_id") if isinstance(parsed, dict) else None
        ok = isinstance(value, str) and 0 < len(value) <= _MAX_SESSION_CHARS
        return value if ok else None
    match = _LEGACY_USER_ID.fullmatch(user_id)
    return match.group(1) if match else None


# ---------------------------------------------------------------- the tee's byte test

# Anthropic's spelling of a text delta, around its index and its text (and of a ping), with
# the other tokens the test needs, as str and as bytes.
_STR_TOKENS: Final = (
    '{"type":"content_block_delta","index":',
    ',"delta":{"type":"text_delta","text":"',
    '"}}',
    '{"type":"ping"}',
    "\\",
    '"',
    "\\\\",
    '\\"',
    ",",
    "0",
    "",
)
_BYTES_TOKENS: Final = tuple(token.encode() for token in _STR_TOKENS)
_HEAD_LEN: Final = len(_STR_TOKENS[0])
_TEXT_HEAD_LEN: Final = len(_STR_TOKENS[1])


def worth_decoding(data: str | bytes) -> bool:
    """False only for a text delta or a ping spelled exactly as Anthropic spells them.

    Such an event changes nothing in the records, so the tee may drop it undecoded. The
    test is a few str methods (memchr speed), about half the cost of decoding a short
    delta. Exact where it matters: the fixed spelling leaves no room for another key or a
    duplicate, and the text must end at the closing quote (every quote in it escaped, no
    backslash escaping the closing one), so any JSON parser reads a text delta at that
    index. Not checked: that the text is itself valid (no raw control character, bad
    escape or ill-formed UTF-8); such a delta, skipped, is not counted in malformed_events.
    """
    head, text_head, tail, ping, backslash, quote, pair, escaped, comma, zero, empty = (
        _STR_TOKENS if isinstance(data, str) else _BYTES_TOKENS
    )
    if not data.startswith(head):
        return data != ping
    end = data.find(comma, _HEAD_LEN, _HEAD_LEN + 10)  # at most 9 digits
    digits = data[_HEAD_LEN:end]
    if end < 0 or not (digits.isascii() and digits.isdigit()):
        return True
    if digits.startswith(zero) and len(digits) > 1:
        return True  # a leading zero is not JSON
    start = end + _TEXT_HEAD_LEN
    if len(data) < start + 3 or not data.startswith(text_head, end) or not data.endswith(tail):
        return True
    body = data[start:-3]
    if backslash not in body:
        return quote in body
    # Escaped backslashes out first (JSON pairs them left to right); then no two backslashes
    # touch, so each quote left must be an escaped one and no backslash may end the text.
    body = body.replace(pair, empty)
    return body.endswith(backslash) or body.count(quote) != body.count(escaped)


# A text delta as Anthropic sends it, the whole SSE event: what worth_decoding drops, with
# its text checked as well, so the SSE parser passes over runs of them undecoded.
SKIPPABLE_EVENTS: Final = re.compile(
    rb"event: ?content_block_delta\ndata: ?"
    + re.escape(_BYTES_TOKENS[0])
    + rb"(?:0|[1-9][0-9]{0,8})"
    + re.escape(_BYTES_TOKENS[1])
    + STRING_INSIDE.pattern
    + re.escape(_BYTES_TOKENS[2])
    + rb"\n\n"
)


# -------------------------------------------------------------------------- response


class _Block:
    """One content block the records need: a tool call, a thinking block or a redacted one."""

    __slots__ = (
        "call_id",
        "closed",
        "dropped",
        "kind",
        "name",
        "server_name",
        "start_cost",
        "start_input",
        "text",
        "type",
    )

    def __init__(self, kind: str, block_type: str) -> None:
        self.kind = kind  # "tool", "thinking" or "redacted"
        self.type = block_type
        self.call_id: str | None = None
        self.name: str | None = None
        self.server_name: str | None = None
        self.start_input: Any = None  # the start block's input, checked writable
        self.start_cost = 0  # its size, as json_cost counts it
        self.text = bytearray()  # partial_json or thinking, UTF-8, as it arrives
        self.closed = False
        self.dropped = False


class MessagesAccumulator(EventAccumulator):
    """Collects the records of one Messages response from its stream events or its body.

    The interface of extract.ResponseAccumulator: feed_event, feed_response_object,
    feed_response_body, ended, result(), and the response_id, response_model and
    malformed_events attributes. Also counted: ``dropped_blocks`` (content over a cap) and
    ``untracked_blocks`` (past MAX_BLOCKS), both reported in the result's ``error``.
    """

    __slots__ = (
        "_blocks",
        "_error",
        "_final_reason",
        "_invocation_errors",
        "_kept",
        "_started",
        "_stop_reason",
        "_stopped",
        "_upstream_error",
        "_usage",
        "_usage_trimmed",
        "dropped_blocks",
        "response_id",
        "response_model",
        "untracked_blocks",
    )

    def __init__(self) -> None:
        super().__init__()
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.dropped_blocks = 0
        self.untracked_blocks = 0
        self._blocks: dict[int, _Block] = {}
        self._invocation_errors: dict[str, bytes] = {}  # UTF-8: its size is what is charged
        self._kept = 0  # bytes of content kept, against MAX_EXCHANGE_BYTES
        self._usage: dict[str, Any] | None = None
        self._usage_trimmed = False
        self._started = False
        self._stop_reason: str | None = None  # the last message_delta's
        self._stopped = False
        self._final_reason: str | None = None  # the stop reason when message_stop came
        self._error: tuple[str | None, str | None] | None = None
        self._upstream_error: tuple[str | None, str | None] | None = None

    def feed_event(self, event_name: str | None, data: str | bytes) -> None:
        """Take one event; text deltas and pings are dropped undecoded (worth_decoding)."""
        if worth_decoding(data):
            super().feed_event(event_name, data)

    def _accepts_events(self) -> bool:
        return self._error is None and self._upstream_error is None  # nothing after an error

    @property
    def ended(self) -> bool:
        """``message_stop`` or an error arrived: the response is over by the protocol."""
        return self._stopped or self._error is not None or self._upstream_error is not None

    def result(self) -> ResponseResult:
        status, error, error_code = self._status()
        note = self._note()
        if note is not None:
            error = f"{error}; {note}" if error else note
        rid = self.response_id
        usage = None if self._usage is None else token_usage_row(self._usage)
        tools: list[dict[str, Any]] = []
        thoughts: list[dict[str, Any]] = []
        for index in sorted(self._blocks):
            block = self._blocks[index]
            if not block.closed:
                continue  # cut mid-block: its content is not whole
            if block.kind == "tool":
                tools.append({"response_id": rid, **self._tool_row(block)})
            elif block.kind == "redacted":  # counted, not stored (DESIGN §3.3)
                thoughts.append({"response_id": rid, "source": block.type, "content": None})
            elif block.dropped:
                thoughts.append({"response_id": rid, "source": "thinking", "content": None})
            elif (text := block.text.decode("utf-8", "replace")).strip():
                thoughts.append({"response_id": rid, "source": "thinking", "content": text})
        return ResponseResult(
            response_id=rid,
            response_model=self.response_model,
            status=status,
            error=error,
            token_usage={"response_id": rid, **usage} if usage is not None else None,
            tool_usages=tools,
            thoughts=thoughts,
            malformed_events=self.malformed_events,
            terminal_seen=status is not None,
            error_code=error_code,
        )

    # ------------------------------------------------------------------ internals

    def _dispatch(self, event_type: str, event: dict[str, Any]) -> None:
        if event_type == CONTENT_BLOCK_DELTA:
            self._delta(event)
        elif event_type == CONTENT_BLOCK_START:
            self._start(event.get("index"), event.get("content_block"))
        elif event_type == CONTENT_BLOCK_STOP:
            index = event.get("index")
            if not _is_index(index):
                self.malformed_events += 1
            elif (block := self._blocks.get(index)) is not None:
                block.closed = True
        elif event_type == MESSAGE_START:
            message = event.get("message")
            if not isinstance(message, dict) or self._started:
                self.malformed_events += 1  # one message per stream
                return
            self._started = True
            self._note_message(message)
        elif event_type == MESSAGE_DELTA:
            delta, usage = event.get("delta"), event.get("usage")
            if not isinstance(delta, dict) and not isinstance(usage, dict):
                self.malformed_events += 1
                return
            if isinstance(delta, dict):
                reason = delta.get("stop_reason")
                if isinstance(reason, str) and 0 < len(reason) <= _MAX_REASON_CHARS:
                    self._stop_reason = reason
            self._merge_usage(usage)
        elif event_type == MESSAGE_STOP:
            if not self._stopped:
                self._stopped = True
                self._final_reason = self._stop_reason
        elif event_type == ERROR_EVENT and not self._stopped:  # the first end wins
            self._error = _error_fields(event)
        # ping and event types of the future: nothing to keep

    def _delta(self, event: dict[str, Any]) -> None:
        index, delta = event.get("index"), event.get("delta")
        if not _is_index(index) or not isinstance(delta, dict):
            self.malformed_events += 1
            return
        kind = delta.get("type")
        if kind == "input_json_delta":
            piece, wanted = delta.get("partial_json"), "tool"
        elif kind == "thinking_delta":
            piece, wanted = delta.get("thinking"), "thinking"
        else:
            return  # text, signature and citation deltas are not kept
        if not isinstance(piece, str):
            self.malformed_events += 1
            return
        block = self._blocks.get(index)
        if block is not None and block.kind == wanted and not block.closed:
            self._append(block, piece)

    def _start(self, index: Any, content: Any) -> None:
        if not _is_index(index) or not isinstance(content, dict):
            self.malformed_events += 1
            return
        block_type = content.get("type")
        if not isinstance(block_type, str):
            self.malformed_events += 1
            return
        if block_type.endswith("tool_result"):
            self._note_result(content)
            return
        if block_type.endswith("tool_use"):  # tool_use, server_tool_use, mcp_tool_use
            kind = "tool"
        elif block_type == "thinking":
            kind = "thinking"
        elif block_type == "redacted_thinking":
            kind = "redacted"
        else:
            return  # text and anything else: nothing kept
        if index in self._blocks:
            self.malformed_events += 1  # a block index given twice
            return
        strings = []
        if kind == "tool":
            strings = [_nonempty(content.get(key)) for key in ("id", "name", "server_name")]
        cost = _BLOCK_OVERHEAD + sum(len(s.encode("utf-8", "replace")) for s in strings if s)
        if len(self._blocks) >= MAX_BLOCKS or self._kept + cost > MAX_EXCHANGE_BYTES:
            self.untracked_blocks += 1
            return
        block = _Block(kind, block_type)
        self._kept += cost
        self._blocks[index] = block
        if kind == "tool":
            block.call_id, block.name, block.server_name = strings
            start_input = content.get("input")
            if start_input is not None:
                size = json_cost(start_input, MAX_BLOCK_BYTES)
                if size is not None and self._fits(block, size):
                    block.start_input, block.start_cost = start_input, size
                    self._kept += size
                elif size is not None:
                    self._drop(block)
                # else nested deeper than orjson writes: no arguments
        elif kind == "thinking":
            initial = content.get("thinking")  # empty when streamed, whole when buffered
            if isinstance(initial, str) and initial:
                self._append(block, initial)
        else:
            block.closed = True  # redacted thinking is whole at its start

    def _fits(self, block: _Block, size: int) -> bool:
        held = len(block.text) + block.start_cost
        return held + size <= MAX_BLOCK_BYTES and self._kept + size <= MAX_EXCHANGE_BYTES

    def _append(self, block: _Block, piece: str) -> None:
        if block.dropped:
            return
        data = piece.encode("utf-8", "replace")
        if not self._fits(block, len(data)):
            self._drop(block)
            return
        block.text += data
        self._kept += len(data)

    def _drop(self, block: _Block) -> None:
        """Past a cap: the block's content goes whole (a JSON prefix is not its arguments)."""
        self._kept -= len(block.text) + block.start_cost
        block.text = bytearray()
        block.start_input, block.start_cost = None, 0
        block.dropped = True
        self.dropped_blocks += 1

    def _note_result(self, content: dict[str, Any]) -> None:
        call_id = content.get("tool_use_id")
        if not isinstance(call_id, str) or not call_id or call_id in self._invocation_errors:
            return
        error = _result_error(content)
        if error is None:
            return
        if len(error) > _MAX_ERROR_CHARS:
            error = error[:_MAX_ERROR_CHARS] + "…"
        data = error.encode("utf-8", "replace")
        cost = _BLOCK_OVERHEAD + len(call_id.encode("utf-8", "replace")) + len(data)
        if len(self._invocation_errors) >= MAX_BLOCKS or self._kept + cost > MAX_EXCHANGE_BYTES:
            self.untracked_blocks += 1
            return
        self._kept += cost
        self._invocation_errors[call_id] = data

    def _note_message(self, message: dict[str, Any]) -> None:
        rid = message.get("id")
        if self.response_id is None and isinstance(rid, str) and rid:
            self.response_id = rid
        model = message.get("model")
        if isinstance(model, str) and model:
            self.response_model = model
        self._merge_usage(message.get("usage"))

    def _merge_usage(self, usage: Any) -> None:
        """message_start's usage updated key by key by each message_delta's (cumulative)."""
        if not isinstance(usage, dict):
            return
        merged = {**self._usage, **usage} if self._usage else dict(usage)
        size = json_cost(merged, MAX_USAGE_BYTES)
        if len(merged) > 64 or size is None or size > MAX_USAGE_BYTES:
            # Bounded: a hostile stream could grow it by one large key per message_delta.
            merged = {
                key: merged[key] for key in _USAGE_COUNTED if _small_usage_value(merged.get(key))
            }
            self._usage_trimmed = True
        self._usage = merged

    def _feed_object(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.malformed_events += 1
            return
        error = obj.get("error")
        if obj.get("type") == "error" or (error is not None and "content" not in obj):
            # {"type": "error", "error": {...}}, as Anthropic answers with a 4xx/5xx.
            if self._upstream_error is None:
                self._upstream_error = _error_fields(obj)
            return
        self._note_message(obj)
        content = obj.get("content")
        if isinstance(content, list):
            offset = max(self._blocks, default=-1) + 1  # after any streamed blocks
            for position, block in enumerate(content):
                if isinstance(block, dict):
                    self._start(offset + position, block)
                    if (kept := self._blocks.get(offset + position)) is not None:
                        kept.closed = True
        reason = obj.get("stop_reason")
        if isinstance(reason, str) and 0 < len(reason) <= _MAX_REASON_CHARS:
            self._stop_reason = reason
        is_message = obj.get("type") == "message" or isinstance(reason, str)
        if is_message and not self._stopped:  # a buffered message is whole
            self._stopped = True
            self._final_reason = self._stop_reason

    def _status(self) -> tuple[str | None, str | None, str | None]:
        """Status, error text and error code (DESIGN §3.3)."""
        if self._upstream_error is not None:
            return ("upstream_error", *self._upstream_error)
        if self._error is not None:
            return ("error", *self._error)
        if not self._stopped:
            return None, None, None
        reason = self._final_reason
        if reason in _INCOMPLETE_REASONS:
            return "incomplete", reason, None
        if reason is None or reason in _COMPLETED_REASONS:
            return "completed", None, None
        return "completed", reason, None  # refusal, and reasons not known yet: kept

    def _note(self) -> str | None:
        """What the caps cost, for the record's error text."""
        parts = []
        if self.dropped_blocks:
            parts.append(
                f"{self.dropped_blocks} content block(s) over the size limit "
                f"({MAX_BLOCK_BYTES >> 20} MiB each, {MAX_EXCHANGE_BYTES >> 20} MiB per"
                " response) recorded without their content"
            )
        if self.untracked_blocks:
            parts.append(
                f"{self.untracked_blocks} content block(s) past the limit of {MAX_BLOCKS}"
                " not recorded"
            )
        if self._usage_trimmed:
            parts.append(f"raw usage over {MAX_USAGE_BYTES >> 10} KiB: only its counts kept")
        return "aibridge: " + "; ".join(parts) if parts else None

    def _tool_row(self, block: _Block) -> dict[str, Any]:
        args: Any = None
        if block.dropped:
            pass
        elif block.text and not block.text.isspace():
            args = _parse_input(block.text)
        elif block.start_input is not None:
            args = block.start_input
        call_id = block.call_id
        error = self._invocation_errors.get(call_id) if call_id else None
        return {
            "call_id": call_id,
            "tool": block.name or block.type,
            "type": block.type,
            "args": args,
            "injected": False,
            "server_url": block.server_name,
            "invocation_error": error.decode("utf-8", "replace") if error is not None else None,
        }


def _parse_input(raw: bytearray) -> Any:
    """The assembled input parsed, or its text when it is not JSON (or too deep to write)."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
    if json_cost(parsed, sys.maxsize) is None:
        return raw.decode("utf-8", "replace")
    return parsed


def _small_usage_value(value: Any) -> bool:
    """What a trimmed usage keeps: a number, a short word, or a few counts (cache_creation)."""
    if isinstance(value, dict):
        return len(value) <= 8 and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, int) and not isinstance(v, bool)
            for k, v in value.items()
        )
    if isinstance(value, str):
        return len(value) <= MAX_TIER_CHARS
    return isinstance(value, int | float)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonempty(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _result_error(content: dict[str, Any]) -> str | None:
    """The error a ``*_tool_result`` block reports, if any."""
    inner = content.get("content")
    if content.get("is_error") is True:
        if isinstance(inner, str):
            return inner or "is_error"
        texts = []
        if isinstance(inner, list):
            texts = [block["text"] for block in inner if _is_text_block(block) and block["text"]]
        return " ".join(texts) or "is_error"
    if isinstance(inner, dict):
        inner_type = inner.get("type")
        if isinstance(inner_type, str) and inner_type.endswith("_error"):
            return _nonempty(inner.get("error_code")) or inner_type
    return None


def _error_fields(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    """Message and type of an ``error`` event or an error body (``{"type": "error", ...}``)."""
    nested = obj.get("error")
    if isinstance(nested, str) and nested:
        return nested, None
    if isinstance(nested, dict):
        obj = nested
    error_type = obj.get("type")
    code = error_type if isinstance(error_type, str) and error_type not in ("", "error") else None
    if code is None:
        raw = obj.get("code")
        if isinstance(raw, str | int) and not isinstance(raw, bool):
            code = str(raw) or None
    message = obj.get("message")
    if not isinstance(message, str) or not message:
        message = code
    return message, code


def token_usage_row(usage: dict[str, Any]) -> dict[str, Any]:
    """The ``token_usages`` columns (without ids and time) from a merged Messages ``usage``.

    Anthropic's ``input_tokens`` leaves the cache out; ours is input + cache read + cache
    write (OpenTelemetry), and Anthropic's is the uncached part. Unknown stays None.
    """
    uncached = count(usage.get("input_tokens"))
    cache_read = count(usage.get("cache_read_input_tokens"))
    cache_write = count(usage.get("cache_creation_input_tokens"))
    output = count(usage.get("output_tokens"))
    input_tokens = None
    if uncached is not None:
        input_tokens = _bounded(uncached + (cache_read or 0) + (cache_write or 0))
    total = None
    if input_tokens is not None and output is not None:
        total = _bounded(input_tokens + output)
    tier = usage.get("service_tier")
    tier_ok = isinstance(tier, str) and 0 < len(tier) <= MAX_TIER_CHARS
    return {
        "input_tokens": input_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_write_input_tokens": cache_write,
        "uncached_input_tokens": uncached,
        "output_tokens": output,
        "reasoning_tokens": None,  # Anthropic counts thinking in output_tokens, unsplit
        "total_tokens": total,
        "usage": dict(usage) if json_cost(usage, sys.maxsize) is not None else None,
        "service_tier": tier if tier_ok else None,
    }


def _bounded(count: int) -> int | None:
    return count if count <= MAX_COUNT else None


# ---------------------------------------------------------------------------- errors

# Anthropic's error types by HTTP status (docs: "Errors"). Another 4xx is
# invalid_request_error, as Anthropic says it uses it for; another 5xx is api_error, which
# the SDKs take as a server error (and retry). 502 (provider unreachable) and 503 (the
# bridge refusing, e.g. unconfigured) are not Anthropic being overloaded, so not
# overloaded_error, which Claude Code treats as capacity trouble.
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str) -> bytes:
    """The bridge's own error in Anthropic's shape (DESIGN §7)."""
    error = {"type": error_type(status), "message": message}
    return orjson.dumps({"type": "error", "error": error})


def upstream_error_text(status: int, body_obj: Any) -> str:
    """The interception's error for an upstream 4xx/5xx: the status and Anthropic's message."""
    text = f"upstream answered HTTP {status}"
    error = body_obj.get("error") if isinstance(body_obj, dict) else None
    message = None
    if isinstance(error, dict):
        message = _nonempty(error.get("message")) or _nonempty(error.get("type"))
    elif isinstance(error, str):
        message = error or None
    return f"{text}: {message}" if message else text


def refusal(info: RequestInfo) -> tuple[int, str] | None:
    return None  # every valid Messages request can be bridged


API: Final = Api(
    name="messages",
    title="Messages API",
    path="/v1/messages",
    provider_types=frozenset({"anthropic"}),
    parse_request=parse_request,
    refusal=refusal,
    new_accumulator=MessagesAccumulator,
    wanted_events=WANTED_EVENTS,
    delta_events=DELTA_EVENTS,
    skippable_events=SKIPPABLE_EVENTS,
    error_body=error_body,
    passthrough=("/v1/messages/count_tokens", "/v1/models", "/v1/models/*"),
)
