"""A flood onto a slow disk: the server's memory stays bounded and nothing acknowledged is lost.

A real `collab-trio serve` whose every store transaction takes 200 ms
(--fault-commit-delay) gets 10 clients, one session each, sending add_item /
update_item commands with 1-4 KB of data as fast as their sockets take them.
The server can't commit that fast, so it must push back (stop reading) rather
than buffer: its resident memory, sampled from /proc every 0.2 s, stays under
200 MB. Then the flood stops, every command is answered, the server stops
gracefully, and a new server on the same data directory has every
acknowledged change.

The server runs with its default limits (--max-pending-bytes 1 MiB per
session, --store-queue-bytes 8 MiB for the store), which the flood reaches
within a second; a commit never releases more acks than half a client's
outbox holds.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from collab_trio.testing import HANG, START_TIMEOUT, expect_json, server_process, tcp_client

CLIENTS = 10
FLOOD_SECONDS = float(os.environ.get("COLLAB_TRIO_FLOOD_SECONDS", "8"))
# Each client adds this many items, then keeps updating them.
ITEMS = 10
PAYLOAD_BYTES = (1024, 4096)
RSS_LIMIT_MB = 200
SAMPLE_EVERY = 0.2
SERVER_ARGS = (
    "--fault-commit-delay", "0.2",
    # Flood control would drop most of the flood: this test is about flow control.
    "--rate-limit", "1000000", "--rate-burst", "1000000",
)
# Answers for what was sent before the flood stopped: a few slow commits.
DRAIN_TIMEOUT = 15
SEED = 20240612


@attrs.define(eq=False)
class Flooder:
    """One client: what it sent and what the server answered."""

    session: str
    user: str
    rng: random.Random
    # op_id -> (item_id, rev) of every command sent.
    sent: dict[str, tuple[str, int]] = attrs.field(factory=dict)
    acked: set[str] = attrs.field(factory=set)
    errors: list[dict[str, Any]] = attrs.field(factory=list)
    close_code: int | None = None
    # Set when every command sent is answered, or the server closed the connection.
    done: trio.Event = attrs.field(factory=trio.Event)
    _sending: bool = True

    def command(self, n: int) -> dict[str, Any]:
        """Command n: add the first ITEMS items, then update them in turn, rev = n."""
        op_id = f"{self.user}-{n}"
        item_id = f"{self.user}-item-{n % ITEMS}"
        action = "add_item" if n < ITEMS else "update_item"
        data = {"rev": n, "payload": "p" * self.rng.randint(*PAYLOAD_BYTES)}
        self.sent[op_id] = (item_id, n)
        command = {"action": action, "item_type": "lens", "item_id": item_id, "data": data}
        return {"type": "command", "command": command, "op_id": op_id}

    def _check_answered(self) -> None:
        if not self._sending and len(self.acked) + len(self.errors) >= len(self.sent):
            self.done.set()

    async def run(self, port: int, joined: trio.Event, stop_at: trio.Event) -> None:
        async with tcp_client(port, f"/ws/{self.session}/{self.user}") as ws:
            await expect_json(ws, "connection:ack")
            joined.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, ws, nursery.cancel_scope)
                await self._send_loop(ws, stop_at)
                # Then wait until everything is answered (the caller bounds it).
                await self.done.wait()
                nursery.cancel_scope.cancel()

    async def _send_loop(self, ws: WebSocketConnection, stop_at: trio.Event) -> None:
        n = 0
        try:
            # Never cancelled in the middle of a frame: the flag is checked
            # between messages, so the connection stays usable for the acks.
            while not stop_at.is_set():
                await ws.send_message(json.dumps(self.command(n)))
                n += 1
        except (ConnectionClosed, trio.BrokenResourceError):
            pass  # recorded by the receive loop
        self._sending = False
        self._check_answered()

    async def _receive_loop(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] == "ack":
                    self.acked.add(message["op_id"])
                elif message["type"] == "error":
                    self.errors.append(message)
                self._check_answered()
        except ConnectionClosed as exc:
            self.close_code = int(exc.reason.code) if exc.reason else 1005
            self.done.set()
            scope.cancel()


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (VmRSS is in kB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def sample_rss(pid: int, samples: list[float]) -> None:
    while True:
        samples.append(rss_mb(pid))
        await trio.sleep(SAMPLE_EVERY)  # the sampling rate, not a wait for something


async def stored_revs(port: int, session: str) -> dict[str, int]:
    """item_id -> stored rev, read with sync:request by a fresh client."""
    async with tcp_client(port, f"/ws/{session}/auditor") as ws:
        await expect_json(ws, "connection:ack")
        with trio.fail_after(HANG):
            await ws.send_message(json.dumps({"type": "sync:request"}))
            while (answer := json.loads(await ws.get_message()))["type"] != "sync:state":
                assert answer["type"] in ("user:joined", "user:left", "host:changed"), answer
    state = answer["state"] or {"items": []}
    return {item["uuid"]: item["rev"] for item in state["items"]}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
async def test_flood_on_a_slow_disk_stays_bounded_and_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    flooders = [
        Flooder(f"bp-{i}", f"u{i}", random.Random(f"{SEED}-{i}")) for i in range(CLIENTS)
    ]
    samples: list[float] = []
    with trio.fail_after(START_TIMEOUT + FLOOD_SECONDS + DRAIN_TIMEOUT + 2 * HANG):
        async with server_process(*SERVER_ARGS, "--data-dir", str(data_dir)) as server:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample_rss, server.process.pid, samples)
                joined = [trio.Event() for _ in flooders]
                async with trio.open_nursery() as clients:
                    for flooder, event in zip(flooders, joined):
                        clients.start_soon(flooder.run, server.port, event, stop)
                    with trio.fail_after(HANG):
                        for event in joined:
                            await event.wait()
                    await trio.sleep(FLOOD_SECONDS)  # the length of the flood
                    stop.set()
                    flood_ended = trio.current_time()
                    with trio.move_on_after(DRAIN_TIMEOUT):
                        for flooder in flooders:
                            await flooder.done.wait()
                    drained = trio.current_time() - flood_ended
                    clients.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
            sent = sum(len(f.sent) for f in flooders)
            acked = sum(len(f.acked) for f in flooders)
            errors = sum(len(f.errors) for f in flooders)
            closed = {f.user: f.close_code for f in flooders if f.close_code is not None}
            # Shown with -s (or on failure).
            print(
                f"backpressure: {CLIENTS} clients, {FLOOD_SECONDS:g} s flood: {sent} commands sent,"
                f" {acked} acked, {errors} errors, closed {closed or 'none'};"
                f" answered {drained:.1f} s after the flood;"
                f" server RSS max {max(samples):.1f} MB"
                f" (first {samples[0]:.1f} MB, {len(samples)} samples)"
            )
            assert max(samples) < RSS_LIMIT_MB, f"RSS samples (MB): {samples}\n{server.output}"
            assert not closed, f"clients closed by the server during the flood: {closed}\n{server.output}"
            unanswered = {f.user: len(f.sent) - len(f.acked) - len(f.errors) for f in flooders}
            assert not any(unanswered.values()), f"commands never answered: {unanswered}\n{server.output}"
            assert errors == 0, [e for f in flooders for e in f.errors][:3]
            server.process.send_signal(signal.SIGINT)
            with trio.fail_after(HANG):
                assert await server.process.wait() == 0, server.output
        async with server_process("--data-dir", str(data_dir)) as restarted:
            stored = 0
            for flooder in flooders:
                revs = await stored_revs(restarted.port, flooder.session)
                expected: dict[str, int] = {}
                for op_id in flooder.acked:
                    item_id, rev = flooder.sent[op_id]
                    expected[item_id] = max(rev, expected.get(item_id, rev))
                missing = sorted(set(expected) - set(revs))
                assert not missing, f"{flooder.session}: acknowledged items lost: {missing}"
                behind = {i: (revs[i], rev) for i, rev in expected.items() if revs[i] < rev}
                assert not behind, f"{flooder.session}: acknowledged updates lost (stored, acked): {behind}"
                # An update is in the document when it or a later one of its item is.
                acked_changes = [flooder.sent[op_id] for op_id in flooder.acked]
                stored += sum(1 for item_id, rev in acked_changes if rev <= revs[item_id])
            restarted.process.send_signal(signal.SIGINT)
            with trio.fail_after(HANG):
                assert await restarted.process.wait() == 0, restarted.output
    print(f"backpressure: after a restart, {stored} of {acked} acknowledged changes are in the documents")
