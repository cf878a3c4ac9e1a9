"""The addon's hooks (aibridge.bridge), driven the way mitmproxy drives them, without a proxy.

Each test loads ``AIBridge`` into ``taddons.context``, configures it from a YAML file in
``tmp_path``, builds flows with ``tflow`` and calls the hooks in protocol order. Records are
read back from the SQLite file after flushing the recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from mitmproxy import exceptions, hooks, http
from mitmproxy.flow import Error
from mitmproxy.options import Options
from mitmproxy.test import taddons, tflow

from aibridge.apis.openai_responses import BACKGROUND_NOT_SUPPORTED
from aibridge.auth import hint
from aibridge.bridge import METADATA_KEY, AIBridge
from aibridge.transport import mitm_compat
from aibridge.transport.tee import StreamTee

FIXTURES = Path(__file__).parent / "fixtures"
PROVIDER_KEY = "sk-proj-bridge-test-key-0123456789ABCDEF"
LOCAL_KEY = "sk-local-provider-key-ZYXWVUTSRQ"
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210"}
UNKNOWN_TOKEN = "not-a-known-token-123"
UA = "codex_cli_rs/0.50.0 (Mac OS 15.0; arm64) iTerm.app"
RESPONSES_URL = "https://api.openai.com/v1/responses"
SECRETS = (PROVIDER_KEY, LOCAL_KEY, *TOKENS.values(), UNKNOWN_TOKEN)

STREAMED = sorted(p.name.removesuffix(".response.sse") for p in FIXTURES.glob("*.response.sse"))
BUFFERED = [
    "text_buffered",
    "cached_tokens_buffered",
    "builtin_tool_calls_buffered",
    "tool_result_buffered",
]


def fixture(name: str, kind: str) -> bytes:
    return (FIXTURES / f"{name}.{kind}").read_bytes()


def expected(name: str) -> dict[str, Any]:
    return orjson.loads(fixture(name, "expected.json"))


def write_config(directory: Path, **overrides: Any) -> Path:
    config: dict[str, Any] = {
        "database": "audit.db",
        "providers": [
            {
                "name": "openai",
                "type": "openai",
                "base_url": "https://api.openai.com/v1",
                "api_key": PROVIDER_KEY,
                "extra_headers": {"OpenAI-Organization": "org-test"},
            },
            {
                "name": "local",
                "type": "openai",
                "base_url": "http://127.0.0.1:9911/custom/v1",
                "api_key": LOCAL_KEY,
            },
        ],
        "users": [{"id": user, "token": token} for user, token in TOKENS.items()],
    }
    config.update(overrides)
    path = directory / "aibridge.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def query(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


@dataclass
class Bridge:
    addon: AIBridge
    tctx: taddons.context
    db_path: Path

    def flush(self) -> None:
        if self.addon.recorder is not None:
            assert self.addon.recorder.flush(timeout=10)

    def interceptions(self, flow: http.HTTPFlow) -> list[dict[str, Any]]:
        self.flush()
        return query(self.db_path, "select * from interceptions where flow_id = ?", (flow.id,))

    def interception(self, flow: http.HTTPFlow) -> dict[str, Any]:
        (row,) = self.interceptions(flow)
        return row

    def replay_saved(self, flow: http.HTTPFlow, interception_id: str) -> None:
        """What `-w` saved of `flow`, read back by `mitmdump -n --rfile` into a log that has
        lost this interception's rows."""
        saved = http.HTTPFlow.from_state(flow.get_state())
        saved.live = False
        conn = sqlite3.connect(self.db_path)
        with conn:
            conn.execute("delete from user_prompts where interception_id = ?", (interception_id,))
            conn.execute("delete from interceptions where id = ?", (interception_id,))
        conn.close()
        self.addon.request(saved)

    def children(self, table: str, interception_id: str) -> list[dict[str, Any]]:
        self.flush()
        return query(
            self.db_path,
            f"select * from {table} where interception_id = ? order by id",
            (interception_id,),
        )


@pytest.fixture
def make_bridge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Bridge]]:
    # The option's default (config.yaml) is looked up in the current directory and next to
    # the addon: both are tmp_path here, so no test can reach a config of the checkout.
    monkeypatch.chdir(tmp_path)
    with contextlib.ExitStack() as stack:

        def make(**overrides: Any) -> Bridge:
            addon = AIBridge(default_config_dir=tmp_path)
            tctx = stack.enter_context(taddons.context(addon))
            stack.callback(addon.done)  # runs before the context closes (LIFO)
            tctx.configure(addon, aibridge_config=str(write_config(tmp_path, **overrides)))
            return Bridge(addon, tctx, tmp_path / "audit.db")

        yield make


