"""The real-Prometheus harness (tests/prometheus_server.py): a metrics endpoint served here by
prometheus_client is scraped by Debian's ``prometheus``, and read back through its query API."""

from __future__ import annotations

import math
import os
import socket
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests import prometheus_server
from tests.harness import LoopbackHTTP, wait_for
from tests.prometheus_server import (
    Prometheus,
    PrometheusError,
    Sample,
    find_prometheus,
    prometheus_binary,
)

pytestmark = pytest.mark.timeout(180)

SAFETY = 60.0  # upper bound for waits; never asserted as a duration
METRIC = "selftest_events_total"


@dataclass
class Endpoint:
    registry: CollectorRegistry
    events: Counter
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def value(self, kind: str) -> float:
        found = self.registry.get_sample_value(METRIC, {"kind": kind})
        assert found is not None
        return found


@pytest.fixture(scope="module")
def binary() -> str:
    return prometheus_binary()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    registry = CollectorRegistry()
    events = Counter("selftest_events", "Events of the self-test.", ["kind"], registry=registry)
    for kind in ("a", "b"):
        events.labels(kind)  # exposed (at 0) from the first scrape on
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield Endpoint(registry, events, int(server.server_port))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(SAFETY)


@pytest.fixture(scope="module")
def prom(
    binary: str, endpoint: Endpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    with Prometheus(binary, tmp_path_factory.mktemp("prometheus"), [endpoint.target]) as server:
        yield server


def by_kind(result: list[Sample]) -> dict[str, float]:
    return {labels["kind"]: value for labels, value in result}


def refused(url: str) -> bool:
    try:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=SAFETY)
    except urllib.error.URLError as err:
        return isinstance(err.reason, ConnectionRefusedError)
    return False


# --- finding the binary ------------------------------------------------------------------


def test_find_prometheus_finds_an_executable() -> None:
    found = find_prometheus()
    assert found is not None and os.access(found, os.X_OK)


def test_find_prometheus_falls_back_to_the_debian_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    fallback = prometheus_server.FALLBACK
    assert find_prometheus() == (fallback if os.access(fallback, os.X_OK) else None)


@pytest.mark.parametrize("ci", ["1", "true"])
def test_a_missing_binary_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setattr(prometheus_server, "find_prometheus", lambda: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="required in CI"):
        prometheus_binary()


@pytest.mark.parametrize("ci", [None, ""])
def test_a_missing_binary_skips_elsewhere(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    monkeypatch.setattr(prometheus_server, "find_prometheus", lambda: None)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        prometheus_binary()


# --- scraping and querying ---------------------------------------------------------------


def test_query_returns_the_scraped_counter(prom: Prometheus, endpoint: Endpoint) -> None:
    result = prom.wait_for(METRIC, lambda r: len(r) == 2, timeout=SAFETY)
    for labels, _ in result:
        assert labels == {
            "__name__": METRIC,
            "job": "aibridge",
            "instance": endpoint.target,
            "kind": labels["kind"],
        }
    assert by_kind(result) == {"a": endpoint.value("a"), "b": endpoint.value("b")}


@pytest.mark.parametrize("step", [1, 3, 0.5])
def test_an_increment_arrives_through_wait_for(
    prom: Prometheus, endpoint: Endpoint, step: float
) -> None:
    expected = endpoint.value("a") + step
    endpoint.events.labels("a").inc(step)
    result = prom.wait_for(
        f'{METRIC}{{kind="a"}}', lambda r: [v for _, v in r] == [expected], timeout=SAFETY
    )
    assert by_kind(result) == {"a": expected}


def test_after_wait_scraped_after_a_query_sees_what_was_exposed(
    prom: Prometheus, endpoint: Endpoint
) -> None:
    # No polling of the query: the value must already be there, every round.
    for step in (2, 5, 1):
        endpoint.events.labels("b").inc(step)
        expected = endpoint.value("b")
        prom.wait_scraped_after(time.time(), timeout=SAFETY)
        assert by_kind(prom.query(f'{METRIC}{{kind="b"}}')) == {"b": expected}


def test_targets_show_the_endpoint_up(prom: Prometheus, endpoint: Endpoint) -> None:
    prom.wait_scraped_after(time.time(), timeout=SAFETY)
    [target] = prom.targets()
    assert target["health"] == "up"
    assert target["lastError"] == ""
    assert target["labels"] == {"job": "aibridge", "instance": endpoint.target}
    assert target["scrapeUrl"] == f"http://{endpoint.target}/metrics"
    assert prom.query(f'up{{instance="{endpoint.target}"}}')[0][1] == 1.0


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1 + 1", 2.0),
        ("scalar(vector(7))", 7.0),
        ("1 / 0", math.inf),
        ("-1 / 0", -math.inf),
        ("0.25 * 2", 0.5),
    ],
)
def test_a_scalar_is_one_item_without_labels(prom: Prometheus, expr: str, expected: float) -> None:
    assert prom.query(expr) == [({}, expected)]


