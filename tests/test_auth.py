import pytest
from mitmproxy import http

from aibridge import auth
from aibridge.config import parse_config

PROVIDER_KEY = "sk-provider-0123456789abcdef"
CONFIG = parse_config(
    {
        "providers": [
            {
                "name": "openai",
                "base_url": "https://api.openai.com/v1",
                "api_key": PROVIDER_KEY,
                "extra_headers": {"OpenAI-Project": "p1"},
            }
        ],
        "users": [{"id": "alice", "token": "alice-token-1"}],
    },
    "test.yaml",
    {},
)
BYOK = parse_config(
    {
        **{"byok": True},
        "providers": [
            {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": PROVIDER_KEY}
        ],
        "users": [{"id": "alice", "token": "alice-token-1"}],
    },
    "t.yaml",
    {},
)
PROVIDER = CONFIG.providers[0]


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        ("", "..."),
        ("abcd", "..."),
        ("abcde", "a...e"),
        ("abcdefghi", "a...i"),
        ("abcdefghij", "ab...ij"),
        ("a" * 19, "aa...aa"),
        ("sk-proj-0123456789abcdefXYZ", "sk-p...fXYZ"),
    ],
)
def test_hint(secret, expected):
    assert auth.hint(secret) == expected


def headers(**kw) -> http.Headers:
    return http.Headers(**{k.replace("_", "-"): v for k, v in kw.items()})


def test_personal_token_bearer_and_x_api_key():
    for h in (headers(authorization="Bearer alice-token-1"), headers(x_api_key="alice-token-1")):
        identity = auth.identify(CONFIG, PROVIDER, h, {})
        assert identity.user_id == "alice"
        assert identity.credential_kind == "centralized"
        assert identity.upstream_key == PROVIDER_KEY
        assert identity.credential_hint == "sk-p...cdef"


def test_unknown_and_missing_tokens_refused():
    with pytest.raises(auth.AuthError, match="unknown bridge token"):
        auth.identify(CONFIG, PROVIDER, headers(authorization="Bearer stranger-token"), {})
    with pytest.raises(auth.AuthError, match="missing bridge token"):
        auth.identify(CONFIG, PROVIDER, headers(), {})
    with pytest.raises(auth.AuthError):
        auth.identify(CONFIG, PROVIDER, headers(authorization="Basic YWxpY2U6eA=="), {})


def test_unknown_token_message_shows_only_hint():
    with pytest.raises(auth.AuthError) as info:
        auth.identify(CONFIG, PROVIDER, headers(authorization="Bearer stranger-token-xyz"), {})
    assert "stranger-token-xyz" not in str(info.value)


def test_proxyauth_identity():
    identity = auth.identify(CONFIG, PROVIDER, headers(), {"proxyauth": ("carol", "pw")})
    assert (identity.user_id, identity.credential_kind) == ("carol", "centralized")


def test_byok():
    identity = auth.identify(
        BYOK, PROVIDER, headers(authorization="Bearer sk-users-own-key-123"), {}
    )
    assert identity.credential_kind == "byok"
    assert identity.upstream_key == "sk-users-own-key-123"
    assert identity.user_id == "byok:sk-u...-123"
    # a known personal token still wins
    assert (
        auth.identify(BYOK, PROVIDER, headers(authorization="Bearer alice-token-1"), {}).user_id
        == "alice"
    )


