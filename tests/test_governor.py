"""Enforcing budgets and limits (aibridge.governance.governor) and reading spend from the audit
log (aibridge.governance.spend_log).

Verdicts are judged at an injected `now` (fixed dates, fed to the ledger directly). Reading
the log uses rows written by the real Recorder; where the governor reads it on its own clock
(refresh, start), the time zone is chosen so that the local hour is about noon now, so no
period can end during a test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aibridge.config import parse_config
from aibridge.governance.governor import (
    CONCURRENCY_RETRY_SECONDS,
    FREE_ADMISSION,
    Admission,
    Governor,
    Refusal,
    warning_header,
)
from aibridge.governance.ledger import Ledger, Use
from aibridge.governance.limits import Governance
from aibridge.governance.periods import spelled
from aibridge.governance.spend_log import SpendLog
from aibridge.record.recorder import Recorder

PROVIDERS = [{"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": "sk-test"}]
# Wednesday 13 May 2026, noon UTC.
NOON = datetime(2026, 5, 13, 12, tzinfo=UTC)
T = NOON.timestamp()
NEXT_DAY = datetime(2026, 5, 14, tzinfo=UTC).timestamp()


def user(user_id: str, **entry: Any) -> dict[str, Any]:
    return {"id": user_id, "token": f"{user_id}-token-0123456789", **entry}


def governance(
    users: list[dict[str, Any]],
    groups: list[dict[str, Any]] | None = None,
    **section: Any,
) -> Governance:
    raw: dict[str, Any] = {"providers": PROVIDERS, "users": users, "governance": section}
    if groups is not None:
        raw["groups"] = groups
    return parse_config(raw, "limits.yaml", {}).governance


def governor(
    users: list[dict[str, Any]], groups: list[dict[str, Any]] | None = None, **section: Any
) -> Governor:
    return Governor(governance(users, groups, **section), None)


def feed(gov: Governor, user_id: str, usd: float, tokens: int = 0, when: float = T) -> None:
    """A row of the log, as the log's thread hands it to the ledger, at `when`."""
    moment = datetime.fromtimestamp(when, UTC) - timedelta(minutes=1)
    gov.ledger.add_logged([Use(uuid.uuid4().hex, user_id, spelled(moment), usd, tokens)], when)


def admitted(verdict: Admission | Refusal) -> Admission:
    assert isinstance(verdict, Admission), verdict
    return verdict


def refused(verdict: Admission | Refusal, status: int) -> Refusal:
    assert isinstance(verdict, Refusal), verdict
    assert verdict.status == status
    return verdict


# ---- spent budgets: 403 ------------------------------------------------------------------


def test_a_spent_budget_is_refused_with_403() -> None:
    gov = governor([user("alice", limits={"spend_usd": {"day": 10}})])
    feed(gov, "alice", 6.0)
    assert admitted(gov.admit("alice", "centralized", T)).warnings == []
    feed(gov, "alice", 3.99)
    admitted(gov.admit("alice", "centralized", T))
    feed(gov, "alice", 0.01)  # exactly the limit: used up
    refusal = refused(gov.admit("alice", "centralized", T), 403)
    assert refusal.message == (
        "AI Bridge: the daily spend budget of user alice is used up ($10.00 of $10.00 since "
        "2026-05-13 00:00 UTC). Requests are refused until it resets at 2026-05-14 00:00 UTC "
        "(in 12 h 0 min); to raise it, ask the bridge's operator (users[0].limits)."
    )
    assert refusal.headers == {
        "x-aibridge-limit": "spend_usd.day",
        "x-aibridge-budget-resets": "2026-05-14T00:00:00.000000+00:00",
    }
    assert refusal.detail == {
        "limit": "spend_usd.day",
        "scope": "user",
        "owner": "alice",
        "limit_value": 10,
        "used": 10.0,
        "resets_at": "2026-05-14T00:00:00.000000+00:00",
        "source": "users[0].limits",
    }
    # Over it, later in the day: the amount and the wait follow.
    feed(gov, "alice", 0.5)
    late = refused(gov.admit("alice", "centralized", T + 11 * 3600 + 15 * 60 + 30), 403)
    assert "($10.50 of $10.00 since" in late.message
    assert "(in 44 min)" in late.message
    # The next day it is lifted.
    admitted(gov.admit("alice", "centralized", NEXT_DAY))


