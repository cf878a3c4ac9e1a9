"""Hostile input: the addon never raises into mitmproxy, never lets a client's token or an
unrecorded Responses call through, and the client always gets upstream's bytes unchanged.

Property tests (hypothesis) and a seeded fuzz run cover the request classifier, the stream
tee with its SSE parser, and the record extraction down to rows SQLite accepts; through a
real mitmdump go a 50 MB body, undecodable header bytes, and upstream bytes of every kind.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import itertools
import random
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from aibridge.apis import Api
from aibridge.apis.openai_responses import API as RESPONSES_API
from aibridge.apis.openai_responses import RequestError, parse_request
from aibridge.bridge import AIBridge
from aibridge.config import Privacy, parse_config
from aibridge.record.outcome import Outcome, finish_exchange
from aibridge.record.recorder import REASON_INVALID_UNICODE, Recorder
from aibridge.record.rows import end_rows
from aibridge.routing import RouteKind, classify
from aibridge.transport import mitm_compat
from aibridge.transport.tee import StreamTee
from devtools.fake_upstream import FakeUpstream
from tests.harness import (
    PROVIDER_KEY,
    TOKENS,
    ChunkedReplies,
    Mitmdump,
    bridge_config,
    query,
    wait_for,
)

SAFETY = 60.0  # upper bound for waits; never asserted as a duration
FIXTURES = Path(__file__).parent / "fixtures"
STREAMS = sorted(FIXTURES.glob("*.response.sse"))
REQUESTS = sorted(FIXTURES.glob("*.request.json"))
fuzz = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# ------------------------------------------------------------------- request classifier

CONFIG = parse_config(
    {
        "providers": [
            {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": "k"},
            {"name": "azure", "base_url": "https://x.example.com/openai/v1", "api_key": "k"},
        ]
    },
    "hostile.yaml",
    {},
)
SEGMENTS = [
    "v1",
    "responses",
    "models",
    "conversations",
    "openai",
    "azure",
    "..",
    ".",
    "",
    "%2e%2e",
    "%2E",
    "..%2f",
    "x",
]
segment_paths = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=7).map(
    lambda parts: "/" + "/".join(parts)
)
hosts = st.sampled_from(["api.openai.com", "x.example.com", "bridge.local"]) | st.text(max_size=20)


@fuzz
@given(
    method=st.sampled_from(["GET", "POST", "DELETE"]) | st.text(max_size=8),
    host=hosts,
    port=st.integers(min_value=0, max_value=70000),
    path=segment_paths | st.text(max_size=60),
    upgrade=st.booleans(),
)
def test_classify_never_raises(method: str, host: str, port: int, path: str, upgrade: bool) -> None:
    route = classify(CONFIG, method, host, port, path, websocket_upgrade=upgrade)
    assert isinstance(route.kind, RouteKind)
    if route.kind is RouteKind.BRIDGED:
        assert method == "POST" and route.api_path == "/v1/responses"


def normalized(path: str) -> str:
    """The path a server that removes dot segments (RFC 3986 5.2.4) would serve."""
    out: list[str] = []
    for segment in path.split("?")[0].replace("%2e", ".").replace("%2E", ".").split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return "/".join(out)


def test_no_path_reaches_the_responses_api_unrecorded() -> None:
    """Every path of up to three segments between a prefix and a last one, exhaustively:
    whatever a server that removes dot segments would serve as the Responses API is
    recorded or refused, never passed through."""
    middles = ["models", "conversations", "responses", "x", "", ".", "..", "%2e%2e", "%2E"]
    lasts = ["responses", "responses/", "responses/.", "models"]
    for prefix in ("", "/openai", "/azure"):
        for size in range(4):
            for middle in itertools.product(middles, repeat=size):
                for last in lasts:
                    path = "/".join([f"{prefix}/v1", *middle, last])
                    for host in ("api.openai.com", "bridge.local"):
                        route = classify(CONFIG, "POST", host, 443, path)
                        if route.kind is RouteKind.UNRELATED:
                            continue
                        target = route.upstream_path if route.upstream_path is not None else path
                        if normalized(target).rstrip("/").endswith("/v1/responses"):
                            assert route.kind in (RouteKind.BRIDGED, RouteKind.FORBIDDEN), path


# --------------------------------------------------- stream tee and record extraction


def bindable(value: Any) -> None:
    """SQLite takes the value (the recorder turns dicts and lists into JSON text)."""
    if isinstance(value, dict | list):
        value = orjson.dumps(value).decode()
    sqlite3.connect(":memory:").execute("select ?", (value,))


def api_rows(
    api: Api, fallback: bytes, provider_type: str, outcome: Outcome, request: bytes
) -> list[tuple[str, dict[str, Any]]]:
    """The rows of `outcome` for `request` on `api` (`fallback` when the request is refused)."""
    try:
        _, info = api.parse_request(request)
    except RequestError:
        _, info = api.parse_request(fallback)
    return list(end_rows("i1", info, outcome, 200, Privacy(), "now", provider_type=provider_type))


rows_of = functools.partial(api_rows, RESPONSES_API, b'{"model": "m", "input": "x"}', "openai")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation: flip, drop, duplicate or insert bytes, or cut the stream."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        at = rng.randrange(len(buf)) if buf else 0
        kind = rng.randrange(6)
        if kind == 0 and buf:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del buf[at : at + rng.randrange(1, 200)]
        elif kind == 2:
            buf[at:at] = buf[at : at + rng.randrange(1, 200)]
        elif kind == 3:
            buf[at:at] = rng.choice([b"\n\n", b"\r", b"\xff\xfe", b"\x00", b"data: {", b"[" * 300])
        elif kind == 4:
            del buf[at:]
        else:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
    return bytes(buf)


def chunked(data: bytes, rng: random.Random) -> list[bytes]:
    chunks, i = [], 0
    while i < len(data):
        size = rng.choice([1, 7, 97, 4096, 65536])
        chunks.append(data[i : i + size])
        i += size
    return chunks


def tee_outcome(api: Api, data: bytes, rng: random.Random, encoding: str = "") -> Outcome:
    """`data` through the stream tee of `api` in random chunks: each forwarded at once and
    unchanged; how the exchange ended."""
    acc = api.new_accumulator()
    tee = StreamTee(acc, api, encoding)
    for piece in chunked(data, rng):
        assert tee(piece) is piece  # forwarded at once, unchanged
    assert tee(b"") == b""
    assert tee.bytes_forwarded == len(data)
    return finish_exchange(api, acc, tee, None, None)


through_tee = functools.partial(tee_outcome, RESPONSES_API)


def fuzz_into_recorder(
    db: Path,
    streams: list[Path],
    rounds: int,
    rng: random.Random,
    through: Any,
    rows: Any,
) -> None:
    """Mutate each golden stream `rounds` times (a fifth of them gzip-compressed and cut),
    run it through the tee (`through(data, rng, encoding)`), and write its rows
    (`rows(outcome, request body)`) with the real recorder: every value must bind, every
    record must land, nothing may be lost."""
    rec = Recorder(db)
    rec.start()
    cases = 0
    for path in streams:
        original = path.read_bytes()
        request = path.with_name(path.name.replace(".response.sse", ".request.json")).read_bytes()
        for _ in range(rounds):
            data = mutate(original, rng)
            encoding = ""
            if rng.random() < 0.2:
                data, encoding = gzip.compress(data)[: rng.randrange(10, 10_000)], "gzip"
            outcome = through(data, rng, encoding)
            iid = uuid.uuid4().hex
            rec.upsert("interceptions", {"id": iid, "status": "in_progress"})
            for table, row in rows(outcome, request):
                for value in row.values():
                    bindable(value)
                if table == "interceptions":
                    rec.upsert(table, {**row, "id": iid})
                else:
                    rec.insert(table, {**row, "interception_id": iid})
            cases += 1
    assert rec.flush(SAFETY)
    rec.close()
    assert query(db, "select count(*) as n from interceptions")[0]["n"] == cases
    assert query(db, "select * from recorder_losses") == []


def test_fuzzed_streams_forward_unchanged_and_record_cleanly(tmp_path: Path) -> None:
    """A seeded fuzz run over every golden stream, its records written by the recorder."""
    rng = random.Random(20_240_601)
    fuzz_into_recorder(tmp_path / "fuzz.db", STREAMS, 40, rng, through_tee, rows_of)


def test_fuzzed_request_bodies_parse_or_get_a_400() -> None:
    rng = random.Random(7)
    for path in REQUESTS:
        original = path.read_bytes()
        for _ in range(60):
            body = mutate(original, rng)
            try:
                _, info = parse_request(body)
            except RequestError:
                continue
            assert info.prompt is None or isinstance(info.prompt, str)
            assert info.model is None or isinstance(info.model, str)


def nested(depth: int, leaf: str = "x") -> str:
    return "[" * depth + orjson.dumps(leaf).decode() + "]" * depth


def test_deep_nesting_and_huge_strings_in_events() -> None:
    """Nesting deeper than orjson writes (255) or reads (1024), and an 8 MiB+ event."""
    huge = "y" * (9 << 20)
    events = [
        {"type": "response.created", "response": {"id": "resp_deep", "model": huge[:100_000]}},
        {
            "type": "response.output_item.done",
            "item": {
                "type": "function_call",
                "name": "deep",
                "call_id": "call_deep",
                "arguments": nested(600),
            },
        },
        {"type": "response.output_item.done", "item": {"type": "message", "content": huge}},
    ]
    stream = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    stream += b"data: " + nested(2000).encode() + b"\n\n"  # too deep for orjson to read
    completed = {
        "type": "response.completed",
        "response": {
            "id": "resp_deep",
            "status": "completed",
            "output": [],
            "usage": {
                "input_tokens": 12345,
                "output_tokens": -1,
                "deep": "DEEP",
            },
        },
    }
    data = orjson.dumps(completed).replace(b"12345", b"9" * 30)  # beyond 64 bits
    data = data.replace(b'"DEEP"', nested(500).encode())  # deeper than orjson writes
    stream += b"event: response.completed\ndata: " + data + b"\n\n"
    outcome = through_tee(stream, random.Random(1))
    assert outcome.status == "completed"
    result = outcome.result
    assert result.response_id == "resp_deep"
    (tool,) = result.tool_usages
    assert tool["args"] == nested(600)  # too deep to store as JSON: kept as its raw text
    assert result.malformed_events >= 1
    for _, row in rows_of(outcome, b'{"model": "m", "input": "x"}'):
        for value in row.values():
            bindable(value)


# -------------------------------------------------------------------- the addon's hooks

header_text = st.text(max_size=40) | st.binary(max_size=40).map(
    lambda b: b.decode("utf-8", "surrogateescape")  # what mitmproxy makes of bad bytes
)
bodies = st.binary(max_size=300) | st.sampled_from(REQUESTS).map(lambda p: p.read_bytes())


@pytest.fixture(scope="module")
def hook_bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AIBridge]:
    directory = tmp_path_factory.mktemp("hooks")
    config = bridge_config("https://api.openai.com", database=str(directory / "hooks.db"))
    config["providers"][0]["api_key"] = PROVIDER_KEY
    path = directory / "aibridge.yaml"
    path.write_text(yaml.safe_dump(config))
    addon = AIBridge(default_config_dir=directory)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, aibridge_config=str(path))
        yield addon
        addon.done()
    losses = query(directory / "hooks.db", "select reason from recorder_losses")
    assert {r["reason"] for r in losses} <= {REASON_INVALID_UNICODE}


@fuzz
@given(
    body=bodies,
    path=st.sampled_from(["/v1/responses", "/v1/models", "/v1/files", "/v1/responses/x"]),
    token=st.sampled_from([*TOKENS.values(), "unknown-token-123456", ""]),
    user_agent=header_text,
    session=header_text,
    status=st.sampled_from([200, 200, 400, 429, 500]),
    content_type=st.sampled_from(["text/event-stream", "application/json", "text/html", ""]),
    response=st.binary(max_size=300) | st.sampled_from(STREAMS).map(lambda p: p.read_bytes()),
    fail=st.booleans(),
)
def test_hooks_never_raise_and_never_leak_a_token(
    hook_bridge: AIBridge,
    body: bytes,
    path: str,
    token: str,
    user_agent: str,
    session: str,
    status: int,
    content_type: str,
    response: bytes,
    fail: bool,
) -> None:
    request = http.Request.make("POST", f"https://api.openai.com{path}", body, {})
    request.headers["authorization"] = f"Bearer {token}"
    request.headers["user-agent"] = user_agent
    request.headers["session_id"] = session
    flow = tflow.tflow(req=request)
    hook_bridge.request(flow)
    if flow.response is not None:
        return  # refused: the provider never sees it
    mitm_compat.run_before_send(flow)  # as mitmproxy does right before sending the head
    sent = bytes(flow.request.headers)  # what goes upstream
    assert not any(t.encode() in sent for t in TOKENS.values())
    assert flow.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    flow.response = http.Response.make(status, b"", {"content-type": content_type})
    hook_bridge.responseheaders(flow)
    stream = flow.response.stream
    if callable(stream):
        for i in range(0, len(response), 50):
            assert stream(response[i : i + 50]) == response[i : i + 50]
    else:
        flow.response.content = response
    if fail:
        flow.error = flow.error or tflow.terr()
        hook_bridge.error(flow)
    else:
        if callable(stream):
            stream(b"")
        hook_bridge.response(flow)
    assert PROVIDER_KEY not in str(flow.request.headers)


# ------------------------------------------------------------------ through mitmdump


def completed(**response: Any) -> bytes:
    event = {
        "type": "response.completed",
        "response": {"id": "resp_h", "status": "completed", **response},
    }
    return b"event: response.completed\ndata: " + orjson.dumps(event) + b"\n\n"


HOSTILE_CASES = (
    "random_bytes",
    "invalid_utf8",
    "cr_line_ends",
    "nul_bytes",
    "oversized_event",
    "deep_json",
    "bad_gzip",
    "json_garbage",
)


def hostile_cases() -> dict[str, tuple[str, dict[str, str], bytes]]:
    """Upstream answers: (content type, extra headers, body)."""
    rng = random.Random(99)
    golden = (FIXTURES / "function_call_streamed.response.sse").read_bytes()
    es = "text/event-stream"
    return {
        "random_bytes": (es, {}, rng.randbytes(65536)),
        "invalid_utf8": (
            es,
            {},
            b'data: {"type":"response.created","response":{"id":"r\xff\xfe"}}\n\n',
        ),
        "cr_line_ends": (es, {}, golden.replace(b"\n", b"\r")),
        "nul_bytes": (es, {}, b"\x00" * 10_000 + golden),
        "oversized_event": (
            es,
            {},
            b"data: " + b"z" * (9 << 20) + b"\n\n" + completed(usage={"input_tokens": 1}),
        ),
        "deep_json": (
            es,
            {},
            completed(
                output=[
                    {"type": "function_call", "name": "d", "call_id": "c", "arguments": nested(700)}
                ],
                usage={"input_tokens": "many", "output_tokens": 12345},
            ).replace(b"12345", b"1" * 40),  # beyond 64 bits
        ),
        "bad_gzip": (es, {"content-encoding": "gzip"}, b"\x1f\x8b\x08\x00" + rng.randbytes(5000)),
        "json_garbage": ("application/json", {}, b'{"id": "resp_x", "output": [' + b"{" * 5000),
    }


class HostileUpstream(ChunkedReplies):
    """Answers each request with the case its ``x-case`` header names, in chunks."""

    def __init__(self) -> None:
        cases = hostile_cases()
        assert set(cases) == set(HOSTILE_CASES)
        self.cases = cases
        super().__init__(lambda headers: (200, *cases[headers["x-case"]]))


class Served:
    def __init__(self, bridge: Mitmdump, fake: FakeUpstream, hostile: HostileUpstream) -> None:
        self.bridge = bridge
        self.fake = fake
        self.hostile = hostile


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A reverse proxy to the fake provider (a bypass would reach it), and a hostile
    provider behind the route prefix /hostile/v1."""
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(FakeUpstream())
        hostile = stack.enter_context(HostileUpstream())
        config = bridge_config(fake.url)
        config["providers"].append(
            {
                "name": "hostile",
                "type": "openai",
                "base_url": f"{hostile.url}/v1",
                "api_key": "${TEST_PROVIDER_KEY}",
            }
        )
        workdir = tmp_path_factory.mktemp("hostile")
        bridge = stack.enter_context(Mitmdump(workdir, config, mode=f"reverse:{fake.url}"))
        yield Served(bridge, fake, hostile)


