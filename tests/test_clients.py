"""Client guessing and session ids from request headers (aibridge.clients)."""

from __future__ import annotations

import pytest
from mitmproxy.http import Headers

from aibridge.clients import guess_client, session_id_from_headers
from aibridge.headers import header_view


@pytest.mark.parametrize(
    ("user_agent", "originator", "client"),
    [
        # Codex: originator and User-Agent both start with the product's "codex" word.
        ("codex_cli_rs/0.46.0 (Ubuntu 24.4.0; x86_64) xterm-256color", "codex_cli_rs", "Codex"),
        ("codex_exec/0.46.0 (Mac OS 15.0.1; arm64) unknown", "codex_exec", "Codex"),
        ("codex_vscode/0.4.12 (Windows 10.0.26100; x86_64) vscode/1.104.0", None, "Codex"),
        (None, "codex_vscode", "Codex"),
        (
            "codex-tui/0.142.0-alpha.10 (Mac OS 13.7.8; arm64) xterm-256color (codex-tui; 0.142.0)",
            None,
            "Codex",
        ),
        ("OpenAI/JS 5.0.0", "codex_sdk_ts", "Codex"),
        ("claude-cli/2.0.14 (external, cli)", None, "Claude Code"),
        ("claude-code/1.0.0", None, "Claude Code"),
        ("Zed/0.207.3 (macos; aarch64)", None, "Zed"),
        ("GitHubCopilotChat/0.31.5", None, "GitHub Copilot"),
        ("copilot/0.0.339", None, "GitHub Copilot"),
        ("RooCode/3.28.0", None, "Roo Code"),
        ("roo-code/3.28.0 (linux 6.8.0; x64) node/22.17.0", "roo-code", "Roo Code"),
        # Kilo Code is a Roo Code fork: its originator beats the User-Agent it inherited.
        ("roo-code/4.0.0 (darwin 24.0.0; arm64) node/22.0.0", "kilo-code", "Kilo Code"),
        ("Kilo-Code/4.97.0", None, "Kilo Code"),
        ("opencode/1.0.0 (darwin) node", None, "OpenCode"),
        (None, "opencode", "OpenCode"),
        ("Cursor/1.7.0", None, "Cursor"),
        ("mux/0.9.0", None, "Mux"),
        ("coder-agents/v2.28.0", None, "Coder Agents"),
        # Official SDKs: "<client class>/<language> <version>".
        ("OpenAI/Python 1.109.1", None, "openai-python"),
        ("AsyncOpenAI/Python 2.3.0", None, "openai-python"),
        ("AzureOpenAI/Python 1.50.0", None, "openai-python"),
        ("  OpenAI/Python 1.2.3  ", None, "openai-python"),
        ("OpenAI/JS 5.23.1", None, "openai-node"),
        ("OpenAI/Go 2.7.0", None, "openai-go"),
        ("OpenAI/Java 3.0.0", None, "openai-java"),
        ("OpenAI/2.5.0 (.NET 9.0.9; Microsoft Windows 10.0.26100)", None, "openai-dotnet"),
        ("curl/8.5.0", None, "curl"),
        ("python-requests/2.32.3", None, "python-requests"),
        ("python-httpx/0.28.1", None, "python-httpx"),
        ("Go-http-client/2.0", None, "Go net/http"),
        # Anthropic's SDKs and Claude Code.
        ("Anthropic/Python 0.69.0", None, "anthropic-python"),
        ("AsyncAnthropic/Python 2.15.0", None, "anthropic-python"),
        ("Anthropic/JS 0.128.0", None, "anthropic-node"),
        ("AnthropicBedrock/Python 2.1.0", None, "anthropic-python"),
        ("claude-cli/2.1.332 (external, sdk-cli)", None, "Claude Code"),
        # Unknown or absent.
        ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36", None, None),
        ("NotOpenAI/Python 1.0", None, None),
        ("Anthropicx", None, None),
        ("NotAnthropic/Python 1.0", None, None),
        (None, None, None),
        ("", "", None),
        (None, "some-other-tool", None),
    ],
)
def test_guess_client(user_agent: str | None, originator: str | None, client: str | None) -> None:
    assert guess_client(user_agent, originator) == client


def test_cursor_is_recognised_by_its_version_header() -> None:
    headers = Headers(user_agent="OpenAI/JS 4.104.0", x_cursor_client_version="1.7.38")
    assert guess_client("OpenAI/JS 4.104.0", None, headers=headers) == "Cursor"
    assert guess_client("OpenAI/JS 4.104.0", None, headers={"X-Cursor-Client-Version": ""}) == (
        "openai-node"
    )


@pytest.mark.parametrize(
    ("title", "client"),
    [("Roo Code", "Roo Code"), ("Kilo Code", "Kilo Code"), ("Cline", "Cline"), ("Other", None)],
)
def test_x_title_names_sdk_based_clients(title: str, client: str | None) -> None:
    expected = client or "openai-node"
    assert guess_client("OpenAI/JS 4.104.0", None, headers={"x-title": title}) == expected


def test_a_known_user_agent_beats_header_hints() -> None:
    headers = {"X-Title": "Cline", "x-cursor-client-version": "1.0"}
    assert guess_client("claude-cli/2.0.14 (external, cli)", None, headers=headers) == "Claude Code"


@pytest.mark.parametrize(
    ("headers", "session_id"),
    [
        (
            {"session_id": "0199a6e2-5c1f-7d43-9b2a-3f6e8d1c4b57"},
            "0199a6e2-5c1f-7d43-9b2a-3f6e8d1c4b57",
        ),
        ({"session-id": "s-dash"}, "s-dash"),
        ({"Session-Id": "s-capital"}, "s-capital"),
        ({"x-session-id": "s-x"}, "s-x"),
        ({"X-Claude-Code-Session-Id": "s-claude"}, "s-claude"),
        ({"conversation_id": "c-1"}, "c-1"),
        ({"conversation-id": "c-2"}, "c-2"),
        ({"x-session-id": "s-x", "session_id": "s-codex"}, "s-codex"),
        ({"conversation_id": "c-1", "session-id": "s-new"}, "s-new"),
        ({"session_id": "  padded  "}, "padded"),
        ({"session_id": "", "x-session-id": "s-x"}, "s-x"),
        ({"session_id": "   "}, None),
        ({"thread-id": "t-1", "user-agent": "codex_cli_rs/0.46.0"}, None),
        ({}, None),
    ],
)
def test_session_id_from_headers(headers: dict[str, str], session_id: str | None) -> None:
    assert session_id_from_headers(headers) == session_id


def test_session_id_from_mitmproxy_headers() -> None:
    headers = Headers(
        [(b"User-Agent", b"codex_cli_rs/0.46.0"), (b"Session_ID", b"s-1"), (b"Thread-Id", b"t-1")]
    )
    assert session_id_from_headers(headers) == "s-1"
    assert session_id_from_headers(Headers()) is None


def test_header_view_reads_like_mitmproxy_headers():
    headers = Headers(
        [
            (b"User-Agent", b"codex_cli_rs/0.50.0"),
            (b"Session_Id", b"s-1"),
            (b"X-Tag", b"a"),
            (b"x-tag", b"b"),
            (b"x-bytes", b"caf\xc3\xa9 \xff"),
        ]
    )
    view = header_view(headers)
    for name in ("user-agent", "session_id", "x-tag", "x-bytes"):
        assert view[name] == headers[name]
    assert session_id_from_headers(view) == "s-1"
    assert guess_client(view.get("user-agent"), None, headers=view) == "Codex"