@pytest.fixture(scope="module")
def shared_bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    """One bridge for the tests that only add flows: each reads back its own rows by flow id."""
    directory = tmp_path_factory.mktemp("bridge")
    addon = AIBridge(default_config_dir=directory)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, aibridge_config=str(write_config(directory)))
        yield Bridge(addon, tctx, directory / "audit.db")
        addon.done()


@pytest.fixture
def bridge(shared_bridge: Bridge) -> Bridge:
    return shared_bridge


def make_flow(
    body: bytes,
    *,
    token: str | None = TOKENS["alice"],
    url: str = RESPONSES_URL,
    method: str = "POST",
    **headers: str,
) -> http.HTTPFlow:
    request = http.Request.make(method, url, body, {})
    default_port = request.port == (443 if request.scheme == "https" else 80)
    request.headers["host"] = request.host if default_port else f"{request.host}:{request.port}"
    request.headers["content-type"] = "application/json"
    request.headers["user-agent"] = UA
    request.headers["originator"] = "codex_cli_rs"
    request.headers["session-id"] = "sess-hdr-1"
    if token is not None:
        request.headers["authorization"] = f"Bearer {token}"
    for name, value in headers.items():
        request.headers[name.replace("_", "-")] = value
    return tflow.tflow(req=request)


def sse_response() -> http.Response:
    return http.Response.make(200, b"", {"content-type": "text/event-stream; charset=utf-8"})


def stream_through(
    bridge: Bridge, flow: http.HTTPFlow, raw: bytes, *, end: bool = True, size: int = 97
) -> StreamTee:
    """responseheaders, then the body through flow.response.stream as mitmproxy would."""
    flow.response = sse_response()
    bridge.addon.responseheaders(flow)
    tee = flow.response.stream
    assert isinstance(tee, StreamTee)
    for i in range(0, len(raw), size):
        chunk = raw[i : i + size]
        assert tee(chunk) is chunk  # forwarded unchanged, at once
    if end:
        assert tee(b"") == b""
    return tee


def cut_before_completed(name: str) -> bytes:
    raw = fixture(name, "response.sse")
    return raw[: raw.index(b"event: response.completed")]


def bridged(bridge: Bridge, name: str, **kw: Any) -> http.HTTPFlow:
    flow = make_flow(fixture(name, "request.json"), **kw)
    bridge.addon.request(flow)
    assert flow.response is None  # not rejected
    return flow


def assert_rows_match(bridge: Bridge, iid: str, name: str, *, privacy: bool = True) -> None:
    """The rows of one interception are what the golden fixture says."""
    want = expected(name)
    result = want["result"]
    prompts = bridge.children("user_prompts", iid)
    if want["request"]["prompt"] is None:
        assert prompts == []
    else:
        assert [(p["prompt"], p["response_id"]) for p in prompts] == [
            (want["request"]["prompt"] if privacy else None, result["response_id"])
        ]
    usages = bridge.children("token_usages", iid)
    if result["token_usage"] is None:
        assert usages == []
    else:
        (usage,) = usages
        got = {k: usage[k] for k in result["token_usage"]}
        got["usage"] = orjson.loads(got["usage"])
        assert got == result["token_usage"]
    tools = bridge.children("tool_usages", iid)
    assert len(tools) == len(result["tool_usages"])
    for row, tool in zip(tools, result["tool_usages"], strict=True):
        got = {k: row[k] for k in tool}
        got["injected"] = bool(got["injected"])
        if privacy:
            got["args"] = orjson.loads(got["args"]) if got["args"] is not None else None
        else:
            assert got["args"] is None
            got["args"] = tool["args"]
        assert got == tool
    thoughts = bridge.children("model_thoughts", iid)
    assert [(t["response_id"], t["source"], t["content"]) for t in thoughts] == [
        (t["response_id"], t["source"], t["content"] if privacy else None)
        for t in result["thoughts"]
    ]


def error_json(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    assert flow.response.headers["content-type"] == "application/json"
    return orjson.loads(flow.response.content or b"")


# ----------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("overrides", "key", "problem"),
    [
        ({"colour": "blue"}, "colour", "unknown key"),
        (
            {"providers": [{"name": "openai", "base_url": "ftp://x", "api_key": "k"}]},
            "providers[0].base_url",
            "must be an http(s) URL",
        ),
        ({"users": [{"id": "eve", "token": "short"}]}, "users[0].token", "too short"),
        (
            {
                "providers": [
                    {
                        "name": "openai",
                        "base_url": "https://a.example/v1",
                        "api_key": "${AIBRIDGE_TEST_SURELY_UNSET_VARIABLE}",
                    }
                ]
            },
            "providers[0].api_key",
            "AIBRIDGE_TEST_SURELY_UNSET_VARIABLE is not set",
        ),
        ({"privacy": {"store_prompts": "maybe"}}, "privacy.store_prompts", "true or false"),
    ],
)
def test_bad_config_names_file_and_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, Any],
    key: str,
    problem: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, **overrides)
    message = start_error(tmp_path, path)
    assert f"{path}: {key}: " in message
    assert problem in message


