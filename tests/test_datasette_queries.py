"""Every canned query of the datasette plugin (aibridge/datasette/metadata.yaml), run by
datasette on a log the bridge wrote.

The log comes from the end-to-end set-up (mitmdump with addon.py, the fake upstream) with both
APIs: the openai SDK on the Responses API, the anthropic SDK and replayed Claude Code requests
(tests/fixtures/claude_code_captured) on the Messages API. Two people and a Claude Pro/Max
sign-in, three days across a month boundary, Codex-style and Claude Code sessions, tool round
trips, reasoning and thinking, cache reads and 5-minute and 1-hour cache writes, failures and
refusals. The bridge stamps rows with the wall clock, so the exchanges are then moved to fixed
days and times. Chat Completions exchanges (OpenCode sessions with a tool round trip, Zed on an
OpenAI-compatible host with reasoning, Copilot with cached tokens, streams whose usage was
added by the bridge, requested by the client or not requested, a length stop, a content
filter, a 429, an unknown token) are written into the same file the way the bridge's record
rows put them (aibridge/record/rows.py, schema.py), at fixed times. Costs are estimated from
the config's `pricing.overrides` (and genai-prices for real model names) by
``python -m aibridge.cost``.
"""

from __future__ import annotations

import importlib.util
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import genai_prices
import httpx
import openai
import orjson
import pytest
import yaml
from datasette_dashboards import replace_opts_in_query

from aibridge import cost
from aibridge.config import load_config
from aibridge.governance.limits import Governance, Group, Limits
from aibridge.governance.report import budget_rows
from aibridge.record.schema import INDEX_NEW_PROMPTS, LAST_PROMPT_ID
from devtools.fake_anthropic import THINKING
from devtools.fake_upstream import FakeUpstream
from devtools.mitmdump_process import REPO
from tests.harness import TOKENS, Datasette, Mitmdump, bridge_config

METADATA = REPO / "aibridge" / "datasette" / "metadata.yaml"
DB_NAME = "aibridge"
CAPTURED = REPO / "tests" / "fixtures" / "claude_code_captured"

# Negotiated rates (USD per million tokens) for the fake models; "fake-tool*" is a glob.
# Overrides apply to every provider: the Anthropic fake's fake-cached is priced as OpenAI's.
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
        "fake-thinking": {
            "input_per_mtok": 3,
            "cached_input_per_mtok": 0.3,
            "cache_write_per_mtok": 3.75,
            "output_per_mtok": 15,
        },
    }
}
# What those rates make of the fake upstream's fixed token counts (Responses) and of the
# Anthropic fake's counts for its n-th call (see messages_usage).
COST = {
    "text": 0.00016,  # 24 in x 2 + 14 out x 8
    "cached": 0.0007536,  # 384 uncached x 1 + 1536 cached x 0.1 + 128 written x 1.25 + 14 x 4
    "tool_call": 0.000206,  # 96 x 1 + 22 x 5
    "tool_result": 0.00023,  # 140 x 1 + 18 x 5
    "reasoning": 0.001488,  # 48 x 3 + 64 plain out x 12 + 96 reasoning x 6
    # n=2: 201 uncached x 1 + 20003 read x 0.1 + 1202 written for 5 minutes x 1.25 + 800 for
    # an hour x 2 (no 1-hour rate given: twice the input rate, as Anthropic bills) + 19 x 4
    "m_cached": 0.0053798,
    # n=5: 501 uncached x 3 + 50003 read x 0.3 + 5002 written x 3.75 + 40 out x 15
    "m_thinking": 0.0358614,
    # Chat Completions: fake-tool* has no cached rate, so cached input is billed as input.
    "c_tool_call": 0.0014,  # 1200 in x 1 + 40 x 5
    "c_tool_result": 0.0016,  # 1300 in x 1 + 60 x 5
    "c_reasoning": 0.001392,  # 64 x 3 + 50 plain out x 12 + 100 reasoning x 6
}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
# When each exchange "happened", in the order they are sent (ended two seconds later).
# n is the Anthropic fake's call number, which sets that exchange's usage.
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
    # The Messages API, from here on.
    ("2025-05-31", "11:00"),  # 11 n=1 alice claude-sonnet-4-5, streamed: genai-prices
    ("2025-05-31", "12:00"),  # 12 n=2 bob fake-cached: 5-minute and 1-hour cache writes
    ("2025-06-01", "14:00"),  # 13 n=3 bob Claude Code "run echo hi": Bash tool_use
    ("2025-06-01", "14:01"),  # 14 n=4 bob Claude Code: the tool_result goes back
    ("2025-06-01", "15:00"),  # 15 n=5 alice fake-thinking, streamed: a thought
    ("2025-06-02", "14:00"),  # 16 n=6 Claude Code "say hi" on a Pro/Max sign-in: not priced
    ("2025-06-02", "15:00"),  # 17 n=7 bob fake-max-tokens, streamed: incomplete, no price
    ("2025-06-02", "16:00"),  # 18 n=8 alice fake-refusal: completed with error refusal
    ("2025-06-02", "17:00"),  # 19 n=9 bob fake-529: upstream error
    ("2025-06-02", "18:00"),  # 20 unknown token on /anthropic: rejected 401
    # Chat Completions, from here on: written into the file (see CHAT).
    ("2025-05-31", "13:00"),  # 21 alice OpenCode fake-tool: the call (session OPENCODE_SESSION)
    ("2025-05-31", "13:01"),  # 22 alice OpenCode: the result goes back
    ("2025-06-01", "10:30"),  # 23 bob Zed on OpenRouter, fake-reasoning: a reasoning thought
    ("2025-06-01", "16:00"),  # 24 bob curl, streamed, usage not requested: no usage row
    ("2025-06-02", "08:00"),  # 25 alice Copilot gpt-4.1-mini, buffered, cached: genai-prices
    ("2025-06-02", "10:30"),  # 26 alice OpenCode without a session id: length, incomplete
    ("2025-06-02", "11:30"),  # 27 bob Open WebUI on OpenRouter (chat id): content_filter
    ("2025-06-02", "12:30"),  # 28 bob Cursor fake-429, streamed: upstream error
    ("2025-06-02", "14:30"),  # 29 alice OpenCode, compressed body: usage could not be added
    ("2025-06-02", "19:00"),  # 30 unknown token on a Chat Completions path: rejected 401
]
BRIDGED = 21  # exchanges 0..20 went through the bridge; the rest are CHAT's rows
CATALOG_MODEL = "gpt-5-mini"
CATALOG_CLAUDE = "claude-sonnet-4-5"
CHAT_CATALOG_MODEL = "gpt-4.1-mini-2025-04-14"  # what exchange 25 reports: priced as gpt-4.1-mini
CLAUDE_CODE_MODEL = "claude-opus-5-5"  # Claude Code's default in the captured requests
CC_SESSION = "ff778444-109f-4382-b1a7-f131f7df8ced"  # tool_turn1/2's session
SIGN_IN_SESSION = "941f58b2-61f3-458f-b8cb-bd1aedd69e6c"  # say_hi's session
CAPTURED_CALL_ID = "toolu_01CaptureBashEchoHi0001"
# A Claude Pro/Max OAuth token, as Claude Code sends it (Authorization: Bearer).
SIGN_IN_TOKEN = "sk-ant-oat01-carol-pro-max-sign-in-token"
SIGN_IN_USER = "subscription:sk-a...oken"  # who the bridge says sent it: the token's hint
# Headers of the capture that belong to its run (its port, its token), set anew on replay.
_NOT_REPLAYED = {"host", "content-length", "connection", "accept-encoding", "x-api-key"}


def api_of(i: int) -> str:
    return "responses" if i <= 10 else "messages" if i < BRIDGED else "chat_completions"


def provider_of(i: int) -> str:
    if i in CHAT:
        return CHAT[i].provider[0]
    return "anthropic" if api_of(i) == "messages" else "openai"


def client_of(i: int) -> str:
    if i in CHAT:
        return CHAT[i].client
    return "anthropic-python" if api_of(i) == "messages" else "openai-python"


def started(i: int) -> str:
    day, hh_mm = SCHEDULE[i]
    return f"{day}T{hh_mm}:00.000000+00:00"


def ended(i: int) -> str:
    day, hh_mm = SCHEDULE[i]
    return f"{day}T{hh_mm}:02.000000+00:00"


@dataclass(frozen=True, slots=True)
class Tokens:
    """One token_usages row as the bridge must have written it."""

    input: int
    cache_read: int | None  # None: not reported (a host without a cache)
    cache_write: int | None  # None: not reported (Chat Completions)
    output: int
    reasoning: int | None
    write_1h: int | None  # Anthropic's 1-hour cache writes; None: no split reported (OpenAI)

    @property
    def uncached(self) -> int:
        return self.input - (self.cache_read or 0) - (self.cache_write or 0)

    @property
    def total(self) -> int:
        return self.input + self.output

    @property
    def write_5m(self) -> int | None:
        return None if self.write_1h is None else self.cache_write - self.write_1h


def responses_tokens(
    inp: int, out: int, *, read: int = 0, write: int = 0, reasoning: int = 0
) -> Tokens:
    return Tokens(inp, read, write, out, reasoning, None)


def messages_tokens(n: int, *, split_cache: bool = False) -> Tokens:
    """The Anthropic fake's n-th call (devtools/fake_anthropic.py): Anthropic's input_tokens
    100n+1 is our uncached part, ours adds cache reads 10000n+3 and writes 1000n+2 (fake-cached:
    400n of them for an hour); output 7n+5. Anthropic reports no reasoning split."""
    uncached, read, write = 100 * n + 1, 10000 * n + 3, 1000 * n + 2
    return Tokens(
        uncached + read + write, read, write, 7 * n + 5, None, 400 * n if split_cache else 0
    )


def chat_usage(
    prompt: int, completion: int, *, cached: int | None = None, reasoning: int | None = None
) -> dict[str, Any]:
    """A Chat Completions ``usage`` as the provider sends it: OpenAI sends both details objects
    (cached None: a host that sends neither, as OpenRouter may)."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}
    if reasoning is not None:
        usage["completion_tokens_details"] = {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


def chat_tokens(usage: dict[str, Any]) -> Tokens:
    """What the bridge makes of a Chat Completions usage (OpenTelemetry semantics): prompt
    tokens include the cached ones, completion tokens the reasoning ones; no cache writes."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    return Tokens(usage["prompt_tokens"], cached, None, usage["completion_tokens"], reasoning, None)


@dataclass(frozen=True, slots=True)
class ChatExchange:
    """One Chat Completions exchange, as its rows in the log."""

    user: str | None
    client: str
    user_agent: str
    model: str | None
    prompt: str | None
    status: str = "completed"
    http_status: int = 200
    provider: tuple[str, str] = ("openai", "openai")  # type, name
    session: str | None = None
    streaming: bool | None = True
    stream_usage: str | None = "added by the bridge"
    usage: dict[str, Any] | None = None
    response_model: str | None = None  # None: the requested model answered (if it did)
    error: str | None = None
    correlating_tool_call_id: str | None = None
    tools: tuple[tuple[str, str, Any], ...] = ()  # call id, name, args
    thoughts: tuple[str, ...] = ()
    service_tier: str | None = "default"


