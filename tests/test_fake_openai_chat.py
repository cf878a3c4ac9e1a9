"""The fake Chat Completions API (devtools/fake_openai_chat.py): driven by the real openai SDK,
by raw HTTP, and as a pure planner, so that tests through the bridge can trust what it sends."""

from __future__ import annotations

import gzip
import http.client
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools import fake_openai_chat as fc
from devtools import fake_upstream
from devtools.fake_upstream import FakeUpstream, Reply

CAPTURED = Path(__file__).parent / "fixtures" / "opencode_captured"
AUTH = {"authorization": "Bearer test-key"}
HI = [{"role": "user", "content": "hi"}]
USAGE = {"include_usage": True}
PATH = "/v1/chat/completions"


def function(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "description": f"The {name} tool"}
    if parameters is not None:
        spec["parameters"] = parameters
    return {"type": "function", "function": spec}


# OpenCode's shell tool, as it declares it.
BASH = function(
    "bash",
    {
        "type": "object",
        "properties": {
            "command": {"type": "string"},
            "timeout": {"type": "number"},
            "workdir": {"type": "string"},
            "description": {"type": "string"},
        },
        "required": ["command", "description"],
    },
)
LOOKUP = function(
    "lookup",
    {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "limit": {"type": "integer"},
            "unit": {"type": "string", "enum": ["c", "f"]},
            "verbose": {"type": "boolean"},
        },
        "required": ["query", "limit", "unit"],
    },
)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def client(fake: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fake.url}/v1", api_key="test-key", max_retries=0)


