"""Echoed secrets are masked (aibridge.echo): which values are secrets, whole bodies, header
values, streams cut into chunks any way (property tests), compressed streams and bodies, and
the addon's hooks down to the SQLite file."""

from __future__ import annotations

import gzip
import itertools
import sqlite3
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from aibridge import echo
from aibridge.apis.openai_responses import API as RESPONSES_API
from aibridge.apis.openai_responses import ResponseAccumulator
from aibridge.auth import hint
from aibridge.bridge import AIBridge
from aibridge.config import Provider
from aibridge.echo import (
    CompressedStreamGuard,
    MaskedStream,
    Secrets,
    StreamMasker,
    mask_buffered,
    mask_bytes,
    mask_headers,
    secret_values,
    secrets_for,
)
from aibridge.transport import mitm_compat
from aibridge.transport.tee import StreamTee
from devtools import fake_upstream

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # the backport mitmproxy 12 depends on
    from backports import zstd

KEY = "sk-test-provider-key-0123456789abcdef"
AZURE_KEY = "azure-api-key-ABCDEFGH12345678"
TOKEN = "alice-token-0123456789"
props = settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def provider(api_key: str = KEY, **extra_headers: str) -> Provider:
    return Provider("p", "openai", "https://api.example.com/v1", api_key, extra_headers)


# ------------------------------------------------------------------------ which secrets


@pytest.mark.parametrize(
    "name",
    [
        "api-key",
        "X-Goog-Api-Key",
        "x-auth-token",
        "Authorization",
        "X-Client-Secret",
        "proxy-password",
        "X-Amz-Signature",
        "Cookie",
        "ocp-apim-subscription-key",
        "X-TOKEN",
    ],
)
def test_credential_headers_are_secrets(name: str) -> None:
    assert secret_values(KEY, {name: AZURE_KEY}) == [KEY, AZURE_KEY]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("api-version", "2024-10-21"),
        ("OpenAI-Beta", "responses=experimental"),
        ("OpenAI-Organization", "org-0123456789abcdef"),
        ("x-region", "westeurope-long-value"),
        ("accept", "application/json; version=2"),
    ],
)
def test_other_headers_are_not(name: str, value: str) -> None:
    assert secret_values(KEY, {name: value}) == [KEY]


@pytest.mark.parametrize("value", ["k", "abc", "1234567", "token12"])
def test_short_values_are_not_masked(value: str) -> None:
    assert secret_values(value, {"api-key": value}) == []
    assert not secrets_for(provider(value, **{"api-key": value}))
    body = b'{"id": "abc", "n": 1234567, "k": "token12"}'
    assert mask_bytes(body, Secrets([value])) is body


def test_a_scheme_s_credential_is_a_secret_on_its_own() -> None:
    values = secret_values(KEY, {"Authorization": "Bearer tok-0123456789"})
    assert values == [KEY, "Bearer tok-0123456789", "tok-0123456789"]
    assert (
        mask_bytes(b"got tok-0123456789", Secrets(values))
        == b"got " + hint("tok-0123456789").encode()
    )


def test_secrets_are_computed_once_per_set_of_values() -> None:
    with pytest.raises(TypeError):
        hash(provider())  # a dict inside: the cache cannot be keyed by the provider
    first = secrets_for(provider(**{"api-key": AZURE_KEY}))
    assert secrets_for(provider(**{"api-key": AZURE_KEY})) is first
    assert secrets_for(provider(**{"api-key": AZURE_KEY}), KEY) is first  # its own key
    assert secrets_for(provider()) is not first
    assert set(first.secrets) == {KEY.encode(), AZURE_KEY.encode()}
    byok = secrets_for(provider(), "sk-users-own-key-987654321")
    assert b"sk-users-own-key-987654321" in byok.secrets


def test_secrets_never_show_in_a_repr() -> None:
    text = repr(secrets_for(provider(**{"api-key": AZURE_KEY})))
    assert KEY not in text and AZURE_KEY not in text
    assert hint(KEY) in text


# -------------------------------------------------------------------------- whole bodies


SECRETS = Secrets([KEY, AZURE_KEY])


