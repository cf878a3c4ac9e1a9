"""What the benchmark sends: a request Codex CLI really sent, Codex-, Claude-Code- and
OpenCode-shaped request bodies, and realistic audit-log rows.

Everything here is deterministic, so every variant and every round gets the same bytes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import orjson

# A first turn of codex-cli 0.171.0 as it went over the wire (its README says how it was
# captured): data, read as it is, not test code.
CODEX_CAPTURED = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "codex_captured"
# The capture's body starts so; the bench puts its own model and `stream` in their place.
_CAPTURED_HEAD = b'{"model":"fake-tool","stream":true,'
# Headers each sender sets for itself: its credential, its target, its body's length.
_PER_REQUEST_HEADERS = frozenset({"authorization", "host", "content-length"})


@functools.cache
def captured_codex_body(model: str, *, stream: bool) -> bytes:
    """Codex's captured first turn (``turn1.request.json``, about 40 KB: its developer
    messages, its tools, the user's prompt), byte for byte but for ``model`` and ``stream``,
    which lead the body."""
    raw = (CODEX_CAPTURED / "turn1.request.json").read_bytes()
    if not raw.startswith(_CAPTURED_HEAD):
        raise ValueError("turn1.request.json no longer starts with model and stream")
    head = b'{"model":%s,"stream":%s,' % (orjson.dumps(model), b"true" if stream else b"false")
    return head + raw[len(_CAPTURED_HEAD) :]


@functools.cache
def captured_codex_headers() -> dict[str, str]:
    """The headers of that turn, in their order, without the per-request ones."""
    captured = orjson.loads((CODEX_CAPTURED / "turn1.headers.json").read_bytes())
    return {k: v for k, v in captured.items() if k.lower() not in _PER_REQUEST_HEADERS}


def small_responses_body(model: str, prompt: str = "Say hello.") -> bytes:
    """The smallest useful buffered ``POST /v1/responses`` body (about 150 bytes): one user
    message, as an SDK sends it."""
    message = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": prompt}],
    }
    return orjson.dumps({"model": model, "input": [message], "stream": False, "store": False})


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


# ---- Claude Code ---------------------------------------------------------------------------
# Shaped after what claude-cli 2.1.332 sends (tests/fixtures/claude_code_captured/README.md),
# written out here so the benchmark depends on no fixture file.

CLAUDE_CODE_SESSION = "5f0c2a9e-8d41-4b7a-9e3c-1a2b3c4d5e6f"
CLAUDE_CODE_HEADERS = {
    "accept": "application/json",
    "content-type": "application/json",
    "user-agent": "claude-cli/2.1.332 (external, sdk-cli)",
    "x-claude-code-session-id": CLAUDE_CODE_SESSION,
    "x-stainless-arch": "x64",
    "x-stainless-lang": "js",
    "x-stainless-os": "Linux",
    "x-stainless-package-version": "0.128.0",
    "x-stainless-retry-count": "0",
    "x-stainless-runtime": "node",
    "x-stainless-runtime-version": "v26.12.1",
    "x-stainless-timeout": "600",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
    "context-management-2025-06-27,per-turn-control-2026-07-01,"
    "mid-conversation-tool-changes-2026-07-01,thinking-token-count-2026-05-13,"
    "advanced-tool-use-2025-11-20,effort-2025-11-24",
    "anthropic-dangerous-direct-browser-access": "true",
    "anthropic-version": "2023-06-01",
    "x-app": "cli",
}
CLAUDE_CODE_PROMPT = "The login test fails since the last change; find out why and fix it."

_CC_SYSTEM = (
    "You are an interactive agent that helps users with software engineering tasks. Use "
    "the instructions below and the tools available to you to assist the user. Read files "
    "before you edit them, keep changes small, and run the tests after each change. "
)
_CC_REMINDER = (
    "<system-reminder>\nAs you answer the user's questions, you can use the following "
    "context:\n# claudeMd\nCodebase and user instructions are shown below. Be sure to "
    "adhere to these instructions.\n\nContents of /src/app/CLAUDE.md (project "
    "instructions, checked into the codebase):\n\n- Run `make test` before committing.\n"
    "- Type hints everywhere; comments say why.\n</system-reminder>"
)
# The 12 tools of a Claude Code session: (name, description, properties, required).
_CC_TOOLS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "Agent",
        "Launch a new agent to handle a complex, multi-step task.",
        ("description", "prompt", "subagent_type"),
        ("description", "prompt"),
    ),
    (
        "Bash",
        "Executes a given bash command and returns its output.",
        ("command", "description", "timeout", "run_in_background"),
        ("command",),
    ),
    (
        "Edit",
        "Performs exact string replacements in files.",
        ("file_path", "old_string", "new_string", "replace_all"),
        ("file_path", "old_string", "new_string"),
    ),
    (
        "Glob",
        "Fast file pattern matching tool that works with any codebase size.",
        ("pattern", "path"),
        ("pattern",),
    ),
    (
        "Grep",
        "A powerful search tool built on ripgrep.",
        ("pattern", "path", "glob", "output_mode", "-n", "-i"),
        ("pattern",),
    ),
    (
        "Read",
        "Reads a file from the local filesystem.",
        ("file_path", "offset", "limit"),
        ("file_path",),
    ),
    (
        "Write",
        "Writes a file to the local filesystem.",
        ("file_path", "content"),
        ("file_path", "content"),
    ),
    (
        "NotebookEdit",
        "Replaces the contents of a specific cell in a Jupyter notebook.",
        ("notebook_path", "cell_id", "new_source", "edit_mode"),
        ("notebook_path", "new_source"),
    ),
    (
        "WebFetch",
        "Fetches content from a specified URL and processes it.",
        ("url", "prompt"),
        ("url", "prompt"),
    ),
    (
        "WebSearch",
        "Allows Claude to search the web and use the results.",
        ("query", "allowed_domains", "blocked_domains"),
        ("query",),
    ),
    (
        "TodoWrite",
        "Use this tool to create and manage a structured task list.",
        ("todos",),
        ("todos",),
    ),
    ("Skill", "Execute a skill within the main conversation.", ("skill", "args"), ("skill",)),
)
_CC_USAGE_NOTE = (
    " Usage notes: the tool runs in the user's workspace with the user's permissions; "
    "prefer it over shell equivalents, and batch independent calls in one message. "
)


def _cc_tool(
    name: str, description: str, props: tuple[str, ...], required: tuple[str, ...]
) -> dict:
    return {
        "name": name,
        "description": description + _CC_USAGE_NOTE * 6,
        "input_schema": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                prop: {"type": "string", "description": f"The {prop} of the call."}
                for prop in props
            },
            "required": list(required),
            "additionalProperties": False,
        },
    }


def claude_code_body(
    model: str, size: int = 40_000, *, stream: bool = True, prompt: str = CLAUDE_CODE_PROMPT
) -> bytes:
    """A Claude-Code-like ``POST /v1/messages`` body of about ``size`` bytes.

    A turn deep in a session: three system blocks, the 12 tools, the first request, then
    tool_use / tool_result turns (files read, commands run), and the user's new message last:
    a ``<system-reminder>`` block and the typed text, which the bridge records as the prompt.
    """
    metadata_user = orjson.dumps(
        {"device_id": "ab" * 32, "account_uuid": "", "session_id": CLAUDE_CODE_SESSION}
    ).decode()
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": _CC_REMINDER},
                {"type": "text", "text": "Look at the login module and its tests."},
            ],
        }
    ]
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "system": [
            {
                "type": "text",
                "text": "x-anthropic-billing-header: cc_version=2.1.332.0b8; "
                "cc_entrypoint=sdk-cli;",
            },
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": _CC_SYSTEM * 16, "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [_cc_tool(*tool) for tool in _CC_TOOLS],
        "metadata": {"user_id": metadata_user},
        "max_tokens": 128_000,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "stream": stream,
    }
    closing = {"role": "assistant", "content": [{"type": "text", "text": "Done."}]}
    last = {
        "role": "user",
        "content": [{"type": "text", "text": _CC_REMINDER}, {"type": "text", "text": prompt}],
    }
    tail = len(orjson.dumps(closing)) + len(orjson.dumps(last))
    lines = "".join(_FILE_LINE.format(n=n) for n in range(min(40, 1 + size // 2000)))
    turn = 0
    while len(orjson.dumps(body)) + tail < size:
        call_id = f"toolu_01Bench{turn:018d}"
        command = f"sed -n 1,40p app/login_{turn}.py"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"Next I read app/login_{turn}.py."},
                    {
                        "type": "tool_use",
                        "id": call_id,
                        "name": "Bash",
                        "input": {"command": command, "description": "Show the file"},
                    },
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": call_id,
                        "content": lines,
                        "is_error": False,
                    }
                ],
            }
        )
        turn += 1
    messages += [closing, last]
    return orjson.dumps(body)


# ---- OpenCode (Chat Completions) -----------------------------------------------------------
# Shaped after what opencode 1.18.33 sends through @ai-sdk/openai-compatible
# (tests/fixtures/opencode_captured/*.request.json and *.headers.json): the members in its
# order (model, max_tokens, messages, tools, tool_choice, stream, stream_options), one system
# message, function tools with draft 2020-12 schemas, assistant turns with ``content: ""`` and
# ``tool_calls``, ``tool`` messages, the typed text last as a string. Written out here so the
# benchmark depends on no fixture file.

OPENCODE_SESSION = "ses_0b3f5e7a9c1dffa2Bench4Qx7Zk"
OPENCODE_HEADERS = {
    "content-type": "application/json",
    "user-agent": "opencode/1.18.33 ai-sdk/provider-utils/4.0.23 runtime/bun/1.3.14",
    "x-session-affinity": OPENCODE_SESSION,
    "x-session-id": OPENCODE_SESSION,
    "connection": "keep-alive",
    "accept": "*/*",
    "accept-encoding": "gzip, deflate, br, zstd",
}
OPENCODE_PROMPT = "The date parser drops the time zone; find the cause and fix it."

_OC_SYSTEM = (
    "You are opencode, an interactive CLI tool that helps users with software engineering "
    "tasks. Use the instructions below and the tools available to you to assist the user. "
    "Be concise and direct; explain a non-trivial command before you run it. "
)
_OC_ENV = (
    "\n<env>\n  Working directory: /src/app\n  Is directory a git repo: yes\n"
    "  Platform: linux\n  Today's date: Tue Dec 01 2026\n</env>\n"
)
_OC_SCHEMA = "https://json-schema.org/draft/2020-12/schema"
_OC_INT = {"type": "integer", "minimum": 0, "maximum": 9007199254740991}
# The 12 tools of an OpenCode session: (name, description, {property: schema}, required).
_OC_TOOLS: tuple[tuple[str, str, dict[str, dict[str, Any]], tuple[str, ...]], ...] = (
    (
        "bash",
        "Executes a given bash command in a persistent shell session with optional timeout.",
        {
            "command": {"type": "string"},
            "timeout": {**_OC_INT, "exclusiveMinimum": 0},
            "workdir": {"type": "string"},
        },
        ("command",),
    ),
    (
        "edit",
        "Performs exact string replacements in files.",
        {
            "filePath": {"type": "string"},
            "oldString": {"type": "string"},
            "newString": {"type": "string"},
            "replaceAll": {"type": "boolean"},
        },
        ("filePath", "oldString", "newString"),
    ),
    (
        "glob",
        "Fast file pattern matching tool that works with any codebase size.",
        {"pattern": {"type": "string"}, "path": {"type": "string"}},
        ("pattern",),
    ),
    (
        "grep",
        "Fast content search tool that searches file contents using regular expressions.",
        {"pattern": {"type": "string"}, "path": {"type": "string"}, "include": {"type": "string"}},
        ("pattern",),
    ),
    (
        "list",
        "Lists files and directories in a given path.",
        {"path": {"type": "string"}, "ignore": {"type": "array", "items": {"type": "string"}}},
        (),
    ),
    (
        "read",
        "Read a file or directory from the local filesystem.",
        {"filePath": {"type": "string"}, "offset": _OC_INT, "limit": _OC_INT},
        ("filePath",),
    ),
    (
        "skill",
        "Load a specialized skill when the task at hand matches one of the skills listed.",
        {"name": {"type": "string"}},
        ("name",),
    ),
    (
        "task",
        "Launch a new agent to handle complex, multistep tasks autonomously.",
        {
            "description": {"type": "string"},
            "prompt": {"type": "string"},
            "subagent_type": {"type": "string"},
            "task_id": {"type": "string"},
        },
        ("description", "prompt", "subagent_type"),
    ),
    ("todoread", "Read the current todo list of the session.", {}, ()),
    (
        "todowrite",
        "Create and maintain a structured task list for the current coding session.",
        {
            "todos": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "content": {"type": "string"},
                        "status": {"type": "string"},
                        "priority": {"type": "string"},
                    },
                    "required": ["content", "status", "priority"],
                },
            }
        },
        ("todos",),
    ),
    (
        "webfetch",
        "Fetches content from a specified URL and converts it to the requested format.",
        {
            "url": {"type": "string"},
            "format": {"type": "string", "enum": ["text", "markdown", "html"]},
            "timeout": {"type": "number"},
        },
        ("url",),
    ),
    (
        "write",
        "Writes a file to the local filesystem.",
        {"content": {"type": "string"}, "filePath": {"type": "string"}},
        ("content", "filePath"),
    ),
)
_OC_USAGE_NOTE = (
    "\n\nUsage:\n- Prefer this tool over shell equivalents.\n- You can call multiple tools "
    "in a single response; batch independent calls for better performance.\n"
)


def _oc_tool(
    name: str, description: str, props: dict[str, dict[str, Any]], required: tuple[str, ...]
) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description + _OC_USAGE_NOTE * 4,
            "parameters": {
                "$schema": _OC_SCHEMA,
                "type": "object",
                "properties": {
                    prop: {**schema, "description": f"The {prop} of the call."}
                    for prop, schema in props.items()
                },
                "required": list(required),
            },
        },
    }


def opencode_chat_body(
    model: str,
    size: int = 40_000,
    *,
    stream: bool = True,
    include_usage: bool = True,
    prompt: str = OPENCODE_PROMPT,
) -> bytes:
    """An OpenCode-like ``POST /v1/chat/completions`` body of about ``size`` bytes.

    A turn deep in a session: the system message, the 12 tools, the first request, then
    assistant turns calling ``read`` or ``bash`` each answered by a ``tool`` message, and the
    user's new message last (the prompt the bridge records). ``include_usage`` is what
    OpenCode sends; without it the body has no ``stream_options`` and the bridge inserts it.
    """
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": _OC_SYSTEM * 12 + _OC_ENV},
        {"role": "user", "content": "Look at the date parser and its tests."},
    ]
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 32_000,
        "messages": messages,
        "tools": [_oc_tool(*tool) for tool in _OC_TOOLS],
        "tool_choice": "auto",
        "stream": stream,
    }
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    last = {"role": "user", "content": prompt}
    tail = len(orjson.dumps(last))
    lines = "".join(_FILE_LINE.format(n=n) for n in range(min(40, 1 + size // 2000)))
    turn = 0
    while len(orjson.dumps(body)) + tail < size:
        call_id = f"call_bench{turn:014d}"
        if turn % 2:
            name, args = "bash", {"command": f"pytest -q tests/test_dates_{turn}.py"}
        else:
            name, args = "read", {"filePath": f"/src/app/dates/parse_{turn}.py"}
        function = {"name": name, "arguments": orjson.dumps(args).decode()}
        messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": call_id, "type": "function", "function": function}],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call_id, "content": lines})
        turn += 1
    messages.append(last)
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
