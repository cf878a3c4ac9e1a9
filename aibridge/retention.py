"""Deleting old records from the audit log (a SQLite file or a PostgreSQL database).

Two horizons, both counted back from now by the interception's ``started_at``:

- ``days``: older exchanges go entirely (the interception and every row that refers to it),
  and so do older ``recorder_losses`` entries;
- ``content_days`` (shorter): older exchanges keep their usage rows, but their content fields
  (prompts, model thoughts, tool arguments) become NULL. Usage and cost reports keep working
  for as long as ``days`` allows, while what people wrote is kept only briefly.

It runs beside a live bridge: small transactions, each waiting its turn for the write lock
(in PostgreSQL the recorder's advisory lock, WRITE_LOCK: a batch never interleaves with a
recorder batch, so the two cannot deadlock and no row is added to an exchange while it goes).
A dry run only reads (in PostgreSQL in a read-only transaction).

What is erased does not stay behind:

- SQLite: it is overwritten in the file (``secure_delete``), purged from the full-text index
  and checkpointed out of the WAL, so it cannot be read back from free pages.
- PostgreSQL: deleted and updated rows stay on disk as dead tuples until VACUUM, so a run
  that changed anything ends with ``VACUUM (ANALYZE)`` of each table it changed (TOAST
  included; ANALYZE because column statistics keep sampled values), then rebuilds their GIN
  indexes (prompt search) with ``REINDEX INDEX CONCURRENTLY``: GIN keeps a word as a key
  after its last row is gone. Neither blocks the bridge; the rebuild waits for transactions
  older than it to end. No query can read erased text back after that, and no tuple holds
  it; but PostgreSQL does not zero freed space, so its bytes can stay in a page until new
  rows reuse it (``VACUUM FULL`` of the content tables rewrites them, locking out the
  bridge's writes while it runs). Row versions that a transaction older than the run may
  still see wait for the next (auto)vacuum. A rebuild cut short leaves an invalid index
  ``<name>_ccnew`` behind: drop it. The prompt's tsvector column is generated from the
  prompt, so clearing one clears the other. The WAL, its archive, backups and the
  statistics catalog's old rows keep what they hold until they turn over.

    python -m aibridge.retention --days 365 --content-days 30 --db aibridge.db
    python -m aibridge.retention --days 365 --db postgresql://bridge@db.internal/aibridge
    python -m aibridge.retention --config config.yaml      # uses its `retention` section

Run it daily (cron, a systemd timer); it is idempotent.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

from aibridge.config import ConfigError, load_config
from aibridge.record import address as addresses
from aibridge.record import schema

# Timestamps are UTC ISO 8601 text; comparing up to the second needs no parsing.
_TIME_PREFIX: Final = 19


class RetentionError(ValueError):
    """The request cannot be carried out (bad numbers, not an audit log)."""


@dataclass(slots=True)
class PruneReport:
    cutoff: str | None
    content_cutoff: str | None
    dry_run: bool = False
    deleted: Counter[str] = field(default_factory=Counter)  # rows deleted, by table
    cleared: Counter[str] = field(default_factory=Counter)  # "table.field" set to NULL

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        lines = []
        if self.cutoff is not None:
            parts = ", ".join(f"{t} {n}" for t, n in sorted(self.deleted.items()) if n)
            lines.append(f"{verb} records started before {self.cutoff}: {parts or 'none'}")
        if self.content_cutoff is not None:
            verb = "would clear" if self.dry_run else "cleared"
            parts = ", ".join(f"{t} {n}" for t, n in sorted(self.cleared.items()) if n)
            lines.append(f"{verb} content started before {self.content_cutoff}: {parts or 'none'}")
        return "\n".join(lines)


def cutoff_for(days: int, now: datetime) -> str:
    """The oldest start time kept, as text comparable with the log's timestamps."""
    return (now.astimezone(UTC) - timedelta(days=days)).isoformat()[:_TIME_PREFIX]


