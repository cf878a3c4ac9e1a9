"""Turning measurements into the result JSON, the target verdicts and the Markdown table."""

from __future__ import annotations

import itertools
import os
import platform
import sqlite3
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mitmproxy.version import VERSION as MITMPROXY_VERSION

DOC_START = "<!-- bench:results:start -->"
DOC_END = "<!-- bench:results:end -->"

# The streamed workloads: the key of their figures in "metrics", and how rows name them.
# All are judged against DESIGN §8's SSE target ("the same for Messages and Chat
# Completions streams"). Chat is run twice: the body asks for the usage chunk (OpenCode's
# does), and it does not, so the bridge inserts the option into the body bytes.
SSE_WORKLOADS: tuple[tuple[str, str], ...] = (
    ("sse", "SSE"),
    ("messages_sse", "Messages SSE"),
    ("chat_sse", "Chat SSE"),
    ("chat_sse_usage_added", "Chat SSE (usage added)"),
)
# Short streams (100 events in a full run) of each API, judged against a lower target: the
# per-stream work (the request's hooks, the records) weighs more against fewer events.
SHORT_SSE_WORKLOADS: tuple[tuple[str, str], ...] = (
    ("sse_short", "Short SSE"),
    ("messages_sse_short", "Short Messages SSE"),
    ("chat_sse_short", "Short Chat SSE"),
)
ALL_SSE_WORKLOADS = SSE_WORKLOADS + SHORT_SSE_WORKLOADS
SSE_TARGET = 0.95
SHORT_SSE_TARGET = 0.90
BUFFERED_TARGET = 0.88  # issue 18: the real Codex body, c=16
# What the buffered workload sends (bench/workloads.py's captured_codex_body).
BUFFERED_BODY = "captured Codex 40 KB bodies"


def sse_target(key: str) -> float:
    return SHORT_SSE_TARGET if key in dict(SHORT_SSE_WORKLOADS) else SSE_TARGET


# Where mitmdump's CPU goes (bench/procs.py's CpuSplit): each figure's name, by workload.
CPU_PARTS = ("loop", "threads", "writer_process")
BUFFERED_CPU_SPLIT = tuple(f"cpu_{part}_ms_per_req" for part in CPU_PARTS)
SSE_CPU_SPLIT = tuple(f"cpu_{part}_ms_per_1k_events" for part in CPU_PARTS)

# Added latency, sequential on one keep-alive connection (bench/run.py's bench_latency):
# the sides of a round, the bodies, and how much the addon may add over plain mitmdump.
LATENCY_SIDES = ("direct", "plain", "addon")
LATENCY_BODIES: tuple[tuple[str, str], ...] = (
    ("small", "small body"),
    ("codex", "captured Codex 40 KB body"),
)
LATENCY_FIGURES = ("p50_ms", "mean_ms")
LATENCY_ADDED = tuple(f"{by}_added_{k}" for by in ("plain", "addon") for k in LATENCY_FIGURES)
LATENCY_TARGET_MS = 0.3


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload variants of the bridge are measured on: ``key`` holds the bridge's own
    figures in "metrics" (what a variant is "off"), and the figures one load gives."""

    key: str
    title: str  # how rows and targets name it
    rate: str  # the throughput figure the ratio is of
    rate_name: str
    cpu: str
    cpu_per: str  # what the CPU figure is per, for rows
    cpu_digits: int
    latency: str
    figures: tuple[str, ...]  # every figure of one load

    @property
    def shift_keys(self) -> tuple[str, ...]:
        """The figures of `variant_shift` on this workload."""
        return (
            "ratio_moved",
            "ratio_moved_lowest",
            "ratio_moved_highest",
            f"{self.rate}_on_vs_off",
            f"{self.cpu}_added",
            f"{self.latency}_added",
        )


BUFFERED = Workload(
    "buffered",
    "Buffered",
    "req_per_s",
    "req/s",
    "cpu_ms_per_req",
    "request",
    3,
    "p50_ms",
    ("req_per_s", "p50_ms", "p99_ms", "cpu_ms_per_req"),
)
RESPONSES_STREAM = Workload(
    "sse",
    "SSE",
    "events_per_s",
    "events/s",
    "cpu_ms_per_1k_events",
    "1,000 events",
    2,
    "ttfb_ms",
    ("events_per_s", "ttfb_ms", "cpu_ms_per_1k_events"),
)


@dataclass(frozen=True, slots=True)
class Variant:
    """A variant of the bridge measured against the bridge itself, in the same rounds as
    the baseline and the bridge: its figures are under ``key`` of "metrics", and each
    concurrency's has what the variant moves under ``shift_key``."""

    key: str
    side: str  # its name in the rounds and in the rows ("limits": "Buffered, limits on: …")
    shift_key: str
    moved_by: str  # what moves the ratio, as the target names it
    workload: Workload = BUFFERED

    def target_name(self, label: str) -> str:
        w = self.workload
        return f"{w.title} {w.rate_name} ratio moved by {self.moved_by}, {label}"


