from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.fake_upstream import FakeUpstream
from tests.harness import Mitmdump, bridge_config


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def bridge(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mitmdump]:
    """One mitmdump with addon.py per test module, in regular mode (route prefix /openai/v1)."""
    workdir: Path = tmp_path_factory.mktemp("bridge")
    with Mitmdump(workdir, bridge_config(upstream.url)) as proc:
        yield proc


@pytest.fixture
def switch_often() -> Iterator[None]:
    # Threads take turns every few microseconds, so a snapshot meets mutations mid-way.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
