"""The "AI Bridge" view of OpenAI Chat Completions flows (aibridge.view.chat, chosen through
aibridge.contentview): golden fixtures, real OpenCode bodies, hostile bodies, which API a body
or flow is read as."""

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

from aibridge.apis import openai_chat as oc
from aibridge.apis import openai_errors
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
from aibridge.view import chat
from tests.test_contentview import assert_shown, flow_of, leaves, registered  # noqa: F401
from tests.test_contentview import fixture as responses_fixture

FIXTURES = Path(__file__).parent / "fixtures" / "openai_chat"
CAPTURED = Path(__file__).parent / "fixtures" / "opencode_captured"
MESSAGES_FIXTURES = Path(__file__).parent / "fixtures" / "anthropic_messages"
CLAUDE_CODE = Path(__file__).parent / "fixtures" / "claude_code_captured"
RESPONSES_FIXTURES = Path(__file__).parent / "fixtures"
SCENARIOS = sorted(p.name.removesuffix(".request.json") for p in FIXTURES.glob("*.request.json"))
STREAMED = [n for n in SCENARIOS if (FIXTURES / f"{n}.response.sse").exists()]
OPENCODE = sorted(p.name.removesuffix(".request.json") for p in CAPTURED.glob("*.request.json"))
API = "chat_completions"
SSE = "text/event-stream"
JSON = "application/json"
# What render_* say when their own code failed (as opposed to a body they cannot read).
INTERNAL_FAILURE = "could not render"
REQUEST_TITLE = "Chat Completions request"
RESPONSE_TITLE = "Chat Completions response\n"
STREAM_TITLE = "Chat Completions response (streamed"
ERROR_TITLE = "Chat Completions error"
TITLES = ("Chat Completions", "Not a Chat Completions")


def fixture(name: str) -> tuple[bytes, bytes, str, dict[str, Any]]:
    """Request body, response body, response content type and expected records."""
    return responses_fixture(name, FIXTURES)


def chunks_of(stream: bytes) -> list[Any]:
    """The decoded ``data:`` chunks of a stream, ``[DONE]`` and undecodable ones left out."""
    parser = SSEParser()
    out = []
    for event in parser.feed(stream) + parser.close():
        try:
            out.append(orjson.loads(event.data))
        except orjson.JSONDecodeError:
            continue
    return out


