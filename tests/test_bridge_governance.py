"""Budgets and limits in the addon's hooks (aibridge.bridge with aibridge.governance), driven as
mitmproxy drives them: a refusal is answered before anything goes upstream, in the API's error
shape, and recorded; a slot is given back however an exchange ends."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from mitmproxy import http
from mitmproxy.flow import Error
from mitmproxy.test import taddons

from aibridge.bridge import AIBridge
from aibridge.governance import report
from aibridge.governance.governor import WARNING_HEADER
from tests.harness import noon_zone
from tests.test_bridge import TOKENS, Bridge, fixture, make_flow, query, write_config

# The buffered fixture's usage: total_tokens of one exchange.
TOKENS_PER_EXCHANGE = 1064
BYOK_KEY = "sk-user-own-key-0123456789abcdef"
MESSAGES_URL = "https://api.anthropic.com/v1/messages"
MESSAGES_BODY = (
    b'{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}'
)


@pytest.fixture
def governed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Bridge]]:
    monkeypatch.chdir(tmp_path)
    with contextlib.ExitStack() as stack:

        def make(limits: dict[str, Any] | None = None, **overrides: Any) -> Bridge:
            users = [{"id": user, "token": token} for user, token in TOKENS.items()]
            if limits is not None:
                users[0]["limits"] = limits  # alice's
            overrides.setdefault("users", users)
            overrides["governance"] = {"time_zone": noon_zone(), **overrides.get("governance", {})}
            addon = AIBridge(default_config_dir=tmp_path)
            tctx = stack.enter_context(taddons.context(addon))
            stack.callback(addon.done)
            tctx.configure(addon, aibridge_config=str(write_config(tmp_path, **overrides)))
            return Bridge(addon, tctx, tmp_path / "audit.db")

        yield make


def send(bridge: Bridge, token: str = TOKENS["alice"], **kw: Any) -> http.HTTPFlow:
    flow = make_flow(fixture("text_buffered", "request.json"), token=token, **kw)
    bridge.addon.request(flow)
    return flow


def answer(bridge: Bridge, flow: http.HTTPFlow) -> None:
    """Upstream's buffered answer, through the response hooks."""
    assert flow.response is None, "the request was refused"
    flow.response = http.Response.make(
        200, fixture("text_buffered", "response.json"), {"content-type": "application/json"}
    )
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)


def exchange(bridge: Bridge, token: str = TOKENS["alice"]) -> http.HTTPFlow:
    flow = send(bridge, token)
    answer(bridge, flow)
    return flow


def refusal(flow: http.HTTPFlow, status: int) -> dict[str, Any]:
    assert flow.response is not None
    assert flow.response.status_code == status
    assert flow.response.headers["x-aibridge-error"] == "1"  # ours: upstream never saw it
    body = orjson.loads(flow.response.content or b"")
    return body


def rejected_row(bridge: Bridge, flow: http.HTTPFlow) -> dict[str, Any]:
    row = bridge.interception(flow)
    assert row["status"] == "rejected"
    row["metadata"] = orjson.loads(row["metadata"])
    return row


def test_a_spent_token_budget_refuses_with_403_naming_it_and_its_reset(
    governed: Callable[..., Bridge],
) -> None:
    # Two exchanges fit (the first starts at 0, the second at 1064 < 1500), the third not.
    bridge = governed({"tokens": {"day": 1500}})
    exchange(bridge)
    exchange(bridge)
    flow = send(bridge)
    body = refusal(flow, 403)
    message = body["error"]["message"]
    assert body["error"]["type"] == "permission_error"
    assert "the daily token budget of user alice is used up" in message
    assert "2,128 tokens of 1,500 tokens since" in message
    assert "resets at" in message and noon_zone() in message and "users[0].limits" in message
    assert "retry-after" not in flow.response.headers  # final: agents must not retry
    assert flow.response.headers["x-aibridge-limit"] == "tokens.day"
    resets = datetime.fromisoformat(flow.response.headers["x-aibridge-budget-resets"])
    assert resets.tzinfo is not None and resets > datetime.now(UTC)
    assert "refused 403" in flow.comment and "alice" in flow.comment
    row = rejected_row(bridge, flow)
    assert row["http_status"] == 403 and row["error"] == message
    limit = row["metadata"]["limit"]
    assert limit["limit"] == "tokens.day" and limit["used"] == 2 * TOKENS_PER_EXCHANGE
    assert (limit["scope"], limit["owner"], limit["limit_value"]) == ("user", "alice", 1500)
    # What the person asked is kept with the refusal.
    prompts = bridge.children("user_prompts", row["id"])
    assert [p["prompt"] for p in prompts] == ["What is in this image?\nAnswer in one sentence."]
    # Another person is not touched by alice's budget.
    exchange(bridge, TOKENS["bob"])


