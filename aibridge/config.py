"""Loading and validating the bridge's YAML configuration (DESIGN.md §5).

Every error names the file, the key (as a path such as ``providers[0].api_key``) and what
is wrong, so an operator can fix it without reading code.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from aibridge.apis import BY_NAME, default_api_names, default_passthrough
from aibridge.governance.limits import (
    EVERYONE,
    METRICS,
    UNLIMITED,
    Governance,
    Group,
    Limits,
)
from aibridge.governance.periods import ADJECTIVE, PERIODS
from aibridge.hints import hint
from aibridge.record import address as addresses
from aibridge.upstream.breaker import BreakerSettings
from aibridge.upstream.key_pool import PoolSettings

# "chatgpt": Codex signed in with a ChatGPT account (chatgpt.com/backend-api/codex). The
# client's own credential goes upstream; the bridge identifies and records, holds no key.
# "anthropic": Anthropic's API (the key goes as x-api-key).
# "openai_compatible": a host that speaks OpenAI's Chat Completions (OpenRouter, vLLM, Ollama,
# Azure OpenAI's v1 API, Google's OpenAI-compatible endpoint, ...).
PROVIDER_TYPES = ("openai", "chatgpt", "anthropic", "openai_compatible")
# A header name as HTTP allows it (a token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
WEBSOCKET_POLICIES = ("bridge", "refuse")

# ${VAR} must be set; ${VAR:-default} falls back when VAR is unset or empty (as in POSIX shells).
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def database_url_problem(address: str) -> str | None:
    """What is wrong with a PostgreSQL URL (the password masked), or None."""
    try:
        from aibridge.record import postgres

        postgres.check_address(address)
    except (RuntimeError, ValueError) as e:
        return f"not a usable PostgreSQL URL ({addresses.display(address)}): {e}"
    return None


# A bridge token is at least this long; shorter values are never looked up as one.
MIN_TOKEN_LENGTH = 8


class ConfigError(ValueError):
    """A configuration problem, phrased for the operator."""

    def __init__(self, file: str | os.PathLike[str], key: str, problem: str) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + problem)


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    type: str
    base_url: str
    api_key: str
    extra_headers: dict[str, str] = field(default_factory=dict)
    # Anthropic: a Claude Pro/Max sign-in goes upstream as the user's own credential.
    subscription: bool = False
    # The APIs (aibridge.apis names) it serves; empty: those of its type.
    apis: tuple[str, ...] = ()
    # The header the provider key goes upstream in, lower case ("authorization" sends
    # ``Bearer <key>``, any other the key alone, e.g. Azure's "api-key"); empty: by type.
    key_header: str = ""
    # Several keys (``api_key`` given as a list): requests spread over them (aibridge.upstream).
    # Empty: ``(api_key,)``; given: ``api_key`` is the first.
    api_keys: tuple[str, ...] = ()

    # Parsed once: routing looks at these for every flow.
    scheme: str = field(init=False)
    host: str = field(init=False)
    port: int = field(init=False)
    base_path: str = field(init=False)  # the API root on the provider, e.g. "/v1"
    # The base URL's query string (Azure's "api-version=..."), added to every request.
    base_query: str = field(init=False)
    # The provider paths let through when the config lists none: its APIs' own.
    default_passthrough: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        set_ = object.__setattr__  # frozen dataclass
        if self.api_keys:
            set_(self, "api_key", self.api_keys[0])
        elif self.api_key:
            set_(self, "api_keys", (self.api_key,))
        set_(self, "scheme", parts.scheme)
        set_(self, "host", (parts.hostname or "").rstrip("."))  # as DNS compares names
        set_(self, "port", parts.port or (443 if parts.scheme == "https" else 80))
        set_(self, "base_path", parts.path.rstrip("/"))
        set_(self, "base_query", parts.query)
        if not self.apis:
            set_(self, "apis", default_api_names(self.type))
        if not self.key_header:
            set_(self, "key_header", "x-api-key" if self.type == "anthropic" else "authorization")
        set_(self, "key_header", self.key_header.lower())
        set_(self, "default_passthrough", default_passthrough(self.apis))

    @property
    def forwards_client_credential(self) -> bool:
        return self.type == "chatgpt"

    def __repr__(self) -> str:
        # Secrets never show in a repr (logs, tracebacks, debuggers): hints only.
        headers = {name: hint(value) for name, value in self.extra_headers.items()}
        return (
            f"Provider(name={self.name!r}, type={self.type!r}, base_url={self.base_url!r}, "
            f"api_keys={[hint(key) for key in self.api_keys]!r}, extra_headers={headers!r}, "
            f"subscription={self.subscription!r}, apis={self.apis!r}, "
            f"key_header={self.key_header!r})"
        )


@dataclass(frozen=True, slots=True)
class User:
    id: str
    token_sha256: str = field(repr=False)  # enough to test a guessed token offline
    # Known when the config gives the token itself: lets look-ups skip hashing most values.
    token_length: int | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Privacy:
    store_prompts: bool = True
    store_tool_args: bool = True
    store_thoughts: bool = True


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """Negotiated USD prices per million tokens for one model (or a glob of models).

    Cached input, cache writes and reasoning tokens fall back to the plain input and
    output prices when not given, as the providers bill them when they have no own rate.
    ``cache_write_per_mtok`` prices 5-minute (and unsplit) cache writes; Anthropic's 1-hour
    writes fall back to 2x the input price, as Anthropic bills them.
    """

    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    reasoning_per_mtok: Decimal | None = None
    cache_write_1h_per_mtok: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Pricing:
    """What the cost estimate of a token usage row uses besides the genai-prices table."""

    overrides: tuple[PriceOverride, ...] = ()


@dataclass(frozen=True, slots=True)
class Retention:
    """How long records are kept (None: forever); ``python -m aibridge.retention`` applies it."""

    days: int | None = None
    content_days: int | None = None


@dataclass(frozen=True, slots=True)
class ChatCompletions:
    """Chat Completions settings: ``request_usage`` adds ``stream_options.include_usage`` to a
    streamed request that lacks it, so the provider reports the tokens (DESIGN §3.4)."""

    request_usage: bool = True


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The Prometheus endpoint (aibridge/metrics.py): ``listen`` is off when empty (the
    ``aibridge_metrics`` option overrides it); ``user_label`` adds a ``user`` label, one series
    per person, which a large organisation's Prometheus may not want."""

    listen: str = ""
    user_label: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    database: str
    providers: tuple[Provider, ...]
    users: tuple[User, ...]
    byok: bool = False
    # Provider paths let through (authenticated, key injected, not recorded); None: each
    # provider's own (Provider.default_passthrough).
    passthrough: tuple[str, ...] | None = None
    privacy: Privacy = Privacy()
    websocket: str = "bridge"
    pricing: Pricing = Pricing()
    retention: Retention = Retention()
    chat_completions: ChatCompletions = ChatCompletions()
    governance: Governance = field(default_factory=Governance)
    circuit_breaker: BreakerSettings = field(default_factory=BreakerSettings)
    key_pool: PoolSettings = field(default_factory=PoolSettings)
    metrics: MetricsSettings = MetricsSettings()
    warnings: tuple[str, ...] = ()
    # Looked up for every request: built once.
    _users_by_digest: dict[str, User] = field(init=False, repr=False, compare=False)
    # The lengths a token can have, or None when a user is known only by its hash.
    token_lengths: frozenset[int] | None = field(init=False, repr=False, compare=False)
    # No token is shorter (8 when some user is known only by its hash).
    shortest_token: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass
        set_(self, "_users_by_digest", {user.token_sha256: user for user in self.users})
        lengths = [user.token_length for user in self.users]
        known = None if None in lengths else frozenset(lengths)
        set_(self, "token_lengths", known)
        set_(self, "shortest_token", min(known) if known else MIN_TOKEN_LENGTH)

    def passthrough_for(self, provider: Provider) -> tuple[str, ...]:
        return provider.default_passthrough if self.passthrough is None else self.passthrough

    def provider_named(self, name: str) -> Provider | None:
        for provider in self.providers:
            if provider.name == name:
                return provider
        return None

    def user_for_token(self, token: str) -> User | None:
        return self._users_by_digest.get(sha256_hex(token))


