"""Tests for aibridge.record.schema and aibridge.record.recorder, against real SQLite files."""

from __future__ import annotations

import contextlib
import decimal
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlite_utils

from aibridge.record import schema
from aibridge.record.recorder import (
    INSERT,
    REASON_CONTENT_SHED,
    REASON_INVALID_UNICODE,
    REASON_ROW_SHED,
    UPSERT,
    WRITER_NICENESS,
    Recorder,
    RecorderError,
    _plan,
    insert_sql,
    is_transient,
    upsert_sql,
)

WAIT = 30.0  # generous upper bound for waits; never asserted as a duration
# A linger no test may sit out: a write that waited for it would miss every WAIT.
FOREVER = WAIT * 20


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def new_id() -> str:
    return str(uuid.uuid4())


def open_db(path: Path) -> sqlite_utils.Database:
    return sqlite_utils.Database(path)


def losses(db: sqlite_utils.Database) -> dict[tuple[str, str | None, str], int]:
    totals: dict[tuple[str, str | None, str], int] = {}
    for row in db[schema.RECORDER_LOSSES].rows:
        key = (row["table_name"], row["field"], row["reason"])
        totals[key] = totals.get(key, 0) + row["rows"]
    return totals


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def recorder(db_path: Path) -> Iterator[Recorder]:
    rec = Recorder(db_path)
    rec.start()
    yield rec
    rec.close(timeout=WAIT)


# ---- schema ------------------------------------------------------------------


def migrated(path: Path) -> sqlite_utils.Database:
    db = open_db(path)
    schema.migrate(db)
    return db


def test_schema_tables_and_columns_in_order(db_path: Path) -> None:
    db = migrated(db_path)
    assert set(schema.WRITABLE_TABLES) <= set(db.table_names())
    assert list(db[schema.INTERCEPTIONS].columns_dict) == [
        "id",
        "flow_id",
        "started_at",
        "ended_at",
        "initiator_id",
        "provider",
        "provider_name",
        "api",
        "model",
        "response_model",
        "streaming",
        "client",
        "user_agent",
        "client_session_id",
        "correlating_tool_call_id",
        "previous_response_id",
        "credential_kind",
        "credential_hint",
        "http_status",
        "status",
        "error",
        "response_id",
        "malformed_events",
        "metadata",
        "total_tokens",
        "estimated_cost_usd",
        "mitmweb_url",
    ]
    assert list(db[schema.TOKEN_USAGES].columns_dict) == [
        "id",
        "interception_id",
        "response_id",
        "input_tokens",
        "cache_read_input_tokens",
        "cache_write_input_tokens",
        "uncached_input_tokens",
        "output_tokens",
        "reasoning_tokens",
        "total_tokens",
        "usage",
        "created_at",
        "estimated_cost_usd",
        "price_source",
        "price_version",
        "priced_model",
        "service_tier",
    ]
    assert list(db[schema.USER_PROMPTS].columns_dict) == [
        "id",
        "interception_id",
        "response_id",
        "prompt",
        "created_at",
    ]
    assert list(db[schema.TOOL_USAGES].columns_dict) == [
        "id",
        "interception_id",
        "response_id",
        "call_id",
        "tool",
        "type",
        "args",
        "injected",
        "server_url",
        "invocation_error",
        "created_at",
    ]
    assert list(db[schema.MODEL_THOUGHTS].columns_dict) == [
        "id",
        "interception_id",
        "response_id",
        "source",
        "content",
        "created_at",
    ]
    assert db[schema.RECORDER_LOSSES].columns_dict == {
        "id": int,
        "happened_at": str,
        "table_name": str,
        "field": str,
        "rows": int,
        "reason": str,
    }
    assert db[schema.INTERCEPTIONS].pks == ["id"]
    assert db[schema.INTERCEPTIONS].columns_dict["id"] is str
    assert db[schema.TOKEN_USAGES].columns_dict["input_tokens"] is int


def test_schema_foreign_keys_and_indexes(db_path: Path) -> None:
    db = migrated(db_path)
    indexed = {tuple(i.columns) for i in db[schema.INTERCEPTIONS].indexes}
    for column in ("initiator_id", "started_at", "model", "status", "client_session_id"):
        assert (column,) in indexed
    for table in (
        schema.TOKEN_USAGES,
        schema.USER_PROMPTS,
        schema.TOOL_USAGES,
        schema.MODEL_THOUGHTS,
    ):
        fks = db[table].foreign_keys
        assert [(fk.column, fk.other_table, fk.other_column) for fk in fks] == [
            ("interception_id", schema.INTERCEPTIONS, "id")
        ]
        assert ("interception_id",) in {tuple(i.columns) for i in db[table].indexes}
        assert db[table].pks == ["id"]


