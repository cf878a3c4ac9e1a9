"""Anthropic Messages extraction (aibridge.apis.anthropic_messages): golden fixtures, real
Claude Code requests, the prompt and session rules, the stream's caps, untrusted JSON."""

from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import sys
import tracemalloc
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibridge.apis import anthropic_messages as am
from aibridge.apis.anthropic_messages import (
    DELTA_EVENTS,
    MAX_BLOCK_BYTES,
    MAX_BLOCKS,
    WANTED_EVENTS,
    MessagesAccumulator,
    correlating_tool_call_id,
    error_body,
    parse_request,
    prompt_from_messages,
    session_id_from_metadata,
    token_usage_row,
    upstream_error_text,
    worth_decoding,
)
from aibridge.apis.common import EventAccumulator, json_cost
from aibridge.apis.openai_responses import RequestError, RequestInfo, ResponseResult
from aibridge.transport.sse import SSEParser
from aibridge.transport.tee import StreamTee
from tests.test_openai_responses import (
    THOUGHT_COLUMNS,
    TOKEN_USAGE_COLUMNS,
    TOOL_USAGE_COLUMNS,
    feed_fixture,
    split_sse,
)
from tests.test_sse import random_split

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic_messages"
CAPTURED = Path(__file__).parent / "fixtures" / "claude_code_captured"
SCENARIOS = sorted(p.name.removesuffix(".request.json") for p in FIXTURES.glob("*.request.json"))
STREAMED = [n for n in SCENARIOS if (FIXTURES / f"{n}.response.sse").exists()]
BUFFERED = [n for n in SCENARIOS if (FIXTURES / f"{n}.response.json").exists()]
STATUSES = (None, "completed", "incomplete", "error", "upstream_error")


def feed_like_the_tee(acc: MessagesAccumulator, events: Iterable[tuple[str | None, str]]) -> int:
    """Feed what the tee would decode; return how many events its fast paths skipped."""
    skipped = 0
    for name, data in events:
        if (name is None or name in WANTED_EVENTS) and worth_decoding(data):
            acc.feed_event(name, data)
        else:
            skipped += 1
    return skipped


def accumulate(name: str, *, every_event: bool = False) -> MessagesAccumulator:
    acc = MessagesAccumulator()
    feed_fixture(acc, FIXTURES, name, feed_like_the_tee, every_event)
    return acc


def expected(name: str) -> dict[str, Any]:
    return orjson.loads((FIXTURES / f"{name}.expected.json").read_bytes())


def bindable(value: Any) -> None:
    """SQLite takes the value (the recorder turns dicts and lists into JSON text)."""
    if isinstance(value, dict | list):
        value = orjson.dumps(value).decode()
    sqlite3.connect(":memory:").execute("select ?", (value,))


def assert_result_sound(result: ResponseResult) -> None:
    """Rows with exactly the schema's columns, every value bindable (dicts and lists as the
    JSON the recorder writes of each), a status of the list."""
    rows = asdict(result)
    if rows["token_usage"] is not None:
        assert set(rows["token_usage"]) == TOKEN_USAGE_COLUMNS
    for row in rows["tool_usages"]:
        assert set(row) == TOOL_USAGE_COLUMNS
    for row in rows["thoughts"]:
        assert set(row) == THOUGHT_COLUMNS
    for table in (rows["tool_usages"], rows["thoughts"], [rows["token_usage"] or {}]):
        for row in table:
            for value in row.values():
                bindable(value)
    for key in ("response_id", "response_model", "status", "error", "error_code"):
        bindable(rows[key])
    assert rows["status"] in STATUSES
    assert rows["terminal_seen"] == (rows["status"] is not None)


def event(type_: str, **fields: Any) -> bytes:
    return orjson.dumps({"type": type_, **fields})


def message_start(usage: Any = None, **message: Any) -> bytes:
    body = {"id": "msg_1", "model": "claude-x", "usage": usage or {"input_tokens": 5}, **message}
    return event("message_start", message=body)


def block_start(index: int, **block: Any) -> bytes:
    return event("content_block_start", index=index, content_block=block)


def tool_start(index: int, call_id: str = "toolu_1", name: str = "Bash", **extra: Any) -> bytes:
    return block_start(index, type="tool_use", id=call_id, name=name, input={}, **extra)


def json_delta(index: int, piece: str) -> bytes:
    return event(
        "content_block_delta",
        index=index,
        delta={"type": "input_json_delta", "partial_json": piece},
    )


def thinking_delta(index: int, piece: str) -> bytes:
    return event(
        "content_block_delta", index=index, delta={"type": "thinking_delta", "thinking": piece}
    )


def text_delta(index: int, text: str) -> bytes:
    return event("content_block_delta", index=index, delta={"type": "text_delta", "text": text})


def stop(index: int) -> bytes:
    return event("content_block_stop", index=index)


def message_delta(reason: str | None = "end_turn", usage: Any = None) -> bytes:
    return event(
        "message_delta",
        delta={"stop_reason": reason, "stop_sequence": None},
        usage=usage or {"output_tokens": 3},
    )


MESSAGE_STOP = event("message_stop")


def run(*events: bytes) -> ResponseResult:
    acc = MessagesAccumulator()
    for data in events:
        acc.feed_event(None, data)
    result = acc.result()
    assert_result_sound(result)
    return result


# ------------------------------------------------------------------ golden fixtures


def test_fixtures_are_complete() -> None:
    assert len(SCENARIOS) == 22
    for name in SCENARIOS:
        assert (FIXTURES / f"{name}.expected.json").exists(), name
        assert (name in STREAMED) != (name in BUFFERED), name
        assert name.endswith("_streamed") == (name in STREAMED), name


@pytest.mark.parametrize("name", SCENARIOS)
def test_fixture(name: str) -> None:
    want = expected(name)
    body, info = parse_request((FIXTURES / f"{name}.request.json").read_bytes())
    assert isinstance(body, dict)
    assert asdict(info) == want["request"]
    assert info.stream == (name in STREAMED)
    result = accumulate(name).result()
    assert asdict(result) == want["result"]
    assert_result_sound(result)


@pytest.mark.parametrize("name", STREAMED)
def test_fixture_same_result_when_every_event_is_fed(name: str) -> None:
    # The tee skips pings and text deltas; feeding them anyway must change nothing.
    assert accumulate(name, every_event=True).result() == accumulate(name).result()


@pytest.mark.parametrize("name", STREAMED)
def test_fixture_text_deltas_are_skipped_undecoded(name: str) -> None:
    # Anthropic's own spelling is what the byte test recognises: every text delta and ping.
    events = split_sse((FIXTURES / f"{name}.response.sse").read_bytes())
    for event_name, data in events:
        decoded = orjson.loads(data)
        is_text = decoded.get("delta", {}).get("type") == "text_delta"
        assert worth_decoding(data) == (not is_text and event_name != "ping"), data
        assert worth_decoding(data.encode()) == worth_decoding(data)


@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("seed", range(5))
def test_fixture_through_the_bridge_sse_parser_in_random_chunks(name: str, seed: int) -> None:
    raw = (FIXTURES / f"{name}.response.sse").read_bytes()
    rng = random.Random(f"{name}-{seed}")
    parser = SSEParser(max_event_bytes=8 << 20, wanted=WANTED_EVENTS.__contains__)
    acc = MessagesAccumulator()
    at = 0
    while at < len(raw):
        size = rng.choice([1, 2, 3, 7, 13, 64, 500, 4096])
        events = parser.feed(raw[at : at + size])
        feed_like_the_tee(acc, [(e.event, e.data) for e in events])
        at += size
    feed_like_the_tee(acc, [(e.event, e.data) for e in parser.close()])
    assert asdict(acc.result()) == expected(name)["result"]
    assert parser.skipped_events == raw.count(b"event: ping\n")


@pytest.mark.parametrize("name", BUFFERED)
def test_buffered_fixture_fed_as_an_object(name: str) -> None:
    acc = MessagesAccumulator()
    acc.feed_response_object(orjson.loads((FIXTURES / f"{name}.response.json").read_bytes()))
    assert asdict(acc.result()) == expected(name)["result"]
    assert acc.ended


def test_streamed_tool_fixture_equals_its_buffered_message() -> None:
    # The same message buffered: the records do not depend on how it was delivered.
    streamed = accumulate("parallel_tool_use_streamed").result()
    message = {
        "id": "msg_01Mx2bNq8vRz5sTcW3kYhLpE",
        "type": "message",
        "model": "claude-sonnet-4-5-20250929",
        "content": [
            {"type": "text", "text": "I'll look both up at once."},
            *[
                {
                    "type": "tool_use",
                    "id": row["call_id"],
                    "name": row["tool"],
                    "input": row["args"],
                }
                for row in streamed.tool_usages
            ],
        ],
        "stop_reason": "tool_use",
        "usage": streamed.token_usage["usage"],  # type: ignore[index]
    }
    acc = MessagesAccumulator()
    acc.feed_response_object(message)
    assert acc.result() == streamed


