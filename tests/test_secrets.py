"""Neither the provider key nor a user's token is written anywhere: not in the SQLite file,
the mitmproxy log, a saved flow file (``-w``), or what mitmweb serves and pushes; and no
client token ever reaches the provider."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import orjson
import pytest

from devtools import mitmdump_process
from devtools.fake_upstream import FakeUpstream
from tests.harness import (
    MITMDUMP,
    PROVIDER_KEY,
    TOKENS,
    Mitmdump,
    bridge_config,
    query,
    wait_for,
)
from tests.ws_client import ResponsesSocket

SAFETY = 30.0  # upper bound for waits; never asserted as a duration
UNKNOWN_TOKEN = "sk-someone-elses-key-9876543210abcdef"
# The keys of a provider with a key pool (issue 15).
POOL_KEYS = ("sk-pool-key-number-one-0123456789", "sk-pool-key-number-two-0123456789")
SECRETS = (PROVIDER_KEY, *POOL_KEYS, *TOKENS.values(), UNKNOWN_TOKEN)
PROVIDER_KEYS = (PROVIDER_KEY, *POOL_KEYS)
WEB_PASSWORD = "web-ui-password-for-tests"


def leaked(blob: bytes | str) -> list[str]:
    data = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else blob
    return [secret for secret in SECRETS if secret.encode() in data]


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def config(upstream: FakeUpstream) -> dict[str, Any]:
    cfg = bridge_config(upstream.url)
    # Nothing listens there: the connection is refused.
    cfg["providers"].append(
        {
            "name": "dead",
            "type": "openai",
            "base_url": f"http://127.0.0.1:{free_port()}/v1",
            "api_key": "${TEST_PROVIDER_KEY}",
        }
    )
    cfg["providers"].append(
        {"name": "pool", "type": "openai", "base_url": f"{upstream.url}/v1", "api_key": POOL_KEYS}
    )
    return cfg


def traffic(bridge: Mitmdump) -> None:
    """Every kind of exchange: bridged, refused, passed through, failed, over WebSocket."""
    url = f"{bridge.url}/openai/v1"
    alice = {"authorization": f"Bearer {TOKENS['alice']}"}
    bob = {"x-api-key": TOKENS["bob"]}

    def post(body: dict[str, Any], headers: dict[str, str], path: str = "/responses") -> int:
        r = httpx.post(url + path, content=orjson.dumps(body), headers=headers, timeout=SAFETY)
        return r.status_code

    assert post({"model": "fake-text", "input": "hello"}, alice) == 200
    assert post({"model": "fake-reasoning", "input": "think", "stream": True}, bob) == 200
    assert post({"model": "fake-tool", "input": "use a tool", "stream": True}, alice) == 200
    assert post({"model": "fake-429", "input": "too many"}, bob) == 429
    assert (
        post({"model": "fake-text", "input": "x"}, {"authorization": f"Bearer {UNKNOWN_TOKEN}"})
        == 401
    )
    assert post({"model": "fake-text", "input": "x", "background": True}, alice) == 501
    assert httpx.post(f"{url}/responses", content=b"{nope", headers=bob).status_code == 400
    assert httpx.get(f"{url}/models", headers=bob, timeout=SAFETY).status_code == 200
    assert httpx.get(f"{url}/files", headers=alice, timeout=SAFETY).status_code == 403
    dead = httpx.post(
        f"{bridge.url}/dead/v1/responses",
        content=b'{"model": "fake-text", "input": "x"}',
        headers=alice,
        timeout=SAFETY,
    )
    assert dead.status_code == 502
    for _ in POOL_KEYS:  # each key of the pool once
        pooled = httpx.post(
            f"{bridge.url}/pool/v1/responses",
            content=b'{"model": "fake-text", "input": "pooled"}',
            headers=alice,
            timeout=SAFETY,
        )
        assert pooled.status_code == 200

    socket_ = ResponsesSocket(f"{url}/responses", {**alice, "session-id": uuid.uuid4().hex})
    try:
        socket_.send({"type": "response.create", "model": "fake-text", "input": "over ws"})
        events = socket_.until_terminal()
        assert events[-1]["type"] == "response.completed"
    finally:
        socket_.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def files_of(db_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*") if p.is_file())


def test_nothing_secret_in_the_database_the_log_or_a_flow_file(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    flows = tmp_path / "flows.mitm"
    metrics = f"127.0.0.1:{free_port()}"
    cfg = {**config(upstream), "metrics": {"listen": metrics}}
    bridge = Mitmdump(tmp_path, cfg, extra_args=["-w", str(flows)])
    with bridge:
        traffic(bridge)
        open_rows = "select count(*) as n from interceptions where ended_at is null"
        assert wait_for(lambda: query(bridge.db_path, open_rows)[0]["n"] == 0, SAFETY)
        for path in ("/metrics", "/_aibridge/health"):  # hints of the pool's keys at most
            served = httpx.get(f"http://{metrics}{path}", timeout=SAFETY)
            assert served.status_code == 200 and leaked(served.content) == [], path
        # While it runs (the WAL holds the newest pages) and after it stopped.
        assert leaked(files_of(bridge.db_path)) == []
    assert leaked(files_of(bridge.db_path)) == []
    assert leaked(bridge.log()) == []
    saved = flows.read_bytes()
    assert saved.count(b"/v1/responses") >= 6  # the flows are there, keys masked
    assert leaked(saved) == []
    assert_no_client_token_upstream(upstream)
    sent = {r.headers.get("authorization") for r in upstream.requests}
    assert {f"Bearer {key}" for key in POOL_KEYS} <= sent  # the pool's keys went upstream


def assert_no_client_token_upstream(upstream: FakeUpstream) -> None:
    """The provider got its key on every bridged request, and never a client's token."""
    assert upstream.requests
    for request in upstream.requests:
        flat = orjson.dumps(request.headers) + request.body
        assert [s for s in leaked(flat) if s not in PROVIDER_KEYS] == []
        if request.path == "/v1/responses":
            sent = request.headers["authorization"].removeprefix("Bearer ")
            assert sent in PROVIDER_KEYS


