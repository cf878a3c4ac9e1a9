import pytest

from aibridge.config import parse_config
from aibridge.routing import RouteKind, Router, classify

CONFIG = parse_config(
    {
        "providers": [
            {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": "k"},
            {"name": "azure", "base_url": "https://x.example.com/openai/v1", "api_key": "k"},
            {"name": "local", "base_url": "http://127.0.0.1:9999/v1", "api_key": "k"},
        ]
    },
    "test.yaml",
    {},
)


def route(method, host, port, path, **kw):
    return classify(CONFIG, method, host, port, path, **kw)


def test_reverse_or_regular_by_host():
    r = route("POST", "api.openai.com", 443, "/v1/responses")
    assert r.kind is RouteKind.BRIDGED and r.provider.name == "openai"
    assert r.upstream_path is None
    assert route("POST", "127.0.0.1", 9999, "/v1/responses").provider.name == "local"
    assert route("POST", "API.OPENAI.COM", 443, "/v1/responses/").kind is RouteKind.BRIDGED


def test_other_hosts_untouched():
    assert route("POST", "example.org", 443, "/v1/responses").kind is RouteKind.UNRELATED
    assert route("POST", "api.openai.com", 80, "/v1/responses").kind is RouteKind.UNRELATED
    assert route("POST", "127.0.0.1", 9998, "/v1/responses").kind is RouteKind.UNRELATED


def test_route_prefix_rewrites_to_base_url():
    r = route("POST", "bridge.local", 8080, "/azure/v1/responses?api-version=1")
    assert r.kind is RouteKind.BRIDGED and r.provider.name == "azure"
    assert r.upstream_path == "/openai/v1/responses?api-version=1"
    r = route("GET", "127.0.0.1", 8080, "/openai/v1/models")
    assert (r.kind, r.upstream_path) == (RouteKind.PASSTHROUGH, "/v1/models")
    assert route("POST", "x", 1, "/openai/responses").kind is RouteKind.FORBIDDEN


def test_base_path_maps_to_v1():
    r = route("POST", "x.example.com", 443, "/openai/v1/responses")
    assert r.kind is RouteKind.BRIDGED and r.api_path == "/v1/responses"
    assert route("POST", "x.example.com", 443, "/elsewhere").kind is RouteKind.FORBIDDEN


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("GET", "/v1/models", RouteKind.PASSTHROUGH),
        ("GET", "/v1/models/gpt-5", RouteKind.PASSTHROUGH),
        ("GET", "/v1/responses/resp_1", RouteKind.PASSTHROUGH),
        ("DELETE", "/v1/responses/resp_1", RouteKind.PASSTHROUGH),
        ("POST", "/v1/conversations", RouteKind.PASSTHROUGH),
        ("GET", "/v1/conversations/c1/items", RouteKind.PASSTHROUGH),
        ("POST", "/v1/chat/completions", RouteKind.BRIDGED),
        ("POST", "/v1/completions", RouteKind.FORBIDDEN),
        ("GET", "/v1/files", RouteKind.FORBIDDEN),
        ("GET", "/v1/responses", RouteKind.FORBIDDEN),
        ("PUT", "/v1/responses", RouteKind.FORBIDDEN),
        ("POST", "/v1/responses", RouteKind.BRIDGED),
    ],
)
def test_passthrough_allow_list(method, path, kind):
    assert route(method, "api.openai.com", 443, path).kind is kind


def test_websocket_upgrade_on_responses_path():
    r = route("GET", "api.openai.com", 443, "/v1/responses", websocket_upgrade=True)
    assert r.kind is RouteKind.WEBSOCKET


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
)


def test_chatgpt_codex_endpoint_in_regular_proxy_mode():
    r = classify(CHATGPT, "POST", "chatgpt.com", 443, "/backend-api/codex/responses")
    assert r.kind is RouteKind.BRIDGED and r.provider.name == "chatgpt"
    # Other Codex backend paths pass with the client's credential; the web app is untouched.
    assert (
        classify(CHATGPT, "GET", "chatgpt.com", 443, "/backend-api/codex/models").kind
        is RouteKind.PASSTHROUGH
    )
    assert classify(CHATGPT, "GET", "chatgpt.com", 443, "/c/123").kind is RouteKind.UNRELATED


