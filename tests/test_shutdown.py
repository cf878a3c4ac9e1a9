"""Stopping mitmdump (SIGINT, SIGTERM) while streams are in flight loses nothing: every
interception that started is in the file, finalized or marked as cut by the shutdown."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from devtools.fake_upstream import FakeUpstream
from tests.harness import PROVIDER_KEY, TOKENS, Mitmdump, bridge_config, query

SAFETY = 30.0  # upper bound for waits; never asserted as a duration
STREAMS = 50


class Streams:
    """`n` slow streams through the bridge, each on its own thread and connection."""

    def __init__(self, bridge: Mitmdump, n: int) -> None:
        self.bridge = bridge
        self.tag = uuid.uuid4().hex
        self.started = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        # One client for all: building one costs a TLS context, which adds up over 50.
        self.client = httpx.Client(timeout=SAFETY, limits=httpx.Limits(max_connections=None))

    def _run(self, i: int) -> None:
        body = {"model": "fake-slow", "input": f"{self.tag} {i}", "stream": True}
        headers = {
            "authorization": f"Bearer {TOKENS['alice' if i % 2 else 'bob']}",
            # 20 deltas a second apart: far longer than the test takes to stop the bridge.
            "x-fake-delay-ms": "1000",
            "x-fake-flush-each": "1",
        }
        url = f"{self.bridge.url}/openai/v1/responses"
        try:
            with self.client.stream("POST", url, content=orjson.dumps(body), headers=headers) as r:
                chunks = r.iter_raw()
                next(chunks)
                self.started.release()
                for _ in chunks:
                    pass
        except httpx.HTTPError:
            pass  # the bridge went away: expected

    def __enter__(self) -> Streams:
        for thread in self.threads:
            thread.start()
        for _ in self.threads:
            assert self.started.acquire(timeout=SAFETY), "a stream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in self.threads:
            thread.join(SAFETY)
        self.client.close()

    def rows(self, db_path: Path) -> list[dict[str, Any]]:
        return query(
            db_path,
            "select i.* from interceptions i join user_prompts p on p.interception_id = i.id "
            "where p.prompt like ?",
            (f"{self.tag} %",),
        )


def assert_all_cut(rows: list[dict[str, Any]], n: int) -> None:
    assert len(rows) == n, "every started interception is in the file"
    assert len({r["id"] for r in rows}) == n
    for row in rows:
        assert row["ended_at"], row
        assert row["status"] == "shutdown", row
        assert row["error"] == "the bridge shut down during the exchange"
        assert row["response_id"] and row["response_id"].startswith("resp_")
    assert {r["initiator_id"] for r in rows} == {"alice", "bob"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_concurrent_streams(
    upstream: FakeUpstream, tmp_path: Path, sig: signal.Signals
) -> None:
    flows = tmp_path / "flows.mitm"
    bridge = Mitmdump(tmp_path, bridge_config(upstream.url), extra_args=["-w", str(flows)])
    with bridge, Streams(bridge, STREAMS) as streams:
        assert bridge.stop(sig, timeout=SAFETY) == 0
    assert_all_cut(streams.rows(bridge.db_path), STREAMS)
    # mitmproxy saves the flows still in flight after the addon's `done`: keys masked.
    saved = flows.read_bytes()
    assert saved.count(b"/v1/responses") >= STREAMS
    assert PROVIDER_KEY.encode() not in saved
    assert all(token.encode() not in saved for token in TOKENS.values())
    assert "Traceback" not in bridge.log()


def test_shutdown_waits_for_a_locked_database(upstream: FakeUpstream, tmp_path: Path) -> None:
    bridge = Mitmdump(tmp_path, bridge_config(upstream.url))
    with bridge, Streams(bridge, 10) as streams:
        assert bridge.proc is not None
        blocker = sqlite3.connect(bridge.db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            bridge.proc.send_signal(signal.SIGTERM)
            # It cannot write, and it must not give up on what is queued.
            with contextlib.suppress(subprocess.TimeoutExpired):
                bridge.proc.wait(0.5)
            assert bridge.proc.poll() is None
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert bridge.proc.wait(SAFETY) == 0
    assert_all_cut(streams.rows(bridge.db_path), 10)