def documented_usage(n: int, *, cached: bool = False, reasoning: bool = False) -> dict:
    """The module docstring's scheme, written out again."""
    return {
        "prompt_tokens": 1000 * n + 1,
        "completion_tokens": 7 * n + 5,
        "total_tokens": 1007 * n + 6,
        "prompt_tokens_details": {"cached_tokens": 100 * n if cached else 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 3 * n if reasoning else 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def sdk_usage(usage: Any) -> dict:
    return usage.model_dump(exclude_none=True)


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


def post_chat(
    fake: FakeUpstream, req: dict, headers: dict[str, str] | None = None, path: str = PATH
) -> tuple[http.client.HTTPResponse, bytes]:
    merged = {"content-type": "application/json", **AUTH, **(headers or {})}
    return request(fake, "POST", path, orjson.dumps(req), merged)


def sse_chunks(raw: bytes) -> tuple[list[dict], bool]:
    """The chunks and whether ``[DONE]`` ended them; asserts ``data: <compact JSON>\\n\\n``
    frames without event names, [DONE] only last."""
    assert raw.endswith(b"\n\n")
    blocks = raw[:-2].split(b"\n\n")
    done = blocks[-1] == b"data: [DONE]"
    if done:
        blocks.pop()
    chunks = []
    for block in blocks:
        assert block.startswith(b"data: ") and b"\n" not in block, block[:80]
        data = block[6:]
        assert data == orjson.dumps(orjson.loads(data))  # compact, as OpenAI sends it
        chunks.append(orjson.loads(data))
    return chunks, done


def planned(model: str, *, stream: bool, n: int = 1, **req: Any) -> Reply:
    body = {"model": model, "messages": HI, "stream": stream, **req}
    return fc.plan_chat(body, {**AUTH, "x-fake-delay-ms": "0"}, n)


def stream_bytes(reply: Reply) -> bytes:
    assert reply.status == 200 and reply.chunks is not None
    return b"".join(reply.chunks)


def assembled(chunks: list[Any]) -> dict[str, Any]:
    """A streamed answer put together the way a client must: tool calls by ``index``."""
    content, reasoning, finish, usage = "", {}, None, None
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        chunk = chunk if isinstance(chunk, dict) else chunk.model_dump(exclude_none=True)
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for key in ("reasoning_content", "reasoning"):
                if key in delta:
                    reasoning[key] = reasoning.get(key, "") + delta[key]
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                slot["id"] += call.get("id") or ""
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return {
        "content": content,
        "reasoning": reasoning,
        "tool_calls": [calls[i] for i in sorted(calls)],
        "finish_reason": finish,
        "usage": usage,
    }


def buffered_answer(body: dict[str, Any]) -> dict[str, Any]:
    (choice,) = body["choices"]
    message = choice["message"]
    return {
        "content": message["content"] or "",
        "reasoning": {k: message[k] for k in ("reasoning_content", "reasoning") if k in message},
        "tool_calls": [{"id": c["id"], **c["function"]} for c in message.get("tool_calls") or []],
        "finish_reason": choice["finish_reason"],
        "usage": body["usage"],
    }


PARIS = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
TOKYO = {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}
# model: content, reasoning, tool calls (without ids), finish reason, usage flags
SCENARIOS: dict[str, tuple[str, dict, list, str, dict]] = {
    "fake-text": (fc.TEXT_ANSWER, {}, [], "stop", {}),
    "gpt-5.5": (fc.TEXT_ANSWER, {}, [], "stop", {}),
    "fake-tool": ("", {}, [PARIS], "tool_calls", {}),
    "fake-parallel": ("", {}, [PARIS, TOKYO], "tool_calls", {}),
    "fake-reasoning": (fc.FINAL_ANSWER, {}, [], "stop", {"reasoning": True}),
    "fake-reasoning-content": (
        fc.FINAL_ANSWER,
        {"reasoning_content": fc.REASONING_TEXT},
        [],
        "stop",
        {},
    ),
    "fake-reasoning-field": (fc.FINAL_ANSWER, {"reasoning": fc.REASONING_TEXT}, [], "stop", {}),
    "fake-cached": (fc.TEXT_ANSWER, {}, [], "stop", {"cached": True}),
    "fake-length": (fc.INCOMPLETE_ANSWER, {}, [], "length", {}),
    "fake-content-filter": (fc.CONTENT_FILTER_TEXT, {}, [], "content_filter", {}),
    "fake-slow": (fake_upstream.SLOW_ANSWER, {}, [], "stop", {}),
    "fake-long-4": ("word " * 4, {}, [], "stop", {}),
}


# --- the real openai SDK, straight at the fake ---------------------------------------------


@pytest.mark.parametrize("model", list(SCENARIOS))
def test_sdk_parses_every_stream_and_both_forms_agree(model: str) -> None:
    """Streamed (call 1, with usage) and buffered (call 2) say the same, usage as documented."""
    content, reasoning, calls, finish, flags = SCENARIOS[model]
    with FakeUpstream() as fake:
        client = openai.OpenAI(base_url=f"{fake.url}/v1", api_key="k", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=HI,
                stream=True,
                stream_options=USAGE,
                extra_headers={"x-fake-delay-ms": "0"},
            )
        )
        buffered = client.chat.completions.create(
            model=model, messages=HI, extra_headers={"x-fake-delay-ms": "0"}
        )
        assert fake.chat_calls == 2
    streamed = assembled(chunks)
    assert streamed["usage"] == documented_usage(1, **flags)
    assert sdk_usage(buffered.usage) == documented_usage(2, **flags)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert buffered.id.startswith("chatcmpl-") and buffered.id != chunks[0].id
    assert {c.model for c in chunks} == {buffered.model} == {model}
    assert buffered.object == "chat.completion" and chunks[0].object == "chat.completion.chunk"
    assert buffered.system_fingerprint == chunks[0].system_fingerprint == "fp_fake"
    assert buffered.service_tier == chunks[0].service_tier == "default"
    message = buffered.choices[0].message
    assert message.role == "assistant" and message.refusal is None
    for form in (streamed, buffered_answer(buffered.model_dump())):
        assert form["content"] == content
        assert form["reasoning"] == reasoning
        assert [{k: c[k] for k in ("name", "arguments")} for c in form["tool_calls"]] == calls
        assert form["finish_reason"] == finish
    assert [c["id"] for c in streamed["tool_calls"]] == [
        c["id"] for c in buffered_answer(buffered.model_dump())["tool_calls"]
    ]


def test_sdk_streamed_text_piece_by_piece(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-text", messages=HI, stream=True, stream_options=USAGE
    )
    chunks = list(stream)
    first, *pieces, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == "" and first.choices[0].finish_reason is None
    assert len(pieces) > 5
    assert all(p.choices[0].delta.role is None and p.choices[0].delta.content for p in pieces)
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == fc.TEXT_ANSWER
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.model_dump(exclude_none=True) == {}
    assert usage.choices == [] and usage.usage is not None


@pytest.mark.parametrize("options", [None, {}, {"include_usage": False}, {"include_usage": 1}])
def test_sdk_stream_without_include_usage_has_no_usage(
    client: openai.OpenAI, fake: FakeUpstream, options: dict | None
) -> None:
    extra = {} if options is None else {"stream_options": options}
    chunks = list(
        client.chat.completions.create(model="fake-text", messages=HI, stream=True, **extra)
    )
    assert all(c.choices for c in chunks)  # no usage chunk
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert assembled(chunks)["content"] == fc.TEXT_ANSWER
    # Raw: no chunk has a usage key at all (with include_usage they carry "usage": null).
    body = {"model": "fake-tool", "messages": HI, "stream": True, **extra}
    raw_chunks, done = sse_chunks(post_chat(fake, body)[1])
    assert done and not any("usage" in c for c in raw_chunks)
    raw_chunks, done = sse_chunks(post_chat(fake, {**body, "stream_options": USAGE})[1])
    assert done and all("usage" in c for c in raw_chunks)
    assert [c["usage"] is None for c in raw_chunks] == [True] * (len(raw_chunks) - 1) + [False]


def test_sdk_parallel_calls_assemble_by_index(client: openai.OpenAI, fake: FakeUpstream) -> None:
    chunks = list(
        client.chat.completions.create(
            model="fake-parallel", messages=HI, stream=True, stream_options=USAGE
        )
    )
    order = [
        call.index
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or []
        if call.id is None
    ]
    assert len(order) >= 6
    assert order == [0, 1] * (len(order) // 2)  # argument pieces interleaved
    calls = assembled(chunks)["tool_calls"]
    assert [orjson.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Tokyo"}]
    assert calls[0]["id"] != calls[1]["id"]
    assert all(c["id"].startswith("call_") for c in calls)
    # Concatenating pieces in arrival order, ignoring the index, gives no valid JSON.
    mixed = "".join(
        call.function.arguments or ""
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or []
        if call.function is not None
    )
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(mixed)
    # The SDK's own stream helper assembles them too.
    with client.chat.completions.stream(model="fake-parallel", messages=HI) as stream:
        final = stream.get_final_completion()
    helper = [(c.id, c.function.arguments) for c in final.choices[0].message.tool_calls or []]
    assert helper == [(c["id"], c["arguments"]) for c in calls]
    assert final.choices[0].finish_reason == "tool_calls"


def test_tool_call_stream_shape(fake: FakeUpstream) -> None:
    body = {"model": "fake-tool", "messages": HI, "stream": True, "tools": [LOOKUP]}
    chunks, done = sse_chunks(post_chat(fake, body)[1])
    deltas = [c["choices"][0]["delta"] for c in chunks]
    head = deltas[0]
    assert head["role"] == "assistant" and head["content"] is None and head["refusal"] is None
    (call,) = head["tool_calls"]
    assert call["index"] == 0 and call["type"] == "function"
    assert call["function"] == {"name": "lookup", "arguments": ""}
    assert call["id"].startswith("call_")
    pieces = deltas[1:-1]
    assert len(pieces) > 2
    for delta in pieces:
        assert set(delta) == {"tool_calls"}
        (piece,) = delta["tool_calls"]
        assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in pieces)
    assert orjson.loads(arguments) == {"query": "example", "limit": 1, "unit": "c"}
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert done


def test_stream_framing_and_chunk_fields(fake: FakeUpstream) -> None:
    body = {"model": "fake-text", "messages": HI, "stream": True, "stream_options": USAGE}
    response, raw = post_chat(fake, body)
    assert response.status == 200
    assert response.getheader("content-type", "").startswith("text/event-stream")
    assert response.getheader("x-request-id", "").startswith("req_")
    assert b"event:" not in raw
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    chunks, done = sse_chunks(raw)
    assert done
    keys = ["id", "object", "created", "model", "service_tier", "system_fingerprint", "choices"]
    for chunk in chunks:
        assert list(chunk) == [*keys, "usage"]  # OpenAI's order
        assert chunk["object"] == "chat.completion.chunk"
        assert isinstance(chunk["created"], int) and chunk["created"] == chunks[0]["created"]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        assert list(choice) == ["index", "delta", "logprobs", "finish_reason"]
        assert choice["index"] == 0 and choice["logprobs"] is None
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count("stop") == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_buffered_object_fields(fake: FakeUpstream) -> None:
    _, raw = post_chat(fake, {"model": "fake-text", "messages": HI})
    body = orjson.loads(raw)
    assert list(body) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "service_tier",
        "system_fingerprint",
    ]
    (choice,) = body["choices"]
    assert choice == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": fc.TEXT_ANSWER,
            "refusal": None,
            "annotations": [],
        },
        "logprobs": None,
        "finish_reason": "stop",
    }


