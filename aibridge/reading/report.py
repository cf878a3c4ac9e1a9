"""The log in the terminal: usage per person, model and day, cost, top tools and failures over
a range of UTC days.

    python -m aibridge report                              # the last 30 days
    python -m aibridge report --since 2026-11-01 --until 2026-11-30 --user alice
    python -m aibridge report --db postgresql://bridge@db/aibridge --json

Per person, per day and the totals come from the report view v_usage_per_user_per_day (what
counts as a request, a priced and a subscription response is the view's, as in datasette);
failures from v_failed_requests. Per model and top tools are counted here, as the views behind
them add up all time. An exchange counts on the day it started. The log is only read, in one
snapshot; the command is safe beside a live bridge.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import orjson

from aibridge.reading.source import DateRange, ReadError, Source, parse_day

DEFAULT_DAYS: Final = 30
TOP: Final = 10
RECENT_FAILURES: Final = 5
UNAUTHENTICATED: Final = "(unauthenticated)"  # the views' name for who sent no known token
# Longest cell of a text table (errors and prompts can be kilobytes): the JSON has them whole.
CELL_WIDTH: Final = 60
_TOKENS: Final = ("input_tokens", "cached_input_tokens", "output_tokens")
# Characters a terminal acts on (C0, DEL, C1): shown as escapes, never sent as they are.
_CONTROLS: Final = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def _where(rng: DateRange, user: str | None, mark: str, time: str, who: str) -> str:
    sql = f"{time} >= {mark} and {time} < {mark}"
    if user is not None:
        sql += f" and {who} = {mark}"
    return sql


def _params(rng: DateRange, user: str | None) -> tuple[str, ...]:
    return (rng.start, rng.end) if user is None else (rng.start, rng.end, user)


def _int(value: Any) -> int:
    # PostgreSQL's sum of bigint is numeric (Decimal).
    return 0 if value is None else int(value)


def _money(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def _add_money(a: float | None, b: Any) -> float | None:
    if b is None:
        return a
    return round((a or 0.0) + float(b), 6)


def gather(src: Source, rng: DateRange, user: str | None, top: int = TOP) -> dict[str, Any]:
    """Everything the report shows, as plain Python values (the --json output)."""
    src.require_views()
    m = src.mark
    with src.reading():
        view = src.relations()["v_usage_per_user_per_day"]
        day = src.time_text(view, "day")
        where = _where(rng, user, m, day, '"user"')
        daily = src.rows(
            f"select * from v_usage_per_user_per_day where {where}",
            _params(rng, user),
        )
        models = _per_model(src, rng, user)
        tools = _top_tools(src, rng, user)
        failures = _failures(src, rng, user)

    people: dict[str, dict[str, Any]] = {}
    days: dict[str, dict[str, Any]] = {}
    totals = _zero()
    for row in daily:
        day_text = str(row["day"])[:10]  # a date on PostgreSQL
        for group in (
            people.setdefault(row["user"], {"user": row["user"], **_zero()}),
            days.setdefault(day_text, {"day": day_text, "users": 0, **_zero()}),
            totals,
        ):
            _accumulate(group, row)
        days[day_text]["users"] += 1
    return {
        "since": rng.start,
        "until": rng.until.isoformat(),
        "user": user,
        "database": src.where,
        "totals": totals,
        "per_person": sorted(
            people.values(),
            key=lambda r: (-(r["estimated_cost_usd"] or 0), -r["requests"], r["user"]),
        ),
        "per_model": models,
        "per_day": [days[d] for d in sorted(days)],
        "top_tools": tools[:top],
        "failures": failures,
    }


def _zero() -> dict[str, Any]:
    return {
        "requests": 0,
        **dict.fromkeys(_TOKENS, 0),
        "estimated_cost_usd": None,
        "unpriced_responses": 0,
        "subscription_responses": 0,
    }


def _accumulate(group: dict[str, Any], row: dict[str, Any]) -> None:
    for key in ("requests", *_TOKENS, "unpriced_responses", "subscription_responses"):
        group[key] += _int(row[key])
    group["estimated_cost_usd"] = _add_money(group["estimated_cost_usd"], row["estimated_cost_usd"])


def _per_model(src: Source, rng: DateRange, user: str | None) -> list[dict[str, Any]]:
    who = f"coalesce(i.initiator_id, '{UNAUTHENTICATED}')"
    rows = src.rows(
        f"""select
  i.api,
  coalesce(i.model, '(none)') as model,
  count(distinct i.id) as requests,
  coalesce(sum(t.input_tokens), 0) as input_tokens,
  coalesce(sum(t.cache_read_input_tokens), 0) as cached_input_tokens,
  coalesce(sum(t.output_tokens), 0) as output_tokens,
  sum(t.estimated_cost_usd) as estimated_cost_usd,
  count(case when t.estimated_cost_usd is null
    and coalesce(i.credential_kind, '') not in ('subscription', 'client')
    then t.id end) as unpriced_responses,
  count(case when i.credential_kind in ('subscription', 'client')
    then t.id end) as subscription_responses
