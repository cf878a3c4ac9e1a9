"""The benchmark's quick mode runs end to end and reports every metric (no timing asserted);
its buffered workload is the request Codex CLI sent, its Messages workload Claude-Code-shaped
and its Chat Completions workloads OpenCode-shaped, served as the fakes serve them, and
recorded; a direct call is the request a proxy forwards; CPU is told apart by where it is
spent."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import itertools
import math
import re
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from aibridge.apis import anthropic_messages, openai_chat, openai_responses
from aibridge.clients import guess_client, session_id_from_headers
from aibridge.config import load_config
from aibridge.console import ExchangeTally
from aibridge.metrics import ExchangeLabels, Metrics, MetricsServer
from aibridge.record.address import is_postgres
from bench import postgres, report
from bench.client import build_request, one_request, run_load
from bench.procs import (
    CHAT_PATH,
    MESSAGES_PATH,
    PROVIDER_KEY,
    TOKEN,
    WRITER_PROCESS_ARGV,
    Proxy,
    UpstreamProcess,
    cpu_seconds,
    cpu_split,
)
from bench.report import BUFFERED_BODY, METRIC_PATHS, lookup
from bench.run import QUICK, BenchError, alternate, codex_request_bytes, start_postgres
from bench.scraper import ScrapeError, Scraper, interceptions
from bench.workloads import (
    CLAUDE_CODE_HEADERS,
    CLAUDE_CODE_PROMPT,
    CLAUDE_CODE_SESSION,
    OPENCODE_HEADERS,
    OPENCODE_PROMPT,
    OPENCODE_SESSION,
    captured_codex_body,
    captured_codex_headers,
    claude_code_body,
    opencode_chat_body,
    small_responses_body,
)
from devtools import fake_anthropic, fake_openai_chat
from tests.harness import REPO, query
from tests.postgres_server import postgres_bin

OPENCODE_CAPTURED = REPO / "tests" / "fixtures" / "opencode_captured"
CODEX_CAPTURED = REPO / "tests" / "fixtures" / "codex_captured"
# What the user types in Codex's captured turn (its last input message).
CODEX_CAPTURED_PROMPT = "Run echo hello-from-tool in the shell and tell me what it printed."
# The streamed workloads' lengths in quick mode: long, then short.
QUICK_MODELS = {f"fake-long-{QUICK.sse_events}", f"fake-long-{QUICK.sse_short_events}"}
# What the bridges' config files read from the environment.
BENCH_ENV = {"BENCH_PROVIDER_KEY": PROVIDER_KEY}


def test_quick_benchmark_reports_every_metric(tmp_path: Path) -> None:
    postgres_bin()  # the bridge on PostgreSQL is measured too: skipped without it, not in CI
    out = tmp_path / "bench.json"
    workdir = tmp_path / "work"
    doc = REPO / "BENCHMARKS.md"
    doc_before = doc.read_bytes() if doc.exists() else None
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--require-postgres",
            "--out",
            str(out),
            "--workdir",
            str(workdir),
        ],
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
    for key in (
        "messages_sse",
        "chat_sse",
        "chat_sse_usage_added",
        "sse_short",
        "messages_sse_short",
        "chat_sse_short",
        "latency",
        "buffered_limits",
        "buffered_metrics",
        "buffered_postgres",
        "sse_postgres",
        "postgres_rows",
    ):
        assert any(path.startswith(f"{key}.") for path in METRIC_PATHS), key

    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    assert machine["python"] and machine["mitmproxy"]

    names = [t["name"] for t in result["targets"]]
    assert len(names) == 30 and len(set(names)) == 30
    for label in ("c=1", "c=16"):
        for title in ("Messages SSE", "Chat SSE", "Chat SSE (usage added)"):
            assert f"{title} events/s vs stream-only mitmdump, {label}" in names
        for title in ("Short SSE", "Short Messages SSE", "Short Chat SSE"):
            assert f"{title} events/s vs stream-only mitmdump, {label}" in names
        assert f"Buffered req/s ratio moved by enforcing limits, {label}" in names
        assert f"Buffered req/s ratio moved by metrics, {label}" in names
        assert f"Buffered req/s ratio moved by PostgreSQL as the store, {label}" in names
        assert f"SSE events/s ratio moved by PostgreSQL as the store, {label}" in names
    assert "PostgreSQL holds every exchange the bridge counted" in names
    for body in ("small body", "captured Codex 40 KB body"):
        assert f"Latency the addon adds over plain mitmdump, sequential, {body}" in names
    targets = {t["name"]: t["target"] for t in result["targets"]}
    assert targets[f"Buffered req/s vs plain mitmdump, c=16, {BUFFERED_BODY}"] == ">= 0.88x"
    assert targets["Short SSE events/s vs stream-only mitmdump, c=16"] == ">= 0.90x"
    assert targets["SSE events/s vs stream-only mitmdump, c=16"] == ">= 0.95x"
    for target in result["targets"]:
        assert isinstance(target["met"], bool) and target["target"] and target["value"]
        assert target["met"] or target["reason"], target

    # The printed table carries every target; quick mode never rewrites BENCHMARKS.md.
    assert run.stdout.count("| ") > 10 and "Ratio" in run.stdout
    for title in ("Messages SSE", "Chat SSE", "Chat SSE (usage added)"):
        assert f"| {title} events/s, {QUICK.sse_events}-event stream, c=1 |" in run.stdout
    for title, label in itertools.product(
        ("Short SSE", "Short Messages SSE", "Short Chat SSE"), ("c=1", "c=16")
    ):
        assert f"| {title} events/s, {QUICK.sse_short_events}-event stream, {label} |" in (
            run.stdout
        )
        split = "CPU per 1,000 events: event loop / other threads / writer processes"
        assert f"| {title} {split}, {label} |" in run.stdout
    for label in ("c=1", "c=16"):
        split = "CPU per request: event loop / other threads / writer processes"
        assert f"| Buffered {split}, {label} |" in run.stdout
    for body in ("small body", "captured Codex 40 KB body"):
        assert (
            f"| Latency added per request p50 / mean, {body}: the addon over plain mitmdump "
            "(plain mitmdump over a direct call) |" in run.stdout
        )
    for label, side in itertools.product(("c=1", "c=16"), ("limits", "metrics", "postgres")):
        assert f"| Buffered, {side} on: req/s, {BUFFERED_BODY}, {label} |" in run.stdout
        assert (
            f"| Buffered, {side} on vs off: req/s ratio moved (rounds from, to), {label} |"
            in run.stdout
        )
        assert f"| Buffered, {side} on vs off: mitmdump CPU per request, {label} |" in run.stdout
    for label in ("c=1", "c=16"):
        assert f"| SSE, postgres on: events/s, {QUICK.sse_events}-event stream, {label} |" in (
            run.stdout
        )
        assert (
            f"| SSE, postgres on vs off: events/s ratio moved (rounds from, to), {label} |"
            in run.stdout
        )
        assert f"| SSE, postgres on vs off: mitmdump CPU per 1,000 events, {label} |" in (
            run.stdout
        )
    assert "PostgreSQL not measured" not in run.stdout + run.stderr
    assert (doc.read_bytes() if doc.exists() else None) == doc_before

    # The measured bridge recorded every Messages stream it was sent, long and short, with
    # its usage.
    metrics = result["metrics"]
    db = workdir / "aibridge" / "aibridge.db"
    assert_messages_recorded(
        db,
        sum(
            metrics[key][c]["streams"]
            for key in ("messages_sse", "messages_sse_short")
            for c in ("c1", "c16")
        ),
    )
    # And every Chat stream, the usage asked for by OpenCode's body or added by the bridge.
    assert_chat_recorded(
        db,
        {
            openai_chat.USAGE_REQUESTED: [metrics["chat_sse"], metrics["chat_sse_short"]],
            openai_chat.USAGE_ADDED: [metrics["chat_sse_usage_added"]],
        },
    )
    assert_latency_measured(db, metrics["latency"])
    # mitmdump's CPU told apart: the baselines start no writer process; the parts add up.
    for key, per in (("buffered", "req"), ("sse", "1k_events"), ("chat_sse_short", "1k_events")):
        for c in ("c1", "c16"):
            for side in ("baseline", "addon"):
                figures = metrics[key][c][side]
                parts = [figures[f"cpu_{part}_ms_per_{per}"] for part in report.CPU_PARTS]
                assert figures[f"cpu_ms_per_{per}"] == pytest.approx(sum(parts))
                assert parts[0] > 0  # the event loop
            assert metrics[key][c]["baseline"][f"cpu_writer_process_ms_per_{per}"] == 0
    # The bridge with limits on judged every buffered request against all of them, and let
    # every one through; the bridge it is compared with has none.
    limited = metrics["buffered_limits"]
    assert_limits_enforced(
        workdir / "limits", limited["c1"]["requests"] + limited["c16"]["requests"]
    )
    assert not load_config(workdir / "aibridge" / "config.yaml", BENCH_ENV).governance.enabled
    assert_metrics_scraped(workdir, metrics["buffered_metrics"])
    assert_postgres_recorded(workdir, result)


def assert_latency_measured(db: Path, latency: dict[str, Any]) -> None:
    """The sequential loads' small requests went through the measured bridge, each one
    recorded (one untimed request before each load); both bodies' sizes are stated."""
    assert latency["requests"] == QUICK.latency_requests
    small, codex = latency["small"], latency["codex"]
    assert small["body_bytes"] == len(small_responses_body("fake-text")) < 200
    assert codex["body_bytes"] == len(captured_codex_body("fake-text", stream=False)) > 40_000
    for figures in (small, codex):
        assert figures["rounds"] == QUICK.rounds
        assert set(figures["per_round"]) == {"direct", "plain", "addon"}
    (said_hello,) = query(db, "select count(*) as n from user_prompts where prompt = 'Say hello.'")
    loads = QUICK.rounds + QUICK.warmup_rounds
    assert said_hello["n"] == loads * (QUICK.latency_requests + 1)


