"""The writer process under a real mitmdump: its writer is a child process, a writer killed
while traffic flows is replaced and loses nothing, and stopping mitmdump with Ctrl-C still
writes every exchange."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from devtools.fake_upstream import FakeUpstream
from tests.harness import TOKENS, Mitmdump, bridge_config, query, wait_for, writer_processes

SAFETY = 60.0  # upper bound for waits; never asserted as a duration


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def send(bridge: Mitmdump, tag: str, n: int) -> None:
    def one(i: int) -> None:
        body = {"model": "fake-tool", "input": f"{tag} {i}", "stream": i % 2 == 0}
        r = httpx.post(
            f"{bridge.url}/openai/v1/responses",
            content=orjson.dumps(body),
            headers={"authorization": f"Bearer {TOKENS['alice']}"},
            timeout=SAFETY,
        )
        assert r.status_code == 200, r.text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(n)))


def tagged(db: Path, tag: str) -> list[dict[str, object]]:
    return query(
        db,
        "select i.id, i.status, (select count(*) from tool_usages t where t.interception_id = "
        "i.id) as tools, (select count(*) from token_usages u where u.interception_id = i.id) "
        "as usages from interceptions i join user_prompts p on p.interception_id = i.id "
        "where p.prompt like ?",
        (f"{tag} %",),
    )


def assert_once_each(db: Path, tag: str, n: int) -> None:
    rows = tagged(db, tag)
    assert len(rows) == n
    assert {(r["status"], r["tools"], r["usages"]) for r in rows} == {("completed", 1, 1)}


def test_a_killed_writer_is_replaced_and_traffic_is_recorded_once(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    with Mitmdump(tmp_path, bridge_config(upstream.url)) as bridge:
        assert bridge.proc is not None
        (first,) = wait_for(lambda: writer_processes(bridge.proc.pid), SAFETY)
        before = f"before-{uuid.uuid4().hex}"
        send(bridge, before, 20)
        os.kill(first, signal.SIGKILL)
        during = f"during-{uuid.uuid4().hex}"
        send(bridge, during, 20)  # served while the writer is replaced: never refused
        (second,) = wait_for(lambda: writer_processes(bridge.proc.pid), SAFETY)
        assert second != first
        after = f"after-{uuid.uuid4().hex}"
        send(bridge, after, 20)
    log = bridge.log()
    for tag in (before, during, after):
        assert_once_each(bridge.db_path, tag, 20)
    assert query(bridge.db_path, "select * from recorder_losses") == []
    assert "audit log writer process ended (killed by SIGKILL)" in log
    assert "Traceback" not in log
    # A clean stop leaves no progress behind.
    assert query(bridge.db_path, "select * from _writer_progress") == []


def test_ctrl_c_to_the_process_group_still_writes_everything(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    with Mitmdump(tmp_path, bridge_config(upstream.url)) as bridge:
        assert bridge.proc is not None
        (writer,) = wait_for(lambda: writer_processes(bridge.proc.pid), SAFETY)
        tag = f"ctrl-c-{uuid.uuid4().hex}"
        send(bridge, tag, 40)
        # What a terminal's Ctrl-C does to a process group, to both at once (the writer is
        # not in mitmdump's group; it ignores the signal wherever it comes from).
        os.kill(writer, signal.SIGINT)
        bridge.proc.send_signal(signal.SIGINT)
        assert bridge.proc.wait(SAFETY) == 0
        assert wait_for(lambda: not os.path.exists(f"/proc/{writer}"), SAFETY)
    assert_once_each(bridge.db_path, tag, 40)
    assert query(bridge.db_path, "select * from recorder_losses") == []


def test_the_thread_writer_is_still_there_on_request(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    with Mitmdump(
        tmp_path, bridge_config(upstream.url), extra_args=["--set", "aibridge_writer=thread"]
    ) as bridge:
        assert bridge.proc is not None
        tag = f"thread-{uuid.uuid4().hex}"
        send(bridge, tag, 10)
        assert writer_processes(bridge.proc.pid) == []
    assert_once_each(bridge.db_path, tag, 10)
