"""The benchmark: ``python -m bench`` (``--quick`` for a seconds-long smoke run).

Starts the bench upstream and seven mitmdumps on loopback, all in reverse mode with the same
flags: stream-only (the SSE baseline, for Responses, Messages and Chat Completions streams
alike, long and short), plain (the buffered baseline), the bridge, the bridge whose user has
budgets and limits, the bridge with its Prometheus metrics on (scraped once a second while
it is measured), the bridge writing to a PostgreSQL server the run starts (left out, with a
line saying so, where PostgreSQL is not installed; ``--require-postgres`` makes that an
error), and the bridge with the lag probe and the burst script. The added latency is
measured sequentially against the upstream itself too.
Variants run alternately, baseline then bridge, for several rounds after a warm-up round;
medians are reported, and ratios are medians of the per-round ratios. See BENCHMARKS.md
for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from aibridge.record.recorder import Recorder
from bench import postgres, report
from bench.client import LoadResult, build_request, one_request, run_load
from bench.procs import (
    BENCH,
    BURST,
    CHAT_PATH,
    LAG_PROBE,
    MESSAGES_PATH,
    PROVIDER_KEY,
    STREAM_ONLY,
    TOKEN,
    CpuSplit,
    Proxy,
    UpstreamProcess,
    cpu_split,
    peak_rss_kib,
    reset_peak_rss,
    rss_kib,
    wait_idle,
)
from bench.report import (
    BUFFERED_BODY,
    LIMITS,
    METRICS,
    POSTGRES,
    POSTGRES_ROWS,
    SSE_POSTGRES,
    Variant,
)
from bench.scraper import Scraper, interceptions
from bench.workloads import (
    CLAUDE_CODE_HEADERS,
    CODEX_HEADERS,
    OPENCODE_HEADERS,
    captured_codex_body,
    captured_codex_headers,
    claude_code_body,
    codex_body,
    flow_rows,
    opencode_chat_body,
    small_responses_body,
)

DOC = BENCH.parent / "BENCHMARKS.md"
DEFAULT_OUT = BENCH / "results" / "latest.json"
HOST = "127.0.0.1"
STALL_MS = 5.0


@dataclass(frozen=True, slots=True)
class Sizes:
    rounds: int
    warmup_rounds: int
    sse_events: int
    sse_streams_c1: int
    sse_streams_c16: int
    sse_short_events: int
    sse_short_streams_c1: int
    sse_short_streams_c16: int
    latency_requests: int  # per side and round, one after another on one connection
    buffered_c1: int
    buffered_c16: int
    paced_delay_ms: int
    recorder_flows: int
    burst_flows: int
    memory_warmup_flows: int
    memory_flows: int
    big_stream_mib: int
    # Throughput loads are scaled up (never down) to last about this long per side and round,
    # from a calibration run: a fixed count is over in milliseconds on a fast machine, where
    # scheduling noise then decides the ratio. 0 keeps the counts as given.
    seconds_per_load: float = 0.0


FULL = Sizes(
    rounds=5,
    warmup_rounds=1,
    sse_events=1000,
    sse_streams_c1=4,
    sse_streams_c16=16,
    sse_short_events=100,
    sse_short_streams_c1=20,
    sse_short_streams_c16=32,
    latency_requests=200,
    buffered_c1=100,
    buffered_c16=300,
    paced_delay_ms=50,
    recorder_flows=5000,
    burst_flows=2000,
    memory_warmup_flows=100,
    memory_flows=1000,
    big_stream_mib=100,
    seconds_per_load=1.0,
)
QUICK = Sizes(
    rounds=1,
    warmup_rounds=0,
    sse_events=50,
    sse_streams_c1=2,
    sse_streams_c16=16,
    sse_short_events=10,
    sse_short_streams_c1=2,
    sse_short_streams_c16=16,
    latency_requests=10,
    buffered_c1=5,
    buffered_c16=16,
    paced_delay_ms=2,
    recorder_flows=100,
    burst_flows=20,
    memory_warmup_flows=5,
    memory_flows=20,
    big_stream_mib=2,
)


class BenchError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def request_bytes(proxy: Proxy, body: bytes, **headers: str) -> bytes:
    all_headers = {**CODEX_HEADERS, "authorization": f"Bearer {TOKEN}", **headers}
    return build_request(HOST, proxy.port, "/v1/responses", body, all_headers)


def codex_request_bytes(port: int, body: bytes, credential: str = TOKEN) -> bytes:
    """A ``POST /v1/responses`` as Codex CLI sends it (its captured headers, in their order),
    to a proxy with the bridge token, or straight to the upstream (at `port`) with the
    provider key the bridge puts in the token's place: the same request but for what a
    proxy in reverse mode changes, the host and, for the bridge, the credential."""
    all_headers = {**captured_codex_headers(), "authorization": f"Bearer {credential}"}
    return build_request(HOST, port, "/v1/responses", body, all_headers)


def messages_request_bytes(proxy: Proxy, body: bytes, **headers: str) -> bytes:
    """A Claude Code ``POST /v1/messages``: its headers, the bridge token as ``x-api-key``."""
    all_headers = {**CLAUDE_CODE_HEADERS, "x-api-key": TOKEN, **headers}
    return build_request(HOST, proxy.port, MESSAGES_PATH, body, all_headers)


def chat_request_bytes(proxy: Proxy, body: bytes, **headers: str) -> bytes:
    """An OpenCode ``POST /v1/chat/completions``: its headers, the bridge token as Bearer."""
    all_headers = {**OPENCODE_HEADERS, "authorization": f"Bearer {TOKEN}", **headers}
    return build_request(HOST, proxy.port, CHAT_PATH, body, all_headers)


# The streamed workloads, by the key of their figures in the result JSON (report.SSE_WORKLOADS);
# short streams of an API are under its key + SHORT (report.SHORT_SSE_WORKLOADS).
RESPONSES_SSE = "sse"
MESSAGES_SSE = "messages_sse"
CHAT_SSE = "chat_sse"  # the body asks for the usage chunk, as OpenCode's does
CHAT_SSE_USAGE_ADDED = "chat_sse_usage_added"  # it does not: the bridge inserts the option
SHORT = "_short"


def sse_request(proxy: Proxy, api: str, events: int) -> bytes:
    """One ``fake-long-<events>`` stream request of that API, one chunk per event as a
    provider sends them (for Messages, ~90-byte text deltas the addon skips by their bytes;
    for Chat Completions, ~280-byte chunks the addon decodes each)."""
    model = f"fake-long-{events}"
    flush = {"x-fake-flush-each": "1"}
    if api == MESSAGES_SSE:
        return messages_request_bytes(proxy, claude_code_body(model), **flush)
    if api in (CHAT_SSE, CHAT_SSE_USAGE_ADDED):
        body = opencode_chat_body(model, include_usage=api == CHAT_SSE)
        return chat_request_bytes(proxy, body, **flush)
    return request_bytes(proxy, codex_body(model, stream=True), **flush)


def load(
    proxy: Proxy, raws: list[bytes], total: int, concurrency: int, **kw: Any
) -> tuple[LoadResult, CpuSplit]:
    """Run a load; return it with mitmdump's CPU seconds for the timed part (its event loop,
    its other threads, its writer processes), counted until it is idle again (the bridge's
    writer finishing its rows included)."""
    marks: list[CpuSplit] = []
    result = asyncio.run(
        run_load(
            HOST,
            proxy.port,
            raws,
            total,
            concurrency,
            on_start=lambda: marks.append(cpu_split(proxy.pid)),
            **kw,
        )
    )
    proxy.sent += len(result.replies) + result.warmups
    wait_idle(proxy.pid)
    cpu = cpu_split(proxy.pid) - marks[0]
    bad = [r.status for r in result.replies if not 200 <= r.status < 300]
    if bad or len(result.replies) != total:
        raise BenchError(
            f"{proxy.name}: {len(bad)} failed replies {bad[:5]}\n{proxy.log()[-3000:]}"
        )
    return result, cpu


def alternate(
    rounds: int,
    warmup: int,
    sides: dict[str, Callable[[], dict[str, float]]],
    rotate: tuple[str, ...] = (),
) -> dict[str, list[dict[str, float]]]:
    """Each round runs every side once, in order (baseline first); warm-up rounds are
    measured the same way and thrown away. `rotate`: sides that move one place on among
    their places every round, so that none of them is always measured after the same one
    (two of them trade places every other round)."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    names = list(sides)
    places = [i for i, name in enumerate(names) if name in rotate]
    for n in range(warmup + rounds):
        order = list(names)
        for k, i in enumerate(places):
            order[i] = names[places[(k + n) % len(places)]]
        for name in order:
            result = sides[name]()
            if n >= warmup:
                runs[name].append(result)
    return runs


