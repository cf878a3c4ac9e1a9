"""Hostile OpenAI Chat Completions upstreams: malformed, truncated, compressed, oversized and
ill-typed Chat streams and bodies never crash the bridge, reach the client byte for byte, and
are recorded with what could be read and why it ended (the Chat side of
tests/test_hostile_input.py and tests/test_messages_hostile.py). Also: a streamed request is
sent upstream asking for usage, and a 50 MB stream keeps the parsing copy's memory bounded."""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import random
import tracemalloc
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brotli
import httpx
import orjson
import pytest

from aibridge.apis import openai_chat
from aibridge.apis.openai_chat import MAX_CALL_BYTES, MAX_CALLS, MAX_CHOICES, ChatAccumulator
from aibridge.config import hint
from aibridge.record.outcome import finish_exchange
from aibridge.transport.inflate import zstd
from aibridge.transport.tee import StreamTee
from tests.harness import (
    PROVIDER_KEY,
    TOKENS,
    ChunkedReplies,
    Mitmdump,
    bridge_config,
    query,
    wait_for,
)
from tests.test_hostile_input import api_rows, fuzz_into_recorder, nested, tee_outcome

SAFETY = 60.0  # upper bound for waits; never asserted as a duration
ROWS_SETTLE = 5.0  # upper bound for an interception's other rows to follow it
FIXTURES = Path(__file__).parent / "fixtures" / "openai_chat"
STREAMS = sorted(FIXTURES.glob("*.response.sse"))
API = openai_chat.API
ES = "text/event-stream"
JSON = "application/json"


through_tee = functools.partial(tee_outcome, API)
rows_of = functools.partial(api_rows, API, b'{"model": "m", "messages": []}', "openai")


def test_fuzzed_chat_streams_forward_unchanged_and_record_cleanly(tmp_path: Path) -> None:
    """A seeded fuzz run over every golden Chat stream, its rows written by the recorder."""
    rng = random.Random(20_261_215)
    fuzz_into_recorder(tmp_path / "fuzz.db", STREAMS, 30, rng, through_tee, rows_of)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstd.compress(data),
}


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name.removesuffix(".response.sse"))
@pytest.mark.parametrize("encoding", COMPRESSORS)
def test_a_compressed_stream_gives_the_records_of_the_plain_one(path: Path, encoding: str) -> None:
    plain = path.read_bytes()
    compress = COMPRESSORS[encoding]
    rng = random.Random(5)
    assert through_tee(compress(plain), rng, encoding) == through_tee(plain, rng)


# --- chunk builders ---------------------------------------------------------------------------


