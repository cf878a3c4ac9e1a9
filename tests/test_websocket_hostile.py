"""Hostile input over the Responses WebSocket: no turn goes upstream unrecorded or unchecked,
however its client message is spelled, and each server event is credited to its own turn.

Hook tests drive AIBridge with taddons/tflow WebSocket flows (injected messages come back
to the hooks as mitmproxy delivers them); end-to-end tests go through a real mitmdump to a
scripted upstream that records every WebSocket message it receives.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.flow import Flow
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketData, WebSocketMessage
from wsproto.events import BytesMessage, Message, TextMessage
from wsproto.frame_protocol import Opcode

from aibridge.apis.openai_responses import (
    BACKGROUND_NOT_SUPPORTED,
    DELTA_EVENTS,
    WANTED_EVENTS,
    ResponseAccumulator,
)
from aibridge.auth import hint
from aibridge.bridge import AIBridge
from aibridge.transport.websocket import read_server_event, worth_decoding
from devtools.fake_upstream import (
    TEXT_ANSWER,
    Outcome,
    accept_websocket,
    function_call_item,
    message_item,
    new_id,
    response_object,
    serve_websocket,
    text_outcome,
    usage,
    ws_replies,
)
from tests.harness import (
    PROVIDER_KEY,
    TOKENS,
    LoopbackHTTP,
    Mitmdump,
    bridge_config,
    finished_with_prompt,
    query,
    wait_for,
)
from tests.ws_client import ResponsesSocket

SOCKET_URL = "https://api.openai.com/v1/responses"
HOOK_TOKEN = "alice-ws-hostile-token-0123"
fuzz = settings(
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def create(prompt: str, model: str = "fake-text", **fields: Any) -> dict[str, Any]:
    return {"type": "response.create", "model": model, "input": prompt, **fields}


# Client messages that decode to a response.create, spelled so that reading bytes would miss
# them ({p}: the prompt). Each must be a recorded turn.
TURN_SPELLINGS = {
    "escaped key": '{"typ\\u0065":"response.create","model":"fake-text","input":"{p}"}',
    "key all escaped": '{"\\u0074\\u0079\\u0070\\u0065":"response.create","input":"{p}"}',
    "escaped value": '{"type":"response\\u002ecreate","model":"fake-text","input":"{p}"}',
    "value escaped, upper hex": '{"type":"\\u0072esponse\\u002Ecreate","input":"{p}"}',
    "tabs": '{\t"type"\t:\t"response.create",\t"model":"fake-text","input":"{p}"}',
    "CR LF": '\r\n{\r\n"type"\r\n:\r\n"response.create"\r\n,"input":"{p}"}\r\n',
    "spaces": '{ "type" : "response.create" , "model" : "fake-text" , "input" : "{p}" }',
    "type last": '{"model":"fake-text","input":"{p}","type":"response.create"}',
    "type last, escaped": '{"input":"{p}","t\\u0079pe" :\n"response\\u002ecreate"}',
    "type after a big input": (
        '{"model":"fake-text","input":['
        + ",".join(['{"role":"user","content":"' + "filler " * 200 + '"}'] * 40)
        + ',{"role":"user","content":"{p}"}],"type":"response.create"}'
    ),
    "type in a string first": (
        '{"note":"\\"type\\":\\"x\\"","type":"response.create","input":"{p}"}'
    ),
}
# Messages the bridge cannot judge ({p}: a marker): refused with 400, never forwarded.
UNJUDGEABLE = {
    "duplicate type, create last": '{"type":"x","type":"response.create","input":"{p}"}',
    "duplicate type, create first": '{"type":"response.create","type":"x","input":"{p}"}',
    "duplicate type via escape": (
        '{"type":"response.cancel","typ\\u0065":"response.create","input":"{p}"}'
    ),
    "duplicate background": (
        '{"type":"response.create","background":false,"input":"{p}","background":true}'
    ),
    "duplicate model": '{"type":"response.create","model":"a","input":"{p}","model":"b"}',
    "duplicate unread field": (
        '{"type":"response.create","reasoning":{},"input":"{p}","reasoning":{}}'
    ),
    "duplicate on another event": '{"type":"response.cancel","type":"response.cancel","x":"{p}"}',
    "BOM": '\ufeff{"type":"response.create","input":"{p}"}',
    "truncated": '{"type":"response.create","input":"{p}"',
    "trailing text": '{"type":"response.cancel","x":"{p}"} and more',
    "single quotes": "{'type':'response.create','input':'{p}'}",
    "lone surrogate": '{"type":"response.create","input":"{p}\\ud800"}',
    "NaN": '{"type":"response.create","input":"{p}","temperature":NaN}',
    "form feed": '\f{"type":"response.create","input":"{p}"}',
    "an array": '[{"type":"response.create","input":"{p}"}]',
    "a string": '"response.create {p}"',
    "not JSON": "response.create {p}",
    "empty": "",
}
# Whatever else is well formed goes through untouched, however it mentions response.create.
OTHER_EVENTS = {
    "cancel": '{"type":"response.cancel","response_id":"resp_{p}"}',
    "create named elsewhere": '{"note":"response.create","type":"response.cancel","x":"{p}"}',
    "create as a value first": '{"kind":"response.create","type":"session.update","x":"{p}"}',
    "other case": '{"type":"Response.Create","input":"{p}"}',
    "future event": '{"type":"response.steer","input":"{p}"}',
    "no type": '{"model":"fake-text","input":"{p}"}',
    "type not a string": '{"type":["response.create"],"input":"{p}"}',
}
BACKGROUND_SPELLINGS = {
    "escaped type": '{"typ\\u0065":"response.create","input":"{p}","background":true}',
    "escaped key": '{"type":"response.create","input":"{p}","backgr\\u006fund":true}',
    "escaped both": '{"type":"response\\u002ecreate","input":"{p}","\\u0062ackground" : true}',
    "type last": '{"input":"{p}","background":\ttrue,"type":"response.create"}',
}


def spelled(template: str, prompt: str) -> str:
    return template.replace("{p}", prompt)


# ------------------------------------------------------------------------ hook harness


@dataclass
class Hooks:
    addon: AIBridge
    db_path: Path
    pending: list[tuple[http.HTTPFlow, bool, bytes, bool]] = field(default_factory=list)
    to_client: list[dict[str, Any]] = field(default_factory=list)  # injected by the bridge
    last_socket: http.HTTPFlow | None = None

    def inject(self, flow: Flow, to_client: bool, message: bytes, is_text: bool = True) -> None:
        """inject.websocket as mitmproxy's proxyserver has it: delivered on a later turn."""
        assert isinstance(flow, http.HTTPFlow)
        self.pending.append((flow, to_client, message, is_text))

    def deliver(self) -> None:
        while self.pending:
            flow, to_client, content, is_text = self.pending.pop(0)
            opcode = Opcode.TEXT if is_text else Opcode.BINARY
            if to_client:
                self.to_client.append(orjson.loads(content))
            assert flow.websocket is not None
            flow.websocket.messages.append(
                WebSocketMessage(opcode, not to_client, content, injected=True)
            )
            self.addon.websocket_message(flow)

    def flush(self) -> None:
        assert self.addon.recorder is not None
        assert self.addon.recorder.flush(timeout=10)

    def rows(self, flow: http.HTTPFlow) -> list[dict[str, Any]]:
        self.flush()
        sql = "select * from interceptions where flow_id = ? order by rowid"
        return query(self.db_path, sql, (flow.id,))

    def row(self, flow: http.HTTPFlow, prompt: str) -> dict[str, Any]:
        self.flush()
        sql = (
            "select i.* from interceptions i join user_prompts p on p.interception_id = i.id"
            " where i.flow_id = ? and p.prompt = ?"
        )
        (found,) = query(self.db_path, sql, (flow.id, prompt))
        return found

    def children(self, table: str, interception_id: str) -> list[dict[str, Any]]:
        self.flush()
        sql = f"select * from {table} where interception_id = ? order by id"
        return query(self.db_path, sql, (interception_id,))


