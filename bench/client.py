"""The load generator: a minimal HTTP/1.1 client on raw asyncio streams.

On a two-core machine the client competes with mitmdump for CPU, so it does as little as
possible: requests are pre-built bytes, responses are read with one ``readuntil`` for the
head and one ``readexactly`` per chunk, events are counted with ``bytes.count``. It does
the same work for every variant, so whatever it costs is the same on both sides of a ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_T_SENT = b'"t_sent":'


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {host}:{port}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(slots=True)
class Reply:
    status: int
    started: float  # time.monotonic() when the request was written
    first_byte: float  # when the first body byte (or the head, for an empty body) arrived
    ended: float
    body_bytes: int = 0
    events: int = 0
    # Paced streams: (time.monotonic() the proxy delivered it) - (the upstream's "t_sent").
    transits: list[float] = field(default_factory=list)
    body: bytes = b""  # kept only when asked (``keep_body``), for a Content-Length body

    @property
    def ttfb(self) -> float:
        return self.first_byte - self.started

    @property
    def latency(self) -> float:
        return self.ended - self.started


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def request(self, raw: bytes, *, stamped: bool = False, keep_body: bool = False) -> Reply:
        reader = self.reader
        started = time.monotonic()
        self.writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lowered = head.lower()
        reply = Reply(status, started, 0.0, 0.0)
        if b"transfer-encoding: chunked" in lowered:
            await self._read_chunked(reply, stamped)
        else:
            length = _content_length(lowered)
            if length:
                first = await reader.read(length)
                reply.first_byte = time.monotonic()
                rest = length - len(first)
                tail = await reader.readexactly(rest) if rest else b""
                if keep_body:
                    reply.body = first + tail
            else:
                reply.first_byte = time.monotonic()
            reply.body_bytes = length
        reply.ended = time.monotonic()
        if reply.first_byte == 0.0:
            reply.first_byte = reply.ended
        return reply

    async def _read_chunked(self, reply: Reply, stamped: bool) -> None:
        reader = self.reader
        previous_lf = False
        events = 0
        size_bytes = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are ever sent here
                break
            data = await reader.readexactly(size + 2)
            now = time.monotonic()
            if not size_bytes:
                reply.first_byte = now
            size_bytes += size
            # Events end at a blank line; one may straddle two chunks.
            events += data.count(b"\n\n", 0, size)
            if previous_lf and data[0] == 10:
                events += 1
            previous_lf = data[size - 1] == 10
            if stamped and _T_SENT in data:
                reply.transits.extend(now - t for t in _stamps(data))
        reply.body_bytes = size_bytes
        reply.events = events


def _content_length(lowered_head: bytes) -> int:
    at = lowered_head.find(b"content-length:")
    if at < 0:
        return 0
    end = lowered_head.find(b"\r\n", at)
    return int(lowered_head[at + 15 : end if end >= 0 else None])


def _stamps(data: bytes) -> list[float]:
    found = []
    at = data.find(_T_SENT)
    while at >= 0:
        start = at + len(_T_SENT)
        end = start
        while data[end] in b"0123456789.e-+":
            end += 1
        found.append(float(data[start:end]))
        at = data.find(_T_SENT, end)
    return found


@dataclass(slots=True)
class LoadResult:
    wall: float  # seconds from the first request written to the last reply read
    replies: list[Reply]
    warmups: int = 0  # untimed requests sent before, one per connection

    @property
    def ok(self) -> int:
        return sum(1 for r in self.replies if 200 <= r.status < 300)

    @property
    def events(self) -> int:
        return sum(r.events for r in self.replies)


async def run_load(
    host: str,
    port: int,
    raws: list[bytes],
    total: int,
    concurrency: int,
    *,
    stamped: bool = False,
    warmup: bool = True,
    on_start: Callable[[], None] | None = None,
    on_reply: Callable[[int], None] | None = None,
) -> LoadResult:
    """``total`` requests over ``concurrency`` keep-alive connections, as fast as they go.

    Request i is ``raws[i % len(raws)]``. Each connection first sends one untimed request,
    so that mitmdump's upstream connection exists and the timed part measures the steady
    state; ``on_start`` runs just before the timed part, ``on_reply`` after each timed
    reply with the count so far (memory sampling hooks into it).
    """
    concurrency = max(1, min(concurrency, total))
    conns = await asyncio.gather(*(Connection.open(host, port) for _ in range(concurrency)))
    try:
        if warmup:
            await asyncio.gather(*(c.request(raws[0]) for c in conns))
        replies: list[Reply] = []
        issued = 0

        async def worker(conn: Connection) -> None:
            nonlocal issued
            while issued < total:
                raw = raws[issued % len(raws)]
                issued += 1
                reply = await conn.request(raw, stamped=stamped)
                replies.append(reply)
                if on_reply is not None:
                    on_reply(len(replies))

        if on_start is not None:
            on_start()
        started = time.monotonic()
        await asyncio.gather(*(worker(c) for c in conns))
        return LoadResult(time.monotonic() - started, replies, len(conns) if warmup else 0)
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def one_request(host: str, port: int, raw: bytes) -> Reply:
    """A single request on its own connection, body kept."""
    conn = await Connection.open(host, port)
    try:
        return await conn.request(raw, keep_body=True)
    finally:
        await conn.close()
