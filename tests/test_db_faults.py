"""The audit database misbehaves; the proxy keeps serving and the records catch up.

Through a real mitmdump: a long reader, a writer holding the lock, a read-only file and a
full disk (a file-size limit set on the mitmdump process). In process, with the addon's
hooks driven directly: a disk that hangs, a queue that overflows, a shutdown that cannot
wait for ever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any
from unittest import mock

import httpx
import orjson
import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from aibridge import bridge as bridge_module
from aibridge.bridge import AIBridge
from aibridge.record import schema
from aibridge.record.recorder import REASON_CONTENT_SHED, REASON_ROW_SHED, Recorder
from devtools import mitmdump_process
from devtools.fake_upstream import FakeUpstream
from tests.harness import TOKENS, Mitmdump, bridge_config, query, wait_for, writer_processes

SAFETY = 60.0  # upper bound for waits; never asserted as a duration
FIXTURES = Path(__file__).parent / "fixtures"
# model -> (tool usages, thoughts) the fake upstream produces for one exchange
MODELS = {"fake-text": (0, 0), "fake-tool": (1, 0), "fake-reasoning": (0, 3)}


# ---------------------------------------------------------------- through mitmdump


def _pump(pipe: IO[bytes], path: Path) -> None:
    with path.open("ab") as log:
        for line in iter(pipe.readline, b""):
            log.write(line)
            log.flush()


class PipedMitmdump(Mitmdump):
    """mitmdump whose output reaches its log file through a pipe, so that a file-size
    limit set on the process (a full disk) hits the database and nothing else."""

    def start(self, timeout: float = 30.0) -> PipedMitmdump:
        real_popen = subprocess.Popen

        def popen(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
            kw["stdout"] = subprocess.PIPE
            proc = real_popen(args, **kw)
            assert proc.stdout is not None
            threading.Thread(target=_pump, args=(proc.stdout, self.log_path), daemon=True).start()
            return proc

        with mock.patch.object(mitmdump_process.subprocess, "Popen", popen):
            super().start(timeout)
        return self


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipedMitmdump]:
    workdir = tmp_path_factory.mktemp("dbfaults")
    with FakeUpstream() as fake, PipedMitmdump(workdir, bridge_config(fake.url)) as bridge:
        yield bridge


def exchanges(bridge: Mitmdump, tag: str, n: int = 12) -> list[str]:
    """n exchanges over all fake models, streamed and buffered; every one answered 200."""
    models = list(MODELS)

    def one(i: int) -> str:
        prompt = f"{tag} {i}"
        body = {"model": models[i % len(models)], "input": prompt, "stream": i % 2 == 0}
        r = httpx.post(
            f"{bridge.url}/openai/v1/responses",
            content=orjson.dumps(body),
            headers={"authorization": f"Bearer {TOKENS['bob']}"},
            timeout=SAFETY,
        )
        assert r.status_code == 200, r.text
        return prompt

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(one, range(n)))


def recorded(db_path: Path, tag: str) -> list[dict[str, Any]]:
    return query(
        db_path,
        "select i.* from interceptions i join user_prompts p on p.interception_id = i.id "
        "where p.prompt like ? and i.ended_at is not null",
        (f"{tag} %",),
    )


def refused(bridge: Mitmdump) -> int:
    """How often the recorder has logged that SQLite refused a batch."""
    return bridge.log().count("audit database refused a batch")


def assert_all_recorded(db_path: Path, tag: str, n: int = 12) -> None:
    """Every exchange of the batch is in the file, whole, and nothing is marked lost."""
    rows = wait_for(lambda: len(recorded(db_path, tag)) == n and recorded(db_path, tag), SAFETY)
    assert rows and len(rows) == n
    assert {r["status"] for r in rows} == {"completed"}
    assert {r["initiator_id"] for r in rows} == {"bob"}
    ids = tuple(r["id"] for r in rows)
    marks = ",".join("?" * len(ids))

    def count(table: str) -> int:
        sql = f"select count(*) as n from {table} where interception_id in ({marks})"
        return query(db_path, sql, ids)[0]["n"]

    models = list(MODELS)
    assert count("token_usages") == n
    assert count("tool_usages") == sum(MODELS[models[i % 3]][0] for i in range(n))
    assert count("model_thoughts") == sum(MODELS[models[i % 3]][1] for i in range(n))
    assert query(db_path, "select * from recorder_losses") == []


def test_a_long_reader_does_not_hold_up_the_writer(served: PipedMitmdump) -> None:
    tag = f"reader-{uuid.uuid4().hex}"
    reader = sqlite3.connect(served.db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        before = reader.execute("select count(*) from interceptions").fetchone()[0]
        exchanges(served, tag)
        # WAL: the writer goes on while the reader keeps its snapshot.
        assert_all_recorded(served.db_path, tag)
        assert reader.execute("select count(*) from interceptions").fetchone()[0] == before
    finally:
        reader.close()


def test_a_locked_database_waits_and_catches_up(served: PipedMitmdump) -> None:
    tag = f"locked-{uuid.uuid4().hex}"
    blocker = sqlite3.connect(served.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        exchanges(served, tag)  # the proxy keeps serving
        assert recorded(served.db_path, tag) == []  # records wait in the queue
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert_all_recorded(served.db_path, tag)


def _immutable(paths: list[Path], on: bool) -> None:
    for path in paths:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)


def _can_make_files_immutable(probe: Path) -> bool:
    """As root, permission bits stop no write; the immutable flag does, even on a file
    already open. Only root may set it (and without root, chmod cannot stop a process
    that holds the file open either)."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        return False
    probe.touch()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        return False
    _immutable([probe], False)
    return True