OPENCODE_SESSION = "ses_7f3a21c4effe1Qm8ZkR2xW9vLp"
OPENCODE_UA = "opencode/1.18.33 ai-sdk/provider-utils/4.0.23 runtime/bun/1.3.14"  # captured
OPENWEBUI_CHAT = "b3f1c2d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
OPENCODE_CALL_ID = "call_Rd21tQx0parser"
REASONING_TEXT = "1013 is odd and not divisible by 3, 7, 11, 13, 17, 19, 23, 29 or 31."
OPENROUTER = ("openai_compatible", "openrouter")
CHAT_STRANGER_HINT = "un...en"  # of "unknown-chat-token"
CHAT: dict[int, ChatExchange] = {
    21: ChatExchange(
        "alice",
        "OpenCode",
        OPENCODE_UA,
        "fake-tool",
        "Add a test for the parser",
        session=OPENCODE_SESSION,
        usage=chat_usage(1200, 40, cached=1024, reasoning=0),
        tools=((OPENCODE_CALL_ID, "read", {"filePath": "tests/test_parser.py"}),),
    ),
    22: ChatExchange(
        "alice",
        "OpenCode",
        OPENCODE_UA,
        "fake-tool",
        None,
        session=OPENCODE_SESSION,
        stream_usage="requested by the client",
        usage=chat_usage(1300, 60, cached=1152, reasoning=0),
        correlating_tool_call_id=OPENCODE_CALL_ID,
    ),
    23: ChatExchange(
        "bob",
        "Zed",
        "Zed/0.210.4+stable.201.8f1a2b3c (macos; aarch64)",
        "fake-reasoning",
        "Is 1013 prime? Think first.",
        provider=OPENROUTER,
        stream_usage="requested by the client",
        usage=chat_usage(64, 150, reasoning=100),
        thoughts=(REASONING_TEXT,),
        service_tier=None,
    ),
    24: ChatExchange(
        "bob", "curl", "curl/8.5.0", "fake-text", "Tell me a joke", stream_usage="not requested"
    ),
    25: ChatExchange(
        "alice",
        "GitHub Copilot",
        "GitHubCopilotChat/0.32.2025101401",
        "gpt-4.1-mini",
        "Explain this function",
        streaming=False,
        stream_usage=None,
        usage=chat_usage(2048, 30, cached=1536, reasoning=0),
        response_model="gpt-4.1-mini-2025-04-14",
    ),
    26: ChatExchange(
        "alice",
        "OpenCode",
        "opencode/0.15.8 ai/5.0.59 ai-sdk/provider-utils/3.0.10 runtime/bun/1.2.23",
        "fake-incomplete",
        "Write the migration guide",
        status="incomplete",
        error="length",
        usage=chat_usage(500, 256, cached=0, reasoning=0),
    ),
    27: ChatExchange(
        "bob",
        "Open WebUI",
        "Python/3.11 aiohttp/3.12.15",
        "fake-filter",
        "Describe the incident",
        provider=OPENROUTER,
        session=OPENWEBUI_CHAT,
        streaming=False,
        stream_usage=None,
        error="content_filter",
        usage=chat_usage(20, 0),
        service_tier=None,
    ),
    28: ChatExchange(
        "bob",
        "Cursor",
        "OpenAI/JS 4.104.0",
        "fake-429",
        "Refactor the router",
        status="upstream_error",
        http_status=429,
        stream_usage="requested by the client",
        error="Rate limit reached for fake-429",
    ),
    29: ChatExchange(
        "alice",
        "OpenCode",
        "opencode/0.15.8 ai/5.0.59 ai-sdk/provider-utils/3.0.10 runtime/bun/1.2.23",
        "fake-text",
        "Summarise the diff",
        stream_usage="not requested (the compressed request body was left as sent)",
    ),
    30: ChatExchange(
        None,
        "openai-python",
        "OpenAI/Python 1.109.1",
        None,
        None,
        status="rejected",
        http_status=401,
        streaming=None,
        stream_usage=None,
        error=f"unknown bridge token {CHAT_STRANGER_HINT}: ask your admin for a personal token",
    ),
}

# The token_usages row of each exchange of SCHEDULE that has one.
TOKENS_OF = {
    0: responses_tokens(24, 14),
    1: responses_tokens(2048, 14, read=1536, write=128),
    2: responses_tokens(96, 22),
    3: responses_tokens(140, 18),
    4: responses_tokens(48, 160, reasoning=96),
    5: responses_tokens(24, 14),
    6: responses_tokens(24, 16),
    7: responses_tokens(24, 0),
    **{11 + k: messages_tokens(1 + k, split_cache=k == 1) for k in range(8)},
    **{i: chat_tokens(x.usage) for i, x in CHAT.items() if x.usage is not None},
}
FIXED_COST = {
    0: COST["text"],
    1: COST["cached"],
    2: COST["tool_call"],
    3: COST["tool_result"],
    4: COST["reasoning"],
    12: COST["m_cached"],
    15: COST["m_thinking"],
    21: COST["c_tool_call"],
    22: COST["c_tool_result"],
    23: COST["c_reasoning"],
}
UNPRICED = {6, 7, 17, 18, 26, 27}  # models without a price
# Streams that reached the provider and left no usage row: curl's and the compressed body's
# (usage not requested), the 429's.
NO_USAGE_STREAMS = {
    i for i, x in CHAT.items() if x.streaming and x.usage is None and x.status != "rejected"
}
SIGNED_IN = {16}  # the Claude Pro/Max sign-in: paid by the plan


@dataclass(frozen=True, slots=True)
class UsageLog:
    db_path: Path
    ids: list[str]  # interception ids, in SCHEDULE order
    catalog_cost: float  # genai-prices' price of exchange 5
    price_version: str  # the override fingerprint of fake-reasoning
    list_costs: dict[int, float]  # genai-prices' price of exchanges 11, 13, 14 (and 25)


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


