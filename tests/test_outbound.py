"""The outgoing path (wire.py, connection.py): frames made once, a byte-bounded
queue per client in which later cursors, moves and states replace waiting
ones, 1013 by bytes and by write timeout, and the frame-level rate limit.

Real WebSocket frames over in-memory streams, under the autojump clock;
lockstep streams are clients that read only when the test says so.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import wsproto
from wsproto.events import CloseConnection, TextMessage
from wsproto.frame_protocol import Opcode

from collab_trio.config import ServerConfig
from collab_trio.connection import Connection
from collab_trio.messages import Error, Forwarded
from collab_trio.protocol import ErrorCode
from collab_trio.session import Session
from collab_trio.session_core import Broadcast, Send, SessionCore
from collab_trio.store import MemoryStore
from collab_trio.testing import (
    HANG,
    LOOPBACK,
    OPCODE_TEXT,
    Harness,
    RawClient,
    add_item,
    client_frame,
    cursor,
    move_item,
    raw_connect,
    sync_request,
)
from collab_trio import wire as wire_module
from collab_trio.wire import IOV_MAX, WireStream, close_frame, text_frame

# -- reading a plain socket --------------------------------------------------------


@asynccontextmanager
async def socket_wire() -> AsyncIterator[tuple[WireStream, trio.SocketStream]]:
    """A WireStream on the server end of a loopback TCP connection (read with
    os.read), and the client end; both closed after."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    try:
        port = listeners[0].socket.getsockname()[1]
        theirs = await trio.open_tcp_stream(LOOPBACK, port)
        ours = await listeners[0].accept()
    finally:
        await trio.aclose_forcefully(listeners[0])
    wire = WireStream(ours)
    try:
        yield wire, theirs
    finally:
        await trio.aclose_forcefully(wire)
        await trio.aclose_forcefully(theirs)


async def test_a_plain_socket_is_read_in_order_to_its_end() -> None:
    upgrade = b"GET /ws/s/alice HTTP/1.1\r\nHost: x\r\n\r\n"
    sent = upgrade + b"".join(client_frame(OPCODE_TEXT, b"m%d" % n * 50) for n in range(3000))
    got = bytearray()
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer), trio.open_nursery() as nursery:

            async def send() -> None:
                await peer.send_all(sent)  # ~450 KB: full reads, then waits for more
                await peer.send_eof()

            nursery.start_soon(send)
            while chunk := await wire.receive_some(4096):
                got += chunk
            assert await wire.receive_some(4096) == b""  # the end stays the end
    assert got == sent  # nothing taken: trio-websocket gets every byte


async def test_a_read_waiting_for_data_can_be_cancelled_and_read_again() -> None:
    async with socket_wire() as (wire, peer):
        with trio.move_on_after(0.05) as scope:
            await wire.receive_some()
        assert scope.cancelled_caught
        await peer.send_all(b"late")
        with trio.fail_after(HANG):
            assert await wire.receive_some() == b"late"


async def test_a_cancelled_read_takes_nothing_from_the_socket() -> None:
    """A read that is cancelled (also after a full read, when the next one
    reads at once) loses no bytes: what it would have read comes next, as
    with trio's own SocketStream.receive_some."""
    upgrade = b"GET /ws/s/alice HTTP/1.1\r\nHost: x\r\n\r\n"
    sent = upgrade + b"".join(client_frame(OPCODE_TEXT, b"m%d" % n * 50) for n in range(100))
    got = bytearray()
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer):
            await peer.send_all(sent)
            await peer.send_eof()
            await trio.testing.wait_all_tasks_blocked()
            got += await wire.receive_some(64)  # a full read: the next one reads at once
            with trio.CancelScope() as scope:
                scope.cancel()
                await wire.receive_some(64)
            assert scope.cancelled_caught
            while chunk := await wire.receive_some(4096):
                got += chunk
    assert got == sent


async def test_reading_a_closed_socket_says_so_every_time_and_leaves_the_loop_sound() -> None:
    """A read after the close never waits on the closed descriptor (trio would
    take fd -1 as busy for good: the next connection's read would fail)."""
    with trio.fail_after(HANG):
        for _ in range(3):
            async with socket_wire() as (wire, peer):
                await peer.send_all(b"hello")
                assert await wire.receive_some() == b"hello"
                await wire.aclose()
                for _ in range(2):
                    with pytest.raises(trio.ClosedResourceError):
                        await wire.receive_some()


async def test_closing_the_socket_wakes_a_waiting_read() -> None:
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, _), trio.open_nursery() as nursery:

            async def read() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await wire.receive_some()

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await wire.aclose()


