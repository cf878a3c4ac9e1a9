"""Every decoding of a Content-Encoding the bridge does, bounded (DESIGN.md §8: a
decompression bomb adds < 64 MB).

A few KB of brotli or zstd can stand for a GiB, so nothing here decodes "the whole body" in
one call: each decoder is asked for at most ``STEP`` bytes at a time (zlib and zstd
``max_length``, brotli ``output_buffer_limit``), pieces are handed out one by one as the
caller takes them, and the total stops at a limit the caller chooses.

Codings: ``gzip``/``x-gzip`` (several members one after another), ``deflate`` (with its zlib
wrapper or raw, decided from the first two bytes as browsers do), ``br``, ``zstd`` (several
frames, windows up to 8 MB as RFC 9659 asks of HTTP), and ``identity`` or nothing, passed
through. Stacked codings (``gzip, br``) are refused: no provider sends them, mitmproxy itself
cannot decode them, and each extra stage would multiply what a bomb costs.

Only the bridge's own copies are decoded (parsing); what is forwarded is never touched.
"""

from __future__ import annotations

import asyncio
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # mitmproxy 12 depends on the backport on older Pythons
    from backports import zstd

# The most decoded output made in one step, and so held at once by a decoder's caller.
STEP: Final = 1 << 20
ENCODINGS: Final = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})
PASS_THROUGH: Final = frozenset({"", "identity"})

# zlib copies its unconsumed input (unconsumed_tail) on every call: a large body is given in
# slices of this size, so a step costs what it decodes, not the size of the whole body.
_INPUT_SLICE = 64 * 1024
# brotli's output buffer grows in blocks and stops once it reaches the limit, so one call
# returns up to about twice the limit (measured with brotli 1.2.1: 512 KiB -> <= 0.97 MiB).
_BROTLI_LIMIT = STEP // 2
# brotli < 1.2 cannot bound one call's output at all (26 bytes can be 16 MiB), and feeding it
# small slices does not help; without a bound "br" is refused rather than decoded unbounded.
_BROTLI_BOUNDED = hasattr(brotli.Decompressor, "can_accept_more_data")
# RFC 9659: a zstd content coding uses at most an 8 MB window; zstd's own default accepts
# 128 MiB, which a frame header alone could make the decoder allocate as output arrives.
_ZSTD_OPTIONS = {zstd.DecompressionParameter.window_log_max: 23}
_CORRUPT = (zlib.error, brotli.error, zstd.ZstdError, EOFError)


