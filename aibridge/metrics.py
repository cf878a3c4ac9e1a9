"""Prometheus metrics of the bridge and the HTTP server that exposes them (DESIGN §10).

``Metrics`` is updated from mitmproxy's event loop once or twice per exchange, so its calls
stay cheap: the ``.labels(...)`` children of an exchange's label tuple are looked up once and
cached. Values that come from clients (model, client, user) are bounded per label: after the
configured number of distinct values, new ones are exported as ``other``, so a hostile or
buggy client cannot grow Prometheus' series without end. State that lives elsewhere (the
recorder's queue, circuit breakers, key pools) is read at scrape time from callables, on the
scraping thread; a callable that raises costs its own families, never the scrape.

``MetricsServer`` serves ``/metrics`` and ``/_aibridge/health`` from daemon threads of its own,
so a scrape never touches the event loop. Every ``Metrics`` has its own registry: several
bridges (and tests) can live in one process.
"""

from __future__ import annotations

import gzip
import ipaddress
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, NamedTuple

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

__all__ = [
    "CircuitGauge",
    "ExchangeLabels",
    "KeyGauge",
    "Metrics",
    "MetricsServer",
    "RecorderGauge",
    "parse_listen",
]

# LLM calls last from a fraction of a second (a cached short answer) to many minutes (an agent's
# long reasoning turn); mitmproxy's default tcp_timeout is 600 s.
DURATION_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

OTHER: Final = "other"
MAX_LABEL_LENGTH: Final = 200
# Distinct values per label before new ones become "other". model, client and user come from
# clients; the rest come from the configuration or the bridge's code, and are bounded only in
# case a caller passes something it should not (method is the client's, too).
DEFAULT_MAX_LABEL_VALUES: Final[Mapping[str, int]] = {
    "model": 200,
    "client": 50,
    "user": 2000,
    "method": 20,
}
_MAX_OTHER_LABEL_VALUES: Final = 100
# Label tuples whose children are cached; past it the cache starts over (a flood of distinct
# tuples then costs the uncached price, no memory).
_SERIES_CACHE_SIZE: Final = 4096
_CHILDREN_PER_SERIES: Final = 64

CIRCUIT_STATES: Final = ("closed", "open", "half_open")
KEY_STATES: Final = ("active", "parked", "disabled")

_EXCHANGE: Final = ("provider", "api", "model", "client")


class ExchangeLabels(NamedTuple):
    provider: str  # the provider's configured name
    api: str  # "responses" | "messages" | "chat_completions" (aibridge.apis names)
    model: str  # as the client asked ("" when unknown)
    client: str  # guessed client ("" when unknown)
    user: str  # initiator id ("" when unknown); only exported when user_label=True


@dataclass(frozen=True, slots=True)
class CircuitGauge:
    provider: str
    model: str
    state: str  # "closed" | "open" | "half_open"
    trips: int


@dataclass(frozen=True, slots=True)
class KeyGauge:
    provider: str
    index: int
    hint: str
    state: str  # "active" | "parked" | "disabled"
    parks: int


@dataclass(frozen=True, slots=True)
class RecorderGauge:
    queue_rows: int
    rows_written: int
    rows_lost: int


class _LabelBound:
    """Maps label values to what is exported: cut to MAX_LABEL_LENGTH, encodable as UTF-8,
    and "other" once a label has seen its quota of distinct values. A value, once admitted,
    keeps its name, so started() and finished() of one exchange always meet the same series."""

    __slots__ = ("_limits", "_seen")

    def __init__(self, limits: Mapping[str, int]) -> None:
        self._limits = dict(limits)
        self._seen: dict[str, set[str]] = {}

    def __call__(self, label: str, value: str) -> str:
        if len(value) > MAX_LABEL_LENGTH:
            value = value[:MAX_LABEL_LENGTH]
        if not value.isascii():
            # Lone surrogates (headers decoded with surrogateescape) would break the whole
            # exposition at encode time.
            value = value.encode("utf-8", "replace").decode("utf-8")
        seen = self._seen.get(label)
        if seen is None:
            seen = self._seen[label] = set()
        if value in seen or not value or value == OTHER:
            return value
        if len(seen) >= self._limits.get(label, _MAX_OTHER_LABEL_VALUES):
            return OTHER
        seen.add(value)
        return value


