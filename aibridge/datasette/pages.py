"""The metadata the plugin gives datasette for the bridge's databases, built from
metadata.yaml for any number of them, whatever their names: pure functions."""

from __future__ import annotations

import html
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import yaml

# A database with these tables was made by the bridge (schema.py's first migration).
BRIDGE_TABLES: Final = frozenset({"_migrations", "interceptions"})
# Who, what, when, status, tokens and cost first on the interceptions table's page.
FIRST_COLUMNS: Final = (
    "id",
    "started_at",
    "initiator_id",
    "api",
    "model",
    "client",
    "status",
    "http_status",
    "total_tokens",
    "estimated_cost_usd",
)
DASHBOARD: Final = "usage"
_NOT_IN_SLUG: Final = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Template:
    """metadata.yaml, read once per datasette; every use takes a fresh copy (datasette and
    datasette-dashboards change the dictionaries they are given)."""

    title: str
    description_html: str
    database: dict[str, Any]  # description and tables, for each bridge database
    queries: dict[str, Any]  # the report queries and the link queries
    dashboard: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BridgeDatabase:
    name: str
    url: str  # datasette.urls.database(name)
    dashboard: str  # its dashboard's slug
    dashboard_url: str | None  # None without datasette-dashboards


def load_template(text: str | None = None) -> Template:
    if text is None:
        text = (resources.files(__package__) / "metadata.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    database = data["database"]
    return Template(
        title=data["title"],
        description_html=data["description_html"],
        database={k: v for k, v in database.items() if k not in ("queries", "link_queries")},
        queries={**database["queries"], **database["link_queries"]},
        dashboard=data["dashboard"],
    )


def is_bridge_schema(tables: Collection[str]) -> bool:
    return set(tables) >= BRIDGE_TABLES


def column_order(columns: Sequence[str]) -> list[str]:
    """The interceptions table's columns, FIRST_COLUMNS first (those it has), then the rest
    in the table's order."""
    first = [c for c in FIRST_COLUMNS if c in columns]
    return first + [c for c in columns if c not in first]


def dashboard_slugs(names: Sequence[str]) -> dict[str, str]:
    """The first bridge database's dashboard is /-/dashboards/usage; each other one gets
    usage-<its name>, made URL-safe and unique."""
    slugs: dict[str, str] = {}
    for name in names:
        base = DASHBOARD
        if slugs:
            base = f"{DASHBOARD}-{_NOT_IN_SLUG.sub('-', name).strip('-') or 'db'}"
        slug, n = base, 2
        while slug in slugs.values():
            slug, n = f"{base}-{n}", n + 1
        slugs[name] = slug
    return slugs


def fresh(value: Any) -> Any:
    """A copy of the template's dictionaries and lists (the strings are shared)."""
    if isinstance(value, dict):
        return {k: fresh(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fresh(v) for v in value]
    return value


def handed_out(
    metadata: dict[str, Any],
    key: str | None = None,
    database: str | None = None,
    table: str | None = None,
) -> dict[str, Any]:
    """What one get_metadata call returns of site_metadata's answer. datasette asks for
    metadata hundreds of times per page, and deep-copies the answer for every table
    permission check: asked for one key (of one database, one table), the answer holds only
    what datasette.metadata() reads for it. It is fresh down to each table's dictionary, the
    levels datasette writes into (update_with_inherited_metadata adds keys to a database's);
    deeper levels are shared, and datasette only merges the local metadata (-m) into them,
    which writes the same values every time."""
    if key is not None:
        pruned = {k: v for k, v in metadata.items() if k == key}
        databases = metadata.get("databases", {})
        if key != "databases" and database in databases:
            of_database = databases[database]
            part = {k: v for k, v in of_database.items() if k == key}
            tables = of_database.get("tables", {})
            if key != "tables" and table in tables and key in tables[table]:
                part["tables"] = {table: {key: tables[table][key]}}
            pruned["databases"] = {database: part}
        metadata = pruned
    out = dict(metadata)
    if "databases" in out:
        out["databases"] = {
            name: {
                **of_database,
                **(
                    {"tables": {t: dict(m) for t, m in of_database["tables"].items()}}
                    if "tables" in of_database
                    else {}
                ),
            }
            for name, of_database in out["databases"].items()
        }
    if "plugins" in out:
        out["plugins"] = {name: dict(config) for name, config in out["plugins"].items()}
    return out


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _link(url: str, text: str) -> str:
    return f'<a href="{html.escape(url)}">{html.escape(text)}</a>'


def description_html(template: Template, databases: Sequence[BridgeDatabase]) -> str:
    """The home page's text, its links pointing at these databases and dashboards."""
    noun = "database" if len(databases) == 1 else "databases"
    named = f"the {_and([_link(d.url, d.name) for d in databases])} {noun}"
    boards = [(d.name, d.dashboard_url) for d in databases if d.dashboard_url is not None]
    if len(boards) == 1:
        dashboards = f" or the {_link(boards[0][1], 'usage dashboard')}"
    elif boards:
        dashboards = f" or their usage dashboards ({_and([_link(u, n) for n, u in boards])})"
    else:
        dashboards = ""
    text = template.description_html.replace("{databases}", named)
    return text.replace("{dashboards}", dashboards)


def dashboard(template: Template, database: str, title: str) -> dict[str, Any]:
    """datasette-dashboards' configuration of one database's dashboard: its charts and its
    filters' option queries name the database."""
    board = fresh(template.dashboard)
    board["title"] = title
    for part in (*board.get("charts", {}).values(), *board.get("filters", {}).values()):
        if "query" in part:
            part["db"] = database
    return board


def site_metadata(template: Template, databases: Sequence[BridgeDatabase]) -> dict[str, Any]:
    """What the plugin adds to datasette's metadata: nothing without a bridge database."""
    if not databases:
        return {}
    several = len(databases) > 1
    title = template.dashboard.get("title", "AI usage")
    return {
        "title": template.title,
        "description_html": description_html(template, databases),
        "databases": {d.name: fresh(template.database) for d in databases},
        "plugins": {
            "datasette-dashboards": {
                d.dashboard: dashboard(template, d.name, f"{title}: {d.name}" if several else title)
                for d in databases
                if d.dashboard_url is not None
            }
        },
    }