def stream_of(chunks: list[Any], done: bool = True) -> bytes:
    """Chunks framed as OpenAI sends them: ``data: <JSON>`` without event names."""
    body = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def chunk(delta: dict[str, Any], index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def logged(stream: bytes) -> oc.ChatAccumulator:
    """What the log makes of a stream: the tee's parser, each unnamed event fed as it is."""
    parser = SSEParser(max_event_bytes=8 << 20, wanted=None)
    accumulator = oc.ChatAccumulator()
    for event in parser.feed(stream) + parser.close():
        accumulator.feed_event(event.event, event.data)
    return accumulator


def usage_text(usage: dict[str, Any]) -> str:
    """The log's token_usages row as the view shows it (unknown counts as ``?``)."""
    n = {k: "?" if v is None else v for k, v in usage.items()}
    return (
        f"usage: input {n['input_tokens']} (cached {n['cache_read_input_tokens']}) · "
        f"output {n['output_tokens']} (reasoning {n['reasoning_tokens']}) · "
        f"total {n['total_tokens']}"
    )


def assert_sane(out: str, title: str = "Chat Completions") -> None:
    assert isinstance(out, str)
    assert out.startswith(title), out[:300]
    assert INTERNAL_FAILURE not in out, out[:2000]


def request(messages: list[Any], **fields: Any) -> bytes:
    return orjson.dumps({"model": "gpt-4o", **fields, "messages": messages})


# ------------------------------------------------------------------------- golden fixtures


@pytest.mark.parametrize("name", SCENARIOS)
def test_request_fixture(name: str) -> None:
    body, _, _, expected = fixture(name)
    out = render_request(body)  # by its shape: no API given
    assert out == render_request(body, API)
    req = expected["request"]
    obj = orjson.loads(body)
    assert out.startswith(REQUEST_TITLE + "\n")
    assert f"model: {req['model']}" in out
    if req["stream"]:
        usage = (req["metadata"] or {}).get("stream_usage")
        requested = "usage: requested" if usage == oc.USAGE_REQUESTED else "usage: not requested"
        assert f"stream: true · {requested}" in out
    else:
        assert "stream: unset" in out or "stream: false" in out
    if req["prompt"] is not None:
        assert_shown(f"logged prompt: {req['prompt']}", out)
        # Marked once, on the message the log took it from: the last user message.
        assert out.count("[prompt]") == 1
        assert "\n\nuser [prompt]" in out
        after = out.split("[prompt]", 1)[1]
        assert_shown(req["prompt"], after)
    else:
        assert "[prompt]" not in out
    if call_id := req["correlating_tool_call_id"]:
        assert f"logged prompt: none (answers tool_call_id {call_id})" in out
        assert f"← {call_id}: " in out
    if req["session_id"]:
        assert f"session: {req['session_id']}" in out
    for tool in obj.get("tools") or []:
        assert tool["function"]["name"] in out
    for message in obj["messages"]:
        if message["role"] in ("system", "developer") and isinstance(message["content"], str):
            assert f"{message['role']}: {message['content'][:60]}" in out
        for call in message.get("tool_calls") or []:
            assert f"→ {call['function']['name']}(" in out
            assert f"id={call['id']}" in out


@pytest.mark.parametrize("name", SCENARIOS)
def test_response_fixture(name: str) -> None:
    _, body, content_type, expected = fixture(name)
    out = render_response(body, content_type, API)
    result = expected["result"]
    assert INTERNAL_FAILURE not in out
    if content_type == JSON and "choices" not in orjson.loads(body):  # the 400 body
        assert out.startswith(ERROR_TITLE + "\n")
        assert f"error: {result['error_code']}: {result['error']}" in out
        return
    assert out.startswith(STREAM_TITLE if content_type == SSE else RESPONSE_TITLE)
    for key, label in (("response_id", "id"), ("response_model", "model")):
        assert f"{label}: {result[key]}\n" in out
    if result["status"] is not None:
        assert f"status: {result['status']}\n" in out
    else:
        assert "status: " not in out
        assert "the stream has no data: [DONE]" in out
    if result["status"] == "error":
        assert f"error: {result['error_code']}: {result['error']}" in out
    elif result["error"]:  # a finish reason kept (on the finish line), or the refusal
        finish = next(line for line in out.split("\n") if line.startswith("finish_reason"))
        assert result["error"] in finish.split(": ", 1)[1].split(", ") or (
            f"\nerror: {result['error']}\n" in out
        )
    if usage := result["token_usage"]:
        assert usage_text(usage) in out
        if usage["service_tier"]:
            assert f"tier {usage['service_tier']}" in out
    else:
        assert "usage: " not in out
        if result["status"] != "error":
            assert "no usage" in out
    for call in result["tool_usages"]:
        assert f"→ {call['tool']}  id={call['call_id']}" in out
        if isinstance(call["args"], str):
            assert_shown(call["args"], out)
        elif call["args"] is not None:
            for leaf in leaves(call["args"]):
                assert orjson.dumps(leaf).decode() in out
    for thought in result["thoughts"]:
        assert "[reasoning] " in out
        assert_shown(thought["content"], out)
    if result["malformed_events"]:
        assert f"note: {result['malformed_events']} malformed chunk(s) skipped" in out
    else:
        assert "malformed" not in out


@pytest.mark.parametrize("name", STREAMED)
def test_streamed_content_is_assembled_per_choice(name: str) -> None:
    _, body, _, _ = fixture(name)
    texts: dict[int, list[str]] = {}
    for data in chunks_of(body):
        for entry in data.get("choices") or []:
            content = (entry.get("delta") or {}).get("content")
            if isinstance(content, str):
                texts.setdefault(entry["index"], []).append(content)
    out = render_response(body, SSE)  # sniffed as a Chat stream: no API given
    assert out == render_response(body, SSE, API)
    assert out.startswith(STREAM_TITLE)
    for pieces in texts.values():
        if "".join(pieces):
            assert_shown("".join(pieces), out)
            assert "assistant" in out


def test_parallel_calls_are_kept_apart() -> None:
    _, body, _, _ = fixture("parallel_tool_calls_streamed")
    out = render_response(body, SSE)
    paris = out.index("→ get_weather  id=call_Par1\n")
    tokyo = out.index("→ get_weather  id=call_Tok2\n")
    assert paris < out.index('"city": "Paris"') < tokyo < out.index('"city": "Tokyo"')


def test_fixture_details() -> None:
    # Two choices: each under its own heading, the reasons in the head.
    out = render_response(fixture("two_choices_buffered")[1], JSON)
    assert "finish_reasons: stop, length\n" in out
    assert "choice 0 (stop):\n    assistant: Miso" in out
    assert "choice 1 (length):\n    assistant: Pixel, a name that" in out
    # Non-JSON arguments as they came; JSON ones pretty-printed.
    out = render_response(fixture("tool_calls_buffered")[1], JSON)
    assert "→ bash  id=call_Ls4\n    ls -la (not JSON)" in out
    assert '→ get_weather  id=call_Oslo3\n    {\n      "city": "Oslo"\n    }' in out
    assert "usage: input 120 (cached 64)" in out
    # A cut stream: the call the cut went through is flagged, its arguments as they came.
    out = render_response(fixture("stream_cut_streamed")[1], SSE)
    assert "→ bash  id=call_Cut1 (in_progress)\n" in out
    assert '{"command":"ls -la","desc' in out
    # The error chunk ends the stream; what arrived before it is shown.
    out = render_response(fixture("error_chunk_streamed")[1], SSE)
    assert "status: error\nerror: 502: Provider returned error: overloaded" in out
    assert "assistant (in_progress): Let me think" in out
    assert "no usage" not in out and "no data: [DONE]" not in out
    # Azure's first chunk has no id or model: the log takes the next chunk's.
    out = render_response(fixture("content_filter_streamed")[1], SSE)
    assert "id: chatcmpl-BxBk\nmodel: gpt-4o-2024-11-20\nstatus: completed" in out
    assert "finish_reason: content_filter" in out
    assert "error: " not in out  # the log's error is the finish reason, shown once
    out = render_response(fixture("refusal_streamed")[1], SSE)
    assert "[refusal] I'm sorry, I can't help with that." in out
    assert "assistant" not in out
    out = render_response(fixture("no_done_streamed")[1], SSE)
    assert "note: no data: [DONE]: every choice has a finish_reason" in out
    # Requests: parts, roles and settings.
    out = render_request(fixture("multipart_prompt_buffered")[0])
    assert "user [prompt] (3 parts):\n    What is in this picture?\n    [image image/png" in out
    assert "iVBOR" not in out  # the image itself is never shown
    out = render_request(fixture("reasoning_tokens_buffered")[0])
    assert "settings: max_completion_tokens=4000, reasoning_effort=high" in out
    assert "developer: Be terse." in out
    out = render_request(fixture("refusal_streamed")[0])
    assert "response_format: json_schema (x)" in out
    out = render_request(fixture("two_choices_buffered")[0])
    assert "settings: n=2" in out


# ------------------------------------------------------------------------ OpenCode bodies


@pytest.mark.parametrize("name", OPENCODE)
def test_opencode_request(name: str) -> None:
    body = (CAPTURED / f"{name}.request.json").read_bytes()
    obj = orjson.loads(body)
    out = render_request(body)  # max_tokens and plain messages, yet Chat's: by its other signs
    assert out.startswith(REQUEST_TITLE)
    assert "stream: true · usage: requested (stream_options.include_usage)" in out
    assert "settings: max_tokens=32000" in out
    if obj.get("tools"):
        names = ", ".join(tool["function"]["name"] for tool in obj["tools"])
        assert f"tools (10): {names}" in out
    # The 30,000-character system prompt is shortened hard.
    system = obj["messages"][0]["content"]
    assert len(system) > 2000 and system not in out
    assert "system: You are " in out and "more chars]" in out
    prompt = oc.prompt_from_messages(obj["messages"])
    if prompt is None:
        assert "logged prompt: none (answers tool_call_id call_cap1)" in out
        assert "assistant:\n    → bash(" in out
        assert '{"command":"echo hi","description":"Run the command"})  id=call_cap1' in out
        assert "← call_cap1: hi" in out
        assert "(empty)" not in out  # the call turn's "" content is not shown
    else:
        assert out.count("[prompt]") == 1
        assert out.endswith(f"user [prompt]: {prompt}")
    assert len(out) < 5000


@pytest.mark.parametrize("name", ["say_hi", "title", "tool_turn1", "tool_turn2"])
def test_opencode_response(name: str) -> None:
    body = (CAPTURED / f"{name}.response.sse").read_bytes()
    out = render_response(body, "text/event-stream; charset=utf-8")
    result = logged(body).result()
    assert out.startswith(STREAM_TITLE)
    assert f"status: {result.status}" in out
    assert result.token_usage is not None
    assert usage_text(result.token_usage) in out
    assert "usage: input 1001 (cached ?)" in out or name == "tool_turn2"  # the second request
    if name == "tool_turn1":
        assert '→ bash  id=call_cap1\n    {\n      "command": "echo hi",' in out
        assert "finish_reason: tool_calls" in out


# ----------------------------------------------------------------------- request shapes


def test_request_part_and_message_kinds() -> None:
    audio = "UklG" * 3000
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "name": "ana", "content": "first"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "they want a file",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "read", "arguments": "{}"}},
                {"id": "c2", "type": "custom", "custom": {"name": "patch", "input": "*** x"}},
                {"id": "c3", "type": "function", "function": {"name": "n", "arguments": {"a": 1}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "body"}]},
        {"role": "tool", "content": "no id"},
        {"role": "assistant", "function_call": {"name": "old", "arguments": '{"q":1}'}},
        {"role": "function", "name": "old", "content": "legacy result"},
        {
            "role": "assistant",
            "refusal": "I won't.",
            "content": [{"type": "refusal", "refusal": "no"}],
        },
        {"role": "assistant", "audio": {"id": "audio_1"}},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "high"}},
                {"type": "image_url", "image_url": "data:image/jpeg;base64," + "A" * 5000},
                {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                {
                    "type": "file",
                    "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
                },
                {"type": "file", "file": {"file_id": "file-9"}},
                {"type": "text", "text": 5},
                {"type": "video", "url": "v"},
                "loose",
                7,
            ],
        },
    ]
    out = render_request(
        request(
            messages,
            stream=False,
            stream_options={"include_usage": True},
            tool_choice={"type": "function", "function": {"name": "read"}},
            functions=[{"name": "old"}],
            temperature=0.2,
            response_format={"type": "json_object"},
            metadata={"session_id": "sess-1"},
            tools=[
                {"type": "function", "function": {"name": "read"}},
                {"type": "custom", "custom": {"name": "patch"}},
                {"type": "web_search"},
                "odd",
            ],
        )
    )
    assert_sane(out, REQUEST_TITLE)
    assert 'stream: false · stream_options: {"include_usage":true}' in out
    assert "settings: temperature=0.2" in out
    assert "response_format: json_object" in out
    assert "session: sess-1" in out
    assert 'tools (4): read, patch (custom), web_search, "odd"' in out
    assert "functions (1): old" in out
    assert 'tool_choice: {"type":"function","function":{"name":"read"}}' in out
    assert "logged prompt: none" in out  # the last user message has no text part
    assert "developer: Be brief." in out
    assert "user (ana): first" in out
    assert "assistant:\n    [reasoning] they want a file\n    → read({})  id=c1" in out
    assert "→ patch [custom](*** x)  id=c2" in out
    assert '→ n({"a":1})  id=c3' in out
    assert "← c1: body" in out
    assert "← ?: no id" in out
    assert '→ old [function_call]({"q":1})' in out
    assert "← old [function]: legacy result" in out
    assert "assistant (1 part):\n    [refusal] no\n    [refusal] I won't." in out
    assert "assistant:\n    [audio audio_1]" in out
    assert "user (9 parts):" in out
    assert "[image https://x/cat.png, detail high]" in out
    assert "[image image/jpeg, base64 5023 chars]" in out
    assert "[input_audio wav, base64 12000 chars]" in out
    assert "[file 'a.pdf' application/pdf, base64 32 chars]" in out
    assert "[file file-9]" in out
    assert "[text] 5" in out and '[video] {"url":"v"}' in out and "loose" in out and "[?] 7" in out
    assert "AAAA" not in out and "UklG" not in out and "JVBE" not in out


