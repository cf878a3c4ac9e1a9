"""The audit log's writer in a process of its own (aibridge/record/writer_process.py): the
same log as the thread writes, a writer killed with a batch in hand, a database that stalls
(a slow disk), a shutdown while the writer is behind, and what the proxy's side costs its
event loop (it never waits)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aibridge.record import schema
from aibridge.record.recorder import Recorder, RecorderError, Replay
from aibridge.record.writer_process import REASON_WRITER_ENDED, WriterProcess, log_writer
from tests.harness import wait_for
from tests.log_engines import engine, losses, read
from tests.test_recorder_postgres import exchange

__all__ = ["engine"]  # a fixture, imported for this module's tests

WAIT = 30.0  # generous upper bound for waits; never asserted as a duration
TABLES = ("interceptions", "user_prompts", "token_usages", "tool_usages")
# The rows exchange() queues, per table (interceptions: two upserts of one row).
ROWS_PER_EXCHANGE = {"interceptions": 2, "user_prompts": 1, "token_usages": 1, "tool_usages": 1}


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[WriterProcess]:
    w = WriterProcess(tmp_path / "aibridge.db", linger=0)
    w.start()
    yield w
    w.close(timeout=WAIT)


def table_rows(address: str) -> dict[str, list[dict[str, Any]]]:
    """Every table's rows without their generated keys, in a stable order."""
    found = {}
    for table in TABLES:
        rows = read(address, f"select * from {table}")
        for row in rows:
            if table != "interceptions":
                row.pop("id", None)
            row.pop("prompt_search", None)  # PostgreSQL's generated search column
        found[table] = sorted(rows, key=repr)
    return found