def start_error(tmp_path: Path, path: Path) -> str:
    """Load the addon as mitmdump does at start-up with --set aibridge_config=<path>.

    The option is set before the addon exists (deferred), then the addon gets one configure
    with every option. (Through options.update, a failure rolls the option back to its
    default and configures again; for an addon never configured, that second error would
    hide the first.)
    """
    options = Options()
    options.update_defer(aibridge_config=str(path))
    addon = AIBridge(default_config_dir=tmp_path)
    with taddons.context(addon, options=options) as tctx:
        assert tctx.options.aibridge_config == str(path)
        with pytest.raises(exceptions.OptionsError) as info:
            tctx.master.addons.invoke_addon_sync(
                addon, hooks.ConfigureHook(set(tctx.options.keys()))
            )
        assert addon.config is None
        assert addon.recorder is None
    assert not list(tmp_path.glob("*.db"))
    return str(info.value)


def test_missing_config_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "nowhere" / "aibridge.yaml"
    assert f"{path}: file not found" in start_error(tmp_path, path)


def test_bad_config_after_a_good_one_keeps_the_good_one(
    make_bridge: Callable[..., Bridge], tmp_path: Path
) -> None:
    bridge = make_bridge()
    config, recorder = bridge.addon.config, bridge.addon.recorder
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: []\n", encoding="utf-8")
    with pytest.raises(exceptions.OptionsError) as info:
        bridge.tctx.configure(bridge.addon, aibridge_config=str(bad))
    assert f"{bad}: providers: must be a non-empty list" in str(info.value)
    # mitmproxy rolls the option back and configures again with the good file.
    assert bridge.tctx.options.aibridge_config != str(bad)
    assert bridge.addon.config == config
    assert bridge.addon.recorder is recorder
    flow = make_flow(b"")
    bridge.addon.request(flow)
    assert bridge.interception(flow)["status"] == "rejected"


def test_aibridge_db_overrides_the_database(
    make_bridge: Callable[..., Bridge], tmp_path: Path
) -> None:
    bridge = make_bridge()
    other = tmp_path / "elsewhere.db"
    old = bridge.addon.recorder
    bridge.tctx.configure(bridge.addon, aibridge_db=str(other))
    assert bridge.addon.recorder is not old
    assert bridge.addon.recorder is not None and bridge.addon.recorder.path == str(other)
    flow = make_flow(b"")
    bridge.addon.request(flow)
    bridge.db_path = other
    assert bridge.interception(flow)["status"] == "rejected"


