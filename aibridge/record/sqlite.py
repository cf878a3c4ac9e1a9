"""The audit log in a SQLite file, as the recorder's writer thread uses it (DESIGN.md §4).

Rows go in through plain sqlite3 `executemany` on statements the recorder builds once per
table and column set; sqlite-utils only creates and migrates the schema (it re-reads the
schema on every write, which costs more than the write). WAL, a busy timeout, foreign keys.

What only a file has:
- SQLite refuses writes for a while (locked, disk full, read-only): those errors are
  transient; a connection that opened the file read-only (or lost it) is reopened.
- The file is deleted, moved away or replaced (`mv new.db aibridge.db`) while open: the
  connection would go on writing into a file no one will read. Before each write the path
  is compared with the file opened there (device and inode); on a change the store says so
  once and reopens the path, creating and migrating it if need be, so the batch goes to the
  new file. The old file's -wal and -shm are removed first: SQLite would otherwise replay
  that WAL into whatever file now holds the name. Deleting only the -wal or -shm is not a
  change of database and is left alone: the connection keeps its WAL open and checkpoints
  it into the main file (see reopen).
- Prompt search is an FTS5 table the store fills per batch, in the batch's transaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Final

import sqlite_utils

from aibridge.record import schema

log = logging.getLogger(__name__)

REASON_INVALID_UNICODE: Final = "invalid Unicode replaced with U+FFFD"

# SQLite primary result codes that say "not now" rather than "not this row".
_TRANSIENT_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
# A connection that opened the file read-only (or lost it) stays that way;
# only a new connection sees the file writable again.
_REOPEN_CODES: Final = frozenset(
    {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}
)
# Names SQLite gives the open file's companions: path + suffix.
_SIDE_SUFFIXES: Final = ("-wal", "-shm")
# Paths that name no file: sqlite3 keeps these databases in memory or in a hidden temp file.
_NOT_A_FILE: Final = frozenset({"", ":memory:"})
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# Ids looked up per statement (interceptions_present).
_PRESENT_CHUNK: Final = 500


def without_lone_surrogates(text: str) -> str:
    """`text` with U+FFFD for each lone surrogate (undecodable bytes kept by surrogateescape),
    which no UTF-8 writer takes: SQLite's binding, PostgreSQL, orjson."""
    return _SURROGATE.sub("\ufffd", text)


FileId = tuple[int, int]  # (st_dev, st_ino): which file a path names right now


def _primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_transient(exc: BaseException) -> bool:
    """True when `exc` means SQLite cannot write now, so the same rows may succeed later."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = _primary_code(exc)
    if code is not None:
        return code in _TRANSIENT_CODES
    message = str(exc).lower()
    return any(s in message for s in ("locked", "readonly", "read-only", "disk", "unable to open"))


def _file_id(path: str) -> FileId | None:
    """The file `path` names now; None if it names none (deleted, or mid-rename).

    Any other OSError (no permission to look) is raised: that is not an answer.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def known_file_id(path: str) -> FileId | None:
    """_file_id, None when it cannot be told: a -wal or -shm whose identity is unknown is
    never ours to remove; a log the budgets reader cannot look at is read again."""
    try:
        return _file_id(path)
    except OSError:
        return None


