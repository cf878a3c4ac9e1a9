"""Deleting old records from the audit log.

Two horizons, both counted back from now by the interception's ``started_at``:

- ``days``: older exchanges go entirely (the interception and every row that refers to it),
  and so do older ``recorder_losses`` entries;
- ``content_days`` (shorter): older exchanges keep their usage rows, but their content fields
  (prompts, model thoughts, tool arguments) become NULL. Usage and cost reports keep working
  for as long as ``days`` allows, while what people wrote is kept only briefly.

It runs beside a live bridge: small transactions, each waiting its turn for the write lock.
Erased content is overwritten in the file (``secure_delete``), purged from the full-text index
and checkpointed out of the WAL, so it cannot be read back from free pages.

    python -m aibridge.retention --days 365 --content-days 30 --db aibridge.db
    python -m aibridge.retention --config config.yaml      # uses its `retention` section

Run it daily (cron, a systemd timer); it is idempotent.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from aibridge.config import ConfigError, load_config
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
    """Apply the retention horizons to the audit log at `db_path`; see the module docstring."""
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
    if not Path(db_path).exists():
        raise RetentionError(f"{db_path}: no such database")
    conn = sqlite3.connect(str(db_path), timeout=busy_timeout_ms / 1000, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        # Freed pages are zeroed, so erased text cannot be recovered from the file.
        conn.execute("PRAGMA secure_delete = ON")
        children = _child_tables(conn)
        if report.cutoff is not None:
            _delete_old(conn, report, children, batch_size)
        if report.content_cutoff is not None:
            _clear_content(conn, report, batch_size)
        if not dry_run and (any(report.deleted.values()) or any(report.cleared.values())):
            _purge_leftovers(conn, children)
    finally:
        conn.close()
    return report


def _child_tables(conn: sqlite3.Connection) -> list[str]:
    """Every table that refers to interceptions: new ones are pruned without a change here."""
    tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")]
    if schema.INTERCEPTIONS not in tables:
        raise RetentionError("not an aibridge audit log: it has no interceptions table")
    return [
        t
        for t in tables
        if any(
            fk[2] == schema.INTERCEPTIONS for fk in conn.execute(f"PRAGMA foreign_key_list([{t}])")
        )
    ]


def _delete_old(
    conn: sqlite3.Connection, report: PruneReport, children: list[str], batch_size: int
) -> None:
    cutoff = report.cutoff
    if report.dry_run:
        old = "select id from interceptions where started_at < ?"
        for table in children:
            (n,) = conn.execute(
                f"select count(*) from [{table}] where interception_id in ({old})", (cutoff,)
            ).fetchone()
            report.deleted[table] += n
        (n,) = conn.execute(
            "select count(*) from interceptions where started_at < ?", (cutoff,)
        ).fetchone()
        report.deleted[schema.INTERCEPTIONS] += n
        (n,) = conn.execute(
            f"select count(*) from [{schema.RECORDER_LOSSES}] where happened_at < ?", (cutoff,)
        ).fetchone()
        report.deleted[schema.RECORDER_LOSSES] += n
        return
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            ids = [
                r[0]
                for r in conn.execute(
                    "select id from interceptions where started_at < ? limit ?",
                    (cutoff, batch_size),
                )
            ]
            if ids:
                marks = ",".join("?" * len(ids))
                # Children first: the foreign keys have no cascade.
                for table in children:
                    cur = conn.execute(
                        f"delete from [{table}] where interception_id in ({marks})", ids
                    )
                    report.deleted[table] += cur.rowcount
                cur = conn.execute(f"delete from interceptions where id in ({marks})", ids)
                report.deleted[schema.INTERCEPTIONS] += cur.rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if len(ids) < batch_size:
            break
    cur = conn.execute(f"delete from [{schema.RECORDER_LOSSES}] where happened_at < ?", (cutoff,))
    report.deleted[schema.RECORDER_LOSSES] += cur.rowcount


def _clear_content(conn: sqlite3.Connection, report: PruneReport, batch_size: int) -> None:
    old = "select id from interceptions where started_at < ?"
    for table, column in schema.CONTENT_FIELDS.items():
        where = f"[{column}] is not null and interception_id in ({old})"
        label = f"{table}.{column}"
        if report.dry_run:
            (n,) = conn.execute(
                f"select count(*) from [{table}] where {where}", (report.content_cutoff,)
            ).fetchone()
            report.cleared[label] += n
            continue
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [
                    r[0]
                    for r in conn.execute(
                        f"select id from [{table}] where {where} limit ?",
                        (report.content_cutoff, batch_size),
                    )
                ]
                if ids:
                    marks = ",".join("?" * len(ids))
                    cur = conn.execute(
                        f"update [{table}] set [{column}] = null where id in ({marks})", ids
                    )
                    report.cleared[label] += cur.rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if len(ids) < batch_size:
                break


def _purge_leftovers(conn: sqlite3.Connection, children: list[str]) -> None:
    """Leave no copy of erased text behind in the full-text index or the WAL."""
    tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
    for table in children:
        fts = f"{table}_fts"
        if fts in tables:
            # Deleted FTS entries linger in old segments until they are merged.
            conn.execute(f"insert into [{fts}]([{fts}]) values ('optimize')")
    # Best effort: a reader holding an old snapshot keeps the WAL until it lets go.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


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
    where.add_argument("--db", help="the SQLite audit log")
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
    print(f"{db_path}: {report.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
