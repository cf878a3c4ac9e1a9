"""Estimated costs (aibridge.cost): genai-prices' own arithmetic, config overrides, the row wiring,
the migration that adds the columns, the backfill command and the config keys."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import urllib.parse
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import orjson
import psycopg
import pytest
import sqlite_utils
from genai_prices import data_snapshot

from aibridge import cost
from aibridge.apis import anthropic_messages
from aibridge.apis.openai_responses import RequestInfo, ResponseAccumulator
from aibridge.config import (
    ConfigError,
    PriceOverride,
    Pricing,
    Privacy,
    load_config,
)
from aibridge.cost import COST_COLUMNS, BackfillError, BackfillReport, PriceBook
from aibridge.record import address as addresses
from aibridge.record import postgres, schema
from aibridge.record.outcome import Outcome
from aibridge.record.recorder import Recorder
from aibridge.record.rows import end_rows
from devtools.mitmdump_process import REPO
from tests.log_engines import engine, pg_rows, read, with_password
from tests.postgres_server import PostgresServer, free_port

__all__ = ["engine"]  # a fixture, imported for this module's tests

FIXTURES = Path(__file__).parent / "fixtures"
AT = datetime(2025, 9, 1, 12, 0, tzinfo=UTC)
NOW = "2025-09-01T12:00:00.000000+00:00"


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook()


def usage(
    inp: int | None,
    out: int | None,
    *,
    cached: int = 0,
    written: int = 0,
    reasoning: int = 0,
) -> dict[str, Any]:
    return {
        "input_tokens": inp,
        "cache_read_input_tokens": cached,
        "cache_write_input_tokens": written,
        "output_tokens": out,
        "reasoning_tokens": reasoning,
    }


def override(model: str, inp: str, out: str, **rest: str) -> PriceOverride:
    return PriceOverride(
        model, Decimal(inp), Decimal(out), **{k: Decimal(v) for k, v in rest.items()}
    )


# --------------------------------------------------------------- the genai-prices table


def token_priced_openai_models() -> list[Any]:
    provider = next(p for p in data_snapshot.get_snapshot().providers if p.id == "openai")
    models = []
    for model in provider.models:
        prices = model.get_prices(AT)
        if prices.input_mtok is not None and prices.output_mtok is not None:
            models.append(model)
    return models


def test_same_price_as_genai_prices_for_every_openai_model(book: PriceBook) -> None:
    """Our fast path (rates looked up once, Decimal arithmetic per row) is genai-prices' sum.

    Over every OpenAI model billed by the token, with cached input, cache writes, reasoning
    and inputs past the long-context tiers (272k), and with the service tiers' variants.
    """
    rnd = random.Random(20250901)
    checked = 0
    for model in token_priced_openai_models():
        if not model.match.is_match(model.id):
            continue  # a family entry (e.g. "ft:gpt-4o") that only prefixes real names
        for _ in range(6):
            inp = rnd.choice([0, 1, 1000, 271_999, 272_001, 400_000, rnd.randint(0, 500_000)])
            cached = rnd.randint(0, inp)
            written = rnd.randint(0, inp - cached) if rnd.random() < 0.5 else 0
            out = rnd.randint(0, 30_000)
            reasoning = rnd.randint(0, out)
            tier = rnd.choice([None, "flex", "priority"])
            got = book.estimate(
                usage(inp, out, cached=cached, written=written, reasoning=reasoning),
                (model.id,),
                AT,
                service_tier=tier,
            )
            want = genai_prices.calc_price(
                genai_prices.Usage(
                    input_tokens=inp,
                    cache_read_tokens=cached,
                    cache_write_tokens=written,
                    output_tokens=out,
                ),
                model.id,
                provider_id="openai",
                genai_request_timestamp=AT,
                price_context={"service_tier": tier} if tier else None,
            )
            assert got is not None, model.id
            assert got.cost_usd == want.total_price, (model.id, inp, cached, written, out, tier)
            assert (got.source, got.version, got.priced_model) == (
                "genai-prices",
                genai_prices.__version__,
                want.model.id,
            )
            checked += 1
    assert checked > 300


def test_dated_snapshot_is_priced_as_its_model(book: PriceBook) -> None:
    columns = book.cost_columns(
        usage(1_000_000, 1_000_000, cached=400_000, reasoning=600_000),
        model="gpt-5",
        response_model="gpt-5-2025-08-07",
        at=NOW,
    )
    want = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=1_000_000, cache_read_tokens=400_000, output_tokens=1_000_000
        ),
        "gpt-5",
        provider_id="openai",
        genai_request_timestamp=AT,
    )
    assert columns == {
        "estimated_cost_usd": float(want.total_price),
        "price_source": "genai-prices",
        "price_version": genai_prices.__version__,
        "priced_model": "gpt-5",
    }
    # Cached input costs less than fresh input: the cache is not billed at the input rate.
    fresh = book.cost_columns(usage(1_000_000, 1_000_000), model="gpt-5", response_model=None)
    assert columns["estimated_cost_usd"] < fresh["estimated_cost_usd"]


@pytest.mark.parametrize(
    ("row", "model", "response_model"),
    [
        (usage(10, 10), "fake-text", "fake-text"),  # no price anywhere
        (usage(10, 10), None, None),  # no model known (refused request)
        (usage(None, None), "gpt-5", "gpt-5"),  # no counts reported
        ({"input_tokens": "many", "output_tokens": [1]}, "gpt-5", None),  # garbage counts
        (usage(10, 10), "whisper-1", None),  # billed per minute of audio, not per token
    ],
)
def test_no_price_means_null_never_an_error(
    book: PriceBook, row: dict[str, Any], model: str | None, response_model: str | None
) -> None:
    assert book.cost_columns(row, model=model, response_model=response_model, at=NOW) == (
        dict.fromkeys(COST_COLUMNS)
    )


def test_invented_model_names_do_not_grow_the_cache(book: PriceBook) -> None:
    for i in range(5000):
        book.cost_columns(usage(1, 1), model=f"made-up-{i}", response_model=None)
    assert book._catalog is not None
    assert len(book._catalog._models) <= 4096


# ------------------------------------------------------------------------- overrides


def test_override_rates_with_fallbacks() -> None:
    plain = PriceBook(Pricing((override("m", "2", "8"),)), catalog=False)
    row = usage(1000, 500, cached=600, written=100, reasoning=200)
    # Without their own rates cached input, cache writes and reasoning cost input/output.
    assert plain.estimate(row, ("m",)).cost_usd == Decimal(1000 * 2 + 500 * 8) / 1_000_000

    full = PriceBook(
        Pricing(
            (
                override(
                    "m",
                    "2",
                    "8",
                    cached_input_per_mtok="0.5",
                    cache_write_per_mtok="2.5",
                    reasoning_per_mtok="4",
                ),
            )
        ),
        catalog=False,
    )
    estimate = full.estimate(row, ("m",))
    assert estimate is not None
    assert estimate.cost_usd == Decimal("0.00435")  # 300x2 + 600x0.5 + 100x2.5 + 300x8 + 200x4
    assert (estimate.source, estimate.priced_model) == ("config", "m")
    assert estimate.version == cost.override_fingerprint(full._exact["m"])
    assert (
        estimate.version.startswith("sha256:")
        and estimate.version != plain.estimate(row, ("m",)).version
    )  # new rates, new fingerprint


def test_override_matching_order() -> None:
    book = PriceBook(
        Pricing(
            (
                override("gpt-5*", "1", "1"),
                override("GPT-5-codex", "2", "2"),
                override("gpt-5-2025-08-07", "3", "3"),
            )
        )
    )
    one_mtok = usage(1_000_000, 0)

    def priced(model: str | None, response_model: str | None) -> tuple[Any, ...]:
        c = book.cost_columns(one_mtok, model=model, response_model=response_model)
        return c["estimated_cost_usd"], c["price_source"], c["priced_model"]

    # The model upstream reported is tried first, exact names before globs, case ignored.
    assert priced("gpt-5", "gpt-5-2025-08-07") == (3.0, "config", "gpt-5-2025-08-07")
    assert priced("gpt-5-codex", "gpt-5-codex") == (2.0, "config", "GPT-5-codex")
    assert priced("gpt-5-mini", None) == (1.0, "config", "gpt-5*")
    # An override wins over the list price, whichever of the two names it matches.
    assert priced("gpt-5-codex", "gpt-4.1-2025-04-14") == (2.0, "config", "GPT-5-codex")
    # No override: list prices.
    assert priced("gpt-4.1", None)[1:] == ("genai-prices", "gpt-4.1")


def test_without_genai_prices_only_overrides_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "genai_prices", None)  # as if not installed
    book = PriceBook(Pricing((override("mine", "1", "1"),)))
    assert book.catalog_version is None
    assert book.cost_columns(usage(10, 10), model="gpt-5", response_model=None) == dict.fromkeys(
        COST_COLUMNS
    )
    assert book.cost_columns(usage(10, 10), model="mine", response_model=None)["price_source"] == (
        "config"
    )


# ----------------------------------------------------------------------------- rows


def cached_tokens_outcome() -> tuple[RequestInfo, Outcome]:
    request = orjson.loads((FIXTURES / "cached_tokens_buffered.request.json").read_bytes())
    accumulator = ResponseAccumulator()
    accumulator.feed_response_object(
        orjson.loads((FIXTURES / "cached_tokens_buffered.response.json").read_bytes())
    )
    result = accumulator.result()
    info = RequestInfo(request["model"], False, False, "prompt", None, None, None)
    return info, Outcome("completed", None, result)


def cached_tokens_list_price(at: datetime, service_tier: str) -> float:
    """What genai-prices says the cached-tokens fixture costs."""
    price = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=2006, cache_read_tokens=1536, cache_write_tokens=384, output_tokens=300
        ),
        "gpt-5-2025-08-07",
        provider_id="openai",
        genai_request_timestamp=at,
        price_context={"service_tier": service_tier},
    )
    return float(price.total_price)


def usage_row_of(rows: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    (row,) = [row for table, row in rows if table == "token_usages"]
    return row


def test_end_rows_carry_the_cost(book: PriceBook) -> None:
    info, outcome = cached_tokens_outcome()
    usage_row = usage_row_of(end_rows("iid", info, outcome, 200, Privacy(), NOW, prices=book))
    # The fixture's response reports the flex tier.
    assert usage_row["estimated_cost_usd"] == cached_tokens_list_price(AT, "flex")
    assert (usage_row["price_source"], usage_row["priced_model"]) == ("genai-prices", "gpt-5")
    assert usage_row["input_tokens"] == 2006 and usage_row["created_at"] == NOW
    assert usage_row["service_tier"] == "flex"


def test_end_rows_price_the_tier_that_served_the_response(book: PriceBook) -> None:
    info, outcome = cached_tokens_outcome()
    assert outcome.result.token_usage is not None
    when = "2026-11-30T12:00:00.000000+00:00"  # flex and priority have their own rates
    prices: dict[str, float] = {}
    for tier in ("default", "flex", "priority"):
        outcome.result.token_usage["service_tier"] = tier
        rows = end_rows("iid", info, outcome, 200, Privacy(), when, prices=book)
        prices[tier] = usage_row_of(rows)["estimated_cost_usd"]
        assert prices[tier] == cached_tokens_list_price(
            datetime(2026, 11, 30, 12, tzinfo=UTC), tier
        )
    assert prices["flex"] < prices["default"] < prices["priority"]


def test_end_rows_without_prices_are_unchanged() -> None:
    info, outcome = cached_tokens_outcome()
    usage_row = usage_row_of(end_rows("iid", info, outcome, 200, Privacy(), NOW))
    assert not set(COST_COLUMNS) & set(usage_row)


# ------------------------------------------------------------------ schema, backfill


def old_log(path: Path) -> None:
    """A log written before costs existed: only the first migration applied."""
    db = sqlite_utils.Database(path)
    db["_migrations"].create({"name": str, "applied_at": str}, pk="name")
    schema.m001_initial(db)
    db["_migrations"].insert({"name": "m001_initial", "applied_at": "2025-01-01T00:00:00Z"})
    db.execute("PRAGMA user_version = 1")
    db["interceptions"].insert_all(
        [
            {"id": "a", "started_at": NOW, "model": "gpt-5", "response_model": "gpt-5-2025-08-07"},
            {"id": "b", "started_at": NOW, "model": "fake-text", "response_model": "fake-text"},
            {"id": "c", "started_at": NOW, "model": "gpt-4.1-mini", "response_model": None},
        ]
    )
    db["token_usages"].insert_all(
        [
            {"interception_id": iid, **usage(1000, 100, cached=200), "created_at": NOW}
            for iid in ("a", "b", "c")
        ]
    )
    db.conn.commit()
    db.close()


def costs(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "select interception_id, estimated_cost_usd, price_source, priced_model "
            "from token_usages order by id"
        ).fetchall()
    finally:
        conn.close()


def test_migration_adds_cost_columns_and_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "aibridge.db"
    old_log(path)
    db = sqlite_utils.Database(path)
    schema.migrate(db)
    columns = list(db["token_usages"].columns_dict)
    assert columns[-5:] == [*COST_COLUMNS, "service_tier"]
    assert db["token_usages"].columns_dict["estimated_cost_usd"] is float
    assert db["token_usages"].count == 3
    assert "m002_token_usage_cost" in schema.applied_migrations(db)
    # Nothing that slows inserts down: no trigger and no new index on token_usages.
    assert not db["token_usages"].triggers
    assert [i.columns for i in db["token_usages"].indexes] == [["interception_id"]]
    db.close()


def run_cost_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aibridge.cost", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )


def test_backfill_command(tmp_path: Path) -> None:
    path = tmp_path / "aibridge.db"
    old_log(path)
    config = tmp_path / "config.yaml"
    config.write_text(
        "database: aibridge.db\n"
        "providers: [{name: openai, base_url: 'https://api.openai.com/v1', api_key: k}]\n"
        "pricing:\n  overrides:\n    fake-text: {input_per_mtok: 1, output_per_mtok: 10}\n"
    )
    done = run_cost_cli("--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 token usage rows examined, 3 priced, 0 without a known price" in done.stdout
    rows = costs(path)
    list_price = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1000, cache_read_tokens=200, output_tokens=100),
        "gpt-5",
        provider_id="openai",
        genai_request_timestamp=AT,
    )
    assert rows[0] == ("a", float(list_price.total_price), "genai-prices", "gpt-5")
    assert rows[1] == ("b", 0.002, "config", "fake-text")  # 1000 x 1 + 100 x 10
    assert rows[2][2:] == ("genai-prices", "gpt-4.1-mini")

    # Rows already priced are left alone, unless asked: new rates then apply to all.
    config.write_text(config.read_text().replace("output_per_mtok: 10", "output_per_mtok: 20"))
    assert (
        "0 token usage rows examined" in run_cost_cli("--config", str(config), cwd=tmp_path).stdout
    )
    assert costs(path)[1][1] == 0.002
    assert run_cost_cli("--config", str(config), "--all", cwd=tmp_path).returncode == 0
    assert costs(path)[1][1] == 0.003

    # --db: list prices only, and a clear error for a missing file.
    missing = run_cost_cli("--db", str(tmp_path / "nope.db"), cwd=tmp_path)
    assert missing.returncode == 2 and "no such database" in missing.stderr


# -------------------------------------------------------------------------- config


GOOD = """
providers: [{name: openai, base_url: "https://api.openai.com/v1", api_key: k}]
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD + text)
    return load_config(path, env or {})


