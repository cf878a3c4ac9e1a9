"""A real Prometheus server for end-to-end tests: Debian's ``prometheus`` package, started on a
free loopback port with one scrape job ("aibridge") and read back through its HTTP API.

Without the binary the tests that need it are skipped on a workstation and fail in CI (``CI``
set), where it must run (``apt-get install -y prometheus``).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import orjson

from tests.harness import required_program

__all__ = [
    "Prometheus",
    "PrometheusError",
    "Sample",
    "find_prometheus",
    "free_port",
    "prometheus_binary",
]

FALLBACK = "/usr/bin/prometheus"
JOB = "aibridge"
# (labels, value) of one series of an instant vector; a scalar has no labels.
Sample = tuple[dict[str, str], float]

# Loopback only: no HTTP(S)_PROXY from the environment, neither here nor in the server.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
_REQUEST_TIMEOUT = 30.0  # one API call on a loaded machine; never asserted as a duration
_READY_TIMEOUT = 2.0  # a timed-out poll is repeated; only the deadline of start() counts
_POLL = 0.1
_START_ATTEMPTS = 3  # a free port can be taken by someone else before Prometheus binds it


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its API answered with an error."""


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def find_prometheus() -> str | None:
    if found := shutil.which("prometheus"):
        return found
    return FALLBACK if os.access(FALLBACK, os.X_OK) else None


def prometheus_binary() -> str:
    return required_program(find_prometheus(), "Prometheus", "prometheus")


def _epoch(rfc3339: str) -> float:
    # Go writes nanoseconds; fromisoformat keeps microseconds, enough here.
    return datetime.fromisoformat(rfc3339).timestamp()


class Prometheus:
    """``prometheus`` scraping `targets` (``host:port``) every `scrape_interval`, with its
    configuration, data and log in `workdir`."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        targets: Sequence[str],
        *,
        scrape_interval: str = "1s",
        metrics_path: str = "/metrics",
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.scrape_targets = list(targets)
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.config_path = workdir / "prometheus.yml"
        self.data_path = workdir / "data"
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        interval = self.scrape_interval
        return {
            # A scrape may take the whole interval (the default timeout, 10s, is longer).
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.scrape_targets}],
                }
            ],
        }

    def start(self, timeout: float = 60) -> None:
        if self.proc is not None:
            raise PrometheusError("Prometheus is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no quoting rules to get wrong.
        self.config_path.write_bytes(orjson.dumps(self.config(), option=orjson.OPT_INDENT_2))
        deadline = time.monotonic() + timeout
        for _ in range(_START_ATTEMPTS):
            self.port = free_port()
            self._spawn()
            try:
                if self._wait_ready(deadline):
                    return
            except BaseException:
                self.stop()
                raise
            self.stop()
        raise PrometheusError(
            f"Prometheus found no free port in {_START_ATTEMPTS} attempts:\n{self.log_tail()}"
        )

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        args = [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_path}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
        ]
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
            )

    def _wait_ready(self, deadline: float) -> bool:
        """True once GET /-/ready answers 200; False if the port was taken under us."""
        assert self.proc is not None
        while True:
            code = self.proc.poll()
            if code is not None:
                if b"bind: address already in use" in self._log_since_spawn():
                    return False
                raise PrometheusError(f"Prometheus exited with {code} at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise PrometheusError(f"Prometheus was not ready in time:\n{self.log_tail()}")
            try:
                # Short: whoever holds a taken port may accept and never answer.
                with _OPENER.open(f"{self.url}/-/ready", timeout=_READY_TIMEOUT) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while the storage opens
            time.sleep(_POLL)

    def _log_since_spawn(self) -> bytes:
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        """The ``data`` of a successful API answer; PrometheusError with its error otherwise."""
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with _OPENER.open(url, timeout=_REQUEST_TIMEOUT) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            # 400/422/503 carry the same JSON envelope with the reason.
            body = err.read()
            if not body:
                raise PrometheusError(f"GET {path}: HTTP {err.code}") from err
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError as err:
            raise PrometheusError(f"GET {path}: not JSON: {body[:200]!r}") from err
        if answer.get("status") != "success":
            raise PrometheusError(f"{answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[Sample]:
        """An instant query evaluated now: one (labels, value) per series; a scalar is one
        item with no labels."""
        try:
            data = self._api("/api/v1/query", {"query": expr})
        except PrometheusError as err:
            raise PrometheusError(f"query {expr!r}: {err}") from None
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [(item["metric"], float(item["value"][1])) for item in result]
        if kind == "scalar":
            return [({}, float(result[1]))]
        raise PrometheusError(f"query {expr!r}: a {kind}, not an instant vector or a scalar")

    def targets(self) -> list[dict[str, Any]]:
        """The active targets, as /api/v1/targets describes them (labels, scrapeUrl, health,
        lastError, lastScrape, …)."""
        return list(self._api("/api/v1/targets", {"state": "active"})["activeTargets"])

    def wait_scraped_after(self, t: float, timeout: float = 60) -> None:
        """Wait until every configured target has been scraped, healthy, since `t` (epoch
        seconds), so that a query sees what the targets exposed at `t`."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.targets()
            by_instance = {target["labels"].get("instance"): target for target in targets}
            if all(
                (target := by_instance.get(instance)) is not None
                and target["health"] == "up"
                and _epoch(target["lastScrape"]) > t
                for instance in self.scrape_targets
            ) and self._committed_after(t):
                return
            if time.monotonic() > deadline:
                state = "\n".join(
                    f"  {target['scrapeUrl']}: {target['health']}, last scrape "
                    f"{target['lastScrape']}, error: {target['lastError'] or '-'}"
                    for target in targets
                )
                raise TimeoutError(
                    f"not every target of {self.scrape_targets} was scraped up after "
                    f"{t:.3f}:\n{state or '  (no active target yet)'}"
                )
            time.sleep(_POLL)

    def _committed_after(self, t: float) -> bool:
        # A target's lastScrape is reported before the scrape's samples are committed; its
        # `up` sample, stored with them, is the proof they are visible to queries.
        stamps = {
            labels.get("instance"): stamp
            for labels, stamp in self.query(f'timestamp(up{{job="{JOB}"}})')
        }
        return all(stamps.get(instance, -math.inf) >= t for instance in self.scrape_targets)

    def wait_for(
        self, expr: str, predicate: Callable[[list[Sample]], bool], timeout: float = 60
    ) -> list[Sample]:
        """Poll query(expr) until predicate(result) holds; a bad expression raises at once."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} never met the condition; last result: {result!r}")
            time.sleep(_POLL)