async def test_a_frame_with_nothing_queued_is_written_at_once_and_a_short_write_keeps_the_order() -> None:
    """write() of a frame when nothing is queued puts it on the socket before
    returning (no queue, no writer task); when the socket takes only part of
    one, the rest and every later frame go through the writer, in order."""
    big = text_frame(b"b" * (8 << 20))  # more than the socket buffers take
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer), trio.open_nursery() as nursery:
            wire.attach()
            assert wire.write(text_frame(b"first"))
            assert wire.queued_bytes == 0  # written, not queued
            assert await peer.receive_some() == text_frame(b"first")

            assert wire.write(big)
            rest = wire.queued_bytes
            assert 0 < rest < len(big) and wire.backlog == 0  # a started frame is not backlog
            # Behind the rest, which is the writer's: queued, and only it is backlog.
            assert wire.write(text_frame(b"after"))
            assert wire.queued_bytes == rest + len(text_frame(b"after"))
            assert wire.backlog == len(text_frame(b"after"))

            done = trio.Event()
            nursery.start_soon(wire.run_writer, done)
            expected = big + text_frame(b"after")
            got = bytearray()
            while len(got) < len(expected):
                got += await peer.receive_some(1 << 20)
            assert got == expected
            await trio.testing.wait_all_tasks_blocked()
            assert wire.queued_bytes == 0
            assert wire.write(text_frame(b"last"))  # the writer is idle: at once again
            assert wire.queued_bytes == 0
            assert await peer.receive_some() == text_frame(b"last")
            done.set()
            wire.wake()


async def test_send_writes_at_once_and_says_what_stays_queued() -> None:
    """WireStream.send(), the per-recipient write: 0 when the socket took the
    frame whole; with a frame the socket took part of, the bytes queued
    behind it that count (the started frame does not); -1 once closed.
    send_all() behind frames written at once does not wait for a writer."""
    big = text_frame(b"b" * (8 << 20))
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer):
            wire.attach()
            for n in range(3):
                assert wire.send(text_frame(b"relay %d" % n)) == 0
            expected = b"".join(text_frame(b"relay %d" % n) for n in range(3))
            got = bytearray()
            while len(got) < len(expected):
                got += await peer.receive_some()
            assert got == expected
            # No writer task runs: what send() wrote at once is written for send_all().
            await wire.send_all(text_frame(b"pong"))
            assert await peer.receive_some() == text_frame(b"pong")

            await almost_full_socket(wire, peer)
            assert wire.send(big) == 0 and 0 < wire.queued_bytes < len(big)
            assert wire.send(text_frame(b"after")) == len(text_frame(b"after")) == wire.backlog
            await wire.aclose()
            assert wire.send(text_frame(b"late")) == -1


def fill_socket(wire: WireStream) -> None:
    """Write to the socket under `wire` until it takes nothing more (its peer does not read)."""
    fd = wire._socket.fileno()
    while True:
        try:
            os.write(fd, b"\0" * 65536)
        except BlockingIOError:
            return


async def almost_full_socket(wire: WireStream, peer: trio.SocketStream) -> None:
    """Fill the socket under `wire`, then let `peer` read a little: the socket
    takes part of a big frame written next, not all of it."""
    fill_socket(wire)
    for _ in range(2):
        await peer.receive_some(48 * 1024)
    await trio.lowlevel.wait_writable(wire._socket)


async def test_a_send_all_behind_a_write_the_socket_took_nothing_of_waits_for_its_bytes() -> None:
    """A send_all() (trio-websocket's pong or close reply) queued on a full
    socket, then a frame written behind it: flush() takes both and the
    socket takes neither. send_all() returns only once its bytes are
    written (it returned there, with nothing written)."""
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer), trio.open_nursery() as nursery:
            wire.attach()
            fill_socket(wire)
            returned = trio.Event()

            async def pong() -> None:
                await wire.send_all(text_frame(b"pong"))
                returned.set()

            nursery.start_soon(pong)
            await trio.testing.wait_all_tasks_blocked()
            assert wire.write(text_frame(b"relay"))
            await trio.testing.wait_all_tasks_blocked()
            assert not returned.is_set()

            done = trio.Event()
            nursery.start_soon(wire.run_writer, done)
            tail = text_frame(b"pong") + text_frame(b"relay")
            got = bytearray()
            while not got.endswith(tail):
                got += await peer.receive_some(1 << 20)
            await returned.wait()
            done.set()
            wire.wake()


