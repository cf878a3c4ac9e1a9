"""Operations in the addon's hooks (issue 15): key pools, the circuit breaker, the console's
lines, the health check on the proxy port. Driven as mitmproxy drives the hooks."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from mitmproxy import exceptions, http
from mitmproxy.flow import Error
from mitmproxy.test import taddons, tflow
from prometheus_client.parser import text_string_to_metric_families

from aibridge.bridge import AIBridge
from aibridge.config import hint
from aibridge.transport import mitm_compat
from aibridge.upstream.guard import UpstreamGuard
from tests.harness import FakeClock as Clock
from tests.test_bridge import TOKENS, Bridge, fixture, make_flow, query, write_config

KEYS = ["sk-pool-first-key-0123456789aaaa", "sk-pool-second-key-0123456789bbbb"]
MESSAGES_URL = "https://api.anthropic.com/v1/messages"


@pytest.fixture
def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Bridge]]:
    monkeypatch.chdir(tmp_path)
    with contextlib.ExitStack() as stack:

        def build(
            clock: Clock | None = None, keys: list[str] | None = None, **overrides: Any
        ) -> Bridge:
            providers = [
                {
                    "name": "openai",
                    "type": "openai",
                    "base_url": "https://api.openai.com/v1",
                    "api_key": keys or KEYS,
                },
                {
                    "name": "anthropic",
                    "type": "anthropic",
                    "base_url": "https://api.anthropic.com/v1",
                    "api_key": "sk-ant-single-key-0123456789",
                },
            ]
            overrides.setdefault("providers", providers)
            addon = AIBridge(default_config_dir=tmp_path)
            tctx = stack.enter_context(taddons.context(addon))
            stack.callback(addon.done)
            tctx.configure(addon, aibridge_config=str(write_config(tmp_path, **overrides)))
            if clock is not None:  # the same guard, on a clock the test moves
                assert addon.config is not None
                config = addon.config
                addon.guard = UpstreamGuard(
                    config.providers, config.circuit_breaker, config.key_pool, clock, clock
                )
            return Bridge(addon, tctx, tmp_path / "audit.db")

        yield build


def send(bridge: Bridge, body: bytes | None = None, **kw: Any) -> http.HTTPFlow:
    flow = make_flow(body or fixture("text_buffered", "request.json"), **kw)
    bridge.addon.request(flow)
    return flow


def answer(bridge: Bridge, flow: http.HTTPFlow, status: int = 200, **headers: str) -> None:
    assert flow.response is None, "the request was refused"
    body = fixture("text_buffered", "response.json") if status == 200 else b'{"error":{}}'
    flow.response = http.Response.make(
        status, body, {"content-type": "application/json", **headers}
    )
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)


def key_sent(flow: http.HTTPFlow) -> str:
    """The key that went upstream: the recorded hint tells which of KEYS it was."""
    return flow.metadata["aibridge"]["credential_hint"]


def refused(flow: http.HTTPFlow, status: int) -> dict[str, Any]:
    assert flow.response is not None and flow.response.status_code == status
    assert flow.response.headers["x-aibridge-error"] == "1"  # the bridge's own answer
    return orjson.loads(flow.response.content or b"")


def row(bridge: Bridge, flow: http.HTTPFlow) -> dict[str, Any]:
    return bridge.interception(flow)


# ------------------------------------------------------------------------------ key pool


def test_requests_spread_over_the_keys_and_each_row_names_its_key(
    make: Callable[..., Bridge],
) -> None:
    bridge = make()
    hints = []
    for _ in range(4):
        flow = send(bridge)
        hints.append(key_sent(flow))
        answer(bridge, flow)
        assert row(bridge, flow)["credential_hint"] == hints[-1]
    assert hints == [hint(KEYS[0]), hint(KEYS[1])] * 2


def test_the_key_on_the_wire_is_the_one_recorded(make: Callable[..., Bridge]) -> None:
    bridge = make()
    for expected in (KEYS[0], KEYS[1]):
        flow = send(bridge)
        mitm_compat.run_before_send(flow)  # the real value goes in just for the wire
        assert flow.request.headers["authorization"] == f"Bearer {expected}"
        answer(bridge, flow)
        assert flow.request.headers["authorization"] == f"Bearer {hint(expected)}"


def test_a_key_answered_429_is_skipped_until_its_retry_after(
    make: Callable[..., Bridge], caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    bridge = make(clock)
    first = send(bridge)
    assert key_sent(first) == hint(KEYS[0])
    with caplog.at_level(logging.WARNING):
        answer(bridge, first, 429, **{"retry-after": "20"})
    assert first.response is not None and first.response.status_code == 429  # upstream's, as sent
    assert "key 1 (sk-p...aaaa) of provider 'openai' answered 429: parked for 20 s" in caplog.text
    for _ in range(3):
        flow = send(bridge)
        assert key_sent(flow) == hint(KEYS[1])
        answer(bridge, flow)
    clock.now += 20
    seen = set()
    for _ in range(2):
        flow = send(bridge)
        seen.add(key_sent(flow))
        answer(bridge, flow)
    assert seen == {hint(KEYS[0]), hint(KEYS[1])}


def test_every_key_parked_answers_429_with_the_shortest_wait(make: Callable[..., Bridge]) -> None:
    clock = Clock()
    bridge = make(clock)
    answer(bridge, send(bridge), 429, **{"retry-after": "30"})
    answer(bridge, send(bridge), 429, **{"retry-after-ms": "7500"})
    flow = send(bridge)
    body = refused(flow, 429)
    assert flow.response is not None and flow.response.headers["retry-after"] == "8"
    assert body["error"]["type"] == "rate_limit_exceeded"
    assert "provider 'openai' is rate-limiting this bridge (all 2 of its keys are" in str(body)
    recorded = row(bridge, flow)
    assert (recorded["status"], recorded["http_status"]) == ("rejected", 429)
    upstream = orjson.loads(recorded["metadata"])["upstream"]
    assert upstream == {
        "refused_by": "key_pool",
        "provider": "openai",
        "parked_keys": 2,
        "retry_after": 8,
    }
    clock.now += 8
    flow = send(bridge)
    assert flow.response is None and key_sent(flow) == hint(KEYS[1])


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_disabled_but_never_the_last(
    make: Callable[..., Bridge], caplog: pytest.LogCaptureFixture, status: int
) -> None:
    bridge = make()
    with caplog.at_level(logging.ERROR):
        answer(bridge, send(bridge), status)
    assert f"key 1 (sk-p...aaaa) of provider 'openai' answered {status}: disabled" in caplog.text
    for _ in range(3):
        flow = send(bridge)
        assert key_sent(flow) == hint(KEYS[1])
        answer(bridge, flow)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            flow = send(bridge)
            assert flow.response is None  # the last key stays in use: upstream answers
            answer(bridge, flow, status)
            assert flow.response is not None and flow.response.status_code == status
    assert caplog.text.count("it is the last key in use") == 1  # said once, not per request


def test_a_single_key_is_never_parked(make: Callable[..., Bridge]) -> None:
    """Nothing to switch to: every request goes to the provider, which answers for itself."""
    bridge = make(keys=[KEYS[0]])
    for _ in range(3):
        flow = send(bridge)
        assert flow.response is None
        answer(bridge, flow, 429, **{"retry-after": "60"})
    assert bridge.addon.guard is not None and bridge.addon.guard.pools == {}


def test_a_users_own_key_is_not_pooled(make: Callable[..., Bridge]) -> None:
    bridge = make(byok=True)
    own = "sk-user-own-key-0123456789abcdef"
    flow = send(bridge, token=own)
    assert flow.response is None and key_sent(flow) == hint(own)
    answer(bridge, flow, 429)
    for _ in range(2):  # the pool saw nothing: both keys still take turns
        flow = send(bridge)
        answer(bridge, flow)
    assert bridge.addon.guard is not None
    assert {k.state.value for k in bridge.addon.guard.key_snapshot()} == {"active"}


def test_passthrough_requests_take_pool_keys_too(make: Callable[..., Bridge]) -> None:
    bridge = make()
    hints = []
    for _ in range(2):
        flow = make_flow(b"", url="https://api.openai.com/v1/models", method="GET")
        bridge.addon.request(flow)
        assert flow.response is None
        mitm_compat.run_before_send(flow)
        hints.append(flow.request.headers["authorization"])
        flow.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
        bridge.addon.responseheaders(flow)
        bridge.addon.response(flow)
    assert hints == [f"Bearer {KEYS[0]}", f"Bearer {KEYS[1]}"]


# ------------------------------------------------------------------------- circuit breaker


BREAKER = {"failures": 2, "cool_down_seconds": 30}


def trip(bridge: Bridge, status: int = 503) -> None:
    """As many failed answers as BREAKER needs to open the circuit of the fixture's model."""
    for _ in range(BREAKER["failures"]):
        answer(bridge, send(bridge), status)


