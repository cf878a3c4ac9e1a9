"""Limits as configured (aibridge.config's governance keys) and as they combine for one person
(aibridge.governance.limits), read through parse_config from dicts, as YAML gives them."""

from __future__ import annotations

import math
from typing import Any

import pytest

from aibridge.config import ConfigError, parse_config
from aibridge.governance.limits import Budget, EffectiveLimits, Governance, format_amount

FILE = "limits.yaml"
PROVIDERS = [{"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": "sk-test"}]
PEOPLE = ("alice", "bob", "carol")


def user(user_id: str, **entry: Any) -> dict[str, Any]:
    return {"id": user_id, "token": f"{user_id}-token-0123456789", **entry}


def config(
    *,
    users: list[dict[str, Any]] | None = None,
    groups: list[dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
    **top: Any,
) -> Governance:
    raw: dict[str, Any] = {
        "providers": PROVIDERS,
        "users": users if users is not None else [user(u) for u in PEOPLE],
        **top,
    }
    if groups is not None:
        raw["groups"] = groups
    return parse_config(raw, FILE, env or {}).governance


def budgets(limits: EffectiveLimits) -> dict[tuple[str, str, str, str], tuple[float, str]]:
    """(scope, owner, metric, period) -> (limit, source)."""
    return {(b.scope, b.owner, b.metric, b.period): (b.limit, b.source) for b in limits.budgets}


def own(limits: EffectiveLimits) -> dict[str, float]:
    """The person's own budgets as "metric.period" -> limit."""
    return {f"{b.metric}.{b.period}": b.limit for b in limits.budgets if b.scope == "user"}


# ---- how limits combine ------------------------------------------------------------------


def test_nothing_configured() -> None:
    governance = config()
    assert not governance.enabled
    assert (governance.time_zone, governance.warn_at, governance.refresh_seconds) == (
        "UTC",
        0.8,
        5.0,
    )
    limits = governance.effective("alice")
    assert limits.empty and limits.budgets == () and limits.groups == ()


def test_own_limit_overrides_the_groups_per_key() -> None:
    governance = config(
        users=[
            user("alice", groups=["eng"], limits={"spend_usd": {"day": 5}}),
            user("bob", groups=["eng"]),
        ],
        groups=[
            {
                "name": "eng",
                "limits": {
                    "spend_usd": {"day": 20, "week": 100},
                    "tokens": {"month": 1_000_000},
                    "requests_per_minute": 60,
                    "concurrent_requests": 4,
                },
            }
        ],
    )
    alice = governance.effective("alice")
    assert budgets(alice) == {
        ("user", "alice", "spend_usd", "day"): (5, "users[0].limits"),
        ("user", "alice", "spend_usd", "week"): (100, "groups[0].limits"),
        ("user", "alice", "tokens", "month"): (1_000_000, "groups[0].limits"),
    }
    assert (alice.requests_per_minute, alice.concurrent_requests) == (60, 4)
    assert isinstance(alice.requests_per_minute, int)
    assert alice.groups == ("eng",)
    # Bob's budgets are the group's, counted as his own.
    assert own(governance.effective("bob")) == {
        "spend_usd.day": 20,
        "spend_usd.week": 100,
        "tokens.month": 1_000_000,
    }
    # A person's own rate overrides the group's even when it is stricter or looser.
    tighter = config(
        users=[user("alice", groups=["eng"], limits={"requests_per_minute": 600})],
        groups=[{"name": "eng", "limits": {"requests_per_minute": 60, "concurrent_requests": 2}}],
    ).effective("alice")
    assert (tighter.requests_per_minute, tighter.concurrent_requests) == (600, 2)


def test_several_groups_the_most_generous_per_key() -> None:
    governance = config(
        users=[user("alice", groups=["small", "big"]), user("bob", groups=["small"])],
        groups=[
            {
                "name": "small",
                "limits": {
                    "spend_usd": {"day": 10, "month": 500},
                    "requests_per_minute": 30,
                    "concurrent_requests": 1,
                },
            },
            {
                "name": "big",
                "limits": {
                    "spend_usd": {"day": 25},
                    "tokens": {"week": 2000},
                    "requests_per_minute": 10,
                    "concurrent_requests": 8,
                },
            },
        ],
    )
    alice = governance.effective("alice")
    assert budgets(alice) == {
        ("user", "alice", "spend_usd", "day"): (25, "groups[1].limits"),
        ("user", "alice", "spend_usd", "month"): (500, "groups[0].limits"),  # only one gives it
        ("user", "alice", "tokens", "week"): (2000, "groups[1].limits"),
    }
    assert (alice.requests_per_minute, alice.concurrent_requests) == (30, 8)
    assert alice.groups == ("small", "big")
    bob = governance.effective("bob")
    assert own(bob) == {"spend_usd.day": 10, "spend_usd.month": 500}
    assert (bob.requests_per_minute, bob.concurrent_requests) == (30, 1)
    # A group's 0 is not more generous than another's 10.
    zero = config(
        users=[user("alice", groups=["none", "some"])],
        groups=[
            {"name": "none", "limits": {"spend_usd": {"day": 0}}},
            {"name": "some", "limits": {"spend_usd": {"day": 10}}},
        ],
    )
    assert own(zero.effective("alice")) == {"spend_usd.day": 10}


def test_unlimited_in_own_limits() -> None:
    governance = config(
        users=[
            user(
                "alice",
                groups=["eng"],
                limits={
                    "spend_usd": {"day": "unlimited"},
                    "requests_per_minute": "unlimited",
                    "concurrent_requests": " unlimited ",
                },
            )
        ],
        groups=[
            {
                "name": "eng",
                "limits": {
                    "spend_usd": {"day": 10, "week": 40},
                    "requests_per_minute": 60,
                    "concurrent_requests": 2,
                },
            }
        ],
    )
    alice = governance.effective("alice")
    assert own(alice) == {"spend_usd.week": 40}  # the day is unlimited, the week still holds
    assert (alice.requests_per_minute, alice.concurrent_requests) == (None, None)
    assert governance.user_limits["alice"].budgets[("spend_usd", "day")] == math.inf


def test_unlimited_in_a_group() -> None:
    groups = [
        {"name": "capped", "limits": {"spend_usd": {"day": 10}, "requests_per_minute": 5}},
        {"name": "free", "limits": {"spend_usd": {"day": "unlimited"}, "tokens": {"day": 99}}},
    ]
    governance = config(
        users=[
            user("alice", groups=["capped", "free"]),
            user("bob", groups=["capped", "free"], limits={"spend_usd": {"day": 3}}),
            user("carol", groups=["capped"]),
        ],
        groups=groups,
    )
    alice = governance.effective("alice")
    assert own(alice) == {"tokens.day": 99}  # unlimited is the most generous
    assert alice.requests_per_minute == 5
    # A person's own value overrides even a group's unlimited.
    assert own(governance.effective("bob")) == {"spend_usd.day": 3, "tokens.day": 99}
    assert own(governance.effective("carol")) == {"spend_usd.day": 10}
    # Only unlimited values: enabled (they are configured), nothing to enforce.
    only = config(
        users=[user("alice", groups=["g"])],
        groups=[{"name": "g", "limits": {"spend_usd": {"day": "unlimited"}}}],
    )
    assert only.enabled and only.effective("alice").empty


def test_shared_limits_of_two_groups_both_hold() -> None:
    governance = config(
        users=[user("alice", groups=["eng", "ml"]), user("bob", groups=["eng"])],
        groups=[
            {
                "name": "eng",
                "limits": {"spend_usd": {"day": 20}},
                "shared_limits": {"spend_usd": {"day": 100}, "tokens": {"month": 10**9}},
            },
            {
                "name": "ml",
                "shared_limits": {"spend_usd": {"day": 50, "week": "unlimited"}},
            },
        ],
    )
    assert budgets(governance.effective("alice")) == {
        ("user", "alice", "spend_usd", "day"): (20, "groups[0].limits"),
        ("group", "eng", "spend_usd", "day"): (100, "groups[0].shared_limits"),
        ("group", "ml", "spend_usd", "day"): (50, "groups[1].shared_limits"),
        ("group", "eng", "tokens", "month"): (10**9, "groups[0].shared_limits"),
    }
    assert budgets(governance.effective("bob")) == {
        ("user", "bob", "spend_usd", "day"): (20, "groups[0].limits"),
        ("group", "eng", "spend_usd", "day"): (100, "groups[0].shared_limits"),
        ("group", "eng", "tokens", "month"): (10**9, "groups[0].shared_limits"),
    }
    # Own limits override per-person ones, never a group's shared budget.
    alone = config(
        users=[user("alice", groups=["eng"], limits={"spend_usd": {"day": "unlimited"}})],
        groups=[{"name": "eng", "shared_limits": {"spend_usd": {"day": 100}}}],
    )
    assert budgets(alone.effective("alice")) == {
        ("group", "eng", "spend_usd", "day"): (100, "groups[0].shared_limits")
    }
    assert config(
        users=[user("alice")], groups=[{"name": "g", "shared_limits": {"tokens": {"day": 1}}}]
    ).enabled


def test_everyone_member() -> None:
    governance = config(
        users=[user("alice")],
        groups=[
            {"name": "all", "members": ["*"], "limits": {"requests_per_minute": 100}},
            {"name": "some", "members": ["alice"], "limits": {"requests_per_minute": 200}},
        ],
    )
    # Someone not in users (a proxyauth name, a BYOK key's hint) is in "*" too.
    for someone in ("alice", "zoe", "sk-...abcd", "Ünïcode"):
        assert governance.effective(someone).requests_per_minute == (
            200 if someone == "alice" else 100
        )
        assert "all" in governance.effective(someone).groups
    assert governance.effective("zoe").groups == ("all",)


def test_users_groups_merge_with_groups_members() -> None:
    governance = config(
        users=[user("alice"), user("bob", groups=["eng"]), user("carol", groups=["ops", "eng"])],
        groups=[
            {"name": "eng", "members": ["alice", "dave"], "limits": {"concurrent_requests": 2}},
            {"name": "ops", "limits": {"concurrent_requests": 5}},
        ],
    )
    eng, ops = governance.groups
    assert eng.members == frozenset({"alice", "dave", "bob", "carol"})
    assert ops.members == frozenset({"carol"})
    assert governance.effective("bob").concurrent_requests == 2
    assert governance.effective("carol").concurrent_requests == 5
    assert governance.effective("carol").groups == ("eng", "ops")
    # dave is not in users: allowed, with a warning that he counts once identified.
    assert governance.effective("dave").concurrent_requests == 2
    assert governance.effective("erin").empty


def test_member_not_in_users_warns() -> None:
    raw = {
        "providers": PROVIDERS,
        "users": [user("alice")],
        "groups": [{"name": "eng", "members": ["alice", "dave", "*"]}],
    }
    warnings = parse_config(raw, FILE, {}).warnings
    assert any("groups[0].members: 'dave' is not in users" in w for w in warnings)
    assert not any("'alice'" in w or "'*'" in w for w in warnings)


def test_values_from_the_environment_and_zero() -> None:
    env = {"DAY_USD": "12.5", "RPM": " 30 ", "OPEN": "unlimited"}
    governance = config(
        users=[
            user(
                "alice",
                limits={
                    "spend_usd": {"day": "${DAY_USD}", "week": "${OPEN}", "month": 0},
                    "tokens": {"day": 0},
                    "requests_per_minute": "${RPM}",
                    "concurrent_requests": 0,
                },
            )
        ],
        env=env,
    )
    alice = governance.effective("alice")
    assert own(alice) == {"spend_usd.day": 12.5, "spend_usd.month": 0, "tokens.day": 0}
    assert (alice.requests_per_minute, alice.concurrent_requests) == (30, 0)
    # Whole numbers written as floats are whole.
    assert (
        config(users=[user("alice", limits={"tokens": {"week": 1e6}, "requests_per_minute": 60.0})])
        .effective("alice")
        .requests_per_minute
        == 60
    )


def test_governance_section() -> None:
    governance = config(
        governance={"time_zone": "Europe/Berlin", "warn_at": 0.5, "refresh_seconds": 0.1}
    )
    assert (governance.time_zone, governance.warn_at, governance.refresh_seconds) == (
        "Europe/Berlin",
        0.5,
        0.1,
    )
    assert governance.zone.key == "Europe/Berlin"
    for off in (None, False):
        assert config(governance={"warn_at": off}).warn_at is None
    assert config(governance={"warn_at": 1, "refresh_seconds": 3600}).warn_at == 1
    assert config(governance={"warn_at": "0.9"}).warn_at == 0.9
    assert config(governance={"time_zone": "${TZ_NAME}"}, env={"TZ_NAME": "Asia/Kathmandu"}).zone


def test_budget_words() -> None:
    mine = Budget("spend_usd", "day", 20, "user", "alice", "users[0].limits")
    ours = Budget("tokens", "week", 10**6, "group", "eng", "groups[0].shared_limits")
    monthly = Budget("spend_usd", "month", 1, "user", "bob", "groups[1].limits")
    assert mine.title() == "the daily spend budget of user alice"
    assert ours.title() == "the weekly token budget of group eng (shared by its members)"
    assert monthly.title() == "the monthly spend budget of user bob"
    assert mine.amount(1234.5) == "$1,234.50"
    assert mine.amount(0.004) == "$0.00"
    assert ours.amount(1_234_567.9) == "1,234,567 tokens"
    assert format_amount("tokens", 0) == "0 tokens"


# ---- configuration errors name the key ---------------------------------------------------


def assert_refused(raw_edit: dict[str, Any], key: str, problem: str) -> None:
    raw: dict[str, Any] = {"providers": PROVIDERS, "users": [user(u) for u in PEOPLE]}
    raw.update(raw_edit)
    with pytest.raises(ConfigError) as info:
        parse_config(raw, FILE, {"EMPTY": "", "WORDS": "lots"})
    assert info.value.key == key, str(info.value)
    assert problem in info.value.problem, str(info.value)
    assert str(info.value).startswith(f"{FILE}: {key}: ")


def group_limits(limits: Any, *, shared: bool = False) -> dict[str, Any]:
    section = "shared_limits" if shared else "limits"
    return {"groups": [{"name": "eng", "members": ["*"], section: limits}]}


def own_limits(limits: Any, index: int = 1) -> dict[str, Any]:
    users = [user(u) for u in PEOPLE]
    users[index] = {**users[index], "limits": limits}
    return {"users": users}


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        ({"users": [user("alice", groups=["ops"])]}, "users[0].groups[0]", "unknown group 'ops'"),
        (
            {"users": [user("alice", groups=["ops"])]},
            "users[0].groups[0]",
            "none are configured",
        ),
        (
            {
                "users": [user("alice", groups=["eng"]), user("bob", groups=["eng", "Eng"])],
                "groups": [{"name": "eng"}],
            },
            "users[1].groups[1]",
            "unknown group 'Eng' (groups: eng)",
        ),
        (
            {"users": [user("alice", groups=["eng "])], "groups": [{"name": "eng"}]},
            "users[0].groups[0]",
            "unknown group 'eng '",
        ),
        ({"users": [user("alice", groups="eng")]}, "users[0].groups", "list of strings"),
        ({"users": [user("alice", groups=[1])]}, "users[0].groups", "list of strings"),
    ],
)
def test_unknown_group(edit: dict[str, Any], key: str, problem: str) -> None:
    assert_refused(edit, key, problem)


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"spend_usd": {"daily": 5}}, "spend_usd.daily"),
        ({"spend_usd": {"Day": 5}}, "spend_usd.Day"),
        ({"spend_usd": {"year": 5}}, "spend_usd.year"),
        ({"tokens": {"minute": 5}}, "tokens.minute"),
        ({"tokens": {"day": 1, "fortnight": 5}}, "tokens.fortnight"),
        ({"tokens": {1: 5}}, "tokens.1"),
    ],
)
def test_unknown_period(limits: dict[str, Any], key: str) -> None:
    assert_refused(group_limits(limits), f"groups[0].limits.{key}", "unknown period")
    assert_refused(own_limits(limits), f"users[1].limits.{key}", "unknown period")
    assert_refused(group_limits(limits, shared=True), f"groups[0].shared_limits.{key}", "period")


