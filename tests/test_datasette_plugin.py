"""The datasette plugin (aibridge/datasette/): found through its entry point by a real
``datasette`` (no -m), on logs the real bridge wrote and copied to names that are not
aibridge.db, two of them at once, beside a database without the bridge's schema.

Unit tests first (money, prompt search, links, metadata), then the hooks in one process,
then the pages a real datasette serves.
"""

from __future__ import annotations

import asyncio
import html
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlite_utils
from datasette.app import Datasette as DatasetteApp
from datasette.plugins import pm
from datasette.utils import tilde_encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aibridge.datasette as plugin
from aibridge.datasette import cells, pages
from aibridge.record import schema
from tests.harness import Datasette
from tests.test_datasette_queries import UsageLog, build_usage_log

fuzz = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# A name datasette must tilde-encode in every URL (space, parentheses), and a plain one.
TEAM = "Team log (Q2)"
SECOND = "second"
OTHER = "notes"  # no bridge schema: an interceptions table, but no _migrations
MITMWEB = "http://127.0.0.1:8081"
# Values a client controls (session ids, user ids from proxyauth, call ids, flow ids).
HOSTILE = (
    '"><script>alert(1)</script>',
    "o'brien & <b>co</b>",
    "名前 ☃ ü",
    "a b+c%20d&e=f#g?h/i;j",
    "~2F~tilde",
    "javascript:alert(1)",
)


def url_of(name: str) -> str:
    return f"/{tilde_encode(name)}"


# ------------------------------------------------------------------------------- money


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        (3.4e-05, "$0.000034"),
        (0.000034, "$0.000034"),
        (0.006133, "$0.00613"),
        (0.0053798, "$0.00538"),
        (0.0153, "$0.0153"),
        (0.123456, "$0.123"),
        (0.5, "$0.50"),
        (0.99999, "$1.00"),
        (1.23, "$1.23"),
        (1.005, "$1.00"),  # the float is 1.00499…
        (1234.567, "$1,234.57"),
        (2, "$2.00"),
        (0, "$0.00"),
        (0.0, "$0.00"),
        (-0.0, "$0.00"),
        (-0.25, "-$0.25"),
        (-3.4e-05, "-$0.000034"),
        (1e-13, "$0.00"),  # below any real price: no "-$0.00", no exponent
        (-1e-13, "$0.00"),
        (1e20, "$100,000,000,000,000,000,000.00"),
        (10**30, "$1,000,000,000,000,000,000,000,000,000,000.00"),
    ],
)
def test_format_usd(amount: float, shown: str) -> None:
    assert cells.format_usd(amount) == shown


@pytest.mark.parametrize(
    "value", [None, "", "0.5", "$1", b"\x00", True, False, float("nan"), float("inf"), -1e999]
)
def test_format_usd_leaves_what_is_not_a_finite_number(value: object) -> None:
    assert cells.format_usd(value) is None


@fuzz
@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**20), 10**20))
def test_format_usd_never_writes_an_exponent(amount: float) -> None:
    shown = cells.format_usd(amount)
    assert shown is not None
    assert "e" not in shown.lower() and shown.lstrip("-").startswith("$")
    digits = shown.lstrip("-$").replace(",", "")
    whole, fraction = digits.split(".")
    assert whole.isdigit() and fraction.isdigit() and len(fraction) >= 2
    # What is shown is the amount, to the digits shown.
    if abs(amount) < 1e15:
        assert abs(float(shown.replace("$", "").replace(",", "")) - amount) <= max(
            1e-12, abs(amount) * 5e-3
        )


@pytest.mark.parametrize(
    ("column", "money"),
    [
        ("estimated_cost_usd", True),
        ("cache_cost_usd", True),
        ("cost", True),
        ("costs", False),
        ("cost_usd_total", False),
        ("estimated_cost", False),
        ("total_tokens", False),
    ],
)
def test_money_columns(column: str, money: bool) -> None:
    assert cells.is_money_column(column) is money


# ------------------------------------------------------------------------ prompt search


PROMPTS = (
    "hello world",
    "What's the weather in Paris?",
    "Größe über alles",
    "naïve café",
    "don't stop",
    "x-ray vision NEAR the end",
    "日本語のテキスト",
)


@pytest.fixture(scope="module")
def fts() -> Iterator[sqlite3.Connection]:
    """An FTS5 index built the way schema.py builds the prompts' (sqlite-utils' defaults)."""
    conn = sqlite3.connect(":memory:")
    conn.execute("create virtual table prompts using fts5(prompt)")
    conn.executemany("insert into prompts values (?)", [(p,) for p in PROMPTS])
    yield conn
    conn.close()


def found(conn: sqlite3.Connection, typed: str) -> list[str]:
    match = cells.escape_fts_prefix(typed)
    return [
        r[0] for r in conn.execute("select prompt from prompts where prompts match ?", (match,))
    ]


@pytest.mark.parametrize(
    ("typed", "expression"),
    [
        ("hel wor", '"hel"* "wor"*'),
        ("  hel\t\nwor  ", '"hel"* "wor"*'),
        ('"hello wor"', '"hello wor"*'),
        ('"hello wor', '"hello wor"*'),  # an unbalanced quote closed at the end
        ('ab"cd ef"', '"ab"* "cd ef"*'),
        ("hel*", '"hel*"*'),
        ("a OR b", '"a"* "OR"* "b"*'),
        ("NEAR(a b)", '"NEAR(a"* "b)"*'),
        ("-x", '"-x"*'),
        ("", '""'),
        ("   ", '""'),
        ('""', '""'),
        ("* - () ^ : +", '""'),  # nothing a tokenizer keeps
        ("hel\x00wor", '"hel"* "wor"*'),
    ],
)
def test_escape_fts_prefix(typed: str, expression: str) -> None:
    assert cells.escape_fts_prefix(typed) == expression


