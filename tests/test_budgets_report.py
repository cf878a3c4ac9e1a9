"""Budget use per person and group (aibridge.governance.report): the budgets the bridge
publishes, and the canned query that sets the log's spend against them, run by sqlite3, by
datasette and by ``python -m aibridge.budgets --json``, on a log written by the Recorder; and
its PostgreSQL version, which must give the same rows from the same exchanges (``engine``).

Every expected number is computed here in Python from the exchanges written, not by SQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import sqlite_utils
import yaml

from aibridge import budgets
from aibridge.config import Config, parse_config
from aibridge.governance.periods import spelled
from aibridge.governance.report import (
    BUDGET_USE_SQL,
    BUDGET_USE_SQL_POSTGRES,
    budget_rows,
    budget_use,
    config_digest,
    configured_user_ids,
    like_sqlite,
)
from aibridge.record import address as addresses
from aibridge.record import schema
from aibridge.record.recorder import Recorder
from aibridge.retention import prune
from devtools.mitmdump_process import REPO
from tests.harness import Datasette
from tests.log_engines import engine, pg_rows, read
from tests.postgres_server import PostgresServer, database_name

__all__ = ["engine"]  # a fixture, imported for this module's tests

METADATA = REPO / "aibridge" / "datasette" / "metadata.yaml"
# A Wednesday, 12:00 in Berlin (CEST, UTC+2). Its periods there, in UTC:
NOW = datetime(2025, 6, 4, 10, 0, tzinfo=UTC)
DAY = ("2025-06-03T22:00:00.000000+00:00", "2025-06-04T22:00:00.000000+00:00")
WEEK = ("2025-06-01T22:00:00.000000+00:00", "2025-06-08T22:00:00.000000+00:00")
MONTH = ("2025-05-31T22:00:00.000000+00:00", "2025-06-30T22:00:00.000000+00:00")
SHA = "0" * 63  # + one digit per user: token_sha256 values

CONFIG: dict[str, Any] = {
    "database": "aibridge.db",
    "providers": [
        {"name": "openai", "type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}
    ],
    "governance": {"time_zone": "Europe/Berlin"},
    "users": [
        # Her own daily spend wins over eng's; her own `unlimited` lifts eng's daily tokens.
        {
            "id": "alice",
            "token_sha256": SHA + "1",
            "limits": {"spend_usd": {"day": 5}, "tokens": {"day": "unlimited"}},
        },
        {"id": "bob", "token_sha256": SHA + "2", "groups": ["eng", "lab"]},
        # A limit of 0: used up from the start.
        {
            "id": "carol",
            "token_sha256": SHA + "3",
            "groups": ["eng"],
            "limits": {"spend_usd": {"week": 0}},
        },
        {"id": "erin", "token_sha256": SHA + "4"},  # only everyone's limits hold for her
    ],
    "groups": [
        {
            "name": "eng",
            "members": ["alice"],
            "limits": {"spend_usd": {"day": 10, "week": 40}, "tokens": {"day": 20000}},
            "shared_limits": {"spend_usd": {"month": 100}, "tokens": {"week": "unlimited"}},
        },
        {
            "name": "everyone",
            "members": ["*"],
            "limits": {"tokens": {"month": 1_000_000}},
            "shared_limits": {"spend_usd": {"month": 500}},
        },
        # Less generous than eng: bob's daily spend is eng's 10.
        {"name": "lab", "limits": {"spend_usd": {"day": 8}}},
    ],
}


def load(raw: dict[str, Any] = CONFIG) -> Config:
    return parse_config(raw, "budgets.yaml", {})


@dataclass(frozen=True, slots=True)
class Exchange:
    user: str | None
    kind: str | None  # credential kind
    started_at: str
    usages: tuple[tuple[float | None, int], ...]  # (estimated cost, total tokens) per row


EXCHANGES = (
    Exchange("alice", "centralized", "2025-06-04T09:00:00.000000+00:00", ((1.5, 1000),)),
    # The first instant of the day counts in it; the last one before it does not.
    Exchange("alice", "centralized", DAY[0], ((0.25, 100),)),
    Exchange("alice", "centralized", "2025-06-03T21:59:59.999999+00:00", ((2.0, 200),)),
    # Two responses of one exchange (a tool loop): both count.
    Exchange("alice", "centralized", "2025-06-04T09:10:00.000000+00:00", ((0.1, 10), (0.2, 20))),
    # A model without a price: its tokens count, its spend is 0.
    Exchange("alice", "centralized", "2025-06-04T09:20:00.000000+00:00", ((None, 500),)),
    # Her own key, a sign-in, no credential at all: not the bridge's money.
    Exchange("alice", "byok", "2025-06-04T09:30:00.000000+00:00", ((100.0, 100_000),)),
    Exchange("alice", "subscription", "2025-06-04T09:31:00.000000+00:00", ((70.0, 70_000),)),
    Exchange("alice", None, "2025-06-04T09:32:00.000000+00:00", ((60.0, 60_000),)),
    # The last instant of May in Berlin, and the first of July: outside every period.
    Exchange("alice", "centralized", "2025-05-31T21:59:59.999999+00:00", ((30.0, 3000),)),
    Exchange("alice", "centralized", MONTH[1], ((40.0, 4000),)),
    Exchange("bob", "centralized", "2025-06-04T08:00:00.000000+00:00", ((3.0, 3000),)),
    Exchange("bob", "centralized", "2025-06-02T12:00:00.000000+00:00", ((4.0, 4000),)),
    Exchange("bob", "centralized", "2025-06-01T12:00:00.000000+00:00", ((6.0, 6000),)),
    Exchange("carol", "centralized", "2025-06-04T07:00:00.000000+00:00", ((0.75, 750),)),
    # Someone the config does not name (a proxyauth user): only everyone's budget sees them.
    Exchange("dave", "centralized", "2025-06-04T06:00:00.000000+00:00", ((0.5, 50),)),
    # Unauthenticated: nobody's, not even everyone's.
    Exchange(None, "centralized", "2025-06-04T06:30:00.000000+00:00", ((9.0, 900),)),
    # Refused before it left: no usage row.
    Exchange("erin", "centralized", "2025-06-04T06:40:00.000000+00:00", ()),
)


def write_log(db_path: str | Path, exchanges: tuple[Exchange, ...] = EXCHANGES) -> None:
    """The exchanges as the bridge's recorder writes them (migrations applied)."""
    recorder = Recorder(db_path)
    recorder.start()
    try:
        for n, x in enumerate(exchanges):
            iid = f"i{n:04d}"
            recorder.upsert(
                schema.INTERCEPTIONS,
                {
                    "id": iid,
                    "started_at": x.started_at,
                    "ended_at": x.started_at,
                    "initiator_id": x.user,
                    "credential_kind": x.kind,
                    "status": "completed" if x.usages else "rejected",
                },
            )
            for cost, tokens in x.usages:
                recorder.insert(
                    schema.TOKEN_USAGES,
                    {
                        "interception_id": iid,
                        "total_tokens": tokens,
                        "estimated_cost_usd": cost,
                        "created_at": x.started_at,
                    },
                )
    finally:
        recorder.close(timeout=30)


