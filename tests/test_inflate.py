"""aibridge.transport.inflate: every Content-Encoding decoded in bounded steps, total capped.

Bodies are compressed here, with the standard libraries, in the shapes servers send: whole,
flushed piece by piece, several gzip members or zstd frames. Bombs are runs of zeros
compressed in a streaming loop, so no test holds their decoded size.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aibridge.transport import inflate
from aibridge.transport.inflate import (
    STEP,
    BoundedInflater,
    DecodeError,
    DecodeLimitExceeded,
    decode_body,
    decode_body_in_thread,
    zstd,
)
from bench.bombs import zeros_bomb

FIXTURES = Path(__file__).parent / "fixtures"
SSE = (FIXTURES / "codex_turn_streamed.response.sse").read_bytes()
MIB = 1 << 20
ZEROS = bytes(MIB)


def zlib_with(wbits: int) -> Callable[[bytes], bytes]:
    def compress(data: bytes) -> bytes:
        co = zlib.compressobj(6, zlib.DEFLATED, wbits)
        return co.compress(data) + co.flush()

    return compress


def flushed(encoding: str, parts: list[bytes]) -> bytes:
    """One stream flushed after every part, as a streaming server sends it."""
    if encoding == "br":
        bo = brotli.Compressor()
        return b"".join(bo.process(p) + bo.flush() for p in parts) + bo.finish()
    if encoding == "zstd":
        zo = zstd.ZstdCompressor()
        out = [zo.compress(p, zstd.ZstdCompressor.FLUSH_BLOCK) for p in parts]
        return b"".join(out) + zo.flush(zstd.ZstdCompressor.FLUSH_FRAME)
    co = zlib.compressobj(6, zlib.DEFLATED, {"gzip": 31, "deflate": 15, "raw": -15}[encoding])
    return b"".join(co.compress(p) + co.flush(zlib.Z_SYNC_FLUSH) for p in parts) + co.flush()


# name -> (Content-Encoding, compress)
CODECS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", gzip.compress),
    "deflate-zlib": ("deflate", zlib_with(15)),
    "deflate-raw": ("deflate", zlib_with(-15)),
    "br": ("br", brotli.compress),
    "zstd": ("zstd", zstd.compress),
    "case-and-spaces": ("  ZStd ", zstd.compress),
}


def decode_in(inflater: BoundedInflater, chunks: Iterator[bytes]) -> bytes:
    out = []
    for chunk in chunks:
        for piece in inflater.decode(chunk):
            assert 0 < len(piece) <= STEP
            out.append(bytes(piece))
    inflater.finish()
    return b"".join(out)


def cut(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# ------------------------------------------------------------------------ every coding


@pytest.mark.parametrize("name", CODECS)
def test_each_coding_round_trips(name: str) -> None:
    encoding, compress = CODECS[name]
    data = compress(SSE)
    assert decode_body(data, encoding, len(SSE)) == SSE
    for size in (1, 2, 5, 64, 4096, len(data)):
        inflater = BoundedInflater(encoding, len(SSE))
        assert decode_in(inflater, cut(data, size)) == SSE
        assert inflater.decoded_bytes == len(SSE)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw", "br", "zstd"])
def test_flushed_streams_decode_part_by_part(encoding: str) -> None:
    parts = SSE.split(b"\n\n")
    data = flushed(encoding, [p + b"\n\n" for p in parts])
    header = "deflate" if encoding == "raw" else encoding
    assert decode_body(data, header, 1 << 30) == b"\n\n".join(parts) + b"\n\n"


@pytest.mark.parametrize("encoding", ["", "identity", " Identity "])
def test_identity_passes_through_uncounted(encoding: str) -> None:
    big = b"x" * (3 * STEP + 5)
    assert decode_body(big, encoding, 0) is big  # in memory already: nothing to bound
    inflater = BoundedInflater(encoding, 0)
    pieces = list(inflater.decode(big))
    assert [len(p) for p in pieces] == [STEP, STEP, STEP, 5]
    assert b"".join(pieces) == big
    assert list(inflater.decode(b"")) == []
    inflater.finish()


@pytest.mark.parametrize(
    "encoding", ["compress", "gzip, br", "br, gzip", "gzip,", "snappy", "br;q=1", "*", "x-zstd"]
)
def test_unsupported_or_stacked_codings_are_refused(encoding: str) -> None:
    with pytest.raises(ValueError, match=r"^unsupported content-encoding ") as caught:
        BoundedInflater(encoding, MIB)
    assert not isinstance(caught.value, DecodeError | DecodeLimitExceeded)
    with pytest.raises(ValueError, match=r"^unsupported content-encoding "):
        decode_body(b"anything", encoding, MIB)


def test_brotli_without_output_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inflate, "_BROTLI_BOUNDED", False)
    with pytest.raises(ValueError, match=r"brotli >= 1\.2"):
        BoundedInflater("br", MIB)


# ------------------------------------------------------------- members, frames, deflate


def test_several_gzip_members_empty_ones_included() -> None:
    parts = [SSE[:1000], b"", SSE[1000:5000], SSE[5000:]]
    data = b"".join(gzip.compress(p) for p in parts)
    assert decode_body(data, "gzip", len(SSE)) == SSE
    # A member that ends exactly at a chunk's end, the next in the next chunk.
    first = gzip.compress(parts[0])
    inflater = BoundedInflater("gzip", len(SSE))
    assert decode_in(inflater, iter([first, data[len(first) :]])) == SSE


def test_several_zstd_frames_and_a_skippable_one() -> None:
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"skip"
    data = zstd.compress(SSE[:777]) + skippable + zstd.compress(SSE[777:])
    assert decode_body(data, "zstd", len(SSE)) == SSE
    inflater = BoundedInflater("zstd", len(SSE))
    assert decode_in(inflater, cut(data, 777)) == SSE


@pytest.mark.parametrize("wbits", [15, -15])
@pytest.mark.parametrize("first", [0, 1, 2, 3])
def test_deflate_with_or_without_wrapper_whatever_the_first_chunk(wbits: int, first: int) -> None:
    data = zlib_with(wbits)(SSE)
    chunks = [data[:first], data[first : first + 1], data[first + 1 :]]
    assert decode_in(BoundedInflater("deflate", len(SSE)), iter(chunks)) == SSE


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("deflate", zlib_with(15)(b"one") + zlib_with(15)(b"two")),
        ("deflate", zlib_with(-15)(b"one") + b"\x00"),
        ("br", brotli.compress(b"one") + brotli.compress(b"two")),
        ("br", brotli.compress(b"one") + b"x"),
    ],
)
def test_data_after_the_end_of_a_single_stream_coding(encoding: str, data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_body(data, encoding, MIB)


# ---------------------------------------------------------------------------- the limit


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("size", [1, STEP - 1, STEP, STEP + 1, 3 * STEP])
def test_limit_holds_exactly_at_the_boundary(name: str, size: int) -> None:
    encoding, compress = CODECS[name]
    body = random.Random(size).randbytes(size)  # incompressible: sizes stay exact
    data = compress(body)
    assert decode_body(data, encoding, size) == body  # exactly at the limit: fine
    with pytest.raises(DecodeLimitExceeded) as caught:
        decode_body(data, encoding, size - 1)  # one byte over
    assert caught.value.limit == size - 1
    inflater = BoundedInflater(encoding, size - 1)
    got = 0
    with pytest.raises(DecodeLimitExceeded):
        for chunk in cut(data, 4099):
            for piece in inflater.decode(chunk):
                got += len(piece)
    assert got == inflater.decoded_bytes <= size - 1  # nothing past the limit came out


def test_limit_zero_allows_only_an_empty_body() -> None:
    assert decode_body(gzip.compress(b""), "gzip", 0) == b""
    assert decode_body(b"", "zstd", 0) == b""
    for encoding, compress in CODECS.values():
        with pytest.raises(DecodeLimitExceeded):
            decode_body(compress(b"x"), encoding, 0)


def test_the_message_names_the_limit() -> None:
    assert str(DecodeLimitExceeded(256 * MIB)) == "decoded body passed 256 MiB"
    assert str(DecodeLimitExceeded(1000)) == "decoded body passed 1000 bytes"
    assert issubclass(DecodeLimitExceeded, ValueError)
    assert issubclass(DecodeError, ValueError)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_bomb_stops_at_the_limit_and_stays_stopped(encoding: str) -> None:
    bomb = zeros_bomb(encoding, 64)
    inflater = BoundedInflater(encoding, 5 * MIB + 3)
    with pytest.raises(DecodeLimitExceeded):
        decode_in(inflater, cut(bomb, 1000))
    assert inflater.decoded_bytes <= 5 * MIB + 3
    with pytest.raises(DecodeLimitExceeded):  # final: later chunks raise at once
        next(iter(inflater.decode(b"more")))
    with pytest.raises(DecodeLimitExceeded):
        inflater.finish()


# -------------------------------------------------------------------- lazy, bounded pieces


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_pieces_are_made_one_at_a_time(encoding: str) -> None:
    """A piece is decoded only when the previous one was taken, and none passes STEP."""
    bomb = zeros_bomb(encoding, 64)
    inflater = BoundedInflater(encoding, 1 << 40)
    pieces = inflater.decode(bomb)
    assert inflater.decoded_bytes == 0  # nothing decoded before the first piece is asked for
    taken = 0
    for _ in range(5):
        piece = next(pieces)
        taken += len(piece)
        assert 0 < len(piece) <= STEP
        assert inflater.decoded_bytes == taken  # no piece made ahead of time
    rest = sum(len(p) for p in pieces)
    assert taken + rest == 64 * MIB
    inflater.finish()


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_decoding_a_bomb_holds_about_one_step(encoding: str) -> None:
    bomb = zeros_bomb(encoding, 128)
    inflater = BoundedInflater(encoding, 1 << 40)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        total = sum(len(p) for chunk in cut(bomb, 8192) for p in inflater.decode(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 128 * MIB
    # A step's output buffer, its final bytes and the piece the caller still holds.
    assert peak < 4 * STEP, peak


# ----------------------------------------------------------------- corrupt and truncated


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1 :]


# Raw deflate and brotli carry no checksum: a damaged byte may decode to other bytes unseen.
UNCHECKED = ("deflate-raw", "br")


@pytest.mark.parametrize("name", [n for n in CODECS if n != "case-and-spaces"])
def test_corrupt_data_raises_decode_error(name: str) -> None:
    encoding, compress = CODECS[name]
    data = compress(SSE)
    rng = random.Random(name)
    garbage = [
        b"\xff" * 64 + data,  # garbage before
        rng.randbytes(500),  # garbage throughout
        b"\x00" * 300,
    ]
    if encoding == "gzip":
        garbage.append(data + b"not another member")
    if encoding == "zstd":
        garbage.append(data + b"\x28\xb5\x2f\xfd" + b"\xff" * 20)  # a broken second frame
    for bad in garbage:
        with pytest.raises(DecodeError, match=r"^corrupt "):
            decode_body(bad, encoding, 1 << 30)
    for at in (len(data) // 2, len(data) - 2, len(data) - 6):  # damage, or a bad checksum
        damaged = flip(data, at)
        if name in UNCHECKED:
            with contextlib.suppress(DecodeError):
                assert decode_body(damaged, encoding, 1 << 30) != SSE
            continue
        with pytest.raises(DecodeError, match=r"^(corrupt|truncated) "):
            decode_body(damaged, encoding, 1 << 30)


@pytest.mark.parametrize("name", [n for n in CODECS if n != "case-and-spaces"])
def test_truncated_data(name: str) -> None:
    """decode_body refuses a body cut short; the stream decoder hands out what it could."""
    encoding, compress = CODECS[name]
    data = compress(SSE)
    for end in (1, len(data) // 3, len(data) - 1):
        with pytest.raises(DecodeError, match=r"^truncated "):
            decode_body(data[:end], encoding, 1 << 30)
        inflater = BoundedInflater(encoding, 1 << 30)
        got = b"".join(p for c in cut(data[:end], 100) for p in inflater.decode(c))
        assert SSE.startswith(got)
        with pytest.raises(DecodeError):
            inflater.finish()


def test_zstd_frames_asking_for_a_window_over_8_mb_are_refused() -> None:
    """RFC 9659; zstd's default would let a frame header make the decoder hold 128 MiB."""
    for window_log in (24, 27):
        zo = zstd.ZstdCompressor(
            options={
                zstd.CompressionParameter.window_log: window_log,
                zstd.CompressionParameter.enable_long_distance_matching: 1,
            }
        )
        data = zo.compress(ZEROS * 2) + zo.flush()
        with pytest.raises(DecodeError, match="too much memory"):
            decode_body(data, "zstd", 1 << 30)
    zo = zstd.ZstdCompressor(options={zstd.CompressionParameter.window_log: 23})
    assert decode_body(zo.compress(SSE) + zo.flush(), "zstd", 1 << 30) == SSE


