"""Codex CLI end to end: the real `codex exec` (npm @openai/codex, pinned in package.json)
through a real mitmdump running addon.py, to the fake upstream."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from devtools.fake_upstream import FakeUpstream
from tests.harness import REPO, TOKENS, Mitmdump, bridge_config, children, query, wait_for

CODEX = REPO / "node_modules" / ".bin" / "codex"
PROMPT = "Run echo hello-from-tool in the shell and tell me what it printed."
QUIET = """
check_for_update_on_startup = false
[analytics]
enabled = false
[features]
plugins = false
[otel]
exporter = "none"
trace_exporter = "none"
metrics_exporter = "none"
"""


def codex_exec(home: Path, config: str, env: dict[str, str], *args: str) -> str:
    """Run `codex exec` with its own CODEX_HOME, loopback only, failing fast on errors."""
    if not CODEX.exists():
        pytest.fail("Codex CLI is not installed: run the tests with ./dev pytest (npm ci)")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(config + QUIET)
    project = home / "project"
    project.mkdir(exist_ok=True)
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_", "AIBRIDGE_"))
    }
    result = subprocess.run(
        [
            str(CODEX),
            "exec",
            "--skip-git-repo-check",
            "--sandbox",
            "read-only",
            "--disable",
            "unbounded_connection_retries",
            *args,
            PROMPT,
        ],
        cwd=project,
        env={**clean, "CODEX_HOME": str(home), "HOME": str(home), **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"codex failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def turns(bridge: Mitmdump, session: str) -> list[dict[str, Any]]:
    return query(
        bridge.db_path,
        "select * from interceptions where client_session_id = ? "
        "and ended_at is not null order by started_at",
        (session,),
    )


def sessions_of(bridge: Mitmdump) -> set[str]:
    return {
        r["client_session_id"]
        for r in query(
            bridge.db_path, "select client_session_id from interceptions where client = 'Codex'"
        )
    }


def test_codex_custom_provider_with_tool_call(
    bridge: Mitmdump, upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = f"""
model = "fake-tool"
model_provider = "aibridge"
[model_providers.aibridge]
name = "AI Bridge"
base_url = "{bridge.url}/openai/v1"
env_key = "AIBRIDGE_TOKEN"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"""
    before = sessions_of(bridge)
    output = codex_exec(tmp_path / "codex", config, {"AIBRIDGE_TOKEN": TOKENS["alice"]})
    assert "hello-from-tool" in output

    (session,) = wait_for(lambda: sessions_of(bridge) - before)
    rows = wait_for(lambda: (r := turns(bridge, session)) and len(r) >= 2 and r)
    assert len(rows) == 2, rows
    first, second = rows
    for row in rows:
        assert (row["client"], row["initiator_id"], row["status"], row["streaming"]) == (
            "Codex",
            "alice",
            "completed",
            1,
        )
        assert row["user_agent"].startswith("codex_exec/")
        (usage,) = children(bridge, "token_usages", row["id"])
        assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0

    assert [p["prompt"] for p in children(bridge, "user_prompts", first["id"])] == [PROMPT]
    assert children(bridge, "user_prompts", second["id"]) == []  # an agent-loop turn
    (tool,) = children(bridge, "tool_usages", first["id"])
    assert tool["tool"] == "exec_command" and "hello-from-tool" in tool["args"]
    assert second["correlating_tool_call_id"] == tool["call_id"]

    # What Codex sent upstream carried the provider key, never the personal token.
    codex_requests = [r for r in upstream.requests if r.headers.get("originator") == "codex_exec"]
    assert len(codex_requests) >= 2
    assert all(TOKENS["alice"] not in str(r.headers) for r in codex_requests)


@pytest.mark.parametrize("policy", ["bridge", "refuse"])
def test_codex_builtin_provider_websocket(
    upstream: FakeUpstream, tmp_path: Path, policy: str
) -> None:
    """Codex's built-in provider tries WebSocket first: bridged, or refused with a fast 426."""
    workdir = tmp_path / "bridge"
    workdir.mkdir()
    with Mitmdump(workdir, bridge_config(upstream.url, websocket=policy)) as proc:
        config = f'model = "fake-tool"\nopenai_base_url = "{proc.url}/openai/v1"\n'
        output = codex_exec(tmp_path / "codex", config, {"CODEX_API_KEY": TOKENS["bob"]})
        assert "hello-from-tool" in output
        rows = wait_for(
            lambda: (
                (
                    r := query(
                        proc.db_path,
                        "select * from interceptions where "
                        "ended_at is not null order by started_at",
                    )
                )
                and r[-1]["correlating_tool_call_id"]
                and r
            )
        )
        # Over WebSocket Codex may first send a "prewarm" response.create: recorded too.
        assert len(rows) in (2, 3)
        assert {r["status"] for r in rows} == {"completed"}
        assert {r["initiator_id"] for r in rows} == {"bob"}
        assert {r["client"] for r in rows} == {"Codex"}
        http_status = 101 if policy == "bridge" else 200
        assert {r["http_status"] for r in rows} == {http_status}
        tools = query(proc.db_path, "select * from tool_usages")
        assert [t["call_id"] for t in tools] == [rows[-1]["correlating_tool_call_id"]]
        upgrades = [
            r
            for r in upstream.requests
            if r.headers.get("upgrade") == "websocket"
            and r.headers.get("originator") == "codex_exec"
        ]
        if policy == "refuse":
            assert not any(TOKENS["bob"] in str(r.headers) for r in upstream.requests)
        else:
            assert upgrades and "Bearer sk-test" in upgrades[-1].headers["authorization"]


def test_codex_binary_is_the_pinned_version() -> None:
    if not CODEX.exists():
        pytest.fail("Codex CLI is not installed: run the tests with ./dev pytest (npm ci)")
    out = subprocess.run(
        [str(CODEX), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CODEX_HOME": str(Path(shutil.os.devnull).parent)},
    )
    assert "0.171.0" in out.stdout
