"""Which AI client sent a request, and its session id, from the request headers (DESIGN §3).

Best effort: clients are free to send any User-Agent, many send a generic SDK one, and a
name here is a guess for grouping, never an identity. What each client sends, as found
in its published source:

- Codex: ``originator`` ``codex_cli_rs`` / ``codex_exec`` / ``codex_vscode`` /
  ``codex-tui`` / ``codex_sdk_ts`` ..., and a User-Agent that starts with the same word
  (``codex_cli_rs/0.x (...)``); session in ``session_id`` (older) or ``session-id``
  (newer, with ``thread-id``) and in ``client_metadata.session_id``.
- Claude Code: ``claude-cli/<version> (external, cli)``; session in
  ``X-Claude-Code-Session-Id``.
- Zed: ``Zed/<version> (<os>; <arch>)``.
- GitHub Copilot: ``GitHubCopilotChat/<version>`` (VS Code), ``copilot/<version>`` (CLI).
- Roo Code: ``RooCode/<version>``, or ``roo-code/<version> (...)`` with ``originator:
  roo-code`` and a ``session_id`` header on its Responses API providers.
- Kilo Code (a Roo Code fork): ``Kilo-Code/<version>``, ``originator: kilo-code``.
- OpenCode: ``opencode/<version>``, ``originator: opencode``.
- Mux: ``mux/<version>``; Coder Agents: ``coder-agents/<version>``.
- Official Anthropic SDKs (Stainless-generated too): ``Anthropic/Python 0.x``,
  ``Anthropic/JS 0.x`` (``AsyncAnthropic``, ``AnthropicBedrock``… the same way).
- Official OpenAI SDKs (Stainless-generated): ``OpenAI/Python 1.x`` (the class name, so
  also ``AsyncOpenAI/Python``, ``AzureOpenAI/Python``), ``OpenAI/JS 4.x``,
  ``OpenAI/Go 1.x``, ``OpenAI/Java 2.x``; the .NET SDK ``OpenAI/2.x (.NET ...)``.
- curl, python-requests, python-httpx, Go's net/http: their default User-Agents.

Unsure: Cursor. Its requests to a custom base URL come from Cursor's servers; the
reference design recognises them by an ``x-cursor-client-version`` header, which we
also use (pass ``headers``), and a ``Cursor/`` User-Agent is accepted on faith.
Clients that only send an SDK's User-Agent (Cline, Continue, Aider, ...) are reported
as that SDK, except where an ``X-Title`` attribution header names them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from aibridge.headers import HeaderView

CODEX: Final = "Codex"
CLAUDE_CODE: Final = "Claude Code"
CURSOR: Final = "Cursor"
ZED: Final = "Zed"
GITHUB_COPILOT: Final = "GitHub Copilot"
ROO_CODE: Final = "Roo Code"
KILO_CODE: Final = "Kilo Code"
OPENCODE: Final = "OpenCode"

# originator header values (lower case) that name a client outright.
_ORIGINATORS: Final[dict[str, str]] = {
    "kilo-code": KILO_CODE,
    "roo-code": ROO_CODE,
    "opencode": OPENCODE,
}

# User-Agent prefixes (lower case), most specific first; the first match wins.
_UA_PREFIXES: Final[tuple[tuple[str, str], ...]] = (
    ("codex", CODEX),  # codex_cli_rs/, codex_exec/, codex_vscode/, codex-tui/ ...
    ("claude-cli/", CLAUDE_CODE),
    ("claude-code/", CLAUDE_CODE),
    ("zed/", ZED),
    ("githubcopilotchat/", GITHUB_COPILOT),
    ("copilot/", GITHUB_COPILOT),
    ("kilo-code/", KILO_CODE),
    ("roo-code/", ROO_CODE),
    ("roocode/", ROO_CODE),
    ("opencode/", OPENCODE),
    ("cursor/", CURSOR),
    ("mux/", "Mux"),
    ("coder-agents/", "Coder Agents"),
    ("curl/", "curl"),
    ("python-requests/", "python-requests"),
    ("python-httpx/", "python-httpx"),
    ("go-http-client/", "Go net/http"),
)

# X-Title is OpenRouter's attribution header; some clients send it to every provider.
_TITLES: Final[dict[str, str]] = {
    "roo code": ROO_CODE,
    "kilo code": KILO_CODE,
    "cline": "Cline",
}

# Stainless SDKs put "<client class>/<language> <version>" in the User-Agent.
_SDK_UA: Final = re.compile(r"(?:^|[\s;(])(?:async)?(?:azure)?openai/(python|js|go|java)\b")
_SDKS: Final[dict[str, str]] = {
    "python": "openai-python",
    "js": "openai-node",
    "go": "openai-go",
    "java": "openai-java",
}
_DOTNET_UA: Final = re.compile(r"^openai/\d\S* \(\.net")
_ANTHROPIC_SDK_UA: Final = re.compile(r"(?:^|[\s;(])(?:async)?anthropic\w*/(python|js|go|java)\b")
_ANTHROPIC_SDKS: Final[dict[str, str]] = {
    "python": "anthropic-python",
    "js": "anthropic-node",
    "go": "anthropic-go",
    "java": "anthropic-java",
}

# Header names that carry a client's session or conversation id, in order of preference.
_SESSION_HEADERS: Final = (
    "session_id",
    "session-id",
    "x-session-id",
    "x-claude-code-session-id",
    "conversation_id",
    "conversation-id",
)


def guess_client(
    user_agent: str | None,
    originator: str | None,
    *,
    headers: Mapping[str, str] | None = None,
) -> str | None:
    """A client name for the interception's ``client`` column, or None when unknown.

    ``headers`` (optional, any case) lets a few other hints count: Cursor's version
    header and an ``X-Title`` attribution.
    """
    ua = (user_agent or "").strip().lower()
    orig = (originator or "").strip().lower()

    # An explicit originator is the clearest signal, and forks reuse their parent's UA.
    if orig.startswith("codex"):
        return CODEX
    if orig in _ORIGINATORS:
        return _ORIGINATORS[orig]

    for prefix, name in _UA_PREFIXES:
        if ua.startswith(prefix):
            return name

    if headers:
        lowered = _lowered(headers)
        if lowered.get("x-cursor-client-version"):
            return CURSOR
        title = lowered.get("x-title", "").strip().lower()
        if title in _TITLES:
            return _TITLES[title]

    if match := _SDK_UA.search(ua):
        return _SDKS[match.group(1)]
    if match := _ANTHROPIC_SDK_UA.search(ua):
        return _ANTHROPIC_SDKS[match.group(1)]
    if _DOTNET_UA.match(ua):
        return "openai-dotnet"
    return None


def session_id_from_headers(headers: Mapping[str, str]) -> str | None:
    """The client's session id from its request headers, or None (names matched in any case)."""
    lowered = _lowered(headers)
    for name in _SESSION_HEADERS:
        value = lowered.get(name, "").strip()
        if value:
            return value
    return None


def _lowered(headers: Mapping[str, str]) -> Mapping[str, str]:
    # mitmproxy's Headers already match any case (and copying them costs more than the
    # look-ups), a HeaderView is lower-case already; any other dict is normalised.
    if isinstance(headers, HeaderView) or hasattr(headers, "get_all"):
        return headers
    return {str(name).lower(): value for name, value in headers.items() if isinstance(value, str)}
