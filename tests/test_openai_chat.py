"""Chat Completions extraction (aibridge.apis.openai_chat): golden fixtures, the request rules,
the usage edit of a streamed request's bytes, and hostile chunks."""

from __future__ import annotations

import random
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibridge.apis import json_bytes
from aibridge.apis import openai_chat as oc
from aibridge.apis.common import RequestError, ResponseResult
from aibridge.config import ChatCompletions
from aibridge.transport.sse import SSEParser
from tests.test_openai_responses import (
    THOUGHT_COLUMNS,
    TOKEN_USAGE_COLUMNS,
    TOOL_USAGE_COLUMNS,
    feed_fixture,
    split_sse,
)

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