def publish(db_path: str | Path, rows: list[dict[str, Any]]) -> None:
    """As the bridge publishes its budgets: upserts through the recorder."""
    recorder = Recorder(db_path)
    recorder.start()
    try:
        for row in rows:
            recorder.upsert(schema.BUDGETS, row)
    finally:
        recorder.close(timeout=30)


def expected_use(
    rows: list[dict[str, Any]], exchanges: tuple[Exchange, ...] = EXCHANGES
) -> list[dict[str, Any]]:
    """The canned query's answer, computed in Python."""
    out = []
    for row in rows:
        members = orjson.loads(row["members"])
        amount: float = 0
        for x in exchanges:
            if x.kind != "centralized" or x.user is None:
                continue
            if "*" not in members and x.user not in members:
                continue
            if not row["period_start"] <= x.started_at < row["resets_at"]:
                continue
            for cost, tokens in x.usages:
                amount += tokens if row["metric"] == "tokens" else (cost or 0)
        limit = row["limit_value"]
        tokens_metric = row["metric"] == "tokens"
        out.append(
            {
                "scope": row["scope"],
                "owner": row["owner"],
                "budget": f"{'tokens' if tokens_metric else 'spend'} per {row['period']}",
                # SQLite rounds halves its own way, and sums in its own order.
                "spent": int(amount) if tokens_metric else pytest.approx(amount, abs=1e-6),
                "limit": int(limit) if tokens_metric else limit,
                "share": pytest.approx(amount / limit if limit > 0 else 1.0, abs=1e-4),
                "resets_at": row["resets_at"],
                "source": row["source"],
            }
        )
    order = {"day": 0, "week": 1, "month": 2}
    by_id = {id(o): r for o, r in zip(out, rows, strict=True)}
    return sorted(
        out,
        key=lambda o: (
            -o["share"].expected,
            o["scope"],
            o["owner"],
            by_id[id(o)]["metric"],
            order[by_id[id(o)]["period"]],
        ),
    )


def run_sql(db_path: str | Path) -> list[dict[str, Any]]:
    """The canned query over the log's own budgets table: BUDGET_USE_SQL in SQLite,
    BUDGET_USE_SQL_POSTGRES in PostgreSQL (its rows with SQLite's Python types)."""
    if addresses.is_postgres(str(db_path)):
        return [like_sqlite(row) for row in pg_rows(str(db_path), BUDGET_USE_SQL_POSTGRES)]
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        cursor = conn.execute(BUDGET_USE_SQL)
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, r, strict=True)) for r in cursor]
    finally:
        conn.close()


