"""A local fake of OpenAI's Responses API, for tests, benchmarks and an offline demo.

The request body's `model` picks the scenario, so real clients (the openai SDK, Codex
with a configured model) can choose one without knowing about the fake:

- `fake-text` (and any unknown model): a short assistant answer.
- `fake-tool`: a `function_call` (Codex's `shell`/`exec_command`/`shell_command` when
  declared); when the last input item is the call's output, a text quoting it.
- `fake-reasoning`: a reasoning item with two summaries, a `commentary` message, then
  the `final_answer` message.
- `fake-cached`: usage with cached (and cache-write) input tokens.
- `fake-failed`: `response.failed` when streamed; HTTP 500 when buffered.
- `fake-incomplete`: `response.incomplete`, reason `max_output_tokens`.
- `fake-error-event`: an `error` event, then the stream ends; HTTP 500 when buffered.
- `fake-malformed`: one event whose data is not JSON, then a normal completion.
- `fake-truncated`: ends cleanly after the function call's `output_item.done`, with no
  terminal event; a buffered body is cut in the middle of its JSON.
- `fake-429`: HTTP 429 with `retry-after: 0`.
- `fake-503`: HTTP 503 (overloaded), for the circuit breaker.
- `fake-slow`: 20 deltas spaced by the `x-fake-delay-ms` header (default 50 ms).
- `fake-long-N`: N text deltas (benchmarks); `fake-big-MB`: about MB MiB of deltas whose
  final text is a short placeholder, so the terminal event stays small (memory tests).

Request headers that shape a stream: `x-fake-flush-each: 1` sends one chunk per event
for the bulk scenarios (which otherwise send 64 KiB chunks); `x-fake-chunk-size: N`
re-cuts the whole stream into N-byte chunks, splitting events anywhere.

It also speaks Anthropic's Messages API on the same port (devtools/fake_anthropic.py).
It also speaks OpenAI's Chat Completions API on the same port (devtools/fake_openai_chat.py).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import re
import secrets
import signal
import socket
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from aibridge.transport.sse import SSEParser

TEXT_ANSWER = "Hello from the fake upstream. This answer is deterministic and short."
SLOW_ANSWER = (
    "This is the slow answer and it arrives one word at a time"
    " so that streaming can be observed here."
)
INCOMPLETE_ANSWER = "This answer stops early because the output token limit was"
REASONING_SUMMARIES = (
    "**Planning the answer**\n\nThe question is simple; I will check it once before answering.",
    "**Double-checking**\n\nEverything is consistent, so the final answer can be given.",
)
COMMENTARY = "Let me check this quickly before answering."
FINAL_ANSWER = "All checks passed: the answer is 42."
TOOL_ANSWER_PREFIX = "The tool returned: "
TOOL_COMMAND = "echo hello-from-tool"
FAILED_ERROR = {
    "code": "server_error",
    "message": "The fake upstream failed while generating the response.",
}
ERROR_EVENT = {"code": "server_error", "message": "The fake upstream sent an error event."}
RATE_LIMIT_ERROR = {
    "error": {
        "message": "Rate limit reached for requests (fake upstream). Please try again in 0s.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
MALFORMED_FRAME = (
    b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", oops\n\n'
)

MODELS = (
    "fake-text",
    "fake-tool",
    "fake-reasoning",
    "fake-cached",
    "fake-failed",
    "fake-incomplete",
    "fake-error-event",
    "fake-malformed",
    "fake-truncated",
    "fake-429",
    "fake-slow",
    "fake-long-1000",
    "fake-big-1",
)
_SIZED_MODEL = re.compile(r"fake-(long|big)-(\d{1,9})")
_SHELL_TOOLS = ("shell", "exec_command", "shell_command")
_LONG_DELTA = "word "
_BIG_DELTA = "abcdefghijklmnopqrstuvwxyz012345" * 32  # 1 KiB per event
_BATCH_BYTES = 64 * 1024
_DEFAULT_DELAY_MS = 50
_STORED_RESPONSES = 256
_TOOL_OUTPUT_QUOTE_LIMIT = 2000
_DELTA_PREFIX = b"event: response.output_text.delta\n"


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the fake received it, body bytes untouched."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


# --- pure builders: ids, usage, output items, response objects ---------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def usage(
    input_tokens: int,
    output_tokens: int,
    *,
    cached: int = 0,
    cache_write: int = 0,
    reasoning: int = 0,
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_write},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


def message_item(text: str, *, phase: str | None = None, status: str = "completed") -> dict:
    item: dict[str, Any] = {
        "id": new_id("msg"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
    }
    if phase is not None:
        item["phase"] = phase
    return item


def reasoning_item(summaries: Iterable[str]) -> dict:
    return {
        "id": new_id("rs"),
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": text} for text in summaries],
    }


def function_call_item(name: str, arguments: dict[str, Any]) -> dict:
    return {
        "id": new_id("fc"),
        "type": "function_call",
        "status": "completed",
        "arguments": orjson.dumps(arguments).decode(),
        "call_id": new_id("call"),
        "name": name,
    }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the model produced: the same for the streamed and the buffered form."""

    items: list[dict]
    usage: dict | None
    status: str = "completed"
    error: dict | None = None
    incomplete_details: dict | None = None