class ExclusiveLock:
    """Another connection holds the SQLite file locked, as a slow or stalled disk would
    keep the writer from committing."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def __enter__(self) -> ExclusiveLock:
        self._conn.execute("BEGIN EXCLUSIVE")
        return self

    def release(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._conn.close()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("pragma integrity_check").fetchone()[0]
    finally:
        conn.close()


# ---- the same log as the thread -------------------------------------------------------------


def test_the_log_is_the_one_the_thread_writes(engine: str, tmp_path: Path) -> None:
    by_process = WriterProcess(engine, linger=0)
    by_thread = Recorder(tmp_path / "by-thread.db", linger=0)
    for rec in (by_process, by_thread):
        rec.start()
        for n in range(60):
            exchange(rec, n, user="alice" if n % 2 else "bob")
        # Values of the types the recorder converts, and text that is not valid Unicode.
        rec.insert(schema.USER_PROMPTS, {"interception_id": "i1", "prompt": "bad \udcff byte"})
        assert rec.flush(WAIT)
        rec.close(timeout=WAIT)
    assert table_rows(engine) == table_rows(str(tmp_path / "by-thread.db"))
    # (Batches differ: the rows reach the writer's queue at their own pace.)
    same = {k: v for k, v in by_thread.stats.items() if k != "batches"}
    assert {k: v for k, v in by_process.stats.items() if k != "batches"} == same | {
        "writer_restarts": 0,
        "rewritten": 0,
    }
    assert losses(engine) == losses(str(tmp_path / "by-thread.db"))


def test_a_database_that_cannot_be_opened_is_named_at_start(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file, so nothing can be created under it")
    w = WriterProcess(blocked / "aibridge.db")
    with pytest.raises(RecorderError, match="cannot open audit database") as caught:
        w.start()
    assert "not-a-dir" in str(caught.value)
    assert w.health["state"] == "stopped"


def test_log_writer_modes(tmp_path: Path) -> None:
    assert isinstance(log_writer(tmp_path / "a.db", "process"), WriterProcess)
    assert isinstance(log_writer(tmp_path / "a.db", "thread"), Recorder)
    with pytest.raises(ValueError, match="process, thread"):
        log_writer(tmp_path / "a.db", "fork")


def test_the_writers_log_lines_come_back_under_their_own_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        w = WriterProcess(tmp_path / "aibridge.db", linger=0)
        w.start()
        w.insert("no_such_table", {"x": 1})
        assert w.flush(WAIT)
        w.close(timeout=WAIT)
    names = {r.name for r in caplog.records}
    assert "aibridge.record.schema" in names  # "applied schema migration ..."
    assert any("lost 1 no_such_table rows: unknown table" in r.getMessage() for r in caplog.records)


def test_replay_marks_keep_one_decision_across_frames(
    writer: WriterProcess, tmp_path: Path
) -> None:
    """A replay's rows come in several frames (turns of the loop); the writer knows the mark
    by its number and decides once."""
    exchange(writer, 1)
    assert writer.flush(WAIT)
    again, fresh = Replay(), Replay()
    writer.upsert(schema.INTERCEPTIONS, {"id": "i1", "status": "completed"}, again)
    writer.upsert(schema.INTERCEPTIONS, {"id": "i2", "status": "completed"}, fresh)
    assert writer.flush(WAIT)
    writer.insert(schema.TOKEN_USAGES, {"interception_id": "i1", "input_tokens": 99}, again)
    writer.insert(schema.TOKEN_USAGES, {"interception_id": "i2", "input_tokens": 7}, fresh)
    assert writer.flush(WAIT)
    address = str(tmp_path / "aibridge.db")
    usages = read(address, "select interception_id, input_tokens from token_usages order by id")
    assert usages == [
        {"interception_id": "i1", "input_tokens": 10},
        {"interception_id": "i2", "input_tokens": 7},
    ]
    assert writer.stats["replays_present"] == 1


# ---- a writer that ends ---------------------------------------------------------------------


def test_a_writer_killed_with_a_batch_in_hand_is_replaced_and_the_batch_written_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "aibridge.db"
    w = WriterProcess(db, linger=0, busy_timeout_ms=50)
    w.start()
    exchange(w, 0)
    assert w.flush(WAIT)
    first = w.writer_pid
    assert first is not None
    with ExclusiveLock(db) as lock, caplog.at_level(logging.WARNING):
        for n in range(1, 21):
            exchange(w, n)
        # The writer holds the batch and cannot commit it.
        assert wait_for(lambda: w.health["state"] == "retrying", WAIT)
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: "starting a new writer" in str(w.health.get("error")), WAIT)
        for n in range(21, 31):
            exchange(w, n)  # kept for the next writer, which cannot open the file yet
        assert w.stats["queue_depth"] == 150
        lock.release()
        assert wait_for(lambda: w.stats["writer_restarts"] == 1, WAIT)
        assert w.writer_pid not in (None, first)
        assert w.flush(WAIT)
    w.close(timeout=WAIT)
    address = str(db)
    for table in ROWS_PER_EXCHANGE:
        column = "id" if table == "interceptions" else "interception_id"
        present = [r[column] for r in read(address, f"select {column} from {table}")]
        assert sorted(present) == sorted(f"i{n}" for n in range(31)), table
    assert losses(address) == {}
    assert w.stats["dropped"] == 0 and w.stats["rewritten"] == 100
    assert "ended (killed by SIGKILL) with 100 rows not reported written" in caplog.text
    assert "the log holds 0, 100 are handed over again, 0 were no longer kept" in caplog.text
    assert integrity(db) == "ok"


@pytest.mark.parametrize("batch_size", [1, 50, 1000])
def test_a_writer_killed_while_writing_leaves_every_row_exactly_once(
    tmp_path: Path, batch_size: int
) -> None:
    """Killed at whatever point of its work (between batches, inside a transaction, after a
    commit it had no time to report): each row is in the log exactly once."""
    db = tmp_path / "aibridge.db"
    w = WriterProcess(db, linger=0, batch_size=batch_size)
    w.start()
    sent = 0
    for kill_at in (300, 600, 900):
        while sent < kill_at + 150:
            exchange(w, sent)
            sent += 1
            if sent == kill_at:
                pid = w.writer_pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: w.writer_pid not in (None, pid), WAIT)  # noqa: B023
    assert w.flush(WAIT)
    w.close(timeout=WAIT)
    assert w.stats["writer_restarts"] == 3
    assert losses(str(db)) == {}
    expected = sorted(f"i{n}" for n in range(sent))
    for table in ROWS_PER_EXCHANGE:
        column = "id" if table == "interceptions" else "interception_id"
        present = [r[column] for r in read(str(db), f"select {column} from {table}")]
        assert sorted(present) == expected, table
    done = read(str(db), "select count(*) as n from interceptions where status = 'completed'")
    assert done == [{"n": sent}]
    assert integrity(db) == "ok"


def test_rows_no_longer_kept_are_counted_exactly_when_the_writer_ends(tmp_path: Path) -> None:
    """Past the memory bound the proxy keeps only which tables its rows were for: a writer
    that ends then costs those rows, each counted, none written twice."""
    db = tmp_path / "aibridge.db"
    w = WriterProcess(db, linger=0, busy_timeout_ms=50, max_kept_bytes=1)
    w.start()
    exchange(w, 0)
    assert w.flush(WAIT)
    with ExclusiveLock(db) as lock:
        for n in range(1, 11):
            exchange(w, n)
        assert wait_for(lambda: w.health["state"] == "retrying", WAIT)
        pid = w.writer_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: "starting a new writer" in str(w.health.get("error")), WAIT)
        lock.release()
    assert wait_for(lambda: w.stats["writer_restarts"] == 1, WAIT)
    exchange(w, 11)
    assert w.flush(WAIT)
    w.close(timeout=WAIT)
    ids = [r["id"] for r in read(str(db), "select id from interceptions")]
    assert sorted(ids) == ["i0", "i11"]
    assert losses(str(db)) == {
        (t, None, REASON_WRITER_ENDED): 10 * k for t, k in ROWS_PER_EXCHANGE.items()
    }
    assert w.stats["dropped"] == 50


def test_a_writer_that_keeps_ending_is_started_again_and_health_says_so(
    writer: WriterProcess,
) -> None:
    for _ in range(2):
        pid = writer.writer_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: writer.writer_pid not in (None, pid), WAIT)  # noqa: B023
    assert writer.stats["writer_restarts"] == 2
    exchange(writer, 1)
    assert writer.flush(WAIT)
    assert writer.health["state"] == "ok"
    assert writer.health["rows_written"] == 5


def test_the_proxys_signals_do_not_stop_the_writer(writer: WriterProcess) -> None:
    """Ctrl-C reaches a process group; the writer is not in the proxy's, and ignores both
    signals anyway: it stops when its pipe closes, after writing what it holds."""
    pid = writer.writer_pid
    assert pid is not None
    assert os.getpgid(pid) != os.getpgid(0)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    exchange(writer, 1)
    assert writer.flush(WAIT)
    assert writer.writer_pid == pid and writer.stats["writer_restarts"] == 0


# ---- a slow disk, and a shutdown while the writer is behind ---------------------------------


def test_a_stalled_database_never_holds_up_the_event_loop(tmp_path: Path) -> None:
    """While the writer cannot commit, the loop keeps turning and every row it queues is
    handed over without waiting; the rows are written once the database moves again."""
    db = tmp_path / "aibridge.db"
    w = WriterProcess(db, linger=0, busy_timeout_ms=50)
    w.start()

    async def traffic() -> int:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        for n in range(2000):
            exchange(w, n)  # as hooks do: one frame per turn of the loop
            if n % 20 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0)
        stop.set()
        await task
        return ticks

    with ExclusiveLock(db) as lock:
        ticks = asyncio.run(traffic())
        assert wait_for(lambda: w.health["state"] == "retrying", WAIT)
        assert w.health["queue_rows"] > 0
        lock.release()
        assert w.flush(WAIT)
    w.close(timeout=WAIT)
    assert ticks >= 100
    assert len(read(str(db), "select id from interceptions")) == 2000
    assert losses(str(db)) == {}


def test_a_pipe_the_writer_does_not_read_makes_rows_wait_then_counted_not_a_stall(
    tmp_path: Path,
) -> None:
    """A writer stopped outright (SIGSTOP) reads nothing: frames wait in memory up to a bound,
    past it rows are counted as lost. The loop never blocks on the pipe."""
    db = tmp_path / "aibridge.db"
    # A frame per turn of the loop, each under the bound: the bound counts frames.
    w = WriterProcess(db, linger=0, max_unsent_bytes=2 * 1024 * 1024, hand_over_delay=0)
    w.start()
    pid = w.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    exchange(w, 0)  # the interception the prompts belong to
    big = "x" * 20_000

    async def traffic() -> None:
        for _ in range(600):  # ~12 MB: far more than the pipe and the bound hold
            w.insert(schema.USER_PROMPTS, {"interception_id": "i0", "prompt": big})
            await asyncio.sleep(0)

    try:
        asyncio.run(traffic())
        assert w.stats["dropped"] > 0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert w.flush(WAIT)
    w.close(timeout=WAIT)
    present = len(read(str(db), "select id from user_prompts")) - 1  # exchange()'s own
    lost = losses(str(db))
    assert present + sum(lost.values()) == 600
    assert set(lost) == {("user_prompts", None, "writer process not reading: rows dropped")}


def test_a_flush_waiting_on_a_full_pipe_never_holds_up_the_hooks(tmp_path: Path) -> None:
    """flush() from another thread waits for a pipe the writer does not read without holding
    the lock the hooks take: rows queued meanwhile go into the outbox at once."""
    db = tmp_path / "aibridge.db"
    w = WriterProcess(db, linger=0)
    w.start()
    pid = w.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    big = "y" * 20_000
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(w.flush(WAIT)))

    async def hooks() -> bool:
        exchange(w, 0)  # the interception the prompts belong to
        for _ in range(200):  # ~4 MB: more than the pipe holds
            w.insert(schema.USER_PROMPTS, {"interception_id": "i0", "prompt": big})
            await asyncio.sleep(0)
        flusher.start()
        await asyncio.to_thread(wait_for, lambda: not w._outbox and flusher.is_alive(), WAIT)
        await asyncio.sleep(0.2)  # the flush is in its wait for the pipe
        w.insert(schema.USER_PROMPTS, {"interception_id": "i0", "prompt": "queued late"})
        return flusher.is_alive()  # the insert came back while the flush still waits

    try:
        assert asyncio.run(hooks())
    finally:
        os.kill(pid, signal.SIGCONT)
    flusher.join(WAIT)
    assert flushed == [True]
    assert w.flush(WAIT)
    w.close(timeout=WAIT)
    assert len(read(str(db), "select id from user_prompts")) == 1 + 200 + 1  # exchange()'s own
    assert losses(str(db)) == {}


def test_rows_waiting_to_be_committed_are_held_as_bytes_not_objects(tmp_path: Path) -> None:
    """What is kept for a writer that might end is the frame as written, not the rows: the
    garbage collector walks none of it (thousands of kept row dicts made its collections of
    the young generations stall the loop while the writer was behind)."""
    import gc

    db = tmp_path / "aibridge.db"
    w = WriterProcess(db, linger=0, busy_timeout_ms=50)
    w.start()
    # Numbers no other test uses: a failed test's traceback may hold its rows alive.
    numbers = range(7000, 7050)
    ids = {f"i{n}" for n in numbers}
    per_exchange = sum(ROWS_PER_EXCHANGE.values())
    with ExclusiveLock(db):
        for n in numbers:
            exchange(w, n)  # rows as the bridge makes them, nested metadata and usage included
        assert wait_for(lambda: w.health["state"] == "retrying", WAIT)
        assert w.stats["written"] == 0  # handed over, none committed: all kept
        gc.collect()
        held = [
            o
            for o in gc.get_objects()
            if isinstance(o, dict) and isinstance(o.get("id"), str) and o["id"] in ids
        ]
        assert held == []
        pid = w.writer_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the kept bytes are what the next writer is given
        assert wait_for(lambda: "starting a new writer" in str(w.health.get("error")), WAIT)
    assert wait_for(lambda: w.stats["writer_restarts"] == 1, WAIT)
    assert w.flush(WAIT)
    w.close(timeout=WAIT)
    present = {r["id"] for r in read(str(db), "select id from interceptions")}
    assert present == ids
    assert len(read(str(db), "select id from token_usages")) == 50
    assert w.stats["rewritten"] == 50 * per_exchange
    assert losses(str(db)) == {}


def test_rows_queued_within_the_hand_over_delay_go_as_one_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aibridge.record import writer_process

    frames: list[int] = []
    make_frame = writer_process._frame

    def counting(message: tuple[Any, ...]) -> bytes:
        if message[0] == "rows":
            frames.append(len(message[2]))
        return make_frame(message)

    monkeypatch.setattr(writer_process, "_frame", counting)
    w = WriterProcess(tmp_path / "aibridge.db", linger=0, hand_over_delay=0.2)
    w.start()

    async def hooks() -> None:
        for n in range(10):  # ten exchanges, each in a turn of its own
            exchange(w, n)
            await asyncio.sleep(0)
        await asyncio.sleep(0.4)  # the hand-over is due once, 0.2 s after the first row

    asyncio.run(hooks())
    assert frames == [10 * sum(ROWS_PER_EXCHANGE.values())]
    assert w.flush(WAIT)
    w.close(timeout=WAIT)
    assert len(read(str(tmp_path / "aibridge.db"), "select id from interceptions")) == 10


def test_a_hand_over_due_on_a_loop_that_closed_is_made_on_the_next(tmp_path: Path) -> None:
    db = tmp_path / "aibridge.db"
    w = WriterProcess(db, linger=0, hand_over_delay=30.0)
    w.start()

    async def queue(first: int) -> None:
        for n in range(first, first + 3):
            exchange(w, n)

    asyncio.run(queue(0))  # closes before its hand-over was due: the rows wait
    w.hand_over_delay = 0.01

    async def next_loop() -> None:
        await queue(3)  # its first row makes a hand-over, of the waiting rows too
        await asyncio.sleep(0.1)

    asyncio.run(next_loop())
    assert wait_for(lambda: len(read(str(db), "select id from interceptions")) == 6, WAIT)
    w.close(timeout=WAIT)
    assert losses(str(db)) == {}


def test_shutdown_while_behind_writes_everything(tmp_path: Path) -> None:
    db = tmp_path / "aibridge.db"
    w = WriterProcess(db, linger=0, busy_timeout_ms=50)
    w.start()
    with ExclusiveLock(db) as lock:
        for n in range(3000):
            exchange(w, n)
        assert wait_for(lambda: w.health["state"] == "retrying", WAIT)
        closing = threading.Thread(target=w.close, kwargs={"timeout": WAIT})
        closing.start()
        assert closing.is_alive()  # waiting for the database, with everything handed over
        lock.release()
        closing.join(WAIT)
    assert not closing.is_alive()
    assert len(read(str(db), "select id from interceptions")) == 3000
    assert len(read(str(db), "select id from tool_usages")) == 3000
    assert losses(str(db)) == {}
    assert w.health["state"] == "stopped"
    exchange(w, 9999)
    assert w.stats["ignored_after_close"] == 5


def test_a_shutdown_that_cannot_finish_in_time_ends_and_says_what_is_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "aibridge.db"
    w = WriterProcess(db, linger=0, busy_timeout_ms=20)
    w.start()
    with ExclusiveLock(db), caplog.at_level(logging.ERROR):
        for n in range(50):
            exchange(w, n)
        assert wait_for(lambda: w.health["state"] == "retrying", WAIT)
        w.close(timeout=0.5)
    assert "recorder could not finish within 0.5 s" in caplog.text
    assert w.health["state"] == "stopped"