def chunk(*choices: Any, **fields: Any) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with these choices (fields override or add members)."""
    return {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "created": 1764600000,
        "model": "gpt-hostile",
        "choices": list(choices),
        **fields,
    }


def choice(delta: Any = None, finish: Any = None, index: Any = 0) -> dict[str, Any]:
    return {"index": index, "delta": {} if delta is None else delta, "finish_reason": finish}


def call(
    index: Any, call_id: str | None = None, name: str | None = None, args: str = ""
) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if call_id is not None:
        entry.update(id=call_id, type="function")
        entry["function"]["name"] = name or "f"
    return entry


def calls(*entries: Any, finish: Any = None) -> dict[str, Any]:
    return chunk(choice({"tool_calls": list(entries)}, finish))


def sse(*items: dict[str, Any] | bytes) -> bytes:
    """``data:`` events of these chunks; bytes are sent as they are."""
    return b"".join(
        item if isinstance(item, bytes) else b"data: " + orjson.dumps(item) + b"\n\n"
        for item in items
    )


DONE = b"data: [DONE]\n\n"
TEXT = sse(chunk(choice({"role": "assistant", "content": "Hello"})))
STOP = sse(chunk(choice({}, "stop")))


def usage_chunk(prompt: int = 10, completion: int = 5, **extra: Any) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, **extra}
    return sse(chunk(usage=usage))


def tool_turn(call_id: str = "call_ok", args: str = '{"city":"Paris"}') -> bytes:
    """A whole, well-formed tool call and its finish: what must be recorded after the noise."""
    return sse(
        calls(call(0, call_id, "get_weather")),
        calls(call(0, args=args[:5])),
        calls(call(0, args=args[5:])),
        chunk(choice({}, "tool_calls")),
    )


def events_of(stream: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in stream.split(b"\n\n") if e]


# --- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """An upstream answer and what the bridge must record of it."""

    body: bytes
    want_status: str
    want_error: str | None = None  # a part of the row's error text
    status: int = 200
    content_type: str = ES
    headers: dict[str, str] = field(default_factory=dict)
    tools: list[tuple[str | None, str | None]] | None = None  # exact (call_id, args) rows
    tool_count: int | None = None
    thoughts: list[str | None] | None = None  # exact contents of the thought rows
    usage: tuple[int, int] | None = None  # (input_tokens, output_tokens) of the usage row
    malformed: bool = False  # some chunks were counted as malformed
    xfail: str | None = None  # the bridge is wrong here (reported to the lead)


def wrong_types() -> bytes:
    """Chunks whose members have every wrong type; none may disturb the good call after."""
    bad: list[dict[str, Any] | bytes] = [
        chunk(),  # no choices at all
        {**chunk(), "choices": "nope"},
        {**chunk(), "choices": {"index": 0}},
        {**chunk(), "choices": 7},
        chunk(1, "x", None, [], True),
        chunk(choice({"content": "a"}, index=True)),
        chunk(choice({"content": "a"}, index=-1)),
        chunk(choice({"content": "a"}, index="0")),
        chunk(choice({"content": "a"}, index=1.5)),
        chunk(choice({"content": "a"}, index=2**63)),
        # Beyond 64 bits: orjson cannot write it, so spliced in as bytes.
        sse(chunk(choice({}, index=123456789))).replace(b"123456789", b"9" * 40),
        chunk(choice([{"content": "a"}])),
        chunk(choice("delta as a string")),
        chunk(choice(5)),
        chunk(choice({"tool_calls": "x"})),
        chunk(choice({"tool_calls": {"index": 0}})),
        chunk(choice({"tool_calls": [1, 2.5, None, "call", [], True]})),
        chunk(choice({"tool_calls": [{"index": 0, "id": 5, "function": "f", "type": []}]})),
        chunk(choice({"reasoning_content": 5, "refusal": ["no"], "function_call": "x"})),
        chunk(choice({}, {"reason": "stop"})),
        chunk(choice({}, ["stop"])),
        chunk(choice({}, 7)),
        chunk(choice({}, "")),
        chunk(usage="many"),
        chunk(usage=[1, 2]),
        chunk(usage={"prompt_tokens": "ten", "completion_tokens": -1, "total_tokens": 1.5}),
        {**chunk(), "id": 5, "model": ["m"], "service_tier": {"t": 1}},
        {**chunk(), "error": None},
    ]
    return sse(*bad)


def hostile_cases() -> dict[str, Case]:
    rng = random.Random(12)
    golden = (FIXTURES / "tool_call_streamed.response.sse").read_bytes()
    golden_tool = [("call_Wq9vP2", '{"city":"Paris","unit":"celsius"}')]
    events = events_of(golden)
    huge_args = '{"blob":"' + "x" * (MAX_CALL_BYTES + 10) + '"}'
    huge_reasoning = "r" * (1 << 20)
    cases = {
        # --- bytes that are not a Chat stream
        "random_bytes": Case(rng.randbytes(65536), "error"),
        "random_bytes_after_a_good_chunk": Case(TEXT + rng.randbytes(30000), "error"),
        "empty_body": Case(b"", "error", "the stream ended before a terminal event"),
        "only_comments": Case(b": ping\n\n" * 500, "error", "ended before a terminal event"),
        "nul_bytes": Case(b"\x00" * 10_000 + b"\n\n" + golden, "completed", tools=golden_tool),
        "invalid_utf8": Case(
            b'data: {"id":"chatcmpl-\xff\xfe","choices":[{"index":0,"delta":{"content":'
            b'"\xc3\x28"},"finish_reason":"stop"}]}\n\n' + DONE,
            "completed",
        ),
        "bom_first": Case(b"\xef\xbb\xbf" + golden, "completed", tools=golden_tool),
        # --- line ends and SSE framing
        "cr_line_ends": Case(golden.replace(b"\n", b"\r"), "completed", tools=golden_tool),
        "crlf_line_ends": Case(golden.replace(b"\n", b"\r\n"), "completed", tools=golden_tool),
        "mixed_line_ends": Case(
            b"".join(
                e.replace(b"\n\n", [b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\n\n"][i % 4])
                for i, e in enumerate(events)
            ),
            "completed",
            tools=golden_tool,
        ),
        "comments_ids_and_retries_between_chunks": Case(
            b"".join(
                b": keep-alive\n\nid: %d\nretry: 10\nevent\n" % i + e for i, e in enumerate(events)
            ),
            "completed",
            tools=golden_tool,
        ),
        "a_chunk_over_two_data_lines": Case(
            sse(calls(call(0, "call_split", "f")))
            + b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,\n'
            b'data: "function":{"arguments":"{\\"a\\": 1}"}}]}}]}\n\n'
            + sse(chunk(choice({}, "tool_calls")))
            + DONE,
            "completed",
            tools=[("call_split", '{"a":1}')],
        ),
        # --- compression
        **{
            f"{encoding}_golden": Case(
                compress(golden),
                "completed",
                headers={"content-encoding": encoding},
                tools=golden_tool,
            )
            for encoding, compress in COMPRESSORS.items()
        },
        "bad_gzip": Case(
            b"\x1f\x8b\x08\x00" + rng.randbytes(5000),
            "error",
            headers={"content-encoding": "gzip"},
        ),
        "gzip_cut_halfway": Case(
            gzip.compress(golden)[: len(gzip.compress(golden)) // 2],
            "error",
            headers={"content-encoding": "gzip"},
        ),
        "gzip_of_random_bytes": Case(
            gzip.compress(rng.randbytes(20000)), "error", headers={"content-encoding": "gzip"}
        ),
        "unknown_encoding": Case(golden, "error", "lzma", headers={"content-encoding": "lzma"}),
        "two_encodings_one_unknown": Case(
            gzip.compress(golden), "error", "xz", headers={"content-encoding": "xz, gzip"}
        ),
        # --- sizes
        "oversized_event_between_good_chunks": Case(
            b"".join(events[:3]) + b"data: " + b"z" * (9 << 20) + b"\n\n" + b"".join(events[3:]),
            "completed",
            tools=golden_tool,
        ),
        "oversized_json_chunk_between_good_chunks": Case(
            b"".join(events[:3])
            + sse(chunk(choice({"content": "c" * (9 << 20)})))
            + b"".join(events[3:]),
            "completed",
            tools=golden_tool,
        ),
        "tool_arguments_over_the_cap": Case(
            sse(
                calls(call(0, "call_0", "big")),
                *[
                    calls(call(0, args=huge_args[i : i + (1 << 20)]))
                    for i in range(0, len(huge_args), 1 << 20)
                ],
                calls(call(1, "call_1", "small", '{"ok": 1}')),
                chunk(choice({}, "tool_calls")),
            )
            + DONE,
            "completed",
            "over the size limit",
            tools=[("call_0", None), ("call_1", '{"ok":1}')],
        ),
        "reasoning_over_the_cap": Case(
            sse(*[chunk(choice({"reasoning_content": huge_reasoning})) for _ in range(5)])
            + STOP
            + DONE,
            "completed",
            "over the size limit",
            thoughts=[None],
        ),
        "more_calls_than_tracked": Case(
            sse(
                calls(
                    *[call(i, f"call_{i}", "f", "{}") for i in range(MAX_CALLS + 3)],
                    finish="tool_calls",
                )
            )
            + DONE,
            "completed",
            f"past the limits of {MAX_CALLS} calls",
            tool_count=MAX_CALLS,
        ),
        "more_choices_than_tracked": Case(
            sse(chunk(*[choice({"content": "x"}, "stop", i) for i in range(MAX_CHOICES + 20)]))
            + DONE,
            "completed",
            "20 tool call(s) or choice(s) past the limits",
        ),
        "usage_over_64_kib": Case(
            TEXT + STOP + usage_chunk(11, 7, padding="p" * (70 << 10)) + DONE,
            "completed",
            "only its counts kept",
            usage=(11, 7),
        ),
        # --- wrong types
        "wrong_types_then_a_good_call": Case(
            wrong_types() + tool_turn() + usage_chunk(12, 3) + DONE,
            "completed",
            tools=[("call_ok", '{"city":"Paris"}')],
            usage=(12, 3),
            malformed=True,
        ),
        "wrong_types_only_then_done": Case(wrong_types() + DONE, "completed", malformed=True),
        "wrong_types_only_no_done": Case(wrong_types(), "error", "ended before a terminal event"),
        "finish_reasons_that_are_not_reasons": Case(
            sse(
                chunk(choice({}, {"r": 1})),
                chunk(choice({}, 0)),
                chunk(choice({}, "")),
                chunk(choice({}, "x" * 100)),
            ),
            "error",
            "ended before a terminal event",
        ),
        # --- how a stream ends
        "done_without_a_space": Case(TEXT + b"data:[DONE]\n\n", "completed"),
        "done_with_crlf": Case(TEXT + b"data: [DONE]\r\n\r\n", "completed"),
        "done_with_a_trailing_space_after_stop": Case(
            TEXT + STOP + b"data: [DONE] \n\n", "completed"
        ),
        "done_in_lower_case_after_stop": Case(TEXT + STOP + b"data: [done]\n\n", "completed"),
        "done_in_lower_case_without_finish": Case(
            TEXT + b"data: [done]\n\n", "error", "ended before a terminal event", malformed=True
        ),
        "done_as_a_json_string_without_finish": Case(
            TEXT + b'data: "[DONE]"\n\n', "error", "ended before a terminal event", malformed=True
        ),
        "finish_reason_but_no_done": Case(
            TEXT + STOP + usage_chunk(9, 4), "completed", usage=(9, 4)
        ),
        "one_of_two_choices_unfinished_no_done": Case(
            sse(chunk(choice({"content": "a"}, "stop", 0), choice({"content": "b"}, None, 1))),
            "error",
            "ended before a terminal event",
        ),
        "only_done": Case(DONE, "completed", tools=[]),
        "cut_inside_the_arguments": Case(
            b"".join(events[:4]) + events[4][:40],
            "error",
            "ended before a terminal event",
            tools=[("call_Wq9vP2", None)],
        ),
        "chunks_after_done_are_ignored": Case(
            tool_turn() + DONE + sse(calls(call(5, "call_late", "late", "{}"))),
            "completed",
            tools=[("call_ok", '{"city":"Paris"}')],
        ),
        # --- error chunks
        "error_after_text": Case(
            TEXT
            + sse(
                {
                    "error": {
                        "message": "The server had an error while processing your request.",
                        "type": "server_error",
                        "code": None,
                    }
                }
            ),
            "error",
            "The server had an error while processing your request.",
        ),
        "error_as_a_string_after_text": Case(
            TEXT + sse({"error": "upstream overloaded"}), "error", "upstream overloaded"
        ),
        "error_then_a_finish_and_done": Case(
            TEXT + sse({"error": {"message": "first error wins"}}) + STOP + DONE,
            "error",
            "first error wins",
        ),
        # OpenRouter's documented mid-stream error: a chunk with a top-level error *and*
        # choices whose finish_reason is "error"; the openai SDK raises APIError on it.
        "error_chunk_with_choices": Case(
            TEXT
            + sse(
                chunk(
                    choice({"content": ""}, "error"),
                    error={"code": "server_error", "message": "Provider disconnected"},
                )
            )
            + DONE,
            "error",
            "Provider disconnected",
        ),
        # --- tool-call indexes
        "whole_calls_without_an_index": Case(
            sse(
                chunk(
                    choice(
                        {
                            "tool_calls": [
                                {"id": "call_a", "function": {"name": "f", "arguments": '{"a":1}'}},
                                {"id": "call_b", "function": {"name": "g", "arguments": '{"b":2}'}},
                            ]
                        },
                        "tool_calls",
                    )
                )
            )
            + DONE,
            "completed",
            tools=[("call_a", '{"a":1}'), ("call_b", '{"b":2}')],
        ),
        # Ollama and Gemini-compatible gateways send parallel calls all at index 0, each with
        # its own id: a new id at an index is a new call.
        "same_index_restarting_with_a_new_id": Case(
            sse(
                calls(call(0, "call_a", "f", '{"a":1}')),
                calls(call(0, "call_b", "g", '{"b":2}')),
                chunk(choice({}, "tool_calls")),
            )
            + DONE,
            "completed",
            tools=[("call_a", '{"a":1}'), ("call_b", '{"b":2}')],
        ),
        # The openai SDK reads every data: event whatever its event name: so does the bridge.
        "named_events": Case(
            b"".join(b"event: chunk\n" + e for e in events_of(tool_turn())) + DONE,
            "completed",
            tools=[("call_ok", '{"city":"Paris"}')],
        ),
        # --- buffered and error bodies
        "buffered_error_object_with_200": Case(
            orjson.dumps({"error": {"message": "model overloaded", "type": "server_error"}}),
            "error",
            "model overloaded",
            content_type=JSON,
        ),
        "buffered_error_string_with_200": Case(
            b'{"error": "quota gone"}', "error", "quota gone", content_type=JSON
        ),
        "buffered_choices_a_string": Case(
            b'{"id": "chatcmpl-b", "choices": "nope"}',
            "error",
            "held no Chat Completions object",
            content_type=JSON,
        ),
        "buffered_a_json_array": Case(
            b"[1, 2, 3]", "error", "held no Chat Completions object", content_type=JSON
        ),
        "buffered_deep_arguments": Case(
            orjson.dumps(
                {
                    "id": "chatcmpl-deep",
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "tool_calls": [
                                    {
                                        "id": "call_deep",
                                        "type": "function",
                                        "function": {"name": "d", "arguments": nested(700)},
                                    }
                                ],
                            },
                            "finish_reason": "tool_calls",
                        }
                    ],
                    "usage": {"prompt_tokens": 12345, "completion_tokens": 2},
                }
            ).replace(b"12345", b"1" * 40),  # beyond 64 bits
            "completed",
            # Too deep to store as JSON: kept as its raw text (a JSON string).
            tools=[("call_deep", orjson.dumps(nested(700)).decode())],
            content_type=JSON,
        ),
        "gzip_429": Case(
            gzip.compress(
                orjson.dumps(
                    {
                        "error": {
                            "message": "Rate limit reached for gpt-4o",
                            "type": "requests",
                            "code": "rate_limit_exceeded",
                        }
                    }
                )
            ),
            "upstream_error",
            "upstream answered HTTP 429: Rate limit reached for gpt-4o",
            status=429,
            content_type=JSON,
            headers={"content-encoding": "gzip"},
        ),
        "html_502": Case(
            b"<html><body>502 Bad Gateway</body></html>",
            "upstream_error",
            "HTTP 502",
            status=502,
            content_type="text/html",
        ),
        "json_garbage": Case(
            b'{"id": "chatcmpl-x", "choices": [' + b"{" * 5000,
            "error",
            "not JSON",
            content_type=JSON,
        ),
        "deeply_nested_json": Case(nested(5000).encode(), "error", "not JSON", content_type=JSON),
        "json_garbage_as_an_error_body": Case(
            b'{"error": ' + b"[" * 5000, "upstream_error", "HTTP 500", status=500, content_type=JSON
        ),
    }
    return cases


CASES = hostile_cases()

# The provider key echoed back: in an error body, an error chunk, a tool call's arguments, and
# across the server's 8191-byte chunks. The client and the log get its hint, never the key.
KEY_HINT = hint(PROVIDER_KEY)
_KEY_ARGS = orjson.dumps({"key": PROVIDER_KEY}).decode()
# The key starts 10 bytes before the server's first chunk ends.
_PAD = 8191 - 10 - len(b"data: \n\ndata: ")
CASES["echoed_key"] = Case(
    orjson.dumps(
        {"error": {"message": f"Incorrect API key provided: {PROVIDER_KEY}", "code": "invalid"}}
    ),
    "upstream_error",
    KEY_HINT,
    status=401,
    content_type=JSON,
)
CASES["echoed_key_in_an_error_chunk"] = Case(
    TEXT + sse({"error": {"message": f"key {PROVIDER_KEY} is over its quota"}}),
    "error",
    f"key {KEY_HINT} is over its quota",
)
CASES["echoed_key_in_tool_arguments"] = Case(
    sse(calls(call(0, "call_k", "f", _KEY_ARGS)), chunk(choice({}, "tool_calls"))) + DONE,
    "completed",
    tools=[("call_k", orjson.dumps({"key": KEY_HINT}).decode())],
)
CASES["echoed_key_across_chunks"] = Case(
    b"data: " + b"x" * _PAD + b"\n\n" + b"data: " + PROVIDER_KEY.encode() + b"\n\n" + STOP + DONE,
    "completed",
)


def client_sees(case: Case) -> bytes:
    """What the client must receive: upstream's bytes, with an echoed key replaced by its hint."""
    return case.body.replace(PROVIDER_KEY.encode(), KEY_HINT.encode())


