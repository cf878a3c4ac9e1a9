"""The benchmark's upstream: the fake Responses, Messages and Chat Completions APIs served
from one asyncio loop.

Replies come from ``devtools.fake_upstream.plan_responses`` for ``POST …/responses``,
``devtools.fake_anthropic.plan_messages`` for ``POST …/v1/messages`` and
``devtools.fake_openai_chat.chat_reply`` for ``POST …/chat/completions`` (same scenarios,
same bytes; ``fake-long-N`` is the one the benchmark streams), but the serving differs from
``FakeUpstream`` on purpose:
- asyncio instead of a thread per connection, so the upstream costs little CPU on a small
  machine where it competes with mitmdump and the load generator;
- nothing is kept per request (``FakeUpstream.requests`` grows with every 40 KB body), only
  the counts of Messages and Chat Completions calls, which number their usage as the fakes
  do;
- ``fake-slow`` is paced with ``asyncio.sleep`` and every delta carries ``"t_sent"``, the
  ``time.monotonic()`` at which it was written, so the client can measure each event's
  transit through the proxy (CLOCK_MONOTONIC is shared by all processes on Linux);
  Messages' and Chat Completions' ``fake-slow`` are refused (400): their fakes pace it with
  ``time.sleep``, which would stall every connection of this loop.

Run as ``python -m bench.upstream``: prints its URL, serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import signal
import sys
import time
from collections.abc import Iterable, Iterator

import orjson

from devtools import fake_anthropic, fake_openai_chat
from devtools import fake_upstream as fake

_DELTA_PREFIX = b"event: response.output_text.delta\n"
_HEAD_LIMIT = 64 * 1024


def stamped(frame: bytes) -> bytes:
    """The delta frame with ``"t_sent"`` added as the last field of its JSON."""
    assert frame.endswith(b"}\n\n")
    return frame[:-3] + b',"t_sent":' + repr(time.monotonic()).encode() + b"}\n\n"


def paced_frames(req: dict, delay_s: float) -> Iterator[tuple[float, bytes]]:
    """``fake-slow``'s frames, each with the pause to take before it (deltas only)."""
    created = int(time.time())
    outcome = fake.slow_outcome()
    for frame in fake.stream_frames(req, fake.new_id("resp"), created, outcome):
        yield (delay_s if frame.startswith(_DELTA_PREFIX) else 0.0), frame


def head(status: int, headers: dict[str, str]) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:  # Anthropic's 529 is in no registry
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(raw: bytes) -> tuple[str, str, dict[str, str]]:
    request_line, *header_lines = raw.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def header_ms(headers: dict[str, str], name: str, default: int) -> int:
    try:
        return max(0, int(headers.get(name, default)))
    except ValueError:
        return default


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _asks_for_slow(body: bytes) -> bool:
    """A request for the fake's ``fake-slow`` scenario, which this upstream does not serve."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(req, dict) and req.get("model") == "fake-slow"


class Upstream:
    """One asyncio server on loopback; ``serve`` runs until ``stop`` is set."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.messages_calls = 0
        self.chat_calls = 0

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> None:
        server = await asyncio.start_server(self._connection, host, port, limit=_HEAD_LIMIT)
        bound = server.sockets[0].getsockname()
        print(f"http://{bound[0]}:{bound[1]}", flush=True)
        async with server:
            await self.stop.wait()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, target, headers = parse_head(raw[:-4])
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                keep_alive = await self._respond(writer, method, target, headers, body)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.close()

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
    ) -> bool:
        path = target.split("?", 1)[0]
        if method == "POST" and path.endswith("/v1/messages"):
            return await self._respond_messages(writer, headers, body)
        if method == "POST" and path.endswith("/chat/completions"):
            return await self._respond_chat(writer, headers, body)
        if method != "POST" or not path.endswith("/responses"):
            payload = fake.error_body(f"Invalid URL ({method} {path})", "invalid_request_error")
            await self._send_body(writer, 404, {}, payload)
            return True
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            req = None
        if not isinstance(req, dict):
            payload = fake.error_body("We could not parse the JSON body.", "invalid_request_error")
            await self._send_body(writer, 400, {}, payload)
            return True
        if req.get("model") == "fake-slow" and req.get("stream") is True:
            delay = header_ms(headers, "x-fake-delay-ms", 50) / 1000
            await self._send_paced(writer, paced_frames(req, delay))
            return True
        return await self._send_reply(writer, fake.plan_responses(req, headers))

    async def _respond_messages(
        self, writer: asyncio.StreamWriter, headers: dict[str, str], body: bytes
    ) -> bool:
        self.messages_calls += 1
        if _asks_for_slow(body):
            reply = fake_anthropic.error_reply(
                400, "invalid_request_error", "fake-slow is not served by the bench upstream"
            )
        else:  # the fake's own entry point: its checks, in its order (auth first)
            reply = fake_anthropic.messages_reply(body, headers, self.messages_calls)
        return await self._send_reply(writer, reply)

    async def _respond_chat(
        self, writer: asyncio.StreamWriter, headers: dict[str, str], body: bytes
    ) -> bool:
        self.chat_calls += 1  # every call counted, refused ones too, as the fake counts
        if _asks_for_slow(body):
            reply = fake_openai_chat.error_reply(
                400, "fake-slow is not served by the bench upstream", "invalid_request_error"
            )
        else:  # the fake's own entry point: its checks, in its order (auth first)
            reply = fake_openai_chat.chat_reply(body, headers, self.chat_calls)
        return await self._send_reply(writer, reply)

    async def _send_reply(self, writer: asyncio.StreamWriter, reply: fake.Reply) -> bool:
        """Send a planned reply; False when the connection is to be closed after it."""
        if reply.chunks is None:
            await self._send_body(writer, reply.status, reply.headers, reply.body, reply.close)
        else:
            await self._send_stream(writer, reply.status, reply.headers, reply.chunks)
        return not reply.close

    @staticmethod
    async def _send_body(
        writer: asyncio.StreamWriter,
        status: int,
        extra: dict[str, str],
        body: bytes,
        close: bool = False,
    ) -> None:
        headers = {"content-type": "application/json", "content-length": str(len(body)), **extra}
        if close:
            headers["connection"] = "close"
        writer.write(head(status, headers) + body)
        await writer.drain()

    @staticmethod
    async def _send_stream(
        writer: asyncio.StreamWriter, status: int, extra: dict[str, str], chunks: Iterable[bytes]
    ) -> None:
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "transfer-encoding": "chunked",
            **extra,
        }
        writer.write(head(status, headers))
        for chunk in chunks:
            if chunk:
                writer.write(chunked(chunk))
                # Returns at once below the high-water mark: one chunk per event on the wire
                # when the scenario flushes each, backpressure for the 100 MB stream.
                await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    async def _send_paced(
        writer: asyncio.StreamWriter, frames: Iterable[tuple[float, bytes]]
    ) -> None:
        writer.write(
            head(
                200,
                {
                    "content-type": "text/event-stream; charset=utf-8",
                    "cache-control": "no-cache",
                    "transfer-encoding": "chunked",
                },
            )
        )
        await writer.drain()
        for pause, frame in frames:
            if pause:
                await asyncio.sleep(pause)
                frame = stamped(frame)
            writer.write(chunked(frame))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _main() -> None:
    upstream = Upstream()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, upstream.stop.set)
    await upstream.serve()


if __name__ == "__main__":
    asyncio.run(_main())
    sys.exit(0)