def replay_claude_code(
    base_url: str, name: str, credential: dict[str, str], edits: dict[str, str] | None = None
) -> bytes:
    """Send one captured Claude Code request (its body and headers) with this credential;
    returns the streamed answer."""
    captured = orjson.loads((CAPTURED / f"{name}.headers.json").read_bytes())
    headers = {k: v for k, v in captured.items() if k.lower() not in _NOT_REPLAYED}
    headers.pop("Authorization", None)
    body = (CAPTURED / f"{name}.request.json").read_bytes()
    for old, new in (edits or {}).items():
        body = body.replace(old.encode(), new.encode())
    response = httpx.post(
        f"{base_url}/v1/messages?beta=true",
        headers={**headers, **credential},
        content=body,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.content


def tool_use_id(sse: bytes) -> str:
    for line in sse.splitlines():
        if line.startswith(b"data: "):
            event = orjson.loads(line[6:])
            block = event.get("content_block") or {}
            if event.get("type") == "content_block_start" and block.get("type") == "tool_use":
                return str(block["id"])
    raise AssertionError("no tool_use in the answer")


def run_messages_exchanges(base_url: str) -> None:
    def say(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    alice = anthropic.Anthropic(base_url=base_url, api_key=TOKENS["alice"], max_retries=0)
    bob = anthropic.Anthropic(base_url=base_url, api_key=TOKENS["bob"], max_retries=0)

    with alice.messages.stream(
        model=CATALOG_CLAUDE, max_tokens=256, messages=say("Review this diff")
    ) as stream:
        stream.get_final_message()
    bob.messages.create(model="fake-cached", max_tokens=64, messages=say("Summarise the changelog"))
    # Claude Code runs "run echo hi": the model calls Bash, Claude Code sends the result back.
    bob_key = {"x-api-key": TOKENS["bob"]}
    call_id = tool_use_id(replay_claude_code(base_url, "tool_turn1", bob_key))
    replay_claude_code(base_url, "tool_turn2", bob_key, {CAPTURED_CALL_ID: call_id})
    with alice.messages.stream(
        model="fake-thinking",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=say("Is 1013 prime?"),
    ) as stream:
        stream.get_final_message()
    replay_claude_code(base_url, "say_hi", {"Authorization": f"Bearer {SIGN_IN_TOKEN}"})
    with bob.messages.stream(
        model="fake-max-tokens", max_tokens=16, messages=say("Write a long story")
    ) as stream:
        stream.get_final_message()
    alice.messages.create(model="fake-refusal", max_tokens=64, messages=say("Help me pick a lock"))
    with pytest.raises(anthropic.InternalServerError):
        bob.messages.create(model="fake-529", max_tokens=64, messages=say("Are you busy?"))
    stranger = anthropic.Anthropic(base_url=base_url, api_key="not-a-bridge-token", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(model="fake-text", max_tokens=8, messages=say("Let me in"))


def move_to_schedule(db_path: Path) -> list[str]:
    """Give every exchange its scheduled time; returns the interception ids in order."""
    conn = sqlite3.connect(db_path)
    try:
        ids = [r[0] for r in conn.execute("select id from interceptions order by started_at")]
        assert len(ids) == BRIDGED, ids
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


# The interceptions columns CHAT's rows fill, in the order of write_chat_completions' values.
INTERCEPTION_COLUMNS = (
    "id",
    "flow_id",
    "started_at",
    "ended_at",
    "initiator_id",
    "provider",
    "provider_name",
    "api",
    "model",
    "response_model",
    "streaming",
    "client",
    "user_agent",
    "client_session_id",
    "correlating_tool_call_id",
    "previous_response_id",
    "credential_kind",
    "credential_hint",
    "http_status",
    "status",
    "error",
    "response_id",
    "malformed_events",
    "metadata",
    "total_tokens",
)


def write_chat_completions(db_path: Path) -> list[str]:
    """CHAT's rows, as the bridge's recorder writes them; returns their interception ids."""
    conn = sqlite3.connect(db_path)
    ids: list[str] = []
    try:
        with conn:
            (last_prompt,) = conn.execute(LAST_PROMPT_ID).fetchone()
            for i, x in CHAT.items():
                iid = f"c0ffee{i:026x}"
                ids.append(iid)
                ptype, pname = x.provider
                answered = x.status not in ("rejected", "upstream_error")
                rid = f"chatcmpl-{i:024x}" if answered else None
                metadata: dict[str, Any] = {"request_bytes": 300 + i}
                if x.stream_usage is not None:
                    metadata["stream_usage"] = x.stream_usage
                signed = x.user is not None
                conn.execute(
                    f"insert into interceptions ({', '.join(INTERCEPTION_COLUMNS)}) "
                    f"values ({', '.join('?' * len(INTERCEPTION_COLUMNS))})",
                    (
                        iid,
                        f"f10w{i:028x}",
                        started(i),
                        ended(i),
                        x.user,
                        ptype,
                        pname,
                        "chat_completions",
                        x.model,
                        (x.response_model or x.model) if answered else None,
                        None if x.streaming is None else int(x.streaming),
                        x.client,
                        x.user_agent,
                        x.session,
                        x.correlating_tool_call_id,
                        None,
                        "centralized" if signed else None,
                        "sk-t...cdef" if signed else CHAT_STRANGER_HINT,
                        x.http_status,
                        x.status,
                        x.error,
                        rid,
                        0,
                        orjson.dumps(metadata).decode(),
                        # The usage sum the bridge keeps (m007); the cost backfill adds the cost.
                        None if x.usage is None else TOKENS_OF[i].total,
                    ),
                )
                children: list[tuple[str, dict[str, Any]]] = []
                if x.prompt is not None:
                    children.append(("user_prompts", {"prompt": x.prompt}))
                if x.usage is not None:
                    t = TOKENS_OF[i]
                    usage_row = {
                        "input_tokens": t.input,
                        "cache_read_input_tokens": t.cache_read,
                        "cache_write_input_tokens": t.cache_write,
                        "uncached_input_tokens": t.uncached,
                        "output_tokens": t.output,
                        "reasoning_tokens": t.reasoning,
                        "total_tokens": t.total,
                        "usage": orjson.dumps(x.usage).decode(),
                        "service_tier": x.service_tier,
                    }
                    children.append(("token_usages", usage_row))
                for call_id, tool, args in x.tools:
                    tool_row = {
                        "call_id": call_id,
                        "tool": tool,
                        "type": "function",
                        "args": orjson.dumps(args).decode(),
                        "injected": 0,
                        "server_url": None,
                        "invocation_error": None,
                    }
                    children.append(("tool_usages", tool_row))
                for text in x.thoughts:
                    children.append(("model_thoughts", {"source": "reasoning", "content": text}))
                for table, row in children:
                    row = {
                        "interception_id": iid,
                        "response_id": rid,
                        **row,
                        "created_at": ended(i),
                    }
                    names = ", ".join(row)
                    marks = ", ".join("?" * len(row))
                    conn.execute(
                        f"insert into {table} ({names}) values ({marks})", tuple(row.values())
                    )
            # The prompts' search index, as the recorder keeps it.
            conn.execute(INDEX_NEW_PROMPTS, (last_prompt,))
        return ids
    finally:
        conn.close()


def list_price(model: str, provider: str, tokens: Tokens, at: str) -> float:
    """genai-prices' own price of one usage (all cache writes 5-minute)."""
    price = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=tokens.input,
            cache_read_tokens=tokens.cache_read or 0,
            cache_write_tokens=tokens.cache_write or 0,
            output_tokens=tokens.output,
        ),
        model,
        provider_id=provider,
        genai_request_timestamp=datetime.fromisoformat(at),
    )
    return float(price.total_price)


def build_usage_log(workdir: Path, *, chat_completions: bool = False) -> UsageLog:
    """The bridge's log of SCHEDULE, with costs: shared with the screenshot test, whose
    pictures show the first two APIs (CHAT's rows only with `chat_completions`)."""
    config = bridge_config("http://placeholder", pricing=PRICING)
    with FakeUpstream() as upstream:
        config["providers"][0]["base_url"] = f"{upstream.url}/v1"
        config["providers"].append(
            {
                "name": "anthropic",
                "type": "anthropic",
                "base_url": f"{upstream.url}/v1",
                "api_key": "${TEST_PROVIDER_KEY}",
                "subscription": True,  # Claude Pro/Max sign-ins go upstream as they are
            }
        )
        with Mitmdump(workdir, config) as bridge:
            run_exchanges(f"{bridge.url}/openai/v1")
            run_messages_exchanges(f"{bridge.url}/anthropic")
        assert upstream.messages_calls == 9
    # Leaving the with-block stopped the bridge cleanly, so every row is written.
    ids = move_to_schedule(bridge.db_path)
    if chat_completions:
        ids += write_chat_completions(bridge.db_path)
    loaded = load_config(bridge.config_path, {"TEST_PROVIDER_KEY": "unused-here"})
    report = cost.backfill(bridge.db_path, cost.PriceBook(loaded.pricing), recompute=True)
    # The sign-in's row is left alone; fake-incomplete, fake-failed, fake-max-tokens and
    # fake-refusal have no price (nor fake-incomplete and fake-filter on Chat Completions).
    assert (report.examined, report.unpriced) == ((21, 6) if chat_completions else (15, 4))
    catalog = list_price(CATALOG_MODEL, "openai", TOKENS_OF[5], ended(5))
    list_costs = {
        i: list_price(model, "anthropic", TOKENS_OF[i], ended(i))
        for i, model in ((11, CATALOG_CLAUDE), (13, CLAUDE_CODE_MODEL), (14, CLAUDE_CODE_MODEL))
    }
    if chat_completions:
        list_costs[25] = list_price(CHAT_CATALOG_MODEL, "openai", TOKENS_OF[25], ended(25))
    reasoning = next(o for o in loaded.pricing.overrides if o.model == "fake-reasoning")
    return UsageLog(bridge.db_path, ids, catalog, cost.override_fingerprint(reasoning), list_costs)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> UsageLog:
    return build_usage_log(tmp_path_factory.mktemp("usage-log"), chat_completions=True)


@pytest.fixture(scope="module")
def datasette(log: UsageLog) -> Iterator[Datasette]:
    # The plugin is found through its entry point: no -m.
    with Datasette(log.db_path) as ds:
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


def cost_of(log: UsageLog, i: int) -> float | None:
    if i in FIXED_COST:
        return FIXED_COST[i]
    if i == 5:
        return log.catalog_cost
    return log.list_costs.get(i)


def shown_cost(log: UsageLog, *ix: int) -> float | None:
    """What a query shows as the estimated cost of these exchanges: None when none is priced."""
    priced = [c for i in ix if (c := cost_of(log, i)) is not None]
    return r6(*priced) if priced else None


_TOKEN_COLUMNS = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_write_input_tokens",
    "uncached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)
# Query column -> Tokens field, for the columns that are plain sums.
_SUMMED = {
    "input_tokens": "input",
    "uncached_input_tokens": "uncached",
    "cache_read_input_tokens": "cache_read",
    "cached_input_tokens": "cache_read",
    "cache_write_input_tokens": "cache_write",
    "output_tokens": "output",
    "total_tokens": "total",
}


def sums(ix: list[int], *columns: str, no_reasoning: int | None = 0) -> dict[str, int | None]:
    """The token columns a query sums over these exchanges; reasoning_tokens is no_reasoning
    when none of them reported any (Messages)."""
    rows = [TOKENS_OF[i] for i in ix if i in TOKENS_OF]
    out: dict[str, int | None] = {}
    for column in columns:
        if column == "reasoning_tokens":
            known = [r.reasoning for r in rows if r.reasoning is not None]
            out[column] = sum(known) if known else no_reasoning
        else:
            out[column] = sum(getattr(r, _SUMMED[column]) or 0 for r in rows)
    return out


def billing(log: UsageLog, ix: list[int]) -> dict[str, Any]:
    return {
        "estimated_cost_usd": shown_cost(log, *ix),
        "unpriced_responses": len(UNPRICED.intersection(ix)),
        "subscription_responses": len(SIGNED_IN.intersection(ix)),
    }


PER_USER = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)


# ---------------------------------------------------------------------------------- tests


def test_every_canned_query_is_tested() -> None:
    database = yaml.safe_load(METADATA.read_text())["database"]
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert {*database["queries"], *database["link_queries"]} <= tested


def test_the_log_holds_what_the_fakes_sent(log: UsageLog) -> None:
    """The ground the query tests stand on: each exchange's usage row, its cost, the API."""
    conn = sqlite3.connect(f"file:{log.db_path}?mode=ro", uri=True)
    try:
        for i, iid in enumerate(log.ids):
            (api,) = conn.execute("select api from interceptions where id = ?", (iid,)).fetchone()
            assert api == api_of(i), i
            rows = conn.execute(
                "select input_tokens, cache_read_input_tokens, cache_write_input_tokens, "
                "uncached_input_tokens, output_tokens, reasoning_tokens, total_tokens, usage, "
                "estimated_cost_usd from token_usages where interception_id = ?",
                (iid,),
            ).fetchall()
            if i not in TOKENS_OF:
                assert rows == [], i
                continue
            ((inp, read, write, uncached, out, reasoning, total, raw, estimate),) = rows
            want = TOKENS_OF[i]
            assert (inp, read, write, uncached, out, reasoning, total) == (
                want.input,
                want.cache_read,
                want.cache_write,
                want.uncached,
                want.output,
                want.reasoning,
                want.total,
            ), i
            usage = orjson.loads(raw)
            if i in CHAT:
                # OpenTelemetry's reading of Chat Completions' usage, from the raw JSON kept.
                details = usage.get("prompt_tokens_details") or {}
                out_details = usage.get("completion_tokens_details") or {}
                assert (inp, read, out, reasoning, total) == (
                    usage["prompt_tokens"],
                    details.get("cached_tokens"),
                    usage["completion_tokens"],
                    out_details.get("reasoning_tokens"),
                    usage["total_tokens"],
                ), i
                assert write is None and uncached == inp - (read or 0), i
            split = usage.get("cache_creation")
            if want.write_1h is None:
                assert split is None, i
            else:
                assert split == {
                    "ephemeral_5m_input_tokens": want.write_5m,
                    "ephemeral_1h_input_tokens": want.write_1h,
                }, i
            assert estimate == cost_of(log, i), i
        # The sign-in's token is only ever a hint.
        dump = "\n".join(conn.iterdump())
        assert SIGN_IN_TOKEN not in dump and SIGN_IN_USER in dump
    finally:
        conn.close()
    assert len(log.ids) == len(SCHEDULE)
    if importlib.util.find_spec("aibridge.apis.openai_chat") is not None:
        from aibridge.apis.openai_chat import token_usage_row

        for i, x in CHAT.items():
            if x.usage is not None:
                row = token_usage_row(x.usage)
                t = TOKENS_OF[i]
                assert [row[c] for c in _TOKEN_COLUMNS] == [
                    t.input,
                    t.cache_read,
                    t.cache_write,
                    t.uncached,
                    t.output,
                    t.reasoning,
                    t.total,
                ], i
    # Anthropic's usage scheme, spelled out once: n=2 (fake-cached) and n=1.
    assert TOKENS_OF[12] == Tokens(22206, 20003, 2002, 19, None, 800)
    assert (TOKENS_OF[11].uncached, TOKENS_OF[11].total) == (101, 11118)


def test_usage_per_user_per_day(datasette: Datasette, log: UsageLog) -> None:
    def row(day: str, user: str, ix: list[int]) -> dict[str, Any]:
        return {
            "day": day,
            "user": user,
            "requests": len(ix),
            **sums(ix, *PER_USER),
            **billing(log, ix),
        }

    rows = canned(datasette, "usage_per_user_per_day")
    assert rows == [
        row("2025-06-02", "(unauthenticated)", [10, 20, 30]),
        row("2025-06-02", "alice", [7, 9, 18, 25, 26, 29]),
        row("2025-06-02", "bob", [6, 8, 17, 19, 27, 28]),
        row("2025-06-02", SIGN_IN_USER, [16]),
        row("2025-06-01", "alice", [2, 3, 5, 15]),
        row("2025-06-01", "bob", [4, 13, 14, 23, 24]),
        row("2025-05-31", "alice", [0, 11, 21, 22]),
        row("2025-05-31", "bob", [1, 12]),
    ]
    # By hand: bob's Responses fake-cached and Messages fake-cached on 2025-05-31.
    assert {k: rows[-1][k] for k in PER_USER} == {
        "input_tokens": 2048 + 22206,
        "cached_input_tokens": 1536 + 20003,
        "cache_write_input_tokens": 128 + 2002,
        "output_tokens": 14 + 19,
        "reasoning_tokens": 0,
        "total_tokens": 2062 + 22225,
    }
    assert rows[-1]["estimated_cost_usd"] == 0.006133  # 0.0007536 + 0.0053798
    # The sign-in's tokens count, its cost is the plan's; the stranger used nothing.
    assert (rows[3]["total_tokens"], rows[3]["estimated_cost_usd"]) == (66653, None)
    assert rows[0]["total_tokens"] == 0
    # Bob's reasoning on 2025-06-01: Responses' 96 and Zed's 100 on Chat Completions; curl's
    # stream without usage counts as a request, with no tokens.
    assert (rows[5]["requests"], rows[5]["reasoning_tokens"]) == (5, 196)
    # Alice on 2025-05-31: Messages' 10003 cached and 2176 of OpenCode's 2500 prompt tokens.
    assert rows[6]["cached_input_tokens"] == 10003 + 1024 + 1152
    assert rows[6]["input_tokens"] == 24 + 11106 + 1200 + 1300


