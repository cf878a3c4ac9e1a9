"""Budgets and limits end to end (DESIGN §9): the real `openai` and `anthropic` SDKs through a
real mitmdump running addon.py, to the fake upstream, with the refusals read back from the
SQLite file. Spend is what the log prices: genai-prices' list rates of the models used here.

Budgets are daily, counted in an ``Etc/GMT±N`` zone in which it is about noon now, so that no
day ends during a test."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import anthropic
import httpx
import openai
import orjson
import pytest

from devtools.fake_upstream import FakeUpstream, new_id, stream_frames, text_outcome
from tests.harness import LoopbackHTTP, Mitmdump, bridge_config, noon_zone, query, wait_for

Api = Literal["responses", "chat", "messages"]
APIS: tuple[Api, ...] = ("responses", "chat", "messages")
SAFETY = 30.0  # upper bound for waits and client timeouts; never asserted as a duration
STEPS = 12  # at most this many exchanges to spend a budget
# Priced by genai-prices. The fake's Responses usage is the same on every call (24 in, 14
# out: $0.012 with o1-pro); Chat and Messages usage grows with the fake's call count.
MODEL: dict[Api, str] = {
    "responses": "o1-pro",
    "chat": "gpt-4.1",
    "messages": "claude-sonnet-4-5",
}
# Daily spend budgets of the spend-<api> users, a few exchanges each from a fresh fake.
SPEND_LIMIT: dict[Api, float] = {"responses": 0.03, "chat": 0.02, "messages": 0.03}
RPM = 3
WARN_AT = 0.5
WARNED_LIMIT = 0.04
GROUP_LIMIT = 0.02
SHARED_LIMIT = 0.03
PERMISSION_DENIED: dict[Api, type[Exception]] = {
    "responses": openai.PermissionDeniedError,
    "chat": openai.PermissionDeniedError,
    "messages": anthropic.PermissionDeniedError,
}
RATE_LIMITED: dict[Api, type[Exception]] = {
    "responses": openai.RateLimitError,
    "chat": openai.RateLimitError,
    "messages": anthropic.RateLimitError,
}


def token(user: str) -> str:
    return f"{user}-personal-token"


def user_limits() -> dict[str, dict[str, Any] | None]:
    limits: dict[str, dict[str, Any] | None] = {
        f"spend-{api}": {"spend_usd": {"day": SPEND_LIMIT[api]}} for api in APIS
    }
    limits |= {f"rate-{api}": {"requests_per_minute": RPM} for api in APIS}
    limits |= {
        "one-at-a-time": {"concurrent_requests": 1},
        "warned": {"spend_usd": {"day": WARNED_LIMIT}},
        "ann": None,  # ann and ben: group lab
        "ben": None,
        "cat": None,  # in no group, no limits
    }
    return limits


def users_config(limits: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    users: list[dict[str, Any]] = []
    for user, own in limits.items():
        entry: dict[str, Any] = {"id": user, "token": token(user)}
        if own is not None:
            entry["limits"] = own
        users.append(entry)
    return users


def provider(name: str, kind: str, url: str) -> dict[str, Any]:
    return {"name": name, "type": kind, "base_url": f"{url}/v1", "api_key": "${TEST_PROVIDER_KEY}"}


class HeldStreams(LoopbackHTTP):
    """A Responses provider whose streams send their first two events, then wait until
    `release` is set before the rest: an exchange kept in flight as long as a test needs."""

    def __init__(self) -> None:
        self.release = threading.Event()
        release = self.release

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                req = orjson.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                frames = list(stream_frames(req, new_id("resp"), int(time.time()), text_outcome()))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                self._chunk(b"".join(frames[:2]))
                release.wait(SAFETY)
                self._chunk(b"".join(frames[2:]))
                self.wfile.write(b"0\r\n\r\n")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

        super().__init__(Handler)

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        super().__exit__(*exc)


@pytest.fixture(scope="module")
def zone() -> str:
    return noon_zone()


@pytest.fixture(scope="module")
def metered() -> Iterator[FakeUpstream]:
    """A fake of the spend tests' own: its Chat and Messages usage, numbered by its calls,
    starts at call 1 whatever else the module ran."""
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def held() -> Iterator[HeldStreams]:
    with HeldStreams() as server:
        yield server


@pytest.fixture(scope="module")
def bridge(
    upstream: FakeUpstream,
    metered: FakeUpstream,
    held: HeldStreams,
    zone: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Mitmdump]:
    """One bridge for every scenario but the multi-bridge ones: each test has users of its own."""
    config = bridge_config(
        upstream.url,
        users=users_config(user_limits()),
        groups=[
            {
                "name": "lab",
                "members": ["ann", "ben"],
                "shared_limits": {"spend_usd": {"day": GROUP_LIMIT}},
            }
        ],
        governance={"time_zone": zone, "warn_at": WARN_AT},
    )
    config["providers"] += [
        provider("anthropic", "anthropic", upstream.url),
        provider("metered", "openai", metered.url),
        provider("metered-anthropic", "anthropic", metered.url),
        provider("held", "openai", held.url),
    ]
    with Mitmdump(tmp_path_factory.mktemp("budgets"), config) as proc:
        yield proc


# ---- clients -----------------------------------------------------------------------------


def openai_sdk(bridge: Mitmdump, user: str, name: str = "openai") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{bridge.url}/{name}/v1", api_key=token(user), max_retries=0, timeout=SAFETY
    )


def anthropic_sdk(bridge: Mitmdump, user: str, name: str = "anthropic") -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"{bridge.url}/{name}", api_key=token(user), max_retries=0, timeout=SAFETY
    )


def ask(
    bridge: Mitmdump, api: Api, user: str, prompt: str, *, stream: bool, fake: str = ""
) -> None:
    """One exchange through the SDK of `api`, read to its end; a refusal raises the SDK's
    error. `fake`: "metered" for the spend tests' own fake, else the module's."""
    prefix = f"{fake}-" if fake else ""
    if api == "messages":
        claude = anthropic_sdk(bridge, user, f"{prefix}anthropic")
        messages: Any = [{"role": "user", "content": prompt}]
        if stream:
            with claude.messages.stream(
                model=MODEL[api], max_tokens=64, messages=messages
            ) as events:
                assert events.get_final_message().content
        else:
            assert claude.messages.create(
                model=MODEL[api], max_tokens=64, messages=messages
            ).content
        return
    sdk = openai_sdk(bridge, user, fake or "openai")
    if api == "responses":
        if stream:
            with sdk.responses.create(model=MODEL[api], input=prompt, stream=True) as events:
                assert [e.type for e in events][-1] == "response.completed"
        else:
            assert sdk.responses.create(model=MODEL[api], input=prompt).output_text
        return
    chat: Any = [{"role": "user", "content": prompt}]
    if stream:
        with sdk.chat.completions.create(model=MODEL[api], messages=chat, stream=True) as chunks:
            assert [c.usage for c in chunks][-1] is not None
    else:
        assert sdk.chat.completions.create(model=MODEL[api], messages=chat).choices


# ---- the log -----------------------------------------------------------------------------


def settled(db: Path, prompt: str) -> dict[str, Any]:
    """The finished exchange of `prompt` and its usage row, once the log has both: then the
    bridge has counted its cost (and given back its slot)."""
    sql = (
        "select i.id, i.initiator_id, i.status, t.estimated_cost_usd, t.price_source, "
        "t.priced_model from interceptions i "
        "join user_prompts p on p.interception_id = i.id "
        "join token_usages t on t.interception_id = i.id "
        "where p.prompt = ? and i.ended_at is not null"
    )
    rows = wait_for(lambda: query(db, sql, (prompt,)), SAFETY)
    assert rows, f"no finished exchange with usage for {prompt!r}"
    return rows[0]


def refused(db: Path, prompt: str) -> dict[str, Any]:
    """The record of a refused request, found by its prompt; `limit` is its metadata's."""
    sql = (
        "select i.* from interceptions i join user_prompts p on p.interception_id = i.id "
        "where p.prompt = ?"
    )
    rows = wait_for(lambda: query(db, sql, (prompt,)), SAFETY)
    assert rows, f"no record of the refused request {prompt!r}"
    (row,) = rows
    row["limit"] = orjson.loads(row["metadata"]).get("limit")
    return row


