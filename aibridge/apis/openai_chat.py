"""What the audit log records from one OpenAI Chat Completions exchange (DESIGN.md §3.4).

Pure functions over decoded JSON, like the other API modules: no mitmproxy, no I/O.

- the request: :func:`parse_request` validates a ``POST /v1/chat/completions`` body and reads
  the model, stream flag, prompt and correlating tool call id; :func:`amend_request` adds
  ``stream_options.include_usage`` to a streamed request that lacks it, as a byte-level edit
  (aibridge.apis.json_bytes), so the provider reports the tokens it used;
- the response: :class:`ChatAccumulator` is fed the stream's ``data:`` chunks one at a time
  (or a buffered ``chat.completion`` once) and keeps only what the records need: tool calls
  assembled from ``delta.tool_calls[]`` by ``index``, reasoning text that OpenAI-compatible
  hosts stream (``reasoning_content``, ``reasoning``), the finish reasons and the usage.
  Content deltas are dropped, most of them undecoded: the stream tee asks
  :meth:`ChatAccumulator.skips` about each chunk, which is true when it is, byte for byte,
  the last plain chunk decoded but for its text (and OpenAI's ``obfuscation`` padding),
  as exact as a decode (:func:`_plain_template`).

Choices made where DESIGN is silent (the fixtures' README, tests/fixtures/openai_chat/, lists
them with the scenario that shows each):

- Prompt: the last message after skipping trailing ``system``/``developer`` messages, if its
  role is ``user``; string content as is, else its ``text`` parts joined with ``\\n``. A last
  ``tool`` message gives no prompt and its ``tool_call_id`` is the correlating call id.
- A stream is over at ``data: [DONE]``, at an error chunk (``{"error": {...}}``, which some
  hosts send mid-stream, with or without a last choice: the SDKs raise on either), or, for
  hosts that send no ``[DONE]``, once every choice seen has a finish reason (then
  ``terminal_seen``, so a client that hangs up right after loses nothing). Named SSE events
  are read as chunks too, as the SDKs read them.
- Status from the finish reasons of every choice: any ``error`` (a host's) → error; any
  ``length`` → incomplete; else any
  ``content_filter`` → completed with the reason kept in ``error``; ``stop``, ``tool_calls``,
  ``function_call`` → completed; a reason not known yet → completed, the reason kept. A
  ``refusal`` the model streamed is kept in ``error`` too.
- Usage: the last ``usage`` object that is not null (the usage chunk, ``choices: []``, or a
  host that repeats a running count on every chunk). DeepSeek's ``prompt_cache_hit_tokens``
  stands for ``cached_tokens`` when that is missing.
- Tool calls of every choice are recorded (``n`` > 1), in choice then start order; a new
  ``id`` at an index already taken starts a new call (gateways that send every parallel call at
  index 0); a legacy
  ``function_call`` delta is one call of type ``function_call``; ``custom`` tools' ``input``
  is their arguments. Arguments are parsed as JSON, else kept as the raw string.

Memory per exchange is bounded: at most :data:`MAX_CALL_BYTES` of assembled arguments or
reasoning text per call or choice, :data:`MAX_EXCHANGE_BYTES` of everything kept,
:data:`MAX_CALLS` tool calls and :data:`MAX_CHOICES` choices tracked. Past a cap the content
goes whole (a prefix of JSON is not the call's arguments): the row stays with ``args`` (or a
thought's ``content``) null, and ``error`` says how many lost their content.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any, Final

import orjson

from aibridge.apis import json_bytes, openai_errors
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
    content_text,
    count,
    json_cost,
    load_body,
)

if TYPE_CHECKING:
    from aibridge.config import Config

MAX_CALL_BYTES: Final = 4 << 20
MAX_EXCHANGE_BYTES: Final = 16 << 20
MAX_CALLS: Final = 4096
MAX_CHOICES: Final = 128
MAX_USAGE_BYTES: Final = 64 << 10
# Charged per tracked call or choice besides its strings: the Python objects that hold it.
_ENTRY_OVERHEAD: Final = 512
# A finish reason longer than this is not one (the API's are a word).
_MAX_REASON_CHARS: Final = 64
# A refusal is kept in the error text up to this many characters.
_MAX_REFUSAL_CHARS: Final = 1000
# An id or name longer than this is cut (ids are a few dozen characters).
_MAX_ID_CHARS: Final = 256

_COMPLETED_REASONS: Final = frozenset({"stop", "tool_calls", "function_call", "end_turn"})
_INCOMPLETE_REASONS: Final = frozenset({"length"})
# Reasoning text as OpenAI-compatible hosts stream it (DeepSeek, vLLM: reasoning_content;
# OpenRouter, Ollama, Groq: reasoning).
_REASONING_FIELDS: Final = ("reasoning_content", "reasoning")
# A delta with only these keys holds nothing the records keep (text, the first chunk's role).
_PLAIN_DELTA_KEYS: Final = frozenset({"content", "role"})

# The tee's byte test (ChatAccumulator.skips): where a chunk may differ from the plain one
# decoded last, the string value of a key no record reads (the text; OpenAI's random
# padding, "obfuscation"), spelled as any host spells it.
_HOLE_KEYS: Final = ('"content"', '"obfuscation"')
_AFTER_HOLE_KEY: Final = re.compile(r'[ \t]*:[ \t]*"')
# A string's inside in a chunk orjson has read already: every escape in it is whole.
_READ_STRING_INSIDE: Final = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
# What a string's inside that needs no STRING_INSIDE match holds none of (the common case).
_NOT_PLAIN: Final = bytes(range(0x20)) + b'"\\'
# A template is kept only this long (its literal parts, in bytes) with at most this many holes.
_MAX_TEMPLATE_BYTES: Final = 4096
_MAX_HOLES: Final = 4
# At most this many templates are made per exchange (a normal stream makes one or two).
_MAX_TEMPLATES: Final = 32

# What interceptions.metadata's "stream_usage" says about a streamed request's usage.
USAGE_REQUESTED: Final = "requested by the client"
USAGE_ADDED: Final = "added by the bridge"
USAGE_NOT_REQUESTED: Final = "not requested"
USAGE_NOT_ADDED_ENCODED: Final = "not requested (the compressed request body was left as sent)"

# The field the bridge inserts: compact, as OpenAI's own SDKs write it.
_USAGE_MEMBER: Final = b'"stream_options":{"include_usage":true}'

# --------------------------------------------------------------------------- request

# The top-level fields the bridge reads or edits, or that decide what the provider does and
# bills. Given twice, the provider may read the other copy than the bridge did: refused.
CHECKED_FIELDS: Final = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "messages",
        "metadata",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "n",
        "service_tier",
        "reasoning_effort",
        "max_tokens",
        "max_completion_tokens",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "store",
    }
)


def parse_request(body: bytes) -> tuple[dict[str, Any], RequestInfo]:
    """Decode and check a ``POST /v1/chat/completions`` body; the caller forwards the bytes.

    As strict as the other APIs: only the fields read here are type-checked, a field absent or
    ``null`` is as if not sent, and a field of CHECKED_FIELDS given twice is refused.
    """
    obj = load_body(body, CHECKED_FIELDS)
    return obj, request_info(obj)


def request_info(obj: dict[str, Any]) -> RequestInfo:
    """parse_request's checks and reading, on a body decoded already."""
    model = checked(obj, "model", str, "a string")
    stream = bool(checked(obj, "stream", bool, "a boolean"))
    messages = checked(obj, "messages", list, "an array of messages")
    options = checked(obj, "stream_options", dict, "an object")
    if options is not None and not isinstance(options.get("include_usage"), bool | None):
        raise RequestError("'stream_options.include_usage' must be a boolean")
    metadata = checked(obj, "metadata", dict, "an object")
    info = RequestInfo(
        model=model,
        stream=stream,
        background=False,  # Chat Completions has no background mode
        prompt=prompt_from_messages(messages),
        correlating_tool_call_id=correlating_tool_call_id(messages),
        previous_response_id=None,  # nor server-side conversation state
        session_id=_session_id(metadata),
    )
    if stream:
        requested = options is not None and options.get("include_usage") is True
        info.metadata = {"stream_usage": USAGE_REQUESTED if requested else USAGE_NOT_REQUESTED}
    return info