@pytest.mark.parametrize(
    "path",
    ["/v1/models/../responses", "/v1/x/%2E%2e/responses", "/openai/v1/./responses", "/v1\\..\\x"],
)
def test_dot_segments_are_refused(path):
    assert route("POST", "api.openai.com", 443, path).kind is RouteKind.FORBIDDEN


def test_dot_segments_on_chatgpt_com_cannot_reach_the_codex_endpoint_unrecorded():
    path = "/c/../backend-api/codex/responses"
    assert classify(CHATGPT, "POST", "chatgpt.com", 443, path).kind is RouteKind.FORBIDDEN


@pytest.mark.parametrize("path", ["/v1//responses", "/v1/respons%65s", "/openai/v1/responses//"])
def test_paths_a_server_would_read_as_the_responses_api_are_recorded(path):
    r = route("POST", "api.openai.com", 443, path)
    assert (r.kind, r.api_path) == (RouteKind.BRIDGED, "/v1/responses")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/responses/%20",
        "/v1/responses/%09",
        "/v1/responses/-",
        "/v1/responses/.x",
        "/v1/responses/;",
        "/v1/responses/%2F",
        "/v1/responses/%2f%2f",
        "/v1/responses/resp_1/",
        "/v1/responses/resp_1//input_items",
        "/v1/models/",
        "/v1/models//gpt-5",
        "/v1//models",
        "/v1/models/%00",
        "/v1/models/gpt 5",
        "/v1/conversations/%3B",
        "/v1/conversations/c1/items/%20",
        "/openai/v1/models/",
        "/openai/v1/responses/%20",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_passthrough_needs_whole_well_formed_segments(method: str, path: str) -> None:
    """A server may read an empty, blank or punctuation-only segment as nothing at all, so
    ``POST /v1/responses/%20`` could create a response past the log: such paths get 403."""
    kind = route(method, "api.openai.com", 443, path).kind
    # "/v1/responses/%2F" is read as "/v1/responses": a POST there is recorded.
    assert kind is RouteKind.FORBIDDEN or (kind is RouteKind.BRIDGED and method == "POST")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/gpt-5",
        "/v1/models/ft:gpt-4o-mini:my-org::abc123",
        "/v1/models/o3-2025-04-16",
        "/v1/responses/resp_68af4030592c81938ec0a5fbab4a3e9f",
        "/v1/responses/resp_1/input_items",
        "/v1/responses/resp%5F1",
        "/v1/conversations/conv_1/items/msg_2",
        "/openai/v1/models/gpt-5",
    ],
)
def test_passthrough_takes_real_ids(path: str) -> None:
    assert route("GET", "api.openai.com", 443, path).kind is RouteKind.PASSTHROUGH


def test_chatgpt_paths_need_well_formed_segments_too() -> None:
    ok = classify(CHATGPT, "GET", "chatgpt.com", 443, "/backend-api/codex/models")
    assert ok.kind is RouteKind.PASSTHROUGH
    for path in (
        "/backend-api/codex/%20",
        "/backend-api/codex//x",
        "/backend-api/codex/responses/",
    ):
        kind = classify(CHATGPT, "POST", "chatgpt.com", 443, path).kind
        assert kind in (RouteKind.FORBIDDEN, RouteKind.BRIDGED), path


@pytest.mark.parametrize("host", ["API.OPENAI.COM", "api.openai.com.", "Api.OpenAI.Com."])
def test_hosts_compare_as_dns_names(host: str) -> None:
    r = route("POST", host, 443, "/v1/responses")
    assert (r.kind, r.provider.name) == (RouteKind.BRIDGED, "openai")


def test_a_base_url_with_a_trailing_dot_matches_its_host() -> None:
    config = parse_config(
        {"providers": [{"name": "p", "base_url": "https://API.example.com./v1", "api_key": "k"}]},
        "test.yaml",
        {},
    )
    for host in ("api.example.com", "api.example.com.", "API.EXAMPLE.COM"):
        assert classify(config, "POST", host, 443, "/v1/responses").kind is RouteKind.BRIDGED
    assert (
        classify(config, "POST", "api.example.co", 443, "/v1/responses").kind is RouteKind.UNRELATED
    )


