"""Estimated cost of each token usage row, in US dollars.

Prices come from the config's ``pricing.overrides`` (negotiated rates) first, then from the
`genai-prices <https://github.com/pydantic/genai-prices>`_ table, which ships its data inside
the package, so no network is needed. Beside each estimate the row keeps where its price came
from (``price_source``: ``config`` or ``genai-prices``), which version of it
(``price_version``: the package version, or a fingerprint of the override's rates) and under
which name the model was priced (``priced_model``), so a number can always be traced back.

Semantics follow the provider's bill: ``input_tokens`` includes cached input; cached input and
cache writes have their own rates where the model has them and the input rate otherwise;
``output_tokens`` includes reasoning tokens, billed at the output rate unless an override gives
``reasoning_per_mtok``. Long-context tiers apply to the whole request, as the provider bills
them. A model without any known price gets NULL, never an error.

List prices come from the table of the provider the row went to (``provider``: the bridge's
provider type): a Claude model name sent to an OpenAI provider, or the reverse, has no list
price. Anthropic's cache writes are split in the raw ``usage`` (``cache_creation``): 5-minute
writes at the model's cache-write rate, 1-hour writes at its 1-hour rate; without the split all
writes count as 5-minute. Anthropic's ``service_tier: batch`` and ``speed: fast`` (in the raw
usage) select genai-prices' batch and fast-mode variants.

A `PriceBook` reads the table once when it is made (about half a second, so make it at
start-up); after that a row costs a dictionary lookup and a few Decimal operations.

Fill in rows written before costs existed, or after new rates were agreed, in a SQLite file
or a PostgreSQL database::

    python -m aibridge.cost --config config.yaml [--all]
    python -m aibridge.cost --db postgresql://bridge@db.internal/aibridge
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

import orjson
import sqlite_utils

from aibridge.config import ConfigError, PriceOverride, Pricing, load_config
from aibridge.record import address as addresses
from aibridge.record.schema import migrate

log = logging.getLogger(__name__)

SOURCE_CONFIG: Final = "config"
SOURCE_CATALOG: Final = "genai-prices"
COST_COLUMNS: Final = ("estimated_cost_usd", "price_source", "price_version", "priced_model")
# The genai-prices provider whose list prices apply, by the bridge's provider type. A type not
# named here has no list prices (overrides still apply): never another provider's table.
CATALOG_PROVIDERS: Final[Mapping[str, str]] = {
    "openai": "openai",
    "chatgpt": "openai",
    "anthropic": "anthropic",
}
# Anthropic bills a 1-hour cache write at 2x the base input rate (5-minute: 1.25x): the rate
# used when neither genai-prices nor an override gives one.
CACHE_WRITE_1H_INPUT_MULTIPLE: Final = Decimal(2)

_MTOK: Final = Decimal(1_000_000)
_NO_COST: Final[dict[str, Any]] = dict.fromkeys(COST_COLUMNS)
# Model names are chosen by clients; bound what a stream of invented names can make us keep.
_MAX_CACHED_NAMES: Final = 4096
_GLOB_CHARS: Final = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class Estimate:
    cost_usd: Decimal
    source: str
    version: str
    priced_model: str

    def columns(self) -> dict[str, Any]:
        return {
            "estimated_cost_usd": float(self.cost_usd),
            "price_source": self.source,
            "price_version": self.version,
            "priced_model": self.priced_model,
        }


@dataclass(frozen=True, slots=True)
class _Counts:
    """Token counts of one usage row, split into what is billed at distinct rates."""

    input: int
    uncached: int
    cache_read: int
    cache_write: int  # all cache writes: the 1-hour ones and the rest (5-minute)
    cache_write_1h: int
    output: int
    reasoning: int

    @property
    def cache_write_5m(self) -> int:
        return self.cache_write - self.cache_write_1h

    @classmethod
    def of(cls, usage: Mapping[str, Any], raw: Mapping[str, Any] | None) -> _Counts | None:
        input_tokens = _count(usage.get("input_tokens"))
        output_tokens = _count(usage.get("output_tokens"))
        if input_tokens is None and output_tokens is None:
            return None
        total_in = input_tokens or 0
        cache_read = min(_count(usage.get("cache_read_input_tokens")) or 0, total_in)
        cache_write = min(_count(usage.get("cache_write_input_tokens")) or 0, total_in - cache_read)
        out = output_tokens or 0
        return cls(
            input=total_in,
            uncached=total_in - cache_read - cache_write,
            cache_read=cache_read,
            cache_write=cache_write,
            # The column's total is what was billed; the split only says which rate applies.
            cache_write_1h=min(_cache_write_1h(raw), cache_write),
            output=out,
            reasoning=min(_count(usage.get("reasoning_tokens")) or 0, out),
        )


def _raw_usage(value: Any) -> Mapping[str, Any] | None:
    """The provider's own usage object: a dict live, JSON text when read back from the log."""
    if isinstance(value, Mapping):
        return value
    if isinstance(value, str | bytes):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None
    return None


