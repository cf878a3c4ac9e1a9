"""Test helpers that start real processes: a mitmdump running addon.py, on loopback."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from aibridge.mitmdump_process import ADDON, MITMDUMP, REPO, MitmdumpProcess

__all__ = ["ADDON", "MITMDUMP", "REPO", "Mitmdump", "bridge_config", "query", "wait_for"]

PROVIDER_KEY = "sk-test-provider-key-0123456789abcdef"
TOKENS = {"alice": "alice-personal-token-1", "bob": "bob-personal-token-2"}


def bridge_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "database": "aibridge.db",
        "providers": [
            {"name": "openai", "type": "openai", "base_url": f"{upstream_url}/v1",
             "api_key": "${TEST_PROVIDER_KEY}"},
        ],
        "users": [{"id": user, "token": token} for user, token in TOKENS.items()],
    }
    config.update(overrides)
    return config


class Mitmdump(MitmdumpProcess):
    """The bridge under test, with the test provider key in its environment."""

    def __init__(self, workdir: Path, config: dict[str, Any], **kw: Any) -> None:
        env = {"TEST_PROVIDER_KEY": PROVIDER_KEY, **(kw.pop("env", None) or {})}
        super().__init__(workdir, config, env=env, **kw)

    def __enter__(self) -> Mitmdump:
        self.start()
        return self

    def rows(self, table: str, order: str = "rowid") -> list[dict[str, Any]]:
        return query(self.db_path, f"select * from {table} order by {order}")


def query(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy (records are written by a background thread)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except sqlite3.Error:
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
