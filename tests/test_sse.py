"""Tests for the incremental SSE parser (aibridge/transport/sse.py)."""

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aibridge.transport.sse import SSEEvent, SSEParser

BOM = b"\xef\xbb\xbf"

SAMPLE_LF = (
    ": keep-alive comment\n"
    "\n"
    "event: response.created\n"
    'data: {"type":"response.created","id":"resp_1"}\n'
    "\n"
    "event: response.output_text.delta\n"
    'data: {"delta":"h\u00e9llo \U0001f642"}\n'
    "\n\n\n"
    "id: 42\n"
    "retry: 1500\n"
    "data: first\n"
    ": comment between lines\n"
    "data:second\n"
    "data\n"
    "unknown: field\n"
    "\n"
    "event: no-data\n"
    "\n"
    "data: [DONE]\n"
    "\n"
    "event: tail\n"
    "data: no final blank line"
).encode()

SAMPLE_EVENTS = [
    SSEEvent("response.created", '{"type":"response.created","id":"resp_1"}'),
    SSEEvent("response.output_text.delta", '{"delta":"h\u00e9llo \U0001f642"}'),
    SSEEvent(None, "first\nsecond\n", "42", 1500),
    SSEEvent(None, "[DONE]", "42"),
    SSEEvent("tail", "no final blank line", "42"),
]

VARIANTS = {
    "lf": SAMPLE_LF,
    "crlf": SAMPLE_LF.replace(b"\n", b"\r\n"),
    "cr": SAMPLE_LF.replace(b"\n", b"\r"),
}


def join_lines(lines: list[bytes], endings: list[bytes]) -> bytes:
    """Join lines with endings taken in turn, never letting a CR and a LF fuse into a CRLF."""
    out: list[bytes] = []
    previous = b""
    for i, line in enumerate(lines):
        ending = endings[i % len(endings)]
        if previous == b"\r" and not line and ending.startswith(b"\n"):
            ending = b"\r"
        out += (line, ending)
        previous = ending
    return b"".join(out)


# Mixed endings in one stream; the sample's last line has no line end.
VARIANTS["mixed"] = (
    join_lines(SAMPLE_LF.split(b"\n")[:-1], [b"\n", b"\r\n", b"\r"]) + SAMPLE_LF.split(b"\n")[-1]
)


def parse(chunks: list[bytes], **kwargs: object) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser(**kwargs)  # type: ignore[arg-type]
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    return events, parser


def events_of(stream: bytes, **kwargs: object) -> list[SSEEvent]:
    return parse([stream], **kwargs)[0]


def random_split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# A plain, obviously-correct reading of the spec over the whole decoded stream, to compare
# the incremental parser against. close() semantics: a trailing event is dispatched.
def reference(stream: bytes) -> list[SSEEvent]:
    if stream.startswith(BOM):
        stream = stream[len(BOM) :]
    events: list[SSEEvent] = []
    name = ""
    data: list[str] = []
    last_id: str | None = None
    retry: int | None = None
    for line in [*re.split(r"\r\n|\r|\n", stream.decode("utf-8", "replace")), ""]:
        if not line:
            if data:
                events.append(SSEEvent(name or None, "\n".join(data), last_id, retry))
            name, data, retry = "", [], None
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
        elif field == "id" and "\0" not in value:
            last_id = value
        elif field == "retry" and re.fullmatch("[0-9]+", value):
            retry = int(value)
    return events


def test_sample_parses_as_expected() -> None:
    assert events_of(SAMPLE_LF) == SAMPLE_EVENTS
    assert reference(SAMPLE_LF) == SAMPLE_EVENTS


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_split_point_gives_the_same_events(variant: str) -> None:
    stream = VARIANTS[variant]
    assert events_of(stream) == SAMPLE_EVENTS
    for i in range(len(stream) + 1):
        assert parse([stream[:i], stream[i:]])[0] == SAMPLE_EVENTS, f"split at {i}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_byte_by_byte(variant: str) -> None:
    stream = VARIANTS[variant]
    events, parser = parse([stream[i : i + 1] for i in range(len(stream))])
    assert events == SAMPLE_EVENTS
    assert parser.bytes_seen == len(stream)


def test_events_come_out_as_soon_as_their_blank_line_arrives() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: a\ndata: 1\n") == []
    assert parser.feed(b"\nevent: b\ndata: 2") == [SSEEvent("a", "1")]
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == [SSEEvent("b", "2")]
    assert parser.close() == []
    assert parser.buffered_bytes == 0


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    # "\r" | "\n" must not read as CR then LF (two line ends, i.e. a blank line).
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [SSEEvent(None, "a\nb")]
    assert parser.feed(b"\n") == []
    assert parser.close() == []


