"""Keeping client tokens out of what mitmweb shows before the bridge has read them.

mitmweb's view pushes a flow to every connected browser after each hook. After
``requestheaders`` (which runs while the body may still be arriving) the flow still carries
the client's token: the bridge reads it only in ``request``. So, while mitmweb runs, those
header values are swapped for their hints in ``requestheaders`` and put back at the start of
the bridge's ``request``. In mitmdump there is no view, and none of this runs.

The provider key needs no such care: it is in the flow only for the instant the request
head is sent (``mitm_compat.before_send``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mitmproxy import http

from aibridge import auth


class ViewConcealment:
    def __init__(self) -> None:
        self.active = False
        self._concealed: dict[str, auth.Concealed] = {}

    def start(self, master: Any) -> None:
        """In ``running``, when mitmweb's view, if any, is loaded."""
        self.active = master.addons.get("view") is not None

    def stop(self) -> None:
        self.active = False
        self._concealed.clear()

    def conceal(self, flow: http.HTTPFlow, names: Iterable[str]) -> None:
        if self.active:
            self._concealed[flow.id] = auth.conceal(flow.request.headers, names)

    def reveal(self, flow: http.HTTPFlow) -> None:
        if fields := self._concealed.pop(flow.id, None):
            auth.reveal(flow.request.headers, fields)

    def forget(self, flow: http.HTTPFlow) -> None:
        """The flow failed before its request hook."""
        self._concealed.pop(flow.id, None)