def test_a_spend_budget_counts_the_cost_the_log_holds(governed: Callable[..., Bridge]) -> None:
    bridge = governed({"spend_usd": {"month": 0.000001}})
    first = exchange(bridge)
    bridge.flush()
    (usage,) = bridge.children("token_usages", bridge.interception(first)["id"])
    assert usage["estimated_cost_usd"] > 0.000001  # gpt-4.1 is priced
    message = refusal(send(bridge), 403)["error"]["message"]
    assert "the monthly spend budget of user alice is used up ($0.00 of $0.00" in message


def test_a_budget_is_seeded_from_the_log_at_start_up(governed: Callable[..., Bridge]) -> None:
    first = governed({"tokens": {"week": 1000}})
    exchange(first)
    first.flush()
    first.addon.done()
    again = governed({"tokens": {"week": 1000}})  # same file, a new bridge
    assert "weekly token budget" in refusal(send(again), 403)["error"]["message"]


def test_a_budget_of_zero_refuses_every_request(governed: Callable[..., Bridge]) -> None:
    bridge = governed({"spend_usd": {"day": 0}})
    refusal(send(bridge), 403)


def test_own_keys_do_not_spend_the_organisations_budget(governed: Callable[..., Bridge]) -> None:
    # BYOK identities are in the "*" group: its budget is spent by nobody's own key.
    groups = [{"name": "all", "members": ["*"], "limits": {"tokens": {"day": 10}}}]
    bridge = governed(byok=True, groups=groups)
    exchange(bridge, BYOK_KEY)
    exchange(bridge, BYOK_KEY)
    exchange(bridge, TOKENS["bob"])  # centralized: 0 spent so far, admitted
    refusal(send(bridge, TOKENS["bob"]), 403)


def test_a_shared_group_budget_spent_by_one_member_stops_another(
    governed: Callable[..., Bridge],
) -> None:
    groups = [
        {"name": "team", "members": ["alice", "bob"], "shared_limits": {"tokens": {"day": 1}}}
    ]
    bridge = governed(groups=groups)
    exchange(bridge, TOKENS["alice"])
    message = refusal(send(bridge, TOKENS["bob"]), 403)["error"]["message"]
    assert "the daily token budget of group team (shared by its members)" in message
    assert "groups[0].shared_limits" in message


def test_a_warning_header_from_the_configured_share(governed: Callable[..., Bridge]) -> None:
    bridge = governed({"tokens": {"day": 4000}}, governance={"warn_at": 0.25})
    first = exchange(bridge)
    assert WARNING_HEADER not in first.response.headers  # 0 of 4,000 when it started
    second = exchange(bridge)
    warning = second.response.headers[WARNING_HEADER]
    assert warning.startswith("26% of the daily token budget of user alice is used")
    assert "(1,064 tokens of 4,000 tokens), resets at" in warning


def test_requests_per_minute_over_the_limit_get_429_with_retry_after(
    governed: Callable[..., Bridge],
) -> None:
    bridge = governed({"requests_per_minute": 2})
    exchange(bridge)
    exchange(bridge)
    flow = send(bridge)
    body = refusal(flow, 429)
    assert body["error"]["type"] == "rate_limit_exceeded"
    assert "may send 2 requests per minute" in body["error"]["message"]
    assert 1 <= int(flow.response.headers["retry-after"]) <= 60
    assert rejected_row(bridge, flow)["metadata"]["limit"]["limit"] == "requests_per_minute"
    exchange(bridge, TOKENS["bob"])  # per person


def test_a_refused_request_does_not_use_up_the_rate(governed: Callable[..., Bridge]) -> None:
    bridge = governed({"requests_per_minute": 1, "concurrent_requests": 1})
    held = send(bridge)
    refusal(send(bridge), 429)  # the rate, not concurrency: one sent this minute
    answer(bridge, held)
    assert bridge.addon.governor is not None
    assert bridge.addon.governor._recent["alice"].__len__() == 1


