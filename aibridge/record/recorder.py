"""The single writer of the audit database (DESIGN.md §4).

Hooks run on mitmproxy's event loop and must never wait for SQLite, so they only
append to an in-memory queue. One thread owns the connection (sqlite-utils
objects cannot cross threads), takes whatever is queued, and writes it in one
transaction per batch. Rows go in through plain sqlite3 `executemany` on statements
built once per table and column set; sqlite-utils only creates and migrates the
schema (it re-reads the schema on every write, which costs more than the write).

A writer woken for a few rows lingers (`linger` seconds) so that light but steady
traffic shares a transaction rather than paying one per flow; it never lingers
while flush() or close() waits, nor once `batch_size` rows are queued.

Cases it handles:
- SQLite refuses writes for a while (locked, disk full, read-only): the batch is
  kept and retried with backoff; hooks keep enqueueing meanwhile.
- The queue outgrows `max_queue` while writes are refused: past half of it, the
  oldest rows lose their large content field (prompt, thought, tool arguments);
  past all of it, the oldest prompt and thought rows are dropped whole.
  Interceptions, token usages and tool usages (who used what) are never dropped,
  only a tool usage's arguments. Every loss is counted into `recorder_losses` and
  logged with its count.
- A row SQLite rejects (constraint, bad value): the batch is written row by row so
  that only that row is lost, and the loss is recorded with its reason. A string
  that is not valid Unicode (header bytes that are not UTF-8) is written with
  U+FFFD in place of the bad bytes, and that repair is recorded too.
- Closing waits for the queue to drain, up to a time limit: a database that stays
  locked must not keep the proxy from shutting down. What is left is logged.
- The file is deleted, moved away or replaced (`mv new.db aibridge.db`) while open: the
  connection would go on writing into a file no one will read. Before each write the
  path is compared with the file opened there (device and inode); on a change the
  recorder says so once and reopens the path, creating and migrating it if need be,
  so the batch goes to the new file. The old file's -wal and -shm are removed first:
  SQLite would otherwise replay that WAL into whatever file now holds the name.
  Deleting only the -wal or -shm is not a change of database and is left alone: the
  connection keeps its WAL open and checkpoints it into the main file (see _reopen).
"""

from __future__ import annotations

import contextlib
import decimal
import logging
import operator
import os
import re
import sqlite3
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from typing import Any, Final

import orjson
import sqlite_utils

from aibridge.record import schema

log = logging.getLogger(__name__)

# How much lower than the proxy's the writer thread's CPU priority is (nice levels).
WRITER_NICENESS = 10

INSERT: Final = "insert"
UPSERT: Final = "upsert"

REASON_CONTENT_SHED: Final = "queue overflow: content dropped"
REASON_ROW_SHED: Final = "queue overflow: row dropped"
REASON_INVALID_UNICODE: Final = "invalid Unicode replaced with U+FFFD"
# Rows that may be dropped whole once their content is gone: they say nothing else.
_ROW_SHEDDABLE: Final = frozenset({schema.USER_PROMPTS, schema.MODEL_THOUGHTS})
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# How long close() waits for a database that refuses writes, by default.
CLOSE_TIMEOUT: Final = 60.0

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
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 2.0
# Stored as JSON text (orjson), as sqlite-utils stored them when it wrote our rows.
_JSON_TYPES: Final = (dict, list, tuple)
# Values sqlite3 binds as they are; any other type goes through _to_sql first.
_BINDABLE: Final = frozenset({str, int, float, bool, bytes, type(None)})
# Statements kept per (kind, table, columns); our rows come in a handful of shapes,
# so the limit only guards against a caller that varies its key order endlessly.
_STATEMENTS_MAX: Final = 256

# Names SQLite gives the open file's companions: path + suffix.
_SIDE_SUFFIXES: Final = ("-wal", "-shm")
# Paths that name no file: sqlite3 keeps these databases in memory or in a hidden temp file.
_NOT_A_FILE: Final = frozenset({"", ":memory:"})

# A queue entry: [seq, kind, table, row]; row None means it was shed whole.
_SEQ, _KIND, _TABLE, _ROW = 0, 1, 2, 3

