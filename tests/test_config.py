import re
from pathlib import Path

import pytest

from aibridge.auth import identify
from aibridge.config import ConfigError, Provider, load_config, parse_config, sha256_hex

GOOD = """
database: audit.db
providers:
  - name: openai
    type: openai
    base_url: https://api.openai.com/v1/
    api_key: ${{PROVIDER_KEY}}
    extra_headers:
      OpenAI-Organization: org-1
users:
  - id: alice
    token: ${{ALICE_TOKEN}}
  - id: bob
    token_sha256: {}
byok: true
privacy:
  store_prompts: false
websocket: bridge
""".format(sha256_hex("bob-secret-token"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_full_config(tmp_path: Path) -> None:
    env = {"PROVIDER_KEY": "sk-provider-123456789012345", "ALICE_TOKEN": "alice-secret"}
    config = load_config(write(tmp_path, GOOD), env)
    assert config.database == str(tmp_path.resolve() / "audit.db")
    (provider,) = config.providers
    assert provider.base_url == "https://api.openai.com/v1"
    assert (provider.scheme, provider.host, provider.port, provider.base_path) == (
        "https",
        "api.openai.com",
        443,
        "/v1",
    )
    assert provider.api_key == env["PROVIDER_KEY"]
    assert provider.extra_headers == {"OpenAI-Organization": "org-1"}
    assert config.user_for_token("alice-secret").id == "alice"
    assert config.user_for_token("bob-secret-token").id == "bob"
    assert config.user_for_token("nobody-token") is None
    assert config.byok is True
    assert config.privacy.store_prompts is False and config.privacy.store_thoughts is True
    assert config.websocket == "bridge"
    assert config.passthrough is None  # not given: each provider's own
    assert config.passthrough_for(provider)[0] == "/v1/models"


def test_shipped_example_config_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "config.yaml"
    config = load_config(example, {"AIBRIDGE_TOKEN": "a-long-token", "USER": "dev"})
    assert config.providers[0].name == "openai"
    assert config.user_for_token("a-long-token").id == "dev"
    # Without the environment it still starts, with warnings that say what to set.
    bare = load_config(example, {})
    assert bare.users == ()
    assert any("api_key is empty" in w for w in bare.warnings)
    assert any("users[0].token is empty" in w for w in bare.warnings)


def test_env_default_syntax(tmp_path: Path) -> None:
    text = GOOD.replace("${PROVIDER_KEY}", "${NOPE:-fallback-key}")
    config = load_config(write(tmp_path, text), {"ALICE_TOKEN": "alice-secret"})
    assert config.providers[0].api_key == "fallback-key"


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (("${PROVIDER_KEY}", "${MISSING_VAR}"), "providers[0].api_key", "MISSING_VAR is not set"),
        (("https://api.openai.com/v1/", "ftp://x"), "providers[0].base_url", "http(s) URL"),
        (("type: openai", "type: bogus"), "providers[0].type", "unsupported provider type"),
        (("websocket: bridge", "websocket: maybe"), "websocket", "must be one of"),
        (("byok: true", "byok: perhaps"), "byok", "true or false"),
        (("database: audit.db", "databse: audit.db"), "databse", "unknown key"),
        (("    token: ${ALICE_TOKEN}", "    token: short"), "users[0].token", "too short"),
        (("token_sha256: ", "token_sha256: zz"), "users[1].token_sha256", "64 hexadecimal"),
        (("  - id: bob\n", "  - idx: bob\n"), "users[1].idx", "unknown key"),
    ],
)
def test_errors_name_file_key_and_problem(tmp_path: Path, edit, key, problem) -> None:
    path = write(tmp_path, GOOD.replace(*edit))
    env = {"PROVIDER_KEY": "k" * 30, "ALICE_TOKEN": "alice-secret"}
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    message = str(info.value)
    assert str(path) in message
    assert info.value.key == key
    assert problem in message


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml", {})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "providers: [unclosed"), {})
    with pytest.raises(ConfigError, match="providers: is required"):
        load_config(write(tmp_path, "database: x.db\n"), {})


def test_duplicate_tokens_and_names_rejected(tmp_path: Path) -> None:
    bob_line = "token_sha256: {}".format(sha256_hex("bob-secret-token"))
    text = GOOD.replace(bob_line, "token: alice-secret")
    with pytest.raises(ConfigError, match="same token"):
        load_config(write(tmp_path, text), {"PROVIDER_KEY": "k", "ALICE_TOKEN": "alice-secret"})


def test_no_secret_shows_in_a_repr() -> None:
    """Logs, tracebacks and debuggers print reprs: they get hints only."""

    key, header_secret, token = (
        "sk-live-provider-key-0123456789",
        "azure-secret-value-42",
        "tok-12345678",
    )
    config = parse_config(
        {
            "providers": [
                {
                    "name": "p",
                    "base_url": "https://h.example/v1",
                    "api_key": key,
                    "extra_headers": {"api-key": header_secret},
                }
            ],
            "users": [{"id": "alice", "token": token}],
        },
        "repr.yaml",
        {},
    )
    identity = identify(config, config.providers[0], {"authorization": f"Bearer {token}"}, {})
    for shown in (repr(config), repr(config.providers[0]), repr(identity), str(config)):
        assert key not in shown and header_secret not in shown and token not in shown
        assert sha256_hex(token) not in shown
    assert "sk-l...6789" in repr(config.providers[0])


def test_anthropic_provider() -> None:
    raw = {
        "providers": [
            {
                "name": "claude",
                "type": "anthropic",
                "base_url": "https://api.anthropic.com/v1/",
                "api_key": "sk-ant-api03-0123456789abcdef",
                "subscription": True,
            }
        ]
    }
    config = parse_config(raw, "c.yaml", {})
    (provider,) = config.providers
    assert (provider.type, provider.base_url, provider.key_header) == (
        "anthropic",
        "https://api.anthropic.com/v1",
        "x-api-key",
    )
    assert provider.subscription is True
    assert "0123456789abcdef" not in repr(provider) and "subscription=True" in repr(provider)
    assert config.passthrough_for(provider) == (
        "/v1/messages/count_tokens",
        "/v1/models",
        "/v1/models/*",
    )


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"type": "openai", "subscription": True}, "only an anthropic provider"),
        ({"type": "chatgpt", "subscription": True}, "only an anthropic provider"),
        ({"type": "anthropic", "subscription": "sometimes"}, "must be true or false"),
        ({"type": "claude"}, "unsupported provider type 'claude'"),
    ],
)
def test_bad_anthropic_provider(entry: dict[str, object], problem: str) -> None:
    raw = {"providers": [{"name": "p", "base_url": "https://h/v1", "api_key": "", **entry}]}
    with pytest.raises(ConfigError, match=problem) as info:
        parse_config(raw, "c.yaml", {})
    assert "c.yaml: providers[0]." in str(info.value)