def test_usage_per_api_per_day(datasette: Datasette, log: UsageLog) -> None:
    columns = (
        "input_tokens",
        "uncached_input_tokens",
        "cache_read_input_tokens",
        "cache_write_input_tokens",
        "output_tokens",
        "reasoning_tokens",
        "total_tokens",
    )

    def row(
        day: str, api: str, client: str, ix: list[int], users: int, not_completed: int
    ) -> dict[str, Any]:
        assert {api_of(i) for i in ix} == {api}
        (provider,) = {provider_of(i) for i in ix}
        return {
            "day": day,
            "api": api,
            "provider": provider,
            "client": client,
            "requests": len(ix),
            "users": users,
            "not_completed": not_completed,
            "streams_without_usage": len(NO_USAGE_STREAMS.intersection(ix)),
            **sums(ix, *columns, no_reasoning=None),
            **billing(log, ix),
        }

    chat = "chat_completions"
    rows = canned(datasette, "usage_per_api_per_day")
    assert rows == [
        row("2025-06-02", chat, "Cursor", [28], 1, 1),  # 429
        row("2025-06-02", chat, "GitHub Copilot", [25], 1, 0),
        # A length stop; a compressed body whose stream could not be given usage.
        row("2025-06-02", chat, "OpenCode", [26, 29], 1, 1),
        row("2025-06-02", chat, "openai-python", [30], 0, 1),  # the stranger
        row("2025-06-02", chat, "Open WebUI", [27], 1, 0),  # openai_compatible, after openai
        row("2025-06-02", "messages", "Claude Code", [16], 1, 0),
        # max_tokens, 529 and the stranger did not complete; the refusal did.
        row("2025-06-02", "messages", "anthropic-python", [17, 18, 19, 20], 2, 3),
        row("2025-06-02", "responses", "openai-python", [6, 7, 8, 9, 10], 2, 5),
        row("2025-06-01", chat, "curl", [24], 1, 0),
        row("2025-06-01", chat, "Zed", [23], 1, 0),
        row("2025-06-01", "messages", "Claude Code", [13, 14], 1, 0),
        row("2025-06-01", "messages", "anthropic-python", [15], 1, 0),
        row("2025-06-01", "responses", "openai-python", [2, 3, 4, 5], 2, 0),
        row("2025-05-31", chat, "OpenCode", [21, 22], 1, 0),
        row("2025-05-31", "messages", "anthropic-python", [11, 12], 2, 0),
        row("2025-05-31", "responses", "openai-python", [0, 1], 2, 0),
    ]
    by_key = {(r["day"], r["api"], r["client"]): r for r in rows}
    # OpenCode's tool round trip by hand: prompt tokens include the cached ones.
    opencode = by_key[("2025-05-31", chat, "OpenCode")]
    assert [opencode[c] for c in columns] == [2500, 324, 2176, 0, 100, 0, 2600]
    # Zed's host reports no cache: none read; 100 of its 150 output tokens were reasoning.
    zed = by_key[("2025-06-01", chat, "Zed")]
    assert (zed["cache_read_input_tokens"], zed["reasoning_tokens"]) == (0, 100)
    # curl's stream asked for no usage: a request with no tokens, counted as such.
    curl = by_key[("2025-06-01", chat, "curl")]
    assert (curl["total_tokens"], curl["streams_without_usage"]) == (0, 1)
    assert curl["reasoning_tokens"] is None and curl["estimated_cost_usd"] is None
    # Claude Code's two turns by hand: Anthropic's own input (301 + 401) is the uncached part.
    claude_code = by_key[("2025-06-01", "messages", "Claude Code")]
    assert (claude_code["uncached_input_tokens"], claude_code["input_tokens"]) == (702, 77712)
    assert claude_code["reasoning_tokens"] is None  # thinking is in output_tokens
    assert claude_code["estimated_cost_usd"] == r6(log.list_costs[13], log.list_costs[14])
    assert by_key[("2025-06-01", "responses", "openai-python")]["reasoning_tokens"] == 96
    assert sum(r["streams_without_usage"] for r in rows) == 3


def test_usage_per_model(datasette: Datasette, log: UsageLog) -> None:
    columns = (
        "input_tokens",
        "cached_input_tokens",
        "cache_write_input_tokens",
        "output_tokens",
        "reasoning_tokens",
        "total_tokens",
    )

    def row(
        api: str, model: str, reported: str | None, ix: list[int], users: int, nc: int
    ) -> dict[str, Any]:
        return {
            "api": api,
            "model": model,
            "reported_as": reported,
            "requests": len(ix),
            "users": users,
            "not_completed": nc,
            **sums(ix, *columns, no_reasoning=None),
            **billing(log, ix),
        }

    want = [
        # Claude Code on the bridge's key and on a sign-in: only the first is priced.
        row("messages", CLAUDE_CODE_MODEL, CLAUDE_CODE_MODEL, [13, 14, 16], 2, 0),
        row("messages", "fake-thinking", "fake-thinking", [15], 1, 0),
        row("messages", CATALOG_CLAUDE, CATALOG_CLAUDE, [11], 1, 0),
        # The same override name on both APIs: one row per API.
        row("messages", "fake-cached", "fake-cached", [12], 1, 0),
        row("responses", "fake-cached", "fake-cached", [1], 1, 0),
        row("responses", "fake-reasoning", "fake-reasoning", [4], 1, 0),
        row("responses", "fake-tool", "fake-tool", [2, 3], 1, 0),
        # The background request was refused before upstream: counted, but it used nothing.
        row("responses", "fake-text", "fake-text", [0, 9], 1, 1),
        row("responses", CATALOG_MODEL, CATALOG_MODEL, [5], 1, 0),
        row("messages", "fake-refusal", "fake-refusal", [18], 1, 0),
        row("messages", "fake-max-tokens", "fake-max-tokens", [17], 1, 1),
        row("responses", "fake-incomplete", "fake-incomplete", [6], 1, 1),
        row("responses", "fake-failed", "fake-failed", [7], 1, 1),
        # Refused for an unknown token: the body was never read, so no model is known.
        row("messages", "(none)", None, [20], 0, 1),
        row("responses", "(none)", None, [10], 0, 1),
        row("responses", "fake-429", None, [8], 1, 1),
        row("messages", "fake-529", None, [19], 1, 1),
        # Chat Completions: the tool round trip, a host's reasoning, a catalogue model that
        # answered under its dated name, streams without usage (counted, no tokens), failures.
        row("chat_completions", "fake-tool", "fake-tool", [21, 22], 1, 0),
        row("chat_completions", "fake-reasoning", "fake-reasoning", [23], 1, 0),
        row("chat_completions", "gpt-4.1-mini", CHAT_CATALOG_MODEL, [25], 1, 0),
        row("chat_completions", "fake-text", "fake-text", [24, 29], 2, 0),
        row("chat_completions", "fake-incomplete", "fake-incomplete", [26], 1, 1),
        row("chat_completions", "fake-filter", "fake-filter", [27], 1, 0),
        row("chat_completions", "fake-429", None, [28], 1, 1),
        row("chat_completions", "(none)", None, [30], 0, 1),
    ]
    # Most expensive first, then the most tokens: list prices decide where the real models are.
    want.sort(
        key=lambda r: (
            r["estimated_cost_usd"] is None,
            -(r["estimated_cost_usd"] or 0),
            -r["total_tokens"],
            r["model"],
            r["api"],
        )
    )
    rows = canned(datasette, "usage_per_model")
    assert rows == want
    by_key = {(r["api"], r["model"]): r for r in rows}
    assert by_key[("messages", "fake-cached")]["estimated_cost_usd"] == 0.00538  # 0.0053798
    assert by_key[("messages", CLAUDE_CODE_MODEL)]["subscription_responses"] == 1
    assert by_key[("responses", "fake-reasoning")]["reasoning_tokens"] == 96
    assert by_key[("chat_completions", "fake-reasoning")]["reasoning_tokens"] == 100
    catalog = by_key[("chat_completions", "gpt-4.1-mini")]
    assert (catalog["cached_input_tokens"], catalog["estimated_cost_usd"]) == (
        1536,
        r6(log.list_costs[25]),
    )
    assert by_key[("chat_completions", "fake-filter")]["reasoning_tokens"] is None


def test_top_tools(datasette: Datasette, log: UsageLog) -> None:
    def row(tool: str, kind: str, i: int) -> dict[str, Any]:
        return {
            "tool": tool,
            "type": kind,
            "calls": 1,
            "users": 1,
            "sessions": 1,
            "errors": 0,
            "first_called": ended(i),
            "last_called": ended(i),
        }

    assert canned(datasette, "top_tools") == [
        row("Bash", "tool_use", 13),  # Claude Code's, on the Messages API
        row("get_weather", "function_call", 2),
        row("read", "function", 21),  # OpenCode's, on Chat Completions
    ]


def test_prompts_of_user(datasette: Datasette, log: UsageLog) -> None:
    def row(i: int, model: str, session: str | None, status: str, prompt: str) -> dict:
        return {
            "at": ended(i),
            "api": api_of(i),
            "model": model,
            "client": client_of(i),
            "session": session,
            "status": status,
            "prompt": prompt,
            "interception_id": log.ids[i],
        }

    assert canned(datasette, "prompts_of_user", user="alice") == [
        row(18, "fake-refusal", None, "completed", "Help me pick a lock"),
        row(29, "fake-text", None, "completed", "Summarise the diff"),
        row(9, "fake-text", None, "rejected", "Later, please"),
        row(26, "fake-incomplete", None, "incomplete", "Write the migration guide"),
        row(7, "fake-failed", None, "failed", "Please fail"),
        row(25, CHAT_CATALOG_MODEL, None, "completed", "Explain this function"),
        row(15, "fake-thinking", None, "completed", "Is 1013 prime?"),
        row(5, CATALOG_MODEL, None, "completed", "Name three primes"),
        row(2, "fake-tool", "sess-alice", "completed", "What's the weather in Paris?"),
        # OpenCode's tool round trip: only the first turn is something alice typed.
        row(21, "fake-tool", OPENCODE_SESSION, "completed", "Add a test for the parser"),
        row(11, CATALOG_CLAUDE, None, "completed", "Review this diff"),
        row(0, "fake-text", None, "completed", "Draft the release notes"),
    ]
    # Claude Code's prompt is what bob typed, not the system-reminder blocks before it.
    assert [
        (r["prompt"], r["client"]) for r in canned(datasette, "prompts_of_user", user="bob")
    ] == [
        ("Are you busy?", "anthropic-python"),
        ("Write a long story", "anthropic-python"),
        ("Refactor the router", "Cursor"),
        ("Describe the incident", "Open WebUI"),
        ("Too many at once", "openai-python"),
        ("Write a long essay", "openai-python"),
        ("Tell me a joke", "curl"),
        ("run echo hi", "Claude Code"),
        ("Is 1013 prime? Think first.", "openai-python"),
        ("Is 1013 prime? Think first.", "Zed"),
        ("Summarise the changelog", "anthropic-python"),
        ("Summarise the style guide", "openai-python"),
    ]
    signed_in = canned(datasette, "prompts_of_user", user=SIGN_IN_USER)
    assert [(r["prompt"], r["session"], r["api"]) for r in signed_in] == [
        ("say hi", SIGN_IN_SESSION, "messages")
    ]
    assert canned(datasette, "prompts_of_user", user="nobody") == []


