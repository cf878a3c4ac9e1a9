"""Chat Completions extraction (aibridge.apis.openai_chat): golden fixtures, the request rules,
the usage edit of a streamed request's bytes, and hostile chunks."""

from __future__ import annotations

import json
import random
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibridge.apis import json_bytes
from aibridge.apis import openai_chat as oc
from aibridge.apis.common import RequestError, ResponseResult
from aibridge.config import ChatCompletions
from aibridge.transport import tee as tee_module
from aibridge.transport.sse import SSEParser
from aibridge.transport.tee import MAX_EVENT_BYTES, StreamTee
from tests.test_openai_responses import (
    THOUGHT_COLUMNS,
    TOKEN_USAGE_COLUMNS,
    TOOL_USAGE_COLUMNS,
    feed_fixture,
    split_sse,
)
from tests.test_sse import cuts, random_split

FIXTURES = Path(__file__).parent / "fixtures" / "openai_chat"
SCENARIOS = sorted(p.name.removesuffix(".request.json") for p in FIXTURES.glob("*.request.json"))
STREAMED = [n for n in SCENARIOS if (FIXTURES / f"{n}.response.sse").exists()]
BUFFERED = [n for n in SCENARIOS if (FIXTURES / f"{n}.response.json").exists()]
STATUSES = {None, "completed", "incomplete", "error"}


def feed_every_event(acc: oc.ChatAccumulator, events: Any) -> None:
    for name, data in events:
        acc.feed_event(name, data)


def accumulate(name: str) -> oc.ChatAccumulator:
    """A fixture fed as the bridge feeds it: a stream through its own SSE parser (which
    hands on a last event cut off without its blank line), else the buffered body."""
    acc = oc.ChatAccumulator()
    sse = FIXTURES / f"{name}.response.sse"
    if sse.exists():
        parser = SSEParser(max_event_bytes=8 << 20)
        events = parser.feed(sse.read_bytes()) + parser.close()
        feed_every_event(acc, [(e.event, e.data) for e in events])
    else:
        feed_fixture(acc, FIXTURES, name, feed_every_event, True)
    return acc


def expected(name: str) -> dict[str, Any]:
    return orjson.loads((FIXTURES / f"{name}.expected.json").read_bytes())


def assert_result_sound(result: ResponseResult) -> None:
    """Rows with exactly the schema's columns, every value bindable, a status of the list."""
    rows = asdict(result)
    if rows["token_usage"] is not None:
        assert set(rows["token_usage"]) == TOKEN_USAGE_COLUMNS
    for row in rows["tool_usages"]:
        assert set(row) == TOOL_USAGE_COLUMNS
    for row in rows["thoughts"]:
        assert set(row) == THOUGHT_COLUMNS
    db = sqlite3.connect(":memory:")
    for table in (rows["tool_usages"], rows["thoughts"], [rows["token_usage"] or {}]):
        for row in table:
            for value in row.values():
                if isinstance(value, dict | list):
                    value = orjson.dumps(value).decode()
                db.execute("select ?", (value,))
    assert rows["status"] in STATUSES
    assert rows["terminal_seen"] == (rows["status"] is not None)


# ------------------------------------------------------------------ golden fixtures


def test_fixtures_are_complete() -> None:
    assert len(SCENARIOS) >= 20
    for name in SCENARIOS:
        assert (FIXTURES / f"{name}.expected.json").exists(), name
        assert (name in STREAMED) != (name in BUFFERED), name
        assert name.endswith("_streamed") == (name in STREAMED), name


@pytest.mark.parametrize("name", SCENARIOS)
def test_fixture(name: str) -> None:
    want = expected(name)
    body, info = oc.parse_request((FIXTURES / f"{name}.request.json").read_bytes())
    assert isinstance(body, dict)
    assert asdict(info) == want["request"]
    assert info.stream == (name in STREAMED)
    result = accumulate(name).result()
    assert asdict(result) == want["result"]
    assert_result_sound(result)


@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("seed", range(4))
def test_fixture_through_the_bridge_sse_parser_in_random_chunks(name: str, seed: int) -> None:
    raw = (FIXTURES / f"{name}.response.sse").read_bytes()
    rng = random.Random(f"{name}-{seed}")
    parser = SSEParser(max_event_bytes=8 << 20, wanted=None)
    acc = oc.ChatAccumulator()
    at = 0
    while at < len(raw):
        size = rng.choice([1, 2, 3, 7, 13, 64, 500, 4096])
        feed_every_event(acc, [(e.event, e.data) for e in parser.feed(raw[at : at + size])])
        at += size
    feed_every_event(acc, [(e.event, e.data) for e in parser.close()])
    assert asdict(acc.result()) == expected(name)["result"]


@pytest.mark.parametrize("name", BUFFERED)
def test_buffered_fixture_fed_as_an_object(name: str) -> None:
    acc = oc.ChatAccumulator()
    acc.feed_response_object(orjson.loads((FIXTURES / f"{name}.response.json").read_bytes()))
    assert asdict(acc.result()) == expected(name)["result"]
    assert acc.ended


def test_the_fixtures_show_what_the_readme_says() -> None:
    # A few facts checked by name, so a regenerated expected file cannot hide a wrong rule.
    assert expected("parallel_tool_calls_streamed")["result"]["tool_usages"][1]["args"] == {
        "city": "Tokyo"
    }
    follow_up = expected("tool_result_streamed")["request"]
    assert (follow_up["prompt"], follow_up["correlating_tool_call_id"]) == (None, "call_Tok2")
    assert expected("multipart_prompt_buffered")["request"]["prompt"] == (
        "What is in this picture?\nAnswer in one word."
    )
    assert expected("usage_not_requested_streamed")["result"]["token_usage"] is None
    assert expected("usage_not_requested_streamed")["request"]["metadata"] == {
        "stream_usage": "not requested"
    }
    cached = expected("cached_tokens_streamed")["result"]["token_usage"]
    assert (cached["input_tokens"], cached["cache_read_input_tokens"]) == (4096, 3840)
    assert cached["uncached_input_tokens"] == 256
    thought = expected("reasoning_content_streamed")["result"]["thoughts"]
    assert thought[0]["content"] == "The user wants 2+2. That is 4."
    assert expected("reasoning_tokens_buffered")["result"]["token_usage"]["reasoning_tokens"] == 384
    assert expected("length_streamed")["result"]["status"] == "incomplete"
    assert expected("content_filter_streamed")["result"]["error"] == "content_filter"
    assert expected("error_chunk_streamed")["result"]["status"] == "error"
    assert expected("no_done_streamed")["result"]["terminal_seen"] is True
    assert expected("stream_cut_streamed")["result"]["tool_usages"][0]["args"] is None
    assert split_sse((FIXTURES / "text_streamed.response.sse").read_bytes())[-1][1] == "[DONE]"