def spent(db: Path, *users: str) -> float:
    """What the log says these users spent (every exchange of these tests is today's)."""
    marks = ", ".join("?" * len(users))
    sql = (
        "select coalesce(sum(t.estimated_cost_usd), 0) as usd from token_usages t "
        f"join interceptions i on i.id = t.interception_id where i.initiator_id in ({marks})"
    )
    return float(query(db, sql, users)[0]["usd"])


def local_days(zone: str) -> tuple[str, str]:
    """Today and tomorrow in `zone`: the day a budget counts and the one it resets at."""
    today = datetime.now(ZoneInfo(zone)).date()
    return today.isoformat(), (today + timedelta(days=1)).isoformat()


def spend_to_limit(
    bridge: Mitmdump,
    api: Api,
    user: str,
    limit: float,
    *,
    counted: tuple[str, ...] = (),
    fake: str = "",
) -> int:
    """Exchanges of `user` while the spend the log holds (of `counted`, default the user) is
    under `limit`: each must go through. The number of them."""
    counted = counted or (user,)
    done = 0
    while spent(bridge.db_path, *counted) < limit:
        assert done < STEPS, f"{done} exchanges did not spend {limit}"
        prompt = f"{user} spends, exchange {done}"
        ask(bridge, api, user, prompt, stream=done % 2 == 0, fake=fake)
        row = settled(bridge.db_path, prompt)
        assert (row["initiator_id"], row["status"]) == (user, "completed")
        if done == 0:
            assert (row["price_source"], row["priced_model"]) == ("genai-prices", MODEL[api])
            assert row["estimated_cost_usd"] > 0
        done += 1
    return done