# ---------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("body", "token", "url", "status", "message", "initiator"),
    [
        (b"", TOKENS["alice"], RESPONSES_URL, 400, "empty request body", "alice"),
        (b"{not json", TOKENS["bob"], RESPONSES_URL, 400, "request body is not valid JSON", "bob"),
        (
            b'{"model": 5, "input": "x"}',
            TOKENS["alice"],
            RESPONSES_URL,
            400,
            "'model' must be a string",
            "alice",
        ),
        (
            b'{"model": "gpt-5", "input": "run this later", "background": true}',
            TOKENS["alice"],
            RESPONSES_URL,
            501,
            BACKGROUND_NOT_SUPPORTED,
            "alice",
        ),
        (
            b'{"model": "gpt-5", "input": "hi"}',
            None,
            RESPONSES_URL,
            401,
            "missing bridge token",
            None,
        ),
        (
            b'{"model": "gpt-5", "input": "hi"}',
            UNKNOWN_TOKEN,
            RESPONSES_URL,
            401,
            f"unknown bridge token {hint(UNKNOWN_TOKEN)}",
            None,
        ),
        (
            b'{"model": "gpt-5", "input": "hi"}',
            UNKNOWN_TOKEN,
            "http://127.0.0.1:8080/openai/v1/responses",
            401,
            "unknown bridge token",
            None,
        ),
        (
            b"{}",
            TOKENS["alice"],
            "https://api.openai.com/v1/completions",
            403,
            "/v1/completions is not available through AI Bridge",
            None,
        ),
        (
            b"",
            TOKENS["alice"],
            "http://127.0.0.1:8080/openai/v1/files",
            403,
            "/v1/files is not available through AI Bridge",
            None,
        ),
    ],
    ids=[
        "empty",
        "not-json",
        "bad-field",
        "background",
        "no-token",
        "unknown-token",
        "unknown-token-prefix",
        "forbidden-path",
        "forbidden-path-prefix",
    ],
)
def test_rejection(
    bridge: Bridge,
    body: bytes,
    token: str | None,
    url: str,
    status: int,
    message: str,
    initiator: str | None,
) -> None:
    extra = {"x_api_key": token} if token else {}
    flow = make_flow(body, token=token, url=url, **extra)
    request_before = (flow.request.host, flow.request.port, flow.request.path)
    bridge.addon.request(flow)

    assert flow.response is not None  # short-circuit: upstream is never contacted
    assert flow.response.status_code == status
    got = error_json(flow)
    assert set(got) == {"code", "message", "error"}
    assert got["code"] == str(status)
    assert message in got["message"]
    assert got["error"] == {
        "message": got["message"],
        "type": {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            501: "not_implemented",
        }[status],
        "code": str(status),
    }
    assert (flow.request.host, flow.request.port, flow.request.path) == request_before
    # Neither the client's token nor the provider key is left in the flow.
    state = repr(flow.get_state())
    for secret in SECRETS:
        assert secret not in state
    if token is not None:
        assert flow.request.headers["authorization"] == f"Bearer {hint(token)}"
        assert flow.request.headers["x-api-key"] == hint(token)

    # mitmproxy runs the response hooks for addon-made responses too: they change nothing.
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)
    assert not flow.response.stream

    rows = bridge.interceptions(flow)
    if status == 403:
        assert rows == []  # not a bridged flow: no interception
        return
    (row,) = rows
    assert row["status"] == "rejected"
    assert row["http_status"] == status
    assert row["error"] == got["message"]
    assert row["initiator_id"] == initiator
    assert row["ended_at"] is not None
    assert (row["provider"], row["provider_name"], row["api"]) == ("openai", "openai", "responses")
    assert (row["client"], row["user_agent"]) == ("Codex", UA)
    if initiator is not None:
        assert (row["credential_kind"], row["credential_hint"]) == (
            "centralized",
            hint(PROVIDER_KEY),
        )
    else:
        assert row["credential_kind"] is None
        assert row["credential_hint"] == (hint(token) if token else None)
    prompts = bridge.children("user_prompts", row["id"])
    if status == 501:
        assert row["model"] == "gpt-5"
        assert [p["prompt"] for p in prompts] == ["run this later"]
    else:
        assert prompts == []


def test_websocket_upgrade_is_refused_fast(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(websocket="refuse")
    flow = make_flow(b"", method="GET", connection="Upgrade", upgrade="websocket")
    bridge.addon.request(flow)
    assert flow.response is not None
    assert flow.response.status_code == 426
    assert "POST /v1/responses" in error_json(flow)["message"]
    assert TOKENS["alice"] not in repr(flow.get_state())


def test_unrelated_flow_is_untouched(bridge: Bridge) -> None:
    # A key that is no bridge token (a bridge token would be refused: test_token_leak.py).
    flow = make_flow(b'{"model": "x"}', url="https://example.com/v1/responses", token="sk-other")
    state = flow.get_state()
    bridge.addon.request(flow)
    flow.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)
    state["response"] = flow.response.get_state()
    assert flow.get_state() == state
    assert bridge.interceptions(flow) == []


# ----------------------------------------------------------------------- bridged request


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_credentials_swapped_and_body_bytes_kept(bridge: Bridge, header: str) -> None:
    name = "reasoning_commentary_streamed"
    extra = {"proxy_authorization": "Basic dXNlcjpwYXNz"}
    if header == "x-api-key":
        flow = make_flow(
            fixture(name, "request.json"), token=None, x_api_key=TOKENS["bob"], **extra
        )
    else:
        flow = make_flow(fixture(name, "request.json"), x_api_key=TOKENS["alice"], **extra)
    body = flow.request.raw_content
    assert body == fixture(name, "request.json")
    bridge.addon.request(flow)

    # Until the request goes on the wire, the flow (what mitmweb shows) holds only hints.
    assert PROVIDER_KEY not in str(flow.request.headers.fields)
    assert flow.request.headers["authorization"] == f"Bearer {hint(PROVIDER_KEY)}"
    mitm_compat.run_before_send(flow)  # what mitmproxy does right before it sends the head
    assert flow.response is None
    assert flow.request.raw_content is body  # parsed once, never re-encoded
    headers = flow.request.headers
    assert headers.get_all("authorization") == [f"Bearer {PROVIDER_KEY}"]
    assert "x-api-key" not in headers
    assert "proxy-authorization" not in headers
    assert headers["openai-organization"] == "org-test"
    assert (flow.request.scheme, flow.request.host, flow.request.port, flow.request.path) == (
        "https",
        "api.openai.com",
        443,
        "/v1/responses",
    )
    user = "bob" if header == "x-api-key" else "alice"
    noted = flow.metadata[METADATA_KEY]
    assert noted["initiator_id"] == user
    assert noted["credential_hint"] == hint(PROVIDER_KEY)
    assert PROVIDER_KEY not in repr(flow.metadata)

    row = bridge.interception(flow)
    assert row["id"] == noted["interception_id"]
    assert (row["status"], row["ended_at"], row["http_status"]) == ("in_progress", None, None)
    assert (row["initiator_id"], row["model"], row["streaming"]) == (user, "gpt-5", 1)
    assert (row["client"], row["client_session_id"]) == ("Codex", "sess-hdr-1")
    assert orjson.loads(row["metadata"]) == {"request_bytes": len(body)}

    # Once the request has gone upstream, the flow keeps only the key's hint.
    flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    bridge.addon.responseheaders(flow)
    assert headers.get_all("authorization") == [f"Bearer {hint(PROVIDER_KEY)}"]


