"""The audit log opened for reading, on either engine: a SQLite file (read-only connection) or
a PostgreSQL URL (a read-only, repeatable-read transaction: one snapshot for a whole report).

What the readers need of the difference between the engines is here: the placeholder, the
catalog (tables, views and their columns), a text form of a time column for a date range,
and rows streamed in batches (PostgreSQL: a server-side cursor). Every error is one line that
names the log and never its password.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Final, Self

from aibridge.record import address as addresses
from aibridge.record import schema

# The first report view (migration m006): a log without it was never opened by a bridge that
# has them.
FIRST_VIEW: Final = schema.REPORT_VIEWS[0][0]
# Columns that hold JSON text in SQLite (PostgreSQL says so itself: jsonb).
SQLITE_JSON_COLUMNS: Final = frozenset({"metadata", "usage", "args", "members"})
_PG_JSON_TYPES: Final = frozenset({"json", "jsonb"})
BUSY_TIMEOUT_MS: Final = 10_000


class ReadError(Exception):
    """The log cannot be read; the message says which file or database and why (one line, no
    password)."""


@dataclass(frozen=True, slots=True)
class DateRange:
    """UTC days, both ends included."""

    since: date
    until: date

    @property
    def start(self) -> str:
        """The first instant, as text that ISO 8601 timestamps and days compare with."""
        return self.since.isoformat()

    @property
    def end(self) -> str:
        """The day after the last (excluded): `start <= t < end` holds the whole last day,
        whatever the precision of `t`."""
        return (self.until + timedelta(days=1)).isoformat()


def parse_day(text: str) -> date:
    """YYYY-MM-DD, nothing else (``date.fromisoformat`` also takes 20250601 and weeks)."""
    if len(text) != 10 or text[4] != "-" or text[7] != "-":
        raise ValueError(f"not a date (YYYY-MM-DD): {text!r}")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date (YYYY-MM-DD): {text!r}") from None


@dataclass(frozen=True, slots=True)
class Relation:
    name: str
    kind: str  # "table" or "view"
    columns: dict[str, str]  # name -> declared type, lower case ("" when SQLite has none)


class Source:
    """A read-only view of the log at `address`; use as a context manager."""

    def __init__(self, address: str, conn: Any, postgres: bool) -> None:
        self.address = address
        self.where = addresses.display(address)
        self.postgres = postgres
        self.mark = "%s" if postgres else "?"
        self._conn = conn
        self._relations: dict[str, Relation] | None = None

    @classmethod
    def open(cls, address: str) -> Self:
        if addresses.is_postgres(address):
            return cls(address, _open_postgres(address), True)
        path = Path(address)
        if not path.exists():
            raise ReadError(
                f"{address}: no such database (the bridge creates it when it starts; "
                "--db names another file or a postgresql:// URL)"
            )
        if not path.is_file():
            raise ReadError(f"{address}: not a file")
        try:
            conn = connect_readonly_sqlite(path)
        except sqlite3.Error as e:
            raise ReadError(f"{address}: cannot open the audit log: {e}") from None
        return cls(address, conn, False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()

    # --- errors ------------------------------------------------------------------------------

    def error(self, exc: BaseException, doing: str = "cannot read the audit log") -> ReadError:
        """`exc` as a ReadError: one line, the server's own words, the password masked."""
        from aibridge.record.postgres import reason_line

        return ReadError(f"{self.where}: {doing}: {reason_line(exc, self.address)}")

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Driver errors inside become ReadError."""
        try:
            yield
        except ReadError:
            raise
        except (sqlite3.Error, *_pg_errors()) as e:
            raise self.error(e) from None

    # --- the catalog -------------------------------------------------------------------------

    def relations(self) -> dict[str, Relation]:
        """Tables and views of the log, by name."""
        if self._relations is None:
            with self.reading():
                self._relations = self._read_relations()
        return self._relations

    def _read_relations(self) -> dict[str, Relation]:
        found: dict[str, Relation] = {}
        if self.postgres:
            kinds = dict(
                self._conn.execute(
                    "select table_name, case table_type when 'VIEW' then 'view' "
                    "else 'table' end from information_schema.tables "
                    "where table_schema = current_schema()"
                ).fetchall()
            )
            columns: dict[str, dict[str, str]] = {name: {} for name in kinds}
            for table, column, data_type in self._conn.execute(
                "select table_name, column_name, data_type from information_schema.columns "
                "where table_schema = current_schema() order by table_name, ordinal_position"
            ):
                if table in columns:
                    columns[table][column] = data_type.lower()
            for name, kind in kinds.items():
                found[name] = Relation(name, kind, columns[name])
            return found
        for name, kind in self._conn.execute(
            "select name, type from sqlite_master where type in ('table', 'view')"
        ).fetchall():
            cols = {
                r[1]: (r[2] or "").lower()
                for r in self._conn.execute(f'pragma table_info("{_ident(name)}")')
            }
            found[name] = Relation(name, kind, cols)
        return found

    def require_log(self) -> None:
        if schema.INTERCEPTIONS not in self.relations():
            raise ReadError(f"{self.where}: not an aibridge audit log (no interceptions table)")

    def require_views(self) -> None:
        """The report views exist, else say how to get them."""
        self.require_log()
        if FIRST_VIEW in self.relations():
            return
        last = self._last_migration()
        had = f" (its schema ends at {last})" if last else ""
        raise ReadError(
            f"{self.where}: this log is older than the report views{had}: start the bridge "
            "(this version of aibridge) on it once, which migrates it to migration "
            "m006_report_views or later, then run this again"
        )

    def _last_migration(self) -> str | None:
        if schema.MIGRATIONS_TABLE not in self.relations():
            return None
        with self.reading():
            names = [
                r[0] for r in self._conn.execute(f"select name from {schema.MIGRATIONS_TABLE}")
            ]
        return max(names) if names else None

    def time_text(self, relation: Relation, column: str, alias: str = "") -> str:
        """SQL for `column` as text that compares with DateRange.start/end: PostgreSQL views
        give days as date and instants as timestamptz (UTC in this session)."""
        ref = f'{alias}"{_ident(column)}"'
        if self.postgres and relation.columns.get(column) not in ("text", "character varying"):
            return f"cast({ref} as text)"
        return ref

    def is_json(self, relation: Relation | None, column: str) -> bool:
        if self.postgres:
            return relation is not None and relation.columns.get(column) in _PG_JSON_TYPES
        return column in SQLITE_JSON_COLUMNS

    # --- rows --------------------------------------------------------------------------------

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """All rows of `sql` (small results: a report's aggregates)."""
        with self.reading():
            cur = self._conn.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    @contextlib.contextmanager
    def stream(
        self, sql: str, params: tuple[Any, ...] = (), size: int = 1000
    ) -> Iterator[tuple[list[str], Iterator[tuple[Any, ...]]]]:
        """The column names of `sql` and an iterator over its rows, fetched `size` at a time
        (PostgreSQL: through a server-side cursor), so that a big log never sits in memory."""
        with self.reading():
            if self.postgres:
                cur = self._conn.cursor(name="aibridge_export")
                cur.itersize = size
            else:
                cur = self._conn.cursor()
            try:
                cur.execute(sql, params)
                names = [d[0] for d in cur.description]
                yield names, self._batches(cur, size)
            finally:
                with contextlib.suppress(Exception):
                    cur.close()

    def _batches(self, cur: Any, size: int) -> Iterator[tuple[Any, ...]]:
        while True:
            with self.reading():
                batch = cur.fetchmany(size)
            if not batch:
                return
            yield from batch


def connect_readonly_sqlite(path: Path) -> sqlite3.Connection:
    from aibridge.record.sqlite import connect_readonly

    conn = connect_readonly(path, busy_timeout_ms=BUSY_TIMEOUT_MS)
    # Text that is not UTF-8 (written by some other tool) is read, not an error.
    conn.text_factory = lambda raw: raw.decode("utf-8", "replace")
    # One snapshot for all the statements of a report or an export.
    conn.execute("begin")
    return conn


def _open_postgres(address: str) -> Any:
    from aibridge.record import postgres

    try:
        return postgres.connect_snapshot(address)
    except postgres.ReaderError as e:
        raise ReadError(str(e)) from None


def _pg_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - only SQLite then
        return ()
    return (psycopg.Error,)


def _ident(name: str) -> str:
    return name.replace('"', '""')
