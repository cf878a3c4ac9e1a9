"""The "AI Bridge" view of Anthropic Messages flows (aibridge.view.messages, chosen through
aibridge.contentview): golden fixtures, real Claude Code bodies, hostile bodies, the flow's API."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import contentviews
from mitmproxy.contentviews import Metadata

from aibridge.apis import anthropic_messages as am
from aibridge.contentview import (
    FLOW_METADATA_KEY,
    NAME,
    PRIORITY,
    VIEW,
    render_body,
    render_request,
    render_response,
)
from aibridge.transport.sse import SSEParser
from tests.test_contentview import assert_shown, flow_of, leaves, registered  # noqa: F401
from tests.test_contentview import fixture as responses_fixture

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic_messages"
CAPTURED = Path(__file__).parent / "fixtures" / "claude_code_captured"
SCENARIOS = sorted(p.name.removesuffix(".request.json") for p in FIXTURES.glob("*.request.json"))
STREAMED = [n for n in SCENARIOS if (FIXTURES / f"{n}.response.sse").exists()]
CLAUDE_CODE = sorted(p.name.removesuffix(".request.json") for p in CAPTURED.glob("*.request.json"))
SSE = "text/event-stream"
JSON = "application/json"
# What render_* say when their own code failed (as opposed to a body they cannot read).
INTERNAL_FAILURE = "could not render"
REQUEST_TITLE = "Messages API request"
STREAM_TITLE = "Messages API response (streamed"


def fixture(name: str) -> tuple[bytes, bytes, str, dict[str, Any]]:
    """Request body, response body, response content type and expected records."""
    return responses_fixture(name, FIXTURES)


def events_of(stream: bytes) -> list[tuple[str | None, Any]]:
    parser = SSEParser()
    events = parser.feed(stream) + parser.close()
    return [(e.event, orjson.loads(e.data)) for e in events]


def stream_of(events: list[Any]) -> bytes:
    """Events (objects with a type, or anything) as Anthropic frames them."""
    out = []
    for event in events:
        name = event.get("type") if isinstance(event, dict) else None
        head = f"event: {name}\n".encode() if isinstance(name, str) else b""
        out.append(head + b"data: " + orjson.dumps(event) + b"\n\n")
    return b"".join(out)


def usage_text(usage: dict[str, Any]) -> str:
    return (
        f"usage: input {usage['input_tokens']} (uncached {usage['uncached_input_tokens']}, "
        f"cache read {usage['cache_read_input_tokens']}, "
        f"cache write {usage['cache_write_input_tokens']}"
    )


def assert_sane(out: str, title: str) -> None:
    assert isinstance(out, str)
    assert out.startswith(title), out[:300]
    assert INTERNAL_FAILURE not in out, out[:2000]


# ------------------------------------------------------------------------- golden fixtures


@pytest.mark.parametrize("name", SCENARIOS)
def test_request_fixture(name: str) -> None:
    body, _, _, expected = fixture(name)
    out = render_request(body)
    req = expected["request"]
    obj = orjson.loads(body)
    assert out.startswith(REQUEST_TITLE)
    assert f"model: {req['model']}" in out
    assert f"stream: {'true' if req['stream'] else 'unset'}" in out
    assert f"max_tokens: {obj['max_tokens']}" in out
    if req["prompt"] is not None:
        assert f"logged prompt: {req['prompt']}" in out
        # Marked once, where the log took it from: string content or its last text block.
        assert out.count("[prompt]") == 1
        assert f"user [prompt]: {req['prompt']}" in out or f"[prompt] {req['prompt']}" in out
    else:
        assert "[prompt]" not in out
    if call_id := req["correlating_tool_call_id"]:
        assert f"logged prompt: none (answers tool_use_id {call_id})" in out
        assert f"← {call_id}: " in out
    if req["session_id"]:
        assert f"session: {req['session_id']}" in out
    for tool in obj.get("tools") or []:
        assert tool["name"] in out
    if isinstance(thinking := obj.get("thinking"), dict):
        assert f"thinking: type={thinking['type']}" in out
    if isinstance(system := obj.get("system"), str):
        assert f"system: {system}" in out
    elif isinstance(system, list):
        assert f"system ({len(system)} block" in out


@pytest.mark.parametrize("name", SCENARIOS)
def test_response_fixture(name: str) -> None:
    _, body, content_type, expected = fixture(name)
    out = render_response(body, content_type)
    result = expected["result"]
    assert INTERNAL_FAILURE not in out
    if result["status"] == "upstream_error":  # the 529 and 400 bodies
        assert out.startswith("Messages API error")
        assert f"error: {result['error_code']}: {result['error']}" in out
        return
    assert out.startswith(STREAM_TITLE if content_type == SSE else "Messages API response")
    for key in ("response_id", "response_model"):
        assert result[key] in out
    if result["status"] is not None:
        assert f"status: {result['status']}" in out
    else:
        assert "status: " not in out
        assert "the stream has no message_stop" in out
    if result["error_code"]:  # an error event
        assert f"error: {result['error_code']}: {result['error']}" in out
    elif result["error"]:  # a stop reason kept (max_tokens, refusal, …)
        assert f"stop_reason: {result['error']}" in out
    usage = result["token_usage"]
    assert usage_text(usage) in out
    assert f"output {usage['output_tokens']} · total {usage['total_tokens']}" in out
    assert f"tier {usage['service_tier']}" in out
    for call in result["tool_usages"]:
        head = f"{call['server_url']}: {call['tool']}" if call["server_url"] else call["tool"]
        assert f"→ {head}" in out
        assert f"id={call['call_id']}" in out
        if call["type"] != "tool_use":
            assert f"[{call['type']}]" in out
        for leaf in leaves(call["args"]):
            assert orjson.dumps(leaf).decode() in out
        if call["invocation_error"]:
            assert call["invocation_error"] in out
    for thought in result["thoughts"]:
        if thought["source"] == "thinking":
            assert "[thinking] " in out
            assert_shown(thought["content"], out)
        else:
            assert f"[{thought['source']}] (" in out
    assert "malformed" not in out  # none of the fixtures has one


@pytest.mark.parametrize("name", STREAMED)
def test_streamed_text_is_assembled_per_block(name: str) -> None:
    _, body, _, _ = fixture(name)
    texts: dict[int, list[str]] = {}
    for _, event in events_of(body):
        delta = event.get("delta")
        if event.get("type") == "content_block_delta" and delta.get("type") == "text_delta":
            texts.setdefault(event["index"], []).append(delta["text"])
    out = render_response(body, SSE)
    assert out.startswith(STREAM_TITLE)
    for pieces in texts.values():
        assert_shown("".join(pieces), out)
    # Blocks keep their order.
    positions = [out.index("".join(p).split("\n")[0]) for _, p in sorted(texts.items())]
    assert positions == sorted(positions)


def test_parallel_tool_inputs_are_kept_apart() -> None:
    _, body, _, _ = fixture("parallel_tool_use_streamed")
    out = render_response(body, SSE)
    weather = out.index("→ get_weather  id=toolu_01GbZ7uEw4kQ9xN2vPrS5mTd")
    time = out.index("→ get_time  id=toolu_01Hc8vFx5lR0yO3wQsT6nUeK")
    assert weather < out.index('"location": "Paris, France"') < time
    assert time < out.index('"timezone": "Asia/Tokyo"')


def test_cache_write_split_and_server_tool_usage() -> None:
    _, body, _, _ = fixture("cache_tokens_streamed")
    out = render_response(body, SSE)
    assert "cache write 3072 [5m 1024, 1h 2048])" in out
    _, body, _, _ = fixture("server_tool_use_streamed")
    out = render_response(body, SSE)
    assert "server tools: web_search_requests 1" in out
    assert (
        "← srvtoolu_01Av5cYx9wTz3qLm7nKp2RsD [web_search_tool_result]: error: max_uses_exceeded"
        in out
    )
    assert "mitmproxy 12 release notes <https://mitmproxy.org/posts/releases/mitmproxy12/>" in out
    assert "assistant: [1 citation] mitmproxy 12 adds" in out


def test_cut_streams_show_what_arrived() -> None:
    _, body, _, _ = fixture("stream_cut_mid_block_streamed")
    out = render_response(body, SSE)
    assert "→ Bash  id=toolu_01Ez9gBb3aXd7uPq1rOt6VwH\n" in out  # finished: parsed input
    assert '"command": "ls -la src"' in out
    # The block the cut went through: flagged, its partial input shown as it came.
    assert "→ Bash  id=toolu_01Fa0hCc4bYe8vQr2sPu7WxI (in_progress)" in out
    assert '{"command": "ls -la te' in out
    assert "the stream has no message_stop" in out
    _, body, _, _ = fixture("error_event_streamed")
    out = render_response(body, SSE)
    assert "status: error" in out
    assert "error: overloaded_error: Overloaded" in out
    assert "assistant (in_progress): # aibridge" in out
    assert "no message_stop" not in out  # an error ends the stream


def test_buffered_request_shapes() -> None:
    body, response, _, _ = fixture("text_buffered")
    out = render_request(body)
    assert "system: You describe images for a screen reader." in out
    assert "[image image/png, base64 96 chars]" in out
    assert "iVBOR" not in out  # the image itself is never shown
    assert "[prompt] Answer in one sentence." in out
    assert out.index("What is in this image?") < out.index("[prompt]")
    out = render_response(response, JSON)
    assert "assistant: The image shows a single white pixel" in out
    assert "status: completed" in out


def test_request_block_kinds() -> None:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "stream": False,
        "tool_choice": {"type": "tool", "name": "grep"},
        "temperature": 0.2,
        "mcp_servers": [{"type": "url", "name": "deepwiki", "url": "https://x/sse"}],
        "messages": [
            {"role": "user", "content": "first"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "let me grep", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "Zm9v"},
                    {"type": "tool_use", "id": "t1", "name": "grep", "input": {"q": "x"}},
                    {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}},
                    {
                        "type": "web_search_tool_result",
                        "tool_use_id": "s1",
                        "content": [{"type": "web_search_result", "title": "T", "url": "u"}],
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "is_error": True,
                        "content": [{"type": "text", "text": "no such file"}],
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://i/cat.png"}},
                    {
                        "type": "document",
                        "title": "spec",
                        "source": {
                            "type": "base64",
                            "media_type": "application/pdf",
                            "data": "A" * 9000,
                        },
                    },
                    {"type": "document", "source": {"type": "file", "file_id": "file_9"}},
                    {"type": "search_result", "title": "x", "content": []},
                ],
            },
        ],
    }
    out = render_request(orjson.dumps(body))
    assert "stream: false · max_tokens: 100" in out
    assert "settings: temperature=0.2" in out
    assert 'tool_choice: {"type":"tool","name":"grep"}' in out
    assert "mcp_servers (1): deepwiki" in out
    assert "logged prompt: none" in out  # neither text nor a tool result alone: no prompt
    assert "[thinking] let me grep" in out
    assert "[redacted_thinking] (4 chars, encrypted)" in out
    assert '→ grep({"q":"x"})  id=t1' in out
    assert "→ web_search [server_tool_use]({})  id=s1" in out
    assert "← s1 [web_search_tool_result]: T <u>" in out
    assert "← t1 (error): no such file" in out
    assert "[image https://i/cat.png]" in out
    assert "[document 'spec' application/pdf, base64 9000 chars]" in out
    assert "[document file file_9]" in out
    assert '[search_result] {"title":"x","content":[]}' in out
    assert "AAAA" not in out


def test_error_bodies() -> None:
    ours = am.error_body(401, "unknown token")  # the bridge's own refusals
    assert render_response(ours, JSON) == (
        "Messages API error\nerror: authentication_error: unknown token"
    )
    variants = {
        b'{"type":"error","error":{"type":"api_error","message":"boom"}}': "api_error: boom",
        b'{"type":"error","error":{"type":"api_error"}}': "error: api_error",
        b'{"type":"error","error":"flat text"}': "error: flat text",
        b'{"type":"error","error":{"message":"m"},"request_id":"req_1"}': "request_id: req_1",
        b'{"error":{"type":"x","message":"' + b"y" * 10_000 + b'"}}': "more chars]",
    }
    for body, shown in variants.items():
        out = render_response(body, JSON, "messages")
        assert out.startswith("Messages API error"), body
        assert shown in out
        assert len(out) < 1000
        if body.startswith(b'{"type":"error"'):  # Anthropic's shape: known as a response
            assert render_body(body) == out
    # An error event mid-stream, in the shapes a hostile upstream might send.
    for error in [{"type": "overloaded_error", "message": "Overloaded"}, "down", None, 7, []]:
        # An error event alone could be either API's: the flow's API says which.
        out = render_response(stream_of([{"type": "error", "error": error}]), SSE, "messages")
        assert_sane(out, STREAM_TITLE)
        assert "error: " in out


# --------------------------------------------------------------------- Claude Code bodies


@pytest.mark.parametrize("name", CLAUDE_CODE)
def test_claude_code_request(name: str) -> None:
    body = (CAPTURED / f"{name}.request.json").read_bytes()
    obj = orjson.loads(body)
    out = render_request(body)
    assert out.startswith(REQUEST_TITLE)
    assert f"model: {obj['model']}" in out
    assert "stream: true · max_tokens: " in out
    assert f"session: {am.session_id_from_metadata(obj['metadata'])}" in out
    assert "system (3 blocks, " in out
    assert "x-anthropic-billing-header: cc_version=" in out
    names = ", ".join(tool["name"] for tool in obj["tools"])
    assert f"tools (12): {names}" in out
    prompt = am.prompt_from_messages(obj["messages"])
    if prompt is None:  # the tool follow-up
        assert "logged prompt: none (answers tool_use_id toolu_01CaptureBashEchoHi0001)" in out
        assert '→ Bash({"command":"echo hi","description":"Print hi"})' in out
        assert "← toolu_01CaptureBashEchoHi0001: hi" in out
        assert "[prompt]" not in out
    else:
        # The typed text, not a <system-reminder>, is the one marked, once.
        assert f"logged prompt: {prompt}" in out
        assert f"[prompt] {prompt}\n" in out or out.endswith(f"[prompt] {prompt}")
        assert out.count("[prompt]") == 1
        assert "[prompt] <system-reminder>" not in out
    # Reminders and the system-role environment message are boilerplate: shortened hard.
    reminders = [b["text"] for m in obj["messages"] for b in m["content"] if _reminder(b)]
    assert reminders
    assert all(r not in out for r in reminders if len(r) > 400)
    if any(m["role"] == "system" for m in obj["messages"]):
        assert "\nsystem: # Environment" in out
    assert len(out) < 40_000


def _reminder(item: Any) -> bool:
    return isinstance(item, dict) and str(item.get("text", "")).startswith("<system-reminder>")


@pytest.mark.parametrize("name", ["say_hi", "tool_turn1", "tool_turn2", "delta_usage"])
def test_claude_code_response(name: str) -> None:
    body = (CAPTURED / f"{name}.response.sse").read_bytes()
    out = render_response(body, SSE)
    accumulator = am.MessagesAccumulator()
    for event_name, event in events_of(body):
        accumulator.feed_event(event_name, orjson.dumps(event))
    result = accumulator.result()
    assert result.token_usage is not None
    assert usage_text(result.token_usage) in out  # the log's numbers, message_delta's last
    assert f"status: {result.status}" in out
    if name == "tool_turn1":
        assert "→ Bash  id=toolu_01CaptureBashEchoHi0001" in out
        assert '"command": "echo hi"' in out
        assert "stop_reason: tool_use" in out
    if name == "say_hi":
        assert (
            "usage: input 11106 (uncached 101, cache read 10003, cache write 1002 [5m 1002" in out
        )


def test_prompt_mark_follows_the_log_not_equal_text() -> None:
    # The same words earlier in the history are not the prompt; the last user message's are.
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hi"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "hi"}],
            },
            {"role": "system", "content": "hi"},
        ],
    }
    out = render_request(orjson.dumps(body), "messages")
    assert out.count("[prompt]") == 1
    assert out.index("[prompt] hi") > out.index("user (2 blocks):")
    assert out.endswith("    [prompt] hi\n\nsystem: hi")
    # An assistant prefill last: no prompt at all, as the log says.
    body["messages"] = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    out = render_request(orjson.dumps(body), "messages")
    assert "logged prompt: none" in out
    assert "[prompt]" not in out


# ------------------------------------------------------------------------- hostile bodies


@pytest.mark.parametrize("name", SCENARIOS)
def test_truncated_bodies_never_raise(name: str) -> None:
    request, response, content_type, _ = fixture(name)
    for cut in range(0, max(len(request), len(response)), 17):
        out = render_request(request[:cut], "messages")
        assert out.startswith((REQUEST_TITLE, "Not a Messages API request")), out[:200]
        assert INTERNAL_FAILURE not in out
        out = render_response(response[:cut], content_type, "messages")
        assert out.startswith(("Messages API", "Not a Messages API")), out[:200]
        assert INTERNAL_FAILURE not in out


@pytest.mark.parametrize("name", STREAMED)
def test_every_cut_of_a_stream(name: str) -> None:
    _, body, _, _ = fixture(name)
    for cut in range(len(body)):
        out = render_response(body[:cut], SSE, "messages")
        assert_sane(out, STREAM_TITLE)


def test_bad_events_are_noted() -> None:
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {}}}
    stream = (
        stream_of([start])
        + b"event: content_block_delta\ndata: {not json\n\n"
        + b"data: [1, 2]\n\n"
        + b'data: "text"\n\n'
        + b"data: {}\n\n"
        + stream_of(
            [
                {"type": "content_block_delta", "index": "0", "delta": {}},
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}},
                {"type": "content_block_start", "index": True, "content_block": {"type": "text"}},
                {"type": "content_block_stop", "index": None},
                {"type": "message_start", "message": {"id": "msg_2"}},
                {"type": "message_delta"},
                {"type": "brand_new_event"},
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": "ok"},
                },
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": "again"},
                },
                {"type": "message_stop"},
            ]
        )
    )
    out = render_response(stream, SSE)
    assert_sane(out, STREAM_TITLE)
    assert "id: msg_1" in out
    assert "msg_2" not in out
    assert "11 malformed event(s) skipped" in out
    assert "    event content_block_delta: " in out  # the first ones described
    assert "1 event(s) of a type this view does not know: brand_new_event" in out
    assert "assistant (in_progress): ok" in out  # no content_block_stop came
    assert "again" not in out


def test_events_after_an_error_and_oversized_events() -> None:
    events = [
        {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": "late"},
        },
    ]
    huge = b"event: content_block_delta\ndata: " + b"x" * (9 << 20) + b"\n\n"
    out = render_response(stream_of(events[:2]) + huge + stream_of(events[2:]), SSE)
    assert_sane(out, STREAM_TITLE)
    assert "status: error" in out  # the log's
    assert "1 event(s) after the error event" in out
    assert "1 oversized event(s) skipped" in out
    assert "usage: input 5 (uncached 5" in out
    assert len(out) < 3000


MESSAGE_KEYS = [
    "type", "role", "content", "text", "thinking", "data", "source", "media_type", "id", "name",
    "input", "server_name", "tool_use_id", "is_error", "error_code", "citations", "title", "url",
    "delta", "index", "content_block", "message", "usage", "stop_reason", "stop_sequence",
    "error", "partial_json", "input_tokens", "output_tokens", "cache_creation",
    "cache_read_input_tokens", "cache_creation_input_tokens", "server_tool_use", "service_tier",
    "signature", "file_id", "request_id",
]  # fmt: skip
LEAVES = [
    None, True, False, 0, -1, 3, 2**64 - 1, 1.5, -0.0, "", " ", "x", "\n", "[DONE]", '{"a": 1}',
    "text", "thinking", "redacted_thinking", "tool_use", "server_tool_use", "mcp_tool_use",
    "tool_result", "web_search_tool_result", "mcp_tool_result", "web_search_tool_result_error",
    "image", "document", "base64", "url", "file", "text_delta", "thinking_delta",
    "input_json_delta", "citations_delta", "signature_delta", "user", "assistant", "system",
    "<system-reminder>", "error", "message", "end_turn", "max_tokens",
]  # fmt: skip
BODY_KEYS = [
    "model", "messages", "system", "tools", "stream", "max_tokens", "thinking", "metadata",
    "tool_choice", "mcp_servers", "temperature", "type", "content", "stop_reason", "usage",
    "error", "id", "role", "output_config",
]  # fmt: skip
EVENT_TYPES = [
    "message_start", "content_block_start", "content_block_delta", "content_block_stop",
    "message_delta", "message_stop", "ping", "error",
]  # fmt: skip


def random_json(rng: random.Random, keys: list[str] = MESSAGE_KEYS, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        return rng.choice(LEAVES)
    if roll < 0.6:
        return [random_json(rng, MESSAGE_KEYS, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(keys): random_json(rng, MESSAGE_KEYS, depth + 1) for _ in range(rng.randrange(7))
    }


def test_any_json_body() -> None:
    rng = random.Random(20251201)
    for _ in range(600):
        data = orjson.dumps(random_json(rng, BODY_KEYS, depth=-1))
        for out in (
            render_request(data, "messages"),
            render_response(data, JSON, "messages"),
            render_body(data, None, "messages"),
        ):
            assert out.startswith(("Messages API", "Not a Messages API")), data
            assert INTERNAL_FAILURE not in out, data


def test_any_event_stream() -> None:
    rng = random.Random(20251202)
    for _ in range(400):
        events = []
        for _ in range(rng.randrange(12)):
            value = random_json(rng, depth=-1)
            kind = rng.choice(EVENT_TYPES)
            events.append({**value, "type": kind} if isinstance(value, dict) else value)
        out = render_response(stream_of(events), SSE, "messages")
        assert_sane(out, STREAM_TITLE)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value: dict keys and list positions, down to the leaves."""
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        yield (*prefix, key)
        yield from paths(child, (*prefix, key))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    out = copy.deepcopy(value)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return out


