"""The key pool (aibridge.upstream.key_pool) on fake clocks: rotation, parking with every
Retry-After form (milliseconds, seconds, decimals, HTTP-dates in the future and past, garbage,
huge values capped), disabling, the last key kept, all keys parked, reprs without keys, a
snapshot from another thread, and properties over random runs."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibridge.hints import hint
from aibridge.upstream.key_pool import (
    AllParked,
    KeyChoice,
    KeyEvent,
    KeyPool,
    KeySnapshot,
    KeyState,
    PoolSettings,
    retry_after_seconds,
)
from tests.harness import FakeClock, read_while_mutating

P = "openai"
KEYS = [
    "sk-proj-first-key-AAAAAAAAAAAAAAAA1111",
    "sk-proj-second-key-BBBBBBBBBBBBBBBB2222",
    "sk-proj-third-key-CCCCCCCCCCCCCCCC3333",
]
# A wall clock at a known instant, so HTTP-dates can be written against it.
WALL = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
props = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Clocks:
    """A monotonic and a wall clock that move together."""

    def __init__(self) -> None:
        self.mono = FakeClock(500.0)
        self.wall = FakeClock(WALL.timestamp())

    def advance(self, seconds: float) -> None:
        self.mono.now += seconds
        self.wall.now += seconds


def pool(
    keys: list[str] | None = None, park: float = 60.0, max_park: float = 3600.0
) -> tuple[KeyPool, Clocks]:
    clocks = Clocks()
    p = KeyPool(P, keys or KEYS, PoolSettings(park, max_park), clocks.mono, clocks.wall)
    return p, clocks


def chosen(p: KeyPool) -> KeyChoice:
    choice = p.choose()
    assert isinstance(choice, KeyChoice), choice
    return choice


def all_parked(p: KeyPool) -> AllParked:
    choice = p.choose()
    assert isinstance(choice, AllParked), choice
    return choice


def indices(p: KeyPool, n: int) -> list[int]:
    return [chosen(p).index for _ in range(n)]


def http_date(offset: float) -> str:
    return format_datetime(WALL + timedelta(seconds=offset), usegmt=True)


def key_state(p: KeyPool, index: int) -> KeySnapshot:
    return p.snapshot()[index]


# -- rotation -------------------------------------------------------------------------------------


def test_round_robin_over_the_keys() -> None:
    p, _ = pool()
    assert indices(p, 7) == [0, 1, 2, 0, 1, 2, 0]
    c = chosen(p)
    assert (c.key, c.hint) == (KEYS[1], hint(KEYS[1]))


def test_a_single_key_pool_always_gives_its_key() -> None:
    p, _ = pool(KEYS[:1])
    assert indices(p, 4) == [0, 0, 0, 0]
    for status in (200, 400, 500, 503):
        assert p.answered(chosen(p), status, {}) is None
    assert indices(p, 2) == [0, 0]


@pytest.mark.parametrize("keys", [[], ()])
def test_a_pool_needs_a_key(keys: list[str]) -> None:
    with pytest.raises(ValueError, match="openai"):
        KeyPool(P, keys, PoolSettings())


@pytest.mark.parametrize(
    "bad",
    [
        {"park_seconds": 0.0},
        {"park_seconds": -1.0},
        {"park_seconds": float("nan")},
        {"max_park_seconds": 0.0},
        {"max_park_seconds": float("inf")},
    ],
)
def test_settings_out_of_range_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PoolSettings(**bad)


@pytest.mark.parametrize("status", [200, 201, 400, 404, 408, 409, 500, 502, 503, 504, 529])
def test_other_statuses_change_nothing(status: int) -> None:
    p, _ = pool()
    c = chosen(p)
    assert p.answered(c, status, {"retry-after": "30"}) is None
    assert all(s.state is KeyState.ACTIVE for s in p.snapshot())
    assert indices(p, 3) == [1, 2, 0]


# -- parking --------------------------------------------------------------------------------------


def test_a_429_parks_the_key_and_the_others_take_its_turns() -> None:
    p, clocks = pool()
    first = chosen(p)
    event = p.answered(first, 429, {"retry-after": "20"})
    assert event == KeyEvent("parked", P, 0, hint(KEYS[0]), 429, 20.0)
    assert indices(p, 5) == [1, 2, 1, 2, 1]
    assert key_state(p, 0) == KeySnapshot(P, 0, hint(KEYS[0]), KeyState.PARKED, 20, 1, None)
    clocks.advance(19.5)
    assert key_state(p, 0).parked_for == 1
    assert 0 not in indices(p, 4)
    clocks.advance(0.5)
    assert key_state(p, 0).state is KeyState.ACTIVE
    assert 0 in indices(p, 3)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": " 12 "}, 12.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250.75"}, 0.25075),
        # The milliseconds win over the seconds.
        ({"retry-after-ms": "2000", "retry-after": "90"}, 2.0),
        # Unusable milliseconds: the seconds are read instead.
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "-5", "retry-after": "9"}, 9.0),
        ({"retry-after": http_date(45)}, 45.0),
        ({"retry-after": "Sun, 01 Jun 2025 12:02:00 GMT"}, 120.0),
        ({"retry-after": "Sun, 01 Jun 2025 14:02:00 +0200"}, 120.0),
        # A date in the past: retry now.
        ({"retry-after": http_date(-3600)}, 0.0),
        ({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}, 0.0),
        ({"retry-after": "0"}, 0.0),
    ],
)
def test_retry_after_forms(headers: dict[str, str], seconds: float) -> None:
    got = retry_after_seconds(headers, WALL.timestamp())
    assert got is not None and math.isclose(got, seconds, abs_tol=1e-9)


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Kolkata", "UTC"])
def test_a_date_in_minus_0000_is_utc_whatever_the_local_zone(
    zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "-0000" gives a naive datetime, which Python would read as local time.
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        got = retry_after_seconds(
            {"retry-after": "Sun, 01 Jun 2025 12:02:00 -0000"}, WALL.timestamp()
        )
    finally:
        monkeypatch.undo()
        time.tzset()
    assert got == 120.0


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "soon",
        "-1",
        "-0.5",
        "+5",
        "1e3",
        "1E3",
        "0x10",
        "1_000",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "1.",
        ".5",
        "1.2.3",
        "5 seconds",
        "5, 6",
        "\u0661\u0662",  # Arabic-Indic digits, which float() would take
        "\uff11\uff12",  # full-width digits
        "12\x00",
        "\udcff\udcfe",  # undecodable bytes as mitmproxy hands them over
        "Sun, 32 Jun 2025 12:00:00 GMT",
        "Sun, 01 Foo 2025 12:00:00 GMT",
        "Sun, 01 Jun 2025 25:61:00 GMT",
        "Sun, 01 Jun 2025",
        "1" * 65,
        "9" * 10_000,
        "Sun, 01 Jun 2025 12:02:00 GMT" + " " * 100,
    ],
)
def test_unusable_retry_after_values_are_none(value: str) -> None:
    now = WALL.timestamp()
    assert retry_after_seconds({"retry-after": value}, now) is None
    assert retry_after_seconds({"retry-after-ms": value}, now) is None


def test_no_header_is_none() -> None:
    assert retry_after_seconds({}, WALL.timestamp()) is None
    assert retry_after_seconds({"x-ratelimit-reset": "5"}, WALL.timestamp()) is None


@pytest.mark.parametrize(
    "headers",
    [{}, {"retry-after": "soon"}, {"retry-after-ms": "nan"}, {"retry-after": "-3"}],
)
def test_a_429_without_a_usable_retry_after_parks_for_the_default(
    headers: dict[str, str],
) -> None:
    p, _ = pool(park=45.0)
    event = p.answered(chosen(p), 429, headers)
    assert event is not None and event.seconds == 45.0
    assert key_state(p, 0).parked_for == 45


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "31536000"},
        {"retry-after": "9" * 60},
        {"retry-after": "99999999999999999999.5"},
        {"retry-after-ms": "31536000000"},
        {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
        {"retry-after": http_date(7200)},
    ],
)
def test_huge_retry_after_values_are_capped(headers: dict[str, str]) -> None:
    p, clocks = pool(max_park=3600.0)
    event = p.answered(chosen(p), 429, headers)
    assert event is not None and event.seconds == 3600.0
    clocks.advance(3600)
    assert key_state(p, 0).state is KeyState.ACTIVE


def test_parked_again_the_later_end_wins() -> None:
    p, clocks = pool()
    c = chosen(p)
    assert p.answered(c, 429, {"retry-after": "100"}) is not None
    # A second answer from a request sent before the first 429 asks for less: 100 s stand.
    event = p.answered(c, 429, {"retry-after": "10"})
    assert event is not None and event.seconds == 100.0
    clocks.advance(50)
    # And one asking for more than is left extends it.
    event = p.answered(c, 429, {"retry-after": "80"})
    assert event is not None and event.seconds == 80.0
    assert key_state(p, 0).parks == 3
    clocks.advance(79)
    assert key_state(p, 0).state is KeyState.PARKED
    clocks.advance(1)
    assert key_state(p, 0).state is KeyState.ACTIVE


def test_a_late_success_does_not_unpark() -> None:
    p, _ = pool()
    c = chosen(p)
    p.answered(c, 429, {"retry-after": "30"})
    assert p.answered(c, 200, {}) is None
    assert key_state(p, 0).state is KeyState.PARKED


def test_all_parked_answers_the_shortest_wait() -> None:
    p, clocks = pool()
    for seconds in ("40", "12.2", "300"):
        p.answered(chosen(p), 429, {"retry-after": seconds})
    assert all_parked(p) == AllParked(P, 13, 3)
    clocks.advance(12)
    assert all_parked(p).retry_after == 1
    clocks.advance(0.2)
    assert chosen(p).index == 1
    assert chosen(p).index == 1  # the only one back


@pytest.mark.parametrize("wait", ["0.01", "0.5", "0.999"])
def test_all_parked_asks_for_at_least_a_second(wait: str) -> None:
    p, _ = pool(KEYS[:1])
    p.answered(chosen(p), 429, {"retry-after": wait})
    assert all_parked(p) == AllParked(P, 1, 1)


def test_all_parked_counts_only_the_parked_keys() -> None:
    p, _ = pool()
    p.answered(chosen(p), 401, {})
    p.answered(chosen(p), 429, {"retry-after": "5"})
    p.answered(chosen(p), 429, {"retry-after": "8"})
    assert all_parked(p) == AllParked(P, 5, 2)


def test_a_retry_after_of_zero_leaves_the_key_usable() -> None:
    p, _ = pool(KEYS[:1])
    event = p.answered(chosen(p), 429, {"retry-after": http_date(-10)})
    assert event is not None and event.seconds == 0.0
    assert chosen(p).index == 0


# -- disabling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_disable_the_key(status: int) -> None:
    p, clocks = pool()
    event = p.answered(chosen(p), status, {})
    assert event == KeyEvent("disabled", P, 0, hint(KEYS[0]), status, None)
    assert key_state(p, 0) == KeySnapshot(P, 0, hint(KEYS[0]), KeyState.DISABLED, 0, 0, status)
    clocks.advance(10**6)  # until restart
    assert 0 not in indices(p, 10)


@pytest.mark.parametrize("status", [401, 403])
def test_the_last_key_not_disabled_is_kept(status: int) -> None:
    p, _ = pool()
    p.answered(chosen(p), 401, {})
    p.answered(chosen(p), 403, {})
    last = chosen(p)
    assert last.index == 2
    event = p.answered(last, status, {})
    assert event == KeyEvent("kept_last", P, 2, hint(KEYS[2]), status, None)
    assert indices(p, 3) == [2, 2, 2]
    assert key_state(p, 2).state is KeyState.ACTIVE
    # Every further refusal says so again.
    assert p.answered(chosen(p), status, {}) is not None


def test_a_single_key_is_kept_on_401() -> None:
    p, _ = pool(KEYS[:1])
    event = p.answered(chosen(p), 401, {})
    assert event is not None and event.kind == "kept_last"
    assert chosen(p).index == 0


def test_a_parked_last_key_stays_parked_when_kept() -> None:
    p, _ = pool(KEYS[:2])
    p.answered(chosen(p), 401, {})
    c = chosen(p)
    p.answered(c, 429, {"retry-after": "30"})
    event = p.answered(c, 403, {})
    assert event is not None and event.kind == "kept_last"
    assert all_parked(p) == AllParked(P, 30, 1)


def test_a_parked_key_can_be_disabled() -> None:
    p, clocks = pool(KEYS[:2])
    c = chosen(p)
    p.answered(c, 429, {"retry-after": "30"})
    assert p.answered(c, 401, {}) is not None
    clocks.advance(60)
    assert indices(p, 3) == [1, 1, 1]


@pytest.mark.parametrize("status", [200, 401, 403, 429])
def test_answers_for_a_disabled_key_change_nothing(status: int) -> None:
    p, _ = pool()
    c = chosen(p)
    p.answered(c, 401, {})
    before = p.snapshot()
    assert p.answered(c, status, {"retry-after": "30"}) is None
    assert p.snapshot() == before


@pytest.mark.parametrize(
    "foreign",
    [
        KeyChoice(0, "sk-some-other-pool-key-0000000000", "sk-s...0000"),
        KeyChoice(3, KEYS[0], hint(KEYS[0])),
        KeyChoice(-1, KEYS[2], hint(KEYS[2])),
    ],
)
def test_a_choice_from_elsewhere_changes_nothing(foreign: KeyChoice) -> None:
    p, _ = pool()
    before = p.snapshot()
    for status in (401, 429):
        assert p.answered(foreign, status, {}) is None
    assert p.snapshot() == before


# -- no key in sight -----------------------------------------------------------------------------


def test_no_key_in_any_repr() -> None:
    p, _ = pool()
    c = chosen(p)
    p.answered(c, 429, {})
    texts = [repr(p), str(p), repr(c), str(c), repr(p.snapshot()), repr(p.choose())]
    p.answered(chosen(p), 401, {})
    texts += [repr(p), repr(p.snapshot()), repr(p.__dict__ if hasattr(p, "__dict__") else "")]
    texts.append(repr(p._keys))  # the internals too
    for text in texts:
        for key in KEYS:
            assert key not in text
            assert key[8:-4] not in text
    assert hint(KEYS[0]) in repr(p)


def test_snapshot_from_a_thread_while_the_loop_mutates(switch_often: None) -> None:
    keys = [f"sk-key-number-{i:04d}-abcdefghijkl" for i in range(12)]
    p, clocks = pool(keys)

    def read() -> None:
        snap = p.snapshot()
        assert len(snap) == len(keys)
        assert any(s.state is not KeyState.DISABLED for s in snap)
        for s in snap:
            # Never half an update: a disabled key with no status, a park uncounted.
            assert (s.state is KeyState.DISABLED) == (s.disabled_status is not None)
            assert s.state is not KeyState.PARKED or s.parks > 0

    def mutate(i: int) -> None:
        c = p.choose()
        if isinstance(c, KeyChoice):
            p.answered(c, (429, 200, 200, 401, 500)[i % 5], {"retry-after": str(i % 7)})
        clocks.advance(0.5)

    assert read_while_mutating(read, mutate) > 0


# -- properties ---------------------------------------------------------------------------------

answers = st.sampled_from([200, 400, 401, 403, 429, 500, 503])
retry_afters = st.one_of(
    st.just({}),
    st.integers(0, 5000).map(lambda n: {"retry-after": str(n)}),
    st.integers(0, 10**7).map(lambda n: {"retry-after-ms": str(n)}),
    st.integers(-100, 5000).map(lambda n: {"retry-after": http_date(n)}),
    st.text(max_size=20).map(lambda t: {"retry-after": t}),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("choose")),
        st.tuples(st.just("answer"), st.integers(0, 20), answers, retry_afters),
        st.tuples(st.just("tick"), st.floats(0, 600)),
    ),
    max_size=80,
)


@props
@given(ops, st.integers(1, 6))
def test_properties_over_random_runs(run: list[tuple], n_keys: int) -> None:
    """Whatever happens: a disabled key is never chosen, one key at least is never disabled,
    AllParked comes only when every key not disabled is parked and asks for the shortest of
    their waits, and a park never outlasts max_park_seconds."""
    keys = [f"sk-property-key-{i}-0123456789abcdef" for i in range(n_keys)]
    p, clocks = pool(keys, park=60.0, max_park=1800.0)
    given_out: list[KeyChoice] = []
    for op in run:
        if op[0] == "choose":
            before = p.snapshot()
            choice = p.choose()
            if isinstance(choice, KeyChoice):
                # Never a disabled key, nor one still parked.
                assert before[choice.index].state is KeyState.ACTIVE
                given_out.append(choice)
            else:
                waits = [s.parked_for for s in before if s.state is KeyState.PARKED]
                usable = [s for s in before if s.state is KeyState.ACTIVE]
                assert not usable
                assert choice.parked == len(waits) >= 1
                assert choice.retry_after == max(1, min(waits))
        elif op[0] == "answer" and given_out:
            p.answered(given_out[op[1] % len(given_out)], op[2], op[3])
        elif op[0] == "tick":
            clocks.advance(op[1])
        snap = p.snapshot()
        assert any(s.state is not KeyState.DISABLED for s in snap)
        assert all(s.parked_for <= 1800 for s in snap)


@pytest.mark.parametrize("start", [248.3, 249.8, 500.0, 1e6 + 0.7, 0.1])
@pytest.mark.parametrize("asked", ["5000", "1800"])
def test_a_park_of_the_maximum_reads_as_the_maximum(start: float, asked: str) -> None:
    # until - now is not exactly the park in floating point: it must not round up a second.
    p, clocks = pool(["sk-only-key-0123456789abcdef"], max_park=1800.0)
    clocks.mono.now = start
    p.answered(chosen(p), 429, {"retry-after": asked})
    assert key_state(p, 0).parked_for == 1800
    parked = p.choose()
    assert isinstance(parked, AllParked) and parked.retry_after == 1800
