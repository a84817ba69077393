#!/usr/bin/env python3
"""One client that never reads must not hurt the others: delivery and latency of the rest.

    python benchmarks/slow_client_latency.py [--seconds 30] [--rate 50] [--clients 20]
        [--store sqlite|memory] [--rcvbuf 4096]

The acceptance scenario: with 1 never-reading client and 20 normal clients
receiving 50 broadcasts per second for 30 s, the normal clients receive every
message; report their p99 latency.

The server runs in a child process (`python -m collab_trio serve --host
127.0.0.1 --port 0`, the `collab-trio serve` entry point, with `--store` in a
temporary data directory; sqlite is the server's default), so the clients'
work does not share its event loop. All clients run in this process, over
loopback:
- 20 normal clients join session `bench` and read everything;
- one client does the WebSocket upgrade on a raw socket (receive buffer
  `--rcvbuf` bytes) and then never reads again;
- a sender joins last and sends `--rate` commands a second for `--seconds`
  (commands, not cursors: commands are never coalesced). Each command
  carries its send time (time.perf_counter(), the same clock in every client
  of this process) in `data.sent_at`; each normal client records
  receive time - send time for every relay, so latency includes the server's
  commit and the clients' own decoding.

The never-reading client's fate: the time the others were told it left
(`user:left`, reason too_slow, close code 1013 in the server's log) and, at
the end, what its socket holds (messages, a close frame or not, EOF).

Exit status: 0 if every normal client received every command exactly once
and in order; 1 if one missed a message; 2 if the run itself went wrong.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from collab_trio import testing

LOOPBACK = "127.0.0.1"
SESSION = "bench"
NEVER_READS = "never-reads"
# Bounds on every wait on the other side (seconds).
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
DRAIN_TIMEOUT = 10.0
SOCKET_READ_TIMEOUT = 10.0
SOCKET_QUIET = 1.0
MAX_HANDSHAKE_BYTES = 64 * 1024
MAX_SOCKET_BYTES = 256 * 1024 * 1024

EXIT_OK, EXIT_MISSED, EXIT_BROKEN = 0, 1, 2

# An Optiverse lens besides its position (as in commit_throughput.py).
LENS_FIELDS = {
    "name": "L1",
    "focal_length_mm": 100.0,
    "clear_aperture_mm": 25.4,
    "center_thickness_mm": 3.6,
    "material": "N-BK7",
    "coating": "AR 400-700 nm",
    "mount": "SM1L05",
}


class RunBroken(Exception):
    """The run could not take place (server did not start, a client could not join)."""


@attrs.define(eq=False)
class Clock:
    """When the first broadcast was sent (time.perf_counter()), once it was."""

    t0: float | None = None

    def since(self, moment: float) -> float | None:
        return None if self.t0 is None else moment - self.t0


# ---------------------------------------------------------------------------
# The server (a child process, run by collab_trio.testing) and the clients


@attrs.define(eq=False)
class ServerWatch:
    """What the server's log says about the never-reading client, and anything else amiss."""

    child: testing.ServerProcess | None = None
    # (perf_counter at arrival, line) of the lines about the never-reading client.
    slow_lines: list[tuple[float, str]] = attrs.field(factory=list)
    problems: list[str] = attrs.field(factory=list)
    exit_status: int | None = None

    def feed(self, line: str) -> None:
        if f"User {NEVER_READS} " in line and ("too slow" in line or " left " in line):
            self.slow_lines.append((time.perf_counter(), line))
        elif " WARNING " in line or " ERROR " in line or line.startswith("Traceback"):
            self.problems.append(line)

    async def stop(self) -> None:
        """SIGINT, then a bounded wait; kill if it hangs."""
        assert self.child is not None
        self.exit_status = await self.child.stop(signal.SIGINT, STOP_TIMEOUT)


@asynccontextmanager
async def start_server(store: str) -> AsyncIterator[ServerWatch]:
    """The server in a child process on a free loopback port; killed on exit if still running."""
    watch = ServerWatch()
    with tempfile.TemporaryDirectory(prefix="slow-client-") as data_dir:
        try:
            async with testing.server_process(
                "--store", store, "--data-dir", data_dir, start_timeout=START_TIMEOUT, on_line=watch.feed
            ) as child:
                watch.child = child
                yield watch
        except* testing.HarnessError as group:
            # The only harness check is the listening line.
            raise RunBroken(f"the server did not start: {group.exceptions[0]}") from None


