"""``python -m aibridge report`` (aibridge/reading/report.py) and the dispatcher
(aibridge/__main__.py), on a log the real bridge wrote (tests/test_datasette_queries.py's
build_usage_log), read from its SQLite file and from a PostgreSQL copy of it (python -m
aibridge.copy_log). Every number is checked against SQL on the base tables, written here
independently of the views the report reads."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from aibridge.__main__ import COMMANDS
from aibridge.copy_log import copy_log
from aibridge.reading import report
from aibridge.reading.source import DateRange, parse_day
from aibridge.record import schema
from aibridge.record.recorder import Recorder
from devtools.mitmdump_process import REPO
from tests.log_engines import engine, with_password
from tests.postgres_server import PostgresServer, database_name
from tests.test_datasette_queries import UsageLog, build_usage_log

__all__ = ["engine"]

ALL_DAYS = ("2025-05-31", "2025-06-02")  # the log's days (SCHEDULE)
NOTHING_DAYS = ("2024-01-01", "2024-12-31")


# --- the log, on both engines ------------------------------------------------------------------


@pytest.fixture(scope="module")
def usage_log(tmp_path_factory: pytest.TempPathFactory) -> UsageLog:
    return build_usage_log(tmp_path_factory.mktemp("usage-log"))


def copy_to_postgres(server: PostgresServer, source: Path, hint: str) -> tuple[str, str]:
    """A new database holding a copy of the SQLite log `source`, made by the real command;
    (its URL without the password, its name)."""
    name = database_name(hint)
    url = server.create_database(name)
    done = subprocess.run(
        [sys.executable, "-m", "aibridge.copy_log", str(source), url],
        cwd=REPO,
        env={**_env(), "PGPASSWORD": server.password},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return url, name


@pytest.fixture(scope="module")
def pg_log(postgres_server: PostgresServer, usage_log: UsageLog) -> Iterator[str]:
    url, name = copy_to_postgres(postgres_server, usage_log.db_path, "reading_report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSWORD", postgres_server.password)
        yield url
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def address(request: pytest.FixtureRequest, usage_log: UsageLog) -> str:
    """The same log on each engine in turn."""
    if request.param == "sqlite":
        return str(usage_log.db_path)
    return str(request.getfixturevalue("pg_log"))


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aibridge", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_main(
    capsys: pytest.CaptureFixture[str], *args: str, now: datetime | None = None
) -> tuple[int, str, str]:
    code = report.main(list(args), now=now)
    out, err = capsys.readouterr()
    return code, out, err


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run_main(capsys, *args, "--json")
    assert code == 0, err
    return orjson.loads(out)


# --- what the base tables say --------------------------------------------------------------------


def base_rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def exchanges(db: Path, since: str, until: str, user: str | None = None) -> list[dict[str, Any]]:
    """Every interception that started on the days since..until, with its usage summed in
    Python (no view, no SQL aggregate)."""
    rows = base_rows(
        db,
        "select id, started_at, coalesce(initiator_id, '(unauthenticated)') as who, api, "
        "coalesce(model, '(none)') as model, status, error, credential_kind from interceptions",
    )
    usage = base_rows(db, "select * from token_usages")
    out = []
    for r in rows:
        if not since <= (r["started_at"] or "")[:10] <= until:
            continue
        if user is not None and r["who"] != user:
            continue
        mine = [u for u in usage if u["interception_id"] == r["id"]]
        priced = [u["estimated_cost_usd"] for u in mine if u["estimated_cost_usd"] is not None]
        paid = r["credential_kind"] not in ("subscription", "client")
        r |= {
            "input": sum(u["input_tokens"] or 0 for u in mine),
            "cached": sum(u["cache_read_input_tokens"] or 0 for u in mine),
            "output": sum(u["output_tokens"] or 0 for u in mine),
            "cost": sum(priced) if priced else None,
            "unpriced": sum(1 for u in mine if u["estimated_cost_usd"] is None and paid),
        }
        out.append(r)
    return out


def expected_groups(
    found: list[dict[str, Any]], *key: str
) -> dict[tuple[Any, ...], dict[str, Any]]:
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in found:
        g = groups.setdefault(
            tuple(r[k] for k in key),
            {"requests": 0, "input": 0, "cached": 0, "output": 0, "cost": None, "unpriced": 0},
        )
        g["requests"] += 1
        for k in ("input", "cached", "output", "unpriced"):
            g[k] += r[k]
        if r["cost"] is not None:
            g["cost"] = (g["cost"] or 0) + r["cost"]
    return groups


def shown(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": row["requests"],
        "input": row["input_tokens"],
        "cached": row["cached_input_tokens"],
        "output": row["output_tokens"],
        "cost": row["estimated_cost_usd"],
        "unpriced": row["unpriced_responses"],
    }


def same(found: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Counts exactly; costs to the micro-dollar (the views round each day's sum to 6 places)."""
    assert {k: v for k, v in found.items() if k != "cost"} == {
        k: v for k, v in wanted.items() if k != "cost"
    }
    if wanted["cost"] is None:
        assert found["cost"] is None
    else:
        assert found["cost"] == pytest.approx(wanted["cost"], abs=5e-6)


