"""The "AI Bridge" contentview on the Responses API over WebSocket (aibridge.view.websocket,
aibridge.contentview): each message readable, bad ones safe, and a real socket's flow file."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import contentviews, io, websocket
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tflow

from aibridge import contentview
from aibridge.contentview import NAME, PRIORITY, VIEW, is_ai_socket, register, unregister
from aibridge.mitmweb import SOCKET_KEY
from aibridge.view import websocket as ws_view
from aibridge.view.websocket import DECODE_LIMIT, render_message
from devtools.fake_upstream import FakeUpstream
from tests.harness import TOKENS, Mitmdump, bridge_config, query, wait_for
from tests.ws_client import ResponsesSocket

# What render_message says when its own code failed (as opposed to a message it cannot read).
INTERNAL_FAILURE = "could not render"
# Any message renders to at most this many characters, whatever its size.
SHOWN_LIMIT = 40_000


def client(obj: Any) -> str:
    return render_message(orjson.dumps(obj), from_client=True)


def server(obj: Any) -> str:
    return render_message(orjson.dumps(obj), from_client=False)


# ------------------------------------------------------------------------ client messages


def test_response_create_is_shown_as_its_request() -> None:
    out = client(
        {
            "type": "response.create",
            "model": "gpt-5-codex",
            "instructions": "You are Codex.\nBe brief.",
            "store": False,
            "stream": True,
            "reasoning": {"effort": "high", "summary": "auto"},
            "tools": [
                {"type": "function", "name": "shell"},
                {"type": "custom", "name": "apply_patch"},
                {"type": "web_search"},
            ],
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "ls"}],
                },
                {
                    "type": "function_call",
                    "name": "shell",
                    "arguments": '{"cmd":["ls"]}',
                    "call_id": "c1",
                },
                {"type": "function_call_output", "call_id": "c1", "output": "README.md"},
            ],
        }
    )
    assert out.startswith("Responses API request (WebSocket response.create)\n")
    for line in (
        "model: gpt-5-codex",
        "stream: true · store: false",
        "reasoning: effort=high, summary=auto",
        "instructions: You are Codex.",
        "tools (3): shell, apply_patch, web_search",
        "input (3 items):",
        "user: ls",
        '→ shell({"cmd":["ls"]})',
        "← c1: README.md",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert "type" not in out.split("\n")[1]  # the event's own type is not a request field


def test_response_create_nested_and_other_client_events() -> None:
    nested = client({"type": "response.create", "response": {"model": "m1", "input": "hi"}})
    assert "model: m1" in nested and "user: hi" in nested
    cancel = client({"type": "response.cancel", "response_id": "resp_1"})
    assert cancel.startswith("WebSocket client event response.cancel\n")
    assert '"response_id": "resp_1"' in cancel
    assert client({"type": "session.update"}) == "WebSocket client event session.update"
    assert client({"model": "m"}).startswith("WebSocket client event (no type)")
    assert client({"type": 7, "x": 1}).startswith("WebSocket client event (no type)")


# ------------------------------------------------------------------------ server messages


def test_server_events_each_say_what_they_carry() -> None:
    created = server(
        {
            "type": "response.created",
            "sequence_number": 0,
            "response": {"id": "resp_9", "model": "gpt-5", "status": "in_progress", "output": []},
        }
    )
    assert created == (
        "server event response.created\nid: resp_9\nmodel: gpt-5\nstatus: in_progress"
    )
    delta = server(
        {
            "type": "response.output_text.delta",
            "output_index": 0,
            "content_index": 0,
            "item_id": "msg_1",
            "delta": "Hello",
        }
    )
    assert delta == (
        "server event response.output_text.delta · output 0 · content 0 · item msg_1\ndelta: Hello"
    )
    blank = server({"type": "response.output_text.delta", "delta": "\n"})
    assert blank.endswith('delta: "\\n"')  # a lone newline is visible
    reasoning = server(
        {"type": "response.reasoning_summary_text.delta", "summary_index": 1, "delta": "Thinking"}
    )
    assert "summary 1" in reasoning and "delta: Thinking" in reasoning
    args = server(
        {
            "type": "response.function_call_arguments.done",
            "output_index": 1,
            "arguments": '{"cmd":["ls"]}',
        }
    )
    assert 'arguments: {"cmd":["ls"]}' in args
    item = server(
        {
            "type": "response.output_item.done",
            "output_index": 1,
            "item": {
                "type": "function_call",
                "name": "shell",
                "call_id": "call_7",
                "arguments": '{"cmd":["ls"]}',
                "status": "completed",
            },
        }
    )
    assert item.startswith("server event response.output_item.done · output 1\n→ shell")
    assert "call_id=call_7" in item
    part = server(
        {"type": "response.content_part.added", "part": {"type": "output_text", "text": ""}}
    )
    assert part.endswith("\npart: [output_text] (empty)")
    part = server(
        {"type": "response.content_part.done", "part": {"type": "refusal", "refusal": "No."}}
    )
    assert part.endswith("\npart: [refusal] No.")


def test_a_finished_response_shows_usage_output_and_errors() -> None:
    completed = server(
        {
            "type": "response.completed",
            "response": {
                "id": "resp_9",
                "model": "gpt-5",
                "status": "completed",
                "usage": {
                    "input_tokens": 1200,
                    "input_tokens_details": {"cached_tokens": 800},
                    "output_tokens": 300,
                    "output_tokens_details": {"reasoning_tokens": 120},
                    "total_tokens": 1500,
                },
                "output": [
                    {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Plan"}]},
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "Done."}],
                    },
                ],
            },
        }
    )
    assert completed.startswith("server event response.completed\nid: resp_9")
    assert "usage: input 1200 (cached 800) · output 300 (reasoning 120) · total 1500" in completed
    assert "[reasoning] Plan" in completed and "assistant: Done." in completed
    failed = server(
        {
            "type": "response.failed",
            "response": {
                "id": "r",
                "status": "failed",
                "error": {"code": "server_error", "message": "boom"},
            },
        }
    )
    assert "status: failed" in failed and "error: server_error: boom" in failed
    error = server(
        {
            "type": "error",
            "status": 429,
            "error": {"type": "rate_limit_error", "code": "429", "message": "slow down"},
        }
    )
    assert error == "server event error\nerror: 429: slow down\nstatus: 429"
    flat = server({"type": "error", "code": "invalid_request", "message": "no"})
    assert "error: invalid_request: no" in flat


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            {
                "type": "response.image_generation_call.partial_image",
                "partial_image_b64": "QUJD" * 5000,
            },
            "partial_image_b64",
        ),
        ({"type": "codex.rate_limits", "primary": {"used_percent": 12.5}}, "used_percent"),
        ({"type": "x" * 5000}, "x" * 100),
        ({"type": "response.output_text.annotation.added", "annotation": {"url": "u"}}, '"url"'),
    ],
)
def test_unknown_event_types_show_their_fields_bounded(
    event: dict[str, Any], expected: str
) -> None:
    out = server(event)
    assert expected in out
    assert len(out) < 6000
    assert INTERNAL_FAILURE not in out


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.completed", "response": "resp_1"},
        {"type": "response.completed", "response": {"output": "not a list", "usage": [1, 2]}},
        {"type": "response.completed", "response": {"id": ["x"], "status": {"a": 1}}},
        {"type": "response.created", "response": None},
        {"type": "response.output_item.done", "item": ["not", "an", "item"]},
        {"type": "response.output_item.added", "item": {"type": 5}},
        {"type": "response.output_text.delta", "delta": {"text": "x"}, "output_index": {"a": 1}},
        {"type": "response.output_text.delta", "delta": None, "item_id": 12},
        {"type": "response.content_part.done", "part": "text"},
        {"type": "error", "error": "a string"},
        {"type": "error", "error": {"message": {"nested": True}}},
        {"type": "error"},
        {"type": None, "error": 5},
        {"type": ["response.completed"]},
        {},
    ],
)
def test_wrong_types_are_shown_not_raised(event: dict[str, Any]) -> None:
    for from_client in (False, True):
        out = render_message(orjson.dumps(event), from_client=from_client)
        assert out and INTERNAL_FAILURE not in out, out


# ------------------------------------------------------------------------ unreadable messages

COMPLETED = orjson.dumps(
    {
        "type": "response.completed",
        "response": {"id": "resp_1", "status": "completed", "output": [], "usage": None},
    }
)


@pytest.mark.parametrize("cut", [1, 2, 10, len(COMPLETED) // 2, len(COMPLETED) - 1])
def test_truncated_json_is_shown_raw(cut: int) -> None:
    for from_client in (False, True):
        out = render_message(COMPLETED[:cut], from_client=from_client)
        side = "client" if from_client else "server"
        assert out.startswith(f"WebSocket {side} message: not valid JSON")
        assert COMPLETED[:cut].decode() in out


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"[1, 2]", "JSON list, not an object"),
        (b'"response.completed"', "JSON str, not an object"),
        (b"null", "JSON NoneType, not an object"),
        (b"42", "JSON int, not an object"),
        (b"", "not valid JSON"),
        (b"   ", "not valid JSON"),
        (b'{"type": "error"} trailing', "not valid JSON"),
        (b'{"type": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),  # nested past orjson's depth
        (b'{"type": "error", "message": "\\ud800"}', "not valid JSON"),  # a lone surrogate
    ],
)
def test_not_an_object_is_shown_raw(data: bytes, why: str) -> None:
    out = render_message(data, from_client=False)
    assert out.startswith(f"WebSocket server message: {why}")
    assert len(out) < SHOWN_LIMIT


@pytest.mark.parametrize("size", [0, 1, 255, 256, 257, 100_000])
@pytest.mark.parametrize("from_client", [False, True])
def test_binary_frames_are_described_in_hex(size: int, from_client: bool) -> None:
    data = bytes(random.Random(size).randrange(256) for _ in range(size))
    out = render_message(data, from_client=from_client, is_text=False)
    assert out.split("\n")[0].endswith(f"binary, {size} byte{'' if size == 1 else 's'}")
    assert ("bridge refuses binary client messages" in out) is from_client
    if size:
        assert data[:16].hex(" ") in out
    assert ("more bytes" in out) is (size > 256)
    assert len(out) < 1000
    # JSON sent as a binary frame is still described as binary: the bridge refuses it so.
    assert "binary" in render_message(COMPLETED, from_client=from_client, is_text=False)


def five_mb_delta() -> bytes:
    return orjson.dumps({"type": "response.output_text.delta", "delta": "word " * (1 << 20)})


@pytest.mark.parametrize(
    "data",
    [
        five_mb_delta(),
        orjson.dumps({"type": "response.create", "model": "m", "input": "p" * (5 << 20)}),
        orjson.dumps(
            {
                "type": "response.completed",
                "response": {
                    "output": [
                        {
                            "type": "message",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": "a" * 5000}],
                        }
                    ]
                    * 1100
                },
            }
        ),
        orjson.dumps(
            {
                "type": "response.create",
                "model": "m",
                "input": [{"role": "user", "content": "q" * 5000}] * 1100,
                "tools": [{"type": "function", "name": "t" * 1000}] * 5000,
            }
        ),
        orjson.dumps({"type": "codex.unknown", "blob": ["x" * 1000] * 5300}),
        b'{"type": "response.output_text.delta", "delta": "' + b"z" * (5 << 20),  # cut
        b"\x00\xff" * (5 << 19),
    ],
    ids=["delta", "create", "completed", "history", "unknown", "truncated", "garbage"],
)
def test_a_5_mb_message_renders_bounded(data: bytes) -> None:
    assert len(data) >= 5 << 20
    for from_client in (False, True):
        out = render_message(data, from_client=from_client)
        assert len(out) < 250_000, len(out)  # the transcript's own limit, not the message's
        assert INTERNAL_FAILURE not in out


def test_a_message_past_the_decode_limit_is_only_previewed(monkeypatch: pytest.MonkeyPatch) -> None:
    data = five_mb_delta()
    monkeypatch.setattr(ws_view, "DECODE_LIMIT", len(data) - 1)

    def never(_: bytes) -> Any:
        raise AssertionError("decoded a message past the limit")

    monkeypatch.setattr(ws_view.orjson, "loads", never)
    out = render_message(data, from_client=False)
    assert out.startswith(f"WebSocket server message: {len(data)} bytes, too large to decode")
    assert len(out) < 3000
    assert DECODE_LIMIT == 16 << 20


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512), st.booleans(), st.booleans())
def test_any_bytes_render(data: bytes, from_client: bool, is_text: bool) -> None:
    out = render_message(data, from_client=from_client, is_text=is_text)
    assert isinstance(out, str) and out
    assert INTERNAL_FAILURE not in out


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
EVENT_TYPES = st.sampled_from(
    [
        "response.create",
        "response.created",
        "response.completed",
        "response.failed",
        "response.output_item.done",
        "response.output_text.delta",
        "error",
        "other",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    EVENT_TYPES,
    st.dictionaries(
        st.sampled_from(
            [
                "response",
                "item",
                "part",
                "delta",
                "text",
                "error",
                "output_index",
                "input",
                "model",
                "tools",
                "instructions",
                "usage",
                "status",
            ]
        ),
        JSON_VALUES,
        max_size=6,
    ),
    st.booleans(),
)
def test_any_event_shape_renders(kind: str, fields: dict[str, Any], from_client: bool) -> None:
    out = render_message(orjson.dumps({"type": kind, **fields}), from_client=from_client)
    assert out and INTERNAL_FAILURE not in out, out


# ------------------------------------------------------------------- the mitmproxy contentview


def socket_flow(path: str = "/openai/v1/responses") -> Any:
    flow = tflow.twebsocketflow(messages=False)
    flow.request.path = path
    assert flow.websocket is not None
    flow.websocket.messages = [
        websocket.WebSocketMessage(
            websocket.Opcode.TEXT,
            True,
            orjson.dumps({"type": "response.create", "model": "gpt-5-codex", "input": "hi"}),
        ),
        websocket.WebSocketMessage(
            websocket.Opcode.TEXT,
            False,
            orjson.dumps({"type": "response.output_text.delta", "delta": "Hel"}),
        ),
        websocket.WebSocketMessage(websocket.Opcode.BINARY, True, b"\x01\x02binary"),
        websocket.WebSocketMessage(
            websocket.Opcode.TEXT, True, b'{"type": "response.create", "model": 42}', dropped=True
        ),
        websocket.WebSocketMessage(
            websocket.Opcode.TEXT, False, b'{"type": "error", "status": 400}', injected=True
        ),
    ]
    return flow


@pytest.fixture
def registered() -> Iterator[None]:
    with taddons.context():  # mitmproxy's prettify reads ctx.options
        register()
        try:
            yield
        finally:
            unregister()


@pytest.mark.usefixtures("registered")
def test_the_registry_picks_the_view_for_a_responses_socket() -> None:
    flow = socket_flow()
    create, delta, binary, dropped, injected = flow.websocket.messages
    shown = contentviews.prettify_message(create, flow)
    assert shown.view_name == NAME
    assert "model: gpt-5-codex" in shown.text and "user: hi" in shown.text
    shown = contentviews.prettify_message(delta, flow)
    assert (shown.view_name, shown.text) == (
        NAME,
        "server event response.output_text.delta\ndelta: Hel",
    )
    # A binary frame keeps mitmproxy's own view, unless this one is chosen by hand.
    assert contentviews.prettify_message(binary, flow).view_name != NAME
    chosen = contentviews.prettify_message(binary, flow, NAME)
    assert "binary, 8 bytes" in chosen.text
    dropped_text = contentviews.prettify_message(dropped, flow).text
    assert "note: dropped, never forwarded" in dropped_text
    assert "note: injected" in contentviews.prettify_message(injected, flow).text
    # The handshake itself (no body) keeps its usual view.
    assert VIEW.render_priority(b"", Metadata(flow=flow, http_message=flow.request)) == 0


@pytest.mark.usefixtures("registered")
def test_other_sockets_keep_their_usual_view() -> None:
    flow = socket_flow("/socket.io/?EIO=4")
    create = flow.websocket.messages[0]
    assert not is_ai_socket(flow)
    assert contentviews.prettify_message(create, flow).view_name != NAME
    # One the bridge counted turns on is its own, whatever its path.
    flow.metadata[SOCKET_KEY] = {"turns": 1}
    assert is_ai_socket(flow)
    assert contentviews.prettify_message(create, flow).view_name == NAME
    assert not is_ai_socket(tflow.tflow())  # an HTTP flow is not a socket
    assert contentview.SOCKET_METADATA_KEY == SOCKET_KEY


def test_render_priority_parses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    flow = socket_flow()

    def never(_: bytes) -> Any:
        raise AssertionError("render_priority decoded a message")

    for module in (ws_view, contentview):
        if hasattr(module, "orjson"):
            monkeypatch.setattr(module.orjson, "loads", never)
    for message in flow.websocket.messages:
        meta = Metadata(flow=flow, websocket_message=message)
        expected = PRIORITY if message.is_text else 0
        assert VIEW.render_priority(message.content, meta) == expected
    meta = Metadata(flow=flow, websocket_message=flow.websocket.messages[0])
    assert VIEW.render_priority(b"", meta) == 0


# ------------------------------------------------------------------------------ end to end


def test_a_sockets_flow_file_has_its_comment_and_readable_messages(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Two turns over a real mitmdump; the saved flow names who, what, 2 turns, the tokens
    and the cost, and every message of it opens in this view."""
    flows = tmp_path / "flows.mitm"
    config = bridge_config(
        upstream.url,
        websocket="bridge",
        pricing={"overrides": {"fake-tool": {"input_per_mtok": 1000, "output_per_mtok": 2000}}},
    )
    with Mitmdump(tmp_path, config, extra_args=["-w", str(flows)]) as bridge:
        ws = ResponsesSocket(
            f"{bridge.url}/openai/v1/responses",
            {"authorization": f"Bearer {TOKENS['alice']}", "session-id": uuid.uuid4().hex},
        )
        ws.send({"type": "response.create", "model": "fake-tool", "input": "list the files"})
        first = ws.until_terminal()[-1]["response"]
        call = next(i for i in first["output"] if i["type"] == "function_call")
        ws.send(
            {
                "type": "response.create",
                "model": "fake-tool",
                "previous_response_id": first["id"],
                "input": [
                    {"type": "function_call_output", "call_id": call["call_id"], "output": "a.txt"}
                ],
            }
        )
        assert ws.until_terminal()[-1]["type"] == "response.completed"
        ws.close()
        wait_for(
            lambda: (
                len(
                    query(bridge.db_path, "select id from interceptions where status = 'completed'")
                )
                == 2
            )
        )
        usage = query(
            bridge.db_path,
            "select sum(input_tokens) as i, sum(output_tokens) as o,"
            " sum(estimated_cost_usd) as c from token_usages",
        )[0]
    with flows.open("rb") as f:
        saved = [flow for flow in io.FlowReader(f).stream() if flow.websocket is not None]
    assert len(saved) == 1
    flow = saved[0]
    assert flow.comment == (
        f"alice · fake-tool · 2 turns, last completed · in {usage['i']} / out {usage['o']} "
        f"tokens · ${usage['c']:.4f}"
    )
    assert (usage["i"], usage["o"]) == (96 + 140, 22 + 18)  # the fake's two turns
    assert flow.metadata[SOCKET_KEY]["turns"] == 2
    assert flow.marked == ""

    with taddons.context():
        register()
        try:
            shown = [contentviews.prettify_message(m, flow) for m in flow.websocket.messages]
        finally:
            unregister()
    assert {s.view_name for s in shown} == {NAME}
    texts = [s.text for s in shown]
    assert (
        sum(t.startswith("Responses API request (WebSocket response.create)") for t in texts) == 2
    )
    assert any("← " + call["call_id"] + ": a.txt" in t for t in texts)
    completed = [t for t in texts if t.startswith("server event response.completed")]
    assert len(completed) == 2
    assert "usage: input 96 (cached 0, cache write 0) · output 22" in completed[0]
