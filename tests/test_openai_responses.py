"""Responses extraction (aibridge.apis.openai_responses): golden fixtures, prompts, bad JSON."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tracemalloc
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest import mock

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibridge.apis.openai_responses import (
    API,
    WANTED_EVENTS,
    RequestError,
    ResponseAccumulator,
    correlating_tool_call_id,
    decode_event,
    decode_response_object,
    parse_request,
    prompt_from_input,
    session_id_from_body,
    thought_rows,
    token_usage_row,
    tool_usage_row,
)
from aibridge.transport import tee as tee_module
from aibridge.transport.sse import SSEParser
from tests.test_sse import random_split

FIXTURES = Path(__file__).parent / "fixtures"
SCENARIOS = sorted(p.name.removesuffix(".request.json") for p in FIXTURES.glob("*.request.json"))

# Column names of DESIGN.md §4, less interception_id and created_at.
TOKEN_USAGE_COLUMNS = {
    "response_id",
    "input_tokens",
    "cache_read_input_tokens",
    "cache_write_input_tokens",
    "uncached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "usage",
    "service_tier",
}
TOOL_USAGE_COLUMNS = {
    "response_id",
    "call_id",
    "tool",
    "type",
    "args",
    "injected",
    "server_url",
    "invocation_error",
}
THOUGHT_COLUMNS = {"response_id", "source", "content"}


def split_sse(raw: bytes) -> list[tuple[str | None, str]]:
    """A minimal SSE splitter for the fixtures (the real one is aibridge.transport.sse).

    Events end at a blank line; multi-line data joins with newlines; comments are
    skipped; an event not ended by a blank line when the stream stops is dropped.
    """
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    lines.pop()  # the text after the last newline is an unfinished line
    events: list[tuple[str | None, str]] = []
    name: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                events.append((name, "\n".join(data)))
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return events


def feed_like_the_tee(acc: ResponseAccumulator, events: list[tuple[str | None, str]]) -> None:
    for name, data in events:
        if name is None or name in WANTED_EVENTS:
            acc.feed_event(name, data)


def feed_fixture(
    acc: Any, folder: Path, name: str, feed_like_the_tee: Any, every_event: bool
) -> None:
    """Feed a golden response to an accumulator: its stream as the tee would (or every
    event, with `every_event`), else its buffered body."""
    sse = folder / f"{name}.response.sse"
    if sse.exists():
        events = split_sse(sse.read_bytes())
        if every_event:
            for event_name, data in events:
                acc.feed_event(event_name, data)
        else:
            feed_like_the_tee(acc, events)
    else:
        acc.feed_response_body((folder / f"{name}.response.json").read_bytes())


def accumulate(name: str, *, every_event: bool = False) -> ResponseAccumulator:
    acc = ResponseAccumulator()
    feed_fixture(acc, FIXTURES, name, feed_like_the_tee, every_event)
    return acc


def assert_rows_storable(result: dict[str, Any]) -> None:
    """Every row has exactly the schema's columns and can be written as JSON."""
    if result["token_usage"] is not None:
        assert set(result["token_usage"]) == TOKEN_USAGE_COLUMNS
    for row in result["tool_usages"]:
        assert set(row) == TOOL_USAGE_COLUMNS
    for row in result["thoughts"]:
        assert set(row) == THOUGHT_COLUMNS
    orjson.dumps(result)


# ------------------------------------------------------------------ golden fixtures


def test_fixtures_are_complete() -> None:
    assert len(SCENARIOS) >= 15
    for name in SCENARIOS:
        assert (FIXTURES / f"{name}.expected.json").exists(), name
        streamed = (FIXTURES / f"{name}.response.sse").exists()
        buffered = (FIXTURES / f"{name}.response.json").exists()
        assert streamed != buffered, name


@pytest.mark.parametrize("name", SCENARIOS)
def test_fixture(name: str) -> None:
    expected = orjson.loads((FIXTURES / f"{name}.expected.json").read_bytes())
    body, info = parse_request((FIXTURES / f"{name}.request.json").read_bytes())
    assert isinstance(body, dict)
    assert asdict(info) == expected["request"]
    assert info.stream == (FIXTURES / f"{name}.response.sse").exists()

    result = asdict(accumulate(name).result())
    assert result == expected["result"]
    assert_rows_storable(result)


@pytest.mark.parametrize(
    "name", [n for n in SCENARIOS if (FIXTURES / f"{n}.response.sse").exists()]
)
def test_fixture_same_result_when_every_event_is_fed(name: str) -> None:
    # The tee skips events it does not need; feeding them anyway must change nothing.
    assert accumulate(name, every_event=True).result() == accumulate(name).result()


@pytest.mark.parametrize(
    "name", [n for n in SCENARIOS if (FIXTURES / f"{n}.response.sse").exists()]
)
def test_fixture_through_the_bridge_sse_parser(name: str) -> None:
    # The same records when the bridge's own parser splits the stream, in awkward chunks.
    sse = pytest.importorskip("aibridge.transport.sse")
    raw = (FIXTURES / f"{name}.response.sse").read_bytes()
    parser = sse.SSEParser()
    events = []
    for start in range(0, len(raw), 7):
        events.extend(parser.feed(raw[start : start + 7]))
    events.extend(parser.close())
    acc = ResponseAccumulator()
    feed_like_the_tee(acc, [(e.event, e.data) for e in events])
    expected = orjson.loads((FIXTURES / f"{name}.expected.json").read_bytes())
    assert asdict(acc.result()) == expected["result"]


def test_split_sse_handles_line_endings_comments_and_multiline_data() -> None:
    raw = b': keep-alive\r\nevent: a\r\ndata: {"x":\r\ndata: 1}\r\n\r\ndata: 2\r\r'
    assert split_sse(raw) == [("a", '{"x":\n1}'), (None, "2")]