def test_usage_of_user(datasette: Datasette, log: UsageLog) -> None:
    def row(
        day: str, api: str, model: str, clients: str, ix: list[int], **counts: int
    ) -> dict[str, Any]:
        return {
            "day": day,
            "api": api,
            "model": model,
            "clients": clients,
            "requests": len(ix),
            "not_completed": counts.get("not_completed", 0),
            "sessions": counts.get("sessions", 0),
            **sums(ix, "input_tokens", "cached_input_tokens", "output_tokens", "total_tokens"),
            **billing(log, ix),
        }

    # Newest day first, then the dearest: unpriced ones last, by API and requested model.
    assert canned(datasette, "usage_of_user", user="alice") == [
        row("2025-06-02", "chat_completions", CHAT[25].model, "GitHub Copilot", [25]),
        row("2025-06-02", "chat_completions", "fake-incomplete", "OpenCode", [26], not_completed=1),
        # The compressed body's stream: a request without tokens.
        row("2025-06-02", "chat_completions", "fake-text", "OpenCode", [29]),
        row("2025-06-02", "messages", "fake-refusal", "anthropic-python", [18]),
        row("2025-06-02", "responses", "fake-failed", "openai-python", [7], not_completed=1),
        row("2025-06-02", "responses", "fake-text", "openai-python", [9], not_completed=1),
        row("2025-06-01", "messages", "fake-thinking", "anthropic-python", [15]),
        row("2025-06-01", "responses", "fake-tool", "openai-python", [2, 3], sessions=1),
        row("2025-06-01", "responses", CATALOG_MODEL, "openai-python", [5]),
        row("2025-05-31", "messages", CATALOG_CLAUDE, "anthropic-python", [11]),
        row("2025-05-31", "chat_completions", "fake-tool", "OpenCode", [21, 22], sessions=1),
        row("2025-05-31", "responses", "fake-text", "openai-python", [0]),
    ]
    # A sign-in's tokens count, its cost is the plan's.
    assert canned(datasette, "usage_of_user", user=SIGN_IN_USER) == [
        row("2025-06-02", "messages", CLAUDE_CODE_MODEL, "Claude Code", [16], sessions=1)
    ]
    bob = canned(datasette, "usage_of_user", user="bob")
    of_bob = [1, 4, 6, 8, 12, 13, 14, 17, 19, 23, 24, 27, 28]
    assert sum(r["requests"] for r in bob) == len(of_bob)
    assert sum(r["total_tokens"] for r in bob) == sums(of_bob, "total_tokens")["total_tokens"]
    for nobody in ("nobody", "", "' or 1=1 --", "(unauthenticated)", "ALICE"):
        assert canned(datasette, "usage_of_user", user=nobody) == [], nobody


def test_tool_call_result(datasette: Datasette, log: UsageLog) -> None:
    calls = httpx.get(
        f"{datasette.url}/{DB_NAME}/tool_usages.json",
        params={"_shape": "array", "_size": "max"},
        timeout=30,
    ).json()
    call_of = {r["interception_id"]: r["call_id"] for r in calls}

    def answer(i: int, user: str, session: str, model: str, cost: float) -> dict[str, Any]:
        return {
            "at": started(i),
            "user": user,
            "session": session,
            "model": model,
            "status": "completed",
            "tools_called_next": None,
            "total_tokens": TOKENS_OF[i].total,
            "estimated_cost_usd": r6(cost),
            "interception_id": log.ids[i],
        }

    # A tool call on each API, and the turn that sent its result back.
    for call, answered in (
        (2, answer(3, "alice", "sess-alice", "fake-tool", COST["tool_result"])),
        (13, answer(14, "bob", CC_SESSION, CLAUDE_CODE_MODEL, log.list_costs[14])),
        (21, answer(22, "alice", OPENCODE_SESSION, "fake-tool", COST["c_tool_result"])),
    ):
        assert canned(datasette, "tool_call_result", call_id=call_of[log.ids[call]]) == [answered]
    for unknown in ("call_never_answered", "", "' or 1=1 --", CAPTURED_CALL_ID):
        assert canned(datasette, "tool_call_result", call_id=unknown) == [], unknown


def story(ds: Datasette, log: UsageLog, i: int) -> list[tuple[str, str]]:
    return [
        (r["what"], r["detail"])
        for r in canned(ds, "interception_story", interception_id=log.ids[i])
    ]


def test_interception_story(datasette: Datasette, log: UsageLog) -> None:
    rows = canned(datasette, "interception_story", interception_id=log.ids[4])
    assert [(r["at"], r["what"]) for r in rows] == [
        (started(4), "request"),
        (ended(4), "prompt"),
        (ended(4), "thought: reasoning_summary"),
        (ended(4), "thought: reasoning_summary"),
        (ended(4), "thought: commentary"),
        (ended(4), "tokens"),
        (ended(4), "end"),
    ]
    details = [r["detail"] for r in rows]
    assert details[0] == (
        "bob via openai-python asked fake-reasoning on openai (responses), streamed, "
        "session sess-bob"
    )
    assert details[1] == "Is 1013 prime? Think first."
    assert details[2].startswith("**Planning the answer**")
    assert details[3].startswith("**Double-checking**")
    assert details[4] == "Let me check this quickly before answering."
    assert details[5] == (
        "input 48 (uncached 48, cache read 0, cache write 0), output 160 (reasoning 96), "
        f"total 208, estimated $0.001488 (config {log.price_version}, priced as fake-reasoning)"
    )
    assert details[6] == "completed, HTTP 200, answered by fake-reasoning"

    # The tool round trip: the call in one request, its result carried back by the next.
    call = story(datasette, log, 2)
    assert [what for what, _ in call] == [
        "request",
        "prompt",
        "tool call: function_call",
        "tokens",
        "end",
    ]
    assert call[2][1].startswith("get_weather({")
    assert "estimated $0.000206 (config sha256:" in call[3][1]
    (tool,) = httpx.get(
        f"{datasette.url}/{DB_NAME}/tool_usages.json",
        params={"interception_id": log.ids[2], "_shape": "array"},
        timeout=30,
    ).json()
    result = story(datasette, log, 3)
    assert [what for what, _ in result] == ["request", "tokens", "end"]
    assert result[0][1].endswith(f"returning the result of tool call {tool['call_id']}")

    refused = story(datasette, log, 10)
    assert [(what, detail.split(":")[0]) for what, detail in refused] == [
        ("request", "(unauthenticated) via openai-python asked no model on openai (responses)"),
        ("end", "rejected, HTTP 401"),
    ]
    assert canned(datasette, "interception_story", interception_id="no-such-id") == []


def test_interception_story_of_messages(datasette: Datasette, log: UsageLog) -> None:
    # Claude Code's tool turn and the turn that carries the result back.
    turn = story(datasette, log, 13)
    assert turn == [
        (
            "request",
            f"bob via Claude Code asked {CLAUDE_CODE_MODEL} on anthropic (messages), streamed, "
            f"session {CC_SESSION}",
        ),
        ("prompt", "run echo hi"),
        ("tool call: tool_use", 'Bash({"command":"echo hi","description":"Run the command"})'),
        (
            "tokens",
            "input 33306 (uncached 301, cache read 30003, cache write 3002: 3002 for 5 minutes, "
            f"0 for 1 hour), output 26, total 33332, estimated ${log.list_costs[13]:.6f} "
            f"(genai-prices {genai_prices.__version__}, priced as {CLAUDE_CODE_MODEL})",
        ),
        ("end", f"completed, HTTP 200, answered by {CLAUDE_CODE_MODEL}"),
    ]
    conn = sqlite3.connect(f"file:{log.db_path}?mode=ro", uri=True)
    try:
        ((call_id,),) = conn.execute(
            "select call_id from tool_usages where interception_id = ?", (log.ids[13],)
        ).fetchall()
    finally:
        conn.close()
    assert call_id.startswith("toolu_")
    result = story(datasette, log, 14)
    assert [what for what, _ in result] == ["request", "tokens", "end"]
    assert result[0][1].endswith(f", returning the result of tool call {call_id}")

    # 5-minute and 1-hour cache writes, from the raw usage; no reasoning split on Messages.
    cached = dict(story(datasette, log, 12))
    assert cached["tokens"].startswith(
        "input 22206 (uncached 201, cache read 20003, cache write 2002: 1202 for 5 minutes, "
        "800 for 1 hour), output 19, total 22225, estimated $0.005380 (config sha256:"
    )
    thinking = story(datasette, log, 15)
    assert ("thought: thinking", THINKING) in thinking
    assert "reasoning" not in dict(thinking)["tokens"]

    signed_in = dict(story(datasette, log, 16))
    assert signed_in["request"] == (
        f"{SIGN_IN_USER} via Claude Code asked {CLAUDE_CODE_MODEL} on anthropic (messages), "
        f"streamed, session {SIGN_IN_SESSION}, on their Claude subscription sign-in"
    )
    assert signed_in["tokens"].endswith(", total 66653, not priced: paid by the subscription")

    assert dict(story(datasette, log, 17))["end"] == (
        "incomplete, HTTP 200, answered by fake-max-tokens: max_tokens"
    )
    assert dict(story(datasette, log, 17))["tokens"].endswith(", no price known")
    assert dict(story(datasette, log, 18))["end"] == (
        "completed, HTTP 200, answered by fake-refusal: refusal"
    )
    assert story(datasette, log, 19) == [
        ("request", "bob via anthropic-python asked fake-529 on anthropic (messages)"),
        ("prompt", "Are you busy?"),
        ("end", "upstream_error, HTTP 529: upstream answered HTTP 529: Overloaded"),
    ]
    refused = story(datasette, log, 20)
    assert [(what, detail.split(":")[0]) for what, detail in refused] == [
        (
            "request",
            "(unauthenticated) via anthropic-python asked no model on anthropic (messages)",
        ),
        ("end", "rejected, HTTP 401"),
    ]


