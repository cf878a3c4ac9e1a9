"""The throwaway-PostgreSQL harness (tests/postgres_server.py) and its fixtures in conftest.py:
a real Debian PostgreSQL, reached over loopback TCP with a password that only PGPASSWORD (or a
URL asked for with it) carries."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests import postgres_server as server_module
from tests.harness import REPO
from tests.postgres_server import (
    SUPERUSER,
    PostgresError,
    PostgresServer,
    _alive,
    _version_key,
    database_name,
    find_postgres_bin,
    postgres_bin,
)

pytestmark = pytest.mark.timeout(180)

PROGRAMS = ("initdb", "pg_ctl", "postgres")
original_free_port = server_module.free_port
# Names the postgres_url fixture handed out in this module, in order.
SEEN: list[str] = []


def refused(url: str = "", **params: object) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(url, connect_timeout=30, **params).close()
    return caught.value


def database_of(url: str) -> str:
    with psycopg.connect(url, connect_timeout=30) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def databases(server: PostgresServer) -> set[str]:
    with server.connect() as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (a postmaster's backends and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != b"Z":
            found.append(int(entry.name))
    return found


# --- pure functions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "hint",
    [
        "test_x",
        "test_fresh[first]",
        "TEST Ünïcode ☃ name",
        "x" * 300,
        "",
        "[]-__--",
        "1starts_with_a_digit",
        'quote"and;semicolon DROP DATABASE postgres',
    ],
)
def test_database_name_is_a_plain_unique_identifier(hint: str) -> None:
    names = {database_name(hint) for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert name.startswith("t_")
        assert len(name.encode()) <= 63  # PostgreSQL's NAMEDATALEN - 1
        assert all(ch in "abcdefghijklmnopqrstuvwxyz0123456789_" for ch in name), name


@pytest.mark.parametrize(
    ("dirs", "highest"),
    [
        (["lib/postgresql/9.6/bin", "lib/postgresql/15/bin", "lib/postgresql/10/bin"], "15"),
        (["lib/postgresql/15/bin/", "lib/postgresql/16/bin"], "16"),
        (["lib/postgresql/13/bin", "lib/postgresql/13.2/bin"], "13.2"),
    ],
)
def test_highest_version_is_numeric(dirs: list[str], highest: str) -> None:
    assert max(dirs, key=_version_key).rstrip("/").split("/")[-2] == highest


# --- finding the binaries -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bindir() -> str:
    return postgres_bin()


def fake_program(path: Path, script: str = "exit 0") -> None:
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_found_through_a_symlink_on_path(
    bindir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in PROGRAMS:
        (tmp_path / name).symlink_to(Path(bindir, name))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_postgres_bin() == os.path.realpath(bindir)


@pytest.mark.parametrize(
    "on_path",
    [
        ["initdb"],  # no pg_ctl, no postgres
        ["initdb", "pg_ctl"],
        ["initdb", "postgres"],
    ],
)
def test_an_incomplete_directory_on_path_is_passed_over(
    on_path: list[str], bindir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in on_path:
        fake_program(tmp_path / name)
    # pg_config names the real directory: the next place to look.
    fake_program(tmp_path / "pg_config", f"echo '{bindir}'")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_postgres_bin() == bindir


@pytest.mark.parametrize(
    "script",
    [
        "exit 1",
        "echo /nonexistent/postgresql/bin",
        "echo",
        "echo .",  # a directory without the programs
    ],
)
def test_a_useless_pg_config_is_passed_over(
    script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_program(tmp_path / "pg_config", script)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    found = find_postgres_bin()
    # Only Debian's /usr/lib/postgresql/*/bin is left, where this machine may have none.
    assert found is None or (
        "postgresql" in found and all(Path(found, name).is_file() for name in PROGRAMS)
    )


# --- the session server through the fixtures ----------------------------------------------


def test_url_and_pgpassword_connect(postgres_server: PostgresServer, postgres_url: str) -> None:
    assert postgres_server.password not in postgres_url
    assert postgres_url.startswith(f"postgresql://{SUPERUSER}@127.0.0.1:{postgres_server.port}/")
    with psycopg.connect(postgres_url, connect_timeout=30) as conn:
        row = conn.execute(
            "SELECT current_user, host(inet_server_addr()), current_setting('listen_addresses'),"
            " current_database()"
        ).fetchone()
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    assert row is not None
    assert row[:3] == (SUPERUSER, "127.0.0.1", "127.0.0.1")
    assert postgres_url.endswith(f"/{row[3]}")


def test_the_url_alone_is_refused(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("PGPASSFILE", os.devnull)  # no ~/.pgpass of this machine either
    assert "no password supplied" in str(refused(postgres_url))


def test_the_url_with_the_password_needs_no_environment(
    postgres_server: PostgresServer, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    name = postgres_url.rsplit("/", 1)[1]
    with_password = postgres_server.url(name, password=True)
    assert postgres_server.password in with_password
    assert database_of(with_password) == name


@pytest.mark.parametrize(
    "wrong",
    [
        lambda good: "wrong",
        lambda good: good[:-1],
        lambda good: good + "x",
        lambda good: " " + good,
        lambda good: good.swapcase(),
        lambda good: good[::-1],
        lambda good: "x" * 1000,
    ],
    ids=["other", "truncated", "longer", "leading-space", "swapped-case", "reversed", "long"],
)
def test_a_wrong_password_is_refused(
    wrong: object,
    postgres_server: PostgresServer,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert callable(wrong)
    bad = wrong(postgres_server.password)
    assert bad != postgres_server.password
    monkeypatch.setenv("PGPASSWORD", bad)
    message = str(refused(postgres_url))
    assert f'password authentication failed for user "{SUPERUSER}"' in message
    # In the connection string too, where it takes precedence over a right PGPASSWORD.
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    assert "password authentication failed" in str(refused(postgres_url, password=bad))


@pytest.mark.parametrize("user", ["postgres", "root", "nobody", SUPERUSER.upper(), ""])
def test_other_users_are_refused_even_with_the_password(
    user: str, postgres_server: PostgresServer, postgres_url: str
) -> None:
    # An empty user is libpq's default: the OS user running the tests.
    message = str(refused(postgres_url, user=user))
    assert "password authentication failed" in message


def test_the_password_is_nowhere_on_disk_or_in_the_log(postgres_server: PostgresServer) -> None:
    assert postgres_server.dir is not None
    secret = postgres_server.password.encode()
    files = [path for path in postgres_server.dir.rglob("*") if path.is_file()]
    assert any(path.name == "PG_VERSION" for path in files)  # the data directory is read
    leaking = [str(path) for path in files if secret in path.read_bytes()]
    assert leaking == []
    assert postgres_server.password not in postgres_server.log_text()


def test_the_unix_socket_trusts_local_tools(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    with psycopg.connect(
        host=str(postgres_server.dir), port=postgres_server.port, user=SUPERUSER, dbname="postgres"
    ) as conn:
        row = conn.execute("SELECT inet_server_addr()").fetchone()
    assert row == (None,)  # not TCP


@pytest.mark.parametrize("turn", ["first", "second", "third"])
def test_each_test_gets_a_fresh_database(
    turn: str, postgres_server: PostgresServer, postgres_url: str
) -> None:
    name = database_of(postgres_url)
    assert turn in name
    assert name not in SEEN
    existing = databases(postgres_server)
    assert name in existing
    # The databases of the earlier tests were dropped when they ended.
    assert existing.isdisjoint(SEEN)
    with psycopg.connect(postgres_url, connect_timeout=30) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        conn.execute("CREATE TABLE leftover (x int)")
    assert tables == (0,)
    SEEN.append(name)


@pytest.mark.parametrize(
    "name", ["plain", "Mixed Case", 'quote " inside', "ünïcode ☃", "semi;colon -- x", "a/b?c#d@e"]
)
def test_create_and_drop_any_database_name(
    name: str, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres_server.create_database(name)
    assert postgres_server.password not in url
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    assert database_of(url) == name
    held = postgres_server.connect(name)  # an open session does not stop the drop
    try:
        postgres_server.drop_database(name)
        assert name not in databases(postgres_server)
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    finally:
        held.close()
    postgres_server.drop_database(name)  # a database that is not there: nothing to do


# --- servers of their own: two at once, restart, kill, stop -------------------------------


@pytest.fixture(scope="module")
def second_server(bindir: str) -> Iterator[PostgresServer]:
    server = PostgresServer(bindir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def second(second_server: PostgresServer) -> PostgresServer:
    """The module's second server, running (a test before may have killed or stopped it)."""
    if not second_server.running:
        second_server.start()
    return second_server


