"""The processes a benchmark run starts: the upstream and one mitmdump per variant.

Every mitmdump gets the same flags; variants differ only in the scripts they load (and the
bridge's two options), so a ratio measures the addon and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devtools.mitmdump_process import ADDON, MITMDUMP, REPO, local_bridge_config

BENCH = Path(__file__).resolve().parent
STREAM_ONLY = BENCH / "stream_only.py"
LAG_PROBE = BENCH / "lagprobe.py"
BURST = BENCH / "burst.py"

TOKEN = "bench-personal-token-alice"
PROVIDER_KEY = "sk-bench-provider-key-0123456789"
_LISTENING = re.compile(rb"listening at [\d.]+:(\d+)")
# The bridge's start-up line for its metrics server (aibridge/bridge.py), the real port of :0.
_METRICS_AT = re.compile(rb"AI Bridge: metrics on http://[^\s/]+:(\d+)/metrics")
_STARTUP_FAILED = b"Error logged during startup"


# Where Claude Code sends its Messages calls with ANTHROPIC_BASE_URL=http://<bridge>/anthropic
# (README, Client set-up): the route prefix of the bridge's anthropic provider, and always
# ?beta=true. The baselines forward the path as it is; the bench upstream serves both.
MESSAGES_PATH = "/anthropic/v1/messages?beta=true"
# Where OpenCode sends its Chat Completions calls with an @ai-sdk/openai-compatible provider
# whose baseURL is http://<bridge>/openai/v1: the route prefix of the bridge's openai provider.
CHAT_PATH = "/openai/v1/chat/completions"


# The bench user's limits when governance is measured (DESIGN §9): every kind a request is
# checked against, each far above what a run uses (a full run sends some tens of thousands
# of requests of 38 tokens each, priced at nothing), so none refuses or warns and the checks
# cost what they cost a person well within their budgets.
BENCH_USER_LIMITS: dict[str, Any] = {
    "spend_usd": {"day": 100_000, "month": 1_000_000},
    "tokens": {"day": 10**12},
    "requests_per_minute": 10**8,
    "concurrent_requests": 10_000,
}
# ... and a group whose members share budgets of their own, checked on every request too.
BENCH_GROUPS: list[dict[str, Any]] = [
    {
        "name": "bench-team",
        "members": ["alice"],
        "shared_limits": {
            "spend_usd": {"day": 1_000_000, "month": 10**7},
            "tokens": {"day": 10**13},
        },
    }
]


def bridge_config(upstream_url: str, *, limits: bool = False, database: str = "") -> dict[str, Any]:
    """The bridge in reverse-proxy mode (DESIGN §1.1) in front of the bench upstream, with
    an OpenAI (Responses and Chat Completions) and an Anthropic provider both there, so each
    API is measured against the same mitmdump baselines. `limits`: the bench user has
    budgets and limits (``BENCH_USER_LIMITS``, ``BENCH_GROUPS``), otherwise none.
    `database`: the log's address (a PostgreSQL URL), else the default SQLite file."""
    config = local_bridge_config(upstream_url, "${BENCH_PROVIDER_KEY}", {"alice": TOKEN})
    if database:
        config["database"] = database
    config["providers"].append(
        {
            "name": "anthropic",
            "type": "anthropic",
            "base_url": f"{upstream_url}/v1",
            "api_key": "${BENCH_PROVIDER_KEY}",
        }
    )
    if limits:
        config["groups"] = BENCH_GROUPS
        config["users"][0]["limits"] = BENCH_USER_LIMITS
    return config