class DecodeLimitExceeded(ValueError):
    """The decoded output passed the limit; decoding stopped there."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"decoded body passed {describe_size(limit)}")
        self.limit = limit


class DecodeError(ValueError):
    """Corrupt or truncated data, or data after the end of the coded stream."""


def describe_size(n: int) -> str:
    return f"{n >> 20} MiB" if n and n % (1 << 20) == 0 else f"{n} bytes"


def normalize(encoding: str) -> str:
    """A Content-Encoding header value as compared here (case and spaces ignored)."""
    return encoding.strip().lower()


class BoundedInflater:
    """Incremental decoder of one Content-Encoding with a cap on the total decoded output.

    ``decode(chunk)`` returns an iterator of pieces of at most ``STEP`` bytes, each made only
    when the previous one has been taken; consume it fully before the next call. Once the
    total would pass ``limit`` it raises ``DecodeLimitExceeded``; corrupt data raises
    ``DecodeError``; both are ``ValueError``s and every later call raises the same error.
    An identity coding passes chunks through (sliced to ``STEP``), uncounted: nothing is
    decoded, and the caller holds those bytes already.
    """

    __slots__ = ("_decoder", "_failure", "_fed", "_head", "decoded_bytes", "encoding", "limit")

    def __init__(self, encoding: str, limit: int) -> None:
        name = normalize(encoding)
        if name not in ENCODINGS and name not in PASS_THROUGH:
            raise ValueError(f"unsupported content-encoding {name!r}")
        if name == "br" and not _BROTLI_BOUNDED:
            raise ValueError("unsupported content-encoding 'br' (brotli >= 1.2 is needed)")
        if limit < 0:
            raise ValueError("limit must not be negative")
        self.encoding = "gzip" if name == "x-gzip" else name or "identity"
        self.limit = limit
        self.decoded_bytes = 0
        self._failure: ValueError | None = None
        self._fed = False  # the current member or frame has had input
        self._head = b""  # deflate only: bytes held until the wrapper can be recognised
        self._decoder: Any = None if name in ("deflate", "", "identity") else self._new()

    @property
    def passes_through(self) -> bool:
        return self.encoding == "identity"

    def _new(self, wbits: int = 31) -> Any:
        if self.encoding == "br":
            return brotli.Decompressor()
        if self.encoding == "zstd":
            return zstd.ZstdDecompressor(options=_ZSTD_OPTIONS)
        return zlib.decompressobj(wbits=wbits)

    def decode(self, chunk: bytes) -> Iterator[bytes]:
        """The decoded pieces of the next chunk of the coded body (lazily, see the class)."""
        if self._failure is not None:
            raise self._failure
        if self.encoding == "identity":
            if len(chunk) > STEP:
                for i in range(0, len(chunk), STEP):
                    yield chunk[i : i + STEP]
            elif chunk:
                yield chunk
            return
        try:
            if self.encoding == "br":
                yield from self._brotli(chunk)
                return
            if self._decoder is None:  # deflate: which flavour, from the first two bytes
                self._head += chunk
                if len(self._head) < 2:
                    return
                b0, b1 = self._head[0], self._head[1]
                wrapped = (b0 & 0x0F) == 8 and (b0 >> 4) <= 7 and ((b0 << 8) | b1) % 31 == 0
                self._decoder = self._new(15 if wrapped else -15)
                chunk, self._head = self._head, b""
            step = self._zstd if self.encoding == "zstd" else self._zlib
            if len(chunk) <= _INPUT_SLICE:
                yield from step(chunk)
            else:
                view = memoryview(chunk)
                for i in range(0, len(chunk), _INPUT_SLICE):
                    yield from step(view[i : i + _INPUT_SLICE])
        except _CORRUPT as e:
            self._failure = DecodeError(f"corrupt {self.encoding} data: {e}")
            raise self._failure from None
        except ValueError as e:  # DecodeLimitExceeded, DecodeError: final too
            self._failure = e
            raise

    def finish(self) -> None:
        """At the end of the body: raise ``DecodeError`` if it stopped mid-stream."""
        if self._failure is not None:
            raise self._failure
        if self.encoding == "identity":
            return
        if self._head or (self._fed and not self._ended()):
            self._failure = DecodeError(f"truncated {self.encoding} data")
            raise self._failure

    def _ended(self) -> bool:
        if self.encoding == "br":
            return bool(self._decoder.is_finished())
        return bool(self._decoder.eof)

    def _ask(self) -> int:
        # One byte more than the limit leaves: getting it proves the output passes the limit.
        return min(STEP, self.limit - self.decoded_bytes + 1)

    def _count(self, out: bytes) -> bytes:
        total = self.decoded_bytes + len(out)
        if total > self.limit:
            raise DecodeLimitExceeded(self.limit)
        self.decoded_bytes = total
        return out

    def _zlib(self, data: bytes | memoryview) -> Iterator[bytes]:
        more = True  # output may be pending inside zlib even when all input was taken
        while data or more:
            decoder = self._decoder
            if decoder.eof:
                if not data:
                    return
                if self.encoding != "gzip":
                    raise DecodeError("data after the end of the deflate stream")
                decoder = self._decoder = self._new()  # the next gzip member
            self._fed = self._fed or bool(data)
            ask = self._ask()
            out = decoder.decompress(data, ask)
            data = decoder.unused_data if decoder.eof else decoder.unconsumed_tail
            if decoder.eof:
                self._fed = False
            more = len(out) == ask
            if out:
                yield self._count(out)

    def _zstd(self, data: bytes | memoryview) -> Iterator[bytes]:
        while True:
            decoder = self._decoder
            if decoder.eof:
                if not data:
                    return
                decoder = self._decoder = self._new()  # the next frame
            self._fed = self._fed or bool(data)
            out = decoder.decompress(data, self._ask())
            data = decoder.unused_data if decoder.eof else b""
            if decoder.eof:
                self._fed = False
            if out:
                yield self._count(out)
            if not data and (decoder.eof or decoder.needs_input):
                return

    def _brotli(self, data: bytes) -> Iterator[bytes]:
        decoder = self._decoder
        if decoder.is_finished():
            if data:
                raise DecodeError("data after the end of the br stream")
            return
        self._fed = self._fed or bool(data)
        out = decoder.process(data, output_buffer_limit=_BROTLI_LIMIT)
        while True:
            if len(out) <= STEP:
                if out:
                    yield self._count(out)
            else:  # not seen with brotli 1.2.1; a later one may fill its buffer otherwise
                for i in range(0, len(out), STEP):
                    yield self._count(out[i : i + STEP])
            # A full buffer means brotli holds more output back (even once it has taken all
            # the input, when can_accept_more_data() is already true): drain it step by step.
            if decoder.is_finished() or not out:
                return
            if decoder.can_accept_more_data() and len(out) < _BROTLI_LIMIT:
                return
            out = decoder.process(b"", output_buffer_limit=_BROTLI_LIMIT)


def decode_body(data: bytes, encoding: str, limit: int) -> bytes:
    """A whole body decoded, at most ``limit`` bytes of it (``DecodeLimitExceeded`` past
    that, ``DecodeError`` for corrupt or truncated data). An identity body is returned as is:
    it is in memory already, so the limit, which bounds what decoding adds, does not apply."""
    inflater = BoundedInflater(encoding, limit)
    if inflater.passes_through:
        return data
    # Pieces, joined once at the end: a growing buffer (BytesIO, bytearray) is copied at
    # every growth, holding the GIL up to 15 ms a time (measured); the join copies once.
    pieces = list(inflater.decode(data))
    inflater.finish()
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


# Bodies decoded off the event loop get threads of their own, two at most: the loop's default
# executor (host name look-ups) stays free, and bombs sent at once hold 2 x limit at most.
_WORKERS = 2
_pool: ThreadPoolExecutor | None = None


async def decode_body_in_thread(data: bytes, encoding: str, limit: int) -> bytes:
    """``decode_body`` on a worker thread: the loop keeps serving other clients meanwhile
    (the decoders release the GIL while they work)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="aibridge-inflate")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool, decode_body, data, encoding, limit)