# ------------------------------------------------------------ Claude Code, as captured


def captured_request(name: str) -> RequestInfo:
    return parse_request((CAPTURED / f"{name}.request.json").read_bytes())[1]


def captured_result(name: str) -> ResponseResult:
    acc = MessagesAccumulator()
    feed_like_the_tee(acc, split_sse((CAPTURED / f"{name}.response.sse").read_bytes()))
    result = acc.result()
    assert_result_sound(result)
    return result


@pytest.mark.parametrize(
    ("name", "prompt", "model"),
    [
        ("say_hi", "say hi", "claude-opus-5-5"),
        ("tool_turn1", "run echo hi", "claude-opus-5-5"),
        ("say_hi_sonnet45", "say hi", "claude-sonnet-4-5-20250929"),
    ],
)
def test_claude_code_first_turns(name: str, prompt: str, model: str) -> None:
    info = captured_request(name)
    headers = orjson.loads((CAPTURED / f"{name}.headers.json").read_bytes())
    assert (info.prompt, info.model, info.stream) == (prompt, model, True)
    assert info.correlating_tool_call_id is None
    assert info.session_id == headers["X-Claude-Code-Session-Id"]


def test_claude_code_tool_follow_up_turn() -> None:
    first, second = captured_request("tool_turn1"), captured_request("tool_turn2")
    (call,) = captured_result("tool_turn1").tool_usages
    assert (call["tool"], call["args"]) == (
        "Bash",
        {"command": "echo hi", "description": "Print hi"},
    )
    assert second.prompt is None  # the turn answers a tool call: nobody typed anything
    assert second.correlating_tool_call_id == call["call_id"] == "toolu_01CaptureBashEchoHi0001"
    assert second.session_id == first.session_id == "ff778444-109f-4382-b1a7-f131f7df8ced"


@pytest.mark.parametrize(
    ("streams", "output"),
    [
        (["say_hi"], "say_hi"),
        (["tool_turn1", "tool_turn2"], "tool"),
        (["delta_usage"], "delta_usage"),  # message_delta's input counts win, as for Claude Code
    ],
)
def test_claude_code_usage_agrees_with_its_own_count(streams: list[str], output: str) -> None:
    # The README's table: Claude Code's --output-format json usage is the sum of our columns.
    rows = [captured_result(name).token_usage for name in streams]
    usage = orjson.loads((CAPTURED / f"{output}.output.json").read_bytes())["usage"]

    def total(column: str) -> int:
        return sum(row[column] for row in rows)  # type: ignore[index]

    assert total("uncached_input_tokens") == usage["input_tokens"]
    assert total("cache_read_input_tokens") == usage["cache_read_input_tokens"]
    assert total("cache_write_input_tokens") == usage["cache_creation_input_tokens"]
    assert total("output_tokens") == usage["output_tokens"]
    assert total("input_tokens") == sum(
        usage[k] for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )


