"""Budget use per person and group (DESIGN §9): what each budget has spent of its limit.

Limits live in the config, not the log, so the bridge publishes the budgets that hold into the
log's ``budgets`` table (``budget_rows``); ``BUDGET_USE_SQL`` sets the log's spend against
them, as datasette's canned query *Budget use per person and group* and, over rows computed
from the config itself (``budget_use``), as ``python -m aibridge.budgets``.
``BUDGET_USE_SQL_POSTGRES`` is the same query for a log in PostgreSQL (psql, a dashboard),
with the same answers.

Spend is counted as the governor counts it (``spend_log``): ``estimated_cost_usd`` or
``total_tokens`` of the interceptions paid with the bridge's own keys (credential kind
``centralized``) that started in the budget's period.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from aibridge.config import Config
from aibridge.governance.limits import EVERYONE, Budget, Governance
from aibridge.governance.periods import bounds, spelled

if TYPE_CHECKING:
    import psycopg

# The columns of a budgets row, in the order of migration m005_budgets.
COLUMNS: Final[tuple[str, ...]] = (
    "id",
    "scope",
    "owner",
    "members",
    "metric",
    "period",
    "limit_value",
    "source",
    "time_zone",
    "period_start",
    "resets_at",
    "config_digest",
    "updated_at",
)
# What the digest covers: what the config says, not where the periods stand.
_DIGEST_FIELDS: Final = COLUMNS[: COLUMNS.index("time_zone") + 1]

# The canned query `budget_use` of aibridge/datasette/metadata.yaml is exactly this text (a
# test says so). Spend is summed once per person and period window, then per budget over its members
# (joined by person, or all persons for "*"): a log of a year is scanned three times (day,
# week, month), not once per budget (a year of 1M exchanges, 3,100 budgets: 0.5 s). Members
# are the distinct elements of a JSON array (an integer key); anything else counts no one.
BUDGET_USE_SQL: Final = """with newest as (
  select config_digest from budgets order by updated_at desc, rowid desc limit 1
),
held as (
  select * from budgets where config_digest = (select config_digest from newest)
),
windows as (
  select distinct period_start, resets_at from held
),
per_person as (
  select w.period_start, w.resets_at, i.initiator_id as person,
    sum(t.estimated_cost_usd) as usd, sum(t.total_tokens) as tokens
  from windows w
  join interceptions i
    on i.started_at >= w.period_start and i.started_at < w.resets_at
  join token_usages t on t.interception_id = i.id
  -- "+": a period read through the started_at index, not every row by credential_kind
  where +i.credential_kind = 'centralized' and i.initiator_id is not null
  group by w.period_start, w.resets_at, i.initiator_id
),
members as (
  select distinct b.id, b.period_start, b.resets_at, m.value as member
  from held b,
    json_each(case when json_valid(b.members) then b.members else '[]' end) m
  where typeof(m.key) = 'integer'
),
everyone as (
  select id from members where member = '*'
),
counted as (
  select m.id, p.usd, p.tokens
  from members m
  join per_person p on p.person = m.member
    and p.period_start = m.period_start and p.resets_at = m.resets_at
  where m.id not in (select id from everyone)
  union all
  select e.id, p.usd, p.tokens
  from everyone e
  join held b on b.id = e.id
  join per_person p on p.period_start = b.period_start and p.resets_at = b.resets_at
),
amounts as (
  select b.id, sum(case b.metric when 'tokens' then c.tokens else c.usd end) as amount
  from counted c join held b on b.id = c.id
  group by b.id
),
measured as (
  select b.*, coalesce(a.amount, 0) as amount
  from held b left join amounts a on a.id = b.id
)
select
  scope,
  owner,
  case metric when 'tokens' then 'tokens' else 'spend' end || ' per ' || period
    as budget,
  case metric when 'tokens' then cast(amount as integer) else round(amount, 6) end
    as spent,
  case metric when 'tokens' then cast(limit_value as integer) else limit_value end
    as "limit",
  -- A limit of 0 is used up from the start, as the governor judges it.
  round(case when limit_value > 0 then amount / limit_value else 1.0 end, 4) as share,
  resets_at,
  source
