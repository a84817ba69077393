"""Plumbing for several `collab-trio serve` nodes behind HAProxy (tests/test_multinode.py, benchmarks/scale.py).

Like `testing.py`, shipped with the package so that the benchmark runs as a
plain script; nothing here imports pytest.

- `render_haproxy`: the committed deploy/haproxy-cluster.cfg with only its
  documented placeholders replaced (listening port, each node's WebSocket
  and metrics ports).
- `Cluster` / `open_cluster`: N nodes (real processes, each on a free port
  with its own `--node-id` and `--metrics-address`) and HAProxy in front.
- `Editor`: a client that edits one session continuously through HAProxy,
  one change in flight, each change an `add_item` with a unique `op_id`; it
  reconnects with bounded retries and backoff on any close (1012, 1013,
  1006, a refused connection) and resumes by `seq`. It keeps its own copy of
  the document from what it receives (relays, its acks, `sync:ops`), checks
  that the seqs it applies have no gap, and records every acknowledged
  `(op_id, seq)`, every close code and when its session was served again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from .exceptions import leaf_exceptions
from .testing import HANG, LOOPBACK, HarnessError, ServerProcess, serve_command, server_process, tcp_client

METRICS_RE = re.compile(r"Metrics and health on http://127\.0\.0\.1:(\d+)")
NODE_ADDRESSES = ("10.0.0.11:8765", "10.0.0.12:8765", "10.0.0.13:8765")
# Close codes after which an editor reconnects (1006: no close frame at all).
RECONNECT_CODES = frozenset({1001, 1006, 1011, 1012, 1013})
# What ends a connection attempt that is tried again: a close, a refused
# upgrade (HAProxy's 503 while no node is up), a refused or reset TCP
# connection, no answer in time.
_RETRIED = (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError, trio.TooSlowError)


def free_port() -> int:
    """A TCP port free on loopback right now (for programs that cannot report the one they bound)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def haproxy_binary() -> str | None:
    """HAProxy's path, or None when it is not installed."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def render_haproxy(text: str, port: int, nodes: Sequence[tuple[int, int]]) -> str:
    """deploy/haproxy-cluster.cfg listening on `port`, with the (ws port, metrics port) of each node.

    Raises:
        HarnessError: a placeholder is missing, or there are more nodes than server lines.
    """
    lines = text.splitlines(keepends=True)
    binds = [i for i, line in enumerate(lines) if line.strip() == "bind :80"]
    servers = [i for i, line in enumerate(lines) if line.strip().startswith("server ")]
    if len(binds) != 1:
        raise HarnessError("the cluster config should have one 'bind :80' line")
    lines[binds[0]] = lines[binds[0]].replace("bind :80", f"bind {LOOPBACK}:{port}")
    if len(servers) != len(NODE_ADDRESSES) or len(nodes) > len(servers):
        raise HarnessError(f"expected {len(NODE_ADDRESSES)} server lines for up to that many nodes")
    for index, address, (ws_port, metrics_port) in zip(servers, NODE_ADDRESSES, nodes):
        line = lines[index]
        if address not in line or line.count("port 9100") != 1:
            raise HarnessError(f"server line {line.strip()!r} lacks its placeholders")
        lines[index] = line.replace(address, f"{LOOPBACK}:{ws_port}").replace("port 9100", f"port {metrics_port}")
    # Nodes not started are left out, so HAProxy does not count them as down ones.
    for index in servers[len(nodes):]:
        lines[index] = ""
    return "".join(lines)


@attrs.define(eq=False)
class Node:
    """One `collab-trio serve` process of the cluster."""

    name: str
    server: ServerProcess
    metrics_port: int

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def signal(self, signum: int) -> None:
        """Send `signum` (SIGKILL, SIGSTOP, SIGCONT) to the node's process."""
        os.kill(self.pid, signum)

    def sessions_joined(self) -> set[str]:
        """Sessions some user joined on this node, from its log."""
        return {m.group(1) for line in self.server.lines if (m := re.search(r"joined session (\S+)$", line))}


@attrs.define(eq=False)
class Cluster:
    """Nodes and HAProxy in front of them."""

    nodes: list[Node]
    haproxy: ServerProcess
    port: int

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    async def wait_haproxy(self, pattern: str, timeout: float = HANG) -> None:
        """Until HAProxy logs a line matching `pattern` (e.g. a server marked DOWN)."""
        await self.haproxy.wait_for(pattern, timeout)


async def _wait_for_port(port: int, process: ServerProcess) -> None:
    """Until something accepts connections on `port` (HAProxy prints no line that says so)."""
    with trio.fail_after(HANG):
        while True:
            try:
                stream = await trio.open_tcp_stream(LOOPBACK, port)
            except OSError:
                if process.process.returncode is not None:
                    raise HarnessError(f"HAProxy exited:\n{process.output}") from None
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return


