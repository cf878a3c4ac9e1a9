"""OpenAI Chat Completions end to end: the real `openai` SDK's ``chat.completions`` through a
real mitmdump running addon.py, to the fake upstream (devtools/fake_openai_chat.py), and the
rows in the real SQLite file. Also an OpenAI-compatible host the way Azure OpenAI is set up
(``api-key`` header, an ``api-version`` query on the base URL, extra headers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from devtools.fake_upstream import FakeUpstream
from tests.harness import (
    PROVIDER_KEY,
    TOKENS,
    Mitmdump,
    bridge_config,
    children,
    query,
    replay_flows,
    wait_for,
)

ALICE = TOKENS["alice"]
USAGE_ADDED = "added by the bridge"


def azure_provider(upstream_url: str) -> dict[str, Any]:
    return {
        "name": "azure",
        "type": "openai_compatible",
        "base_url": f"{upstream_url}/openai/v1?api-version=2025-04-01-preview",
        "api_key": "${TEST_PROVIDER_KEY}",
        "key_header": "api-key",
        "extra_headers": {"x-ms-client-request-id": "aibridge-test"},
    }


@pytest.fixture(scope="module")
def bridge(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mitmdump]:
    config = bridge_config(upstream.url)
    config["providers"].append(azure_provider(upstream.url))
    with Mitmdump(tmp_path_factory.mktemp("bridge"), config) as proc:
        yield proc


def sdk(bridge: Mitmdump, provider: str = "openai", **kw: Any) -> openai.OpenAI:
    kw.setdefault("api_key", ALICE)
    return openai.OpenAI(base_url=f"{bridge.url}/{provider}/v1", max_retries=0, **kw)


def ended(bridge: Mitmdump, where: str, params: tuple[Any, ...] = ()) -> dict[str, Any]:
    sql = f"select * from interceptions where ended_at is not null and {where}"
    (row,) = wait_for(lambda: query(bridge.db_path, sql, params))
    return row


def last_chat_request(upstream: FakeUpstream) -> Any:
    return next(
        r for r in reversed(upstream.requests) if r.path.split("?")[0].endswith("/chat/completions")
    )


def fake_usage(n: int) -> dict[str, int]:
    """What the fake reports for its n-th chat call (devtools/fake_openai_chat.py)."""
    prompt, completion = 1000 * n + 1, 7 * n + 5
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": prompt + completion,
    }


def usage_of(bridge: Mitmdump, interception_id: str) -> dict[str, int]:
    (row,) = children(bridge, "token_usages", interception_id)
    return {key: row[key] for key in ("input_tokens", "output_tokens", "total_tokens")}


def post_raw(
    bridge: Mitmdump, body: bytes, provider: str = "openai", **headers: str
) -> httpx.Response:
    headers.setdefault("authorization", f"Bearer {ALICE}")
    headers.setdefault("content-type", "application/json")
    return httpx.post(
        f"{bridge.url}/{provider}/v1/chat/completions", content=body, headers=headers, timeout=30
    )


def test_streamed_without_usage_requested_gets_usage_added(
    bridge: Mitmdump, upstream: FakeUpstream
) -> None:
    """The SDK streams without stream_options: the bridge asks for usage, the client gets the
    extra usage chunk (the SDK takes it), and the log has the tokens."""
    prompt = "say hello (chat streamed e2e)"
    stream = sdk(bridge).chat.completions.create(
        model="fake-text", stream=True, messages=[{"role": "user", "content": prompt}]
    )
    chunks = list(stream)
    n = upstream.chat_calls
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 1000 * n + 1

    sent = last_chat_request(upstream)
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert ALICE not in orjson.dumps(sent.headers).decode()
    assert orjson.loads(sent.body)["stream_options"] == {"include_usage": True}

    row = ended(bridge, "response_id = ?", (chunks[0].id,))
    assert (row["api"], row["provider"], row["status"], row["streaming"]) == (
        "chat_completions",
        "openai",
        "completed",
        1,
    )
    assert (row["model"], row["client"], row["initiator_id"]) == (
        "fake-text",
        "openai-python",
        "alice",
    )
    assert orjson.loads(row["metadata"])["stream_usage"] == USAGE_ADDED
    assert usage_of(bridge, row["id"]) == fake_usage(n)
    (prompt_row,) = children(bridge, "user_prompts", row["id"])
    assert prompt_row["prompt"] == prompt


@pytest.mark.parametrize(
    ("body", "inserted_at"),
    [
        (b'{"model":"fake-text","stream":true,"messages":[{"role":"user","content":"a"}]}', 1),
        (
            b'  {\n  "stream": true,\n  "model": "fake-text",\n  "messages": [\n'
            b'    {"role": "user", "content": "caf\\u00e9 \\"stream_options\\""}\n  ]\n}\n',
            3,
        ),
    ],
)
def test_the_usage_edit_is_the_only_change_to_the_bytes(
    bridge: Mitmdump, upstream: FakeUpstream, body: bytes, inserted_at: int
) -> None:
    r = post_raw(bridge, body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    sent = last_chat_request(upstream)
    member = b'"stream_options":{"include_usage":true},'
    assert sent.body == body[:inserted_at] + member + body[inserted_at:]
    assert sent.headers["content-length"] == str(len(sent.body))


def test_streamed_with_usage_requested_is_forwarded_as_sent(
    bridge: Mitmdump, upstream: FakeUpstream
) -> None:
    body = (
        b'{"model": "fake-cached", "stream": true, "stream_options": {"include_usage": true},'
        b' "messages": [{"role": "user", "content": "cached please"}]}'
    )
    r = post_raw(bridge, body)
    assert r.status_code == 200
    n = upstream.chat_calls
    assert last_chat_request(upstream).body == body
    first = orjson.loads(r.text.split("\n", 1)[0].removeprefix("data: "))
    row = ended(bridge, "response_id = ?", (first["id"],))
    assert orjson.loads(row["metadata"])["stream_usage"] == "requested by the client"
    (usage,) = children(bridge, "token_usages", row["id"])
    assert (usage["cache_read_input_tokens"], usage["uncached_input_tokens"]) == (
        100 * n,
        1000 * n + 1 - 100 * n,
    )


def test_buffered_completion_is_recorded(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    completion = sdk(bridge).chat.completions.create(
        model="fake-reasoning",
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}],
            },
        ],
    )
    n = upstream.chat_calls
    assert "stream_options" not in orjson.loads(last_chat_request(upstream).body)
    row = ended(bridge, "response_id = ?", (completion.id,))
    assert (row["streaming"], row["status"], row["http_status"]) == (0, "completed", 200)
    assert "stream_usage" not in orjson.loads(row["metadata"])
    (usage,) = children(bridge, "token_usages", row["id"])
    assert (usage["output_tokens"], usage["reasoning_tokens"]) == (7 * n + 5, 3 * n)
    (prompt_row,) = children(bridge, "user_prompts", row["id"])
    assert prompt_row["prompt"] == "part one\ntwo"


@pytest.mark.parametrize("stream", [True, False])
def test_parallel_tool_calls_and_the_follow_up_turn(
    bridge: Mitmdump, upstream: FakeUpstream, stream: bool
) -> None:
    client = sdk(bridge)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages: list[Any] = [{"role": "user", "content": "weather in two cities"}]
    if stream:
        with client.chat.completions.stream(
            model="fake-parallel", messages=messages, tools=tools
        ) as s:
            final = s.get_final_completion()
    else:
        final = client.chat.completions.create(
            model="fake-parallel", messages=messages, tools=tools
        )
    calls = final.choices[0].message.tool_calls or []
    assert [orjson.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Tokyo"]
    row = ended(bridge, "response_id = ?", (final.id,))
    rows = children(bridge, "tool_usages", row["id"])
    assert [(t["tool"], t["type"], t["call_id"], orjson.loads(t["args"])) for t in rows] == [
        ("get_weather", "function", calls[0].id, {"city": "Paris"}),
        ("get_weather", "function", calls[1].id, {"city": "Tokyo"}),
    ]
    assert row["status"] == "completed"

    messages.append(final.choices[0].message.model_dump(exclude_none=True))
    for call, text in zip(calls, ("18 C", "24 C"), strict=True):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
    answer = client.chat.completions.create(model="fake-parallel", messages=messages, tools=tools)
    follow = ended(bridge, "response_id = ?", (answer.id,))
    assert follow["correlating_tool_call_id"] == calls[1].id
    assert children(bridge, "user_prompts", follow["id"]) == []


@pytest.mark.parametrize(
    ("model", "source_text"),
    [("fake-reasoning-content", "reasoning_content"), ("fake-reasoning-field", "reasoning")],
)
def test_reasoning_text_of_compatible_hosts_is_a_thought(
    bridge: Mitmdump, model: str, source_text: str
) -> None:
    r = post_raw(
        bridge,
        orjson.dumps(
            {"model": model, "stream": True, "messages": [{"role": "user", "content": "think"}]}
        ),
    )
    streamed = ""
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in orjson.loads(line[6:]).get("choices", []):
                streamed += choice.get("delta", {}).get(source_text) or ""
    assert streamed
    first = orjson.loads(r.text.split("\n", 1)[0].removeprefix("data: "))
    row = ended(bridge, "response_id = ?", (first["id"],))
    thoughts = children(bridge, "model_thoughts", row["id"])
    assert [(t["source"], t["content"]) for t in thoughts] == [("reasoning", streamed)]


@pytest.mark.parametrize(
    ("model", "status", "error_part", "http_status"),
    [
        ("fake-length", "incomplete", "length", 200),
        ("fake-content-filter", "completed", "content_filter", 200),
        ("fake-error-chunk", "error", "", 200),
        ("fake-truncated", "error", "the stream ended before a terminal event", 200),
        ("fake-400", "upstream_error", "upstream answered HTTP 400", 400),
        ("fake-429", "upstream_error", "upstream answered HTTP 429", 429),
        ("fake-500", "upstream_error", "upstream answered HTTP 500", 500),
    ],
)
def test_how_a_stream_ends_is_recorded(
    bridge: Mitmdump, model: str, status: str, error_part: str, http_status: int
) -> None:
    marker = f"ending {model}"
    r = post_raw(
        bridge,
        orjson.dumps(
            {"model": model, "stream": True, "messages": [{"role": "user", "content": marker}]}
        ),
    )
    assert r.status_code == http_status
    sql = (
        "select i.* from interceptions i join user_prompts p on p.interception_id = i.id"
        " where p.prompt = ? and i.ended_at is not null"
    )
    (row,) = wait_for(lambda: query(bridge.db_path, sql, (marker,)))
    assert (row["status"], row["http_status"]) == (status, http_status)
    assert error_part in (row["error"] or "")


def test_an_openai_compatible_host_with_its_own_key_header_and_query(
    bridge: Mitmdump, upstream: FakeUpstream
) -> None:
    """Azure OpenAI's v1 API: the key goes as api-key, api-version rides on every request, the
    client's own query and its api-key header (AzureOpenAI's way) work."""
    client = sdk(bridge, "azure")
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello azure"}]
    )
    sent = last_chat_request(upstream)
    assert sent.path == "/openai/v1/chat/completions?api-version=2025-04-01-preview"
    assert sent.headers["api-key"] == PROVIDER_KEY
    assert "authorization" not in sent.headers
    assert sent.headers["x-ms-client-request-id"] == "aibridge-test"
    row = ended(bridge, "response_id = ?", (completion.id,))
    assert (row["provider"], row["provider_name"], row["api"]) == (
        "openai_compatible",
        "azure",
        "chat_completions",
    )

    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "key header"}]}'
    r = httpx.post(
        f"{bridge.url}/azure/v1/chat/completions?api-version=2024-10-21&trace=1",
        content=body,
        headers={"api-key": ALICE, "content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200
    sent = last_chat_request(upstream)
    assert sent.path == "/openai/v1/chat/completions?api-version=2024-10-21&trace=1"
    assert sent.headers["api-key"] == PROVIDER_KEY and sent.body == body
    assert ALICE not in orjson.dumps(sent.headers).decode()

    # The Responses API is not one this provider serves (type openai_compatible: chat only).
    r = httpx.post(
        f"{bridge.url}/azure/v1/responses",
        content=b'{"model": "gpt-4o", "input": "x"}',
        headers={"authorization": f"Bearer {ALICE}"},
        timeout=30,
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "403"


def test_unknown_token_is_refused_in_openai_shape_and_never_forwarded(
    bridge: Mitmdump, upstream: FakeUpstream
) -> None:
    before = upstream.chat_calls
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(bridge, api_key="not-a-bridge-token").chat.completions.create(
            model="fake-text", messages=[{"role": "user", "content": "refused chat"}]
        )
    assert "unknown bridge token" in str(info.value)
    r = post_raw(bridge, b'{"model": "m", "stream": "yes"}')
    assert r.status_code == 400 and "'stream' must be a boolean" in r.json()["error"]["message"]
    assert upstream.chat_calls == before
    sql = "select * from interceptions where api = 'chat_completions' and status = 'rejected'"
    rows = wait_for(
        lambda: query(bridge.db_path, sql) if len(query(bridge.db_path, sql)) >= 2 else []
    )
    assert {r["http_status"] for r in rows} >= {400, 401}


def test_usage_edit_off_forwards_every_byte_and_says_so(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = bridge_config(upstream.url, chat_completions={"request_usage": False})
    with Mitmdump(tmp_path, config) as proc:
        body = b'{"model":"fake-text","stream":true,"messages":[{"role":"user","content":"off"}]}'
        r = post_raw(proc, body)
        assert r.status_code == 200 and '"usage"' not in r.text
        assert last_chat_request(upstream).body == body
        first = orjson.loads(r.text.split("\n", 1)[0].removeprefix("data: "))
        row = ended(proc, "response_id = ?", (first["id"],))
        assert orjson.loads(row["metadata"])["stream_usage"] == "not requested"
        assert children(proc, "token_usages", row["id"]) == []
        assert row["status"] == "completed"


def test_offline_replay_rebuilds_the_records(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Flows saved with -w (the edited body is what was sent), read back: the same records,
    the edit still known as the bridge's."""
    flows = tmp_path / "flows.mitm"
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    args = ["-w", str(flows), "--set", "store_streamed_bodies=true"]
    with Mitmdump(live_dir, bridge_config(upstream.url), extra_args=args) as live:
        client = sdk(live)
        list(
            client.chat.completions.create(
                model="fake-reasoning-content",
                stream=True,
                messages=[{"role": "user", "content": "replayed"}],
            )
        )
        client.chat.completions.create(
            model="fake-tool", messages=[{"role": "user", "content": "tool, buffered"}]
        )
        wait_for(
            lambda: (
                len(query(live.db_path, "select 1 from interceptions where ended_at is not null"))
                == 2
            )
        )
    raw = flows.read_bytes()
    assert ALICE.encode() not in raw and PROVIDER_KEY.encode() not in raw
    rebuilt = tmp_path / "rebuilt.db"
    replay_flows(
        flows, live.config_path, rebuilt, tmp_path / "conf", {"TEST_PROVIDER_KEY": PROVIDER_KEY}
    )
    every = (
        "select id, api, initiator_id, status, http_status, model, response_model, streaming,"
        " response_id, json_extract(metadata, '$.stream_usage') from interceptions order by id"
    )
    assert query(rebuilt, every) == query(live.db_path, every)
    assert query(
        rebuilt,
        "select json_extract(metadata, '$.stream_usage') s from interceptions where streaming = 1",
    ) == [{"s": USAGE_ADDED}]
    for table, columns in (
        ("token_usages", "input_tokens, output_tokens"),
        ("tool_usages", "tool, call_id, args"),
        ("model_thoughts", "source, content"),
        ("user_prompts", "prompt"),
    ):
        sql = f"select {columns} from {table} order by {columns}"
        assert query(rebuilt, sql) == query(live.db_path, sql), table