WRONG = [None, True, -1, 2**64 - 1, 1.5, "", "x" * 5000, [], [None], {}, {"type": 1}]


@pytest.mark.parametrize("name", SCENARIOS)
def test_wrong_type_in_every_place(name: str) -> None:
    """Each value of the fixture's request, body or events swapped for each wrong type."""
    request, response, content_type, _ = fixture(name)
    rng = random.Random(name)
    obj = orjson.loads(request)
    for path in paths(obj):
        for new in rng.sample(WRONG, 4):
            out = render_request(orjson.dumps(replaced(obj, path, new)), "messages")
            assert_sane(out, REQUEST_TITLE)
    if content_type == JSON:
        body = orjson.loads(response)
        for path in paths(body):
            for new in rng.sample(WRONG, 4):
                data = orjson.dumps(replaced(body, path, new))
                out = render_response(data, JSON, "messages")
                assert out.startswith("Messages API"), data
                assert INTERNAL_FAILURE not in out
        return
    events = [event for _, event in events_of(response)]
    for position, event in enumerate(events):
        for path in paths(event):
            for new in rng.sample(WRONG, 3):
                changed = [*events[:position], replaced(event, path, new), *events[position + 1 :]]
                assert_sane(render_response(stream_of(changed), SSE, "messages"), STREAM_TITLE)