# ------------------------------------------------------------------ request parsing


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty request body"),
        (b" \r\n\t", "empty request body"),
        (b"{", "not valid JSON"),
        (b"{'model': 'claude'}", "not valid JSON"),
        (b'{"model": "claude"} {}', "not valid JSON"),
        (b'{"model": "claude",}', "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid JSON"),
        (b'{"model": "\xc3"}', "not valid JSON"),
        (b'\xef\xbb\xbf{"model": "claude"}', "not valid JSON"),
        (b'{"model": "\\ud800"}', "not valid JSON"),
        (b'{"max_tokens": NaN}', "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'[{"model": "claude"}]', "must be a JSON object"),
        (b'"hello"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"true", "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b'{"model": 5}', "'model' must be a string"),
        (b'{"model": ["claude"]}', "'model' must be a string"),
        (b'{"model": {"id": "claude"}}', "'model' must be a string"),
        (b'{"model": false}', "'model' must be a string"),
        (b'{"stream": "true"}', "'stream' must be a boolean"),
        (b'{"stream": 1}', "'stream' must be a boolean"),
        (b'{"stream": 0}', "'stream' must be a boolean"),
        (b'{"stream": []}', "'stream' must be a boolean"),
        (b'{"messages": "hello"}', "'messages' must be an array of messages"),
        (b'{"messages": {"role": "user", "content": "hi"}}', "'messages' must be an array"),
        (b'{"messages": 3}', "'messages' must be an array"),
        (b'{"messages": true}', "'messages' must be an array"),
        (b'{"metadata": "user-1"}', "'metadata' must be an object"),
        (b'{"metadata": ["user_id"]}', "'metadata' must be an object"),
        (b'{"metadata": 7}', "'metadata' must be an object"),
        (b'{"metadata": {"user_id": 42}}', "'metadata.user_id' must be a string"),
        (b'{"metadata": {"user_id": {"session_id": "s"}}}', "'metadata.user_id' must be a string"),
        (b'{"metadata": {"user_id": ["u"]}}', "'metadata.user_id' must be a string"),
    ],
)
def test_parse_request_rejects(body: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(body)


@pytest.mark.parametrize(
    "field",
    sorted(am.CHECKED_FIELDS),
)
@pytest.mark.parametrize(
    "spelling",
    [
        '{{"{f}": 1, "{f}": 2}}',
        '{{"{f}":1,"{f}":2}}',
        '{{"{f}": 1, "messages2": [], "{f}": {{"a": [1]}}}}',
        '{{\n  "{f}": null,\n  "{f}": "x"\n}}',
        '{{"{f}": 1, "{e}": 2}}',  # the second spelled with a \u escape
        '{{"{e}": 1, "{f}": 2}}',
    ],
)
def test_duplicated_fields_are_refused_however_spelled(field: str, spelling: str) -> None:
    escaped = "\\u%04x" % ord(field[0]) + field[1:]  # noqa: UP031
    body = spelling.format(f=field, e=escaped).encode()
    with pytest.raises(RequestError, match=f"ambiguous: the key '{field}' is given more than once"):
        parse_request(body)


def test_duplicates_of_fields_the_bridge_does_not_judge_are_upstream_s_to_judge() -> None:
    _, info = parse_request(
        b'{"model": "claude", "temperature": 1, "temperature": 0,'
        b' "messages": [{"role": "user", "content": "hi", "content": "ho"}]}'
    )
    assert (info.model, info.prompt) == ("claude", "ho")


def test_duplicates_inside_nested_objects_are_not_refused() -> None:
    _, info = parse_request(b'{"metadata": {"user_id": "a", "user_id": "b"}, "model": "m"}')
    assert info.model == "m"


def test_parse_request_null_and_missing_fields_are_defaults() -> None:
    body, info = parse_request(
        b'{"model": null, "stream": null, "messages": null, "metadata": null}'
    )
    assert body == {"model": None, "stream": None, "messages": None, "metadata": None}
    assert asdict(info) == {
        "model": None,
        "stream": False,
        "background": False,
        "prompt": None,
        "correlating_tool_call_id": None,
        "previous_response_id": None,
        "session_id": None,
        "metadata": None,
    }
    assert parse_request(b"{}")[1] == info
    assert parse_request(b'{"metadata": {"user_id": null}}')[1] == info


def test_parse_request_leaves_other_fields_to_upstream() -> None:
    body, info = parse_request(
        b'{"model": "m", "messages": [1, "two", null], "tools": "nonsense", "system": 3,'
        b' "max_tokens": "many", "thinking": [], "stream": false}'
    )
    assert body["tools"] == "nonsense"
    assert (info.prompt, info.correlating_tool_call_id, info.stream) == (None, None, False)


def test_request_info_has_no_responses_only_fields() -> None:
    _, info = parse_request(
        b'{"model": "m", "stream": true, "background": true, "previous_response_id": "r",'
        b' "messages": [{"role": "user", "content": "hi"}]}'
    )
    assert (info.background, info.previous_response_id, info.stream) == (False, None, True)


# ------------------------------------------------------------------ prompt and session


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def text(value: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


def tool_result(call_id: Any, content: Any = "ok") -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": call_id, "content": content}


SYSTEM = {"role": "system", "content": "# Environment"}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}


@pytest.mark.parametrize(
    ("messages", "prompt"),
    [
        ([user("hi")], "hi"),
        ([user("")], ""),
        ([user("first"), {"role": "assistant", "content": "a"}, user("second")], "second"),
        ([user([text("a"), text("b")])], "b"),
        ([user([text("<system-reminder>x</system-reminder>"), text("typed")])], "typed"),
        ([user([text("look"), IMAGE])], "look"),
        ([user([IMAGE, text("t", cache_control={"type": "ephemeral"}), IMAGE])], "t"),
        ([user([text("kept"), text(5), {"type": "text"}, "loose", None, 3])], "kept"),
        ([user([{"type": "document", "text": "not a text block"}])], None),
        ([user([IMAGE])], None),
        ([user([])], None),
        ([user(None)], None),
        ([user(42)], None),
        ([user({"type": "text", "text": "a block, not a list"})], None),
        ([user("q"), SYSTEM], "q"),
        ([user("q"), SYSTEM, SYSTEM, {"role": "system", "content": [text("env")]}], "q"),
        ([user("q"), {"role": "assistant", "content": "prefill"}], None),
        ([user("q"), {"role": "assistant", "content": "a"}, SYSTEM], None),
        ([SYSTEM], None),
        ([SYSTEM, user("after system")], "after system"),
        ([user("q"), {"role": "developer", "content": "x"}], None),
        ([user("q"), {"content": "no role"}], None),
        ([user("q"), "a string message"], None),
        ([user("q"), None], None),
        ([user([tool_result("toolu_1")])], None),
        ([user([tool_result("toolu_1"), text("and also")])], "and also"),
        ([], None),
        (None, None),
        ("hi", None),
    ],
)
def test_prompt_rule(messages: Any, prompt: str | None) -> None:
    assert prompt_from_messages(messages) == prompt


@pytest.mark.parametrize(
    ("messages", "call_id"),
    [
        ([user([tool_result("toolu_1")])], "toolu_1"),
        ([user([tool_result("toolu_1"), tool_result("toolu_2", [text("x")])])], "toolu_2"),
        ([user([tool_result("toolu_1")]), SYSTEM], "toolu_1"),
        ([user([tool_result("toolu_1"), IMAGE])], "toolu_1"),
        ([user([IMAGE, tool_result("toolu_3"), "junk", None])], "toolu_3"),
        ([user([tool_result("toolu_1"), text("typed too")])], None),
        ([user([text("typed"), tool_result("toolu_1")])], None),
        ([user([tool_result("toolu_1"), tool_result("")])], None),
        ([user([tool_result("toolu_1"), tool_result(7)])], None),
        ([user([tool_result("toolu_1"), {"type": "tool_result"}])], None),
        ([user([tool_result("toolu_1")]), {"role": "assistant", "content": "a"}], None),
        ([user([{"type": "function_call_output", "call_id": "c"}])], None),
        ([user("a string")], None),
        ([user([])], None),
        ([], None),
        (None, None),
    ],
)
def test_correlating_tool_call_id(messages: Any, call_id: str | None) -> None:
    assert correlating_tool_call_id(messages) == call_id


SESSION = "0b6d1c52-9f3e-4a7b-8c21-5d4e3f2a1b09"


@pytest.mark.parametrize(
    ("metadata", "session_id"),
    [
        ({"user_id": orjson.dumps({"device_id": "d", "session_id": SESSION}).decode()}, SESSION),
        ({"user_id": '{"device_id":"d","account_uuid":"","session_id":"s-1"}'}, "s-1"),
        ({"user_id": f"user_{'ab' * 32}_account__session_{SESSION}"}, SESSION),
        ({"user_id": f"user_{'ab' * 32}_account_{SESSION}_session_{SESSION[::-1]}"}, SESSION[::-1]),
        ({"user_id": '{"session_id": ""}'}, None),
        ({"user_id": '{"session_id": 5}'}, None),
        ({"user_id": '{"session_id": "' + "s" * 300 + '"}'}, None),
        ({"user_id": '{"device_id": "d"}'}, None),
        ({"user_id": '{"session_id": "s"'}, None),
        ({"user_id": '["session_id"]'}, None),
        ({"user_id": "{not json"}, None),
        ({"user_id": "acct-4821"}, None),
        ({"user_id": f"my_session_{SESSION}"}, None),
        ({"user_id": f"user_{'ab' * 32}_account__session_"}, None),
        ({"user_id": f"user_{'ab' * 32}_account__session_{SESSION} trailing"}, None),
        ({"user_id": f"user_xyz_account__session_{SESSION}"}, None),
        ({"user_id": f"user_ab_account__session_{'a' * 300}"}, None),
        ({"user_id": ""}, None),
        ({"user_id": None}, None),
        ({"session_id": SESSION}, None),  # not where Anthropic's metadata carries it
        ({}, None),
        (None, None),
        ("user_id", None),
    ],
)
def test_session_id_from_metadata(metadata: Any, session_id: str | None) -> None:
    assert session_id_from_metadata(metadata) == session_id


# ------------------------------------------------------------------------ token usage


def usage_counts(usage: dict[str, Any]) -> tuple[Any, ...]:
    row = token_usage_row(usage)
    return tuple(
        row[k]
        for k in (
            "input_tokens",
            "cache_read_input_tokens",
            "cache_write_input_tokens",
            "uncached_input_tokens",
            "output_tokens",
            "total_tokens",
        )
    )


@pytest.mark.parametrize(
    ("usage", "counts"),
    [
        ({}, (None, None, None, None, None, None)),
        (
            {
                "input_tokens": 10,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 1000,
                "output_tokens": 5,
            },
            (1110, 100, 1000, 10, 5, 1115),
        ),
        ({"input_tokens": 10}, (10, None, None, 10, None, None)),
        ({"input_tokens": 10, "output_tokens": 0}, (10, None, None, 10, 0, 10)),
        ({"cache_read_input_tokens": 7, "output_tokens": 2}, (None, 7, None, None, 2, None)),
        ({"input_tokens": "10", "output_tokens": -1}, (None, None, None, None, None, None)),
        ({"input_tokens": True, "cache_read_input_tokens": False}, (None,) * 6),
        ({"input_tokens": 3.0, "output_tokens": 2.5}, (3, None, None, 3, None, None)),
        ({"input_tokens": float("inf")}, (None,) * 6),
        ({"input_tokens": 2**63, "output_tokens": 1}, (None, None, None, None, 1, None)),
        # Each count fits SQLite's 64 bits, their sum does not: unknown, not wrapped.
        (
            {"input_tokens": 2**62, "cache_read_input_tokens": 2**62, "output_tokens": 1},
            (None, 2**62, None, 2**62, 1, None),
        ),
        (
            {"input_tokens": 2**63 - 2, "output_tokens": 5},
            (2**63 - 2, None, None, 2**63 - 2, 5, None),
        ),
        (
            {"input_tokens": 4, "cache_creation_input_tokens": {"n": 1}},
            (4, None, None, 4, None, None),
        ),
    ],
)
def test_token_usage_tolerates_any_shape(usage: dict[str, Any], counts: tuple[Any, ...]) -> None:
    assert usage_counts(usage) == counts
    assert token_usage_row(usage)["reasoning_tokens"] is None


@pytest.mark.parametrize(
    ("tier", "kept"),
    [("standard", "standard"), ("priority", "priority"), ("", None), (5, None), ("x" * 33, None)],
)
def test_service_tier(tier: Any, kept: str | None) -> None:
    assert token_usage_row({"service_tier": tier})["service_tier"] == kept


def test_usage_is_merged_key_by_key_and_the_last_count_wins() -> None:
    start = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1,
        "service_tier": "standard",
    }
    result = run(
        message_start(start),
        message_delta(None, {"output_tokens": 7}),
        message_delta(
            "end_turn", {"output_tokens": 9, "server_tool_use": {"web_search_requests": 1}}
        ),
        MESSAGE_STOP,
    )
    usage = result.token_usage
    assert usage is not None
    assert (usage["output_tokens"], usage["input_tokens"], usage["total_tokens"]) == (9, 10, 19)
    assert usage["usage"] == {
        **start,
        "output_tokens": 9,
        "server_tool_use": {"web_search_requests": 1},
    }


def test_usage_from_message_delta_alone() -> None:
    result = run(
        event("message_start", message={"id": "m"}), message_delta("end_turn"), MESSAGE_STOP
    )
    assert result.token_usage is not None
    assert result.token_usage["output_tokens"] == 3


def test_no_usage_no_row() -> None:
    assert run(event("message_start", message={"id": "m"}), MESSAGE_STOP).token_usage is None


# ----------------------------------------------------------------- the accumulator


def test_wanted_and_delta_events() -> None:
    assert {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "error",
    } == WANTED_EVENTS
    # content_block_delta carries tool inputs and thoughts: no event is skippable by name
    # except ping, so the SSE parser's run skipping has nothing to pass over.
    assert not DELTA_EVENTS & WANTED_EVENTS
    assert "ping" not in WANTED_EVENTS


def test_nothing_fed() -> None:
    assert asdict(MessagesAccumulator().result()) == {
        "response_id": None,
        "response_model": None,
        "status": None,
        "error": None,
        "token_usage": None,
        "tool_usages": [],
        "thoughts": [],
        "malformed_events": 0,
        "terminal_seen": False,
        "error_code": None,
    }


@pytest.mark.parametrize(
    ("reason", "status", "error"),
    [
        ("end_turn", "completed", None),
        ("tool_use", "completed", None),
        ("stop_sequence", "completed", None),
        ("pause_turn", "completed", None),
        ("max_tokens", "incomplete", "max_tokens"),
        ("model_context_window_exceeded", "incomplete", "model_context_window_exceeded"),
        ("refusal", "completed", "refusal"),
        ("a_reason_of_the_future", "completed", "a_reason_of_the_future"),
        (None, "completed", None),
        (5, "completed", None),
        ("", "completed", None),
        ("x" * 65, "completed", None),
    ],
)
def test_status_from_stop_reason(reason: Any, status: str, error: str | None) -> None:
    result = run(message_start(), message_delta(reason), MESSAGE_STOP)
    assert (result.status, result.error, result.error_code) == (status, error, None)
    assert result.terminal_seen


