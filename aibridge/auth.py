"""Who sent a request, and which credential goes upstream (DESIGN.md §6).

Ways in, checked in this order:
1. a personal bridge token in ``Authorization: Bearer`` or ``X-Api-Key``;
2. on an Anthropic provider with ``subscription: true``, a Claude Pro/Max sign-in (an OAuth
   bearer token) goes upstream as the user's own credential;
3. mitmproxy's ``proxyauth`` identity (regular proxy mode), the user's name;
4. with ``byok`` on, an unknown bearer token is the user's own provider key.
Anything else is refused before it can reach the provider.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from mitmproxy import http

from aibridge.config import Config, Provider, User, hint

# Where clients put their API key: OpenAI's and most tools' bearer token, Anthropic's
# x-api-key, Azure OpenAI's api-key; and mitmproxy's proxyauth.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")
_CLIENT_CREDENTIAL_FIELDS = frozenset(name.encode() for name in CLIENT_CREDENTIAL_HEADERS)
# Credential kinds of a user's own sign-in to a plan, forwarded upstream: not priced per token.
SIGN_IN_KINDS = frozenset({"client", "subscription"})


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    # "centralized" | "byok" | "client" (ChatGPT sign-in) | "subscription" (Claude sign-in)
    credential_kind: str
    upstream_key: str = field(repr=False)  # credential_hint says which one
    credential_hint: str


class AuthError(Exception):
    """The client could not be identified; the message is safe to show it."""


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The token a client presents as its API key, if any."""
    auth = headers.get("authorization", "").strip()
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = headers.get("x-api-key", "").strip() or headers.get("api-key", "").strip()
    return api_key or None


# Headers that never carry a credential; every other header is searched for bridge tokens.
_PLAIN_HEADERS = frozenset(
    {
        "host",
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "accept",
        "accept-encoding",
        "accept-language",
        "user-agent",
        "te",
        "upgrade",
    }
)
_LIST_ITEMS = re.compile(r"[;,]")
_ONE_WORD = re.compile(r"[^\s;,=]+")


class LeakScan:
    """Finds the user whose bridge token a request carries anywhere a credential can travel
    (any header value, bare or after a scheme such as ``Bearer``, inside Basic credentials,
    or a query parameter). Such a request must not leave the bridge except to a provider,
    with the token swapped for the provider's credential.

    One scan per config, remembering header values it found clean. A client repeats most
    of its headers on every request: Codex sends the same session ids, and the same long
    turn metadata on each request of a turn. A value found clean once is clean for as long
    as the config holds (whatever header carries it), so it is not taken apart again.
    Bounded: at most `remembered` values (at least 1), each at most
    ``MAX_REMEMBERED_VALUE`` characters; the client's own credential headers are never
    kept (they are checked every time, and no secret of theirs stays in memory).
    """

    MAX_REMEMBERED_VALUE = 4096

    def __init__(self, config: Config, remembered: int = 256) -> None:
        self.config = config
        self._remembered = remembered
        self._clean: set[str] = set()
        # No candidate is longer than the value or list item it comes from: shorter ones
        # are passed over whole (Codex's turn metadata alone is some twenty items).
        self._shortest = config.shortest_token
        self._lengths = config.token_lengths

    def __repr__(self) -> str:
        return f"LeakScan({len(self._clean)} clean values remembered)"

    def owner(self, headers: Mapping[str, str], query: str = "") -> User | None:
        """The user whose token the request carries outside the API key header, or None."""
        if not self.config.users:
            return None
        shortest, clean = self._shortest, self._clean
        for name, value in headers.items():
            if len(value) < shortest or name in _PLAIN_HEADERS or value in clean:
                continue
            if user := self._value_owner(value):
                return user
            if len(value) <= self.MAX_REMEMBERED_VALUE and name not in CLIENT_CREDENTIAL_HEADERS:
                if len(clean) >= self._remembered:
                    clean.clear()
                clean.add(value)
        if query:
            for _, value in parse_qsl(query, keep_blank_values=False):
                if user := self._lookup(value.strip()):
                    return user
        return None

    def _value_owner(self, value: str) -> User | None:
        if _ONE_WORD.fullmatch(value):  # the common case: the value is the candidate
            return self._lookup(value)
        for candidate in _credential_candidates(value, self._shortest):
            if user := self._lookup(candidate):
                return user
        return None

    def _lookup(self, candidate: str) -> User | None:
        size = len(candidate)
        if size < self._shortest or (self._lengths is not None and size not in self._lengths):
            return None  # cannot be a token: no hash needed
        return self.config.user_for_token(candidate)


