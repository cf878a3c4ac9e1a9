"""From a finished exchange to rows of the audit log (DESIGN.md §3, §4).

Pure functions: they take what the hooks saw and return dicts whose keys are the columns of
``aibridge.schema``. The privacy switches of the config are applied here, in one place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from mitmproxy import http

from aibridge.apis import Api
from aibridge.apis.common import Accumulator, RequestInfo, ResponseResult
from aibridge.auth import Identity
from aibridge.clients import guess_client, session_id_from_headers
from aibridge.config import Privacy, Provider
from aibridge.cost import PriceBook
from aibridge.inflate import DecodeLimitExceeded, decode_body
from aibridge.stream import StreamTee

# Upstream bodies are decoded for parsing at most this far (never with `.content`, which
# decodes whole). A buffered response is a few MB even with generated images, and
# 32 MiB keeps a bomb's cost under the 64 MB of DESIGN.md §8; an error body needs only its
# message.
MAX_BUFFERED_DECODED_BYTES = 32 << 20
MAX_ERROR_DECODED_BYTES = 1 << 20
# Our own rows say which table they belong in: one tuple per row to write, in order.
Row = tuple[str, dict[str, Any]]


@dataclass(slots=True)
class Outcome:
    status: str
    error: str | None
    result: ResponseResult


def interception_start(
    *,
    interception_id: str,
    flow_id: str,
    started_at: str,
    provider: Provider,
    api: Api,
    info: RequestInfo | None,
    headers: Mapping[str, str],
    identity: Identity | None,
    request_bytes: int,
) -> dict[str, Any]:
    session_id = session_id_from_headers(headers)
    client = guess_client(headers.get("user-agent"), headers.get("originator"), headers=headers)
    return {
        "id": interception_id,
        "flow_id": flow_id,
        "started_at": started_at,
        "ended_at": None,
        "initiator_id": identity.user_id if identity else None,
        "provider": provider.type,
        "provider_name": provider.name,
        "api": api.name,
        "model": info.model if info else None,
        "response_model": None,
        "streaming": int(info.stream) if info else None,
        "client": client,
        "user_agent": headers.get("user-agent"),
        "client_session_id": session_id or (info.session_id if info else None),
        "correlating_tool_call_id": info.correlating_tool_call_id if info else None,
        "previous_response_id": info.previous_response_id if info else None,
        "credential_kind": identity.credential_kind if identity else None,
        "credential_hint": identity.credential_hint if identity else None,
        "http_status": None,
        "status": "in_progress",
        "error": None,
        "response_id": None,
        "malformed_events": 0,
        "metadata": {"request_bytes": request_bytes},
    }


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
    encoding = response.headers.get("content-encoding", "")
    if response.headers.get("content-type", "").lower().startswith("text/event-stream"):
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
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        return f"response body is not JSON: {e}"
    accumulator.feed_response_object(obj)
    return None


def upstream_error_text(response: http.Response) -> str:
    """The provider's own error message when it sent one, else the status line."""
    text = f"upstream answered HTTP {response.status_code}"
    encoding = response.headers.get("content-encoding", "")
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


def prompt_row(
    interception_id: str, response_id: str | None, prompt: str, privacy: Privacy, now: str
) -> dict[str, Any]:
    return {
        "interception_id": interception_id,
        "response_id": response_id,
        "prompt": prompt if privacy.store_prompts else None,
        "created_at": now,
    }


def end_rows(
    interception_id: str,
    info: RequestInfo,
    outcome: Outcome,
    http_status: int | None,
    privacy: Privacy,
    now: str,
    prices: PriceBook | None = None,
    *,
    provider_type: str = "openai",
) -> Iterator[Row]:
    """The interception's final state, then its prompt, usage, tools and thoughts.

    With `prices` (made once, at start-up), the usage row carries its estimated cost.
    """
    result = outcome.result
    yield (
        "interceptions",
        {
            "id": interception_id,
            "ended_at": now,
            "http_status": http_status,
            "status": outcome.status,
            "error": outcome.error,
            "response_id": result.response_id,
            "response_model": result.response_model,
            "malformed_events": result.malformed_events,
        },
    )
    if info.prompt is not None:
        yield (
            "user_prompts",
            prompt_row(interception_id, result.response_id, info.prompt, privacy, now),
        )
    if result.token_usage is not None:
        usage = {"interception_id": interception_id, **result.token_usage, "created_at": now}
        if prices is not None:
            usage.update(
                prices.cost_columns(
                    result.token_usage,
                    model=info.model,
                    response_model=result.response_model,
                    at=now,
                    service_tier=result.token_usage.get("service_tier"),
                    provider=provider_type,
                )
            )
        yield "token_usages", usage
    for tool in result.tool_usages:
        row = {"interception_id": interception_id, **tool, "created_at": now}
        # Always JSON (a raw string becomes a JSON string) so json_extract works on every row.
        args = row.get("args")
        row["args"] = (
            orjson.dumps(args).decode() if privacy.store_tool_args and args is not None else None
        )
        yield "tool_usages", row
    for thought in result.thoughts:
        row = {"interception_id": interception_id, **thought, "created_at": now}
        if not privacy.store_thoughts:
            row["content"] = None
        yield "model_thoughts", row


def flow_comment(user_id: str, info: RequestInfo | None, outcome: Outcome) -> str:
    """One line for mitmweb's flow list: who, which model, how many tokens, which tools."""
    result = outcome.result
    parts = [user_id, result.response_model or (info.model if info else None) or "?"]
    usage = result.token_usage
    if usage:
        cached = usage.get("cache_read_input_tokens") or 0
        parts.append(
            f"in {usage.get('input_tokens') or 0}"
            + (f" ({cached} cached)" if cached else "")
            + f" / out {usage.get('output_tokens') or 0} tokens"
        )
    if result.tool_usages:
        parts.append("tools: " + ", ".join(str(t.get("tool")) for t in result.tool_usages))
    if outcome.status != "completed":
        parts.append(f"{outcome.status}: {outcome.error}" if outcome.error else outcome.status)
    return " · ".join(parts)
