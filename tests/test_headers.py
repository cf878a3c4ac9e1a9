"""The hooks' header look-ups read what mitmproxy's own ``Headers.get`` reads."""

from __future__ import annotations

import pytest
from mitmproxy import http

from aibridge.headers import header_value, header_view

FIELDS: list[list[tuple[bytes, bytes]]] = [
    [],
    [(b"Content-Type", b"application/json")],
    [(b"content-type", b"a"), (b"CONTENT-TYPE", b"b")],  # repeated: joined as mitmproxy does
    [(b"content-typ", b"near miss"), (b"content-typex", b"near miss")],
    [(b"Content-Encoding", b"gzip"), (b"content-type", b"\xff\xfe not utf-8")],
    [(b"x-long", b"v" * 10_000), (b"content-encoding", b"br, gzip"), (b"content-type", b"")],
    [(b"content-type", b"text/event-stream; charset=utf-8")] * 3,
]


@pytest.mark.parametrize("fields", FIELDS)
@pytest.mark.parametrize("name", ["content-type", "content-encoding", "x-missing", "x-long"])
def test_header_value_is_what_headers_get_returns(
    fields: list[tuple[bytes, bytes]], name: str
) -> None:
    headers = http.Headers(fields)
    assert header_value(headers, name.encode()) == headers.get(name, "")
    assert header_value(headers, name.encode(), "dflt") == headers.get(name, "dflt")
    assert header_view(headers).get(name, "") == headers.get(name, "")