def assert_postgres_recorded(workdir: Path, result: dict[str, Any]) -> None:
    """The bridge on PostgreSQL wrote there and nowhere else: after its rounds, PostgreSQL
    held one interception per request the bench sent it, as many as the bridge counted, all
    completed; the server ran as the test harness runs it; the password was in no file."""
    metrics = result["metrics"]
    rows = metrics["postgres_rows"]
    timed = sum(
        metrics[key][c][count]
        for key, count in (("buffered_postgres", "requests"), ("sse_postgres", "streams"))
        for c in ("c1", "c16")
    )
    # One untimed warm-up request per connection of each load comes on top.
    assert rows["requests_sent"] > timed
    # The server did the writing: some CPU per request, far less than a request's round trip.
    assert 0 < rows["server_cpu_ms_per_request"] < 1000
    assert (
        rows["requests_sent"]
        == rows["exchanges_counted"]
        == rows["completed_counted"]
        == rows["interceptions"]
        == rows["completed"]
    )
    # Each exchange's interception is upserted twice (start, end), its prompt inserted.
    assert rows["rows_written"] >= 3 * rows["interceptions"] and rows["rows_lost"] == 0
    (verdict,) = (t for t in result["targets"] if t["name"] == report.POSTGRES_ROWS_TARGET)
    assert verdict["met"] is True and verdict["value"] == f"{rows['interceptions']:,} of " + (
        f"{rows['exchanges_counted']:,}"
    )
    assert result["postgres_skipped"] is None
    assert result["machine"]["postgres"]["settings"] == {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }

    proxy_dir = workdir / "postgres"
    database = load_config(proxy_dir / "config.yaml", BENCH_ENV).database
    assert is_postgres(str(database)) and urlsplit(str(database)).password is None
    assert f"AI Bridge: recording to {database}" in (proxy_dir / "mitmdump.log").read_text()
    assert not list(proxy_dir.glob("*.db*"))  # no SQLite file beside it
    # The bridges it is compared with write their own SQLite files.
    sqlite_bridge = load_config(workdir / "aibridge" / "config.yaml", BENCH_ENV).database
    assert not is_postgres(str(sqlite_bridge)) and (workdir / "aibridge" / "aibridge.db").exists()


def assert_metrics_scraped(workdir: Path, scraped: dict) -> None:
    """The bridge with metrics on was scraped while it was measured and counted every
    exchange it recorded; it differs from the bridge it is compared with by its metrics
    only, and no other bridge serves them."""
    proxy_dir = workdir / "metrics"
    assert "AI Bridge: metrics on http://127.0.0.1:" in (proxy_dir / "mitmdump.log").read_text()
    for other in ("aibridge", "limits", "probed"):
        assert "AI Bridge: metrics on" not in (workdir / other / "mitmdump.log").read_text()
    assert not load_config(proxy_dir / "config.yaml", BENCH_ENV).governance.enabled
    c1, c16 = scraped["c1"], scraped["c16"]
    assert c1["scrapes"] >= 1 and c16["scrapes"] >= 1
    # Counted after each concurrency's rounds: its timed requests and the warm-up ones.
    assert c1["scraped_completed"] >= c1["requests"]
    assert c16["scraped_completed"] - c1["scraped_completed"] >= c16["requests"]
    rows = query(
        proxy_dir / "aibridge.db", "select status, count(*) as n from interceptions group by 1"
    )
    assert [(r["status"], r["n"]) for r in rows] == [("completed", c16["scraped_completed"])]


def assert_limits_enforced(proxy_dir: Path, timed_requests: int) -> None:
    governance = load_config(proxy_dir / "config.yaml", BENCH_ENV).governance
    limits = governance.effective("alice")
    # Spend per day and month, tokens per day: alice's own and the group's shared ones.
    budgets = {(b.scope, b.metric, b.period) for b in limits.budgets}
    assert budgets == {
        (scope, metric, period)
        for scope in ("user", "group")
        for metric, period in (("spend_usd", "day"), ("spend_usd", "month"), ("tokens", "day"))
    }
    assert limits.requests_per_minute and limits.concurrent_requests
    assert limits.groups == ("bench-team",)
    # The governor ran: it seeds its totals at start-up only when some limit is configured.
    assert "budgets seeded from the log" in (proxy_dir / "mitmdump.log").read_text()
    rows = query(
        proxy_dir / "aibridge.db",
        "select status, http_status, credential_kind, initiator_id,"
        " json_extract(metadata, '$.limit') as refused_by from interceptions",
    )
    # Warm-up requests are recorded too; none was refused, each paid by the bridge's key
    # (what budgets count).
    assert len(rows) >= timed_requests
    assert {
        (r["status"], r["http_status"], r["credential_kind"], r["initiator_id"], r["refused_by"])
        for r in rows
    } == {("completed", 200, "centralized", "alice", None)}
    # Each was Codex's captured turn, as Codex sent it: its session, its prompt.
    sent = query(
        proxy_dir / "aibridge.db",
        "select i.client_session_id, i.model, i.streaming, p.prompt from interceptions i"
        " left join user_prompts p on p.interception_id = i.id",
    )
    session = captured_codex_headers()["session-id"]
    assert len(sent) == len(rows)
    assert {(r["client_session_id"], r["model"], r["streaming"], r["prompt"]) for r in sent} == {
        (session, "fake-text", 0, CODEX_CAPTURED_PROMPT)
    }
    (used,) = query(proxy_dir / "aibridge.db", "select sum(total_tokens) as n from token_usages")
    # What the run used is far from every budget: nothing was refused or warned about.
    assert 0 < used["n"] < 0.8 * min(b.limit for b in limits.budgets if b.metric == "tokens")


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
        assert row["model"] in QUICK_MODELS
        assert (row["streaming"], row["malformed_events"]) == (1, 0)
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


