"""A local fake of OpenAI's Chat Completions API, served by devtools.fake_upstream.FakeUpstream.

One FakeUpstream speaks every API on one port: ``POST …/chat/completions`` (any prefix, so
``/v1/…``, ``/openai/v1/…`` and Azure's ``/openai/deployments/<name>/…`` all work; query
ignored) is answered by :func:`chat_reply`. ``GET /v1/models`` is fake_upstream's list.

The request body's ``model`` picks the scenario; any other model, real names such as
``gpt-5.5`` included, gets the default:

- default (and ``fake-text``): when a function tool named ``bash``, ``Bash`` or ``shell`` is
  declared (``tools[].function.name``) and the last message is a ``user`` one whose text
  (string content, or its last ``text`` part) starts with ``run `` ("run echo hi"), a call
  of that tool with arguments filled from its JSON schema: ``command`` the rest (an argv
  ``["bash", "-lc", <rest>]`` if the schema wants an array), ``description`` "Run the command"
  (unless the schema lacks it and says ``additionalProperties: false``), every other
  *required* property a placeholder by type; the call id is ``call_`` and a SHA-1 prefix of
  the command. When the last message has role ``tool``, a text "The tool returned: <content>"
  (string content, or its text parts joined; consecutive trailing tool messages joined with
  ``\\n``, at most 2000 characters). Else a short fixed text. (OpenCode declares its shell
  tool as ``bash``, without a description property.)
- ``fake-tool``: one call of the first declared function tool with placeholder arguments
  (its required properties), or ``get_weather`` ``{"city": "Paris"}``; ``fake-parallel``:
  two ``get_weather`` calls (Paris, Tokyo) at index 0 and 1 whose argument pieces are
  interleaved (0, 1, 0, 1, …), so only assembling by ``index`` gets them right. Both answer
  a trailing ``tool`` message as the default does. Finish reason ``tool_calls``.
- ``fake-reasoning``: a text; usage with ``reasoning_tokens`` (OpenAI sends no reasoning
  text). ``fake-reasoning-content``: ``{"reasoning_content": …}`` deltas (DeepSeek, vLLM)
  before the text; ``fake-reasoning-field``: ``{"reasoning": …}`` deltas (OpenRouter,
  Ollama). Buffered, the message carries that field whole.
- ``fake-cached``: usage with ``cached_tokens``.
- ``fake-length``, ``fake-content-filter``: a text that stops with finish reason ``length``,
  ``content_filter``.
- ``fake-error-chunk``: some text, then one chunk ``{"error": {"message", "type":
  "server_error", "code": "server_error"}}`` (OpenRouter and some hosts do this mid-stream)
  and the end of the stream, without ``[DONE]``; buffered: HTTP 500 in the error shape.
- ``fake-400``: HTTP 400 ``invalid_request_error`` (context length); ``fake-429``: HTTP 429
  with ``retry-after: 0``; ``fake-500``: HTTP 500 ``server_error``. Streamed or not.
- ``fake-truncated``: text deltas, then the stream ends (no finish reason, no usage chunk,
  no ``[DONE]``; ``Connection: close``); a buffered body is cut in the middle of its JSON.
- ``fake-slow``: 20 text deltas spaced by the ``x-fake-delay-ms`` header (default 50 ms),
  each flushed on its own (buffered: the body after the same total delay).
- ``fake-long-N``: N text deltas of ``"word "``, pre-serialized, in 64 KiB chunks unless
  ``x-fake-flush-each: 1`` (benchmarks); then the finish chunk, the usage chunk if asked for,
  ``[DONE]``.

``stream: true`` gives ``data: <compact JSON>\\n\\n`` frames (no ``event:`` lines) ending with
``data: [DONE]\\n\\n``. Each chunk is ``{"id": "chatcmpl-…", "object": "chat.completion.chunk",
"created", "model", "service_tier", "system_fingerprint": "fp_fake", "choices": [{"index": 0,
"delta", "logprobs": null, "finish_reason"}]}`` in OpenAI's order: a first delta
``{"role": "assistant", "content": "", "refusal": null}`` (for a turn of tool calls only,
``"content": null`` and the first call's head in it, as OpenAI sends it), reasoning and text
pieces, each tool call's head ``{"index", "id", "type": "function", "function": {"name",
"arguments": ""}}`` then ``{"index", "function": {"arguments": <piece>}}`` pieces, and a last
choice chunk with ``"delta": {}`` and the finish reason. THE USAGE CHUNK (``"choices": []``,
``"usage"``) comes before ``[DONE]`` only when the request has ``stream_options.include_usage:
true``, and every other chunk then carries ``"usage": null``, exactly as OpenAI does; without
it no chunk has a ``usage`` key (a bridge that adds the option is seen by this).
``stream_options`` on a request that does not stream gets 400, as OpenAI answers it.
Buffered: a ``chat.completion`` object (``message`` with ``content``, ``refusal``,
``annotations``, ``tool_calls`` if any; ``finish_reason``; ``usage`` always). One choice,
whatever ``n`` asks. ``service_tier`` is the request's ``flex``/``priority``/``scale``, else
``default``. The headers ``x-fake-chunk-size: N`` (re-cut every stream into N-byte chunks)
and ``x-fake-flush-each`` cut streams as in fake_upstream.

A request with neither ``Authorization: Bearer <key>`` nor ``api-key: <key>`` (Azure) gets 401
in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` (so a test through
the bridge proves it injected the key); a body that is not a JSON object gets 400.

Usage is deterministic from n, the n-th ``POST …/chat/completions`` this FakeUpstream received
(from 1, every such request counted, refused ones too), in every scenario that reports usage:

- ``prompt_tokens`` 1000n+1, ``prompt_tokens_details`` ``{"cached_tokens": 0, "audio_tokens":
  0}`` (``fake-cached``: cached_tokens 100n, counted inside prompt_tokens as OpenAI does);
- ``completion_tokens`` 7n+5, ``completion_tokens_details`` ``{"reasoning_tokens": 0,
  "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}``
  (``fake-reasoning``: reasoning_tokens 3n, counted inside completion_tokens);
- ``total_tokens`` 1007n+6.

So calls n = a..b add up to the sums of these; a stream without the usage chunk (not asked
for, ``fake-error-chunk``, ``fake-truncated``) reports nothing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

from devtools.fake_upstream import (
    FINAL_ANSWER,
    INCOMPLETE_ANSWER,
    RATE_LIMIT_ERROR,
    SLOW_ANSWER,
    TEXT_ANSWER,
    TOOL_ANSWER_PREFIX,
    Reply,
    _cut,
    _header_int,
    decode_body,
    error_body,
    placeholder_arguments,
    split_arguments,
    split_text,
    tool_output_text,
)

REASONING_TEXT: Final = (
    "The user wants a short answer. I will check the numbers once, then give the result."
)
CONTENT_FILTER_TEXT: Final = "Part of this answer was withheld by the"
ERROR_CHUNK_TEXT: Final = "This answer is cut short by an"
RUN_DESCRIPTION: Final = "Run the command"
PARALLEL_CITIES: Final = ("Paris", "Tokyo")
SYSTEM_FINGERPRINT: Final = "fp_fake"
SHELL_TOOLS: Final = ("bash", "Bash", "shell")
ERROR_CHUNK: Final = {
    "message": "The fake upstream failed while generating the completion.",
    "type": "server_error",
    "code": "server_error",
}
CONTEXT_LENGTH: Final = (
    "This model's maximum context length is 128000 tokens. However, your messages resulted"
    " in 200000 tokens. Please reduce the length of the messages."
)
SERVER_ERROR: Final = "The server had an error while processing your request. Sorry about that!"
NO_KEY: Final = (
    "You didn't provide an API key. You need to provide your API key in an Authorization"
    " header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
NOT_JSON: Final = "We could not parse the JSON body of your request."
DONE: Final = b"data: [DONE]\n\n"

MODELS: Final = (
    "fake-text",
    "fake-tool",
    "fake-parallel",
    "fake-reasoning",
    "fake-reasoning-content",
    "fake-reasoning-field",
    "fake-cached",
    "fake-length",
    "fake-content-filter",
    "fake-error-chunk",
    "fake-400",
    "fake-429",
    "fake-500",
    "fake-truncated",
    "fake-slow",
    "fake-long-1000",
)
_LONG_MODEL: Final = re.compile(r"fake-long-(\d{1,9})")
_LONG_DELTA: Final = "word "
_BATCH_BYTES: Final = 64 * 1024
_DEFAULT_DELAY_MS: Final = 50
_QUOTE_LIMIT: Final = 2000
_ARGUMENT_PIECE: Final = 6  # short pieces: even {"city":"Paris"} arrives in several
_DEFAULT_MODEL: Final = "fake-text"
_TIERS: Final = ("flex", "priority", "scale")
_CONTENT_DELTA: Final = b'"delta":{"content":'


# --- usage ----------------------------------------------------------------------------------


def usage(n: int, *, cached: bool = False, reasoning: bool = False) -> dict[str, Any]:
    """The usage of the n-th call (the module docstring's scheme)."""
    prompt = 1000 * n + 1
    completion = 7 * n + 5
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 100 * n if cached else 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 3 * n if reasoning else 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# --- what the model answers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the API sends it


@dataclass(frozen=True, slots=True)
class Turn:
    """The assistant message a scenario produces, the same streamed and buffered.

    ``ending``: ``stop`` (finish chunk, usage chunk if asked, [DONE]), ``error`` (an error
    chunk after the text) or ``cut`` (nothing after the text).
    """

    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str = "stop"
    reasoning: str | None = None
    reasoning_key: str = "reasoning_content"
    interleave: bool = False
    ending: str = "stop"
    cached: bool = False
    reasoning_tokens: bool = False


def tool_call(name: str, arguments: dict[str, Any], seed: str | None = None) -> ToolCall:
    """A call whose id is derived from ``seed`` (else its name and arguments): stable."""
    if seed is None:
        seed = orjson.dumps([name, arguments], option=orjson.OPT_SORT_KEYS).decode()
    call_id = "call_" + hashlib.sha1(seed.encode()).hexdigest()[:24]
    return ToolCall(call_id, name, orjson.dumps(arguments).decode())


def _messages(req: dict[str, Any]) -> list[dict[str, Any]]:
    messages = req.get("messages")
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def message_text(message: dict[str, Any]) -> str | None:
    """String content as is, else the last ``text`` part's text."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return texts[-1] if texts and isinstance(texts[-1], str) else None


def tool_results_text(req: dict[str, Any]) -> str | None:
    """The contents of the trailing ``tool`` messages joined, or None if the last is not one."""
    results: list[str] = []
    for message in reversed(_messages(req)):
        if message.get("role") != "tool":
            break
        results.append(tool_output_text(message.get("content", "")))
    return "\n".join(reversed(results)) if results else None


def run_command(req: dict[str, Any]) -> str | None:
    """What the last message asks to run, if it is a user's ``run <command>``."""
    messages = _messages(req)
    if not messages or messages[-1].get("role") != "user":
        return None
    text = message_text(messages[-1])
    if text is None or not text.startswith("run "):
        return None
    return text[4:].strip() or None


def declared_functions(req: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``function`` objects of ``type: function`` tools that have a name."""
    tools = req.get("tools")
    return [
        t["function"]
        for t in (tools if isinstance(tools, list) else [])
        if isinstance(t, dict)
        and t.get("type") == "function"
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]


def _properties(parameters: Any) -> dict[str, Any]:
    props = parameters.get("properties") if isinstance(parameters, dict) else None
    return props if isinstance(props, dict) else {}


def shell_arguments(parameters: Any, command: str) -> dict[str, Any]:
    """The required properties filled with placeholders, then command and description."""
    props = _properties(parameters)
    arguments = placeholder_arguments(parameters)
    kind = props.get("command", {}).get("type") if isinstance(props.get("command"), dict) else None
    wants_array = kind == "array" or (isinstance(kind, list) and "array" in kind)
    arguments["command"] = ["bash", "-lc", command] if wants_array else command
    # OpenCode's own schema has no description, yet it keeps one as Claude Code's Bash does.
    closed = isinstance(parameters, dict) and parameters.get("additionalProperties") is False
    if "description" in props or not closed:
        arguments["description"] = RUN_DESCRIPTION
    return arguments


def answer_to_result(result: str) -> Turn:
    return Turn(TOOL_ANSWER_PREFIX + result[:_QUOTE_LIMIT])


def default_turn(req: dict[str, Any]) -> Turn:
    command = run_command(req)
    if command is not None:
        for spec in declared_functions(req):
            if spec["name"] in SHELL_TOOLS:
                arguments = shell_arguments(spec.get("parameters"), command)
                call = tool_call(spec["name"], arguments, seed=command)
                return Turn(tool_calls=(call,), finish_reason="tool_calls")
    result = tool_results_text(req)
    if result is not None:
        return answer_to_result(result)
    return Turn(TEXT_ANSWER)


def tool_turn(req: dict[str, Any]) -> Turn:
    result = tool_results_text(req)
    if result is not None:
        return answer_to_result(result)
    functions = declared_functions(req)
    if functions:
        call = tool_call(
            functions[0]["name"], placeholder_arguments(functions[0].get("parameters"))
        )
    else:
        call = tool_call("get_weather", {"city": "Paris"})
    return Turn(tool_calls=(call,), finish_reason="tool_calls")


def parallel_turn(req: dict[str, Any]) -> Turn:
    result = tool_results_text(req)
    if result is not None:
        return answer_to_result(result)
    calls = tuple(tool_call("get_weather", {"city": city}) for city in PARALLEL_CITIES)
    return Turn(tool_calls=calls, finish_reason="tool_calls", interleave=True)


_TURNS: Final[dict[str, Callable[[dict[str, Any]], Turn]]] = {
    "fake-tool": tool_turn,
    "fake-parallel": parallel_turn,
    "fake-reasoning": lambda _: Turn(FINAL_ANSWER, reasoning_tokens=True),
    "fake-reasoning-content": lambda _: Turn(FINAL_ANSWER, reasoning=REASONING_TEXT),
    "fake-reasoning-field": lambda _: Turn(
        FINAL_ANSWER, reasoning=REASONING_TEXT, reasoning_key="reasoning"
    ),
    "fake-cached": lambda _: Turn(TEXT_ANSWER, cached=True),
    "fake-length": lambda _: Turn(INCOMPLETE_ANSWER, finish_reason="length"),
    "fake-content-filter": lambda _: Turn(CONTENT_FILTER_TEXT, finish_reason="content_filter"),
    "fake-error-chunk": lambda _: Turn(ERROR_CHUNK_TEXT, ending="error"),
    "fake-truncated": lambda _: Turn(TEXT_ANSWER, ending="cut"),
    "fake-slow": lambda _: Turn(SLOW_ANSWER),
}


def turn_usage(turn: Turn, n: int) -> dict[str, Any]:
    return usage(n, cached=turn.cached, reasoning=turn.reasoning_tokens)


# --- rendering ------------------------------------------------------------------------------


def frame(chunk: dict[str, Any]) -> bytes:
    """One SSE event as OpenAI sends it: a ``data:`` line of compact JSON, no event name."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Completion:
    """What every chunk (and the buffered object) of one completion has in common."""

    id: str
    created: int
    model: str
    service_tier: str

    def head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "service_tier": self.service_tier,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }


class ChunkWriter:
    """Serializes the chunks of one stream; ``usage: null`` on each when usage was asked for."""

    def __init__(self, completion: Completion, include_usage: bool) -> None:
        self.head = completion.head("chat.completion.chunk")
        self.include_usage = include_usage

    def choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            **self.head,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            chunk["usage"] = None
        return frame(chunk)

    def usage(self, value: dict[str, Any]) -> bytes:
        return frame({**self.head, "choices": [], "usage": value})


def _call_head(index: int, call: ToolCall) -> dict[str, Any]:
    function = {"name": call.name, "arguments": ""}
    return {"index": index, "id": call.id, "type": "function", "function": function}


def _argument_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    return [
        {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
        for piece in split_arguments(call.arguments, _ARGUMENT_PIECE)
    ]


def _tool_deltas(turn: Turn, merged_head: bool) -> Iterator[dict[str, Any]]:
    """Each call's head, then its argument pieces; interleaved: all heads, then the pieces
    round-robin. The first head is left out when the role delta carried it."""
    calls = list(enumerate(turn.tool_calls))
    heads = [{"tool_calls": [_call_head(i, c)]} for i, c in calls]
    pieces = [_argument_deltas(i, c) for i, c in calls]
    if merged_head:
        heads[0] = {}
    if turn.interleave:
        yield from (h for h in heads if h)
        for round_ in range(max(map(len, pieces), default=0)):
            yield from (p[round_] for p in pieces if round_ < len(p))
        return
    for head, own in zip(heads, pieces, strict=True):
        if head:
            yield head
        yield from own


def stream_frames(
    turn: Turn, completion: Completion, n: int, *, include_usage: bool
) -> Iterator[bytes]:
    """The event stream of ``turn`` for the n-th call."""
    chunks = ChunkWriter(completion, include_usage)
    calls_only = bool(turn.tool_calls) and turn.content is None and turn.reasoning is None
    if calls_only:  # OpenAI's first delta of a tool-call turn holds the first call's head
        first_call = _call_head(0, turn.tool_calls[0])
        role = {"role": "assistant", "content": None, "tool_calls": [first_call], "refusal": None}
    else:
        role = {"role": "assistant", "content": "", "refusal": None}
    yield chunks.choice(role)
    if turn.reasoning is not None:
        for piece in split_text(turn.reasoning):
            yield chunks.choice({turn.reasoning_key: piece})
    for piece in split_text(turn.content or ""):
        yield chunks.choice({"content": piece})
    for delta in _tool_deltas(turn, merged_head=calls_only):
        yield chunks.choice(delta)
    if turn.ending == "error":
        yield frame({"error": dict(ERROR_CHUNK)})
    if turn.ending != "stop":
        return
    yield chunks.choice({}, turn.finish_reason)
    if include_usage:
        yield chunks.usage(turn_usage(turn, n))
    yield DONE


def completion_object(turn: Turn, completion: Completion, n: int) -> dict[str, Any]:
    """The buffered ``chat.completion`` object of ``turn``."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": turn.content,
        "refusal": None,
        "annotations": [],
    }
    if turn.reasoning is not None:
        message[turn.reasoning_key] = turn.reasoning
    if turn.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in turn.tool_calls
        ]
    head = completion.head("chat.completion")
    fingerprint = head.pop("system_fingerprint")
    tier = head.pop("service_tier")
    return {
        **head,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": turn.finish_reason}
        ],
        "usage": turn_usage(turn, n),
        "service_tier": tier,
        "system_fingerprint": fingerprint,
    }


def long_frames(
    completion: Completion, n: int, count: int, *, include_usage: bool
) -> Iterator[bytes]:
    """``count`` identical text deltas, serialized once: the fake is never a benchmark's
    bottleneck."""
    chunks = ChunkWriter(completion, include_usage)
    yield chunks.choice({"role": "assistant", "content": "", "refusal": None})
    delta = chunks.choice({"content": _LONG_DELTA})
    for _ in range(count):
        yield delta
    yield chunks.choice({}, "stop")
    if include_usage:
        yield chunks.usage(usage(n))
    yield DONE


def paced(frames: Iterable[bytes], delay_s: float) -> Iterator[bytes]:
    for item in frames:
        if _CONTENT_DELTA in item:
            time.sleep(delay_s)
        yield item


# --- errors and auth ------------------------------------------------------------------------


def error_reply(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> Reply:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return Reply(status, orjson.dumps({"error": error}))


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def authentication_error(headers: dict[str, str]) -> Reply | None:
    """401 unless a key came as ``Authorization: Bearer <key>`` or Azure's ``api-key``."""
    headers = _lower(headers)
    if headers.get("api-key", "").strip():
        return None
    scheme, _, key = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return None
    return error_reply(401, NO_KEY, "invalid_request_error")


def _decoded_object(body: bytes, headers: dict[str, str]) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(decode_body(body, _lower(headers).get("content-encoding", "")))
    except (orjson.JSONDecodeError, zlib.error, ImportError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _too_deep() -> Reply:
    # orjson reads 1024 levels but writes 254: a body between the two cannot be quoted back.
    return error_reply(400, "The request body is nested too deeply.", "invalid_request_error")


# --- planning -------------------------------------------------------------------------------


def plan_chat(req: dict[str, Any], headers: dict[str, str], call_number: int) -> Reply:
    """The reply to a ``POST /v1/chat/completions`` body, by scenario, for the
    call_number-th call."""
    denied = authentication_error(headers)
    if denied is not None:
        return denied
    headers = _lower(headers)
    model = req.get("model") if isinstance(req.get("model"), str) and req["model"] else ""
    stream = req.get("stream") is True
    options = req.get("stream_options")
    if options is not None and not stream:
        message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        return error_reply(400, message, "invalid_request_error", param="stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    n = call_number

    if model == "fake-400":
        return error_reply(
            400, CONTEXT_LENGTH, "invalid_request_error", "context_length_exceeded", "messages"
        )
    if model == "fake-429":
        return Reply(429, orjson.dumps(RATE_LIMIT_ERROR), headers={"retry-after": "0"})
    if model == "fake-500" or (model == "fake-error-chunk" and not stream):
        return error_reply(500, SERVER_ERROR, "server_error", "server_error")
    tier = req.get("service_tier")
    completion = Completion(
        id="chatcmpl-" + secrets.token_hex(14),
        created=int(time.time()),
        model=model or _DEFAULT_MODEL,
        service_tier=tier if isinstance(tier, str) and tier in _TIERS else "default",
    )

    long = _LONG_MODEL.fullmatch(model)
    if long:
        count = int(long[1])
        if not stream:
            body = completion_object(Turn(_LONG_DELTA * count), completion, n)
            return Reply(body=orjson.dumps(body))
        frames = long_frames(completion, n, count, include_usage=include_usage)
        return Reply(chunks=_cut(frames, headers, _BATCH_BYTES))

    turn = _TURNS.get(model, default_turn)(req)
    delay_s = _header_int(headers, "x-fake-delay-ms", _DEFAULT_DELAY_MS) / 1000
    truncated = model == "fake-truncated"
    if not stream:
        body = orjson.dumps(completion_object(turn, completion, n))
        if truncated:
            return Reply(body=body[: len(body) // 2], close=True)
        if model == "fake-slow":
            time.sleep(delay_s * len(split_text(SLOW_ANSWER)))
        return Reply(body=body)

    frames = stream_frames(turn, completion, n, include_usage=include_usage)
    if model == "fake-slow":
        frames = paced(frames, delay_s)
    return Reply(chunks=_cut(frames, headers, 0), close=truncated)


def chat_reply(body: bytes, headers: dict[str, str], call_number: int) -> Reply:
    """``POST …/chat/completions`` from its raw body: auth first (as OpenAI), then the JSON."""
    denied = authentication_error(headers)
    if denied is not None:
        return denied
    req = _decoded_object(body, headers)
    if req is None:
        return Reply(400, error_body(NOT_JSON, "invalid_request_error"))
    try:
        # Whatever is quoted from the request is serialized while planning, so a body too
        # deep to quote back is a 400 here, never a stream cut after its headers.
        return plan_chat(req, headers, call_number)
    except (orjson.JSONEncodeError, RecursionError):
        return _too_deep()


def route(
    method: str, path: str, body: bytes, headers: dict[str, str], next_call: Callable[[], int]
) -> Reply | None:
    """The reply to a Chat Completions request (path without its query), or None when the
    request is not one. ``next_call`` numbers the chat completions calls."""
    if method == "POST" and path.endswith("/chat/completions"):
        return chat_reply(body, headers, next_call())
    return None
