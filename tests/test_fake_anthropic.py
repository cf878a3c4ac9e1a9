"""The fake Messages API (devtools/fake_anthropic.py): driven by the real anthropic SDK, by raw
HTTP, as a pure planner on Claude Code's captured bodies, and read back by the bridge's own
MessagesAccumulator so that the fake and the extraction agree."""

from __future__ import annotations

import gzip
import http.client
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anthropic
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibridge.apis.anthropic_messages import MessagesAccumulator, worth_decoding
from devtools import fake_anthropic as fa
from devtools import fake_upstream
from devtools.fake_upstream import FakeUpstream, Reply

CAPTURED = Path(__file__).parent / "fixtures" / "claude_code_captured"
AUTH = {"x-api-key": "test-key"}
HI = [{"role": "user", "content": "hi"}]
BASH = {
    "name": "Bash",
    "description": "Runs a shell command",
    "input_schema": {
        "type": "object",
        "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
        "required": ["command"],
    },
}
LOOKUP = {
    "name": "lookup",
    "input_schema": {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "limit": {"type": "integer"},
            "unit": {"type": "string", "enum": ["c", "f"]},
            "verbose": {"type": "boolean"},
        },
        "required": ["query", "limit", "unit"],
    },
}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def client(fake: FakeUpstream) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.url, api_key="test-key", max_retries=0)


def documented_usage(n: int, *, output: int | None = None, split: bool = False) -> dict:
    """The module docstring's scheme, as a buffered body (or the merged stream) carries it."""
    one_hour = 400 * n if split else 0
    return {
        "input_tokens": 100 * n + 1,
        "cache_creation_input_tokens": 1000 * n + 2,
        "cache_read_input_tokens": 10000 * n + 3,
        "cache_creation": {
            "ephemeral_5m_input_tokens": 1000 * n + 2 - one_hour,
            "ephemeral_1h_input_tokens": one_hour,
        },
        "output_tokens": 7 * n + 5 if output is None else output,
        "service_tier": "standard",
    }


def sdk_usage(message: Any) -> dict:
    usage = message.usage
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation": usage.cache_creation.model_dump(),
        "output_tokens": usage.output_tokens,
        "service_tier": usage.service_tier,
    }


def request(
    fake: FakeUpstream,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPResponse, bytes]:
    host = urlsplit(fake.url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def post_messages(
    fake: FakeUpstream, req: dict, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    merged = {"content-type": "application/json", **AUTH, **(headers or {})}
    return request(fake, "POST", "/v1/messages", orjson.dumps(req), merged)


def sse_frames(raw: bytes) -> list[tuple[str, bytes]]:
    """(event name, data) per event; asserts `event: <type>\\ndata: <compact JSON>\\n\\n`."""
    assert raw.endswith(b"\n\n")
    frames = []
    for block in raw[:-2].split(b"\n\n"):
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: ")
        assert data_line.startswith(b"data: ")
        name, data = event_line[7:].decode(), data_line[6:]
        assert orjson.loads(data)["type"] == name
        assert data == orjson.dumps(orjson.loads(data))  # compact, as Anthropic sends it
        frames.append((name, data))
    return frames


def planned(model: str, *, stream: bool, n: int = 1, **req: Any) -> Reply:
    body = {"model": model, "max_tokens": 64, "messages": HI, "stream": stream, **req}
    return fa.plan_messages(body, {**AUTH, "x-fake-delay-ms": "0"}, n)


def stream_bytes(reply: Reply) -> bytes:
    assert reply.status == 200 and reply.chunks is not None
    return b"".join(reply.chunks)


def accumulated(reply: Reply) -> Any:
    """What the bridge would record of this reply, fed as test_anthropic_messages feeds."""
    acc = MessagesAccumulator()
    if reply.chunks is not None:
        for name, data in sse_frames(stream_bytes(reply)):
            acc.feed_event(name, data)
    else:
        acc.feed_response_body(reply.body)
    return acc.result()


def usage_columns(n: int, output: int) -> dict[str, Any]:
    input_tokens = (100 * n + 1) + (1000 * n + 2) + (10000 * n + 3)
    return {
        "input_tokens": input_tokens,
        "cache_read_input_tokens": 10000 * n + 3,
        "cache_write_input_tokens": 1000 * n + 2,
        "uncached_input_tokens": 100 * n + 1,
        "output_tokens": output,
        "reasoning_tokens": None,
        "total_tokens": input_tokens + output,
        "service_tier": "standard",
    }


# --- the real anthropic SDK, straight at the fake ------------------------------------------


def test_sdk_streamed_text(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="fake-text", max_tokens=64, messages=HI) as stream:
        pieces = list(stream.text_stream)
        message = stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == fa.TEXT_ANSWER
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == fa.TEXT_ANSWER
    assert message.stop_reason == "end_turn"
    assert message.model == "fake-text"
    assert message.id.startswith("msg_")


@pytest.mark.parametrize("model", ["fake-text", "claude-opus-5-5", "claude-sonnet-4-5-20250929"])
def test_sdk_buffered_text_and_real_model_names(client: anthropic.Anthropic, model: str) -> None:
    message = client.messages.create(model=model, max_tokens=64, messages=HI)
    assert message.content[0].text == fa.TEXT_ANSWER
    assert message.stop_reason == "end_turn"
    assert message.model == model


@pytest.mark.parametrize(
    "model",
    [
        "fake-text",
        "fake-tool",
        "fake-parallel",
        "fake-thinking",
        "fake-cached",
        "fake-max-tokens",
        "fake-refusal",
        "fake-long-3",
    ],
)
def test_sdk_streamed_and_buffered_forms_agree(model: str) -> None:
    """Same content and stop reason; usage as documented for calls 1 (streamed) and 2."""
    with FakeUpstream() as fake:
        client = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0)
        with client.messages.stream(model=model, max_tokens=64, messages=HI) as stream:
            streamed = stream.get_final_message()
        buffered = client.messages.create(model=model, max_tokens=64, messages=HI)
    split = model == "fake-cached"
    assert sdk_usage(streamed) == documented_usage(1, split=split)
    assert sdk_usage(buffered) == documented_usage(2, split=split)
    assert streamed.id != buffered.id
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in buffered.content]
    assert streamed.stop_reason == buffered.stop_reason