# ------------------------------------------------------------------ request parsing


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty request body"),
        (b"{", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"model": 4}', "'model' must be a string"),
        (b'{"stream": "yes"}', "'stream' must be a boolean"),
        (b'{"stream": 1}', "'stream' must be a boolean"),
        (b'{"messages": {"role": "user"}}', "'messages' must be an array"),
        (b'{"stream_options": "include_usage"}', "'stream_options' must be an object"),
        (b'{"stream_options": []}', "'stream_options' must be an object"),
        (b'{"stream_options": {"include_usage": "true"}}', "include_usage' must be a boolean"),
        (b'{"stream_options": {"include_usage": 1}}', "include_usage' must be a boolean"),
        (b'{"metadata": "x"}', "'metadata' must be an object"),
    ],
)
def test_parse_request_rejects(body: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        oc.parse_request(body)


@pytest.mark.parametrize("field", ["model", "stream", "stream_options", "messages", "tools", "n"])
def test_duplicated_fields_are_refused_however_spelled(field: str) -> None:
    escaped = field[0] + "".join(f"\\u{ord(c):04x}" for c in field[1:])
    for second in (field, escaped):
        body = f'{{"{field}": null, "{second}": null}}'.encode()
        with pytest.raises(RequestError, match="ambiguous"):
            oc.parse_request(body)


def test_duplicates_of_fields_the_bridge_does_not_judge_are_upstream_s_to_judge() -> None:
    _, info = oc.parse_request(b'{"temperature": 1, "temperature": 2, "model": "m"}')
    assert info.model == "m"


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


@pytest.mark.parametrize(
    ("messages", "prompt", "call_id"),
    [
        ([user("hi")], "hi", None),
        ([user("")], "", None),
        ([user("a"), {"role": "assistant", "content": "b"}], None, None),
        ([user("a"), {"role": "system", "content": "env"}], "a", None),
        ([user("a"), {"role": "developer", "content": "x"}, {"role": "system"}], "a", None),
        (
            [user([{"type": "text", "text": "one"}, {"type": "text", "text": "two"}])],
            "one\ntwo",
            None,
        ),
        ([user([{"type": "image_url", "image_url": {"url": "x"}}])], None, None),
        ([user([{"type": "text", "text": 5}, {"type": "text", "text": "ok"}])], "ok", None),
        ([user([{"type": "input_text", "text": "not chat's"}])], None, None),
        ([user(None)], None, None),
        ([user({"text": "x"})], None, None),
        ([{"role": "tool", "tool_call_id": "call_1", "content": "out"}], None, "call_1"),
        (
            [
                user("a"),
                {"role": "tool", "tool_call_id": "c1"},
                {"role": "tool", "tool_call_id": "c2"},
            ],
            None,
            "c2",
        ),
        ([{"role": "tool", "tool_call_id": ""}], None, None),
        ([{"role": "tool", "tool_call_id": 7}], None, None),
        ([{"role": "tool", "tool_call_id": "c"}, {"role": "system", "content": "s"}], None, "c"),
        ([], None, None),
        (["text", user("x")], "x", None),
        ([user("x"), "junk"], None, None),
        ([{"role": "system", "content": "only"}], None, None),
    ],
)
def test_prompt_and_correlating_call_id(
    messages: Any, prompt: str | None, call_id: str | None
) -> None:
    assert oc.prompt_from_messages(messages) == prompt
    assert oc.correlating_tool_call_id(messages) == call_id


def test_stream_usage_as_the_request_states_it() -> None:
    def usage_note(body: dict[str, Any]) -> Any:
        info = oc.parse_request(orjson.dumps(body))[1]
        return info.metadata

    assert usage_note({"stream": False}) is None
    assert usage_note({}) is None
    assert usage_note({"stream": True}) == {"stream_usage": oc.USAGE_NOT_REQUESTED}
    assert usage_note({"stream": True, "stream_options": None}) == {
        "stream_usage": oc.USAGE_NOT_REQUESTED
    }
    for options in ({}, {"include_usage": False}, {"include_usage": None}, {"x": 1}):
        want = {"stream_usage": oc.USAGE_NOT_REQUESTED}
        assert usage_note({"stream": True, "stream_options": options}) == want
    assert usage_note({"stream": True, "stream_options": {"include_usage": True}}) == {
        "stream_usage": oc.USAGE_REQUESTED
    }


# ------------------------------------------------------------ the usage edit, byte by byte


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
spacing = st.sampled_from(["", " ", "\n", "\t", "\r\n  "])


def spelled(obj: Any, gap: str) -> bytes:
    """JSON written with `gap` around every token, and non-ASCII escaped or not, so the edit
    is tested on bytes no library of ours wrote."""
    if isinstance(obj, dict):
        members = [
            f"{gap}{spelled_key(k)}{gap}:{gap}{spelled(v, gap).decode()}" for k, v in obj.items()
        ]
        return ("{" + ",".join(members) + gap + "}").encode()
    if isinstance(obj, list):
        return ("[" + ",".join(gap + spelled(v, gap).decode() for v in obj) + gap + "]").encode()
    return orjson.dumps(obj)


def spelled_key(key: str) -> str:
    return orjson.dumps(key).decode()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text(max_size=10).filter(lambda k: k != "stream_options"), json_values, max_size=6
    ),
    spacing,
    st.sampled_from(["absent", "null", "empty", "other", "false", "nullusage"]),
)
def test_usage_edit_leaves_every_other_byte(obj: dict[str, Any], gap: str, options: str) -> None:
    obj = {**obj, "stream": True}
    if options != "absent":
        obj["stream_options"] = {
            "null": None,
            "empty": {},
            "other": {"include_obfuscation": False},
            "false": {"include_usage": False, "x": [1, "}"]},
            "nullusage": {"include_usage": None},
        }[options]
    body = spelled(obj, gap)
    amended = oc.with_usage_requested(body)
    assert amended is not None
    decoded = orjson.loads(amended)
    assert decoded["stream_options"]["include_usage"] is True
    want = dict(obj)
    want["stream_options"] = {**(obj.get("stream_options") or {}), "include_usage": True}
    assert decoded == want
    # One splice, at the place the case calls for: every other byte is the body's.
    if options == "absent":
        at = body.index(b"{") + 1
        assert amended == body[:at] + b'"stream_options":{"include_usage":true},' + body[at:]
    else:
        # stream_options is the last member: its value ends right before the closing brace.
        value = spelled(obj["stream_options"], gap)
        at = len(body) - len(gap) - 1 - len(value)
        assert body[at : at + len(value)] == value
        if options == "null":
            assert amended == body[:at] + b'{"include_usage":true}' + body[at + 4 :]
        elif options in ("empty", "other"):
            member = b'"include_usage":true' + (b"," if options == "other" else b"")
            assert amended == body[: at + 1] + member + body[at + 1 :]
        else:
            old = b"false" if options == "false" else b"null"
            k = at + value.index(old)
            assert amended == body[:k] + b"true" + body[k + len(old) :]
    assert oc.with_usage_requested(amended) is None  # idempotent


