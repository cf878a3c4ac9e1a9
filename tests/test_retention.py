"""Retention (aibridge.retention): old exchanges go whole, old content goes first, nothing of it
stays readable in the file, and it runs beside the live writer."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aibridge import retention
from aibridge.config import ConfigError, Retention, load_config
from aibridge.record import address as addresses
from aibridge.record import postgres
from aibridge.record.recorder import Recorder
from aibridge.retention import PruneReport, RetentionError, prune
from devtools.mitmdump_process import REPO
from tests.harness import wait_for
from tests.log_engines import engine, pg_rows, read, with_password
from tests.postgres_server import PostgresServer, free_port

__all__ = ["engine"]  # a fixture, imported for this module's tests

NOW = datetime(2025, 6, 30, 12, 0, tzinfo=UTC)
CHILDREN = ("token_usages", "user_prompts", "tool_usages", "model_thoughts")


def at(days_ago: float) -> str:
    return (NOW - timedelta(days=days_ago)).isoformat(timespec="microseconds")


def secret(days_ago: int) -> str:
    """A word found nowhere else, to look for in the raw file."""
    return f"zebracorn{days_ago}x"


def write_exchange(recorder: Recorder, iid: str, days_ago: int) -> None:
    """One exchange as the bridge writes it: the interception, then prompt, usage, tool, thought."""
    when = at(days_ago)
    recorder.upsert(
        "interceptions",
        {
            "id": iid,
            "started_at": when,
            "ended_at": when,
            "initiator_id": "alice",
            "status": "completed",
        },
    )
    recorder.insert(
        "user_prompts",
        {"interception_id": iid, "prompt": f"prompt {secret(days_ago)}", "created_at": when},
    )
    recorder.insert(
        "token_usages",
        {"interception_id": iid, "input_tokens": 10, "output_tokens": 5, "created_at": when},
    )
    recorder.insert(
        "tool_usages",
        {
            "interception_id": iid,
            "tool": "shell",
            "args": {"cmd": secret(days_ago)},
            "created_at": when,
        },
    )
    recorder.insert(
        "model_thoughts",
        {
            "interception_id": iid,
            "source": "reasoning_summary",
            "content": f"think {secret(days_ago)}",
            "created_at": when,
        },
    )


AGES = {"d400": 400, "d100": 100, "d40": 40, "d10": 10, "d1": 1}


def fill(address: str | Path) -> None:
    """The exchanges of AGES and two recorder losses (400 days and 1 day old)."""
    recorder = Recorder(address)
    recorder.start()
    for iid, days_ago in AGES.items():
        write_exchange(recorder, iid, days_ago)
    recorder.insert(
        "recorder_losses",
        {"happened_at": at(400), "table_name": "user_prompts", "rows": 1, "reason": "old"},
    )
    recorder.insert(
        "recorder_losses",
        {"happened_at": at(1), "table_name": "user_prompts", "rows": 1, "reason": "new"},
    )
    recorder.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "aibridge.db"
    fill(path)
    return path


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def interception_ids(path: Path) -> list[str]:
    return [r[0] for r in rows(path, "select id from interceptions order by started_at")]


def content(path: Path) -> dict[str, dict[str, Any]]:
    """Per interception: its prompt, thought and tool args (None once cleared)."""
    out: dict[str, dict[str, Any]] = {}
    for table, column in (
        ("user_prompts", "prompt"),
        ("model_thoughts", "content"),
        ("tool_usages", "args"),
    ):
        for iid, value in rows(path, f"select interception_id, {column} from {table}"):
            out.setdefault(iid, {})[table] = value
    return out


def raw_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def test_days_deletes_whole_exchanges(db_path: Path) -> None:
    report = prune(db_path, days=90, now=NOW, batch_size=2)
    assert interception_ids(db_path) == ["d40", "d10", "d1"]
    for table in CHILDREN:
        assert {r[0] for r in rows(db_path, f"select interception_id from {table}")} == {
            "d40",
            "d10",
            "d1",
        }
    assert rows(db_path, "select reason from recorder_losses") == [("new",)]
    assert report.deleted == {
        "interceptions": 2,
        "token_usages": 2,
        "user_prompts": 2,
        "tool_usages": 2,
        "model_thoughts": 2,
        "recorder_losses": 1,
    }
    assert report.cutoff == "2025-04-01T12:00:00"
    assert "deleted records started before 2025-04-01T12:00:00: interceptions 2" in (
        report.summary()
    )
    # Idempotent: a second run finds nothing more.
    again = prune(db_path, days=90, now=NOW)
    assert not any(again.deleted.values())


def test_content_days_clear_content_and_keep_usage(db_path: Path) -> None:
    report = prune(db_path, days=365, content_days=30, now=NOW)
    assert interception_ids(db_path) == ["d100", "d40", "d10", "d1"]
    kept = content(db_path)
    for iid in ("d100", "d40"):
        assert kept[iid] == {"user_prompts": None, "model_thoughts": None, "tool_usages": None}
    assert kept["d10"]["user_prompts"] == f"prompt {secret(10)}"
    assert kept["d1"]["tool_usages"] == f'{{"cmd":"{secret(1)}"}}'
    # Usage rows and the fact that a tool was called survive the content.
    assert rows(db_path, "select count(*), sum(input_tokens) from token_usages") == [(4, 40)]
    assert rows(db_path, "select count(*) from tool_usages where tool = 'shell'") == [(4,)]
    assert report.cleared == {
        "user_prompts.prompt": 2,
        "model_thoughts.content": 2,
        "tool_usages.args": 2,
    }
    # Full-text search no longer finds what was erased, and still finds what was kept.
    fts = "select rowid from user_prompts_fts where user_prompts_fts match ?"
    assert rows(db_path, fts, (secret(40),)) == []
    assert len(rows(db_path, fts, (secret(10),))) == 1


def test_erased_text_is_gone_from_the_file(db_path: Path) -> None:
    before = raw_bytes(db_path)
    for days_ago in (400, 100, 40):
        assert secret(days_ago).encode() in before
    prune(db_path, days=90, content_days=30, now=NOW)
    after = raw_bytes(db_path)
    for days_ago in (400, 100, 40):
        # Not in free pages, not in the full-text index, not in the WAL.
        assert secret(days_ago).encode() not in after, days_ago
    assert secret(10).encode() in after


def test_dry_run_counts_and_changes_nothing(db_path: Path) -> None:
    before = raw_bytes(db_path)
    report = prune(db_path, days=90, content_days=30, now=NOW, dry_run=True)
    assert report.deleted["interceptions"] == 2 and report.deleted["recorder_losses"] == 1
    assert report.cleared["user_prompts.prompt"] == 3  # d400 counts too: nothing was deleted
    assert report.summary().startswith("would delete")
    assert raw_bytes(db_path) == before


def test_prunes_while_the_recorder_writes(db_path: Path) -> None:
    recorder = Recorder(db_path)
    recorder.start()
    try:
        write_exchange(recorder, "live-1", 0)
        assert recorder.flush(10)
        prune(db_path, days=30, now=NOW)
        write_exchange(recorder, "live-2", 0)
        assert recorder.flush(10)
        assert recorder.stats["dropped"] == 0
    finally:
        recorder.close()
    assert interception_ids(db_path) == ["d10", "d1", "live-1", "live-2"]


@pytest.mark.parametrize(
    ("days", "content_days", "problem"),
    [
        (None, None, "give days, content_days or both"),
        (0, None, "days must be a whole number of days >= 1"),
        (30, 60, "content_days (60) must not exceed days (30)"),
        (True, None, "days must be"),
    ],
)
def test_bad_horizons(db_path: Path, days: Any, content_days: Any, problem: str) -> None:
    with pytest.raises(RetentionError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        prune(db_path, days=days, content_days=content_days)


def test_not_an_audit_log(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("create table t (x)").connection.close()
    with pytest.raises(RetentionError, match="not an aibridge audit log"):
        prune(other, days=1)
    with pytest.raises(RetentionError, match="no such database"):
        prune(tmp_path / "missing.db", days=1)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aibridge.retention", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )


def test_command_line(db_path: Path, tmp_path: Path) -> None:
    # The command counts from the real now: the fixture's 400-day-old exchange is older still.
    done = run("--days", "3000", "--content-days", "2000", "--db", str(db_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "deleted records started before" in done.stdout and "cleared content" in done.stdout

    config = tmp_path / "config.yaml"
    config.write_text(
        "database: aibridge.db\n"
        "providers: [{name: openai, base_url: 'https://api.openai.com/v1', api_key: k}]\n"
        "retention: {days: 3000, content_days: 1}\n"
    )
    done = run("--config", str(config), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "would clear content" in done.stdout and "user_prompts.prompt 5" in done.stdout
    # The command line wins over the config, horizon by horizon.
    done = run("--config", str(config), "--content-days", "5000", cwd=tmp_path)
    assert done.returncode == 2
    assert "content_days (5000) must not exceed days (3000)" in done.stderr

    bad = run("--db", str(db_path), cwd=tmp_path)
    assert bad.returncode == 2 and "give days, content_days or both" in bad.stderr
    missing = run("--config", str(tmp_path / "nope.yaml"), "--days", "1", cwd=tmp_path)
    assert missing.returncode == 2 and "file not found" in missing.stderr


def test_retention_config(tmp_path: Path) -> None:
    base = "providers: [{name: openai, base_url: 'https://api.openai.com/v1', api_key: k}]\n"
    path = tmp_path / "config.yaml"

    def load(text: str, env: dict[str, str] | None = None) -> Retention:
        path.write_text(base + text)
        return load_config(path, env or {}).retention

    assert load("") == Retention()
    assert load("retention: {days: 365, content_days: 30}") == Retention(365, 30)
    assert load("retention: {content_days: '${KEEP}'}", {"KEEP": "7"}) == Retention(None, 7)
    for text, key, problem in (
        ("retention: {days: 0}", "retention.days", "whole number of days >= 1"),
        ("retention: {days: 1.5}", "retention.days", "whole number of days >= 1"),
        ("retention: {days: 10, content_days: 20}", "retention.content_days", "must not exceed"),
        ("retention: {keep: 1}", "retention.keep", "unknown key"),
        ("retention: 30", "retention", "must be a mapping"),
    ):
        with pytest.raises(ConfigError) as err:
            load(text)
        assert (err.value.key, err.value.file) == (key, str(path))
        assert problem in err.value.problem


def test_report_summary_reads_well() -> None:
    report = PruneReport(cutoff="2025-01-01T00:00:00", content_cutoff=None)
    assert report.summary() == "deleted records started before 2025-01-01T00:00:00: none"


# ---------------------------------------------------------------------------- both engines

WAIT = 30.0  # generous upper bound for waits; never asserted as a duration
TABLES = ("interceptions", *CHILDREN, "recorder_losses")
DELETED_AT_90_DAYS = {
    "interceptions": 2,
    "token_usages": 2,
    "user_prompts": 2,
    "tool_usages": 2,
    "model_thoughts": 2,
    "recorder_losses": 1,
}
CLEARED_AT_30_DAYS = {"user_prompts.prompt": 2, "model_thoughts.content": 2, "tool_usages.args": 2}


@pytest.fixture
def log(engine: str) -> str:
    """The exchanges of AGES in an audit log on each engine in turn."""
    fill(engine)
    return engine


def ids_in(address: str) -> list[str]:
    return [r["id"] for r in read(address, "select id from interceptions order by started_at, id")]


def search(address: str, word: str) -> list[str]:
    """The interceptions whose prompt the engine's prompt search finds `word` in."""
    if addresses.is_postgres(address):
        sql = (
            "select interception_id from user_prompts "
            f"where prompt_search @@ to_tsquery('simple', '{word}')"
        )
    else:
        sql = (
            "select p.interception_id from user_prompts_fts f join user_prompts p "
            f"on p.id = f.rowid where user_prompts_fts match '{word}'"
        )
    return [r["interception_id"] for r in read(address, sql)]


