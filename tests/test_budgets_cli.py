"""``python -m aibridge.budgets``: budget use in the terminal, from the config and the log.

In-process runs get a fixed `now`; the subprocess runs use the real clock, in an ``Etc/GMT±N``
zone where it is about noon now, so no period changes while they run.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from aibridge import budgets
from aibridge.config import load_config
from aibridge.governance.periods import spelled
from aibridge.governance.report import budget_rows, budget_use, configured_user_ids
from devtools.mitmdump_process import REPO
from tests.test_budgets_report import CONFIG, NOW, SHA, Exchange, write_log

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
