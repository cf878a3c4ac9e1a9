"""Copying the audit log from one engine to the other.

    python -m aibridge.copy_log postgresql://bridge@db/aibridge aibridge-copy.db
    python -m aibridge.copy_log aibridge.db postgresql://bridge@db/aibridge

PostgreSQL to SQLite: a file datasette opens with everything it expects (prompt search,
indexes, the canned queries and views), taken while the bridges go on writing. SQLite to
PostgreSQL: the history of a single bridge brought into the database that several now share.

The copy is a real audit log: the destination is created by the bridge's own migrations, so
its tables, types, indexes and search are the ones the bridge writes itself (a generic tool
such as db-to-sqlite guesses column types from the first row it sees and cannot make the
search index). Rows keep their ids; the destination must hold no exchanges yet. Rows are read
in id order in batches, each batch one transaction, so a large log never sits in memory. A
row the destination refuses for its values is repaired as the recorder would repair it (NUL
and invalid Unicode replaced, a value not of the column's type stored as text or dropped), and
the summary says how many.

What the source holds while the copy runs is copied up to the moment each table is read:
rows written later by a live bridge are not in the copy.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from aibridge.record import address as addresses
from aibridge.record import schema
from aibridge.record.recorder import (
    INSERT,
    LossKey,
    Op,
    Store,
    insert_sql,
    open_store,
    params_of,
    write_one_by_one,
)
from aibridge.record.sqlite import connect_readonly

# Tables in the order their foreign keys need: interceptions before the rows that point at it.
TABLES: Final = (
    schema.INTERCEPTIONS,
    schema.TOKEN_USAGES,
    schema.USER_PROMPTS,
    schema.TOOL_USAGES,
    schema.MODEL_THOUGHTS,
    schema.RECORDER_LOSSES,
    schema.BUDGETS,
)
BATCH: Final = 2_000


class CopyError(Exception):
    """The copy cannot be made (an address that does not work, a destination in use)."""


@dataclass(slots=True)
class CopyReport:
    copied: Counter[str] = field(default_factory=Counter)  # rows, by table
    repaired: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (table, field, why)
    refused: Counter[str] = field(default_factory=Counter)  # rows, by table

    def summary(self) -> str:
        parts = [f"{table} {n:,}" for table, n in self.copied.items()]
        lines = [f"copied {', '.join(parts) or 'nothing'}"]
        for (table, column, reason), n in sorted(self.repaired.items()):
            lines.append(f"repaired {n:,} {table}.{column}: {reason}")
        for table, n in sorted(self.refused.items()):
            lines.append(f"could not copy {n:,} {table} rows (refused by the destination)")
        return "\n".join(lines)


class _Source:
    """The log read in id order, batch by batch, from either engine."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.postgres = addresses.is_postgres(address)
        if self.postgres:
            from aibridge.record import postgres

            self._conn: Any = postgres.connect(address)
        else:
            if not Path(address).exists():
                raise CopyError(f"{address}: no such database")
            self._conn = connect_readonly(address, busy_timeout_ms=10_000)

    def tables(self) -> set[str]:
        if self.postgres:
            sql = "select table_name from information_schema.tables "
            sql += "where table_schema = current_schema()"
        else:
            sql = "select name from sqlite_master where type = 'table'"
        return {r[0] for r in self._conn.execute(sql)}

    def columns(self, table: str) -> list[tuple[str, bool]]:
        """(name, holds JSON that the driver parses) of each column of `table`."""
        if self.postgres:
            rows = self._conn.execute(
                "select column_name, data_type in ('json', 'jsonb') "
                "from information_schema.columns "
                "where table_schema = current_schema() and table_name = %s "
                "and is_generated = 'NEVER' order by ordinal_position",
                (table,),
            )
            return [(r[0], r[1]) for r in rows]
        return [(r[1], False) for r in self._conn.execute(f'pragma table_info("{table}")')]

    def batches(self, table: str, columns: list[str], size: int) -> Iterator[list[dict[str, Any]]]:
        names = ", ".join(f'"{c}"' for c in columns)
        mark = "%s" if self.postgres else "?"
        last: Any = None
        while True:
            where = "" if last is None else f"where id > {mark} "
            sql = f'select {names} from "{table}" {where}order by id limit {int(size)}'
            rows = self._conn.execute(sql, () if last is None else (last,)).fetchall()
            if not rows:
                return
            yield [dict(zip(columns, row, strict=True)) for row in rows]
            last = rows[-1][columns.index("id")]

    def close(self) -> None:
        self._conn.close()


