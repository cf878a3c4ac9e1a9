"""Reading spend from the audit log (DESIGN §9): the totals of the current periods, and the
rows the log gained since the last read. Read-only, on a connection of its own: several
bridges writing one file (or one PostgreSQL database) agree because each reads what all of
them wrote.

The rows gained are those above a watermark, the last ``token_usages`` id read. That holds
because ids grow in commit order: SQLite has one writer at a time, and in PostgreSQL every
recorder transaction takes the same advisory lock (aibridge.record.postgres.WRITE_LOCK).

Spend is ``token_usages.estimated_cost_usd``, tokens are ``total_tokens``, each counted in
the period in which its interception started, for interceptions paid with the bridge's own
provider keys (``credential_kind = 'centralized'``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from aibridge.governance.ledger import Use
from aibridge.governance.periods import Period
from aibridge.record import address as addresses
from aibridge.record.sqlite import FileId, connect_readonly, known_file_id

PAID_BY_THE_BRIDGE = "centralized"

_NEW_ROWS = """
select t.id, t.interception_id, i.initiator_id, i.started_at,
       coalesce(t.estimated_cost_usd, 0), coalesce(t.total_tokens, 0)
from token_usages t join interceptions i on i.id = t.interception_id
where t.id > {mark} and i.credential_kind = 'centralized' and i.initiator_id is not null
  {text_only}
