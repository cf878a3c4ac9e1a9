"""``python -m bench.hooks``: the bridge's own hooks timed in one process, no proxy around.

The full benchmark (``python -m bench``) judges the bridge inside mitmdump, where what the
hooks cost is one part of a per-request figure that moves by tens of percent from round to
round on a shared machine. This drives the hooks of one ``AIBridge`` with
``mitmproxy.test.taddons`` on the same buffered ``POST /v1/responses`` the full benchmark
sends (Codex's captured headers; a small body or Codex's captured 40 KB turn), answered with
the bench upstream's real reply, recorded by a real writer process into a real SQLite file.
It reports each hook's median and, per exchange (all four hooks), the 10th percentile,
median and 90th percentile: the 10th percentile is the least disturbed by the machine, and
is the figure to compare two versions of the code by (run both, interleaved, in one session).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client as httpclient
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from aibridge.bridge import AIBridge
from bench.procs import PROVIDER_KEY, TOKEN, UpstreamProcess, bridge_config
from bench.workloads import captured_codex_body, captured_codex_headers, small_responses_body

HOOKS = ("requestheaders", "request", "responseheaders", "response")
BODIES = ("small", "codex")
# Exchanges run before any is timed: caches warm, the writer process started and caught up.
WARMUP = 200
# The loop runs (the writer's hand-over, its timers) after this many exchanges, and garbage
# is collected then, outside the timed hooks: each exchange is timed alike.
YIELD_EVERY = 50


@dataclass
class HookTimes:
    body: str
    body_bytes: int
    exchanges: int
    per_hook_us: dict[str, list[float]] = field(default_factory=lambda: {h: [] for h in HOOKS})
    per_exchange_us: list[float] = field(default_factory=list)
    recorded: int = 0  # interceptions the writer put in the database, warm-up included

    def summary(self) -> dict[str, Any]:
        deciles = statistics.quantiles(self.per_exchange_us, n=10)
        return {
            "body": self.body,
            "body_bytes": self.body_bytes,
            "exchanges": self.exchanges,
            "hook_median_us": {h: statistics.median(v) for h, v in self.per_hook_us.items()},
            "exchange_us": {
                "p10": deciles[0],
                "p50": statistics.median(self.per_exchange_us),
                "p90": deciles[-1],
            },
            "recorded": self.recorded,
        }


def request_body(kind: str) -> bytes:
    if kind == "small":
        return small_responses_body("fake-text")
    if kind == "codex":
        return captured_codex_body("fake-text", stream=False)
    raise ValueError(f"unknown body {kind!r}: one of {', '.join(BODIES)}")


def _upstream_reply(port: int, body: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The bench upstream's answer to this request: what the hooks then see as the response."""
    connection = httpclient.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {**captured_codex_headers(), "authorization": f"Bearer {PROVIDER_KEY}"}
        connection.request("POST", "/v1/responses", body, headers)
        reply = connection.getresponse()
        content = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"bench upstream answered {reply.status}: {content[:200]!r}")
        return [(k.encode(), v.encode()) for k, v in reply.getheaders()], content
    finally:
        connection.close()


def measure(kind: str, exchanges: int, workdir: Path) -> HookTimes:
    body = request_body(kind)
    upstream = UpstreamProcess(workdir).start()
    try:
        response_headers, response_body = _upstream_reply(upstream.port, body)
    finally:
        upstream.stop()  # the hooks never connect anywhere: the reply above is replayed
    os.environ["BENCH_PROVIDER_KEY"] = PROVIDER_KEY  # the config names it
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(bridge_config(upstream.url)))
    database = workdir / "hooks.db"
    host = f"127.0.0.1:{upstream.port}"
    request_headers = [
        (k.encode(), v.encode())
        for k, v in {
            **captured_codex_headers(),
            "authorization": f"Bearer {TOKEN}",
            "host": host,
            "content-length": str(len(body)),
        }.items()
    ]

    def new_flow() -> http.HTTPFlow:
        flow = tflow.tflow()
        now = time.time()
        flow.request = http.Request(
            "127.0.0.1", upstream.port, b"POST", b"http", host.encode(), b"/v1/responses",
            b"HTTP/1.1", http.Headers(request_headers), body, None, now, now,
        )  # fmt: skip
        return flow

    def answer(flow: http.HTTPFlow) -> None:
        now = time.time()
        flow.response = http.Response(
            b"HTTP/1.1", 200, b"OK", http.Headers(response_headers), response_body, None, now,
            now,
        )  # fmt: skip

    times = HookTimes(kind, len(body), exchanges)
    bridge = AIBridge(default_config_dir=workdir)
    with taddons.context(bridge) as tctx:
        tctx.options.mode = [f"reverse:{upstream.url}"]
        tctx.configure(bridge, aibridge_config=str(config), aibridge_db=str(database))

        async def run() -> None:
            clock = time.perf_counter_ns
            gc.disable()
            try:
                for i in range(WARMUP + exchanges):
                    flow = new_flow()
                    t0 = clock()
                    bridge.requestheaders(flow)
                    t1 = clock()
                    bridge.request(flow)
                    t2 = clock()
                    if flow.response is not None:
                        raise RuntimeError(f"the bridge refused: {flow.response.content[:300]!r}")
                    answer(flow)
                    t3 = clock()
                    bridge.responseheaders(flow)
                    t4 = clock()
                    bridge.response(flow)
                    t5 = clock()
                    if i >= WARMUP:
                        spans = (t1 - t0, t2 - t1, t4 - t3, t5 - t4)
                        for hook, span in zip(HOOKS, spans, strict=True):
                            times.per_hook_us[hook].append(span / 1000)
                        times.per_exchange_us.append(sum(spans) / 1000)
                    if i % YIELD_EVERY == 0:
                        gc.collect()
                        await asyncio.sleep(0.006)
            finally:
                gc.enable()

        asyncio.run(run())
        bridge.done()  # drains the writer: every exchange is in the file
    with sqlite3.connect(database) as db:
        (times.recorded,) = db.execute("SELECT count(*) FROM interceptions").fetchone()
    return times


def report(summary: dict[str, Any]) -> str:
    head = f"{summary['body']} body ({summary['body_bytes']:,} bytes)"
    lines = [f"{head}, {summary['exchanges']:,} exchanges timed:"]
    for hook, median in summary["hook_median_us"].items():
        lines.append(f"  {hook:16s} median {median:8.1f} µs")
    e = summary["exchange_us"]
    lines.append(
        f"  per exchange     p10 {e['p10']:.1f}, p50 {e['p50']:.1f}, p90 {e['p90']:.1f} µs"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hooks", description=__doc__)
    parser.add_argument("--body", choices=BODIES, action="append", help="default: both")
    parser.add_argument("--exchanges", type=int, default=3000, help="timed per body")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")
    args = parser.parse_args(argv)
    if args.exchanges < 10:
        parser.error("--exchanges must be at least 10")
    summaries = []
    for kind in args.body or BODIES:
        with tempfile.TemporaryDirectory(prefix="aibridge-hooks-") as workdir:
            summaries.append(measure(kind, args.exchanges, Path(workdir)).summary())
    if args.json:
        sys.stdout.write(orjson.dumps(summaries, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print("\n".join(report(s) for s in summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