@pytest.fixture
def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hooks]:
    monkeypatch.chdir(tmp_path)
    config = {
        "database": "audit.db",
        "websocket": "bridge",
        "providers": [
            {
                "name": "openai",
                "type": "openai",
                "base_url": "https://api.openai.com/v1",
                "api_key": "sk-hook-provider-key-0123456789",
            }
        ],
        "users": [{"id": "alice", "token": HOOK_TOKEN}],
    }
    path = tmp_path / "aibridge.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    addon = AIBridge(default_config_dir=tmp_path)
    with taddons.context(addon) as tctx:
        harness = Hooks(addon, tmp_path / "audit.db")
        tctx.master.commands.add("inject.websocket", harness.inject)
        tctx.configure(addon, aibridge_config=str(path))
        yield harness
        addon.done()


def open_socket(h: Hooks) -> http.HTTPFlow:
    """A bridged WebSocket flow, past its upgrade, as mitmproxy drives the hooks."""
    flow = tflow.twebsocketflow()
    upgrade, flow.response, flow.websocket = flow.response, None, None
    flow.request = http.Request.make(
        "GET",
        SOCKET_URL,
        b"",
        {
            "host": "api.openai.com",
            "authorization": f"Bearer {HOOK_TOKEN}",
            "connection": "Upgrade",
            "upgrade": "websocket",
            "sec-websocket-version": "13",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            "originator": "codex_cli_rs",
            "user-agent": "codex_cli_rs/0.171.0",
        },
    )
    h.addon.request(flow)
    assert flow.response is None, "the upgrade was refused"
    flow.response = upgrade
    h.addon.responseheaders(flow)
    h.addon.response(flow)
    flow.websocket = WebSocketData()
    return flow


def from_client(
    h: Hooks, flow: http.HTTPFlow, content: bytes | str, *, text: bool = True
) -> WebSocketMessage:
    raw = content.encode() if isinstance(content, str) else content
    message = WebSocketMessage(Opcode.TEXT if text else Opcode.BINARY, True, raw)
    assert flow.websocket is not None
    flow.websocket.messages.append(message)
    h.addon.websocket_message(flow)
    h.deliver()
    return message


def from_server(
    h: Hooks, flow: http.HTTPFlow, event: dict[str, Any] | bytes, *, text: bool = True
) -> None:
    raw = event if isinstance(event, bytes) else orjson.dumps(event)
    assert flow.websocket is not None
    message = WebSocketMessage(Opcode.TEXT if text else Opcode.BINARY, False, raw)
    flow.websocket.messages.append(message)
    h.addon.websocket_message(flow)
    h.deliver()


