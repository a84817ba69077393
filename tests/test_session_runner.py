"""The trio Session around the core: back-pressure, one order, store deadlines.

Whole server over in-memory WebSocket streams, virtual time. The store is a
MemoryStore whose commits the test holds back (a gate), or never answers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import attrs
import trio
import trio.testing

from collab_trio.inbound import PONG
from collab_trio.serving import RECEIVE_BUFFER_SIZE
from collab_trio.session_core import SessionCore
from collab_trio.store import MemoryStore, OutcomeUnknown
from wsproto.events import CloseConnection

from collab_trio.testing import HANG, OPCODE_TEXT, Harness, add_item, client_frame, raw_connect


@attrs.define(eq=False)
class GatedStore(MemoryStore):
    """Commits wait until the test opens the gate (or for ever, if it never does)."""

    gate: trio.Event = attrs.field(factory=trio.Event)
    commits: int = 0

    async def commit(self, session_id: str, epoch: str, ops: list[Any], replaced: Any = None) -> None:
        await self.gate.wait()
        await super().commit(session_id, epoch, ops, replaced)
        self.commits += 1


def add(item_id: str, op_id: int, padding: int = 0) -> dict[str, Any]:
    return add_item(item_id, {"note": "x" * padding}, op_id=op_id)


async def test_a_slow_store_stops_the_readers_instead_of_growing_memory(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    store = GatedStore()
    limit = 4000
    harness: Harness = await start_server(_store=store, max_pending_bytes=limit)
    async with harness.joined("s", "alice") as alice:
        message = add("a", 0, padding=300)
        size = len(json.dumps(message))
        for n in range(100):
            await alice.send(add(f"a{n}", n, padding=300))
        await trio.testing.wait_all_tasks_blocked()
        session = harness.registry.sessions["s"]
        assert session.core is not None
        # The reader stopped once the limit was reached: the rest waits in the
        # transport, not in the server's memory.
        assert limit <= session.core.pending_bytes < limit + size
        held = session.core.pending_bytes
        store.gate.set()
        acks = [await alice.expect("ack") for _ in range(100)]
        assert [a["op_id"] for a in acks] == list(range(100))
        assert session.core.pending_bytes == 0
        print(f"pending bytes held at {held} (limit {limit}, one message {size}); 100 of 100 acked")


# What the wire reads at once: the most that reaches a session before its
# back-pressure applies.
ONE_READ = RECEIVE_BUFFER_SIZE


async def test_control_frames_among_the_messages_do_not_get_past_the_back_pressure(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # Whole messages are taken out of the stream by the wire; a pong after
    # each one is handed on to trio-websocket. Neither may keep the reader
    # going while the session waits for the store.
    store = GatedStore()
    limit = 4000
    harness: Harness = await start_server(_store=store, max_pending_bytes=limit)
    alice = await raw_connect(harness, "/ws/s/alice")
    size = 0
    for n in range(200):
        text = json.dumps(add(f"a{n}", n, padding=3000)).encode()
        size = len(text)
        await alice.stream.send_all(client_frame(OPCODE_TEXT, text) + client_frame(PONG, b""))
    await trio.testing.wait_all_tasks_blocked()
    session = harness.registry.sessions["s"]
    assert session.core is not None
    assert limit <= session.core.pending_bytes < limit + ONE_READ + size
    store.gate.set()
    acked = 0
    with trio.fail_after(HANG):
        while acked < 200:
            message = await alice.next_message()
            assert isinstance(message, dict) and message["type"] != "error", message
            acked += message["type"] == "ack"


async def test_a_member_closed_while_its_session_waits_for_the_store_closes_at_once(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # trio-websocket's reader waits for room before it reads more; a close
    # must end that wait, or the client's close frame is read only after
    # close_timeout.
    store = GatedStore()
    harness: Harness = await start_server(_store=store, max_pending_bytes=4000, close_timeout=5)
    alice = await raw_connect(harness, "/ws/s/alice")
    for n in range(10):
        await alice.stream.send_all(client_frame(OPCODE_TEXT, json.dumps(add(f"a{n}", n, padding=3000)).encode()))
    await trio.testing.wait_all_tasks_blocked()
    session = harness.registry.sessions["s"]
    conn = session.members["alice"]
    started = trio.current_time()
    session.close_all(1001, "server shutting down")
    with trio.fail_after(HANG):
        while not isinstance(event := await alice.next_event(), CloseConnection):
            assert event is not None
        await alice.answer_close(event)
        await conn.finished.wait()
    assert event.code == 1001
    assert trio.current_time() - started < 1  # not close_timeout (5 s)
    store.gate.set()


async def test_a_close_during_a_broadcast_is_announced_after_it(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # Join order: alice, dave, carol, bob. carol never reads, so one of the
    # relays of alice's changes overflows her outbox in the middle of its
    # broadcast. dave (before her) and bob (after her) must still see one order.
    harness: Harness = await start_server(max_queue_bytes=600)

    async def observed(client: Any) -> list[tuple[str, Any]]:
        seen: list[tuple[str, Any]] = []
        while sum(kind == "command" for kind, _ in seen) < 16:
            message = await client.recv()
            seen.append((message["type"], message.get("seq", message.get("user_id"))))
        return seen

    async with harness.joined("s", "alice") as alice, harness.joined("s", "dave") as dave:
        async with harness.client("s", "carol", lockstep=True):
            async with harness.joined("s", "bob") as bob:
                await alice.expect("user:joined")
                await alice.expect("user:joined")
                await alice.expect("user:joined")
                await dave.expect("user:joined")
                await dave.expect("user:joined")
                # carol's queue passes twice its budget (16 x ~150 bytes > 1200).
                for n in range(16):
                    await alice.send(add(f"a{n}", n))
                dave_saw, bob_saw = await observed(dave), await observed(bob)
                assert ("user:left", "carol") in bob_saw
                assert dave_saw == bob_saw
                left = bob_saw.index(("user:left", "carol"))
                assert bob_saw[left - 1][0] == "command"  # the relay that overflowed her


async def test_a_store_that_never_answers_closes_the_session_after_the_deadline(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(_store=GatedStore(), commit_timeout=30)
    async with harness.joined("s", "alice") as alice, harness.joined("other", "olga") as olga:
        start = trio.current_time()
        await alice.send(add("a", 1))
        code, reason = await alice.expect_closed(timeout=60)
        assert (code, trio.current_time() - start) == (1011, 30)
        assert "storage" in reason
        await olga.send({"type": "ping"})
        await olga.expect("pong")


async def test_sync_requests_behind_a_slow_commit_coalesce_per_connection(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # One connection has at most one sync answer waiting: 100 requests
    # behind a held-back change cost one entry and get one answer.
    store = GatedStore()
    request = '{"type":"sync:request"}'
    harness: Harness = await start_server(_store=store, rate_burst=1000)
    async with harness.joined("s", "alice") as alice:
        change = json.dumps(add("a", 1))
        await alice.send(change)
        for _ in range(100):
            await alice.send(request)
        await trio.testing.wait_all_tasks_blocked()
        session = harness.registry.sessions["s"]
        assert session.core is not None
        assert session.core.pending_bytes == len(change) + len(request)
        store.gate.set()
        assert [(await alice.recv())["type"] for _ in range(2)] == ["ack", "sync:state"]
        await alice.send({"type": "ping"})
        await alice.expect("pong")  # and nothing else was queued
        assert session.core.pending_bytes == 0


async def test_a_bug_in_a_leave_closes_the_session_with_1011(
    start_server: Any, autojump_clock: trio.abc.Clock, monkeypatch: Any, caplog: Any
) -> None:
    real_leave = SessionCore.leave

    def buggy_leave(self: SessionCore, conn: Any, user_id: str, reason: str) -> Any:
        if user_id == "bob":
            raise RuntimeError("injected bug in leave")
        return real_leave(self, conn, user_id, reason)

    monkeypatch.setattr(SessionCore, "leave", buggy_leave)
    harness: Harness = await start_server()
    async with harness.joined("other", "olga") as olga, harness.joined("s", "alice") as alice:
        with caplog.at_level(logging.ERROR):
            async with harness.joined("s", "bob"):
                await alice.expect("user:joined")
            code, _ = await alice.expect_closed()
        assert code == 1011
        assert len([r for r in caplog.records if r.exc_info and "injected bug" in str(r.exc_info[1])]) == 1
        await olga.send({"type": "ping"})
        await olga.expect("pong")
        async with harness.joined("s", "carol") as carol:  # the session loads afresh
            await carol.send({"type": "ping"})
            await carol.expect("pong")


@attrs.define(eq=False)
class UnknownOutcomeStore(MemoryStore):
    """Gives up on every commit as a stuck disk would: stored or not, nobody knows."""

    async def commit(self, session_id: str, epoch: str, ops: list[Any], replaced: Any = None) -> None:
        await trio.lowlevel.checkpoint()
        raise OutcomeUnknown("the disk did not answer within 10 s; the change may or may not be stored")


async def test_an_unknown_commit_outcome_closes_the_session_with_1011(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(_store=UnknownOutcomeStore())
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        await alice.send(add("a", 1))
        # Not "not_persisted": that could be a lie. Everyone reloads instead.
        assert (await alice.expect_closed())[0] == 1011
        assert (await bob.expect_closed())[0] == 1011


async def test_an_unloaded_session_is_freed_without_waiting_for_the_garbage_collector(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    # A reference cycle through a finished connection would keep the whole
    # document alive until a full collection (RSS grew with every reload).
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        async with harness.joined("s", "alice") as alice:
            await alice.send(add("a", 1))
            await alice.expect("ack")
            document = weakref.ref(harness.registry.sessions["s"].document)
        with trio.fail_after(10):
            while "s" in harness.registry.sessions or harness.registry.draining:
                await trio.sleep(0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert document() is None
    finally:
        gc.enable()