def response_object(
    req: dict, resp_id: str, created_at: int, outcome: Outcome | None = None
) -> dict[str, Any]:
    """The response object; `outcome=None` gives the in-progress one of the first events."""
    tools = req.get("tools")
    reasoning = req.get("reasoning")
    status = "in_progress" if outcome is None else outcome.status
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None if outcome is None else outcome.error,
        "incomplete_details": None if outcome is None else outcome.incomplete_details,
        "instructions": req.get("instructions")
        if isinstance(req.get("instructions"), str)
        else None,
        "max_output_tokens": _int_or_none(req.get("max_output_tokens")),
        "metadata": req.get("metadata") if isinstance(req.get("metadata"), dict) else {},
        "model": req.get("model") if isinstance(req.get("model"), str) else "fake-text",
        "output": [] if outcome is None else outcome.items,
        "parallel_tool_calls": req.get("parallel_tool_calls") is not False,
        "previous_response_id": _str_or_none(req.get("previous_response_id")),
        "reasoning": reasoning
        if isinstance(reasoning, dict)
        else {"effort": None, "summary": None},
        # The tier that served the request ("auto" resolves to one), as the API reports it.
        "service_tier": req.get("service_tier")
        if req.get("service_tier") in ("flex", "priority", "scale")
        else "default",
        "store": req.get("store") is not False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": req.get("tool_choice", "auto"),
        "tools": tools if isinstance(tools, list) else [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None if outcome is None else outcome.usage,
        "user": None,
    }


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --- scenarios ------------------------------------------------------------------------------


def text_outcome() -> Outcome:
    return Outcome([message_item(TEXT_ANSWER)], usage(24, 14))


def cached_outcome() -> Outcome:
    return Outcome([message_item(TEXT_ANSWER)], usage(2048, 14, cached=1536, cache_write=128))


def slow_outcome() -> Outcome:
    return Outcome([message_item(SLOW_ANSWER)], usage(24, 20))


def reasoning_outcome() -> Outcome:
    items = [
        reasoning_item(REASONING_SUMMARIES),
        message_item(COMMENTARY, phase="commentary"),
        message_item(FINAL_ANSWER, phase="final_answer"),
    ]
    return Outcome(items, usage(48, 160, reasoning=96))


def incomplete_outcome() -> Outcome:
    return Outcome(
        [message_item(INCOMPLETE_ANSWER, status="incomplete")],
        usage(24, 16),
        status="incomplete",
        incomplete_details={"reason": "max_output_tokens"},
    )


def failed_outcome() -> Outcome:
    return Outcome([], usage(24, 0), status="failed", error=dict(FAILED_ERROR))


def tool_outcome(req: dict) -> Outcome:
    """A call of the best-fitting declared tool, or the answer once its output came back."""
    last = _last_input_item(req)
    if last is not None and last.get("type") in ("function_call_output", "custom_tool_call_output"):
        quoted = tool_output_text(last.get("output"))[:_TOOL_OUTPUT_QUOTE_LIMIT]
        return Outcome([message_item(f'{TOOL_ANSWER_PREFIX}"{quoted}"')], usage(140, 18))
    name, arguments = choose_tool_call(req.get("tools"))
    return Outcome([function_call_item(name, arguments)], usage(96, 22))


def _last_input_item(req: dict) -> dict | None:
    items = req.get("input")
    if isinstance(items, list) and items and isinstance(items[-1], dict):
        return items[-1]
    return None