def connect_readonly(
    path: str | os.PathLike[str], *, busy_timeout_ms: int, **options: Any
) -> sqlite3.Connection:
    """A connection that cannot write to the log at `path` (the tools and readers beside a
    live bridge), waiting up to `busy_timeout_ms` for the writer's lock."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, **options)
    try:
        conn.execute(f"pragma busy_timeout = {int(busy_timeout_ms)}")
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteStore:
    """The audit log in one SQLite file."""

    placeholder: Final = "?"

    def __init__(self, path: str, *, busy_timeout_ms: int = 5000) -> None:
        self.address = path
        self.where = path
        self.busy_timeout_ms = busy_timeout_ms
        self._db: sqlite_utils.Database | None = None
        # The files the connection has open, as their paths named them at open time.
        self._db_file: FileId | None = None
        self._side_files: dict[str, FileId | None] = {}
        self.columns: dict[str, frozenset[str]] = {}

    # ---- connection ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def open(self) -> None:
        if sqlite3.sqlite_version_info < (3, 24, 0):  # INSERT ... ON CONFLICT DO UPDATE
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} is too old: the audit log needs 3.24 or newer"
            )
        path = self.address
        conn = sqlite3.connect(path, timeout=self.busy_timeout_ms / 1000)
        try:
            # SQLite opened (or created) the file in connect(); Python cannot fstat its
            # descriptor, so the path is looked at at once instead.
            db_file = _file_id(path)
            db = sqlite_utils.Database(conn, execute_plugins=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            db.enable_wal()
            if db.journal_mode != "wal":
                log.warning("audit database %s is not in WAL mode", path)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            schema.migrate(db)
            self.columns = {t: frozenset(db.table(t).columns_dict) for t in schema.WRITABLE_TABLES}
        except BaseException:
            conn.close()
            raise
        self._db = db
        self._db_file = db_file
        # In WAL mode both exist now: the migration check read through them.
        self._side_files = {path + s: known_file_id(path + s) for s in _SIDE_SUFFIXES}

    def _file_change(self) -> str | None:
        """How the path stopped naming the open file ("deleted", "replaced"), or None."""
        if self.address in _NOT_A_FILE:
            return None
        try:
            now = _file_id(self.address)
        except OSError as exc:
            # Cannot tell (e.g. a directory lost its permissions): keep what works.
            log.debug("cannot stat the audit database %s: %s", self.address, exc)
            return None
        if now is None:
            return "deleted"
        return None if now == self._db_file else "replaced"

    def before_write(self) -> None:
        """Reopen the path if it no longer names the file the connection writes to.

        One stat per batch (about a microsecond).
        """
        change = self._file_change()
        if change is not None:
            self.reopen(change)

    def reopen(self, change: str | None = None) -> None:
        """Close the connection and open the path again.

        `change` is how the path stopped naming the open file, if the caller knows. The
        old connection is closed before the new one opens: within a process SQLite shares
        locks and the WAL index by file. Closing checkpoints what it can into the old file
        (so a file moved away keeps its rows), but SQLite leaves the -wal and -shm of a
        moved file at the path; they are removed if still ours, or the next open would
        replay that WAL into the file that now holds the name.
        """
        if change is None and self._db is not None:
            change = self._file_change()
        stale: list[str] = []
        if change is not None:
            if change == "deleted":
                log.warning(
                    "audit database %s was deleted while open: recreating it, later rows go there",
                    self.address,
                )
            else:
                log.warning(
                    "audit database %s was replaced by another file: "
                    "writing to that one from now on",
                    self.address,
                )
            # Judged while our connection holds them, so an equal id is our own file.
            stale = [p for p, ours in self._side_files.items() if ours and known_file_id(p) == ours]
        self.close()
        for path in stale:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s of the old audit database: %s", path, exc)
        self.open()

    def should_reopen(self, exc: BaseException) -> bool:
        return _primary_code(exc) in _REOPEN_CODES or self._db is None

    def close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        try:
            # Readers (datasette) may hold the WAL open; a passive checkpoint
            # moves what it can without waiting for them.
            db.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.debug("checkpoint on close failed: %s", exc)
        try:
            db.conn.close()
        except sqlite3.Error as exc:
            log.warning("closing the audit database failed: %s", exc)

    def describe(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}"

    def is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    # ---- transactions ----------------------------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        db = self._db
        assert db is not None
        return db.conn

    @property
    def in_transaction(self) -> bool:
        return self._db is not None and self._db.conn.in_transaction

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            with conn:
                yield
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """Undo what the block wrote if it raises, keeping the enclosing transaction."""
        conn = self._conn
        conn.execute("SAVEPOINT rows")
        try:
            yield
        except BaseException:
            # Some errors end the whole transaction, savepoint included; cleaning up
            # then would hide the error with "no such savepoint".
            if conn.in_transaction:
                conn.execute("ROLLBACK TO rows")
                conn.execute("RELEASE rows")
            raise
        conn.execute("RELEASE rows")

    def before_rows(self, ops: list[tuple[str, str, dict[str, Any]]]) -> int | None:
        """The largest prompt id before the batch, if it has prompts (see after_rows)."""
        if any(op[1] == schema.USER_PROMPTS for op in ops):
            return int(self._conn.execute(schema.LAST_PROMPT_ID).fetchone()[0])
        return None

    def after_rows(self, last_prompt_id: int | None) -> None:
        """The batch's prompts into the search index: the rows above the id before it (the
        batch holds the write lock, so they are exactly its own)."""
        if last_prompt_id is not None:
            self._conn.execute(schema.INDEX_NEW_PROMPTS, (last_prompt_id,))

    def write_rows(
        self,
        sql: str,
        params: Callable[[dict[str, Any]], tuple[Any, ...]],
        rows: list[dict[str, Any]],
    ) -> None:
        conn = self._conn
        if len(rows) == 1:
            conn.execute(sql, params(rows[0]))
        else:
            conn.executemany(sql, map(params, rows))

    # A local file answers every commit: its outcome is never in doubt.
    commit_unanswered: Final = False

    def unanswered_commit_landed(self) -> bool:
        return False

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement outside the recorder's batches (tools such as aibridge.copy_log)."""
        return self._conn.execute(sql, params).fetchall()

    def interceptions_present(
        self, ids: Collection[str], flow_ids: Collection[str]
    ) -> tuple[set[str], set[str]]:
        """Which of `ids` the log's interceptions hold, and which of `flow_ids` one of them was
        recorded from (replays, see the recorder); in the open transaction."""
        conn = self._conn
        found: tuple[set[str], set[str]] = (set(), set())
        for column, values, into in (("id", ids, found[0]), ("flow_id", flow_ids, found[1])):
            wanted = list(values)
            # Within SQLite's smallest limit on a statement's parameters (999 before 3.32).
            for i in range(0, len(wanted), _PRESENT_CHUNK):
                chunk = wanted[i : i + _PRESENT_CHUNK]
                sql = (
                    f"select {column} from {schema.INTERCEPTIONS} "
                    f"where {column} in ({', '.join('?' * len(chunk))})"
                )
                into.update(r[0] for r in conn.execute(sql, chunk))
        return found

    def repair(
        self, table: str, row: dict[str, Any], exc: BaseException
    ) -> tuple[dict[str, Any], list[tuple[str, str]]] | None:
        """sqlite3 cannot bind a str holding lone surrogates (undecodable bytes, as mitmproxy
        keeps them in header values): the row with U+FFFD in their place."""
        if not isinstance(exc, UnicodeEncodeError):
            return None
        repaired = dict(row)
        notes = []
        for key, value in row.items():
            if isinstance(value, str):
                fixed = without_lone_surrogates(value)
                if fixed != value:
                    repaired[key] = fixed
                    notes.append((str(key), REASON_INVALID_UNICODE))
        return repaired, notes
