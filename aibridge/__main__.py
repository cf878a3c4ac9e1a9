"""``python -m aibridge COMMAND …``: the command-line tools of the audit log in one place.

Each command is its module's ``main(argv)``; this only dispatches, so that ``python -m
aibridge budgets`` and ``python -m aibridge.budgets`` are the same program.
"""

from __future__ import annotations

import importlib
import sys
from typing import Final

# command -> (module with main(argv), what it does in one line)
COMMANDS: Final = {
    "report": ("aibridge.reading.report", "usage per person, model and day, cost, tools, failures"),
    "export": ("aibridge.reading.export", "rows over a date range as CSV or JSON Lines"),
    "budgets": ("aibridge.budgets", "what every configured budget has spent, and when it resets"),
    "retention": ("aibridge.retention", "delete old exchanges, erase old prompts and tool args"),
    "cost": ("aibridge.cost", "estimate the cost of token usage rows that have none (or all)"),
    "copy-log": ("aibridge.copy_log", "copy the log between SQLite and PostgreSQL"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: python -m aibridge COMMAND [options]",
        "",
        "The audit log from the terminal (a SQLite file or a postgresql:// URL: --db, or the",
        "database of --config, default config.yaml).",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {about}" for name, (_, about) in COMMANDS.items()),
        "",
        "python -m aibridge COMMAND --help describes a command's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(usage(), file=sys.stderr)
        print(f"\nerror: unknown command {args[0]!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(command[0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
