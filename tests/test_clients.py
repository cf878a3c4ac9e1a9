"""Client guessing and session ids from request headers (aibridge.clients)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import orjson
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
        # Chat Completions clients (see the module docstring for where each string comes from).
        (
            "opencode/1.1.53 ai/5.0.97 ai-sdk/provider-utils/3.0.17 runtime/bun/1.3.2",
            None,
            "OpenCode",
        ),
        ("OpenCode/0.15.8", None, "OpenCode"),
        (
            "ai-sdk/openai-compatible/1.0.19 ai-sdk/provider-utils/3.0.10 runtime/node.js/22",
            None,
            "ai-sdk",
        ),
        ("ai/5.0.59 ai-sdk/provider-utils/3.0.10 runtime/bun/1.2.23", None, "ai-sdk"),
        ("AI-SDK/openai/2.0.30", None, "ai-sdk"),
        ("MyTool/2.0 ai-sdk/openai-compatible/2.0.51", None, "ai-sdk"),
        ("Zed/0.210.4+stable.201.8f1a2b3c (linux; x86_64)", None, "Zed"),
        ("Zed/0.211.0-pre (windows; x86_64)", None, "Zed"),
        ("GitHubCopilotChat/0.32.2025101401", None, "GitHub Copilot"),
        ("githubcopilotchat/0.26.7", None, "GitHub Copilot"),
        (
            "Cline/4.1.16 ai-sdk/openai-compatible/3.0.30 ai-sdk/provider-utils/5.0.27",
            None,
            "Cline",
        ),
        ("litellm/1.77.7", None, "LiteLLM"),
        ("node-fetch", None, "node-fetch"),
        ("node-fetch/1.0 (+https://github.com/bitinn/node-fetch)", None, "node-fetch"),
        ("Python/3.12 aiohttp/3.12.15", None, "python-aiohttp"),
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
        # Unknown or absent; a known word inside another product's token names nothing.
        ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36", None, None),
        ("openai/5.0", None, None),
        ("chai/1.0", None, None),
        ("xai-sdk/openai/1.0", None, None),
        ("ai-sdk", None, None),
        ("ai/ beta", None, None),
        ("Mozilla/5.0 (compatible; built with ai-sdk)", None, None),
        ("myopencode/1.0", None, None),
        ("my-app/1.0 (opencode/1.0)", None, None),
        ("zedx/0.1", None, None),
        ("clinex/1.0", None, None),
        ("litellm-proxy-probe/1.0", None, None),
        ("node-fetcher/1.0", None, None),
        ("node-fetch-retry/2.0", None, None),
        ("Python/3.12 aiohttp-retry/2.8", None, None),
        ("aiohttp/3.9", None, None),
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


# Header sets as each client sends them to an OpenAI-compatible base URL (values made up where
# they are secrets or ids; names, order and shapes as in each client's source).
_SES = "ses_4f2a9c1e7ffeAbCdEfGhIjKlMn"
_CHAT_ID = "6b8e1f0c-3d2a-4c59-9f7e-1a2b3c4d5e6f"
_OPENCODE_UA = "opencode/1.1.53 ai/5.0.97 ai-sdk/provider-utils/3.0.17 runtime/bun/1.3.2"
_AI_SDK_UA = "ai-sdk/openai-compatible/1.0.19 ai-sdk/provider-utils/3.0.10 runtime/node.js/22"
CLIENT_HEADERS: list[tuple[str, dict[str, str], str | None, str | None]] = [
    (
        "OpenCode, custom provider",
        {
            "authorization": "Bearer my-token",
            "content-type": "application/json",
            "user-agent": _OPENCODE_UA,
            "x-session-affinity": _SES,
        },
        "OpenCode",
        _SES,
    ),
    (
        "OpenCode, newer: X-Session-Id too, a sub-agent with its parent",
        {
            "User-Agent": "opencode/1.2.0 ai/6.0.1 ai-sdk/provider-utils/4.0.2 runtime/bun/1.3.5",
            "x-session-affinity": _SES,
            "X-Session-Id": _SES,
            "x-parent-session-id": "ses_parent00000000000000000",
        },
        "OpenCode",
        _SES,
    ),
    (
        "OpenCode, provider id starting with opencode (older: no User-Agent of its own)",
        {
            "user-agent": "ai/5.0.59 ai-sdk/provider-utils/3.0.10 runtime/bun/1.2.23",
            "x-opencode-project": "4b0ea68d7af9a6031a7ffda7ad66e0cb83315750",
            "x-opencode-session": _SES,
            "x-opencode-request": "msg_9a8b7c6d5e4f3a2b1c0d9e8f7a",
            "x-opencode-client": "cli",
        },
        "OpenCode",
        _SES,
    ),
    (
        "an app on the Vercel AI SDK that names nothing",
        {"user-agent": _AI_SDK_UA},
        "ai-sdk",
        None,
    ),
    (
        "GitHub Copilot Chat, custom OpenAI-compatible model",
        {
            "Authorization": "Bearer my-token",
            "Content-Type": "application/json",
            "OpenAI-Intent": "conversation-agent",
            "X-Initiator": "user",
            "X-Interaction-Id": "0e5f1b7a-8c9d-4e2f-a1b3-c4d5e6f70819",
            "X-Request-Id": "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d",
            "User-Agent": "GitHubCopilotChat/0.32.2025101401",
            "X-VSCode-User-Agent-Library-Version": "electron-fetch",
        },
        "GitHub Copilot",
        None,
    ),
    (
        "Zed",
        {
            "user-agent": "Zed/0.210.4+stable.201.8f1a2b3c (macos; aarch64)",
            "authorization": "Bearer my-token",
            "content-type": "application/json",
        },
        "Zed",
        None,
    ),
    (
        "Continue, openai-adapters (the openai SDK)",
        {
            "User-Agent": "OpenAI/JS 5.23.2",
            "X-Stainless-Lang": "js",
            "X-Stainless-Package-Version": "5.23.2",
            "Authorization": "Bearer my-token",
        },
        "openai-node",
        None,
    ),
    (
        "Continue, older path (node-fetch, key in two headers)",
        {
            "Content-Type": "application/json",
            "Authorization": "Bearer my-token",
            "api-key": "my-token",
            "User-Agent": "node-fetch",
        },
        "node-fetch",
        None,
    ),
    (
        "Cline, OpenAI Compatible provider",
        {"User-Agent": "OpenAI/JS 4.96.0", "X-Stainless-Lang": "js"},
        "openai-node",
        None,
    ),
    (
        "Cline, to an OpenRouter-like host",
        {
            "User-Agent": "OpenAI/JS 4.96.0",
            "HTTP-Referer": "https://cline.bot",
            "X-Title": "Cline",
            "X-Cline-Version": "3.32.5",
        },
        "Cline",
        None,
    ),
    (
        "Aider through LiteLLM and the openai SDK",
        {"user-agent": "OpenAI/Python 1.109.1", "x-stainless-lang": "python"},
        "openai-python",
        None,
    ),
    (
        "Aider through LiteLLM to OpenRouter",
        {
            "user-agent": "AsyncOpenAI/Python 1.109.1",
            "HTTP-Referer": "http://aider.chat",
            "X-Title": "Aider",
        },
        "Aider",
        None,
    ),
    ("LiteLLM's own HTTP client", {"User-Agent": "litellm/1.77.7"}, "LiteLLM", None),
    (
        "LibreChat to OpenRouter",
        {
            "User-Agent": "OpenAI/JS 5.12.2",
            "HTTP-Referer": "https://librechat.ai",
            "X-Title": "LibreChat",
            "X-OpenRouter-Title": "LibreChat",
        },
        "LibreChat",
        None,
    ),
    (
        "Open WebUI forwarding user info",
        {
            "User-Agent": "Python/3.11 aiohttp/3.12.15",
            "Content-Type": "application/json",
            "X-OpenWebUI-User-Name": "Alice Doe",
            "X-OpenWebUI-User-Id": "9c1d2e3f-4a5b-6c7d-8e9f-0a1b2c3d4e5f",
            "X-OpenWebUI-User-Email": "alice@example.com",
            "X-OpenWebUI-User-Role": "user",
            "X-OpenWebUI-Chat-Id": _CHAT_ID,
        },
        "Open WebUI",
        _CHAT_ID,
    ),
    (
        "Open WebUI without forwarded user info",
        {"User-Agent": "Python/3.11 aiohttp/3.12.15", "Content-Type": "application/json"},
        "python-aiohttp",
        None,
    ),
    (
        "Roo Code, OpenAI-compatible provider",
        {
            "HTTP-Referer": "https://github.com/RooVetGit/Roo-Cline",
            "X-Title": "Roo Code",
            "User-Agent": "RooCode/3.28.0",
        },
        "Roo Code",
        None,
    ),
    (
        "Kilo Code",
        {
            "HTTP-Referer": "https://kilocode.ai",
            "X-Title": "Kilo Code",
            "X-KiloCode-Version": "4.97.0",
            "User-Agent": "Kilo-Code/4.97.0",
        },
        "Kilo Code",
        None,
    ),
    ("curl", {"User-Agent": "curl/8.5.0", "Accept": "*/*"}, "curl", None),
]


def _spellings(headers: dict[str, str]) -> list[Mapping[str, str]]:
    """The same headers as the bridge may hold them: any case, mitmproxy's, a HeaderView."""
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    return [
        headers,
        {k.lower(): v for k, v in headers.items()},
        {k.upper(): v for k, v in headers.items()},
        {k.title(): v for k, v in headers.items()},
        Headers(raw),
        header_view(Headers(raw)),
    ]