# ------------------------------------------------------------------ request parsing


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty request body"),
        (b"  \r\n\t", "empty request body"),
        (b"{", "not valid JSON"),
        (b"{'model': 'gpt-5'}", "not valid JSON"),
        (b'{"model": "gpt-5"} trailing', "not valid JSON"),
        (b'{"input": "\xff\xfe"}', "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'"hello"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b'{"model": 5}', "'model' must be a string"),
        (b'{"model": ["gpt-5"]}', "'model' must be a string"),
        (b'{"model": true}', "'model' must be a string"),
        (b'{"input": 5}', "'input' must be a string or an array"),
        (b'{"input": {"role": "user"}}', "'input' must be a string or an array"),
        (b'{"input": false}', "'input' must be a string or an array"),
        (b'{"stream": "true"}', "'stream' must be a boolean"),
        (b'{"stream": 1}', "'stream' must be a boolean"),
        (b'{"background": "yes"}', "'background' must be a boolean"),
        (b'{"previous_response_id": 7}', "'previous_response_id' must be a string"),
    ],
)
def test_parse_request_rejects(body: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(body)


def test_request_error_is_a_value_error() -> None:
    assert issubclass(RequestError, ValueError)


def test_parse_request_null_and_missing_fields_are_defaults() -> None:
    body, info = parse_request(b'{"model": null, "input": null, "stream": null}')
    assert body == {"model": None, "input": None, "stream": None}
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


def test_parse_request_reads_background_and_previous_response_id() -> None:
    _, info = parse_request(
        b'{"model": "gpt-5", "input": "hi", "background": true, "stream": false,'
        b' "previous_response_id": "resp_1"}'
    )
    assert info.background is True
    assert info.stream is False
    assert info.previous_response_id == "resp_1"


def test_parse_request_leaves_other_fields_to_upstream() -> None:
    body, info = parse_request(
        b'{"model": "m", "input": [1, "two", null], "tools": "nonsense", "metadata": 3}'
    )
    assert body["tools"] == "nonsense"
    assert info.prompt is None
    assert info.correlating_tool_call_id is None


# ------------------------------------------------------------------------ prompt rule


def user(content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, **extra}


@pytest.mark.parametrize(
    ("input_value", "prompt"),
    [
        ("Write a poem", "Write a poem"),
        ("", ""),
        (None, None),
        ([], None),
        ({"role": "user", "content": "not a list"}, None),
        ([user("hi")], "hi"),
        ([user("hi", type="message")], "hi"),
        ([user("first"), user("second")], "second"),
        ([user("")], ""),
        (
            [
                user(
                    [
                        {"type": "input_text", "text": "look at"},
                        {"type": "input_image", "image_url": "https://example.com/a.png"},
                        {"type": "input_file", "file_id": "file-1"},
                        {"type": "input_text", "text": "this"},
                    ]
                )
            ],
            "look at\nthis",
        ),
        ([user([{"type": "input_image", "file_id": "file-1"}])], None),
        ([user([])], None),
        (
            [
                user(
                    [
                        "loose string",
                        None,
                        {"type": "input_text"},
                        {"type": "input_text", "text": 5},
                        {"type": "text", "text": "not a Responses part"},
                        {"type": "input_text", "text": "kept"},
                    ]
                )
            ],
            "kept",
        ),
        ([user(None)], None),
        ([user(42)], None),
        ([user({"type": "input_text", "text": "x"})], None),
        ([user("question"), {"role": "assistant", "content": "answer"}], None),
        ([{"role": "developer", "content": "be brief"}], None),
        ([{"role": "system", "content": "be brief"}], None),
        ([{"content": "no role"}], None),
        ([user("q"), {"type": "function_call_output", "call_id": "c", "output": "ok"}], None),
        ([user("q"), {"type": "reasoning", "summary": []}], None),
        ([user("q"), "a string item"], None),
        ([user("q"), None], None),
    ],
)
def test_prompt_rule(input_value: Any, prompt: str | None) -> None:
    assert prompt_from_input(input_value) == prompt


def test_prompt_of_a_codex_first_turn_is_the_last_user_message() -> None:
    codex_input = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "x"}]},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "<environment_context>...</environment_context>"}
            ],
        },
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Add a --verbose flag"}],
        },
    ]
    assert prompt_from_input(codex_input) == "Add a --verbose flag"


@pytest.mark.parametrize(
    ("input_value", "call_id"),
    [
        ([{"type": "function_call_output", "call_id": "call_1", "output": "ok"}], "call_1"),
        ([{"type": "custom_tool_call_output", "call_id": "call_2", "output": "ok"}], "call_2"),
        (
            [
                {"type": "function_call_output", "call_id": "call_1", "output": "a"},
                {"type": "function_call_output", "call_id": "call_3", "output": "b"},
            ],
            "call_3",
        ),
        (
            [{"type": "function_call_output", "call_id": "call_1", "output": "a"}, user("next")],
            None,
        ),
        ([{"type": "local_shell_call_output", "id": "lsh_1", "output": "{}"}], None),
        ([{"type": "computer_call_output", "call_id": "call_9", "output": {}}], None),
        ([{"type": "function_call_output", "call_id": 12, "output": "ok"}], None),
        ([{"type": "function_call_output", "call_id": "", "output": "ok"}], None),
        ([{"type": "function_call_output", "output": "ok"}], None),
        ("a string input", None),
        ([], None),
        (None, None),
        ([["nested"]], None),
    ],
)
def test_correlating_tool_call_id(input_value: Any, call_id: str | None) -> None:
    assert correlating_tool_call_id(input_value) == call_id


