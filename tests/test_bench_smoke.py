"""The benchmark's quick mode runs end to end and reports every metric (no timing asserted);
its Messages workload is Claude-Code-shaped, served as the fake serves it, and recorded."""

from __future__ import annotations

import http.client
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from aibridge.apis import anthropic_messages
from aibridge.clients import guess_client, session_id_from_headers
from bench.procs import MESSAGES_PATH, TOKEN, UpstreamProcess
from bench.report import METRIC_PATHS, lookup
from bench.run import QUICK
from bench.workloads import (
    CLAUDE_CODE_HEADERS,
    CLAUDE_CODE_PROMPT,
    CLAUDE_CODE_SESSION,
    claude_code_body,
)
from devtools import fake_anthropic
from tests.harness import REPO, query


def test_quick_benchmark_reports_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    workdir = tmp_path / "work"
    doc = REPO / "BENCHMARKS.md"
    doc_before = doc.read_bytes() if doc.exists() else None
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--workdir", str(workdir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    result = orjson.loads(out.read_bytes())
    assert result["mode"] == "quick"
    for path in METRIC_PATHS:
        value = lookup(result["metrics"], path)
        assert isinstance(value, int | float) and not isinstance(value, bool), path
        assert math.isfinite(value), path
    assert any(path.startswith("messages_sse.") for path in METRIC_PATHS)

    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    assert machine["python"] and machine["mitmproxy"]

    names = [t["name"] for t in result["targets"]]
    assert len(names) == 9 and len(set(names)) == 9
    assert "Messages SSE events/s vs stream-only mitmdump, c=16" in names
    for target in result["targets"]:
        assert isinstance(target["met"], bool) and target["target"] and target["value"]
        assert target["met"] or target["reason"], target

    # The printed table carries every target; quick mode never rewrites BENCHMARKS.md.
    assert run.stdout.count("| ") > 10 and "Ratio" in run.stdout
    assert f"| Messages SSE events/s, {QUICK.sse_events}-event stream, c=1 |" in run.stdout
    assert (doc.read_bytes() if doc.exists() else None) == doc_before

    # The measured bridge recorded every Messages stream it was sent, with its usage.
    messages = result["metrics"]["messages_sse"]
    assert_messages_recorded(
        workdir / "aibridge" / "aibridge.db", messages["c1"]["streams"] + messages["c16"]["streams"]
    )


def assert_messages_recorded(db: Path, timed_streams: int) -> None:
    rows = query(
        db,
        "select i.*, u.input_tokens, u.uncached_input_tokens, u.cache_read_input_tokens,"
        " u.cache_write_input_tokens, u.output_tokens, p.prompt"
        " from interceptions i"
        " join token_usages u on u.interception_id = i.id"
        " left join user_prompts p on p.interception_id = i.id"
        " where i.api = 'messages'",
    )
    (interceptions,) = query(db, "select count(*) as n from interceptions where api = 'messages'")
    # Every row has exactly one usage row; warm-up requests are recorded too.
    assert len(rows) == interceptions["n"] >= timed_streams
    calls: set[int] = set()
    for row in rows:
        assert (row["provider_name"], row["status"], row["http_status"]) == (
            "anthropic",
            "completed",
            200,
        )
        assert (row["model"], row["streaming"], row["malformed_events"]) == (
            f"fake-long-{QUICK.sse_events}",
            1,
            0,
        )
        assert (row["client"], row["client_session_id"]) == ("Claude Code", CLAUDE_CODE_SESSION)
        assert row["prompt"] == CLAUDE_CODE_PROMPT
        # The fake's usage for its n-th call (devtools/fake_anthropic.py): message_start's
        # input counts and message_delta's final output count, read from one stream.
        n, rest = divmod(row["uncached_input_tokens"] - 1, 100)
        assert rest == 0 and n >= 1
        assert row["cache_read_input_tokens"] == 10000 * n + 3
        assert row["cache_write_input_tokens"] == 1000 * n + 2
        assert row["input_tokens"] == (100 * n + 1) + (10000 * n + 3) + (1000 * n + 2)
        assert row["output_tokens"] == 7 * n + 5
        calls.add(n)
    assert len(calls) == len(rows)  # each row is its own upstream call


# ---- the Messages workload ----------------------------------------------------------------


@pytest.mark.parametrize("size", [30_000, 40_000, 60_000, 100_000])
def test_claude_code_body_is_claude_code_shaped(size: int) -> None:
    body = claude_code_body("fake-long-1000", size)
    assert size <= len(body) <= size + 4_000
    obj, info = anthropic_messages.parse_request(body)
    assert (info.model, info.stream, info.prompt) == ("fake-long-1000", True, CLAUDE_CODE_PROMPT)
    assert info.session_id == CLAUDE_CODE_SESSION
    assert info.correlating_tool_call_id is None  # a typed prompt, not a tool result

    assert len(obj["system"]) == 3 and obj["system"][0]["text"].startswith(
        "x-anthropic-billing-header:"
    )
    assert len(obj["tools"]) == 12 and all("input_schema" in t for t in obj["tools"])
    messages = obj["messages"]
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
    last = messages[-1]["content"]
    assert (
        last[0]["text"].startswith("<system-reminder>") and last[-1]["text"] == CLAUDE_CODE_PROMPT
    )
    # A long history: tool_use turns each answered by its tool_result.
    uses = [b["id"] for m in messages for b in m["content"] if b["type"] == "tool_use"]
    results = [
        b["tool_use_id"] for m in messages for b in m["content"] if b["type"] == "tool_result"
    ]
    assert len(uses) >= 4 and uses == results and len(set(uses)) == len(uses)


