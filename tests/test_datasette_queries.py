"""Every canned query of datasette/metadata.yaml, run by datasette on a log the bridge wrote.

The log comes from the end-to-end set-up (mitmdump with addon.py, the fake upstream, the openai
SDK): two people, three days across a month boundary, two sessions, a tool round trip, reasoning,
cached tokens, failures and refusals. The bridge stamps rows with the wall clock, so the
exchanges are then moved to fixed days and times; costs are estimated from the config's
`pricing.overrides` (and genai-prices for one real model name) by ``python -m aibridge.cost``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import httpx
import openai
import pytest
import yaml

from aibridge import cost
from aibridge.config import load_config
from devtools.fake_upstream import FakeUpstream
from devtools.mitmdump_process import REPO
from tests.harness import TOKENS, Datasette, Mitmdump, bridge_config

METADATA = REPO / "datasette" / "metadata.yaml"
DB_NAME = "aibridge"

# Negotiated rates (USD per million tokens) for the fake models; "fake-tool*" is a glob.
PRICING = {
    "overrides": {
        "fake-text": {"input_per_mtok": 2, "output_per_mtok": 8, "cached_input_per_mtok": 0.5},
        "fake-cached": {
            "input_per_mtok": 1,
            "cached_input_per_mtok": 0.1,
            "cache_write_per_mtok": 1.25,
            "output_per_mtok": 4,
        },
        "fake-reasoning": {"input_per_mtok": 3, "output_per_mtok": 12, "reasoning_per_mtok": 6},
        "fake-tool*": {"input_per_mtok": 1, "output_per_mtok": 5},
    }
}
# What those rates make of the fake upstream's fixed token counts.
COST = {
    "text": 0.00016,  # 24 in x 2 + 14 out x 8
    "cached": 0.0007536,  # 384 uncached x 1 + 1536 cached x 0.1 + 128 written x 1.25 + 14 x 4
    "tool_call": 0.000206,  # 96 x 1 + 22 x 5
    "tool_result": 0.00023,  # 140 x 1 + 18 x 5
    "reasoning": 0.001488,  # 48 x 3 + 64 plain out x 12 + 96 reasoning x 6
}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
# When each exchange "happened", in the order they are sent (ended two seconds later).
SCHEDULE = [
    ("2025-05-31", "09:00"),  # 0 alice fake-text, streamed
    ("2025-05-31", "10:00"),  # 1 bob fake-cached
    ("2025-06-01", "09:00"),  # 2 alice fake-tool: the call (session sess-alice)
    ("2025-06-01", "09:01"),  # 3 alice fake-tool: the result goes back (sess-alice)
    ("2025-06-01", "11:00"),  # 4 bob fake-reasoning, streamed (sess-bob)
    ("2025-06-01", "12:00"),  # 5 alice gpt-5-mini: priced by genai-prices
    ("2025-06-02", "09:00"),  # 6 bob fake-incomplete, streamed (sess-bob): no price
    ("2025-06-02", "10:00"),  # 7 alice fake-failed, streamed: no price
    ("2025-06-02", "11:00"),  # 8 bob fake-429: upstream error
    ("2025-06-02", "12:00"),  # 9 alice background request: rejected 501
    ("2025-06-02", "13:00"),  # 10 unknown token: rejected 401
]
CATALOG_MODEL = "gpt-5-mini"


def started(i: int) -> str:
    day, hh_mm = SCHEDULE[i]
    return f"{day}T{hh_mm}:00.000000+00:00"


def ended(i: int) -> str:
    day, hh_mm = SCHEDULE[i]
    return f"{day}T{hh_mm}:02.000000+00:00"


@dataclass(frozen=True, slots=True)
class UsageLog:
    db_path: Path
    ids: list[str]  # interception ids, in SCHEDULE order
    catalog_cost: float  # genai-prices' price of exchange 5
    price_version: str  # the override fingerprint of fake-reasoning


def run_exchanges(base_url: str) -> None:
    alice = openai.OpenAI(base_url=base_url, api_key=TOKENS["alice"], max_retries=0)
    bob = openai.OpenAI(base_url=base_url, api_key=TOKENS["bob"], max_retries=0)
    alice_session = {"session_id": "sess-alice"}
    bob_session = {"session_id": "sess-bob"}

    for _ in alice.responses.create(
        model="fake-text", input="Draft the release notes", stream=True
    ):
        pass
    bob.responses.create(model="fake-cached", input="Summarise the style guide")
    first = alice.responses.create(
        model="fake-tool",
        input="What's the weather in Paris?",
        tools=[WEATHER_TOOL],
        extra_headers=alice_session,
    )
    call = next(item for item in first.output if item.type == "function_call")
    alice.responses.create(
        model="fake-tool",
        input=[
            {"role": "user", "content": "What's the weather in Paris?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, clear"},
        ],
        tools=[WEATHER_TOOL],
        extra_headers=alice_session,
    )
    for _ in bob.responses.create(
        model="fake-reasoning",
        input="Is 1013 prime? Think first.",
        stream=True,
        extra_headers=bob_session,
    ):
        pass
    alice.responses.create(model=CATALOG_MODEL, input="Name three primes")
    for _ in bob.responses.create(
        model="fake-incomplete", input="Write a long essay", stream=True, extra_headers=bob_session
    ):
        pass
    for _ in alice.responses.create(model="fake-failed", input="Please fail", stream=True):
        pass
    with pytest.raises(openai.RateLimitError):
        bob.responses.create(model="fake-429", input="Too many at once")
    with pytest.raises(openai.APIStatusError):
        alice.responses.create(model="fake-text", input="Later, please", background=True)
    stranger = openai.OpenAI(base_url=base_url, api_key="not-a-bridge-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.responses.create(model="fake-text", input="Let me in")


def move_to_schedule(db_path: Path) -> list[str]:
    """Give every exchange its scheduled time; returns the interception ids in order."""
    conn = sqlite3.connect(db_path)
    try:
        ids = [r[0] for r in conn.execute("select id from interceptions order by started_at")]
        assert len(ids) == len(SCHEDULE), ids
        children = ("token_usages", "user_prompts", "tool_usages", "model_thoughts")
        with conn:
            for i, iid in enumerate(ids):
                conn.execute(
                    "update interceptions set started_at = ?, ended_at = ? where id = ?",
                    (started(i), ended(i), iid),
                )
                for table in children:
                    conn.execute(
                        f"update {table} set created_at = ? where interception_id = ?",
                        (ended(i), iid),
                    )
        return ids
    finally:
        conn.close()


def build_usage_log(workdir: Path) -> UsageLog:
    """The bridge's log of SCHEDULE, with costs: shared with the screenshot test."""
    config = bridge_config("http://placeholder", pricing=PRICING)
    with FakeUpstream() as upstream:
        config["providers"][0]["base_url"] = f"{upstream.url}/v1"
        with Mitmdump(workdir, config) as bridge:
            run_exchanges(f"{bridge.url}/openai/v1")
    # Leaving the with-block stopped the bridge cleanly, so every row is written.
    ids = move_to_schedule(bridge.db_path)
    loaded = load_config(bridge.config_path, {"TEST_PROVIDER_KEY": "unused-here"})
    report = cost.backfill(bridge.db_path, cost.PriceBook(loaded.pricing), recompute=True)
    assert (report.examined, report.unpriced) == (8, 2)
    catalog = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=24, output_tokens=14),
        CATALOG_MODEL,
        provider_id="openai",
        genai_request_timestamp=datetime.fromisoformat(ended(5)),
    )
    reasoning = next(o for o in loaded.pricing.overrides if o.model == "fake-reasoning")
    return UsageLog(
        bridge.db_path, ids, float(catalog.total_price), cost.override_fingerprint(reasoning)
    )


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> UsageLog:
    return build_usage_log(tmp_path_factory.mktemp("usage-log"))