@pytest.mark.parametrize(
    ("body", "session_id"),
    [
        ({"client_metadata": {"session_id": "s-client"}}, "s-client"),
        ({"metadata": {"session_id": "s-meta"}}, "s-meta"),
        (
            {"client_metadata": {"session_id": "s-client"}, "metadata": {"session_id": "s-meta"}},
            "s-client",
        ),
        ({"client_metadata": {"session_id": 5}, "metadata": {"session_id": "s-meta"}}, "s-meta"),
        (
            {"client_metadata": {"x-codex-turn-metadata": '{"session_id":"s-turn","turn_id":"t"}'}},
            "s-turn",
        ),
        ({"client_metadata": {"x-codex-turn-metadata": "{not json"}}, None),
        ({"client_metadata": {"x-codex-turn-metadata": '["session_id"]'}}, None),
        ({"client_metadata": {"x-codex-turn-metadata": '{"session_id": 3}'}}, None),
        ({"client_metadata": {"session_id": ""}}, None),
        ({"client_metadata": "session_id", "metadata": ["session_id"]}, None),
        ({"prompt_cache_key": "0199a6e2-5c1f-7d43-9b2a-3f6e8d1c4b57"}, None),
        ({}, None),
    ],
)
def test_session_id_from_body(body: dict[str, Any], session_id: str | None) -> None:
    assert session_id_from_body(body) == session_id


# ------------------------------------------------------------------------ token usage


def usage_row(usage: Any) -> dict[str, Any] | None:
    row = token_usage_row(usage)
    if row is not None:
        assert row["usage"] is usage or row["usage"] is None
        del row["usage"]
    return row


def counts(
    input_tokens: int | None = None,
    cache_read: int | None = None,
    cache_write: int | None = None,
    uncached: int | None = None,
    output: int | None = None,
    reasoning: int | None = None,
    total: int | None = None,
) -> dict[str, int | None]:
    return {
        "input_tokens": input_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_write_input_tokens": cache_write,
        "uncached_input_tokens": uncached,
        "output_tokens": output,
        "reasoning_tokens": reasoning,
        "total_tokens": total,
    }


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, None),
        ("12 tokens", None),
        ([1, 2], None),
        ({}, counts()),
        (
            {
                "input_tokens": 100,
                "input_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 30},
                "output_tokens": 50,
                "output_tokens_details": {"reasoning_tokens": 20},
                "total_tokens": 150,
            },
            counts(100, 60, 30, 10, 50, 20, 150),
        ),
        ({"input_tokens": 100}, counts(100, uncached=100)),
        (
            {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 25}},
            counts(10, 25, None, 0),
        ),
        (
            {"input_tokens": "100", "output_tokens": -5, "total_tokens": True},
            counts(),
        ),
        ({"input_tokens": False, "output_tokens": None}, counts()),
        ({"input_tokens": 12.0, "output_tokens": 3.5}, counts(12, uncached=12)),
        ({"input_tokens": float("inf")}, counts()),
        ({"input_tokens": 2**63, "output_tokens": 2**63 - 1}, counts(output=2**63 - 1)),
        ({"input_tokens": 1.8446744073709552e19}, counts()),
        (
            {"input_tokens": 7, "input_tokens_details": "cached", "output_tokens_details": [4]},
            counts(7, uncached=7),
        ),
        (
            {
                "input_tokens": 7,
                "input_tokens_details": {"cached_tokens": "3", "cache_write_tokens": -1},
                "output_tokens_details": {"reasoning_tokens": {"n": 1}},
            },
            counts(7, uncached=7),
        ),
    ],
)
def test_token_usage_tolerates_any_shape(usage: Any, expected: dict[str, Any] | None) -> None:
    assert usage_row(usage) == expected


def test_token_usage_keeps_the_raw_usage_and_its_unknown_fields() -> None:
    usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3, "new_field": {"a": [1]}}
    row = token_usage_row(usage)
    assert row is not None
    assert row["usage"] == usage


def test_token_usage_drops_raw_usage_nested_too_deep_to_write() -> None:
    deep: Any = 1
    for _ in range(400):
        deep = [deep]
    row = token_usage_row({"input_tokens": 5, "extra": deep})
    assert row is not None
    assert row["input_tokens"] == 5
    assert row["usage"] is None


# ------------------------------------------------------------------------ tool usages


def call_row(item: dict[str, Any]) -> dict[str, Any] | None:
    return tool_usage_row(item)


@pytest.mark.parametrize(
    ("arguments", "args"),
    [
        ('{"a": 1}', {"a": 1}),
        ('  {"a": 1}\n', {"a": 1}),
        ("[1, 2]", [1, 2]),
        ("42", 42),
        ("not json {", "not json {"),
        ('{"a": 1', '{"a": 1'),
        ("", ""),
        ("   ", "   "),
        ({"already": "structured"}, {"already": "structured"}),
        (None, None),
        (17, 17),
    ],
)
def test_function_call_args(arguments: Any, args: Any) -> None:
    row = call_row({"type": "function_call", "name": "f", "call_id": "c1", "arguments": arguments})
    assert row is not None
    assert row["args"] == args


def test_function_call_args_too_deep_to_write_stay_raw() -> None:
    raw = "[" * 300 + "]" * 300
    row = call_row({"type": "function_call", "name": "f", "call_id": "c", "arguments": raw})
    assert row is not None
    assert row["args"] == raw
    orjson.dumps(row)


def test_call_identity_fallbacks() -> None:
    assert call_row({"type": "function_call", "call_id": "c1", "id": "fc_1", "name": "f"}) == {
        "call_id": "c1",
        "tool": "f",
        "type": "function_call",
        "args": None,
        "injected": False,
        "server_url": None,
        "invocation_error": None,
    }
    row = call_row({"type": "web_search_call", "id": "ws_1", "name": 5, "call_id": None})
    assert row is not None
    assert (row["call_id"], row["tool"]) == ("ws_1", "web_search_call")
    row = call_row({"type": "function_call", "id": ["x"], "call_id": "", "name": ""})
    assert row is not None
    assert (row["call_id"], row["tool"]) == (None, "function_call")


