"""The PostgreSQL server a run gives the bridge variant "postgres" as its store.

A throwaway cluster of tests/postgres_server.py, run as the test suite runs it: loopback
only, fsync, synchronous_commit and full_page_writes off (nothing outlives the run), so it
measures the bridge's cost of writing to PostgreSQL, not a disk's. The bridge gets one
database's URL without a password; the password goes to it only in PGPASSWORD. After its
rounds the run stops that bridge and reads back what landed (`landed`), against what the
bridge said it counted (`shutdown_summary`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.postgres_server import PostgresServer

DATABASE = "aibridge_bench"
# What the run reports of the server's configuration (tests/postgres_server.py sets them).
SHOWN_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes")

# The bridge's summary at shutdown (aibridge/console.py, ExchangeTally.summary):
# "AI Bridge: 1,234 exchanges (1,230 completed, 4 error); 5,678 rows written, 0 lost".
_SUMMARY = re.compile(
    r"AI Bridge: ([\d,]+) exchanges?(?: \(([^)]*)\))?; ([\d,]+) rows? written, ([\d,]+) lost"
)
_STATUS_COUNT = re.compile(r"(\d[\d,]*) (\w+)")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def unavailable() -> str | None:
    """Why no server can be started here (no psycopg, no binaries), or None."""
    try:
        from tests.postgres_server import find_postgres_bin
    except ImportError as e:  # psycopg missing: the optional extra "postgresql"
        return f"cannot import the PostgreSQL harness ({e}; pip install -e '.[postgresql]')"
    if find_postgres_bin() is None:
        return "PostgreSQL binaries not found (apt-get install -y postgresql)"
    return None


@dataclass(frozen=True, slots=True)
class PostgresStore:
    server: PostgresServer

    @property
    def url(self) -> str:
        """The bridge's ``database``: no password in it (config files and argv are
        readable by others)."""
        return self.server.url(DATABASE)

    @property
    def env(self) -> dict[str, str]:
        """What the bridge's process needs besides the URL (libpq reads PGPASSWORD)."""
        return {"PGPASSWORD": self.server.password}

    def info(self) -> dict[str, Any]:
        """The server's version and the settings that decide what a commit costs."""
        names = ("server_version", *SHOWN_SETTINGS)
        with self.server.connect(DATABASE) as conn:
            row = conn.execute(
                "select " + ", ".join("current_setting(%s)" for _ in names), names
            ).fetchone()
        assert row is not None
        version, *values = (str(value) for value in row)
        # "15.18 (Debian 15.18-0+deb12u1)": the number is what a reader compares.
        return {
            "version": version.split()[0],
            "settings": dict(zip(SHOWN_SETTINGS, values, strict=True)),
        }

    def cpu_seconds(self) -> float:
        """CPU the server has used so far, all its processes: the postmaster, the live
        backends, and the ended ones (their time is the postmaster's children's)."""
        pid = self.server.pid
        assert pid is not None
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # ended meanwhile
            own = int(stat.parent.name)
            # fields[1] is the parent pid; utime, stime, cutime, cstime are fields 11-14.
            if own == pid or int(fields[1]) == pid:
                total += sum(int(f) for f in fields[11:13])
                if own == pid:
                    total += sum(int(f) for f in fields[13:15])
        return total / ticks

    def landed(self) -> dict[str, int]:
        """The interceptions in the bridge's database, by status."""
        with self.server.connect(DATABASE) as conn:
            rows = conn.execute(
                "select status, count(*) from interceptions group by status"
            ).fetchall()
        return {str(status): int(n) for status, n in rows}


class NotStarted(RuntimeError):
    """The server could not be started; the message says why."""


@contextmanager
def started() -> Iterator[PostgresStore]:
    """A new server with the bridge's database, stopped and removed at the end."""
    import psycopg

    from tests.postgres_server import PostgresError, PostgresServer

    server: PostgresServer | None = None
    try:
        server = PostgresServer()
        server.start()
        server.create_database(DATABASE)
    except (PostgresError, psycopg.Error) as e:
        if server is not None:
            server.stop()
        raise NotStarted(str(e)) from e
    try:
        yield PostgresStore(server)
    finally:
        server.stop()


def shutdown_summary(log: str) -> dict[str, Any] | None:
    """The last shutdown summary in a bridge's log: exchanges counted (in all and by
    status), rows written and lost; None if the log has none."""
    summaries = list(_SUMMARY.finditer(log))
    if not summaries:
        return None
    total, counts, written, lost = summaries[-1].groups()
    return {
        "exchanges": _number(total),
        "by_status": {status: _number(n) for n, status in _STATUS_COUNT.findall(counts or "")},
        "rows_written": _number(written),
        "rows_lost": _number(lost),
    }
