"""aibridge.metrics: the counters the bridge updates, the families read at scrape time, the
cardinality bound, parse_listen, and the metrics/health server on a free loopback port.

Values are read back the way Prometheus reads them: by parsing the exposition text.
"""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from aibridge import metrics as metrics_module
from aibridge.metrics import (
    CircuitGauge,
    ExchangeLabels,
    KeyGauge,
    Metrics,
    MetricsServer,
    RecorderGauge,
    parse_listen,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

CODEX = ExchangeLabels("openai", "responses", "gpt-5", "Codex", "alice")
CLAUDE = ExchangeLabels("anthropic", "messages", "claude-sonnet-4", "Claude Code", "bob")
TOKENS = {"input": 1200, "output": 300, "cache_read": 800, "cache_write": 0, "reasoning": 120}


def samples(metrics: Metrics, accept: str = "") -> Samples:
    body, _ = metrics.exposition(accept)
    return parse(body.decode())


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def names(found: Samples) -> set[str]:
    return {name for name, _ in found}


def label_sets(found: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in found if n == name]


def exchange(labels: ExchangeLabels, **extra: str) -> dict[str, str]:
    return {
        "provider": labels.provider,
        "api": labels.api,
        "model": labels.model,
        "client": labels.client,
        **extra,
    }


# --- counts ---------------------------------------------------------------------------------


def test_counts_after_a_known_sequence() -> None:
    m = Metrics(version="1.2.3")
    for _ in range(3):
        m.started(CODEX)
        m.finished(CODEX, "completed", 1.5, TOKENS, 1, 2)
    m.started(CODEX)
    m.finished(CODEX, "upstream_error", 0.2, {}, 1, 0)
    m.started(CLAUDE)
    m.finished(CLAUDE, "completed", 42.0, {"input": 10, "output": 5}, 2, 0)
    m.started(CLAUDE)  # still in flight at the scrape
    m.rejected(CODEX, "budget")
    m.rejected(CODEX, "budget")
    m.refused("openai", "responses", "unknown_token")
    m.passthrough("openai", "GET", 200)
    m.passthrough("openai", "GET", 200)
    m.passthrough("anthropic", "POST", 404)
    m.passthrough("openai", "GET", None)

    s = samples(m)
    codex, claude = exchange(CODEX), exchange(CLAUDE)
    total = "aibridge_interceptions_total"
    assert value(s, total, **codex, status="completed") == 3
    assert value(s, total, **codex, status="upstream_error") == 1
    assert value(s, total, **codex, status="rejected") == 2
    assert value(s, total, **claude, status="completed") == 1
    assert value(s, "aibridge_interceptions_inflight", **codex) == 0
    assert value(s, "aibridge_interceptions_inflight", **claude) == 1

    duration = "aibridge_interceptions_duration_seconds"
    assert value(s, duration + "_count", **codex) == 4
    assert value(s, duration + "_sum", **codex) == pytest.approx(4.7)
    assert value(s, duration + "_bucket", **codex, le="0.1") == 0
    assert value(s, duration + "_bucket", **codex, le="0.25") == 1
    assert value(s, duration + "_bucket", **codex, le="2.5") == 4
    assert value(s, duration + "_bucket", **claude, le="30.0") == 0
    assert value(s, duration + "_bucket", **claude, le="60.0") == 1
    buckets = {d["le"] for d in label_sets(s, duration + "_bucket") if d["model"] == "gpt-5"}
    assert {"0.1", "600.0", "+Inf"} <= buckets
    assert 10 <= len(buckets) <= 15

    tokens = "aibridge_tokens_total"
    assert value(s, tokens, **codex, type="input") == 3600
    assert value(s, tokens, **codex, type="output") == 900
    assert value(s, tokens, **codex, type="cache_read") == 2400
    assert value(s, tokens, **codex, type="reasoning") == 360
    assert value(s, tokens, **codex, type="cache_write") is None  # never positive
    assert value(s, tokens, **claude, type="input") == 10
    assert value(s, "aibridge_prompts_total", **codex) == 4
    assert value(s, "aibridge_prompts_total", **claude) == 2
    assert value(s, "aibridge_tool_calls_total", **codex) == 6
    assert value(s, "aibridge_tool_calls_total", **claude) == 0

    passthrough = "aibridge_passthrough_total"
    assert value(s, passthrough, provider="openai", method="GET", status="200") == 2
    assert value(s, passthrough, provider="anthropic", method="POST", status="404") == 1
    assert value(s, passthrough, provider="openai", method="GET", status="error") == 1
    rejections = "aibridge_rejections_total"
    assert value(s, rejections, provider="openai", api="responses", reason="budget") == 2
    assert value(s, rejections, provider="openai", api="responses", reason="unknown_token") == 1
    # refused() is no interception
    assert sum(v for (n, labels), v in s.items() if n == total) == 3 + 1 + 2 + 1
    assert value(s, "aibridge_build_info", version="1.2.3") == 1


def test_bad_numbers_from_a_caller_do_not_poison_the_series() -> None:
    m = Metrics()
    for seconds in (float("nan"), -1.0, float("-inf")):
        m.started(CODEX)
        m.finished(CODEX, "error", seconds, {"input": -5, "output": 0}, -1, -3)
    m.started(CODEX)
    m.finished(CODEX, "completed", 2.0, {"input": 7}, 1, 1)
    s = samples(m)
    codex = exchange(CODEX)
    assert value(s, "aibridge_interceptions_duration_seconds_sum", **codex) == 2.0
    assert value(s, "aibridge_interceptions_duration_seconds_count", **codex) == 4
    assert value(s, "aibridge_tokens_total", **codex, type="input") == 7
    assert value(s, "aibridge_prompts_total", **codex) == 1
    assert value(s, "aibridge_tool_calls_total", **codex) == 1


@pytest.mark.parametrize("user_label", [False, True])
def test_user_label_only_when_configured(user_label: bool) -> None:
    m = Metrics(user_label=user_label)
    for user in ("alice", "bob", "bob", ""):
        labels = CODEX._replace(user=user)
        m.started(labels)
        m.finished(labels, "completed", 1.0, {"input": 10}, 1, 1)
    m.rejected(CODEX._replace(user="carol"), "rate")
    s = samples(m)
    per_user = (
        "aibridge_interceptions_total",
        "aibridge_tokens_total",
        "aibridge_prompts_total",
        "aibridge_tool_calls_total",
    )
    for name in per_user:
        assert all(("user" in d) is user_label for d in label_sets(s, name)), name
    for name in (
        "aibridge_interceptions_inflight",
        "aibridge_interceptions_duration_seconds_count",
    ):
        assert all("user" not in d for d in label_sets(s, name)), name
    codex = exchange(CODEX)
    if user_label:
        assert value(s, "aibridge_prompts_total", **codex, user="bob") == 2
        assert value(s, "aibridge_prompts_total", **codex, user="alice") == 1
        assert value(s, "aibridge_prompts_total", **codex, user="") == 1  # unknown user
        assert value(s, "aibridge_tokens_total", **codex, type="input", user="bob") == 20
        assert value(s, "aibridge_interceptions_total", **codex, status="rejected", user="carol")
    else:
        assert value(s, "aibridge_prompts_total", **codex) == 4
        assert value(s, "aibridge_tokens_total", **codex, type="input") == 40
        assert value(s, "aibridge_interceptions_total", **codex, status="rejected") == 1
    assert value(s, "aibridge_interceptions_duration_seconds_count", **codex) == 4


def test_two_metrics_in_one_process_do_not_collide() -> None:
    first, second = Metrics(version="a"), Metrics(user_label=True, version="b")
    first.started(CODEX)
    first.finished(CODEX, "completed", 1.0, {"output": 3}, 1, 0)
    second.refused("openai", "responses", "unknown_token")
    a, b = samples(first), samples(second)
    assert value(a, "aibridge_tokens_total", **exchange(CODEX), type="output") == 3
    assert not label_sets(b, "aibridge_tokens_total")
    assert not label_sets(a, "aibridge_rejections_total")
    assert value(a, "aibridge_build_info", version="a") == 1
    assert value(b, "aibridge_build_info", version="b") == 1
    assert first.registry is not second.registry


# --- cardinality ----------------------------------------------------------------------------

HOSTILE_VALUES = [
    'a"quote',
    "back\\slash\\",
    "new\nline\r\n",
    "tab\tand\x00nul\x7f",
    "curly}{,=",
    "\udcff\udc80 lone surrogates",  # a header decoded with surrogateescape
    "\ud83d half a pair",
    "ünïcödé 模型 🚀 \u202eRTL",
    "x" * 5000,
    "y" * 199 + "\udcff",
    " ",
    "other",
    "# HELP injected",
    '}\naibridge_build_info{version="evil"} 1\n',
]


def test_hostile_label_values_keep_the_exposition_valid() -> None:
    m = Metrics(user_label=True)
    for i, text in enumerate(HOSTILE_VALUES):
        labels = ExchangeLabels("openai", "responses", text, text[::-1], f"{text}{i}")
        m.started(labels)
        m.finished(labels, text, 1.0, {text: 5, "input": 1}, 1, 1)
        m.rejected(labels, text)
        m.passthrough(text, text, 200)
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        body, _ = m.exposition(accept)
        text = body.decode("utf-8")  # strict: every value is UTF-8
        if accept:
            families = list(openmetrics_families(text))
            assert families
            continue
        s = parse(text)
        assert value(s, "aibridge_build_info", version="") == 1
        assert not any(d.get("version") == "evil" for d in label_sets(s, "aibridge_build_info"))
        exported = [v for _, labels in s for _, v in labels]
        assert max(map(len, exported)) <= 200
        models = {d["model"] for d in label_sets(s, "aibridge_interceptions_inflight")}
        assert 'a"quote' in models
        assert "new\nline\r\n" in models
        assert "x" * 200 in models
        assert "ünïcödé 模型 🚀 \u202eRTL" in models
        assert all(v == 0 for (n, _), v in s.items() if n == "aibridge_interceptions_inflight")


@pytest.mark.parametrize(
    ("label", "limit", "make"),
    [
        ("model", 200, lambda i: ExchangeLabels("openai", "responses", f"m{i}", "c", "u")),
        ("client", 50, lambda i: ExchangeLabels("openai", "responses", "m", f"client/{i}", "u")),
        ("user", 2000, lambda i: ExchangeLabels("openai", "responses", "m", "c", f"user-{i}")),
    ],
)
def test_default_bounds_per_label(
    label: str, limit: int, make: Callable[[int], ExchangeLabels]
) -> None:
    m = Metrics(user_label=True)
    flood = limit * 2 + 77
    for i in range(flood):
        m.started(make(i))
        m.finished(make(i), "completed", 0.5, {"input": 1}, 1, 0)
    s = samples(m)
    prompts = label_sets(s, "aibridge_prompts_total")
    seen = {d[label] for d in prompts}
    assert len(seen) == limit + 1
    assert "other" in seen
    assert {getattr(make(i), label) for i in range(limit)} < seen  # the first ones kept
    assert sum(v for (n, _), v in s.items() if n == "aibridge_prompts_total") == flood
    assert value(s, "aibridge_prompts_total", **{**dict(prompts[0]), label: "other"}) == (
        flood - limit
    )
    assert all(v == 0 for (n, _), v in s.items() if n == "aibridge_interceptions_inflight")


def test_configured_bounds_and_consistent_started_finished() -> None:
    m = Metrics(user_label=True, max_label_values={"model": 3, "client": 2, "user": 1})
    # Started before the bound is reached, finished after it: the same series both times.
    first = ExchangeLabels("openai", "chat", "model-0", "client-0", "user-0")
    m.started(first)
    held: list[ExchangeLabels] = []
    for i in range(1, 40):
        labels = ExchangeLabels("openai", "chat", f"model-{i}", f"client-{i}", f"user-{i}")
        m.started(labels)
        held.append(labels)
    s = samples(m)
    inflight = {
        (d["model"], d["client"]): v
        for (n, labels), v in s.items()
        if n == "aibridge_interceptions_inflight"
        for d in [dict(labels)]
    }
    assert inflight == {
        ("model-0", "client-0"): 1,
        ("model-1", "client-1"): 1,
        ("model-2", "other"): 1,
        ("other", "other"): 37,
    }
    for labels in [first, *held]:
        m.finished(labels, "completed", 1.0, {"output": 2}, 1, 0)
    s = samples(m)
    assert all(v == 0 for (n, _), v in s.items() if n == "aibridge_interceptions_inflight")
    users = {d["user"] for d in label_sets(s, "aibridge_prompts_total")}
    assert users == {"user-0", "other"}
    assert value(s, "aibridge_tokens_total", **{
        "provider": "openai", "api": "chat", "model": "other", "client": "other",
        "type": "output", "user": "other",
    }) == 74  # fmt: skip


def test_many_distinct_tuples_beyond_the_cache_count_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # More distinct label tuples than the children cache holds (made small here, so the test is
    # quick), each started long before it finishes: the cache starts over several times.
    monkeypatch.setattr(metrics_module, "_SERIES_CACHE_SIZE", 8)
    m = Metrics()
    tuples = [ExchangeLabels("openai", "responses", f"m{i}", "c", "") for i in range(150)]
    for labels in tuples:
        m.started(labels)
    for labels in tuples:
        m.finished(labels, "completed", 1.0, {"input": 3}, 1, 1)
    for labels in tuples[::3]:
        m.started(labels)
    s = samples(m)
    inflight = {
        dict(labels)["model"]: v
        for (n, labels), v in s.items()
        if n == "aibridge_interceptions_inflight"
    }
    assert len(inflight) == 150
    assert inflight == {f"m{i}": 1 if i % 3 == 0 else 0 for i in range(150)}
    assert sum(v for (n, _), v in s.items() if n == "aibridge_tokens_total") == 450


def test_hostile_methods_statuses_and_token_types_stay_bounded() -> None:
    m = Metrics()
    for i in range(500):
        m.passthrough("openai", f"M{i}", 200 + i)
        m.started(CODEX)
        m.finished(CODEX, f"status-{i}", 1.0, {f"type-{i}": 1}, 0, 0)
    s = samples(m)
    methods = {d["method"] for d in label_sets(s, "aibridge_passthrough_total")}
    statuses = {d["status"] for d in label_sets(s, "aibridge_interceptions_total")}
    types = {d["type"] for d in label_sets(s, "aibridge_tokens_total")}
    assert "other" in methods
    assert len(methods) <= 21
    assert len(statuses) <= 101
    assert len(types) <= 101
    assert sum(v for (n, _), v in s.items() if n == "aibridge_tokens_total") == 500
    assert sum(v for (n, _), v in s.items() if n == "aibridge_passthrough_total") == 500


# --- families read at scrape time -----------------------------------------------------------


def state_metrics(**sources: Any) -> Metrics:
    defaults: dict[str, Any] = {
        "recorder": lambda: RecorderGauge(queue_rows=7, rows_written=1234, rows_lost=2),
        "circuits": lambda: [
            CircuitGauge("openai", "gpt-5", "open", 3),
            CircuitGauge("openai", "gpt-4.1", "closed", 0),
            CircuitGauge("anthropic", "claude-sonnet-4", "half_open", 1),
        ],
        "keys": lambda: [
            KeyGauge("openai", 0, "sk-...aaaa", "active", 0),
            KeyGauge("openai", 1, "sk-...bbbb", "parked", 5),
            KeyGauge("openai", 2, "sk-...cccc", "disabled", 1),
        ],
    }
    return Metrics(version="9.9", **{**defaults, **sources})


RECORDER = {
    "aibridge_recorder_queue_rows",
    "aibridge_recorder_rows_written_total",
    "aibridge_recorder_losses_total",
}
CIRCUITS = {"aibridge_circuit_breaker_state", "aibridge_circuit_breaker_trips_total"}
KEYS = {"aibridge_key_pool_key_state", "aibridge_key_pool_parks_total"}


def test_state_families_from_the_callables() -> None:
    s = samples(state_metrics())
    assert value(s, "aibridge_recorder_queue_rows") == 7
    assert value(s, "aibridge_recorder_rows_written_total") == 1234
    assert value(s, "aibridge_recorder_losses_total") == 2
    state = "aibridge_circuit_breaker_state"
    for model, current in (("gpt-5", "open"), ("gpt-4.1", "closed")):
        for st in ("closed", "open", "half_open"):
            expected = 1 if st == current else 0
            assert value(s, state, provider="openai", model=model, state=st) == expected
    assert value(s, state, provider="anthropic", model="claude-sonnet-4", state="half_open") == 1
    assert value(s, "aibridge_circuit_breaker_trips_total", provider="openai", model="gpt-5") == 3
    key_state = "aibridge_key_pool_key_state"
    for key, hint, current in (("0", "sk-...aaaa", "active"), ("1", "sk-...bbbb", "parked")):
        for st in ("active", "parked", "disabled"):
            expected = 1 if st == current else 0
            assert value(s, key_state, provider="openai", key=key, hint=hint, state=st) == expected
    parks = "aibridge_key_pool_parks_total"
    assert value(s, parks, provider="openai", key="1", hint="sk-...bbbb") == 5
    assert value(s, parks, provider="openai", key="2", hint="sk-...cccc") == 1
    assert value(s, "aibridge_build_info", version="9.9") == 1


def test_state_is_read_at_each_scrape() -> None:
    rows = [0]

    def recorder() -> RecorderGauge:
        rows[0] += 10
        return RecorderGauge(queue_rows=rows[0] // 10, rows_written=rows[0], rows_lost=0)

    m = state_metrics(recorder=recorder)
    assert value(samples(m), "aibridge_recorder_rows_written_total") == 10
    assert value(samples(m), "aibridge_recorder_rows_written_total") == 20


def test_no_recorder_no_circuits_no_keys() -> None:
    s = samples(Metrics())
    assert not (names(s) & (RECORDER | CIRCUITS | KEYS))
    assert value(s, "aibridge_build_info", version="") == 1


def test_duplicates_from_a_source_are_one_series() -> None:
    m = state_metrics(
        circuits=lambda: [
            CircuitGauge("openai", "gpt-5", "closed", 1),
            CircuitGauge("openai", "gpt-5", "open", 2),
        ],
        keys=lambda: [KeyGauge("openai", 0, "h", "active", 0)] * 3,
    )
    s = samples(m)  # parse() fails on a duplicate sample
    assert value(
        s, "aibridge_circuit_breaker_state", provider="openai", model="gpt-5", state="open"
    )
    assert len(label_sets(s, "aibridge_key_pool_parks_total")) == 1


def _raises() -> Any:
    raise RuntimeError("source is broken")


def _raises_midway() -> Iterator[Any]:
    yield CircuitGauge("openai", "gpt-5", "open", 1)
    yield KeyGauge("openai", 0, "h", "active", 0)
    raise OSError("source is broken halfway")


BROKEN_SOURCES: list[tuple[str, Callable[[], Any]]] = [
    ("recorder", _raises),
    ("recorder", lambda: RecorderGauge("many", 1, 0)),  # type: ignore[arg-type]
    ("recorder", lambda: 42),
    ("recorder", lambda: {"queue_rows": 1}),
    ("circuits", _raises),
    ("circuits", _raises_midway),
    ("circuits", lambda: None),
    ("circuits", lambda: [None]),
    ("circuits", lambda: [CircuitGauge("openai", "m", "open", None)]),  # type: ignore[arg-type]
    ("keys", _raises),
    ("keys", _raises_midway),
    ("keys", lambda: 7),
    ("keys", lambda: [KeyGauge("openai", "first", "h", "active", 0)]),  # type: ignore[arg-type]
    ("keys", lambda: [{"provider": "openai"}]),
]


@pytest.mark.parametrize(("source", "broken"), BROKEN_SOURCES)
def test_a_broken_source_costs_only_its_own_families(
    source: str, broken: Callable[[], Any]
) -> None:
    m = state_metrics(**{source: broken})
    m.started(CODEX)
    m.finished(CODEX, "completed", 1.0, {"input": 1}, 1, 0)
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        body, _ = m.exposition(accept)
        if accept:
            assert list(openmetrics_families(body.decode()))
            continue
        s = parse(body.decode())
        own = {"recorder": RECORDER, "circuits": CIRCUITS, "keys": KEYS}[source]
        assert not names(s) & own
        assert (RECORDER | CIRCUITS | KEYS) - own <= names(s)
        assert value(s, "aibridge_prompts_total", **exchange(CODEX)) == 1
        assert value(s, "aibridge_build_info", version="9.9") == 1


# --- parse_listen ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("9464", ("127.0.0.1", 9464)),
        ("  9464\n", ("127.0.0.1", 9464)),
        ("0", ("127.0.0.1", 0)),
        ("65535", ("127.0.0.1", 65535)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("10.1.2.3:80", ("10.1.2.3", 80)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:9464", ("::", 9464)),
        ("[fe80::1%eth0]:9464", ("fe80::1%eth0", 9464)),
        ("[2001:db8::42]:1", ("2001:db8::42", 1)),
        ("localhost:9464", ("localhost", 9464)),
        ("metrics.internal.example:9464", ("metrics.internal.example", 9464)),
        ("bridge-1:09464", ("bridge-1", 9464)),
    ],
)
def test_parse_listen_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (":9464", "0.0.0.0:9464"),
        (":9464", "127.0.0.1:9464"),
        ("", "127.0.0.1:9464"),
        ("   ", "127.0.0.1:9464"),
        ("127.0.0.1", "no port"),
        ("localhost", "no port"),
        ("127.0.0.1:", "port"),
        ("127.0.0.1:65536", "0 to 65535"),
        ("127.0.0.1:99999999999", "0 to 65535"),
        ("127.0.0.1:-1", "0 to 65535"),
        ("127.0.0.1:+80", "0 to 65535"),
        ("127.0.0.1:0x10", "0 to 65535"),
        ("127.0.0.1:80.0", "0 to 65535"),
        ("127.0.0.1: 80", "0 to 65535"),
        ("127.0.0.1:٩٤٦٤", "0 to 65535"),  # Arabic-Indic digits: int() takes them
        ("-1", "127.0.0.1:9464"),
        ("65536", "0 to 65535"),
        ("::1:9464", "[::1]:9464"),
        ("::1", "[::1]:9464"),
        ("[::1]", "[::1]:9464"),
        ("[::1]9464", "[::1]:9464"),
        ("[::1:9464", "[::1]:9464"),
        ("[127.0.0.1]:9464", "IPv6"),
        ("[not-an-ip]:9464", "IPv6"),
        ("[::1]:port", "0 to 65535"),
        ("256.1.1.1:9464", "IPv4"),
        ("1.2.3:9464", "IPv4"),
        ("*:9464", "no host name"),
        ("http://127.0.0.1:9464", "127.0.0.1:9464"),
        ("127.0.0.1:9464/metrics", "0 to 65535"),
        ("bad_host:9464", "no host name"),
        ("-leading:9464", "no host name"),
        ("a..b:9464", "no host name"),
        ("127.0.0.1 :9464", "no host name"),
        ("host name:9464", "no host name"),
    ],
)
def test_parse_listen_refuses(text: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_listen(text)
    message = str(caught.value)
    assert says in message
    assert "9464" in message  # every message shows a valid example


# --- the server -----------------------------------------------------------------------------


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.body = response.read()


def request(
    server: MetricsServer, method: str, path: str, headers: Mapping[str, str] | None = None
) -> Answer:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=dict(headers or {}))
        return Answer(conn.getresponse())
    finally:
        conn.close()


