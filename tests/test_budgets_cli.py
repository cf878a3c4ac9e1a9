"""``python -m aibridge.budgets``: budget use in the terminal, from the config and the log.

In-process runs get a fixed `now`; the subprocess runs use the real clock, in an ``Etc/GMT±N``
zone where it is about noon now, so no period changes while they run. A log in PostgreSQL
(``engine``, ``postgres_url``) gives the same output; what is printed of its URL has no password.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import yaml

from aibridge import budgets
from aibridge.config import load_config
from aibridge.governance.periods import spelled
from aibridge.governance.report import budget_rows, budget_use, configured_user_ids
from aibridge.record import address as addresses
from devtools.mitmdump_process import REPO
from tests.log_engines import engine, with_password
from tests.postgres_server import free_port
from tests.test_budgets_report import CONFIG, NOW, SHA, Exchange, use_of, write_log

__all__ = ["engine"]  # a fixture, imported for this module's tests

PROVIDERS = CONFIG["providers"]
SMALL: dict[str, Any] = {
    "database": "aibridge.db",
    "providers": PROVIDERS,
    "governance": {"time_zone": "Europe/Berlin"},
    "users": [
        {
            "id": "alice",
            "token_sha256": SHA + "1",
            "limits": {"spend_usd": {"day": 20}, "tokens": {"week": 2_000_000}},
        },
        {"id": "bob", "token_sha256": SHA + "2"},
    ],
    "groups": [
        {
            "name": "eng",
            "members": ["alice", "bob"],
            "shared_limits": {"spend_usd": {"month": 2000}},
        }
    ],
}
SMALL_LOG = (
    Exchange("alice", "centralized", "2025-06-04T08:00:00.000000+00:00", ((10.0, 1_000_000),)),
    Exchange("alice", "centralized", "2025-06-04T09:00:00.000000+00:00", ((6.8, 234_567),)),
    Exchange("alice", "byok", "2025-06-04T09:30:00.000000+00:00", ((99.0, 99),)),
    Exchange("bob", "centralized", "2025-06-02T09:00:00.000000+00:00", ((1234.5, 10),)),
)


def setup(
    tmp_path: Path, raw: dict[str, Any] = SMALL, log: tuple[Exchange, ...] = SMALL_LOG
) -> Path:
    """config.yaml and, beside it, the aibridge.db it names; returns the config's path."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    write_log(tmp_path / "aibridge.db", log)
    return config


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, now: datetime | None = NOW
) -> tuple[int, str, str]:
    code = budgets.main(list(argv), now=now)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = setup(tmp_path)
    code, out, err = run(capsys, "--config", str(config))
    assert (code, err) == (0, "")
    db = tmp_path.resolve() / "aibridge.db"
    # Highest share first: 16.80 / 20 = 84%, 1251.30 / 2000 = 63%, 1234567 / 2000000 = 62%.
    assert out.splitlines() == [
        f"Budget use at 2025-06-04 12:00 Europe/Berlin ({db})",
        "scope  owner  budget               spent      limit  share  resets at                       source",  # noqa: E501
        "user   alice  spend per day       $16.80     $20.00    84%  2025-06-05 00:00 Europe/Berlin  users[0].limits",  # noqa: E501
        "group  eng    spend per month  $1,251.30  $2,000.00    63%  2025-07-01 00:00 Europe/Berlin  groups[0].shared_limits",  # noqa: E501
        "user   alice  tokens per week  1,234,567  2,000,000    62%  2025-06-09 00:00 Europe/Berlin  users[0].limits",  # noqa: E501
    ]


