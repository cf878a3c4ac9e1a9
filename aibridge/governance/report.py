"""Budget use per person and group (DESIGN §9): what each budget has spent of its limit.

Limits live in the config, not the log, so the bridge publishes the budgets that hold into the
log's ``budgets`` table (``budget_rows``); ``BUDGET_USE_SQL`` sets the log's spend against
them, as datasette's canned query *Budget use per person and group* and, over rows computed
from the config itself (``budget_use``), as ``python -m aibridge.budgets``.

Spend is counted as the governor counts it (``spend_log``): ``estimated_cost_usd`` or
``total_tokens`` of the interceptions paid with the bridge's own keys (credential kind
``centralized``) that started in the budget's period.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from aibridge.config import Config
from aibridge.governance.limits import EVERYONE, Budget, Governance
from aibridge.governance.periods import bounds, spelled

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

# The canned query `budget_use` of datasette/metadata.yaml is exactly this text (a test says
# so). Spend is summed once per person and period window, then per budget over its members
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


def budget_use(conn: sqlite3.Connection, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``BUDGET_USE_SQL`` over `rows` instead of the log's ``budgets`` table: they go in a
    temporary table of that name, which SQLite reads before the file's (works on a read-only
    connection, and on a log without the table)."""
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
