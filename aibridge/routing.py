"""Which flows the bridge handles, and where they go (DESIGN.md §1).

Every provider's ``base_url`` is its API root, the place a client's ``/v1`` stands for.
A request is judged by its *API path*: ``/v1`` followed by the path relative to that root,
so ``POST /v1/responses`` means "create a response" on every deployment shape, and
``POST /v1/messages`` "create a message" on an Anthropic provider:

- route prefix: ``/<provider name>/v1/...`` on any listener is sent to that provider's
  ``base_url`` (the prefix and ``/v1`` are replaced by the root);
- reverse or regular proxy: a request whose destination host and port are a provider's.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import unquote

from aibridge.apis import Api, bridged_api
from aibridge.config import Config, Provider

# A segment a passthrough path may hold (percent-decoded): an id, a model name
# ("ft:gpt-4o:org::x"), a version. It starts with a letter or digit, so an empty, blank or
# punctuation-only segment, which a server may read as nothing at all, is never let through.
_WELL_FORMED_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:@+-]*")


class RouteKind(enum.Enum):
    UNRELATED = "unrelated"  # not a provider's traffic: left untouched
    BRIDGED = "bridged"  # POST to an API path of the provider's type: bridged and recorded
    WEBSOCKET = "websocket"  # GET with Upgrade: websocket on an API with a WebSocket mode
    PASSTHROUGH = "passthrough"  # allow-listed provider path: authenticated, key injected
    FORBIDDEN = "forbidden"  # any other provider path: 403


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    provider: Provider | None = None
    api_path: str = ""
    # Set when the request must be re-targeted (route prefix): path and query for upstream.
    upstream_path: str | None = None
    # The API of a BRIDGED or WEBSOCKET route.
    api: Api | None = None


UNRELATED = Route(RouteKind.UNRELATED)


def classify(
    config: Config,
    method: str,
    host: str,
    port: int,
    path: str,
    *,
    websocket_upgrade: bool = False,
) -> Route:
    """Decide what to do with a request; pure, so every deployment shape is unit-tested."""
    raw_path, sep, query = path.partition("?")
    by_prefix, api_path, prefixed_path = _by_prefix(config, raw_path)
    provider = by_prefix or _by_host(config, host, port, raw_path)
    if provider is None:
        return UNRELATED
    if _has_dot_segment(raw_path):
        # A server that resolves "/v1/models/../responses" would serve the Responses API
        # past the audit log; clients never send such paths, so they are refused outright.
        return Route(RouteKind.FORBIDDEN, provider, raw_path)
    upstream_path: str | None = None
    if by_prefix is not None:
        if api_path is None:
            return Route(RouteKind.FORBIDDEN, provider, raw_path)
        upstream_path = prefixed_path + _query(query, provider.base_query)
    else:
        if provider.base_query and (merged := _query(query, provider.base_query)) != sep + query:
            upstream_path = raw_path + merged
        root = provider.base_path
        if root and (raw_path == root or raw_path.startswith(root + "/")):
            api_path = "/v1" + raw_path[len(root) :]
        elif not root:
            api_path = raw_path
        elif provider.forwards_client_credential:
            return UNRELATED  # the rest of chatgpt.com (the web app) is none of our business
        else:
            return Route(RouteKind.FORBIDDEN, provider, raw_path)

    # Judged as the upstream server would read it: percent-decoded, empty segments collapsed.
    segments = unquote(api_path).split("/")[1:]
    normalized = "/" + "/".join(segment for segment in segments if segment)
    api = bridged_api(provider.apis, normalized)
    if api is not None:
        if method == "POST":
            return Route(RouteKind.BRIDGED, provider, normalized, upstream_path, api)
        if method == "GET" and websocket_upgrade and api.websocket:
            return Route(RouteKind.WEBSOCKET, provider, normalized, upstream_path, api)
    # Passthrough: whole, well-formed segments only, matched as written (nothing collapsed).
    if all(_WELL_FORMED_SEGMENT.fullmatch(segment) for segment in segments) and (
        provider.forwards_client_credential
        or any(fnmatchcase(normalized, pattern) for pattern in config.passthrough_for(provider))
    ):
        return Route(RouteKind.PASSTHROUGH, provider, normalized, upstream_path)
    return Route(RouteKind.FORBIDDEN, provider, normalized, upstream_path)


class Router:
    """``classify`` for one config, remembering its answers: clients send the same few
    requests over and over, and the hooks ask about each flow more than once."""

    # Bounded: a client sending ever new paths costs at most this many entries, each with a
    # path no longer than the next limit (longer ones are classified every time).
    MAX_REMEMBERED = 1024
    MAX_REMEMBERED_PATH = 512

    def __init__(self, config: Config) -> None:
        self.config = config
        self._routes: dict[tuple[str, str, int, str, bool], Route] = {}

    def route(
        self, method: str, host: str, port: int, path: str, *, websocket_upgrade: bool = False
    ) -> Route:
        key = (method, host, port, path, websocket_upgrade)
        route = self._routes.get(key)
        if route is None:
            route = classify(
                self.config, method, host, port, path, websocket_upgrade=websocket_upgrade
            )
            if len(path) <= self.MAX_REMEMBERED_PATH:
                if len(self._routes) >= self.MAX_REMEMBERED:
                    self._routes.clear()
                self._routes[key] = route
        return route


def as_noted(config: Config, route: Route, provider_name: object) -> Route:
    """The route of a saved POST, judged for the provider the live bridge noted on it.

    The saved request names the provider's destination, which several providers may share
    (one host and root serving OpenAI and Anthropic, say); the live bridge knew which one it
    was. A name that is unknown, at another destination or root, or without this API keeps
    `route`.
    """
    if not isinstance(provider_name, str) or route.provider is None:
        return route
    noted = config.provider_named(provider_name)
    if noted is None or noted is route.provider:
        return route
    here = (route.provider.host, route.provider.port, route.provider.base_path)
    if (noted.host, noted.port, noted.base_path) != here:
        return route
    api = bridged_api(noted.apis, route.api_path)
    if api is None:
        return route
    return Route(RouteKind.BRIDGED, noted, route.api_path, route.upstream_path, api)


def _query(client_query: str, base_query: str) -> str:
    """The query string to send upstream, with its ``?``: the client's as sent, followed by
    the parameters of the provider's base URL the client did not give (Azure's
    ``api-version``), so a client never needs to know them."""
    if not base_query:
        return "?" + client_query if client_query else ""
    given = {part.partition("=")[0] for part in client_query.split("&") if part}
    added = [part for part in base_query.split("&") if part and part.partition("=")[0] not in given]
    joined = "&".join(part for part in (client_query, *added) if part)
    return "?" + joined if joined else ""


def _has_dot_segment(raw_path: str) -> bool:
    """``.`` or ``..`` as a segment, percent-encoded or not, ``\\`` read as ``/``."""
    if "." not in raw_path and "%" not in raw_path:
        return False
    decoded = unquote(raw_path).replace("\\", "/")
    return any(segment in (".", "..") for segment in decoded.split("/"))


def _by_prefix(config: Config, raw_path: str) -> tuple[Provider | None, str | None, str]:
    """``/<name>/v1/rest`` → (provider, ``/v1/rest``, ``<base_path>/rest``)."""
    first, slash, rest = raw_path.lstrip("/").partition("/")
    provider = config.provider_named(first) if first else None
    if provider is None:
        return None, None, ""
    rest = "/" + rest if slash else ""
    if rest != "/v1" and not rest.startswith("/v1/"):
        return provider, None, ""
    return provider, rest, provider.base_path + rest[3:]


def _by_host(config: Config, host: str, port: int, raw_path: str) -> Provider | None:
    """The provider at this destination; with several on one host, the longest matching root.

    Host names compare as DNS compares them: case-insensitively, a trailing dot ignored.
    """
    host = dns_name(host)
    first: Provider | None = None  # when the path is under no provider's root
    best: Provider | None = None  # the longest root the path is under
    for provider in config.providers:
        if provider.host != host or provider.port != port:
            continue
        first = first or provider
        root = provider.base_path
        under_root = not root or raw_path == root or raw_path.startswith(root + "/")
        if under_root and (best is None or len(root) > len(best.base_path)):
            best = provider
    return best or first


def dns_name(host: str) -> str:
    """A host name as DNS compares it: ``API.OpenAI.com.`` is ``api.openai.com``."""
    return host.rstrip(".").lower()
