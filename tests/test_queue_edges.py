"""Edges of the outbound queue's promises (docs/PROTOCOL.md, "Delivery to a
client that falls behind"): no ghost cursor after user:left, no 1013 cascade
through leave notices, a hard cap on what waits even when all of it is
replaceable, and one commit's relays within half a queue budget.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from collab_trio.config import ServerConfig
from collab_trio.connection import Connection
from collab_trio.session import Session
from collab_trio.session_core import SessionCore
from collab_trio.store import MemoryStore
from collab_trio.wire import WireStream


def queued_messages(wire: WireStream) -> list[dict[str, Any]]:
    """The text messages waiting in a wire's queue (a memory stream: nothing is written without a writer)."""
    data = bytearray()
    for entry in wire._queue:
        if type(entry) is bytes:
            data += entry
        elif entry.data is not None:
            pieces = entry.data if type(entry.data) is list else [entry.data]
            for piece in pieces:
                data += bytes(piece)
    messages = []
    while data:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        start = 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(data[2:10], "big"), 10
        payload = bytes(data[start : start + length])
        del data[: start + length]
        if opcode == 1:
            messages.append(json.loads(payload))
    return messages


async def _session(users: tuple[str, ...], config: ServerConfig) -> tuple[Session, dict[str, Connection]]:
    store = MemoryStore()
    session = Session("s", config, store)
    session.core = SessionCore("s", await store.load("s"), now=trio.current_time)
    conns = {}
    for user in users:
        _, server_side = trio.testing.memory_stream_pair()
        conn = Connection(None, WireStream(server_side), user, config, session)  # type: ignore[arg-type]
        session.core.join(conn, user, connected_at=conn.connected_at)
        conns[user] = conn
    return session, conns


# -- 1. a cursor handed to the pump just before the close goes out after user:left --------


async def test_a_cursor_queued_just_before_a_close_is_not_broadcast_after_user_left(
    autojump_clock: trio.abc.Clock,
) -> None:
    # bob's last cursor reaches the core in the same tick as his close (a
    # held cursor handed over by _peer_closed/hand_over_held, or a cursor
    # and the close frame in one read): the pump was woken by the cursor,
    # so the cancel of its scope comes too late, and it forwards bob's
    # cursor to alice after alice was told bob left: a ghost cursor.
    session, conns = await _session(("alice", "bob"), ServerConfig())
    bob = conns["bob"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bob._cursor_pump)
        await trio.testing.wait_all_tasks_blocked()  # the pump waits for a cursor
        session.frame_received(bob, json.dumps({"type": "cursor", "x": 1, "y": 2}))
        bob.close(1000, "bye", peer_closed=True)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    types = [(m["type"], m.get("user_id")) for m in queued_messages(conns["alice"].wire)]
    assert ("user:left", "bob") in types
    assert types[-1] == ("user:left", "bob"), types


# -- 2. the user:left of a 1013 close tips a member corked in the same execution --------


async def test_the_user_left_of_a_slow_member_does_not_tip_a_member_corked_in_the_same_batch(
    autojump_clock: trio.abc.Clock,
) -> None:
    # u1 and u2 both get one big broadcast, corked (it is not the last
    # effect), then flushed in join order. u1 goes past twice its budget:
    # 1013 at its flush, and its user:left is corked for u2, whose flush
    # comes next. u2 was within twice its budget with the broadcast (over
    # for a moment: a second's grace); the notice alone takes it past twice
    # the budget and closes it too -- then its own user:left goes to the
    # rest: the cascade the notice rule exists to stop. (Flushed before u1,
    # u2 would have been kept.)
    from collab_trio.messages import Error, Forwarded
    from collab_trio.protocol import ErrorCode
    from collab_trio.session_core import Broadcast, Send
    from collab_trio.wire import text_frame

    budget = 10_000
    session, conns = await _session(("u0", "u1", "u2"), ServerConfig(max_queue_bytes=budget))
    u1, u2 = conns["u1"], conns["u2"]
    u1.send_frame(text_frame(b'{"type":"user:joined","pad":"' + b"p" * 600 + b'"}'), notice=True)
    base = Forwarded({"type": "sync:full_state", "items": "", "user_id": "u0"})
    from collab_trio.session import _frame

    # u2's backlog after the broadcast: 2 * budget - 100 (within twice the budget).
    items = "x" * (2 * budget - 100 - len(_frame(base)) - 2)
    big = Forwarded({"type": "sync:full_state", "items": items, "user_id": "u0"})
    session._execute([Broadcast(big, exclude="u0"), Send(conns["u0"], Error(ErrorCode.RATE_LIMITED, "x"))])
    assert u1.close_code == 1013
    # u2 took as much as before; only u1's leave notice came on top.
    assert u2.close_code is None, (u2.close_code, u2.close_reason)


