"""Anthropic Messages end to end: the real `anthropic` SDK through a real mitmdump running
addon.py, to the fake Anthropic upstream (devtools/fake_anthropic.py), and the rows in the
real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
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


def anthropic_provider(upstream_url: str, name: str = "anthropic") -> dict[str, Any]:
    return {
        "name": name,
        "type": "anthropic",
        "base_url": f"{upstream_url}/v1",
        "api_key": "${TEST_PROVIDER_KEY}",
    }


@pytest.fixture(scope="module")
def bridge(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mitmdump]:
    """One bridge with an OpenAI and an Anthropic provider, both at the fake."""
    config = bridge_config(upstream.url)
    config["providers"].append(anthropic_provider(upstream.url))
    with Mitmdump(tmp_path_factory.mktemp("bridge"), config) as proc:
        yield proc


def client(bridge: Mitmdump, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("api_key", ALICE)
    return anthropic.Anthropic(base_url=f"{bridge.url}/anthropic", max_retries=0, **kw)


def ended(bridge: Mitmdump, where: str, params: tuple[Any, ...] = ()) -> dict[str, Any]:
    sql = f"select * from interceptions where ended_at is not null and {where}"
    (row,) = wait_for(lambda: query(bridge.db_path, sql, params))
    return row


def last_upstream_request(upstream: FakeUpstream, path_end: str) -> Any:
    return next(r for r in reversed(upstream.requests) if r.path.split("?")[0].endswith(path_end))


def expected_usage(n: int, *, split_cache: bool = False) -> dict[str, int]:
    """What the fake sends for its n-th messages call (devtools/fake_anthropic.py)."""
    uncached, write, read = 100 * n + 1, 1000 * n + 2, 10000 * n + 3
    if split_cache:
        write = (600 * n + 2) + 400 * n
    output = 7 * n + 5
    return {
        "input_tokens": uncached + read + write,
        "uncached_input_tokens": uncached,
        "cache_read_input_tokens": read,
        "cache_write_input_tokens": write,
        "output_tokens": output,
        "total_tokens": uncached + read + write + output,
    }


def usage_columns(row: dict[str, Any]) -> dict[str, int]:
    return {key: row[key] for key in expected_usage(1)}


def test_streamed_text_is_recorded(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    prompt = "say hello (streamed e2e)"
    sdk = client(bridge)
    with sdk.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": prompt}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    n = upstream.messages_calls
    sent = last_upstream_request(upstream, "/v1/messages")
    # The provider key went upstream as x-api-key; the bridge token never did.
    assert sent.headers["x-api-key"] == PROVIDER_KEY
    assert "authorization" not in sent.headers
    assert ALICE not in orjson.dumps(sent.headers).decode()
    # anthropic-version passes through as the client sent it.
    assert sent.headers["anthropic-version"] == sdk.default_headers["anthropic-version"]

    row = ended(bridge, "response_id = ?", (final.id,))
    assert (row["api"], row["provider"], row["provider_name"]) == (
        "messages",
        "anthropic",
        "anthropic",
    )
    assert (row["initiator_id"], row["status"], row["streaming"], row["http_status"]) == (
        "alice",
        "completed",
        1,
        200,
    )
    assert (row["model"], row["client"]) == ("claude-sonnet-4-5", "anthropic-python")
    assert row["credential_kind"] == "centralized"
    (usage,) = children(bridge, "token_usages", row["id"])
    assert usage_columns(usage) == expected_usage(n)
    assert usage["service_tier"] == "standard"
    # Priced from Anthropic's list (genai-prices), cache reads and writes at their own rates.
    assert (usage["price_source"], usage["priced_model"]) == ("genai-prices", "claude-sonnet-4-5")
    assert usage["estimated_cost_usd"] > 0
    # The SDK's own view of the usage agrees with the log (Anthropic's input excludes cache).
    assert final.usage.input_tokens == usage["uncached_input_tokens"]
    assert final.usage.output_tokens == usage["output_tokens"]
    (prompt_row,) = children(bridge, "user_prompts", row["id"])
    assert prompt_row["prompt"] == prompt


def test_buffered_tool_use_is_recorded(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    tools = [
        {
            "name": "get_weather",
            "description": "Weather of a city",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    message = client(bridge).messages.create(
        model="fake-parallel",
        max_tokens=64,
        tools=tools,
        messages=[{"role": "user", "content": "weather in two cities (buffered e2e)"}],
    )
    calls = [block for block in message.content if block.type == "tool_use"]
    assert len(calls) == 2
    row = ended(bridge, "response_id = ?", (message.id,))
    assert (row["status"], row["streaming"]) == ("completed", 0)
    tools_rows = children(bridge, "tool_usages", row["id"])
    assert [(t["call_id"], t["tool"], t["type"]) for t in tools_rows] == [
        (c.id, c.name, "tool_use") for c in calls
    ]
    assert [orjson.loads(t["args"]) for t in tools_rows] == [c.input for c in calls]

    # The follow-up turn carries the results: no prompt, the last tool_use_id correlates.
    follow_up = client(bridge).messages.create(
        model="fake-parallel",
        max_tokens=64,
        tools=tools,
        messages=[
            {"role": "user", "content": "weather in two cities (buffered e2e)"},
            {"role": "assistant", "content": [c.model_dump() for c in message.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": c.id, "content": "sunny"} for c in calls
                ],
            },
        ],
    )
    second = ended(bridge, "response_id = ?", (follow_up.id,))
    assert second["correlating_tool_call_id"] == calls[-1].id
    assert children(bridge, "user_prompts", second["id"]) == []


def test_streamed_thinking_is_a_thought(bridge: Mitmdump) -> None:
    with client(bridge).messages.stream(
        model="fake-thinking",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "think first (e2e)"}],
    ) as stream:
        final = stream.get_final_message()
    thinking = "".join(b.thinking for b in final.content if b.type == "thinking")
    row = ended(bridge, "response_id = ?", (final.id,))
    (thought,) = children(bridge, "model_thoughts", row["id"])
    assert (thought["source"], thought["content"]) == ("thinking", thinking)


def test_cache_writes_split_5m_and_1h(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    message = client(bridge).messages.create(
        model="fake-cached", max_tokens=64, messages=[{"role": "user", "content": "cached"}]
    )
    n = upstream.messages_calls
    row = ended(bridge, "response_id = ?", (message.id,))
    (usage,) = children(bridge, "token_usages", row["id"])
    assert usage_columns(usage) == expected_usage(n, split_cache=True)
    raw = orjson.loads(usage["usage"])
    assert raw["cache_creation"] == {
        "ephemeral_5m_input_tokens": 600 * n + 2,
        "ephemeral_1h_input_tokens": 400 * n,
    }


@pytest.mark.parametrize(
    ("model", "status", "error"),
    [
        ("fake-max-tokens", "incomplete", "max_tokens"),
        ("fake-refusal", "completed", "refusal"),
    ],
)
def test_stop_reasons(bridge: Mitmdump, model: str, status: str, error: str) -> None:
    with client(bridge).messages.stream(
        model=model, max_tokens=16, messages=[{"role": "user", "content": f"stop {model}"}]
    ) as stream:
        final = stream.get_final_message()
    row = ended(bridge, "response_id = ?", (final.id,))
    assert (row["status"], row["error"]) == (status, error)


def test_error_event_mid_stream(bridge: Mitmdump) -> None:
    marker = "error event mid-stream (e2e)"
    with (
        pytest.raises(anthropic.APIStatusError, match="verloaded"),
        client(bridge).messages.stream(
            model="fake-error-event",
            max_tokens=16,
            messages=[{"role": "user", "content": marker}],
        ) as stream,
    ):
        for _ in stream:
            pass
    row = ended(
        bridge, "id in (select interception_id from user_prompts where prompt = ?)", (marker,)
    )
    assert row["status"] == "error"
    assert "verloaded" in row["error"]


@pytest.mark.parametrize(
    ("model", "status", "exception"),
    [
        ("fake-529", 529, anthropic.InternalServerError),
        ("fake-400", 400, anthropic.BadRequestError),
    ],
)
def test_upstream_errors_are_forwarded_and_recorded(
    bridge: Mitmdump, model: str, status: int, exception: type[Exception]
) -> None:
    marker = f"upstream error {model} (e2e)"
    with pytest.raises(exception) as info:
        client(bridge).messages.create(
            model=model, max_tokens=16, messages=[{"role": "user", "content": marker}]
        )
    assert getattr(info.value, "status_code", None) == status
    row = ended(
        bridge, "id in (select interception_id from user_prompts where prompt = ?)", (marker,)
    )
    assert (row["status"], row["http_status"]) == ("upstream_error", status)
    assert row["error"].startswith(f"upstream answered HTTP {status}: ")


def test_bearer_token_and_beta_query(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    """Claude Code with ANTHROPIC_AUTH_TOKEN sends the token as a bearer, and ?beta=true
    (as the TypeScript SDK's beta client adds): both bridged, the query kept."""
    beta = anthropic.Anthropic(
        base_url=f"{bridge.url}/anthropic", auth_token=ALICE, api_key=None, max_retries=0
    )
    message = beta.beta.messages.create(
        model="claude-haiku-4-5",
        max_tokens=16,
        messages=[{"role": "user", "content": "beta query (e2e)"}],
        betas=["interleaved-thinking-2025-05-14"],
        extra_query={"beta": "true"},
    )
    sent = last_upstream_request(upstream, "/v1/messages")
    assert sent.path == "/v1/messages?beta=true"
    assert sent.headers["x-api-key"] == PROVIDER_KEY
    assert "authorization" not in sent.headers
    assert sent.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    row = ended(bridge, "response_id = ?", (message.id,))
    assert (row["initiator_id"], row["status"]) == ("alice", "completed")


@pytest.mark.parametrize("token", [None, "not-a-known-token-000"])
def test_unknown_token_gets_401_in_anthropic_shape(
    bridge: Mitmdump, upstream: FakeUpstream, token: str | None
) -> None:
    before = len(upstream.requests)
    headers = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
    if token is not None:
        headers["x-api-key"] = token
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    response = httpx.post(f"{bridge.url}/anthropic/v1/messages", headers=headers, json=body)
    assert response.status_code == 401
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "authentication_error"
    assert "bridge token" in error["error"]["message"]
    assert len(upstream.requests) == before  # never forwarded


def test_bad_body_gets_400_in_anthropic_shape(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    for body in (b"{", b"[]", b'{"model": 1}', b'{"messages": "hi"}', b'{"model":"a","model":"b"}'):
        response = httpx.post(
            f"{bridge.url}/anthropic/v1/messages",
            headers={"x-api-key": ALICE, "content-type": "application/json"},
            content=body,
        )
        assert response.status_code == 400, body
        assert response.json()["error"]["type"] == "invalid_request_error", body
    assert len(upstream.requests) == before


def marker_rowid(bridge: Mitmdump, text: str) -> int:
    """Send a recorded request and wait for its row: the writer keeps order, so every row
    of what came before is written by then."""
    client(bridge).messages.create(
        model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": text}]
    )
    sql = (
        "select rowid from interceptions where ended_at is not null and id in "
        "(select interception_id from user_prompts where prompt = ?)"
    )
    (row,) = wait_for(lambda: query(bridge.db_path, sql, (text,)))
    return int(row["rowid"])


def test_passthrough_and_forbidden_paths(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    sdk = client(bridge)
    before = marker_rowid(bridge, "before passthrough")
    count = sdk.messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "count me"}]
    )
    assert count.input_tokens > 0
    sent = last_upstream_request(upstream, "/v1/messages/count_tokens")
    assert sent.headers["x-api-key"] == PROVIDER_KEY
    assert sent.headers.get("authorization") is None
    assert sdk.models.list().data
    after = marker_rowid(bridge, "after passthrough")
    # Passthrough is authenticated and keyed, never recorded.
    assert after == before + 1
    # Responses paths are not an Anthropic provider's, nor any other path.
    for path in ("/v1/responses", "/v1/complete", "/v1/files", "/v1/messages/batches"):
        response = httpx.post(
            f"{bridge.url}/anthropic{path}", headers={"x-api-key": ALICE}, content=b"{}"
        )
        assert response.status_code == 403, path
        assert response.json()["error"]["type"] == "permission_error", path


