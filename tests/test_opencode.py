"""OpenCode end to end: the real `opencode run` (npm opencode-ai, pinned in package.json) with
an `@ai-sdk/openai-compatible` provider whose baseURL is the bridge, through a real mitmdump
running addon.py, to the fake Chat Completions upstream (devtools/fake_openai_chat.py),
compared with what OpenCode itself reports (`--format json`).

What OpenCode sends, and how it is kept offline, is in tests/fixtures/opencode_captured/."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import orjson
import pytest

from devtools.fake_upstream import FakeUpstream, ReceivedRequest
from tests.harness import (
    PROVIDER_KEY,
    REPO,
    TOKENS,
    LoopbackHTTP,
    Mitmdump,
    children,
    finished_turns,
)

OPENCODE = REPO / "node_modules" / ".bin" / "opencode"
VERSION = "1.18.33"
MODEL = "fake-text"  # any model gets the fake's default scenario: a bash call on "run …"

# Each names a start-up fetch of OpenCode (verified in the 1.18.33 binary's own source):
# models.dev catalogue, self-update, share, LSP downloads; the last three skip scans of
# ~/.claude and ~/.agents and the built-in plugins, which only cost start-up time here.
QUIET_ENV = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
}


class Tripwire(LoopbackHTTP):
    """OpenCode's HTTP(S) proxy: whatever it tries to reach but loopback lands here, is
    noted and refused (a new start-up fetch in another version fails the tests)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def refuse(self) -> None:
                seen.append(f"{self.command} {self.path}")
                self.send_error(403)

            do_CONNECT = do_GET = do_POST = do_PUT = do_HEAD = refuse

        super().__init__(Handler)


@pytest.fixture(scope="module")
def tripwire() -> Iterator[Tripwire]:
    with Tripwire() as proxy:
        yield proxy


@dataclass
class Run:
    returncode: int
    events: list[dict[str, Any]]  # --format json: one object per line
    stderr: str

    @property
    def session(self) -> str:
        (session,) = {e["sessionID"] for e in self.events}
        return session

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def step_tokens(self) -> list[dict[str, Any]]:
        return [e["part"]["tokens"] for e in self.of_type("step_finish")]


def isolated_env(root: Path, proxy: str) -> dict[str, str]:
    """The environment for OpenCode with its HOME, XDG dirs and TMPDIR (its scratch dir,
    else one in the system's temporary directory) made under `root`, none of the caller's
    settings, and `proxy` for every host but loopback."""
    dirs = {
        "HOME": "home",
        "TMPDIR": "tmp",
        "XDG_CONFIG_HOME": "config",
        "XDG_DATA_HOME": "data",
        "XDG_CACHE_HOME": "cache",
        "XDG_STATE_HOME": "state",
    }
    for name in dirs.values():
        (root / name).mkdir()
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENCODE_", "OPENAI_", "AIBRIDGE_", "OTEL_", "XDG_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        and k not in ("PWD", "OLDPWD")
    }
    proxies = {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "NO_PROXY": "127.0.0.1,localhost"}
    return clean | QUIET_ENV | proxies | {var: str(root / name) for var, name in dirs.items()}