def test_weekly_and_monthly_budgets_in_a_time_zone() -> None:
    gov = governor(
        [user("alice", groups=["eng"])],
        [{"name": "eng", "limits": {"spend_usd": {"week": 50, "month": 100}}}],
        time_zone="America/New_York",
    )
    feed(gov, "alice", 50.0)
    refusal = refused(gov.admit("alice", "centralized", T), 403)
    assert refusal.message.startswith(
        "AI Bridge: the weekly spend budget of user alice is used up ($50.00 of $50.00 since "
        "2026-05-11 00:00 America/New_York). Requests are refused until it resets at "
        "2026-05-18 00:00 America/New_York (in 4 d 16 h)"
    )
    assert refusal.message.endswith("(groups[0].limits).")
    assert refusal.headers["x-aibridge-budget-resets"] == "2026-05-18T04:00:00.000000+00:00"
    feed(gov, "alice", 50.0)
    # The monthly one is spent too; the first spent budget in the order day, week, month
    # answers.
    assert refused(gov.admit("alice", "centralized", T), 403).detail["limit"] == "spend_usd.week"
    monday = datetime(2026, 5, 18, 4, tzinfo=UTC).timestamp()
    assert refused(gov.admit("alice", "centralized", monday), 403).detail["limit"] == (
        "spend_usd.month"
    )


def test_token_budget() -> None:
    gov = governor([user("alice", limits={"tokens": {"day": 1000}})], warn_at=None)
    feed(gov, "alice", 0.0, 999)
    admitted(gov.admit("alice", "centralized", T))
    feed(gov, "alice", 0.0, 1)
    refusal = refused(gov.admit("alice", "centralized", T), 403)
    assert "the daily token budget of user alice is used up (1,000 tokens of 1,000 tokens" in (
        refusal.message
    )
    assert refusal.headers["x-aibridge-limit"] == "tokens.day"
    assert refusal.detail["used"] == 1000
    # Spend does not count against a token budget, nor tokens against a spend budget.
    other = governor([user("bob", limits={"tokens": {"day": 10}, "spend_usd": {"day": 1}})])
    feed(other, "bob", 0.99, 9)
    admitted(other.admit("bob", "centralized", T))


def test_group_shared_budget() -> None:
    gov = governor(
        [
            user("alice", groups=["eng", "ml"]),
            user("bob", groups=["eng"]),
            user("carol"),
            user("dave", groups=["ml"]),
        ],
        [
            {"name": "eng", "shared_limits": {"spend_usd": {"day": 10}}},
            {"name": "ml", "shared_limits": {"spend_usd": {"day": 100}}},
        ],
    )
    feed(gov, "alice", 6.0)
    admitted(gov.admit("bob", "centralized", T))
    feed(gov, "bob", 4.0)
    for member in ("alice", "bob"):
        refusal = refused(gov.admit(member, "centralized", T), 403)
        assert refusal.message.startswith(
            "AI Bridge: the daily spend budget of group eng (shared by its members) is used up "
            "($10.00 of $10.00 since"
        )
        assert refusal.message.endswith("(groups[0].shared_limits).")
        assert (refusal.detail["scope"], refusal.detail["owner"]) == ("group", "eng")
    admitted(gov.admit("carol", "centralized", T))  # in no group
    admitted(gov.admit("dave", "centralized", T))  # ml's shared budget: 6 of 100
    feed(gov, "dave", 94.0)
    assert refused(gov.admit("dave", "centralized", T), 403).detail["owner"] == "ml"


def test_byok_is_not_counted_for_spend_but_is_for_the_rate() -> None:
    gov = governor([user("alice", limits={"spend_usd": {"day": 1}, "requests_per_minute": 2})])
    feed(gov, "alice", 1.0)
    refused(gov.admit("alice", "centralized", T), 403)
    # The person's own key or sign-in is not the organisation's money.
    for kind in ("byok", "subscription"):
        assert admitted(gov.admit("alice", kind, T + (kind == "byok"))).warnings == []
    refusal = refused(gov.admit("alice", "byok", T + 2), 429)
    assert refusal.detail["limit"] == "requests_per_minute"
    # A spent budget answers first, and is final.
    assert refused(gov.admit("alice", "centralized", T + 3), 403)


def test_a_refusal_by_a_budget_does_not_count_for_rate_or_concurrency() -> None:
    gov = governor(
        [
            user(
                "alice",
                limits={
                    "spend_usd": {"day": 1},
                    "requests_per_minute": 1,
                    "concurrent_requests": 1,
                },
            )
        ]
    )
    feed(gov, "alice", 1.0)
    for second in range(5):
        refused(gov.admit("alice", "centralized", T + second), 403)
    admission = admitted(gov.admit("alice", "byok", T + 5))
    assert admission.holds_slot


# ---- requests per minute: 429 ------------------------------------------------------------