def healthy() -> tuple[int, Mapping[str, Any]]:
    return 200, {"status": "ok", "version": "1.0", "database": "ok", "queue_rows": 3}


@pytest.fixture
def running() -> Iterator[tuple[Metrics, MetricsServer]]:
    m = state_metrics()
    m.started(CODEX)
    m.finished(CODEX, "completed", 1.0, TOKENS, 1, 1)
    server = MetricsServer(m, healthy)
    server.start("127.0.0.1", 0)
    try:
        yield m, server
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/metrics", "/", "/metrics?name[]=x", "/?"])
def test_server_metrics(running: tuple[Metrics, MetricsServer], path: str) -> None:
    m, server = running
    host, port = server.address
    assert host == "127.0.0.1"
    assert port > 0
    answer = request(server, "GET", path)
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(answer.headers["content-length"]) == len(answer.body)
    assert "content-encoding" not in answer.headers
    s = parse(answer.body.decode())
    assert value(s, "aibridge_tokens_total", **exchange(CODEX), type="input") == 1200
    assert value(s, "aibridge_recorder_queue_rows") == 7
    # live: a later exchange shows in the next scrape
    m.rejected(CODEX, "budget")
    s = parse(request(server, "GET", path).body.decode())
    assert value(s, "aibridge_interceptions_total", **exchange(CODEX), status="rejected") == 1


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        "application/openmetrics-text",
    ],
)
def test_server_openmetrics(running: tuple[Metrics, MetricsServer], accept: str) -> None:
    answer = request(running[1], "GET", "/metrics", {"Accept": accept})
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    text = answer.body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    assert families["aibridge_interceptions"].type == "counter"
    assert families["aibridge_recorder_losses"].samples[0].value == 2


