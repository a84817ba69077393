#!/usr/bin/env python3
"""Fan-out: collab-trio against a reference asyncio + websockets relay, in one run.

    python benchmarks/fanout.py [--repeat 2] [--generators 2] [--users 10,30,50]
        [--commands 2000] [--fixed-rate 300] [--fixed-seconds 4] [--lab-seconds 30]
    python benchmarks/fanout.py --short      # a few seconds, the same tables (CI)

Two servers (three with the variant, below), each a child process on a
free loopback port, a fresh one for every scenario run, alternating
(reference, collab-trio, reference, ... with `--repeat`; the tables show the
median of the repeats):

- collab-trio: `python -m collab_trio serve --port 0` with a fresh SQLite
  data directory (`--collab-store memory` for the memory store), the rate
  limit lifted and room for 100 users per session;
- the reference relay, benchmarks/reference_relay.py: the server a Python
  team would otherwise write on asyncio + websockets (json, `broadcast`),
  with the same protocol subset (join, relay each command to the others
  with a seq, ack the sender, relay cursors) and no document, no storage.

The load comes from separate generator processes (asyncio + `websockets`
clients, orjson): the sender has a process of its own, the receivers are
split over `--generators` more (default 2), so that the generators are not
what is measured; the busiest generator's CPU is in the tables to show it.
A delivery is one command received by one receiver. The server's CPU comes
from /proc/PID/stat (utime + stime, all its threads, 10 ms ticks) read
before and after each measured phase, like the generators' CPU; what the
rest of the machine used meanwhile (from /proc/stat) is shown too: other
jobs on the machine slow both servers down, CPU per delivery least of all
the numbers. Latency is receipt time minus the
send time the sender put into the command (time.monotonic_ns():
CLOCK_MONOTONIC, one clock for every process of the machine).

A change to collab-trio is best measured against collab-trio itself, in
one alternating run (from one run to the next this machine moves both
servers' numbers by more than most changes do): `--servers
collab-trio,variant` runs a second collab-trio, the variant, changed by
`--variant-args` (more `serve` options), `--variant-env NAME=VALUE` and
`--variant-pythonpath DIR` (its collab_trio from DIR, e.g. the src of a
`git worktree` of another commit), and adds a variant/collab column. The
variant runs in a temporary directory: give files in its options as
absolute paths. A single option without a value is given as
`--variant-args=--debug`.

Scenarios:
- saturated (one per `--users` count): one session; user 0 sends
  `--commands` add_item commands (distinct item ids, ~330-byte Optiverse
  lens data) back to back, reading its acks meanwhile, the others receive.
  The phase ends when every receiver has every command (or at `--timeout`,
  then the shortfall is reported). deliveries/s is counted from the first
  send to the last receipt. A client the server closes (collab-trio closes
  a client that can't keep up with 1013) is reported with its close code.
- fixed rate: `--fixed-users` users, user 0 sends `--fixed-rate` add_item a
  second for `--fixed-seconds`: p50/p99 of send-to-receipt latency over
  every delivery, server CPU per delivery.
- lab: `--lab-users` users (30) edit one document of `--lab-items` (50)
  lenses that user 0 adds first; item i belongs to user i mod users, and
  only its owner changes it (Optiverse has no merge of concurrent edits of
  one item). `--lab-draggers` (8) users drag their items at `--move-rate`
  (60) move_item a second, switching item every second; every other user
  replaces one of its items (update_item) every `--update-every` (3) s, and
  halfway removes its second item and adds a new one. Every user moves its
  cursor at `--cursor-rate` (20) a second and pings every 30 s (Optiverse's
  heartbeat); like Optiverse, a move carries the item's whole data and each
  client applies its own commands to its local copy when it sends them and
  everyone else's when they arrive. Reported: disconnects (should be 0),
  commands whose delivery no later command supersedes that did not arrive
  (should be 0), moves the server coalesced (collab-trio drops a queued
  move of an item when a newer one of that item comes; the reference relay
  never does), p50/p99 latency of commands and cursors, server CPU, and
  convergence: for collab-trio (and the variant), a fresh client joins at the end and sends
  `sync:request`; the items of its `sync:state` must equal every client's
  local copy. The reference relay keeps no state: its clients are compared
  with each other.

The exit status is 0 when every scenario ran, whatever the numbers say
(nothing about speed is asserted), and 2 when a scenario could not run at
all (a server that doesn't start, clients that can't join, a generator that
doesn't answer). Every wait is bounded; every child is stopped (SIGTERM,
then SIGKILL after a grace period) on exit, on errors and on Ctrl+C.
Progress goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import inspect
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from collab_trio import testing

REFERENCE, COLLAB, VARIANT = "reference", "collab-trio", "variant"
SERVERS = (REFERENCE, COLLAB, VARIANT)
# Each table's ratio columns: (numerator, denominator, heading).
RATIOS = ((COLLAB, REFERENCE, "collab/ref"), (VARIANT, COLLAB, "variant/collab"))
RELAY_SCRIPT = Path(__file__).resolve().with_name("reference_relay.py")
SCENARIOS = ("saturated", "fixed", "lab")

# Bounds on every wait on the other side (seconds).
CONNECT_TIMEOUT = 15.0
CLOSE_TIMEOUT = 2.0
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 10.0
GENERATOR_START_TIMEOUT = 60.0
GENERATOR_STOP_TIMEOUT = 3.0
SETUP_TIMEOUT = 20.0
PROBE_TIMEOUT = 15.0
# How long the receivers wait for the setup items before they start editing.
SETUP_ARRIVAL_TIMEOUT = 10.0
# Beyond its own bound, how long the orchestrator waits for a generator's answer.
RPC_MARGIN = 15.0
# The drain gives up when no client of a generator received anything this long.
QUIET_GIVE_UP = 5.0
# The go signal is this far in the future, so that every generator starts together.
START_DELAY_NS = 200_000_000
# How often the orchestrator's waits wake up to let Ctrl+C / SIGTERM in.
SIGNAL_CHECK_S = 0.2
# Optiverse's heartbeat: a ping every 30 s.
PING_INTERVAL_S = 30.0
# A paced sender this far behind its schedule skips ticks instead of bursting.
MAX_LAG_NS = 100_000_000
MAX_ERRORS_KEPT = 5
EXIT_OK, EXIT_BROKEN, EXIT_INTERRUPTED = 0, 2, 130

# Collab-trio as deployed, minus the per-connection rate limit (200 messages/s
# by default: a back-to-back sender would be measuring the limit).
COLLAB_ARGS = ("--rate-limit", "1000000", "--rate-burst", "1000000", "--max-users-per-session", "100")

MOVE_FIELDS = ("x_mm", "y_mm", "angle_deg")
# An Optiverse lens besides its position and our two bookkeeping fields.
LENS_FIELDS: dict[str, Any] = {
    "type": "lens",
    "name": "L3 achromat f=100",
    "efl_mm": 100.0,
    "object_height_mm": 25.4,
    "mm_per_pixel": 0.1,
    "image_path": "components/lenses/achromat_ac254-100-a.png",
    "z_value": 3.0,
    "locked": False,
    "line_width_px": 2.0,
    "reference_line_mm": [-12.7, 0.0, 12.7, 0.0],
}


def lens_data(x: float, y: float, angle: float, **extra: Any) -> dict[str, Any]:
    """The data of a lens at (x, y, angle); `extra` adds n= and sent_ns= (or overrides)."""
    return {"x_mm": round(x, 3), "y_mm": round(y, 3), "angle_deg": round(angle, 2), **LENS_FIELDS, **extra}


def apply_command(items: dict[str, dict[str, Any]], command: dict[str, Any]) -> None:
    """A command on a local copy, as the server applies it to its document (docs/PROTOCOL.md)."""
    action = command.get("action")
    item_id = command.get("item_id")
    data = command.get("data")
    if not isinstance(data, dict):
        data = {}
    if action in ("add_item", "update_item"):
        items[item_id] = dict(data)
    elif action == "move_item":
        item = items.get(item_id)
        if item is not None:
            for field in MOVE_FIELDS:
                if field in data:
                    item[field] = data[field]
    elif action == "remove_item":
        items.pop(item_id, None)


def items_digest(items: dict[str, dict[str, Any]]) -> str:
    """A short fingerprint of a set of items (order-independent)."""
    return hashlib.sha256(orjson.dumps(items, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def server_items(state: Any) -> dict[str, dict[str, Any]]:
    """The items of a sync:state `state`, keyed by uuid, without the fields the server adds."""
    items = state.get("items") if isinstance(state, dict) else None
    if not isinstance(items, list):
        items = []
    return {
        item["uuid"]: {k: v for k, v in item.items() if k not in ("uuid", "item_type")}
        for item in items
        if isinstance(item, dict) and "uuid" in item
    }


def _connect_options() -> dict[str, Any]:
    """Client settings: no compression (collab-trio has none), no WebSocket-level
    pings (neither server needs them), no proxy from the environment."""
    options: dict[str, Any] = {
        "compression": None, "ping_interval": None, "open_timeout": CONNECT_TIMEOUT,
        "close_timeout": CLOSE_TIMEOUT, "max_queue": 1024, "max_size": None,
    }
    if "proxy" in inspect.signature(connect.__init__).parameters:
        options["proxy"] = None
    return options


def client_uri(url: str, session: str, user: str) -> str:
    return f"{url}/ws/{quote(session, safe='')}/{quote(user, safe='')}"


# ---------------------------------------------------------------------------
# Generator side: one asyncio process holding some of the clients


class Peer:
    """One client connection in a generator, and what it saw."""

    def __init__(self, user: str, ws: ClientConnection, *, keep_items: bool, track_ids: bool) -> None:
        self.user = user
        self.ws = ws
        self.local: dict[str, dict[str, Any]] | None = {} if keep_items else None
        self.seen: set[str] | None = set() if track_ids else None
        self.duplicates = 0
        # Per sender: [commands, of which moves, highest n].
        self.senders: dict[str, list[int]] = {}
        self.latencies_us: list[int] = []
        self.cursor_latencies_us: list[int] = []
        self.cursors = 0
        self.acks = 0
        self.pongs = 0
        self.first_recv_ns = 0
        self.last_recv_ns = 0
        self.last_any_ns = time.monotonic_ns()
        self.measuring = False
        self.errors: list[str] = []
        self.error_count = 0
        # What this client sent (measured phase only).
        self.sent = 0
        self.sent_moves = 0
        self.cursors_sent = 0
        self.first_send_ns = 0
        self.last_send_ns = 0
        self.next_n = 0
        self.op_counter = 0
        # Set when the expected commands (and own acks) are all in, or the connection ended.
        self.expected: dict[str, list[int]] | None = None
        self.finished = asyncio.Event()
        self.closing = False
        self.closed: tuple[int | None, str] | None = None
        self.reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, session: str, user: str, **kwargs: Any) -> Peer:
        ws = await connect(client_uri(url, session, user), **_connect_options())
        try:
            first = orjson.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT))
            if first.get("type") != "connection:ack":
                raise RuntimeError(f"first message is not connection:ack: {str(first)[:200]}")
        except BaseException:
            await ws.close()
            raise
        peer = cls(user, ws, **kwargs)
        peer.reader = asyncio.get_running_loop().create_task(peer.read())
        return peer

    def note_error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{self.user}: {text}")

    async def read(self) -> None:
        try:
            async for text in self.ws:
                try:
                    self.handle(text)
                except Exception as exc:  # a bug here must not look like a disconnect
                    self.note_error(f"handling {str(text)[:100]!r}: {exc!r}")
        except ConnectionClosed:
            pass
        finally:
            if not self.closing:
                self.closed = (self.ws.close_code, self.ws.close_reason or "")
            self.finished.set()

    def handle(self, text: str | bytes) -> None:
        message = orjson.loads(text)
        kind = message.get("type")
        now = self.last_any_ns = time.monotonic_ns()
        if kind == "command":
            command = message.get("command") or {}
            data = command.get("data") or {}
            n = data.get("n")
            if n is None:  # the lab's setup items
                if self.local is not None:
                    apply_command(self.local, command)
                return
            sender = message.get("user_id")
            stats = self.senders.get(sender)
            if stats is None:
                stats = self.senders[sender] = [0, 0, 0]
            stats[0] += 1
            if command.get("action") == "move_item":
                stats[1] += 1
            if n > stats[2]:
                stats[2] = n
            sent_ns = data.get("sent_ns")
            if self.measuring and sent_ns is not None:
                self.latencies_us.append((now - sent_ns) // 1000)
            if self.seen is not None:
                item_id = command.get("item_id")
                if item_id in self.seen:
                    self.duplicates += 1
                else:
                    self.seen.add(item_id)
            if self.local is not None:
                apply_command(self.local, command)
            if not self.first_recv_ns:
                self.first_recv_ns = now
            self.last_recv_ns = now
            if self.expected is not None:
                self.check()
        elif kind == "cursor":
            self.cursors += 1
            sent_ns = message.get("t")
            if self.measuring and sent_ns is not None:
                self.cursor_latencies_us.append((now - sent_ns) // 1000)
        elif kind == "ack":
            self.acks += 1
            if self.expected is not None:
                self.check()
        elif kind == "pong":
            self.pongs += 1
        elif kind == "error":
            self.note_error(f"error {message.get('code')}: {message.get('message')}")

    def expect(self, expected: dict[str, list[int]]) -> None:
        """From now on, finish when every sender's last command and all must-deliver ones are in.

        `expected[user]` = [last n, commands that no later one supersedes (not moves)];
        for this client itself, its acks must all be in.
        """
        self.expected = expected
        self.check()

    def check(self) -> None:
        assert self.expected is not None
        for user, (last_n, must) in self.expected.items():
            if user == self.user:
                continue
            stats = self.senders.get(user)
            if stats is None:
                if last_n:
                    return
                continue
            if stats[2] < last_n or stats[0] - stats[1] < must:
                return
        if self.acks < self.sent:
            return
        self.finished.set()

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False once the connection is gone."""
        if self.closed is not None:
            return False
        try:
            await self.ws.send(orjson.dumps(message).decode())
        except ConnectionClosed:
            return False
        return True

    async def send_command(
        self, action: str, item_id: str, data: dict[str, Any], *, counted: bool = True
    ) -> bool:
        """A command with a unique op_id, applied to the local copy first (like Optiverse)."""
        self.op_counter += 1
        message = {
            "type": "command",
            "op_id": f"{self.user}:{self.op_counter}",
            "command": {"action": action, "item_type": "lens", "item_id": item_id, "data": data},
        }
        if self.local is not None:
            apply_command(self.local, message["command"])
        ok = await self.send(message)
        if ok and counted:
            now = data.get("sent_ns") or time.monotonic_ns()
            self.sent += 1
            if action == "move_item":
                self.sent_moves += 1
            if not self.first_send_ns:
                self.first_send_ns = now
            self.last_send_ns = now
        return ok

    def stamp(self) -> dict[str, int]:
        """The bookkeeping fields of the next counted command."""
        self.next_n += 1
        return {"n": self.next_n, "sent_ns": time.monotonic_ns()}

    def sent_stats(self) -> dict[str, int]:
        return {
            "sent": self.sent, "moves": self.sent_moves, "last_n": self.next_n if self.sent else 0,
            "cursors": self.cursors_sent, "first_send_ns": self.first_send_ns, "last_send_ns": self.last_send_ns,
        }

    def result(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "senders": self.senders,
            "received": sum(stats[0] for stats in self.senders.values()),
            "cursors": self.cursors,
            "acks": self.acks,
            "pongs": self.pongs,
            "duplicates": self.duplicates,
            "closed": self.closed,
            "first_recv_ns": self.first_recv_ns,
            "last_recv_ns": self.last_recv_ns,
            "latencies_us": self.latencies_us,
            "cursor_latencies_us": self.cursor_latencies_us,
            "digest": items_digest(self.local) if self.local is not None else None,
            "items": len(self.local) if self.local is not None else None,
            "errors": self.errors,
            "error_count": self.error_count,
        }

    async def close(self) -> None:
        self.closing = True
        try:
            await asyncio.wait_for(self.ws.close(), CLOSE_TIMEOUT + 1)
        except (asyncio.TimeoutError, OSError, ConnectionClosed):
            pass
        if self.reader is not None:
            self.reader.cancel()
            try:
                await self.reader
            except asyncio.CancelledError:
                pass


