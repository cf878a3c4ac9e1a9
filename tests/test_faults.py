"""Network faults through a real mitmdump: each exchange ends in exactly one finalized
interception with the right status, and the client gets what upstream sent.

Misbehaving upstreams are scripted loopback servers, one per provider of the bridge's
config (route prefix ``/<name>/v1``). mitmdump runs with ``tcp_timeout=2`` so that an
upstream that never answers is cut by mitmproxy within the test.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from devtools.fake_upstream import FakeUpstream
from tests.harness import TOKENS, Mitmdump, bridge_config, children, query, wait_for

TCP_TIMEOUT = 2  # seconds of silence after which mitmproxy closes a connection
SAFETY = 30.0  # upper bound for any wait; never asserted as a duration

CREATED = (
    b"event: response.created\n"
    b'data: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_fault_1","object":"response","status":"in_progress",'
    b'"model":"gpt-fault","output":[]}}\n\n'
)
TOOL_DONE = (
    b"event: response.output_item.done\n"
    b'data: {"type":"response.output_item.done","sequence_number":1,"output_index":0,'
    b'"item":{"id":"fc_1","type":"function_call","status":"completed","name":"get_weather",'
    b'"call_id":"call_fault_1","arguments":"{\\"city\\":\\"Paris\\"}"}}\n\n'
)
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
UNAVAILABLE_BODY = b'{"error":{"message":"The engine is currently overloaded (fake)","type":"x"}}'

Behaviour = Callable[[socket.socket, "ScriptedUpstream"], None]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class ScriptedUpstream:
    """A loopback server that reads one HTTP/1.1 request per connection and then runs
    ``behaviour(conn, self)``: the fault under test."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.release = threading.Event()  # set by a test: the behaviour may go on
        self.stopping = threading.Event()
        self.bodies: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.release.set()
        self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            while length and len(body) < int(length[1]):
                body += conn.recv(65536)
            self.bodies.append(body)
            self.behaviour(conn, self)


def reset(conn: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def reset_mid_stream(conn: socket.socket, up: ScriptedUpstream) -> None:
    conn.sendall(SSE_HEAD + chunk(CREATED) + chunk(TOOL_DONE))
    up.release.wait(SAFETY)  # until the client has everything sent so far
    reset(conn)


def reset_before_headers(conn: socket.socket, up: ScriptedUpstream) -> None:
    reset(conn)


def silent(conn: socket.socket, up: ScriptedUpstream) -> None:
    up.stopping.wait(SAFETY)


def stall_mid_stream(conn: socket.socket, up: ScriptedUpstream) -> None:
    conn.sendall(SSE_HEAD + chunk(CREATED))
    up.stopping.wait(SAFETY)


def unavailable(conn: socket.socket, up: ScriptedUpstream) -> None:
    conn.sendall(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
        % (len(UNAVAILABLE_BODY), UNAVAILABLE_BODY)
    )


BEHAVIOURS: dict[str, Behaviour] = {
    "reset": reset_mid_stream,
    "resetearly": reset_before_headers,
    "silent": silent,
    "stall": stall_mid_stream,
    "unavailable": unavailable,
}


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


class Faults:
    def __init__(self, bridge: Mitmdump, fake: FakeUpstream, scripted: dict[str, ScriptedUpstream]):
        self.bridge = bridge
        self.fake = fake
        self.scripted = scripted


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(FakeUpstream())
        scripted = {
            name: stack.enter_context(ScriptedUpstream(b)) for name, b in BEHAVIOURS.items()
        }
        config = bridge_config(fake.url)
        urls = {name: up.url for name, up in scripted.items()}
        urls["dead"] = f"http://127.0.0.1:{closed_port()}"
        for name, url in urls.items():
            config["providers"].append(
                {
                    "name": name,
                    "type": "openai",
                    "base_url": f"{url}/v1",
                    "api_key": "${TEST_PROVIDER_KEY}",
                }
            )
        workdir = tmp_path_factory.mktemp("faults")
        extra = ["--set", f"tcp_timeout={TCP_TIMEOUT}"]
        bridge = stack.enter_context(Mitmdump(workdir, config, extra_args=extra))
        yield Faults(bridge, fake, scripted)


def headers(session: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {TOKENS['alice']}",
        "content-type": "application/json",
        "session_id": session,
    }


def body(model: str = "fake-text", stream: bool = True) -> bytes:
    return orjson.dumps(
        {"model": model, "input": f"fault test {uuid.uuid4().hex}", "stream": stream}
    )


def finalized(bridge: Mitmdump, session: str) -> dict[str, Any]:
    """The one interception of this session, once it has ended."""

    def ended() -> list[dict[str, Any]]:
        rows = query(
            bridge.db_path, "select * from interceptions where client_session_id = ?", (session,)
        )
        return rows if rows and all(r["ended_at"] for r in rows) else []

    rows = wait_for(ended, timeout=SAFETY)
    assert len(rows) == 1, rows
    assert rows[0]["status"] != "in_progress"
    return rows[0]


def test_client_disconnects_mid_stream(faults: Faults) -> None:
    session = uuid.uuid4().hex
    h = {**headers(session), "x-fake-delay-ms": "100", "x-fake-flush-each": "1"}
    url = f"{faults.bridge.url}/openai/v1/responses"
    with httpx.stream("POST", url, content=body("fake-slow"), headers=h, timeout=SAFETY) as r:
        assert r.status_code == 200
        first = next(r.iter_raw())
        assert first.startswith(b"event: response.created")
    row = finalized(faults.bridge, session)
    assert (row["status"], row["http_status"]) == ("client_disconnected", 200)
    assert row["response_id"] and row["response_id"].startswith("resp_")


def test_client_disconnects_before_the_response(faults: Faults) -> None:
    session = uuid.uuid4().hex
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{faults.bridge.url}/silent/v1/responses",
            content=body(),
            headers=headers(session),
            timeout=httpx.Timeout(SAFETY, read=0.3),
        )
    row = finalized(faults.bridge, session)
    assert (row["status"], row["http_status"]) == ("client_disconnected", None)