@pytest.mark.parametrize("encoding", ["gzip", "gzip, deflate, br", "br;q=1.0, GZIP;q=0.5"])
def test_server_gzip_when_accepted(running: tuple[Metrics, MetricsServer], encoding: str) -> None:
    answer = request(running[1], "GET", "/metrics", {"Accept-Encoding": encoding})
    assert answer.status == 200
    assert answer.headers["content-encoding"] == "gzip"
    assert int(answer.headers["content-length"]) == len(answer.body)
    s = parse(gzip.decompress(answer.body).decode())
    assert value(s, "aibridge_recorder_rows_written_total") == 1234


@pytest.mark.parametrize("encoding", ["identity", "deflate, br", "gzipx", ""])
def test_server_plain_when_gzip_not_accepted(
    running: tuple[Metrics, MetricsServer], encoding: str
) -> None:
    answer = request(running[1], "GET", "/metrics", {"Accept-Encoding": encoding})
    assert "content-encoding" not in answer.headers
    assert b"aibridge_build_info" in answer.body


def test_server_head_is_get_without_a_body(running: tuple[Metrics, MetricsServer]) -> None:
    server = running[1]
    for path in ("/metrics", "/", "/_aibridge/health", "/nowhere"):
        get, head = request(server, "GET", path), request(server, "HEAD", path)
        assert head.status == get.status
        assert head.body == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        assert int(head.headers["content-length"]) > 0