def failed(r: dict[str, Any]) -> bool:
    return r["status"] not in ("completed", "in_progress") or (
        r["status"] == "completed" and r["error"] is not None
    )


def check_against_base(
    data: dict[str, Any], db: Path, since: str, until: str, user: str | None
) -> None:
    found = exchanges(db, since, until, user)
    people = expected_groups(found, "who")
    assert {(r["user"],) for r in data["per_person"]} == set(people)
    for row in data["per_person"]:
        same(shown(row), people[(row["user"],)])
    models = expected_groups(found, "api", "model")
    assert {(r["api"], r["model"]) for r in data["per_model"]} == set(models)
    for row in data["per_model"]:
        same(shown(row), models[(row["api"], row["model"])])
    days = expected_groups([{**r, "day": r["started_at"][:10]} for r in found], "day")
    assert [r["day"] for r in data["per_day"]] == sorted(k[0] for k in days)
    for row in data["per_day"]:
        same(shown(row), days[(row["day"],)])
        assert row["users"] == len({r["who"] for r in found if r["started_at"][:10] == row["day"]})
    nothing = {"requests": 0, "input": 0, "cached": 0, "output": 0, "cost": None, "unpriced": 0}
    same(shown(data["totals"]), expected_groups(found).get((), nothing))
    ids = {r["id"] for r in found}
    calls: dict[tuple[str, str], int] = {}
    for u in base_rows(db, "select * from tool_usages"):
        if u["interception_id"] in ids:
            calls[(u["tool"], u["type"])] = calls.get((u["tool"], u["type"]), 0) + 1
    assert {(t["tool"], t["type"]): t["calls"] for t in data["top_tools"]} == calls
    bad = [r for r in found if failed(r)]
    assert data["failures"]["requests"] == len(bad)
    by: dict[tuple[str, str | None], int] = {}
    for r in bad:
        by[(r["status"], r["error"])] = by.get((r["status"], r["error"]), 0) + 1
    assert {(f["status"], f["error"]): f["requests"] for f in data["failures"]["by_status"]} == by
    newest = sorted(bad, key=lambda r: (r["started_at"], r["id"]), reverse=True)[:5]
    assert [f["interception_id"] for f in data["failures"]["recent"]] == [r["id"] for r in newest]


# --- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "until", "user"),
    [
        (*ALL_DAYS, None),
        ("2025-06-01", "2025-06-01", None),
        ("2025-06-01", "2025-06-02", None),
        (*ALL_DAYS, "alice"),
        (*ALL_DAYS, "bob"),
        (*ALL_DAYS, "(unauthenticated)"),
        ("2025-05-31", "2025-05-31", "bob"),
    ],
)
def test_numbers_equal_sql_on_the_base_tables(
    capsys: pytest.CaptureFixture[str],
    usage_log: UsageLog,
    address: str,
    since: str,
    until: str,
    user: str | None,
) -> None:
    args = ["--db", address, "--since", since, "--until", until]
    if user is not None:
        args += ["--user", user]
    data = report_json(capsys, *args)
    assert (data["since"], data["until"], data["user"]) == (since, until, user)
    check_against_base(data, usage_log.db_path, since, until, user)
    assert data["per_person"], "the log has exchanges on each of these selections"


def test_both_engines_give_the_same_report(
    capsys: pytest.CaptureFixture[str], usage_log: UsageLog, pg_log: str
) -> None:
    on = {}
    for where in (str(usage_log.db_path), pg_log):
        data = report_json(capsys, "--db", where, "--since", ALL_DAYS[0], "--until", ALL_DAYS[1])
        data.pop("database")
        on[where] = data
    assert on[str(usage_log.db_path)] == on[pg_log]


