"""The audit log's writer in a process of its own (DESIGN.md §4, issue 18).

The proxy's event loop should spend its CPU on clients. With the writer as a thread of the
proxy, every batch costs the loop GIL hand-offs and the Python work of preparing and binding
rows. Here the proxy keeps only the producer's side (`WriterProcess`): rows queued during one
turn of the event loop go to the writer as one frame on a pipe, written without blocking.
A child process (`python -m aibridge.record.writer_process`) runs the `Recorder` as it always
ran, with its queue, shedding, batching, retries and loss bookkeeping, and owns the database.

The guarantees stay those of the Recorder, and one is added:
- The proxy never waits for the database: a frame the pipe cannot take now waits in memory
  (bounded) and is written when the pipe drains, from the event loop.
- Nothing is lost on a clean shutdown: close() hands over what is queued, then the writer
  drains its queue into the database (up to the close timeout) before it exits.
- A writer that ends on its own (killed, crashed) costs no rows. Rows are numbered here; each
  batch's transaction also moves this bridge's row in `_writer_progress` to the number of its
  last row, and the proxy keeps every row it handed over until the writer reports it
  committed (up to a memory bound). The next writer, started at once (later with backoff if
  writers keep ending), reads how far the log got, and the proxy hands it again exactly the
  rows after that: none twice, none lost. Only rows released under the memory bound, or
  never taken by a writer that stopped reading, are lost, and they are counted.
- The writer ignores SIGINT and SIGTERM and runs in its own session: a proxy stopped with
  Ctrl-C still has its rows written, and a proxy that dies leaves a writer that writes what
  it holds, then exits when its pipe ends.

The writer's log lines come back over its pipe and are logged here under their own logger
names, so they show in mitmproxy's event log as the thread's did.

Frames are a 4-byte length and a pickle: both ends are this package, on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections import Counter, deque
from pathlib import Path
from typing import IO, Any, Final

from aibridge.record import address as addresses
from aibridge.record.recorder import (
    CLOSE_TIMEOUT,
    INSERT,
    UPSERT,
    LossKey,
    Recorder,
    RecorderError,
    Replay,
    check_options,
)

log = logging.getLogger(__name__)

_HEADER: Final = struct.Struct(">I")
# Frames the pipe could not take yet, at most: past this the writer is not reading at all
# (stopped, or starved of CPU for a long time), and new rows are counted as lost.
MAX_UNSENT_BYTES: Final = 256 * 1024 * 1024
# Rows handed over and kept to be handed again should the writer end, at most (as framed):
# past this the oldest are no longer kept, and would be lost if the writer ended.
MAX_KEPT_BYTES: Final = 64 * 1024 * 1024
# Rows queued on the event loop go to the writer at most this long after the first of them:
# one frame (a pickle, a pipe write, a wake-up of the writer) for several exchanges rather
# than one per turn of the loop. Measured: 20-30 µs less of the loop's CPU per exchange of
# five rows, at one exchange per 0.5 ms. The writer lingers longer (`linger`) before it
# commits, so records land about as soon as before.
HAND_OVER_DELAY: Final = 0.005
# A writer that keeps ending is started again after these delays, then the last one.
_RESTART_DELAYS: Final = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
# How long a writer may take to open and migrate the database before start() gives up.
START_TIMEOUT: Final = 120.0
# A writer that ran this long before it ended is started again without delay.
_RAN_WELL: Final = 60.0
# How often the writer reports its health when nothing is committed (a refusing database).
_STATUS_EVERY: Final = 0.25

REASON_WRITER_ENDED: Final = "writer process ended before writing it"
REASON_UNSENT_OVERFLOW: Final = "writer process not reading: rows dropped"

_COUNTERS: Final = ("written", "batches", "retries", "dropped", "stripped", "replays_present")

Op = tuple[str, str, Any, int | None]  # (INSERT or UPSERT, table, row, replay number)

# Messages to the writer: ("open", path, options, log level, progress id),
# ("rows", first row number, ops, new replays, forgotten replays), ("replays", known),
# ("flush",), ("lost", losses), ("close", timeout).
# From it: ("ready", last row the log holds), ("error", text), ("log", level, logger, text),
# ("status", completed, stats, health), ("closed", stats, completed).


def _frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    """`n` bytes, or None at the end of the pipe (a raw pipe may return fewer per read)."""
    data = stream.read(n)
    if not data:
        return None
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            return None
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_message(stream: IO[bytes]) -> tuple[Any, ...] | None:
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    data = _read_exactly(stream, size)
    return None if data is None else pickle.loads(data)


class _Frame:
    """A message on its way to the writer. A frame of rows keeps its bytes until the writer
    reports them committed, or until the memory bound lets them go (then only their tables
    are kept, to count them should they be lost). Bytes, not the rows: one object the
    garbage collector never walks, where thousands of row dicts kept while the writer
    catches up would make each collection of the young generations stall the event loop."""

    __slots__ = ("data", "first_row", "last_row", "size", "tables")

    def __init__(self, data: bytes, first_row: int = 0, ops: list[Op] | None = None) -> None:
        self.data: bytes | None = data
        self.size = len(data)
        self.first_row = first_row
        self.last_row = first_row + len(ops) - 1 if ops else 0
        self.tables = [op[1] for op in ops] if ops else []

    @property
    def rows(self) -> int:
        return self.last_row - self.first_row + 1 if self.first_row else 0

    def ops(self) -> list[Op] | None:
        """The rows of a frame still kept (decoded again: only needed when a writer ended)."""
        if self.data is None or not self.rows:
            return None
        ops: list[Op] = pickle.loads(memoryview(self.data)[_HEADER.size :])[2]
        return ops

    def tables_from(self, row: int) -> list[str]:
        """The tables of this frame's rows numbered `row` and later."""
        return self.tables[max(0, row - self.first_row) :]