@pytest.mark.parametrize(
    "item",
    [
        {"type": "function_call_output", "call_id": "c", "output": "x"},
        {"type": "custom_tool_call_output", "call_id": "c", "output": "x"},
        {"type": "mcp_list_tools", "server_label": "s", "tools": []},
        {"type": "mcp_approval_request", "id": "a", "name": "t", "arguments": "{}"},
        {"type": "message", "role": "assistant", "content": []},
        {"type": "reasoning", "summary": []},
        {"type": 7},
        {"name": "no type"},
        {},
    ],
)
def test_items_that_are_not_calls(item: dict[str, Any]) -> None:
    assert call_row(item) is None


def test_custom_tool_call_args_are_the_raw_input() -> None:
    row = call_row(
        {"type": "custom_tool_call", "name": "apply_patch", "call_id": "c", "input": '{"x"'}
    )
    assert row is not None
    assert row["args"] == '{"x"'


@pytest.mark.parametrize(
    ("error", "text"),
    [
        ("tool exploded", "tool exploded"),
        (
            {"type": "mcp_protocol_error", "code": -32600, "message": "Invalid request"},
            "Invalid request",
        ),
        (
            {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": "boom"}]},
            '{"type":"mcp_tool_execution_error","content":[{"type":"text","text":"boom"}]}',
        ),
        (None, None),
        ("", None),
        ({}, None),
        ([], None),
        (False, None),
        (500, "500"),
    ],
)
def test_mcp_call_error_and_server(error: Any, text: str | None) -> None:
    row = call_row(
        {
            "type": "mcp_call",
            "id": "mcp_1",
            "name": "ask",
            "server_label": "deepwiki",
            "arguments": '{"q": "?"}',
            "error": error,
        }
    )
    assert row is not None
    assert row["server_url"] == "deepwiki"
    assert row["args"] == {"q": "?"}
    assert row["invocation_error"] == text


def test_unknown_call_types_are_recorded_with_their_fields() -> None:
    row = call_row(
        {
            "type": "browser_call",
            "id": "br_1",
            "status": "completed",
            "target": "https://example.com",
            "steps": [1, 2],
            "result": "a large result left out",
            "encrypted_content": "opaque",
        }
    )
    assert row is not None
    assert row["tool"] == "browser_call"
    assert row["args"] == {"target": "https://example.com", "steps": [1, 2]}
    future_with_args = {"type": "x_call", "id": "x1", "arguments": '{"k": 1}'}
    assert call_row(future_with_args)["args"] == {"k": 1}  # type: ignore[index]
    future_with_input = {"type": "y_call", "id": "y1", "input": "raw"}
    assert call_row(future_with_input)["args"] == "raw"  # type: ignore[index]
    assert call_row({"type": "z_call", "id": "z1", "status": "completed"})["args"] is None  # type: ignore[index]


def test_builtin_call_fields_of_the_wrong_type_are_kept_as_given() -> None:
    row = call_row({"type": "web_search_call", "id": "ws", "action": "search: cats"})
    assert row is not None
    assert row["args"] == {"action": "search: cats"}
    deep: Any = "x"
    for _ in range(300):
        deep = {"d": deep}
    row = call_row({"type": "web_search_call", "id": "ws", "action": deep})
    assert row is not None
    assert row["args"] is None


# --------------------------------------------------------------------------- thoughts


@pytest.mark.parametrize(
    ("item", "thoughts"),
    [
        (
            {
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "a"}, {"text": "b"}],
            },
            [("reasoning_summary", "a"), ("reasoning_summary", "b")],
        ),
        (
            {
                "type": "reasoning",
                "summary": [{"text": ""}, {"text": "  \n"}, {"text": None}, "x", 3],
            },
            [],
        ),
        ({"type": "reasoning", "summary": "a summary as a string"}, []),
        (
            {
                "type": "reasoning",
                "summary": None,
                "content": [{"type": "reasoning_text", "text": "raw"}],
            },
            [],
        ),
        (
            {
                "type": "message",
                "role": "assistant",
                "phase": "commentary",
                "content": [
                    {"type": "output_text", "text": "one"},
                    {"type": "refusal", "refusal": "no"},
                    {"type": "output_text", "text": ""},
                    {"type": "output_text", "text": "two"},
                ],
            },
            [("commentary", "one"), ("commentary", "two")],
        ),
        (
            {
                "type": "message",
                "phase": "commentary",
                "content": [{"type": "output_text", "text": "t"}],
            },
            [("commentary", "t")],
        ),
        (
            {"type": "message", "role": "assistant", "phase": "commentary", "content": "plain"},
            [("commentary", "plain")],
        ),
        (
            {
                "type": "message",
                "role": "assistant",
                "phase": "final_answer",
                "content": [{"type": "output_text", "text": "t"}],
            },
            [],
        ),
        (
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "t"}],
            },
            [],
        ),
        (
            {
                "type": "message",
                "role": "user",
                "phase": "commentary",
                "content": [{"type": "output_text", "text": "t"}],
            },
            [],
        ),
        (
            {
                "type": "message",
                "role": "assistant",
                "phase": "commentary",
                "content": {"text": "t"},
            },
            [],
        ),
        ({"type": "function_call", "name": "f"}, []),
    ],
)
def test_thought_rows(item: dict[str, Any], thoughts: list[tuple[str, str]]) -> None:
    assert [(r["source"], r["content"]) for r in thought_rows(item)] == thoughts


# ----------------------------------------------------------------- the accumulator