@pytest.mark.parametrize("failing", [503, 504, 529])
def test_consecutive_failures_open_the_circuit_of_that_model(
    make: Callable[..., Bridge], caplog: pytest.LogCaptureFixture, failing: int
) -> None:
    clock = Clock()
    bridge = make(clock, circuit_breaker=BREAKER)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            answer(bridge, send(bridge), failing)
    assert "circuit opened for provider 'openai', model gpt-4.1" in caplog.text
    flow = send(bridge)
    body = refused(flow, 503)
    assert flow.response is not None and flow.response.headers["retry-after"] == "30"
    assert f"answered {failing} to the last 2 requests" in body["error"]["message"]
    recorded = row(bridge, flow)
    assert (recorded["status"], recorded["http_status"]) == ("rejected", 503)
    assert recorded["model"] == "gpt-4.1"
    assert orjson.loads(recorded["metadata"])["upstream"]["refused_by"] == "circuit_breaker"
    other = send(bridge, fixture("text_buffered", "request.json").replace(b"gpt-4.1", b"gpt-4o"))
    assert other.response is None  # another model's circuit is closed
    answer(bridge, other)
    clock.now += 12
    flow = send(bridge)
    refused(flow, 503)
    assert flow.response is not None and flow.response.headers["retry-after"] == "18"


