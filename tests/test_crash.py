"""Crash safety: SIGKILL the server while clients stream commands; nothing acknowledged is lost.

Each round starts `collab-trio serve` on the same data directory, first checks
what the previous (killed) server acknowledged, then lets a few clients stream
`add_item` / `move_item` commands as fast as a small in-flight window allows
and kills the server with SIGKILL at a random (seeded) moment. After the last
round one more server checks the last round's acknowledgements.

What must hold after every restart, per session:
- every command acknowledged to its sender, or relayed to another member (the
  server relays only what is stored), is in the document: an acknowledged
  add_item's item exists; after an acknowledged move_item the item's x_mm is
  at least the move's (a client's moves carry increasing x_mm);
- `version` >= the highest seq acknowledged or relayed, and >= the version
  seen after the previous restart (versions never go backwards);
- the epoch never changes (a crash discards no history).
"""

from __future__ import annotations

import json
import os
import random
import signal
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from collab_trio.testing import HANG, command, expect_json, recv_json, server_process, sync_request, tcp_client

# Override to explore: COLLAB_TRIO_CRASH_SEED=7 COLLAB_TRIO_CRASH_ROUNDS=100 pytest tests/test_crash.py
ROUNDS = int(os.environ.get("COLLAB_TRIO_CRASH_ROUNDS", "20"))
SEED = int(os.environ.get("COLLAB_TRIO_CRASH_SEED", "20240611"))
# Kill this long after the clients started streaming (seconds).
KILL_AFTER = (0.05, 0.4)
# Commands a client has sent but not yet seen acknowledged. Keeps every
# outbox far below the server's 1013 limit while still streaming flat out.
WINDOW = 32
# New items per client per round: the rest are moves. Keeps the whole
# document (read in one sync:state message) far below the 1 MiB frame
# limit, also when more rounds are asked for.
ADDS_PER_ROUND = max(2, min(25, 1000 // ROUNDS))
# (session, user) of the streaming clients.
CLIENTS = (("crash-a", "alice"), ("crash-a", "bob"), ("crash-b", "carol"))
SESSIONS = tuple(sorted({session for session, _ in CLIENTS}))
# --snapshot-bytes per round: snapshots and journal compaction at every pace
# (a move is ~150 bytes; 1K: as often as the document's own size allows).
SNAPSHOT_BYTES = ("1K", "16K", "160K")
# The per-connection rate limit (200/s by default) would drop most of the
# stream: this test is about durability under load, not about flood control.
SERVER_ARGS = ("--fsync", "normal", "--rate-limit", "1000000", "--rate-burst", "1000000")
# Upper bound for one round: start, audit, stream, kill, clients gone.
ROUND_TIMEOUT = 30


@attrs.define(eq=False)
class Streamer:
    """One client of a round: what it sent, and every ack and relay it received."""

    session: str
    user: str
    op_prefix: str
    rng: random.Random
    window: trio.Semaphore = attrs.field(factory=lambda: trio.Semaphore(WINDOW))
    first_ack: trio.Event = attrs.field(factory=trio.Event)
    # op_id -> (action, item_id, x_mm) for every command sent.
    sent: dict[str, tuple[str, str, float]] = attrs.field(factory=dict)
    # op_id -> seq of every ack received.
    acked: dict[str, int] = attrs.field(factory=dict)
    # Commands of other members relayed to this client.
    heard: list[dict[str, Any]] = attrs.field(factory=list)
    # Anything else unexpected: errors, a close other than the crash's 1006.
    problems: list[str] = attrs.field(factory=list)
    join_version: int = -1
    join_epoch: str = ""

    def next_command(self, n: int, items: list[str]) -> dict[str, Any]:
        """Command number n: an add_item now and then, else a move of one of `items`."""
        op_id = f"{self.op_prefix}-{n}"
        if len(items) < ADDS_PER_ROUND and (not items or self.rng.random() < 0.25):
            action, item_id, x_mm = "add_item", op_id, 0.0
            data = {"x_mm": x_mm, "y_mm": float(n)}
            items.append(item_id)
        else:
            # x_mm grows with n: a later move of the same item has a larger x_mm.
            action, item_id, x_mm = "move_item", self.rng.choice(items), float(n)
            data = {"x_mm": x_mm, "y_mm": self.rng.uniform(-50, 50), "angle_deg": float(n % 360)}
        self.sent[op_id] = (action, item_id, x_mm)
        return command(action, item_id, data, op_id=op_id)

    async def run(self, port: int, go: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
        """Join, wait for `go`, then stream until the server dies."""
        async with tcp_client(port, f"/ws/{self.session}/{self.user}") as ws:
            ack = await expect_json(ws, "connection:ack")
            self.join_version, self.join_epoch = ack["version"], ack["epoch"]
            task_status.started()
            await go.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, ws)
                nursery.start_soon(self._receive_loop, ws, nursery.cancel_scope)

    async def _send_loop(self, ws: WebSocketConnection) -> None:
        items: list[str] = []
        n = 0
        try:
            # Bounded: the server is killed long before this many commands.
            while n < 1_000_000:
                await self.window.acquire()
                n += 1
                await ws.send_message(json.dumps(self.next_command(n, items)))
        except (ConnectionClosed, trio.BrokenResourceError):
            pass  # the server died: the receive loop ends the client

    async def _receive_loop(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        try:
            while True:
                message = json.loads(await ws.get_message())
                kind = message["type"]
                if kind == "ack":
                    self.acked[message["op_id"]] = message["seq"]
                    self.first_ack.set()
                    self.window.release()
                elif kind == "command":
                    self.heard.append(message)
                elif kind not in ("user:joined", "user:left", "host:changed"):
                    self.problems.append(f"unexpected message {message}")
                    if kind == "error":
                        self.window.release()
        except (ConnectionClosed, trio.BrokenResourceError) as exc:
            reason = getattr(exc, "reason", None)
            if reason is not None and reason.code != 1006:
                # 1006: the TCP connection ended without a close frame, as a crash does.
                self.problems.append(f"closed by the server with {reason.code} {reason.reason!r}")
        scope.cancel()

    @property
    def highest_seq(self) -> int:
        """The highest seq this client heard of (acknowledged or relayed)."""
        seqs = [*self.acked.values(), *(m["seq"] for m in self.heard)]
        return max(seqs, default=0)


@attrs.define
class Expectations:
    """What the stored document of one session must contain from now on."""

    # item_id -> lowest x_mm the item may have.
    items: dict[str, float] = attrs.field(factory=dict)
    min_version: int = 0
    epoch: str | None = None

    def require(self, action: str, item_id: str, x_mm: float) -> None:
        # add_item carries x_mm 0.0, every move a larger x_mm than the ones before.
        self.items[item_id] = max(x_mm, self.items.get(item_id, x_mm))


async def audit(port: int, session: str, expected: Expectations) -> tuple[int, int]:
    """Read the session with a fresh client and check it; returns (version, items)."""
    async with tcp_client(port, f"/ws/{session}/auditor") as ws:
        ack = await expect_json(ws, "connection:ack")
        await ws.send_message(json.dumps(sync_request()))
        answer = await recv_json(ws)
    assert answer["type"] == "sync:state", answer
    version, epoch = answer["version"], answer["epoch"]
    assert ack["version"] == version
    state = answer["state"]
    items = {item["uuid"]: item for item in (state["items"] if state else [])}
    if state is not None:
        assert state["version"] == version
    assert version >= expected.min_version, (
        f"{session}: version went back to {version}; acknowledged or seen before: {expected.min_version}"
    )
    if expected.epoch is not None:
        assert epoch == expected.epoch, f"{session}: epoch changed by a crash"
    missing = sorted(set(expected.items) - set(items))
    assert not missing, f"{session}: {len(missing)} acknowledged item(s) lost, e.g. {missing[:5]}"
    behind = {
        item_id: (items[item_id].get("x_mm"), x_mm)
        for item_id, x_mm in expected.items.items()
        if not items[item_id].get("x_mm", -1.0) >= x_mm
    }
    assert not behind, f"{session}: acknowledged moves lost (stored x_mm, acked x_mm): {behind}"
    # A session nothing was ever written to is not stored: it may get a new
    # epoch when it loads again (no history to lose). Once written, never.
    expected.min_version, expected.epoch = version, epoch if version > 0 else None
    return version, len(items)


def record(streamers: list[Streamer], expected: dict[str, Expectations]) -> None:
    """Turn what the clients heard into expectations for the next audit."""
    for streamer in streamers:
        session = expected[streamer.session]
        for op_id in streamer.acked:
            session.require(*streamer.sent[op_id])
        for relayed in streamer.heard:
            command = relayed["command"]
            session.require(command["action"], command["item_id"], command["data"]["x_mm"])
        session.min_version = max(session.min_version, streamer.highest_seq)


async def stream_then_kill(
    port: int, process: trio.Process, round_no: int, delay: float
) -> list[Streamer]:
    """Stream from every client, SIGKILL the server `delay` s after the start."""
    streamers = [
        Streamer(session, user, f"r{round_no}-{user}", random.Random(f"{SEED}-{round_no}-{user}"))
        for session, user in CLIENTS
    ]
    go = trio.Event()
    async with trio.open_nursery() as nursery:
        for streamer in streamers:
            await nursery.start(streamer.run, port, go)
        go.set()
        started = trio.current_time()
        # Every client has something acknowledged before the kill.
        with trio.fail_after(HANG):
            for streamer in streamers:
                await streamer.first_ack.wait()
        await trio.sleep_until(started + delay)  # the crash moment itself, not a wait for an event
        process.kill()
        with trio.fail_after(HANG):
            await process.wait()
        # The nursery ends when every client has seen its connection die.
    assert process.returncode == -signal.SIGKILL
    return streamers


async def test_acknowledged_commands_survive_sigkill(store_kind: str) -> None:
    # Postgres: every round's server is the same node (its --node-id), so it
    # takes the killed one's leases back at once (a new fence) instead of
    # waiting for them to expire.
    server_args = SERVER_ARGS + (("--node-id", "crash-node") if store_kind == "postgres" else ())
    # One line per round on stdout: pytest shows them with -s (or on failure).
    rng = random.Random(SEED)
    expected = {session: Expectations() for session in SESSIONS}
    last_round: tuple[int, float, str, list[Streamer]] | None = None
    print(f"crash test: {store_kind} store, {ROUNDS} rounds, seed {SEED}")
    for round_no in range(ROUNDS + 1):
        with trio.fail_after(ROUND_TIMEOUT):
            snapshot_bytes = rng.choice(SNAPSHOT_BYTES)
            async with server_process(*server_args, "--snapshot-bytes", snapshot_bytes) as server:
                restored = {
                    session: await audit(server.port, session, expected[session]) for session in SESSIONS
                }
                if last_round is not None:
                    number, delay, every, streamers = last_round
                    acked = sum(len(s.acked) for s in streamers)
                    per_client = ", ".join(f"{s.user} {len(s.acked)}" for s in streamers)
                    versions = " ".join(f"{sid} v{v} ({n} items)" for sid, (v, n) in restored.items())
                    print(
                        f"crash round {number:2d}/{ROUNDS}: snapshot-bytes {every:>4}, killed at"
                        f" {delay * 1000:3.0f} ms, acked {acked:5d} ({per_client});"
                        f" restored {versions}"
                    )
                if round_no == ROUNDS:
                    server.process.send_signal(signal.SIGTERM)
                    with trio.fail_after(HANG):
                        assert await server.process.wait() == 0, server.output
                    break
                delay = rng.uniform(*KILL_AFTER)
                streamers = await stream_then_kill(server.port, server.process, round_no + 1, delay)
            for streamer in streamers:
                problems = streamer.problems[:3]
                assert not problems, f"{streamer.user}: {problems}\n{server.output}"
                assert streamer.join_version >= expected[streamer.session].min_version
                if expected[streamer.session].epoch is not None:
                    assert streamer.join_epoch == expected[streamer.session].epoch
            record(streamers, expected)
            last_round = (round_no + 1, delay, snapshot_bytes, streamers)


async def test_changes_only_in_the_pending_log_at_a_sigkill_are_stored_by_the_next_start(tmp_path) -> None:
    """With the writer told to wait an hour, acknowledged changes are in the
    pending log alone when the server is killed; the next server stores
    them before anyone joins, and deletes the log."""
    from collab_trio.store.database import Database, database_path
    from collab_trio.store.pending_log import segment_numbers

    data_dir = tmp_path / "data"
    args = (*SERVER_ARGS, "--data-dir", str(data_dir))
    with trio.fail_after(ROUND_TIMEOUT):
        async with server_process(*args, "--pending-delay", "3600") as server:
            async with tcp_client(server.port, "/ws/log-only/alice") as ws:
                await expect_json(ws, "connection:ack")
                for n in range(20):
                    await ws.send_message(json.dumps(command("add_item", f"i{n}", {"x_mm": n}, op_id=f"o{n}")))
                acks = [await expect_json(ws, "ack") for _ in range(20)]
                assert [ack["seq"] for ack in acks] == list(range(1, 21))
                server.process.kill()
                with trio.fail_after(HANG):
                    await server.process.wait()
        reader = Database(database_path(data_dir), create=False, readonly=True)
        try:
            assert not reader.read(lambda d: d.exists("log-only"))  # SQLite never saw them
        finally:
            reader.close()
        assert segment_numbers(data_dir)
        async with server_process(*args) as server:
            assert segment_numbers(data_dir) == [max(segment_numbers(data_dir))]  # only the new one
            async with tcp_client(server.port, "/ws/log-only/bob") as ws:
                ack = await expect_json(ws, "connection:ack")
                assert ack["version"] == 20
                await ws.send_message(json.dumps(sync_request()))
                state = await expect_json(ws, "sync:state")
                assert sorted(item["uuid"] for item in state["state"]["items"]) == sorted(f"i{n}" for n in range(20))
            assert "Stored 20 acknowledged change(s) from the pending log" in "\n".join(server.lines)
            server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(HANG):
                assert await server.process.wait() == 0
    assert segment_numbers(data_dir) == []