def event(type_: str, **fields: Any) -> str:
    return orjson.dumps({"type": type_, **fields}).decode()


def completed(**response: Any) -> str:
    return event("response.completed", response={"id": "resp_1", "status": "completed", **response})


def test_wanted_events() -> None:
    assert {
        "response.created",
        "response.in_progress",
        "response.output_item.done",
        "response.completed",
        "response.incomplete",
        "response.failed",
        "error",
    } <= WANTED_EVENTS
    for skipped in (
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
        "response.output_item.added",
        "response.content_part.added",
    ):
        assert skipped not in WANTED_EVENTS


def test_nothing_fed() -> None:
    assert asdict(ResponseAccumulator().result()) == {
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


@pytest.mark.parametrize("data", ["[DONE]", b"[DONE]", "", b""])
def test_done_marker_and_empty_data_are_ignored(data: str | bytes) -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, data)
    assert acc.malformed_events == 0


@pytest.mark.parametrize(
    "data",
    [
        "{",
        "not json",
        '{"type": "response.completed", "response": ',
        "[1, 2]",
        '"a string"',
        "null",
        "3.5",
        "[" * 2000 + "]" * 2000,
        b"\xff\xfe{}",
        '{"no_type": true}',
    ],
)
def test_malformed_events_are_counted(data: str | bytes) -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, data)
    assert acc.malformed_events == 1
    assert acc.result().malformed_events == 1


def test_event_name_stands_in_for_a_missing_type() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(
        "response.completed", orjson.dumps({"response": {"id": "resp_9", "status": "completed"}})
    )
    result = acc.result()
    assert (result.response_id, result.status, result.malformed_events) == (
        "resp_9",
        "completed",
        0,
    )


def test_data_type_wins_over_the_event_name() -> None:
    acc = ResponseAccumulator()
    acc.feed_event("response.output_text.delta", completed())
    assert acc.terminal == "response.completed"


def test_first_response_id_and_last_model() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, event("response.created", response={"id": "resp_first", "model": "m-1"}))
    acc.feed_event(None, event("response.in_progress", response={"id": "resp_other", "model": 5}))
    acc.feed_event(None, completed(id="resp_last", model="m-2"))
    result = acc.result()
    assert (result.response_id, result.response_model) == ("resp_first", "m-2")


def test_first_terminal_event_wins() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, completed(usage={"input_tokens": 1}))
    acc.feed_event(
        None, event("response.failed", response={"id": "resp_2", "error": {"message": "x"}})
    )
    result = acc.result()
    assert (result.status, result.error, result.terminal_seen) == ("completed", None, True)
    assert result.token_usage is not None
    assert result.token_usage["input_tokens"] == 1


@pytest.mark.parametrize("response", [None, "resp_1", [], 5])
def test_terminal_event_without_a_response_object(response: Any) -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, event("response.incomplete", response=response))
    result = acc.result()
    assert (result.status, result.terminal_seen, result.malformed_events) == ("incomplete", True, 1)
    assert result.token_usage is None


@pytest.mark.parametrize("item", [None, "x", [1], 3])
def test_output_item_done_without_an_item_object(item: Any) -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, event("response.output_item.done", item=item))
    assert acc.malformed_events == 1


def test_error_event_shapes() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(
        None,
        event("error", error={"type": "server_error", "code": "server_error", "message": "boom"}),
    )
    acc.feed_event(None, event("error", message="a second error is not kept"))
    result = acc.result()
    assert (result.status, result.error, result.error_code) == ("error", "boom", "server_error")
    assert result.terminal_seen

    acc = ResponseAccumulator()
    acc.feed_event("error", orjson.dumps({"code": 429}))
    result = acc.result()
    assert (result.status, result.error, result.error_code) == ("error", "429", "429")

    acc = ResponseAccumulator()
    acc.feed_event(None, event("error", message=["x"], code=True))
    result = acc.result()
    assert (result.status, result.error, result.error_code) == ("error", None, None)


def test_error_event_then_response_failed() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, event("error", code="e1", message="first"))
    acc.feed_event(
        None,
        event(
            "response.failed",
            response={"id": "r", "error": {"code": "server_error", "message": "second"}},
        ),
    )
    result = acc.result()
    assert (result.status, result.error, result.error_code) == ("failed", "second", "server_error")

    acc = ResponseAccumulator()
    acc.feed_event(None, event("error", code="e1", message="first"))
    acc.feed_event(None, event("response.failed", response={"id": "r", "error": None}))
    result = acc.result()
    assert (result.status, result.error, result.error_code) == ("failed", "first", "e1")


def test_error_event_message_survives_a_later_completion() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, event("error", message="transient hiccup"))
    acc.feed_event(None, completed())
    result = acc.result()
    assert (result.status, result.error) == ("completed", "transient hiccup")


def test_terminal_output_is_preferred_over_done_items() -> None:
    acc = ResponseAccumulator()
    done = {"type": "function_call", "call_id": "c_done", "name": "early", "arguments": "{}"}
    final = {"type": "function_call", "call_id": "c_final", "name": "final", "arguments": "{}"}
    acc.feed_event(None, event("response.output_item.done", item=done))
    acc.feed_event(None, completed(output=[final, "junk", None]))
    assert [row["call_id"] for row in acc.result().tool_usages] == ["c_final"]


def test_done_items_are_used_when_no_terminal_event_arrives() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, event("response.created", response={"id": "resp_cut"}))
    acc.feed_event(
        None,
        event(
            "response.output_item.done",
            item={"type": "custom_tool_call", "call_id": "c", "name": "p", "input": "x"},
        ),
    )
    acc.feed_event(
        None,
        event(
            "response.output_item.done", item={"type": "reasoning", "summary": [{"text": "why"}]}
        ),
    )
    result = acc.result()
    assert (result.status, result.terminal_seen, result.token_usage) == (None, False, None)
    assert [(r["response_id"], r["call_id"]) for r in result.tool_usages] == [("resp_cut", "c")]
    assert [(r["response_id"], r["content"]) for r in result.thoughts] == [("resp_cut", "why")]