@pytest.mark.parametrize(
    ("body", "masked"),
    [
        (KEY, hint(KEY)),
        (f"Incorrect API key provided: {KEY}.", f"Incorrect API key provided: {hint(KEY)}."),
        (KEY + KEY + KEY, hint(KEY) * 3),
        (f"{KEY}\n{AZURE_KEY}", f"{hint(KEY)}\n{hint(AZURE_KEY)}"),
        (KEY[:-1], KEY[:-1]),
        ("sk-" + KEY, "sk-" + hint(KEY)),
    ],
)
def test_mask_bytes(body: str, masked: str) -> None:
    assert mask_bytes(body.encode(), SECRETS) == masked.encode()


def test_nothing_to_mask_is_the_same_object() -> None:
    body = b'{"output": "nothing secret here, sk-test-provider"}'
    assert mask_bytes(body, SECRETS) is body


def test_longest_secret_wins_where_two_start() -> None:
    short, long = "Sab0ab0ab0", "Sab0ab0ab0-and-more"
    both = Secrets([short, long])
    assert mask_bytes(long.encode(), both) == hint(long).encode()
    assert mask_bytes(f"{short}!".encode(), both) == f"{hint(short)}!".encode()


def test_header_values() -> None:
    headers = http.Headers(
        [
            (b"content-type", b"application/json"),
            (b"x-echo", KEY.encode()),
            (b"www-authenticate", f'Bearer realm="api", key="{AZURE_KEY}"'.encode()),
            (b"set-cookie", f"k={KEY}; Path=/".encode()),
            (b"x-plain", b"sk-test"),
        ]
    )
    assert mask_headers(headers, SECRETS)
    assert headers.fields == (
        (b"content-type", b"application/json"),
        (b"x-echo", hint(KEY).encode()),
        (b"www-authenticate", f'Bearer realm="api", key="{hint(AZURE_KEY)}"'.encode()),
        (b"set-cookie", f"k={hint(KEY)}; Path=/".encode()),
        (b"x-plain", b"sk-test"),
    )
    before = headers.fields
    assert not mask_headers(headers, SECRETS)
    assert headers.fields is before


# ----------------------------------------------------------------------------- streams


def through(masker: StreamMasker, chunks: list[bytes]) -> bytes:
    return b"".join(masker.feed(c) for c in chunks) + masker.close()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# Realistic secrets: they start with a letter no secret has elsewhere, so no hint can be
# completed into a secret by what surrounds it (a key that starts as it ends could be).
secret_bodies = st.text(alphabet="ab-0c", min_size=7, max_size=24)
realistic = st.lists(secret_bodies.map(lambda body: "S" + body), min_size=1, max_size=4)


@st.composite
def streams(draw: Any, secret_lists: Any = realistic) -> tuple[Secrets, bytes, list[int]]:
    """Secrets, a body made of bits of them and filler, and where it is cut."""
    values = draw(secret_lists)
    if draw(st.booleans()):  # one secret the prefix of another
        values.append(values[0] + draw(st.text(alphabet="abc-", min_size=1, max_size=6)))
    secrets = Secrets(values)
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        value = draw(st.sampled_from(values)).encode()
        kind = draw(st.integers(0, 3))
        if kind == 0:
            parts.append(value)
        elif kind == 1:  # a prefix, which a stream must hold until it is decided
            parts.append(value[: draw(st.integers(1, len(value)))])
        else:
            parts.append(
                draw(st.binary(max_size=12) | st.text("Sab-0c.\n", max_size=12).map(str.encode))
            )
    data = b"".join(parts)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=10))
    return secrets, data, cuts


@props
@given(streams())
def test_any_chunking_masks_as_the_whole(case: tuple[Secrets, bytes, list[int]]) -> None:
    secrets, data, cuts = case
    masker = StreamMasker(secrets)
    out = []
    for chunk in split_at(data, cuts):
        out.append(masker.feed(chunk))
        # Never more than a secret's length - 1 held back.
        assert 0 <= masker.holding <= secrets.longest - 1
    out.append(masker.close())
    masked = b"".join(out)
    assert masked == mask_bytes(data, secrets)
    for secret in secrets.secrets:
        assert secret not in masked
        assert all(secret not in piece for piece in out)