class _Series:
    """The children of one exchange label tuple, looked up once."""

    __slots__ = ("by_status", "by_type", "duration", "inflight", "prompts", "tool_calls", "values")

    def __init__(self, metrics: Metrics, values: tuple[str, ...]) -> None:
        self.values = values  # provider, api, model, client[, user], as exported
        exchange = values[:4]
        self.inflight = metrics._inflight.labels(*exchange)
        self.duration = metrics._duration.labels(*exchange)
        self.prompts = metrics._prompts.labels(*values)
        self.tool_calls = metrics._tool_calls.labels(*values)
        self.by_status: dict[str, Any] = {}
        self.by_type: dict[str, Any] = {}


class Metrics:
    """The bridge's metrics in a registry of their own (``registry``; ``exposition()`` renders it).

    The callables are called at scrape time on the server's thread: they must be safe to call
    from another thread (a snapshot of a few numbers is enough)."""

    def __init__(
        self,
        *,
        user_label: bool = False,
        recorder: Callable[[], RecorderGauge | None] = lambda: None,
        circuits: Callable[[], Iterable[CircuitGauge]] = tuple,
        keys: Callable[[], Iterable[KeyGauge]] = tuple,
        version: str = "",
        max_label_values: Mapping[str, int] | None = None,
    ) -> None:
        self.user_label = user_label
        self.registry = CollectorRegistry()
        self._bound = _LabelBound({**DEFAULT_MAX_LABEL_VALUES, **(max_label_values or {})})
        self._series_cache: dict[tuple[str, ...], _Series] = {}
        user = ("user",) if user_label else ()
        per_user = (*_EXCHANGE, *user)
        r = self.registry
        self._interceptions = Counter(
            "aibridge_interceptions",
            "Bridged exchanges by how they ended (rejected: refused by the bridge).",
            (*_EXCHANGE, "status", *user),
            registry=r,
        )
        self._inflight = Gauge(
            "aibridge_interceptions_inflight",
            "Bridged exchanges in progress.",
            _EXCHANGE,
            registry=r,
        )
        self._duration = Histogram(
            "aibridge_interceptions_duration_seconds",
            "Time from the request to the end of the answer.",
            _EXCHANGE,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._tokens = Counter(
            "aibridge_tokens",
            "Tokens the providers reported, by type "
            "(input includes cache_read and cache_write; output includes reasoning).",
            (*_EXCHANGE, "type", *user),
            registry=r,
        )
        self._prompts = Counter(
            "aibridge_prompts", "Prompts recorded in finished exchanges.", per_user, registry=r
        )
        self._tool_calls = Counter(
            "aibridge_tool_calls",
            "Tool calls the models made in finished exchanges.",
            per_user,
            registry=r,
        )
        self._passthrough = Counter(
            "aibridge_passthrough",
            "Provider requests let through unrecorded, by answer status (error: no answer).",
            ("provider", "method", "status"),
            registry=r,
        )
        self._rejections = Counter(
            "aibridge_rejections",
            "Requests the bridge refused, by reason.",
            ("provider", "api", "reason"),
            registry=r,
        )
        r.register(_StateCollector(recorder, circuits, keys, version))

    def _series(self, labels: ExchangeLabels) -> _Series:
        # Keyed by the raw values: the mapping to exported values never changes once made.
        key: tuple[str, ...] = labels if self.user_label else labels[:4]
        series = self._series_cache.get(key)
        if series is None:
            b = self._bound
            values = (
                b("provider", labels.provider),
                b("api", labels.api),
                b("model", labels.model),
                b("client", labels.client),
            )
            if self.user_label:
                values = (*values, b("user", labels.user))
            series = _Series(self, values)
            if len(self._series_cache) >= _SERIES_CACHE_SIZE:
                self._series_cache.clear()
            self._series_cache[key] = series
        return series

    def started(self, labels: ExchangeLabels) -> None:
        self._series(labels).inflight.inc()

    def finished(
        self,
        labels: ExchangeLabels,
        status: str,
        seconds: float,
        tokens: Mapping[str, int],
        prompts: int,
        tool_calls: int,
    ) -> None:
        """The end of an exchange given to started() with the same labels."""
        series = self._series(labels)
        series.inflight.dec()
        self._child(series, series.by_status, self._interceptions, "status", status).inc()
        # NaN or a negative duration (a caller's bug) would poison the histogram's sum for good.
        series.duration.observe(seconds if seconds >= 0.0 else 0.0)
        for kind, count in tokens.items():
            if count > 0:
                self._child(series, series.by_type, self._tokens, "type", kind).inc(count)
        if prompts > 0:
            series.prompts.inc(prompts)
        if tool_calls > 0:
            series.tool_calls.inc(tool_calls)

    def _child(
        self, series: _Series, cache: dict[str, Any], metric: Counter, label: str, value: str
    ) -> Any:
        child = cache.get(value)
        if child is None:
            v = series.values
            child = metric.labels(*v[:4], self._bound(label, value), *v[4:])
            if len(cache) < _CHILDREN_PER_SERIES:
                cache[value] = child
        return child

    def rejected(self, labels: ExchangeLabels, reason: str) -> None:
        """A refusal recorded as an interception (it never started)."""
        b = self._bound
        values = (b("provider", labels.provider), b("api", labels.api))
        exchange = (*values, b("model", labels.model), b("client", labels.client))
        user = (b("user", labels.user),) if self.user_label else ()
        self._interceptions.labels(*exchange, "rejected", *user).inc()
        self._rejections.labels(*values, b("reason", reason)).inc()

    def refused(self, provider: str, api: str, reason: str) -> None:
        """A refusal that is no interception (nothing recorded): rejections only."""
        b = self._bound
        self._rejections.labels(b("provider", provider), b("api", api), b("reason", reason)).inc()

    def passthrough(self, provider: str, method: str, status: int | None) -> None:
        b = self._bound
        code = "error" if status is None else b("status", str(status))
        self._passthrough.labels(b("provider", provider), b("method", method), code).inc()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format the scraper's Accept header asks for (Prometheus text
        0.0.4 by default, OpenMetrics when asked) and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _StateCollector(Collector):
    """Families read at scrape time. Each source is isolated: one that raises (or yields
    something malformed) is left out of that scrape and the others are still exported."""

    def __init__(
        self,
        recorder: Callable[[], RecorderGauge | None],
        circuits: Callable[[], Iterable[CircuitGauge]],
        keys: Callable[[], Iterable[KeyGauge]],
        version: str,
    ) -> None:
        self._sources: tuple[Callable[[], list[Metric]], ...] = (
            lambda: _recorder_families(recorder()),
            lambda: _circuit_families(circuits()),
            lambda: _key_families(keys()),
        )
        build = GaugeMetricFamily(
            "aibridge_build_info", "The bridge's version.", labels=["version"]
        )
        build.add_metric([version], 1)
        self._build = build

    def collect(self) -> Iterator[Metric]:
        yield self._build
        for source in self._sources:
            try:
                families = source()
            except Exception:
                # A scrape must not fail for one broken source; the gap in the series shows it.
                continue
            yield from families

    def describe(self) -> Iterator[Metric]:
        # The names, for the registry's duplicate check, without calling the sources.
        yield self._build
        yield from _recorder_families(None)
        yield from _circuit_families(())
        yield from _key_families(())


