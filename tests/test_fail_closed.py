"""Fail closed at start-up: a bridge that is loaded without a working configuration never
proxies anything unauthenticated. It either stops mitmdump with a message naming the
problem, or refuses every request with 503 in the API's error shape."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from aibridge.bridge import AIBridge
from devtools.fake_upstream import FakeUpstream
from tests.harness import (
    ADDON,
    MITMDUMP,
    PROVIDER_KEY,
    TOKENS,
    Mitmdump,
    bridge_config,
    query,
    wait_for,
)

SAFETY = 60.0  # upper bound for waits; never asserted as a duration


@pytest.fixture()
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def refused_unconfigured(response: http.Response | httpx.Response) -> None:
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "503" and "not configured" in body["error"]["message"]


# ------------------------------------------------------------------------- hook level


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1/responses",
        "https://api.openai.com/v1/models",
        "http://127.0.0.1:1/openai/v1/responses",
        "https://example.com/anything",
    ],
)
def test_an_addon_without_configuration_refuses_every_request(url: str) -> None:
    addon = AIBridge()
    with taddons.context(addon):
        flow = tflow.tflow(req=http.Request.make("POST", url, b"{}", {}))
        addon.request(flow)
        assert flow.response is not None
        refused_unconfigured(flow.response)


def test_a_broken_configuration_leaves_the_addon_refusing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: 3\n")
    addon = AIBridge()
    with taddons.context(addon) as tctx:
        with pytest.raises(Exception, match="providers"):
            tctx.configure(addon, aibridge_config=str(bad))
        flow = tflow.tflow(req=http.Request.make("POST", "https://api.openai.com/v1/x", b"", {}))
        addon.request(flow)
        refused_unconfigured(flow.response)


def test_a_later_broken_configuration_keeps_the_working_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PROVIDER_KEY", PROVIDER_KEY)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(bridge_config("https://api.openai.com", database="a.db")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: []\n")
    addon = AIBridge()
    with taddons.context(addon) as tctx:
        try:
            tctx.configure(addon, aibridge_config=str(good))
            with pytest.raises(Exception, match="providers"):
                tctx.configure(addon, aibridge_config=str(bad))
            assert addon.config is not None and addon.config.path == str(good)
        finally:
            addon.done()


# ------------------------------------------------------------------ through mitmdump


def run_to_exit(workdir: Path, *args: str) -> tuple[int, str]:
    command = [str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", "0"]
    proc = subprocess.run(
        [*command, "-s", str(ADDON), *args],
        cwd=workdir,
        capture_output=True,
        timeout=SAFETY,
        env={"TEST_PROVIDER_KEY": PROVIDER_KEY, "PATH": "/usr/bin:/bin"},
    )
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def test_the_same_option_given_twice_works(tmp_path: Path, upstream: FakeUpstream) -> None:
    """mitmproxy used to drop the whole addon on ``--set aibridge_db=x --set aibridge_db=x``
    and go on proxying without it."""
    db = tmp_path / "aibridge.db"
    args = ["--set", f"aibridge_db={db}"]  # the runner gives the same once already
    with Mitmdump(tmp_path, bridge_config(upstream.url), extra_args=args) as bridge:
        before = len(upstream.requests)
        r = httpx.post(
            f"{bridge.url}/openai/v1/responses",
            json={"model": "fake-text", "input": "twice"},
            headers={"authorization": "Bearer not-a-bridge-token"},
            timeout=SAFETY,
        )
        assert r.status_code == 401
        assert len(upstream.requests) == before
        session = uuid.uuid4().hex
        r = httpx.post(
            f"{bridge.url}/openai/v1/responses",
            json={"model": "fake-text", "input": "twice"},
            headers={"authorization": f"Bearer {TOKENS['alice']}", "session_id": session},
            timeout=SAFETY,
        )
        assert r.status_code == 200
    rows = query(db, "select * from interceptions where client_session_id = ?", (session,))
    assert [(r["initiator_id"], r["status"]) for r in rows] == [("alice", "completed")]


@pytest.mark.parametrize("option", ["aibridge_db", "aibridge_config"])
def test_one_option_given_twice_with_different_values_stops_mitmdump(
    tmp_path: Path, option: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(bridge_config("http://127.0.0.1:9")))
    values = {"aibridge_db": ("one.db", "two.db"), "aibridge_config": (str(config), "other.yaml")}
    first, second = values[option]
    base = [] if option == "aibridge_config" else ["--set", f"aibridge_config={config}"]
    code, output = run_to_exit(
        tmp_path, *base, "--set", f"{option}={first}", "--set", f"{option}={second}"
    )
    assert code != 0
    assert f"--set {option} was given 2 times with different values" in output
    assert "exiting" in output


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("providers: 3\n", "providers"),
        ("providers:\n  - name: x\n    base_url: ftp://h/v1\n    api_key: k\n", "base_url"),
        ("nonsense_key: 1\nproviders: []\n", "nonsense_key"),
        ("users: [1]\nproviders:\n  - {name: a, base_url: 'http://h/v1', api_key: k}\n", "users"),
        (": : :\n", "YAML"),
    ],
)
def test_a_bad_configuration_stops_mitmdump_naming_the_key(
    tmp_path: Path, text: str, named: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    code, output = run_to_exit(tmp_path, "--set", f"aibridge_config={config}")
    assert code != 0
    assert "config.yaml" in output and named in output


def test_a_reloaded_addon_without_configuration_refuses_everything(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """mitmproxy reloads a script whose file changes; if the configuration is broken by
    then, the new addon has none, start-up is over (mitmdump goes on), and it must refuse."""
    script = tmp_path / "addon.py"
    shutil.copy(ADDON, script)  # a copy to touch; it imports the installed aibridge
    proc = Mitmdump(tmp_path, bridge_config(upstream.url), addon=script).start()
    try:
        headers = {"authorization": f"Bearer {TOKENS['alice']}"}
        body = {"model": "fake-text", "input": "before"}
        r = httpx.post(f"{proc.url}/openai/v1/responses", json=body, headers=headers)
        assert r.status_code == 200
        proc.config_path.write_text("providers: broken\n")
        later = script.stat().st_mtime + 10  # the reload watcher looks for a newer mtime
        os.utime(script, (later, later))
        assert wait_for(lambda: "error in script" in proc.log(), SAFETY)
        before = len(upstream.requests)
        for path in ("/openai/v1/responses", "/openai/v1/models", "/elsewhere"):
            r = httpx.post(f"{proc.url}{path}", json=body, headers=headers, timeout=SAFETY)
            refused_unconfigured(r)
        with httpx.Client(proxy=proc.url, timeout=SAFETY) as client:
            refused_unconfigured(client.post(f"{upstream.url}/v1/responses", json=body))
        assert len(upstream.requests) == before, "a request went upstream unauthenticated"
        assert "AI Bridge has no working configuration" in proc.log()
        assert proc.proc is not None and proc.proc.poll() is None  # still running, refusing
    finally:
        proc.stop()
