"""Event-loop lag probe, loaded into mitmdump with an extra ``-s bench/lagprobe.py``.

A task sleeps 1 ms in a loop and notes how late each wake-up is: anything that holds the
loop (a slow hook) or the GIL (another thread) shows up as lateness. Samples later than
``lagprobe_min_ms`` are kept with their time; at shutdown everything goes as JSON to the
file named by the ``lagprobe_file`` option:
``{"interval_ms", "samples", "late": [[due, lateness_ms], ...]}``, where ``due`` is the
``time.monotonic()`` at which the wake-up was due, i.e. when the stall began. All processes
share that clock on Linux, so the benchmark can pick out the stalls that began in an
interval it timed itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

INTERVAL_S = 0.001


class LagProbe:
    def __init__(self) -> None:
        self.samples = 0
        self.late: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option("lagprobe_file", str, "", "Where the lag probe writes its samples.")
        loader.add_option("lagprobe_min_ms", float, 0.5, "Keep samples later than this (ms).")

    def running(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        from mitmproxy import ctx

        keep_above = ctx.options.lagprobe_min_ms / 1000
        monotonic = time.monotonic
        while True:
            due = monotonic() + INTERVAL_S
            await asyncio.sleep(INTERVAL_S)
            lateness = monotonic() - due
            self.samples += 1
            if lateness > keep_above:
                self.late.append((due, lateness * 1000))

    def done(self) -> None:
        from mitmproxy import ctx

        if self._task is not None:
            self._task.cancel()
        if ctx.options.lagprobe_file:
            report = {"interval_ms": INTERVAL_S * 1000, "samples": self.samples, "late": self.late}
            Path(ctx.options.lagprobe_file).write_bytes(orjson.dumps(report))


addons = [LagProbe()]
