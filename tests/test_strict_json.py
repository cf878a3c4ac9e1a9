"""aibridge.strict_json: orjson's reading, refused wherever another parser could read the text
otherwise; and parse_request, which decodes POST bodies with it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibridge import strict_json
from aibridge.apis.openai_responses import CHECKED_FIELDS, RequestError, parse_request
from aibridge.strict_json import DuplicateKey, InvalidJSON, NotAnObject, loads_object

FIXTURES = Path(__file__).parent / "fixtures"
CODEX_BODIES = [
    FIXTURES / "codex_turn_streamed.request.json",
    *sorted((FIXTURES / "codex_captured").glob("*.request.json")),
]
WATCHED = frozenset({"type", "model", "background", "input", "stream"})
fuzz = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --------------------------------------------------------------- encoders of one object

# Keys from a small alphabet, so that generated objects often share names with WATCHED
# and nested objects repeat top-level names (which must not count as duplicates).
keys = st.sampled_from([*sorted(WATCHED), "id", "role", "x", "é", "a/b", "😀", 'q"', "t\n"]) | (
    st.text(max_size=8)
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
objects = st.dictionaries(keys, values, max_size=8)


def spell_string(text: str, rng: random.Random, escape_rate: float) -> str:
    """A JSON string literal for ``text``, characters \\u-escaped at random (hex in either
    case, astral characters as surrogate pairs), `/` sometimes as `\\/`."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\' or code < 0x20 or rng.random() < escape_rate:
            if code > 0xFFFF:
                code -= 0x10000
                units = [0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)]
            else:
                units = [code]
            for unit in units:
                hex_digits = f"{unit:04x}"
                out.append("\\u" + (hex_digits.upper() if rng.random() < 0.5 else hex_digits))
        elif ch == "/" and rng.random() < 0.5:
            out.append("\\/")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def spell(value: Any, rng: random.Random, escape_rate: float = 0.2) -> str:
    """``value`` as JSON text, with random whitespace and escapes (no key repeated)."""

    def ws() -> str:
        return "".join(rng.choice(" \t\r\n") for _ in range(rng.choice([0, 0, 1, 2])))

    if isinstance(value, dict):
        members = [
            f"{ws()}{spell_string(k, rng, escape_rate)}{ws()}:{ws()}{spell(v, rng, escape_rate)}"
            for k, v in value.items()
        ]
        return "{" + ",".join(members) + ws() + "}"
    if isinstance(value, list):
        return "[" + ",".join(ws() + spell(v, rng, escape_rate) for v in value) + ws() + "]"
    if isinstance(value, str):
        return spell_string(value, rng, escape_rate)
    return orjson.dumps(value).decode()


def encodings(obj: dict[str, Any], rng: random.Random) -> list[bytes]:
    return [
        orjson.dumps(obj),
        orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n",
        json.dumps(obj).encode(),  # Python's spacing and \u escapes of non-ASCII
        json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(),
        json.dumps(obj, indent=1, ensure_ascii=False).encode(),
        spell(obj, rng, 0.0).encode(),
        spell(obj, rng).encode(),
        spell(obj, rng, 1.0).encode(),
    ]


# ------------------------------------------------------------------------ properties


@fuzz
@given(obj=objects, seed=st.integers(0, 2**32))
def test_any_object_without_duplicates_reads_as_orjson_reads_it(
    obj: dict[str, Any], seed: int
) -> None:
    rng = random.Random(seed)
    for data in encodings(obj, rng):
        expected = orjson.loads(data)
        for watched in (None, WATCHED, frozenset(obj), frozenset()):
            assert loads_object(data, watched=watched) == expected


@fuzz
@given(
    obj=objects,
    name=st.sampled_from([*sorted(WATCHED), "é", "a/b", "😀", 'q"']),
    first=values,
    second=values,
    seed=st.integers(0, 2**32),
)
def test_an_injected_duplicate_is_refused_however_spelled(
    obj: dict[str, Any], name: str, first: Any, second: Any, seed: int
) -> None:
    rng = random.Random(seed)
    members = [(k, v) for k, v in obj.items() if k != name]
    at_first, at_second = sorted(rng.sample(range(len(members) + 2), 2))
    members.insert(min(at_first, len(members)), (name, first))
    members.insert(min(at_second, len(members)), (name, second))
    for rate in (0.0, 0.3, 1.0):
        body = ",".join(f"{spell_string(k, rng, rate)}:{spell(v, rng, rate)}" for k, v in members)
        data = ("{" + body + "}").encode()
        for watched in (None, WATCHED | {name}):
            with pytest.raises(DuplicateKey) as info:
                loads_object(data, watched=watched)
            assert info.value.key == name
        # A duplicate of a name nobody reads is left to the provider.
        assert loads_object(data, watched=frozenset({"nothing-else"})) == orjson.loads(data)


@fuzz
@given(st.binary(max_size=300) | objects.map(orjson.dumps), st.randoms(use_true_random=False))
def test_whatever_orjson_refuses_is_refused(data: bytes, rng: random.Random) -> None:
    mutated = bytearray(data)
    for _ in range(rng.randrange(3)):
        at = rng.randrange(len(mutated) + 1)
        mutated[at:at] = rng.choice([b"\\ud800", b"NaN", b"\xff", b"\xef\xbb\xbf", b",", b'"'])
    for candidate in (data, bytes(mutated)):
        try:
            expected = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            with pytest.raises(InvalidJSON):
                loads_object(candidate)
            continue
        try:
            assert loads_object(candidate) == expected
        except NotAnObject:
            assert not isinstance(expected, dict)
        except DuplicateKey:
            pass