def test_nan_is_a_float(prom: Prometheus) -> None:
    [(labels, value)] = prom.query("0 / 0")
    assert labels == {} and math.isnan(value)


def test_a_vector_without_series_is_empty(prom: Prometheus) -> None:
    assert prom.query('up{job="no-such-job"}') == []


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("sum(", "parse error: unclosed left parenthesis"),
        ("", "parse error: no expression found in input"),
        (f'{METRIC}{{kind="a"', "parse error: unexpected end of input"),
        ("1 +", "parse error: unexpected end of input"),
        (f"rate({METRIC})", 'expected type range vector in call to function "rate"'),
        ("no_such_function(up)", 'unknown function with name "no_such_function"'),
    ],
)
def test_a_bad_expression_raises_with_prometheus_message(
    prom: Prometheus, expr: str, message: str
) -> None:
    with pytest.raises(PrometheusError) as raised:
        prom.query(expr)
    assert 'bad_data: invalid parameter "query"' in str(raised.value)
    assert message in str(raised.value)
    assert repr(expr) in str(raised.value)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        # Two series (kind a and b) on one side of a one-to-one match.
        (f"{METRIC} + on() {METRIC}", "found duplicate series for the match group"),
        ('label_replace(up, "x", "$1", "job", "(")', "invalid regular expression"),
    ],
)
def test_an_expression_failing_at_evaluation_raises_with_prometheus_message(
    prom: Prometheus, expr: str, message: str
) -> None:
    prom.wait_for(METRIC, lambda r: len(r) == 2, timeout=SAFETY)
    with pytest.raises(PrometheusError, match="execution: ") as raised:
        prom.query(expr)
    assert message in str(raised.value)


@pytest.mark.parametrize(("expr", "kind"), [("up[1m]", "matrix"), ('"text"', "string")])
def test_query_refuses_what_is_not_an_instant_vector(
    prom: Prometheus, expr: str, kind: str
) -> None:
    with pytest.raises(PrometheusError, match=f"a {kind}, not an instant vector"):
        prom.query(expr)


def test_wait_for_raises_with_the_last_result(prom: Prometheus, endpoint: Endpoint) -> None:
    prom.wait_scraped_after(time.time(), timeout=SAFETY)
    value = endpoint.value("a")
    with pytest.raises(TimeoutError, match="never met the condition") as raised:
        prom.wait_for(f'{METRIC}{{kind="a"}}', lambda r: False, timeout=0.5)
    assert f"'kind': 'a'}}, {value!r})]" in str(raised.value)


@pytest.mark.parametrize("expr", ["sum(", f"rate({METRIC})", f"{METRIC} + on() {METRIC}"])
def test_wait_for_a_bad_expression_raises_at_once(prom: Prometheus, expr: str) -> None:
    prom.wait_for(METRIC, lambda r: len(r) == 2, timeout=SAFETY)
    seen: list[list[Sample]] = []
    with pytest.raises(PrometheusError, match="query "):
        prom.wait_for(expr, lambda r: bool(seen.append(r)), timeout=SAFETY)
    assert seen == []


# --- targets that are down ---------------------------------------------------------------


