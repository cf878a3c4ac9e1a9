"""The offline demo shows what a newcomer should see, as the README's "Offline demo" says: every
bridged API, every completed exchange priced, sessions of several turns as the clients identify
them, tool calls correlated with the turns that answer them, a budget refusal; its printed
commands name files that exist, its saved flows rebuild the log offline, and a second run into
the same folder starts from a clean log."""

from __future__ import annotations

import contextlib
import io
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import yaml

from devtools import demo
from tests.harness import query, replay_flows

APIS = {"responses", "messages", "chat_completions"}


@dataclass(frozen=True)
class DemoRun:
    out_dir: Path
    printed: str

    @property
    def db(self) -> Path:
        return self.out_dir / "demo.db"

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return query(self.db, sql, params)


def run_demo(out_dir: Path) -> DemoRun:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo.main(["--dir", str(out_dir)]) == 0
    return DemoRun(out_dir, printed.getvalue())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    return run_demo(tmp_path_factory.mktemp("demo") / "demo-run")


def interceptions(run: DemoRun) -> list[dict[str, Any]]:
    return run.rows(
        "select i.*, (select count(*) from token_usages t where t.interception_id = i.id) "
        "as usages, (select sum(t.estimated_cost_usd) from token_usages t "
        "where t.interception_id = i.id) as cost from interceptions i order by i.rowid"
    )


def test_the_log_has_another_name_and_every_api(run: DemoRun) -> None:
    assert not (run.out_dir / "aibridge.db").exists()
    config = yaml.safe_load((run.out_dir / "config.yaml").read_text())
    assert config["database"] == "demo.db"
    rows = interceptions(run)
    completed = {r["api"] for r in rows if r["status"] == "completed"}
    assert completed == APIS
    # One provider per API, each its own type.
    assert {(r["api"], r["provider"]) for r in rows if r["status"] == "completed"} == {
        ("responses", "openai"),
        ("messages", "anthropic"),
        ("chat_completions", "openai_compatible"),
    }
    # Responses: streamed, buffered, over Codex's WebSocket, reasoning, cached tokens.
    responses = [r for r in rows if r["api"] == "responses" and r["status"] == "completed"]
    assert {(r["streaming"], r["http_status"]) for r in responses} == {(1, 200), (0, 200), (1, 101)}
    assert run.rows("select 1 from token_usages where cache_read_input_tokens > 0")
    sources = {r["source"] for r in run.rows("select source from model_thoughts")}
    assert {"reasoning_summary", "thinking"} <= sources
    refused = {(r["api"], r["http_status"]) for r in rows if r["status"] == "rejected"}
    assert {("responses", 501), ("responses", 401), ("messages", 403)} <= refused
    # The Chat Completions turn that asked for no usage got it from the bridge.
    usage = [orjson.loads(r["metadata"] or "{}").get("stream_usage") for r in rows]
    assert "added by the bridge" in usage and "requested by the client" in usage


def test_every_completed_exchange_is_priced(run: DemoRun) -> None:
    completed = [r for r in interceptions(run) if r["status"] == "completed"]
    assert len(completed) >= 12
    unpriced = [r for r in completed if r["usages"] == 0 or not r["cost"] or r["cost"] <= 0]
    assert unpriced == []
    sources = run.rows("select distinct price_source from token_usages")
    assert sources == [{"price_source": "config"}]  # the demo's pricing.overrides
    # The printed cost per person is the log's.
    printed = run.printed.split("Estimated cost per person", 1)[1].split("\n\n", 1)[0]
    for user in demo.USERS:
        (spent,) = run.rows(
            "select sum(t.estimated_cost_usd) as usd from token_usages t join interceptions i "
            "on i.id = t.interception_id where i.initiator_id = ?",
            (user,),
        )
        line = next(line for line in printed.splitlines() if line.split()[:1] == [user])
        assert line.split()[-1] == f"${spent['usd']:.6f}"


def test_sessions_as_the_clients_identify_them(run: DemoRun) -> None:
    sessions = run.rows(
        "select client_session_id as id, group_concat(distinct client) as client, "
        "group_concat(distinct api) as api, count(*) as turns, "
        "sum(status = 'completed') as completed from interceptions "
        "where client_session_id is not null group by 1 order by 1"
    )
    long = {(s["id"], s["client"], s["api"]) for s in sessions if s["completed"] >= 3}
    assert long == {
        (demo.CODEX_SESSION, "Codex", "responses"),
        (demo.CLAUDE_SESSION, "Claude Code", "messages"),
        (demo.OPENCODE_SESSION, "OpenCode", "chat_completions"),
    }
    # Codex's session spans its HTTP turns and its WebSocket turn.
    statuses = run.rows(
        "select distinct http_status from interceptions where client_session_id = ?",
        (demo.CODEX_SESSION,),
    )
    assert sorted(r["http_status"] for r in statuses) == [101, 200]


def test_tool_calls_are_correlated_with_the_turn_that_answers_them(run: DemoRun) -> None:
    rows = interceptions(run)
    order = {r["id"]: n for n, r in enumerate(rows)}
    calls = run.rows(
        "select u.call_id, u.tool, u.interception_id, i.api from tool_usages u "
        "join interceptions i on i.id = u.interception_id"
    )
    answered = set()
    for later in rows:
        for call in calls:
            if later["correlating_tool_call_id"] == call["call_id"]:
                assert order[call["interception_id"]] < order[later["id"]]
                assert later["client_session_id"] is not None and later["status"] == "completed"
                answered.add((call["api"], call["tool"]))
    assert answered == {("responses", "shell"), ("messages", "Bash"), ("chat_completions", "bash")}


