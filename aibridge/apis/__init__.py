"""The APIs the bridge speaks, one module each behind one small protocol (DESIGN.md §2, §11).

Each module gives an :class:`~aibridge.apis.common.Api`: request parsing and validation,
refusals, the one request edit it may make, the stream events that matter, the accumulator
that turns a response into records, and the API's own error body. Adding an API is one
module and one line below.
"""

from __future__ import annotations

from collections.abc import Iterable

from aibridge.apis import anthropic_messages, openai_chat, openai_responses
from aibridge.apis.common import Api

__all__ = [
    "APIS",
    "BY_NAME",
    "Api",
    "bridged_api",
    "default_api_names",
    "default_passthrough",
    "for_path",
    "for_provider",
]

APIS: tuple[Api, ...] = (openai_responses.API, anthropic_messages.API, openai_chat.API)

BY_NAME = {api.name: api for api in APIS}
_BY_PATH = {api.path: api for api in APIS}


def default_api_names(provider_type: str) -> tuple[str, ...]:
    """The APIs a provider of this type serves when its config does not say (``apis``)."""
    return tuple(api.name for api in APIS if provider_type in api.provider_types)


def bridged_api(served: Iterable[str], api_path: str) -> Api | None:
    """The API a ``POST`` to this API path is, when the provider serves it (`served`: names)."""
    api = _BY_PATH.get(api_path)
    return api if api is not None and api.name in served else None


def for_provider(served: Iterable[str]) -> Api:
    """The API whose error shape a provider's clients understand (refusals before any body
    is read: 401, 403): the first it serves."""
    for name in served:
        if name in BY_NAME:
            return BY_NAME[name]
    return APIS[0]


def for_path(path: str) -> Api:
    """A guess from the request path alone, when no provider is known (the bridge is not
    configured): ``.../messages`` is answered in Anthropic's shape, the rest in OpenAI's."""
    raw = path.partition("?")[0].rstrip("/")
    for api in APIS:
        if raw.endswith(api.path.removeprefix("/v1")):
            return api
    return APIS[0]


def default_passthrough(served: Iterable[str]) -> tuple[str, ...]:
    """The passthrough paths of these APIs, in the registry's order, once each."""
    names = set(served)
    paths: dict[str, None] = {}
    for api in APIS:
        if api.name in names:
            paths.update(dict.fromkeys(api.passthrough))
    return tuple(paths)
