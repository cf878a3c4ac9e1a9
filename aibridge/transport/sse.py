"""Incremental Server-Sent Events parser: bytes in, events out.

Follows the WHATWG "interpreting an event stream" rules (HTML Living Standard, server-sent
events): lines end in LF, CRLF or CR (mixed, and a CRLF may be split across chunks); a blank
line dispatches the event; lines starting with ":" are comments; a field without a colon has
an empty value; one space after the colon is stripped; `data:` lines are joined with "\\n";
`retry:` counts only when all ASCII digits; `id:` is ignored when it contains NUL and, as in
the spec, persists to later events; unknown fields are ignored; a block without `data` is not
dispatched; one leading UTF-8 BOM is dropped. Text is decoded as UTF-8 with replacement, so
invalid bytes never raise.

Deliberate differences, because this feeds an audit log rather than a browser:
- `close()` dispatches a trailing event (and a trailing unterminated line) that the spec
  would discard: a stream cut right after its last `data:` line still counts.
- `event` is None both when absent and when empty (the spec treats both as "message").
- `retry` is reported on the event whose block carried it; a block with `retry:` but no data
  is not dispatched, so its value is not reported.
- An event larger than `max_event_bytes` (its bytes up to the blank line, CRLF counting as
  one byte) is dropped and counted in `oversized_events`; parsing resumes after it.
- `data: [DONE]` is an ordinary event whose data is "[DONE]"; the caller decides what it means.

Speed: every line end is normalised to LF first (only when the chunk holds a CR), after which
events are found with `bytes.find`/`bytes.split` on b"\\n\\n", never a per-byte Python loop;
the two common shapes of an event, "event: <name>\\ndata: <line>" and "data: <line>" alone,
take an inlined path; with `frequent` names or a `skippable` pattern given, runs of those
events (text deltas) are passed over by one regex match each, not one Python step per event.
Only the unfinished event is buffered, and it never contains b"\\n\\n", so each new chunk is
searched on its own (plus one byte of overlap) instead of rescanning the buffer.
"""

import functools
import re
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"
# Event names come from upstream; cap the per-name cache so a hostile stream cannot grow it.
_NAME_CACHE_MAX = 256
_LF = 10  # b"\n"[0]
_CR = 13  # b"\r"[0]