def test_sdk_tool_use_fits_the_declared_tool(client: anthropic.Anthropic) -> None:
    first = client.messages.create(
        model="fake-tool", max_tokens=64, messages=HI, tools=[WEB_SEARCH, LOOKUP, BASH]
    )
    (call,) = first.content
    assert call.type == "tool_use"
    assert call.name == "lookup"  # server tools are not callable: the first client tool
    assert call.input == {"query": "example", "limit": 1, "unit": "c"}
    assert first.stop_reason == "tool_use"
    again = client.messages.create(
        model="fake-tool", max_tokens=64, messages=HI, tools=[WEB_SEARCH, LOOKUP, BASH]
    )
    assert again.content[0].id == call.id  # deterministic
    bare = client.messages.create(model="fake-tool", max_tokens=64, messages=HI)
    assert (bare.content[0].name, bare.content[0].input) == ("get_weather", {"city": "Paris"})
    assert bare.content[0].id.startswith("toolu_") and bare.content[0].id != call.id


def test_sdk_tool_loop_ends_with_a_text_quoting_the_result(client: anthropic.Anthropic) -> None:
    for model in ("fake-tool", "fake-parallel", "claude-opus-5-5"):
        with client.messages.stream(
            model=model, max_tokens=64, messages=[_user(_text("run echo hi"))], tools=[BASH]
        ) as stream:
            first = stream.get_final_message()
        calls = [block for block in first.content if block.type == "tool_use"]
        assert calls and first.stop_reason == "tool_use"
        results = [
            {"type": "tool_result", "tool_use_id": call.id, "content": f"result {i}"}
            for i, call in enumerate(calls)
        ]
        follow_up = [
            _user(_text("run echo hi")),
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {"role": "user", "content": results},
        ]
        second = client.messages.create(
            model=model, max_tokens=64, messages=follow_up, tools=[BASH]
        )
        quoted = "\n".join(f"result {i}" for i in range(len(calls)))
        assert [block.model_dump()["text"] for block in second.content] == [
            fa.TOOL_ANSWER_PREFIX + quoted
        ]
        assert second.stop_reason == "end_turn"


def test_sdk_parallel_tool_use(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="fake-parallel", max_tokens=64, messages=HI) as stream:
        message = stream.get_final_message()
    text, *calls = message.content
    assert text.type == "text" and text.text == fa.PARALLEL_TEXT
    assert [c.type for c in calls] == ["tool_use", "tool_use"]
    assert [c.input for c in calls] == [{"city": "Paris"}, {"city": "Tokyo"}]
    assert calls[0].id != calls[1].id
    assert message.stop_reason == "tool_use"


