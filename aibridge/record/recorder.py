"""The single writer of the audit database (DESIGN.md §4), for either engine.

Hooks run on mitmproxy's event loop and must never wait for the database, so they only
append to an in-memory queue. One thread owns the connection (sqlite-utils and psycopg
connections do not cross threads), takes whatever is queued, and writes it in one
transaction per batch, through statements built once per table and column set. What
differs between SQLite and PostgreSQL is a store (`aibridge.record.sqlite`,
`aibridge.record.postgres`): connecting, migrating, transactions, what counts as "not now",
and how a row refused for its values is repaired. Queueing, shedding, batching, retries and
the bookkeeping of losses are here, the same for both.

A writer woken for a few rows lingers (`linger` seconds) so that light but steady
traffic shares a transaction rather than paying one per flow; it never lingers
while flush() or close() waits, nor once `batch_size` rows are queued.

Cases it handles:
- The database refuses writes for a while (SQLite locked, disk full, read-only;
  PostgreSQL restarting, unreachable, failing over): the batch is kept and retried with
  backoff, on a new connection where that helps; hooks keep enqueueing meanwhile.
- The queue outgrows `max_queue` while writes are refused: past half of it, the
  oldest rows lose their large content field (prompt, thought, tool arguments);
  past all of it, the oldest prompt and thought rows are dropped whole.
  Interceptions, token usages and tool usages (who used what) are never dropped,
  only a tool usage's arguments. Every loss is counted into `recorder_losses` and
  logged with its count.
- A row the database rejects (constraint, bad value): the batch is written row by row so
  that only that row is lost, and the loss is recorded with its reason. A row refused for
  its values (a string that is not valid Unicode, as header bytes that are not UTF-8 are
  kept; in PostgreSQL also NUL characters and values not of the column's type) is written
  repaired, and each repair is recorded too.
- Closing waits for the queue to drain, up to a time limit: a database that stays
  locked must not keep the proxy from shutting down. What is left is logged.
- (SQLite) the file is deleted, moved away or replaced while open: the store follows the
  path (see aibridge.record.sqlite).
- Exchanges rebuilt from a saved flow (a flow file read with `--rfile`, mitmweb's File → Open)
  come with a `Replay` mark. In the transaction of the batch that holds a replay's first row,
  the writer asks the log whether it already has that interception; if so, none of the
  replay's rows are written (its later rows are dropped by the same decision), and no loss is
  counted: the log has them. Opening the same file again, or one holding a flow twice, so
  writes each exchange once.
"""

from __future__ import annotations

import decimal
import logging
import operator
import os
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from typing import Any, Final, Protocol

import orjson

from aibridge.record import address as addresses
from aibridge.record import schema
from aibridge.record.sqlite import REASON_INVALID_UNICODE as REASON_INVALID_UNICODE
from aibridge.record.sqlite import FileId as FileId
from aibridge.record.sqlite import SqliteStore
from aibridge.record.sqlite import is_transient as is_transient
from aibridge.record.sqlite import known_file_id as known_file_id

log = logging.getLogger(__name__)

# How much lower than the proxy's the writer thread's CPU priority is (nice levels).
WRITER_NICENESS = 10

INSERT: Final = "insert"
UPSERT: Final = "upsert"

REASON_CONTENT_SHED: Final = "queue overflow: content dropped"
REASON_ROW_SHED: Final = "queue overflow: row dropped"
# Rows that may be dropped whole once their content is gone: they say nothing else.
_ROW_SHEDDABLE: Final = frozenset({schema.USER_PROMPTS, schema.MODEL_THOUGHTS})
# How long close() waits for a database that refuses writes, by default.
CLOSE_TIMEOUT: Final = 60.0