# What the request tests are answered with.
GOLDEN_TEXT = Case((FIXTURES / "text_streamed.response.sse").read_bytes(), "completed")


def hostile_reply(headers: Any) -> tuple[int, str, dict[str, str], bytes]:
    """The case the request's ``x-case`` header names."""
    name = headers["x-case"]
    case = GOLDEN_TEXT if name == "golden_text" else CASES[name]
    return case.status, case.content_type, case.headers, case.body


class RecordingReplies(ChunkedReplies):
    """ChunkedReplies that also keeps every request body it was sent, by ``session_id``."""

    def __init__(self, reply: Callable[[Any], tuple[int, str, dict[str, str], bytes]]) -> None:
        super().__init__(reply)
        # session id -> (the request's headers, as the server read them; its body)
        self.received: dict[str | None, tuple[Any, bytes]] = {}
        received = self.received
        base: Any = self.server.RequestHandlerClass

        class Recording(base):  # type: ignore[misc, valid-type]
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                received[self.headers.get("session_id")] = (self.headers, body)
                # ChunkedReplies reads the body again: hand it the bytes, then the socket back.
                stream, self.rfile = self.rfile, io.BytesIO(body)
                try:
                    super().do_POST()
                finally:
                    self.rfile = stream

        self.server.RequestHandlerClass = Recording


