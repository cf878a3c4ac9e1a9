"""The stream tee: forwards every upstream chunk untouched and parses a copy (DESIGN.md §2).

Set as ``flow.response.stream`` in ``responseheaders``. mitmproxy calls it once per chunk and
once more with ``b""`` at the end; whatever it returns goes to the client, so it always returns
the chunk it was given, at once. Parsing is best effort: a failure stops parsing (and is
reported), never the stream.
"""

from __future__ import annotations

import sys
import time
import zlib
from typing import Any

import brotli

from aibridge.extract import DELTA_EVENTS, WANTED_EVENTS, ResponseAccumulator
from aibridge.sse import SSEParser

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # mitmproxy 12 depends on the backport on older Pythons
    from backports import zstd

# The copy for parsing is parsed in batches of about this size (bounded memory, low cost).
PARSE_BATCH_BYTES = 64 * 1024
# Decompress at most this much per call, so a tiny compressed chunk cannot balloon memory.
_MAX_INFLATE_STEP = 1 << 20
# The clock of mitmproxy's timestamps, looked up once: it is read for every chunk.
_clock = time.time


class _Inflater:
    """Incremental decoder for one Content-Encoding, for the parsing copy only.

    Handles what real servers send: "deflate" with or without its zlib wrapper (decided
    from the first two bytes), and gzip members or zstd frames one after another.
    """

    def __init__(self, encoding: str) -> None:
        if encoding not in ("gzip", "x-gzip", "deflate", "br", "zstd"):
            raise ValueError(f"unsupported content-encoding {encoding!r}")
        self.encoding = encoding
        self._head = b""  # deflate only: bytes held until the wrapper can be recognised
        self._decoder: Any = None if encoding == "deflate" else self._new_decoder()

    def _new_decoder(self, wbits: int = 31) -> Any:
        if self.encoding == "br":
            return brotli.Decompressor()
        if self.encoding == "zstd":
            return zstd.ZstdDecompressor()
        return zlib.decompressobj(wbits=wbits)

    def decode(self, chunk: bytes) -> list[bytes]:
        if self.encoding == "br":
            return [self._decoder.process(chunk)]
        if self._decoder is None:
            self._head += chunk
            if len(self._head) < 2:
                return []
            b0, b1 = self._head[0], self._head[1]
            wrapped = (b0 & 0x0F) == 8 and ((b0 << 8) | b1) % 31 == 0
            self._decoder = self._new_decoder(15 if wrapped else -15)
            chunk, self._head = self._head, b""
        out: list[bytes] = []
        while chunk:
            if self.encoding == "zstd":
                out.append(self._decoder.decompress(chunk))
            else:
                out.append(self._decoder.decompress(chunk, _MAX_INFLATE_STEP))
                while self._decoder.unconsumed_tail:
                    tail = self._decoder.unconsumed_tail
                    out.append(self._decoder.decompress(tail, _MAX_INFLATE_STEP))
            chunk = b""
            if self._decoder.eof and self._decoder.unused_data:
                # Another gzip member or zstd frame follows the one that just ended.
                chunk = self._decoder.unused_data
                self._decoder = self._new_decoder(self._decoder_wbits())
        return out

    def _decoder_wbits(self) -> int:
        return 31 if self.encoding in ("gzip", "x-gzip") else 15


class StreamTee:
    """Callable for ``flow.response.stream``: returns each chunk unchanged, parses a copy."""

    def __init__(
        self,
        accumulator: ResponseAccumulator,
        content_encoding: str = "",
    ) -> None:
        self.accumulator = accumulator
        # 8 MiB is far above any real event (a large response.completed is a few MB) and keeps
        # one hostile event from holding much memory.
        self.parser = SSEParser(
            max_event_bytes=8 << 20, wanted=WANTED_EVENTS.__contains__, frequent=DELTA_EVENTS
        )
        self.ended = False
        self.parse_error: str | None = None
        # When upstream last sent something (epoch seconds, as mitmproxy's timestamps).
        self.last_chunk_at = _clock()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flushed_bytes = 0
        encoding = content_encoding.strip().lower()
        self._inflater: _Inflater | None = None
        if encoding and encoding != "identity":
            try:
                self._inflater = _Inflater(encoding)
            except ValueError as e:
                self.parse_error = str(e)

    def __call__(self, chunk: bytes) -> bytes:
        # Called once per chunk of every stream: kept to the fewest steps. Parsing a copy
        # in batches costs far less per byte than chunk by chunk (SSE chunks are often one
        # small event); the client's bytes are never held back.
        if chunk:
            self.last_chunk_at = _clock()
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
            if self._pending_bytes >= PARSE_BATCH_BYTES:
                self.flush()
        else:
            self._end()
        return chunk

    @property
    def bytes_forwarded(self) -> int:
        return self._flushed_bytes + self._pending_bytes

    def flush(self) -> None:
        """Parse what is held for parsing (at most PARSE_BATCH_BYTES, and one chunk)."""
        chunks, self._pending = self._pending, []
        self._flushed_bytes += self._pending_bytes
        self._pending_bytes = 0
        if not chunks or self.parse_error is not None:
            return
        decoded: list[bytes] = []
        failure: Exception | None = None
        if self._inflater is None:
            decoded = chunks
        else:
            for chunk in chunks:
                try:
                    decoded.extend(self._inflater.decode(chunk))
                except Exception as e:  # what decoded before the damage still counts
                    failure = e
                    break
        try:
            feed = self.accumulator.feed_event
            for event in self.parser.feed(b"".join(decoded)):
                feed(event.event, event.data)
        except Exception as e:  # parsing must never break the client's stream
            failure = failure or e
        if failure is not None:
            self.parse_error = f"stream parsing stopped: {type(failure).__name__}: {failure}"

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.flush()
        if self.parse_error is None:
            try:
                for event in self.parser.close():
                    self.accumulator.feed_event(event.event, event.data)
            except Exception as e:
                self.parse_error = f"stream parsing stopped: {type(e).__name__}: {e}"
