"""Who sent a request, and which credential goes upstream (DESIGN.md §6).

Three ways in, checked in this order:
1. a personal bridge token in ``Authorization: Bearer`` or ``X-Api-Key``;
2. mitmproxy's ``proxyauth`` identity (regular proxy mode), the user's name;
3. with ``byok`` on, an unknown bearer token is the user's own provider key.
Anything else is refused before it can reach the provider.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from aibridge.config import Config, Provider

CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "proxy-authorization")


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    credential_kind: str  # "centralized" | "byok" | "client" (ChatGPT sign-in, forwarded)
    upstream_key: str
    credential_hint: str


class AuthError(Exception):
    """The client could not be identified; the message is safe to show it."""


def hint(secret: str) -> str:
    """A masked form of a secret: enough to tell keys apart, never enough to use one."""
    n = len(secret)
    keep = 4 if n >= 20 else 2 if n >= 10 else 1 if n >= 5 else 0
    if keep == 0:
        return "..."
    return f"{secret[:keep]}...{secret[-keep:]}"


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The token a client presents as its API key, if any."""
    auth = headers.get("authorization", "").strip()
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


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
    drop = {n.encode() for n in CLIENT_CREDENTIAL_HEADERS}
    drop.update(n.lower().encode() for n in provider.extra_headers)
    fields = [(k, v) for k, v in headers.fields if k.lower() not in drop]
    if identity.upstream_key:
        fields.append((b"authorization", f"Bearer {identity.upstream_key}".encode()))
    fields.extend((n.encode(), v.encode()) for n, v in provider.extra_headers.items())
    headers.fields = tuple(fields)


def upstream_credential_headers(provider: Provider) -> tuple[str, ...]:
    """The headers that carry a secret to the provider once credentials are installed."""
    return ("authorization", *provider.extra_headers)


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
    if "x-api-key" in headers:
        headers["x-api-key"] = hint(headers["x-api-key"])
    if "proxy-authorization" in headers:
        headers["proxy-authorization"] = "<masked>"
