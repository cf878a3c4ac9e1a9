"""The mitmproxy addon: the data path of DESIGN.md §2, hook by hook.

Hooks stay short: routing, identity, request parsing, the stream tee and record extraction
live in their own modules as plain functions; the recorder writes on its own thread. A hook
never raises into mitmproxy for a bad flow: the worst case is an error row and a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from mitmproxy import ctx, exceptions, http, websocket
from mitmproxy.proxy.mode_specs import ReverseMode

from aibridge import __version__, apis, auth, echo, health, mitmweb
from aibridge.apis import Api
from aibridge.apis.common import Accumulator, RequestError, RequestInfo
from aibridge.apis.openai_errors import error_event
from aibridge.concealment import ViewConcealment
from aibridge.config import Config, ConfigError, Provider, load_config
from aibridge.console import ExchangeTally, FinishedExchange, LineBatch, exchange_line
from aibridge.cost import PriceBook
from aibridge.errors import error_response
from aibridge.governance import report
from aibridge.governance.governor import (
    FREE_ADMISSION,
    WARNING_HEADER,
    Admission,
    Governor,
    Refusal,
    warning_header,
)
from aibridge.headers import header_value, header_view
from aibridge.metrics import (
    CircuitGauge,
    ExchangeLabels,
    KeyGauge,
    Metrics,
    MetricsServer,
    RecorderGauge,
    parse_listen,
)
from aibridge.record import address as addresses
from aibridge.record import rows
from aibridge.record.outcome import Outcome, finish_exchange
from aibridge.record.recorder import RecorderError, Replay
from aibridge.record.writer_process import WRITER_MODES, LogWriter, WriterProcess, log_writer
from aibridge.routing import Route, RouteKind, Router, as_noted, classify
from aibridge.transport import mitm_compat
from aibridge.transport.inflate import DecodeLimitExceeded, decode_body, decode_body_in_thread
from aibridge.transport.tee import StreamTee
from aibridge.transport.websocket import (
    SocketState,
    read_server_event,
    read_turn,
    worth_decoding,
)
from aibridge.upstream.guard import NO_TICKET, Ticket, UpstreamGuard

log = logging.getLogger(__name__)

# What the bridge notes on a flow (saved with it), so offline mode knows who sent it.
METADATA_KEY = "aibridge"


def _note(
    flow: http.HTTPFlow,
    api: Api,
    interception_id: str,
    initiator_id: str | None,
    credential_kind: str | None,
    credential_hint: str | None,
    rejected: dict[str, Any] | None = None,
    request: RequestInfo | None = None,
    provider: str | None = None,
) -> None:
    """What the bridge notes on a flow it records (saved with it, `-w`), so that offline mode
    (`_replay_request`) rebuilds the same record without authenticating anyone."""
    noted: dict[str, Any] = {
        "api": api.name,  # the API is judged by path again offline; mitmweb's view reads it
        "interception_id": interception_id,
        "initiator_id": initiator_id,
        "credential_kind": credential_kind,
        "credential_hint": credential_hint,
        # Several providers can share a host and root: offline mode must not guess.
        "provider": provider,
    }
    if rejected is not None:
        noted["rejected"] = rejected
    if request is not None and request.metadata:
        noted["request"] = request.metadata  # what the body alone no longer says (an edit)
    flow.metadata[METADATA_KEY] = noted


def mitmweb_url(host: str, port: int) -> str:
    """Where a browser on this machine finds mitmweb's UI (web_host, web_port)."""
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _publish_budgets(recorder: LogWriter, config: Config, now: float) -> None:
    """The limits and their current periods, into the log's ``budgets`` table, where the
    canned query "budget use" reads them."""
    for row in report.budget_rows(config.governance, report.configured_user_ids(config), now):
        recorder.upsert("budgets", row)


# Why the bridge refused, as the metrics' ``reason`` label says it (DESIGN §9, §10).
_LIMIT_REASONS = {"requests_per_minute": "rate_limit", "concurrent_requests": "concurrency"}
_GUARD_REASONS = {"circuit_breaker": "circuit_open", "key_pool": "keys_parked"}


def refusal_reason(refusal: Refusal) -> str:
    detail = refusal.detail
    by = _GUARD_REASONS.get(str(detail.get("refused_by")))
    if by is not None:
        return by
    limit = str(detail.get("limit", ""))
    return _LIMIT_REASONS.get(limit, "budget")  # spend_usd.day, tokens.month, ...


def _labels(row: Mapping[str, Any]) -> ExchangeLabels:
    """An interception's metric labels, from its first row."""
    return ExchangeLabels(
        row["provider_name"],
        row["api"],
        row["model"] or "",
        row["client"] or "",
        row["initiator_id"] or "",
    )


def token_counts(usage: Mapping[str, Any]) -> dict[str, int]:
    """A token usage row as the ``type`` label of ``aibridge_tokens_total`` counts it: input
    (uncached), cache_read and cache_write add up to all input; reasoning is part of output."""
    total_input = usage.get("input_tokens") or 0
    cache_read = usage.get("cache_read_input_tokens") or 0
    cache_write = usage.get("cache_write_input_tokens") or 0
    uncached = usage.get("uncached_input_tokens")
    if uncached is None:
        uncached = max(0, total_input - cache_read - cache_write)
    return {
        "input": uncached,
        "cache_read": cache_read,
        "cache_write": cache_write,
        "output": usage.get("output_tokens") or 0,
        "reasoning": usage.get("reasoning_tokens") or 0,
    }


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def saved_time(flow: http.HTTPFlow, *, end: bool) -> str:
    """When a flow read from a file happened, by its own timestamps (its response's end, or
    its request's start): a rebuilt record keeps its day, and budgets their periods. A
    timestamp a file cannot hold honestly (none, 0, not finite, out of range) gives now."""
    response = flow.response
    stamp = (response.timestamp_end or response.timestamp_start) if end and response else None
    stamp = stamp or flow.request.timestamp_start
    if isinstance(stamp, int | float) and not isinstance(stamp, bool) and stamp > 0:
        with contextlib.suppress(OverflowError, OSError, ValueError):
            return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="microseconds")
    return utc_now()


@dataclass(slots=True)
class Exchange:
    """What the bridge keeps about one flow between its request and its end."""

    interception_id: str
    flow: http.HTTPFlow
    provider: Provider
    identity: auth.Identity
    api: Api  # the API of the route; for passthrough flows, the provider's (error shape)
    request: RequestInfo | None = None  # None for passthrough flows (no interception)
    accumulator: Accumulator | None = None  # set with request
    tee: StreamTee | None = None
    masked: bool = False
    admission: Admission | None = None  # what governance let through (a slot to release)
    started_at: str = ""  # as recorded: budgets count the exchange in the period it started
    # What the upstream guard gave the request (a circuit's pass, a pooled key), and the
    # guard that gave it: its answer is settled there, whatever was reconfigured since.
    ticket: Ticket = NO_TICKET
    guard: UpstreamGuard | None = None
    labels: ExchangeLabels | None = None  # for the metrics, once recorded
    clock_start: float = 0.0  # time.monotonic() when recorded: the duration's start
    # The upstream secrets shown as hints in the flow until the wire (mitm_compat.before_send).
    concealed: auth.Concealed | None = field(default=None, repr=False)
    replay: Replay | None = None  # rebuilt from a saved flow: its rows carry this mark


