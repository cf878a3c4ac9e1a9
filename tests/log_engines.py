"""The audit log on both engines, for tests: the ``engine`` fixture (an empty log's address on
SQLite, then on PostgreSQL) and readers that give the same Python values from either."""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from aibridge.record import address as addresses

JSON_COLUMNS = {"metadata", "usage", "args", "members"}


def pg_rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def sqlite_rows(path: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def read(address: str, sql: str) -> list[dict[str, Any]]:
    """Rows of `sql` on either engine, JSON columns as Python values (jsonb comes back parsed,
    SQLite's JSON text is parsed here), so that the two can be compared."""
    if addresses.is_postgres(address):
        return pg_rows(address, sql)
    rows = sqlite_rows(address, sql)
    for row in rows:
        for column in JSON_COLUMNS & row.keys():
            if isinstance(row[column], str):
                row[column] = orjson.loads(row[column])
    return rows


def losses(address: str) -> dict[tuple[str, str | None, str], int]:
    rows = read(address, "select table_name, field, reason, rows from recorder_losses")
    found: dict[tuple[str, str | None, str], int] = {}
    for r in rows:
        key = (r["table_name"], r["field"], r["reason"])
        found[key] = found.get(key, 0) + r["rows"]
    return found


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The address of an empty audit log on each engine in turn."""
    if request.param == "sqlite":
        return str(tmp_path / "aibridge.db")
    return str(request.getfixturevalue("postgres_url"))


def with_password(url: str, password: str) -> str:
    """`url` with `password` in it (quoted), as a config or --db may give it."""
    parts = urllib.parse.urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