def test_cr_then_cr_is_a_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [SSEEvent(None, "a")]


def test_multiline_data_and_empty_data_lines() -> None:
    assert events_of(b"data: a\ndata:\ndata: b\ndata\n\n") == [SSEEvent(None, "a\n\nb\n")]
    assert events_of(b"data\n\n") == [SSEEvent(None, "")]


def test_comments_are_ignored() -> None:
    stream = b":\n: ping\n:data: not data\n\ndata: x\n:tail\n\n"
    assert events_of(stream) == [SSEEvent(None, "x")]


def test_only_one_space_after_the_colon_is_stripped() -> None:
    assert events_of(b"event:  two\ndata:  x \n\n") == [SSEEvent(" two", " x ")]
    assert events_of(b"event:e\ndata:x\n\n") == [SSEEvent("e", "x")]


def test_event_field_last_value_wins_and_empty_means_none() -> None:
    assert events_of(b"event: a\ndata: x\nevent: b\n\n") == [SSEEvent("b", "x")]
    assert events_of(b"event: a\nevent:\ndata: x\n\n") == [SSEEvent(None, "x")]
    assert events_of(b"event\ndata: x\n\n") == [SSEEvent(None, "x")]
    # The event name does not carry over to the next event.
    assert events_of(b"event: a\ndata: 1\n\ndata: 2\n\n")[1] == SSEEvent(None, "2")


def test_id_persists_and_nul_ids_are_ignored() -> None:
    stream = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\x003\ndata: c\n\nid\ndata: d\n\n"
    assert [e.id for e in events_of(stream)] == ["1", "1", "1", ""]
    # An id in a block without data still sets the last event id.
    assert events_of(b"id: 7\n\ndata: x\n\n") == [SSEEvent(None, "x", "7")]


def test_retry_only_when_all_ascii_digits() -> None:
    stream = (
        b"retry: 10\ndata: a\n\n"
        b"retry: 1x\ndata: b\n\n"
        b"retry:\ndata: c\n\n"
        b"retry: \xd9\xa3\ndata: d\n\n"  # ARABIC-INDIC DIGIT THREE: a digit, not ASCII
    )
    assert [e.retry for e in events_of(stream)] == [10, None, None, None]
    assert events_of(b"retry: " + b"9" * 5000 + b"\ndata: x\n\n") == [SSEEvent(None, "x")]


def test_field_without_colon_and_unknown_fields() -> None:
    assert events_of(b"data\nfoo\nbar: baz\nDATA: no\n\n") == [SSEEvent(None, "")]


def test_block_without_data_is_not_dispatched() -> None:
    assert events_of(b"event: ping\n\nid: 1\n\nretry: 5\n\n: c\n\n\n\n") == []


def test_close_dispatches_trailing_event() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: x\ndata: 1\n") == []
    assert parser.close() == [SSEEvent("x", "1")]
    assert parser.close() == []
    # Also a last line with no line end at all, and one ending in a lone CR.
    assert events_of(b"data: partial") == [SSEEvent(None, "partial")]
    assert events_of(b"data: partial\r") == [SSEEvent(None, "partial")]


def test_done_is_an_ordinary_event() -> None:
    stream = b'data: {"a":1}\n\ndata: [DONE]\n\n'
    assert events_of(stream) == [SSEEvent(None, '{"a":1}'), SSEEvent(None, "[DONE]")]


def test_invalid_utf8_is_replaced() -> None:
    stream = b"event: \xff\ndata: \xc3(\xe2\x82\n\n"
    assert events_of(stream) == [SSEEvent("\ufffd", "\ufffd(\ufffd")]


def test_multibyte_character_split_across_chunks() -> None:
    stream = "data: caf\u00e9 \U0001f642\n\n".encode()
    for i in range(len(stream) + 1):
        assert parse([stream[:i], stream[i:]])[0] == [SSEEvent(None, "caf\u00e9 \U0001f642")]


def test_leading_bom_is_dropped_once() -> None:
    stream = BOM + b"data: x\n\ndata: \xef\xbb\xbfy\n\n"
    expected = [SSEEvent(None, "x"), SSEEvent(None, "\ufeffy")]
    for i in range(len(stream) + 1):
        assert parse([stream[:i], stream[i:]])[0] == expected
    assert parse([b"\xef", b"\xbb", b"\xbf", b"data: x\n\n"])[0] == [SSEEvent(None, "x")]
    # Only the first BOM goes: a second one starts the field name, which is then unknown.
    assert events_of(BOM + BOM + b"data: x\n\n") == []


