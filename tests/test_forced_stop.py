"""A second Ctrl+C stops the server at once, even with slow commits in flight.

Each round starts `collab-trio serve` on a fresh data directory with a disk
slowed to 300 ms per commit (--fault-commit-delay), lets clients in two
sessions flood add_item commands without waiting for acks, sends SIGINT,
waits until the server says it is shutting down, and sends SIGINT again: the
process must exit with 130 within a second of that second signal.

A third session holds a client that never answers a close handshake, and the
grace period is long: the graceful stop can't finish on its own before the
second signal, whatever the session layer does first.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from collab_trio.testing import HANG, START_TIMEOUT, expect_json, server_process, tcp_client

ROUNDS = int(os.environ.get("COLLAB_TRIO_FORCED_STOP_ROUNDS", "20"))
# Measured from the second SIGINT to the exit of the process.
FORCED_EXIT_LIMIT = 1.0
COMMIT_DELAY = 0.3
SERVER_ARGS = (
    "--fault-commit-delay", str(COMMIT_DELAY),
    "--shutdown-timeout", "60",
    # Flood control would drop most of the flood: this test is about stopping.
    "--rate-limit", "1000000", "--rate-burst", "1000000",
)
FLOODERS = (("forced-a", "alice"), ("forced-a", "bob"), ("forced-b", "carol"), ("forced-b", "dave"))
UPGRADE = (
    b"GET /ws/forced-mute/mute HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


@attrs.define(eq=False)
class Flooder:
    """A client that sends add_item commands as fast as the socket takes them."""

    session: str
    user: str
    sent: int = 0
    acked: int = 0
    # Close codes of the server, if it closed this client before the stop.
    close_code: int | None = None

    async def run(self, port: int, joined: trio.Event, committed: trio.Event) -> None:
        async with tcp_client(port, f"/ws/{self.session}/{self.user}") as ws:
            await expect_json(ws, "connection:ack")
            joined.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, ws)
                nursery.start_soon(self._receive_loop, ws, committed, nursery.cancel_scope)

    async def _send_loop(self, ws: WebSocketConnection) -> None:
        try:
            while True:
                self.sent += 1
                item_id = f"{self.user}-{self.sent}"
                command = {
                    "action": "add_item",
                    "item_type": "lens",
                    "item_id": item_id,
                    "data": {"x_mm": float(self.sent), "y_mm": 0.0, "label": "x" * 64},
                }
                await ws.send_message(json.dumps({"type": "command", "command": command, "op_id": item_id}))
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server stopped

    async def _receive_loop(
        self, ws: WebSocketConnection, committed: trio.Event, scope: trio.CancelScope
    ) -> None:
        # Reading everything keeps this client from counting as a slow one.
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] in ("ack", "command"):
                    self.acked += message["type"] == "ack"
                    committed.set()
        except ConnectionClosed as exc:
            if exc.reason is not None and exc.reason.code not in (1001, 1006):
                # Closed for what a commit answered (e.g. 1013, too many acks queued).
                self.close_code = exc.reason.code
                committed.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def hold_mute_client(port: int, joined: trio.Event) -> None:
    """Join, then never read again: this member never answers a close handshake."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(UPGRADE)
        with trio.fail_after(HANG):
            assert (await stream.receive_some()).startswith(b"HTTP/1.1 101")
        joined.set()
        await trio.sleep_forever()
    finally:
        await trio.aclose_forcefully(stream)


@attrs.frozen
class Round:
    """What one round measured."""

    exit_time: float
    sent: int
    acked: int
    # Flooders the server closed before the stop, by close code.
    closed: dict[int, int]


async def forced_stop_round(data_dir: Path) -> Round:
    """One server, flooded, stopped twice."""
    async with server_process(*SERVER_ARGS, "--data-dir", str(data_dir)) as server:
        flooders = [Flooder(session, user) for session, user in FLOODERS]
        joined = [trio.Event() for _ in range(len(flooders) + 1)]
        committed = trio.Event()
        async with trio.open_nursery() as nursery:
            # All at once: the sessions load in the same slow transaction.
            nursery.start_soon(hold_mute_client, server.port, joined[-1])
            for flooder, flooder_joined in zip(flooders, joined):
                nursery.start_soon(flooder.run, server.port, flooder_joined, committed)
            with trio.move_on_after(HANG):
                for event in joined:
                    await event.wait()
                # A commit came back (ack, relay or a close it caused), and the
                # flood since is queued behind the next slow one: commits are
                # in flight.
                await committed.wait()
            if not committed.is_set():
                pytest.fail(
                    f"no commit within {HANG} s (joined: {[e.is_set() for e in joined]},"
                    f" sent: {[f.sent for f in flooders]}):\n{server.output}"
                )
            server.process.send_signal(signal.SIGINT)
            # Two signals before the server reads the first may merge into one.
            await server.wait_for("Received SIGINT: shutting down")
            assert server.process.returncode is None, server.output
            server.process.send_signal(signal.SIGINT)
            signalled_at = trio.current_time()
            with trio.move_on_after(HANG):
                await server.process.wait()
            exit_time = trio.current_time() - signalled_at
            returncode = server.process.returncode
            if returncode is None:
                pytest.fail(f"still running {HANG} s after the second SIGINT:\n{server.output}")
            nursery.cancel_scope.cancel()
        await server.wait_for("Received SIGINT again")  # and its output has ended by now
    output = server.output
    assert returncode == 130, output
    assert exit_time < FORCED_EXIT_LIMIT, f"exited {exit_time:.3f} s after the second SIGINT:\n{output}"
    assert "Traceback" not in output, output
    closed: dict[int, int] = {}
    for flooder in flooders:
        if flooder.close_code is not None:
            closed[flooder.close_code] = closed.get(flooder.close_code, 0) + 1
    return Round(exit_time, sum(f.sent for f in flooders), sum(f.acked for f in flooders), closed)


async def test_second_sigint_exits_130_within_a_second_under_a_commit_flood(tmp_path: Path) -> None:
    exit_times = []
    for round_no in range(1, ROUNDS + 1):
        with trio.fail_after(START_TIMEOUT + 3 * HANG):
            result = await forced_stop_round(tmp_path / f"round-{round_no}")
        exit_times.append(result.exit_time)
        closed = "".join(f", {n} closed with {code}" for code, n in sorted(result.closed.items()))
        # Shown with -s (or on failure).
        print(
            f"forced stop {round_no:2d}/{ROUNDS}: exit 130 in {result.exit_time * 1000:4.0f} ms"
            f" ({result.sent} commands sent, {result.acked} acked{closed})"
        )
    print(f"forced stop: max {max(exit_times) * 1000:.0f} ms over {ROUNDS} rounds")
