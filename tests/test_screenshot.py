"""Real datasette serves the bridge's log with the plugin (aibridge/datasette/), from a file not
named aibridge.db; headless Chromium renders the home page, the usage page, a session's pages
(its turns, a turn's story, reached by their links) and the dashboard.

Chromium is Debian's ``chromium`` package (``apt-get install -y chromium``); set
AIBRIDGE_CHROMIUM to use another binary. Without it the test is skipped on a workstation, and
fails in CI (``CI`` set), where it must run. The README's screenshots are made here:

    AIBRIDGE_UPDATE_SCREENSHOTS=1 ./dev pytest tests/test_screenshot.py
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import subprocess
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from datasette.utils import tilde_encode

from devtools.mitmdump_process import REPO
from tests.harness import Datasette, required_program
from tests.test_datasette_queries import UsageLog, build_usage_log

SCREENSHOTS = REPO / "docs" / "screenshots"
# Any name: datasette names the database after the file, and the plugin follows.
DB_NAME = "team log 2025-06"
DB_URL = f"/{tilde_encode(DB_NAME)}"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# No network beyond loopback, no profile state, nothing running after the page is captured.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    if chosen := os.environ.get("AIBRIDGE_CHROMIUM"):
        return chosen
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    return required_program(find_chromium(), "Chromium", "chromium")


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> UsageLog:
    return build_usage_log(tmp_path_factory.mktemp("usage-log"))


@pytest.fixture(scope="module")
def datasette(log: UsageLog) -> Iterator[Datasette]:
    renamed = log.db_path.with_name(f"{DB_NAME}.db")
    source = sqlite3.connect(f"file:{log.db_path}?mode=ro", uri=True)
    copy = sqlite3.connect(renamed)
    try:
        source.backup(copy)
    finally:
        source.close()
        copy.close()
    # No -m: the plugin is found through its entry point.
    with Datasette(renamed) as ds:
        yield ds


class Browser:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.runs = 0

    def run(self, url: str, *args: str) -> str:
        self.runs += 1
        profile = self.workdir / f"profile-{self.runs}"
        done = subprocess.run(
            [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
        return done.stdout.decode(errors="replace")

    def dom(self, url: str, *args: str) -> str:
        """The page's DOM once its scripts ran (and their requests were answered)."""
        return self.run(url, "--dump-dom", *args)

    def screenshot(self, url: str, name: str, size: tuple[int, int], *args: str) -> Path:
        path = self.workdir / name
        self.run(url, f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", *args)
        assert path.exists(), f"no screenshot of {url}"
        if os.environ.get("AIBRIDGE_UPDATE_SCREENSHOTS"):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, SCREENSHOTS / name)
        return path


