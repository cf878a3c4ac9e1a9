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
- OpenCode: builds its requests with the Vercel AI SDK and puts its own
  ``User-Agent: opencode/<version>`` in each call's headers; the SDK appends its parts
  (``opencode/1.1.53 ai/5.0.97 ai-sdk/provider-utils/3.0.17 runtime/bun/1.3.2`` in 1.1;
  ``opencode/1.18.33 ai-sdk/provider-utils/4.0.23 runtime/bun/1.3.14`` captured from 1.18,
  tests/fixtures/opencode_captured). The session (``ses_...``) is in ``x-session-affinity``
  (newer releases also send it as ``x-session-id``, and a sub-agent's parent in
  ``x-parent-session-id``). To a provider whose
  id starts with ``opencode`` (its own gateway, or a provider so named) it sends
  ``x-opencode-project`` / ``-session`` / ``-request`` / ``-client`` instead, older releases
  without the User-Agent. Its Codex sign-in sends ``originator: opencode``.
- Vercel AI SDK (any app built on it): ``ai-sdk/<provider>/<version>`` (e.g.
  ``ai-sdk/openai-compatible/1.0.19``) from the provider, ``ai/<version>`` from
  ``streamText`` and friends, ``ai-sdk/provider-utils/<version> runtime/<runtime>`` from
  the fetch; a caller's own User-Agent comes first. Named ``ai-sdk`` when nothing names the app.
- Zed: one global ``Zed/<version> (<os>; <arch>)`` (``macos``, ``linux``, ``windows``;
  ``aarch64``, ``x86_64``) for every request, OpenAI-compatible providers included.
- GitHub Copilot: VS Code's extension sets ``GitHubCopilotChat/<version>`` on every request
  (with ``X-VSCode-User-Agent-Library-Version``), its custom OpenAI-compatible models too,
  and does not let a user override it; the CLI sends ``copilot/<version>``. No session header.
- Roo Code: ``RooCode/<version>`` with ``X-Title: Roo Code`` on its OpenAI-compatible
  providers, or ``roo-code/<version> (...)`` with ``originator: roo-code`` and a
  ``session_id`` header on its Responses API providers.
- Kilo Code (a Roo Code fork): ``Kilo-Code/<version>``, ``X-Title: Kilo Code``,
  ``originator: kilo-code``.
- Cline: its "OpenAI Compatible" provider is the openai SDK with only the headers the user
  configured (``OpenAI/JS ...``); its provider for OpenRouter-like hosts adds
  ``X-Title: Cline``. Captures of its newer SDK-based builds, as other projects replay them,
  start the User-Agent with ``Cline/<version>`` (not in its published source here).
- Continue: the openai SDK (``OpenAI/JS ...``) through node-fetch, or, on its older path,
  node-fetch itself (``node-fetch``), with the key in ``Authorization`` and ``api-key``.
- Aider: LiteLLM, with ``X-Title: Aider`` to OpenRouter only. LiteLLM calls OpenAI-style
  hosts through the openai SDK (``OpenAI/Python ...``) and others with its own
  ``litellm/<version>`` (``LITELLM_USER_AGENT`` overrides it).
- LibreChat: the openai SDK; ``X-Title: LibreChat`` only to OpenRouter and Vercel.
- Open WebUI: aiohttp's ``Python/3.x aiohttp/3.x``; with ``ENABLE_FORWARD_USER_INFO_HEADERS``
  it adds ``X-OpenWebUI-User-Name`` / ``-Id`` / ``-Email`` / ``-Role`` and, in a chat,
  ``X-OpenWebUI-Chat-Id`` (read as the session); ``X-Title: Open WebUI`` to OpenRouter.
- Mux: ``mux/<version>``; Coder Agents: ``coder-agents/<version>``.
- Official Anthropic SDKs (Stainless-generated too): ``Anthropic/Python 0.x``,
  ``Anthropic/JS 0.x`` (``AsyncAnthropic``, ``AnthropicBedrock``… the same way).