@pytest.mark.parametrize(
    ("url", "target", "host_header", "provider", "key"),
    [
        (
            "http://127.0.0.1:8080/openai/v1/responses?trace=1",
            ("https", "api.openai.com", 443, "/v1/responses?trace=1"),
            "api.openai.com",
            "openai",
            PROVIDER_KEY,
        ),
        (
            "http://bridge.internal:8080/local/v1/responses",
            ("http", "127.0.0.1", 9911, "/custom/v1/responses"),
            "127.0.0.1:9911",
            "local",
            LOCAL_KEY,
        ),
    ],
)
def test_route_prefix_retargets(
    bridge: Bridge,
    url: str,
    target: tuple[str, str, int, str],
    host_header: str,
    provider: str,
    key: str,
) -> None:
    flow = make_flow(fixture("text_streamed", "request.json"), url=url)
    body = flow.request.raw_content
    bridge.addon.request(flow)
    mitm_compat.run_before_send(flow)
    assert flow.response is None
    req = flow.request
    assert (req.scheme, req.host, req.port, req.path) == target
    assert req.headers["host"] == host_header
    assert req.headers["authorization"] == f"Bearer {key}"
    assert req.raw_content is body
    assert bridge.interception(flow)["provider_name"] == provider


def test_passthrough_path_gets_the_key_and_no_record(bridge: Bridge) -> None:
    flow = make_flow(b"", method="GET", url="https://api.openai.com/v1/models")
    bridge.addon.request(flow)
    mitm_compat.run_before_send(flow)
    assert flow.response is None
    assert flow.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    flow.response = http.Response.make(200, b'{"data": []}', {"content-type": "application/json"})
    bridge.addon.responseheaders(flow)
    assert not flow.response.stream  # only Responses API streams are teed
    bridge.addon.response(flow)
    assert flow.request.headers["authorization"] == f"Bearer {hint(PROVIDER_KEY)}"
    assert bridge.interceptions(flow) == []


# -------------------------------------------------------------------------- responses


@pytest.mark.parametrize("name", STREAMED)
def test_streamed_exchange(bridge: Bridge, name: str) -> None:
    want = expected(name)
    result = want["result"]
    flow = bridged(bridge, name)
    iid = flow.metadata[METADATA_KEY]["interception_id"]
    raw = fixture(name, "response.sse")
    tee = stream_through(bridge, flow, raw)
    assert tee.bytes_forwarded == len(raw)
    assert flow.request.headers["authorization"] == f"Bearer {hint(PROVIDER_KEY)}"
    bridge.addon.response(flow)

    row = bridge.interception(flow)
    status = result["status"] or "error"
    error = result["error"] if result["status"] else "the stream ended before a terminal event"
    assert (row["status"], row["error"], row["http_status"]) == (status, error, 200)
    assert (row["response_id"], row["response_model"]) == (
        result["response_id"],
        result["response_model"],
    )
    assert row["malformed_events"] == result["malformed_events"]
    assert row["ended_at"] is not None and row["ended_at"] >= row["started_at"]
    assert row["streaming"] == 1
    assert row["correlating_tool_call_id"] == want["request"]["correlating_tool_call_id"]
    assert row["previous_response_id"] == want["request"]["previous_response_id"]
    assert_rows_match(bridge, iid, name)
    assert flow.comment.startswith("alice · ")
    assert bool(flow.marked) == (status != "completed")


def test_streamed_exchange_comment(bridge: Bridge) -> None:
    flow = bridged(bridge, "reasoning_commentary_streamed")
    stream_through(bridge, flow, fixture("reasoning_commentary_streamed", "response.sse"))
    bridge.addon.response(flow)
    assert flow.comment == (
        "alice · gpt-5-2025-08-07 · in 1210 / out 412 tokens · tools: read_file"
    )
    assert not flow.marked