class Served:
    def __init__(self, bridge: Mitmdump, upstream: RecordingReplies) -> None:
        self.bridge = bridge
        self.upstream = upstream


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with contextlib.ExitStack() as stack:
        hostile = stack.enter_context(RecordingReplies(hostile_reply))
        config = bridge_config(hostile.url)
        config["providers"] = [
            {
                "name": "hostile",
                "type": "openai",
                "base_url": f"{hostile.url}/v1",
                "api_key": "${TEST_PROVIDER_KEY}",
            }
        ]
        bridge = stack.enter_context(Mitmdump(tmp_path_factory.mktemp("chat_hostile"), config))
        yield Served(bridge, hostile)


def post(served: Served, case: str, body: bytes, **headers: str) -> tuple[int, bytes, str]:
    """POST to the hostile provider; (status, the raw bytes received, the session id)."""
    session = uuid.uuid4().hex
    headers = {
        "authorization": f"Bearer {TOKENS['alice']}",
        "content-type": "application/json",
        "x-case": case,
        "session_id": session,
        **headers,
    }
    url = f"{served.bridge.url}/hostile/v1/chat/completions"
    with httpx.stream("POST", url, content=body, headers=headers, timeout=SAFETY) as r:
        received = b"".join(r.iter_raw())
    return r.status_code, received, session


