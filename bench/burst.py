"""Writes a burst of audit rows through the running bridge's own recorder (benchmark only).

Loaded into mitmdump before ``addon.py`` (``-s bench/burst.py -s addon.py``), it answers
``POST /__bench/burst?flows=N`` itself, so the request never reaches the bridge or the
upstream. It queues the rows of N Codex turns (``bench.workloads.flow_rows``, six rows
each) from the event loop, one turn per loop iteration as hooks would, waits (in a worker thread)
until the writer thread has committed them all, and answers with the timings as JSON. The lag probe
loaded next to it measures how long the loop stalls meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qs, urlsplit

import orjson
from mitmproxy import ctx, http

from bench.workloads import flow_rows

PATH = "/__bench/burst"
_TIMEOUT_S = 120.0


class Burst:
    def __init__(self) -> None:
        self.next_flow = 0

    async def request(self, flow: http.HTTPFlow) -> None:
        target = urlsplit(flow.request.path)
        if target.path != PATH:
            return
        flows = int(parse_qs(target.query).get("flows", ["1000"])[0])
        flow.response = http.Response.make(
            200, orjson.dumps(await self.burst(flows)), {"content-type": "application/json"}
        )

    async def burst(self, flows: int) -> dict[str, float | int]:
        bridge = ctx.master.addons.get("aibridge")
        recorder = getattr(bridge, "recorder", None)
        if recorder is None:
            return {"error": 1}
        first = self.next_flow
        self.next_flow += flows
        prepared = [flow_rows(n) for n in range(first, first + flows)]
        rows = sum(len(p) for p in prepared)
        # Building the rows held the loop; let the probe see that stall before the burst.
        await asyncio.sleep(0.02)
        target = recorder.stats["written"] + rows
        started = time.monotonic()
        for turn in prepared:
            for kind, table, row in turn:
                if kind == "upsert":
                    recorder.upsert(table, row)
                else:
                    recorder.insert(table, row)
            await asyncio.sleep(0)
        queued = time.monotonic()
        # flush() waits in a worker thread (never on the loop) and ends the writer's linger,
        # so the last partial batch is not held back by it.
        await asyncio.to_thread(recorder.flush, _TIMEOUT_S)
        written = time.monotonic()
        return {
            "flows": flows,
            "rows": rows,
            "written": recorder.stats["written"] - target + rows,
            "t_start": started,
            "t_queued": queued,
            "t_written": written,
        }


addons = [Burst()]
