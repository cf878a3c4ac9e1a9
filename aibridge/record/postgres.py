"""The audit log in PostgreSQL: the store several bridges share (DESIGN.md §4).

The recorder's writer thread owns one connection (psycopg 3, autocommit, transactions by
hand as in SQLite) and writes each batch in one transaction, exactly as it does into SQLite;
this module is what differs:

- Migrations run under an advisory lock, so that bridges starting at once apply each one
  once; DDL is transactional here, so a failure leaves nothing half-made.
- Every write transaction takes a second advisory lock first. Row ids then increase in
  the order the transactions commit, as they do in SQLite (one writer at a time): a reader
  that saw id N has seen every row below it, which is what the budgets' watermark needs.
- A connection that breaks (restart, network cut, failover) is transient: the batch waits
  and is retried on a new connection, as a locked SQLite file is. TCP keepalives and a user
  timeout make a silent network cut an error within about half a minute.
- PostgreSQL is strict where SQLite is not: a NUL character is refused in text (and as
  ``\\u0000`` in jsonb), a bool is not an integer, a value of the wrong type is an error.
  A row that fails for its values is repaired (NUL and lone surrogates replaced with
  U+FFFD, a value that cannot be the column's type turned into text or dropped) rather than
  lost, and each repair is counted in `recorder_losses`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from aibridge.record import address as addresses
from aibridge.record import schema
from aibridge.record.sqlite import REASON_INVALID_UNICODE as REASON_INVALID_UNICODE
from aibridge.record.sqlite import without_lone_surrogates

try:
    import psycopg
    from psycopg import pq
    from psycopg.adapt import Dumper
except ImportError:  # pragma: no cover - the config refuses a URL without it
    psycopg = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Advisory lock keys (one bigint namespace per database): "aibridge" in ASCII, + 0 / + 1.
MIGRATION_LOCK: Final = 0x6169_6272_6964_6765
WRITE_LOCK: Final = MIGRATION_LOCK + 1

INSTALL_HINT: Final = "pip install 'aibridge[postgresql]'"

# Connection settings the bridge wants unless the URL says otherwise.
CONNECT_DEFAULTS: Final = {
    "connect_timeout": "10",
    "application_name": "aibridge",
    "keepalives": "1",
    "keepalives_idle": "15",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
# Per session: no statement or lock wait may hold a batch (and the write lock) for ever.
SESSION_SETTINGS: Final = (
    "set statement_timeout = '60s'",
    "set lock_timeout = '60s'",
    "set idle_in_transaction_session_timeout = '120s'",
)

REASON_NUL: Final = "NUL character replaced with U+FFFD"
REASON_NOT_OF_TYPE: Final = "value not of the column's type: dropped"
REASON_AS_TEXT: Final = "value not of the column's type: stored as text"

# SQLSTATE classes that mean "not now": connection, resources, operator intervention,
# system error, transaction rollback (serialization, deadlock); and single states.
_TRANSIENT_CLASSES: Final = frozenset({"08", "53", "57", "58", "40"})
_TRANSIENT_STATES: Final = frozenset({"55P03", "25006", "55006"})
# After these a new connection may succeed where this one cannot (a standby after failover).
_RECONNECT_STATES: Final = frozenset({"25006"})
# A JSON escape of NUL that is not itself escaped (an even run of backslashes before it).
_JSON_NUL: Final = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
_BIGINT: Final = range(-(2**63), 2**63)
# How long one batch's transaction may take before its connection is cut. TCP keepalives and
# tcp_user_timeout notice a network that drops packets, statement_timeout a slow server; this
# is for what neither sees: a middlebox (a pooler, a load balancer) that takes the bytes and
# never answers. The batch is then retried on a new connection, like any transient error.
WRITE_TIMEOUT: float = 90.0


class _Watchdog:
    """Cuts the connection of a transaction that outlives its deadline, from a thread of its
    own: the writer is blocked in the driver then, and only a socket shut under it wakes it."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._conn: Any = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.cuts = 0

    @contextlib.contextmanager
    def watching(self, conn: Any) -> Iterator[None]:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="aibridge-recorder-watchdog", daemon=True
                )
                self._thread.start()
            self._stopped = False
            self._conn = conn
            self._deadline = time.monotonic() + self.timeout
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None
                self._conn = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                conn, self._deadline = self._conn, None
                self.cuts += 1
                log.warning(
                    "audit database did not answer within %.0f s: cutting the connection "
                    "(the batch is retried on a new one)",
                    self.timeout,
                )
                with (
                    contextlib.suppress(OSError, ValueError, AttributeError),
                    socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock,
                ):
                    sock.shutdown(socket.SHUT_RDWR)


