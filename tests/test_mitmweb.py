"""AI Bridge in mitmweb (aibridge.mitmweb): the comment column by default, never over the
user's choice, and the comment of a bridged WebSocket; in taddons and in a real mitmweb."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from mitmproxy import optmanager
from mitmproxy.test import taddons, tflow
from mitmproxy.tools.web.webaddons import WebAddon

from aibridge.mitmweb import (
    COLUMN,
    OPTION,
    SOCKET_KEY,
    MitmwebDefaults,
    TurnEnd,
    add_turn,
    note_turn,
    show_comment_column,
    socket_comment,
)
from devtools.fake_upstream import FakeUpstream
from tests.harness import ADDON, PROVIDER_KEY, TOKENS, bridge_config, wait_for
from tests.ws_client import ResponsesSocket

MITMWEB = Path(sys.executable).parent / "mitmweb"
WEB_PASSWORD = "mitmweb-test-password"


def mitmweb_default() -> list[str]:
    with taddons.context(WebAddon()) as tctx:
        return list(tctx.options.web_columns)


# --------------------------------------------------------------------------- taddons


def test_comment_column_is_a_default_under_mitmweb() -> None:
    before = mitmweb_default()
    assert COLUMN not in before  # else there is nothing left to test here
    with taddons.context(WebAddon(), MitmwebDefaults()) as tctx:
        assert tctx.options.web_columns == [*before, COLUMN]
        # A default, not a value: mitmproxy does not count it as the user's setting.
        assert not tctx.options.has_changed(OPTION)
        assert tctx.options.default(OPTION) == [*before, COLUMN]


@pytest.mark.parametrize(
    "chosen",
    [
        ["path", "method"],
        ["tls", "icon", "path", "method", "status", "size", "time"],  # mitmweb's default, set
        [],
        ["comment", "path"],
        ["index", "timestamp", "quickactions", "version"],
    ],
)
def test_a_users_columns_are_kept(chosen: list[str]) -> None:
    # As --set or config.yaml do: the value is set before any script loads.
    with taddons.context(WebAddon()) as tctx:
        tctx.options.update(web_columns=chosen)
        tctx.master.addons.add(MitmwebDefaults())
        assert tctx.options.web_columns == chosen
        assert tctx.options.default(OPTION) == mitmweb_default()


def test_reset_brings_the_column_back_and_a_later_choice_wins() -> None:
    with taddons.context(WebAddon(), MitmwebDefaults()) as tctx:
        tctx.options.update(web_columns=["path"])
        assert tctx.options.web_columns == ["path"]
        tctx.options.reset()
        assert tctx.options.web_columns == [*mitmweb_default(), COLUMN]


def test_loading_again_adds_one_column_and_tells_subscribers() -> None:
    told: list[set[str]] = []
    with taddons.context(WebAddon()) as tctx:

        def changed(updated: set[str]) -> None:
            told.append(updated)

        tctx.options.changed.connect(changed)
        tctx.master.addons.add(MitmwebDefaults())
        assert {OPTION} in told  # what makes open mitmweb pages show the column
        told.clear()
        assert show_comment_column(tctx.options) is False  # a script reloaded
        assert tctx.options.web_columns.count(COLUMN) == 1
        assert told == []


def test_without_mitmweb_nothing_happens() -> None:
    with taddons.context(MitmwebDefaults()) as tctx:  # mitmdump's options: no web_columns
        assert OPTION not in tctx.options
        assert show_comment_column(tctx.options) is False
    assert show_comment_column(optmanager.OptManager()) is False


# ----------------------------------------------------------------------- socket comments


def test_socket_comment_counts_turns_tokens_and_cost() -> None:
    first = TurnEnd(
        "completed",
        model="gpt-5-codex",
        usage={"input_tokens": 1200, "cache_read_input_tokens": 800, "output_tokens": 300},
        cost_usd=0.0125,
    )
    tally = add_turn(None, first)
    assert socket_comment("alice", tally) == (
        "alice · gpt-5-codex · 1 turn, last completed · in 1200 (800 cached) / out 300 tokens"
        " · $0.0125"
    )
    second = TurnEnd(
        "failed",
        "server_error: the model broke",
        "gpt-5-codex",
        {"input_tokens": 100, "output_tokens": 0},
        0.0005,
    )
    tally = add_turn(tally, second)
    assert socket_comment("alice", tally) == (
        "alice · gpt-5-codex · 2 turns, last failed: server_error: the model broke"
        " · in 1300 (800 cached) / out 300 tokens · $0.0130"
    )
    # Unpriced usage is said, not counted as free; a refused turn has no tokens.
    tally = add_turn(tally, TurnEnd("completed", model="mystery", usage={"input_tokens": 5}))
    tally = add_turn(tally, TurnEnd("rejected", "the daily spend budget is used up"))
    assert socket_comment("alice", tally) == (
        "alice · mystery · 4 turns, last rejected: the daily spend budget is used up"
        " · in 1305 (800 cached) / out 300 tokens · $0.0130 (+1 unpriced)"
    )


def test_socket_comment_without_usage_or_model() -> None:
    tally = add_turn(None, TurnEnd("rejected", "WebSocket message is not valid JSON"))
    assert socket_comment("bob", tally) == (
        "bob · ? · 1 turn, last rejected: WebSocket message is not valid JSON"
    )
    tally = add_turn(tally, TurnEnd("error", "x" * 1000, usage={"output_tokens": 7}))
    comment = socket_comment("bob", tally)
    assert comment.startswith("bob · ? · 2 turns, last error: " + "x" * 160 + "…")
    assert len(comment) < 260
    assert comment.endswith("in 0 / out 7 tokens")  # unpriced only: no cost shown


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        [],
        "3 turns",
        {"turns": "7", "input_tokens": -5, "output_tokens": 2.5, "cost_usd": "1"},
        {"turns": True, "cached_tokens": None, "cost_usd": True, "model": 42},
        {"cost_usd": float("nan"), "unpriced_turns": "many"},
        {"cost_usd": float("inf"), "error": 5, "status": None},
    ],
)
def test_a_tally_that_is_not_ours_counts_as_none(garbage: Any) -> None:
    # A flow file can carry anything under the key: it counts as no turns, never raises.
    tally = add_turn(garbage, TurnEnd("completed", model="m", usage={"input_tokens": 3}))
    assert socket_comment("u", tally) == "u · m · 1 turn, last completed · in 3 / out 0 tokens"
    assert socket_comment("u", garbage if isinstance(garbage, dict) else {}).startswith("u · ")


def test_note_turn_keeps_the_tally_on_the_flow() -> None:
    flow = tflow.twebsocketflow()
    note_turn(flow, "alice", TurnEnd("completed", model="m", usage={"input_tokens": 2}))
    assert flow.marked == ""
    note_turn(flow, "alice", TurnEnd("incomplete", "max_output_tokens", "m"))
    assert flow.metadata[SOCKET_KEY]["turns"] == 2
    assert (
        flow.comment
        == "alice · m · 2 turns, last incomplete: max_output_tokens · in 2 / out 0 tokens"
    )
    assert flow.marked == ":warning:"
    # The tally is saved with the flow (-w): mitmproxy's serialisation takes it.
    assert flow.copy().metadata[SOCKET_KEY] == flow.metadata[SOCKET_KEY]


# ------------------------------------------------------------------------- real mitmweb


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mitmweb:
    """``mitmweb -s addon.py`` on loopback, its UI behind a known password."""

    def __init__(self, workdir: Path, config: dict[str, Any], *extra: str) -> None:
        self.workdir = workdir
        self.confdir = workdir / "mitmproxy-conf"
        self.confdir.mkdir(exist_ok=True)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "mitmweb.log"
        self.extra = list(extra)
        self.web_port = 0
        self.proxy_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mitmweb:
        self.web_port = free_port()
        args = [
            str(MITMWEB),
            "--set=web_open_browser=false",
            f"--set=web_password={WEB_PASSWORD}",
            "--web-host=127.0.0.1",
            f"--web-port={self.web_port}",
            "--listen-host=127.0.0.1",
            "--listen-port=0",
            f"--set=confdir={self.confdir}",
            "-s",
            str(ADDON),
            f"--set=aibridge_config={self.workdir / 'config.yaml'}",
            f"--set=aibridge_db={self.workdir / 'aibridge.db'}",
            *self.extra,
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "TEST_PROVIDER_KEY": PROVIDER_KEY},
            )
        try:
            wait_for(self._started, timeout=30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _started(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"mitmweb exited at start:\n{self.log()}")
        text = self.log()
        if "Web server listening" not in text or "proxy listening at" not in text:
            return False
        self.proxy_port = int(text.split("proxy listening at 127.0.0.1:")[1].split(".")[0])
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}{path}",
            headers={"authorization": f"Bearer {WEB_PASSWORD}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return orjson.loads(answer.read())

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_mitmweb_shows_comments_and_the_sockets_comment(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    with Mitmweb(tmp_path, bridge_config(upstream.url, websocket="bridge")) as web:
        columns = web.get("/options.json")[OPTION]
        assert columns["value"] == [*mitmweb_default(), COLUMN]
        assert columns["default"] == columns["value"]  # a default: the user's choice is free
        assert "AI Bridge: recording to" in web.log()  # the addon runs in this mitmweb

        ws = ResponsesSocket(
            f"http://127.0.0.1:{web.proxy_port}/openai/v1/responses",
            {"authorization": f"Bearer {TOKENS['alice']}", "session-id": uuid.uuid4().hex},
        )
        try:
            ws.send({"type": "response.create", "model": "fake-text", "input": "hello"})
            assert ws.until_terminal()[-1]["type"] == "response.completed"

            def comment() -> str | None:
                for flow in web.get("/flows.json"):
                    if flow.get("websocket") and "1 turn" in (flow.get("comment") or ""):
                        return flow["comment"]
                return None

            # What the browser is sent once the turn's last event passed.
            assert wait_for(comment) == (
                "alice · fake-text · 1 turn, last completed · in 24 / out 14 tokens"
            )
        finally:
            ws.close()


@pytest.mark.parametrize("where", ["--set", "config.yaml"])
def test_mitmweb_keeps_the_users_columns(
    upstream: FakeUpstream, tmp_path: Path, where: str
) -> None:
    chosen = ["index", "path", "status"]
    extra: list[str] = []
    if where == "--set":
        extra = [f"--set={OPTION}={column}" for column in chosen]  # a list: one --set each
    else:
        conf = tmp_path / "mitmproxy-conf"
        conf.mkdir()
        (conf / "config.yaml").write_text(yaml.safe_dump({OPTION: chosen}))
    with Mitmweb(tmp_path, bridge_config(upstream.url), *extra) as web:
        columns = web.get("/options.json")[OPTION]
        assert columns["value"] == chosen
        assert "AI Bridge: recording to" in web.log()