- Official OpenAI SDKs (Stainless-generated): ``OpenAI/Python 1.x`` (the class name, so
  also ``AsyncOpenAI/Python``, ``AzureOpenAI/Python``), ``OpenAI/JS 4.x``,
  ``OpenAI/Go 1.x``, ``OpenAI/Java 2.x``; the .NET SDK ``OpenAI/2.x (.NET ...)``.
- curl, python-requests, python-httpx, Go's net/http, node-fetch: their default User-Agents.

Unsure: Cursor. Its requests to a custom base URL come from Cursor's servers; the
reference design recognises them by an ``x-cursor-client-version`` header, which we
also use (pass ``headers``), and a ``Cursor/`` User-Agent is accepted on faith.
Clients that only send an SDK's User-Agent (Cline, Continue, Aider, LibreChat, ...) are
reported as that SDK, except where an attribution header names them.
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
OPEN_WEBUI: Final = "Open WebUI"
AI_SDK: Final = "ai-sdk"

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
    ("cline/", "Cline"),
    ("cursor/", CURSOR),
    ("mux/", "Mux"),
    ("coder-agents/", "Coder Agents"),
    ("litellm/", "LiteLLM"),
    ("curl/", "curl"),
    ("python-requests/", "python-requests"),
    ("python-httpx/", "python-httpx"),
    ("go-http-client/", "Go net/http"),
    ("node-fetch/", "node-fetch"),  # node-fetch 2: "node-fetch/1.0 (+https://...)"
)
# Whole User-Agents (lower case) that carry no version.
_UA_EXACT: Final[dict[str, str]] = {"node-fetch": "node-fetch"}  # node-fetch 3

# X-Title is OpenRouter's attribution header; some clients send it to every provider,
# most only to OpenRouter (seen here when the bridge proxies that host).
_TITLES: Final[dict[str, str]] = {
    "roo code": ROO_CODE,
    "kilo code": KILO_CODE,
    "cline": "Cline",
    "aider": "Aider",
    "librechat": "LibreChat",
    "open webui": OPEN_WEBUI,
}
# Headers whose presence (non-empty) names the client that sends them.
_HINT_HEADERS: Final[tuple[tuple[str, str], ...]] = (
    ("x-cursor-client-version", CURSOR),
    ("x-opencode-client", OPENCODE),
    ("x-opencode-project", OPENCODE),
    ("x-openwebui-user-id", OPEN_WEBUI),
    ("x-openwebui-chat-id", OPEN_WEBUI),
)

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
# The Vercel AI SDK's own parts, each a whole space-separated token: "ai-sdk/<pkg>/<v>" or
# "ai/<v>" (never a word inside another product's token, such as "openai/5").
_AI_SDK_UA: Final = re.compile(r"(?:^|\s)(?:ai-sdk/[a-z0-9][a-z0-9.-]*/\d|ai/\d)")
_AIOHTTP_UA: Final = re.compile(r"^python/\d\S* aiohttp/\d")

# Header names that carry a client's session or conversation id, in order of preference.
_SESSION_HEADERS: Final = (
    "session_id",
    "session-id",
    "x-opencode-session",
    "x-session-affinity",  # OpenCode; before x-session-id, which it may fill otherwise
    "x-session-id",
    "x-claude-code-session-id",
    "x-openwebui-chat-id",
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
    header, OpenCode's and Open WebUI's own headers, and an ``X-Title`` attribution.
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
    if ua in _UA_EXACT:
        return _UA_EXACT[ua]

    if headers:
        lowered = _lowered(headers)
        for header, name in _HINT_HEADERS:
            if lowered.get(header, "").strip():
                return name
        title = lowered.get("x-title", "").strip().lower()
        if title in _TITLES:
            return _TITLES[title]

    if match := _SDK_UA.search(ua):
        return _SDKS[match.group(1)]
    if match := _ANTHROPIC_SDK_UA.search(ua):
        return _ANTHROPIC_SDKS[match.group(1)]
    if _DOTNET_UA.match(ua):
        return "openai-dotnet"
    if _AI_SDK_UA.search(ua):
        return AI_SDK
    if _AIOHTTP_UA.match(ua):
        return "python-aiohttp"
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
