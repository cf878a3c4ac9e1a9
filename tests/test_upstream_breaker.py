"""The circuit breaker (aibridge.upstream.breaker) on a fake clock: every transition, the
generation rule, the trials limit, no-verdict settles, disabled settings, bounded memory under a
hostile stream of model names, snapshots from another thread, and properties over random runs."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibridge.upstream.breaker import (
    TRIPPING_STATUSES,
    BreakerSettings,
    CircuitBreakers,
    CircuitOpen,
    CircuitSnapshot,
    CircuitState,
    Pass,
    Transition,
)
from tests.harness import FakeClock, read_while_mutating

P = "openai"
M = "gpt-5"
props = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def breakers(
    failures: int = 3,
    cool_down: float = 30.0,
    trials: int = 1,
    max_circuits: int = 10_000,
    enabled: bool = True,
) -> tuple[CircuitBreakers, FakeClock]:
    clock = FakeClock()
    s = BreakerSettings(enabled, failures, cool_down, trials)
    return CircuitBreakers(s, clock, max_circuits), clock


def passed(verdict: Pass | CircuitOpen) -> Pass:
    assert isinstance(verdict, Pass), verdict
    return verdict


def refused(verdict: Pass | CircuitOpen) -> CircuitOpen:
    assert isinstance(verdict, CircuitOpen), verdict
    return verdict


def fail(
    b: CircuitBreakers, n: int, status: int | None = 503, model: str = M
) -> list[Transition | None]:
    return [
        b.settle(passed(b.admit(P, model)), status, unreachable=status is None) for _ in range(n)
    ]


def state(b: CircuitBreakers, model: str = M) -> CircuitSnapshot | None:
    found = [s for s in b.snapshot() if (s.provider, s.model) == (P, model)]
    return found[0] if found else None


def tracked(b: CircuitBreakers, model: str = M) -> CircuitSnapshot:
    found = state(b, model)
    assert found is not None, f"{model} is not tracked"
    return found


def trip(b: CircuitBreakers, failures: int = 3, status: int = 503) -> Transition:
    changes = fail(b, failures, status)
    assert changes[:-1] == [None] * (failures - 1)
    assert isinstance(changes[-1], Transition)
    return changes[-1]


# -- what counts as a failure --------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(TRIPPING_STATUSES))
def test_tripping_statuses_are_failures(status: int) -> None:
    assert CircuitBreakers.is_failure(status, False)


@pytest.mark.parametrize("status", [200, 201, 204, 301, 400, 401, 403, 404, 408, 429, 500, 502])
def test_other_statuses_are_not_failures(status: int) -> None:
    assert not CircuitBreakers.is_failure(status, False)


@pytest.mark.parametrize("status", [None, 200, 503])
def test_unreachable_is_a_failure_whatever_the_status(status: int | None) -> None:
    assert CircuitBreakers.is_failure(status, True)


def test_no_status_is_no_failure() -> None:
    assert not CircuitBreakers.is_failure(None, False)


# -- CLOSED ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 504, 529, None])
def test_consecutive_failures_open_the_circuit(status: int | None) -> None:
    b, _ = breakers(failures=3)
    changes = fail(b, 3, status)
    assert changes[:2] == [None, None]
    assert changes[2] == Transition(P, M, CircuitState.CLOSED, CircuitState.OPEN, 3, status)
    snap = state(b)
    assert snap == CircuitSnapshot(P, M, CircuitState.OPEN, 3, 1, 30)


@pytest.mark.parametrize("success", [200, 201, 400, 401, 404, 429, 500, 502])
def test_any_other_status_resets_the_count(success: int) -> None:
    b, _ = breakers(failures=3)
    fail(b, 2)
    assert b.settle(passed(b.admit(P, M)), success) is None
    fail(b, 2)  # 2 again, not 4
    assert passed(b.admit(P, M))
    assert tracked(b).consecutive_failures == 2


@pytest.mark.parametrize("kind", ["client_gone", "twice"])
def test_no_verdict_changes_no_count(kind: str) -> None:
    b, _ = breakers(failures=3)
    fail(b, 2)
    for _ in range(1 if kind == "client_gone" else 2):
        assert b.settle(passed(b.admit(P, M)), None) is None
    assert tracked(b).consecutive_failures == 2
    assert fail(b, 1)[0] is not None  # the third failure still opens it


def test_a_single_failure_threshold_opens_at_once() -> None:
    b, _ = breakers(failures=1)
    assert fail(b, 1, 529)[0] == Transition(P, M, CircuitState.CLOSED, CircuitState.OPEN, 1, 529)
    assert refused(b.admit(P, M)).retry_after == 30


def test_mixed_tripping_statuses_count_together_and_the_last_is_reported() -> None:
    b, _ = breakers(failures=3)
    b.settle(passed(b.admit(P, M)), 503)
    b.settle(passed(b.admit(P, M)), None, unreachable=True)
    change = b.settle(passed(b.admit(P, M)), 504)
    assert change is not None and change.last_status == 504 and change.failures == 3
    ref = refused(b.admit(P, M))
    assert (ref.failures, ref.last_status) == (3, 504)


def test_unreachable_last_reports_no_status() -> None:
    b, _ = breakers(failures=2)
    fail(b, 1, 503)
    change = b.settle(passed(b.admit(P, M)), None, unreachable=True)
    assert change is not None and change.last_status is None


def test_circuits_are_per_provider_and_model() -> None:
    b, _ = breakers(failures=2)
    fail(b, 2)
    refused(b.admit(P, M))
    passed(b.admit(P, "gpt-5-mini"))
    passed(b.admit("azure", M))
    # The same model behind another provider counts on its own.
    assert b.settle(passed(b.admit("azure", M)), 503) is None


# -- OPEN ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "retry_after"),
    [(0.0, 30), (0.4, 30), (1.0, 29), (10.5, 20), (29.0, 1), (29.5, 1), (29.999, 1)],
)
def test_open_refuses_with_the_cool_down_left(elapsed: float, retry_after: int) -> None:
    b, clock = breakers(failures=2, cool_down=30.0)
    trip(b, 2)
    clock.now += elapsed
    ref = refused(b.admit(P, M))
    assert ref == CircuitOpen(P, M, CircuitState.OPEN, 2, 503, retry_after)


def test_a_short_cool_down_still_asks_for_a_whole_second() -> None:
    b, clock = breakers(failures=1, cool_down=0.25)
    trip(b, 1)
    assert refused(b.admit(P, M)).retry_after == 1
    clock.now += 0.2
    assert refused(b.admit(P, M)).retry_after == 1


@pytest.mark.parametrize("elapsed", [30.0, 30.001, 31.0, 3600.0])
def test_after_the_cool_down_a_trial_goes_through(elapsed: float) -> None:
    b, clock = breakers(failures=2, cool_down=30.0)
    trip(b, 2)
    clock.now += elapsed
    ticket = passed(b.admit(P, M))
    assert ticket.trial
    assert tracked(b).state is CircuitState.HALF_OPEN
    # Its trials in flight, the circuit refuses the rest for a second.
    ref = refused(b.admit(P, M))
    assert ref == CircuitOpen(P, M, CircuitState.HALF_OPEN, 2, 503, 1)
    assert tracked(b).retry_after == 1


@pytest.mark.parametrize("trials", [1, 2, 5])
def test_half_open_lets_its_number_of_trials_through_at_once(trials: int) -> None:
    b, clock = breakers(failures=1, trials=trials)
    trip(b, 1)
    clock.now += 30
    tickets = [passed(b.admit(P, M)) for _ in range(trials)]
    assert all(t.trial for t in tickets)
    refused(b.admit(P, M))
    # A trial without a verdict gives its slot back, and one more goes through.
    assert b.settle(tickets[0], None) is None
    assert passed(b.admit(P, M)).trial
    refused(b.admit(P, M))


# -- HALF_OPEN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("success", [200, 400, 429, 500])
def test_a_trial_success_closes_the_circuit(success: int) -> None:
    b, clock = breakers(failures=2)
    trip(b, 2, 504)
    clock.now += 30
    change = b.settle(passed(b.admit(P, M)), success)
    assert change == Transition(P, M, CircuitState.HALF_OPEN, CircuitState.CLOSED, 2, 504)
    assert state(b) == CircuitSnapshot(P, M, CircuitState.CLOSED, 0, 1, 0)
    for _ in range(5):
        assert not passed(b.admit(P, M)).trial
    # Closed again: it takes the full count to open it once more.
    changes = fail(b, 2)
    assert changes[0] is None and changes[1] is not None
    assert tracked(b).trips == 2


@pytest.mark.parametrize("failure", [(503, False), (529, False), (None, True), (200, True)])
def test_a_trial_failure_opens_the_circuit_again(failure: tuple[int | None, bool]) -> None:
    status, unreachable = failure
    b, clock = breakers(failures=2, cool_down=30)
    trip(b, 2)
    clock.now += 45
    change = b.settle(passed(b.admit(P, M)), status, unreachable=unreachable)
    assert change == Transition(P, M, CircuitState.HALF_OPEN, CircuitState.OPEN, 3, status)
    # A whole new cool-down from now, not from the first opening.
    assert refused(b.admit(P, M)).retry_after == 30
    clock.now += 29.5
    assert refused(b.admit(P, M)).retry_after == 1
    clock.now += 0.5
    assert passed(b.admit(P, M)).trial
    assert tracked(b).trips == 2


def test_a_trial_without_verdict_frees_its_slot_and_changes_nothing() -> None:
    b, clock = breakers(failures=2)
    trip(b, 2)
    clock.now += 30
    for _ in range(3):
        assert b.settle(passed(b.admit(P, M)), None) is None
        assert tracked(b).state is CircuitState.HALF_OPEN
    assert tracked(b).consecutive_failures == 2


def test_with_several_trials_one_failure_reopens_and_the_others_are_late() -> None:
    b, clock = breakers(failures=1, trials=3)
    trip(b, 1)
    clock.now += 30
    a, c, d = (passed(b.admit(P, M)) for _ in range(3))
    assert b.settle(a, 503) is not None
    # The other two trials were let through before this opening: their results are ignored.
    assert b.settle(c, 200) is None
    assert b.settle(d, 503) is None
    assert tracked(b).state is CircuitState.OPEN
    assert refused(b.admit(P, M)).retry_after == 30


def test_with_several_trials_one_success_closes_and_the_others_count_as_closed() -> None:
    b, clock = breakers(failures=2, trials=3)
    trip(b, 2)
    clock.now += 30
    a, c, d = (passed(b.admit(P, M)) for _ in range(3))
    assert b.settle(a, 200) is not None
    assert b.settle(c, 503) is None  # one failure of two, closed
    assert tracked(b).consecutive_failures == 1
    assert b.settle(d, 503) is not None  # the second opens it
    assert tracked(b).state is CircuitState.OPEN


# -- generations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("late", [200, 404, 500])
def test_a_late_success_does_not_close_an_open_circuit(late: int) -> None:
    b, _ = breakers(failures=2)
    early = [passed(b.admit(P, M)) for _ in range(3)]
    b.settle(early[0], 503)
    b.settle(early[1], 503)  # opens
    assert b.settle(early[2], late) is None
    assert tracked(b).state is CircuitState.OPEN
    refused(b.admit(P, M))


@pytest.mark.parametrize("late", [(503, False), (None, True)])
def test_a_late_failure_does_not_extend_or_reopen(late: tuple[int | None, bool]) -> None:
    status, unreachable = late
    b, clock = breakers(failures=2, cool_down=30)
    early = [passed(b.admit(P, M)) for _ in range(4)]
    b.settle(early[0], 503)
    b.settle(early[1], 503)
    clock.now += 20
    assert b.settle(early[2], status, unreachable=unreachable) is None
    assert refused(b.admit(P, M)).retry_after == 10  # not extended
    clock.now += 10
    trial = passed(b.admit(P, M))
    # Late in half-open: it neither reopens nor takes the trial's slot.
    assert b.settle(early[3], status, unreachable=unreachable) is None
    assert tracked(b).state is CircuitState.HALF_OPEN
    assert b.settle(trial, 200) is not None
    # And late once closed again: it counts for nothing.
    stale = Pass(P, M, 0, False)
    assert b.settle(stale, 503) is None
    assert tracked(b).consecutive_failures == 0


def test_a_late_trial_from_an_earlier_half_open_is_ignored() -> None:
    b, clock = breakers(failures=1, trials=2)
    trip(b, 1)
    clock.now += 30
    first, second = passed(b.admit(P, M)), passed(b.admit(P, M))
    b.settle(first, 503)  # reopened: `second` is of the older generation
    clock.now += 30
    new_trials = [passed(b.admit(P, M)), passed(b.admit(P, M))]
    refused(b.admit(P, M))
    assert b.settle(second, None) is None  # frees none of the new trials' slots
    refused(b.admit(P, M))
    assert b.settle(second, 200) is None
    assert tracked(b).state is CircuitState.HALF_OPEN
    assert b.settle(new_trials[0], 200) is not None


def test_generations_only_grow_across_circuits_and_openings() -> None:
    b, clock = breakers(failures=1)
    seen = []
    for model in ("a", "b", "a", "c", "b"):
        fail(b, 1, model=model)
        clock.now += 30
        ticket = passed(b.admit(P, model))
        seen.append(ticket.generation)
        b.settle(ticket, 200)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


# -- disabled ------------------------------------------------------------------------------------


def test_disabled_settings_pass_everything_and_track_nothing() -> None:
    b, _ = breakers(failures=1, enabled=False)
    for status in (503, 504, 529, None):
        ticket = passed(b.admit(P, M))
        assert b.settle(ticket, status, unreachable=status is None) is None
    for i in range(100):
        passed(b.admit(P, f"m{i}"))
    assert b.snapshot() == []


@pytest.mark.parametrize(
    "bad",
    [
        {"failures": 0},
        {"failures": -1},
        {"cool_down_seconds": 0.0},
        {"cool_down_seconds": -5.0},
        {"cool_down_seconds": float("nan")},
        {"cool_down_seconds": float("inf")},
        {"half_open_requests": 0},
    ],
)
def test_settings_out_of_range_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerSettings(**bad)


def test_max_circuits_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreakers(BreakerSettings(), FakeClock(), 0)


# -- memory ---------------------------------------------------------------------------------------


def test_a_circuit_is_tracked_only_after_a_failure_and_forgotten_at_zero() -> None:
    b, _ = breakers(failures=3)
    for status in (200, 400, 500, None):
        b.settle(passed(b.admit(P, M)), status)
    assert b.snapshot() == []
    fail(b, 1)
    assert state(b) == CircuitSnapshot(P, M, CircuitState.CLOSED, 1, 0, 0)
    b.settle(passed(b.admit(P, M)), 200)
    assert b.snapshot() == []


def test_a_circuit_kept_for_its_trips_still_resets_on_success() -> None:
    b, clock = breakers(failures=3)
    trip(b, 3)
    clock.now += 30
    b.settle(passed(b.admit(P, M)), 200)
    for _ in range(4):
        fail(b, 2)
        assert b.settle(passed(b.admit(P, M)), 200) is None
    assert tracked(b) == CircuitSnapshot(P, M, CircuitState.CLOSED, 0, 1, 0)
    passed(b.admit(P, M))


def test_a_circuit_that_tripped_keeps_its_trips_once_closed() -> None:
    b, clock = breakers(failures=1)
    for trips in (1, 2, 3):
        trip(b, 1)
        clock.now += 30
        b.settle(passed(b.admit(P, M)), 200)
        b.settle(passed(b.admit(P, M)), 200)
        assert state(b) == CircuitSnapshot(P, M, CircuitState.CLOSED, 0, trips, 0)


@pytest.mark.parametrize("status", [503, None])
def test_a_million_distinct_failing_models_stay_bounded(status: int | None) -> None:
    """A hostile client inventing model names: the table never outgrows max_circuits, and
    circuits that matter (open ones) are not pushed out by the flood."""
    b, _ = breakers(failures=2, max_circuits=50)
    trip(b, 2)
    for i in range(1_000_000 if status is None else 200_000):
        model = f"junk-{i}"
        b.settle(passed(b.admit(P, model)), status, unreachable=status is None)
        if i % 50_000 == 0:
            assert len(b.snapshot()) <= 50
    assert len(b.snapshot()) <= 50
    assert tracked(b).state is CircuitState.OPEN
    refused(b.admit(P, M))


def test_the_least_recently_used_closed_circuit_is_dropped_first() -> None:
    b, _ = breakers(failures=3, max_circuits=3)
    for model in ("a", "b", "c"):
        fail(b, 1, model=model)
    passed(b.admit(P, "a"))  # a is used again: b is now the oldest
    fail(b, 1, model="d")
    assert {s.model for s in b.snapshot()} == {"a", "c", "d"}
    fail(b, 1, model="c")  # settling counts as use too
    fail(b, 1, model="e")
    assert {s.model for s in b.snapshot()} == {"c", "d", "e"}


def test_open_circuits_are_never_dropped_and_new_ones_fail_open() -> None:
    b, _ = breakers(failures=2, max_circuits=3)
    for model in ("a", "b", "c"):
        fail(b, 2, model=model)
    assert all(s.state is CircuitState.OPEN for s in b.snapshot())
    # A full table of open circuits: "d" fails and fails again, but it is never refused.
    for _ in range(10):
        assert b.settle(passed(b.admit(P, "d")), 503) is None
    assert {s.model for s in b.snapshot()} == {"a", "b", "c"}
    for model in ("a", "b", "c"):
        refused(b.admit(P, model))


def test_half_open_circuits_are_not_dropped() -> None:
    b, clock = breakers(failures=1, max_circuits=2)
    fail(b, 1, model="a")
    fail(b, 1, model="b")
    clock.now += 30
    trial = passed(b.admit(P, "a"))
    for i in range(20):
        fail(b, 1, model=f"x{i}")
    assert {s.model for s in b.snapshot()} == {"a", "b"}
    assert b.settle(trial, 200) is not None
    # Closed now, "a" may make room for a newcomer.
    fail(b, 1, model="y")
    assert {s.model for s in b.snapshot()} == {"b", "y"}


# -- threads --------------------------------------------------------------------------------------


def test_snapshot_from_a_thread_while_the_loop_mutates(switch_often: None) -> None:
    b, clock = breakers(failures=2, max_circuits=64)

    def read() -> None:
        snap = b.snapshot()
        assert len(snap) <= 64
        for s in snap:
            assert s.state is not CircuitState.CLOSED or s.retry_after == 0

    def mutate(i: int) -> None:
        verdict = b.admit(P, f"m{i % 200}")
        if isinstance(verdict, Pass):
            b.settle(verdict, (503, 200, 504, None)[i % 4])
        if i % 100 == 0:
            clock.now += 31

    assert read_while_mutating(read, mutate) > 0


# -- properties ---------------------------------------------------------------------------------

MODELS = ["a", "b", "c", "d"]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.sampled_from(MODELS)),
        st.tuples(
            st.just("settle"),
            st.integers(0, 50),
            st.sampled_from([200, 400, 500, 502, 503, 504, 529, None, "unreachable"]),
        ),
        st.tuples(st.just("tick"), st.floats(0, 40)),
    ),
    max_size=120,
)


@props
@given(
    ops,
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 3),
)
def test_properties_over_random_runs(
    run: list[tuple], failures: int, trials: int, max_circuits: int
) -> None:
    """Whatever happens: a circuit that never saw a failure is never refused; a refusal waits
    at least a second; the table stays within max_circuits; trials in flight stay within the
    limit; a closed circuit stays below the failure threshold."""
    b, clock = breakers(failures=failures, trials=trials, max_circuits=max_circuits)
    in_flight: list[Pass] = []
    failed_models: set[str] = set()
    for op in run:
        if op[0] == "admit":
            verdict = b.admit(P, op[1])
            if isinstance(verdict, CircuitOpen):
                assert op[1] in failed_models
                assert verdict.retry_after >= 1
                assert verdict.failures >= failures
            else:
                in_flight.append(verdict)
        elif op[0] == "settle" and in_flight:
            ticket = in_flight.pop(op[1] % len(in_flight))
            unreachable = op[2] == "unreachable"
            status = None if unreachable else op[2]
            if b.is_failure(status, unreachable):
                failed_models.add(ticket.model)
            b.settle(ticket, status, unreachable=unreachable)
        elif op[0] == "tick":
            clock.now += op[1]
        snap = b.snapshot()
        assert len(snap) <= max_circuits
        for s in snap:
            assert s.model in failed_models
            if s.state is CircuitState.CLOSED:
                assert s.consecutive_failures < failures
                assert s.consecutive_failures > 0 or s.trips > 0
        # Trials let through by one opening never outnumber the limit.
        trials_out = Counter((t.model, t.generation) for t in in_flight if t.trial)
        assert all(n <= trials for n in trials_out.values())