def test_interception_story_of_chat_completions(datasette: Datasette, log: UsageLog) -> None:
    conn = sqlite3.connect(f"file:{log.db_path}?mode=ro", uri=True)
    try:
        versions = dict(
            conn.execute(
                "select interception_id, price_version from token_usages where interception_id "
                "in (?, ?)",
                (log.ids[21], log.ids[23]),
            ).fetchall()
        )
    finally:
        conn.close()
    # OpenCode's tool call: the bridge added usage to the stream; cache reads as OpenAI
    # reports them, no cache writes (OpenAI reports none on Chat Completions).
    assert story(datasette, log, 21) == [
        (
            "request",
            "alice via OpenCode asked fake-tool on openai (chat_completions), streamed, "
            f"session {OPENCODE_SESSION}, stream usage added by the bridge",
        ),
        ("prompt", "Add a test for the parser"),
        ("tool call: function", 'read({"filePath":"tests/test_parser.py"})'),
        (
            "tokens",
            "input 1200 (uncached 176, cache read 1024), output 40 (reasoning 0), total 1240, "
            f"estimated $0.001400 (config {versions[log.ids[21]]}, priced as fake-tool*)",
        ),
        ("end", "completed, HTTP 200, answered by fake-tool"),
    ]
    result = dict(story(datasette, log, 22))
    assert result["request"].endswith(
        f", returning the result of tool call {OPENCODE_CALL_ID}, "
        "stream usage requested by the client"
    )
    assert "prompt" not in result
    # A host's reasoning text is a thought; it reports no cache, so none is shown.
    zed = story(datasette, log, 23)
    assert zed == [
        (
            "request",
            "bob via Zed asked fake-reasoning on openrouter (chat_completions), streamed, "
            "stream usage requested by the client",
        ),
        ("prompt", "Is 1013 prime? Think first."),
        ("thought: reasoning", REASONING_TEXT),
        (
            "tokens",
            "input 64 (uncached 64), output 150 (reasoning 100), total 214, estimated "
            f"$0.001392 (config {versions[log.ids[23]]}, priced as fake-reasoning)",
        ),
        ("end", "completed, HTTP 200, answered by fake-reasoning"),
    ]
    # Streams whose usage was not requested say why they have no tokens.
    assert story(datasette, log, 24) == [
        (
            "request",
            "bob via curl asked fake-text on openai (chat_completions), streamed, "
            "stream usage not requested",
        ),
        ("prompt", "Tell me a joke"),
        ("tokens", "none recorded: stream usage not requested"),
        ("end", "completed, HTTP 200, answered by fake-text"),
    ]
    assert dict(story(datasette, log, 29))["tokens"] == (
        "none recorded: stream usage not requested (the compressed request body was left as sent)"
    )
    copilot = dict(story(datasette, log, 25))
    assert copilot["request"] == (
        "alice via GitHub Copilot asked gpt-4.1-mini on openai (chat_completions)"
    )
    assert copilot["tokens"] == (
        "input 2048 (uncached 512, cache read 1536), output 30 (reasoning 0), total 2078, "
        f"estimated ${log.list_costs[25]:.6f} (genai-prices {genai_prices.__version__}, "
        "priced as gpt-4.1-mini)"
    )
    webui = dict(story(datasette, log, 27))
    assert webui["request"].endswith(f"(chat_completions), session {OPENWEBUI_CHAT}")
    assert webui["tokens"] == "input 20 (uncached 20), output 0, total 20, no price known"
    assert webui["end"] == "completed, HTTP 200, answered by fake-filter: content_filter"
    assert dict(story(datasette, log, 26))["end"] == (
        "incomplete, HTTP 200, answered by fake-incomplete: length"
    )
    # The 429's stream had asked for usage: no "none recorded" step, the end says why.
    assert story(datasette, log, 28) == [
        (
            "request",
            "bob via Cursor asked fake-429 on openai (chat_completions), streamed, "
            "stream usage requested by the client",
        ),
        ("prompt", "Refactor the router"),
        ("end", "upstream_error, HTTP 429: Rate limit reached for fake-429"),
    ]
    assert story(datasette, log, 30) == [
        (
            "request",
            "(unauthenticated) via openai-python asked no model on openai (chat_completions)",
        ),
        ("end", f"rejected, HTTP 401: {CHAT[30].error}"),
    ]


def copy_of_log(log: UsageLog, tmp_path: Path) -> sqlite3.Connection:
    """A writable copy of the log, for variants of a row."""
    copy = sqlite3.connect(tmp_path / "copy.db")
    source = sqlite3.connect(f"file:{log.db_path}?mode=ro", uri=True)
    try:
        source.backup(copy)
    finally:
        source.close()
    copy.row_factory = sqlite3.Row
    return copy


def run_query(conn: sqlite3.Connection, name: str, **params: str) -> list[dict[str, Any]]:
    queries = yaml.safe_load(METADATA.read_text())["database"]["queries"]
    return [dict(r) for r in conn.execute(queries[name]["sql"], params)]


@pytest.mark.parametrize(
    "raw",
    [
        # Chat Completions' own forms, a LiteLLM-style one with Anthropic's names, and junk.
        '{"prompt_tokens": 1200, "prompt_tokens_details": {"cached_tokens": "1024"}}',
        '{"prompt_tokens": 1200, "prompt_tokens_details": null}',
        '{"prompt_tokens_details": [1024], "cache_creation": "none"}',
        '{"prompt_cache_hit_tokens": 1024, "prompt_cache_miss_tokens": 176}',
        "not json",
        None,
    ],
)
def test_raw_chat_usage_is_not_read_for_counts(
    log: UsageLog, tmp_path: Path, raw: str | None
) -> None:
    """Chat Completions counts come from the columns, whatever the raw usage JSON holds."""
    copy = copy_of_log(log, tmp_path)
    try:
        with copy:
            copy.execute(
                "update token_usages set usage = ? where interception_id = ?", (raw, log.ids[21])
            )
        steps = {
            r["what"]: r["detail"]
            for r in run_query(copy, "interception_story", interception_id=log.ids[21])
        }
        efficiency = run_query(copy, "cache_efficiency")
    finally:
        copy.close()
    assert steps["tokens"].startswith(
        "input 1200 (uncached 176, cache read 1024), output 40 (reasoning 0), total 1240, "
    )
    chat = next(
        r for r in efficiency if (r["api"], r["provider"]) == ("chat_completions", "openai")
    )
    assert chat["cache_read_input_tokens"] == 3712
    assert (chat["cache_write_5m_input_tokens"], chat["cache_write_1h_input_tokens"]) == (
        None,
        None,
    )


def test_opencode_sessions(datasette: Datasette, log: UsageLog) -> None:
    rows = canned(datasette, "opencode_sessions")
    for r in rows:
        r["models"] = set(r["models"].split(","))
    assert rows == [
        # A release that sends no session id: its turns grouped per person and day.
        {
            "session": "(none: alice 2025-06-02)",
            "users": "alice",
            "apis": "chat_completions",
            "models": {"fake-incomplete", "fake-text"},
            "first_prompt": "Write the migration guide",
            "turns": 2,
            "prompts": 2,
            "tool_results": 0,
            "tool_calls": 0,
            "tools": None,
            "thoughts": 0,
            "not_completed": 1,
            "streams_without_usage": 1,  # 29: the compressed body
            "input_tokens": 500,
            "uncached_input_tokens": 500,
            "cache_read_input_tokens": 0,
            "cache_write_input_tokens": None,
            "output_tokens": 256,
            "reasoning_tokens": 0,
            "total_tokens": 756,
            "estimated_cost_usd": None,
            "unpriced_responses": 1,
            "subscription_responses": 0,
            "started": started(26),
            "last_activity": ended(29),
        },
        {
            "session": OPENCODE_SESSION,
            "users": "alice",
            "apis": "chat_completions",
            "models": {"fake-tool"},
            "first_prompt": "Add a test for the parser",
            "turns": 2,
            "prompts": 1,
            "tool_results": 1,
            "tool_calls": 1,
            "tools": "read x1",
            "thoughts": 0,
            "not_completed": 0,
            "streams_without_usage": 0,
            **sums([21, 22], *_TOKEN_COLUMNS),
            "cache_write_input_tokens": None,
            "estimated_cost_usd": r6(COST["c_tool_call"], COST["c_tool_result"]),
            "unpriced_responses": 0,
            "subscription_responses": 0,
            "started": started(21),
            "last_activity": ended(22),
        },
    ]
    # By hand: 2176 of 2500 prompt tokens cached, 0.0014 + 0.0016.
    assert (rows[1]["cache_read_input_tokens"], rows[1]["estimated_cost_usd"]) == (2176, 0.003)


def test_streams_without_usage(datasette: Datasette, log: UsageLog) -> None:
    def row(i: int, stream_usage: str, why: str) -> dict[str, Any]:
        x = CHAT[i]
        return {
            "at": started(i),
            "user": x.user,
            "api": "chat_completions",
            "provider": x.provider[0],
            "client": x.client,
            "model": x.model,
            "status": x.status,
            "http_status": x.http_status,
            "stream_usage": stream_usage,
            "why": why,
            "interception_id": log.ids[i],
        }

    assert canned(datasette, "streams_without_usage") == [
        row(29, CHAT[29].stream_usage or "", "usage was not requested"),
        row(28, "requested by the client", "ended (upstream_error) before any usage"),
        row(24, "not requested", "usage was not requested"),
    ]


@pytest.mark.parametrize(
    ("metadata", "stream_usage", "why"),
    [
        (None, None, "the provider sent no usage"),
        ("not json", None, "the provider sent no usage"),
        ("[1, 2]", None, "the provider sent no usage"),
        ('{"stream_usage": 5}', 5, "the provider sent no usage"),
        (
            '{"stream_usage": "requested by the client"}',
            "requested by the client",
            "the provider sent no usage",
        ),
        ('{"stream_usage": "not requested"}', "not requested", "usage was not requested"),
        (
            '{"stream_usage": "NOT REQUESTED, somehow"}',
            "NOT REQUESTED, somehow",
            "usage was not requested",
        ),
    ],
)
def test_streams_without_usage_read_any_metadata(
    log: UsageLog, tmp_path: Path, metadata: str | None, stream_usage: object, why: str
) -> None:
    """A completed stream whose usage row is missing is listed whatever its metadata holds,
    and the stories of both APIs' rows still answer."""
    copy = copy_of_log(log, tmp_path)
    try:
        with copy:
            for i in (21, 4):  # a Chat Completions stream and a Responses one
                copy.execute("delete from token_usages where interception_id = ?", (log.ids[i],))
                copy.execute(
                    "update interceptions set metadata = ? where id = ?", (metadata, log.ids[i])
                )
        listed = {r["interception_id"]: r for r in run_query(copy, "streams_without_usage")}
        stories = [
            run_query(copy, "interception_story", interception_id=log.ids[i]) for i in (21, 4)
        ]
    finally:
        copy.close()
    for i in (21, 4):
        assert (listed[log.ids[i]]["stream_usage"], listed[log.ids[i]]["why"]) == (
            stream_usage,
            why,
        )
    assert {log.ids[i] for i in NO_USAGE_STREAMS} < set(listed)
    for steps in stories:
        tokens = [r["detail"] for r in steps if r["what"] == "tokens"]
        if why == "usage was not requested":
            assert tokens == [f"none recorded: stream usage {stream_usage}"]
        else:
            assert tokens == []


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "not json",
        "[1, 2]",
        '"a string"',
        '{"cache_creation": 5}',
        '{"cache_creation": null}',
        '{"cache_creation": ["ephemeral_1h_input_tokens", 800]}',
    ],
)
def test_raw_usage_without_a_split_object(log: UsageLog, tmp_path: Path, raw: str | None) -> None:
    """The queries that read the raw usage JSON answer for any text in it: no split, no error."""
    db_path = tmp_path / "copy.db"
    source = sqlite3.connect(f"file:{log.db_path}?mode=ro", uri=True)
    copy = sqlite3.connect(db_path)
    try:
        source.backup(copy)
        with copy:
            copy.execute(
                "update token_usages set usage = ? where interception_id = ?", (raw, log.ids[12])
            )
        queries = yaml.safe_load(METADATA.read_text())["database"]["queries"]
        details = dict(
            (what, detail)
            for _, what, detail in copy.execute(
                queries["interception_story"]["sql"], {"interception_id": log.ids[12]}
            )
        )
        assert details["tokens"].startswith(
            "input 22206 (uncached 201, cache read 20003, cache write 2002), output 19, "
        )
        copy.row_factory = sqlite3.Row
        rows = {r["api"]: dict(r) for r in copy.execute(queries["cache_efficiency"]["sql"])}
    finally:
        copy.close()
        source.close()
    messages = rows["messages"]
    # The other rows' splits still count; this one's writes are in the total only.
    assert messages["cache_write_1h_input_tokens"] == 0
    assert messages["cache_write_5m_input_tokens"] == sum(
        TOKENS_OF[i].write_5m or 0 for i in range(11, 19) if i != 12
    )
    assert messages["cache_write_input_tokens"] == sum(
        TOKENS_OF[i].cache_write for i in range(11, 19)
    )


