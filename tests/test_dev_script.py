"""``./dev``: with no command, or asking for help, it says how to use it (and does nothing else)."""

from __future__ import annotations

import subprocess

import pytest

from devtools.mitmdump_process import REPO


def dev(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "dev"), *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",), ("help",)])
def test_usage(args: tuple[str, ...]) -> None:
    done = dev(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ./dev COMMAND [ARGS...]")
    for command in (
        "mitmdump -s addon.py",
        "mitmweb -s addon.py",
        "pytest",
        "python -m devtools.demo",
    ):
        assert f"./dev {command}" in done.stdout
    assert "python -m aibridge report" in done.stdout
    assert done.stderr == ""  # no environment was set up to print it


def test_a_command_still_runs_in_the_environment() -> None:
    done = dev("python", "-c", "import sys, aibridge; print(sys.prefix)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(".venv")