def _credential_candidates(value: str, shortest: int) -> Iterator[str]:
    """Where a token can sit in one header value: whole, after a scheme, in Basic
    credentials, as one item of a list (``a=1; key=<token>`` cookies, ``, ``-joined).
    Items shorter than `shortest` hold no candidate that long and are skipped."""
    items = [value]
    if ";" in value or "," in value:
        items.extend(_LIST_ITEMS.split(value))
    for item in items:
        if len(item) < shortest:
            continue
        item = item.strip()
        yield item
        scheme, space, rest = item.partition(" ")
        if space:
            rest = rest.strip()
            yield rest
            if scheme.lower() == "basic":
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    decoded = base64.b64decode(rest, validate=True).decode()
                    yield from decoded.partition(":")[::2]
        if "=" in item:
            yield item.partition("=")[2].strip().strip('"')


def proxyauth_user(metadata: dict[str, Any]) -> str | None:
    """The user mitmproxy's proxyauth addon authenticated, if it ran."""
    found = metadata.get("proxyauth")
    if isinstance(found, tuple | list) and found and isinstance(found[0], str) and found[0]:
        return found[0]
    return None


def identify(
    config: Config, provider: Provider, headers: Mapping[str, str], metadata: dict[str, Any]
) -> Identity:
    token = presented_token(headers)
    if provider.forwards_client_credential:
        return _client_credential(token, headers, metadata)
    if token is not None:
        user = config.user_for_token(token)
        if user is not None:
            return _centralized(user.id, provider)
    proxy_user = proxyauth_user(metadata)
    if token is not None and provider.subscription and is_subscription_token(token, headers):
        # Priced by the plan, not per token: the records say whose sign-in it was.
        return Identity(
            proxy_user or f"subscription:{hint(token)}", "subscription", token, hint(token)
        )
    if token is not None and config.byok:
        return Identity(proxy_user or f"byok:{hint(token)}", "byok", token, hint(token))
    if proxy_user is not None:
        return _centralized(proxy_user, provider)
    if token is None:
        raise AuthError(
            "missing bridge token: send your personal AI Bridge token as the API key "
            "(Authorization: Bearer <token>)"
        )
    raise AuthError(f"unknown bridge token {hint(token)}: ask your admin for a personal token")


# Claude Pro/Max sign-ins send an OAuth access token, "sk-ant-oat01-…", as a bearer token.
SUBSCRIPTION_TOKEN_PREFIX = "sk-ant-oat"


def is_subscription_token(token: str, headers: Mapping[str, str]) -> bool:
    """A Claude subscription's OAuth token: sent as a bearer token, never as x-api-key."""
    bearer = headers.get("authorization", "").strip()
    return token.startswith(SUBSCRIPTION_TOKEN_PREFIX) and bearer.lower().startswith("bearer ")


def _client_credential(
    token: str | None, headers: Mapping[str, str], metadata: dict[str, Any]
) -> Identity:
    """ChatGPT sign-in: the client's own token goes upstream; who it is comes from proxyauth,
    else from the ChatGPT account the client names."""
    if token is None:
        raise AuthError("missing credential: sign in to ChatGPT in your client")
    account = headers.get("chatgpt-account-id", "").strip()
    user = proxyauth_user(metadata) or (f"chatgpt-account:{account}" if account else None)
    return Identity(user or f"chatgpt:{hint(token)}", "client", token, hint(token))


