"""The Responses API over WebSocket, bridged or refused, through a real mitmdump."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from aibridge.apis.openai_responses import BACKGROUND_NOT_SUPPORTED
from devtools.fake_upstream import FakeUpstream
from tests.harness import (
    PROVIDER_KEY,
    TOKENS,
    Mitmdump,
    bridge_config,
    finished_with_prompt,
    noon_zone,
    query,
    wait_for,
)
from tests.ws_client import ResponsesSocket, WebSocketRejected


@pytest.fixture(scope="module")
def ws_bridge(
    upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mitmdump]:
    workdir = tmp_path_factory.mktemp("ws")
    with Mitmdump(workdir, bridge_config(upstream.url, websocket="bridge")) as proc:
        yield proc


def connect(bridge: Mitmdump, token: str = TOKENS["alice"]) -> ResponsesSocket:
    return ResponsesSocket(
        f"{bridge.url}/openai/v1/responses",
        {
            "authorization": f"Bearer {token}",
            "session-id": f"ws-{uuid.uuid4().hex}",
            "originator": "codex_cli_rs",
            "user-agent": "codex_cli_rs/0.171.0",
        },
    )


def records(bridge: Mitmdump, interception_id: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for table in ("token_usages", "tool_usages", "model_thoughts"):
        rows = query(
            bridge.db_path, f"select * from {table} where interception_id = ?", (interception_id,)
        )
        out[table] = [
            {
                k: v
                for k, v in r.items()
                if k not in ("id", "interception_id", "created_at", "response_id", "call_id")
            }
            for r in rows
        ]
    return out


def test_bridged_socket_records_like_http(ws_bridge: Mitmdump, upstream: FakeUpstream) -> None:
    ws = connect(ws_bridge)
    prompt = f"ws turn {uuid.uuid4().hex}"
    ws.send({"type": "response.create", "model": "fake-tool", "input": prompt})
    events = ws.until_terminal()
    assert events[-1]["type"] == "response.completed"
    upgrade = [r for r in upstream.requests if r.headers.get("upgrade") == "websocket"][-1]
    assert upgrade.headers["authorization"] == f"Bearer {PROVIDER_KEY}"

    call = next(i for i in events[-1]["response"]["output"] if i["type"] == "function_call")
    ws.send(
        {
            "type": "response.create",
            "model": "fake-tool",
            "previous_response_id": events[-1]["response"]["id"],
            "input": [
                {
                    "type": "function_call_output",
                    "call_id": call["call_id"],
                    "output": "hello-from-tool",
                }
            ],
        }
    )
    follow = ws.until_terminal()
    assert "hello-from-tool" in follow[-1]["response"]["output"][0]["content"][0]["text"]

    prompt_r = f"ws reasoning {uuid.uuid4().hex}"
    ws.send({"type": "response.create", "model": "fake-reasoning", "input": prompt_r})
    assert ws.until_terminal()[-1]["type"] == "response.completed"
    ws.close()

    row = finished_with_prompt(ws_bridge.db_path, prompt)
    assert (row["status"], row["streaming"], row["initiator_id"], row["client"]) == (
        "completed",
        1,
        "alice",
        "Codex",
    )
    assert row["client_session_id"].startswith("ws-")
    assert row["response_id"] == events[-1]["response"]["id"]
    follow_row = wait_for(
        lambda: query(
            ws_bridge.db_path,
            "select * from interceptions where response_id = ?",
            (follow[-1]["response"]["id"],),
        )
    )
    assert follow_row[0]["correlating_tool_call_id"] == call["call_id"]
    assert follow_row[0]["previous_response_id"] == events[-1]["response"]["id"]

    # The same exchanges over HTTP give the same records.
    client = openai.OpenAI(
        base_url=f"{ws_bridge.url}/openai/v1", api_key=TOKENS["alice"], max_retries=0
    )
    for model, ws_prompt in (("fake-tool", prompt), ("fake-reasoning", prompt_r)):
        http_prompt = f"http {uuid.uuid4().hex}"
        list(client.responses.create(model=model, input=http_prompt, stream=True))
        ws_rows = records(ws_bridge, finished_with_prompt(ws_bridge.db_path, ws_prompt)["id"])
        http_rows = records(ws_bridge, finished_with_prompt(ws_bridge.db_path, http_prompt)["id"])
        assert ws_rows == http_rows
        assert ws_rows["token_usages"]


def test_background_and_invalid_refused_on_socket(
    ws_bridge: Mitmdump, upstream: FakeUpstream
) -> None:
    ws = connect(ws_bridge)
    before = len(upstream.requests)
    prompt = f"ws background {uuid.uuid4().hex}"
    ws.send({"type": "response.create", "model": "fake-text", "input": prompt, "background": True})
    (event,) = ws.until_terminal()
    assert event["type"] == "error" and event["status"] == 501
    assert event["error"]["message"] == BACKGROUND_NOT_SUPPORTED
    ws.send({"type": "response.create", "model": 42, "input": "x"})
    (bad,) = ws.until_terminal()
    assert bad["status"] == 400
    # The socket still works afterwards.
    ws.send({"type": "response.create", "model": "fake-text", "input": f"after {prompt}"})
    assert ws.until_terminal()[-1]["type"] == "response.completed"
    ws.close()
    assert len(upstream.requests) == before  # same socket: no new HTTP requests upstream
    row = finished_with_prompt(ws_bridge.db_path, prompt)
    assert (row["status"], row["http_status"], row["error"]) == (
        "rejected",
        501,
        BACKGROUND_NOT_SUPPORTED,
    )


def test_upstream_error_event_and_socket_closed_mid_response(ws_bridge: Mitmdump) -> None:
    ws = connect(ws_bridge)
    prompt = f"ws 429 {uuid.uuid4().hex}"
    ws.send({"type": "response.create", "model": "fake-429", "input": prompt})
    (event,) = ws.until_terminal()
    assert event["status"] == 429
    slow = f"ws slow {uuid.uuid4().hex}"
    ws.send({"type": "response.create", "model": "fake-slow", "input": slow})
    assert ws.receive()["type"] == "response.created"
    ws.close()
    assert finished_with_prompt(ws_bridge.db_path, prompt)["status"] == "error"
    cut = finished_with_prompt(ws_bridge.db_path, slow)
    assert cut["status"] == "client_disconnected"


def test_unknown_token_refused_before_upgrade(ws_bridge: Mitmdump) -> None:
    with pytest.raises(WebSocketRejected) as info:
        connect(ws_bridge, token="not-a-token-at-all")
    assert info.value.status == 401


def test_refuse_mode_answers_426(upstream: FakeUpstream, tmp_path: Path) -> None:
    with Mitmdump(tmp_path, bridge_config(upstream.url, websocket="refuse")) as proc:
        with pytest.raises(WebSocketRejected) as info:
            connect(proc)
        assert info.value.status == 426
        assert b"POST /v1/responses" in info.value.body


def test_an_open_circuit_refuses_a_socket_turn_for_that_model(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Two HTTP 503s open the circuit of fake-503; a socket turn for it is refused by the
    bridge (503 error event, recorded), while a turn for another model goes through."""
    config = bridge_config(upstream.url, circuit_breaker={"failures": 2, "cool_down_seconds": 600})
    with Mitmdump(tmp_path, config) as bridge:
        client = openai.OpenAI(
            base_url=f"{bridge.url}/openai/v1", api_key=TOKENS["alice"], max_retries=0
        )
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                client.responses.create(model="fake-503", input="overloaded?")
        ws = connect(bridge)
        refused = f"ws circuit {uuid.uuid4().hex}"
        ws.send({"type": "response.create", "model": "fake-503", "input": refused})
        (event,) = ws.until_terminal()
        assert event["type"] == "error" and event["status"] == 503
        assert "circuit breaker" in event["error"]["message"]
        fine = f"ws fine {uuid.uuid4().hex}"
        ws.send({"type": "response.create", "model": "fake-text", "input": fine})
        assert ws.until_terminal()[-1]["type"] == "response.completed"
        ws.close()
        row = finished_with_prompt(bridge.db_path, refused)
        assert (row["status"], row["http_status"], row["model"]) == ("rejected", 503, "fake-503")
        assert '"refused_by":"circuit_breaker"' in row["metadata"].replace(" ", "")
        assert finished_with_prompt(bridge.db_path, fine)["status"] == "completed"