class _Writer:
    """One writer process, as the proxy sees it."""

    def __init__(self, popen: subprocess.Popen[bytes], holds: int) -> None:
        self.popen = popen
        self.holds = holds  # the last row the log held when it started
        self.started = time.monotonic()
        assert popen.stdin is not None and popen.stdout is not None
        self.fd = popen.stdin.fileno()
        self.stdout = popen.stdout
        self.stats: dict[str, int] = dict.fromkeys(_COUNTERS, 0) | {"queue_depth": 0}
        self.health: dict[str, Any] = {"state": "ok"}
        self.closed = False  # it reported a clean end


class WriterProcess:
    """Queue rows from the event loop (or any thread); a writer process writes them.

    The same producer's interface as Recorder: insert, upsert, flush, close, stats, health.
    """

    def __repr__(self) -> str:
        return f"<WriterProcess {self.where}>"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_queue: int = 100_000,
        batch_size: int = 1000,
        busy_timeout_ms: int = 5000,
        linger: float = 0.05,
        max_unsent_bytes: int = MAX_UNSENT_BYTES,
        max_kept_bytes: int = MAX_KEPT_BYTES,
        hand_over_delay: float = HAND_OVER_DELAY,
    ) -> None:
        check_options(max_queue, batch_size, busy_timeout_ms, linger)
        if not hand_over_delay >= 0:
            raise ValueError("need hand_over_delay >= 0")
        self.path = os.fspath(path)
        self.where = addresses.display(self.path)
        self._options = {
            "max_queue": max_queue,
            "batch_size": batch_size,
            "busy_timeout_ms": busy_timeout_ms,
            "linger": linger,
        }
        self.max_unsent_bytes = max_unsent_bytes
        self.max_kept_bytes = max_kept_bytes
        self.hand_over_delay = hand_over_delay
        # This bridge's row in _writer_progress: the same for each writer it starts.
        self._progress_id = f"writer-{uuid.uuid4()}"

        # Guards everything below up to _done; held only for O(frame) work, never while
        # waiting for a writer to start.
        self._lock = threading.RLock()
        self._outbox: list[Op] = []
        self._flush_scheduled: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # where the hooks run
        self._unsent: deque[_Frame] = deque()  # not yet (all) in the pipe
        self._unsent_bytes = 0
        self._unsent_rows = 0
        self._head_written = 0  # bytes of _unsent[0] already in the pipe
        self._watching: asyncio.AbstractEventLoop | None = None  # add_writer registered there
        self._overflowing = False  # rows are being dropped: logged once until it drains
        self._handed: deque[_Frame] = deque()  # in the writer, not yet reported committed
        self._doubt: list[_Frame] = []  # handed to a writer that ended: committed or not?
        self._kept: deque[_Frame] = deque()  # frames still holding their rows, oldest first
        self._kept_bytes = 0
        self._rows = 0  # the last row number given out
        self._writer: _Writer | None = None
        self._accepting = True
        self._closing = False
        self._started = False
        self._ended_reason: str | None = None  # why the last writer ended, while none runs
        # Clear while a writer that ended is being replaced (close() waits for that).
        self._restarting = threading.Event()
        self._restarting.set()
        self._closed = threading.Event()  # cuts a restart's delay short
        self._restarts = 0  # writers started again after one ended
        self._restart_streak = 0  # restarts since a writer last ran for a while
        self._ignored_after_close = 0

        # Replay marks stand for themselves only in this process: the writer knows them by
        # number (see Replay), and forgets a number once its mark is gone here.
        self._replay_keys: weakref.WeakKeyDictionary[Replay, int] = weakref.WeakKeyDictionary()
        self._replay_count = 0
        self._new_replays: list[tuple[int, str | None]] = []
        self._forgotten: list[int] = []

        # What the writers reported; guarded by _done (taken after _lock, never before).
        self._done = threading.Condition()
        self._completed = 0  # every row up to this number is committed or counted lost
        self._base_stats: Counter[str] = Counter()  # the counters of writers that ended
        self._lost_here = 0  # rows lost in this process
        self._losses: Counter[LossKey] = Counter()  # for the writer to record
        self._rewritten = 0  # rows handed again to a new writer

    # ---- producer side -------------------------------------------------------

    def insert(self, table: str, row: dict[str, Any], replay: Replay | None = None) -> None:
        """Queue `row` for insertion into `table` (see Recorder.insert)."""
        self._enqueue(INSERT, table, row, replay)

    def upsert(self, table: str, row: dict[str, Any], replay: Replay | None = None) -> None:
        """Queue an upsert by primary key "id" (see Recorder.upsert)."""
        self._enqueue(UPSERT, table, row, replay)

    def _enqueue(self, kind: str, table: str, row: Any, replay: Replay | None) -> None:
        try:
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            with self._lock:
                if not self._accepting:
                    self._ignored_after_close += 1
                    if self._ignored_after_close == 1:
                        log.warning(
                            "recorder is closed; ignoring rows for %s (and any later ones)",
                            table,
                        )
                    return
                key = None if replay is None else self._replay_key(replay)
                self._outbox.append((kind, table, row, key))
                scheduled = self._flush_scheduled
                if scheduled is not None and not scheduled.is_closed():
                    return  # a hand-over is due (a closed loop will never run it)
                if loop is not None:
                    # One frame per hand_over_delay (0: per turn of the loop), written after
                    # the hooks that queued its rows.
                    self._loop = self._flush_scheduled = loop
                    if self.hand_over_delay > 0:
                        loop.call_later(self.hand_over_delay, self._send_outbox_soon)
                    else:
                        loop.call_soon(self._send_outbox_soon)
                elif self._loop is not None and not self._loop.is_closed():
                    # Another thread (the budgets' publisher): the loop writes it, so that
                    # nothing ever waits on the pipe while holding the lock the hooks take.
                    self._flush_scheduled = self._loop
                    self._loop.call_soon_threadsafe(self._send_outbox_soon)
                else:
                    # No event loop at all (a test, a tool): hand it over now.
                    self._send_outbox(blocking=True)
        except Exception:
            # The proxy must never fail because of its audit log.
            log.exception("recorder could not queue a row for %s", table)

    def _replay_key(self, replay: Replay) -> int:
        key = self._replay_keys.get(replay)
        if key is None:
            self._replay_count += 1
            key = self._replay_keys[replay] = self._replay_count
            self._new_replays.append((key, replay.flow_id))
            weakref.finalize(replay, self._forget_replay, key)
        return key

    def _forget_replay(self, key: int) -> None:
        with self._lock:
            self._forgotten.append(key)

    def _send_outbox_soon(self) -> None:
        try:
            with self._lock:
                self._flush_scheduled = None
                self._send_outbox(blocking=False)
        except Exception:
            log.exception("recorder could not hand rows to its writer")

    def _send_outbox(self, *, blocking: bool, deadline: float | None = None) -> bool:
        """Frame the queued rows and write what the pipe takes (called with _lock held).
        Blocking: until every frame is written or `deadline`; returns whether all were."""
        if self._outbox:
            ops, self._outbox = self._outbox, []
            news, self._new_replays = self._new_replays, []
            gone, self._forgotten = self._forgotten, []
            first = self._rows + 1
            data = _frame(("rows", first, ops, news, gone))
            if self._unsent_bytes + len(data) > self.max_unsent_bytes:
                # Never numbered, so the numbers stay those the writers count.
                self._count_lost(Counter(op[1] for op in ops), REASON_UNSENT_OVERFLOW)
                self._forgotten.extend(gone)
                if not self._overflowing:
                    self._overflowing = True
                    log.error(
                        "audit log writer is not reading (%d MiB wait for it): dropping rows "
                        "until it reads again",
                        self._unsent_bytes >> 20,
                    )
            else:
                self._rows += len(ops)
                self._queue_frame(_Frame(data, first, ops))
            if self._losses and self._writer is not None:
                with self._done:
                    losses, self._losses = self._losses, Counter()
                self._queue_frame(_Frame(_frame(("lost", losses))))
        return self._pump(blocking=blocking, deadline=deadline)

    def _queue_frame(self, frame: _Frame, *, first: bool = False) -> None:
        """Put `frame` last in line, or first (before a frame partly written, never inside
        it) (called with _lock held)."""
        if not first:
            self._unsent.append(frame)
        elif self._head_written == 0:
            self._unsent.appendleft(frame)
        else:
            self._unsent.insert(1, frame)
        self._unsent_bytes += frame.size
        self._unsent_rows += frame.rows

    def _pump(self, *, blocking: bool, deadline: float | None = None) -> bool:
        """Write frames to the writer's pipe (called with _lock held, once).

        Blocking, it waits for a full pipe with the lock released: the hooks take that lock
        to queue rows, and a thread flushing must never hold them up while the writer
        catches up (the frames are consistent between two writes)."""
        writer = self._writer
        if writer is None:
            return not self._unsent  # they wait for the next writer
        unsent = self._unsent
        while unsent:
            head = unsent[0]
            assert head.data is not None
            try:
                n = os.write(writer.fd, memoryview(head.data)[self._head_written :])
            except BlockingIOError:
                if not blocking:
                    self._watch_pipe(writer)
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.release()
                try:
                    select.select([], [writer.fd], [], left)
                finally:
                    self._lock.acquire()
                if self._writer is not writer:  # it ended meanwhile: frames wait for the next
                    return False
                continue
            except OSError:
                # The writer is gone: its reader thread notices and starts another one.
                return False
            self._head_written += n
            if self._head_written == len(head.data):
                unsent.popleft()
                self._unsent_bytes -= head.size
                self._unsent_rows -= head.rows
                self._head_written = 0
                if head.rows:
                    self._handed.append(head)
                    self._keep(head)
                else:
                    head.data = None
        self._unwatch_pipe()
        self._overflowing = False
        return True

    def _keep(self, frame: _Frame) -> None:
        """Hold the frame's rows until committed, within the memory bound (called with _lock
        held)."""
        self._kept.append(frame)
        self._kept_bytes += frame.size
        while self._kept_bytes > self.max_kept_bytes and self._kept:
            oldest = self._kept.popleft()
            self._kept_bytes -= oldest.size
            oldest.data = None  # its tables stay, to count its rows should they be lost

    def _unkeep(self, frame: _Frame) -> None:
        if frame.data is not None:
            frame.data = None
            self._kept_bytes -= frame.size
            # Committed frames leave in order, so this is nearly always the oldest.
            if self._kept and self._kept[0] is frame:
                self._kept.popleft()
            else:
                with contextlib.suppress(ValueError):
                    self._kept.remove(frame)

    def _watch_pipe(self, writer: _Writer) -> None:
        """Write the rest when the pipe drains (only ever from the event loop's thread)."""
        if self._watching is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.add_writer(writer.fd, self._on_writable)
        self._watching = loop

    def _unwatch_pipe(self, writer: _Writer | None = None) -> None:
        loop, self._watching = self._watching, None
        writer = writer or self._writer
        if loop is None or writer is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.remove_writer(writer.fd)
        else:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nothing to undo
                loop.call_soon_threadsafe(_remove_writer, loop, writer.fd)

    def _on_writable(self) -> None:
        try:
            with self._lock:
                self._pump(blocking=False)
        except Exception:
            log.exception("recorder could not hand rows to its writer")

    def _count_lost(self, tables: Counter[str], reason: str) -> None:
        """Rows that will never be written (called with _lock held)."""
        with self._done:
            for table, n in tables.items():
                self._losses[(table, None, reason)] += n
            self._lost_here += sum(tables.values())
            self._done.notify_all()

    # ---- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the writer; returns once the database is open and migrated."""
        if self._closing:
            raise RecorderError("recorder is closed")
        if self._started:
            return
        writer = self._spawn()
        with self._lock:
            self._install(writer)
            self._pump(blocking=True)
        self._started = True

    def _spawn(self) -> _Writer:
        """A new writer process, once it has opened the database. Never called with _lock
        held: the hooks must not wait for a writer's start."""
        env = dict(os.environ)
        # The child imports this package from where the proxy found it.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        popen = subprocess.Popen(
            # -P: never an "aibridge" of the current directory instead of this one.
            [sys.executable, "-P", "-m", "aibridge.record.writer_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
            # Not in the proxy's process group: a Ctrl-C there must not stop the writer
            # before the proxy has handed it everything.
            start_new_session=True,
        )
        assert popen.stdin is not None and popen.stdout is not None
        level = logging.getLogger("aibridge").getEffectiveLevel()
        try:
            # The address travels on the pipe, never on a command line (it may hold a password).
            opening = _frame(("open", self.path, self._options, level, self._progress_id))
            view = memoryview(opening)
            while view:
                view = view[os.write(popen.stdin.fileno(), view) :]
            answer = self._first_answer(popen)
        except BaseException:
            popen.kill()
            popen.wait()
            raise
        if answer[0] != "ready":
            popen.wait()
            raise RecorderError(str(answer[1]))
        os.set_blocking(popen.stdin.fileno(), False)
        return _Writer(popen, int(answer[1]))

    def _first_answer(self, popen: subprocess.Popen[bytes]) -> tuple[Any, ...]:
        assert popen.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            ready, _, _ = select.select([popen.stdout], [], [], deadline - time.monotonic())
            if not ready:
                raise RecorderError(
                    f"cannot open audit database {self.where}: the writer did not start "
                    f"within {START_TIMEOUT:.0f} s"
                )
            message = _read_message(popen.stdout)
            if message is None:
                code = popen.wait()
                return (
                    "error",
                    f"cannot open audit database {self.where}: the writer process exited "
                    f"({_exit_reason(code)}) before opening it",
                )
            if message[0] == "log":
                _relog(message)
                continue
            return message

    def _install(self, writer: _Writer) -> None:
        """Make `writer` the one rows go to (called with _lock held). What an ended writer
        held and the log lacks is handed again, first; what could not be kept is counted."""
        self._writer = writer
        self._ended_reason = None
        holds = writer.holds
        # Every row up to this one is in the log or counted lost. Frames no longer kept are
        # the oldest (see _keep), so the lost rows come right after those the log holds.
        accounted = holds
        again: list[_Frame] = []
        lost: Counter[str] = Counter()
        for frame in self._doubt:
            if frame.last_row <= holds:
                self._unkeep(frame)
                continue  # committed before that writer ended
            start = max(frame.first_row, holds + 1)
            ops = frame.ops()
            if ops is not None:
                ops = ops[start - frame.first_row :]
                self._unkeep(frame)
                again.append(_Frame(_frame(("rows", start, ops, [], [])), start, ops))
            else:
                lost.update(frame.tables_from(start))
                if not again:
                    accounted = frame.last_row
        doubted = sum(f.rows for f in self._doubt)
        self._doubt = []
        if lost:
            self._count_lost(lost, REASON_WRITER_ENDED)
        with self._done:
            if accounted > self._completed:
                self._completed = accounted
            losses, self._losses = self._losses, Counter()
            self._done.notify_all()
        # In the order the writer must take them: losses, the replays it must know, the rows
        # handed again (lower numbers), then what was waiting.
        queued: list[_Frame] = []
        if losses:
            queued.append(_Frame(_frame(("lost", losses))))
        known = [(key, replay.flow_id) for replay, key in self._replay_keys.items()]
        if known and (again or self._unsent):
            queued.append(_Frame(_frame(("replays", known))))
        queued.extend(again)
        for frame in reversed(queued):
            self._queue_frame(frame, first=True)
        rewritten = sum(f.rows for f in again)
        self._rewritten += rewritten
        if doubted:
            log.warning(
                "audit log writer started again: of %d rows the last one had not reported "
                "written, the log holds %d, %d are handed over again, %d were no longer kept "
                "and are lost",
                doubted,
                doubted - rewritten - sum(lost.values()),
                rewritten,
                sum(lost.values()),
            )
        threading.Thread(
            target=self._read_writer, args=(writer,), name="aibridge-writer-reader", daemon=True
        ).start()

    def _read_writer(self, writer: _Writer) -> None:
        """The writer's reports, until its pipe ends (a thread per writer)."""
        while True:
            try:
                message = _read_message(writer.stdout)
            except Exception as exc:
                log.error("recorder could not read its writer's report: %s", exc)
                message = None
            if message is None:
                break
            kind = message[0]
            if kind == "status":
                self._on_status(writer, message[1], message[2], message[3])
            elif kind == "log":
                _relog(message)
            elif kind == "closed":
                writer.closed = True
                self._on_status(writer, message[2], message[1], {"state": "stopped"})
        self._on_writer_ended(writer)

    def _on_status(
        self, writer: _Writer, completed: int, stats: dict[str, int], health: dict[str, Any]
    ) -> None:
        with self._lock:
            if writer is not self._writer:
                return
            handed = self._handed
            while handed and handed[0].last_row <= completed:
                self._unkeep(handed.popleft())
            with self._done:
                writer.stats = stats
                writer.health = health
                if completed > self._completed:
                    self._completed = completed
                self._done.notify_all()

    def _on_writer_ended(self, writer: _Writer) -> None:
        code = writer.popen.wait()
        with self._lock:
            if writer is not self._writer:
                return
            self._writer = None
            self._unwatch_pipe(writer)
            self._head_written = 0  # that frame is handed again whole
            self._doubt.extend(self._handed)
            self._handed.clear()
            with self._done:
                self._base_stats.update({k: writer.stats.get(k, 0) for k in _COUNTERS})
                writer.stats = {}
            if writer.closed and self._closing:
                return
            self._ended_reason = f"writer process ended ({_exit_reason(code)})"
            if time.monotonic() - writer.started > _RAN_WELL:
                self._restart_streak = 0
            self._restarting.clear()
            doubted = sum(f.rows for f in self._doubt)
        log.error(
            "audit log writer process ended (%s) with %d rows not reported written; starting a "
            "new one, which writes those the log does not hold",
            _exit_reason(code),
            doubted,
        )
        self._restart()

    def _restart(self) -> None:
        """Start writers until one runs (in the ended writer's reader thread); close() takes
        over once the proxy is closing."""
        try:
            while True:
                delay = _RESTART_DELAYS[min(self._restart_streak, len(_RESTART_DELAYS) - 1)]
                self._restart_streak += 1
                if delay:
                    self._closed.wait(delay)
                with self._lock:
                    if self._closing:
                        return
                try:
                    writer = self._spawn()
                except Exception as exc:
                    log.error("audit log writer could not start again: %s", exc)
                    continue
                with self._lock:
                    self._install(writer)
                    self._restarts += 1
                    self._pump(blocking=False)
                return
        finally:
            self._restarting.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed (or recorded as lost)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if not self._started:
                return not self._outbox
            self._send_outbox(blocking=True, deadline=deadline)
            target = self._rows
            if self._writer is not None:
                self._queue_frame(_Frame(_frame(("flush",))))
                self._pump(blocking=True, deadline=deadline)
        with self._done:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self._done.wait_for(lambda: self._completed >= target, left)

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Hand over what is queued, let the writer write it, and wait for it to end.

        Waits at most `timeout` seconds (None: for ever) for a database that refuses writes
        (see Recorder.close)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._accepting = False
            already, self._closing = self._closing, True
            if already:
                return
            self._closed.set()
            if not self._started:
                if self._outbox:
                    log.warning(
                        "recorder closed before start: %d rows never written", len(self._outbox)
                    )
                return
        # A writer being replaced: the restart ends on seeing _closing, or installs a writer.
        self._restarting.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = bool(self._unsent or self._outbox or self._doubt or self._losses)
            missing = self._writer is None and left
        if missing:
            # A writer ended and none replaced it yet: one more writes what is left.
            try:
                replacement = self._spawn()
            except Exception as exc:
                log.error(
                    "audit log writer could not start to write the last %d rows: %s",
                    self.stats["queue_depth"],
                    exc,
                )
                return
            with self._lock:
                self._install(replacement)
        with self._lock:
            self._send_outbox(blocking=True, deadline=deadline)
            self._queue_frame(_Frame(_frame(("close", timeout))))
            self._pump(blocking=True, deadline=deadline)
            writer = self._writer
            if writer is not None:
                with contextlib.suppress(OSError):
                    writer.popen.stdin.close()  # type: ignore[union-attr]
        if writer is None:
            return
        # The writer needs the timeout for the database, and a little to report and exit.
        wait = None if deadline is None else max(0.0, deadline - time.monotonic()) + 10.0
        try:
            writer.popen.wait(wait)
        except subprocess.TimeoutExpired:
            log.error("audit log writer did not end in time: stopping it")
            writer.popen.kill()
            writer.popen.wait()

    # ---- reports -------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            waiting = len(self._outbox) + self._unsent_rows + sum(f.rows for f in self._doubt)
            with self._done:
                writer = self._writer
                current = writer.stats if writer is not None else {}
                counters = {k: self._base_stats[k] + current.get(k, 0) for k in _COUNTERS}
                counters["dropped"] += self._lost_here
                queue = current.get("queue_depth", 0) + waiting
        return counters | {
            "queue_depth": queue,
            "ignored_after_close": self._ignored_after_close,
            "writer_restarts": self._restarts,
            "rewritten": self._rewritten,
        }

    @property
    def health(self) -> dict[str, Any]:
        """As Recorder.health: ``ok``, ``retrying`` (rows wait: the database refuses writes,
        or a new writer is starting) or ``stopped``."""
        stats = self.stats
        with self._done:
            writer = self._writer
            ended = self._ended_reason
            reported = dict(writer.health) if writer is not None else {}
        if not self._accepting or (writer is None and ended is None):
            state, error = "stopped", None
        elif writer is None:
            state, error = "retrying", f"{ended}; starting a new writer"
        else:
            state, error = reported.get("state", "ok"), reported.get("error")
        report: dict[str, Any] = {
            "state": state,
            "queue_rows": stats["queue_depth"],
            "rows_written": stats["written"],
            "rows_lost": stats["dropped"],
        }
        if state == "retrying":
            report["error"] = error
        return report

    @property
    def writer_pid(self) -> int | None:
        """The process id of the writer running now, if any."""
        writer = self._writer
        return None if writer is None else writer.popen.pid


