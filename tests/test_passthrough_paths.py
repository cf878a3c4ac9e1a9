"""Passthrough through a real mitmdump: only whole, well-formed segments pass; a path a
server could read as another one (empty, blank or punctuation-only segments) gets 403
and never reaches the provider."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.fake_upstream import FakeUpstream
from tests.harness import TOKENS, Mitmdump, bridge_config

SAFETY = 60.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mitmdump, FakeUpstream]]:
    with FakeUpstream() as fake:
        workdir: Path = tmp_path_factory.mktemp("passthrough")
        with Mitmdump(workdir, bridge_config(fake.url)) as bridge:
            yield bridge, fake


def send(bridge: Mitmdump, method: str, path: str) -> bytes:
    """Raw bytes: HTTP client libraries normalise paths before sending."""
    head = (
        f"{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKENS['alice']}\r\n"
        "content-length: 2\r\nconnection: close\r\n\r\n{}"
    ).encode()
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=SAFETY) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/responses/%20",
        "/openai/v1/responses/-",
        "/openai/v1/responses/%3B",
        "/openai/v1/responses/.hidden",
        "/openai/v1/responses/resp_1/",
        "/openai/v1/models/",
        "/openai/v1/models//x",
        "/openai/v1//models",
        "/openai/v1/conversations/c1/%09",
    ],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_malformed_segments_are_refused(
    served: tuple[Mitmdump, FakeUpstream], method: str, path: str
) -> None:
    bridge, fake = served
    before = len(fake.requests)
    answer = send(bridge, method, path)
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b'"code":"403"' in answer
    assert len(fake.requests) == before, "the request reached the provider"


@pytest.mark.parametrize(
    "path", ["/openai/v1/models", "/openai/v1/models/fake-text", "/openai/v1/responses/resp_1"]
)
def test_well_formed_paths_pass(served: tuple[Mitmdump, FakeUpstream], path: str) -> None:
    bridge, fake = served
    before = len(fake.requests)
    answer = send(bridge, "GET", path)
    assert not answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert len(fake.requests) == before + 1