# ------------------------------------------------ providers of Chat Completions (issue 13)


def one_provider(**entry: object) -> Provider:
    raw = {
        "providers": [{"name": "p", "base_url": "https://h.example/v1", "api_key": "k", **entry}]
    }
    (provider,) = parse_config(raw, "c.yaml", {}).providers
    return provider


@pytest.mark.parametrize(
    ("ptype", "apis", "key_header"),
    [
        ("openai", ("responses", "chat_completions"), "authorization"),
        ("chatgpt", ("responses",), "authorization"),
        ("anthropic", ("messages",), "x-api-key"),
        ("openai_compatible", ("chat_completions",), "authorization"),
    ],
)
def test_the_apis_and_key_header_of_each_type(
    ptype: str, apis: tuple[str, ...], key_header: str
) -> None:
    entry: dict[str, object] = {"type": ptype}
    if ptype == "chatgpt":
        entry["api_key"] = ""
    provider = one_provider(**entry)
    assert (provider.apis, provider.key_header) == (apis, key_header)


def test_an_azure_style_provider() -> None:
    provider = one_provider(
        type="openai_compatible",
        base_url="https://r.openai.azure.com/openai/v1/?api-version=preview",
        key_header="API-Key",
        apis=["chat_completions", "responses"],
    )
    assert provider.base_url == "https://r.openai.azure.com/openai/v1?api-version=preview"
    assert (provider.base_path, provider.base_query) == ("/openai/v1", "api-version=preview")
    assert (provider.key_header, provider.apis) == ("api-key", ("chat_completions", "responses"))
    # Passthrough defaults follow the APIs it serves, not its type.
    assert "/v1/responses/*" in provider.default_passthrough
    assert "/v1/chat/completions/*" in provider.default_passthrough
    assert "apis=('chat_completions', 'responses')" in repr(provider)