def test_stream_usage_and_refused_bodies() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    for options, shown in [
        (None, "usage: not requested"),
        ({}, "usage: not requested"),
        ({"include_usage": False}, "usage: not requested"),
        ({"include_usage": None}, "usage: not requested"),
        ({"include_usage": True}, "usage: requested"),
    ]:
        out = render_request(request(msgs, stream=True, stream_options=options))
        assert f"stream: true · {shown}" in out
        assert "refuses" not in out
    # Bodies the bridge answers with 400 are still shown, and say so.
    for fields, why in [
        ({"stream": "yes"}, "'stream' must be a boolean"),
        ({"model": 5}, "'model' must be a string"),
        ({"stream_options": {"include_usage": "yes"}}, "'stream_options.include_usage' must"),
        ({"metadata": []}, "'metadata' must be an object"),
    ]:
        out = render_request(orjson.dumps({"model": "m", "messages": msgs, **fields}), API)
        assert_sane(out, REQUEST_TITLE)
        assert f"note: the bridge refuses this request (400): {why}" in out
    out = render_request(orjson.dumps({"model": "m", "messages": "hi"}), API)
    assert "note: the bridge refuses this request (400): 'messages' must be an array" in out
    assert 'messages: "hi"' in out


PROMPT_CASES: list[list[Any]] = [
    # The same words earlier are not the prompt; trailing system/developer messages skipped.
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hi"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "hi"}],
        },
        {"role": "system", "content": "hi"},
        {"role": "developer", "content": "hi"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "one part"}]}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],  # a prefill
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": "q"}, "not a message"],
    [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c9", "content": "r"}],
    [{"role": "system", "content": "only instructions"}],
    [{"role": "user", "content": ""}],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url"},
                {"type": "text", "text": "b"},
            ],
        }
    ],
    [],
]


