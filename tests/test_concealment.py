"""Client tokens concealed from mitmweb's view until the bridge reads them
(aibridge.concealment)."""

from __future__ import annotations

from typing import Any

from mitmproxy.test import tflow

from aibridge.auth import CLIENT_CREDENTIAL_HEADERS
from aibridge.concealment import ViewConcealment

TOKEN = "alice-token-0123456789"


class Master:
    def __init__(self, view: bool) -> None:
        self.addons = self
        self._view = view

    def get(self, name: str) -> Any:
        return object() if name == "view" and self._view else None


def flow_with_token() -> Any:
    flow = tflow.tflow()
    flow.request.headers["authorization"] = f"Bearer {TOKEN}"
    flow.request.headers["x-api-key"] = TOKEN
    return flow


def test_without_mitmweb_nothing_is_touched() -> None:
    concealment = ViewConcealment()
    concealment.start(Master(view=False))
    flow = flow_with_token()
    concealment.conceal(flow, CLIENT_CREDENTIAL_HEADERS)
    assert not concealment.active
    assert flow.request.headers["authorization"] == f"Bearer {TOKEN}"


def test_the_view_sees_hints_until_the_bridge_reads_the_token() -> None:
    concealment = ViewConcealment()
    concealment.start(Master(view=True))
    flow = flow_with_token()
    concealment.conceal(flow, CLIENT_CREDENTIAL_HEADERS)  # requestheaders
    assert TOKEN not in str(flow.request.headers)  # what the view pushes
    concealment.reveal(flow)  # the start of the bridge's request hook
    assert flow.request.headers["authorization"] == f"Bearer {TOKEN}"
    assert flow.request.headers["x-api-key"] == TOKEN
    concealment.reveal(flow)  # once only
    assert flow.request.headers["x-api-key"] == TOKEN

    other = flow_with_token()
    concealment.conceal(other, CLIENT_CREDENTIAL_HEADERS)
    concealment.forget(other)  # the flow failed before its request hook
    concealment.reveal(other)
    assert TOKEN not in str(other.request.headers)
    concealment.stop()
    assert not concealment.active