def test_server_health(running: tuple[Metrics, MetricsServer]) -> None:
    answer = request(running[1], "GET", "/_aibridge/health")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    assert orjson.loads(answer.body) == {
        "status": "ok",
        "version": "1.0",
        "database": "ok",
        "queue_rows": 3,
    }


def serve(health: Callable[[], Any]) -> MetricsServer:
    server = MetricsServer(Metrics(), health)
    server.start("127.0.0.1", 0)
    return server


@pytest.mark.parametrize(
    ("status", "document"),
    [(503, {"status": "degraded", "database": "locked"}), (200, {}), (299, {"a": [1, None]})],
)
def test_server_health_status_and_document_from_the_callable(
    status: int, document: dict[str, Any]
) -> None:
    server = serve(lambda: (status, document))
    try:
        answer = request(server, "GET", "/_aibridge/health?probe=lb")
        assert answer.status == status
        assert orjson.loads(answer.body) == document
    finally:
        server.stop()


def _health_raises() -> tuple[int, Mapping[str, Any]]:
    raise RuntimeError("database is locked")


BROKEN_HEALTH: list[Callable[[], Any]] = [
    _health_raises,
    lambda: 1 / 0,
    lambda: (200, {"x": object()}),  # not JSON
    lambda: ("200", {}),  # no HTTP status
    lambda: (42, {}),
    lambda: (600, {}),
    lambda: (True, {}),
    lambda: None,
    lambda: (200,),
    lambda: (200, {"nan": float("nan"), "big": 2**70}),  # orjson refuses integers past 64 bits
]


