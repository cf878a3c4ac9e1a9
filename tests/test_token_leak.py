"""A bridge token never leaves the bridge: a request that carries one anywhere a credential
can travel is refused unless it goes to a provider, where only the API key header may hold
it (and is swapped). Provider hosts compare as DNS names (case, trailing dot)."""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from aibridge import auth
from aibridge.bridge import AIBridge
from aibridge.config import parse_config, sha256_hex
from aibridge.headers import header_view
from devtools.fake_upstream import FakeUpstream
from tests.harness import TOKENS, LoopbackHTTP, Mitmdump, bridge_config, query, wait_for

ALICE = TOKENS["alice"]
CONFIG = parse_config(
    {
        "providers": [{"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": "k"}],
        "users": [
            {"id": "alice", "token": ALICE},
            {"id": "carol", "token_sha256": sha256_hex("carol-token-hashed-only")},
        ],
    },
    "leak.yaml",
    {},
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# (header name, value) pairs a token can hide in; each must be found.
CARRIERS = [
    ("authorization", f"Bearer {ALICE}"),
    ("authorization", f"bearer   {ALICE}  "),
    ("authorization", f"token {ALICE}"),
    ("authorization", basic("x", ALICE)),
    ("authorization", basic(ALICE, "")),
    ("proxy-authorization", basic("alice", ALICE)),
    ("x-api-key", ALICE),
    ("api-key", f" {ALICE} "),
    ("x-goog-api-key", ALICE),
    ("openai-organization", ALICE),
    ("cookie", f"theme=dark; session={ALICE}; other=1"),
    ("cookie", f'key="{ALICE}"'),
    ("x-forwarded-authorization", f"a, Bearer {ALICE}"),
    ("x-custom", f"k={ALICE}"),
]


@pytest.mark.parametrize(("name", "value"), CARRIERS)
def test_a_token_is_found_wherever_a_credential_travels(name: str, value: str) -> None:
    owner = auth.LeakScan(CONFIG).owner({name: value})
    assert owner is not None and owner.id == "alice"


@pytest.mark.parametrize(
    "query",
    [f"key={ALICE}", f"a=1&api_key={ALICE}", f"token=%20{ALICE}", f"x={ALICE.replace('-', '%2D')}"],
)
def test_a_token_in_the_query_is_found(query: str) -> None:
    owner = auth.LeakScan(CONFIG).owner({}, query)
    assert owner is not None and owner.id == "alice"


def test_a_user_known_only_by_the_tokens_hash_is_found_too() -> None:
    owner = auth.LeakScan(CONFIG).owner({"x-api-key": "carol-token-hashed-only"})
    assert owner is not None and owner.id == "carol"


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer sk-someone-elses-key"},
        {"authorization": basic("alice", "wrong-password")},
        {"authorization": "Basic !!!not-base64!!!"},
        {"cookie": "session=abc; theme=dark"},
        # Plain headers are not searched (a user agent is not a credential).
        {"user-agent": ALICE},
        {"content-type": ALICE},
        # A token inside a longer word is not that token.
        {"x-api-key": ALICE + "x"},
        {"x-api-key": "x" + ALICE},
    ],
)
def test_other_values_are_not_taken_for_a_token(headers: dict[str, str]) -> None:
    assert auth.LeakScan(CONFIG).owner(headers) is None


# ------------------------------------------------------------------------- hook level


@pytest.fixture(scope="module")
def addon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AIBridge]:
    directory = tmp_path_factory.mktemp("leak")
    config = bridge_config("https://api.openai.com", database=str(directory / "leak.db"))
    config["providers"][0]["api_key"] = "sk-provider-key-for-the-hook-tests"
    path = directory / "aibridge.yaml"
    path.write_text(yaml.safe_dump(config))
    bridge = AIBridge(default_config_dir=directory)
    with taddons.context(bridge) as tctx:
        tctx.configure(bridge, aibridge_config=str(path))
        yield bridge
        bridge.done()


def flow_to(url: str, headers: dict[str, str], body: bytes = b"{}") -> http.HTTPFlow:
    request = http.Request.make("POST", url, body, headers)
    return tflow.tflow(req=request)


@pytest.mark.parametrize(("name", "value"), CARRIERS)
@pytest.mark.parametrize("host", ["example.com", "api.anthropic.com", "api.openai.com.evil.test"])
def test_a_token_bound_for_another_host_is_refused(
    addon: AIBridge, host: str, name: str, value: str
) -> None:
    flow = flow_to(f"https://{host}/v1/responses", {name: value})
    addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert b"does not leave the bridge" in flow.response.content
    # What the flow shows (mitmweb, saved flows) holds no token any more.
    assert ALICE not in str(flow.request.headers) or name not in auth.CLIENT_CREDENTIAL_HEADERS