def test_incomplete_reason_is_the_error() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(
        None,
        event(
            "response.incomplete",
            response={"id": "r", "incomplete_details": {"reason": "content_filter"}},
        ),
    )
    assert (acc.result().status, acc.result().error) == ("incomplete", "content_filter")


def test_failed_with_error_as_a_string() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(
        None, event("response.failed", response={"id": "r", "error": "plain text error"})
    )
    assert (acc.result().status, acc.result().error) == ("failed", "plain text error")


@pytest.mark.parametrize(
    ("body", "status", "terminal"),
    [
        ({"id": "r", "status": "completed", "output": []}, "completed", "response.completed"),
        ({"id": "r", "status": "incomplete", "output": []}, "incomplete", "response.incomplete"),
        (
            {"id": "r", "status": "failed", "output": [], "error": {"message": "m"}},
            "failed",
            "response.failed",
        ),
        ({"id": "r", "status": "in_progress", "output": []}, None, None),
        ({"id": "r", "status": "cancelled", "output": []}, None, None),
        ({"id": "r", "output": []}, None, None),
        ({"id": "r", "status": 3}, None, None),
    ],
)
def test_buffered_statuses(body: dict[str, Any], status: str | None, terminal: str | None) -> None:
    acc = ResponseAccumulator()
    acc.feed_response_object(body)
    result = acc.result()
    assert (result.response_id, result.status, acc.terminal) == ("r", status, terminal)
    assert result.terminal_seen == (status is not None)


def test_buffered_response_without_status_still_yields_records() -> None:
    acc = ResponseAccumulator()
    acc.feed_response_object(
        {
            "id": "r",
            "output": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}],
            "usage": {"input_tokens": 3, "output_tokens": 1},
        }
    )
    result = acc.result()
    assert [row["call_id"] for row in result.tool_usages] == ["c"]
    assert result.token_usage is not None
    assert result.token_usage["input_tokens"] == 3


@pytest.mark.parametrize("obj", [None, [], "text", 5, True])
def test_buffered_body_that_is_not_an_object(obj: Any) -> None:
    acc = ResponseAccumulator()
    acc.feed_response_object(obj)
    assert acc.result().malformed_events == 1
    assert acc.result().status is None


@pytest.mark.parametrize("body", [b"", b"<html>502 Bad Gateway</html>", b"{", b"\xff"])
def test_buffered_body_that_is_not_json(body: bytes) -> None:
    acc = ResponseAccumulator()
    acc.feed_response_body(body)
    assert acc.result().malformed_events == 1


def test_result_can_be_taken_twice_and_rows_are_fresh() -> None:
    acc = ResponseAccumulator()
    acc.feed_event(None, completed(output=[{"type": "function_call", "call_id": "c", "name": "f"}]))
    first = acc.result()
    first.tool_usages[0]["tool"] = "changed"
    assert acc.result().tool_usages[0]["tool"] == "f"


def test_memory_does_not_keep_the_streamed_text() -> None:
    big = "x" * 2_000_000
    message = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": big}],
    }
    reasoning = {"type": "reasoning", "summary": [], "encrypted_content": big}
    acc = ResponseAccumulator()
    tracemalloc.start()
    try:
        for _ in range(3):
            acc.feed_event(None, event("response.output_text.delta", delta=big))
            acc.feed_event(None, event("response.output_item.done", item=message))
            acc.feed_event(None, event("response.output_item.done", item=reasoning))
        acc.feed_event(None, completed(output=[message, reasoning] * 3, usage={"input_tokens": 1}))
        retained, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 200_000
    assert acc.result().status == "completed"


def test_extract_does_not_import_mitmproxy() -> None:
    code = "import sys, aibridge.apis.openai_responses; sys.exit('mitmproxy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ----------------------------------------------------------- arbitrary JSON (hypothesis)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
# Keys the extraction looks at, so the generated objects reach the interesting branches.
field_names = st.sampled_from(
    [
        "id",
        "type",
        "model",
        "status",
        "output",
        "usage",
        "error",
        "message",
        "code",
        "item",
        "response",
        "summary",
        "content",
        "text",
        "phase",
        "role",
        "name",
        "call_id",
        "arguments",
        "input",
        "action",
        "server_label",
        "incomplete_details",
        "input_tokens",
        "input_tokens_details",
        "cached_tokens",
        "output_tokens_details",
        "session_id",
        "client_metadata",
        "metadata",
        "stream",
        "background",
        "previous_response_id",
    ]
)
type_names = st.sampled_from(
    [
        *sorted(WANTED_EVENTS),
        "response.output_text.delta",
        "message",
        "reasoning",
        "function_call",
        "custom_tool_call",
        "mcp_call",
        "web_search_call",
        "image_generation_call",
        "future_call",
        "function_call_output",
        "output_text",
        "summary_text",
        "input_text",
        "user",
        "assistant",
        "commentary",
        "completed",
        "incomplete",
        "failed",
    ]
)
shaped = st.recursive(
    json_scalars | type_names,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(field_names | st.text(max_size=5), children | type_names, max_size=6)
    ),
    max_leaves=40,
)
event_names = st.none() | st.sampled_from(sorted(WANTED_EVENTS)) | st.text(max_size=20)
fuzz = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def assert_result_sound(acc: ResponseAccumulator) -> None:
    result = asdict(acc.result())
    assert_rows_storable(result)
    assert result["terminal_seen"] == (result["status"] is not None)
    assert result["status"] in (None, "completed", "incomplete", "failed", "error")