def test_message_delta_without_message_stop_is_not_the_end() -> None:
    acc = MessagesAccumulator()
    for data in (message_start(), message_delta("end_turn")):
        acc.feed_event(None, data)
    assert not acc.ended
    assert (acc.result().status, acc.result().terminal_seen) == (None, False)
    acc.feed_event(None, MESSAGE_STOP)
    assert acc.ended
    assert acc.result().status == "completed"


def test_the_first_message_stop_decides_and_later_blocks_still_count() -> None:
    result = run(
        message_start(),
        message_delta("end_turn"),
        MESSAGE_STOP,
        message_delta("max_tokens"),
        MESSAGE_STOP,
        event("error", error={"type": "api_error", "message": "late"}),
        tool_start(0, "toolu_late"),
        json_delta(0, '{"a": 1}'),
        stop(0),
    )
    assert (result.status, result.error) == ("completed", None)
    assert [(r["call_id"], r["args"]) for r in result.tool_usages] == [("toolu_late", {"a": 1})]


@pytest.mark.parametrize(
    ("payload", "message", "code"),
    [
        (
            {"error": {"type": "overloaded_error", "message": "Overloaded"}},
            "Overloaded",
            "overloaded_error",
        ),
        ({"error": {"type": "api_error", "message": ""}}, "api_error", "api_error"),
        ({"error": {"type": "api_error"}}, "api_error", "api_error"),
        ({"error": {"message": "no type", "code": 529}}, "no type", "529"),
        ({"error": {"message": ["x"], "type": 5, "code": True}}, None, None),
        ({"error": "plain text"}, "plain text", None),
        ({"message": "flat"}, "flat", None),
        ({"error": None}, None, None),
        ({}, None, None),
    ],
)
def test_error_event_shapes(payload: dict[str, Any], message: str | None, code: str | None) -> None:
    result = run(message_start(), event("error", **payload))
    assert (result.status, result.error, result.error_code, result.terminal_seen) == (
        "error",
        message,
        code,
        True,
    )


def test_nothing_after_an_error_event_is_read() -> None:
    acc = MessagesAccumulator()
    for data in (
        message_start(),
        event("error", error={"type": "overloaded_error", "message": "first"}),
        event("error", error={"type": "api_error", "message": "second"}),
        tool_start(0),
        stop(0),
        MESSAGE_STOP,
        b"not json",
    ):
        acc.feed_event(None, data)
    result = acc.result()
    assert (result.status, result.error, result.tool_usages, result.malformed_events) == (
        "error",
        "first",
        [],
        0,
    )
    assert acc.ended


def test_event_name_stands_in_for_a_missing_type() -> None:
    acc = MessagesAccumulator()
    acc.feed_event("message_start", orjson.dumps({"message": {"id": "msg_9", "model": "m"}}))
    acc.feed_event("message_stop", b"{}")
    result = acc.result()
    assert (result.response_id, result.status, result.malformed_events) == ("msg_9", "completed", 0)


def test_data_type_wins_over_the_event_name() -> None:
    acc = MessagesAccumulator()
    acc.feed_event("ping", MESSAGE_STOP)
    assert acc.ended


@pytest.mark.parametrize("data", ["", b"", "[DONE]", b"[DONE]"])
def test_empty_data_and_done_marker_are_ignored(data: str | bytes) -> None:
    acc = MessagesAccumulator()
    acc.feed_event("message_stop", data)
    assert (acc.malformed_events, acc.ended) == (0, False)


@pytest.mark.parametrize(
    "data",
    [
        "{",
        "not json",
        b"\xff\xfe{}",
        '{"type": "message_stop"',
        "[1, 2]",
        '"message_stop"',
        "null",
        "3.5",
        "[" * 2000 + "]" * 2000,
        '{"no_type": true}',
        '{"type": "message_start"}',
        '{"type": "message_start", "message": "msg_1"}',
        '{"type": "message_delta"}',
        '{"type": "content_block_start", "index": 0}',
        '{"type": "content_block_start", "index": "0", "content_block": {"type": "text"}}',
        '{"type": "content_block_start", "index": 0, "content_block": {"type": 5}}',
        '{"type": "content_block_start", "index": 1.0, "content_block": {"type": "tool_use"}}',
        '{"type": "content_block_start", "index": true, "content_block": {"type": "tool_use"}}',
        '{"type": "content_block_delta", "index": 0}',
        '{"type": "content_block_delta", "index": null, "delta": {"type": "text_delta"}}',
        '{"type": "content_block_delta", "index": 0, "delta": "text"}',
        '{"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta"}}',
        '{"type": "content_block_delta", "index": 0,'
        ' "delta": {"type": "thinking_delta", "thinking": 3}}',
        '{"type": "content_block_stop", "index": "0"}',
        '{"type": "content_block_stop"}',
    ],
)
def test_malformed_events_are_counted(data: str | bytes) -> None:
    acc = MessagesAccumulator()
    acc.feed_event(None, data)
    assert acc.malformed_events == 1
    assert acc.result().malformed_events == 1
    assert not acc.ended


def test_a_second_message_start_is_malformed_and_changes_nothing() -> None:
    result = run(message_start(id="msg_a", model="m-1"), message_start(id="msg_b", model="m-2"))
    assert (result.response_id, result.response_model, result.malformed_events) == (
        "msg_a",
        "m-1",
        1,
    )


def test_a_block_index_given_twice_keeps_the_first() -> None:
    result = run(
        tool_start(0, "toolu_a"),
        tool_start(0, "toolu_b"),
        block_start(0, type="thinking", thinking=""),
        json_delta(0, "[1]"),
        stop(0),
        MESSAGE_STOP,
    )
    assert [(r["call_id"], r["args"]) for r in result.tool_usages] == [("toolu_a", [1])]
    assert result.malformed_events == 2


def test_blocks_are_kept_apart_by_index_in_any_interleaving() -> None:
    result = run(
        message_start(),
        tool_start(5, "toolu_5", "Read"),
        block_start(2, type="thinking", thinking=""),
        tool_start(9, "toolu_9", "Bash"),
        json_delta(9, '{"command": '),
        thinking_delta(2, "first "),
        json_delta(5, '{"file_path": "a'),
        text_delta(5, "ignored: not a text block"),
        json_delta(9, '"ls"}'),
        thinking_delta(5, "ignored: not a thinking block"),
        json_delta(2, "ignored: not a tool block"),
        thinking_delta(2, "then second"),
        json_delta(5, '.py"}'),
        stop(9),
        stop(2),
        stop(5),
        json_delta(5, "ignored: the block is closed"),
        json_delta(42, "ignored: no such block"),
        stop(42),
        MESSAGE_STOP,
    )
    assert [(r["call_id"], r["tool"], r["args"]) for r in result.tool_usages] == [
        ("toolu_5", "Read", {"file_path": "a.py"}),
        ("toolu_9", "Bash", {"command": "ls"}),
    ]
    assert [(r["source"], r["content"]) for r in result.thoughts] == [
        ("thinking", "first then second")
    ]
    assert result.malformed_events == 0


@pytest.mark.parametrize(
    ("pieces", "start_input", "args"),
    [
        (['{"a": ', "1}"], {}, {"a": 1}),
        (["", '{"a": 1}'], {}, {"a": 1}),
        ([], {}, {}),
        ([""], {}, {}),
        (["", "  "], {"from": "start"}, {"from": "start"}),
        ([], {"query": "x"}, {"query": "x"}),
        ([], None, None),
        (['{"a": 1'], {}, '{"a": 1'),  # not JSON: kept as its text
        (["not json"], {}, "not json"),
        (["[1, 2]"], {}, [1, 2]),
        (["42"], {}, 42),
        (['"caf', 'é"'], {}, "café"),
        (["[" * 300, "]" * 300], {}, "[" * 300 + "]" * 300),  # too deep to store as JSON
    ],
)
def test_tool_args(pieces: list[str], start_input: Any, args: Any) -> None:
    start = {"type": "tool_use", "id": "toolu_1", "name": "f"}
    if start_input is not None:
        start["input"] = start_input
    result = run(
        event("content_block_start", index=0, content_block=start),
        *[json_delta(0, piece) for piece in pieces],
        stop(0),
    )
    (row,) = result.tool_usages
    assert row["args"] == args


def test_tool_row_identity_fallbacks() -> None:
    result = run(
        block_start(0, type="server_tool_use", id="srvtoolu_1", name="web_search", input={}),
        block_start(1, type="mcp_tool_use", id="mcptoolu_1", name="ask", server_name="wiki"),
        block_start(2, type="tool_use", id=5, name=""),
        block_start(3, type="future_tool_use", id="", name=["x"], server_name=""),
        *[stop(i) for i in range(4)],
    )
    assert [(r["call_id"], r["tool"], r["type"], r["server_url"]) for r in result.tool_usages] == [
        ("srvtoolu_1", "web_search", "server_tool_use", None),
        ("mcptoolu_1", "ask", "mcp_tool_use", "wiki"),
        (None, "tool_use", "tool_use", None),
        (None, "future_tool_use", "future_tool_use", None),
    ]
    assert all(r["injected"] is False for r in result.tool_usages)


