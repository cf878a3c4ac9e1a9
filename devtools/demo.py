"""An offline demo: a fake provider, the real bridge, every bridged API, a summary.

    ./dev python -m devtools.demo [--dir demo-run]

Everything runs on loopback; nothing leaves the machine. Three people use the bridge the way
their tools do: alice works in Codex (OpenAI Responses, over HTTP and Codex's WebSocket) and
OpenCode (Chat Completions), bob in Claude Code (Anthropic Messages) and the openai SDK, and
carol spends her small daily budget until the bridge refuses her. The audit log (demo.db), the
bridge's config.yaml and the saved flows (flows.mitm) stay in the output folder, to be opened
in datasette and mitmweb.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import socket
import sqlite3
import textwrap
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anthropic
import openai
import orjson
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage

from devtools.fake_upstream import FakeUpstream
from devtools.mitmdump_process import ADDON, REPO, MitmdumpProcess, local_bridge_config

USERS = ("alice", "bob", "carol")
BUDGET_USER = "carol"
BUDGET_USD = 0.04  # a day's spend: two of carol's Messages calls below
DB_NAME = "demo.db"  # not aibridge.db: the datasette plugin reads any file of the bridge's
FLOWS = "flows.mitm"
REBUILT = "rebuilt.db"
# What a run leaves; removed first, so that every run starts from a clean log.
OUTPUTS = (FLOWS, *(name + end for name in (DB_NAME, REBUILT) for end in ("", "-wal", "-shm")))
# Negotiated rates (pricing.overrides) for the fake models, which have no list price.
PRICING: dict[str, Any] = {
    "overrides": {
        "fake-text": {"input_per_mtok": 2, "output_per_mtok": 8, "cached_input_per_mtok": 0.5},
        "fake-cached": {
            "input_per_mtok": 1,
            "cached_input_per_mtok": 0.1,
            "cache_write_per_mtok": 1.25,
            "output_per_mtok": 4,
        },
        "fake-reasoning": {"input_per_mtok": 3, "output_per_mtok": 12, "reasoning_per_mtok": 6},
        "fake-tool*": {"input_per_mtok": 1, "output_per_mtok": 5},
        "fake-thinking": {
            "input_per_mtok": 3,
            "cached_input_per_mtok": 0.3,
            "cache_write_per_mtok": 3.75,
            "output_per_mtok": 15,
        },
    }
}
# Fixed session ids in the clients' own formats, so that the printed links work on every run.
CODEX_SESSION = str(uuid.uuid5(uuid.NAMESPACE_URL, "aibridge-demo/codex"))
CLAUDE_SESSION = str(uuid.uuid5(uuid.NAMESPACE_URL, "aibridge-demo/claude-code"))
OPENCODE_SESSION = "ses_" + uuid.uuid5(uuid.NAMESPACE_URL, "aibridge-demo/opencode").hex[:26]
SESSION_NAMES = {CODEX_SESSION: "codex", CLAUDE_SESSION: "claude", OPENCODE_SESSION: "opencode"}
# The headers by which the bridge tells these clients and their sessions (aibridge/clients.py).
CODEX_HEADERS = {
    "originator": "codex_cli_rs",
    "user-agent": "codex_cli_rs/0.171.0 (Debian 13; x86_64) demo",
    "session-id": CODEX_SESSION,
}
CLAUDE_HEADERS = {
    "user-agent": "claude-cli/2.1.332 (external, cli)",
    "x-claude-code-session-id": CLAUDE_SESSION,
}
OPENCODE_HEADERS = {
    "user-agent": "opencode/1.18.33 ai-sdk/provider-utils/4.0.23 runtime/bun/1.3.14",
    "x-session-affinity": OPENCODE_SESSION,
}
SHELL_TOOL = {  # Codex's shell tool, as it declares it
    "type": "function",
    "name": "shell",
    "description": "Runs a shell command and returns its output.",
    "strict": False,
    "parameters": {
        "type": "object",
        "properties": {
            "command": {"type": "array", "items": {"type": "string"}},
            "workdir": {"type": "string"},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
}
BASH_TOOL = {  # Claude Code's Bash tool, shortened
    "name": "Bash",
    "description": "Executes a bash command.",
    "input_schema": {
        "type": "object",
        "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
        "required": ["command"],
    },
}
OPENCODE_BASH_TOOL = {  # OpenCode's shell tool, in Chat Completions' form
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a shell command.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
            "additionalProperties": False,
        },
    },
}
API_TITLES = {
    "responses": "OpenAI Responses",
    "messages": "Anthropic Messages",
    "chat_completions": "OpenAI Chat Completions",
}


def noon_zone() -> str:
    """A time zone in which it is about noon now: the demo's budget day cannot end mid-run."""
    offset = datetime.now(UTC).hour - 12  # Etc/GMT+N is N hours behind UTC
    return "UTC" if offset == 0 else f"Etc/GMT{offset:+d}"