def write_row(server: PostgresServer, database: str, value: str) -> None:
    with server.connect(database) as conn:
        # Flushed at commit despite the server-wide synchronous_commit=off, so a kill keeps it.
        conn.execute("SET synchronous_commit = on")
        conn.execute("CREATE TABLE IF NOT EXISTS kept (v text)")
        conn.execute("INSERT INTO kept VALUES (%s)", (value,))


def rows(server: PostgresServer, database: str) -> list[str]:
    with server.connect(database) as conn:
        return [row[0] for row in conn.execute("SELECT v FROM kept ORDER BY v")]


def test_two_servers_at_once(postgres_server: PostgresServer, second: PostgresServer) -> None:
    assert postgres_server.port != second.port
    assert postgres_server.password != second.password
    assert postgres_server.dir != second.dir
    assert postgres_server.pid != second.pid
    name = database_name("only_in_second")
    second.create_database(name)
    assert name in databases(second)
    assert name not in databases(postgres_server)
    # Each refuses the other's password.
    other = second.url("postgres").replace("@", f":{postgres_server.password}@", 1)
    assert "password authentication failed" in str(refused(other))
    second.drop_database(name)


def test_restart_keeps_data_port_and_password(second: PostgresServer) -> None:
    name = database_name("restart")
    url = second.create_database(name)
    write_row(second, name, "before")
    port, password, pid = second.port, second.password, second.pid
    held = second.connect(name)
    second.restart()
    assert (second.port, second.password) == (port, password)
    assert second.pid != pid and second.pid is not None
    assert not _alive(pid or 0)
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")  # the old session ended with the old server
    held.close()
    assert rows(second, name) == ["before"]
    assert database_of(second.url(name, password=True)) == name
    assert url == second.url(name)
    assert "database system was shut down at" in second.log_text()


