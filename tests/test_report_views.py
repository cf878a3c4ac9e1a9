"""The canned queries of aibridge/datasette/metadata.yaml as SQL views in both engines (migration
m006_report_views), on logs the Recorder wrote: each SQLite view gives what its canned query
gives, each PostgreSQL view the same rows in PostgreSQL's types; the views read a log that
retention emptied, and the migration applies to a log an older bridge made.

The log: three people, a Claude Pro/Max and a ChatGPT sign-in, an unknown token; three UTC days
across a month boundary; the Responses, Messages and Chat Completions APIs; Codex, Claude Code,
OpenCode and Open WebUI sessions with tool round trips, thoughts, cache reads and Anthropic's
5-minute and 1-hour cache writes; priced, unpriced and subscription rows; a failed, a rejected,
an incomplete and a refused request, one still running; streams without usage (not requested,
cut, none sent); budgets of two published configurations.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pytest
import yaml

from aibridge.record import address as addresses
from aibridge.record import schema
from aibridge.record.recorder import Recorder
from aibridge.retention import prune
from devtools.mitmdump_process import REPO
from tests.log_engines import engine, pg_rows, sqlite_rows
from tests.postgres_server import PostgresServer, database_name

__all__ = ["engine"]  # a fixture, imported for this module's tests

METADATA = REPO / "aibridge" / "datasette" / "metadata.yaml"
QUERIES = yaml.safe_load(METADATA.read_text())["database"]["queries"]
CANNED: dict[str, str] = {name: query["sql"] for name, query in QUERIES.items()}
VIEWS: dict[str, tuple[str, str, str]] = {
    name: (about, lite, pg) for name, about, lite, pg in schema.REPORT_VIEWS
}
# A canned query's parameter, and the view's column that stands for it.
PARAMETERS = {
    "prompts_of_user": ("user", "initiator_id"),
    "interception_story": ("interception_id", "interception_id"),
    "session_turns": ("session_id", "client_session_id"),
}
# Where every value of a parameter can be found in the log.
PARAMETER_VALUES = {
    "prompts_of_user": "select distinct i.initiator_id from user_prompts p "
    "join interceptions i on i.id = p.interception_id where i.initiator_id is not null",
    "interception_story": "select id from interceptions",
    "session_turns": "select distinct client_session_id from interceptions "
    "where client_session_id is not null",
}
# Columns of group_concat(distinct ...): SQLite keeps the order rows came in, PostgreSQL's
# string_agg sorts by value.
DISTINCT_LISTS = {
    "reported_as",
    "users",
    "clients",
    "apis",
    "credential_kinds",
    "models",
    "price_sources",
}
TIME_COLUMNS = {"at", "started", "last_activity", "first_called", "last_called", "resets_at"}
MONEY_COLUMNS = {"estimated_cost_usd", "spent", "limit", "share"}
SUBSCRIPTION_USER = "subscription:sk-a...oken"
CHATGPT_USER = "chatgpt:eyJh...Qssw"
WAIT = 30.0  # generous upper bound for waits; never asserted as a duration


# ---- the log ----------------------------------------------------------------------------------


def at(day: str, clock: str) -> str:
    """A time as the bridge writes it (bridge.utc_now): 2025-06-01T09:00:00.000000+00:00."""
    return f"2025-{day}T{clock}.000000+00:00"


def tokens(
    inp: int,
    out: int,
    *,
    read: int | None = None,
    write: int | None = None,
    reasoning: int | None = None,
    cost: float | None = None,
    price: tuple[str, str, str] | None = None,
    raw: Any = None,
) -> dict[str, Any]:
    """A token_usages row as the APIs' parsers and the price book fill it."""
    source, version, model = price or (None, None, None)
    return {
        "input_tokens": inp,
        "cache_read_input_tokens": read,
        "cache_write_input_tokens": write,
        "uncached_input_tokens": inp - (read or 0) - (write or 0),
        "output_tokens": out,
        "reasoning_tokens": reasoning,
        "total_tokens": inp + out,
        "usage": raw if raw is not None else {"input_tokens": inp, "output_tokens": out},
        "estimated_cost_usd": cost,
        "price_source": source,
        "price_version": version,
        "priced_model": model,
    }


GENAI = ("genai-prices", "0.0.40", "gpt-5")
CLAUDE = ("genai-prices", "0.0.40", "claude-sonnet-4-5")
CONFIG = ("config", "cfg-7f3a", "fake-tool*")


@dataclass
class Exchange:
    """One interceptions row and the rows that hang off it."""

    id: str
    started: str
    ended: str | None
    fields: dict[str, Any]
    prompt: str | None = None
    usage: dict[str, Any] | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    thoughts: list[tuple[str, str | None]] = field(default_factory=list)


