"""The stream tee: forwards every upstream chunk untouched and parses a copy (DESIGN.md §2).

Set as ``flow.response.stream`` in ``responseheaders``. mitmproxy calls it once per chunk and
once more with ``b""`` at the end; whatever it returns goes to the client, so it always returns
the chunk it was given, at once. Parsing is best effort: a failure stops parsing (and is
reported), never the stream.
"""

from __future__ import annotations

import sys
import zlib
import brotli

from aibridge.extract import WANTED_EVENTS, ResponseAccumulator
from aibridge.sse import SSEParser

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # mitmproxy 12 depends on the backport on older Pythons
    from backports import zstd

# Decompress at most this much per call, so a tiny compressed chunk cannot balloon memory.
_MAX_INFLATE_STEP = 1 << 20


class _Inflater:
    """Incremental decoder for one Content-Encoding, for the parsing copy only."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        if encoding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(wbits=31)
        elif encoding == "deflate":
            # "deflate" is meant to be zlib-wrapped, but raw deflate is common in the wild.
            self._zlib = zlib.decompressobj(wbits=47)
        elif encoding == "br":
            self._brotli = brotli.Decompressor()
        elif encoding == "zstd":
            self._zstd = zstd.ZstdDecompressor()
        else:
            raise ValueError(f"unsupported content-encoding {encoding!r}")
        self._raw_deflate_fallback = encoding == "deflate"

    def decode(self, chunk: bytes) -> list[bytes]:
        if self.encoding == "br":
            return [self._brotli.process(chunk)]
        if self.encoding == "zstd":
            return [self._zstd.decompress(chunk)]
        try:
            return self._inflate(chunk)
        except zlib.error:
            if not self._raw_deflate_fallback:
                raise
            self._raw_deflate_fallback = False
            self._zlib = zlib.decompressobj(wbits=-15)
            return self._inflate(chunk)

    def _inflate(self, chunk: bytes) -> list[bytes]:
        out = [self._zlib.decompress(chunk, _MAX_INFLATE_STEP)]
        while self._zlib.unconsumed_tail:
            out.append(self._zlib.decompress(self._zlib.unconsumed_tail, _MAX_INFLATE_STEP))
        return out


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
        self.parser = SSEParser(max_event_bytes=8 << 20, wanted=WANTED_EVENTS.__contains__)
        self.ended = False
        self.parse_error: str | None = None
        self.bytes_forwarded = 0
        encoding = content_encoding.strip().lower()
        self._inflater: _Inflater | None = None
        if encoding and encoding != "identity":
            try:
                self._inflater = _Inflater(encoding)
            except ValueError as e:
                self.parse_error = str(e)

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            self.bytes_forwarded += len(chunk)
            if self.parse_error is None:
                self._parse(chunk)
        else:
            self._end()
        return chunk

    def _parse(self, chunk: bytes) -> None:
        try:
            pieces = self._inflater.decode(chunk) if self._inflater else (chunk,)
            feed = self.accumulator.feed_event
            for piece in pieces:
                for event in self.parser.feed(piece):
                    feed(event.event, event.data)
        except Exception as e:  # parsing must never break the client's stream
            self.parse_error = f"stream parsing stopped: {type(e).__name__}: {e}"

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.parse_error is None:
            try:
                for event in self.parser.close():
                    self.accumulator.feed_event(event.event, event.data)
            except Exception as e:
                self.parse_error = f"stream parsing stopped: {type(e).__name__}: {e}"