def test_deep_nesting() -> None:
    # As deep as orjson reads (1024 levels; it writes 254 at most, so the bodies are spelled
    # by hand): a tool input, nested tool results, nested content.
    deep_input = "[" * 1000 + "1" + "]" * 1000
    results = '[{"type":"tool_result","tool_use_id":"t","content":' * 500 + '"x"' + "}]" * 500
    request = '{"model":"m","messages":[{"role":"user","content":' + results + "}]}"
    out = render_request(request.encode())
    assert_sane(out, REQUEST_TITLE)
    assert "← t: " in out
    start = (
        '{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","name":"f"}}'
    )
    delta = {"type": "content_block_delta", "index": 0}
    delta["delta"] = {"type": "input_json_delta", "partial_json": deep_input}
    nested = results[1:-1]  # one tool_result block, 999 levels deep
    stream = (
        f"data: {start}\n\n".encode()
        + stream_of([delta, {"type": "content_block_stop", "index": 0}])
        + f'data: {{"type":"content_block_start","index":1,"content_block":{nested}}}\n\n'.encode()
    )
    out = render_response(stream, SSE)
    assert_sane(out, STREAM_TITLE)
    assert "→ f" in out
    assert "← t: " in out
    buffered = '{"type":"message","content":[{"type":"tool_use","name":"g","input":' + deep_input
    out = render_response((buffered + "}]}").encode(), JSON)
    assert out.startswith("Messages API response")
    assert "→ g" in out
    assert INTERNAL_FAILURE not in out