def assert_chat_recorded(db: Path, workloads: dict[str, list[dict]]) -> None:
    """Each Chat workload's streams recorded, by the row's ``stream_usage`` (the workloads
    of each), with the usage of the upstream call each one was (no interception without its
    usage row)."""
    rows = query(
        db,
        "select i.*, json_extract(i.metadata, '$.stream_usage') as stream_usage,"
        " u.input_tokens, u.uncached_input_tokens, u.cache_read_input_tokens,"
        " u.output_tokens, u.reasoning_tokens, u.total_tokens, p.prompt,"
        " (select count(*) from tool_usages t where t.interception_id = i.id) as tools"
        " from interceptions i"
        " join token_usages u on u.interception_id = i.id"
        " left join user_prompts p on p.interception_id = i.id"
        " where i.api = 'chat_completions'",
    )
    (interceptions,) = query(
        db, "select count(*) as n from interceptions where api = 'chat_completions'"
    )
    assert len(rows) == interceptions["n"]
    calls: set[int] = set()
    for stream_usage, of_it in workloads.items():
        timed = sum(figures[c]["streams"] for figures in of_it for c in ("c1", "c16"))
        # Warm-up requests are recorded too.
        assert sum(1 for r in rows if r["stream_usage"] == stream_usage) >= timed, stream_usage
    for row in rows:
        assert row["stream_usage"] in workloads
        assert (row["provider_name"], row["status"], row["http_status"], row["error"]) == (
            "openai",
            "completed",
            200,
            None,
        )
        assert row["model"] in QUICK_MODELS
        assert (row["response_model"], row["streaming"]) == (row["model"], 1)
        assert row["malformed_events"] == 0 and row["response_id"].startswith("chatcmpl-")
        assert (row["client"], row["client_session_id"]) == ("OpenCode", OPENCODE_SESSION)
        assert (row["prompt"], row["correlating_tool_call_id"], row["tools"]) == (
            OPENCODE_PROMPT,
            None,
            0,
        )
        # The fake's usage for its n-th call (devtools/fake_openai_chat.py), from the usage
        # chunk that ends the stream.
        n, rest = divmod(row["input_tokens"] - 1, 1000)
        assert rest == 0 and n >= 1
        assert (row["cache_read_input_tokens"], row["uncached_input_tokens"]) == (0, 1000 * n + 1)
        assert (row["output_tokens"], row["reasoning_tokens"]) == (7 * n + 5, 0)
        assert row["total_tokens"] == 1007 * n + 6
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


# ---- Codex's captured request --------------------------------------------------------------


@pytest.mark.parametrize(("model", "stream"), [("fake-text", False), ("fake-long-100", True)])
def test_captured_codex_body_is_the_capture_but_for_model_and_stream(
    model: str, stream: bool
) -> None:
    raw = (CODEX_CAPTURED / "turn1.request.json").read_bytes()
    body = captured_codex_body(model, stream=stream)
    assert orjson.loads(body) == {**orjson.loads(raw), "model": model, "stream": stream}
    # Byte for byte past the two members it sets.
    tail = raw.split(b'"stream":true,', 1)[1]
    assert body.endswith(tail) and len(body) - len(tail) < 60
    _, info = openai_responses.parse_request(body)
    assert (info.model, info.stream, info.prompt) == (model, stream, CODEX_CAPTURED_PROMPT)


def test_captured_codex_headers_are_codex_s_but_the_per_request_ones() -> None:
    captured = orjson.loads((CODEX_CAPTURED / "turn1.headers.json").read_bytes())
    headers = captured_codex_headers()
    assert list(headers) == [
        k for k in captured if k not in ("authorization", "host", "content-length")
    ]
    assert all(headers[k] == captured[k] for k in headers)
    assert guess_client(headers["user-agent"], None, headers=headers) == "Codex"
    assert session_id_from_headers(headers) == captured["session-id"]


