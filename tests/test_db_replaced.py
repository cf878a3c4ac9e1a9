"""The database file is deleted, moved away or replaced while the bridge writes to it.

The recorder must notice that its path names another file (or none), reopen it, and put
every later row there: in process against the Recorder itself, with each way an operator
or a script takes the file away, and once through a real mitmdump.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import orjson
import pytest
import sqlite_utils

from aibridge.record import schema
from aibridge.record import sqlite as sqlite_store_module
from aibridge.record.recorder import Recorder
from devtools.fake_upstream import FakeUpstream
from tests.harness import TOKENS, Mitmdump, bridge_config, query, wait_for

WAIT = 30.0  # upper bound for waits; never asserted as a duration
DELETED = "was deleted while open"
REPLACED = "was replaced by another file"


# ---- helpers ---------------------------------------------------------------------------


def write(rec: Recorder, tag: str, n: int = 5) -> set[str]:
    """Queue n exchanges' rows (interception, usage, prompt), wait until committed."""
    ids = set()
    for i in range(n):
        iid = f"{tag}-{i}"
        ids.add(iid)
        rec.upsert(schema.INTERCEPTIONS, {"id": iid, "initiator_id": "alice", "status": "done"})
        rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, "input_tokens": i})
        rec.insert(schema.USER_PROMPTS, {"interception_id": iid, "prompt": f"{tag} asks {i}"})
    assert rec.flush(WAIT)
    return ids