@asynccontextmanager
async def open_client(port: int, user: str) -> AsyncIterator[WebSocketConnection]:
    """A joined WebSocket client (connection:ack read) whose socket is always closed."""
    async with testing.tcp_client(
        port, f"/ws/{SESSION}/{user}", message_queue_size=64,
        connect_timeout=CONNECT_TIMEOUT, close_timeout=CLOSE_TIMEOUT,
    ) as ws:
        ack = await testing.recv_json(ws, CONNECT_TIMEOUT)
        if ack.get("type") != "connection:ack":
            raise RunBroken(f"{user}: first message was {ack.get('type')!r}")
        yield ws


@attrs.define(eq=False)
class Reader:
    """A normal client: counts every relayed command and its latency."""

    name: str
    expected: int
    clock: Clock
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    last_op: int = -1
    latencies: list[float] = attrs.field(factory=list)
    # Seconds after the first broadcast when this client heard that the never-reader left.
    slow_left_at: float | None = None
    slow_left_reason: str | None = None
    closed: str | None = None
    done: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_client(port, self.name) as ws:
            task_status.started()
            try:
                # At most every relay plus the presence notices; cancelled at the end anyway.
                for _ in range(self.expected * 2 + 1000):
                    text = await ws.get_message()
                    arrived = time.perf_counter()
                    self.handle(json.loads(text), arrived)
            except ConnectionClosed as exc:
                self.closed = str(exc.reason)
            finally:
                self.done.set()

    def handle(self, message: dict[str, Any], arrived: float) -> None:
        kind = message.get("type")
        if kind == "command":
            op = message.get("op_id")
            if not isinstance(op, int) or op <= self.last_op:
                self.duplicates += 1  # seen before (or no op_id at all)
                return
            if op != self.last_op + 1:
                self.out_of_order += 1
            self.last_op = op
            self.received += 1
            self.latencies.append(arrived - message["command"]["data"]["sent_at"])
            if self.received >= self.expected:
                self.done.set()
        elif kind == "user:left" and message.get("user_id") == NEVER_READS:
            self.slow_left_at = self.clock.since(arrived)
            self.slow_left_reason = message.get("reason")