def assert_spend_refusal(
    error: Exception, db: Path, prompt: str, zone: str, *, budget: str, limit: float, used: float
) -> dict[str, Any]:
    """A 403 naming the budget, what was used of it and when it resets; recorded as such."""
    assert isinstance(error, openai.APIStatusError | anthropic.APIStatusError)
    today, tomorrow = local_days(zone)
    text = str(error)
    assert f"{budget} is used up (${used:,.2f} of ${limit:,.2f} since {today} 00:00 {zone})" in text
    assert f"until it resets at {tomorrow} 00:00 {zone}" in text
    assert error.status_code == 403
    assert "retry-after" not in error.response.headers
    assert error.response.headers["x-aibridge-limit"] == "spend_usd.day"
    row = refused(db, prompt)
    assert (row["status"], row["http_status"]) == ("rejected", 403)
    assert row["limit"]["limit"] == "spend_usd.day"
    assert row["limit"]["limit_value"] == limit
    assert row["limit"]["used"] == pytest.approx(used, abs=1e-6)  # kept to 6 decimals
    return row


# ---- 1. a person's daily spend budget ------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_daily_spend_budget_refuses_once_spent(
    bridge: Mitmdump, metered: FakeUpstream, zone: str, api: Api
) -> None:
    user, limit = f"spend-{api}", SPEND_LIMIT[api]
    # Streamed and buffered exchanges go through while the spend is under the budget.
    assert spend_to_limit(bridge, api, user, limit, fake="metered") >= 2
    used = spent(bridge.db_path, user)
    received = len(metered.requests)
    for stream in (True, False):
        prompt = f"{user} over budget, {'streamed' if stream else 'buffered'}"
        with pytest.raises(PERMISSION_DENIED[api]) as caught:
            ask(bridge, api, user, prompt, stream=stream, fake="metered")
        budget = f"the daily spend budget of user {user}"
        row = assert_spend_refusal(
            caught.value, bridge.db_path, prompt, zone, budget=budget, limit=limit, used=used
        )
        assert row["initiator_id"] == user
        assert (row["limit"]["scope"], row["limit"]["owner"]) == ("user", user)
    # Neither refused request reached the provider.
    assert len(metered.requests) == received


# ---- 2. requests per minute and concurrency ------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_burst_over_requests_per_minute_gets_429(
    bridge: Mitmdump, upstream: FakeUpstream, api: Api
) -> None:
    user = f"rate-{api}"
    for i in range(RPM):
        ask(bridge, api, user, f"{user} within the rate, {i}", stream=i % 2 == 1)
    received = len(upstream.requests)
    for stream in (False, True):
        prompt = f"{user} over the rate, {'streamed' if stream else 'buffered'}"
        with pytest.raises(RATE_LIMITED[api]) as caught:
            ask(bridge, api, user, prompt, stream=stream)
        error = caught.value
        assert isinstance(error, openai.APIStatusError | anthropic.APIStatusError)
        wait = error.response.headers["retry-after"]
        assert wait.isdigit() and 1 <= int(wait) <= 60, wait
        assert error.response.headers["x-aibridge-limit"] == "requests_per_minute"
        assert f"user {user} may send {RPM} requests per minute" in str(error)
        row = refused(bridge.db_path, prompt)
        assert (row["status"], row["http_status"], row["initiator_id"]) == ("rejected", 429, user)
        assert row["limit"]["limit"] == "requests_per_minute"
        # Refused requests do not count: the window still holds the admitted ones.
        assert (row["limit"]["limit_value"], row["limit"]["used"]) == (RPM, RPM)
    assert len(upstream.requests) == received