def test_sdk_thinking(client: anthropic.Anthropic, fake: FakeUpstream) -> None:
    with client.messages.stream(model="fake-thinking", max_tokens=64, messages=HI) as stream:
        message = stream.get_final_message()
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == fa.THINKING
    assert thinking.signature
    assert text.type == "text" and text.text == fa.FINAL_ANSWER
    _, raw = post_messages(fake, {"model": "fake-thinking", "messages": HI, "stream": True})
    deltas = [
        orjson.loads(d)["delta"]["type"] for n, d in sse_frames(raw) if n == "content_block_delta"
    ]
    assert deltas.count("thinking_delta") > 1
    assert deltas.count("signature_delta") == 1
    assert deltas.index("signature_delta") == deltas.count("thinking_delta")  # after them


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "error", "status", "kind"),
    [
        ("fake-529", anthropic.OverloadedError, 529, "overloaded_error"),
        ("fake-400", anthropic.BadRequestError, 400, "invalid_request_error"),
    ],
)
def test_sdk_http_errors(
    client: anthropic.Anthropic, model: str, error: type, status: int, kind: str, stream: bool
) -> None:
    with pytest.raises(error) as info:
        client.messages.create(model=model, max_tokens=64, messages=HI, stream=stream)
    assert info.value.status_code == status
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == kind
    assert info.value.body["error"]["message"]


def test_sdk_error_event_mid_stream_raises(client: anthropic.Anthropic) -> None:
    pieces: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client.messages.stream(model="fake-error-event", max_tokens=64, messages=HI) as stream,
    ):
        pieces.extend(stream.text_stream)
    assert "".join(pieces) == fa.ERROR_EVENT_TEXT  # the text came before the error
    assert info.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    with pytest.raises(anthropic.OverloadedError):  # buffered: HTTP 529
        client.messages.create(model="fake-error-event", max_tokens=64, messages=HI)


def test_sdk_usage_numbers_as_documented() -> None:
    """n counts POST /v1/messages only, whatever their form; count_tokens and models do not."""
    with FakeUpstream() as fake:
        client = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0)
        one = client.messages.create(model="fake-text", max_tokens=64, messages=HI)
        client.messages.count_tokens(model="fake-text", messages=HI)
        client.models.list()
        with client.messages.stream(model="fake-cached", max_tokens=64, messages=HI) as stream:
            two = stream.get_final_message()
        with pytest.raises(anthropic.OverloadedError):
            client.messages.create(model="fake-529", max_tokens=64, messages=HI)
        four = client.messages.create(model="claude-opus-5-5", max_tokens=64, messages=HI)
        assert fake.messages_calls == 4
    assert sdk_usage(one) == documented_usage(1)
    assert sdk_usage(two) == documented_usage(2, split=True)
    assert sdk_usage(four) == documented_usage(4)
    assert sdk_usage(four)["output_tokens"] == 33


def test_sdk_route_prefix_and_query(fake: FakeUpstream) -> None:
    """Claude Code's shape: a prefix before /v1 and ?beta=true after /messages."""
    client = anthropic.Anthropic(base_url=f"{fake.url}/anthropic", api_key="k", max_retries=0)
    message = client.messages.create(
        model="fake-text", max_tokens=64, messages=HI, extra_query={"beta": "true"}
    )
    assert message.content[0].text == fa.TEXT_ANSWER
    assert fake.requests[-1].path == "/anthropic/v1/messages?beta=true"


def test_sdk_models_and_count_tokens(client: anthropic.Anthropic) -> None:
    ids = [model.id for model in client.models.list().data]
    assert ids[:2] == ["claude-opus-5-5", "claude-sonnet-4-5-20250929"]
    assert {"fake-text", "fake-tool", "fake-error-event", "fake-long-1000"} <= set(ids)
    assert client.models.retrieve("claude-haiku-4-5-20251001").display_name == "Claude Haiku 4.5"
    assert client.models.retrieve("claude-opus-9-9").id == "claude-opus-9-9"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("gpt-5")
    small = client.messages.count_tokens(model="fake-text", messages=HI).input_tokens
    big = client.messages.count_tokens(model="fake-text", messages=HI * 50).input_tokens
    assert 0 < small < big
    assert client.messages.count_tokens(model="fake-text", messages=HI).input_tokens == small