@pytest.fixture(scope="module")
def datasette(log: UsageLog) -> Iterator[Datasette]:
    with Datasette(log.db_path, "-m", str(METADATA)) as ds:
        yield ds


def canned(ds: Datasette, name: str, **params: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{ds.url}/{DB_NAME}/{name}.json", params={**params, "_shape": "array"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def r6(*costs: float) -> float:
    """A sum of costs as the queries show it: exact decimal sum, rounded to 6 places."""
    return round(float(sum((Decimal(repr(c)) for c in costs), Decimal(0))), 6)


def usage(inp: int, cached: int, out: int, reasoning: int, total: int) -> dict[str, int]:
    return {
        "input_tokens": inp,
        "cached_input_tokens": cached,
        "output_tokens": out,
        "reasoning_tokens": reasoning,
        "total_tokens": total,
    }


# ---------------------------------------------------------------------------------- tests


def test_every_canned_query_is_tested() -> None:
    queries = yaml.safe_load(METADATA.read_text())["databases"][DB_NAME]["queries"]
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert set(queries) <= tested


def test_usage_per_user_per_day(datasette: Datasette, log: UsageLog) -> None:
    def row(day: str, user: str, requests: int, tokens: dict[str, int], **rest: Any) -> dict:
        return {"day": day, "user": user, "requests": requests, **tokens, **rest}

    alice_june_1 = r6(COST["tool_call"], COST["tool_result"], log.catalog_cost)
    assert canned(datasette, "usage_per_user_per_day") == [
        row(
            "2025-06-02",
            "(unauthenticated)",
            1,
            usage(0, 0, 0, 0, 0),
            estimated_cost_usd=None,
            unpriced_responses=0,
        ),
        row(
            "2025-06-02",
            "alice",
            2,
            usage(24, 0, 0, 0, 24),
            estimated_cost_usd=None,
            unpriced_responses=1,
        ),
        row(
            "2025-06-02",
            "bob",
            2,
            usage(24, 0, 16, 0, 40),
            estimated_cost_usd=None,
            unpriced_responses=1,
        ),
        row(
            "2025-06-01",
            "alice",
            3,
            usage(260, 0, 54, 0, 314),
            estimated_cost_usd=alice_june_1,
            unpriced_responses=0,
        ),
        row(
            "2025-06-01",
            "bob",
            1,
            usage(48, 0, 160, 96, 208),
            estimated_cost_usd=r6(COST["reasoning"]),
            unpriced_responses=0,
        ),
        row(
            "2025-05-31",
            "alice",
            1,
            usage(24, 0, 14, 0, 38),
            estimated_cost_usd=r6(COST["text"]),
            unpriced_responses=0,
        ),
        row(
            "2025-05-31",
            "bob",
            1,
            usage(2048, 1536, 14, 0, 2062),
            estimated_cost_usd=r6(COST["cached"]),
            unpriced_responses=0,
        ),
    ]


def test_usage_per_model(datasette: Datasette, log: UsageLog) -> None:
    def row(model: str, reported: str | None, counts: tuple[int, int, int], **rest: Any) -> dict:
        requests, users, not_completed = counts
        return {
            "model": model,
            "reported_as": reported,
            "requests": requests,
            "users": users,
            "not_completed": not_completed,
            **rest,
        }

    want = [
        row(
            "fake-reasoning",
            "fake-reasoning",
            (1, 1, 0),
            **usage(48, 0, 160, 96, 208),
            estimated_cost_usd=r6(COST["reasoning"]),
            unpriced_responses=0,
        ),
        row(
            "fake-cached",
            "fake-cached",
            (1, 1, 0),
            **usage(2048, 1536, 14, 0, 2062),
            estimated_cost_usd=r6(COST["cached"]),
            unpriced_responses=0,
        ),
        row(
            "fake-tool",
            "fake-tool",
            (2, 1, 0),
            **usage(236, 0, 40, 0, 276),
            estimated_cost_usd=r6(COST["tool_call"], COST["tool_result"]),
            unpriced_responses=0,
        ),
        # The background request was refused before upstream: counted, but it used nothing.
        row(
            "fake-text",
            "fake-text",
            (2, 1, 1),
            **usage(24, 0, 14, 0, 38),
            estimated_cost_usd=r6(COST["text"]),
            unpriced_responses=0,
        ),
        row(
            CATALOG_MODEL,
            CATALOG_MODEL,
            (1, 1, 0),
            **usage(24, 0, 14, 0, 38),
            estimated_cost_usd=r6(log.catalog_cost),
            unpriced_responses=0,
        ),
        row(
            "fake-incomplete",
            "fake-incomplete",
            (1, 1, 1),
            **usage(24, 0, 16, 0, 40),
            estimated_cost_usd=None,
            unpriced_responses=1,
        ),
        row(
            "fake-failed",
            "fake-failed",
            (1, 1, 1),
            **usage(24, 0, 0, 0, 24),
            estimated_cost_usd=None,
            unpriced_responses=1,
        ),
        # Refused for an unknown token: the body was never read, so no model is known.
        row(
            "(none)",
            None,
            (1, 0, 1),
            **usage(0, 0, 0, 0, 0),
            estimated_cost_usd=None,
            unpriced_responses=0,
        ),
        row(
            "fake-429",
            None,
            (1, 1, 1),
            **usage(0, 0, 0, 0, 0),
            estimated_cost_usd=None,
            unpriced_responses=0,
        ),
    ]
    # Most expensive first, then the most tokens: the list price decides where gpt-5-mini is.
    want.sort(
        key=lambda r: (
            r["estimated_cost_usd"] is None,
            -(r["estimated_cost_usd"] or 0),
            -r["total_tokens"],
            r["model"],
        )
    )
    assert canned(datasette, "usage_per_model") == want


def test_top_tools(datasette: Datasette, log: UsageLog) -> None:
    assert canned(datasette, "top_tools") == [
        {
            "tool": "get_weather",
            "type": "function_call",
            "calls": 1,
            "users": 1,
            "sessions": 1,
            "errors": 0,
            "first_called": ended(2),
            "last_called": ended(2),
        }
    ]


def test_prompts_of_user(datasette: Datasette, log: UsageLog) -> None:
    def row(i: int, model: str, session: str | None, status: str, prompt: str) -> dict:
        return {
            "at": ended(i),
            "model": model,
            "client": "openai-python",
            "session": session,
            "status": status,
            "prompt": prompt,
            "interception_id": log.ids[i],
        }

    assert canned(datasette, "prompts_of_user", user="alice") == [
        row(9, "fake-text", None, "rejected", "Later, please"),
        row(7, "fake-failed", None, "failed", "Please fail"),
        row(5, CATALOG_MODEL, None, "completed", "Name three primes"),
        row(2, "fake-tool", "sess-alice", "completed", "What's the weather in Paris?"),
        row(0, "fake-text", None, "completed", "Draft the release notes"),
    ]
    assert [r["prompt"] for r in canned(datasette, "prompts_of_user", user="bob")] == [
        "Too many at once",
        "Write a long essay",
        "Is 1013 prime? Think first.",
        "Summarise the style guide",
    ]
    assert canned(datasette, "prompts_of_user", user="nobody") == []


def test_interception_story(datasette: Datasette, log: UsageLog) -> None:
    story = canned(datasette, "interception_story", interception_id=log.ids[4])
    assert [(r["at"], r["what"]) for r in story] == [
        (started(4), "request"),
        (ended(4), "prompt"),
        (ended(4), "thought: reasoning_summary"),
        (ended(4), "thought: reasoning_summary"),
        (ended(4), "thought: commentary"),
        (ended(4), "tokens"),
        (ended(4), "end"),
    ]
    details = [r["detail"] for r in story]
    assert details[0] == "bob via openai-python asked fake-reasoning, streamed, session sess-bob"
    assert details[1] == "Is 1013 prime? Think first."
    assert details[2].startswith("**Planning the answer**")
    assert details[3].startswith("**Double-checking**")
    assert details[4] == "Let me check this quickly before answering."
    assert details[5] == (
        "input 48 (cached 0), output 160 (reasoning 96), total 208, "
        f"estimated $0.001488 (config {log.price_version}, priced as fake-reasoning)"
    )
    assert details[6] == "completed, HTTP 200, answered by fake-reasoning"

    # The tool round trip: the call in one request, its result carried back by the next.
    call = canned(datasette, "interception_story", interception_id=log.ids[2])
    assert [r["what"] for r in call] == [
        "request",
        "prompt",
        "tool call: function_call",
        "tokens",
        "end",
    ]
    assert call[2]["detail"].startswith("get_weather({")
    assert "estimated $0.000206 (config sha256:" in call[3]["detail"]
    (tool,) = httpx.get(
        f"{datasette.url}/{DB_NAME}/tool_usages.json",
        params={"interception_id": log.ids[2], "_shape": "array"},
        timeout=30,
    ).json()
    result = canned(datasette, "interception_story", interception_id=log.ids[3])
    assert [r["what"] for r in result] == ["request", "tokens", "end"]
    assert result[0]["detail"].endswith(f"returning the result of tool call {tool['call_id']}")

    refused = canned(datasette, "interception_story", interception_id=log.ids[10])
    assert [(r["what"], r["detail"].split(":")[0]) for r in refused] == [
        ("request", "(unauthenticated) via openai-python asked no model"),
        ("end", "rejected, HTTP 401"),
    ]
    assert canned(datasette, "interception_story", interception_id="no-such-id") == []


def test_failed_requests(datasette: Datasette, log: UsageLog) -> None:
    rows = canned(datasette, "failed_requests")
    assert [
        (r["at"], r["user"], r["status"], r["http_status"], r["model"], r["interception_id"])
        for r in rows
    ] == [
        (started(10), "(unauthenticated)", "rejected", 401, None, log.ids[10]),
        (started(9), "alice", "rejected", 501, "fake-text", log.ids[9]),
        (started(8), "bob", "upstream_error", 429, "fake-429", log.ids[8]),
        (started(7), "alice", "failed", 200, "fake-failed", log.ids[7]),
        (started(6), "bob", "incomplete", 200, "fake-incomplete", log.ids[6]),
    ]
    unknown, background, limited, failed, _ = rows
    # What a security reviewer needs about the stranger: a hint of the token, never the token.
    assert unknown["credential_kind"] is None
    assert unknown["credential_hint"] == "no...en"
    assert "not-a-bridge-token" not in str(rows)
    assert background["error"] == "background requests are currently not supported by AI Bridge"
    assert "Rate limit reached" in limited["error"]
    assert "failed while generating the response" in failed["error"]
    assert {r["client"] for r in rows} == {"openai-python"}


def test_sessions(datasette: Datasette, log: UsageLog) -> None:
    assert canned(datasette, "sessions") == [
        {
            "session": "sess-bob",
            "users": "bob",
            "clients": "openai-python",
            "turns": 2,
            "prompts": 2,
            "tool_calls": 0,
            "not_completed": 1,
            "total_tokens": 248,
            "estimated_cost_usd": r6(COST["reasoning"]),
            "started": started(4),
            "last_activity": ended(6),
        },
        {
            "session": "sess-alice",
            "users": "alice",
            "clients": "openai-python",
            "turns": 2,
            "prompts": 1,
            "tool_calls": 1,
            "not_completed": 0,
            "total_tokens": 276,
            "estimated_cost_usd": r6(COST["tool_call"], COST["tool_result"]),
            "started": started(2),
            "last_activity": ended(3),
        },
    ]


def test_session_turns(datasette: Datasette, log: UsageLog) -> None:
    def turn(n: int, i: int, kind: str, prompt: str | None, tools: str | None, **rest: Any) -> dict:
        return {
            "turn": n,
            "at": started(i),
            "user": "alice",
            "model": "fake-tool",
            "kind": kind,
            "prompt": prompt,
            "tools_called": tools,
            **rest,
            "status": "completed",
            "interception_id": log.ids[i],
        }

    assert canned(datasette, "session_turns", session_id="sess-alice") == [
        turn(
            1,
            2,
            "prompt",
            "What's the weather in Paris?",
            "get_weather",
            total_tokens=118,
            estimated_cost_usd=r6(COST["tool_call"]),
        ),
        turn(
            2,
            3,
            "tool result",
            None,
            None,
            total_tokens=158,
            estimated_cost_usd=r6(COST["tool_result"]),
        ),
    ]
    bob = canned(datasette, "session_turns", session_id="sess-bob")
    assert [(t["turn"], t["kind"], t["status"], t["estimated_cost_usd"]) for t in bob] == [
        (1, "prompt", "completed", r6(COST["reasoning"])),
        (2, "prompt", "incomplete", None),
    ]


def test_cost_per_user_per_month(datasette: Datasette, log: UsageLog) -> None:
    rows = canned(datasette, "cost_per_user_per_month")
    sources = [set((r.pop("price_sources") or "").split(",")) - {""} for r in rows]
    assert rows == [
        {
            "month": "2025-06",
            "user": "bob",
            "requests": 3,
            "input_tokens": 72,
            "output_tokens": 176,
            "estimated_cost_usd": r6(COST["reasoning"]),
            "priced_responses": 1,
            "unpriced_responses": 1,
        },
        {
            "month": "2025-06",
            "user": "alice",
            "requests": 5,
            "input_tokens": 284,
            "output_tokens": 54,
            "estimated_cost_usd": r6(COST["tool_call"], COST["tool_result"], log.catalog_cost),
            "priced_responses": 3,
            "unpriced_responses": 1,
        },
        {
            "month": "2025-06",
            "user": "(unauthenticated)",
            "requests": 1,
            "input_tokens": 0,
            "output_tokens": 0,
            "estimated_cost_usd": None,
            "priced_responses": 0,
            "unpriced_responses": 0,
        },
        {
            "month": "2025-05",
            "user": "bob",
            "requests": 1,
            "input_tokens": 2048,
            "output_tokens": 14,
            "estimated_cost_usd": r6(COST["cached"]),
            "priced_responses": 1,
            "unpriced_responses": 0,
        },
        {
            "month": "2025-05",
            "user": "alice",
            "requests": 1,
            "input_tokens": 24,
            "output_tokens": 14,
            "estimated_cost_usd": r6(COST["text"]),
            "priced_responses": 1,
            "unpriced_responses": 0,
        },
    ]
    assert sources == [{"config"}, {"config", "genai-prices"}, set(), {"config"}, {"config"}]


def test_tables_are_described_and_dashboard_is_served(datasette: Datasette) -> None:
    """Every column of every table has a description, and the usage dashboard renders."""
    meta = yaml.safe_load(METADATA.read_text())["databases"][DB_NAME]["tables"]
    conn = sqlite3.connect(f"file:{datasette.db_path}?mode=ro", uri=True)
    try:
        for table, described in meta.items():
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info([{table}])")]
            assert columns, table
            missing = set(columns) - set(described.get("columns", {})) - {"id"}
            assert not missing, (table, missing)
    finally:
        conn.close()
    page = httpx.get(f"{datasette.url}/{DB_NAME}/token_usages", timeout=30).text
    assert "Estimated cost in US dollars" in page
    dashboard = httpx.get(f"{datasette.url}/-/dashboards/usage", timeout=30)
    assert dashboard.status_code == 200 and "Tokens per day and person" in dashboard.text