@props
@given(streams(st.lists(st.text(alphabet="ab", min_size=8, max_size=12), min_size=1, max_size=3)))
def test_any_chunking_masks_as_the_whole_for_any_secrets(
    case: tuple[Secrets, bytes, list[int]],
) -> None:
    """Secrets made of two letters overlap themselves and each other everywhere."""
    secrets, data, cuts = case
    assert through(StreamMasker(secrets), split_at(data, cuts)) == mask_bytes(data, secrets)


@props
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=12))
def test_bytes_without_secrets_come_through_unchanged(data: bytes, cuts: list[int]) -> None:
    assert through(StreamMasker(SECRETS), split_at(data, cuts)) == data


@pytest.mark.parametrize("secret", [KEY, "Sabcdefgh", AZURE_KEY])
def test_a_secret_split_at_every_offset(secret: str) -> None:
    secrets = Secrets([secret])
    body = f'data: {{"delta": "the key is {secret}, see"}}\n\n'.encode()
    start = body.index(secret.encode())
    want = body.replace(secret.encode(), hint(secret).encode())
    for offset in range(1, len(secret)):
        cut = start + offset
        assert through(StreamMasker(secrets), [body[:cut], body[cut:]]) == want, offset
    for pieces in range(2, len(secret) + 1):  # across 2..N chunks
        size = -(-len(secret) // pieces)
        cuts = [start + i for i in range(0, len(secret), size)] + [start + len(secret)]
        assert through(StreamMasker(secrets), split_at(body, cuts)) == want, pieces
    one_by_one = [body[i : i + 1] for i in range(len(body))]
    assert through(StreamMasker(secrets), one_by_one) == want


@pytest.mark.parametrize(
    ("chunks", "want"),
    [
        ([KEY.encode(), b" tail"], hint(KEY) + " tail"),  # at the start
        ([b"head ", KEY.encode()], "head " + hint(KEY)),  # at the end
        ([b"head ", KEY[:20].encode()], "head " + KEY[:20]),  # a prefix only, at the end
        ([(KEY + KEY).encode()[:50], (KEY + KEY).encode()[50:]], hint(KEY) * 2),  # repeated
        ([b"sk-t", b"sk-t", KEY.encode()], "sk-tsk-t" + hint(KEY)),  # overlapping prefixes
        (
            [b"sk-test-provider-key-0123456789abcdeXsk-test"],
            "sk-test-provider-key-0123456789abcdeXsk-test",
        ),
    ],
)
def test_stream_variants(chunks: list[bytes], want: str) -> None:
    assert through(StreamMasker(SECRETS), chunks) == want.encode()


def test_an_ordinary_chunk_is_passed_as_the_same_object() -> None:
    masker = StreamMasker(SECRETS)
    event = b'event: response.output_text.delta\ndata: {"delta": " words"}\n\n'
    assert masker.feed(event) is event
    # A tail that shares only what the hint shares (sk-t of sk-t...cdef) is sent at once too,
    # and so is the chunk after it.
    for chunk in (b"data: one s", b"k-t", b"x and more\n\n"):
        assert masker.feed(chunk) is chunk
        assert masker.holding == 0
    assert masker.close() == b""


def test_what_could_be_a_secret_waits_for_the_next_chunk() -> None:
    masker = StreamMasker(SECRETS)
    assert masker.feed(b"data: sk-test-pr") == b"data: sk-t"
    assert masker.holding == len("est-pr")
    assert masker.feed(b"ovider!") == b"est-provider!"
    assert masker.holding == 0
    assert masker.feed(b"data: sk-test-pr") == b"data: sk-t"
    assert masker.close() == b"est-pr"


# --------------------------------------------------------------- compressed streams


def gzip_chunks(events: list[bytes], encoding: str = "gzip") -> list[bytes]:
    """Each event compressed and flushed on its own, as a streaming server does."""
    if encoding == "br":
        compressor = brotli.Compressor()
        out = [compressor.process(e) + compressor.flush() for e in events]
        return [*out, compressor.finish()]
    if encoding == "zstd":
        zc = zstd.ZstdCompressor()
        out = [zc.compress(e) + zc.flush(zc.FLUSH_BLOCK) for e in events]
        return [*out, zc.flush()]
    wbits = 31 if encoding == "gzip" else 15
    comp = zlib.compressobj(wbits=wbits)
    out = [comp.compress(e) + comp.flush(zlib.Z_SYNC_FLUSH) for e in events]
    return [*out, comp.flush()]


def decoded(data: bytes, encoding: str) -> bytes:
    if encoding == "br":
        return brotli.Decompressor().process(data)
    if encoding == "zstd":
        return zstd.ZstdDecompressor().decompress(data)
    return zlib.decompressobj(wbits=31 if encoding == "gzip" else 15).decompress(data)


ENCODINGS = ["gzip", "deflate", "br", "zstd"]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("offset", [0, 1, 4, 5, 17, len(KEY) - 1, len(KEY)])
def test_a_compressed_stream_is_cut_before_the_secret(encoding: str, offset: int) -> None:
    secret_event = f'data: {{"delta": "{KEY}"}}\n\n'.encode()
    cut = secret_event.index(KEY.encode()) + offset
    events = [b"data: first\n\n", b"data: second\n\n", secret_event[:cut], secret_event[cut:]]
    events.append(b"data: after\n\n")
    kills: list[int] = []
    guard = CompressedStreamGuard(SECRETS, encoding, lambda: kills.append(1))
    sent = [guard.feed(c) for c in gzip_chunks(events, encoding)]
    sent.append(guard.close())
    text = decoded(b"".join(sent), encoding)
    assert KEY.encode() not in text
    assert text.startswith(b"data: first\n\ndata: second\n\n")
    assert b"after" not in text
    assert guard.cut is not None and "cut" in guard.cut
    assert kills == [1]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_compressed_stream_without_secrets_passes(encoding: str) -> None:
    events = [f"data: {i} sk-t {KEY[:-2]}\n\n".encode() for i in range(20)]
    chunks = gzip_chunks(events, encoding)
    guard = CompressedStreamGuard(SECRETS, encoding)
    sent = [guard.feed(c) for c in chunks] + [guard.close()]
    assert b"".join(sent) == b"".join(chunks)
    assert guard.cut is None
    plain = [b"data: %d\n\n" % i for i in range(5)]
    chunks = gzip_chunks(plain, encoding)
    guard = CompressedStreamGuard(SECRETS, encoding)
    assert all(guard.feed(c) is c for c in chunks)  # nothing to hold: at once, unchanged


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4),
        ("deflate", b"\xff" * 100),
        ("br", b"\x00not brotli at all" * 10),
        ("compress", b"LZW data nobody here reads"),
        ("gzip, br", b"stacked codings"),
    ],
)
def test_undecodable_streams_are_forwarded_unchecked(encoding: str, data: bytes) -> None:
    guard = CompressedStreamGuard(SECRETS, encoding)
    sent = [guard.feed(data[i : i + 64]) for i in range(0, len(data), 64)] + [guard.close()]
    assert b"".join(sent) == data
    assert guard.cut is None and guard.unchecked