def test_json_is_the_canned_query_over_the_config_budgets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = setup(tmp_path)
    code, out, err = run(capsys, "--config", str(config), "--json")
    assert (code, err) == (0, "")
    loaded = load_config(config)
    rows = budget_rows(loaded.governance, configured_user_ids(loaded), NOW)
    conn = sqlite3.connect(tmp_path / "aibridge.db")
    try:
        assert orjson.loads(out) == budget_use(conn, rows)
    finally:
        conn.close()
    assert [(r["owner"], r["budget"], r["spent"]) for r in orjson.loads(out)] == [
        ("alice", "spend per day", 16.8),
        ("eng", "spend per month", 1251.3),
        ("alice", "tokens per week", 1_234_567),
    ]


def test_the_budgets_come_from_the_config_not_the_published_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table the bridge published yesterday, for another config: the command ignores it."""
    config = setup(tmp_path)
    stale = budget_rows(
        load_config(config).governance, ["alice"], datetime(2025, 6, 3, 10, 0, tzinfo=UTC)
    )
    conn = sqlite3.connect(tmp_path / "aibridge.db")
    with conn:
        for row in stale:
            conn.execute(
                f"insert into budgets ({', '.join(row)}) values ({', '.join('?' * len(row))})",
                [9.0 if k == "limit_value" else v for k, v in row.items()],
            )
    conn.close()
    code, out, _ = run(capsys, "--config", str(config), "--json")
    assert code == 0
    assert {r["limit"] for r in orjson.loads(out)} == {20.0, 2000.0, 2_000_000}
    assert {r["resets_at"] for r in orjson.loads(out)} >= {"2025-06-04T22:00:00.000000+00:00"}


def test_db_option_and_default_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_log(other / "copy.db", SMALL_LOG[:1])
    monkeypatch.chdir(tmp_path)
    # config.yaml in the current directory; its database relative to it.
    code, out, _ = run(capsys, "--json")
    assert code == 0 and orjson.loads(out)[0]["spent"] == 16.8
    code, out, _ = run(capsys, "--json", "--db", str(other / "copy.db"))
    assert code == 0 and orjson.loads(out)[0]["spent"] == 10.0
    # From another directory, the config's database is still the one beside it.
    monkeypatch.chdir(other)
    code, out, _ = run(capsys, "--json", "--config", str(tmp_path / "config.yaml"))
    assert code == 0 and orjson.loads(out)[0]["spent"] == 16.8
    code, out, _ = run(capsys, "--json", "--db", "copy.db", "--config", "../config.yaml")
    assert code == 0 and orjson.loads(out)[0]["spent"] == 10.0


def test_config_is_found_as_the_addon_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, addon_dir = tmp_path / "here", tmp_path / "addon"
    here.mkdir()
    addon_dir.mkdir()
    monkeypatch.chdir(here)
    # Neither here nor beside the addon: the name as given (load_config then says so).
    assert budgets.config_path("config.yaml", addon_dir) == Path("config.yaml")
    (addon_dir / "config.yaml").write_text("{}")
    assert budgets.config_path("config.yaml", addon_dir) == addon_dir / "config.yaml"
    # The current directory first.
    (here / "config.yaml").write_text("{}")
    assert budgets.config_path("config.yaml", addon_dir) == Path("config.yaml")
    # An absolute path is taken as it is.
    assert budgets.config_path(str(tmp_path / "nope.yaml"), addon_dir) == tmp_path / "nope.yaml"
    # The default directory is the one addon.py is in.
    assert budgets.config_path.__defaults__ == ((REPO / "addon.py").parent,)


@pytest.mark.parametrize(
    "raw",
    [
        {"database": "aibridge.db", "providers": PROVIDERS},  # no governance at all
        {  # rates and concurrency only
            **SMALL,
            "users": [
                {"id": "alice", "token_sha256": SHA + "1", "limits": {"requests_per_minute": 9}}
            ],
            "groups": [{"name": "eng", "members": ["*"], "limits": {"concurrent_requests": 2}}],
        },
        {  # every budget lifted
            **SMALL,
            "users": [
                {
                    "id": "alice",
                    "token_sha256": SHA + "1",
                    "limits": {"spend_usd": {"day": "unlimited"}},
                }
            ],
            "groups": [{"name": "eng", "shared_limits": {"tokens": {"month": "unlimited"}}}],
        },
    ],
)
def test_a_config_without_budgets_says_so(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))  # and no database: none is needed
    code, out, err = run(capsys, "--config", str(config))
    assert (code, err) == (0, "")
    (line,) = out.splitlines()
    assert line.startswith(f"{config}: no budgets configured")
    code, out, err = run(capsys, "--config", str(config), "--json")
    assert (code, out, err) == (0, "[]\n", "")


def _alice(limits: dict[str, Any]) -> dict[str, Any]:
    return {"users": [{"id": "alice", "token_sha256": SHA + "1", "limits": limits}]}


def _eng(**entry: Any) -> dict[str, Any]:
    return {"groups": [{"name": "eng", **entry}]}


def _text(change: dict[str, Any]) -> str:
    return yaml.safe_dump({**SMALL, **change})


UNSET_KEY = {**PROVIDERS[0], "api_key": "${AIBRIDGE_TEST_UNSET_VAR}"}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            _text(_eng(limits={"spend_usd": {"fortnight": 3}})),
            "groups[0].limits.spend_usd.fortnight: unknown period",
        ),
        (
            _text(_alice({"spend_usd": {"day": -1}})),
            "users[0].limits.spend_usd.day: must be a number >= 0",
        ),
        (
            _text(_alice({"tokens": {"week": 1.5}})),
            "users[0].limits.tokens.week: must be a whole number",
        ),
        (_text(_alice({"spend_usd": 20})), "users[0].limits.spend_usd: must be a mapping"),
        (
            _text({"governance": {"time_zone": "Mars/Olympus_Mons"}}),
            "governance.time_zone: unknown time zone",
        ),
        (
            _text(_eng(shared_limits={"requests_per_minute": 5})),
            "groups[0].shared_limits.requests_per_minute: unknown key",
        ),
        (
            _text({"providers": [UNSET_KEY]}),
            "providers[0].api_key: environment variable AIBRIDGE_TEST_UNSET_VAR is not set",
        ),
        ("users: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_a_bad_config_names_file_and_key(
    text: str,
    key: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AIBRIDGE_TEST_UNSET_VAR", raising=False)
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, out, err = run(capsys, "--config", str(config))
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {config}: ")
    assert key in err


def test_a_missing_config_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "gone.yaml"
    code, out, err = run(capsys, "--config", str(missing))
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {missing}: file not found")


def _no_tables(path: Path) -> None:
    sqlite3.connect(path).close()  # SQLite leaves a new file empty: no tables


def _other_app(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("create table notes (id integer primary key, body text)")
    conn.close()


def _half_a_log(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("create table interceptions (id text primary key, started_at text)")
    conn.close()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (None, "no such database"),
        (lambda p: p.mkdir(), "no such database"),
        (lambda p: p.write_bytes(b"this is not sqlite, just some text " * 200), "cannot read"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000), "cannot read"),
        (_no_tables, "not an aibridge audit log (no interceptions, token_usages table)"),
        (_other_app, "not an aibridge audit log"),
        (_half_a_log, "not an aibridge audit log (no token_usages table)"),
    ],
)
def test_a_database_that_is_not_a_log_is_a_clear_error(
    make: Any, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    db = tmp_path / "aibridge.db"
    if make is not None:
        make(db)
    code, out, err = run(capsys, "--config", str(config))
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {db}: ")
    assert problem in err
    assert err.count("\n") == 1  # one line, no traceback
    # Nothing was created where there was nothing.
    assert db.exists() == (make is not None)


def test_the_database_is_only_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = setup(tmp_path)
    db = tmp_path / "aibridge.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert run(capsys, "--config", str(config))[0] == 0
    assert run(capsys, "--config", str(config), "--json")[0] == 0
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def _noon_zone() -> str:
    """An Etc/GMT±N zone in which the local hour right now is 12 (POSIX signs: -N is east)."""
    offset = 12 - datetime.now(UTC).hour
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"


def test_as_a_command_with_the_real_clock(tmp_path: Path) -> None:
    zone = _noon_zone()
    now = time.time()
    raw = {**SMALL, "governance": {"time_zone": zone}}
    recent = spelled(datetime.fromtimestamp(now - 1800, UTC))
    long_ago = spelled(datetime.fromtimestamp(now - 60 * 86400, UTC))
    config = setup(
        tmp_path,
        raw,
        (
            Exchange("alice", "centralized", recent, ((4.5, 45),)),
            Exchange("bob", "centralized", recent, ((0.5, 5),)),
            Exchange("alice", "centralized", long_ago, ((100.0, 1000),)),
        ),
    )
    command = [sys.executable, "-m", "aibridge.budgets", "--config", str(config)]
    done = subprocess.run([*command, "--json"], cwd=tmp_path, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = budget_rows(load_config(config).governance, ["alice", "bob"], now)
    conn = sqlite3.connect(tmp_path / "aibridge.db")
    try:
        assert orjson.loads(done.stdout) == budget_use(conn, rows)
    finally:
        conn.close()
    assert [(r["owner"], r["budget"], r["spent"]) for r in orjson.loads(done.stdout)] == [
        ("alice", "spend per day", 4.5),
        ("eng", "spend per month", 5.0),
        ("alice", "tokens per week", 45),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Budget use at ")
    assert lines[0].endswith(f" {zone} ({tmp_path.resolve()}/aibridge.db)")
    assert lines[1].split() == [
        "scope",
        "owner",
        "budget",
        "spent",
        "limit",
        "share",
        "resets",
        "at",
        "source",
    ]
    assert lines[2].split()[:7] == ["user", "alice", "spend", "per", "day", "$4.50", "$20.00"]
    done = subprocess.run(
        [*command, "--db", "missing.db"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("error: missing.db: no such database")


# ---- a log in PostgreSQL (and the same on both engines) ---------------------------------


def test_the_table_on_either_engine(
    engine: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The log named by the config (a path or a URL): the same lines, the address as shown."""
    config = setup(tmp_path, {**SMALL, "database": engine}, ())
    write_log(engine, SMALL_LOG)
    code, out, err = run(capsys, "--config", str(config))
    assert (code, err) == (0, "")
    where = addresses.display(str(load_config(config).database))
    assert out.splitlines()[0] == f"Budget use at 2025-06-04 12:00 Europe/Berlin ({where})"
    assert [line.split()[:3] for line in out.splitlines()[2:]] == [
        ["user", "alice", "spend"],
        ["group", "eng", "spend"],
        ["user", "alice", "tokens"],
    ]
    assert "$16.80" in out and "1,234,567" in out and "$1,251.30" in out
    code, out, err = run(capsys, "--config", str(config), "--json")
    assert (code, err) == (0, "")
    loaded = load_config(config)
    assert orjson.loads(out) == use_of(
        engine, budget_rows(loaded.governance, ["alice", "bob"], NOW)
    )


