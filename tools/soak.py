#!/usr/bin/env python3
"""Soak test: many clients join, edit, move cursors, ping, sync, leave and rejoin for a long time.

    python tools/soak.py [--duration 120] [--sessions 4] [--clients 5] [--seed 1]
        [--store memory|sqlite] [--url ws://127.0.0.1:PORT [--server-pid PID]]

By default this starts (with collab_trio.testing, so the package must be installed)
`python -m collab_trio serve --host 127.0.0.1 --port 0`
(the `collab-trio serve` entry point; `--store memory`, or `--store sqlite` in
a temporary data directory) and runs every client in this process with trio
and trio-websocket over loopback. `--url` uses a server that is already
running on 127.0.0.1 instead (give `--server-pid` to watch its memory).

Each client slot (user `uJ` of session `...-sI`) repeatedly joins, then for a
random stay sends a random mix of commands (add/move/update/remove of its own
items, each with an op_id), cursors, pings and sync:requests, then leaves
(a normal close, or sometimes a dropped TCP connection) and rejoins after a
pause. Everything is drawn from a seeded RNG per slot (`--seed`); the timing
of the network is not reproducible, the decisions are.

Checked along the way, each mismatch counted as one error:
- every command is acknowledged (`ack` with its op_id) before the client leaves;
- every op reaches every member present: acks and relayed commands carry the
  session's `seq`, and on one connection they arrive in strictly consecutive
  order starting after the `version` of its connection:ack (the server applies
  and fans out ops in seq order, and each connection's outbox is FIFO), so a
  gap is a relay that never arrived, unless it was a move_item that a later
  move of the same item replaced in a backed-up queue (by design; counted
  apart); relays must name their true sender;
- `sync:state` answers carry exactly the last seq seen on that connection, and
  before leaving the client's own items in the state equal what it sent (a
  client sends a sync:request only when its last one was answered, as
  Optiverse does: the server coalesces requests that wait together, by
  design, into one answer);
- every ping gets its pong; no `error` message, no unexpected close.

At the end, after every client left: sessions still in the server's registry.
The server's registry is not visible from outside, so with a server of our
own three things are checked:
1. capacity probe (the number reported): the server runs with
   `--max-sessions` = the number of soak sessions; fresh sessions are opened
   one by one and held until the server refuses one with 503. The registry
   holds only live sessions, so accepted = limit - leftover sessions, exactly
   (the last refusal proves the limit is in force);
2. member probe: a `probe` user joins each soak session; its connection:ack
   must list only itself (no lingering member);
3. the server's log: per session, "joined" minus "left" lines is 0 and the last
   line is "Session X closed: its last user left".
With `--url` only the member probe is possible.

Memory: the server's VmRSS (from /proc/PID/status) after the first 20% of the
run (warm-up) against the end; growth must stay under 10%.

Exit status: 0 only if errors == 0, leftover sessions == 0 and RSS growth is
under the limit (and the server we started exits 0 on SIGINT); 1 otherwise;
2 if the run could not start.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import secrets
import signal
import sys
import tempfile
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection

from collab_trio import testing
from collab_trio.exceptions import leaf_exceptions as _leaves
from collab_trio.testing import HarnessError, recv_json as read_json

LOOPBACK = "127.0.0.1"
# Bounds on every wait on the other side (seconds).
CONNECT_TIMEOUT = 10.0
SETTLE_TIMEOUT = 15.0
CLOSE_TIMEOUT = 5.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
QUIET_TIMEOUT = 15.0
# Slack for the clients' last visits after --duration, before they count as stuck.
LOAD_GRACE = CONNECT_TIMEOUT + SETTLE_TIMEOUT + CLOSE_TIMEOUT + 10.0

# Client behaviour: seconds connected, seconds away, seconds between actions.
STAY = (3.0, 25.0)
AWAY = (0.2, 3.0)
GAP = (0.01, 0.07)
# Share of leaves that drop the TCP connection instead of a close handshake.
DROP_SHARE = 0.15
ACTIONS = ("command", "cursor", "ping", "sync:request")
WEIGHTS = (60, 25, 8, 7)
MAX_ITEMS = 6
ITEM_TYPES = ("lens", "mirror", "beam_splitter", "source", "detector")
# op_id = counter * SLOTS + slot: a relay's op_id names the slot that sent it.
SLOTS = 1024
MESSAGE_QUEUE = 64

WARMUP_SHARE = 0.2
RSS_LIMIT_PERCENT = 10.0
PROGRESS_INTERVAL = 10.0
KEPT_ERRORS = 40
MIB = 1024 * 1024

JOINED = re.compile(r"User (\S+) joined session (\S+)$")
LEFT = re.compile(r"User (\S+) left session (\S+) \(")
CLOSED = re.compile(r"Session (\S+) closed: its last user left$")
# "2025-01-01 12:00:00 INFO    message": the format of collab_trio.logs.configure_logging (text).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (\w+)\s+(.*)$")

EXIT_OK, EXIT_FAILED, EXIT_BROKEN = 0, 1, 2


class RunBroken(Exception):
    """The run could not start (bad --url, the server did not come up)."""


# ---------------------------------------------------------------------------
# Bookkeeping


@attrs.define(eq=False)
class Stats:
    """Counters of the whole run, shared by every client."""

    sent: Counter[str] = attrs.field(factory=Counter)
    received: Counter[str] = attrs.field(factory=Counter)
    connections_made: int = 0
    connections_open: int = 0
    commands_acked: int = 0
    relays_received: int = 0
    relays_missing: int = 0
    # Acknowledged move_items by (session, seq): their item. A queue that
    # backs up keeps only the latest move of an item (the server's design),
    # so a gap is fine when it was a move that a later move of it replaced.
    moves: dict[tuple[str, int], str] = attrs.field(factory=dict)
    # Gaps seen: (session, missing seq, that connection's later moves, who).
    gaps: list[tuple[str, int, dict[str, int], str]] = attrs.field(factory=list)
    moves_replaced: int = 0
    error_count: int = 0
    errors: list[str] = attrs.field(factory=list)

    def error(self, text: str) -> None:
        """Count one error; keep the text of the first few."""
        self.error_count += 1
        if len(self.errors) < KEPT_ERRORS:
            self.errors.append(text)

    def messages(self) -> int:
        return sum(self.sent.values()) + sum(self.received.values())

    def judge_gaps(self) -> None:
        """Once every ack is in: each missing op must be a replaced move."""
        for session_id, seq, moved, who in self.gaps:
            item = self.moves.get((session_id, seq))
            if item is not None and moved.get(item, -1) > seq:
                self.moves_replaced += 1
            else:
                self.relays_missing += 1
                self.error(f"{who}: op seq {seq} never arrived (and no later move of its item did)")


def rss_bytes(pid: int | None) -> int | None:
    """VmRSS of a process, or None if it can't be read."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f} MiB"


