"""Decompression bombs: 1 GiB of zeros, compressed to a few KB or MB, in every place the
bridge decodes a Content-Encoding (the stream tee, buffered and error bodies, request bodies).

The client always gets upstream's bytes unchanged, the record says why parsing stopped, and
the bridge's memory stays bounded: through a real mitmdump its peak RSS may grow by less than
64 MB per bomb (DESIGN.md §8), read from /proc (VmHWM after ``clear_refs``), never timed.
The bombs are built once per session in a streaming loop, so the tests never hold 1 GiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import threading
import tracemalloc
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import cache
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import brotli
import httpx
import orjson
import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from aibridge.apis.openai_responses import API as RESPONSES_API
from aibridge.apis.openai_responses import ResponseAccumulator
from aibridge.bridge import AIBridge
from aibridge.record.outcome import (
    MAX_BUFFERED_DECODED_BYTES,
    MAX_ERROR_DECODED_BYTES,
    finish_exchange,
    upstream_error_text,
)
from aibridge.transport.inflate import (
    BoundedInflater,
    zstd,  # the module the bridge decodes with
)
from aibridge.transport.tee import MAX_DECODED_BYTES, StreamTee
from bench.bombs import zeros_bomb
from bench.procs import peak_rss_kib, reset_peak_rss, rss_kib
from tests.harness import (
    PROVIDER_KEY,
    TOKENS,
    LoopbackHTTP,
    Mitmdump,
    bridge_config,
    query,
    wait_for,
)

FIXTURES = Path(__file__).parent / "fixtures"
SAFETY = 120.0  # upper bound for waits; never asserted as a duration
MIB = 1 << 20
GIB_MIB = 1024
ENCODINGS = ("gzip", "deflate", "br", "zstd")
RSS_BOUND_KIB = 64_000_000 // 1024  # 64 MB
REQUEST_CAP = 32 << 20  # AIBridge.MAX_REQUEST_DECODED_BYTES
_ZEROS = bytes(MIB)


@cache
def bomb(encoding: str) -> bytes:
    """1 GiB of zeros in `encoding`, made without ever holding it decoded."""
    return zeros_bomb(encoding, GIB_MIB)


def test_the_bombs_decode_to_exactly_1_gib() -> None:
    """Exactly at a 1 GiB limit each decodes whole, in steps, and is complete (deflate is
    gzip's deflate data in the other wrapper)."""
    for encoding in ("gzip", "br", "zstd"):
        data = bomb(encoding)
        assert len(data) < 2 * MIB
        inflater = BoundedInflater(encoding, GIB_MIB * MIB)
        for chunk in chunks_of(data, 64 * 1024):
            for _ in inflater.decode(chunk):
                pass
        inflater.finish()
        assert inflater.decoded_bytes == GIB_MIB * MIB, encoding


def events(n: int = 3) -> bytes:
    created = {"type": "response.created", "response": {"id": "resp_bomb", "status": "x"}}
    return b"".join(b"data: " + orjson.dumps(created) + b"\n\n" for _ in range(n))


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def traced_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------- the stream tee


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_stream_tee_stops_parsing_a_bomb_and_forwards_every_byte(encoding: str) -> None:
    data = bomb(encoding)
    acc = ResponseAccumulator()
    tee = StreamTee(acc, RESPONSES_API, encoding)

    def run() -> None:
        for chunk in chunks_of(data, 8192):
            assert tee(chunk) is chunk  # forwarded at once, unchanged
        assert tee(b"") == b""

    _, peak = traced_peak(run)
    assert tee.bytes_forwarded == len(data)
    limit_mib = MAX_DECODED_BYTES >> 20
    assert tee.parse_error == f"decoded body passed {limit_mib} MiB: parsing stopped"
    # One inflate step (1 MiB, briefly a few) and the parser's one event (8 MiB at most).
    assert peak < 16 * MIB, peak
    outcome = finish_exchange(RESPONSES_API, acc, tee, None, None)
    assert (outcome.status, outcome.error) == ("error", tee.parse_error)

    # The limit is on decoding: plain bytes past it are parsed as ever.
    acc = ResponseAccumulator()
    tee = StreamTee(acc, RESPONSES_API, "identity")
    filler = b": " + b"x" * (MIB - 4) + b"\n\n"
    for _ in range((MAX_DECODED_BYTES >> 20) + 2):
        tee(filler)
    tee(events())
    tee(b"")
    assert tee.parse_error is None
    assert acc.result().response_id == "resp_bomb"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_events_before_a_bomb_still_count(encoding: str) -> None:
    """A real start, then (a new gzip member or zstd frame, or in the same stream) zeros."""
    head = events()
    if encoding == "gzip":
        data = gzip.compress(head) + bomb("gzip")
    elif encoding == "zstd":
        data = zstd.compress(head) + bomb("zstd")
    elif encoding == "br":
        bo = brotli.Compressor(quality=5)
        parts = [bo.process(head) + bo.flush()]
        parts += [bo.process(_ZEROS) for _ in range(200)]
        data = b"".join(parts) + bo.finish()
    else:
        co = zlib.compressobj(9, zlib.DEFLATED, 15)
        parts = [co.compress(head) + co.flush(zlib.Z_SYNC_FLUSH)]
        parts += [co.compress(_ZEROS) for _ in range(200)]
        data = b"".join(parts) + co.flush()
    acc = ResponseAccumulator()
    tee = StreamTee(acc, RESPONSES_API, encoding)
    for chunk in chunks_of(data, 4096):
        assert tee(chunk) is chunk
    tee(b"")
    assert acc.result().response_id == "resp_bomb"
    assert tee.parse_error is not None and tee.parse_error.endswith(": parsing stopped")


# ----------------------------------------------------------------- buffered and error bodies


def upstream_response(status: int, encoding: str, data: bytes, content_type: str) -> http.Response:
    response = http.Response.make(status, b"", {"content-type": content_type})
    response.headers["content-encoding"] = encoding
    response.raw_content = data  # as read from the wire; never decoded by mitmproxy here
    return response


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_buffered_bomb_is_cut_at_the_limit(encoding: str) -> None:
    response = upstream_response(200, encoding, bomb(encoding), "application/json")
    outcome, peak = traced_peak(
        lambda: finish_exchange(RESPONSES_API, ResponseAccumulator(), None, response, None)
    )
    limit_mib = MAX_BUFFERED_DECODED_BYTES >> 20
    assert outcome.status == "error"
    assert outcome.error == f"decoded body passed {limit_mib} MiB: parsing stopped"
    assert peak < MAX_BUFFERED_DECODED_BYTES + 4 * MIB, peak
    assert response.raw_content is not None and response.raw_content == bomb(encoding)

    # Under the limits, compressed answers and error bodies are read as before.
    body = (FIXTURES / "text_buffered.response.json").read_bytes()
    ok = upstream_response(200, encoding, compressed(encoding, body), "application/json")
    outcome = finish_exchange(RESPONSES_API, ResponseAccumulator(), None, ok, None)
    assert (outcome.status, outcome.error) == ("completed", None)
    error = compressed(encoding, b'{"error": {"message": "slow down"}}')
    failed = upstream_response(429, encoding, error, "application/json")
    assert upstream_error_text(failed) == "upstream answered HTTP 429: slow down"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_buffered_event_stream_bomb_is_decoded_step_by_step(encoding: str) -> None:
    """Offline mode: a stored stream arrives whole, still encoded, and goes through the tee."""
    response = upstream_response(200, encoding, bomb(encoding), "text/event-stream")
    outcome, peak = traced_peak(
        lambda: finish_exchange(RESPONSES_API, ResponseAccumulator(), None, response, None)
    )
    assert outcome.status == "error"
    assert outcome.error == f"decoded body passed {MAX_DECODED_BYTES >> 20} MiB: parsing stopped"
    assert peak < 16 * MIB, peak


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_an_error_body_bomb_says_the_body_could_not_be_read(encoding: str) -> None:
    response = upstream_response(500, encoding, bomb(encoding), "application/json")
    outcome, peak = traced_peak(
        lambda: finish_exchange(RESPONSES_API, ResponseAccumulator(), None, response, None)
    )
    limit_mib = MAX_ERROR_DECODED_BYTES >> 20
    assert outcome.status == "upstream_error"
    assert outcome.error == (
        f"upstream answered HTTP 500 (the body could not be read: decoded body passed "
        f"{limit_mib} MiB)"
    )
    assert peak < MAX_ERROR_DECODED_BYTES + 4 * MIB, peak


# ------------------------------------------------------------- request bodies (addon hooks)


def compressed(encoding: str, body: bytes) -> bytes:
    return {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstd.compress,
    }[encoding](body)


class Hooks:
    def __init__(self, addon: AIBridge, db_path: Path) -> None:
        self.addon = addon
        self.db_path = db_path

    def interceptions(self, flow: http.HTTPFlow) -> list[dict[str, Any]]:
        assert self.addon.recorder is not None and self.addon.recorder.flush(10)
        return query(self.db_path, "select * from interceptions where flow_id = ?", (flow.id,))

    def interception(self, flow: http.HTTPFlow) -> dict[str, Any]:
        (row,) = self.interceptions(flow)
        return row


@pytest.fixture
def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hooks]:
    """The addon's hooks, driven as mitmproxy drives them (see tests/test_bridge.py)."""
    monkeypatch.chdir(tmp_path)
    config = bridge_config("https://api.openai.com", database=str(tmp_path / "hooks.db"))
    config["providers"][0]["api_key"] = PROVIDER_KEY
    path = tmp_path / "aibridge.yaml"
    path.write_text(yaml.safe_dump(config))
    addon = AIBridge(default_config_dir=tmp_path)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, aibridge_config=str(path))
        yield Hooks(addon, tmp_path / "hooks.db")
        addon.done()