class CapturingUpstream(socketserver.ThreadingTCPServer):
    """Keeps the bytes of every request it gets (one per connection) and answers 200."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), CapturingHandler)
        self.received: list[bytes] = []


class CapturingHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.request.recv(65536)
        head = data.split(b"\r\n\r\n", 1)[0].lower()
        length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(data) < len(head) + 4 + length:
            data += self.request.recv(65536)
        assert isinstance(self.server, CapturingUpstream)
        self.server.received.append(data)
        self.request.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
            b"connection: close\r\n\r\n{}"
        )


@pytest.mark.parametrize(
    "body", [small_responses_body("fake-text"), captured_codex_body("fake-text", stream=False)]
)
def test_a_direct_call_is_what_plain_mitmdump_forwards(tmp_path: Path, body: bytes) -> None:
    # The added latency compares the two: they must be the same request on the wire.
    upstream = CapturingUpstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = upstream.server_address[1]
    plain = Proxy("plain", tmp_path / "plain", f"http://127.0.0.1:{port}")
    try:
        plain.launch()
        plain.wait_listening()
        # What the bridge forwards carries the provider key in the bridge token's place.
        for credential in (TOKEN, PROVIDER_KEY):
            via_proxy = codex_request_bytes(plain.port, body, credential)
            reply = asyncio.run(one_request("127.0.0.1", plain.port, via_proxy))
            assert reply.status == 200
            assert upstream.received[-1] == codex_request_bytes(port, body, credential)
    finally:
        plain.stop()
        upstream.shutdown()
        upstream.server_close()
    direct = codex_request_bytes(port, body, PROVIDER_KEY)
    assert direct.startswith(b"POST /v1/responses HTTP/1.1\r\n") and direct.endswith(body)
    assert f"authorization: Bearer {PROVIDER_KEY}\r\n".encode() in direct


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


# ---- the Chat Completions workload --------------------------------------------------------


@pytest.mark.parametrize("size", [20_000, 40_000, 60_000, 100_000])
@pytest.mark.parametrize("include_usage", [True, False])
def test_opencode_chat_body_is_opencode_shaped(size: int, include_usage: bool) -> None:
    body = opencode_chat_body("fake-long-1000", size, include_usage=include_usage)
    assert size <= len(body) <= size + 4_000
    obj, info = openai_chat.parse_request(body)
    assert (info.model, info.stream, info.prompt) == ("fake-long-1000", True, OPENCODE_PROMPT)
    assert info.correlating_tool_call_id is None  # a typed prompt, not a tool result
    expected = openai_chat.USAGE_REQUESTED if include_usage else openai_chat.USAGE_NOT_REQUESTED
    assert info.metadata == {"stream_usage": expected}

    # The members in the order OpenCode writes them (its captured requests).
    captured = orjson.loads((OPENCODE_CAPTURED / "tool_turn2.request.json").read_bytes())
    order = list(captured)
    assert list(obj) == (order if include_usage else [k for k in order if k != "stream_options"])
    assert len(obj["tools"]) == 12 and len({t["function"]["name"] for t in obj["tools"]}) == 12
    for tool in obj["tools"]:
        assert tool["type"] == "function"
        schema = tool["function"]["parameters"]
        assert schema["type"] == "object" and schema["$schema"].endswith("2020-12/schema")
        assert set(schema["required"]) <= set(schema["properties"])
    # OpenCode's own tools are among them, with the properties it declares.
    captured_tools = {t["function"]["name"]: t["function"] for t in captured["tools"]}
    ours = {t["function"]["name"]: t["function"] for t in obj["tools"]}
    assert set(captured_tools) <= set(ours)
    for name, spec in captured_tools.items():
        assert set(ours[name]["parameters"]["properties"]) >= set(spec["parameters"]["required"])

    messages = obj["messages"]
    roles = [m["role"] for m in messages]
    turns = (len(roles) - 3) // 2
    assert roles == ["system", "user"] + ["assistant", "tool"] * turns + ["user"]
    assert turns >= 2 and messages[-1]["content"] == OPENCODE_PROMPT
    # A long history: each call answered by its tool message, in order.
    calls = [c for m in messages if m["role"] == "assistant" for c in m["tool_calls"]]
    answered = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert [c["id"] for c in calls] == answered and len(set(answered)) == len(answered)
    for call in calls:
        assert isinstance(orjson.loads(call["function"]["arguments"]), dict)


def test_opencode_chat_body_without_usage_is_what_the_bridge_edits() -> None:
    asked = opencode_chat_body("fake-long-1000", include_usage=True)
    bare = opencode_chat_body("fake-long-1000", include_usage=False)
    assert b"stream_options" not in bare and asked.count(b"stream_options") == 1
    # The bridge's edit: the member inserted first, every other byte as sent.
    amended = openai_chat.with_usage_requested(bare)
    assert amended == b'{"stream_options":{"include_usage":true},' + bare[1:]
    assert openai_chat.with_usage_requested(asked) is None  # nothing to edit
    assert orjson.loads(amended) | {"stream_options": None} == orjson.loads(asked) | {
        "stream_options": None
    }


def test_opencode_chat_body_is_deterministic() -> None:
    assert opencode_chat_body("m", 40_000) == opencode_chat_body("m", 40_000)
    buffered = orjson.loads(opencode_chat_body("m", stream=False))
    assert buffered["stream"] is False and "stream_options" not in buffered


def test_opencode_headers_are_read_as_opencode() -> None:
    headers = OPENCODE_HEADERS
    assert guess_client(headers["user-agent"], None, headers=headers) == "OpenCode"
    assert session_id_from_headers(headers) == OPENCODE_SESSION
    # The headers OpenCode sends, but those the client builds per request.
    captured = orjson.loads((OPENCODE_CAPTURED / "tool_turn2.headers.json").read_bytes())
    per_request = {"authorization", "host", "content-length"}
    assert {name.lower() for name in captured} - per_request == set(headers)
    assert headers["user-agent"] == captured["User-Agent"]


# ---- the bench upstream serves Chat Completions as the fake does --------------------------

_CHAT_VARYING = re.compile(rb'"id":"chatcmpl-[0-9a-f]+"|"created":\d+')


def without_chat_ids(data: bytes) -> bytes:
    """The stream without its random completion id and its creation time (a clock second)."""
    return _CHAT_VARYING.sub(b"", data)


def chat_call_number(stream: bytes) -> int | None:
    """n of the n-th call, from the usage chunk (1000n+1 prompt tokens), if there is one."""
    for block in stream.split(b"\n\n"):
        if block.startswith(b"data: {") and b'"usage":{' in block:
            n, rest = divmod(orjson.loads(block[6:])["usage"]["prompt_tokens"] - 1, 1000)
            assert rest == 0
            return n
    return None


@pytest.mark.parametrize(
    ("events", "path", "extra", "include_usage"),
    [
        (1000, CHAT_PATH, {"x-fake-flush-each": "1"}, True),  # the benchmark's request
        (1000, CHAT_PATH, {"x-fake-flush-each": "1"}, False),  # ... without the option
        (3, "/v1/chat/completions", {"x-fake-flush-each": "1"}, True),  # reverse-proxy path
        (0, "/v1/chat/completions?api-version=2024-10-21", {}, True),  # 64 KiB chunks
        (2000, "/openai/deployments/gpt/chat/completions", {}, False),
    ],
)
def test_bench_upstream_streams_chat_as_the_fake(
    bench_upstream: UpstreamProcess,
    events: int,
    path: str,
    extra: dict[str, str],
    include_usage: bool,
) -> None:
    body = opencode_chat_body(f"fake-long-{events}", 2_000, include_usage=include_usage)
    headers = {**OPENCODE_HEADERS, "authorization": f"Bearer {TOKEN}", **extra}
    status, got_headers, got, chunks = post(bench_upstream, path, body, headers)
    assert status == 200
    assert got_headers["content-type"].startswith("text/event-stream")
    n = chat_call_number(got)
    assert (n is not None) == include_usage
    reply = fake_openai_chat.plan_chat(orjson.loads(body), headers, n or 1)
    assert reply.chunks is not None
    # The fake's bytes, but for the random id and the clock.
    assert without_chat_ids(got) == without_chat_ids(b"".join(reply.chunks))
    assert got.count(b'"delta":{"content":"word "}') == events
    assert got.endswith(b"data: [DONE]\n\n")
    frames = events + 3 + include_usage  # role, deltas, finish, usage if asked, [DONE]
    assert got.count(b"\n\n") == frames
    if extra:  # one chunk per event on the wire, as the benchmark asks
        assert len(chunks) >= frames


def test_bench_upstream_numbers_chat_calls_as_the_fake(bench_upstream: UpstreamProcess) -> None:
    headers = {**OPENCODE_HEADERS, "authorization": f"Bearer {TOKEN}"}
    body = opencode_chat_body("fake-long-2", 2_000)
    _, _, first, _ = post(bench_upstream, CHAT_PATH, body, headers)
    # Refused calls count too, as in FakeUpstream: a 401, a 400 and a streamed one unasked.
    post(bench_upstream, CHAT_PATH, body, {"content-type": "application/json"})
    post(bench_upstream, CHAT_PATH, b"{not json", headers)
    post(bench_upstream, CHAT_PATH, opencode_chat_body("m", 2_000, include_usage=False), headers)
    _, _, second, _ = post(bench_upstream, CHAT_PATH, body, headers)
    n = chat_call_number(first)
    assert n is not None and chat_call_number(second) == n + 4


@pytest.mark.parametrize(
    ("body", "headers", "status", "kind"),
    [
        (b"{not json", {"authorization": "Bearer k"}, 400, "invalid_request_error"),
        (b"[1, 2]", {"authorization": "Bearer k"}, 400, "invalid_request_error"),
        (b"", {"api-key": "k"}, 400, "invalid_request_error"),
        (b'"fake-long-3"', {"api-key": "k"}, 400, "invalid_request_error"),
        # The fake paces fake-slow with time.sleep, which would stall the bench's loop.
        (
            b'{"model": "fake-slow", "stream": true}',
            {"authorization": "Bearer k"},
            400,
            "invalid_request_error",
        ),
        (b'{"model":"fake-slow"}', {"api-key": "k"}, 400, "invalid_request_error"),
        (b'{"model":"fake-slow"}', {}, 400, "invalid_request_error"),
        # Usage asked for on a request that does not stream: OpenAI's 400.
        (
            b'{"model": "fake-long-3", "stream_options": {"include_usage": true}}',
            {"authorization": "Bearer k"},
            400,
            "invalid_request_error",
        ),
        # No credential: the fake's 401, before the body is read.
        (b'{"model": "fake-long-3", "stream": true}', {}, 401, "invalid_request_error"),
        (b"{not json", {"authorization": "Basic k"}, 401, "invalid_request_error"),
        (b"{}", {"authorization": "Bearer  "}, 401, "invalid_request_error"),
        (b'{"model": "fake-429"}', {"authorization": "Bearer k"}, 429, "requests"),
        (b'{"model": "fake-500", "stream": true}', {"api-key": "k"}, 500, "server_error"),
    ],
)
def test_bench_upstream_refuses_chat_as_the_fake(
    bench_upstream: UpstreamProcess, body: bytes, headers: dict[str, str], status: int, kind: str
) -> None:
    got_status, _, got, _ = post(
        bench_upstream, CHAT_PATH, body, {"content-type": "application/json", **headers}
    )
    assert got_status == status
    error = orjson.loads(got)["error"]
    assert error["type"] == kind and error["message"]


# ---- how the benchmark measures ------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_cpu_seconds_counts_threads_that_ended(threads: int) -> None:
    # The metrics server answers each scrape on a thread that is gone when a load is over;
    # its CPU time belongs to the load all the same.
    code = (
        "import sys, threading, time\n"
        "spent = []\n"
        "def burn():\n"
        "    while time.thread_time() < 0.1: pass\n"
        "    spent.append(time.thread_time())\n"
        f"for _ in range({threads}):\n"
        "    t = threading.Thread(target=burn); t.start(); t.join()\n"
        "print(sum(spent), flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        ended = float(child.stdout.readline())  # the threads' CPU, every one of them ended
        assert ended >= 0.1 * threads
        assert cpu_seconds(child.pid) >= ended
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()


# A child of the process below: says it is ready, burns `argv[1]` CPU seconds when told,
# says how many it burned, then exits when told (or at the end of its stdin).
_BURNER = (
    "import sys, time\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "start = time.process_time()\n"
    "while time.process_time() - start < float(sys.argv[1]): pass\n"
    "print(time.process_time() - start, flush=True)\n"
    "sys.stdin.readline()\n"
)
# A stand-in for mitmdump: burns CPU on its main thread, on another thread, in a child whose
# argv names the writer process and in a child that is not a writer; with argv[1] "reap",
# the writer child exits and is waited for before the figures are printed.
_SPLIT_PROCESS = (
    "import json, subprocess, sys, threading, time\n"
    f"BURNER = {_BURNER!r}\n"
    "def child(seconds, *argv):\n"
    "    c = subprocess.Popen([sys.executable, '-c', BURNER, str(seconds), *argv],\n"
    "                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
    "    assert c.stdout.readline() == 'ready\\n'\n"
    "    return c\n"
    f"writer = child(0.15, {WRITER_PROCESS_ARGV.decode()!r}, '--db', 'x.db')\n"
    "other = child(0.3)\n"
    "def burn(seconds):\n"
    "    start = time.thread_time()\n"
    "    while time.thread_time() - start < seconds: pass\n"
    "    return time.thread_time() - start\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "spent = {'loop': burn(0.2)}\n"
    "t = threading.Thread(target=lambda: spent.update(threads=burn(0.1)))\n"
    "t.start(); t.join()\n"
    "for name, c in (('writer', writer), ('other', other)):\n"
    "    c.stdin.write('go\\n'); c.stdin.flush()\n"
    "    spent[name] = float(c.stdout.readline())\n"
    "if sys.argv[1] == 'reap':\n"
    "    writer.stdin.close(); writer.wait()\n"
    "print(json.dumps(spent), flush=True)\n"
    "sys.stdin.readline()\n"
)


@pytest.mark.parametrize("writer_ended", [False, True])
def test_cpu_split_tells_the_loop_other_threads_and_writer_processes_apart(
    writer_ended: bool,
) -> None:
    # CPU seconds (each process's own account of them), not wall-clock time.
    proc = subprocess.Popen(
        [sys.executable, "-c", _SPLIT_PROCESS, "reap" if writer_ended else "keep"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"  # both children started and idle
        before = cpu_split(proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        spent = orjson.loads(proc.stdout.readline())
        used = cpu_split(proc.pid) - before
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # its children's stdin closes with it: all exit
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert spent["loop"] <= used.loop < spent["loop"] + 0.1
    assert spent["threads"] <= used.threads < spent["threads"] + 0.05
    # The writer's CPU, and not the other child's (0.3 s), whether the writer is still
    # running or ended and was waited for (then with the CPU it used starting up, in the
    # parent's clock ticks: its user and system time each rounded down, and scaled).
    ticks = 0.03 if writer_ended else 0.0
    assert spent["writer"] - ticks <= used.writer_processes < spent["writer"] + 0.15
    assert used.total == pytest.approx(used.loop + used.threads + used.writer_processes)


def recording_sides(names: list[str]) -> tuple[dict[str, Any], list[str]]:
    calls: list[str] = []

    def side(name: str) -> Any:
        return lambda: (calls.append(name), {"call": float(len(calls))})[1]

    return {name: side(name) for name in names}, calls


@pytest.mark.parametrize(
    ("names", "rotate", "orders"),
    [
        # The bridge and two variants: each in each place once every three rounds.
        (
            ["baseline", "addon", "limits", "metrics"],
            ("addon", "limits", "metrics"),
            [
                ["baseline", "addon", "limits", "metrics"],
                ["baseline", "limits", "metrics", "addon"],
                ["baseline", "metrics", "addon", "limits"],
                ["baseline", "addon", "limits", "metrics"],
            ],
        ),
        # Two: they trade places every other round.
        (
            ["baseline", "addon", "limits"],
            ("addon", "limits"),
            [["baseline", "addon", "limits"], ["baseline", "limits", "addon"]] * 2,
        ),
        # Sides that rotate need not be next to each other; the others keep their places.
        (
            ["a", "b", "c", "d"],
            ("a", "c"),
            [["a", "b", "c", "d"], ["c", "b", "a", "d"]] * 2,
        ),
        # None rotating: the same order every round.
        (["baseline", "addon"], (), [["baseline", "addon"]] * 4),
    ],
)
def test_alternate_rotates_the_sides_named(
    names: list[str], rotate: tuple[str, ...], orders: list[list[str]]
) -> None:
    sides, calls = recording_sides(names)
    runs = alternate(3, 1, sides, rotate=rotate)
    assert [calls[i : i + len(names)] for i in range(0, len(calls), len(names))] == orders
    # The warm-up round is measured and thrown away: three results per side, in round order.
    assert set(runs) == set(names)
    for name, results in runs.items():
        assert len(results) == 3
        assert [calls[int(r["call"]) - 1] for r in results] == [name] * 3


def synthetic_metrics(skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A result's "metrics" with every number a run produces (1.0, the shifts as below),
    leaving out the workloads in `skip`, as a result from before they were measured."""
    metrics: dict[str, Any] = {}
    for path in METRIC_PATHS:
        if path.split(".", 1)[0] in skip:
            continue
        node = metrics
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        # Counts as in a run.
        node[leaf] = 1 if leaf in ("events", "requests", "body_bytes") else 1.0
    for key, shift, moved in (
        ("buffered_limits", "limits_shift", 0.011),
        ("buffered_metrics", "metrics_shift", -0.031),
        ("buffered_postgres", "postgres_shift", -0.004),
        ("sse_postgres", "postgres_shift", 0.027),
    ):
        if key not in skip:
            for c in ("c1", "c16"):
                metrics[key][c][shift]["ratio_moved"] = moved
    if "postgres_rows" not in skip:
        metrics["postgres_rows"] = dict(LANDED_ALL)
    return metrics