def _last_message(messages: Any) -> dict[str, Any] | None:
    """The last message, skipping ``system``/``developer`` messages after it."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if not isinstance(message, dict):
            return None
        if message.get("role") in ("system", "developer"):
            continue
        return message
    return None


def prompt_from_messages(messages: Any) -> str | None:
    """The prompt of DESIGN §3.4: the last ``user`` message's string, or its text parts."""
    message = _last_message(messages)
    if message is None or message.get("role") != "user":
        return None
    return content_text(message.get("content"), "text")


def correlating_tool_call_id(messages: Any) -> str | None:
    """The ``tool_call_id`` of a last ``tool`` message (the result the model answers)."""
    message = _last_message(messages)
    if message is None or message.get("role") != "tool":
        return None
    call_id = message.get("tool_call_id")
    return call_id if isinstance(call_id, str) and call_id else None


def _session_id(metadata: Any) -> str | None:
    value = metadata.get("session_id") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= _MAX_ID_CHARS else None


def amend_request(body: bytes, info: RequestInfo, config: Config, encoded: bool) -> bytes | None:
    """The body to forward instead of `body`, or None to forward it as sent.

    A streamed request whose client did not ask for usage gets
    ``"stream_options":{"include_usage":true}``, unless ``chat_completions.request_usage`` is
    off. The edit is byte-level (json_bytes): every other byte of the body stays as sent. A
    compressed body (`encoded`) is left alone: re-compressing it would re-encode it all.
    """
    metadata = info.metadata
    if metadata is None or metadata.get("stream_usage") != USAGE_NOT_REQUESTED:
        return None
    if not config.chat_completions.request_usage:
        return None
    if encoded:
        metadata["stream_usage"] = USAGE_NOT_ADDED_ENCODED
        return None
    amended = with_usage_requested(body)
    if amended is not None:
        metadata["stream_usage"] = USAGE_ADDED
    return amended