def _cache_write_1h(raw: Mapping[str, Any] | None) -> int:
    # Anthropic: usage.cache_creation = {ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}.
    split = raw.get("cache_creation") if raw is not None else None
    if not isinstance(split, Mapping):
        return 0
    return _count(split.get("ephemeral_1h_input_tokens")) or 0


def _price_context(
    catalog_provider: str, service_tier: str | None, raw: Mapping[str, Any] | None
) -> dict[str, str] | None:
    """genai-prices' request context: which of a model's price variants apply."""
    if catalog_provider != "anthropic":
        return {"service_tier": service_tier} if service_tier else None
    # Anthropic reports standard, priority or batch. genai-prices keys batch prices as
    # processing=batch and has no priority variant: standard and priority get the list prices.
    context = {"processing": "batch"} if service_tier == "batch" else {}
    if raw is not None and raw.get("speed") == "fast":
        context["speed"] = "fast"  # fast mode, reported in usage.speed
    return context or None


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def override_fingerprint(override: PriceOverride) -> str:
    """A short, stable name for one set of negotiated rates: it changes when a rate does."""
    text = "|".join(
        str(getattr(override, name))
        for name in (
            "model",
            "input_per_mtok",
            "output_per_mtok",
            "cached_input_per_mtok",
            "cache_write_per_mtok",
            "reasoning_per_mtok",
        )
    )
    if override.cache_write_1h_per_mtok is not None:
        # Appended only when given, so the rates set before it existed keep their fingerprint.
        text += f"|1h={override.cache_write_1h_per_mtok}"
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]


def override_cost(override: PriceOverride, counts: _Counts) -> Decimal:
    cached = override.cached_input_per_mtok
    write = override.cache_write_per_mtok
    write_1h = override.cache_write_1h_per_mtok
    reasoning = override.reasoning_per_mtok
    inp, out = override.input_per_mtok, override.output_per_mtok
    if write_1h is None:
        # Not the 5-minute rate: Anthropic bills 1-hour writes at 2x input, 5-minute at 1.25x.
        write_1h = inp * CACHE_WRITE_1H_INPUT_MULTIPLE
    total = (
        counts.uncached * inp
        + counts.cache_read * (inp if cached is None else cached)
        + counts.cache_write_5m * (inp if write is None else write)
        + counts.cache_write_1h * write_1h
        + (counts.output - counts.reasoning) * out
        + counts.reasoning * (out if reasoning is None else reasoning)
    )
    return total / _MTOK