def demo_config(upstream_url: str) -> dict[str, Any]:
    """One provider per API, all served by the one fake; carol has a daily spend budget."""
    key = "${DEMO_PROVIDER_KEY:-}"
    tokens = {user: f"${{DEMO_TOKEN_{user.upper()}:-}}" for user in USERS}
    config = local_bridge_config(
        upstream_url,
        key,
        tokens,
        database=DB_NAME,
        pricing=PRICING,
        # warn_at: the answer to carol's second call carries a warning header.
        governance={"time_zone": noon_zone(), "warn_at": 0.5},
    )
    # "local" stands for any OpenAI-compatible host (vLLM, Ollama, OpenRouter, ...), which
    # serves Chat Completions. The fake answers every API under any prefix; a root of its own
    # per provider, as on a gateway, tells a saved flow's provider apart in the offline rebuild.
    for name, kind in (("anthropic", "anthropic"), ("local", "openai_compatible")):
        root = f"{upstream_url}/{name}/v1"
        config["providers"].append({"name": name, "type": kind, "base_url": root, "api_key": key})
    for user in config["users"]:
        if user["id"] == BUDGET_USER:
            user["limits"] = {"spend_usd": {"day": BUDGET_USD}}
    return config


# --- the exchanges ----------------------------------------------------------------------------


@dataclass(slots=True)
class Notes:
    """What the clients saw that the log does not say as plainly: printed after the log."""

    budget_refusal: str = ""
    budget_limit: str = ""
    budget_warning: str = ""


def responses_exchanges(bridge_url: str, tokens: dict[str, str]) -> None:
    """Alice's Codex session (three turns over HTTP, one over Codex's WebSocket), then bob's
    openai SDK calls: buffered with reasoning, cached tokens, a refused background request."""
    base_url = f"{bridge_url}/openai/v1"
    codex = openai.OpenAI(
        base_url=base_url, api_key=tokens["alice"], max_retries=0, default_headers=CODEX_HEADERS
    )
    # Codex streams every turn and sends the whole conversation each time.
    history: list[Any] = [user_message("Why does the build fail on Python 3.14?")]
    with codex.responses.stream(
        model="fake-reasoning", input=history, reasoning={"effort": "medium", "summary": "auto"}
    ) as stream:
        answer = stream.get_final_response()
    history += [item.model_dump(exclude_none=True) for item in answer.output]
    history.append(user_message("Run the test suite"))
    with codex.responses.stream(model="fake-tool", input=history, tools=[SHELL_TOOL]) as stream:
        answer = stream.get_final_response()
    call = next(item for item in answer.output if item.type == "function_call")
    history.append(call.model_dump(exclude_none=True))
    # The demo does not run the command; it answers as the shell would have.
    history.append(
        {"type": "function_call_output", "call_id": call.call_id, "output": "hello-from-tool\n"}
    )
    with codex.responses.stream(model="fake-tool", input=history, tools=[SHELL_TOOL]) as stream:
        answer = stream.get_final_response()
    history += [item.model_dump(exclude_none=True) for item in answer.output]
    history.append(user_message("Thanks. Summarise the fix in one line."))
    websocket_turn(base_url, tokens["alice"], {"model": "fake-text", "input": history})

    bob = openai.OpenAI(base_url=base_url, api_key=tokens["bob"], max_retries=0)
    bob.responses.create(model="fake-reasoning", input="Is 1013 prime? Think first.")
    with bob.responses.stream(model="fake-cached", input="Summarise the style guide") as stream:
        stream.get_final_response()
    with contextlib.suppress(openai.APIStatusError):  # 501: the log shows it as rejected
        bob.responses.create(model="fake-text", input="later, please", background=True)