@pytest.mark.parametrize(
    ("tier", "reported"),
    [("flex", "flex"), ("priority", "priority"), ("auto", "default"), (3, "default")],
)
def test_service_tier_is_the_one_that_served(fake: FakeUpstream, tier: Any, reported: str) -> None:
    body = {"model": "fake-text", "messages": HI, "service_tier": tier}
    assert orjson.loads(post_chat(fake, body)[1])["service_tier"] == reported
    chunks, _ = sse_chunks(post_chat(fake, {**body, "stream": True})[1])
    assert {c["service_tier"] for c in chunks} == {reported}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "error", "status", "kind", "code"),
    [
        (
            "fake-400",
            openai.BadRequestError,
            400,
            "invalid_request_error",
            "context_length_exceeded",
        ),
        ("fake-429", openai.RateLimitError, 429, "requests", "rate_limit_exceeded"),
        ("fake-500", openai.InternalServerError, 500, "server_error", "server_error"),
    ],
)
def test_sdk_http_errors(
    client: openai.OpenAI, model: str, error: type, status: int, kind: str, code: str, stream: bool
) -> None:
    with pytest.raises(error) as info:
        client.chat.completions.create(model=model, messages=HI, stream=stream)
    assert info.value.status_code == status
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}  # the SDK hands over "error"
    assert (body["type"], body["code"]) == (kind, code) and body["message"]
    assert info.value.response.headers.get("x-request-id", "").startswith("req_")
    if model == "fake-429":
        assert info.value.response.headers["retry-after"] == "0"