LossKey = tuple[str, str | None, str]  # (table_name, field or None for the row, reason)
# A prepared write: the SQL, and how to take its parameters from a row dict.
Statement = tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]]]
FileId = tuple[int, int]  # (st_dev, st_ino): which file a path names right now


class RecorderError(Exception):
    """The audit database cannot be used at all (start-up)."""


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


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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


class Recorder:
    """Queue rows from any thread; one background thread writes them to SQLite."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_queue: int = 100_000,
        batch_size: int = 1000,
        busy_timeout_ms: int = 5000,
        linger: float = 0.05,
    ) -> None:
        if max_queue < 2 or batch_size < 1 or busy_timeout_ms < 0 or not linger >= 0:
            raise ValueError(
                "need max_queue >= 2, batch_size >= 1, busy_timeout_ms >= 0, linger >= 0"
            )
        self.path = os.fspath(path)
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.busy_timeout_ms = busy_timeout_ms
        self.linger = linger
        self._shed_content_above = max_queue // 2

        # Shared between producers and the writer; guarded by _lock, which is
        # only ever held for O(1) work by producers and O(batch) by the writer.
        self._lock = threading.Lock()
        self._pending: deque[list[Any]] = deque()
        self._with_content: deque[list[Any]] = deque()  # entries still carrying content
        self._sheddable: deque[list[Any]] = deque()  # entries of content tables
        self._seq = 0  # last sequence number handed out
        self._taken = 0  # last sequence number the writer took
        self._live = 0  # pending rows not shed whole
        self._losses: Counter[LossKey] = Counter()
        self._overflow_logged = False
        self._accepting = True
        self._closing = False
        self._ignored_after_close = 0

        self._wakeup = threading.Event()
        # Cuts a linger short: set by flush(), close() and a queue of batch_size rows.
        self._urgent = threading.Event()
        self._flush_waiters = 0  # flush() calls waiting now; changes under _lock
        self._done = threading.Condition()
        self._completed = 0  # every seq up to this one is committed or accounted as lost

        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._abandon = False

        # Owned by the writer thread.
        self._db: sqlite_utils.Database | None = None
        # The files the connection has open, as their paths named them at open time.
        self._db_file: FileId | None = None
        self._side_files: dict[str, FileId | None] = {}
        self._columns: dict[str, frozenset[str]] = {}
        self._statements: dict[tuple[str, str, tuple[str, ...]], Statement] = {}
        self._carried: Counter[LossKey] = Counter()  # losses not yet in the database

        # Counters: the first two change under _lock, the rest only in the writer.
        self._shed_rows = 0
        self._stripped = 0
        self._written = 0
        self._batches = 0
        self._retries = 0
        self._lost_rows = 0
        # Why the database refuses the batch being retried now (None: it is not refusing).
        self._refusing: str | None = None

    # ---- producer side -------------------------------------------------------

    def insert(self, table: str, row: dict[str, Any]) -> None:
        """Queue `row` for insertion into `table`. The recorder owns `row` from now on."""
        self._enqueue(INSERT, table, row)

    def upsert(self, table: str, row: dict[str, Any]) -> None:
        """Queue an upsert by primary key "id": only the columns present in `row` change."""
        self._enqueue(UPSERT, table, row)

    def _enqueue(self, kind: str, table: str, row: dict[str, Any]) -> None:
        try:
            content_field = schema.CONTENT_FIELDS.get(table)
            full = False
            with self._lock:
                if not self._accepting:
                    self._ignored_after_close += 1
                    first_ignored = self._ignored_after_close == 1
                else:
                    self._seq += 1
                    entry = [self._seq, kind, table, row]
                    self._pending.append(entry)
                    self._live += 1
                    # A row that is not a dict travels on, to be counted as lost.
                    if content_field is not None and isinstance(row, dict):
                        if table in _ROW_SHEDDABLE:
                            self._sheddable.append(entry)
                        if row.get(content_field) is not None:
                            self._with_content.append(entry)
                    if self._live > self._shed_content_above:
                        self._shed()
                    first_ignored = None
                    # A full batch is waiting: no reason to linger for more.
                    full = len(self._pending) >= self.batch_size
            if first_ignored is None:
                if not self._wakeup.is_set():
                    self._wakeup.set()
                if full and not self._urgent.is_set():
                    self._urgent.set()
            elif first_ignored:
                log.warning("recorder is closed; ignoring rows for %s (and any later ones)", table)
        except Exception:
            # The proxy must never fail because of its audit log.
            log.exception("recorder could not queue a row for %s", table)

    def _shed(self) -> None:
        """Make room while writes lag; called with _lock held, once per row over the limit."""
        if not self._overflow_logged:
            self._overflow_logged = True
            log.warning(
                "recorder queue holds %d rows (limit %d): dropping content of the oldest",
                self._live,
                self.max_queue,
            )
        while self._with_content:
            entry = self._with_content.popleft()
            if entry[_SEQ] <= self._taken or entry[_ROW] is None:
                continue
            field = schema.CONTENT_FIELDS[entry[_TABLE]]
            # A copy: the caller may still hold the dict it gave us.
            entry[_ROW] = {**entry[_ROW], field: None}
            self._losses[(entry[_TABLE], field, REASON_CONTENT_SHED)] += 1
            self._stripped += 1
            break
        if self._live <= self.max_queue:
            return
        while self._sheddable:
            entry = self._sheddable.popleft()
            if entry[_SEQ] <= self._taken or entry[_ROW] is None:
                continue
            entry[_ROW] = None
            self._live -= 1
            self._losses[(entry[_TABLE], None, REASON_ROW_SHED)] += 1
            self._shed_rows += 1
            return
        # Only interceptions, token and tool usages remain; those are never dropped.

    # ---- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the writer; returns once the database is open and migrated."""
        if self._closing:
            raise RecorderError("recorder is closed")
        if self._thread is not None:
            return
        if sqlite3.sqlite_version_info < (3, 24, 0):  # INSERT ... ON CONFLICT DO UPDATE
            raise RecorderError(
                f"SQLite {sqlite3.sqlite_version} is too old: the audit log needs 3.24 or newer"
            )
        self._ready.clear()
        self._start_error = None
        thread = threading.Thread(target=self._run, name="aibridge-recorder", daemon=True)
        thread.start()
        self._ready.wait()
        if self._start_error is not None:
            thread.join()
            error = self._start_error
            self._start_error = None
            raise RecorderError(f"cannot open audit database {self.path}: {error}") from error
        self._thread = thread

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed (or recorded as lost)."""
        with self._lock:
            target = self._seq
        thread = self._thread
        with self._done:
            if self._completed >= target:
                return True
            if thread is None or not thread.is_alive():
                return False
        # Counted before _urgent is set, so a writer about to linger either sees
        # the count or is woken by the event (see _linger).
        with self._lock:
            self._flush_waiters += 1
        try:
            self._urgent.set()
            with self._done:
                return self._done.wait_for(lambda: self._completed >= target, timeout)
        finally:
            with self._lock:
                self._flush_waiters -= 1

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Write everything queued, then close the database. Later rows are ignored.

        Waits at most `timeout` seconds (None: for ever) for a database that refuses
        writes; what is still queued then is not written, and the log says how much.
        """
        with self._lock:
            self._accepting = False
            self._closing = True
            unstarted = self._live if self._thread is None else 0
        if unstarted:
            log.warning("recorder closed before start: %d rows never written", unstarted)
        self._urgent.set()
        self._wakeup.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        thread.join(timeout)
        if thread.is_alive():
            self._abandon = True
            stats = self.stats
            log.error(
                "recorder could not finish within %s s: about %d rows are not written "
                "(before that, %d content fields and %d rows were shed)",
                timeout,
                stats["queue_depth"] + self.batch_size,
                stats["stripped"],
                stats["dropped"],
            )

    @property
    def stats(self) -> dict[str, int]:
        return {
            "written": self._written,
            "batches": self._batches,
            "retries": self._retries,
            "dropped": self._shed_rows + self._lost_rows,
            "stripped": self._stripped,
            "queue_depth": self._live,
            "ignored_after_close": self._ignored_after_close,
        }

    @property
    def health(self) -> dict[str, Any]:
        """For the health endpoint: ``ok``, ``retrying`` (the database refuses writes now,
        rows wait in the queue) or ``stopped`` (no writer: nothing is recorded)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or not self._accepting:
            state = "stopped"
        elif self._refusing is not None:
            state = "retrying"
        else:
            state = "ok"
        stats = self.stats
        report: dict[str, Any] = {
            "state": state,
            "queue_rows": stats["queue_depth"],
            "rows_written": stats["written"],
            "rows_lost": stats["dropped"],
        }
        if state == "retrying":
            report["error"] = self._refusing
        return report

    # ---- writer thread -------------------------------------------------------

    def _run(self) -> None:
        _yield_cpu_to_the_proxy()
        try:
            self._open()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        final_losses_written = False
        try:
            while not self._abandon:
                self._wakeup.clear()
                self._linger()
                with self._lock:
                    batch = self._take()
                    closing = self._closing
                    losses_waiting = bool(self._losses or self._carried)
                if batch:
                    self._process_guarded(batch)
                elif closing and losses_waiting and not final_losses_written:
                    # Losses counted without a batch to carry them (once: if
                    # that fails too, the log already said so).
                    final_losses_written = True
                    self._process_guarded(batch)
                elif closing:
                    break
                else:
                    self._wakeup.wait()
        finally:
            self._close_connection()

    def _linger(self) -> None:
        """Give a few queued rows `linger` seconds to gather company before a batch."""
        if self.linger <= 0:
            return
        # Cleared before looking: whoever makes lingering wrong from here on
        # (flush, close, a full queue) sets it after changing what we look at.
        self._urgent.clear()
        with self._lock:
            pending = len(self._pending)
            wanted = (
                0 < pending < self.batch_size and not self._closing and self._flush_waiters == 0
            )
        if wanted:
            self._urgent.wait(self.linger)

    def _process_guarded(self, batch: list[list[Any]]) -> None:
        try:
            self._process(batch)
        except Exception as exc:
            # A bug here must cost one batch, never the writer (and so the log).
            lost = [e for e in batch if e[_ROW] is not None]
            self._lose_batch([(e[_KIND], e[_TABLE], e[_ROW]) for e in lost], exc)
            self._mark_completed(batch)

    def _mark_completed(self, batch: list[list[Any]]) -> None:
        if batch:
            with self._done:
                self._completed = batch[-1][_SEQ]
                self._done.notify_all()

    def _take(self) -> list[list[Any]]:
        """Pop up to batch_size entries; called with _lock held."""
        pending = self._pending
        n = min(self.batch_size, len(pending))
        if n == 0:
            return []
        batch = [pending.popleft() for _ in range(n)]
        self._taken = batch[-1][_SEQ]
        self._live -= sum(1 for e in batch if e[_ROW] is not None)
        # Forget index entries the writer now owns, so the indexes stay bounded.
        for index in (self._with_content, self._sheddable):
            while index and index[0][_SEQ] <= self._taken:
                index.popleft()
        if self._live <= self._shed_content_above:
            self._overflow_logged = False
        return batch

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000)
        try:
            # SQLite opened (or created) the file in connect(); Python cannot fstat its
            # descriptor, so the path is looked at at once instead.
            db_file = _file_id(self.path)
            db = sqlite_utils.Database(conn, execute_plugins=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            db.enable_wal()
            if db.journal_mode != "wal":
                log.warning("audit database %s is not in WAL mode", self.path)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            schema.migrate(db)
            self._columns = {t: frozenset(db.table(t).columns_dict) for t in schema.WRITABLE_TABLES}
        except BaseException:
            conn.close()
            raise
        self._db = db
        self._db_file = db_file
        # In WAL mode both exist now: the migration check read through them.
        self._side_files = {self.path + s: known_file_id(self.path + s) for s in _SIDE_SUFFIXES}

    def _file_change(self) -> str | None:
        """How the path stopped naming the open file ("deleted", "replaced"), or None."""
        if self.path in _NOT_A_FILE:
            return None
        try:
            now = _file_id(self.path)
        except OSError as exc:
            # Cannot tell (e.g. a directory lost its permissions): keep what works.
            log.debug("cannot stat the audit database %s: %s", self.path, exc)
            return None
        if now is None:
            return "deleted"
        return None if now == self._db_file else "replaced"

    def _reopen_moved(self) -> None:
        """Reopen the path if it no longer names the file the connection writes to.

        One stat per batch (about a microsecond).
        """
        change = self._file_change()
        if change is not None:
            self._reopen(change)

    def _reopen(self, change: str | None = None) -> None:
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
                    self.path,
                )
            else:
                log.warning(
                    "audit database %s was replaced by another file: "
                    "writing to that one from now on",
                    self.path,
                )
            # Judged while our connection holds them, so an equal id is our own file.
            stale = [p for p, ours in self._side_files.items() if ours and known_file_id(p) == ours]
        self._close_connection()
        for path in stale:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s of the old audit database: %s", path, exc)
        self._open()

    def _close_connection(self) -> None:
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

    def _process(self, batch: list[list[Any]]) -> None:
        ops = self._prepare(batch)
        delay = _BACKOFF_FIRST
        failures = 0
        while True:
            with self._lock:
                self._carried.update(self._losses)
                self._losses.clear()
            per_row: Counter[LossKey] = Counter()
            try:
                if self._db is None:
                    self._reopen()
                else:
                    # Before every attempt, so the rows go to whatever file holds the name.
                    self._reopen_moved()
                written = self._write(ops, per_row)
            except Exception as exc:
                if not is_transient(exc):
                    self._refusing = None  # lost, not waiting: the losses table says so
                    self._lose_batch(ops, exc)
                    break
                failures += 1
                self._retries += 1
                self._refusing = _describe(exc)
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "audit database refused a batch of %d rows (%s); retry %d in %.2f s",
                        len(ops),
                        exc,
                        failures,
                        delay,
                    )
                if self._abandon:
                    return
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                if _primary_code(exc) in _REOPEN_CODES or self._db is None:
                    self._safe_reopen()
                continue
            if failures:
                self._refusing = None
                log.warning("audit database accepted the batch after %d retries", failures)
            self._written += written
            self._batches += 1
            self._log_losses(self._carried + per_row)
            self._carried.clear()
            break
        self._mark_completed(batch)

    def _safe_reopen(self) -> None:
        try:
            self._reopen()
        except Exception as exc:
            # Still unusable: the next attempt notices _db is None and tries again.
            log.debug("reopening the audit database failed: %s", exc)

    def _prepare(self, batch: list[list[Any]]) -> list[tuple[str, str, dict[str, Any]]]:
        """Validate rows and make every value bindable; what cannot be kept is counted.

        The caller's dict is never changed: a row that needs changes is copied.
        """
        ops: list[tuple[str, str, dict[str, Any]]] = []
        losses = self._carried
        for _, kind, table, row in batch:
            if row is None:
                continue
            columns = self._columns.get(table)
            if columns is None:
                losses[(str(table), None, "unknown table")] += 1
                self._lost_rows += 1
                continue
            if not isinstance(row, dict):
                losses[(table, None, "row is not a dict")] += 1
                self._lost_rows += 1
                continue
            clean = row
            # Checked without building anything first: nearly every row passes.
            if not columns.issuperset(row):
                for key in row.keys() - columns:
                    losses[(table, str(key), "unknown column")] += 1
                clean = {k: v for k, v in row.items() if k in columns}
            if not _BINDABLE.issuperset(map(type, clean.values())):
                if clean is row:
                    clean = dict(row)
                for key in [k for k, v in clean.items() if type(v) not in _BINDABLE]:
                    try:
                        clean[key] = _to_sql(clean[key])
                    except TypeError as exc:
                        losses[(table, key, f"not JSON serializable: {exc}")] += 1
                        clean[key] = None
            if kind == UPSERT and clean.get("id") is None:
                losses[(table, None, "upsert without an id")] += 1
                self._lost_rows += 1
                continue
            ops.append((kind, table, clean))
        return ops

    def _write(self, ops: list[tuple[str, str, dict[str, Any]]], per_row: Counter[LossKey]) -> int:
        """Write `ops` and the pending losses in one transaction; return rows written."""
        db = self._db
        assert db is not None
        conn = db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            with conn:
                has_prompts = any(op[1] == schema.USER_PROMPTS for op in ops)
                if has_prompts:
                    last_prompt_id = conn.execute(schema.LAST_PROMPT_ID).fetchone()[0]
                try:
                    # A savepoint, so that a rejected row undoes only the batch's rows
                    # and the same transaction can take them one by one.
                    with _savepoint(conn):
                        for kind, table, rows in _plan(ops):
                            self._write_rows(conn, kind, table, rows)
                    written = len(ops)
                except Exception as exc:
                    if is_transient(exc) or not conn.in_transaction:
                        raise
                    written = self._write_one_by_one(conn, ops, per_row)
                if has_prompts:
                    conn.execute(schema.INDEX_NEW_PROMPTS, (last_prompt_id,))
                if losses := self._carried + per_row:
                    self._write_rows(conn, INSERT, schema.RECORDER_LOSSES, _loss_rows(losses))
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        return written

    def _write_one_by_one(
        self,
        conn: sqlite3.Connection,
        ops: list[tuple[str, str, dict[str, Any]]],
        per_row: Counter[LossKey],
    ) -> int:
        written = 0
        for kind, table, row in ops:
            try:
                try:
                    with _savepoint(conn):
                        self._write_rows(conn, kind, table, [row])
                except UnicodeEncodeError:
                    # sqlite3 cannot bind a str holding lone surrogates (undecodable
                    # bytes, as mitmproxy keeps them in header values): keep the row.
                    repaired, fields = _repair_unicode(row)
                    with _savepoint(conn):
                        self._write_rows(conn, kind, table, [repaired])
                    for field in fields:
                        per_row[(table, field, REASON_INVALID_UNICODE)] += 1
                written += 1
            except Exception as exc:
                if is_transient(exc) or not conn.in_transaction:
                    raise
                per_row[(table, None, _describe(exc))] += 1
                self._lost_rows += 1
        return written

    def _write_rows(
        self, conn: sqlite3.Connection, kind: str, table: str, rows: list[dict[str, Any]]
    ) -> None:
        """Write `rows`, which all carry the same keys in the same order (see _plan)."""
        sql, params = self._statement(kind, table, tuple(rows[0]))
        if len(rows) == 1:
            conn.execute(sql, params(rows[0]))
        else:
            conn.executemany(sql, map(params, rows))

    def _statement(self, kind: str, table: str, columns: tuple[str, ...]) -> Statement:
        key = (kind, table, columns)
        statement = self._statements.get(key)
        if statement is None:
            if len(self._statements) >= _STATEMENTS_MAX:
                self._statements.clear()
            build = _upsert_sql if kind == UPSERT else _insert_sql
            statement = (build(table, columns), _params_of(columns))
            self._statements[key] = statement
        return statement

    def _lose_batch(self, ops: list[tuple[str, str, dict[str, Any]]], exc: BaseException) -> None:
        log.error("audit database failed a batch of %d rows", len(ops), exc_info=exc)
        for _, table, _ in ops:
            self._carried[(table, None, _describe(exc))] += 1
        self._lost_rows += len(ops)

    def _log_losses(self, losses: Counter[LossKey]) -> None:
        for (table, field, reason), count in losses.items():
            what = f"{table}.{field}" if field else f"{table} rows"
            log.warning("audit log lost %d %s: %s", count, what, reason)


def _repair_unicode(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`row` with every str made encodable as UTF-8, and the names of the fields changed."""
    repaired = dict(row)
    fields = []
    for key, value in row.items():
        if isinstance(value, str):
            fixed = _SURROGATE.sub("\ufffd", value)
            if fixed != value:
                repaired[key] = fixed
                fields.append(str(key))
    return repaired, fields