def test_pricing_config(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
pricing:
  overrides:
    gpt-5-codex: {input_per_mtok: 1.25, output_per_mtok: "10", cached_input_per_mtok: 0.125}
    "gpt-5*": {input_per_mtok: "${RATE}", output_per_mtok: 0, reasoning_per_mtok: 3}
""",
        {"RATE": "0.5"},
    )
    assert config.pricing == Pricing(
        (
            override("gpt-5-codex", "1.25", "10", cached_input_per_mtok="0.125"),
            override("gpt-5*", "0.5", "0", reasoning_per_mtok="3"),
        )
    )
    assert load(tmp_path, "").pricing == Pricing()


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("pricing: [1]", "pricing", "must be a mapping"),
        ("pricing: {discount: 5}", "pricing.discount", "unknown key"),
        ("pricing: {overrides: {m: 5}}", "pricing.overrides.m", "must be a mapping"),
        (
            "pricing: {overrides: {m: {input_per_mtok: 1}}}",
            "pricing.overrides.m.output_per_mtok",
            "is required",
        ),
        (
            "pricing: {overrides: {m: {input_per_mtok: -1, output_per_mtok: 1}}}",
            "pricing.overrides.m.input_per_mtok",
            "must be a number >= 0",
        ),
        (
            "pricing: {overrides: {m: {input_per_mtok: cheap, output_per_mtok: 1}}}",
            "pricing.overrides.m.input_per_mtok",
            "must be a number of US dollars",
        ),
        (
            "pricing: {overrides: {m: {input_per_mtok: .inf, output_per_mtok: 1}}}",
            "pricing.overrides.m.input_per_mtok",
            "must be a finite number",
        ),
        (
            "pricing: {overrides: {m: {input_per_mtok: 1, output_per_mtok: 1, cache_per_mtok: 1}}}",
            "pricing.overrides.m.cache_per_mtok",
            "unknown key",
        ),
    ],
)
def test_pricing_config_errors_name_the_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert err.value.key == key
    assert problem in err.value.problem
    assert str(err.value).startswith(f"{tmp_path / 'config.yaml'}: {key}: ")


def test_shipped_config_documents_pricing_and_retention() -> None:
    text = (REPO / "config.yaml").read_text()
    assert "# pricing:" in text and "#   overrides:" in text and "# retention:" in text


def test_backfill_prices_each_row_at_its_service_tier(tmp_path: Path, book: PriceBook) -> None:
    path = tmp_path / "aibridge.db"
    db = sqlite_utils.Database(path)
    schema.migrate(db)
    when = "2026-11-30T12:00:00.000000+00:00"
    db["interceptions"].insert({"id": "a", "started_at": when, "model": "gpt-5"})
    db["token_usages"].insert_all(
        {"interception_id": "a", **usage(1000, 100), "created_at": when, "service_tier": tier}
        for tier in ("flex", None, "priority")
    )
    db.conn.commit()
    db.close()
    assert cost.backfill(path, book).priced == 3
    flex, untold, priority = [row[1] for row in costs(path)]
    assert flex < untold < priority  # no tier reported: the default rates


# ------------------------------------------------------------------ Anthropic Messages

LATER = datetime(2026, 11, 30, 12, tzinfo=UTC)  # batch variants start 2026-10-14


def anthropic_usage(
    uncached: int,
    *,
    read: int = 0,
    write_5m: int = 0,
    write_1h: int = 0,
    out: int = 0,
    split: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """A usage object as Anthropic sends it: input_tokens leaves the cache out."""
    raw: dict[str, Any] = {
        "input_tokens": uncached,
        "cache_creation_input_tokens": write_5m + write_1h,
        "cache_read_input_tokens": read,
        "output_tokens": out,
        "service_tier": "standard",
        **extra,
    }
    if split:
        raw["cache_creation"] = {
            "ephemeral_5m_input_tokens": write_5m,
            "ephemeral_1h_input_tokens": write_1h,
        }
    return raw


# Uncached 1000, cache read 20,000, cache writes 3000 (5 minutes) + 2000 (1 hour), output 500.
TURN = anthropic_usage(1000, read=20_000, write_5m=3000, write_1h=2000, out=500)


def messages_row(raw: dict[str, Any]) -> dict[str, Any]:
    return anthropic_messages.token_usage_row(raw)


def anthropic_cost(
    book: PriceBook, row: dict[str, Any], model: str, at: datetime = AT, **kw: Any
) -> Decimal | None:
    kw.setdefault("provider", "anthropic")
    kw.setdefault("service_tier", row.get("service_tier"))
    estimate = book.estimate(row, (model,), at, **kw)
    return None if estimate is None else estimate.cost_usd


@pytest.mark.parametrize(
    ("model", "response_model", "priced_model", "dollars"),
    [
        # $/MTok input 3, cache read 0.3, 5m write 3.75, 1h write 6, output 15:
        # 1000x3 + 20,000x0.3 + 3000x3.75 + 2000x6 + 500x15 = 39,750
        ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5", "0.03975"),
        # 1, 0.1, 1.25, 2, 5: 1000 + 2000 + 3750 + 4000 + 2500 = 13,250
        ("claude-haiku-4-5", "claude-haiku-4-5-20251001", "claude-haiku-4-5", "0.01325"),
        # 15, 1.5, 18.75, 30, 75: 15,000 + 30,000 + 56,250 + 60,000 + 37,500 = 198,750
        ("claude-opus-4-1", "claude-opus-4-1-20250805", "claude-opus-4-1", "0.19875"),
        # Claude Code's default model. 4, 0.2, 5, 8, 20: 4000 + 4000 + 15,000 + 16,000 + 10,000
        ("claude-opus-5-5", "claude-opus-5-5", "claude-opus-5-5", "0.049"),
    ],
)
def test_claude_rows_priced_by_hand(
    book: PriceBook, model: str, response_model: str, priced_model: str, dollars: str
) -> None:
    row = messages_row(TURN)
    assert (row["input_tokens"], row["cache_write_input_tokens"]) == (26_000, 5000)
    estimate = book.estimate(
        row, (response_model, model), AT, row["service_tier"], provider="anthropic"
    )
    assert estimate is not None
    assert estimate.cost_usd == Decimal(dollars)
    assert (estimate.source, estimate.priced_model) == ("genai-prices", priced_model)
    columns = book.cost_columns(
        row,
        model=model,
        response_model=response_model,
        at=NOW,
        service_tier=row["service_tier"],
        provider="anthropic",
    )
    assert columns == {
        "estimated_cost_usd": float(dollars),
        "price_source": "genai-prices",
        "price_version": genai_prices.__version__,
        "priced_model": priced_model,
    }


def test_claude_long_context_tier_prices_the_whole_request(book: PriceBook) -> None:
    # 205,000 input tokens in all, past claude-sonnet-4-5's 200k tier: 6, 0.6, 7.5, 12, 22.5.
    # 150,000x6 + 40,000x0.6 + 10,000x7.5 + 5000x12 + 1000x22.5 = 1,081,500
    raw = anthropic_usage(150_000, read=40_000, write_5m=10_000, write_1h=5000, out=1000)
    assert anthropic_cost(book, messages_row(raw), "claude-sonnet-4-5") == Decimal("1.0815")


@pytest.mark.parametrize(
    "cache_creation",
    [
        None,
        "2000",
        [3000, 2000],
        2000,
        {},
        {"ephemeral_5m_input_tokens": 5000},
        {"ephemeral_1h_input_tokens": "2000"},
        {"ephemeral_1h_input_tokens": -2000},
        {"ephemeral_1h_input_tokens": True},
        {"ephemeral_1h_input_tokens": 2000.0},
        {"ephemeral_1h_input_tokens": None},
        {"ephemeral_1h_input_tokens": {"tokens": 2000}},
    ],
)
def test_without_a_usable_split_all_cache_writes_are_5_minute(
    book: PriceBook, cache_creation: Any
) -> None:
    raw = anthropic_usage(1000, read=20_000, write_5m=5000, out=500, split=False)
    if cache_creation is not None:
        raw["cache_creation"] = cache_creation
    # claude-sonnet-4-5: 1000x3 + 20,000x0.3 + 5000x3.75 + 500x15 = 35,250
    assert anthropic_cost(book, messages_row(raw), "claude-sonnet-4-5") == Decimal("0.03525")


@pytest.mark.parametrize(
    "raw_usage", [None, "", "not json", "[1, 2]", '"text"', "null", b"\xff", 42]
)
def test_an_unreadable_raw_usage_means_no_split(book: PriceBook, raw_usage: Any) -> None:
    row = messages_row(TURN)
    row["usage"] = raw_usage
    assert anthropic_cost(book, row, "claude-sonnet-4-5") == Decimal("0.03525")


@pytest.mark.parametrize(("write_1h", "dollars"), [(5000, "0.0465"), (10**9, "0.0465")])
def test_one_hour_writes_never_exceed_the_writes_billed(
    book: PriceBook, write_1h: int, dollars: str
) -> None:
    # The column's total (cache_creation_input_tokens) is what was billed; a split claiming
    # more is capped at it: 5000 writes at 6 = 1000x3 + 20,000x0.3 + 5000x6 + 500x15.
    raw = anthropic_usage(1000, read=20_000, write_5m=5000, out=500, split=False)
    raw["cache_creation"] = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": write_1h}
    assert anthropic_cost(book, messages_row(raw), "claude-sonnet-4-5") == Decimal(dollars)


def test_raw_usage_as_json_text_is_read_like_a_dict(book: PriceBook) -> None:
    row = messages_row(TURN)
    as_dict = anthropic_cost(book, row, "claude-sonnet-4-5")
    assert as_dict == Decimal("0.03975")
    text = orjson.dumps(TURN).decode()
    for encoded in (text, text.encode(), orjson.dumps(TURN, option=orjson.OPT_INDENT_2).decode()):
        assert anthropic_cost(book, {**row, "usage": encoded}, "claude-sonnet-4-5") == as_dict
    fast = anthropic_usage(1000, read=20_000, write_5m=3000, write_1h=2000, out=500, speed="fast")
    text_row = {**messages_row(fast), "usage": orjson.dumps(fast).decode()}
    assert anthropic_cost(book, text_row, "claude-opus-4-8") == Decimal("0.1325")


@pytest.mark.parametrize(
    ("tier", "speed", "at", "dollars"),
    [
        # claude-opus-4-8, list prices 5, 0.5, 6.25, 10, 25:
        # 1000x5 + 20,000x0.5 + 3000x6.25 + 2000x10 + 500x25 = 66,250
        ("standard", None, AT, "0.06625"),
        (None, None, AT, "0.06625"),
        ("priority", None, AT, "0.06625"),  # genai-prices has no priority variant: list prices
        ("default", None, AT, "0.06625"),  # OpenAI's word means nothing to Anthropic's table
        ("standard", "standard", AT, "0.06625"),
        # batch: half the list prices (2.5, 0.25, 3.125, 5, 12.5), from 2026-10-14 on
        ("batch", None, LATER, "0.033125"),
        ("batch", None, AT, "0.06625"),  # genai-prices models no earlier batch prices
        # fast mode (usage.speed): 10, 1, 12.5, 20, 50
        ("standard", "fast", AT, "0.1325"),
        ("priority", "fast", LATER, "0.1325"),
    ],
)
def test_claude_service_tier_and_fast_mode(
    book: PriceBook, tier: str | None, speed: str | None, at: datetime, dollars: str
) -> None:
    extra: dict[str, Any] = {"service_tier": tier} if tier is not None else {}
    if speed is not None:
        extra["speed"] = speed
    raw = anthropic_usage(1000, read=20_000, write_5m=3000, write_1h=2000, out=500, **extra)
    if tier is None:
        del raw["service_tier"]
    row = messages_row(raw)
    assert row["service_tier"] == tier
    assert anthropic_cost(book, row, "claude-opus-4-8", at) == Decimal(dollars)


def test_same_price_as_genai_prices_for_every_anthropic_model(book: PriceBook) -> None:
    """Our fast path against genai-prices reading Anthropic's own usage object (its extractor).

    Every Claude model billed by the token, both sides of the long-context tiers, 5-minute and
    1-hour writes, batch and fast mode, before and after the dated price changes.
    """
    provider = next(p for p in data_snapshot.get_snapshot().providers if p.id == "anthropic")
    rnd = random.Random(20251101)
    checked = 0
    for model in provider.models:
        if not model.match.is_match(model.id):
            continue
        for _ in range(8):
            at = rnd.choice([AT, LATER])
            prices = model.get_prices(at)
            if prices.input_mtok is None or prices.output_mtok is None:
                continue
            total = rnd.choice([0, 1, 1000, 99_999, 100_001, 199_999, 200_001, 400_000])
            read = rnd.randint(0, total)
            write_1h = rnd.randint(0, total - read) if rnd.random() < 0.7 else 0
            write_5m = rnd.randint(0, total - read - write_1h)
            uncached = total - read - write_1h - write_5m
            out = rnd.randint(0, 30_000)
            tier = rnd.choice(["standard", "priority", "batch"])
            speed = rnd.choice([None, "standard", "fast"])
            extra = {"service_tier": tier, **({"speed": speed} if speed else {})}
            raw = anthropic_usage(
                uncached, read=read, write_5m=write_5m, write_1h=write_1h, out=out, **extra
            )
            got = anthropic_cost(book, messages_row(raw), model.id, at)
            context = {
                **({"processing": "batch"} if tier == "batch" else {}),
                **({"speed": "fast"} if speed == "fast" else {}),
            }
            want = genai_prices.extract_usage(
                {"model": model.id, "usage": raw}, provider_id="anthropic"
            ).calc_price(genai_request_timestamp=at, price_context=context or None)
            expected = want.total_price
            resolved = model.get_prices(at, context or None)
            if resolved.cache_write_1h_mtok is None:
                # genai-prices bills these at the input rate; Anthropic (and we) at 2x.
                assert isinstance(resolved.input_mtok, Decimal)
                expected += write_1h * resolved.input_mtok / 1_000_000
            assert got == expected, (model.id, raw, at)
            checked += 1
    assert checked > 150


@pytest.mark.parametrize("name", ["gpt-5", "gpt-5-2025-08-07", "gpt-4.1-mini", "o3", "gpt-5-codex"])
def test_openai_model_under_anthropic_has_no_price(book: PriceBook, name: str) -> None:
    row = usage(1000, 100)
    assert book.cost_columns(row, model=name, response_model=name, provider="openai")[
        "priced_model"
    ]
    assert book.cost_columns(row, model=name, response_model=name, provider="anthropic") == (
        dict.fromkeys(COST_COLUMNS)
    )


@pytest.mark.parametrize(
    "name",
    ["claude-sonnet-4-5-20250929", "claude-opus-5-5", "claude-3-5-haiku-20241022", "claude-2.1"],
)
@pytest.mark.parametrize("provider", ["openai", "chatgpt"])
def test_claude_model_under_openai_has_no_price(book: PriceBook, name: str, provider: str) -> None:
    row = messages_row(TURN)
    assert book.cost_columns(row, model=name, response_model=name, provider="anthropic")[
        "priced_model"
    ]
    assert book.cost_columns(row, model=name, response_model=name, provider=provider) == (
        dict.fromkeys(COST_COLUMNS)
    )


def test_each_name_is_looked_up_in_the_row_providers_table_only(book: PriceBook) -> None:
    row = messages_row(TURN)
    # The reported name is tried first, but only a name the provider's table knows is priced.
    mixed = {"model": "claude-sonnet-4-5", "response_model": "gpt-5", "at": NOW}
    assert book.cost_columns(row, **mixed, provider="anthropic")["priced_model"] == (
        "claude-sonnet-4-5"
    )
    assert book.cost_columns(row, **mixed, provider="openai")["priced_model"] == "gpt-5"
    assert book.cost_columns(row, **mixed, provider="chatgpt")["priced_model"] == "gpt-5"
    # The default stays OpenAI's table (callers that do not pass a provider).
    assert book.cost_columns(row, **mixed)["priced_model"] == "gpt-5"


@pytest.mark.parametrize("provider", ["bedrock", "vertex", "", "Anthropic"])
def test_a_provider_type_without_a_table_gets_overrides_only(provider: str) -> None:
    book = PriceBook(Pricing((override("mine", "1", "2"),)))
    row = messages_row(TURN)
    for name in ("claude-sonnet-4-5", "gpt-5"):
        assert book.cost_columns(row, model=name, response_model=None, provider=provider) == (
            dict.fromkeys(COST_COLUMNS)
        )
    columns = book.cost_columns(row, model="mine", response_model=None, provider=provider)
    assert columns["price_source"] == "config"


SONNET_RATES = {"cached_input_per_mtok": "0.2", "cache_write_per_mtok": "2.5"}


@pytest.mark.parametrize(
    ("rates", "raw", "dollars"),
    [
        # 1000x2 + 20,000x0.2 + 3000x2.5 + 2000x3.5 + 500x10 = 25,500
        ({**SONNET_RATES, "cache_write_1h_per_mtok": "3.5"}, TURN, "0.0255"),
        # No 1-hour rate: 2x input (4), not the 5-minute rate: 2000x4 instead of 2000x3.5
        (SONNET_RATES, TURN, "0.0265"),
        # No cache rates at all: reads and 5-minute writes at input, 1-hour at 2x input.
        # 1000x2 + 20,000x2 + 3000x2 + 2000x4 + 500x10 = 61,000
        ({}, TURN, "0.061"),
        # The split absent: all 5000 writes at the 5-minute rate, whatever the 1-hour rate.
        (
            {**SONNET_RATES, "cache_write_1h_per_mtok": "3.5"},
            anthropic_usage(1000, read=20_000, write_5m=5000, out=500, split=False),
            "0.0235",
        ),
    ],
)
def test_override_with_1_hour_cache_writes(
    rates: dict[str, str], raw: dict[str, Any], dollars: str
) -> None:
    book = PriceBook(Pricing((override("claude-sonnet-4-5*", "2", "10", **rates),)))
    row = messages_row(raw)
    for provider in ("anthropic", "openai", "bedrock"):  # overrides name models, not providers
        estimate = book.estimate(row, ("claude-sonnet-4-5-20250929",), AT, provider=provider)
        assert estimate is not None
        assert (estimate.cost_usd, estimate.source) == (Decimal(dollars), "config")


def test_override_fingerprint_covers_the_1_hour_rate() -> None:
    without = override("claude-sonnet-4-5*", "2", "10", **SONNET_RATES)
    # Rates written before the 1-hour key existed keep the fingerprint their rows carry.
    assert cost.override_fingerprint(without) == "sha256:5569cd057f44"
    assert cost.override_fingerprint(override("gpt-5*", "1.10", "9.00")) == "sha256:b200b7672543"
    fingerprints = {
        cost.override_fingerprint(
            override("claude-sonnet-4-5*", "2", "10", **SONNET_RATES, cache_write_1h_per_mtok=r)
        )
        for r in ("3.5", "4", "4.0000001")
    }
    assert len(fingerprints) == 3 and cost.override_fingerprint(without) not in fingerprints


def test_pricing_config_reads_the_1_hour_rate(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
pricing:
  overrides:
    "claude-*": {input_per_mtok: 2, output_per_mtok: 10, cache_write_1h_per_mtok: "${H}"}
    claude-opus-5-5: {input_per_mtok: 4, output_per_mtok: 20, cache_write_1h_per_mtok: 0}
""",
        {"H": "3.5"},
    )
    assert config.pricing == Pricing(
        (
            override("claude-*", "2", "10", cache_write_1h_per_mtok="3.5"),
            override("claude-opus-5-5", "4", "20", cache_write_1h_per_mtok="0"),
        )
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("-1", "must be a number >= 0"),
        ("cheap", "must be a number of US dollars"),
        (".inf", "must be a finite number"),
        ("[4]", "must be a number of US dollars"),
        ("true", "must be a number of US dollars"),
    ],
)
def test_pricing_config_1_hour_rate_errors(tmp_path: Path, value: str, problem: str) -> None:
    text = (
        "pricing: {overrides: {m: {input_per_mtok: 1, output_per_mtok: 1, "
        f"cache_write_1h_per_mtok: {value}" + "}}}"
    )
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert err.value.key == "pricing.overrides.m.cache_write_1h_per_mtok"
    assert problem in err.value.problem