def log_since(bridge: Mitmdump, start: int) -> str:
    return bridge.log()[start:]


def by_session(bridge: Mitmdump, session: str) -> dict[str, Any]:
    def ended() -> list[dict[str, Any]]:
        sql = "select * from interceptions where client_session_id = ? and ended_at is not null"
        return query(bridge.db_path, sql, (session,))

    rows = wait_for(ended, SAFETY)
    assert rows and len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_upstream_bytes_reach_the_client_unchanged(served: Served, case: str) -> None:
    _, _, expected = served.hostile.cases[case]
    start = len(served.bridge.log())
    session = uuid.uuid4().hex
    headers = {"authorization": f"Bearer {TOKENS['alice']}", "x-case": case, "session_id": session}
    url = f"{served.bridge.url}/hostile/v1/responses"
    body = orjson.dumps({"model": "m", "input": "hostile", "stream": True})
    with httpx.stream("POST", url, content=body, headers=headers, timeout=SAFETY) as r:
        received = b"".join(r.iter_raw())
    assert r.status_code == 200
    assert received == expected
    row = by_session(served.bridge, session)
    assert row["initiator_id"] == "alice"
    assert row["status"] in ("completed", "error")
    if case in ("oversized_event", "deep_json", "cr_line_ends", "nul_bytes"):
        assert row["status"] == "completed", row
    assert "Traceback" not in log_since(served.bridge, start)