# The bench user under budgets and limits of every kind, none ever refusing (bench/procs.py).
LIMITS = Variant("buffered_limits", "limits", "limits_shift", "enforcing limits")
# The bridge's Prometheus metrics on, scraped once a second (bench/scraper.py).
METRICS = Variant("buffered_metrics", "metrics", "metrics_shift", "metrics")
# The bridge writing its log to a PostgreSQL server of the run's own (bench/postgres.py)
# instead of a SQLite file, on the buffered path and on Responses streams.
POSTGRES_MOVED_BY = "PostgreSQL as the store"
POSTGRES = Variant("buffered_postgres", "postgres", "postgres_shift", POSTGRES_MOVED_BY)
SSE_POSTGRES = Variant(
    "sse_postgres", "postgres", "postgres_shift", POSTGRES_MOVED_BY, RESPONSES_STREAM
)
BUFFERED_VARIANTS: tuple[Variant, ...] = (LIMITS, METRICS, POSTGRES)
SSE_VARIANTS: tuple[Variant, ...] = (SSE_POSTGRES,)
VARIANTS: tuple[Variant, ...] = BUFFERED_VARIANTS + SSE_VARIANTS
# The variants a run without a PostgreSQL server leaves out.
POSTGRES_VARIANTS: tuple[Variant, ...] = (POSTGRES, SSE_POSTGRES)

# How far each variant may move the bridge's ratio against the baseline.
SHIFT_MAX = 0.02
SHIFT_KEYS: tuple[str, ...] = BUFFERED.shift_keys

# What the bridge on PostgreSQL sent, counted and wrote over the run (bench/run.py's
# postgres_rows): the target is that every exchange counted is a row in PostgreSQL.
POSTGRES_ROWS = "postgres_rows"
POSTGRES_ROW_FIGURES: tuple[str, ...] = (
    "server_cpu_ms_per_request",  # the PostgreSQL server's CPU, all its processes
    "requests_sent",  # by the bench to that bridge, warm-up requests included
    "exchanges_counted",  # by the bridge, in its summary at shutdown
    "completed_counted",
    "interceptions",  # rows in PostgreSQL's interceptions after the bridge stopped
    "completed",
    "rows_written",  # by the bridge's recorder, from the same summary
    "rows_lost",
)
POSTGRES_ROWS_TARGET = "PostgreSQL holds every exchange the bridge counted"

