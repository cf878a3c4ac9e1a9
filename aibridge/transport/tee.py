"""The stream tee: forwards every upstream chunk untouched and parses a copy (DESIGN.md §2).

Set as ``flow.response.stream`` in ``responseheaders``. mitmproxy calls it once per chunk and
once more with ``b""`` at the end; whatever it returns goes to the client, so it always returns
the chunk it was given, at once. Parsing is best effort: a failure stops parsing (and is
reported), never the stream.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from aibridge.transport.inflate import BoundedInflater, DecodeLimitExceeded, normalize
from aibridge.transport.sse import SSEParser

if TYPE_CHECKING:
    from aibridge.apis.common import Accumulator, Api
    from aibridge.echo import ChunkMasker

# The copy for parsing is parsed in batches of about this size (bounded memory, low cost).
PARSE_BATCH_BYTES = 64 * 1024
# A compressed stream is decoded for parsing up to this much, then parsing stops (the client
# still gets every byte). The longest real stream, 128k output tokens as ~260-byte deltas
# plus the echoed instructions, tools and output, is about 35 MB; a bomb's cost is CPU on the
# event loop, at most this much decoded and parsed. The tee holds one inflate step (1 MiB)
# and the parser one event (8 MiB) whatever this is.
MAX_DECODED_BYTES = 128 << 20
# 8 MiB is far above any real event (a large response.completed is a few MB) and keeps one
# hostile event from holding much memory. The views parse with the same bound.
MAX_EVENT_BYTES: Final = 8 << 20
# The clock of mitmproxy's timestamps, looked up once: it is read for every chunk.
_clock = time.time


class StreamTee:
    """Callable for ``flow.response.stream``: returns each chunk unchanged, parses a copy."""

    def __init__(
        self,
        accumulator: Accumulator,
        api: Api,
        content_encoding: str = "",
        masker: ChunkMasker | None = None,
    ) -> None:
        self.accumulator = accumulator
        # Replaces secrets upstream echoes (aibridge.echo); the copy parsed is the masked one.
        self.masker = masker
        # Events go to the accumulator as they are parsed, so one that it can tell apart by
        # its bytes (`skips`, Chat Completions) is judged with every event before it taken.
        self.parser = SSEParser(
            max_event_bytes=MAX_EVENT_BYTES,
            wanted=None if api.wanted_events is None else api.wanted_events.__contains__,
            frequent=api.delta_events,
            skippable=api.skippable_events,
            sink=accumulator.feed_event,
            skip_data=getattr(accumulator, "skips", None),
        )
        self.ended = False
        self.parse_error: str | None = None
        # When upstream last sent something (epoch seconds, as mitmproxy's timestamps).
        self.last_chunk_at = _clock()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flushed_bytes = 0
        encoding = normalize(content_encoding)
        self._inflater: BoundedInflater | None = None
        if encoding and encoding != "identity":
            try:
                self._inflater = BoundedInflater(encoding, MAX_DECODED_BYTES)
            except ValueError as e:
                self.parse_error = str(e)

    def __call__(self, chunk: bytes) -> bytes | tuple[()]:
        # Called once per chunk of every stream: kept to the fewest steps. Parsing a copy
        # in batches costs far less per byte than chunk by chunk (SSE chunks are often one
        # small event); the client's bytes are never held back, except by the masker: the
        # few bytes that could start an echoed secret, until the next chunk.
        if chunk:
            self.last_chunk_at = _clock()
            if self.masker is not None:
                chunk = self.masker.feed(chunk)
                if not chunk:
                    return ()  # nothing to send yet (b"" would end an HTTP/1 chunked body)
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
            if self._pending_bytes >= PARSE_BATCH_BYTES:
                self.flush()
        else:
            if self.masker is not None and not self.ended:
                # mitmproxy sends what the final call returns (layers/http, 12.x).
                chunk = self.masker.close()
                if chunk:
                    self._pending.append(chunk)
                    self._pending_bytes += len(chunk)
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
        parse = self.parser.feed  # hands the events to the accumulator
        try:
            if self._inflater is None:
                parse(b"".join(chunks))
            else:
                # Piece by piece (at most 1 MiB each), never joined: what decoded before any
                # damage is parsed, and a bomb never sits in memory.
                decode = self._inflater.decode
                for chunk in chunks:
                    for piece in decode(chunk):
                        parse(piece)
        except DecodeLimitExceeded as e:
            self.parse_error = f"{e}: parsing stopped"
        except Exception as e:  # parsing must never break the client's stream
            self.parse_error = f"stream parsing stopped: {type(e).__name__}: {e}"

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.flush()
        if self.parse_error is None:
            try:
                self.parser.close()
            except Exception as e:
                self.parse_error = f"stream parsing stopped: {type(e).__name__}: {e}"