# --- raw HTTP: framing, routes, auth, bad bodies ------------------------------------------


def test_stream_framing_and_event_order(fake: FakeUpstream) -> None:
    response, raw = post_messages(fake, {"model": "fake-parallel", "messages": HI, "stream": True})
    assert response.status == 200
    assert response.getheader("content-type", "").startswith("text/event-stream")
    assert response.getheader("request-id", "").startswith("req_")
    names = [name for name, _ in sse_frames(raw)]
    # Anthropic's order: ping right after the first content_block_start; blocks one by one.
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names.count("ping") == 1
    assert names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 3
    events = [orjson.loads(d) for _, d in sse_frames(raw)]
    indexes = [e["index"] for e in events if "index" in e]
    assert indexes == sorted(indexes) and set(indexes) == {0, 1, 2}
    first_json = [
        e["delta"]["partial_json"]
        for e in events
        if e.get("delta", {}).get("type") == "input_json_delta"
    ]
    assert first_json[0] == ""  # Anthropic's first piece of a tool input is empty


def test_text_deltas_are_spelled_as_anthropic_spells_them() -> None:
    """The tee's fast path (worth_decoding) skips them: benchmarks measure the real path."""
    for model in ("fake-text", "fake-long-5", "fake-slow"):
        frames = sse_frames(stream_bytes(planned(model, stream=True)))
        text_deltas = [d for n, d in frames if b'"text_delta"' in d]
        assert text_deltas
        assert not any(worth_decoding(d) for d in text_deltas)
        assert not worth_decoding(dict(frames)["ping"])
        others = [d for n, d in frames if n != "ping" and b'"text_delta"' not in d]
        assert all(worth_decoding(d) for d in others)


def test_models_list_is_anthropic_shaped_only_with_anthropic_version(fake: FakeUpstream) -> None:
    response, body = request(
        fake, "GET", "/v1/models", headers={**AUTH, "anthropic-version": "2023-06-01"}
    )
    listing = orjson.loads(body)
    assert response.status == 200
    assert set(listing) == {"data", "has_more", "first_id", "last_id"}
    assert listing["has_more"] is False
    assert listing["first_id"] == listing["data"][0]["id"]
    assert listing["last_id"] == listing["data"][-1]["id"]
    for model in listing["data"]:
        assert set(model) == {"type", "id", "display_name", "created_at"}
        assert model["type"] == "model"
    _, body = request(
        fake, "GET", "/v1/models/fake-long-9", headers={**AUTH, "anthropic-version": "2023-06-01"}
    )
    assert orjson.loads(body)["id"] == "fake-long-9"
    response, body = request(
        fake, "GET", "/v1/models/nope", headers={**AUTH, "anthropic-version": "2023-06-01"}
    )
    assert response.status == 404
    assert orjson.loads(body)["error"]["type"] == "not_found_error"
    # Without the header the OpenAI fake answers, as before.
    _, body = request(fake, "GET", "/v1/models")
    assert orjson.loads(body)["object"] == "list"
    assert orjson.loads(body)["data"][0]["id"] == fake_upstream.MODELS[0]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": ""},
        {"x-api-key": "   "},
        {"authorization": "Bearer"},
        {"authorization": "Bearer    "},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Token abc"},
        {"authorization": "abc"},
        {"x-goog-api-key": "abc", "api-key": "abc"},
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models")],
)
def test_no_key_gets_401(
    fake: FakeUpstream, headers: dict[str, str], method: str, path: str
) -> None:
    body = orjson.dumps({"model": "fake-text", "messages": HI}) if method == "POST" else b""
    headers = {**headers, "anthropic-version": "2023-06-01"}
    response, raw = request(fake, method, path, body, headers)
    assert response.status == 401
    error = orjson.loads(raw)
    assert error["type"] == "error"
    assert error["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "k"},
        {"X-Api-Key": "sk-ant-api03-whatever"},
        {"authorization": "Bearer t"},
        {"Authorization": "bearer sk-ant-oat01-token"},
    ],
)
def test_a_key_in_either_header_is_accepted(fake: FakeUpstream, headers: dict[str, str]) -> None:
    response, raw = request(
        fake, "POST", "/v1/messages", orjson.dumps({"model": "fake-text", "messages": HI}), headers
    )
    assert response.status == 200
    assert orjson.loads(raw)["content"][0]["text"] == fa.TEXT_ANSWER


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"", {}),
        (b"not json", {}),
        (b"{", {}),
        (b'{"model": "fake-text",}', {}),
        (b"[1, 2]", {}),
        (b'"a string"', {}),
        (b"null", {}),
        (b"\xff\xfe\x00", {}),
        (b"\x1f\x8b garbage", {"content-encoding": "gzip"}),
        (gzip.compress(b"[]"), {"content-encoding": "gzip"}),
    ],
)
def test_bad_bodies_get_400(fake: FakeUpstream, body: bytes, headers: dict[str, str]) -> None:
    response, raw = request(fake, "POST", "/v1/messages", body, {**AUTH, **headers})
    assert response.status == 400
    error = orjson.loads(raw)
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"]