def use_of(db_path: str | Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if addresses.is_postgres(str(db_path)):
        with psycopg.connect(str(db_path), autocommit=True) as pg:
            return budget_use(pg, rows)
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return budget_use(conn, rows)
    finally:
        conn.close()


def typed(rows: list[dict[str, Any]]) -> list[list[tuple[str, type, Any]]]:
    """Rows with the type of each value, for comparing one engine's answer with the other's."""
    return [[(name, type(value), value) for name, value in row.items()] for row in rows]


def fill(address: str | Path) -> None:
    write_log(address)
    config = load()
    publish(address, budget_rows(config.governance, configured_user_ids(config), NOW))


@pytest.fixture(scope="module")
def sqlite_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log (named as datasette's metadata expects) with the budgets published at NOW."""
    db_path = tmp_path_factory.mktemp("budgets") / "aibridge.db"
    fill(db_path)
    return db_path


@pytest.fixture(scope="module")
def postgres_log(postgres_server: PostgresServer) -> Iterator[str]:
    """The same log in PostgreSQL (one database for the module; PGPASSWORD set while it lives)."""
    name = database_name("budgets_report")
    url = postgres_server.create_database(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPASSWORD", postgres_server.password)
        fill(url)
        yield url
    postgres_server.drop_database(name)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def logged(request: pytest.FixtureRequest) -> str:
    """The log of EXCHANGES with the budgets published at NOW, on each engine in turn; tests
    only read it."""
    name = "sqlite_log" if request.param == "sqlite" else "postgres_log"
    return str(request.getfixturevalue(name))


@pytest.fixture(scope="module")
def datasette(sqlite_log: Path) -> Iterator[Datasette]:
    with Datasette(sqlite_log) as ds:  # the plugin brings the queries
        yield ds


# ---- budget_rows ------------------------------------------------------------------------


def test_budget_rows_follow_the_combining_rules() -> None:
    config = load()
    assert configured_user_ids(config) == ["alice", "bob", "carol", "erin"]
    rows = budget_rows(config.governance, configured_user_ids(config), NOW)
    got = {r["id"]: (r["members"], r["limit_value"], r["source"]) for r in rows}
    assert got == {
        "group:eng:spend_usd:month": ('["alice","bob","carol"]', 100.0, "groups[0].shared_limits"),
        "group:everyone:spend_usd:month": ('["*"]', 500.0, "groups[1].shared_limits"),
        "user:alice:spend_usd:day": ('["alice"]', 5.0, "users[0].limits"),
        "user:alice:spend_usd:week": ('["alice"]', 40.0, "groups[0].limits"),
        "user:alice:tokens:month": ('["alice"]', 1e6, "groups[1].limits"),
        "user:bob:spend_usd:day": ('["bob"]', 10.0, "groups[0].limits"),
        "user:bob:spend_usd:week": ('["bob"]', 40.0, "groups[0].limits"),
        "user:bob:tokens:day": ('["bob"]', 20000.0, "groups[0].limits"),
        "user:bob:tokens:month": ('["bob"]', 1e6, "groups[1].limits"),
        "user:carol:spend_usd:day": ('["carol"]', 10.0, "groups[0].limits"),
        "user:carol:spend_usd:week": ('["carol"]', 0.0, "users[2].limits"),
        "user:carol:tokens:day": ('["carol"]', 20000.0, "groups[0].limits"),
        "user:carol:tokens:month": ('["carol"]', 1e6, "groups[1].limits"),
        "user:erin:tokens:month": ('["erin"]', 1e6, "groups[1].limits"),
    }
    assert [r["id"] for r in rows] == sorted(got)
    assert {tuple(r) for r in rows} == {tuple(c[1] for c in _table_info())}
    for row in rows:
        scope, owner, metric, period = row["id"].split(":")
        assert (row["scope"], row["owner"], row["metric"], row["period"]) == (
            scope,
            owner,
            metric,
            period,
        )
        assert (row["period_start"], row["resets_at"]) == {
            "day": DAY,
            "week": WEEK,
            "month": MONTH,
        }[period]
        assert row["time_zone"] == "Europe/Berlin"
        assert row["updated_at"] == spelled(NOW)
    assert len({r["config_digest"] for r in rows}) == 1


def _table_info() -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(":memory:")
    try:
        schema.migrate(sqlite_utils.Database(conn))
        return conn.execute("pragma table_info(budgets)").fetchall()
    finally:
        conn.close()


def test_budget_rows_take_epoch_seconds_or_datetimes_and_refuse_naive_ones() -> None:
    config = load()
    users = configured_user_ids(config)
    assert budget_rows(config.governance, users, NOW.timestamp()) == budget_rows(
        config.governance, users, NOW
    )
    berlin = NOW.astimezone(config.governance.zone)
    assert budget_rows(config.governance, users, berlin) == budget_rows(
        config.governance, users, NOW
    )
    with pytest.raises(ValueError, match="aware"):
        budget_rows(config.governance, users, datetime(2025, 6, 4, 12, 0))


@pytest.mark.parametrize(
    "raw_governance",
    [
        {},  # nothing configured
        {
            "users": [
                {"id": "alice", "token_sha256": SHA + "1", "limits": {"requests_per_minute": 5}}
            ]
        },
        {
            "users": [{"id": "alice", "token_sha256": SHA + "1"}],
            "groups": [
                {
                    "name": "g",
                    "members": ["*"],
                    "limits": {"spend_usd": {"day": "unlimited"}, "concurrent_requests": 2},
                    "shared_limits": {"tokens": {"month": "unlimited"}},
                }
            ],
        },
    ],
)
def test_no_budget_no_row(raw_governance: dict[str, Any]) -> None:
    raw = {**{k: v for k, v in CONFIG.items() if k not in ("users", "groups")}, **raw_governance}
    config = load(raw)
    assert budget_rows(config.governance, configured_user_ids(config), NOW) == []
    # Users named from outside the config get no budget either.
    assert budget_rows(config.governance, ["zoe", "alice"], NOW) == []


def test_a_group_of_everyone_is_one_star_whoever_else_it_names() -> None:
    group = {
        "name": "all",
        "members": ["alice", "*", "bob"],
        "shared_limits": {"tokens": {"day": 10}},
    }
    (row,) = budget_rows(load({**CONFIG, "users": [], "groups": [group]}).governance, [], NOW)
    assert (row["id"], row["members"]) == ("group:all:tokens:day", '["*"]')


def test_group_without_members_still_has_its_budget() -> None:
    raw = {**CONFIG, "groups": [{"name": "empty", "shared_limits": {"tokens": {"week": 7}}}]}
    raw["users"] = [{"id": "alice", "token_sha256": SHA + "1"}]
    (row,) = budget_rows(load(raw).governance, ["alice"], NOW)
    assert (row["id"], row["members"], row["limit_value"]) == ("group:empty:tokens:week", "[]", 7)


def test_periods_follow_the_time_zone_and_its_dst() -> None:
    """The day of the spring change in Berlin is 23 hours long; in Tokyo a day starts at 15:00
    UTC the day before; in UTC at midnight."""
    base = {**CONFIG, "users": [CONFIG["users"][0]], "groups": []}
    cases = {
        "Europe/Berlin": (
            datetime(2025, 3, 30, 12, 0, tzinfo=UTC),
            ("2025-03-29T23:00:00.000000+00:00", "2025-03-30T22:00:00.000000+00:00"),
        ),
        "Asia/Tokyo": (
            datetime(2025, 6, 4, 16, 0, tzinfo=UTC),
            ("2025-06-04T15:00:00.000000+00:00", "2025-06-05T15:00:00.000000+00:00"),
        ),
        "UTC": (
            datetime(2025, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            ("2025-12-31T00:00:00.000000+00:00", "2026-01-01T00:00:00.000000+00:00"),
        ),
    }
    for zone, (at, day) in cases.items():
        config = load({**base, "governance": {"time_zone": zone}})
        (row,) = [r for r in budget_rows(config.governance, ["alice"], at) if r["period"] == "day"]
        assert (row["period_start"], row["resets_at"], row["time_zone"]) == (*day, zone), zone


def test_config_digest_tells_changed_configs_apart_and_keeps_across_periods() -> None:
    config = load()
    users = configured_user_ids(config)
    now = budget_rows(config.governance, users, NOW)
    later = budget_rows(config.governance, users, NOW + timedelta(days=40))
    assert later[0]["period_start"] != now[0]["period_start"]
    assert later[0]["config_digest"] == now[0]["config_digest"] == config_digest(now)

    def digest_of(raw: dict[str, Any]) -> str:
        cfg = load(raw)
        return budget_rows(cfg.governance, configured_user_ids(cfg), NOW)[0]["config_digest"]

    alice = CONFIG["users"][0]
    changed = [
        # a limit's value
        {**CONFIG, "users": [{**alice, "limits": {"spend_usd": {"day": 6}}}, *CONFIG["users"][1:]]},
        # a limit's period
        {
            **CONFIG,
            "users": [{**alice, "limits": {"spend_usd": {"week": 5}}}, *CONFIG["users"][1:]],
        },
        # the time zone
        {**CONFIG, "governance": {"time_zone": "UTC"}},
        # a group's members
        {**CONFIG, "groups": [{**CONFIG["groups"][0], "members": []}, *CONFIG["groups"][1:]]},
        # where a limit is given (groups in another order)
        {**CONFIG, "groups": [CONFIG["groups"][1], CONFIG["groups"][0], CONFIG["groups"][2]]},
        # one person more
        {**CONFIG, "users": [*CONFIG["users"], {"id": "fred", "token_sha256": SHA + "5"}]},
    ]
    digests = {digest_of(raw) for raw in changed}
    assert len(digests) == len(changed)
    assert now[0]["config_digest"] not in digests
    # The same config read again, or its users in another order: the same digest.
    assert digest_of(yaml.safe_load(yaml.safe_dump(CONFIG))) == now[0]["config_digest"]
    assert budget_rows(config.governance, reversed(users), NOW) == now


# ---- the query ------------------------------------------------------------------------


def test_canned_query_is_budget_use_sql() -> None:
    queries = yaml.safe_load(METADATA.read_text())["database"]["queries"]
    query = queries["budget_use"]
    assert query["sql"] == BUDGET_USE_SQL
    assert query["title"] == "Budget use per person and group"
    assert query["description"]


def test_budget_use_counts_what_the_bridge_paid_in_each_period(logged: str) -> None:
    config = load()
    rows = budget_rows(config.governance, configured_user_ids(config), NOW)
    want = expected_use(rows)
    got = run_sql(logged)
    assert got == want
    assert use_of(logged, rows) == got
    by_id = {(r["scope"], r["owner"], r["budget"]): r for r in got}
    # Spot checks against hand arithmetic.
    # alice today: 1.5 + 0.25 (at midnight) + 0.1 + 0.2 (two rows) + 0 (unpriced)
    assert by_id[("user", "alice", "spend per day")]["spent"] == 2.05
    assert by_id[("user", "alice", "spend per day")]["share"] == 0.41
    # ...this week also the 2.0 of the instant before midnight
    assert by_id[("user", "alice", "spend per week")]["spent"] == 4.05
    assert by_id[("user", "alice", "tokens per month")]["spent"] == 1830
    # bob: today 3; this week (from Monday in Berlin) 3 + 4; Sunday's 6 only in the month
    assert by_id[("user", "bob", "spend per day")]["spent"] == 3.0
    assert by_id[("user", "bob", "spend per week")]["spent"] == 7.0
    assert by_id[("user", "bob", "tokens per month")]["spent"] == 13000
    # carol's 0 budget is used up: first, with share 1 and more
    assert got[0]["owner"] == "carol" and got[0]["budget"] == "spend per week"
    assert got[0]["share"] == 1.0
    # groups: eng = alice 4.05 + bob 13 + carol 0.75; everyone adds dave 0.5
    assert by_id[("group", "eng", "spend per month")]["spent"] == 17.8
    assert by_id[("group", "everyone", "spend per month")]["spent"] == 18.3
    # erin was refused: nothing spent, a share of 0
    assert by_id[("user", "erin", "tokens per month")] | {"resets_at": ""} == {
        "scope": "user",
        "owner": "erin",
        "budget": "tokens per month",
        "spent": 0,
        "limit": 1_000_000,
        "share": 0.0,
        "resets_at": "",
        "source": "groups[1].limits",
    }
    shares = [r["share"] for r in got]
    assert shares == sorted(shares, reverse=True)


def test_both_engines_give_the_same_rows_of_the_same_types(
    sqlite_log: Path, postgres_log: str
) -> None:
    """Value for value and type for type (tokens as int, spend as float), in the same order:
    the published table's use, and that of rows given from a config."""
    assert typed(run_sql(postgres_log)) == typed(run_sql(sqlite_log))
    config = load()
    users = configured_user_ids(config)
    for at in (NOW, NOW + timedelta(days=3), NOW - timedelta(days=30)):
        rows = budget_rows(config.governance, users, at)
        assert typed(use_of(postgres_log, rows)) == typed(use_of(sqlite_log, rows)), at
    # The query as psql or a dashboard runs it: the same numbers (tokens come as floats).
    raw = pg_rows(postgres_log, BUDGET_USE_SQL_POSTGRES)
    assert raw == run_sql(sqlite_log)
    assert {type(r["spent"]) for r in raw} == {float}


def test_datasette_and_the_command_give_the_same_numbers(
    sqlite_log: Path, datasette: Datasette, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    response = httpx.get(
        f"{datasette.url}/aibridge/budget_use.json", params={"_shape": "array"}, timeout=30
    )
    assert response.status_code == 200, response.text
    from_datasette = response.json()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    argv = ["--config", str(config_file), "--db", str(sqlite_log), "--json"]
    assert budgets.main(argv, now=NOW) == 0
    from_command = orjson.loads(capsys.readouterr().out)
    assert from_datasette == from_command == run_sql(sqlite_log)
    config = load()
    assert from_command == expected_use(
        budget_rows(config.governance, configured_user_ids(config), NOW)
    )
    page = httpx.get(f"{datasette.url}/aibridge", timeout=30).text
    assert "Budget use per person and group" in page


def test_only_the_newest_published_config_counts(engine: str) -> None:
    write_log(engine)
    old_raw = {
        **CONFIG,
        "users": [{"id": "alice", "token_sha256": SHA + "1", "limits": {"tokens": {"week": 99}}}],
        "groups": [],
    }
    old = load(old_raw)
    new = load()
    old_rows = budget_rows(old.governance, ["alice"], NOW - timedelta(hours=1))
    new_rows = budget_rows(new.governance, configured_user_ids(new), NOW)
    publish(engine, old_rows)
    assert run_sql(engine) == expected_use(old_rows)
    publish(engine, new_rows)
    # The old config's budget is still in the table, under its own digest: not shown.
    ids = [r["id"] for r in read(engine, "select id from budgets")]
    assert "user:alice:tokens:week" in ids
    assert run_sql(engine) == expected_use(new_rows)
    # The old config published again, later: it is the one shown.
    again = budget_rows(old.governance, ["alice"], NOW + timedelta(hours=1))
    publish(engine, again)
    assert run_sql(engine) == expected_use(again)
    # A change of period republishes the same config: the new period's numbers.
    tomorrow = NOW + timedelta(days=1)
    publish(engine, budget_rows(old.governance, ["alice"], tomorrow))
    (row,) = run_sql(engine)
    assert row["resets_at"] == "2025-06-08T22:00:00.000000+00:00"


def _config_of(limits: dict[str, Any], *user_ids: str) -> Config:
    users = [
        {"id": u, "token_sha256": SHA + str(n), "limits": limits} for n, u in enumerate(user_ids)
    ]
    return load({**CONFIG, "users": users, "groups": []})


# Two configs, published in the same microsecond, one after the other; (first, second) ids:
# none in common, the same ones, the second's a superset of the first's.
SAME_INSTANT = [
    (("alice",), ("bob",)),
    (("alice", "bob"), ("alice", "bob")),
    (("alice",), ("alice", "bob", "carol")),
]


@pytest.mark.parametrize(("first", "second"), SAME_INSTANT)
def test_of_two_publishes_in_the_same_instant_the_later_counts(
    engine: str, first: tuple[str, ...], second: tuple[str, ...]
) -> None:
    """The tie-breaker (SQLite: rowid; PostgreSQL: the writing transaction): one config's
    rows, the later one's, never a mix."""
    write_log(engine)
    earlier = budget_rows(_config_of({"tokens": {"day": 1000}}, *first).governance, first, NOW)
    later = budget_rows(_config_of({"tokens": {"day": 7}}, *second).governance, second, NOW)
    assert {r["updated_at"] for r in earlier} == {r["updated_at"] for r in later}
    assert earlier[0]["config_digest"] != later[0]["config_digest"]
    publish(engine, earlier)
    publish(engine, later)
    assert run_sql(engine) == expected_use(later)
    # Rows given to budget_use: the later given wins alike.
    assert use_of(engine, [*earlier, *later]) == expected_use(later)
    assert use_of(engine, [*later, *earlier]) == expected_use(earlier)


def test_postgres_prefers_the_row_written_last_where_sqlite_keeps_the_rowid(
    postgres_url: str,
) -> None:
    """The later config names fewer budgets: in SQLite the earlier's leftover row can have the
    highest rowid (an upsert keeps a row's rowid); in PostgreSQL the later publish counts."""
    write_log(postgres_url)
    earlier = budget_rows(
        _config_of({"tokens": {"day": 1000}}, "alice", "bob").governance, ["alice", "bob"], NOW
    )
    later = budget_rows(_config_of({"tokens": {"day": 7}}, "alice").governance, ["alice"], NOW)
    publish(postgres_url, earlier)
    publish(postgres_url, later)
    assert run_sql(postgres_url) == expected_use(later)


def test_an_empty_table_or_no_rows_give_no_answer(engine: str) -> None:
    write_log(engine)
    assert run_sql(engine) == []
    assert use_of(engine, []) == []


def test_a_log_without_exchanges_gives_budgets_with_nothing_spent(engine: str) -> None:
    config = load()
    rows = budget_rows(config.governance, configured_user_ids(config), NOW)
    publish(engine, rows)  # the migrations and the budgets; no interception
    assert run_sql(engine) == use_of(engine, rows) == expected_use(rows, ())
    assert {r["spent"] for r in run_sql(engine)} == {0}


HAND_WRITTEN = [
    ("not json", 0.0),
    ("", 0.0),
    (None, 0.0),
    ('{"alice": "alice"}', 0.0),  # an object: neither its keys nor its values
    ('{"0": "alice"}', 0.0),
    ('"alice"', 0.0),  # a string, not a list
    ('"*"', 0.0),
    ('[["alice"]]', 0.0),
    ('[["*"]]', 0.0),
    ('[{"id": "alice"}]', 0.0),
    ("[]", 0.0),
    ("[1, 2]", 0.0),
    ("true", 0.0),
    ("[true, false, null]", 0.0),
    ("42", 0.0),
    ('["Alice"]', 0.0),  # ids are exact
    ('[" alice"]', 0.0),
    ('["alice", "alice"]', 2.05),  # a member named twice counts once
    ('[null, 1, "alice", {"x": 1}]', 2.05),  # only the strings are members
    ('  [ "alice" ]\n', 2.05),  # JSON, spaced
    ('["al\\u0069ce"]', 2.05),  # an escape is the character
    ('["alice", "*"]', 2.05 + 3.0 + 0.75 + 0.5),  # "*" anywhere: everyone, once
    ('["*", "*"]', 2.05 + 3.0 + 0.75 + 0.5),
    (["alice"], 2.05),  # a list, as the recorder would be given it
    (("alice", "bob"), 2.05 + 3.0),
]


@pytest.mark.parametrize(("members", "counted"), HAND_WRITTEN)
def test_members_as_written_by_hand(logged: str, members: Any, counted: float) -> None:
    config = load()
    (row,) = [
        r
        for r in budget_rows(config.governance, ["alice"], NOW)
        if r["id"] == "user:alice:spend_usd:day"
    ]
    (use,) = use_of(logged, [{**row, "members": members}])
    assert use["spent"] == round(counted, 6)


def test_members_as_published_by_hand(engine: str) -> None:
    """The same members in the log's own table (through the recorder: in PostgreSQL a value
    that is not JSON is stored as a JSON string), one budget each."""
    write_log(engine)
    config = load()
    (row,) = [
        r
        for r in budget_rows(config.governance, ["alice"], NOW)
        if r["id"] == "user:alice:spend_usd:day"
    ]
    published = [
        {**row, "id": f"user:hand{n:02d}:spend_usd:day", "owner": f"hand{n:02d}", "members": m}
        for n, (m, _) in enumerate(HAND_WRITTEN)
        if not isinstance(m, tuple)
    ]
    publish(engine, published)
    got = {r["owner"]: r["spent"] for r in run_sql(engine)}
    want = {f"hand{n:02d}": round(c, 6) for n, (m, c) in enumerate(HAND_WRITTEN)}
    assert got == {owner: want[owner] for owner in got}
    assert len(got) == len(published)


@pytest.fixture
def icu_url(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty database whose text sorts by ICU's English collation ("a" < "B" < "b")."""
    name = database_name("budgets_icu")
    with postgres_server.connect(autocommit=True) as conn:
        conn.execute(
            f"create database {name} template template0 locale_provider icu icu_locale 'en'"
        )
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


def test_owners_are_ordered_as_sqlite_orders_them_whatever_the_collation(
    sqlite_log: Path, icu_url: str
) -> None:
    """Bytes, upper case before lower, NULL first: also in a database whose text sorts by a
    linguistic collation."""
    write_log(icu_url)
    with psycopg.connect(icu_url) as conn:
        assert conn.execute("select 'B' < 'a'").fetchone() == (False,)  # linguistic indeed
    config = load()
    (row,) = [
        r
        for r in budget_rows(config.governance, ["alice"], NOW)
        if r["id"] == "user:alice:spend_usd:day"
    ]
    owners = ["alice", "Bob", "_x", "bob", "Zoe", "ä", "a b", "ab", None]
    rows = [{**row, "id": f"user:{n}", "owner": o, "members": "[]"} for n, o in enumerate(owners)]
    sqlite_order = [r["owner"] for r in use_of(sqlite_log, rows)]
    assert sqlite_order == [None, "Bob", "Zoe", "_x", "a b", "ab", "alice", "bob", "ä"]
    assert [r["owner"] for r in use_of(icu_url, rows)] == sqlite_order
    publish(icu_url, rows)
    assert [r["owner"] for r in run_sql(icu_url)] == sqlite_order
    # And the spend of the same log as in SQLite, periods compared in that collation.
    rows = budget_rows(config.governance, configured_user_ids(config), NOW)
    assert typed(use_of(icu_url, rows)) == typed(use_of(sqlite_log, rows))


def test_budget_use_leaves_the_connection_as_it_found_it(sqlite_log: Path) -> None:
    config = load()
    rows = budget_rows(config.governance, configured_user_ids(config), NOW)
    conn = sqlite3.connect(f"file:{sqlite_log}?mode=ro", uri=True)
    try:
        published = conn.execute("select count(*) from budgets").fetchone()
        other = [{**rows[0], "limit_value": 1.0}]
        assert len(budget_use(conn, other)) == 1
        assert not conn.in_transaction
        assert conn.execute("select count(*) from budgets").fetchone() == published
        temp = conn.execute("select name from sqlite_temp_master").fetchall()
        assert temp == []
        # Called twice, and inside the caller's own transaction, which it leaves open.
        conn.execute("begin")
        assert budget_use(conn, rows) == budget_use(conn, rows)
        assert conn.in_transaction
        conn.execute("commit")
    finally:
        conn.close()


def test_budget_use_on_postgres_writes_nothing_and_leaves_the_transaction(
    postgres_log: str,
) -> None:
    """In a read-only transaction (as on a standby), in autocommit, and beside the table of
    published rows, which it neither reads nor changes."""
    config = load()
    rows = budget_rows(config.governance, configured_user_ids(config), NOW)
    other = [{**rows[0], "limit_value": 1.0}]
    with psycopg.connect(postgres_log, autocommit=True) as conn:
        published = conn.execute("select count(*) from budgets").fetchone()
        (use,) = budget_use(conn, other)
        assert use["limit"] == 1.0
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        conn.execute("begin read only")
        assert budget_use(conn, rows) == budget_use(conn, rows) == expected_use(rows)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("commit")
        assert conn.execute("select count(*) from budgets").fetchone() == published
        temp = conn.execute("select count(*) from pg_class where relpersistence = 't'").fetchone()
        assert temp == (0,)


def test_budget_use_on_a_log_older_than_the_budgets_table(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log that m005 has not reached (no bridge of this version has run on it)."""
    m005 = schema.MIGRATIONS.index(schema.m005_budgets)
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:m005])
        patch.setattr(schema, "SCHEMA_VERSION", m005)
        patch.setattr(schema, "WRITABLE_TABLES", schema.WRITABLE_TABLES[:-1])
        write_log(engine)
    tables = table_names(engine)
    assert {"interceptions", "token_usages"} <= tables and "budgets" not in tables
    config = load()
    rows = budget_rows(config.governance, configured_user_ids(config), NOW)
    assert use_of(engine, rows) == expected_use(rows)


def table_names(address: str) -> set[str]:
    if addresses.is_postgres(address):
        sql = "select tablename as name from pg_tables where schemaname = current_schema()"
    else:
        sql = "select name from sqlite_master where type = 'table'"
    return {r["name"] for r in read(address, sql)}


@pytest.mark.parametrize("missing", ["interceptions", "token_usages", "both"])
def test_budget_use_without_the_exchange_tables_is_an_error(engine: str, missing: str) -> None:
    """The query needs the exchanges: without them an error of the engine, not an empty answer
    (the command says "not an aibridge audit log" before it gets here)."""
    config = load()
    rows = budget_rows(config.governance, configured_user_ids(config), NOW)
    publish(engine, rows)
    drop = ["token_usages", "interceptions"] if missing == "both" else [missing]
    if addresses.is_postgres(engine):
        with psycopg.connect(engine, autocommit=True) as conn:
            for table in drop:
                conn.execute(f"drop table {table} cascade")
        errors: tuple[type[Exception], ...] = (psycopg.errors.UndefinedTable,)
    else:
        conn = sqlite3.connect(engine)
        for table in drop:
            conn.execute(f"drop table {table}")
        conn.close()
        errors = (sqlite3.OperationalError,)
    with pytest.raises(errors, match=r"interceptions|token_usages"):
        use_of(engine, rows)
    with pytest.raises(errors, match=r"interceptions|token_usages"):
        run_sql(engine)


def test_the_migration_makes_the_budgets_table(tmp_path: Path) -> None:
    rows = _table_info()
    assert [(r[1], r[2], r[5]) for r in rows] == [
        ("id", "TEXT", 1),
        ("scope", "TEXT", 0),
        ("owner", "TEXT", 0),
        ("members", "TEXT", 0),
        ("metric", "TEXT", 0),
        ("period", "TEXT", 0),
        ("limit_value", "REAL", 0),
        ("source", "TEXT", 0),
        ("time_zone", "TEXT", 0),
        ("period_start", "TEXT", 0),
        ("resets_at", "TEXT", 0),
        ("config_digest", "TEXT", 0),
        ("updated_at", "TEXT", 0),
    ]
    assert schema.BUDGETS in schema.WRITABLE_TABLES


def test_retention_keeps_the_published_budgets(tmp_path: Path) -> None:
    """Retention deletes old exchanges and their children; budgets refer to none of them."""
    db_path = tmp_path / "aibridge.db"
    write_log(db_path)
    config = load()
    rows = budget_rows(config.governance, configured_user_ids(config), NOW)
    publish(db_path, rows)
    report = prune(db_path, days=1, content_days=1, now=NOW + timedelta(days=400))
    assert report.deleted["interceptions"] == len(EXCHANGES)
    assert schema.BUDGETS not in report.deleted
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("select count(*) from interceptions").fetchone() == (0,)
        kept = conn.execute(f"select {', '.join(rows[0])} from budgets order by id").fetchall()
    finally:
        conn.close()
    assert kept == [tuple(r.values()) for r in rows]
    assert run_sql(db_path) == expected_use(rows, ())
    assert {r["spent"] for r in run_sql(db_path)} == {0}
