"""``GET /_aibridge/health``: whether this bridge can take traffic, for load balancers.

200 while it can: ``ok``, or ``degraded`` when it answers but something needs a look (the
database refuses writes and rows wait in the queue, a provider's circuit is open, a key is
parked or disabled). 503 when it cannot: no working configuration (every request is refused)
or no writer (nothing would be recorded). The body holds no secret and no path: hints at
most, and the bridge's log says the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

HEALTH_PATH: Final = "/_aibridge/health"


def health_report(
    *,
    version: str,
    configured: bool,
    database: Mapping[str, Any] | None,
    providers: Mapping[str, Any],
) -> tuple[int, dict[str, Any]]:
    """The status code and JSON body. ``database``: ``Recorder.health``; ``providers``:
    ``UpstreamGuard.health()`` (only what is not fine)."""
    problems: list[str] = []
    failing = False
    if not configured:
        failing = True
        problems.append("no working configuration: every request is refused (see the log)")
    db_state = database.get("state") if database is not None else "stopped"
    if db_state == "stopped":
        failing = True
        problems.append("the audit database has no writer: nothing is recorded")
    elif db_state == "retrying":
        problems.append("the audit database refuses writes: rows wait in the queue")
    for name, state in sorted(providers.items()):
        for model, circuit in sorted((state.get("circuits") or {}).items()):
            problems.append(f"provider {name}: circuit {circuit.get('state')} for {model}")
        keys = state.get("keys") or {}
        for kind in ("parked", "disabled"):
            if keys.get(kind):
                problems.append(f"provider {name}: {keys[kind]} key(s) {kind}")
    status = "failing" if failing else "degraded" if problems else "ok"
    body: dict[str, Any] = {
        "status": status,
        "version": version,
        "configured": configured,
        "database": dict(database) if database is not None else {"state": "stopped"},
        "providers": dict(providers),
    }
    if problems:
        body["problems"] = problems
    return (503 if failing else 200), body
