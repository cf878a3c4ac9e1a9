"""Reading spend from the audit log (DESIGN §9): the totals of the current periods, and the
rows the log gained since the last read. Read-only, on a connection of its own: several
bridges writing one file agree because each reads what all of them wrote.

Spend is ``token_usages.estimated_cost_usd``, tokens are ``total_tokens``, each counted in
the period in which its interception started, for interceptions paid with the bridge's own
provider keys (``credential_kind = 'centralized'``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

from aibridge.governance.ledger import Use
from aibridge.governance.periods import Period
from aibridge.record.recorder import FileId, known_file_id

PAID_BY_THE_BRIDGE = "centralized"

_NEW_ROWS = """
select t.id, t.interception_id, i.initiator_id, i.started_at,
       coalesce(t.estimated_cost_usd, 0), coalesce(t.total_tokens, 0)
from token_usages t join interceptions i on i.id = t.interception_id
where t.id > ? and i.credential_kind = 'centralized' and i.initiator_id is not null
  and typeof(i.started_at) = 'text'
order by t.id
"""

_CONFIRMED = """
select distinct interception_id from token_usages
where interception_id in (select value from json_each(?))
"""


def period_sums_sql(periods: tuple[Period, ...]) -> str:
    """One row per user: (user, USD and tokens for each period in `periods`), for periods
    given as :<period>_start / :<period>_end parameters."""
    columns = ",\n".join(
        f"""coalesce(sum(case when i.started_at >= :{p}_start and i.started_at < :{p}_end
                 then t.estimated_cost_usd end), 0),
       coalesce(sum(case when i.started_at >= :{p}_start and i.started_at < :{p}_end
                 then t.total_tokens end), 0)"""
        for p in periods
    )
    return f"""
select i.initiator_id,
       {columns}
from interceptions i join token_usages t on t.interception_id = i.id
where i.started_at >= :earliest and i.started_at < :latest
  and i.credential_kind = 'centralized' and i.initiator_id is not null
group by i.initiator_id
"""


@dataclass(frozen=True, slots=True)
class Seed:
    per_user: dict[tuple[str, Period, str], tuple[float, float]]
    confirmed: list[str]
    watermark: int


class SpendLog:
    """The log, read for governance. Not thread-safe: one thread owns it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._file: FileId | None = None  # (device, inode) of the file last seeded
        self.watermark = 0  # the last token_usages id read

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            uri = Path(self.path).resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("pragma busy_timeout = 2000")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def seed(
        self, windows: Mapping[Period, tuple[str, str]], pending_ids: Callable[[], list[str]]
    ) -> Seed:
        """Totals of the current periods (`windows`: period → (start, end) as recorded), in one
        snapshot with the pending ids it holds already and the newest row id.

        The pending ids are taken once the snapshot is open: an exchange pending after that
        cannot be in it, one pending before is looked up in it."""
        self.close()  # a fresh connection: the file may have been replaced since
        self._file = known_file_id(self.path)
        conn = self._connection()
        periods = tuple(windows)
        params: dict[str, str] = {}
        for period, (start, end) in windows.items():
            params[f"{period}_start"], params[f"{period}_end"] = start, end
        params["earliest"] = min(start for start, _ in windows.values())
        params["latest"] = max(end for _, end in windows.values())
        conn.execute("begin")
        try:
            watermark = conn.execute("select coalesce(max(id), 0) from token_usages").fetchone()[0]
            ids = pending_ids()
            per_user: dict[tuple[str, Period, str], tuple[float, float]] = {}
            for row in conn.execute(period_sums_sql(periods), params):
                for n, period in enumerate(periods):
                    usd, tokens = row[1 + 2 * n], row[2 + 2 * n]
                    if usd or tokens:
                        per_user[(row[0], period, windows[period][0])] = (float(usd), float(tokens))
            confirmed = [r[0] for r in conn.execute(_CONFIRMED, (_json_list(ids),))] if ids else []
        finally:
            conn.execute("commit")
        self.watermark = watermark
        return Seed(per_user, confirmed, watermark)

    def new_uses(self, limit: int = 50_000) -> list[Use] | None:
        """The uses the log gained since the last read, or None when it must be read whole
        again (its rows were renumbered: the file was replaced or emptied)."""
        if known_file_id(self.path) != self._file:
            # Replaced (mv new.db aibridge.db), deleted or recreated since the last seed (or
            # never seeded): an open connection still reads the old file, and the watermark
            # says nothing about the new one.
            self.close()
            return None
        conn = self._connection()
        conn.execute("begin")
        try:
            newest = conn.execute("select coalesce(max(id), 0) from token_usages").fetchone()[0]
            if newest < self.watermark:
                return None
            uses: list[Use] = []
            last = self.watermark
            for row_id, interception_id, user_id, started_at, usd, tokens in conn.execute(
                _NEW_ROWS + f" limit {int(limit)}", (self.watermark,)
            ):
                last = row_id
                uses.append(Use(interception_id, user_id, started_at, float(usd), int(tokens)))
            # Rows that are not the bridge's spend still move the mark past them.
            self.watermark = newest if len(uses) < limit else last
        finally:
            conn.execute("commit")
        return uses


def _json_list(items: list[str]) -> str:
    return orjson.dumps(items).decode()