@pytest.mark.parametrize(
    ("body", "want"),
    [
        (b'{"stream":true}', b'{"stream_options":{"include_usage":true},"stream":true}'),
        (
            b' \n{ "stream" : true }',
            b' \n{"stream_options":{"include_usage":true}, "stream" : true }',
        ),
        (
            b'{"stream":true,"stream_options":{}}',
            b'{"stream":true,"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"stream":true,"stream_options":{ }}',
            b'{"stream":true,"stream_options":{"include_usage":true }}',
        ),
        (
            b'{"stream_options":{"include_obfuscation":false},"stream":true}',
            b'{"stream_options":{"include_usage":true,"include_obfuscation":false},"stream":true}',
        ),
        (
            b'{"stream":true,"stream_options":{"include_usage":false}}',
            b'{"stream":true,"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"stream":true,"stream_options" : null }',
            b'{"stream":true,"stream_options" : {"include_usage":true} }',
        ),
        (
            b'{"stream":true,"stream\\u005foptions":{"include\\u005fusage":false}}',
            b'{"stream":true,"stream\\u005foptions":{"include\\u005fusage":true}}',
        ),
        (
            b'{"messages":[{"content":"\\"stream_options\\": {}"}],"stream":true}',
            b'{"stream_options":{"include_usage":true},'
            b'"messages":[{"content":"\\"stream_options\\": {}"}],"stream":true}',
        ),
        (b'{"stream":true,"stream_options":{"include_usage":true}}', None),
    ],
)
def test_usage_edit_examples(body: bytes, want: bytes | None) -> None:
    assert oc.with_usage_requested(body) == want


class _Config:
    def __init__(self, request_usage: bool = True) -> None:
        self.chat_completions = ChatCompletions(request_usage)


def test_amend_request_follows_the_config_and_says_what_it_did() -> None:
    body = b'{"model":"m","stream":true,"messages":[]}'
    info = oc.parse_request(body)[1]
    assert oc.amend_request(body, info, _Config(False), False) is None
    assert info.metadata == {"stream_usage": oc.USAGE_NOT_REQUESTED}
    assert oc.amend_request(body, info, _Config(), True) is None
    assert info.metadata == {"stream_usage": oc.USAGE_NOT_ADDED_ENCODED}
    info = oc.parse_request(body)[1]
    amended = oc.amend_request(body, info, _Config(), False)
    assert amended is not None and orjson.loads(amended)["stream_options"] == {
        "include_usage": True
    }
    assert info.metadata == {"stream_usage": oc.USAGE_ADDED}
    for unchanged in (b'{"model":"m"}', b'{"stream":true,"stream_options":{"include_usage":true}}'):
        info = oc.parse_request(unchanged)[1]
        assert oc.amend_request(unchanged, info, _Config(), False) is None


def test_member_spans_reads_keys_decoded_and_values_whole() -> None:
    body = b' { "a\\u0062" : [1, {"}": "]"}] , "s" : "x\\"}" , "n":-1.5e3,"t":true } '
    spans = json_bytes.member_spans(body)
    assert list(spans) == ["ab", "s", "n", "t"]
    assert [orjson.loads(body[a:b]) for a, b in spans.values()] == [
        [1, {"}": "]"}],
        'x"}',
        -1.5e3,
        True,
    ]
    assert json_bytes.member_spans(b"{}") == {}
    for bad in (b"[]", b"", b'{"a"', b'{"a":', b'{"a":[1', b'{"a":"x'):
        with pytest.raises(ValueError):
            json_bytes.member_spans(bad)


# ------------------------------------------------------------------ response extraction


def chunk(*choices: dict[str, Any], **fields: Any) -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "model": "gpt-x", "choices": list(choices), **fields})


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish}


def call_delta(index: int, arguments: str, **extra: Any) -> dict[str, Any]:
    return {
        "index": index,
        "function": {"arguments": arguments, **extra.pop("function", {})},
        **extra,
    }


def run(*events: bytes | str) -> ResponseResult:
    acc = oc.ChatAccumulator()
    for data in events:
        acc.feed_event(None, data)
    result = acc.result()
    assert_result_sound(result)
    return result