def opencode_run(
    bridge: Mitmdump, tripwire: Tripwire, tmp_path: Path, words: list[str], token: str
) -> Run:
    """`opencode run --format json WORDS…` in a throwaway HOME, XDG dirs and TMPDIR, with one
    provider (the bridge); it reached nothing else."""
    if not OPENCODE.exists():
        pytest.fail("OpenCode is not installed: run the tests with ./dev pytest (npm ci)")
    env = isolated_env(tmp_path, tripwire.url)
    project = tmp_path / "project"
    project.mkdir()
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "aibridge": {
                "npm": "@ai-sdk/openai-compatible",  # bundled in the binary: nothing installed
                "name": "AI Bridge",
                "options": {"baseURL": f"{bridge.url}/openai/v1", "apiKey": token},
                "models": {MODEL: {"name": "Fake"}},
            }
        },
        "permission": {"bash": "allow"},  # run the tool headless, without asking
        "share": "disabled",
        "autoupdate": False,
    }
    (project / "opencode.json").write_bytes(orjson.dumps(config))
    # At start OpenCode npm-installs @opencode-ai/plugin into its config dir in the
    # background unless node_modules exists and the lock file lists it: this one does.
    config_dir = Path(env["XDG_CONFIG_HOME"]) / "opencode"
    (config_dir / "node_modules").mkdir(parents=True)
    plugin = {"@opencode-ai/plugin": VERSION}
    (config_dir / "package.json").write_bytes(orjson.dumps({"dependencies": plugin}))
    lock = {"lockfileVersion": 3, "packages": {"": {"dependencies": plugin}}}
    (config_dir / "package-lock.json").write_bytes(orjson.dumps(lock))
    # --title: else a first call asks the model for the session's title (title.request.json).
    # Words, not one argument: OpenCode quotes an argument that holds a space.
    title = ["--title", " ".join(words)]
    seen = len(tripwire.seen)
    result = subprocess.run(
        [str(OPENCODE), "run", "-m", f"aibridge/{MODEL}", "--format", "json", *title, *words],
        cwd=project,
        # `opencode run` works in $PWD, not in its cwd: the caller's would be this repository.
        env={**env, "PWD": str(project)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tripwire.seen[seen:] == [], "OpenCode reached out past the bridge"
    events = [orjson.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return Run(result.returncode, events, result.stderr)


def succeeded(run: Run) -> Run:
    assert run.returncode == 0 and not run.of_type("error"), f"opencode failed:\n{run}"
    return run


def upstream_calls(upstream: FakeUpstream, session: str) -> list[ReceivedRequest]:
    return [
        r
        for r in upstream.requests
        if r.path.endswith("/chat/completions") and r.headers.get("x-session-id") == session
    ]


def check_turn(row: dict[str, Any]) -> None:
    assert (row["api"], row["client"]) == ("chat_completions", "OpenCode")
    assert (row["provider"], row["provider_name"]) == ("openai", "openai")
    assert (row["initiator_id"], row["credential_kind"], row["status"]) == (
        "alice",
        "centralized",
        "completed",
    )
    assert (row["model"], row["streaming"], row["http_status"]) == (MODEL, 1, 200)
    assert row["user_agent"].startswith(f"opencode/{VERSION} ")


def call_number(bridge: Mitmdump, row: dict[str, Any], tokens: dict[str, Any]) -> int:
    """The fake's call number n from the row's usage (prompt 1000n+1, completion 7n+5),
    checked against what OpenCode counted for that step."""
    (usage,) = children(bridge, "token_usages", row["id"])
    n = (usage["input_tokens"] - 1) // 1000
    assert n >= 1
    assert (usage["input_tokens"], usage["output_tokens"]) == (1000 * n + 1, 7 * n + 5)
    assert usage["cache_read_input_tokens"] == 0 and usage["reasoning_tokens"] == 0
    # OpenCode's input excludes cached tokens (none here), its output excludes reasoning.
    assert tokens["input"] + tokens["cache"]["read"] == usage["input_tokens"]
    assert (tokens["output"], tokens["reasoning"]) == (usage["output_tokens"], 0)
    return n


def check_upstream(upstream: FakeUpstream, tmp_path: Path, session: str, count: int) -> None:
    """The provider got the provider key, never alice's bridge token; OpenCode worked in
    the test's project directory."""
    calls = upstream_calls(upstream, session)
    assert len(calls) == count
    for call in calls:
        system = call.json()["messages"][0]
        assert f"Working directory: {tmp_path / 'project'}\n" in system["content"]
        assert call.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        assert TOKENS["alice"] not in str(call.headers)
        assert TOKENS["alice"].encode() not in call.body
        # OpenCode asks for usage itself: the bridge had nothing to add.
        assert call.json()["stream_options"] == {"include_usage": True}


def test_plain_turn(
    bridge: Mitmdump, upstream: FakeUpstream, tripwire: Tripwire, tmp_path: Path
) -> None:
    run = succeeded(opencode_run(bridge, tripwire, tmp_path, ["say", "hi"], TOKENS["alice"]))
    assert [e["part"]["text"] for e in run.of_type("text")]  # the fake's answer, shown
    (row,) = finished_turns(bridge, run.session, 1)
    check_turn(row)
    assert row["response_model"] == MODEL
    (prompt,) = children(bridge, "user_prompts", row["id"])
    assert prompt["prompt"] == "say hi"  # as typed, not the system prompt before it
    assert children(bridge, "tool_usages", row["id"]) == []
    assert row["correlating_tool_call_id"] is None
    (tokens,) = run.step_tokens()
    call_number(bridge, row, tokens)
    check_upstream(upstream, tmp_path, run.session, 1)


def test_tool_turn_and_its_follow_up(
    bridge: Mitmdump, upstream: FakeUpstream, tripwire: Tripwire, tmp_path: Path
) -> None:
    words = ["run", "echo", "hi"]
    run = succeeded(opencode_run(bridge, tripwire, tmp_path, words, TOKENS["alice"]))
    (used,) = run.of_type("tool_use")
    assert used["part"]["tool"] == "bash"
    assert used["part"]["state"]["input"]["command"] == "echo hi"
    assert used["part"]["state"]["output"] == "hi\n"  # OpenCode really ran it
    (text,) = run.of_type("text")
    assert "The tool returned: hi" in text["part"]["text"]

    first, second = finished_turns(bridge, run.session, 2)
    for row in (first, second):
        check_turn(row)
    (call,) = children(bridge, "tool_usages", first["id"])
    assert (call["tool"], call["call_id"]) == ("bash", used["part"]["callID"])
    assert call["call_id"].startswith("call_")
    assert orjson.loads(call["args"])["command"] == "echo hi"
    (prompt,) = children(bridge, "user_prompts", first["id"])
    assert prompt["prompt"] == "run echo hi"
    # OpenCode ran the tool and sent its result: that turn has no prompt, and names the call.
    assert second["correlating_tool_call_id"] == call["call_id"]
    assert children(bridge, "user_prompts", second["id"]) == []
    assert children(bridge, "tool_usages", second["id"]) == []
    steps = run.step_tokens()
    assert len(steps) == 2
    n = call_number(bridge, first, steps[0])
    assert call_number(bridge, second, steps[1]) == n + 1
    check_upstream(upstream, tmp_path, run.session, 2)


def test_unknown_token_is_refused(
    bridge: Mitmdump, upstream: FakeUpstream, tripwire: Tripwire, tmp_path: Path
) -> None:
    calls_before = upstream.chat_calls
    token = "not-a-bridge-token-0123"
    run = opencode_run(bridge, tripwire, tmp_path, ["say", "hi"], token)
    assert run.returncode != 0
    (error,) = run.of_type("error")  # shown once, not retried
    assert error["error"]["data"]["statusCode"] == 401, error
    message = error["error"]["data"]["message"]  # the bridge's own words, the token hinted
    assert message.startswith("unknown bridge token not-...0123") and token not in message
    (row,) = finished_turns(bridge, run.session, 1)
    assert (row["status"], row["http_status"], row["client"]) == ("rejected", 401, "OpenCode")
    assert row["api"] == "chat_completions" and row["initiator_id"] is None
    assert row["credential_hint"] == "not-...0123"
    assert children(bridge, "token_usages", row["id"]) == []
    assert upstream.chat_calls == calls_before and upstream_calls(upstream, run.session) == []