def make_flow(
    body: bytes,
    *,
    encoding: str | None = None,
    token: str | None = TOKENS["alice"],
    url: str = "https://api.openai.com/v1/responses",
) -> http.HTTPFlow:
    request = http.Request.make("POST", url, body, {"content-type": "application/json"})
    if token is not None:
        request.headers["authorization"] = f"Bearer {token}"
    if encoding is not None:
        request.headers["content-encoding"] = encoding  # set after make(): body kept as is
    return tflow.tflow(req=request)


def run_request_hook(bridge: Hooks, flow: http.HTTPFlow) -> bool:
    """The request hook as mitmproxy runs it: awaited if it returns an awaitable.
    True if it did (the body was decoded off the loop)."""
    result = bridge.addon.request(flow)
    if result is None:
        return False
    asyncio.run(result)
    return True


REQUEST = (FIXTURES / "text_buffered.request.json").read_bytes()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_compressed_request_is_decoded_off_the_loop_and_forwarded_unchanged(
    hooks: Hooks, encoding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = compressed(encoding, REQUEST)
    flow = make_flow(body, encoding=encoding)
    assert run_request_hook(hooks, flow)  # a coroutine: mitmproxy awaits it
    assert flow.response is None  # forwarded
    assert flow.request.raw_content is body  # the original bytes, never re-encoded
    assert flow.request.headers["content-encoding"] == encoding
    assert not hasattr(flow, "_aibridge_decoded_body")
    row = hooks.interception(flow)
    assert row["model"] == orjson.loads(REQUEST)["model"]
    assert orjson.loads(row["metadata"])["request_bytes"] == len(body)
    assert (row["status"], row["streaming"]) == ("in_progress", 0)

    # Uncompressed bodies stay on the synchronous path, and nothing is decoded off the loop
    # for a client the bridge does not know (401 at once) or a path it does not parse.
    decoded: list[bytes] = []
    monkeypatch.setattr("aibridge.transport.inflate.decode_body", lambda *a: decoded.append(a[0]))
    for extra in ({}, {"encoding": "identity"}, {"encoding": " IDENTITY "}):
        flow = make_flow(REQUEST, **extra)
        assert hooks.addon.request(flow) is None
        assert flow.response is None
    for token in ("not-a-known-token-123", None):
        flow = make_flow(bomb(encoding), encoding=encoding, token=token)
        assert hooks.addon.request(flow) is None
        assert flow.response is not None and flow.response.status_code == 401
    models = make_flow(bomb(encoding), encoding=encoding, url="https://api.openai.com/v1/models")
    assert hooks.addon.request(models) is None
    assert decoded == []


def refusal(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    return orjson.loads(flow.response.content or b"")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_request_bomb_gets_413_and_is_recorded(hooks: Hooks, encoding: str) -> None:
    flow = make_flow(bomb(encoding), encoding=encoding)
    assert run_request_hook(hooks, flow)
    assert flow.response is not None and flow.response.status_code == 413
    message = f"request body too large: decoded body passed {REQUEST_CAP >> 20} MiB"
    assert refusal(flow) == {
        "code": "413",
        "message": message,
        "error": {"message": message, "type": "request_too_large", "code": "413"},
    }
    row = hooks.interception(flow)
    assert (row["status"], row["http_status"], row["error"]) == ("rejected", 413, message)
    assert row["initiator_id"] == "alice"


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"\x1f\x8b\x08\x00garbage"),
        ("gzip", gzip.compress(REQUEST)[:-20]),  # truncated
        ("deflate", b"\xff" * 100),
        ("br", b"not brotli"),
        ("zstd", zstd.compress(REQUEST)[:-4] + b"\xff\xff\xff\xff"),
        ("compress", b"LZW, long gone"),
        ("gzip, br", brotli.compress(gzip.compress(REQUEST))),  # stacked: refused
        ("snappy", REQUEST),
    ],
)
def test_a_corrupt_or_unsupported_request_body_gets_400(
    hooks: Hooks, encoding: str, body: bytes
) -> None:
    flow = make_flow(body, encoding=encoding)
    assert run_request_hook(hooks, flow)
    assert flow.response is not None and flow.response.status_code == 400
    error = refusal(flow)["message"]
    assert error.startswith("request body cannot be decoded: "), error
    row = hooks.interception(flow)
    assert (row["status"], row["http_status"], row["error"]) == ("rejected", 400, error)