def test_schema_version_and_migrations_table(db_path: Path) -> None:
    db = migrated(db_path)
    assert schema.SCHEMA_VERSION == len(schema.MIGRATIONS) >= 1
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    rows = list(db[schema.MIGRATIONS_TABLE].rows)
    assert [r["name"] for r in rows] == [m.__name__ for m in schema.MIGRATIONS]
    assert all(r["applied_at"].endswith("Z") for r in rows)


def test_migrating_twice_is_a_noop(db_path: Path) -> None:
    db = migrated(db_path)
    before = (db.execute("select * from sqlite_master").fetchall(), list(db["_migrations"].rows))
    schema.migrate(db)
    schema.migrate(open_db(db_path))
    after = (db.execute("select * from sqlite_master").fetchall(), list(db["_migrations"].rows))
    assert before == after


def test_migration_names_must_be_unique() -> None:
    def m001_initial(db: sqlite_utils.Database) -> None:
        raise AssertionError("never registered")

    with pytest.raises(ValueError, match="duplicate"):
        schema.migration(m001_initial)
    assert len(schema.MIGRATIONS) == schema.SCHEMA_VERSION


def test_full_text_search_follows_inserts(recorder: Recorder, db_path: Path) -> None:
    iid = new_id()
    recorder.upsert(schema.INTERCEPTIONS, {"id": iid})
    recorder.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": "refactor the parser"})
    recorder.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": "write a haiku"})
    assert recorder.flush(WAIT)
    db = open_db(db_path)
    hits = list(db[schema.USER_PROMPTS].search("parser"))
    assert [h["prompt"] for h in hits] == ["refactor the parser"]


def test_full_text_search_follows_every_batch_and_the_row_by_row_path(db_path: Path) -> None:
    rec = Recorder(db_path, linger=0)
    rec.start()
    iid = new_id()
    rec.upsert(schema.INTERCEPTIONS, {"id": iid})
    for n in range(3):  # three batches
        rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": f"batch{n} parser"})
        assert rec.flush(WAIT)
    # A batch with a row SQLite rejects is written row by row: the others are still found.
    rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": "before the bad row"})
    rec.insert(schema.USER_PROMPTS, {"interception_id": "no-such-interception", "prompt": "x"})
    rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": "after the bad row"})
    assert rec.flush(WAIT)
    rec.close()
    db = open_db(db_path)
    assert sorted(h["prompt"] for h in db[schema.USER_PROMPTS].search("parser")) == [
        "batch0 parser",
        "batch1 parser",
        "batch2 parser",
    ]
    assert [h["prompt"] for h in db[schema.USER_PROMPTS].search("row")] == [
        "before the bad row",
        "after the bad row",
    ]
    # The index holds each row exactly once.
    count = "select count(*) from user_prompts_fts where user_prompts_fts match 'row'"
    assert db.execute(count).fetchone()[0] == 2


def test_a_log_made_before_m003_keeps_its_index_and_loses_the_insert_trigger(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m003 = schema.MIGRATIONS.index(schema.m003_prompts_indexed_per_batch)
    with monkeypatch.context() as patch:  # what an older aibridge made
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:m003])
        patch.setattr(schema, "SCHEMA_VERSION", m003)
        db = migrated(db_path)
    assert "user_prompts_ai" in {
        r[0] for r in db.execute("select name from sqlite_master where type='trigger'")
    }
    iid = new_id()
    db[schema.INTERCEPTIONS].insert({"id": iid})
    db[schema.USER_PROMPTS].insert({"interception_id": iid, "prompt": "an old prompt"})
    db.conn.commit()
    rec = Recorder(db_path)
    rec.start()
    rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": "a new prompt"})
    assert rec.flush(WAIT)
    rec.close()
    db = open_db(db_path)
    triggers = {r[0] for r in db.execute("select name from sqlite_master where type='trigger'")}
    assert triggers == {"user_prompts_ad", "user_prompts_au"}
    assert sorted(h["prompt"] for h in db[schema.USER_PROMPTS].search("prompt")) == [
        "a new prompt",
        "an old prompt",
    ]


# ---- recorder: normal operation --------------------------------------------------


def test_connection_settings(recorder: Recorder, db_path: Path) -> None:
    db = open_db(db_path)
    assert db.journal_mode == "wal"
    # foreign_keys is per connection; the recorder's shows as a rejected orphan.
    recorder.insert(schema.TOKEN_USAGES, {"interception_id": "no-such", "input_tokens": 1})
    assert recorder.flush(WAIT)
    assert db[schema.TOKEN_USAGES].count == 0
    [(key, count)] = losses(db).items()
    assert key[:2] == (schema.TOKEN_USAGES, None)
    assert "FOREIGN KEY" in key[2]
    assert count == 1