@pytest.mark.parametrize("messages", PROMPT_CASES)
def test_prompt_mark_follows_the_log(messages: list[Any]) -> None:
    out = render_request(request(messages))
    assert_sane(out, REQUEST_TITLE)
    prompt = oc.prompt_from_messages(messages)
    if prompt is None:
        assert "[prompt]" not in out
        call_id = oc.correlating_tool_call_id(messages)
        tail = f" (answers tool_call_id {call_id})" if call_id else ""
        assert f"logged prompt: none{tail}\n" in out
        return
    assert out.count("[prompt]") == 1
    assert_shown(f"logged prompt: {prompt}" if prompt else "logged prompt: (empty)", out)
    # The marked entry is the last user message, and it holds the logged text.
    entries = out.split("\n\n")
    marked = [e for e in entries if "[prompt]" in e.split("\n")[0]]
    assert len(marked) == 1 and marked[0].startswith("user [prompt]")
    users = [e for e in entries if e.startswith("user")]
    assert users[-1] == marked[0]
    assert_shown(prompt, marked[0])


# ---------------------------------------------------------------------- response shapes


def test_stream_delta_kinds() -> None:
    chunks = [
        {"choices": [], "prompt_filter_results": []},  # Azure's first chunk: nothing to show
        chunk({"role": "assistant", "content": "", "refusal": None}),
        chunk({"reasoning": "hmm, "}),
        chunk({"reasoning": "ok"}),
        chunk({"content": [{"type": "text", "text": "parts "}]}),
        chunk({"content": "text", "annotations": [{"type": "url_citation"}] * 2}),
        chunk({"audio": {"transcript": "spoken"}}),
        chunk({"function_call": {"name": "legacy", "arguments": '{"a":'}}),
        chunk({"function_call": {"arguments": "1}"}}),
        chunk(
            {"tool_calls": [{"type": "custom", "custom": {"name": "patch", "input": "*** Begin"}}]}
        ),
        chunk(
            {
                "tool_calls": [
                    {"index": 5, "id": "c5", "function": {"name": "f", "arguments": {"k": [1]}}}
                ]
            }
        ),
        chunk({}, finish="tool_calls"),
        {
            "id": "other",
            "model": "other",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4},
        },
    ]
    out = render_response(stream_of(chunks), SSE)
    assert_sane(out, STREAM_TITLE)
    assert "(streamed: 13 chunks)" in out
    assert "id: chatcmpl-1\nmodel: gpt-4o\nstatus: completed\nfinish_reason: tool_calls" in out
    assert "usage: input 9 (cached ?) · output 4 (reasoning ?) · total 13" in out
    assert "[reasoning] hmm, ok\n\nassistant: [2 annotations] parts text" in out
    assert "[audio] spoken" in out
    assert '→ legacy [function_call]\n    {\n      "a": 1\n    }' in out
    assert "→ patch [custom]\n    *** Begin" in out
    assert '→ f  id=c5\n    {\n      "k": [\n        1' in out
    assert "note" not in out