def test_upstream_reset_mid_stream(faults: Faults) -> None:
    up = faults.scripted["reset"]
    session = uuid.uuid4().hex
    received = b""
    url = f"{faults.bridge.url}/reset/v1/responses"
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", url, content=body(), headers=headers(session), timeout=SAFETY) as r,
    ):
        assert r.status_code == 200
        for piece in r.iter_raw():
            received += piece
            if received == CREATED + TOOL_DONE:
                up.release.set()
    assert received == CREATED + TOOL_DONE, "the client gets upstream's bytes unchanged"
    row = finalized(faults.bridge, session)
    assert (row["status"], row["http_status"]) == ("error", 200)
    assert row["response_id"] == "resp_fault_1" and row["response_model"] == "gpt-fault"
    # The stream never reached a terminal event: the completed item still counts.
    (tool,) = children(faults.bridge, "tool_usages", row["id"])
    assert (tool["call_id"], tool["tool"]) == ("call_fault_1", "get_weather")


@pytest.mark.parametrize("provider", ["dead", "resetearly"])
def test_unreachable_upstream_answers_502_in_our_shape(faults: Faults, provider: str) -> None:
    session = uuid.uuid4().hex
    r = httpx.post(
        f"{faults.bridge.url}/{provider}/v1/responses",
        content=body(),
        headers=headers(session),
        timeout=SAFETY,
    )
    assert r.status_code == 502
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["code"] == "502" and answer["error"]["code"] == "502"
    assert answer["message"] == answer["error"]["message"]
    row = finalized(faults.bridge, session)
    assert (row["status"], row["http_status"]) == ("error", 502)
    # A passthrough path (not recorded) gets the same answer.
    r = httpx.get(f"{faults.bridge.url}/{provider}/v1/models", headers=headers(session))
    assert r.status_code == 502 and r.json()["code"] == "502"


@pytest.fixture(scope="module")
def cut_by_timeout(faults: Faults) -> dict[str, dict[str, Any]]:
    """An upstream that never answers and one that stalls mid-stream, run side by side
    (both wait for mitmproxy's tcp_timeout); their finalized interceptions."""

    def run(provider: str) -> dict[str, Any]:
        session = uuid.uuid4().hex
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                f"{faults.bridge.url}/{provider}/v1/responses",
                content=body(),
                headers=headers(session),
                timeout=SAFETY,
            )
        return finalized(faults.bridge, session)

    with ThreadPoolExecutor(2) as pool:
        rows = dict(zip(["silent", "stall"], pool.map(run, ["silent", "stall"]), strict=True))
    return rows


def test_upstream_that_never_answers_is_finalized(
    cut_by_timeout: dict[str, dict[str, Any]],
) -> None:
    assert cut_by_timeout["silent"]["http_status"] is None
    assert cut_by_timeout["stall"]["http_status"] == 200
    assert cut_by_timeout["stall"]["response_id"] == "resp_fault_1"
    for row in cut_by_timeout.values():
        assert row["ended_at"] and row["error"]


def test_upstream_timeout_is_an_error_not_a_client_disconnect(
    cut_by_timeout: dict[str, dict[str, Any]],
) -> None:
    for row in cut_by_timeout.values():
        assert row["status"] == "error"
        assert "tcp_timeout" in row["error"]


def test_upstream_503_is_forwarded_unchanged(faults: Faults) -> None:
    session = uuid.uuid4().hex
    r = httpx.post(
        f"{faults.bridge.url}/unavailable/v1/responses",
        content=body(stream=False),
        headers=headers(session),
        timeout=SAFETY,
    )
    assert (r.status_code, r.content) == (503, UNAVAILABLE_BODY)
    assert r.headers["retry-after"] == "1"
    row = finalized(faults.bridge, session)
    assert (row["status"], row["http_status"]) == ("upstream_error", 503)
    assert "overloaded" in row["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_429_is_forwarded_unchanged(faults: Faults, stream: bool) -> None:
    session = uuid.uuid4().hex
    r = httpx.post(
        f"{faults.bridge.url}/openai/v1/responses",
        content=body("fake-429", stream=stream),
        headers=headers(session),
        timeout=SAFETY,
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "0"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    row = finalized(faults.bridge, session)
    assert (row["status"], row["http_status"]) == ("upstream_error", 429)
    assert "Rate limit" in row["error"]


def test_the_bridge_keeps_serving_after_the_faults(faults: Faults) -> None:
    session = uuid.uuid4().hex
    r = httpx.post(
        f"{faults.bridge.url}/openai/v1/responses",
        content=body(stream=False),
        headers=headers(session),
        timeout=SAFETY,
    )
    assert r.status_code == 200
    assert finalized(faults.bridge, session)["status"] == "completed"
    assert "Traceback" not in faults.bridge.log()