def test_a_stream_past_the_decode_limit_is_cut() -> None:
    chunks = gzip_chunks([b"x" * 5000 for _ in range(5)])
    guard = CompressedStreamGuard(SECRETS, "gzip", limit=12_000)
    sent = [guard.feed(c) for c in chunks]
    assert sent[:2] == chunks[:2] and sent[2:] == [b""] * (len(chunks) - 2)
    assert guard.cut is not None and "could not be checked" in guard.cut


# --------------------------------------------------------------- buffered responses


def buffered(body: bytes, **headers: str) -> http.Response:
    return http.Response.make(200, b"", {"content-type": "application/json", **headers})


def with_raw(response: http.Response, raw: bytes) -> http.Response:
    response.raw_content = raw
    if "transfer-encoding" not in response.headers:
        response.headers["content-length"] = str(len(raw))
    return response


def test_a_buffered_body_is_masked_and_its_length_kept_right() -> None:
    body = orjson.dumps({"error": {"message": f"bad key {KEY}"}})
    response = with_raw(buffered(b""), body)
    assert mask_buffered(response, SECRETS) is None
    assert response.raw_content == body.replace(KEY.encode(), hint(KEY).encode())
    assert response.headers["content-length"] == str(len(response.raw_content))
    chunked = with_raw(buffered(b"", **{"transfer-encoding": "chunked"}), body)
    assert mask_buffered(chunked, SECRETS) is None
    assert KEY.encode() not in chunked.raw_content
    assert "content-length" not in chunked.headers


