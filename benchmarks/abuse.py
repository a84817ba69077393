#!/usr/bin/env python3
"""Budgets and abuse: what one misbehaving client costs a `collab-trio serve` child.

    python benchmarks/abuse.py [--short] [--only NAME[,NAME...]] [--strict] [--server-log]

Each scenario starts its own `collab-trio serve` child (collab_trio.testing,
loopback, a fresh temporary --data-dir) and measures it from outside, through
public interfaces only: WebSocket clients in this process (raw sockets with
hand-made, masked frames, so that a client can stop reading, flood control
frames or split a message into empty continuation frames), the server's log,
and /proc/<pid>/status VmRSS and /proc/<pid>/stat utime+stime of the server
process. Flags a scenario needs but `serve --help` does not list are left out
(and said so). Where a scenario is not about the rate limit, it is lifted.

Scenarios (--only takes these names):
  never_reader  20 readers and one client that never reads, a sender sending
                30 KB commands at 50/s for 20 s (--write-timeout 5): when the
                never-reader is closed (readers' user:left, reason too_slow),
                the server's RSS growth, and the readers' p99 latency against
                a baseline run without the never-reader (three rounds of
                each, alternating; the change is the median of the rounds'
                changes; --short: one round).
  sync_flood    a ~9 MB document (sessions import; 1 KB items), then a client
                that never reads sends 150 sync:request: the server's RSS
                growth (the peak from before the flood until a few seconds
                after it). Also: whether a reader gets the document's
                sync:state at all.
  resume_large  100 update_item of one item with ~900 KB data, then resumes
                (?since=0&epoch=E on the URL, and a sync:request since=V-3):
                the largest message the resuming client receives.
  small_values  1 MiB messages of many tiny values (a command holding as many
                empty arrays as the server accepts; a command, a ping with a
                pad and an unknown type of ~350k {}, which it refuses): server
                CPU per message, and the pong delay of a client in another
                session meanwhile.
  floods        with the default rate limit: a WebSocket ping flood, one
                message in endless empty continuation frames, and messages of
                200 frames at 100 messages/s: the close code and when it came,
                and the server's CPU meanwhile.
  big_document  a 100k-item document (sessions import): a client of another
                session pings every 20 ms while the big session is loaded,
                synced, changed and unloaded (snapshot): the longest pong
                delay. Also: whether the sync:state answers arrive.

--short scales every scenario down (the whole run takes well under a minute).
Every figure is printed next to its bound with PASS or FAIL (INFO: no bound);
a scenario that could not run (no server, a refused upgrade, a timeout) gets an
ERROR row and the next one runs. ERROR and Traceback lines of the server's
log are noted under their scenario (--server-log prints the whole log). Exit
status 0 when the run completed, even with FAILs; with --strict, 1 on any
FAIL or ERROR.

Latency and pong figures are taken in this process, so a busy machine (the
load average is printed first) inflates them; CPU figures are the server's own.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import secrets
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from collab_trio import testing
from collab_trio.protocol import CONTAINER_BYTES, MAX_CONTAINERS_FREE

try:
    import orjson

    def loads(data: bytes | str) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - orjson is a dependency of the server

    def loads(data: bytes | str) -> Any:
        return json.loads(data)


LOOPBACK = "127.0.0.1"
KIB, MIB = 1024, 1024 * 1024
MB = 1_000_000
# Bounds on every wait on the other side (seconds).
CONNECT_TIMEOUT = 10.0
ANSWER_TIMEOUT = 30.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
IMPORT_TIMEOUT = 120.0
PONG_TIMEOUT = 5.0
SYNC_TIMEOUT = 20.0
MAX_HANDSHAKE_BYTES = 64 * KIB
# The largest message a measuring client accepts (a 100k-item sync:state is ~12 MB).
CLIENT_MAX_MESSAGE = 256 * MIB
# A scenario whose server grows by more than this is stopped (kill) to protect the machine.
MEMORY_GUARD = 3 * 1024 * MIB
# What this script passes where a scenario is not about the rate limit.
UNLIMITED = {"rate_limit": 1_000_000, "rate_burst": 1_000_000}
# The server's defaults the bounds are stated against (passed explicitly when the flag exists).
MAX_MESSAGE_SIZE = 1 * MIB
MAX_QUEUE_BYTES = 4 * MIB
MAX_FRAGMENTS = 256
# --server-log: print each server child's whole output when it stops.
SHOW_SERVER_LOG = False

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
TYPE_RE = re.compile(rb'"type"\s*:\s*"([^"\\]{1,64})"')


# ---------------------------------------------------------------------------
# Results


@attrs.frozen
class Figure:
    scenario: str
    name: str
    value: str
    bound: str
    verdict: str  # PASS, FAIL, INFO or ERROR


@attrs.define(eq=False)
class Report:
    """The figures and notes of one scenario, kept as they come (a timeout keeps what was measured)."""

    scenario: str
    figures: list[Figure] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def figure(self, name: str, value: str, bound: str, ok: bool | None) -> None:
        verdict = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        self.figures.append(Figure(self.scenario, name, value, bound, verdict))
        print(f"  [{verdict}] {name}: {value} (bound: {bound})", flush=True)

    def error(self, name: str, text: str) -> None:
        self.figures.append(Figure(self.scenario, name, text, "-", "ERROR"))
        print(f"  [ERROR] {name}: {text}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


@attrs.frozen
class Scale:
    """Every scenario's size, full or --short."""

    fan_readers: int
    # Baseline and never-reader runs, alternating; the p99 change is the
    # median of the rounds' changes (one round's p99 moves by up to +-50% on
    # two shared cores: a busy moment of the machine in one 20 s run decides
    # a pooled p99).
    fan_rounds: int
    fan_seconds: float
    fan_baseline_seconds: float
    fan_rate: float
    fan_bytes: int
    fan_write_timeout: float
    flood_items: int
    flood_requests: int
    flood_settle: float
    resume_commands: int
    values_count: int
    values_idle: float
    flood_seconds: float
    flood_grace: float
    big_items: int
    big_cycles: int
    scenario_timeout: float
    # The whole run, all scenarios together (cleanup of the last one aside).
    budget: float


FULL = Scale(
    fan_readers=20, fan_rounds=3, fan_seconds=20.0, fan_baseline_seconds=20.0, fan_rate=50.0, fan_bytes=30_000,
    fan_write_timeout=5.0, flood_items=9000, flood_requests=150, flood_settle=3.0, resume_commands=100,
    values_count=5, values_idle=1.0, flood_seconds=5.0, flood_grace=2.0, big_items=100_000, big_cycles=3,
    scenario_timeout=240.0, budget=1200.0,
)
SHORT = Scale(
    fan_readers=5, fan_rounds=1, fan_seconds=4.0, fan_baseline_seconds=3.0, fan_rate=50.0, fan_bytes=30_000,
    fan_write_timeout=2.0, flood_items=2000, flood_requests=30, flood_settle=1.5, resume_commands=12,
    values_count=2, values_idle=0.5, flood_seconds=2.0, flood_grace=1.0, big_items=20_000, big_cycles=1,
    scenario_timeout=25.0, budget=110.0,
)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (nan if empty)."""
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


# ---------------------------------------------------------------------------
# The server child and what /proc says about it


_SERVE_FLAGS: set[str] | None = None


def serve_flags() -> set[str]:
    """The options `collab-trio serve --help` lists (empty if it can't say)."""
    global _SERVE_FLAGS
    if _SERVE_FLAGS is None:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "collab_trio", "serve", "--help"], env=testing.child_env(),
                capture_output=True, text=True, timeout=60, check=False,
            )
            _SERVE_FLAGS = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", done.stdout))
        except (OSError, subprocess.TimeoutExpired):
            _SERVE_FLAGS = set()
    return _SERVE_FLAGS