@pytest.mark.parametrize("health", BROKEN_HEALTH)
def test_server_broken_health_is_a_json_500(
    health: Callable[[], Any], capfd: pytest.CaptureFixture[str]
) -> None:
    server = serve(health)
    try:
        answer = request(server, "GET", "/_aibridge/health")
        assert answer.status == 500
        assert answer.headers["content-type"] == "application/json"
        document = orjson.loads(answer.body)
        assert document["status"] == "error"
        assert document["error"].startswith("health check failed: ")
        # the server is still up
        assert request(server, "GET", "/metrics").status == 200
    finally:
        server.stop()
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    "path",
    ["/metrics/", "/METRICS", "/health", "/_aibridge/health/x", "/_aibridge", "*"],
)
def test_server_404(running: tuple[Metrics, MetricsServer], path: str) -> None:
    answer = request(running[1], "GET", path)
    assert answer.status == 404
    assert b"aibridge_" not in answer.body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
@pytest.mark.parametrize("path", ["/metrics", "/_aibridge/health", "/nowhere"])
def test_server_405(running: tuple[Metrics, MetricsServer], method: str, path: str) -> None:
    answer = request(running[1], method, path)
    assert answer.status == 405
    assert answer.headers["allow"] == "GET, HEAD"


def test_server_is_silent(capfd: pytest.CaptureFixture[str]) -> None:
    server = serve(_health_raises)
    try:
        for method, path in (("GET", "/metrics"), ("GET", "/x"), ("POST", "/"), ("HEAD", "/")):
            request(server, method, path)
        request(server, "GET", "/_aibridge/health")
        host, port = server.address
        # garbage, a truncated request, a client that hangs up before reading the answer
        for raw in (
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
            b"GET /metr",
            b"GET / HTTP/1.1\r\n\r\n",
        ):
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
        assert request(server, "GET", "/metrics").status == 200
    finally:
        server.stop()
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""