def test_stream_ends_and_skipped_events() -> None:
    text = [chunk({"content": "kept"}), chunk({}, finish="stop")]
    after = [chunk({"content": "LATE"})]
    # After [DONE], after an error chunk: the log reads nothing more, nor does the view.
    out = render_response(stream_of(text) + stream_of(after), SSE)
    assert "note: 2 chunk(s) after data: [DONE] (the log stops there)" in out  # + its [DONE]
    assert "LATE" not in out and "assistant: kept" in out
    error = {"error": {"message": "boom", "type": "server_error"}}
    out = render_response(stream_of([text[0], error, *after], done=False), SSE)
    assert "status: error\nerror: server_error: boom" in out
    assert "note: 1 chunk(s) after the error chunk (the log stops there)" in out
    assert "LATE" not in out and "assistant (in_progress): kept" in out
    # Named events are passed over by the tee's parser: the view says so and skips them too.
    named = b"event: message\ndata: " + orjson.dumps(chunk({"content": "NAMED"})) + b"\n\n"
    out = render_response(named + stream_of(text), SSE)
    assert "note: 1 named event(s) skipped" in out and "NAMED" not in out
    assert "assistant: kept" in out
    # Without [DONE]: finished choices end it for the log; unfinished ones do not.
    out = render_response(stream_of(text, done=False), SSE)
    assert "status: completed" in out and "note: no data: [DONE]: every choice" in out
    out = render_response(stream_of(text[:1], done=False), SSE)
    assert "status: " not in out and "note: the stream has no data: [DONE]" in out
    # Empty data lines and comments carry nothing.
    out = render_response(b": keep-alive\n\ndata:\n\n" + stream_of(text), SSE)
    assert "(streamed: 2 chunks)" in out and "malformed" not in out
    assert out.count("note: ") == 1  # only: no usage chunk


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        ({"message": "Overloaded", "code": 529}, "error: 529: Overloaded"),
        ({"message": "m", "type": "server_error", "code": None}, "error: server_error: m"),
        ({"type": "rate_limit"}, "error: rate_limit"),
        ({"message": "only a message"}, "error: only a message"),
        ("flat text", "error: flat text"),
        ({}, "error: (no message)"),
        (7, "error: 7"),
        ([1, 2], "error: [1,2]"),
        ({"message": "x" * 50_000}, "more chars]"),
    ],
)
def test_error_chunks_and_bodies(error: Any, shown: str) -> None:
    stream = stream_of([chunk({"content": "a"}), {"error": error}], done=False)
    out = render_response(stream, SSE, API)
    assert_sane(out, STREAM_TITLE)
    assert "status: error" in out
    assert "error: " in out
    if not isinstance(error, int | list):  # the log keeps no text for those: shown raw in bodies
        assert shown in out
    assert len(out) < 3000
    out = render_response(orjson.dumps({"error": error}), JSON, API)
    assert out.startswith(ERROR_TITLE + "\n"), out
    assert shown in out
    assert len(out) < 2000


def test_bridge_error_bodies() -> None:
    for status, message in [
        (401, "unknown token"),
        (400, "'stream' must be a boolean"),
        (502, "x"),
    ]:
        body = openai_errors.error_body(status, message)
        out = render_response(body, JSON, API)
        assert out.startswith(f"{ERROR_TITLE}\nerror: {status}: {message}\ntype: ")
        # Without an API the shape cannot tell which OpenAI API it is: the view's default.
        assert render_response(body, JSON).startswith("Responses API error")
    _, body, _, _ = fixture("invalid_request_400_buffered")
    out = render_response(body, JSON, API)
    assert out.endswith("type: invalid_request_error · param: temperature")


def test_buffered_odd_shapes() -> None:
    variants = {
        b'{"object": "chat.completion"}': "choices: none",
        b'{"choices": []}': "choices: none",
        b'{"choices": "x"}': 'note: choices is not a list: "x"',
        b'{"choices": [7, {"index": 1, "message": 5}]}': "note: 2 malformed field(s) ignored",
        b'{"choices": [{"message": {"tool_calls": "x"}}]}': "malformed field(s) ignored",
        b'{"choices": [{"message": {"content": "a"}, "finish_reason": 9}]}': "finish_reason: 9",
    }
    for body, shown in variants.items():
        out = render_response(body, JSON, API)
        assert_sane(out, RESPONSE_TITLE)
        assert shown in out, out
        assert "note: no usage in the body" in out


# ------------------------------------------------------------------------- hostile bodies


@pytest.mark.parametrize("name", SCENARIOS)
def test_truncated_bodies_never_raise(name: str) -> None:
    request_body, response, content_type, _ = fixture(name)
    for cut in range(0, max(len(request_body), len(response)), 7):
        out = render_request(request_body[:cut], API)
        assert out.startswith((REQUEST_TITLE, "Not a Chat Completions request")), out[:200]
        assert INTERNAL_FAILURE not in out
        out = render_response(response[:cut], content_type, API)
        assert out.startswith(TITLES), out[:200]
        assert INTERNAL_FAILURE not in out


@pytest.mark.parametrize("name", STREAMED)
def test_every_cut_of_a_stream(name: str) -> None:
    _, body, _, _ = fixture(name)
    for cut in range(len(body)):
        out = render_response(body[:cut], SSE, API)
        assert_sane(out, STREAM_TITLE)
        result = logged(body[:cut]).result()
        if result.status is not None:  # the view's status is the log's, at every cut
            assert f"status: {result.status}\n" in out


def test_not_json_bodies() -> None:
    for body in [
        b"",
        b"   ",
        b"{",
        b"[1, 2]",
        b'"text"',
        b"null",
        b"\xff\xfe{}",
        b"{'a': 1}",
        b"<html>",
    ]:
        out = render_request(body, API)
        assert out.startswith("Not a Chat Completions request"), body
        out = render_response(body, JSON, API)
        assert out.startswith("Not a Chat Completions response"), body
    stream = b'data: {not json\n\ndata: [1]\n\ndata: "s"\n\ndata: null\n\n' + stream_of(
        [chunk({"content": "ok"}, finish="stop")]
    )
    out = render_response(stream, SSE)
    assert_sane(out, STREAM_TITLE)
    assert "note: 4 malformed chunk(s) skipped\n    chunk 1: " in out
    assert "chunk 2: JSON list, not an object" in out
    assert "assistant: ok" in out