def test_reverse_proxy_shape(upstream: FakeUpstream, tmp_path: Path) -> None:
    """``--mode reverse:<anthropic>``: the client's /v1/messages goes to the provider."""
    config = bridge_config(upstream.url)
    config["providers"] = [anthropic_provider(upstream.url)]
    with Mitmdump(tmp_path, config, mode=f"reverse:{upstream.url}") as proc:
        sdk = anthropic.Anthropic(base_url=proc.url, api_key=ALICE, max_retries=0)
        message = sdk.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=16,
            messages=[{"role": "user", "content": "reverse (e2e)"}],
        )
        row = ended(proc, "response_id = ?", (message.id,))
        assert (row["api"], row["status"], row["initiator_id"]) == (
            "messages",
            "completed",
            "alice",
        )


def test_truncated_stream_keeps_what_arrived(bridge: Mitmdump) -> None:
    """A stream cut before message_stop: the client gets every byte upstream sent, and the
    record says how it ended, with the usage that had arrived."""
    marker = "truncated stream (e2e)"
    body = {
        "model": "fake-truncated",
        "max_tokens": 16,
        "stream": True,
        "messages": [{"role": "user", "content": marker}],
    }
    headers = {"x-api-key": ALICE, "anthropic-version": "2023-06-01"}
    response = httpx.post(f"{bridge.url}/anthropic/v1/messages", headers=headers, json=body)
    assert response.status_code == 200
    assert b"event: message_start" in response.content
    assert b"message_stop" not in response.content
    row = ended(
        bridge, "id in (select interception_id from user_prompts where prompt = ?)", (marker,)
    )
    assert (row["status"], row["error"]) == ("error", "the stream ended before a terminal event")
    (usage,) = children(bridge, "token_usages", row["id"])
    assert usage["output_tokens"] == 1  # message_start's: no message_delta came


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_events_split_anywhere_give_the_same_records(bridge: Mitmdump, chunk_size: int) -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    records = []
    for size in (None, chunk_size):
        extra = {"x-fake-chunk-size": str(size)} if size else {}
        with client(bridge, default_headers=extra).messages.stream(
            model="fake-parallel",
            max_tokens=64,
            tools=tools,
            messages=[{"role": "user", "content": f"split {size}"}],
        ) as stream:
            final = stream.get_final_message()
        row = ended(bridge, "response_id = ?", (final.id,))
        tools_rows = children(bridge, "tool_usages", row["id"])
        records.append(
            (row["status"], [(t["tool"], t["args"]) for t in tools_rows], len(tools_rows))
        )
    assert records[0] == records[1]
    assert records[0][2] == 2


