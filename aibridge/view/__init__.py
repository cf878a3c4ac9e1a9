"""The "AI Bridge" view's renderers, one module per API, and the dispatch between them.

Each API module (``responses``, ``messages``, ``chat``) gives a
:class:`~aibridge.view.common.Renderer`; what they share (limits, text helpers, body loading,
stream reading) is in ``common``.
:func:`render_request`, :func:`render_response` and :func:`render_body` pick the renderer
named by ``api`` (as the bridge notes it on a flow, or as the path says, see
aibridge.contentview), else the first whose ``claims_*`` recognise the body's shape, else
Responses, the first API the bridge had. Adding an API is one module and one line below.

All of them are pure and never raise.
"""

from __future__ import annotations

from typing import Final

import orjson

from aibridge.transport.sse import SSEParser
from aibridge.view import chat, messages, responses
from aibridge.view.common import (
    JSON_TYPE,
    SSE_TYPE,
    Renderer,
    is_sse,
    load_object,
    unreadable,
)

# Chat before Messages: both send "messages", and Chat claims only bodies with nothing
# Anthropic-only in them (view.chat.claims_request).
RENDERERS: Final[dict[str, Renderer]] = {
    r.api: r for r in (responses.RENDERER, chat.RENDERER, messages.RENDERER)
}
# What a body is read as when nothing says which API it is (and nothing about it is known).
DEFAULT: Final = responses.RENDERER
# A stream is recognised by the first events with a type only one API sends, within this much.
SNIFF_BYTES: Final = 64 << 10


def api_for_path(path: str) -> str | None:
    """The API whose request path this is (``/openai/v1/responses``, ``/v1/messages?beta=true``)."""
    raw = path.partition("?")[0].rstrip("/")
    for renderer in RENDERERS.values():
        if raw.endswith(renderer.path_suffix):
            return renderer.api
    return None


def _chosen(api: str | None) -> Renderer | None:
    return RENDERERS.get(api) if api is not None else None


def _for_request(data: bytes) -> Renderer:
    obj, _ = load_object(data)
    if obj is not None:
        for renderer in RENDERERS.values():
            if renderer.claims_request(obj):
                return renderer
    return DEFAULT


def _for_stream(data: bytes) -> Renderer:
    parser = SSEParser()
    events = parser.feed(data[:SNIFF_BYTES])
    events.extend(parser.close())
    for event in events:
        kind = event.event
        if kind is None:
            try:
                obj = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                continue
            kind = obj.get("type") if isinstance(obj, dict) else None
            if not isinstance(kind, str) and isinstance(obj, dict):
                kind = obj.get("object")  # Chat Completions chunks: no type, an object name
            if not isinstance(kind, str):
                continue
        for renderer in RENDERERS.values():
            if renderer.claims_event(kind):
                return renderer
    return DEFAULT


def _for_response(data: bytes, content_type: str | None) -> Renderer:
    if is_sse(data, content_type):
        return _for_stream(data)
    obj, _ = load_object(data)
    if obj is not None:
        for renderer in RENDERERS.values():
            if renderer.claims_response(obj):
                return renderer
    return DEFAULT


def render_request(data: bytes, api: str | None = None) -> str:
    """A request body of ``api`` (else of the API its shape says) as readable text."""
    try:
        renderer = _chosen(api) or _for_request(data)
    except Exception as exc:  # the view must show something for any body
        return unreadable("AI Bridge could not render this request", repr(exc), data)
    return renderer.render_request(data)


def render_response(data: bytes, content_type: str, api: str | None = None) -> str:
    """A response body (buffered JSON or a stored ``text/event-stream``) as readable text.

    ``content_type`` decides between a stream and a buffered body (parameters such as
    ``charset`` are ignored); when it says neither, the body is sniffed.
    """
    try:
        renderer = _chosen(api) or _for_response(data, content_type)
    except Exception as exc:  # the view must show something for any body
        return unreadable("AI Bridge could not render this response", repr(exc), data)
    return renderer.render_response(data, content_type)


def render_body(data: bytes, content_type: str | None = None, api: str | None = None) -> str:
    """A body whose direction is unknown: a stream, or an object a renderer recognises as a
    response, is shown as a response; anything else as a request."""
    try:
        if is_sse(data, content_type):
            return render_response(data, SSE_TYPE, api)
        obj, _ = load_object(data)
        chosen = _chosen(api)
        if obj is not None:
            for renderer in [chosen] if chosen is not None else RENDERERS.values():
                if renderer.claims_response(obj):
                    return renderer.render_response(data, JSON_TYPE)
        return render_request(data, api)
    except Exception as exc:  # the view must show something for any body
        return unreadable("AI Bridge could not render this body", repr(exc), data)