class _Catalog:
    """The genai-prices table, looked up through a cache of model names."""

    def __init__(self) -> None:
        # Imported here: the table takes about half a second to load, paid once per PriceBook.
        import genai_prices
        from genai_prices import data_snapshot, types

        self.version: str = genai_prices.__version__
        self._snapshot = data_snapshot.get_snapshot()
        self._tiered = types.TieredPrices
        self._models: dict[tuple[str, str], Any] = {}
        # Loading the data is the slow part: do it now rather than at the first request.
        for provider_id in set(CATALOG_PROVIDERS.values()):
            self._snapshot.find_provider(None, provider_id, None)

    def model(self, name: str, provider_id: str) -> Any | None:
        key = (provider_id, name.lower())
        try:
            return self._models[key]
        except KeyError:
            pass
        try:
            _, info = self._snapshot.find_provider_model(key[1], None, provider_id, None)
        except LookupError:
            info = None
        if len(self._models) >= _MAX_CACHED_NAMES:
            self._models.clear()
        self._models[key] = info
        return info

    def cost(
        self, info: Any, counts: _Counts, at: datetime, context: dict[str, str] | None
    ) -> Decimal | None:
        prices = info.get_prices(at, context)
        inp = self._rate(prices.input_mtok, counts.input)
        out = self._rate(prices.output_mtok, counts.input)
        if inp is None and out is None:
            return None  # not a model billed by the token (images, audio, embeddings, …)
        inp = inp or Decimal(0)
        cached = self._rate(prices.cache_read_mtok, counts.input)
        write = self._rate(prices.cache_write_mtok, counts.input)
        if write is None:
            write = self._rate(prices.cache_write_5m_mtok, counts.input)
        write_1h = self._rate(prices.cache_write_1h_mtok, counts.input)
        if write_1h is None:
            # genai-prices would bill these at the 5-minute rate; Anthropic bills 2x input.
            write_1h = inp * CACHE_WRITE_1H_INPUT_MULTIPLE
        total = (
            counts.uncached * inp
            + counts.cache_read * (inp if cached is None else cached)
            + counts.cache_write_5m * (inp if write is None else write)
            + counts.cache_write_1h * write_1h
            + counts.output * (out or Decimal(0))
        )
        return total / _MTOK

    def _rate(self, price: Any, input_tokens: int) -> Decimal | None:
        if price is None or isinstance(price, Decimal):
            return price
        if isinstance(price, self._tiered):
            # A tier, once crossed, prices the whole request (the providers' "cliff" rule).
            rate = price.base
            for tier in price.tiers:
                if input_tokens > tier.start:
                    rate = tier.price
            return rate
        return None


class PriceBook:
    """Config overrides, then the genai-prices table: the price of one token usage row."""

    def __init__(self, pricing: Pricing | None = None, *, catalog: bool = True) -> None:
        overrides = pricing.overrides if pricing is not None else ()
        self._exact: dict[str, PriceOverride] = {}
        self._globs: list[PriceOverride] = []
        for override in overrides:
            if _GLOB_CHARS & set(override.model):
                self._globs.append(override)
            else:
                self._exact.setdefault(override.model.lower(), override)
        self._fingerprints = {id(o): override_fingerprint(o) for o in overrides}
        self._catalog: _Catalog | None = None
        if catalog:
            try:
                self._catalog = _Catalog()
            except Exception as exc:
                # Costs are a convenience of the audit log: never fail the bridge over them.
                log.warning("genai-prices is unavailable (%s): only configured prices apply", exc)

    @property
    def catalog_version(self) -> str | None:
        return self._catalog.version if self._catalog is not None else None

    def override_for(self, name: str) -> PriceOverride | None:
        key = name.lower()
        if found := self._exact.get(key):
            return found
        for override in self._globs:
            if fnmatchcase(key, override.model.lower()):
                return override
        return None

    def estimate(
        self,
        usage: Mapping[str, Any],
        models: Sequence[str | None],
        at: datetime | None = None,
        service_tier: str | None = None,
        *,
        provider: str = "openai",
    ) -> Estimate | None:
        """The cost of `usage` under the first of `models` that has a price, else None.

        `models` is usually (the model upstream reported, the model requested): the reported
        one is more precise (a dated snapshot), the requested one is what overrides often name.
        `provider` is the bridge's provider type: it picks the list prices (overrides apply to
        every provider). `usage["usage"]`, the provider's raw usage, may be a dict or JSON text.
        """
        raw = _raw_usage(usage.get("usage"))
        counts = _Counts.of(usage, raw)
        if counts is None:
            return None
        names = [m for m in models if isinstance(m, str) and m]
        for name in names:
            if override := self.override_for(name):
                return Estimate(
                    override_cost(override, counts),
                    SOURCE_CONFIG,
                    self._fingerprints[id(override)],
                    override.model,
                )
        catalog = self._catalog
        catalog_provider = CATALOG_PROVIDERS.get(provider)
        if catalog is None or catalog_provider is None:
            return None
        when = at or datetime.now(UTC)
        context = _price_context(catalog_provider, service_tier, raw)
        for name in names:
            info = catalog.model(name, catalog_provider)
            if info is None:
                continue
            cost = catalog.cost(info, counts, when, context)
            if cost is not None:
                return Estimate(cost, SOURCE_CATALOG, catalog.version, info.id)
        return None

    def cost_columns(
        self,
        usage: Mapping[str, Any],
        *,
        model: str | None,
        response_model: str | None,
        at: str | datetime | None = None,
        service_tier: str | None = None,
        provider: str = "openai",
    ) -> dict[str, Any]:
        """The token_usages cost columns for one row; all NULL when no price is known.

        `provider` is the type of the provider the row went to (``Provider.type``).
        """
        try:
            when = _parse_time(at)
            estimate = self.estimate(
                usage, (response_model, model), when, service_tier, provider=provider
            )
        except Exception:
            # A bad price entry must cost one estimate, never the row that carries it.
            log.exception("estimating the cost of a token usage row failed")
            return dict(_NO_COST)
        return estimate.columns() if estimate is not None else dict(_NO_COST)