def test_a_read_only_file_waits_and_catches_up(served: PipedMitmdump) -> None:
    if not _can_make_files_immutable(served.workdir / "probe"):
        pytest.skip("needs root and a file system with the immutable flag (chattr +i)")
    tag = f"readonly-{uuid.uuid4().hex}"
    files = [served.db_path, served.db_path.with_name(served.db_path.name + "-wal")]
    refusals = refused(served)
    _immutable(files, True)
    try:
        exchanges(served, tag)
        assert recorded(served.db_path, tag) == []
        assert wait_for(lambda: refused(served) > refusals, SAFETY)
    finally:
        _immutable(files, False)
    assert_all_recorded(served.db_path, tag)


def test_a_full_disk_waits_and_catches_up(served: PipedMitmdump) -> None:
    assert served.proc is not None
    # mitmdump and its writer process, which is the one that writes the database.
    pids = [served.proc.pid, *writer_processes(served.proc.pid)]
    assert len(pids) == 2
    tag = f"full-{uuid.uuid4().hex}"
    limits = {pid: resource.prlimit(pid, resource.RLIMIT_FSIZE) for pid in pids}
    # No write may extend any regular file of the processes: the database is "full". Their
    # logs go through pipes, which the limit does not touch.
    refusals = refused(served)
    for pid, (_, hard) in limits.items():
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))
    try:
        exchanges(served, tag)
        assert recorded(served.db_path, tag) == []
        assert wait_for(lambda: refused(served) > refusals, SAFETY)
    finally:
        for pid, limit in limits.items():
            resource.prlimit(pid, resource.RLIMIT_FSIZE, limit)
    assert_all_recorded(served.db_path, tag)
    assert "Traceback" not in served.log()


# --------------------------------------------------------------------- in process

PROVIDER_KEY = "sk-in-process-provider-key-0123456789"