def test_a_buffered_body_without_secrets_is_untouched() -> None:
    body = b'{"id": "resp_1", "output": []}'
    response = with_raw(buffered(b""), body)
    assert mask_buffered(response, SECRETS) is None
    assert response.raw_content is body


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_compressed_body_is_masked_and_encoded_again(encoding: str) -> None:
    body = orjson.dumps({"output": f"{KEY} and {AZURE_KEY}"})
    raw = http.Response.make(200, b"", {"content-encoding": encoding})
    raw.content = body  # mitmproxy encodes it
    response = with_raw(buffered(b"", **{"content-encoding": encoding}), raw.raw_content or b"")
    assert mask_buffered(response, SECRETS) is None
    assert response.headers["content-encoding"] == encoding
    assert response.content == f'{{"output":"{hint(KEY)} and {hint(AZURE_KEY)}"}}'.encode()
    assert KEY.encode() not in (response.raw_content or b"")
    assert response.headers["content-length"] == str(len(response.raw_content or b""))
    plain = with_raw(buffered(b"", **{"content-encoding": encoding}), raw.raw_content or b"")
    plain.raw_content = gzip.compress(b"{}") if encoding == "gzip" else plain.raw_content
    kept = plain.raw_content
    if encoding == "gzip":
        assert mask_buffered(plain, SECRETS) is None
        assert plain.raw_content is kept


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_compressed_body_past_the_limit_cannot_be_forwarded(encoding: str) -> None:
    raw = http.Response.make(200, b"", {"content-encoding": encoding})
    raw.content = b"0" * 100_000
    response = with_raw(buffered(b"", **{"content-encoding": encoding}), raw.raw_content or b"")
    refusal = mask_buffered(response, SECRETS, limit=50_000)
    assert refusal is not None and "could not be checked" in refusal


def test_a_corrupt_compressed_body() -> None:
    readable = gzip.compress(f"the key: {KEY} and more text".encode())[:-12]  # truncated
    response = with_raw(buffered(b"", **{"content-encoding": "gzip"}), readable)
    refusal = mask_buffered(response, SECRETS)
    assert refusal is not None and "corrupt" in refusal
    harmless = gzip.compress(b"nothing secret in here at all")[:-12]
    response = with_raw(buffered(b"", **{"content-encoding": "gzip"}), harmless)
    assert mask_buffered(response, SECRETS) is None
    assert response.raw_content is harmless  # nobody can read past the damage either


def test_trailers_are_masked() -> None:
    response = with_raw(buffered(b""), b"{}")
    response.trailers = http.Headers([(b"x-echo", KEY.encode())])
    mask_buffered(response, SECRETS)
    assert response.trailers.fields == ((b"x-echo", hint(KEY).encode()),)


def test_masked_stream_for_bodies_mitmproxy_streams_itself() -> None:
    stream = MaskedStream(StreamMasker(SECRETS))
    assert stream(KEY.encode()[:10]) == KEY.encode()[:4]
    assert stream(KEY.encode()[10:]) == hint(KEY).encode()[4:]
    assert stream(b"sk-test-pr") == b"sk-t"
    assert stream(b"") == b"est-pr"


def test_the_tee_sends_and_parses_the_masked_chunks() -> None:
    accumulator = ResponseAccumulator()
    tee = StreamTee(accumulator, RESPONSES_API, "", StreamMasker(SECRETS))
    event = orjson.dumps(
        {
            "type": "response.output_item.done",
            "item": fake_upstream.function_call_item("shell", {"cmd": f"echo {KEY}"}),
        }
    )
    raw = b"event: response.output_item.done\ndata: " + event + b"\n\n"
    cut = raw.index(KEY.encode()) + 9
    assert tee(raw[:cut]) == raw[: cut - 5]  # "sk-t" is sent, "est-p" waits
    rest = tee(raw[cut:])
    assert tee(b"") == b""
    sent = raw[: cut - 5] + rest
    assert sent == raw.replace(KEY.encode(), hint(KEY).encode())
    assert tee.bytes_forwarded == len(sent)
    (tool,) = accumulator.result().tool_usages
    assert KEY not in str(tool) and hint(KEY) in str(tool)