@attrs.define(eq=False)
class NeverReader:
    """Does the WebSocket upgrade on a raw socket, then never reads; inspected at the end."""

    rcvbuf: int
    stream: trio.SocketStream | None = None
    # perf_counter when this benchmark closed the socket itself.
    closed_at: float | None = None
    data: bytearray = attrs.field(factory=bytearray)

    async def connect(self, port: int) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window, so the server's outbox (not the kernel) backs up.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        with trio.fail_after(CONNECT_TIMEOUT):
            await sock.connect((LOOPBACK, port))
        self.stream = trio.SocketStream(sock)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        request = (
            f"GET /ws/{SESSION}/{NEVER_READS} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        response = bytearray()
        with trio.fail_after(CONNECT_TIMEOUT):
            await self.stream.send_all(request.encode())
            while b"\r\n\r\n" not in response and len(response) < MAX_HANDSHAKE_BYTES:
                chunk = await self.stream.receive_some(4096)
                if not chunk:
                    break
                response += chunk
        head, _, rest = bytes(response).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RunBroken(f"never-reading client: upgrade refused: {head[:80]!r}")
        self.data += rest  # frames that came with the response (its connection:ack)

    async def read_all(self) -> bool:
        """Read what the socket holds until EOF or a quiet second (bounded); True at EOF."""
        assert self.stream is not None
        with trio.move_on_after(SOCKET_READ_TIMEOUT):
            while len(self.data) < MAX_SOCKET_BYTES:
                chunk = None
                with trio.move_on_after(SOCKET_QUIET):
                    try:
                        chunk = await self.stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return True  # reset by the server: the end as well
                if chunk is None:
                    return False  # nothing more for a while, and no EOF: still open
                if not chunk:
                    return True
                self.data += chunk
        return False

    async def aclose(self) -> None:
        if self.stream is not None and self.closed_at is None:
            self.closed_at = time.perf_counter()
            await trio.aclose_forcefully(self.stream)


@attrs.frozen
class Frames:
    messages: int
    commands: int
    close: tuple[int, str] | None
    partial_bytes: int


def parse_server_frames(data: bytes) -> Frames:
    """Unmasked server frames: text messages, relayed commands, the close frame if any."""
    messages = commands = 0
    close = None
    i = 0
    while i + 2 <= len(data):
        opcode, length, j = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if length == 126:
            length, j = int.from_bytes(data[j:j + 2], "big"), j + 2
        elif length == 127:
            length, j = int.from_bytes(data[j:j + 8], "big"), j + 8
        if data[i + 1] & 0x80:
            j += 4  # masked (a server never masks; skip the key anyway)
        if j + length > len(data):
            break
        payload = bytes(data[j:j + length])
        if opcode == 0x1:
            messages += 1
            commands += b'"type":"command"' in payload
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            close = (code, payload[2:].decode("utf-8", "replace"))
        i = j + length
    return Frames(messages, commands, close, len(data) - i)


def command_text(n: int, sent_at: float) -> str:
    action = "add_item" if n == 0 else "move_item"
    data = {
        "x_mm": round(math.cos(n / 50) * 200, 3),
        "y_mm": round(math.sin(n / 50) * 100, 3),
        "angle_deg": n % 360,
        **LENS_FIELDS,
        "sent_at": sent_at,
    }
    return json.dumps(testing.command(action, "bench-lens", data, op_id=n), separators=(",", ":"))


@attrs.define(eq=False)
class Sender:
    total: int
    rate: float
    clock: Clock
    sent: int = 0
    acked: int = 0
    max_lag: float = 0.0
    send_seconds: float = 0.0

    async def run(self, port: int) -> None:
        async with open_client(port, "sender") as ws:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._acks, ws)
                start = trio.current_time()
                self.clock.t0 = time.perf_counter()
                for n in range(self.total):
                    due = start + n / self.rate
                    await trio.sleep_until(due)
                    self.max_lag = max(self.max_lag, trio.current_time() - due)
                    await ws.send_message(command_text(n, time.perf_counter()))
                    self.sent += 1
                self.send_seconds = trio.current_time() - start
                with trio.move_on_after(DRAIN_TIMEOUT):
                    while self.acked < self.sent:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()

    async def _acks(self, ws: WebSocketConnection) -> None:
        for _ in range(self.total * 2 + 1000):
            if json.loads(await ws.get_message()).get("type") == "ack":
                self.acked += 1


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    index = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[index]


# ---------------------------------------------------------------------------
# The run


async def bench(args: argparse.Namespace) -> int:
    total = int(round(args.seconds * args.rate))
    clock = Clock()
    readers = [Reader(f"reader{i:02d}", total, clock) for i in range(args.clients)]
    never = NeverReader(args.rcvbuf)
    sender = Sender(total, args.rate, clock)
    async with start_server(args.store) as server:
        assert server.child is not None
        port = server.child.port
        try:
            async with trio.open_nursery() as nursery:
                for reader in readers:
                    await nursery.start(reader.run, port)
                await never.connect(port)
                print(
                    f"server: child process `python -m collab_trio serve --store {args.store}` "
                    f"(pid {server.child.process.pid}, port {port}); {args.clients} normal clients, "
                    f"1 never-reading client (SO_RCVBUF {args.rcvbuf}) and the sender in this process",
                    flush=True,
                )
                print(f"sending {total} commands at {args.rate:g}/s for {args.seconds:g} s ...", flush=True)
                await sender.run(port)
                with trio.move_on_after(DRAIN_TIMEOUT):
                    for reader in readers:
                        await reader.done.wait()
                eof = await never.read_all()
                await never.aclose()
                nursery.cancel_scope.cancel()
        finally:
            await never.aclose()
        await server.stop()
    return report(args, total, readers, never, eof, sender, server, clock)