def test_a_block_cut_before_its_stop_is_not_recorded() -> None:
    result = run(
        tool_start(0, "toolu_whole"),
        json_delta(0, "{}"),
        stop(0),
        tool_start(1, "toolu_cut"),
        json_delta(1, '{"command": "rm'),
        block_start(2, type="thinking", thinking=""),
        thinking_delta(2, "unfinished thought"),
    )
    assert [r["call_id"] for r in result.tool_usages] == ["toolu_whole"]
    assert result.thoughts == []


@pytest.mark.parametrize(
    ("result_block", "error"),
    [
        (
            {"type": "mcp_tool_result", "is_error": True, "content": [text("a"), text("b")]},
            "a b",
        ),
        ({"type": "mcp_tool_result", "is_error": True, "content": "plain"}, "plain"),
        ({"type": "mcp_tool_result", "is_error": True, "content": []}, "is_error"),
        ({"type": "mcp_tool_result", "is_error": True, "content": [IMAGE, text("")]}, "is_error"),
        ({"type": "mcp_tool_result", "is_error": False, "content": [text("fine")]}, None),
        ({"type": "mcp_tool_result", "is_error": "yes", "content": [text("?")]}, None),
        (
            {
                "type": "web_search_tool_result",
                "content": {
                    "type": "web_search_tool_result_error",
                    "error_code": "too_many_requests",
                },
            },
            "too_many_requests",
        ),
        (
            {
                "type": "web_fetch_tool_result",
                "content": {"type": "web_fetch_tool_error", "error_code": "url_not_accessible"},
            },
            "url_not_accessible",
        ),
        (
            {
                "type": "code_execution_tool_result",
                "content": {"type": "code_execution_tool_result_error"},
            },
            "code_execution_tool_result_error",
        ),
        ({"type": "web_search_tool_result", "content": [{"type": "web_search_result"}]}, None),
        ({"type": "web_search_tool_result", "content": {"type": "web_search_result"}}, None),
        ({"type": "mcp_tool_result", "is_error": True, "content": "x" * 5000}, "x" * 4096 + "…"),
    ],
)
def test_invocation_error_from_result_blocks(
    result_block: dict[str, Any], error: str | None
) -> None:
    result = run(
        block_start(0, type="server_tool_use", id="srvtoolu_1", name="web_search", input={}),
        stop(0),
        block_start(1, tool_use_id="srvtoolu_1", **result_block),
        stop(1),
        # A result for another call, or without one, changes nothing here.
        block_start(2, type="mcp_tool_result", tool_use_id="other", is_error=True, content="x"),
        block_start(3, type="mcp_tool_result", is_error=True, content="x"),
        block_start(4, type="mcp_tool_result", tool_use_id=7, is_error=True, content="x"),
    )
    (row,) = result.tool_usages
    assert row["invocation_error"] == error


def test_the_first_error_result_for_a_call_is_kept() -> None:
    first = {"type": "mcp_tool_result", "tool_use_id": "t", "is_error": True, "content": "one"}
    result = run(
        block_start(0, type="mcp_tool_use", id="t", name="ask", input={}),
        block_start(1, **first),
        block_start(2, **{**first, "content": "two"}),
        stop(0),
    )
    assert result.tool_usages[0]["invocation_error"] == "one"


@pytest.mark.parametrize(
    ("deltas", "content"),
    [
        (["a", "b"], "ab"),
        ([], None),
        (["", "  \n"], None),
        (["é", "\u2028", "😀"], "é\u2028😀"),
    ],
)
def test_thinking(deltas: list[str], content: str | None) -> None:
    result = run(
        block_start(0, type="thinking", thinking="", signature=""),
        *[thinking_delta(0, d) for d in deltas],
        event("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "s"}),
        stop(0),
        block_start(1, type="redacted_thinking", data="opaque"),
    )
    rows = [(r["source"], r["content"]) for r in result.thoughts]
    assert rows == ([("thinking", content)] if content else []) + [("redacted_thinking", None)]


def test_buffered_message_with_every_block_kind() -> None:
    acc = MessagesAccumulator()
    acc.feed_response_object(
        {
            "id": "msg_b",
            "type": "message",
            "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "because", "signature": "s"},
                {"type": "redacted_thinking", "data": "opaque"},
                "junk",
                {"type": "text", "text": "answer"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1]}},
                {"type": "mcp_tool_use", "id": "mcp_1", "name": "ask", "server_name": "wiki"},
                {
                    "type": "mcp_tool_result",
                    "tool_use_id": "mcp_1",
                    "is_error": True,
                    "content": "no",
                },
            ],
            "stop_reason": "max_tokens",
            "usage": {"input_tokens": 2, "output_tokens": 3},
        }
    )
    result = acc.result()
    assert_result_sound(result)
    assert (result.response_id, result.status, result.error) == (
        "msg_b",
        "incomplete",
        "max_tokens",
    )
    assert [(r["call_id"], r["args"], r["invocation_error"]) for r in result.tool_usages] == [
        ("toolu_1", {"a": [1]}, None),
        ("mcp_1", None, "no"),
    ]
    assert [(r["source"], r["content"]) for r in result.thoughts] == [
        ("thinking", "because"),
        ("redacted_thinking", None),
    ]
    assert result.token_usage is not None
    assert result.token_usage["total_tokens"] == 5