def _yield_cpu_to_the_proxy() -> None:
    """Lower this thread's CPU priority (Linux: niceness is per thread).

    When the CPU is saturated, the event loop that serves clients should run first: the
    writer's work can wait, because rows queue (bounded) and catch up when load drops.
    """
    # Only Linux takes a thread id here; elsewhere the same call would renice a process.
    if sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + WRITER_NICENESS))
    except OSError:
        pass


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    if not columns:
        return f"INSERT INTO {_quote(table)} DEFAULT VALUES"
    names = ", ".join(_quote(c) for c in columns)
    marks = ", ".join("?" * len(columns))
    return f"INSERT INTO {_quote(table)} ({names}) VALUES ({marks})"


def _upsert_sql(table: str, columns: tuple[str, ...]) -> str:
    """An insert that, for an existing id, sets only `columns` (as sqlite-utils' upsert did)."""
    if "id" not in columns:
        raise ValueError(f"an upsert into {table} needs an id column")
    updates = ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in columns if c != "id")
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return f"{_insert_sql(table, columns)} ON CONFLICT({_quote('id')}) {action}"


def _params_of(columns: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """The row's values in the order of `columns`, taken by name: a row whose keys
    differ raises KeyError rather than putting a value in the wrong column."""
    if len(columns) == 1:
        (only,) = columns
        return lambda row: (row[only],)
    if not columns:
        return lambda row: ()
    return operator.itemgetter(*columns)


def _to_sql(value: Any) -> Any:
    """`value` as sqlite-utils would have stored it; TypeError if JSON cannot hold it."""
    if isinstance(value, _JSON_TYPES):
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, date | time_of_day):  # datetime is a date
        return value.isoformat()
    if isinstance(value, timedelta | uuid.UUID):
        return str(value)
    return value  # a subclass of a bindable type, or for sqlite3 to judge


