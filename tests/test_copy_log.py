"""Copying the audit log between engines (aibridge/copy_log.py): PostgreSQL to a SQLite file
datasette opens, and a SQLite log into a shared PostgreSQL database."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from aibridge.copy_log import CopyError, copy_log, main
from aibridge.governance.spend_log import open_spend_log
from aibridge.record import schema
from aibridge.record.recorder import Recorder
from tests.log_engines import pg_rows, read, sqlite_rows
from tests.postgres_server import PostgresServer
from tests.test_recorder_postgres import exchange

WAIT = 30.0
METADATA = Path(__file__).resolve().parent.parent / "aibridge" / "datasette" / "metadata.yaml"
EVERY_TABLE = {
    schema.INTERCEPTIONS: "id",
    schema.TOKEN_USAGES: "id",
    schema.USER_PROMPTS: "id",
    schema.TOOL_USAGES: "id",
    schema.MODEL_THOUGHTS: "id",
    schema.RECORDER_LOSSES: "id",
    schema.BUDGETS: "id",
}


def fill(address: str, n: int = 30) -> None:
    """A log with every table in use, JSON of every shape, and a repaired row."""
    rec = Recorder(address, linger=0)
    rec.start()
    for i in range(1, n + 1):
        exchange(rec, i, user=("alice", "bob", "carol")[i % 3])
    rec.insert(schema.MODEL_THOUGHTS, {"interception_id": "i1", "content": "thinking…"})
    rec.insert(
        schema.TOOL_USAGES, {"interception_id": "i2", "tool": "x", "args": '"just a string"'}
    )
    rec.insert(schema.TOOL_USAGES, {"interception_id": "i2", "tool": "y", "args": "[1, 2.5, null]"})
    rec.insert(schema.USER_PROMPTS, {"interception_id": "i3", "prompt": "with a NUL\x00 inside"})
    rec.upsert(
        schema.BUDGETS,
        {
            "id": "user:alice:usd:day",
            "scope": "user",
            "owner": "alice",
            "members": '["alice"]',
            "metric": "usd",
            "period": "day",
            "limit_value": 5.0,
            "updated_at": "t",
        },
    )
    rec.insert(schema.MODEL_THOUGHTS, {"interception_id": "missing", "content": "orphan"})
    assert rec.flush(WAIT)
    rec.close()


def everything(address: str) -> dict[str, list[dict[str, Any]]]:
    found = {}
    for table, key in EVERY_TABLE.items():
        rows = read(address, f"select * from {table} order by {key}")
        for row in rows:
            row.pop("prompt_search", None)
        found[table] = rows
    return found


def test_postgresql_to_sqlite_gives_the_same_log_with_search(
    postgres_url: str, tmp_path: Path
) -> None:
    fill(postgres_url)
    copy = tmp_path / "copy.db"
    report = copy_log(postgres_url, str(copy), batch_size=7)
    assert everything(str(copy)) == everything(postgres_url)
    assert report.copied[schema.INTERCEPTIONS] == 30
    assert report.refused == {} and report.repaired == {}
    # A real audit log: its own migrations, prompt search, JSON text as the recorder writes it.
    names = [r["name"] for r in sqlite_rows(str(copy), "select name from _migrations")]
    assert names == [m.__name__ for m in schema.MIGRATIONS]
    hits = sqlite_rows(
        str(copy),
        "select p.interception_id from user_prompts_fts f join user_prompts p on p.id = f.rowid "
        "where user_prompts_fts match 'refactor'",
    )
    assert len(hits) == 30
    args = [r["args"] for r in sqlite_rows(str(copy), "select args from tool_usages order by id")]
    assert args[-2:] == ['"just a string"', "[1,2.5,null]"]


def test_the_canned_queries_run_on_a_copy(postgres_url: str, tmp_path: Path) -> None:
    fill(postgres_url)
    copy = tmp_path / "copy.db"
    copy_log(postgres_url, str(copy))
    queries = yaml.safe_load(METADATA.read_text())["database"]["queries"]
    conn = sqlite3.connect(copy)
    ran = 0
    for query in queries.values():
        names = set(re.findall(r"(?<!:):([a-z_]+)", query["sql"]))
        params = {p: "alice" if "user" in p else "i1" for p in names}
        conn.execute(query["sql"], params).fetchall()
        ran += 1
    per_day = conn.execute(queries["usage_per_user_per_day"]["sql"]).fetchall()
    assert ran == len(queries) and len(per_day) == 3


def test_sqlite_to_postgresql_and_the_bridge_writes_on(postgres_url: str, tmp_path: Path) -> None:
    source = tmp_path / "single.db"
    fill(str(source))
    report = copy_log(str(source), postgres_url, batch_size=11)
    expected = everything(str(source))
    for row in expected[schema.USER_PROMPTS]:
        row["prompt"] = row["prompt"].replace("\x00", "\ufffd")  # PostgreSQL's one repair
    assert everything(postgres_url) == expected
    assert report.copied[schema.TOKEN_USAGES] == 30
    assert report.repaired == {
        (schema.USER_PROMPTS, "prompt", "NUL character replaced with U+FFFD"): 1
    }
    # The identity sequences moved past the copied ids: new rows do not collide.
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    exchange(rec, 31)
    assert rec.flush(WAIT)
    rec.close()
    ids = [r["id"] for r in pg_rows(postgres_url, "select id from token_usages order by id")]
    assert len(ids) == 31 and ids[-1] > ids[-2]
    spend = open_spend_log(postgres_url)
    seed = spend.seed({"day": ("2026-12-01T00:00:00.000Z", "2026-12-02T00:00:00.000Z")}, list)
    spend.close()
    assert seed.watermark == ids[-1]
    assert sum(usd for usd, _ in seed.per_user.values()) == pytest.approx(0.001 * sum(range(1, 32)))


def test_values_sqlite_took_and_postgresql_refuses_are_repaired(
    postgres_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "loose.db"
    fill(str(source), n=2)
    conn = sqlite3.connect(source)
    with conn:
        conn.execute("update interceptions set http_status = 'two hundred' where id = 'i1'")
        conn.execute("update interceptions set metadata = 'not json' where id = 'i2'")
        conn.execute("update user_prompts set prompt = ? where id = 1", ("nul \x00 here",))
    conn.close()
    report = copy_log(str(source), postgres_url)
    assert report.copied[schema.INTERCEPTIONS] == 2
    assert report.refused == {}
    assert set(report.repaired) == {
        (schema.INTERCEPTIONS, "http_status", "value not of the column's type: dropped"),
        (schema.INTERCEPTIONS, "metadata", "value not of the column's type: stored as text"),
        (schema.USER_PROMPTS, "prompt", "NUL character replaced with U+FFFD"),
    }
    rows = pg_rows(postgres_url, "select id, http_status, metadata from interceptions order by id")
    assert rows == [
        {"id": "i1", "http_status": None, "metadata": {"request_bytes": 101}},
        {"id": "i2", "http_status": 200, "metadata": "not json"},
    ]


def test_a_destination_in_use_is_refused(postgres_url: str, tmp_path: Path) -> None:
    fill(postgres_url, n=3)
    source = tmp_path / "single.db"
    fill(str(source), n=3)
    with pytest.raises(CopyError, match="already holds 3 exchanges"):
        copy_log(str(source), postgres_url)
    with pytest.raises(CopyError, match="already exists"):
        copy_log(postgres_url, str(source))
    with pytest.raises(CopyError, match="the same"):
        copy_log(str(source), str(source))


def test_sources_that_are_not_logs(tmp_path: Path, postgres_url: str) -> None:
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("create table notes (id integer primary key)")
    with pytest.raises(CopyError, match="not an aibridge audit log"):
        copy_log(str(other), str(tmp_path / "copy.db"))
    with pytest.raises(CopyError, match="no such database"):
        copy_log(str(tmp_path / "missing.db"), str(tmp_path / "copy.db"))
    with pytest.raises(CopyError, match="not an aibridge audit log"):
        copy_log(postgres_url, str(tmp_path / "copy.db"))  # an empty database


def test_an_unreachable_or_refusing_server_is_named_without_its_password(
    postgres_server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.postgres_server import free_port

    source = tmp_path / "single.db"
    fill(str(source), n=1)
    urls = [
        f"postgresql://aibridge:pw-one-secret@127.0.0.1:{free_port()}/x?connect_timeout=3",
        postgres_server.url("postgres").replace("aibridge@", "aibridge:pw-two-secret@"),
    ]
    for url in urls:
        assert main([str(source), url]) == 2
        assert main([url, str(tmp_path / "c.db")]) == 2
    err = capsys.readouterr().err
    assert "pw-one-secret" not in err and "pw-two-secret" not in err
    assert err.count("aibridge:***@127.0.0.1") == 4
    assert not (tmp_path / "c.db").exists() or (tmp_path / "c.db").stat().st_size == 0


def test_the_command_says_what_it_copied(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(postgres_url, n=4)
    assert main([postgres_url, str(tmp_path / "copy.db"), "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "copied interceptions 4, token_usages 4, user_prompts 5" in out
    assert postgres_url.split("@")[1] in out