@asynccontextmanager
async def open_cluster(
    config: Path, work_dir: Path, node_args: Callable[[str], Sequence[str]], *, nodes: int = 3,
    haproxy: str | None = None,
) -> AsyncIterator[Cluster]:
    """Start `nodes` nodes (node1, node2, ...) and HAProxy from `config`; kill them all on exit.

    `node_args(name)` gives each node's options beyond host, port and metrics
    address (the store, its URL, `--node-id name`, the lease timeout). The rendered
    HAProxy config goes to `work_dir`.
    """
    haproxy = haproxy or haproxy_binary()
    if haproxy is None:
        raise HarnessError("haproxy is not installed")
    async with AsyncExitStack() as stack:
        started: list[Node] = []
        for number in range(1, nodes + 1):
            name = f"node{number}"
            command = serve_command("--metrics-address", f"{LOOPBACK}:0", *node_args(name))
            server = await stack.enter_async_context(server_process(command=command))
            metrics_port = int((await server.wait_for(METRICS_RE)).group(1))
            started.append(Node(name, server, metrics_port))
        port = free_port()
        rendered = work_dir / "haproxy-cluster.cfg"
        rendered.write_text(render_haproxy(config.read_text(), port, [(n.port, n.metrics_port) for n in started]))
        front = await stack.enter_async_context(
            server_process(command=[haproxy, "-f", str(rendered), "-db"], listening=None, cwd=work_dir)
        )
        await _wait_for_port(port, front)
        yield Cluster(started, front, port)


# ---------------------------------------------------------------------------
# An editing client


def _apply(items: dict[str, dict[str, Any]], command: dict[str, Any]) -> None:
    """The effect of a relayed add_item/remove_item on a client's copy of the document."""
    action, item_id = command.get("action"), command.get("item_id")
    if action == "add_item":
        items[item_id] = {**command.get("data", {}), "uuid": item_id, "item_type": command.get("item_type")}
    elif action == "remove_item":
        items.pop(item_id, None)