def sha256_hex(text: str) -> str:
    # surrogateescape: mitmproxy hands undecodable header bytes over as lone surrogates, and
    # such a token must hash (to no user) rather than raise.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def expand_env(value: str, file: str, key: str, env: dict[str, str] | os._Environ[str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` with values from the environment."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = env.get(name)
        if found:
            return found
        if default is not None:
            return default
        raise ConfigError(
            file, key, f"environment variable {name} is not set (referenced as ${{{name}}})"
        )

    return _ENV_REF.sub(replace, value)


class _Reader:
    """Walks the parsed YAML with the file name at hand, so every error can say where it is."""

    def __init__(self, file: str, env: dict[str, str] | os._Environ[str]) -> None:
        self.file = file
        self.env = env
        self.warnings: list[str] = []

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, key, problem)

    def mapping(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {_kind(value)}")
        return value

    def string(
        self,
        parent: dict[str, Any],
        name: str,
        key: str,
        *,
        default: str | None = None,
        allow_empty: bool = False,
    ) -> str:
        value = parent.get(name, default)
        if value is None:
            raise self.fail(key, "is required")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(key, f"must be a string, got {_kind(value)}")
        text = expand_env(str(value), self.file, key, self.env)
        if not text and not allow_empty:
            raise self.fail(key, "must not be empty")
        return text

    def boolean(self, parent: dict[str, Any], name: str, key: str, default: bool) -> bool:
        value = parent.get(name, default)
        if isinstance(value, str):
            value = expand_env(value, self.file, key, self.env).strip().lower()
            if value in ("true", "yes", "on", "1"):
                return True
            if value in ("false", "no", "off", "0"):
                return False
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def string_list(
        self, parent: dict[str, Any], name: str, key: str, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        value = parent.get(name)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a list of strings")
        return tuple(value)

    def price(self, parent: dict[str, Any], name: str, key: str) -> Decimal | None:
        """A non-negative USD amount, kept as Decimal so 0.125 stays exactly 0.125."""
        value = parent.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            value = expand_env(value, self.file, key, self.env).strip()
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(key, f"must be a number of US dollars, got {_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {value!r}")
        try:
            amount = Decimal(str(value))
        except InvalidOperation:
            raise self.fail(key, f"must be a number of US dollars, got {value!r}") from None
        if not amount.is_finite() or amount < 0:
            raise self.fail(key, f"must be a number >= 0, got {value!r}")
        return amount

    def number(self, parent: dict[str, Any], name: str, key: str) -> float:
        value = parent.get(name)
        if isinstance(value, str):
            text = expand_env(value, self.file, key, self.env).strip()
            try:
                value = float(text)
            except ValueError:
                raise self.fail(key, f"must be a number, got {text!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, got {_kind(value)}")
        try:
            value = float(value)
        except OverflowError:  # an int of hundreds of digits
            raise self.fail(key, "is too large a number") from None
        if not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {value!r}")
        return float(value)

    def limit(self, parent: dict[str, Any], name: str, key: str, *, whole: bool) -> float | None:
        """A limit: a number >= 0 (whole for counts), or ``unlimited`` (math.inf); None when
        it is not given."""
        value = parent.get(name)
        if value is None:
            return None
        if isinstance(value, str) and expand_env(value, self.file, key, self.env).strip() in (
            UNLIMITED,
        ):
            return math.inf
        amount = self.number(parent, name, key)
        if amount < 0 or (whole and amount != int(amount)):
            kind = "a whole number" if whole else "a number"
            raise self.fail(key, f"must be {kind} >= 0 or {UNLIMITED!r}, got {value!r}")
        return amount

    def days(self, parent: dict[str, Any], name: str, key: str) -> int | None:
        value = parent.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            text = expand_env(value, self.file, key, self.env).strip()
            value = int(text) if text.isdigit() else text
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, f"must be a whole number of days >= 1, got {value!r}")
        return value


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError naming file, key and problem."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found (set the aibridge_config option)") from None
    except OSError as e:
        raise ConfigError(file, "", f"cannot read: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(file, "", f"not valid YAML: {e}") from None
    return parse_config(raw if raw is not None else {}, file, os.environ if env is None else env)


def parse_config(raw: Any, file: str, env: dict[str, str] | os._Environ[str]) -> Config:
    r = _Reader(file, env)
    top = r.mapping(raw, "")
    known = {
        "database",
        "providers",
        "users",
        "byok",
        "passthrough",
        "privacy",
        "websocket",
        "pricing",
        "retention",
        "chat_completions",
        "governance",
        "groups",
        "circuit_breaker",
        "key_pool",
        "metrics",
    }
    for name in top:
        if name not in known:
            raise r.fail(str(name), f"unknown key (known keys: {', '.join(sorted(known))})")

    database = r.string(top, "database", "database", default="aibridge.db")
    if addresses.is_postgres(database):
        problem = database_url_problem(database)
        if problem is not None:
            raise r.fail("database", problem)
    elif not Path(database).is_absolute():
        # Relative to the config file, so the bridge writes the same file from any directory.
        database = str(Path(file).resolve().parent / database)

    providers = _providers(r, top.get("providers"))
    users, user_entries = _users(r, top.get("users"))

    privacy_raw = r.mapping(top.get("privacy") or {}, "privacy")
    for name in privacy_raw:
        if name not in ("store_prompts", "store_tool_args", "store_thoughts"):
            raise r.fail(f"privacy.{name}", "unknown key")
    privacy = Privacy(
        store_prompts=r.boolean(privacy_raw, "store_prompts", "privacy.store_prompts", True),
        store_tool_args=r.boolean(privacy_raw, "store_tool_args", "privacy.store_tool_args", True),
        store_thoughts=r.boolean(privacy_raw, "store_thoughts", "privacy.store_thoughts", True),
    )
    websocket = r.string(top, "websocket", "websocket", default="bridge")
    if websocket not in WEBSOCKET_POLICIES:
        raise r.fail(
            "websocket", f"must be one of {', '.join(WEBSOCKET_POLICIES)}, got {websocket!r}"
        )
    passthrough = r.string_list(top, "passthrough", "passthrough", ())
    for i, pattern in enumerate(passthrough):
        if not pattern.startswith("/"):
            raise r.fail(f"passthrough[{i}]", f"must be a path starting with '/', got {pattern!r}")

    retention = _retention(r, top.get("retention"))
    governance = _governance(r, top.get("governance"), top.get("groups"), user_entries)
    _warn_if_retention_forgets_spend(r, retention, governance)
    return Config(
        path=file,
        database=database,
        providers=providers,
        users=users,
        byok=r.boolean(top, "byok", "byok", False),
        passthrough=None if top.get("passthrough") is None else passthrough,
        privacy=privacy,
        websocket=websocket,
        pricing=_pricing(r, top.get("pricing")),
        retention=retention,
        chat_completions=_chat_completions(r, top.get("chat_completions")),
        governance=governance,
        circuit_breaker=_circuit_breaker(r, top.get("circuit_breaker")),
        key_pool=_key_pool(r, top.get("key_pool")),
        metrics=_metrics(r, top.get("metrics")),
        warnings=tuple(r.warnings),
    )


# The days of log a budget period needs at most (a month of 31 days).
_PERIOD_DAYS = {"day": 1, "week": 7, "month": 31}


def _warn_if_retention_forgets_spend(r: _Reader, retention: Retention, gov: Governance) -> None:
    """Spend is read from the log: deleting rows younger than a budget's period forgets spend."""
    if retention.days is None:
        return
    limits = [*gov.user_limits.values()]
    limits += [lim for g in gov.groups for lim in (g.limits, g.shared_limits)]
    periods = {period for lim in limits for (_, period) in lim.budgets}
    longest = max(periods, key=_PERIOD_DAYS.__getitem__, default=None)
    if longest is not None and retention.days < _PERIOD_DAYS[longest]:
        r.warnings.append(
            f"{r.file}: retention.days ({retention.days}) is shorter than a {longest}: "
            f"deleting rows that young forgets spend that {ADJECTIVE[longest]} budgets count; "
            f"keep at least {_PERIOD_DAYS[longest]} days"
        )


_PRICE_KEYS = (
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "reasoning_per_mtok",
    "cache_write_1h_per_mtok",
)


def _pricing(r: _Reader, raw: Any) -> Pricing:
    section = r.mapping(raw or {}, "pricing")
    for name in section:
        if name != "overrides":
            raise r.fail(f"pricing.{name}", "unknown key (known: overrides)")
    overrides_raw = r.mapping(section.get("overrides") or {}, "pricing.overrides")
    overrides: list[PriceOverride] = []
    for model, rates_raw in overrides_raw.items():
        key = f"pricing.overrides.{model}"
        if not isinstance(model, str) or not model.strip():
            raise r.fail(key, "the model name must be a non-empty string")
        rates = r.mapping(rates_raw, key)
        for name in rates:
            if name not in _PRICE_KEYS:
                raise r.fail(f"{key}.{name}", f"unknown key (known: {', '.join(_PRICE_KEYS)})")
        prices = {name: r.price(rates, name, f"{key}.{name}") for name in _PRICE_KEYS}
        input_price, output_price = prices["input_per_mtok"], prices["output_per_mtok"]
        if input_price is None or output_price is None:
            missing = "input_per_mtok" if input_price is None else "output_per_mtok"
            raise r.fail(f"{key}.{missing}", "is required (USD per million tokens)")
        overrides.append(
            PriceOverride(
                model.strip(),
                input_price,
                output_price,
                cached_input_per_mtok=prices["cached_input_per_mtok"],
                cache_write_per_mtok=prices["cache_write_per_mtok"],
                reasoning_per_mtok=prices["reasoning_per_mtok"],
                cache_write_1h_per_mtok=prices["cache_write_1h_per_mtok"],
            )
        )
    return Pricing(tuple(overrides))


def _chat_completions(r: _Reader, raw: Any) -> ChatCompletions:
    section = r.mapping(raw or {}, "chat_completions")
    for name in section:
        if name != "request_usage":
            raise r.fail(f"chat_completions.{name}", "unknown key (known: request_usage)")
    return ChatCompletions(
        r.boolean(section, "request_usage", "chat_completions.request_usage", True)
    )


def _known(r: _Reader, section: dict[str, Any], key: str, known: tuple[str, ...]) -> None:
    for name in section:
        if name not in known:
            raise r.fail(f"{key}.{name}", f"unknown key (known: {', '.join(known)})")


def _circuit_breaker(r: _Reader, raw: Any) -> BreakerSettings:
    section = r.mapping(raw or {}, "circuit_breaker")
    known = ("enabled", "failures", "cool_down_seconds", "half_open_requests")
    _known(r, section, "circuit_breaker", known)
    default = BreakerSettings()
    return BreakerSettings(
        enabled=r.boolean(section, "enabled", "circuit_breaker.enabled", default.enabled),
        failures=_count(r, section, "failures", "circuit_breaker", default.failures),
        cool_down_seconds=_seconds(
            r, section, "cool_down_seconds", "circuit_breaker", default.cool_down_seconds
        ),
        half_open_requests=_count(
            r, section, "half_open_requests", "circuit_breaker", default.half_open_requests
        ),
    )


def _key_pool(r: _Reader, raw: Any) -> PoolSettings:
    section = r.mapping(raw or {}, "key_pool")
    _known(r, section, "key_pool", ("park_seconds", "max_park_seconds"))
    default = PoolSettings()
    park = _seconds(r, section, "park_seconds", "key_pool", default.park_seconds)
    most = _seconds(r, section, "max_park_seconds", "key_pool", max(park, default.max_park_seconds))
    if park > most:
        raise r.fail(
            "key_pool.park_seconds", f"must not exceed key_pool.max_park_seconds ({most:g})"
        )
    return PoolSettings(park_seconds=park, max_park_seconds=most)


def _metrics(r: _Reader, raw: Any) -> MetricsSettings:
    section = r.mapping(raw or {}, "metrics")
    _known(r, section, "metrics", ("listen", "user_label"))
    listen = r.string(section, "listen", "metrics.listen", default="", allow_empty=True).strip()
    if listen:
        from aibridge.metrics import parse_listen  # prometheus_client: only when metrics are on

        try:
            parse_listen(listen)
        except ValueError as e:
            raise r.fail("metrics.listen", str(e)) from None
    return MetricsSettings(listen, r.boolean(section, "user_label", "metrics.user_label", False))


def _count(r: _Reader, section: dict[str, Any], name: str, parent: str, default: int) -> int:
    if section.get(name) is None:
        return default
    value = r.number(section, name, f"{parent}.{name}")
    if value < 1 or value != int(value) or value > 1_000_000:
        raise r.fail(f"{parent}.{name}", f"must be a whole number from 1 to 1000000, got {value:g}")
    return int(value)


def _seconds(r: _Reader, section: dict[str, Any], name: str, parent: str, default: float) -> float:
    if section.get(name) is None:
        return default
    value = r.number(section, name, f"{parent}.{name}")
    if not 0 < value <= 86_400:
        raise r.fail(
            f"{parent}.{name}", f"must be a number of seconds above 0, at most 86400, got {value:g}"
        )
    return value


def _retention(r: _Reader, raw: Any) -> Retention:
    section = r.mapping(raw or {}, "retention")
    for name in section:
        if name not in ("days", "content_days"):
            raise r.fail(f"retention.{name}", "unknown key (known: days, content_days)")
    days = r.days(section, "days", "retention.days")
    content_days = r.days(section, "content_days", "retention.content_days")
    if days is not None and content_days is not None and content_days > days:
        raise r.fail(
            "retention.content_days",
            f"must not exceed retention.days ({days}): content goes with its rows at the latest",
        )
    return Retention(days, content_days)


def _providers(r: _Reader, raw: Any) -> tuple[Provider, ...]:
    if raw is None:
        raise r.fail("providers", "is required: list at least one provider")
    if not isinstance(raw, list) or not raw:
        raise r.fail("providers", "must be a non-empty list")
    providers: list[Provider] = []
    for i, item in enumerate(raw):
        key = f"providers[{i}]"
        entry = r.mapping(item, key)
        known = {
            "name",
            "type",
            "base_url",
            "api_key",
            "extra_headers",
            "subscription",
            "apis",
            "key_header",
        }
        for name in entry:
            if name not in known:
                raise r.fail(f"{key}.{name}", f"unknown key (known: {', '.join(sorted(known))})")
        name = r.string(entry, "name", f"{key}.name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise r.fail(f"{key}.name", "may hold only letters, digits, '.', '_' and '-'")
        if any(p.name == name for p in providers):
            raise r.fail(f"{key}.name", f"duplicate provider name {name!r}")
        ptype = r.string(entry, "type", f"{key}.type", default="openai")
        if ptype not in PROVIDER_TYPES:
            raise r.fail(
                f"{key}.type",
                f"unsupported provider type {ptype!r} (supported: {', '.join(PROVIDER_TYPES)})",
            )
        base_url = r.string(entry, "base_url", f"{key}.base_url")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise r.fail(
                f"{key}.base_url",
                f"must be an http(s) URL such as https://api.openai.com/v1, got {base_url!r}",
            )
        if parts.fragment:
            raise r.fail(f"{key}.base_url", f"must not have a #fragment, got {base_url!r}")
        served = _served_apis(r, entry, key, ptype)
        key_header = r.string(
            entry, "key_header", f"{key}.key_header", default="", allow_empty=True
        ).lower()
        if key_header and not _HEADER_NAME.fullmatch(key_header):
            raise r.fail(f"{key}.key_header", f"must be an HTTP header name, got {key_header!r}")
        if key_header and ptype == "chatgpt":
            raise r.fail(f"{key}.key_header", "a chatgpt provider holds no key: remove key_header")
        if ptype == "chatgpt":
            if entry.get("api_key"):
                raise r.fail(
                    f"{key}.api_key",
                    "a chatgpt provider forwards the client's own ChatGPT sign-in: remove api_key",
                )
            api_keys: tuple[str, ...] = ()
        else:
            api_keys = _api_keys(r, entry, key)
        if not api_keys and ptype != "chatgpt":
            r.warnings.append(
                f"{r.file}: {key}.api_key is empty: requests to provider {name!r} "
                f"go upstream without a provider key until it is set"
            )
        headers_raw = r.mapping(entry.get("extra_headers") or {}, f"{key}.extra_headers")
        extra_headers = {
            str(h): r.string(headers_raw, h, f"{key}.extra_headers.{h}", allow_empty=True)
            for h in headers_raw
        }
        subscription = r.boolean(entry, "subscription", f"{key}.subscription", False)
        if subscription and ptype != "anthropic":
            raise r.fail(
                f"{key}.subscription",
                "only an anthropic provider takes subscription sign-ins (Claude Pro/Max); "
                "for ChatGPT sign-ins use type: chatgpt",
            )
        base = parts._replace(path=parts.path.rstrip("/")).geturl()
        providers.append(
            Provider(
                name,
                ptype,
                base,
                api_keys[0] if api_keys else "",
                extra_headers,
                subscription,
                served,
                key_header,
                api_keys,
            )
        )
    return tuple(providers)


def _api_keys(r: _Reader, entry: dict[str, Any], key: str) -> tuple[str, ...]:
    """``api_key``: one key, or a list of keys the requests are spread over. An entry that
    is empty (``${KEY_B:-}`` unset) is left out, with a warning."""
    raw = entry.get("api_key")
    if not isinstance(raw, list):
        single = r.string(entry, "api_key", f"{key}.api_key", allow_empty=True)
        return (single,) if single else ()
    keys: list[str] = []
    for i, item in enumerate(raw):
        value = r.string({"key": item}, "key", f"{key}.api_key[{i}]", allow_empty=True)
        if not value:
            r.warnings.append(f"{r.file}: {key}.api_key[{i}] is empty: left out of the key pool")
        elif value in keys:
            raise r.fail(
                f"{key}.api_key[{i}]",
                f"is the same key as {key}.api_key[{keys.index(value)}]: list each key once",
            )
        else:
            keys.append(value)
    return tuple(keys)


def _served_apis(r: _Reader, entry: dict[str, Any], key: str, ptype: str) -> tuple[str, ...]:
    """The provider's ``apis``: names of aibridge.apis, once each; by default its type's."""
    default = default_api_names(ptype)
    served = r.string_list(entry, "apis", f"{key}.apis", default)
    if not served:
        raise r.fail(f"{key}.apis", f"must name at least one API ({', '.join(BY_NAME)})")
    for i, name in enumerate(served):
        if name not in BY_NAME:
            raise r.fail(f"{key}.apis[{i}]", f"unknown API {name!r} (known: {', '.join(BY_NAME)})")
        if name in served[:i]:
            raise r.fail(f"{key}.apis[{i}]", f"{name!r} is listed twice")
    if ptype == "chatgpt" and served != ("responses",):
        raise r.fail(
            f"{key}.apis", "a chatgpt provider (a ChatGPT sign-in) serves only the responses API"
        )
    return served


# A users[] entry with its id, for the governance keys read after all users are known.
UserEntry = tuple[str, str, dict[str, Any]]  # (key, user id, entry)


def _users(r: _Reader, raw: Any) -> tuple[tuple[User, ...], list[UserEntry]]:
    if raw is None:
        return (), []
    if not isinstance(raw, list):
        raise r.fail("users", "must be a list")
    users: list[User] = []
    entries: list[UserEntry] = []
    known = ("id", "token", "token_sha256", "groups", "limits")
    for i, item in enumerate(raw):
        key = f"users[{i}]"
        entry = r.mapping(item, key)
        for name in entry:
            if name not in known:
                raise r.fail(f"{key}.{name}", f"unknown key (known: {', '.join(known)})")
        user_id = r.string(entry, "id", f"{key}.id")
        entries.append((key, user_id, entry))
        if "token" in entry and "token_sha256" in entry:
            raise r.fail(key, "give either token or token_sha256, not both")
        length: int | None = None
        if "token_sha256" in entry:
            digest = r.string(entry, "token_sha256", f"{key}.token_sha256").lower()
            if not _SHA256_HEX.fullmatch(digest):
                raise r.fail(
                    f"{key}.token_sha256", "must be 64 hexadecimal characters (sha256 of the token)"
                )
        elif "token" in entry:
            token = r.string(entry, "token", f"{key}.token", allow_empty=True)
            if not token:
                r.warnings.append(
                    f"{r.file}: {key}.token is empty: user {user_id!r} "
                    f"cannot sign in until it is set"
                )
                continue
            if len(token) < MIN_TOKEN_LENGTH:
                raise r.fail(
                    f"{key}.token", f"is too short: use at least {MIN_TOKEN_LENGTH} characters"
                )
            digest = sha256_hex(token)
            length = len(token)
        else:
            raise r.fail(key, "needs token (e.g. ${MY_TOKEN}) or token_sha256")
        if any(u.token_sha256 == digest for u in users):
            raise r.fail(key, "the same token is given to two users")
        users.append(User(user_id, digest, length))
    return tuple(users), entries


_LIMIT_KEYS = ("spend_usd", "tokens", "requests_per_minute", "concurrent_requests")


def _governance(r: _Reader, raw: Any, groups_raw: Any, user_entries: list[UserEntry]) -> Governance:
    """``governance`` (time zone, warnings, refresh), ``groups`` and ``users[].limits`` /
    ``users[].groups`` (aibridge.governance.limits says how they combine)."""
    section = r.mapping(raw or {}, "governance")
    known = ("time_zone", "warn_at", "refresh_seconds")
    for name in section:
        if name not in known:
            raise r.fail(f"governance.{name}", f"unknown key (known: {', '.join(known)})")
    zone = r.string(section, "time_zone", "governance.time_zone", default="UTC")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory ("America")
        raise r.fail(
            "governance.time_zone",
            f"unknown time zone {zone!r}: use an IANA name such as UTC or Europe/Berlin",
        ) from None
    warn_at: float | None = 0.8
    if "warn_at" in section:
        value = section["warn_at"]
        if value is None or value is False:
            warn_at = None
        else:
            warn_at = r.number(section, "warn_at", "governance.warn_at")
            if not 0 < warn_at <= 1:
                raise r.fail(
                    "governance.warn_at",
                    f"must be a share of the budget between 0 and 1 (0.8 = 80%), got {value!r}",
                )
    refresh = 5.0
    if "refresh_seconds" in section:
        refresh = r.number(section, "refresh_seconds", "governance.refresh_seconds")
        if not 0.1 <= refresh <= 3600:
            raise r.fail(
                "governance.refresh_seconds", f"must be between 0.1 and 3600, got {refresh!r}"
            )

    user_ids = {user_id for _, user_id, _ in user_entries}
    # users[].groups, by group name: (user id, where it is named).
    members_named: dict[str, list[tuple[str, str]]] = {}
    for key, user_id, entry in user_entries:
        for j, name in enumerate(r.string_list(entry, "groups", f"{key}.groups", ())):
            members_named.setdefault(name, []).append((user_id, f"{key}.groups[{j}]"))

    groups: list[Group] = []
    if groups_raw is not None and not isinstance(groups_raw, list):
        raise r.fail("groups", "must be a list")
    for i, item in enumerate(groups_raw or []):
        key = f"groups[{i}]"
        entry = r.mapping(item, key)
        known_group = ("name", "members", "limits", "shared_limits")
        for name in entry:
            if name not in known_group:
                raise r.fail(f"{key}.{name}", f"unknown key (known: {', '.join(known_group)})")
        name = r.string(entry, "name", f"{key}.name")
        if any(g.name == name for g in groups):
            raise r.fail(f"{key}.name", f"duplicate group name {name!r}")
        members = set(r.string_list(entry, "members", f"{key}.members", ()))
        for member in sorted(members):
            if member != EVERYONE and member not in user_ids:
                r.warnings.append(
                    f"{r.file}: {key}.members: {member!r} is not in users: it counts only once "
                    "someone is identified by that name (mitmproxy's proxyauth)"
                )
        members.update(user_id for user_id, _ in members_named.pop(name, []))
        groups.append(
            Group(
                name,
                frozenset(members),
                _limits(r, entry.get("limits"), f"{key}.limits"),
                _limits(r, entry.get("shared_limits"), f"{key}.shared_limits", shared=True),
                key,
            )
        )
    for name, named in members_named.items():
        where = named[0][1]
        known_names = ", ".join(g.name for g in groups) or "none are configured"
        raise r.fail(where, f"unknown group {name!r} (groups: {known_names})")

    user_limits: dict[str, Limits] = {}
    user_keys: dict[str, str] = {}
    for key, user_id, entry in user_entries:
        if entry.get("limits") is None:
            continue
        if user_id in user_limits:
            raise r.fail(
                f"{key}.limits",
                f"user {user_id!r} has limits at {user_keys[user_id]}.limits already: "
                "give one person's limits once",
            )
        user_limits[user_id] = _limits(r, entry["limits"], f"{key}.limits")
        user_keys[user_id] = key
    return Governance(zone, warn_at, refresh, tuple(groups), user_limits, user_keys)


def _limits(r: _Reader, raw: Any, key: str, *, shared: bool = False) -> Limits:
    section = r.mapping(raw or {}, key)
    known = _LIMIT_KEYS[:2] if shared else _LIMIT_KEYS
    for name in section:
        if name not in known:
            hint_ = " (rates and concurrency are per person: set them in limits)" if shared else ""
            raise r.fail(f"{key}.{name}", f"unknown key (known: {', '.join(known)}){hint_}")
    budgets: dict[Any, float] = {}
    for metric in METRICS:
        periods = r.mapping(section.get(metric) or {}, f"{key}.{metric}")
        for period in periods:
            if period not in PERIODS:
                raise r.fail(
                    f"{key}.{metric}.{period}", f"unknown period (known: {', '.join(PERIODS)})"
                )
            value = r.limit(periods, period, f"{key}.{metric}.{period}", whole=metric == "tokens")
            if value is not None:
                budgets[(metric, period)] = value
    return Limits(
        budgets,
        r.limit(section, "requests_per_minute", f"{key}.requests_per_minute", whole=True),
        r.limit(section, "concurrent_requests", f"{key}.concurrent_requests", whole=True),
    )