_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 2.0
# Stored as JSON text (orjson), as sqlite-utils stored them when it wrote our rows.
_JSON_TYPES: Final = (dict, list, tuple)
# Values sqlite3 binds as they are; any other type goes through _to_sql first.
_BINDABLE: Final = frozenset({str, int, float, bool, bytes, type(None)})
# Statements kept per (kind, table, columns); our rows come in a handful of shapes,
# so the limit only guards against a caller that varies its key order endlessly.
_STATEMENTS_MAX: Final = 256

# A queue entry: [seq, kind, table, row, replay]; row None means it was shed whole.
_SEQ, _KIND, _TABLE, _ROW, _REPLAY = 0, 1, 2, 3, 4

LossKey = tuple[str, str | None, str]  # (table_name, field or None for the row, reason)
# A prepared write: the SQL, and how to take its parameters from a row dict.
Statement = tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]]]
# What the writer does in a batch: (INSERT or UPSERT, table, row).
Op = tuple[str, str, dict[str, Any]]


class Replay:
    """Marks the rows of one exchange rebuilt from a saved flow, one mark per reading of the
    flow (the same flow read twice is two replays). The writer writes them only if the log
    did not hold the interception before the replay's first row.

    The writer keeps its decision on the mark, so it lasts exactly as long as rows can still
    come with it.
    """

    __slots__ = ("__weakref__", "flow_id", "new")

    def __init__(self, flow_id: str | None = None) -> None:
        # Set when the flow did not note its interception id: the log holds the exchange
        # also if it has an interception of this flow.
        self.flow_id = flow_id
        # The decision, once the batch that began the replay is committed (only the writer
        # thread reads or sets it): True to write its rows, False when the log held them.
        self.new: bool | None = None

    def __repr__(self) -> str:
        return f"<Replay flow_id={self.flow_id!r} new={self.new!r}>"


class Store(Protocol):
    """One database engine, as the writer thread uses it (see the module docstring)."""

    address: str  # as configured: may hold a password, never shown
    where: str  # the address as it may be shown
    placeholder: str  # of a statement's parameters
    columns: dict[str, frozenset[str]]  # the writable columns of each table, once open

    @property
    def is_open(self) -> bool: ...
    @property
    def in_transaction(self) -> bool: ...
    def open(self) -> None: ...
    def before_write(self) -> None: ...
    def reopen(self) -> None: ...
    def should_reopen(self, exc: BaseException) -> bool: ...
    def close(self) -> None: ...
    def describe(self, exc: BaseException) -> str: ...
    def is_transient(self, exc: BaseException) -> bool: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def savepoint(self) -> AbstractContextManager[None]: ...
    def before_rows(self, ops: list[Op]) -> Any: ...
    def after_rows(self, token: Any) -> None: ...
    def write_rows(
        self,
        sql: str,
        params: Callable[[dict[str, Any]], tuple[Any, ...]],
        rows: list[dict[str, Any]],
    ) -> None: ...
    def repair(
        self, table: str, row: dict[str, Any], exc: BaseException
    ) -> tuple[dict[str, Any], list[tuple[str, str]]] | None: ...
    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]: ...
    def interceptions_present(
        self, ids: Collection[str], flow_ids: Collection[str]
    ) -> tuple[set[str], set[str]]: ...
    @property
    def commit_unanswered(self) -> bool: ...
    def unanswered_commit_landed(self) -> bool: ...


def open_store(address: str, *, busy_timeout_ms: int = 5000) -> Store:
    """The store for `address`: a PostgreSQL URL, else the path of a SQLite file."""
    if addresses.is_postgres(address):
        from aibridge.record.postgres import PostgresStore  # psycopg only when asked for

        return PostgresStore(address)
    return SqliteStore(address, busy_timeout_ms=busy_timeout_ms)


class RecorderError(Exception):
    """The audit database cannot be used at all (start-up)."""