def test_the_tee_holds_with_an_empty_iterable_never_an_empty_chunk() -> None:
    guard = CompressedStreamGuard(SECRETS, "gzip")
    tee = StreamTee(ResponseAccumulator(), RESPONSES_API, "gzip", guard)
    chunks = gzip_chunks([b"data: sk-test-pro", b"vider\n\n"])
    first = tee(chunks[0])
    assert first == () and first != b""  # b"" would end an HTTP/1 chunked body
    assert tee(chunks[1]) == chunks[0] + chunks[1]
    assert tee(chunks[2]) == chunks[2]
    assert tee(b"") == b""


# --------------------------------------------------------------------- the addon's hooks

PASSTHROUGH_URL = "https://api.openai.com/v1/models"


@pytest.fixture
def bridge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AIBridge]:
    monkeypatch.chdir(tmp_path)
    config = {
        "database": str(tmp_path / "audit.db"),
        "byok": True,
        "providers": [
            {
                "name": "openai",
                "type": "openai",
                "base_url": "https://api.openai.com/v1",
                "api_key": KEY,
                "extra_headers": {"api-key": AZURE_KEY, "api-version": "2024-10-21"},
            }
        ],
        "users": [{"id": "alice", "token": TOKEN}],
    }
    path = tmp_path / "aibridge.yaml"
    path.write_text(yaml.safe_dump(config))
    addon = AIBridge(default_config_dir=tmp_path)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, aibridge_config=str(path))
        yield addon
        addon.done()


def sent_flow(
    addon: AIBridge, body: dict[str, Any], url: str = "", token: str = TOKEN
) -> http.HTTPFlow:
    method = "GET" if url else "POST"
    request = http.Request.make(
        method,
        url or "https://api.openai.com/v1/responses",
        orjson.dumps(body) if not url else b"",
        {},
    )
    request.headers["authorization"] = f"Bearer {token}"
    request.headers["content-type"] = "application/json"
    flow = tflow.tflow(req=request)
    addon.request(flow)
    assert flow.response is None
    mitm_compat.run_before_send(flow)
    return flow


def stored(addon: AIBridge, tmp_path: Path) -> bytes:
    assert addon.recorder is not None and addon.recorder.flush(timeout=10)
    return b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*"))


def rows(addon: AIBridge, tmp_path: Path, sql: str) -> list[dict[str, Any]]:
    stored(addon, tmp_path)
    conn = sqlite3.connect(tmp_path / "audit.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def leaks(blob: bytes) -> list[str]:
    return [s for s in (KEY, AZURE_KEY, TOKEN) if s.encode() in blob]


def completed_object(text: str, arguments: dict[str, Any]) -> dict[str, Any]:
    outcome = fake_upstream.Outcome(
        [
            fake_upstream.reasoning_item([text]),
            fake_upstream.function_call_item("shell", arguments),
        ],
        fake_upstream.usage(10, 5),
    )
    return fake_upstream.response_object({"model": "m"}, "resp_echo", 1, outcome)


def test_hook_response_headers_are_masked(bridge: AIBridge, tmp_path: Path) -> None:
    flow = sent_flow(bridge, {"model": "m", "input": "hi"})
    flow.response = http.Response.make(
        200,
        orjson.dumps(completed_object("ok", {})),
        {"content-type": "application/json", "x-echo": f"key={KEY}", "x-azure": AZURE_KEY},
    )
    bridge.responseheaders(flow)
    assert flow.response.headers["x-echo"] == f"key={hint(KEY)}"
    assert flow.response.headers["x-azure"] == hint(AZURE_KEY)
    bridge.response(flow)
    assert leaks(bytes(flow.response.headers)) == []


@pytest.mark.parametrize("status", [200, 401, 500])
def test_hook_buffered_bodies_are_masked_before_the_records(
    bridge: AIBridge, tmp_path: Path, status: int
) -> None:
    if status == 200:
        body = orjson.dumps(completed_object(f"think {KEY}", {"cmd": f"use {AZURE_KEY}"}))
    else:
        body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}})
    flow = sent_flow(bridge, {"model": "m", "input": "hi"})
    flow.response = http.Response.make(status, body, {"content-type": "application/json"})
    bridge.responseheaders(flow)
    assert not flow.response.stream
    bridge.response(flow)
    client = flow.response.raw_content or b""
    assert leaks(client) == []
    assert hint(KEY).encode() in client
    assert flow.response.headers["content-length"] == str(len(client))
    (row,) = rows(bridge, tmp_path, "select * from interceptions")
    if status == 200:
        assert row["status"] == "completed"
        (tool,) = rows(bridge, tmp_path, "select * from tool_usages")
        assert hint(AZURE_KEY) in tool["args"]
        (thought,) = rows(bridge, tmp_path, "select * from model_thoughts")
        assert thought["content"] == f"think {hint(KEY)}"
    else:
        assert (
            row["error"]
            == f"upstream answered HTTP {status}: Incorrect API key provided: {hint(KEY)}"
        )
    assert leaks(stored(bridge, tmp_path)) == []


