"""Cancelling the whole server (a second Ctrl+C) returns promptly, also mid-commit.

Real clock: the SQLite writer runs in a worker thread, which virtual time
would skip over. The disk is slowed with the store's fault-injection delay
(each transaction held 300 ms), and two sessions keep commits queued.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from collab_trio.config import ServerConfig
from collab_trio.server import serve
from collab_trio.testing import HANG, MemoryListener, add_item

SLOW_COMMIT = 0.3
# Changes each client sends: many batches' worth (a batch holds at most 512).
FLOOD = 5000


async def flood(listener: MemoryListener, session: str, user: str, first_ack: trio.Event) -> None:
    """Keep sending changes while reading answers; note the first ack; stop when cut off."""
    stream = listener.connect()
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "localhost", f"/ws/{session}/{user}")

            async def send() -> None:
                # Seconds of commits at 300 ms per batch: the session is never idle.
                with contextlib.suppress(ConnectionClosed):
                    for n in range(FLOOD):
                        await ws.send_message(json.dumps(add_item(f"{user}-{n}", op_id=n)))

            try:
                nursery.start_soon(send)
                while True:
                    message = json.loads(await ws.get_message())
                    if message["type"] == "ack":
                        first_ack.set()
            except ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def test_cancelling_the_server_mid_commit_returns_within_a_second(tmp_path: Path) -> None:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="sqlite",
        data_dir=str(tmp_path / "data"),
        fault_commit_delay=SLOW_COMMIT,
        # A flood, not abuse: the rate limit is not what this test is about.
        rate_limit=1e9,
        rate_burst=10**9,
    )
    listener = MemoryListener()
    with trio.fail_after(HANG):
        async with trio.open_nursery() as clients:
            with trio.CancelScope() as server_scope:
                async with trio.open_nursery() as server_nursery:
                    server = await server_nursery.start(
                        lambda task_status: serve(config, listeners=[listener], task_status=task_status)
                    )
                    acked = [trio.Event(), trio.Event()]
                    for session, user, event in (("a", "alice", acked[0]), ("b", "bob", acked[1])):
                        clients.start_soon(flood, listener, session, user, event)
                    # Both sessions have committed once, and have more queued behind.
                    for event in acked:
                        await event.wait()
                    busy = [
                        s.core.committing or s.core.has_pending for s in server.registry.sessions.values()
                    ]
                    server_scope.cancel()
                    cancelled_at = trio.current_time()
            returned_after = trio.current_time() - cancelled_at
            clients.cancel_scope.cancel()
    print(f"cancelled mid-commit (writer {SLOW_COMMIT * 1000:.0f} ms per batch): returned after {returned_after * 1000:.0f} ms")
    assert busy == [True, True]
    assert returned_after < 1.0
