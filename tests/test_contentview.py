"""The "AI Bridge" contentview (aibridge.contentview): golden fixtures, bad input, registry."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import contentviews, http
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tflow

from aibridge import bridge
from aibridge.contentview import (
    FLOW_METADATA_KEY,
    NAME,
    PRIORITY,
    VIEW,
    AIBridgeView,
    register,
    render_body,
    render_request,
    render_response,
    unregister,
)

FIXTURES = Path(__file__).parent / "fixtures"
SCENARIOS = sorted(p.name.removesuffix(".request.json") for p in FIXTURES.glob("*.request.json"))
SSE = "text/event-stream"
JSON = "application/json"
# What render_* say when their own code failed (as opposed to a body they cannot read).
INTERNAL_FAILURE = "could not render"


def fixture(name: str, folder: Path = FIXTURES) -> tuple[bytes, bytes, str, dict[str, Any]]:
    """Request body, response body, response content type and expected records."""
    request = (folder / f"{name}.request.json").read_bytes()
    sse = folder / f"{name}.response.sse"
    if sse.exists():
        response, content_type = sse.read_bytes(), SSE
    else:
        response, content_type = (folder / f"{name}.response.json").read_bytes(), JSON
    expected = orjson.loads((folder / f"{name}.expected.json").read_bytes())
    return request, response, content_type, expected


def assert_shown(text: str, rendered: str) -> None:
    """Every non-blank line of ``text`` is in the rendering (which indents later lines)."""
    for line in text.split("\n"):
        if line.strip():
            assert line.strip() in rendered, f"{line!r} missing from:\n{rendered}"


def leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from leaves(v)
    else:
        yield value


# ------------------------------------------------------------------------- golden fixtures


@pytest.mark.parametrize("name", SCENARIOS)
def test_request_fixture(name: str) -> None:
    body, _, _, expected = fixture(name)
    out = render_request(body)
    req = expected["request"]
    assert out.startswith("Responses API request")
    assert f"model: {req['model']}" in out
    assert f"stream: {'true' if req['stream'] else 'unset'}" in out or "stream: false" in out
    if req["prompt"]:
        assert_shown(req["prompt"], out)
    if req["correlating_tool_call_id"]:
        assert f"← {req['correlating_tool_call_id']}: " in out
    if req["previous_response_id"]:
        assert f"previous_response_id: {req['previous_response_id']}" in out
    tools = orjson.loads(body).get("tools") or []
    for tool in tools:
        assert (tool.get("name") or tool["type"]) in out


@pytest.mark.parametrize("name", SCENARIOS)
def test_response_fixture(name: str) -> None:
    _, body, content_type, expected = fixture(name)
    out = render_response(body, content_type)
    result = expected["result"]
    assert INTERNAL_FAILURE not in out
    for key in ("response_id", "response_model"):
        if result[key]:
            assert result[key] in out
    if result["status"]:
        assert f"status: {result['status']}" in out or f"error: {result['error_code']}" in out
    if result["error"]:
        assert result["error"] in out
    if usage := result["token_usage"]:
        assert f"input {usage['input_tokens']} (cached {usage['cache_read_input_tokens']}" in out
        assert f"output {usage['output_tokens']} (reasoning {usage['reasoning_tokens']})" in out
        assert f"total {usage['total_tokens']}" in out
        if usage["cache_write_input_tokens"] is not None:
            assert f"cache write {usage['cache_write_input_tokens']}" in out
    for call in result["tool_usages"]:
        assert f"→ {call['tool']}" in out or f": {call['tool']} [" in out
        assert f"call_id={call['call_id']}" in out
        if isinstance(call["args"], str):
            assert_shown(call["args"], out)
        else:
            for leaf in leaves(call["args"]):
                assert orjson.dumps(leaf).decode() in out
        if call["invocation_error"]:
            assert call["invocation_error"] in out
    for thought in result["thoughts"]:
        assert_shown(thought["content"], out)
        if thought["source"] == "commentary":
            assert "assistant [commentary]: " in out
        else:
            assert "[reasoning] " in out
    if result["malformed_events"]:
        assert f"{result['malformed_events']} malformed event(s) skipped" in out
    if not result["terminal_seen"]:
        assert "no terminal event" in out


def test_codex_transcript() -> None:
    body, response, _, _ = fixture("codex_turn_streamed")
    out = render_request(body)
    assert "user: The test for divide() fails, please fix it." in out
    assert "[reasoning] **Running the tests**" in out
    assert "assistant [commentary]: Running the test suite to see the failure." in out
    assert '→ shell_command({"command":"pytest -q","workdir":"/home/dev/calc"})' in out
    assert "← call_shell_1: Exit code: 1" in out
    assert "stream: true · store: false" in out
    assert "tools (4): shell_command, update_plan, apply_patch, web_search" in out
    # The transcript keeps the conversation's order.
    positions = [out.index(s) for s in ("developer: ", "user: ", "[reasoning]", "→ ", "← ")]
    assert positions == sorted(positions)

    out = render_response(response, SSE)
    assert "→ apply_patch [custom_tool_call]  call_id=call_patch_2" in out
    assert '        raise ValueError("division by zero")' in out  # the patch, indented


def test_assembled_text() -> None:
    _, body, _, _ = fixture("text_streamed")
    events = [e for e in body.split(b"\n\n") if b"output_text.delta" in e]
    deltas = "".join(orjson.loads(e.split(b"data: ", 1)[1])["delta"] for e in events)
    assert f"assistant: {deltas}" in render_response(body, SSE)
    # Without the terminal event, the deltas alone still give the text.
    cut = body[: body.index(b"event: response.output_text.done")]
    out = render_response(cut, SSE)
    assert f"assistant (in_progress): {deltas}" in out
    assert "no terminal event" in out


def test_stream_cut_shows_finished_call_and_partial_text() -> None:
    _, body, _, _ = fixture("stream_cut_before_terminal")
    out = render_response(body, SSE)
    assert "→ shell  call_id=call_ls_cut_1" in out
    assert '"workdir": "/srv/app"' in out
    assert "1 malformed event(s) skipped" in out


def test_prefers_terminal_output_over_deltas() -> None:
    stream = (
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"output_index":0,"delta":"draft"}\n\n'
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"id":"resp_1","status":"completed","output":[{"type":"message","role":"assistant",'
        b'"content":[{"type":"output_text","text":"final words"}]}]}}\n\n'
    )
    out = render_response(stream, "text/event-stream; charset=utf-8")
    assert "assistant: final words" in out
    assert "draft" not in out


def test_partial_reasoning_and_arguments_from_deltas() -> None:
    events = [
        {"type": "response.output_item.added", "output_index": 0, "item": {"type": "reasoning"}},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "Think"},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "ing"},
        {
            "type": "response.output_item.added",
            "output_index": 1,
            "item": {"type": "function_call", "name": "grep", "call_id": "c1", "arguments": ""},
        },
        {"type": "response.function_call_arguments.delta", "output_index": 1, "delta": '{"q":'},
        {"type": "response.function_call_arguments.delta", "output_index": 1, "delta": '"x"}'},
    ]
    stream = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    out = render_response(stream, SSE)
    assert "[reasoning] (in_progress) Thinking" in out
    assert "→ grep  call_id=c1 (in_progress)" in out
    assert '"q": "x"' in out


def test_request_shapes() -> None:
    long = "x" * 5000
    body = {
        "model": "gpt-5",
        "instructions": long,
        "store": False,
        "background": True,
        "tool_choice": "required",
        "input": [
            {"role": "user", "content": "plain string content"},
            {"type": "function_call_output", "call_id": "c9", "output": "y" * 5000},
            {"type": "custom_tool_call", "name": "apply_patch", "input": "*** Begin Patch"},
            {"type": "custom_tool_call_output", "call_id": "c10", "output": "Done!"},
            {"type": "item_reference", "id": "msg_1"},
            {"type": "web_search_call", "id": "ws_1", "action": {"query": "mitm"}},
            {"type": "compaction", "encrypted_content": "abc"},
            {"type": "reasoning", "summary": [], "encrypted_content": "zzz"},
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": "https://example.com/cat.png"},
                    {"type": "input_file", "filename": "notes.pdf", "file_data": "..."},
                ],
            },
        ],
        "tools": [{"type": "custom", "name": "apply_patch"}, {"type": "web_search_preview"}],
    }
    out = render_request(orjson.dumps(body))
    assert "instructions: " + "x" * 300 + "… [4700 more chars]" in out
    assert "← c9: " + "y" * 600 + "… [4400 more chars]" in out
    assert "stream: unset · store: false" in out
    assert "background: true" in out
    assert 'tool_choice: "required"' in out
    assert "tools (2): apply_patch, web_search_preview" in out
    assert "user: plain string content" in out
    assert "→ apply_patch(*** Begin Patch)" in out
    assert "← c10: Done!" in out
    assert "[item_reference msg_1]" in out
    assert '→ web_search_call({"action":{"query":"mitm"}})' in out
    assert '[compaction] {"encrypted_content":"abc"}' in out
    assert "[reasoning] (no summary)" in out
    assert "[image https://example.com/cat.png]" in out
    assert "[file notes.pdf]" in out


def test_buffered_error_bodies() -> None:
    ours = orjson.dumps(
        {"code": "401", "message": "unknown token", "error": {"message": "unknown token"}}
    )
    assert "error: 401: unknown token" in render_response(ours, JSON)
    failed = orjson.dumps(
        {"object": "response", "id": "r1", "status": "failed", "error": {"message": "boom"}}
    )
    out = render_response(failed, JSON)
    assert "status: failed" in out
    assert "error: boom" in out


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"\xff\xfe\x00garbage", b"[1, 2]", b'"text"', b"{", b"null", b"<html>502</html>"],
)
def test_unreadable_bodies_are_explained(body: bytes) -> None:
    for out in (render_request(body), render_response(body, JSON), render_body(body)):
        assert out.startswith("Not a Responses API")
        assert INTERNAL_FAILURE not in out
    out = render_response(body, SSE)
    assert out.startswith("Responses API response (streamed")
    assert INTERNAL_FAILURE not in out


def test_unreadable_body_shows_a_preview() -> None:
    out = render_request(b"not json at all " * 1000)
    assert "not valid JSON" in out
    assert "not json at all" in out
    assert len(out) < 2200


def test_deep_nesting_and_huge_values() -> None:
    # Deeper than orjson writes (about 255 levels), as deep as it reads (1024).
    deep = "[" * 900 + '"bottom"' + "]" * 900
    body = (
        b'{"output": ['
        + orjson.dumps({"type": "function_call", "name": "f", "arguments": deep})
        + b', {"type": "image_generation_call", "id": "ig", "result": "'
        + b"A" * 1_000_000
        + b'"}, {"type": "mystery", "payload": '
        + deep.encode()
        + b'}], "usage": {"input_tokens": "many", "total_tokens": -1}}'
    )
    out = render_response(body, JSON)
    assert INTERNAL_FAILURE not in out
    assert "→ f" in out
    assert "usage: input ? (cached ?) · output ? (reasoning ?) · total ?" in out
    assert len(out) < 20_000


@pytest.mark.parametrize("name", SCENARIOS)
def test_truncated_bodies_never_raise(name: str) -> None:
    request, response, content_type, _ = fixture(name)
    for cut in range(0, max(len(request), len(response)), 41):
        for out in (render_request(request[:cut]), render_response(response[:cut], content_type)):
            assert isinstance(out, str)
            assert INTERNAL_FAILURE not in out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_garbage_bytes(data: bytes) -> None:
    for out in (
        render_request(data),
        render_response(data, JSON),
        render_response(data, SSE),
        render_response(data, ""),
        render_body(data, None),
    ):
        assert isinstance(out, str)
        assert INTERNAL_FAILURE not in out


# Shapes the renderers look into, with values of every JSON type in every place. A seeded
# generator rather than hypothesis: hundreds of cases in milliseconds, the same on every run.
KEYS = [
    "type", "role", "content", "text", "summary", "name", "arguments", "input", "output",
    "call_id", "id", "status", "phase", "error", "usage", "item", "response", "delta",
    "output_index", "summary_index", "image_url", "message", "code", "input_tokens",
    "input_tokens_details", "incomplete_details", "server_label", "reason",
]  # fmt: skip
LEAVES = [
    None, True, False, 0, -1, 3, 2**64 - 1, 1.5, -0.0, "", " ", "x", "\n", "[DONE]", '{"a": 1}',
    "message", "reasoning", "function_call", "custom_tool_call", "mcp_call", "web_search_call",
    "function_call_output", "input_image", "input_text", "output_text", "refusal", "commentary",
    "completed", "data:image/png;base64,AAAA", "user", "assistant",
]  # fmt: skip
BODY_KEYS = [
    "model", "instructions", "input", "tools", "reasoning", "stream", "store", "output",
    "usage", "error", "status", "object", "incomplete_details", "tool_choice",
]  # fmt: skip
EVENT_TYPES = [
    "response.created", "response.completed", "response.failed", "error",
    "response.output_item.added", "response.output_item.done", "response.output_text.delta",
    "response.reasoning_summary_text.delta", "response.function_call_arguments.delta",
]  # fmt: skip


def random_json(rng: random.Random, keys: list[str] = KEYS, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.4:
        return rng.choice(LEAVES)
    if roll < 0.6:
        return [random_json(rng, KEYS, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(keys): random_json(rng, KEYS, depth + 1) for _ in range(rng.randrange(7))}


def test_any_json_body() -> None:
    rng = random.Random(20240601)
    for _ in range(500):
        data = orjson.dumps(random_json(rng, BODY_KEYS, depth=-1))
        for out in (render_request(data), render_response(data, JSON), render_body(data)):
            assert INTERNAL_FAILURE not in out, data


def test_any_event_stream() -> None:
    rng = random.Random(20240602)
    for _ in range(300):
        chunks = []
        for _ in range(rng.randrange(10)):
            kind = rng.choice(EVENT_TYPES)
            value = random_json(rng, depth=-1)
            obj = {**value, "type": kind} if isinstance(value, dict) else value
            chunks.append(f"event: {kind}\ndata: ".encode() + orjson.dumps(obj) + b"\n\n")
        data = b"".join(chunks)
        out = render_response(data, SSE)
        assert out.startswith("Responses API response (streamed")
        assert INTERNAL_FAILURE not in out, data


# ----------------------------------------------------------------------- mitmproxy registry


def flow_of(
    request: bytes,
    response: bytes,
    content_type: str,
    path: str = "/v1/responses",
    api: str | None = None,
) -> http.HTTPFlow:
    """A finished POST with these bodies; `api`: what the bridge noted on it, if anything."""
    flow = tflow.tflow(resp=True)
    flow.request.method = "POST"
    flow.request.path = path
    flow.request.headers["content-type"] = "application/json"
    flow.request.content = request
    flow.response.headers["content-type"] = content_type
    flow.response.content = response
    if api is not None:
        flow.metadata[FLOW_METADATA_KEY] = {"interception_id": "x", "api": api}
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
def test_registry_picks_the_view_for_a_streamed_flow() -> None:
    request, response, content_type, _ = fixture("codex_turn_streamed")
    flow = flow_of(request, response, content_type + "; charset=utf-8")
    shown = contentviews.prettify_message(flow.request, flow)
    assert shown.view_name == NAME
    assert "← call_shell_1: Exit code: 1" in shown.text
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == NAME
    assert "→ apply_patch [custom_tool_call]  call_id=call_patch_2" in shown.text
    assert "usage: input 18230 (cached 17920)" in shown.text


@pytest.mark.usefixtures("registered")
def test_registry_picks_the_view_for_a_buffered_flow_under_a_route_prefix() -> None:
    request, response, content_type, _ = fixture("tool_result_buffered")
    flow = flow_of(request, response, content_type, path="/openai/v1/responses?x=1")
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == NAME
    assert "assistant: It's 18 °C and cloudy in Paris right now." in shown.text
    # The explicitly chosen view works too, as mitmweb's view menu does.
    assert "← call_7fAq2LmQ9xR3: " in contentviews.prettify_message(flow.request, flow, NAME).text


@pytest.mark.usefixtures("registered")
def test_other_flows_keep_their_usual_view() -> None:
    request, response, _, _ = fixture("text_buffered")
    flow = flow_of(request, response, JSON, path="/v1/completions")
    assert contentviews.prettify_message(flow.response, flow).view_name == "JSON"
    flow = flow_of(request, b"<html>bad gateway</html>", "text/html")
    assert contentviews.prettify_message(flow.response, flow).view_name != NAME
    assert VIEW.render_priority(response, Metadata(content_type=JSON)) == 0
    ws = tflow.twebsocketflow()
    assert VIEW.render_priority(b"{}", Metadata(flow=ws, content_type=JSON)) == 0


def test_bridged_flow_on_a_custom_path() -> None:
    request, _, _, _ = fixture("text_buffered")
    flow = flow_of(request, b"", JSON, path="/deployments/gpt/generate")
    meta = Metadata(flow=flow, http_message=flow.request, content_type=None)
    assert VIEW.render_priority(request, meta) == 0
    flow.metadata[FLOW_METADATA_KEY] = {"interception_id": "x"}
    assert VIEW.render_priority(request, meta) == PRIORITY
    assert VIEW.render_priority(b"", meta) == 0
    assert FLOW_METADATA_KEY == bridge.METADATA_KEY


def test_addon_registers_while_loaded() -> None:
    addon = AIBridgeView()
    with taddons.context(addon):  # runs the addon's load()
        assert contentviews.registry[NAME] is VIEW
        register()  # a hot reload registers again: still one view
        assert sum(1 for view in contentviews.registry.values() if view is VIEW) == 1
        addon.done()
        assert NAME.lower() not in contentviews.registry
        addon.done()  # harmless when already gone


def test_unregister_leaves_another_view_of_that_name() -> None:
    class Other(type(VIEW)):  # type: ignore[misc]
        pass

    other = Other()
    contentviews.add(other)
    try:
        unregister()
        assert contentviews.registry[NAME] is other
    finally:
        contentviews.registry._by_name.pop(NAME.lower(), None)