@pytest.mark.parametrize(
    ("body", "status", "error", "code"),
    [
        (
            {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
            "upstream_error",
            "slow down",
            "rate_limit_error",
        ),
        (
            {"type": "error", "error": {"type": "api_error"}},
            "upstream_error",
            "api_error",
            "api_error",
        ),
        ({"type": "error"}, "upstream_error", None, None),
        ({"error": {"message": "openai-ish", "code": "x"}}, "upstream_error", "openai-ish", "x"),
        ({"error": "a string"}, "upstream_error", "a string", None),
        ({"type": "message", "content": []}, "completed", None, None),
        ({"stop_reason": "refusal"}, "completed", "refusal", None),
        ({"id": "msg_x", "content": []}, None, None, None),  # no type, no stop reason
        ({}, None, None, None),
    ],
)
def test_buffered_bodies(
    body: dict[str, Any], status: str | None, error: str | None, code: str | None
) -> None:
    acc = MessagesAccumulator()
    acc.feed_response_object(body)
    result = acc.result()
    assert (result.status, result.error, result.error_code) == (status, error, code)
    assert result.terminal_seen == acc.ended == (status is not None)
    if status == "upstream_error":
        assert (result.response_id, result.token_usage) == (None, None)


@pytest.mark.parametrize("obj", [None, [], "text", 5, True])
def test_buffered_body_that_is_not_an_object(obj: Any) -> None:
    acc = MessagesAccumulator()
    acc.feed_response_object(obj)
    assert (acc.result().malformed_events, acc.result().status) == (1, None)


@pytest.mark.parametrize("body", [b"", b"<html>502 Bad Gateway</html>", b"{", b"\xff"])
def test_buffered_body_that_is_not_json(body: bytes) -> None:
    acc = MessagesAccumulator()
    acc.feed_response_body(body)
    assert acc.result().malformed_events == 1


def test_result_can_be_taken_twice_and_rows_are_fresh() -> None:
    acc = MessagesAccumulator()
    for data in (message_start(), tool_start(0), json_delta(0, '{"a": 1}'), stop(0), MESSAGE_STOP):
        acc.feed_event(None, data)
    first = acc.result()
    first.tool_usages[0]["args"]["a"] = 2
    first.token_usage["usage"]["input_tokens"] = 99  # type: ignore[index]
    second = acc.result()
    assert second.tool_usages[0]["args"] == {"a": 1}
    assert second.token_usage["usage"]["input_tokens"] == 5  # type: ignore[index]


def test_the_module_does_not_import_mitmproxy() -> None:
    code = "import sys, aibridge.apis.anthropic_messages; sys.exit('mitmproxy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -------------------------------------------------------------------- memory caps


def traced_peak(events: Iterable[bytes], acc: MessagesAccumulator) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for data in events:
            acc.feed_event(None, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_a_100_mib_tool_input_is_dropped_at_the_block_cap() -> None:
    piece = json_delta(0, "x" * (64 << 10))
    count = (100 << 20) // (64 << 10)
    acc = MessagesAccumulator()
    for data in (message_start(), tool_start(0, "toolu_big")):
        acc.feed_event(None, data)
    peak = traced_peak((piece for _ in range(count)), acc)
    for data in (stop(0), message_delta("tool_use"), MESSAGE_STOP):
        acc.feed_event(None, data)
    # The block held at most its 4 MiB (plus bytearray slack), then nothing.
    assert peak < 6 << 20
    result = acc.result()
    assert_result_sound(result)
    assert (acc.dropped_blocks, result.status) == (1, "completed")
    (row,) = result.tool_usages
    assert (row["call_id"], row["args"]) == ("toolu_big", None)
    assert result.error is not None
    assert "1 content block(s) over the size limit" in result.error


def test_a_100_mib_thought_is_dropped_at_the_block_cap() -> None:
    piece = thinking_delta(0, "é" * (32 << 10))  # 64 KiB of UTF-8 a piece
    acc = MessagesAccumulator()
    acc.feed_event(None, block_start(0, type="thinking", thinking=""))
    peak = traced_peak((piece for _ in range(1600)), acc)
    for data in (stop(0), message_delta("max_tokens"), MESSAGE_STOP):
        acc.feed_event(None, data)
    assert peak < 6 << 20
    result = acc.result()
    assert [(r["source"], r["content"]) for r in result.thoughts] == [("thinking", None)]
    assert result.status == "incomplete"
    assert result.error is not None
    assert result.error.startswith("max_tokens; aibridge: 1 content block(s) over the size limit")


def test_content_just_under_the_block_cap_is_kept_whole() -> None:
    value = "v" * (MAX_BLOCK_BYTES - 64)
    raw = orjson.dumps({"k": value}).decode()
    pieces = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]
    result = run(tool_start(0), *[json_delta(0, p) for p in pieces], stop(0), MESSAGE_STOP)
    assert result.tool_usages[0]["args"] == {"k": value}
    assert result.error is None


def test_a_large_buffered_tool_input_is_measured_without_encoding_it() -> None:
    # A Write call with a 3 MiB file, buffered: kept (under the cap), and sized by a walk,
    # not by orjson.dumps, which would reserve 16 bytes a character (48 MiB) to measure it.
    content = "w" * (3 << 20)
    body = {
        "type": "message",
        "content": [
            {"type": "tool_use", "id": "t", "name": "Write", "input": {"content": content}}
        ],
        "stop_reason": "tool_use",
    }
    acc = MessagesAccumulator()
    tracemalloc.start()
    try:
        acc.feed_response_object(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the input is the caller's object: nothing is copied
    assert acc.result().tool_usages[0]["args"] == {"content": content}
    body["content"][0]["input"] = {"content": content + "w" * (1 << 20)}  # type: ignore[index]
    acc = MessagesAccumulator()
    acc.feed_response_object(body)
    assert acc.result().tool_usages[0]["args"] is None  # over 4 MiB: dropped
    assert acc.dropped_blocks == 1


def test_the_exchange_cap_holds_across_blocks() -> None:
    piece = 64 << 10
    per_block = 56  # 3.5 MiB a block: each under the block cap, eight over the exchange's
    acc = MessagesAccumulator()

    def stream() -> Iterable[bytes]:
        for index in range(8):
            yield tool_start(index, f"toolu_{index}")
            data = json_delta(index, "y" * piece)
            for _ in range(per_block):
                yield data
            yield stop(index)

    peak = traced_peak(stream(), acc)
    acc.feed_event(None, MESSAGE_STOP)
    assert peak < 20 << 20  # 16 MiB at most, plus bytearray slack
    result = acc.result()
    assert_result_sound(result)
    kept = [r["call_id"] for r in result.tool_usages if r["args"] is not None]
    assert kept == [f"toolu_{i}" for i in range(4)]  # 14 MiB; a fifth block would pass 16
    assert len(result.tool_usages) == 8
    assert acc.dropped_blocks == 4
    assert result.error is not None
    assert "4 content block(s) over the size limit" in result.error


def test_a_flood_of_blocks_is_bounded() -> None:
    count = MAX_BLOCKS + 5000
    acc = MessagesAccumulator()
    blocks = (data for i in range(count) for data in (tool_start(i, f"toolu_{i}"), stop(i)))
    peak = traced_peak(blocks, acc)
    result = acc.result()
    assert_result_sound(result)
    assert [r["call_id"] for r in result.tool_usages] == [f"toolu_{i}" for i in range(MAX_BLOCKS)]
    assert acc.untracked_blocks == 5000
    assert peak < 8 << 20
    assert result.error is not None
    assert f"5000 content block(s) past the limit of {MAX_BLOCKS} not recorded" in result.error


def test_a_flood_of_tool_errors_is_bounded() -> None:
    count = 10_000
    acc = MessagesAccumulator()

    def stream() -> Iterable[bytes]:
        for index in range(count):
            yield block_start(
                index,
                type="mcp_tool_result",
                tool_use_id=f"toolu_{index}",
                is_error=True,
                content="é" * 10_000,  # cut to 4096 characters, 8 KiB of UTF-8
            )

    peak = traced_peak(stream(), acc)
    kept = len(acc._invocation_errors)
    assert kept + acc.untracked_blocks == count
    assert 0 < kept < MAX_BLOCKS  # the byte budget binds first here
    assert peak < 18 << 20
    acc.feed_event(None, tool_start(count, "toolu_0"))
    acc.feed_event(None, stop(count))
    (row,) = acc.result().tool_usages
    assert row["invocation_error"] == "é" * 4096 + "…"


def test_usage_json_cannot_grow_without_bound() -> None:
    # One new 64 KiB key per message_delta: 12.5 MiB if merged as they come.
    acc = MessagesAccumulator()
    acc.feed_event(None, message_start({"input_tokens": 7, "service_tier": "standard"}))
    deltas = [
        message_delta(None, {f"key_{i}": "z" * (64 << 10), "output_tokens": i}) for i in range(200)
    ]
    peak = traced_peak(deltas, acc)
    acc.feed_event(None, MESSAGE_STOP)
    assert peak < 2 << 20
    result = acc.result()
    assert result.token_usage is not None
    assert result.token_usage["usage"] == {
        "input_tokens": 7,
        "output_tokens": 199,
        "service_tier": "standard",
    }
    assert (result.token_usage["output_tokens"], result.token_usage["service_tier"]) == (
        199,
        "standard",
    )
    assert result.error is not None
    assert "raw usage over 64 KiB: only its counts kept" in result.error


def deep_usage_event(depth: int) -> bytes:
    data = message_start({"input_tokens": 1, "deep": "DEEP"})
    return data.replace(b'"DEEP"', b"[" * depth + b"]" * depth)


@pytest.mark.parametrize(
    "data",
    [
        message_start({f"k{i}": i for i in range(100)} | {"input_tokens": 1}),  # too many keys
        deep_usage_event(255),  # deeper than orjson writes
        deep_usage_event(1000),
    ],
)
def test_odd_usage_keeps_its_counts(data: bytes) -> None:
    result = run(data, MESSAGE_STOP)
    assert result.token_usage is not None
    assert result.token_usage["usage"] == {"input_tokens": 1}
    assert result.token_usage["input_tokens"] == 1
    assert result.error is not None
    assert "only its counts kept" in result.error


def test_usage_as_deep_as_orjson_writes_is_kept() -> None:
    # 253 lists inside the usage object: 254 containers, orjson's limit.
    result = run(deep_usage_event(253), MESSAGE_STOP)
    assert result.token_usage is not None
    assert result.token_usage["usage"]["deep"] == orjson.loads("[" * 253 + "]" * 253)  # type: ignore[index]
    assert result.error is None


@pytest.mark.parametrize("depth", [1, 200, 253, 254, 255, 300, 1000])
@pytest.mark.parametrize("shape", ["list", "dict"])
def test_json_cost_agrees_with_what_orjson_can_write(depth: int, shape: str) -> None:
    if shape == "list":
        raw = "[" * depth + "]" * depth
    else:
        raw = '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)
    value = orjson.loads(raw)
    try:
        orjson.dumps(value)
        writable = True
    except orjson.JSONEncodeError:
        writable = False
    assert (json_cost(value, 1 << 30) is not None) == writable
    result = run(tool_start(0), json_delta(0, raw), stop(0))
    assert result.tool_usages[0]["args"] == (value if writable else raw)


@pytest.mark.parametrize(
    ("value", "writable"),
    [
        (2**64 - 1, True),
        (2**64, False),
        (-(2**63), True),
        (-(2**63) - 1, False),
        ({1: "non-string key"}, False),
        (b"bytes", False),
        ({"a": [1, 2.5, None, True, "x"]}, True),
    ],
)
def test_json_cost_refuses_what_orjson_cannot_write(value: Any, writable: bool) -> None:
    assert (json_cost(value, 1 << 30) is not None) == writable
    row = token_usage_row({"input_tokens": 1, "odd": value})
    assert (row["usage"] is not None) == writable
    assert row["input_tokens"] == 1


# ---------------------------------------------------------- the tee's byte test


def primed() -> MessagesAccumulator:
    """An accumulator mid-stream, with open blocks of every kind a delta could reach."""
    acc = MessagesAccumulator()
    for data in (
        message_start(),
        tool_start(0, "toolu_0"),
        json_delta(0, '{"a": '),
        block_start(1, type="thinking", thinking=""),
        thinking_delta(1, "so far"),
        block_start(2, type="text", text=""),
        tool_start(3, "toolu_3"),
    ):
        acc.feed_event(None, data)
    return acc


def finish(acc: MessagesAccumulator) -> ResponseResult:
    for data in (json_delta(0, "1}"), stop(0), stop(1), stop(2), stop(3), MESSAGE_STOP):
        acc.feed_event(None, data)
    return acc.result()


TEXT_DELTA_SHAPE = re.compile(
    rb'\{"type":"content_block_delta","index":(?:0|[1-9][0-9]{0,8}),'
    rb'"delta":\{"type":"text_delta","text":"(.*)"\}\}',
    re.DOTALL,
)


def ends_at_its_closing_quote(body: bytes) -> bool:
    """A JSON string body, read as a parser reads it: a backslash takes the next byte along,
    a bare quote would end the string early."""
    at = 0
    while at < len(body):
        if body[at : at + 1] == b"\\":
            at += 2
        elif body[at : at + 1] == b'"':
            return False
        else:
            at += 1
    return at == len(body)  # not past it: a last backslash would take the closing quote


def assert_skipping_changes_nothing(data: str | bytes) -> None:
    if worth_decoding(data):
        return
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw != b'{"type":"ping"}':
        shape = TEXT_DELTA_SHAPE.fullmatch(raw)
        assert shape is not None
        assert ends_at_its_closing_quote(shape.group(1))
    fed = primed()
    # Decoded as if not skipped (the accumulator's own feed_event would skip it).
    EventAccumulator.feed_event(fed, "content_block_delta", data)
    changed, unchanged = asdict(finish(fed)), asdict(finish(primed()))
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        # A text that is not valid JSON text (a raw control character, a bad escape, bad
        # UTF-8): decoded, it would only have been counted as malformed.
        unchanged["malformed_events"] += 1
    assert changed == unchanged


# Fragments that turn a text delta into something else, or into bytes read another way.
TWISTS = [
    ',"type":"message_stop"',
    ',"delta":{"type":"input_json_delta","partial_json":"{}"}',
    ',"type":"input_json_delta","partial_json":"x"',
    ',"index":3',
    '"',
    "\\",
    "\\q",
    "\\u12",
    "\\ud800",
    "\\udc00",
    "\\ud83d\\ude00",
    "\\ud83d",
    "\x00",
    "\x1f",
    "\n",
    " ",
    "\ud800",
    "}",
    "{",
    "0",
    "01",
]


@st.composite
def twisted_text_deltas(draw: st.DrawFn) -> str:
    base = orjson.dumps(
        {
            "type": "content_block_delta",
            "index": draw(st.integers(0, 10**10)),
            "delta": {"type": "text_delta", "text": draw(st.text(max_size=20))},
        }
    ).decode()
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(base)))
        base = base[:at] + draw(st.sampled_from(TWISTS)) + base[at:]
    return base


