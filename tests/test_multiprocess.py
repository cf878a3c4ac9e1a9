"""Two mitmdump processes write one SQLite file (WAL) at the same time and lose nothing,
from the schema migration of a fresh file to the last row of a busy run."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from pathlib import Path

import httpx
import orjson

from devtools.fake_upstream import FakeUpstream
from tests.harness import TOKENS, Mitmdump, bridge_config, query

SAFETY = 60.0  # upper bound for waits; never asserted as a duration
PER_PROCESS = 60
MODELS = {"fake-text": (0, 0), "fake-tool": (1, 0), "fake-reasoning": (0, 3)}


async def send(url: str, prompts: list[str], user: str) -> None:
    models = list(MODELS)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=SAFETY, limits=limits) as client:

        async def one(i: int, prompt: str) -> None:
            body = {"model": models[i % 3], "input": prompt, "stream": i % 2 == 0}
            r = await client.post(
                url, content=orjson.dumps(body), headers={"authorization": f"Bearer {TOKENS[user]}"}
            )
            assert r.status_code == 200, r.text

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def test_two_processes_one_database(upstream: FakeUpstream, tmp_path: Path) -> None:
    db_path = tmp_path / "shared.db"
    bridges = []
    for name in ("one", "two"):
        workdir = tmp_path / name
        workdir.mkdir()
        bridge = Mitmdump(workdir, bridge_config(upstream.url))
        bridge.db_path = db_path  # passed as aibridge_db at start: both share one file
        bridges.append(bridge)
    # Both start at once on a file that does not exist yet: both try to migrate it.
    starters = [threading.Thread(target=b.start) for b in bridges]
    try:
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join(SAFETY)
        assert all(b.port for b in bridges), [b.log() for b in bridges]

        batches = {
            bridge.url: ([f"{i}-{uuid.uuid4().hex}" for i in range(PER_PROCESS)], user)
            for bridge, user in zip(bridges, ("alice", "bob"), strict=True)
        }

        async def both() -> None:
            await asyncio.gather(
                *(
                    send(f"{url}/openai/v1/responses", prompts, user)
                    for url, (prompts, user) in batches.items()
                )
            )

        asyncio.run(both())
    finally:
        for bridge in bridges:
            bridge.stop()
    assert [b.proc.returncode for b in bridges if b.proc] == [0, 0]

    rows = query(db_path, "select * from interceptions")
    assert len(rows) == 2 * PER_PROCESS
    assert {r["status"] for r in rows} == {"completed"}
    assert Counter(r["initiator_id"] for r in rows) == {"alice": PER_PROCESS, "bob": PER_PROCESS}
    prompts = {r["prompt"] for r in query(db_path, "select prompt from user_prompts")}
    assert prompts == {p for ps, _ in batches.values() for p in ps}
    per_model = Counter(r["model"] for r in rows)
    assert len(query(db_path, "select id from token_usages")) == 2 * PER_PROCESS
    tools = sum(MODELS[m][0] * n for m, n in per_model.items())
    thoughts = sum(MODELS[m][1] * n for m, n in per_model.items())
    assert len(query(db_path, "select id from tool_usages")) == tools
    assert len(query(db_path, "select id from model_thoughts")) == thoughts
    assert query(db_path, "select * from recorder_losses") == []
    # One schema, migrated once.
    migrations = [r["name"] for r in query(db_path, "select name from _migrations")]
    assert len(migrations) == len(set(migrations))
    assert query(db_path, "pragma journal_mode")[0]["journal_mode"] == "wal"
