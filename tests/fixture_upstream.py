"""A loopback upstream that serves the golden fixtures byte for byte.

The request header ``x-fixture: <name>`` picks ``tests/fixtures/<name>.response.*``;
``x-fixture-status`` sets the HTTP status. SSE bodies go out in small chunks of
``x-fixture-chunk`` bytes (default 97), so every test also crosses event boundaries.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_response(name: str) -> tuple[bytes, str]:
    sse = FIXTURES / f"{name}.response.sse"
    if sse.exists():
        return sse.read_bytes(), "text/event-stream"
    return (FIXTURES / f"{name}.response.json").read_bytes(), "application/json"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self._answer(self.rfile.read(length))

    def _answer(self, body: bytes) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.received.append((self.command, self.path, headers, body))
        name = headers.get("x-fixture", "text_buffered")
        payload, content_type = fixture_response(name)
        status = int(headers.get("x-fixture-status", "200"))
        self.send_response(status)
        self.send_header("content-type", content_type)
        if content_type == "text/event-stream":
            size = int(headers.get("x-fixture-chunk", "97"))
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(0, len(payload), size):
                piece = payload[i : i + size]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    received: list[tuple[str, str, dict[str, str], bytes]]


class FixtureUpstream:
    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.received = []
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def received(self) -> list[tuple[str, str, dict[str, str], bytes]]:
        return self._server.received

    def __enter__(self) -> FixtureUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
