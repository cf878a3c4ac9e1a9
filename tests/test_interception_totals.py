"""Migration m007: each interception carries the sums of its usage (total_tokens,
estimated_cost_usd) and the address of the mitmweb that showed it (mitmweb_url).

The bridge fills them as an exchange ends; the migration fills them from the usage rows of an
older log; ``python -m aibridge.cost`` keeps the cost in step when it prices rows afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.tools.web.webaddons import WebAddon

from aibridge import cost
from aibridge.bridge import METADATA_KEY, AIBridge, mitmweb_url
from aibridge.config import PriceOverride, Pricing
from aibridge.record import address as addresses
from aibridge.record import schema
from aibridge.record.recorder import Recorder
from tests.log_engines import engine, read
from tests.test_bridge import (
    Bridge,
    bridged,
    fixture,
    make_bridge,
    make_flow,
    query,
    write_config,
)

__all__ = ["engine", "make_bridge"]  # fixtures used by name


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 8081, "http://127.0.0.1:8081"),
        ("", 8081, "http://127.0.0.1:8081"),
        ("0.0.0.0", 9000, "http://127.0.0.1:9000"),
        ("::", 9000, "http://127.0.0.1:9000"),
        ("::1", 8081, "http://[::1]:8081"),
        ("bridge.internal", 443, "http://bridge.internal:443"),
    ],
)
def test_mitmweb_url(host: str, port: int, url: str) -> None:
    assert mitmweb_url(host, port) == url


def answered(bridge: Bridge, name: str) -> dict[str, Any]:
    flow = bridged(bridge, name)
    flow.response = http.Response.make(
        200, fixture(name, "response.json"), {"content-type": "application/json"}
    )
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)
    return bridge.interception(flow)


def test_an_exchange_carries_its_usage_sums(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge()
    row = answered(bridge, "cached_tokens_buffered")  # gpt-5: priced by genai-prices
    (usage,) = bridge.children("token_usages", row["id"])
    assert row["total_tokens"] == usage["total_tokens"] == 2306
    assert usage["estimated_cost_usd"] > 0
    assert row["estimated_cost_usd"] == usage["estimated_cost_usd"]
    assert row["mitmweb_url"] is None  # no mitmweb: nothing to link to

    # An answer without usage (an API error) leaves both empty, not 0.
    flow = bridged(bridge, "api_error_buffered")
    flow.response = http.Response.make(
        400, fixture("api_error_buffered", "response.json"), {"content-type": "application/json"}
    )
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)
    failed = bridge.interception(flow)
    assert (failed["total_tokens"], failed["estimated_cost_usd"]) == (None, None)


def test_an_own_key_byok_is_summed_the_same_way(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(byok=True)
    flow = make_flow(
        fixture("cached_tokens_buffered", "request.json"), token="sk-own-key-0123456789"
    )
    bridge.addon.request(flow)
    assert flow.response is None
    flow.response = http.Response.make(
        200,
        fixture("cached_tokens_buffered", "response.json"),
        {"content-type": "application/json"},
    )
    bridge.addon.responseheaders(flow)
    bridge.addon.response(flow)
    row = bridge.interception(flow)
    assert row["total_tokens"] == 2306
    (usage,) = bridge.children("token_usages", row["id"])
    assert row["estimated_cost_usd"] == usage["estimated_cost_usd"]


@pytest.mark.parametrize(("host", "port"), [("127.0.0.1", 8081), ("0.0.0.0", 18081)])
def test_under_mitmweb_each_interception_names_its_ui(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, host: str, port: int
) -> None:
    from mitmproxy.test import taddons

    monkeypatch.chdir(tmp_path)
    addon = AIBridge(default_config_dir=tmp_path)
    with taddons.context(WebAddon(), addon) as tctx:
        tctx.configure(addon, aibridge_config=str(write_config(tmp_path)), web_host=host)
        tctx.options.update(web_port=port)
        bridge = Bridge(addon, tctx, tmp_path / "audit.db")
        row = answered(bridge, "text_buffered")
        refused = make_flow(b"{}", token="not-a-bridge-token-000")
        addon.request(refused)
        assert refused.response is not None and refused.response.status_code == 401
        bridge.flush()
        rejected = query(bridge.db_path, "select * from interceptions where status = 'rejected'")
        addon.done()
    want = mitmweb_url(host, port)
    assert row["mitmweb_url"] == want
    assert [r["mitmweb_url"] for r in rejected] == [want]
    assert row["flow_id"]  # with it, the flow is at {mitmweb_url}/#/flows/{flow_id}/request


def old_log(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log of the version before m007: three interceptions, two with usage (one priced)."""
    m007 = schema.MIGRATIONS.index(schema.m007_interception_totals)
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:m007])
        patch.setattr(schema, "SCHEMA_VERSION", m007)
        rec = Recorder(address)
        rec.start()
        for iid, model in (("i-priced", "mine"), ("i-unpriced", "unknown"), ("i-none", "mine")):
            rec.upsert(
                "interceptions",
                {
                    "id": iid,
                    "started_at": "2026-11-30T10:00:00.000Z",
                    "model": model,
                    "status": "completed",
                    "provider": "openai",
                    "credential_kind": "bridge",
                },
            )
        rec.insert(
            "token_usages",
            {
                "interception_id": "i-priced",
                "input_tokens": 1000,
                "output_tokens": 500,
                "total_tokens": 1500,
                "estimated_cost_usd": 0.002,
                "created_at": "2026-11-30T10:00:01.000Z",
            },
        )
        rec.insert(
            "token_usages",
            {
                "interception_id": "i-unpriced",
                "input_tokens": 10,
                "output_tokens": 5,
                "total_tokens": 15,
                "created_at": "2026-11-30T10:00:01.000Z",
            },
        )
        rec.close()