def provider_rows() -> list[tuple[Any, ...]]:
    """Rows to every provider type: (id, provider, credential kind, model, response model,
    usage row with the raw usage as a dict, created at)."""
    nosplit = anthropic_usage(1000, read=20_000, write_5m=5000, out=500, split=False)
    fast = anthropic_usage(1000, read=20_000, write_5m=3000, write_1h=2000, out=500, speed="fast")
    batch = anthropic_usage(
        1000, read=20_000, write_5m=3000, write_1h=2000, out=500, service_tier="batch"
    )
    openai_row = {**usage(1000, 100, cached=200), "usage": {"input_tokens": 1000}}
    later = LATER.isoformat()
    return [
        ("oa", "openai", "centralized", "gpt-5", "gpt-5-2025-08-07", openai_row, NOW),
        ("old", None, None, "gpt-4.1-mini", None, openai_row, NOW),  # before provider types
        ("cg", "chatgpt", "client", "gpt-5", None, openai_row, NOW),
        ("an", "anthropic", "centralized", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929",
         messages_row(TURN), NOW),
        ("an-nosplit", "anthropic", "byok", "claude-sonnet-4-5", None, messages_row(nosplit), NOW),
        ("an-fast", "anthropic", "centralized", "claude-opus-4-8", None, messages_row(fast), NOW),
        ("an-batch", "anthropic", None, "claude-opus-4-8", None, messages_row(batch), later),
        ("an-gpt", "anthropic", "centralized", "gpt-5", "gpt-5", openai_row, NOW),
        ("oa-claude", "openai", "centralized", "claude-opus-5-5", None, messages_row(TURN), NOW),
        # Claude Pro/Max sign-in: not billed per token, never priced.
        ("sub", "anthropic", "subscription", "claude-sonnet-4-5", None, messages_row(TURN), NOW),
    ]  # fmt: skip


