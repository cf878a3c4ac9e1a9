"""A local fake of Anthropic's Messages API, served by devtools.fake_upstream.FakeUpstream.

One FakeUpstream speaks both APIs on one port: ``POST …/v1/messages`` (query ignored, so
Claude Code's ``?beta=true`` works) is answered by :func:`plan_messages`,
``POST …/v1/messages/count_tokens`` by :func:`count_tokens_reply`, and ``GET /v1/models``
(``/v1/models/<id>``) in Anthropic's shape when the request carries ``anthropic-version``.

The request body's ``model`` picks the scenario; any other model, real names such as
``claude-opus-5-5`` included, gets the default:

- default (and ``fake-text``): when a tool named ``Bash`` is declared and the last user
  message's last text block starts with ``run `` ("run echo hi"), a ``tool_use`` of ``Bash``
  with ``{"command": <the rest>, "description": "Run the command"}`` and an id derived from the
  command; when the last user message holds a ``tool_result``, a text quoting the result
  ("The tool returned: hi"); else a short fixed text. (The last user message is found as
  Claude Code needs: ``system``-role messages after it are skipped.)
- ``fake-tool``: a ``tool_use`` of the first declared tool with placeholder arguments (its
  required properties), or ``get_weather`` ``{"city": "Paris"}``; ``fake-parallel``: a text,
  then two ``get_weather`` calls (Paris, Tokyo). Both answer a ``tool_result`` as the default.
- ``fake-thinking``: a thinking block (``thinking_delta`` pieces, ``signature_delta``), then text.
- ``fake-cached``: cache writes split between 5-minute and 1-hour (see Usage).
- ``fake-max-tokens``, ``fake-refusal``: a text that stops with that ``stop_reason``.
- ``fake-error-event``: some text, then an ``error`` event (``overloaded_error``) and the
  end of the stream; buffered: HTTP 529 ``overloaded_error``.
- ``fake-529``: HTTP 529 ``overloaded_error``; ``fake-400``: HTTP 400 ``invalid_request_error``.
- ``fake-truncated``: the stream ends after a ``content_block_delta`` (no ``content_block_stop``,
  ``message_delta`` or ``message_stop``); a buffered body is cut in the middle of its JSON.
- ``fake-slow``: 20 text deltas spaced by the ``x-fake-delay-ms`` header (default 50 ms).
- ``fake-long-N``: N text deltas of ``"word "``, pre-serialized, in 64 KiB chunks (benchmarks).

``stream: true`` gives ``event: <type>\\ndata: <compact JSON>\\n\\n`` frames in Anthropic's
order (``ping`` right after the first ``content_block_start``, as Anthropic's stream and the
golden fixtures have it); otherwise the whole message as one JSON body. The headers
``x-fake-chunk-size`` and ``x-fake-flush-each`` cut streams as in fake_upstream.

A request with neither ``x-api-key`` nor ``Authorization: Bearer <token>`` gets 401
``authentication_error`` (so a test through the bridge proves it injected the key), also on
count_tokens and the model list; a body that is not a JSON object gets 400.

Usage is deterministic from n, the n-th ``POST /v1/messages`` this FakeUpstream received
(from 1, every such request counted, refused ones too), in every scenario:

- ``message_start``: ``input_tokens`` 100n+1, ``cache_creation_input_tokens`` 1000n+2,
  ``cache_read_input_tokens`` 10000n+3, ``cache_creation`` ``{"ephemeral_5m_input_tokens":
  1000n+2, "ephemeral_1h_input_tokens": 0}`` (``fake-cached``: 600n+2 and 400n),
  ``output_tokens`` 1, ``service_tier`` ``standard``;
- ``message_delta``: ``{"output_tokens": 7n+5}`` (cumulative, the final count).

A buffered body carries the same final numbers. So a Claude Code run whose calls were n = a..b
reports (``--output-format json``) the sums of these over its calls, and the log's
``uncached_input_tokens``, ``cache_*`` and ``output_tokens`` columns must add up to the same
(tests/fixtures/claude_code_captured/README.md). A stream cut before ``message_delta``
(``fake-error-event``, ``fake-truncated``) has only ``message_start``'s ``output_tokens`` 1.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

from devtools.fake_upstream import (
    FINAL_ANSWER,
    INCOMPLETE_ANSWER,
    SLOW_ANSWER,
    TEXT_ANSWER,
    TOOL_ANSWER_PREFIX,
    Reply,
    _cut,
    _header_int,
    decode_body,
    new_id,
    placeholder_arguments,
    split_arguments,
    split_text,
    tool_output_text,
)

THINKING: Final = (
    "The question is short, so I will check the numbers once. Both agree; the answer can be given."
)
REFUSAL_ANSWER: Final = "I can't help with that request."
ERROR_EVENT_TEXT: Final = "This answer is cut short by an"
RUN_DESCRIPTION: Final = "Run the command"
PARALLEL_TEXT: Final = "I'll check both cities."
PARALLEL_CITIES: Final = ("Paris", "Tokyo")
OVERLOADED: Final = ("overloaded_error", "Overloaded")
INVALID_MAX_TOKENS: Final = (
    "invalid_request_error",
    "max_tokens: 200000 > 64000, which is the maximum allowed number of output tokens",
)

# Real names first (Claude Code's default and the fixtures'), then the scenarios.
MODELS: Final = (
    ("claude-opus-5-5", "Claude Opus 5.5", "2026-05-01T00:00:00Z"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
    *(
        (name, f"Fake {name.removeprefix('fake-')}", "2025-01-01T00:00:00Z")
        for name in (
            "fake-text",
            "fake-tool",
            "fake-parallel",
            "fake-thinking",
            "fake-cached",
            "fake-max-tokens",
            "fake-refusal",
            "fake-error-event",
            "fake-529",
            "fake-400",
            "fake-truncated",
            "fake-slow",
            "fake-long-1000",
        )
    ),
)
_LONG_MODEL: Final = re.compile(r"fake-long-(\d{1,9})")
_LONG_DELTA: Final = "word "
_BATCH_BYTES: Final = 64 * 1024
_DEFAULT_DELAY_MS: Final = 50
_QUOTE_LIMIT: Final = 2000
_DEFAULT_MODEL: Final = "fake-text"


# --- usage ----------------------------------------------------------------------------------


def start_usage(n: int, *, split_cache: bool = False) -> dict[str, Any]:
    """``message_start``'s usage for the n-th call (the module docstring's scheme)."""
    write = 1000 * n + 2
    one_hour = 400 * n if split_cache else 0
    return {
        "input_tokens": 100 * n + 1,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": 10000 * n + 3,
        "cache_creation": {
            "ephemeral_5m_input_tokens": write - one_hour,
            "ephemeral_1h_input_tokens": one_hour,
        },
        "output_tokens": 1,
        "service_tier": "standard",
    }


def final_output_tokens(n: int) -> int:
    return 7 * n + 5


# --- what the model answers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Turn:
    """The assistant message a scenario produces, the same streamed and buffered.

    ``ending``: ``stop`` (message_delta, message_stop), ``error`` (an error event after the
    last block's deltas) or ``cut`` (nothing after the last block's deltas).
    """

    blocks: list[dict[str, Any]]
    stop_reason: str = "end_turn"
    ending: str = "stop"
    split_cache: bool = False


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_use_block(name: str, arguments: dict[str, Any], salt: str = "") -> dict[str, Any]:
    """A tool_use whose id is derived from its name and arguments: the same every time."""
    seed = orjson.dumps([name, arguments, salt], option=orjson.OPT_SORT_KEYS)
    return {
        "type": "tool_use",
        "id": "toolu_" + hashlib.sha256(seed).hexdigest()[:24],
        "name": name,
        "input": arguments,
    }


def thinking_block(text: str) -> dict[str, Any]:
    signature = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return {"type": "thinking", "thinking": text, "signature": signature}


def last_user_message(req: dict[str, Any]) -> dict[str, Any] | None:
    """The last message once trailing ``system``-role ones (Claude Code's) are skipped, if a
    user's."""
    messages = req.get("messages")
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "system":
            continue
        if isinstance(message, dict) and message.get("role") == "user":
            return message
        return None
    return None


def _blocks(message: dict[str, Any] | None) -> list[dict[str, Any]]:
    content = message.get("content") if message is not None else None
    if isinstance(content, str):
        return [text_block(content)]
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def last_text(message: dict[str, Any] | None) -> str | None:
    texts = [b["text"] for b in _blocks(message) if b.get("type") == "text"]
    return texts[-1] if texts and isinstance(texts[-1], str) else None


def tool_results_text(message: dict[str, Any] | None) -> str | None:
    """The texts of the message's ``tool_result`` blocks joined, or None if it has none."""
    results = [b for b in _blocks(message) if b.get("type") == "tool_result"]
    if not results:
        return None
    return "\n".join(tool_output_text(b.get("content", "")) for b in results)


def declared_tools(req: dict[str, Any]) -> list[dict[str, Any]]:
    """Client tools (no ``type``, or ``custom``) with a name; server tools are not callable."""
    tools = req.get("tools")
    return [
        t
        for t in (tools if isinstance(tools, list) else [])
        if isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and t.get("type") in (None, "custom")
    ]


def answer_to_result(result: str) -> Turn:
    return Turn([text_block(TOOL_ANSWER_PREFIX + result[:_QUOTE_LIMIT])])


def default_turn(req: dict[str, Any]) -> Turn:
    last = last_user_message(req)
    text = last_text(last)
    if text is not None and text.startswith("run "):
        command = text[4:].strip()
        if command and any(t["name"] == "Bash" for t in declared_tools(req)):
            arguments = {"command": command, "description": RUN_DESCRIPTION}
            return Turn([tool_use_block("Bash", arguments)], "tool_use")
    result = tool_results_text(last)
    if result is not None:
        return answer_to_result(result)
    return Turn([text_block(TEXT_ANSWER)])


def tool_turn(req: dict[str, Any]) -> Turn:
    result = tool_results_text(last_user_message(req))
    if result is not None:
        return answer_to_result(result)
    tools = declared_tools(req)
    if tools:
        arguments = placeholder_arguments(tools[0].get("input_schema"))
        return Turn([tool_use_block(tools[0]["name"], arguments)], "tool_use")
    return Turn([tool_use_block("get_weather", {"city": "Paris"})], "tool_use")


def parallel_turn(req: dict[str, Any]) -> Turn:
    result = tool_results_text(last_user_message(req))
    if result is not None:
        return answer_to_result(result)
    calls = [tool_use_block("get_weather", {"city": city}) for city in PARALLEL_CITIES]
    return Turn([text_block(PARALLEL_TEXT), *calls], "tool_use")


_TURNS: Final[dict[str, Callable[[dict[str, Any]], Turn]]] = {
    "fake-tool": tool_turn,
    "fake-parallel": parallel_turn,
    "fake-thinking": lambda _: Turn([thinking_block(THINKING), text_block(FINAL_ANSWER)]),
    "fake-cached": lambda _: Turn([text_block(TEXT_ANSWER)], split_cache=True),
    "fake-max-tokens": lambda _: Turn([text_block(INCOMPLETE_ANSWER)], "max_tokens"),
    "fake-refusal": lambda _: Turn([text_block(REFUSAL_ANSWER)], "refusal"),
    "fake-error-event": lambda _: Turn([text_block(ERROR_EVENT_TEXT)], ending="error"),
    "fake-truncated": lambda _: Turn([text_block(TEXT_ANSWER)], ending="cut"),
    "fake-slow": lambda _: Turn([text_block(SLOW_ANSWER)]),
}


# --- rendering ------------------------------------------------------------------------------


def frame(kind: str, **fields: Any) -> bytes:
    """One SSE event, its data the compact JSON Anthropic sends, ``type`` first."""
    data = orjson.dumps({"type": kind, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


PING: Final = frame("ping")


def message_object(
    model: str, msg_id: str, blocks: list[dict[str, Any]], stop_reason: str | None, usage: dict
) -> dict[str, Any]:
    return {
        "model": model,
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _start_block(block: dict[str, Any]) -> dict[str, Any]:
    """The block as ``content_block_start`` gives it: empty, filled by the deltas."""
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": ""}
    if kind == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {**block, "input": {}}


def _delta_frames(index: int, block: dict[str, Any]) -> Iterator[bytes]:
    kind = block["type"]
    if kind == "text":
        for piece in split_text(block["text"]):
            yield frame(
                "content_block_delta", index=index, delta={"type": "text_delta", "text": piece}
            )
    elif kind == "thinking":
        for piece in split_text(block["thinking"]):
            yield frame(
                "content_block_delta",
                index=index,
                delta={"type": "thinking_delta", "thinking": piece},
            )
        yield frame(
            "content_block_delta",
            index=index,
            delta={"type": "signature_delta", "signature": block["signature"]},
        )
    else:  # tool_use: a first empty piece, then the JSON in pieces, as Anthropic sends them
        for piece in ["", *split_arguments(orjson.dumps(block["input"]).decode())]:
            yield frame(
                "content_block_delta",
                index=index,
                delta={"type": "input_json_delta", "partial_json": piece},
            )


def stream_frames(turn: Turn, model: str, msg_id: str, n: int) -> Iterator[bytes]:
    """The event stream of ``turn`` for the n-th call."""
    usage = start_usage(n, split_cache=turn.split_cache)
    yield frame("message_start", message=message_object(model, msg_id, [], None, usage))
    if not turn.blocks:
        yield PING
    for index, block in enumerate(turn.blocks):
        yield frame("content_block_start", index=index, content_block=_start_block(block))
        if index == 0:
            yield PING
        yield from _delta_frames(index, block)
        if turn.ending != "stop" and index == len(turn.blocks) - 1:
            if turn.ending == "error":
                kind, message = OVERLOADED
                yield frame("error", error={"type": kind, "message": message})
            return
        yield frame("content_block_stop", index=index)
    yield frame(
        "message_delta",
        delta={"stop_reason": turn.stop_reason, "stop_sequence": None},
        usage={"output_tokens": final_output_tokens(n)},
    )
    yield frame("message_stop")


def buffered_body(turn: Turn, model: str, msg_id: str, n: int) -> bytes:
    usage = {
        **start_usage(n, split_cache=turn.split_cache),
        "output_tokens": final_output_tokens(n),
    }
    return orjson.dumps(message_object(model, msg_id, turn.blocks, turn.stop_reason, usage))


def long_frames(model: str, msg_id: str, n: int, count: int) -> Iterator[bytes]:
    """``count`` identical text deltas, serialized once: the fake is never a benchmark's
    bottleneck."""
    yield frame("message_start", message=message_object(model, msg_id, [], None, start_usage(n)))
    yield frame("content_block_start", index=0, content_block={"type": "text", "text": ""})
    yield PING
    delta = frame("content_block_delta", index=0, delta={"type": "text_delta", "text": _LONG_DELTA})
    for _ in range(count):
        yield delta
    yield frame("content_block_stop", index=0)
    yield frame(
        "message_delta",
        delta={"stop_reason": "end_turn", "stop_sequence": None},
        usage={"output_tokens": final_output_tokens(n)},
    )
    yield frame("message_stop")


def paced(frames: Iterable[bytes], delay_s: float) -> Iterator[bytes]:
    for item in frames:
        if item.startswith(b"event: content_block_delta\n"):
            time.sleep(delay_s)
        yield item


# --- errors and auth ------------------------------------------------------------------------


def error_body(kind: str, message: str) -> bytes:
    """Anthropic's error shape (docs: "Errors"), with the request id it carries."""
    error = {"type": kind, "message": message}
    return orjson.dumps({"type": "error", "error": error, "request_id": new_id("req")})


def error_reply(status: int, kind: str, message: str) -> Reply:
    return Reply(status, error_body(kind, message), headers={"request-id": new_id("req")})


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def authentication_error(headers: dict[str, str]) -> Reply | None:
    """401 unless a key came as ``x-api-key`` or ``Authorization: Bearer <token>``."""
    headers = _lower(headers)
    if headers.get("x-api-key", "").strip():
        return None
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return None
    return error_reply(401, "authentication_error", "x-api-key header is required")


def _decoded_object(body: bytes, headers: dict[str, str]) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(decode_body(body, _lower(headers).get("content-encoding", "")))
    except (orjson.JSONDecodeError, zlib.error, ImportError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _not_json() -> Reply:
    message = "There was an issue with the format of your request: the body is not a JSON object"
    return error_reply(400, "invalid_request_error", message)


def _too_deep() -> Reply:
    # orjson reads 1024 levels but writes 254: a body between the two cannot be quoted back.
    return error_reply(400, "invalid_request_error", "The request body is nested too deeply")


# --- planning -------------------------------------------------------------------------------


def plan_messages(req: dict[str, Any], headers: dict[str, str], call_number: int) -> Reply:
    """The reply to a ``POST /v1/messages`` body, by scenario, for the call_number-th call."""
    denied = authentication_error(headers)
    if denied is not None:
        return denied
    headers = _lower(headers)
    model = req.get("model") if isinstance(req.get("model"), str) and req["model"] else ""
    stream = req.get("stream") is True
    n = call_number
    reply_headers = {"request-id": new_id("req")}

    if model == "fake-529" or (model == "fake-error-event" and not stream):
        return error_reply(529, *OVERLOADED)
    if model == "fake-400":
        return error_reply(400, *INVALID_MAX_TOKENS)
    model_out = model or _DEFAULT_MODEL
    msg_id = new_id("msg")

    long = _LONG_MODEL.fullmatch(model)
    if long:
        count = int(long[1])
        if not stream:
            turn = Turn([text_block(_LONG_DELTA * count)])
            return Reply(body=buffered_body(turn, model_out, msg_id, n), headers=reply_headers)
        frames = long_frames(model_out, msg_id, n, count)
        return Reply(chunks=_cut(frames, headers, _BATCH_BYTES), headers=reply_headers)

    turn = _TURNS.get(model, default_turn)(req)
    delay_s = _header_int(headers, "x-fake-delay-ms", _DEFAULT_DELAY_MS) / 1000
    truncated = model == "fake-truncated"
    if not stream:
        body = buffered_body(turn, model_out, msg_id, n)
        if truncated:
            return Reply(body=body[: len(body) // 2], headers=reply_headers, close=True)
        if model == "fake-slow":
            time.sleep(delay_s * len(split_text(SLOW_ANSWER)))
        return Reply(body=body, headers=reply_headers)

    frames = stream_frames(turn, model_out, msg_id, n)
    if model == "fake-slow":
        frames = paced(frames, delay_s)
    return Reply(chunks=_cut(frames, headers, 0), headers=reply_headers, close=truncated)


def messages_reply(body: bytes, headers: dict[str, str], call_number: int) -> Reply:
    """``POST /v1/messages`` from its raw body: auth first (as Anthropic), then the JSON."""
    denied = authentication_error(headers)
    if denied is not None:
        return denied
    req = _decoded_object(body, headers)
    if req is None:
        return _not_json()
    try:
        return plan_messages(req, headers, call_number)
    except (orjson.JSONEncodeError, RecursionError):
        return _too_deep()


def count_tokens_reply(body: bytes, headers: dict[str, str]) -> Reply:
    """``POST /v1/messages/count_tokens``: about a token per 4 bytes of what is counted."""
    denied = authentication_error(headers)
    if denied is not None:
        return denied
    req = _decoded_object(body, headers)
    if req is None:
        return _not_json()
    try:
        counted = orjson.dumps([req.get("system"), req.get("messages"), req.get("tools")])
    except orjson.JSONEncodeError:
        return _too_deep()
    return Reply(body=orjson.dumps({"input_tokens": max(1, len(counted) // 4)}))


def model_object(model_id: str, display_name: str, created_at: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name,
        "created_at": created_at,
    }


def models_reply(path: str, headers: dict[str, str]) -> Reply:
    """``GET /v1/models`` (Anthropic's list shape) or ``GET /v1/models/<id>``."""
    denied = authentication_error(headers)
    if denied is not None:
        return denied
    if path.rstrip("/") == "/v1/models":
        data = [model_object(*m) for m in MODELS]
        listing = {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"],
            "last_id": data[-1]["id"],
        }
        return Reply(body=orjson.dumps(listing))
    model_id = path.removeprefix("/v1/models/")
    for known in MODELS:
        if known[0] == model_id:
            return Reply(body=orjson.dumps(model_object(*known)))
    # Any other Claude name (clients ask for the one they were given) and any fake-long-N.
    if model_id.startswith("claude-") or _LONG_MODEL.fullmatch(model_id):
        return Reply(body=orjson.dumps(model_object(model_id, model_id, "2025-01-01T00:00:00Z")))
    return error_reply(404, "not_found_error", f"model: {model_id}")


def route(
    method: str, path: str, body: bytes, headers: dict[str, str], next_call: Callable[[], int]
) -> Reply | None:
    """The reply to an Anthropic request (path without its query), or None when the request
    is not one and the OpenAI routes answer it. ``next_call`` numbers the messages calls."""
    if method == "POST" and path.endswith("/v1/messages"):
        return messages_reply(body, headers, next_call())
    if method == "POST" and path.endswith("/v1/messages/count_tokens"):
        return count_tokens_reply(body, headers)
    is_models = path.rstrip("/") == "/v1/models" or path.startswith("/v1/models/")
    if method == "GET" and is_models and "anthropic-version" in _lower(headers):
        return models_reply(path, headers)
    return None
