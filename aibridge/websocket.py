"""The Responses API over WebSocket (Codex's first choice of transport).

One socket carries many responses: each client ``response.create`` message is a request
(validated like a POST body, one interception each) and the server's messages are the same
events an SSE stream carries, one JSON object per message. Responses on one socket are
answered in order, so server events belong to the oldest response still open.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aibridge.auth import Identity
from aibridge.config import Provider
from aibridge.extract import WANTED_EVENTS

CREATE = "response.create"
# The event type sits at the start of nearly every server message; reading it there lets the
# bridge skip decoding the thousands of text deltas a response carries.
_TYPE_AT_START = re.compile(rb'\s*\{\s*"type"\s*:\s*"([^"\\]{1,100})"')


@dataclass(slots=True)
class SocketState:
    """What the bridge keeps about one bridged WebSocket."""

    provider: Provider
    identity: Identity
    open_turns: deque[Any] = field(default_factory=deque)  # Exchanges, oldest first


def is_create(content: bytes) -> bool:
    match = _TYPE_AT_START.match(content)
    if match is not None:
        return match.group(1) == CREATE.encode()
    return b'"response.create"' in content


def worth_decoding(content: bytes) -> bool:
    """False only for server events the records never need (deltas and the like)."""
    match = _TYPE_AT_START.match(content)
    return match is None or match.group(1).decode() in WANTED_EVENTS