class Mitmweb(Mitmdump):
    """``mitmweb -s addon.py`` with a password and a known web port."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.web_port = free_port()
        extra = [
            "--set",
            f"web_port={self.web_port}",
            "--set",
            f"web_password={WEB_PASSWORD}",
            "--set",
            "web_open_browser=false",
        ]
        super().__init__(workdir, config, extra_args=extra)

    def start(self, timeout: float = 30.0) -> Mitmweb:
        with mock.patch.object(mitmdump_process, "MITMDUMP", MITMDUMP.with_name("mitmweb")):
            super().start(timeout)
        assert wait_for(lambda: "Web server listening" in self.log(), SAFETY), self.log()
        return self

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def api(self, path: str) -> bytes:
        """What mitmweb serves at `path`, error pages included (a streamed body it did
        not keep answers 500)."""
        r = httpx.get(
            self.web_url + path,
            headers={"authorization": f"Bearer {WEB_PASSWORD}"},
            timeout=SAFETY,
        )
        assert r.status_code != 403, "not authenticated"
        return r.content


@dataclass
class Updates:
    """Every message mitmweb's web socket pushes to a connected browser."""

    socket: ResponsesSocket
    messages: list[bytes] = field(default_factory=list)

    def collect(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while (message := self.socket.receive()) is not None:
                self.messages.append(orjson.dumps(message))


def in_flight(web: Mitmweb, upstream: FakeUpstream) -> dict[str, bytes]:
    """What mitmweb serves while a request is with the provider (sent, no answer yet)."""
    marker = uuid.uuid4().hex
    body = orjson.dumps({"model": "fake-slow", "input": marker})
    slow = threading.Thread(
        target=httpx.post,
        args=(f"{web.url}/openai/v1/responses",),
        kwargs={
            "content": body,
            # The slow scenario answers a buffered request only after 20 delays.
            "headers": {"authorization": f"Bearer {TOKENS['alice']}", "x-fake-delay-ms": "100"},
            "timeout": SAFETY,
        },
        daemon=True,
    )
    slow.start()
    assert wait_for(lambda: any(marker.encode() in r.body for r in upstream.requests), SAFETY)
    served = {f"in flight {path}": web.api(path) for path in ("/flows", "/flows/dump")}
    slow.join(SAFETY)
    return served


@dataclass
class WebRun:
    served: dict[str, bytes]  # API path -> body
    pushed: list[bytes]


@pytest.fixture(scope="module")
def web_run(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> WebRun:
    workdir = tmp_path_factory.mktemp("mitmweb")
    with Mitmweb(workdir, config(upstream)) as web:
        updates = Updates(
            ResponsesSocket(f"{web.web_url}/updates", {"authorization": f"Bearer {WEB_PASSWORD}"})
        )
        reader = threading.Thread(target=updates.collect, daemon=True)
        reader.start()
        traffic(web)
        served = in_flight(web, upstream)
        served |= {path: web.api(path) for path in ("/flows", "/flows/dump", "/events")}
        for flow in orjson.loads(served["/flows"]):
            base = f"/flows/{flow['id']}"
            for part in ("request", "response"):
                if flow.get(part):
                    path = f"{base}/{part}/content.data"
                    served[path] = web.api(path)
        assert len(orjson.loads(served["/flows"])) >= 12
        updates.socket.close()
        reader.join(SAFETY)
    assert updates.messages, "the web socket pushed nothing"
    assert_no_client_token_upstream(upstream)
    return WebRun(served, updates.messages)


def test_mitmweb_serves_no_secret(web_run: WebRun) -> None:
    for path, body in web_run.served.items():
        assert leaked(body) == [], path


def test_mitmweb_pushes_no_secret(web_run: WebRun) -> None:
    for message in web_run.pushed:
        assert leaked(message) == [], message[:300]