def test_sdk_error_chunk_mid_stream(client: openai.OpenAI, fake: FakeUpstream) -> None:
    pieces: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(
            model="fake-error-chunk", messages=HI, stream=True, stream_options=USAGE
        ):
            pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == fc.ERROR_CHUNK_TEXT  # the text came before the error
    assert info.value.body == fc.ERROR_CHUNK
    body = {"model": "fake-error-chunk", "messages": HI, "stream": True, "stream_options": USAGE}
    chunks, done = sse_chunks(post_chat(fake, body)[1])
    assert not done and chunks[-1] == {"error": fc.ERROR_CHUNK}
    assert not any(c.get("usage") for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    with pytest.raises(openai.InternalServerError) as buffered:
        client.chat.completions.create(model="fake-error-chunk", messages=HI)
    assert buffered.value.body["type"] == "server_error"


def test_truncated_stream_and_body(client: openai.OpenAI, fake: FakeUpstream) -> None:
    body = {"model": "fake-truncated", "messages": HI, "stream": True, "stream_options": USAGE}
    response, raw = post_chat(fake, body)
    assert response.getheader("connection") == "close"
    chunks, done = sse_chunks(raw)
    assert not done
    assert chunks[-1]["choices"][0]["delta"].get("content")
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)
    assert not any(c["usage"] for c in chunks)
    # The SDK ends the stream quietly: the client cannot tell, the bridge's record must.
    sdk_chunks = list(
        client.chat.completions.create(
            model="fake-truncated", messages=HI, stream=True, stream_options=USAGE
        )
    )
    assert assembled(sdk_chunks)["content"] == fc.TEXT_ANSWER
    assert assembled(sdk_chunks)["finish_reason"] is None
    response, raw = post_chat(fake, {"model": "fake-truncated", "messages": HI})
    assert response.status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)


def test_stream_options_without_stream_is_refused(fake: FakeUpstream) -> None:
    """As OpenAI answers it: a bridge that added the option to a buffered request is seen."""
    for options in (USAGE, {}, {"include_usage": False}):
        for stream in (False, None, "true"):
            body = {"model": "fake-text", "messages": HI, "stream_options": options}
            if stream is not None:
                body["stream"] = stream
            response, raw = post_chat(fake, body)
            assert response.status == 400, body
            error = orjson.loads(raw)["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", "stream_options")
    response, _ = post_chat(fake, {"model": "fake-text", "messages": HI, "stream_options": None})
    assert response.status == 200


def test_slow_and_long_delta_counts(fake: FakeUpstream) -> None:
    _, raw = post_chat(
        fake, {"model": "fake-slow", "messages": HI, "stream": True}, {"x-fake-delay-ms": "1"}
    )
    chunks, done = sse_chunks(raw)
    texts = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(texts) == 20 and "".join(texts) == fake_upstream.SLOW_ANSWER and done
    slow = fc.plan_chat(
        {"model": "fake-slow", "messages": HI, "stream": True}, {**AUTH, "x-fake-delay-ms": "0"}, 1
    )
    assert len(list(slow.chunks or [])) == 23  # each flushed: role, 20 pieces, finish, [DONE]
    for count in (0, 1, 7, 3000):
        for options in ({}, {"stream_options": USAGE}):
            body = {"model": f"fake-long-{count}", "messages": HI, "stream": True, **options}
            chunks, done = sse_chunks(post_chat(fake, body)[1])
            words = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
            assert len(words) == count and done
            assert {w["choices"][0]["delta"]["content"] for w in words} <= {"word "}
            assert (chunks[-1]["choices"] == []) == bool(options)
        buffered = orjson.loads(post_chat(fake, {"model": f"fake-long-{count}"})[1])
        assert buffered["choices"][0]["message"]["content"] == "word " * count