DONE = "[DONE]"


@pytest.mark.parametrize(
    ("reasons", "status", "error"),
    [
        (["stop"], "completed", None),
        (["tool_calls"], "completed", None),
        (["function_call"], "completed", None),
        (["length"], "incomplete", "length"),
        (["content_filter"], "completed", "content_filter"),
        (["something_new"], "completed", "something_new"),
        (["stop", "length"], "incomplete", "length"),
        (["content_filter", "stop"], "completed", "content_filter"),
        ([None], "completed", None),  # [DONE] without a finish reason: over by the protocol
    ],
)
def test_status_from_finish_reasons(reasons: list[Any], status: str, error: str | None) -> None:
    events = [chunk(*(delta(i, r) for i, r in enumerate(reasons))), DONE]
    result = run(*events)
    assert (result.status, result.error) == (status, error)


def test_finish_reason_without_done_is_terminal_and_without_either_is_not() -> None:
    assert run(chunk(delta(0, "stop"))).terminal_seen
    assert run(chunk(delta(0, "stop"), delta(1))).terminal_seen is False
    assert run(chunk(delta(0, content="hi"))).status is None


def test_nothing_after_done_or_an_error_chunk_is_read() -> None:
    later = chunk(delta(0, "stop", tool_calls=[{"index": 0, "id": "c", "function": {"name": "f"}}]))
    result = run(chunk(delta(0, "stop")), DONE, later, b"garbage")
    assert (result.tool_usages, result.malformed_events) == ([], 0)
    result = run(orjson.dumps({"error": {"message": "boom", "type": "server_error"}}), later)
    assert (result.status, result.error, result.error_code) == ("error", "boom", "server_error")
    assert result.tool_usages == []


@pytest.mark.parametrize(
    ("payload", "message", "code"),
    [
        ({"error": {"message": "m", "code": "c", "type": "t"}}, "m", "c"),
        ({"error": {"message": "m", "type": "t"}}, "m", "t"),
        ({"error": {"message": "m", "code": 429}}, "m", "429"),
        ({"error": {"code": "only_code"}}, "only_code", "only_code"),
        ({"error": "plain text"}, "plain text", None),
        ({"error": {}}, None, None),
        ({"error": {"message": ["not", "text"], "code": True}}, None, None),
    ],
)
def test_error_chunk_shapes(payload: dict[str, Any], message: str | None, code: str | None) -> None:
    result = run(orjson.dumps(payload))
    assert (result.status, result.error, result.error_code) == ("error", message, code)


def test_tool_calls_assembled_by_index_per_choice() -> None:
    start = {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
    result = run(
        chunk(delta(0, tool_calls=[{"index": 0, **start}])),
        chunk(delta(1, tool_calls=[{"index": 0, "id": "call_b", "function": {"name": "g"}}])),
        chunk(
            delta(0, tool_calls=[call_delta(0, '{"x":')]),
            delta(1, tool_calls=[call_delta(0, "[1")]),
        ),
        chunk(
            delta(1, tool_calls=[call_delta(0, "]")]), delta(0, tool_calls=[call_delta(0, "1}")])
        ),
        chunk(delta(0, "tool_calls"), delta(1, "tool_calls")),
        DONE,
    )
    assert [(t["call_id"], t["tool"], t["args"]) for t in result.tool_usages] == [
        ("call_a", "f", {"x": 1}),
        ("call_b", "g", [1]),
    ]


@pytest.mark.parametrize(
    ("calls", "want"),
    [
        # whole calls without an index (some hosts): each its own
        (
            [
                {"id": "a", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "function": {"name": "g", "arguments": "{}"}},
            ],
            [("a", "f", "function", {})],
        ),
        # structured arguments (some hosts send an object)
        (
            [{"index": 0, "id": "a", "function": {"name": "f", "arguments": {"k": [1]}}}],
            [("a", "f", "function", {"k": [1]})],
        ),
        # a custom tool's free-form input
        (
            [
                {
                    "index": 0,
                    "id": "a",
                    "type": "custom",
                    "custom": {"name": "patch", "input": "*** Begin"},
                }
            ],
            [("a", "patch", "custom", "*** Begin")],
        ),
        # nothing but an id: the call still counts, named by its type
        ([{"index": 0, "id": "a"}], [("a", "function", "function", None)]),
        # wrong types everywhere: no crash, no invented values
        (
            [{"index": 0, "id": 5, "type": [], "function": {"name": {}, "arguments": 3}}],
            [(None, "function", "function", 3)],
        ),
    ],
)
def test_tool_call_shapes(calls: list[Any], want: list[tuple[Any, ...]]) -> None:
    result = run(chunk(delta(0, "tool_calls", tool_calls=calls)), DONE)
    got = [(t["call_id"], t["tool"], t["type"], t["args"]) for t in result.tool_usages]
    assert got[: len(want)] == want


def test_legacy_function_call_delta() -> None:
    result = run(
        chunk(delta(0, function_call={"name": "lookup", "arguments": '{"q":'})),
        chunk(delta(0, function_call={"arguments": '"x"}'})),
        chunk(delta(0, "function_call")),
        DONE,
    )
    assert [(t["tool"], t["type"], t["args"]) for t in result.tool_usages] == [
        ("lookup", "function_call", {"q": "x"})
    ]


def test_reasoning_text_from_either_field_and_not_both() -> None:
    result = run(
        chunk(delta(0, reasoning_content="a ", reasoning="a ")),
        chunk(delta(0, reasoning="b")),
        chunk(delta(0, "stop", content="answer")),
        DONE,
    )
    assert [(t["source"], t["content"]) for t in result.thoughts] == [("reasoning", "a b")]
    assert run(chunk(delta(0, "stop", reasoning="  ")), DONE).thoughts == []


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"[1, 2]",
        b'"text"',
        b"null",
        b'{"choices": "x"}',
        b'{"choices": [1, null]}',
        b'{"choices": [{"index": true}]}',
        b'{"choices": [{"index": -1}]}',
        b'{"choices": [{"index": 0, "delta": "x"}]}',
        b'{"choices": [{"index": 0, "delta": {"tool_calls": "x"}}]}',
        b'{"choices": [{"index": 0, "delta": {"tool_calls": [7]}}]}',
        b'{"usage": "lots"}',
    ],
)
def test_malformed_chunks_are_counted_and_change_nothing_else(data: bytes) -> None:
    result = run(data, chunk(delta(0, "stop")), DONE)
    assert result.malformed_events >= 1
    assert (result.status, result.tool_usages, result.token_usage) == ("completed", [], None)


