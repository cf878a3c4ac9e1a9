"""The configuration of operations (issue 15): key pools, the circuit breaker, metrics."""

from typing import Any

import pytest

from aibridge.config import ConfigError, Provider, parse_config
from aibridge.upstream.breaker import BreakerSettings
from aibridge.upstream.key_pool import PoolSettings

KEYS = ["sk-pool-key-aaaaaaaaaaaaaaaa-1", "sk-pool-key-bbbbbbbbbbbbbbbb-2"]


def parse(extra: dict[str, Any] | None = None, **provider: Any) -> Any:
    entry = {"name": "p", "base_url": "https://h.example/v1", "api_key": "k", **provider}
    return parse_config({"providers": [entry], **(extra or {})}, "c.yaml", {"KEY_B": KEYS[1]})


def only_provider(**entry: Any) -> Provider:
    (provider,) = parse(**entry).providers
    return provider


def test_one_key_is_a_pool_of_one() -> None:
    provider = only_provider(api_key="sk-one")
    assert provider.api_keys == ("sk-one",) and provider.api_key == "sk-one"


def test_a_list_of_keys() -> None:
    provider = only_provider(api_key=[KEYS[0], "${KEY_B}"])
    assert provider.api_keys == tuple(KEYS)
    assert provider.api_key == KEYS[0]  # what a single-key reader sees
    shown = repr(provider)
    assert all(key not in shown for key in KEYS)
    assert "sk-p...aa-1" in shown and "sk-p...bb-2" in shown


def test_an_unset_key_of_a_list_is_left_out_with_a_warning() -> None:
    config = parse_config(
        {
            "providers": [
                {"name": "p", "base_url": "https://h/v1", "api_key": [KEYS[0], "${GONE:-}"]}
            ]
        },
        "c.yaml",
        {},
    )
    assert config.providers[0].api_keys == (KEYS[0],)
    assert any("providers[0].api_key[1] is empty" in w for w in config.warnings)


def test_a_list_of_empty_keys_warns_as_an_empty_key() -> None:
    config = parse_config(
        {"providers": [{"name": "p", "base_url": "https://h/v1", "api_key": ["${GONE:-}"]}]},
        "c.yaml",
        {},
    )
    assert config.providers[0].api_keys == ()
    assert any("providers[0].api_key is empty" in w for w in config.warnings)


@pytest.mark.parametrize(
    ("api_key", "key", "problem"),
    [
        ([KEYS[0], KEYS[0]], "providers[0].api_key[1]", "same key as providers[0].api_key[0]"),
        ([KEYS[0], 5, KEYS[0]], "providers[0].api_key[2]", "same key"),
        ([KEYS[0], {"a": 1}], "providers[0].api_key[1]", "must be a string"),
        ([KEYS[0], None], "providers[0].api_key[1]", "is required"),
        ([KEYS[0], True], "providers[0].api_key[1]", "must be a string"),
        ([KEYS[0], [KEYS[1]]], "providers[0].api_key[1]", "must be a string"),
        (["${NOT_SET}"], "providers[0].api_key[0]", "NOT_SET is not set"),
    ],
)
def test_bad_key_lists_name_the_entry(api_key: Any, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        only_provider(api_key=api_key)
    assert info.value.key == key and problem in info.value.problem
    assert KEYS[0] not in str(info.value)  # a duplicate is named by position, never shown


def test_defaults() -> None:
    config = parse()
    assert config.circuit_breaker == BreakerSettings()
    assert config.circuit_breaker.enabled and config.circuit_breaker.failures == 5
    assert config.key_pool == PoolSettings()
    assert (config.metrics.listen, config.metrics.user_label) == ("", False)


def test_sections_read() -> None:
    config = parse(
        {
            "circuit_breaker": {
                "failures": 3,
                "cool_down_seconds": "12.5",
                "half_open_requests": 2,
                "enabled": "yes",
            },
            "key_pool": {"park_seconds": 5, "max_park_seconds": 120},
            "metrics": {"listen": "127.0.0.1:9464", "user_label": True},
        }
    )
    assert config.circuit_breaker == BreakerSettings(True, 3, 12.5, 2)
    assert config.key_pool == PoolSettings(5.0, 120.0)
    assert (config.metrics.listen, config.metrics.user_label) == ("127.0.0.1:9464", True)
    assert not parse({"circuit_breaker": {"enabled": False}}).circuit_breaker.enabled


def test_a_park_longer_than_the_default_cap_raises_the_cap() -> None:
    assert parse({"key_pool": {"park_seconds": 7200}}).key_pool.max_park_seconds == 7200


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ({"circuit_breaker": {"failures": 0}}, "circuit_breaker.failures", "whole number"),
        ({"circuit_breaker": {"failures": 2.5}}, "circuit_breaker.failures", "whole number"),
        ({"circuit_breaker": {"failures": -1}}, "circuit_breaker.failures", "whole number"),
        ({"circuit_breaker": {"failures": "many"}}, "circuit_breaker.failures", "a number"),
        ({"circuit_breaker": {"failures": True}}, "circuit_breaker.failures", "a number"),
        ({"circuit_breaker": {"failures": 10**400}}, "circuit_breaker.failures", "too large"),
        (
            {"circuit_breaker": {"cool_down_seconds": 0}},
            "circuit_breaker.cool_down_seconds",
            "above 0",
        ),
        (
            {"circuit_breaker": {"cool_down_seconds": float("nan")}},
            "circuit_breaker.cool_down_seconds",
            "finite",
        ),
        (
            {"circuit_breaker": {"cool_down_seconds": 1e9}},
            "circuit_breaker.cool_down_seconds",
            "at most 86400",
        ),
        (
            {"circuit_breaker": {"half_open_requests": 0}},
            "circuit_breaker.half_open_requests",
            "whole number",
        ),
        ({"circuit_breaker": {"enabled": "maybe"}}, "circuit_breaker.enabled", "true or false"),
        ({"circuit_breaker": {"failure": 3}}, "circuit_breaker.failure", "unknown key"),
        ({"circuit_breaker": [1]}, "circuit_breaker", "must be a mapping"),
        ({"key_pool": {"park_seconds": -5}}, "key_pool.park_seconds", "above 0"),
        (
            {"key_pool": {"park_seconds": 60, "max_park_seconds": 10}},
            "key_pool.park_seconds",
            "must not exceed",
        ),
        ({"key_pool": {"parks": 1}}, "key_pool.parks", "unknown key"),
        ({"metrics": {"listen": "127.0.0.1:99999"}}, "metrics.listen", "port"),
        ({"metrics": {"listen": "localhost:abc"}}, "metrics.listen", ""),
        ({"metrics": {"listen": ":9464"}}, "metrics.listen", "0.0.0.0:9464"),
        ({"metrics": {"user_label": "sometimes"}}, "metrics.user_label", "true or false"),
        ({"metrics": {"port": 9464}}, "metrics.port", "unknown key"),
    ],
)
def test_bad_sections_name_the_key(extra: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(extra)
    assert info.value.key == key, info.value
    assert problem in info.value.problem
    assert str(info.value).startswith("c.yaml: ")