order by t.id
"""
# SQLite's columns take any type; PostgreSQL's started_at is text by its declaration.
_TEXT_ONLY = "and typeof(i.started_at) = 'text'"
_NEWEST = "select coalesce(max(id), 0) from token_usages"

_CONFIRMED = """
select distinct interception_id from token_usages
where interception_id in (select value from json_each(?))
"""


def _colon(name: str) -> str:
    return f":{name}"


def _pyformat(name: str) -> str:
    return f"%({name})s"


def period_sums_sql(periods: tuple[Period, ...], param: Callable[[str], str] = _colon) -> str:
    """One row per user: (user, USD and tokens for each period in `periods`), for periods
    given as <period>_start / <period>_end parameters (written by `param`: SQLite's
    ``:name``, psycopg's ``%(name)s``)."""
    columns = ",\n".join(
        f"""coalesce(sum(case when i.started_at >= {param(p + "_start")}
                   and i.started_at < {param(p + "_end")} then t.estimated_cost_usd end), 0),
       coalesce(sum(case when i.started_at >= {param(p + "_start")}
                   and i.started_at < {param(p + "_end")} then t.total_tokens end), 0)"""
        for p in periods
    )
    return f"""
select i.initiator_id,
       {columns}
from interceptions i join token_usages t on t.interception_id = i.id
where i.started_at >= {param("earliest")} and i.started_at < {param("latest")}
  and i.credential_kind = 'centralized' and i.initiator_id is not null
group by i.initiator_id
"""


@dataclass(frozen=True, slots=True)
class Seed:
    per_user: dict[tuple[str, Period, str], tuple[float, float]]
    confirmed: list[str]
    watermark: int


class SpendLog:
    """The log, read for governance. Not thread-safe: one thread owns it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._file: FileId | None = None  # (device, inode) of the file last seeded
        self.watermark = 0  # the last token_usages id read

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect_readonly(
                self.path, busy_timeout_ms=2000, isolation_level=None, check_same_thread=False
            )
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def seed(
        self, windows: Mapping[Period, tuple[str, str]], pending_ids: Callable[[], list[str]]
    ) -> Seed:
        """Totals of the current periods (`windows`: period → (start, end) as recorded), in one
        snapshot with the pending ids it holds already and the newest row id.

        The pending ids are taken once the snapshot is open: an exchange pending after that
        cannot be in it, one pending before is looked up in it."""
        self.close()  # a fresh connection: the file may have been replaced since
        self._file = known_file_id(self.path)
        conn = self._connection()
        conn.execute("begin")
        try:
            watermark = conn.execute(_NEWEST).fetchone()[0]
            ids = pending_ids()
            sql = period_sums_sql(tuple(windows))
            per_user = _per_user(conn.execute(sql, _window_params(windows)), windows)
            confirmed = [r[0] for r in conn.execute(_CONFIRMED, (_json_list(ids),))] if ids else []
        finally:
            conn.execute("commit")
        self.watermark = watermark
        return Seed(per_user, confirmed, watermark)

    def new_uses(self, limit: int = 50_000) -> list[Use] | None:
        """The uses the log gained since the last read, or None when it must be read whole
        again (its rows were renumbered: the file was replaced or emptied)."""
        if known_file_id(self.path) != self._file:
            # Replaced (mv new.db aibridge.db), deleted or recreated since the last seed (or
            # never seeded): an open connection still reads the old file, and the watermark
            # says nothing about the new one.
            self.close()
            return None
        conn = self._connection()
        conn.execute("begin")
        try:
            newest = conn.execute(_NEWEST).fetchone()[0]
            if newest < self.watermark:
                return None
            uses: list[Use] = []
            last = self.watermark
            for row_id, interception_id, user_id, started_at, usd, tokens in conn.execute(
                _NEW_ROWS.format(mark="?", text_only=_TEXT_ONLY) + f" limit {int(limit)}",
                (self.watermark,),
            ):
                last = row_id
                uses.append(Use(interception_id, user_id, started_at, float(usd), int(tokens)))
            # Rows that are not the bridge's spend still move the mark past them.
            self.watermark = newest if len(uses) < limit else last
        finally:
            conn.execute("commit")
        return uses


def _json_list(items: list[str]) -> str:
    return orjson.dumps(items).decode()


def _window_params(windows: Mapping[Period, tuple[str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for period, (start, end) in windows.items():
        params[f"{period}_start"], params[f"{period}_end"] = start, end
    params["earliest"] = min(start for start, _ in windows.values())
    params["latest"] = max(end for _, end in windows.values())
    return params


def _per_user(
    rows: Iterable[Sequence[Any]],
    windows: Mapping[Period, tuple[str, str]],
) -> dict[tuple[str, Period, str], tuple[float, float]]:
    periods = tuple(windows)
    per_user: dict[tuple[str, Period, str], tuple[float, float]] = {}
    for row in rows:
        for n, period in enumerate(periods):
            usd, tokens = row[1 + 2 * n], row[2 + 2 * n]
            if usd or tokens:
                per_user[(row[0], period, windows[period][0])] = (float(usd), float(tokens))
    return per_user


class PostgresSpendLog:
    """The log in PostgreSQL, read for governance; the same answers as SpendLog. Not
    thread-safe: one thread owns it. Errors carry no password."""

    def __init__(self, address: str) -> None:
        self.path = address
        self._conn: Any = None
        self._table: int | None = None  # the oid of token_usages when last seeded
        self.watermark = 0

    def _connection(self) -> Any:
        from aibridge.record import postgres

        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            self._conn = postgres.connect(self.path)
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Any]:
        """One consistent view of the log, read-only; its errors with the password masked."""
        conn = None
        try:
            conn = self._connection()
            conn.execute("begin isolation level repeatable read read only")
            try:
                yield conn
            finally:
                if not conn.closed and not conn.broken:
                    conn.execute("commit")
        except Exception as exc:
            self.close()
            raise RuntimeError(addresses.scrub(f"{type(exc).__name__}: {exc}", self.path)) from None

    def seed(
        self, windows: Mapping[Period, tuple[str, str]], pending_ids: Callable[[], list[str]]
    ) -> Seed:
        """As SpendLog.seed."""
        with self._snapshot() as conn:
            self._table = conn.execute("select 'token_usages'::regclass::oid").fetchone()[0]
            watermark = conn.execute(_NEWEST).fetchone()[0]
            ids = pending_ids()
            sql = period_sums_sql(tuple(windows), _pyformat)
            per_user = _per_user(conn.execute(sql, _window_params(windows)), windows)
            confirmed = (
                [
                    r[0]
                    for r in conn.execute(
                        "select distinct interception_id from token_usages "
                        "where interception_id = any(%s)",
                        (ids,),
                    )
                ]
                if ids
                else []
            )
        self.watermark = watermark
        return Seed(per_user, confirmed, watermark)

    def new_uses(self, limit: int = 50_000) -> list[Use] | None:
        """As SpendLog.new_uses; the log must be read whole again when token_usages is not
        the table last seeded (dropped and made again) or its ids went back."""
        with self._snapshot() as conn:
            table = conn.execute("select 'token_usages'::regclass::oid").fetchone()[0]
            newest = conn.execute(_NEWEST).fetchone()[0]
            if table != self._table or newest < self.watermark:
                return None
            uses: list[Use] = []
            last = self.watermark
            sql = _NEW_ROWS.format(mark="%s", text_only="") + f" limit {int(limit)}"
            for row_id, interception_id, user_id, started_at, usd, tokens in conn.execute(
                sql, (self.watermark,)
            ):
                last = row_id
                uses.append(Use(interception_id, user_id, started_at, float(usd), int(tokens)))
            self.watermark = newest if len(uses) < limit else last
        return uses


def open_spend_log(address: str) -> SpendLog | PostgresSpendLog:
    """The reader for the log at `address`: a PostgreSQL URL, else a SQLite path."""
    if addresses.is_postgres(address):
        return PostgresSpendLog(address)
    return SpendLog(address)
