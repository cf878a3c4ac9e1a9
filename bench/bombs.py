"""``python -m bench.bombs``: the delay other clients see while request bombs are decoded.

The bridge decodes a compressed request body on a worker thread (aibridge.transport.inflate), so the
event loop keeps serving everyone else. Measured here: one thread sends request bombs
(1 GiB of zeros as zstd and as gzip; the bridge decodes 32 MiB of each, then answers 413)
in a loop, while the main thread sends small buffered requests one after another and times
each; the same small requests are timed without bombs first. mitmdump also loads the lag
probe (bench/lagprobe.py), which sees any stall of its event loop directly.

Prints one table; nothing is asserted (tests/test_bombs.py checks that the small requests
succeed meanwhile). ``--requests N`` sets how many small requests each phase sends.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import orjson

from aibridge.transport.inflate import zstd  # the module the bridge decodes with
from bench.client import Connection, build_request
from bench.procs import LAG_PROBE, TOKEN, Proxy, UpstreamProcess

HOST = "127.0.0.1"
MIB = 1 << 20
_ZEROS = bytes(MIB)
BOMB_ENCODINGS = ("zstd", "gzip")


def zeros_bomb(encoding: str, mib: int = 1024) -> bytes:
    """`mib` MiB of zeros as gzip, deflate (zlib-wrapped), br or zstd, made without ever
    holding them decoded (gzip of 1 GiB is about 1 MB, zstd 32 KB, br 1.6 KB)."""
    if encoding in ("gzip", "deflate"):
        # After a full flush every further MiB of zeros deflates to the same block, so the
        # body is one block repeated; the wrappers' checksums are computed over the zeros.
        co = zlib.compressobj(9, zlib.DEFLATED, -15)
        first = co.compress(_ZEROS) + co.flush(zlib.Z_FULL_FLUSH)
        again = co.compress(_ZEROS) + co.flush(zlib.Z_FULL_FLUSH)
        if co.compress(_ZEROS) + co.flush(zlib.Z_FULL_FLUSH) != again:
            raise RuntimeError("zlib does not repeat itself here: cannot build the bomb")
        last = co.compress(_ZEROS) + co.flush()
        deflated = first + again * (mib - 2) + last
        crc, adler = 0, 1
        for _ in range(mib):
            crc, adler = zlib.crc32(_ZEROS, crc), zlib.adler32(_ZEROS, adler)
        if encoding == "gzip":
            head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
            return head + deflated + struct.pack("<II", crc, (mib * MIB) & 0xFFFFFFFF)
        return b"\x78\xda" + deflated + struct.pack(">I", adler)
    if encoding == "br":
        import brotli

        bo = brotli.Compressor(quality=5)
        return b"".join(bo.process(_ZEROS) for _ in range(mib)) + bo.finish()
    if encoding == "zstd":
        zo = zstd.ZstdCompressor()
        return b"".join(zo.compress(_ZEROS) for _ in range(mib)) + zo.flush()
    raise ValueError(f"no bomb for {encoding!r}")


def small_request(port: int) -> bytes:
    body = orjson.dumps({"model": "fake-text", "input": "a small request"})
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    return build_request(HOST, port, "/v1/responses", body, headers)


def bomb_request(port: int, encoding: str) -> bytes:
    headers = {
        "authorization": f"Bearer {TOKEN}",
        "content-type": "application/json",
        "content-encoding": encoding,
    }
    return build_request(HOST, port, "/v1/responses", zeros_bomb(encoding), headers)


async def timed(port: int, raw: bytes, n: int) -> list[float]:
    """`n` requests one after another on one keep-alive connection: each one's latency, ms."""
    conn = await Connection.open(HOST, port)
    try:
        out = []
        for _ in range(n):
            reply = await conn.request(raw)
            if reply.status != 200:
                raise RuntimeError(f"a small request got HTTP {reply.status}")
            out.append(reply.latency * 1000)
        return out
    finally:
        await conn.close()


class Bomber(threading.Thread):
    """Sends request bombs until stopped; counts them and their answers."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.raws = [bomb_request(port, e) for e in BOMB_ENCODINGS]
        self.port = port
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.first = threading.Event()

    def run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        conn = await Connection.open(HOST, self.port)
        try:
            while not self.stop.is_set():
                for raw in self.raws:
                    reply = await conn.request(raw)
                    self.statuses.append(reply.status)
                    self.first.set()
        finally:
            await conn.close()


def summary(name: str, ms: list[float]) -> str:
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"| {name} | {len(ms)} | {statistics.median(ms):.2f} | {p99:.2f} | {max(ms):.2f} |"


def lag_in(path: Path, start: float, end: float) -> tuple[int, float]:
    """Event-loop stalls the lag probe saw between two monotonic times: count, worst ms."""
    report = orjson.loads(path.read_bytes())
    late = [ms for due, ms in report["late"] if start <= due <= end]
    return len(late), max(late, default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bombs", description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="small requests per phase")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="aibridge-bombs-"))
    lag_file = workdir / "lag.json"
    upstream = UpstreamProcess(workdir).start()
    proxy = Proxy(
        "bridge",
        workdir / "bridge",
        upstream.url,
        scripts=[LAG_PROBE],
        bridge=True,
        options={"lagprobe_file": str(lag_file)},
    )
    try:
        proxy.launch()
        proxy.wait_listening()
        raw = small_request(proxy.port)
        asyncio.run(timed(proxy.port, raw, 50))  # warm-up
        t0 = time.monotonic()
        alone = asyncio.run(timed(proxy.port, raw, args.requests))
        t1 = time.monotonic()
        bomber = Bomber(proxy.port)
        bomber.start()
        bomber.first.wait(120)
        t2 = time.monotonic()
        during = asyncio.run(timed(proxy.port, raw, args.requests))
        t3 = time.monotonic()
        bomber.stop.set()
        bomber.join(120)
    finally:
        proxy.stop()  # writes the lag probe's file
        upstream.stop()
    lag_alone, lag_during = lag_in(lag_file, t0, t1), lag_in(lag_file, t2, t3)
    print("| small requests | n | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    print(summary("alone", alone))
    print(summary(f"during request bombs ({' + '.join(BOMB_ENCODINGS)}, 1 GiB each)", during))
    p99 = sorted(during)[int(len(during) * 0.99)] - sorted(alone)[int(len(alone) * 0.99)]
    print(
        f"\nadded latency: max {max(during) - max(alone):+.2f} ms, "
        f"p99 {p99:+.2f} ms, median {statistics.median(during) - statistics.median(alone):+.2f} ms"
    )
    answers = {s: bomber.statuses.count(s) for s in sorted(set(bomber.statuses))}
    print(f"bombs sent meanwhile: {len(bomber.statuses)}, answers {answers}")
    print(
        f"event-loop wake-ups over 0.5 ms late (lag probe): alone {lag_alone[0]} (worst "
        f"{lag_alone[1]:.1f} ms), during bombs {lag_during[0]} (worst {lag_during[1]:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
