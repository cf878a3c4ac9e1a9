"""The offline demo runs as documented, and its saved flows rebuild the same log offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools import demo
from tests.harness import query, replay_flows


def test_demo_and_offline_rebuild(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "demo-run"
    assert demo.main(["--dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "refused: 501 background requests are currently not supported" in printed
    assert "datasette" in printed and "mitmweb" in printed
    assert 'get_weather({"city":"Paris"})' in printed
    tools = query(out_dir / "aibridge.db", "select tool, args from tool_usages")
    assert tools == [{"tool": "get_weather", "args": '{"city":"Paris"}'}]
    every_row = (
        "select id, initiator_id, status, http_status, error, model, streaming, response_id, "
        "credential_kind, credential_hint from interceptions order by id"
    )
    live = query(out_dir / "aibridge.db", every_row)
    completed = [r["initiator_id"] for r in live if r["status"] == "completed"]
    assert sorted(completed) == ["alice", "alice", "alice", "bob", "bob"]
    rejected = [(r["initiator_id"], r["http_status"]) for r in live if r["status"] == "rejected"]
    assert sorted(rejected, key=str) == [("alice", 501), (None, 401)]

    flows = (out_dir / "flows.mitm").read_bytes()
    assert b"demo-alice-" not in flows and b"demo-bob-" not in flows
    assert b"sk-demo-" not in flows

    rebuilt = tmp_path / "rebuilt.db"
    replay_flows(out_dir / "flows.mitm", out_dir / "config.yaml", rebuilt, tmp_path / "conf")
    # The same exchanges, refusals included, with the same ids.
    assert query(rebuilt, every_row) == live
    for table in ("token_usages", "tool_usages", "model_thoughts"):
        assert len(query(rebuilt, f"select * from {table}")) == len(
            query(out_dir / "aibridge.db", f"select * from {table}")
        )
