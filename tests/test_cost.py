"""Estimated costs (aibridge.cost): genai-prices' own arithmetic, config overrides, the row wiring,
the migration that adds the columns, the backfill command and the config keys."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import orjson
import pytest
import sqlite_utils
from genai_prices import data_snapshot

from aibridge import cost, schema
from aibridge.config import (
    ConfigError,
    PriceOverride,
    Pricing,
    Privacy,
    load_config,
)
from aibridge.cost import COST_COLUMNS, PriceBook
from aibridge.extract import RequestInfo, ResponseAccumulator
from aibridge.records import Outcome, end_rows
from devtools.mitmdump_process import REPO

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