def ended_row(served: Served, session: str) -> dict[str, Any]:
    sql = "select * from interceptions where client_session_id = ? and ended_at is not null"
    (row,) = wait_for(lambda: query(served.bridge.db_path, sql, (session,)), SAFETY)
    return row


def children(served: Served, table: str, interception_id: str) -> list[dict[str, Any]]:
    sql = f"select * from {table} where interception_id = ? order by rowid"
    return query(served.bridge.db_path, sql, (interception_id,))


STREAMED_REQUEST = orjson.dumps(
    {
        "model": "gpt-hostile",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "be hostile"}],
    }
)


def case_params() -> list[Any]:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=case.xfail))
        if case.xfail
        else name
        for name, case in CASES.items()
    ]


@pytest.mark.parametrize("name", case_params())
def test_hostile_chat_upstream(served: Served, name: str) -> None:
    case = CASES[name]
    start = len(served.bridge.log())
    status, received, session = post(served, name, STREAMED_REQUEST)
    assert status == case.status
    assert PROVIDER_KEY.encode() not in received
    assert received == client_sees(case)  # byte for byte, compressed or not
    row = ended_row(served, session)
    assert (row["api"], row["initiator_id"], row["http_status"]) == (
        "chat_completions",
        "alice",
        case.status,
    )
    assert row["status"] == case.want_status, row
    if case.want_error is not None:
        assert case.want_error in (row["error"] or ""), row
    if case.malformed:
        assert row["malformed_events"] > 0, row
    log = served.bridge.log()[start:]
    assert "Traceback" not in log and "Addon error" not in log
    # Rows after the interception's may land in a later batch of the recorder (milliseconds
    # later); only a case that fails (or an xfail) waits out ROWS_SETTLE.
    want_tools = case.tool_count if case.tool_count is not None else len(case.tools or [])
    want_thoughts = len(case.thoughts or [])
    wait_for(lambda: len(children(served, "tool_usages", row["id"])) >= want_tools, ROWS_SETTLE)
    wait_for(
        lambda: len(children(served, "model_thoughts", row["id"])) >= want_thoughts, ROWS_SETTLE
    )
    if case.usage is not None:
        wait_for(lambda: children(served, "token_usages", row["id"]), ROWS_SETTLE)
    tools = children(served, "tool_usages", row["id"])
    thoughts = children(served, "model_thoughts", row["id"])
    everything = str(tools) + str(thoughts) + str(row) + log
    assert PROVIDER_KEY not in everything and TOKENS["alice"] not in everything
    if case.tools is not None:
        assert [(t["call_id"], t["args"]) for t in tools] == case.tools
    if case.tool_count is not None:
        assert len(tools) == case.tool_count
    if case.thoughts is not None:
        assert [t["content"] for t in thoughts] == case.thoughts
    if case.usage is not None:
        (usage,) = children(served, "token_usages", row["id"])
        assert (usage["input_tokens"], usage["output_tokens"]) == case.usage


