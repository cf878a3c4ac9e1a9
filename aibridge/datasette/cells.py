"""What the plugin makes of one cell of a bridge database's HTML pages (links between pages,
dollars) and of the words typed into prompt search: pure functions, no request machinery."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, urlsplit

from datasette.utils import tilde_encode

# Canned queries the links open (metadata.yaml), with the parameter each takes.
STORY: Final = ("interception_story", "interception_id")
SESSION_TURNS: Final = ("session_turns", "session_id")
USAGE_OF_USER: Final = ("usage_of_user", "user")
TOOL_CALL_RESULT: Final = ("tool_call_result", "call_id")

# Cents for amounts of a dollar and more; below, enough decimals for this many significant
# digits (a request costs $0.000034), up to a point where nothing real is that small.
_SIGNIFICANT: Final = 3
_MAX_DECIMALS: Final = 12

# A quoted phrase, or a run of characters that are neither space nor a quote.
_SEARCH_TERM: Final = re.compile(r'"([^"]*)"|([^\s"]+)')
# FTS5's unicode61 tokenizer keeps letters and digits; a term without any matches nothing.
_SEARCHABLE: Final = re.compile(r"[^\W_]")


def is_money_column(column: str) -> bool:
    return column == "cost" or column.endswith("_cost_usd")


def format_usd(amount: object) -> str | None:
    """``$1.23``, ``$0.000034``, ``$1,234.57``: never ``3.4e-05``. None for what is not a
    finite number (left to datasette)."""
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return None
    if isinstance(amount, float) and not math.isfinite(amount):
        return None
    size = abs(amount)
    if isinstance(size, int):
        text = f"{size:,}.00"  # exactly (".2f" would go through a float)
    elif size == 0 or size >= 1:
        text = f"{size:,.2f}"
    else:
        decimals = _SIGNIFICANT - 1 - math.floor(math.log10(size))
        text = f"{size:.{min(_MAX_DECIMALS, max(2, decimals))}f}"
        whole, _, fraction = text.partition(".")
        text = f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"
    # No "-$0.00" for an amount too small to show.
    negative = amount < 0 and text.strip("0.,") != ""
    return f"{'-' if negative else ''}${text}"


def escape_fts_prefix(query: str) -> str:
    """An FTS5 MATCH expression in which every word typed matches as a word prefix:
    ``hel wor`` is ``"hel"* "wor"*``, a quoted phrase ``"hello wor"`` is ``"hello wor"*``.
    Every term is quoted, so no operator (AND, OR, NOT, NEAR, ``-``, ``*``, ``^``, ``:``,
    parentheses) keeps its meaning and no input is a syntax error. Like datasette's own
    escape_fts, an unbalanced quote is closed at the end."""
    # SQLite ends a string at NUL: FTS5 would see an unterminated phrase.
    query = query.replace("\x00", " ")
    if query.count('"') % 2:
        query += '"'
    terms = [
        phrase or word
        for phrase, word in _SEARCH_TERM.findall(query)
        if _SEARCHABLE.search(phrase or word)
    ]
    # An empty phrase matches no row, without an error.
    return " ".join(f'"{term}"*' for term in terms) or '""'


@dataclass(frozen=True, slots=True)
class Place:
    """Where a cell is shown: its database's URL (datasette.urls.database, any name, the
    base_url included), its table (None on a query's page), and datasette's
    truncate_cells_html (0: never)."""

    database_url: str
    table: str | None
    truncate: int = 0

    def query(self, canned: tuple[str, str], value: str) -> str:
        name, parameter = canned
        return f"{self.database_url}/{name}?{parameter}={quote(value, safe='')}"

    def table_rows(self, table: str, column: str, value: str) -> str:
        return f"{self.database_url}/{table}?{quote(column)}={quote(value, safe='')}"

    def row(self, table: str, pk: str) -> str:
        return f"{self.database_url}/{table}/{tilde_encode(pk)}"


def link(href: str, text: str, title: str, truncate: int = 0) -> str:
    """An HTML link, every part escaped; the text shortened as datasette shortens cells."""
    if truncate and len(text) > truncate:
        text = text[:truncate] + "…"
    return f'<a href="{html.escape(href)}" title="{html.escape(title)}">{html.escape(text)}</a>'


def mitmweb_flow_url(mitmweb_url: object, flow_id: str) -> str | None:
    """The flow's page in the mitmweb UI the bridge noted, when that is an http(s) URL."""
    if not isinstance(mitmweb_url, str):
        return None
    base = mitmweb_url.strip().rstrip("/")
    try:
        parts = urlsplit(base)
    except ValueError:
        return None
    # Anything else (javascript:, data:, a relative path) is not a link to follow.
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return f"{base}/#/flows/{quote(flow_id, safe='')}/request"


def _text(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    return text if text.strip() else None


def _placeholder(text: str) -> bool:
    """The queries' stand-ins for no value, such as "(unauthenticated)" or "(none: …)"."""
    return text.startswith("(") and text.endswith(")")


def cell_html(
    column: str, value: object, place: Place, row_value: Callable[[str], object]
) -> str | None:
    """The HTML of one cell of a bridge database, or None to leave it to datasette.
    ``row_value(name)`` reads another column of the same row (None when it has none)."""
    if is_money_column(column):
        money = format_usd(value)
        return None if money is None else html.escape(money)
    on_query = place.table is None
    if column == "interception_id" and isinstance(value, dict):
        return _expanded_interception(value, place)
    text = _text(value)
    if text is None:
        return None
    cut = place.truncate
    if column == "interception_id" or (column == "id" and place.table == "interceptions"):
        return link(place.query(STORY, text), text, "The full story of this request", cut)
    if column == "client_session_id" or (column == "session" and on_query):
        if _placeholder(text):
            return None
        return link(place.query(SESSION_TURNS, text), text, "The turns of this session", cut)
    if column == "initiator_id" or (column == "user" and on_query):
        if _placeholder(text):
            return None
        return link(place.query(USAGE_OF_USER, text), text, "This person's usage", cut)
    if column == "call_id" and place.table in (None, "tool_usages"):
        title = "The turn that sent this call's result back"
        return link(place.query(TOOL_CALL_RESULT, text), text, title, cut)
    if column == "correlating_tool_call_id":
        href = place.table_rows("tool_usages", "call_id", text)
        return link(href, text, "The tool call whose result this request carried", cut)
    if column == "flow_id":
        href = mitmweb_flow_url(row_value("mitmweb_url"), text)
        return None if href is None else link(href, text, "This flow in mitmweb", cut)
    return None


def _expanded_interception(value: dict[object, object], place: Place) -> str | None:
    """A foreign key datasette expanded to ``{"value": id, "label": who}``: the label still
    links to the interceptions row, as datasette would, and the id to the request's story
    (only the story without a label)."""
    text = _text(value.get("value"))
    if text is None:
        return None
    story = link(place.query(STORY, text), text, "The full story of this request")
    label = _text(value.get("label"))
    if label is None or label == text:
        return story
    row = link(place.row("interceptions", text), label, "The request's row", place.truncate)
    return f"{row}&nbsp;<em>{story}</em>"