def test_kill_then_start_recovers(second: PostgresServer) -> None:
    name = database_name("kill")
    second.create_database(name)
    write_row(second, name, "committed")
    port, pid = second.port, second.pid
    assert pid is not None
    backends = children_of(pid)
    assert backends  # checkpointer, walwriter, …
    log_before = len(second.log_text())
    second.kill()
    assert not second.running
    assert not _alive(pid)
    assert [child for child in backends if _alive(child)] == []
    assert second.dir is not None and (second.data_dir / "PG_VERSION").is_file()
    assert "Connection refused" in str(refused(second.url(name, password=True)))
    second.start()
    assert second.port == port
    assert rows(second, name) == ["committed"]
    log = second.log_text()[log_before:]
    # A crash, not a clean stop: the next start had to recover.
    assert "received immediate shutdown request" in log
    assert "automatic recovery in progress" in log


def test_stop_leaves_no_process_and_no_directory(second: PostgresServer) -> None:
    pid, directory, port = second.pid, second.dir, second.port
    assert pid is not None and directory is not None
    backends = children_of(pid)
    assert backends
    second.stop()
    assert not second.running
    assert not _alive(pid)
    assert [child for child in backends if _alive(child)] == []
    assert not directory.exists()
    assert "Connection refused" in str(
        refused(host="127.0.0.1", port=port, user=SUPERUSER, password=second.password)
    )
    assert "database system is shut down" in second.log_text()  # kept for failure messages
    second.stop()  # twice: nothing left to do


def test_a_forgotten_server_is_stopped_at_exit(bindir: str) -> None:
    script = (
        "from tests.postgres_server import PostgresServer\n"
        f"server = PostgresServer({bindir!r})\n"
        "server.start()\n"
        "print(server.pid, server.dir, flush=True)\n"
        "del server  # dropped without stop(): only the atexit safety net is left\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    pid_text, directory = done.stdout.split()
    assert not _alive(int(pid_text))
    assert children_of(int(pid_text)) == []
    assert not Path(directory).exists()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port someone else listens on."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield int(sock.getsockname()[1])


def test_a_port_taken_by_someone_else_is_retried(
    taken_port: int, bindir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken_attempts = 2  # of 3
    ports = iter([taken_port] * taken_attempts)
    monkeypatch.setattr(
        server_module, "free_port", lambda: next(ports, None) or original_free_port()
    )
    with PostgresServer(bindir) as server:
        assert server.port != taken_port
        assert server.log_text().count("Address already in use") == taken_attempts
        assert database_of(server.url("postgres", password=True)) == "postgres"


def test_no_free_port_at_all_fails_and_leaves_nothing(
    taken_port: int, bindir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "free_port", lambda: taken_port)
    server = PostgresServer(bindir)
    with pytest.raises(PostgresError, match="no free port in 3 attempts"):
        server.start()
    assert server.dir is None and not server.running
    assert server.log_text().count("Address already in use") == 3