CHAT_KEYS = [
    "model", "stream", "stream_options", "messages", "role", "content", "type", "text",
    "image_url", "url", "tool_calls", "tool_call_id", "function", "name", "arguments", "id",
    "index", "choices", "delta", "message", "finish_reason", "usage", "prompt_tokens",
    "completion_tokens", "prompt_tokens_details", "cached_tokens", "error", "refusal",
    "reasoning_content", "reasoning", "object", "tools", "custom", "input", "n",
]  # fmt: skip
LEAVES = [None, True, False, 0, -1, 2**63, 1.5, "", "x", "chat.completion.chunk", "user",
          "assistant", "tool", "stop", "length", "text", "function", [], {}]  # fmt: skip


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        return rng.choice(LEAVES)
    if roll < 0.6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(CHAT_KEYS): random_json(rng, depth + 1) for _ in range(rng.randrange(7))}


def test_any_json_body() -> None:
    rng = random.Random(20251203)
    for _ in range(800):
        data = orjson.dumps(random_json(rng, depth=-1))
        for out in (
            render_request(data, API),
            render_response(data, JSON, API),
            render_body(data, None, API),
        ):
            assert out.startswith(TITLES), data
            assert INTERNAL_FAILURE not in out, data


def test_any_chunk_stream() -> None:
    rng = random.Random(20251204)
    for _ in range(500):
        chunks = []
        for _ in range(rng.randrange(12)):
            value = random_json(rng, depth=-1)
            if isinstance(value, dict) and rng.random() < 0.7:
                value = {"object": "chat.completion.chunk", "choices": [value], **value}
            chunks.append(value)
        out = render_response(stream_of(chunks, done=rng.random() < 0.5), SSE, API)
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


WRONG = [None, True, -1, 2**64 - 1, 1.5, "", "x" * 5000, [], [None], {}, {"type": 1}, [[[]]]]


@pytest.mark.parametrize("name", SCENARIOS)
def test_wrong_type_in_every_place(name: str) -> None:
    """Each value of the fixture's request, body or chunks swapped for each wrong type."""
    request_body, response, content_type, _ = fixture(name)
    rng = random.Random(name)
    obj = orjson.loads(request_body)
    for path in paths(obj):
        for new in rng.sample(WRONG, 4):
            out = render_request(orjson.dumps(replaced(obj, path, new)), API)
            assert_sane(out, REQUEST_TITLE)
    if content_type == JSON:
        body = orjson.loads(response)
        for path in paths(body):
            for new in rng.sample(WRONG, 4):
                assert_sane(render_response(orjson.dumps(replaced(body, path, new)), JSON, API))
        return
    chunks = chunks_of(response)
    for position, data in enumerate(chunks):
        for path in paths(data):
            for new in rng.sample(WRONG, 3):
                changed = [*chunks[:position], replaced(data, path, new), *chunks[position + 1 :]]
                assert_sane(render_response(stream_of(changed), SSE, API), STREAM_TITLE)


def test_deep_nesting() -> None:
    # As deep as orjson reads (1024 levels; it writes 254 at most, so spelled by hand).
    deep = "[" * 1000 + "1" + "]" * 1000
    parts = '[{"type":"text","text":' * 400 + '"x"' + "}]" * 400
    body = (
        '{"model":"m","tools":' + deep + ',"messages":[{"role":"tool","tool_call_id":"t",'
        '"content":' + parts + '},{"role":"user","content":' + deep + "}]}"
    )
    out = render_request(body.encode())
    assert_sane(out, REQUEST_TITLE)
    assert "← t: " in out
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": deep}}
    stream = stream_of([chunk({"tool_calls": [call]}), chunk({}, finish="tool_calls")])
    structured = (
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":'
        b'{"name":"g","arguments":' + deep.encode() + b"}}]}}]}\n\n"
    )
    out = render_response(stream + structured, SSE)
    assert_sane(out, STREAM_TITLE)
    assert "→ f  id=c\n" in out
    buffered = (
        '{"object":"chat.completion","choices":[{"message":{"tool_calls":[{"function":'
        '{"name":"g","arguments":' + deep + '}}],"content":' + parts + "}}]}"
    )
    out = render_response(buffered.encode(), JSON)
    assert_sane(out, RESPONSE_TITLE)
    assert "→ g" in out
    assert "malformed field(s) ignored" in out  # arguments orjson cannot write