def answering(status: int, body: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def test_down_targets_show_down_with_their_error(
    binary: str, endpoint: Endpoint, tmp_path: Path
) -> None:
    # Bound but not listening: connections are refused, and nobody else can take the port.
    with (
        socket.socket() as closed,
        LoopbackHTTP(answering(500, b"boom\n")) as failing,
        LoopbackHTTP(answering(404, b"no metrics here\n")) as missing,
        LoopbackHTTP(answering(200, b"this is { not the exposition format\n")) as garbage,
    ):
        closed.bind(("127.0.0.1", 0))
        refused_target = f"127.0.0.1:{closed.getsockname()[1]}"
        errors = {
            refused_target: "connect: connection refused",
            f"127.0.0.1:{failing.port}": "server returned HTTP status 500",
            f"127.0.0.1:{missing.port}": "server returned HTTP status 404",
            f"127.0.0.1:{garbage.port}": "invalid syntax",
        }
        with Prometheus(binary, tmp_path, [endpoint.target, *errors]) as prom:

            def health() -> dict[str, dict[str, Any]] | None:
                found = {t["labels"]["instance"]: t for t in prom.targets()}
                ready = len(found) == 5 and all(t["health"] != "unknown" for t in found.values())
                return found if ready else None

            targets = wait_for(health, timeout=SAFETY)
            assert targets, prom.targets()
            assert targets[endpoint.target]["health"] == "up"
            for instance, error in errors.items():
                assert targets[instance]["health"] == "down"
                assert error in targets[instance]["lastError"]

            up = prom.wait_for("up", lambda r: len(r) == 5, timeout=SAFETY)
            assert {labels["instance"]: value for labels, value in up} == {
                endpoint.target: 1.0,
                **dict.fromkeys(errors, 0.0),
            }

            with pytest.raises(TimeoutError) as raised:
                prom.wait_scraped_after(time.time(), timeout=1)
            for instance, error in errors.items():
                assert f"http://{instance}/metrics: down" in str(raised.value)
                assert error in str(raised.value)
            assert f"http://{endpoint.target}/metrics: up" in str(raised.value)


def test_wait_scraped_after_waits_for_every_configured_target(
    binary: str, endpoint: Endpoint, tmp_path: Path
) -> None:
    # A target Prometheus has not scraped yet, right after start, is not "scraped after t".
    with Prometheus(binary, tmp_path, [endpoint.target]) as prom:
        t = time.time()
        assert prom.targets() == [] or all(
            target["lastScrape"].startswith("0001-") for target in prom.targets()
        )
        prom.wait_scraped_after(t, timeout=SAFETY)
        [target] = prom.targets()
        assert target["health"] == "up"


# --- start and stop ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "interval", "message"),
    [
        (["127.0.0.1:1"], "soon", 'not a valid duration string: \\"soon\\"'),
        (["127.0.0.1:1"], "-1s", 'not a valid duration string: \\"-1s\\"'),
        (["http://127.0.0.1:1/metrics"], "1s", "is not a valid hostname"),
        (["127.0.0.1:1/metrics"], "1s", "is not a valid hostname"),
    ],
)
def test_an_early_exit_raises_with_the_log_tail(
    binary: str, tmp_path: Path, targets: list[str], interval: str, message: str
) -> None:
    prom = Prometheus(binary, tmp_path, targets, scrape_interval=interval)
    with pytest.raises(PrometheusError, match="exited with 2 at start") as raised:
        prom.start()
    assert "Error loading config" in str(raised.value)
    assert message in str(raised.value)
    assert prom.proc is None


def test_a_server_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    fake = tmp_path / "fake-prometheus"
    fake.write_text('#!/bin/sh\necho "starting, never listening"\necho $$ > pid\nexec sleep 600\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    prom = Prometheus(str(fake), tmp_path, ["127.0.0.1:1"])
    with pytest.raises(PrometheusError, match="not ready in time") as raised:
        prom.start(timeout=1)
    assert "starting, never listening" in str(raised.value)
    assert prom.proc is None
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("listening", [True, False])
def test_start_takes_another_port_when_its_port_is_taken(
    binary: str,
    endpoint: Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    listening: bool,
) -> None:
    # A server that accepts and never answers, or a socket only bound: both keep the port.
    real_free_port = prometheus_server.free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        if listening:
            taken.listen()
        taken_port = taken.getsockname()[1]
        # Each attempt on the listening socket costs a timed-out readiness poll: only one.
        attempts = 1 if listening else 2
        ports = iter([taken_port] * attempts)
        monkeypatch.setattr(prometheus_server, "free_port", lambda: next(ports, real_free_port()))
        with Prometheus(binary, tmp_path, [endpoint.target]) as prom:
            assert prom.port != taken_port
            assert prom.query("1") == [({}, 1.0)]
        assert prom.log_path.read_text().count("bind: address already in use") == attempts


def test_stop_is_idempotent_and_leaves_no_process(
    binary: str, endpoint: Endpoint, tmp_path: Path
) -> None:
    prom = Prometheus(binary, tmp_path, [endpoint.target])
    prom.stop()  # before start: nothing to do
    prom.start()
    proc = prom.proc
    assert proc is not None and proc.poll() is None
    prom.stop()
    prom.stop()
    assert proc.returncode is not None
    assert refused(f"{prom.url}/-/ready")
    assert "Received SIGTERM" in prom.log_path.read_text()


def test_leaving_the_with_block_by_an_exception_stops_it(
    binary: str, endpoint: Endpoint, tmp_path: Path
) -> None:
    with (
        pytest.raises(ZeroDivisionError),
        Prometheus(binary, tmp_path, [endpoint.target]) as prom,
    ):
        proc = prom.proc
        1 / 0  # noqa: B018
    assert proc is not None and proc.returncode is not None
    assert refused(f"{prom.url}/-/ready")