# -- 3. moves of ever new items grow a queue without bound ------------------------------


async def test_moves_of_ever_new_items_are_bounded_by_the_hard_cap_while_the_backlog_is_small(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Moves of distinct items never replace each other, and a move of an
    # item the document never had is relayed (only removed items' moves are
    # refused). They are all replaceable, so the backlog stays 0: the hard
    # cap on everything queued (2 * budget + max_document_size) sits after
    # the early return for "backlog within budget" and is never looked at.
    from collab_trio.wire import text_frame

    config = ServerConfig(max_queue_bytes=64 * 1024, max_document_size=64 * 1024)
    _, server_side = trio.testing.lockstep_stream_pair()  # a client that reads nothing
    wire = WireStream(server_side)

    class Owner:
        def connection_closed(self, conn: Any) -> None: ...

    conn = Connection(None, wire, "u", config, Owner())  # type: ignore[arg-type]
    pad = "p" * 2000
    for n in range(2000):  # 4 MB of moves, 20 times the hard cap
        frame = text_frame(
            json.dumps(
                {"type": "command", "command": {"action": "move_item", "item_id": f"i{n}", "data": {"x_mm": 1, "pad": pad}}}
            ).encode()
        )
        corked: list[Connection] = []
        conn.send_frame(frame, ("move", f"i{n}", None, ("pad", "x_mm")), cork=corked)
        for c in corked:
            c.flush()
        if conn.closing:
            break
    assert wire.backlog == 0 or conn.closing
    assert conn.close_code == 1013, f"{wire.queued_bytes} bytes queued, not closed"


# -- 4. one commit's relays of merged updates are far more than max_batch_bytes ----------


async def test_a_reading_member_survives_one_batch_of_small_updates_to_a_big_item(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # A batch is cut at max_batch_bytes (half the queue budget) of the
    # changes *as received*; an update_item is relayed merged into the
    # whole item. 4 updates of a few bytes to one 150 KB item are ~300 B
    # received but ~600 KB of relays in one flush -- past twice a 256 KiB
    # budget before any writer runs (TLS and memory streams queue all of
    # it: nothing is written at once), so bob, who reads everything, is
    # closed with 1013.
    from collab_trio.testing import OPCODE_TEXT, add_item, client_frame, raw_connect, update_item

    harness = await start_server(max_queue_bytes=256 * 1024)
    async with harness.joined("s", "bob") as bob:
        alice = await raw_connect(harness, "/ws/s/alice")
        await bob.expect("user:joined")
        await alice.send_json(add_item("big", {"note": "n" * 150_000}))
        await alice.expect("ack")
        await bob.expect("command")
        burst = b"".join(
            client_frame(OPCODE_TEXT, json.dumps(update_item("big", {"label": f"L{n}"})).encode()) for n in range(4)
        )
        await alice.stream.send_all(burst)  # one read: one batch
        got = 0
        with trio.move_on_after(5):
            while got < 4:
                message = await bob.recv()
                assert message["type"] == "command", message
                got += 1
        conn = harness.registry.sessions["s"].members.get("bob")
        assert conn is not None and not conn.closing, None if conn is None else conn.close_code
        assert got == 4


@pytest.mark.parametrize("added_in_the_batch", [False, True])
def test_what_one_batch_relays_fits_in_max_batch_bytes(added_in_the_batch: bool) -> None:
    # The core's side of the same promise ("what one commit sends a member
    # fits in half its queue budget"), without a server: the relays of one
    # batch of small updates to a big item, the item added in an earlier
    # batch or in the same one (then the document does not have it yet).
    from collab_trio.document import SessionDocument
    from collab_trio.messages import Relay, encode_message_bytes
    from collab_trio.testing import add_item, update_item

    core = SessionCore("s", SessionDocument(), now=lambda: 0.0, max_batch_bytes=128 * 1024)
    core.join("a", "alice", connected_at="t")
    core.receive("a", "alice", json.dumps(add_item("big", {"note": "n" * 40_000})))
    if not added_in_the_batch:
        core.committed(core.take_batch())  # type: ignore[arg-type]
    for n in range(30):
        core.receive("a", "alice", json.dumps(update_item("big", {"label": f"L{n}"})))
    batch = core.take_batch()
    assert batch is not None
    relayed = sum(len(encode_message_bytes(Relay(op, op.command_json))) for op in batch.ops)
    assert relayed <= 128 * 1024, f"{len(batch.ops)} ops relay {relayed} bytes in one batch"


async def test_the_user_left_of_a_slow_member_does_not_tip_another_over_the_hard_cap(
    autojump_clock: trio.abc.Clock,
) -> None:
    # As test_the_user_left_of_a_slow_member_does_not_tip_a_member_corked_in_the_same_batch, but u2 also holds replaceable moves:
    # with the broadcast everything waiting for it is 50 bytes under the hard
    # cap (2 * budget + max_document_size), its backlog within twice the
    # budget (a second's grace). u1 goes past twice its budget: 1013, and its
    # user:left is corked for u2. The flush leaves that notice out of u2's
    # backlog, but not out of the hard cap: the notice closes u2 too, and
    # u2's user:left goes to the rest (the cascade PROTOCOL.md rules out:
    # "The user:left of a member closed this way is never what closes another").
    from collab_trio.messages import Error, Forwarded
    from collab_trio.protocol import ErrorCode
    from collab_trio.session import _frame
    from collab_trio.session_core import Broadcast, Send
    from collab_trio.wire import text_frame

    budget = doc = 10_000
    session, conns = await _session(("u0", "u1", "u2"), ServerConfig(max_queue_bytes=budget, max_document_size=doc))
    u1, u2 = conns["u1"], conns["u2"]
    u1.send_frame(text_frame(b'{"type":"user:joined","pad":"' + b"p" * 600 + b'"}'), notice=True)
    base = Forwarded({"type": "sync:full_state", "items": "", "user_id": "u0"})
    broadcast = 2 * budget - 100
    items = "x" * (broadcast - len(_frame(base)) - 2)
    big = Forwarded({"type": "sync:full_state", "items": items, "user_id": "u0"})
    assert len(_frame(big)) == broadcast
    # u2's replaceable moves: the broadcast will leave it 50 bytes under the cap.
    room = 2 * budget + doc - 50 - broadcast
    def move(n: int, pad: int) -> bytes:
        body = {"type": "command", "command": {"action": "move_item", "item_id": f"i{n}", "data": {"pad": "p" * pad}}}
        return text_frame(json.dumps(body).encode())

    n = 0
    while room > 0:
        frame = move(n, 1000)
        if len(frame) > room:  # the last one: exactly what is left
            frame = move(n, 1000 - (len(frame) - room))
        u2.send_frame(frame, ("move", f"i{n}", None, ("pad",)))
        room -= len(frame)
        n += 1
    assert u2.close_code is None and u2.wire.backlog == 0
    assert u2.wire.waiting_bytes == 2 * budget + doc - 50 - broadcast, u2.wire.waiting_bytes
    session._execute([Broadcast(big, exclude="u0"), Send(conns["u0"], Error(ErrorCode.RATE_LIMITED, "x"))])
    assert u1.close_code == 1013
    # u2 took as much as before; only u1's leave notice came on top.
    assert u2.close_code is None, (u2.close_code, u2.close_reason)