def variant_figures(v: Variant, runs: Mapping[str, list[dict[str, float]]]) -> dict[str, Any]:
    """A variant of the bridge against the baseline, with what it moves against the
    bridge itself measured in the same rounds (under ``v.shift_key``)."""
    out = report.paired(runs["baseline"], runs[v.side])
    out[v.shift_key] = report.variant_shift(
        runs["baseline"], runs["addon"], runs[v.side], v.workload
    )
    return out


# ---- 1. SSE throughput --------------------------------------------------------------------------


def sse_once(
    proxy: Proxy, events: int, concurrency: int, streams: int, api: str = RESPONSES_SSE
) -> dict[str, float]:
    raw = sse_request(proxy, api, events)
    result, cpu = load(proxy, [raw], streams, concurrency)
    if any(r.events < events for r in result.replies):
        raise BenchError(f"{proxy.name}: a stream lost events")
    per_1k = 1e6 / result.events  # ms per 1,000 events, from seconds
    return {
        "events_per_s": result.events / result.wall,
        "ttfb_ms": statistics.median(r.ttfb for r in result.replies) * 1000,
        "cpu_ms_per_1k_events": cpu.total * per_1k,
        "cpu_loop_ms_per_1k_events": cpu.loop * per_1k,
        "cpu_threads_ms_per_1k_events": cpu.threads * per_1k,
        "cpu_writer_process_ms_per_1k_events": cpu.writer_processes * per_1k,
    }


