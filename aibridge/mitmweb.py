"""AI Bridge in mitmweb: a flow list that tells flows apart.

- :class:`MitmwebDefaults` (an addon) makes the ``comment`` column, where the bridge writes
  who sent a flow, which model answered and what it cost, one of mitmweb's default columns.
  It changes the default of mitmweb's ``web_columns`` option, not its value, so columns
  chosen by the user (``--set web_columns=…``, mitmproxy's config.yaml, the options editor)
  always win, and resetting the option brings back the column. Under mitmdump, which has no
  such option, it does nothing.
- :func:`note_turn` keeps a bridged WebSocket's comment current: one socket carries many
  turns (Codex), so its comment counts them and sums their tokens and cost
  (:func:`socket_comment`), from a tally kept in the flow's metadata (saved with it, ``-w``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from mitmproxy import http, optmanager

COLUMN: Final = "comment"
OPTION: Final = "web_columns"
# The tally of a WebSocket's turns, in flow.metadata (contentview.SOCKET_METADATA_KEY).
SOCKET_KEY: Final = "aibridge_socket"
ERROR_LIMIT: Final = 160  # characters of a turn's error in the one-line comment


class MitmwebDefaults:
    """Addon: under mitmweb the flow list shows the comment column, unless the user chose
    the columns."""

    def load(self, loader: Any) -> None:
        show_comment_column(loader.master.options)


def show_comment_column(options: optmanager.OptManager) -> bool:
    """Add the comment column to the default of ``web_columns``; True if it was added.

    Left alone: an option the user set (any value, even mitmweb's default: an explicit
    choice is kept), a default that shows comments already, and masters without the option.
    """
    option = dict(options.items()).get(OPTION)
    if option is None or option.value is not optmanager.unset:
        return False
    default = list(option.default)
    if COLUMN in default:
        return False
    # Declaring the option again is the public way to change its default; it tells every
    # addon and the open mitmweb pages (options.changed), which then show the column.
    options.add_option(OPTION, option.typespec, [*default, COLUMN], option.help, option.choices)
    return True


# -------------------------------------------------------------------------- socket comments


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """What one finished (or refused) WebSocket turn adds to its socket's comment."""

    status: str  # as recorded: completed, failed, error, rejected, …
    error: str | None = None
    model: str | None = None  # the model that answered, else the one asked for
    usage: Mapping[str, Any] | None = None  # token_usages columns (input includes cached)
    cost_usd: float | None = None  # None: unpriced, or nothing to price


def _count(value: Any) -> int:
    # A tally read back from a flow file is not trusted to hold numbers.
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _dollars(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def add_turn(tally: Any, turn: TurnEnd) -> dict[str, Any]:
    """A socket's tally (as kept in flow.metadata; anything else counts as none) with one
    more turn."""
    old: Mapping[str, Any] = tally if isinstance(tally, Mapping) else {}
    usage = turn.usage or {}
    cost = _dollars(old.get("cost_usd"))
    if turn.cost_usd is not None:
        cost = (cost or 0.0) + turn.cost_usd
    model = turn.model or old.get("model")
    return {
        "turns": _count(old.get("turns")) + 1,
        "model": model if isinstance(model, str) else None,
        "status": turn.status,
        "error": turn.error,
        "input_tokens": _count(old.get("input_tokens")) + _count(usage.get("input_tokens")),
        "cached_tokens": _count(old.get("cached_tokens"))
        + _count(usage.get("cache_read_input_tokens")),
        "output_tokens": _count(old.get("output_tokens")) + _count(usage.get("output_tokens")),
        "cost_usd": cost,
        "unpriced_turns": _count(old.get("unpriced_turns"))
        + (1 if turn.usage and turn.cost_usd is None else 0),
    }


def socket_comment(user_id: str, tally: Mapping[str, Any]) -> str:
    """One line for mitmweb's flow list: who, which model, the turns so far and how the last
    ended, the tokens and the estimated cost of them all."""
    turns = _count(tally.get("turns"))
    status = str(tally.get("status") or "?")
    if error := tally.get("error"):
        text = str(error)
        status += f": {text[:ERROR_LIMIT]}…" if len(text) > ERROR_LIMIT else f": {text}"
    parts = [
        user_id,
        str(tally.get("model") or "?"),
        f"{turns} turn{'' if turns == 1 else 's'}, last {status}",
    ]
    tokens_in, tokens_out = _count(tally.get("input_tokens")), _count(tally.get("output_tokens"))
    if tokens_in or tokens_out:
        cached = _count(tally.get("cached_tokens"))
        cached_text = f" ({cached} cached)" if cached else ""
        parts.append(f"in {tokens_in}{cached_text} / out {tokens_out} tokens")
    if (cost := _dollars(tally.get("cost_usd"))) is not None:
        unpriced = _count(tally.get("unpriced_turns"))
        parts.append(f"${cost:.4f}" + (f" (+{unpriced} unpriced)" if unpriced else ""))
    return " · ".join(parts)


def note_turn(flow: http.HTTPFlow, user_id: str, turn: TurnEnd) -> None:
    """Count a finished turn on its WebSocket flow: its tally, comment and mark."""
    tally = add_turn(flow.metadata.get(SOCKET_KEY), turn)
    flow.metadata[SOCKET_KEY] = tally
    flow.comment = socket_comment(user_id, tally)
    if turn.status != "completed":
        flow.marked = ":warning:"  # as an HTTP exchange that did not complete is