def test_bytes_that_only_look_like_the_start_of_a_bom() -> None:
    assert events_of(b"\xef\xbbdata: x\n\n") == []  # unknown field "\ufffddata"
    assert events_of(b"\xef\xbb\n\ndata: x\n\n") == [SSEEvent(None, "x")]
    assert events_of(b"\xef") == []
    events, parser = parse([b"\xef\xbb"])
    assert events == []
    assert parser.bytes_seen == 2


def test_oversized_event_is_skipped_counted_and_parsing_goes_on() -> None:
    big = b"event: big\ndata: " + b"x" * 500 + b"\n\n"
    stream = b"data: before\n\n" + big + b"data: after\n\n"
    expected = [SSEEvent(None, "before"), SSEEvent(None, "after")]
    for i in range(len(stream) + 1):
        events, parser = parse([stream[:i], stream[i:]], max_event_bytes=100)
        assert events == expected, f"split at {i}"
        assert parser.oversized_events == 1
    events, parser = parse(
        [stream[i : i + 7] for i in range(0, len(stream), 7)], max_event_bytes=100
    )
    assert events == expected
    assert parser.oversized_events == 1


def test_event_exactly_at_the_limit_is_kept() -> None:
    block = b"data: " + b"y" * 94  # 100 bytes before its blank line
    stream = block + b"\n\n"
    for limit, kept in ((100, True), (99, False)):
        for i in range(len(stream) + 1):
            events, parser = parse([stream[:i], stream[i:]], max_event_bytes=limit)
            assert (events == [SSEEvent(None, "y" * 94)]) is kept
            assert parser.oversized_events == (0 if kept else 1)


def test_oversized_event_memory_stays_bounded() -> None:
    parser = SSEParser(max_event_bytes=1000)
    parser.feed(b"data: ")
    for _ in range(1000):
        assert parser.feed(b"z" * 100) == []
        assert parser.buffered_bytes <= 1000 + 100
    assert parser.feed(b"\n\ndata: ok\n\n") == [SSEEvent(None, "ok")]
    assert parser.oversized_events == 1


def test_oversized_trailing_event_at_close() -> None:
    events, parser = parse([b"data: " + b"q" * 200], max_event_bytes=50)
    assert events == []
    assert parser.oversized_events == 1


KEEP = frozenset({"response.created", "response.completed"})


def test_wanted_filter_skips_and_counts() -> None:
    stream = (
        b"event: response.created\ndata: 1\n\n"
        b"event: response.output_text.delta\ndata: \xff\n\n"
        b"event: response.output_text.delta\ndata: 2\n\n"
        b"data: unnamed\n\n"
        b"event: ping\n\n"  # no data: neither returned nor counted
        b"data: late name\nevent: response.output_text.delta\n\n"
        b"event: response.output_text.delta\nid: 9\ndata: 3\n\n"
        b"event: response.completed\ndata: 4\n\n"
    )
    calls: list[str] = []

    def wanted(name: str) -> bool:
        calls.append(name)
        return name in KEEP

    for i in range(len(stream) + 1):
        calls.clear()
        events, parser = parse([stream[:i], stream[i:]], wanted=wanted)
        assert events == [
            SSEEvent("response.created", "1"),
            SSEEvent(None, "unnamed"),
            SSEEvent("response.completed", "4", "9"),  # a skipped event's id still counts
        ]
        assert parser.skipped_events == 4
        assert sorted(set(calls)) == sorted(calls)  # asked once per name


def test_wanted_filter_with_more_names_than_the_cache_holds() -> None:
    stream = b"".join(b"event: n%d\ndata: %d\n\n" % (i, i) for i in range(1000))
    events, parser = parse([stream], wanted=lambda name: int(name[1:]) % 2 == 0)
    assert [e.data for e in events] == [str(i) for i in range(0, 1000, 2)]
    assert parser.skipped_events == 500


def test_rejects_a_non_positive_limit() -> None:
    with pytest.raises(ValueError):
        SSEParser(max_event_bytes=0)


# --- property tests -----------------------------------------------------------------------

# Pieces that exercise every rule: field names, separators, all line ends, BOM, bad UTF-8.
PIECES = [
    b"data",
    b"event",
    b"id",
    b"retry",
    b":",
    b" ",
    b"\n",
    b"\r",
    b"\r\n",
    b"x",
    b"7",
    b"\x00",
    b"\xc3\xa9",
    b"\xc3",
    b"\xff",
    BOM,
    b"[DONE]",
]
soupy_streams = st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)


