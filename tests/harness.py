"""Test helpers that start real processes: a mitmdump running addon.py, on loopback."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import pytest

from devtools.mitmdump_process import (
    ADDON,
    MITMDUMP,
    REPO,
    MitmdumpProcess,
    local_bridge_config,
)

__all__ = [
    "ADDON",
    "MITMDUMP",
    "REPO",
    "ChunkedReplies",
    "Mitmdump",
    "bridge_config",
    "noon_zone",
    "query",
    "replay_flows",
    "wait_for",
]

PROVIDER_KEY = "sk-test-provider-key-0123456789abcdef"
TOKENS = {"alice": "alice-personal-token-1", "bob": "bob-personal-token-2"}


def required_program(found: str | None, name: str, package: str) -> str:
    """A program a test needs from Debian: its path; else the test is skipped, but fails in
    CI (``CI`` set), where .ci/run installs it."""
    if found is None:
        install = f"apt-get install -y {package}"
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI: {install}")
        pytest.skip(f"{name} is not installed ({install}); CI runs this test")
    return found


class FakeClock:
    """A clock a test moves by hand (``clock.now += 30``), for code that takes a clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def read_while_mutating(
    read: Callable[[], None], mutate: Callable[[int], None], rounds: int = 5_000
) -> int:
    """Call ``read`` over and over on a thread of its own while ``mutate(i)`` runs here for
    each round (a metrics scrape beside the event loop); re-raise what ``read`` raised.
    Returns how many reads ran."""
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        try:
            while not stop.is_set():
                read()
                reads += 1
        except BaseException as e:  # reported in the calling thread
            errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(rounds):
            mutate(i)
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    return reads


def noon_zone() -> str:
    """A time zone in which it is about noon now, for tests of daily budgets: no day, week or
    month can end while they run."""
    offset = datetime.now(UTC).hour - 12  # Etc/GMT+N is N hours behind UTC
    return "UTC" if offset == 0 else f"Etc/GMT{offset:+d}"


def bridge_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    return local_bridge_config(upstream_url, "${TEST_PROVIDER_KEY}", TOKENS, **overrides)


class Mitmdump(MitmdumpProcess):
    """The bridge under test, with the test provider key in its environment."""

    def __init__(self, workdir: Path, config: dict[str, Any], **kw: Any) -> None:
        env = {"TEST_PROVIDER_KEY": PROVIDER_KEY, **(kw.pop("env", None) or {})}
        super().__init__(workdir, config, env=env, **kw)

    def __enter__(self) -> Mitmdump:
        self.start()
        return self

    def rows(self, table: str, order: str = "rowid") -> list[dict[str, Any]]:
        return query(self.db_path, f"select * from {table} order by {order}")


class LoopbackHTTP:
    """An HTTP server of a test (a fake provider, another host) on a free loopback port,
    served from a daemon thread while the ``with`` block runs."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        # A short poll interval keeps shutdown quick.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class ChunkedReplies(LoopbackHTTP):
    """A provider that answers every POST with what ``reply(request headers)`` gives:
    (status, content type, extra headers, body), sent chunked in pieces of 8191 bytes."""

    def __init__(self, reply: Any) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                status, content_type, extra, body = reply(self.headers)
                self.send_response(status)
                self.send_header("content-type", content_type)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for i in range(0, len(body), 8191):
                    piece = body[i : i + 8191]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

        super().__init__(Handler)


def replay_flows(
    flows: Path, config: Path, db: Path, confdir: Path, env: dict[str, str] | None = None
) -> None:
    """``mitmdump -n --rfile flows -s addon.py``: the offline rebuild of a log into `db`."""
    subprocess.run(
        [
            str(MITMDUMP),
            "-n",
            "--rfile",
            str(flows),
            "-s",
            str(ADDON),
            "--set",
            f"aibridge_config={config}",
            "--set",
            f"aibridge_db={db}",
            "--set",
            f"confdir={confdir}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
        env=None if env is None else {**os.environ, **env},
    )


def query(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def writer_processes(pid: int) -> list[int]:
    """The audit log's writer processes (aibridge.record.writer_process) that process `pid`
    started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if (
                ppid == pid
                and b"aibridge.record.writer_process" in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy (records are written by a background thread)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except sqlite3.Error:
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class Datasette:
    """``datasette serve`` on a free loopback port, reading a database the bridge writes."""

    _RUNNING = re.compile(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)")

    def __init__(self, db_path: Path, *extra_args: str) -> None:
        self.db_path = db_path
        self.args = list(extra_args)
        self.log_path = db_path.parent / "datasette.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Datasette:
        exe = Path(sys.executable).parent / "datasette"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(exe), "serve", str(self.db_path), "-h", "127.0.0.1", "-p", "0", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = self._RUNNING.search(self.log_path.read_bytes())
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"datasette did not start:\n{self.log_path.read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def finished_with_prompt(db_path: Path, prompt: str) -> dict[str, Any]:
    """The finished interception whose user prompt is exactly ``prompt`` (waits for it)."""

    def find() -> dict[str, Any] | None:
        rows = query(
            db_path,
            "select i.* from interceptions i join user_prompts p on p.interception_id = i.id "
            "where p.prompt = ? and i.ended_at is not null",
            (prompt,),
        )
        return rows[0] if rows else None

    row = wait_for(find)
    assert row, f"no finished interception with prompt {prompt!r}"
    return row


def children(bridge: MitmdumpProcess, table: str, interception_id: str) -> list[dict[str, Any]]:
    """The rows of `table` that belong to one interception, in the order they were written."""
    sql = f"select * from {table} where interception_id = ? order by rowid"
    return query(bridge.db_path, sql, (interception_id,))


def finished_turns(bridge: MitmdumpProcess, session: str, count: int) -> list[dict[str, Any]]:
    """The finished interceptions of a client session, once there are `count` of them."""
    sql = (
        "select * from interceptions where client_session_id = ? and ended_at is not null "
        "order by started_at"
    )
    return wait_for(
        lambda: (rows := query(bridge.db_path, sql, (session,))) and len(rows) >= count and rows
    )