# --- the request: the bridge asks for usage on a streamed request ------------------------------

_MEMBER = b'"stream_options":{"include_usage":true}'
USAGE_REQUESTS = {
    "no_stream_options": (
        b'{"model":"m","stream":true,"messages":[{"role":"user","content":"a"}]}',
        b"{" + _MEMBER + b',"model":"m","stream":true,"messages":[{"role":"user","content":"a"}]}',
        "added by the bridge",
    ),
    "no_stream_options_pretty_printed": (
        b'\n  {\n    "stream": true,\n    "model": "m",\n'
        b'    "messages": [{"role": "user", "content": "\\"stream_options\\": {}"}]\n  }\n',
        b"\n  {" + _MEMBER + b',\n    "stream": true,\n    "model": "m",\n'
        b'    "messages": [{"role": "user", "content": "\\"stream_options\\": {}"}]\n  }\n',
        "added by the bridge",
    ),
    "empty_stream_options": (
        b'{"model":"m","stream":true,"stream_options":{},"messages":[]}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
        "added by the bridge",
    ),
    "stream_options_without_include_usage": (
        b'{"model":"m","stream":true,"stream_options":{"include_obfuscation":false},"messages":[]}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true,'
        b'"include_obfuscation":false},"messages":[]}',
        "added by the bridge",
    ),
    "include_usage_false": (
        b'{"model":"m","stream":true,"stream_options":{"include_usage": false},"messages":[]}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage": true},"messages":[]}',
        "added by the bridge",
    ),
    "stream_options_null": (
        b'{"model":"m","stream":true,"stream_options":null,"messages":[]}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
        "added by the bridge",
    ),
    "include_usage_true": (
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
        "requested by the client",
    ),
    "not_streamed": (
        b'{"model":"m","stream":false,"messages":[{"role":"user","content":"a"}]}',
        b'{"model":"m","stream":false,"messages":[{"role":"user","content":"a"}]}',
        None,
    ),
}