class _BoolAsBigint(Dumper if psycopg is not None else object):  # type: ignore[misc]
    """Booleans go into integer columns as 0/1, as SQLite stores them."""

    def dump(self, obj: bool) -> bytes:
        return b"1" if obj else b"0"


def require_driver() -> None:
    if psycopg is None:
        raise RuntimeError(f"a PostgreSQL audit log needs psycopg: {INSTALL_HINT}")


def check_address(address: str) -> None:
    """ValueError (with the password masked) if `address` is not a usable PostgreSQL URL."""
    require_driver()
    try:
        psycopg.conninfo.conninfo_to_dict(address)
    except psycopg.ProgrammingError as exc:
        raise ValueError(addresses.scrub(str(exc).strip(), address)) from None


def connect(address: str, **extra: Any) -> psycopg.Connection[Any]:
    """A connection in autocommit mode (transactions are opened by hand) with the bridge's
    defaults for what the URL leaves unsaid. Errors come with the password masked."""
    require_driver()
    try:
        given = psycopg.conninfo.conninfo_to_dict(address)
        options = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        conn = psycopg.connect(address, autocommit=True, **options, **extra)
    except psycopg.Error as exc:
        raise type(exc)(addresses.scrub(str(exc), address)) from None
    try:
        for statement in SESSION_SETTINGS:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


class ReaderError(RuntimeError):
    """A reading tool cannot open the log: one line naming it, the password masked."""


def reason_line(exc: BaseException, address: str) -> str:
    """The server's own words for `exc` (without the statement it quotes and its hints), on
    one line, the password masked."""
    reason: object = exc
    diag = getattr(exc, "diag", None)
    if getattr(exc, "sqlstate", None) and diag is not None and diag.message_primary:
        reason = diag.message_primary
    return addresses.scrub(" ".join(str(reason).split()), address)


def connect_snapshot(address: str) -> psycopg.Connection[Any]:
    """A connection for a tool that only reads (budgets, report, export): one repeatable-read,
    read-only snapshot, days and instants in UTC, never cut for idling (a reader paging an
    export). ReaderError when the driver is missing or the log cannot be reached."""
    where = addresses.display(address)
    try:
        require_driver()
    except RuntimeError as exc:
        raise ReaderError(f"{where}: {exc}") from None
    try:
        conn = connect(address)
    except psycopg.Error as exc:
        raise ReaderError(
            f"{where}: cannot connect to the audit log: {reason_line(exc, address)}"
        ) from None
    try:
        conn.execute("set time zone 'UTC'")
        conn.execute("set idle_in_transaction_session_timeout = 0")
        conn.execute("begin isolation level repeatable read read only")
    except psycopg.Error as exc:
        conn.close()
        raise ReaderError(
            f"{where}: cannot read the audit log: {reason_line(exc, address)}"
        ) from None
    return conn


def describe_error(exc: BaseException, address: str) -> str:
    """`exc` as one line naming the database, the password masked: for the command-line tools."""
    text = " ".join(addresses.scrub(str(exc), address).split())
    return f"{addresses.display(address)}: {type(exc).__name__}: {text}"