def _parse_time(at: str | datetime | None) -> datetime | None:
    if at is None or isinstance(at, datetime):
        return at
    try:
        parsed = datetime.fromisoformat(at)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# ------------------------------------------------------------------------------ backfill


@dataclass(frozen=True, slots=True)
class BackfillReport:
    examined: int
    priced: int
    unpriced: int


class BackfillError(RuntimeError):
    """The audit log cannot be read or written (PostgreSQL: unreachable, refused, …)."""


_SELECT: Final = """
select t.id, t.input_tokens, t.cache_read_input_tokens, t.cache_write_input_tokens,
       t.output_tokens, t.reasoning_tokens, {usage}, t.created_at, i.model, i.response_model,
       t.service_tier, i.provider
from token_usages t join interceptions i on i.id = t.interception_id
where t.id > {p} and coalesce(i.credential_kind, '') not in ('subscription', 'client')
  {only_missing}
order by t.id limit {p}
"""
# Rows from before a provider type was recorded went to OpenAI: the only API bridged then.
_PROVIDER_OF_OLD_ROWS: Final = "openai"
_UPDATE: Final = (
    "update token_usages set estimated_cost_usd = {p}, price_source = {p}, "
    "price_version = {p}, priced_model = {p} where id = {p}"
)
# The interception's row keeps the sum of its usage rows' costs (schema m007).
_UPDATE_INTERCEPTION: Final = (
    "update interceptions set estimated_cost_usd = (select sum(t.estimated_cost_usd) "
    "from token_usages t where t.interception_id = interceptions.id) "
    "where id = (select u.interception_id from token_usages u where u.id = {p})"
)


