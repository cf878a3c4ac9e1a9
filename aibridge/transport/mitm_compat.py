"""Two places where mitmproxy 12 gives an addon no say, and what the bridge does about them.

1. When the upstream cannot be reached (connection refused, reset before any response head),
   mitmproxy runs the ``error`` hook and then answers the client with its own HTML error
   page, whatever the hook did. Clients of the bridge expect our JSON error shape
   (DESIGN.md §7). While the error hook of such a failure runs, ``answerable_status(flow)``
   is the HTTP status mitmproxy is about to send; if an addon sets ``flow.response`` then,
   that response goes to the client instead of mitmproxy's page.

2. No hook runs between the request hooks and the moment the request goes on the wire, which
   may be much later (a new connection is opened first), and the flow is shown in mitmweb
   all that time. ``before_send(flow, fn)`` has ``fn`` run right before the request head is
   serialised, synchronously, so nothing else (mitmweb included) runs between the two: the
   provider key need only be in the flow for that instant.

``install`` wraps ``HttpStream.handle_protocol_error`` and ``HttpStream.make_server_connection``
and says what it could install. If mitmproxy's internals are not what this expects, nothing is
installed: mitmproxy's page is sent, and callers keep secrets in the flow until it is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Attributes of the flow object, not metadata: nothing of them is saved with the flow.
_STATUS = "_aibridge_answerable_status"
_BEFORE_SEND = "_aibridge_before_send"
_WRAPPED = "_aibridge_wrapped"


@dataclass(frozen=True, slots=True)
class Installed:
    answers_upstream_errors: bool
    before_send: bool


def answerable_status(flow: Any) -> int | None:
    """During the error hook of an upstream failure the client has not been answered for:
    the status mitmproxy is about to answer with. None otherwise."""
    return getattr(flow, _STATUS, None)


def mark_answerable(flow: Any, status: int | None) -> None:
    if status is None:
        if hasattr(flow, _STATUS):
            delattr(flow, _STATUS)
    else:
        setattr(flow, _STATUS, status)


def before_send(flow: Any, fn: Callable[[], None]) -> None:
    """Run `fn` once, right before the flow's request head is sent upstream (only with
    ``Installed.before_send``). Not run if the connection cannot be made."""
    setattr(flow, _BEFORE_SEND, fn)


def run_before_send(flow: Any) -> None:
    """Run (once) what `before_send` registered on the flow, if anything."""
    fn = getattr(flow, _BEFORE_SEND, None)
    if fn is None:
        return
    delattr(flow, _BEFORE_SEND)
    try:
        fn()
    except Exception:  # never take the flow down; at worst the provider refuses it
        log.exception("AI Bridge: preparing the request for the wire failed")


def install() -> Installed:
    """Idempotent."""
    try:
        from mitmproxy.proxy.layers import http as layers_http

        stream = layers_http.HttpStream
    except (ImportError, AttributeError) as e:
        log.warning(f"AI Bridge: mitmproxy's HTTP layer is not as expected ({e})")
        return Installed(False, False)
    return Installed(_install_error_answers(stream, layers_http), _install_before_send(stream))


def _install_error_answers(stream_class: Any, layers_http: Any) -> bool:
    try:
        original = stream_class.handle_protocol_error
        response_data = layers_http.ResponseData
        response_end = layers_http.ResponseEndOfMessage
        response_headers = layers_http.ResponseHeaders
        protocol_error = layers_http.ResponseProtocolError
        send_http = layers_http.SendHttp
        stream_class.state_errored  # noqa: B018 - the wrapper relies on it
    except AttributeError as e:
        log.warning(f"AI Bridge: upstream errors keep mitmproxy's own error page ({e})")
        return False
    if getattr(original, _WRAPPED, False):
        return True

    def send(stream: Any, response: Any) -> Generator[Any, Any, None]:
        content = response.raw_content or b""
        client = stream.context.client
        yield send_http(response_headers(stream.stream_id, response, not content), client)
        if content:
            yield send_http(response_data(stream.stream_id, content), client)
        yield send_http(response_end(stream.stream_id), client)

    def handle_protocol_error(self: Any, event: Any) -> Generator[Any, Any, None]:
        flow = self.flow
        status = None
        if (
            isinstance(event, protocol_error)
            and flow.response is None
            and self.client_state != self.state_errored
        ):
            status = event.code.http_status_code()
        if status is None:
            yield from original(self, event)
            return
        mark_answerable(flow, status)
        steps = original(self, event)
        reply: Any = None
        try:
            while True:
                try:
                    command = steps.send(reply)
                except StopIteration:
                    return
                if (
                    isinstance(command, send_http)
                    and command.event is event
                    and flow.response is not None
                ):
                    # The error hook answered: that answer replaces mitmproxy's page.
                    mark_answerable(flow, None)
                    yield from send(self, flow.response)
                    reply = None
                    continue
                reply = yield command
        finally:
            mark_answerable(flow, None)

    setattr(handle_protocol_error, _WRAPPED, True)
    stream_class.handle_protocol_error = handle_protocol_error
    return True


def _install_before_send(stream_class: Any) -> bool:
    original = getattr(stream_class, "make_server_connection", None)
    if original is None:
        log.warning("AI Bridge: secrets stay in in-flight flows (mitmproxy has changed)")
        return False
    if getattr(original, _WRAPPED, False):
        return True

    def make_server_connection(self: Any) -> Generator[Any, Any, bool]:
        # Both of mitmproxy's callers send the request head right after this returns True,
        # without giving the event loop a turn in between.
        ok = yield from original(self)
        if ok:
            run_before_send(self.flow)
        elif hasattr(self.flow, _BEFORE_SEND):
            delattr(self.flow, _BEFORE_SEND)
        return ok

    setattr(make_server_connection, _WRAPPED, True)
    stream_class.make_server_connection = make_server_connection
    return True