@pytest.mark.parametrize("name", BUFFERED)
def test_buffered_exchange(bridge: Bridge, name: str) -> None:
    want = expected(name)
    result = want["result"]
    flow = bridged(bridge, name)
    iid = flow.metadata[METADATA_KEY]["interception_id"]
    flow.response = http.Response.make(
        200, fixture(name, "response.json"), {"content-type": "application/json"}
    )
    bridge.addon.responseheaders(flow)
    assert not flow.response.stream  # buffered bodies stay buffered
    bridge.addon.response(flow)

    row = bridge.interception(flow)
    assert (row["status"], row["error"], row["http_status"]) == ("completed", None, 200)
    assert row["streaming"] == 0
    assert row["response_id"] == result["response_id"]
    assert row["correlating_tool_call_id"] == want["request"]["correlating_tool_call_id"]
    assert_rows_match(bridge, iid, name)
    assert not flow.marked
    assert flow.request.headers["authorization"] == f"Bearer {hint(PROVIDER_KEY)}"


@pytest.mark.parametrize("stream", [True, False])
def test_upstream_429(bridge: Bridge, stream: bool) -> None:
    name = "text_streamed" if stream else "text_buffered"
    flow = bridged(bridge, name)
    body = (
        b'{"error": {"message": "Rate limit reached for gpt-5 on tokens per min.",'
        b' "type": "tokens", "code": "rate_limit_exceeded"}}'
    )
    flow.response = http.Response.make(429, body, {"content-type": "application/json"})
    raw = flow.response.raw_content
    bridge.addon.responseheaders(flow)
    assert not flow.response.stream
    bridge.addon.response(flow)

    assert flow.response.raw_content is raw  # forwarded unchanged
    row = bridge.interception(flow)
    message = "upstream answered HTTP 429: Rate limit reached for gpt-5 on tokens per min."
    assert (row["status"], row["http_status"], row["error"]) == ("upstream_error", 429, message)
    # The prompt is kept even though upstream failed (an audit log has no holes).
    prompts = bridge.children("user_prompts", row["id"])
    assert [p["prompt"] for p in prompts] == [expected(name)["request"]["prompt"]]
    assert bridge.children("token_usages", row["id"]) == []
    assert flow.marked
    assert flow.comment.endswith(f"upstream_error: {message}")
    assert flow.comment.startswith("alice · ")


def test_upstream_api_error_fixture(bridge: Bridge) -> None:
    name = "api_error_buffered"
    flow = bridged(bridge, name)
    flow.response = http.Response.make(
        401, fixture(name, "response.json"), {"content-type": "application/json"}
    )
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)
    row = bridge.interception(flow)
    assert row["status"] == "upstream_error"
    assert row["error"] == f"upstream answered HTTP 401: {expected(name)['result']['error']}"


def test_error_after_response_completed_is_completed(bridge: Bridge) -> None:
    """Codex hangs up right after response.completed; mitmproxy reports it as an error."""
    name = "reasoning_commentary_streamed"
    flow = bridged(bridge, name)
    stream_through(bridge, flow, fixture(name, "response.sse"), end=False)
    flow.error = Error("Client disconnected.")
    bridge.addon.error(flow)

    row = bridge.interception(flow)
    assert (row["status"], row["error"]) == ("completed", None)
    assert row["ended_at"] is not None
    assert_rows_match(bridge, row["id"], name)
    assert not flow.marked
    assert flow.request.headers["authorization"] == f"Bearer {hint(PROVIDER_KEY)}"
    # A later response hook (mitmproxy does not send one, but be safe) writes nothing more.
    bridge.addon.response(flow)
    assert len(bridge.children("token_usages", row["id"])) == 1


def test_client_disconnected_before_the_terminal_event(bridge: Bridge) -> None:
    name = "reasoning_commentary_streamed"
    flow = bridged(bridge, name)
    stream_through(bridge, flow, cut_before_completed(name), end=False)
    flow.error = Error("Client disconnected.")
    bridge.addon.error(flow)

    row = bridge.interception(flow)
    assert (row["status"], row["error"]) == ("client_disconnected", "Client disconnected.")
    assert row["response_id"] == expected(name)["result"]["response_id"]
    # Items completed before the hang-up are still recorded; usage came with the terminal event.
    assert [t["call_id"] for t in bridge.children("tool_usages", row["id"])] == [
        "call_read_utils_1"
    ]
    assert len(bridge.children("model_thoughts", row["id"])) == 3
    assert bridge.children("token_usages", row["id"]) == []
    assert [p["prompt"] for p in bridge.children("user_prompts", row["id"])] == [
        "Find the bug in utils.py"
    ]
    assert flow.marked
    assert flow.comment.endswith("client_disconnected: Client disconnected.")
    assert flow.request.headers["authorization"] == f"Bearer {hint(PROVIDER_KEY)}"