# A bridge on PostgreSQL whose every request landed there.
LANDED_ALL = {
    "server_cpu_ms_per_request": 0.25,
    "requests_sent": 1200,
    "exchanges_counted": 1200,
    "completed_counted": 1200,
    "interceptions": 1200,
    "completed": 1200,
    "rows_written": 4800,
    "rows_lost": 0,
}


def render(metrics: dict[str, Any], **result: Any) -> tuple[list[report.Verdict], str]:
    verdicts = report.verdicts(metrics)
    result = {
        "finished_at": "2026-12-02T00:00:00+00:00",
        "mode": "full",
        "rounds": 5,
        "duration_s": 100.0,
        "machine": report.machine(),
        "metrics": metrics,
        "targets": [v.as_dict() for v in verdicts],
        **result,
    }
    return verdicts, report.results_section(result)


def row_of(section: str, measurement: str) -> str:
    return next(line for line in section.splitlines() if line.startswith(f"| {measurement} |"))


def test_report_renders_the_metrics_variant_beside_the_limits_one() -> None:
    verdicts, section = render(synthetic_metrics())
    met = {v.name: v.met for v in verdicts}
    for label in ("c=1", "c=16"):
        assert met[f"Buffered req/s ratio moved by enforcing limits, {label}"] is True
        assert met[f"Buffered req/s ratio moved by metrics, {label}"] is False
        for side, moved, status in (
            ("limits", "+0.011", "met"),
            ("metrics", "-0.031", "**missed**"),
        ):
            row = next(
                line
                for line in section.splitlines()
                if line.startswith(
                    f"| Buffered, {side} on vs off: req/s ratio moved (rounds from, to), {label} |"
                )
            )
            assert f"| {moved} (+1.000, +1.000) |" in row and row.endswith(
                f"| within 0.02 | {status} |"
            )
    assert (
        "- Missed: Buffered req/s ratio moved by metrics, c=16: -0.031, target within 0.02."
        in section
    )
    assert "/metrics scraped 1 time." in section


WITHOUT_POSTGRES = ("buffered_postgres", "sse_postgres", "postgres_rows")
BEFORE_ISSUE_18 = ("latency", "sse_short", "messages_sse_short", "chat_sse_short")