def _interception_params(updates: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [(update[-1],) for update in updates]  # the usage row's id is the last parameter


def _select(p: str, usage: str, recompute: bool) -> str:
    only_missing = "" if recompute else "and t.estimated_cost_usd is null"
    return _SELECT.format(p=p, usage=usage, only_missing=only_missing)


def backfill(
    db_path: str | Path,
    book: PriceBook,
    *,
    recompute: bool = False,
    batch_size: int = 500,
    busy_timeout_ms: int = 10_000,
) -> BackfillReport:
    """Estimate the cost of rows that have none (or of every row, with `recompute`), in the
    audit log at `db_path`: a SQLite path or a PostgreSQL URL (BackfillError when it cannot
    be reached).

    Each row is priced from its interception's provider type. Rows sent with a user's own
    sign-in to a plan (ChatGPT, Claude Pro/Max: credential kinds ``client`` and
    ``subscription``) are not billed per token and are left alone, as the live bridge does.
    Safe while the bridge writes: short transactions, each waiting its turn for the lock
    (in PostgreSQL the recorder's advisory lock, as the recorder's own batches do).
    """
    if addresses.is_postgres(str(db_path)):
        return _backfill_postgres(str(db_path), book, recompute, batch_size, busy_timeout_ms)
    conn = sqlite3.connect(str(db_path), timeout=busy_timeout_ms / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # An older file may not have the cost columns yet.
        migrate(sqlite_utils.Database(conn, execute_plugins=False))
        sql = _select("?", "t.usage", recompute)

        def write(updates: list[tuple[Any, ...]]) -> None:
            with conn:
                conn.executemany(_UPDATE.format(p="?"), updates)
                conn.executemany(_UPDATE_INTERCEPTION.format(p="?"), _interception_params(updates))

        return _in_batches(
            book, lambda last_id: conn.execute(sql, (last_id, batch_size)).fetchall(), write
        )
    finally:
        conn.close()


def _backfill_postgres(
    address: str, book: PriceBook, recompute: bool, batch_size: int, busy_timeout_ms: int
) -> BackfillReport:
    from aibridge.record import postgres

    with _postgres_errors(address):
        conn = postgres.connect(address)
        try:
            conn.execute(f"set lock_timeout = {int(busy_timeout_ms)}")
            # A database with no tables yet, or one migrated by an older bridge.
            postgres.migrate(conn)
            # jsonb as its JSON text: the pricing code gets what SQLite gives it, parsed by
            # the same library.
            sql = _select("%s", "t.usage::text", recompute)
            update = _UPDATE.format(p="%s")

            def write(updates: list[tuple[Any, ...]]) -> None:
                with postgres.locked_transaction(conn), conn.cursor() as cursor:
                    cursor.executemany(update, updates)
                    cursor.executemany(
                        _UPDATE_INTERCEPTION.format(p="%s"), _interception_params(updates)
                    )

            return _in_batches(
                book, lambda last_id: conn.execute(sql, (last_id, batch_size)).fetchall(), write
            )
        finally:
            conn.close()


@contextlib.contextmanager
def _postgres_errors(address: str) -> Iterator[None]:
    """PostgreSQL's errors as one BackfillError line naming the database, password masked."""
    from aibridge.record import postgres

    try:
        postgres.require_driver()
    except RuntimeError as exc:
        raise BackfillError(f"{addresses.display(address)}: {exc}") from None
    try:
        yield
    except postgres.psycopg.Error as exc:
        raise BackfillError(postgres.describe_error(exc, address)) from None


def _in_batches(
    book: PriceBook,
    fetch: Callable[[int], list[tuple[Any, ...]]],
    write: Callable[[list[tuple[Any, ...]]], None],
) -> BackfillReport:
    """Price the rows `fetch` gives after each id, batch by batch, and `write` their costs."""
    last_id, examined, priced = 0, 0, 0
    while True:
        rows = fetch(last_id)
        if not rows:
            break
        updates = list(_priced_updates(book, rows))
        write(updates)
        examined += len(rows)
        priced += sum(1 for u in updates if u[0] is not None)
        last_id = rows[-1][0]
    return BackfillReport(examined, priced, examined - priced)


def _priced_updates(book: PriceBook, rows: Iterable[tuple[Any, ...]]) -> Iterable[tuple[Any, ...]]:
    for (
        row_id,
        inp,
        cache_read,
        cache_write,
        out,
        reasoning,
        raw_usage,
        created_at,
        model,
        resp_model,
        tier,
        provider,
    ) in rows:
        usage = {
            "input_tokens": inp,
            "cache_read_input_tokens": cache_read,
            "cache_write_input_tokens": cache_write,
            "output_tokens": out,
            "reasoning_tokens": reasoning,
            "usage": raw_usage,  # JSON text: the cache write split and fast mode are in it
        }
        columns = book.cost_columns(
            usage,
            model=model,
            response_model=resp_model,
            at=created_at,
            service_tier=tier,
            provider=provider or _PROVIDER_OF_OLD_ROWS,
        )
        yield (*(columns[c] for c in COST_COLUMNS), row_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aibridge.cost",
        description="Estimate the cost of token usage rows that have none yet "
        "(rows recorded before costs existed, or models priced since).",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--config", help="bridge config: its database and pricing.overrides (default config.yaml)"
    )
    where.add_argument(
        "--db",
        help="the audit log (a SQLite file or a PostgreSQL URL), priced with the genai-prices "
        "table only",
    )
    parser.add_argument(
        "--all", action="store_true", help="recompute every row, e.g. after new rates were agreed"
    )
    args = parser.parse_args(argv)
    if args.db:
        db_path, pricing = args.db, Pricing()
    else:
        try:
            config = load_config(args.config or "config.yaml")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        db_path, pricing = config.database, config.pricing
    # A PostgreSQL database is made ready by the backfill (migrated); a path must exist.
    if not addresses.is_postgres(db_path) and not Path(db_path).exists():
        print(f"error: {db_path}: no such database", file=sys.stderr)
        return 2
    book = PriceBook(pricing)
    try:
        report = backfill(db_path, book, recompute=args.all)
    except BackfillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{addresses.display(db_path)}: {report.examined} token usage rows examined, "
        f"{report.priced} priced, "
        f"{report.unpriced} without a known price (genai-prices {book.catalog_version})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