def every_row(address: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of the pruned tables; in PostgreSQL with the row version (ctid, xmin), which
    any update or delete changes, even one that writes the same values."""
    version = (
        "ctid::text as ctid, xmin::text as xmin" if addresses.is_postgres(address) else "rowid"
    )
    return {t: read(address, f"select {version}, * from {t} order by id") for t in TABLES}


def last_vacuums(url: str) -> dict[str, Any]:
    rows = pg_rows(url, "select relname, last_vacuum from pg_stat_user_tables")
    return {r["relname"]: r["last_vacuum"] for r in rows}


def test_both_engines_delete_whole_exchanges(log: str) -> None:
    report = prune(log, days=90, now=NOW, batch_size=2)
    assert ids_in(log) == ["d40", "d10", "d1"]
    for table in CHILDREN:
        found = {r["interception_id"] for r in read(log, f"select interception_id from {table}")}
        assert found == {"d40", "d10", "d1"}, table
    assert read(log, "select reason from recorder_losses") == [{"reason": "new"}]
    assert report.deleted == DELETED_AT_90_DAYS
    assert not prune(log, days=90, now=NOW).deleted.total()


def test_both_engines_clear_content_and_keep_usage(log: str) -> None:
    report = prune(log, days=365, content_days=30, now=NOW, batch_size=1)
    assert ids_in(log) == ["d100", "d40", "d10", "d1"]
    kept = {
        r["interception_id"]: r
        for r in read(
            log,
            "select p.interception_id, p.prompt, m.content, t.args from user_prompts p "
            "join model_thoughts m using (interception_id) "
            "join tool_usages t using (interception_id)",
        )
    }
    for iid in ("d100", "d40"):
        assert (kept[iid]["prompt"], kept[iid]["content"], kept[iid]["args"]) == (None,) * 3
    assert kept["d10"]["prompt"] == f"prompt {secret(10)}"
    assert kept["d1"]["args"] == {"cmd": secret(1)}
    usage = read(log, "select count(*) as n, sum(input_tokens) as tokens from token_usages")
    assert usage == [{"n": 4, "tokens": 40}]
    assert report.cleared == CLEARED_AT_30_DAYS
    # Prompt search (SQLite's FTS table, PostgreSQL's generated tsvector) forgets what went.
    assert search(log, secret(40)) == []
    assert search(log, secret(10)) == ["d10"]
    assert not prune(log, days=365, content_days=30, now=NOW).cleared.total()


def test_both_engines_dry_run_counts_and_changes_nothing(log: str) -> None:
    before = every_row(log)
    report = prune(log, days=90, content_days=30, now=NOW, dry_run=True)
    assert report.deleted == DELETED_AT_90_DAYS
    # d400 counts too: nothing was deleted before the content was counted.
    assert report.cleared == {k: 3 for k in CLEARED_AT_30_DAYS}
    assert report.summary().startswith("would delete")
    assert every_row(log) == before
    if addresses.is_postgres(log):
        assert not any(last_vacuums(log).values())  # no maintenance either


def test_both_engines_prune_while_the_recorder_writes(log: str) -> None:
    recorder = Recorder(log)
    recorder.start()
    try:
        write_exchange(recorder, "live-1", 0)
        assert recorder.flush(WAIT)
        prune(log, days=30, now=NOW)
        write_exchange(recorder, "live-2", 0)
        assert recorder.flush(WAIT)
        assert recorder.stats["dropped"] == 0
    finally:
        recorder.close()
    assert ids_in(log) == ["d10", "d1", "live-1", "live-2"]


def make_tables(address: str, statements: tuple[str, ...]) -> list[str]:
    """Run `statements` in the (new) database at `address`; its table names after."""
    if addresses.is_postgres(address):
        with psycopg.connect(address, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)
        sql = "select tablename as name from pg_tables where schemaname = 'public'"
        return sorted(r["name"] for r in pg_rows(address, sql))
    conn = sqlite3.connect(address)  # an empty file even without statements
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
        sql = "select name from sqlite_master where type = 'table'"
        return sorted(r[0] for r in conn.execute(sql))
    finally:
        conn.close()


@pytest.mark.parametrize(
    "statements",
    [
        (),
        ("create table t (x integer)",),
        # Children without their parent are not an audit log either.
        ("create table user_prompts (id integer primary key, prompt text)",),
        ("create table interception (id text)", "create table recorder_losses (id integer)"),
    ],
    ids=["empty", "other", "children-only", "near-names"],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_both_engines_refuse_a_database_that_is_not_an_audit_log(
    engine: str, statements: tuple[str, ...], dry_run: bool
) -> None:
    tables = make_tables(engine, statements)
    with pytest.raises(RetentionError) as err:
        prune(engine, days=1, content_days=1, dry_run=dry_run)
    assert str(err.value) == (
        f"{addresses.display(engine)}: not an aibridge audit log: it has no interceptions table"
    )
    assert make_tables(engine, ()) == tables  # nothing made, nothing migrated


# ------------------------------------------------------------------------ PostgreSQL only


def test_postgres_vacuums_what_it_changed(postgres_url: str) -> None:
    fill(postgres_url)
    recorder = Recorder(postgres_url)
    recorder.start()
    # A prompt long enough to live in the TOAST table, of an exchange whose content goes.
    long_prompt = " ".join(f"{secret(40)}-{n:05d}" for n in range(2000))
    recorder.insert("user_prompts", {"interception_id": "d40", "prompt": long_prompt})
    recorder.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("create extension pgstattuple")
        # Column statistics sample values, as autovacuum's ANALYZE would have by now.
        conn.execute("analyze")
        stats = "select string_agg(s::text, ' ') from pg_stats s where schemaname = 'public'"
        assert secret(40) in conn.execute(stats).fetchone()[0]

        prune(postgres_url, days=90, content_days=30, now=NOW)

        vacuumed = {t for t, when in last_vacuums(postgres_url).items() if when is not None}
        assert vacuumed == set(TABLES)  # what it changed, nothing else (budgets, _migrations)
        toast = "select reltoastrelid::regclass::text from pg_class where relname = %s"
        ((user_prompts_toast,),) = conn.execute(toast, ("user_prompts",)).fetchall()
        for relation in (*TABLES, user_prompts_toast):
            dead = conn.execute("select dead_tuple_count from pgstattuple(%s)", (relation,))
            assert dead.fetchone()[0] == 0, relation
        text = conn.execute(stats).fetchone()[0]
        for days_ago in (400, 100, 40):
            assert secret(days_ago) not in text, days_ago
    # Nothing changed on a second run: no maintenance either.
    before = last_vacuums(postgres_url)
    assert not prune(postgres_url, days=90, content_days=30, now=NOW).deleted.total()
    assert last_vacuums(postgres_url) == before


def test_postgres_prompt_search_keeps_no_word_of_erased_prompts(postgres_url: str) -> None:
    fill(postgres_url)

    def index_bytes() -> bytes:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("checkpoint")  # the index's pages, written to its file
            path = "select pg_relation_filepath('idx_user_prompts_prompt_search')"
            ((data,),) = conn.execute(f"select pg_read_binary_file(({path}))").fetchall()
        return bytes(data)

    for days_ago in AGES.values():
        assert secret(days_ago).encode() in index_bytes()
    prune(postgres_url, days=90, content_days=30, now=NOW)
    after = index_bytes()
    # Deleted (400, 100 days) and cleared (40 days): GIN would keep their words as keys.
    for days_ago in (400, 100, 40):
        assert secret(days_ago).encode() not in after, days_ago
    assert secret(10).encode() in after and search(postgres_url, secret(10)) == ["d10"]
    assert pg_rows(
        postgres_url,
        "select count(*) as n from pg_index where indrelid = 'user_prompts'::regclass "
        "and not indisvalid",
    ) == [{"n": 0}]


def test_postgres_waits_its_turn_for_the_recorders_lock(postgres_url: str) -> None:
    fill(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as holder:
        holder.execute("begin")
        holder.execute("select pg_advisory_xact_lock(%s)", (postgres.WRITE_LOCK,))
        # Held longer than it will wait: it gives up with a clear error, having done nothing.
        with pytest.raises(RetentionError, match="lock timeout"):
            prune(postgres_url, days=90, now=NOW, busy_timeout_ms=50)
        results: list[PruneReport | BaseException] = []

        def run_prune() -> None:
            try:
                results.append(prune(postgres_url, days=90, now=NOW))
            except BaseException as exc:
                results.append(exc)

        thread = threading.Thread(target=run_prune)
        thread.start()
        waiting = (
            "select count(*) as n from pg_locks where locktype = 'advisory' and not granted "
            "and database = (select oid from pg_database where datname = current_database())"
        )
        assert wait_for(lambda: pg_rows(postgres_url, waiting)[0]["n"], WAIT)
        assert ids_in(postgres_url) == list(AGES)  # nothing deleted while it waits
        holder.execute("commit")
        thread.join(WAIT)
    assert not thread.is_alive()
    (report,) = results
    assert isinstance(report, PruneReport), report
    assert report.deleted == DELETED_AT_90_DAYS


WRONG = "Wr@ng-secret/9"  # quoted in the URL as Wr%40ng-secret%2F9: neither form may show


def bad_url(kind: str, server: PostgresServer) -> str:
    base = f"postgresql://aibridge:{urllib.parse.quote(WRONG, safe='')}@127.0.0.1"
    return {
        "refused": f"{base}:{free_port()}/aibridge",
        "wrong password": f"{base}:{server.port}/postgres",
        "no such database": with_password(server.url("no_such_db"), server.password),
        "not a port": f"{base}:notaport/aibridge",
        "bad option": f"{base}:{server.port}/postgres?sslmode=sometimes",
    }[kind]


BAD_KINDS = ["refused", "wrong password", "no such database", "not a port", "bad option"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_postgres_unreachable_is_one_line_with_the_password_masked(
    postgres_server: PostgresServer, kind: str
) -> None:
    url = bad_url(kind, postgres_server)
    with pytest.raises(RetentionError) as err:
        prune(url, days=1)
    message = str(err.value)
    assert message.startswith(f"{addresses.display(url)}: "), message
    assert "\n" not in message
    for secret_text in (WRONG, urllib.parse.quote(WRONG, safe=""), postgres_server.password):
        assert secret_text not in message


def test_command_line_with_a_url(
    postgres_url: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fill(postgres_url)
    # The password in the URL, not in the environment; never in what is printed.
    monkeypatch.delenv("PGPASSWORD")
    url = with_password(postgres_url, postgres_server.password)
    shown = addresses.display(url)
    assert postgres_server.password not in shown
    # Horizons counted from the real now that keep what the fixture keeps at NOW.
    late = (datetime.now(UTC) - NOW).days
    argv = ["--days", str(late + 90), "--content-days", str(late + 30), "--db", url]
    assert retention.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{shown}: would delete records started before ")
    assert "interceptions 2" in out and "user_prompts.prompt 3" in out
    assert retention.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{shown}: deleted records") and "user_prompts.prompt 1" in out
    assert postgres_server.password not in out
    assert ids_in(url) == ["d40", "d10", "d1"]

    # From a config: the URL's password from the environment, masked when printed.
    monkeypatch.setenv("AUDIT_DB_PASSWORD", postgres_server.password)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"database: {postgres_url.replace('aibridge@', 'aibridge:${AUDIT_DB_PASSWORD}@')}\n"
        "providers: [{name: openai, base_url: 'https://api.openai.com/v1', api_key: k}]\n"
        f"retention: {{days: {late + 30}}}\n"
    )
    assert retention.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{shown}: deleted records started before ")
    assert out.endswith(
        ": interceptions 1, model_thoughts 1, token_usages 1, tool_usages 1, user_prompts 1\n"
    )
    assert ids_in(url) == ["d10", "d1"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_command_line_with_an_unreachable_url(
    postgres_server: PostgresServer, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = bad_url(kind, postgres_server)
    assert retention.main(["--days", "1", "--db", url]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {addresses.display(url)}: "), lines
    assert WRONG not in captured.err and urllib.parse.quote(WRONG, safe="") not in captured.err
