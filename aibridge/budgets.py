"""Budget use per person and group in the terminal: spent, limit, share and reset of every
budget the config sets, counted in the audit log (aibridge.governance.report).

    python -m aibridge.budgets                      # config.yaml, its database
    python -m aibridge.budgets --config other.yaml --db copy.db --json

The budgets come from the config itself, not from the log's ``budgets`` table, so the numbers
hold with no bridge running and after a change of period the bridge has not published yet. The
database (a SQLite file or a PostgreSQL URL) is only read, in a read-only transaction; the
command is safe beside a live bridge. What it prints of a URL has no password.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from aibridge.config import ConfigError, load_config
from aibridge.governance.limits import Governance
from aibridge.governance.periods import describe_local, parse_instant
from aibridge.governance.report import budget_rows, budget_use, configured_user_ids
from aibridge.record import address as addresses
from aibridge.record.sqlite import connect_readonly

DEFAULT_CONFIG: Final = "config.yaml"
# Where addon.py is: the bridge's fallback for a config not found from the current directory.
_ADDON_DIR: Final = Path(__file__).resolve().parent.parent

_HEADERS: Final = ("scope", "owner", "budget", "spent", "limit", "share", "resets at", "source")
_RIGHT_ALIGNED: Final = frozenset({"spent", "limit", "share"})


class BudgetsError(Exception):
    """The log cannot be read; the message says which file or database and why (one line, no
    password)."""


def config_path(option: str, addon_dir: Path | None = _ADDON_DIR) -> Path:
    """As the addon finds its config (AIBridge._config_path): the path as given if it exists,
    else the same name next to addon.py."""
    path = Path(option).expanduser()
    if path.is_absolute() or path.exists() or addon_dir is None:
        return path
    beside_addon = addon_dir / path
    return beside_addon if beside_addon.exists() else path


def read_use(db_path: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Budget use of `rows` in the log at `db_path` (a SQLite path or a PostgreSQL URL),
    opened read-only."""
    if addresses.is_postgres(db_path):
        return _read_postgres_use(db_path, rows)
    path = Path(db_path)
    if not path.is_file():
        raise BudgetsError(
            f"{db_path}: no such database (the bridge creates it when it starts; "
            "--db names another file)"
        )
    try:
        conn = connect_readonly(path, busy_timeout_ms=5000)
    except sqlite3.Error as e:
        raise BudgetsError(f"{db_path}: cannot open the audit log: {e}") from None
    try:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        missing = {"interceptions", "token_usages"} - tables
        if missing:
            raise BudgetsError(
                f"{db_path}: not an aibridge audit log (no {', '.join(sorted(missing))} table)"
            )
        return budget_use(conn, rows)
    except sqlite3.Error as e:
        raise BudgetsError(f"{db_path}: cannot read the audit log: {e}") from None
    finally:
        conn.close()


def _read_postgres_use(address: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from aibridge.record import postgres

    where = addresses.display(address)
    try:
        conn = postgres.connect_snapshot(address)  # one snapshot, and no write can slip in
    except postgres.ReaderError as e:
        raise BudgetsError(str(e)) from None
    import psycopg

    try:
        missing = [
            table
            for table in ("interceptions", "token_usages")
            if conn.execute("select to_regclass(%s)", (table,)).fetchone()[0] is None
        ]
        if missing:
            raise BudgetsError(
                f"{where}: not an aibridge audit log (no {', '.join(missing)} table)"
            )
        use = budget_use(conn, rows)
        conn.execute("commit")
        return use
    except psycopg.Error as e:
        raise BudgetsError(
            f"{where}: cannot read the audit log: {postgres.reason_line(e, address)}"
        ) from None
    finally:
        conn.close()


def format_table(use: list[dict[str, Any]], governance: Governance) -> list[str]:
    """The rows of BUDGET_USE_SQL as aligned lines for people: $12.34, 1,234,567, 84%,
    resets in the configured time zone."""
    cells = [_HEADERS]
    for row in use:
        money = row["budget"].startswith("spend")
        resets = parse_instant(row["resets_at"])
        cells.append(
            (
                row["scope"],
                row["owner"],
                row["budget"],
                _amount(money, row["spent"]),
                _amount(money, row["limit"]),
                f"{row['share']:.0%}",
                row["resets_at"]
                if resets is None
                else describe_local(resets, governance.zone, governance.time_zone),
                row["source"],
            )
        )
    widths = [max(len(line[n]) for line in cells) for n in range(len(_HEADERS))]
    return [
        "  ".join(
            cell.rjust(width) if name in _RIGHT_ALIGNED else cell.ljust(width)
            for name, cell, width in zip(_HEADERS, line, widths, strict=True)
        ).rstrip()
        for line in cells
    ]


def _amount(money: bool, value: float) -> str:
    return f"${value:,.2f}" if money else f"{int(value):,}"


def main(argv: list[str] | None = None, *, now: datetime | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aibridge.budgets",
        description="Print what every budget of the config (per person and group) has spent "
        "in the current day, week or month, from the audit log.",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="bridge config (default: config.yaml here, else next to addon.py)",
    )
    parser.add_argument(
        "--db",
        help="the audit log: a SQLite file or a postgresql:// URL (default: the config's database)",
    )
    parser.add_argument("--json", action="store_true", help="the rows as JSON")
    args = parser.parse_args(argv)

    try:
        config = load_config(config_path(args.config))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    at = now or datetime.now(UTC)
    rows = budget_rows(config.governance, configured_user_ids(config), at)
    if not rows:
        if args.json:
            print("[]")
        else:
            print(
                f"{config.path}: no budgets configured (spend_usd or tokens in users[].limits, "
                "groups[].limits or groups[].shared_limits)"
            )
        return 0
    db_path = args.db or config.database
    try:
        use = read_use(db_path, rows)
    except BudgetsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(orjson.dumps(use, option=orjson.OPT_INDENT_2).decode())
        return 0
    governance = config.governance
    print(
        f"Budget use at {describe_local(at, governance.zone, governance.time_zone)} "
        f"({addresses.display(db_path)})"
    )
    for line in format_table(use, governance):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