async def sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def run_burst(peer: Peer, count: int, bound_ns: int) -> None:
    """The saturated sender: `count` add_item back to back (as fast as the socket takes them)."""
    for k in range(count):
        if time.monotonic_ns() > bound_ns:
            peer.note_error(f"sent only {k} of {count} commands within the time limit")
            return
        stamp = peer.stamp()
        angle = k % 360
        data = lens_data(math.cos(k / 50) * 200, math.sin(k / 50) * 100, angle, **stamp)
        if not await peer.send_command("add_item", f"it-{stamp['n']}", data):
            return


async def run_paced(peer: Peer, rate: float, seconds: float, start_ns: int) -> None:
    """The fixed-rate sender: add_item on a fixed schedule."""
    interval = 1e9 / rate
    for k in range(max(1, round(rate * seconds))):
        await sleep_until(start_ns + int(k * interval))
        stamp = peer.stamp()
        data = lens_data(math.cos(k / 50) * 200, math.sin(k / 50) * 100, k % 360, **stamp)
        if not await peer.send_command("add_item", f"it-{stamp['n']}", data):
            return


def next_tick(due: int, interval: float, now: int) -> int:
    """The next due time of a periodic action, skipping ticks when far behind (a busy UI
    sends the latest position, it doesn't catch up on missed mouse events)."""
    due += int(interval)
    return due if due > now - MAX_LAG_NS else now + int(interval)