@pytest.mark.parametrize(
    ("skip", "variants"),
    [
        (("buffered_metrics",), ("limits", "postgres")),  # before metrics were measured
        (("buffered_limits",), ("metrics", "postgres")),
        # Before PostgreSQL, or a run where it is not installed.
        (WITHOUT_POSTGRES, ("limits", "metrics")),
        # Before limits, Messages and Chat (bench/results of 2026-12-01 looked so).
        (
            (
                "buffered_limits",
                "buffered_metrics",
                "messages_sse",
                "chat_sse",
                "chat_sse_usage_added",
                *BEFORE_ISSUE_18,
                *WITHOUT_POSTGRES,
            ),
            (),
        ),
        # Before the added latency and short streams (2026-12-02).
        (BEFORE_ISSUE_18, ("limits", "metrics", "postgres")),
    ],
)
def test_report_renders_results_from_before_a_variant(
    skip: tuple[str, ...], variants: tuple[str, ...]
) -> None:
    verdicts, section = render(synthetic_metrics(skip))
    for side, moved_by in (
        ("limits", "enforcing limits"),
        ("metrics", "metrics"),
        ("postgres", "PostgreSQL as the store"),
    ):
        wanted = side in variants
        assert (f"| Buffered, {side} on: req/s, {BUFFERED_BODY}, c=16 |" in section) is wanted
        assert (
            any(v.name == f"Buffered req/s ratio moved by {moved_by}, c=1" for v in verdicts)
            is wanted
        )
    wanted = "postgres" in variants
    assert ("| SSE, postgres on: events/s, 1-event stream, c=1 |" in section) is wanted
    assert ("PostgreSQL store:" in section) is wanted
    assert (report.POSTGRES_ROWS_TARGET in {v.name for v in verdicts}) is wanted
    assert f"| Buffered req/s, {BUFFERED_BODY}, c=16 |" in section
    assert "| SSE events/s, 1-event stream, c=16 |" in section
    new = not set(BEFORE_ISSUE_18) & set(skip)
    assert ("| Latency added per request p50 / mean, small body:" in section) is new
    assert ("| Short SSE events/s, 1-event stream, c=1 |" in section) is new
    assert any(v.name.startswith("Latency the addon adds") for v in verdicts) is new


def test_report_renders_results_from_before_the_cpu_split() -> None:
    metrics = synthetic_metrics(BEFORE_ISSUE_18)
    for key, _ in report.ALL_SSE_WORKLOADS:
        for c in ("c1", "c16"):
            if key in metrics:
                for side in ("baseline", "addon"):
                    for k in report.SSE_CPU_SPLIT:
                        del metrics[key][c][side][k]
    for c in ("c1", "c16"):
        for side in ("baseline", "addon"):
            for k in report.BUFFERED_CPU_SPLIT:
                del metrics["buffered"][c][side][k]
    verdicts, section = render(metrics)
    assert "event loop" not in section
    assert "| Buffered mitmdump CPU per request, c=16 | 1.00x | 1.00 ms | 1.00 ms |" in section
    assert not any("event loop" in v.reason for v in verdicts)


def latency_runs(direct: list[float], plain: list[float], addon: list[float]) -> dict[str, Any]:
    """Rounds of the three sides with these p50s; each mean 1 ms above its p50."""
    return {
        side: [{"p50_ms": p50, "mean_ms": p50 + 1} for p50 in p50s]
        for side, p50s in (("direct", direct), ("plain", plain), ("addon", addon))
    }


def test_added_latency_is_the_median_of_each_round_s_difference() -> None:
    # The machine slows down over the rounds: each round's difference is what counts.
    runs = latency_runs([0.1, 1.1, 2.1], [1.4, 2.5, 3.3], [1.6, 2.8, 3.9])
    lat = report.added_latency(runs)
    assert lat["direct"] == {"p50_ms": 1.1, "mean_ms": 2.1}
    assert lat["plain_added_p50_ms"] == pytest.approx(1.3)  # of 1.3, 1.4, 1.2
    assert lat["addon_added_p50_ms"] == pytest.approx(0.3)  # of 0.2, 0.3, 0.6
    assert lat["addon_added_mean_ms"] == pytest.approx(0.3)
    # The difference of the medians would say 0.3 too here; with a drift it does not.
    runs = latency_runs([0.1, 1.1, 2.1], [1.4, 2.4, 3.4], [1.5, 3.9, 3.6])
    lat = report.added_latency(runs)
    assert lat["addon_added_p50_ms"] == pytest.approx(0.2)  # of 0.1, 1.5, 0.2
    assert lat["addon"]["p50_ms"] - lat["plain"]["p50_ms"] == pytest.approx(1.2)
    assert lat["ratio_p50"] == pytest.approx(1.5 / 1.4)  # of 1.5 / 1.4, 3.9 / 2.4, 3.6 / 3.4
    assert lat["rounds"] == 3 and lat["per_round"] == runs


@pytest.mark.parametrize(("small", "codex"), [(0.25, 0.35), (0.31, 0.3)])
def test_report_judges_the_addon_s_share_of_the_latency(small: float, codex: float) -> None:
    metrics = synthetic_metrics()
    metrics["latency"]["requests"] = 200
    metrics["latency"]["small"].update(
        addon_added_p50_ms=small, plain_added_p50_ms=1.3, body_bytes=147
    )
    metrics["latency"]["codex"]["addon_added_p50_ms"] = codex
    verdicts, section = render(metrics)
    by_name = {v.name: v for v in verdicts}
    for body, added in (("small body", small), ("captured Codex 40 KB body", codex)):
        verdict = by_name[f"Latency the addon adds over plain mitmdump, sequential, {body}"]
        assert (verdict.target, verdict.value) == ("<= 0.3 ms", f"{added:+.2f} ms")
        assert verdict.met is (added <= 0.3)
        row = row_of(
            section,
            f"Latency added per request p50 / mean, {body}: the addon over plain mitmdump "
            "(plain mitmdump over a direct call)",
        )
        assert row.endswith(f"| <= 0.3 ms | {'met' if added <= 0.3 else '**missed**'} |")
    row = row_of(
        section,
        "Latency per request p50 / mean, sequential on one keep-alive connection, small body "
        "(147 bytes), 200 requests",
    )
    assert row.endswith(
        "| 1.00x | 1.00 / 1.00 ms | plain 1.00 / 1.00 ms; direct 1.00 / 1.00 ms |  |  |"
    )
    assert (
        "plain mitmdump 1.00 ms (+1.30)"
        in by_name["Latency the addon adds over plain mitmdump, sequential, small body"].reason
    )


def test_report_judges_short_streams_against_their_own_target() -> None:
    metrics = synthetic_metrics()
    for key in ("sse", "sse_short", "chat_sse_short"):
        metrics[key]["c16"]["ratio"]["events_per_s"] = 0.92
    metrics["messages_sse_short"]["c1"]["ratio"]["events_per_s"] = 0.89
    metrics["buffered"]["c16"]["ratio"]["req_per_s"] = 0.885
    verdicts, section = render(metrics)
    by_name = {v.name: v for v in verdicts}
    assert not by_name["SSE events/s vs stream-only mitmdump, c=16"].met
    for title in ("Short SSE", "Short Chat SSE"):
        verdict = by_name[f"{title} events/s vs stream-only mitmdump, c=16"]
        assert (verdict.target, verdict.value, verdict.met) == (">= 0.90x", "0.92x", True)
    assert not by_name["Short Messages SSE events/s vs stream-only mitmdump, c=1"].met
    buffered = by_name[f"Buffered req/s vs plain mitmdump, c=16, {BUFFERED_BODY}"]
    assert (buffered.target, buffered.met) == (">= 0.88x", True)
    row = row_of(section, "Short Chat SSE events/s, 1-event stream, c=16")
    assert row.endswith("| 0.92x | 1 | 1 | >= 0.90x | met |")
    row = row_of(section, "SSE events/s, 1-event stream, c=16")
    assert row.endswith("| 0.92x | 1 | 1 | >= 0.95x | **missed** |")