@pytest.mark.parametrize("ending", ["response", "error", "shutdown"])
def test_a_concurrency_slot_is_given_back_however_the_exchange_ends(
    governed: Callable[..., Bridge], ending: str
) -> None:
    bridge = governed({"concurrent_requests": 1})
    held = send(bridge)
    assert held.response is None
    second = send(bridge)
    body = refusal(second, 429)
    assert "may have 1 request in flight at once" in body["error"]["message"]
    assert second.response.headers["retry-after"] == "1"
    if ending == "response":
        answer(bridge, held)
    elif ending == "error":
        held.error = Error("Client disconnected.")
        bridge.addon.error(held)
    else:
        bridge.addon.done()
        assert bridge.addon.governor is None or bridge.addon.governor._in_flight == {}
        return
    answer(bridge, send(bridge))  # the slot is free again
    assert bridge.addon.governor is not None
    assert bridge.addon.governor._in_flight == {}


def test_refusals_use_the_error_shape_of_the_clients_api(governed: Callable[..., Bridge]) -> None:
    providers = [
        {
            "name": "anthropic",
            "type": "anthropic",
            "base_url": "https://api.anthropic.com",
            "api_key": "sk-ant-api03-bridge-test-key-0123456789",
        }
    ]
    bridge = governed({"requests_per_minute": 1}, providers=providers)
    for _ in range(2):
        flow = make_flow(MESSAGES_BODY, url=MESSAGES_URL, x_api_key=TOKENS["alice"])
        del flow.request.headers["authorization"]
        bridge.addon.request(flow)
    body = refusal(flow, 429)
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "retry-after" in flow.response.headers


def test_a_saved_refusal_is_rebuilt_offline_with_its_limit(
    governed: Callable[..., Bridge],
) -> None:
    bridge = governed({"tokens": {"day": 0}})
    flow = send(bridge)
    live = rejected_row(bridge, flow)
    bridge.replay_saved(flow, live["id"])
    rebuilt = rejected_row(bridge, flow)
    assert rebuilt["metadata"]["limit"] == live["metadata"]["limit"]
    assert (rebuilt["http_status"], rebuilt["error"]) == (403, live["error"])


def test_no_limits_configured_costs_nothing_to_release(governed: Callable[..., Bridge]) -> None:
    bridge = governed()
    assert bridge.addon.governor is not None and not bridge.addon.governor.enabled
    flow = exchange(bridge)
    assert bridge.interception(flow)["status"] == "completed"
    assert WARNING_HEADER not in flow.response.headers


def test_the_bridge_publishes_its_budgets_for_the_canned_query(
    governed: Callable[..., Bridge],
) -> None:
    groups = [{"name": "team", "members": ["*"], "shared_limits": {"tokens": {"month": 10**6}}}]
    bridge = governed({"tokens": {"day": 4000}}, groups=groups)
    exchange(bridge)
    bridge.flush()
    published = query(bridge.db_path, "select * from budgets order by id")
    assert [(r["scope"], r["owner"], r["metric"], r["period"]) for r in published] == [
        ("group", "team", "tokens", "month"),
        ("user", "alice", "tokens", "day"),
    ]
    conn = sqlite3.connect(bridge.db_path)
    conn.row_factory = sqlite3.Row
    try:
        use = {(r["scope"], r["owner"]): dict(r) for r in conn.execute(report.BUDGET_USE_SQL)}
    finally:
        conn.close()
    assert use[("user", "alice")]["spent"] == TOKENS_PER_EXCHANGE
    assert use[("group", "team")]["spent"] == TOKENS_PER_EXCHANGE
    assert use[("user", "alice")]["limit"] == 4000


def test_a_failure_after_admission_gives_the_slot_back(
    governed: Callable[..., Bridge], monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge = governed({"concurrent_requests": 1})

    def broken(*_: Any) -> None:
        raise RuntimeError("a bug after the budget check")

    with monkeypatch.context() as patched:
        patched.setattr(AIBridge, "_retarget", staticmethod(broken))
        failed = send(bridge)
    assert failed.response is not None and failed.response.status_code == 500  # fail closed
    assert bridge.addon.governor is not None and bridge.addon.governor._in_flight == {}
    answer(bridge, send(bridge))  # the one slot is free