def test_upstream_unreachable(bridge: Bridge) -> None:
    flow = bridged(bridge, "text_streamed")
    flow.error = Error("Server connection to ('api.openai.com', 443) failed: refused")
    bridge.addon.error(flow)
    row = bridge.interception(flow)
    assert (row["status"], row["http_status"]) == ("error", None)
    assert row["error"].startswith("Server connection to")
    assert flow.marked
    assert flow.request.headers["authorization"] == f"Bearer {hint(PROVIDER_KEY)}"


@pytest.mark.parametrize(
    ("body", "token", "status"),
    [
        (b'{"model": "gpt-5", "input": "later", "background": true}', TOKENS["alice"], 501),
        (b'{"model": "gpt-5", "input": "hi"}', UNKNOWN_TOKEN, 401),
        (b"{not json", TOKENS["bob"], 400),
    ],
)
def test_a_saved_rejection_is_rebuilt_offline(
    bridge: Bridge, body: bytes, token: str, status: int
) -> None:
    flow = make_flow(body, token=token)
    bridge.addon.request(flow)
    (live,) = bridge.interceptions(flow)
    prompts = bridge.children("user_prompts", live["id"])
    bridge.replay_saved(flow, live["id"])
    (rebuilt,) = bridge.interceptions(flow)
    times = ("started_at", "ended_at")
    assert {k: v for k, v in rebuilt.items() if k not in times} == {
        k: v for k, v in live.items() if k not in times
    }
    assert rebuilt["http_status"] == status
    assert [p["prompt"] for p in bridge.children("user_prompts", live["id"])] == [
        p["prompt"] for p in prompts
    ]


def test_the_key_is_in_the_flow_only_while_the_request_head_is_sent(bridge: Bridge) -> None:
    flow = bridged(bridge, "text_streamed")  # the request hook ran
    shown = f"Bearer {hint(PROVIDER_KEY)}"
    assert flow.request.headers["authorization"] == shown

    async def send() -> None:
        mitm_compat.run_before_send(flow)  # mitmproxy serialises the head right after this
        assert flow.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        await asyncio.sleep(0)  # the loop's next turn: the head is on the wire by then
        assert flow.request.headers["authorization"] == shown
        assert flow.request.headers["openai-organization"] == hint("org-test")

    asyncio.run(send())
    mitm_compat.run_before_send(flow)  # once only
    assert flow.request.headers["authorization"] == shown


def test_upstream_unreachable_is_answered_in_our_shape(bridge: Bridge) -> None:
    flow = bridged(bridge, "text_buffered")
    # What mitm_compat notes while mitmproxy is about to send its own 502 page.
    mitm_compat.mark_answerable(flow, 502)
    flow.error = Error("Connect call failed ('127.0.0.1', 9)")
    bridge.addon.error(flow)
    assert "answerable" not in str(flow.get_state())  # nothing of it is saved with the flow
    assert flow.response is not None and flow.response.status_code == 502
    answer = error_json(flow)
    assert answer["code"] == "502" and "could not reach provider 'openai'" in answer["message"]
    row = bridge.interception(flow)
    assert (row["status"], row["http_status"]) == ("error", 502)
    assert "Connect call failed" in row["error"]


def test_silence_that_hit_tcp_timeout_is_an_upstream_error(bridge: Bridge) -> None:
    flow = bridged(bridge, "text_streamed")
    flow.request.timestamp_end = flow.request.timestamp_start = 1.0  # long ago
    flow.error = Error("Client disconnected.")
    bridge.addon.error(flow)
    row = bridge.interception(flow)
    assert row["status"] == "error"
    assert "tcp_timeout" in row["error"] and "upstream sent nothing" in row["error"]


def test_a_client_leaving_early_is_still_a_client_disconnect(bridge: Bridge) -> None:
    flow = bridged(bridge, "text_streamed")
    flow.request.timestamp_end = time.time()
    flow.error = Error("Client disconnected.")
    bridge.addon.error(flow)
    assert bridge.interception(flow)["status"] == "client_disconnected"