def proc_rss(pid: int) -> int | None:
    """VmRSS of a process in bytes (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_cpu(pid: int) -> float | None:
    """utime + stime of a process (all its threads) in seconds (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@attrs.define(eq=False)
class Server:
    child: testing.ServerProcess
    data_dir: str

    @property
    def pid(self) -> int:
        return self.child.process.pid

    @property
    def port(self) -> int:
        return self.child.port

    @property
    def alive(self) -> bool:
        return self.child.process.returncode is None

    def rss(self) -> int:
        value = proc_rss(self.pid) if self.alive else None
        if value is None:
            raise ScenarioBroken(f"the server (pid {self.pid}) is gone: exit status {self.child.process.returncode}")
        return value

    def cpu(self) -> float:
        value = proc_cpu(self.pid) if self.alive else None
        if value is None:
            raise ScenarioBroken(f"the server (pid {self.pid}) is gone: exit status {self.child.process.returncode}")
        return value

    def log_lines(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.child.lines if regex.search(line)]

    def problems(self) -> list[str]:
        return [
            line for line in self.child.lines
            if " ERROR " in line or line.startswith("Traceback") or " CRITICAL " in line
        ]

    async def wait_cpu_quiet(self, quiet: float = 0.3, limit: float = 5.0) -> None:
        """Until the server used (almost) no CPU for `quiet` seconds, at most `limit` seconds."""
        tick = 1.0 / os.sysconf("SC_CLK_TCK")
        with trio.move_on_after(limit):
            while True:
                before = proc_cpu(self.pid) if self.alive else None
                await trio.sleep(quiet)
                after = proc_cpu(self.pid) if self.alive else None
                if before is None or after is None or after - before <= tick * 1.5 + quiet * 0.03:
                    return


class ScenarioBroken(Exception):
    """The scenario could not go on (the server is gone, an upgrade was refused, ...)."""


def server_args(report: Report, data_dir: str, **options: Any) -> list[str]:
    """`--data-dir` plus the options `serve` knows (underscores become dashes); the others are noted."""
    known = serve_flags()
    args = ["--data-dir", data_dir]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if not known or flag in known:
            args += [flag, str(value)]
        else:
            report.note(f"`serve` has no {flag} yet: not passed")
    return args


@asynccontextmanager
async def start_server(report: Report, data_dir: str | None = None, **options: Any) -> AsyncIterator[Server]:
    """A fresh `collab-trio serve` child on a free loopback port; stopped (or killed) on exit."""
    with tempfile.TemporaryDirectory(prefix=f"collab-abuse-{report.scenario}-") as fresh:
        directory = data_dir or fresh
        try:
            async with testing.server_process(
                *server_args(report, directory, **options), start_timeout=START_TIMEOUT
            ) as child:
                server = Server(child, directory)
                try:
                    yield server
                finally:
                    with trio.CancelScope(shield=True):
                        await child.stop(signal.SIGINT, STOP_TIMEOUT)
                    problems = server.problems()
                    for line in problems[:3]:
                        report.note(f"server log: {line}")
                    if len(problems) > 3:
                        report.note(f"server log: ... {len(problems)} ERROR/Traceback lines in all")
                    if SHOW_SERVER_LOG:
                        print(f"  --- server log ({report.scenario}) ---", *child.lines, "  ---", sep="\n", flush=True)
        except* testing.HarnessError as group:
            text = str(group.exceptions[0]).strip().splitlines()
            raise ScenarioBroken(f"the server did not start: {' | '.join(text[:6])}") from None


@attrs.define(eq=False)
class RssWatch:
    """Samples the server's RSS every 50 ms: the peak since `reset()`; kills the server past the guard."""

    server: Server
    base: int = 0
    peak: int = 0
    last: int = 0
    tripped: bool = False

    def reset(self) -> int:
        self.base = self.peak = self.last = self.server.rss()
        return self.base

    @property
    def growth(self) -> int:
        return self.peak - self.base

    async def run(self) -> None:
        while self.server.alive:
            rss = proc_rss(self.server.pid)
            if rss is None:
                return
            self.last = rss
            self.peak = max(self.peak, rss)
            if self.base and rss - self.base > MEMORY_GUARD:
                self.tripped = True
                self.server.child.process.kill()
                return
            await trio.sleep(0.05)


# ---------------------------------------------------------------------------
# A raw WebSocket client: masked frames built by hand, server frames parsed by hand


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key (as big integers: C speed, a few ms per MiB)."""
    n = len(payload)
    if n == 0:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One client frame (masked, as clients must)."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head.append(0x80 | n)
    elif n < 1 << 16:
        head.append(0x80 | 126)
        head += struct.pack("!H", n)
    else:
        head.append(0x80 | 127)
        head += struct.pack("!Q", n)
    key = secrets.token_bytes(4)
    return bytes(head) + key + mask_payload(payload, key)


def text_frame(message: str | bytes | dict[str, Any]) -> bytes:
    if isinstance(message, dict):
        message = json.dumps(message, separators=(",", ":"))
    if isinstance(message, str):
        message = message.encode()
    return frame(OP_TEXT, message)


def message_type(payload: bytes) -> str | None:
    """The `type` of a server message; large ones are peeked at, not parsed (keeps this loop responsive)."""
    if len(payload) < 64 * KIB:
        try:
            message = loads(payload)
        except ValueError:
            return None
        return message.get("type") if isinstance(message, dict) else None
    for part in (payload[:512], payload[-512:]):
        if match := TYPE_RE.search(part):
            return match.group(1).decode()
    return None


class WSClosed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed: {code} {reason}")
        self.code = code
        self.reason = reason


class HandshakeRefused(ScenarioBroken):
    pass


@attrs.define(eq=False)
class RawWS:
    stream: trio.SocketStream
    name: str
    max_message: int = CLIENT_MAX_MESSAGE
    chunk: int = 256 * KIB
    buf: bytearray = attrs.field(factory=bytearray)
    pos: int = 0
    close_code: int | None = None
    close_reason: str = ""
    closed_at: float | None = None
    pongs: int = 0
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _done: bool = False
    _close_sent: bool = False

    @classmethod
    async def connect(
        cls, port: int, path: str, *, rcvbuf: int | None = None, max_message: int = CLIENT_MAX_MESSAGE,
        timeout: float = CONNECT_TIMEOUT,
    ) -> RawWS:
        """TCP connect and the HTTP upgrade (101 checked); frames that came along are kept."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                # A small receive window, so the server's queue (not this kernel) backs up.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with trio.fail_after(timeout):
                await sock.connect((LOOPBACK, port))
        except trio.TooSlowError:
            sock.close()
            raise ScenarioBroken(f"{path}: no TCP connection within {timeout:g} s") from None
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
        try:
            key = base64.b64encode(secrets.token_bytes(16)).decode()
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            response = bytearray()
            with trio.fail_after(timeout):
                await stream.send_all(request.encode())
                while b"\r\n\r\n" not in response:
                    if len(response) > MAX_HANDSHAKE_BYTES:
                        raise HandshakeRefused(f"{path}: no end of the upgrade response")
                    data = await stream.receive_some(4096)
                    if not data:
                        raise HandshakeRefused(f"{path}: connection closed during the upgrade: {bytes(response)[:120]!r}")
                    response += data
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise HandshakeRefused(f"{path}: no upgrade response within {timeout:g} s") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        head, _, rest = bytes(response).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            await trio.aclose_forcefully(stream)
            raise HandshakeRefused(f"{path}: upgrade refused: {head.splitlines()[0][:120]!r}")
        return cls(stream, path.rsplit("/", 1)[-1].split("?")[0], max_message, buf=bytearray(rest))

    @property
    def closed(self) -> bool:
        return self.close_code is not None or self._done

    # -- sending -------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._mark_closed(self.close_code or 1006, f"send failed: {exc!r}")
                raise WSClosed(self.close_code, self.close_reason) from None

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_raw(text_frame(message))

    # -- receiving -----------------------------------------------------------

    def _mark_closed(self, code: int | None, reason: str) -> None:
        if self.closed_at is None:
            self.closed_at = time.perf_counter()
            self.close_code, self.close_reason = code, reason
        self._done = True

    async def _fill(self) -> None:
        if self._done:
            raise WSClosed(self.close_code, self.close_reason)
        try:
            data = await self.stream.receive_some(self.chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._mark_closed(1006, f"connection reset ({exc!r})")
            raise WSClosed(self.close_code, self.close_reason) from None
        if not data:
            self._mark_closed(1006, "EOF without a close frame")
            raise WSClosed(self.close_code, self.close_reason)
        if self.pos and (self.pos == len(self.buf) or self.pos > MIB):
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        buf, i = self.buf, self.pos
        if len(buf) - i < 2:
            return None
        b0, b1 = buf[i], buf[i + 1]
        length, j = b1 & 0x7F, i + 2
        if length == 126:
            if len(buf) < j + 2:
                return None
            length, j = int.from_bytes(buf[j:j + 2], "big"), j + 2
        elif length == 127:
            if len(buf) < j + 8:
                return None
            length, j = int.from_bytes(buf[j:j + 8], "big"), j + 8
        if length > self.max_message:
            raise ScenarioBroken(f"{self.name}: a {length}-byte frame, beyond this client's {self.max_message}")
        key = None
        if b1 & 0x80:  # a server must not mask; unmask anyway
            if len(buf) < j + 4:
                return None
            key, j = bytes(buf[j:j + 4]), j + 4
        if len(buf) < j + length:
            return None
        payload = bytes(buf[j:j + length])
        if key is not None:
            payload = mask_payload(payload, key)
        self.pos = j + length
        return bool(b0 & 0x80), b0 & 0x0F, payload

    async def recv_message(self) -> tuple[int, bytes]:
        """The next whole data message (opcode, payload); answers pings; WSClosed at the close."""
        opcode: int | None = None
        parts: list[bytes] = []
        size = 0
        while True:
            got = self._next_frame()
            if got is None:
                await self._fill()
                continue
            fin, op, payload = got
            if op == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._mark_closed(code, payload[2:].decode("utf-8", "replace"))
                if not self._close_sent:
                    self._close_sent = True
                    with trio.move_on_after(1.0):
                        try:
                            await self.send_raw(frame(OP_CLOSE, payload[:2]))
                        except WSClosed:
                            pass
                raise WSClosed(self.close_code, self.close_reason)
            if op == OP_PING:
                with trio.move_on_after(1.0):
                    try:
                        await self.send_raw(frame(OP_PONG, payload))
                    except WSClosed:
                        pass
                continue
            if op == OP_PONG:
                self.pongs += 1
                continue
            if op != OP_CONT:
                opcode, parts, size = op, [], 0
            parts.append(payload)
            size += len(payload)
            if size > self.max_message:
                raise ScenarioBroken(f"{self.name}: a message over {self.max_message} bytes")
            if fin:
                return opcode if opcode is not None else OP_TEXT, b"".join(parts)

    async def recv_json(self, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        with trio.fail_after(timeout):
            _, payload = await self.recv_message()
        try:
            message = loads(payload)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            raise ScenarioBroken(f"{self.name}: not a JSON object: {payload[:80]!r}")
        return message

    async def expect(self, kind: str, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        """Skip other messages until one of this type (within `timeout`)."""
        with trio.fail_after(timeout):
            while True:
                _, payload = await self.recv_message()
                if message_type(payload) == kind:
                    return loads(payload)

    async def drain(self) -> None:
        """Read and drop everything until the connection ends."""
        try:
            while True:
                await self.recv_message()
        except WSClosed:
            pass

    async def aclose(self, handshake: bool = True) -> None:
        """The close handshake (bounded; unless the connection already ended), then the socket.

        Waiting for the server's close frame (reading what comes before it)
        matters: a socket closed with unread data is reset, and the server
        may then never see this client leave.
        """
        if handshake and not self.closed:
            with trio.move_on_after(1.0):
                try:
                    self._close_sent = True
                    await self.send_raw(frame(OP_CLOSE, struct.pack("!H", 1000)))
                    await self.drain()
                except WSClosed:
                    pass
        self._done = True
        await trio.aclose_forcefully(self.stream)


async def close_all(clients: Iterable[RawWS], handshake: bool = True) -> None:
    """Close these clients at once (each close handshake is bounded), even while cancelled."""
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for ws in clients:
                nursery.start_soon(ws.aclose, handshake and ws.name != "never-reads")


async def join(port: int, session: str, user: str, query: str = "", **kwargs: Any) -> tuple[RawWS, dict[str, Any]]:
    """A joined client and its connection:ack."""
    ws = await RawWS.connect(port, f"/ws/{session}/{user}{query}", **kwargs)
    try:
        ack = await ws.recv_json(kwargs.get("timeout", CONNECT_TIMEOUT))
        if ack.get("type") != "connection:ack":
            raise ScenarioBroken(f"{user}: first message was {ack.get('type')!r}, not connection:ack")
    except WSClosed as exc:
        await ws.aclose(handshake=False)
        raise ScenarioBroken(f"{user} was closed at the join: {exc.code} {exc.reason}") from None
    except trio.TooSlowError:
        await ws.aclose(handshake=False)
        raise ScenarioBroken(f"{user}: no connection:ack within {kwargs.get('timeout', CONNECT_TIMEOUT):g} s") from None
    except BaseException:
        await ws.aclose(handshake=False)
        raise
    return ws, ack


@asynccontextmanager
async def joined(port: int, session: str, user: str, query: str = "", **kwargs: Any) -> AsyncIterator[tuple[RawWS, dict[str, Any]]]:
    ws, ack = await join(port, session, user, query, **kwargs)
    try:
        yield ws, ack
    finally:
        with trio.CancelScope(shield=True):
            await ws.aclose()


@attrs.define(eq=False)
class Prober:
    """Pings every `interval` from its own session and records each pong's round trip."""

    ws: RawWS
    interval: float = 0.02
    # (perf_counter when sent, round trip in seconds; PONG_TIMEOUT if none came)
    samples: list[tuple[float, float]] = attrs.field(factory=list)
    lost: int = 0
    ping: bytes = attrs.field(factory=lambda: text_frame({"type": "ping"}))

    async def run(self) -> None:
        due = trio.current_time()
        try:
            while True:
                sent = time.perf_counter()
                await self.ws.send_raw(self.ping)
                answered = False
                with trio.move_on_after(PONG_TIMEOUT):
                    while not answered:
                        _, payload = await self.ws.recv_message()
                        answered = message_type(payload) == "pong"
                if not answered:
                    self.lost += 1
                self.samples.append((sent, time.perf_counter() - sent))
                due = max(due + self.interval, trio.current_time())
                await trio.sleep_until(due)
        except WSClosed:
            pass

    def between(self, t0: float, t1: float) -> list[float]:
        """Round trips of the pings in flight at some point in [t0, t1]."""
        return [rtt for sent, rtt in self.samples if sent <= t1 and sent + rtt >= t0]


async def never_reader(port: int, session: str, user: str) -> RawWS:
    """Does the upgrade with a 4 KiB receive window, and is never read from."""
    return await RawWS.connect(port, f"/ws/{session}/{user}", rcvbuf=4096)


async def import_items(report: Report, data_dir: str, session: str, items: Iterable[dict[str, Any]]) -> bool:
    """`collab-trio sessions import` of {"items": [...]} into data_dir (before the server starts)."""
    path = Path(data_dir) / f"{session}-import.json"
    path.write_text(json.dumps({"items": list(items)}, separators=(",", ":")))
    command = [sys.executable, "-m", "collab_trio", "sessions", "import", str(path), "--as", session,
               "--data-dir", data_dir]
    started = time.perf_counter()
    try:
        with trio.fail_after(IMPORT_TIMEOUT):
            done = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False, env=testing.child_env()
            )
    except (OSError, trio.TooSlowError) as exc:
        report.note(f"sessions import failed ({exc!r}); building the document with commands")
        return False
    finally:
        path.unlink(missing_ok=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode("utf-8", "replace").strip().splitlines()
        report.note(f"sessions import exited {done.returncode} ({' | '.join(output[-3:])}); building with commands")
        return False
    report.note(f"imported the document with `sessions import` in {time.perf_counter() - started:.1f} s")
    return True


async def add_items(ws: RawWS, items: list[dict[str, Any]], window: int = 200) -> int:
    """add_item each item (its uuid as item_id) in windows of `window`, waiting for the answers; errors seen."""
    errors = 0
    for start in range(0, len(items), window):
        batch = items[start:start + window]
        data = b"".join(
            text_frame({
                "type": "command", "op_id": f"build-{start + k}",
                "command": {"action": "add_item", "item_type": item.get("item_type", "lens"),
                            "item_id": item["uuid"], "data": item},
            })
            for k, item in enumerate(batch)
        )
        await ws.send_raw(data)
        answered = 0
        with trio.fail_after(ANSWER_TIMEOUT):
            while answered < len(batch):
                kind = message_type((await ws.recv_message())[1])
                if kind in ("ack", "error"):
                    answered += 1
                    errors += kind == "error"
    return errors


# ---------------------------------------------------------------------------
# 1. never_reader


@attrs.define(eq=False)
class FanReader:
    ws: RawWS
    never: str
    latencies: list[float] = attrs.field(factory=list)
    received: int = 0
    last_op: int = -1
    gaps: int = 0
    # (perf_counter, reason) when told the never-reader left.
    never_left: tuple[float, str] | None = None
    closed: str | None = None
    malformed: int = 0

    def handle(self, message: dict[str, Any], arrived: float) -> None:
        kind = message.get("type")
        if kind == "command":
            op = message.get("op_id")
            data = message["command"]["data"]
            if not isinstance(op, int) or "sent_at" not in data:
                return  # the setup's add_item
            if op > self.last_op:
                self.gaps += op != self.last_op + 1
                self.last_op = op
                self.received += 1
            self.latencies.append(arrived - float(data["sent_at"]))
        elif kind == "user:left" and message.get("user_id") == self.never and self.never_left is None:
            self.never_left = (arrived, str(message.get("reason")))

    async def run(self) -> None:
        try:
            while True:
                _, payload = await self.ws.recv_message()
                arrived = time.perf_counter()
                try:
                    self.handle(loads(payload), arrived)
                except (ValueError, TypeError, AttributeError, KeyError):
                    self.malformed += 1
        except WSClosed as exc:
            self.closed = f"{exc.code} {exc.reason}"


@attrs.define
class FanResult:
    sent: int = 0
    t0: float | None = None
    latencies: list[float] = attrs.field(factory=list)
    complete: int = 0
    readers: int = 0
    never_left: tuple[float, str] | None = None
    rss_growth: int = 0
    rss_base: int = 0
    max_lag: float = 0.0
    reader_closed: list[str] = attrs.field(factory=list)


async def fan_run(report: Report, scale: Scale, with_never: bool) -> FanResult:
    result = FanResult()
    total = int(scale.fan_seconds * scale.fan_rate) if with_never else int(scale.fan_baseline_seconds * scale.fan_rate)
    bound = scale.fan_write_timeout + 2.0
    items = 8
    pad = "x" * scale.fan_bytes
    template = (
        '{"type":"command","op_id":%d,"command":{"action":"update_item","item_type":"lens",'
        '"item_id":"fan-%d","data":{"sent_at":%r,"pad":"' + pad + '"}}}'
    )
    async with start_server(
        report, **UNLIMITED, write_timeout=f"{scale.fan_write_timeout:g}", max_queue_bytes=MAX_QUEUE_BYTES
    ) as server:
        port = server.port
        watch = RssWatch(server)
        clients: list[RawWS] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.run)
                readers = []
                for i in range(scale.fan_readers):
                    ws, _ = await join(port, "fan", f"reader{i:02d}", max_message=4 * MIB)
                    clients.append(ws)
                    reader = FanReader(ws, "never-reads")
                    readers.append(reader)
                    nursery.start_soon(reader.run)
                if with_never:
                    clients.append(await never_reader(port, "fan", "never-reads"))
                sender, _ = await join(port, "fan", "sender", max_message=4 * MIB)
                clients.append(sender)
                acks = 0

                async def count_acks() -> None:
                    nonlocal acks
                    try:
                        while True:
                            if message_type((await sender.recv_message())[1]) == "ack":
                                acks += 1
                    except WSClosed:
                        pass

                nursery.start_soon(count_acks)
                for k in range(items):
                    await sender.send_json({"type": "command", "op_id": f"setup-{k}", "command": {
                        "action": "add_item", "item_type": "lens", "item_id": f"fan-{k}", "data": {"name": f"L{k}"}}})
                with trio.fail_after(ANSWER_TIMEOUT):
                    while acks < items:
                        await trio.sleep(0.02)
                await trio.sleep(0.3)
                result.rss_base = watch.reset()
                start = trio.current_time()
                result.t0 = time.perf_counter()
                for n in range(total):
                    due = start + n / scale.fan_rate
                    await trio.sleep_until(due)
                    result.max_lag = max(result.max_lag, trio.current_time() - due)
                    with trio.fail_after(ANSWER_TIMEOUT):
                        await sender.send_raw(text_frame(template % (n, n % items, time.perf_counter())))
                    result.sent += 1
                # Let the readers catch up; and give the never-reader its whole bound.
                with trio.move_on_after(10.0):
                    while min(r.received for r in readers) < result.sent or acks < items + result.sent:
                        await trio.sleep(0.05)
                if with_never:
                    with trio.move_on_after(max(0.0, result.t0 + bound + 1.0 - time.perf_counter())):
                        while all(r.never_left is None for r in readers):
                            await trio.sleep(0.05)
                result.rss_growth = watch.growth
                nursery.cancel_scope.cancel()
        finally:
            await close_all(clients)
        if watch.tripped:
            report.note(f"memory guard: the server grew by more than {mib(MEMORY_GUARD)} and was killed")
    result.readers = len(readers)
    result.complete = sum(r.received == result.sent and not r.gaps for r in readers)
    result.latencies = sorted(x for r in readers for x in r.latencies)
    told = [r.never_left for r in readers if r.never_left is not None]
    result.never_left = min(told) if told else None
    result.reader_closed = [r.closed for r in readers if r.closed]
    if any(r.malformed for r in readers):
        report.note(f"{sum(r.malformed for r in readers)} messages to the readers were not what PROTOCOL.md says")
    return result


async def scenario_never_reader(report: Report, scale: Scale) -> None:
    bound = scale.fan_write_timeout + 2.0
    report.note(
        f"{scale.fan_readers} readers, {scale.fan_bytes // 1000} KB update_item at {scale.fan_rate:g}/s; "
        f"baseline {scale.fan_baseline_seconds:g} s without the never-reader, then {scale.fan_seconds:g} s with it, "
        f"{scale.fan_rounds} time(s), the median round's p99 change; --write-timeout {scale.fan_write_timeout:g}"
    )
    base_latencies: list[float] = []
    latencies: list[float] = []
    changes: list[float] = []
    runs = []
    for round_ in range(scale.fan_rounds):
        baseline = await fan_run(report, scale, with_never=False)
        base_latencies += baseline.latencies
        report.note(
            f"baseline {round_ + 1}: {baseline.sent} sent, p50 {percentile(baseline.latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(baseline.latencies, 0.99) * 1000:.1f} ms, RSS growth {mib(baseline.rss_growth)}"
        )
        run = await fan_run(report, scale, with_never=True)
        latencies += run.latencies
        runs.append(run)
        round_base, round_p99 = percentile(baseline.latencies, 0.99), percentile(run.latencies, 0.99)
        if round_base > 0 and not math.isnan(round_base) and not math.isnan(round_p99):
            changes.append(round_p99 / round_base - 1)
        report.note(f"with the never-reader {round_ + 1}: {run.sent} sent, "
                    f"p99 {percentile(run.latencies, 0.99) * 1000:.1f} ms")
    base_latencies.sort()
    latencies.sort()
    base_p99 = percentile(base_latencies, 0.99)
    # The worst round counts for the close and the memory.
    closes = []
    for run in runs:
        assert run.t0 is not None
        closes.append(None if run.never_left is None else (run.never_left[0] - run.t0, run.never_left[1]))
    if None in closes:
        open_run = runs[closes.index(None)]
        report.figure("never-reader closed after", f"not closed ({open_run.sent / scale.fan_rate:.1f} s of sending)",
                      f"<= {bound:g} s, too_slow", False)
    else:
        after, reason = max(c for c in closes if c is not None)
        reasons = {c[1] for c in closes if c is not None}
        report.figure("never-reader closed after", f"{after:.2f} s ({', '.join(sorted(reasons))})",
                      f"<= {bound:g} s, too_slow", after <= bound and reasons == {"too_slow"})
    rss_bound = MAX_QUEUE_BYTES + 16 * MIB
    worst = max(runs, key=lambda r: r.rss_growth)
    report.figure("server RSS growth with never-reader", f"{mib(worst.rss_growth)} (from {mib(worst.rss_base)})",
                  f"<= {mib(rss_bound)}", worst.rss_growth <= rss_bound)
    p99 = percentile(latencies, 0.99)
    if len(changes) < len(runs):
        report.figure("reader p99 latency change", "no deliveries in a round", "< +20%", False)
    else:
        change = statistics.median(changes)
        each = ", ".join(f"{c:+.0%}" for c in changes)
        report.figure("reader p99 latency change",
                      f"{change:+.0%} (median of {len(changes)} rounds: {each}; pooled {base_p99 * 1000:.1f} -> "
                      f"{p99 * 1000:.1f} ms)",
                      "< +20%", change < 0.20)
    complete = sum(r.complete for r in runs)
    readers = sum(r.readers for r in runs)
    report.figure("readers that got every command", f"{complete}/{readers} ({sum(r.sent for r in runs)} commands)",
                  "all", complete == readers and all(r.sent > 0 for r in runs))
    for run in runs:
        if run.reader_closed:
            report.note(f"readers closed by the server: {run.reader_closed[:3]}")
    report.note(f"sender at most {max(r.max_lag for r in runs) * 1000:.0f} ms behind its schedule")


# ---------------------------------------------------------------------------
# 2. sync_flood


def kb_items(count: int, prefix: str, size: int = 1000) -> list[dict[str, Any]]:
    pad = "p" * (size - 60)
    return [{"uuid": f"{prefix}-{i:06d}", "item_type": "lens", "x_mm": float(i), "pad": pad} for i in range(count)]


async def sync_state(ws: RawWS, timeout: float = ANSWER_TIMEOUT) -> int:
    """Send sync:request; the size of the sync:state that answers it (WSClosed, TooSlowError)."""
    await ws.send_json({"type": "sync:request"})
    with trio.fail_after(timeout):
        while True:
            _, payload = await ws.recv_message()
            if message_type(payload) == "sync:state":
                return len(payload)


def why_closed(server: Server, user: str, exc: BaseException) -> str:
    """What the client saw, and the server's log line about closing this user, if any."""
    seen = f"closed {exc.code} {exc.reason!r}" if isinstance(exc, WSClosed) else f"no answer ({exc!r})"
    said = server.log_lines(rf"User {re.escape(user)} .*closing with") or server.log_lines(rf"User {re.escape(user)} left")
    return f"{seen}; server log: {log_text(said[-1])}" if said else seen


def log_text(line: str) -> str:
    """A server log line without its timestamp."""
    return re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+", "", line)


async def scenario_sync_flood(report: Report, scale: Scale) -> None:
    requests = scale.flood_requests
    with tempfile.TemporaryDirectory(prefix="collab-abuse-sync_flood-") as data_dir:
        items = kb_items(scale.flood_items, "flood")
        imported = await import_items(report, data_dir, "flood", items)
        async with start_server(report, data_dir, **UNLIMITED, max_queue_bytes=MAX_QUEUE_BYTES) as server:
            watch = RssWatch(server)
            holder, _ = await join(server.port, "flood", "holder")
            never: RawWS | None = None
            try:
                if not imported:
                    errors = await add_items(holder, items)
                    if errors:
                        report.note(f"{errors} of the {len(items)} add_item were refused")
                # Loads the document and its answer (a server may keep it encoded) before "before".
                name = f"sync:state of the {len(items)}-item document reaches a reader"
                try:
                    size = await sync_state(holder)
                    report.figure(name, f"{size / MB:.1f} MB delivered", "delivered", True)
                except (WSClosed, trio.TooSlowError) as exc:
                    report.figure(name, why_closed(server, "holder", exc), "delivered", False)
                    await holder.aclose(handshake=False)
                    holder, _ = await join(server.port, "flood", "holder2")  # keeps the session loaded
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(holder.drain)
                    nursery.start_soon(watch.run)
                    await trio.sleep(1.0)
                    before = watch.reset()
                    never = await never_reader(server.port, "flood", "never-reads")
                    flood = text_frame({"type": "sync:request"}) * requests
                    with trio.move_on_after(ANSWER_TIMEOUT) as sending:
                        try:
                            await never.send_raw(flood)
                        except WSClosed:
                            report.note("the never-reader was cut before all of its requests were sent")
                    if sending.cancelled_caught:
                        report.note("the server stopped reading the flood before all of it was sent")
                    await trio.sleep(scale.flood_settle)
                    await server.wait_cpu_quiet(limit=5.0)
                    after = watch.last
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    if never is not None:
                        await never.aclose(handshake=False)
                    await holder.aclose()
            gone = server.log_lines(r"never-reads .*(clos|left)")
            report.note(f"the never-reader was {'closed: ' + log_text(gone[0]) if gone else 'not closed'}")
        if watch.tripped:
            report.note(f"memory guard: the server grew by more than {mib(MEMORY_GUARD)} and was killed")
    report.figure(
        f"RSS growth, {requests} sync:request by a never-reader",
        f"{watch.growth / MB:.1f} MB peak, {(after - before) / MB:.1f} MB after (from {before / MB:.0f} MB)",
        "<= 20 MB", watch.growth <= 20 * MB,
    )


# ---------------------------------------------------------------------------
# 3. resume_large


async def largest_until_sync(ws: RawWS, timeout: float) -> tuple[int, str | None, str | None]:
    """(largest message, its type, type of the sync answer) up to and including the sync answer."""
    largest, largest_type = 0, None
    with trio.fail_after(timeout):
        while True:
            _, payload = await ws.recv_message()
            kind = message_type(payload)
            if len(payload) > largest:
                largest, largest_type = len(payload), kind
            if kind in ("sync:state", "sync:ops"):
                return largest, largest_type, kind


async def scenario_resume_large(report: Report, scale: Scale) -> None:
    count = scale.resume_commands
    limit = MAX_MESSAGE_SIZE
    pad = "r" * 900_000
    async with start_server(report, **UNLIMITED, max_message_size=limit) as server:
        async with joined(server.port, "resume", "writer") as (writer, ack):
            epoch = ack.get("epoch")
            await writer.send_json({"type": "command", "op_id": "add", "command": {
                "action": "add_item", "item_type": "lens", "item_id": "huge", "data": {"n": -1}}})
            await writer.expect("ack")
            errors = 0
            window = 2
            started = time.perf_counter()
            for n in range(0, count, window):
                batch = range(n, min(count, n + window))
                await writer.send_raw(b"".join(text_frame(
                    '{"type":"command","op_id":%d,"command":{"action":"update_item","item_type":"lens",'
                    '"item_id":"huge","data":{"n":%d,"pad":"%s"}}}' % (k, k, pad)) for k in batch))
                for _ in batch:
                    with trio.fail_after(ANSWER_TIMEOUT):
                        while (kind := message_type((await writer.recv_message())[1])) not in ("ack", "error"):
                            pass
                    errors += kind == "error"
            report.note(f"{count} update_item of ~900 KB in {time.perf_counter() - started:.1f} s"
                        f"{f', {errors} refused' if errors else ''}")
        async with joined(server.port, "resume", "probe") as (_, probe_ack):
            version = int(probe_ack.get("version", 0))
            epoch = probe_ack.get("epoch", epoch)
        report.note(f"session version {version}, epoch {epoch!r}")
        # Resume on the URL: the answer follows the connection:ack.
        query = f"?since=0&epoch={epoch}"
        async with joined(server.port, "resume", "late", query) as (late, _):
            try:
                size, kind, answer = await largest_until_sync(late, SYNC_TIMEOUT)
                report.figure("resume ?since=0&epoch: largest message", f"{size / KIB:.0f} KiB ({kind}, answer {answer})",
                              f"<= {limit / KIB:.0f} KiB", size <= limit)
            except WSClosed as exc:
                report.figure("resume ?since=0&epoch: largest message", f"closed {exc.code} {exc.reason}",
                              f"<= {limit / KIB:.0f} KiB", False)
            except trio.TooSlowError:
                report.figure("resume ?since=0&epoch: largest message", f"no sync answer within {SYNC_TIMEOUT:g} s",
                              f"<= {limit / KIB:.0f} KiB", False)
        since = max(0, version - 3)
        async with joined(server.port, "resume", "later") as (later, _):
            name = f"sync:request since={since} (3 ops behind): largest message"
            try:
                await later.send_json({"type": "sync:request", "since": since, "epoch": epoch})
                size, kind, answer = await largest_until_sync(later, SYNC_TIMEOUT)
                report.figure(name, f"{size / KIB:.0f} KiB ({kind})", f"<= {limit / KIB:.0f} KiB", size <= limit)
            except WSClosed as exc:
                report.figure(name, f"closed {exc.code} {exc.reason}", f"<= {limit / KIB:.0f} KiB", False)
            except trio.TooSlowError:
                report.figure(name, f"no sync answer within {SYNC_TIMEOUT:g} s", f"<= {limit / KIB:.0f} KiB", False)


# ---------------------------------------------------------------------------
# 4. small_values


def padded(prefix: str, suffix: str, size: int, value: str = "{}") -> bytes:
    """prefix + value,value,... + suffix, as close to `size` bytes as the values allow."""
    n = max(1, (size - len(prefix) - len(suffix) + 1) // (len(value) + 1))
    return (prefix + ",".join([value] * n) + suffix).encode()


def densest(prefix: str, suffix: str, size: int) -> bytes:
    """About `size` bytes holding as many empty arrays as the server accepts
    (see collab_trio.protocol.MAX_CONTAINERS_FREE), padded with zeros."""
    arrays = MAX_CONTAINERS_FREE + size // CONTAINER_BYTES - prefix.count("{") - prefix.count("[") - 8
    body = ",".join(["[]"] * arrays)
    zeros = max(0, (size - len(prefix) - len(suffix) - len(body)) // 2)
    return (prefix + body + ",0" * zeros + suffix).encode()


async def scenario_small_values(report: Report, scale: Scale) -> None:
    size = MAX_MESSAGE_SIZE - 200
    count = scale.values_count
    kinds: list[tuple[str, str, list[bytes], tuple[str, ...]]] = [
        ("densest command", "1 MiB command, as many [] as accepted", [
            text_frame(densest(
                '{"type":"command","op_id":%d,"command":{"action":"add_item","item_type":"lens",'
                '"item_id":"dense-%d","data":{"v":[' % (k, k), "]}}}", size))
            for k in range(count)
        ], ("ack",)),
        ("command", "1 MiB command, data of ~350k {}", [
            text_frame(padded(
                '{"type":"command","op_id":%d,"command":{"action":"add_item","item_type":"lens",'
                '"item_id":"values-%d","data":{"v":[' % (k, k), "]}}}", size))
            for k in range(count)
        ], ("ack", "error")),
        ("ping", "1 MiB ping with a pad of ~350k {}", [
            text_frame(padded('{"type":"ping","pad":[', "]}", size))
        ] * count, ("pong", "error")),
        ("unknown", "1 MiB unknown type with ~350k {}", [
            text_frame(padded('{"type":"abuse:unknown","pad":[', "]}", size))
        ] * count, ("error",)),
    ]
    async with start_server(report, **UNLIMITED, max_message_size=MAX_MESSAGE_SIZE) as server:
        async with joined(server.port, "probe", "prober") as (probe_ws, _):
            prober = Prober(probe_ws)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prober.run)
                user = 0
                for kind, label, frames, answers in kinds:
                    user += 1
                    async with joined(server.port, "values", f"sender{user}", max_message=16 * MIB) as (ws, _):
                        idle0, c_idle = time.perf_counter(), server.cpu()
                        await trio.sleep(scale.values_idle)
                        idle_rate = (server.cpu() - c_idle) / (time.perf_counter() - idle0)
                        t0, c0 = time.perf_counter(), server.cpu()
                        sent = 0
                        seen: dict[str, int] = {}
                        try:
                            for data in frames:
                                with trio.fail_after(ANSWER_TIMEOUT):
                                    await ws.send_raw(data)
                                    sent += 1
                                    while (answer := message_type((await ws.recv_message())[1])) not in answers:
                                        pass
                                seen[answer] = seen.get(answer, 0) + 1
                        except WSClosed as exc:
                            report.note(f"{kind}: closed {exc.code} {exc.reason!r} after {sent} message(s)")
                        except trio.TooSlowError:
                            report.note(f"{kind}: no answer within {ANSWER_TIMEOUT:g} s after {sent} message(s)")
                        await server.wait_cpu_quiet(limit=10.0)
                        t1, c1 = time.perf_counter(), server.cpu()
                    per = max(0.0, (c1 - c0) - idle_rate * (t1 - t0)) / max(sent, 1)
                    answered = ", ".join(f"{v} {k}" for k, v in seen.items()) or "no answer"
                    report.figure(f"server CPU per {label}", f"{per * 1000:.0f} ms ({sent} sent: {answered})",
                                  "<= 50 ms", per <= 0.050 and sent == len(frames))
                    rtts = prober.between(t0, t1)
                    worst = max(rtts) if rtts else math.nan
                    report.figure(f"pong delay, other session, during {kind}s",
                                  f"{worst * 1000:.0f} ms max over {len(rtts)} pings", "< 100 ms",
                                  bool(rtts) and worst < 0.100)
                nursery.cancel_scope.cancel()
            if prober.lost:
                report.note(f"{prober.lost} ping(s) got no pong within {PONG_TIMEOUT:g} s")


# ---------------------------------------------------------------------------
# 5. floods


@attrs.define
class FloodResult:
    frames: int = 0
    closed_after: float | None = None
    code: int | None = None
    reason: str = ""
    # Server CPU from the first frame until it went quiet after the close (or the end),
    # and as a share of one core over that time.
    cpu_total: float = math.nan
    seconds: float = 0.0
    cpu_share: float = math.nan


async def flood(server: Server, user: str, batches: Callable[[int], bytes], frames_per_batch: int,
                seconds: float, grace: float, pace: float | None = None, cap: int = 100_000) -> FloodResult:
    """Send batches(n) until the server closes, `seconds` pass or `cap` frames went; read meanwhile."""
    result = FloodResult()
    ws, _ = await join(server.port, "floods", user)
    try:
        t0, c0 = time.perf_counter(), server.cpu()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.drain)
            start = trio.current_time()
            with trio.move_on_after(seconds):
                n = 0
                while result.frames < cap and not ws.closed:
                    try:
                        await ws.send_raw(batches(n))
                    except WSClosed:
                        break
                    result.frames += frames_per_batch
                    n += 1
                    if pace is not None:
                        await trio.sleep_until(start + n * pace)
                    else:
                        await trio.lowlevel.checkpoint()
            with trio.move_on_after(max(0.0, t0 + seconds + grace - time.perf_counter())):
                while not ws.closed:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        # The server works on what it had received for a while after it closed: count that too.
        quiet = 0.3
        await server.wait_cpu_quiet(quiet=quiet, limit=5.0)
        result.cpu_total = server.cpu() - c0
        result.seconds = max(0.01, time.perf_counter() - quiet - t0)
        result.cpu_share = result.cpu_total / result.seconds
        if ws.closed_at is not None:
            result.closed_after = ws.closed_at - t0
            result.code, result.reason = ws.close_code, ws.close_reason
    finally:
        with trio.CancelScope(shield=True):
            await ws.aclose()
    return result


async def scenario_floods(report: Report, scale: Scale) -> None:
    seconds, grace = scale.flood_seconds, scale.flood_grace
    report.note("default rate limit (not lifted here)")
    async with start_server(report, max_fragments=MAX_FRAGMENTS) as server:
        batch = 1000
        pings = frame(OP_PING, b"abuse") * batch
        empty_cont = frame(OP_CONT, b"", fin=False)
        first = frame(OP_TEXT, b'{"type":"ping"}', fin=False)
        endless = lambda n: (first + empty_cont * (batch - 1)) if n == 0 else empty_cont * batch  # noqa: E731
        fragments = 200
        one_message = first + empty_cont * (fragments - 2) + frame(OP_CONT, b"", fin=True)
        cases = [
            ("ping flood", "pinger", lambda n: pings, batch, None, 4002),
            (f"one message in endless empty continuation frames (> {MAX_FRAGMENTS})", "fragmenter", endless, batch,
             None, 1009),
            (f"messages of {fragments} frames at 100/s", "splitter", lambda n: one_message, fragments, 0.01, 4002),
        ]
        for name, user, batches, per_batch, pace, expected in cases:
            try:
                result = await flood(server, user, batches, per_batch, seconds, grace, pace)
            except ScenarioBroken as exc:
                report.error(name, str(exc))
                continue
            cpu = (f"server CPU {result.cpu_total * 1000:.0f} ms, {result.cpu_share:.0%} of a core "
                   f"over the {result.seconds:.2f} s until it was quiet")
            if result.closed_after is None:
                value = f"not closed ({result.frames} frames sent; {cpu})"
            else:
                value = (f"closed {result.code} {result.reason!r} after {result.closed_after:.3f} s, "
                         f"{result.frames} frames sent; {cpu}")
            ok = result.code == expected and result.closed_after is not None and result.closed_after <= seconds
            report.figure(name, value, f"close {expected} within {seconds:g} s", ok)


# ---------------------------------------------------------------------------
# 6. big_document


def small_items(count: int) -> list[dict[str, Any]]:
    """Items of about 100 bytes each (as JSON)."""
    return [
        {"uuid": f"item-{i:06d}", "item_type": "lens", "x_mm": float(i % 1000), "y_mm": float(i // 1000),
         "angle_deg": 0.0, "name": f"L{i}"}
        for i in range(count)
    ]


async def big_cycle(report: Report, server: Server, cycle: int, failures: list[str]) -> int:
    """Join (load), three sync:request from two clients, one change, leave (snapshot, unload).

    The sync:request sent (each failure is added to `failures`)."""
    clients: list[RawWS] = []
    try:
        joined_at = time.perf_counter()
        a, _ = await join(server.port, "big", f"alpha{cycle}", timeout=60.0)
        clients.append(a)
        load_s = time.perf_counter() - joined_at
        b, _ = await join(server.port, "big", f"beta{cycle}", timeout=60.0)
        clients.append(b)
        synced_at = time.perf_counter()
        sizes = []
        attempts = 0
        for ws in (a, b, a):
            if ws.closed:
                continue
            attempts += 1
            try:
                sizes.append(await sync_state(ws, 60.0))
            except (WSClosed, trio.TooSlowError) as exc:
                failures.append(why_closed(server, ws.name, exc))
        sync_s = time.perf_counter() - synced_at
        # A change, so that the session snapshots when it unloads.
        if a.closed:
            a, _ = await join(server.port, "big", f"gamma{cycle}", timeout=60.0)
            clients.append(a)
        await a.send_json({"type": "command", "op_id": f"move-{cycle}", "command": {
            "action": "move_item", "item_type": "lens", "item_id": "item-000000",
            "data": {"x_mm": float(cycle + 1), "y_mm": 1.0, "angle_deg": 0.0}}})
        await a.expect("ack", 60.0)
    finally:
        await close_all(clients)
    synced = f"{sizes[0] / MB:.1f} MB each" if sizes else "none delivered"
    report.note(f"cycle {cycle + 1}: join (load) {load_s * 1000:.0f} ms, {len(sizes)}/{attempts} sync:request answered "
                f"({synced}) in {sync_s * 1000:.0f} ms")
    return attempts


async def scenario_big_document(report: Report, scale: Scale) -> None:
    with tempfile.TemporaryDirectory(prefix="collab-abuse-big_document-") as data_dir:
        items = small_items(scale.big_items)
        imported = await import_items(report, data_dir, "big", items)
        async with start_server(report, data_dir, **UNLIMITED) as server:
            if not imported:
                async with joined(server.port, "big", "builder") as (builder, _):
                    await add_items(builder, items)
                with trio.move_on_after(30.0):
                    while not server.log_lines(r"Session big closed"):
                        await trio.sleep(0.05)
                await server.wait_cpu_quiet(limit=10.0)
            failures: list[str] = []
            attempts = 0
            async with joined(server.port, "probe", "prober") as (probe_ws, _):
                prober = Prober(probe_ws)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(prober.run)
                    await trio.sleep(0.5)
                    t0 = time.perf_counter()
                    for cycle in range(scale.big_cycles):
                        closes = len(server.log_lines(r"Session big closed")) + 1
                        attempts += await big_cycle(report, server, cycle, failures)
                        # The last user left: the session snapshots and unloads; the next cycle reloads it.
                        with trio.move_on_after(20.0):
                            while len(server.log_lines(r"Session big closed")) < closes:
                                await trio.sleep(0.05)
                        await server.wait_cpu_quiet(limit=10.0)
                    t1 = time.perf_counter()
                    nursery.cancel_scope.cancel()
            rtts = sorted(prober.between(t0, t1))
    report.figure(
        f"sync:state of the {scale.big_items // 1000}k-item document reaches a reader",
        f"{attempts - len(failures)}/{attempts} delivered"
        + (f"; {failures[0]}" if failures else ""),
        "all delivered", not failures,
    )
    if not rtts:
        report.figure("pong delay, other session, during load/sync/snapshot", "no pings", "<= 100 ms", False)
        return
    report.figure(
        f"pong delay, other session, {scale.big_items // 1000}k-item doc load/sync/snapshot",
        f"{rtts[-1] * 1000:.0f} ms max (p99 {percentile(rtts, 0.99) * 1000:.0f} ms, {len(rtts)} pings)",
        "<= 100 ms", rtts[-1] <= 0.100,
    )


# ---------------------------------------------------------------------------
# The run


SCENARIOS: dict[str, Callable[[Report, Scale], Awaitable[None]]] = {
    "never_reader": scenario_never_reader,
    "sync_flood": scenario_sync_flood,
    "resume_large": scenario_resume_large,
    "small_values": scenario_small_values,
    "floods": scenario_floods,
    "big_document": scenario_big_document,
}


def first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def run_scenario(name: str, scale: Scale, timeout: float) -> Report:
    report = Report(name)
    started = time.perf_counter()
    print(f"\n== {name} ==", flush=True)
    try:
        with trio.move_on_after(timeout) as scope:
            await SCENARIOS[name](report, scale)
        if scope.cancelled_caught:
            report.error("scenario", f"timed out after {timeout:.0f} s")
    except Exception as exc:  # noqa: BLE001 - report it and go on with the next scenario
        leaf = first_leaf(exc)
        if not isinstance(leaf, (ScenarioBroken, WSClosed, OSError, trio.TooSlowError)):
            traceback.print_exception(exc)
        report.error("scenario", f"{type(leaf).__name__}: {leaf}")
    if not report.figures:
        report.error("scenario", "measured nothing")
    print(f"  ({time.perf_counter() - started:.1f} s)", flush=True)
    return report


def format_table(figures: list[Figure]) -> str:
    rows = [("scenario", "figure", "measured", "bound", "result")]
    rows += [(f.scenario, f.name, f.value, f.bound, f.verdict) for f in figures]
    widths = [min(max(len(row[i]) for row in rows), cap) for i, cap in enumerate((14, 60, 200, 24, 6))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def run_all(names: list[str], scale: Scale) -> list[Report]:
    """Each scenario in turn, each within its timeout and all within the run's budget."""
    deadline = trio.current_time() + scale.budget
    reports = []
    for n, name in enumerate(names):
        # Leave every later scenario a few seconds, whatever this one does.
        left = deadline - trio.current_time() - 8.0 * (len(names) - n - 1)
        reports.append(await run_scenario(name, scale, max(5.0, min(scale.scenario_timeout, left))))
    return reports


def parse_only(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)} (got {text!r})")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abuse.py", description="Budget and abuse figures of a collab-trio serve child, with PASS/FAIL.",
    )
    parser.add_argument("--short", action="store_true", help="every scenario scaled down (well under a minute)")
    parser.add_argument("--only", type=parse_only, action="append",
                        help=f"run only these scenarios (repeatable, comma-separated): {', '.join(SCENARIOS)}")
    parser.add_argument("--strict", action="store_true", help="exit status 1 if any figure FAILs or ERRORs")
    parser.add_argument("--server-log", action="store_true", help="print each server child's output when it stops")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    global SHOW_SERVER_LOG
    SHOW_SERVER_LOG = args.server_log
    names = [n for n in SCENARIOS if args.only is None or any(n in group for group in args.only)]
    scale = SHORT if args.short else FULL
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"abuse.py ({'short' if args.short else 'full'}): {', '.join(names)}")
    print(f"machine: {affinity} usable cores, load average {load}; python {sys.version.split()[0]}")
    flags = serve_flags()
    wanted = ("--write-timeout", "--max-queue-bytes", "--max-fragments", "--max-document-size")
    missing = [f for f in wanted if flags and f not in flags]
    print(f"serve: {'no --help output' if not flags else 'lacks ' + ', '.join(missing) if missing else 'has every flag used'}",
          flush=True)
    started = time.perf_counter()
    try:
        reports = trio.run(run_all, names, scale)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    figures = [f for r in reports for f in r.figures]
    print(f"\nResults ({time.perf_counter() - started:.0f} s):")
    print(format_table(figures))
    counts = {v: sum(f.verdict == v for f in figures) for v in ("PASS", "FAIL", "ERROR", "INFO")}
    print()
    print("total: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
    if args.strict and (counts["FAIL"] or counts["ERROR"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