def _deep_result(depth: int) -> bytes:
    """A tool_result whose content is `depth` objects deep, for the default to quote."""
    content = b'{"a":' * depth + b"1" + b"}" * depth
    message = b'{"role":"user","content":[{"type":"tool_result","content":' + content + b"}]}"
    return b'{"model":"fake-text","messages":[' + message + b"]}"


def _deep_schema(depth: int) -> bytes:
    """A tool for fake-tool whose required argument is an object `depth` levels deep."""
    level = b'{"type":"object","required":["a"],"properties":{"a":'
    schema = level * depth + b'{"type":"string"}' + b"}}" * depth
    tool = b'{"name":"t","input_schema":' + schema + b"}"
    return b'{"model":"fake-tool","messages":[],"tools":[' + tool + b"]}"


@pytest.mark.parametrize("body", [_deep_result(300), _deep_result(900), _deep_schema(300)])
def test_bodies_too_deep_to_quote_get_400(fake: FakeUpstream, body: bytes) -> None:
    """orjson reads 1024 levels but writes 254: the answer cannot quote these back."""
    assert isinstance(orjson.loads(body), dict)
    response, raw = request(fake, "POST", "/v1/messages", body, AUTH)
    assert response.status == 400
    assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"
    ok = request(fake, "POST", "/v1/messages", _deep_result(200), AUTH)[0]
    assert ok.status == 200


def test_gzip_body_is_read(fake: FakeUpstream) -> None:
    body = gzip.compress(orjson.dumps({"model": "fake-text", "messages": HI}))
    response, raw = request(
        fake, "POST", "/v1/messages", body, {**AUTH, "content-encoding": "gzip"}
    )
    assert response.status == 200
    assert orjson.loads(raw)["content"][0]["text"] == fa.TEXT_ANSWER


def test_bad_count_tokens_bodies_get_400(fake: FakeUpstream) -> None:
    for body in (b"", b"nope", b"[]", b'{"messages": ' + b"[" * 400 + b"]" * 400 + b"}"):
        response, raw = request(fake, "POST", "/v1/messages/count_tokens", body, AUTH)
        assert response.status == 400, body[:20]
        assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"


def test_truncated_stream_and_body(fake: FakeUpstream) -> None:
    response, raw = post_messages(fake, {"model": "fake-truncated", "messages": HI, "stream": True})
    assert response.getheader("connection") == "close"
    names = [name for name, _ in sse_frames(raw)]
    assert names[-1] == "content_block_delta"
    assert not {"content_block_stop", "message_delta", "message_stop"} & set(names)
    response, body = post_messages(fake, {"model": "fake-truncated", "messages": HI})
    assert response.status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)


def test_slow_and_long_delta_counts(fake: FakeUpstream) -> None:
    _, raw = post_messages(
        fake, {"model": "fake-slow", "messages": HI, "stream": True}, {"x-fake-delay-ms": "1"}
    )
    deltas = [orjson.loads(d) for n, d in sse_frames(raw) if n == "content_block_delta"]
    assert len(deltas) == 20
    assert "".join(d["delta"]["text"] for d in deltas) == fake_upstream.SLOW_ANSWER
    for count in (0, 1, 7, 3000):
        _, raw = post_messages(
            fake, {"model": f"fake-long-{count}", "messages": HI, "stream": True}
        )
        frames = sse_frames(raw)
        assert sum(n == "content_block_delta" for n, _ in frames) == count
        assert frames[-1][0] == "message_stop"


