"""The SQLite schema of the audit log: the one place that knows it (DESIGN.md §4).

The schema's history is a list of small named migrations, applied in order and
recorded in the `_migrations` table; `PRAGMA user_version` holds how many exist.
A change is a new migration appended below, never an edit of an applied one,
because databases in the field already ran the old ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import sqlite_utils

log = logging.getLogger(__name__)

Migration = Callable[[sqlite_utils.Database], None]

INTERCEPTIONS = "interceptions"
TOKEN_USAGES = "token_usages"
USER_PROMPTS = "user_prompts"
TOOL_USAGES = "tool_usages"
MODEL_THOUGHTS = "model_thoughts"
RECORDER_LOSSES = "recorder_losses"
BUDGETS = "budgets"
MIGRATIONS_TABLE = "_migrations"

# The tables the recorder accepts rows for; the rest are bookkeeping.
WRITABLE_TABLES = (
    INTERCEPTIONS,
    TOKEN_USAGES,
    USER_PROMPTS,
    TOOL_USAGES,
    MODEL_THOUGHTS,
    RECORDER_LOSSES,
    BUDGETS,
)

# The large free-text field of each table whose content the recorder may shed
# under memory pressure; rows of tables absent here are never shed.
CONTENT_FIELDS: dict[str, str] = {
    USER_PROMPTS: "prompt",
    MODEL_THOUGHTS: "content",
    TOOL_USAGES: "args",
}

MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register `fn` as the next migration; its name is its identity in `_migrations`."""
    if any(m.__name__ == fn.__name__ for m in MIGRATIONS):
        raise ValueError(f"duplicate migration name {fn.__name__!r}")
    MIGRATIONS.append(fn)
    return fn


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _child_of_interception(db: sqlite_utils.Database, name: str, columns: dict[str, type]) -> None:
    db[name].create(
        {"id": int, "interception_id": str, **columns},
        pk="id",
        foreign_keys=[("interception_id", INTERCEPTIONS, "id")],
        not_null=["interception_id"],
    )
    db[name].create_index(["interception_id"])


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db[INTERCEPTIONS].create(
        {
            "id": str,
            "flow_id": str,
            "started_at": str,
            "ended_at": str,
            "initiator_id": str,
            "provider": str,
            "provider_name": str,
            "api": str,
            "model": str,
            "response_model": str,
            "streaming": int,
            "client": str,
            "user_agent": str,
            "client_session_id": str,
            "correlating_tool_call_id": str,
            "previous_response_id": str,
            "credential_kind": str,
            "credential_hint": str,
            "http_status": int,
            "status": str,
            "error": str,
            "response_id": str,
            "malformed_events": int,
            "metadata": str,
        },
        pk="id",
    )
    for column in ("initiator_id", "started_at", "model", "status", "client_session_id"):
        db[INTERCEPTIONS].create_index([column])

    _child_of_interception(
        db,
        TOKEN_USAGES,
        {
            "response_id": str,
            "input_tokens": int,
            "cache_read_input_tokens": int,
            "cache_write_input_tokens": int,
            "uncached_input_tokens": int,
            "output_tokens": int,
            "reasoning_tokens": int,
            "total_tokens": int,
            "usage": str,
            "created_at": str,
        },
    )
    _child_of_interception(
        db,
        USER_PROMPTS,
        {"response_id": str, "prompt": str, "created_at": str},
    )
    # Triggers keep the index in step with every insert, so search never lags.
    db[USER_PROMPTS].enable_fts(["prompt"], create_triggers=True)
    _child_of_interception(
        db,
        TOOL_USAGES,
        {
            "response_id": str,
            "call_id": str,
            "tool": str,
            "type": str,
            "args": str,
            "injected": int,
            "server_url": str,
            "invocation_error": str,
            "created_at": str,
        },
    )
    _child_of_interception(
        db,
        MODEL_THOUGHTS,
        {"response_id": str, "source": str, "content": str, "created_at": str},
    )
    db[RECORDER_LOSSES].create(
        {
            "id": int,
            "happened_at": str,
            "table_name": str,
            "field": str,
            "rows": int,
            "reason": str,
        },
        pk="id",
        not_null=["happened_at", "table_name", "rows"],
    )