def _recorder_families(gauge: RecorderGauge | None) -> list[Metric]:
    queue = GaugeMetricFamily("aibridge_recorder_queue_rows", "Rows waiting to be written.")
    written = CounterMetricFamily(
        "aibridge_recorder_rows_written", "Rows the recorder wrote to the audit log."
    )
    lost = CounterMetricFamily(
        "aibridge_recorder_losses", "Rows the recorder had to drop (never written)."
    )
    if gauge is not None:
        queue.add_metric([], int(gauge.queue_rows))
        written.add_metric([], int(gauge.rows_written))
        lost.add_metric([], int(gauge.rows_lost))
    return [queue, written, lost]


def _circuit_families(circuits: Iterable[CircuitGauge]) -> list[Metric]:
    state = GaugeMetricFamily(
        "aibridge_circuit_breaker_state",
        "1 for the current state of a provider x model circuit, 0 for the others.",
        labels=["provider", "model", "state"],
    )
    trips = CounterMetricFamily(
        "aibridge_circuit_breaker_trips",
        "Times a circuit opened.",
        labels=["provider", "model"],
    )
    # One sample per circuit, even if a source lists one twice (duplicates break a scrape).
    latest = {(c.provider, c.model): c for c in circuits}
    for (provider, model), c in latest.items():
        for s in CIRCUIT_STATES:
            state.add_metric([provider, model, s], 1 if c.state == s else 0)
        trips.add_metric([provider, model], int(c.trips))
    return [state, trips]


