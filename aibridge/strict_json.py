"""A strict decoder for the JSON objects the bridge judges and then forwards byte for byte.

The bridge decides on what it decoded (is this a turn? background? which model?), while the
provider decodes the original bytes again. Wherever two parsers may read one text two ways,
the bridge's checks would not hold for what the provider does, so such a text is refused:

- whatever orjson refuses (lone surrogates, NaN, a BOM, invalid UTF-8, nesting past 1024…):
  the bridge's reading is orjson's, and nothing it accepts is read otherwise by the bridge;
- a document that is not an object;
- a top-level key given twice (among ``watched`` names if given, else any key): most parsers
  keep the last copy, some the first, some refuse.

Finding duplicates takes a second parse (the stdlib's, whose ``object_pairs_hook`` sees every
pair). It is skipped when a duplicate is impossible, which two cheap tests prove:

1. the bytes are orjson's own encoding of what they decode to (compact, or indented by two
   spaces), as Codex's and httpx's bodies are: an encoded dict names each key once, at every
   depth;
2. with ``watched`` names of plain ASCII: the text has no ``\\u00`` escape (the only spelling
   of such a name other than its letters) and each name's quoted form occurs at most once in
   the raw bytes. Quoted forms inside strings only add occurrences (a quote in a string is
   escaped), so one occurrence at most means no second key of that name, at any depth.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection
from typing import Any

import orjson

_WHITESPACE = b" \t\r\n"  # JSON's, not Python's: bytes.strip() would take \f and \v too
# Printable ASCII but `"`, `\` and `/`: a name of these has one spelling besides \u escapes
# (`/` has another, `\/`).
_PLAIN_NAME = re.compile(r"[ !#-.0-\[\]-~]*")
_MAX_KEY_SHOWN = 100


class StrictJSONError(ValueError):
    """The text is refused; the message says why (meant for the client)."""


class InvalidJSON(StrictJSONError):
    pass


class NotAnObject(StrictJSONError):
    pass


class DuplicateKey(StrictJSONError):
    def __init__(self, key: str) -> None:
        shown = key if len(key) <= _MAX_KEY_SHOWN else key[:_MAX_KEY_SHOWN] + "…"
        super().__init__(f"the key {shown!r} is given more than once")
        self.key = key


def loads_object(data: bytes, *, watched: Collection[str] | None = None) -> dict[str, Any]:
    """orjson's reading of ``data``, which must be a JSON object without a duplicated top-level
    key (among ``watched`` names if given, else any); raises a StrictJSONError otherwise."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidJSON(str(e)) from None
    if not isinstance(obj, dict):
        raise NotAnObject("not a JSON object")
    if _is_own_encoding(data, obj):
        return obj
    if watched is not None and _names_at_most_once(data, frozenset(watched)):
        return obj
    _check_top_level(data, watched)
    return obj


def _is_own_encoding(data: bytes, obj: dict[str, Any]) -> bool:
    text = data.strip(_WHITESPACE)
    option = orjson.OPT_INDENT_2 if text[1:2] == b"\n" else 0
    try:
        return orjson.dumps(obj, option=option) == text
    except orjson.JSONEncodeError:  # orjson reads deeper nesting than it writes
        return False


def _names_at_most_once(data: bytes, names: frozenset[str]) -> bool:
    pattern = _quoted_names(names)
    if pattern is None or b"\\u00" in data:
        return False
    found = pattern.findall(data)
    return len(found) == len(set(found))


@functools.lru_cache(maxsize=32)
def _quoted_names(names: frozenset[str]) -> re.Pattern[bytes] | None:
    """One pattern for all quoted names (one pass over the text), or None when a name has
    spellings this test does not count."""
    if not names or not all(_PLAIN_NAME.fullmatch(name) for name in names):
        return None
    longest_first = sorted(names, key=len, reverse=True)
    return re.compile(b'"(?:' + b"|".join(re.escape(n.encode()) for n in longest_first) + b')"')


def _check_top_level(data: bytes, watched: Collection[str] | None) -> None:
    try:
        # Every object becomes its list of pairs (cheap: no dicts are built); the document's
        # is the outermost. orjson accepted the text, so it is valid UTF-8 and valid JSON.
        pairs = json.loads(data.decode(), object_pairs_hook=list)
    except (ValueError, RecursionError) as e:  # numbers or nesting the stdlib will not take
        raise InvalidJSON(f"cannot be checked for duplicate keys: {e}") from None
    seen: set[str] = set()
    for key, _ in pairs:
        if watched is None or key in watched:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