def test_requests_per_minute_slide_over_sixty_seconds() -> None:
    gov = governor([user("alice", limits={"requests_per_minute": 3}), user("bob")])
    t = 1_000_000.0
    for offset in (0, 10, 20):
        admitted(gov.admit("alice", "centralized", t + offset))
    refusal = refused(gov.admit("alice", "centralized", t + 30), 429)
    assert refusal.headers == {"retry-after": "30", "x-aibridge-limit": "requests_per_minute"}
    assert refusal.message == (
        "AI Bridge: user alice may send 3 requests per minute and sent 3 in the last minute: "
        "retry in 30 s"
    )
    assert refusal.detail == {
        "limit": "requests_per_minute",
        "scope": "user",
        "owner": "alice",
        "limit_value": 3,
        "used": 3,
        "retry_after": 30,
    }
    # Retry-After: until the oldest request leaves the window, rounded up, at least 1.
    assert refused(gov.admit("alice", "centralized", t + 59.5), 429).headers["retry-after"] == "1"
    assert refused(gov.admit("alice", "centralized", t + 59.999), 429).headers["retry-after"] == "1"
    admitted(gov.admit("alice", "centralized", t + 60))  # the first one has left
    assert refused(gov.admit("alice", "centralized", t + 61), 429).headers["retry-after"] == "9"
    # Refused requests are not counted: the window frees on the admitted ones' schedule.
    for offset in range(62, 70):
        refused(gov.admit("alice", "centralized", t + offset), 429)
    admitted(gov.admit("alice", "centralized", t + 70))
    # Bob has no limit; nobody else's requests count for alice.
    for offset in range(10):
        assert gov.admit("bob", "centralized", t + offset) is FREE_ADMISSION


def test_retry_after_rounds_up() -> None:
    gov = governor([user("alice", limits={"requests_per_minute": 1})])
    t = 2_000_000.25
    admitted(gov.admit("alice", "centralized", t))
    for now, wait in ((t + 0.1, 60), (t + 29.75, 31), (t + 30, 30), (t + 59.01, 1)):
        refusal = refused(gov.admit("alice", "centralized", now), 429)
        assert refusal.headers["retry-after"] == str(wait), now - t
        assert refusal.detail["retry_after"] == wait
        assert f"retry in {wait} s" in refusal.message


# ---- concurrency: 429, and release --------------------------------------------------------


def test_concurrency_with_release() -> None:
    gov = governor([user("alice", limits={"concurrent_requests": 2}), user("bob")])
    first = admitted(gov.admit("alice", "centralized", T))
    second = admitted(gov.admit("alice", "byok", T))
    assert first.holds_slot and second.holds_slot
    refusal = refused(gov.admit("alice", "centralized", T), 429)
    assert refusal.headers == {
        "retry-after": str(CONCURRENCY_RETRY_SECONDS),
        "x-aibridge-limit": "concurrent_requests",
    }
    assert refusal.message == (
        "AI Bridge: user alice may have 2 requests in flight at once and has 2: retry when one "
        "of them has finished"
    )
    assert refusal.detail["used"] == 2 and refusal.detail["retry_after"] == 1
    gov.release(first)
    third = admitted(gov.admit("alice", "centralized", T))
    # Releasing one admission twice frees one slot, not two.
    gov.release(first)
    gov.release(first)
    refused(gov.admit("alice", "centralized", T), 429)
    # Nothing to release: no effect, no error.
    gov.release(None)
    gov.release(FREE_ADMISSION)
    gov.release(Admission("alice"))  # an admission that holds no slot
    refused(gov.admit("alice", "centralized", T), 429)
    gov.release(second)
    gov.release(third)
    fourth, fifth = gov.admit("alice", "centralized", T), gov.admit("alice", "centralized", T)
    admitted(fourth), admitted(fifth)
    refused(gov.admit("alice", "centralized", T), 429)
    assert gov.admit("bob", "centralized", T) is FREE_ADMISSION


def test_a_request_refused_for_concurrency_is_not_counted_for_the_rate() -> None:
    gov = governor([user("alice", limits={"requests_per_minute": 2, "concurrent_requests": 1})])
    t = 3_000_000.0
    first = admitted(gov.admit("alice", "centralized", t))
    refused(gov.admit("alice", "centralized", t + 1), 429)  # the slot is taken
    gov.release(first)
    second = admitted(gov.admit("alice", "centralized", t + 2))
    gov.release(second)
    refusal = refused(gov.admit("alice", "centralized", t + 3), 429)
    assert refusal.detail["limit"] == "requests_per_minute"  # two admitted, one refused
    # A request refused by the rate takes no slot.
    admitted(gov.admit("alice", "centralized", t + 60))


# ---- warnings ----------------------------------------------------------------------------


