"""Hostile Anthropic upstreams: malformed, truncated, compressed and oversized Messages
streams never crash the bridge, reach the client byte for byte, and are recorded with what
could be read and why it ended (the Messages side of tests/test_hostile_input.py)."""

from __future__ import annotations

import contextlib
import functools
import gzip
import random
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from aibridge.apis import anthropic_messages
from aibridge.apis.anthropic_messages import MAX_BLOCK_BYTES
from aibridge.config import hint
from devtools.fake_upstream import FakeUpstream
from tests.harness import (
    PROVIDER_KEY,
    TOKENS,
    ChunkedReplies,
    Mitmdump,
    bridge_config,
    query,
    wait_for,
)
from tests.test_hostile_input import api_rows, fuzz_into_recorder, tee_outcome

SAFETY = 60.0  # upper bound for waits; never asserted as a duration
FIXTURES = Path(__file__).parent / "fixtures" / "anthropic_messages"
STREAMS = sorted(FIXTURES.glob("*.response.sse"))
API = anthropic_messages.API


through_tee = functools.partial(tee_outcome, API)
rows_of = functools.partial(api_rows, API, b'{"model": "m", "messages": []}', "anthropic")


def test_fuzzed_messages_streams_forward_unchanged_and_record_cleanly(tmp_path: Path) -> None:
    """A seeded fuzz run over every golden Messages stream, its rows written by the recorder."""
    rng = random.Random(20_261_201)
    fuzz_into_recorder(tmp_path / "fuzz.db", STREAMS, 30, rng, through_tee, rows_of)


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name.removesuffix(".response.sse"))
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_compressed_stream_gives_the_records_of_the_plain_one(path: Path, encoding: str) -> None:
    import brotli

    from aibridge.transport.inflate import zstd

    plain = path.read_bytes()
    compress = {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": lambda data: zstd.compress(data),
    }[encoding]
    rng = random.Random(5)
    assert through_tee(compress(plain), rng, encoding) == through_tee(plain, rng)


# --- through a real mitmdump ------------------------------------------------------------------


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data)) for name, data in events
    )


def message_start(usage: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    message = {
        "id": "msg_hostile",
        "type": "message",
        "role": "assistant",
        "model": "claude-hostile",
        "content": [],
        "stop_reason": None,
        "usage": usage or {"input_tokens": 10, "output_tokens": 1},
    }
    return "message_start", {"type": "message_start", "message": message}


def ending(reason: str = "end_turn", output: int = 5) -> bytes:
    return sse(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason},
                "usage": {"output_tokens": output},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    )