@pytest.mark.parametrize(
    "name",
    [
        "spend",
        "rpm",
        "concurrency",
        "requests_per_hour",
        "spend_usd_day",
        "Tokens",
        "budget",
    ],
)
def test_unknown_limit_key(name: str) -> None:
    assert_refused(group_limits({name: 1}), f"groups[0].limits.{name}", "unknown key")
    assert_refused(own_limits({name: 1}), f"users[1].limits.{name}", "unknown key")


@pytest.mark.parametrize("name", ["requests_per_minute", "concurrent_requests"])
@pytest.mark.parametrize("value", [10, "unlimited", 0])
def test_rates_in_shared_limits(name: str, value: Any) -> None:
    limits = {"spend_usd": {"day": 100}, name: value}
    assert_refused(
        group_limits(limits, shared=True),
        f"groups[0].shared_limits.{name}",
        "rates and concurrency are per person",
    )


# Each bad value, at each place a limit is read: (value, problem).
NEGATIVE = [(-1, ">= 0"), (-0.01, ">= 0"), ("-3", ">= 0"), (-(10**6), ">= 0")]
NOT_A_NUMBER = [
    ("lots", "must be a number, got 'lots'"),
    ("20 USD", "must be a number"),
    ("$20", "must be a number"),
    ("", "must be a number, got ''"),
    ("${EMPTY}", "EMPTY is not set"),
    ("${WORDS}", "must be a number, got 'lots'"),
    ("Unlimited", "must be a number"),
    ("infinite", "must be a number"),
    ([5], "must be a number, got list"),
    ({"value": 5}, "must be a number, got dict"),
    (float("nan"), "finite"),
    (float("inf"), "finite"),
    ("1e999", "finite"),
]
BOOLEAN = [(True, "got bool"), (False, "got bool")]
NOT_WHOLE = [(1.5, "whole number"), (0.1, "whole number"), ("7.5", "whole number")]


