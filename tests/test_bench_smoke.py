"""The benchmark's quick mode runs end to end and reports every metric (no timing asserted)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import orjson

from bench.report import METRIC_PATHS, lookup
from tests.harness import REPO


def test_quick_benchmark_reports_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    doc = REPO / "BENCHMARKS.md"
    doc_before = doc.read_bytes() if doc.exists() else None
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    result = orjson.loads(out.read_bytes())
    assert result["mode"] == "quick"
    for path in METRIC_PATHS:
        value = lookup(result["metrics"], path)
        assert isinstance(value, int | float) and not isinstance(value, bool), path
        assert math.isfinite(value), path

    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    assert machine["python"] and machine["mitmproxy"]

    names = [t["name"] for t in result["targets"]]
    assert len(names) == 7 and len(set(names)) == 7
    for target in result["targets"]:
        assert isinstance(target["met"], bool) and target["target"] and target["value"]
        assert target["met"] or target["reason"], target

    # The printed table carries every target; quick mode never rewrites BENCHMARKS.md.
    assert run.stdout.count("| ") > 10 and "Ratio" in run.stdout
    assert (doc.read_bytes() if doc.exists() else None) == doc_before