@attrs.define(eq=False)
class Editor:
    """One user editing one session through HAProxy until told to stop (see the module docstring)."""

    port: int
    session: str
    user: str
    interval: float = 0.1
    max_attempts: int = 400
    epoch: str | None = None
    seq: int = 0
    items: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    # Every acknowledged change: (op_id, seq), in the order of the acks.
    acked: list[tuple[str, int]] = attrs.field(factory=list)
    # When each ack arrived (trio time), for "served again" and latencies.
    ack_times: list[float] = attrs.field(factory=list)
    # When each connection (after its sync answer) began.
    connected_times: list[float] = attrs.field(factory=list)
    latencies: list[float] = attrs.field(factory=list)
    closes: list[tuple[float, int | None, str]] = attrs.field(factory=list)
    errors: list[dict[str, Any]] = attrs.field(factory=list)
    gaps: list[str] = attrs.field(factory=list)
    attempts: int = 0
    connections: int = 0
    # Other members' changes relayed to this one (deliveries).
    relays: int = 0
    _counter: int = 0
    _pending: dict[str, Any] | None = None
    _sent_at: float = 0.0
    _acked_event: trio.Event = attrs.field(factory=trio.Event)
    # Relays that came while a resume was answered (None: not resuming).
    _early: list[tuple[int, dict[str, Any]]] | None = None

    def _next_change(self) -> dict[str, Any]:
        self._counter += 1
        op_id = f"{self.user}-{self._counter}"
        return {
            "type": "command", "op_id": op_id,
            "command": {"action": "add_item", "item_type": "lens", "item_id": op_id, "data": {"n": self._counter}},
        }

    def _apply_op(self, seq: int, command: dict[str, Any]) -> None:
        if seq <= self.seq:
            return  # already in the copy (a resumed op, or a duplicate's ack)
        if seq != self.seq + 1:
            self.gaps.append(f"{self.user}: seq {seq} after {self.seq}")
        _apply(self.items, command)
        self.seq = seq

    def _acknowledged(self, op_id: str, seq: int) -> None:
        if self._pending is None or self._pending["op_id"] != op_id:
            return
        self.acked.append((op_id, seq))
        now = trio.current_time()
        self.ack_times.append(now)
        self.latencies.append(now - self._sent_at)
        if self._early is not None:
            self._early.append((seq, self._pending["command"]))  # after the resume's answer, as relays
        else:
            self._apply_op(seq, self._pending["command"])
        self._pending = None
        self._acked_event.set()

    def _receive(self, message: dict[str, Any]) -> bool:
        """Handle one message; True once it answered the sync request."""
        kind = message.get("type")
        if kind == "command" and "seq" in message:
            self.relays += 1
            if self._early is not None:
                # A change committed while the resume request waited behind
                # it (the server answers that request after it): applied, in
                # the order they came, once the answer brought what came before.
                self._early.append((message["seq"], message["command"]))
            else:
                self._apply_op(message["seq"], message["command"])
        elif kind == "ack":
            self._acknowledged(message.get("op_id"), message["seq"])
        elif kind == "sync:ops":
            for op in message["ops"]:
                if op.get("user_id") == self.user and self._pending and op.get("op_id") == self._pending["op_id"]:
                    self._acknowledged(op["op_id"], op["seq"])
                else:
                    self._apply_op(op["seq"], op["command"])
            self.epoch = message["epoch"]
            return True
        elif kind == "sync:state":
            self.items = {item["uuid"]: item for item in (message["state"] or {}).get("items", [])}
            self.seq, self.epoch = message["version"], message["epoch"]
            return True
        elif kind == "error":
            self.errors.append(message)
        return False

    async def _sync(self, ws: Any) -> None:
        """Resume by seq (or fetch the whole state the first time) and wait for the answer."""
        request: dict[str, Any] = {"type": "sync:request"}
        if self.epoch is not None:
            request.update(since=self.seq, epoch=self.epoch)
        await ws.send_message(json.dumps(request))
        self._early = []
        try:
            with trio.fail_after(HANG):
                while not self._receive(json.loads(await ws.get_message())):
                    pass
        finally:
            early, self._early = self._early, None
        for seq, command in early:
            self._apply_op(seq, command)  # those the answer had already are skipped

    async def _connected(self, ws: Any, stop: trio.Event) -> None:
        ack = json.loads(await ws.get_message())
        if ack.get("type") != "connection:ack":
            raise HarnessError(f"{self.user}: expected connection:ack, got {ack}")
        if self.epoch is not None and ack["epoch"] != self.epoch:
            self.gaps.append(f"{self.user}: epoch changed from {self.epoch} to {ack['epoch']}")
            self.epoch = None  # a whole state, then
        await self._sync(ws)
        self.connections += 1
        self.connected_times.append(trio.current_time())
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                while True:
                    self._receive(json.loads(await ws.get_message()))

            nursery.start_soon(reader)
            while not stop.is_set():
                if self._pending is None:
                    self._pending = self._next_change()
                # Sent again after a reconnect with the same op_id: applied at most once.
                self._acked_event = trio.Event()
                self._sent_at = trio.current_time()
                await ws.send_message(json.dumps(self._pending))
                with trio.move_on_after(HANG):
                    await self._acked_event.wait()
                if self._pending is not None:
                    continue  # an error (not_persisted) or no answer: sent again
                with trio.move_on_after(self.interval):
                    await stop.wait()
            nursery.cancel_scope.cancel()

    async def run(self, stop: trio.Event) -> None:
        """Edit until `stop` is set, reconnecting after closes; then a final resume.

        Raises:
            HarnessError: more than `max_attempts` connection attempts.
        """
        backoff = 0.05
        while True:
            self.attempts += 1
            if self.attempts > self.max_attempts:
                raise HarnessError(f"{self.user} in {self.session}: no connection after {self.max_attempts} attempts")
            try:
                async with tcp_client(self.port, f"/ws/{self.session}/{self.user}") as ws:
                    await self._connected(ws, stop)
                    await self._sync(ws)  # after the edits: the copy is the stored document
                return
            except (*_RETRIED, BaseExceptionGroup) as exc:
                leaves = leaf_exceptions(exc)
                if not all(isinstance(leaf, _RETRIED) for leaf in leaves):
                    raise
                self._closed(leaves[0])
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)

    def _closed(self, exc: BaseException) -> None:
        """Record why a connection ended; a close code that asks for no reconnect is a failure."""
        now = trio.current_time()
        if isinstance(exc, ConnectionClosed):
            self.closes.append((now, exc.reason.code, exc.reason.reason or ""))
            if exc.reason.code not in RECONNECT_CODES:
                raise HarnessError(f"{self.user} in {self.session}: closed with {exc.reason.code} {exc.reason.reason}")
        else:
            self.closes.append((now, None, repr(exc)))

    def served_again_after(self, moment: float) -> float | None:
        """When a change was first acknowledged on a connection opened after `moment` (None: none was yet).

        An ack that was on its way when the old connection broke does not count.
        """
        reconnected = next((t for t in self.connected_times if t > moment), None)
        if reconnected is None:
            return None
        return next((t for t in self.ack_times if t > reconnected), None)