def totals(address: str) -> dict[str, tuple[Any, Any]]:
    rows = read(address, "select id, total_tokens, estimated_cost_usd from interceptions")
    return {r["id"]: (r["total_tokens"], r["estimated_cost_usd"]) for r in rows}


def test_the_migration_fills_the_sums_of_an_older_log(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_log(engine, monkeypatch)
    columns = read(engine, "select * from interceptions where id = 'i-none'")[0]
    assert "total_tokens" not in columns
    rec = Recorder(engine)
    rec.start()
    rec.close()
    assert totals(engine) == {
        "i-priced": (1500, 0.002),
        "i-unpriced": (15, None),
        "i-none": (None, None),
    }

    # Pricing the unpriced row afterwards puts its cost on the interception too.
    book = cost.PriceBook(
        Pricing((PriceOverride("unknown", Decimal("1"), Decimal("2")),)), catalog=False
    )
    report = cost.backfill(engine, book)
    assert (report.examined, report.priced) == (1, 1)
    assert totals(engine)["i-unpriced"] == (15, pytest.approx(0.00002))
    # Recomputing every row at new rates moves every interception's sum with it.
    book = cost.PriceBook(
        Pricing(
            (
                PriceOverride("mine", Decimal("10"), Decimal("20")),
                PriceOverride("unknown", Decimal("1"), Decimal("2")),
            )
        ),
        catalog=False,
    )
    cost.backfill(engine, book, recompute=True)
    assert totals(engine) == {
        "i-priced": (1500, pytest.approx(0.02)),  # 1000 x 10 + 500 x 20 per million
        "i-unpriced": (15, pytest.approx(0.00002)),
        "i-none": (None, None),
    }
    if addresses.is_postgres(engine):
        kinds = read(
            engine,
            "select column_name, data_type from information_schema.columns "
            "where table_name = 'interceptions' and column_name in "
            "('total_tokens', 'estimated_cost_usd', 'mitmweb_url') order by column_name",
        )
        assert [(k["column_name"], k["data_type"]) for k in kinds] == [
            ("estimated_cost_usd", "double precision"),
            ("mitmweb_url", "text"),
            ("total_tokens", "bigint"),
        ]


def test_the_flow_noted_keeps_its_interception_id(make_bridge: Callable[..., Bridge]) -> None:
    # The link from a row to mitmweb uses flow_id; the flow knows its interception.
    bridge = make_bridge()
    flow = bridged(bridge, "text_buffered")
    bridge.flush()
    (row,) = bridge.interceptions(flow)
    assert flow.metadata[METADATA_KEY]["interception_id"] == row["id"]
    assert row["flow_id"] == flow.id