# ---- Anthropic providers: the Messages API, and nothing of OpenAI's ---------------------------

WITH_ANTHROPIC = parse_config(
    {
        "providers": [
            {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": "k"},
            {
                "name": "anthropic",
                "type": "anthropic",
                "base_url": "https://api.anthropic.com/v1",
                "api_key": "k",
            },
        ]
    },
    "test.yaml",
    {},
)


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/anthropic/v1/messages", "/v1/messages"),
        ("/anthropic/v1/messages?beta=true", "/v1/messages?beta=true"),
        ("/anthropic/v1/messages/", "/v1/messages/"),
        ("/anthropic/v1//messages?beta=true&x=1", "/v1//messages?beta=true&x=1"),
    ],
)
def test_messages_by_route_prefix(path: str, upstream: str) -> None:
    r = classify(WITH_ANTHROPIC, "POST", "bridge.local", 8080, path)
    assert (r.kind, r.provider.name, r.api.name, r.api_path) == (
        RouteKind.BRIDGED,
        "anthropic",
        "messages",
        "/v1/messages",
    )
    assert r.upstream_path == upstream


@pytest.mark.parametrize("host", ["api.anthropic.com", "API.Anthropic.COM", "api.anthropic.com."])
def test_messages_by_host(host: str) -> None:
    r = classify(WITH_ANTHROPIC, "POST", host, 443, "/v1/messages?beta=true")
    assert (r.kind, r.api.name, r.upstream_path) == (RouteKind.BRIDGED, "messages", None)


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("POST", "/v1/messages/count_tokens", RouteKind.PASSTHROUGH),
        ("GET", "/v1/models", RouteKind.PASSTHROUGH),
        ("GET", "/v1/models/claude-sonnet-4-5", RouteKind.PASSTHROUGH),
        ("GET", "/v1/messages", RouteKind.FORBIDDEN),  # only POST creates a message
        ("POST", "/v1/responses", RouteKind.FORBIDDEN),  # not an Anthropic API
        ("GET", "/v1/responses", RouteKind.FORBIDDEN),
        ("GET", "/v1/conversations", RouteKind.FORBIDDEN),  # OpenAI's passthrough, not ours
        ("POST", "/v1/messages/batches", RouteKind.FORBIDDEN),
        ("POST", "/v1/complete", RouteKind.FORBIDDEN),
        ("POST", "/v1/messages/../responses", RouteKind.FORBIDDEN),
        ("POST", "/v1/messages/%2e%2e/count_tokens", RouteKind.FORBIDDEN),
    ],
)
def test_anthropic_provider_paths(method: str, path: str, kind: RouteKind) -> None:
    for prefix, host in (("/anthropic", "bridge.local"), ("", "api.anthropic.com")):
        r = classify(WITH_ANTHROPIC, method, host, 443, prefix + path)
        assert r.kind is kind, (prefix, path)


def test_websocket_upgrade_is_not_messages() -> None:
    r = classify(
        WITH_ANTHROPIC, "GET", "api.anthropic.com", 443, "/v1/messages", websocket_upgrade=True
    )
    assert r.kind is RouteKind.FORBIDDEN


def test_openai_provider_does_not_bridge_messages() -> None:
    for path in ("/openai/v1/messages", "/openai/v1/messages/count_tokens"):
        assert classify(WITH_ANTHROPIC, "POST", "b", 80, path).kind is RouteKind.FORBIDDEN
    r = classify(WITH_ANTHROPIC, "POST", "b", 80, "/openai/v1/responses")
    assert (r.kind, r.api.name) == (RouteKind.BRIDGED, "responses")