def test_huge_strings_stay_bounded() -> None:
    big = "A" * 10_000_000
    body = {
        "model": big,
        "max_tokens": big,
        "system": [{"type": "text", "text": big}] * 3,
        "thinking": {"type": big, big[:100]: 1},
        "metadata": {"user_id": big},
        "tools": [{"name": big, "type": big}],
        "messages": [
            {"role": big, "content": big},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": big},
                    {"type": "image", "source": {"type": "base64", "media_type": big, "data": big}},
                ],
            },
        ],
    }
    out = render_request(orjson.dumps(body))
    assert_sane(out, REQUEST_TITLE)
    assert len(out) < 20_000
    message = {
        "type": "message",
        "id": big,
        "model": big,
        "stop_reason": big,
        "content": [
            {"type": "text", "text": big},
            {"type": "tool_use", "id": big, "name": big, "input": {"k": big}},
        ],
        "usage": {"input_tokens": 1, "service_tier": big, "server_tool_use": {big: big}},
    }
    out = render_response(orjson.dumps(message), JSON)
    assert out.startswith("Messages API response")
    assert len(out) < 20_000


def test_huge_stream_stays_bounded() -> None:
    text_delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}
    text_delta["delta"]["text"] = "y" * 50
    delta = stream_of([text_delta])
    stream = (
        stream_of(
            [
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }
            ]
        )
        + delta * 200_000  # 10 MB of text
        + stream_of(
            [
                {
                    "type": "content_block_start",
                    "index": 1,
                    "content_block": {"type": "tool_use", "name": "big"},
                }
            ]
            + [
                {
                    "type": "content_block_delta",
                    "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": '"' + "z" * 9999},
                }
            ]
            * 100
            + [{"type": "content_block_stop", "index": i} for i in range(2)]
            + [
                {
                    "type": "content_block_start",
                    "index": i,
                    "content_block": {"type": "text", "text": "t"},
                }
                for i in range(2, 3000)
            ]
        )
    )
    out = render_response(stream, SSE)
    assert_sane(out, STREAM_TITLE)
    assert "assistant: " + "y" * 6000 + f"… [{200_000 * 50 - 6000} more chars]" in out
    # 100 pieces of 10,000 characters: past 256 KiB only the head is kept, unparsed.
    assert "→ big\n" in out
    assert f"… [{100 * 10_000 - 3800} more chars; over 256 KiB, not parsed]" in out
    assert "2000 content block(s) past the view's 1000 not shown" in out
    assert len(out) < 60_000