def user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def websocket_turn(base_url: str, token: str, request: dict[str, Any]) -> None:
    """One ``response.create`` on a Responses WebSocket, as Codex sends it, read to its end."""
    parts = urlsplit(f"{base_url}/responses")
    headers = {"authorization": f"Bearer {token}", **CODEX_HEADERS}
    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=30) as sock:

        def events() -> Iterator[Any]:
            while True:
                data = sock.recv(65536)
                ws.receive_data(data or None)
                yield from ws.events()
                if not data:
                    return

        sock.sendall(
            ws.send(
                Request(
                    host=parts.netloc,
                    target=parts.path,
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()],
                )
            )
        )
        received = events()
        for event in received:
            if isinstance(event, RejectConnection):
                raise RuntimeError(f"WebSocket refused: HTTP {event.status_code}")
            if isinstance(event, AcceptConnection):
                break
        message = orjson.dumps({"type": "response.create", **request}).decode()
        sock.sendall(ws.send(TextMessage(data=message)))
        for event in received:
            if isinstance(event, CloseConnection):
                break
            if isinstance(event, TextMessage) and orjson.loads(event.data).get("type") in (
                "response.completed",
                "response.failed",
                "response.incomplete",
                "error",
            ):
                break
        sock.sendall(ws.send(CloseConnection(code=1000)))


def messages_exchanges(bridge_url: str, tokens: dict[str, str], notes: Notes) -> None:
    """Bob's Claude Code session (thinking, then a Bash tool round trip), then carol's calls
    until her daily budget is spent and the bridge refuses the next one."""
    base_url = f"{bridge_url}/anthropic"
    claude = anthropic.Anthropic(
        base_url=base_url, api_key=tokens["bob"], max_retries=0, default_headers=CLAUDE_HEADERS
    )
    history: list[Any] = [{"role": "user", "content": "What does src/ hold?"}]
    with claude.messages.stream(
        model="fake-thinking",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 1024},
        tools=[BASH_TOOL],
        messages=history,
    ) as stream:
        answer = stream.get_final_message()
    history.append({"role": "assistant", "content": [b.model_dump() for b in answer.content]})
    history.append({"role": "user", "content": "run ls docs"})
    with claude.messages.stream(
        model="fake-text", max_tokens=4096, tools=[BASH_TOOL], messages=history
    ) as stream:
        answer = stream.get_final_message()
    history.append({"role": "assistant", "content": [b.model_dump() for b in answer.content]})
    use = next(block for block in answer.content if block.type == "tool_use")
    history.append(
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "screenshots"}],
        }
    )
    with claude.messages.stream(
        model="fake-text", max_tokens=4096, tools=[BASH_TOOL], messages=history
    ) as stream:
        stream.get_final_message()

    carol = anthropic.Anthropic(base_url=base_url, api_key=tokens[BUDGET_USER], max_retries=0)
    for _ in range(10):  # a bound, should the budget never be reached
        try:
            # Buffered: the bridge counts the spend before the answer reaches carol.
            raw = carol.messages.with_raw_response.create(
                model="fake-text",
                max_tokens=1024,
                messages=[{"role": "user", "content": "Review this diff for me"}],
            )
        except anthropic.PermissionDeniedError as e:
            notes.budget_refusal = f"{e.status_code} {e.body['error']['message']}"
            notes.budget_limit = e.response.headers.get("x-aibridge-limit", "")
            return
        notes.budget_warning = raw.headers.get("x-aibridge-budget-warning", notes.budget_warning)


