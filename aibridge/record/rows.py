"""From a finished exchange to rows of the audit log (DESIGN.md §3, §4).

Pure functions: they take what the hooks saw and return dicts whose keys are the columns of
``aibridge.record.schema``. The privacy switches of the config are applied here, in one place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from aibridge.apis import Api
from aibridge.apis.common import RequestInfo
from aibridge.auth import Identity
from aibridge.clients import guess_client, session_id_from_headers
from aibridge.config import Privacy, Provider
from aibridge.cost import PriceBook
from aibridge.record.outcome import Outcome

# Our own rows say which table they belong in: one tuple per row to write, in order.
Row = tuple[str, dict[str, Any]]


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
    mitmweb_url: str | None = None,
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
        "mitmweb_url": mitmweb_url,
        "metadata": {"request_bytes": request_bytes, **((info.metadata or {}) if info else {})},
    }


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
    usage: dict[str, Any] | None = None
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
            # The sums of its usage rows (there is one): the table reads without a join.
            "total_tokens": usage.get("total_tokens") if usage else None,
            "estimated_cost_usd": usage.get("estimated_cost_usd") if usage else None,
        },
    )
    if info.prompt is not None:
        yield (
            "user_prompts",
            prompt_row(interception_id, result.response_id, info.prompt, privacy, now),
        )
    if usage is not None:
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
