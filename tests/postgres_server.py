"""A real, throwaway PostgreSQL server for tests: Debian's ``postgresql`` package, initialised in
a fresh temporary directory and listening on a free loopback port.

TCP logins need the random password (scram-sha-256), so a test proves that a password taken
from the environment works; the unix socket in the temporary directory trusts its peer. initdb
refuses root, so as root the server runs as ``postgres`` (Debian's package creates it) or
``nobody``. Without the binaries the tests that need them are skipped on a workstation and fail
in CI (``CI`` set), where .ci/run installs them (``apt-get install -y postgresql``).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from tests.harness import required_program

__all__ = [
    "PostgresError",
    "PostgresServer",
    "database_name",
    "find_postgres_bin",
    "free_port",
    "postgres_bin",
]

SUPERUSER = "aibridge"
_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_START_ATTEMPTS = 3  # a free port can be taken by someone else before the postmaster binds it
_PG_CTL_TIMEOUT = 60  # seconds pg_ctl -w waits; never asserted as a duration
_CONNECT_TIMEOUT = 30
_PORT_TAKEN = b"Address already in use"
# Settings for a disposable server: loopback only, no durability (nothing outlives the test).
_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}
# Servers not stopped yet: the atexit safety net stops them, so no test run leaves one behind
# (a plain set: a server dropped without stop() must still be found).
_LIVE: set[PostgresServer] = set()


class PostgresError(RuntimeError):
    """The server could not be initialised, started or stopped."""


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def _has_programs(bindir: str) -> bool:
    return all(os.access(os.path.join(bindir, name), os.X_OK) for name in _PROGRAMS)


def find_postgres_bin() -> str | None:
    """The directory holding initdb, pg_ctl and postgres: PATH, then ``pg_config --bindir``,
    then the highest /usr/lib/postgresql/*/bin (Debian keeps them off PATH)."""
    if found := shutil.which("initdb"):
        # A symlink on PATH stands for the directory it points into.
        bindir = os.path.dirname(os.path.realpath(found))
        if _has_programs(bindir):
            return bindir
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_programs(out):
            return out
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_programs(d)]
    return max(candidates, key=_version_key) if candidates else None


def _version_key(bindir: str) -> tuple[int, ...]:
    """The version of a ``…/postgresql/VERSION/bin`` directory, in numeric order (15 > 9.6)."""
    name = os.path.basename(os.path.dirname(bindir.rstrip("/")))
    return tuple(int(part) for part in re.findall(r"\d+", name))


def postgres_bin() -> str:
    return required_program(find_postgres_bin(), "PostgreSQL", "postgresql")


def database_name(hint: str) -> str:
    """A new database name that tells which test made it: `hint` (a test name) reduced to
    ``[a-z0-9_]``, and a random suffix, within PostgreSQL's 63 bytes."""
    stem = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")
    if len(stem) > 40:
        # Both ends: the function's name and the parameters' id at the end.
        stem = f"{stem[:20]}_{stem[-19:]}"
    return f"t_{stem}_{secrets.token_hex(4)}" if stem else f"t_{secrets.token_hex(4)}"


def _server_user() -> pwd.struct_passwd | None:
    """The account the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    raise PostgresError("running as root and neither user 'postgres' nor 'nobody' exists")


def _alive(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state …": comm may hold spaces and parentheses, so split at the last.
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class PostgresServer:
    """One PostgreSQL cluster (superuser ``aibridge``) in a temporary directory, on a free
    loopback port. ``start()`` initialises it; ``kill()`` and ``restart()`` keep data, port and
    password; ``stop()`` removes everything."""

    def __init__(self, bindir: str | None = None) -> None:
        found = bindir or find_postgres_bin()
        if found is None:
            raise PostgresError("PostgreSQL binaries not found (apt-get install -y postgresql)")
        self.bindir = found
        self.user = SUPERUSER
        self.password = ""
        self.port = 0
        self.dir: Path | None = None  # socket directory; data/ and the log are inside
        self.pid: int | None = None  # the postmaster's, while running
        self._account = _server_user()
        self._log_offset = 0
        self._last_log = ""  # the log of a stopped server, for failure messages

    # --- paths -------------------------------------------------------------------------------

    def _workdir(self) -> Path:
        if self.dir is None:
            raise PostgresError("the server has not been started")
        return self.dir

    @property
    def data_dir(self) -> Path:
        return self._workdir() / "data"

    @property
    def log_path(self) -> Path:
        return self._workdir() / "postgres.log"

    @property
    def running(self) -> bool:
        return self.pid is not None

    # --- processes ---------------------------------------------------------------------------

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`program` from bindir as the server's account, its output captured."""
        # No PG* variables of ours (PGDATA, PGPORT, PGPASSWORD …) reach the server's tools.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        account: dict[str, Any] = {}
        if self._account is not None:
            env["HOME"] = str(self._workdir())
            # extra_groups=[]: drop root's supplementary groups too.
            account = {
                "user": self._account.pw_uid,
                "group": self._account.pw_gid,
                "extra_groups": [],
            }
        return subprocess.run(
            [os.path.join(self.bindir, program), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=self._workdir(),  # our cwd may be out of the account's reach
            stdin=subprocess.DEVNULL,
            timeout=_PG_CTL_TIMEOUT + 30,
            check=False,
            **account,
        )

    def _give(self, path: Path) -> None:
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _initdb(self) -> None:
        # mkdtemp, not pytest's tmp_path: the account must reach the directory.
        self.dir = Path(tempfile.mkdtemp(prefix="aibridge-pg-"))
        self._give(self.dir)
        self.password = secrets.token_urlsafe(24)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._give(pwfile)
        try:
            done = self._run(
                "initdb",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-D",
                str(self.data_dir),
            )
        finally:
            pwfile.unlink()
        if done.returncode != 0:
            output = done.stdout + done.stderr
            self._remove_dir()
            raise PostgresError(f"initdb exited with {done.returncode}:\n{output}")

    def _pg_ctl_start(self) -> bool:
        """Start the postmaster on self.port: True once it accepts connections, False if the
        port was taken under us."""
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
        self._give(self.log_path)
        options = [f"-p {self.port}", f"-c unix_socket_directories={shlex.quote(str(self.dir))}"]
        options += [f"-c {name}={value}" for name, value in _SETTINGS.items()]
        done = self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            str(_PG_CTL_TIMEOUT),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            " ".join(options),
        )
        pid = self._postmaster_pid()
        if done.returncode == 0 and pid is not None:
            self.pid = pid
            _LIVE.add(self)
            return True
        if pid is not None and _alive(pid):
            # pg_ctl gave up waiting (a slow start): no postmaster may outlive the failure.
            self.pid = pid
            self._pg_ctl_stop("immediate")
        elif _PORT_TAKEN in self._log_since_start():
            return False
        raise PostgresError(
            f"pg_ctl start exited with {done.returncode}:\n{done.stdout}{done.stderr}\n"
            f"{self.log_text()}"
        )

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def _log_since_start(self) -> bytes:
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read()

    def _pg_ctl_stop(self, mode: str) -> None:
        if self.pid is None:
            return
        done = self._run(
            "pg_ctl", "stop", "-w", "-t", str(_PG_CTL_TIMEOUT), "-m", mode, "-D", str(self.data_dir)
        )
        if done.returncode != 0 and _alive(self.pid):
            raise PostgresError(
                f"pg_ctl stop -m {mode} exited with {done.returncode}:\n"
                f"{done.stdout}{done.stderr}\n{self.log_text()}"
            )
        self.pid = None
        _LIVE.discard(self)

    def _remove_dir(self) -> None:
        directory, self.dir = self.dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Initialise a new cluster on a free port; after kill(), start the same one again (on
        its port, after crash recovery)."""
        if self.running:
            raise PostgresError("the server is already running")
        if self.dir is not None:
            if not self._pg_ctl_start():
                raise PostgresError(f"port {self.port} was taken while the server was down")
            return
        self._initdb()
        try:
            for _ in range(_START_ATTEMPTS):
                self.port = free_port()
                if self._pg_ctl_start():
                    return
            raise PostgresError(
                f"PostgreSQL found no free port in {_START_ATTEMPTS} attempts:\n{self.log_text()}"
            )
        except BaseException:
            self.stop()
            raise

    def restart(self) -> None:
        """A clean shutdown and a start on the same port, data and password."""
        if self.dir is None:
            raise PostgresError("the server has not been started")
        self._pg_ctl_stop("fast")
        self.start()

    def kill(self) -> None:
        """Stop at once, as a crash would (``-m immediate``): no checkpoint, the next start()
        recovers from the WAL. Data, port and password stay. With synchronous_commit=off the
        last commits (wal_writer_delay, 200 ms) may be lost; a test that needs them to survive
        runs ``SET synchronous_commit = on`` in its session."""
        self._pg_ctl_stop("immediate")

    def stop(self) -> None:
        """Stop the server and remove its directory; start() then makes a new cluster."""
        try:
            if self.running:
                try:
                    self._pg_ctl_stop("fast")
                except PostgresError:
                    self._pg_ctl_stop("immediate")
        finally:
            if self.dir is not None:
                self._last_log = self.log_text()
            self._remove_dir()
            _LIVE.discard(self)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """The server's log (the last one after stop()), for failure messages."""
        if self.dir is None:
            return self._last_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- databases ---------------------------------------------------------------------------

    def url(self, database: str, *, password: bool = False) -> str:
        """``postgresql://aibridge@127.0.0.1:PORT/DATABASE`` (TCP); with the password only if
        asked, so that a URL in a log or an assertion message reveals nothing."""
        secret = f":{urllib.parse.quote(self.password, safe='')}" if password else ""
        name = urllib.parse.quote(database, safe="")
        return f"postgresql://{self.user}{secret}@127.0.0.1:{self.port}/{name}"

    def connect(
        self, database: str = "postgres", *, autocommit: bool = False
    ) -> psycopg.Connection[TupleRow]:
        """A connection over TCP with the password (given here, not taken from PG* variables)."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            sslmode="disable",
            connect_timeout=_CONNECT_TIMEOUT,
            autocommit=autocommit,
        )

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL without the password."""
        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop `name` if it exists, closing its connections (a test may leave some open)."""
        with self.connect(autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        # Best effort at exit: go on stopping the others.
        with contextlib.suppress(Exception):
            server.stop()