from measured
order by share desc, scope, owner, metric,
  case period when 'day' then 0 when 'week' then 1 else 2 end"""

# BUDGET_USE_SQL for PostgreSQL, with the same answers (a test runs both on the same log):
# - members is jsonb there: its distinct string elements, when it is an array;
# - the tie-breaker of two publishes in the same microsecond: SQLite's "rowid desc" prefers the
#   row inserted last; here the row written last, by the transaction that wrote it (xmin: the
#   recorder's write lock makes transactions commit in the order they began to write; a frozen,
#   old row has the largest age), then the digest, so that one config is held, always the same;
# - a budget's metric and window travel with its members, and its sum meets it in a union,
#   not a join (see `measured`);
# - amounts are double precision (round() takes numeric), text is ordered as SQLite orders it
#   (bytes, NULL first) whatever the database's collation; periods compare started_at in the
#   database's collation, as the governor does (aibridge.governance.spend_log).
# A temporary table cannot stand in for `budgets` (none in a read-only transaction or on a
# standby), so budget_use gives its rows as the `published` CTE instead of the table's.
_PUBLISHED_SQL: Final = "select b.*, age(b.xmin) as written_ago from budgets b"
_USE_POSTGRES_SQL: Final = """newest as (
  select config_digest from published
  order by updated_at collate "C" desc nulls last, written_ago,
    config_digest collate "C" desc nulls last
  limit 1
),
held as (
  select * from published where config_digest = (select config_digest from newest)
),
windows as (
  select distinct period_start, resets_at from held
),
per_person as (
  select w.period_start, w.resets_at, i.initiator_id as person,
    sum(t.estimated_cost_usd) as usd, sum(t.total_tokens)::double precision as tokens
  from windows w
  join interceptions i
    on i.started_at >= w.period_start and i.started_at < w.resets_at
  join token_usages t on t.interception_id = i.id
  where i.credential_kind = 'centralized' and i.initiator_id is not null
  group by w.period_start, w.resets_at, i.initiator_id
),
members as (
  select distinct b.id, b.metric, b.period_start, b.resets_at, m.value #>> '{}' as member
  from held b
  cross join lateral jsonb_array_elements(
    case when jsonb_typeof(b.members) = 'array' then b.members else '[]' end
  ) m
  where jsonb_typeof(m.value) = 'string'
),
everyone as (
  select distinct id, metric, period_start, resets_at from members where member = '*'
),
counted as (
  select m.id, m.metric, p.usd, p.tokens
  from members m
  join per_person p on p.person = m.member
    and p.period_start = m.period_start and p.resets_at = m.resets_at
  where m.id not in (select id from everyone)
  union all
  select e.id, e.metric, p.usd, p.tokens
  from everyone e
  join per_person p on p.period_start = e.period_start and p.resets_at = e.resets_at
),
-- Each budget with its sum: a union summed per budget, not a join of the budgets with the
-- sums, which a planner without statistics on the budgets (rows given, a table not analyzed
-- yet) takes for a few rows and loops over, every budget against every sum.
measured as (
  select id, max(scope) as scope, max(owner) as owner, max(metric) as metric,
    max(period) as period, max(limit_value) as limit_value, max(resets_at) as resets_at,
    max(source) as source, coalesce(sum(amount), 0) as amount
  from (
    select id, scope, owner, metric, period, limit_value, resets_at, source,
      null::double precision as amount
    from held
    union all
    select id, null, null, null, null, null, null, null,
      case metric when 'tokens' then tokens else usd end
    from counted
  ) parts
  group by id
)
select
  scope,
  owner,
  case metric when 'tokens' then 'tokens' else 'spend' end || ' per ' || period
    as budget,
  case metric when 'tokens' then trunc(amount)
    else round(amount::numeric, 6)::double precision end as spent,
  case metric when 'tokens' then trunc(limit_value) else limit_value end as "limit",
  -- A limit of 0 is used up from the start, as the governor judges it.
  round((case when limit_value > 0 then amount / limit_value else 1.0 end)::numeric, 4)
    ::double precision as share,
  resets_at,
  source