def test_hostile_values_never_reach_a_row_unbounded() -> None:
    events = [
        chunk(delta(0, "stop"), id=["x"], model={"m": 1}, service_tier="t" * 1000),
        b'{"choices": [], "usage": {"prompt_tokens": 100000000000000000000000, '
        b'"completion_tokens": -1}}',
        DONE,
    ]
    result = run(*events)
    assert (result.response_id, result.response_model) == (None, None)
    usage = result.token_usage
    assert usage is not None
    assert (usage["input_tokens"], usage["output_tokens"], usage["service_tier"]) == (
        None,
        None,
        None,
    )


def test_caps_drop_content_whole_and_say_so() -> None:
    big = "x" * (oc.MAX_CALL_BYTES // 4 + 1)
    events = [chunk(delta(0, tool_calls=[{"index": 0, "id": "a", "function": {"name": "f"}}]))]
    events += [chunk(delta(0, tool_calls=[call_delta(0, big)])) for _ in range(4)]
    events += [chunk(delta(0, "tool_calls")), DONE]
    result = run(*events)
    assert [(t["call_id"], t["args"]) for t in result.tool_usages] == [("a", None)]
    assert result.error is not None and "over the size limit" in result.error


def test_counts_are_capped() -> None:
    calls = [
        {"index": i, "id": f"c{i}", "function": {"name": "f"}} for i in range(oc.MAX_CALLS + 5)
    ]
    result = run(chunk(delta(0, "tool_calls", tool_calls=calls)), DONE)
    assert len(result.tool_usages) == oc.MAX_CALLS
    assert result.error is not None and "5 tool call(s) or choice(s)" in result.error
    choices = [delta(i, "stop") for i in range(oc.MAX_CHOICES + 1)]
    assert "1 tool call(s) or choice(s)" in (run(chunk(*choices), DONE).error or "")


def test_huge_usage_keeps_only_its_counts() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "junk": "x" * (oc.MAX_USAGE_BYTES + 1)}
    result = run(orjson.dumps({"choices": [], "usage": usage}), chunk(delta(0, "stop")), DONE)
    assert result.token_usage is not None
    assert result.token_usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 1}
    assert "only its counts kept" in (result.error or "")


@pytest.mark.parametrize(
    ("usage", "counts"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 3}, (10, None, None, 10, 3, None, 13)),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 3,
                "total_tokens": 14,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
            (10, 4, None, 6, 3, None, 14),
        ),
        (
            {"prompt_tokens": 10, "prompt_cache_hit_tokens": 7, "prompt_cache_miss_tokens": 3},
            (10, 7, None, 3, None, None, None),
        ),
        (
            {
                "prompt_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 5},
            },
            (10, 2, 5, 3, None, None, None),
        ),
        (
            {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 9}},
            (3, 9, None, 0, None, None, None),
        ),
        (
            {
                "prompt_tokens": "10",
                "completion_tokens": 2.0,
                "completion_tokens_details": {"reasoning_tokens": True},
            },
            (None, None, None, None, 2, None, None),
        ),
        (
            {"prompt_tokens_details": "x", "completion_tokens_details": [1]},
            (None, None, None, None, None, None, None),
        ),
        ({}, (None, None, None, None, None, None, None)),
    ],
)
def test_token_usage_row(usage: dict[str, Any], counts: tuple[Any, ...]) -> None:
    row = oc.token_usage_row(usage)
    keys = (
        "input_tokens",
        "cache_read_input_tokens",
        "cache_write_input_tokens",
        "uncached_input_tokens",
        "output_tokens",
        "reasoning_tokens",
        "total_tokens",
    )
    assert tuple(row[k] for k in keys) == counts


def test_the_last_usage_wins_and_null_usage_is_no_usage() -> None:
    result = run(
        chunk(delta(0), usage={"prompt_tokens": 1, "completion_tokens": 1}),
        chunk(delta(0, "stop"), usage=None),
        orjson.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
        DONE,
    )
    assert result.token_usage is not None and result.token_usage["total_tokens"] == 7
    assert run(chunk(delta(0, "stop"), usage=None), DONE).token_usage is None


def test_buffered_error_body_and_non_objects() -> None:
    acc = oc.ChatAccumulator()
    acc.feed_response_body(b'{"error": {"message": "bad key", "type": "invalid_request_error"}}')
    assert (acc.result().status, acc.result().error) == ("error", "bad key")
    for body in (b"[]", b"{}", b'{"choices": 3}', b"not json"):
        acc = oc.ChatAccumulator()
        acc.feed_response_body(body)
        assert acc.result().malformed_events == 1
        assert acc.result().status is None


def test_nothing_fed() -> None:
    result = oc.ChatAccumulator().result()
    assert (result.status, result.terminal_seen, result.token_usage) == (None, False, None)