def test_the_totals_are_the_sum_of_the_people_and_of_the_days(
    capsys: pytest.CaptureFixture[str], usage_log: UsageLog
) -> None:
    data = report_json(capsys, "--db", str(usage_log.db_path), "--since", "2025-01-01")
    assert data["totals"]["requests"] == 21  # every exchange of SCHEDULE that went through
    for part in ("per_person", "per_day"):
        for key in ("requests", "input_tokens", "cached_input_tokens", "output_tokens"):
            assert sum(r[key] for r in data[part]) == data["totals"][key]
        total = sum(r["estimated_cost_usd"] or 0 for r in data[part])
        assert total == pytest.approx(data["totals"]["estimated_cost_usd"], abs=1e-6)


# --- date ranges -------------------------------------------------------------------------------


EDGES = {
    # interception (by its SCHEDULE index) -> its new start, on or around 2025-06-01
    2: "2025-06-01T00:00:00.000Z",  # the first instant of the day
    3: "2025-06-01T23:59:59.999999+00:00",  # the last
    4: "2025-05-31T23:59:59.999Z",  # the day before, by a millisecond
    5: "2025-06-02T00:00:00.000Z",  # the day after
}


@pytest.fixture
def edged_log(usage_log: UsageLog, tmp_path: Path) -> Path:
    """The log with four exchanges moved onto the edges of 2025-06-01."""
    db = tmp_path / "edges.db"
    shutil.copy(usage_log.db_path, db)
    conn = sqlite3.connect(db)
    with conn:
        for i, at in EDGES.items():
            conn.execute(
                "update interceptions set started_at = ? where id = ?", (at, usage_log.ids[i])
            )
    conn.close()
    return db


@pytest.mark.parametrize("engine_name", ["sqlite", "postgresql"])
def test_both_ends_of_a_range_are_whole_days_included(
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    usage_log: UsageLog,
    edged_log: Path,
    engine_name: str,
) -> None:
    where = str(edged_log)
    if engine_name == "postgresql":
        where = str(request.getfixturevalue("postgres_url"))
        copy_log(str(edged_log), where)
    one_day = report_json(capsys, "--db", where, "--since", "2025-06-01", "--until", "2025-06-01")
    check_against_base(one_day, edged_log, "2025-06-01", "2025-06-01", None)
    [day] = one_day["per_day"]
    assert day["day"] == "2025-06-01"
    moved_in = exchanges(edged_log, "2025-06-01", "2025-06-01")
    ids = {r["id"] for r in moved_in}
    assert {usage_log.ids[2], usage_log.ids[3]} <= ids
    assert not {usage_log.ids[4], usage_log.ids[5]} & ids
    assert day["requests"] == len(moved_in)
    before = report_json(capsys, "--db", where, "--since", "2025-05-31", "--until", "2025-05-31")
    check_against_base(before, edged_log, "2025-05-31", "2025-05-31", None)


@pytest.mark.parametrize(
    ("since", "until", "user"),
    [
        (*NOTHING_DAYS, None),  # long before
        ("2025-06-03", "2025-06-30", None),  # the day after the last
        ("2025-05-30", "2025-05-30", None),  # the day before the first
        (*ALL_DAYS, "nobody"),  # no such person
        (*ALL_DAYS, "Alice"),  # ids are compared exactly
    ],
)
def test_a_selection_with_nothing_says_none_in_every_section(
    capsys: pytest.CaptureFixture[str], address: str, since: str, until: str, user: str | None
) -> None:
    args = ["--db", address, "--since", since, "--until", until]
    args += [] if user is None else ["--user", user]
    data = report_json(capsys, *args)
    assert data["totals"] == {
        "requests": 0,
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
        "estimated_cost_usd": None,
        "unpriced_responses": 0,
        "subscription_responses": 0,
    }
    for part in ("per_person", "per_model", "per_day", "top_tools"):
        assert data[part] == []
    assert data["failures"] == {"requests": 0, "by_status": [], "recent": []}
    code, out, _ = run_main(capsys, *args)
    assert code == 0
    assert out.count("\n  none\n") == 6, out