def test_warnings_from_warn_at(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aibridge.governance.governor")
    gov = governor(
        [user("alice", limits={"spend_usd": {"day": 10}, "tokens": {"week": 1000}})], warn_at=0.8
    )
    feed(gov, "alice", 7.99, 500)
    assert admitted(gov.admit("alice", "centralized", T)).warnings == []
    feed(gov, "alice", 0.01, 400)
    warnings = admitted(gov.admit("alice", "centralized", T)).warnings
    assert warnings == [
        "80% of the daily spend budget of user alice is used ($8.00 of $10.00), resets at "
        "2026-05-14 00:00 UTC",
        "90% of the weekly token budget of user alice is used (900 tokens of 1,000 tokens), "
        "resets at 2026-05-18 00:00 UTC",
    ]
    assert warning_header(warnings) == "; ".join(warnings)
    # Logged once per budget and period, however many responses carry it.
    for _ in range(5):
        admitted(gov.admit("alice", "centralized", T + 60))
    logged = [r.getMessage() for r in caplog.records if "budget warning" in r.getMessage()]
    assert logged == [f"AI Bridge: budget warning: {w}" for w in warnings]
    # BYOK requests carry no budget warning.
    assert admitted(gov.admit("alice", "byok", T)).warnings == []
    # A new day: the daily budget warns (and is logged) again, the week's is not logged again.
    feed(gov, "alice", 9.0, 0, when=NEXT_DAY + 60)
    again = admitted(gov.admit("alice", "centralized", NEXT_DAY + 120)).warnings
    assert [w.split(" is used")[0] for w in again] == [
        "90% of the daily spend budget of user alice",
        "90% of the weekly token budget of user alice",
    ]
    logged = [r.getMessage() for r in caplog.records if "budget warning" in r.getMessage()]
    assert len(logged) == 3 and "daily spend" in logged[-1] and "2026-05-15 00:00" in logged[-1]


def test_a_spent_budget_is_logged_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aibridge.governance.governor")
    gov = governor([user("alice", limits={"spend_usd": {"day": 1}}), user("bob")], warn_at=None)
    feed(gov, "alice", 1.5)
    messages = [refused(gov.admit("alice", "centralized", T + i), 403).message for i in range(4)]
    spent = [r.getMessage() for r in caplog.records if "budget spent" in r.getMessage()]
    assert spent == [f"AI Bridge: budget spent: {messages[0]}"]
    feed(gov, "alice", 2.0, when=NEXT_DAY + 60)  # the next day, spent again: logged again
    refused(gov.admit("alice", "centralized", NEXT_DAY + 120), 403)
    spent = [r.getMessage() for r in caplog.records if "budget spent" in r.getMessage()]
    assert len(spent) == 2 and "2026-05-15 00:00" in spent[1]


def test_no_warnings_when_warn_at_is_off() -> None:
    gov = governor([user("alice", limits={"spend_usd": {"day": 10}})], warn_at=None)
    feed(gov, "alice", 9.99)
    assert admitted(gov.admit("alice", "centralized", T)).warnings == []
    everything = governor([user("alice", limits={"spend_usd": {"day": 10}})], warn_at=1)
    feed(everything, "alice", 9.99)
    assert admitted(everything.admit("alice", "centralized", T)).warnings == []


@pytest.mark.parametrize(
    ("user_id", "escaped"),
    [
        ("jösé", "j\\xf6s\\xe9"),
        ("Zoë", "Zo\\xeb"),
        ("東京", "\\u6771\\u4eac"),
        ("emoji-😀", "emoji-\\U0001f600"),
        ("plain-ascii", "plain-ascii"),
        # A proxyauth name may hold anything: CR/LF must not end the header.
        ("a\r\nSet-Cookie: x", "a\\x0d\\x0aSet-Cookie: x"),
        ("tab\there", "tab\\x09here"),
        ("nul\x00del\x7f", "nul\\x00del\\x7f"),
        ("lf\nö", "lf\\x0a\\xf6"),
    ],
)
def test_the_warning_header_is_ascii(user_id: str, escaped: str) -> None:
    gov = governor([user(user_id, limits={"spend_usd": {"day": 1}})])
    feed(gov, user_id, 0.9)
    warnings = admitted(gov.admit(user_id, "centralized", T)).warnings
    header = warning_header(warnings)
    assert header.isascii() and header.isprintable()
    assert f"budget of user {escaped} is used" in header
    assert warning_header([]) == ""


# ---- limit 0, and nothing configured ------------------------------------------------------


def test_limit_zero() -> None:
    for limits in ({"spend_usd": {"day": 0}}, {"tokens": {"month": 0}}):
        gov = governor([user("alice", limits=limits)])
        refusal = refused(gov.admit("alice", "centralized", T), 403)  # nothing used yet
        assert "is used up" in refusal.message
        assert refusal.detail["limit_value"] == 0 and refusal.detail["used"] == 0
        admitted(gov.admit("alice", "byok", T))
    # A rate or concurrency of 0 can never be waited out: final, like a spent budget.
    for name in ("requests_per_minute", "concurrent_requests"):
        gov = governor([user("alice", limits={name: 0})])
        for kind in ("centralized", "byok"):
            refusal = refused(gov.admit("alice", kind, T), 403)
            assert "retry-after" not in refusal.headers
            assert refusal.message == (
                f"AI Bridge: user alice may send no requests ({name} is 0); "
                "to change that, ask the bridge's operator"
            )
            assert refusal.detail["limit"] == name


def test_nothing_to_enforce() -> None:
    gov = governor([user("alice"), user("bob", limits={"spend_usd": {"day": "unlimited"}})])
    assert not Governor(Governance(), None).enabled
    for someone in ("alice", "bob", "stranger"):
        assert gov.admit(someone, "centralized", T) is FREE_ADMISSION
    gov.release(FREE_ADMISSION)
    assert FREE_ADMISSION.released


# ---- the audit log: SpendLog on a file written by the Recorder ----------------------------


class AuditLog:
    """The audit log as the bridge writes it: rows through the real Recorder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recorder = Recorder(path)
        self.recorder.start()

    def exchange(
        self,
        user_id: str | None,
        started: datetime,
        usd: float | None,
        tokens: int | None,
        *,
        kind: str = "centralized",
        rows: int = 1,
    ) -> str:
        iid = uuid.uuid4().hex
        self.recorder.upsert(
            "interceptions",
            {
                "id": iid,
                "started_at": spelled(started),
                "initiator_id": user_id,
                "provider": "openai",
                "api": "responses",
                "credential_kind": kind,
                "status": "completed",
            },
        )
        for _ in range(rows):
            self.usage(iid, usd, tokens)
        return iid

    def usage(self, iid: str, usd: float | None, tokens: int | None) -> None:
        self.recorder.insert(
            "token_usages",
            {
                "interception_id": iid,
                "input_tokens": tokens,
                "output_tokens": 0,
                "total_tokens": tokens,
                "estimated_cost_usd": usd,
            },
        )

    def flush(self) -> None:
        assert self.recorder.flush(timeout=30)

    def close(self) -> None:
        self.recorder.close()

    def sql(self, statement: str, *params: Any) -> None:
        self.flush()
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute(statement, params)

    def newest_id(self) -> int:
        self.flush()
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return conn.execute("select coalesce(max(id), 0) from token_usages").fetchone()[0]


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "aibridge.db")
    yield log
    log.close()


def windows_at(now: float, time_zone: str = "UTC") -> dict[str, tuple[str, str]]:
    return {p: (w.start, w.end) for p, w in Ledger(Governance(time_zone)).windows(now).items()}


def test_seed_totals_of_the_current_periods(audit: AuditLog) -> None:
    windows = windows_at(T)
    audit.exchange("alice", NOON - timedelta(hours=1), 1.0, 10, rows=2)  # today, two rows
    audit.exchange("alice", NOON - timedelta(days=1), 4.0, 40)  # Tuesday
    audit.exchange("alice", NOON - timedelta(days=3), 8.0, 80)  # Sunday: last week
    audit.exchange("alice", NOON - timedelta(days=13), 16.0, 160)  # 30 April
    audit.exchange("alice", NOON + timedelta(days=1), 32.0, 320)  # tomorrow, this week
    audit.exchange("alice", NOON, 64.0, 640, kind="byok")
    audit.exchange("alice", NOON, 64.0, 640, kind="subscription")
    audit.exchange("bob", NOON, None, 5)  # unpriced: its tokens count
    audit.exchange("carol", NOON, 0.0, 0)  # nothing used: no entry
    audit.exchange(None, NOON, 128.0, 1280)  # nobody identified
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    calls: list[int] = []

    def pending() -> list[str]:
        calls.append(1)
        return []

    seed = spend_log.seed(windows, pending)
    day, week, month = (windows[p][0] for p in ("day", "week", "month"))
    assert seed.per_user == {
        ("alice", "day", day): (2.0, 20.0),
        ("alice", "week", week): (38.0, 380.0),
        ("alice", "month", month): (46.0, 460.0),
        ("bob", "day", day): (0.0, 5.0),
        ("bob", "week", week): (0.0, 5.0),
        ("bob", "month", month): (0.0, 5.0),
    }
    assert seed.confirmed == [] and calls == [1]
    assert seed.watermark == spend_log.watermark == audit.newest_id() == 11
    spend_log.close()


def test_seed_confirms_the_pending_ids_the_log_holds(audit: AuditLog) -> None:
    logged = audit.exchange("alice", NOON, 1.0, 10)
    audit.exchange("bob", NOON, 1.0, 10, kind="byok")
    audit.flush()
    seed = SpendLog(str(audit.path)).seed(windows_at(T), lambda: [logged, "not-yet", "x'); --"])
    assert seed.confirmed == [logged]


def test_new_uses_after_more_rows(audit: AuditLog) -> None:
    audit.exchange("alice", NOON, 1.0, 10)
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    spend_log.seed(windows_at(T), list)
    assert spend_log.new_uses() == []
    x = audit.exchange("alice", NOON + timedelta(seconds=1), 0.5, 50)
    audit.exchange("bob", NOON, 9.0, 90, kind="byok")
    z = audit.exchange("carol", NOON + timedelta(seconds=2), None, 7, rows=2)
    audit.flush()
    assert spend_log.new_uses() == [
        Use(x, "alice", spelled(NOON + timedelta(seconds=1)), 0.5, 50),
        Use(z, "carol", spelled(NOON + timedelta(seconds=2)), 0.0, 7),
        Use(z, "carol", spelled(NOON + timedelta(seconds=2)), 0.0, 7),
    ]
    assert spend_log.watermark == audit.newest_id() == 5
    assert spend_log.new_uses() == []
    spend_log.close()


def test_the_watermark_moves_past_rows_that_are_not_the_bridges_spend(audit: AuditLog) -> None:
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    assert spend_log.seed(windows_at(T), list).watermark == 0
    audit.exchange("alice", NOON, 1.0, 10, kind="byok")
    audit.exchange("alice", NOON, 1.0, 10, kind="subscription")
    audit.exchange("alice", NOON, 1.0, 10, kind="client")
    audit.exchange(None, NOON, 1.0, 10)
    audit.flush()
    assert spend_log.new_uses() == []
    assert spend_log.watermark == 4
    paid = audit.exchange("alice", NOON, 2.0, 20)
    audit.flush()
    assert [u.interception_id for u in spend_log.new_uses()] == [paid]
    assert spend_log.new_uses() == []
    assert spend_log.watermark == 5


def test_new_uses_in_pages(audit: AuditLog) -> None:
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    spend_log.seed(windows_at(T), list)
    ids = []
    for n in range(5):
        ids.append(audit.exchange("alice", NOON, float(n), n))
        audit.exchange("bob", NOON, 1.0, 1, kind="byok")
    audit.flush()
    pages = [spend_log.new_uses(limit=2) for _ in range(4)]
    assert [[u.interception_id for u in page or []] for page in pages] == [
        ids[:2],
        ids[2:4],
        ids[4:],
        [],
    ]
    assert spend_log.watermark == 10


def test_rows_without_a_readable_start_are_skipped(audit: AuditLog, noon_zone: str) -> None:
    """An interception row whose started_at is not text (missing: a start row that never
    came, or a blob from another tool): its usage cannot be placed in a period, and it must
    not stop the rows after it from being read. (Numbers become text in the column; they
    compare outside every period.)"""
    audit.flush()
    gov = Governor(
        governance([user("alice", limits={"spend_usd": {"day": 100}})], time_zone=noon_zone),
        None,
    )
    spend_log = SpendLog(str(audit.path))
    gov.refresh(spend_log, whole=True)
    unplaced = []
    for value in (None, b"2026-05-13T12:00:00", 1778673600, 17786736.5):
        iid = uuid.uuid4().hex
        audit.sql(
            "insert into interceptions (id, started_at, initiator_id, credential_kind) "
            "values (?, ?, 'alice', 'centralized')",
            iid,
            value,
        )
        audit.usage(iid, 50.0, 500)
        unplaced.append(iid)
    good = audit.exchange("alice", just_now(), 1.0, 10)
    audit.flush()
    uses = spend_log.new_uses()
    assert uses is not None
    assert [u.interception_id for u in uses] == [*unplaced[2:], good]
    assert all(isinstance(u.started_at, str) for u in uses)
    spend_log.watermark = 0  # read them all again, through the governor this time
    gov.refresh(spend_log)
    assert gov.ledger.used("user", "alice", "day", datetime.now(UTC).timestamp()) == (1.0, 10)
    spend_log.close()


def test_an_emptied_log_is_read_whole_again(audit: AuditLog) -> None:
    for _ in range(3):
        audit.exchange("alice", NOON, 1.0, 10)
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    assert spend_log.seed(windows_at(T), list).watermark == 3
    audit.sql("delete from token_usages")
    assert spend_log.new_uses() is None
    seed = spend_log.seed(windows_at(T), list)
    assert (seed.per_user, seed.watermark) == ({}, 0)
    fresh = audit.exchange("alice", NOON, 2.0, 20)
    audit.flush()
    assert [u.interception_id for u in spend_log.new_uses() or []] == [fresh]
    spend_log.close()


def replace_file(audit: AuditLog, rows: list[tuple[str, float]], when: datetime) -> None:
    """mv new.db aibridge.db, the new file written by a recorder of its own; the bridge's
    recorder stopped first (it follows a replaced file on its own, which is not tested
    here), its log checkpointed so the old -wal holds nothing."""
    audit.close()
    with contextlib.closing(sqlite3.connect(audit.path)) as conn:
        conn.execute("pragma wal_checkpoint(truncate)")
    other = AuditLog(audit.path.with_name("new.db"))
    for user_id, usd in rows:
        other.exchange(user_id, when, usd, 1)
    other.close()
    os.replace(other.path, audit.path)
    audit.recorder = Recorder(audit.path)
    audit.recorder.start()


@pytest.mark.parametrize("rows_in_new_file", [1, 3, 8])
def test_a_replaced_log_is_read_whole_again(audit: AuditLog, rows_in_new_file: int) -> None:
    """Fewer, as many or more rows than were read: the ids of the new file say nothing about
    what was read from the old one."""
    for _ in range(3):
        audit.exchange("alice", NOON, 1.0, 10)
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    spend_log.seed(windows_at(T), list)
    assert spend_log.new_uses() == []
    replace_file(audit, [("bob", 2.0)] * rows_in_new_file, NOON)
    assert spend_log.new_uses() is None
    seed = spend_log.seed(windows_at(T), list)
    assert seed.per_user[("bob", "day", windows_at(T)["day"][0])] == (
        2.0 * rows_in_new_file,
        rows_in_new_file,
    )
    assert not any(key[0] == "alice" for key in seed.per_user)
    assert spend_log.new_uses() == []
    spend_log.close()


def test_a_deleted_and_recreated_log_is_read_whole_again(audit: AuditLog) -> None:
    for _ in range(3):
        audit.exchange("alice", NOON, 1.0, 10)
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    spend_log.seed(windows_at(T), list)
    audit.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{audit.path}{suffix}").unlink(missing_ok=True)
    # Gone: read whole again (which fails until the file is back: the governor retries).
    assert spend_log.new_uses() is None
    with pytest.raises(sqlite3.OperationalError):
        spend_log.seed(windows_at(T), list)
    audit.recorder = Recorder(audit.path)
    audit.recorder.start()
    audit.exchange("bob", NOON, 5.0, 50)
    audit.flush()
    assert spend_log.new_uses() is None
    seed = spend_log.seed(windows_at(T), list)
    assert {key[0] for key in seed.per_user} == {"bob"}
    spend_log.close()


# ---- the governor on the log, on its own clock --------------------------------------------


@pytest.fixture
def noon_zone() -> str:
    """An Etc/GMT zone in which the local hour is 12 now: no period ends within the test."""
    offset = 12 - datetime.now(UTC).hour  # local = UTC + offset, -11 ... +12
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"  # Etc/GMT-5 is UTC+5


def just_now(minutes: float = 1) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


def test_the_governor_reads_the_log(audit: AuditLog, noon_zone: str) -> None:
    gov = Governor(
        governance(
            [
                user("alice", limits={"spend_usd": {"day": 10}}),
                user("bob", groups=["eng"]),
            ],
            [{"name": "eng", "limits": {"spend_usd": {"day": 10}}}],
            time_zone=noon_zone,
            refresh_seconds=3600,
        ),
        str(audit.path),
    )
    audit.exchange("alice", just_now(), 6.0, 60)
    audit.exchange("alice", just_now(), 50.0, 500, kind="byok")
    audit.exchange("bob", just_now(), 9.0, 90)
    audit.exchange("alice", just_now(24 * 60), 100.0, 1)  # yesterday
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    gov.refresh(spend_log, whole=True)
    assert admitted(gov.admit("alice", "centralized")).warnings == []
    bob = admitted(gov.admit("bob", "centralized")).warnings
    assert bob and bob[0].startswith("90% of the daily spend budget of user bob is used")
    assert f"{noon_zone}" in bob[0]
    audit.exchange("alice", just_now(), 4.0, 40)  # another bridge's exchange
    audit.flush()
    gov.refresh(spend_log)
    refusal = refused(gov.admit("alice", "centralized"), 403)
    assert "($10.00 of $10.00 since" in refusal.message and noon_zone in refusal.message
    admitted(gov.admit("alice", "byok"))
    assert gov.reads == 2
    spend_log.close()


def alice_at_ten_a_day(audit: AuditLog, noon_zone: str) -> Governor:
    """A governor on the audit log that reads it only when told (refresh_seconds 3600)."""
    return Governor(
        governance(
            [user("alice", limits={"spend_usd": {"day": 10}})],
            time_zone=noon_zone,
            refresh_seconds=3600,
        ),
        str(audit.path),
    )


def test_a_use_of_this_bridge_counts_at_once_and_once(audit: AuditLog, noon_zone: str) -> None:
    gov = alice_at_ten_a_day(audit, noon_zone)
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    gov.refresh(spend_log, whole=True)
    started = just_now()
    iid = uuid.uuid4().hex
    gov.record_use("alice", "centralized", iid, spelled(started), 6.0, 60)
    admitted(gov.admit("alice", "centralized"))
    gov.record_use("alice", "centralized", iid, spelled(started), 4.0, 40)  # a second row
    refused(gov.admit("alice", "centralized"), 403)  # before the log has either
    # Not counted: other people's money, or nothing used.
    gov.record_use("alice", "byok", "b", spelled(started), 99.0, 990)
    gov.record_use("alice", "subscription", "s", spelled(started), 99.0, 990)
    gov.record_use("alice", "centralized", "z", spelled(started), 0.0, 0)
    assert gov.ledger.pending_ids() == [iid]
    # The recorder writes both rows; read, they replace the pending use.
    audit.recorder.upsert(
        "interceptions",
        {
            "id": iid,
            "started_at": spelled(started),
            "initiator_id": "alice",
            "credential_kind": "centralized",
        },
    )
    audit.usage(iid, 6.0, 60)
    audit.usage(iid, 4.0, 40)
    audit.flush()
    gov.refresh(spend_log)
    assert gov.ledger.pending == 0
    used = gov.ledger.used("user", "alice", "day", datetime.now(UTC).timestamp())
    assert used == (10.0, 100)
    # And read whole: the same.
    gov.refresh(spend_log, whole=True)
    assert gov.ledger.used("user", "alice", "day", datetime.now(UTC).timestamp()) == (10.0, 100)
    spend_log.close()


def test_an_emptied_or_replaced_log_is_read_whole_by_the_governor(
    audit: AuditLog, noon_zone: str
) -> None:
    gov = alice_at_ten_a_day(audit, noon_zone)
    audit.exchange("alice", just_now(), 10.0, 1)
    audit.flush()
    spend_log = SpendLog(str(audit.path))
    gov.refresh(spend_log, whole=True)
    refused(gov.admit("alice", "centralized"), 403)
    audit.sql("delete from token_usages")
    gov.refresh(spend_log)
    admitted(gov.admit("alice", "centralized"))
    replace_file(audit, [("alice", 12.0)], just_now())
    gov.refresh(spend_log)
    assert "($12.00 of $10.00" in refused(gov.admit("alice", "centralized"), 403).message
    spend_log.close()


def test_start_seeds_before_the_first_request_and_stop_ends_the_reader(
    audit: AuditLog, noon_zone: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aibridge.governance.governor")
    audit.exchange("alice", just_now(), 10.0, 1)
    audit.flush()
    gov = alice_at_ten_a_day(audit, noon_zone)
    gov.start()
    try:
        refused(gov.admit("alice", "centralized"), 403)
        assert gov.reads == 1
        assert any("budgets seeded from the log" in r.getMessage() for r in caplog.records)
    finally:
        gov.stop()
    assert gov._thread is None
    # Nothing configured: nothing read, no thread.
    idle = Governor(governance([user("alice")]), str(audit.path))
    idle.start()
    assert idle.reads == 0 and idle._thread is None
    idle.stop()


def test_a_slot_goes_back_to_the_governor_that_gave_it() -> None:
    # A new configuration replaces the governor while requests are in flight: their slots
    # must not free (or go negative in) the new governor's counts.
    old = governor([user("alice", limits={"concurrent_requests": 1})])
    held = admitted(old.admit("alice", "centralized", T))
    new = governor([user("alice", limits={"concurrent_requests": 1})])
    taken = admitted(new.admit("alice", "centralized", T))
    new.release(held)  # the bridge releases through whichever governor it has now
    refused(new.admit("alice", "centralized", T), 429)  # still one in flight on the new one
    assert old._in_flight == {}
    new.release(taken)
    admitted(new.admit("alice", "centralized", T))