def with_usage_requested(body: bytes) -> bytes | None:
    """`body` (a valid JSON object, its top-level keys once each) with
    ``stream_options.include_usage`` true: inserted as the first member when there is no
    ``stream_options``; inserted into it, or its ``false``/``null`` replaced, when there is.
    None when nothing needs to change."""
    if not json_bytes.may_hold_key(body, b"stream_options"):
        # The common case, decided without a walk over a body of maybe megabytes.
        return json_bytes.insert_first_member(body, _USAGE_MEMBER)
    spans = json_bytes.member_spans(body)
    options = spans.get("stream_options")
    if options is None:
        return json_bytes.insert_first_member(body, _USAGE_MEMBER)
    start, end = options
    value = body[start:end]
    if value == b"null":
        return body[:start] + b'{"include_usage":true}' + body[end:]
    inner = json_bytes.member_spans(body, start)
    usage = inner.get("include_usage")
    if usage is None:
        return json_bytes.insert_first_member(body, b'"include_usage":true', start)
    if body[usage[0] : usage[1]] == b"true":
        return None
    return body[: usage[0]] + b"true" + body[usage[1] :]


# -------------------------------------------------------------------------- response


class _Text:
    """Text assembled from pieces (a call's arguments, a choice's reasoning), as UTF-8; past
    its cap it is dropped whole (``dropped``), never kept as a prefix."""

    __slots__ = ("data", "dropped")

    def __init__(self) -> None:
        self.data = bytearray()
        self.dropped = False


class _Call:
    """One tool call assembled from its deltas."""

    __slots__ = ("arguments", "call_id", "name", "type")

    def __init__(self) -> None:
        self.call_id: str | None = None
        self.name: str | None = None
        self.type = "function"
        self.arguments = _Text()


class _Choice:
    """What one choice (``index``) of the response has given so far."""

    __slots__ = ("calls", "finish_reason", "order", "reasoning", "refusal")

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.calls: dict[Any, _Call] = {}  # by the delta's index ("function_call": legacy)
        self.order: list[_Call] = []  # every call, in the order they began
        self.reasoning = _Text()
        self.refusal: str | None = None