# ------------------------------------------------------------------ chunking never matters


@pytest.mark.parametrize("name", CODECS)
def test_cut_at_every_byte_boundary(name: str) -> None:
    encoding, compress = CODECS[name]
    body = SSE[:3000]
    data = compress(body[:1500]) + compress(body[1500:]) if name == "gzip" else compress(body)
    for at in range(len(data) + 1):
        inflater = BoundedInflater(encoding, len(body))
        assert decode_in(inflater, iter([data[:at], data[at:]])) == body, at


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(
    name=st.sampled_from(sorted(CODECS)),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12),
    flush_points=st.lists(st.integers(min_value=1, max_value=len(SSE) - 1), max_size=5),
)
def test_any_chunking_decodes_the_same(name: str, cuts: list[int], flush_points: list[int]) -> None:
    encoding, compress = CODECS[name]
    data = compress(SSE)
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert decode_in(BoundedInflater(encoding, len(SSE)), iter(chunks)) == SSE
    # The same holds for a stream flushed at arbitrary points, decoded in the same pieces.
    bounds = sorted(set(flush_points))
    parts = [SSE[a:b] for a, b in zip([0, *bounds], [*bounds, len(SSE)], strict=True)]
    kind = {"deflate-raw": "raw", "deflate-zlib": "deflate"}.get(name, encoding.strip().lower())
    streamed = flushed("gzip" if kind == "x-gzip" else kind, parts)
    points = sorted({c % (len(streamed) + 1) for c in cuts})
    chunks = [streamed[a:b] for a, b in zip([0, *points], [*points, len(streamed)], strict=True)]
    assert decode_in(BoundedInflater(encoding, len(SSE)), iter(chunks)) == SSE


# ---------------------------------------------------------------------- off the event loop


def test_decode_body_in_thread_runs_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = inflate.decode_body

    def spy(data: bytes, encoding: str, limit: int) -> bytes:
        threads.append(threading.current_thread().name)
        return real(data, encoding, limit)

    monkeypatch.setattr(inflate, "decode_body", spy)

    async def both() -> tuple[bytes, BaseException]:
        ok = await decode_body_in_thread(gzip.compress(SSE), "gzip", len(SSE))
        try:
            await decode_body_in_thread(zeros_bomb("zstd", 8), "zstd", MIB)
        except DecodeLimitExceeded as e:
            return ok, e
        raise AssertionError("no DecodeLimitExceeded")

    ok, error = asyncio.run(both())
    assert ok == SSE
    assert isinstance(error, DecodeLimitExceeded)
    assert len(threads) == 2
    assert all(t.startswith("aibridge-inflate") for t in threads), threads