def test_the_default_range_is_the_last_30_days_counting_today(
    capsys: pytest.CaptureFixture[str], usage_log: UsageLog
) -> None:
    db = str(usage_log.db_path)
    at = datetime(2025, 6, 29, 23, 59, tzinfo=UTC)  # 2025-05-31 is 30 days back, counted
    data = orjson.loads(run_main(capsys, "--db", db, "--json", now=at)[1])
    assert (data["since"], data["until"]) == ("2025-05-31", "2025-06-29")
    assert data["totals"]["requests"] == 21
    later = datetime(2025, 6, 30, 0, 0, tzinfo=UTC)  # now 2025-05-31 falls out
    data = orjson.loads(run_main(capsys, "--db", db, "--json", now=later)[1])
    assert data["since"] == "2025-06-01"
    assert data["totals"]["requests"] == len(
        exchanges(usage_log.db_path, "2025-06-01", "2025-06-30")
    )
    only_since = orjson.loads(
        run_main(capsys, "--db", db, "--json", "--since", "2025-06-02", now=at)[1]
    )
    assert (only_since["since"], only_since["until"]) == ("2025-06-02", "2025-06-29")
    only_until = orjson.loads(
        run_main(capsys, "--db", db, "--json", "--until", "2025-06-01", now=at)[1]
    )
    assert (only_until["since"], only_until["until"]) == ("2025-05-03", "2025-06-01")


def test_date_range_text_bounds() -> None:
    rng = DateRange(date(2025, 12, 31), date(2025, 12, 31))
    assert (rng.start, rng.end) == ("2025-12-31", "2026-01-01")
    leap = DateRange(date(2024, 2, 28), date(2024, 2, 29))
    assert leap.end == "2024-03-01"


@pytest.mark.parametrize(
    "text",
    [
        "2025-13-01",
        "2025-02-30",
        "2025-00-10",
        "yesterday",
        "20250601",
        "2025-6-1",
        "2025-06-01T00:00",
        "2025-W22-1",
        " 2025-06-01",
        "",
        "\u0662\u0660\u0662\u0665-\u0660\u0666-\u0660\u0661",  # Arabic-Indic digits
    ],
)
def test_a_bad_date_is_refused_with_exit_2(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with pytest.raises(ValueError, match="not a date"):
        parse_day(text)
    for option in ("--since", "--until"):
        with pytest.raises(SystemExit) as stopped:
            report.main(["--db", "x.db", option, text])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}: not a date (YYYY-MM-DD)" in err


def test_a_range_that_ends_before_it_starts_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for since, until in (("2025-06-02", "2025-06-01"), ("2026-01-01", "2025-12-31")):
        with pytest.raises(SystemExit) as stopped:
            report.main(["--db", "x.db", "--since", since, "--until", until])
        assert stopped.value.code == 2
        assert f"--since {since} is after --until {until}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        report.main(["--db", "x.db", "--top", "0"])
    assert stopped.value.code == 2


# --- text --------------------------------------------------------------------------------------


def section(out: str, title: str) -> list[str]:
    lines = out.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(title))
    body = []
    for line in lines[start + 1 :]:
        if not line:
            break
        body.append(line)
    return body


def test_the_text_report_from_a_real_subprocess(usage_log: UsageLog) -> None:
    done = run_cli(
        "report", "--db", str(usage_log.db_path), "--since", ALL_DAYS[0], "--until", ALL_DAYS[1]
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(
        f"aibridge report, {ALL_DAYS[0]} to {ALL_DAYS[1]} (UTC days, both included), everyone\n"
        f"log: {usage_log.db_path}\n"
    )
    people = section(out, "Per person")
    assert people[0].split() == [
        "user",
        "requests",
        "input",
        "cached",
        "output",
        "cost",
        "unpriced",
    ]
    # Right-aligned numbers: every line of a table is as long as its header.
    for title in ("Totals", "Per person", "Per model", "Per day"):
        lines = section(out, title)
        if title == "Totals":
            lines = lines[:2]
        assert len({len(line) for line in lines}) == 1, lines
    found = exchanges(usage_log.db_path, *ALL_DAYS)
    for who, g in expected_groups(found, "who").items():
        [line] = [row for row in people[1:] if row.split()[0] == who[0]]
        assert f" {g['input']:,} " in line
        assert f" {g['output']:,} " in line
        cost = "-" if g["cost"] is None else report.dollars(round(g["cost"], 6))
        assert f" {cost} " in line
    assert any("2,048" in line for line in section(out, "Per model"))  # thousands separators
    tools = section(out, "Top tools")
    assert [line.split()[0] for line in tools[1:]] == ["Bash", "get_weather"]
    failures = section(out, "Failures by status and error")
    assert failures[0].split() == ["status", "error", "requests", "last", "at"]
    assert any(line.split()[0] == "rejected" and " 2  " in line for line in failures)
    assert len(section(out, "Most recent failures")) == 1 + 5


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        (0, "$0.00"),
        (0.0123, "$0.0123"),
        (0.00001234, "<$0.0001"),
        (0.0001, "$0.0001"),
        (1234.5, "$1,234.5000"),
        (1_000_000.123456, "$1,000,000.1235"),
    ],
)
def test_dollars(value: float | None, text: str) -> None:
    assert report.dollars(value) == text