@fuzz
@given(st.lists(st.tuples(event_names, json_values | shaped), max_size=8))
def test_any_json_events_never_raise(events: list[tuple[str | None, Any]]) -> None:
    acc = ResponseAccumulator()
    for name, value in events:
        acc.feed_event(name, orjson.dumps(value))
        acc.feed_event(name, orjson.dumps(value).decode())
    assert_result_sound(acc)


@fuzz
@given(type_names, shaped)
def test_shaped_events_never_raise(type_: str, value: Any) -> None:
    acc = ResponseAccumulator()
    for payload in (
        {"type": type_, "response": value},
        {"type": type_, "item": value},
        {
            "type": "response.output_item.done",
            "item": {"type": type_, "summary": value, "content": value},
        },
        {
            "type": "response.completed",
            "response": {"id": type_, "output": [value], "usage": value},
        },
        {"type": "response.failed", "response": {"error": value, "incomplete_details": value}},
        {"type": "error", "error": value, "code": value},
    ):
        acc.feed_event(None, orjson.dumps(payload))
    assert_result_sound(acc)


@fuzz
@given(json_values | shaped)
def test_any_buffered_object_never_raises(value: Any) -> None:
    acc = ResponseAccumulator()
    acc.feed_response_object(value)
    acc.feed_response_object({"status": "completed", "output": value, "usage": value})
    assert_result_sound(acc)


@fuzz
@given(shaped, shaped)
def test_row_functions_never_raise(item: Any, usage: Any) -> None:
    if isinstance(item, dict):
        for row in (tool_usage_row({**item, "type": "thing_call"}), tool_usage_row(item)):
            orjson.dumps(row)
        orjson.dumps(thought_rows(item))
    orjson.dumps(token_usage_row(usage))


@fuzz
@given(json_values | shaped)
def test_any_request_json_parses_or_raises_request_error(value: Any) -> None:
    for body in (value, {"model": "m", "input": value}, {"input": [value, value]}):
        try:
            _, info = parse_request(orjson.dumps(body))
        except RequestError:
            continue
        assert info.prompt is None or isinstance(info.prompt, str)
        assert info.session_id is None or isinstance(info.session_id, str)


@fuzz
@given(st.binary(max_size=200))
def test_any_bytes(body: bytes) -> None:
    with contextlib.suppress(RequestError):
        parse_request(body)
    acc = ResponseAccumulator()
    acc.feed_event(None, body)
    acc.feed_response_body(body)
    assert_result_sound(acc)


# ---------------------------------------------------------- through the stream tee

# Every event of the streamed fixtures, as sent, and as a data-only event (no name).
FIXTURE_EVENTS = [
    block + b"\n\n"
    for path in sorted(FIXTURES.glob("*.response.sse"))
    for block in path.read_bytes().replace(b"\r\n", b"\n").split(b"\n\n")
    if block.strip()
]
UNNAMED_EVENTS = [
    b"\n".join(line for line in event.split(b"\n") if not line.startswith(b"event:"))
    for event in FIXTURE_EVENTS
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(FIXTURE_EVENTS + UNNAMED_EVENTS), max_size=30),
    st.lists(st.integers(0, 100_000), max_size=8),
    st.sampled_from([1, 300, 1 << 16]),
)
def test_the_tee_gives_the_records_of_the_parser_returning_events(
    events: list[bytes], cuts: list[int], batch: int
) -> None:
    """A guard: the tee (events handed to the accumulator as they are parsed, data-only
    ones by the parser's fast path, deltas passed over in runs) records what feeding the
    wanted events of the parser's returned list gives."""
    raw = b"".join(events)
    parser = SSEParser(max_event_bytes=tee_module.MAX_EVENT_BYTES)
    before = ResponseAccumulator()
    feed_like_the_tee(before, [(e.event, e.data) for e in parser.feed(raw) + parser.close()])
    teed = ResponseAccumulator()
    with mock.patch.object(tee_module, "PARSE_BATCH_BYTES", batch):
        tee = tee_module.StreamTee(teed, API, "")
        for piece in filter(None, random_split(raw, cuts)):  # b"" ends the stream
            assert tee(piece) is piece
        tee(b"")
    assert tee.parse_error is None
    assert asdict(teed.result()) == asdict(before.result())


# ------------------------------------------------- lean decoding (msgspec) against orjson

READ_RESPONSE_FIELDS = (
    "id",
    "model",
    "status",
    "output",
    "error",
    "incomplete_details",
    "usage",
    "service_tier",
)
READ_EVENT_FIELDS = ("type", "response", "response_id", "item", "message", "code", "error")


def read_parts(data: bytes, fields: tuple[str, ...]) -> bytes:
    """`data` cut, by msgspec's split of its top level, to the fields the records read (an
    event's ``response`` cut too): what orjson must accept for the lean reading to stand.
    Raises a ValueError where the document is not an object to msgspec."""
    split = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    parts = []
    for key, raw in split.items():
        if key not in fields:
            continue
        value = bytes(raw)
        if key == "response" and value.startswith(b"{"):
            value = read_parts(value, READ_RESPONSE_FIELDS)
        parts.append(orjson.dumps(key) + b":" + value)
    return b"{" + b",".join(parts) + b"}"


def orjson_reading(data: bytes, fields: tuple[str, ...]) -> Any:
    """What orjson gives of `data`, cut to the fields the records read."""
    obj = orjson.loads(data)
    if not isinstance(obj, dict):
        return obj
    out = {k: v for k, v in obj.items() if k in fields}
    if fields is READ_EVENT_FIELDS and isinstance(out.get("response"), dict):
        out["response"] = {k: v for k, v in out["response"].items() if k in READ_RESPONSE_FIELDS}
    return out