@pytest.mark.parametrize(
    ("entry", "key", "problem"),
    [
        ({"apis": []}, "apis", "must name at least one API"),
        ({"apis": "chat_completions"}, "apis", "must be a list of strings"),
        ({"apis": ["chat"]}, "apis[0]", "unknown API 'chat' (known: responses, messages"),
        ({"apis": ["responses", "responses"]}, "apis[1]", "listed twice"),
        ({"apis": [1]}, "apis", "must be a list of strings"),
        (
            {"type": "chatgpt", "api_key": "", "apis": ["chat_completions"]},
            "apis",
            "only the responses",
        ),
        ({"key_header": "api key"}, "key_header", "must be an HTTP header name"),
        ({"key_header": "x:y"}, "key_header", "must be an HTTP header name"),
        ({"key_header": ["api-key"]}, "key_header", "must be a string"),
        ({"type": "chatgpt", "api_key": "", "key_header": "api-key"}, "key_header", "holds no key"),
        ({"base_url": "https://h/v1#frag"}, "base_url", "must not have a #fragment"),
        ({"type": "openai-compatible"}, "type", "unsupported provider type"),
    ],
)
def test_bad_provider_apis_and_headers(entry: dict[str, object], key: str, problem: str) -> None:
    raw = {"providers": [{"name": "p", "base_url": "https://h/v1", "api_key": "k", **entry}]}
    with pytest.raises(ConfigError, match=re.escape(problem)) as info:
        parse_config(raw, "c.yaml", {})
    assert f"c.yaml: providers[0].{key}: " in str(info.value)


@pytest.mark.parametrize(
    ("section", "request_usage"),
    [
        (None, True),
        ({}, True),
        ({"request_usage": False}, False),
        ({"request_usage": "off"}, False),
    ],
)
def test_chat_completions_section(section: object, request_usage: bool) -> None:
    raw: dict[str, object] = {
        "providers": [{"name": "p", "base_url": "https://h/v1", "api_key": "k"}]
    }
    if section is not None:
        raw["chat_completions"] = section
    assert parse_config(raw, "c.yaml", {}).chat_completions.request_usage is request_usage


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"request_usage": "sometimes"}, "chat_completions.request_usage: must be true or false"),
        ({"include_usage": True}, "chat_completions.include_usage: unknown key"),
        ("yes", "chat_completions: must be a mapping"),
    ],
)
def test_bad_chat_completions_section(section: object, problem: str) -> None:
    raw = {
        "providers": [{"name": "p", "base_url": "https://h/v1", "api_key": "k"}],
        "chat_completions": section,
    }
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse_config(raw, "c.yaml", {})


def test_the_shipped_config_examples_are_valid(tmp_path: Path) -> None:
    """Every commented provider example of config.yaml, uncommented, loads."""
    shipped = (Path(__file__).parent.parent / "config.yaml").read_text()
    head, rest = shipped.split("\nproviders:\n", 1)
    section, tail = rest.split("\nusers:\n", 1)
    # Example lines are "  # - key: v" and "  #   key: v"; prose is "  # Words".
    section = re.sub(r"(?m)^  # (- |  )", r"  \1", section)
    text = f"{head}\nproviders:\n{section}\nusers:\n{tail}"
    config = load_config(write(tmp_path, text), {"AIBRIDGE_TOKEN": "t" * 12})
    assert [p.name for p in config.providers] == ["openai", "azure", "openrouter", "anthropic"]
    azure = config.provider_named("azure")
    assert azure is not None
    assert (azure.key_header, azure.base_query) == ("api-key", "api-version=preview")
    openrouter = config.provider_named("openrouter")
    assert openrouter is not None and openrouter.apis == ("chat_completions", "responses")


@pytest.mark.parametrize(
    ("days", "periods", "warned"),
    [
        (10, ["month"], "shorter than a month"),
        (30, ["day", "month"], "shorter than a month"),
        (6, ["week"], "shorter than a week"),
        (31, ["month"], None),
        (7, ["day", "week"], None),
        (1, ["day"], None),
    ],
)
def test_retention_shorter_than_a_budget_period_is_warned(
    days: int, periods: list[str], warned: str | None
) -> None:
    # Spend is read back from the log: rows deleted too young are spend forgotten.
    raw = {
        "providers": [{"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": "k"}],
        "retention": {"days": days},
        "groups": [
            {
                "name": "team",
                "members": ["*"],
                "shared_limits": {"spend_usd": dict.fromkeys(periods, 5)},
            }
        ],
    }
    warnings = [w for w in parse_config(raw, "c.yaml", {}).warnings if "retention" in w]
    if warned is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.startswith("c.yaml: retention.days") and warned in warning