# Every number a run must produce (dotted paths into "metrics"; those of POSTGRES_VARIANTS
# and POSTGRES_ROWS only with a PostgreSQL server); the smoke test checks them.
# Of the CPU split only the event loop's part has a ratio: a baseline has no writer process
# (0) and next to no CPU on other threads.
METRIC_PATHS: tuple[str, ...] = tuple(
    [
        f"{key}.{c}.{side}.{m}"
        for key, _ in ALL_SSE_WORKLOADS
        for c in ("c1", "c16")
        for side in ("baseline", "addon", "ratio")
        for m in ("events_per_s", "ttfb_ms", "cpu_ms_per_1k_events")
    ]
    + [
        f"{key}.{c}.{side}.{m}"
        for key, _ in ALL_SSE_WORKLOADS
        for c in ("c1", "c16")
        for side in ("baseline", "addon")
        for m in SSE_CPU_SPLIT
    ]
    + [f"{key}.{c}.ratio.{SSE_CPU_SPLIT[0]}" for key, _ in ALL_SSE_WORKLOADS for c in ("c1", "c16")]
    + [f"{key}.events" for key, _ in ALL_SSE_WORKLOADS]
    + [
        f"buffered.{c}.{side}.{m}"
        for c in ("c1", "c16")
        for side in ("baseline", "addon", "ratio")
        for m in ("req_per_s", "p50_ms", "p99_ms", "cpu_ms_per_req")
    ]
    + [
        f"buffered.{c}.{side}.{m}"
        for c in ("c1", "c16")
        for side in ("baseline", "addon")
        for m in BUFFERED_CPU_SPLIT
    ]
    + [f"buffered.{c}.ratio.{BUFFERED_CPU_SPLIT[0]}" for c in ("c1", "c16")]
    + ["latency.requests"]
    + [
        f"latency.{body}.{side}.{m}"
        for body, _ in LATENCY_BODIES
        for side in LATENCY_SIDES
        for m in LATENCY_FIGURES
    ]
    + [
        f"latency.{body}.{m}"
        for body, _ in LATENCY_BODIES
        for m in (*LATENCY_ADDED, "ratio_p50", "body_bytes")
    ]
    + [
        f"{v.key}.{c}.{side}.{m}"
        for v in VARIANTS
        for c in ("c1", "c16")
        for side in ("baseline", "addon", "ratio")
        for m in v.workload.figures
    ]
    + [
        f"{v.key}.{c}.{v.shift_key}.{k}"
        for v in VARIANTS
        for c in ("c1", "c16")
        for k in v.workload.shift_keys
    ]
    + [f"{METRICS.key}.{c}.{k}" for c in ("c1", "c16") for k in ("scrapes", "scraped_completed")]
    + [f"{v.key}.events" for v in SSE_VARIANTS]
    + [f"{POSTGRES_ROWS}.{k}" for k in POSTGRES_ROW_FIGURES]
    + [
        f"paced.{side}.{m}"
        for side in ("baseline", "addon", "ratio")
        for m in ("transit_p50_ms", "transit_p99_ms")
    ]
    + ["paced.added_delay_p50_ms", "paced.added_delay_p99_ms", "paced.events"]
    + [
        "recorder.alone_rows",
        "recorder.alone_rows_per_s",
        "recorder.burst_rows",
        "recorder.burst_rows_per_s",
        "recorder.burst_max_stall_ms",
        "recorder.burst_stalls_over_5ms",
        "recorder.idle_max_lag_ms",
        "recorder.probe_samples",
    ]
    + [
        f"memory.flows.{side}.{m}"
        for side in ("baseline", "addon")
        for m in ("rss_before_mib", "rss_after_mib", "growth_mib")
    ]
    + ["memory.flows.count"]
    + [
        f"memory.big_stream.{side}.{m}"
        for side in ("baseline", "addon")
        for m in ("rss_before_mib", "rss_peak_mib", "added_mib", "mib_per_s")
    ]
    + ["memory.big_stream.stream_mib"]
)