def test_a_success_between_failures_keeps_it_closed(make: Callable[..., Bridge]) -> None:
    bridge = make(Clock(), circuit_breaker=BREAKER)
    for status in (503, 200, 503, 200, 503):
        answer(bridge, send(bridge), status)
    assert send(bridge).response is None


def test_after_the_cool_down_one_trial_decides(make: Callable[..., Bridge]) -> None:
    clock = Clock()
    bridge = make(clock, circuit_breaker=BREAKER)
    trip(bridge)
    clock.now += 30
    trial = send(bridge)
    assert trial.response is None
    waiting = send(bridge)  # while the trial is in flight
    assert refused(waiting, 503)["error"]["message"].find("a trial request is checking") > 0
    assert waiting.response is not None and waiting.response.headers["retry-after"] == "1"
    answer(bridge, trial, 503)  # failed: open for another cool-down
    refused(send(bridge), 503)
    clock.now += 30
    trial = send(bridge)
    answer(bridge, trial)  # recovered
    for _ in range(3):
        answer(bridge, send(bridge))


def test_an_unreachable_upstream_counts_as_a_failure(make: Callable[..., Bridge]) -> None:
    bridge = make(Clock(), circuit_breaker=BREAKER)
    for _ in range(2):
        flow = send(bridge)
        flow.error = Error("Connection refused")
        mitm_compat.mark_answerable(flow, 502)
        bridge.addon.error(flow)
        mitm_compat.mark_answerable(flow, None)
    message = refused(send(bridge), 503)["error"]["message"]
    assert "the bridge could not reach it for the last 2 requests" in message


def test_a_client_that_went_away_gives_no_verdict(make: Callable[..., Bridge]) -> None:
    clock = Clock()
    bridge = make(clock, circuit_breaker=BREAKER)
    trip(bridge)
    clock.now += 30
    trial = send(bridge)
    trial.error = Error("Client disconnected.")
    bridge.addon.error(trial)
    trial2 = send(bridge)  # the trial's slot was given back: another may try
    assert trial2.response is None
    answer(bridge, trial2)


def test_the_breaker_can_be_turned_off(make: Callable[..., Bridge]) -> None:
    bridge = make(Clock(), circuit_breaker={"enabled": False, "failures": 1})
    for _ in range(4):
        answer(bridge, send(bridge), 503)


def test_a_circuit_refusal_gives_the_budget_slot_back(make: Callable[..., Bridge]) -> None:
    users = [{"id": u, "token": t} for u, t in TOKENS.items()]
    users[0]["limits"] = {"concurrent_requests": 1}
    bridge = make(Clock(), circuit_breaker={"failures": 1}, users=users)
    answer(bridge, send(bridge), 503)
    for _ in range(3):
        refused(send(bridge), 503)  # the circuit's answer, never the concurrency limit's 429


# ------------------------------------------------------------------------------ console


def test_one_line_per_finished_exchange_and_a_summary(
    make: Callable[..., Bridge], caplog: pytest.LogCaptureFixture
) -> None:
    bridge = make()
    with caplog.at_level(logging.INFO, logger="aibridge.bridge"):
        answer(bridge, send(bridge))
        send(bridge, token="not-a-known-token-123")
        bridge.addon.done()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("AI Bridge: ")]
    done = [line for line in lines if " · " in line]
    assert done[0].startswith("AI Bridge: alice · openai responses gpt-4.1")
    assert " · completed 200 · " in done[0] and " out tokens · $" in done[0]
    assert done[0].endswith(" ms")
    assert done[1].startswith(
        "AI Bridge: unknown client · openai responses ? · rejected 401 · unknown bridge token"
    )
    summary = [line for line in lines if "exchanges (" in line]
    assert summary and "2 exchanges (1 completed, 1 rejected)" in summary[-1]
    assert "rows written, 0 lost" in summary[-1]
    assert not any(secret in caplog.text for secret in (*KEYS, *TOKENS.values()))