def test_install_and_mask_credentials():
    h = headers(
        authorization="Bearer alice-token-1",
        x_api_key="alice-token-1",
        proxy_authorization="Basic abc",
        user_agent="ua",
    )
    identity = auth.identify(CONFIG, PROVIDER, h, {})
    auth.install_credentials(h, PROVIDER, identity)
    assert h["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "x-api-key" not in h and "proxy-authorization" not in h
    assert h["openai-project"] == "p1" and h["user-agent"] == "ua"
    auth.mask_credentials(h, PROVIDER)
    assert h["authorization"] == "Bearer sk-p...cdef"
    # Configured provider headers may hold secrets too (Azure's api-key): hints only.
    assert h["openai-project"] == auth.hint("p1")
    assert PROVIDER_KEY not in str(h)


def test_conceal_shows_hints_and_reveal_restores_the_exact_fields():
    h = headers(authorization="Bearer alice-token-1", x_api_key="alice-token-1", accept="*/*")
    before = h.fields
    concealed = auth.conceal(h, auth.CLIENT_CREDENTIAL_HEADERS)
    assert h["authorization"] == "Bearer al...-1" and h["x-api-key"] == "al...-1"
    assert "alice-token-1" not in str(h.fields)
    h["user-agent"] = "added by another addon"
    auth.reveal(h, concealed)
    assert h.fields == (*before, (b"user-agent", b"added by another addon"))
    assert auth.conceal(h, ["proxy-authorization"]) == []


def test_conceal_survives_undecodable_bytes():
    h = http.Headers([(b"authorization", b"Bearer tok-\xff\xfe-secret-value-long")])
    concealed = auth.conceal(h, ["authorization"])
    assert b"secret-value" not in h.fields[0][1]
    auth.reveal(h, concealed)
    assert h.fields[0][1] == b"Bearer tok-\xff\xfe-secret-value-long"


CHATGPT = parse_config(
    {
        "providers": [
            {
                "name": "chatgpt",
                "type": "chatgpt",
                "base_url": "https://chatgpt.com/backend-api/codex",
            }
        ]
    },
    "test.yaml",
    {},
).providers[0]


def test_chatgpt_sign_in_is_forwarded_and_identified():
    h = headers(authorization="Bearer eyJchatgpt-oauth-token-xyz", chatgpt_account_id="acc-9")
    identity = auth.identify(CONFIG, CHATGPT, h, {})
    assert (identity.user_id, identity.credential_kind) == ("chatgpt-account:acc-9", "client")
    assert auth.identify(CONFIG, CHATGPT, h, {"proxyauth": ("dana", "pw")}).user_id == "dana"
    auth.install_credentials(h, CHATGPT, identity)
    assert h["authorization"] == "Bearer eyJchatgpt-oauth-token-xyz"
    with pytest.raises(auth.AuthError):
        auth.identify(CONFIG, CHATGPT, headers(), {})


# ---- Anthropic: the key goes as x-api-key; Claude subscriptions forwarded when allowed -------

ANTHROPIC_KEY = "sk-ant-api03-provider-0123456789"
OAUTH = "sk-ant-oat01-user-sign-in-0123456789abcdef"


def anthropic_config(**provider: object) -> object:
    return parse_config(
        {
            "providers": [
                {
                    "name": "anthropic",
                    "type": "anthropic",
                    "base_url": "https://api.anthropic.com/v1",
                    "api_key": ANTHROPIC_KEY,
                    **provider,
                }
            ],
            "users": [{"id": "alice", "token": "alice-token-1"}],
        },
        "t.yaml",
        {},
    )


@pytest.mark.parametrize(
    "client_headers",
    [
        {"x-api-key": "alice-token-1"},
        {"authorization": "Bearer alice-token-1"},
        {"authorization": "bearer alice-token-1", "x-api-key": "alice-token-1"},
    ],
)
def test_anthropic_key_goes_as_x_api_key(client_headers: dict[str, str]) -> None:
    config = anthropic_config()
    provider = config.providers[0]
    identity = auth.identify(config, provider, client_headers, {})
    assert (identity.user_id, identity.credential_kind) == ("alice", "centralized")
    headers = http.Headers(
        **{k.replace("-", "_"): v for k, v in client_headers.items()},
        anthropic_version="2023-06-01",
    )
    auth.install_credentials(headers, provider, identity)
    assert headers.get_all("x-api-key") == [ANTHROPIC_KEY]
    assert "authorization" not in headers
    assert headers["anthropic-version"] == "2023-06-01"
    # Masked for the flow: both credential headers are concealed.
    assert set(auth.upstream_credential_headers(provider)) >= {"x-api-key", "authorization"}
    auth.mask_credentials(headers, provider)
    assert ANTHROPIC_KEY not in str(headers.fields)


def test_subscription_sign_in_is_forwarded_only_when_configured() -> None:
    headers = {"authorization": f"Bearer {OAUTH}"}
    with pytest.raises(auth.AuthError):
        auth.identify(anthropic_config(), anthropic_config().providers[0], headers, {})
    config = anthropic_config(subscription=True)
    provider = config.providers[0]
    identity = auth.identify(config, provider, headers, {})
    assert identity.credential_kind == "subscription"
    assert identity.user_id == f"subscription:{auth.hint(OAUTH)}"
    assert identity.credential_hint == auth.hint(OAUTH)
    assert OAUTH not in repr(identity)
    named = auth.identify(config, provider, headers, {"proxyauth": ("bob", "pw")})
    assert named.user_id == "bob"
    sent = http.Headers(authorization=f"Bearer {OAUTH}")
    auth.install_credentials(sent, provider, identity)
    # The user's own token goes as the bearer it came as, never the provider key.
    assert sent.get_all("authorization") == [f"Bearer {OAUTH}"]
    assert "x-api-key" not in sent


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": OAUTH},  # an OAuth token is never sent as an API key
        {"authorization": "Bearer sk-ant-api03-someone-elses-key-0000"},
        {"authorization": "Bearer sk-ant-oa"},
        {"authorization": f"Basic {OAUTH}"},
        {},
    ],
)
def test_not_a_subscription_sign_in(headers: dict[str, str]) -> None:
    config = anthropic_config(subscription=True)
    with pytest.raises(auth.AuthError):
        auth.identify(config, config.providers[0], headers, {})