def scaled(count: int, concurrency: int, per_second: float, sizes: Sizes) -> int:
    """`count`, or more so that a load lasts about sizes.seconds_per_load at `per_second`."""
    wanted = math.ceil(per_second * sizes.seconds_per_load)
    if wanted <= count:
        return count
    return math.ceil(wanted / concurrency) * concurrency  # every connection as busy


def bench_sse(
    baseline: Proxy,
    addon: Proxy,
    sizes: Sizes,
    api: str = RESPONSES_SSE,
    variants: Mapping[Variant, Proxy] | None = None,
    *,
    short: bool = False,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The bridge against stream-only mitmdump, and in the same rounds each variant of the
    bridge (PostgreSQL as the store): the bridge's figures, and each variant's by its key.
    `short`: streams of sizes.sse_short_events, else of sizes.sse_events."""
    variants = variants or {}
    if short:
        events = sizes.sse_short_events
        counts = (sizes.sse_short_streams_c1, sizes.sse_short_streams_c16)
        name = dict(report.SHORT_SSE_WORKLOADS)[api + SHORT]
    else:
        events = sizes.sse_events
        counts = (sizes.sse_streams_c1, sizes.sse_streams_c16)
        name = dict(report.SSE_WORKLOADS)[api]
    out: dict[str, Any] = {"events": events}
    with_variant: dict[str, dict[str, Any]] = {v.key: {"events": events} for v in variants}
    for label, concurrency, streams in (("c1", 1, counts[0]), ("c16", 16, counts[1])):
        if sizes.seconds_per_load:
            rate = sse_once(baseline, events, concurrency, streams, api)["events_per_s"]
            streams = scaled(streams, concurrency, rate / events, sizes)
        also = "".join(f", the bridge with {v.side} on" for v in variants)
        log(f"{name} {events}-event streams, concurrency {concurrency}, {streams} streams{also}")
        sides: dict[str, Callable[[], dict[str, float]]] = {
            "baseline": lambda c=concurrency, s=streams: sse_once(baseline, events, c, s, api),
            "addon": lambda c=concurrency, s=streams: sse_once(addon, events, c, s, api),
        }
        for v, proxy in variants.items():
            sides[v.side] = lambda p=proxy, c=concurrency, s=streams: sse_once(p, events, c, s, api)
        runs = alternate(
            sizes.rounds,
            sizes.warmup_rounds,
            sides,
            rotate=("addon", *(v.side for v in variants)) if variants else (),
        )
        out[label] = report.paired(runs["baseline"], runs["addon"])
        out[label]["streams"] = streams
        for v in variants:
            with_variant[v.key][label] = variant_figures(v, runs)
            with_variant[v.key][label]["streams"] = streams
    return out, with_variant


# ---- 2. buffered requests -----------------------------------------------------------------------


def buffered_once(proxy: Proxy, total: int, concurrency: int) -> dict[str, float]:
    """Codex's captured request, not streamed, answered by `fake-text`."""
    raw = codex_request_bytes(proxy.port, captured_codex_body("fake-text", stream=False))
    result, cpu = load(proxy, [raw], total, concurrency)
    latencies = [r.latency * 1000 for r in result.replies]
    per_request = 1000 / len(result.replies)  # ms per request, from seconds
    return {
        "req_per_s": len(result.replies) / result.wall,
        "p50_ms": report.percentile(latencies, 0.50),
        "p99_ms": report.percentile(latencies, 0.99),
        "cpu_ms_per_req": cpu.total * per_request,
        "cpu_loop_ms_per_req": cpu.loop * per_request,
        "cpu_threads_ms_per_req": cpu.threads * per_request,
        "cpu_writer_process_ms_per_req": cpu.writer_processes * per_request,
    }


def bench_buffered(
    baseline: Proxy, addon: Proxy, variants: Mapping[Variant, Proxy], sizes: Sizes
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The bridge against plain mitmdump, and in the same rounds each variant of the bridge
    (the bench user under limits; metrics on; PostgreSQL as the store): the bridge's
    figures, and each variant's by its key. A bridge with metrics on is scraped once a
    second while its rounds run, as Prometheus would; after them, one more scrape reads what
    it counted."""
    out: dict[str, Any] = {}
    with_variant: dict[str, dict[str, Any]] = {v.key: {} for v in variants}
    for label, concurrency, total in (
        ("c1", 1, sizes.buffered_c1),
        ("c16", 16, sizes.buffered_c16),
    ):
        if sizes.seconds_per_load:
            rate = buffered_once(baseline, total, concurrency)["req_per_s"]
            total = scaled(total, concurrency, rate, sizes)
        log(
            f"buffered requests with {BUFFERED_BODY}, concurrency {concurrency}, {total} "
            f"requests, the bridge and with {', '.join(f'{v.side} on' for v in variants)}"
        )
        sides: dict[str, Callable[[], dict[str, float]]] = {
            "baseline": lambda c=concurrency, t=total: buffered_once(baseline, t, c),
            "addon": lambda c=concurrency, t=total: buffered_once(addon, t, c),
        }
        for v, proxy in variants.items():
            sides[v.side] = lambda p=proxy, c=concurrency, t=total: buffered_once(p, t, c)
        with contextlib.ExitStack() as scraping:
            scrapers = {
                v: scraping.enter_context(Scraper(HOST, proxy.metrics_port))
                for v, proxy in variants.items()
                if proxy.metrics
            }
            runs = alternate(
                sizes.rounds,
                sizes.warmup_rounds,
                sides,
                rotate=("addon", *(v.side for v in variants)),
            )
        out[label] = report.paired(runs["baseline"], runs["addon"])
        out[label]["requests"] = total
        for v in variants:
            with_variant[v.key][label] = variant_figures(v, runs)
            with_variant[v.key][label]["requests"] = total
        for v, scraper in scrapers.items():
            with_variant[v.key][label]["scrapes"] = scraper.scrapes
            with_variant[v.key][label]["scraped_completed"] = interceptions(
                scraper.scrape(), "completed"
            )
    return out, with_variant


# ---- 3. added latency, sequential ---------------------------------------------------------------


def sequential_figures(result: LoadResult) -> dict[str, float]:
    latencies = [r.latency * 1000 for r in result.replies]
    return {"p50_ms": report.percentile(latencies, 0.50), "mean_ms": statistics.fmean(latencies)}


def direct_once(upstream: UpstreamProcess, raw: bytes, requests: int) -> dict[str, float]:
    """`requests` requests one after another on one keep-alive connection to the upstream
    itself (after an untimed one, as on the proxies' side)."""
    result = asyncio.run(run_load(HOST, upstream.port, [raw], requests, 1))
    bad = [r.status for r in result.replies if not 200 <= r.status < 300]
    if bad or len(result.replies) != requests:
        raise BenchError(f"direct: {len(bad)} failed replies {bad[:5]}\n{upstream.log()[-3000:]}")
    return sequential_figures(result)


def proxied_once(proxy: Proxy, raw: bytes, requests: int) -> dict[str, float]:
    result, _ = load(proxy, [raw], requests, 1)
    return sequential_figures(result)


def bench_latency(
    upstream: UpstreamProcess, plain: Proxy, addon: Proxy, sizes: Sizes
) -> dict[str, Any]:
    """Latency per request, sequential on one keep-alive connection, straight to the
    upstream, through plain mitmdump and through the bridge, in the same rounds: what plain
    mitmdump adds over the direct call and what the bridge adds over plain mitmdump, for a
    small body and for Codex's captured one."""
    requests = sizes.latency_requests
    out: dict[str, Any] = {"requests": requests}
    for key, body in (
        ("small", small_responses_body("fake-text")),
        ("codex", captured_codex_body("fake-text", stream=False)),
    ):
        log(
            f"added latency, {dict(report.LATENCY_BODIES)[key]} ({len(body):,} bytes): "
            f"{requests} sequential requests each straight, through plain mitmdump and the bridge"
        )
        direct_raw = codex_request_bytes(upstream.port, body, PROVIDER_KEY)
        plain_raw = codex_request_bytes(plain.port, body)
        addon_raw = codex_request_bytes(addon.port, body)
        runs = alternate(
            sizes.rounds,
            sizes.warmup_rounds,
            {
                "direct": lambda raw=direct_raw: direct_once(upstream, raw, requests),
                "plain": lambda raw=plain_raw: proxied_once(plain, raw, requests),
                "addon": lambda raw=addon_raw: proxied_once(addon, raw, requests),
            },
            # None always measured right after the same one (the direct call's quiet, say).
            rotate=report.LATENCY_SIDES,
        )
        out[key] = {**report.added_latency(runs), "body_bytes": len(body)}
    return out


# ---- 4. paced stream ----------------------------------------------------------------------------


def paced_once(proxy: Proxy, sizes: Sizes) -> dict[str, float]:
    raw = request_bytes(
        proxy,
        codex_body("fake-slow", stream=True),
        **{"x-fake-delay-ms": str(sizes.paced_delay_ms)},
    )
    result, _ = load(proxy, [raw], 1, 1, stamped=True)
    transits = [t * 1000 for t in result.replies[0].transits]
    if not transits:
        raise BenchError(f"{proxy.name}: the paced stream carried no timestamps")
    return {
        "transit_p50_ms": report.percentile(transits, 0.50),
        "transit_p99_ms": report.percentile(transits, 0.99),
        "events": float(len(transits)),
    }


def bench_paced(baseline: Proxy, addon: Proxy, sizes: Sizes) -> dict[str, Any]:
    log(f"paced stream, {sizes.paced_delay_ms} ms between events")
    runs = alternate(
        sizes.rounds,
        sizes.warmup_rounds,
        {
            "baseline": lambda: paced_once(baseline, sizes),
            "addon": lambda: paced_once(addon, sizes),
        },
    )
    out = report.paired(runs["baseline"], runs["addon"])
    events = int(out["addon"].pop("events"))
    out["baseline"].pop("events")
    out["ratio"].pop("events")
    for q in ("p50", "p99"):
        key = f"transit_{q}_ms"
        out[f"added_delay_{q}_ms"] = report.median(
            a[key] - b[key] for a, b in zip(runs["addon"], runs["baseline"], strict=True)
        )
    out["events"] = events
    return out


# ---- 5. recorder --------------------------------------------------------------------------------


def bench_recorder_alone(workdir: Path, flows: int) -> dict[str, float]:
    """The Recorder in this process, nothing else running: queue the rows of ``flows``
    Codex turns at once, time until all are committed."""
    log(f"recorder alone, {flows:,} flows")
    recorder = Recorder(workdir / "recorder-alone.db")
    recorder.start()
    try:
        prepared = [flow_rows(n) for n in range(flows)]
        rows = sum(len(p) for p in prepared)
        started = time.monotonic()
        for turn in prepared:
            for kind, table, row in turn:
                if kind == "upsert":
                    recorder.upsert(table, row)
                else:
                    recorder.insert(table, row)
        if not recorder.flush(timeout=300):
            raise BenchError("the recorder did not finish writing")
        elapsed = time.monotonic() - started
    finally:
        recorder.close()
    if recorder.stats["written"] != rows:
        raise BenchError(f"the recorder wrote {recorder.stats['written']} of {rows} rows")
    return {"alone_rows": rows, "alone_rows_per_s": rows / elapsed}


def bench_burst(probed: Proxy, flows: int) -> dict[str, float]:
    """Ask the burst script in the probed mitmdump to write ``flows`` turns' rows."""
    log(f"recorder burst inside mitmdump, {flows:,} flows, with the loop-lag probe")
    idle_start = time.monotonic()
    time.sleep(0.5)
    idle_end = time.monotonic()
    raw = build_request(
        HOST,
        probed.port,
        f"/__bench/burst?flows={flows}",
        b"",
        {"authorization": f"Bearer {TOKEN}"},
    )
    reply = asyncio.run(one_request(HOST, probed.port, raw))
    if reply.status != 200:
        raise BenchError(f"burst failed: HTTP {reply.status}\n{probed.log()[-3000:]}")
    burst = orjson.loads(reply.body)
    if burst.get("written") != burst.get("rows"):
        raise BenchError(f"burst wrote {burst.get('written')} of {burst.get('rows')} rows")
    return {
        "idle_start": idle_start,
        "idle_end": idle_end,
        "t_start": burst["t_start"],
        "t_written": burst["t_written"],
        "burst_rows": burst["rows"],
        "burst_rows_per_s": burst["rows"] / (burst["t_written"] - burst["t_start"]),
    }


def lag_figures(probe_file: Path, burst: dict[str, float]) -> dict[str, float]:
    """Worst lateness of the probe's wake-ups in the idle window and during the burst."""
    probe = orjson.loads(probe_file.read_bytes())
    late = probe["late"]

    def window(start: float, end: float) -> list[float]:
        return [lag for t, lag in late if start <= t <= end]

    during = window(burst["t_start"], burst["t_written"])
    idle = window(burst["idle_start"], burst["idle_end"])
    return {
        "burst_max_stall_ms": max(during, default=0.0),
        "burst_stalls_over_5ms": sum(1 for lag in during if lag > STALL_MS),
        "idle_max_lag_ms": max(idle, default=0.0),
        "probe_samples": probe["samples"],
    }


# ---- 6. memory ----------------------------------------------------------------------------------

MIB = 1024.0


def memory_flows(proxy: Proxy, sizes: Sizes) -> dict[str, float]:
    """RSS before and after ``memory_flows`` streamed Codex turns (text, tool, reasoning)."""
    raws = [
        request_bytes(proxy, codex_body(model, stream=True))
        for model in ("fake-reasoning", "fake-tool", "fake-text")
    ]
    load(proxy, raws, sizes.memory_warmup_flows, 16)
    before = rss_kib(proxy.pid)
    load(proxy, raws, sizes.memory_flows, 16)
    after = rss_kib(proxy.pid)
    return {
        "rss_before_mib": before / MIB,
        "rss_after_mib": after / MIB,
        "growth_mib": (after - before) / MIB,
    }


@contextlib.contextmanager
def rss_sampler(pid: int, every: float = 0.005) -> Iterator[list[int]]:
    """Sample RSS in a thread while the block runs (a backstop if VmHWM cannot be reset)."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                samples.append(rss_kib(pid))
            stop.wait(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def memory_big_stream(proxy: Proxy, mib: int) -> dict[str, float]:
    raw = request_bytes(proxy, codex_body(f"fake-big-{mib}", stream=True))
    wait_idle(proxy.pid)
    before = rss_kib(proxy.pid)
    exact_peak = reset_peak_rss(proxy.pid)
    with rss_sampler(proxy.pid) as samples:
        result, _ = load(proxy, [raw], 1, 1, warmup=False)
    peak = max([before, *samples, *([peak_rss_kib(proxy.pid)] if exact_peak else [])])
    return {
        "rss_before_mib": before / MIB,
        "rss_peak_mib": peak / MIB,
        "added_mib": (peak - before) / MIB,
        "mib_per_s": result.replies[0].body_bytes / 2**20 / result.wall,
    }


def bench_memory(baseline: Proxy, addon: Proxy, sizes: Sizes) -> dict[str, Any]:
    log(f"memory: {sizes.memory_flows:,} flows, then one {sizes.big_stream_mib} MiB stream")
    flows = {
        "baseline": memory_flows(baseline, sizes),
        "addon": memory_flows(addon, sizes),
        "count": sizes.memory_flows,
    }
    big = {
        "baseline": memory_big_stream(baseline, sizes.big_stream_mib),
        "addon": memory_big_stream(addon, sizes.big_stream_mib),
        "stream_mib": sizes.big_stream_mib,
    }
    return {"flows": flows, "big_stream": big}


# ---- 7. what landed in PostgreSQL ---------------------------------------------------------------


def start_postgres(
    stack: contextlib.ExitStack, required: bool
) -> tuple[postgres.PostgresStore | None, str | None]:
    """The run's PostgreSQL server (stopped when `stack` closes), or None and why there is
    none; with `required`, no server is a BenchError."""
    reason = postgres.unavailable()
    if reason is None:
        log("starting a PostgreSQL server for the bridge on PostgreSQL")
        try:
            return stack.enter_context(postgres.started()), None
        except postgres.NotStarted as e:
            reason = f"the PostgreSQL server did not start: {e}"
    if required:
        raise BenchError(f"PostgreSQL is required (--require-postgres): {reason}")
    log(f"PostgreSQL not measured: {reason}")
    return None, reason


def postgres_rows(
    proxy: Proxy, store: postgres.PostgresStore, cpu_at_start: float
) -> dict[str, float]:
    """Stop the bridge on PostgreSQL (its recorder drains its queue first, then it logs what
    it counted) and read what landed in its database, beside what the bench sent it, and the
    CPU the server used per request since `cpu_at_start` (on the same cores as the
    mitmdumps: a share of what the variant moves)."""
    log(f"stopping {proxy.name}, counting its rows in PostgreSQL")
    proxy.stop()
    summary = postgres.shutdown_summary(proxy.log())
    if summary is None:
        raise BenchError(f"{proxy.name} logged no summary at shutdown\n{proxy.log()[-3000:]}")
    landed = store.landed()
    server_cpu = store.cpu_seconds() - cpu_at_start
    return {
        "server_cpu_ms_per_request": 1000 * server_cpu / max(proxy.sent, 1),
        "requests_sent": proxy.sent,
        "exchanges_counted": summary["exchanges"],
        "completed_counted": summary["by_status"].get("completed", 0),
        "interceptions": sum(landed.values()),
        "completed": landed.get("completed", 0),
        "rows_written": summary["rows_written"],
        "rows_lost": summary["rows_lost"],
    }


# ---- the run ------------------------------------------------------------------------------------


def run(
    sizes: Sizes, workdir: Path, mode: str, *, require_postgres: bool = False
) -> dict[str, Any]:
    started = time.monotonic()
    machine = report.machine()
    metrics: dict[str, Any] = {"recorder": bench_recorder_alone(workdir, sizes.recorder_flows)}
    probe_file = workdir / "probed" / "lagprobe.json"
    with contextlib.ExitStack() as stack:
        # Entered first, so it stops after every mitmdump.
        store, postgres_skipped = start_postgres(stack, require_postgres)
        server_cpu_at_start = store.cpu_seconds() if store is not None else 0.0
        if store is not None:
            machine["postgres"] = store.info()
        upstream = UpstreamProcess(workdir).start()
        stack.callback(upstream.stop)
        proxies = {
            "stream_only": Proxy(
                "stream-only", workdir / "stream-only", upstream.url, [STREAM_ONLY]
            ),
            "plain": Proxy("plain", workdir / "plain", upstream.url),
            "addon": Proxy("aibridge", workdir / "aibridge", upstream.url, bridge=True),
            "limited": Proxy(
                "aibridge+limits", workdir / "limits", upstream.url, bridge=True, limits=True
            ),
            "metrics": Proxy(
                "aibridge+metrics", workdir / "metrics", upstream.url, bridge=True, metrics=True
            ),
            "probed": Proxy(
                "aibridge+probe",
                workdir / "probed",
                upstream.url,
                [LAG_PROBE, BURST],
                bridge=True,
                options={"lagprobe_file": str(probe_file)},
            ),
        }
        if store is not None:
            proxies["postgres"] = Proxy(
                "aibridge+postgres",
                workdir / "postgres",
                upstream.url,
                bridge=True,
                database=store.url,
                env=store.env,
            )
        log(f"starting the upstream and {len(proxies)} mitmdumps")
        for proxy in proxies.values():
            proxy.launch()
            stack.callback(proxy.stop)
        probed = proxies["probed"]
        for proxy in proxies.values():
            proxy.wait_listening()

        addon = proxies["addon"]
        on_postgres = proxies.get("postgres")
        metrics["sse"], variants = bench_sse(
            proxies["stream_only"],
            addon,
            sizes,
            variants={SSE_POSTGRES: on_postgres} if on_postgres is not None else {},
        )
        metrics.update(variants)
        for api in (MESSAGES_SSE, CHAT_SSE, CHAT_SSE_USAGE_ADDED):
            metrics[api], _ = bench_sse(proxies["stream_only"], addon, sizes, api)
        for api in (RESPONSES_SSE, MESSAGES_SSE, CHAT_SSE):
            metrics[api + SHORT], _ = bench_sse(
                proxies["stream_only"], addon, sizes, api, short=True
            )
        buffered_variants = {LIMITS: proxies["limited"], METRICS: proxies["metrics"]}
        if on_postgres is not None:
            buffered_variants[POSTGRES] = on_postgres
        metrics["buffered"], variants = bench_buffered(
            proxies["plain"], addon, buffered_variants, sizes
        )
        metrics.update(variants)
        if store is not None and on_postgres is not None:
            metrics[POSTGRES_ROWS] = postgres_rows(on_postgres, store, server_cpu_at_start)
        metrics["latency"] = bench_latency(upstream, proxies["plain"], addon, sizes)
        metrics["paced"] = bench_paced(proxies["stream_only"], addon, sizes)
        burst = bench_burst(probed, sizes.burst_flows)
        metrics["memory"] = bench_memory(proxies["stream_only"], addon, sizes)
        probed.stop()  # writes the probe's samples
    if not probe_file.exists():
        raise BenchError(f"the lag probe wrote nothing\n{probed.log()[-3000:]}")
    metrics["recorder"].update(lag_figures(probe_file, burst))
    metrics["recorder"]["burst_rows"] = burst["burst_rows"]
    metrics["recorder"]["burst_rows_per_s"] = burst["burst_rows_per_s"]
    verdicts = report.verdicts(metrics)
    return {
        "schema": 1,
        "mode": mode,
        "finished_at": report.now_iso(),
        "duration_s": time.monotonic() - started,
        "rounds": sizes.rounds,
        "sizes": asdict(sizes),
        "machine": machine,
        "postgres_skipped": postgres_skipped,  # why PostgreSQL was not measured, if it was not
        "metrics": metrics,
        "targets": [v.as_dict() for v in verdicts],
    }


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and one round: checks the benchmark works, in seconds",
    )
    parser.add_argument("--rounds", type=int, help="measured rounds per comparison")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON file")
    parser.add_argument(
        "--no-doc", action="store_true", help="do not rewrite the results section of BENCHMARKS.md"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the working directory (logs, databases) and print its path",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="the working directory to use (created if need be, kept afterwards)",
    )
    parser.add_argument(
        "--require-postgres",
        action="store_true",
        help="fail if no PostgreSQL server can be started (else the bridge on PostgreSQL is "
        "left out, and the output says why)",
    )
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = replace(sizes, rounds=args.rounds)
    mode = "quick" if args.quick else "full"
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir, args.keep = args.workdir, True
    else:
        workdir = Path(tempfile.mkdtemp(prefix="aibridge-bench-"))
    try:
        result = run(sizes, workdir, mode, require_postgres=args.require_postgres)
    finally:
        if args.keep:
            log(f"working directory kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(_finite(result), option=orjson.OPT_INDENT_2))
    section = report.results_section(result)
    print(section)
    log(f"results written to {args.out}")
    if not args.quick and not args.no_doc:
        report.update_doc(DOC, section)
        log(f"results section of {DOC.name} updated")
    return 0