async def test_a_members_close_for_slowness_does_not_close_another_through_its_user_left() -> None:
    """Two members behind: u1 takes nothing, u2 took part of a big broadcast.
    u1's 1013 broadcasts user:left while u2's frames wait, corked, for the
    same execution's flush: the notice joins them (one write), and the rest
    of the frame u2's socket took part of stays that, not backlog: u2 stays.
    (A second write of u2 then, which its socket took nothing of, counted
    16 MiB as its backlog and closed it too.)"""
    config = ServerConfig(max_queue_bytes=64 * 1024)
    store = MemoryStore()
    session = Session("s", config, store)
    session.core = SessionCore("s", await store.load("s"), now=trio.current_time)
    with trio.fail_after(HANG):
        async with AsyncExitStack() as stack:
            conns, peers = {}, {}
            for user in ("u0", "u1", "u2"):  # u0 the host, and the sender
                wire, peers[user] = await stack.enter_async_context(socket_wire())
                conn = Connection(None, wire, user, config, session)  # type: ignore[arg-type]
                session.core.join(conn, user, connected_at=conn.connected_at)
                conns[user] = conn
            fill_socket(conns["u1"].wire)  # stopped reading
            await almost_full_socket(conns["u2"].wire, peers["u2"])  # reads a little
            big = Forwarded({"type": "sync:full_state", "items": "x" * (16 << 20), "user_id": "u0"})
            # The broadcast is not the last effect: corked for u1 and u2, then
            # flushed, u1 first.
            session._execute([Broadcast(big, exclude="u0"), Send(conns["u0"], Error(ErrorCode.RATE_LIMITED, "x"))])
            assert conns["u1"].close_code == 1013
            u2 = conns["u2"]
            assert u2.close_code is None and u2.wire.backlog == 0 < u2.wire.queued_bytes


async def test_the_rest_of_a_frame_the_socket_took_part_of_is_left_to_the_writer() -> None:
    """A frame written after it waits behind it (queued, its own size the only
    backlog) instead of being written with it: a write the socket takes
    nothing of would count the rest as backlog again."""
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer):
            wire.attach()
            await almost_full_socket(wire, peer)
            assert wire.write(text_frame(b"b" * (1 << 20)))
            rest = wire.queued_bytes
            assert rest > 0 and wire.backlog == 0
            small = text_frame(b"small")
            assert wire.write(small)
            assert wire.queued_bytes == rest + len(small) and wire.backlog == len(small)


def write_at_once(wire: WireStream, frames: list[bytes]) -> None:
    """Queue `frames` corked, then flush them: one write of all of them."""
    for frame in frames:
        assert wire.write(frame, corked=True)
    wire.flush()


async def test_queued_frames_go_out_in_one_write_without_a_copy_of_a_big_one() -> None:
    """A flush writes what is queued with one writev() of the frames as they
    are: neither the big frame behind small ones is copied into a joined
    buffer, nor the rest of it the socket did not take (a view of it). A
    never-reader sent a 9 MB sync:state used to pin two more copies."""
    big = text_frame(b"b" * (16 << 20))
    small = [text_frame(b"s%d" % i) for i in range(3)]
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer), trio.open_nursery() as nursery:
            wire.attach()
            await almost_full_socket(wire, peer)
            tracemalloc.start()
            try:
                write_at_once(wire, [*small, big])
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 1 << 20
            assert 0 < wire.queued_bytes < len(big) and wire.backlog == 0  # the rest, started
            done = trio.Event()
            done.set()
            nursery.start_soon(wire.run_writer, done)
            expected = b"".join(small) + big
            got = bytearray()
            while not got.endswith(big):
                got += await peer.receive_some(1 << 20)
            # (The zeros before them are what filled the socket.)
            assert got[got.index(small[0]) :] == expected


async def test_more_frames_than_one_writev_takes_are_written_whole_and_in_order() -> None:
    frames = [text_frame(b"%d" % i) for i in range(3 * IOV_MAX + 7)]
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer):
            wire.attach()
            write_at_once(wire, frames)
            assert wire.queued_bytes == 0  # the socket took every group
            expected = b"".join(frames)
            got = bytearray()
            while len(got) < len(expected):
                got += await peer.receive_some(1 << 20)
            assert got == expected


async def test_groups_written_before_a_socket_broke_count_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """More frames than one writev() takes go in groups; when the socket breaks
    after a group went out, that group is written (counted in bytes_sent,
    not queued again) and the rest waits for the writer, which reports the
    break."""

    class BreaksAfterOneWritev:
        def __init__(self) -> None:
            self.out = bytearray()

        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def writev(self, fd: int, buffers: list[bytes]) -> int:
            if self.out:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")
            for buffer in buffers:
                self.out += buffer
            return sum(map(len, buffers))

    fake_os = BreaksAfterOneWritev()
    monkeypatch.setattr(wire_module, "os", fake_os)
    monkeypatch.setattr(wire_module, "IOV_MAX", 2)
    frames = [text_frame(b"%d" % i * 10) for i in range(4)]
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, _):
            wire.attach()
            write_at_once(wire, frames)
            assert bytes(fake_os.out) == frames[0] + frames[1]
            assert wire.counters.bytes_sent == len(frames[0] + frames[1])
            assert wire.queued_bytes == len(frames[2] + frames[3])


