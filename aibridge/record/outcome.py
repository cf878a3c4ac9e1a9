"""How an exchange ended, decided from everything the hooks saw of it (DESIGN.md §2, §3.1):
the stream tee's parse, a buffered body, upstream's HTTP status, and the error mitmproxy
reported. API-neutral: the API's accumulator reads the bodies."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from mitmproxy import http

from aibridge.apis import Api
from aibridge.apis.common import Accumulator, ResponseResult
from aibridge.headers import header_value
from aibridge.transport.inflate import DecodeLimitExceeded, decode_body
from aibridge.transport.tee import StreamTee

# Upstream bodies are decoded for parsing at most this far (never with `.content`, which
# decodes whole). A buffered response is a few MB even with generated images, and
# 32 MiB keeps a bomb's cost under the 64 MB of DESIGN.md §8; an error body needs only its
# message.
MAX_BUFFERED_DECODED_BYTES = 32 << 20
MAX_ERROR_DECODED_BYTES = 1 << 20


@dataclass(slots=True)
class Outcome:
    status: str
    error: str | None
    result: ResponseResult


def finish_exchange(
    api: Api,
    accumulator: Accumulator,
    tee: StreamTee | None,
    response: http.Response | None,
    error: str | None,
) -> Outcome:
    """Decide how an exchange ended, from everything the hooks saw of it."""
    parse_error: str | None = None
    if tee is not None:
        if not tee.ended and error is None:
            tee(b"")  # mitmproxy always ends a finished stream; be safe if it did not
        # On an error the stream did not end: still parse every whole event that arrived
        # (Codex hangs up right after response.completed).
        tee.flush()
        parse_error = tee.parse_error
    elif response is not None and error is None and 200 <= response.status_code < 300:
        parse_error = _feed_buffered(api, accumulator, response)
    result = accumulator.result()

    if response is not None and response.status_code >= 400:
        return Outcome("upstream_error", upstream_error_text(response), result)
    if result.terminal_seen and result.status:
        # A terminal event means nothing is missing, even if the client hung up right after.
        return Outcome(result.status, result.error, result)
    if error is not None:
        lowered = error.lower()
        status = "client_disconnected" if "client disconnected" in lowered else "error"
        return Outcome(status, result.error or error, result)
    if parse_error:
        return Outcome("error", parse_error, result)
    if tee is not None:
        return Outcome("error", "the stream ended before a terminal event", result)
    return Outcome("error", f"the response held no {api.title} object", result)


def _feed_buffered(api: Api, accumulator: Accumulator, response: http.Response) -> str | None:
    raw = response.raw_content or b""
    encoding = header_value(response.headers, b"content-encoding")
    if header_value(response.headers, b"content-type").lower().startswith("text/event-stream"):
        # A stream read back from a flow file (offline mode) arrives whole, still encoded:
        # the tee decodes it step by step, as it would have live.
        tee = StreamTee(accumulator, api, encoding)
        tee(raw)
        tee(b"")
        return tee.parse_error
    try:
        body = decode_body(raw, encoding, MAX_BUFFERED_DECODED_BYTES)
    except DecodeLimitExceeded as e:
        return f"{e}: parsing stopped"
    except ValueError as e:
        return f"response body cannot be decoded: {e}"
    try:
        obj = api.decode_response(body)
    except ValueError as e:
        return f"response body is not JSON: {e}"
    accumulator.feed_response_object(obj)
    return None


def upstream_error_text(response: http.Response) -> str:
    """The provider's own error message when it sent one, else the status line."""
    text = f"upstream answered HTTP {response.status_code}"
    encoding = header_value(response.headers, b"content-encoding")
    try:
        body = decode_body(response.raw_content or b"", encoding, MAX_ERROR_DECODED_BYTES)
    except DecodeLimitExceeded as e:
        return f"{text} (the body could not be read: {e})"
    except ValueError:
        return text
    if not body:
        return text
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{text}: {body[:300].decode('utf-8', 'replace')}"
    # OpenAI's {"error": {"message": ...}} and Anthropic's {"type": "error", "error": {...}}.
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]:
        return f"{text}: {err['message']}"
    if isinstance(err, dict) and isinstance(err.get("type"), str) and err["type"]:
        return f"{text}: {err['type']}"
    if isinstance(err, str):
        return f"{text}: {err}"
    return text