class InProcess:
    """The addon in a ``taddons`` context; exchanges are fed through its hooks."""

    def __init__(self, addon: AIBridge, db_path: Path) -> None:
        self.addon = addon
        self.db_path = db_path

    @property
    def recorder(self) -> Recorder:
        assert self.addon.recorder is not None
        return self.addon.recorder

    def exchange(self, name: str, prompt_tag: str) -> http.HTTPFlow:
        """One streamed exchange from a golden fixture, its prompt made unique."""
        body = orjson.loads((FIXTURES / f"{name}.request.json").read_bytes())
        body["input"] = prompt_tag
        request = http.Request.make(
            "POST",
            "https://api.openai.com/v1/responses",
            orjson.dumps(body),
            {"authorization": f"Bearer {TOKENS['alice']}", "content-type": "application/json"},
        )
        flow = tflow.tflow(req=request)
        self.addon.request(flow)
        assert flow.response is None
        flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
        self.addon.responseheaders(flow)
        tee = flow.response.stream
        assert callable(tee)
        raw = (FIXTURES / f"{name}.response.sse").read_bytes()
        for i in range(0, len(raw), 512):
            tee(raw[i : i + 512])
        tee(b"")
        self.addon.response(flow)
        return flow


@pytest.fixture
def in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., InProcess]]:
    monkeypatch.chdir(tmp_path)
    with contextlib.ExitStack() as stack:

        def make(**recorder_args: Any) -> InProcess:
            # The recorder in this process (a thread), so that the tests can reach into it.
            monkeypatch.setattr(
                bridge_module,
                "log_writer",
                lambda path, mode: Recorder(path, **recorder_args),
            )
            config = bridge_config("https://api.openai.com", database="audit.db")
            config["providers"][0]["api_key"] = PROVIDER_KEY
            path = tmp_path / "aibridge.yaml"
            path.write_text(yaml.safe_dump(config))
            addon = AIBridge(default_config_dir=tmp_path)
            tctx = stack.enter_context(taddons.context(addon))
            stack.callback(addon.done)
            tctx.configure(addon, aibridge_config=str(path))
            return InProcess(addon, tmp_path / "audit.db")

        yield make


