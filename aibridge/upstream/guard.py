"""The check a request passes on its way to a provider, and the bookkeeping of its answer.

Before a request leaves: the circuit of its provider and model must let it through
(``breaker``), and a bridged key is taken from the provider's pool (``key_pool``). After the
answer: the status goes back to both. A refusal is answered by the bridge in the API's error
shape, like a budget's (``governance.governor.Refusal``), and recorded as rejected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aibridge.config import Provider
from aibridge.governance.governor import Refusal
from aibridge.upstream.breaker import (
    BreakerSettings,
    CircuitBreakers,
    CircuitOpen,
    CircuitSnapshot,
    CircuitState,
    Pass,
    Transition,
)
from aibridge.upstream.key_pool import (
    AllParked,
    KeyChoice,
    KeyEvent,
    KeyPool,
    KeySnapshot,
    PoolSettings,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a request was given on its way upstream; ``UpstreamGuard.settle`` takes it back."""

    provider: str
    circuit: Pass | None = None
    key: KeyChoice | None = None


NO_TICKET = Ticket("")


class UpstreamGuard:
    """Circuits per provider and model and key pools per provider, for one configuration."""

    def __init__(
        self,
        providers: Iterable[Provider],
        breaker: BreakerSettings,
        pool: PoolSettings,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.circuits = CircuitBreakers(breaker, clock)
        # A pool for every provider with several keys. A single key is never parked: with
        # nothing to switch to, upstream's own 429 (often for one model only, as OpenAI's
        # limits are per model) says more than the bridge refusing every model would.
        self.pools = {
            p.name: KeyPool(p.name, p.api_keys, pool, clock, wall_clock)
            for p in providers
            if len(p.api_keys) > 1
        }
        self._kept_last_logged: set[tuple[str, int]] = set()

    def admit(self, provider: Provider, model: str | None, pooled: bool) -> Ticket | Refusal:
        """``model``: None for requests that are no model call (passthrough), which no circuit
        guards. ``pooled``: the bridge's own key goes upstream (not a user's)."""
        circuit: Pass | None = None
        if model is not None:
            verdict = self.circuits.admit(provider.name, model)
            if isinstance(verdict, CircuitOpen):
                return _circuit_refusal(verdict)
            circuit = verdict
        key: KeyChoice | None = None
        pool = self.pools.get(provider.name) if pooled else None
        if pool is not None:
            choice = pool.choose()
            if isinstance(choice, AllParked):
                if circuit is not None:
                    self.circuits.settle(circuit, None)  # the trial never left
                return _parked_refusal(choice)
            key = choice
        if circuit is None and key is None:
            return NO_TICKET
        return Ticket(provider.name, circuit, key)

    def settle(
        self,
        ticket: Ticket,
        status: int | None,
        headers: Mapping[str, str] | None = None,
        *,
        unreachable: bool = False,
    ) -> None:
        """The answer to a ticket's request: its status (None: no answer from upstream;
        ``unreachable``: the bridge could not reach it)."""
        if ticket.circuit is not None:
            transition = self.circuits.settle(ticket.circuit, status, unreachable=unreachable)
            if transition is not None:
                _log_transition(transition, self.circuits)
        pool = self.pools.get(ticket.provider) if ticket.key is not None else None
        if pool is not None and ticket.key is not None and status is not None:
            event = pool.answered(ticket.key, status, headers or {})
            if event is not None and self._worth_logging(event):
                _log_key_event(event)

    def _worth_logging(self, event: KeyEvent) -> bool:
        """The last key in use is reported once, not at every answer it gets."""
        key = (event.provider, event.index)
        if event.kind != "kept_last":
            self._kept_last_logged.discard(key)
            return True
        if key in self._kept_last_logged:
            return False
        self._kept_last_logged.add(key)
        return True

    def circuit_snapshot(self) -> list[CircuitSnapshot]:
        return self.circuits.snapshot()

    def key_snapshot(self) -> list[KeySnapshot]:
        return [key for pool in list(self.pools.values()) for key in pool.snapshot()]

    def health(self) -> dict[str, Any]:
        """Per provider: its circuits that are not closed and the state of its keys."""
        report: dict[str, dict[str, Any]] = {}
        for circuit in self.circuit_snapshot():
            if circuit.state is not CircuitState.CLOSED:
                entry = report.setdefault(circuit.provider, {})
                entry.setdefault("circuits", {})[circuit.model] = {
                    "state": circuit.state.value,
                    "retry_after": circuit.retry_after,
                }
        for key in self.key_snapshot():
            keys = report.setdefault(key.provider, {}).setdefault("keys", {})
            keys[key.state.value] = keys.get(key.state.value, 0) + 1
        return report


def _circuit_refusal(open_: CircuitOpen) -> Refusal:
    model = open_.model or "(no model)"
    if open_.state is CircuitState.HALF_OPEN:
        why = "a trial request is checking whether it recovered"
    elif open_.last_status is None:
        why = f"the bridge could not reach it for the last {open_.failures} requests"
    else:
        why = f"it answered {open_.last_status} to the last {open_.failures} requests"
    message = (
        f"AI Bridge: provider {open_.provider!r} is failing for model {model}: {why}, so the "
        f"bridge pauses requests for it (circuit breaker); retry in {open_.retry_after} s"
    )
    detail = {
        "refused_by": "circuit_breaker",
        "provider": open_.provider,
        "model": open_.model,
        "state": open_.state.value,
        "failures": open_.failures,
        "last_status": open_.last_status,
        "retry_after": open_.retry_after,
    }
    return Refusal(503, message, {"retry-after": str(open_.retry_after)}, detail)


def _parked_refusal(parked: AllParked) -> Refusal:
    keys = "its key is" if parked.parked == 1 else f"all {parked.parked} of its keys are"
    message = (
        f"AI Bridge: provider {parked.provider!r} is rate-limiting this bridge ({keys} "
        f"answered 429); retry in {parked.retry_after} s"
    )
    detail = {
        "refused_by": "key_pool",
        "provider": parked.provider,
        "parked_keys": parked.parked,
        "retry_after": parked.retry_after,
    }
    return Refusal(429, message, {"retry-after": str(parked.retry_after)}, detail)


def _log_transition(change: Transition, circuits: CircuitBreakers) -> None:
    where = f"provider {change.provider!r}, model {change.model or '(none)'}"
    seconds = circuits.settings.cool_down_seconds
    if change.new is CircuitState.OPEN:
        answered = change.last_status if change.last_status is not None else "unreachable"
        again = " again: the trial request failed" if change.old is CircuitState.HALF_OPEN else ""
        log.warning(
            f"AI Bridge: circuit opened{again} for {where} after {change.failures} failed "
            f"answer(s) (last: {answered}); its requests are refused with 503 for {seconds:g} s"
        )
    elif change.new is CircuitState.CLOSED:
        log.info(f"AI Bridge: circuit closed for {where}: the trial request succeeded")


def _log_key_event(event: KeyEvent) -> None:
    key = f"key {event.index + 1} ({event.hint}) of provider {event.provider!r}"
    if event.kind == "parked":
        log.warning(
            f"AI Bridge: {key} answered 429: parked for {event.seconds or 0:.0f} s, the other "
            "keys take its requests"
        )
    elif event.kind == "disabled":
        log.error(
            f"AI Bridge: {key} answered {event.status}: disabled until the bridge restarts; "
            "replace or remove it in the configuration"
        )
    else:
        log.error(
            f"AI Bridge: {key} answered {event.status}, and it is the last key in use, so it "
            "stays in use; fix the provider's api_key in the configuration"
        )