def test_the_async_path_fails_closed(hooks: Hooks, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(flow: http.HTTPFlow) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(hooks.addon, "_request", broken)
    flow = make_flow(compressed("gzip", REQUEST), encoding="gzip")
    assert run_request_hook(hooks, flow)
    assert flow.response is not None and flow.response.status_code == 500
    assert "did not forward it" in refusal(flow)["message"]
    assert not hasattr(flow, "_aibridge_decoded_body")


def test_the_async_path_fails_closed_when_decoding_breaks(
    hooks: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any) -> bytes:
        raise MemoryError  # not a ValueError: nothing to judge the request by

    monkeypatch.setattr("aibridge.bridge.decode_body_in_thread", broken)
    flow = make_flow(compressed("zstd", REQUEST), encoding="zstd")
    assert run_request_hook(hooks, flow)
    assert flow.response is not None and flow.response.status_code == 500
    assert hooks.interceptions(flow) == []


# ----------------------------------------------------------------------- through mitmdump


class BombUpstream(LoopbackHTTP):
    """Answers ``x-case: <shape>:<encoding>`` with a bomb: ``stream`` (SSE, chunked),
    ``buffered`` (JSON, 200) or ``error`` (JSON, 500); ``small`` with a normal answer."""

    def __init__(self) -> None:
        self.requests = 0
        small = (FIXTURES / "text_buffered.response.json").read_bytes()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                upstream.requests += 1
                self.rfile.read(int(self.headers.get("content-length") or 0))
                shape, _, encoding = self.headers["x-case"].partition(":")
                if shape == "small":
                    self._send(200, "application/json", {}, small)
                    return
                data = bomb(encoding)
                extra = {"content-encoding": encoding}
                if shape == "stream":
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("content-encoding", encoding)
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(data), 8192):
                        piece = data[i : i + 8192]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                status = 200 if shape == "buffered" else 500
                self._send(status, "application/json", extra, data)

            def _send(self, status: int, ctype: str, extra: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)