def test_report_splits_mitmdump_s_cpu_by_where_it_is_spent() -> None:
    metrics = synthetic_metrics()
    buffered = metrics["buffered"]["c16"]
    buffered["ratio"]["cpu_loop_ms_per_req"] = 1.31
    buffered["addon"].update(
        cpu_loop_ms_per_req=1.4, cpu_threads_ms_per_req=0.012, cpu_writer_process_ms_per_req=0.25
    )
    buffered["baseline"].update(
        cpu_loop_ms_per_req=1.07, cpu_threads_ms_per_req=-0.00001, cpu_writer_process_ms_per_req=0
    )
    buffered["ratio"]["req_per_s"] = 0.7
    metrics["chat_sse_short"]["c1"]["addon"]["cpu_writer_process_ms_per_1k_events"] = 12.345
    verdicts, section = render(metrics)
    row = row_of(
        section, "Buffered CPU per request: event loop / other threads / writer processes, c=16"
    )
    assert row.endswith(
        "| 1.31x on the loop | 1.400 / 0.012 / 0.250 ms | 1.070 / 0.000 / 0.000 ms |  |  |"
    )
    row = row_of(
        section,
        "Short Chat SSE CPU per 1,000 events: event loop / other threads / writer processes, c=1",
    )
    assert "| 1.00 / 1.00 / 12.35 ms | 1.00 / 1.00 / 1.00 ms |" in row
    (missed,) = (v for v in verdicts if v.name.startswith("Buffered req/s vs plain mitmdump"))
    assert (
        "of it, on the event loop +0.330 ms, other threads +0.012 ms, writer processes "
        "+0.250 ms" in missed.reason
    )


def test_report_renders_postgres_beside_the_sqlite_bridge() -> None:
    metrics = synthetic_metrics()
    metrics["sse"]["c1"]["ratio"]["events_per_s"] = 0.86
    metrics["sse_postgres"]["c1"]["ratio"]["events_per_s"] = 0.83
    metrics["sse_postgres"]["c1"]["postgres_shift"]["cpu_ms_per_1k_events_added"] = 1.234
    metrics["buffered"]["c16"]["ratio"]["req_per_s"] = 0.80
    metrics["buffered_postgres"]["c16"]["ratio"]["req_per_s"] = 0.79
    verdicts, section = render(metrics)
    by_name = {v.name: v for v in verdicts}
    for label in ("c=1", "c=16"):
        assert by_name[f"Buffered req/s ratio moved by PostgreSQL as the store, {label}"].met
        assert not by_name[f"SSE events/s ratio moved by PostgreSQL as the store, {label}"].met
    # Both ratios stated, the SQLite bridge's as "off".
    sse = by_name["SSE events/s ratio moved by PostgreSQL as the store, c=1"]
    assert (sse.target, sse.value) == ("within 0.02", "+0.027")
    assert "0.83x with postgres on, 0.86x off" in sse.reason
    assert "+1.23 ms CPU per 1,000 events with postgres on" in sse.reason
    buffered = by_name["Buffered req/s ratio moved by PostgreSQL as the store, c=16"]
    assert "0.79x with postgres on, 0.80x off" in buffered.reason
    row = row_of(section, "SSE, postgres on vs off: events/s ratio moved (rounds from, to), c=1")
    assert "| +0.027 (+1.000, +1.000) |" in row and row.endswith("| within 0.02 | **missed** |")
    row = row_of(section, "SSE, postgres on: events/s, 1-event stream, c=1")
    assert row.startswith("| SSE, postgres on: events/s, 1-event stream, c=1 | 0.83x | 1 | 1 |")
    row = row_of(section, "Buffered, postgres on vs off: req/s ratio moved (rounds from, to), c=16")
    assert "| -0.004 (+1.000, +1.000) |" in row and row.endswith("| within 0.02 | met |")
    # The PostgreSQL rows of each workload follow the SQLite bridge's own.
    lines = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ")]
    at = lines.index("| SSE mitmdump CPU per 1,000 events, c=1")
    split = "| SSE CPU per 1,000 events: event loop / other threads / writer processes, c=1"
    assert lines[at + 1 : at + 5] == [
        split,
        "| SSE, postgres on: events/s, 1-event stream, c=1",
        "| SSE, postgres on vs off: events/s ratio moved (rounds from, to), c=1",
        "| SSE, postgres on vs off: mitmdump CPU per 1,000 events, c=1",
    ]
    assert "- Missed: SSE events/s ratio moved by PostgreSQL as the store, c=16: +0.027" in section


@pytest.mark.parametrize(
    ("changed", "met"),
    [
        ({}, True),
        ({"requests_sent": 1201}, False),  # a request the bridge did not count
        ({"interceptions": 1199, "completed": 1199}, False),  # an exchange not in PostgreSQL
        ({"interceptions": 1201}, False),  # a row more than the bridge counted
        ({"completed": 1199}, False),  # in PostgreSQL, but not completed
        ({"completed_counted": 1198}, False),  # the bridge saw two fail
        ({"exchanges_counted": 1201, "completed_counted": 1201}, False),
        ({"rows_lost": 1}, False),  # every interception there, another row lost
        ({"rows_lost": 37, "rows_written": 4763}, False),
    ],
)
def test_report_judges_what_landed_in_postgres(changed: dict[str, int], met: bool) -> None:
    metrics = synthetic_metrics()
    metrics["postgres_rows"].update(changed)
    rows = metrics["postgres_rows"]
    verdicts, section = render(metrics)
    (verdict,) = (v for v in verdicts if v.name == report.POSTGRES_ROWS_TARGET)
    assert verdict.met is met and report.postgres_rows_met(rows) is met
    landed = f"{rows['interceptions']:,} of {rows['exchanges_counted']:,}"
    assert verdict.value == landed
    assert f"{rows['rows_lost']:,} lost" in verdict.reason
    assert f"{rows['requests_sent']:,} requests sent to it" in verdict.reason
    row = row_of(
        section,
        "PostgreSQL store: interceptions in the database, of the exchanges the bridge counted",
    )
    assert row.endswith(
        f"|  | {landed} | {rows['requests_sent']:,} requests sent | all | "
        f"{'met' if met else '**missed**'} |"
    )
    missed = f"- Missed: {report.POSTGRES_ROWS_TARGET}: {landed}, target all."
    assert (missed in section) is not met


