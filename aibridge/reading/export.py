"""Rows of the log over a range of UTC days as CSV or JSON Lines, for spreadsheets and scripts.

    python -m aibridge export --format csv --since 2026-11-01 --until 2026-11-30 -o nov.csv
    python -m aibridge export --format jsonl --table prompts --user alice

By default one row per exchange (interceptions): who, what, when, status, and its tokens and
estimated cost summed over its token_usages rows. ``--table`` exports another table of the log
(``prompts`` is user_prompts) or a report view that has a time column, filtered on that column.

Rows are streamed in batches (a server-side cursor on PostgreSQL) and written as they come,
so memory stays flat whatever the size of the log. CSV is RFC 4180 (header row, quoted fields,
CRLF), JSON columns (usage, args, metadata) as JSON text; JSON Lines has one object per line,
JSON columns as values. Text that is not valid Unicode never stops an export: it is written
with U+FFFD in its place.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import IO, Any, Final

import orjson

from aibridge.reading.report import UNAUTHENTICATED, add_log_options, date_range, log_address
from aibridge.reading.source import DateRange, ReadError, Relation, Source
from aibridge.record import schema
from aibridge.record.sqlite import without_lone_surrogates

FORMATS: Final = ("csv", "jsonl")
BATCH: Final = 1000
# Names people use for the tables whose names are longer.
ALIASES: Final = {"prompts": schema.USER_PROMPTS, "thoughts": schema.MODEL_THOUGHTS}
# The time column a date range filters on, the first a relation has.
TIME_COLUMNS: Final = (
    "started_at",
    "created_at",
    "happened_at",
    "at",
    "day",
    "started",
    "updated_at",
)
# Columns of a relation that say who, the first it has.
USER_COLUMNS: Final = ("initiator_id", "user")
# Tables that are the log's own bookkeeping or prompt search: not rows anyone exports.
_NOT_EXPORTED: Final = re.compile(r"^(_|user_prompts_fts|sqlite_)")
_TOKEN_SUMS: Final = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_write_input_tokens",
    "uncached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)
# The interceptions columns of the default export, who/what/when/status first.
_EXCHANGE_COLUMNS: Final = (
    "started_at",
    "ended_at",
    "initiator_id",
    "api",
    "provider",
    "provider_name",
    "model",
    "response_model",
    "client",
    "client_session_id",
    "streaming",
    "status",
    "http_status",
    "error",
    "credential_kind",
    "credential_hint",
    "correlating_tool_call_id",
    "previous_response_id",
    "response_id",
    "flow_id",
    "mitmweb_url",  # m007; only when the log has it
    "metadata",
    "id",
)


class ExportError(Exception):
    """The arguments ask for what the log does not have (a table, a filter)."""


def exportable(src: Source) -> dict[str, Relation]:
    """The tables and views of the log that have a time column, by name."""
    return {
        name: rel
        for name, rel in src.relations().items()
        if not _NOT_EXPORTED.match(name) and _time_column(rel) is not None
    }


def _time_column(rel: Relation) -> str | None:
    return next((c for c in TIME_COLUMNS if c in rel.columns), None)


def exchanges_query(src: Source, rng: DateRange, user: str | None) -> tuple[str, tuple[Any, ...]]:
    """One row per interception with the sums of its token_usages rows (null when it has
    none; the cost null when none of them is priced, as m007's columns are)."""
    have = src.relations()[schema.INTERCEPTIONS].columns
    m = src.mark
    picked = [c for c in _EXCHANGE_COLUMNS if c in have]
    sums = [f"sum(t.{c}) as {c}" for c in _TOKEN_SUMS]
    select = [
        *(f"i.{c}" for c in picked[: picked.index("error") + 1]),
        *sums,
        "sum(t.estimated_cost_usd) as estimated_cost_usd",
        "count(t.id) as responses",
        *(f"i.{c}" for c in picked[picked.index("error") + 1 :]),
    ]
    where = f"i.started_at >= {m} and i.started_at < {m}"
    params: tuple[Any, ...] = (rng.start, rng.end)
    if user is not None:
        where += f" and coalesce(i.initiator_id, '{UNAUTHENTICATED}') = {m}"
        params += (user,)
    sql = (
        f"select {', '.join(select)}\nfrom interceptions i\n"
        "left join token_usages t on t.interception_id = i.id\n"
        f"where {where}\ngroup by i.id\norder by i.started_at, i.id"
    )
    return sql, params


def relation_query(
    src: Source, rel: Relation, rng: DateRange, user: str | None
) -> tuple[str, tuple[Any, ...]]:
    time = _time_column(rel)
    if time is None:
        raise ExportError(f"{rel.name} has no time column to filter on ({', '.join(TIME_COLUMNS)})")
    m = src.mark
    moment = src.time_text(rel, time)
    where = f"{moment} >= {m} and {moment} < {m}"
    params: tuple[Any, ...] = (rng.start, rng.end)
    if user is not None:
        who = next((c for c in USER_COLUMNS if c in rel.columns), None)
        if who is not None:
            where += f" and coalesce(\"{who}\", '{UNAUTHENTICATED}') = {m}"
        elif "interception_id" in rel.columns:
            where += (
                " and interception_id in (select id from interceptions "
                f"where coalesce(initiator_id, '{UNAUTHENTICATED}') = {m})"
            )
        else:
            raise ExportError(f"--user does not apply to {rel.name}: it says nothing of who")
        params += (user,)
    order = f"{moment}, id" if "id" in rel.columns else moment
    # PostgreSQL's search column (tsvector) is the index of the prompt, not data.
    names = ", ".join(f'"{c}"' for c, kind in rel.columns.items() if kind != "tsvector")
    return f'select {names} from "{rel.name}" where {where} order by {order}', params


# --- values ------------------------------------------------------------------------------------


def _number(value: Decimal) -> int | float:
    # PostgreSQL sums bigint as numeric: whole numbers stay integers, the rest are floats.
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= 0:
        return int(value)
    return float(value)


class _Converter:
    """Turns a row of driver values into what a format writes, per column."""

    def __init__(self, src: Source, rel: Relation | None, names: list[str]) -> None:
        self.json = [src.is_json(rel, n) for n in names]
        # jsonb arrives parsed (a JSON string as a str); SQLite's JSON is its text.
        self.parsed = src.postgres

    def csv(self, row: tuple[Any, ...]) -> list[str]:
        out = []
        for value, is_json in zip(row, self.json, strict=True):
            if value is None:
                out.append("")
            elif is_json and self.parsed:
                out.append(without_lone_surrogates(orjson.dumps(value).decode()))
            else:
                out.append(_plain_text(value))
        return out

    def jsonl(self, names: list[str], row: tuple[Any, ...]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for name, value, is_json in zip(names, row, self.json, strict=True):
            if value is not None and is_json and not self.parsed and isinstance(value, str):
                value = _parse_json_text(value)
            elif isinstance(value, Decimal):
                value = _number(value)
            elif isinstance(value, bytes):
                value = value.hex()
            obj[name] = value
        return obj


def _plain_text(value: Any) -> str:
    if isinstance(value, str):
        return without_lone_surrogates(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Decimal):
        return str(_number(value))
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _parse_json_text(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # Not JSON after all (an old or foreign row): the text itself.
        return without_lone_surrogates(text)


def _dumps_line(obj: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return orjson.dumps(_cleaned(obj), option=orjson.OPT_APPEND_NEWLINE)


def _cleaned(value: Any) -> Any:
    if isinstance(value, str):
        return without_lone_surrogates(value)
    if isinstance(value, dict):
        return {without_lone_surrogates(str(k)): _cleaned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cleaned(v) for v in value]
    return value


# --- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    relation: Relation
    sql: str
    params: tuple[Any, ...]


def prepare(
    src: Source, rng: DateRange, *, table: str | None = None, user: str | None = None
) -> Query:
    """The statement of an export; raises ExportError (or ReadError) for what cannot be."""
    src.require_log()
    if table is None:
        return Query(src.relations()[schema.INTERCEPTIONS], *exchanges_query(src, rng, user))
    rel = resolve_table(src, table)
    return Query(rel, *relation_query(src, rel, rng, user))


def export(
    src: Source,
    out: IO[bytes],
    fmt: str,
    rng: DateRange,
    *,
    table: str | None = None,
    user: str | None = None,
    batch: int = BATCH,
) -> int:
    """Write the rows to `out` (binary); returns how many."""
    return write(src, out, fmt, prepare(src, rng, table=table, user=user), batch)


def write(src: Source, out: IO[bytes], fmt: str, query: Query, batch: int = BATCH) -> int:
    sql, params, rel = query.sql, query.params, query.relation
    written = 0
    with src.stream(sql, params, batch) as (names, rows):
        convert = _Converter(src, rel, names)
        if fmt == "csv":
            text = io.TextIOWrapper(out, encoding="utf-8", errors="replace", newline="")
            try:
                writer = csv.writer(text, lineterminator="\r\n")
                writer.writerow(names)
                for row in rows:
                    writer.writerow(convert.csv(row))
                    written += 1
            finally:
                text.flush()
                text.detach()  # `out` is the caller's to close
        else:
            for row in rows:
                out.write(_dumps_line(convert.jsonl(names, row)))
                written += 1
    out.flush()
    return written


def resolve_table(src: Source, name: str) -> Relation:
    wanted = ALIASES.get(name, name)
    choices = exportable(src)
    if wanted in choices:
        return choices[wanted]
    known = src.relations().get(wanted)
    if known is not None and not _NOT_EXPORTED.match(wanted):
        raise ExportError(
            f"{name} has no time column to filter on ({', '.join(TIME_COLUMNS)}): "
            "read it in datasette or with sqlite3/psql"
        )
    listed = ", ".join(sorted([*ALIASES, *choices]))
    raise ExportError(f"no table or view {name!r} to export; choose one of: {listed}")


@contextlib.contextmanager
def _output(path: str | None, stdout: IO[bytes] | None) -> Iterator[IO[bytes]]:
    if path is None or path == "-":
        yield sys.stdout.buffer if stdout is None else stdout
        return
    with open(path, "wb") as f:
        yield f


def main(
    argv: list[str] | None = None, *, now: datetime | None = None, out: IO[bytes] | None = None
) -> int:
    """`out`: where the rows go without -o (default: stdout)."""
    parser = argparse.ArgumentParser(
        prog="python -m aibridge export",
        description="Rows of the audit log over a range of UTC days as CSV or JSON Lines: one "
        "row per exchange with its tokens and cost, or another table or report view.",
    )
    add_log_options(parser)
    parser.add_argument("--format", choices=FORMATS, default="csv", help="default csv")
    parser.add_argument(
        "--table",
        help="another table (interceptions, prompts, tool_usages, token_usages, thoughts, …) "
        "or a v_* view with a time column",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    args = parser.parse_args(argv)
    rng = date_range(parser, args.since, args.until, now)
    try:
        address = log_address(args.db, args.config)
        with Source.open(address) as src:
            # Every question the log can refuse is asked before the output file is made.
            query = prepare(src, rng, table=args.table, user=args.user)
            with _output(args.output, out) as stream:
                n = write(src, stream, args.format, query)
    except (ReadError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's final flush of
        # stdout from complaining about the pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        print(f"error: {args.output or 'stdout'}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.output not in (None, "-"):
        print(f"{args.output}: {n:,} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