def to_bytes(data: str) -> bytes:
    return data.encode("utf-8", "surrogatepass")  # a lone surrogate becomes ill-formed bytes


fuzz = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@fuzz
@given(st.integers(0, 10**9 - 1), st.text())
def test_every_canonical_text_delta_is_skipped(index: int, value: str) -> None:
    data = text_delta(index, value)
    assert not worth_decoding(data)
    assert not worth_decoding(data.decode())
    assert_skipping_changes_nothing(data)


@fuzz
@given(twisted_text_deltas())
def test_worth_decoding_never_skips_an_event_that_counts(data: str) -> None:
    assert_skipping_changes_nothing(data)
    assert_skipping_changes_nothing(to_bytes(data))


@fuzz
@given(st.binary(max_size=120))
def test_worth_decoding_on_arbitrary_bytes(data: bytes) -> None:
    prefix = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"'
    assert_skipping_changes_nothing(data)
    assert_skipping_changes_nothing(prefix + data + b'"}}')


@pytest.mark.parametrize(
    "data",
    [
        '{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}',
        '{"index":0,"type":"content_block_delta","delta":{"type":"text_delta","text":"x"}}',
        '{"type":"content_block_delta","index":0,"delta":{"text":"x","type":"text_delta"}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"},"type":"message_stop"}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x","type":"input_json_delta"}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"x"}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"x"}}',
        '{"type":"content_block_delta","index":01,"delta":{"type":"text_delta","text":"x"}}',
        '{"type":"content_block_delta","index":1000000000,"delta":{"type":"text_delta","text":"x"}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"b"}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a\\"}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\\\\\\"}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\\\\"b"}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"}}',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}\n',
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}} ',
        '{"type":"content_block_delta","index":,"delta":{"type":"text_delta","text":"x"}}',
        '{"type":"content_block_delta","index":-1,"delta":{"type":"text_delta","text":"x"}}',
        '{"type":"content_block_delta","index":\\u0031,"delta":{"type":"text_delta","text":"x"}}',
        '{"type":"content_block_delta","index":\u0661,"delta":{"type":"text_delta","text":"x"}}',
        '{"type":"ping"} ',
        '{"type":"ping","type":"message_stop"}',
    ],
)
def test_other_spellings_are_decoded(data: str) -> None:
    assert worth_decoding(data)
    assert worth_decoding(data.encode())


@pytest.mark.parametrize(
    "text",
    ["a\\nb", 'say \\"hi\\"', "\\\\", '\\\\\\"', "\\u00e9\\ud83d\\ude00", "\\/", ""],
)
def test_escaped_texts_are_skipped(text: str) -> None:
    data = '{"type":"content_block_delta","index":7,"delta":{"type":"text_delta","text":"%s"}}'
    assert orjson.loads(data % text)["delta"]["type"] == "text_delta"
    assert not worth_decoding(data % text)
    assert not worth_decoding((data % text).encode())


@pytest.mark.parametrize("text", ["a\x00b", "\\q", "\\ud800", "\\u12"])
def test_a_text_that_is_not_valid_json_text_is_skipped_uncounted(text: str) -> None:
    # The documented blind spot: the structure is a text delta, the text inside is broken.
    data = '{"type":"content_block_delta","index":7,"delta":{"type":"text_delta","text":"%s"}}'
    assert not worth_decoding(data % text)
    assert_skipping_changes_nothing(data % text)


# ----------------------------------------------------------- arbitrary JSON (hypothesis)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
field_names = st.sampled_from(
    [
        "type",
        "index",
        "message",
        "content_block",
        "delta",
        "usage",
        "error",
        "id",
        "model",
        "name",
        "input",
        "partial_json",
        "thinking",
        "text",
        "stop_reason",
        "server_name",
        "tool_use_id",
        "is_error",
        "content",
        "error_code",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "service_tier",
    ]
)
type_names = st.sampled_from(
    [
        *sorted(WANTED_EVENTS),
        "ping",
        "message",
        "text",
        "thinking",
        "redacted_thinking",
        "tool_use",
        "server_tool_use",
        "mcp_tool_use",
        "mcp_tool_result",
        "web_search_tool_result",
        "web_search_tool_result_error",
        "input_json_delta",
        "thinking_delta",
        "text_delta",
        "signature_delta",
        "end_turn",
        "max_tokens",
        "refusal",
        "overloaded_error",
    ]
)
shaped = st.recursive(
    json_scalars | type_names | st.integers(0, 4),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(field_names | st.text(max_size=5), children | type_names, max_size=6)
    ),
    max_leaves=40,
)
event_names = st.none() | st.sampled_from(sorted(WANTED_EVENTS)) | st.text(max_size=12)


@fuzz
@given(st.lists(st.tuples(event_names, shaped), max_size=12))
def test_any_json_events_never_raise(events: list[tuple[str | None, Any]]) -> None:
    acc = MessagesAccumulator()
    for name, value in events:
        acc.feed_event(name, orjson.dumps(value))
        acc.feed_event(name, orjson.dumps(value).decode())
    assert_result_sound(acc.result())


@fuzz
@given(type_names, shaped, st.integers(0, 3))
def test_shaped_events_never_raise(type_: str, value: Any, index: int) -> None:
    acc = MessagesAccumulator()
    for payload in (
        {"type": "message_start", "message": value},
        {"type": "message_start", "message": {"id": type_, "usage": value}},
        {"type": "content_block_start", "index": index, "content_block": value},
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": type_, "input": value},
        },
        {
            "type": "content_block_start",
            "index": index + 4,
            "content_block": {
                "type": type_,
                "tool_use_id": type_,
                "is_error": True,
                "content": value,
            },
        },
        {"type": "content_block_delta", "index": index, "delta": value},
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": type_, "partial_json": value},
        },
        {"type": "content_block_stop", "index": index},
        {"type": "message_delta", "delta": value, "usage": value},
        {"type": type_, "error": value},
        {"type": "message_stop"},
    ):
        acc.feed_event(None, orjson.dumps(payload))
    assert_result_sound(acc.result())