def test_a_50_mb_request_body(served: Served) -> None:
    start = len(served.bridge.log())
    image = "A" * (50 << 20)
    body = orjson.dumps(
        {
            "model": "fake-text",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_image", "image_url": f"data:image/png;base64,{image}"},
                        {"type": "input_text", "text": "describe this"},
                    ],
                }
            ],
        }
    )
    session = uuid.uuid4().hex
    r = httpx.post(
        f"{served.bridge.url}/v1/responses",
        content=body,
        headers={"authorization": f"Bearer {TOKENS['bob']}", "session_id": session},
        timeout=SAFETY,
    )
    assert r.status_code == 200, r.text[:300]
    got = [x for x in served.fake.requests if x.headers.get("session_id") == session]
    assert len(got) == 1
    assert hashlib.sha256(got[0].body).digest() == hashlib.sha256(body).digest()
    row = by_session(served.bridge, session)
    assert (row["status"], row["initiator_id"]) == ("completed", "bob")
    assert orjson.loads(row["metadata"])["request_bytes"] == len(body)
    (prompt,) = query(
        served.bridge.db_path, "select * from user_prompts where interception_id = ?", (row["id"],)
    )
    assert prompt["prompt"] == "describe this"
    assert "Traceback" not in log_since(served.bridge, start)