def test_stop_frees_the_port_and_is_idempotent() -> None:
    m = Metrics()
    server = MetricsServer(m, healthy)
    server.start("127.0.0.1", 0)
    port = server.address[1]
    assert request(server, "GET", "/metrics").status == 200
    server.stop()
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # the same object, then another one, on the same port
    server.start("127.0.0.1", port)
    assert server.address == ("127.0.0.1", port)
    assert request(server, "GET", "/_aibridge/health").status == 200
    server.stop()
    other = MetricsServer(m, healthy)
    other.start("127.0.0.1", port)
    try:
        assert request(other, "GET", "/metrics").status == 200
    finally:
        other.stop()
    with pytest.raises(RuntimeError):
        _ = other.address


def test_stop_does_not_wait_for_an_idle_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # No read timeout: a stop() that waited for the idle connection's thread would never return.
    monkeypatch.setattr(metrics_module._Handler, "timeout", None)
    server = serve(healthy)
    host, port = server.address
    idle = socket.create_connection((host, port), timeout=10)  # connects, says nothing
    try:
        assert request(server, "GET", "/metrics").status == 200  # while the idle one holds a thread
        stopping = threading.Thread(target=server.stop, daemon=True)
        stopping.start()
        stopping.join(60)
        assert not stopping.is_alive(), "stop() waits for a client that sends nothing"
        rebound = MetricsServer(Metrics(), healthy)
        rebound.start(host, port)
        rebound.stop()
    finally:
        idle.close()