def test_a_bridge_token_wins_over_subscription() -> None:
    config = anthropic_config(subscription=True)
    headers = {"authorization": "Bearer alice-token-1"}
    identity = auth.identify(config, config.providers[0], headers, {})
    assert (identity.user_id, identity.credential_kind) == ("alice", "centralized")


AZURE_KEY = "azure-provider-key-0123456789abcdef"


def azure_config(**provider: object) -> object:
    return parse_config(
        {
            "providers": [
                {
                    "name": "azure",
                    "type": "openai_compatible",
                    "base_url": "https://r.openai.azure.com/openai/v1",
                    "api_key": AZURE_KEY,
                    "key_header": "api-key",
                    **provider,
                }
            ],
            "users": [{"id": "alice", "token": "alice-token-1"}],
        },
        "t.yaml",
        {},
    )


@pytest.mark.parametrize(
    "client_headers",
    [
        {"api-key": "alice-token-1"},  # the AzureOpenAI SDKs' way
        {"Api-Key": " alice-token-1 "},
        {"authorization": "Bearer alice-token-1"},
        {"x-api-key": "alice-token-1", "api-key": "something-else"},
    ],
)
def test_a_provider_key_header_of_its_own(client_headers: dict[str, str]) -> None:
    config = azure_config()
    provider = config.providers[0]
    headers = http.Headers([(k.encode(), v.encode()) for k, v in client_headers.items()])
    identity = auth.identify(config, provider, headers, {})
    assert (identity.user_id, identity.credential_kind) == ("alice", "centralized")
    auth.install_credentials(headers, provider, identity)
    # Only the provider key, in its own header; every client credential header is gone.
    assert headers.get_all("api-key") == [AZURE_KEY]
    assert "authorization" not in headers and "x-api-key" not in headers
    assert "api-key" in auth.upstream_credential_headers(provider)
    auth.mask_credentials(headers, provider)
    assert AZURE_KEY not in str(headers.fields)


def test_a_refused_client_api_key_is_masked() -> None:
    headers = http.Headers(api_key="alice-token-1-and-more")
    auth.mask_client_credentials(headers)
    assert headers["api-key"] == auth.hint("alice-token-1-and-more")


def test_a_custom_key_header_is_sent_bare_and_authorization_as_bearer() -> None:
    for key_header, want in (
        ("x-goog-api-key", AZURE_KEY),
        ("authorization", f"Bearer {AZURE_KEY}"),
    ):
        config = azure_config(key_header=key_header)
        provider = config.providers[0]
        headers = http.Headers(authorization="Bearer alice-token-1")
        auth.install_credentials(headers, provider, auth.identify(config, provider, headers, {}))
        assert headers.get_all(key_header) == [want]