@contextlib.contextmanager
def locked_transaction(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction that holds the recorder's WRITE_LOCK: for tools that write beside live
    bridges (retention, cost backfill), one writer at a time as in SQLite, so that neither
    waits on row locks the other holds."""
    conn.execute("begin")
    try:
        conn.execute("select pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        yield
        conn.execute("commit")
    except BaseException:
        if not conn.closed and not conn.broken:
            with contextlib.suppress(psycopg.Error):
                conn.execute("rollback")
        raise


def is_transient(exc: BaseException) -> bool:
    """True when `exc` means PostgreSQL cannot take the batch now, so it may later."""
    if psycopg is None or not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        # Raised by the client: a connection lost or refused, or a closed connection used.
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def applied_migrations(conn: psycopg.Connection[Any]) -> list[str]:
    if conn.execute("select to_regclass(%s)", (schema.MIGRATIONS_TABLE,)).fetchone()[0] is None:
        return []
    rows = conn.execute(
        f'select name from "{schema.MIGRATIONS_TABLE}" order by applied_at, name'
    ).fetchall()
    return [r[0] for r in rows]


def migrate(conn: psycopg.Connection[Any]) -> None:
    """Bring the database up to the schema's history; one that is there is only read.

    Under an advisory lock and in one transaction: bridges starting at once wait for each
    other, and the second finds the work done."""
    known = [m.__name__ for m in schema.MIGRATIONS]
    done = set(applied_migrations(conn))
    if done.issuperset(known):
        _warn_newer(sorted(done - set(known)))
        return
    conn.execute("begin")
    try:
        conn.execute("select pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            f'create table if not exists "{schema.MIGRATIONS_TABLE}" '
            "(name text primary key, applied_at text not null)"
        )
        done = set(applied_migrations(conn))
        _warn_newer(sorted(done - set(known)))
        for fn in schema.MIGRATIONS:
            if fn.__name__ in done:
                continue
            for statement in schema.postgres_statements(fn):
                conn.execute(statement)
            conn.execute(
                f'insert into "{schema.MIGRATIONS_TABLE}" (name, applied_at) values (%s, %s)',
                (fn.__name__, _utc_now()),
            )
            log.info("applied schema migration %s (PostgreSQL)", fn.__name__)
        conn.execute("commit")
    except BaseException:
        if not conn.closed and conn.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.execute("rollback")
        raise


def _warn_newer(unknown: list[str]) -> None:
    if unknown:
        log.warning("database has migrations this version does not know: %s", unknown)


def column_types(conn: psycopg.Connection[Any]) -> dict[str, dict[str, str]]:
    """The writable columns of each table and their types (generated ones are not writable)."""
    rows = conn.execute(
        "select table_name, column_name, data_type from information_schema.columns "
        "where table_schema = current_schema() and is_generated = 'NEVER'"
    ).fetchall()
    types: dict[str, dict[str, str]] = {}
    for table, column, data_type in rows:
        types.setdefault(table, {})[column] = data_type
    return types


class PostgresStore:
    """The audit log in a PostgreSQL database, as the recorder's writer thread uses it."""

    placeholder: Final = "%s"

    def __init__(self, address: str) -> None:
        require_driver()
        self.address = address
        self.where = addresses.display(address)
        self._conn: psycopg.Connection[Any] | None = None
        self._watchdog = _Watchdog(WRITE_TIMEOUT)
        self._unanswered_xid: int | None = None
        self._types: dict[str, dict[str, str]] = {}
        self.columns: dict[str, frozenset[str]] = {}

    # ---- connection ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed and not conn.broken

    def open(self) -> None:
        conn = connect(self.address)
        try:
            conn.adapters.register_dumper(bool, _BoolAsBigint)
            migrate(conn)
            types = column_types(conn)
        except BaseException:
            conn.close()
            raise
        missing = [t for t in schema.WRITABLE_TABLES if t not in types]
        if missing:
            conn.close()
            raise RuntimeError(f"tables missing after migration: {', '.join(missing)}")
        self._conn = conn
        self._types = types
        self.columns = {t: frozenset(types[t]) for t in schema.WRITABLE_TABLES}

    def before_write(self) -> None:
        """Nothing to follow: a URL always names the same database."""

    def reopen(self) -> None:
        self.close()
        self.open()

    def should_reopen(self, exc: BaseException) -> bool:
        return not self.is_open or getattr(exc, "sqlstate", None) in _RECONNECT_STATES

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self._watchdog.stop()

    def describe(self, exc: BaseException) -> str:
        return addresses.scrub(f"{type(exc).__name__}: {exc}", self.address)

    def is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    # ---- transactions ----------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        conn = self._conn
        return (
            conn is not None
            and not conn.closed
            and conn.info.transaction_status != pq.TransactionStatus.IDLE
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        conn = self._connection()
        with self._watchdog.watching(conn):
            conn.execute("begin")
            try:
                row = conn.execute(
                    "select pg_advisory_xact_lock(%s), txid_current()", (WRITE_LOCK,)
                ).fetchone()
                yield
                self._unanswered_xid = row[1]
                self._commit(conn)
                self._unanswered_xid = None
            except BaseException:
                if not conn.closed and not conn.broken:
                    # The server answered: whatever it said, the outcome is known.
                    self._unanswered_xid = None
                    if self.in_transaction:
                        with contextlib.suppress(psycopg.Error):
                            conn.execute("rollback")
                raise

    def _commit(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("commit")

    @property
    def commit_unanswered(self) -> bool:
        """The last transaction's COMMIT was sent and the connection broke before the answer:
        it may have landed (see unanswered_commit_landed)."""
        return self._unanswered_xid is not None

    def unanswered_commit_landed(self) -> bool:
        """Whether the unanswered commit landed, asked of the server (txid_status) on the
        connection now open. Raises a transient error while that cannot be told yet."""
        xid = self._unanswered_xid
        if xid is None:
            return False
        try:
            status = self._connection().execute("select txid_status(%s)", (xid,)).fetchone()[0]
        except psycopg.errors.InvalidParameterValue:
            # "transaction ID ... is in the future": the server crashed before any record of
            # that transaction reached its disk and restarted without it, so its commit, if
            # any, did not survive: the batch is not in the database.
            self._unanswered_xid = None
            return False
        if status == "in progress":
            # The old session has not ended yet: ask again on the next attempt.
            raise psycopg.OperationalError("the outcome of the last commit is not known yet")
        self._unanswered_xid = None
        return bool(status == "committed")

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        conn = self._connection()
        conn.execute("savepoint rows")
        try:
            yield
        except BaseException:
            if self.in_transaction:
                conn.execute("rollback to savepoint rows")
                conn.execute("release savepoint rows")
            raise
        conn.execute("release savepoint rows")

    def before_rows(self, ops: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Nothing: prompt search is a generated column, kept by the server."""

    def after_rows(self, token: None) -> None:
        """Nothing (see before_rows)."""

    def write_rows(
        self,
        sql: str,
        params: Callable[[dict[str, Any]], tuple[Any, ...]],
        rows: list[dict[str, Any]],
    ) -> None:
        conn = self._connection()
        if len(rows) == 1:
            conn.execute(sql, params(rows[0]), prepare=True)
        else:
            with conn.cursor() as cursor:
                cursor.executemany(sql, map(params, rows))

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement outside the recorder's batches (tools such as aibridge.copy_log)."""
        cursor = self._connection().execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []

    def interceptions_present(
        self, ids: Collection[str], flow_ids: Collection[str]
    ) -> tuple[set[str], set[str]]:
        """Which of `ids` the log's interceptions hold, and which of `flow_ids` one of them was
        recorded from (replays, see the recorder); in the open transaction, which holds the
        write lock, so no other bridge can add one of them before this batch commits."""
        conn = self._connection()
        found: tuple[set[str], set[str]] = (set(), set())
        for column, values, into in (("id", ids, found[0]), ("flow_id", flow_ids, found[1])):
            if values:
                sql = f"select {column} from {schema.INTERCEPTIONS} where {column} = any(%s)"
                into.update(r[0] for r in conn.execute(sql, (list(values),)))
        return found

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            raise psycopg.OperationalError("the connection to the audit database is closed")
        return conn

    # ---- repairs -----------------------------------------------------------------------------

    def repair(
        self, table: str, row: dict[str, Any], exc: BaseException
    ) -> tuple[dict[str, Any], list[tuple[str, str]]] | None:
        """`row` made acceptable after it failed with `exc`, and (field, reason) for each
        change; None when `exc` is not about the row's values."""
        if not _is_about_values(exc):
            return None
        types = self._types.get(table, {})
        repaired = dict(row)
        notes: list[tuple[str, str]] = []
        for key, value in row.items():
            fixed, reasons = _fit(value, types.get(key, "text"))
            if reasons:
                repaired[key] = fixed
                notes.extend((str(key), reason) for reason in reasons)
        return (repaired, notes) if notes else None


def _is_about_values(exc: BaseException) -> bool:
    if isinstance(exc, UnicodeEncodeError):
        return True
    if psycopg is None or not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate is None:
        return isinstance(exc, psycopg.DataError)  # refused by the client (NUL in text)
    # Data exceptions, and a value of the wrong type for its column.
    return exc.sqlstate[:2] == "22" or exc.sqlstate == "42804"


def _fit(value: Any, data_type: str) -> tuple[Any, list[str]]:
    """`value` as the column can take it, and why it changed (empty: it did not)."""
    if value is None:
        return None, []
    if data_type in ("bigint", "integer", "smallint"):
        if isinstance(value, bool) or (isinstance(value, int) and value in _BIGINT):
            return value, []
        return None, [REASON_NOT_OF_TYPE]
    if data_type in ("double precision", "real", "numeric"):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value, []
        return None, [REASON_NOT_OF_TYPE]
    if data_type in ("jsonb", "json"):
        return _fit_json(value)
    if isinstance(value, str):
        return _clean_text(value)
    text, _ = _clean_text(str(value))
    return text, [REASON_AS_TEXT]


def _clean_text(text: str) -> tuple[str, list[str]]:
    reasons = []
    fixed = without_lone_surrogates(text)
    if fixed != text:
        reasons.append(REASON_INVALID_UNICODE)
    if "\x00" in fixed:
        fixed = fixed.replace("\x00", "\ufffd")
        reasons.append(REASON_NUL)
    return fixed, reasons


def _fit_json(value: Any) -> tuple[Any, list[str]]:
    if not isinstance(value, str):
        return None, [REASON_NOT_OF_TYPE]
    text, reasons = _clean_text(value)
    fixed = _JSON_NUL.sub(r"\1\\ufffd", text)
    if fixed != text:
        text = fixed
        if REASON_NUL not in reasons:
            reasons.append(REASON_NUL)
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        # Not JSON: kept whole, as a JSON string.
        return orjson.dumps(text).decode(), [*reasons, REASON_AS_TEXT]
    return text, reasons