def verdict(h: Hooks, content: bytes | str, *, text: bool = True) -> str:
    """What the bridge did with one client message on a fresh socket."""
    flow = h.last_socket = open_socket(h)
    errors_before = len(h.to_client)
    message = from_client(h, flow, content, text=text)
    rows = h.rows(flow)
    errors = h.to_client[errors_before:]
    assert message.content == (content.encode() if isinstance(content, str) else content)
    if message.dropped:
        assert [e["type"] for e in errors] == ["error"]
        assert [(r["status"], r["http_status"]) for r in rows] == [
            ("rejected", errors[0]["status"])
        ]
        return f"refused {errors[0]['status']}"
    assert errors == []
    if rows:
        assert [(r["status"], r["streaming"]) for r in rows] == [("in_progress", 1)]
        return "turn"
    return "forwarded"


# ---------------------------------------------------------------- client messages (hooks)


def test_every_spelling_of_a_create_is_a_recorded_turn(hooks: Hooks) -> None:
    for name, template in TURN_SPELLINGS.items():
        prompt = f"turn {name} {uuid.uuid4().hex}"
        assert verdict(hooks, spelled(template, prompt)) == "turn", name
        flow, response_id = hooks.last_socket, new_id("resp")
        assert flow is not None
        from_server(hooks, flow, created(response_id))
        from_server(hooks, flow, completed(response_id, (1, 1)))
        # The turn's record carries the prompt it decoded.
        assert hooks.row(flow, prompt)["status"] == "completed", name


def test_messages_the_bridge_cannot_judge_are_refused(hooks: Hooks) -> None:
    for name, template in UNJUDGEABLE.items():
        assert verdict(hooks, spelled(template, uuid.uuid4().hex)) == "refused 400", name
    invalid_utf8 = [b'{"type":"response.create","input":"\xff"}', b"\xc3(", b"\xed\xa0\x80"]
    for raw in invalid_utf8:
        assert verdict(hooks, raw) == "refused 400", raw
    # Binary frames: the provider takes JSON text, so even a valid create is refused.
    binary = orjson.dumps(create("binary"))
    for raw in (binary, b"\x00\x01", b""):
        assert verdict(hooks, raw, text=False) == "refused 400", raw


def test_background_however_spelled_is_refused_with_501(hooks: Hooks) -> None:
    for name, template in BACKGROUND_SPELLINGS.items():
        prompt = f"background {name} {uuid.uuid4().hex}"
        assert verdict(hooks, spelled(template, prompt)) == "refused 501", name
        assert hooks.to_client[-1]["error"]["message"] == BACKGROUND_NOT_SUPPORTED
        rows = query(
            hooks.db_path,
            "select i.status, i.http_status from interceptions i join user_prompts p"
            " on p.interception_id = i.id where p.prompt = ?",
            (prompt,),
        )
        assert rows == [{"status": "rejected", "http_status": 501}], name


def test_other_client_events_go_through_untouched(hooks: Hooks) -> None:
    for name, template in OTHER_EVENTS.items():
        assert verdict(hooks, spelled(template, uuid.uuid4().hex)) == "forwarded", name


