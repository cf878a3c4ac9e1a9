"""Claude Code end to end: the real `claude -p` (npm @anthropic-ai/claude-code, pinned in
package.json) through a real mitmdump running addon.py, to the fake Anthropic upstream
(devtools/fake_anthropic.py), compared with what Claude Code itself reports."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from devtools.fake_upstream import FakeUpstream
from tests.harness import (
    REPO,
    TOKENS,
    Mitmdump,
    bridge_config,
    children,
    finished_turns,
)

CLAUDE = REPO / "node_modules" / ".bin" / "claude"


@pytest.fixture(scope="module")
def bridge(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mitmdump]:
    config = bridge_config(upstream.url)
    config["providers"] = [
        {
            "name": "anthropic",
            "type": "anthropic",
            "base_url": f"{upstream.url}/v1",
            "api_key": "${TEST_PROVIDER_KEY}",
        }
    ]
    with Mitmdump(tmp_path_factory.mktemp("bridge"), config) as proc:
        yield proc


def claude_p(bridge: Mitmdump, tmp_path: Path, prompt: str, *args: str) -> dict[str, Any]:
    """`claude -p … --output-format json` with a throwaway HOME, only through the bridge."""
    if not CLAUDE.exists():
        pytest.fail("Claude Code is not installed: run the tests with ./dev pytest (npm ci)")
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ANTHROPIC_", "CLAUDE_", "AIBRIDGE_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    result = subprocess.run(
        [str(CLAUDE), "-p", prompt, "--output-format", "json", *args],
        cwd=project,
        env={
            **clean,
            "HOME": str(home),
            "ANTHROPIC_BASE_URL": f"{bridge.url}/anthropic",
            "ANTHROPIC_API_KEY": TOKENS["alice"],
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"claude failed:\n{result.stdout}\n{result.stderr}"
    output = orjson.loads(result.stdout)
    assert output["is_error"] is False, output
    return output


def logged_usage(bridge: Mitmdump, rows: list[dict[str, Any]]) -> dict[str, int]:
    """The run's usage as Claude Code sums it, from the log's columns."""
    usages = [u for row in rows for u in children(bridge, "token_usages", row["id"])]
    assert len(usages) == len(rows)
    return {
        "input_tokens": sum(u["uncached_input_tokens"] for u in usages),
        "cache_read_input_tokens": sum(u["cache_read_input_tokens"] for u in usages),
        "cache_creation_input_tokens": sum(u["cache_write_input_tokens"] for u in usages),
        "output_tokens": sum(u["output_tokens"] for u in usages),
        "all_input": sum(u["input_tokens"] for u in usages),
    }


def reported_usage(output: dict[str, Any]) -> dict[str, int]:
    usage = output["usage"]
    keys = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    reported = {key: usage[key] for key in (*keys, "output_tokens")}
    reported["all_input"] = sum(usage[key] for key in keys)
    return reported


def check_turn(row: dict[str, Any]) -> None:
    assert (row["api"], row["provider"], row["client"]) == ("messages", "anthropic", "Claude Code")
    assert (row["initiator_id"], row["credential_kind"], row["status"]) == (
        "alice",
        "centralized",
        "completed",
    )
    assert row["streaming"] == 1 and row["http_status"] == 200
    assert row["user_agent"].startswith("claude-cli/2.1.332")


def test_plain_turn(bridge: Mitmdump, tmp_path: Path) -> None:
    output = claude_p(bridge, tmp_path, "say hi")
    (row,) = finished_turns(bridge, output["session_id"], 1)
    check_turn(row)
    assert row["response_model"] == row["model"]
    (prompt,) = children(bridge, "user_prompts", row["id"])
    assert prompt["prompt"] == "say hi"  # the typed text, not the <system-reminder> blocks
    assert logged_usage(bridge, [row]) == reported_usage(output)
    assert children(bridge, "tool_usages", row["id"]) == []


def test_tool_turn_and_its_follow_up(bridge: Mitmdump, tmp_path: Path) -> None:
    output = claude_p(bridge, tmp_path, "run echo hi", "--allowedTools", "Bash(echo hi)")
    assert output["num_turns"] == 2 and "hi" in output["result"]
    first, second = finished_turns(bridge, output["session_id"], 2)
    for row in (first, second):
        check_turn(row)
    (call,) = children(bridge, "tool_usages", first["id"])
    assert (call["tool"], call["type"]) == ("Bash", "tool_use")
    assert orjson.loads(call["args"])["command"] == "echo hi"
    assert call["call_id"].startswith("toolu_")
    (prompt,) = children(bridge, "user_prompts", first["id"])
    assert prompt["prompt"] == "run echo hi"
    # Claude Code ran the tool and sent its result: that turn has no prompt, and names the call.
    assert second["correlating_tool_call_id"] == call["call_id"]
    assert children(bridge, "user_prompts", second["id"]) == []
    assert children(bridge, "tool_usages", second["id"]) == []
    assert logged_usage(bridge, [first, second]) == reported_usage(output)
