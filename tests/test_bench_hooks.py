"""``python -m bench.hooks`` runs, and times exchanges the bridge really bridged and recorded
(no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench import hooks


@pytest.mark.parametrize("kind", hooks.BODIES)
def test_every_exchange_it_times_is_bridged_and_recorded(kind: str, tmp_path: Path) -> None:
    times = hooks.measure(kind, 12, tmp_path)
    summary = times.summary()
    assert summary["exchanges"] == 12 and len(times.per_exchange_us) == 12
    assert set(summary["hook_median_us"]) == set(hooks.HOOKS)
    assert all(len(spans) == 12 for spans in times.per_hook_us.values())
    assert summary["body_bytes"] == len(hooks.request_body(kind))
    e = summary["exchange_us"]
    assert 0 < e["p10"] <= e["p50"] <= e["p90"]
    # Warm-up and timed exchanges alike reached the log: the hooks did their whole work.
    assert summary["recorded"] == hooks.WARMUP + 12


def test_the_command_line_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert hooks.main(["--body", "small", "--exchanges", "10", "--json"]) == 0
    (summary,) = orjson.loads(capsys.readouterr().out)
    assert summary["body"] == "small" and summary["recorded"] == hooks.WARMUP + 10
    with pytest.raises(SystemExit):
        hooks.main(["--exchanges", "3"])
