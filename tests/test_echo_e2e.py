"""Through a real ``mitmdump -s addon.py``: a provider that echoes the key it was sent (in a
response header, a buffered JSON body, a 401 error body, an SSE event split across chunks, a
gzip body, a gzip stream). The client's bytes, the SQLite file (and its WAL), a flow file
written with ``-w`` and mitmdump's log never hold the key; its hint is there instead."""

from __future__ import annotations

import contextlib
import gzip
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from aibridge.auth import hint
from devtools import fake_upstream
from tests.harness import (
    PROVIDER_KEY,
    TOKENS,
    LoopbackHTTP,
    Mitmdump,
    bridge_config,
    query,
    wait_for,
)

SAFETY = 30.0  # upper bound for waits; never asserted as a duration
KEY = PROVIDER_KEY.encode()
HINT = hint(PROVIDER_KEY).encode()
# Where the SSE case splits the event that carries the key, counted from the key's start.
OFFSETS = (1, 4, 5, 19, len(PROVIDER_KEY) - 1)
TAIL = b"data: " + KEY[:-1]


def _templates() -> tuple[bytes, list[bytes]]:
    """A Responses object and its event stream, made once (ids, timestamps), with the key's
    place marked."""
    outcome = fake_upstream.Outcome(
        [
            fake_upstream.reasoning_item([f"the key I was sent is {MARK}"]),
            fake_upstream.function_call_item("shell", {"cmd": f"export KEY={MARK}"}),
        ],
        fake_upstream.usage(10, 5),
    )
    obj = fake_upstream.response_object({"model": "m"}, "resp_echo", 1, outcome)
    writer = fake_upstream.SseWriter()
    created = {**obj, "status": "in_progress", "output": []}
    frames = [
        writer.frame("response.created", response=created),
        writer.frame("response.output_item.done", output_index=1, item=obj["output"][1]),
        writer.frame("response.completed", response=obj),
    ]
    return orjson.dumps(obj), frames


MARK = "@@SECRET@@"
_OBJECT, _FRAMES = _templates()


def completed_object(secret: str) -> bytes:
    return _OBJECT.replace(MARK.encode(), secret.encode())


def sse_frames(secret: str) -> list[bytes]:
    return [f.replace(MARK.encode(), secret.encode()) for f in _FRAMES]


class EchoingUpstream(LoopbackHTTP):
    """Echoes the key of each request's Authorization header, the way its ``x-case`` says."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                key = self.headers["authorization"].removeprefix("Bearer ")
                case = self.headers["x-case"]
                if case.startswith("sse-"):
                    self.stream(key, case)
                    return
                status, headers, body = 200, {"content-type": "application/json"}, b""
                if case == "header":
                    headers["x-request-key"] = key
                    body = completed_object("(not in the body)")
                elif case == "json":
                    body = completed_object(key)
                elif case == "401":
                    status = 401
                    message = f"Incorrect API key provided: {key}. Find your key at ..."
                    body = orjson.dumps({"error": {"message": message, "code": "invalid_api_key"}})
                elif case == "gzip-json":
                    headers["content-encoding"] = "gzip"
                    body = gzip.compress(completed_object(key))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def stream(self, key: str, case: str) -> None:
                frames = sse_frames(key)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                if case == "sse-gzip":
                    self.send_header("content-encoding", "gzip")
                    comp = zlib.compressobj(wbits=31)
                    pieces = [comp.compress(f) + comp.flush(zlib.Z_SYNC_FLUSH) for f in frames]
                    pieces.append(comp.flush())
                elif case == "sse-tail":  # ends with most of the key: held to the end
                    pieces = [*frames, TAIL]
                else:
                    body = b"".join(frames)
                    offset = 5 if case == "sse-length" else int(case.removeprefix("sse-"))
                    cut = body.index(key.encode()) + offset
                    pieces = [body[:cut], body[cut:]]
                if case == "sse-length":  # a stream with a length, which masking changes
                    self.send_header("content-length", str(sum(map(len, pieces))))
                else:
                    self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for piece in pieces:
                    framed = (
                        piece if case == "sse-length" else b"%x\r\n%s\r\n" % (len(piece), piece)
                    )
                    self.wfile.write(framed)
                    self.wfile.flush()
                    time.sleep(0.02)  # separate reads on the bridge's side, most likely
                if case != "sse-length":
                    self.wfile.write(b"0\r\n\r\n")

        super().__init__(Handler)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every case once through one bridge; the bridge is stopped before the checks."""
    workdir = tmp_path_factory.mktemp("echo")
    flows = workdir / "flows.mitm"
    client: dict[str, bytes] = {}
    headers: dict[str, httpx.Headers] = {}
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(EchoingUpstream())
        bridge = Mitmdump(workdir, bridge_config(upstream.url), extra_args=["-w", str(flows)])
        stack.enter_context(bridge)
        cases = ["header", "json", "401", "gzip-json", "sse-gzip", "sse-length", "sse-tail"]
        cases += [f"sse-{offset}" for offset in OFFSETS]
        for case in cases:
            body = {"model": "m", "input": f"case {case}", "stream": case.startswith("sse")}
            got = b""
            with (
                contextlib.suppress(httpx.RemoteProtocolError),
                httpx.stream(
                    "POST",
                    f"{bridge.url}/openai/v1/responses",
                    content=orjson.dumps(body),
                    headers={"authorization": f"Bearer {TOKENS['alice']}", "x-case": case},
                    timeout=SAFETY,
                ) as r,
            ):
                headers[case] = r.headers
                for piece in r.iter_raw():
                    got += piece
            client[case] = got
        ended = "select count(*) as n from interceptions where ended_at is not null"
        assert wait_for(lambda: query(bridge.db_path, ended)[0]["n"] == len(cases), SAFETY)
        while_running = files_of(bridge.db_path)
    rows = {
        r["prompt"].removeprefix("case "): r
        for r in query(
            bridge.db_path,
            "select i.*, p.prompt from interceptions i join user_prompts p "
            "on p.interception_id = i.id",
        )
    }
    yield {
        "client": client,
        "headers": headers,
        "rows": rows,
        "db": bridge.db_path,
        "db_bytes": [while_running, files_of(bridge.db_path)],
        "flows": flows.read_bytes(),
        "log": bridge.log().encode(),
    }