def test_concurrent_requests_limit_frees_its_slot(
    bridge: Mitmdump, upstream: FakeUpstream, held: HeldStreams
) -> None:
    user, first = "one-at-a-time", "held in flight"
    received = 0
    try:
        with openai_sdk(bridge, user, "held").responses.create(
            model=MODEL["responses"], input=first, stream=True
        ) as events:
            stream = iter(events)
            assert next(stream).type == "response.created"  # in flight, held by the provider
            # Another person is not held up by it.
            ask(bridge, "responses", "cat", "cat while one-at-a-time waits", stream=False)
            received = len(upstream.requests)
            # Every API's request of the same person waits for the slot.
            for api, stream_it in (("responses", False), ("chat", True), ("messages", False)):
                prompt = f"{user} second request, {api}"
                with pytest.raises(RATE_LIMITED[api]) as caught:
                    ask(bridge, api, user, prompt, stream=stream_it)
                error = caught.value
                assert isinstance(error, openai.APIStatusError | anthropic.APIStatusError)
                wait = error.response.headers["retry-after"]
                assert wait.isdigit() and 1 <= int(wait) <= 60, wait
                assert error.response.headers["x-aibridge-limit"] == "concurrent_requests"
                assert f"user {user} may have 1 " in str(error) and "in flight" in str(error)
                row = refused(bridge.db_path, prompt)
                assert (row["status"], row["http_status"]) == ("rejected", 429)
                assert (row["limit"]["limit"], row["limit"]["used"]) == ("concurrent_requests", 1)
            assert len(upstream.requests) == received
            held.release.set()
            assert [e.type for e in stream][-1] == "response.completed"
    finally:
        held.release.set()
    # Once the held exchange is recorded as finished its slot is free again.
    assert settled(bridge.db_path, first)["status"] == "completed"
    for i, stream_it in enumerate((False, True)):
        prompt = f"{user} after the slot was freed, {i}"
        ask(bridge, "responses", user, prompt, stream=stream_it)
        settled(bridge.db_path, prompt)  # a stream gives its slot back once recorded
    assert len(upstream.requests) == received + 2


# ---- 3. several bridges, one log -----------------------------------------------------------


def shared_budget_config(upstream: FakeUpstream, zone: str, refresh: float) -> dict[str, Any]:
    limits = {"spend_usd": {"day": SHARED_LIMIT}}
    return bridge_config(
        upstream.url,
        users=users_config({"shared": limits, "cat": None}),
        governance={"time_zone": zone, "refresh_seconds": refresh},
    )