def test_a_passthrough_list_in_the_config_applies_to_every_provider() -> None:
    config = parse_config(
        {
            "providers": WITH_ANTHROPIC_RAW,
            "passthrough": ["/v1/models"],
        },
        "test.yaml",
        {},
    )
    assert classify(config, "GET", "b", 80, "/anthropic/v1/models").kind is RouteKind.PASSTHROUGH
    count = classify(config, "POST", "b", 80, "/anthropic/v1/messages/count_tokens")
    assert count.kind is RouteKind.FORBIDDEN


WITH_ANTHROPIC_RAW = [
    {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": "k"},
    {
        "name": "anthropic",
        "type": "anthropic",
        "base_url": "https://api.anthropic.com/v1",
        "api_key": "k",
    },
]


@pytest.mark.parametrize("order", [1, -1])
def test_providers_on_one_host_are_told_apart_by_root_in_any_order(order: int) -> None:
    """Two providers behind one gateway: each path goes to the one whose root it is under,
    whichever is listed first."""
    providers = [
        {
            "name": "claude",
            "type": "anthropic",
            "base_url": "http://gw:8000/anthropic/v1",
            "api_key": "k",
        },
        {"name": "oai", "base_url": "http://gw:8000/v1", "api_key": "k"},
    ][::order]
    config = parse_config({"providers": providers}, "test.yaml", {})
    r = classify(config, "POST", "gw", 8000, "/v1/responses")
    assert (r.kind, r.provider.name) == (RouteKind.BRIDGED, "oai")
    r = classify(config, "POST", "gw", 8000, "/anthropic/v1/messages")
    assert (r.kind, r.provider.name, r.api_path) == (RouteKind.BRIDGED, "claude", "/v1/messages")
    # Under neither root: the first listed answers (403), never unrelated traffic.
    assert classify(config, "POST", "gw", 8000, "/other").kind is RouteKind.FORBIDDEN


def azure_route(path: str, host: str = "127.0.0.1", port: int = 8080) -> object:
    config = parse_config(
        {
            "providers": [
                {
                    "name": "azure",
                    "type": "openai_compatible",
                    "base_url": "https://r.openai.azure.com/openai/v1?api-version=preview&x=1",
                    "api_key": "k",
                }
            ]
        },
        "t.yaml",
        {},
    )
    return classify(config, "POST", host, port, path)


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/azure/v1/chat/completions", "/openai/v1/chat/completions?api-version=preview&x=1"),
        (
            "/azure/v1/chat/completions?api-version=2024-10-21",
            "/openai/v1/chat/completions?api-version=2024-10-21&x=1",
        ),
        (
            "/azure/v1/chat/completions?a=b",
            "/openai/v1/chat/completions?a=b&api-version=preview&x=1",
        ),
        ("/azure/v1/chat/completions?", "/openai/v1/chat/completions?api-version=preview&x=1"),
    ],
)
def test_the_base_url_query_is_added_unless_the_client_gives_it(path: str, upstream: str) -> None:
    r = azure_route(path)
    assert (r.kind, r.upstream_path) == (RouteKind.BRIDGED, upstream)
    assert r.api is not None and r.api.name == "chat_completions"


def test_the_base_url_query_in_reverse_or_regular_proxy_mode() -> None:
    r = azure_route("/openai/v1/chat/completions", "r.openai.azure.com", 443)
    assert (r.kind, r.upstream_path) == (
        RouteKind.BRIDGED,
        "/openai/v1/chat/completions?api-version=preview&x=1",
    )
    r = azure_route("/openai/v1/chat/completions?api-version=v&x=2", "r.openai.azure.com", 443)
    assert (r.kind, r.upstream_path) == (RouteKind.BRIDGED, None)  # nothing to add


def test_a_provider_serves_only_its_apis() -> None:
    assert azure_route("/azure/v1/responses").kind is RouteKind.FORBIDDEN
    assert azure_route("/azure/v1/messages").kind is RouteKind.FORBIDDEN