def test_upsert_changes_only_given_columns(recorder: Recorder, db_path: Path) -> None:
    iid = new_id()
    recorder.upsert(
        schema.INTERCEPTIONS,
        {"id": iid, "model": "gpt-5", "started_at": "2025-01-01T00:00:00Z", "streaming": True},
    )
    recorder.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": 10})
    assert recorder.flush(WAIT)
    recorder.upsert(schema.INTERCEPTIONS, {"id": iid, "status": "completed", "http_status": 200})
    assert recorder.flush(WAIT)
    row = open_db(db_path)[schema.INTERCEPTIONS].get(iid)
    assert row["model"] == "gpt-5"
    assert row["started_at"] == "2025-01-01T00:00:00Z"
    assert row["streaming"] == 1
    assert row["status"] == "completed"
    assert row["http_status"] == 200


def test_one_batch_keeps_queue_order_semantics(db_path: Path) -> None:
    """Rows queued before start() are written as one batch; the result is as if one by one."""
    rec = Recorder(db_path)
    a, b = new_id(), new_id()
    # Children queued right after their interception; several upserts per id
    # with different columns, interleaved with another id's.
    rec.upsert(schema.INTERCEPTIONS, {"id": a, "model": "m-a", "status": "started"})
    rec.insert(schema.USER_PROMPTS, {"interception_id": a, "prompt": "first"})
    rec.upsert(schema.INTERCEPTIONS, {"id": b, "model": "m-b"})
    rec.upsert(schema.INTERCEPTIONS, {"id": a, "status": "completed", "error": None})
    rec.insert(schema.USER_PROMPTS, {"interception_id": b, "prompt": "second"})
    rec.upsert(schema.INTERCEPTIONS, {"id": a, "http_status": 200})
    rec.upsert(schema.INTERCEPTIONS, {"id": b, "status": "failed", "error": "boom"})
    rec.insert(schema.USER_PROMPTS, {"interception_id": a, "prompt": "third"})
    rec.start()
    assert rec.flush(WAIT)
    rec.close()
    assert rec.stats["batches"] == 1
    db = open_db(db_path)
    got_a = db[schema.INTERCEPTIONS].get(a)
    assert (got_a["model"], got_a["status"], got_a["http_status"]) == ("m-a", "completed", 200)
    got_b = db[schema.INTERCEPTIONS].get(b)
    assert (got_b["model"], got_b["status"], got_b["error"]) == ("m-b", "failed", "boom")
    prompts = [r["prompt"] for r in db[schema.USER_PROMPTS].rows_where(order_by="id")]
    assert prompts == ["first", "second", "third"]
    assert losses(db) == {}


def test_plan_puts_interceptions_first_and_merges_upserts() -> None:
    a, b = "a", "b"
    ops: list[tuple[str, str, dict[str, Any]]] = [
        (UPSERT, schema.INTERCEPTIONS, {"id": a, "model": "m"}),
        (INSERT, schema.TOOL_USAGES, {"interception_id": a, "call_id": "1"}),
        (INSERT, schema.USER_PROMPTS, {"interception_id": a, "prompt": "p"}),
        (UPSERT, schema.INTERCEPTIONS, {"id": b, "model": "m"}),
        (INSERT, schema.TOOL_USAGES, {"interception_id": b, "call_id": "2"}),
        (UPSERT, schema.INTERCEPTIONS, {"id": a, "status": "completed"}),
    ]
    plan = _plan(ops)
    assert [(kind, table) for kind, table, _ in plan] == [
        (UPSERT, schema.INTERCEPTIONS),
        (UPSERT, schema.INTERCEPTIONS),
        (INSERT, schema.TOOL_USAGES),
        (INSERT, schema.USER_PROMPTS),
    ]
    # a's two upserts became one row with both columns; b keeps its own columns,
    # so it is a separate run (one upsert must not NULL another's columns).
    interception_rows = [
        row for kind, table, rows in plan if table == "interceptions" for row in rows
    ]
    assert interception_rows == [
        {"id": a, "model": "m", "status": "completed"},
        {"id": b, "model": "m"},
    ]
    assert [r["call_id"] for r in plan[-2][2]] == ["1", "2"]


def test_plan_keeps_inserts_after_earlier_upserts_of_same_table() -> None:
    ops: list[tuple[str, str, dict[str, Any]]] = [
        (UPSERT, schema.INTERCEPTIONS, {"id": "x", "model": "m"}),
        (INSERT, schema.INTERCEPTIONS, {"id": "x", "model": "dup"}),
        (UPSERT, schema.INTERCEPTIONS, {"id": "x", "status": "s"}),
    ]
    assert _plan(ops) == [
        (UPSERT, schema.INTERCEPTIONS, [{"id": "x", "model": "m"}]),
        (INSERT, schema.INTERCEPTIONS, [{"id": "x", "model": "dup"}]),
        (UPSERT, schema.INTERCEPTIONS, [{"id": "x", "status": "s"}]),
    ]