def copy_log(source: str, destination: str, *, batch_size: int = BATCH) -> CopyReport:
    """Copy every row of the log at `source` into a new log at `destination`."""
    if source == destination:
        raise CopyError("the source and the destination are the same")
    try:
        reader = _Source(source)
    except CopyError:
        raise
    except Exception as e:
        raise CopyError(f"cannot open {addresses.display(source)}: {_why(e, source)}") from None
    try:
        dest_file = None if addresses.is_postgres(destination) else Path(destination)
        if dest_file is not None and dest_file.exists() and dest_file.stat().st_size > 0:
            raise CopyError(f"{destination} already exists: copy into a new file")
        present = reader.tables()
        if schema.INTERCEPTIONS not in present:
            raise CopyError(f"{addresses.display(source)}: not an aibridge audit log")
        store = open_store(destination)
        try:
            store.open()
        except Exception as e:
            raise CopyError(
                f"cannot open {addresses.display(destination)}: {_why(e, destination)}"
            ) from None
        try:
            _refuse_a_used_destination(store)
            report = CopyReport()
            for table in TABLES:
                if table in present:
                    _copy_table(reader, store, table, batch_size, report)
            _advance_sequences(store)
            return report
        finally:
            store.close()
    finally:
        reader.close()


def _why(exc: BaseException, address: str) -> str:
    return addresses.scrub(f"{type(exc).__name__}: {exc}".strip(), address)


def _refuse_a_used_destination(store: Store) -> None:
    count = _scalar(store, f"select count(*) from {schema.INTERCEPTIONS}")
    if count:
        raise CopyError(
            f"{store.where} already holds {count:,} exchanges: copy into a new database "
            "(rows keep their ids, which must not clash)"
        )


def _scalar(store: Store, sql: str) -> Any:
    return store.execute(sql)[0][0]


def _copy_table(
    reader: _Source, store: Store, table: str, batch_size: int, report: CopyReport
) -> None:
    wanted = store.columns[table]
    found = [(c, is_json) for c, is_json in reader.columns(table) if c in wanted]
    columns = [c for c, _ in found]
    parsed = [c for c, is_json in found if is_json]
    if "id" not in columns:
        return
    sql = insert_sql(table, tuple(columns), store.placeholder)
    params = params_of(tuple(columns))
    for rows in reader.batches(table, columns, batch_size):
        if parsed:
            rows = [_as_json_text(row, parsed) for row in rows]
        ops: list[Op] = [(INSERT, table, row) for row in rows]
        with store.transaction():
            token = store.before_rows(ops)
            try:
                with store.savepoint():
                    store.write_rows(sql, params, rows)
                report.copied[table] += len(rows)
            except Exception as exc:
                if store.is_transient(exc) or not store.in_transaction:
                    raise
                _one_by_one(store, table, sql, params, rows, report)
            store.after_rows(token)


def _one_by_one(
    store: Store,
    table: str,
    sql: str,
    params: Any,
    rows: list[dict[str, Any]],
    report: CopyReport,
) -> None:
    outcomes: Counter[LossKey] = Counter()
    written, _ = write_one_by_one(
        store,
        [(INSERT, table, row) for row in rows],
        lambda _kind, _table, some: store.write_rows(sql, params, some),
        outcomes,
    )
    report.copied[table] += written
    for (_, column, reason), n in outcomes.items():
        if column is None:
            report.refused[table] += n
        else:
            report.repaired[(table, column, reason)] += n


def _as_json_text(row: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """jsonb comes out of PostgreSQL parsed: back to JSON text, as the recorder writes it (a
    JSON string too: ``"ls"`` stays quoted)."""
    for column in columns:
        value = row[column]
        if value is not None:
            row[column] = orjson.dumps(value).decode()
    return row


def _advance_sequences(store: Store) -> None:
    """PostgreSQL ids given explicitly leave the identity sequences behind: move each past
    the largest id, or the bridge's next insert would collide with a copied row."""
    if store.placeholder != "%s":
        return
    for table in TABLES:
        if table in (schema.INTERCEPTIONS, schema.BUDGETS):
            continue  # text ids
        store.execute(
            f"select setval(pg_get_serial_sequence('{table}', 'id'), "
            f"coalesce((select max(id) from {table}), 0) + 1, false)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aibridge.copy_log",
        description="Copy the audit log into a new one, between SQLite and PostgreSQL "
        "(a SQLite copy of a shared PostgreSQL log opens in datasette).",
    )
    parser.add_argument("source", help="a SQLite path or a postgresql:// URL")
    parser.add_argument("destination", help="a new SQLite path or an empty PostgreSQL database")
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per transaction")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    try:
        report = copy_log(args.source, args.destination, batch_size=args.batch)
    except CopyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shown = f"{addresses.display(args.source)} -> {addresses.display(args.destination)}"
    print(f"{shown}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