def check_options(max_queue: int, batch_size: int, busy_timeout_ms: int, linger: float) -> None:
    """ValueError unless the writer's options make sense (Recorder, WriterProcess)."""
    if max_queue < 2 or batch_size < 1 or busy_timeout_ms < 0 or not linger >= 0:
        raise ValueError("need max_queue >= 2, batch_size >= 1, busy_timeout_ms >= 0, linger >= 0")


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Recorder:
    """Queue rows from any thread; one background thread writes them to SQLite."""

    def __repr__(self) -> str:
        return f"<Recorder {self.where}>"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_queue: int = 100_000,
        batch_size: int = 1000,
        busy_timeout_ms: int = 5000,
        linger: float = 0.05,
        progress_id: str | None = None,
    ) -> None:
        """`progress_id`: keep, in each batch's transaction, the number of the last row
        committed under this id (schema.WRITER_PROGRESS); `progress_found` is what the log
        held for it at start. Rows are then numbered by their producer (see renumber)."""
        check_options(max_queue, batch_size, busy_timeout_ms, linger)
        # The database's address: a SQLite path or a PostgreSQL URL (which may hold a
        # password: shown only as `where`).
        self.path = os.fspath(path)
        self._store: Store = open_store(self.path, busy_timeout_ms=busy_timeout_ms)
        self.where = self._store.where
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.busy_timeout_ms = busy_timeout_ms
        self.linger = linger
        self._shed_content_above = max_queue // 2
        self.progress_id = progress_id
        self.progress_found = 0

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
        self._losses_alone = False  # add_losses() asks for them written without waiting
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

        # Owned by the writer thread (and so is the store's connection).
        self._attempted = 0  # rows the batch being committed wrote
        self._statements: dict[tuple[str, str, tuple[str, ...]], Statement] = {}
        self._carried: Counter[LossKey] = Counter()  # losses not yet in the database
        # What the attempt being committed decided about the replays it began: kept (on the
        # marks) only once it is known to have landed; a rolled-back attempt wrote none of them.
        self._replays_begun: dict[Replay, bool] = {}

        # Counters: the first two change under _lock, the rest only in the writer.
        self._shed_rows = 0
        self._stripped = 0
        self._written = 0
        self._batches = 0
        self._retries = 0
        self._lost_rows = 0
        self._replays_present = 0  # replayed exchanges the log already held: not written
        # Why the database refuses the batch being retried now (None: it is not refusing).
        self._refusing: str | None = None

    # ---- producer side -------------------------------------------------------

    def insert(self, table: str, row: dict[str, Any], replay: Replay | None = None) -> None:
        """Queue `row` for insertion into `table`. The recorder owns `row` from now on.

        `replay`: the row belongs to an exchange rebuilt from a saved flow (see Replay)."""
        self._enqueue(INSERT, table, row, replay)

    def upsert(self, table: str, row: dict[str, Any], replay: Replay | None = None) -> None:
        """Queue an upsert by primary key "id": only the columns present in `row` change."""
        self._enqueue(UPSERT, table, row, replay)

    def _enqueue(
        self, kind: str, table: str, row: dict[str, Any], replay: Replay | None = None
    ) -> None:
        try:
            content_field = schema.CONTENT_FIELDS.get(table)
            full = False
            with self._lock:
                if not self._accepting:
                    self._ignored_after_close += 1
                    first_ignored = self._ignored_after_close == 1
                else:
                    self._seq += 1
                    entry = [self._seq, kind, table, row, replay]
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
        self._ready.clear()
        self._start_error = None
        thread = threading.Thread(target=self._run, name="aibridge-recorder", daemon=True)
        thread.start()
        self._ready.wait()
        if self._start_error is not None:
            thread.join()
            error = self._start_error
            self._start_error = None
            raise RecorderError(
                f"cannot open audit database {self.where}: {self._store.describe(error)}"
            ) from None
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

    def renumber(self, next_seq: int) -> None:
        """Number the next row queued `next_seq` (never backwards): the producer's own
        numbers, which may skip rows it never sent."""
        with self._lock:
            if next_seq - 1 > self._seq:
                self._seq = next_seq - 1

    @property
    def completed(self) -> int:
        """Every row queued up to this sequence number (rows are numbered from 1 in the order
        queued) is committed or counted as lost."""
        return self._completed

    def wait_progress(self, seen: int, timeout: float | None) -> int:
        """Wait up to `timeout` seconds for `completed` to move past `seen`; return it."""
        with self._done:
            self._done.wait_for(lambda: self._completed != seen, timeout)
            return self._completed

    def add_losses(self, losses: Counter[LossKey]) -> None:
        """Count losses that happened outside this recorder (a writer process that ended with
        rows in hand): they go into recorder_losses with the next batch, or on their own."""
        with self._lock:
            self._losses.update(losses)
            self._losses_alone = True
        self._wakeup.set()

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
            "replays_present": self._replays_present,
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
            self._store.open()
            if self.progress_id is not None:
                found = self._store.execute(
                    f"select through_row from {schema.WRITER_PROGRESS} where id = "
                    f"{self._store.placeholder}",
                    (self.progress_id,),
                )
                self.progress_found = int(found[0][0]) if found else 0
        except BaseException as exc:
            self._store.close()
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
                    losses_alone, self._losses_alone = self._losses_alone, False
                if batch or (losses_alone and losses_waiting):
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
            self._forget_progress()
        finally:
            self._store.close()

    def _forget_progress(self) -> None:
        """A writer that ends with every row written leaves nothing for a next one to learn:
        its progress row goes, so the log keeps none per clean start of a bridge."""
        if self.progress_id is None or self._completed < self._seq:
            return
        try:
            with self._store.transaction():
                self._store.execute(
                    f"delete from {schema.WRITER_PROGRESS} where id = {self._store.placeholder}",
                    (self.progress_id,),
                )
        except Exception as exc:
            log.debug("could not remove the writer's progress row: %s", self._store.describe(exc))

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

    def _process(self, batch: list[list[Any]]) -> None:
        ops, marks = self._prepare(batch)
        delay = _BACKOFF_FIRST
        failures = 0
        # (rows, per-row losses) of an attempt whose commit was sent but never answered: it
        # may have landed, and writing the batch again would write it twice.
        unanswered: tuple[int, Counter[LossKey]] | None = None
        while True:
            with self._lock:
                self._carried.update(self._losses)
                self._losses.clear()
            per_row: Counter[LossKey] = Counter()
            try:
                if not self._store.is_open:
                    self._store.reopen()
                else:
                    # Before every attempt, so the rows go to whatever file holds the name.
                    self._store.before_write()
                if unanswered is not None and self._store.unanswered_commit_landed():
                    written, per_row = unanswered
                    log.warning(
                        "audit database had committed a batch of %d rows before the connection "
                        "was lost; it is not written again",
                        len(ops),
                    )
                else:
                    unanswered = None
                    self._attempted = 0
                    written = self._write(ops, per_row, marks, batch[-1][_SEQ] if batch else 0)
            except Exception as exc:
                if self._store.commit_unanswered:
                    unanswered = (self._attempted, per_row)
                if not self._store.is_transient(exc):
                    self._refusing = None  # lost, not waiting: the losses table says so
                    self._replays_begun = {}
                    self._lose_batch(ops, exc)
                    break
                failures += 1
                self._retries += 1
                self._refusing = self._store.describe(exc)
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "audit database refused a batch of %d rows (%s); retry %d in %.2f s",
                        len(ops),
                        self._refusing,
                        failures,
                        delay,
                    )
                if self._abandon:
                    return
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                if self._store.should_reopen(exc):
                    self._safe_reopen()
                continue
            if failures:
                self._refusing = None
                log.warning("audit database accepted the batch after %d retries", failures)
            self._written += written
            self._batches += 1
            self._settle_replays()
            self._log_losses(self._carried + per_row)
            self._carried.clear()
            break
        self._mark_completed(batch)

    def _safe_reopen(self) -> None:
        try:
            self._store.reopen()
        except Exception as exc:
            # Still unusable: the next attempt notices it is not open and tries again.
            log.debug("reopening the audit database failed: %s", self._store.describe(exc))

    def _prepare(self, batch: list[list[Any]]) -> tuple[list[Op], list[Replay | None] | None]:
        """Validate rows and make every value bindable; what cannot be kept is counted.
        Returns the ops and, if any row is a replay's, each op's Replay mark (else None).

        The caller's dict is never changed: a row that needs changes is copied.
        """
        ops: list[Op] = []
        marks: list[Replay | None] = []
        losses = self._carried
        for _, kind, table, row, replay in batch:
            if row is None:
                continue
            columns = self._store.columns.get(table)
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
            marks.append(replay)
        return ops, (marks if any(m is not None for m in marks) else None)

    def _write(
        self,
        ops: list[Op],
        per_row: Counter[LossKey],
        marks: list[Replay | None] | None = None,
        through: int = 0,
    ) -> int:
        """Write `ops` and the pending losses in one transaction; return rows written.
        `marks`: each op's Replay mark, if any has one (see _without_replays_present).
        `through`: the batch's last sequence number, kept as the progress (see __init__)."""
        store = self._store
        with store.transaction():
            self._replays_begun = {}
            if marks is not None:
                ops = self._without_replays_present(ops, marks)
            token = store.before_rows(ops)
            try:
                # A savepoint, so that a rejected row undoes only the batch's rows
                # and the same transaction can take them one by one.
                with store.savepoint():
                    for kind, table, rows in _plan(ops):
                        self._write_rows(kind, table, rows)
                written = len(ops)
            except Exception as exc:
                if store.is_transient(exc) or not store.in_transaction:
                    raise
                written = self._write_one_by_one(ops, per_row)
            store.after_rows(token)
            if through and self.progress_id is not None:
                progress = {
                    "id": self.progress_id,
                    "through_row": through,
                    "updated_at": _utc_now(),
                }
                self._write_rows(UPSERT, schema.WRITER_PROGRESS, [progress])
            if losses := self._carried + per_row:
                self._write_rows(INSERT, schema.RECORDER_LOSSES, _loss_rows(losses))
            # What the batch wrote, should its commit go unanswered (see _process).
            self._attempted = written
        return written

    def _without_replays_present(self, ops: list[Op], marks: list[Replay | None]) -> list[Op]:
        """`ops` without the rows of replays whose exchange the log already held before the
        replay's first row; run in the batch's transaction, before it writes anything.

        A replay is decided once, at its first row: one query for all the replays the batch
        begins. Of replays of one interception begun in the same batch (a file holding a flow
        twice), only the first can be new.
        """
        begun: dict[Replay, str] = {}  # replays this batch begins → their interception id
        for (_, table, row), mark in zip(ops, marks, strict=True):
            if mark is not None and mark.new is None and mark not in begun:
                key = "id" if table == schema.INTERCEPTIONS else "interception_id"
                begun[mark] = str(row.get(key))
        decided: dict[Replay, bool] = {}
        if begun:
            flow_ids = {m.flow_id for m in begun if m.flow_id is not None}
            ids, flows = self._store.interceptions_present(set(begun.values()), flow_ids)
            for mark, interception_id in begun.items():
                by_flow = mark.flow_id is not None and mark.flow_id in flows
                decided[mark] = interception_id not in ids and not by_flow
                ids.add(interception_id)  # a later replay of it in this batch is not new
        self._replays_begun = decided
        kept: list[Op] = []
        for op, mark in zip(ops, marks, strict=True):
            if mark is None or decided.get(mark, mark.new):
                kept.append(op)
        return kept

    def _settle_replays(self) -> None:
        """The committed batch's decisions about replays, kept for their later rows."""
        begun, self._replays_begun = self._replays_begun, {}
        if not begun:
            return
        for mark, new in begun.items():
            mark.new = new
        present = sum(1 for new in begun.values() if not new)
        if present:
            self._replays_present += present
            log.info(
                "the audit log already held %d exchange%s read from saved flows: not written again",
                present,
                "" if present == 1 else "s",
            )

    def _write_one_by_one(self, ops: list[Op], per_row: Counter[LossKey]) -> int:
        written, lost = write_one_by_one(self._store, ops, self._write_rows, per_row)
        self._lost_rows += lost
        return written

    def _write_rows(self, kind: str, table: str, rows: list[dict[str, Any]]) -> None:
        """Write `rows`, which all carry the same keys in the same order (see _plan)."""
        sql, params = self._statement(kind, table, tuple(rows[0]))
        self._store.write_rows(sql, params, rows)

    def _statement(self, kind: str, table: str, columns: tuple[str, ...]) -> Statement:
        key = (kind, table, columns)
        statement = self._statements.get(key)
        if statement is None:
            if len(self._statements) >= _STATEMENTS_MAX:
                self._statements.clear()
            build = upsert_sql if kind == UPSERT else insert_sql
            statement = (build(table, columns, self._store.placeholder), params_of(columns))
            self._statements[key] = statement
        return statement

    def _lose_batch(self, ops: list[Op], exc: BaseException) -> None:
        reason = self._store.describe(exc)
        log.error("audit database failed a batch of %d rows: %s", len(ops), reason)
        for _, table, _ in ops:
            self._carried[(table, None, reason)] += 1
        self._lost_rows += len(ops)

    def _log_losses(self, losses: Counter[LossKey]) -> None:
        for (table, field, reason), count in losses.items():
            what = f"{table}.{field}" if field else f"{table} rows"
            log.warning("audit log lost %d %s: %s", count, what, reason)