def test_json_is_the_same_text_from_sqlite_and_postgres(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Byte for byte: a tokens budget's numbers are integers from PostgreSQL too."""
    config = setup(tmp_path, CONFIG, EVERY_KIND)
    write_log(postgres_url, EVERY_KIND)
    code, from_sqlite, _ = run(capsys, "--config", str(config), "--json")
    assert code == 0
    code, from_postgres, _ = run(capsys, "--config", str(config), "--json", "--db", postgres_url)
    assert code == 0
    assert from_postgres == from_sqlite
    assert '"spent": 1630,' in from_sqlite and '"spent": 2.05,' in from_sqlite
    code, table_sqlite, _ = run(capsys, "--config", str(config))
    code, table_postgres, _ = run(capsys, "--config", str(config), "--db", postgres_url)
    assert table_postgres.splitlines()[1:] == table_sqlite.splitlines()[1:]


# Alice today: 1.5 + 0.25 + 0.1 + 0.2 = 2.05 and 1630 tokens; a few other kinds of exchange.
EVERY_KIND = (
    Exchange("alice", "centralized", "2025-06-04T09:00:00.000000+00:00", ((1.5, 1000),)),
    Exchange("alice", "centralized", "2025-06-03T22:00:00.000000+00:00", ((0.25, 100),)),
    Exchange("alice", "centralized", "2025-06-04T09:10:00.000000+00:00", ((0.1, 10), (0.2, 20))),
    Exchange("alice", "centralized", "2025-06-04T09:20:00.000000+00:00", ((None, 500),)),
    Exchange("alice", "byok", "2025-06-04T09:30:00.000000+00:00", ((100.0, 100_000),)),
    Exchange("bob", "centralized", "2025-06-02T12:00:00.000000+00:00", ((4.0, 4000),)),
    Exchange("dave", "centralized", "2025-06-04T06:00:00.000000+00:00", ((0.5, 50),)),
    Exchange(None, "centralized", "2025-06-04T06:30:00.000000+00:00", ((9.0, 900),)),
)

SECRET = "not-the-password-7Qx"  # a wrong password: it must not be printed either


def _pg_empty(url: str) -> None:
    """A database of no application: no tables."""


def _pg_other_app(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create table notes (id bigint primary key, body text)")


def _pg_half_a_log(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create table interceptions (id text primary key, started_at text)")


def _pg_no_usages(url: str) -> None:
    write_log(url, SMALL_LOG)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("drop table token_usages cascade")  # and the views that read it


def _pg_unreadable(url: str) -> None:
    """A token_usages the query cannot sum: its tokens as text."""
    write_log(url, SMALL_LOG)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("drop table token_usages cascade")
        conn.execute(
            "create table token_usages (id bigint, interception_id text, total_tokens text, "
            "estimated_cost_usd double precision)"
        )
        conn.execute("insert into token_usages values (1, 'i0000', 'many', 1.0)")


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc.rpartition("@")[2]


@pytest.mark.parametrize(
    ("address", "make", "problem"),
    [
        # Nothing listens on that port.
        (
            lambda url: f"postgresql://aibridge@127.0.0.1:{free_port()}/aibridge",
            None,
            "cannot connect to the audit log: ",
        ),
        # A wrong password, in the URL or as its ?password=.
        (lambda url: with_password(url, SECRET), None, "password authentication failed"),
        (lambda url: f"{url}?password={SECRET}", None, "password authentication failed"),
        (
            lambda url: with_password(url, SECRET).replace("postgresql://", "postgres://"),
            None,
            "password authentication failed",
        ),
        # No such database, no such user.
        (
            lambda url: url.rpartition("/")[0] + "/no_such_database",
            None,
            'database "no_such_database" does not exist',
        ),
        (
            lambda url: f"postgresql://nobody_here:{SECRET}@{_host(url)}/postgres",
            None,
            "cannot connect to the audit log: ",
        ),
        # Not a URL libpq can use.
        (
            lambda url: f"postgresql://aibridge:{SECRET}@127.0.0.1:notaport/aibridge",
            None,
            "cannot connect to the audit log: ",
        ),
        # A database, but not an audit log.
        (str, _pg_empty, "not an aibridge audit log (no interceptions, token_usages table)"),
        (str, _pg_other_app, "not an aibridge audit log (no interceptions, token_usages table)"),
        (str, _pg_half_a_log, "not an aibridge audit log (no token_usages table)"),
        (str, _pg_no_usages, "not an aibridge audit log (no token_usages table)"),
        (str, _pg_unreadable, "cannot read the audit log: "),
    ],
)
def test_a_postgres_log_that_cannot_be_read_is_one_clear_line(
    address: Any,
    make: Any,
    problem: str,
    postgres_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    if make is not None:
        make(postgres_url)
    url = address(postgres_url)
    for argv in (["--db", url], ["--db", url, "--json"]):
        code, out, err = run(capsys, "--config", str(config), *argv)
        assert (code, out) == (2, "")
        assert err.startswith(f"error: {addresses.display(url)}: "), err
        assert problem in err
        assert err.count("\n") == 1  # one line, no traceback
        assert SECRET not in err


def test_a_password_in_the_config_is_not_printed(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """The URL in the config with ${VAR} for its password (PGPASSWORD unset): the header
    shows it masked."""
    password = os.environ["PGPASSWORD"]
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("AIBRIDGE_TEST_PG_PASSWORD", password)
    write_log(with_password(postgres_url, password), SMALL_LOG)
    database = with_password(postgres_url, "PW").replace(":PW@", ":${AIBRIDGE_TEST_PG_PASSWORD}@")
    config = setup(tmp_path, {**SMALL, "database": database}, ())
    code, out, err = run(capsys, "--config", str(config))
    assert (code, err) == (0, "")
    masked = with_password(postgres_url, "PW").replace(":PW@", ":***@")
    assert out.splitlines()[0].endswith(f" ({masked})")
    assert "$16.80" in out
    assert password not in out
    # The same database with another password: refused, and neither password shown.
    code, out, err = run(
        capsys, "--config", str(config), "--db", with_password(postgres_url, SECRET)
    )
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {masked}: cannot connect to the audit log: ")
    assert password not in err and SECRET not in err


def test_the_postgres_log_is_only_read(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even a database that takes no writes at all (as a standby) is read; nothing changes."""
    config = setup(tmp_path, {**SMALL, "database": postgres_url}, ())
    write_log(postgres_url, SMALL_LOG)

    def contents() -> list[Any]:
        with psycopg.connect(postgres_url) as conn:
            return [
                conn.execute(f"select * from {table} order by id").fetchall()
                for table in ("interceptions", "token_usages", "budgets", "recorder_losses")
            ]

    before = contents()
    name = postgres_url.rpartition("/")[2]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'alter database "{name}" set default_transaction_read_only = on')
    code, out, err = run(capsys, "--config", str(config), "--json")
    assert (code, err) == (0, "")
    assert [(r["owner"], r["spent"]) for r in orjson.loads(out)] == [
        ("alice", 16.8),
        ("eng", 1251.3),
        ("alice", 1_234_567),
    ]
    assert contents() == before


def test_as_a_command_on_postgres_with_the_real_clock(postgres_url: str, tmp_path: Path) -> None:
    zone = _noon_zone()
    now = time.time()
    password = os.environ["PGPASSWORD"]
    recent = spelled(datetime.fromtimestamp(now - 1800, UTC))
    write_log(
        postgres_url,
        (
            Exchange("alice", "centralized", recent, ((4.5, 45),)),
            Exchange("bob", "centralized", recent, ((0.5, 5),)),
        ),
    )
    config = setup(tmp_path, {**SMALL, "governance": {"time_zone": zone}}, ())
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    url = with_password(postgres_url, password)
    command = [sys.executable, "-m", "aibridge.budgets", "--config", str(config), "--db", url]
    done = subprocess.run(
        [*command, "--json"], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rows = budget_rows(load_config(config).governance, ["alice", "bob"], now)
    assert orjson.loads(done.stdout) == use_of(url, rows)
    assert [(r["owner"], r["spent"]) for r in orjson.loads(done.stdout)] == [
        ("alice", 4.5),
        ("eng", 5.0),
        ("alice", 45),
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[0].endswith(f" {zone} ({addresses.display(url)})")
    assert password not in done.stdout
    wrong = [*command[:-1], with_password(postgres_url, SECRET)]
    done = subprocess.run(wrong, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.count("\n") == 1 and "password authentication failed" in done.stderr
    assert SECRET not in done.stderr