from measured
order by share desc, scope collate "C" nulls first, owner collate "C" nulls first,
  metric collate "C" nulls first,
  case period when 'day' then 0 when 'week' then 1 else 2 end"""
BUDGET_USE_SQL_POSTGRES: Final = f"with published as (\n  {_PUBLISHED_SQL}\n),\n{_USE_POSTGRES_SQL}"
# Rows given to budget_use, in place of the table's: one jsonb array of objects, the later
# of two rows the more recently written (as SQLite's rowid orders them in its temp table).
_GIVEN_SQL: Final = (
    f"select {', '.join(COLUMNS)}, written_ago from jsonb_to_recordset(%s::jsonb) as r("
    "id text, scope text, owner text, members jsonb, metric text, period text, "
    "limit_value double precision, source text, time_zone text, period_start text, "
    "resets_at text, config_digest text, updated_at text, written_ago bigint)"
)
_GIVEN_USE_SQL: Final = f"with published as (\n  {_GIVEN_SQL}\n),\n{_USE_POSTGRES_SQL}"


def configured_user_ids(config: Config) -> list[str]:
    """Every person the config names: users, those with limits, members of groups."""
    governance = config.governance
    named = {user.id for user in config.users} | set(governance.user_limits)
    for group in governance.groups:
        named.update(member for member in group.members if member != EVERYONE)
    return sorted(named)


def budget_rows(
    governance: Governance, user_ids: Iterable[str], now: float | datetime
) -> list[dict[str, Any]]:
    """The budgets that hold at `now` (epoch seconds or an aware datetime), as rows of the
    ``budgets`` table: each person's own (from ``Governance.effective``), then each group's
    shared ones. Sorted by id; every row carries the same ``config_digest``."""
    at = datetime.fromtimestamp(now, UTC) if isinstance(now, int | float) else now
    if at.tzinfo is None:
        raise ValueError("budget_rows() needs an aware datetime or epoch seconds")
    rows: dict[str, dict[str, Any]] = {}
    for user_id in set(user_ids):
        for budget in governance.effective(user_id).budgets:
            if budget.scope == "user":
                row = _row(budget, [user_id], governance, at)
                rows[row["id"]] = row
    for group in governance.groups:
        # Everyone, spelled as the governor reads it: one "*" stands for all.
        members = [EVERYONE] if EVERYONE in group.members else sorted(group.members)
        for (metric, period), limit in group.shared_limits.budgets.items():
            if limit == float("inf"):  # unlimited: no budget holds
                continue
            budget = Budget(
                metric, period, limit, "group", group.name, f"{group.key}.shared_limits"
            )
            row = _row(budget, members, governance, at)
            rows[row["id"]] = row
    ordered = [rows[key] for key in sorted(rows)]
    digest = config_digest(ordered)
    for row in ordered:
        row["config_digest"] = digest
    return ordered


def _row(
    budget: Budget, members: list[str], governance: Governance, at: datetime
) -> dict[str, Any]:
    start, end = bounds(budget.period, at, governance.zone)
    return {
        "id": f"{budget.scope}:{budget.owner}:{budget.metric}:{budget.period}",
        "scope": budget.scope,
        "owner": budget.owner,
        "members": orjson.dumps(members).decode(),
        "metric": budget.metric,
        "period": budget.period,
        "limit_value": float(budget.limit),
        "source": budget.source,
        "time_zone": governance.time_zone,
        "period_start": spelled(start),
        "resets_at": spelled(end),
        "config_digest": "",
        "updated_at": spelled(at),
    }


def config_digest(rows: Iterable[Mapping[str, Any]]) -> str:
    """A hash of what the rows say about limits (not of their periods): a changed config
    gets another, an unchanged one keeps it across periods and restarts."""
    fields = sorted([[row[name] for name in _DIGEST_FIELDS] for row in rows], key=str)
    return hashlib.sha256(orjson.dumps(fields)).hexdigest()[:16]


def budget_use(
    conn: sqlite3.Connection | psycopg.Connection[Any], rows: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """``BUDGET_USE_SQL`` over `rows` instead of the log's ``budgets`` table: they go in a
    temporary table of that name, which SQLite reads before the file's (works on a read-only
    connection, and on a log without the table). On a PostgreSQL connection the same answers
    from ``BUDGET_USE_SQL_POSTGRES``, the rows given as a query parameter (works in a read-only
    transaction too); the caller's transaction, if any, is left as it is."""
    if not isinstance(conn, sqlite3.Connection):
        return _postgres_budget_use(conn, rows)
    opened_here = not conn.in_transaction
    marks = ", ".join("?" * len(COLUMNS))
    conn.execute("drop table if exists temp.budgets")
    conn.execute(f"create temp table budgets ({', '.join(COLUMNS)}, primary key (id))")
    try:
        conn.executemany(
            f"insert or replace into temp.budgets ({', '.join(COLUMNS)}) values ({marks})",
            [tuple(_bindable(row.get(name)) for name in COLUMNS) for row in rows],
        )
        cursor = conn.execute(BUDGET_USE_SQL)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, values, strict=True)) for values in cursor]
    finally:
        conn.execute("drop table if exists temp.budgets")
        if opened_here and conn.in_transaction:
            conn.commit()  # the implicit transaction the inserts opened: let the snapshot go


def _bindable(value: Any) -> Any:
    # members as the recorder would store a list: JSON text.
    return orjson.dumps(value).decode() if isinstance(value, list | tuple) else value


def _postgres_budget_use(
    conn: psycopg.Connection[Any], rows: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    # One row per id, the last given winning, at its place (SQLite's "insert or replace").
    given: dict[Any, dict[str, Any]] = {}
    for n, row in enumerate(rows):
        key = row.get("id")
        given.pop(key, None)
        given[(n,) if key is None else key] = {
            **{name: row.get(name) for name in COLUMNS},
            "members": _as_jsonb(row.get("members")),
        }
    values = list(given.values())
    for n, value in enumerate(values):
        value["written_ago"] = len(values) - n
    cursor = conn.execute(_GIVEN_USE_SQL, (orjson.dumps(values).decode(),))
    names = [column.name for column in cursor.description or ()]
    return [like_sqlite(dict(zip(names, found, strict=True))) for found in cursor]


def _as_jsonb(members: Any) -> Any:
    # As the recorder stores members in jsonb: JSON text parsed, anything else as a JSON
    # string (it counts no one, as in SQLite).
    if not isinstance(members, str):
        return members
    try:
        return orjson.loads(members)
    except orjson.JSONDecodeError:
        return members


def like_sqlite(row: dict[str, Any]) -> dict[str, Any]:
    """A row of BUDGET_USE_SQL_POSTGRES with the Python types BUDGET_USE_SQL gives: a
    column has one type in PostgreSQL, so a tokens budget's spent and limit come as floats."""
    if str(row.get("budget")).startswith("tokens "):
        for name in ("spent", "limit"):
            value = row.get(name)
            if isinstance(value, float) and math.isfinite(value):
                row[name] = int(value)
    return row