def test_chunking_headers_recut_the_same_bytes(fake: FakeUpstream) -> None:
    body = {"model": "fake-parallel", "messages": HI, "stream": True, "stream_options": USAGE}
    whole = stream_bytes(fc.plan_chat(body, AUTH, 1))
    for size in (1, 7, 100):
        cut = fc.plan_chat(body, {**AUTH, "x-fake-chunk-size": str(size)}, 1)
        chunks = list(cut.chunks or [])
        assert all(len(c) <= size for c in chunks) and len(chunks) > 1
        joined = b"".join(chunks)
        assert len(joined) == len(whole)
        assert [c["choices"] for c in sse_chunks(joined)[0]] == [
            c["choices"] for c in sse_chunks(whole)[0]
        ]
    # Over HTTP, through the SDK: the parser sees the same chunks however they are cut.
    client = openai.OpenAI(base_url=f"{fake.url}/v1", api_key="k", max_retries=0)
    for size in ("1", "5", "64"):
        sdk_chunks = client.chat.completions.create(
            model="fake-parallel",
            messages=HI,
            stream=True,
            stream_options=USAGE,
            extra_headers={"x-fake-chunk-size": size},
        )
        calls = assembled(list(sdk_chunks))["tool_calls"]
        assert [c["arguments"] for c in calls] == [PARIS["arguments"], TOKYO["arguments"]]
    # fake-long-N is sent in large batches unless each chunk is asked to be flushed.
    assert len(list(planned("fake-long-5000", stream=True).chunks or [])) < 50
    flushed = fc.plan_chat(
        {"model": "fake-long-50", "stream": True}, {**AUTH, "x-fake-flush-each": "1"}, 1
    )
    assert len(list(flushed.chunks or [])) == 53


# --- numbering, routes, auth, bad bodies ----------------------------------------------------


def test_usage_numbers_count_every_chat_call() -> None:
    """n counts POST …/chat/completions only, refused ones too; other APIs do not."""
    with FakeUpstream() as fake:
        client = openai.OpenAI(base_url=f"{fake.url}/v1", api_key="k", max_retries=0)
        one = client.chat.completions.create(model="fake-text", messages=HI)
        assert request(fake, "POST", PATH, b"{}", {})[0].status == 401  # 2
        assert request(fake, "POST", PATH, b"nope", AUTH)[0].status == 400  # 3
        with pytest.raises(openai.RateLimitError):  # 4
            client.chat.completions.create(model="fake-429", messages=HI)
        client.responses.create(model="fake-text", input="hi")
        post_chat(fake, {"model": "fake-text", "messages": HI}, path="/v1/messages")
        client.models.list()
        five = list(
            client.chat.completions.create(
                model="fake-cached", messages=HI, stream=True, stream_options=USAGE
            )
        )
        six = client.chat.completions.create(model="fake-reasoning", messages=HI)
        assert fake.chat_calls == 6 and fake.messages_calls == 1
    assert sdk_usage(one.usage) == documented_usage(1)
    assert five[-1].usage is not None
    assert sdk_usage(five[-1].usage) == documented_usage(5, cached=True)
    assert sdk_usage(six.usage) == documented_usage(6, reasoning=True)
    assert six.usage is not None and six.usage.total_tokens == 6048


def test_concurrent_calls_get_distinct_numbers() -> None:
    with FakeUpstream() as fake:
        prompts: list[int] = []
        lock = threading.Lock()

        def call() -> None:
            _, body = post_chat(fake, {"model": "fake-text", "messages": HI})
            with lock:
                prompts.append(orjson.loads(body)["usage"]["prompt_tokens"])

        threads = [threading.Thread(target=call) for _ in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert fake.chat_calls == 24
    assert sorted(prompts) == [1000 * n + 1 for n in range(1, 25)]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/openai/v1/chat/completions",
        "/v1/chat/completions?api-version=2024-10-21",
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        "/chat/completions",
    ],
)
def test_any_prefix_and_query_is_chat(fake: FakeUpstream, path: str) -> None:
    before = fake.chat_calls
    response, raw = post_chat(fake, {"model": "fake-text", "messages": HI}, path=path)
    assert response.status == 200
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == fc.TEXT_ANSWER
    assert fake.chat_calls == before + 1
    assert fake.requests[-1].path == path


