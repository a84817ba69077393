"""Incoming frames: every frame header counted, whole text messages taken
out of the stream before trio-websocket parses them.

Pure (no trio): `FrameReader.feed()` gets a client's bytes as they arrive
and returns the bytes trio-websocket (wsproto) should still see, plus, in
order, one `(opcode, fin)` for every frame whose header completed and one
`str` for every text message it took.

A frame is taken (parsed here, unmasked, UTF-8 decoded, and left out of
what wsproto sees) only when wsproto could not tell the difference: it is a
single-frame text message (FIN set, no RSV bits, masked, minimal length
encoding, at most `max_message_size` bytes), no fragmented message is under
way, no close frame came before it, and every message handed on earlier has
been read from trio-websocket already (`consumed`), so taken and handed-on
messages reach the reader in the order the client sent them. Anything else
(control frames, fragments, binary, anything odd) is handed on untouched,
and wsproto judges it exactly as before; a taken frame that is not valid
UTF-8 is handed on too (wsproto closes with 1007). What this saves per
message is wsproto's frame parser and trio-websocket's message channel:
the reader gets the message in the task that read the bytes.
"""

from __future__ import annotations

import re
from collections import deque

# Opcodes (RFC 6455 section 5.2).
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

Event = tuple[int, bool] | str

# Where a request head ends, as h11 (and so wsproto and read_request_head)
# finds it: the first blank line, its line ends CRLF or a bare LF. Looking
# for CRLF CRLF only would miss a head h11 accepted ("\n\n"), and then
# count no frame at all (or start at an attacker's CRLF CRLF in a payload).
_END_OF_HEAD = re.compile(b"\n\r?\n")


def unmask(payload: bytes | bytearray, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask`, repeated (one big-integer XOR: C speed)."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(size, "little")


class FrameReader:
    """Splits a client's byte stream (from its HTTP upgrade on); see the module docstring."""

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        # Complete data messages handed on so far (compared with `consumed`),
        # and messages taken so far.
        self.passed = 0
        self.taken = 0
        self._in_http = True
        self._http_tail = b""
        self._header = b""  # a header split between reads
        self._pass = 0  # bytes of the current handed-on frame still to come
        self._take = 0  # payload bytes of the current taken frame still to come
        self._taken: bytearray | None = None  # its masked payload so far
        self._taken_header = b""
        self._fragmented = False  # a handed-on message waits for its last frame
        self._stopped = False  # a close (or a frame wsproto will refuse) was handed on
        # Per pong whose header came while taking (`consumed` given), in
        # order: the handed-on data messages the client sent before it (one
        # under way counts), which must be read before the pong counts.
        self.pongs: deque[int] = deque()

    def feed(self, data: bytes, consumed: int | None) -> tuple[bytes, list[Event]]:
        """The bytes to hand on and the events, for `data`.

        `consumed`: how many handed-on messages the reader has read so far,
        or None to take nothing (before the join, once closing).
        """
        out: list[bytes | memoryview] = []
        events: list[Event] = []
        view = memoryview(data)
        if self._in_http:
            # The upgrade request has no body: frames start after its blank line.
            seen = self._http_tail + bytes(view)
            match = _END_OF_HEAD.search(seen)
            if match is None:
                self._http_tail = seen[-2:]
                return data, events
            start = match.end() - len(self._http_tail)
            out.append(view[:start])
            view = view[start:]
            self._in_http = False
            self._http_tail = b""
        position, size = 0, len(view)
        while position < size:
            if self._pass:
                step = min(self._pass, size - position)
                out.append(view[position : position + step])
                self._pass -= step
                position += step
                continue
            if self._taken is not None:
                step = min(self._take, size - position)
                self._taken += view[position : position + step]
                self._take -= step
                position += step
                if not self._take:
                    self._finish_taken(out, events)
                continue
            # A header is 2 to 14 bytes; it may be split between reads.
            needed = self._header_length(view, position, size)
            available = len(self._header) + size - position
            if needed is None or available < needed:
                self._header += bytes(view[position:])
                break
            take = needed - len(self._header)
            header = self._header + bytes(view[position : position + take])
            self._header = b""
            position += take
            self._start_frame(header, consumed, out, events)
        return b"".join(out), events

    def _start_frame(
        self, header: bytes, consumed: int | None, out: list[bytes | memoryview], events: list[Event]
    ) -> None:
        first, second = header[0], header[1]
        opcode, fin = first & 0x0F, bool(first & 0x80)
        length = second & 0x7F
        minimal = True
        if length == 126:
            length = int.from_bytes(header[2:4], "big")
            minimal = length >= 126
        elif length == 127:
            length = int.from_bytes(header[2:10], "big")
            minimal = (1 << 16) <= length < (1 << 63)
        events.append((opcode, fin))
        if (
            first == 0x80 | TEXT  # FIN, no RSV bits, text
            and second & 0x80  # masked
            and minimal
            and length <= self.max_message_size
            and consumed is not None
            and consumed == self.passed
            and not self._fragmented
            and not self._stopped
        ):
            self._taken, self._take, self._taken_header = bytearray(), length, header
            if not length:
                self._finish_taken(out, events)
            return
        # Handed on: keep track of where wsproto's message boundaries are.
        out.append(header)
        self._pass = length
        if not first & 0x70 and second & 0x80 and minimal:
            if opcode == CONTINUATION and self._fragmented:
                if fin:
                    self.passed += 1
                    self._fragmented = False
                return
            if opcode in (TEXT, BINARY) and not self._fragmented:
                if fin:
                    self.passed += 1
                else:
                    self._fragmented = True
                return
            if opcode in (PING, PONG) and fin and length <= 125:
                if opcode == PONG and consumed is not None:
                    self.pongs.append(self.passed + self._fragmented)
                return
        # A close, or a frame wsproto refuses: the connection ends here, take nothing more.
        self._stopped = True

    def _finish_taken(self, out: list[bytes | memoryview], events: list[Event]) -> None:
        masked, header = self._taken, self._taken_header
        assert masked is not None
        self._taken, self._taken_header = None, b""
        try:
            text = unmask(masked, header[-4:]).decode("utf-8")
        except UnicodeDecodeError:
            # wsproto closes with 1007 for this: hand the frame on as it came.
            out.append(header + bytes(masked))
            self.passed += 1
            self._stopped = True
            return
        events.append(text)
        self.taken += 1

    def _header_length(self, view: memoryview, position: int, size: int) -> int | None:
        """Bytes of the header starting here, or None if its second byte hasn't come."""
        pending = self._header
        if len(pending) >= 2:
            second = pending[1]
        elif len(pending) == 1:
            if position >= size:
                return None
            second = view[position]
        elif position + 1 < size:
            second = view[position + 1]
        else:
            return None
        length = second & 0x7F
        extra = 2 if length == 126 else 8 if length == 127 else 0
        return 2 + extra + (4 if second & 0x80 else 0)