def run_off_thread(work: Callable[[], None]) -> None:
    """Run `work` on a thread; it must finish (a hook that waited for SQLite would not)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(SAFETY)
    assert not thread.is_alive(), "a hook waited for the database"
    if failure:
        raise failure[0]


def test_a_hanging_disk_never_blocks_a_hook(
    in_process: Callable[..., InProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge = in_process()
    disk = threading.Event()
    real_write = Recorder._write

    def hanging_write(self: Recorder, *args: Any) -> int:
        disk.wait(SAFETY)
        return real_write(self, *args)

    monkeypatch.setattr(Recorder, "_write", hanging_write)
    run_off_thread(lambda: [bridge.exchange("text_streamed", f"hang {i}") for i in range(100)])
    assert bridge.recorder.stats["written"] == 0
    disk.set()
    assert bridge.recorder.flush(SAFETY)
    rows = query(bridge.db_path, "select status from interceptions")
    assert [r["status"] for r in rows] == ["completed"] * 100
    assert len(query(bridge.db_path, "select id from token_usages")) == 100


@contextlib.contextmanager
def writer_stuck(bridge: InProcess) -> Iterator[None]:
    """Hold the write lock; the writer retries one sentinel row meanwhile, so everything
    queued after it waits in the queue (where overflow handling applies)."""
    rec = bridge.recorder
    rec.upsert(schema.INTERCEPTIONS, {"id": "sentinel"})
    assert rec.flush(SAFETY)
    blocker = sqlite3.connect(bridge.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        rec.upsert(schema.INTERCEPTIONS, {"id": "sentinel", "status": "sentinel"})
        assert wait_for(lambda: rec.stats["retries"] >= 1, SAFETY)
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_queue_overflow_sheds_content_never_usage(
    in_process: Callable[..., InProcess], caplog: pytest.LogCaptureFixture
) -> None:
    bridge = in_process(max_queue=40, busy_timeout_ms=20)
    n = 30
    with writer_stuck(bridge), caplog.at_level(logging.WARNING, logger="aibridge.record.recorder"):
        # Per exchange: 2 interception upserts, a prompt, a token usage, a tool usage and
        # three thoughts: 240 rows for a queue of 40.
        for i in range(n):
            bridge.exchange("reasoning_commentary_streamed", f"overflow {i}")
        assert bridge.recorder.stats["stripped"] > 0 and bridge.recorder.stats["dropped"] > 0
        assert "dropping content of the oldest" in caplog.text
    with caplog.at_level(logging.WARNING, logger="aibridge.record.recorder"):
        assert bridge.recorder.flush(SAFETY)

    db = bridge.db_path
    interceptions = query(db, "select * from interceptions where id != 'sentinel'")
    assert len(interceptions) == n
    assert {r["status"] for r in interceptions} == {"completed"}
    assert {r["initiator_id"] for r in interceptions} == {"alice"}
    # Usage rows are never shed: one token usage and one tool usage per exchange.
    assert len(query(db, "select id from token_usages")) == n
    tools = query(db, "select * from tool_usages")
    assert len(tools) == n and all(t["tool"] and t["call_id"] for t in tools)

    losses: dict[tuple[str, str | None, str], int] = {}
    for row in query(db, "select * from recorder_losses"):
        key = (row["table_name"], row["field"], row["reason"])
        losses[key] = losses.get(key, 0) + row["rows"]
    assert set(losses) <= {
        ("user_prompts", "prompt", REASON_CONTENT_SHED),
        ("user_prompts", None, REASON_ROW_SHED),
        ("model_thoughts", "content", REASON_CONTENT_SHED),
        ("model_thoughts", None, REASON_ROW_SHED),
        ("tool_usages", "args", REASON_CONTENT_SHED),
    }
    # Every loss is visible: rows kept plus rows shed is what was produced, and every
    # emptied field is counted.
    for table, column, per_exchange in (
        ("user_prompts", "prompt", 1),
        ("model_thoughts", "content", 3),
        ("tool_usages", "args", 1),
    ):
        kept = query(db, f"select {column} as v from {table}")
        assert len(kept) + losses.get((table, None, REASON_ROW_SHED), 0) == n * per_exchange
        emptied = sum(1 for r in kept if r["v"] is None)
        shed_content = losses.get((table, column, REASON_CONTENT_SHED), 0)
        assert emptied <= shed_content  # a row may be emptied, then dropped whole
    assert losses.get(("user_prompts", "prompt", REASON_CONTENT_SHED), 0) > 0
    assert "audit log lost" in caplog.text and "queue overflow" in caplog.text


def test_a_full_database_waits_and_catches_up(
    in_process: Callable[..., InProcess], caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite's own "database or disk is full", made by capping the file's page count."""
    bridge = in_process(busy_timeout_ms=20)
    caplog.set_level(logging.WARNING, logger="aibridge.record.recorder")
    full = threading.Event()
    real_write = Recorder._write

    def write_on_a_small_disk(self: Recorder, *args: Any) -> int:
        db = self._store._db  # type: ignore[attr-defined]
        assert db is not None
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages if full.is_set() else 1 << 30}")
        return real_write(self, *args)

    with mock.patch.object(Recorder, "_write", write_on_a_small_disk):
        full.set()
        for i in range(20):
            bridge.exchange("reasoning_commentary_streamed", f"full {'x' * 4000} {i}")
        # Rows that fit in pages the file already has still go in; the rest must wait.
        assert wait_for(lambda: bridge.recorder.stats["retries"] >= 2, SAFETY)
        full.clear()
        assert bridge.recorder.flush(SAFETY)
    assert "database or disk is full" in caplog.text
    assert len(query(bridge.db_path, "select id from interceptions")) == 20
    assert len(query(bridge.db_path, "select id from model_thoughts")) == 60
    assert query(bridge.db_path, "select * from recorder_losses") == []


def test_closing_gives_up_on_a_database_that_stays_locked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(tmp_path / "audit.db", busy_timeout_ms=20)
    rec.start()
    blocker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for i in range(10):
            rec.upsert(schema.INTERCEPTIONS, {"id": f"i{i}"})
        with caplog.at_level(logging.ERROR, logger="aibridge.record.recorder"):
            rec.close(timeout=0.2)
        assert "could not finish" in caplog.text and "rows are not written" in caplog.text
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
