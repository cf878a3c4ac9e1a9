from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.fake_upstream import FakeUpstream
from tests.harness import Mitmdump, bridge_config
from tests.postgres_server import PostgresServer, database_name, postgres_bin


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


# A real PostgreSQL server (tests/postgres_server.py).


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole run; skipped without the binaries, except
    in CI."""
    with PostgresServer(postgres_bin()) as server:
        yield server


@pytest.fixture
def postgres_url(
    postgres_server: PostgresServer, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A fresh database for one test, dropped after: its URL *without* the password, which
    libpq finds in PGPASSWORD (set for this test only)."""
    name = database_name(request.node.name)
    url = postgres_server.create_database(name)
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)