@pytest.fixture(scope="module")
def bomb_upstream() -> Iterator[BombUpstream]:
    for encoding in ENCODINGS:
        bomb(encoding)  # built before any bridge is measured
    with BombUpstream() as upstream:
        yield upstream


# A provider key too short to be a secret (aibridge.echo.MIN_SECRET_LENGTH): with a real
# key, aibridge.echo checks every decoded byte for an echoed key and fails closed past its
# own decode limits (a cut stream, a 502), so the client no longer gets upstream's bytes.
# The bombs run both ways; only without a key can the bytes be compared.
UNMASKED_KEY = "sk-tiny"


def start_bridge(upstream: BombUpstream, workdir: Path, *, keyed: bool) -> Mitmdump:
    config = bridge_config(upstream.url)
    if not keyed:
        config["providers"][0]["api_key"] = UNMASKED_KEY
    bridge = Mitmdump(workdir, config)
    bridge.start()
    # One ordinary exchange first, so what start-up leaves to do is not counted.
    assert send(bridge, "small:", uuid.uuid4().hex).status_code == 200
    return bridge


@pytest.fixture
def fresh_bridge(bomb_upstream: BombUpstream, tmp_path: Path) -> Iterator[Mitmdump]:
    """A bridge of its own per bomb: memory another bomb's decoding left to the allocator
    would hide what this one costs."""
    bridge = start_bridge(bomb_upstream, tmp_path, keyed=True)
    try:
        yield bridge
    finally:
        bridge.stop()