@pytest.mark.parametrize(
    ("headers", "client", "session_id"),
    [pytest.param(h, c, s, id=name) for name, h, c, s in CLIENT_HEADERS],
)
def test_real_header_sets(
    headers: dict[str, str], client: str | None, session_id: str | None
) -> None:
    for spelling in _spellings(headers):
        named = {k.lower(): v for k, v in spelling.items()}
        got = guess_client(named.get("user-agent"), named.get("originator"), headers=spelling)
        assert got == client, spelling
        assert session_id_from_headers(spelling) == session_id, spelling


@pytest.mark.parametrize(
    ("user_agent", "hints", "client"),
    [
        # A hint header counts only with a value; a known User-Agent beats it.
        ("ai/5.0.59 ai-sdk/provider-utils/3.0.10", {"x-opencode-client": "desktop"}, "OpenCode"),
        ("ai/5.0.59", {"X-OPENCODE-PROJECT": "global"}, "OpenCode"),
        ("ai/5.0.59", {"x-opencode-client": "   "}, "ai-sdk"),
        ("ai/5.0.59", {"x-opencode-session": _SES}, "ai-sdk"),  # others send it to OpenCode Go
        ("Python/3.13 aiohttp/3.13.0", {"x-openwebui-chat-id": _CHAT_ID}, "Open WebUI"),
        ("Python/3.13 aiohttp/3.13.0", {"x-openwebui-user-id": ""}, "python-aiohttp"),
        ("Zed/0.210.4 (linux; x86_64)", {"x-openwebui-user-id": "u1"}, "Zed"),
        ("claude-cli/2.0.14 (external, cli)", {"x-opencode-client": "cli"}, "Claude Code"),
        # X-Title: any case and padding; a title that merely contains a name is not one.
        ("OpenAI/JS 5.0.0", {"X-Title": "  AIDER "}, "Aider"),
        ("OpenAI/JS 5.0.0", {"x-title": "open webui"}, "Open WebUI"),
        ("OpenAI/JS 5.0.0", {"x-title": "LibreChat"}, "LibreChat"),
        ("OpenAI/JS 5.0.0", {"x-title": "Aider Pro"}, "openai-node"),
        ("OpenAI/JS 5.0.0", {"x-title": "Not Cline"}, "openai-node"),
        (None, {"x-title": "Clinex"}, None),
    ],
)
def test_header_hints(user_agent: str | None, hints: dict[str, str], client: str | None) -> None:
    assert guess_client(user_agent, None, headers=hints) == client