WRITER_MODES: Final = ("process", "thread")
LogWriter = Recorder | WriterProcess


def log_writer(path: str | os.PathLike[str], mode: str = "process") -> LogWriter:
    """The audit log's writer: in a process of its own, or as a thread of this one."""
    if mode == "thread":
        return Recorder(path)
    if mode == "process":
        return WriterProcess(path)
    raise ValueError(f"writer mode must be one of {', '.join(WRITER_MODES)}, not {mode!r}")


def _remove_writer(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    with contextlib.suppress(Exception):
        loop.remove_writer(fd)


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _relog(message: tuple[Any, ...]) -> None:
    _, level, name, text = message
    logging.getLogger(str(name)).log(int(level), "%s", text)


# ---- the writer process -------------------------------------------------------------------


class _PipeLogHandler(logging.Handler):
    """Sends the writer's log records to the proxy, which logs them as its own."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(("log", record.levelno, record.name, text))
        except Exception:
            self.handleError(record)


class _Child:
    """The writer process's side: frames in on stdin, reports out on a private pipe."""

    def __init__(self, inp: IO[bytes], out: IO[bytes]) -> None:
        self._inp = inp
        self._out = out
        self._out_lock = threading.Lock()
        self._recorder: Recorder | None = None
        self._replays: dict[int, Replay] = {}
        self._close_timeout: float | None = CLOSE_TIMEOUT
        self._reported: tuple[Any, ...] | None = None

    def send(self, message: tuple[Any, ...]) -> None:
        data = _frame(message)
        with self._out_lock:
            try:
                self._out.write(data)
                self._out.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # the proxy is gone: the rows are still written

    def run(self) -> int:
        opening = _read_message(self._inp)
        if opening is None or opening[0] != "open":
            return 2
        _, path, options, level, progress_id = opening
        root = logging.getLogger()
        root.handlers[:] = [_PipeLogHandler(self.send)]
        root.setLevel(level)
        recorder = Recorder(path, progress_id=progress_id, **options)
        try:
            recorder.start()
        except RecorderError as exc:
            self.send(("error", str(exc)))
            return 1
        self._recorder = recorder
        self.send(("ready", recorder.progress_found))
        threading.Thread(target=self._report, name="aibridge-writer-report", daemon=True).start()
        try:
            self._serve(recorder)
        finally:
            recorder.close(self._close_timeout)
            self.send(("closed", recorder.stats, recorder.completed))
        return 0

    def _serve(self, recorder: Recorder) -> None:
        replays = self._replays
        while True:
            message = _read_message(self._inp)
            if message is None:
                return
            kind = message[0]
            if kind == "rows":
                _, first, ops, news, gone = message
                for key, flow_id in news:
                    replays[key] = Replay(flow_id)
                if ops:
                    recorder.renumber(first)
                for op, table, row, key in ops:
                    replay = None if key is None else replays.get(key)
                    if op == UPSERT:
                        recorder.upsert(table, row, replay)
                    else:
                        recorder.insert(table, row, replay)
                for key in gone:
                    replays.pop(key, None)
            elif kind == "replays":
                for key, flow_id in message[1]:
                    replays.setdefault(key, Replay(flow_id))
            elif kind == "flush":
                threading.Thread(target=self._flush, daemon=True).start()
            elif kind == "lost":
                recorder.add_losses(message[1])
            elif kind == "close":
                self._close_timeout = message[1]

    def _flush(self) -> None:
        recorder = self._recorder
        if recorder is not None:
            recorder.flush(None)
            self._send_status(force=True)

    def _report(self) -> None:
        """Report progress as batches commit, and health while the database refuses."""
        recorder = self._recorder
        assert recorder is not None
        seen = 0
        while True:
            seen = recorder.wait_progress(seen, _STATUS_EVERY)
            self._send_status()

    def _send_status(self, *, force: bool = False) -> None:
        recorder = self._recorder
        assert recorder is not None
        completed = recorder.completed
        stats, health = recorder.stats, recorder.health
        report = (completed, stats, health)
        if force or report != self._reported:
            self._reported = report
            self.send(("status", completed, stats, health))


def main() -> int:
    # Stopped by its pipe closing, never by the proxy's signals (see the module docstring).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Reports go on a private copy of stdout; anything printed goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return _Child(sys.stdin.buffer, out).run()


if __name__ == "__main__":
    sys.exit(main())