@pytest.fixture
def unkeyed_bridge(bomb_upstream: BombUpstream, tmp_path: Path) -> Iterator[Mitmdump]:
    bridge = start_bridge(bomb_upstream, tmp_path, keyed=False)
    try:
        yield bridge
    finally:
        bridge.stop()


def send(
    bridge: Mitmdump, case: str, session: str, *, body: bytes | None = None, encoding: str = ""
) -> httpx.Response:
    headers = {
        "authorization": f"Bearer {TOKENS['alice']}",
        "x-case": case,
        "session_id": session,
        "accept-encoding": "gzip, deflate, br, zstd",
    }
    if encoding:
        headers["content-encoding"] = encoding
    if body is None:
        body = orjson.dumps({"model": "m", "input": "bomb", "stream": case.startswith("stream")})
    url = f"{bridge.url}/openai/v1/responses"
    with httpx.stream("POST", url, content=body, headers=headers, timeout=SAFETY) as r:
        # The client does not decode: it keeps the wire bytes (a bomb is ~1 MB of them).
        parts: list[bytes] = []
        r.extensions["cut"] = False
        try:
            parts.extend(r.iter_raw())
        except httpx.RemoteProtocolError:  # the bridge reset the connection mid-body
            r.extensions["cut"] = True
        r.extensions["raw_body"] = b"".join(parts)
    return r


def finished(bridge: Mitmdump, session: str) -> dict[str, Any]:
    def ended() -> list[dict[str, Any]]:
        sql = "select * from interceptions where client_session_id = ? and ended_at is not null"
        return query(bridge.db_path, sql, (session,))

    rows = wait_for(ended, SAFETY)
    assert rows and len(rows) == 1
    return rows[0]