class AIBridge:
    """Bridges AI API flows (aibridge.apis): authenticate, swap keys, record the exchange.

    Cases, decided by ``routing.classify``:
    - not a configured provider's traffic: untouched;
    - a POST to an API path its provider serves (``/v1/responses``, ``/v1/messages``):
      validated, authenticated, credential swapped, recorded;
    - an allow-listed provider path: authenticated and credential swapped, not recorded;
    - any other provider path: 403.
    """

    def __init__(self, default_config_dir: Path | None = None) -> None:
        self.config: Config | None = None
        self._router: Router | None = None  # the config's routes
        self._leaks: auth.LeakScan | None = None  # the config's tokens, looked for
        self.recorder: LogWriter | None = None
        self.prices: PriceBook | None = None
        self.governor: Governor | None = None
        self.guard: UpstreamGuard | None = None
        self.metrics: Metrics | None = None
        self._metrics_server: MetricsServer | None = None
        self._metrics_listen = ""  # where _metrics_server listens, as configured
        self._tally = ExchangeTally()
        self._console = LineBatch(log.info)
        self._default_config_dir = default_config_dir
        self._exchanges: dict[str, Exchange] = {}
        self._sockets: dict[str, SocketState] = {}
        self._concealment = ViewConcealment()  # mitmweb only
        self._mitmweb_url: str | None = None  # mitmweb's UI, noted on each interception
        self._mitm = mitm_compat.Installed(False, False)
        # Why the bridge has no configuration, while it has none (it then refuses traffic).
        self._config_error: str | None = None
        self._unconfigured_refusals = 0

    # ---- lifecycle -------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        self._mitm = mitm_compat.install()
        loader.add_option(
            "aibridge_config",
            str,
            "config.yaml",
            "AI Bridge configuration file (YAML). A relative path is looked up in the current "
            "directory, then next to addon.py.",
        )
        loader.add_option(
            "aibridge_db",
            str,
            "",
            "SQLite file for the AI Bridge audit log; overrides `database` in the config file.",
        )
        loader.add_option(
            "aibridge_metrics",
            str,
            "",
            "Address for AI Bridge's Prometheus metrics and health check, host:port (e.g. "
            "127.0.0.1:9464); overrides `metrics.listen` in the config file. Empty: off.",
        )
        loader.add_option(
            "aibridge_writer",
            str,
            "process",
            "Where the AI Bridge audit log is written from: a process of its own (keeps the "
            "proxy's event loop free), or a thread of mitmproxy's process.",
            choices=WRITER_MODES,
        )
        self._settle_repeated_options(
            loader.master.options, ("aibridge_config", "aibridge_db", "aibridge_metrics")
        )

    def _settle_repeated_options(self, options: Any, names: tuple[str, ...]) -> None:
        """``--set aibridge_db=x`` given twice. mitmproxy keeps a script's options aside until
        the script has declared them, then fails on the repeated value while it loads the
        script, in a place that logs nothing and leaves the script out: mitmdump would run
        without the bridge. The same value repeated is one value; different values stop
        mitmdump at start-up with an error naming the option."""
        deferred = getattr(options, "deferred", None)
        if not isinstance(deferred, dict):
            return
        for name in names:
            values = getattr(deferred.get(name), "val", None)
            if not isinstance(values, list) or len(values) < 2:
                continue
            if len(set(values)) == 1:
                del values[1:]
                continue
            del deferred[name]  # else mitmproxy drops the bridge silently, see above
            self._config_error = (
                f"--set {name} was given {len(values)} times with different values "
                f"({', '.join(map(repr, values))}): give it once"
            )
            log.error(f"AI Bridge: {self._config_error}")

    def configure(self, updated: set[str]) -> None:
        if updated & {"web_host", "web_port"}:
            self._mitmweb_url = mitmweb_url(ctx.options.web_host, ctx.options.web_port)
        if not updated & {"aibridge_config", "aibridge_db", "aibridge_metrics", "aibridge_writer"}:
            return
        if self.config is None and self._config_error is not None:
            return  # a start-up error (_settle_repeated_options): stay unconfigured, refuse
        try:
            self._configure()
        except Exception as e:
            if self.config is None:
                # Fails closed: with no configuration every request is refused (503).
                self._config_error = str(e)
            raise

    def _configure(self) -> None:
        path = self._config_path(ctx.options.aibridge_config)
        try:
            config = load_config(path)
        except ConfigError as e:
            raise exceptions.OptionsError(f"AI Bridge configuration error: {e}") from None
        for warning in config.warnings:
            log.warning(warning)
        db_path = ctx.options.aibridge_db or config.database
        mode = ctx.options.aibridge_writer
        if (
            self.recorder is None
            or self.recorder.path != str(db_path)
            or (mode == "process") != isinstance(self.recorder, WriterProcess)
        ):
            recorder = log_writer(db_path, mode)
            try:
                recorder.start()
            except RecorderError as e:
                raise exceptions.OptionsError(f"AI Bridge cannot open its database: {e}") from None
            if self.recorder is not None:
                self.recorder.close()
            self.recorder = recorder
            log.info(f"AI Bridge: recording to {recorder.where}")
        # Prices are loaded once here: the hooks only look them up.
        self.prices = PriceBook(config.pricing)
        governor = Governor(
            config.governance,
            self.recorder.path,
            functools.partial(_publish_budgets, self.recorder, config),
        )
        try:
            governor.start()
        except Exception as e:
            raise exceptions.OptionsError(
                f"AI Bridge cannot read budgets from its database {self.recorder.where}: "
                f"{addresses.scrub(str(e), str(db_path))}"
            ) from None
        if self.governor is not None:
            self.governor.stop()
        self.governor = governor
        self._configure_metrics(config)
        # A new guard: parked keys and open circuits start afresh, as after a restart.
        self.guard = UpstreamGuard(config.providers, config.circuit_breaker, config.key_pool)
        self.config = config
        self._router = Router(config)
        self._leaks = auth.LeakScan(config)
        self._config_error = None
        names = ", ".join(f"{p.name} ({p.base_url})" for p in config.providers)
        log.info(f"AI Bridge: {len(config.users)} user(s), providers: {names}")

    def _configure_metrics(self, config: Config) -> None:
        """The metrics endpoint: (re)started when its address or labels change; the counts
        survive any other reconfiguration."""
        listen = (ctx.options.aibridge_metrics or config.metrics.listen).strip()
        try:
            address = parse_listen(listen) if listen else None
        except ValueError as e:
            where = "--set aibridge_metrics" if ctx.options.aibridge_metrics else "metrics.listen"
            raise exceptions.OptionsError(f"AI Bridge: {where}: {e}") from None
        user_label = config.metrics.user_label
        if address is None:
            self._stop_metrics()
            self.metrics = None
            return
        if self.metrics is None or self.metrics.user_label != user_label:
            self.metrics = Metrics(
                user_label=user_label,
                recorder=self._recorder_gauge,
                circuits=self._circuit_gauges,
                keys=self._key_gauges,
                version=__version__,
            )
            self._stop_metrics()
        if self._metrics_server is not None and self._metrics_listen == listen:
            return
        self._stop_metrics()
        server = MetricsServer(self.metrics, self._health)
        try:
            server.start(*address)
        except OSError as e:
            raise exceptions.OptionsError(
                f"AI Bridge cannot serve metrics on {listen}: {e.strerror or e}; choose a free "
                "port (metrics.listen or --set aibridge_metrics=127.0.0.1:9464)"
            ) from None
        self._metrics_server, self._metrics_listen = server, listen
        host, port = server.address
        log.info(f"AI Bridge: metrics on http://{_url_host(host)}:{port}/metrics")

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server, self._metrics_listen = None, ""

    # Read on the metrics server's thread, at scrape time.
    def _recorder_gauge(self) -> RecorderGauge | None:
        recorder = self.recorder
        if recorder is None:
            return None
        stats = recorder.stats
        return RecorderGauge(stats["queue_depth"], stats["written"], stats["dropped"])

    def _circuit_gauges(self) -> list[CircuitGauge]:
        guard = self.guard
        if guard is None:
            return []
        return [
            CircuitGauge(c.provider, c.model, c.state.value, c.trips)
            for c in guard.circuit_snapshot()
        ]

    def _key_gauges(self) -> list[KeyGauge]:
        guard = self.guard
        if guard is None:
            return []
        return [
            KeyGauge(k.provider, k.index + 1, k.hint, k.state.value, k.parks)
            for k in guard.key_snapshot()
        ]

    def _health(self) -> tuple[int, dict[str, Any]]:
        recorder, guard = self.recorder, self.guard
        return health.health_report(
            version=__version__,
            configured=self.config is not None,
            database=recorder.health if recorder is not None else None,
            providers=guard.health() if guard is not None else {},
        )

    def _config_path(self, option: str) -> Path:
        path = Path(option).expanduser()
        if path.is_absolute() or path.exists() or self._default_config_dir is None:
            return path
        beside_addon = self._default_config_dir / path
        return beside_addon if beside_addon.exists() else path

    def running(self) -> None:
        # mitmproxy's start-up leaves ~100k long-lived objects; without this every full
        # garbage collection walks them all and stalls the event loop for 100+ ms.
        gc.freeze()
        self._concealment.start(ctx.master)
        if self.config is None:
            log.error(
                f"AI Bridge has no working configuration ({self._config_error or 'not loaded'})"
                ": every request is refused with 503 until it is fixed"
            )

    def done(self) -> None:
        self._concealment.stop()
        for flow_id in list(self._exchanges):
            self._finish_interrupted(self._exchanges.pop(flow_id))
        for state in self._sockets.values():
            while state.open_turns:
                self._finish_interrupted(state.open_turns.popleft())
        self._sockets.clear()
        if self.governor is not None:
            self.governor.stop()
        stats = None
        if self.recorder is not None:
            self.recorder.close()
            stats = self.recorder.stats
            self.recorder = None
        self._stop_metrics()
        self._console.flush()
        log.info(self._tally.summary(stats))

    # ---- request side ----------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._concealment.active or self.config is None or not flow.live:
            return
        if self._route(flow, flow.request.headers).kind is not RouteKind.UNRELATED:
            self._concealment.conceal(flow, auth.CLIENT_CREDENTIAL_HEADERS)

    # A compressed request body is decoded, for parsing only, up to this size (a long Codex
    # history with images is a few MB); past it the client gets 413.
    MAX_REQUEST_DECODED_BYTES = 32 << 20
    # Where the body decoded off the loop waits for _validate: an attribute of the flow
    # object, not metadata, so it is never saved or shown.
    _DECODED_BODY = "_aibridge_decoded_body"

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        try:
            if self._decodes_off_loop(flow):
                # mitmproxy awaits it; uncompressed requests never leave this fast path.
                return self._decoded_request(flow)
            self._request(flow)
        except Exception:
            self._fail_closed(flow)
        return None

    async def _decoded_request(self, flow: http.HTTPFlow) -> None:
        """A compressed bridged request: its body is decoded on a worker thread (a bomb must
        not stall other clients), then handled as any other request."""
        try:
            req = flow.request
            decoded: bytes | ValueError
            try:
                decoded = await decode_body_in_thread(
                    req.raw_content or b"",
                    header_value(req.headers, b"content-encoding"),
                    self.MAX_REQUEST_DECODED_BYTES,
                )
            except ValueError as e:  # unsupported, corrupt or too large: _validate refuses it
                decoded = e
            setattr(flow, self._DECODED_BODY, decoded)
            self._request(flow)
        except Exception:
            self._fail_closed(flow)
        finally:
            with contextlib.suppress(AttributeError):
                delattr(flow, self._DECODED_BODY)

    def _decodes_off_loop(self, flow: http.HTTPFlow) -> bool:
        """A compressed body of a Responses request from a known client: decoded off the
        loop. Anyone else is refused (401) before anything is decoded."""
        req = flow.request
        encoding = header_value(req.headers, b"content-encoding")
        if not encoding or not req.raw_content or encoding.strip().lower() == "identity":
            return False
        if self.config is None or not flow.live or flow.response is not None:
            return False
        self._concealment.reveal(flow)  # mitmweb: the token is hidden until now ...
        try:
            headers = header_view(req.headers)
            route = self._route(flow, headers)
            if route.kind is not RouteKind.BRIDGED or route.provider is None:
                return False
            auth.identify(self.config, route.provider, headers, flow.metadata)
        except auth.AuthError:
            return False
        finally:  # ... and stays hidden while the body is decoded
            if self._concealment.active:
                self._concealment.conceal(flow, auth.CLIENT_CREDENTIAL_HEADERS)
        return True

    def _fail_closed(self, flow: http.HTTPFlow) -> None:
        # A request the bridge could not judge never reaches a provider.
        log.exception("AI Bridge: failed to handle request of flow %s", flow.id)
        exchange = self._exchanges.pop(flow.id, None)
        if exchange is not None:
            self._release(exchange)
        state = self._sockets.pop(flow.id, None)
        for turn in state.open_turns if state is not None else ():
            self._release(turn)
        self._concealment.forget(flow)
        if flow.live and flow.response is None:
            message = "AI Bridge failed on this request and did not forward it; see its log"
            self._refuse(flow, 500, message, None, self._api_guess(flow), "bridge_error")

    def _route(self, flow: http.HTTPFlow, headers: Mapping[str, str]) -> Route:
        assert self._router is not None
        req = flow.request
        return self._router.route(
            req.method,
            req.host,
            req.port,
            req.path,
            websocket_upgrade=headers.get("upgrade", "").lower() == "websocket",
        )

    def _api_guess(self, flow: http.HTTPFlow) -> Api:
        """The API whose error shape answers a request the bridge could not classify."""
        if self.config is not None:
            with contextlib.suppress(Exception):
                route = self._route(flow, header_view(flow.request.headers))
                if route.api is not None:
                    return route.api
                if route.provider is not None:
                    return apis.for_provider(route.provider.apis)
        return apis.for_path(flow.request.path)

    def _request(self, flow: http.HTTPFlow) -> None:
        self._concealment.reveal(flow)
        if flow.live and flow.response is None and self._is_health_check(flow):
            status, body = self._health()
            content = b"" if flow.request.method == "HEAD" else orjson.dumps(body)
            flow.response = http.Response.make(
                status, content, {"content-type": "application/json"}
            )
            return
        if self.config is None:
            if flow.live and flow.response is None:
                self._refuse_unconfigured(flow)
            return
        if not flow.live:
            self._replay_request(flow)
            return
        if flow.response is not None:
            return
        req = flow.request
        headers = header_view(req.headers)
        route = self._route(flow, headers)
        if route.kind is RouteKind.UNRELATED:
            self._keep_tokens_in(flow, headers)
            return
        assert route.provider is not None
        # Every answer of the bridge's own is in the shape the client's API uses.
        api = route.api or apis.for_provider(route.provider.apis)
        if route.kind is RouteKind.FORBIDDEN:
            message = f"{route.api_path or req.path} is not available through AI Bridge"
            self._refuse(flow, 403, message, None, api, "forbidden_path", route.provider)
            return
        try:
            identity = auth.identify(self.config, route.provider, headers, flow.metadata)
        except auth.AuthError as e:
            labels = None
            if route.kind is RouteKind.BRIDGED:
                labels = self._record_rejection(flow, route, None, 401, str(e))
            self._refuse(flow, 401, str(e), None, api, "unauthenticated", route.provider, labels)
            return
        # The credential headers are replaced below; a bridge token anywhere else would
        # reach the provider.
        others = {
            name: value
            for name, value in headers.items()
            if name not in auth.CLIENT_CREDENTIAL_HEADERS
        }
        assert self._leaks is not None
        owner = self._leaks.owner(others, req.path.partition("?")[2])
        if owner is not None:
            message = (
                "this request carries an AI Bridge token outside the API key header; "
                "send it only as the API key (Authorization: Bearer <token>)"
            )
            labels = None
            if route.kind is RouteKind.BRIDGED:
                labels = self._record_rejection(flow, route, identity, 403, message)
            self._refuse(
                flow, 403, message, identity.user_id, api, "token_leak", route.provider, labels
            )
            return
        if route.kind is RouteKind.WEBSOCKET and self.config.websocket == "refuse":
            # Fast and final, so clients fall back to HTTP at once.
            message = "AI Bridge takes the Responses API over HTTP: use POST /v1/responses"
            self._refuse(
                flow, 426, message, identity.user_id, api, "websocket_refused", route.provider
            )
            return
        verdict: Admission | Refusal | None = None
        if route.kind is RouteKind.BRIDGED:
            info = self._validate(flow, route, identity)
            if info is None:
                return
            verdict = self._governed(identity, info)
            if isinstance(verdict, Refusal):
                self._reject_for(flow, route, identity, verdict, info)
                return
        else:
            info = None
        admission = verdict if isinstance(verdict, Admission) else None
        passed = self._pass_upstream(flow, route, identity, api, info, admission)
        if passed is None:
            return
        ticket, identity = passed
        if route.kind is RouteKind.WEBSOCKET:
            self._sockets[flow.id] = SocketState(route.provider, identity, api)
        exchange = Exchange(uuid.uuid4().hex, flow, route.provider, identity, api, info)
        exchange.admission = admission
        exchange.ticket, exchange.guard = ticket, self.guard
        if info is not None:
            exchange.accumulator = api.new_accumulator()
        # Known from here on: a failure below gives the admission's slot back (_fail_closed).
        self._exchanges[flow.id] = exchange
        if info is not None:
            self._amend(flow, api, info)
        self._retarget(flow, route)
        auth.install_credentials(req.headers, route.provider, identity)
        if self._mitm.before_send:
            # The flow shows hints; the real values are put in just for the wire.
            names = auth.upstream_credential_headers(route.provider)
            exchange.concealed = auth.conceal(req.headers, names)
            mitm_compat.before_send(flow, functools.partial(self._on_the_wire, exchange))
        if info is not None:
            _note(
                flow,
                api,
                exchange.interception_id,
                identity.user_id,
                identity.credential_kind,
                identity.credential_hint,
                request=info,
                provider=route.provider.name,
            )
            self._record_start(flow, exchange, headers=headers)

    def _is_health_check(self, flow: http.HTTPFlow) -> bool:
        """``GET /_aibridge/health`` addressed to the bridge: in reverse mode (a load
        balancer in front), to a provider's host, or to the proxy's own address."""
        req = flow.request
        if req.path.partition("?")[0] != health.HEALTH_PATH or req.method not in ("GET", "HEAD"):
            return False
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return True
        sockname = flow.client_conn.sockname
        if sockname and req.port == sockname[1] and req.host in (sockname[0], "localhost"):
            return True
        return self.config is not None and (
            self._route(flow, header_view(req.headers)).kind is not RouteKind.UNRELATED
        )

    def _pass_upstream(
        self,
        flow: http.HTTPFlow,
        route: Route,
        identity: auth.Identity,
        api: Api,
        info: RequestInfo | None,
        admission: Admission | None,
    ) -> tuple[Ticket, auth.Identity] | None:
        """The upstream guard (DESIGN §10): the model's circuit, a key of the provider's pool.
        None when it refused (answered and recorded here); else its ticket and the identity
        the request goes upstream with (the pool's key, whose hint is recorded)."""
        if self.guard is None:
            return NO_TICKET, identity
        assert route.provider is not None
        model = None if info is None else info.model or ""  # None: no model call, no circuit
        pooled = identity.credential_kind == "centralized"
        passed = self.guard.admit(route.provider, model, pooled)
        if isinstance(passed, Refusal):
            if self.governor is not None:
                self.governor.release(admission)
            self._refuse_upstream(flow, route, identity, api, passed, info)
            return None
        if passed.key is not None:
            identity = dataclasses.replace(
                identity, upstream_key=passed.key.key, credential_hint=passed.key.hint
            )
        return passed, identity

    def _replay_request(self, flow: http.HTTPFlow) -> None:
        """A flow read from a file (offline mode): rebuild its records, never authenticate.

        Who sent it is taken from what the bridge noted on the flow when it was live.
        """
        assert self.config is not None
        noted = flow.metadata.get(METADATA_KEY)
        req = flow.request
        route = classify(self.config, req.method, req.host, req.port, req.path)
        if not isinstance(noted, dict) or req.method != "POST":
            return
        route = as_noted(self.config, route, noted.get("provider"))
        if route.kind is not RouteKind.BRIDGED:
            return
        assert route.provider is not None and route.api is not None
        identity = None
        if noted.get("initiator_id") is not None:
            identity = auth.Identity(
                str(noted.get("initiator_id")),
                str(noted.get("credential_kind")),
                "",
                str(noted.get("credential_hint")),
            )
        try:
            _, info = route.api.parse_request(self._request_body(flow))
        except (RequestError, ValueError):
            info = None
        if info is not None and isinstance(noted.get("request"), dict):
            info.metadata = noted["request"]  # the body saved is the one sent, edited
        # The writer writes the records only if the log does not hold this interception yet
        # (a file opened again, a flow in it twice). Without a noted id, one made from the
        # flow's, so that reading it again finds it too, as does a log that has the flow.
        interception_id = noted.get("interception_id")
        replay = Replay()
        if not isinstance(interception_id, str) or not interception_id:
            interception_id = uuid.uuid5(uuid.NAMESPACE_URL, f"aibridge:flow:{flow.id}").hex
            replay = Replay(flow_id=flow.id)
        rejected = noted.get("rejected")
        if isinstance(rejected, dict):
            status, message = rejected.get("status"), rejected.get("message")
            if isinstance(status, int) and isinstance(message, str):
                # The live record had the request's fields only if it got that far (501).
                kept = info if rejected.get("request_read") else None
                noted = {**noted, "interception_id": interception_id}
                self._record_rejection(
                    flow, route, identity, status, message, kept, noted=noted, replay=replay
                )
            return
        if identity is None or info is None:
            return
        exchange = Exchange(
            interception_id,
            flow,
            route.provider,
            identity,
            route.api,
            info,
            route.api.new_accumulator(),
            masked=True,  # saved already masked
            replay=replay,
        )
        self._exchanges[flow.id] = exchange
        self._record_start(flow, exchange)

    def _validate(
        self, flow: http.HTTPFlow, route: Route, identity: auth.Identity
    ) -> RequestInfo | None:
        assert route.api is not None
        try:
            body = self._request_body(flow)
        except DecodeLimitExceeded as e:
            message = f"request body too large: {e}"
            return self._reject(flow, route, identity, 413, message, reason="too_large")
        except ValueError as e:
            message = f"request body cannot be decoded: {e}"
            return self._reject(flow, route, identity, 400, message, reason="invalid_request")
        try:
            _, info = route.api.parse_request(body)
        except RequestError as e:
            return self._reject(flow, route, identity, 400, str(e), reason="invalid_request")
        refusal = route.api.refusal(info)
        if refusal is not None:
            return self._reject(flow, route, identity, *refusal, info, reason="unsupported")
        return info

    def _governed(self, identity: auth.Identity, info: RequestInfo) -> Admission | Refusal:
        """Budgets and limits (DESIGN §9); a refusal's detail goes into the request's record."""
        if self.governor is None or not self.governor.enabled:
            return FREE_ADMISSION
        verdict = self.governor.admit(identity.user_id, identity.credential_kind)
        if isinstance(verdict, Refusal):
            info.metadata = {**(info.metadata or {}), "limit": verdict.detail}
        return verdict

    def _amend(self, flow: http.HTTPFlow, api: Api, info: RequestInfo) -> None:
        """The one edit the API may make to the body before it goes upstream (DESIGN §2)."""
        if api.amend_request is None:
            return
        req = flow.request
        encoding = header_value(req.headers, b"content-encoding").strip().lower()
        body = req.raw_content or b""
        amended = api.amend_request(body, info, self.config, encoding not in ("", "identity"))
        if amended is None:
            return
        req.raw_content = amended
        if "content-length" in req.headers:
            req.headers["content-length"] = str(len(amended))

    def _request_body(self, flow: http.HTTPFlow) -> bytes:
        """The body for parsing: decoded (bounded) if compressed, never put back in the flow,
        which forwards the original bytes. Raises ValueError if it cannot be decoded."""
        decoded = getattr(flow, self._DECODED_BODY, None)
        if decoded is not None:  # by _decoded_request, off the loop
            delattr(flow, self._DECODED_BODY)
            if isinstance(decoded, ValueError):
                raise decoded
            return decoded
        req = flow.request
        encoding = header_value(req.headers, b"content-encoding")
        if not encoding:
            return req.raw_content or b""
        return decode_body(req.raw_content or b"", encoding, self.MAX_REQUEST_DECODED_BYTES)

    def _reject(
        self,
        flow: http.HTTPFlow,
        route: Route,
        identity: auth.Identity | None,
        status: int,
        message: str,
        info: RequestInfo | None = None,
        *,
        reason: str,
    ) -> None:
        """Refuse a bridged request and record it as rejected."""
        labels = self._record_rejection(flow, route, identity, status, message, info)
        assert route.api is not None
        user_id = identity.user_id if identity else None
        self._refuse(flow, status, message, user_id, route.api, reason, route.provider, labels)
        return None

    def _reject_for(
        self,
        flow: http.HTTPFlow,
        route: Route,
        identity: auth.Identity,
        refusal: Refusal,
        info: RequestInfo,
    ) -> None:
        """A bridged request a limit or the upstream guard refused (DESIGN §9, §10)."""
        self._reject(
            flow,
            route,
            identity,
            refusal.status,
            refusal.message,
            info,
            reason=refusal_reason(refusal),
        )
        assert flow.response is not None
        flow.response.headers.update(refusal.headers)

    def _refuse_upstream(
        self,
        flow: http.HTTPFlow,
        route: Route,
        identity: auth.Identity,
        api: Api,
        refusal: Refusal,
        info: RequestInfo | None,
    ) -> None:
        """An open circuit, or every key parked: the bridge answers the wait itself."""
        if info is not None:
            info.metadata = {**(info.metadata or {}), "upstream": refusal.detail}
            self._reject_for(flow, route, identity, refusal, info)
            return
        reason = refusal_reason(refusal)
        self._refuse(
            flow, refusal.status, refusal.message, identity.user_id, api, reason, route.provider
        )
        assert flow.response is not None
        flow.response.headers.update(refusal.headers)

    def _keep_tokens_in(self, flow: http.HTTPFlow, headers: Mapping[str, str]) -> None:
        """A request for a host that is not a provider must not carry a bridge token out
        (a client pointed at the real API with its bridge token, say): refused."""
        assert self._leaks is not None
        owner = self._leaks.owner(headers, flow.request.path.partition("?")[2])
        if owner is None:
            return
        host = flow.request.pretty_host
        log.warning(
            f"AI Bridge: refused a request of {owner.id} to {host}: it carries their bridge "
            "token, which must not leave the bridge"
        )
        message = (
            f"this request carries your AI Bridge token and goes to {host}, which is not a "
            "provider of this bridge: refused so that the token does not leave the bridge"
        )
        self._refuse(flow, 403, message, owner.id, apis.for_path(flow.request.path), "token_leak")

    def _refuse_unconfigured(self, flow: http.HTTPFlow) -> None:
        """Fail closed: without a working configuration nobody can be identified, and no
        flow can be told to be a provider's, so every request is refused."""
        self._unconfigured_refusals += 1
        if self._unconfigured_refusals == 1 or self._unconfigured_refusals % 1000 == 0:
            log.error(
                f"AI Bridge has no working configuration ({self._config_error or 'not loaded'}):"
                f" refusing every request ({self._unconfigured_refusals} so far); fix the "
                "configuration and restart"
            )
        message = (
            "AI Bridge is not configured and refuses all traffic; "
            "its operator must fix the configuration (see the bridge's log)"
        )
        self._refuse(flow, 503, message, None, apis.for_path(flow.request.path), "unconfigured")

    def _refuse(
        self,
        flow: http.HTTPFlow,
        status: int,
        message: str,
        user_id: str | None,
        api: Api,
        reason: str,
        provider: Provider | None = None,
        labels: ExchangeLabels | None = None,
    ) -> None:
        """Answer the client ourselves, in its API's error shape: the provider never sees
        the request. ``labels``: the rejection was recorded (an interception of its own)."""
        metrics = self.metrics
        if metrics is not None:
            if labels is not None:
                metrics.rejected(labels, reason)
            else:
                metrics.refused(provider.name if provider else "", api.name, reason)
        auth.mask_client_credentials(flow.request.headers)
        flow.response = error_response(api, status, message)
        flow.comment = f"{user_id or 'unknown client'} · refused {status}: {message}"
        flow.marked = ":no_entry:"

    @staticmethod
    def _retarget(flow: http.HTTPFlow, route: Route) -> None:
        provider = route.provider
        assert provider is not None
        if route.upstream_path is None:
            # Found by host: "API.OpenAI.com." goes to the provider's own spelling.
            if flow.request.host != provider.host:
                flow.request.host = provider.host
            return
        flow.request.scheme = provider.scheme
        flow.request.host = provider.host
        flow.request.port = provider.port
        flow.request.path = route.upstream_path

    # ---- response side ---------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = self._exchanges.get(flow.id)
        if exchange is None or flow.response is None:
            return
        response = flow.response
        # A secret upstream echoes is masked before anything (mitmweb, -w) sees the headers.
        secrets = echo.secrets_for(exchange.provider, exchange.identity.upstream_key)
        if secrets:
            echo.mask_headers(response.headers, secrets)
        self._mask(flow, exchange)
        if exchange.admission is not None and exchange.admission.warnings:
            response.headers[WARNING_HEADER] = warning_header(exchange.admission.warnings)
        content_type = header_value(response.headers, b"content-type")
        sse = exchange.request is not None and content_type.lower().startswith("text/event-stream")
        # Streamed: our SSE tee, or a large body mitmproxy streams by itself (stream=True).
        if not flow.live or not (sse or response.stream is True):
            return
        encoding = header_value(response.headers, b"content-encoding")
        masker = echo.stream_masker(secrets, encoding, functools.partial(echo.kill, flow))
        if isinstance(masker, echo.StreamMasker):
            # Masking shortens the body: a length upstream announced would be wrong.
            response.headers.pop("content-length", None)
        if sse:
            assert exchange.accumulator is not None
            exchange.tee = StreamTee(exchange.accumulator, exchange.api, encoding, masker)
            response.stream = exchange.tee
        elif masker is not None:
            response.stream = echo.MaskedStream(masker)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._concealment.forget(flow)
        # Set only when mitmproxy is about to answer the client itself (mitm_compat).
        answerable = mitm_compat.answerable_status(flow)
        error = flow.error.msg if flow.error else "unknown error"
        exchange = self._exchanges.get(flow.id)
        if exchange is None:
            return
        if answerable is not None and flow.response is None:
            message = f"AI Bridge could not reach provider {exchange.provider.name!r}: {error}"
            flow.response = error_response(exchange.api, int(answerable), message)
            self._finish(flow, error, answered=True)
            return
        self._finish(flow, self._explain_silence(flow, exchange, error))

    def _on_the_wire(self, exchange: Exchange) -> None:
        """Right before mitmproxy serialises the request head (mitm_compat.before_send)."""
        if exchange.concealed is not None:
            auth.reveal(exchange.flow.request.headers, exchange.concealed)
            exchange.concealed = None
            exchange.masked = False  # the real values are in the flow again, for now
        # Runs once the head is written: nothing else runs on the loop in between. (Without
        # a loop, never the case in the proxy, the flow is masked at the response.)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_soon(self._mask, exchange.flow, exchange)

    @staticmethod
    def _explain_silence(flow: http.HTTPFlow, exchange: Exchange, error: str) -> str:
        """mitmproxy reports its tcp_timeout, which closes a connection on which nothing
        moved, as "Client disconnected."; when upstream was silent that long, say so."""
        if "client disconnected" not in error.lower():
            return error
        timeout = float(ctx.options.tcp_timeout)
        seen = [flow.request.timestamp_end or flow.request.timestamp_start]
        if flow.response is not None:
            seen.append(flow.response.timestamp_start)
        if exchange.tee is not None:
            seen.append(exchange.tee.last_chunk_at)
        silent = time.time() - max(t for t in seen if t is not None)
        if timeout <= 0 or silent < 0.95 * timeout:
            return error
        return (
            f"upstream sent nothing for {silent:.1f} s, so mitmproxy's tcp_timeout "
            f"({timeout:g} s) closed the connection"
        )

    def _mask(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        if not exchange.masked:
            if exchange.concealed is None:  # else the flow shows the hints already
                auth.mask_credentials(flow.request.headers, exchange.provider)
            exchange.masked = True

    def _finish(self, flow: http.HTTPFlow, error: str | None, answered: bool = False) -> None:
        exchange = self._exchanges.pop(flow.id, None)
        if exchange is None:
            return
        # ``answered``: mitmproxy could not reach upstream (the error hook), so no status.
        self._release(exchange, None if answered else flow.response, unreachable=answered)
        # A buffered body (streams were masked chunk by chunk) is masked before the records,
        # mitmweb and -w read it; one that cannot be checked is replaced by our 502.
        if flow.response is not None and not answered:
            secrets = echo.secrets_for(exchange.provider, exchange.identity.upstream_key)
            refusal = echo.mask_buffered(flow.response, secrets) if secrets else None
            if refusal is not None:
                log.warning(f"AI Bridge: flow {flow.id}: {refusal}")
                flow.response = error_response(exchange.api, 502, f"AI Bridge: {refusal}")
                error, answered = refusal, True
        masker = exchange.tee.masker if exchange.tee is not None else None
        if masker is not None and masker.cut is not None:
            error = masker.cut  # the bridge cut the stream: that is how it ended
        self._mask(flow, exchange)
        if exchange.request is None or exchange.accumulator is None:
            if self.metrics is not None and flow.websocket is None:
                status = flow.response.status_code if flow.response is not None else None
                self.metrics.passthrough(exchange.provider.name, flow.request.method, status)
            return
        try:
            # A response the bridge answered with is not upstream's: judge by the error.
            response = None if answered else flow.response
            outcome = finish_exchange(
                exchange.api, exchange.accumulator, exchange.tee, response, error
            )
            self._record_end(flow, exchange, outcome)
        except Exception:  # an addon must never take a flow down with it
            log.exception("AI Bridge: failed to record flow %s", flow.id)

    def _release(
        self,
        exchange: Exchange,
        response: http.Response | None = None,
        *,
        unreachable: bool = False,
    ) -> None:
        """However an exchange ends: its governance slot back, its upstream answer (the
        response upstream sent, if any) to the circuit and the key it used."""
        if self.governor is not None:
            self.governor.release(exchange.admission)
        if exchange.guard is not None and exchange.ticket is not NO_TICKET:
            ticket, exchange.ticket = exchange.ticket, NO_TICKET  # settled once
            status = response.status_code if response is not None else None
            headers = response.headers if response is not None else None
            exchange.guard.settle(ticket, status, headers, unreachable=unreachable)

    def _finish_interrupted(self, exchange: Exchange) -> None:
        """At shutdown: a flow still in flight is recorded as cut, and its key masked now,
        because mitmproxy saves active flows (``-w``) after this addon's ``done``."""
        self._release(exchange)
        self._mask(exchange.flow, exchange)
        if exchange.request is None or exchange.accumulator is None:
            return
        outcome = finish_exchange(
            exchange.api,
            exchange.accumulator,
            exchange.tee,
            None,
            "the bridge shut down during the exchange",
        )
        if not outcome.result.terminal_seen:
            outcome.status = "shutdown"
        usage = self._write_end(exchange, outcome, None)
        if exchange.flow.websocket is not None:
            self._annotate_turn(exchange, outcome, usage)  # one turn of the socket's comment
        else:
            self._annotate(exchange, outcome)

    # ---- WebSocket transport ---------------------------------------------------------------

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        state = self._sockets.get(flow.id)
        if state is None or flow.websocket is None:
            return
        message = flow.websocket.messages[-1]
        try:
            if message.from_client:
                self._socket_request(flow, state, message)
            else:
                if not message.injected:
                    # An echoed secret: masked before the client, the log and mitmweb see it.
                    secrets = echo.secrets_for(state.provider, state.identity.upstream_key)
                    masked = echo.mask_bytes(message.content, secrets)
                    if masked is not message.content:
                        message.content = masked
                self._socket_event(flow, state, message)
        except Exception:  # an addon must never take a socket down with it
            log.exception("AI Bridge: failed to handle a WebSocket message of flow %s", flow.id)
            if message.from_client:
                # Fail closed, as for HTTP: what the bridge could not judge is not forwarded.
                message.drop()
                text = "AI Bridge failed on this message and did not forward it; see its log"
                with contextlib.suppress(Exception):
                    event = error_event(500, text)
                    ctx.master.commands.call("inject.websocket", flow, True, event, True)

    def _socket_request(
        self, flow: http.HTTPFlow, state: SocketState, message: websocket.WebSocketMessage
    ) -> None:
        content = message.content
        api = state.api
        route = Route(RouteKind.WEBSOCKET, state.provider, api.path, api=api)
        try:
            # Judged by decoding: a message the bridge cannot judge is refused, not forwarded.
            info = read_turn(content, message.is_text)
        except RequestError as e:
            self._refuse_on_socket(
                flow, message, route, state, 400, str(e), None, "invalid_request"
            )
            return
        if info is None:
            return  # other client events (e.g. response.cancel) go through untouched
        refusal = api.refusal(info)
        if refusal is not None:
            self._refuse_on_socket(flow, message, route, state, *refusal, info, "unsupported")
            return
        verdict = self._governed(state.identity, info)
        if isinstance(verdict, Refusal):
            self._refuse_on_socket(
                flow,
                message,
                route,
                state,
                verdict.status,
                verdict.message,
                info,
                refusal_reason(verdict),
            )
            return
        guard, ticket = self.guard, NO_TICKET
        if guard is not None:
            # The socket's key was chosen at its handshake; each turn passes its circuit.
            passed = guard.admit(state.provider, info.model or "", pooled=False)
            if isinstance(passed, Refusal):
                if self.governor is not None:
                    self.governor.release(verdict)
                info.metadata = {**(info.metadata or {}), "upstream": passed.detail}
                self._refuse_on_socket(
                    flow,
                    message,
                    route,
                    state,
                    passed.status,
                    passed.message,
                    info,
                    refusal_reason(passed),
                )
                return
            ticket = passed
        info.stream = True  # WebSocket mode always streams
        turn = Exchange(
            uuid.uuid4().hex,
            flow,
            state.provider,
            state.identity,
            api,
            info,
            api.new_accumulator(),
            masked=True,
            admission=verdict,
            ticket=ticket,
            guard=guard,
        )
        try:
            self._record_start(flow, turn, len(content))
        except BaseException:
            self._release(turn)  # the message is dropped (websocket_message): no turn holds it
            raise
        state.open_turns.append(turn)  # only once recorded: a failure above drops the message

    def _refuse_on_socket(
        self,
        flow: http.HTTPFlow,
        message: websocket.WebSocketMessage,
        route: Route,
        state: SocketState,
        status: int,
        text: str,
        info: RequestInfo | None,
        reason: str,
    ) -> None:
        """Drop the message (the provider never sees it) and answer with an error event."""
        message.drop()
        labels = self._record_rejection(flow, route, state.identity, status, text, info)
        refused = mitmweb.TurnEnd("rejected", text, info.model if info else None)
        mitmweb.note_turn(flow, state.identity.user_id, refused)
        if self.metrics is not None and labels is not None:
            self.metrics.rejected(labels, reason)
        ctx.master.commands.call("inject.websocket", flow, True, error_event(status, text), True)

    def _socket_event(
        self, flow: http.HTTPFlow, state: SocketState, message: websocket.WebSocketMessage
    ) -> None:
        # Injected messages (the bridge's own error events, mitmweb's) are not the provider's.
        if message.injected or not state.open_turns or not worth_decoding(message.content):
            return
        event = read_server_event(message.content)
        turn = state.turn_for(event)
        if turn is None:
            return
        turn.accumulator.feed_decoded(None, event)
        if turn.accumulator.ended:
            state.close(turn)
            self._release(turn)
            outcome = finish_exchange(turn.api, turn.accumulator, None, None, None)
            usage = self._write_end(turn, outcome, 101)
            self._annotate_turn(turn, outcome, usage)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        state = self._sockets.pop(flow.id, None)
        if state is None:
            return
        ws = flow.websocket
        if flow.error is not None:
            why = flow.error.msg
        elif ws is not None and ws.closed_by_client:
            why = f"Client disconnected: the client closed the WebSocket (code {ws.close_code})"
        else:
            code = ws.close_code if ws is not None else None
            why = f"the WebSocket closed before the response ended (code {code})"
        while state.open_turns:
            turn = state.open_turns.popleft()
            self._release(turn)
            outcome = finish_exchange(turn.api, turn.accumulator, None, None, why)
            usage = self._write_end(turn, outcome, 101)
            self._annotate_turn(turn, outcome, usage)

    @staticmethod
    def _annotate_turn(turn: Exchange, outcome: Outcome, usage: Mapping[str, Any]) -> None:
        """What mitmweb shows of the WebSocket: its comment counts the turn. `usage`: the
        turn's usage row as recorded (its cost included), empty when it had none."""
        result, info = outcome.result, turn.request
        model = result.response_model or (info.model if info else None)
        end = mitmweb.TurnEnd(
            outcome.status,
            outcome.error,
            model,
            result.token_usage,
            usage.get("estimated_cost_usd"),
        )
        mitmweb.note_turn(turn.flow, turn.identity.user_id, end)

    # ---- records -----------------------------------------------------------------------------

    def _record_start(
        self,
        flow: http.HTTPFlow,
        exchange: Exchange,
        request_bytes: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if self.recorder is None or exchange.request is None:
            return
        replayed = exchange.replay is not None
        exchange.started_at = saved_time(flow, end=False) if replayed else utc_now()
        row = rows.interception_start(
            interception_id=exchange.interception_id,
            flow_id=flow.id,
            started_at=exchange.started_at,
            provider=exchange.provider,
            api=exchange.api,
            info=exchange.request,
            headers=flow.request.headers if headers is None else headers,
            identity=exchange.identity,
            request_bytes=len(flow.request.raw_content or b"")
            if request_bytes is None
            else request_bytes,
            mitmweb_url=self._mitmweb_url,
        )
        self.recorder.upsert("interceptions", row, exchange.replay)
        exchange.labels = _labels(row)
        exchange.clock_start = time.monotonic()
        if self.metrics is not None:
            self.metrics.started(exchange.labels)

    def _record_rejection(
        self,
        flow: http.HTTPFlow,
        route: Route,
        identity: auth.Identity | None,
        status: int,
        message: str,
        info: RequestInfo | None = None,
        *,
        noted: dict[str, Any] | None = None,
        replay: Replay | None = None,
    ) -> ExchangeLabels | None:
        """Record a refused request. `noted`: what the live bridge noted on a flow read back
        from a file (offline mode), which keeps the id and the credential's hint; `replay`
        marks its rows. Returns the labels its metrics count it under."""
        if self.recorder is None or route.provider is None:
            return None
        now = saved_time(flow, end=False) if replay is not None else utc_now()
        token = auth.presented_token(flow.request.headers)
        row = rows.interception_start(
            interception_id=str(noted["interception_id"]) if noted else uuid.uuid4().hex,
            flow_id=flow.id,
            started_at=now,
            provider=route.provider,
            api=route.api or apis.for_provider(route.provider.apis),
            info=info,
            headers=flow.request.headers,
            identity=identity,
            request_bytes=len(flow.request.raw_content or b""),
            mitmweb_url=self._mitmweb_url,
        )
        if noted is not None:
            row["credential_hint"] = noted.get("credential_hint")
        elif identity is None and token is not None:
            row["credential_hint"] = auth.hint(token)
        row.update(ended_at=now, http_status=status, status="rejected", error=message)
        self.recorder.upsert("interceptions", row, replay)
        labels = _labels(row)
        self._tell(
            FinishedExchange(
                labels.user,
                labels.provider,
                labels.api,
                labels.model,
                "rejected",
                status,
                error=message,
            )
        )
        if noted is None and flow.websocket is None:
            rejected = {"status": status, "message": message, "request_read": info is not None}
            _note(
                flow,
                route.api or apis.for_provider(route.provider.apis),
                row["id"],
                row["initiator_id"],
                row["credential_kind"],
                row["credential_hint"],
                rejected,
                request=info,
                provider=route.provider.name,
            )
        if info is not None and info.prompt is not None and self.config is not None:
            self.recorder.insert(
                "user_prompts",
                rows.prompt_row(row["id"], None, info.prompt, self.config.privacy, now),
                replay,
            )
        return labels

    def _record_end(self, flow: http.HTTPFlow, exchange: Exchange, outcome: Outcome) -> None:
        self._write_end(exchange, outcome, flow.response.status_code if flow.response else None)
        self._annotate(exchange, outcome)

    @staticmethod
    def _annotate(exchange: Exchange, outcome: Outcome) -> None:
        """What mitmweb shows in its flow list."""
        exchange.flow.comment = rows.flow_comment(
            exchange.identity.user_id, exchange.request, outcome
        )
        if outcome.status != "completed":
            exchange.flow.marked = ":warning:"

    def _write_end(
        self, exchange: Exchange, outcome: Outcome, http_status: int | None
    ) -> Mapping[str, Any]:
        """Record the exchange's end; returns its usage row (empty without one)."""
        if self.recorder is None or self.config is None or exchange.request is None:
            return {}
        now = saved_time(exchange.flow, end=True) if exchange.replay is not None else utc_now()
        # A sign-in (ChatGPT, Claude Pro/Max) is paid by its plan, not per token.
        signed_in = exchange.identity.credential_kind in auth.SIGN_IN_KINDS
        prices = None if signed_in else self.prices
        usage: dict[str, Any] = {}
        prompts = tool_calls = 0
        for table, row in rows.end_rows(
            exchange.interception_id,
            exchange.request,
            outcome,
            http_status,
            self.config.privacy,
            now,
            prices,
            provider_type=exchange.provider.type,
        ):
            # A replay's spend is the log's to tell (the writer may find it there already).
            if table == "token_usages" and self.governor is not None and exchange.replay is None:
                # Counted before the row is queued: the log reader must find it pending.
                self.governor.record_use(
                    exchange.identity.user_id,
                    exchange.identity.credential_kind,
                    exchange.interception_id,
                    exchange.started_at,
                    row.get("estimated_cost_usd") or 0.0,
                    row.get("total_tokens") or 0,
                )
            if table == "interceptions":
                self.recorder.upsert(table, row, exchange.replay)
            else:
                self.recorder.insert(table, row, exchange.replay)
            if table == "token_usages":
                usage = row
            elif table == "user_prompts":
                prompts += 1
            elif table == "tool_usages":
                tool_calls += 1
        self._report_end(exchange, outcome, http_status, usage, prompts, tool_calls)
        return usage

    def _tell(self, done: FinishedExchange) -> None:
        """The console's line for a finished exchange, counted for the shutdown summary."""
        self._tally.add(done.status)
        if not log.isEnabledFor(logging.INFO) or not self._console.add(exchange_line(done)):
            return
        try:
            asyncio.get_running_loop().call_later(self._console.every, self._console.flush)
        except RuntimeError:  # no event loop (offline tools, tests): now
            self._console.flush()

    def _report_end(
        self,
        exchange: Exchange,
        outcome: Outcome,
        http_status: int | None,
        usage: Mapping[str, Any],
        prompts: int,
        tool_calls: int,
    ) -> None:
        """The console's line and the metrics of a finished exchange."""
        labels = exchange.labels
        if labels is None:
            return
        seconds = time.monotonic() - exchange.clock_start if exchange.clock_start else None
        self._tell(
            FinishedExchange(
                labels.user,
                labels.provider,
                labels.api,
                outcome.result.response_model or labels.model,
                outcome.status,
                http_status,
                usage.get("input_tokens"),
                usage.get("output_tokens"),
                usage.get("estimated_cost_usd"),
                seconds,
                outcome.error,
            )
        )
        if self.metrics is not None:
            self.metrics.finished(
                labels, outcome.status, seconds or 0.0, token_counts(usage), prompts, tool_calls
            )