def chat_exchanges(bridge_url: str, tokens: dict[str, str]) -> None:
    """Alice's OpenCode session on an OpenAI-compatible provider: a tool call, its result, and
    a last turn that does not ask for usage (the bridge asks for it)."""
    opencode = openai.OpenAI(
        base_url=f"{bridge_url}/local/v1",
        api_key=tokens["alice"],
        max_retries=0,
        default_headers=OPENCODE_HEADERS,
    )
    history: list[Any] = [{"role": "user", "content": "run git status"}]
    calls: dict[int, dict[str, Any]] = {}
    for chunk in opencode.chat.completions.create(
        model="fake-text",
        messages=history,
        tools=[OPENCODE_BASH_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"arguments": ""})
                if delta.id:
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    call = calls[0]
    history.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        }
    )
    history.append({"role": "tool", "tool_call_id": call["id"], "content": "nothing to commit"})
    for stream_options in ({"include_usage": True}, None):
        kwargs = {} if stream_options is None else {"stream_options": stream_options}
        stream = opencode.chat.completions.create(
            model="fake-text", messages=history, tools=[OPENCODE_BASH_TOOL], stream=True, **kwargs
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        history.append({"role": "assistant", "content": text})
        history.append({"role": "user", "content": "Good. Anything else to do?"})


def refused_stranger(bridge_url: str) -> None:
    stranger = openai.OpenAI(
        base_url=f"{bridge_url}/openai/v1", api_key="not-a-bridge-token", max_retries=0
    )
    with contextlib.suppress(openai.AuthenticationError):  # 401: in the log as rejected
        stranger.responses.create(model="fake-text", input="let me in")


# --- what landed in the log ---------------------------------------------------------------


def exchanges(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every interception in the order it was sent, with its usage, tools and thoughts."""
    conn.row_factory = sqlite3.Row
    rows = [
        dict(r)
        for r in conn.execute(
            "select i.*, (select sum(t.total_tokens) from token_usages t "
            "where t.interception_id = i.id) as tokens, (select sum(t.estimated_cost_usd) "
            "from token_usages t where t.interception_id = i.id) as cost, (select "
            "sum(t.cache_read_input_tokens) from token_usages t where t.interception_id = i.id) "
            "as cached, (select count(*) from model_thoughts m where m.interception_id = i.id) "
            "as thoughts, (select group_concat(u.tool, ', ') from tool_usages u "
            "where u.interception_id = i.id) as tools, (select p.prompt from user_prompts p "
            "where p.interception_id = i.id) as prompt from interceptions i order by i.rowid"
        )
    ]
    called = {
        r["call_id"]: r["tool"] for r in conn.execute("select call_id, tool from tool_usages")
    }
    turns: dict[str, int] = {}
    for row in rows:
        session = row["client_session_id"]
        if session is not None:
            turns[session] = turns.get(session, 0) + 1
            row["turn"] = f"{SESSION_NAMES.get(session, session[:8])} #{turns[session]}"
        else:
            row["turn"] = "-"
        row["answers"] = called.get(row["correlating_tool_call_id"])
    return rows


def what(row: dict[str, Any]) -> str:
    """A few words on what an exchange shows, from its records."""
    if row["status"] == "rejected":
        return shorten(row["error"] or "", 56)
    if row["http_status"] == 101:
        parts = ["WebSocket"]
    else:
        parts = ["streamed" if row["streaming"] else "buffered"]
    if row["thoughts"]:
        parts.append(f"{row['thoughts']} thought" + "s" * (row["thoughts"] > 1))
    if row["cached"]:
        parts.append(f"{row['cached']:,} cached")
    if row["tools"]:
        parts.append(f"calls {row['tools']}")
    if row["answers"]:
        parts.append(f"returns {row['answers']}'s result")
    metadata = orjson.loads(row["metadata"]) if row["metadata"] else {}
    if metadata.get("stream_usage") == "added by the bridge":
        parts.append("usage added by the bridge")
    if row["prompt"]:
        parts.append(repr(shorten(row["prompt"], 26)))
    return " · ".join(parts)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def summary(db_path: Path, notes: Notes) -> str:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = exchanges(conn)
        counts = {
            table: conn.execute(f"select count(*) from {table}").fetchone()[0]
            for table in ("user_prompts", "token_usages", "tool_usages", "model_thoughts")
        }
    finally:
        conn.close()
    out = [
        f"What landed in the audit log: {len(rows)} interceptions, "
        + ", ".join(f"{n} {table}" for table, n in counts.items()),
    ]
    line = "  {:<6} {:<13} {:<11} {:<14} {:<9} {:>4} {:>7} {:>9}  {}"
    for api, title in API_TITLES.items():
        group = [r for r in rows if r["api"] == api]
        providers = ", ".join(sorted({r["provider_name"] for r in group if r["provider_name"]}))
        out += ["", f"{title} (provider {providers or '-'})"]
        out.append(
            line.format(
                "user", "client", "session", "model", "status", "HTTP", "tokens", "cost", ""
            )
        )
        for r in group:
            out.append(
                line.format(
                    r["initiator_id"] or "?",
                    shorten(r["client"] or "-", 13),
                    r["turn"],
                    shorten(r["model"] or "-", 14),
                    r["status"],
                    r["http_status"] or "",
                    "-" if r["tokens"] is None else f"{r['tokens']:,}",
                    money(r["cost"]),
                    what(r),
                )
            )

    out += ["", "Sessions, by the id each client sends (Codex: session-id, Claude Code:"]
    out.append("X-Claude-Code-Session-Id, OpenCode: x-session-affinity)")
    line = "  {:<9} {:<36} {:<12} {:>5} {:>5} {:>7} {:>9}"
    out.append(line.format("", "session id", "client", "turns", "tools", "tokens", "cost"))
    for session, name in SESSION_NAMES.items():
        turns = [r for r in rows if r["client_session_id"] == session]
        if turns:
            out.append(
                line.format(
                    name,
                    session,
                    turns[0]["client"] or "-",
                    len(turns),
                    sum(len(r["tools"].split(", ")) for r in turns if r["tools"]),
                    f"{sum(r['tokens'] or 0 for r in turns):,}",
                    money(total(r["cost"] for r in turns)),
                )
            )

    out += ["", "Estimated cost per person (the fake models' rates: pricing.overrides)"]
    line = "  {:<10} {:>9} {:>9} {:>8} {:>7} {:>9}"
    out.append(line.format("user", "exchanges", "completed", "refused", "tokens", "cost"))
    for user in (*USERS, None):
        mine = [r for r in rows if r["initiator_id"] == user]
        if mine:
            out.append(
                line.format(
                    user or "(unknown)",
                    len(mine),
                    sum(r["status"] == "completed" for r in mine),
                    sum(r["status"] == "rejected" for r in mine),
                    f"{sum(r['tokens'] or 0 for r in mine):,}",
                    money(total(r["cost"] for r in mine)),
                )
            )

    out += ["", f"Budget: {BUDGET_USER} may spend ${BUDGET_USD:.2f} a day (users[].limits)"]
    if notes.budget_warning:
        out.append(wrapped(f"warned: {notes.budget_warning}"))
    if notes.budget_refusal:
        out.append(wrapped(f"refused ({notes.budget_limit}): {notes.budget_refusal}"))
    return "\n".join(text.rstrip() for text in out)


def total(values: Iterable[float | None]) -> float | None:
    """The sum of the known values; None when none is (nothing was priced)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def wrapped(text: str) -> str:
    return textwrap.fill(text, 96, initial_indent="  ", subsequent_indent="    ")


def shown(path: Path) -> str:
    """A path as the printed commands give it: relative to here when it lies below."""
    try:
        relative = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(path)
    return str(relative)


def next_steps(workdir: Path, story_id: str | None) -> str:
    dev, addon = shown(REPO / "dev"), shown(ADDON)
    if "/" not in dev:
        dev = f"./{dev}"  # a program in the current folder is not found on PATH
    db, flows, config = (shown(workdir / name) for name in (DB_NAME, FLOWS, "config.yaml"))
    name = Path(DB_NAME).stem
    site = "http://127.0.0.1:8001"  # datasette's default address
    return f"""
Next steps (copy and paste them; run from the repository's root)

  The log in datasette (the aibridge plugin loads by itself, whatever the file is called):
    {dev} datasette {db}
  then open
    {site}/{name}/sessions
        every session: who, which client and API, turns, tools, tokens, cost
    {site}/{name}/session_turns?session_id={CODEX_SESSION}
        the turns of alice's Codex session
    {site}/{name}/interception_story?interception_id={story_id or "<id>"}
        the story of one request: prompt, tool call, tokens, cost, how it ended
    {site}/-/dashboards/usage
        the dashboard: tokens and cost per day, person, API and model

  The same in the terminal:
    {dev} python -m aibridge report --db {db}

  The flows as mitmproxy saw them, with the addon's view and comments (keys and tokens
  masked), at http://127.0.0.1:8081:
    {dev} mitmweb --rfile {flows} -s {addon} \\
        --set aibridge_config={config}

  The log rebuilt from the flows offline (all but the WebSocket turn, which a flow file
  does not replay):
    {dev} mitmdump -n --rfile {flows} -s {addon} \\
        --set aibridge_config={config} \\
        --set aibridge_db={shown(workdir / REBUILT)}"""


def story_of(db_path: Path) -> str | None:
    """The interception whose story shows the most: the Codex turn that called a tool."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        found = conn.execute(
            "select i.id from interceptions i join tool_usages u on u.interception_id = i.id "
            "where i.client_session_id = ? order by i.rowid limit 1",
            (CODEX_SESSION,),
        ).fetchone()
    finally:
        conn.close()
    return found[0] if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", default="demo-run", help="output folder (default: demo-run)")
    args = parser.parse_args(argv)
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUTS:
        (workdir / stale).unlink(missing_ok=True)

    tokens = {user: f"demo-{user}-{secrets.token_hex(8)}" for user in USERS}
    env = {"DEMO_PROVIDER_KEY": "sk-demo-" + secrets.token_hex(16)}
    env.update({f"DEMO_TOKEN_{user.upper()}": token for user, token in tokens.items()})
    notes = Notes()
    with FakeUpstream() as upstream:
        folder = workdir.resolve()
        bridge = MitmdumpProcess(
            folder,
            demo_config(upstream.url),
            env=env,
            extra_args=["-w", str(folder / FLOWS), "--set", "store_streamed_bodies=true"],
        )
        bridge.db_path = folder / DB_NAME  # the config's name, not aibridge.db
        bridge.start()
        try:
            print(f"Fake provider at {upstream.url}, the bridge at {bridge.url}; sending ...\n")
            responses_exchanges(bridge.url, tokens)
            messages_exchanges(bridge.url, tokens, notes)
            chat_exchanges(bridge.url, tokens)
            refused_stranger(bridge.url)
        finally:
            bridge.stop()  # a clean shutdown drains the recorder
    print(summary(bridge.db_path, notes))
    print(next_steps(workdir, story_of(bridge.db_path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