@functools.lru_cache(maxsize=16)
def _run_pattern(names: tuple[str, ...], skippable: bytes | None) -> re.Pattern[bytes]:
    """One or more whole events, each exactly "event: <one of names>\ndata: <line>" or one
    that `skippable` (a pattern's source) matches."""
    alternatives = []
    if names:
        named = b"|".join(re.escape(n.encode()) for n in names)
        alternatives.append(rb"event: ?(?:" + named + rb")\ndata:[^\n]*\n\n")
    if skippable is not None:
        alternatives.append(skippable)
    return re.compile(rb"(?:" + b"|".join(alternatives) + rb")+")


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event."""

    event: str | None  # value of the last `event:` field, None if absent or empty
    data: str  # the `data:` lines joined with "\n"
    id: str | None = None  # last event id seen on the stream so far (spec: it persists)
    retry: int | None = None  # `retry:` of this event's block, if any and all digits


class SSEParser:
    """Feed raw stream bytes in chunks of any size; get complete events back.

    `wanted`, when given, is asked about each event name (about once per name); events
    whose name it rejects are neither decoded nor returned, only counted in
    `skipped_events`. Events without an `event:` field are always returned.

    `skippable`, when given, matches whole events by their bytes that the caller would
    ignore, whatever their name: they are neither decoded nor returned either, only
    counted. It is tried at an event's start, and must match nothing but one complete event
    of exactly two lines, an `event:` line then a `data:` line, with its blank line (LF line
    ends).

    `sink`, when given, is handed each event's name and data as soon as it is parsed, in
    order, and `feed`/`close` return nothing. `skip_data`, when given, is asked about each
    event that is one `data:` line alone, before its data is decoded: `(block, start)`, the
    event's bytes without its blank line and where its data begins; True drops the event
    (counted). With a sink, every event before it has been handed over when it is asked, so
    its answer may depend on them (the Chat Completions accumulator's does).
    """

    __slots__ = (
        "_after_cr",
        "_buf",
        "_discard_nl",
        "_discarding",
        "_head",
        "_last_id",
        "_names",
        "_run_of_unwanted",
        "_sink",
        "_skip_data",
        "_started",
        "_wanted",
        "bytes_seen",
        "max_event_bytes",
        "oversized_events",
        "skipped_events",
    )

    def __init__(
        self,
        max_event_bytes: int = 32 * 1024 * 1024,
        wanted: Callable[[str], bool] | None = None,
        frequent: Collection[str] = (),
        skippable: re.Pattern[bytes] | None = None,
        sink: Callable[[str | None, str], object] | None = None,
        skip_data: Callable[[bytes, int], bool] | None = None,
    ) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self.max_event_bytes = max_event_bytes
        self.oversized_events = 0
        self.skipped_events = 0
        self.bytes_seen = 0
        self._wanted = wanted
        self._sink = sink
        self._skip_data = skip_data
        self._started = False  # past the point where a BOM may appear
        self._head = b""  # first bytes of the stream while they may still be a split BOM
        self._after_cr = False  # previous chunk ended in CR: a leading LF here is its pair
        self._discarding = False  # inside an oversized event, skipping to its blank line
        self._discard_nl = False  # the bytes skipped so far ended with a line end
        # The unfinished event, LF-normalised, never starting with a blank line and never
        # containing b"\n\n".
        self._buf = bytearray()
        self._last_id: str | None = None
        self._names: dict[bytes, tuple[str | None, bool]] = {}
        # `frequent`: names that come in long runs (text deltas, hundreds per response). A run
        # of them in their plain form ("event: <name>\ndata: <one line>") that `wanted`
        # rejects, or of events `skippable` matches, is passed over by one regex match in C
        # instead of event by event.
        names = tuple(sorted(n for n in frequent if wanted is not None and n and not wanted(n)))
        source = None if skippable is None else skippable.pattern
        self._run_of_unwanted = _run_pattern(names, source) if names or source else None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the unfinished event (what this parser costs in memory)."""
        return len(self._buf) + len(self._head)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse one chunk; return the events it completed (none with a sink: handed to it)."""
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        self.bytes_seen += len(chunk)
        if not self._started:
            chunk = self._drop_bom(chunk)
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        # An int operand makes `in` a plain memchr; a bytes operand is many times slower.
        if _CR in chunk:
            # A CR at the very end may be the first half of a CRLF split across chunks: it
            # counts as a line end now, and a LF opening the next chunk is then dropped.
            self._after_cr = chunk[-1] == _CR
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[SSEEvent] = []
        if not chunk:
            return out
        if self._discarding:
            rest = self._skip_oversized(chunk)
            if not rest:
                return out
            chunk = rest
        buf = self._buf
        if buf:
            # The buffer holds no b"\n\n", so the event's end is either the overlap of its
            # last byte with this chunk's first, or inside this chunk.
            if buf[-1] == _LF and chunk[0] == _LF:
                del buf[-1]
                chunk = chunk[1:]
            else:
                end = chunk.find(b"\n\n")
                if end < 0:
                    buf += chunk
                    if len(buf) > self.max_event_bytes + 1:
                        self._start_discard()
                    return out
                buf += chunk[:end]
                chunk = chunk[end + 2 :]
            self._dispatch_all([bytes(buf)], out)
            buf.clear()
        if self._run_of_unwanted is not None and len(chunk) <= self.max_event_bytes:
            rest = self._dispatch_skimming(chunk, out)
        else:
            blocks = chunk.split(b"\n\n")
            rest = blocks.pop()
            if blocks:
                self._dispatch_all(blocks, out)
        if rest:
            if rest[0] == _LF:  # a blank line right after an event's end: an empty block
                rest = rest[1:]
            buf += rest
            # The event is at least len(buf) - 1 bytes (buf may end with its last line end).
            if len(buf) > self.max_event_bytes + 1:
                self._start_discard()
        return out

    def close(self) -> list[SSEEvent]:
        """End of stream: return (or hand to the sink) the trailing event that had no final
        blank line, if any."""
        out: list[SSEEvent] = []
        if self._head:  # a stream shorter than a BOM that merely began like one
            self._started = True
            head, self._head = self._head, b""
            self.bytes_seen -= len(head)  # feed() counts them again
            out = self.feed(head)
        self._after_cr = False
        if self._discarding:  # already counted when it overflowed
            self._discarding = False
        elif self._buf:
            buf = self._buf
            if buf[-1] == _LF:  # the last line's own line end, not a blank line
                del buf[-1]
            block = bytes(buf)
            buf.clear()
            self._dispatch_all([block], out)
        return out

    def _drop_bom(self, chunk: bytes) -> bytes:
        """Hold the stream's first bytes until it is clear whether they are a BOM."""
        head = self._head + chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._head = head
            return b""
        self._started = True
        self._head = b""
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _start_discard(self) -> None:
        self.oversized_events += 1
        self._discarding = True
        self._discard_nl = self._buf[-1] == _LF
        self._buf.clear()

    def _skip_oversized(self, chunk: bytes) -> bytes | None:
        """Drop the oversized event's bytes; return what follows its end, None if not yet."""
        if self._discard_nl and chunk[0] == _LF:
            end = 1
        else:
            found = chunk.find(b"\n\n")
            if found < 0:
                self._discard_nl = chunk[-1] == _LF
                return None
            end = found + 2
        self._discarding = False
        return chunk[end:]

    def _name(self, line: bytes) -> tuple[str | None, bool]:
        """Decode an `event:` line's value and ask `wanted` about it, once per distinct line."""
        value = line[6:]
        if value[:1] == b" ":
            value = value[1:]
        name = value.decode("utf-8", "replace") or None
        keep = name is None or self._wanted is None or bool(self._wanted(name))
        result = (name, keep)
        if len(self._names) < _NAME_CACHE_MAX:
            self._names[line] = result
        return result

    def _dispatch_skimming(self, chunk: bytes, out: list[SSEEvent]) -> bytes:
        """Like splitting `chunk` into blocks for `_dispatch_all`, but each run of plain
        unwanted frequent events or skippable ones is passed over in one regex match;
        returns the unfinished tail. `chunk` starts at an event's start and is no longer
        than max_event_bytes, so no event in it is oversized."""
        assert self._run_of_unwanted is not None
        match = self._run_of_unwanted.match
        find = chunk.find
        pos = 0
        others: list[bytes] = []
        while True:
            run = match(chunk, pos)
            if run is not None:
                end = run.end()
                # Every event of the run is three line ends: its two lines and a blank one.
                self.skipped_events += chunk.count(_LF, pos, end) // 3
                pos = end
                continue
            end = find(b"\n\n", pos)
            if end < 0:
                break
            others.append(chunk[pos:end])  # runs yield nothing, so order is kept
            pos = end + 2
        if others:
            self._dispatch_all(others, out)
        return chunk[pos:]

    def _dispatch_all(self, blocks: list[bytes], out: list[SSEEvent]) -> None:
        """Turn event blocks (LF line ends, no final line end) into events."""
        names = self._names
        limit = self.max_event_bytes
        append = out.append
        sink = self._sink
        skip_data = self._skip_data
        skipped = 0
        for block in blocks:
            # Fast paths, inlined, for nearly every real event: "data: <json>" alone (Chat
            # Completions) and "event: <name>\ndata: <json>" (Responses, Messages).
            if block.startswith(b"data:"):
                if _LF not in block and len(block) <= limit:
                    start = 6 if block.startswith(b" ", 5) else 5
                    if skip_data is not None and skip_data(block, start):
                        skipped += 1
                    elif sink is not None:
                        sink(None, block[start:].decode("utf-8", "replace"))
                    else:
                        text = block[start:].decode("utf-8", "replace")
                        append(SSEEvent(None, text, self._last_id))
                    continue
            elif block.startswith(b"event:"):
                line, _, rest = block.partition(b"\n")
                if rest.startswith(b"data:") and _LF not in rest and len(block) <= limit:
                    name, keep = names.get(line) or self._name(line)
                    if not keep:
                        skipped += 1
                        continue
                    data = rest[6:] if rest.startswith(b" ", 5) else rest[5:]
                    if sink is not None:
                        sink(name, data.decode("utf-8", "replace"))
                    else:
                        append(SSEEvent(name, data.decode("utf-8", "replace"), self._last_id))
                    continue
            self._dispatch(block, out)
        self.skipped_events += skipped

    def _dispatch(self, block: bytes, out: list[SSEEvent]) -> None:
        """Any event block, by the spec's field rules."""
        if block[:1] == b"\n":  # a blank line right after the previous event's end
            block = block[1:]
        if not block:
            return
        if len(block) > self.max_event_bytes:
            self.oversized_events += 1
            return
        raw_name: bytes | None = None
        data: list[bytes] = []
        retry: int | None = None
        for line in block.split(b"\n"):
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                raw_name = value
            elif field == b"id":
                if 0 not in value:
                    self._last_id = value.decode("utf-8", "replace")
            elif field == b"retry" and value.isdigit():
                with suppress(ValueError):  # beyond Python's int-from-string digit limit
                    retry = int(value)
            # Anything else is a comment (empty field name) or an unknown field: ignored.
        if not data:
            return
        name: str | None = None
        if raw_name is not None:
            line = b"event: " + raw_name  # _name strips exactly this space
            name, keep = self._names.get(line) or self._name(line)
            if not keep:
                self.skipped_events += 1
                return
        text = (data[0] if len(data) == 1 else b"\n".join(data)).decode("utf-8", "replace")
        if self._sink is not None:
            self._sink(name, text)
        else:
            out.append(SSEEvent(name, text, self._last_id, retry))