def test_long_histories_stay_bounded() -> None:
    turn = [{"role": "user", "content": "q" * 1000}, {"role": "assistant", "content": "a" * 1000}]
    many_blocks = [{"type": "text", "text": f"block {i}"} for i in range(100_000)]
    body = {
        "model": "m",
        "tools": [{"name": f"tool{i}"} for i in range(10_000)],
        "system": [{"type": "text", "text": "s"}] * 10_000,
        "messages": turn * 10_000 + [{"role": "user", "content": many_blocks}],
    }
    out = render_request(orjson.dumps(body))
    assert_sane(out, REQUEST_TITLE)
    assert "messages (20001):" in out
    assert "earlier messages not shown]" in out
    assert "[99920 blocks not shown]" in out
    assert "[prompt] block 99999" in out  # the latest turn is the one kept
    assert "tools (10000): tool0, " in out and "… [9900 more]" in out
    assert "… [9900 more blocks]" in out
    assert len(out) < 400_000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_garbage_bytes(data: bytes) -> None:
    for out in (
        render_request(data, "messages"),
        render_response(data, JSON, "messages"),
        render_response(data, SSE, "messages"),
        render_response(data, "", "messages"),
        render_body(data, None, "messages"),
    ):
        assert out.startswith(("Messages API", "Not a Messages API")), out[:200]
        assert INTERNAL_FAILURE not in out


