"""What governance is configured with (DESIGN §9), and how a user's limits are combined.

A person's limits come from three places:
- ``users[].limits``: their own; a value here overrides every group's, ``unlimited`` included;
- ``groups[].limits``: what each member of the group may use on their own. A person in
  several groups gets, for each limit, the most generous of those groups (a group grants an
  allowance; joining one more group never cuts what another grants);
- ``groups[].shared_limits``: what the members use together. Every group's shared limit holds
  on its own: a person in two groups is stopped when either group's is spent.

Spend and token budgets count what the bridge's own provider keys paid for (credential kind
``centralized``): a user's own key (BYOK) or sign-in is not the organisation's money. Rate and
concurrency limits count every request, whoever pays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal
from zoneinfo import ZoneInfo

from aibridge.governance.periods import ADJECTIVE, PERIODS, Period

Metric = Literal["spend_usd", "tokens"]
METRICS: Final[tuple[Metric, ...]] = ("spend_usd", "tokens")
# A limit set to this in the YAML: no limit, overriding what a group gives.
UNLIMITED: Final = "unlimited"
# A group member that stands for everyone the bridge identifies.
EVERYONE: Final = "*"

BudgetKey = tuple[Metric, Period]  # ("spend_usd", "day")


@dataclass(frozen=True, slots=True)
class Limits:
    """One place's limits; a value None is not given there, math.inf is ``unlimited``."""

    budgets: dict[BudgetKey, float] = field(default_factory=dict)
    requests_per_minute: float | None = None
    concurrent_requests: float | None = None

    @property
    def empty(self) -> bool:
        return (
            not self.budgets
            and self.requests_per_minute is None
            and self.concurrent_requests is None
        )


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    members: frozenset[str]
    limits: Limits = Limits()
    shared_limits: Limits = Limits()
    key: str = ""  # where it is in the file, e.g. "groups[0]"

    def has_member(self, user_id: str) -> bool:
        return EVERYONE in self.members or user_id in self.members


@dataclass(frozen=True, slots=True)
class Governance:
    time_zone: str = "UTC"
    # Share of a budget from which responses carry a warning header; None: never.
    warn_at: float | None = 0.8
    # How often the totals are read again from the log (other bridges' spend).
    refresh_seconds: float = 5.0
    groups: tuple[Group, ...] = ()
    # users[].limits, by user id; where each came from, for messages.
    user_limits: dict[str, Limits] = field(default_factory=dict)
    user_keys: dict[str, str] = field(default_factory=dict)
    zone: ZoneInfo = field(init=False, repr=False, compare=False)
    # Whether any limit is configured at all: off, the hooks skip governance. Asked for
    # every request, so known once.
    enabled: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", ZoneInfo(self.time_zone))
        enabled = any(not lim.empty for lim in self.user_limits.values()) or any(
            not g.limits.empty or not g.shared_limits.empty for g in self.groups
        )
        object.__setattr__(self, "enabled", enabled)

    def groups_of(self, user_id: str) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.has_member(user_id))

    def effective(self, user_id: str) -> EffectiveLimits:
        """The limits that hold for one person (the module's rules)."""
        groups = self.groups_of(user_id)
        own = self.user_limits.get(user_id, Limits())
        own_key = self.user_keys.get(user_id, "users")
        budgets: list[Budget] = []
        for metric in METRICS:
            for period in PERIODS:
                key = (metric, period)
                chosen = _choose(
                    own.budgets.get(key),
                    f"{own_key}.limits",
                    [(g.limits.budgets.get(key), f"{g.key}.limits") for g in groups],
                )
                if chosen is not None:
                    budgets.append(Budget(metric, period, chosen[0], "user", user_id, chosen[1]))
                for group in groups:
                    shared = group.shared_limits.budgets.get(key)
                    if shared is not None and shared != float("inf"):
                        where = f"{group.key}.shared_limits"
                        budgets.append(Budget(metric, period, shared, "group", group.name, where))
        rpm = _choose(
            own.requests_per_minute,
            f"{own_key}.limits",
            [(g.limits.requests_per_minute, f"{g.key}.limits") for g in groups],
        )
        concurrent = _choose(
            own.concurrent_requests,
            f"{own_key}.limits",
            [(g.limits.concurrent_requests, f"{g.key}.limits") for g in groups],
        )
        return EffectiveLimits(
            user_id,
            tuple(budgets),
            None if rpm is None else int(rpm[0]),
            None if concurrent is None else int(concurrent[0]),
            tuple(g.name for g in groups),
        )


def _choose(
    own: float | None, own_key: str, from_groups: list[tuple[float | None, str]]
) -> tuple[float, str] | None:
    """The user's own value, else the most generous group's; None (or ``unlimited``): no
    limit."""
    if own is not None:
        return None if own == float("inf") else (own, own_key)
    given = [(value, key) for value, key in from_groups if value is not None]
    if not given:
        return None
    value, key = max(given, key=lambda item: item[0])
    return None if value == float("inf") else (value, key)


@dataclass(frozen=True, slots=True)
class Budget:
    """One budget that holds for a person: spend or tokens per period, theirs or a group's."""

    metric: Metric
    period: Period
    limit: float
    scope: Literal["user", "group"]
    owner: str  # the user id, or the group's name
    source: str  # the config key it comes from, e.g. "groups[1].limits"

    def title(self) -> str:
        """e.g. "the daily spend budget of user alice"."""
        what = "spend" if self.metric == "spend_usd" else "token"
        whose = f"user {self.owner}" if self.scope == "user" else f"group {self.owner}"
        shared = " (shared by its members)" if self.scope == "group" else ""
        return f"the {ADJECTIVE[self.period]} {what} budget of {whose}{shared}"

    def amount(self, value: float) -> str:
        return format_amount(self.metric, value)


def format_amount(metric: Metric, value: float) -> str:
    if metric == "spend_usd":
        return f"${value:,.2f}"
    return f"{int(value):,} tokens"


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    user_id: str
    budgets: tuple[Budget, ...]
    requests_per_minute: int | None
    concurrent_requests: int | None
    groups: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return (
            not self.budgets
            and self.requests_per_minute is None
            and self.concurrent_requests is None
        )