def test_offline_replay_rebuilds_the_records(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Flows saved with -w, read back by `mitmdump -n --rfile`: the same Messages records."""
    config = bridge_config(upstream.url)
    config["providers"] = [anthropic_provider(upstream.url)]
    flows = tmp_path / "flows.mitm"
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    args = ["-w", str(flows), "--set", "store_streamed_bodies=true"]
    with Mitmdump(live_dir, config, extra_args=args) as live:
        sdk = client(live)
        with sdk.messages.stream(
            model="fake-thinking", max_tokens=64, messages=[{"role": "user", "content": "a"}]
        ) as stream:
            stream.get_final_message()
        sdk.messages.create(
            model="fake-tool",
            max_tokens=64,
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
            messages=[{"role": "user", "content": "b"}],
        )
        with pytest.raises(anthropic.AuthenticationError):
            client(live, api_key="unknown-token-0000").messages.create(
                model="m", max_tokens=1, messages=[{"role": "user", "content": "c"}]
            )
        wait_for(
            lambda: (
                len(query(live.db_path, "select 1 from interceptions where ended_at is not null"))
                == 3
            )
        )
    raw = flows.read_bytes()
    assert ALICE.encode() not in raw and PROVIDER_KEY.encode() not in raw

    rebuilt = tmp_path / "rebuilt.db"
    env = {"TEST_PROVIDER_KEY": PROVIDER_KEY}
    replay_flows(flows, live.config_path, rebuilt, tmp_path / "conf", env)
    every = (
        "select id, api, initiator_id, status, http_status, model, response_model, streaming, "
        "response_id, credential_kind, credential_hint from interceptions order by id"
    )
    assert query(rebuilt, every) == query(live.db_path, every)
    for table, columns in (
        ("token_usages", "input_tokens, output_tokens, cache_read_input_tokens"),
        ("tool_usages", "tool, call_id, args"),
        ("model_thoughts", "source, content"),
        ("user_prompts", "prompt"),
    ):
        sql = f"select {columns} from {table} order by {columns}"
        assert query(rebuilt, sql) == query(live.db_path, sql), table


def test_subscription_sign_in_goes_upstream_as_the_users_own(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Claude Pro/Max: the OAuth token is forwarded as it came (a bearer), recorded by its
    hint only, and not priced per token; a provider not configured for it refuses it."""
    oauth = "sk-ant-oat01-" + "a1b2c3d4" * 8
    config = bridge_config(upstream.url)
    config["providers"] = [
        {**anthropic_provider(upstream.url), "subscription": True},
        {**anthropic_provider(upstream.url, "keyed")},
    ]
    flows = tmp_path / "flows.mitm"
    with Mitmdump(tmp_path, config, extra_args=["-w", str(flows)]) as proc:
        signed_in = anthropic.Anthropic(
            base_url=f"{proc.url}/anthropic", auth_token=oauth, api_key=None, max_retries=0
        )
        message = signed_in.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=16,
            messages=[{"role": "user", "content": "my own plan"}],
        )
        sent = last_upstream_request(upstream, "/v1/messages")
        assert sent.headers["authorization"] == f"Bearer {oauth}"
        assert "x-api-key" not in sent.headers
        row = ended(proc, "response_id = ?", (message.id,))
        assert (row["credential_kind"], row["status"]) == ("subscription", "completed")
        assert row["initiator_id"] == f"subscription:{oauth[:4]}...{oauth[-4:]}"
        assert row["credential_hint"] == f"{oauth[:4]}...{oauth[-4:]}"
        (usage,) = children(proc, "token_usages", row["id"])
        assert usage["input_tokens"] > 0 and usage["estimated_cost_usd"] is None

        refused = anthropic.Anthropic(
            base_url=f"{proc.url}/keyed", auth_token=oauth, api_key=None, max_retries=0
        )
        with pytest.raises(anthropic.AuthenticationError):
            refused.messages.create(
                model="m", max_tokens=1, messages=[{"role": "user", "content": "no"}]
            )
        wait_for(
            lambda: query(proc.db_path, "select 1 from interceptions where status = 'rejected'")
        )
    assert oauth.encode() not in proc.db_path.read_bytes()
    assert oauth.encode() not in flows.read_bytes()
