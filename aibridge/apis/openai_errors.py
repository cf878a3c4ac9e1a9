"""OpenAI's error shape, for the bridge's own errors on the OpenAI APIs (DESIGN.md §7).

The body carries the reference's flat fields (``code``, ``message``) and the same message
nested the way OpenAI's API does, so the official SDKs surface it as an ordinary API error.
"""

from __future__ import annotations

from typing import Final

import orjson

_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    501: "not_implemented",
    502: "upstream_unreachable",
}


def error_body(status: int, message: str) -> bytes:
    return orjson.dumps(
        {
            "code": str(status),
            "message": message,
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status, "aibridge_error"),
                "code": str(status),
            },
        }
    )


def error_event(status: int, message: str) -> bytes:
    """The same error as a WebSocket-mode server event, for a refused ``response.create``."""
    return orjson.dumps(
        {
            "type": "error",
            "status": status,
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status, "aibridge_error"),
                "code": str(status),
            },
        }
    )