@pytest.mark.parametrize(
    ("headers", "session_id"),
    [
        # OpenCode fills X-Session-Id with a prompt-cache key for some providers: the
        # affinity header is its session.
        ({"X-Session-Id": "c0ffee-cache-key", "x-session-affinity": _SES}, _SES),
        ({"x-session-affinity": "", "x-session-id": "s-x"}, "s-x"),
        ({"x-session-affinity": "  ", "x-opencode-session": f" {_SES} "}, _SES),
        ({"X-OpenWebUI-Chat-Id": _CHAT_ID, "conversation_id": "c-1"}, _CHAT_ID),
        ({"x-parent-session-id": "ses_parent"}, None),
        ({"x-openwebui-user-id": "u1", "x-opencode-request": "msg_1"}, None),
    ],
)
def test_chat_completions_session_headers(headers: dict[str, str], session_id: str | None) -> None:
    assert session_id_from_headers(headers) == session_id


OPENCODE_CAPTURED = Path(__file__).parent / "fixtures" / "opencode_captured"


@pytest.mark.parametrize(
    "name", sorted(p.name for p in OPENCODE_CAPTURED.glob("*.headers.json")) or ["(none)"]
)
def test_captured_opencode_headers(name: str) -> None:
    """OpenCode's real requests (opencode-ai 1.18.33): named, with their session."""
    headers: dict[str, str] = orjson.loads((OPENCODE_CAPTURED / name).read_bytes())
    for spelling in _spellings(headers):
        named = {k.lower(): v for k, v in spelling.items()}
        assert guess_client(named["user-agent"], named.get("originator"), headers=spelling) == (
            "OpenCode"
        )
        session = session_id_from_headers(spelling)
        assert session == named["x-session-affinity"] and session.startswith("ses_")