@attrs.define(eq=False)
class ServerLog:
    """What the server's log says, read line by line as it is written."""

    # Members per session (joined minus left) and each session's last lifecycle line.
    members: Counter[str] = attrs.field(factory=Counter)
    last_event: dict[str, str] = attrs.field(factory=dict)
    problems: int = 0
    problem_lines: list[str] = attrs.field(factory=list)
    tail: deque[str] = attrs.field(factory=lambda: deque(maxlen=40))
    changed: trio.Event = attrs.field(factory=trio.Event)

    def feed(self, line: str) -> None:
        self.tail.append(line)
        parsed = LOG_LINE.match(line)
        level, message = (parsed.group(1), parsed.group(2)) if parsed else ("", line)
        if level in ("WARNING", "ERROR", "CRITICAL") or line.startswith("Traceback"):
            self.problems += 1
            if len(self.problem_lines) < KEPT_ERRORS:
                self.problem_lines.append(line)
        if (match := JOINED.search(message)) is not None:
            self.members[match.group(2)] += 1
            self.last_event[match.group(2)] = "open"
        elif (match := LEFT.search(message)) is not None:
            self.members[match.group(2)] -= 1
        elif (match := CLOSED.search(message)) is not None:
            self.last_event[match.group(1)] = "closed"
        self.changed.set()
        self.changed = trio.Event()

    def quiet(self) -> bool:
        """No member left in any session, and every session's last line says it closed."""
        return all(n == 0 for n in self.members.values()) and all(
            event == "closed" for event in self.last_event.values()
        )

    def lingering(self) -> list[str]:
        return sorted(
            s for s in self.last_event if self.members[s] != 0 or self.last_event[s] != "closed"
        )

    async def wait_quiet(self, timeout: float) -> bool:
        """Wait (bounded) until quiet(); False if the log never got there."""
        with trio.move_on_after(timeout):
            while not self.quiet():
                await self.changed.wait()
            return True
        return False