@pytest.mark.parametrize("variant", USAGE_REQUESTS)
def test_a_streamed_request_is_sent_asking_for_usage(served: Served, variant: str) -> None:
    body, upstream_gets, stream_usage = USAGE_REQUESTS[variant]
    status, received, session = post(served, "golden_text", body)
    assert status == 200 and received == GOLDEN_TEXT.body
    headers, sent = served.upstream.received[session]
    assert sent == upstream_gets
    assert int(headers["Content-Length"]) == len(sent)
    assert headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    row = ended_row(served, session)
    assert orjson.loads(row["metadata"]).get("stream_usage") == stream_usage
    assert row["status"] == "completed"


def test_a_compressed_streamed_request_is_forwarded_as_sent(served: Served) -> None:
    body = gzip.compress(USAGE_REQUESTS["no_stream_options"][0])
    status, _, session = post(served, "golden_text", body, **{"content-encoding": "gzip"})
    assert status == 200
    _, sent = served.upstream.received[session]
    assert sent == body  # re-compressing would re-encode every byte: left alone
    row = ended_row(served, session)
    assert orjson.loads(row["metadata"])["stream_usage"] == openai_chat.USAGE_NOT_ADDED_ENCODED


# --- memory: a 50 MB stream through the tee ---------------------------------------------------