def provider_prices() -> dict[str, tuple[Any, ...]]:
    """(cost, source, priced model) of each of provider_rows() after a backfill."""

    def openai_list_price(model: str) -> float:
        price = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=1000, cache_read_tokens=200, output_tokens=100),
            model,
            provider_id="openai",
            genai_request_timestamp=AT,
        )
        return float(price.total_price)

    return {
        "oa": (openai_list_price("gpt-5"), "genai-prices", "gpt-5"),
        "old": (openai_list_price("gpt-4.1-mini"), "genai-prices", "gpt-4.1-mini"),
        "cg": (None, None, None),  # a ChatGPT sign-in: paid by the plan, as live
        "an": (0.03975, "genai-prices", "claude-sonnet-4-5"),
        "an-nosplit": (0.03525, "genai-prices", "claude-sonnet-4-5"),
        "an-fast": (0.1325, "genai-prices", "claude-opus-4-8"),
        "an-batch": (0.033125, "genai-prices", "claude-opus-4-8"),
        "an-gpt": (None, None, None),
        "oa-claude": (None, None, None),
        "sub": (None, None, None),
    }


def test_backfill_prices_each_row_from_its_providers_table(tmp_path: Path) -> None:
    path = tmp_path / "aibridge.db"
    db = sqlite_utils.Database(path)
    schema.migrate(db)
    for iid, provider, kind, model, response_model, row, when in provider_rows():
        db["interceptions"].insert(
            {
                "id": iid,
                "started_at": when,
                "provider": provider,
                "credential_kind": kind,
                "model": model,
                "response_model": response_model,
            }
        )
        # As the recorder stores it: the raw usage as JSON text.
        stored = {**row, "usage": orjson.dumps(row["usage"]).decode()}
        db["token_usages"].insert({"interception_id": iid, **stored, "created_at": when})
    db.conn.commit()
    db.close()

    done = run_cost_cli("--db", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "8 token usage rows examined, 6 priced, 2 without a known price" in done.stdout

    got = {row[0]: row[1:] for row in costs(path)}
    assert got == provider_prices()
    # --all recomputes the same, and still leaves the sign-in rows alone.
    assert cost.backfill(path, PriceBook(), recompute=True) == cost.BackfillReport(8, 6, 2)
    assert {row[0]: row[1:] for row in costs(path)} == got


def test_a_chat_completions_row_is_priced_like_openai_s_bill() -> None:
    """prompt_tokens includes the cached ones, billed at the cached rate; an OpenAI-compatible
    host has no list prices (another provider's table would be a guess)."""
    from aibridge.apis.openai_chat import token_usage_row as chat_usage_row

    book = PriceBook(Pricing())
    row = chat_usage_row(
        {
            "prompt_tokens": 1_000_000,
            "completion_tokens": 1_000_000,
            "prompt_tokens_details": {"cached_tokens": 500_000},
        }
    )
    at = "2026-12-01T00:00:00+00:00"
    priced = book.cost_columns(row, model="gpt-4o", response_model=None, at=at, provider="openai")
    # gpt-4o: $2.50 input, $1.25 cached input, $10 output per million tokens.
    assert priced["estimated_cost_usd"] == pytest.approx(0.5 * 2.5 + 0.5 * 1.25 + 10)
    unpriced = book.cost_columns(
        row, model="gpt-4o", response_model=None, at=at, provider="openai_compatible"
    )
    assert unpriced["estimated_cost_usd"] is None
    override = PriceOverride("gpt-4o", Decimal("1"), Decimal("2"))
    negotiated = PriceBook(Pricing((override,))).cost_columns(
        row, model="gpt-4o", response_model=None, at=at, provider="openai_compatible"
    )
    assert negotiated["estimated_cost_usd"] == pytest.approx(1 + 2)


# ------------------------------------------------------------- backfill on both engines


def record(address: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """provider_rows()-shaped rows, written as the bridge writes them (the raw usage: JSON
    text in SQLite, jsonb in PostgreSQL)."""
    rec = Recorder(address)
    rec.start()
    for iid, provider, kind, model, response_model, row, when in rows:
        rec.upsert(
            schema.INTERCEPTIONS,
            {
                "id": iid,
                "started_at": when,
                "provider": provider,
                "credential_kind": kind,
                "model": model,
                "response_model": response_model,
            },
        )
        rec.insert(schema.TOKEN_USAGES, {"interception_id": iid, **row, "created_at": when})
    rec.close()


def engine_costs(address: str) -> dict[str, tuple[Any, ...]]:
    rows = read(
        address,
        "select interception_id, estimated_cost_usd, price_source, priced_model "
        "from token_usages order by id",
    )
    return {
        r["interception_id"]: (r["estimated_cost_usd"], r["price_source"], r["priced_model"])
        for r in rows
    }


def test_both_engines_price_each_row_from_its_providers_table(engine: str, book: PriceBook) -> None:
    record(engine, provider_rows())
    assert cost.backfill(engine, book, batch_size=3) == BackfillReport(8, 6, 2)
    assert engine_costs(engine) == provider_prices()
    # Priced rows are left alone (the two without a price are tried again); --all recomputes
    # the same and still skips the sign-ins.
    assert cost.backfill(engine, book) == BackfillReport(2, 0, 2)
    assert cost.backfill(engine, book, recompute=True) == BackfillReport(8, 6, 2)
    assert engine_costs(engine) == provider_prices()


# A 1-hour write count past 64 bits: orjson reads it as a float (not a count: no split),
# psycopg's jsonb loader as an int (all writes 1-hour). Each raw usage is stored as this text.
HUGE_SPLIT = (
    '{"cache_creation": {"ephemeral_5m_input_tokens": 0, '
    '"ephemeral_1h_input_tokens": 100000000000000000000000000000}}'
)


@pytest.mark.parametrize(
    "raw_text",
    [
        HUGE_SPLIT,
        HUGE_SPLIT.replace("100000000000000000000000000000", "18446744073709551616"),
        '{"speed": "standard", "speed": "fast"}',  # the last key wins, in both
        '{"cache_creation": [5000]}',
        '{"cache_creation": {"ephemeral_1h_input_tokens": 2000.0}}',
        '{"cache_creation": {"ephemeral_1h_input_tokens": -2000}}',
        '{"cache_creation": {"ephemeral_1h_input_tokens": "2000"}}',
        '"a JSON string"',
        "[1, 2]",
        "null",
    ],
)
def test_both_engines_give_the_pricing_code_the_same_raw_usage(
    engine: str, book: PriceBook, raw_text: str
) -> None:
    raw = anthropic_usage(1000, read=20_000, write_5m=5000, out=500, split=False)
    row = {**messages_row(raw), "usage": raw_text}
    record(engine, [("an", "anthropic", "centralized", "claude-opus-4-8", None, row, NOW)])
    assert cost.backfill(engine, book).priced == 1
    # What the pricing code makes of the JSON text SQLite holds.
    expected = book.cost_columns(
        row, model="claude-opus-4-8", response_model=None, at=NOW, provider="anthropic"
    )
    assert engine_costs(engine)["an"] == (
        expected["estimated_cost_usd"],
        "genai-prices",
        "claude-opus-4-8",
    )
    if raw_text == HUGE_SPLIT and addresses.is_postgres(engine):
        # The case that tells: the jsonb as psycopg hands it over (a dict) prices otherwise.
        (stored,) = [r["usage"] for r in pg_rows(engine, "select usage from token_usages")]
        assert stored["cache_creation"]["ephemeral_1h_input_tokens"] == 10**29
        as_dict = {**row, "usage": stored}
        other = book.cost_columns(
            as_dict, model="claude-opus-4-8", response_model=None, at=NOW, provider="anthropic"
        )
        assert other["estimated_cost_usd"] != expected["estimated_cost_usd"]


def pg_old_log(url: str) -> None:
    """old_log() in PostgreSQL: only the first migration applied, three unpriced rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create table _migrations (name text primary key, applied_at text not null)")
        for statement in schema.postgres_statements(schema.m001_initial):
            conn.execute(statement)
        conn.execute("insert into _migrations values ('m001_initial', '2025-01-01T00:00:00Z')")
        conn.execute(
            "insert into interceptions (id, started_at, model, response_model) values "
            "('a', %(t)s, 'gpt-5', 'gpt-5-2025-08-07'), ('b', %(t)s, 'fake-text', 'fake-text'), "
            "('c', %(t)s, 'gpt-4.1-mini', null)",
            {"t": NOW},
        )
        for iid in ("a", "b", "c"):
            conn.execute(
                "insert into token_usages (interception_id, input_tokens, "
                "cache_read_input_tokens, cache_write_input_tokens, output_tokens, "
                "reasoning_tokens, created_at) values (%s, 1000, 200, 0, 100, 0, %s)",
                (iid, NOW),
            )


def test_both_engines_migrate_an_old_log_before_pricing_it(engine: str, book: PriceBook) -> None:
    if addresses.is_postgres(engine):
        pg_old_log(engine)
    else:
        old_log(Path(engine))
    assert cost.backfill(engine, book) == BackfillReport(3, 2, 1)
    names = [r["name"] for r in read(engine, "select name from _migrations order by name")]
    assert names == sorted(m.__name__ for m in schema.MIGRATIONS)
    got = engine_costs(engine)
    list_price = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1000, cache_read_tokens=200, output_tokens=100),
        "gpt-5",
        provider_id="openai",
        genai_request_timestamp=AT,
    )
    assert got["a"] == (float(list_price.total_price), "genai-prices", "gpt-5")
    assert got["b"] == (None, None, None)
    assert got["c"][1:] == ("genai-prices", "gpt-4.1-mini")


def test_postgres_backfill_of_an_empty_database_makes_it_an_audit_log(
    postgres_url: str, book: PriceBook, capsys: pytest.CaptureFixture[str]
) -> None:
    # As in SQLite, where an empty file is migrated: nothing to price, the tables made.
    assert cost.main(["--db", postgres_url]) == 0
    assert capsys.readouterr().out.startswith(
        f"{postgres_url}: 0 token usage rows examined, 0 priced, 0 without a known price"
    )
    tables = {r["tablename"] for r in pg_rows(postgres_url, "select tablename from pg_tables")}
    assert set(schema.WRITABLE_TABLES) <= tables
    assert cost.backfill(postgres_url, book) == BackfillReport(0, 0, 0)


def test_postgres_backfill_waits_its_turn_for_the_recorders_lock(
    postgres_url: str, book: PriceBook
) -> None:
    record(postgres_url, provider_rows())
    with psycopg.connect(postgres_url, autocommit=True) as holder:
        holder.execute("begin")
        holder.execute("select pg_advisory_xact_lock(%s)", (postgres.WRITE_LOCK,))
        with pytest.raises(BackfillError, match="lock timeout"):
            cost.backfill(postgres_url, book, busy_timeout_ms=50)
        holder.execute("commit")
    assert set(engine_costs(postgres_url).values()) == {(None, None, None)}
    assert cost.backfill(postgres_url, book).priced == 6


def test_command_line_with_a_url(
    postgres_url: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record(postgres_url, provider_rows())
    monkeypatch.delenv("PGPASSWORD")  # the URL's password it is
    url = with_password(postgres_url, postgres_server.password)
    shown = addresses.display(url)
    assert cost.main(["--db", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{shown}: 8 token usage rows examined, 6 priced, 2 without")
    assert postgres_server.password not in out
    assert engine_costs(url) == provider_prices()

    # From a config: its overrides, and the password from the environment, masked.
    monkeypatch.setenv("AUDIT_DB_PASSWORD", postgres_server.password)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"database: {postgres_url.replace('aibridge@', 'aibridge:${AUDIT_DB_PASSWORD}@')}\n"
        "providers: [{name: openai, base_url: 'https://api.openai.com/v1', api_key: k}]\n"
        "pricing:\n  overrides:\n    claude-opus-5-5: {input_per_mtok: 1, output_per_mtok: 10}\n"
    )
    assert cost.main(["--config", str(config), "--all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{shown}: 8 token usage rows examined, 7 priced, 1 without")
    assert engine_costs(url)["oa-claude"][1:] == ("config", "claude-opus-5-5")


WRONG = "Wr@ng-secret/9"  # quoted in the URL as Wr%40ng-secret%2F9: neither form may show


@pytest.mark.parametrize(
    "kind", ["refused", "wrong password", "no such database", "not a port", "bad option"]
)
def test_command_line_with_an_unreachable_url(
    postgres_server: PostgresServer, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = f"postgresql://aibridge:{urllib.parse.quote(WRONG, safe='')}@127.0.0.1"
    url = {
        "refused": f"{base}:{free_port()}/aibridge",
        "wrong password": f"{base}:{postgres_server.port}/postgres",
        "no such database": with_password(
            postgres_server.url("no_such_db"), postgres_server.password
        ),
        "not a port": f"{base}:notaport/aibridge",
        "bad option": f"{base}:{postgres_server.port}/postgres?sslmode=sometimes",
    }[kind]
    assert cost.main(["--db", url]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {addresses.display(url)}: "), lines
    for secret_text in (WRONG, urllib.parse.quote(WRONG, safe=""), postgres_server.password):
        assert secret_text not in captured.err
