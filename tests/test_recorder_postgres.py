"""The recorder on PostgreSQL, against a real server (tests/postgres_server.py), and the same
behaviour on both engines where the two must agree (``engine`` fixture)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from aibridge.record import postgres, schema
from aibridge.record.recorder import Recorder, RecorderError
from tests.harness import wait_for
from tests.log_engines import engine, losses, pg_rows, read, sqlite_rows
from tests.postgres_server import PostgresServer

__all__ = ["engine"]  # a fixture, imported for this module's tests

WAIT = 30.0  # generous upper bound for waits; never asserted as a duration


@pytest.fixture
def started(engine: str) -> Iterator[Recorder]:
    rec = Recorder(engine, linger=0)
    rec.start()
    yield rec
    rec.close(timeout=WAIT)


def exchange(rec: Recorder, n: int, *, user: str = "alice") -> None:
    """The rows one finished exchange gives, as the bridge queues them."""
    iid = f"i{n}"
    rec.upsert(
        schema.INTERCEPTIONS,
        {
            "id": iid,
            "started_at": f"2026-12-01T10:00:{n % 60:02d}.000Z",
            "initiator_id": user,
            "provider": "openai",
            "api": "responses",
            "model": "gpt-5",
            "streaming": 1,
            "credential_kind": "centralized",
            "status": "in_progress",
            "metadata": {"request_bytes": 100 + n},
        },
    )
    rec.insert(
        schema.USER_PROMPTS,
        {"interception_id": iid, "prompt": f"please refactor module {n}", "created_at": "t"},
    )
    rec.insert(
        schema.TOKEN_USAGES,
        {
            "interception_id": iid,
            "input_tokens": 10 * n,
            "output_tokens": n,
            "total_tokens": 11 * n,
            "usage": {"input_tokens": 10 * n, "output_tokens": n},
            "estimated_cost_usd": 0.001 * n,
            "created_at": "t",
        },
    )
    rec.insert(
        schema.TOOL_USAGES,
        {"interception_id": iid, "tool": "shell", "args": '{"cmd": "ls"}', "injected": False},
    )
    rec.upsert(schema.INTERCEPTIONS, {"id": iid, "status": "completed", "http_status": 200})


# ---- schema and migrations ------------------------------------------------------------------


def test_a_new_database_gets_every_table_and_the_same_history_as_sqlite(
    postgres_url: str, tmp_path: Path
) -> None:
    for address in (postgres_url, str(tmp_path / "a.db")):
        rec = Recorder(address)
        rec.start()
        rec.close()
    names = [m.__name__ for m in schema.MIGRATIONS]
    assert [r["name"] for r in pg_rows(postgres_url, "select name from _migrations")] == names
    assert [
        r["name"] for r in sqlite_rows(str(tmp_path / "a.db"), "select name from _migrations")
    ] == names
    # The same tables with the same columns (PostgreSQL's search column aside).
    with psycopg.connect(postgres_url) as conn:
        pg_columns = postgres.column_types(conn)
    for table in schema.WRITABLE_TABLES:
        lite = [
            r["name"] for r in sqlite_rows(str(tmp_path / "a.db"), f"pragma table_info({table})")
        ]
        assert sorted(pg_columns[table]) == sorted(lite), table
    assert pg_columns[schema.INTERCEPTIONS]["metadata"] == "jsonb"
    assert pg_columns[schema.TOKEN_USAGES]["estimated_cost_usd"] == "double precision"
    assert pg_columns[schema.TOKEN_USAGES]["input_tokens"] == "bigint"


def test_an_up_to_date_database_is_only_read(postgres_url: str) -> None:
    Recorder(postgres_url).start()
    before = pg_rows(postgres_url, "select name, applied_at from _migrations")
    rec = Recorder(postgres_url)
    rec.start()
    rec.close()
    assert pg_rows(postgres_url, "select name, applied_at from _migrations") == before


def test_bridges_starting_at_once_apply_each_migration_once(postgres_url: str) -> None:
    errors: list[BaseException] = []
    recorders: list[Recorder] = []
    gate = threading.Barrier(8)

    def start() -> None:
        rec = Recorder(postgres_url)
        recorders.append(rec)
        gate.wait()
        try:
            rec.start()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for rec in recorders:
        rec.close()
    assert errors == []
    names = [r["name"] for r in pg_rows(postgres_url, "select name from _migrations")]
    assert names == [m.__name__ for m in schema.MIGRATIONS]


def test_a_database_migrated_by_a_newer_version_still_takes_rows(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    Recorder(postgres_url).start()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("insert into _migrations values ('m999_from_the_future', 'later')")
    with caplog.at_level(logging.WARNING):
        rec = Recorder(postgres_url)
        rec.start()
        exchange(rec, 1)
        assert rec.flush(WAIT)
        rec.close()
    assert "m999_from_the_future" in caplog.text
    assert len(pg_rows(postgres_url, "select id from interceptions")) == 1


def test_a_migration_that_fails_leaves_nothing_half_made(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    last = schema.MIGRATIONS[-1]
    with monkeypatch.context() as patched:
        patched.setattr(last, "postgres", (*schema.postgres_statements(last), "select 1/0"))
        with pytest.raises(RecorderError, match="DivisionByZero"):
            Recorder(postgres_url).start()
    assert pg_rows(postgres_url, "select to_regclass('interceptions')::text as t") == [{"t": None}]
    Recorder(postgres_url).start()
    assert len(pg_rows(postgres_url, "select name from _migrations")) == len(schema.MIGRATIONS)


def test_every_migration_states_its_postgresql_side() -> None:
    def m999_sqlite_only(db: Any) -> None:
        pass

    with pytest.raises(ValueError, match="no @postgres statements"):
        schema.migration(m999_sqlite_only)
    assert all(isinstance(schema.postgres_statements(m), tuple) for m in schema.MIGRATIONS)


# ---- the same rows on both engines --------------------------------------------------------


def test_exchanges_read_back_the_same_on_both_engines(engine: str, started: Recorder) -> None:
    for n in range(1, 41):
        exchange(started, n, user="alice" if n % 2 else "bob")
    assert started.flush(WAIT)
    found = read(
        engine,
        "select id, initiator_id, status, http_status, streaming, metadata from interceptions "
        "order by started_at, id",
    )
    assert len(found) == 40
    assert found[0] == {
        "id": "i1",
        "initiator_id": "alice",
        "status": "completed",
        "http_status": 200,
        "streaming": 1,
        "metadata": {"request_bytes": 101},
    }
    usages = read(
        engine, "select interception_id, total_tokens, usage from token_usages order by id"
    )
    assert [u["total_tokens"] for u in usages] == [11 * n for n in range(1, 41)]
    assert usages[2]["usage"] == {"input_tokens": 30, "output_tokens": 3}
    tools = read(engine, "select args, injected from tool_usages order by id")
    assert tools[0] == {"args": {"cmd": "ls"}, "injected": 0}
    assert losses(engine) == {}
    assert started.stats["written"] == 200


def test_upserts_set_only_the_columns_they_carry(engine: str, started: Recorder) -> None:
    started.upsert(schema.INTERCEPTIONS, {"id": "x", "model": "gpt-5", "status": "in_progress"})
    started.upsert(schema.INTERCEPTIONS, {"id": "x", "status": "completed"})
    assert started.flush(WAIT)
    started.upsert(schema.INTERCEPTIONS, {"id": "x", "http_status": 200})
    assert started.flush(WAIT)
    assert read(engine, "select model, status, http_status from interceptions") == [
        {"model": "gpt-5", "status": "completed", "http_status": 200}
    ]


def test_a_row_the_database_refuses_costs_only_that_row(engine: str, started: Recorder) -> None:
    exchange(started, 1)
    started.insert(schema.MODEL_THOUGHTS, {"interception_id": "no such", "content": "orphan"})
    started.insert(schema.MODEL_THOUGHTS, {"interception_id": "i1", "content": "kept"})
    assert started.flush(WAIT)
    assert [r["content"] for r in read(engine, "select content from model_thoughts")] == ["kept"]
    ((key, count),) = losses(engine).items()
    assert key[:2] == (schema.MODEL_THOUGHTS, None) and count == 1
    assert "foreign key" in key[2].lower()


# ---- values PostgreSQL is strict about -----------------------------------------------------

NUL_VARIANTS = [
    pytest.param({"prompt": "a\x00b"}, schema.USER_PROMPTS, "prompt", id="prompt"),
    pytest.param({"prompt": "\x00"}, schema.USER_PROMPTS, "prompt", id="prompt-only-nul"),
    pytest.param({"prompt": "x\x00" * 500}, schema.USER_PROMPTS, "prompt", id="many"),
    pytest.param({"content": "think\x00ing"}, schema.MODEL_THOUGHTS, "content", id="thought"),
    pytest.param({"source": "\x00reasoning"}, schema.MODEL_THOUGHTS, "source", id="short-column"),
    pytest.param({"args": '{"path": "a\\u0000b"}'}, schema.TOOL_USAGES, "args", id="json-escape"),
    pytest.param({"args": '["\\u0000", "\\\\u0000"]'}, schema.TOOL_USAGES, "args", id="json-both"),
    pytest.param({"tool": "sh\x00ell"}, schema.TOOL_USAGES, "tool", id="tool-name"),
]


@pytest.mark.parametrize(("values", "table", "field"), NUL_VARIANTS)
def test_a_nul_character_is_replaced_not_lost(
    postgres_url: str, values: dict[str, Any], table: str, field: str
) -> None:
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    exchange(rec, 1)
    rec.upsert(schema.INTERCEPTIONS, {"id": "bad"})
    rec.insert(table, {"interception_id": "bad", **values})
    exchange(rec, 2)
    assert rec.flush(WAIT)
    rec.close()
    (stored,) = pg_rows(postgres_url, f"select {field} from {table} where interception_id = 'bad'")
    value = stored[field]
    text = orjson.dumps(value).decode() if not isinstance(value, str) else value
    assert "\x00" not in text and "\\u0000" not in text.replace("\\\\u0000", "")
    assert "\ufffd" in text
    assert losses(postgres_url) == {(table, field, postgres.REASON_NUL): 1}
    # The batch's other rows went in as they were.
    assert len(pg_rows(postgres_url, "select id from interceptions")) == 3
    assert (
        len(pg_rows(postgres_url, f"select id from {table}"))
        == 3 - (table == schema.MODEL_THOUGHTS) * 2
    )


def test_a_literal_backslash_u0000_in_json_is_kept(postgres_url: str) -> None:
    """The six characters \\u0000 escaped in JSON ("\\\\u0000") are text, not a NUL."""
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    exchange(rec, 1)
    rec.insert(schema.TOOL_USAGES, {"interception_id": "i1", "args": '{"s": "\\\\u0000"}'})
    assert rec.flush(WAIT)
    rec.close()
    args = pg_rows(postgres_url, "select args from tool_usages order by id")[-1]["args"]
    assert args == {"s": "\\u0000"}
    assert losses(postgres_url) == {}


def test_an_interception_with_nul_and_surrogates_everywhere_is_kept(postgres_url: str) -> None:
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    rec.upsert(
        schema.INTERCEPTIONS,
        {
            "id": "bad",
            "user_agent": "agent\x00/1 \udcff",
            "error": "upstream said \x00",
            "metadata": {"header": "v\x00"},
            "client_session_id": "\udc80\udc81",
        },
    )
    assert rec.flush(WAIT)
    rec.close()
    (row,) = pg_rows(postgres_url, "select * from interceptions")
    assert row["user_agent"] == "agent\ufffd/1 \ufffd"
    assert row["error"] == "upstream said \ufffd"
    assert row["metadata"] == {"header": "v\ufffd"}
    assert row["client_session_id"] == "\ufffd\ufffd"
    assert losses(postgres_url) == {
        (schema.INTERCEPTIONS, "user_agent", postgres.REASON_INVALID_UNICODE): 1,
        (schema.INTERCEPTIONS, "user_agent", postgres.REASON_NUL): 1,
        (schema.INTERCEPTIONS, "error", postgres.REASON_NUL): 1,
        (schema.INTERCEPTIONS, "metadata", postgres.REASON_NUL): 1,
        (schema.INTERCEPTIONS, "client_session_id", postgres.REASON_INVALID_UNICODE): 1,
    }


WRONG_TYPES = [
    pytest.param("http_status", "two hundred", None, postgres.REASON_NOT_OF_TYPE, id="str-in-int"),
    pytest.param("http_status", 2**70, None, postgres.REASON_NOT_OF_TYPE, id="huge-int"),
    pytest.param("model", {"a": 1}, None, None, id="dict-in-text"),
    pytest.param("metadata", "not json {", "not json {", postgres.REASON_AS_TEXT, id="bad-json"),
    pytest.param("metadata", "", "", postgres.REASON_AS_TEXT, id="empty-json"),
]


@pytest.mark.parametrize(("column", "value", "stored", "reason"), WRONG_TYPES)
def test_a_value_not_of_its_columns_type_does_not_cost_the_interception(
    postgres_url: str, column: str, value: Any, stored: Any, reason: str | None
) -> None:
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    rec.upsert(schema.INTERCEPTIONS, {"id": "typed", "status": "completed", column: value})
    assert rec.flush(WAIT)
    rec.close()
    rows = pg_rows(postgres_url, f"select status, {column} from interceptions")
    if reason is None:
        # As in SQLite: a dict or list is stored as its JSON text.
        assert rows == [{"status": "completed", column: orjson.dumps(value).decode()}]
        assert losses(postgres_url) == {}
        return
    assert rows == [{"status": "completed", column: stored}]
    assert losses(postgres_url) == {(schema.INTERCEPTIONS, column, reason): 1}


def test_booleans_are_stored_as_integers(postgres_url: str) -> None:
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    rec.upsert(schema.INTERCEPTIONS, {"id": "b", "streaming": True, "malformed_events": False})
    assert rec.flush(WAIT)
    rec.close()
    assert pg_rows(postgres_url, "select streaming, malformed_events from interceptions") == [
        {"streaming": 1, "malformed_events": 0}
    ]
    assert losses(postgres_url) == {}


# ---- prompt search -------------------------------------------------------------------------


def test_prompts_are_searchable_by_word_prefix(postgres_url: str) -> None:
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    for n in range(5):
        exchange(rec, n)
    rec.insert(
        schema.USER_PROMPTS, {"interception_id": "i1", "prompt": "Déjà vu: naïve café tests"}
    )
    assert rec.flush(WAIT)
    rec.close()
    search = "select prompt from user_prompts where prompt_search @@ to_tsquery('simple', %s)"
    assert len(pg_rows(postgres_url, search, ("refact:*",))) == 5
    assert pg_rows(postgres_url, search, ("caf:*",)) == [{"prompt": "Déjà vu: naïve café tests"}]
    assert pg_rows(postgres_url, search, ("nothing:*",)) == []


def test_a_huge_prompt_is_stored_whole_and_its_start_searchable(postgres_url: str) -> None:
    """A tsvector holds at most 1 MB: a prompt of distinct words far past that is kept whole;
    the search covers its first SEARCH_PREFIX_CHARS characters."""
    words = " ".join(f"w{n:07d}" for n in range(300_000))  # 2.7 MB of distinct words
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    exchange(rec, 1)
    rec.insert(schema.USER_PROMPTS, {"interception_id": "i1", "prompt": words})
    assert rec.flush(WAIT)
    rec.close()
    (row,) = pg_rows(
        postgres_url,
        "select length(prompt) as n from user_prompts where prompt_search @@ "
        "to_tsquery('simple', 'w0000001')",
    )
    assert row["n"] == len(words)
    assert losses(postgres_url) == {}


# ---- a database that goes away -------------------------------------------------------------


# The test server runs with synchronous_commit off; a crash may then take back the last
# commits, which would look like lost rows. Durable commits for the tests that crash it.
DURABLE = "?options=-csynchronous_commit%3Don"


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, to restart or kill without touching the others."""
    from tests.postgres_server import postgres_bin

    with PostgresServer(postgres_bin()) as server:
        yield server


