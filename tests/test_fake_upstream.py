"""The fake Responses API, checked with the real openai SDK and with raw HTTP."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import openai
import orjson
import pytest

from devtools import fake_upstream
from devtools.fake_upstream import FakeUpstream, choose_tool_call, placeholder_arguments

CODEX_SHELL = {
    "type": "function",
    "name": "shell",
    "description": "Runs a shell command",
    "strict": False,
    "parameters": {
        "type": "object",
        "properties": {
            "command": {"type": "array", "items": {"type": "string"}},
            "workdir": {"type": "string"},
            "timeout_ms": {"type": "number"},
        },
        "required": ["command"],
    },
}
EXEC_COMMAND = {
    "type": "function",
    "name": "exec_command",
    "parameters": {
        "type": "object",
        "properties": {"cmd": {"type": "string"}, "yield_time_ms": {"type": "number"}},
        "required": ["cmd"],
    },
}
SHELL_COMMAND = {
    "type": "function",
    "name": "shell_command",
    "parameters": {
        "type": "object",
        "properties": {"command": {"type": "string"}, "workdir": {"type": "string"}},
        "required": ["command"],
    },
}
LOOKUP = {
    "type": "function",
    "name": "lookup",
    "parameters": {
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


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def client(fake: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fake.url}/v1", api_key="x", max_retries=0)


def post(
    fake: FakeUpstream, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    host = urlsplit(fake.url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    try:
        conn.request(
            "POST",
            "/v1/responses",
            orjson.dumps(body),
            {"content-type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def sse_frames(raw: bytes) -> list[tuple[str, bytes]]:
    """(event name, data) per event; asserts the exact `event:`/`data:` framing."""
    assert raw.endswith(b"\n\n")
    frames = []
    for block in raw[:-2].split(b"\n\n"):
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: ")
        assert data_line.startswith(b"data: ")
        frames.append((event_line[7:].decode(), data_line[6:]))
    return frames


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for name, data in sse_frames(raw):
        event = orjson.loads(data)
        assert event["type"] == name
        events.append(event)
    return events


def strip_ids(value: Any) -> Any:
    """Ids are random per response; everything else must match between the two forms."""
    if isinstance(value, dict):
        return {
            k: strip_ids(v)
            for k, v in value.items()
            if k not in ("id", "call_id", "created_at", "completed_at")
        }
    if isinstance(value, list):
        return [strip_ids(v) for v in value]
    return value


@pytest.mark.parametrize("model", ["fake-text", "fake-cached", "fake-reasoning", "fake-tool"])
def test_streamed_and_buffered_forms_agree(client: openai.OpenAI, model: str) -> None:
    buffered = client.responses.create(model=model, input="hi", stream=False)
    events = list(client.responses.create(model=model, input="hi", stream=True))
    with client.responses.stream(model=model, input="hi") as stream:
        final = stream.get_final_response()

    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    streamed = events[-1].response
    for response in (buffered, streamed, final):
        assert response.id.startswith("resp_")
        assert response.model == model
        assert response.status == "completed"
    expected = strip_ids(buffered.model_dump(mode="json"))
    assert strip_ids(streamed.model_dump(mode="json")) == expected
    assert final.output_text == buffered.output_text
    assert final.usage == buffered.usage


def test_text_answer_is_deterministic(client: openai.OpenAI) -> None:
    first = client.responses.create(model="fake-text", input="hi")
    second = client.responses.create(model="unknown-model", input="something else")
    assert first.output_text == second.output_text == fake_upstream.TEXT_ANSWER
    assert second.model == "unknown-model"
    assert first.output[0].id.startswith("msg_")
    assert first.usage is not None
    assert first.usage.input_tokens > 0
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens


def test_streamed_text_deltas_join_to_the_text(client: openai.OpenAI) -> None:
    with client.responses.stream(model="fake-text", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert len(deltas) > 1
    assert "".join(deltas) == fake_upstream.TEXT_ANSWER


@pytest.mark.parametrize(
    ("tools", "name", "arguments"),
    [
        ([LOOKUP, CODEX_SHELL], "shell", {"command": ["bash", "-lc", "echo hello-from-tool"]}),
        ([EXEC_COMMAND], "exec_command", {"cmd": "echo hello-from-tool"}),
        ([SHELL_COMMAND], "shell_command", {"command": "echo hello-from-tool"}),
        ([LOOKUP], "lookup", {"query": "example", "limit": 1, "unit": "c"}),
        (None, "get_weather", {"city": "Paris"}),
        ([{"type": "web_search"}], "get_weather", {"city": "Paris"}),
    ],
)
def test_tool_call_fits_the_declared_tools(
    client: openai.OpenAI, tools: list | None, name: str, arguments: dict
) -> None:
    extra = {} if tools is None else {"tools": tools}
    with client.responses.stream(model="fake-tool", input="run it", **extra) as stream:
        arg_deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        response = stream.get_final_response()
    (call,) = response.output
    assert call.type == "function_call"
    assert call.name == name
    assert orjson.loads(call.arguments) == arguments
    assert "".join(arg_deltas) == call.arguments
    assert call.id is not None
    assert call.id.startswith("fc_")
    assert call.call_id.startswith("call_")


def test_tool_second_turn_quotes_the_output(client: openai.OpenAI) -> None:
    first = client.responses.create(model="fake-tool", input="run it", tools=[CODEX_SHELL])
    call = first.output[0]
    assert call.type == "function_call"
    history: list[Any] = [
        {"role": "user", "content": "run it"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": "{}"},
        {"type": "function_call_output", "call_id": call.call_id, "output": "hello-from-tool\n"},
    ]
    buffered = client.responses.create(model="fake-tool", input=history, tools=[CODEX_SHELL])
    with client.responses.stream(model="fake-tool", input=history, tools=[CODEX_SHELL]) as s:
        streamed = s.get_final_response()
    expected = 'The tool returned: "hello-from-tool"'
    assert buffered.output_text == streamed.output_text == expected
    assert buffered.usage == streamed.usage


def test_reasoning_items_and_phases(client: openai.OpenAI) -> None:
    with client.responses.stream(model="fake-reasoning", input="think") as stream:
        kinds = [e.type for e in stream]
        response = stream.get_final_response()
    reasoning, commentary, final = response.output
    assert reasoning.type == "reasoning"
    assert reasoning.id.startswith("rs_")
    assert [s.text for s in reasoning.summary] == list(fake_upstream.REASONING_SUMMARIES)
    assert commentary.type == "message"
    assert commentary.phase == "commentary"
    assert commentary.content[0].text == fake_upstream.COMMENTARY
    assert final.type == "message"
    assert final.phase == "final_answer"
    assert final.content[0].text == fake_upstream.FINAL_ANSWER
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens > 0
    for kind in (
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
    ):
        assert kinds.count(kind) >= 2


def test_cached_usage(client: openai.OpenAI) -> None:
    response = client.responses.create(model="fake-cached", input="hi")
    assert response.usage is not None
    details = response.usage.input_tokens_details
    assert 0 < details.cached_tokens < response.usage.input_tokens
    assert details.cached_tokens + details.cache_write_tokens < response.usage.input_tokens


def test_rate_limit(client: openai.OpenAI, fake: FakeUpstream) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="fake-429", input="hi")
    assert caught.value.code == "rate_limit_exceeded"
    response, body = post(fake, {"model": "fake-429", "input": "hi", "stream": True})
    assert response.status == 429
    assert response.getheader("retry-after") == "0"
    assert orjson.loads(body)["error"]["type"] == "requests"


def test_failed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="fake-failed", input="hi")
    events = list(client.responses.create(model="fake-failed", input="hi", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error is not None
    assert events[-1].response.error.code == "server_error"
    assert events[-1].response.error.message


def test_incomplete(client: openai.OpenAI) -> None:
    buffered = client.responses.create(model="fake-incomplete", input="hi")
    events = list(client.responses.create(model="fake-incomplete", input="hi", stream=True))
    streamed = events[-1]
    assert streamed.type == "response.incomplete"
    for response in (buffered, streamed.response):
        assert response.status == "incomplete"
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    assert strip_ids(buffered.model_dump()) == strip_ids(streamed.response.model_dump())


@pytest.mark.parametrize(
    "model",
    ["fake-text", "fake-tool", "fake-reasoning", "fake-failed", "fake-incomplete", "fake-long-7"],
)
def test_sse_framing_and_sequence_numbers(fake: FakeUpstream, model: str) -> None:
    response, raw = post(fake, {"model": model, "input": "hi", "stream": True})
    assert response.status == 200
    assert response.getheader("content-type", "").startswith("text/event-stream")
    assert response.getheader("transfer-encoding") == "chunked"
    events = sse_events(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert len({e["response"]["id"] for e in events if "response" in e}) == 1


def test_malformed_event_in_the_middle(fake: FakeUpstream) -> None:
    _, raw = post(fake, {"model": "fake-malformed", "input": "hi", "stream": True})
    frames = sse_frames(raw)
    bad = []
    for index, (_, data) in enumerate(frames):
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            bad.append(index)
    assert len(bad) == 1
    assert 0 < bad[0] < len(frames) - 1
    good = [orjson.loads(d) for i, (_, d) in enumerate(frames) if i != bad[0]]
    assert [e["sequence_number"] for e in good] == list(range(len(good)))
    assert good[-1]["type"] == "response.completed"
    assert good[-1]["response"]["output"][0]["content"][0]["text"] == fake_upstream.TEXT_ANSWER


def test_truncated_stream_has_no_terminal_event(fake: FakeUpstream) -> None:
    response, raw = post(fake, {"model": "fake-truncated", "input": "hi", "stream": True})
    assert response.getheader("connection") == "close"
    events = sse_events(raw)
    assert events[-1]["type"] == "response.output_item.done"
    assert events[-1]["item"]["type"] == "function_call"
    assert not {"response.completed", "response.incomplete", "response.failed"} & {
        e["type"] for e in events
    }
    response, body = post(fake, {"model": "fake-truncated", "input": "hi"})
    assert response.status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)


def test_error_event_ends_the_stream(fake: FakeUpstream) -> None:
    _, raw = post(fake, {"model": "fake-error-event", "input": "hi", "stream": True})
    events = sse_events(raw)
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == fake_upstream.ERROR_EVENT["code"]
    assert events[-1]["message"] == fake_upstream.ERROR_EVENT["message"]
    response, body = post(fake, {"model": "fake-error-event", "input": "hi"})
    assert response.status == 500
    assert orjson.loads(body)["error"]["message"] == fake_upstream.ERROR_EVENT["message"]


def test_requests_are_recorded_exactly() -> None:
    with FakeUpstream() as fake:
        body = b'{"model": "fake-text",   "input": "hi", "stream": false}'
        host = urlsplit(fake.url)
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
        conn.request(
            "POST", "/v1/responses", body, {"Content-Type": "application/json", "X-Custom": "Yes"}
        )
        assert conn.getresponse().read()
        conn.close()
        (received,) = fake.requests
    assert received.method == "POST"
    assert received.path == "/v1/responses"
    assert received.body == body
    assert received.headers["x-custom"] == "Yes"
    assert received.headers["content-type"] == "application/json"
    assert all(name == name.lower() for name in received.headers)


def test_keep_alive_serves_several_requests_on_one_connection(fake: FakeUpstream) -> None:
    host = urlsplit(fake.url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    try:
        conn.request("POST", "/v1/responses", orjson.dumps({"model": "fake-text", "stream": True}))
        assert sse_events(conn.getresponse().read())[-1]["type"] == "response.completed"
        first_socket = conn.sock
        conn.request("POST", "/v1/responses", orjson.dumps({"model": "fake-text"}))
        assert orjson.loads(conn.getresponse().read())["status"] == "completed"
        assert conn.sock is first_socket
    finally:
        conn.close()


def test_other_routes(fake: FakeUpstream, client: openai.OpenAI) -> None:
    models = [m.id for m in client.models.list()]
    assert "fake-text" in models
    assert client.models.retrieve("fake-long-5").id == "fake-long-5"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    created = client.responses.create(model="fake-text", input="hi")
    assert client.responses.retrieve(created.id).output_text == created.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")
    host = urlsplit(fake.url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    try:
        conn.request("GET", "/v1/nothing-here")
        response = conn.getresponse()
        assert response.status == 404
        assert orjson.loads(response.read())["error"]["type"] == "invalid_request_error"
        conn.request("POST", "/some/prefix/responses", b"not json")
        response = conn.getresponse()
        assert response.status == 400
        assert orjson.loads(response.read())["error"]["message"]
    finally:
        conn.close()


@pytest.mark.parametrize("flush_each", ["0", "1"])
def test_long_stream(fake: FakeUpstream, flush_each: str) -> None:
    body = {"model": "fake-long-1000", "input": "hi", "stream": True}
    _, raw = post(fake, body, {"x-fake-flush-each": flush_each})
    events = sse_events(raw)
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) == 1000
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "".join(deltas)
    assert final["usage"]["output_tokens"] == 1000


def test_big_stream_has_a_small_terminal_event(fake: FakeUpstream) -> None:
    _, raw = post(fake, {"model": "fake-big-1", "input": "hi", "stream": True})
    assert len(raw) >= 900 * 1024
    frames = sse_frames(raw)
    assert frames[-1][0] == "response.completed"
    assert len(frames[-1][1]) < 4096


def read_chunks(fake: FakeUpstream, body: bytes, headers: str) -> list[bytes]:
    """The chunk payloads exactly as sent, which http.client would hide."""
    host = urlsplit(fake.url)
    with socket.create_connection((host.hostname, host.port), timeout=10) as sock:
        request = (
            f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{headers}\r\n"
        )
        sock.sendall(request.encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    _, rest = data.split(b"\r\n\r\n", 1)
    chunks = []
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


def test_chunk_size_cuts_events_anywhere(fake: FakeUpstream) -> None:
    body = orjson.dumps({"model": "fake-text", "input": "hi", "stream": True})
    per_event = read_chunks(fake, body, "")
    assert all(c.endswith(b"\n\n") and c.count(b"\n\n") == 1 for c in per_event)
    cut = read_chunks(fake, body, "x-fake-chunk-size: 7\r\n")
    assert all(len(c) <= 7 for c in cut)
    events = sse_events(b"".join(cut))
    assert events[-1]["type"] == "response.completed"


def test_slow_stream(fake: FakeUpstream) -> None:
    body = {"model": "fake-slow", "input": "hi", "stream": True}
    _, raw = post(fake, body, {"x-fake-delay-ms": "1"})
    events = sse_events(raw)
    assert sum(e["type"] == "response.output_text.delta" for e in events) == 20
    assert events[-1]["type"] == "response.completed"


def test_stop_is_idempotent_and_frees_the_port() -> None:
    fake = FakeUpstream().start()
    url = fake.url
    fake.stop()
    fake.stop()
    with pytest.raises(RuntimeError):
        _ = fake.url
    host = urlsplit(url)
    with pytest.raises(OSError):
        socket.create_connection((host.hostname, host.port), timeout=2).close()


def test_command_line_prints_url_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "devtools.fake_upstream", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        host = urlsplit(url)
        assert url.startswith("http://127.0.0.1:")
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 200
        conn.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_tool_choice_is_pure() -> None:
    assert choose_tool_call([{"type": "function", "function": EXEC_COMMAND}]) == (
        "exec_command",
        {"cmd": "echo hello-from-tool"},
    )
    assert choose_tool_call([{"type": "function", "name": "shell"}]) == (
        "shell",
        {"command": ["bash", "-lc", "echo hello-from-tool"]},
    )
    nested = {
        "type": "object",
        "properties": {
            "where": {
                "type": "object",
                "properties": {"x": {"type": ["null", "number"]}},
                "required": ["x"],
            }
        },
        "required": ["where", "missing"],
    }
    assert placeholder_arguments(nested) == {"where": {"x": 1}}
    assert placeholder_arguments(None) == {}
