"""The APIs the bridge speaks, one module each behind one small protocol (DESIGN.md §2, §11).

Each module gives an :class:`~aibridge.apis.common.Api`: request parsing and validation,
refusals, the stream events that matter, the accumulator that turns a response into
records, and the API's own error body. Adding an API is one module and one line below.
"""

from __future__ import annotations

from aibridge.apis import anthropic_messages, openai_responses
from aibridge.apis.common import Api

__all__ = ["APIS", "Api", "bridged_api", "default_passthrough", "for_path", "for_provider_type"]

APIS: tuple[Api, ...] = (openai_responses.API, anthropic_messages.API)

_BY_PATH = {api.path: api for api in APIS}


def bridged_api(provider_type: str, api_path: str) -> Api | None:
    """The API a ``POST`` to this API path is, when a provider of this type serves it."""
    api = _BY_PATH.get(api_path)
    return api if api is not None and provider_type in api.provider_types else None


def for_provider_type(provider_type: str) -> Api:
    """The API whose error shape a provider's clients understand (refusals before any body
    is read: 401, 403)."""
    for api in APIS:
        if provider_type in api.provider_types:
            return api
    return APIS[0]


def for_path(path: str) -> Api:
    """A guess from the request path alone, when no provider is known (the bridge is not
    configured): ``.../messages`` is answered in Anthropic's shape, the rest in OpenAI's."""
    raw = path.partition("?")[0].rstrip("/")
    for api in APIS:
        if raw.endswith(api.path.removeprefix("/v1")):
            return api
    return APIS[0]


def default_passthrough(provider_types: frozenset[str] | set[str]) -> tuple[str, ...]:
    """The passthrough paths of the APIs these provider types serve, in order, once each."""
    paths: dict[str, None] = {}
    for api in APIS:
        if api.provider_types & set(provider_types):
            paths.update(dict.fromkeys(api.passthrough))
    return tuple(paths)