@fuzz
@given(shaped)
def test_any_buffered_object_never_raises(value: Any) -> None:
    for body in (
        value,
        {"type": "message", "content": value, "usage": value, "stop_reason": value},
        {"type": "message", "content": [value, {"type": "tool_use", "input": value}]},
        {"type": "error", "error": value},
    ):
        acc = MessagesAccumulator()
        acc.feed_response_object(body)
        assert_result_sound(acc.result())


# A stream built from the protocol's own events, in any order and with any values.
stream_events = st.one_of(
    st.builds(lambda u: message_start(u), st.dictionaries(field_names, json_scalars, max_size=4)),
    st.builds(
        lambda i, t: block_start(i, type=t, id=f"id{i}", name="n", input={}, thinking=""),
        st.integers(0, 4),
        type_names,
    ),
    st.builds(json_delta, st.integers(0, 4), st.text(max_size=8)),
    st.builds(thinking_delta, st.integers(0, 4), st.text(max_size=8)),
    st.builds(text_delta, st.integers(0, 4), st.text(max_size=8)),
    st.builds(stop, st.integers(0, 4)),
    st.builds(
        lambda r, o: message_delta(r, {"output_tokens": o}),
        st.none() | type_names,
        json_scalars,
    ),
    st.just(MESSAGE_STOP),
    st.just(event("ping")),
    st.builds(lambda t: event("error", error={"type": t, "message": "m"}), type_names),
    st.binary(max_size=20),
)


@fuzz
@given(st.lists(stream_events, max_size=25), st.integers(1, 50), st.randoms(use_true_random=False))
def test_protocol_streams_through_the_sse_parser(
    events: list[bytes], step: int, rng: random.Random
) -> None:
    names = [_type_of(e) for e in events]
    raw = b"".join(
        (b"event: " + n.encode() + b"\n" if isinstance(n, str) else b"")
        + b"data: "
        + e.replace(b"\n", b" ").replace(b"\r", b" ")
        + b"\n\n"
        for n, e in zip(names, events, strict=True)
    )
    whole = MessagesAccumulator()
    if _utf8(raw):
        for name, data in split_sse(raw):
            whole.feed_event(name, data)

    parser = SSEParser(max_event_bytes=8 << 20, wanted=WANTED_EVENTS.__contains__)
    teed = MessagesAccumulator()
    at = 0
    while at < len(raw):
        size = rng.randint(1, step)
        feed_like_the_tee(teed, [(e.event, e.data) for e in parser.feed(raw[at : at + size])])
        at += size
    feed_like_the_tee(teed, [(e.event, e.data) for e in parser.close()])
    assert_result_sound(teed.result())
    if _utf8(raw):
        assert teed.result() == whole.result()


def _type_of(data: bytes) -> str | None:
    """The event name a stream would give this data: its type, when it is one of the protocol's."""
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    name = decoded.get("type") if isinstance(decoded, dict) else None
    return name if name in WANTED_EVENTS or name == "ping" else None


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ------------------------------------------- the SSE parser's pass over text deltas (tee)


def framed(data: bytes, name: bytes = b"content_block_delta") -> bytes:
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


@fuzz
@given(twisted_text_deltas())
def test_the_parser_passes_over_only_text_deltas_the_accumulator_drops(data: str) -> None:
    """A guard: every event SKIPPABLE_EVENTS matches is, decoded, a text delta whose text
    orjson reads, and one worth_decoding drops: skipping it in the parser changes nothing
    against skipping it in the accumulator."""
    for raw in (data.encode("utf-8", "surrogatepass"), data.encode("utf-8", "replace")):
        if am.SKIPPABLE_EVENTS.fullmatch(framed(raw)) is None:
            continue
        decoded = orjson.loads(raw.decode("utf-8", "replace"))
        assert decoded["type"] == "content_block_delta"
        assert decoded["delta"]["type"] == "text_delta"
        assert isinstance(decoded["delta"]["text"], str)
        assert not worth_decoding(raw.decode("utf-8", "replace"))


SPELLED = b'{"type":"content_block_delta","index":%s,"delta":{"type":"text_delta","text":"%s"}}'


@pytest.mark.parametrize(
    "event",
    [
        framed(SPELLED % (b"0", b"a\x00b")),  # not JSON text: decoding would count it
        framed(SPELLED % (b"0", b"\\ud800")),
        framed(SPELLED % (b"0", b"\\q")),
        framed(SPELLED % (b"01", b"x")),
        framed(SPELLED % (b"0", b"x"), b"ping"),  # skipped by its name, not this pattern
        b"event: content_block_delta\nid: 3\ndata: " + SPELLED % (b"0", b"x") + b"\n\n",
        b"data: " + SPELLED % (b"0", b"x") + b"\n\n",
    ],
)
def test_the_parser_passes_over_no_other_spelling(event: bytes) -> None:
    assert am.SKIPPABLE_EVENTS.match(event) is None


def through_the_tee(pieces: Iterable[bytes]) -> tuple[MessagesAccumulator, StreamTee]:
    acc = MessagesAccumulator()
    tee = StreamTee(acc, am.API, "")
    for piece in pieces:
        if piece:  # b"" is the end of the stream
            assert tee(piece) is piece
    tee(b"")
    assert tee.parse_error is None
    return acc, tee


@pytest.mark.parametrize("name", STREAMED)
def test_text_deltas_are_passed_over_by_the_parser(name: str) -> None:
    raw = (FIXTURES / f"{name}.response.sse").read_bytes()
    acc, tee = through_the_tee([raw])
    texts = sum(
        1
        for _, data in split_sse(raw)
        if orjson.loads(data).get("delta", {}).get("type") == "text_delta"
    )
    assert tee.parser.skipped_events == texts + raw.count(b"event: ping\n")
    assert asdict(acc.result()) == expected(name)["result"]


hostile_text_deltas = st.builds(
    lambda i, text: framed(text_delta(i, "T").replace(b"T", text.encode("utf-8", "surrogatepass"))),
    st.integers(0, 4),
    st.lists(st.sampled_from(TWISTS), max_size=3).map("".join),
)


@fuzz
@given(
    st.lists(stream_events.map(lambda e: b"E" + e) | hostile_text_deltas, max_size=25),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_the_tee_gives_the_records_of_the_tee_before(events: list[bytes], cuts: list[int]) -> None:
    """A guard: through the tee (text deltas passed over by the parser) the records are
    those of the parser returning every wanted event to the accumulator, as before."""
    frames = []
    for event in events:
        if event.startswith(b"E"):
            data = event[1:].replace(b"\n", b" ").replace(b"\r", b" ")
            name = _type_of(data)
            frames.append(framed(data, name.encode()) if name else b"data: " + data + b"\n\n")
        else:
            frames.append(event)
    raw = b"".join(frames)
    before = MessagesAccumulator()
    parser = SSEParser(max_event_bytes=8 << 20, wanted=WANTED_EVENTS.__contains__)
    for event in parser.feed(raw) + parser.close():
        before.feed_event(event.event, event.data)
    teed, _ = through_the_tee(random_split(raw, cuts))
    assert asdict(teed.result()) == asdict(before.result())


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (501, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_body(status: int, error_type: str) -> None:
    message = 'unknown token "x"\n…'
    body = error_body(status, message)
    assert orjson.loads(body) == {
        "type": "error",
        "error": {"type": error_type, "message": message},
    }
    # What the accumulator makes of it, as of Anthropic's own.
    acc = MessagesAccumulator()
    acc.feed_response_body(body)
    assert (acc.result().status, acc.result().error, acc.result().error_code) == (
        "upstream_error",
        message,
        error_type,
    )


@pytest.mark.parametrize(
    ("status", "body", "text"),
    [
        (
            529,
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            "upstream answered HTTP 529: Overloaded",
        ),
        (
            400,
            {"type": "error", "error": {"type": "invalid_request_error"}},
            "upstream answered HTTP 400: invalid_request_error",
        ),
        (
            400,
            {"type": "error", "error": {"type": "x", "message": ""}},
            "upstream answered HTTP 400: x",
        ),
        (401, {"error": "bad key"}, "upstream answered HTTP 401: bad key"),
        (500, {"type": "error", "error": {"message": 5}}, "upstream answered HTTP 500"),
        (500, {"type": "message"}, "upstream answered HTTP 500"),
        (502, {"message": "flat, not Anthropic's shape"}, "upstream answered HTTP 502"),
        (502, None, "upstream answered HTTP 502"),
        (502, ["error"], "upstream answered HTTP 502"),
        (503, "Service Unavailable", "upstream answered HTTP 503"),
    ],
)
def test_upstream_error_text(status: int, body: Any, text: str) -> None:
    assert upstream_error_text(status, body) == text


@pytest.mark.parametrize("name", BUFFERED)
def test_upstream_error_text_of_the_fixtures(name: str) -> None:
    body = orjson.loads((FIXTURES / f"{name}.response.json").read_bytes())
    status = 529 if "_529_" in name else 400 if "_400_" in name else 200
    if status != 200:
        assert upstream_error_text(status, body) == (
            f"upstream answered HTTP {status}: {expected(name)['result']['error']}"
        )
