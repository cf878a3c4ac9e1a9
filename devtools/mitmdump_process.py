"""Run ``mitmdump -s addon.py`` as a subprocess on a free loopback port.

Used by the end-to-end tests, the benchmark and the offline demo, so all three start the
bridge exactly the way an operator does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
ADDON = REPO / "addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
_LISTENING = re.compile(rb"listening at (?:\*|[\d.]+|\[[^\]]+\]):(\d+)")


def local_bridge_config(
    upstream_url: str, api_key: str, tokens: dict[str, str], **overrides: Any
) -> dict[str, Any]:
    """A bridge config with one OpenAI-type provider at `upstream_url` and these users
    (id → token; `api_key` and tokens are usually ``${VAR}`` references)."""
    config: dict[str, Any] = {
        "database": "aibridge.db",
        "providers": [
            {
                "name": "openai",
                "type": "openai",
                "base_url": f"{upstream_url}/v1",
                "api_key": api_key,
            }
        ],
        "users": [{"id": user, "token": token} for user, token in tokens.items()],
    }
    config.update(overrides)
    return config


class MitmdumpProcess:
    """``mitmdump -s addon.py`` as a subprocess on a free loopback port."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        *,
        mode: str | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        addon: Path = ADDON,
    ) -> None:
        self.addon = addon
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.db_path = workdir / "aibridge.db"
        self.log_path = workdir / "mitmdump.log"
        self.mode = mode
        self.extra_args = extra_args or []
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MitmdumpProcess:
        args = [
            str(MITMDUMP),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--set",
            f"confdir={self.workdir / 'mitmproxy-conf'}",
            "-s",
            str(self.addon),
            "--set",
            f"aibridge_config={self.config_path}",
            "--set",
            f"aibridge_db={self.db_path}",
        ]
        if self.mode:
            args += ["--mode", self.mode]
        args += self.extra_args
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _LISTENING.search(self.log_path.read_bytes())
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited at start:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mitmdump did not start listening:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> MitmdumpProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