def lookup(metrics: Mapping[str, Any], path: str) -> Any:
    value: Any = metrics
    for key in path.split("."):
        value = value[key]
    return value


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model or platform.processor() or "unknown",
        "python": platform.python_version(),
        "mitmproxy": MITMPROXY_VERSION,
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()),
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- aggregation ---------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def percentile(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def paired(baseline: list[dict[str, float]], addon: list[dict[str, float]]) -> dict[str, Any]:
    """Medians of each side over the rounds, and the median of the per-round ratios
    (addon / baseline): pairing each round with its neighbour cancels slow drifts."""
    keys = baseline[0].keys()
    return {
        "baseline": {k: median(r[k] for r in baseline) for k in keys},
        "addon": {k: median(r[k] for r in addon) for k in keys},
        "ratio": {
            k: median(a[k] / b[k] for a, b in zip(addon, baseline, strict=True) if b[k])
            for k in keys
        },
        "rounds": len(baseline),
        "per_round": {"baseline": baseline, "addon": addon},
    }


def added_latency(runs: Mapping[str, list[dict[str, float]]]) -> dict[str, Any]:
    """The sequential latency of each side (medians over the rounds), and what each proxy
    adds, as medians of per-round differences: plain mitmdump over the direct call
    (``plain_added_*``), the bridge over plain mitmdump (``addon_added_*``, the addon's
    share), for the p50 and the mean; ``ratio_p50``: the bridge's p50 over plain's."""
    direct, plain, addon = (runs[side] for side in LATENCY_SIDES)
    out: dict[str, Any] = {
        side: {k: median(r[k] for r in runs[side]) for k in LATENCY_FIGURES}
        for side in LATENCY_SIDES
    }
    for k in LATENCY_FIGURES:
        out[f"plain_added_{k}"] = median(p[k] - d[k] for d, p in zip(direct, plain, strict=True))
        out[f"addon_added_{k}"] = median(a[k] - p[k] for p, a in zip(plain, addon, strict=True))
    out["ratio_p50"] = median(
        a["p50_ms"] / p["p50_ms"] for p, a in zip(plain, addon, strict=True) if p["p50_ms"]
    )
    out["rounds"] = len(direct)
    out["per_round"] = {side: runs[side] for side in LATENCY_SIDES}
    return out


def variant_shift(
    baseline: list[dict[str, float]],
    off: list[dict[str, float]],
    on: list[dict[str, float]],
    workload: Workload = BUFFERED,
) -> dict[str, float]:
    """What a variant of the bridge (on) moves against the bridge (off), as medians over the
    rounds of per-round figures (each round's loads ran back to back): the ratio of the
    workload's rate (req/s, events/s) against the baseline (on minus off; with its lowest
    and highest round, the spread a noisy machine gives it), the rate on / off, and the
    CPU and latency (p50, time to first byte) added, ms."""
    rate, cpu, latency = workload.rate, workload.cpu, workload.latency
    rounds = list(zip(baseline, off, on, strict=True))
    moved = [(n[rate] - f[rate]) / b[rate] for b, f, n in rounds]
    return {
        "ratio_moved": median(moved),
        "ratio_moved_lowest": min(moved),
        "ratio_moved_highest": max(moved),
        f"{rate}_on_vs_off": median(n[rate] / f[rate] for _, f, n in rounds),
        f"{cpu}_added": median(n[cpu] - f[cpu] for _, f, n in rounds),
        f"{latency}_added": median(n[latency] - f[latency] for _, f, n in rounds),
    }


# ---- targets ---------------------------------------------------------------------------------


def _variants(m: Mapping[str, Any], workload: Workload | None = None) -> list[Variant]:
    """The variants a result holds (of one workload if given; one from before limits,
    metrics or PostgreSQL were measured, or from a run without PostgreSQL, has fewer)."""
    return [v for v in VARIANTS if v.key in m and workload in (None, v.workload)]


def _sse_workloads(m: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The streamed workloads a result holds (one from before Messages, Chat Completions or
    short streams were measured has fewer)."""
    return [(key, title) for key, title in ALL_SSE_WORKLOADS if key in m]


def _fixed(value: float, digits: int) -> str:
    """The value to `digits` places, a part that rounds to nothing as 0, not -0.000 (the
    process's clock and its main thread's are read a few microseconds apart)."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def _split(figures: Mapping[str, float], keys: tuple[str, ...], digits: int) -> str | None:
    """Event loop / other threads / writer processes, ms (None for a result from before
    the split was measured)."""
    if not all(k in figures for k in keys):
        return None
    return " / ".join(_fixed(figures[k], digits) for k in keys) + " ms"


def latency_verdict_name(title: str) -> str:
    return f"Latency the addon adds over plain mitmdump, sequential, {title}"


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    target: str
    value: str
    met: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "value": self.value,
            "met": self.met,
            "reason": self.reason,
        }


def _split_added(on: Mapping[str, float], off: Mapping[str, float], keys: tuple[str, ...]) -> str:
    """'; of it, on the event loop +x ms, other threads +y ms, writer processes +z ms' (the
    differences of the medians), or nothing for a result from before the split."""
    if not all(k in on and k in off for k in keys):
        return ""
    loop, threads, writer = (on[k] - off[k] for k in keys)
    return (
        f"; of it, on the event loop {loop:+.3f} ms, other threads {threads:+.3f} ms, "
        f"writer processes {writer:+.3f} ms"
    )


def verdicts(m: Mapping[str, Any]) -> list[Verdict]:
    out = []
    if "latency" in m:
        for body, title in LATENCY_BODIES:
            lat = m["latency"][body]
            added = lat["addon_added_p50_ms"]
            out.append(
                Verdict(
                    latency_verdict_name(title),
                    f"<= {LATENCY_TARGET_MS} ms",
                    f"{added:+.2f} ms",
                    added <= LATENCY_TARGET_MS,
                    f"p50 per request: direct {lat['direct']['p50_ms']:.2f} ms, plain mitmdump "
                    f"{lat['plain']['p50_ms']:.2f} ms ({lat['plain_added_p50_ms']:+.2f}), aibridge "
                    f"{lat['addon']['p50_ms']:.2f} ms ({added:+.2f}); means added "
                    f"{lat['plain_added_mean_ms']:+.2f} and {lat['addon_added_mean_ms']:+.2f} ms",
                )
            )
    for (key, title), (c, label) in itertools.product(
        _sse_workloads(m), (("c1", "c=1"), ("c16", "c=16"))
    ):
        sse = m[key][c]
        ratio = sse["ratio"]["events_per_s"]
        target = sse_target(key)
        out.append(
            Verdict(
                f"{title} events/s vs stream-only mitmdump, {label}",
                f">= {target:.2f}x",
                f"{ratio:.2f}x",
                ratio >= target,
                f"mitmdump spends {sse['ratio']['cpu_ms_per_1k_events']:.2f}x the CPU per event "
                f"({sse['addon']['cpu_ms_per_1k_events']:.1f} vs "
                f"{sse['baseline']['cpu_ms_per_1k_events']:.1f} ms per 1,000 events"
                f"{_split_added(sse['addon'], sse['baseline'], SSE_CPU_SPLIT)})",
            )
        )
    buf = m["buffered"]["c16"]
    ratio = buf["ratio"]["req_per_s"]
    cpu_a, cpu_b = buf["addon"]["cpu_ms_per_req"], buf["baseline"]["cpu_ms_per_req"]
    out.append(
        Verdict(
            f"Buffered req/s vs plain mitmdump, c=16, {BUFFERED_BODY}",
            f">= {BUFFERED_TARGET:.2f}x",
            f"{ratio:.2f}x",
            ratio >= BUFFERED_TARGET,
            f"mitmdump spends {cpu_a:.2f} ms CPU per request with the addon, {cpu_b:.2f} ms "
            f"without: {cpu_a - cpu_b:.2f} ms added per request"
            f"{_split_added(buf['addon'], buf['baseline'], BUFFERED_CPU_SPLIT)}",
        )
    )
    for v, (c, label) in itertools.product(_variants(m), (("c1", "c=1"), ("c16", "c=16"))):
        w = v.workload
        on, off = m[v.key][c], m[w.key][c]
        shift = on[v.shift_key]
        moved = shift["ratio_moved"]
        n = on.get("scrapes")
        scrapes = "" if n is None else f"; /metrics scraped {n:.0f} time{'' if n == 1 else 's'}"
        out.append(
            Verdict(
                v.target_name(label),
                f"within {SHIFT_MAX:.2f}",
                f"{moved:+.3f}",
                abs(moved) <= SHIFT_MAX,
                f"per round from {shift['ratio_moved_lowest']:+.3f} to "
                f"{shift['ratio_moved_highest']:+.3f}; {on['ratio'][w.rate]:.2f}x with "
                f"{v.side} on, {off['ratio'][w.rate]:.2f}x off; mitmdump spends "
                f"{shift[f'{w.cpu}_added']:+.{w.cpu_digits}f} ms CPU per {w.cpu_per} with "
                f"{v.side} on{scrapes}",
            )
        )
    if POSTGRES_ROWS in m:
        out.append(_postgres_rows_verdict(m[POSTGRES_ROWS]))
    rec = m["recorder"]
    rate = rec["alone_rows_per_s"]
    out.append(
        Verdict(
            "Recorder alone, rows/s",
            ">= 20,000",
            f"{rate:,.0f}",
            rate >= 20_000,
            f"{1e6 / rate:.0f} us per row; inside mitmdump a burst wrote "
            f"{rec['burst_rows_per_s']:,.0f} rows/s",
        )
    )
    stall = rec["burst_max_stall_ms"]
    out.append(
        Verdict(
            "Longest event-loop stall while a burst is written",
            "<= 5 ms",
            f"{stall:.1f} ms",
            stall <= 5.0,
            f"{rec['burst_stalls_over_5ms']} wake-ups over 5 ms late during the burst of "
            f"{rec['burst_rows']:,} rows; an idle loop's worst was {rec['idle_max_lag_ms']:.1f} ms",
        )
    )
    flows = m["memory"]["flows"]
    growth = flows["addon"]["growth_mib"]
    out.append(
        Verdict(
            f"RSS flat over {flows['count']:,} streamed flows",
            "< 5 MiB growth",
            f"{growth:+.1f} MiB",
            growth < 5.0,
            f"stream-only mitmdump grew {flows['baseline']['growth_mib']:+.1f} MiB over the "
            "same flows",
        )
    )
    big = m["memory"]["big_stream"]
    added = big["addon"]["added_mib"]
    out.append(
        Verdict(
            f"RSS added during one {big['stream_mib']} MiB stream",
            "< 20 MiB",
            f"{added:+.1f} MiB",
            added < 20.0,
            f"stream-only mitmdump: {big['baseline']['added_mib']:+.1f} MiB",
        )
    )
    return out


def postgres_rows_met(rows: Mapping[str, Any]) -> bool:
    """Every request sent to the bridge on PostgreSQL was an exchange it counted, completed,
    and each is its row in PostgreSQL; the recorder lost nothing."""
    counted = rows["exchanges_counted"]
    return (
        rows["requests_sent"] == counted == rows["completed_counted"]
        and rows["interceptions"] == counted == rows["completed"]
        and rows["rows_lost"] == 0
    )


def _postgres_rows_verdict(rows: Mapping[str, Any]) -> Verdict:
    return Verdict(
        POSTGRES_ROWS_TARGET,
        "all",
        f"{rows['interceptions']:,} of {rows['exchanges_counted']:,}",
        postgres_rows_met(rows),
        f"{rows['requests_sent']:,} requests sent to it (warm-ups included); counted at its "
        f"shutdown: {rows['exchanges_counted']:,} exchanges, {rows['completed_counted']:,} "
        f"completed, {rows['rows_written']:,} rows written, {rows['rows_lost']:,} lost; in "
        f"PostgreSQL: {rows['interceptions']:,} interceptions, {rows['completed']:,} completed",
    )


# ---- table -----------------------------------------------------------------------------------


def _n(value: float, unit: str = "", digits: int = 0) -> str:
    return f"{value:,.{digits}f}{unit}"


def _pair(m: Mapping[str, Any], key: str, unit: str, digits: int) -> tuple[str, str, str]:
    """Ratio, addon figure and baseline figure of one paired metric."""
    return (
        f"{m['ratio'][key]:.2f}x",
        _n(m["addon"][key], unit, digits),
        _n(m["baseline"][key], unit, digits),
    )


def _p50_p99(m: Mapping[str, Any], p50: str, p99: str) -> tuple[str, str, str]:
    return (
        f"{m['ratio'][p50]:.2f}x / {m['ratio'][p99]:.2f}x",
        f"{m['addon'][p50]:.2f} / {m['addon'][p99]:.2f} ms",
        f"{m['baseline'][p50]:.2f} / {m['baseline'][p99]:.2f} ms",
    )


def _split_row(
    m: Mapping[str, Any], keys: tuple[str, ...], title: str, digits: int
) -> list[tuple[str, ...]]:
    """Where mitmdump's CPU went: the event loop's ratio, then loop / other threads /
    writer processes for both sides (no row for a result from before the split)."""
    addon, baseline = _split(m["addon"], keys, digits), _split(m["baseline"], keys, digits)
    if addon is None or baseline is None:
        return []
    loop_ratio = m["ratio"].get(keys[0])
    ratio = f"{loop_ratio:.2f}x on the loop" if isinstance(loop_ratio, float | int) else ""
    return [(title, ratio, addon, baseline, "", "")]


def _latency_rows(m: Mapping[str, Any], status: Callable[[str], str]) -> list[tuple[str, ...]]:
    lat = m["latency"]
    rows: list[tuple[str, ...]] = []
    for body, title in LATENCY_BODIES:
        b = lat[body]
        rows += [
            (
                f"Latency per request p50 / mean, sequential on one keep-alive connection, "
                f"{title} ({b['body_bytes']:,} bytes), {lat['requests']:,} requests",
                f"{b['ratio_p50']:.2f}x",
                f"{b['addon']['p50_ms']:.2f} / {b['addon']['mean_ms']:.2f} ms",
                f"plain {b['plain']['p50_ms']:.2f} / {b['plain']['mean_ms']:.2f} ms; direct "
                f"{b['direct']['p50_ms']:.2f} / {b['direct']['mean_ms']:.2f} ms",
                "",
                "",
            ),
            (
                f"Latency added per request p50 / mean, {title}: the addon over plain mitmdump "
                "(plain mitmdump over a direct call)",
                "",
                f"{b['addon_added_p50_ms']:+.2f} / {b['addon_added_mean_ms']:+.2f} ms",
                f"({b['plain_added_p50_ms']:+.2f} / {b['plain_added_mean_ms']:+.2f} ms)",
                f"<= {LATENCY_TARGET_MS} ms",
                status(latency_verdict_name(title)),
            ),
        ]
    return rows


def _variant_rows(
    v: Variant,
    on: Mapping[str, Any],
    off: Mapping[str, Any],
    label: str,
    detail: str,
    status: Callable[[str], str],
) -> list[tuple[str, ...]]:
    """The workload with a variant on: against the baseline, then against the bridge with
    it off (same rounds; each figure a median of per-round ones, so the shift is not the
    difference of the two ratios' medians). `detail`: the load's size, for the first row."""
    w = v.workload
    shift = on[v.shift_key]
    digits = w.cpu_digits
    return [
        (
            f"{w.title}, {v.side} on: {w.rate_name}, {detail}, {label}",
            *_pair(on, w.rate, "", 0),
            "",
            "",
        ),
        (
            f"{w.title}, {v.side} on vs off: {w.rate_name} ratio moved (rounds from, to), {label}",
            f"{shift['ratio_moved']:+.3f} ({shift['ratio_moved_lowest']:+.3f}, "
            f"{shift['ratio_moved_highest']:+.3f})",
            f"{shift[f'{w.rate}_on_vs_off']:.3f}x the {w.rate_name} of off",
            "",
            f"within {SHIFT_MAX:.2f}",
            status(v.target_name(label)),
        ),
        (
            f"{w.title}, {v.side} on vs off: mitmdump CPU per {w.cpu_per}, {label}",
            f"{shift[f'{w.cpu}_added']:+.{digits}f} ms",
            f"{on['addon'][w.cpu]:.{digits}f} ms on",
            f"{off['addon'][w.cpu]:.{digits}f} ms off",
            "",
            "",
        ),
    ]


def table(m: Mapping[str, Any], verdict_list: list[Verdict]) -> str:
    """The Markdown table: ratio first, then the addon's and the baseline's figures."""
    by_name = {v.name: v for v in verdict_list}

    def status(name: str) -> str:
        v = by_name.get(name)
        return "" if v is None else ("met" if v.met else "**missed**")

    rows: list[tuple[str, ...]] = []
    if "latency" in m:
        rows += _latency_rows(m, status)
    for (key, title), (c, label) in itertools.product(
        _sse_workloads(m), (("c1", "c=1"), ("c16", "c=16"))
    ):
        sse = m[key]
        s = sse[c]
        rows += [
            (
                f"{title} events/s, {sse['events']:,}-event stream, {label}",
                *_pair(s, "events_per_s", "", 0),
                f">= {sse_target(key):.2f}x",
                status(f"{title} events/s vs stream-only mitmdump, {label}"),
            ),
            (f"{title} time to first byte, {label}", *_pair(s, "ttfb_ms", " ms", 1), "", ""),
            (
                f"{title} mitmdump CPU per 1,000 events, {label}",
                *_pair(s, "cpu_ms_per_1k_events", " ms", 1),
                "",
                "",
            ),
            *_split_row(
                s,
                SSE_CPU_SPLIT,
                f"{title} CPU per 1,000 events: event loop / other threads / writer "
                f"processes, {label}",
                2,
            ),
        ]
        if key == RESPONSES_STREAM.key:
            for v in _variants(m, RESPONSES_STREAM):
                detail = f"{m[v.key]['events']:,}-event stream"
                rows += _variant_rows(v, m[v.key][c], s, label, detail, status)
    for c, label in (("c1", "c=1"), ("c16", "c=16")):
        b = m["buffered"][c]
        target, name = "", ""
        if c == "c16":
            target = f">= {BUFFERED_TARGET:.2f}x"
            name = f"Buffered req/s vs plain mitmdump, c=16, {BUFFERED_BODY}"
        rows += [
            (
                f"Buffered req/s, {BUFFERED_BODY}, {label}",
                *_pair(b, "req_per_s", "", 0),
                target,
                status(name),
            ),
            (f"Buffered latency p50 / p99, {label}", *_p50_p99(b, "p50_ms", "p99_ms"), "", ""),
            (
                f"Buffered mitmdump CPU per request, {label}",
                *_pair(b, "cpu_ms_per_req", " ms", 2),
                "",
                "",
            ),
            *_split_row(
                b,
                BUFFERED_CPU_SPLIT,
                f"Buffered CPU per request: event loop / other threads / writer processes, {label}",
                3,
            ),
        ]
        for v in _variants(m, BUFFERED):
            rows += _variant_rows(v, m[v.key][c], b, label, BUFFERED_BODY, status)
    if POSTGRES_ROWS in m:
        pg = m[POSTGRES_ROWS]
        rows.append(
            (
                "PostgreSQL store: interceptions in the database, of the exchanges the bridge "
                "counted",
                "",
                f"{pg['interceptions']:,} of {pg['exchanges_counted']:,}",
                f"{pg['requests_sent']:,} requests sent",
                "all",
                status(POSTGRES_ROWS_TARGET),
            )
        )
        if "server_cpu_ms_per_request" in pg:
            rows.append(
                (
                    "PostgreSQL store: the server's CPU per request, on the same cores",
                    "",
                    f"{pg['server_cpu_ms_per_request']:.3f} ms",
                    "",
                    "",
                    "",
                )
            )
    p = m["paced"]
    rows += [
        (
            f"Paced stream ({p['events']} events): transit per event p50 / p99",
            *_p50_p99(p, "transit_p50_ms", "transit_p99_ms"),
            "",
            "",
        ),
        (
            "Paced stream: delay the addon adds per event, p50 / p99",
            "",
            f"{p['added_delay_p50_ms']:+.2f} / {p['added_delay_p99_ms']:+.2f} ms",
            "",
            "",
            "",
        ),
    ]
    r = m["recorder"]
    rows += [
        (
            f"Recorder alone, {r['alone_rows']:,} rows",
            "",
            _n(r["alone_rows_per_s"], " rows/s"),
            "",
            ">= 20,000",
            status("Recorder alone, rows/s"),
        ),
        (
            f"Recorder inside mitmdump, burst of {r['burst_rows']:,} rows",
            "",
            _n(r["burst_rows_per_s"], " rows/s"),
            "",
            "",
            "",
        ),
        (
            "Longest event-loop stall while the burst is written",
            "",
            _n(r["burst_max_stall_ms"], " ms", 1),
            f"idle loop: {r['idle_max_lag_ms']:.1f} ms",
            "<= 5 ms",
            status("Longest event-loop stall while a burst is written"),
        ),
    ]
    f, g = m["memory"]["flows"], m["memory"]["big_stream"]
    rows += [
        (
            f"RSS growth over {f['count']:,} streamed flows",
            "",
            f"{f['addon']['growth_mib']:+.1f} MiB (to {f['addon']['rss_after_mib']:.0f})",
            f"{f['baseline']['growth_mib']:+.1f} MiB (to {f['baseline']['rss_after_mib']:.0f})",
            "< 5 MiB",
            status(f"RSS flat over {f['count']:,} streamed flows"),
        ),
        (
            f"RSS added during one {g['stream_mib']} MiB stream",
            "",
            f"{g['addon']['added_mib']:+.1f} MiB ({g['addon']['mib_per_s']:.0f} MiB/s)",
            f"{g['baseline']['added_mib']:+.1f} MiB ({g['baseline']['mib_per_s']:.0f} MiB/s)",
            "< 20 MiB",
            status(f"RSS added during one {g['stream_mib']} MiB stream"),
        ),
    ]
    header = ("Measurement", "Ratio (addon / baseline)", "With aibridge", "Baseline", "Target", "")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def misses(verdict_list: list[Verdict]) -> str:
    missed = [v for v in verdict_list if not v.met]
    if not missed:
        return "Every target met."
    return "\n".join(
        f"- Missed: {v.name}: {v.value}, target {v.target}. {v.reason}." for v in missed
    )


def machine_line(info: Mapping[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in info["load_average"])
    postgres = ""
    if pg := info.get("postgres"):  # a run with a PostgreSQL server
        settings = ", ".join(f"{k}={v}" for k, v in pg["settings"].items())
        postgres = f", PostgreSQL {pg['version']} ({settings})"
    return (
        f"{info['cores']} cores, {info['cpu_model']}; Python {info['python']}, "
        f"mitmproxy {info['mitmproxy']}, SQLite {info['sqlite']}{postgres}; {info['platform']}; "
        f"load average at start {load}"
    )


def results_section(result: Mapping[str, Any]) -> str:
    verdict_list = [Verdict(**v) for v in result["targets"]]
    skipped = result.get("postgres_skipped")
    return "\n".join(
        [
            f"Run {result['finished_at']} ({result['mode']} mode, {result['rounds']} rounds, "
            f"{result['duration_s']:.0f} s).",
            "",
            f"Machine: {machine_line(result['machine'])}.",
            "",
            *([f"PostgreSQL not measured: {skipped}.", ""] if skipped else []),
            table(result["metrics"], verdict_list),
            "",
            misses(verdict_list),
        ]
    )


def update_doc(doc: Path, section: str) -> None:
    """Replace the results between the markers of BENCHMARKS.md (or append them)."""
    text = doc.read_text() if doc.exists() else ""
    block = f"{DOC_START}\n{section}\n{DOC_END}"
    if DOC_START in text and DOC_END in text:
        head, rest = text.split(DOC_START, 1)
        tail = rest.split(DOC_END, 1)[1]
        text = head + block + tail
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    doc.write_text(text)
