"""A saved flow read back (``mitmdump -n --rfile``, ``mitmweb --rfile``, mitmweb's File → Open)
never writes its records twice: an exchange the log already holds writes nothing, one it lacks
is written once (aibridge.record.recorder.Replay).

First the recorder on both engines, then real processes: a mitmdump records exchanges of all
three APIs with ``-w``, and the file is read back into that log, a fresh one and a partial one.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import psycopg
import pytest
from mitmproxy import io as mitm_io
from mitmproxy.test import tflow

from aibridge.bridge import METADATA_KEY, saved_time
from aibridge.record import address as addresses
from aibridge.record import schema
from aibridge.record.recorder import Recorder, Replay
from devtools.fake_upstream import FakeUpstream
from tests.harness import ADDON, MITMDUMP, PROVIDER_KEY, TOKENS, Mitmdump, bridge_config, query
from tests.log_engines import engine, losses, read
from tests.ws_client import ResponsesSocket

__all__ = ["engine"]  # a fixture, imported for this module's tests

WAIT = 30.0  # generous upper bound for waits; never asserted as a duration
ALICE = TOKENS["alice"]
MITMWEB = MITMDUMP.parent / "mitmweb"
CHILD_TABLES = (
    schema.USER_PROMPTS,
    schema.TOKEN_USAGES,
    schema.TOOL_USAGES,
    schema.MODEL_THOUGHTS,
)
RECORD_TABLES = (schema.INTERCEPTIONS, *CHILD_TABLES)
# What a record rebuilt later cannot share with the live one: when it was written, and the
# row numbers of child rows (given in the order rows arrive).
TIMES = frozenset({"started_at", "ended_at", "created_at"})
PRESENT_LINE = re.compile(r"the audit log already held (\d+) exchanges? read from saved flows")


# ---- the recorder, on both engines ---------------------------------------------------------


Op = tuple[str, str, dict[str, Any]]


def exchange(iid: str, *, flow_id: str | None = None, tag: str = "live") -> list[Op]:
    """The rows of one finished exchange, in the order the bridge queues them."""
    return [
        (
            "upsert",
            schema.INTERCEPTIONS,
            {
                "id": iid,
                "flow_id": flow_id or f"flow-{iid}",
                "started_at": f"2026-12-01T10:00:00.000Z {tag}",
                "initiator_id": "alice",
                "provider": "openai",
                "api": "responses",
                "model": "gpt-5",
                "streaming": 1,
                "credential_kind": "centralized",
                "status": "in_progress",
                "metadata": {"request_bytes": 100, "tag": tag},
            },
        ),
        (
            "upsert",
            schema.INTERCEPTIONS,
            {"id": iid, "ended_at": f"end {tag}", "status": "completed", "http_status": 200},
        ),
        ("insert", schema.USER_PROMPTS, {"interception_id": iid, "prompt": f"prompt {tag}"}),
        (
            "insert",
            schema.TOKEN_USAGES,
            {"interception_id": iid, "input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
        ),
        ("insert", schema.TOOL_USAGES, {"interception_id": iid, "tool": "shell", "args": "{}"}),
        ("insert", schema.MODEL_THOUGHTS, {"interception_id": iid, "content": f"think {tag}"}),
    ]


def queue(rec: Recorder, ops: list[Op], replay: Replay | None = None) -> None:
    for kind, table, row in ops:
        if kind == "upsert":
            rec.upsert(table, dict(row), replay)
        else:
            rec.insert(table, dict(row), replay)


def write(address: str, *ops: list[Op]) -> None:
    """Rows written live (no replay), committed when it returns."""
    rec = Recorder(address, linger=0)
    rec.start()
    for one in ops:
        queue(rec, one)
    rec.close(timeout=WAIT)


def dump(address: str) -> dict[str, list[dict[str, Any]]]:
    return {t: read(address, f"select * from {t} order by id") for t in RECORD_TABLES}


def records_of(address: str, iid: str) -> dict[str, list[dict[str, Any]]]:
    """One interception's rows, without the row numbers of its children."""
    found = {}
    for table in RECORD_TABLES:
        key = "id" if table == schema.INTERCEPTIONS else "interception_id"
        rows = read(address, f"select * from {table} where {key} = '{iid}' order by id")
        found[table] = [
            {k: v for k, v in r.items() if table == schema.INTERCEPTIONS or k != "id"} for r in rows
        ]
    return found