def assert_same_reading(data: bytes) -> None:
    """decode_response_object and decode_event read `data` as orjson does. Where orjson
    refuses it, they refuse it too, unless what orjson refuses is only in fields no record
    reads: then they read the rest as orjson reads it."""
    for decode, fields in (
        (decode_response_object, READ_RESPONSE_FIELDS),
        (decode_event, READ_EVENT_FIELDS),
    ):
        try:
            expected = orjson_reading(data, fields)
        except orjson.JSONDecodeError:
            try:
                expected = orjson_reading(read_parts(data, fields), fields)
            except (ValueError, RecursionError):
                with pytest.raises(ValueError):
                    decode(data)
                continue
        got = decode(data)
        if isinstance(got, dict) and isinstance(expected, dict):  # orjson's whole reading
            got = orjson_reading(orjson.dumps(got), fields) if len(got) > len(expected) else got
        assert got == expected
        # Same types too (1 and 1.0 and True compare equal).
        assert typed(got) == typed(expected)


def typed(value: Any) -> Any:
    """`value` with each scalar's type beside it, keys sorted."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, typed(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("list", tuple(typed(v) for v in value))
    return (type(value).__name__, value)


@fuzz
@given(json_values | shaped)
def test_lean_decoding_reads_any_json_as_orjson(value: Any) -> None:
    assert_same_reading(orjson.dumps(value))
    event = {"type": "response.completed", "response": value, "sequence_number": 1}
    assert_same_reading(orjson.dumps(event))


@pytest.mark.parametrize("name", SCENARIOS)
def test_lean_decoding_reads_every_fixture_as_orjson(name: str) -> None:
    buffered = FIXTURES / f"{name}.response.json"
    if buffered.exists():
        assert_same_reading(buffered.read_bytes())
    streamed = FIXTURES / f"{name}.response.sse"
    if streamed.exists():
        events = SSEParser().feed(streamed.read_bytes() + b"\n\n")
        assert events
        for event in events:
            assert_same_reading(event.data.encode())


ECHO = orjson.dumps({"instructions": "be brief", "tools": [{"type": "function", "name": "f"}]})


@pytest.mark.parametrize(
    "data",
    [
        # Where orjson and msgspec differ, orjson's reading wins: nesting past 1024 in a
        # read field, integers past 64 bits (orjson: a float), numbers past a double,
        # duplicates (the last copy), lone surrogates, invalid UTF-8 in a read field.
        b'{"output":' + b"[" * 1100 + b"]" * 1100 + b"}",
        b'{"output":' + b"[" * 300 + b"]" * 300 + b"}",
        b'{"output":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"usage":{"input_tokens":123456789012345678901234567890}}',
        b'{"usage":{"input_tokens":-123456789012345678901234567890}}',
        b'{"usage":{"input_tokens":18446744073709551615}}',
        b'{"usage":{"input_tokens":1e400}}',
        b'{"usage":{"input_tokens":1}, "usage":{"input_tokens":2}}',
        b'{"id":"a","id":7}',
        b'{"id":"\\ud800"}',
        b'{"id":"\\udc00x"}',
        b'{"id":"\\ud83d\\ude00"}',
        b'{"id":"\xff"}',
        b'{"id":"\xed\xa0\x80"}',
        b'{"model":"m","response":"\xff"}',
        b'{"type":"response.completed","response":[1]}',
        b'{"type":"response.completed","response":"text"}',
        b'{"type":"response.completed","response":null}',
        b'{"type":"response.completed","response":{"id":"\\ud800"}}',
        b'{"type":"response.completed","response":{"usage":{"x":1e999}}}',
        b"[1,2]",
        b'"a string"',
        b"null",
        b"",
        b"{",
        b'{"id":"a"} trailing',
        b'\xef\xbb\xbf{"id":"a"}',
        b' \n{"id" : "a" ,\t"model":"m"}\n',
        b'{"id":"a","tools":[1,]}',
        b'{"id":"a","tools":[NaN]}',
        b'{"id":"a","tools":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_lean_decoding_takes_orjsons_reading_where_they_differ(data: bytes) -> None:
    assert_same_reading(data)


@pytest.mark.parametrize(
    "skipped",
    [
        b'"\xff\xfe"',  # invalid UTF-8
        b"1e400",  # past a double
        b"[" * 2000 + b"]" * 2000,  # past orjson's nesting
    ],
)
def test_what_no_record_reads_may_be_what_orjson_refuses(skipped: bytes) -> None:
    """The one leniency: an echoed field the records never hold does not cost the usage."""
    body = (
        b'{"id":"resp_1","status":"completed","usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7},"tools":'
        + skipped
        + b"}"
    )
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    acc = ResponseAccumulator()
    acc.feed_response_body(body)
    result = acc.result()
    assert result.status == "completed" and result.malformed_events == 0
    assert result.token_usage is not None and result.token_usage["total_tokens"] == 7
    event = b'{"type":"response.completed","response":' + body + b"}"
    streamed = ResponseAccumulator()
    streamed.feed_event("response.completed", event)
    assert streamed.result().token_usage == result.token_usage


def test_a_codex_sized_echo_is_read_like_a_small_one() -> None:
    """The echoed instructions and tools are passed over; what is read is the same."""
    small = orjson.loads((FIXTURES / "text_buffered.response.json").read_bytes())
    big = {
        **small,
        **orjson.loads(ECHO),
        "tools": [
            {
                "type": "function",
                "name": f"t{i}",
                "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
            }
            for i in range(300)
        ],
    }
    a, b = ResponseAccumulator(), ResponseAccumulator()
    a.feed_response_body(orjson.dumps(small))
    b.feed_response_body(orjson.dumps(big))
    assert a.result() == b.result()
    assert API.decode_response(orjson.dumps(big)) == decode_response_object(orjson.dumps(small))
