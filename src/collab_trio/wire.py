"""The bytes under trio-websocket: one ordered, byte-counted outgoing queue
per client, and a frame counter on what comes in.

trio-websocket takes any `trio.abc.Stream` (`wrap_server_stream`, public
API); the serving layer hands it a `WireStream` around the client's socket.
Everything the server sends to that client then goes through one FIFO:

- the session's messages, framed once (`text_frame`: a server frame is not
  masked, so every member gets the same bytes) and queued without awaiting
  by `write()`. When nothing is queued and the socket takes the bytes at
  once they are written on the spot: no task switch, no extra copy;
- trio-websocket's own writes (handshake answer, pongs, the close frame),
  which arrive through `send_all()` and wait their turn.

One writer task per client (`run_writer()`) drains whatever is queued with
one write. A queued message written with a `key` (a cursor of one user, a
move of one item, a sync:state) is replaced by the next message with the
same key while it still waits: a client that falls behind gets the latest
state, not the whole backlog. The connection reads `backlog` (bytes waiting
that no later message can replace) to decide when a client is too slow.

Incoming bytes pass through a `FrameReader` (inbound.py): the connection
gets every frame's opcode and FIN bit (`on_frames`), so pings, continuation
frames and fragments count toward its rate limit; and, once it sets
`taking`, the whole text messages the reader took out of the stream, in the
same call, in order (trio-websocket gets the rest).
"""

from __future__ import annotations

import errno
import os
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio

from .counters import Counters
from .inbound import CLOSE, PING, TEXT, Event, FrameReader

# Bytes read from a plain socket at most, when trio-websocket doesn't say
# (trio's own default).
READ_SIZE = 65536
# Bytes handed to one write of a stream that is not a plain socket (TLS,
# memory): the write timeout applies to each piece, so it measures progress;
# one TLS record's most, so that a client reading slowly but steadily (1.6
# KB/s at the default 10 s) is not taken for one that reads nothing.
WRITE_CHUNK = 16 * 1024
# Frames kept while no connection claims them yet (between the upgrade and
# the join); beyond this they are not counted.
UNCLAIMED_FRAMES = 1024
# Replaced entries left in the queue before it is compacted (when they are
# also most of it; see WireStream._append).
DEAD_ENTRIES = 64


def _iov_max() -> int:
    """Buffers one writev() takes at most (POSIX IOV_MAX: 1024 on Linux; 16,
    the least POSIX allows, where the system doesn't say)."""
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 16
    return min(value, 1024) if value > 0 else 16


IOV_MAX = _iov_max()

_LENGTH_16 = struct.Struct("!BBH")
_LENGTH_64 = struct.Struct("!BBQ")


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame carrying UTF-8 `payload`."""
    length = len(payload)
    if length < 126:
        return bytes((0x80 | TEXT, length)) + payload
    if length < 1 << 16:
        return _LENGTH_16.pack(0x80 | TEXT, 126, length) + payload
    return _LENGTH_64.pack(0x80 | TEXT, 127, length) + payload


# An unmasked ping without payload (trio-websocket ignores a pong it did not ask for).
PING_FRAME = bytes((0x80 | PING, 0))


def close_frame(code: int, reason: str = "") -> bytes:
    """An unmasked close frame; the reason is cut to fit a control frame (125 bytes)."""
    payload = code.to_bytes(2, "big") + reason.encode("utf-8")[:123]
    # Never cut a character in half: the peer must be able to decode the reason.
    payload = payload[:2] + payload[2:].decode("utf-8", "ignore").encode("utf-8")
    return bytes((0x80 | CLOSE, len(payload))) + payload


class WriteTimeout(Exception):
    """The client's socket accepted no bytes for the write timeout."""


Buffer = bytes | memoryview