@pytest.fixture
def started(engine: str) -> Iterator[Recorder]:
    rec = Recorder(engine, linger=0)
    rec.start()
    yield rec
    rec.close(timeout=WAIT)


def test_a_replay_of_an_exchange_the_log_holds_writes_nothing(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    write(engine, exchange("i1"))
    before = dump(engine)
    caplog.set_level(logging.INFO, logger="aibridge.record.recorder")
    rec = Recorder(engine, linger=0)
    rec.start()
    replayed = exchange("i1", tag="replayed")
    replay = Replay()
    # Its first row in one batch, the rest in later ones: the decision holds for all.
    for ops in (replayed[:1], replayed[1:3], replayed[3:]):
        queue(rec, ops, replay)
        assert rec.flush(WAIT)
    assert rec.stats["replays_present"] == 1
    rec.close(timeout=WAIT)
    assert dump(engine) == before
    assert losses(engine) == {}
    assert [int(m[1]) for m in map(PRESENT_LINE.search, caplog.messages) if m] == [1]


def test_a_replay_new_to_the_log_is_written_whole_across_batches_and_once(
    engine: str, started: Recorder
) -> None:
    replayed = exchange("i1", tag="replayed")
    replay = Replay()
    for ops in (replayed[:1], replayed[1:2], replayed[2:4], replayed[4:]):
        queue(started, ops, replay)
        assert started.flush(WAIT)
    assert started.stats["replays_present"] == 0
    rebuilt = records_of(engine, "i1")
    assert [len(rebuilt[t]) for t in RECORD_TABLES] == [1, 1, 1, 1, 1]
    assert rebuilt[schema.INTERCEPTIONS][0]["status"] == "completed"
    # The same rows as the same exchange written live.
    queue(started, exchange("i2", flow_id="flow-i1", tag="replayed"))
    assert started.flush(WAIT)
    live = records_of(engine, "i2")
    live[schema.INTERCEPTIONS][0]["id"] = "i1"
    for table in CHILD_TABLES:
        for row in live[table]:
            row["interception_id"] = "i1"
    assert live == rebuilt
    # Read again, across batches as well: nothing more.
    again = Replay()
    for ops in (replayed[:2], replayed[2:]):
        queue(started, ops, again)
        assert started.flush(WAIT)
    assert records_of(engine, "i1") == rebuilt
    assert started.stats["replays_present"] == 1


@pytest.mark.parametrize("batches", ["one batch", "interleaved", "a batch each"])
def test_the_same_exchange_read_twice_is_written_once(engine: str, batches: str) -> None:
    first, second = Replay(), Replay()
    a, b = exchange("i1", tag="first"), exchange("i1", tag="second")
    rec = Recorder(engine, linger=0)
    if batches == "a batch each":
        rec.start()
        queue(rec, a, first)
        assert rec.flush(WAIT)
        queue(rec, b, second)
    else:
        # Queued before the writer starts: its first batch takes them all.
        if batches == "one batch":
            queue(rec, a, first)
            queue(rec, b, second)
        else:
            for x, y in zip(a, b, strict=True):
                queue(rec, [x], first)
                queue(rec, [y], second)
        rec.start()
    assert rec.flush(WAIT)
    assert rec.stats["replays_present"] == 1
    rec.close(timeout=WAIT)
    (row,) = read(engine, "select * from interceptions")
    assert row["metadata"]["tag"] == "first" and row["status"] == "completed"
    for table in CHILD_TABLES:
        assert len(read(engine, f"select * from {table}")) == 1, table
    assert read(engine, "select prompt from user_prompts") == [{"prompt": "prompt first"}]


def test_only_the_exchanges_the_log_lacks_are_written(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    held = [f"i{n}" for n in (0, 2, 4)]
    write(engine, *(exchange(iid) for iid in held))
    before = {iid: records_of(engine, iid) for iid in held}
    caplog.set_level(logging.INFO, logger="aibridge.record.recorder")
    rec = Recorder(engine, linger=0)
    for n in range(6):  # one batch: one line for it, not one per exchange
        queue(rec, exchange(f"i{n}", tag="replayed"), Replay())
    rec.start()
    assert rec.flush(WAIT)
    rec.close(timeout=WAIT)
    assert [int(m[1]) for m in map(PRESENT_LINE.search, caplog.messages) if m] == [3]
    assert {iid: records_of(engine, iid) for iid in held} == before
    for iid in ("i1", "i3", "i5"):
        rows = records_of(engine, iid)
        assert rows[schema.INTERCEPTIONS][0]["metadata"]["tag"] == "replayed"
        assert [len(rows[t]) for t in RECORD_TABLES] == [1, 1, 1, 1, 1]
    assert len(read(engine, "select id from interceptions")) == 6
    assert losses(engine) == {}


def test_a_replay_without_its_interception_id_is_found_by_its_flow(
    engine: str, started: Recorder
) -> None:
    """A flow that did not note its interception's id: the log holds it if it holds an
    interception of the same flow, under whatever id."""
    write(engine, exchange("live-id", flow_id="flow-a"))
    before = dump(engine)
    queue(started, exchange("made-from-flow-a", flow_id="flow-a", tag="x"), Replay("flow-a"))
    assert started.flush(WAIT)
    assert dump(engine) == before
    for tag in ("first", "again"):  # a flow the log lacks: once, however often it is read
        queue(started, exchange("made-from-flow-b", flow_id="flow-b", tag=tag), Replay("flow-b"))
        assert started.flush(WAIT)
    rows = records_of(engine, "made-from-flow-b")
    assert rows[schema.INTERCEPTIONS][0]["metadata"]["tag"] == "first"
    assert [len(rows[t]) for t in RECORD_TABLES] == [1, 1, 1, 1, 1]
    assert started.stats["replays_present"] == 2


def other_bridge_writes(address: str, iid: str) -> None:
    """Another writer of the same log records interception `iid`."""
    sql = "insert into interceptions (id, status) values ({0}, 'completed')"
    if addresses.is_postgres(address):
        with psycopg.connect(address, autocommit=True) as conn:
            conn.execute(sql.format("%s"), (iid,))
    else:
        conn = sqlite3.connect(address)
        with conn:
            conn.execute(sql.format("?"), (iid,))
        conn.close()


def test_a_decision_of_an_attempt_rolled_back_is_taken_again(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch beginning a replay fails (the database refused it for now); before it is
    retried another bridge writes the interception: the retry finds it, writes nothing."""
    rec = Recorder(engine, linger=0)
    queue(rec, exchange("i1", tag="replayed"), Replay())
    real_write = Recorder._write
    attempts: list[int] = []

    def refused_once(self: Recorder, *args: Any) -> int:
        attempts.append(1)
        if len(attempts) > 1:
            return real_write(self, *args)
        store = self._store
        real_rows = store.write_rows

        def refuse(*_: Any) -> None:
            if addresses.is_postgres(engine):
                raise psycopg.OperationalError("the server closed the connection for now")
            raise sqlite3.OperationalError("database is locked")

        store.write_rows = refuse  # type: ignore[method-assign]
        try:
            return real_write(self, *args)
        except Exception:
            other_bridge_writes(engine, "i1")  # rolled back: the lock is free again
            raise
        finally:
            store.write_rows = real_rows  # type: ignore[method-assign]

    monkeypatch.setattr(Recorder, "_write", refused_once)
    rec.start()
    assert rec.flush(WAIT)
    rec.close(timeout=WAIT)
    assert len(attempts) >= 2
    assert read(engine, "select id, status, metadata from interceptions") == [
        {"id": "i1", "status": "completed", "metadata": None}
    ]
    for table in CHILD_TABLES:
        assert read(engine, f"select * from {table}") == [], table
    assert rec.stats["replays_present"] == 1


# ---- real processes: the flow file of a live bridge, read back ---------------------------------


def anthropic_provider(upstream_url: str) -> dict[str, Any]:
    # The OpenAI provider's host and root: a saved flow names only where it went, so the
    # rebuild must take the provider the live bridge noted on it (routing.as_noted).
    return {
        "name": "anthropic",
        "type": "anthropic",
        "base_url": f"{upstream_url}/v1",
        "api_key": "${TEST_PROVIDER_KEY}",
    }


@dataclass
class Recorded:
    """A live bridge's log (closed) and the flows it saved with ``-w``."""

    directory: Path
    db: Path
    config: Path
    flows: Path
    bridged: int  # flows with an HTTP exchange noted on them (all but the WebSocket's)
    socket_ids: frozenset[str]  # the interceptions of the WebSocket's turns


def responses_traffic(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key=ALICE, max_retries=0)
    client.responses.create(model="fake-cached", input="buffered responses")
    list(client.responses.create(model="fake-reasoning", input="streamed responses", stream=True))
    with client.responses.stream(model="fake-tool", input="tool round trip") as stream:
        final = stream.get_final_response()
    (call,) = [o for o in final.output if o.type == "function_call"]
    client.responses.create(
        model="fake-tool",
        input=[
            {"role": "user", "content": "tool round trip"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    with pytest.raises(openai.APIStatusError):  # 501: refused, its prompt recorded
        client.responses.create(model="fake-text", input="later please", background=True)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{url}/openai/v1", api_key="unknown-token-0000", max_retries=0
        ).responses.create(model="fake-text", input="who am I")


def messages_traffic(url: str) -> None:
    client = anthropic.Anthropic(base_url=f"{url}/anthropic", api_key=ALICE, max_retries=0)
    with client.messages.stream(
        model="fake-thinking", max_tokens=64, messages=[{"role": "user", "content": "think"}]
    ) as stream:
        stream.get_final_message()
    client.messages.create(
        model="fake-tool",
        max_tokens=64,
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
        messages=[{"role": "user", "content": "weather, buffered"}],
    )


def chat_traffic(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key=ALICE, max_retries=0)
    list(
        client.chat.completions.create(
            model="fake-reasoning-content",
            stream=True,
            messages=[{"role": "user", "content": "streamed chat"}],
        )
    )
    client.chat.completions.create(
        model="fake-tool",
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
        messages=[{"role": "user", "content": "buffered chat tool"}],
    )


def socket_traffic(url: str) -> None:
    ws = ResponsesSocket(
        f"{url}/openai/v1/responses",
        {
            "authorization": f"Bearer {ALICE}",
            "session-id": "ws-replay",
            "originator": "codex_cli_rs",
            "user-agent": "codex_cli_rs/0.171.0",
        },
    )
    for prompt in ("socket turn one", "socket turn two"):
        ws.send({"type": "response.create", "model": "fake-text", "input": prompt})
        assert ws.until_terminal()[-1]["type"] == "response.completed"
    ws.close()


@pytest.fixture(scope="module")
def recorded(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    directory = tmp_path_factory.mktemp("recorded")
    live_dir = directory / "live"
    live_dir.mkdir()
    flows = directory / "flows.mitm"
    config = bridge_config(upstream.url, websocket="bridge")
    config["providers"].append(anthropic_provider(upstream.url))
    args = ["-w", str(flows), "--set", "store_streamed_bodies=true"]
    with Mitmdump(live_dir, config, extra_args=args) as live:
        responses_traffic(live.url)
        messages_traffic(live.url)
        chat_traffic(live.url)
        socket_traffic(live.url)
    # Stopped: every record is written and every flow saved.
    ended = query(live.db_path, "select id from interceptions where ended_at is not null")
    assert len(ended) == len(query(live.db_path, "select id from interceptions")) == 12
    raw = flows.read_bytes()
    assert ALICE.encode() not in raw and PROVIDER_KEY.encode() not in raw
    with flows.open("rb") as f:
        saved = list(mitm_io.FlowReader(f).stream())
    bridged = sum(1 for f in saved if METADATA_KEY in f.metadata)
    assert bridged == 10 and any(getattr(f, "websocket", None) for f in saved)
    sockets = query(
        live.db_path, "select id from interceptions where client_session_id = ?", ("ws-replay",)
    )
    assert len(sockets) == 2
    return Recorded(
        directory,
        live.db_path,
        live.config_path,
        flows,
        bridged,
        frozenset(r["id"] for r in sockets),
    )


def copy_log(source: Path, target: Path) -> Path:
    """A consistent copy of a SQLite log (its WAL included)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return target


def everything(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (the search index and its shadow tables too)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = [
            r[0]
            for r in conn.execute("select name from sqlite_master where type = 'table' order by 1")
        ]
        return {n: sorted(conn.execute(f'select * from "{n}"'), key=repr) for n in names}
    finally:
        conn.close()


def records(db: Path, skip: frozenset[str] = frozenset()) -> dict[str, list[dict[str, Any]]]:
    """The records, as a rebuild can reproduce them: interceptions by id, children by their
    interception, without times or the children's row numbers."""
    found: dict[str, list[dict[str, Any]]] = {}
    for table in RECORD_TABLES:
        rows = query(db, f"select * from {table}")
        if table != schema.INTERCEPTIONS:
            for row in rows:
                del row["id"]
        owner = "id" if table == schema.INTERCEPTIONS else "interception_id"
        kept = [
            {k: v for k, v in row.items() if k not in TIMES}
            for row in rows
            if row[owner] not in skip
        ]
        found[table] = sorted(kept, key=repr)
    return found


def read_back(flows: Path, recorded: Recorded, db: Path) -> list[int]:
    """``mitmdump -n --rfile flows -s addon.py`` into `db`; the counts its log lines give of
    exchanges the log already held."""
    done = subprocess.run(
        [
            str(MITMDUMP),
            "-n",
            "--rfile",
            str(flows),
            "-s",
            str(ADDON),
            "--set",
            f"aibridge_config={recorded.config}",
            "--set",
            f"aibridge_db={db}",
            "--set",
            f"confdir={recorded.directory / 'conf'}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "TEST_PROVIDER_KEY": PROVIDER_KEY},
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert "Traceback" not in output, output
    return [int(m[1]) for m in PRESENT_LINE.finditer(output)]


def test_reading_the_file_into_its_own_log_changes_nothing(
    recorded: Recorded, tmp_path: Path
) -> None:
    db = copy_log(recorded.db, tmp_path / "aibridge.db")
    before = everything(db)
    for _ in range(2):
        present = read_back(recorded.flows, recorded, db)
        assert everything(db) == before
        assert sum(present) == recorded.bridged  # each told once, in a line per batch


def test_reading_the_file_into_a_fresh_log_gives_the_live_records_once(
    recorded: Recorded, tmp_path: Path
) -> None:
    db = tmp_path / "rebuilt.db"
    assert read_back(recorded.flows, recorded, db) == []
    rebuilt = everything(db)
    # A WebSocket's turns are noted on no flow, so a file does not rebuild them (README:
    # not guaranteed); neither, then, can it write them twice.
    assert records(db) == records(recorded.db, skip=recorded.socket_ids)
    assert not recorded.socket_ids & {r["id"] for r in query(db, "select id from interceptions")}
    for table in CHILD_TABLES:
        assert query(db, f"select * from {table}"), f"the live log has {table} rows"
    present = read_back(recorded.flows, recorded, db)
    assert everything(db) == rebuilt
    assert sum(present) == recorded.bridged

    # The records keep the exchanges' own times (the flows' timestamps), not the rebuild's.
    with recorded.flows.open("rb") as f:
        saved = [x for x in mitm_io.FlowReader(f).stream() if METADATA_KEY in x.metadata]
    times = {
        r["id"]: (r["started_at"], r["ended_at"])
        for r in query(db, "select id, started_at, ended_at from interceptions")
    }
    for flow in saved:
        started, ended = times[flow.metadata[METADATA_KEY]["interception_id"]]
        assert started == saved_time(flow, end=False) == stamp(flow.request.timestamp_start)
        if flow.response is not None and flow.metadata[METADATA_KEY].get("rejected") is None:
            assert ended == stamp(flow.response.timestamp_end)


def stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")


@pytest.mark.parametrize(
    ("start", "end", "want_start", "want_end"),
    [
        (1_750_000_000.25, 1_750_000_003.5, 1_750_000_000.25, 1_750_000_003.5),
        (1_750_000_000.25, None, 1_750_000_000.25, 1_750_000_000.25),  # no end: its start
        (1_750_000_000.25, 0, 1_750_000_000.25, 1_750_000_000.25),
    ],
)
def test_saved_time_is_the_flows_own(
    start: float, end: float | None, want_start: float, want_end: float
) -> None:
    flow = tflow.tflow(resp=True)
    flow.request.timestamp_start = start
    flow.response.timestamp_start = None
    flow.response.timestamp_end = end
    assert saved_time(flow, end=False) == stamp(want_start)
    assert saved_time(flow, end=True) == stamp(want_end)
    flow.response = None
    assert saved_time(flow, end=True) == stamp(want_start)


@pytest.mark.parametrize(
    "hostile", [None, 0, -1.0, float("nan"), float("inf"), -float("inf"), 1e20, True, "1750000000"]
)
def test_a_saved_time_a_file_cannot_hold_honestly_is_now(hostile: Any) -> None:
    flow = tflow.tflow(resp=True)
    flow.request.timestamp_start = hostile
    flow.response.timestamp_start = flow.response.timestamp_end = hostile
    before = datetime.now(UTC).isoformat(timespec="microseconds")
    for end in (False, True):
        got = saved_time(flow, end=end)
        assert datetime.fromisoformat(got).tzinfo is not None
        assert got >= before  # now, not the hostile value


def variant_flows(recorded: Recorded, target: Path) -> tuple[Path, str]:
    """The file with every flow twice, and one bridged flow whose interception id is gone
    from its notes (twice too). Returns the file and that flow's id."""
    with recorded.flows.open("rb") as f:
        saved = list(mitm_io.FlowReader(f).stream())
    anonymous = next(f for f in saved if METADATA_KEY in f.metadata and f.response is not None)
    anonymous.metadata[METADATA_KEY] = {
        k: v for k, v in anonymous.metadata[METADATA_KEY].items() if k != "interception_id"
    }
    with target.open("wb") as f:
        writer = mitm_io.FlowWriter(f)
        for flow in [*saved, *saved]:
            writer.add(flow)
    return target, anonymous.id


def forget(db: Path, interception_ids: list[str]) -> None:
    """The log loses these interceptions and their rows (say, restored from an old backup)."""
    conn = sqlite3.connect(db)
    with conn:
        marks = ", ".join("?" * len(interception_ids))
        for table in CHILD_TABLES:
            conn.execute(
                f"delete from {table} where interception_id in ({marks})", interception_ids
            )
        conn.execute(f"delete from interceptions where id in ({marks})", interception_ids)
    conn.close()


def renamed(
    found: dict[str, list[dict[str, Any]]], old: str, new: str
) -> dict[str, list[dict[str, Any]]]:
    """`records` with interception `old` called `new`."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table, rows in found.items():
        key = "id" if table == schema.INTERCEPTIONS else "interception_id"
        out[table] = sorted(({**r, key: new} if r[key] == old else r for r in rows), key=repr)
    return out


def test_a_file_with_flows_twice_into_a_log_holding_some_of_them(
    recorded: Recorded, tmp_path: Path
) -> None:
    flows, anonymous_flow = variant_flows(recorded, tmp_path / "twice.mitm")
    live = records(recorded.db, skip=recorded.socket_ids)
    (anonymous,) = query(
        recorded.db, "select id from interceptions where flow_id = ?", (anonymous_flow,)
    )
    ids = sorted(r["id"] for r in live[schema.INTERCEPTIONS] if r["id"] != anonymous["id"])

    # A log that lost some exchanges (a third of them): those come back, once each; the
    # flow without its interception id is found by its flow.
    db = copy_log(recorded.db, tmp_path / "aibridge.db")
    lost = ids[::3]
    forget(db, lost)
    present = read_back(flows, recorded, db)
    assert records(db, skip=recorded.socket_ids) == live
    assert sum(present) == 2 * recorded.bridged - len(lost)

    # A fresh log: every exchange once; the one without an id under an id made from its
    # flow's, the same however often it is read.
    fresh = tmp_path / "fresh.db"
    assert sum(read_back(flows, recorded, fresh)) == recorded.bridged  # the second copies
    (made,) = query(fresh, "select id from interceptions where flow_id = ?", (anonymous_flow,))
    assert made["id"] != anonymous["id"]
    assert renamed(records(fresh), made["id"], anonymous["id"]) == live
    before = everything(fresh)
    present = read_back(flows, recorded, fresh)
    assert everything(fresh) == before
    assert sum(present) == 2 * recorded.bridged


# ---- mitmweb ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mitmweb:
    """``mitmweb -s addon.py`` on loopback (no browser), reading `rfile` at start."""

    PASSWORD = "replay-test-web-password"

    def __init__(self, recorded: Recorded, db: Path, rfile: Path, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "mitmweb.log"
        self.args = [
            str(MITMWEB),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--set",
            "web_open_browser=false",
            "--set",
            "web_host=127.0.0.1",
            "--set",
            f"web_port={self.port}",
            "--set",
            f"web_password={self.PASSWORD}",
            "--set",
            f"confdir={workdir / 'conf'}",
            "--rfile",
            str(rfile),
            "-s",
            str(ADDON),
            "--set",
            f"aibridge_config={recorded.config}",
            "--set",
            f"aibridge_db={db}",
        ]
        self.env = {**os.environ, "TEST_PROVIDER_KEY": PROVIDER_KEY}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"authorization": f"Bearer {self.PASSWORD}"},
            timeout=WAIT,
        )

    def __enter__(self) -> Mitmweb:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def flows(self) -> int | None:
        """How many flows its view holds, once its web server answers."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mitmweb exited:\n{self.log()}")
        try:
            return len(self.client.get("/flows").raise_for_status().json())
        except httpx.HTTPError:
            return None

    def wait_for_flows(self, count: int) -> None:
        deadline = time.monotonic() + WAIT
        while self.flows() != count:
            assert time.monotonic() < deadline, f"mitmweb did not load {count} flows:\n{self.log()}"
            time.sleep(0.05)

    def open_file(self, flows: Path) -> None:
        """File → Open, as its UI does it: the file's bytes posted to /flows/dump."""
        # Tornado's XSRF check: the cookie's token sent back in a header, as the UI does.
        xsrf = secrets.token_hex(16)
        self.client.cookies.set("_mitmproxy_xsrf", xsrf)
        self.client.post(
            "/flows/dump",
            files={"file": ("flows.mitm", flows.read_bytes())},
            headers={"x-xsrftoken": xsrf},
        ).raise_for_status()

    def stop(self) -> None:
        """A clean stop (the addon's done: the recorder drains and closes)."""
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"mitmweb did not stop:\n{self.log()}") from None

    def __exit__(self, *exc: object) -> None:
        self.stop()


def test_mitmweb_reading_and_opening_the_file_changes_its_log_not(
    recorded: Recorded, tmp_path: Path
) -> None:
    if shutil.which(str(MITMWEB)) is None:
        pytest.fail(f"{MITMWEB} is missing: mitmproxy installs it")
    db = copy_log(recorded.db, tmp_path / "aibridge.db")
    before = everything(db)
    with recorded.flows.open("rb") as f:
        total = sum(1 for _ in mitm_io.FlowReader(f).stream())
    with Mitmweb(recorded, db, recorded.flows, tmp_path) as web:
        web.wait_for_flows(total)  # --rfile: every flow went through the addon's hooks
        web.open_file(recorded.flows)  # File → Open: the view cleared, the flows loaded again
        web.wait_for_flows(total)
        web.stop()
        told = [int(m[1]) for m in PRESENT_LINE.finditer(web.log())]
        assert "Traceback" not in web.log(), web.log()
    assert everything(db) == before
    assert sum(told) == 2 * recorded.bridged