from interceptions i
left join token_usages t on t.interception_id = i.id
where {_where(rng, user, src.mark, "i.started_at", who)}
group by i.api, coalesce(i.model, '(none)')""",
        _params(rng, user),
    )
    out = [
        {
            "api": r["api"],
            "model": r["model"],
            "requests": _int(r["requests"]),
            **{k: _int(r[k]) for k in _TOKENS},
            "estimated_cost_usd": _money(r["estimated_cost_usd"]),
            "unpriced_responses": _int(r["unpriced_responses"]),
            "subscription_responses": _int(r["subscription_responses"]),
        }
        for r in rows
    ]
    # Sorted here, not in SQL: the engines order text differently (collations, NULLs).
    out.sort(
        key=lambda r: (
            -(r["estimated_cost_usd"] or 0),
            -(r["input_tokens"] + r["output_tokens"]),
            r["model"],
            r["api"] or "",
        )
    )
    return out


def _top_tools(src: Source, rng: DateRange, user: str | None) -> list[dict[str, Any]]:
    who = f"coalesce(i.initiator_id, '{UNAUTHENTICATED}')"
    rows = src.rows(
        f"""select
  u.tool,
  u.type,
  count(*) as calls,
  count(distinct i.initiator_id) as users,
  count(u.invocation_error) as errors,
  max(u.created_at) as last_called
from tool_usages u
join interceptions i on i.id = u.interception_id
where {_where(rng, user, src.mark, "i.started_at", who)}
group by u.tool, u.type""",
        _params(rng, user),
    )
    out = [
        {
            "tool": r["tool"],
            "type": r["type"],
            "calls": _int(r["calls"]),
            "users": _int(r["users"]),
            "errors": _int(r["errors"]),
            "last_called": r["last_called"],
        }
        for r in rows
    ]
    out.sort(key=lambda r: (-r["calls"], r["tool"] or "", r["type"] or ""))
    return out


def _failures(src: Source, rng: DateRange, user: str | None) -> dict[str, Any]:
    where = _where(rng, user, src.mark, "i.started_at", 'f."user"')
    grouped = src.rows(
        f"""select f.status, f.error, count(*) as requests, max(i.started_at) as last_at
from v_failed_requests f
join interceptions i on i.id = f.interception_id
where {where}
group by f.status, f.error""",
        _params(rng, user),
    )
    by_status = [
        {
            "status": r["status"],
            "error": r["error"],
            "requests": _int(r["requests"]),
            "last_at": r["last_at"],
        }
        for r in grouped
    ]
    by_status.sort(key=lambda r: (-r["requests"], r["status"] or "", r["error"] or ""))
    recent = src.rows(
        f"""select i.started_at as at, f."user", f.api, f.model, f.status, f.http_status,
  f.error, f.interception_id
