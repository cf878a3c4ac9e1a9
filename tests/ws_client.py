"""A small blocking WebSocket client (wsproto) for the Responses API WebSocket mode."""

from __future__ import annotations

import contextlib
import socket
from typing import Any
from urllib.parse import urlsplit

import orjson
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class WebSocketRejected(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade refused with HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class ResponsesSocket:
    def __init__(self, url: str, headers: dict[str, str], timeout: float = 30) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._text: list[str] = []
        self.closed = False
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall(
            self.ws.send(
                Request(
                    host=parts.netloc,
                    target=target,
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()],
                )
            )
        )
        status, body = 0, b""
        while True:
            for event in self._read():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise WebSocketRejected(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise WebSocketRejected(status, body)

    def _read(self) -> list[Any]:
        data = self.sock.recv(65536)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    def send(self, event: dict[str, Any]) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=orjson.dumps(event).decode())))

    def receive(self) -> dict[str, Any] | None:
        """The next server event, or None once the socket closed."""
        while not self._text:
            if self.closed:
                return None
            for event in self._read():
                if isinstance(event, TextMessage):
                    self._text.append(event.data)
                elif isinstance(event, CloseConnection):
                    self.closed = True
        return orjson.loads(self._text.pop(0))

    def until_terminal(self) -> list[dict[str, Any]]:
        events = []
        while (event := self.receive()) is not None:
            events.append(event)
            if event.get("type") in (
                "response.completed",
                "response.failed",
                "response.incomplete",
                "error",
            ):
                break
        return events

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        self.sock.close()