async def test_a_too_slow_clients_close_frame_follows_the_whole_frame_it_had_started() -> None:
    """discard() (a 1013 close) keeps the rest of a frame the socket took part
    of, also after another write queued behind it: the client gets that
    frame whole, then the close frame, never a cut frame with a close in it.
    (A flush used to re-queue the rest joined with the next frame as one
    ordinary entry, which discard() dropped.)"""
    big = text_frame(b"b" * (1 << 20))
    close = close_frame(1013, "too slow")
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer), trio.open_nursery() as nursery:
            wire.attach()
            await almost_full_socket(wire, peer)
            assert wire.write(big)
            assert 0 < wire.queued_bytes < len(big)
            assert wire.write(text_frame(b"dropped"))
            wire.discard()
            wire.write_close(1013, "too slow")
            done = trio.Event()
            done.set()
            nursery.start_soon(wire.run_writer, done)
            got = bytearray()
            while not got.endswith(close):
                got += await peer.receive_some(1 << 20)
            # (The zeros before it are what filled the socket.)
            assert got[got.index(big[:10]) :] == big + close


async def test_a_reset_connection_is_a_broken_stream() -> None:
    with trio.fail_after(HANG):
        async with socket_wire() as (wire, peer):
            # Closing with a zero linger sends a reset, not an end of stream.
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await peer.aclose()
            with pytest.raises(trio.BrokenResourceError):
                while await wire.receive_some():
                    pass


