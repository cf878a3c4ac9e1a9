"""The bridge's own error responses (DESIGN.md §7), in the shape of the API they answer."""

from __future__ import annotations

from mitmproxy import http

from aibridge.apis import Api


def error_response(api: Api, status: int, message: str) -> http.Response:
    return http.Response.make(
        status,
        api.error_body(status, message),
        {"content-type": "application/json", "x-aibridge-error": "1"},
    )