def read(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows from `path`, through a connection closed at once (it must not pin the file)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def interceptions(path: Path) -> set[str]:
    return {r[0] for r in read(path, "select id from interceptions")}


def assert_rows_of(path: Path, tag: str, ids: set[str]) -> None:
    """Every row `write` made for `ids` is in the file, the prompts searchable too."""
    like = (f"{tag}-%",)
    assert {r[0] for r in read(path, "select id from interceptions where id like ?", like)} == ids
    usages = read(
        path, "select interception_id from token_usages where interception_id like ?", like
    )
    assert sorted(r[0] for r in usages) == sorted(ids)
    hits = read(path, "select rowid from user_prompts_fts where user_prompts_fts match ?", (tag,))
    assert len(hits) == len(ids)


def assert_full_schema(path: Path) -> None:
    names = {r[0] for r in read(path, "select name from sqlite_master where type = 'table'")}
    assert {*schema.WRITABLE_TABLES, schema.MIGRATIONS_TABLE, "user_prompts_fts"} <= names
    applied = read(path, f"select name from {schema.MIGRATIONS_TABLE} order by rowid")
    assert [r[0] for r in applied] == [m.__name__ for m in schema.MIGRATIONS]
    assert read(path, "pragma user_version") == [(schema.SCHEMA_VERSION,)]
    assert "service_tier" in {r[1] for r in read(path, "pragma table_info(token_usages)")}
    assert read(path, "pragma integrity_check") == [("ok",)]


def notices(caplog: pytest.LogCaptureFixture, path: Path, what: str) -> int:
    return sum(
        1
        for r in caplog.records
        if r.name == "aibridge.record.sqlite"
        and r.levelno == logging.WARNING
        and what in r.getMessage()
        and str(path) in r.getMessage()
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path / "data" / "aibridge.db"


@pytest.fixture
def rec(db: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Recorder]:
    caplog.set_level(logging.WARNING, logger="aibridge.record.recorder")
    recorder = Recorder(db)
    recorder.start()
    yield recorder
    recorder.close(timeout=WAIT)


def side_files(path: Path) -> list[Path]:
    return [path.with_name(path.name + s) for s in ("-wal", "-shm")]


# ---- deleted ---------------------------------------------------------------------------


def unlink_only_the_file(path: Path) -> Path | None:
    path.unlink()
    return None


def unlink_with_side_files(path: Path) -> Path | None:  # rm aibridge.db*
    for p in [path, *side_files(path)]:
        p.unlink(missing_ok=True)
    return None


def move_away(path: Path) -> Path | None:  # mv aibridge.db archive.db
    archive = path.with_name("archive.db")
    os.rename(path, archive)
    return archive


def move_the_directory_away(path: Path) -> Path | None:  # mv data data.old; mkdir data
    old = path.parent.with_name("data.old")
    os.rename(path.parent, old)
    path.parent.mkdir()
    return old / path.name


@pytest.mark.parametrize(
    "take_away", [unlink_only_the_file, unlink_with_side_files, move_away, move_the_directory_away]
)
def test_a_deleted_file_is_recreated_with_the_schema_and_takes_later_rows(
    rec: Recorder,
    db: Path,
    caplog: pytest.LogCaptureFixture,
    take_away: Callable[[Path], Path | None],
) -> None:
    before = write(rec, "before")
    moved_to = take_away(db)
    after = write(rec, "after")

    assert_full_schema(db)
    assert_rows_of(db, "after", after)
    assert interceptions(db) == after
    assert notices(caplog, db, DELETED) == 1 and notices(caplog, db, REPLACED) == 0
    assert rec.stats["dropped"] == 0
    if moved_to is not None:
        # The file moved away keeps what was written before: the old connection's
        # checkpoint put it there, and none of the later rows went there.
        assert interceptions(moved_to) == before
        assert read(moved_to, "pragma integrity_check") == [("ok",)]


def test_deleted_again_and_again_each_time_noticed_once(
    rec: Recorder, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(rec, "first")
    for round_ in range(3):
        unlink_only_the_file(db) if round_ % 2 else unlink_with_side_files(db)
        ids = write(rec, f"round{round_}")
        # Several batches into the same new file: noticed once, not per batch.
        ids |= write(rec, f"more{round_}")
        assert interceptions(db) == ids
        assert_full_schema(db)
        assert notices(caplog, db, DELETED) == round_ + 1
    assert notices(caplog, db, REPLACED) == 0


# ---- replaced --------------------------------------------------------------------------


def another_apps_database(path: Path, tmp: Path) -> None:
    """A different SQLite file with nothing of ours in it (its own table, one row)."""
    conn = sqlite3.connect(tmp)
    conn.execute("create table notes (text)")
    conn.execute("insert into notes values ('keep me')")
    conn.commit()
    conn.close()


def an_empty_file(path: Path, tmp: Path) -> None:  # touch; SQLite takes it as empty
    tmp.write_bytes(b"")


def an_older_aibridge_log(path: Path, tmp: Path) -> None:
    """A log with only the first migration applied, holding one exchange."""
    old = sqlite_utils.Database(sqlite3.connect(tmp))
    with pytest.MonkeyPatch.context() as patch:  # what an older aibridge made
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        patch.setattr(schema, "SCHEMA_VERSION", 1)
        schema.migrate(old)
    old.execute("insert into interceptions (id) values ('old-0')")
    old.conn.commit()
    old.conn.close()


@pytest.mark.parametrize("make", [another_apps_database, an_empty_file, an_older_aibridge_log])
def test_a_replaced_file_is_migrated_and_takes_later_rows(
    rec: Recorder,
    db: Path,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[Path, Path], None],
) -> None:
    write(rec, "before")
    new = db.with_name("incoming.db")
    make(db, new)
    before_replacing = read(new, "select name from sqlite_master where type = 'table'")
    os.replace(new, db)  # mv incoming.db aibridge.db
    after = write(rec, "after")

    assert_full_schema(db)
    assert_rows_of(db, "after", after)
    assert interceptions(db) - {"old-0"} == after
    # What the new file held is still there: the old file's WAL was not replayed into it.
    tables = {r[0] for r in read(db, "select name from sqlite_master where type = 'table'")}
    assert {r[0] for r in before_replacing} <= tables
    if make is another_apps_database:
        assert read(db, "select text from notes") == [("keep me",)]
    if make is an_older_aibridge_log:
        assert "old-0" in interceptions(db)
    assert notices(caplog, db, REPLACED) == 1 and notices(caplog, db, DELETED) == 0


def copy_after_checkpoint(src: Path, dst: Path) -> None:  # checkpoint, then cp
    read(src, "pragma wal_checkpoint(truncate)")
    shutil.copyfile(src, dst)


def copy_with_backup_api(src: Path, dst: Path) -> None:  # sqlite3 aibridge.db .backup
    source, target = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def copy_with_vacuum_into(src: Path, dst: Path) -> None:
    read(src, "vacuum into ?", (str(dst),))


@pytest.mark.parametrize(
    "copy", [copy_after_checkpoint, copy_with_backup_api, copy_with_vacuum_into]
)
def test_replaced_by_a_copy_keeps_the_copys_rows_and_appends(
    rec: Recorder,
    db: Path,
    caplog: pytest.LogCaptureFixture,
    copy: Callable[[Path, Path], None],
) -> None:
    before = write(rec, "before")
    new = db.with_name("copy.db")
    copy(db, new)
    os.replace(new, db)
    after = write(rec, "after")

    assert_rows_of(db, "before", before)
    assert_rows_of(db, "after", after)
    assert interceptions(db) == before | after
    assert read(db, "select count(*) from token_usages") == [(len(before) + len(after),)]
    assert_full_schema(db)
    assert notices(caplog, db, REPLACED) == 1


# ---- races and in-flight batches --------------------------------------------------------


class _StatFails(ModuleType):
    """The recorder's `os`, whose stat of one path fails once as if caught mid-rename."""

    def __init__(self, path: Path) -> None:
        super().__init__("os")
        self.path = str(path)
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def stat(self, path: Any, *args: Any, **kw: Any) -> os.stat_result:
        if self.armed and os.fspath(path) == self.path:
            self.armed = False
            raise FileNotFoundError(2, "No such file or directory", self.path)
        return os.stat(path, *args, **kw)


def test_a_stat_that_catches_a_rename_midway_counts_as_deleted(
    rec: Recorder, db: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(rec, "before")
    new = db.with_name("incoming.db")
    another_apps_database(db, new)
    os.replace(new, db)
    fake_os = _StatFails(db)
    monkeypatch.setattr(sqlite_store_module, "os", fake_os)
    fake_os.armed = True
    after = write(rec, "after")
    assert not fake_os.armed
    # Reopening the path found the file the rename put there, and left it whole.
    assert interceptions(db) == after
    assert read(db, "select text from notes") == [("keep me",)]
    assert notices(caplog, db, DELETED) == 1


def test_a_two_step_swap_is_followed_to_the_final_file(
    rec: Recorder, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mv aibridge.db old.db, then mv new.db aibridge.db, with a batch in between."""
    write(rec, "before")
    new = db.with_name("new.db")
    another_apps_database(db, new)
    os.rename(db, db.with_name("old.db"))
    write(rec, "between")  # goes to a recreated file, which the second mv replaces
    os.replace(new, db)
    after = write(rec, "after")
    assert interceptions(db) == after
    assert read(db, "select text from notes") == [("keep me",)]
    assert notices(caplog, db, DELETED) == 1 and notices(caplog, db, REPLACED) == 1


def test_a_batch_already_taken_when_the_file_goes_lands_in_the_new_file(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer holds a batch it cannot write (the file is locked); the file is deleted
    meanwhile; the retry writes the batch to the recreated file, not the old one."""
    caplog.set_level(logging.WARNING, logger="aibridge.record.recorder")
    rec = Recorder(db, busy_timeout_ms=20, linger=0)
    rec.start()
    try:
        write(rec, "before")
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            retries = rec.stats["retries"]
            done: list[set[str]] = []
            writer = threading.Thread(target=lambda: done.append(write(rec, "taken")))
            writer.start()
            assert wait_for(lambda: rec.stats["retries"] > retries, WAIT)
            db.unlink()
            writer.join(WAIT)
            assert done, "the batch was not written after the file was deleted"
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert interceptions(db) == done[0]
        assert_rows_of(db, "taken", done[0])
        assert notices(caplog, db, DELETED) == 1
    finally:
        rec.close(timeout=WAIT)


# ---- what is deliberately not a replacement -------------------------------------------


@pytest.mark.parametrize("suffixes", [("-wal",), ("-shm",), ("-wal", "-shm")])
def test_deleting_only_side_files_keeps_the_connection_and_loses_nothing(
    db: Path, caplog: pytest.LogCaptureFixture, suffixes: tuple[str, ...]
) -> None:
    """The main file is still the database: the open connection keeps its WAL and
    checkpoints it into the main file, so no reopen (which could drop frames not yet
    checkpointed) and no warning. (This passes on the recorder before the change too.)"""
    caplog.set_level(logging.WARNING, logger="aibridge.record.recorder")
    rec = Recorder(db)
    rec.start()
    before = write(rec, "before")
    for suffix in suffixes:
        db.with_name(db.name + suffix).unlink()
    after = write(rec, "after", n=200)
    rec.close(timeout=WAIT)
    assert interceptions(db) == before | after
    assert_rows_of(db, "after", after)
    assert notices(caplog, db, DELETED) + notices(caplog, db, REPLACED) == 0


# ---- through mitmdump ------------------------------------------------------------------


def _send(bridge: Mitmdump, prompt: str) -> None:
    body = {"model": "fake-text", "input": prompt, "stream": True}
    r = httpx.post(
        f"{bridge.url}/openai/v1/responses",
        content=orjson.dumps(body),
        headers={"authorization": f"Bearer {TOKENS['alice']}"},
        timeout=WAIT,
    )
    assert r.status_code == 200, r.text


def _finished(db: Path, prompt: str) -> list[dict[str, Any]]:
    return query(
        db,
        "select i.id, i.status, i.initiator_id, count(t.id) as usages from interceptions i "
        "join user_prompts p on p.interception_id = i.id "
        "left join token_usages t on t.interception_id = i.id "
        "where p.prompt = ? and i.ended_at is not null group by i.id",
        (prompt,),
    )


def test_mitmdump_follows_a_deleted_then_replaced_database(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    with FakeUpstream() as fake, Mitmdump(tmp_path, bridge_config(fake.url)) as bridge:
        db = bridge.db_path
        _send(bridge, f"{tag} one")
        assert wait_for(lambda: _finished(db, f"{tag} one"), WAIT)

        unlink_only_the_file(db)
        _send(bridge, f"{tag} two")
        two = wait_for(lambda: _finished(db, f"{tag} two"), WAIT)
        assert two and two[0]["status"] == "completed" and two[0]["initiator_id"] == "alice"
        assert two[0]["usages"] == 1
        assert _finished(db, f"{tag} one") == []
        assert f"audit database {db} {DELETED}" in bridge.log()
        assert_full_schema(db)

        # A retention or backup script's cp + mv: the copy's rows stay, new ones follow.
        copy = tmp_path / "copy.db"
        copy_with_backup_api(db, copy)
        os.replace(copy, db)
        _send(bridge, f"{tag} three")
        three = wait_for(lambda: _finished(db, f"{tag} three"), WAIT)
        assert three and three[0]["usages"] == 1
        assert _finished(db, f"{tag} two") == two
        assert f"audit database {db} {REPLACED}" in bridge.log()
        assert query(db, "select * from recorder_losses") == []
    log = bridge.log()
    assert log.count(DELETED) == 1 and log.count(REPLACED) == 1
    assert "Traceback" not in log
