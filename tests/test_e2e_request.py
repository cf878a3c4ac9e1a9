"""Request side through a real mitmdump: rejections, identity, key swap, exact bytes."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from aibridge.apis.openai_responses import BACKGROUND_NOT_SUPPORTED
from devtools.fake_upstream import FakeUpstream
from tests.harness import PROVIDER_KEY, TOKENS, Mitmdump, bridge_config, wait_for


def sdk(
    bridge: Mitmdump, token: str = TOKENS["alice"], prefix: str = "/openai/v1"
) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + prefix, api_key=token, max_retries=0, timeout=30)


def rejected_rows(bridge: Mitmdump, marker: str) -> list[dict]:
    sql_rows = bridge.rows("interceptions")
    prompts = {p["interception_id"]: p["prompt"] for p in bridge.rows("user_prompts")}
    return [r for r in sql_rows if marker in (prompts.get(r["id"]) or "")]


def post(
    bridge: Mitmdump,
    body: bytes,
    token: str | None = TOKENS["alice"],
    path: str = "/openai/v1/responses",
    **headers: str,
) -> httpx.Response:
    h = {"content-type": "application/json", **headers}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return httpx.post(bridge.url + path, content=body, headers=h, timeout=30)


def test_rejections_never_reach_upstream(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    marker = uuid.uuid4().hex

    with pytest.raises(openai.APIStatusError) as info:
        sdk(bridge).responses.create(model="fake-text", input=f"bg {marker}", background=True)
    assert info.value.status_code == 501
    assert BACKGROUND_NOT_SUPPORTED in str(info.value)
    assert info.value.body["message"] == BACKGROUND_NOT_SUPPORTED

    for body in (b"", b"{not json", b"[1, 2]", b'{"model": 5, "input": "x"}'):
        r = post(bridge, body)
        assert r.status_code == 400, body
        assert r.json()["code"] == "400" and r.json()["error"]["message"] == r.json()["message"]

    with pytest.raises(openai.AuthenticationError) as auth_info:
        sdk(bridge, token="not-a-known-token").responses.create(model="fake-text", input="x")
    assert "unknown bridge token" in str(auth_info.value)
    r = post(bridge, b'{"model": "fake-text", "input": "x"}', token=None)
    assert r.status_code == 401 and "missing bridge token" in r.json()["message"]

    r = post(bridge, b"{}", path="/openai/v1/completions")
    assert r.status_code == 403 and r.json()["code"] == "403"
    r = httpx.get(
        bridge.url + "/openai/v1/files", headers={"authorization": f"Bearer {TOKENS['alice']}"}
    )
    assert r.status_code == 403

    assert len(upstream.requests) == before, "a rejected request reached the upstream"

    rows = wait_for(lambda: rejected_rows(bridge, marker))
    assert [(r["status"], r["http_status"], r["initiator_id"]) for r in rows] == [
        ("rejected", 501, "alice")
    ]

    def statuses() -> list[int]:
        return [r["http_status"] for r in bridge.rows("interceptions") if r["status"] == "rejected"]

    # The recorder writes in batches: wait until the last rejection landed too.
    assert wait_for(lambda: statuses().count(401) == 2)
    assert statuses().count(400) == 4
    unknown = [r for r in bridge.rows("interceptions") if r["http_status"] == 401]
    assert {r["credential_hint"] for r in unknown} == {"no...en", None}
    assert all(r["initiator_id"] is None for r in unknown)


def test_key_swap_and_byte_identical_body(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    # Odd spacing, key order, escapes and non-ASCII: a re-encoding would change these bytes.
    body = (
        b'{ "input" :"caf\\u00e9 \xe2\x98\x95 \\/ %s",\n  "model":"fake-text",'
        b'"stream":false , "metadata": {"z": 1, "a": 2.50}}' % uuid.uuid4().hex.encode()
    )
    r = post(bridge, body, **{"x-api-key": TOKENS["alice"], "proxy-authorization": "Basic eA=="})
    assert r.status_code == 200, r.text
    received = upstream.requests[-1]
    assert received.body == body
    assert received.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "x-api-key" not in received.headers
    assert "proxy-authorization" not in received.headers
    for token in TOKENS.values():
        assert all(token not in v for v in received.headers.values())
    row = wait_for(
        lambda: [
            x
            for x in bridge.rows("interceptions")
            if x["status"] == "completed"
            and x["metadata"]
            and orjson.loads(x["metadata"])["request_bytes"] == len(body)
        ]
    )
    assert row[0]["credential_hint"] == "sk-t...cdef"
    assert row[0]["credential_kind"] == "centralized"


def test_passthrough_injects_key(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    models = sdk(bridge, token=TOKENS["bob"]).models.list()
    assert any(m.id == "fake-text" for m in models.data)
    received = upstream.requests[-1]
    assert received.path == "/v1/models"
    assert received.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    r = httpx.get(bridge.url + "/openai/v1/models", headers={"authorization": "Bearer nope-nope"})
    assert r.status_code == 401


def test_reverse_mode(upstream: FakeUpstream, tmp_path: Path) -> None:
    with Mitmdump(tmp_path, bridge_config(upstream.url), mode=f"reverse:{upstream.url}") as m:
        client = sdk(m, prefix="/v1")
        answer = client.responses.create(model="fake-text", input="reverse mode")
        assert answer.output_text
        assert upstream.requests[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        with pytest.raises(openai.AuthenticationError):
            sdk(m, token="wrong-token-123", prefix="/v1").responses.create(
                model="fake-text", input="x"
            )
        rows = wait_for(
            lambda: [
                r for r in m.rows("interceptions") if r["ended_at"] and r["status"] == "completed"
            ]
        )
        assert rows[0]["initiator_id"] == "alice"


def test_regular_proxy_by_host(upstream: FakeUpstream, bridge: Mitmdump) -> None:
    """A client using the bridge as its HTTP proxy, talking to the provider's own URL."""
    client = openai.OpenAI(
        base_url=f"{upstream.url}/v1",
        api_key=TOKENS["bob"],
        max_retries=0,
        http_client=httpx.Client(proxy=bridge.url, trust_env=False),
    )
    marker = uuid.uuid4().hex
    assert client.responses.create(model="fake-text", input=marker).output_text
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    rows = wait_for(lambda: [r for r in bridge.rows("user_prompts") if r["prompt"] == marker])
    interception = [
        r for r in bridge.rows("interceptions") if r["id"] == rows[0]["interception_id"]
    ]
    assert interception[0]["initiator_id"] == "bob"