# ------------------------------------------------------------------------------- health


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/_aibridge/health",
        "http://127.0.0.1:8080/_aibridge/health",
        "https://api.anthropic.com/_aibridge/health?probe=1",
    ],
)
def test_health_on_the_proxy_port(make: Callable[..., Bridge], url: str) -> None:
    bridge = make()
    flow = make_flow(b"", url=url, method="GET", token=None)
    flow.client_conn.sockname = ("127.0.0.1", 8080)
    bridge.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 200
    body = orjson.loads(flow.response.content or b"")
    assert body["status"] == "ok" and body["database"]["state"] == "ok"
    assert query(bridge.db_path, "select count(*) n from interceptions")[0]["n"] == 0


def test_health_answers_head_without_a_body(make: Callable[..., Bridge]) -> None:
    bridge = make()
    flow = make_flow(b"", url="https://api.openai.com/_aibridge/health", method="HEAD", token=None)
    bridge.addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 200
    assert flow.response.content == b""


def test_health_is_not_answered_for_other_hosts(make: Callable[..., Bridge]) -> None:
    bridge = make()
    flow = make_flow(b"", url="https://example.com/_aibridge/health", method="GET", token=None)
    flow.client_conn.sockname = ("127.0.0.1", 8080)
    bridge.addon.request(flow)
    assert flow.response is None  # someone else's path, left alone


def test_health_of_an_unconfigured_bridge_is_503(tmp_path: Path) -> None:
    addon = AIBridge(default_config_dir=tmp_path)
    with taddons.context(addon):
        flow = tflow.tflow(req=http.Request.make("GET", "http://127.0.0.1:8080/_aibridge/health"))
        flow.client_conn.sockname = ("127.0.0.1", 8080)
        addon.request(flow)
        assert flow.response is not None and flow.response.status_code == 503
        body = orjson.loads(flow.response.content or b"")
        assert body["status"] == "failing" and body["configured"] is False


# ------------------------------------------------------------------------------ metrics


def scrape(bridge: Bridge) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    server = bridge.addon._metrics_server
    assert server is not None
    host, port = server.address
    text = httpx.get(f"http://{host}:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_metrics_port_counts_what_the_hooks_saw(make: Callable[..., Bridge]) -> None:
    bridge = make(metrics={"listen": "127.0.0.1:0", "user_label": True})
    answer(bridge, send(bridge))
    send(bridge, token="not-a-known-token-123")
    values = scrape(bridge)
    exchange = (("api", "responses"), ("client", "Codex"), ("model", "gpt-4.1"))
    completed = (*exchange, ("provider", "openai"), ("status", "completed"), ("user", "alice"))
    assert values[("aibridge_interceptions_total", completed)] == 1
    rejection = (("api", "responses"), ("provider", "openai"), ("reason", "unauthenticated"))
    assert values[("aibridge_rejections_total", rejection)] == 1
    key = (("hint", hint(KEYS[0])), ("key", "1"), ("provider", "openai"), ("state", "active"))
    assert values[("aibridge_key_pool_key_state", key)] == 1
    assert values[("aibridge_interceptions_inflight", (*exchange, ("provider", "openai")))] == 0


def test_metrics_survive_a_reconfiguration(make: Callable[..., Bridge], tmp_path: Path) -> None:
    bridge = make(metrics={"listen": "127.0.0.1:0"})
    answer(bridge, send(bridge))
    server = bridge.addon._metrics_server
    assert server is not None
    old_port = server.address[1]
    completed = "aibridge_interceptions_total"

    def count() -> float:
        return sum(v for (name, _), v in scrape(bridge).items() if name == completed)

    assert count() == 1
    bridge.tctx.configure(bridge.addon, aibridge_db=str(tmp_path / "other.db"))
    assert bridge.addon._metrics_server is server and count() == 1  # same endpoint, same counts
    bridge.tctx.configure(bridge.addon, aibridge_metrics="0")  # another address: a new server
    moved = bridge.addon._metrics_server
    assert moved is not None and moved is not server and count() == 1
    with pytest.raises(httpx.TransportError):  # the old one is closed
        httpx.get(f"http://127.0.0.1:{old_port}/metrics", timeout=5)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("127.0.0.1:99999", "--set aibridge_metrics"),
        (":9464", "0.0.0.0:9464"),
        ("not a place", "--set aibridge_metrics"),
    ],
)
def test_a_bad_metrics_address_names_the_option(
    make: Callable[..., Bridge], value: str, problem: str
) -> None:
    bridge = make()
    with pytest.raises(exceptions.OptionsError) as info:
        bridge.tctx.configure(bridge.addon, aibridge_metrics=value)
    assert problem in str(info.value)


def test_a_busy_metrics_port_says_what_to_do(make: Callable[..., Bridge]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(exceptions.OptionsError) as info:
            make(metrics={"listen": f"127.0.0.1:{port}"})
    assert f"cannot serve metrics on 127.0.0.1:{port}" in str(info.value)
    assert "choose a free port" in str(info.value)