def _key_families(keys: Iterable[KeyGauge]) -> list[Metric]:
    state = GaugeMetricFamily(
        "aibridge_key_pool_key_state",
        "1 for the current state of a provider key, 0 for the others.",
        labels=["provider", "key", "hint", "state"],
    )
    parks = CounterMetricFamily(
        "aibridge_key_pool_parks",
        "Times a key was parked after a 429.",
        labels=["provider", "key", "hint"],
    )
    latest = {(k.provider, int(k.index)): k for k in keys}
    for (provider, index), k in latest.items():
        for s in KEY_STATES:
            state.add_metric([provider, str(index), k.hint, s], 1 if k.state == s else 0)
        parks.add_metric([provider, str(index), k.hint], int(k.parks))
    return [state, parks]


_PORT: Final = re.compile(r"[0-9]{1,5}", re.ASCII)
_HOSTNAME: Final = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*",
    re.ASCII | re.IGNORECASE,
)
_EXAMPLES: Final = "e.g. 127.0.0.1:9464, 9464 (loopback), 0.0.0.0:9464 (all interfaces), [::1]:9464"


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (or a bare port, on loopback) of the metrics server. Raises ValueError with
    what was wrong and a valid example."""
    text = value.strip()
    if not text:
        raise ValueError(f"empty; give host:port or a port, {_EXAMPLES}")
    if _PORT.fullmatch(text):
        return "127.0.0.1", _port(text, value)
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(
                f"{value!r}: an IPv6 address needs a port after the ], e.g. [::1]:9464"
            )
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(
                f"{value!r}: {address!r} is no IPv6 address (brackets are for IPv6 only), "
                "e.g. [::1]:9464"
            ) from None
        return address, _port(rest[1:], value)
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"{value!r}: no port; {_EXAMPLES}")
    if not host:
        raise ValueError(
            f"{value!r}: no host, which is ambiguous; write 0.0.0.0{text} for all interfaces "
            f"or 127.0.0.1{text} for loopback only"
        )
    if ":" in host:
        raise ValueError(f"{value!r}: an IPv6 address goes in brackets, e.g. [::1]:9464")
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{value!r}: {host!r} is no host name or IP address; {_EXAMPLES}")
    if all(part.isdigit() for part in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is no IPv4 address; {_EXAMPLES}") from None
    return host, _port(port, value)


def _port(text: str, value: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ValueError(
            f"{value!r}: the port must be a number from 0 to 65535, got {text!r}; {_EXAMPLES}"
        )
    return int(text)


_METRICS_PATHS: Final = frozenset({"/metrics", "/"})
HEALTH_PATH: Final = "/_aibridge/health"


class _Server(ThreadingHTTPServer):
    # Daemon request threads are not joined by server_close(): stop() does not wait for a scraper
    # that keeps its connection open (the listening socket holds the port, and that is closed).
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int, handler: type[_Handler]) -> None:
        self.address_family = family
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup the server never uses.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a scraper that hangs up mid-answer: nothing to report, nothing to print


class MetricsServer:
    """GET /metrics (and /) → the exposition; GET /_aibridge/health → JSON; anything else 404; HEAD
    like GET without a body; other methods 405. Serves on its own daemon threads (a ThreadingMixIn
    http.server server), so scrapes never touch mitmproxy's event loop. Logs nothing per request
    (no stderr noise). The exposition is gzipped when the scraper accepts gzip (as
    prometheus_client's own server does); health answers are not (they are a few bytes)."""

    # Polls for stop(); stop() waits at most this long.
    _POLL_SECONDS: Final = 0.2

    def __init__(
        self, metrics: Metrics, health: Callable[[], tuple[int, Mapping[str, Any]]]
    ) -> None:
        self._metrics = metrics
        self._health = health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, host: str, port: int) -> None:
        """Binds and serves; OSError (port in use, unknown host) propagates with its message."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the metrics server is already running")
            families = [
                info[0]
                for info in socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            ]
            # "localhost" may list ::1 first; scrapers mostly dial 127.0.0.1.
            family = socket.AF_INET if socket.AF_INET in families else families[0]
            server = _Server((host, port), family, self._handler())
            thread = threading.Thread(
                target=server.serve_forever,
                args=(self._POLL_SECONDS,),
                name="aibridge-metrics",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (port 0 → the real port)."""
        server = self._server
        if server is None:
            raise RuntimeError("the metrics server is not running")
        return str(server.server_address[0]), int(server.server_address[1])

    def stop(self) -> None:
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def _handler(self) -> type[_Handler]:
        metrics, health = self._metrics, self._health

        class Handler(_Handler):
            def metrics_answer(self) -> tuple[int, bytes, str, list[tuple[str, str]]]:
                body, content_type = metrics.exposition(self.headers.get("Accept", ""))
                headers: list[tuple[str, str]] = []
                if gzip_accepted(self.headers.get("Accept-Encoding", "")):
                    body = gzip.compress(body)
                    headers.append(("Content-Encoding", "gzip"))
                return 200, body, content_type, headers

            def health_answer(self) -> tuple[int, bytes, str, list[tuple[str, str]]]:
                try:
                    status, document = health()
                    if not isinstance(status, int) or not 200 <= status <= 599:
                        raise ValueError(f"health status {status!r} is no HTTP status")
                    body = orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS)
                except Exception as e:
                    # A load balancer needs an answer, not a dropped connection.
                    status = 500
                    error = f"health check failed: {type(e).__name__}: {e}"[:500]
                    body = orjson.dumps({"status": "error", "error": error})
                return status, body, "application/json", [("Cache-Control", "no-store")]

        return Handler