STREAM_BYTES = 50 << 20
PIECE = 16 << 10


def long_stream(kind: str) -> Iterator[bytes]:
    """About STREAM_BYTES of one kind of chunk, made as it is sent, then the stream's end."""
    if kind == "tool_arguments":
        yield sse(calls(call(0, "call_big", "write")))
    sent, i = 0, 0
    while sent < STREAM_BYTES:
        if kind in ("content", "content_gzip"):
            event = sse(chunk(choice({"content": "c" * PIECE})))
        elif kind == "tool_arguments":
            event = sse(calls(call(0, args="a" * PIECE)))
        elif kind == "reasoning":
            event = sse(chunk(choice({"reasoning_content": "é" * (PIECE // 2)})))
        else:  # many_calls: new small calls in every chunk, far past the count cap
            args = '{"v": "' + "v" * 1000 + '"}'
            event = sse(calls(*[call(i + j, f"call_{i + j}", "f", args) for j in range(16)]))
        sent += len(event)
        i += 16
        yield event
    yield sse(chunk(choice({}, "stop"))) + usage_chunk(100, 200) + DONE


def encoded(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The pieces gzip-compressed as a streaming server sends them (flushed after each)."""
    co = zlib.compressobj(wbits=31)
    for piece in pieces:
        yield co.compress(piece) + co.flush(zlib.Z_SYNC_FLUSH)
    yield co.flush()


@pytest.mark.parametrize(
    ("kind", "bound", "dropped"),
    [
        ("content", 1 << 20, None),
        ("content_gzip", 2 << 20, None),
        ("tool_arguments", 6 << 20, "over the size limit"),
        ("reasoning", 6 << 20, "over the size limit"),
        ("many_calls", 7 << 20, f"past the limits of {MAX_CALLS} calls"),
    ],
)
def test_a_50_mb_stream_keeps_the_parsing_copy_bounded(
    kind: str, bound: int, dropped: str | None
) -> None:
    acc = ChatAccumulator()
    encoding = "gzip" if kind.endswith("_gzip") else ""
    tee = StreamTee(acc, API, encoding)
    pieces = long_stream(kind)
    total = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for piece in encoded(pieces) if encoding else pieces:
            total += len(piece)
            assert tee(piece) is piece
            del piece
        tee(b"")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tee.bytes_forwarded == total
    if not encoding:
        assert total >= STREAM_BYTES
    outcome = finish_exchange(API, acc, tee, None, None)
    assert outcome.status == "completed", outcome.error
    assert outcome.result.token_usage is not None
    assert outcome.result.token_usage["output_tokens"] == 200
    if dropped is None:
        assert outcome.error is None
    else:
        assert outcome.error is not None and dropped in outcome.error
    # Whatever the stream's length: one batch, one event, and the capped content.
    assert peak < bound, f"peak {peak / (1 << 20):.1f} MiB"