def test_hook_a_users_own_key_is_masked_too(bridge: AIBridge, tmp_path: Path) -> None:
    own = "sk-alices-own-key-5555555555"
    flow = sent_flow(bridge, {"model": "m", "input": "hi"}, token=own)
    body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {own}"}})
    flow.response = http.Response.make(401, body, {"content-type": "application/json"})
    bridge.responseheaders(flow)
    bridge.response(flow)
    assert own.encode() not in (flow.response.raw_content or b"")
    assert own.encode() not in stored(bridge, tmp_path)


def test_hook_passthrough_bodies_are_masked(bridge: AIBridge) -> None:
    flow = sent_flow(bridge, {}, url=PASSTHROUGH_URL)
    flow.response = http.Response.make(
        200, f'{{"data": [], "debug": "{KEY}"}}'.encode(), {"content-type": "application/json"}
    )
    bridge.responseheaders(flow)
    bridge.response(flow)
    assert flow.response.raw_content == f'{{"data": [], "debug": "{hint(KEY)}"}}'.encode()


def sse(*events: dict[str, Any]) -> bytes:
    writer = fake_upstream.SseWriter()
    return b"".join(writer.frame(e.pop("type"), **e) for e in events)


def echoing_stream(secret: str) -> bytes:
    obj = completed_object(f"reasoning about {secret}", {"cmd": f"curl -H 'key: {secret}'"})
    return sse(
        {"type": "response.created", "response": {**obj, "status": "in_progress", "output": []}},
        {"type": "response.output_item.done", "output_index": 0, "item": obj["output"][0]},
        {"type": "response.completed", "response": obj},
    )


@pytest.mark.parametrize("size", [1, 7, 97, 4096])
def test_hook_sse_stream_is_masked_for_the_client_and_the_records(
    bridge: AIBridge, tmp_path: Path, size: int
) -> None:
    flow = sent_flow(bridge, {"model": "m", "input": "hi", "stream": True})
    flow.response = http.Response.make(
        200, b"", {"content-type": "text/event-stream", "content-length": "99999"}
    )
    bridge.responseheaders(flow)
    assert "content-length" not in flow.response.headers  # masking may shorten the body
    stream = flow.response.stream
    assert isinstance(stream, StreamTee)
    raw = echoing_stream(KEY)
    sent = b""
    for i in range(0, len(raw), size):
        out = stream(raw[i : i + size])
        assert isinstance(out, bytes | tuple) and out != b""
        sent += out if isinstance(out, bytes) else b"".join(out)
    sent += stream(b"")
    bridge.response(flow)
    assert sent == raw.replace(KEY.encode(), hint(KEY).encode())
    (row,) = rows(bridge, tmp_path, "select * from interceptions")
    assert row["status"] == "completed"
    (tool,) = rows(bridge, tmp_path, "select * from tool_usages")
    assert hint(KEY) in tool["args"]
    assert leaks(stored(bridge, tmp_path)) == []


