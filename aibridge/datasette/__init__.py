"""The datasette plugin of the bridge's log, found through the package's ``datasette`` entry
point: ``datasette any-name.db`` is enough.

Every database with the bridge's schema (tables _migrations and interceptions), whatever its
file is called, gets the descriptions, facets, canned queries and dashboard of metadata.yaml;
_migrations is hidden; the interceptions page shows who, what, when, status, tokens and cost
first; cells link between pages (cells.py); costs read as dollars; prompt search matches word
prefixes. Databases without the schema are left alone.
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from datasette import hookimpl
from datasette.plugins import pm
from markupsafe import Markup

from aibridge.datasette import cells, pages

if TYPE_CHECKING:
    from datasette.app import Datasette

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

# The table whose HTML page shows who, what, when, status, tokens and cost first.
_INTERCEPTIONS = "interceptions"
# Parameters with which the person asked for columns (or a format) of their own.
_OWN_CHOICE = frozenset({"_col", "_nocol", "_format"})


@dataclass(frozen=True, slots=True)
class _Facts:
    """What one database is, as of its schema version."""

    schema_version: int
    bridge: bool
    interceptions_columns: tuple[str, ...] = ()


@dataclass(slots=True)
class _State:
    template: pages.Template
    dashboards: bool  # datasette-dashboards is installed
    facts: dict[str, _Facts] = field(default_factory=dict)
    # site_metadata, and the bridge databases it was built for.
    built: tuple[tuple[str, ...], dict[str, Any]] | None = None
    urls: dict[str, str] = field(default_factory=dict)  # datasette.urls.database, per name


def _database_url(datasette: Datasette, state: _State, name: str) -> str:
    # Worth keeping: datasette renders cells and reads metadata hundreds of times per page.
    url = state.urls.get(name)
    if url is None:
        url = state.urls[name] = str(datasette.urls.database(name))
    return url


# One state per Datasette (a process can hold several, as tests do); gone with it.
_STATES: weakref.WeakKeyDictionary[Datasette, _State] = weakref.WeakKeyDictionary()


def _state(datasette: Datasette) -> _State:
    state = _STATES.get(datasette)
    if state is None:
        installed = {getattr(p, "__name__", "") for p in pm.get_plugins()}
        state = _State(pages.load_template(), "datasette_dashboards" in installed)
        _STATES[datasette] = state
    return state


async def _facts(datasette: Datasette, name: str) -> _Facts | None:
    """The database's facts, read again when its schema changed (a bridge may create or
    migrate the file while datasette has it open)."""
    db = datasette.databases.get(name)
    if db is None or name == "_internal":
        return None
    state = _state(datasette)
    try:
        version = (await db.execute("PRAGMA schema_version")).first()[0]
        known = state.facts.get(name)
        if known is not None and known.schema_version == version:
            return known
        tables = [r[0] for r in await db.execute("select name from sqlite_master")]
        columns: tuple[str, ...] = ()
        if bridge := pages.is_bridge_schema(tables):
            info = await db.execute(f"PRAGMA table_info({_INTERCEPTIONS})")
            columns = tuple(r[1] for r in info)
    except sqlite3.Error:
        return None  # not a database datasette can read: nothing of ours to add
    facts = _Facts(version, bridge, columns)
    state.facts[name] = facts
    return facts


async def _refresh(datasette: Datasette) -> None:
    for name in list(datasette.databases):
        await _facts(datasette, name)


def _bridge_databases(datasette: Datasette) -> list[str]:
    state = _STATES.get(datasette)
    if state is None:
        return []
    return [
        name
        for name in datasette.databases
        if (facts := state.facts.get(name)) is not None and facts.bridge
    ]


def _is_bridge(datasette: Datasette, database: str | None) -> bool:
    state = _STATES.get(datasette)
    facts = None if state is None or database is None else state.facts.get(database)
    return facts is not None and facts.bridge


@hookimpl
def startup(datasette: Datasette) -> Callable[[], Awaitable[None]]:
    async def inner() -> None:
        await _refresh(datasette)

    return inner


@hookimpl
def get_metadata(
    datasette: Datasette, key: str | None, database: str | None, table: str | None
) -> dict[str, Any] | None:
    names = tuple(_bridge_databases(datasette))
    if not names:
        return None
    state = _state(datasette)
    if state.built is None or state.built[0] != names:
        slugs = pages.dashboard_slugs(names)
        found = [
            pages.BridgeDatabase(
                name,
                _database_url(datasette, state, name),
                slugs[name],
                str(datasette.urls.path(f"/-/dashboards/{slugs[name]}"))
                if state.dashboards
                else None,
            )
            for name in names
        ]
        state.built = (names, pages.site_metadata(state.template, found))
    return pages.handed_out(state.built[1], key, database, table)


@hookimpl
def canned_queries(
    datasette: Datasette, database: str, actor: dict[str, Any] | None
) -> Callable[[], Awaitable[dict[str, Any] | None]]:
    async def inner() -> dict[str, Any] | None:
        facts = await _facts(datasette, database)
        if facts is None or not facts.bridge:
            return None
        return pages.fresh(_state(datasette).template.queries)

    return inner


@hookimpl
def render_cell(
    row: Any, value: Any, column: str, table: str | None, database: str, datasette: Datasette
) -> Markup | None:
    if not _is_bridge(datasette, database):
        return None
    url = _database_url(datasette, _state(datasette), database)
    place = cells.Place(url, table, datasette.setting("truncate_cells_html") or 0)

    def row_value(name: str) -> object:
        try:
            return row[name]
        except (IndexError, KeyError, TypeError):  # sqlite3.Row, CustomRow: no such column
            return None

    shown = cells.cell_html(column, value, place, row_value)
    return None if shown is None else Markup(shown)


def _escape_fts(query: object) -> str:
    return cells.escape_fts_prefix("" if query is None else str(query))


# The last escape_fts registered on a connection is the one SQLite calls: trylast runs this
# after every other prepare_connection, datasette's own (sql_functions.py) and any plugin's.
@hookimpl(trylast=True)
def prepare_connection(conn: sqlite3.Connection, database: str, datasette: Datasette) -> None:
    if database in ("_internal", "_memory"):
        return
    try:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")]
    except sqlite3.Error:
        return
    if pages.is_bridge_schema(tables):
        conn.create_function("escape_fts", 1, _escape_fts, deterministic=True)


def _with_column_order(datasette: Datasette, scope: Scope) -> Scope:
    """The interceptions table's HTML page asks for its columns in pages.column_order, unless
    the person chose columns (or a format) themselves. JSON, CSV and row pages are left as
    they are."""
    state = _STATES.get(datasette)
    if state is None or scope.get("method", "GET") != "GET":
        return scope
    path = scope.get("path", "")
    for name in _bridge_databases(datasette):
        if path != datasette.urls.table(name, _INTERCEPTIONS):
            continue
        query = scope.get("query_string", b"")
        asked = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        if any(k in _OWN_CHOICE for k, _ in asked):
            return scope
        # datasette puts the primary key first by itself.
        order = pages.column_order(state.facts[name].interceptions_columns)
        added = urlencode([("_col", c) for c in order if c != "id"]).encode()
        return {**scope, "query_string": query + b"&" + added if query else added}
    return scope


def _with_database_route(datasette: Datasette, scope: Scope) -> Scope:
    """datasette-dashboards' charts fetch ``/{name}.json`` with the database's name as it is,
    not its route (tilde-encoded): a bridge database named ``team log`` would answer 404.
    Such a request goes to the route."""
    path = scope.get("path", "")
    base = datasette.urls.path("/")
    if not path.endswith(".json") or not path.startswith(base):
        return scope
    name = path[len(base) : -len(".json")]
    if "/" in name or name not in _bridge_databases(datasette):
        return scope
    route = str(datasette.urls.database(name, format="json"))
    if route == path:
        return scope
    return {**scope, "path": route, "raw_path": route.encode("ascii")}


@hookimpl
def asgi_wrapper(datasette: Datasette) -> Callable[[ASGIApp], ASGIApp]:
    def wrap(app: ASGIApp) -> ASGIApp:
        static = datasette.urls.path("/-/static")

        async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and not scope.get("path", "").startswith(static):
                # Before datasette reads any metadata: files opened, created or migrated
                # since the last request are recognised.
                await _refresh(datasette)
                scope = _with_column_order(datasette, _with_database_route(datasette, scope))
            await app(scope, receive, send)

        return wrapped

    return wrap