def test_other_paths_are_not_chat(fake: FakeUpstream) -> None:
    before = fake.chat_calls
    for method, path in (
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions/x"),
        ("POST", "/v1/chat/completion"),
        ("POST", "/v1/completions"),
    ):
        response, _ = request(fake, method, path, orjson.dumps({"model": "fake-text"}), AUTH)
        assert response.status == 404, path
    assert fake.chat_calls == before


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": ""},
        {"authorization": "Bearer"},
        {"authorization": "Bearer    "},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Token abc"},
        {"authorization": "sk-abc"},
        {"api-key": ""},
        {"api-key": "  "},
        {"x-api-key": "abc", "x-goog-api-key": "abc"},
    ],
)
def test_no_key_gets_401(fake: FakeUpstream, headers: dict[str, str]) -> None:
    for body in (orjson.dumps({"model": "fake-text", "messages": HI}), b"not json"):
        response, raw = request(fake, "POST", PATH, body, headers)
        assert response.status == 401
        error = orjson.loads(raw)
        assert list(error) == ["error"]
        assert list(error["error"]) == ["message", "type", "param", "code"]
        assert error["error"]["type"] == "invalid_request_error"
        assert "API key" in error["error"]["message"]
    client = openai.OpenAI(base_url=f"{fake.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model="fake-text", messages=HI, extra_headers={"Authorization": ""}
        )


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer k"},
        {"Authorization": "bearer sk-proj-whatever"},
        {"AUTHORIZATION": "BEARER  spaced"},
        {"api-key": "azure-key"},
        {"Api-Key": "azure-key"},
    ],
)
def test_a_key_in_either_header_is_accepted(fake: FakeUpstream, headers: dict[str, str]) -> None:
    body = orjson.dumps({"model": "fake-text", "messages": HI})
    response, raw = request(fake, "POST", PATH, body, headers)
    assert response.status == 200
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == fc.TEXT_ANSWER


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
        (b"42", {}),
        (b"\xff\xfe\x00", {}),
        (b"\x1f\x8b garbage", {"content-encoding": "gzip"}),
        (gzip.compress(b"[]"), {"content-encoding": "gzip"}),
    ],
)
def test_bad_bodies_get_400(fake: FakeUpstream, body: bytes, headers: dict[str, str]) -> None:
    response, raw = request(fake, "POST", PATH, body, {**AUTH, **headers})
    assert response.status == 400
    error = orjson.loads(raw)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_gzip_body_is_read(fake: FakeUpstream) -> None:
    body = gzip.compress(orjson.dumps({"model": "fake-text", "messages": HI}))
    response, raw = request(fake, "POST", PATH, body, {**AUTH, "content-encoding": "gzip"})
    assert response.status == 200
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == fc.TEXT_ANSWER


def _deep_result(depth: int) -> bytes:
    """A tool message whose content is `depth` objects deep, for the default to quote."""
    content = b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"model":"fake-text","messages":[{"role":"tool","content":' + content + b"}]}"


def _deep_schema(depth: int) -> bytes:
    """A tool for fake-tool whose required argument is an object `depth` levels deep."""
    level = b'{"type":"object","required":["a"],"properties":{"a":'
    schema = level * depth + b'{"type":"string"}' + b"}}" * depth
    tool = b'{"type":"function","function":{"name":"t","parameters":' + schema + b"}}"
    return b'{"model":"fake-tool","stream":true,"messages":[],"tools":[' + tool + b"]}"


@pytest.mark.parametrize("body", [_deep_result(300), _deep_result(900), _deep_schema(300)])
def test_bodies_too_deep_to_quote_get_400(fake: FakeUpstream, body: bytes) -> None:
    """orjson reads 1024 levels but writes 254: the answer cannot quote these back."""
    assert isinstance(orjson.loads(body), dict)
    response, raw = request(fake, "POST", PATH, body, AUTH)
    assert response.status == 400
    assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"
    assert request(fake, "POST", PATH, _deep_result(200), AUTH)[0].status == 200


# --- the default scenario: OpenCode's shell loop -------------------------------------------


def _answer(messages: Any, tools: list | None = None, model: str = "x") -> dict:
    body: dict[str, Any] = {"model": model, "messages": messages}
    if tools is not None:
        body["tools"] = tools
    reply = fc.plan_chat(body, AUTH, 1)
    assert reply.status == 200
    return buffered_answer(orjson.loads(reply.body))


def _user(*parts: Any) -> dict:
    return {"role": "user", "content": list(parts)}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


@pytest.mark.parametrize(
    ("messages", "command"),
    [
        ([{"role": "user", "content": "run echo hi"}], "echo hi"),
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "run ls"}], "ls"),
        ([_user(_text("<context>x</context>"), _text("run ls -la  "))], "ls -la"),
        ([_user(_text("run   printf 'a b'"))], "printf 'a b'"),
        ([_user(_text("run pwd"), {"type": "image_url", "image_url": {"url": "x"}})], "pwd"),
        (
            [
                {"role": "user", "content": "run echo one"},
                {"role": "assistant", "content": "done"},
                {"role": "user", "content": "run echo two"},
            ],
            "echo two",
        ),
    ],
)
def test_default_runs_what_the_user_asked(messages: list, command: str) -> None:
    for model in ("gpt-5.5", "gpt-4o", "fake-text", "anything", ""):
        answer = _answer(messages, [LOOKUP, BASH], model)
        (call,) = answer["tool_calls"]
        assert call["name"] == "bash"
        assert orjson.loads(call["arguments"]) == {
            "command": command,
            "description": fc.RUN_DESCRIPTION,
        }
        assert answer["finish_reason"] == "tool_calls" and answer["content"] == ""
        assert call["id"] == fc.tool_call("bash", {}, seed=command).id


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ({**BASH, "function": {**BASH["function"], "name": "Bash"}}, None),
        (
            function(
                "shell",
                {
                    "type": "object",
                    "properties": {"command": {"type": "array"}},
                    "additionalProperties": False,
                },
            ),
            {"command": ["bash", "-lc", "echo hi"]},
        ),
        (
            function("bash", {"type": "object", "properties": {"command": {"type": "string"}}}),
            {"command": "echo hi", "description": fc.RUN_DESCRIPTION},
        ),
        (function("shell"), {"command": "echo hi", "description": fc.RUN_DESCRIPTION}),
        (
            function(
                "bash",
                {
                    "type": "object",
                    "properties": {
                        "command": {"type": "string"},
                        "timeout": {"type": "integer"},
                        "mode": {"type": "string", "enum": ["fg", "bg"]},
                        "env": {"type": "object", "properties": {}},
                        "dry": {"type": ["null", "boolean"]},
                    },
                    "required": ["command", "timeout", "mode", "env", "dry"],
                    "additionalProperties": False,
                },
            ),
            {"command": "echo hi", "timeout": 1, "mode": "fg", "env": {}, "dry": True},
        ),
    ],
)
def test_default_fills_the_shell_schema(tool: dict, arguments: dict | None) -> None:
    answer = _answer([{"role": "user", "content": "run echo hi"}], [LOOKUP, tool])
    (call,) = answer["tool_calls"]
    assert call["name"] == tool["function"]["name"]
    expected = arguments or {"command": "echo hi", "description": fc.RUN_DESCRIPTION}
    assert orjson.loads(call["arguments"]) == expected