class ChatAccumulator(EventAccumulator):
    """Collects the records of one Chat Completions response from its chunks or its body.

    The interface of the other accumulators: feed_event, feed_response_object,
    feed_response_body, ended, result(). Also counted: ``dropped`` (content over a cap) and
    ``untracked`` (calls or choices past their count cap), both reported in ``error``.
    """

    __slots__ = (
        "_asked",
        "_calls",
        "_choices",
        "_done",
        "_error",
        "_kept",
        "_service_tier",
        "_template",
        "_templates_made",
        "_usage",
        "_usage_trimmed",
        "dropped",
        "response_id",
        "response_model",
        "untracked",
    )

    def __init__(self) -> None:
        super().__init__()
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.dropped = 0
        self.untracked = 0
        self._choices: dict[int, _Choice] = {}
        self._calls = 0  # tool calls tracked, in all choices
        self._kept = 0
        self._usage: dict[str, Any] | None = None
        self._usage_trimmed = False
        self._service_tier: str | None = None
        self._done = False
        self._error: tuple[str | None, str | None] | None = None
        # The last plain chunk decoded, UTF-8, cut around its holes: its first literal, the
        # ones between holes, its last (_plain_template); how many were made; whether the
        # chunk fed next was asked about already (skips said no).
        self._template: tuple[bytes, tuple[bytes, ...], bytes] | None = None
        self._templates_made = 0
        self._asked = False

    # Chat chunks carry no ``type``: every one is a chunk, read whole.
    def feed_event(self, event_name: str | None, data: str | bytes) -> None:
        """Take one ``data:`` payload; never raises. (The stream tee asks ``skips`` first;
        other callers get the same test here, on the text.)"""
        if not data or self._done or self._error is not None:
            return
        if self._asked:
            self._asked = False
        elif self._template is not None and type(data) is str:
            try:
                if self.skips(data.encode(), 0):
                    return
            except UnicodeEncodeError:  # a lone surrogate: orjson refuses it, so decode
                pass
            self._asked = False
        if data in ("[DONE]", b"[DONE]"):
            self._done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.malformed_events += 1
            return
        if not isinstance(chunk, dict):
            self.malformed_events += 1
            return
        try:
            plain = self._chunk(chunk)
        except Exception:
            # Last line of defence: an audit log must never break a client's stream.
            self.malformed_events += 1
            return
        if plain and type(data) is str and self._templates_made < _MAX_TEMPLATES:
            # A host whose chunks differ elsewhere too (an id per chunk) makes one per
            # chunk to no avail: after _MAX_TEMPLATES, its chunks are only decoded.
            self._templates_made += 1
            self._template = _plain_template(data)

    def skips(self, block: bytes, start: int) -> bool:
        """Whether the stream tee may drop the SSE event `block` (its data from `start`)
        undecoded: it is the last plain chunk decoded but for the strings in its holes, each
        the inside of a string orjson reads (see _plain_template for why that is exact)."""
        template = self._template
        if template is None:
            return False
        first, middles, last = template
        self._asked = True  # if not skipped, the event is fed next: no need to ask again
        if not block.startswith(first, start):
            return False
        pos = start + len(first)
        for literal in middles:
            inside = STRING_INSIDE.match(block, pos)  # matches "" at least
            pos = pos if inside is None else inside.end()
            if not block.startswith(literal, pos):
                return False
            pos += len(literal)
        end = len(block) - len(last)
        if end < pos or not block.endswith(last):
            return False
        # The text of a delta is mostly plain: then one translate says so, else the pattern.
        plain = len(block[pos:end].translate(None, _NOT_PLAIN)) == end - pos
        if not plain and STRING_INSIDE.fullmatch(block, pos, end) is None:
            return False
        self._asked = False
        return True

    @property
    def ended(self) -> bool:
        """``[DONE]`` or an error chunk arrived: the response is over by the protocol."""
        return self._done or self._error is not None

    def _finished(self) -> bool:
        """Every choice seen has its finish reason (hosts that send no ``[DONE]``)."""
        return bool(self._choices) and all(
            choice.finish_reason is not None for choice in self._choices.values()
        )

    def result(self) -> ResponseResult:
        status, error, error_code = self._status()
        note = self._note()
        if note is not None:
            error = f"{error}; {note}" if error else note
        rid = self.response_id
        usage = None if self._usage is None else token_usage_row(self._usage, self._service_tier)
        tools: list[dict[str, Any]] = []
        thoughts: list[dict[str, Any]] = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            if choice.reasoning.dropped:
                thoughts.append({"response_id": rid, "source": "reasoning", "content": None})
            elif (text := choice.reasoning.data.decode("utf-8", "replace")).strip():
                thoughts.append({"response_id": rid, "source": "reasoning", "content": text})
            # A choice cut off before its finish reason: its calls may be partial.
            cut = choice.finish_reason is None and not self._done
            for call in choice.order:
                tools.append({"response_id": rid, **_tool_row(call, cut)})
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

    def _chunk(self, chunk: dict[str, Any]) -> bool:
        """Take a chunk; return whether taking it again now would change nothing (it is
        plain): no error, no usage, one choice, tracked, with no finish reason and a delta
        of text alone or none. Its id and model were kept only if none was known, so they
        are known now or it has none; its service tier is the one kept or none is (a tier
        that changes later clears the template); nothing else in it is read."""
        if chunk.get("error") is not None:
            # Also with choices: OpenRouter's mid-stream error carries a last choice
            # (finish_reason "error"), and the SDKs raise on any chunk with an error.
            self._error = _error_fields(chunk)
            return False
        plain = self._note_response(chunk)
        choices = chunk.get("choices")
        if choices is None:
            return False
        if not isinstance(choices, list):
            self.malformed_events += 1
            return False
        for entry in choices:
            if not isinstance(entry, dict):
                self.malformed_events += 1
                plain = False
                continue
            index = entry.get("index", 0)
            choice = self._choices.get(index) if _is_index(index) else None
            if choice is None:
                if not _is_index(index):
                    self.malformed_events += 1
                    plain = False
                    continue
                choice = self._choice(index)
                if choice is None:  # past MAX_CHOICES: counted again each time
                    plain = False
                    continue
            delta = entry.get("delta")
            if isinstance(delta, dict):
                # Most chunks carry text alone: nothing in them is kept.
                if not delta.keys() <= _PLAIN_DELTA_KEYS:
                    self._take_message(choice, delta, streamed=True)
                    plain = False
            elif delta is not None:
                self.malformed_events += 1
                plain = False
            reason = entry.get("finish_reason")
            if reason is not None:
                self._take_finish(choice, reason)
                plain = False
        return plain and len(choices) == 1

    def _note_response(self, obj: dict[str, Any]) -> bool:
        """Take the id, model, tier and usage; return whether there was no usage."""
        if self.response_id is None:
            rid = obj.get("id")
            if isinstance(rid, str) and rid:
                self.response_id = rid
        if self.response_model is None:
            model = obj.get("model")
            if isinstance(model, str) and model:
                self.response_model = model
        tier = obj.get("service_tier")
        fresh_tier = tier is not None and tier != self._service_tier
        if fresh_tier and isinstance(tier, str) and 0 < len(tier) <= MAX_TIER_CHARS:
            self._service_tier = tier
            self._template = None  # a chunk that spells the old tier would set it again
        usage = obj.get("usage")
        if usage is None:
            return True
        if isinstance(usage, dict):
            self._set_usage(usage)
        else:
            self.malformed_events += 1
        return False

    def _set_usage(self, usage: dict[str, Any]) -> None:
        size = json_cost(usage, MAX_USAGE_BYTES)
        if size is None or size > MAX_USAGE_BYTES:
            # Bounded: only the counts the columns come from are kept.
            usage = {key: usage[key] for key in _USAGE_COUNTED if _small(usage.get(key))}
            self._usage_trimmed = True
        self._usage = usage

    def _choice(self, index: int) -> _Choice | None:
        choice = self._choices.get(index)
        if choice is not None:
            return choice
        if len(self._choices) >= MAX_CHOICES or self._kept + _ENTRY_OVERHEAD > MAX_EXCHANGE_BYTES:
            self.untracked += 1
            return None
        self._kept += _ENTRY_OVERHEAD
        choice = self._choices[index] = _Choice()
        return choice

    def _take_finish(self, choice: _Choice, reason: Any) -> None:
        is_reason = isinstance(reason, str) and 0 < len(reason) <= _MAX_REASON_CHARS
        if is_reason and choice.finish_reason is None:  # the first one decides
            choice.finish_reason = reason

    def _take_message(self, choice: _Choice, message: dict[str, Any], *, streamed: bool) -> None:
        """A stream's ``delta`` or a buffered ``message``: reasoning, refusal, tool calls."""
        for name in _REASONING_FIELDS:
            piece = message.get(name)
            if isinstance(piece, str) and piece:
                self._append(choice.reasoning, piece)
                break  # a host sends one of them; both would be the same text
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            kept = choice.refusal or ""
            if len(kept) < _MAX_REFUSAL_CHARS:
                choice.refusal = (kept + refusal)[:_MAX_REFUSAL_CHARS]
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for position, entry in enumerate(calls):
                if not isinstance(entry, dict):
                    self.malformed_events += 1
                    continue
                index = entry.get("index") if streamed else position
                if not _is_index(index):
                    # Some hosts send whole calls without an index: each is its own call.
                    index = ("whole", len(choice.order))
                self._take_call(choice, index, entry)
        elif calls is not None:
            self.malformed_events += 1
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            self._take_call(choice, "function_call", {"type": "function_call", "function": legacy})

    def _take_call(self, choice: _Choice, index: Any, entry: dict[str, Any]) -> None:
        call = choice.calls.get(index)
        call_id = entry.get("id")
        call_id = call_id[:_MAX_ID_CHARS] if isinstance(call_id, str) and call_id else None
        if call is not None and call_id is not None and call.call_id not in (None, call_id):
            # Another id at an index already taken: a new call (gateways that send every
            # parallel call at index 0), never arguments glued to the previous one's.
            call = None
        if call is None:
            cost = _ENTRY_OVERHEAD
            if self._calls >= MAX_CALLS or self._kept + cost > MAX_EXCHANGE_BYTES:
                self.untracked += 1
                return
            self._kept += cost
            self._calls += 1
            call = choice.calls[index] = _Call()
            choice.order.append(call)
        if call_id is not None and call.call_id is None:
            call.call_id = call_id
        kind = entry.get("type")
        if isinstance(kind, str) and 0 < len(kind) <= _MAX_REASON_CHARS:
            call.type = kind
        body = entry.get("function")
        if not isinstance(body, dict):
            body = entry.get("custom")
        if not isinstance(body, dict):
            return
        name = body.get("name")
        if isinstance(name, str) and name and call.name is None:
            call.name = name[:_MAX_ID_CHARS]
        piece = body.get("arguments")
        if piece is None:
            piece = body.get("input")  # custom tools
        if isinstance(piece, str):
            self._append(call.arguments, piece)
        elif piece is not None and not call.arguments.dropped:
            # A host that sends structured arguments: kept as their JSON.
            try:
                self._append(call.arguments, orjson.dumps(piece).decode())
            except orjson.JSONEncodeError:
                self.malformed_events += 1

    def _append(self, text: _Text, piece: str) -> None:
        """Add a piece within the caps of MAX_CALL_BYTES per text, MAX_EXCHANGE_BYTES in all."""
        if text.dropped or not piece:
            return
        data = piece.encode("utf-8", "replace")
        if (
            len(text.data) + len(data) > MAX_CALL_BYTES
            or self._kept + len(data) > MAX_EXCHANGE_BYTES
        ):
            self._kept -= len(text.data)
            text.data = bytearray()
            text.dropped = True
            self.dropped += 1
            return
        text.data += data
        self._kept += len(data)

    def _feed_object(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.malformed_events += 1
            return
        if obj.get("error") is not None:
            if self._error is None:
                self._error = _error_fields(obj)
            return
        self._note_response(obj)
        choices = obj.get("choices")
        if not isinstance(choices, list):
            self.malformed_events += 1
            return
        for position, entry in enumerate(choices):
            if not isinstance(entry, dict):
                self.malformed_events += 1
                continue
            index = entry.get("index", position)
            choice = self._choice(index if _is_index(index) else position)
            if choice is None:
                continue
            message = entry.get("message")
            if isinstance(message, dict):
                self._take_message(choice, message, streamed=False)
            self._take_finish(choice, entry.get("finish_reason"))
        self._done = True  # a buffered completion is whole

    def _status(self) -> tuple[str | None, str | None, str | None]:
        """Status, error text and error code (DESIGN §3.4)."""
        if self._error is not None:
            return ("error", *self._error)
        if not (self._done or self._finished()):
            return None, None, None
        reasons = [self._choices[i].finish_reason for i in sorted(self._choices)]
        refusals = [c.refusal for c in self._choices.values() if c.refusal]
        refusal = f"refusal: {refusals[0]}" if refusals else None
        if "error" in reasons:  # a host's own end for a failed generation
            return "error", "the provider ended the response with finish_reason error", None
        if any(reason in _INCOMPLETE_REASONS for reason in reasons):
            return "incomplete", next(r for r in reasons if r in _INCOMPLETE_REASONS), None
        unusual = [r for r in reasons if r is not None and r not in _COMPLETED_REASONS]
        if unusual:
            text = unusual[0] if refusal is None else f"{unusual[0]}; {refusal}"
            return "completed", text, None  # content_filter, and reasons not known yet: kept
        return "completed", refusal, None

    def _note(self) -> str | None:
        """What the caps cost, for the record's error text."""
        parts = []
        if self.dropped:
            parts.append(
                f"{self.dropped} tool call(s) or reasoning text(s) over the size limit "
                f"({MAX_CALL_BYTES >> 20} MiB each, {MAX_EXCHANGE_BYTES >> 20} MiB per"
                " response) recorded without their content"
            )
        if self.untracked:
            parts.append(
                f"{self.untracked} tool call(s) or choice(s) past the limits of {MAX_CALLS}"
                f" calls and {MAX_CHOICES} choices not recorded"
            )
        if self._usage_trimmed:
            parts.append(f"raw usage over {MAX_USAGE_BYTES >> 10} KiB: only its counts kept")
        return "aibridge: " + "; ".join(parts) if parts else None


_USAGE_COUNTED: Final = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
)