def limit_places(whole: bool) -> list[tuple[str, Any]]:
    """(key suffix, builder of the limits section for one value)."""
    places: list[tuple[str, Any]] = [
        ("tokens.day", lambda v: {"tokens": {"day": v}}),
        ("tokens.month", lambda v: {"tokens": {"week": 5, "month": v}}),
        ("requests_per_minute", lambda v: {"requests_per_minute": v}),
        ("concurrent_requests", lambda v: {"concurrent_requests": v}),
    ]
    if not whole:
        places += [
            ("spend_usd.day", lambda v: {"spend_usd": {"day": v}}),
            ("spend_usd.week", lambda v: {"spend_usd": {"week": v}}),
        ]
    return places


@pytest.mark.parametrize(
    ("value", "problem"),
    NEGATIVE + NOT_A_NUMBER + BOOLEAN,
    ids=lambda v: repr(v)[:20],
)
def test_bad_limit_values(value: Any, problem: str) -> None:
    for suffix, build in limit_places(whole=False):
        assert_refused(group_limits(build(value)), f"groups[0].limits.{suffix}", problem)
        assert_refused(own_limits(build(value), 2), f"users[2].limits.{suffix}", problem)
        if suffix.startswith(("spend_usd", "tokens")):
            where = f"groups[0].shared_limits.{suffix}"
            assert_refused(group_limits(build(value), shared=True), where, problem)