def test_a_restart_delays_rows_and_loses_none(
    own_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = own_server.create_database("audit") + DURABLE
    monkeypatch.setenv("PGPASSWORD", own_server.password)
    rec = Recorder(url, linger=0)
    rec.start()
    for n in range(50):
        exchange(rec, n)
    assert rec.flush(WAIT)
    own_server.kill()
    with caplog.at_level(logging.WARNING, logger="aibridge.record.recorder"):
        for n in range(50, 100):
            exchange(rec, n)  # queued while the server is down; never blocks
        assert wait_for(lambda: rec.health["state"] == "retrying", WAIT)
        for n in range(100, 120):
            exchange(rec, n)
        assert rec.health["queue_rows"] == 100  # behind the batch being retried
        own_server.start()
        assert rec.flush(WAIT)
    assert rec.health["state"] == "ok"
    rec.close()
    ids = [r["id"] for r in pg_rows(url, "select id from interceptions")]
    assert sorted(ids) == sorted(f"i{n}" for n in range(120))
    assert len(pg_rows(url, "select id from token_usages")) == 120
    assert losses(url) == {}
    assert own_server.password not in caplog.text


def test_a_server_killed_mid_batch_gets_each_row_once(
    own_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch in flight when the server dies is rolled back by it and written again."""
    url = own_server.create_database("audit") + DURABLE
    monkeypatch.setenv("PGPASSWORD", own_server.password)
    rec = Recorder(url, linger=0, batch_size=50)
    rec.start()
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set() or n < 400:
            exchange(rec, n)
            n += 1
            if n >= 400:
                break

    producer = threading.Thread(target=produce)
    producer.start()
    assert wait_for(lambda: rec.stats["written"] > 100, WAIT)
    own_server.kill()
    own_server.start()
    producer.join(WAIT)
    assert rec.flush(WAIT)
    rec.close()
    ids = [r["id"] for r in pg_rows(url, "select id from interceptions")]
    assert len(ids) == len(set(ids)) == 400
    usages = pg_rows(url, "select interception_id from token_usages")
    assert len(usages) == 400 and len({u["interception_id"] for u in usages}) == 400
    assert losses(url) == {}


@pytest.mark.parametrize("how", ["xid-never-given", "server-killed-at-commit"])
def test_a_commit_the_server_forgot_in_a_crash_is_written_again(
    own_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The server dies between the batch's rows and its COMMIT. It restarts without any
    record of that transaction, so asking about it (txid_status) is answered "transaction ID
    ... is in the future". That means the batch never landed: it is written again, not lost."""
    url = own_server.create_database("audit") + DURABLE
    monkeypatch.setenv("PGPASSWORD", own_server.password)
    broken = threading.Event()
    real_commit = postgres.PostgresStore._commit

    def crash_at_commit(self: postgres.PostgresStore, conn: Any) -> None:
        if broken.is_set():
            return real_commit(self, conn)
        broken.set()
        if how == "xid-never-given":
            # As the server sees it after such a crash: an id beyond any it has given.
            assert self._unanswered_xid is not None
            self._unanswered_xid += 10_000_000
            socket.socket(fileno=os.dup(conn.pgconn.socket)).shutdown(socket.SHUT_RDWR)
        else:
            own_server.kill()
            own_server.start()
        conn.execute("commit")  # raises: the connection is gone

    rec = Recorder(url, linger=0)
    rec.start()
    exchange(rec, 1)
    assert rec.flush(WAIT)
    monkeypatch.setattr(postgres.PostgresStore, "_commit", crash_at_commit)
    for n in range(2, 7):
        exchange(rec, n)
    assert rec.flush(WAIT)
    rec.close()
    assert broken.is_set()
    for table in ("interceptions", "token_usages", "user_prompts", "tool_usages"):
        ids = [
            r["interception_id" if table != "interceptions" else "id"]
            for r in pg_rows(url, f"select * from {table}")
        ]
        assert sorted(ids) == sorted(f"i{n}" for n in range(1, 7)), table
    assert losses(url) == {}


# ---- addresses that do not work, and the password ------------------------------------------


def test_an_unreachable_server_is_named_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    from tests.postgres_server import free_port

    url = f"postgresql://aibridge:hunter2-secret@127.0.0.1:{free_port()}/nowhere?connect_timeout=3"
    with pytest.raises(RecorderError) as caught:
        Recorder(url).start()
    message = str(caught.value)
    assert "hunter2-secret" not in message
    assert "postgresql://aibridge:***@127.0.0.1" in message


def test_a_wrong_password_is_refused_without_showing_it(postgres_server: PostgresServer) -> None:
    url = postgres_server.url("postgres").replace("aibridge@", "aibridge:wrong-pass-123@")
    with pytest.raises(RecorderError) as caught:
        Recorder(url).start()
    assert "wrong-pass-123" not in str(caught.value)
    assert "password authentication failed" in str(caught.value)


def test_the_password_never_shows_in_repr_logs_or_health(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    name = "secretive"
    postgres_server.create_database(name)
    url = postgres_server.url(name, password=True)
    secret = postgres_server.password
    try:
        with caplog.at_level(logging.DEBUG):
            rec = Recorder(url, linger=0)
            rec.start()
            exchange(rec, 1)
            rec.insert(schema.MODEL_THOUGHTS, {"interception_id": "missing", "content": "x"})
            assert rec.flush(WAIT)
            shown = [repr(rec), rec.where, str(rec.health), str(rec.stats)]
            rec.close()
        assert secret not in caplog.text
        assert all(secret not in s for s in shown)
        assert "***" in rec.where
        assert all(secret not in str(v) for v in losses(url))
    finally:
        postgres_server.drop_database(name)


# ---- a middlebox that stops answering --------------------------------------------------------


class Relay:
    """A TCP relay on loopback in front of the server, like a pooler or a load balancer. When
    `hang` is set it keeps every connection open and passes nothing on, either way: the
    kernel still acknowledges what is sent to it, so TCP itself never notices."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.hang = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.hang.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_a_middlebox_that_never_answers_is_cut_and_the_rows_follow(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(postgres, "WRITE_TIMEOUT", 1.0)
    port = int(postgres_url.split("@127.0.0.1:")[1].split("/")[0])
    relay = Relay(port)
    url = postgres_url.replace(f":{port}/", f":{relay.port}/") + "?connect_timeout=2"
    try:
        rec = Recorder(url, linger=0)
        rec.start()
        exchange(rec, 1)
        assert rec.flush(WAIT)
        relay.hang.set()
        with caplog.at_level(logging.WARNING):
            for n in range(2, 12):
                exchange(rec, n)
            assert wait_for(lambda: "did not answer within 1 s" in caplog.text, WAIT)
            assert wait_for(lambda: rec.health["state"] == "retrying", WAIT)
            relay.hang.clear()  # new connections pass again; the hung one is gone
            assert rec.flush(WAIT)
        rec.close()
    finally:
        relay.close()
    ids = [r["id"] for r in pg_rows(postgres_url, "select id from interceptions")]
    assert sorted(ids) == sorted(f"i{n}" for n in range(1, 12))
    assert len(pg_rows(postgres_url, "select id from token_usages")) == 11
    assert losses(postgres_url) == {}


def test_a_server_answering_read_only_as_a_standby_does_is_waited_out(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    """After a failover a connection can land on a standby (read-only): the batch waits, and
    a new connection (to the new primary, here the same server made writable) takes it."""
    name = postgres_url.rsplit("/", 1)[1]
    rec = Recorder(postgres_url, linger=0)
    rec.start()
    exchange(rec, 1)
    assert rec.flush(WAIT)
    with postgres_server.connect(autocommit=True) as admin:
        admin.execute(f'alter database "{name}" set default_transaction_read_only = on')
        admin.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where datname = %s and pid <> pg_backend_pid()",
            (name,),
        )
        for n in range(2, 6):
            exchange(rec, n)
        assert wait_for(lambda: "ReadOnlySqlTransaction" in str(rec.health.get("error")), WAIT)
        admin.execute(f'alter database "{name}" set default_transaction_read_only = off')
    assert rec.flush(WAIT)
    rec.close()
    assert len(pg_rows(postgres_url, "select id from interceptions")) == 5
    assert losses(postgres_url) == {}


@pytest.mark.parametrize("landed", [True, False], ids=["commit-landed", "commit-lost"])
def test_a_commit_whose_answer_is_lost_is_not_written_twice(
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    landed: bool,
) -> None:
    """The connection breaks after COMMIT was sent: the server may have committed (the answer
    lost on the way back) or not. The recorder asks the server which (txid_status) rather
    than writing the batch again: child rows have no natural key, so a second write would
    count tokens twice."""
    broken = threading.Event()
    real_commit = postgres.PostgresStore._commit

    def commit_then_break(self: postgres.PostgresStore, conn: Any) -> None:
        if broken.is_set():
            return real_commit(self, conn)
        broken.set()
        if landed:
            real_commit(self, conn)
        # The socket shut under the driver, as a lost network would.
        socket.socket(fileno=os.dup(conn.pgconn.socket)).shutdown(socket.SHUT_RDWR)
        conn.execute("select 1")  # raises: the connection is gone

    rec = Recorder(postgres_url, linger=0)
    rec.start()
    exchange(rec, 1)
    assert rec.flush(WAIT)
    monkeypatch.setattr(postgres.PostgresStore, "_commit", commit_then_break)
    with caplog.at_level(logging.WARNING):
        for n in range(2, 7):
            exchange(rec, n)
        assert rec.flush(WAIT)
    rec.close()
    assert broken.is_set()
    assert ("not written again" in caplog.text) is landed
    for table in ("interceptions", "token_usages", "user_prompts", "tool_usages"):
        ids = [
            r["interception_id" if table != "interceptions" else "id"]
            for r in pg_rows(postgres_url, f"select * from {table}")
        ]
        assert sorted(ids) == sorted(f"i{n}" for n in range(1, 7)), table
    assert rec.stats["written"] == 30
    assert losses(postgres_url) == {}