def test_other_hosts_without_a_token_are_untouched(addon: AIBridge) -> None:
    flow = flow_to("https://example.com/x?key=sk-not-a-bridge-token", {"x-api-key": "sk-other"})
    addon.request(flow)
    assert flow.response is None


@pytest.mark.parametrize(
    ("name", "value"),
    [(n, v) for n, v in CARRIERS if n not in auth.CLIENT_CREDENTIAL_HEADERS],
)
def test_a_token_beside_the_api_key_never_reaches_the_provider(
    addon: AIBridge, name: str, value: str
) -> None:
    flow = flow_to(
        "https://api.openai.com/v1/responses",
        {"authorization": f"Bearer {TOKENS['bob']}", name: value},
        b'{"model": "m", "input": "x"}',
    )
    addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 403


def test_a_token_in_the_query_of_a_provider_request_is_refused(addon: AIBridge) -> None:
    flow = flow_to(
        f"https://api.openai.com/v1/models?key={ALICE}", {"authorization": f"Bearer {ALICE}"}
    )
    addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 403


@pytest.mark.parametrize("host", ["API.OPENAI.COM", "api.openai.com.", "Api.OpenAI.Com."])
def test_provider_hosts_compare_as_dns_names(addon: AIBridge, host: str) -> None:
    """Spelled another way, the provider's host is still the provider: bridged and recorded,
    never passed through as someone else's traffic with the client's token."""
    flow = flow_to(
        f"https://{host}/v1/responses",
        {"authorization": f"Bearer {ALICE}"},
        b'{"model": "m", "input": "dns"}',
    )
    addon.request(flow)
    assert flow.response is None
    assert ALICE not in str(flow.request.headers)
    assert header_view(flow.request.headers).get("authorization", "").startswith("Bearer ")


# ------------------------------------------------------------------ through mitmdump