# --------------------------------------------------------------- which API, for which flow


def test_body_shape_decides_without_an_api() -> None:
    request, response, _, _ = fixture("tool_use_streamed")
    assert render_request(request).startswith(REQUEST_TITLE)
    assert render_response(response, SSE).startswith(STREAM_TITLE)
    assert render_response(response, "").startswith(STREAM_TITLE)  # sniffed as a stream
    assert render_body(response).startswith(STREAM_TITLE)
    _, response, _, _ = fixture("tool_use_buffered")
    assert render_response(response, JSON).startswith("Messages API response\n")
    assert render_body(response).startswith("Messages API response\n")
    assert render_body(request).startswith(REQUEST_TITLE)
    _, error, _, _ = fixture("overloaded_529_buffered")
    assert render_body(error).startswith("Messages API error")
    # An unnamed event stream is judged by its events' types.
    stream = b"".join(
        b"data: " + orjson.dumps(event) + b"\n\n"
        for _, event in events_of(fixture("text_streamed")[1])
    )
    assert render_response(stream, SSE).startswith(STREAM_TITLE)
    # The API given wins over the shape.
    assert render_request(request, "responses").startswith("Responses API request")


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/messages?beta=true", None),  # by path alone, as Claude Code sends it
        ("/anthropic/v1/messages", None),  # under a route prefix
        ("/v1/messages?beta=true", "messages"),  # as the bridge notes it
        ("/deployments/claude/invoke", "messages"),  # a path that says nothing
    ],
)
def test_view_is_chosen_for_a_messages_flow(path: str, api: str | None) -> None:
    request = (CAPTURED / "tool_turn2.request.json").read_bytes()
    response = (CAPTURED / "tool_turn1.response.sse").read_bytes()
    flow = flow_of(request, response, "text/event-stream; charset=utf-8", path, api)
    shown = contentviews.prettify_message(flow.request, flow)
    assert shown.view_name == NAME
    assert shown.text.startswith(REQUEST_TITLE)
    assert "← toolu_01CaptureBashEchoHi0001: hi" in shown.text
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == NAME
    assert shown.text.startswith(STREAM_TITLE)
    assert "→ Bash  id=toolu_01CaptureBashEchoHi0001" in shown.text