@settings(max_examples=150, deadline=None)
@given(stream=soupy_streams | st.binary(max_size=200), cuts=cuts)
def test_arbitrary_bytes_match_the_reference_under_any_chunking(
    stream: bytes, cuts: list[int]
) -> None:
    expected = reference(stream)
    assert events_of(stream) == expected
    assert parse(random_split(stream, cuts))[0] == expected


@settings(max_examples=150, deadline=None)
@given(stream=soupy_streams, cuts=cuts, limit=st.integers(min_value=1, max_value=40))
def test_oversized_handling_does_not_depend_on_chunking(
    stream: bytes, cuts: list[int], limit: int
) -> None:
    whole, whole_parser = parse([stream], max_event_bytes=limit)
    split, split_parser = parse(random_split(stream, cuts), max_event_bytes=limit)
    assert split == whole
    assert split_parser.oversized_events == whole_parser.oversized_events
    # What is kept is what the reference finds, minus dropped events (ids aside: an id:
    # line inside a dropped event is dropped with it).
    remaining = iter([(e.event, e.data, e.retry) for e in reference(stream)])
    assert all(item in remaining for item in [(e.event, e.data, e.retry) for e in whole])


line_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20
)
sse_events = st.builds(
    SSEEvent,
    event=st.none() | line_text.filter(bool),
    data=st.lists(line_text, min_size=1, max_size=3).map("\n".join),
    id=st.none() | line_text.filter(lambda s: "\0" not in s),
    retry=st.none() | st.integers(min_value=0, max_value=10**12),
)


@settings(max_examples=100, deadline=None)
@given(
    events=st.lists(sse_events, max_size=8),
    endings=st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=1),
    comments=st.booleans(),
    cuts=cuts,
)
def test_serialized_events_round_trip(
    events: list[SSEEvent], endings: list[bytes], comments: bool, cuts: list[int]
) -> None:
    lines: list[str] = []
    for event in events:
        if comments:
            lines.append(": comment")
        if event.event is not None:
            lines.append(f"event: {event.event}")
        if event.id is not None:
            lines.append(f"id: {event.id}")
        if event.retry is not None:
            lines.append(f"retry: {event.retry}")
        lines += [f"data: {part}" for part in event.data.split("\n")]
        lines.append("")
    stream = join_lines([line.encode() for line in lines], endings)

    # The spec's id persists from one event to the next until another id: line.
    expected: list[SSEEvent] = []
    last_id: str | None = None
    for event in events:
        last_id = event.id if event.id is not None else last_id
        expected.append(SSEEvent(event.event, event.data, last_id, event.retry))

    assert parse(random_split(stream, cuts))[0] == expected
    keep = {e.event for e in events[::2]}
    filtered, parser = parse(random_split(stream, cuts), wanted=keep.__contains__)
    assert filtered == [e for e in expected if e.event is None or e.event in keep]
    assert parser.skipped_events == len(expected) - len(filtered)