def test_huge_strings_stay_bounded() -> None:
    big = "A" * 10_000_000
    message = {"role": big, "content": big, "name": big, "tool_call_id": big}
    body = {
        "model": big,
        "stream": True,
        "temperature": big,
        "response_format": {"type": big, "json_schema": {"name": big}},
        "tools": [{"type": "function", "function": {"name": big}}] * 3,
        "tool_choice": big,
        "metadata": {"session_id": big},
        "messages": [
            {"role": "system", "content": big},
            message,
            {"role": "tool", "tool_call_id": big, "content": big},
            {
                "role": "assistant",
                "content": big,
                "reasoning_content": big,
                "refusal": big,
                "tool_calls": [{"id": big, "function": {"name": big, "arguments": big}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": big},
                    {"type": "image_url", "image_url": {"url": "data:" + big, "detail": big}},
                    {"type": "input_audio", "input_audio": {"data": big, "format": big}},
                    {"type": "file", "file": {"filename": big, "file_data": big}},
                ],
            },
        ],
    }
    out = render_request(orjson.dumps(body))
    assert_sane(out, REQUEST_TITLE)
    assert len(out) < 40_000
    response = {
        "id": big,
        "model": big,
        "object": "chat.completion",
        "service_tier": "t" * 100,
        "choices": [
            {
                "message": {
                    "role": big,
                    "content": big,
                    "reasoning_content": big,
                    "refusal": big,
                    "tool_calls": [
                        {"id": big, "type": big, "function": {"name": big, "arguments": big}}
                    ],
                },
                "finish_reason": big,
            }
        ],
        "usage": {"prompt_tokens": 1, "prompt_tokens_details": {big: 1}},
    }
    out = render_response(orjson.dumps(response), JSON)
    assert_sane(out, RESPONSE_TITLE)
    assert len(out) < 40_000
    out = render_response(
        orjson.dumps({"error": {"message": big, "type": big, "code": big}}), JSON, API
    )
    assert out.startswith(ERROR_TITLE) and len(out) < 3000


def test_huge_stream_stays_bounded() -> None:
    text = stream_of([chunk({"content": "y" * 50})], done=False)
    reasoning = stream_of([chunk({"reasoning_content": "r" * 50})], done=False)
    piece = {"index": 0, "function": {"arguments": '"' + "z" * 9999}}
    head = {"index": 0, "id": "big", "function": {"name": "big", "arguments": ""}}
    calls = stream_of(
        [chunk({"tool_calls": [head]}, index=1)]
        + [chunk({"tool_calls": [piece]}, index=1)] * 100
        + [chunk({"tool_calls": [{"index": i, "id": f"c{i}"}]}, index=2) for i in range(2000)]
        + [chunk({"content": "t"}, index=i) for i in range(3, 3000)],
    )
    stream = text * 200_000 + reasoning * 1000 + calls  # 10 MB of text
    out = render_response(stream, SSE)
    assert_sane(out, STREAM_TITLE)
    assert "assistant (in_progress): " + "y" * 6000 + f"… [{200_000 * 50 - 6000} more chars]" in out
    assert "[reasoning] (in_progress) " + "r" * 6000 + f"… [{50_000 - 6000} more chars]" in out
    # 100 pieces of 10,000 characters: past 256 KiB only the head is kept, unparsed.
    assert f"… [{100 * 10_000 - 3800} more chars; over 256 KiB, not parsed]" in out
    assert "note: 1001 tool call(s) past the view's 1000" in out  # 1 + 999 shown
    assert "note: 2936 choice(s) past the view's 64" in out
    assert len(out) < 250_000


def test_long_histories_stay_bounded() -> None:
    turn = [{"role": "user", "content": "q" * 1000}, {"role": "assistant", "content": "a" * 1000}]
    many_parts = [{"type": "text", "text": f"part {i}"} for i in range(100_000)]
    many_calls = [{"id": f"c{i}", "function": {"name": "f", "arguments": "{}"}} for i in range(500)]
    body = {
        "model": "m",
        "tools": [{"type": "function", "function": {"name": f"tool{i}"}} for i in range(10_000)],
        "messages": turn * 10_000
        + [
            {"role": "assistant", "tool_calls": many_calls},
            {"role": "user", "content": many_parts},
        ],
    }
    out = render_request(orjson.dumps(body))
    assert_sane(out, REQUEST_TITLE)
    assert "messages (20002):" in out
    assert "earlier messages not shown]" in out
    assert "… [99920 parts not shown]" in out
    assert "user [prompt] (100000 parts):" in out
    assert "    part 99999" in out  # the latest turn is the one kept
    assert "… [400 more tool calls]" in out
    assert "tools (10000): tool0, " in out and "… [9900 more]" in out
    assert len(out) < 400_000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_garbage_bytes(data: bytes) -> None:
    for out in (
        render_request(data, API),
        render_response(data, JSON, API),
        render_response(data, SSE, API),
        render_response(data, "", API),
        render_body(data, None, API),
    ):
        assert out.startswith(TITLES), out[:200]
        assert INTERNAL_FAILURE not in out


# --------------------------------------------------------------- which API, for which flow


def bodies(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.request.json"))]


def test_request_shape_tells_chat_from_messages() -> None:
    for body in bodies(FIXTURES) + bodies(CAPTURED):
        assert render_request(body).startswith(REQUEST_TITLE), body[:200]
    for body in bodies(MESSAGES_FIXTURES) + bodies(CLAUDE_CODE):
        assert render_request(body).startswith("Messages API request"), body[:200]
    for body in bodies(RESPONSES_FIXTURES):
        assert render_request(body).startswith("Responses API request"), body[:200]
    user = [{"role": "user", "content": "hi"}]
    # Without max_tokens (which Anthropic requires) a plain body is Chat's; with it, Anthropic's…
    assert chat.claims_request({"messages": user})
    assert not chat.claims_request({"max_tokens": 9, "messages": user})
    # …unless something only Chat has is there too.
    chat_signs: list[dict[str, Any]] = [
        {"stream_options": {"include_usage": True}},
        {"max_completion_tokens": 5},
        {"n": 2},
        {"response_format": {"type": "json_object"}},
        {"reasoning_effort": "low"},
        {"tool_choice": "auto"},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"messages": [{"role": "system", "content": "s"}, *user]},
        {"messages": [{"role": "developer", "content": "s"}, *user]},
        {"messages": [*user, {"role": "tool", "tool_call_id": "c", "content": "r"}]},
        {"messages": [{"role": "assistant", "tool_calls": []}, *user]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
    ]
    for signs in chat_signs:
        body = {"model": "m", "max_tokens": 9, "messages": user, **signs}
        assert chat.claims_request(body), signs
        assert render_request(orjson.dumps(body)).startswith(REQUEST_TITLE), signs
    # Anything only Anthropic has makes it Messages', max_tokens or not.
    anthropic_signs: list[dict[str, Any]] = [
        {"system": "s"},
        {"system": [{"type": "text", "text": "s"}]},
        {"stop_sequences": ["x"]},
        {"anthropic_version": "bedrock-2023-05-31"},
        {"mcp_servers": []},
        {"context_management": {}},
        {"tools": [{"name": "f", "input_schema": {}}]},
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"tool_choice": {"type": "any"}},
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
        {"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "web_search_tool_result"}]}]},
    ]
    for signs in anthropic_signs:
        for extra in ({}, {"max_tokens": 9}, {"stream_options": {"include_usage": True}}):
            body = {"model": "m", "messages": user, **extra, **signs}
            assert not chat.claims_request(body), (signs, extra)
            assert render_request(orjson.dumps(body)).startswith("Messages API request"), signs
    assert not chat.claims_request({"input": "x", "messages": user})  # Responses'
    assert not chat.claims_request({"messages": "x"})


def test_response_shape_tells_chat() -> None:
    for name in SCENARIOS:
        _, body, content_type, _ = fixture(name)
        if content_type == SSE:
            assert render_response(body, SSE).startswith(STREAM_TITLE), name
            assert render_response(body, "").startswith(STREAM_TITLE), name  # sniffed
            assert render_body(body).startswith(STREAM_TITLE), name
        elif "choices" in orjson.loads(body):
            assert render_response(body, JSON).startswith(RESPONSE_TITLE), name
            assert render_body(body).startswith(RESPONSE_TITLE), name
    # A stream is told by its chunks' object, also past chunks that name none (Azure's first).
    azure = stream_of([{"choices": [], "object": ""}, {"choices": []}, chunk({"content": "a"})])
    assert render_response(azure, SSE).startswith(STREAM_TITLE)
    legacy = stream_of([{"object": "chat.completion", "choices": [{"delta": {"content": "a"}}]}])
    assert render_response(legacy, SSE).startswith(STREAM_TITLE)
    # …and the other APIs' streams are still theirs.
    _, messages_stream, _, _ = responses_fixture("text_streamed", MESSAGES_FIXTURES)
    unnamed = stream_of([c for c in chunks_of(messages_stream)], done=False)
    assert render_response(unnamed, SSE).startswith("Messages API response (streamed")
    _, responses_stream, _, _ = responses_fixture("text_streamed", RESPONSES_FIXTURES)
    assert render_response(responses_stream, SSE).startswith("Responses API response (streamed")
    assert chat.claims_response({"object": "chat.completion"})
    assert chat.claims_response({"choices": []})
    assert not chat.claims_response({"type": "message", "content": []})
    assert not chat.claims_response({"object": "response", "output": []})
    assert not chat.claims_response({"error": {"message": "m"}})  # either OpenAI API's
    # The API given wins over the shape.
    request_body, _, _, _ = fixture("text_streamed")
    assert render_request(request_body, "messages").startswith("Messages API request")
    assert render_request(request_body, "responses").startswith("Responses API request")


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", None),  # by path alone
        ("/openai/v1/chat/completions", None),  # under a route prefix
        ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", None),  # Azure
        ("/v1/chat/completions/", None),
        ("/v1/chat/completions", API),  # as the bridge notes it
        ("/v1/messages", API),  # the note wins over the path
        ("/deployments/llm/invoke", API),  # a path that says nothing
    ],
)
def test_view_is_chosen_for_a_chat_flow(path: str, api: str | None) -> None:
    request_body = (CAPTURED / "tool_turn2.request.json").read_bytes()
    response = (CAPTURED / "tool_turn1.response.sse").read_bytes()
    flow = flow_of(request_body, response, "text/event-stream; charset=utf-8", path, api)
    shown = contentviews.prettify_message(flow.request, flow)
    assert shown.view_name == NAME
    assert shown.text.startswith(REQUEST_TITLE)
    assert "← call_cap1: hi" in shown.text
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == NAME
    assert shown.text.startswith(STREAM_TITLE)
    assert "→ bash  id=call_cap1" in shown.text


