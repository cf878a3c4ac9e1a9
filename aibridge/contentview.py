"""The "AI Bridge" contentview: AI API bodies shown as a readable conversation.

For mitmweb and mitmproxy (and mitmdump at ``flow_detail`` 4). OpenAI Responses, Anthropic
Messages and OpenAI Chat Completions requests and responses (buffered JSON, or a stored
``text/event-stream``) are rendered by aibridge.view, one renderer per API; this module is
the mitmproxy side: which flows the view is for, which API a flow speaks, the registry.

A flow's API is the one the bridge noted on it (``flow.metadata["aibridge"]["api"]``), else
the one its path names (``…/responses``, ``…/messages``, ``…/chat/completions``), else the one
its body's shape says. Tool calls and usage are read with the functions the audit log uses, so
the view shows what the database holds.

The bridge streams every SSE response, and mitmproxy keeps a streamed body only with
``--set store_streamed_bodies=true``; without it a streamed response has no body to show.

The text messages of a Responses API WebSocket (Codex's transport: a flow on a
``…/responses`` path, or one whose turns the bridge counted) are rendered one by one by
aibridge.view.websocket: a client ``response.create`` as the request it carries, a server
event as what it says.

Register it with the :class:`AIBridgeView` addon (or :func:`register` / :func:`unregister`).
"""

from __future__ import annotations

from typing import Any, Final

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Contentview, Metadata

from aibridge.view import RENDERERS, api_for_path, render_body, render_request, render_response
from aibridge.view import responses as responses_view
from aibridge.view.common import JSON_TYPES, SSE_TYPE, media_type
from aibridge.view.websocket import render_message

__all__ = [
    "FLOW_METADATA_KEY",
    "NAME",
    "PRIORITY",
    "VIEW",
    "AIBridgeContentview",
    "AIBridgeView",
    "flow_api",
    "is_ai_flow",
    "is_ai_socket",
    "register",
    "render_body",
    "render_request",
    "render_response",
    "unregister",
]

NAME: Final = "AI Bridge"
# The key bridge.AIBridge notes on every bridged flow (bridge.METADATA_KEY); not imported,
# so that loading the view never pulls in the recorder and its thread machinery.
FLOW_METADATA_KEY: Final = "aibridge"
# What the bridge keeps on a WebSocket flow about its turns (aibridge.mitmweb.SOCKET_KEY).
SOCKET_METADATA_KEY: Final = "aibridge_socket"
# Above the JSON view (1) and raw (0.1), so AI API flows open in this view.
PRIORITY: Final = 2.0


def flow_api(flow: Any) -> str | None:
    """The API of an HTTP flow as the bridge noted it, else as its path says; else None."""
    if not isinstance(flow, http.HTTPFlow):
        return None
    noted = flow.metadata.get(FLOW_METADATA_KEY)
    api = noted.get("api") if isinstance(noted, dict) else None
    if isinstance(api, str) and api:
        return api
    return api_for_path(flow.request.path)


def is_ai_flow(flow: Any) -> bool:
    """A flow this view renders: bridged by AI Bridge, or its path names an API it knows.

    A flow noted with an API the view has no renderer for keeps mitmproxy's usual view.
    """
    if not isinstance(flow, http.HTTPFlow):
        return False
    api = flow_api(flow)
    if api is not None:
        return api in RENDERERS
    return FLOW_METADATA_KEY in flow.metadata


def is_ai_socket(flow: Any) -> bool:
    """A WebSocket flow whose messages this view renders: the Responses API's (by the
    bridge's note or its path) or one whose turns the bridge counted."""
    if not isinstance(flow, http.HTTPFlow) or flow.websocket is None:
        return False
    return SOCKET_METADATA_KEY in flow.metadata or flow_api(flow) == responses_view.API


class AIBridgeContentview(Contentview):
    """Shows AI API requests and responses as a conversation."""

    @property
    def name(self) -> str:
        return NAME

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        if (ws_message := metadata.websocket_message) is not None:
            text = render_message(
                data, from_client=ws_message.from_client, is_text=ws_message.is_text
            )
            if ws_message.dropped:
                text += "\n\nnote: dropped, never forwarded (as the bridge drops what it refuses)"
            if ws_message.injected:
                text += "\n\nnote: injected by AI Bridge or mitmproxy, not sent by the other side"
            return text
        api = flow_api(metadata.flow)
        if api not in RENDERERS:
            api = None  # chosen by hand for a flow of another API: judged by the body
        message = metadata.http_message
        if isinstance(message, http.Request):
            return render_request(data, api)
        if isinstance(message, http.Response):
            return render_response(data, metadata.content_type or "", api)
        return render_body(data, metadata.content_type, api)

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        # Cheap on purpose: called for every body mitmproxy shows; nothing is parsed here.
        if (ws_message := metadata.websocket_message) is not None:
            # Binary messages keep mitmproxy's hex view unless this one is chosen by hand.
            ok = data and ws_message.is_text and is_ai_socket(metadata.flow)
            return PRIORITY if ok else 0
        if not data or metadata.http_message is None or not is_ai_flow(metadata.flow):
            return 0
        media = media_type(metadata.content_type)
        if media in JSON_TYPES or media.endswith("+json") or media == SSE_TYPE:
            return PRIORITY
        if not media and data[:64].lstrip().startswith((b"{", b"event:", b"data:")):
            return PRIORITY  # clients and servers that leave the content type out
        return 0


VIEW: Final = AIBridgeContentview()


def register() -> None:
    """Add the view to mitmproxy's registry (again: it replaces itself by name)."""
    contentviews.add(VIEW)


def unregister() -> None:
    """Take the view out of mitmproxy's registry, if it is ours that is there."""
    # mitmproxy 12 has no public way to remove a view (contentviews.remove is a deprecated
    # no-op), so drop the registry entry directly; a registry without it is left alone.
    by_name = getattr(contentviews.registry, "_by_name", None)
    key = NAME.lower()
    if isinstance(by_name, dict) and by_name.get(key) is VIEW:
        del by_name[key]


class AIBridgeView:
    """Addon: the "AI Bridge" contentview is registered while this addon is loaded.

    Loading registers it, ``done`` (shutdown, or the script being reloaded) removes it, so a
    hot reload of addon.py leaves exactly one view.
    """

    def load(self, loader: Any) -> None:
        register()

    def done(self) -> None:
        unregister()
