"""Two hundred concurrent flows from several users through one mitmdump: every row is
attributed to the user who sent it, and no flow's records mix with another's."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from devtools.fake_upstream import FakeUpstream
from tests.harness import PROVIDER_KEY, Mitmdump, bridge_config, query, wait_for

SAFETY = 60.0  # upper bound for waits; never asserted as a duration
FLOWS = 200
USERS = {f"user{n}": f"personal-token-of-user-{n}-{uuid.uuid4().hex[:8]}" for n in range(5)}
MODELS = ("fake-text", "fake-tool", "fake-reasoning", "fake-cached")
RESPONSE_ID = re.compile(rb'"id":"(resp_[0-9a-f]+)"')


@dataclass
class Sent:
    user: str
    marker: str
    session: str
    model: str
    stream: bool
    response_id: str = ""


async def send(client: httpx.AsyncClient, url: str, sent: Sent) -> None:
    body = {"model": sent.model, "input": sent.marker, "stream": sent.stream}
    headers = {"authorization": f"Bearer {USERS[sent.user]}", "session_id": sent.session}
    r = await client.post(url, content=orjson.dumps(body), headers=headers)
    assert r.status_code == 200, r.text
    # The first response id in what this client received: the one its records must carry.
    found = RESPONSE_ID.search(r.content)
    assert found, r.content[:200]
    sent.response_id = found[1].decode()


async def send_all(url: str, batch: list[Sent]) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=SAFETY, limits=limits) as client:
        await asyncio.gather(*(send(client, url, s) for s in batch))


def test_concurrent_flows_from_several_users(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = bridge_config(
        upstream.url, users=[{"id": user, "token": token} for user, token in USERS.items()]
    )
    users = list(USERS)
    batch = [
        Sent(
            user=users[i % len(users)],
            marker=f"concurrency {i} {uuid.uuid4().hex}",
            session=uuid.uuid4().hex,
            model=MODELS[i % len(MODELS)],
            stream=i % 3 != 0,
        )
        for i in range(FLOWS)
    ]
    with Mitmdump(tmp_path, config) as bridge:
        asyncio.run(send_all(f"{bridge.url}/openai/v1/responses", batch))
        ended = "select count(*) as n from interceptions where ended_at is not null"
        assert wait_for(lambda: query(bridge.db_path, ended)[0]["n"] == FLOWS, SAFETY)
    assert len({s.response_id for s in batch}) == FLOWS

    db = bridge.db_path
    rows = {r["client_session_id"]: r for r in query(db, "select * from interceptions")}
    assert len(rows) == FLOWS
    assert len({r["flow_id"] for r in rows.values()}) == FLOWS
    prompts = {r["interception_id"]: r for r in query(db, "select * from user_prompts")}
    usages = Counter(r["interception_id"] for r in query(db, "select * from token_usages"))
    usage_ids = {
        r["interception_id"]: r["response_id"] for r in query(db, "select * from token_usages")
    }
    tools = Counter(r["interception_id"] for r in query(db, "select * from tool_usages"))
    thoughts = Counter(r["interception_id"] for r in query(db, "select * from model_thoughts"))
    for sent in batch:
        row = rows[sent.session]
        assert row["initiator_id"] == sent.user
        assert row["status"] == "completed" and row["http_status"] == 200
        assert (row["model"], row["streaming"]) == (sent.model, int(sent.stream))
        assert row["response_id"] == sent.response_id
        assert prompts[row["id"]]["prompt"] == sent.marker
        assert prompts[row["id"]]["response_id"] == sent.response_id
        assert usages[row["id"]] == 1 and usage_ids[row["id"]] == sent.response_id
        assert tools[row["id"]] == (1 if sent.model == "fake-tool" else 0)
        assert thoughts[row["id"]] == (3 if sent.model == "fake-reasoning" else 0)

    # Upstream saw each request once, with the provider key and no user's token.
    received = [r for r in upstream.requests if r.path == "/v1/responses"]
    markers = Counter(r.json()["input"] for r in received)
    assert all(markers[s.marker] == 1 for s in batch)
    for request in received:
        assert request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        flat = repr(request.headers).encode() + request.body
        assert not any(token.encode() in flat for token in USERS.values())