def test_an_integer_too_large_for_a_float() -> None:
    for value in (10**400, -(10**309), 2**1100):
        where = "groups[0].limits.tokens.day"
        assert_refused(group_limits({"tokens": {"day": value}}), where, "too large")


@pytest.mark.parametrize(("value", "problem"), NOT_WHOLE, ids=repr)
def test_counts_must_be_whole(value: Any, problem: str) -> None:
    for suffix, build in limit_places(whole=True):
        assert_refused(group_limits(build(value)), f"groups[0].limits.{suffix}", problem)
        assert_refused(own_limits(build(value), 0), f"users[0].limits.{suffix}", problem)
    # Dollars need not be whole.
    governance = config(users=[user("alice", limits={"spend_usd": {"day": value}})])
    assert own(governance.effective("alice")) == {"spend_usd.day": float(value)}


def test_a_limits_section_that_is_not_a_mapping() -> None:
    for bad in ([1], "spend", 5):
        assert_refused(group_limits(bad), "groups[0].limits", "must be a mapping")
        assert_refused(own_limits(bad), "users[1].limits", "must be a mapping")
        assert_refused(group_limits({"tokens": bad}), "groups[0].limits.tokens", "mapping")


@pytest.mark.parametrize(
    ("zone", "problem"),
    [
        ("Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("utc", "unknown time zone"),
        ("UTC+2", "unknown time zone"),
        ("CEST", "unknown time zone"),
        (" Europe/Berlin", "unknown time zone"),
        ("Europe/", "unknown time zone"),
        ("/etc/localtime", "unknown time zone"),
        ("../zoneinfo/UTC", "unknown time zone"),
        ("Etc/../UTC", "unknown time zone"),
        ("zone.tab", "unknown time zone"),
        (5, "unknown time zone '5'"),
        ("", "must not be empty"),
        (["UTC"], "must be a string"),
        ("America", "unknown time zone"),  # a directory of zones
        ("Europe", "unknown time zone"),
    ],
)
def test_bad_time_zone(zone: Any, problem: str) -> None:
    assert_refused({"governance": {"time_zone": zone}}, "governance.time_zone", problem)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "between 0 and 1"),
        (-0.1, "between 0 and 1"),
        (1.01, "between 0 and 1"),
        (80, "between 0 and 1 (0.8 = 80%), got 80"),  # a percentage, not a share
        ("80%", "must be a number, got '80%'"),
        ("high", "must be a number"),
        (True, "got bool"),
        (float("nan"), "finite"),
        ([0.5], "got list"),
    ],
    ids=repr,
)
def test_warn_at_out_of_range(value: Any, problem: str) -> None:
    assert_refused({"governance": {"warn_at": value}}, "governance.warn_at", problem)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "between 0.1 and 3600"),
        (0.05, "between 0.1 and 3600"),
        (-5, "between 0.1 and 3600"),
        (3600.5, "between 0.1 and 3600"),
        (86400, "between 0.1 and 3600"),
        ("soon", "must be a number"),
        (True, "got bool"),
        (None, "got nothing"),
        (float("inf"), "finite"),
    ],
    ids=repr,
)
def test_refresh_seconds_out_of_range(value: Any, problem: str) -> None:
    assert_refused(
        {"governance": {"refresh_seconds": value}}, "governance.refresh_seconds", problem
    )