@pytest.mark.parametrize(
    ("body", "may"),
    [
        (b'{"model":"m","stream":true}', False),
        (b'{"model":"caf\\u00e9 \\u4e2d","stream":true}', False),  # escapes, none of a key's
        (b'{"stream_options":{}}', True),
        (b'{"x":"stream_options"}', True),  # only in a value: the walk decides
        (b'{"stream\\u005foptions":{}}', True),
        (b'{"\\u0073tream_options":{}}', True),
        (b'{"s\\u0054ream":1}', True),  # any escaped word character: walk to be sure
        (b'{"a":"\\u003cb\\u003e"}', True),  # Go's escaping of < and >: walked, still right
    ],
)
def test_the_pre_check_is_sound(body: bytes, may: bool) -> None:
    assert json_bytes.may_hold_key(body, b"stream_options") is may
    # Whatever the pre-check says, the edit is the same as the full walk's.
    spans = json_bytes.member_spans(body)
    amended = oc.with_usage_requested(body)
    if "stream_options" not in spans:
        assert amended == body[:1] + b'"stream_options":{"include_usage":true},' + body[1:]


@settings(max_examples=200)
@given(st.text(min_size=1, max_size=14), st.integers(0, 13))
def test_an_escaped_spelling_of_the_key_is_always_found(key: str, at: int) -> None:
    """Spell "stream_options" with one character escaped anywhere: the pre-check says maybe."""
    word = "stream_options"
    at %= len(word)
    spelled = word[:at] + f"\\u{ord(word[at]):04x}" + word[at + 1 :]
    body = ('{"' + spelled + '":{},"k":' + orjson.dumps(key).decode() + "}").encode()
    assert json_bytes.may_hold_key(body, word.encode())
    assert orjson.loads(oc.with_usage_requested(body) or b"{}")["stream_options"] == {
        "include_usage": True
    }


def test_an_error_chunk_with_a_last_choice_is_an_error() -> None:
    """OpenRouter's mid-stream error: the error and a choice with finish_reason "error"."""
    error = {"code": 502, "message": "Provider disconnected"}
    result = run(chunk(delta(0, content="partial")), chunk(delta(0, "error"), error=error))
    assert (result.status, result.error, result.error_code) == (
        "error",
        "Provider disconnected",
        "502",
    )
    # finish_reason "error" alone (no error object) is an error too.
    result = run(chunk(delta(0, "error")), DONE)
    assert result.status == "error" and "finish_reason error" in (result.error or "")
    # "error": null is no error.
    assert run(chunk(delta(0, "stop"), error=None), DONE).status == "completed"


def test_a_new_id_at_a_taken_index_is_a_new_call() -> None:
    def start(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
        return {"index": index, "id": call_id, "function": {"name": name, "arguments": arguments}}

    result = run(
        chunk(delta(0, tool_calls=[start(0, "call_a", "f", '{"a":')])),
        chunk(delta(0, tool_calls=[call_delta(0, "1}")])),
        chunk(delta(0, tool_calls=[start(0, "call_b", "g", '{"b":2}')])),
        chunk(delta(0, tool_calls=[start(1, "call_c", "h", "{}")])),
        # the same id again at its index: the same call, not a new one
        chunk(delta(0, tool_calls=[{"index": 1, "id": "call_c", "function": {"arguments": ""}}])),
        chunk(delta(0, "tool_calls")),
        DONE,
    )
    assert [(t["call_id"], t["tool"], t["args"]) for t in result.tool_usages] == [
        ("call_a", "f", {"a": 1}),
        ("call_b", "g", {"b": 2}),
        ("call_c", "h", {}),
    ]


def test_named_events_are_read_as_chunks_through_the_tee() -> None:
    from aibridge.record.outcome import finish_exchange
    from aibridge.transport.tee import StreamTee

    raw = (FIXTURES / "tool_call_streamed.response.sse").read_bytes()
    named = raw.replace(b"data: ", b"event: chunk\ndata: ")
    acc = oc.ChatAccumulator()
    tee = StreamTee(acc, oc.API, "")
    assert tee(named) is named
    tee(b"")
    outcome = finish_exchange(oc.API, acc, tee, None, None)
    assert asdict(outcome.result) == expected("tool_call_streamed")["result"]


# ------------------------------------------- the tee's byte test (ChatAccumulator.skips)

HEAD = {
    "id": "chatcmpl-9",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "gpt-x",
    "service_tier": "default",
    "system_fingerprint": "fp_1",
}
TAIL = {"usage": None}
# Text in the raw hole of a content chunk (its bytes spliced in as they are): what looks
# skippable but is not valid, or is valid JSON of another shape (each INJECTED_* one adds
# something the records keep, against a tail spelled as OpenAI spells it).
INJECTED_CALL = (
    b'x","tool_calls":[{"index":0,"id":"call_evil","type":"function",'
    b'"function":{"name":"evil","arguments":"{}"}}],"y":"'
)
INJECTED_ERROR = b'x"}}],"error":{"message":"evil","code":"e"},"z":[{"a":{"b":"'
INJECTED_REASONING = b'x","reasoning_content":"hidden thought'
INJECTED_REFUSAL = b'x","refusal":"no'
RAW_PIECES = [
    b"a",
    b" ",
    b'"',
    b"\\",
    b'\\"',
    b"\\\\",
    b"\\n",
    b"\\/",
    b"\\u00e9",
    b"\\u12",
    b"\\ud83d\\ude00",
    b"\\ud800",
    b"\\udc00",
    b"\\x41",
    b"\x01",
    b"\x1f",
    b"\x7f",
    b"\xff",
    b"\xc3",
    b"\xc3\xa9",
    b"\xed\xa0\x80",
    b"\t",
    b"\r",
    INJECTED_CALL,
    INJECTED_ERROR,
    INJECTED_REASONING,
    INJECTED_REFUSAL,
]
HOLE = "HOLE-6e1f"  # where the raw text goes
text_pieces = st.text(
    alphabet=st.sampled_from(list('a "\\/\n\t\x00\x1f\x7fé\u2028😀\ufeff\ufffd},:[u0')), max_size=8
)


def serialize(obj: dict[str, Any], style: str) -> bytes:
    if style == "compact":
        return orjson.dumps(obj)
    if style == "spaced":  # Python's json module as is, as some hosts send it
        return json.dumps(obj, ensure_ascii=False).encode()
    return json.dumps(obj, separators=(",", ":")).encode()  # ASCII, \u escapes


@st.composite
def chat_chunk(draw: st.DrawFn, heads: list[dict[str, Any]], style: str, padded: bool) -> bytes:
    """One SSE event of a Chat stream: mostly content deltas on the stream's usual head
    (heads[0]) spelled in its usual style, with everything the records keep, and hostile
    text, mixed in."""
    head = dict(draw(st.sampled_from([heads[0]] * 12 + heads)))
    padding = {}
    if padded and draw(st.integers(0, 9)):
        padding["obfuscation"] = draw(st.text(alphabet="abcXYZ09", max_size=6))
    index: Any = draw(st.sampled_from([0] * 12 + [1, -1, True, "absent"]))
    kind = draw(
        st.sampled_from(
            ["content"] * 14
            + ["raw"] * 4
            + ["role", "reasoning", "refusal", "tool", "finish"]
            + ["usage", "error", "done", "junk", "named", "comment", "empty"]
        )
    )
    text = draw(text_pieces)
    delta: Any = {"content": text}
    finish: Any = None
    fields: dict[str, Any] = {}
    if kind == "role":
        delta = draw(
            st.sampled_from(
                [
                    {"role": "assistant", "content": ""},
                    {"role": "assistant", "content": "", "refusal": None},
                    {},
                    None,
                ]
            )
        )
    elif kind == "reasoning":
        delta = {draw(st.sampled_from(["reasoning_content", "reasoning"])): text or "t"}
    elif kind == "refusal":
        delta = {"content": None, "refusal": text or "r"}
    elif kind == "tool":
        call: dict[str, Any] = {
            "index": draw(st.sampled_from([0, 1])),
            "function": {"arguments": text},
        }
        if draw(st.booleans()):
            call |= {"id": draw(st.sampled_from(["call_a", "call_b"])), "type": "function"}
            call["function"]["name"] = "f"
        delta = {"tool_calls": [call]}
    elif kind == "finish":
        delta, finish = (
            {},
            draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
        )
    elif kind == "usage":
        fields["usage"] = draw(
            st.sampled_from([None, {"prompt_tokens": 3, "completion_tokens": 4}])
        )
    elif kind == "error":
        return b'data: {"error":{"message":"mid-stream","code":"server_error"}}\n\n'
    elif kind == "done":
        return b"data: [DONE]\n\n"
    elif kind == "junk":
        return (
            b"data: " + draw(st.sampled_from([b"{not json", b"[1]", b'"x"', b"", b"{}"])) + b"\n\n"
        )
    elif kind == "comment":
        return b": keep-alive\n\n"
    entry: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "logprobs": None,
        "finish_reason": finish,
    }
    if index == "absent":
        del entry["index"]
    if kind == "empty":
        choices: list[Any] = []
    else:
        choices = [entry]
    obj = {**head, "choices": choices, **TAIL, **fields, **padding}
    if draw(st.integers(0, 19)) == 0:  # keys in another order now and then
        keys = draw(st.permutations(list(obj)))
        obj = {key: obj[key] for key in keys}
    if kind == "raw":
        obj["choices"][0]["delta"] = {"content": HOLE}
    data = serialize(obj, draw(st.sampled_from([style] * 12 + ["compact", "spaced", "ascii"])))
    if kind == "raw":
        raw = b"".join(draw(st.lists(st.sampled_from(RAW_PIECES), min_size=1, max_size=4)))
        data = data.replace(HOLE.encode(), raw)
    name = b"event: chunk\n" if kind == "named" else b""
    return name + b"data: " + data + b"\n\n"


