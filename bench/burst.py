"""Writes a burst of audit rows through the running bridge's own recorder (benchmark only).

Loaded into mitmdump before ``addon.py`` (``-s bench/burst.py -s addon.py``), it answers
``POST /__bench/burst?flows=N`` itself, so the request never reaches the bridge or the
upstream. It makes and queues the rows of N Codex turns (``bench.workloads.flow_rows``, six
rows each) from the event loop, one turn per loop iteration as hooks would, waits (in a
worker thread) until the writer has committed them all, and answers with the timings as
JSON. The lag probe loaded next to it measures how long the loop stalls meanwhile.
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
        written_before = recorder.stats["written"]
        rows = 0
        started = time.monotonic()
        for n in range(first, first + flows):
            # Each turn's rows are made as its hooks would make them, and freed once written:
            # rows made ahead for the whole burst would be the bench's own garbage to collect.
            for kind, table, row in flow_rows(n):
                if kind == "upsert":
                    recorder.upsert(table, row)
                else:
                    recorder.insert(table, row)
                rows += 1
            await asyncio.sleep(0)
        queued = time.monotonic()
        # flush() waits in a worker thread (never on the loop) and ends the writer's linger,
        # so the last partial batch is not held back by it.
        await asyncio.to_thread(recorder.flush, _TIMEOUT_S)
        written = time.monotonic()
        return {
            "flows": flows,
            "rows": rows,
            "written": recorder.stats["written"] - written_before,
            "t_start": started,
            "t_queued": queued,
            "t_written": written,
        }


addons = [Burst()]