def files_of(db_path: Path) -> bytes:
    """The database file and its -wal and -shm files, whole."""
    return b"".join(p.read_bytes() for p in sorted(db_path.parent.glob(db_path.name + "*")))


def test_the_client_never_gets_the_key(run: dict[str, Any]) -> None:
    for case, got in run["client"].items():
        assert KEY not in got, case
        assert PROVIDER_KEY not in str(run["headers"][case]), case
    assert run["headers"]["header"]["x-request-key"] == hint(PROVIDER_KEY)
    for case in ("json", "401", *(f"sse-{o}" for o in OFFSETS)):
        assert HINT in run["client"][case], case
    unzipped = gzip.decompress(run["client"]["gzip-json"])
    assert KEY not in unzipped and HINT in unzipped
    assert run["headers"]["gzip-json"]["content-encoding"] == "gzip"


def test_a_split_sse_event_reaches_the_client_masked_and_whole(run: dict[str, Any]) -> None:
    want = b"".join(sse_frames(PROVIDER_KEY)).replace(KEY, HINT)
    for case in (*(f"sse-{o}" for o in OFFSETS), "sse-length"):
        assert run["client"][case] == want, case
        row = run["rows"][case]
        assert row["status"] == "completed", row
    # What was held back at the end is sent with the end (mitmproxy sends what the stream
    # callable returns for its final b"").
    assert run["client"]["sse-tail"] == b"".join(sse_frames(PROVIDER_KEY)).replace(KEY, HINT) + TAIL
    # The announced length would be wrong once masked: the body ends with the connection.
    assert "content-length" not in run["headers"]["sse-length"]


def test_a_gzip_stream_that_echoes_the_key_is_cut_before_it(run: dict[str, Any]) -> None:
    got = zlib.decompressobj(wbits=31).decompress(run["client"]["sse-gzip"])
    assert got == sse_frames(PROVIDER_KEY)[0]  # the first event, then the cut
    row = run["rows"]["sse-gzip"]
    assert row["status"] == "error"
    assert "echoed a provider secret" in row["error"] and "cut" in row["error"]


def test_the_records_hold_the_hint(run: dict[str, Any]) -> None:
    rows = run["rows"]
    assert rows["401"]["status"] == "upstream_error"
    assert rows["401"]["error"] == (
        f"upstream answered HTTP 401: Incorrect API key provided: {hint(PROVIDER_KEY)}. "
        "Find your key at ..."
    )
    for case in ("header", "json", "gzip-json"):
        assert rows[case]["status"] == "completed", rows[case]
    for case in ("json", "gzip-json", "sse-1"):
        iid = rows[case]["id"]
        (tool,) = query(run["db"], "select args from tool_usages where interception_id = ?", (iid,))
        assert orjson.loads(tool["args"]) == {"cmd": f"export KEY={hint(PROVIDER_KEY)}"}
    iid = rows["json"]["id"]
    (thought,) = query(run["db"], "select * from model_thoughts where interception_id = ?", (iid,))
    assert thought["content"] == f"the key I was sent is {hint(PROVIDER_KEY)}"


def test_the_key_is_in_no_file(run: dict[str, Any]) -> None:
    for blob in run["db_bytes"]:  # while it ran (the WAL holds the newest pages) and after
        assert KEY not in blob
        assert HINT in blob
    assert KEY not in run["flows"]
    assert run["flows"].count(b"/v1/responses") >= 10
    assert HINT in run["flows"]
    assert KEY not in run["log"]
    assert b"Traceback" not in run["log"] and b"has crashed" not in run["log"]


def test_a_case_the_bridge_does_not_know_is_rejected_by_the_fake() -> None:
    """The fake upstream echoes what it was sent: without the bridge the key comes back."""
    with EchoingUpstream() as upstream:
        r = httpx.post(
            f"{upstream.url}/v1/responses",
            content=b"{}",
            headers={"authorization": f"Bearer {PROVIDER_KEY}", "x-case": "401"},
            timeout=SAFETY,
        )
    assert KEY in r.content