def test_plan_groups_share_kind_and_keys_and_keep_insert_order() -> None:
    """Each group is one statement: same kind, same keys in the same order."""
    rng = random.Random(7)
    shapes = [("interception_id", "tool"), ("tool", "interception_id"), ("interception_id",)]
    ops: list[tuple[str, str, dict[str, Any]]] = []
    for n in range(300):
        if rng.random() < 0.3:
            extra = rng.choice([{"model": "m"}, {"status": "s"}, {}])
            ops.append((UPSERT, schema.INTERCEPTIONS, {"id": f"i{rng.randrange(5)}", **extra}))
        else:
            shape = rng.choice(shapes)
            row = {key: f"{key}-{n}" for key in shape}
            ops.append((INSERT, rng.choice([schema.TOOL_USAGES, schema.USER_PROMPTS]), row))
    plan = _plan(ops)
    for kind, _, rows in plan:
        assert kind in (INSERT, UPSERT)
        assert len({tuple(row) for row in rows}) == 1
    for table in (schema.TOOL_USAGES, schema.USER_PROMPTS):
        queued = [row for _, t, row in ops if t == table]
        assert [row for _, t, rows in plan if t == table for row in rows] == queued


def test_statements_quote_identifiers_and_upsert_only_given_columns() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute('create table "odd ""t""" (id text primary key, "a b" text, "c""d" text)')
    table, columns = 'odd "t"', ("id", "a b", 'c"d')
    assert insert_sql(table, columns) == (
        'INSERT INTO "odd ""t""" ("id", "a b", "c""d") VALUES (?, ?, ?)'
    )
    conn.execute(insert_sql(table, columns), ("x", "1", "2"))
    conn.execute(upsert_sql(table, ("id", "a b")), ("x", "3"))  # leaves "c""d" alone
    conn.execute(upsert_sql(table, ('c"d', "id")), ("4", "y"))  # a new row, any order
    conn.execute(upsert_sql(table, ("id",)), ("x",))  # only the key: nothing to change
    conn.execute(upsert_sql(table, ("id",)), ("z",))
    got = conn.execute('select * from "odd ""t""" order by id').fetchall()
    assert got == [("x", "3", "2"), ("y", None, "4"), ("z", None, None)]
    with pytest.raises(ValueError, match="id"):
        upsert_sql(table, ("a b",))
    assert insert_sql(table, ()) == 'INSERT INTO "odd ""t""" DEFAULT VALUES'


def test_upsert_of_only_an_id_leaves_the_row_alone(recorder: Recorder, db_path: Path) -> None:
    old, fresh = new_id(), new_id()
    recorder.upsert(schema.INTERCEPTIONS, {"id": old, "model": "m", "status": "s"})
    assert recorder.flush(WAIT)
    recorder.upsert(schema.INTERCEPTIONS, {"id": old})
    recorder.upsert(schema.INTERCEPTIONS, {"id": fresh})
    assert recorder.flush(WAIT)
    db = open_db(db_path)
    got = db[schema.INTERCEPTIONS].get(old)
    assert (got["model"], got["status"]) == ("m", "s")
    assert db[schema.INTERCEPTIONS].get(fresh)["model"] is None
    assert losses(db) == {}


def test_rows_of_one_table_with_differing_keys_in_one_batch(db_path: Path) -> None:
    rec = Recorder(db_path)
    iid = new_id()
    rec.upsert(schema.INTERCEPTIONS, {"id": iid, "model": "m"})
    rows: list[dict[str, Any]] = [
        {"interception_id": iid, "tool": "t0", "call_id": "c0"},
        {"call_id": "c1", "interception_id": iid, "tool": "t1"},  # same keys, other order
        {"interception_id": iid, "tool": "t2"},
        {"interception_id": iid, "tool": "t3", "args": {"n": 3}, "injected": True},
        {"interception_id": iid, "tool": "t4", "call_id": "c4"},
    ]
    for row in rows:
        rec.insert(schema.TOOL_USAGES, row)
    rec.upsert(schema.INTERCEPTIONS, {"status": "completed", "id": iid})
    rec.start()  # one batch
    assert rec.flush(WAIT)
    rec.close()
    assert rec.stats["batches"] == 1
    db = open_db(db_path)
    got = [
        (r["tool"], r["call_id"], r["args"], r["injected"])
        for r in db[schema.TOOL_USAGES].rows_where(order_by="id")
    ]
    assert got == [
        ("t0", "c0", None, None),
        ("t1", "c1", None, None),
        ("t2", None, None, None),
        ("t3", None, '{"n":3}', 1),
        ("t4", "c4", None, None),
    ]
    row = db[schema.INTERCEPTIONS].get(iid)
    assert (row["model"], row["status"]) == ("m", "completed")
    assert losses(db) == {}


def test_values_are_stored_as_sqlite_utils_stored_them(recorder: Recorder, db_path: Path) -> None:
    iid, rid = new_id(), uuid.uuid4()
    ended = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    recorder.upsert(
        schema.INTERCEPTIONS,
        {
            "id": iid,
            "streaming": True,
            "malformed_events": False,
            "error": None,
            "ended_at": ended,
            "response_id": rid,
            "http_status": decimal.Decimal("200"),
            "metadata": ("a", 1),
        },
    )
    assert recorder.flush(WAIT)
    db = open_db(db_path)
    got = db.execute(
        "select streaming, malformed_events, error, ended_at, response_id, http_status,"
        " metadata from interceptions"
    ).fetchone()
    assert got == (1, 0, None, ended.isoformat(), str(rid), 200, '["a",1]')
    assert losses(db) == {}