SHARED = parse_config(
    {
        "providers": [
            {"name": "openai", "base_url": "http://127.0.0.1:9911/v1", "api_key": "k"},
            {
                "name": "claude",
                "type": "anthropic",
                "base_url": "http://127.0.0.1:9911/v1",
                "api_key": "k",
            },
            {
                "name": "compatible",
                "type": "openai_compatible",
                "base_url": "http://127.0.0.1:9911/v1",
                "api_key": "k",
            },
            {
                "name": "other-root",
                "type": "anthropic",
                "base_url": "http://127.0.0.1:9911/other/v1",
                "api_key": "k",
            },
            {
                "name": "elsewhere",
                "type": "anthropic",
                "base_url": "http://127.0.0.1:9912/v1",
                "api_key": "k",
            },
        ]
    },
    "test.yaml",
    {},
)


@pytest.mark.parametrize(
    ("path", "noted", "provider", "api"),
    [
        # The provider the live bridge noted, when it serves the saved path's API.
        ("/v1/messages", "claude", "claude", "messages"),
        ("/v1/chat/completions", "compatible", "compatible", "chat_completions"),
        ("/v1/responses", "openai", "openai", "responses"),
        # Anything else keeps what the destination alone says.
        ("/v1/messages", None, "openai", None),
        ("/v1/messages", "no-such-provider", "openai", None),
        ("/v1/messages", 17, "openai", None),
        ("/v1/messages", ["claude"], "openai", None),
        ("/v1/messages", "other-root", "openai", None),  # another root
        ("/v1/messages", "elsewhere", "openai", None),  # another destination
        ("/v1/responses", "claude", "openai", "responses"),  # Anthropic has no Responses API
    ],
)
def test_a_saved_flow_is_judged_for_its_noted_provider(path, noted, provider, api):
    from aibridge.routing import as_noted

    first = classify(SHARED, "POST", "127.0.0.1", 9911, path)
    judged = as_noted(SHARED, first, noted)
    assert judged.provider.name == provider
    if api is None:
        assert judged == first
    else:
        assert judged.kind is RouteKind.BRIDGED and judged.api.name == api
        assert judged.api_path == first.api_path


# ----------------------------------------------------------------- the remembering router

ROUTER_CASES = [
    (method, host, port, path, upgrade)
    for method in ("POST", "GET", "DELETE")
    for host, port in (("api.openai.com", 443), ("x.example.com", 443), ("127.0.0.1", 9999))
    for path in (
        "/v1/responses",
        "/v1/responses?x=1",
        "/openai/v1/responses",
        "/v1/models/gpt-5",
        "/v1/../responses",
        "/openai/v1/chat/completions",
        "/azure/v1/responses",
        "/v1//responses",
        "/elsewhere",
    )
    for upgrade in (False, True)
]


def test_the_router_answers_as_classify_does_asked_once_or_again() -> None:
    router = Router(CONFIG)
    for _ in range(2):  # the second time from what it remembers
        for method, host, port, path, upgrade in ROUTER_CASES:
            expected = classify(CONFIG, method, host, port, path, websocket_upgrade=upgrade)
            got = router.route(method, host, port, path, websocket_upgrade=upgrade)
            assert got == expected, (method, host, port, path, upgrade)


def test_what_the_router_remembers_is_bounded() -> None:
    router = Router(CONFIG)
    for i in range(3 * Router.MAX_REMEMBERED):  # a client sending ever new paths
        router.route("GET", "api.openai.com", 443, f"/v1/responses/resp_{i}")
        assert len(router._routes) <= Router.MAX_REMEMBERED
    long_path = "/v1/models/" + "m" * Router.MAX_REMEMBERED_PATH
    before = len(router._routes)
    route = router.route("GET", "api.openai.com", 443, long_path)
    assert route == classify(CONFIG, "GET", "api.openai.com", 443, long_path)
    assert len(router._routes) == before  # classified, not kept


def test_a_router_answers_for_its_own_config_only() -> None:
    other = parse_config(
        {"providers": [{"name": "o", "base_url": "https://api.openai.com/v1", "api_key": "k"}]},
        "other.yaml",
        {},
    )
    first, second = Router(CONFIG), Router(other)
    assert first.route("POST", "127.0.0.1", 9999, "/v1/responses").kind is RouteKind.BRIDGED
    assert second.route("POST", "127.0.0.1", 9999, "/v1/responses").kind is RouteKind.UNRELATED