def content_chunk(head: dict[str, Any], text: str, style: str, padded: bool) -> bytes:
    entry = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    padding = {"obfuscation": "Xy" * len(text)} if padded else {}
    return b"data: " + serialize({**head, "choices": [entry], **TAIL, **padding}, style) + b"\n\n"


HEADS = [
    HEAD,
    {**HEAD, "service_tier": "flex"},
    {key: value for key, value in HEAD.items() if key != "id"},
    {**HEAD, "id": "chatcmpl-other", "model": "gpt-y"},
    {**HEAD, "service_tier": ""},
    {**HEAD, "id": 5, "model": None, "service_tier": ["x"]},
    {key: value for key, value in HEAD.items() if key != "service_tier"},
]


@st.composite
def chat_stream(draw: st.DrawFn) -> bytes:
    usual = draw(st.sampled_from(HEADS))
    style = draw(st.sampled_from(["compact", "spaced", "ascii"]))
    padded = draw(st.booleans())
    chunks = chat_chunk([usual, *HEADS], style, padded)
    # Runs of plain content deltas, as real streams are, between the chunks of any kind.
    runs = st.lists(text_pieces, min_size=1, max_size=6).map(
        lambda texts: b"".join(content_chunk(usual, text, style, padded) for text in texts)
    )
    stream = b"".join(draw(st.lists(chunks | runs, max_size=30)))
    return stream.replace(b"\n", b"\r\n") if draw(st.integers(0, 9)) == 0 else stream


def full_decode(stream: bytes) -> oc.ChatAccumulator:
    """Every chunk decoded, as before the byte test: the accumulator never makes a template."""
    acc = oc.ChatAccumulator()
    acc._templates_made = oc._MAX_TEMPLATES
    parser = SSEParser(max_event_bytes=MAX_EVENT_BYTES)
    feed_every_event(acc, [(e.event, e.data) for e in parser.feed(stream) + parser.close()])
    return acc