# Streams of mostly plain delta events, with every way an event near them can differ from
# the plain form: an id, a second event line, a comment, more data lines, blank lines,
# other line ends, a wanted event, an event named almost like a delta, a data-only event.
DELTA = b'event: d.delta\ndata: {"delta":"x"}\n\n'
DELTA_PIECES = [
    DELTA,
    DELTA,
    DELTA,
    b"event:d.delta\ndata:y\n\n",
    b"event: d.delta\nid: 7\ndata: z\n\n",
    b"event: d.delta\nevent: done\ndata: {}\n\n",
    b"event: d.delta\ndata: a\ndata: b\n\n",
    b"event: d.delta\n: note\ndata: c\n\n",
    b"event: d.delta\r\ndata: e\r\n\r\n",
    b"event: d.deltas\ndata: f\n\n",
    b"event:  d.delta\ndata: g\n\n",
    b'event: done\ndata: {"ok":true}\n\n',
    b"data: unnamed\n\n",
    b"event: d.delta\ndata: cut",
    b"\n",
    b"\r",
]
delta_streams = st.lists(st.sampled_from(DELTA_PIECES), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(stream=delta_streams, cuts=cuts, limit=st.sampled_from([8, 40, 1 << 20]))
def test_passing_over_runs_of_frequent_events_changes_nothing(
    stream: bytes, cuts: list[int], limit: int
) -> None:
    def wanted(name: str) -> bool:
        return name == "done"

    chunks = random_split(stream, cuts)
    plain, plain_parser = parse(chunks, wanted=wanted, max_event_bytes=limit)
    skim, skim_parser = parse(
        chunks, wanted=wanted, max_event_bytes=limit, frequent={"d.delta", "done"}
    )
    assert skim == plain
    assert skim_parser.skipped_events == plain_parser.skipped_events
    assert skim_parser.oversized_events == plain_parser.oversized_events
    assert skim == [e for e in reference(stream) if e.event in (None, "done")] or limit < 1 << 20


def test_a_run_of_frequent_events_is_passed_over_and_counted() -> None:
    stream = DELTA * 500 + b"event: done\ndata: {}\n\n" + DELTA * 3
    events, parser = parse([stream], wanted={"done"}.__contains__, frequent={"d.delta"})
    assert [(e.event, e.data) for e in events] == [("done", "{}")]
    assert parser.skipped_events == 503


# A caller's pattern of events it ignores whatever their name (aibridge.apis.common's
# Api.skippable_events): one exact event, like DELTA but for its name.
SKIPPABLE = re.compile(rb'event: ?d\.text\ndata: \{"delta":"x"\}\n\n')
TEXT = b'event: d.text\ndata: {"delta":"x"}\n\n'
TEXT_PIECES = [*DELTA_PIECES, TEXT, TEXT, b"event:d.text\ndata: {}\n\n", b'data: {"delta":"x"}\n\n']
text_streams = st.lists(st.sampled_from(TEXT_PIECES), max_size=40).map(b"".join)


def dropped_from(events: list[SSEEvent], kept: list[SSEEvent], droppable: tuple[str, str]) -> int:
    """How many of `events` are not in `kept`, which must be `events` in order but for
    events whose name and data are `droppable`."""
    at = dropped = 0
    for event in events:
        if at < len(kept) and kept[at] == event:
            at += 1
        else:
            assert (event.event, event.data) == droppable, event
            dropped += 1
    assert at == len(kept)
    return dropped


@settings(max_examples=300, deadline=None)
@given(stream=text_streams, cuts=cuts, limit=st.sampled_from([8, 40, 1 << 20]))
def test_passing_over_skippable_events_drops_only_them(
    stream: bytes, cuts: list[int], limit: int
) -> None:
    def wanted(name: str) -> bool:
        return name != "d.delta"

    chunks = random_split(stream, cuts)
    plain, plain_parser = parse(chunks, wanted=wanted, max_event_bytes=limit)
    skim, skim_parser = parse(
        chunks, wanted=wanted, max_event_bytes=limit, frequent={"d.delta"}, skippable=SKIPPABLE
    )
    dropped = dropped_from(plain, skim, ("d.text", '{"delta":"x"}'))
    assert skim_parser.skipped_events == plain_parser.skipped_events + dropped
    assert skim_parser.oversized_events == plain_parser.oversized_events


def test_a_run_of_skippable_events_is_passed_over_and_counted() -> None:
    stream = TEXT * 300 + DELTA * 2 + TEXT + b"event: done\ndata: {}\n\n" + TEXT * 3
    for frequent in (set(), {"d.delta"}):
        events, parser = parse(
            [stream], wanted={"done"}.__contains__, frequent=frequent, skippable=SKIPPABLE
        )
        assert [(e.event, e.data) for e in events] == [("done", "{}")]
        assert parser.skipped_events == 306


@settings(max_examples=150, deadline=None)
@given(stream=soupy_streams | delta_streams | text_streams, cuts=cuts)
def test_a_sink_gets_the_events_in_order_and_skip_data_is_asked_in_step(
    stream: bytes, cuts: list[int]
) -> None:
    """With a sink, the events are handed over as parsed (feed and close return none);
    skip_data is asked about each one-line data-only event, its bytes and where its data
    begins, once every event before it has been handed over, and drops it on True."""
    expected = reference(stream)
    handed: list[tuple[str | None, str]] = []
    dropped: dict[int, tuple[None, str]] = {}  # by its place among all the events

    def skip_data(block: bytes, start: int) -> bool:
        assert block.startswith(b"data:") and b"\n" not in block
        assert block[:start] in (b"data:", b"data: ")
        data = block[start:].decode("utf-8", "replace")
        if len(handed) + len(dropped) >= len(expected):
            raise AssertionError("asked about more events than there are")
        if data.startswith(("x", "{")):
            dropped[len(handed) + len(dropped)] = (None, data)
            return True
        return False

    def sink(name: str | None, data: str) -> None:
        handed.append((name, data))

    parser = SSEParser(sink=sink, skip_data=skip_data)
    for chunk in random_split(stream, cuts):
        assert parser.feed(chunk) == []
    assert parser.close() == []
    merged = list(handed)
    for at in sorted(dropped):
        merged.insert(at, dropped[at])
    assert merged == [(e.event, e.data) for e in expected]
    assert parser.skipped_events == len(dropped)