def _check_days(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise RetentionError(f"{name} must be a whole number of days >= 1, got {value!r}")


def prune(
    db_path: str | Path,
    *,
    days: int | None,
    content_days: int | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    batch_size: int = 500,
    busy_timeout_ms: int = 10_000,
) -> PruneReport:
    """Apply the retention horizons to the audit log at `db_path` (a SQLite path or a
    PostgreSQL URL); see the module docstring."""
    _check_days("days", days)
    _check_days("content_days", content_days)
    if days is None and content_days is None:
        raise RetentionError("give days, content_days or both")
    if days is not None and content_days is not None and content_days > days:
        raise RetentionError(f"content_days ({content_days}) must not exceed days ({days})")
    now = now or datetime.now(UTC)
    report = PruneReport(
        cutoff=cutoff_for(days, now) if days is not None else None,
        content_cutoff=cutoff_for(content_days, now) if content_days is not None else None,
        dry_run=dry_run,
    )
    address = str(db_path)
    if addresses.is_postgres(address):
        log: _Log = _PostgresLog(address, busy_timeout_ms)
    elif not Path(address).exists():
        raise RetentionError(f"{address}: no such database")
    else:
        log = _SqliteLog(address, busy_timeout_ms)
    try:
        with log.errors():
            children = _child_tables(log, addresses.display(address))
            if report.cutoff is not None:
                _delete_old(log, report, children, batch_size)
            if report.content_cutoff is not None:
                _clear_content(log, report, batch_size)
            if not dry_run and (any(report.deleted.values()) or any(report.cleared.values())):
                log.purge(report, children)
    finally:
        log.close()
    return report


class _Log(Protocol):
    """What differs between the engines; the batches and their SQL are shared."""

    @property
    def param(self) -> str:
        """The driver's placeholder."""
        ...

    def quote(self, name: str) -> str: ...

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute `sql`; the number of rows it changed."""
        ...

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction, its turn taken at the write lock."""
        ...

    def reading(self) -> contextlib.AbstractContextManager[None]: ...

    def errors(self) -> contextlib.AbstractContextManager[None]: ...

    def tables(self) -> list[str]: ...

    def referring_to(self, table: str) -> list[str]:
        """The tables with a foreign key to `table`."""
        ...

    def purge(self, report: PruneReport, children: list[str]) -> None:
        """Leave no copy of erased text readable in the database's files."""
        ...

    def close(self) -> None: ...


def _child_tables(log: _Log, where: str) -> list[str]:
    """Every table that refers to interceptions: new ones are pruned without a change here."""
    if schema.INTERCEPTIONS not in log.tables():
        raise RetentionError(f"{where}: not an aibridge audit log: it has no interceptions table")
    return log.referring_to(schema.INTERCEPTIONS)


def _delete_old(log: _Log, report: PruneReport, children: list[str], batch_size: int) -> None:
    p, q = log.param, log.quote
    cutoff = report.cutoff
    interceptions, losses = q(schema.INTERCEPTIONS), q(schema.RECORDER_LOSSES)
    if report.dry_run:
        old = f"select id from {interceptions} where started_at < {p}"
        with log.reading():
            for table in children:
                ((n,),) = log.rows(
                    f"select count(*) from {q(table)} where interception_id in ({old})", (cutoff,)
                )
                report.deleted[table] += n
            ((n,),) = log.rows(
                f"select count(*) from {interceptions} where started_at < {p}", (cutoff,)
            )
            report.deleted[schema.INTERCEPTIONS] += n
            ((n,),) = log.rows(f"select count(*) from {losses} where happened_at < {p}", (cutoff,))
            report.deleted[schema.RECORDER_LOSSES] += n
        return
    while True:
        with log.writing():
            ids = [
                r[0]
                for r in log.rows(
                    f"select id from {interceptions} where started_at < {p} limit {p}",
                    (cutoff, batch_size),
                )
            ]
            if ids:
                marks = ",".join([p] * len(ids))
                # Children first: the foreign keys have no cascade.
                for table in children:
                    report.deleted[table] += log.run(
                        f"delete from {q(table)} where interception_id in ({marks})", ids
                    )
                report.deleted[schema.INTERCEPTIONS] += log.run(
                    f"delete from {interceptions} where id in ({marks})", ids
                )
        if len(ids) < batch_size:
            break
    with log.writing():
        report.deleted[schema.RECORDER_LOSSES] += log.run(
            f"delete from {losses} where happened_at < {p}", (cutoff,)
        )


def _clear_content(log: _Log, report: PruneReport, batch_size: int) -> None:
    p, q = log.param, log.quote
    old = f"select id from {q(schema.INTERCEPTIONS)} where started_at < {p}"
    for table, column in schema.CONTENT_FIELDS.items():
        where = f"{q(column)} is not null and interception_id in ({old})"
        label = f"{table}.{column}"
        if report.dry_run:
            with log.reading():
                ((n,),) = log.rows(
                    f"select count(*) from {q(table)} where {where}", (report.content_cutoff,)
                )
            report.cleared[label] += n
            continue
        while True:
            with log.writing():
                ids = [
                    r[0]
                    for r in log.rows(
                        f"select id from {q(table)} where {where} limit {p}",
                        (report.content_cutoff, batch_size),
                    )
                ]
                if ids:
                    marks = ",".join([p] * len(ids))
                    report.cleared[label] += log.run(
                        f"update {q(table)} set {q(column)} = null where id in ({marks})", ids
                    )
            if len(ids) < batch_size:
                break


class _SqliteLog:
    param: Final = "?"

    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self.conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self.conn.execute("PRAGMA foreign_keys = ON")
            # Freed pages are zeroed, so erased text cannot be recovered from the file.
            self.conn.execute("PRAGMA secure_delete = ON")
        except BaseException:
            self.conn.close()
            raise

    def quote(self, name: str) -> str:
        return f"[{name}]"

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        yield  # each count on its own: a dry run takes no lock the bridge could wait for

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def tables(self) -> list[str]:
        return [
            r[0] for r in self.conn.execute("select name from sqlite_master where type = 'table'")
        ]

    def referring_to(self, table: str) -> list[str]:
        return [
            t
            for t in self.tables()
            if any(fk[2] == table for fk in self.conn.execute(f"PRAGMA foreign_key_list([{t}])"))
        ]

    def purge(self, report: PruneReport, children: list[str]) -> None:
        """Leave no copy of erased text behind in the full-text index or the WAL."""
        tables = set(self.tables())
        for table in children:
            fts = f"{table}_fts"
            if fts in tables:
                # Deleted FTS entries linger in old segments until they are merged.
                self.conn.execute(f"insert into [{fts}]([{fts}]) values ('optimize')")
        # Best effort: a reader holding an old snapshot keeps the WAL until it lets go.
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.conn.close()


# The GIN indexes of a table, and whether each is valid (a failed concurrent build is not).
_GIN_INDEXES: Final = """
select i.relname, x.indisvalid
from pg_index x join pg_class i on i.oid = x.indexrelid join pg_am a on a.oid = i.relam
where x.indrelid = to_regclass(%s) and a.amname = 'gin'
order by i.relname
"""
# The tables of the current schema that have a foreign key to a given table.
_REFERRING: Final = """
select distinct c.relname
from pg_constraint k join pg_class c on c.oid = k.conrelid
where k.contype = 'f' and k.confrelid = to_regclass(%s)
  and c.relnamespace = (select oid from pg_namespace where nspname = current_schema())
order by c.relname
"""


class _PostgresLog:
    param: Final = "%s"

    def __init__(self, address: str, busy_timeout_ms: int) -> None:
        from aibridge.record import postgres

        self.address = address
        self.postgres = postgres
        try:
            postgres.require_driver()
        except RuntimeError as exc:
            raise RetentionError(f"{addresses.display(address)}: {exc}") from None
        with self.errors():
            self.conn = postgres.connect(address)
            try:
                # A batch waits for the recorder's as long as a SQLite one waits for the file.
                self.conn.execute(f"set lock_timeout = {int(busy_timeout_ms)}")
            except BaseException:
                self.conn.close()
                raise

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Database errors as one line naming the database, the password masked."""
        try:
            yield
        except self.postgres.psycopg.Error as exc:
            raise RetentionError(self.postgres.describe_error(exc, self.address)) from None

    def quote(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        # The recorder's lock, though deletes add no ids: one writer at a time, as in SQLite,
        # so neither waits on row locks the other holds (no deadlock), and no row can join an
        # exchange between the delete of its children and its own.
        with self.postgres.locked_transaction(self.conn):
            yield

    def reading(self) -> contextlib.AbstractContextManager[None]:
        # The server refuses any write in it: a dry run cannot change a thing.
        return self._transaction("begin isolation level repeatable read read only")

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[None]:
        self.conn.execute(begin)
        try:
            yield
            self.conn.execute("commit")
        except BaseException:
            if not self.conn.closed and not self.conn.broken:
                with contextlib.suppress(self.postgres.psycopg.Error):
                    self.conn.execute("rollback")
            raise

    def tables(self) -> list[str]:
        return [
            r[0]
            for r in self.rows(
                "select table_name from information_schema.tables "
                "where table_schema = current_schema() and table_type = 'BASE TABLE'"
            )
        ]

    def referring_to(self, table: str) -> list[str]:
        return [r[0] for r in self.rows(_REFERRING, (self.quote(table),))]

    def purge(self, report: PruneReport, children: list[str]) -> None:
        """VACUUM what changed, then rebuild its GIN indexes (see the module docstring)."""
        touched = {t for t, n in report.deleted.items() if n}
        touched |= {label.partition(".")[0] for label, n in report.cleared.items() if n}
        # No timeout: its lock (share update exclusive) blocks none of the bridge's reads and
        # writes, and a rebuild cut short would leave an invalid index behind.
        self.conn.execute("set statement_timeout = 0")
        self.conn.execute("set lock_timeout = 0")
        for table in sorted(touched):
            # Pruning drops a dead row's data even where VACUUM skips index cleanup; the GIN
            # indexes, which keep words, are rebuilt below.
            self.conn.execute(f"vacuum (analyze) {self.quote(table)}")
        for table in sorted(touched):
            for index, valid in self.rows(_GIN_INDEXES, (self.quote(table),)):
                if valid:
                    self.conn.execute(f"reindex index concurrently {self.quote(index)}")

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aibridge.retention",
        description="Delete audit records older than N days; clear prompts, thoughts and tool "
        "arguments older than M days (M <= N) while keeping their usage rows.",
    )
    parser.add_argument(
        "--days", type=int, help="delete exchanges that started more than N days ago"
    )
    parser.add_argument(
        "--content-days",
        type=int,
        help="clear prompts, thoughts and tool arguments of exchanges older than M days",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        help="bridge config: its database, and its retention section for missing --days/"
        "--content-days (default: config.yaml when --db is not given)",
    )
    where.add_argument("--db", help="the audit log: a SQLite file or a PostgreSQL URL")
    parser.add_argument("--dry-run", action="store_true", help="count, change nothing")
    args = parser.parse_args(argv)

    days, content_days = args.days, args.content_days
    if args.db:
        db_path = args.db
    else:
        try:
            config = load_config(args.config or "config.yaml")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        db_path = config.database
        # The command line wins, horizon by horizon.
        days = config.retention.days if days is None else days
        content_days = config.retention.content_days if content_days is None else content_days
    try:
        report = prune(db_path, days=days, content_days=content_days, dry_run=args.dry_run)
    except RetentionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{addresses.display(db_path)}: {report.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