@pytest.mark.parametrize(
    ("typed", "hits"),
    [
        ("hel wor", ["hello world"]),
        ("wor hel", ["hello world"]),
        ("HEL", ["hello world"]),
        ('"hello wor"', ["hello world"]),
        ('"world hel"', []),  # a phrase keeps its order
        ("wea pari", ["What's the weather in Paris?"]),
        ("what's", ["What's the weather in Paris?"]),
        ("grö üb", ["Größe über alles"]),
        ("cafe", ["naïve café"]),  # unicode61 folds diacritics
        ("x-ra", ["x-ray vision NEAR the end"]),
        ("NEAR", ["x-ray vision NEAR the end"]),  # a word, not the operator
        ("日本", ["日本語のテキスト"]),
        ("hel zzz", []),
        ("", []),
    ],
)
def test_prefix_search_finds_word_prefixes(
    fts: sqlite3.Connection, typed: str, hits: list[str]
) -> None:
    assert found(fts, typed) == hits


# Everything FTS5 reads as syntax, alone and around words.
FTS_SYNTAX = [
    '"',
    '""',
    '"""',
    "*",
    "**",
    "-",
    "+",
    "^",
    ":",
    "(",
    ")",
    "()",
    "NEAR",
    "NEAR(",
    "NEAR(a b, 2)",
    "AND",
    "OR",
    "NOT",
    "a AND",
    "OR b",
    "NOT NOT",
    "prompt:hel",
    "{prompt}: hel",
    "hel*",
    "*hel",
    "^hel",
    "a + b",
    "'",
    "''",
    "\\",
    "\x00",
    "\x00\x00hel",
    'a\x00"b',
    "\ufeff",
    "\u2028hel",
]


@pytest.mark.parametrize("typed", FTS_SYNTAX + [f"hel {s} wor" for s in FTS_SYNTAX])
def test_prefix_search_never_fails_on_fts_syntax(fts: sqlite3.Connection, typed: str) -> None:
    found(fts, typed)  # no sqlite3.OperationalError (fts5: syntax error)


@fuzz
@given(st.text())
def test_prefix_search_never_fails(fts: sqlite3.Connection, typed: str) -> None:
    found(fts, typed)