class _Handler(BaseHTTPRequestHandler):
    server_version = "aibridge-metrics"
    sys_version = ""
    # A client that sends nothing does not hold a thread for long.
    timeout = 30

    def metrics_answer(self) -> tuple[int, bytes, str, list[tuple[str, str]]]:
        raise NotImplementedError

    def health_answer(self) -> tuple[int, bytes, str, list[tuple[str, str]]]:
        raise NotImplementedError

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def __getattr__(self, name: str) -> Any:
        # http.server answers a method without a do_* with 501; here every other method
        # (POST, PUT, made-up ones) is a 405 naming the two that are allowed.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self._send(
            405, b"method not allowed\n", "text/plain; charset=utf-8", [("Allow", "GET, HEAD")]
        )

    def _answer(self, send_body: bool) -> None:
        path = self.path.partition("?")[0]
        try:
            if path in _METRICS_PATHS:
                status, body, content_type, headers = self.metrics_answer()
            elif path == HEALTH_PATH:
                status, body, content_type, headers = self.health_answer()
            else:
                status, body, content_type, headers = 404, b"not found\n", "text/plain", []
        except Exception as e:
            status, content_type, headers = 500, "text/plain; charset=utf-8", []
            body = f"error: {type(e).__name__}: {e}\n".encode("utf-8", "replace")
        self._send(status, body, content_type, headers, send_body)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: list[tuple[str, str]],
        send_body: bool = True,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per scrape on the bridge's stderr