def through_the_tee(
    chunks: list[bytes], batch: int = 1 << 16
) -> tuple[oc.ChatAccumulator, StreamTee]:
    """As the bridge runs it (parsed in batches of `batch` bytes)."""
    acc = oc.ChatAccumulator()
    with mock.patch.object(tee_module, "PARSE_BATCH_BYTES", batch):
        tee = StreamTee(acc, oc.API, "")
        for piece in filter(None, chunks):  # b"" is the end of the stream
            assert tee(piece) is piece
        tee(b"")
    assert tee.parse_error is None
    return acc, tee


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=chat_stream(), cuts=cuts, batch=st.sampled_from([1, 300, 1 << 16]))
def test_the_tee_s_byte_test_gives_the_records_of_a_full_decode(
    stream: bytes, cuts: list[int], batch: int
) -> None:
    """A guard: for any stream, cut anywhere and parsed in batches of any size, dropping
    chunks by their bytes gives what decoding every chunk gives: usage, tool calls,
    thoughts, outcome, the malformed count."""
    full = full_decode(stream)
    fast, _ = through_the_tee(random_split(stream, cuts), batch)
    assert asdict(fast.result()) == asdict(full.result())
    assert fast.ended == full.ended


def openai_stream(texts: list[str], *, padded: bool = False) -> bytes:
    """A stream as OpenAI spells it: the role chunk, content deltas, the finish, the usage."""
    chunks = [
        {
            **HEAD,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            **TAIL,
        }
    ]
    for i, text in enumerate(texts):
        extra = {"obfuscation": "p" * (i % 7)} if padded else {}
        entry = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        chunks.append({**HEAD, "choices": [entry], **TAIL, **extra})
    entry = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    chunks.append({**HEAD, "choices": [entry], **TAIL})
    chunks.append({**HEAD, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 8}})
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("padded", [False, True])
def test_content_deltas_are_dropped_undecoded(padded: bool) -> None:
    texts = ["word ", 'a "quoted" \\ word', "é\u2028😀", "tab\tnew\nline", ""] * 40
    stream = openai_stream(texts, padded=padded)
    fast, tee = through_the_tee([stream])
    # The first content delta is decoded, and teaches the accumulator the rest.
    assert tee.parser.skipped_events == len(texts) - 1
    assert asdict(fast.result()) == asdict(full_decode(stream).result())
    assert fast.result().status == "completed"


@pytest.mark.parametrize(
    "raw",
    [INJECTED_CALL, INJECTED_ERROR, INJECTED_REASONING, INJECTED_REFUSAL],
    ids=["call", "error", "reasoning", "refusal"],
)
def test_a_chunk_that_only_looks_like_a_content_delta_is_decoded(raw: bytes) -> None:
    """A guard: text that ends the string early is valid JSON of another shape here."""
    stream = openai_stream(["word ", "word "])
    plain = orjson.dumps(
        {
            **HEAD,
            "choices": [
                {"index": 0, "delta": {"content": HOLE}, "logprobs": None, "finish_reason": None}
            ],
            **TAIL,
        }
    )
    evil = b"data: " + plain.replace(HOLE.encode(), raw) + b"\n\n"
    orjson.loads(evil[6:])  # valid JSON
    at = stream.index(b"data: ", stream.index(b"word "))  # after the first content delta
    stream = stream[:at] + evil + stream[at:]
    fast, _ = through_the_tee([stream])
    result = asdict(fast.result())
    assert result == asdict(full_decode(stream).result())
    assert result != asdict(full_decode(openai_stream(["word ", "word "])).result())


@pytest.mark.parametrize("split", ["whole", "each", "change and after together"])
def test_a_tier_that_changes_again_is_taken_again(split: str) -> None:
    """A guard: a template learnt before the tier changed would hide the change back; and
    the accumulator takes each event before the next one is tested."""
    content = {"index": 0, "delta": {"content": "w"}, "logprobs": None, "finish_reason": None}
    function = {"name": "f", "arguments": "{}"}
    call = {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "function": function}]}}
    chunks = [
        {**HEAD, "choices": [content]},
        {**HEAD, "service_tier": "flex", "choices": [call]},
        {**HEAD, "choices": [content]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
    ]
    events = [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks]
    pieces = {
        "whole": [b"".join(events)],
        "each": events,
        "change and after together": [events[0], b"".join(events[1:])],
    }[split]
    fast, _ = through_the_tee(pieces, batch=1)
    usage = fast.result().token_usage
    assert usage is not None and usage["service_tier"] == "default"
    assert asdict(fast.result()) == asdict(full_decode(b"".join(events)).result())


def test_a_host_whose_chunks_all_differ_stops_making_templates() -> None:
    chunks = []
    for i in range(100):
        entry = {"index": 0, "delta": {"content": "w"}, "finish_reason": None}
        chunks.append({"id": f"chatcmpl-{i}", "created": i, "model": "m", "choices": [entry]})
    stream = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    fast, tee = through_the_tee([stream])
    assert fast._templates_made == oc._MAX_TEMPLATES
    assert tee.parser.skipped_events == 0
    assert asdict(fast.result()) == asdict(full_decode(stream).result())


def test_other_callers_get_the_byte_test_on_the_text() -> None:
    """The views feed decoded text to feed_event: the same chunks are dropped there."""
    stream = openai_stream(["word "] * 50)
    parser = SSEParser(max_event_bytes=MAX_EVENT_BYTES)
    acc = oc.ChatAccumulator()
    decoded = 0
    real_loads = orjson.loads

    def counting_loads(data: Any) -> Any:
        nonlocal decoded
        decoded += 1
        return real_loads(data)

    with mock.patch.object(oc.orjson, "loads", counting_loads):
        feed_every_event(acc, [(e.event, e.data) for e in parser.feed(stream)])
    assert decoded == 4  # the role chunk, the first delta, the finish, the usage
    assert asdict(acc.result()) == asdict(full_decode(stream).result())


def test_a_choice_past_the_cap_is_counted_as_often_as_decoding_counts_it() -> None:
    """A guard: a delta of a choice that is not tracked counts again each time."""
    finish = [{"index": i, "delta": {}, "finish_reason": None} for i in range(oc.MAX_CHOICES)]
    late = {"index": oc.MAX_CHOICES, "delta": {"content": "w"}, "finish_reason": None}
    chunks = [{**HEAD, "choices": finish}] + [{**HEAD, "choices": [late]}] * 5
    stream = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    fast, _ = through_the_tee([stream])
    assert fast.untracked == 5
    assert asdict(fast.result()) == asdict(full_decode(stream).result())