def test_two_bridges_enforce_one_budget_and_a_restart_seeds_it(
    upstream: FakeUpstream, zone: str, tmp_path: Path
) -> None:
    db = tmp_path / "shared.db"
    budget = "the daily spend budget of user shared"
    bridges = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        proc = Mitmdump(workdir, shared_budget_config(upstream, zone, 0.2))
        proc.db_path = db  # passed as aibridge_db at start: both share one file
        bridges.append(proc)
    a, b = bridges

    def probe(proc: Mitmdump) -> int:
        """A request that costs nothing when let through (the fake answers it 429)."""
        body = {"model": "fake-429", "input": "probe"}
        headers = {"authorization": f"Bearer {token('shared')}"}
        url = f"{proc.url}/openai/v1/responses"
        return httpx.post(url, json=body, headers=headers, timeout=SAFETY).status_code

    with contextlib.ExitStack() as stack:
        for proc in bridges:
            stack.callback(proc.stop)
        starters = [threading.Thread(target=proc.start) for proc in bridges]
        for thread in starters:  # at once: a start-up is most of this test's time
            thread.start()
        for thread in starters:
            thread.join(SAFETY)
        assert a.port and b.port, [proc.log() for proc in bridges]
        assert probe(b) == 429  # B lets the user through: the fake's own 429
        assert spend_to_limit(a, "responses", "shared", SHARED_LIMIT) >= 2
        used = spent(db, "shared")
        with pytest.raises(openai.PermissionDeniedError) as caught:
            ask(a, "responses", "shared", "refused by A", stream=False)
        assert_spend_refusal(
            caught.value, db, "refused by A", zone, budget=budget, limit=SHARED_LIMIT, used=used
        )
        # B has learnt A's spend from the log within a few of its reads.
        assert wait_for(lambda: probe(b) == 403, SAFETY), b.log()
        with pytest.raises(openai.PermissionDeniedError) as caught:
            ask(b, "responses", "shared", "refused by B", stream=True)
        assert_spend_refusal(
            caught.value, db, "refused by B", zone, budget=budget, limit=SHARED_LIMIT, used=used
        )
        ask(b, "responses", "cat", "cat through B", stream=False)  # another person is not
    # A bridge started on the file refuses at once: seeded at start-up, not by a later read.
    workdir = tmp_path / "c"
    workdir.mkdir()
    c = Mitmdump(workdir, shared_budget_config(upstream, zone, 3600))
    c.db_path = db
    received = len(upstream.requests)
    with c:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            ask(c, "responses", "shared", "refused after a restart", stream=True)
        assert_spend_refusal(
            caught.value,
            db,
            "refused after a restart",
            zone,
            budget=budget,
            limit=SHARED_LIMIT,
            used=used,
        )
    assert len(upstream.requests) == received


# ---- 4. the warning header -----------------------------------------------------------------


def test_warning_header_from_warn_at(bridge: Mitmdump, zone: str) -> None:
    user, warning = "warned", "x-aibridge-budget-warning"
    _, tomorrow = local_days(zone)
    headers = {"authorization": f"Bearer {token(user)}"}
    url = f"{bridge.url}/openai/v1/responses"
    warned: list[bool] = []  # stream or not, for each response that carried the warning
    done = 0
    while (used := spent(bridge.db_path, user)) < WARNED_LIMIT:
        assert done < STEPS
        prompt, stream = f"{user} exchange {done}", done % 2 == 0
        body = {"model": MODEL["responses"], "input": prompt, "stream": stream}
        with httpx.stream("POST", url, json=body, headers=headers, timeout=SAFETY) as response:
            response.read()
        assert response.status_code == 200
        if used >= WARN_AT * WARNED_LIMIT:
            assert response.headers[warning] == (
                f"{used / WARNED_LIMIT:.0%} of the daily spend budget of user {user} is used "
                f"(${used:,.2f} of ${WARNED_LIMIT:,.2f}), resets at {tomorrow} 00:00 {zone}"
            )
            warned.append(stream)
        else:
            assert warning not in response.headers
        settled(bridge.db_path, prompt)
        done += 1
    assert done > len(warned) > 0, "some responses under warn_at, some over it"
    assert set(warned) == {True, False}, "streamed and buffered responses both warned"


# ---- 5. a group's shared budget ------------------------------------------------------------


def test_group_shared_budget_stops_every_member(bridge: Mitmdump, zone: str) -> None:
    # ann alone spends what the group lab may spend in a day.
    spend_to_limit(bridge, "responses", "ann", GROUP_LIMIT, counted=("ann", "ben"))
    used = spent(bridge.db_path, "ann", "ben")
    budget = "the daily spend budget of group lab (shared by its members)"
    for user, api, stream in (("ben", "responses", False), ("ben", "messages", True)):
        prompt = f"{user} after ann spent the group's budget, {api}"
        with pytest.raises(PERMISSION_DENIED[api]) as caught:
            ask(bridge, api, user, prompt, stream=stream)
        row = assert_spend_refusal(
            caught.value, bridge.db_path, prompt, zone, budget=budget, limit=GROUP_LIMIT, used=used
        )
        assert row["initiator_id"] == user
        assert (row["limit"]["scope"], row["limit"]["owner"]) == ("group", "lab")
    with pytest.raises(openai.PermissionDeniedError):
        ask(bridge, "chat", "ann", "ann after spending the group's budget", stream=True)
    # Someone outside the group is not held to its budget.
    ask(bridge, "responses", "cat", "cat while lab is out of budget", stream=True)