def test_a_spent_budget_is_refused_by_name(run: DemoRun) -> None:
    carol = run.rows(
        "select i.status, i.http_status, i.error, i.metadata, (select sum(t.estimated_cost_usd) "
        "from token_usages t where t.interception_id = i.id) as cost from interceptions i "
        "where i.initiator_id = ? order by i.rowid",
        (demo.BUDGET_USER,),
    )
    *spent, refused = carol
    assert spent and all(r["status"] == "completed" for r in spent)
    assert sum(r["cost"] for r in spent) >= demo.BUDGET_USD
    assert sum(r["cost"] for r in spent[:-1]) < demo.BUDGET_USD  # the last one crossed it
    assert (refused["status"], refused["http_status"]) == ("rejected", 403)
    assert "the daily spend budget of user carol is used up" in refused["error"]
    assert orjson.loads(refused["metadata"])["limit"]["limit"] == "spend_usd.day"
    budget = run.printed.split("Budget:", 1)[1]
    assert "warned: " in budget and "% of the daily spend budget of user carol" in budget
    assert "refused (spend_usd.day): 403 AI Bridge: the daily spend budget" in budget


def commands(printed: str) -> list[list[str]]:
    """The printed shell commands (continuation lines joined), as argument lists."""
    lines = printed.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.lstrip().startswith("./dev ")]


def test_printed_commands_name_files_that_exist(run: DemoRun) -> None:
    printed = {tuple(c[1:3]): c for c in commands(run.printed)}
    assert set(printed) == {
        ("datasette", str(run.db)),
        ("python", "-m"),
        ("mitmweb", "--rfile"),
        ("mitmdump", "-n"),
    }
    assert printed["python", "-m"][3:] == ["aibridge", "report", "--db", str(run.db)]
    for command in printed.values():
        assert (Path.cwd() / command[0]).is_file()  # ./dev, from the repository's root
        for arg in command[1:]:
            name = arg.rpartition("=")[2]
            if name.endswith("rebuilt.db"):  # what the rebuild writes
                assert not Path(name).exists() and Path(name).parent == run.out_dir
            elif name.endswith((".db", ".mitm", ".yaml", ".py")):
                assert (Path.cwd() / name).is_file(), arg
    mitmweb = printed["mitmweb", "--rfile"]
    assert mitmweb[3:] == [
        str(run.out_dir / "flows.mitm"),
        "-s",
        "addon.py",
        "--set",
        f"aibridge_config={run.out_dir / 'config.yaml'}",
    ]
    # The pages to open name a session and an interception the log holds.
    site = "http://127.0.0.1:8001/"  # datasette's default address
    urls = [urlsplit(word) for word in run.printed.split() if word.startswith(site)]
    paths = {url.path: parse_qs(url.query) for url in urls}
    assert set(paths) == {
        "/demo/sessions",
        "/demo/session_turns",
        "/demo/interception_story",
        "/-/dashboards/usage",
    }
    (session,) = paths["/demo/session_turns"]["session_id"]
    assert len(run.rows("select 1 from interceptions where client_session_id = ?", (session,))) > 3
    (story,) = paths["/demo/interception_story"]["interception_id"]
    assert run.rows("select 1 from tool_usages where interception_id = ?", (story,))


def test_saved_flows_rebuild_the_log_offline(run: DemoRun, tmp_path: Path) -> None:
    flows = (run.out_dir / "flows.mitm").read_bytes()
    assert b"demo-alice-" not in flows and b"demo-carol-" not in flows
    assert b"sk-demo-" not in flows
    rebuilt = tmp_path / "rebuilt.db"
    replay_flows(run.out_dir / "flows.mitm", run.out_dir / "config.yaml", rebuilt, tmp_path / "c")
    every_row = (
        "select id, initiator_id, provider_name, api, status, http_status, error, model, "
        "streaming, client_session_id, correlating_tool_call_id, credential_hint "
        "from interceptions where http_status is not 101 order by id"  # no WebSocket replay
    )
    # The same exchanges, refusals included, with the same ids.
    assert query(rebuilt, every_row) == run.rows(every_row)
    for table in ("token_usages", "tool_usages", "model_thoughts", "user_prompts"):
        count = (
            f"select count(*) as n from {table} t join interceptions i "
            "on i.id = t.interception_id where i.http_status is not 101"
        )
        assert query(rebuilt, count) == run.rows(count)


def test_a_second_run_starts_from_a_clean_log(run: DemoRun, tmp_path: Path) -> None:
    out_dir = tmp_path / "demo-run"
    shutil.copytree(run.out_dir, out_dir)
    (out_dir / "rebuilt.db").write_bytes((out_dir / "demo.db").read_bytes())  # a stale rebuild
    first = {r["id"] for r in run.rows("select id from interceptions")}
    again = run_demo(out_dir)
    second = {r["id"] for r in again.rows("select id from interceptions")}
    assert len(second) == len(first) and not second & first
    assert not (out_dir / "rebuilt.db").exists()
    budgets = again.rows("select count(*) as n from interceptions where status = 'rejected'")
    assert budgets == run.rows("select count(*) as n from interceptions where status = 'rejected'")