def _small(value: Any) -> bool:
    """What a trimmed usage keeps: a number, or a few counts (the details objects)."""
    if isinstance(value, dict):
        return len(value) <= 16 and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, int) and not isinstance(v, bool)
            for k, v in value.items()
        )
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _plain_template(data: str) -> tuple[bytes, tuple[bytes, ...], bytes] | None:
    """`data` (a chunk orjson read and ChatAccumulator._chunk found plain) cut around its
    holes, the insides of its ``content`` and ``obfuscation`` string values, as UTF-8.
    None without a hole, or when the literal parts are over _MAX_TEMPLATE_BYTES or the
    holes over _MAX_HOLES.

    Why a chunk that is this one with other strings in the holes may be dropped undecoded:
    in valid JSON, ``"content"`` followed by ``:`` and ``"`` (JSON whitespace around the
    colon) is a key followed by the opening quote of its string value: the quote after the
    name's last letter is not escaped, so it ends a string; a string that a colon follows
    is a key, and a quote after the colon opens its value. A chunk of the same literals
    around other strings' insides, each one orjson reads (STRING_INSIDE: none ends in a
    lone backslash or holds an unescaped quote), is therefore lexed as the same tokens but
    for those strings' values, and decodes to the same object but for them. No value of
    such a key is read from a plain chunk (not the text; the error, usage and finish
    reason it could hide in are null), so taking that chunk would change nothing either.

    The test is on the bytes before they are decoded: the literals are this chunk's text
    encoded (it was decoded with replacement, which never touches an ASCII byte), so bytes
    that pass decode to a text that would pass, with every hole still a string's inside.
    """
    holes: list[int] = []  # where each hole's string begins, after its opening quote
    for key in _HOLE_KEYS:  # str.find: most chunks have one "content" and no other hole
        search = 0
        while (at := data.find(key, search)) >= 0:
            search = at + len(key)
            after = _AFTER_HOLE_KEY.match(data, search)
            if after is not None:
                holes.append(after.end())
    if not holes or len(holes) > _MAX_HOLES:
        return None
    holes.sort()
    literals: list[bytes] = []
    start = 0
    for inside in holes:
        string = _READ_STRING_INSIDE.match(data, inside)  # matches "" at least
        end = inside if string is None else string.end()
        if inside < start or data[end : end + 1] != '"':
            return None  # not orjson's reading after all: never cut there
        literals.append(data[start:inside].encode())
        start = end  # the next literal opens with the closing quote
    literals.append(data[start:].encode())
    if sum(map(len, literals)) > _MAX_TEMPLATE_BYTES:
        return None
    return literals[0], tuple(literals[1:-1]), literals[-1]


