"""Keeping secrets out of what mitmweb shows while a request is on its way.

mitmweb's view pushes a flow to every connected browser after each hook, and it runs after
script addons: it would show the client's token after ``requestheaders`` and the provider
key after ``request``, before the bridge masks them (once the response starts). So, while
mitmweb runs, secret header values are swapped for their hints before the view looks, and
``_RevealForUpstream``, added as the last addon of the chain, puts them back before mitmproxy
sends the request. In mitmdump there is no view, and none of this runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from mitmproxy import http

from aibridge import auth


class ViewConcealment:
    def __init__(self) -> None:
        self._until_sent: dict[str, auth.Concealed] = {}  # revealed by the request hook
        self._until_shown: dict[str, auth.Concealed] = {}  # revealed by the update hook
        self._revealer: _RevealForUpstream | None = None

    @property
    def active(self) -> bool:
        return self._revealer is not None

    def start(self, master: Any) -> None:
        """In ``running``: only then is the view in the chain, so the revealer goes after it."""
        if self._revealer is None and master.addons.get("view") is not None:
            self._revealer = _RevealForUpstream(self._until_sent, self._until_shown)
            master.addons.add(self._revealer)

    def stop(self, master: Any) -> None:
        if self._revealer is not None:
            with contextlib.suppress(Exception):
                master.addons.remove(self._revealer)
            self._revealer = None
        self._until_sent.clear()
        self._until_shown.clear()

    def conceal_until_sent(self, flow: http.HTTPFlow, names: Iterable[str]) -> None:
        """Hide these headers from the view until the request hooks have all run."""
        if self.active:
            self._until_sent[flow.id] = auth.conceal(flow.request.headers, names)

    def conceal_while_shown(self, flow: http.HTTPFlow, names: Iterable[str]) -> None:
        """Hide these headers from the view for one ``update`` (a user acted on the flow)."""
        if self.active and flow.id not in self._until_sent:
            self._until_shown[flow.id] = auth.conceal(flow.request.headers, names)

    def reveal(self, flow: http.HTTPFlow) -> None:
        """Now, instead of after the view: the bridge needs the real values itself."""
        if fields := self._until_sent.pop(flow.id, None):
            auth.reveal(flow.request.headers, fields)

    def forget(self, flow: http.HTTPFlow) -> None:
        """The values were replaced for good (masked) or the flow failed."""
        self._until_sent.pop(flow.id, None)
        self._until_shown.pop(flow.id, None)


class _RevealForUpstream:
    """The last addon in mitmweb's chain: puts back what was concealed from the view."""

    def __init__(
        self, until_sent: dict[str, auth.Concealed], until_shown: dict[str, auth.Concealed]
    ) -> None:
        self._until_sent = until_sent
        self._until_shown = until_shown

    def request(self, flow: http.HTTPFlow) -> None:
        self._reveal(flow, self._until_sent)

    def update(self, flows: list[Any]) -> None:
        for flow in flows:
            self._reveal(flow, self._until_shown)

    @staticmethod
    def _reveal(flow: Any, concealed: dict[str, auth.Concealed]) -> None:
        fields = concealed.pop(getattr(flow, "id", ""), None)
        if fields and isinstance(flow, http.HTTPFlow):
            auth.reveal(flow.request.headers, fields)