def test_claude_code_body_is_deterministic() -> None:
    assert claude_code_body("m", 40_000) == claude_code_body("m", 40_000)
    assert orjson.loads(claude_code_body("m", stream=False))["stream"] is False


def test_claude_code_headers_are_read_as_claude_code() -> None:
    headers = CLAUDE_CODE_HEADERS
    assert headers["anthropic-version"] == "2023-06-01" and headers["anthropic-beta"]
    assert guess_client(headers["user-agent"], None, headers=headers) == "Claude Code"
    assert session_id_from_headers(headers) == CLAUDE_CODE_SESSION


# ---- the bench upstream serves Messages as the fake does ----------------------------------


@pytest.fixture(scope="module")
def bench_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamProcess]:
    upstream = UpstreamProcess(tmp_path_factory.mktemp("bench-upstream")).start()
    try:
        yield upstream
    finally:
        upstream.stop()


def post(
    upstream: UpstreamProcess, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes, list[bytes]]:
    """POST once; the status, headers, body and the chunks as they came off the wire."""
    url = urlsplit(upstream.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        chunks: list[bytes] = []
        while chunk := response.read1():
            chunks.append(chunk)
        return response.status, dict(response.getheaders()), b"".join(chunks), chunks
    finally:
        conn.close()


_IDS = re.compile(rb'"(msg|req)_[0-9a-f]{32}"')


def without_ids(data: bytes) -> bytes:
    return _IDS.sub(rb'"\1_"', data)


def call_number(stream: bytes) -> int:
    """n of the n-th call, from message_start's usage (100n+1 input tokens)."""
    start = stream.split(b"\n\n", 1)[0].split(b"\ndata: ", 1)[1]
    n, rest = divmod(orjson.loads(start)["message"]["usage"]["input_tokens"] - 1, 100)
    assert rest == 0
    return n


@pytest.mark.parametrize(
    ("events", "path", "extra"),
    [
        (1000, MESSAGES_PATH, {"x-fake-flush-each": "1"}),  # the benchmark's request
        (3, "/v1/messages", {"x-fake-flush-each": "1"}),  # reverse-proxy path, no query
        (0, "/v1/messages?beta=true", {}),  # no flush header: 64 KiB chunks
        (2000, "/anthropic/v1/messages", {}),
    ],
)
def test_bench_upstream_streams_messages_as_the_fake(
    bench_upstream: UpstreamProcess, events: int, path: str, extra: dict[str, str]
) -> None:
    body = claude_code_body(f"fake-long-{events}", 2_000)
    headers = {**CLAUDE_CODE_HEADERS, "x-api-key": TOKEN, **extra}
    status, got_headers, got, chunks = post(bench_upstream, path, body, headers)
    assert status == 200
    assert got_headers["content-type"].startswith("text/event-stream")
    reply = fake_anthropic.plan_messages(orjson.loads(body), headers, call_number(got))
    assert reply.chunks is not None
    # The fake's bytes, but for the random message id.
    assert without_ids(got) == without_ids(b"".join(reply.chunks))
    assert got.count(b"event: content_block_delta\n") == events
    if extra:  # one chunk per event on the wire, as the benchmark asks
        assert len(chunks) >= events + 6


@pytest.mark.parametrize(
    ("body", "headers", "status", "kind"),
    [
        (b"{not json", {"x-api-key": TOKEN}, 400, "invalid_request_error"),
        (b"[1, 2]", {"x-api-key": TOKEN}, 400, "invalid_request_error"),
        (b"", {"x-api-key": TOKEN}, 400, "invalid_request_error"),
        # The fake paces fake-slow with time.sleep, which would stall the bench's loop.
        (
            b'{"model": "fake-slow", "stream": true}',
            {"x-api-key": TOKEN},
            400,
            "invalid_request_error",
        ),
        (b'{"model":"fake-slow"}', {"authorization": "Bearer x"}, 400, "invalid_request_error"),
        # No credential: the fake's 401, before the body is read.
        (b'{"model": "fake-long-3", "stream": true}', {}, 401, "authentication_error"),
        (b"{not json", {"x-api-key": " "}, 401, "authentication_error"),
        (b'{"model": "fake-529"}', {"authorization": "Bearer x"}, 529, "overloaded_error"),
    ],
)
def test_bench_upstream_refuses_messages_as_the_fake(
    bench_upstream: UpstreamProcess, body: bytes, headers: dict[str, str], status: int, kind: str
) -> None:
    got_status, _, got, _ = post(
        bench_upstream, "/v1/messages", body, {"content-type": "application/json", **headers}
    )
    assert got_status == status
    error = orjson.loads(got)
    assert error["type"] == "error" and error["error"]["type"] == kind


def test_bench_upstream_still_serves_responses(bench_upstream: UpstreamProcess) -> None:
    body = orjson.dumps({"model": "fake-long-5", "stream": True, "input": "hi"})
    status, _, got, _ = post(bench_upstream, "/v1/responses", body, {"authorization": "Bearer x"})
    assert status == 200
    assert got.count(b"event: response.output_text.delta\n") == 5