def test_report_says_why_postgres_was_not_measured() -> None:
    reason = "PostgreSQL binaries not found (apt-get install -y postgresql)"
    _, section = render(synthetic_metrics(WITHOUT_POSTGRES), postgres_skipped=reason)
    assert f"\n\nPostgreSQL not measured: {reason}.\n\n| Measurement |" in section
    assert "postgres" not in section.replace(f"PostgreSQL not measured: {reason}", "").lower()
    # A run that measured it names the server and the settings a commit's cost depends on.
    machine = {
        **report.machine(),
        "postgres": {
            "version": "15.18",
            "settings": {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
        },
    }
    _, section = render(synthetic_metrics(), machine=machine, postgres_skipped=None)
    assert (
        ", PostgreSQL 15.18 (fsync=off, synchronous_commit=off, full_page_writes=off); " in section
    )
    assert "not measured" not in section


# ---- the PostgreSQL variant ------------------------------------------------------------------


@pytest.mark.parametrize(
    "totals",
    [
        {},
        {"completed": 1},
        {"completed": 12_000, "error": 300, "client_disconnected": 45},
        {"rejected": 123_456, "completed": 1},
    ],
)
@pytest.mark.parametrize(("written", "lost"), [(0, 0), (1, 0), (4_800, 1), (1_000_000, 12_345)])
def test_shutdown_summary_reads_what_the_bridge_counted(
    totals: dict[str, int], written: int, lost: int
) -> None:
    tally = ExchangeTally()
    for status, n in totals.items():
        for _ in range(n):
            tally.add(status)
    line = tally.summary({"written": written, "dropped": lost})
    other = "[03:20:14.820] AI Bridge: 1 user(s), providers: openai (http://127.0.0.1:1/v1)"
    earlier = ExchangeTally().summary({"written": 7, "dropped": 0})  # a start before
    log = f"{earlier}\n{other}\n[03:20:23.906] {line}\n[03:20:23.910] HTTP(S) proxy stopped\n"
    assert postgres.shutdown_summary(log) == {
        "exchanges": sum(totals.values()),
        "by_status": totals,
        "rows_written": written,
        "rows_lost": lost,
    }


@pytest.mark.parametrize(
    "log",
    [
        "",
        "[03:20:14.820] AI Bridge: recording to postgresql://aibridge@127.0.0.1:5/aibridge_bench\n",
        # A bridge without a recorder says nothing of rows: nothing was written.
        ExchangeTally().summary(None),
        "AI Bridge: 3 exchanges (3 completed)\n",
        "AI Bridge: 3 exchanges (3 completed); 12 rows wr",  # cut off by a kill
    ],
)
def test_shutdown_summary_is_none_without_one(log: str) -> None:
    assert postgres.shutdown_summary(log) is None


def test_bridge_on_postgres_gets_its_password_only_in_its_environment(tmp_path: Path) -> None:
    secret = "pw-in-env-only-%40:@/"
    url = "postgresql://aibridge@127.0.0.1:5432/aibridge_bench"
    proxy = Proxy(
        "aibridge+postgres",
        tmp_path / "postgres",
        "http://127.0.0.1:9",
        bridge=True,
        database=url,
        env={"PGPASSWORD": secret},
    )
    proxy.workdir.mkdir()
    args = proxy.args()
    config = (proxy.workdir / "config.yaml").read_text()
    assert secret not in " ".join(args) and secret not in config
    assert load_config(proxy.workdir / "config.yaml", BENCH_ENV).database == url
    # The URL is the bridge's `database`: no --set aibridge_db overrides it.
    assert not any(arg.startswith("aibridge_db=") for arg in args)
    assert proxy.env == {"PGPASSWORD": secret}
    # The other bridges keep their own SQLite files.
    sqlite = Proxy("aibridge", tmp_path / "aibridge", "http://127.0.0.1:9", bridge=True)
    sqlite.workdir.mkdir()
    assert f"aibridge_db={sqlite.db_path}" in sqlite.args()
    assert "PGPASSWORD" not in sqlite.env


def refuse_to_start() -> Any:
    raise postgres.NotStarted("initdb exited with 1: could not create directory")


@pytest.mark.parametrize(
    ("unavailable", "started", "reason"),
    [
        (
            lambda: "PostgreSQL binaries not found (apt-get install -y postgresql)",
            None,
            "PostgreSQL binaries not found (apt-get install -y postgresql)",
        ),
        (
            lambda: "cannot import the PostgreSQL harness (No module named 'psycopg')",
            None,
            "cannot import the PostgreSQL harness (No module named 'psycopg')",
        ),
        (
            lambda: None,
            refuse_to_start,
            "the PostgreSQL server did not start: initdb exited with 1: could not create directory",
        ),
    ],
)
@pytest.mark.parametrize("required", [False, True])
def test_no_postgres_leaves_the_variant_out_unless_required(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    unavailable: Any,
    started: Any,
    reason: str,
    required: bool,
) -> None:
    monkeypatch.setattr(postgres, "unavailable", unavailable)
    if started is not None:
        monkeypatch.setattr(postgres, "started", started)
    with contextlib.ExitStack() as stack:
        if required:
            with pytest.raises(BenchError, match="--require-postgres") as raised:
                start_postgres(stack, required=True)
            assert reason in str(raised.value)
        else:
            assert start_postgres(stack, required=False) == (None, reason)
            assert f"PostgreSQL not measured: {reason}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("total", "concurrency", "warmup", "warmups"),
    [(5, 1, True, 1), (16, 16, True, 16), (3, 16, True, 3), (16, 16, False, 0)],
)
def test_a_load_counts_its_warmup_requests(
    bench_upstream: UpstreamProcess, total: int, concurrency: int, warmup: bool, warmups: int
) -> None:
    url = urlsplit(bench_upstream.url)
    host, port = url.hostname or "", url.port or 0
    body = orjson.dumps({"model": "fake-text", "input": "hi"})
    raw = build_request(host, port, "/v1/responses", body, {"authorization": "Bearer x"})
    result = asyncio.run(run_load(host, port, [raw], total, concurrency, warmup=warmup))
    assert len(result.replies) == total and result.ok == total
    assert result.warmups == warmups


# ---- the scraper -----------------------------------------------------------------------------


@pytest.fixture
def metrics_server() -> Iterator[tuple[Metrics, int]]:
    metrics = Metrics(version="bench-test")
    server = MetricsServer(metrics, lambda: (200, {"status": "ok"}))
    server.start("127.0.0.1", 0)
    try:
        yield metrics, server.address[1]
    finally:
        server.stop()


def test_scraper_reads_the_bridges_exposition(metrics_server: tuple[Metrics, int]) -> None:
    metrics, port = metrics_server
    scraper = Scraper("127.0.0.1", port)
    assert interceptions(scraper.scrape(), "completed") == 0
    for n, (model, status) in enumerate(
        [("m1", "completed"), ("m2", "completed"), ("m1", "error"), ("m3", "completed")]
    ):
        labels = ExchangeLabels("openai", "responses", model, "Codex", f"user{n}")
        metrics.started(labels)
        metrics.finished(labels, status, 0.5, {"input": 10}, 1, 0)
    text = scraper.scrape()
    assert interceptions(text, "completed") == 3 and interceptions(text, "error") == 1
    assert interceptions(text, "rejected") == 0
    # The block scrapes once at least, however short it is.
    with Scraper("127.0.0.1", port, every=60) as scraping:
        pass
    assert scraping.scrapes == 1 and scraping.errors == []


_OPENMETRICS = b"# TYPE x counter\nx_total 1.0\n# EOF\n"


def answer(status: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body) if length is None else length}"]
    return ("\r\n".join([*head, *headers]) + "\r\n\r\n").encode() + body


class CannedServer(socketserver.ThreadingTCPServer):
    """Answers every connection with the same bytes (None: reads the request, says nothing
    until the client gives up) and closes it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.done = threading.Event()
        super().__init__(("127.0.0.1", 0), CannedHandler)


class CannedHandler(socketserver.BaseRequestHandler):
    server: CannedServer

    def handle(self) -> None:
        self.request.recv(65536)
        if self.server.reply is None:
            self.server.done.wait(30)
        else:
            self.request.sendall(self.server.reply)


@pytest.mark.parametrize(
    "reply",
    [
        answer("404 Not Found", b"not found\n"),
        answer("500 Internal Server Error", b"error: boom\n"),
        answer("503 Service Unavailable", b""),
        answer("301 Moved Permanently", b"", "Location: /other"),
        # The Prometheus text format (what a scraper that asks for nothing gets).
        answer("200 OK", b"# TYPE x counter\nx_total 1.0\n", "Content-Type: text/plain"),
        answer("200 OK", _OPENMETRICS[:-6]),  # cut before "# EOF"
        answer("200 OK", _OPENMETRICS, length=len(_OPENMETRICS) + 100),  # closed mid-body
        answer("200 OK", _OPENMETRICS, "Content-Encoding: gzip"),  # not gzip
        answer("200 OK", gzip.compress(_OPENMETRICS)[:-12], "Content-Encoding: gzip"),
        answer("200 OK", b"\xff\xfe" + _OPENMETRICS),  # not UTF-8
        answer("200 OK", b""),
        b"",  # closed without an answer
        b"SSH-2.0-OpenSSH_9.2\r\n",  # something else listening
        b"HTTP/1.1 two hundred OK\r\n\r\n",
        None,  # no answer at all
    ],
)
def test_scraper_fails_on_what_is_no_exposition(reply: bytes | None) -> None:
    server = CannedServer(reply)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with pytest.raises(ScrapeError, match="GET /metrics"):
            Scraper("127.0.0.1", port, timeout=0.5).scrape()
        # Inside a block, failures are counted out and the first is raised at its end.
        with (
            pytest.raises(ScrapeError, match="scrapes failed"),
            Scraper("127.0.0.1", port, every=60, timeout=0.5) as scraping,
        ):
            pass
        assert scraping.scrapes == 0 and len(scraping.errors) == 1
    finally:
        server.done.set()
        server.shutdown()
        server.server_close()
        thread.join()


def test_scraper_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ScrapeError, match="ConnectionRefusedError"):
            Scraper("127.0.0.1", port).scrape()
