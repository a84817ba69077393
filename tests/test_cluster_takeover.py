"""Several nodes on one Postgres (found by review): the held end of a drag on
a handoff and after a takeover, and a node stopped inside a takeover of one
session, which must not cost the old owner its other sessions or wedge its
writer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import trio
import trio.testing

from collab_trio.testing import HANG

from .test_leases import add, expire, lease, node, once_served
from .test_multinode import until
from .test_session_lifecycle import command, lens


async def drag_faster_than_the_rate(a: Any, alice: Any) -> None:
    """alice adds L1 on node a and drags it to x=10 faster than the rate
    (10/s, burst 2): the last positions are held, waiting for the rate."""
    await alice.send(command("add_item", "L1", lens("L1", 0.0)))
    await alice.expect("ack")
    for x in range(1, 11):
        await alice.send(command("move_item", "L1", {"x_mm": float(x)}))
    await until(lambda: bool(a.registry.sessions["s"].members["alice"]._held.entries), "moves held", HANG)


async def test_the_held_end_of_a_drag_goes_with_a_handoff(start_server: Any, database_url: str) -> None:
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=1.5, rate_limit=10, rate_burst=2)
        b = await node(start_server, database_url, "node-b")
        async with a.joined("s", "alice") as alice:
            await drag_faster_than_the_rate(a, alice)
            async with b.client("s", "bob") as bob:
                assert (await bob.expect_closed())[0] == 1013
            assert (await alice.expect_closed())[0] == 1012
        async with once_served(b, "s", "bob") as bob:
            await bob.send({"type": "sync:request"})
            state = await bob.expect("sync:state")
            [item] = state["state"]["items"]
            assert item["x_mm"] == 10.0


async def test_the_held_end_of_a_drag_is_refused_after_a_takeover(start_server: Any, database_url: str) -> None:
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=1.5, rate_limit=10, rate_burst=2)
        b = await node(start_server, database_url, "node-b")
        async with a.joined("s", "alice") as alice:
            await drag_faster_than_the_rate(a, alice)
            expire(database_url, "s")
            async with b.joined("s", "bob") as bob:
                code = (await alice.expect_closed())[0]
                assert code == 1012
                await bob.send({"type": "sync:request"})
                state = await bob.expect("sync:state")
                [item] = state["state"]["items"]
                # Only what node-a committed before the takeover (the burst).
                assert item["x_mm"] < 10.0


@contextlib.contextmanager
def node_b_stopped_inside_a_takeover_of_s(database_url: str, lease_timeout: float) -> Iterator[None]:
    """node-a's lease on s lapsed, and node-b took s over but "stopped" before
    its takeover transaction ended: the lease row of s stays locked FOR UPDATE."""
    from collab_trio.store.postgres import PgDatabase

    b = PgDatabase(database_url, node_id="node-b", lease_timeout=lease_timeout, timeout=lease_timeout)
    try:
        expire(database_url, "s")
        b.conn.execute("BEGIN")
        _, owner = b.acquire("s")
        assert owner == "node-b"
        yield
    finally:
        b.close()


async def test_a_node_stopped_inside_a_takeover_of_one_session_does_not_make_the_old_owner_drop_the_others(
    start_server: Any, database_url: str
) -> None:
    """node-a serves s and t. Its lease on s lapses (it was paused, or cut
    off, for a moment) and node-b takes s over, but node-b is stopped
    (SIGSTOP) before its takeover transaction ends. node-a lost s, rightly;
    but t is still its own (its lease is live and nobody asked for it):
    carol must go on editing t."""
    T = 2.0
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=T)
        async with a.joined("s", "alice"), a.joined("t", "carol") as carol:
            await carol.send(add("c1"))
            assert (await carol.expect("ack"))["seq"] == 1
            with node_b_stopped_inside_a_takeover_of_s(database_url, T):
                with trio.move_on_after(3 * T):
                    closed = await carol.expect_closed()
                    raise AssertionError(f"carol's session t closed {closed}; its lease: {lease(database_url, 't')}")
                await carol.send(add("c2"))
                assert (await carol.expect("ack"))["seq"] == 2


async def test_a_commit_on_a_session_a_stopped_node_is_taking_over_does_not_wedge_the_old_owners_writer(
    start_server: Any, database_url: str
) -> None:
    """As above, and node-a has a change of s to commit: its fence check
    waits for the row node-b locked, for ever (node-b is stopped, and the
    only transactions that end a stopped node's are other takeovers of s,
    which node-a's own writer would run: it waits). Every other session of
    node-a waits behind that commit: carol's change of t must still be
    stored."""
    T = 2.0
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=T)
        async with a.joined("s", "alice") as alice, a.joined("t", "carol") as carol:
            await carol.send(add("c1"))
            assert (await carol.expect("ack"))["seq"] == 1
            with node_b_stopped_inside_a_takeover_of_s(database_url, T):
                await alice.send(add("late"))  # its commit meets node-b's lock
                session = a.registry.sessions["s"]
                await until(lambda: session.core is not None and session.core.committing, "s committing", HANG)
                await carol.send(add("c2"))
                with trio.move_on_after(3 * T) as scope:
                    assert (await carol.expect("ack"))["seq"] == 2
                assert not scope.cancelled_caught, "node-a's writer waits for a stopped node-b"