@pytest.mark.parametrize(
    "hostile",
    [
        "\x1b[31mred\x1b[0m",  # colours
        "\x1b]0;new title\x07",  # a terminal title
        "line one\nfake row  1  $9.99",  # a line of its own
        "back\rover",  # carriage return overwrites the line
        "\x9b2J",  # C1 CSI: clears some terminals
        "bell\x07 and del\x7f and nul\x00",
        "x" * 500,  # a kilobyte error message
    ],
)
def test_text_from_the_log_cannot_drive_the_terminal(
    capsys: pytest.CaptureFixture[str], usage_log: UsageLog, tmp_path: Path, hostile: str
) -> None:
    db = tmp_path / "hostile.db"
    shutil.copy(usage_log.db_path, db)
    conn = sqlite3.connect(db)
    with conn:
        # An upstream error text and a client's model name are the provider's and client's words.
        conn.execute(
            "update interceptions set error = ?, model = ? where id = ?",
            (hostile, hostile, usage_log.ids[8]),
        )
        conn.execute("update tool_usages set tool = ?", (hostile,))
    conn.close()
    code, out, _ = run_main(capsys, "--db", str(db), "--since", ALL_DAYS[0], "--until", ALL_DAYS[1])
    assert code == 0
    assert not any(ch in out for ch in "\x1b\x07\r\x9b\x7f\x00")
    assert not any(line.startswith("fake row") for line in out.splitlines())
    assert max(len(line) for line in out.splitlines()) < 400
    data = report_json(capsys, "--db", str(db), "--since", ALL_DAYS[0], "--until", ALL_DAYS[1])
    assert hostile in {f["error"] for f in data["failures"]["by_status"]}  # JSON keeps it whole


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("a\nb", "a\\x0ab"),
        ("\x1b[1m", "\\x1b[1m"),
        ("\u0085next", "\\x85next"),
        ("ok ünïcode ✓", "ok ünïcode ✓"),
        ("y" * 61, "y" * 59 + "…"),
        (None, ""),
        (429, "429"),
    ],
)
def test_cell(value: Any, text: str) -> None:
    assert report.cell(value) == text


# --- logs that cannot be reported --------------------------------------------------------------


def test_an_empty_log_on_either_engine(capsys: pytest.CaptureFixture[str], engine: str) -> None:
    rec = Recorder(engine, linger=0)
    rec.start()
    rec.close()
    data = report_json(capsys, "--db", engine, "--since", "2025-01-01", "--until", "2025-12-31")
    assert data["totals"]["requests"] == 0
    assert data["per_person"] == data["per_model"] == data["per_day"] == data["top_tools"] == []
    code, out, _ = run_main(capsys, "--db", engine)
    assert code == 0
    assert out.count("\n  none\n") == 6


def _drop_report_views(address: str) -> None:
    views = [name for name, *_ in schema.REPORT_VIEWS]
    if address.startswith("postgresql://"):
        with psycopg.connect(address, autocommit=True) as conn:
            for name in views:
                conn.execute(f"drop view if exists {name} cascade")
            conn.execute("delete from _migrations where name >= 'm006'")
        return
    conn = sqlite3.connect(address)
    with conn:
        for name in views:
            conn.execute(f"drop view if exists {name}")
        conn.execute("delete from _migrations where name >= 'm006'")
    conn.close()