def _env() -> dict[str, str]:
    # mitmdump loads bench scripts that import the bench package.
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
        "BENCH_PROVIDER_KEY": PROVIDER_KEY,
    }


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class UpstreamProcess:
    """``python -m bench.upstream`` on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.log_path = workdir / "upstream.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> UpstreamProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.upstream"],
                stdout=subprocess.PIPE,
                stderr=log,
                env=_env(),
                cwd=REPO,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("http://") or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"bench upstream did not start:\n{self.log_path.read_text()}")
        self.url = line
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        _stop(self.proc)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()  # the pipe its URL came on; left open it warns at exit


@dataclass
class Proxy:
    """One mitmdump variant in reverse mode in front of the upstream."""

    name: str
    workdir: Path
    upstream_url: str
    scripts: list[Path] = field(default_factory=list)
    bridge: bool = False  # load addon.py with its own config and database
    limits: bool = False  # the bridge's config gives the bench user budgets and limits
    metrics: bool = False  # the bridge serves Prometheus metrics, on a free loopback port
    # The bridge's `database` in its config (a PostgreSQL URL without password; PGPASSWORD
    # goes in `env`), instead of its own SQLite file given with --set aibridge_db.
    database: str = ""
    options: dict[str, str] = field(default_factory=dict)  # --set for the scripts' options
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int = 0  # where GET /metrics is, once listening (with metrics)
    sent: int = 0  # requests the bench has sent it, warm-up ones included (bench/run.py)

    @property
    def log_path(self) -> Path:
        return self.workdir / "mitmdump.log"

    @property
    def db_path(self) -> Path:
        return self.workdir / "aibridge.db"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def args(self) -> list[str]:
        args = [
            str(MITMDUMP),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--mode",
            f"reverse:{self.upstream_url}",
            "--set",
            f"confdir={self.workdir / 'mitmproxy-conf'}",
            # One log line per flow would cost more than some of what is measured.
            "--set",
            "flow_detail=0",
        ]
        for script in self.scripts:
            args += ["-s", str(script)]
        if self.bridge:
            config = self.workdir / "config.yaml"
            config.write_text(
                yaml.safe_dump(
                    bridge_config(self.upstream_url, limits=self.limits, database=self.database)
                )
            )
            args += ["-s", str(ADDON), "--set", f"aibridge_config={config}"]
            if not self.database:
                args += ["--set", f"aibridge_db={self.db_path}"]
        if self.metrics:
            args += ["--set", "aibridge_metrics=127.0.0.1:0"]
        for name, value in self.options.items():
            args += ["--set", f"{name}={value}"]
        return args

    def launch(self) -> None:
        """Start without waiting; ``wait_listening`` finishes the start (so several start
        in parallel)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**_env(), **self.env},
                cwd=self.workdir,
            )

    def wait_listening(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()
            if _STARTUP_FAILED in text or self.proc.poll() is not None:
                break
            found = _LISTENING.search(text)
            metrics_at = _METRICS_AT.search(text) if self.metrics else None
            if found and (metrics_at or not self.metrics):
                # mitmdump listens before it notices an error its addons logged at start-up.
                time.sleep(0.3)
                if _STARTUP_FAILED in self.log_path.read_bytes() or self.proc.poll() is not None:
                    break
                self.port = int(found.group(1))
                if metrics_at is not None:
                    self.metrics_port = int(metrics_at.group(1))
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mitmdump ({self.name}) did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        _stop(self.proc)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB (Linux)."""
    return _status_field(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return _status_field(pid, "VmHWM")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {name}")


def _process_cpu_clock(pid: int) -> int:
    """The clock id of another process's CPU time (glibc's clock_getcpuclockid: the pid,
    inverted, and CPUCLOCK_SCHED)."""
    return ((~pid) << 3) | 2


def cpu_seconds(pid: int) -> float:
    """CPU time of a process so far, every thread it ever had included.

    From the process's CPU clock (nanoseconds, Linux), which keeps the time of threads that
    have ended: the metrics server answers each scrape on a thread of its own that is gone
    by the time a load is over. Else the live threads' schedstat (also nanoseconds), and
    last /proc/PID/stat, which counts whole clock ticks (10 ms), too coarse for a short run.
    """
    with contextlib.suppress(OSError, OverflowError):
        return time.clock_gettime(_process_cpu_clock(pid))
    total_ns = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total_ns += int((task / "schedstat").read_text().split()[0])
    except OSError:
        total_ns = 0
    if total_ns:
        return total_ns / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[bytes]:
    """The fields of a /proc stat file after the command name (which may hold spaces):
    [0] is the state, [1] the parent's pid, [11] and [12] user and system time, [13] and
    [14] those of the children it has waited for, all in clock ticks."""
    return path.read_bytes().rsplit(b")", 1)[1].split()


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """CPU time of one thread of a process: its schedstat (nanoseconds), else its stat
    (whole clock ticks, 10 ms, too coarse for a load of a second)."""
    task = Path(f"/proc/{pid}/task/{tid}")
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    fields = _stat_fields(task / "stat")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_cpu_seconds(pid: int) -> float:
    """CPU time of a process, ended threads included (its CPU clock), else from its stat
    (a zombie's, say)."""
    with contextlib.suppress(OSError, OverflowError):
        return time.clock_gettime(_process_cpu_clock(pid))
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live children of a process: from its threads' ``children`` lists where the
    kernel has them (CONFIG_PROC_CHILDREN), else by the parent pid of every process."""
    found: list[int] = []
    if Path(f"/proc/{pid}/task/{pid}/children").exists():
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                found += [int(c) for c in (task / "children").read_text().split()]
        return found
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):  # gone meanwhile
                if int(_stat_fields(entry / "stat")[1]) == pid:
                    found.append(int(entry.name))
    return found


# What the argv of the bridge's writer, once a child process of mitmdump, contains
# (``<python> -m aibridge.record.writer_process ...``).
WRITER_PROCESS_ARGV = b"aibridge.record.writer_process"


def writer_process_cpu_seconds(pid: int) -> float:
    """CPU time of the writer processes of a mitmdump: its live children whose argv names
    the writer, and every child it has waited for (a writer that ended, restarted or not;
    no other child is ever started). 0 while the writer is a thread of mitmdump."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    total = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    for child in child_pids(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):  # ended meanwhile
            if WRITER_PROCESS_ARGV in Path(f"/proc/{child}/cmdline").read_bytes():
                total += _process_cpu_seconds(child)
    return total


@dataclass(frozen=True, slots=True)
class CpuSplit:
    """CPU seconds of a mitmdump, by where they are spent (a sample, or the difference of
    two): its main thread, the event loop every hook runs on; its other threads (the
    bridge's SQLite writer thread, mitmproxy's own, a metrics scrape's); its writer child
    processes. ``total`` is what a request costs the machine, wherever the writer runs."""

    loop: float
    threads: float
    writer_processes: float

    @property
    def total(self) -> float:
        return self.loop + self.threads + self.writer_processes

    def __sub__(self, other: CpuSplit) -> CpuSplit:
        return CpuSplit(
            self.loop - other.loop,
            self.threads - other.threads,
            self.writer_processes - other.writer_processes,
        )


def cpu_split(pid: int) -> CpuSplit:
    process = cpu_seconds(pid)
    loop = thread_cpu_seconds(pid, pid)  # the main thread's id is the process's
    return CpuSplit(loop, process - loop, writer_process_cpu_seconds(pid))


def wait_idle(pid: int, quiet: float = 0.1, timeout: float = 5.0) -> None:
    """Wait until the process and its writer processes used (almost) no CPU for ``quiet``
    seconds: the bridge's writer has caught up, so its work is billed to the measurement
    that caused it."""
    tick = 1.5 / os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_split(pid).total
        time.sleep(quiet)
        if cpu_split(pid).total - before <= tick:
            return