def tool_output_text(output: Any) -> str:
    """A tool output as text: a string as is, content parts' texts joined, else JSON."""
    if isinstance(output, str):
        return output.strip()
    if isinstance(output, list):
        texts = [
            p["text"] for p in output if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        return "\n".join(texts).strip()
    return orjson.dumps(output).decode()


def function_tools(tools: Any) -> list[dict]:
    """Function tool specs, flat (Responses) or nested under `function` (Chat style)."""
    found = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        spec = tool["function"] if isinstance(tool.get("function"), dict) else tool
        if isinstance(spec.get("name"), str):
            found.append(spec)
    return found


def choose_tool_call(tools: Any) -> tuple[str, dict[str, Any]]:
    """Codex's shell tool running `echo`, else the first function tool, else get_weather."""
    specs = function_tools(tools)
    for spec in specs:
        if spec["name"] in _SHELL_TOOLS:
            return spec["name"], shell_arguments(spec["name"], spec.get("parameters"))
    if specs:
        return specs[0]["name"], placeholder_arguments(specs[0].get("parameters"))
    return "get_weather", {"city": "Paris"}


def shell_arguments(name: str, parameters: Any) -> dict[str, Any]:
    """Arguments in the form the tool's schema asks for: an argv array or a command string."""
    props = _properties(parameters)
    for key in ("command", "cmd"):
        if key in props:
            return {key: _shell_value(props[key])}
    # No usable schema: Codex's known shapes.
    if name == "shell":
        return {"command": ["bash", "-lc", TOOL_COMMAND]}
    return {"cmd" if name == "exec_command" else "command": TOOL_COMMAND}


def _shell_value(schema: Any) -> Any:
    kinds = schema.get("type") if isinstance(schema, dict) else None
    is_array = kinds == "array" or (isinstance(kinds, list) and "array" in kinds)
    return ["bash", "-lc", TOOL_COMMAND] if is_array else TOOL_COMMAND


def _properties(parameters: Any) -> dict[str, Any]:
    props = parameters.get("properties") if isinstance(parameters, dict) else None
    return props if isinstance(props, dict) else {}


def placeholder_arguments(parameters: Any) -> dict[str, Any]:
    """Values for the required properties only, so any schema is satisfied minimally."""
    props = _properties(parameters)
    required = parameters.get("required") if isinstance(parameters, dict) else None
    names = [n for n in required if n in props] if isinstance(required, list) else []
    return {name: _placeholder(props[name]) for name in names}


def _placeholder(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return {
        "string": "example",
        "integer": 1,
        "number": 1,
        "boolean": True,
        "array": [],
        "object": placeholder_arguments(schema),
    }.get(kind)


# --- SSE rendering --------------------------------------------------------------------------


class SseWriter:
    """Serializes events with consecutive sequence numbers, as the API numbers them."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def frame(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self.sequence_number, **fields})
        self.sequence_number += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def split_text(text: str) -> list[str]:
    """Word-sized deltas, leading space attached as tokenizers do; they join back exactly."""
    return re.findall(r"\s*\S+|\s+", text)


def split_arguments(arguments: str, size: int = 12) -> list[str]:
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


def stream_frames(
    req: dict, resp_id: str, created_at: int, outcome: Outcome, *, terminal: bool = True
) -> Iterator[bytes]:
    """The event stream whose terminal event carries `outcome`'s response object."""
    sse = SseWriter()
    yield sse.frame("response.created", response=response_object(req, resp_id, created_at))
    yield sse.frame("response.in_progress", response=response_object(req, resp_id, created_at))
    for index, item in enumerate(outcome.items):
        yield from item_frames(sse, index, item)
    if terminal:
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            outcome.status, "response.failed"
        )
        yield sse.frame(kind, response=response_object(req, resp_id, created_at, outcome))


def item_frames(sse: SseWriter, index: int, item: dict) -> Iterator[bytes]:
    kind = item["type"]
    item_id = item["id"]
    ids = {"item_id": item_id, "output_index": index}
    if kind == "message":
        added = {**item, "status": "in_progress", "content": []}
        yield sse.frame("response.output_item.added", output_index=index, item=added)
        for ci, part in enumerate(item["content"]):
            text = part["text"]
            empty = {**part, "text": ""}
            yield sse.frame("response.content_part.added", **ids, content_index=ci, part=empty)
            for delta in split_text(text):
                yield sse.frame(
                    "response.output_text.delta", **ids, content_index=ci, delta=delta, logprobs=[]
                )
            yield sse.frame(
                "response.output_text.done", **ids, content_index=ci, text=text, logprobs=[]
            )
            yield sse.frame("response.content_part.done", **ids, content_index=ci, part=part)
    elif kind == "reasoning":
        added = {**item, "summary": []}
        yield sse.frame("response.output_item.added", output_index=index, item=added)
        for si, part in enumerate(item["summary"]):
            text = part["text"]
            empty = {**part, "text": ""}
            yield sse.frame(
                "response.reasoning_summary_part.added", **ids, summary_index=si, part=empty
            )
            for delta in split_text(text):
                yield sse.frame(
                    "response.reasoning_summary_text.delta", **ids, summary_index=si, delta=delta
                )
            yield sse.frame(
                "response.reasoning_summary_text.done", **ids, summary_index=si, text=text
            )
            yield sse.frame(
                "response.reasoning_summary_part.done", **ids, summary_index=si, part=part
            )
    elif kind == "function_call":
        added = {**item, "status": "in_progress", "arguments": ""}
        yield sse.frame("response.output_item.added", output_index=index, item=added)
        for delta in split_arguments(item["arguments"]):
            yield sse.frame("response.function_call_arguments.delta", **ids, delta=delta)
        yield sse.frame("response.function_call_arguments.done", **ids, arguments=item["arguments"])
    else:
        yield sse.frame("response.output_item.added", output_index=index, item=item)
    yield sse.frame("response.output_item.done", output_index=index, item=item)


def error_event_frames(req: dict, resp_id: str, created_at: int) -> Iterator[bytes]:
    sse = SseWriter()
    yield sse.frame("response.created", response=response_object(req, resp_id, created_at))
    yield sse.frame("response.in_progress", response=response_object(req, resp_id, created_at))
    yield sse.frame("error", **ERROR_EVENT, param=None)


def with_malformed_event(frames: Iterable[bytes]) -> Iterator[bytes]:
    """Inserts one event whose data is not JSON right after the first text delta."""
    inserted = False
    for frame in frames:
        yield frame
        if not inserted and frame.startswith(_DELTA_PREFIX):
            inserted = True
            yield MALFORMED_FRAME


def paced(frames: Iterable[bytes], delay_s: float) -> Iterator[bytes]:
    for frame in frames:
        if frame.startswith(_DELTA_PREFIX):
            time.sleep(delay_s)
        yield frame


def bulk_frames(
    req: dict, resp_id: str, created_at: int, count: int, delta: str, outcome: Outcome
) -> Iterator[bytes]:
    """`count` identical text deltas for one message, pre-serialized so the fake is never
    the bottleneck of a benchmark; `outcome` holds the message the done events carry."""
    sse = SseWriter()
    item = outcome.items[0]
    part = item["content"][0]
    ids = {"item_id": item["id"], "output_index": 0}
    yield sse.frame("response.created", response=response_object(req, resp_id, created_at))
    yield sse.frame("response.in_progress", response=response_object(req, resp_id, created_at))
    added = {**item, "status": "in_progress", "content": []}
    yield sse.frame("response.output_item.added", output_index=0, item=added)
    yield sse.frame(
        "response.content_part.added", **ids, content_index=0, part={**part, "text": ""}
    )
    head = _DELTA_PREFIX + b'data: {"type":"response.output_text.delta","sequence_number":'
    tail = (
        b',"item_id":"'
        + item["id"].encode()
        + b'","output_index":0,"content_index":0,"delta":'
        + orjson.dumps(delta)
        + b',"logprobs":[]}\n\n'
    )
    first = sse.sequence_number
    for seq in range(first, first + count):
        yield head + str(seq).encode() + tail
    sse.sequence_number = first + count
    text = part["text"]
    yield sse.frame("response.output_text.done", **ids, content_index=0, text=text, logprobs=[])
    yield sse.frame("response.content_part.done", **ids, content_index=0, part=part)
    yield sse.frame("response.output_item.done", output_index=0, item=item)
    yield sse.frame(
        "response.completed", response=response_object(req, resp_id, created_at, outcome)
    )


def batched(frames: Iterable[bytes], limit: int) -> Iterator[bytes]:
    buf: list[bytes] = []
    size = 0
    for frame in frames:
        buf.append(frame)
        size += len(frame)
        if size >= limit:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


def rechunked(frames: Iterable[bytes], size: int) -> Iterator[bytes]:
    pending = bytearray()
    for frame in frames:
        pending += frame
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)