class Memory:
    """The bridge's peak RSS over one bomb, against its RSS before."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_kib(pid)
        assert reset_peak_rss(pid), "the kernel cannot reset VmHWM"

    def added_kib(self) -> int:
        return peak_rss_kib(self.pid) - self.before


SHAPES = {
    "stream": ("error", f"decoded body passed {MAX_DECODED_BYTES >> 20} MiB: parsing stopped"),
    "buffered": (
        "error",
        f"decoded body passed {MAX_BUFFERED_DECODED_BYTES >> 20} MiB: parsing stopped",
    ),
    "error": (
        "upstream_error",
        "upstream answered HTTP 500 (the body could not be read: decoded body passed "
        f"{MAX_ERROR_DECODED_BYTES >> 20} MiB)",
    ),
}


def run_upstream_bomb(bridge: Mitmdump, shape: str, encoding: str) -> tuple[Any, ...]:
    session = uuid.uuid4().hex
    memory = Memory(bridge.proc.pid)  # type: ignore[union-attr]
    r = send(bridge, f"{shape}:{encoding}", session)
    row = finished(bridge, session)
    added = memory.added_kib()
    assert added < RSS_BOUND_KIB, f"{shape} {encoding}: +{added} KiB"
    assert row["initiator_id"] == "alice"
    assert "Traceback" not in bridge.log()
    return r, row, added


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_an_upstream_bomb_through_mitmdump(
    unkeyed_bridge: Mitmdump, shape: str, encoding: str
) -> None:
    r, row, added = run_upstream_bomb(unkeyed_bridge, shape, encoding)
    print(f"\n{shape} {encoding} (no key to check for): peak RSS +{added / 1024:.1f} MiB")
    assert r.status_code == (500 if shape == "error" else 200)
    assert r.headers["content-encoding"] == encoding
    assert not r.extensions["cut"]
    raw = r.extensions["raw_body"]
    assert hashlib.sha256(raw).digest() == hashlib.sha256(bomb(encoding)).digest()
    assert (row["status"], row["error"]) == SHAPES[shape]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_an_upstream_bomb_through_mitmdump_with_a_provider_key(
    fresh_bridge: Mitmdump, shape: str, encoding: str
) -> None:
    """The same bombs with echo checking on: memory stays bounded and the record says which
    limit stopped the bridge; the client gets upstream's bytes or a prefix of them (a cut
    stream) or the bridge's own error, never anything decoded."""
    r, row, added = run_upstream_bomb(fresh_bridge, shape, encoding)
    print(f"\n{shape} {encoding} (provider key): peak RSS +{added / 1024:.1f} MiB")
    raw = r.extensions["raw_body"]
    if r.headers.get("x-aibridge-error"):
        assert orjson.loads(raw)["error"]["message"]
    else:
        assert r.headers["content-encoding"] == encoding
        assert bomb(encoding).startswith(raw)
    assert row["status"] in ("error", "upstream_error")
    assert "decoded body passed " in row["error"], row["error"]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_request_bomb_through_mitmdump(
    fresh_bridge: Mitmdump, bomb_upstream: BombUpstream, encoding: str
) -> None:
    session = uuid.uuid4().hex
    before = bomb_upstream.requests
    memory = Memory(fresh_bridge.proc.pid)  # type: ignore[union-attr]
    r = send(fresh_bridge, "small:", session, body=bomb(encoding), encoding=encoding)
    row = finished(fresh_bridge, session)
    added = memory.added_kib()
    print(f"\nrequest {encoding}: peak RSS +{added / 1024:.1f} MiB")
    message = f"request body too large: decoded body passed {REQUEST_CAP >> 20} MiB"
    assert r.status_code == 413
    assert orjson.loads(r.extensions["raw_body"])["error"]["type"] == "request_too_large"
    assert (row["status"], row["http_status"], row["error"]) == ("rejected", 413, message)
    assert bomb_upstream.requests == before  # never forwarded
    assert added < RSS_BOUND_KIB, f"request {encoding}: +{added} KiB"
    assert "Traceback" not in fresh_bridge.log()


def test_small_requests_go_through_while_request_bombs_are_decoded(
    fresh_bridge: Mitmdump, bomb_upstream: BombUpstream
) -> None:
    """Decoding happens off the event loop: other clients are served meanwhile (the delay
    they see is measured, not asserted, by ``python -m bench.bombs``)."""
    stop = threading.Event()
    bombs: list[int] = []

    def bomber() -> None:
        while not stop.is_set():
            for encoding in ("zstd", "gzip"):
                session = uuid.uuid4().hex
                r = send(fresh_bridge, "small:", session, body=bomb(encoding), encoding=encoding)
                bombs.append(r.status_code)

    thread = threading.Thread(target=bomber, daemon=True)
    thread.start()
    try:
        wait_for(lambda: bombs, SAFETY)
        statuses = [send(fresh_bridge, "small:", uuid.uuid4().hex).status_code for _ in range(30)]
    finally:
        stop.set()
        thread.join(SAFETY)
    assert statuses == [200] * 30
    assert bombs and set(bombs) == {413}
    with contextlib.suppress(FileNotFoundError):
        assert "Traceback" not in fresh_bridge.log()


def test_a_stream_bomb_is_recorded_the_same_live_and_offline() -> None:
    """What the live tee records equals what offline mode rebuilds from the stored body."""
    data = bomb("zstd")
    live_acc = ResponseAccumulator()
    tee = StreamTee(live_acc, RESPONSES_API, "zstd")
    for chunk in chunks_of(data, 8192):
        tee(chunk)
    tee(b"")
    live = finish_exchange(RESPONSES_API, live_acc, tee, None, None)
    stored = upstream_response(200, "zstd", data, "text/event-stream")
    offline = finish_exchange(RESPONSES_API, ResponseAccumulator(), None, stored, None)
    assert live.error == f"decoded body passed {MAX_DECODED_BYTES >> 20} MiB: parsing stopped"
    assert (offline.status, offline.error) == (live.status, live.error)
    assert asdict(offline.result) == asdict(live.result)