class Recording(LoopbackHTTP):
    """A plain HTTP server on loopback that is not a provider: records what reaches it."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                seen.append((self.path, dict(self.headers)))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_GET

        super().__init__(Handler)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mitmdump, Recording, Any]]:
    """mitmdump as a regular proxy; the provider is named ``localhost`` in its base_url."""
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(FakeUpstream())
        other = stack.enter_context(Recording())
        config = bridge_config(fake.url.replace("127.0.0.1", "localhost"))
        workdir: Path = tmp_path_factory.mktemp("leak-e2e")
        bridge = stack.enter_context(Mitmdump(workdir, config))
        yield bridge, other, fake


def test_a_token_sent_to_another_host_through_the_proxy_never_arrives(proxied: Any) -> None:
    bridge, other, _ = proxied
    with httpx.Client(proxy=bridge.url, timeout=30) as client:
        for name, value in CARRIERS:
            headers = {name: value.strip()}  # httpx sends no padded values
            r = client.get(f"http://127.0.0.1:{other.port}/steal", headers=headers)
            assert r.status_code == 403, (name, value)
            assert r.json()["code"] == "403"
        r = client.get(f"http://127.0.0.1:{other.port}/q?key={ALICE}")
        assert r.status_code == 403
        assert other.seen == [], "a bridge token reached a host that is not a provider"
        r = client.get(f"http://127.0.0.1:{other.port}/fine", headers={"x-api-key": "sk-mine"})
        assert r.status_code == 200 and [p for p, _ in other.seen] == ["/fine"]
    assert "it carries their bridge token" in bridge.log()


@pytest.mark.parametrize("host", ["LOCALHOST", "localhost.", "LocalHost."])
def test_the_provider_spelled_another_way_is_bridged(proxied: Any, host: str) -> None:
    bridge, _, fake = proxied
    port = fake.url.rsplit(":", 1)[1]
    session = uuid.uuid4().hex
    with httpx.Client(proxy=bridge.url, timeout=30) as client:
        r = client.post(
            f"http://{host}:{port}/v1/responses",
            json={"model": "fake-text", "input": "dns spelling"},
            headers={"authorization": f"Bearer {ALICE}", "session_id": session},
        )
    assert r.status_code == 200, r.text
    (got,) = [x for x in fake.requests if x.headers.get("session_id") == session]
    assert ALICE not in str(got.headers)

    def recorded() -> list[dict[str, Any]]:
        sql = "select * from interceptions where client_session_id = ? and ended_at is not null"
        return query(bridge.db_path, sql, (session,))

    (row,) = wait_for(recorded, 30)
    assert (row["initiator_id"], row["status"]) == ("alice", "completed")


def test_tokens_of_several_lengths_are_all_found() -> None:
    """With every token known, values of other lengths skip hashing; none is missed."""
    tokens = {"u8": "t" * 8, "u20": "twenty-chars-token-x", "u41": "a" * 41}
    config = parse_config(
        {
            "providers": [{"name": "o", "base_url": "https://h.example/v1", "api_key": "k"}],
            "users": [{"id": user, "token": token} for user, token in tokens.items()],
        },
        "lengths.yaml",
        {},
    )
    assert config.token_lengths == {8, 20, 41}
    for user, token in tokens.items():
        for headers in (
            {"x-k": token},
            {"authorization": f"Bearer {token}"},
            {"c": f"a=1; b={token}"},
        ):
            owner = auth.LeakScan(config).owner(headers)
            assert owner is not None and owner.id == user
    assert auth.LeakScan(config).owner({"x-k": "t" * 9}) is None


def test_a_token_among_many_short_list_items_is_found() -> None:
    """Items shorter than any token are passed over; the one that holds it is not, wherever
    it stands in the list and whatever separates it."""
    junk = [f"k{i}={i}" for i in range(30)] + ['"n":0', "a", "", " ", "x=y"]
    for position in (0, 7, len(junk)):
        for separator in (", ", ";", ",", "; "):
            for carrier in (f"session={ALICE}", f'key="{ALICE}"', f"Bearer {ALICE}", ALICE):
                items = [*junk[:position], carrier, *junk[position:]]
                value = separator.join(items)
                owner = auth.LeakScan(CONFIG).owner({"x-meta": value})
                assert owner is not None and owner.id == "alice", value
                clean = separator.join([*junk[:position], *junk[position:]])
                assert auth.LeakScan(CONFIG).owner({"x-meta": clean}) is None


def test_the_shortest_token_bounds_the_scan_only_when_every_token_is_known() -> None:
    assert CONFIG.shortest_token == 8  # carol is known by her token's hash only
    short = "tok-1234"
    config = parse_config(
        {
            "providers": [{"name": "o", "base_url": "https://h.example/v1", "api_key": "k"}],
            "users": [{"id": "a", "token": "a" * 30}, {"id": "s", "token": short}],
        },
        "shortest.yaml",
        {},
    )
    assert config.shortest_token == 8
    for value in (short, f"{short},zz", f"x={short}", f"a=1; t={short}", basic("u", short)):
        owner = auth.LeakScan(config).owner({"x-k": value})
        assert owner is not None and owner.id == "s", value
    long_only = parse_config(
        {
            "providers": [{"name": "o", "base_url": "https://h.example/v1", "api_key": "k"}],
            "users": [{"id": "a", "token": "a" * 30}],
        },
        "long.yaml",
        {},
    )
    assert long_only.shortest_token == 30
    owner = auth.LeakScan(long_only).owner({"x-k": f"q, t={'a' * 30}, z"})
    assert owner is not None and owner.id == "a"


# ------------------------------------------------------------- values remembered clean


def test_a_remembered_clean_value_never_hides_a_token_sent_later() -> None:
    scan = auth.LeakScan(CONFIG)
    metadata = '{"turn_id":"0a1b","session_id":"01a2205c-42ef-7c52-9d98-dee5f8dadf59"}'
    for _ in range(3):
        assert scan.owner({"x-meta": metadata, "session-id": "01a2205c-42ef-7c52"}) is None
    for carrier in (f"session={ALICE}", f"{metadata}, key={ALICE}", ALICE, basic("u", ALICE)):
        owner = scan.owner({"x-meta": carrier, "session-id": "01a2205c-42ef-7c52"})
        assert owner is not None and owner.id == "alice", carrier
    owner = scan.owner({"x-meta": metadata}, f"api_key={ALICE}")
    assert owner is not None and owner.id == "alice"


def test_what_is_clean_under_one_config_is_looked_at_again_under_the_next() -> None:
    value = "k=later-someones-token"
    assert auth.LeakScan(CONFIG).owner({"x-k": value}) is None
    later = parse_config(
        {
            "providers": [{"name": "o", "base_url": "https://h.example/v1", "api_key": "k"}],
            "users": [{"id": "dave", "token": "later-someones-token"}],
        },
        "later.yaml",
        {},
    )
    owner = auth.LeakScan(later).owner({"x-k": value})
    assert owner is not None and owner.id == "dave"


def test_what_a_scan_remembers_is_bounded_and_never_a_credential() -> None:
    scan = auth.LeakScan(CONFIG, remembered=16)
    for i in range(100):
        assert scan.owner({"x-request-id": f"request-{i:08d}"}) is None
        assert len(scan._clean) <= 16
    scan = auth.LeakScan(CONFIG)
    long_value = "v" * (auth.LeakScan.MAX_REMEMBERED_VALUE + 1)
    headers = {"authorization": "Bearer sk-someone-elses-key", "x-api-key": "sk-other-key"}
    assert scan.owner({**headers, "x-long": long_value}) is None
    assert scan._clean == set()
    assert "sk-" not in repr(scan)