# --- planning one POST /responses -----------------------------------------------------------


@dataclass(slots=True)
class Reply:
    """How to answer: a buffered body, or chunks of an event stream."""

    status: int = 200
    body: bytes = b""
    chunks: Iterable[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    stored: dict | None = None  # response object kept for GET /v1/responses/{id}


def error_body(message: str, kind: str, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def plan_responses(req: dict, headers: dict[str, str]) -> Reply:
    """The reply to a Responses request, by scenario (the model name)."""
    model = req.get("model") if isinstance(req.get("model"), str) else ""
    stream = req.get("stream") is True
    resp_id = new_id("resp")
    created_at = int(time.time())

    if model == "fake-429":
        return Reply(429, orjson.dumps(RATE_LIMIT_ERROR), headers={"retry-after": "0"})
    if model == "fake-503":
        return Reply(503, error_body("The server is overloaded", "server_error", "overloaded"))
    if model == "fake-error-event":
        if not stream:
            return Reply(500, error_body(ERROR_EVENT["message"], "server_error", "server_error"))
        return Reply(chunks=error_event_frames(req, resp_id, created_at))
    if model == "fake-failed" and not stream:
        return Reply(500, error_body(FAILED_ERROR["message"], "server_error", "server_error"))
    sized = _SIZED_MODEL.fullmatch(model)
    if sized:
        return _plan_bulk(req, headers, resp_id, created_at, sized[1], int(sized[2]), stream)

    outcome_of = {
        "fake-tool": lambda: tool_outcome(req),
        "fake-truncated": lambda: tool_outcome(req),
        "fake-reasoning": reasoning_outcome,
        "fake-cached": cached_outcome,
        "fake-failed": failed_outcome,
        "fake-incomplete": incomplete_outcome,
        "fake-slow": slow_outcome,
    }.get(model, text_outcome)
    # `generate: false` (Codex's WebSocket "prewarm") only warms the cache: no output.
    outcome = Outcome([], usage(24, 0)) if req.get("generate") is False else outcome_of()
    final = response_object(req, resp_id, created_at, outcome)
    delay_s = _header_int(headers, "x-fake-delay-ms", _DEFAULT_DELAY_MS) / 1000

    if not stream:
        body = orjson.dumps(final)
        if model == "fake-truncated":
            return Reply(body=body[: len(body) // 2], close=True)
        if model == "fake-slow":
            time.sleep(delay_s * len(split_text(SLOW_ANSWER)))
        return Reply(body=body, stored=final)

    frames = stream_frames(req, resp_id, created_at, outcome, terminal=model != "fake-truncated")
    if model == "fake-malformed":
        frames = with_malformed_event(frames)
    elif model == "fake-slow":
        frames = paced(frames, delay_s)
    return Reply(
        chunks=_cut(frames, headers, 0),
        close=model == "fake-truncated",
        stored=None if model == "fake-truncated" else final,
    )


def _plan_bulk(
    req: dict,
    headers: dict[str, str],
    resp_id: str,
    created_at: int,
    kind: str,
    size: int,
    stream: bool,
) -> Reply:
    if kind == "long":
        count, delta = size, _LONG_DELTA
        text = delta * count
    else:
        one = len(_DELTA_PREFIX) + len(_BIG_DELTA) + 150  # about one serialized event
        count, delta = max(1, size * 1024 * 1024 // one), _BIG_DELTA
        # A placeholder, not the full text: a terminal event of `size` MiB would defeat
        # the memory tests this scenario exists for.
        text = f"[{count} deltas of {len(delta)} characters]"
    outcome = Outcome([message_item(text)], usage(16, count))
    if not stream:
        return Reply(body=orjson.dumps(response_object(req, resp_id, created_at, outcome)))
    frames = bulk_frames(req, resp_id, created_at, count, delta, outcome)
    return Reply(chunks=_cut(frames, headers, _BATCH_BYTES))


def _cut(frames: Iterable[bytes], headers: dict[str, str], batch_bytes: int) -> Iterable[bytes]:
    """Chunking policy: fixed-size cuts if asked, else one event or `batch_bytes` per chunk."""
    chunk_size = _header_int(headers, "x-fake-chunk-size", 0)
    if chunk_size > 0:
        return rechunked(frames, chunk_size)
    if batch_bytes and headers.get("x-fake-flush-each") != "1":
        return batched(frames, batch_bytes)
    return frames


def _header_int(headers: dict[str, str], name: str, default: int) -> int:
    try:
        return max(0, int(headers.get(name, default)))
    except ValueError:
        return default


def decode_body(body: bytes, encoding: str) -> bytes:
    """The body for parsing only (the record keeps the original bytes)."""
    encoding = encoding.strip().lower()
    if encoding == "gzip":
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "zstd":
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+

        return zstd.decompress(body)
    return body


def model_object(model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "aibridge-fake",
    }


# --- HTTP plumbing --------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 makes hundreds of clients connecting at once
    # (the concurrency tests, the benchmark) wait for SYN retries, a second or more each.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], fake: FakeUpstream) -> None:
        self.fake = fake
        # Kept so that stop() can end idle keep-alive connections instead of leaving
        # clients talking to a dead server.
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def close_open_sockets(self) -> None:
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed by the client
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests and benchmarks want a quiet fake

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    def _handle(self) -> None:
        body = self._read_body()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.server.fake._record(ReceivedRequest(self.command, self.path, headers, body))
        if self.command == "GET" and headers.get("upgrade", "").lower() == "websocket":
            self._websocket(headers)
            return
        try:
            self._send(self._route(body, headers))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _websocket(self, headers: dict[str, str]) -> None:
        """Responses API WebSocket mode: each ``response.create`` message is answered with the
        same events the HTTP stream would carry, one JSON message per event."""
        if not self.path.split("?", 1)[0].endswith("/responses") or not self.server.fake.websocket:
            self._send(Reply(404, error_body("WebSocket not available", "invalid_request_error")))
            return
        accept_websocket(self, headers)

        def answer(message: str | bytes) -> Iterable[str]:
            return ws_replies(message, headers) if isinstance(message, str) else ()

        serve_websocket(self.connection, answer)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _route(self, body: bytes, headers: dict[str, str]) -> Reply:
        path = self.path.split("?", 1)[0]
        # Imported here: they import this module's builders.
        from devtools import fake_anthropic, fake_openai_chat

        fake = self.server.fake
        reply = fake_anthropic.route(self.command, path, body, headers, fake._next_messages_call)
        if reply is not None:
            return reply
        reply = fake_openai_chat.route(self.command, path, body, headers, fake._next_chat_call)
        if reply is not None:
            return reply
        if self.command == "POST" and path.endswith("/responses"):
            return self._responses(body, headers)
        if self.command == "GET":
            if path.rstrip("/") == "/v1/models":
                data = [model_object(m) for m in MODELS]
                return Reply(body=orjson.dumps({"object": "list", "data": data}))
            if path.startswith("/v1/models/"):
                model_id = path.removeprefix("/v1/models/")
                if model_id in MODELS or _SIZED_MODEL.fullmatch(model_id):
                    return Reply(body=orjson.dumps(model_object(model_id)))
                message = f"The model '{model_id}' does not exist"
                return Reply(404, error_body(message, "invalid_request_error", "model_not_found"))
            match = re.fullmatch(r".*/responses/([^/]+)", path)
            if match:
                stored = self.server.fake._stored(match[1])
                if stored is not None:
                    return Reply(body=orjson.dumps(stored))
                message = f"Response with id '{match[1]}' not found."
                return Reply(404, error_body(message, "invalid_request_error"))
        message = f"Invalid URL ({self.command} {path})"
        return Reply(404, error_body(message, "invalid_request_error"))

    def _responses(self, body: bytes, headers: dict[str, str]) -> Reply:
        try:
            req = orjson.loads(decode_body(body, headers.get("content-encoding", "")))
        except (orjson.JSONDecodeError, zlib.error, ImportError, ValueError):
            req = None
        if not isinstance(req, dict):
            message = "We could not parse the JSON body of your request."
            return Reply(400, error_body(message, "invalid_request_error"))
        return plan_responses(req, headers)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("x-request-id", new_id("req"))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        if reply.chunks is None:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        else:
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in reply.chunks:
                if chunk:
                    self.wfile.write(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")))
            self.wfile.write(b"0\r\n\r\n")
        if reply.stored is not None:
            self.server.fake._store(reply.stored)


_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_websocket(handler: BaseHTTPRequestHandler, headers: dict[str, str]) -> None:
    """Answer a WebSocket upgrade with 101; the handler's connection is then the socket's."""
    key = headers.get("sec-websocket-key", "")
    accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
    handler.send_response(101)
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept)
    handler.end_headers()
    handler.wfile.flush()
    handler.close_connection = True


def serve_websocket(
    sock: socket.socket, answer: Callable[[str | bytes], Iterable[str | bytes]]
) -> None:
    """Serve one WebSocket until it closes: pings and closes answered, each whole message
    (text as str, binary as bytes; fragments joined) answered with what `answer` yields."""
    ws = Connection(ConnectionType.SERVER)
    parts: list[bytes] = []
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, CloseConnection):
                with contextlib.suppress(OSError):
                    sock.sendall(ws.send(event.response()))
                return
            if isinstance(event, Ping):
                sock.sendall(ws.send(event.response()))
            elif isinstance(event, Message):
                piece = event.data
                parts.append(piece.encode() if isinstance(piece, str) else piece)
                if not event.message_finished:
                    continue
                raw, parts = b"".join(parts), []
                message = raw.decode() if isinstance(event, TextMessage) else raw
                for reply in answer(message):
                    out = TextMessage(reply) if isinstance(reply, str) else BytesMessage(reply)
                    sock.sendall(ws.send(out))
        if not data:
            return


def ws_replies(message: str, headers: dict[str, str]) -> Iterator[str]:
    """The server messages answering one client message in WebSocket mode."""
    try:
        req = orjson.loads(message)
    except orjson.JSONDecodeError:
        req = None
    if not isinstance(req, dict) or req.get("type") != "response.create":
        yield orjson.dumps(
            {
                "type": "error",
                "status": 400,
                "error": {
                    "type": "invalid_request_error",
                    "code": "unknown_event",
                    "message": "expected a response.create event",
                },
            }
        ).decode()
        return
    reply = plan_responses({**req, "stream": True}, headers)
    if reply.chunks is None:  # an HTTP error: WebSocket mode sends it as an error event
        err = orjson.loads(reply.body).get("error", {})
        yield orjson.dumps({"type": "error", "status": reply.status, "error": err}).decode()
        return
    parser = SSEParser()
    for chunk in reply.chunks:
        for event in parser.feed(chunk):
            yield event.data
    for event in parser.close():
        yield event.data


class FakeUpstream:
    """The fake served from a daemon thread; `requests` records everything it received."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: list[ReceivedRequest] = []
        self.websocket = True  # accept WebSocket mode on /v1/responses
        self._lock = threading.Lock()
        self._responses: OrderedDict[str, dict] = OrderedDict()
        self.messages_calls = 0  # POST /v1/messages received: usage is numbered by it
        self.chat_calls = 0  # POST …/chat/completions received: likewise
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeUpstream is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> FakeUpstream:
        if self._server is None:
            self._server = _Server((self.host, self.port), self)
            # A short poll interval keeps stop() quick: tests start and stop many fakes.
            self._thread = threading.Thread(
                target=self._server.serve_forever, args=(0.05,), name="fake-upstream", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_open_sockets()
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next_messages_call(self) -> int:
        with self._lock:
            self.messages_calls += 1
            return self.messages_calls

    def _next_chat_call(self) -> int:
        with self._lock:
            self.chat_calls += 1
            return self.chat_calls

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _store(self, response: dict) -> None:
        with self._lock:
            self._responses[response["id"]] = response
            while len(self._responses) > _STORED_RESPONSES:
                self._responses.popitem(last=False)

    def _stored(self, resp_id: str) -> dict | None:
        with self._lock:
            return self._responses.get(resp_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.fake_upstream",
        description="Serve a fake OpenAI Responses API; the model name picks the scenario.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    # Blocked before any thread starts, so every thread inherits the mask and sigwait()
    # in the main thread is the one place that receives them.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with FakeUpstream(args.host, args.port) as fake:
        print(fake.url, flush=True)
        signal.sigwait(stop_signals)


if __name__ == "__main__":
    main()
