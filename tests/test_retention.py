"""Retention (aibridge.retention): old exchanges go whole, old content goes first, nothing of it
stays readable in the file, and it runs beside the live writer."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aibridge.config import ConfigError, Retention, load_config
from aibridge.record.recorder import Recorder
from aibridge.retention import PruneReport, RetentionError, prune
from devtools.mitmdump_process import REPO

NOW = datetime(2025, 6, 30, 12, 0, tzinfo=UTC)
CHILDREN = ("token_usages", "user_prompts", "tool_usages", "model_thoughts")


def at(days_ago: float) -> str:
    return (NOW - timedelta(days=days_ago)).isoformat(timespec="microseconds")


def secret(days_ago: int) -> str:
    """A word found nowhere else, to look for in the raw file."""
    return f"zebracorn{days_ago}x"


def write_exchange(recorder: Recorder, iid: str, days_ago: int) -> None:
    """One exchange as the bridge writes it: the interception, then prompt, usage, tool, thought."""
    when = at(days_ago)
    recorder.upsert(
        "interceptions",
        {
            "id": iid,
            "started_at": when,
            "ended_at": when,
            "initiator_id": "alice",
            "status": "completed",
        },
    )
    recorder.insert(
        "user_prompts",
        {"interception_id": iid, "prompt": f"prompt {secret(days_ago)}", "created_at": when},
    )
    recorder.insert(
        "token_usages",
        {"interception_id": iid, "input_tokens": 10, "output_tokens": 5, "created_at": when},
    )
    recorder.insert(
        "tool_usages",
        {
            "interception_id": iid,
            "tool": "shell",
            "args": {"cmd": secret(days_ago)},
            "created_at": when,
        },
    )
    recorder.insert(
        "model_thoughts",
        {
            "interception_id": iid,
            "source": "reasoning_summary",
            "content": f"think {secret(days_ago)}",
            "created_at": when,
        },
    )


AGES = {"d400": 400, "d100": 100, "d40": 40, "d10": 10, "d1": 1}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "aibridge.db"
    recorder = Recorder(path)
    recorder.start()
    for iid, days_ago in AGES.items():
        write_exchange(recorder, iid, days_ago)
    recorder.insert(
        "recorder_losses",
        {"happened_at": at(400), "table_name": "user_prompts", "rows": 1, "reason": "old"},
    )
    recorder.insert(
        "recorder_losses",
        {"happened_at": at(1), "table_name": "user_prompts", "rows": 1, "reason": "new"},
    )
    recorder.close()
    return path


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def interception_ids(path: Path) -> list[str]:
    return [r[0] for r in rows(path, "select id from interceptions order by started_at")]


def content(path: Path) -> dict[str, dict[str, Any]]:
    """Per interception: its prompt, thought and tool args (None once cleared)."""
    out: dict[str, dict[str, Any]] = {}
    for table, column in (
        ("user_prompts", "prompt"),
        ("model_thoughts", "content"),
        ("tool_usages", "args"),
    ):
        for iid, value in rows(path, f"select interception_id, {column} from {table}"):
            out.setdefault(iid, {})[table] = value
    return out


def raw_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def test_days_deletes_whole_exchanges(db_path: Path) -> None:
    report = prune(db_path, days=90, now=NOW, batch_size=2)
    assert interception_ids(db_path) == ["d40", "d10", "d1"]
    for table in CHILDREN:
        assert {r[0] for r in rows(db_path, f"select interception_id from {table}")} == {
            "d40",
            "d10",
            "d1",
        }
    assert rows(db_path, "select reason from recorder_losses") == [("new",)]
    assert report.deleted == {
        "interceptions": 2,
        "token_usages": 2,
        "user_prompts": 2,
        "tool_usages": 2,
        "model_thoughts": 2,
        "recorder_losses": 1,
    }
    assert report.cutoff == "2025-04-01T12:00:00"
    assert "deleted records started before 2025-04-01T12:00:00: interceptions 2" in (
        report.summary()
    )
    # Idempotent: a second run finds nothing more.
    again = prune(db_path, days=90, now=NOW)
    assert not any(again.deleted.values())


def test_content_days_clear_content_and_keep_usage(db_path: Path) -> None:
    report = prune(db_path, days=365, content_days=30, now=NOW)
    assert interception_ids(db_path) == ["d100", "d40", "d10", "d1"]
    kept = content(db_path)
    for iid in ("d100", "d40"):
        assert kept[iid] == {"user_prompts": None, "model_thoughts": None, "tool_usages": None}
    assert kept["d10"]["user_prompts"] == f"prompt {secret(10)}"
    assert kept["d1"]["tool_usages"] == f'{{"cmd":"{secret(1)}"}}'
    # Usage rows and the fact that a tool was called survive the content.
    assert rows(db_path, "select count(*), sum(input_tokens) from token_usages") == [(4, 40)]
    assert rows(db_path, "select count(*) from tool_usages where tool = 'shell'") == [(4,)]
    assert report.cleared == {
        "user_prompts.prompt": 2,
        "model_thoughts.content": 2,
        "tool_usages.args": 2,
    }
    # Full-text search no longer finds what was erased, and still finds what was kept.
    fts = "select rowid from user_prompts_fts where user_prompts_fts match ?"
    assert rows(db_path, fts, (secret(40),)) == []
    assert len(rows(db_path, fts, (secret(10),))) == 1


def test_erased_text_is_gone_from_the_file(db_path: Path) -> None:
    before = raw_bytes(db_path)
    for days_ago in (400, 100, 40):
        assert secret(days_ago).encode() in before
    prune(db_path, days=90, content_days=30, now=NOW)
    after = raw_bytes(db_path)
    for days_ago in (400, 100, 40):
        # Not in free pages, not in the full-text index, not in the WAL.
        assert secret(days_ago).encode() not in after, days_ago
    assert secret(10).encode() in after


def test_dry_run_counts_and_changes_nothing(db_path: Path) -> None:
    before = raw_bytes(db_path)
    report = prune(db_path, days=90, content_days=30, now=NOW, dry_run=True)
    assert report.deleted["interceptions"] == 2 and report.deleted["recorder_losses"] == 1
    assert report.cleared["user_prompts.prompt"] == 3  # d400 counts too: nothing was deleted
    assert report.summary().startswith("would delete")
    assert raw_bytes(db_path) == before


def test_prunes_while_the_recorder_writes(db_path: Path) -> None:
    recorder = Recorder(db_path)
    recorder.start()
    try:
        write_exchange(recorder, "live-1", 0)
        assert recorder.flush(10)
        prune(db_path, days=30, now=NOW)
        write_exchange(recorder, "live-2", 0)
        assert recorder.flush(10)
        assert recorder.stats["dropped"] == 0
    finally:
        recorder.close()
    assert interception_ids(db_path) == ["d10", "d1", "live-1", "live-2"]


@pytest.mark.parametrize(
    ("days", "content_days", "problem"),
    [
        (None, None, "give days, content_days or both"),
        (0, None, "days must be a whole number of days >= 1"),
        (30, 60, "content_days (60) must not exceed days (30)"),
        (True, None, "days must be"),
    ],
)
def test_bad_horizons(db_path: Path, days: Any, content_days: Any, problem: str) -> None:
    with pytest.raises(RetentionError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        prune(db_path, days=days, content_days=content_days)


def test_not_an_audit_log(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("create table t (x)").connection.close()
    with pytest.raises(RetentionError, match="not an aibridge audit log"):
        prune(other, days=1)
    with pytest.raises(RetentionError, match="no such database"):
        prune(tmp_path / "missing.db", days=1)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aibridge.retention", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )


def test_command_line(db_path: Path, tmp_path: Path) -> None:
    # The command counts from the real now: the fixture's 400-day-old exchange is older still.
    done = run("--days", "3000", "--content-days", "2000", "--db", str(db_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "deleted records started before" in done.stdout and "cleared content" in done.stdout

    config = tmp_path / "config.yaml"
    config.write_text(
        "database: aibridge.db\n"
        "providers: [{name: openai, base_url: 'https://api.openai.com/v1', api_key: k}]\n"
        "retention: {days: 3000, content_days: 1}\n"
    )
    done = run("--config", str(config), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "would clear content" in done.stdout and "user_prompts.prompt 5" in done.stdout
    # The command line wins over the config, horizon by horizon.
    done = run("--config", str(config), "--content-days", "5000", cwd=tmp_path)
    assert done.returncode == 2
    assert "content_days (5000) must not exceed days (3000)" in done.stderr

    bad = run("--db", str(db_path), cwd=tmp_path)
    assert bad.returncode == 2 and "give days, content_days or both" in bad.stderr
    missing = run("--config", str(tmp_path / "nope.yaml"), "--days", "1", cwd=tmp_path)
    assert missing.returncode == 2 and "file not found" in missing.stderr


def test_retention_config(tmp_path: Path) -> None:
    base = "providers: [{name: openai, base_url: 'https://api.openai.com/v1', api_key: k}]\n"
    path = tmp_path / "config.yaml"

    def load(text: str, env: dict[str, str] | None = None) -> Retention:
        path.write_text(base + text)
        return load_config(path, env or {}).retention

    assert load("") == Retention()
    assert load("retention: {days: 365, content_days: 30}") == Retention(365, 30)
    assert load("retention: {content_days: '${KEEP}'}", {"KEEP": "7"}) == Retention(None, 7)
    for text, key, problem in (
        ("retention: {days: 0}", "retention.days", "whole number of days >= 1"),
        ("retention: {days: 1.5}", "retention.days", "whole number of days >= 1"),
        ("retention: {days: 10, content_days: 20}", "retention.content_days", "must not exceed"),
        ("retention: {keep: 1}", "retention.keep", "unknown key"),
        ("retention: 30", "retention", "must be a mapping"),
    ):
        with pytest.raises(ConfigError) as err:
            load(text)
        assert (err.value.key, err.value.file) == (key, str(path))
        assert problem in err.value.problem


def test_report_summary_reads_well() -> None:
    report = PruneReport(cutoff="2025-01-01T00:00:00", content_cutoff=None)
    assert report.summary() == "deleted records started before 2025-01-01T00:00:00: none"