@asynccontextmanager
async def open_link(host: str, port: int, path: str, *, drop: bool = False) -> AsyncIterator[WebSocketConnection]:
    """The harness's loopback client; `drop` cuts TCP on exit instead of a close handshake."""
    async with testing.tcp_client(
        port, path, host=host, message_queue_size=MESSAGE_QUEUE, connect_timeout=CONNECT_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT, close_handshake=not drop,
    ) as ws:
        yield ws


# ---------------------------------------------------------------------------
# The clients


@attrs.define(eq=False)
class Visit:
    """One connection of a client slot: what it expects next."""

    last_seq: int
    inflight: dict[int, float] = attrs.field(factory=dict)
    # op_id -> item of the move_items in flight.
    moving: dict[int, str] = attrs.field(factory=dict)
    # item -> the highest seq of a move of it seen on this connection.
    moved: dict[str, int] = attrs.field(factory=dict)
    pings: int = 0
    pongs: int = 0
    syncs_sent: int = 0
    syncs_answered: int = 0
    last_state: Any = None
    changed: trio.Event = attrs.field(factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, done: Callable[[], bool]) -> None:
        """Wait until done(); callers bound it with a deadline."""
        while not done():
            await self.changed.wait()


@attrs.define(eq=False)
class SoakClient:
    """One user slot of one session, joining and leaving until the end of the run."""

    host: str
    port: int
    session_id: str
    user_id: str
    slot: int
    owners: list[tuple[str, str]]  # slot -> (session_id, user_id)
    rng: random.Random
    stats: Stats
    # The client's own items as the session document must hold them.
    items: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    counter: int = 0

    @property
    def who(self) -> str:
        return f"{self.user_id}@{self.session_id}"

    async def run(self, end: float) -> None:
        """Visit, pause, visit again... until `end`."""
        max_visits = int(math.ceil((end - trio.current_time()) / STAY[0])) + 2
        await trio.sleep(self.rng.uniform(0.0, 1.0))  # stagger the first joins
        for _ in range(max_visits):
            now = trio.current_time()
            if now >= end - 0.5:
                return
            stay_until = min(now + self.rng.uniform(*STAY), end)
            await self.visit(stay_until)
            pause = self.rng.uniform(*AWAY)
            if trio.current_time() + pause >= end - 0.5:
                return
            await trio.sleep(pause)

    async def visit(self, stay_until: float) -> None:
        """Join, act until `stay_until`, settle, leave; every failure is an error."""
        drop = self.rng.random() < DROP_SHARE
        budget = max(0.0, stay_until - trio.current_time()) + CONNECT_TIMEOUT * 2 + SETTLE_TIMEOUT + CLOSE_TIMEOUT
        self.stats.connections_made += 1
        with trio.move_on_after(budget) as guard:
            try:
                path = f"/ws/{self.session_id}/{self.user_id}"
                async with open_link(self.host, self.port, path, drop=drop) as ws:
                    self.stats.connections_open += 1
                    try:
                        await self._converse(ws, stay_until)
                    finally:
                        self.stats.connections_open -= 1
            except* ConnectionClosed as group:
                reasons = ", ".join(str(getattr(e, "reason", e)) for e in _leaves(group))
                self.stats.error(f"{self.who}: connection closed unexpectedly: {reasons}")
            except* ConnectionRejected as group:
                codes = ", ".join(str(getattr(e, "status_code", "?")) for e in _leaves(group))
                self.stats.error(f"{self.who}: handshake refused with HTTP {codes}")
            except* (HandshakeError, trio.TooSlowError) as group:
                self.stats.error(f"{self.who}: timed out or handshake failed: {_leaves(group)[0]!r}")
            except* (OSError, trio.BrokenResourceError) as group:
                self.stats.error(f"{self.who}: connection failed: {_leaves(group)[0]!r}")
            except* (ValueError, KeyError, TypeError) as group:
                self.stats.error(f"{self.who}: malformed message: {_leaves(group)[0]!r}")
            except* Exception as group:
                self.stats.error(f"{self.who}: unexpected failure: {_leaves(group)[0]!r}")
        if guard.cancelled_caught:
            self.stats.error(f"{self.who}: visit did not finish within {budget:.0f} s")

    async def _converse(self, ws: WebSocketConnection, stay_until: float) -> None:
        ack = await read_json(ws, CONNECT_TIMEOUT)
        self.stats.received[ack.get("type", "?")] += 1
        if ack.get("type") != "connection:ack":
            self.stats.error(f"{self.who}: first message is {ack.get('type')!r}, not connection:ack")
            return
        users = [u.get("user_id") for u in ack.get("users", [])]
        if self.user_id not in users:
            self.stats.error(f"{self.who}: connection:ack users {users} do not include itself")
        visit = Visit(last_seq=int(ack["version"]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, ws, visit)
            await self._act(ws, visit, stay_until)
            await self._settle(ws, visit)
            nursery.cancel_scope.cancel()

    # -- sending -------------------------------------------------------------

    async def _send(self, ws: WebSocketConnection, kind: str, message: dict[str, Any]) -> None:
        await ws.send_message(json.dumps(message, separators=(",", ":")))
        self.stats.sent[kind] += 1

    async def _act(self, ws: WebSocketConnection, visit: Visit, stay_until: float) -> None:
        max_actions = int((stay_until - trio.current_time()) / GAP[0]) + 1
        for _ in range(max_actions):
            now = trio.current_time()
            if now >= stay_until:
                return
            await trio.sleep(min(self.rng.uniform(*GAP), stay_until - now))
            kind = self.rng.choices(ACTIONS, WEIGHTS)[0]
            if kind == "sync:request" and visit.syncs_answered < visit.syncs_sent:
                kind = "ping"  # one request at a time (see the module docstring)
            if kind == "command":
                message, op_id = self._next_command()
                visit.inflight[op_id] = trio.current_time()
                if message["command"]["action"] == "move_item":
                    visit.moving[op_id] = message["command"]["item_id"]
            elif kind == "cursor":
                message = testing.cursor(round(self.rng.uniform(-500, 500), 2), round(self.rng.uniform(-300, 300), 2))
            elif kind == "ping":
                visit.pings += 1
                message = testing.ping()
            else:
                visit.syncs_sent += 1
                message = testing.sync_request(local_version=visit.last_seq)
            await self._send(ws, kind, message)

    def _next_command(self) -> tuple[dict[str, Any], int]:
        """A random edit of this client's own items; the local model follows it."""
        self.counter += 1
        op_id = self.counter * SLOTS + self.slot
        rng = self.rng
        draw = rng.random()
        position = {
            "x_mm": round(rng.uniform(-500, 500), 3),
            "y_mm": round(rng.uniform(-300, 300), 3),
            "angle_deg": rng.randrange(360),
        }
        if not self.items or (len(self.items) < MAX_ITEMS and draw < 0.3):
            action = "add_item"
            item_id = f"{self.user_id}-i{self.counter}"
            item_type = rng.choice(ITEM_TYPES)
            data = {"op": op_id, **position, "label": f"{item_type} {self.counter}"}
            self.items[item_id] = {**data, "uuid": item_id, "item_type": item_type}
        else:
            item_id = rng.choice(sorted(self.items))
            item_type = self.items[item_id]["item_type"]
            if draw < 0.65:
                action = "move_item"
                data = {"op": op_id, **position}
                self.items[item_id].update(position)
            elif draw < 0.88:
                action = "update_item"
                data = {"op": op_id, **position, "label": f"v{self.counter}", "focal_length_mm": 50.0}
                self.items[item_id] = {**data, "uuid": item_id, "item_type": item_type}
            else:
                action = "remove_item"
                data = {"op": op_id}
                del self.items[item_id]
        return testing.command(action, item_id, data, item_type=item_type, op_id=op_id), op_id

    # -- receiving -----------------------------------------------------------

    async def _read(self, ws: WebSocketConnection, visit: Visit) -> None:
        # Ends when _converse cancels it; every message is checked on arrival.
        while True:
            message = json.loads(await ws.get_message())
            self._handle(message, visit)
            visit.notify()

    def _advance(self, visit: Visit, seq: Any, what: str) -> None:
        """Acks and relays of one connection carry consecutive seqs."""
        if not isinstance(seq, int):
            self.stats.error(f"{self.who}: {what} without an integer seq")
            return
        expected = visit.last_seq + 1
        if seq > expected:
            # Judged at the end (Stats.judge_gaps): a replaced move is fine.
            for missing in range(expected, seq):
                self.stats.gaps.append((self.session_id, missing, visit.moved, self.who))
        elif seq < expected:
            self.stats.error(f"{self.who}: {what} seq {seq} after seq {visit.last_seq} (duplicate or reordered)")
            return
        visit.last_seq = seq

    def _handle(self, message: dict[str, Any], visit: Visit) -> None:
        kind = message.get("type")
        self.stats.received[str(kind)] += 1
        if kind == "ack":
            op_id = message.get("op_id")
            if visit.inflight.pop(op_id, None) is None:
                self.stats.error(f"{self.who}: ack for op_id {op_id!r} that is not in flight")
            else:
                self.stats.commands_acked += 1
            item = visit.moving.pop(op_id, None)
            seq = message.get("seq")
            if item is not None and isinstance(seq, int):
                self.stats.moves[(self.session_id, seq)] = item
                visit.moved[item] = max(visit.moved.get(item, -1), seq)
            self._advance(visit, seq, "ack")
        elif kind == "command":
            command = message.get("command") or {}
            seq = message.get("seq")
            if command.get("action") == "move_item" and isinstance(seq, int):
                item = str(command.get("item_id"))
                visit.moved[item] = max(visit.moved.get(item, -1), seq)
            self._advance(visit, seq, "relay")
            self.stats.relays_received += 1
            self._check_relay(message)
        elif kind == "sync:state":
            visit.syncs_answered += 1
            visit.last_state = message.get("state")
            version = message.get("version")
            if not isinstance(version, int) or version < visit.last_seq:
                self.stats.error(f"{self.who}: sync:state version {version} but last seq seen {visit.last_seq}")
            elif version > visit.last_seq:
                # The relay of a move that a later move of the same item
                # replaced in this client's backed-up queue never comes: a gap,
                # judged at the end like one between relays.
                self._advance(visit, version, "sync:state")
        elif kind == "pong":
            visit.pongs += 1
        elif kind == "cursor":
            if message.get("user_id") == self.user_id or "x" not in message:
                self.stats.error(f"{self.who}: bad cursor relay {message}")
        elif kind in ("user:joined", "user:left", "host:changed"):
            if kind == "user:joined" and message.get("user_id") == self.user_id:
                self.stats.error(f"{self.who}: told that it joined itself")
        elif kind == "error":
            self.stats.error(f"{self.who}: server error {message.get('code')}: {message.get('message')}")
        else:
            self.stats.error(f"{self.who}: unexpected message type {kind!r}")

    def _check_relay(self, message: dict[str, Any]) -> None:
        op_id = message.get("op_id")
        if not isinstance(op_id, int):
            self.stats.error(f"{self.who}: relay without an integer op_id: {message}")
            return
        owner = self.owners[op_id % SLOTS] if op_id % SLOTS < len(self.owners) else None
        data = (message.get("command") or {}).get("data") or {}
        if owner != (self.session_id, message.get("user_id")) or data.get("op") != op_id:
            self.stats.error(
                f"{self.who}: relay of op {op_id} names user {message.get('user_id')!r}, sent by {owner}"
            )
        elif message.get("user_id") == self.user_id:
            self.stats.error(f"{self.who}: its own command {op_id} was relayed back to it")

    # -- leaving -------------------------------------------------------------

    async def _settle(self, ws: WebSocketConnection, visit: Visit) -> None:
        """Before leaving: every command acked, a last ping and sync answered, items as sent."""
        with trio.move_on_after(SETTLE_TIMEOUT) as scope:
            await visit.wait_for(lambda: not visit.inflight)
            visit.pings += 1
            await self._send(ws, "ping", testing.ping())
            await visit.wait_for(lambda: visit.syncs_answered >= visit.syncs_sent)
            visit.syncs_sent += 1
            await self._send(ws, "sync:request", testing.sync_request())
            await visit.wait_for(lambda: visit.syncs_answered >= visit.syncs_sent)
        if scope.cancelled_caught:
            self.stats.error(
                f"{self.who}: after {SETTLE_TIMEOUT:g} s {len(visit.inflight)} command(s) unacknowledged, "
                f"{visit.syncs_sent - visit.syncs_answered} sync:request(s) unanswered"
            )
            return
        if visit.syncs_answered > visit.syncs_sent:
            self.stats.error(f"{self.who}: {visit.syncs_answered} sync:state for {visit.syncs_sent} request(s)")
        if visit.pongs != visit.pings:
            self.stats.error(f"{self.who}: {visit.pings} ping(s) but {visit.pongs} pong(s)")
        self._check_items(visit.last_state)

    def _check_items(self, state: Any) -> None:
        prefix = f"{self.user_id}-"
        items = state.get("items", []) if isinstance(state, dict) else []
        stored = {i.get("uuid"): i for i in items if str(i.get("uuid", "")).startswith(prefix)}
        if stored != self.items:
            self.stats.error(
                f"{self.who}: the session holds {len(stored)} of its items, it expected {len(self.items)} "
                f"(or their fields differ)"
            )
            # Follow the server from here, or one mismatch would repeat at every leave.
            self.items = {k: dict(v) for k, v in stored.items()}


# ---------------------------------------------------------------------------
# The server


@attrs.define(eq=False)
class Server:
    """The server under test: ours (a child process) or one given by --url."""

    host: str
    port: int
    pid: int | None
    child: testing.ServerProcess | None = None
    log: ServerLog | None = None
    exit_status: int | None = None

    @property
    def process(self) -> trio.Process | None:
        return None if self.child is None else self.child.process

    async def stop(self) -> None:
        """SIGINT, then wait (bounded) for the exit; kill if it hangs."""
        if self.child is not None:
            self.exit_status = await self.child.stop(signal.SIGINT, STOP_TIMEOUT)


@asynccontextmanager
async def own_server(args: argparse.Namespace) -> AsyncIterator[Server]:
    """A `collab-trio serve` child on a free loopback port; killed on exit if still running."""
    log = ServerLog()

    def on_line(line: str) -> None:
        log.feed(line)
        if args.server_log:
            print(f"    server| {line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="soak-data-") as data_dir:
        server_args = (
            "--store", args.store, "--data-dir", data_dir,
            # The capacity probe counts leftover sessions against this limit.
            "--max-sessions", str(args.sessions),
        )
        try:
            async with testing.server_process(
                *server_args, start_timeout=START_TIMEOUT, on_line=on_line
            ) as child:
                yield Server(LOOPBACK, child.port, child.process.pid, child, log)
        except* HarnessError as group:
            # The only harness check is the listening line: the body raises none.
            raise RunBroken(f"the server did not start: {group.exceptions[0]}") from None


@asynccontextmanager
async def given_server(args: argparse.Namespace) -> AsyncIterator[Server]:
    """The server at --url (loopback only)."""
    parts = urlsplit(args.url)
    if parts.scheme != "ws" or parts.hostname not in (LOOPBACK, "localhost") or parts.port is None:
        raise RunBroken(f"--url must be ws://127.0.0.1:PORT (loopback only), got {args.url!r}")
    yield Server(LOOPBACK, parts.port, args.server_pid)


# ---------------------------------------------------------------------------
# The run


@attrs.define(eq=False)
class Memory:
    warmup: int | None = None
    warmup_at: float = 0.0
    end_of_load: int | None = None
    final: int | None = None
    peak: int | None = None

    def sample(self, pid: int | None) -> int | None:
        value = rss_bytes(pid)
        if value is not None:
            self.peak = max(self.peak or 0, value)
        return value

    @property
    def end(self) -> int | None:
        values = [v for v in (self.end_of_load, self.final) if v is not None]
        return max(values) if values else None

    def growth_percent(self) -> float | None:
        if self.warmup is None or self.end is None:
            return None
        return (self.end - self.warmup) * 100.0 / self.warmup


async def monitor(server: Server, stats: Stats, memory: Memory, start: float, duration: float) -> None:
    """Progress lines every PROGRESS_INTERVAL seconds, and the RSS samples."""
    warmup_at = start + WARMUP_SHARE * duration
    end_sample_at = start + max(duration - 1.0, WARMUP_SHARE * duration)
    previous, previous_at = 0, start
    ticks = int(duration / PROGRESS_INTERVAL) + 1
    for tick in range(1, ticks + 1):
        due = start + tick * PROGRESS_INTERVAL
        for sample_at in (warmup_at, end_sample_at):
            if trio.current_time() < sample_at <= due:
                await trio.sleep_until(sample_at)
                if sample_at == warmup_at:
                    memory.warmup, memory.warmup_at = memory.sample(server.pid), sample_at - start
                else:
                    memory.end_of_load = memory.sample(server.pid)
        await trio.sleep_until(due)
        now = trio.current_time()
        total = stats.messages()
        rate = (total - previous) / (now - previous_at)
        previous, previous_at = total, now
        print(
            f"[{now - start:7.1f} s] connections {stats.connections_open:3d} open, "
            f"{stats.connections_made:6d} made | {rate:8.0f} msg/s | sent {sum(stats.sent.values())} "
            f"recv {sum(stats.received.values())} | server RSS {mib(memory.sample(server.pid))} "
            f"| errors {stats.error_count}",
            flush=True,
        )


async def member_probe(server: Server, session_ids: list[str], stats: Stats) -> list[str]:
    """Join each session as `probe`; the sessions where someone else is still listed."""
    lingering = []
    for session_id in session_ids:
        try:
            async with open_link(server.host, server.port, f"/ws/{session_id}/probe") as ws:
                ack = await read_json(ws, CONNECT_TIMEOUT)
            users = [u.get("user_id") for u in ack.get("users", [])]
            if ack.get("type") != "connection:ack" or users != ["probe"]:
                lingering.append(session_id)
                stats.error(f"probe of {session_id}: users {users} (expected only the probe)")
        except* Exception as group:
            lingering.append(session_id)
            stats.error(f"probe of {session_id} failed: {_leaves(group)[0]!r}")
    return lingering


async def capacity_probe(server: Server, prefix: str, limit: int) -> tuple[int, bool]:
    """Hold fresh sessions open one by one until a 503: (accepted, refusal seen)."""
    accepted = 0
    async with AsyncExitStack() as held:
        for k in range(limit + 1):
            try:
                ws = await held.enter_async_context(
                    open_link(server.host, server.port, f"/ws/{prefix}-capacity{k}/probe")
                )
            except ConnectionRejected as exc:
                if exc.status_code == 503:
                    return accepted, True
                raise
            ack = await read_json(ws, CONNECT_TIMEOUT)
            if ack.get("type") == "connection:ack":
                accepted += 1
    return accepted, False


async def soak(args: argparse.Namespace) -> int:
    stats = Stats()
    memory = Memory()
    prefix = f"soak-{secrets.token_hex(3)}"
    session_ids = [f"{prefix}-s{i}" for i in range(args.sessions)]
    owners = [(s, f"u{j}") for s in session_ids for j in range(args.clients)]
    opener = given_server if args.url else own_server
    leftover: int | None = None
    leftover_how = ""
    async with opener(args) as server:
        where = f"pid {server.pid}" if server.pid else "pid unknown: RSS not measured"
        print(
            f"soak: {args.sessions} sessions x {args.clients} clients for {args.duration:g} s, "
            f"seed {args.seed}, server ws://{server.host}:{server.port} ({where}"
            f"{', store ' + args.store if server.process else ''})",
            flush=True,
        )
        clients = [
            SoakClient(
                server.host, server.port, session_id, user_id, slot, owners,
                random.Random(f"{args.seed}/{slot}"), stats,
            )
            for slot, (session_id, user_id) in enumerate(owners)
        ]
        start = trio.current_time()
        end = start + args.duration
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor, server, stats, memory, start, args.duration)
            with trio.move_on_after(args.duration + LOAD_GRACE) as guard:
                async with trio.open_nursery() as load:
                    for client in clients:
                        load.start_soon(client.run, end)
            if guard.cancelled_caught:
                stats.error(f"clients still busy {LOAD_GRACE:g} s after the end: cancelled")
            nursery.cancel_scope.cancel()
        if memory.end_of_load is None:
            memory.end_of_load = memory.sample(server.pid)
        load_seconds = trio.current_time() - start
        print(f"[{load_seconds:7.1f} s] load finished; every client has left; checking the server", flush=True)

        log = server.log
        if log is not None and not await log.wait_quiet(QUIET_TIMEOUT):
            stats.error(f"server log: sessions not closed after everyone left: {log.lingering()}")
        lingering = await member_probe(server, session_ids, stats)
        if log is not None:
            if not await log.wait_quiet(QUIET_TIMEOUT):
                stats.error(f"server log: sessions not closed after the member probe: {log.lingering()}")
            closed, seen = len(log.last_event) - len(log.lingering()), len(log.last_event)
            accepted, refused = await capacity_probe(server, prefix, args.sessions)
            leftover = args.sessions - accepted
            if not refused:
                stats.error("capacity probe: the session limit was not enforced; leftover count unknown")
                leftover = None
            leftover_how = (
                f"capacity probe with --max-sessions {args.sessions}: {accepted} fresh session(s) "
                f"accepted{', then 503' if refused else ', no 503'}; member probe: {len(lingering)} "
                f"session(s) with lingering users; log: {closed}/{seen} sessions closed, "
                "joined - left = 0"
            )
            await log.wait_quiet(QUIET_TIMEOUT)
        else:
            leftover = len(lingering)
            leftover_how = "member probe only (--url): sessions whose connection:ack listed other users"
        memory.final = memory.sample(server.pid)
        await server.stop()

    return report(args, stats, memory, server, leftover, leftover_how, load_seconds)


def report(
    args: argparse.Namespace,
    stats: Stats,
    memory: Memory,
    server: Server,
    leftover: int | None,
    leftover_how: str,
    load_seconds: float,
) -> int:
    failures = []
    sent, received = stats.sent, stats.received
    log = server.log
    if log is not None and log.problems:
        for line in log.problem_lines:
            stats.error(f"server log: {line}")
    print()
    print("=== soak report ===")
    print(
        f"run: {args.sessions} sessions x {args.clients} clients, {load_seconds:.1f} s of load "
        f"(--duration {args.duration:g}), seed {args.seed}"
        f"{', store ' + args.store if server.process else ', server ' + str(args.url)}"
    )
    print(f"connections made: {stats.connections_made}")
    print(f"messages sent: {sum(sent.values())} ({_by_type(sent)})")
    print(f"messages received: {sum(received.values())} ({_by_type(received)})")
    stats.judge_gaps()
    print(
        f"commands: {sent['command']} sent, {stats.commands_acked} acknowledged, "
        f"{stats.relays_received} relays received, {stats.relays_missing} relays missing"
    )
    print(f"moves replaced by a later move of the same item in a backed-up queue: {stats.moves_replaced}")
    if log is not None:
        print(f"server log warnings/errors: {log.problems}")
    print(f"errors: {stats.error_count}")
    for text in stats.errors:
        print(f"  error: {text}")
    if stats.error_count > len(stats.errors):
        print(f"  ... and {stats.error_count - len(stats.errors)} more")
    if stats.error_count:
        failures.append(f"{stats.error_count} errors")
    print(f"sessions left in the server registry: {leftover} ({leftover_how})")
    if leftover != 0:
        failures.append(f"{leftover} leftover sessions")
    growth = memory.growth_percent()
    if growth is None:
        print("server RSS: not measured (no server pid)")
    else:
        print(
            f"server RSS: warm-up {mib(memory.warmup)} at {memory.warmup_at:.0f} s, end of load "
            f"{mib(memory.end_of_load)}, after the probes {mib(memory.final)}, peak {mib(memory.peak)}"
        )
        print(f"server RSS growth after warm-up: {growth:+.1f}% (limit {RSS_LIMIT_PERCENT:g}%)")
        if growth >= RSS_LIMIT_PERCENT:
            failures.append(f"RSS grew {growth:.1f}%")
    if server.process is not None:
        print(f"server exit status after SIGINT: {server.exit_status}")
        if server.exit_status != 0:
            failures.append(f"server exited with {server.exit_status}")
    print("RESULT: PASS" if not failures else f"RESULT: FAIL ({'; '.join(failures)})", flush=True)
    return EXIT_OK if not failures else EXIT_FAILED


def _by_type(counts: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counts.most_common())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soak.py", description="Soak test of collab-trio: churn, edits and checks over loopback."
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default: %(default)g)")
    parser.add_argument("--sessions", type=int, default=4, help="sessions (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=5, help="clients per session (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the clients' RNGs (default: %(default)s)")
    parser.add_argument(
        "--store", choices=("memory", "sqlite"), default="memory",
        help="store of the server we start; sqlite uses a temporary data dir (default: %(default)s)",
    )
    parser.add_argument("--url", help="use this running server (ws://127.0.0.1:PORT) instead of starting one")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's pid, to measure its RSS")
    parser.add_argument("--server-log", action="store_true", help="echo the server's log lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or args.sessions < 1 or args.clients < 1:
        raise SystemExit("--duration, --sessions and --clients must be positive")
    if args.sessions * args.clients > SLOTS:
        raise SystemExit(f"at most {SLOTS} clients in all")
    status = EXIT_BROKEN
    try:
        status = trio.run(soak, args)
    except* KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    except* RunBroken as group:
        print(f"soak: {group.exceptions[0]}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
