"""From a finished exchange to rows (aibridge.record): status rules, error text, privacy, comment.

Everything here is pure: responses are built with ``http.Response.make`` and streams are fed
through a real ``StreamTee`` from the golden fixtures, without a proxy or a database.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from mitmproxy import http

from aibridge.apis.openai_responses import API as RESPONSES_API
from aibridge.apis.openai_responses import (
    RequestInfo,
    ResponseAccumulator,
    ResponseResult,
    parse_request,
)
from aibridge.auth import Identity
from aibridge.config import Privacy, Provider
from aibridge.record.outcome import Outcome, finish_exchange, upstream_error_text
from aibridge.record.rows import end_rows, flow_comment, interception_start, prompt_row
from aibridge.transport.tee import StreamTee

FIXTURES = Path(__file__).parent / "fixtures"
NOW = "2025-01-02T03:04:05.000006+00:00"
IID = "0123456789abcdef0123456789abcdef"
PROVIDER = Provider("openai", "openai", "https://api.openai.com/v1", "sk-test-0123456789abcdefghij")
CLIENT_DISCONNECTED = "Client disconnected."


def fixture(name: str, kind: str) -> bytes:
    return (FIXTURES / f"{name}.{kind}").read_bytes()


def expected(name: str) -> dict[str, Any]:
    return orjson.loads(fixture(name, "expected.json"))


def request_info(name: str) -> RequestInfo:
    return parse_request(fixture(name, "request.json"))[1]


def json_response(status: int, body: bytes, **headers: str) -> http.Response:
    return http.Response.make(status, body, {"content-type": "application/json", **headers})


def sse_response() -> http.Response:
    # As mitmproxy leaves it after streaming: headers, no stored body.
    return http.Response.make(200, b"", {"content-type": "text/event-stream"})


def streamed(
    raw: bytes, *, end: bool = False, encoding: str = ""
) -> tuple[ResponseAccumulator, StreamTee]:
    """A tee fed ``raw`` in uneven chunks, as the proxy would; ended with b"" if ``end``."""
    acc = ResponseAccumulator()
    tee = StreamTee(acc, RESPONSES_API, encoding)
    for i in range(0, len(raw), 173):
        tee(raw[i : i + 173])
    if end:
        tee(b"")
    return acc, tee


def cut_before(raw: bytes, marker: bytes) -> bytes:
    index = raw.index(marker)
    assert index > 0
    return raw[:index]


def result_of(name: str) -> ResponseResult:
    """The ResponseResult of a golden fixture, decoded the way the bridge does it."""
    if (FIXTURES / f"{name}.response.sse").exists():
        acc, _ = streamed(fixture(name, "response.sse"), end=True)
    else:
        acc = ResponseAccumulator()
        acc.feed_response_body(fixture(name, "response.json"))
    return acc.result()


# ------------------------------------------------------------------ finish_exchange


@pytest.mark.parametrize(
    "name",
    [
        "text_buffered",
        "cached_tokens_buffered",
        "builtin_tool_calls_buffered",
        "tool_result_buffered",
    ],
)
def test_buffered_2xx_json_is_decoded(name: str) -> None:
    want = expected(name)["result"]
    acc = ResponseAccumulator()
    outcome = finish_exchange(
        RESPONSES_API, acc, None, json_response(200, fixture(name, "response.json")), None
    )
    assert (outcome.status, outcome.error) == (want["status"], want["error"])
    assert asdict(outcome.result) == want


@pytest.mark.parametrize(
    ("status", "error"),
    [
        ("completed", None),
        ("incomplete", "max_output_tokens"),
        ("failed", "backend exploded"),
    ],
)
def test_buffered_terminal_status_decides(status: str, error: str | None) -> None:
    body: dict[str, Any] = {"id": "resp_1", "model": "m", "status": status, "output": []}
    if status == "incomplete":
        body["incomplete_details"] = {"reason": "max_output_tokens"}
    if status == "failed":
        body["error"] = {"code": "server_error", "message": "backend exploded"}
    outcome = finish_exchange(
        RESPONSES_API, ResponseAccumulator(), None, json_response(200, orjson.dumps(body)), None
    )
    assert (outcome.status, outcome.error) == (status, error)
    assert outcome.result.response_id == "resp_1"


def test_buffered_body_that_is_not_json_is_an_error() -> None:
    outcome = finish_exchange(
        RESPONSES_API, ResponseAccumulator(), None, json_response(200, b"<html>"), None
    )
    assert outcome.status == "error"
    assert outcome.error is not None
    assert outcome.error.startswith("response body is not JSON: ")


def test_buffered_body_that_cannot_be_decoded_is_an_error() -> None:
    response = http.Response.make(
        200, b"", {"content-type": "application/json", "content-encoding": "gzip"}
    )
    response.raw_content = b"this is not gzip"
    outcome = finish_exchange(RESPONSES_API, ResponseAccumulator(), None, response, None)
    assert outcome.status == "error"
    assert outcome.error is not None
    assert outcome.error.startswith("response body cannot be decoded: ")


def test_buffered_gzip_body_is_decoded_for_parsing() -> None:
    response = json_response(
        200, fixture("text_buffered", "response.json"), **{"content-encoding": "gzip"}
    )
    assert response.raw_content is not None
    assert response.raw_content.startswith(b"\x1f\x8b")  # make() compressed it
    outcome = finish_exchange(RESPONSES_API, ResponseAccumulator(), None, response, None)
    assert asdict(outcome.result) == expected("text_buffered")["result"]


def test_buffered_event_stream_is_parsed_whole() -> None:
    """Offline mode: a streamed body read back from a flow file arrives in one piece."""
    name = "reasoning_commentary_streamed"
    response = http.Response.make(
        200, fixture(name, "response.sse"), {"content-type": "text/event-stream"}
    )
    outcome = finish_exchange(RESPONSES_API, ResponseAccumulator(), None, response, None)
    assert outcome.status == "completed"
    assert asdict(outcome.result) == expected(name)["result"]


def test_buffered_response_without_terminal_status_is_an_error() -> None:
    body = orjson.dumps({"id": "resp_1", "model": "m", "status": "in_progress", "output": []})
    outcome = finish_exchange(
        RESPONSES_API, ResponseAccumulator(), None, json_response(200, body), None
    )
    assert outcome.status == "error"
    assert outcome.error == "the response held no Responses API object"
    assert outcome.result.response_id == "resp_1"


def test_no_response_at_all_is_an_error() -> None:
    outcome = finish_exchange(RESPONSES_API, ResponseAccumulator(), None, None, None)
    assert (outcome.status, outcome.error) == ("error", "the response held no Responses API object")


def test_a_3xx_body_is_not_read() -> None:
    response = json_response(304, orjson.dumps({"status": "completed", "output": []}))
    outcome = finish_exchange(RESPONSES_API, ResponseAccumulator(), None, response, None)
    assert outcome.status == "error"
    assert outcome.result.terminal_seen is False


@pytest.mark.parametrize("status_code", [400, 401, 429, 500, 503])
def test_upstream_status_of_400_or_more_is_upstream_error(status_code: int) -> None:
    body = fixture("api_error_buffered", "response.json")
    outcome = finish_exchange(
        RESPONSES_API, ResponseAccumulator(), None, json_response(status_code, body), None
    )
    assert outcome.status == "upstream_error"
    assert outcome.error == (
        f"upstream answered HTTP {status_code}: " + orjson.loads(body)["error"]["message"]
    )


def test_upstream_error_wins_over_a_stream_and_a_hook_error() -> None:
    acc, tee = streamed(fixture("text_streamed", "response.sse"))
    response = json_response(502, b'{"error": {"message": "bad gateway"}}')
    outcome = finish_exchange(RESPONSES_API, acc, tee, response, CLIENT_DISCONNECTED)
    assert (outcome.status, outcome.error) == (
        "upstream_error",
        "upstream answered HTTP 502: bad gateway",
    )


@pytest.mark.parametrize(
    "name",
    [
        "text_streamed",
        "function_call_streamed",
        "custom_tool_call_streamed",
        "reasoning_commentary_streamed",
        "codex_turn_streamed",
        "completed_without_output_streamed",
        "incomplete_streamed",
        "failed_streamed",
        "error_event_streamed",
        "malformed_event_streamed",
    ],
)
def test_streamed_fixture_outcome(name: str) -> None:
    want = expected(name)["result"]
    acc, tee = streamed(fixture(name, "response.sse"))
    outcome = finish_exchange(RESPONSES_API, acc, tee, sse_response(), None)
    assert tee.ended  # finish_exchange ends a stream mitmproxy did not end
    assert (outcome.status, outcome.error) == (want["status"], want["error"])
    assert asdict(outcome.result) == want


def test_stream_ended_by_the_proxy_is_not_ended_twice() -> None:
    acc, tee = streamed(fixture("text_streamed", "response.sse"), end=True)
    outcome = finish_exchange(RESPONSES_API, acc, tee, sse_response(), None)
    assert outcome.status == "completed"


def test_stream_without_terminal_event() -> None:
    name = "stream_cut_before_terminal"
    acc, tee = streamed(fixture(name, "response.sse"), end=True)
    outcome = finish_exchange(RESPONSES_API, acc, tee, sse_response(), None)
    assert (outcome.status, outcome.error) == ("error", "the stream ended before a terminal event")
    # What response.output_item.done events carried is still there.
    assert asdict(outcome.result) == expected(name)["result"]


@pytest.mark.parametrize("message", [CLIENT_DISCONNECTED, "peer closed connection"])
def test_hook_error_after_the_terminal_event_is_completed(message: str) -> None:
    """Codex hangs up right after response.completed: nothing is missing."""
    name = "reasoning_commentary_streamed"
    acc, tee = streamed(fixture(name, "response.sse"))
    outcome = finish_exchange(RESPONSES_API, acc, tee, sse_response(), message)
    assert (outcome.status, outcome.error) == ("completed", None)
    assert asdict(outcome.result) == expected(name)["result"]


@pytest.mark.parametrize(
    ("message", "status"),
    [
        (CLIENT_DISCONNECTED, "client_disconnected"),
        ("client disconnected", "client_disconnected"),
        ("Connection killed.", "error"),
        ("peer closed connection without sending complete message body", "error"),
    ],
)
def test_hook_error_before_the_terminal_event(message: str, status: str) -> None:
    raw = cut_before(
        fixture("reasoning_commentary_streamed", "response.sse"), b"event: response.completed"
    )
    acc, tee = streamed(raw)
    outcome = finish_exchange(RESPONSES_API, acc, tee, sse_response(), message)
    assert (outcome.status, outcome.error) == (status, message)
    assert not tee.ended  # a cut stream's trailing partial event is not dispatched
    # The items completed before the cut are kept.
    assert [t["call_id"] for t in outcome.result.tool_usages] == ["call_read_utils_1"]
    assert len(outcome.result.thoughts) == 3


@pytest.mark.parametrize(
    ("message", "status"),
    [(CLIENT_DISCONNECTED, "client_disconnected"), ("Server connection refused", "error")],
)
def test_hook_error_without_any_response(message: str, status: str) -> None:
    outcome = finish_exchange(RESPONSES_API, ResponseAccumulator(), None, None, message)
    assert (outcome.status, outcome.error) == (status, message)


def test_hook_error_does_not_read_a_buffered_body() -> None:
    response = json_response(200, fixture("text_buffered", "response.json"))
    outcome = finish_exchange(
        RESPONSES_API, ResponseAccumulator(), None, response, "Connection killed."
    )
    assert (outcome.status, outcome.error) == ("error", "Connection killed.")


def test_corrupt_compressed_stream_reports_the_parse_error() -> None:
    acc, tee = streamed(b"\x00" * 64 + fixture("text_streamed", "response.sse"), encoding="gzip")
    outcome = finish_exchange(RESPONSES_API, acc, tee, sse_response(), None)
    assert outcome.status == "error"
    assert outcome.error == tee.parse_error
    assert outcome.error is not None
    assert outcome.error.startswith("stream parsing stopped: ")


def test_unknown_content_encoding_reports_it() -> None:
    acc, tee = streamed(fixture("text_streamed", "response.sse"), encoding="compress")
    outcome = finish_exchange(RESPONSES_API, acc, tee, sse_response(), None)
    assert (outcome.status, outcome.error) == ("error", "unsupported content-encoding 'compress'")


# -------------------------------------------------------------- upstream_error_text


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            b'{"error": {"message": "Rate limit reached", "code": "rate_limit"}}',
            "upstream answered HTTP 429: Rate limit reached",
        ),
        (b'{"error": "quota exhausted"}', "upstream answered HTTP 429: quota exhausted"),
        (b'{"error": {"code": "rate_limit"}}', "upstream answered HTTP 429"),
        (b'{"error": {"message": 42}}', "upstream answered HTTP 429"),
        (b'{"detail": "nope"}', "upstream answered HTTP 429"),
        (b'["a", "b"]', "upstream answered HTTP 429"),
        (b"null", "upstream answered HTTP 429"),
        (b"", "upstream answered HTTP 429"),
        (b"Too Many Requests", "upstream answered HTTP 429: Too Many Requests"),
        (b"bad \xff byte", "upstream answered HTTP 429: bad \ufffd byte"),
    ],
)
def test_upstream_error_text(body: bytes, text: str) -> None:
    assert upstream_error_text(json_response(429, body)) == text


def test_upstream_error_text_keeps_300_bytes_of_a_text_body() -> None:
    body = b"x" * 299 + b"yz" + b"!" * 1000
    text = upstream_error_text(http.Response.make(500, body, {"content-type": "text/plain"}))
    assert text == "upstream answered HTTP 500: " + "x" * 299 + "y"


def test_upstream_error_text_decodes_a_compressed_body() -> None:
    response = json_response(
        429, b'{"error": {"message": "slow down"}}', **{"content-encoding": "gzip"}
    )
    assert response.raw_content is not None
    assert response.raw_content.startswith(b"\x1f\x8b")
    assert upstream_error_text(response) == "upstream answered HTTP 429: slow down"


def test_upstream_error_text_with_an_undecodable_body() -> None:
    response = json_response(503, b"", **{"content-encoding": "br"})
    response.raw_content = b"not brotli at all"
    assert upstream_error_text(response) == "upstream answered HTTP 503"


# ------------------------------------------------------------------------ end_rows

ALL_ON = Privacy()


def outcome_of(name: str) -> Outcome:
    result = result_of(name)
    assert result.status is not None
    return Outcome(result.status, result.error, result)


def rows_by_table(rows: list[tuple[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    tables: dict[str, list[dict[str, Any]]] = {}
    for table, row in rows:
        tables.setdefault(table, []).append(row)
    return tables


def test_end_rows_order_and_content() -> None:
    name = "reasoning_commentary_streamed"
    want = expected(name)
    rows = list(end_rows(IID, request_info(name), outcome_of(name), 200, ALL_ON, NOW))
    assert [t for t, _ in rows] == [
        "interceptions",
        "user_prompts",
        "token_usages",
        "tool_usages",
        "model_thoughts",
        "model_thoughts",
        "model_thoughts",
    ]
    result = want["result"]
    assert rows[0][1] == {
        "id": IID,
        "ended_at": NOW,
        "http_status": 200,
        "status": "completed",
        "error": None,
        "response_id": result["response_id"],
        "response_model": result["response_model"],
        "malformed_events": 0,
        # The usage row's sums, on the interception (no prices given: no cost).
        "total_tokens": result["token_usage"]["total_tokens"],
        "estimated_cost_usd": None,
    }
    tables = rows_by_table(rows)
    for table, table_rows in tables.items():
        if table != "interceptions":
            assert all(r["interception_id"] == IID and r["created_at"] == NOW for r in table_rows)
    assert tables["user_prompts"] == [
        {
            "interception_id": IID,
            "response_id": result["response_id"],
            "prompt": want["request"]["prompt"],
            "created_at": NOW,
        }
    ]
    usage = dict(tables["token_usages"][0])
    assert {k: v for k, v in usage.items() if k not in ("interception_id", "created_at")} == (
        result["token_usage"]
    )
    tool = dict(tables["tool_usages"][0])
    # Arguments are always stored as JSON text.
    assert orjson.loads(tool.pop("args")) == result["tool_usages"][0]["args"]
    assert {k: v for k, v in tool.items() if k not in ("interception_id", "created_at")} == {
        k: v for k, v in result["tool_usages"][0].items() if k != "args"
    }
    assert [(t["source"], t["content"]) for t in tables["model_thoughts"]] == [
        (t["source"], t["content"]) for t in result["thoughts"]
    ]


def test_end_rows_raw_string_arguments_become_a_json_string() -> None:
    name = "custom_tool_call_streamed"
    tables = rows_by_table(
        list(end_rows(IID, request_info(name), outcome_of(name), 200, ALL_ON, NOW))
    )
    (tool,) = tables["tool_usages"]
    raw_input = expected(name)["result"]["tool_usages"][0]["args"]
    assert isinstance(raw_input, str)
    assert tool["args"] == orjson.dumps(raw_input).decode()


@pytest.mark.parametrize("switch", ["store_prompts", "store_tool_args", "store_thoughts"])
def test_end_rows_privacy_switch(switch: str) -> None:
    name = "reasoning_commentary_streamed"
    privacy = replace(ALL_ON, **{switch: False})
    tables = rows_by_table(
        list(end_rows(IID, request_info(name), outcome_of(name), 200, privacy, NOW))
    )
    # The rows stay (the audit log still shows that something was asked, called, thought);
    # only their content goes.
    assert len(tables["user_prompts"]) == 1
    assert len(tables["tool_usages"]) == 1
    assert len(tables["model_thoughts"]) == 3
    assert (tables["user_prompts"][0]["prompt"] is None) == (switch == "store_prompts")
    assert (tables["tool_usages"][0]["args"] is None) == (switch == "store_tool_args")
    assert all(
        (t["content"] is None) == (switch == "store_thoughts") for t in tables["model_thoughts"]
    )
    assert tables["tool_usages"][0]["tool"] == "read_file"
    assert tables["token_usages"][0]["input_tokens"] == 1210


def test_end_rows_everything_off() -> None:
    name = "reasoning_commentary_streamed"
    privacy = Privacy(store_prompts=False, store_tool_args=False, store_thoughts=False)
    rows = list(end_rows(IID, request_info(name), outcome_of(name), 200, privacy, NOW))
    contents = [
        row.get(field) for _, row in rows for field in ("prompt", "args", "content") if field in row
    ]
    assert len(contents) == 5
    assert contents == [None] * 5


def test_end_rows_without_prompt_usage_or_tools() -> None:
    name = "failed_streamed"
    info = replace(request_info(name), prompt=None)
    outcome = outcome_of(name)
    rows = list(end_rows(IID, info, outcome, None, ALL_ON, NOW))
    assert [t for t, _ in rows] == ["interceptions"]
    assert rows[0][1]["status"] == "failed"
    assert rows[0][1]["error"] == outcome.error
    assert rows[0][1]["http_status"] is None


def test_end_rows_tool_without_arguments_stores_null() -> None:
    result = ResponseResult(
        response_id="resp_1",
        response_model="m",
        status="completed",
        error=None,
        token_usage=None,
        tool_usages=[
            {
                "response_id": "resp_1",
                "call_id": "ws_1",
                "tool": "web_search_call",
                "type": "web_search_call",
                "args": None,
                "injected": False,
                "server_url": None,
                "invocation_error": None,
            }
        ],
        thoughts=[],
        malformed_events=0,
        terminal_seen=True,
    )
    info = replace(request_info("text_streamed"), prompt=None)
    tables = rows_by_table(
        list(end_rows(IID, info, Outcome("completed", None, result), 200, ALL_ON, NOW))
    )
    assert tables["tool_usages"][0]["args"] is None


def test_end_rows_prompt_is_recorded_on_upstream_error() -> None:
    info = request_info("text_streamed")
    outcome = Outcome(
        "upstream_error", "upstream answered HTTP 429", ResponseAccumulator().result()
    )
    tables = rows_by_table(list(end_rows(IID, info, outcome, 429, ALL_ON, NOW)))
    assert tables["user_prompts"][0]["prompt"] == "Say hello in three words."
    assert tables["user_prompts"][0]["response_id"] is None
    assert tables["interceptions"][0]["http_status"] == 429


def test_prompt_row_privacy() -> None:
    assert prompt_row(IID, None, "hi", Privacy(store_prompts=False), NOW)["prompt"] is None
    assert prompt_row(IID, "resp_1", "hi", ALL_ON, NOW) == {
        "interception_id": IID,
        "response_id": "resp_1",
        "prompt": "hi",
        "created_at": NOW,
    }


def test_interception_start_row() -> None:
    info = request_info("function_call_streamed")
    identity = Identity("alice", "centralized", PROVIDER.api_key, "sk-t...ghij")
    row = interception_start(
        interception_id=IID,
        flow_id="flow-1",
        started_at=NOW,
        provider=PROVIDER,
        api=RESPONSES_API,
        info=info,
        headers={"user-agent": "codex_cli_rs/0.50.0"},
        identity=identity,
        request_bytes=1234,
    )
    assert row["status"] == "in_progress"
    assert row["ended_at"] is None
    assert (row["initiator_id"], row["credential_kind"], row["credential_hint"]) == (
        "alice",
        "centralized",
        "sk-t...ghij",
    )
    assert (row["provider"], row["provider_name"], row["api"]) == ("openai", "openai", "responses")
    assert (row["model"], row["streaming"]) == ("gpt-5", 1)
    assert row["client"] == "Codex"
    assert row["client_session_id"] == "sess-weather-42"  # from the body when no header
    assert row["metadata"] == {"request_bytes": 1234}
    assert PROVIDER.api_key not in repr(row)


def test_interception_start_row_of_a_rejection_without_identity() -> None:
    row = interception_start(
        interception_id=IID,
        flow_id="flow-1",
        started_at=NOW,
        provider=PROVIDER,
        api=RESPONSES_API,
        info=None,
        headers={"session-id": "sess-h"},
        identity=None,
        request_bytes=0,
    )
    assert row["initiator_id"] is None
    assert row["credential_hint"] is None
    assert row["model"] is None
    assert row["streaming"] is None
    assert row["client_session_id"] == "sess-h"


# ----------------------------------------------------------------------- flow_comment


def test_flow_comment_completed_with_tools() -> None:
    name = "reasoning_commentary_streamed"
    comment = flow_comment("alice", request_info(name), outcome_of(name))
    assert comment == "alice · gpt-5-2025-08-07 · in 1210 / out 412 tokens · tools: read_file"


def test_flow_comment_shows_cached_tokens() -> None:
    name = "cached_tokens_buffered"
    comment = flow_comment("bob", request_info(name), outcome_of(name))
    assert comment == "bob · gpt-5-2025-08-07 · in 2006 (1536 cached) / out 300 tokens"


def test_flow_comment_lists_every_tool() -> None:
    name = "builtin_tool_calls_buffered"
    comment = flow_comment("alice", request_info(name), outcome_of(name))
    assert comment.endswith(
        "tools: web_search_call, file_search_call, code_interpreter_call, "
        "image_generation_call, ask_question, local_shell_call, computer_call, "
        "apply_patch_call, shell_call"
    )


def test_flow_comment_failure_names_status_and_error() -> None:
    name = "incomplete_streamed"
    comment = flow_comment("alice", request_info(name), outcome_of(name))
    assert comment == (
        "alice · gpt-4.1-mini-2025-04-14 · in 20 / out 16 tokens · incomplete: max_output_tokens"
    )


def test_flow_comment_falls_back_to_the_requested_model() -> None:
    outcome = Outcome(
        "upstream_error", "upstream answered HTTP 429: slow down", ResponseAccumulator().result()
    )
    assert flow_comment("alice", request_info("text_streamed"), outcome) == (
        "alice · gpt-5-mini · upstream_error: upstream answered HTTP 429: slow down"
    )


def test_flow_comment_without_model_or_error() -> None:
    outcome = Outcome("shutdown", None, ResponseAccumulator().result())
    assert flow_comment("alice", None, outcome) == "alice · ? · shutdown"