@pytest.mark.usefixtures("registered")
def test_buffered_messages_flow_and_its_error() -> None:
    request, response, _, _ = fixture("tool_use_buffered")
    flow = flow_of(request, response, JSON, "/anthropic/v1/messages")
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == NAME
    assert "→ get_time  id=toolu_01Hc2jEe6dAg0xSt4uRw9YzK" in shown.text
    request, response, _, _ = fixture("overloaded_529_buffered")
    flow = flow_of(request, response, JSON, "/v1/messages", "messages")
    flow.response.status_code = 529
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == NAME
    assert shown.text.startswith("Messages API error\nerror: overloaded_error: Overloaded")


def test_the_noted_api_wins_over_path_and_shape() -> None:
    request, _, _, _ = fixture("text_streamed")
    flow = flow_of(request, b"", JSON, "/v1/responses", "messages")
    meta = Metadata(flow=flow, http_message=flow.request, content_type=JSON)
    assert VIEW.render_priority(request, meta) == PRIORITY
    assert VIEW.prettify(request, meta).startswith(REQUEST_TITLE)
    # A flow of an API the view has no renderer for keeps the usual view; chosen by hand,
    # the body's shape decides.
    flow.metadata[FLOW_METADATA_KEY]["api"] = "embeddings"
    assert VIEW.render_priority(request, meta) == 0
    assert VIEW.prettify(request, meta).startswith(REQUEST_TITLE)
    # Bridged without a note of its API, on a path that says nothing: the body's shape.
    flow = flow_of(request, b"", JSON, "/deployments/claude/invoke")
    flow.metadata[FLOW_METADATA_KEY] = {"interception_id": "x"}
    meta = Metadata(flow=flow, http_message=flow.request, content_type=JSON)
    assert VIEW.render_priority(request, meta) == PRIORITY
    assert VIEW.prettify(request, meta).startswith(REQUEST_TITLE)


@pytest.mark.usefixtures("registered")
def test_only_the_messages_path_is_taken_by_path() -> None:
    request, response, _, _ = fixture("text_buffered")
    flow = flow_of(request, response, JSON, "/v1/messages/")
    assert contentviews.prettify_message(flow.response, flow).view_name == NAME
    for path in ("/v1/messages/count_tokens", "/v1/models", "/v1/messages/batches", "/v1/msg"):
        flow = flow_of(request, response, JSON, path)
        assert contentviews.prettify_message(flow.response, flow).view_name == "JSON", path


def test_every_bridged_api_has_a_renderer() -> None:
    from aibridge.apis import APIS
    from aibridge.view import RENDERERS

    assert {api.name for api in APIS} <= set(RENDERERS)
