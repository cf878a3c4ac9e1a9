"""What the audit log records from one OpenAI Responses API exchange (DESIGN.md §3).

Pure functions over decoded JSON: no mitmproxy, no I/O. Two halves:

- the request: :func:`parse_request` validates the body the client sent and reads the
  facts the interception needs (model, stream flag, user prompt, correlating tool call
  id, previous response id, session id);
- the response: :class:`ResponseAccumulator` is fed the stream's events one at a time
  (or a buffered body once) and keeps only what the records need, so its memory does
  not grow with the length of the stream; :meth:`ResponseAccumulator.result` gives the
  rows for ``token_usages``, ``tool_usages`` and ``model_thoughts``.

Everything upstream sends is untrusted: any field may be missing or of the wrong type,
and nothing here raises on it. Every value placed in a row is a plain JSON value that
``orjson.dumps`` accepts (JSON nested deeper than orjson can write is kept as its raw
text or dropped).

Choices the design leaves open, made here:

- Token counts the provider did not report, or reported as something other than a
  non-negative integer (strings, booleans, negatives, fractions, numbers beyond SQLite's
  64-bit range), are ``None``, not 0: unknown is not zero, and SQL ``SUM`` skips NULL.
  ``uncached_input_tokens`` is derived when ``input_tokens`` is known, counting an
  unreported cache read or write as 0, never below 0.
- The body's session id is ``client_metadata.session_id``, then ``metadata.session_id``,
  then the ``session_id`` inside Codex's ``client_metadata["x-codex-turn-metadata"]``
  JSON string. ``prompt_cache_key`` is not used: it is a cache-routing key that clients
  may share across conversations (per user, per app), so it would merge sessions.
- ``status`` is ``None`` until the upstream ends the exchange by the protocol: a
  terminal event, an ``error`` event (OpenAI sends nothing useful after one), or a
  buffered body with a terminal status or an API error. ``terminal_seen`` is true
  exactly then. The first terminal event wins; later ones are ignored.
- A terminal response whose ``output`` is missing or empty (some backends send
  ``response.completed`` with ``output: []`` after streaming the items) yields the tool
  usages and thoughts of the ``response.output_item.done`` events instead.

Speed: a response object echoes the request's ``instructions``, ``tools`` and more (for a
Codex turn, some 20 KB, in the buffered body and in each of ``response.created``,
``response.in_progress`` and the terminal event). :func:`decode_response_object` and
:func:`decode_event` build only the fields read here (msgspec passes over the rest, still
checking it is JSON); anything msgspec will not read that way is decoded by orjson as
before, so a document is never read otherwise than orjson would, only more leniently in
the parts no record holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgspec
import orjson

from aibridge.apis import openai_errors
from aibridge.apis.common import (
    MAX_TIER_CHARS,
    Api,
    EventAccumulator,
    RequestError,
    RequestInfo,
    ResponseResult,
    checked,
    content_text,
    count,
    load_body,
)

BACKGROUND_NOT_SUPPORTED: Final = "background requests are currently not supported by AI Bridge"

COMPLETED: Final = "response.completed"
INCOMPLETE: Final = "response.incomplete"
FAILED: Final = "response.failed"
TERMINAL_EVENTS: Final = frozenset({COMPLETED, INCOMPLETE, FAILED})
ITEM_DONE: Final = "response.output_item.done"
ERROR_EVENT: Final = "error"
# Events whose response object carries the id and model before the terminal event.
_PROGRESS_EVENTS: Final = frozenset({"response.created", "response.in_progress", "response.queued"})

# The events the stream tee must decode; anything else named (deltas above all) can be
# skipped without parsing. Events without a name are always fed.
WANTED_EVENTS: Final[frozenset[str]] = TERMINAL_EVENTS | _PROGRESS_EVENTS | {ITEM_DONE, ERROR_EVENT}
# The streaming events that come by the hundred in one response (none of them wanted): the
# SSE parser passes over runs of them without a Python step per event.
DELTA_EVENTS: Final = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.mcp_call_arguments.delta",
        "response.code_interpreter_call_code.delta",
        "response.audio.delta",
        "response.audio.transcript.delta",
    }
)

_TERMINAL_STATUSES: Final = {"completed": COMPLETED, "incomplete": INCOMPLETE, "failed": FAILED}


# Per built-in tool call type, the fields that say what the tool was asked to do. Results
# (file contents, base64 images, logs) are left out: they are output, not arguments.
_BUILTIN_ARG_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "web_search_call": ("action",),
    "file_search_call": ("queries",),
    "computer_call": ("action", "actions"),
    "code_interpreter_call": ("code", "container_id"),
    "image_generation_call": (
        "action",
        "revised_prompt",
        "size",
        "quality",
        "background",
        "output_format",
    ),
    "local_shell_call": ("action",),
    "shell_call": ("action", "environment"),
    "apply_patch_call": ("operation",),
    "tool_search_call": ("arguments", "execution"),
}
# For a call type we do not know yet: every field except identity, state and results.
_GENERIC_SKIPPED_FIELDS: Final = frozenset(
    {
        "id",
        "type",
        "status",
        "call_id",
        "name",
        "result",
        "results",
        "output",
        "outputs",
        "error",
        "server_label",
        "created_by",
        "caller",
        "encrypted_content",
    }
)


# ----------------------------------------------------------------------- lean decoding


class _ResponseFields(msgspec.Struct):
    """What the records read of a response object (ResponseAccumulator, _summarize)."""

    id: Any = msgspec.UNSET
    model: Any = msgspec.UNSET
    status: Any = msgspec.UNSET
    output: Any = msgspec.UNSET
    error: Any = msgspec.UNSET
    incomplete_details: Any = msgspec.UNSET
    usage: Any = msgspec.UNSET
    service_tier: Any = msgspec.UNSET


class _EventFields(msgspec.Struct):
    """What the records read of a stream event (ResponseAccumulator._dispatch,
    _error_fields, the WebSocket's event_response_id)."""

    type: Any = msgspec.UNSET
    response: _ResponseFields | None = msgspec.UNSET
    response_id: Any = msgspec.UNSET
    item: Any = msgspec.UNSET
    message: Any = msgspec.UNSET
    code: Any = msgspec.UNSET
    error: Any = msgspec.UNSET


_RESPONSE_DECODER: Final = msgspec.json.Decoder(_ResponseFields)
_EVENT_DECODER: Final = msgspec.json.Decoder(_EventFields)


def _present(fields: msgspec.Struct) -> dict[str, Any]:
    """The fields that were in the document, as a dict like orjson's."""
    return {
        name: value
        for name in fields.__struct_fields__
        if (value := getattr(fields, name)) is not msgspec.UNSET
    }


def _lean(decoder: msgspec.json.Decoder, data: bytes | str) -> dict[str, Any] | None:
    """The fields `decoder` reads of `data`, or None where they might not be orjson's reading."""
    try:
        fields = decoder.decode(data)
    except (msgspec.MsgspecError, RecursionError):  # not an object, not JSON, too deep
        return None
    found = _present(fields)
    response = found.get("response")
    if isinstance(response, _ResponseFields):
        found["response"] = _present(response)
    try:
        # What orjson writes, it reads the same way (nesting of at most 255, integers of 64
        # bits; msgspec reads deeper values and larger integers, which orjson refuses or
        # reads as floats). Fields are few and small: the bulk is in what was skipped.
        orjson.dumps(found)
    except orjson.JSONEncodeError:
        return None
    return found


def decode_response_object(data: bytes | str) -> Any:
    """A response body decoded for the records: of an object, the fields they read, as
    orjson reads them; anything else as orjson reads it. Raises orjson's JSONDecodeError
    (a ValueError) where orjson refuses the text and msgspec's reading cannot be used.

    The one difference: the fields skipped are checked by msgspec, not orjson, which
    refuses more there (invalid UTF-8, nesting past 1024, numbers past a double's range).
    The records never hold those fields, so such a body still gives its usage."""
    found = _lean(_RESPONSE_DECODER, data)
    return orjson.loads(data) if found is None else found


def decode_event(data: bytes | str) -> Any:
    """A stream event decoded for the records, like decode_response_object (an event whose
    ``response`` is neither an object nor null is orjson's to read)."""
    found = _lean(_EVENT_DECODER, data)
    return orjson.loads(data) if found is None else found


# --------------------------------------------------------------------------- request


# The top-level fields the bridge reads (parse_request, session_id_from_body) or that decide
# what the provider does with the request. Given twice, the provider may read the other copy
# than the bridge did, so such a body is refused.
CHECKED_FIELDS: Final = frozenset(
    {
        "model",
        "stream",
        "background",
        "input",
        "previous_response_id",
        "stream_options",
        "metadata",
        "client_metadata",
        "instructions",
        "tools",
        "store",
    }
)


def parse_request(body: bytes) -> tuple[dict[str, Any], RequestInfo]:
    """Decode and check a ``POST /v1/responses`` body; the caller forwards the original bytes.

    Only the fields the bridge reads are type-checked; everything else is upstream's to
    judge. A field that is absent or ``null`` is as if not sent. The body is decoded strictly
    (strict_json): a field of CHECKED_FIELDS given twice is refused.
    """
    obj = load_body(body, CHECKED_FIELDS)
    return obj, request_info(obj)


def request_info(obj: dict[str, Any]) -> RequestInfo:
    """parse_request's checks and reading, on a body decoded already (a WebSocket turn)."""
    model = checked(obj, "model", str, "a string")
    stream = checked(obj, "stream", bool, "a boolean")
    background = checked(obj, "background", bool, "a boolean")
    previous_response_id = checked(obj, "previous_response_id", str, "a string")
    input_value = obj.get("input")
    if input_value is not None and not isinstance(input_value, str | list):
        raise RequestError("'input' must be a string or an array of input items")

    return RequestInfo(
        model=model,
        stream=bool(stream),
        background=bool(background),
        prompt=prompt_from_input(input_value),
        correlating_tool_call_id=correlating_tool_call_id(input_value),
        previous_response_id=previous_response_id,
        session_id=session_id_from_body(obj),
    )


def prompt_from_input(input_value: Any) -> str | None:
    """The user prompt of DESIGN §3: a string input whole, or the last item's user text.

    For a list, only the last item counts, and only when its role is ``user`` (anything
    else is an agent-loop turn): string content as is, or its ``input_text`` parts joined
    with newlines (images, files and anything else skipped; no text part gives None).
    """
    if isinstance(input_value, str):
        return input_value
    if not isinstance(input_value, list) or not input_value:
        return None
    last = input_value[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    return content_text(last.get("content"), "input_text")


def correlating_tool_call_id(input_value: Any) -> str | None:
    """The ``call_id`` answered by the last input item, when it is a tool call output."""
    if not isinstance(input_value, list) or not input_value:
        return None
    last = input_value[-1]
    if not isinstance(last, dict):
        return None
    if last.get("type") not in ("function_call_output", "custom_tool_call_output"):
        return None
    call_id = last.get("call_id")
    return call_id if isinstance(call_id, str) and call_id else None


def session_id_from_body(obj: dict[str, Any]) -> str | None:
    """The client's session id carried in the body (see the module docstring for the order)."""
    client_metadata = obj.get("client_metadata")
    for container in (client_metadata, obj.get("metadata")):
        if isinstance(container, dict):
            value = container.get("session_id")
            if isinstance(value, str) and value:
                return value
    if isinstance(client_metadata, dict):
        turn = client_metadata.get("x-codex-turn-metadata")
        if isinstance(turn, str) and turn:
            try:
                parsed = orjson.loads(turn)
            except orjson.JSONDecodeError:
                return None
            if isinstance(parsed, dict):
                value = parsed.get("session_id")
                if isinstance(value, str) and value:
                    return value
    return None


# -------------------------------------------------------------------------- response


@dataclass(slots=True)
class _Summary:
    """What one response object yields, extracted at once so the object can be dropped."""

    usage: dict[str, Any] | None
    tools: list[dict[str, Any]]
    thoughts: list[dict[str, Any]]
    has_output: bool
    error: str | None
    error_code: str | None


class ResponseAccumulator(EventAccumulator):
    """Collects the records of one upstream response from its stream events or its body.

    Kept: the first response id, the last model reported, the terminal event type and
    what its response object yields (usage, tool calls, thoughts, error), the rows of
    items completed by ``response.output_item.done`` (used when no terminal event, or
    one without output, arrives), the first ``error`` event's message and code, and a
    count of malformed events. Nothing else from the stream is retained.
    """

    __slots__ = (
        "_error_event",
        "_item_thoughts",
        "_item_tools",
        "_status",
        "_summary",
        "response_id",
        "response_model",
        "terminal",
    )

    decode_event = staticmethod(decode_event)
    decode_response = staticmethod(decode_response_object)

    def __init__(self) -> None:
        super().__init__()
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.terminal: str | None = None
        self._status: str | None = None
        self._summary: _Summary | None = None
        self._error_event: tuple[str | None, str | None] | None = None
        self._item_tools: list[dict[str, Any]] = []
        self._item_thoughts: list[dict[str, Any]] = []

    @property
    def ended(self) -> bool:
        """A terminal event or an ``error`` event arrived: nothing more belongs to this response."""
        return self.terminal is not None or self._error_event is not None

    def result(self) -> ResponseResult:
        summary = self._summary
        if summary is not None and summary.has_output:
            tools, thoughts = summary.tools, summary.thoughts
        else:
            tools, thoughts = self._item_tools, self._item_thoughts
        error = error_code = None
        if summary is not None:
            error, error_code = summary.error, summary.error_code
        if self._error_event is not None:
            error = error or self._error_event[0]
            error_code = error_code or self._error_event[1]
        status = self._status or ("error" if self._error_event is not None else None)
        rid = self.response_id
        usage = summary.usage if summary is not None else None
        return ResponseResult(
            response_id=rid,
            response_model=self.response_model,
            status=status,
            error=error,
            token_usage={"response_id": rid, **usage} if usage is not None else None,
            tool_usages=[{"response_id": rid, **row} for row in tools],
            thoughts=[{"response_id": rid, **row} for row in thoughts],
            malformed_events=self.malformed_events,
            terminal_seen=status is not None,
            error_code=error_code,
        )

    # ------------------------------------------------------------------ internals

    def _dispatch(self, event_type: str, event: dict[str, Any]) -> None:
        if event_type == ITEM_DONE:
            item = event.get("item")
            if isinstance(item, dict):
                row = tool_usage_row(item)
                if row is not None:
                    self._item_tools.append(row)
                self._item_thoughts.extend(thought_rows(item))
            else:
                self.malformed_events += 1
        elif event_type in TERMINAL_EVENTS:
            self._finish(event_type, event.get("response"))
        elif event_type in _PROGRESS_EVENTS:
            self._note_response(event.get("response"))
        elif event_type == ERROR_EVENT and self._error_event is None:
            self._error_event = _error_fields(event)

    def _feed_object(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self.malformed_events += 1
            return
        status = obj.get("status")
        if isinstance(status, str) and status in _TERMINAL_STATUSES:
            self._finish(_TERMINAL_STATUSES[status], obj)
            return
        error = obj.get("error")
        if isinstance(error, dict) and "output" not in obj:
            # An API error body (`{"error": {...}}`), as upstream sends with a 4xx/5xx.
            if self._error_event is None:
                self._error_event = _error_fields(error)
            return
        # A response without a terminal status (in progress, queued, cancelled, or a
        # provider that omits it): record what it holds, leave the status open.
        self._note_response(obj)
        self._summary = _summarize(obj, None)

    def _finish(self, event_type: str, response: Any) -> None:
        if self.terminal is not None:
            return
        self.terminal = event_type
        self._status = event_type.removeprefix("response.")
        if not isinstance(response, dict):
            self.malformed_events += 1
            return
        self._note_response(response)
        self._summary = _summarize(response, event_type)

    def _note_response(self, response: Any) -> None:
        if not isinstance(response, dict):
            return
        rid = response.get("id")
        if self.response_id is None and isinstance(rid, str) and rid:
            self.response_id = rid
        model = response.get("model")
        if isinstance(model, str) and model:
            self.response_model = model


def _summarize(response: dict[str, Any], event_type: str | None) -> _Summary:
    tools: list[dict[str, Any]] = []
    thoughts: list[dict[str, Any]] = []
    output = response.get("output")
    has_output = isinstance(output, list) and bool(output)
    if has_output:
        for item in output:
            if not isinstance(item, dict):
                continue
            row = tool_usage_row(item)
            if row is not None:
                tools.append(row)
            thoughts.extend(thought_rows(item))

    error = error_code = None
    response_error = response.get("error")
    if isinstance(response_error, dict):
        error, error_code = _error_fields(response_error)
    elif isinstance(response_error, str) and response_error:
        error = response_error
    if error is None and (event_type == INCOMPLETE or response.get("status") == "incomplete"):
        details = response.get("incomplete_details")
        if isinstance(details, dict) and isinstance(details.get("reason"), str):
            error = details["reason"]

    usage = token_usage_row(response.get("usage"))
    tier = response.get("service_tier")
    if usage is not None:
        # Billing depends on it (flex is half price, priority more), so the usage row keeps it.
        ok = isinstance(tier, str) and 0 < len(tier) <= MAX_TIER_CHARS
        usage["service_tier"] = tier if ok else None
    return _Summary(
        usage=usage,
        tools=tools,
        thoughts=thoughts,
        has_output=has_output,
        error=error,
        error_code=error_code,
    )


def _error_fields(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    """Message and code of an error event, an API error body or ``response.error``."""
    nested = obj.get("error")
    if isinstance(nested, dict) and not isinstance(obj.get("message"), str):
        obj = nested  # some backends wrap the details: {"type": "error", "error": {...}}
    message = obj.get("message")
    code = obj.get("code")
    code_text = str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None
    code_text = code_text or None
    if not isinstance(message, str) or not message:
        message = code_text
    return message, code_text


# ------------------------------------------------------------------- record rows


def token_usage_row(usage: Any) -> dict[str, Any] | None:
    """The ``token_usages`` columns (without ids and time) from a Responses ``usage`` object.

    OpenTelemetry semantics: input includes cached tokens, output includes reasoning.
    """
    if not isinstance(usage, dict):
        return None
    input_details = usage.get("input_tokens_details")
    if not isinstance(input_details, dict):
        input_details = {}
    output_details = usage.get("output_tokens_details")
    if not isinstance(output_details, dict):
        output_details = {}

    input_tokens = count(usage.get("input_tokens"))
    cache_read = count(input_details.get("cached_tokens"))
    cache_write = count(input_details.get("cache_write_tokens"))
    uncached = None
    if input_tokens is not None:
        uncached = max(0, input_tokens - (cache_read or 0) - (cache_write or 0))
    return {
        "input_tokens": input_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_write_input_tokens": cache_write,
        "uncached_input_tokens": uncached,
        "output_tokens": count(usage.get("output_tokens")),
        "reasoning_tokens": count(output_details.get("reasoning_tokens")),
        "total_tokens": count(usage.get("total_tokens")),
        "usage": _json_safe(usage),
    }


def tool_usage_row(item: dict[str, Any]) -> dict[str, Any] | None:
    """The ``tool_usages`` columns (without ids and time) for an output item, if it is a call.

    Every item type ending in ``_call`` is a call. Tool is the item's name, else its type;
    the call id is ``call_id``, else ``id``.
    """
    item_type = item.get("type")
    if not isinstance(item_type, str) or not item_type.endswith("_call"):
        return None
    name = item.get("name")
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        call_id = item.get("id")
    server_label = item.get("server_label")
    return {
        "call_id": call_id if isinstance(call_id, str) and call_id else None,
        "tool": name if isinstance(name, str) and name else item_type,
        "type": item_type,
        "args": _tool_args(item_type, item),
        "injected": False,
        "server_url": server_label if isinstance(server_label, str) and server_label else None,
        "invocation_error": _invocation_error(item.get("error")),
    }


def _tool_args(item_type: str, item: dict[str, Any]) -> Any:
    if item_type in ("function_call", "mcp_call"):
        return _parse_arguments(item.get("arguments"))
    if item_type == "custom_tool_call":
        return _json_safe(item.get("input"))
    fields = _BUILTIN_ARG_FIELDS.get(item_type)
    if fields is None:
        if "arguments" in item:
            return _parse_arguments(item["arguments"])
        if "input" in item:
            return _json_safe(item["input"])
        fields = tuple(key for key in item if key not in _GENERIC_SKIPPED_FIELDS)
    args = {key: item[key] for key in fields if item.get(key) is not None}
    return _json_safe(args) if args else None


def _parse_arguments(raw: Any) -> Any:
    """Parsed JSON of a call's ``arguments`` string, or the string itself when it is not JSON."""
    if not isinstance(raw, str):
        return _json_safe(raw)  # a provider that sends structured arguments
    text = raw.strip()
    if not text:
        return raw
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return raw
    return _json_safe(parsed, fallback=raw)


def _invocation_error(error: Any) -> str | None:
    if error is None or error is False or (isinstance(error, str | dict | list) and not error):
        return None
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str) and message:
            return message
    try:
        return orjson.dumps(error).decode()
    except orjson.JSONEncodeError:
        return "unrepresentable error"


def thought_rows(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``model_thoughts`` columns (without ids and time) an output item yields.

    Reasoning summaries (each non-empty ``summary[].text``) and the ``output_text`` of
    assistant messages marked ``"phase": "commentary"``.
    """
    item_type = item.get("type")
    if item_type == "reasoning":
        parts = item.get("summary")
        source = "reasoning_summary"
    elif (
        item_type == "message"
        and item.get("phase") == "commentary"
        and item.get("role", "assistant") == "assistant"
    ):
        parts = item.get("content")
        source = "commentary"
        if isinstance(parts, str):
            return [{"source": source, "content": parts}] if parts.strip() else []
    else:
        return []
    if not isinstance(parts, list):
        return []
    rows = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        if source == "commentary" and part.get("type") != "output_text":
            continue
        text = part.get("text")
        if isinstance(text, str) and text.strip():
            rows.append({"source": source, "content": text})
    return rows


def _json_safe(value: Any, fallback: Any = None) -> Any:
    """``value`` if orjson can write it back, else ``fallback``.

    orjson reads JSON nested up to 1024 levels but writes only about 255, so a deeply
    nested value from upstream would make the recorder fail later.
    """
    if value is None or isinstance(value, str | float | bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else fallback
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return fallback
    return value


def refusal(info: RequestInfo) -> tuple[int, str] | None:
    """Background mode: the response would be fetched later, past the audit log (DESIGN §3.2)."""
    return (501, BACKGROUND_NOT_SUPPORTED) if info.background else None


API: Final = Api(
    name="responses",
    title="Responses API",
    path="/v1/responses",
    provider_types=frozenset({"openai", "chatgpt"}),
    parse_request=parse_request,
    refusal=refusal,
    new_accumulator=ResponseAccumulator,
    wanted_events=WANTED_EVENTS,
    delta_events=DELTA_EVENTS,
    error_body=openai_errors.error_body,
    decode_response=decode_response_object,
    passthrough=(
        "/v1/models",
        "/v1/models/*",
        "/v1/responses/*",
        "/v1/conversations",
        "/v1/conversations/*",
    ),
    websocket=True,
)