# -- frames --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_text_frame_is_byte_for_byte_what_wsproto_sends(size: int) -> None:
    # Fails loudly if wsproto (trio-websocket's framing) ever frames differently.
    payload = ("é" * (size // 2) + "x" * (size % 2)).encode()
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.initiate_upgrade_connection(
        [(b"Host", b"x"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
         (b"Sec-WebSocket-Version", b"13"), (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")],
        "/",
    )
    server.send(wsproto.events.AcceptConnection())
    assert server.send(TextMessage(payload.decode())) == text_frame(payload)


@pytest.mark.parametrize(
    ("code", "reason"), [(1000, ""), (1013, "too slow"), (4002, "é" * 100), (1001, "x" * 200)]
)
def test_close_frame_is_what_wsproto_sends_cut_on_a_character(code: int, reason: str) -> None:
    frame = close_frame(code, reason)
    assert len(frame) <= 127 and frame[0] == 0x88
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    client.send(wsproto.events.Request(host="x", target="/"))
    # Parse it the way a client does.
    from wsproto.frame_protocol import FrameProtocol as Parser

    parser = Parser(client=True, extensions=[])
    parser.receive_bytes(frame)
    [parsed] = list(parser.received_frames())
    assert parsed.opcode == Opcode.CLOSE
    assert parsed.payload[0] == code
    assert reason.startswith(parsed.payload[1])


# -- the queue: replacement and budgets -------------------------------------------


async def _read_all(client: RawClient, *, until: int, cursor_x: float) -> list[dict[str, Any]]:
    """Messages until both the command `until` and a cursor at `cursor_x` came."""
    seen: list[dict[str, Any]] = []
    got_command = got_cursor = False
    with trio.fail_after(HANG):
        while not (got_command and got_cursor):
            message = await client.next_message()
            assert isinstance(message, dict), message
            seen.append(message)
            got_command |= message["type"] == "command" and message["seq"] >= until
            got_cursor |= message["type"] == "cursor" and message["x"] == cursor_x
    return seen


def _apply(items: dict[str, dict[str, Any]], message: dict[str, Any]) -> None:
    """What Optiverse does with a relayed command (seq ignored)."""
    if message["type"] != "command":
        return
    command = message["command"]
    item_id, data = command["item_id"], command.get("data") or {}
    if command["action"] == "add_item":
        items[item_id] = dict(data)
    elif command["action"] == "move_item" and item_id in items:
        items[item_id].update({k: v for k, v in data.items() if k in ("x_mm", "y_mm", "angle_deg")})


async def test_a_slow_reader_gets_the_latest_moves_and_cursors_and_ends_where_the_others_are(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # slow reads nothing for 15 s: more than the default write timeout.
    harness: Harness = await start_server(write_timeout=1000)
    async with harness.joined("s", "alice") as alice:
        slow = await raw_connect(harness, "/ws/s/slow", lockstep=True)
        await alice.expect("user:joined")
        async with harness.joined("s", "fast") as fast:
            await alice.expect("user:joined")
            await alice.send(add_item("lens", {"x_mm": 0.0}))
            await alice.send(add_item("mirror", {"x_mm": 0.0}))
            for _ in range(2):
                await alice.expect("ack")
            # slow reads nothing while alice drags both items and moves her cursor.
            moves = 300
            for n in range(1, moves + 1):
                await alice.send(move_item("lens", {"x_mm": float(n), "y_mm": -float(n), "angle_deg": 0.5}))
                await alice.send(move_item("mirror", {"x_mm": float(2 * n), "y_mm": 0.0, "angle_deg": 0.0}))
                await alice.send(cursor(float(n), float(n)))
                await alice.expect("ack")
                await alice.expect("ack")
                await trio.sleep(0.05)  # the cursor rate (20/s) lets one through each time
            last_seq = 2 + 2 * moves
            conn = harness.registry.sessions["s"].members["slow"]
            queued = conn.wire.queued_bytes
            assert not conn.closing
            # Now slow catches up.
            seen = await _read_all(slow, until=last_seq, cursor_x=float(moves))
            fast_seen = await _read_all_ws(fast, until=last_seq)
    commands = [m for m in seen if m["type"] == "command"]
    cursors = [m for m in seen if m["type"] == "cursor"]
    # Superseded moves and cursors were replaced while slow lagged...
    assert len(commands) < 2 + 2 * moves
    assert len(cursors) < moves
    # ...in order, and slow ends with exactly the positions everyone else has.
    seqs = [m["seq"] for m in commands]
    assert seqs == sorted(seqs)
    slow_items: dict[str, dict[str, Any]] = {}
    fast_items: dict[str, dict[str, Any]] = {}
    for m in seen:
        _apply(slow_items, m)
    for m in fast_seen:
        _apply(fast_items, m)
    assert slow_items == fast_items
    assert slow_items["lens"] == {"x_mm": float(moves), "y_mm": -float(moves), "angle_deg": 0.5}
    assert slow_items["mirror"]["x_mm"] == float(2 * moves)
    assert cursors[-1]["x"] == float(moves)
    print(f"slow got {len(commands)} of {2 + 2 * moves} commands, {len(cursors)} cursors; {queued} bytes queued")


async def _read_all_ws(client: Any, *, until: int) -> list[dict[str, Any]]:
    seen = []
    with trio.fail_after(HANG):
        while True:
            message = await client.recv()
            seen.append(message)
            if message["type"] == "command" and message["seq"] >= until:
                return seen


async def test_only_bytes_nothing_can_replace_count_toward_1013(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    budget = 20_000
    harness: Harness = await start_server(
        max_queue_bytes=budget, close_timeout=HANG, rate_limit=1e6, rate_burst=10**6
    )
    async with harness.joined("s", "alice") as alice:
        slow = await raw_connect(harness, "/ws/s/slow", lockstep=True)
        await alice.expect("user:joined")
        await alice.send(add_item("lens"))
        await alice.expect("ack")
        conn = harness.registry.sessions["s"].members["slow"]
        # A thousand moves of one item: ~100 KB sent, one move queued at a time.
        for n in range(1000):
            await alice.send(move_item("lens", {"x_mm": float(n), "y_mm": 0.0, "angle_deg": 0.0}))
            await alice.expect("ack")
        assert not conn.closing
        assert conn.wire.backlog < budget
        # Adds can't be replaced: they fill the budget and slow is closed.
        pad = "p" * 1000
        n = 0
        while not conn.closing:
            await alice.send(add_item(f"item-{n}", {"note": pad}))
            _, left = await alice.expect_ack()
            assert left in ([], ["slow"])  # the relay of this change may close slow
            n += 1
            assert n < 100
    assert conn.close_code == 1013
    # ~1.1 KB each, sent at once (no time passes): closed past twice the 20 KB budget.
    assert 33 <= n <= 40
    # When slow reads at last: what was already written, then the close frame.
    with trio.fail_after(HANG):
        while (message := await slow.next_message()) is not None:
            if isinstance(message, CloseConnection):
                assert message.code == 1013
                break


async def test_a_socket_that_takes_nothing_is_closed_1013_after_the_write_timeout(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(write_timeout=7, idle_timeout=1000)
    async with harness.joined("s", "alice") as alice:
        await raw_connect(harness, "/ws/s/deaf", lockstep=True)
        await alice.expect("user:joined")
        conn = harness.registry.sessions["s"].members["deaf"]
        start = trio.current_time()
        await alice.send(add_item("lens"))  # deaf's writer blocks on this relay
        await alice.expect("ack")
        with trio.fail_after(HANG):
            await conn.finished.wait()
        assert (conn.close_code, trio.current_time() - start) == (1013, 7)
        left = await alice.expect("user:left")
        assert (left["user_id"], left["reason"]) == ("deaf", "too_slow")


async def test_a_slow_client_that_keeps_taking_bytes_is_not_cut_by_the_write_timeout(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(write_timeout=5, idle_timeout=1000)
    async with harness.joined("s", "alice") as alice:
        slow = await raw_connect(harness, "/ws/s/slow", lockstep=True)
        await alice.expect("user:joined")
        for n in range(20):
            await alice.send(add_item(f"i{n}", {"note": "x" * 30_000}))
            await alice.expect("ack")
        conn = harness.registry.sessions["s"].members["slow"]
        # One message a second: the socket takes 64 KiB every 2-3 s, within the
        # write timeout, and all 20 x 30 KB arrive.
        got = 0
        with trio.fail_after(200):
            while got < 20:
                await trio.sleep(1)
                message = await slow.next_message()
                assert isinstance(message, dict)
                got += message["type"] == "command"
        assert not conn.closing


async def test_150_sync_requests_from_a_non_reader_keep_one_state_queued(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    async with harness.joined("s", "alice") as alice:
        for n in range(50):
            await alice.send(add_item(f"i{n}", {"note": "x" * 2000}))
            await alice.expect("ack")
        greedy = await raw_connect(harness, "/ws/s/greedy", lockstep=True)
        await alice.expect("user:joined")
        conn = harness.registry.sessions["s"].members["greedy"]
        for _ in range(150):
            await greedy.send_json(sync_request())
        await trio.testing.wait_all_tasks_blocked()
        state_size = len(json.dumps({"items": [{"note": "x" * 2000}] * 50}))
        # At most one answer waits (the writer holds at most one more in hand).
        assert conn.wire.queued_bytes < 1.2 * state_size
        assert not conn.closing


# -- rate limit per frame, fragments -----------------------------------------------


async def test_a_ping_flood_is_cut_by_the_rate_limit(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(rate_limit=10, rate_burst=20, rate_strikes=30)
    flood = await raw_connect(harness, "/ws/s/flood")
    codes = []
    with trio.fail_after(HANG):
        for n in range(500):
            try:
                await flood.stream.send_all(client_frame(0x9, b"p"))
            except trio.BrokenResourceError:
                break
        while (event := await flood.next_event()) is not None:
            if isinstance(event, CloseConnection):
                codes.append(event.code)
                break
    assert codes == [4002]


async def test_empty_continuation_frames_count_and_too_many_fragments_close_1009(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(max_fragments=50)
    client = await raw_connect(harness, "/ws/s/frag")
    with trio.fail_after(HANG):
        await client.stream.send_all(client_frame(OPCODE_TEXT, b'{"type":', fin=False))
        for _ in range(60):
            await client.stream.send_all(client_frame(0x0, b"", fin=False))
        while (event := await client.next_event()) is not None:
            if isinstance(event, CloseConnection):
                break
    assert isinstance(event, CloseConnection) and event.code == 1009
    assert "50 frames" in event.reason


async def test_a_message_in_a_few_fragments_is_accepted(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    client = await raw_connect(harness, "/ws/s/frag")
    text = json.dumps({"type": "ping"}).encode()
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    frames = [client_frame(OPCODE_TEXT if i == 0 else 0x0, p, fin=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    await client.stream.send_all(b"".join(frames))
    await client.expect("pong")


async def test_fragmented_messages_over_the_rate_are_dropped_like_whole_ones(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # 10 tokens: a 4-fragment ping costs 4, so only two get through at once.
    harness: Harness = await start_server(rate_limit=0.001, rate_burst=10, rate_strikes=100)
    client = await raw_connect(harness, "/ws/s/frag")
    text = b'{"type":"ping"}'
    pieces = [text[:4], text[4:8], text[8:12], text[12:]]
    message = b"".join(
        client_frame(OPCODE_TEXT if i == 0 else 0x0, p, fin=i == 3) for i, p in enumerate(pieces)
    )
    await client.stream.send_all(message * 4)
    seen = [(await client.next_message())["type"] for _ in range(3)]
    assert seen == ["pong", "pong", "error"]


async def test_whole_messages_over_the_rate_are_dropped_too(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # Whole single-frame messages are taken out of the stream by the wire
    # (inbound.py): the same verdict per frame applies to them.
    harness: Harness = await start_server(rate_limit=0.001, rate_burst=2, rate_strikes=100)
    client = await raw_connect(harness, "/ws/s/whole")
    await client.stream.send_all(client_frame(OPCODE_TEXT, b'{"type":"ping"}') * 4)
    seen = [(await client.next_message())["type"] for _ in range(3)]
    assert seen == ["pong", "pong", "error"]


async def test_messages_keep_their_order_across_fragmented_and_whole_frames(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    """Fragmented messages go through wsproto, whole ones are taken by the
    wire: sent in one write, interleaved with pings, they still apply in order."""
    watcher = await raw_connect(harness, "/ws/s/order-watch")
    sender = await raw_connect(harness, "/ws/s/order")
    await watcher.expect("user:joined")

    def fragmented(message: dict[str, Any]) -> bytes:
        text = json.dumps(message).encode()
        pieces = [text[:10], text[10:20], text[20:]]
        frames = [client_frame(OPCODE_TEXT if i == 0 else 0x0, p, fin=i == 2) for i, p in enumerate(pieces)]
        return frames[0] + client_frame(0x9, b"between") + frames[1] + frames[2]

    def whole(message: dict[str, Any]) -> bytes:
        return client_frame(OPCODE_TEXT, json.dumps(message).encode())

    data = (
        fragmented(add_item("a", {"x_mm": 1.0}))
        + whole(move_item("a", {"x_mm": 2.0}))
        + whole(add_item("b", {"x_mm": 3.0}))
        + fragmented(move_item("b", {"x_mm": 4.0}))
        + whole(move_item("a", {"x_mm": 5.0}))
    )
    await sender.stream.send_all(data)
    relays = [await watcher.expect("command") for _ in range(5)]
    assert [(r["command"]["action"], r["command"]["item_id"], r["command"]["data"]["x_mm"]) for r in relays] == [
        ("add_item", "a", 1.0),
        ("move_item", "a", 2.0),
        ("add_item", "b", 3.0),
        ("move_item", "b", 4.0),
        ("move_item", "a", 5.0),
    ]
    assert [r["seq"] for r in relays] == sorted(r["seq"] for r in relays)
    acks = []
    with trio.fail_after(HANG):
        while len(acks) < 5:
            message = await sender.next_message()
            assert isinstance(message, dict) and message["type"] != "error", message
            if message["type"] == "ack":
                acks.append(message["seq"])
    assert acks == [r["seq"] for r in relays]


# -- notices don't cascade -------------------------------------------------------


class _Owner:
    def __init__(self) -> None:
        self.closed: list[Any] = []

    def frame_received(self, conn: Any, frame: Any, arrived: Any = None) -> None: ...

    def input_done(self, conn: Any) -> None: ...

    def cursor_due(self, conn: Any, message: Any) -> None: ...

    def connection_closed(self, conn: Any) -> None:
        self.closed.append(conn)

    def has_room(self) -> bool:
        return True

    async def wait_for_room(self) -> None: ...


async def test_a_client_over_its_budget_for_a_moment_is_kept_but_not_for_a_second(
    autojump_clock: trio.abc.Clock,
) -> None:
    from collab_trio.config import ServerConfig
    from collab_trio.connection import Connection

    _, server_side = trio.testing.lockstep_stream_pair()
    wire = WireStream(server_side)
    conn = Connection(None, wire, "u", ServerConfig(max_queue_bytes=1000), _Owner())  # type: ignore[arg-type]
    conn.send_frame(text_frame(b"x" * 1200))
    assert not conn.closing  # over, but only just now
    await trio.sleep(0.5)
    conn.send_frame(text_frame(b"x"))
    assert not conn.closing
    await trio.sleep(0.5)
    conn.send_frame(text_frame(b"x"))
    assert conn.close_code == 1013  # still over a second later


async def test_a_notice_never_tips_a_client_over_its_budget(autojump_clock: trio.abc.Clock) -> None:
    from collab_trio.config import ServerConfig
    from collab_trio.connection import Connection

    _, server_side = trio.testing.lockstep_stream_pair()
    wire = WireStream(server_side)
    owner = _Owner()
    conn = Connection(None, wire, "u", ServerConfig(max_queue_bytes=1000), owner)  # type: ignore[arg-type]
    conn.send_frame(text_frame(b"x" * 990))
    conn.send_frame(text_frame(b"y" * 1500), notice=True)
    assert not conn.closing and wire.backlog > 2000
    conn.send_frame(text_frame(b"z"))
    assert conn.close_code == 1013 and owner.closed == [conn]
    # Everything queued was dropped; only the close frame waits.
    assert wire.queued_bytes == len(close_frame(1013, "too slow: outbound queue overflowed"))


async def test_wire_send_all_waits_its_turn_behind_queued_frames(autojump_clock: trio.abc.Clock) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    wire = WireStream(server_side)
    wire.attach()
    done = trio.Event()
    wire.write(b"one")
    wire.write(b"two", key="k")
    wire.write(b"TWO", key="k")  # replaces "two"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wire.run_writer, done)

        async def pong() -> None:
            await wire.send_all(b"pong")

        nursery.start_soon(pong)
        await trio.testing.wait_all_tasks_blocked()
        wire.write(b"three")
        await trio.testing.wait_all_tasks_blocked()
        done.set()
        wire.wake()
    received = b""
    while len(received) < len(b"oneTWOpongthree"):
        received += await client_side.receive_some()
    assert received == b"oneTWOpongthree"


async def test_a_flood_before_the_join_closes_a_member_not_a_ghost(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    # The upgrade and 600 pings in one write: the frames are counted at the
    # join, the rate limit closes the client, and it leaves like any member.
    async with harness.joined("lab", "bob") as bob:
        stream = harness.listener.connect()
        client = RawClient(stream)
        request = client.ws.send(wsproto.events.Request(host="localhost", target="/ws/lab/ghost"))
        await stream.send_all(request + client_frame(0x9, b"p") * 600)
        await bob.expect("user:joined")
        left = await bob.expect("user:left")
        assert (left["user_id"], left["reason"]) == ("ghost", "rate_limited")
        assert [u["user_id"] for u in left["users"]] == ["bob"]
        assert list(harness.registry.sessions["lab"].members) == ["bob"]


def test_moves_replace_each_other_only_with_the_same_fields_in_data() -> None:
    from collab_trio.document import COMMAND, Op
    from collab_trio.messages import Relay, replace_key

    def move(data: dict[str, Any]) -> Relay:
        command = {"action": "move_item", "item_id": "lens", "item_type": "lens", "data": data}
        return Relay(Op(seq=1, user_id="u", kind=COMMAND, timestamp="t", command=command))

    xy = {"x_mm": 1.0, "y_mm": 2.0}
    assert replace_key(move(xy)) == replace_key(move({"x_mm": 5.0, "y_mm": 6.0}))
    assert replace_key(move(xy)) != replace_key(move({"x_mm": 5.0}))
    assert replace_key(move(xy)) != replace_key(move({**xy, "label": "L1"}))


async def test_a_wait_for_room_does_not_count_as_the_clients_silence(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    from tests.test_session_runner import GatedStore

    store = GatedStore()
    harness: Harness = await start_server(
        _store=store, idle_timeout=10, max_pending_bytes=10, commit_timeout=100
    )
    async with harness.joined("s", "alice") as alice:
        await alice.send(add_item("a"))  # held by the store: alice's reader waits for room
        await trio.sleep(30)  # three idle limits
        store.gate.set()
        await alice.expect("ack")
        await alice.send({"type": "ping"})
        await alice.expect("pong")  # still connected


# -- a flush the socket takes nothing of; replaced entries; slow TLS readers ------


async def test_a_sync_state_flushed_onto_a_full_socket_stays_replaceable() -> None:
    # The writer is idle and the socket buffer happens to be full when a big
    # state is flushed: it stays queued as it was, replaceable (not backlog),
    # so the client is not closed, and the next state replaces it.
    config = ServerConfig(max_queue_bytes=64 * 1024)
    with trio.fail_after(10):
        async with socket_wire() as (wire, _peer):
            conn = Connection(None, wire, "u", config, _Owner())  # type: ignore[arg-type]
            fill_socket(wire)
            state = text_frame(b"s" * 200_000)  # more than twice the budget
            corked: list[Connection] = []
            conn.send_frame(state, ("sync:state",), cork=corked)
            for c in corked:
                c.flush()
            assert not conn.closing, conn.close_code
            assert (wire.backlog, wire.queued_bytes) == (0, len(state))
            newer = text_frame(b"t" * 200_000)
            corked = []
            conn.send_frame(newer, ("sync:state",), cork=corked)
            for c in corked:
                c.flush()
            assert not conn.closing, conn.close_code
            assert (wire.backlog, wire.queued_bytes) == (0, len(newer))


async def test_replaced_entries_do_not_pile_up_while_the_writer_is_busy(autojump_clock: trio.abc.Clock) -> None:
    # A client taking 64 KiB every 5 s (inside the write timeout) holds the
    # writer in one long write; meanwhile every move of one item replaces the
    # waiting one. The replaced entries must not stay in the queue (uncounted).
    client_side, server_side = trio.testing.lockstep_stream_pair()
    wire = WireStream(server_side)
    conn = Connection(None, wire, "u", ServerConfig(write_timeout=10), _Owner())  # type: ignore[arg-type]
    move = text_frame(b'{"type":"command","command":{"action":"move_item","item_id":"X"}}')
    key = ("move", "X", "lens", ("x_mm", "y_mm"))
    received = bytearray()
    with trio.fail_after(HANG * 10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wire.run_writer, trio.Event())

            async def trickle() -> None:
                while True:
                    await trio.sleep(5)
                    received.extend(await client_side.receive_some(65536))

            nursery.start_soon(trickle)
            conn.send_frame(text_frame(b"b" * (1 << 20)))  # the writer takes it: ~80 s to write
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(60):  # a minute of one item dragged at 200 moves/s
                for _ in range(200):
                    corked: list[Connection] = []
                    conn.send_frame(move, key, cork=corked)
                    for c in corked:
                        c.flush()
                await trio.sleep(1)
            assert not conn.closing
            assert wire.queued_bytes == len(move)
            entries = len(wire._queue)
            nursery.cancel_scope.cancel()
    assert entries < 200, f"{entries} entries queued for one live move"
    assert received  # the client did take bytes all along


async def test_a_stream_client_reading_4_kib_a_second_outlasts_the_write_timeout(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # Not a plain socket (TLS, memory): the write timeout applies to each
    # piece handed to the stream, so a client that reads slowly but steadily
    # (less than one piece's worth per write timeout would be cut) is kept.
    harness: Harness = await start_server(write_timeout=5, idle_timeout=1000)
    async with harness.joined("s", "alice") as alice:
        slow = await raw_connect(harness, "/ws/s/slow", lockstep=True)
        await alice.expect("user:joined")
        conn = harness.registry.sessions["s"].members["slow"]
        await alice.send(add_item("big", {"note": "x" * 30_000}))
        await alice.expect("ack")
        got = 0
        with trio.move_on_after(20):
            while True:
                await trio.sleep(1)
                got += len(await slow.stream.receive_some(4096))
        assert got > 30_000
        assert not conn.closing, conn.close_code