from v_failed_requests f
join interceptions i on i.id = f.interception_id
where {where}
order by i.started_at desc, i.id desc
limit {RECENT_FAILURES}""",
        _params(rng, user),
    )
    for r in recent:
        r["http_status"] = None if r["http_status"] is None else int(r["http_status"])
    return {
        "requests": sum(r["requests"] for r in by_status),
        "by_status": by_status,
        "recent": recent,
    }


# --- text --------------------------------------------------------------------------------------


def cell(value: Any, width: int = CELL_WIDTH) -> str:
    """One line of at most `width` characters, control characters escaped."""
    text = "" if value is None else str(value)
    text = text.translate(_CONTROLS)
    return text if len(text) <= width else text[: width - 1] + "…"


def moment(value: Any) -> str:
    """An instant as `YYYY-MM-DD HH:MM:SS` (UTC, as the log writes it), else as it is."""
    if isinstance(value, datetime):
        value = value.astimezone(UTC).isoformat()
    text = cell(value)
    if len(text) >= 19 and text[10] == "T" and text[:4].isdigit():
        return f"{text[:10]} {text[11:19]}"
    return text


def dollars(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "$0.00"
    if abs(value) < 0.0001:
        return "<$0.0001"
    return f"${value:,.4f}"


def count(value: int) -> str:
    return f"{value:,}"


def table(
    headers: tuple[str, ...], rows: Iterable[tuple[str, ...]], right: Iterable[str]
) -> list[str]:
    """Aligned lines, two spaces between columns, numbers right-aligned."""
    lines = [headers, *rows]
    widths = [max(len(line[n]) for line in lines) for n in range(len(headers))]
    right_set = set(right)
    return [
        "  "
        + "  ".join(
            c.rjust(w) if h in right_set else c.ljust(w)
            for h, c, w in zip(headers, line, widths, strict=True)
        ).rstrip()
        for line in lines
    ]


_USAGE_HEADERS: Final = ("requests", "input", "cached", "output", "cost", "unpriced")


def _usage_cells(r: dict[str, Any]) -> tuple[str, ...]:
    return (
        count(r["requests"]),
        count(r["input_tokens"]),
        count(r["cached_input_tokens"]),
        count(r["output_tokens"]),
        dollars(r["estimated_cost_usd"]),
        count(r["unpriced_responses"]),
    )


def _section(
    title: str,
    items: list[dict[str, Any]],
    headers: tuple[str, ...],
    cells: Callable[[dict[str, Any]], tuple[str, ...]],
    right: Iterable[str],
) -> list[str]:
    if not items:
        return [title, "  none", ""]
    return [title, *table(headers, (cells(r) for r in items), right), ""]


def format_report(data: dict[str, Any]) -> list[str]:
    who = f"user {cell(data['user'])}" if data["user"] is not None else "everyone"
    t = data["totals"]
    lines = [
        f"aibridge report, {data['since']} to {data['until']} (UTC days, both included), {who}",
        f"log: {data['database']}",
        "",
        "Totals",
        *table(
            (*_USAGE_HEADERS, "subscription"),
            [(*_usage_cells(t), count(t["subscription_responses"]))],
            (*_USAGE_HEADERS, "subscription"),
        ),
        "  (tokens: input includes cached; cost: the estimate of the priced responses;",
        "  unpriced: responses without a known price; subscription: sign-ins, not paid per token)",
        "",
    ]
    lines += _section(
        "Per person",
        data["per_person"],
        ("user", *_USAGE_HEADERS),
        lambda r: (cell(r["user"]), *_usage_cells(r)),
        _USAGE_HEADERS,
    )
    lines += _section(
        "Per model",
        data["per_model"],
        ("api", "model", *_USAGE_HEADERS),
        lambda r: (cell(r["api"]), cell(r["model"]), *_usage_cells(r)),
        _USAGE_HEADERS,
    )
    lines += _section(
        "Per day",
        data["per_day"],
        ("day", "users", *_USAGE_HEADERS),
        lambda r: (r["day"], count(r["users"]), *_usage_cells(r)),
        ("users", *_USAGE_HEADERS),
    )
    lines += _section(
        "Top tools",
        data["top_tools"],
        ("tool", "type", "calls", "people", "errors", "last called"),
        lambda r: (
            cell(r["tool"]),
            cell(r["type"]),
            count(r["calls"]),
            count(r["users"]),
            count(r["errors"]),
            moment(r["last_called"]),
        ),
        ("calls", "people", "errors"),
    )
    failures = data["failures"]
    lines += _section(
        f"Failures by status and error ({count(failures['requests'])} requests)",
        failures["by_status"],
        ("status", "error", "requests", "last at"),
        lambda r: (cell(r["status"]), cell(r["error"]), count(r["requests"]), moment(r["last_at"])),
        ("requests",),
    )
    lines += _section(
        "Most recent failures",
        failures["recent"],
        ("at", "user", "api", "model", "status", "http", "error", "interception"),
        lambda r: (
            moment(r["at"]),
            cell(r["user"]),
            cell(r["api"]),
            cell(r["model"], 30),
            cell(r["status"]),
            cell(r["http_status"]),
            cell(r["error"], 40),
            cell(r["interception_id"]),
        ),
        ("http",),
    )
    return lines[:-1]


# --- command line ------------------------------------------------------------------------------


def day_argument(text: str) -> Any:
    try:
        return parse_day(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def date_range(
    parser: argparse.ArgumentParser, since: Any, until: Any, now: datetime | None
) -> DateRange:
    """--since/--until, the last DEFAULT_DAYS days (today included) for what is not given."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    last = until or today
    first = since or (last - timedelta(days=DEFAULT_DAYS - 1))
    if first > last:
        parser.error(f"--since {first} is after --until {last}")
    return DateRange(first, last)


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """--db / --config as the other tools have them, and the date range."""
    parser.add_argument(
        "--config",
        default="config.yaml",
        help="bridge config whose database is read (default: config.yaml here, else next to "
        "addon.py)",
    )
    parser.add_argument(
        "--db", help="the audit log: a SQLite file or a postgresql:// URL (default: the config's)"
    )
    parser.add_argument(
        "--since",
        type=day_argument,
        metavar="YYYY-MM-DD",
        help=f"first UTC day (default: {DEFAULT_DAYS} days ago, counting today)",
    )
    parser.add_argument(
        "--until", type=day_argument, metavar="YYYY-MM-DD", help="last UTC day (default: today)"
    )
    parser.add_argument(
        "--user", help=f"only this person's exchanges (a user id, or {UNAUTHENTICATED})"
    )


def log_address(db: str | None, config: str) -> str:
    """--db, else the config's database (loaded as the bridge and python -m aibridge.budgets
    find it). Raises ReadError."""
    if db:
        return db
    from aibridge.budgets import config_path
    from aibridge.config import ConfigError, load_config

    try:
        return load_config(config_path(config)).database
    except ConfigError as e:
        raise ReadError(f"{e} (--db names the log without a config)") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError


def main(argv: list[str] | None = None, *, now: datetime | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aibridge report",
        description="Usage per person, model and day, cost, top tools and failures over a range "
        "of UTC days, from the audit log.",
    )
    add_log_options(parser)
    parser.add_argument(
        "--top", type=int, default=TOP, help=f"how many tools to list (default {TOP})"
    )
    parser.add_argument("--json", action="store_true", help="the same data as JSON")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    rng = date_range(parser, args.since, args.until, now)
    try:
        address = log_address(args.db, args.config)
        with Source.open(address) as src:
            data = gather(src, rng, args.user, args.top)
    except ReadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(
            orjson.dumps(data, default=_json_default, option=orjson.OPT_INDENT_2).decode() + "\n"
        )
    else:
        sys.stdout.write("\n".join(format_report(data)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