def test_port_in_use_raises_oserror() -> None:
    first = serve(healthy)
    try:
        second = MetricsServer(Metrics(), healthy)
        with pytest.raises(OSError, match="in use"):
            second.start("127.0.0.1", first.address[1])
        with pytest.raises(RuntimeError):
            _ = second.address
        second.stop()  # nothing to stop
        with pytest.raises(RuntimeError, match="already running"):
            first.start("127.0.0.1", 0)
        assert request(first, "GET", "/metrics").status == 200
    finally:
        first.stop()


def test_unknown_host_raises_oserror() -> None:
    server = MetricsServer(Metrics(), healthy)
    with pytest.raises(OSError):
        server.start("no-such-host.invalid", 0)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_server_on_ipv6_loopback() -> None:
    server = MetricsServer(Metrics(), healthy)
    server.start(*parse_listen("[::1]:0"))
    try:
        assert server.address[0] == "::1"
        assert request(server, "GET", "/metrics").status == 200
    finally:
        server.stop()


def test_two_servers_two_metrics_in_one_process() -> None:
    first, second = Metrics(version="one"), Metrics(version="two")
    first.refused("openai", "responses", "unknown_token")
    a, b = MetricsServer(first, healthy), MetricsServer(second, lambda: (503, {"s": "down"}))
    a.start("127.0.0.1", 0)
    b.start("127.0.0.1", 0)
    try:
        sa = parse(request(a, "GET", "/metrics").body.decode())
        sb = parse(request(b, "GET", "/metrics").body.decode())
        assert value(sa, "aibridge_build_info", version="one") == 1
        assert value(sb, "aibridge_build_info", version="two") == 1
        assert label_sets(sa, "aibridge_rejections_total")
        assert not label_sets(sb, "aibridge_rejections_total")
        assert request(b, "GET", "/_aibridge/health").status == 503
        assert request(a, "GET", "/_aibridge/health").status == 200
    finally:
        a.stop()
        b.stop()