def exchange(
    iid: str,
    day: str,
    clock: str,
    *,
    seconds: int = 3,
    prompt: str | None = None,
    usage: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    thoughts: list[tuple[str, str | None]] | None = None,
    **fields: Any,
) -> Exchange:
    """An exchange with the bridge's usual values, `fields` overriding them; it lasted
    `seconds` (None: still running)."""
    started = at(day, clock + ":00")
    ended = None if seconds is None else at(day, f"{clock}:{seconds:02d}")
    row = {
        "flow_id": f"flow-{iid}",
        "initiator_id": "alice",
        "provider": "openai",
        "provider_name": "openai",
        "api": "responses",
        "model": "gpt-5",
        "response_model": "gpt-5-2025-08-07",
        "streaming": 1,
        "client": "Codex",
        "user_agent": "codex_cli_rs/0.50.0",
        "credential_kind": "centralized",
        "credential_hint": "sk-t...cdef",
        "http_status": 200,
        "status": "completed",
        "response_id": f"resp_{iid}",
        "malformed_events": 0,
        "metadata": {"request_bytes": 1000 + len(iid)},
        **fields,
    }
    return Exchange(iid, started, ended, row, prompt, usage, tools or [], thoughts or [])


def tool(name: str, kind: str, args: Any, call_id: str, **more: Any) -> dict[str, Any]:
    """A tool_usages row; its arguments as JSON text, as the bridge writes them (a raw string
    becomes a JSON string)."""
    text = orjson.dumps(args).decode()
    return {"call_id": call_id, "tool": name, "type": kind, "args": text, "injected": 0, **more}


CACHE_SPLIT = {
    "input_tokens": 1201,
    "cache_read_input_tokens": 20003,
    "cache_creation_input_tokens": 2002,
    "cache_creation": {"ephemeral_5m_input_tokens": 1202, "ephemeral_1h_input_tokens": 800},
    "output_tokens": 19,
}
CLAUDE_CODE = {
    "api": "messages",
    "provider": "anthropic",
    "provider_name": "anthropic",
    "client": "Claude Code",
    "user_agent": "claude-cli/2.0.14 (external, cli)",
    "model": "claude-sonnet-4-5",
    "response_model": "claude-sonnet-4-5-20250929",
}
OPENCODE = {
    "api": "chat_completions",
    "provider": "openai_compatible",
    "provider_name": "openrouter",
    "client": "OpenCode",
    "user_agent": "opencode/0.15.0 ai-sdk/provider-utils/3.0.10",
    "model": "fake-tool",
    "response_model": "fake-tool",
}
ANTHROPIC_SDK = {**CLAUDE_CODE, "client": "anthropic-python", "user_agent": "Anthropic/Python"}