# ------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":"\\ud800"}',  # lone surrogates: the stdlib would take them
        b'{"a":"\\udc00\\ud800"}',
        b'{"a":"\xed\xa0\x80"}',  # a surrogate in UTF-8
        b'{"a":NaN}',
        b'{"a":-Infinity}',
        b'{"a":1e400}',
        b'{"a":' + b"1" * 400 + b"}",  # too big for a double: orjson refuses, the stdlib not
        b'\xef\xbb\xbf{"a":1}',  # BOM
        b'{"a":"\xff"}',
        b'{"a":1}\x00',
        b'\x0c{"a":1}',  # form feed is not JSON whitespace
        b'{"a":1,}',
        b"{'a':1}",
        b'{"a":' + b"[" * 1100 + b"]" * 1100 + b"}",
        b"",
    ],
)
def test_invalid_json_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidJSON):
        loads_object(data)


@pytest.mark.parametrize("data", [b"[]", b'[{"type":"response.create"}]', b'"x"', b"1", b"null"])
def test_only_objects(data: bytes) -> None:
    with pytest.raises(NotAnObject):
        loads_object(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"x","type":"response.create"}',
        b'{"typ\\u0065":"response.create","type":"x"}',
        b'{"\\u0074\\u0079\\u0070\\u0065":1, "type":2}',
        b'{"type":1,"model":{"type":2},"\\u0074ype":3}',
        b'{\n  "type": 1,\n  "type": 2\n}',  # indented like orjson, but not its encoding
        b'{"type":1,\t"type"\r\n:\n2}',
    ],
)
def test_duplicate_spellings(data: bytes) -> None:
    for watched in (None, WATCHED):
        with pytest.raises(DuplicateKey, match="'type' is given more than once"):
            loads_object(data, watched=watched)


def test_nested_duplicates_are_not_refused() -> None:
    """Only top-level keys decide; nested copies read as orjson reads them (the last)."""
    data = b'{"input":[{"role":"developer","role":"user","content":"x"}],"type":"t"}'
    assert loads_object(data)["input"][0]["role"] == "user"


def test_a_long_duplicate_key_is_shortened_in_the_message() -> None:
    key = "k" * 10_000
    with pytest.raises(DuplicateKey) as info:
        loads_object(orjson.dumps({key: 1})[:-1] + b"," + orjson.dumps(key) + b":2}")
    assert info.value.key == key
    assert len(str(info.value)) < 200


# ------------------------------------------------------------------- which path runs


@pytest.fixture
def slow_path_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    check = strict_json._check_top_level

    def counted(data: bytes, watched: Any) -> None:
        calls.append(data)
        check(data, watched)

    monkeypatch.setattr(strict_json, "_check_top_level", counted)
    return calls


@pytest.mark.parametrize("path", CODEX_BODIES, ids=lambda p: p.name)
def test_codex_bodies_take_the_fast_path(path: Path, slow_path_calls: list[bytes]) -> None:
    """Codex sends orjson's own encoding (the fixture is its indented form): no second parse."""
    data = path.read_bytes()
    for watched in (None, CHECKED_FIELDS):
        assert loads_object(data, watched=watched) == orjson.loads(data)
    assert slow_path_calls == []


def test_watched_names_seen_once_take_the_fast_path(slow_path_calls: list[bytes]) -> None:
    obj = orjson.loads((FIXTURES / "codex_turn_streamed.request.json").read_bytes())
    spaced = json.dumps(obj, ensure_ascii=False).encode()  # not orjson's encoding
    assert loads_object(spaced, watched=CHECKED_FIELDS) == obj
    assert slow_path_calls == []
    # Any \u00 escape, or a watched name quoted twice (nested here), needs the second parse.
    escaped = spaced.replace(b'"stream"', b'"\\u0073tream"')
    nested_obj = {**obj, "client_metadata": {**obj["client_metadata"], "model": "x"}}
    nested = json.dumps(nested_obj, ensure_ascii=False).encode()
    for data in (escaped, nested):
        loads_object(data, watched=CHECKED_FIELDS)
    assert slow_path_calls == [escaped, nested]
    loads_object(spaced)  # all names watched: no cheap test but the encoding's
    assert slow_path_calls[-1] == spaced


# -------------------------------------------------------------------- parse_request


@pytest.mark.parametrize("field", sorted(CHECKED_FIELDS))
def test_parse_request_refuses_a_checked_field_given_twice(field: str) -> None:
    quoted = orjson.dumps(field)
    escaped = b'"\\u00%x' % ord(field[0]) + quoted[2:]
    for first, second in ((quoted, quoted), (quoted, escaped), (escaped, quoted)):
        body = b'{"model":"m",%s:null,"input":"hi",%s:null}' % (first, second)
        if field == "model":
            body = body.replace(b'"model":"m",', b"", 1)
        with pytest.raises(RequestError, match=f"ambiguous: the key '{field}' is given more"):
            parse_request(body)
    # Given once, however spelled, it reads as before; a field the bridge does not read may
    # come twice (the provider's to judge).
    body, _ = parse_request(b'{%s:null,"reasoning":{},"reasoning":{"effort":"low"}}' % escaped)
    assert body == {field: None, "reasoning": {"effort": "low"}}