async def run_lab_client(peer: Peer, role: dict[str, Any], start_ns: int, end_ns: int) -> None:
    """One lab user: drags or edits its own items, moves its cursor, pings."""
    assert peer.local is not None
    setup_ids = role["setup_items"]
    give_up = time.monotonic_ns() + int(SETUP_ARRIVAL_TIMEOUT * 1e9)
    while not all(item_id in peer.local for item_id in setup_ids):
        if time.monotonic_ns() > give_up or peer.closed is not None:
            peer.note_error("the setup items did not all arrive; not editing")
            return
        await asyncio.sleep(0.01)
    rng = random.Random(peer.user)
    items: list[str] = list(role["items"])
    never = math.inf
    start = max(start_ns, time.monotonic_ns())
    move_interval = 1e9 / role["move_rate"]
    cursor_interval = 1e9 / role["cursor_rate"]
    update_interval = role["update_every"] * 1e9
    next_cursor = start + int(rng.random() * cursor_interval)
    next_move: float = start + int(rng.random() * move_interval) if role["drag"] and items else never
    next_update: float = (
        start + int(rng.uniform(0.2, 1.0) * update_interval) if not role["drag"] and items else never
    )
    next_ping = start + int(rng.random() * PING_INTERVAL_S * 1e9)
    replace_at: float = (start + end_ns) // 2 if not role["drag"] and len(items) > 1 else never
    ticks = 0
    center = rng.uniform(-300, 300), rng.uniform(-200, 200)
    while peer.closed is None:
        now = time.monotonic_ns()
        if now >= end_ns:
            break
        due = min(next_cursor, next_move, next_update, next_ping, replace_at)
        if due > now:
            await sleep_until(int(min(due, end_ns)))
            continue
        if next_move <= now:
            # Drag one item for a second, then the next one.
            item_id = items[int((now - start) // 1_000_000_000) % len(items)]
            ticks += 1
            # Optiverse sends the item's whole data with each move.
            x, y = center[0] + 40 * math.cos(ticks / 30), center[1] + 40 * math.sin(ticks / 30)
            await peer.send_command("move_item", item_id, lens_data(x, y, ticks % 360, **peer.stamp()))
            next_move = next_tick(int(next_move), move_interval, now)
        elif next_cursor <= now:
            x = center[0] + 60 * math.cos(now / 7e8)
            y = center[1] + 60 * math.sin(now / 9e8)
            if await peer.send({"type": "cursor", "x": round(x, 2), "y": round(y, 2), "t": time.monotonic_ns()}):
                peer.cursors_sent += 1
            next_cursor = next_tick(next_cursor, cursor_interval, now)
        elif replace_at <= now:
            old = items.pop()
            await peer.send_command("remove_item", old, peer.stamp())
            new = f"{old}-b"
            await peer.send_command("add_item", new, lens_data(*center, 0.0, **peer.stamp()))
            items.append(new)
            replace_at = never
        elif next_update <= now:
            item_id = items[rng.randrange(len(items))]
            current = peer.local.get(item_id) or lens_data(0, 0, 0)
            data = lens_data(current["x_mm"], current["y_mm"], current["angle_deg"], **peer.stamp())
            data["efl_mm"] = rng.choice((50.0, 75.0, 100.0, 150.0, 200.0))
            data["name"] = f"L f={data['efl_mm']:g}"
            await peer.send_command("update_item", item_id, data)
            next_update = next_tick(int(next_update), update_interval, now)
        elif next_ping <= now:
            await peer.send({"type": "ping"})
            next_ping = next_tick(next_ping, PING_INTERVAL_S * 1e9, now)


class Generator:
    """A generator process's side of the orchestrator's requests (one at a time)."""

    def __init__(self, conn: multiprocessing.connection.Connection, index: int) -> None:
        self.conn = conn
        self.index = index
        self.peers: dict[str, Peer] = {}
        self.roles: dict[str, dict[str, Any]] = {}
        self.mode = ""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        fd = self.conn.fileno()

        def readable() -> None:
            try:
                while self.conn.poll():
                    inbox.put_nowait(self.conn.recv())
            except (EOFError, OSError):  # the orchestrator is gone
                loop.remove_reader(fd)
                inbox.put_nowait(None)

        loop.add_reader(fd, readable)
        self.conn.send({"event": "ready", "pid": os.getpid()})
        try:
            while (request := await inbox.get()) is not None and request["op"] != "exit":
                try:
                    reply = await getattr(self, f"op_{request['op']}")(request)
                except Exception as exc:
                    reply = {
                        "event": "error",
                        "error": "".join(traceback.format_exception_only(exc)).strip(),
                        "traceback": traceback.format_exc(),
                    }
                self.conn.send(reply)
        finally:
            loop.remove_reader(fd)
            await self.close_peers()

    async def close_peers(self) -> None:
        peers, self.peers = list(self.peers.values()), {}
        if peers:
            await asyncio.gather(*(peer.close() for peer in peers))

    async def op_join(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.close_peers()
        self.mode = request["mode"]
        self.roles = request["roles"]
        failed: dict[str, str] = {}
        limit = asyncio.Semaphore(8)

        async def join(user: str) -> None:
            async with limit:
                try:
                    self.peers[user] = await Peer.connect(
                        request["url"], request["session"], user,
                        keep_items=self.mode == "lab", track_ids=self.mode != "lab",
                    )
                except Exception as exc:
                    failed[user] = f"{type(exc).__name__}: {exc}"

        await asyncio.gather(*(join(user) for user in request["users"]))
        return {"event": "joined", "joined": len(self.peers), "failed": failed}

    async def op_setup(self, request: dict[str, Any]) -> dict[str, Any]:
        """The lab's document: one user adds every item, and waits for the acks."""
        peer = self.peers[request["user"]]
        for k, item_id in enumerate(request["items"]):
            x, y = (k % 10) * 60.0 - 270.0, (k // 10) * 50.0 - 100.0
            await peer.send_command("add_item", item_id, lens_data(x, y, 90.0), counted=False)
        deadline = time.monotonic() + SETUP_TIMEOUT
        while peer.acks < len(request["items"]) and peer.closed is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        acked, peer.acks = peer.acks, 0
        return {"event": "setup_done", "acked": acked, "closed": peer.closed}

    async def op_go(self, request: dict[str, Any]) -> dict[str, Any]:
        start_ns, bound_ns = request["start_ns"], request["bound_ns"]
        # No collections of this process's garbage while it measures: a full
        # one (20-40 ms, the received messages are many objects) landed in
        # both servers' p99 at the same command numbers. On again at close.
        gc.collect()
        gc.disable()
        for peer in self.peers.values():
            peer.measuring = True
        await sleep_until(start_ns)
        tasks = []
        for user, role in self.roles.items():
            peer = self.peers[user]
            if "burst" in role:
                coro = run_burst(peer, role["burst"], bound_ns)
            elif "rate" in role:
                coro = run_paced(peer, role["rate"], role["seconds"], start_ns)
            else:
                coro = run_lab_client(peer, role, start_ns, request["end_ns"])
            tasks.append(asyncio.get_running_loop().create_task(coro))
        late = []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, (bound_ns - time.monotonic_ns()) / 1e9))
            for task in pending:
                task.cancel()
                late.append(task.get_name())
            await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "event": "sent",
            "sent": {user: self.peers[user].sent_stats() for user in self.roles},
            "late": len(late),
        }

    async def op_expect(self, request: dict[str, Any]) -> dict[str, Any]:
        """Wait (bounded) until every client has what was sent to it; report everything."""
        expected = request["expected"]
        for peer in self.peers.values():
            peer.expect(expected)
        deadline = time.monotonic() + request["timeout"]
        gave_up = ""
        while not all(peer.finished.is_set() for peer in self.peers.values()):
            now = time.monotonic()
            if now > deadline:
                gave_up = f"drain timeout ({request['timeout']:g} s)"
                break
            quiet = (time.monotonic_ns() - max(p.last_any_ns for p in self.peers.values())) / 1e9
            if quiet > QUIET_GIVE_UP:
                gave_up = f"nothing received for {QUIET_GIVE_UP:g} s"
                break
            await asyncio.sleep(0.05)
        for peer in self.peers.values():
            peer.measuring = False
        return {"event": "result", "peers": [peer.result() for peer in self.peers.values()], "gave_up": gave_up}

    async def op_close(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.close_peers()
        gc.enable()
        gc.collect()
        return {"event": "closed"}


def generator_main(conn: multiprocessing.connection.Connection, index: int) -> None:
    """Entry point of a generator process."""
    # Ctrl+C reaches the whole process group: the orchestrator decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(Generator(conn, index).run())
    except Exception:
        traceback.print_exc()


# ---------------------------------------------------------------------------
# Orchestrator side


class BenchError(Exception):
    """A scenario could not run (a server, a generator, or a join failed)."""


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of a process, from /proc/PID/stat (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    # utime and stime are fields 14 and 15; after the ")" the count starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine spent running something (user, nice, system, irq,
    softirq; not idle, iowait or steal), from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:8]]
    except (OSError, ValueError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Generators:
    """The generator processes (0: the sender's, 1..: receivers') and a request/answer channel to each."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes: list[Any] = []
        self.conns: list[multiprocessing.connection.Connection] = []
        try:
            for index in range(count):
                parent, child = context.Pipe()
                process = context.Process(
                    target=generator_main, args=(child, index), name=f"fanout-generator-{index}", daemon=True
                )
                process.start()
                child.close()
                self.processes.append(process)
                self.conns.append(parent)
            self._answers(dict.fromkeys(range(count), "start"), GENERATOR_START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def __len__(self) -> int:
        return len(self.conns)

    def request(self, requests: dict[int, dict[str, Any]], timeout: float) -> dict[int, dict[str, Any]]:
        """Send each generator its request; their answers, or BenchError after `timeout` seconds."""
        for index, request in requests.items():
            self.conns[index].send(request)
        return self._answers({index: request["op"] for index, request in requests.items()}, timeout)

    def _answers(self, ops: dict[int, str], timeout: float) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        pending = set(ops)
        answers: dict[int, dict[str, Any]] = {}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(f"{i} ({ops[i]})" for i in sorted(pending))
                raise BenchError(f"generator(s) {names} did not answer within {timeout:g} s")
            by_conn = {self.conns[i]: i for i in pending}
            # In slices: a signal delivered to one of the output-reader threads only
            # reaches this (the main) thread when it wakes up.
            for conn in multiprocessing.connection.wait(list(by_conn), timeout=min(remaining, SIGNAL_CHECK_S)):
                index = by_conn[conn]
                try:
                    answer = conn.recv()
                except (EOFError, OSError):
                    raise BenchError(f"generator {index} exited (during {ops[index]})") from None
                if answer.get("event") == "error":
                    raise BenchError(f"generator {index} failed in {ops[index]}: {answer['error']}\n{answer['traceback']}")
                answers[index] = answer
                pending.discard(index)
        return answers

    def cpu(self) -> list[float]:
        return [process_cpu(process.pid) for process in self.processes]

    def stop(self) -> None:
        """Ask each to exit; terminate, then kill, what is still there after the grace period."""
        for conn in self.conns:
            try:
                conn.send({"op": "exit"})
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + GENERATOR_STOP_TIMEOUT
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(GENERATOR_STOP_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join(GENERATOR_STOP_TIMEOUT)
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []


@attrs.define(eq=False)
class ServerUnderTest:
    """One server child process."""

    name: str
    output: testing.ProcessOutput
    port: int
    data_dir: str | None = None

    @property
    def url(self) -> str:
        return f"ws://{testing.LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.output.process.pid

    def cpu(self) -> float:
        return process_cpu(self.pid)

    def stop(self) -> int:
        """SIGTERM, SIGKILL after the grace period; the exit status."""
        try:
            status, _ = self.output.stop(signal.SIGTERM, timeout=SERVER_STOP_TIMEOUT)
            return status
        finally:
            if self.data_dir is not None:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_problems(self) -> list[str]:
        """Warnings, errors and tracebacks in the server's output."""
        markers = ("WARNING", "ERROR", "CRITICAL", "Traceback")
        return [line for line in self.output.lines if any(marker in line for marker in markers)]


def start_server(
    name: str,
    args: argparse.Namespace,
    wrapper: Callable[[str], list[str]] | None = None,
    start_timeout: float = SERVER_START_TIMEOUT,
    collab_args: Sequence[str] = (),
) -> ServerUnderTest:
    """A fresh server of this kind on a free loopback port (BenchError if it
    doesn't start). `wrapper(work_dir)`: what runs the server's command
    (cpu_per_change.py's valgrind); `collab_args`: more options for collab-trio."""
    work_dir = tempfile.mkdtemp(prefix=f"fanout-{name}-")
    env = testing.child_env()
    if name in (COLLAB, VARIANT):
        if name == VARIANT:
            collab_args = [*collab_args, *args.variant_args]
            env.update(args.variant_env)
            if args.variant_pythonpath:
                # First on the path: the variant's collab_trio is that checkout's.
                env["PYTHONPATH"] = os.pathsep.join([args.variant_pythonpath, env["PYTHONPATH"]])
        command = testing.serve_command(
            "--store", args.collab_store, "--data-dir", os.path.join(work_dir, "data"), *COLLAB_ARGS, *collab_args
        )
    else:
        command = [sys.executable, str(RELAY_SCRIPT), "--port", "0", "--json", args.reference_json]
    if wrapper is not None:
        command = [*wrapper(work_dir), *command]
    try:
        output = testing.ProcessOutput(name, command, env, cwd=work_dir)
    except OSError as exc:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise BenchError(f"{name} did not start: {exc}") from None
    try:
        port = int(output.wait_for(testing.LISTENING_RE, start_timeout).group(1))
    except BaseException as exc:
        output.stop(signal.SIGTERM, timeout=SERVER_STOP_TIMEOUT)
        shutil.rmtree(work_dir, ignore_errors=True)
        if isinstance(exc, testing.HarnessError):
            raise BenchError(f"{name} did not start: {str(exc)[-600:]}") from None
        raise
    return ServerUnderTest(name, output, port, work_dir)


async def sync_probe(url: str, session: str) -> dict[str, dict[str, Any]]:
    """What a fresh client gets for sync:request: the server's items."""
    async with connect(client_uri(url, session, "fanout-probe"), **_connect_options()) as ws:
        deadline = time.monotonic() + PROBE_TIMEOUT
        first = orjson.loads(await asyncio.wait_for(ws.recv(), PROBE_TIMEOUT))
        if first.get("type") != "connection:ack":
            raise BenchError(f"probe: first message is not connection:ack: {str(first)[:200]}")
        await ws.send('{"type":"sync:request"}')
        while True:
            message = orjson.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
            if message.get("type") == "sync:state":
                return server_items(message.get("state"))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values (nan if empty)."""
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


@attrs.frozen
class Scenario:
    kind: str  # saturated | fixed | lab
    users: int
    title: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.kind, self.users)


@attrs.define
class RunResult:
    """One scenario against one server."""

    scenario: Scenario
    server: str
    error: str | None = None
    metrics: dict[str, Any] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)


def user_name(index: int) -> str:
    return f"user-{index:02d}"


def assign(scenario: Scenario, args: argparse.Namespace, generators: int) -> tuple[dict[int, list[str]], dict[str, dict[str, Any]], list[str]]:
    """Which generator holds which users, each sender's role, and the lab's setup items."""
    users = [user_name(i) for i in range(scenario.users)]
    placement: dict[int, list[str]] = {g: [] for g in range(generators)}
    roles: dict[str, dict[str, Any]] = {}
    setup_items: list[str] = []
    if scenario.kind == "lab":
        # Everybody sends: spread everybody (draggers included) over every generator.
        for i, user in enumerate(users):
            placement[i % generators].append(user)
        setup_items = [f"lab-{k:03d}" for k in range(args.lab_items)]
        for i, user in enumerate(users):
            roles[user] = {
                "drag": i < args.lab_draggers,
                "items": [item for k, item in enumerate(setup_items) if k % scenario.users == i],
                "setup_items": setup_items,
                "move_rate": args.move_rate,
                "cursor_rate": args.cursor_rate,
                "update_every": args.update_every,
            }
    else:
        # The sender alone in generator 0, the receivers over the others.
        placement[0].append(users[0])
        receivers = list(range(1, generators)) or [0]
        for i, user in enumerate(users[1:]):
            placement[receivers[i % len(receivers)]].append(user)
        if scenario.kind == "saturated":
            roles[users[0]] = {"burst": args.commands}
        else:
            roles[users[0]] = {"rate": args.fixed_rate, "seconds": args.fixed_seconds}
    return placement, roles, setup_items


def run_scenario(scenario: Scenario, server: ServerUnderTest, generators: Generators, args: argparse.Namespace) -> RunResult:
    """Join, (set up,) go, drain, measure, (probe,) close. BenchError if it can't run."""
    result = RunResult(scenario, server.name)
    session = f"fanout-{scenario.kind}-{scenario.users}-{os.urandom(4).hex()}"
    placement, roles, setup_items = assign(scenario, args, len(generators))
    used = [g for g, users in placement.items() if users]
    joined = generators.request({
        g: {
            "op": "join", "url": server.url, "session": session, "users": placement[g], "mode": scenario.kind,
            "roles": {user: roles[user] for user in placement[g] if user in roles},
        }
        for g in used
    }, CONNECT_TIMEOUT * (1 + scenario.users / 8) + RPC_MARGIN)
    failed = {user: why for answer in joined.values() for user, why in answer["failed"].items()}
    if failed:
        first = next(iter(failed.items()))
        raise BenchError(f"{len(failed)} of {scenario.users} clients could not join, e.g. {first[0]}: {first[1]}")
    # Any exception from here on leaves the generators mid-request: the caller
    # replaces them (which closes their clients) instead of asking them to close.
    if scenario.kind == "lab":
        host = user_name(0)
        holder = next(g for g in used if host in placement[g])
        setup = generators.request({holder: {"op": "setup", "user": host, "items": setup_items}},
                                   SETUP_TIMEOUT + RPC_MARGIN)[holder]
        if setup["acked"] < len(setup_items):
            raise BenchError(f"setup: {setup['acked']} of {len(setup_items)} items acknowledged"
                             f" (connection closed: {setup['closed']})")
        seconds = args.lab_seconds
    elif scenario.kind == "fixed":
        seconds = args.fixed_seconds
    else:
        seconds = args.timeout
    cpu0, gen0, wall0 = server.cpu(), generators.cpu(), time.monotonic()
    busy0, own0 = machine_busy(), time.process_time()
    start_ns = time.monotonic_ns() + START_DELAY_NS
    end_ns = start_ns + int(seconds * 1e9)
    bound_ns = end_ns if scenario.kind == "saturated" else end_ns + int(RPC_MARGIN * 1e9)
    sent_answers = generators.request(
        {g: {"op": "go", "start_ns": start_ns, "end_ns": end_ns, "bound_ns": bound_ns} for g in used},
        (bound_ns - time.monotonic_ns()) / 1e9 + RPC_MARGIN,
    )
    sent = {user: stats for answer in sent_answers.values() for user, stats in answer["sent"].items()}
    late = sum(answer["late"] for answer in sent_answers.values())
    if late:
        result.notes.append(f"{late} sending client(s) did not finish in time")
    expected = {user: [s["last_n"], s["sent"] - s["moves"]] for user, s in sent.items()}
    drain = args.timeout if scenario.kind == "saturated" else args.drain_timeout
    answers = generators.request(
        {g: {"op": "expect", "expected": expected, "timeout": drain} for g in used}, drain + RPC_MARGIN
    )
    cpu1, gen1, wall1 = server.cpu(), generators.cpu(), time.monotonic()
    busy1, own1 = machine_busy(), time.process_time()
    for answer in answers.values():
        if answer["gave_up"]:
            result.notes.append(f"drain gave up: {answer['gave_up']}")
    peers = [peer for answer in answers.values() for peer in answer["peers"]]
    # The truth a lab's clients must match: collab-trio's document; the relay has none.
    probe: dict[str, dict[str, Any]] | None = None
    if scenario.kind == "lab" and server.name in (COLLAB, VARIANT):
        try:
            probe = asyncio.run(sync_probe(server.url, session))
        except Exception as exc:
            result.notes.append(f"sync probe failed: {type(exc).__name__}: {exc}")
            probe = {"": {"sync probe": "failed"}}
    generators.request({g: {"op": "close"} for g in used}, CLOSE_TIMEOUT * 4 + RPC_MARGIN)
    generator_cpu = [b - a for a, b in zip(gen0, gen1)]
    # What everything else on the machine used meanwhile (other jobs slow both servers down).
    other_cpu = (busy1 - busy0) - (cpu1 - cpu0) - sum(generator_cpu) - (own1 - own0)
    result.metrics = measure(scenario, sent, peers, probe, server_cpu=cpu1 - cpu0, wall=wall1 - wall0,
                             generator_cpu=generator_cpu, other_cpu=other_cpu, args=args)
    for peer in peers:
        result.notes.extend(peer["errors"])
        if peer["error_count"] > len(peer["errors"]):
            result.notes.append(f"{peer['user']}: ... {peer['error_count']} errors in all")
    return result


def measure(
    scenario: Scenario, sent: dict[str, dict[str, int]], peers: list[dict[str, Any]],
    probe: dict[str, dict[str, Any]] | None, *, server_cpu: float, wall: float,
    generator_cpu: list[float], other_cpu: float, args: argparse.Namespace,
) -> dict[str, Any]:
    """The numbers of one run, from what the generators reported."""
    deliveries = sum(peer["received"] for peer in peers)
    cursor_deliveries = sum(peer["cursors"] for peer in peers)
    missed = coalesced = 0
    for peer in peers:
        for user, stats in sent.items():
            if user == peer["user"]:
                continue
            got, got_moves, _ = peer["senders"].get(user, (0, 0, 0))
            missed += max(0, (stats["sent"] - stats["moves"]) - (got - got_moves))
            coalesced += max(0, stats["moves"] - got_moves)
    disconnects = Counter(peer["closed"][0] for peer in peers if peer["closed"] is not None)
    latencies = sorted(lat for peer in peers for lat in peer["latencies_us"])
    cursor_latencies = sorted(lat for peer in peers for lat in peer["cursor_latencies_us"])
    sent_commands = sum(stats["sent"] for stats in sent.values())
    metrics: dict[str, Any] = {
        "deliveries": deliveries,
        "missed": missed,
        "coalesced": coalesced,
        "duplicates": sum(peer["duplicates"] for peer in peers),
        "disconnects": dict(disconnects),
        "sent": sent_commands,
        "server_cpu_s": server_cpu,
        "server_cores": server_cpu / wall if wall > 0 else math.nan,
        "busiest_generator": max(generator_cpu) / wall if wall > 0 and generator_cpu else math.nan,
        "generators_cores": sum(generator_cpu) / wall if wall > 0 else math.nan,
        "other_cores": max(0.0, other_cpu / wall) if wall > 0 else math.nan,
        "p50_ms": percentile(latencies, 0.50) / 1000,
        "p99_ms": percentile(latencies, 0.99) / 1000,
        "all_received": missed == 0 and not disconnects and sent_commands > 0,
    }
    all_deliveries = deliveries + cursor_deliveries
    metrics["us_per_delivery"] = server_cpu / all_deliveries * 1e6 if all_deliveries else math.nan
    if scenario.kind == "saturated":
        senders = [stats for stats in sent.values() if stats["sent"]]
        first = min((stats["first_send_ns"] for stats in senders), default=0)
        last = max((peer["last_recv_ns"] for peer in peers), default=0)
        metrics["expected_sent"] = args.commands
        metrics["deliveries_per_s"] = deliveries / ((last - first) / 1e9) if deliveries and last > first else math.nan
    elif scenario.kind == "fixed":
        metrics["send_rate"] = sent_commands / args.fixed_seconds
        metrics["expected_sent"] = max(1, round(args.fixed_rate * args.fixed_seconds))
    else:
        metrics["deliveries_per_s"] = deliveries / args.lab_seconds
        metrics["cursor_deliveries_per_s"] = cursor_deliveries / args.lab_seconds
        metrics["cursor_p50_ms"] = percentile(cursor_latencies, 0.50) / 1000
        metrics["cursor_p99_ms"] = percentile(cursor_latencies, 0.99) / 1000
        metrics["move_rate"] = sum(stats["moves"] for stats in sent.values()) / args.lab_seconds
        digests = [peer["digest"] for peer in peers]
        if probe is not None:
            truth, against = items_digest(probe), "server state"
        else:
            truth, against = (Counter(digests).most_common(1)[0][0] if digests else ""), "each other"
        agree = sum(digest == truth for digest in digests)
        metrics["converged"] = (agree, len(digests), against)
        metrics["server_items"] = len(probe) if probe is not None else None
    return metrics


# ---------------------------------------------------------------------------
# Report


def fmt_number(value: float, digits: int = 1, *, thousands: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.0f}" if thousands else f"{value:.{digits}f}"


def median_of(runs: list[RunResult], key: str) -> float:
    values = [r.metrics[key] for r in runs if key in r.metrics and not math.isnan(r.metrics[key])]
    return statistics.median(values) if values else math.nan


def cell_disconnects(runs: list[RunResult]) -> str:
    codes: Counter[Any] = Counter()
    for r in runs:
        codes.update(r.metrics["disconnects"])
    total = sum(codes.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{code} x{n}" for code, n in sorted(codes.items(), key=str)) + ")"


def cell_received(runs: list[RunResult]) -> str:
    missed = sum(r.metrics["missed"] for r in runs)
    short = sum(max(0, r.metrics["expected_sent"] - r.metrics["sent"]) for r in runs if "expected_sent" in r.metrics)
    dups = sum(r.metrics["duplicates"] for r in runs)
    if all(r.metrics["all_received"] for r in runs) and not short and not dups:
        return "yes"
    parts = []
    if missed:
        parts.append(f"{missed:,} missed")
    if short:
        parts.append(f"{short:,} never sent")
    if dups:
        parts.append(f"{dups:,} duplicated")
    if not parts:
        parts.append("disconnects")
    return "no: " + ", ".join(parts)


def cell_converged(runs: list[RunResult]) -> str:
    worst = min(runs, key=lambda r: r.metrics["converged"][0] - r.metrics["converged"][1])
    agree, total, _ = worst.metrics["converged"]
    ok = all(r.metrics["converged"][0] == r.metrics["converged"][1] for r in runs)
    return f"{'yes' if ok else 'no'} ({agree} of {total})"


# (label, how to get the cell text from the runs, the median key for a ratio or None)
Row = tuple[str, Callable[[list[RunResult]], str], str | None]


def numeric(key: str, digits: int = 1, *, thousands: bool = False, percent: bool = False) -> Callable[[list[RunResult]], str]:
    def cell(runs: list[RunResult]) -> str:
        value = median_of(runs, key)
        if percent:
            return "-" if math.isnan(value) else f"{value:.0%}"
        return fmt_number(value, digits, thousands=thousands)

    return cell


def rows_for(kind: str) -> list[Row]:
    common_tail: list[Row] = [
        ("disconnects (close codes)", cell_disconnects, None),
        ("busiest generator CPU (of a core)", numeric("busiest_generator", percent=True), None),
        ("all generators CPU (cores)", numeric("generators_cores", 2), None),
        ("other processes CPU (cores)", numeric("other_cores", 2), None),
    ]
    if kind == "saturated":
        return [
            ("deliveries/s", numeric("deliveries_per_s", thousands=True), "deliveries_per_s"),
            ("server CPU us/delivery", numeric("us_per_delivery"), "us_per_delivery"),
            ("server CPU (cores)", numeric("server_cores", 2), "server_cores"),
            ("every receiver got every command", cell_received, None),
            *common_tail,
        ]
    if kind == "fixed":
        return [
            ("sent commands/s", numeric("send_rate", thousands=True), None),
            ("latency p50 ms", numeric("p50_ms", 2), "p50_ms"),
            ("latency p99 ms", numeric("p99_ms", 2), "p99_ms"),
            ("server CPU us/delivery", numeric("us_per_delivery"), "us_per_delivery"),
            ("server CPU (cores)", numeric("server_cores", 2), "server_cores"),
            ("every receiver got every command", cell_received, None),
            *common_tail,
        ]
    return [
        ("moves sent/s", numeric("move_rate", thousands=True), None),
        ("command deliveries/s", numeric("deliveries_per_s", thousands=True), "deliveries_per_s"),
        ("cursor deliveries/s", numeric("cursor_deliveries_per_s", thousands=True), "cursor_deliveries_per_s"),
        ("command latency p50 ms", numeric("p50_ms", 2), "p50_ms"),
        ("command latency p99 ms", numeric("p99_ms", 2), "p99_ms"),
        ("cursor latency p50 ms", numeric("cursor_p50_ms", 2), "cursor_p50_ms"),
        ("cursor latency p99 ms", numeric("cursor_p99_ms", 2), "cursor_p99_ms"),
        ("server CPU us/delivery (cmd+cursor)", numeric("us_per_delivery"), "us_per_delivery"),
        ("server CPU (cores)", numeric("server_cores", 2), "server_cores"),
        ("missed commands (not moves)", lambda runs: f"{sum(r.metrics['missed'] for r in runs):,}", None),
        ("moves coalesced by the server", lambda runs: f"{sum(r.metrics['coalesced'] for r in runs):,}", None),
        ("converged", cell_converged, None),
        *common_tail,
    ]


def format_scenario(scenario: Scenario, results: list[RunResult], servers: Sequence[str]) -> str:
    """One table: a column per server, then collab/reference and variant/collab
    (each when both of its servers ran)."""
    by_server = {name: [r for r in results if r.server == name] for name in servers}
    ok = {name: [r for r in runs if r.error is None] for name, runs in by_server.items()}
    repeats = max((len(runs) for runs in by_server.values()), default=0)
    lines = [f"== {scenario.title}" + (f"  (median of {repeats} runs; counts summed)" if repeats > 1 else "")]
    ratios = [(top, bottom, heading) for top, bottom, heading in RATIOS if top in servers and bottom in servers]
    header = ["", *servers, *(heading for _, _, heading in ratios)]
    table = [header]
    for label, cell, ratio_key in rows_for(scenario.kind):
        row = [label]
        for name in servers:
            row.append(cell(ok[name]) if ok[name] else "could not run")
        for top, bottom, _ in ratios:
            ratio = "-"
            if ratio_key and ok[top] and ok[bottom]:
                over, under = median_of(ok[top], ratio_key), median_of(ok[bottom], ratio_key)
                if under and not math.isnan(under) and not math.isnan(over):
                    ratio = f"{over / under:.2f}"
            row.append(ratio)
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  " + "  ".join(cells).rstrip())
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    for r in results:
        if r.error is not None:
            lines.append(f"  {r.server}: could not run: {r.error}")
        for note in r.notes[:MAX_ERRORS_KEPT]:
            lines.append(f"  note ({r.server}): {note}")
        if len(r.notes) > MAX_ERRORS_KEPT:
            lines.append(f"  note ({r.server}): ... {len(r.notes)} notes in all")
    return "\n".join(lines)


def summary(scenario: Scenario, result: RunResult) -> str:
    """One progress line."""
    if result.error is not None:
        return f"could not run: {result.error.splitlines()[0]}"
    m = result.metrics
    parts = []
    if scenario.kind == "fixed":
        parts.append(f"p50 {fmt_number(m['p50_ms'], 2)} ms, p99 {fmt_number(m['p99_ms'], 2)} ms")
    else:
        parts.append(f"{fmt_number(m.get('deliveries_per_s', math.nan), thousands=True)} deliveries/s")
    parts.append(f"{fmt_number(m['us_per_delivery'])} us/delivery")
    parts.append("all received" if m["all_received"] else f"{m['missed']} missed, disconnects {m['disconnects'] or 0}")
    if scenario.kind == "lab":
        agree, total, _ = m["converged"]
        parts.append(f"converged {agree}/{total}")
    parts.append(f"other processes {fmt_number(m['other_cores'], 2)} cores")
    return ", ".join(parts)


def scenarios_of(args: argparse.Namespace) -> list[Scenario]:
    out = []
    if "saturated" in args.scenarios:
        for users in args.users:
            out.append(Scenario("saturated", users, f"saturated, {users} users: user 0 sends {args.commands:,}"
                                f" add_item back to back, {users - 1} receive"))
    if "fixed" in args.scenarios:
        out.append(Scenario("fixed", args.fixed_users, f"fixed rate, {args.fixed_users} users: user 0 sends"
                            f" {args.fixed_rate:g} add_item/s for {args.fixed_seconds:g} s, {args.fixed_users - 1} receive"))
    if "lab" in args.scenarios:
        out.append(Scenario("lab", args.lab_users, (
            f"lab, {args.lab_users} users for {args.lab_seconds:g} s: {args.lab_draggers} dragging at"
            f" {args.move_rate:g} move_item/s, the others update_item every {args.update_every:g} s,"
            f" all cursors at {args.cursor_rate:g}/s, {args.lab_items} items"
        )))
    return out


def machine_facts(args: argparse.Namespace) -> list[str]:
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    sample = {
        "type": "command", "op_id": "user-00:1000",
        "command": {"action": "add_item", "item_type": "lens", "item_id": "it-1000",
                    "data": lens_data(-123.456, 78.9, 90.0, n=1000, sent_ns=time.monotonic_ns())},
    }
    return [
        "command: " + shlex.join([sys.executable, *sys.argv]),
        f"machine: {os.cpu_count()} cores, {cpu_model}, {platform.system()} {platform.release()};"
        f" load {load} (1/5/15 min, before the first run)",
        f"python:  {platform.python_implementation()} {platform.python_version()}; collab-trio {_version('collab-trio')},"
        f" trio {_version('trio')}, trio-websocket {_version('trio-websocket')}, websockets {_version('websockets')},"
        f" orjson {_version('orjson')}",
        f"servers: collab-trio serve --store {args.collab_store} {' '.join(COLLAB_ARGS)};"
        f" reference_relay.py --json {args.reference_json}; a fresh one per run, loopback",
        *([f"variant: collab-trio as above, plus {shlex.join(args.variant_args) or 'no options'};"
           f" environment {shlex.join(f'{k}={v}' for k, v in args.variant_env.items()) or 'unchanged'};"
           f" collab_trio from {args.variant_pythonpath or 'this checkout'}"] if VARIANT in args.servers else []),
        f"load:    1 sender process + {args.generators} receiver processes (asyncio + websockets, no compression);"
        f" commands ~{len(orjson.dumps(sample))} bytes",
    ]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_all(args: argparse.Namespace) -> list[RunResult]:
    scenarios = scenarios_of(args)
    total = len(scenarios) * len(args.servers) * args.repeat
    results: list[RunResult] = []
    generators: Generators | None = None
    done = 0
    try:
        for repeat in range(args.repeat):
            for scenario in scenarios:
                for name in args.servers:
                    done += 1
                    label = f"[{done:>2}/{total}] {scenario.kind} {scenario.users} users, {name}"
                    progress(f"{label} ...")
                    started = time.monotonic()
                    result = RunResult(scenario, name)
                    server = None
                    running = False
                    try:
                        if generators is None:
                            generators = Generators(args.generators + 1)
                        server = start_server(name, args)
                        running = True
                        result = run_scenario(scenario, server, generators, args)
                    except BenchError as exc:
                        result.error = str(exc)
                        # A generator may be stuck or still hold clients: start afresh.
                        if running and generators is not None:
                            generators.stop()
                            generators = None
                    finally:
                        if server is not None:
                            status = server.stop()
                            problems = server.log_problems()
                            if status != 0:
                                result.notes.append(f"server exit status {status} after SIGTERM")
                            if problems:
                                result.notes.append(f"{len(problems)} warning/error line(s) in the server log,"
                                                    f" first: {problems[0][:200]}")
                    results.append(result)
                    progress(f"{label}: {summary(scenario, result)} ({time.monotonic() - started:.1f} s)")
    finally:
        if generators is not None:
            generators.stop()
    return results


# ---------------------------------------------------------------------------
# Command line


def name_list(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"a comma-separated subset of {','.join(allowed)}")
        return [n for n in allowed if n in names]

    return parse


def bounded(kind: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return parse


SHORT = {
    "users": [10], "commands": 300, "fixed_seconds": 1.0, "lab_users": 10, "lab_draggers": 3,
    "lab_items": 20, "lab_seconds": 3.0, "timeout": 20.0, "drain_timeout": 10.0, "repeat": 1,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fan-out: collab-trio against an asyncio + websockets relay (and a variant of itself)."
    )
    add = parser.add_argument
    add("--short", action="store_true", help="a run of a few seconds with the same tables (CI): " + ", ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in SHORT.items()))
    add("--repeat", type=bounded(int, 1, 20), default=None, help="runs per scenario and server, alternating (1)")
    add("--generators", type=bounded(int, 1, 16), default=2, help="receiver processes besides the sender's (2)")
    add("--scenarios", type=name_list(SCENARIOS), default=list(SCENARIOS), help="saturated,fixed,lab (all)")
    add("--servers", type=name_list(SERVERS), default=[REFERENCE, COLLAB],
        help="reference,collab-trio (both); `variant` is collab-trio changed by the --variant-* options")
    add("--variant-args", type=shlex.split, default=[], metavar="OPTIONS",
        help="variant: more `collab-trio serve` options, one string (\"--pending-delay 0.5\"; one option"
        " alone: --variant-args=--debug); files as absolute paths: the server runs in a temporary directory")
    add("--variant-env", type=env_setting, action="append", default=[], metavar="NAME=VALUE",
        help="variant: an environment variable of its server process (repeatable)")
    add("--variant-pythonpath", default="", metavar="DIR",
        help="variant: import collab_trio from DIR (another checkout's src) instead of this one")
    add("--users", type=testing.counts_argument("user counts", 2, 100), default=None, help="saturated: users per session (10,30,50)")
    add("--commands", type=bounded(int, 1, 1_000_000), default=None, help="saturated: commands sent (2000)")
    add("--fixed-users", type=bounded(int, 2, 100), default=10, help="fixed rate: users (10)")
    add("--fixed-rate", type=bounded(float, 1, 100_000), default=300.0, help="fixed rate: commands/s (300)")
    add("--fixed-seconds", type=bounded(float, 0.1, 3600), default=None, help="fixed rate: seconds (4)")
    add("--lab-users", type=bounded(int, 2, 100), default=None, help="lab: users (30)")
    add("--lab-draggers", type=bounded(int, 0, 100), default=None, help="lab: users dragging (8)")
    add("--lab-items", type=bounded(int, 1, 10_000), default=None, help="lab: items in the document (50)")
    add("--lab-seconds", type=bounded(float, 0.5, 3600), default=None, help="lab: seconds (30)")
    add("--move-rate", type=bounded(float, 1, 1000), default=60.0, help="lab: move_item/s per dragger (60)")
    add("--cursor-rate", type=bounded(float, 0.1, 1000), default=20.0, help="lab: cursor messages/s per user (20)")
    add("--update-every", type=bounded(float, 0.01, 3600), default=3.0, help="lab: seconds between a non-dragger's update_item (3)")
    add("--timeout", type=bounded(float, 1, 3600), default=None, help="saturated: bound on sending and on the drain (60)")
    add("--drain-timeout", type=bounded(float, 1, 3600), default=None, help="fixed, lab: bound on the drain (15)")
    add("--collab-store", choices=("sqlite", "memory"), default="sqlite", help="collab-trio's --store (sqlite)")
    add("--reference-json", choices=("json", "orjson"), default="json", help="the reference relay's JSON library (json)")
    return parser


FULL = {
    "users": [10, 30, 50], "commands": 2000, "fixed_seconds": 4.0, "lab_users": 30, "lab_draggers": 8,
    "lab_items": 50, "lab_seconds": 30.0, "timeout": 60.0, "drain_timeout": 15.0, "repeat": 1,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = SHORT if args.short else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lab_draggers > args.lab_users:
        parser.error("--lab-draggers is more than --lab-users")
    args.variant_env = dict(args.variant_env)
    variant_set = args.variant_args or args.variant_env or args.variant_pythonpath
    if variant_set and VARIANT not in args.servers:
        parser.error("--variant-* options need `variant` in --servers (say --servers collab-trio,variant)")
    if "PYTHONPATH" in args.variant_env:
        parser.error("--variant-env PYTHONPATH: say --variant-pythonpath DIR (this checkout stays on the path after it)")
    if args.variant_pythonpath:
        # Absolute: the server runs in a temporary directory, where a relative
        # entry would name nothing and this checkout's collab_trio would run.
        args.variant_pythonpath = os.path.abspath(args.variant_pythonpath)
        if not (Path(args.variant_pythonpath) / "collab_trio").is_dir():
            parser.error(f"--variant-pythonpath: no collab_trio package in {args.variant_pythonpath}")
    return args


def env_setting(text: str) -> tuple[str, str]:
    """NAME=VALUE (argparse type of --variant-env)."""
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text!r}")
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    for line in machine_facts(args):
        print(line)
    print(flush=True)
    try:
        results = run_all(args)
    except KeyboardInterrupt:
        progress("interrupted: every child stopped")
        return EXIT_INTERRUPTED
    for scenario in scenarios_of(args):
        print(format_scenario(scenario, [r for r in results if r.scenario.key == scenario.key], args.servers))
        print()
    failed = [r for r in results if r.error is not None]
    if failed:
        print(f"{len(failed)} of {len(results)} runs could not run (exit status {EXIT_BROKEN})")
        return EXIT_BROKEN
    print(f"all {len(results)} runs ran")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