def _loss_rows(losses: Counter[LossKey]) -> list[dict[str, Any]]:
    now = _utc_now()
    return [
        {"happened_at": now, "table_name": table, "field": field, "rows": count, "reason": reason}
        for (table, field, reason), count in losses.items()
    ]


@contextlib.contextmanager
def _savepoint(conn: sqlite3.Connection) -> Iterator[None]:
    """Undo what the block wrote if it raises, keeping the enclosing transaction."""
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


def _plan(
    ops: list[tuple[str, str, dict[str, Any]]],
) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Arrange one batch into as few statements as its meaning allows.

    The batch is one transaction, so only what SQLite checks row by row can tell
    an order: the foreign keys to interceptions, and the order of rows within a
    table. Hence interceptions go first, then each other table, every table's
    operations kept in the order queued. Consecutive upserts of one id merge into
    one row (later values win, as if applied in turn). A group shares one statement,
    so a run is cut where the keys change: an upsert must leave alone the columns
    its row does not carry, and an insert's statement names exactly its columns.
    """
    by_table: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for op in ops:
        by_table.setdefault(op[1], []).append(op)
    tables = sorted(by_table, key=lambda t: t != schema.INTERCEPTIONS)

    groups: list[tuple[str, str, list[dict[str, Any]]]] = []
    for table in tables:
        last_key: tuple[Any, ...] | None = None
        for kind, row in _table_order(by_table[table]):
            key = (kind, tuple(row))
            if key == last_key:
                groups[-1][2].append(row)
            else:
                groups.append((kind, table, [row]))
                last_key = key
    return groups


def _table_order(
    table_ops: list[tuple[str, str, dict[str, Any]]],
) -> list[tuple[str, dict[str, Any]]]:
    """One table's operations in the order to run them, upserts of one id merged."""
    if all(kind == INSERT for kind, _, _ in table_ops):
        return [(kind, row) for kind, _, row in table_ops]
    ordered: list[tuple[str, dict[str, Any]]] = []
    merged: dict[Any, dict[str, Any]] = {}
    for kind, _, row in table_ops:
        if kind == UPSERT:
            previous = merged.get(row["id"])
            merged[row["id"]] = row if previous is None else {**previous, **row}
            continue
        # An insert may conflict with an upserted id: keep it after them.
        ordered.extend((UPSERT, r) for r in merged.values())
        merged = {}
        ordered.append((kind, row))
    ordered.extend((UPSERT, r) for r in merged.values())
    return ordered