def tool_block(index: int, partial: str) -> bytes:
    return sse(
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {
                    "type": "tool_use",
                    "id": f"toolu_{index}",
                    "name": "t",
                    "input": {},
                },
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": partial},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    )


def hostile_cases() -> dict[str, tuple[int, str, dict[str, str], bytes, str, str | None]]:
    """(status, content type, extra headers, body, expected status, expected error part)."""
    rng = random.Random(12)
    golden = (FIXTURES / "tool_use_streamed.response.sse").read_bytes()
    es = "text/event-stream"
    huge_input = '{"blob": "' + "x" * (MAX_BLOCK_BYTES + 10) + '"}'
    return {
        "random_bytes": (200, es, {}, rng.randbytes(65536), "error", None),
        "gzip_golden": (
            200,
            es,
            {"content-encoding": "gzip"},
            gzip.compress(golden),
            "completed",
            None,
        ),
        "bad_gzip": (
            200,
            es,
            {"content-encoding": "gzip"},
            b"\x1f\x8b\x08\x00" + rng.randbytes(5000),
            "error",
            None,
        ),
        "unknown_encoding": (200, es, {"content-encoding": "lzma"}, golden, "error", "lzma"),
        "cr_line_ends": (200, es, {}, golden.replace(b"\n", b"\r"), "completed", None),
        "oversized_event": (
            200,
            es,
            {},
            sse(message_start()) + b"data: " + b"z" * (9 << 20) + b"\n\n" + ending(),
            "completed",
            None,
        ),
        "tool_input_over_the_cap": (
            200,
            es,
            {},
            sse(message_start())
            + tool_block(0, huge_input)
            + tool_block(1, '{"ok": 1}')
            + ending(),
            "completed",
            "over the size limit",
        ),
        "wrong_types_everywhere": (
            200,
            es,
            {},
            sse(
                ("message_start", {"type": "message_start", "message": "nope"}),
                ("content_block_start", {"type": "content_block_start", "index": "0"}),
                ("content_block_delta", {"type": "content_block_delta", "index": True, "delta": 3}),
                (
                    "message_delta",
                    {"type": "message_delta", "delta": [], "usage": {"output_tokens": -1}},
                ),
            )
            + ending(),
            "completed",
            None,
        ),
        "error_after_text": (
            200,
            es,
            {},
            sse(
                message_start(),
                (
                    "error",
                    {
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"},
                    },
                ),
            ),
            "error",
            "Overloaded",
        ),
        "gzip_529": (
            529,
            "application/json",
            {"content-encoding": "gzip"},
            gzip.compress(
                orjson.dumps(
                    {"type": "error", "error": {"type": "overloaded_error", "message": "Busy"}}
                )
            ),
            "upstream_error",
            "upstream answered HTTP 529: Busy",
        ),
        "html_502": (
            502,
            "text/html",
            {},
            b"<html>bad gateway</html>",
            "upstream_error",
            "HTTP 502",
        ),
        "json_garbage": (
            200,
            "application/json",
            {},
            b'{"id": "msg_x", "content": [' + b"{" * 5000,
            "error",
            None,
        ),
    }


CASES = hostile_cases()
ECHOED = orjson.dumps(
    {
        "type": "error",
        "error": {"type": "authentication_error", "message": f"invalid x-api-key: {PROVIDER_KEY}"},
    }
)
CASES["echoed_key"] = (401, "application/json", {}, ECHOED, "upstream_error", hint(PROVIDER_KEY))
CASES["echoed_key_in_stream"] = (
    200,
    "text/event-stream",
    {},
    sse(message_start()) + tool_block(0, orjson.dumps({"key": PROVIDER_KEY}).decode()) + ending(),
    "completed",
    None,
)


def hostile_reply(headers: Any) -> tuple[int, str, dict[str, str], bytes]:
    """The case the request's ``x-case`` header names."""
    status, content_type, extra, body, _, _ = CASES[headers["x-case"]]
    return status, content_type, extra, body


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mitmdump]:
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(FakeUpstream())
        hostile = stack.enter_context(ChunkedReplies(hostile_reply))
        config = bridge_config(fake.url)
        config["providers"] = [
            {
                "name": "hostile",
                "type": "anthropic",
                "base_url": f"{hostile.url}/v1",
                "api_key": "${TEST_PROVIDER_KEY}",
            }
        ]
        yield stack.enter_context(Mitmdump(tmp_path_factory.mktemp("hostile"), config))


@pytest.mark.parametrize("case", CASES)
def test_hostile_messages_upstream(served: Mitmdump, case: str) -> None:
    status, _, _, expected, want_status, want_error = CASES[case]
    start = len(served.log())
    session = uuid.uuid4().hex
    headers = {
        "x-api-key": TOKENS["alice"],
        "x-case": case,
        "x-claude-code-session-id": session,
        "anthropic-version": "2023-06-01",
    }
    body = orjson.dumps(
        {
            "model": "m",
            "max_tokens": 5,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        }
    )
    url = f"{served.url}/hostile/v1/messages"
    with httpx.stream("POST", url, content=body, headers=headers, timeout=SAFETY) as r:
        received = b"".join(r.iter_raw())
    assert r.status_code == status
    if case.startswith("echoed_key"):
        # The provider key that upstream echoed is masked before the client sees it.
        expected = expected.replace(PROVIDER_KEY.encode(), hint(PROVIDER_KEY).encode())
        assert PROVIDER_KEY.encode() not in received
    assert received == expected  # byte for byte, compressed or not
    sql = "select * from interceptions where client_session_id = ? and ended_at is not null"
    (row,) = wait_for(lambda: query(served.db_path, sql, (session,)), SAFETY)
    assert (row["api"], row["initiator_id"], row["http_status"]) == ("messages", "alice", status)
    assert row["status"] == want_status, row
    if want_error is not None:
        assert want_error in (row["error"] or ""), row
    assert "Traceback" not in served.log()[start:]
    everything = str(query(served.db_path, "select * from tool_usages")) + str(row)
    assert PROVIDER_KEY not in everything and TOKENS["alice"] not in everything
    if case == "tool_input_over_the_cap":
        tools = query(
            served.db_path,
            "select call_id, args from tool_usages where interception_id = ? order by rowid",
            (row["id"],),
        )
        # The block past the cap keeps its row without arguments; the other is whole.
        assert tools == [
            {"call_id": "toolu_0", "args": None},
            {"call_id": "toolu_1", "args": '{"ok":1}'},
        ]