def test_hook_gzip_stream_with_a_secret_is_cut_and_killed(bridge: AIBridge, tmp_path: Path) -> None:
    flow = sent_flow(bridge, {"model": "m", "input": "hi", "stream": True})
    flow.response = http.Response.make(
        200, b"", {"content-type": "text/event-stream", "content-encoding": "gzip"}
    )
    bridge.responseheaders(flow)
    stream = flow.response.stream
    assert isinstance(stream, StreamTee)
    raw = echoing_stream(KEY)
    first_event = raw[: raw.index(b"\n\n") + 2]
    chunks = gzip_chunks([first_event, raw[len(first_event) :]])
    assert stream(chunks[0]) is chunks[0]
    assert stream(chunks[1]) == ()  # the chunk with the secret is never sent
    assert stream(chunks[2]) == ()
    assert flow.error is not None and flow.error.msg == "Connection killed."
    assert stream(b"") == b""
    bridge.response(flow)
    (row,) = rows(bridge, tmp_path, "select * from interceptions")
    assert row["status"] == "error"
    assert "echoed a provider secret" in row["error"] and "cut" in row["error"]
    assert leaks(stored(bridge, tmp_path)) == []


def test_hook_gzip_body_with_a_secret_is_masked(bridge: AIBridge, tmp_path: Path) -> None:
    flow = sent_flow(bridge, {"model": "m", "input": "hi"})
    flow.response = http.Response.make(
        200, b"", {"content-type": "application/json", "content-encoding": "gzip"}
    )
    flow.response.content = orjson.dumps(completed_object(f"k {KEY}", {}))
    bridge.responseheaders(flow)
    bridge.response(flow)
    assert flow.response.headers["content-encoding"] == "gzip"
    assert KEY.encode() not in (flow.response.content or b"")
    assert hint(KEY).encode() in (flow.response.content or b"")
    (row,) = rows(bridge, tmp_path, "select * from interceptions")
    assert row["status"] == "completed"
    assert leaks(stored(bridge, tmp_path)) == []


def test_hook_gzip_bomb_is_answered_with_502(
    bridge: AIBridge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(echo, "BODY_DECODE_LIMIT", 1000)
    flow = sent_flow(bridge, {"model": "m", "input": "hi"})
    flow.response = http.Response.make(
        200, b"", {"content-type": "application/json", "content-encoding": "gzip"}
    )
    flow.response.content = b" " * 5000
    bridge.responseheaders(flow)
    bridge.response(flow)
    assert flow.response.status_code == 502
    assert b"could not be checked" in (flow.response.content or b"")
    (row,) = rows(bridge, tmp_path, "select * from interceptions")
    assert (row["status"], row["http_status"]) == ("error", 502)
    assert "could not be checked" in row["error"]


def test_hook_large_bodies_mitmproxy_streams_are_masked(bridge: AIBridge) -> None:
    flow = sent_flow(bridge, {}, url=PASSTHROUGH_URL)
    flow.response = http.Response.make(200, b"", {"content-type": "application/json"})
    flow.response.stream = True  # stream_large_bodies
    bridge.responseheaders(flow)
    stream = flow.response.stream
    assert isinstance(stream, MaskedStream)
    body = f'{{"debug": "{KEY}"}}'.encode()
    sent = b"".join(
        out if isinstance(out, bytes) else b"".join(out)
        for out in (stream(body[:20]), stream(body[20:]), stream(b""))
    )
    assert sent == body.replace(KEY.encode(), hint(KEY).encode())


def test_hook_no_secrets_no_masking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider whose key is too short to mask: the tee has no masker, chunks pass as is."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "aibridge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "database": str(tmp_path / "audit.db"),
                "providers": [
                    {"name": "o", "base_url": "https://api.openai.com/v1", "api_key": "k"}
                ],
                "users": [{"id": "alice", "token": TOKEN}],
            }
        )
    )
    addon = AIBridge(default_config_dir=tmp_path)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, aibridge_config=str(path))
        flow = sent_flow(addon, {"model": "m", "input": "hi", "stream": True})
        flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
        addon.responseheaders(flow)
        tee = flow.response.stream
        assert isinstance(tee, StreamTee) and tee.masker is None
        chunk = b"data: k k k\n\n"
        assert tee(chunk) is chunk
        addon.done()


def test_hook_trailers_of_a_stream_are_masked(bridge: AIBridge) -> None:
    flow = sent_flow(bridge, {"model": "m", "input": "hi", "stream": True})
    flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    bridge.responseheaders(flow)
    stream = flow.response.stream
    assert callable(stream)
    stream(b"data: {}\n\n")
    stream(b"")
    flow.response.trailers = http.Headers([(b"x-echo", KEY.encode())])
    bridge.response(flow)
    assert flow.response.trailers.fields == ((b"x-echo", hint(KEY).encode()),)
