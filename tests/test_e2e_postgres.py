"""Three bridges, one PostgreSQL audit log, end to end: real ``mitmdump -s addon.py`` processes
on one database of a real PostgreSQL server (tests/postgres_server.py), streamed Responses,
Messages and Chat Completions exchanges from several users at once, and a provider that keeps
every byte it sent, so that what each client received is compared with it byte for byte.

- every exchange is recorded exactly once, for the right user and API, and every client gets
  the whole stream as upstream sent it;
- a clean restart and a crash of PostgreSQL under load cost clients nothing and the log
  nothing (rows wait in each bridge's queue; the health check and the log say so);
- a budget spent through one bridge is refused by the others once they read it back;
- the bridges get the password only from their environment (PGPASSWORD, or ``${VAR}`` in the
  configured URL) and it shows nowhere: their output, the rows, their saved flows.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
import psycopg
import pytest
from psycopg.rows import dict_row

from aibridge.record import schema
from devtools import fake_anthropic, fake_openai_chat, fake_upstream
from tests.harness import LoopbackHTTP, Mitmdump, bridge_config, noon_zone, wait_for
from tests.postgres_server import SUPERUSER, PostgresServer, database_name, postgres_bin

Api = Literal["responses", "messages", "chat"]
APIS: tuple[Api, ...] = ("responses", "messages", "chat")
SAFETY = 30.0  # upper bound for waits and client timeouts; never asserted as a duration
USERS = ("alice", "bob", "carol", "dave")
SPENDER = "spender"
TOKENS = {user: f"{user}-pg-e2e-token-0123456789" for user in (*USERS, SPENDER)}
# Priced by genai-prices: the fake's Responses usage (24 in, 14 out) costs $0.012 with o1-pro,
# so two exchanges spend the budget.
MODEL: dict[Api, str] = {
    "responses": "o1-pro",
    "messages": "claude-sonnet-4-5",
    "chat": "gpt-4.1",
}
SPEND_LIMIT = 0.02
REFRESH = 0.2  # governance.refresh_seconds: how often a bridge reads the others' spend
API_COLUMN: dict[Api, str] = {
    "responses": "responses",
    "messages": "messages",
    "chat": "chat_completions",
}
# The last event of each API's complete stream.
TERMINAL: dict[Api, bytes] = {
    "responses": b"event: response.completed\n",
    "messages": b"event: message_stop\n",
    "chat": b"data: [DONE]\n\n",
}
PASSWORD_VAR = "AIBRIDGE_TEST_PG_PASSWORD"
# The test server runs with synchronous_commit off, so a crash could take back commits the
# bridges were told about: durable commits for every session of these bridges.
DURABLE = "?options=-csynchronous_commit%3Don"
HELD = "held "  # prompts whose streams the provider holds after their first event


# ---- the provider ----------------------------------------------------------------------------


def prompt_of(req: Any) -> str:
    """The prompt of a Responses (``input``), Messages or Chat (last message) request body."""
    if not isinstance(req, dict):
        return ""
    if isinstance(req.get("input"), str):
        return req["input"]
    messages = req.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        if isinstance(content, str):
            return content
    return ""


class RecordingProvider(LoopbackHTTP):
    """The devtools fakes' three APIs on one port, each answer sent as the fakes plan it and
    kept whole under its request's prompt (`sent`), with the number of requests per prompt
    (`seen`). A stream whose prompt starts with HELD stops after its first event until
    `release` is set: an exchange kept in flight across whatever the test does meanwhile."""

    def __init__(self) -> None:
        self.sent: dict[str, bytes] = {}
        self.seen: dict[str, int] = {}
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._calls = itertools.count(1)  # numbers the Messages and Chat calls (their usage)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                path = self.path.split("?", 1)[0]
                prompt = prompt_of(orjson.loads(body))
                with outer._lock:
                    outer.seen[prompt] = outer.seen.get(prompt, 0) + 1
                reply = fake_anthropic.route("POST", path, body, headers, outer._next_call)
                if reply is None:
                    reply = fake_openai_chat.route("POST", path, body, headers, outer._next_call)
                if reply is None:
                    reply = fake_upstream.plan_responses(orjson.loads(body), headers)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.chunks is None:
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(reply.body)))
                    self.end_headers()
                    outer._keep(prompt, reply.body)  # before the client can have it all
                    self.wfile.write(reply.body)
                    return
                self.send_header("content-type", "text/event-stream; charset=utf-8")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                sent = bytearray()
                for n, chunk in enumerate(c for c in reply.chunks if c):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    sent += chunk
                    if n == 0 and prompt.startswith(HELD):
                        outer.release.wait(SAFETY)
                outer._keep(prompt, bytes(sent))  # before the last chunk ends the stream
                self.wfile.write(b"0\r\n\r\n")

        super().__init__(Handler)

    def _next_call(self) -> int:
        with self._lock:
            return next(self._calls)

    def _keep(self, prompt: str, sent: bytes) -> None:
        with self._lock:
            self.sent[prompt] = sent


# ---- the database ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Database:
    url: str  # without the password
    password: str

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with psycopg.connect(self.url, password=self.password, row_factory=dict_row) as conn:
            return conn.execute(sql, params).fetchall()

    def count(self, table: str) -> int:
        return int(self.rows(f'select count(*) as n from "{table}"')[0]["n"])


# ---- the bridges -----------------------------------------------------------------------------


def with_password_variable(url: str) -> str:
    """`url` with ``${PASSWORD_VAR}`` as its password, for the config to expand."""
    marked = url.replace(f"//{SUPERUSER}@", f"//{SUPERUSER}:${{{PASSWORD_VAR}}}@", 1)
    assert marked != url
    return marked


def trio_config(provider_url: str, database: str, zone: str) -> dict[str, Any]:
    users: list[dict[str, Any]] = [{"id": user, "token": TOKENS[user]} for user in USERS]
    users.append(
        {"id": SPENDER, "token": TOKENS[SPENDER], "limits": {"spend_usd": {"day": SPEND_LIMIT}}}
    )
    config = bridge_config(
        provider_url,
        database=database,
        users=users,
        governance={"time_zone": zone, "refresh_seconds": REFRESH},
    )
    config["providers"].append(
        {
            "name": "anthropic",
            "type": "anthropic",
            "base_url": f"{provider_url}/v1",
            "api_key": "${TEST_PROVIDER_KEY}",
        }
    )
    return config


def password_bridge(
    workdir: Path,
    provider_url: str,
    zone: str,
    *,
    database: str,
    option: str,
    env: dict[str, str],
) -> Mitmdump:
    """A bridge whose database password is what `env` gives it, and nothing else: no
    PGPASSWORD of ours unless `env` has one, no password file. `option` is --set
    aibridge_db ("": the config's `database`)."""
    workdir.mkdir()
    proc = Mitmdump(
        workdir,
        trio_config(provider_url, database, zone),
        env={**env, "PGPASSFILE": str(workdir / "no-pgpass")},
        extra_args=["-w", str(workdir / "flows.mitm")],
    )
    if "PGPASSWORD" not in env:
        proc.env.pop("PGPASSWORD", None)
    proc.db_path = option  # type: ignore[assignment]  # a URL, or "" for the config's
    return proc


def start_trio(root: Path, provider: RecordingProvider, db: Database, zone: str) -> list[Mitmdump]:
    """Three bridges on `db`, started at once on it (all three migrate a new database), each
    given the password another way: PGPASSWORD with the URL as `database:`; ``${VAR}`` in
    the URL of `database:`; PGPASSWORD with the URL as --set aibridge_db."""
    ways = {
        "pgpassword": (db.url, "", {"PGPASSWORD": db.password}),
        "variable": (with_password_variable(db.url), "", {PASSWORD_VAR: db.password}),
        "option": ("aibridge.db", db.url, {"PGPASSWORD": db.password}),
    }
    bridges = [
        password_bridge(root / name, provider.url, zone, database=database, option=option, env=env)
        for name, (database, option, env) in ways.items()
    ]
    starters = [threading.Thread(target=proc.start) for proc in bridges]
    for thread in starters:  # at once: a start-up is most of a test's time
        thread.start()
    for thread in starters:
        thread.join(SAFETY)
    if not all(proc.port for proc in bridges):
        logs = [proc.log() for proc in bridges]
        for proc in bridges:
            proc.stop()
        raise AssertionError(f"a bridge did not start: {logs}")
    return bridges


def health(bridge: Mitmdump) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{bridge.url}/_aibridge/health", timeout=SAFETY).json()
    return body


# ---- clients ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ask:
    bridge: Mitmdump
    api: Api
    user: str
    prompt: str
    model: str = ""  # MODEL[api] unless given


@dataclass(frozen=True, slots=True)
class Received:
    status: int
    headers: httpx.Headers
    body: bytes


def request_of(ask: Ask) -> tuple[str, dict[str, str], bytes]:
    """URL, headers and body of a streamed request, as the API's SDK sends it."""
    token, model = TOKENS[ask.user], ask.model or MODEL[ask.api]
    chat = [{"role": "user", "content": ask.prompt}]
    if ask.api == "messages":
        headers = {"x-api-key": token, "anthropic-version": "2023-06-01"}
        body = {"model": model, "max_tokens": 64, "stream": True, "messages": chat}
        return f"{ask.bridge.url}/anthropic/v1/messages", headers, orjson.dumps(body)
    headers = {"authorization": f"Bearer {token}"}
    if ask.api == "responses":
        body = {"model": model, "input": ask.prompt, "stream": True}
        return f"{ask.bridge.url}/openai/v1/responses", headers, orjson.dumps(body)
    body = {"model": model, "stream": True, "messages": chat}
    return f"{ask.bridge.url}/openai/v1/chat/completions", headers, orjson.dumps(body)


def send(ask: Ask, first: threading.Event | None = None) -> Received:
    """One exchange, its answer read to the end as raw bytes; `first` is set once the first
    of them arrived."""
    url, headers, body = request_of(ask)
    headers["content-type"] = "application/json"
    received = bytearray()
    with httpx.stream("POST", url, content=body, headers=headers, timeout=SAFETY) as response:
        for piece in response.iter_raw():
            received += piece
            if first is not None:
                first.set()
    return Received(response.status_code, response.headers, bytes(received))


def send_all(asks: list[Ask]) -> dict[str, Received]:
    """`asks` from a dozen threads at once."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(asks), 12))) as pool:
        return {ask.prompt: got for ask, got in zip(asks, pool.map(send, asks), strict=True)}


def a_round(bridges: list[Mitmdump], label: str) -> list[Ask]:
    """One exchange per bridge and API (9), the users taking turns, prompts of their own."""
    run = uuid.uuid4().hex[:8]
    return [
        Ask(bridge, api, USERS[n % len(USERS)], f"{label} {run}: {api} via bridge {n // 3}")
        for n, (bridge, api) in enumerate(itertools.product(bridges, APIS))
    ]


def assert_delivered(
    provider: RecordingProvider, asks: list[Ask], got: dict[str, Received]
) -> None:
    """Each client got 200 and the complete stream, byte for byte as the provider sent it,
    which saw each request once."""
    assert sorted(got) == sorted(ask.prompt for ask in asks)
    for ask in asks:
        received = got[ask.prompt]
        assert received.status == 200, (ask.prompt, received.body[:300])
        assert provider.seen.get(ask.prompt) == 1, ask.prompt
        assert received.body == provider.sent[ask.prompt], ask.prompt
        assert TERMINAL[ask.api] in received.body, ask.prompt


_LOGGED = """
select p.prompt, i.id, i.initiator_id, i.api, i.status, i.http_status,
       (select count(*) from token_usages t where t.interception_id = i.id) as usages,
       (select count(*) from user_prompts q where q.interception_id = i.id) as prompts
from user_prompts p join interceptions i on i.id = p.interception_id
where p.prompt = any(%s)
"""


def assert_logged_once(db: Database, asks: list[Ask]) -> None:
    """Each exchange is one finished interception, of its user and API, with one prompt
    and one usage row; nothing was lost."""
    prompts = [ask.prompt for ask in asks]

    def settled() -> list[dict[str, Any]] | None:
        rows = db.rows(_LOGGED, (prompts,))
        done = [r for r in rows if r["status"] != "in_progress" and r["usages"] > 0]
        return rows if len(done) >= len(prompts) else None

    rows = wait_for(settled, SAFETY)
    assert rows, f"not every exchange was recorded: {db.rows(_LOGGED, (prompts,))}"
    assert len(rows) == len(prompts)  # one prompt row per exchange
    assert len({r["id"] for r in rows}) == len(prompts)  # one interception each
    found = {
        r["prompt"]: (r["initiator_id"], r["api"], r["status"], r["http_status"], r["usages"])
        for r in rows
    }
    assert found == {a.prompt: (a.user, API_COLUMN[a.api], "completed", 200, 1) for a in asks}
    assert all(r["prompts"] == 1 for r in rows)
    assert db.rows("select * from recorder_losses") == []


def assert_password_nowhere(password: str, bridges: list[Mitmdump], db: Database) -> None:
    """Not in any bridge's output, config file or saved flows, nor in any row of any table.
    (Checked as names of places, so that a failure does not print the password.)"""
    places = {f"output of {b.workdir.name}": b.log_path.read_bytes() for b in bridges}
    places |= {f"config of {b.workdir.name}": b.config_path.read_bytes() for b in bridges}
    for bridge in bridges:
        flows = bridge.workdir / "flows.mitm"
        places[f"flows of {bridge.workdir.name}"] = flows.read_bytes() if flows.exists() else b""
    for table in (*schema.WRITABLE_TABLES, schema.MIGRATIONS_TABLE):
        text = db.rows(f"select coalesce(string_agg(t::text, chr(10)), '') as x from \"{table}\" t")
        places[f"table {table}"] = text[0]["x"].encode()
    secret = password.encode()
    assert [place for place, content in places.items() if secret in content] == []
    assert all(b.log_path.stat().st_size > 0 for b in bridges)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def provider() -> Iterator[RecordingProvider]:
    with RecordingProvider() as server:
        yield server


@pytest.fixture(scope="module")
def zone() -> str:
    return noon_zone()  # a daily budget cannot reset while the tests run


@pytest.fixture(scope="module")
def shared(postgres_server: PostgresServer) -> Iterator[Database]:
    """A database of this module's on the session's server, for the bridges of `trio`."""
    name = database_name("e2e_postgres_trio")
    url = postgres_server.create_database(name)
    try:
        yield Database(url, postgres_server.password)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(scope="module")
def trio(
    provider: RecordingProvider,
    shared: Database,
    zone: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[Mitmdump]]:
    bridges = start_trio(tmp_path_factory.mktemp("trio"), provider, shared, zone)
    try:
        yield bridges
    finally:
        for proc in bridges:
            proc.stop()


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, to restart or crash without touching the others."""
    with PostgresServer(postgres_bin()) as server:
        yield server


# ---- 1. concurrent streams through three bridges ---------------------------------------------


def test_concurrent_streams_through_three_bridges_are_each_recorded_once(
    trio: list[Mitmdump], provider: RecordingProvider, shared: Database
) -> None:
    run = uuid.uuid4().hex[:8]
    # Users outermost in the list: the first dozen to run at once already mix users,
    # bridges and APIs.
    asks = [
        Ask(bridge, api, user, f"{user} {run}: {api} via bridge {n}, turn {turn}")
        for turn in range(2)
        for n, bridge in enumerate(trio)
        for api in APIS
        for user in USERS
    ]
    got = send_all(asks)
    assert_delivered(provider, asks, got)
    assert_logged_once(shared, asks)
    assert_password_nowhere(shared.password, trio, shared)


# ---- 2. PostgreSQL restarted or crashed under load -------------------------------------------


@pytest.mark.parametrize("outage", ["restart", "crash"])
def test_a_database_outage_costs_clients_nothing_and_the_log_nothing(
    outage: str,
    own_server: PostgresServer,
    provider: RecordingProvider,
    zone: str,
    tmp_path: Path,
) -> None:
    provider.release.clear()
    db = Database(own_server.create_database("audit") + DURABLE, own_server.password)
    bridges = start_trio(tmp_path, provider, db, zone)
    asks: list[Ask] = []
    got: dict[str, Received] = {}
    pool = ThreadPoolExecutor(max_workers=9)
    try:
        before = a_round(bridges, "before")
        got |= send_all(before)
        assert_logged_once(db, before)  # written before the outage
        asks += before
        # Streams in flight on every bridge across the outage: begun before, ended after.
        held = a_round(bridges, f"{HELD}{outage}")
        firsts = {ask.prompt: threading.Event() for ask in held}
        pending: dict[str, Future[Received]] = {
            ask.prompt: pool.submit(send, ask, firsts[ask.prompt]) for ask in held
        }
        assert all(first.wait(SAFETY) for first in firsts.values())
        asks += held
        if outage == "crash":
            own_server.kill()
            # Whole exchanges while the database is down: clients never wait for it.
            during = a_round(bridges, "while down")
            got |= send_all(during)
            asks += during
            for bridge in bridges:
                state = wait_for(lambda b=bridge: health(b)["database"]["state"] == "retrying")
                assert state, health(bridge)
                assert health(bridge)["status"] == "degraded"
            own_server.start()
        else:
            # Exchanges beside the restart; whether they meet its downtime is up to timing.
            with ThreadPoolExecutor(max_workers=1) as side:
                restarted = side.submit(own_server.restart)
                during = a_round(bridges, "while restarting")
                got |= send_all(during)
                asks += during
                restarted.result(SAFETY)
        provider.release.set()
        got |= {prompt: future.result(SAFETY) for prompt, future in pending.items()}
        after = a_round(bridges, "after")
        got |= send_all(after)
        asks += after
        assert_logged_once(db, asks)
        for bridge in bridges:
            assert wait_for(lambda b=bridge: health(b)["status"] == "ok", SAFETY), health(bridge)
    finally:
        provider.release.set()
        pool.shutdown()
        for proc in bridges:
            proc.stop()
    assert [proc.proc.returncode for proc in bridges if proc.proc] == [0, 0, 0]
    assert all((proc.workdir / "flows.mitm").stat().st_size > 0 for proc in bridges)
    assert_delivered(provider, asks, got)
    # Exactly these exchanges, once each, in the whole database.
    counts = {t: db.count(t) for t in ("interceptions", "user_prompts", "token_usages")}
    assert counts == dict.fromkeys(counts, len(asks))
    assert db.rows("select * from recorder_losses") == []
    # Each bridge's writer said it was refused, then that it got through.
    for bridge in bridges:
        log = bridge.log()
        refused = log.find("audit database refused a batch")
        assert 0 <= refused < log.find("audit database accepted the batch after"), log
    assert_password_nowhere(own_server.password, bridges, db)


# ---- 3. one budget across bridges ------------------------------------------------------------


def test_a_budget_spent_through_one_bridge_is_refused_by_the_others(
    trio: list[Mitmdump], provider: RecordingProvider, shared: Database
) -> None:
    a, *others = trio
    probes = itertools.count()

    def probe(bridge: Mitmdump) -> int:
        """A request of the spender that costs nothing when let through (the fake's 429)."""
        ask = Ask(bridge, "responses", SPENDER, f"probe {next(probes)}", model="fake-429")
        return send(ask).status

    def spent() -> float:
        sql = (
            "select coalesce(sum(t.estimated_cost_usd), 0) as usd from token_usages t "
            "join interceptions i on i.id = t.interception_id where i.initiator_id = %s"
        )
        return float(shared.rows(sql, (SPENDER,))[0]["usd"])

    assert [probe(bridge) for bridge in others] == [429, 429]  # let through, for now
    spending: list[Ask] = []
    while spent() < SPEND_LIMIT:
        assert len(spending) < 6, f"{len(spending)} exchanges did not spend {SPEND_LIMIT}"
        ask = Ask(a, "responses", SPENDER, f"spender spends, exchange {len(spending)}")
        spending.append(ask)
        assert_delivered(provider, [ask], {ask.prompt: send(ask)})
        assert_logged_once(shared, spending)
    assert len(spending) >= 2
    assert probe(a) == 403  # A counts its own exchanges
    # The others learn A's spend from PostgreSQL within a few of their reads.
    for bridge in others:
        assert wait_for(lambda b=bridge: probe(b) == 403, SAFETY), bridge.log()
    refused = [
        Ask(bridge, api, SPENDER, f"spender refused by bridge {n + 1}, {api}")
        for n, bridge in enumerate(others)
        for api in APIS
    ]
    for ask in refused:
        got = send(ask)
        assert got.status == 403, got.body
        assert got.headers["x-aibridge-limit"] == "spend_usd.day"
        body = orjson.loads(got.body)
        if ask.api == "messages":
            assert body["type"] == "error"  # Anthropic's shape
        error = body["error"]
        assert error["type"] == "permission_error"
        assert "the daily spend budget of user spender is used up" in error["message"]
        assert ask.prompt not in provider.seen  # nothing reached the provider
    sql = (
        "select p.prompt, i.status, i.http_status, i.metadata from interceptions i "
        "join user_prompts p on p.interception_id = i.id where p.prompt = any(%s)"
    )

    def recorded() -> list[dict[str, Any]] | None:
        rows = shared.rows(sql, ([ask.prompt for ask in refused],))
        return rows if len(rows) == len(refused) else None

    rows = wait_for(recorded, SAFETY)
    assert rows, "the refusals were not recorded"
    assert {(r["status"], r["http_status"], r["metadata"]["limit"]["limit"]) for r in rows} == {
        ("rejected", 403, "spend_usd.day")
    }
    # Another person is not held to the spender's budget.
    other = Ask(others[0], "messages", "alice", "alice while the spender is refused")
    assert_delivered(provider, [other], {other.prompt: send(other)})


# ---- 4. the password -------------------------------------------------------------------------

WRONG_PASSWORDS = [
    pytest.param("variable", "wrong-pass-7Hq2xK", id="wrong-in-variable"),
    pytest.param("variable", "wr%40ng%3Apass%2F7Hq2", id="percent-encoded-in-variable"),
    pytest.param("pgpassword", "wrong-pass-in-env-9Zt", id="wrong-in-PGPASSWORD"),
    pytest.param("pgpassword", "", id="none-at-all"),
]


@pytest.mark.parametrize(("way", "password"), WRONG_PASSWORDS)
def test_a_bridge_without_the_right_password_stops_and_shows_none(
    shared: Database,
    provider: RecordingProvider,
    zone: str,
    tmp_path: Path,
    way: str,
    password: str,
) -> None:
    if way == "variable":
        database, env = with_password_variable(shared.url), {PASSWORD_VAR: password}
    else:
        database, env = shared.url, {"PGPASSWORD": password} if password else {}
    proc = password_bridge(
        tmp_path / "bridge", provider.url, zone, database=database, option="", env=env
    )
    try:
        # mitmdump may say it listens before it exits on the error: either way, it exits.
        with contextlib.suppress(RuntimeError):
            proc.start()
        assert proc.proc is not None
        assert proc.proc.wait(SAFETY) != 0
    finally:
        proc.stop()
    output = proc.log()
    # As written in the URL and as decoded from it.
    shown = [s for s in {password, urllib.parse.unquote(password)} if s and s in output]
    assert shown == []
    assert "AI Bridge cannot open its database" in output
    expected = "password authentication failed" if password else "no password supplied"
    assert expected in output
    if way == "variable":
        assert f"postgresql://{SUPERUSER}:***@127.0.0.1" in output