def write_one_by_one(
    store: Store,
    ops: list[Op],
    write_rows: Callable[[str, str, list[dict[str, Any]]], None],
    per_row: Counter[LossKey],
) -> tuple[int, int]:
    """Write `ops` a row at a time, each in a savepoint of the open transaction, after the
    batch as a whole was refused: (rows written, rows lost). A row refused for its values
    (invalid Unicode, NUL, a wrong type) is kept, mended, and each mend counted in `per_row`
    under its field; a row refused otherwise is counted there under None with the reason.
    A transient error ends it: the whole batch is retried."""
    written = lost = 0
    for kind, table, row in ops:
        try:
            try:
                with store.savepoint():
                    write_rows(kind, table, [row])
            except Exception as exc:
                repaired = store.repair(table, row, exc)
                if repaired is None:
                    raise
                fixed, notes = repaired
                with store.savepoint():
                    write_rows(kind, table, [fixed])
                for field, reason in notes:
                    per_row[(table, field, reason)] += 1
            written += 1
        except Exception as exc:
            if store.is_transient(exc) or not store.in_transaction:
                raise
            per_row[(table, None, store.describe(exc))] += 1
            lost += 1
    return written, lost


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


def insert_sql(table: str, columns: tuple[str, ...], mark: str = "?") -> str:
    if not columns:
        return f"INSERT INTO {_quote(table)} DEFAULT VALUES"
    names = ", ".join(_quote(c) for c in columns)
    marks = ", ".join([mark] * len(columns))
    return f"INSERT INTO {_quote(table)} ({names}) VALUES ({marks})"


def upsert_sql(table: str, columns: tuple[str, ...], mark: str = "?") -> str:
    """An insert that, for an existing id, sets only `columns` (as sqlite-utils' upsert did)."""
    if "id" not in columns:
        raise ValueError(f"an upsert into {table} needs an id column")
    updates = ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in columns if c != "id")
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return f"{insert_sql(table, columns, mark)} ON CONFLICT({_quote('id')}) {action}"


def params_of(columns: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
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


def _plan(
    ops: list[Op],
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
    table_ops: list[Op],
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