@pytest.mark.parametrize(
    ("messages", "tools"),
    [
        ([{"role": "user", "content": "run echo hi"}], None),  # no shell declared
        ([{"role": "user", "content": "run echo hi"}], [LOOKUP]),
        ([{"role": "user", "content": "run echo hi"}], [{**BASH, "type": "custom"}]),
        ([{"role": "user", "content": "run echo hi"}], [{"type": "function", "name": "bash"}]),
        ([{"role": "user", "content": "run echo hi"}], [function("BASH")]),
        ([{"role": "user", "content": "please run echo hi"}], [BASH]),
        ([{"role": "user", "content": "Run echo hi"}], [BASH]),
        ([{"role": "user", "content": "run "}], [BASH]),
        ([{"role": "user", "content": "run     "}], [BASH]),
        ([{"role": "user", "content": "runecho"}], [BASH]),
        ([_user(_text("run echo hi"), _text("thanks"))], [BASH]),  # not the last text part
        ([{"role": "user", "content": "run echo hi"}, {"role": "assistant"}], [BASH]),
        ([{"role": "system", "content": "run echo hi"}], [BASH]),
        ([], [BASH]),
        ("run echo hi", [BASH]),
        ([_user({"type": "text", "text": 42})], [BASH]),
        ([{"role": "user", "content": None}], [BASH]),
        ([{"role": "user"}], "not a list"),
    ],
)
def test_default_otherwise_answers_with_text(messages: Any, tools: Any) -> None:
    answer = _answer(messages, tools)
    assert answer["content"] == fc.TEXT_ANSWER
    assert answer["tool_calls"] == [] and answer["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("results", "quoted"),
    [
        (["hi"], "hi"),
        (["  hi\n"], "hi"),
        ([[_text("line 1"), _text("line 2")]], "line 1\nline 2"),
        ([[{"type": "image_url"}, _text("seen")]], "seen"),
        (["first", "second"], "first\nsecond"),  # parallel calls answered
        (["x" * 5000], "x" * 2000),
    ],
)
def test_default_quotes_tool_results(results: list, quoted: str) -> None:
    tool_messages = [
        {"role": "tool", "tool_call_id": f"call_{i}", "content": content}
        for i, content in enumerate(results)
    ]
    for model in ("fake-text", "gpt-5.5", "fake-tool", "fake-parallel"):
        messages = [
            {"role": "user", "content": "run echo hi"},
            {"role": "assistant", "content": None, "tool_calls": []},
            *tool_messages,
        ]
        answer = _answer(messages, [BASH], model)
        assert answer["content"] == fc.TOOL_ANSWER_PREFIX + quoted
        assert answer["tool_calls"] == [] and answer["finish_reason"] == "stop"