def test_invalid_unicode_is_repaired_and_the_batch_kept(db_path: Path) -> None:
    rec = Recorder(db_path)
    iid = new_id()
    rec.upsert(schema.INTERCEPTIONS, {"id": iid, "user_agent": "ok"})
    rec.upsert(schema.INTERCEPTIONS, {"id": iid, "user_agent": "bad \udcff byte"})
    rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": "kept"})
    rec.start()
    assert rec.flush(WAIT)
    rec.close()
    db = open_db(db_path)
    assert db[schema.INTERCEPTIONS].get(iid)["user_agent"] == "bad \ufffd byte"
    assert [r["prompt"] for r in db[schema.USER_PROMPTS].rows] == ["kept"]
    assert losses(db) == {(schema.INTERCEPTIONS, "user_agent", REASON_INVALID_UNICODE): 1}


def test_twenty_thousand_rows_flushed(recorder: Recorder, db_path: Path) -> None:
    ids = [new_id() for _ in range(2_000)]
    for iid in ids:
        recorder.upsert(schema.INTERCEPTIONS, {"id": iid, "model": "gpt-5"})
        for n in range(8):
            recorder.insert(schema.TOOL_USAGES, {"interception_id": iid, "call_id": f"c{n}"})
        recorder.upsert(schema.INTERCEPTIONS, {"id": iid, "status": "completed"})
    assert recorder.flush(WAIT * 4)
    db = open_db(db_path)
    assert db[schema.INTERCEPTIONS].count == 2_000
    assert db[schema.TOOL_USAGES].count == 16_000
    assert (
        db.execute("select count(*) from interceptions where status = 'completed'").fetchone()[0]
        == 2_000
    )
    assert recorder.stats["written"] == 20_000
    assert recorder.stats["queue_depth"] == 0


def test_json_columns_are_orjson_text(recorder: Recorder, db_path: Path) -> None:
    iid = new_id()
    metadata = {"headers": {"originator": "codex_cli_rs"}, "n": [1, 2.5, None, True]}
    recorder.upsert(schema.INTERCEPTIONS, {"id": iid, "metadata": metadata})
    recorder.insert(
        schema.TOOL_USAGES,
        {"interception_id": iid, "args": {"cmd": ["ls", "-la"], "é": "ü"}, "tool": "shell"},
    )
    recorder.insert(schema.TOOL_USAGES, {"interception_id": iid, "args": "raw, not JSON"})
    recorder.insert(
        schema.TOKEN_USAGES,
        {"interception_id": iid, "usage": {"input_tokens": 5, "details": {"cached_tokens": 1}}},
    )
    assert recorder.flush(WAIT)
    db = open_db(db_path)
    assert orjson.loads(db[schema.INTERCEPTIONS].get(iid)["metadata"]) == metadata
    args = [r["args"] for r in db[schema.TOOL_USAGES].rows_where(order_by="id")]
    assert orjson.loads(args[0]) == {"cmd": ["ls", "-la"], "é": "ü"}
    assert args[1] == "raw, not JSON"
    [usage] = [r["usage"] for r in db[schema.TOKEN_USAGES].rows]
    assert orjson.loads(usage)["details"] == {"cached_tokens": 1}
    # datasette's JSON detection relies on plain JSON text
    assert db.execute("select json_valid(metadata) from interceptions").fetchone()[0] == 1


def test_caller_rows_are_not_modified(recorder: Recorder) -> None:
    iid = new_id()
    row = {"id": iid, "metadata": {"a": 1}, "unknown": 1}
    recorder.upsert(schema.INTERCEPTIONS, row)
    assert recorder.flush(WAIT)
    assert row == {"id": iid, "metadata": {"a": 1}, "unknown": 1}


def test_close_drains_everything_and_is_idempotent(db_path: Path) -> None:
    rec = Recorder(db_path)
    rec.start()
    iid = new_id()
    rec.upsert(schema.INTERCEPTIONS, {"id": iid})
    for n in range(3_000):
        rec.insert(schema.MODEL_THOUGHTS, {"interception_id": iid, "content": f"t{n}"})
    rec.close()
    rec.close()
    # A clean close of the only connection checkpoints and removes the WAL.
    assert not Path(f"{db_path}-wal").exists()
    assert open_db(db_path)[schema.MODEL_THOUGHTS].count == 3_000
    assert rec.flush(0)