@pytest.fixture(scope="module")
def browser(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Browser:
    return Browser(chromium, tmp_path_factory.mktemp("chromium"))


class ResultTable(HTMLParser):
    """The cells of datasette's results table (``table.rows-and-columns``), row by row, the
    links in each cell, and every link of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[str] = []
        self.rows: list[list[str]] = []
        self.cell_links: list[list[list[str]]] = []  # per row, per cell: the hrefs
        self.links: list[str] = []
        self._in_table = self._in_body = False
        self._cell: list[str] | None = None
        self._hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        got = dict(attrs)
        classes = (got.get("class") or "").split()
        if tag == "a":
            self.links.append(got.get("href") or "")
            if self._cell is not None:
                self._hrefs.append(got.get("href") or "")
        elif tag == "table" and "rows-and-columns" in classes:
            self._in_table = True
        elif self._in_table and tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self.rows.append([])
            self.cell_links.append([])
        elif self._in_table and tag in ("td", "th"):
            self._cell, self._hrefs = [], []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            text = " ".join("".join(self._cell).split())
            (self.rows[-1] if self._in_body else self.headers).append(text)
            if self._in_body:
                self.cell_links[-1].append(self._hrefs)
            self._cell = None
        elif tag == "table":
            self._in_table = self._in_body = False

    def column(self, name: str) -> list[str]:
        at = self.headers.index(name)
        return [row[at] for row in self.rows]

    def links_of(self, name: str) -> list[list[str]]:
        at = self.headers.index(name)
        return [row[at] for row in self.cell_links]

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def png_facts(path: Path) -> tuple[int, int, int]:
    """Width, height and how many distinct byte values its image data holds."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def parsed(browser: Browser, url: str) -> ResultTable:
    table = ResultTable()
    table.feed(browser.dom(url))
    return table


def assert_drawn(shot: Path, size: tuple[int, int]) -> None:
    width, height, distinct = png_facts(shot)
    assert (width, height) == size
    assert distinct > 64, "the screenshot looks blank"


def test_home_page_on_any_file_name(browser: Browser, datasette: Datasette) -> None:
    url = f"{datasette.url}/"
    dom = browser.dom(url)
    assert "<h1>AI Bridge audit log</h1>" in dom
    page = ResultTable()
    page.feed(dom)
    # The description's links follow the file's name, as datasette routes it.
    assert DB_URL in page.links and "/-/dashboards/usage" in page.links
    assert f'the <a href="{DB_URL}">{DB_NAME}</a> database' in dom
    assert "/aibridge" not in page.links
    assert_drawn(browser.screenshot(url, "home.png", (1400, 520)), (1400, 520))


def test_usage_page_renders_its_rows(browser: Browser, datasette: Datasette, log: UsageLog) -> None:
    url = f"{datasette.url}{DB_URL}/usage_per_user_per_day"
    table = parsed(browser, url)
    assert table.headers[:4] == ["day", "user", "requests", "input_tokens"]
    assert "estimated_cost_usd" in table.headers
    # The same eight rows the canned query answers, in the same order.
    assert [(r[0], r[1], r[2]) for r in table.rows] == [
        ("2025-06-02", "(unauthenticated)", "2"),
        ("2025-06-02", "alice", "3"),
        ("2025-06-02", "bob", "4"),
        ("2025-06-02", "subscription:sk-a...oken", "1"),
        ("2025-06-01", "alice", "4"),
        ("2025-06-01", "bob", "3"),
        ("2025-05-31", "alice", "2"),
        ("2025-05-31", "bob", "2"),
    ]
    # In dollars: both APIs' fake-cached, 0.0007536 + 0.0053798 = 0.006133.
    assert table.column("estimated_cost_usd")[7] == "$0.00613"
    # A person leads to their usage; "(unauthenticated)" is nobody to follow.
    users = table.links_of("user")
    assert users[1] == [f"{DB_URL}/usage_of_user?user=alice"] and users[0] == []

    assert_drawn(browser.screenshot(url, "usage.png", (1400, 760)), (1400, 760))


def test_a_session_leads_to_its_turns_and_a_turn_to_its_story(
    browser: Browser, datasette: Datasette, log: UsageLog
) -> None:
    sessions_url = f"{datasette.url}{DB_URL}/sessions"
    sessions = parsed(browser, sessions_url)
    at = sessions.column("session").index("sess-alice")
    (turns_link,) = sessions.links_of("session")[at]
    assert turns_link == f"{DB_URL}/session_turns?session_id=sess-alice"
    assert_drawn(browser.screenshot(sessions_url, "sessions.png", (1400, 720)), (1400, 720))

    turns_url = f"{datasette.url}{turns_link}"
    turns = parsed(browser, turns_url)
    assert turns.column("kind") == ["prompt", "tool result"]
    assert turns.column("tools_called") == ["get_weather", ""]
    assert turns.column("estimated_cost_usd") == ["$0.000206", "$0.00023"]
    stories = turns.links_of("interception_id")
    assert stories == [
        [f"{DB_URL}/interception_story?interception_id={log.ids[i]}"] for i in (2, 3)
    ]
    assert turns.links_of("user")[0] == [f"{DB_URL}/usage_of_user?user=alice"]
    assert_drawn(browser.screenshot(turns_url, "session_turns.png", (1400, 560)), (1400, 560))

    story_url = f"{datasette.url}{stories[0][0]}"
    story = parsed(browser, story_url)
    assert story.column("what") == [
        "request",
        "prompt",
        "tool call: function_call",
        "tokens",
        "end",
    ]
    assert story.column("detail")[1] == "What's the weather in Paris?"
    assert "estimated $0.000206" in story.column("detail")[3]
    assert_drawn(browser.screenshot(story_url, "story.png", (1400, 760)), (1400, 760))


def test_dashboard_draws_the_charts(browser: Browser, datasette: Datasette, log: UsageLog) -> None:
    url = f"{datasette.url}/-/dashboards/usage"
    # Charts are drawn by scripts after their queries return: let them finish first.
    wait = "--virtual-time-budget=20000"
    dom = browser.dom(url, wait)
    conn = sqlite3.connect(f"file:{log.db_path}?mode=ro", uri=True)
    try:
        (total,) = conn.execute("select sum(estimated_cost_usd) from token_usages").fetchone()
    finally:
        conn.close()
    assert "Tokens per day and person" in dom
    assert f"${total:.4f}" in dom  # the metric, computed by the page from its query
    assert '"$,.4~f"' in dom  # the cost chart's axis, in dollars
    # vega-embed draws each of the four charts into a canvas of class "marks": their queries
    # reached the database, whose name needs encoding.
    assert dom.count('class="marks"') >= 4, dom[-2000:]

    shot = browser.screenshot(url, "dashboard.png", (1400, 1240), wait)
    assert_drawn(shot, (1400, 1240))