@fuzz
@given(st.lists(st.sampled_from(["hello", "world", "weather", "paris", "naïve"]), min_size=1))
def test_every_typed_prefix_finds_its_words(fts: sqlite3.Connection, words: list[str]) -> None:
    """Any prefix of the words of a prompt finds that prompt."""
    typed = " ".join(w[: max(1, len(w) // 2)] for w in words)
    hits = found(fts, typed)
    for prompt in PROMPTS:
        lowered = prompt.lower()
        if all(w in lowered for w in words):
            assert prompt in hits


# ------------------------------------------------------------------------------- links


TABLE = cells.Place("/Team+log+~28Q2~29", "interceptions")
QUERY = cells.Place("/Team+log+~28Q2~29", None)


def nothing(name: str) -> object:
    return None


@dataclass
class Anchor:
    href: str
    title: str
    text: str


class Anchors(HTMLParser):
    """Every <a> of a piece of HTML, and the text outside them."""

    def __init__(self) -> None:
        super().__init__()
        self.anchors: list[Anchor] = []
        self.outside: list[str] = []
        self._open: Anchor | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            got = dict(attrs)
            self._open = Anchor(got.get("href") or "", got.get("title") or "", "")
        elif tag not in ("em",):
            raise AssertionError(f"unexpected <{tag}>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._open is not None:
            self.anchors.append(self._open)
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open.text += data
        else:
            self.outside.append(data)


def anchors(shown: str | None) -> list[Anchor]:
    assert shown is not None
    parser = Anchors()
    parser.feed(shown)
    parser.close()
    return parser.anchors


def target(href: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(href)
    return parts.path, parse_qs(parts.query, keep_blank_values=True)


@pytest.mark.parametrize(
    ("column", "place", "path", "parameter"),
    [
        ("interception_id", TABLE, "interception_story", "interception_id"),
        ("interception_id", QUERY, "interception_story", "interception_id"),
        ("id", TABLE, "interception_story", "interception_id"),
        ("client_session_id", TABLE, "session_turns", "session_id"),
        ("session", QUERY, "session_turns", "session_id"),
        ("initiator_id", TABLE, "usage_of_user", "user"),
        ("user", QUERY, "usage_of_user", "user"),
        ("call_id", cells.Place("/x", "tool_usages"), "tool_call_result", "call_id"),
        ("call_id", QUERY, "tool_call_result", "call_id"),
        ("correlating_tool_call_id", TABLE, "tool_usages", "call_id"),
    ],
)
@pytest.mark.parametrize("value", ["sess-alice", "c0ffee", *HOSTILE])
def test_cell_links(column: str, place: cells.Place, path: str, parameter: str, value: str) -> None:
    (a,) = anchors(cells.cell_html(column, value, place, nothing))
    assert a.text == value
    assert target(a.href) == (f"{place.database_url}/{path}", {parameter: [value]})
    assert a.title


@pytest.mark.parametrize(
    ("column", "place"),
    [
        ("id", QUERY),  # an id on a query's page may be anything
        ("id", cells.Place("/x", "token_usages")),
        ("session", TABLE),
        ("user", TABLE),
        ("call_id", cells.Place("/x", "elsewhere")),
        ("prompt", TABLE),
        ("status", QUERY),
    ],
)
def test_other_cells_are_left_to_datasette(column: str, place: cells.Place) -> None:
    assert cells.cell_html(column, "value", place, nothing) is None


@pytest.mark.parametrize("column", ["client_session_id", "session", "initiator_id", "user"])
@pytest.mark.parametrize(
    "value", ["(unauthenticated)", "(none: alice 2025-06-02)", "(unknown)", "", "   ", None, b"x"]
)
def test_placeholders_and_empty_values_are_not_links(column: str, value: object) -> None:
    assert cells.cell_html(column, value, QUERY, nothing) is None


def test_an_integer_id_is_a_link_and_a_float_or_bool_is_not() -> None:
    (a,) = anchors(cells.cell_html("interception_id", 42, QUERY, nothing))
    assert target(a.href)[1] == {"interception_id": ["42"]}
    assert cells.cell_html("interception_id", 4.2, QUERY, nothing) is None
    assert cells.cell_html("interception_id", True, QUERY, nothing) is None


@pytest.mark.parametrize(
    ("mitmweb", "flow"),
    [
        (MITMWEB, f"{MITMWEB}/#/flows/f10w-1/request"),
        (f"{MITMWEB}/", f"{MITMWEB}/#/flows/f10w-1/request"),
        (
            " https://mitm.example:8443/base/ ",
            "https://mitm.example:8443/base/#/flows/f10w-1/request",
        ),
        ("HTTP://127.0.0.1:8081", "HTTP://127.0.0.1:8081/#/flows/f10w-1/request"),
    ],
)
def test_flow_links_to_mitmweb(mitmweb: str, flow: str) -> None:
    row = {"mitmweb_url": mitmweb}.get
    (a,) = anchors(cells.cell_html("flow_id", "f10w-1", TABLE, row))
    assert (a.href, a.text) == (flow, "f10w-1")


@pytest.mark.parametrize(
    "mitmweb",
    [
        None,
        "",
        "javascript:alert(1)",
        "JavaScript://127.0.0.1/%0aalert(1)",
        "data:text/html,<script>alert(1)</script>",
        "//127.0.0.1:8081",
        "127.0.0.1:8081",
        "http://",
        "http://[::1",  # urlsplit refuses it
        "ftp://127.0.0.1",
        42,
    ],
)
def test_flow_without_a_usable_mitmweb_is_plain_text(mitmweb: object) -> None:
    row = {"mitmweb_url": mitmweb}.get
    assert cells.cell_html("flow_id", "f10w-1", TABLE, row) is None


@pytest.mark.parametrize("flow_id", HOSTILE)
def test_hostile_flow_ids_stay_inside_the_fragment(flow_id: str) -> None:
    (a,) = anchors(cells.cell_html("flow_id", flow_id, TABLE, {"mitmweb_url": MITMWEB}.get))
    parts = urlsplit(a.href)
    assert (parts.scheme, parts.netloc, parts.path, parts.query) == (
        "http",
        "127.0.0.1:8081",
        "/",
        "",
    )
    assert parts.fragment.startswith("/flows/") and parts.fragment.endswith("/request")
    assert parts.fragment.count("/") == 3 and a.text == flow_id


def test_an_expanded_foreign_key_links_to_the_row_and_the_story() -> None:
    place = cells.Place("/db", "token_usages")
    row, story = anchors(
        cells.cell_html("interception_id", {"value": "id/1", "label": "alice"}, place, nothing)
    )
    assert (row.href, row.text) == ("/db/interceptions/id~2F1", "alice")
    assert target(story.href) == ("/db/interception_story", {"interception_id": ["id/1"]})
    assert story.text == "id/1"
    # Without a label (an unknown caller's request) only the story, as a plain id would.
    for label in (None, "", "id/1"):
        (only,) = anchors(
            cells.cell_html("interception_id", {"value": "id/1", "label": label}, place, nothing)
        )
        assert only.href == story.href
    assert cells.cell_html("interception_id", {"value": None, "label": "x"}, place, nothing) is None


def test_long_values_are_shortened_as_datasette_shortens_cells() -> None:
    value = "s" * 5000
    (a,) = anchors(cells.cell_html("session", value, cells.Place("/db", None, 100), nothing))
    assert a.text == "s" * 100 + "…"
    assert target(a.href)[1] == {"session_id": [value]}  # the link keeps all of it


def test_costs_are_dollars_in_tables_and_queries() -> None:
    for place in (TABLE, QUERY):
        assert cells.cell_html("estimated_cost_usd", 3.4e-05, place, nothing) == "$0.000034"
        assert cells.cell_html("cost", 1.5, place, nothing) == "$1.50"
        assert cells.cell_html("estimated_cost_usd", None, place, nothing) is None
        assert cells.cell_html("estimated_cost_usd", "n/a", place, nothing) is None


# ---------------------------------------------------------------------------- metadata


TEMPLATE = pages.load_template()


def test_the_template_has_every_query_and_no_database_name() -> None:
    assert set(TEMPLATE.queries) >= {
        "usage_per_user_per_day",
        "interception_story",
        "session_turns",
        "usage_of_user",
        "tool_call_result",
    }
    assert len(TEMPLATE.queries) == len(schema.REPORT_VIEWS) + 2  # the link queries: no view
    # The links' queries, with the parameter each link gives.
    for name, parameter in (cells.STORY, cells.SESSION_TURNS, cells.USAGE_OF_USER):
        assert f":{parameter}" in TEMPLATE.queries[name]["sql"], name
    name, parameter = cells.TOOL_CALL_RESULT
    assert f":{parameter}" in TEMPLATE.queries[name]["sql"]
    assert "/aibridge" not in TEMPLATE.description_html
    assert "{databases}" in TEMPLATE.description_html
    bookkeeping = {"_migrations", "_writer_progress"}
    assert all(TEMPLATE.database["tables"][n]["hidden"] is True for n in bookkeeping)
    assert not any(
        t.get("hidden") for n, t in TEMPLATE.database["tables"].items() if n not in bookkeeping
    )
    charts = TEMPLATE.dashboard["charts"].values()
    assert all("db" not in c for c in charts)


@pytest.mark.parametrize(
    ("columns", "order"),
    [
        (
            ["id", "flow_id", "started_at", "ended_at", "initiator_id", "provider", "api",
             "model", "client", "http_status", "status", "metadata", "total_tokens",
             "estimated_cost_usd", "mitmweb_url"],
            ["id", "started_at", "initiator_id", "api", "model", "client", "status",
             "http_status", "total_tokens", "estimated_cost_usd", "flow_id", "ended_at",
             "provider", "metadata", "mitmweb_url"],
        ),
        # Before m007: no totals, the rest in the same order.
        (
            ["id", "flow_id", "started_at", "initiator_id", "api", "model", "status"],
            ["id", "started_at", "initiator_id", "api", "model", "status", "flow_id"],
        ),
        (["zzz", "id"], ["id", "zzz"]),
        ([], []),
    ],
)  # fmt: skip
def test_column_order(columns: list[str], order: list[str]) -> None:
    assert pages.column_order(columns) == order


@pytest.mark.parametrize(
    ("names", "slugs"),
    [
        (["aibridge"], ["usage"]),
        (["Team log (Q2)"], ["usage"]),
        (["a", "Team log (Q2)", "b"], ["usage", "usage-Team-log-Q2", "usage-b"]),
        (["a", "b", "b!", "b?"], ["usage", "usage-b", "usage-b-2", "usage-b-3"]),
        (["a", "usage", "???"], ["usage", "usage-usage", "usage-db"]),
    ],
)
def test_dashboard_slugs(names: list[str], slugs: list[str]) -> None:
    assert list(pages.dashboard_slugs(names).values()) == slugs


def bridge(name: str, dashboards: bool = True) -> pages.BridgeDatabase:
    slug = "usage" if name == TEAM else f"usage-{name}"
    return pages.BridgeDatabase(
        name, url_of(name), slug, f"/-/dashboards/{slug}" if dashboards else None
    )


def test_site_metadata_for_one_database() -> None:
    meta = pages.site_metadata(TEMPLATE, [bridge(TEAM)])
    assert set(meta) == {"title", "description_html", "databases", "plugins"}
    assert list(meta["databases"]) == [TEAM]
    assert 'the <a href="/Team+log+~28Q2~29">Team log (Q2)</a> database' in meta["description_html"]
    assert 'or the <a href="/-/dashboards/usage">usage dashboard</a>' in meta["description_html"]
    (board,) = meta["plugins"]["datasette-dashboards"].values()
    assert board["title"] == "AI usage"
    queried = [*board["charts"].values(), *board["filters"].values()]
    assert {p.get("db") for p in queried if "query" in p} == {TEAM}
    assert all("db" not in p for p in queried if "query" not in p)  # the date filters


def test_site_metadata_for_several_databases_and_none() -> None:
    hostile = '<b>"x"</b> & y'
    meta = pages.site_metadata(TEMPLATE, [bridge(TEAM), bridge(SECOND), bridge(hostile)])
    text = meta["description_html"]
    assert 'the <a href="/Team+log+~28Q2~29">Team log (Q2)</a>, ' in text
    assert (
        f' and <a href="{html.escape(url_of(hostile))}">{html.escape(hostile)}</a> databases'
        in text
    )
    assert '<b>"x"' not in text
    assert "their usage dashboards (" in text
    boards = meta["plugins"]["datasette-dashboards"]
    assert {b["title"] for b in boards.values()} == {
        f"AI usage: {n}" for n in (TEAM, SECOND, hostile)
    }
    # Without datasette-dashboards: no link to a dashboard that is not there.
    bare = pages.site_metadata(TEMPLATE, [bridge(TEAM, dashboards=False)])
    assert "dashboard" not in bare["description_html"]
    assert bare["plugins"]["datasette-dashboards"] == {}
    assert pages.site_metadata(TEMPLATE, []) == {}


def lookup(metadata: dict[str, Any], key: str, database: str | None, table: str | None) -> Any:
    """What datasette.metadata(key, database, table) finds in one source (app.py)."""
    databases = metadata.get("databases") or {}
    search = []
    if database is not None:
        search.append(databases.get(database) or {})
    if table is not None:
        search.insert(0, ((databases.get(database) or {}).get("tables") or {}).get(table) or {})
    search.append(metadata)
    return next((item[key] for item in search if key in item), None)


@pytest.mark.parametrize(
    "key",
    ["title", "description_html", "databases", "tables", "description", "facets", "columns",
     "label_column", "sort_desc", "hidden", "plugins", "queries", "allow", "source"],
)  # fmt: skip
@pytest.mark.parametrize(
    ("database", "table"),
    [(None, None), (TEAM, None), (TEAM, "interceptions"), (TEAM, "_migrations"),
     (TEAM, "nope"), (SECOND, "token_usages"), ("elsewhere", None), ("elsewhere", "x")],
)  # fmt: skip
def test_a_pruned_answer_finds_what_the_whole_one_does(
    key: str, database: str | None, table: str | None
) -> None:
    whole = pages.site_metadata(TEMPLATE, [bridge(TEAM), bridge(SECOND)])
    pruned = pages.handed_out(whole, key, database, table)
    assert lookup(pruned, key, database, table) == lookup(whole, key, database, table)
    assert pages.handed_out(whole) == whole


def test_what_datasette_writes_into_an_answer_stays_there() -> None:
    whole = pages.site_metadata(TEMPLATE, [bridge(TEAM)])
    given_out = pages.handed_out(whole)
    given_out["databases"][TEAM]["source"] = "written by datasette"
    given_out["databases"][TEAM]["tables"]["interceptions"]["extra"] = 1
    given_out["plugins"]["datasette-dashboards"]["mine"] = {}
    given_out["title"] = "changed"
    assert pages.handed_out(whole) == pages.site_metadata(TEMPLATE, [bridge(TEAM)])


# ----------------------------------------------------------------- hooks, in one process


@dataclass
class Files:
    team: Path
    second: Path
    other: Path
    hostile: Path
    ids: list[str] = field(default_factory=list)


def copy_database(source: Path, to: Path) -> sqlite3.Connection:
    copy = sqlite3.connect(to)
    reading = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        reading.backup(copy)
    finally:
        reading.close()
    return copy


def make_other(path: Path) -> None:
    """A database without the bridge's schema whose names look like the bridge's."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "create table interceptions (id text primary key, zz text, client_session_id text, "
            "initiator_id text, estimated_cost_usd real, flow_id text, mitmweb_url text)"
        )
        conn.execute(
            "insert into interceptions values ('i1', 'z', 'sess-1', 'alice', 3.4e-05, 'f1', ?)",
            (MITMWEB,),
        )
        conn.execute("create table notes (id integer primary key, body text)")
        conn.execute("insert into notes values (1, 'hello world')")
    conn.close()
    sqlite_utils.Database(path)["notes"].enable_fts(["body"])


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> UsageLog:
    return build_usage_log(tmp_path_factory.mktemp("usage-log"), chat_completions=True)


@pytest.fixture(scope="module")
def files(log: UsageLog, tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("files")
    got = Files(d / f"{TEAM}.db", d / f"{SECOND}.db", d / f"{OTHER}.db", d / "hostile.db")
    got.ids = log.ids
    conn = copy_database(log.db_path, got.team)
    with conn:
        # Exchange 0 went through mitmweb; 1 names a mitmweb that is not a web page.
        conn.execute("update interceptions set mitmweb_url = ? where id = ?", (MITMWEB, log.ids[0]))
        conn.execute(
            "update interceptions set mitmweb_url = 'javascript:alert(1)' where id = ?",
            (log.ids[1],),
        )
    conn.close()
    copy_database(log.db_path, got.second).close()
    make_other(got.other)
    conn = copy_database(log.db_path, got.hostile)
    with conn:
        for k, value in enumerate(HOSTILE):
            i = log.ids[k]
            conn.execute(
                "update interceptions set client_session_id = ?, initiator_id = ?, "
                "correlating_tool_call_id = ?, flow_id = ?, mitmweb_url = ? where id = ?",
                (value, value, value, value, f"{MITMWEB}/", i),
            )
        conn.execute("update tool_usages set call_id = ? where rowid = 1", (HOSTILE[0],))
        conn.execute("update interceptions set initiator_id = '' where id = ?", (log.ids[10],))
    conn.close()
    return got


def test_prepare_connection_runs_after_every_other(files: Files) -> None:
    """SQLite keeps the escape_fts registered last on a connection, and pluggy calls the
    plugins registered last first: registered after datasette's own sql_functions (as a
    plugin loaded from --plugins-dir would be), ours still runs after it."""
    name = pm.get_name(plugin)
    pm.unregister(plugin)
    pm.register(plugin, name)

    async def escaped(ds: DatasetteApp, database: str) -> str:
        result = await ds.get_database(database).execute("select escape_fts('hel wor')")
        return result.first()[0]

    async def run() -> tuple[str, str]:
        ds = DatasetteApp([str(files.team), str(files.other)])
        await ds.invoke_startup()
        return await escaped(ds, TEAM), await escaped(ds, OTHER)

    ours, theirs = asyncio.run(run())
    assert ours == '"hel"* "wor"*'
    assert theirs == '"hel" "wor"'  # datasette's, on a database without the bridge's schema


def test_a_schema_made_after_datasette_opened_the_file_is_recognised(tmp_path: Path) -> None:
    """An empty file (the bridge not started yet) is left alone until the bridge migrates it."""
    path = tmp_path / "later.db"
    sqlite3.connect(path).close()

    async def run() -> tuple[list[str], list[str], str | None]:
        ds = DatasetteApp([str(path)])
        await ds.invoke_startup()
        before = (await ds.client.get("/later.json")).json()["queries"]
        db = sqlite_utils.Database(path)
        schema.migrate(db)
        db.close()
        after = (await ds.client.get("/later.json")).json()["queries"]
        return [q["name"] for q in before], [q["name"] for q in after], ds.metadata("title")

    before, after, title = asyncio.run(run())
    assert before == []
    assert {"interception_story", "usage_of_user", "tool_call_result"} <= set(after)
    assert title == "AI Bridge audit log"


# --------------------------------------------------------------- a real datasette serves


@pytest.fixture(scope="module")
def served(files: Files) -> Iterator[Datasette]:
    # Found through the entry point: no -m, no --plugins-dir.
    with Datasette(files.team, str(files.second), str(files.other), str(files.hostile)) as ds:
        yield ds


@dataclass
class Cell:
    text: str
    links: list[tuple[str, str]]  # (href, text)


class Page(HTMLParser):
    """A datasette page: its results table's columns and cells, and every link."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[str] = []
        self.rows: list[dict[str, Cell]] = []
        self.links: list[str] = []
        self._in_table = False
        self._cell: tuple[str, Cell] | None = None
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        got = dict(attrs)
        classes = (got.get("class") or "").split()
        column = next((c[4:] for c in classes if c.startswith("col-")), None)
        if tag == "table" and "rows-and-columns" in classes:
            self._in_table = True
        elif self._in_table and tag == "th" and column is not None:
            self.headers.append(got.get("data-column") or column)
        elif self._in_table and tag == "tr" and self.headers:
            self.rows.append({})
        elif self._in_table and tag == "td" and column is not None:
            self._cell = (column, Cell("", []))
        elif tag == "a":
            self._href = got.get("href") or ""
            self.links.append(self._href)
            if self._cell is not None:
                self._cell[1].links.append((self._href, ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            column, cell = self._cell
            cell.text = " ".join(cell.text.split())
            self.rows[-1][column] = cell
            self._cell = None
        elif tag == "a":
            self._href = None
        elif tag == "table":
            self._in_table = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            cell = self._cell[1]
            cell.text += data
            if self._href is not None and cell.links:
                href, text = cell.links[-1]
                cell.links[-1] = (href, text + data)


def fetch(ds: Datasette, path: str, **params: str) -> httpx.Response:
    response = httpx.get(f"{ds.url}{path}", params=params, timeout=30)
    assert response.status_code == 200, (path, params, response.text[-2000:])
    return response


def page(ds: Datasette, path: str, **params: str) -> Page:
    parsed = Page()
    parsed.feed(fetch(ds, path, **params).text)
    return parsed


def rows(ds: Datasette, path: str, **params: str) -> list[dict[str, Any]]:
    return fetch(ds, f"{path}.json", **params, _shape="array").json()


def follow(ds: Datasette, href: str) -> Page:
    """Open a link as a browser would: relative to the server, with its query."""
    assert href.startswith("/") and not href.startswith("//"), href
    parsed = Page()
    response = httpx.get(f"{ds.url}{href}", timeout=30)
    assert response.status_code == 200, (href, response.text[-2000:])
    parsed.feed(response.text)
    return parsed


def test_the_plugin_is_found_through_its_entry_point(served: Datasette) -> None:
    plugins = fetch(served, "/-/plugins.json").json()
    (ours,) = [p for p in plugins if p["name"] == "aibridge"]
    assert {"get_metadata", "canned_queries", "render_cell", "prepare_connection"} <= set(
        ours["hooks"]
    )
    home = fetch(served, "/").text
    assert "<title>AI Bridge audit log: " in home and "<h1>AI Bridge audit log</h1>" in home
    # The description's links name the databases as datasette routes them.
    assert f'canned query</b> of the <a href="{url_of(TEAM)}">{TEAM}</a>, ' in home
    assert "Pages link to each other" in home
    assert "/aibridge" not in page(served, "/").links


def test_every_bridge_database_gets_the_queries_and_descriptions(served: Datasette) -> None:
    for name in (TEAM, SECOND, "hostile"):
        about = fetch(served, f"{url_of(name)}.json").json()
        names = {q["name"] for q in about["queries"]}
        assert names == set(TEMPLATE.queries), name
        assert "One row in interceptions per request" in fetch(served, url_of(name)).text
        tables = fetch(served, f"{url_of(name)}/token_usages").text
        assert "Estimated cost in US dollars" in tables, name
    home = page(served, "/")
    assert {url_of(TEAM), url_of(SECOND), url_of("hostile")} <= set(home.links)
    meta = fetch(served, "/-/metadata.json").json()
    assert set(meta["databases"]) == {TEAM, SECOND, "hostile"}


def test_each_bridge_database_has_its_dashboard(served: Datasette, files: Files) -> None:
    home = page(served, "/")
    boards = {"/-/dashboards/usage": TEAM, "/-/dashboards/usage-second": SECOND}
    assert set(boards) <= set(home.links)
    for path, name in boards.items():
        text = fetch(served, path).text
        assert f"AI usage: {name}" in text
        chart = page(served, f"{path}/total-cost")
        # The chart's "view the query" link goes to its own database.
        assert any(link.startswith(f"{url_of(name)}?sql=") for link in chart.links), chart.links
    # The charts fetch /{name}.json with the name as it is: the plugin sends it to the route.
    sql = "select count(*) as n from interceptions"
    for name in (TEAM, SECOND):
        response = httpx.get(
            f"{served.url}/{name}.json", params={"sql": sql, "_shape": "array"}, timeout=30
        )
        assert response.json() == [{"n": len(files.ids)}], name


def test_a_database_without_the_schema_is_left_alone(served: Datasette, files: Files) -> None:
    # The bridge's database beside it has the plugin's pages...
    assert fetch(served, f"{url_of(TEAM)}.json").json()["queries"]
    bridge_row = page(served, f"{url_of(TEAM)}/interceptions", id=files.ids[5]).rows[0]
    assert bridge_row["initiator_id"].links and bridge_row["estimated_cost_usd"].text.startswith(
        "$"
    )
    # ...this one has none.
    about = fetch(served, f"/{OTHER}.json").json()
    assert about["queries"] == []
    assert "One row in interceptions per request" not in fetch(served, f"/{OTHER}").text
    table = page(served, f"/{OTHER}/interceptions")
    # Its own column order, no links of ours, no dollars.
    assert table.headers == [
        "id",
        "zz",
        "client_session_id",
        "initiator_id",
        "estimated_cost_usd",
        "flow_id",
        "mitmweb_url",
    ]
    (row,) = table.rows
    assert row["estimated_cost_usd"].text == "3.4e-05"
    assert row["client_session_id"].links == [] and row["initiator_id"].links == []
    assert row["flow_id"].links == []
    # datasette's own search: whole words only.
    assert rows(served, f"/{OTHER}/notes", _search="hel") == []
    assert len(rows(served, f"/{OTHER}/notes", _search="hello")) == 1


def test_bookkeeping_is_hidden(served: Datasette) -> None:
    about = fetch(served, f"{url_of(TEAM)}.json").json()
    hidden = {t["name"]: t["hidden"] for t in about["tables"]}
    assert hidden["_migrations"] is True
    assert hidden["user_prompts_fts"] is True  # datasette hides FTS tables itself
    for shown in ("interceptions", "token_usages", "recorder_losses", "budgets", "user_prompts"):
        assert hidden[shown] is False, shown
    # The database page lists it only when asked for the hidden tables.
    link = f'<a href="{url_of(TEAM)}/_migrations">_migrations</a>'
    text = fetch(served, url_of(TEAM)).text
    assert link not in text and f"{sum(hidden.values())} hidden tables" in text
    assert f"{link}<em> (hidden)</em>" in fetch(served, url_of(TEAM), _show_hidden="1").text


FIRST = [
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
]


def test_interceptions_show_who_what_when_first(served: Datasette, files: Files) -> None:
    conn = sqlite3.connect(f"file:{files.team}?mode=ro", uri=True)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(interceptions)")]
    conn.close()
    table = page(served, f"{url_of(TEAM)}/interceptions")
    assert table.headers[: len(FIRST)] == FIRST
    assert sorted(table.headers) == sorted(columns)
    # Sorting, filters and the next page keep the order.
    for params in ({"_sort": "started_at"}, {"api": "messages"}, {"_size": "2"}):
        assert page(served, f"{url_of(TEAM)}/interceptions", **params).headers[:10] == FIRST
    # The person's own choice of columns wins.
    assert page(served, f"{url_of(TEAM)}/interceptions", _col="status").headers == ["id", "status"]
    assert page(served, f"{url_of(TEAM)}/interceptions", _nocol="flow_id").headers == [
        c for c in columns if c != "flow_id"
    ]
    # The JSON API and CSV keep the table's order.
    (first,) = rows(served, f"{url_of(TEAM)}/interceptions", _size="1")
    assert list(first) == columns
    csv = fetch(served, f"{url_of(TEAM)}/interceptions.csv", _size="1").text
    assert csv.splitlines()[0].split(",") == columns
    # Other tables keep theirs.
    assert page(served, f"{url_of(TEAM)}/token_usages").headers[:3] == [
        "id",
        "interception_id",
        "response_id",
    ]


def test_a_session_leads_to_its_turns_and_each_turn_to_its_story(
    served: Datasette, files: Files
) -> None:
    db = url_of(TEAM)
    sessions = page(served, f"{db}/sessions")
    (alice,) = [r for r in sessions.rows if r["session"].text == "sess-alice"]
    ((href, text),) = alice["session"].links
    assert href == f"{db}/session_turns?session_id=sess-alice" and text == "sess-alice"
    turns = follow(served, href)
    assert [r["turn"].text for r in turns.rows] == ["1", "2"]
    stories = [r["interception_id"].links[0][0] for r in turns.rows]
    assert stories == [f"{db}/interception_story?interception_id={files.ids[i]}" for i in (2, 3)]
    # The user cell leads to their usage.
    assert turns.rows[0]["user"].links == [(f"{db}/usage_of_user?user=alice", "alice")]
    story = follow(served, stories[0])
    assert [r["what"].text for r in story.rows] == [
        "request",
        "prompt",
        "tool call: function_call",
        "tokens",
        "end",
    ]
    assert "$0.000206" in story.rows[3]["detail"].text  # the query's own text, 6 places
    usage = follow(served, turns.rows[0]["user"].links[0][0])
    assert {r["day"].text for r in usage.rows} == {"2025-05-31", "2025-06-01", "2025-06-02"}


def test_a_tool_call_leads_to_the_turn_that_answered_it(served: Datasette, files: Files) -> None:
    db = url_of(TEAM)
    calls = page(served, f"{db}/tool_usages")
    answered_by = {}
    for row in calls.rows:
        ((href, _),) = row["call_id"].links
        path, query = target(href)
        assert path == f"{db}/tool_call_result" and query == {"call_id": [row["call_id"].text]}
        (answer,) = follow(served, href).rows
        answered_by[row["tool"].text] = answer["interception_id"].links[0][1]
    assert answered_by == {
        "get_weather": files.ids[3],
        "Bash": files.ids[14],
        "read": files.ids[22],
    }
    # And back: the answer's correlating_tool_call_id leads to the call.
    turn = page(served, f"{db}/interceptions", id=files.ids[3])
    ((href, call_id),) = turn.rows[0]["correlating_tool_call_id"].links
    (call,) = follow(served, href).rows
    assert call["call_id"].text == call_id and call["tool"].text == "get_weather"


def test_every_interception_id_leads_to_its_story(served: Datasette, files: Files) -> None:
    db = url_of(TEAM)
    story = f"{db}/interception_story?interception_id={files.ids[2]}"
    # A foreign key datasette expanded: the person links to the row, the id to the story.
    usages = page(served, f"{db}/token_usages", interception_id=files.ids[2])
    assert usages.rows[0]["interception_id"].links == [
        (f"{db}/interceptions/{files.ids[2]}", "alice"),
        (story, files.ids[2]),
    ]
    # On a query's page, and on the interception's own row page.
    failed = page(served, f"{db}/failed_requests")
    assert all(
        r["interception_id"].links[0][0].startswith(f"{db}/interception_story?")
        for r in failed.rows
    )
    row_page = page(served, f"{db}/interceptions/{files.ids[2]}")
    assert row_page.rows[0]["id"].links == [(story, files.ids[2])]


def test_a_flow_links_to_mitmweb_where_the_bridge_knew_it(served: Datasette, files: Files) -> None:
    db = url_of(TEAM)
    flow_ids = {r["id"]: r["flow_id"] for r in rows(served, f"{db}/interceptions", _size="max")}

    def flow_cell(i: int) -> Cell:
        return page(served, f"{db}/interceptions/{files.ids[i]}").rows[0]["flow_id"]

    assert flow_cell(0).links == [
        (f"{MITMWEB}/#/flows/{flow_ids[files.ids[0]]}/request", flow_ids[files.ids[0]])
    ]
    assert flow_cell(1).links == []  # javascript:… is no mitmweb
    assert flow_cell(2).links == []  # recorded under mitmdump
    assert flow_cell(1).text == flow_ids[files.ids[1]]


def test_costs_are_dollars_in_html_and_numbers_in_json(served: Datasette, files: Files) -> None:
    db = url_of(TEAM)
    per_day = page(served, f"{db}/usage_per_user_per_day")
    bob = per_day.rows[-1]
    assert (bob["day"].text, bob["user"].text) == ("2025-05-31", "bob")
    assert bob["estimated_cost_usd"].text == "$0.00613"
    assert rows(served, f"{db}/usage_per_user_per_day")[-1]["estimated_cost_usd"] == 0.006133
    # gpt-5-mini's list price of exchange 5: 24 in x $0.25/M + 14 out x $2/M.
    table = page(served, f"{db}/interceptions", id=files.ids[5])
    assert table.rows[0]["estimated_cost_usd"].text == "$0.000034"
    assert rows(served, f"{db}/interceptions", id=files.ids[5])[0]["estimated_cost_usd"] == 3.4e-05
    usages = page(served, f"{db}/token_usages", _size="max")
    shown = [r["estimated_cost_usd"].text for r in usages.rows]
    assert all(s == "" or s.startswith("$0.0") for s in shown), shown
    turns = page(served, f"{db}/session_turns", session_id="sess-alice")
    assert turns.rows[1]["estimated_cost_usd"].text == "$0.00023"  # r6(COST["tool_result"])


@pytest.mark.parametrize(
    ("typed", "prompts"),
    [
        ("rele not", ["Draft the release notes"]),
        ("not rele", ["Draft the release notes"]),
        ("wea PAR", ["What's the weather in Paris?"]),
        ('"the rel"', ["Draft the release notes"]),
        ("summ sty", ["Summarise the style guide"]),
    ],
)
def test_prompt_search_matches_word_prefixes(
    served: Datasette, typed: str, prompts: list[str]
) -> None:
    for name in (TEAM, SECOND):
        found = rows(served, f"{url_of(name)}/user_prompts", _search=typed)
        assert [r["prompt"] for r in found] == prompts
        by_column = rows(served, f"{url_of(name)}/user_prompts", _search_prompt=typed)
        assert [r["prompt"] for r in by_column] == prompts


@pytest.mark.parametrize(
    "typed",
    ['"', '"rele', "*", "rele*", "NEAR(rele not)", "rele OR", "AND", "NOT rele", "-rele",
     "()", "(rele", "prompt:rele", "^rele", "'", "\x00", "rele\x00not", "", " ", "名前 ☃"],
)  # fmt: skip
def test_prompt_search_never_fails(served: Datasette, typed: str) -> None:
    for page_format in ("", ".json"):
        response = httpx.get(
            f"{served.url}{url_of(TEAM)}/user_prompts{page_format}",
            params={"_search": typed},
            timeout=30,
        )
        assert response.status_code == 200, (typed, response.text[-1000:])
        assert "fts5" not in response.text


def test_hostile_values_are_escaped_and_encoded(served: Datasette, files: Files) -> None:
    db = url_of("hostile")
    raw = fetch(served, f"{db}/interceptions", _size="max").text
    assert "<script>alert(1)</script>" not in raw and "<b>co</b>" not in raw
    table = page(served, f"{db}/interceptions", _size="max")
    by_id = {r["id"].text: r for r in table.rows}
    for k, value in enumerate(HOSTILE):
        row = by_id[files.ids[k]]
        for column, path, parameter in (
            ("client_session_id", "session_turns", "session_id"),
            ("initiator_id", "usage_of_user", "user"),
            ("correlating_tool_call_id", "tool_usages", "call_id"),
        ):
            cell = row[column]
            ((href, text),) = cell.links
            assert text == value and cell.text == value, (column, value)
            assert target(href) == (f"{db}/{path}", {parameter: [value]}), (column, value)
        ((flow, text),) = row["flow_id"].links
        assert text == value
        assert flow.startswith(f"{MITMWEB}/#/flows/") and flow.endswith("/request")
        # Each link opens the page of that very value.
        turns = follow(served, row["client_session_id"].links[0][0])
        assert [r["interception_id"].links[0][1] for r in turns.rows] == [files.ids[k]]
        usage = follow(served, row["initiator_id"].links[0][0])
        assert sum(int(r["requests"].text) for r in usage.rows) == 1
    # An empty user id is no link.
    assert by_id[files.ids[10]]["initiator_id"].links == []
    calls = page(served, f"{db}/tool_usages")
    hostile_call = next(r for r in calls.rows if r["call_id"].text == HOSTILE[0])
    ((href, _),) = hostile_call["call_id"].links
    assert target(href) == (f"{db}/tool_call_result", {"call_id": [HOSTILE[0]]})
    answered = follow(served, href)
    assert [r["interception_id"].links[0][1] for r in answered.rows] == [files.ids[0]]