@pytest.mark.parametrize(
    ("groups", "key", "name"),
    [
        ([{"name": "eng"}, {"name": "eng"}], "groups[1].name", "'eng'"),
        (
            [{"name": "a"}, {"name": "eng"}, {"name": "b"}, {"name": "eng"}],
            "groups[3].name",
            "'eng'",
        ),
        ([{"name": 5}, {"name": "5"}], "groups[1].name", "'5'"),
        ([{"name": "${TEAM}"}, {"name": "eng"}], "groups[1].name", "'eng'"),
    ],
)
def test_duplicate_group_name(groups: list[dict[str, Any]], key: str, name: str) -> None:
    raw = {"providers": PROVIDERS, "users": [user("alice")], "groups": groups}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, FILE, {"TEAM": "eng"})
    assert info.value.key == key
    assert info.value.problem == f"duplicate group name {name}"


@pytest.mark.parametrize(
    ("entries", "key", "first"),
    [
        (
            [
                user("alice", limits={"tokens": {"day": 1}}),
                {**user("alice"), "token": "other-tok-1"},
            ],
            None,
            None,
        ),
        (
            [
                user("alice", limits={"tokens": {"day": 1}}),
                {**user("alice"), "token": "other-tok-1", "limits": {"tokens": {"day": 2}}},
            ],
            "users[1].limits",
            "users[0].limits",
        ),
        (
            [
                user("bob"),
                user("alice", limits={"requests_per_minute": 5}),
                user("carol"),
                {"id": "alice", "token_sha256": "a" * 64, "limits": {"spend_usd": {"day": 1}}},
            ],
            "users[3].limits",
            "users[1].limits",
        ),
    ],
)
def test_limits_given_twice_for_one_user(
    entries: list[dict[str, Any]], key: str | None, first: str | None
) -> None:
    raw = {"providers": PROVIDERS, "users": entries}
    if key is None:  # two tokens for one person, limits given once: fine
        governance = parse_config(raw, FILE, {}).governance
        assert own(governance.effective("alice")) == {"tokens.day": 1}
        return
    with pytest.raises(ConfigError) as info:
        parse_config(raw, FILE, {})
    assert info.value.key == key
    assert f"has limits at {first} already" in info.value.problem


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        ({"governance": {"timezone": "UTC"}}, "governance.timezone", "unknown key"),
        ({"governance": {"warn": 0.5}}, "governance.warn", "unknown key"),
        ({"governance": "UTC"}, "governance", "must be a mapping"),
        ({"groups": {"eng": {}}}, "groups", "must be a list"),
        ({"groups": ["eng"]}, "groups[0]", "must be a mapping"),
        ({"groups": [{"members": ["alice"]}]}, "groups[0].name", "is required"),
        ({"groups": [{"name": ""}]}, "groups[0].name", "must not be empty"),
        ({"groups": [{"name": "eng", "member": ["alice"]}]}, "groups[0].member", "unknown key"),
        ({"groups": [{"name": "eng", "members": "alice"}]}, "groups[0].members", "list of strings"),
        ({"users": [{**user("alice"), "limit": {}}]}, "users[0].limit", "unknown key"),
    ],
)
def test_other_governance_keys(edit: dict[str, Any], key: str, problem: str) -> None:
    assert_refused(edit, key, problem)
