"""What the benchmark sends: Codex-shaped request bodies and realistic audit-log rows.

Everything here is deterministic, so every variant and every round gets the same bytes.
"""

from __future__ import annotations

from typing import Any

import orjson

CODEX_HEADERS = {
    "content-type": "application/json",
    "accept": "text/event-stream",
    "user-agent": "codex_cli_rs/0.63.0 (Linux 6.8; x86_64) xterm-256color",
    "originator": "codex_cli_rs",
    "session_id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
}

_INSTRUCTIONS = (
    "You are Codex, a coding agent running in a terminal. You and the user share the same "
    "workspace and collaborate to achieve the user's goals. Keep going until the query is "
    "completely resolved before ending your turn. "
)
_SHELL_TOOL = {
    "type": "function",
    "name": "shell",
    "description": "Runs a shell command and returns its output.",
    "strict": False,
    "parameters": {
        "type": "object",
        "properties": {
            "command": {"type": "array", "items": {"type": "string"}},
            "workdir": {"type": "string", "description": "The working directory."},
            "timeout_ms": {"type": "number", "description": "The timeout in milliseconds."},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
}
_PATCH_TOOL = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Use the `apply_patch` tool to edit files.",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+"},
}
_FILE_LINE = "    def handle(self, flow: http.HTTPFlow) -> None:  # line {n:04d} of a source file\n"


def codex_body(
    model: str,
    *,
    stream: bool,
    size: int = 40_000,
    prompt: str = "Run the test suite and fix the failing test.",
) -> bytes:
    """A Codex-like ``POST /v1/responses`` body of about ``size`` bytes.

    Shaped like a turn deep in an agent session: long instructions, tool definitions,
    earlier shell calls with their outputs, and the user's new message last (so the bridge
    records a prompt, the costlier case).
    """
    history: list[dict[str, Any]] = [
        {
            "type": "message",
            "role": "user",
            "content": [
                {
                    "type": "input_text",
                    "text": "<environment_context>\n  <cwd>/src/app</cwd>\n"
                    "  <approval_policy>on-request</approval_policy>\n</environment_context>",
                }
            ],
        }
    ]
    body: dict[str, Any] = {
        "model": model,
        "instructions": _INSTRUCTIONS * 20,
        "input": history,
        "tools": [_SHELL_TOOL, _PATCH_TOOL],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": stream,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    }
    last = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]}
    turn = 0
    while len(orjson.dumps(body)) + len(orjson.dumps(last)) < size:
        call_id = f"call_{turn:024d}"
        history.append(
            {
                "type": "function_call",
                "name": "shell",
                "arguments": orjson.dumps(
                    {"command": ["bash", "-lc", f"sed -n 1,40p f{turn}.py"]}
                ).decode(),
                "call_id": call_id,
            }
        )
        lines = "".join(_FILE_LINE.format(n=n) for n in range(min(40, 1 + size // 2000)))
        history.append({"type": "function_call_output", "call_id": call_id, "output": lines})
        turn += 1
    history.append(last)
    return orjson.dumps(body)


# ---- rows for the recorder benchmarks ------------------------------------------------------
# Written against the table and column names of DESIGN.md §4 (the public contract), not
# against aibridge's internal row builders, so the benchmark survives their refactoring.

_USAGE = {
    "input_tokens": 18_240,
    "input_tokens_details": {"cached_tokens": 17_920},
    "output_tokens": 412,
    "output_tokens_details": {"reasoning_tokens": 256},
    "total_tokens": 18_652,
}
_ARGS = orjson.dumps({"command": ["bash", "-lc", "pytest -q tests/test_x.py"]}).decode()


def flow_rows(n: int, now: str = "2025-01-01T00:00:00.000000+00:00") -> list[tuple[str, str, dict]]:
    """The rows one streamed Codex turn produces, as (kind, table, row): interception
    start and end (two upserts), prompt, token usage, tool call, reasoning thought."""
    iid = f"bench{n:027d}"
    rid = f"resp_{n:032d}"
    start = {
        "id": iid,
        "flow_id": f"flow-{n}",
        "started_at": now,
        "ended_at": None,
        "initiator_id": "alice",
        "provider": "openai",
        "provider_name": "openai",
        "api": "responses",
        "model": "gpt-5-codex",
        "response_model": None,
        "streaming": 1,
        "client": "Codex",
        "user_agent": CODEX_HEADERS["user-agent"],
        "client_session_id": CODEX_HEADERS["session_id"],
        "correlating_tool_call_id": None,
        "previous_response_id": None,
        "credential_kind": "centralized",
        "credential_hint": "sk-b...6789",
        "http_status": None,
        "status": "in_progress",
        "error": None,
        "response_id": None,
        "malformed_events": 0,
        "metadata": {"request_bytes": 40_000},
    }
    end = {
        "id": iid,
        "ended_at": now,
        "http_status": 200,
        "status": "completed",
        "error": None,
        "response_id": rid,
        "response_model": "gpt-5-codex",
        "malformed_events": 0,
    }
    child = {"interception_id": iid, "response_id": rid, "created_at": now}
    return [
        ("upsert", "interceptions", start),
        ("upsert", "interceptions", end),
        (
            "insert",
            "user_prompts",
            {**child, "prompt": f"Run the test suite and fix the failing test (turn {n})."},
        ),
        (
            "insert",
            "token_usages",
            {
                **child,
                "input_tokens": 18_240,
                "cache_read_input_tokens": 17_920,
                "cache_write_input_tokens": 0,
                "uncached_input_tokens": 320,
                "output_tokens": 412,
                "reasoning_tokens": 256,
                "total_tokens": 18_652,
                "usage": _USAGE,
            },
        ),
        (
            "insert",
            "tool_usages",
            {
                **child,
                "call_id": f"call_{n:024d}",
                "tool": "shell",
                "type": "function_call",
                "args": _ARGS,
                "injected": 0,
                "server_url": None,
                "invocation_error": None,
            },
        ),
        (
            "insert",
            "model_thoughts",
            {
                **child,
                "source": "reasoning_summary",
                "content": "**Running the tests**\n\nFirst, I run the failing test on its own.",
            },
        ),
    ]