def like(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


EXCHANGES = [
    exchange(
        "codex-1",
        "05-31",
        "09:00",
        client_session_id="sess-codex",
        prompt="fix the failing test",
        usage=tokens(1200, 300, read=1000, reasoning=120, cost=0.00215, price=GENAI),
        tools=[tool("shell", "function_call", {"cmd": ["pytest", "-q"]}, "call_1")],
        thoughts=[("reasoning_summary", "Looking at the test first"), ("commentary", "Running")],
    ),
    exchange(
        "codex-2",
        "05-31",
        "09:01",
        client_session_id="sess-codex",
        correlating_tool_call_id="call_1",
        previous_response_id="resp_codex-1",
        usage=tokens(1500, 80, read=1400, reasoning=0, cost=0.0009, price=GENAI),
        tools=[
            tool(
                "search_docs",
                "mcp_call",
                {"q": "pytest -q"},
                "call_2",
                injected=1,
                server_url="docs",
                invocation_error="timeout after 30 s",
            )
        ],
    ),
    exchange(
        "refusal",
        "05-31",
        "11:00",
        **ANTHROPIC_SDK,
        streaming=0,
        error="refusal",
        prompt="write malware",
        usage=tokens(40, 5, read=0, write=0, cost=0.000195, price=CLAUDE),
    ),
    exchange(
        "opencode-1",
        "05-31",
        "13:00",
        **OPENCODE,
        client_session_id="ses_open1",
        metadata={"request_bytes": 900, "stream_usage": "added by the bridge"},
        prompt="list the files",
        # Arguments that were not JSON are kept as a JSON string.
        tools=[tool("bash", "function", "ls -la", "call_o1")],
        usage=tokens(1200, 40, read=1024, cost=0.0014, price=CONFIG),
    ),
    exchange(
        "opencode-2",
        "05-31",
        "13:01",
        **OPENCODE,
        client_session_id="ses_open1",
        correlating_tool_call_id="call_o1",
        metadata={"request_bytes": 1400, "stream_usage": "added by the bridge"},
        thoughts=[("reasoning", "The listing shows two files")],
        usage=tokens(1300, 60, read=1152, cost=0.0016, price=CONFIG),
    ),
    exchange(
        "webui",
        "06-01",
        "10:30",
        **like(
            OPENCODE,
            client="Open WebUI",
            user_agent="Python/3.11 aiohttp/3.12.15",
            model="fake-reasoning",
            response_model=None,
        ),
        initiator_id="bob",
        client_session_id="owui-chat-1",
        streaming=0,
        error="content_filter",
        prompt="how do I pick a lock",
        thoughts=[("reasoning", "Considering the request")],
        usage=tokens(64, 150, read=0, reasoning=100, cost=0.001392, price=CONFIG),
    ),
    exchange(
        "byok",
        "06-01",
        "12:00",
        initiator_id="Zoe",
        client="openai-python",
        model="gpt-5-mini",
        response_model="gpt-5-mini-2025-08-07",
        credential_kind="byok",
        streaming=0,
        prompt="a haiku about caches",
        usage=tokens(24, 14, read=0, reasoning=0, cost=0.000034, price=GENAI),
    ),
    exchange(
        "claude-1",
        "06-01",
        "14:00",
        **CLAUDE_CODE,
        initiator_id="bob",
        client_session_id="cc-bob",
        prompt="run echo hi",
        thoughts=[("thinking", "The user wants me to run a command"), ("redacted_thinking", None)],
        tools=[tool("Bash", "tool_use", {"command": "echo hi"}, "toolu_1")],
        usage=tokens(23206, 19, read=20003, write=2002, cost=0.0123, price=CLAUDE, raw=CACHE_SPLIT),
    ),
    exchange(
        "claude-2",
        "06-01",
        "14:01",
        **CLAUDE_CODE,
        initiator_id="bob",
        client_session_id="cc-bob",
        correlating_tool_call_id="toolu_1",
        tools=[tool("Read", "tool_use", {"file_path": "README.md"}, "toolu_2")],
        usage=tokens(
            23300,
            30,
            read=23205,
            write=0,
            cost=0.00741,
            price=CLAUDE,
            raw={
                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
            },
        ),
    ),
    exchange(
        "no-usage",
        "06-01",
        "15:00",
        **ANTHROPIC_SDK,
        prompt="stream me a poem",
    ),
    exchange(
        "chatgpt",
        "06-01",
        "16:00",
        provider="chatgpt",
        provider_name="chatgpt",
        initiator_id=CHATGPT_USER,
        credential_kind="client",
        client_session_id="sess-chatgpt",
        prompt="explain the diff",
        usage=tokens(900, 70, read=512, reasoning=30),
    ),
    exchange(
        "codex-3",
        "06-02",
        "07:00",
        client_session_id="sess-codex-2",
        prompt="now the docs",
        usage=tokens(800, 200, read=600, reasoning=64, cost=0.0031, price=GENAI),
    ),
    exchange(
        "not-requested",
        "06-02",
        "08:30",
        **OPENCODE,
        metadata={"request_bytes": 700, "stream_usage": "not requested"},
        prompt="summarise the log",
    ),
    exchange(
        "unpriced",
        "06-02",
        "09:00",
        initiator_id="bob",
        client="openai-python",
        model="fake-unpriced",
        response_model="fake-unpriced",
        streaming=0,
        prompt="what model are you",
        usage=tokens(30, 12, read=0, reasoning=0),
    ),
    exchange(
        "budget-refused",
        "06-02",
        "09:30",
        status="rejected",
        http_status=403,
        response_model=None,
        response_id=None,
        error="budget exceeded: spend_usd.day",
        metadata={"request_bytes": 300, "limit": {"limit": "spend_usd.day", "limit_value": 0.5}},
    ),
    exchange(
        "cut",
        "06-02",
        "10:00",
        api="chat_completions",
        client="curl",
        user_agent="curl/8.14.1",
        initiator_id="bob",
        model="gpt-4.1-mini",
        response_model=None,
        status="error",
        error="stream cut: connection reset by the provider",
        metadata={"request_bytes": 500, "stream_usage": "requested by the client"},
        prompt="count to a million",
    ),
    exchange(
        "rate-limited",
        "06-02",
        "11:00",
        initiator_id="bob",
        client="openai-python",
        streaming=0,
        status="upstream_error",
        http_status=429,
        response_model=None,
        error="Rate limit reached for gpt-5",
        prompt="one more try",
    ),
    exchange(
        "unknown-token",
        "06-02",
        "12:00",
        initiator_id=None,
        client="curl",
        user_agent="curl/8.14.1",
        model=None,
        response_model=None,
        streaming=None,
        credential_kind=None,
        credential_hint="sk-u...oops",
        status="rejected",
        http_status=401,
        response_id=None,
        error="unknown bridge token",
    ),
    exchange(
        "max-tokens",
        "06-02",
        "13:00",
        **like(ANTHROPIC_SDK, model="fake-max-tokens", response_model="fake-max-tokens"),
        initiator_id="bob",
        status="incomplete",
        error="max_tokens",
        prompt="write a novel",
        usage=tokens(50, 16, read=0, write=0),
    ),
    exchange(
        "signed-in",
        "06-02",
        "14:00",
        **CLAUDE_CODE,
        initiator_id=SUBSCRIPTION_USER,
        credential_kind="subscription",
        credential_hint="sk-a...oken",
        client_session_id="cc-carol",
        prompt="say hi",
        usage=tokens(
            9000,
            8,
            read=8000,
            write=900,
            raw={"cache_creation": {"ephemeral_5m_input_tokens": 900}},
        ),
    ),
    exchange("running", "06-02", "16:00", seconds=None, status="in_progress", http_status=None),
]
BUDGET_DAY = (at("06-02", "00:00:00"), at("06-03", "00:00:00"))
BUDGET_MONTH = (at("06-01", "00:00:00"), at("07-01", "00:00:00"))


def budget(
    scope: str, owner: str, members: str, metric: str, period: str, limit: float, digest: str
) -> dict[str, Any]:
    """A budgets row as the bridge publishes it (aibridge.governance.report.budget_rows)."""
    start, end = BUDGET_DAY if period == "day" else BUDGET_MONTH
    return {
        "id": f"{scope}:{owner}:{metric}:{period}",
        "scope": scope,
        "owner": owner,
        "members": members,
        "metric": metric,
        "period": period,
        "limit_value": limit,
        "source": "groups[0].shared_limits" if scope == "group" else "users[0].limits",
        "time_zone": "UTC",
        "period_start": start,
        "resets_at": end,
        "config_digest": digest,
        "updated_at": at("06-02", "00:00:05") if digest == "new" else at("06-01", "00:00:05"),
    }


BUDGETS = [
    # An older configuration's, which the views no longer read.
    budget("user", "carol", '["carol"]', "spend_usd", "month", 1.0, "old"),
    budget("user", "alice", '["alice"]', "spend_usd", "day", 0.5, "new"),
    budget("user", "bob", '["bob"]', "tokens", "day", 100_000, "new"),
    budget("group", "everyone", '["*"]', "spend_usd", "month", 0.05, "new"),
    budget("group", "team", '["alice", "bob", 1, null]', "tokens", "month", 1e6, "new"),
    budget("group", "frozen", '["alice"]', "spend_usd", "week", 0, "new"),
    # Members that are not a JSON array count no one.
    budget("group", "odd", '{"alice": 1}', "spend_usd", "month", 2.0, "new"),
]


def write_log(address: str) -> None:
    """Every exchange and budget, queued as the bridge queues them."""
    rec = Recorder(address, linger=0)
    rec.start()
    try:
        for ex in EXCHANGES:
            rec.upsert(
                schema.INTERCEPTIONS,
                {"id": ex.id, "started_at": ex.started, "ended_at": ex.ended, **ex.fields},
            )
            child = {"interception_id": ex.id, "created_at": ex.ended or ex.started}
            if ex.prompt is not None:
                rec.insert(schema.USER_PROMPTS, {**child, "prompt": ex.prompt})
            for source, content in ex.thoughts:
                rec.insert(schema.MODEL_THOUGHTS, {**child, "source": source, "content": content})
            for call in ex.tools:
                rec.insert(schema.TOOL_USAGES, {**child, **call})
            if ex.usage is not None:
                rec.insert(schema.TOKEN_USAGES, {**child, **ex.usage})
        for row in BUDGETS:
            rec.upsert(schema.BUDGETS, row)
        assert rec.flush(WAIT)
    finally:
        rec.close(timeout=WAIT)


@pytest.fixture(scope="module")
def sqlite_log(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("views") / "aibridge.db")
    write_log(path)
    return path


@contextlib.contextmanager
def postgres_database(server: PostgresServer, options: str = "") -> Iterator[str]:
    """The log in a new database (created with `options`), for the module: a fresh one per
    test would cost a database and a fill each."""
    name = database_name("report_views")
    with server.connect(autocommit=True) as conn:
        conn.execute(f'create database "{name}" {options}')
    url = server.url(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPASSWORD", server.password)
        try:
            write_log(url)
            yield url
        finally:
            server.drop_database(name)


@pytest.fixture(scope="module")
def postgres_log(postgres_server: PostgresServer) -> Iterator[str]:
    with postgres_database(postgres_server) as url:  # the server's collation: C, as SQLite's
        yield url


@pytest.fixture(scope="module")
def postgres_icu_log(postgres_server: PostgresServer) -> Iterator[str]:
    """In a database whose text sorts by a linguistic collation (ICU's English): "bash"
    before "Bash", "bob" before "Zoe", where SQLite sorts by bytes."""
    icu = "template template0 locale_provider icu icu_locale 'en'"
    with postgres_database(postgres_server, icu) as url:
        yield url


# ---- reading ----------------------------------------------------------------------------------


def columns_and_rows(
    address: str, sql: str, params: Any = ()
) -> tuple[list[str], list[dict[str, Any]]]:
    if addresses.is_postgres(address):
        with psycopg.connect(address, row_factory=psycopg.rows.dict_row) as conn:
            cursor = conn.execute(sql, params)
            return [c.name for c in cursor.description or ()], cursor.fetchall()
    conn = sqlite3.connect(address)
    conn.row_factory = sqlite3.Row
    try:
        cursor = conn.execute(sql, params)
        names = [c[0] for c in cursor.description or ()]
        return names, [dict(r) for r in cursor]
    finally:
        conn.close()


def view_rows(address: str, name: str) -> list[dict[str, Any]]:
    return columns_and_rows(address, f"select * from v_{name}")[1]


def view_names(address: str) -> list[str]:
    if addresses.is_postgres(address):
        sql = (
            "select table_name as name from information_schema.views where table_schema = 'public'"
        )
    else:
        sql = "select name from sqlite_master where type = 'view'"
    return sorted(r["name"] for r in columns_and_rows(address, sql)[1])


def applied(address: str) -> list[str]:
    return [r["name"] for r in columns_and_rows(address, "select name from _migrations")[1]]


def pg_value(column: str, value: Any) -> Any:
    """A PostgreSQL value as SQLite's view gives it."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, date):
        # A month is its first day in PostgreSQL, its "YYYY-MM" in SQLite.
        return value.isoformat()[:7] if column == "month" else value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: sorted(v.split(",")) if k in DISTINCT_LISTS and isinstance(v, str) else v
        for k, v in row.items()
    }


def assert_same_rows(name: str, sqlite_address: str, other: str) -> None:
    """v_<name> gives the same rows on `other` (either engine) as on the SQLite log."""
    lite_columns, lite = columns_and_rows(sqlite_address, f"select * from v_{name}")
    columns, rows = columns_and_rows(other, f"select * from v_{name}")
    assert columns == lite_columns
    assert lite, f"{name}: the log should give rows to compare"
    rows = [{k: pg_value(k, v) for k, v in row.items()} for row in rows]
    if name == "interception_story" and addresses.is_postgres(other):
        # A tool call's arguments are printed as each engine holds them: the JSON as written,
        # or as jsonb prints it (its own spacing and key order).
        written = sqlite_rows(sqlite_address, "select id, args from tool_usages")
        printed = {
            r["id"]: r["args"] for r in pg_rows(other, "select id, args::text from tool_usages")
        }
        for row in lite:
            for r in written:
                if row["what"].startswith("tool call") and r["args"] is not None:
                    row["detail"] = row["detail"].replace(f"({r['args']})", f"({printed[r['id']]})")
    assert [comparable(r) for r in rows] == [comparable(r) for r in lite]


# ---- (1) each SQLite view gives what its canned query gives -----------------------------------


def test_every_canned_query_has_its_view() -> None:
    assert list(VIEWS) == [f"v_{name}" for name in CANNED]
    parameters = {name: set(re.findall(r"(?<!:):([a-z_]+)", sql)) for name, sql in CANNED.items()}
    assert {name: found for name, found in parameters.items() if found} == {
        name: {parameter} for name, (parameter, _) in PARAMETERS.items()
    }
    for name, (_, column) in PARAMETERS.items():
        assert f"Filter on {column}" in VIEWS[f"v_{name}"][0], name


@pytest.mark.parametrize("name", [n for n in CANNED if n not in PARAMETERS])
def test_a_sqlite_view_gives_its_canned_query(sqlite_log: str, name: str) -> None:
    canned = columns_and_rows(sqlite_log, CANNED[name])
    assert canned[1], f"{name}: the log should give the canned query rows to compare"
    assert columns_and_rows(sqlite_log, f"select * from v_{name}") == canned


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_a_sqlite_view_filtered_gives_its_canned_query_for_each_value(
    sqlite_log: str, name: str
) -> None:
    parameter, column = PARAMETERS[name]
    values = sorted(next(iter(r.values())) for r in sqlite_rows(sqlite_log, PARAMETER_VALUES[name]))
    assert len(values) >= 3, values
    seen = 0
    for value in values:
        canned_columns, canned = columns_and_rows(sqlite_log, CANNED[name], {parameter: value})
        assert canned, (name, value)
        sql = f"select * from v_{name} where {column} = ?"
        columns, rows = columns_and_rows(sqlite_log, sql, (value,))
        assert columns == [column, *canned_columns]
        assert [{k: r[k] for k in canned_columns} for r in rows] == canned, value
        assert {r[column] for r in rows} == {value}
        seen += len(rows)
    # Unfiltered, the view holds every value's rows and no others.
    assert len(view_rows(sqlite_log, name)) == seen


FILTERED = [
    f"select * from v_{name} where {column} = 'x'" for name, (_, column) in PARAMETERS.items()
]


@pytest.mark.parametrize("sql", FILTERED, ids=list(PARAMETERS))
def test_a_filtered_sqlite_view_reads_through_the_indexes(sqlite_log: str, sql: str) -> None:
    """A filter on the parameter's column reaches every table the view reads, as the canned
    query's does: no table is read whole for one request, person or session."""
    steps = [r["detail"] for r in sqlite_rows(sqlite_log, f"explain query plan {sql}")]
    assert any(s.startswith("SEARCH ") for s in steps), steps
    # What may be scanned is what the filter left: a subquery's rows, the view's.
    scans = [s for s in steps if s.startswith("SCAN ")]
    assert [s for s in scans if not s.startswith(("SCAN (subquery-", "SCAN v_"))] == [], steps


@pytest.mark.parametrize("sql", FILTERED, ids=list(PARAMETERS))
def test_a_filtered_postgres_view_reads_through_the_indexes(postgres_log: str, sql: str) -> None:
    with psycopg.connect(postgres_log) as conn:
        # Unless the filter reaches the tables, a sequential scan is the only plan there is.
        conn.execute("set enable_seqscan = off")
        plan = [r[0] for r in conn.execute(f"explain {sql}")]
    assert any("Index" in line for line in plan), plan
    assert [line for line in plan if "Seq Scan" in line] == [], plan


def test_sqlite_views_carry_their_comment(sqlite_log: str) -> None:
    found = sqlite_rows(sqlite_log, "select name, sql from sqlite_master where type = 'view'")
    assert sorted(r["name"] for r in found) == sorted(VIEWS)
    for r in found:
        assert r["sql"].startswith(f'CREATE VIEW "{r["name"]}" AS -- {VIEWS[r["name"]][0]}\n')


# ---- (2) each PostgreSQL view gives the SQLite view's rows -----------------------------------


@pytest.mark.parametrize("collation", ["C", "icu"])
@pytest.mark.parametrize("name", list(CANNED))
def test_a_postgres_view_gives_the_rows_of_the_sqlite_view(
    sqlite_log: str, request: pytest.FixtureRequest, name: str, collation: str
) -> None:
    log = request.getfixturevalue("postgres_log" if collation == "C" else "postgres_icu_log")
    assert_same_rows(name, sqlite_log, log)


def test_postgres_views_have_postgres_types_and_comments(postgres_log: str) -> None:
    found = pg_rows(
        postgres_log,
        "select table_name as view, column_name as name, data_type as type "
        "from information_schema.columns where left(table_name, 2) = 'v_' "
        "order by table_name, ordinal_position",
    )
    types: dict[str, dict[str, str]] = {}
    for r in found:
        types.setdefault(r["view"], {})[r["name"]] = r["type"]
    assert sorted(types) == sorted(VIEWS)
    for view, columns in types.items():
        for column, kind in columns.items():
            if column in TIME_COLUMNS:
                assert kind == "timestamp with time zone", (view, column)
            elif column in ("day", "month"):
                assert kind == "date", (view, column)
            elif column in MONEY_COLUMNS or column.endswith(("_pct", "_per_written_token")):
                assert kind == "numeric", (view, column)
    timed = {view for view, columns in types.items() if TIME_COLUMNS & columns.keys()}
    assert len(timed) == 10, timed
    comments = pg_rows(
        postgres_log,
        "select relname as view, obj_description(oid, 'pg_class') as comment "
        "from pg_class where relkind = 'v' and left(relname, 2) = 'v_'",
    )
    assert {r["view"]: r["comment"] for r in comments} == {
        name: about + schema.PG_VIEW_TYPES for name, (about, _, _) in VIEWS.items()
    }


# Raw JSON of the wrong type where the views look: from a provider, or a row the recorder
# repaired (what was not JSON is kept as a JSON string). Each with the cache write split the
# story prints (None: none) and the 5-minute writes cache_efficiency sums.
ODD_JSON = [
    pytest.param(
        {"cache_creation": {"ephemeral_5m_input_tokens": "lots"}}, (0, 0), None, id="text"
    ),
    pytest.param({"cache_creation": {"ephemeral_5m_input_tokens": None}}, (0, 0), None, id="null"),
    pytest.param({"cache_creation": {"ephemeral_5m_input_tokens": True}}, (0, 0), None, id="bool"),
    pytest.param(
        {"cache_creation": {"ephemeral_5m_input_tokens": 7.9, "ephemeral_1h_input_tokens": -3}},
        (7, -3),
        7.9,
        id="fraction-and-negative",
    ),
    pytest.param(
        {"cache_creation": {"ephemeral_5m_input_tokens": 1.5e30, "ephemeral_1h_input_tokens": 1}},
        (1_500_000_000_000_000_000_000_000_000_000, 1),
        1.5e30,
        id="beyond-bigint",
    ),
    pytest.param({"cache_creation": {}}, (0, 0), None, id="empty-split"),
    pytest.param({"cache_creation": 12}, None, None, id="split-a-number"),
    pytest.param({"cache_creation": [1, 2]}, None, None, id="split-a-list"),
    pytest.param({"stream_usage": {"not": "text"}, "limit": [1]}, None, None, id="nested"),
    pytest.param("not json at all", None, None, id="a-string"),
    pytest.param([], None, None, id="a-list"),
    pytest.param(None, None, None, id="json-null"),
]


@pytest.mark.parametrize(("raw", "split", "writes_5m"), ODD_JSON)
def test_postgres_views_read_odd_json_as_missing(
    postgres_url: str, raw: Any, split: tuple[int, int] | None, writes_5m: float | None
) -> None:
    """A JSON value of the wrong type reads as missing (0 in the story, as SQLite's printf
    prints a missing count) rather than failing the view: in usage, metadata and budget
    members alike."""
    text = orjson.dumps(raw).decode()
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    rec.upsert(
        schema.INTERCEPTIONS,
        {
            "id": "odd",
            "started_at": at("06-02", "09:00:00"),
            "initiator_id": "alice",
            "api": "messages",
            "streaming": 1,
            "credential_kind": "centralized",
            "status": "completed",
            "metadata": text,
        },
    )
    usage = tokens(10, 2, read=3, write=5, cost=0.5, raw=text)
    rec.insert(schema.TOKEN_USAGES, {"interception_id": "odd", **usage})
    # alice's daily budget, had its members been a list of user ids.
    rec.upsert(schema.BUDGETS, {**BUDGETS[1], "members": text})
    rec.close(timeout=WAIT)
    for name in CANNED:
        view_rows(postgres_url, name)  # none fails
    story = {r["what"]: r["detail"] for r in view_rows(postgres_url, "interception_story")}
    assert story["request"].startswith("alice via an unknown client asked no model, streamed")
    want = "" if split is None else f": {split[0]} for 5 minutes, {split[1]} for 1 hour"
    assert f"cache write 5{want}), output 2" in story["tokens"]
    (efficiency,) = view_rows(postgres_url, "cache_efficiency")
    assert efficiency["cache_write_input_tokens"] == 5
    assert efficiency["cache_write_5m_input_tokens"] == (
        None if writes_5m is None else Decimal(str(writes_5m))
    )
    (budget_row,) = view_rows(postgres_url, "budget_use")
    assert budget_row["spent"] == 0  # members that are not a list count no one


# ---- (3) retention ----------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)  # well after every exchange of the log
# The views that read no content: clearing it changes none of their rows.
WITHOUT_CONTENT = [
    "usage_per_user_per_day",
    "usage_per_api_per_day",
    "usage_per_model",
    "top_tools",
    "failed_requests",
    "streams_without_usage",
    "cache_efficiency",
    "cost_per_user_per_month",
    "budget_use",
]


def test_views_read_a_log_that_retention_emptied(engine: str) -> None:
    rec = Recorder(engine)  # a new, empty log
    rec.start()
    rec.close()
    assert {name: view_rows(engine, name) for name in CANNED} == {name: [] for name in CANNED}
    write_log(engine)
    before = {name: view_rows(engine, name) for name in WITHOUT_CONTENT}

    # Content first (prompts, thoughts, tool arguments): the views say it was not kept.
    report = prune(engine, days=3650, content_days=1, now=NOW)
    assert report.cleared["user_prompts.prompt"] == sum(e.prompt is not None for e in EXCHANGES)
    assert {name: view_rows(engine, name) for name in WITHOUT_CONTENT} == before
    prompts = view_rows(engine, "prompts_of_user")
    assert len(prompts) == report.cleared["user_prompts.prompt"]
    assert {p["prompt"] for p in prompts} == {None}
    story = view_rows(engine, "interception_story")
    assert {s["detail"] for s in story if s["what"] == "prompt"} == {"(not kept)"}
    assert {s["detail"] for s in story if s["what"] == "thought: thinking"} == {"(not kept)"}
    assert "shell()" in {s["detail"] for s in story if s["what"].startswith("tool call")}
    turns = view_rows(engine, "session_turns")
    assert {t["prompt"] for t in turns if t["kind"] == "prompt"} == {"(not kept)"}
    sessions = {s["session"]: s for s in view_rows(engine, "claude_code_sessions")}
    assert sessions["cc-bob"]["first_prompt"] is None and sessions["cc-bob"]["turns"] == 2

    # Then every exchange: nothing to report but the budgets, which retention keeps.
    prune(engine, days=1, now=NOW)
    for name in CANNED:
        rows = view_rows(engine, name)
        if name == "budget_use":
            assert len(rows) == len([b for b in BUDGETS if b["config_digest"] == "new"])
            assert {r["spent"] for r in rows} == {0}
        else:
            assert rows == [], name


# ---- (4) the migration on a log of the previous version ---------------------------------------


def test_the_migration_applies_to_a_log_of_the_previous_version(
    engine: str, sqlite_log: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    m006 = schema.MIGRATIONS.index(schema.m006_report_views)
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:m006])
        patch.setattr(schema, "SCHEMA_VERSION", m006)
        write_log(engine)
    assert applied(engine) == [m.__name__ for m in schema.MIGRATIONS[:m006]]
    assert view_names(engine) == []

    rec = Recorder(engine)
    rec.start()
    rec.close()
    assert applied(engine) == [m.__name__ for m in schema.MIGRATIONS]
    assert view_names(engine) == sorted(VIEWS)
    if not addresses.is_postgres(engine):
        version = sqlite_rows(engine, "pragma user_version")
        assert version == [{"user_version": schema.SCHEMA_VERSION}]
    # The rows written before the views existed read as in a log made by this version.
    for name in CANNED:
        assert_same_rows(name, sqlite_log, engine)


def test_the_budget_view_agrees_with_the_budgets_command(postgres_url: str) -> None:
    """v_budget_use (for psql and dashboards) and python -m aibridge.budgets read the same
    budgets the same way: of two configurations published in the same millisecond the one
    written last, and as members only the strings of the array (a number is no person)."""
    from aibridge.governance.report import BUDGET_USE_SQL_POSTGRES
    from aibridge.record.recorder import Recorder

    rec = Recorder(postgres_url, linger=0)
    rec.start()
    for n, user in enumerate(["alice", "1", "bob"]):
        iid = f"x{n}"
        rec.upsert(
            schema.INTERCEPTIONS,
            {
                "id": iid,
                "started_at": "2026-12-01T10:00:00.000Z",
                "initiator_id": user,
                "credential_kind": "centralized",
            },
        )
        rec.insert(
            schema.TOKEN_USAGES,
            {"interception_id": iid, "total_tokens": 100 * (n + 1), "estimated_cost_usd": n + 1.0},
        )

    def budget(digest: str, owner: str, members: str) -> dict[str, Any]:
        return {
            "id": f"group:{owner}:usd:day",
            "scope": "group",
            "owner": owner,
            "members": members,
            "metric": "usd",
            "period": "day",
            "limit_value": 10.0,
            "source": "config",
            "period_start": "2026-12-01T00:00:00.000Z",
            "resets_at": "2026-12-02T00:00:00.000Z",
            "config_digest": digest,
            "updated_at": "2026-12-01T12:00:00.000Z",
        }

    rec.upsert(schema.BUDGETS, budget("zzz-older", "team-a", '["alice", "bob"]'))
    assert rec.flush(WAIT)
    rec.upsert(schema.BUDGETS, budget("aaa-newer", "team-b", '["alice", 1, true, null]'))
    assert rec.flush(WAIT)
    rec.close()

    def normal(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [
            (r["owner"], round(float(r["spent"]), 6), round(float(r["share"]), 4)) for r in rows
        ]

    view = normal(pg_rows(postgres_url, "select * from v_budget_use"))
    command = normal(pg_rows(postgres_url, BUDGET_USE_SQL_POSTGRES))
    assert view == command == [("team-b", 1.0, 0.1)]