def report(
    args: argparse.Namespace,
    total: int,
    readers: list[Reader],
    never: NeverReader,
    eof: bool,
    sender: Sender,
    server: ServerWatch,
    clock: Clock,
) -> int:
    print()
    print(
        f"messages sent: {sender.sent} in {sender.send_seconds:.1f} s "
        f"({sender.sent / max(sender.send_seconds, 1e-9):.1f}/s; sender at most {sender.max_lag * 1000:.1f} ms "
        f"behind schedule), acknowledged: {sender.acked}"
    )
    print("received per normal client:")
    for row in range(0, len(readers), 5):
        print("  " + "  ".join(f"{r.name} {r.received:5d}" for r in readers[row:row + 5]))
    missed = [r for r in readers if r.received != sender.sent or r.out_of_order or r.duplicates]
    if missed:
        for r in missed:
            print(
                f"  {r.name}: {r.received}/{sender.sent} received, {r.out_of_order} gaps, "
                f"{r.duplicates} duplicates, closed: {r.closed}"
            )
    else:
        print(f"  every normal client received all {sender.sent}, in order, no duplicates")

    told = [r.slow_left_at for r in readers if r.slow_left_at is not None]
    reasons = {r.slow_left_reason for r in readers if r.slow_left_reason is not None}
    frames = parse_server_frames(bytes(never.data))
    if told:
        print(
            f"never-reading client: removed by the server {min(told):.2f} s after the first broadcast "
            f"({len(told)}/{len(readers)} normal clients got user:left, reason {', '.join(sorted(reasons))})"
        )
    else:
        print("never-reading client: NOT removed during the run (no user:left)")
    for arrived, line in server.slow_lines:
        after = never.closed_at is not None and arrived >= never.closed_at
        note = " (after this benchmark closed its socket)" if after else ""
        print(f"  server log at {clock.since(arrived) or 0:.2f} s{note}: {line}")
    close = f"close frame {frames.close[0]} {frames.close[1]!r}" if frames.close else "no close frame"
    print(
        f"  its socket, read at the end: {frames.messages} messages ({frames.commands} of the "
        f"{sender.sent} commands), {close}, {frames.partial_bytes} bytes of a cut-off frame, "
        f"{'then EOF (the server closed the TCP connection)' if eof else 'no EOF: still open'}"
    )

    latencies = sorted(ms for r in readers for ms in r.latencies)
    if latencies:
        worst_p99 = max(percentile(sorted(r.latencies), 0.99) for r in readers if r.latencies)
        print(
            f"latency send -> receive over {len(latencies)} deliveries: "
            f"p50 {percentile(latencies, 0.50) * 1000:.2f} ms, p99 {percentile(latencies, 0.99) * 1000:.2f} ms, "
            f"max {latencies[-1] * 1000:.2f} ms (worst single client's p99 {worst_p99 * 1000:.2f} ms)"
        )
    if server.problems:
        print("server warnings/errors other than the slow client:")
        for line in server.problems[:20]:
            print(f"  {line}")
    print(f"server exit status after SIGINT: {server.exit_status}")
    if missed or sender.sent != total:
        print(f"RESULT: FAIL ({len(missed)} normal client(s) missed messages)")
        return EXIT_MISSED
    print("RESULT: PASS (every normal client received every message)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slow_client_latency.py",
        description="Delivery and latency of normal clients next to one that never reads.",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="broadcast for this long (default: %(default)g)")
    parser.add_argument("--rate", type=float, default=50.0, help="commands per second (default: %(default)g)")
    parser.add_argument("--clients", type=int, default=20, help="normal clients (default: %(default)s)")
    parser.add_argument(
        "--store", choices=("sqlite", "memory"), default="sqlite",
        help="the server's store; sqlite (its default) in a temporary directory (default: %(default)s)",
    )
    parser.add_argument(
        "--rcvbuf", type=int, default=4096,
        help="SO_RCVBUF of the never-reading client's socket, in bytes (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.rate <= 0 or args.clients < 1 or args.rcvbuf < 1:
        raise SystemExit("--seconds, --rate, --clients and --rcvbuf must be positive")
    status = EXIT_BROKEN
    try:
        status = trio.run(bench, args)
    except* KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    except* (RunBroken, HandshakeError, ConnectionClosed, OSError, trio.TooSlowError) as group:
        first = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"the run went wrong: {first!r}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