def test_sdk_tool_loop_like_opencode(client: openai.OpenAI) -> None:
    """Turn 1 asks to run a command, turn 2 sends its output back and gets the quote."""
    messages: list[Any] = [{"role": "user", "content": "run echo hi"}]
    first = list(
        client.chat.completions.create(
            model="gpt-5.5", messages=messages, tools=[BASH], stream=True, stream_options=USAGE
        )
    )
    (call,) = assembled(first)["tool_calls"]
    assert assembled(first)["finish_reason"] == "tool_calls"
    assert orjson.loads(call["arguments"])["command"] == "echo hi"
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call["id"], "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": "hi\n"},
    ]
    second = client.chat.completions.create(model="gpt-5.5", messages=messages, tools=[BASH])
    assert second.choices[0].message.content == "The tool returned: hi"
    assert second.choices[0].finish_reason == "stop"


def captured(name: str) -> tuple[dict, dict[str, str]]:
    """A request OpenCode sent (tests/fixtures/opencode_captured), body and headers."""
    body = orjson.loads((CAPTURED / f"{name}.request.json").read_bytes())
    return body, orjson.loads((CAPTURED / f"{name}.headers.json").read_bytes())


def test_opencode_turn1_gets_the_bash_call() -> None:
    body, headers = captured("tool_turn1")
    assert body["stream"] is True and body["stream_options"] == USAGE
    assert "description" not in body["tools"][0]["function"]["parameters"]["properties"]
    chunks, done = sse_chunks(stream_bytes(fc.plan_chat(body, headers, 1)))
    answer = assembled(chunks)
    (call,) = answer["tool_calls"]
    assert call["name"] == "bash" and answer["finish_reason"] == "tool_calls"
    assert orjson.loads(call["arguments"]) == {
        "command": "echo hi",
        "description": fc.RUN_DESCRIPTION,
    }
    assert call["id"] == fc.tool_call("bash", {}, seed="echo hi").id
    assert answer["usage"] == documented_usage(1) and done


@pytest.mark.parametrize(
    ("name", "text"), [("tool_turn2", "The tool returned: hi"), ("say_hi", fc.TEXT_ANSWER)]
)
def test_opencode_other_turns_get_text(name: str, text: str) -> None:
    body, headers = captured(name)
    chunks, done = sse_chunks(stream_bytes(fc.plan_chat(body, headers, 2)))
    answer = assembled(chunks)
    assert (answer["content"], answer["tool_calls"]) == (text, [])
    assert answer["finish_reason"] == "stop" and answer["usage"] == documented_usage(2) and done


def test_fake_tool_fits_the_declared_tool() -> None:
    answer = _answer(HI, [{"type": "custom", "custom": {"name": "c"}}, LOOKUP, BASH], "fake-tool")
    (call,) = answer["tool_calls"]
    assert call["name"] == "lookup"  # the first function tool
    assert orjson.loads(call["arguments"]) == {"query": "example", "limit": 1, "unit": "c"}
    again = _answer(HI, [LOOKUP, BASH], "fake-tool")["tool_calls"][0]
    assert again["id"] == call["id"]  # deterministic
    bare = _answer(HI, None, "fake-tool")["tool_calls"][0]
    assert (bare["name"], orjson.loads(bare["arguments"])) == ("get_weather", {"city": "Paris"})
    assert bare["id"] != call["id"]


def test_different_commands_get_different_ids() -> None:
    ids = {
        _answer([{"role": "user", "content": f"run {command}"}], [BASH])["tool_calls"][0]["id"]
        for command in ("echo hi", "echo ho", "ls", "ls ")
    }
    assert len(ids) == 3  # "ls" and "ls " are one command
    assert all(i.startswith("call_") and len(i) == 29 for i in ids)


# --- never a dropped connection: any JSON body gets an answer -------------------------------

_KEY_WORDS = (
    "model messages tools stream stream_options include_usage role content type text name"
    " function parameters properties required enum tool_call_id"
)
_KEYS = _KEY_WORDS.split()
_WORDS = "user system assistant tool text function object string bash shell array integer"
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
_MODELS = st.sampled_from([*fc.MODELS, "fake-long-2", "", "gpt-5.5"]) | _JSON


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=5), model=_MODELS)
def test_any_json_body_gets_a_well_formed_answer(body: dict, model: Any) -> None:
    body = {**body, "model": model}
    reply = fc.chat_reply(orjson.dumps(body), {**AUTH, "x-fake-delay-ms": "0"}, 3)
    assert reply.status in (200, 400, 429, 500)
    if reply.chunks is not None:
        chunks, done = sse_chunks(b"".join(reply.chunks))
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert done or "error" in chunks[-1] or model == "fake-truncated"
    elif reply.status == 200 and not reply.close:
        assert orjson.loads(reply.body)["object"] == "chat.completion"
    else:
        assert reply.close or set(orjson.loads(reply.body)) == {"error"}
