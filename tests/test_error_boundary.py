"""A bug in one session closes that session (1011) and nothing else.

The bug is injected into the store the server is given: a MemoryStore whose
load, commit or save_snapshot raises an unexpected exception (not a
StoreError) for one session id. Everything else runs for real, over
WebSocket frames on in-memory streams.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest
import trio

from collab_trio.store import MemoryStore
from collab_trio.testing import Harness, add_item

BAD = "bad"


@attrs.define(eq=False)
class FaultyStore(MemoryStore):
    """A MemoryStore whose `fail_in` method raises RuntimeError for session BAD."""

    fail_in: str = ""
    armed: bool = True

    def _maybe_fail(self, method: str, session_id: str) -> None:
        if self.armed and method == self.fail_in and session_id == BAD:
            raise RuntimeError(f"injected bug in {method}")

    async def load(self, session_id: str) -> Any:
        self._maybe_fail("load", session_id)
        return await super().load(session_id)

    async def commit(self, session_id: str, epoch: str, ops: list[Any], replaced: Any = None) -> None:
        self._maybe_fail("commit", session_id)
        await super().commit(session_id, epoch, ops, replaced)

    async def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        self._maybe_fail("save_snapshot", session_id)
        await super().save_snapshot(session_id, snapshot)


def injected_tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and "injected bug" in str(r.exc_info[1])]


async def assert_server_goes_on(harness: Harness, good: Any) -> None:
    """The other session still answers, and a new session can be opened."""
    await good.send({"type": "ping"})
    await good.expect("pong")
    await good.send(add_item("still-fine"))
    assert (await good.expect("ack"))["seq"] >= 1
    async with harness.joined("newcomer-session", "dora") as dora:
        await dora.send({"type": "ping"})
        await dora.expect("pong")


@pytest.mark.parametrize("fail_in", ["commit", "save_snapshot"])
async def test_a_bug_while_committing_or_snapshotting_closes_only_that_session(
    start_server: Any, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture, fail_in: str
) -> None:
    store = FaultyStore(fail_in=fail_in)
    harness: Harness = await start_server(_store=store, snapshot_bytes=1)
    async with (
        harness.joined("good", "gus") as good,
        harness.joined(BAD, "alice") as alice,
        harness.joined(BAD, "bob") as bob,
    ):
        await alice.expect("user:joined")
        with caplog.at_level(logging.ERROR):
            await alice.send(add_item("boom"))
            alice_code, _ = await alice.expect_closed()
            bob_code, _ = await bob.expect_closed()
        assert (alice_code, bob_code) == (1011, 1011)
        # Logged once, with its traceback.
        assert len(injected_tracebacks(caplog)) == 1
        await assert_server_goes_on(harness, good)
        # The failed session can be joined again (loaded afresh).
        store.armed = False
        async with harness.joined(BAD, "alice") as again:
            await again.send({"type": "ping"})
            await again.expect("pong")


async def test_a_bug_while_loading_closes_the_joiner_with_1011(
    start_server: Any, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    harness: Harness = await start_server(_store=FaultyStore(fail_in="load"))
    async with harness.joined("good", "gus") as good:
        with caplog.at_level(logging.ERROR):
            async with harness.client(BAD, "alice") as alice:
                code, reason = await alice.expect_closed()
        assert code == 1011 and reason == "could not load the session"
        assert len(injected_tracebacks(caplog)) == 1
        await assert_server_goes_on(harness, good)
    assert BAD not in harness.registry.sessions


async def test_a_bug_while_unloading_is_logged_and_the_server_goes_on(
    start_server: Any, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # snapshot_bytes is high: the only snapshot is the one written on unload.
    harness: Harness = await start_server(
        _store=FaultyStore(fail_in="save_snapshot"), snapshot_bytes=1 << 30
    )
    async with harness.joined("good", "gus") as good:
        with caplog.at_level(logging.ERROR):
            async with harness.joined(BAD, "alice") as alice:
                await alice.send(add_item("a1"))
                await alice.expect("ack")
                session = harness.registry.sessions[BAD]
            with trio.fail_after(5):
                await session.finished.wait()
        assert len(injected_tracebacks(caplog)) == 1
        await assert_server_goes_on(harness, good)
        # Loaded afresh: the change was committed before the unload failed.
        async with harness.joined(BAD, "bob") as bob:
            await bob.send({"type": "sync:request"})
            state = await bob.expect("sync:state")
            assert [i["uuid"] for i in state["state"]["items"]] == ["a1"]