def test_insert_after_close_is_ignored_with_a_warning(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(db_path)
    rec.start()
    rec.close()
    with caplog.at_level(logging.WARNING, logger="aibridge.record.recorder"):
        rec.insert(schema.INTERCEPTIONS, {"id": new_id()})
        rec.upsert(schema.INTERCEPTIONS, {"id": new_id()})
    assert "closed" in caplog.text
    assert rec.stats["ignored_after_close"] == 2
    assert open_db(db_path)[schema.INTERCEPTIONS].count == 0
    with pytest.raises(RecorderError):
        rec.start()


def test_flush_before_start_reports_pending(db_path: Path) -> None:
    rec = Recorder(db_path)
    assert rec.flush(0)
    rec.insert(schema.INTERCEPTIONS, {"id": new_id()})
    assert not rec.flush(0)
    rec.start()
    assert rec.flush(WAIT)
    rec.close()


def test_concurrent_producers(recorder: Recorder, db_path: Path) -> None:
    iid = new_id()
    recorder.upsert(schema.INTERCEPTIONS, {"id": iid})

    def produce(k: int) -> None:
        for n in range(1_000):
            recorder.insert(schema.TOOL_USAGES, {"interception_id": iid, "call_id": f"{k}-{n}"})

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert recorder.flush(WAIT)
    assert open_db(db_path)[schema.TOOL_USAGES].count == 4_000


# ---- recorder: linger ------------------------------------------------------------


def test_linger_gathers_a_few_rows_and_flush_cuts_it_short(db_path: Path) -> None:
    rec = Recorder(db_path, linger=FOREVER)
    rec.start()
    iid = new_id()
    rec.upsert(schema.INTERCEPTIONS, {"id": iid})
    time.sleep(0.05)  # the writer wakes for the first row, then lingers
    for n in range(3):
        rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": f"p{n}"})
    assert rec.stats["written"] == 0
    assert rec.flush(WAIT)  # would miss WAIT if it sat out the linger
    assert rec.stats["batches"] == 1 and rec.stats["written"] == 4
    rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": "p3"})
    assert rec.flush(WAIT)  # a second flush, while the writer lingers again
    rec.close(timeout=WAIT)
    assert open_db(db_path)[schema.USER_PROMPTS].count == 4


def test_a_full_batch_and_close_do_not_wait_for_linger(db_path: Path) -> None:
    rec = Recorder(db_path, batch_size=10, linger=FOREVER)
    rec.start()
    iid = new_id()
    rec.upsert(schema.INTERCEPTIONS, {"id": iid})
    time.sleep(0.05)  # the writer wakes for the first row, then lingers
    for n in range(9):
        rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": n})
    wait_until(lambda: rec.stats["written"] == 10)  # no flush: batch_size rows wake it
    for n in range(9, 12):
        rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": n})
    rec.close(timeout=WAIT)
    assert rec.stats["written"] == 13
    got = [
        r["input_tokens"] for r in open_db(db_path)[schema.TOKEN_USAGES].rows_where(order_by="id")
    ]
    assert got == list(range(12))


@pytest.mark.parametrize("linger", [0.0, 0.01])
def test_rows_are_written_without_flush_after_the_linger(db_path: Path, linger: float) -> None:
    rec = Recorder(db_path, linger=linger)
    rec.start()
    rec.upsert(schema.INTERCEPTIONS, {"id": new_id()})
    wait_until(lambda: rec.stats["written"] == 1)
    rec.close(timeout=WAIT)


@pytest.mark.parametrize("linger", [-0.01, float("nan")])
def test_linger_must_not_be_negative(db_path: Path, linger: float) -> None:
    with pytest.raises(ValueError, match="linger"):
        Recorder(db_path, linger=linger)


# ---- recorder: bad rows -------------------------------------------------------


def test_bad_row_loses_only_itself(db_path: Path) -> None:
    rec = Recorder(db_path)
    iid = new_id()
    rec.upsert(schema.INTERCEPTIONS, {"id": iid})
    for n in range(10):
        rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": n})
        if n == 4:
            rec.insert(schema.TOKEN_USAGES, {"input_tokens": 99})  # NOT NULL interception_id
            rec.insert(schema.TOOL_USAGES, {"interception_id": "missing", "tool": "x"})  # FK
    rec.start()  # everything above is one batch
    assert rec.flush(WAIT)
    rec.close()
    db = open_db(db_path)
    got = [r["input_tokens"] for r in db[schema.TOKEN_USAGES].rows_where(order_by="id")]
    assert got == list(range(10))
    assert db[schema.TOOL_USAGES].count == 0
    lost = losses(db)
    assert sum(lost.values()) == 2
    reasons = {key[0]: key[2] for key in lost}
    assert "NOT NULL" in reasons[schema.TOKEN_USAGES]
    assert "FOREIGN KEY" in reasons[schema.TOOL_USAGES]
    assert rec.stats["dropped"] == 2
    assert rec.stats["written"] == 11


def test_unknown_columns_tables_and_values_are_recorded_losses(
    recorder: Recorder, db_path: Path
) -> None:
    iid = new_id()
    recorder.upsert(schema.INTERCEPTIONS, {"id": iid, "model": "m", "not_a_column": 1})
    recorder.insert("no_such_table", {"x": 1})
    recorder.insert(
        schema.TOOL_USAGES, {"interception_id": iid, "args": {"s": {1, 2}}, "tool": "t"}
    )
    recorder.upsert(schema.INTERCEPTIONS, {"model": "no id"})
    recorder.insert(schema.TOOL_USAGES, "not a dict")  # type: ignore[arg-type]
    assert recorder.flush(WAIT)
    db = open_db(db_path)
    assert db[schema.INTERCEPTIONS].get(iid)["model"] == "m"
    [tool] = list(db[schema.TOOL_USAGES].rows)
    assert (tool["tool"], tool["args"]) == ("t", None)
    lost = losses(db)
    assert lost[(schema.INTERCEPTIONS, "not_a_column", "unknown column")] == 1
    assert lost[("no_such_table", None, "unknown table")] == 1
    assert lost[(schema.INTERCEPTIONS, None, "upsert without an id")] == 1
    assert lost[(schema.TOOL_USAGES, None, "row is not a dict")] == 1
    [json_loss] = [k for k in lost if k[1] == "args"]
    assert json_loss[2].startswith("not JSON serializable")


# ---- recorder: faults ---------------------------------------------------------


def test_locked_database_keeps_accepting_and_catches_up(db_path: Path) -> None:
    rec = Recorder(db_path, busy_timeout_ms=20)
    rec.start()
    iid = new_id()
    rec.upsert(schema.INTERCEPTIONS, {"id": iid})
    assert rec.flush(WAIT)

    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": 0})
        wait_until(lambda: rec.stats["retries"] >= 2)
        for n in range(1, 500):
            rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": n})
        assert rec.stats["queue_depth"] == 499  # the first row is in the writer's hands
        assert not rec.flush(0.05)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert rec.flush(WAIT)
    rec.close()
    db = open_db(db_path)
    got = [r["input_tokens"] for r in db[schema.TOKEN_USAGES].rows_where(order_by="id")]
    assert got == list(range(500))
    assert losses(db) == {}


def _set_read_only(path: Path, read_only: bool) -> None:
    if os.geteuid() != 0:
        path.chmod(0o444 if read_only else 0o644)
        return
    # root ignores permission bits; the immutable flag stops even root.
    done = subprocess.run(
        ["chattr", "+i" if read_only else "-i", str(path)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot make a file read-only as root here: {done.stderr!r}")


def test_read_only_file_retries_until_writable(db_path: Path) -> None:
    setup = Recorder(db_path)
    setup.start()
    iid = new_id()
    setup.upsert(schema.INTERCEPTIONS, {"id": iid})
    setup.close()

    _set_read_only(db_path, True)
    try:
        rec = Recorder(db_path, busy_timeout_ms=20)
        rec.start()  # the schema is current, so opening needs no write
        for n in range(100):
            rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": f"p{n}"})
        wait_until(lambda: rec.stats["retries"] >= 2)
        assert open_db(db_path)[schema.USER_PROMPTS].count == 0
    finally:
        _set_read_only(db_path, False)
    assert rec.flush(WAIT)
    rec.close()
    db = open_db(db_path)
    assert db[schema.USER_PROMPTS].count == 100
    assert losses(db) == {}


def test_start_raises_when_database_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(RecorderError, match="cannot open audit database"):
        Recorder(tmp_path / "missing-dir" / "audit.db").start()
    with pytest.raises(RecorderError):
        Recorder(tmp_path).start()  # a directory


def test_start_raises_when_a_read_only_database_needs_migrating(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).execute("create table unrelated (x)").connection.close()
    _set_read_only(path, True)
    try:
        with pytest.raises(RecorderError, match="readonly"):
            Recorder(path).start()
    finally:
        _set_read_only(path, False)


@contextlib.contextmanager
def writer_stuck(rec: Recorder, db_path: Path, iid: str) -> Iterator[None]:
    """Hold the write lock so the writer retries one sentinel token usage meanwhile."""
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": -1})
        wait_until(lambda: rec.stats["retries"] >= 1)  # its batch is just that row
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def started_with_interception(db_path: Path, max_queue: int) -> tuple[Recorder, str]:
    rec = Recorder(db_path, max_queue=max_queue, busy_timeout_ms=20)
    rec.start()
    iid = new_id()
    rec.upsert(schema.INTERCEPTIONS, {"id": iid})
    assert rec.flush(WAIT)
    return rec, iid


def test_overflow_sheds_oldest_content_then_oldest_rows(db_path: Path) -> None:
    rec, iid = started_with_interception(db_path, max_queue=20)
    with writer_stuck(rec, db_path, iid):
        # 23 queued rows: prompts p0..p19, a token usage after p4, p9 and p14.
        for n in range(20):
            rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": f"p{n}"})
            if n in (4, 9, 14):
                rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": n})
        # Rows 11..23 each took the content of the oldest row still holding some
        # (p0..p12); rows 21..23 each dropped the oldest prompt row (p0..p2).
        assert rec.stats["stripped"] == 13
        assert rec.stats["dropped"] == 3
        assert rec.stats["queue_depth"] == 20
    assert rec.flush(WAIT)
    rec.close()

    db = open_db(db_path)
    prompts = [r["prompt"] for r in db[schema.USER_PROMPTS].rows_where(order_by="id")]
    assert prompts == [None] * 10 + [f"p{n}" for n in range(13, 20)]
    tokens = [r["input_tokens"] for r in db[schema.TOKEN_USAGES].rows_where(order_by="id")]
    assert tokens == [-1, 4, 9, 14]
    assert losses(db) == {
        (schema.USER_PROMPTS, "prompt", REASON_CONTENT_SHED): 13,
        (schema.USER_PROMPTS, None, REASON_ROW_SHED): 3,
    }


def test_overflow_never_drops_token_usages_or_interceptions(db_path: Path) -> None:
    rec, iid = started_with_interception(db_path, max_queue=20)
    with writer_stuck(rec, db_path, iid):
        for n in range(30):
            rec.insert(schema.MODEL_THOUGHTS, {"interception_id": iid, "content": f"t{n}"})
            rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": n})
            rec.upsert(schema.INTERCEPTIONS, {"id": iid, "status": f"s{n}"})
    assert rec.flush(WAIT)
    rec.close()

    db = open_db(db_path)
    tokens = [r["input_tokens"] for r in db[schema.TOKEN_USAGES].rows_where(order_by="id")]
    assert tokens == list(range(-1, 30))
    assert db[schema.INTERCEPTIONS].get(iid)["status"] == "s29"
    lost = losses(db)
    assert set(lost) == {
        (schema.MODEL_THOUGHTS, "content", REASON_CONTENT_SHED),
        (schema.MODEL_THOUGHTS, None, REASON_ROW_SHED),
    }
    thoughts = db[schema.MODEL_THOUGHTS].count
    assert thoughts + lost[(schema.MODEL_THOUGHTS, None, REASON_ROW_SHED)] == 30
    assert rec.stats["dropped"] == lost[(schema.MODEL_THOUGHTS, None, REASON_ROW_SHED)]


def test_writer_survives_an_unexpected_error(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(db_path)
    rec.start()
    real_prepare = Recorder._prepare
    calls = 0

    def failing_once(self: Recorder, batch: list[list[Any]]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        return real_prepare(self, batch)

    monkeypatch.setattr(Recorder, "_prepare", failing_once)
    with caplog.at_level(logging.ERROR, logger="aibridge.record.recorder"):
        rec.upsert(schema.INTERCEPTIONS, {"id": "lost"})
        assert rec.flush(WAIT)
    assert "bug" in caplog.text
    rec.upsert(schema.INTERCEPTIONS, {"id": "kept"})
    assert rec.flush(WAIT)
    rec.close()
    db = open_db(db_path)
    assert [r["id"] for r in db[schema.INTERCEPTIONS].rows] == ["kept"]
    assert losses(db) == {(schema.INTERCEPTIONS, None, "RuntimeError: bug"): 1}


def _sqlite_error(code: int, message: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (sqlite3.SQLITE_BUSY, True),
        (sqlite3.SQLITE_LOCKED, True),
        (sqlite3.SQLITE_READONLY, True),
        (sqlite3.SQLITE_FULL, True),
        (sqlite3.SQLITE_IOERR | (4 << 8), True),  # an extended code: IOERR_WRITE
        (sqlite3.SQLITE_CANTOPEN, True),
        (sqlite3.SQLITE_ERROR, False),  # "no such column": retrying cannot help
        (sqlite3.SQLITE_CONSTRAINT, False),
    ],
)
def test_only_not_now_errors_are_retried(code: int, transient: bool) -> None:
    assert is_transient(_sqlite_error(code, "x")) is transient


def test_error_without_code_is_classified_by_message() -> None:
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert not is_transient(sqlite3.OperationalError("no such table: x"))
    assert not is_transient(sqlite3.IntegrityError("database is locked"))


def test_newer_database_is_used_with_a_warning(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = migrated(db_path)
    db[schema.MIGRATIONS_TABLE].insert({"name": "m999_from_the_future", "applied_at": "x"})
    db.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    with caplog.at_level(logging.WARNING, logger="aibridge.record.schema"):
        schema.migrate(db)
    assert "m999_from_the_future" in caplog.text
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION + 1


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_the_writer_runs_at_a_lower_cpu_priority(recorder: Recorder) -> None:
    assert recorder._thread is not None and recorder._thread.native_id is not None
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    writer = os.getpriority(os.PRIO_PROCESS, recorder._thread.native_id)
    assert writer == min(19, ours + WRITER_NICENESS)