def test_too_deep_or_broken_bodies_get_a_400(served: Served) -> None:
    before = len(served.fake.requests)
    for body in (
        b'{"model": "m", "input": ' + nested(5000).encode() + b"}",
        b'{"model": "m", "input": "\xff\xfe"}',
        b'{"model": "m", "input": "x"' + b" " * (5 << 20),
    ):
        r = httpx.post(
            f"{served.bridge.url}/v1/responses",
            content=body,
            headers={"authorization": f"Bearer {TOKENS['alice']}"},
            timeout=SAFETY,
        )
        assert r.status_code == 400 and r.json()["code"] == "400"
    assert len(served.fake.requests) == before


def raw_request(bridge: Mitmdump, head: bytes, body: bytes) -> bytes:
    """Send bytes no HTTP client library would (undecodable header values)."""
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=SAFETY) as sock:
        sock.sendall(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_undecodable_header_bytes_are_recorded(served: Served) -> None:
    session = uuid.uuid4().hex
    answer = raw_request(
        served.bridge,
        b"POST /v1/responses HTTP/1.1\r\nhost: x\r\n"
        b"authorization: Bearer " + TOKENS["alice"].encode() + b"\r\n"
        b"user-agent: agent-\xff\xfe/1.0\r\n"
        b"session_id: " + session.encode() + b"\r\n",
        b'{"model": "fake-text", "input": "bad header bytes"}',
    )
    assert answer.startswith(b"HTTP/1.1 200")
    row = by_session(served.bridge, session)
    assert (row["status"], row["initiator_id"]) == ("completed", "alice")
    assert row["user_agent"] == "agent-\ufffd\ufffd/1.0"
    losses = query(served.bridge.db_path, "select * from recorder_losses")
    assert {(r["table_name"], r["field"], r["reason"]) for r in losses} <= {
        ("interceptions", "user_agent", REASON_INVALID_UNICODE)
    }


def test_an_undecodable_token_is_refused(served: Served) -> None:
    before = len(served.fake.requests)
    answer = raw_request(
        served.bridge,
        b"POST /v1/responses HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tok-\xff\xfe-en\r\n",
        b'{"model": "fake-text", "input": "x"}',
    )
    assert answer.startswith(b"HTTP/1.1 401")
    assert b'"code":"401"' in answer
    assert len(served.fake.requests) == before, "the request reached the provider"
    assert "Addon error" not in served.bridge.log()


@pytest.mark.parametrize(
    "path", ["/v1/models/../responses", "/v1/conversations/%2e%2e/responses", "/v1/responses/./"]
)
def test_dot_segments_cannot_reach_the_responses_api_unrecorded(served: Served, path: str) -> None:
    # Raw bytes: HTTP client libraries resolve dot segments before sending.
    before = len(served.fake.requests)
    answer = raw_request(
        served.bridge,
        b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n"
        b"authorization: Bearer " + TOKENS["alice"].encode() + b"\r\n",
        b'{"model": "fake-text", "input": "sneaky"}',
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b'"code":"403"' in answer
    assert len(served.fake.requests) == before
