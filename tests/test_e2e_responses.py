"""Response side through a real mitmdump: every golden fixture, and the openai SDK."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from devtools.fake_upstream import FakeUpstream
from tests.fixture_upstream import FIXTURES, FixtureUpstream, fixture_response
from tests.harness import (
    PROVIDER_KEY,
    TOKENS,
    Mitmdump,
    bridge_config,
    children,
    finished_with_prompt,
    query,
    wait_for,
)

SCENARIOS = sorted(p.name.removesuffix(".expected.json") for p in FIXTURES.glob("*.expected.json"))
UPSTREAM_STATUS = {"api_error_buffered": 401}


@pytest.fixture(scope="module")
def golden(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FixtureUpstream, Mitmdump]]:
    workdir = tmp_path_factory.mktemp("golden")
    with FixtureUpstream() as up, Mitmdump(workdir, bridge_config(up.url)) as proc:
        yield up, proc


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_golden_scenario(golden: tuple[FixtureUpstream, Mitmdump], scenario: str) -> None:
    up, proc = golden
    request_body = (FIXTURES / f"{scenario}.request.json").read_bytes()
    expected = orjson.loads((FIXTURES / f"{scenario}.expected.json").read_bytes())
    upstream_bytes, _content_type = fixture_response(scenario)
    status = UPSTREAM_STATUS.get(scenario, 200)
    session = uuid.uuid4().hex
    with httpx.stream(
        "POST",
        f"{proc.url}/openai/v1/responses",
        content=request_body,
        timeout=30,
        headers={
            "authorization": f"Bearer {TOKENS['alice']}",
            "content-type": "application/json",
            "x-fixture": scenario,
            "x-fixture-status": str(status),
            "session_id": session,
        },
    ) as r:
        received = b"".join(r.iter_raw())
        assert r.status_code == status
    assert received == upstream_bytes, "the client must receive exactly the upstream bytes"
    assert up.received[-1][3] == request_body

    rows = wait_for(
        lambda: query(
            proc.db_path,
            "select * from interceptions where client_session_id = ? and ended_at is not null",
            (session,),
        )
    )
    assert len(rows) == 1
    row = rows[0]
    result = expected["result"]
    req = expected["request"]
    if status >= 400:
        assert row["status"] == "upstream_error"
        assert row["http_status"] == status
        assert result["error"] in row["error"]
    elif result["status"] is None:
        assert row["status"] == "error"
        assert row["error"] == "the stream ended before a terminal event"
    else:
        assert row["status"] == result["status"]
        assert row["error"] == result["error"]
    assert row["response_id"] == result["response_id"]
    assert row["response_model"] == result["response_model"]
    assert row["model"] == req["model"]
    assert row["streaming"] == int(req["stream"])
    assert row["correlating_tool_call_id"] == req["correlating_tool_call_id"]
    assert row["previous_response_id"] == req["previous_response_id"]
    assert row["malformed_events"] == result["malformed_events"]
    assert row["initiator_id"] == "alice" and row["credential_hint"] == "sk-t...cdef"

    prompts = children(proc, "user_prompts", row["id"])
    assert [p["prompt"] for p in prompts] == ([req["prompt"]] if req["prompt"] is not None else [])
    usage = children(proc, "token_usages", row["id"])
    if result["token_usage"] is None:
        assert usage == []
    else:
        (u,) = usage
        for column, value in result["token_usage"].items():
            assert (orjson.loads(u[column]) if column == "usage" else u[column]) == value, column
    tools = children(proc, "tool_usages", row["id"])
    assert [
        {
            **{
                k: t[k]
                for k in (
                    "response_id",
                    "call_id",
                    "tool",
                    "type",
                    "server_url",
                    "invocation_error",
                )
            },
            "args": orjson.loads(t["args"]) if t["args"] is not None else None,
            "injected": bool(t["injected"]),
        }
        for t in tools
    ] == [
        {
            k: e[k]
            for k in (
                "response_id",
                "call_id",
                "tool",
                "type",
                "server_url",
                "invocation_error",
                "args",
                "injected",
            )
        }
        for e in result["tool_usages"]
    ]
    thoughts = children(proc, "model_thoughts", row["id"])
    assert [{k: t[k] for k in ("response_id", "source", "content")} for t in thoughts] == [
        {k: e[k] for k in ("response_id", "source", "content")} for e in result["thoughts"]
    ]


def client(bridge: Mitmdump) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{bridge.url}/openai/v1", api_key=TOKENS["alice"], max_retries=0, timeout=30
    )


def test_sdk_buffered_streamed_and_stream_helper(bridge: Mitmdump, upstream: FakeUpstream) -> None:
    c = client(bridge)
    p1, p2, p3 = (f"{kind} {uuid.uuid4().hex}" for kind in ("buffered", "streamed", "helper"))

    answer = c.responses.create(model="fake-cached", input=p1, service_tier="flex")
    events = list(c.responses.create(model="fake-reasoning", input=p2, stream=True))
    with c.responses.stream(model="fake-tool", input=p3) as stream:
        final = stream.get_final_response()

    r1 = finished_with_prompt(bridge.db_path, p1)
    assert (r1["status"], r1["streaming"], r1["response_id"]) == ("completed", 0, answer.id)
    (u1,) = children(bridge, "token_usages", r1["id"])
    assert u1["input_tokens"] == answer.usage.input_tokens
    assert u1["service_tier"] == answer.service_tier == "flex"  # it sets the price
    assert u1["cache_read_input_tokens"] == answer.usage.input_tokens_details.cached_tokens > 0
    assert u1["uncached_input_tokens"] == (
        u1["input_tokens"] - u1["cache_read_input_tokens"] - (u1["cache_write_input_tokens"] or 0)
    )

    r2 = finished_with_prompt(bridge.db_path, p2)
    completed = events[-1].response
    assert (r2["status"], r2["streaming"], r2["response_id"]) == ("completed", 1, completed.id)
    sources = [t["source"] for t in children(bridge, "model_thoughts", r2["id"])]
    assert sources.count("reasoning_summary") == 2 and sources.count("commentary") == 1
    (u2,) = children(bridge, "token_usages", r2["id"])
    assert u2["reasoning_tokens"] == completed.usage.output_tokens_details.reasoning_tokens > 0

    r3 = finished_with_prompt(bridge.db_path, p3)
    (call,) = [o for o in final.output if o.type == "function_call"]
    (tool,) = children(bridge, "tool_usages", r3["id"])
    assert (tool["call_id"], tool["tool"], tool["type"]) == (
        call.call_id,
        call.name,
        "function_call",
    )
    assert orjson.loads(tool["args"]) == orjson.loads(call.arguments)

    # The follow-up turn carries the tool's output: it correlates with the call.
    follow = c.responses.create(
        model="fake-tool",
        input=[
            {"role": "user", "content": p3},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    assert "sunny" in follow.output_text

    def follow_row() -> list[dict[str, Any]]:
        return query(
            bridge.db_path, "select * from interceptions where response_id = ?", (follow.id,)
        )

    (r4,) = wait_for(follow_row)
    assert r4["correlating_tool_call_id"] == call.call_id
    assert children(bridge, "user_prompts", r4["id"]) == []
    assert all(PROVIDER_KEY not in str(v) for v in r4.values())


@pytest.mark.parametrize(
    ("model", "stream", "status", "error_part"),
    [
        ("fake-failed", True, "failed", None),
        ("fake-incomplete", True, "incomplete", "max_output_tokens"),
        ("fake-error-event", True, "error", None),
        ("fake-malformed", True, "completed", None),
        ("fake-truncated", True, "error", "terminal event"),
        ("fake-429", False, "upstream_error", "Rate limit"),
        ("fake-429", True, "upstream_error", "Rate limit"),
        ("fake-failed", False, "upstream_error", None),
    ],
)
def test_sdk_terminal_states(
    bridge: Mitmdump, model: str, stream: bool, status: str, error_part: str | None
) -> None:
    prompt = f"{model} {uuid.uuid4().hex}"
    if model == "fake-malformed":
        # The SDK raises at the broken event and hangs up; whether the rest of the stream
        # reached the bridge first would be a race. A client that reads to the end:
        body = orjson.dumps({"model": model, "input": prompt, "stream": stream})
        headers = {"authorization": f"Bearer {TOKENS['alice']}"}
        r = httpx.post(f"{bridge.url}/openai/v1/responses", content=body, headers=headers)
        assert r.status_code == 200 and b"response.completed" in r.content
    else:
        try:
            result = client(bridge).responses.create(model=model, input=prompt, stream=stream)
            if stream:
                list(result)
        except (openai.APIError, ValueError):
            pass  # the SDK raises for some of these; the record counts
    row = finished_with_prompt(bridge.db_path, prompt)
    assert row["status"] == status
    if status != "completed":
        assert row["error"]
    if error_part:
        assert error_part in row["error"]
    if model == "fake-malformed":
        # The broken event is a text delta, which the tee never decodes (by design, for
        # speed): the exchange still completes with its usage.
        assert len(children(bridge, "token_usages", row["id"])) == 1
    if model == "fake-429":
        assert row["http_status"] == 429
    if model == "fake-truncated":
        assert len(children(bridge, "tool_usages", row["id"])) == 1
