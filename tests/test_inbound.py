"""The frame reader (inbound.py), without trio: every frame header counted,
whole text messages taken, and what it hands on still a valid stream for
wsproto, which then yields exactly the messages not taken, in order.

wsproto is the judge: the bytes handed on are fed to a real wsproto server
connection, as trio-websocket does.
"""

from __future__ import annotations

import struct
from collections import deque

import pytest
import wsproto
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.events import BytesMessage, CloseConnection, Request, TextMessage
from wsproto.frame_protocol import FrameProtocol, Opcode

from collab_trio.inbound import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, FrameReader, unmask
from collab_trio.testing import client_frame

REQUEST = (
    b"GET /ws/s/u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
LIMIT = 1 << 20


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame with a random mask, made by wsproto."""
    return FrameProtocol(client=True, extensions=[])._serialize_frame(Opcode(opcode), payload, fin=fin)


class Judge:
    """A wsproto server fed what the reader hands on; collects whole messages."""

    def __init__(self) -> None:
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        self.messages: deque[str | bytes] = deque()
        self.closed: int | None = None
        self._parts: list[str | bytes] = []

    def feed(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, Request):
                self.ws.send(wsproto.events.AcceptConnection())
            elif isinstance(event, (TextMessage, BytesMessage)):
                self._parts.append(event.data)
                if event.message_finished:
                    joiner = "" if isinstance(event, TextMessage) else b""
                    self.messages.append(joiner.join(self._parts))  # type: ignore[arg-type]
                    self._parts = []
            elif isinstance(event, CloseConnection):
                self.closed = event.code


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts}) + [len(data)]
    chunks, start = [], 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    return [c for c in chunks if c]


# A message: text (maybe fragmented, maybe with pings between its frames) or binary.
text_message = st.tuples(
    st.just(TEXT), st.text(max_size=300) | st.text(min_size=126, max_size=70000), st.integers(1, 4), st.booleans()
)
binary_message = st.tuples(st.just(BINARY), st.binary(max_size=300), st.integers(1, 3), st.booleans())
messages_strategy = st.lists(text_message | binary_message | st.just("ping") | st.just("pong"), max_size=14)


def _stream(messages: list) -> tuple[bytes, list[tuple[int, bool]], list[str | bytes]]:
    """The client's frames, every frame's (opcode, fin), and the messages in order."""
    data, frames, expected = [], [], []
    for message in messages:
        if message in ("ping", "pong"):
            opcode = PING if message == "ping" else PONG
            data.append(_frame(opcode, b"p"))
            frames.append((opcode, True))
            continue
        opcode, body, pieces, ping_between = message
        payload = body.encode() if opcode == TEXT else body
        size = max(1, len(payload) // pieces)
        parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        for index, part in enumerate(parts):
            first, last = index == 0, index == len(parts) - 1
            this = opcode if first else CONTINUATION
            data.append(_frame(this, part, fin=last))
            frames.append((this, last))
            if ping_between and not last:
                data.append(_frame(PING, b"x"))
                frames.append((PING, True))
        expected.append(body)
    return b"".join(data), frames, expected


@settings(max_examples=150, deadline=None)
@given(
    messages=messages_strategy,
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 18), max_size=10),
    reads=st.lists(st.booleans(), max_size=20),
    taking=st.booleans(),
)
def test_taken_and_handed_on_messages_arrive_in_order_however_the_bytes_are_split(
    messages: list, cuts: list[int], reads: list[bool], taking: bool
) -> None:
    data, frames, expected = _stream(messages)
    reader, judge = FrameReader(LIMIT), Judge()
    delivered: list[str | bytes] = []
    seen: list[tuple[int, bool]] = []
    consumed = 0
    reads_left = deque(reads)
    # (wsproto parses frames that came with the request only on its next read.)
    judge.feed(reader.feed(REQUEST, 0)[0])
    for chunk in _cut(data, cuts):
        rest, events = reader.feed(chunk, consumed if taking else None)
        for event in events:
            if isinstance(event, str):
                # Taken: only while nothing handed on waits to be read.
                assert not judge.messages
                delivered.append(event)
            else:
                seen.append(event)
        if rest:
            judge.feed(rest)
        # The reader reads trio-websocket's messages when it gets to it.
        if reads_left.popleft() if reads_left else True:
            while judge.messages:
                delivered.append(judge.messages.popleft())
                consumed += 1
    delivered.extend(judge.messages)
    assert seen == frames
    assert delivered == expected
    assert judge.closed is None


def test_single_frame_text_messages_are_taken_and_nothing_is_handed_on() -> None:
    reader = FrameReader(LIMIT)
    rest, events = reader.feed(REQUEST, 0)
    assert rest == REQUEST and events == []
    rest, events = reader.feed(_frame(TEXT, b'{"a":1}') + _frame(TEXT, b"") + _frame(TEXT, "é".encode()), 0)
    assert rest == b""
    assert events == [(TEXT, True), '{"a":1}', (TEXT, True), "", (TEXT, True), "é"]


def test_a_message_after_an_unread_handed_on_one_is_handed_on_too() -> None:
    reader, judge = FrameReader(LIMIT), Judge()
    judge.feed(reader.feed(REQUEST, 0)[0])
    fragmented = _frame(TEXT, b"ab", fin=False) + _frame(CONTINUATION, b"cd")
    rest, events = reader.feed(fragmented + _frame(TEXT, b"ef"), 0)
    assert [e for e in events if isinstance(e, str)] == []
    judge.feed(rest)
    assert list(judge.messages) == ["abcd", "ef"]
    # Until the reader has read both, nothing is taken; then it is again.
    assert reader.feed(_frame(TEXT, b"gh"), 1)[1] == [(TEXT, True)]
    assert reader.feed(_frame(TEXT, b"ij"), 3)[1] == [(TEXT, True), "ij"]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_frame(TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (bytes([0x81, 5]) + b"hello", 1002),  # not masked
        (bytes([0x81, 0x80 | 126]) + struct.pack("!H", 5) + b"\0\0\0\0hello", 1002),  # length not minimal
        (bytes([0xC1, 0x80 | 2]) + b"\0\0\0\0hi", 1002),  # RSV1 without an extension
    ],
)
def test_a_frame_wsproto_refuses_is_handed_on_untouched_and_nothing_after_it_is_taken(
    frame: bytes, code: int
) -> None:
    reader, judge = FrameReader(LIMIT), Judge()
    judge.feed(reader.feed(REQUEST, 0)[0])
    rest, events = reader.feed(frame + _frame(TEXT, b"later"), 0)
    assert not [e for e in events if isinstance(e, str)]
    assert rest == frame + rest[len(frame) :] and len(rest) > len(frame)
    judge.feed(rest)
    assert judge.closed == code and not judge.messages
    assert reader.feed(_frame(TEXT, b"more"), 0)[1] == [(TEXT, True)]


def test_nothing_is_taken_after_a_close_frame_or_beyond_the_size_limit() -> None:
    reader = FrameReader(100)
    reader.feed(REQUEST, 0)
    big = _frame(TEXT, b"x" * 101)
    assert reader.feed(big, 0) == (big, [(TEXT, True)])
    close = _frame(CLOSE, b"\x03\xe8")
    rest, events = reader.feed(close + _frame(TEXT, b"after"), 1)
    assert events == [(CLOSE, True), (TEXT, True)] and rest.startswith(close)


def test_frames_before_the_upgrade_ends_are_not_seen() -> None:
    reader = FrameReader(LIMIT)
    assert reader.feed(b"GET / HTTP/1.1\r\nHost: x\r", 0) == (b"GET / HTTP/1.1\r\nHost: x\r", [])
    # The blank line split across reads, a ping right behind it.
    ping = client_frame(0x9, b"hi")
    assert reader.feed(b"\n\r\n" + ping, 0) == (b"\n\r\n" + ping, [(0x9, True)])


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 65536, 1 << 20])
def test_unmask_is_the_bytewise_xor(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    mask = b"\x1f\x2e\x3d\x4c"
    assert unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