def test_request_hook_fails_closed(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("aibridge.auth.install_credentials", broken)
    flow = make_flow(fixture("text_streamed", "request.json"))
    bridge.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 500
    assert error_json(flow)["code"] == "500"
    assert TOKENS["alice"] not in str(flow.request.headers.fields)
    assert flow.id not in bridge.addon._exchanges


def test_done_finishes_flows_in_flight_and_closes_the_recorder(
    make_bridge: Callable[..., Bridge],
) -> None:
    bridge = make_bridge()
    name = "reasoning_commentary_streamed"
    finished = bridged(bridge, "text_streamed")
    stream_through(bridge, finished, fixture("text_streamed", "response.sse"))
    bridge.addon.response(finished)
    mid_stream = bridged(bridge, name)
    stream_through(bridge, mid_stream, cut_before_completed(name), end=False)
    waiting = bridged(bridge, "text_buffered")  # request sent, no response yet
    recorder = bridge.addon.recorder
    assert recorder is not None

    bridge.addon.done()

    assert bridge.addon.recorder is None
    recorder.insert("user_prompts", {"interception_id": "x", "prompt": "late"})
    assert recorder.stats["ignored_after_close"] == 1  # closed: later rows are refused
    shutdown = "the bridge shut down during the exchange"
    for flow in (mid_stream, waiting):
        row = bridge.interception(flow)
        assert (row["status"], row["error"]) == ("shutdown", shutdown)
        assert row["ended_at"] is not None
        assert row["http_status"] is None
    assert bridge.interception(finished)["status"] == "completed"
    assert [
        t["call_id"] for t in bridge.children("tool_usages", bridge.interception(mid_stream)["id"])
    ] == ["call_read_utils_1"]
    # Hooks that arrive after done() do not fail.
    mid_stream.error = Error("Client disconnected.")
    bridge.addon.error(mid_stream)
    bridge.addon.done()


def test_done_masks_the_key_in_flows_in_flight(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge()
    flow = bridged(bridge, "text_streamed")
    bridge.addon.done()
    assert PROVIDER_KEY not in repr(flow.get_state())


def test_privacy_switches_off(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(
        privacy={"store_prompts": False, "store_tool_args": False, "store_thoughts": False}
    )
    name = "reasoning_commentary_streamed"
    flow = bridged(bridge, name)
    stream_through(bridge, flow, fixture(name, "response.sse"))
    bridge.addon.response(flow)
    row = bridge.interception(flow)
    assert row["status"] == "completed"
    assert_rows_match(bridge, row["id"], name, privacy=False)
    assert [p["prompt"] for p in bridge.children("user_prompts", row["id"])] == [None]
    assert [t["args"] for t in bridge.children("tool_usages", row["id"])] == [None]
    assert [t["content"] for t in bridge.children("model_thoughts", row["id"])] == [None] * 3

    rejected = make_flow(b'{"model": "gpt-5", "input": "secret plan", "background": true}')
    bridge.addon.request(rejected)
    rejected_row = bridge.interception(rejected)
    assert [p["prompt"] for p in bridge.children("user_prompts", rejected_row["id"])] == [None]
    bridge.addon.done()
    data = b"".join(p.read_bytes() for p in bridge.db_path.parent.glob("audit.db*"))
    assert b"Find the bug in utils.py" not in data
    assert b"secret plan" not in data


def test_no_secret_reaches_the_database_or_the_flows(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge()
    flows: list[http.HTTPFlow] = []  # every flow once it has ended

    name = "reasoning_commentary_streamed"
    flow = bridged(bridge, name, x_api_key=TOKENS["alice"])
    stream_through(bridge, flow, fixture(name, "response.sse"))
    bridge.addon.response(flow)
    flows.append(flow)

    flow = bridged(bridge, "text_buffered", url="http://127.0.0.1:8080/local/v1/responses")
    flow.response = http.Response.make(
        200, fixture("text_buffered", "response.json"), {"content-type": "application/json"}
    )
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)
    flows.append(flow)

    flow = bridged(bridge, "text_streamed", token=TOKENS["bob"])
    flow.response = http.Response.make(
        429, b'{"error": {"message": "slow"}}', {"content-type": "application/json"}
    )
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)
    flows.append(flow)

    flow = bridged(bridge, name)
    stream_through(bridge, flow, cut_before_completed(name), end=False)
    flow.error = Error("Client disconnected.")
    bridge.addon.error(flow)
    flows.append(flow)

    flow = bridged(bridge, "text_streamed")
    flow.error = Error("Server connection failed")
    bridge.addon.error(flow)
    flows.append(flow)

    flow = make_flow(b"", method="GET", url="https://api.openai.com/v1/models")
    bridge.addon.request(flow)
    flow.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)
    flows.append(flow)

    for body, token in (
        (b"", TOKENS["alice"]),
        (b'{"model": "gpt-5", "input": "x", "background": true}', TOKENS["bob"]),
        (b'{"model": "gpt-5", "input": "x"}', UNKNOWN_TOKEN),
    ):
        flow = make_flow(body, token=token, x_api_key=token)
        bridge.addon.request(flow)
        flows.append(flow)

    bridge.addon.done()  # drains the queue and closes the database

    files = sorted(bridge.db_path.parent.glob("audit.db*"))
    assert bridge.db_path in files
    data = b"".join(p.read_bytes() for p in files)
    assert len(query(bridge.db_path, "select id from interceptions")) == 8
    for flow in flows:
        state = repr(flow.get_state())
        for secret in SECRETS:
            assert secret.encode() not in data, secret
            assert secret not in state, (flow.request.path, secret)
    # The hints are there, so keys can still be told apart.
    assert hint(PROVIDER_KEY).encode() in data
    assert hint(LOCAL_KEY).encode() in data