def test_budgets_and_concurrency_hold_per_turn_on_a_socket(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = bridge_config(upstream.url, governance={"time_zone": noon_zone()})
    config["users"][0]["limits"] = {"tokens": {"day": 1}, "concurrent_requests": 1}
    with Mitmdump(tmp_path, config) as bridge:
        ws = connect(bridge)
        slow = f"ws slow {uuid.uuid4().hex}"
        ws.send({"type": "response.create", "model": "fake-slow", "input": slow})
        assert ws.receive()["type"] == "response.created"
        busy = f"ws busy {uuid.uuid4().hex}"
        ws.send({"type": "response.create", "model": "fake-text", "input": busy})
        event = ws.until_terminal()[-1]  # the slow turn is still streaming meanwhile
        assert (
            event["type"] == "error"
            and event["status"] == 429
            and "in flight at once" in event["error"]["message"]
        )
        ws.close()  # the cut turn gives its slot back
        assert finished_with_prompt(bridge.db_path, slow)["status"] == "client_disconnected"

        ws = connect(bridge)
        first = f"ws first {uuid.uuid4().hex}"
        ws.send({"type": "response.create", "model": "fake-text", "input": first})
        assert ws.until_terminal()[-1]["type"] == "response.completed"
        refused = f"ws refused {uuid.uuid4().hex}"
        ws.send({"type": "response.create", "model": "fake-text", "input": refused})
        (event,) = ws.until_terminal()
        assert event["status"] == 403
        assert "the daily token budget of user alice is used up" in event["error"]["message"]
        ws.close()
        row = finished_with_prompt(bridge.db_path, refused)
        assert (row["status"], row["http_status"]) == ("rejected", 403)
        assert '"limit":"tokens.day"' in row["metadata"].replace(" ", "")
        busy_row = finished_with_prompt(bridge.db_path, busy)
        assert (busy_row["status"], busy_row["http_status"]) == ("rejected", 429)