def test_a_log_older_than_the_report_views_says_what_to_do(
    capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    rec = Recorder(engine, linger=0)
    rec.start()
    rec.close()
    _drop_report_views(engine)
    code, out, err = run_main(capsys, "--db", engine)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "older than the report views (its schema ends at m005_budgets)" in err
    assert "start the bridge" in err
    assert "m006_report_views" in err


def test_what_is_not_a_log_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("create table notes (x)")
    conn.close()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not SQLite\n" * 100)
    cases = {
        str(tmp_path / "missing.db"): "no such database",
        str(tmp_path / "missing-dir" / "x.db"): "no such database",
        str(tmp_path): "not a file",
        str(other): "not an aibridge audit log",
        str(garbage): "cannot read the audit log",
    }
    for where, says in cases.items():
        code, out, err = run_main(capsys, "--db", where)
        assert code == 2, where
        assert out == ""
        assert err.startswith(f"error: {where}: ") and err.count("\n") == 1, err
        assert says in err
        assert "Traceback" not in err


def test_a_missing_log_from_a_real_subprocess(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    done = run_cli("report", "--db", str(missing))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {missing}: no such database (the bridge creates it when it starts; --db names "
        "another file or a postgresql:// URL)"
    ]


def test_the_config_names_the_log(tmp_path: Path, usage_log: UsageLog) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"database: {usage_log.db_path}\n"
        "providers:\n  - {name: openai, type: openai, base_url: 'http://127.0.0.1:9/v1', "
        "api_key: unused}\n"
        "users:\n  - {id: alice, token: a-long-enough-token}\n"
    )
    done = run_cli("report", "--config", str(config), "--since", "2025-01-01", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["totals"]["requests"] == 21
    broken = tmp_path / "broken.yaml"
    broken.write_text("database: [\n")
    done = run_cli("report", "--config", str(broken))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


# --- PostgreSQL: a password is never shown -----------------------------------------------------


def test_a_postgresql_url_with_its_password_is_read_and_never_printed(
    pg_log: str, postgres_server: PostgresServer
) -> None:
    secret = postgres_server.password
    url = with_password(pg_log, secret)
    env = _env()  # no PGPASSWORD: the URL's password is the one that works
    done = run_cli("report", "--db", url, "--since", ALL_DAYS[0], "--until", ALL_DAYS[1], env=env)
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    assert f"log: {pg_log.replace('aibridge@', 'aibridge:***@')}\n" in done.stdout
    done = run_cli("report", "--db", url, "--json", env=env)
    assert done.returncode == 0
    assert secret not in done.stdout
    assert orjson.loads(done.stdout)["database"] == pg_log.replace("aibridge@", "aibridge:***@")
    wrong = "Wr0ng-p@ss:word/?#"
    done = run_cli("report", "--db", with_password(pg_log, wrong), env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert wrong not in done.stderr and "Wr0ng" not in done.stderr
    assert done.stderr.startswith("error: postgresql://aibridge:***@127.0.0.1:")
    assert "cannot connect to the audit log" in done.stderr
    assert done.stderr.count("\n") == 1


# --- the dispatcher ----------------------------------------------------------------------------


def test_the_dispatcher_lists_every_command() -> None:
    for args in ((), ("--help",), ("-h",), ("help",)):
        done = run_cli(*args)
        assert done.returncode == 0, args
        assert done.stdout.startswith("usage: python -m aibridge COMMAND")
        listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
        assert listed == ["report", "export", "budgets", "retention", "cost", "copy-log"]
        assert list(COMMANDS) == listed


@pytest.mark.parametrize("command", ["nope", "reports", "Report", "--db", "budgets.py", ""])
def test_an_unknown_command_is_exit_2_with_the_usage(command: str) -> None:
    done = run_cli(command)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("usage: python -m aibridge COMMAND")
    assert f"error: unknown command {command!r}" in done.stderr


@pytest.mark.parametrize(
    ("command", "prog"),
    [
        ("report", "python -m aibridge report"),
        ("export", "python -m aibridge export"),
        ("budgets", "python -m aibridge.budgets"),
        ("retention", "python -m aibridge.retention"),
        ("cost", "python -m aibridge.cost"),
        ("copy-log", "python -m aibridge.copy_log"),
    ],
)
def test_each_command_is_its_module(command: str, prog: str) -> None:
    done = run_cli(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {prog} ")


def test_the_forwarded_commands_keep_their_exit_codes(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    for args in (
        ("cost", "--db", str(missing)),
        ("retention", "--db", str(missing), "--days", "1"),
        ("copy-log", str(missing), str(tmp_path / "copy.db")),
    ):
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert str(missing) in done.stderr
    done = run_cli("budgets", "--config", str(tmp_path / "none.yaml"))
    assert done.returncode == 2
