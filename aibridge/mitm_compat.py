"""The one place where mitmproxy 12 gives an addon no say, and what the bridge does about it.

When the upstream cannot be reached (connection refused, reset before any response head),
mitmproxy runs the ``error`` hook and then answers the client with its own HTML error page,
whatever the hook did. Clients of the bridge expect our JSON error shape (DESIGN.md §7).

``install`` wraps ``HttpStream.handle_protocol_error``: while the error hook of such a failure
runs, ``answerable_status(flow)`` is the HTTP status mitmproxy is about to send; if an addon
sets ``flow.response`` then, that response goes to the client instead of mitmproxy's page.
Nothing else changes. If mitmproxy's internals are not what this expects, nothing is
installed and mitmproxy's page is sent, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

log = logging.getLogger(__name__)

# An attribute of the flow object, not metadata: nothing of it is saved with the flow.
_STATUS = "_aibridge_answerable_status"
_WRAPPED = "_aibridge_answers_upstream_errors"


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


def install() -> bool:
    """Idempotent. True if an error hook can answer upstream failures."""
    try:
        from mitmproxy.proxy.layers.http import (
            HttpStream,
            ResponseData,
            ResponseEndOfMessage,
            ResponseHeaders,
            ResponseProtocolError,
            SendHttp,
        )

        original = HttpStream.handle_protocol_error
        HttpStream.state_errored  # noqa: B018 - the wrapper relies on it
    except (ImportError, AttributeError) as e:
        log.warning(f"AI Bridge: upstream errors keep mitmproxy's own error page ({e})")
        return False
    if getattr(original, _WRAPPED, False):
        return True

    def send(stream: Any, response: Any) -> Generator[Any, Any, None]:
        content = response.raw_content or b""
        client = stream.context.client
        yield SendHttp(ResponseHeaders(stream.stream_id, response, not content), client)
        if content:
            yield SendHttp(ResponseData(stream.stream_id, content), client)
        yield SendHttp(ResponseEndOfMessage(stream.stream_id), client)

    def handle_protocol_error(self: Any, event: Any) -> Generator[Any, Any, None]:
        flow = self.flow
        status = None
        if (
            isinstance(event, ResponseProtocolError)
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
                    isinstance(command, SendHttp)
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
    HttpStream.handle_protocol_error = handle_protocol_error  # type: ignore[method-assign]
    return True