@pytest.mark.usefixtures("registered")
def test_buffered_chat_flow_and_its_error() -> None:
    request_body, response, _, _ = fixture("tool_calls_buffered")
    flow = flow_of(request_body, response, JSON, "/openai/v1/chat/completions")
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == NAME
    assert "→ get_weather  id=call_Oslo3" in shown.text
    request_body, response, _, _ = fixture("invalid_request_400_buffered")
    flow = flow_of(request_body, response, JSON, "/v1/chat/completions")
    flow.response.status_code = 400
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == NAME
    assert shown.text.startswith(f"{ERROR_TITLE}\nerror: decimal_above_max_value: Invalid")


@pytest.mark.usefixtures("registered")
def test_only_the_chat_path_is_taken_by_path() -> None:
    request_body, response, _, _ = fixture("tool_calls_buffered")
    for path in ("/v1/chat/completions/chatcmpl-1", "/v1/chat/completions/x/list", "/v1/chat"):
        flow = flow_of(request_body, response, JSON, path)
        assert contentviews.prettify_message(flow.response, flow).view_name == "JSON", path
    # Bridged without a note of its API, on a path that says nothing: the body's shape.
    flow = flow_of(request_body, b"", JSON, "/deployments/llm/invoke")
    flow.metadata[FLOW_METADATA_KEY] = {"interception_id": "x"}
    meta = Metadata(flow=flow, http_message=flow.request, content_type=JSON)
    assert VIEW.render_priority(request_body, meta) == PRIORITY
    assert VIEW.prettify(request_body, meta).startswith(REQUEST_TITLE)
