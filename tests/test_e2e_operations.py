"""Operations end to end (issue 15): a real mitmdump running addon.py with its metrics port, a
real Prometheus server scraping it, the real `openai` and `anthropic` SDKs as clients, fake
upstreams, and values read back through Prometheus' HTTP query API after a known set of
exchanges. Also: a provider answering 503 trips the circuit breaker and recovers; a key
answered 429 is skipped on the next request; the health check on both ports."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from aibridge.config import hint
from devtools.fake_upstream import FakeUpstream
from tests.harness import TOKENS as HARNESS_TOKENS
from tests.harness import LoopbackHTTP, Mitmdump, bridge_config, query, wait_for
from tests.prometheus_server import Prometheus, free_port, prometheus_binary

pytestmark = pytest.mark.timeout(300)

SAFETY = 30.0  # upper bound for waits and client timeouts; never asserted as a duration
TOKENS = {"alice": "alice-ops-token-0123456789", "bob": "bob-ops-token-0123456789"}
PARKED_KEY = "sk-ops-key-that-gets-429-aaaaaaaa"
SPARE_KEY = "sk-ops-key-that-answers-bbbbbbbb"
FLAKY_KEY = "sk-ops-flaky-provider-key-cccccccc"


def responses_body(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": f"resp_{time.monotonic_ns()}",
            "object": "response",
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "fine", "annotations": []}],
                }
            ],
            "usage": {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12},
        }
    )


class ScriptedUpstream(LoopbackHTTP):
    """A Responses provider that answers 503 while ``failing`` is set, 429 (Retry-After 60) to
    ``PARKED_KEY``, and a small completed response otherwise; it notes the key of every
    request it saw."""

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.keys_seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                request = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
                key = self.headers.get("authorization", "").removeprefix("Bearer ")
                outer.keys_seen.append(key)
                if outer.failing.is_set():
                    self._send(503, b'{"error":{"message":"overloaded","type":"server_error"}}')
                elif key == PARKED_KEY:
                    body = b'{"error":{"message":"slow down","type":"rate_limit_exceeded"}}'
                    self._send(429, body, {"retry-after": "60"})
                else:
                    self._send(200, responses_body(request["model"]))

            def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def bridge(
    upstream: FakeUpstream,
    scripted: ScriptedUpstream,
    metrics_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Mitmdump]:
    config = bridge_config(
        upstream.url,
        users=[{"id": user, "token": token} for user, token in TOKENS.items()],
        circuit_breaker={"failures": 2, "cool_down_seconds": 1},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )
    config["providers"] += [
        {
            "name": "anthropic",
            "type": "anthropic",
            "base_url": f"{upstream.url}/v1",
            "api_key": "${TEST_PROVIDER_KEY}",
        },
        {
            "name": "pooled",
            "type": "openai",
            "base_url": f"{scripted.url}/v1",
            "api_key": [PARKED_KEY, SPARE_KEY],
        },
        {
            "name": "flaky",
            "type": "openai",
            "base_url": f"{scripted.url}/v1",
            "api_key": FLAKY_KEY,
        },
    ]
    with Mitmdump(tmp_path_factory.mktemp("operations"), config) as proc:
        yield proc


@pytest.fixture(scope="module")
def prometheus(
    bridge: Mitmdump, metrics_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    with Prometheus(
        prometheus_binary(), tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{metrics_port}"]
    ) as server:
        yield server


def openai_sdk(bridge: Mitmdump, provider: str = "openai", user: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{bridge.url}/{provider}/v1",
        api_key=TOKENS.get(user, user),
        max_retries=0,
        timeout=SAFETY,
    )


def responses_call(bridge: Mitmdump, provider: str) -> httpx.Response:
    """A raw Responses call, for status codes and headers."""
    return httpx.post(
        f"{bridge.url}/{provider}/v1/responses",
        headers={"authorization": f"Bearer {TOKENS['alice']}"},
        json={"model": "ops-model", "input": "hello"},
        timeout=SAFETY,
    )


def total(prometheus: Prometheus, expr: str) -> float:
    samples = prometheus.query(f"sum({expr})")
    return samples[0][1] if samples else 0.0


def test_prometheus_reads_the_counts_of_a_known_set_of_exchanges(
    bridge: Mitmdump, prometheus: Prometheus
) -> None:
    client = openai_sdk(bridge)
    for _ in range(2):
        client.responses.create(model="fake-text", input="count me")
    with client.responses.create(model="fake-text", input="count me too", stream=True) as s:
        for _ in s:
            pass
    client.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "count me, chat"}]
    )
    anthropic.Anthropic(
        base_url=f"{bridge.url}/anthropic", api_key=TOKENS["bob"], max_retries=0, timeout=SAFETY
    ).messages.create(
        model="claude-sonnet-4-5",
        max_tokens=32,
        messages=[{"role": "user", "content": "count me, messages"}],
    )
    with pytest.raises(openai.AuthenticationError):
        openai_sdk(bridge, user="not-a-bridge-token").responses.create(model="fake-text", input="x")
    models = httpx.get(
        f"{bridge.url}/openai/v1/models",
        headers={"authorization": f"Bearer {TOKENS['alice']}"},
        timeout=SAFETY,
    )
    wait_for(
        lambda: (
            len(bridge.rows("interceptions")) >= 6
            and all(r["ended_at"] for r in bridge.rows("interceptions"))
        ),
        SAFETY,
    )

    interceptions = 'aibridge_interceptions_total{provider="openai"}'
    prometheus.wait_for(
        f"sum({interceptions})", lambda samples: bool(samples) and samples[0][1] >= 5, SAFETY
    )
    prometheus.wait_scraped_after(time.time(), SAFETY)  # everything above is in
    by = prometheus.query("sum by (provider, api, status, client) (aibridge_interceptions_total)")
    counts = {(labels["provider"], labels["api"], labels["status"]): value for labels, value in by}
    assert counts == {
        ("openai", "responses", "completed"): 3,
        ("openai", "chat_completions", "completed"): 1,
        ("anthropic", "messages", "completed"): 1,
        ("openai", "responses", "rejected"): 1,
    }
    assert {labels["client"] for labels, _ in by} >= {"openai-python", "anthropic-python"}
    assert total(prometheus, 'aibridge_rejections_total{reason="unauthenticated"}') == 1
    assert "user" not in by[0][0]  # no per-person label unless configured
    assert total(prometheus, "aibridge_prompts_total") == 5
    assert total(prometheus, "aibridge_interceptions_inflight") == 0
    assert total(prometheus, "aibridge_interceptions_duration_seconds_count") == 5
    passthrough = prometheus.query("aibridge_passthrough_total")
    assert [(s[0]["provider"], s[0]["method"], s[0]["status"], s[1]) for s in passthrough] == [
        ("openai", "GET", str(models.status_code), 1)
    ]

    # The tokens Prometheus counts are the tokens the log holds.
    usage = query(
        bridge.db_path,
        "select sum(input_tokens) i, sum(output_tokens) o, sum(cache_read_input_tokens) c "
        "from token_usages",
    )[0]
    assert total(prometheus, 'aibridge_tokens_total{type="output"}') == usage["o"] > 0
    all_input = 'aibridge_tokens_total{type=~"input|cache_read|cache_write"}'
    assert total(prometheus, all_input) == usage["i"] > 0
    assert total(prometheus, 'aibridge_tokens_total{type="cache_read"}') == (usage["c"] or 0)

    written = total(prometheus, "aibridge_recorder_rows_written_total")
    assert written >= 6 + 5  # interceptions and their prompts at least
    assert total(prometheus, "aibridge_recorder_losses_total") == 0
    assert total(prometheus, "aibridge_recorder_queue_rows") == 0
    (info,) = prometheus.query("aibridge_build_info")
    assert info[0]["version"] and info[1] == 1


def test_a_key_answered_429_is_skipped_on_the_next_request(
    bridge: Mitmdump, scripted: ScriptedUpstream, prometheus: Prometheus
) -> None:
    scripted.keys_seen.clear()
    statuses = [responses_call(bridge, "pooled").status_code for _ in range(3)]
    assert statuses == [429, 200, 200]  # upstream's 429 reaches the client as it was sent
    assert scripted.keys_seen == [PARKED_KEY, SPARE_KEY, SPARE_KEY]

    def pooled_rows() -> list[dict[str, Any]]:
        return query(
            bridge.db_path,
            "select credential_hint, http_status from interceptions "
            "where provider_name = 'pooled' and ended_at is not null order by started_at",
        )

    rows = wait_for(lambda: len(pooled_rows()) == 3 and pooled_rows(), SAFETY)
    assert [(r["credential_hint"], r["http_status"]) for r in rows] == [
        (hint(PARKED_KEY), 429),
        (hint(SPARE_KEY), 200),
        (hint(SPARE_KEY), 200),
    ]
    assert PARKED_KEY not in bridge.log() and SPARE_KEY not in bridge.log()
    assert "key 1 (sk-o...aaaa) of provider 'pooled' answered 429: parked for 60 s" in bridge.log()

    states = prometheus.wait_for(
        'aibridge_key_pool_key_state{provider="pooled"} == 1',
        lambda samples: len(samples) == 2 and any(s[0]["state"] == "parked" for s in samples),
        SAFETY,
    )
    assert sorted((s[0]["key"], s[0]["hint"], s[0]["state"]) for s in states) == [
        ("1", hint(PARKED_KEY), "parked"),
        ("2", hint(SPARE_KEY), "active"),
    ]
    assert total(prometheus, 'aibridge_key_pool_parks_total{provider="pooled"}') == 1


def test_a_failing_provider_trips_the_breaker_and_recovers(
    bridge: Mitmdump, scripted: ScriptedUpstream, prometheus: Prometheus, metrics_port: int
) -> None:
    scripted.failing.set()
    try:
        seen_before = len(scripted.keys_seen)
        first, second = (responses_call(bridge, "flaky") for _ in range(2))
        assert (first.status_code, second.status_code) == (503, 503)
        assert "x-aibridge-error" not in first.headers  # upstream's own answers
        refused = responses_call(bridge, "flaky")
        assert refused.status_code == 503 and refused.headers["x-aibridge-error"] == "1"
        assert int(refused.headers["retry-after"]) >= 1
        message = refused.json()["error"]["message"]
        assert "circuit breaker" in message and "answered 503 to the last 2 requests" in message
        assert len(scripted.keys_seen) == seen_before + 2  # the refused one never left
        health = httpx.get(f"http://127.0.0.1:{metrics_port}/_aibridge/health", timeout=SAFETY)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "flaky" in health.json()["providers"]
    finally:
        scripted.failing.clear()

    def recovered() -> bool:
        return responses_call(bridge, "flaky").status_code == 200

    wait_for(recovered, SAFETY, interval=0.2)  # once the cool-down is over, a trial closes it
    assert responses_call(bridge, "flaky").status_code == 200
    rejected = query(
        bridge.db_path,
        "select metadata from interceptions where provider_name = 'flaky' and status = 'rejected'",
    )
    assert rejected and all(
        orjson.loads(r["metadata"])["upstream"]["refused_by"] == "circuit_breaker" for r in rejected
    )
    assert "circuit opened for provider 'flaky', model ops-model" in bridge.log()
    assert "circuit closed for provider 'flaky', model ops-model" in bridge.log()

    prometheus.wait_for(
        'aibridge_circuit_breaker_state{provider="flaky",state="closed"} == 1',
        lambda samples: len(samples) == 1,
        SAFETY,
    )
    assert total(prometheus, 'aibridge_circuit_breaker_trips_total{provider="flaky"}') == 1
    refused_total = total(prometheus, 'aibridge_rejections_total{reason="circuit_open"}')
    assert refused_total == len(rejected)


def test_health_on_the_metrics_port_and_the_proxy_port(bridge: Mitmdump, metrics_port: int) -> None:
    on_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/_aibridge/health", timeout=SAFETY)
    on_proxy = httpx.get(
        f"{bridge.url}/_aibridge/health", timeout=SAFETY
    )  # origin-form to the proxy itself
    for answer in (on_metrics, on_proxy):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["configured"] is True and body["database"]["state"] == "ok"
        assert body["version"]
        text = answer.text
        assert all(secret not in text for secret in (PARKED_KEY, SPARE_KEY, FLAKY_KEY))


def test_shutdown_prints_a_summary(upstream: FakeUpstream, tmp_path: Path) -> None:
    with Mitmdump(tmp_path, bridge_config(upstream.url)) as proc:
        openai.OpenAI(
            base_url=f"{proc.url}/openai/v1", api_key=HARNESS_TOKENS["alice"], max_retries=0
        ).responses.create(model="fake-text", input="one line")
        wait_for(lambda: " · completed 200 · " in proc.log(), SAFETY)
    log = proc.log()
    assert "AI Bridge: alice · openai responses fake-text · completed 200 · " in log
    assert "AI Bridge: 1 exchange (1 completed); " in log and " lost" in log