def test_failed_requests(datasette: Datasette, log: UsageLog) -> None:
    rows = canned(datasette, "failed_requests")
    order = (30, 20, 19, 18, 17, 10, 28, 9, 27, 8, 26, 7, 6)
    assert [r["interception_id"] for r in rows] == [log.ids[i] for i in order]
    chat = [r for r in rows if r["api"] == "chat_completions"]
    assert [
        (r["at"], r["user"], r["status"], r["http_status"], r["model"], r["client"], r["error"])
        for r in chat
    ] == [
        (started(30), "(unauthenticated)", "rejected", 401, None, "openai-python", CHAT[30].error),
        (
            started(28),
            "bob",
            "upstream_error",
            429,
            "fake-429",
            "Cursor",
            "Rate limit reached for fake-429",
        ),
        # Completed, but stopped by the content filter: worth a look.
        (started(27), "bob", "completed", 200, "fake-filter", "Open WebUI", "content_filter"),
        (started(26), "alice", "incomplete", 200, "fake-incomplete", "OpenCode", "length"),
    ]
    assert chat[0]["credential_hint"] == CHAT_STRANGER_HINT and chat[0]["credential_kind"] is None
    rows = [r for r in rows if r["api"] != "chat_completions"]
    assert [
        (r["at"], r["user"], r["api"], r["status"], r["http_status"], r["model"]) for r in rows
    ] == [
        (started(20), "(unauthenticated)", "messages", "rejected", 401, None),
        (started(19), "bob", "messages", "upstream_error", 529, "fake-529"),
        # Completed, but the model refused: worth a look.
        (started(18), "alice", "messages", "completed", 200, "fake-refusal"),
        (started(17), "bob", "messages", "incomplete", 200, "fake-max-tokens"),
        (started(10), "(unauthenticated)", "responses", "rejected", 401, None),
        (started(9), "alice", "responses", "rejected", 501, "fake-text"),
        (started(8), "bob", "responses", "upstream_error", 429, "fake-429"),
        (started(7), "alice", "responses", "failed", 200, "fake-failed"),
        (started(6), "bob", "responses", "incomplete", 200, "fake-incomplete"),
    ]
    stranger_m, overloaded, refusal, max_tokens, unknown, background, limited, failed, _ = rows
    # What a security reviewer needs about the stranger: a hint of the token, never the token.
    for stranger in (unknown, stranger_m):
        assert stranger["credential_kind"] is None
        assert stranger["credential_hint"] == "no...en"
    assert "not-a-bridge-token" not in str(rows)
    assert background["error"] == "background requests are currently not supported by AI Bridge"
    assert "Rate limit reached" in limited["error"]
    assert "failed while generating the response" in failed["error"]
    assert overloaded["error"] == "upstream answered HTTP 529: Overloaded"
    assert (refusal["error"], max_tokens["error"]) == ("refusal", "max_tokens")
    assert {r["client"] for r in rows} == {"openai-python", "anthropic-python"}


