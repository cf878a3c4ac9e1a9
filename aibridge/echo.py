"""Secrets that upstream echoes back are masked (DESIGN.md §6).

The bridge sends a provider its key (and sometimes secret extra headers). A provider that
echoes one back, in a response header, a body, an error message or an SSE event, must not
hand it to the client, the SQLite log, mitmweb or a saved flow: every occurrence becomes the
secret's hint (``auth.hint``), the form the log keeps of every credential.

- ``secrets_for``: which secrets a provider has, computed once per set of values;
- ``mask_bytes`` / ``mask_headers``: a whole body, header values;
- ``StreamMasker``: the same, chunk by chunk, for an uncompressed stream;
- ``CompressedStreamGuard``: a compressed stream cannot be masked in place, so it is cut
  right before the chunk that would deliver a secret;
- ``mask_buffered``: a finished buffered response, compressed or not.

Matching is leftmost-longest: scanning from the left, the longest secret that starts at a
position wins, and the scan goes on after it. ``StreamMasker`` gives exactly what
``mask_bytes`` gives for the whole stream, however it is cut into chunks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, Protocol

from mitmproxy import http

from aibridge import auth
from aibridge.config import Provider
from aibridge.headers import header_value
from aibridge.transport.inflate import (
    PASS_THROUGH,
    BoundedInflater,
    DecodeLimitExceeded,
    normalize,
)

log = logging.getLogger(__name__)

# An extra header is a secret if its name says so (api-key, x-auth-token, cookie, ...);
# other extra headers (api-version: 2024-10-21, OpenAI-Beta) are plain values.
CREDENTIAL_WORDS: Final = ("key", "token", "auth", "secret", "password", "signature", "cookie")
# Shorter values are not masked: they occur by chance in ordinary text (a 4-character value
# would be replaced inside words, numbers and base64), so masking them would corrupt
# answers, and a value that short is no credential worth guarding.
MIN_SECRET_LENGTH: Final = 8
# A body decoded to check it is decoded at most this far: a real Responses object is a few
# MB, and 32 MiB keeps a bomb's cost under the 64 MB of DESIGN.md §8.
BODY_DECODE_LIMIT = 32 << 20
# A compressed stream is checked up to this much decoded output (the longest real stream is
# about 35 MB); past it the stream is cut: it can no longer be checked.
STREAM_DECODE_LIMIT: Final = 128 << 20
_UTF8 = "utf-8"


class Secrets:
    """A set of secrets and their replacements, with what the stream masker looks up."""

    __slots__ = ("_ends", "_firsts", "_keep", "_replace", "longest", "pattern", "secrets")

    def __init__(self, values: Iterable[str]) -> None:
        unique = {v.encode(_UTF8, "surrogateescape") for v in values if len(v) >= MIN_SECRET_LENGTH}
        # Longest first: the regex alternation then prefers the longest at a position.
        self.secrets: tuple[bytes, ...] = tuple(sorted(unique, key=lambda s: (-len(s), s)))
        replacements = {
            s: auth.hint(s.decode(_UTF8, "surrogateescape")).encode(_UTF8, "surrogateescape")
            for s in self.secrets
        }
        self._replace = replacements.__getitem__
        # How many leading bytes a secret shares with its replacement: that much of a
        # possible secret can be sent before it is known to be one (it is sent either way).
        self._keep = {s: _common_prefix(s, r) for s, r in replacements.items()}
        self.longest = len(self.secrets[0]) if self.secrets else 0
        self.pattern: re.Pattern[bytes] | None = (
            re.compile(b"|".join(re.escape(s) for s in self.secrets)) if self.secrets else None
        )
        self._firsts = frozenset(s[0] for s in self.secrets)
        # Last byte of a chunk -> the proper prefixes of secrets ending with it, longest
        # first, as (secret, length). A chunk whose last byte is not here ends no prefix:
        # the one dictionary look-up of the common case.
        ends: dict[int, set[tuple[bytes, int]]] = {}
        for s in self.secrets:
            for k in range(1, len(s)):
                ends.setdefault(s[k - 1], set()).add((s, k))
        self._ends = {b: tuple(sorted(p, key=lambda p: (-p[1], p[0]))) for b, p in ends.items()}

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def __repr__(self) -> str:  # never the secrets themselves
        hints = [self._replace(s).decode(_UTF8, "replace") for s in self.secrets]
        return f"Secrets({hints})"


def _common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def secret_values(api_keys: str | Sequence[str], extra_headers: Mapping[str, str]) -> list[str]:
    """What of a provider's configuration is secret: its keys (all of a pool: an echo of any
    is masked), and extra header values whose name says they are credentials (the token
    alone too, for ``Bearer <token>``)."""
    values = [api_keys] if isinstance(api_keys, str) else list(api_keys)
    for name, value in extra_headers.items():
        if any(word in name.lower() for word in CREDENTIAL_WORDS):
            values.append(value)
            _, space, credential = value.strip().partition(" ")
            if space and credential.strip():
                values.append(credential.strip())
    return [v for v in values if len(v) >= MIN_SECRET_LENGTH]


def secrets_for(provider: Provider, upstream_key: str = "") -> Secrets:
    """The secrets of a provider, plus the credential that went upstream (a user's own key
    with BYOK, a ChatGPT sign-in), computed once. Providers hold a dict (extra_headers), so
    they are not hashable: the cache is keyed by the values."""
    extra = "" if upstream_key in provider.api_keys else upstream_key
    return _secrets(provider.api_keys, tuple(provider.extra_headers.items()), extra)


@functools.lru_cache(maxsize=256)
def _secrets(
    api_keys: tuple[str, ...], extra_headers: tuple[tuple[str, str], ...], extra: str
) -> Secrets:
    return Secrets([*secret_values(api_keys, dict(extra_headers)), extra])


def mask_bytes(data: bytes, secrets: Secrets) -> bytes:
    """Every secret in `data` replaced by its hint; `data` itself when there is none."""
    find = data.find
    for s in secrets.secrets:
        if find(s) >= 0:
            break
    else:
        return data
    assert secrets.pattern is not None
    replace = secrets._replace
    return secrets.pattern.sub(lambda m: replace(m.group()), data)


def mask_headers(headers: http.Headers, secrets: Secrets) -> bool:
    """Mask secrets in header values, in place; whether any was found."""
    fields = headers.fields
    changed: list[tuple[bytes, bytes]] | None = None
    for index, (name, value) in enumerate(fields):
        masked = mask_bytes(value, secrets)
        if masked is not value:
            changed = changed or list(fields)
            changed[index] = (name, masked)
    if changed is None:
        return False
    headers.fields = tuple(changed)
    return True


class ChunkMasker(Protocol):
    """What ``StreamTee`` is given: the bytes to send for each chunk, and at the end."""

    cut: str | None  # why the stream was cut, if it was

    def feed(self, chunk: bytes) -> bytes: ...

    def close(self) -> bytes: ...


class StreamMasker:
    """``mask_bytes`` chunk by chunk: ``feed`` returns what can be sent of a chunk, secrets
    replaced; ``close`` returns the rest at the end.

    Only a tail that could be the start of a secret waits for the next chunk, and of it
    only what could differ once masked: a secret and its hint share their first few bytes
    (``sk-p`` of ``sk-p...cdef``), which are sent at once. A chunk whose tail can start no
    secret (the normal case: SSE chunks end with a newline) and holds none is returned
    as the same object.
    """

    __slots__ = ("_held", "_s", "_sent", "cut", "matches")

    def __init__(self, secrets: Secrets) -> None:
        self._s = secrets
        # The undecided tail (where a secret may start), kept to match against what
        # follows, and how much of its masked form has been sent already.
        self._held = b""
        self._sent = 0
        self.matches = 0  # secrets replaced so far
        self.cut: str | None = None  # never cuts; ChunkMasker

    @property
    def holding(self) -> int:
        """Bytes withheld from the output until the next chunk says what they are."""
        return len(self._held) - self._sent

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        held = self._held
        data = held + chunk if held else chunk
        s = self._s
        ends = s._ends.get(data[-1])
        find = data.find  # measured 3-4x faster than `in` on bytes
        for secret in s.secrets:
            if find(secret) >= 0:
                return self._resolve(data, chunk, ends, True)
        if ends is not None:
            return self._resolve(data, chunk, ends, False)
        if not held:
            return chunk
        sent = self._sent
        self._held, self._sent = b"", 0
        return chunk if sent == len(held) else data[sent:]

    def close(self) -> bytes:
        held, sent = self._held, self._sent
        self._held, self._sent = b"", 0
        if not held:
            return b""
        return self._masked(held, len(held))[sent:]

    def _resolve(
        self, data: bytes, chunk: bytes, ends: tuple[tuple[bytes, int], ...] | None, found: bool
    ) -> bytes:
        s = self._s
        n = len(data)
        assert s.pattern is not None
        matches = [(m.start(), m.end()) for m in s.pattern.finditer(data)] if found else []
        # The first position a secret may start at that more bytes could decide otherwise
        # (not inside a match before it): everything before it is final.
        hold = n
        for secret, k in ends or ():
            q = n - k
            inside = any(start < q < end for start, end in matches)
            if k <= n and data[q:] == secret[:k] and not inside:
                hold = q
                break
        decided = self._masked(data, hold, matches)
        region = data[hold:]
        sendable = self._sendable(region)
        sent = self._sent
        self._held = region
        self._sent = max(sendable, sent - len(decided))
        unmasked = not matches or matches[0][0] >= hold
        if unmasked and sendable == len(region) and sent == n - len(chunk):
            return chunk  # nothing masked, nothing withheld: the chunk as it came
        return (decided + region[:sendable])[sent:]

    def _masked(self, data: bytes, end: int, matches: list[tuple[int, int]] | None = None) -> bytes:
        """data[:end] masked (`matches`: data's, if known); counts the matches."""
        s = self._s
        if matches is None:
            assert s.pattern is not None
            matches = [(m.start(), m.end()) for m in s.pattern.finditer(data, 0, end)]
        if not matches or matches[0][0] >= end:
            return data[:end] if end < len(data) else data
        parts: list[bytes] = []
        pos = 0
        for start, stop in matches:
            if start >= end:
                break
            parts += (data[pos:start], s._replace(data[start:stop]))
            pos = stop
            self.matches += 1
        parts.append(data[pos:end])
        return b"".join(parts)

    def _sendable(self, region: bytes) -> int:
        """How much of an undecided tail is the same however it is decided: up to the
        shared prefix (`keep`) of every secret that may match at each position."""
        s = self._s
        r = len(region)
        sendable = r
        for i in range(r):
            if i >= sendable:
                break
            if region[i] not in s._firsts:
                continue
            tail = region[i:]
            for secret in s.secrets:
                if len(secret) > r - i:
                    possible = secret.startswith(tail)
                else:
                    possible = region.startswith(secret, i)
                if possible:
                    sendable = min(sendable, i + s._keep[secret])
        return sendable


class CompressedStreamGuard:
    """For a compressed stream: each chunk is decoded at once and its text checked (across
    chunk boundaries, in decoded text). A compressed chunk is held while the decoded tail
    could start a secret; if a secret appears, the stream is cut there: the chunks that
    would deliver it are never sent, ``cut`` says why and ``on_cut`` is called (the bridge
    kills the flow, so the client sees a reset rather than a clean end).

    Data that cannot be decoded is forwarded unchecked (the client cannot decode it either),
    and so is an encoding the bridge does not know.
    """

    __slots__ = ("_held", "_inflater", "_on_cut", "_scan", "cut", "encoding", "unchecked")

    def __init__(
        self,
        secrets: Secrets,
        content_encoding: str,
        on_cut: Callable[[], object] | None = None,
        limit: int = STREAM_DECODE_LIMIT,
    ) -> None:
        self.encoding = normalize(content_encoding)
        self._scan = StreamMasker(secrets)
        self._on_cut = on_cut
        self._held: list[bytes] = []
        self.cut: str | None = None
        self.unchecked: str | None = None  # why the rest goes out unchecked, if it does
        self._inflater: BoundedInflater | None = None
        try:
            self._inflater = BoundedInflater(self.encoding, limit)
        except ValueError as e:
            self.unchecked = str(e)

    def feed(self, chunk: bytes) -> bytes:
        if self.cut is not None:
            return b""
        inflater = self._inflater
        if inflater is None or not chunk:
            return self._release(chunk)
        scan = self._scan
        try:
            for piece in inflater.decode(chunk):
                scan.feed(piece)
                if scan.matches:
                    return self._cut(
                        f"upstream echoed a provider secret in a {self.encoding}-compressed "
                        "stream, which cannot be masked in place: the stream was cut before it"
                    )
        except DecodeLimitExceeded as e:
            return self._cut(
                f"the {self.encoding}-compressed stream could not be checked for echoed "
                f"secrets past this point (its {e}): the stream was cut there"
            )
        except ValueError as e:  # corrupt: nobody can decode what follows
            self._inflater = None
            self.unchecked = str(e)
            return self._release(chunk)
        if scan.holding:
            self._held.append(chunk)
            return b""
        return self._release(chunk)

    def close(self) -> bytes:
        if self.cut is not None:
            return b""
        if self._inflater is not None:
            self._scan.close()  # a short secret that a longer one kept undecided
            if self._scan.matches:
                return self._cut(
                    f"upstream echoed a provider secret at the end of a {self.encoding}-"
                    "compressed stream, which cannot be masked in place: it was cut before it"
                )
        return self._release(b"")

    def _release(self, chunk: bytes) -> bytes:
        if not self._held:
            return chunk
        held, self._held = self._held, []
        held.append(chunk)
        return b"".join(held)

    def _cut(self, why: str) -> bytes:
        self.cut = why
        self._held = []
        self._inflater = None
        log.warning(f"AI Bridge: {why}")
        if self._on_cut is not None:
            try:
                self._on_cut()
            except Exception:  # the stream is cut by the tee anyway
                log.exception("AI Bridge: could not kill the flow of a cut stream")
        return b""


def stream_masker(
    secrets: Secrets, content_encoding: str, on_cut: Callable[[], object] | None = None
) -> StreamMasker | CompressedStreamGuard | None:
    """The masker for a stream with this Content-Encoding (None without secrets)."""
    if not secrets:
        return None
    if normalize(content_encoding) in PASS_THROUGH:
        return StreamMasker(secrets)
    return CompressedStreamGuard(secrets, content_encoding, on_cut)


# What a stream callable returns for "nothing to send yet": b"" would be sent as an empty
# chunk, which on an HTTP/1 chunked response is its end.
NOTHING: Final[tuple[()]] = ()


class MaskedStream:
    """``flow.response.stream`` for a body mitmproxy streams by itself (stream_large_bodies)
    that the bridge does not parse: masked, nothing else."""

    __slots__ = ("masker",)

    def __init__(self, masker: ChunkMasker) -> None:
        self.masker = masker

    def __call__(self, chunk: bytes) -> bytes | tuple[()]:
        if chunk:
            return self.masker.feed(chunk) or NOTHING
        return self.masker.close()


def kill(flow: http.HTTPFlow) -> None:
    """Kill a flow from a stream callable: mitmproxy then resets the client's connection
    instead of ending the response cleanly (flows cannot be killed in transit, #4711)."""
    with contextlib.suppress(Exception):
        flow.kill()


def mask_buffered(
    response: http.Response, secrets: Secrets, limit: int | None = None
) -> str | None:
    """Mask the secrets in a finished response, in place: its trailers, and its body unless
    it was streamed (the stream callable masked that, chunk by chunk).

    Returns why the response must not be forwarded at all: a compressed body that decodes
    past `limit` cannot be checked, and a corrupt one whose readable part holds a secret
    cannot be masked. Either way the bridge answers 502 instead (fail closed: no real
    Responses body comes near the limit, and a client would have to inflate the bomb too).
    """
    if limit is None:
        limit = BODY_DECODE_LIMIT
    if response.trailers:
        mask_headers(response.trailers, secrets)
    raw = response.raw_content
    if not raw or response.stream:
        return None
    encoding = normalize(header_value(response.headers, b"content-encoding"))
    if encoding in PASS_THROUGH:
        masked = mask_bytes(raw, secrets)
        if masked is not raw:
            response.raw_content = masked
            # raw_content does not touch the headers; a chunked body has no length.
            if "transfer-encoding" not in response.headers:
                response.headers["content-length"] = str(len(masked))
        return None
    try:
        inflater = BoundedInflater(encoding, limit)
    except ValueError:
        return None  # an encoding nobody here can read (nor can mitmproxy or the records)
    # Checked piece by piece (one step in memory); decoded whole only if there is a secret.
    scan = StreamMasker(secrets)
    try:
        for piece in inflater.decode(raw):
            scan.feed(piece)
        scan.close()
        inflater.finish()
    except DecodeLimitExceeded as e:
        return (
            f"upstream's {encoding}-compressed answer could not be checked for echoed "
            f"secrets (its {e}): not forwarded"
        )
    except ValueError:
        scan.close()
        if scan.matches:
            return (
                f"upstream's corrupt {encoding}-compressed answer holds a provider secret, "
                "which cannot be masked in it: not forwarded"
            )
        return None  # the client cannot read past the damage either
    if scan.matches:
        try:
            pieces = list(BoundedInflater(encoding, limit).decode(raw))
            # Re-encoded with the same encoding by mitmproxy (which also sets content-length).
            response.content = mask_bytes(b"".join(pieces), secrets)
        except Exception as e:  # fail closed: it holds a secret
            log.exception("AI Bridge: masking a compressed answer failed")
            return f"upstream's answer holds a provider secret that could not be masked ({e})"
    return None
