"""Secrets concealed from mitmweb's view while a request is on its way (aibridge.concealment)."""

from __future__ import annotations

from typing import Any

from mitmproxy.test import tflow

from aibridge.auth import CLIENT_CREDENTIAL_HEADERS
from aibridge.concealment import ViewConcealment

TOKEN = "alice-token-0123456789"
KEY = "sk-proj-provider-key-0123456789"


class Addons:
    def __init__(self, view: bool) -> None:
        self.chain: list[Any] = ["view"] if view else []

    def get(self, name: str) -> Any:
        return name if name in self.chain else None

    def add(self, addon: Any) -> None:
        self.chain.append(addon)

    def remove(self, addon: Any) -> None:
        self.chain.remove(addon)


class Master:
    def __init__(self, view: bool) -> None:
        self.addons = Addons(view)


def test_without_mitmweb_nothing_is_touched() -> None:
    concealment, master = ViewConcealment(), Master(view=False)
    concealment.start(master)
    flow = tflow.tflow()
    flow.request.headers["authorization"] = f"Bearer {TOKEN}"
    concealment.conceal_until_sent(flow, CLIENT_CREDENTIAL_HEADERS)
    assert not concealment.active and master.addons.chain == []
    assert flow.request.headers["authorization"] == f"Bearer {TOKEN}"


def test_the_view_sees_hints_and_upstream_gets_the_real_values() -> None:
    concealment, master = ViewConcealment(), Master(view=True)
    concealment.start(master)
    view, revealer = master.addons.chain  # the revealer comes after the view
    flow = tflow.tflow()
    flow.request.headers["authorization"] = f"Bearer {TOKEN}"

    # requestheaders: the view must not see the client's token...
    concealment.conceal_until_sent(flow, CLIENT_CREDENTIAL_HEADERS)
    assert TOKEN not in str(flow.request.headers)
    # ...but the bridge's request hook reads it, swaps in the key, hides that in turn.
    concealment.reveal(flow)
    assert flow.request.headers["authorization"] == f"Bearer {TOKEN}"
    flow.request.headers["authorization"] = f"Bearer {KEY}"
    concealment.conceal_until_sent(flow, ["authorization"])
    assert KEY not in str(flow.request.headers)  # what the view pushes
    revealer.request(flow)  # the last request hook: what goes upstream
    assert flow.request.headers["authorization"] == f"Bearer {KEY}"

    # A user acts on the flow in flight: hidden for that update only.
    concealment.conceal_while_shown(flow, ["authorization"])
    assert KEY not in str(flow.request.headers)
    revealer.update([flow])
    assert flow.request.headers["authorization"] == f"Bearer {KEY}"

    concealment.stop(master)
    assert master.addons.chain == [view] and not concealment.active