def _centralized(user_id: str, provider: Provider) -> Identity:
    return Identity(user_id, "centralized", provider.api_key, hint(provider.api_key))


def install_credentials(headers: http.Headers, provider: Provider, identity: Identity) -> None:
    """Remove everything the client authenticated with; present the upstream key instead."""
    # One pass over the raw fields: each Headers.pop/set would rescan them all.
    drop = {provider.key_header.encode(), *_CLIENT_CREDENTIAL_FIELDS}
    if provider.extra_headers:
        drop.update(n.lower().encode() for n in provider.extra_headers)
    fields = [(k, v) for k, v in headers.fields if k.lower() not in drop]
    if identity.upstream_key:
        fields.append(_credential_field(provider, identity))
    fields.extend((n.encode(), v.encode()) for n, v in provider.extra_headers.items())
    headers.fields = tuple(fields)


def _credential_field(provider: Provider, identity: Identity) -> tuple[bytes, bytes]:
    """The provider's key in its own header (Anthropic: x-api-key, Azure: api-key; in
    authorization as a bearer token); a sign-in's token as the bearer token it was
    presented as."""
    key = identity.upstream_key
    header = provider.key_header
    if header == "authorization" or identity.credential_kind == "subscription":
        return (b"authorization", f"Bearer {key}".encode())
    return (header.encode(), key.encode())


def upstream_credential_headers(provider: Provider) -> tuple[str, ...]:
    """The headers that carry a secret to the provider once credentials are installed."""
    return (
        *dict.fromkeys(("authorization", "x-api-key", provider.key_header)),
        *provider.extra_headers,
    )


def mask_credentials(headers: http.Headers, provider: Provider) -> None:
    """After the request went upstream: keep only hints in the flow (mitmweb, saved flows),
    the same ones ``conceal`` shows, for good."""
    conceal(headers, upstream_credential_headers(provider))


# (index in Headers.fields, name, real value, value shown instead)
Concealed = list[tuple[int, bytes, bytes, bytes]]


def conceal(headers: http.Headers, names: Iterable[str]) -> Concealed:
    """Show hints instead of the secrets in these headers while mitmweb looks at the flow;
    ``reveal`` puts the real values back before the request is sent."""
    wanted = {n.lower().encode() for n in names}
    fields = list(headers.fields)
    concealed: Concealed = []
    for index, (name, value) in enumerate(fields):
        if name.lower() in wanted:
            shown = _hinted(value)
            fields[index] = (name, shown)
            concealed.append((index, name, value, shown))
    if concealed:
        headers.fields = tuple(fields)
    return concealed


def reveal(headers: http.Headers, concealed: Concealed) -> None:
    if not concealed:
        return
    fields = list(headers.fields)
    for index, name, real, shown in concealed:
        if index < len(fields) and fields[index] == (name, shown):
            fields[index] = (name, real)
        elif (name, shown) in fields:  # another addon moved it
            fields[fields.index((name, shown))] = (name, real)
    headers.fields = tuple(fields)


def _hinted(value: bytes) -> bytes:
    text = value.decode("utf-8", "surrogateescape")
    scheme, space, secret = text.partition(" ")
    if space and scheme.lower() in ("bearer", "basic"):
        masked = f"{scheme} {hint(secret.strip())}"
    else:
        masked = hint(text.strip())
    return masked.encode("utf-8", "surrogateescape")


def mask_client_credentials(headers: http.Headers) -> None:
    """For a refused request: keep only hints of what the client presented."""
    token = presented_token(headers)
    if "authorization" in headers:
        headers["authorization"] = f"Bearer {hint(token)}" if token else "<masked>"
    for name in ("x-api-key", "api-key"):
        if name in headers:
            headers[name] = hint(headers[name])
    if "proxy-authorization" in headers:
        headers["proxy-authorization"] = "<masked>"
