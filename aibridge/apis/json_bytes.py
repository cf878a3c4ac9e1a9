"""Byte-level reading and editing of a JSON object that is known to be valid.

The bridge forwards request bodies as sent; the one edit it makes (Chat Completions usage,
DESIGN.md §2) must leave every other byte alone. These helpers find where the members of an
object are, as byte offsets, without decoding or re-encoding the values, so an edit is a
splice. Keys are compared decoded (``"stream\\u005foptions"`` is ``stream_options``), the
way the provider's parser and aibridge.strict_json read them.

The input must be valid JSON (the caller decoded it strictly first); on anything else the
result is unspecified but these functions raise ValueError rather than loop or read past the
end.
"""

from __future__ import annotations

import re
from typing import Final

import orjson

_WHITESPACE: Final = re.compile(rb"[ \t\n\r]*")
# A JSON string, unrolled (runs of plain bytes between escapes): several times faster than
# one alternation per byte.
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# How a letter, digit or "_" of a key can be escaped in JSON: \u00XX with XX in 30-7f.
_ESCAPE_HEAD: Final = b"\\u00"
_WORD_CHAR_HIGH_DIGITS: Final = frozenset(b"34567")
# Inside a container only these bytes matter: strings are skipped whole, brackets counted.
_STRUCTURAL: Final = re.compile(rb'["{}\[\]]')
_SCALAR_END: Final = re.compile(rb"[ \t\n\r,}\]]")


def may_hold_key(body: bytes, key: bytes) -> bool:
    """False only when no member of the object can be named `key` (ASCII letters, digits and
    ``_``): its bytes appear nowhere and no escape could spell one of its characters. A fast,
    sound pre-check before :func:`member_spans`, which walks the whole body."""
    if key in body:
        return True
    # bytes.find, not a regex: a memchr-speed scan, and most bodies hold no such escape.
    at = body.find(_ESCAPE_HEAD)
    while at >= 0:
        if body[at + 4 : at + 5] and body[at + 4] in _WORD_CHAR_HIGH_DIGITS:
            return True
        at = body.find(_ESCAPE_HEAD, at + 1)
    return False


def member_spans(body: bytes, start: int = 0) -> dict[str, tuple[int, int]]:
    """The members of the object that begins at `start` (after any whitespace): each key,
    decoded, with the byte span of its value. A key given twice keeps its last span."""
    pos = _skip_whitespace(body, start)
    if body[pos : pos + 1] != b"{":
        raise ValueError(f"no JSON object at byte {pos}")
    spans: dict[str, tuple[int, int]] = {}
    pos = _skip_whitespace(body, pos + 1)
    if body[pos : pos + 1] == b"}":
        return spans
    while True:
        match = _STRING.match(body, pos)
        if match is None:
            raise ValueError(f"no key at byte {pos}")
        key = orjson.loads(match.group())
        pos = _skip_whitespace(body, match.end())
        if body[pos : pos + 1] != b":":
            raise ValueError(f"no ':' at byte {pos}")
        value_start = _skip_whitespace(body, pos + 1)
        value_end = _value_end(body, value_start)
        spans[key] = (value_start, value_end)
        pos = _skip_whitespace(body, value_end)
        separator = body[pos : pos + 1]
        if separator == b"}":
            return spans
        if separator != b",":
            raise ValueError(f"no ',' or '}}' at byte {pos}")
        pos = _skip_whitespace(body, pos + 1)


def insert_first_member(body: bytes, member: bytes, start: int = 0) -> bytes:
    """`body` with `member` (``"key":value``) as the first member of the object at `start`;
    a comma follows it unless the object was empty. Every other byte stays."""
    pos = _skip_whitespace(body, start)
    if body[pos : pos + 1] != b"{":
        raise ValueError(f"no JSON object at byte {pos}")
    after = pos + 1
    inner = _skip_whitespace(body, after)
    empty = body[inner : inner + 1] == b"}"
    return body[:after] + member + (b"" if empty else b",") + body[after:]


def _skip_whitespace(body: bytes, pos: int) -> int:
    match = _WHITESPACE.match(body, pos)
    return match.end() if match else pos


def _value_end(body: bytes, pos: int) -> int:
    """The offset just past the JSON value that begins at `pos`."""
    first = body[pos : pos + 1]
    if first == b'"':
        match = _STRING.match(body, pos)
        if match is None:
            raise ValueError(f"unterminated string at byte {pos}")
        return match.end()
    if first in (b"{", b"["):
        depth = 0
        while True:
            match = _STRUCTURAL.search(body, pos)
            if match is None:
                raise ValueError("unterminated container")
            char = match.group()
            if char == b'"':
                string = _STRING.match(body, match.start())
                if string is None:
                    raise ValueError(f"unterminated string at byte {match.start()}")
                pos = string.end()
                continue
            depth += 1 if char in (b"{", b"[") else -1
            pos = match.end()
            if depth == 0:
                return pos
    if not first:
        raise ValueError("no value at the end of the body")
    match = _SCALAR_END.search(body, pos)
    return match.start() if match else len(body)