def test_bad_config_stops_startup(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = bridge_config(upstream.url)
    config["providers"][0]["base_url"] = "not a url"
    proc = Mitmdump(tmp_path, config)
    with contextlib.suppress(RuntimeError):  # it may exit before it even listens
        proc.start()
    assert proc.proc is not None
    assert proc.proc.wait(20) != 0
    log = proc.log()
    assert "providers[0].base_url: must be an http(s) URL" in log
    assert "config.yaml" in log


def test_chatgpt_sign_in_endpoint_recorded_in_regular_proxy_mode(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Codex signed in with ChatGPT talks to chatgpt.com/backend-api/codex/responses."""
    config = bridge_config(upstream.url)
    config["providers"].append(
        {"name": "chatgpt", "type": "chatgpt", "base_url": f"{upstream.url}/backend-api/codex"}
    )
    with Mitmdump(tmp_path, config) as proc:
        client = httpx.Client(proxy=proc.url, trust_env=False, timeout=30)
        r = client.post(
            f"{upstream.url}/backend-api/codex/responses",
            content=b'{"model": "fake-text", "input": "via chatgpt sign-in", "stream": true}',
            headers={
                "authorization": "Bearer chatgpt-oauth-token-0123456789",
                "chatgpt-account-id": "acc-42",
                "originator": "codex_cli_rs",
                "content-type": "application/json",
            },
        )
        assert r.status_code == 200 and b"response.completed" in r.content
        received = upstream.requests[-1]
        assert received.path == "/backend-api/codex/responses"
        assert received.headers["authorization"] == "Bearer chatgpt-oauth-token-0123456789"
        rows = wait_for(lambda: [x for x in proc.rows("interceptions") if x["ended_at"]])
        assert (rows[0]["initiator_id"], rows[0]["credential_kind"], rows[0]["status"]) == (
            "chatgpt-account:acc-42",
            "client",
            "completed",
        )
        assert rows[0]["credential_hint"] == "chat...6789"
        assert rows[0]["provider_name"] == "chatgpt"
