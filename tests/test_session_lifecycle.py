"""The session shell's lifecycle (found by review): a restore queued behind slow but
healthy commits, a predecessor finishing while its successor drains (leases),
and the held end of a drag when the server closes or replaces a connection.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import trio
import trio.testing

from collab_trio.store import MemoryStore, StoreError
from collab_trio.testing import HANG, Harness, add_item


@attrs.define(eq=False)
class SlowStore(MemoryStore):
    """Every commit takes `delay` seconds (well within the commit timeout);
    `version_items` hands out a fixed design (the memory store keeps none)."""

    delay: float = 0.0
    gate: trio.Event | None = None
    design: list[dict[str, Any]] = attrs.field(factory=lambda: [{"uuid": "r", "item_type": "lens"}])

    async def commit(self, session_id: str, epoch: str, ops: list[Any], replaced: Any = None) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(self.delay)
        await super().commit(session_id, epoch, ops, replaced)

    async def version_items(self, session_id: str, number: int) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        return [dict(item) for item in self.design]


async def test_a_restore_queued_behind_slow_but_healthy_commits_is_not_reported_failed(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # Each commit takes 10 s of a 30 s commit timeout: the store is healthy.
    store = SlowStore(delay=10.0)
    harness: Harness = await start_server(_store=store, commit_timeout=30.0, max_batch_ops=1, idle_timeout=1000)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        for n in range(8):
            await alice.send(add_item(f"a{n}", op_id=n))
        await trio.testing.wait_all_tasks_blocked()
        outcome: dict[str, Any] = {}
        with trio.fail_after(HANG * 100):
            try:
                outcome["seq"] = await harness.registry.restore("s", 1)
            except StoreError as exc:
                outcome["error"] = str(exc)
            # Whatever the server reported, what did the members get?
            seen = []
            while True:
                message = json.loads(await bob.ws.get_message())
                seen.append(message["type"])
                if message["type"] == "sync:state":
                    break
        assert outcome.get("error") is None, (outcome, seen, trio.current_time())
        assert outcome["seq"] == 9


async def test_a_join_while_the_last_member_leaves_mid_commit_waits_for_the_drain(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    store = SlowStore(gate=trio.Event())
    harness: Harness = await start_server(_store=store)
    async with harness.joined("s", "alice") as alice:
        await alice.send(add_item("a", op_id=1))
        await trio.testing.wait_all_tasks_blocked()
        first = harness.registry.sessions["s"]
    await trio.testing.wait_all_tasks_blocked()
    assert "s" not in harness.registry.sessions
    assert harness.registry.draining["s"] is first
    with trio.fail_after(HANG):
        async with harness.client("s", "bob") as bob:
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()
            ack = await bob.expect("connection:ack")
            assert ack["version"] == 1
            second = harness.registry.sessions["s"]
            assert second is not first
            assert first.finished.is_set() or first.drained.is_set()
    await trio.testing.wait_all_tasks_blocked()
    assert harness.registry.sessions == {} and harness.registry.draining == {}


@attrs.define(eq=False)
class FencedStore(MemoryStore):
    """Leases as PostgresStore keeps them: load() takes the session's lease,
    release() gives it up, a commit without it is refused (LeaseLost).
    Snapshots wait for `snapshot_gate` while it is set; commits for `commit_gate`."""

    leases: set[str] = attrs.field(factory=set)
    releases: list[tuple[str, bool]] = attrs.field(factory=list)
    snapshot_gate: trio.Event | None = None
    commit_gate: trio.Event | None = None
    # Set by the test: is a commit of the session still to come when release() is called?
    uncommitted: Any = None

    async def load(self, session_id: str) -> Any:
        document = await super().load(session_id)
        self.leases.add(session_id)
        return document

    def release(self, session_id: str) -> None:
        self.releases.append((session_id, bool(self.uncommitted and self.uncommitted())))
        self.leases.discard(session_id)

    async def commit(self, session_id: str, epoch: str, ops: list[Any], replaced: Any = None) -> None:
        if self.commit_gate is not None:
            await self.commit_gate.wait()
        if session_id not in self.leases:
            from collab_trio.store import LeaseLost

            raise LeaseLost(f"session {session_id!r} moved to another node (this node holds no lease on it)")
        await super().commit(session_id, epoch, ops, replaced)

    async def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        if self.snapshot_gate is not None:
            await self.snapshot_gate.wait()
        await super().save_snapshot(session_id, snapshot)


async def test_a_predecessor_that_finishes_its_snapshot_late_keeps_the_lease_of_a_draining_successor(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    store = FencedStore()
    harness: Harness = await start_server(_store=store)
    registry = harness.registry
    with trio.fail_after(HANG):
        async with harness.joined("s", "alice") as alice:
            await alice.send(add_item("a", op_id=1))
            await alice.expect("ack")
            first = registry.sessions["s"]
            # Its snapshot on unload is slow (a busy database).
            store.snapshot_gate = trio.Event()
        await trio.testing.wait_all_tasks_blocked()
        assert first.drained.is_set() and not first.finished.is_set()  # still storing its snapshot
        # A successor loads meanwhile (the predecessor's commits are all stored).
        store.commit_gate = trio.Event()
        async with harness.joined("s", "bob") as bob:
            second = registry.sessions["s"]
            assert second is not first
            await bob.send(add_item("b", op_id=1))
            await trio.testing.wait_all_tasks_blocked()
        # bob left with his change still being committed: the successor drains.
        await trio.testing.wait_all_tasks_blocked()
        assert registry.draining.get("s") is second and not second.drained.is_set()
        store.uncommitted = lambda: not second.drained.is_set()
        # The predecessor's snapshot is stored now: it finishes.
        store.snapshot_gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert first.finished.is_set()
        store.commit_gate.set()
        await second.finished.wait()
    # The lease was given up only once nothing was left to commit,
    # and bob's change is stored.
    assert "b" in store.documents["s"].items, store.releases
    assert store.releases and not any(early for _, early in store.releases), store.releases


def lens(item_id: str, x: float) -> dict[str, Any]:
    return {"x_mm": x, "y_mm": 0.0, "angle_deg": 0.0, "name": "Lens", "item_uuid": item_id,
            "interfaces": [{"element_type": "lens", "efl_mm": 100.0}]}


def command(action: str, item_id: str, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "command", "command": {"action": action, "item_id": item_id, "item_type": "lens", "data": data}, **extra}


async def test_the_held_end_of_a_drag_is_stored_when_the_server_stops_gracefully(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # The drag-end guarantee (PROTOCOL.md "Limits per connection": what is
    # held when the client closes or goes idle is taken in) must hold when
    # it is the server that closes: Ctrl+C/SIGTERM in the middle of a drag.
    store = MemoryStore()
    harness: Harness = await start_server(_store=store, rate_limit=10, rate_burst=2)
    with trio.fail_after(60):
        async with harness.joined("s", "alice") as alice:
            await alice.send(command("add_item", "L1", lens("L1", 0.0)))
            await alice.expect("ack")
            for x in range(1, 11):
                await alice.send(command("move_item", "L1", {"x_mm": float(x)}))
            await trio.testing.wait_all_tasks_blocked()
            conn = harness.registry.sessions["s"].members["alice"]
            assert conn._held.entries  # the last positions wait for the rate
            harness.server.request_shutdown()
            await alice.expect_closed()
        await harness.server.port_released.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert store.documents["s"].items["L1"]["x_mm"] == 10.0


async def test_the_held_end_of_a_drag_is_stored_when_the_same_user_reconnects(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    store = MemoryStore()
    harness: Harness = await start_server(_store=store, rate_limit=10, rate_burst=2)
    with trio.fail_after(60):
        async with harness.joined("s", "bob") as bob:
            async with harness.joined("s", "alice") as alice:
                await bob.expect("user:joined")
                await alice.send(command("add_item", "L1", lens("L1", 0.0)))
                await alice.expect("ack")
                for x in range(1, 11):
                    await alice.send(command("move_item", "L1", {"x_mm": float(x)}))
                await trio.testing.wait_all_tasks_blocked()
                assert harness.registry.sessions["s"].members["alice"]._held.entries
                # A network blip: the client reconnects; its old connection is replaced.
                async with harness.joined("s", "alice"):
                    await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()
            assert store.documents["s"].items["L1"]["x_mm"] == 10.0
