"""A scraper of the bridge's metrics, as Prometheus would be: GET /metrics once a second, on
a thread of the bench process, while the bridge with metrics on is measured."""

from __future__ import annotations

import gzip
import http.client
import threading
import time
from types import TracebackType

from prometheus_client.openmetrics.parser import text_string_to_metric_families

# What Prometheus 2.x sends: it asks for OpenMetrics first and accepts gzip, so the bridge
# renders and compresses what a real server would make it.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,"
    "application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}


class ScrapeError(RuntimeError):
    pass


class Scraper:
    """``with Scraper(host, port):`` scrapes at once (always once at least) and then every
    ``every`` seconds until the block ends, on a fixed schedule as Prometheus keeps its
    interval (a scrape that overran one is not made up for). ``scrapes`` counts those that
    worked; the first failure is raised when the block ends. ``scrape()`` is one more, e.g.
    to read the counts afterwards."""

    def __init__(self, host: str, port: int, every: float = 1.0, timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        self.every, self.timeout = every, timeout
        self.scrapes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape(self) -> str:
        """One GET /metrics; the exposition, decompressed. ScrapeError unless it is a 200 with
        an OpenMetrics body."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", "/metrics", headers=PROMETHEUS_HEADERS)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ScrapeError(f"GET /metrics: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        if response.status != 200:
            raise ScrapeError(f"GET /metrics: HTTP {response.status}: {body[:200]!r}")
        try:
            if response.getheader("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            text = body.decode()
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ScrapeError(f"GET /metrics: unreadable body: {type(e).__name__}: {e}") from None
        if not text.endswith("# EOF\n"):  # OpenMetrics' end; a cut or a text-format answer
            raise ScrapeError(f"GET /metrics: no OpenMetrics exposition: {text[-200:]!r}")
        return text

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:  # the first scrape even if the block is over before this thread runs
            try:
                self.scrape()
            except ScrapeError as e:
                self.errors.append(str(e))
            else:
                self.scrapes += 1
            now = time.monotonic()
            while next_at <= now:
                next_at += self.every
            if self._stop.wait(next_at - now):
                return

    def __enter__(self) -> Scraper:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if kind is None and self.errors:
            raise ScrapeError(f"{len(self.errors)} scrapes failed, the first: {self.errors[0]}")


def interceptions(exposition: str, status: str) -> float:
    """``aibridge_interceptions_total`` of that status, summed over every other label."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "aibridge_interceptions_total" and sample.labels.get("status") == status
    )