def test_a_client_message_the_bridge_fails_on_is_not_forwarded(
    hooks: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(obj: dict[str, Any]) -> None:
        raise RuntimeError("a bug in the bridge")

    monkeypatch.setattr("aibridge.transport.websocket.request_info", broken)
    flow = open_socket(hooks)
    message = from_client(hooks, flow, orjson.dumps(create("while broken")))
    assert message.dropped
    assert hooks.to_client[-1]["status"] == 500
    # No turn was opened for it: the next response's events find no turn to go to.
    from_server(hooks, flow, created(new_id("resp")))
    assert hooks.rows(flow) == []


def json_text(value: Any, draw: Callable[[st.SearchStrategy[Any]], Any]) -> str:
    """``value`` as JSON with drawn whitespace and \\u escapes in keys and strings."""
    space = st.text(alphabet=" \t\r\n", max_size=2)
    if isinstance(value, dict):
        members = [
            draw(space) + json_text(k, draw) + draw(space) + ":" + json_text(v, draw)
            for k, v in value.items()
        ]
        return "{" + ",".join(members) + draw(space) + "}"
    if isinstance(value, list):
        return "[" + ",".join(json_text(v, draw) for v in value) + "]"
    if isinstance(value, str):
        mask = draw(st.lists(st.booleans(), min_size=len(value), max_size=len(value)))
        chars = [
            f"\\u{ord(c):04x}" if escape and ord(c) < 0x10000 else orjson.dumps(c).decode()[1:-1]
            for c, escape in zip(value, mask, strict=True)
        ]
        return '"' + "".join(chars) + '"'
    return orjson.dumps(value).decode()


@fuzz
@given(
    kind=st.sampled_from(["response.create", "response.cancel", "x"]),
    fields=st.dictionaries(
        st.sampled_from(["model", "input", "metadata", "store", "tools", "note"]),
        st.text(max_size=6) | st.booleans() | st.none(),
        max_size=4,
    ),
    duplicate=st.sampled_from([None, "type", "model", "note"]),
    type_at=st.integers(0, 5),
    data=st.data(),
)
def test_judged_by_what_it_decodes_to(
    hooks: Hooks,
    kind: str,
    fields: dict[str, Any],
    duplicate: str | None,
    type_at: int,
    data: st.DataObject,
) -> None:
    members = list(fields.items())
    members.insert(min(type_at, len(members)), ("type", kind))
    if duplicate is not None:
        if duplicate not in dict(members):
            members.append((duplicate, "first"))
        members.insert(data.draw(st.integers(0, len(members))), (duplicate, "again"))
    pairs = (json_text(k, data.draw) + ":" + json_text(v, data.draw) for k, v in members)
    text = "{" + ",".join(pairs) + "}"
    got = verdict(hooks, text)
    if duplicate is not None:
        assert got == "refused 400"
    elif kind != "response.create":
        assert got == "forwarded"
    else:
        bad = any(
            k in ("model", "input") and not isinstance(v, str | None) for k, v in fields.items()
        )
        assert got == ("refused 400" if bad else "turn")


# ---------------------------------------------------------------- server events (hooks)


def created(response_id: str) -> dict[str, Any]:
    req: dict[str, Any] = {"model": "gpt-5"}
    return {"type": "response.created", "response": response_object(req, response_id, 0)}


def completed(
    response_id: str, tokens: tuple[int, int], output: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    outcome = Outcome([] if output is None else output, usage(*tokens))
    response = response_object({"model": "gpt-5"}, response_id, 0, outcome)
    return {"type": "response.completed", "response": response}


def item_done(item: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "response.output_item.done", "output_index": 0, "item": item, **extra}


def delta(text: str = " word") -> dict[str, Any]:
    return {"type": "response.output_text.delta", "item_id": "msg_1", "delta": text}


def tokens_of(h: Hooks, row: dict[str, Any]) -> list[tuple[int, int]]:
    usages = h.children("token_usages", row["id"])
    return [(u["input_tokens"], u["output_tokens"]) for u in usages]


def tools_of(h: Hooks, row: dict[str, Any]) -> list[str]:
    return [t["call_id"] for t in h.children("tool_usages", row["id"])]


def test_server_events_are_credited_to_their_own_turn(hooks: Hooks) -> None:
    flow = open_socket(hooks)
    for prompt in ("A", "B", "C"):  # sent at once, as a pipelining client may
        from_client(hooks, flow, orjson.dumps(create(prompt)))
    ra, rb = new_id("resp"), new_id("resp")
    call_a, call_b = function_call_item("a", {}), function_call_item("b", {})
    late_a = function_call_item("late", {})
    from_server(hooks, flow, created(ra))
    from_server(hooks, flow, item_done(call_a))  # no id: the turn streaming now (A)
    from_server(hooks, flow, created(rb))
    from_server(hooks, flow, item_done(call_b))  # no id: the turn streaming now (B)
    from_server(hooks, flow, delta())
    from_server(hooks, flow, completed(rb, (11, 3)))  # B's terminal event before A's
    from_server(hooks, flow, item_done(late_a, response_id=ra))  # named: A's
    from_server(hooks, flow, completed(ra, (5, 2)))
    # An error naming no response before C's response.created: the turn waiting longest.
    from_server(hooks, flow, {"type": "error", "status": 429, "error": {"message": "slow down"}})
    a, b, c = (hooks.row(flow, p) for p in ("A", "B", "C"))
    assert (a["status"], a["response_id"], tokens_of(hooks, a)) == ("completed", ra, [(5, 2)])
    assert (b["status"], b["response_id"], tokens_of(hooks, b)) == ("completed", rb, [(11, 3)])
    assert tools_of(hooks, a) == [call_a["call_id"], late_a["call_id"]]
    assert tools_of(hooks, b) == [call_b["call_id"]]
    assert (c["status"], c["error"], tokens_of(hooks, c)) == ("error", "slow down", [])

    # An error naming no response while one streams and another waits ends the streaming one.
    for prompt in ("D", "E"):
        from_client(hooks, flow, orjson.dumps(create(prompt)))
    rd, re_ = new_id("resp"), new_id("resp")
    from_server(hooks, flow, created(rd))
    from_server(hooks, flow, {"type": "error", "error": {"message": "server broke"}})
    from_server(hooks, flow, created(re_))
    from_server(hooks, flow, completed(re_, (7, 1)))
    d, e = hooks.row(flow, "D"), hooks.row(flow, "E")
    assert (d["status"], d["error"], d["response_id"]) == ("error", "server broke", rd)
    assert (e["status"], e["response_id"], tokens_of(hooks, e)) == ("completed", re_, [(7, 1)])


def test_late_and_stray_events_take_no_turn(hooks: Hooks, caplog: pytest.LogCaptureFixture) -> None:
    flow = open_socket(hooks)
    from_client(hooks, flow, orjson.dumps(create("first")))
    ra = new_id("resp")
    from_server(hooks, flow, created(ra))
    from_server(hooks, flow, completed(ra, (5, 2)))
    from_client(hooks, flow, orjson.dumps(create("second")))
    # A repeated terminal event of the finished response must not become the second turn's.
    from_server(hooks, flow, completed(ra, (99, 99)))
    rb = new_id("resp")
    from_server(hooks, flow, created(rb))
    # Events of a response no recorded turn started: logged, credited to nobody.
    stray = new_id("resp")
    from_server(hooks, flow, completed(stray, (42, 42)))
    from_server(hooks, flow, completed(rb, (8, 1)))
    first, second = hooks.row(flow, "first"), hooks.row(flow, "second")
    assert (first["response_id"], tokens_of(hooks, first)) == (ra, [(5, 2)])
    assert (second["status"], second["response_id"]) == ("completed", rb)
    assert tokens_of(hooks, second) == [(8, 1)]
    assert stray in caplog.text and "no recorded turn" in caplog.text


def test_the_bridges_own_error_events_end_no_turn(hooks: Hooks) -> None:
    """A refusal while a turn streams: mitmproxy hands the injected error event to the hooks
    as a server message; it is not the provider's and must not end the streaming turn."""
    flow = open_socket(hooks)
    from_client(hooks, flow, orjson.dumps(create("streaming")))
    ra = new_id("resp")
    from_server(hooks, flow, created(ra))
    refused = from_client(hooks, flow, orjson.dumps(create("later", background=True)))
    assert refused.dropped and hooks.to_client[-1]["status"] == 501
    refused = from_client(hooks, flow, b'{"type":"response.create","model":5}')
    assert refused.dropped and hooks.to_client[-1]["status"] == 400
    # What a mitmweb user injects towards the client is not the provider's either.
    hooks.inject(flow, True, orjson.dumps(completed(ra, (1, 1))))
    hooks.deliver()
    from_server(hooks, flow, delta())
    from_server(hooks, flow, completed(ra, (30, 4)))
    row = hooks.row(flow, "streaming")
    assert (row["status"], row["error"], tokens_of(hooks, row)) == ("completed", None, [(30, 4)])


def test_undecodable_server_messages_never_crash_and_are_counted(
    hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    flow = open_socket(hooks)
    from_client(hooks, flow, orjson.dumps(create("garbage")))
    ra = new_id("resp")
    from_server(hooks, flow, created(ra))
    malformed = [b"not json", b"[1,2]", b'"a string"', b"\xff\xfe", b'{"type":1}x']
    for raw in malformed:
        from_server(hooks, flow, raw)
    from_server(hooks, flow, b"\xc3\x28 binary", text=False)
    # Starts like an event the records never need: skipped undecoded, as on the SSE path.
    from_server(hooks, flow, b'{"type":"\xff\xfe","x":1}')
    from_server(hooks, flow, b'{"type":"response.output_text.delta","delta":')
    from_server(hooks, flow, completed(ra, (3, 3)))
    row = hooks.row(flow, "garbage")
    assert (row["status"], row["malformed_events"]) == ("completed", len(malformed) + 1)
    assert "failed to handle" not in caplog.text


def test_empty_and_done_messages_are_passed_over_as_on_the_sse_path(hooks: Hooks) -> None:
    flow = open_socket(hooks)
    from_client(hooks, flow, orjson.dumps(create("quiet frames")))
    ra = new_id("resp")
    from_server(hooks, flow, created(ra))
    for raw in (b"", b"[DONE]", b"", b"[DONE]"):
        from_server(hooks, flow, raw)
    from_server(hooks, flow, completed(ra, (5, 6)))
    row = hooks.row(flow, "quiet frames")
    assert (row["status"], row["malformed_events"]) == ("completed", 0)
    assert tokens_of(hooks, row) == [(5, 6)]


def test_one_decode_per_server_event_reads_as_the_sse_path_does() -> None:
    """The socket decodes an event once, for its turn and its accumulator (feed_decoded): the
    result is what feed_event makes of the same messages, whatever they hold."""
    ra = new_id("resp")
    item = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    messages = [
        orjson.dumps(created(ra)),
        b"not json",
        b"[1,2]",
        b'"a string"',
        b"\xff\xfe",
        b'{"no_type":1}',
        b'{"type":1}',
        b'{"type":"response.in_progress","response":"not an object"}',
        orjson.dumps(item_done(item)),
        orjson.dumps(delta()),
        orjson.dumps({"type": "response.output_item.done", "item": [1]}),
        orjson.dumps(completed(ra, (7, 8), [item])),
        orjson.dumps(completed(new_id("resp"), (1, 1))),  # after the end: not taken
    ]
    sse, socket_ = ResponseAccumulator(), ResponseAccumulator()
    for raw in messages:
        sse.feed_event(None, raw)
        if worth_decoding(raw):
            socket_.feed_decoded(None, read_server_event(raw))
    assert socket_.result() == sse.result()
    assert sse.result().malformed_events == 7
    assert sse.result().token_usage is not None


def test_a_terminal_event_is_never_skipped_however_spelled(hooks: Hooks) -> None:
    spellings = [
        b'{"type":"response.output_text.delta","type":"response.completed","response":%s}',
        b'{"type":"response.output_text.delta","typ\\u0065":"response.completed","response":%s}',
        b'{"type":"response\\u002ecompleted","response":%s}',
        b'{"type" : "response.completed" , "response":%s}',
        b'{"response":%s,"type":"response.completed"}',
    ]
    for i, template in enumerate(spellings):
        flow = open_socket(hooks)
        from_client(hooks, flow, orjson.dumps(create(f"terminal {i}")))
        ra = new_id("resp")
        from_server(hooks, flow, created(ra))
        from_server(hooks, flow, template % orjson.dumps(completed(ra, (i, i))["response"]))
        row = hooks.row(flow, f"terminal {i}")
        assert (row["status"], tokens_of(hooks, row)) == ("completed", [(i, i)]), template


event_types = st.sampled_from(sorted(WANTED_EVENTS | DELTA_EVENTS)) | st.text(max_size=30)


@settings(max_examples=500, derandomize=True, database=None, deadline=None)
@given(
    first=event_types,
    second=st.none() | event_types,
    extra=st.dictionaries(st.sampled_from(["delta", "item_id", "x"]), st.text(max_size=8)),
    data=st.data(),
)
def test_skipping_never_hides_a_wanted_event(
    first: str, second: str | None, extra: dict[str, str], data: st.DataObject
) -> None:
    """worth_decoding is False only when the decoded type is one the records never need."""
    members = [("type", first), *extra.items()]
    if second is not None:
        members.insert(data.draw(st.integers(1, len(members))), ("type", second))
    plain = "{" + ",".join(
        orjson.dumps(k).decode() + ":" + orjson.dumps(v).decode() for k, v in members
    )
    spelled_ = "{" + ",".join(
        json_text(k, data.draw) + ":" + json_text(v, data.draw) for k, v in members
    )
    for text in (plain + "}", spelled_ + "}"):
        raw = text.encode()
        if not worth_decoding(raw):
            assert orjson.loads(raw)["type"] not in WANTED_EVENTS, raw
    # The fast path stays: a plain delta is skipped.
    assert not worth_decoding(orjson.dumps(delta()))


# --------------------------------------------------------------------- end to end


class ScriptedUpstream(LoopbackHTTP):
    """A provider whose WebSocket records every message it receives, answering each
    response.create as the fake upstream does, or by a script named by its model:

    - ``script-pair``: holds the first such turn; at the second, streams both interleaved
      (created A, created B, completed B, completed A) with distinct usage;
    - ``script-garbage``: messages that are not JSON objects between created and completed.
    """

    PAIR_USAGE = ((5, 2), (11, 3))

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[bytes] = []
        self.posts: list[bytes] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with upstream.lock:
                    upstream.posts.append(body)
                reply = orjson.dumps(response_object({}, new_id("resp"), 0, text_outcome()))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                accept_websocket(self, headers)
                upstream.serve(self.connection, headers)

        super().__init__(Handler)

    def received(self) -> list[bytes]:
        with self.lock:
            return list(self.messages)

    def serve(self, sock: socket.socket, headers: dict[str, str]) -> None:
        held: list[dict[str, Any]] = []

        def answer(message: str | bytes) -> Iterator[str | bytes]:
            with self.lock:
                self.messages.append(message.encode() if isinstance(message, str) else message)
            return self.replies(message, headers, held)

        serve_websocket(sock, answer)

    def replies(
        self, message: str | bytes, headers: dict[str, str], held: list[dict[str, Any]]
    ) -> Iterator[str | bytes]:
        try:
            req = orjson.loads(message)
        except orjson.JSONDecodeError:
            req = None
        model = req.get("model") if isinstance(req, dict) else None
        if model == "script-pair":
            assert isinstance(req, dict)
            held.append(req)
            if len(held) < 2:
                return
            ids = [new_id("resp") for _ in held]
            for turn, rid in zip(held, ids, strict=True):
                yield self.event("response.created", response_object(turn, rid, 0))
            for i in (1, 0):
                outcome = Outcome([message_item(TEXT_ANSWER)], usage(*self.PAIR_USAGE[i]))
                response = response_object(held[i], ids[i], 0, outcome)
                yield self.event("response.completed", response)
            held.clear()
        elif model == "script-garbage":
            assert isinstance(req, dict)
            rid = new_id("resp")
            yield self.event("response.created", response_object(req, rid, 0))
            yield "this is not JSON"
            yield "[1, 2]"
            yield b"\xff\xfe\x00 not even text"
            yield b'{"type":"\xff\xfe","x":1}'  # starts like an event to skip
            outcome = Outcome([message_item(TEXT_ANSWER)], usage(7, 1))
            yield self.event("response.completed", response_object(req, rid, 0, outcome))
        elif model == "script-echo":
            # Echoes the key it was given (Authorization of the handshake) in a delta and in
            # the terminal event, as a confused or hostile provider might.
            assert isinstance(req, dict)
            key = headers.get("authorization", "").removeprefix("Bearer ")
            rid = new_id("resp")
            yield self.event("response.created", response_object(req, rid, 0))
            delta = {"type": "response.output_text.delta", "delta": f"your key is {key}"}
            yield orjson.dumps(delta).decode()
            outcome = Outcome([message_item(f"your key is {key}")], usage(3, 4))
            yield self.event("response.completed", response_object(req, rid, 0, outcome))
        elif isinstance(message, str):
            yield from ws_replies(message, headers)

    @staticmethod
    def event(kind: str, response: dict[str, Any]) -> str:
        return orjson.dumps({"type": kind, "response": response}).decode()


@dataclass
class Served:
    bridge: Mitmdump
    upstream: ScriptedUpstream


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with ScriptedUpstream() as upstream:
        workdir = tmp_path_factory.mktemp("ws-hostile")
        with Mitmdump(workdir, bridge_config(upstream.url, websocket="bridge")) as bridge:
            yield Served(bridge, upstream)


def connect(served: Served) -> ResponsesSocket:
    return ResponsesSocket(
        f"{served.bridge.url}/openai/v1/responses",
        {
            "authorization": f"Bearer {TOKENS['alice']}",
            "session-id": f"ws-hostile-{uuid.uuid4().hex}",
            "originator": "codex_cli_rs",
            "user-agent": "codex_cli_rs/0.171.0",
        },
    )


def send_raw(ws: ResponsesSocket, text: str | bytes) -> None:
    message = TextMessage(data=text) if isinstance(text, str) else BytesMessage(data=text)
    ws.sock.sendall(ws.ws.send(message))


def rejected_rows(served: Served) -> int:
    sql = "select count(*) as n from interceptions where status = 'rejected'"
    return int(query(served.bridge.db_path, sql)[0]["n"])


def prompt_of(message: bytes) -> str | None:
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, IndexError):
        value = orjson.loads(message).get("input")
        if isinstance(value, list):
            value = value[-1].get("content")
        return value if isinstance(value, str) else None
    return None


def test_e2e_no_spelling_of_a_create_goes_upstream_unrecorded(served: Served) -> None:
    ws = connect(served)
    cases = [(n, t, "turn") for n, t in TURN_SPELLINGS.items()]
    cases += [(n, t, "refused") for n, t in UNJUDGEABLE.items() if "create" in t]
    for name, template, expected in cases:
        prompt = f"e2e {name} {uuid.uuid4().hex}"
        text = spelled(template, prompt)
        before = served.upstream.received()
        send_raw(ws, text)
        events = ws.until_terminal()
        if expected == "turn":
            assert events[-1]["type"] == "response.completed", (name, events[-1])
            assert served.upstream.received()[len(before) :] == [text.encode()], name
            assert finished_with_prompt(served.bridge.db_path, prompt)["status"] == "completed"
        else:
            assert [(e["type"], e["status"]) for e in events] == [("error", 400)], name
            assert served.upstream.received() == before, name
    ws.close()
    # Everything the provider received on this socket is a recorded turn.
    for message in served.upstream.received():
        prompt = prompt_of(message)
        if prompt is not None and prompt.startswith("e2e "):
            assert finished_with_prompt(served.bridge.db_path, prompt)


def test_e2e_background_spelled_with_escapes_gets_501(served: Served) -> None:
    ws = connect(served)
    before = served.upstream.received()
    for name, template in BACKGROUND_SPELLINGS.items():
        prompt = f"e2e background {name} {uuid.uuid4().hex}"
        send_raw(ws, spelled(template, prompt))
        (event,) = ws.until_terminal()
        assert (event["type"], event["status"]) == ("error", 501), name
        assert event["error"]["message"] == BACKGROUND_NOT_SUPPORTED
        row = finished_with_prompt(served.bridge.db_path, prompt)
        assert (row["status"], row["http_status"]) == ("rejected", 501)
    ws.close()
    assert served.upstream.received() == before


def test_e2e_unjudgeable_messages_are_refused_and_never_forwarded(served: Served) -> None:
    ws = connect(served)
    before, rejected = served.upstream.received(), rejected_rows(served)
    messages: list[str | bytes] = [spelled(t, uuid.uuid4().hex) for t in UNJUDGEABLE.values()]
    messages += [orjson.dumps(create("binary")), b"\x00\xff"]  # binary frames
    for message in messages:
        send_raw(ws, message)
        (event,) = ws.until_terminal()
        assert (event["type"], event["status"]) == ("error", 400), message
    assert served.upstream.received() == before
    assert wait_for(lambda: rejected_rows(served) == rejected + len(messages))
    # The socket still works, and the next turn is recorded as usual.
    prompt = f"e2e after refusals {uuid.uuid4().hex}"
    ws.send(create(prompt))
    assert ws.until_terminal()[-1]["type"] == "response.completed"
    assert finished_with_prompt(served.bridge.db_path, prompt)["status"] == "completed"
    # A text frame of invalid UTF-8 cannot even be read as text: mitmproxy closes the socket
    # (1007) before any hook, and the provider never sees it.
    payload = b'{"type":"response.create","input":"\xff"}'
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    ws.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    with contextlib.suppress(OSError):
        assert ws.receive() is None
    ws.close()
    assert served.upstream.received()[len(before) :] == [orjson.dumps(create(prompt))]


def test_e2e_two_turns_on_one_socket_get_their_own_usage(served: Served) -> None:
    ws = connect(served)
    prompts = [f"e2e pair {i} {uuid.uuid4().hex}" for i in range(2)]
    for prompt in prompts:  # the second is sent before the first is answered
        ws.send(create(prompt, model="script-pair"))
    events = []
    while sum(e["type"] == "response.completed" for e in events) < 2:
        event = ws.receive()
        assert event is not None
        events.append(event)
    ws.close()
    ids = [e["response"]["id"] for e in events if e["type"] == "response.created"]
    for prompt, response_id, tokens in zip(prompts, ids, ScriptedUpstream.PAIR_USAGE, strict=True):
        row = finished_with_prompt(served.bridge.db_path, prompt)
        assert (row["status"], row["response_id"]) == ("completed", response_id)
        usages = query(
            served.bridge.db_path,
            "select input_tokens, output_tokens from token_usages where interception_id = ?",
            (row["id"],),
        )
        assert [(u["input_tokens"], u["output_tokens"]) for u in usages] == [tokens]


def test_e2e_a_refusal_does_not_end_the_turn_streaming(served: Served) -> None:
    ws = connect(served)
    slow = f"e2e slow {uuid.uuid4().hex}"
    ws.send(create(slow, model="fake-slow"))
    assert ws.receive()["type"] == "response.created"  # type: ignore[index]
    ws.send(create(f"e2e refused meanwhile {uuid.uuid4().hex}", background=True))
    ends: list[tuple[str, int | None]] = []
    while len(ends) < 2:  # the refusal's error event and the slow turn's end, in any order
        events = ws.until_terminal()
        ends.append((events[-1]["type"], events[-1].get("status")))
    ws.close()
    assert sorted(ends) == [("error", 501), ("response.completed", None)]
    row = finished_with_prompt(served.bridge.db_path, slow)
    assert (row["status"], row["error"]) == ("completed", None)


def test_e2e_server_messages_that_are_not_json_objects(served: Served) -> None:
    start = len(served.bridge.log())
    ws = connect(served)
    prompt = f"e2e garbage {uuid.uuid4().hex}"
    ws.send(create(prompt, model="script-garbage"))
    got: list[str | bytes] = []
    while not any(isinstance(m, str) and '"response.completed"' in m for m in got):
        data = ws.sock.recv(65536)
        assert data, "the bridge closed the socket"
        ws.ws.receive_data(data)
        got += [event.data for event in ws.ws.events() if isinstance(event, Message)]
    ws.close()
    # The client gets every message as the provider sent it, binary ones too.
    assert got[1:5] == [
        "this is not JSON",
        "[1, 2]",
        b"\xff\xfe\x00 not even text",
        b'{"type":"\xff\xfe","x":1}',
    ]
    row = finished_with_prompt(served.bridge.db_path, prompt)
    assert (row["status"], row["malformed_events"]) == ("completed", 3)
    assert "failed to handle" not in served.bridge.log()[start:]


def test_e2e_post_bodies_with_a_checked_field_twice_are_refused(served: Served) -> None:
    bodies = [
        b'{"model":"fake-text","background":true,"input":"x","background":false}',
        b'{"model":"fake-text","input":"x","stre\\u0061m":false,"stream":true}',
        b'{"model":"fake-text","input":"shown","instructions":"a","instructions":"b"}',
    ]
    before = len(served.upstream.posts)
    for body in bodies:
        reply = httpx.post(
            f"{served.bridge.url}/openai/v1/responses",
            content=body,
            headers={
                "authorization": f"Bearer {TOKENS['alice']}",
                "content-type": "application/json",
            },
            timeout=30,
        )
        assert reply.status_code == 400, body
        assert "is given more than once" in reply.json()["message"]
    assert len(served.upstream.posts) == before
    ok = httpx.post(
        f"{served.bridge.url}/openai/v1/responses",
        content=b'{"model":"fake-text","input":"x","reasoning":{},"reasoning":{}}',
        headers={"authorization": f"Bearer {TOKENS['alice']}", "content-type": "application/json"},
        timeout=30,
    )
    assert ok.status_code == 200
    assert len(served.upstream.posts) == before + 1


def test_e2e_a_key_the_provider_echoes_over_the_socket_is_masked(served: Served) -> None:
    ws = connect(served)
    prompt = f"e2e echo {uuid.uuid4().hex}"
    ws.send(create(prompt, model="script-echo"))
    events = ws.until_terminal()
    ws.close()
    seen = orjson.dumps(events)
    assert PROVIDER_KEY.encode() not in seen
    assert f"your key is {hint(PROVIDER_KEY)}".encode() in seen
    row = finished_with_prompt(served.bridge.db_path, prompt)
    assert row["status"] == "completed"
    db = served.bridge.db_path
    stored = b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))
    assert PROVIDER_KEY.encode() not in stored


def test_a_turn_open_at_shutdown_is_one_more_turn_of_the_sockets_comment(hooks: Hooks) -> None:
    flow = open_socket(hooks)
    from_client(hooks, flow, orjson.dumps(create("first")))
    first = new_id("resp")
    from_server(hooks, flow, created(first))
    from_server(hooks, flow, completed(first, (5, 2)))
    assert "1 turn" in flow.comment
    from_client(hooks, flow, orjson.dumps(create("second")))
    from_server(hooks, flow, created(new_id("resp")))
    hooks.addon.done()  # the bridge stops with the second turn streaming
    # The socket's comment counts both turns; it is not replaced by the open turn's alone.
    assert "alice" in flow.comment and "2 turns, last shutdown" in flow.comment, flow.comment
    assert "in 5 / out 2 tokens" in flow.comment, flow.comment
    sql = (
        "select i.status from interceptions i join user_prompts p on p.interception_id = i.id"
        " where p.prompt = 'second'"
    )
    assert query(hooks.db_path, sql) == [{"status": "shutdown"}]  # written before it closed