def test_sessions(datasette: Datasette, log: UsageLog) -> None:
    def row(
        session: str, user: str, client: str, ix: list[int], counts: tuple[int, int, int]
    ) -> dict[str, Any]:
        prompts, tool_calls, not_completed = counts
        return {
            "session": session,
            "users": user,
            "clients": client,
            "apis": api_of(ix[0]),
            "turns": len(ix),
            "prompts": prompts,
            "tool_calls": tool_calls,
            "not_completed": not_completed,
            **sums(ix, "total_tokens"),
            "estimated_cost_usd": shown_cost(log, *ix),
            "started": started(ix[0]),
            "last_activity": ended(ix[-1]),
        }

    assert canned(datasette, "sessions") == [
        row(SIGN_IN_SESSION, SIGN_IN_USER, "Claude Code", [16], (1, 0, 0)),
        # Open WebUI's chat id; stopped by the content filter, but completed.
        row(OPENWEBUI_CHAT, "bob", "Open WebUI", [27], (1, 0, 0)),
        row("sess-bob", "bob", "openai-python", [4, 6], (2, 0, 1)),
        row(CC_SESSION, "bob", "Claude Code", [13, 14], (1, 1, 0)),
        row("sess-alice", "alice", "openai-python", [2, 3], (1, 1, 0)),
        # OpenCode's x-session-affinity; its session-less turns (26, 29) are in no session.
        row(OPENCODE_SESSION, "alice", "OpenCode", [21, 22], (1, 1, 0)),
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
    claude_code = canned(datasette, "session_turns", session_id=CC_SESSION)
    assert claude_code == [
        {
            "turn": 1,
            "at": started(13),
            "user": "bob",
            "model": CLAUDE_CODE_MODEL,
            "kind": "prompt",
            "prompt": "run echo hi",
            "tools_called": "Bash",
            "total_tokens": 33332,
            "estimated_cost_usd": r6(log.list_costs[13]),
            "status": "completed",
            "interception_id": log.ids[13],
        },
        {
            "turn": 2,
            "at": started(14),
            "user": "bob",
            "model": CLAUDE_CODE_MODEL,
            "kind": "tool result",
            "prompt": None,
            "tools_called": None,
            "total_tokens": 44439,
            "estimated_cost_usd": r6(log.list_costs[14]),
            "status": "completed",
            "interception_id": log.ids[14],
        },
    ]
    # OpenCode's tool round trip on Chat Completions, and Open WebUI's one-turn chat.
    turns = canned(datasette, "session_turns", session_id=OPENCODE_SESSION)
    assert turns == [
        {
            "turn": 1,
            "at": started(21),
            "user": "alice",
            "model": "fake-tool",
            "kind": "prompt",
            "prompt": "Add a test for the parser",
            "tools_called": "read",
            "total_tokens": 1240,
            "estimated_cost_usd": r6(COST["c_tool_call"]),
            "status": "completed",
            "interception_id": log.ids[21],
        },
        {
            "turn": 2,
            "at": started(22),
            "user": "alice",
            "model": "fake-tool",
            "kind": "tool result",
            "prompt": None,
            "tools_called": None,
            "total_tokens": 1360,
            "estimated_cost_usd": r6(COST["c_tool_result"]),
            "status": "completed",
            "interception_id": log.ids[22],
        },
    ]
    (webui,) = canned(datasette, "session_turns", session_id=OPENWEBUI_CHAT)
    assert (webui["kind"], webui["total_tokens"], webui["estimated_cost_usd"]) == (
        "prompt",
        20,
        None,
    )


def test_claude_code_sessions(datasette: Datasette, log: UsageLog) -> None:
    columns = (
        "input_tokens",
        "uncached_input_tokens",
        "cache_read_input_tokens",
        "cache_write_input_tokens",
        "output_tokens",
        "total_tokens",
    )

    def row(
        session: str, user: str, kind: str, ix: list[int], first: str, **counts: Any
    ) -> dict[str, Any]:
        return {
            "session": session,
            "users": user,
            "credential_kinds": kind,
            "models": CLAUDE_CODE_MODEL,
            "first_prompt": first,
            "turns": len(ix),
            **counts,
            "thoughts": 0,
            "not_completed": 0,
            **sums(ix, *columns),
            **billing(log, ix),
            "started": started(ix[0]),
            "last_activity": ended(ix[-1]),
        }

    rows = canned(datasette, "claude_code_sessions")
    # Only Claude Code's sessions: the openai-python ones are left out.
    assert rows == [
        row(
            SIGN_IN_SESSION,
            SIGN_IN_USER,
            "subscription",
            [16],
            "say hi",
            prompts=1,
            tool_results=0,
            tool_calls=0,
            tools=None,
        ),
        row(
            CC_SESSION,
            "bob",
            "centralized",
            [13, 14],
            "run echo hi",
            prompts=1,
            tool_results=1,
            tool_calls=1,
            tools="Bash x1",
        ),
    ]
    # By hand, from the fake's scheme (n = 3, 4): what claude -p would report for the run.
    assert [rows[1][c] for c in columns] == [77712, 702, 70006, 7004, 59, 77771]
    assert (rows[0]["estimated_cost_usd"], rows[0]["subscription_responses"]) == (None, 1)


def test_cache_efficiency(datasette: Datasette, log: UsageLog) -> None:
    def total(values: list[int | None]) -> int | None:
        """SQL's sum: None when no row reported a value."""
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    def row(api: str, provider: str, ix: list[int]) -> dict[str, Any]:
        rows = [TOKENS_OF[i] for i in ix]
        inp = sum(r.input for r in rows)
        read = total([r.cache_read for r in rows])
        write = total([r.cache_write for r in rows])
        uncached = sum(r.uncached for r in rows)
        split = [r for r in rows if r.write_1h is not None]
        return {
            "api": api,
            "provider": provider,
            "responses": len(ix),
            "input_tokens": inp,
            "uncached_input_tokens": uncached,
            "cache_read_input_tokens": read or 0,
            "cache_write_input_tokens": write or 0,
            "cache_write_5m_input_tokens": sum(r.write_5m or 0 for r in split) if split else None,
            "cache_write_1h_input_tokens": sum(r.write_1h or 0 for r in split) if split else None,
            "uncached_pct": round(100 * uncached / inp, 1),
            "cache_read_pct": None if read is None else round(100 * read / inp, 1),
            "cache_write_pct": None if write is None else round(100 * write / inp, 1),
            "reads_per_written_token": round(read / write, 2)
            if read is not None and write
            else None,
        }

    rows = canned(datasette, "cache_efficiency")
    assert rows == [
        row("chat_completions", "openai", [21, 22, 25, 26]),
        row("chat_completions", "openai_compatible", [23, 27]),
        row("messages", "anthropic", list(range(11, 19))),
        row("responses", "openai", list(range(8))),
    ]
    chat, host, messages, responses = rows
    # By hand: OpenAI's cached_tokens (1024 + 1152 + 1536 + 0) of 5048 prompt tokens; it
    # reports no cache writes (nor a split), the OpenRouter host no cache at all.
    assert (chat["cache_read_input_tokens"], chat["cache_read_pct"]) == (3712, 73.5)
    assert (chat["cache_write_pct"], chat["reads_per_written_token"]) == (None, None)
    assert chat["cache_write_5m_input_tokens"] is None
    assert (host["uncached_pct"], host["cache_read_pct"]) == (100.0, None)
    # By hand: the only 1-hour writes are fake-cached's 400 x 2; OpenAI reports no split.
    assert messages["cache_write_1h_input_tokens"] == 800
    assert messages["cache_write_5m_input_tokens"] == messages["cache_write_input_tokens"] - 800
    assert (responses["cache_read_input_tokens"], responses["cache_write_input_tokens"]) == (
        1536,
        128,
    )
    assert responses["cache_write_5m_input_tokens"] is None
    assert (responses["cache_read_pct"], responses["reads_per_written_token"]) == (63.3, 12.0)


def test_cost_per_user_per_month(datasette: Datasette, log: UsageLog) -> None:
    def row(month: str, user: str, ix: list[int], sources: set[str]) -> dict[str, Any]:
        return {
            "month": month,
            "user": user,
            "requests": len(ix),
            **sums(ix, "input_tokens", "output_tokens"),
            **billing(log, ix),
            "priced_responses": sum(1 for i in ix if cost_of(log, i) is not None),
            "price_sources": sources,
        }

    both = {"config", "genai-prices"}
    june = [
        row("2025-06", "bob", [4, 6, 8, 13, 14, 17, 19, 23, 24, 27, 28], both),
        row("2025-06", "alice", [2, 3, 5, 7, 9, 15, 18, 25, 26, 29], both),
        row("2025-06", "(unauthenticated)", [10, 20, 30], set()),
        row("2025-06", SIGN_IN_USER, [16], set()),
    ]
    may = [
        row("2025-05", "alice", [0, 11, 21, 22], both),
        row("2025-05", "bob", [1, 12], {"config"}),
    ]
    for month in (june, may):  # most expensive first, then by name: as list prices have it
        month.sort(key=lambda r: (r["estimated_cost_usd"] is None, -(r["estimated_cost_usd"] or 0)))
    rows = canned(datasette, "cost_per_user_per_month")
    for r in rows:
        r["price_sources"] = set((r["price_sources"] or "").split(",")) - {""}
    assert rows == june + may
    signed_in = next(r for r in rows if r["user"] == SIGN_IN_USER)
    assert (signed_in["unpriced_responses"], signed_in["subscription_responses"]) == (0, 1)
    # Alice's June: Copilot's gpt-4.1-mini at list price, OpenCode's length stop unpriced.
    alice = next(r for r in rows if (r["month"], r["user"]) == ("2025-06", "alice"))
    assert alice["unpriced_responses"] == 3  # fake-failed, fake-refusal, fake-incomplete
    assert alice["estimated_cost_usd"] == shown_cost(log, 2, 3, 5, 15, 25)


def test_budget_use(datasette: Datasette, log: UsageLog) -> None:
    """Budgets published as the bridge publishes them (aibridge.governance.report) for
    2025-06-01 in UTC: a person's daily spend and tokens, everyone's monthly spend and tokens.
    Only the bridge's own keys count: the Pro/Max sign-in's tokens (16) are not in June's."""
    governance = Governance(
        groups=(
            Group(
                "everyone",
                frozenset({"*"}),
                shared_limits=Limits({("spend_usd", "month"): 0.05, ("tokens", "month"): 10**6}),
                key="groups[0]",
            ),
        ),
        user_limits={
            "alice": Limits({("spend_usd", "day"): 0.5}),
            "bob": Limits({("tokens", "day"): 100_000}),
        },
        user_keys={"alice": "users[0]", "bob": "users[1]"},
    )
    budgets = budget_rows(governance, ["alice", "bob"], datetime(2025, 6, 1, 12, tzinfo=UTC))
    conn = sqlite3.connect(log.db_path)
    try:
        with conn:
            for row in budgets:
                names, marks = ", ".join(row), ", ".join("?" * len(row))
                conn.execute(f"insert into budgets ({names}) values ({marks})", tuple(row.values()))
    finally:
        conn.close()
    june = [i for i in TOKENS_OF if started(i).startswith("2025-06") and i not in SIGNED_IN]
    june_priced = [i for i in june if cost_of(log, i) is not None]
    alice_day = [2, 3, 5, 15]
    bob_day = [4, 13, 14, 23]  # and 24, a stream without usage
    spend_day = shown_cost(log, *alice_day) or 0
    spend_month = shown_cost(log, *june_priced) or 0
    tokens_day = sum(TOKENS_OF[i].total for i in bob_day)
    tokens_month = sum(TOKENS_OF[i].total for i in june)
    approx = pytest.approx
    want = {
        ("user", "alice", "spend per day"): (approx(spend_day), 0.5, spend_day / 0.5, "06-02"),
        ("user", "bob", "tokens per day"): (tokens_day, 100_000, tokens_day / 1e5, "06-02"),
        ("group", "everyone", "spend per month"): (
            approx(spend_month),
            0.05,
            spend_month / 0.05,
            "07-01",
        ),
        ("group", "everyone", "tokens per month"): (
            tokens_month,
            10**6,
            tokens_month / 1e6,
            "07-01",
        ),
    }
    rows = canned(datasette, "budget_use")
    got = {(r["scope"], r["owner"], r["budget"]): r for r in rows}
    assert set(got) == set(want)
    for key, (spent, limit, share, resets) in want.items():
        row = got[key]
        assert (row["spent"], row["limit"]) == (spent, limit), key
        assert row["share"] == approx(share, abs=1e-4), key
        assert row["resets_at"] == f"2025-{resets}T00:00:00.000000+00:00", key
    assert tokens_month < sum(TOKENS_OF[i].total for i in [*june, *SIGNED_IN])
    assert [r["share"] for r in rows] == sorted((r["share"] for r in rows), reverse=True)
    assert got[("group", "everyone", "spend per month")]["source"] == "groups[0].shared_limits"


def chart_rows(ds: Datasette, chart: str, **filters: str) -> list[dict[str, Any]]:
    """A dashboard chart's query as datasette-dashboards runs it with these filters."""
    board = yaml.safe_load(METADATA.read_text())["dashboard"]
    sql = replace_opts_in_query(board["charts"][chart]["query"], filters)
    response = httpx.get(
        f"{ds.url}/{DB_NAME}.json",
        params={"sql": sql, **filters, "_shape": "array"},
        timeout=30,
    )
    assert response.status_code == 200, (chart, filters, response.text)
    return response.json()


def test_dashboard_charts_split_by_api(datasette: Datasette, log: UsageLog) -> None:
    board = yaml.safe_load(METADATA.read_text())["dashboard"]
    assert set(board["filters"]) == {"user", "api", "date_start", "date_end"}
    every = {"user": "bob", "api": "messages", "date_start": "2025-06-01", "date_end": "2025-06-01"}
    for chart in board["charts"]:
        for filters in (
            {},
            *({k: v} for k, v in every.items()),
            every,
            {**every, "api": "chat_completions"},
        ):
            chart_rows(datasette, chart, **filters)
    (apis,) = [board["filters"]["api"]["query"]]
    assert [
        r["api"]
        for r in httpx.get(
            f"{datasette.url}/{DB_NAME}.json", params={"sql": apis, "_shape": "array"}, timeout=30
        ).json()
    ] == ["chat_completions", "messages", "responses"]

    by_day: dict[tuple[str, str], int] = {}
    for i, tokens in TOKENS_OF.items():
        key = (SCHEDULE[i][0], api_of(i))
        by_day[key] = by_day.get(key, 0) + tokens.total
    assert chart_rows(datasette, "tokens-per-api") == [
        {"day": day, "api": api, "tokens": n} for (day, api), n in sorted(by_day.items())
    ]
    chat = [i for i in TOKENS_OF if api_of(i) == "chat_completions"]
    (metric,) = chart_rows(datasette, "total-cost", api="chat_completions")
    assert metric == {"cost": f"{shown_cost(log, *chat):.4f}"}
    # 26 (length), 28 (429) and 30 (unknown token); the content filter completed.
    assert chart_rows(datasette, "failed", api="chat_completions") == [{"failed": 3}]
    # Cached input share per kind, alice's Chat Completions: no cache writes reported.
    assert chart_rows(datasette, "input-per-api", user="alice", api="chat_completions") == [
        {"api": "chat_completions", "kind": "cache read", "tokens": 1024 + 1152 + 1536},
        {"api": "chat_completions", "kind": "cache write", "tokens": None},
        {"api": "chat_completions", "kind": "uncached", "tokens": 176 + 148 + 512 + 500},
    ]
    messages = [i for i in TOKENS_OF if api_of(i) == "messages"]
    (metric,) = chart_rows(datasette, "total-cost", api="messages")
    assert metric == {"cost": f"{shown_cost(log, *messages):.4f}"}
    # 17 (max_tokens), 19 (529) and 20 (unknown token); the refusal completed.
    assert chart_rows(datasette, "failed", api="messages") == [{"failed": 3}]
    assert {r["api"] for r in chart_rows(datasette, "per-model", api="messages")} == {"messages"}
    bob = [13, 14, 17]  # bob's Messages rows with usage on 2025-06-01 and after: 12 is in May
    assert chart_rows(datasette, "input-per-api", user="bob", api="messages") == [
        {
            "api": "messages",
            "kind": kind,
            "tokens": sum(getattr(TOKENS_OF[i], field) for i in [12, *bob]),
        }
        for kind, field in (
            ("cache read", "cache_read"),
            ("cache write", "cache_write"),
            ("uncached", "uncached"),
        )
    ]


def test_tables_are_described_and_dashboard_is_served(datasette: Datasette) -> None:
    """Every column of every table has a description, and the usage dashboard renders."""
    meta = yaml.safe_load(METADATA.read_text())["database"]["tables"]
    conn = sqlite3.connect(f"file:{datasette.db_path}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
        ours = {t for t in tables if not t.startswith(("sqlite_", "user_prompts_fts"))}
        assert ours <= set(meta), ours - set(meta)  # every table of the log is described
        for table, described in meta.items():
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info([{table}])")]
            assert columns, table
            missing = set(columns) - set(described.get("columns", {})) - {"id"}
            assert not missing, (table, missing)
    finally:
        conn.close()
    page = httpx.get(f"{datasette.url}/{DB_NAME}/token_usages", timeout=30).text
    assert "Estimated cost in US dollars" in page
    assert "Anthropic counts thinking in output_tokens" in page
    assert "prompt_tokens_details.cached_tokens" in page
    page = httpx.get(f"{datasette.url}/{DB_NAME}/interceptions", timeout=30).text
    assert "chat_completions (Chat Completions)" in page
    dashboard = httpx.get(f"{datasette.url}/-/dashboards/usage", timeout=30)
    assert dashboard.status_code == 200
    assert "Tokens per day and person" in dashboard.text
    assert "Tokens per day and API" in dashboard.text