@migration
def m002_token_usage_cost(db: sqlite_utils.Database) -> None:
    # ADD COLUMN only rewrites the schema, never the rows: instant on a large log, and no
    # trigger or index is added, so inserts cost what they did.
    table = db[TOKEN_USAGES]
    table.add_column("estimated_cost_usd", float)
    table.add_column("price_source", str)
    table.add_column("price_version", str)
    table.add_column("priced_model", str)


@migration
def m003_prompts_indexed_per_batch(db: sqlite_utils.Database) -> None:
    # The recorder adds each batch's prompts to the search index in one statement
    # (INDEX_NEW_PROMPTS, same transaction): about a third of the cost of a trigger per
    # row. Updates and deletes (retention) keep their triggers.
    db.execute(f'DROP TRIGGER IF EXISTS "{USER_PROMPTS}_ai"')


@migration
def m004_token_usage_service_tier(db: sqlite_utils.Database) -> None:
    # The tier that served the request (default, flex, priority…): it sets the price.
    db[TOKEN_USAGES].add_column("service_tier", str)


@migration
def m005_budgets(db: sqlite_utils.Database) -> None:
    # The budgets that hold (limits live in the config, not the log): the bridge publishes
    # them so that reports can set spend against them (aibridge.governance.report).
    db[BUDGETS].create(
        {
            "id": str,  # "<scope>:<owner>:<metric>:<period>"
            "scope": str,
            "owner": str,
            "members": str,
            "metric": str,
            "period": str,
            "limit_value": float,
            "source": str,
            "time_zone": str,
            "period_start": str,
            "resets_at": str,
            "config_digest": str,
            "updated_at": str,
        },
        pk="id",
    )


# The prompts' full-text index, kept by the recorder: the largest prompt id before a batch,
# then, after the batch's rows, the rows above it (the batch holds the write lock, so they
# are exactly its own).
LAST_PROMPT_ID = f'SELECT coalesce(max(id), 0) FROM "{USER_PROMPTS}"'
INDEX_NEW_PROMPTS = (
    f'INSERT INTO "{USER_PROMPTS}_fts" (rowid, "prompt") '
    f'SELECT id, prompt FROM "{USER_PROMPTS}" WHERE id > ?'
)


# Every migration is registered above this line.
SCHEMA_VERSION = len(MIGRATIONS)


def applied_migrations(db: sqlite_utils.Database) -> list[str]:
    """Names of the migrations already applied to `db`, in the order they were applied."""
    if not db[MIGRATIONS_TABLE].exists():
        return []
    return [row[0] for row in db.execute(f"select name from [{MIGRATIONS_TABLE}] order by rowid")]


def _is_current(db: sqlite_utils.Database) -> bool:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    done = set(applied_migrations(db))
    return version >= SCHEMA_VERSION and all(m.__name__ in done for m in MIGRATIONS)


def _warn_newer(unknown: list[str]) -> None:
    # A newer aibridge migrated this file; it can still take the rows we know
    # how to write, so warn rather than refuse to start.
    log.warning("database has migrations this version does not know: %s", unknown)


def migrate(db: sqlite_utils.Database) -> None:
    """Bring `db` up to SCHEMA_VERSION; a database already there is left untouched.

    Runs in one IMMEDIATE transaction so that two processes starting at once
    cannot both apply the same migration, and a failure leaves nothing half-made.
    An up-to-date database is only read, so it opens even while read-only.
    """
    if db.conn.in_transaction:
        raise RuntimeError("migrate() must not run inside an open transaction")
    if _is_current(db):
        if unknown := sorted(set(applied_migrations(db)) - {m.__name__ for m in MIGRATIONS}):
            _warn_newer(unknown)
        return
    db.conn.execute("BEGIN IMMEDIATE")
    with db.conn:
        db[MIGRATIONS_TABLE].create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
        done = set(applied_migrations(db))
        known = {m.__name__ for m in MIGRATIONS}
        if unknown := sorted(done - known):
            _warn_newer(unknown)
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            fn(db)
            db[MIGRATIONS_TABLE].insert({"name": fn.__name__, "applied_at": _utc_now()})
            log.info("applied schema migration %s", fn.__name__)
        current = db.execute("PRAGMA user_version").fetchone()[0]
        if current < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