def test_chunking_headers_recut_the_same_bytes() -> None:
    whole = stream_bytes(planned("fake-parallel", stream=True))
    body = {"model": "fake-parallel", "messages": HI, "stream": True}
    cut = fa.plan_messages(body, {**AUTH, "x-fake-chunk-size": "7"}, 1)
    chunks = list(cut.chunks or [])
    assert all(len(c) <= 7 for c in chunks)
    assert len(b"".join(chunks)) == len(whole)
    assert [n for n, _ in sse_frames(b"".join(chunks))] == [n for n, _ in sse_frames(whole)]
    # fake-long-N is sent in large batches unless each event is asked to be flushed.
    assert len(list(planned("fake-long-5000", stream=True).chunks or [])) < 50
    flushed = fa.plan_messages(
        {"model": "fake-long-50", "stream": True}, {**AUTH, "x-fake-flush-each": "1"}, 1
    )
    assert len(list(flushed.chunks or [])) > 50


def test_concurrent_calls_get_distinct_numbers() -> None:
    with FakeUpstream() as fake:
        inputs: list[int] = []
        lock = threading.Lock()

        def call() -> None:
            _, body = post_messages(fake, {"model": "fake-text", "messages": HI})
            with lock:
                inputs.append(orjson.loads(body)["usage"]["input_tokens"])

        threads = [threading.Thread(target=call) for _ in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert fake.messages_calls == 24
    assert sorted(inputs) == [100 * n + 1 for n in range(1, 25)]


# --- the planner, pure: Claude Code's captured bodies and the default scenario -------------


def captured(name: str) -> tuple[dict, dict[str, str]]:
    body = orjson.loads((CAPTURED / f"{name}.request.json").read_bytes())
    headers = orjson.loads((CAPTURED / f"{name}.headers.json").read_bytes())
    return body, headers


def test_claude_code_turn1_gets_the_bash_call() -> None:
    body, headers = captured("tool_turn1")
    assert body["model"] == "claude-opus-5-5" and body["stream"] is True
    assert body["messages"][-1]["role"] == "system"  # Claude Code's, after the prompt
    reply = fa.plan_messages(body, headers, 1)
    events = [orjson.loads(d) for _, d in sse_frames(stream_bytes(reply))]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [(s["type"], s["name"]) for s in starts] == [("tool_use", "Bash")]
    arguments = "".join(
        e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
    )
    assert orjson.loads(arguments) == {"command": "echo hi", "description": "Run the command"}
    stop = next(e for e in events if e["type"] == "message_delta")
    assert stop["delta"]["stop_reason"] == "tool_use"
    again = fa.plan_messages(body, headers, 2)
    again_events = [orjson.loads(d) for _, d in sse_frames(stream_bytes(again))]
    again_start = next(e for e in again_events if e["type"] == "content_block_start")
    assert again_start["content_block"]["id"] == starts[0]["id"]  # a hash of the command

    result = accumulated(fa.plan_messages(body, headers, 3))
    (tool,) = result.tool_usages
    assert (tool["tool"], tool["type"], tool["call_id"]) == ("Bash", "tool_use", starts[0]["id"])
    assert tool["args"] == {"command": "echo hi", "description": "Run the command"}
    assert result.status == "completed" and result.error is None


def test_claude_code_turn2_quotes_the_tool_result() -> None:
    body, headers = captured("tool_turn2")
    assert body["messages"][-1]["content"][0]["type"] == "tool_result"
    reply = fa.plan_messages(body, headers, 2)
    events = [orjson.loads(d) for _, d in sse_frames(stream_bytes(reply))]
    text = "".join(
        e["delta"]["text"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
    )
    assert text == "The tool returned: hi"
    result = accumulated(fa.plan_messages(body, headers, 2))
    assert result.tool_usages == [] and result.status == "completed"
    assert result.token_usage is not None
    assert {k: result.token_usage[k] for k in usage_columns(2, 19)} == usage_columns(2, 19)


def _default_reply(messages: list, tools: list | None = None, model: str = "x") -> dict:
    body: dict[str, Any] = {"model": model, "messages": messages}
    if tools is not None:
        body["tools"] = tools
    reply = fa.plan_messages(body, AUTH, 1)
    assert reply.status == 200
    return orjson.loads(reply.body)


def _user(*blocks: Any) -> dict:
    return {"role": "user", "content": list(blocks)}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


@pytest.mark.parametrize(
    ("messages", "command"),
    [
        ([{"role": "user", "content": "run echo hi"}], "echo hi"),
        ([_user(_text("<system-reminder>x</system-reminder>"), _text("run ls -la  "))], "ls -la"),
        ([_user(_text("run   printf 'a b'"))], "printf 'a b'"),
        (
            [_user(_text("run echo hi")), {"role": "system", "content": "env"}, {"role": "system"}],
            "echo hi",
        ),
        ([_user(_text("run pwd"), {"type": "image", "source": {}})], "pwd"),
    ],
)
def test_default_runs_what_the_user_asked(messages: list, command: str) -> None:
    for model in ("claude-opus-5-5", "claude-sonnet-4-5-20250929", "fake-text", "anything"):
        body = _default_reply(messages, [LOOKUP, BASH], model)
        (call,) = body["content"]
        assert call["type"] == "tool_use" and call["name"] == "Bash"
        assert call["input"] == {"command": command, "description": "Run the command"}
        assert call["id"] == fa.tool_use_block("Bash", call["input"])["id"]
        assert body["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("messages", "tools"),
    [
        ([_user(_text("run echo hi"))], None),  # no Bash declared
        ([_user(_text("run echo hi"))], [LOOKUP, {**BASH, "name": "bash"}]),
        ([_user(_text("run echo hi"))], [{**BASH, "type": "bash_20250124"}]),  # a server tool
        ([_user(_text("please run echo hi"))], [BASH]),
        ([_user(_text("Run echo hi"))], [BASH]),
        ([_user(_text("run "))], [BASH]),
        ([_user(_text("run      "))], [BASH]),
        ([_user(_text("run echo hi"), _text("thanks"))], [BASH]),  # not the last text block
        ([_user(_text("run echo hi")), {"role": "assistant", "content": "ok"}], [BASH]),
        ([], [BASH]),
        ("run echo hi", [BASH]),
        ([_user({"type": "text", "text": 42})], [BASH]),
    ],
)
def test_default_otherwise_answers_with_text(messages: Any, tools: list | None) -> None:
    body = _default_reply(messages, tools)
    assert body["content"] == [{"type": "text", "text": fa.TEXT_ANSWER}]
    assert body["stop_reason"] == "end_turn"


@pytest.mark.parametrize(
    ("content", "quoted"),
    [
        ("hi", "hi"),
        ("  hi\n", "hi"),
        ([_text("line 1"), _text("line 2")], "line 1\nline 2"),
        ([{"type": "image", "source": {}}, _text("seen")], "seen"),
        ("x" * 5000, "x" * 2000),
    ],
)
def test_default_quotes_tool_results(content: Any, quoted: str) -> None:
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": content}
    for messages in (
        [_user(result)],
        [_user(_text("run echo hi")), _user(result), {"role": "system", "content": "env"}],
    ):
        body = _default_reply(messages, [BASH])
        assert body["content"] == [{"type": "text", "text": fa.TOOL_ANSWER_PREFIX + quoted}]


def test_different_commands_get_different_ids() -> None:
    ids = {
        _default_reply([_user(_text(f"run {command}"))], [BASH])["content"][0]["id"]
        for command in ("echo hi", "echo ho", "ls", "ls ")
    }
    assert len(ids) == 3  # "ls" and "ls " are one command


# --- the fake and the bridge's extraction agree ---------------------------------------------

PARIS = ("get_weather", {"city": "Paris"})
TOKYO = ("get_weather", {"city": "Tokyo"})
THOUGHT = {"source": "thinking", "content": fa.THINKING}
# model: status, error, error_code, tools (name, args), thoughts, output tokens (None: 7n+5)
AGREEMENT: dict[str, tuple[Any, ...]] = {
    "fake-text": ("completed", None, None, [], [], None),
    "fake-tool": ("completed", None, None, [PARIS], [], None),
    "fake-parallel": ("completed", None, None, [PARIS, TOKYO], [], None),
    "fake-thinking": ("completed", None, None, [], [THOUGHT], None),
    "fake-cached": ("completed", None, None, [], [], None),
    "fake-max-tokens": ("incomplete", "max_tokens", None, [], [], None),
    "fake-refusal": ("completed", "refusal", None, [], [], None),
    "fake-error-event": ("error", "Overloaded", "overloaded_error", [], [], 1),
    "fake-truncated": (None, None, None, [], [], 1),
    "fake-slow": ("completed", None, None, [], [], None),
    "fake-long-40": ("completed", None, None, [], [], None),
}
# Buffered, these two are an error body and a cut body: tested below.
FORMS = [
    (model, stream)
    for model in AGREEMENT
    for stream in (True, False)
    if stream or model not in ("fake-error-event", "fake-truncated")
]


@pytest.mark.parametrize(("model", "stream"), FORMS)
def test_accumulator_reads_what_the_fake_meant(model: str, stream: bool) -> None:
    status, error, error_code, tools, thoughts, output = AGREEMENT[model]
    n = 5
    reply = planned(model, stream=stream, n=n)
    if not stream:
        sent = orjson.loads(reply.body)
        ids = [b["id"] for b in sent["content"] if b["type"] == "tool_use"]
    else:
        reply_bytes = stream_bytes(reply)
        events = [orjson.loads(d) for _, d in sse_frames(reply_bytes)]
        ids = [
            e["content_block"]["id"]
            for e in events
            if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use"
        ]
        reply = Reply(chunks=[reply_bytes])
    result = accumulated(reply)
    assert (result.status, result.error, result.error_code) == (status, error, error_code)
    assert result.terminal_seen == (status is not None)
    assert result.malformed_events == 0
    assert result.response_model == model
    assert result.response_id is not None and result.response_id.startswith("msg_")
    assert [(t["tool"], t["args"]) for t in result.tool_usages] == tools
    assert [t["call_id"] for t in result.tool_usages] == ids
    assert [{k: t[k] for k in ("source", "content")} for t in result.thoughts] == thoughts
    assert result.token_usage is not None
    columns = usage_columns(n, 7 * n + 5 if output is None else output)
    assert {k: result.token_usage[k] for k in columns} == columns
    assert result.token_usage["usage"]["cache_creation"] == {
        "ephemeral_5m_input_tokens": 1000 * n + 2 - (400 * n if model == "fake-cached" else 0),
        "ephemeral_1h_input_tokens": 400 * n if model == "fake-cached" else 0,
    }


@pytest.mark.parametrize(
    ("model", "stream", "status", "code"),
    [
        ("fake-529", False, 529, "overloaded_error"),
        ("fake-529", True, 529, "overloaded_error"),
        ("fake-error-event", False, 529, "overloaded_error"),
        ("fake-400", False, 400, "invalid_request_error"),
        ("fake-400", True, 400, "invalid_request_error"),
    ],
)
def test_accumulator_reads_the_error_bodies(
    model: str, stream: bool, status: int, code: str
) -> None:
    reply = planned(model, stream=stream)
    assert reply.status == status and reply.chunks is None
    result = accumulated(reply)
    assert (result.status, result.error_code) == ("upstream_error", code)
    assert result.error and result.token_usage is None and result.terminal_seen


def test_accumulator_on_the_truncated_buffered_body() -> None:
    reply = planned("fake-truncated", stream=False)
    assert reply.close
    result = accumulated(reply)
    assert result.malformed_events == 1
    assert result.status is None and result.token_usage is None


# --- never a dropped connection: any JSON body gets an answer -------------------------------

_KEY_WORDS = (
    "model messages tools stream role content type text name input_schema properties required"
    " enum tool_use_id input"
)
_KEYS = _KEY_WORDS.split()
_WORDS = "user system assistant text tool_result tool_use object string Bash custom array integer"
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.text(max_size=4)
    | st.sampled_from([*_WORDS.split(), "run echo hi", "run "])
)
_JSON = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner),
    max_leaves=25,
)
_MODELS = st.sampled_from([m for m, *_ in fa.MODELS] + ["fake-long-2", "", "other"]) | _JSON


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=5), model=_MODELS)
def test_any_json_body_gets_a_well_formed_answer(body: dict, model: Any) -> None:
    body = {**body, "model": model}
    reply = fa.messages_reply(orjson.dumps(body), {**AUTH, "x-fake-delay-ms": "0"}, 3)
    assert reply.status in (200, 400, 529)
    if reply.chunks is not None:
        frames = sse_frames(b"".join(reply.chunks))
        assert frames[0][0] == "message_start"
        assert frames[-1][0] in ("message_stop", "error", "content_block_delta")
    elif reply.status == 200 and not reply.close:
        assert orjson.loads(reply.body)["type"] == "message"
    else:
        assert reply.close or orjson.loads(reply.body)["type"] == "error"