class _Entry:
    """One queued write: its bytes, the key that may replace it, its size.

    The rest of a write the socket took only part of is one entry too: the
    buffers it had still to write (views of the frames, not copies). It
    stands for every entry of that write (`count`): none of them counts as
    written (for send_all()) before all of it is.
    """

    __slots__ = ("count", "data", "key", "size", "started")

    def __init__(
        self, data: Buffer | list[Buffer] | None, key: Hashable | None, *, started: bool = False, count: int = 1
    ) -> None:
        self.data = data
        self.key = key
        self.count = count
        if data is None:
            self.size = 0
        elif type(data) is list:
            self.size = sum(map(len, data))
        else:
            self.size = len(data)  # type: ignore[arg-type]
        # The rest of a frame the socket took part of: in flight, like a batch
        # the writer holds, so not backlog (one message may be big).
        self.started = started


class WireStream(trio.abc.Stream):
    """A client's stream as trio-websocket sees it; see the module docstring."""

    def __init__(
        self,
        raw: trio.abc.Stream,
        *,
        write_timeout: float = 10.0,
        max_message_size: int = 1 << 20,
        counters: Counters | None = None,
        received: bytes = b"",
        early: bytes | None = None,
    ) -> None:
        self.raw = raw
        # Bytes already read from `raw` (the request head the serving layer
        # parsed, see upgrade.py): the first receive_some() takes them.
        self._received = received
        # Given (the serving layer: `received` is the whole request head):
        # the bytes read after the head, and nothing more is read, until the
        # 101 goes out. wsproto drops whatever it is fed before it accepts
        # (its server connection starts empty), while the frame reader would
        # parse those bytes as frames and lose step with wsproto for good (a
        # frame header announcing 2**40 bytes, sent with the head, and it
        # would count no frame again). Held back, they are frames to both.
        self._early = early
        self._upgraded = trio.Event()
        self.write_timeout = write_timeout
        # The server's counters: every byte written to the client adds to bytes_sent.
        self.counters = counters if counters is not None else Counters()
        # Called with the incoming frames' (opcode, fin), and the messages
        # taken, once claimed.
        self.on_frames: Callable[[list[Event]], None] | None = None
        self.unclaimed: list[Event] = []
        # Take whole text messages out of the stream (see inbound.py); the
        # claimant counts in `consumed` every message it read from trio-websocket.
        self.taking = False
        self.consumed = 0
        # Awaited before reading more when everything read so far was taken
        # (the claimant's back-pressure).
        self.before_read: Callable[[], Awaitable[object]] | None = None
        self._reader = FrameReader(max_message_size)
        # Plain bytes, or an _Entry for what a key may replace or a partly
        # written frame (most writes are neither: no object per write).
        self._queue: deque[bytes | _Entry] = deque()
        self._keyed: dict[Hashable, _Entry] = {}
        # Replaced entries still in the queue (see _append).
        self._dead = 0
        self._queued_bytes = 0
        self._replaceable_bytes = 0
        self._started_bytes = 0
        # A writer task is draining the queue (between attach() and detach()).
        self._attached = False
        self._writing = False
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._progress_waiters = 0  # send_all() calls waiting on _progress
        self._written = 0  # entries written so far (send_all waits on this)
        self._enqueued = 0
        self._broken: BaseException | None = None
        self._closed = False
        # Our close frame is queued: later writes are dropped.
        self._write_closed = False
        # Times the queue was emptied (taken for writing): the connection
        # tells a client that stays over its budget from one over it again.
        self.drains = 0
        socket = raw.socket if isinstance(raw, trio.SocketStream) else None
        # Writing to (and reading from) the file descriptor directly: only for
        # plain sockets on POSIX (TLS needs its stream, Windows can't write() a socket).
        self._socket: Any = socket if os.name == "posix" else None
        # The last read took everything there was (see _read_socket).
        self._drained = True

    # -- what the session sees -------------------------------------------------

    @property
    def backlog(self) -> int:
        """Bytes queued that no later message replaces (what a slow client costs)."""
        return self._queued_bytes - self._replaceable_bytes - self._started_bytes

    @property
    def queued_bytes(self) -> int:
        """Every byte queued and not yet handed to the socket."""
        return self._queued_bytes

    @property
    def waiting_bytes(self) -> int:
        """queued_bytes but the rest of a write the socket took part of (in
        flight, like the batch the writer holds)."""
        return self._queued_bytes - self._started_bytes

    def claim(self, on_frames: Callable[[list[Event]], None]) -> list[Event]:
        """Route incoming frame headers to `on_frames`; returns those seen so far."""
        self.on_frames = on_frames
        earlier, self.unclaimed = self.unclaimed, []
        return earlier

    def pong_after(self) -> int:
        """For the next pong among the claimant's frames: how many handed-on
        messages (`consumed`) it must have read before the pong counts (0 for
        one that came before it took anything)."""
        pongs = self._reader.pongs
        return pongs.popleft() if pongs else 0

    def unclaim(self) -> None:
        """Hand incoming bytes to trio-websocket alone again: no more frames,
        messages or back-pressure waits for the claimant (it is closing)."""
        self.on_frames = self.before_read = None
        self.taking = False

    def write(self, data: bytes, key: Hashable | None = None, *, corked: bool = False) -> bool:
        """Queue bytes (whole frames) without awaiting; False once the writer is gone.

        A queued entry with the same `key` is dropped: this one supersedes it.
        `corked`: nothing is written until flush(), so that what one batch of
        changes sends this client goes out in one write.
        """
        if key is None and not corked:
            return self.send(data) >= 0
        if not self._attached or self._broken is not None or self._write_closed:
            return False
        if key is None:
            self._queue_frame(data)
        else:
            self._append(data, key, started=False)
        if not corked:
            self.flush()
        return True

    def send(self, data: bytes) -> int:
        """write(data) (no key, not corked): written at once when nothing is
        queued before it. Returns the backlog after it, -1 once the writer is
        gone. The common case, per recipient of every message: one
        os.write() and two counters."""
        if not self._attached or self._broken is not None or self._write_closed:
            return -1
        if self._queue or self._writing or self._socket is None:
            self._queue_frame(data)
            self.flush()
            return self.backlog
        # flush() of this one frame, without queueing it first: what
        # flush() does for one buffer, inline.
        self.drains += 1
        fd = self._socket.fileno()
        try:
            sent = os.write(fd, data) if fd >= 0 else 0
        except OSError:
            sent = 0  # full, or broken: the writer's own write reports a broken socket
        if sent == len(data):
            # Written whole, and everything before it was: _enqueued and
            # _written (what send_all() waits on) would both count it.
            self.counters.bytes_sent += sent
            return 0
        self._enqueued += 1
        self._wrote([data], len(data), 1, sent)
        return self.backlog

    def _queue_frame(self, data: bytes) -> None:
        """Queue one frame no later one replaces (write()'s and send()'s)."""
        self._queue.append(data)
        self._queued_bytes += len(data)
        self._enqueued += 1

    def write_many(self, frames: list[bytes]) -> bool:
        """Queue whole frames no later one replaces, corked: flush() writes
        them. False once the writer is gone."""
        if not self._attached or self._broken is not None or self._write_closed:
            return False
        self._queue.extend(frames)
        self._queued_bytes += sum(map(len, frames))
        self._enqueued += len(frames)
        return True

    def _append(self, data: Buffer | list[Buffer], key: Hashable | None, started: bool, count: int = 1) -> None:
        # write() queues plain bytes itself; this is for the rest: keyed, or
        # what is left of a frame after a short write.
        old = self._keyed.get(key) if key is not None else None
        entry = _Entry(data, key, started=started, count=count)
        if old is not None and old.data is not None:
            self._queued_bytes -= old.size
            self._replaceable_bytes -= old.size
            # The new entry stands for the old one too (a send_all() behind
            # the old one returns once the new one is written, never
            # before), and the old one, empty, is left out at the next take
            # or, while the writer is busy with an earlier batch, once the
            # empty ones are most of the queue: a client that keeps taking a
            # little can't make them pile up.
            old.data = None
            entry.count += old.count
            old.count = 0
            self._dead += 1
            if self._dead > DEAD_ENTRIES and 2 * self._dead > len(self._queue):
                self._queue = deque(e for e in self._queue if type(e) is bytes or e.data is not None)
                self._dead = 0
        self._queue.append(entry)
        self._queued_bytes += entry.size
        if key is not None:
            self._keyed[key] = entry
            self._replaceable_bytes += entry.size
        elif started:
            self._started_bytes = entry.size
        self._enqueued += count

    def flush(self) -> None:
        """Write what was corked: at once if the socket takes it, else via the writer."""
        if not self._queue:
            return
        if self._writing or self._started_bytes or self._socket is None or not self._attached:
            # (The rest of a frame the socket took only part of moments ago is
            # the writer's: written here with what came behind it, a write the
            # socket took nothing of would count all of it as backlog again.)
            self._wakeup.set()
            return
        pieces, size, count = self._pieces()
        sent = self._write_now(pieces)
        if not sent and size:
            # The socket took nothing (the client is behind): everything
            # stays queued as it was, a keyed message still replaceable by
            # the next one, for the writer task to write.
            self._wakeup.set()
            return
        self._clear()
        self._wrote(pieces, size, count, sent)

    def _wrote(self, pieces: list[Buffer], size: int, count: int, sent: int) -> None:
        """Account for `sent` bytes of `pieces` written at once; the writer
        task gets the rest."""
        self.counters.bytes_sent += sent
        if sent == size:
            self._written += count
        else:
            # The rest, the writer's to finish, stands for all `count`
            # entries: a send_all() behind one of them that went out whole
            # returns once the rest is written too (later, never before its
            # own bytes are written).
            self._enqueued -= count
            self._append(_after(pieces, sent), None, started=sent > 0, count=count)
            self._wakeup.set()
        if self._progress_waiters:
            self._progressed()

    def write_close(self, code: int, reason: str) -> None:
        """Queue our close frame last: nothing written after it reaches the client.

        trio-websocket never sees this close, so it goes on answering pings
        (wsproto would refuse a pong after a close it sent: trio-websocket
        issue #184); those answers, and its reply to the client's close, are
        dropped here instead.
        """
        if self._attached and not self._write_closed:
            self.write(close_frame(code, reason))
            self._write_closed = True

    def discard(self) -> None:
        """Drop everything queued (a client too slow to take it anyway), but
        the rest of a frame the socket already took part of."""
        started = [e for e in self._queue if type(e) is _Entry and e.started and e.data is not None]
        self._queue = deque(started)
        self._keyed.clear()
        self._queued_bytes = self._started_bytes = sum(e.size for e in started)
        self._replaceable_bytes = self._dead = 0

    def attach(self) -> None:
        """A writer task will run: writes queue from now on."""
        self._attached = True

    def detach(self) -> None:
        """No writer will run after all: drop what was queued, write directly again."""
        self.discard()
        self._attached = False
        self.unclaim()
        self._progress.set()

    async def run_writer(self, until: trio.Event) -> None:
        """Write what is queued until `until` is set and the queue is empty.

        Raises:
            WriteTimeout: the socket took no bytes for `write_timeout` seconds.
            trio.BrokenResourceError: the connection broke.
        """
        self._attached = True
        try:
            while True:
                if not self._queue:
                    if until.is_set():
                        return
                    self._wakeup = trio.Event()
                    if not self._queue and not until.is_set():
                        await self._wakeup.wait()
                    continue
                pieces, _, count = self._take()
                self._writing = True
                try:
                    await self._write_all(pieces)
                finally:
                    self._writing = False
                self._written += count
                if self._progress_waiters:
                    self._progressed()
        except BaseException as exc:
            if self._broken is None:
                self._broken = exc
            raise
        finally:
            self._attached = False
            self._progress.set()

    def wake(self) -> None:
        """Make the writer look at `until` again."""
        self._wakeup.set()

    # -- trio.abc.Stream (what trio-websocket calls) ----------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._early is not None and bytes(data[:13]) in (b"HTTP/1.1 101 ", b"HTTP/1.0 101 "):
            # trio-websocket accepts: wsproto parses frames from now on (see __init__).
            self._received, self._early = self._received + self._early, None
            self._upgraded.set()
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("the writer stopped") from None
        if self._write_closed:
            await trio.lowlevel.checkpoint()
            return  # after our close frame: see write_close()
        if not self._attached:
            # No writer (during the upgrade, and after the last flush before
            # the close handshake): an ordinary write (trio-websocket sends
            # one at a time under its own lock).
            await self.raw.send_all(data)
            self.counters.bytes_sent += len(data)
            return
        data = bytes(data)
        if not self.write(data):
            raise trio.BrokenResourceError("the writer stopped")
        if data and data[0] & 0x0F == CLOSE:
            # trio-websocket's close frame (its reply to the client's, or on a
            # protocol error): nothing may follow it.
            self._write_closed = True
        mine = self._enqueued
        self._progress_waiters += 1
        try:
            while self._written < mine and self._attached and self._broken is None:
                await self._progress.wait()
        finally:
            self._progress_waiters -= 1
        if self._broken is not None and self._written < mine:
            raise trio.BrokenResourceError("the writer stopped") from None
        # Otherwise written, or dropped with the rest of a too-slow client's queue.
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.raw.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The next bytes for trio-websocket: what the frame reader did not take.

        Never empty but at the end of the stream: while everything that
        arrives is taken, this reads on. After a read that took messages it
        awaits `before_read` first: at most one read's worth (64 KiB) of
        messages reaches the claimant before its back-pressure applies.
        """
        while True:
            if self._received:
                data = self._received[:max_bytes] if max_bytes else self._received
                self._received = self._received[len(data):]
                await trio.lowlevel.checkpoint()
            elif self._early is not None:
                # The head is read; nothing more before the 101 (see __init__).
                await self._upgraded.wait()
                continue
            elif self._socket is not None:
                data = await self._read_socket(max_bytes or READ_SIZE)
            else:
                data = await self.raw.receive_some(max_bytes)
            if not data:
                return data
            taking = self.taking and self.on_frames is not None
            reader = self._reader
            taken = reader.taken
            rest, events = reader.feed(data, self.consumed if taking else None)
            if events:
                if self.on_frames is not None:
                    self.on_frames(events)
                elif len(self.unclaimed) < UNCLAIMED_FRAMES:
                    # Frames (a frame taken just before the claimant left may end here: dropped).
                    self.unclaimed.extend(e for e in events if type(e) is not str)
            if reader.taken != taken and self.before_read is not None:
                # Messages went to the claimant: its back-pressure before anything
                # more is read, also when a control frame came with them.
                await self.before_read()
            if rest:
                return rest

    async def aclose(self) -> None:
        self._closed = True
        self._early = None  # a read waiting for the 101 reads the closed stream
        self._upgraded.set()
        self._attached = False
        self._progress.set()
        await self.raw.aclose()

    # -- internals ---------------------------------------------------------------

    def _progressed(self) -> None:
        """Wake the send_all() calls waiting for entries to be written."""
        self._progress.set()
        self._progress = trio.Event()

    def _take(self) -> tuple[list[Buffer], int, int]:
        """_pieces(), and the queue emptied: the caller writes them."""
        taken = self._pieces()
        self._clear()
        return taken

    def _pieces(self) -> tuple[list[Buffer], int, int]:
        """Everything queued, as the buffers of one write (not joined: a
        big frame is never copied), their bytes, and how many entries it
        stands for (the rest of a short write stands for all of its own).
        The queue is left as it is."""
        entries = self._queue
        count = len(entries)
        if count == 1:
            first = entries[0]
            if type(first) is bytes:
                pieces, size = [first], len(first)
            else:
                pieces, size = _buffers(first.data), first.size  # type: ignore[union-attr]
                count = first.count  # type: ignore[union-attr]
        else:
            pieces, size = [], 0
            for entry in entries:
                if type(entry) is bytes:
                    pieces.append(entry)
                    size += len(entry)
                else:
                    count += entry.count - 1  # type: ignore[union-attr]
                    if entry.data is not None:  # type: ignore[union-attr]
                        pieces += _buffers(entry.data)  # type: ignore[union-attr]
                        size += entry.size  # type: ignore[union-attr]
        return pieces, size, count

    def _clear(self) -> None:
        """Empty the queue: what _pieces() gave is being written."""
        self._queue.clear()
        if self._keyed:
            self._keyed.clear()
        self._queued_bytes = self._replaceable_bytes = self._started_bytes = self._dead = 0
        self.drains += 1

    async def _read_socket(self, max_bytes: int) -> bytes:
        """SocketStream.receive_some(), one schedule point and one read per call.

        trio's recv tries the socket first and parks on EAGAIN, then yields
        again after the read. A client's messages come one at a time, so
        the first try after a read that emptied the socket buffer nearly
        always fails: this waits for readability first then (what an
        asyncio server does), and reads at once only after a full read.
        """
        socket = self._socket
        wait, waited = self._drained, False
        while True:
            # (Never wait on a closed socket: trio would register fd -1.)
            fd = socket.fileno()
            if fd < 0:
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("this socket was already closed")
            if wait:
                await trio.lowlevel.wait_readable(fd)
                wait, waited = False, True
                continue  # (it may have been closed meanwhile)
            if not waited:
                # A cancelled call reads nothing (as trio's recv): once read,
                # the bytes are returned whatever happens.
                await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(fd, max_bytes)
            except (BlockingIOError, InterruptedError):
                wait = True
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("this socket was already closed") from None
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            self._drained = len(data) < max_bytes
            if not waited:
                # Every call is a schedule point; shielded: nothing read is lost.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    def _write_now(self, pieces: list[Buffer]) -> int:
        """Write what the socket takes at once; 0 if it takes nothing or broke."""
        fd = self._socket.fileno()
        if fd < 0:
            return 0  # closed: the writer reports it
        try:
            return _write(fd, pieces)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return 0  # reset or broken pipe: the writer's own write reports it

    async def _write_all(self, pieces: list[Buffer]) -> None:
        if self._socket is None:
            # TLS or a memory stream: small frames joined, so that one record
            # carries many; the write timeout applies to each chunk.
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            for start in range(0, len(data), WRITE_CHUNK):
                chunk = data[start : start + WRITE_CHUNK]
                with trio.move_on_after(self.write_timeout) as scope:
                    await self.raw.send_all(chunk)
                if scope.cancelled_caught:
                    raise WriteTimeout(f"no bytes accepted for {self.write_timeout:g} s")
                self.counters.bytes_sent += len(chunk)
            return
        while pieces:
            fd = self._socket.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("socket closed")
            try:
                sent = _write(fd, pieces)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc
            self.counters.bytes_sent += sent
            pieces = _after(pieces, sent)
            if pieces:
                with trio.move_on_after(self.write_timeout) as scope:
                    await trio.lowlevel.wait_writable(self._socket)
                if scope.cancelled_caught:
                    raise WriteTimeout(f"no bytes accepted for {self.write_timeout:g} s")
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()


def _buffers(data: Buffer | list[Buffer] | None) -> list[Buffer]:
    """An entry's data as a list of buffers (none for a replaced entry)."""
    if data is None:
        return []
    return data if type(data) is list else [data]  # type: ignore[list-item]


def _write(fd: int, pieces: list[Buffer]) -> int:
    """One write of `pieces` in order (writev: no join); the bytes written.

    More buffers than one writev() takes are written IOV_MAX at a time, while
    the socket takes each group whole.
    """
    if len(pieces) <= 1:
        return os.write(fd, pieces[0]) if pieces else 0
    if len(pieces) <= IOV_MAX:
        return os.writev(fd, pieces)
    sent = 0
    for start in range(0, len(pieces), IOV_MAX):
        group = pieces[start : start + IOV_MAX]
        try:
            written = os.writev(fd, group)
        except OSError:
            # Full, or broken: what the earlier groups wrote is written (a
            # broken socket fails the next write, with nothing written).
            if sent:
                return sent
            raise
        sent += written
        if written < sum(map(len, group)):
            break
    return sent


def _after(pieces: list[Buffer], sent: int) -> list[Buffer]:
    """What of `pieces` is still to write after `sent` bytes of them were
    (a frame written in part continues as a view: no copy)."""
    for index, piece in enumerate(pieces):
        size = len(piece)
        if sent < size:
            rest = pieces[index:] if index else list(pieces)
            if sent:
                rest[0] = memoryview(piece)[sent:]
            return rest
        sent -= size
    return []