def _tool_row(call: _Call, cut: bool) -> dict[str, Any]:
    """A call's row; the arguments of a call `cut` off by the end of the stream are kept only
    when they are whole JSON (a prefix of them is not what the model called the tool with)."""
    args: Any = None
    if not call.arguments.dropped and call.arguments.data:
        args = _parse_arguments(call.arguments.data)
        if cut and isinstance(args, str):
            args = None
    return {
        "call_id": call.call_id,
        "tool": call.name or call.type,
        "type": call.type,
        "args": args,
        "injected": False,
        "server_url": None,
        "invocation_error": None,
    }


def _parse_arguments(raw: bytearray) -> Any:
    """The assembled arguments parsed, or their text when not JSON (or too deep to write)."""
    if raw.isspace():
        return raw.decode("utf-8", "replace")
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
    if json_cost(parsed, sys.maxsize) is None:
        return raw.decode("utf-8", "replace")
    return parsed


def _error_fields(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    """Message and code of an error chunk or body: ``{"error": {"message", "type", "code"}}``
    (or a bare string)."""
    nested = obj.get("error")
    if isinstance(nested, str):
        return (nested or None), None
    if isinstance(nested, dict):
        obj = nested
    code = obj.get("code")
    if not (isinstance(code, str | int) and not isinstance(code, bool)) or code == "":
        code = obj.get("type")
    code_text = str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None
    code_text = code_text or None
    message = obj.get("message")
    if not isinstance(message, str) or not message:
        message = code_text
    return message, code_text


def token_usage_row(usage: dict[str, Any], service_tier: str | None = None) -> dict[str, Any]:
    """The ``token_usages`` columns (without ids and time) from a Chat Completions ``usage``.

    OpenAI's ``prompt_tokens`` includes the cached tokens and ``completion_tokens`` the
    reasoning ones: OpenTelemetry's semantics already. Unknown stays None.
    """
    prompt_details = usage.get("prompt_tokens_details")
    if not isinstance(prompt_details, dict):
        prompt_details = {}
    completion_details = usage.get("completion_tokens_details")
    if not isinstance(completion_details, dict):
        completion_details = {}
    input_tokens = count(usage.get("prompt_tokens"))
    cache_read = count(prompt_details.get("cached_tokens"))
    if cache_read is None:
        cache_read = count(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
    cache_write = count(prompt_details.get("cache_write_tokens"))  # OpenRouter
    uncached = None
    if input_tokens is not None:
        uncached = max(0, input_tokens - (cache_read or 0) - (cache_write or 0))
    output = count(usage.get("completion_tokens"))
    total = count(usage.get("total_tokens"))
    if total is None and input_tokens is not None and output is not None:
        total = input_tokens + output if input_tokens + output <= MAX_COUNT else None
    return {
        "input_tokens": input_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_write_input_tokens": cache_write,
        "uncached_input_tokens": uncached,
        "output_tokens": output,
        "reasoning_tokens": count(completion_details.get("reasoning_tokens")),
        "total_tokens": total,
        "usage": dict(usage) if json_cost(usage, sys.maxsize) is not None else None,
        "service_tier": service_tier,
    }


def refusal(info: RequestInfo) -> tuple[int, str] | None:
    return None  # every valid Chat Completions request can be bridged


API: Final = Api(
    name="chat_completions",
    title="Chat Completions",
    path="/v1/chat/completions",
    provider_types=frozenset({"openai", "openai_compatible"}),
    parse_request=parse_request,
    refusal=refusal,
    new_accumulator=ChatAccumulator,
    # Chunks come without event names; a host that names them anyway is read all the same
    # (the SDKs take them as chunks), so no name is ever skipped.
    wanted_events=None,
    delta_events=frozenset(),
    error_body=openai_errors.error_body,
    passthrough=("/v1/models", "/v1/models/*", "/v1/chat/completions/*"),
    amend_request=amend_request,
)
