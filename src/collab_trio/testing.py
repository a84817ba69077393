"""Test and tool plumbing shared by tests/, tools/ and benchmarks/ (like trio.testing).

Shipped with the package because tools/ and benchmarks/ run as plain scripts,
outside pytest: nothing here imports pytest, and a failed expectation raises
HarnessError (an AssertionError, so pytest reports it as a failed test).

- Server processes: `server_process(*args)` (trio) starts
  `python -m collab_trio serve --host 127.0.0.1 --port 0 ...` and reads the
  port from its "Listening on" line (LISTENING_RE, the one copy of that
  pattern); `ProcessOutput` (threads) runs any child for sync code such as
  the Qt tools. Both read output line by line with deadlines, never by sleeping.
- WebSocket clients: `Client` over the in-memory `MemoryListener`
  (`start_memory_server`), and `tcp_client`, over loopback TCP or TLS, whose
  socket is always closed on exit.
- Message builders: `ping()`, `add_item(...)`, `cursor(...)`, `sync_request()`...
"""

from __future__ import annotations

import argparse
import json
import math
import struct
from collections import deque
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request, TextMessage

from .config import ServerConfig
from .exceptions import leaf_exceptions

LOOPBACK = "127.0.0.1"
# The line `collab-trio serve` prints per listener; group 1 is the port.
LISTENING_RE = re.compile(r"Listening on wss?://127\.0\.0\.1:(\d+)/ws/")
# Generous real-time bound for anything that could hang; virtual time under
# autojump_clock makes most in-memory tests finish in milliseconds.
HANG = 10
START_TIMEOUT = 30
STOP_TIMEOUT = 10
# The directory that holds this package: put on a child's PYTHONPATH so that
# it runs the same collab_trio as this process, installed or not.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


class HarnessError(AssertionError):
    """A child process or a peer did not do what the harness waited for."""


def serve_command(*args: str) -> list[str]:
    """`python -m collab_trio serve` on a free loopback port, plus `args`."""
    return [sys.executable, "-m", "collab_trio", "serve", "--host", LOOPBACK, "--port", "0", *args]


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child: unbuffered output, headless Qt, this collab_trio importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # so the "Listening on" line is not stuck in a buffer
    env["QT_QPA_PLATFORM"] = "offscreen"
    # Appended, so an explicit PYTHONPATH still comes first.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), _PACKAGE_PARENT]))
    env.update(extra)
    return env


def run_script(name: str, command: Sequence[str], timeout: float, **popen: Any) -> subprocess.CompletedProcess[str]:
    """Run a script (a benchmark, the soak tool) to its end, its output captured.

    It runs in a process group of its own: past `timeout` the whole group
    (its servers and generator processes too) is killed and HarnessError
    raised with everything it printed.
    """
    process = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **popen,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise HarnessError(f"{name} ran over {timeout:g} s:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


async def assert_port_binds_again(port: int) -> None:
    """Bind the port the way a new server would (trio sets SO_REUSEADDR)."""
    listeners = await trio.open_tcp_listeners(port, host=LOOPBACK)
    for listener in listeners:
        await listener.aclose()


# ---------------------------------------------------------------------------
# A server process, trio flavour


@attrs.define(eq=False)
class ServerProcess:
    """A child process (by default `collab-trio serve`) and every line it printed."""

    process: trio.Process
    port: int = 0
    lines: list[str] = attrs.field(factory=list)
    # Called with each line as it arrives (a tool's log parser, an echo).
    on_line: Callable[[str], None] | None = None
    _new_line: trio.Event = attrs.field(factory=trio.Event)
    _ended: bool = False

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    async def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = HANG) -> re.Match[str]:
        """The first line (already printed or still to come) that matches `pattern`.

        Raises:
            HarnessError: no such line within `timeout` seconds, or the output ended.
        """
        regex = re.compile(pattern)
        seen = 0
        with trio.move_on_after(timeout):
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if self._ended:
                    raise HarnessError(f"output ended with no line matching {regex.pattern!r}:\n{self.output}")
                await self._new_line.wait()
        raise HarnessError(f"no line matching {regex.pattern!r} within {timeout:g} s:\n{self.output}")

    async def stop(self, signum: int = signal.SIGINT, timeout: float = STOP_TIMEOUT) -> int:
        """Send `signum`, wait (bounded) for the exit, kill if it hangs; the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
            with trio.move_on_after(timeout):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode

    def _add(self, line: str) -> None:
        self.lines.append(line)
        if self.on_line is not None:
            self.on_line(line)
        self._new_line.set()
        self._new_line = trio.Event()

    async def _collect(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            *complete, buffer = (buffer + chunk).split(b"\n")
            for raw in complete:
                self._add(raw.decode("utf-8", "replace"))
        if buffer:
            self._add(buffer.decode("utf-8", "replace"))
        self._ended = True
        self._new_line.set()


@asynccontextmanager
async def server_process(
    *args: str,
    command: list[str] | None = None,
    listening: re.Pattern[str] | None = LISTENING_RE,
    start_timeout: float = START_TIMEOUT,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> AsyncIterator[ServerProcess]:
    """Start `collab-trio serve` (or `command`) and wait for its listening line; kill it on exit.

    `port` is group 1 of the `listening` match (None: don't wait). Its output
    stays in `lines`, stdout and stderr merged.

    Raises:
        HarnessError: no listening line within `start_timeout`, or the child exited first.
    """
    process = await trio.lowlevel.open_process(
        command if command is not None else serve_command(*args),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env if env is not None else child_env(), cwd=cwd,
    )
    server = ServerProcess(process, on_line=on_line)
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            nursery.start_soon(server._collect, process.stdout)
            try:
                if listening is not None:
                    server.port = int((await server.wait_for(listening, start_timeout)).group(1))
                yield server
            finally:
                # Before the nursery waits for the output to end, which is when the child exits.
                if process.returncode is None:
                    process.kill()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


# ---------------------------------------------------------------------------
# Any child process, thread flavour (for sync code: the Qt tools and their tests)


class ProcessOutput:
    """A child process with stdout and stderr merged, read line by line by a thread."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            args, cwd=cwd, env=env if env is not None else child_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace",
        )
        # Draining continuously means a chatty child never blocks on a full pipe.
        self._reader = threading.Thread(target=self._read, name=f"{name} output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Collect every line, then signal end of output with None."""
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                line = line.rstrip("\n")
                self.lines.append(line)
                self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float) -> re.Match[str]:
        """The match of the first new line matching `pattern`.

        Raises:
            HarnessError: none within `timeout` seconds, or the output ended.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise HarnessError(f"no line matching {regex.pattern!r} within {timeout:g} s:\n{self.text()}") from None
            if line is None:
                raise HarnessError(f"output ended with no line matching {regex.pattern!r}:\n{self.text()}")
            if match := regex.search(line):
                return match

    def wait(self, timeout: float) -> int:
        """Wait for the exit and for the last line to be read; the exit status.

        Raises:
            HarnessError: still running after `timeout` seconds.
        """
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{self.name} still running after {timeout:g} s:\n{self.text()}") from None
        self._reader.join(timeout=STOP_TIMEOUT)
        return returncode

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> tuple[int, bool]:
        """Send `signum` if it still runs, kill it if it ignores that: (exit status, killed)."""
        killed = False
        if self.process.poll() is None:
            if signum == signal.SIGTERM:
                self.process.terminate()  # TerminateProcess on Windows, which has no SIGTERM
            else:
                self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
                killed = True
        self._reader.join(timeout=timeout)
        return self.process.returncode, killed

    def text(self) -> str:
        """All output read so far."""
        return "\n".join(self.lines)


class RunningServer:
    """A `collab-trio serve` child (thread flavour) and the port it listens on."""

    def __init__(self, output: ProcessOutput, port: int) -> None:
        self.output = output
        self.port = port

    @property
    def url(self) -> str:
        """The base URL the Qt tools take."""
        return f"ws://{LOOPBACK}:{self.port}"


def start_server_output(
    *args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
    timeout: float = START_TIMEOUT,
) -> RunningServer:
    """Start `collab-trio serve` in the thread flavour; the caller stops `.output`.

    Raises:
        HarnessError: no listening line within `timeout` (the child is stopped).
    """
    output = ProcessOutput("server", serve_command(*args), env, cwd)
    try:
        return RunningServer(output, int(output.wait_for(LISTENING_RE, timeout).group(1)))
    except BaseException:
        output.stop()
        raise


# ---------------------------------------------------------------------------
# WebSocket clients


@asynccontextmanager
async def tcp_client(
    port: int,
    path: str,
    *,
    host: str = LOOPBACK,
    ssl_context: ssl.SSLContext | None = None,
    local_address: str | None = None,
    message_queue_size: int = 4096,
    connect_timeout: float = HANG,
    close_timeout: float = HANG,
    close_handshake: bool = True,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client over loopback TCP (or TLS) whose socket is always closed on exit.

    trio-websocket's own open_websocket_url leaves the client socket open when
    the server starts the close, which the warning filter would report.
    `close_handshake=False` drops the connection without a close frame.

    Raises:
        HandshakeError: the server refused the upgrade (ConnectionRejected) or never finished it.
        OSError: no TCP connection.
    """
    stream: trio.abc.Stream
    with trio.fail_after(connect_timeout):
        if ssl_context is not None:
            stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
        else:
            stream = await trio.open_tcp_stream(host, port, local_address=local_address)
    refused: BaseException | None = None
    yielded = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await wrap_client_stream(
                    nursery, stream, f"{host}:{port}", path,
                    extra_headers=extra_headers, message_queue_size=message_queue_size,
                )
            yielded = True
            try:
                yield ws
            finally:
                if close_handshake:
                    with trio.move_on_after(close_timeout):
                        await ws.aclose()
                nursery.cancel_scope.cancel()
    except* (HandshakeError, ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError) as group:
        if yielded:
            raise
        # A refusal comes from trio-websocket's reader task, wrapped in the
        # nursery's group: hand the caller the bare exception.
        refused = leaf_exceptions(group)[0]
    finally:
        await trio.aclose_forcefully(stream)
    if refused is not None:
        raise refused


async def recv_json(ws: WebSocketConnection, timeout: float = HANG) -> dict[str, Any]:
    """The next message of `ws`, decoded; TooSlowError instead of hanging."""
    with trio.fail_after(timeout):
        return json.loads(await ws.get_message())


async def expect_json(ws: WebSocketConnection, msg_type: str, timeout: float = HANG) -> dict[str, Any]:
    """The next message of `ws`, which must be of this type (e.g. the connection:ack)."""
    message = await recv_json(ws, timeout)
    if message.get("type") != msg_type:
        raise HarnessError(f"expected {msg_type}, got {message}")
    return message


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A Listener whose connections are in-memory stream pairs made by connect()."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[trio.abc.Stream](math.inf)

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        self._recv.close()
        await trio.lowlevel.checkpoint()

    def connect(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """A client stream; lockstep streams block the sender until the client reads."""
        if lockstep:
            client, server = trio.testing.lockstep_stream_pair()
        else:
            client, server = trio.testing.memory_stream_pair()
        self._send.send_nowait(server)
        return client


@attrs.define(eq=False)
class Client:
    """A test client speaking real WebSocket frames to the server."""

    ws: WebSocketConnection
    name: str

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        """Send a JSON object, or a raw text or binary frame."""
        if isinstance(message, dict):
            message = json.dumps(message)
        await self.ws.send_message(message)

    async def recv(self) -> dict[str, Any]:
        """The next message, decoded; fails instead of hanging."""
        with trio.fail_after(HANG):
            text = await self.ws.get_message()
        assert isinstance(text, str), "the server must only send text frames"
        return json.loads(text)

    async def expect(self, msg_type: str) -> dict[str, Any]:
        """The next message, which must be of this type."""
        message = await self.recv()
        assert message["type"] == msg_type, message
        return message

    async def expect_ack(self) -> tuple[dict[str, Any], list[str]]:
        """The next ack, and the users whose user:left came before it: the
        relay of a change goes out before its ack, and may close a member
        that fell behind (any other message fails)."""
        left: list[str] = []
        while (message := await self.recv())["type"] == "user:left":
            left.append(message["user_id"])
        assert message["type"] == "ack", message
        return message, left

    async def expect_closed(self, timeout: float = HANG) -> tuple[int, str | None]:
        """Read until the server closes; return (code, reason)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    await self.ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    return exc.reason.code, exc.reason.reason

    async def expect_silence(self, seconds: float = 1.0) -> None:
        """Nothing arrives for `seconds` (virtual seconds under autojump_clock)."""
        with trio.move_on_after(seconds):
            message = await self.ws.get_message()
            raise AssertionError(f"{self.name} got an unexpected message: {message}")


@attrs.define(eq=False)
class Harness:
    """A running server on an in-memory listener, plus a way to connect clients."""

    server: Any  # collab_trio.server.CollabServer
    listener: MemoryListener
    nursery: trio.Nursery

    @property
    def registry(self):  # noqa: ANN201 - SessionRegistry
        return self.server.registry

    @asynccontextmanager
    async def client(
        self,
        session: str = "s1",
        user: str = "alice",
        *,
        lockstep: bool = False,
        path: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> AsyncIterator[Client]:
        """Connect over a fresh in-memory stream (extra upgrade `headers` if
        given); close normally on exit."""
        stream = self.listener.connect(lockstep=lockstep)
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, "localhost", path or f"/ws/{session}/{user}",
                extra_headers=headers, message_queue_size=1 if lockstep else 4096,
            )
            try:
                yield Client(ws, user)
            finally:
                with trio.move_on_after(HANG):
                    await ws.aclose()
                nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def joined(self, session: str = "s1", user: str = "alice", **kwargs: Any) -> AsyncIterator[Client]:
        """A client that has already read its connection:ack."""
        async with self.client(session, user, **kwargs) as client:
            await client.expect("connection:ack")
            yield client


async def start_memory_server(nursery: trio.Nursery, **settings: Any) -> Harness:
    """serve() in `nursery` on a MemoryListener; settings are ServerConfig fields.

    Defaults: the memory store on 127.0.0.1, port 0; `_store=` passes a store object.
    """
    from .server import serve  # the harness is importable without the server's imports

    settings.setdefault("store", "memory")
    settings.setdefault("host", LOOPBACK)
    settings.setdefault("port", 0)
    store = settings.pop("_store", None)
    listener = MemoryListener()
    server = await nursery.start(
        lambda task_status: serve(ServerConfig(**settings), store=store, listeners=[listener], task_status=task_status)
    )
    return Harness(server, listener, nursery)


# ---------------------------------------------------------------------------
# Message builders (the client side of protocol.py)

Message = dict[str, Any]


def ping() -> Message:
    return {"type": "ping"}


def command(
    action: str, item_id: str, data: dict[str, Any] | None = None, *, item_type: str = "lens", op_id: Any = None
) -> Message:
    """A `command` message; `op_id` is added when given."""
    message: Message = {
        "type": "command",
        "command": {"action": action, "item_type": item_type, "item_id": item_id, "data": data or {}},
    }
    if op_id is not None:
        message["op_id"] = op_id
    return message


def add_item(item_id: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Message:
    return command("add_item", item_id, data, **kwargs)


def move_item(item_id: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Message:
    return command("move_item", item_id, data, **kwargs)


def update_item(item_id: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Message:
    return command("update_item", item_id, data, **kwargs)


def remove_item(item_id: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Message:
    return command("remove_item", item_id, data, **kwargs)


def cursor(x: float, y: float, **extra: Any) -> Message:
    return {"type": "cursor", "x": x, "y": y, **extra}


def sync_request(since: int | None = None, **extra: Any) -> Message:
    """`sync:request`: the whole state, or the ops after version `since`."""
    message: Message = {"type": "sync:request", **extra}
    if since is not None:
        message["since"] = since
    return message


def sync_update(items: list[dict[str, Any]], *, op_id: Any = None) -> Message:
    """`sync:update`: replace the whole session document."""
    message: Message = {"type": "sync:update", "state": {"items": items}}
    if op_id is not None:
        message["op_id"] = op_id
    return message


def sync_full_state(items: list[dict[str, Any]], *, target_user: str | None = None) -> Message:
    """`sync:full_state`: a host's full state, to `target_user` or everyone."""
    message: Message = {"type": "sync:full_state", "state": {"items": items}}
    if target_user is not None:
        message["target_user"] = target_user
    return message


# -- a client that reads and writes only when told to ---------------------------

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame, made by hand (cut it short to leave a frame unfinished)."""
    length = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = b"\x1f\x2e\x3d\x4c"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@attrs.define(eq=False)
class RawClient:
    """A WebSocket client over any stream, driven by wsproto: no background reader.

    Nothing is read unless the test asks, and nothing is answered (not even a
    close) unless the test says so: the tool for deaf, mute and slow peers.
    """

    stream: trio.abc.Stream
    ws: WSConnection = attrs.field(factory=lambda: WSConnection(ConnectionType.CLIENT))
    eof: bool = False
    _events: deque[Event] = attrs.field(factory=deque)

    async def upgrade(self, path: str) -> None:
        """Send the HTTP upgrade and read the 101 (and nothing after it)."""
        await self.stream.send_all(self.ws.send(Request(host="localhost", target=path)))
        event = await self.next_event()
        assert isinstance(event, AcceptConnection), event

    async def next_event(self) -> Event | None:
        """The next wsproto event, or None once the server closed the transport."""
        while not self._events:
            if self.eof:
                return None
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof = True
                continue
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())
        return self._events.popleft()

    async def next_message(self) -> dict[str, Any] | CloseConnection | None:
        """The next whole JSON message, the server's close frame, or None at EOF."""
        parts: list[str] = []
        while True:
            event = await self.next_event()
            if event is None or isinstance(event, CloseConnection):
                return event
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return json.loads("".join(parts))

    async def expect(self, msg_type: str) -> dict[str, Any]:
        """The next message, which must be of this type."""
        with trio.fail_after(HANG):
            message = await self.next_message()
        assert isinstance(message, dict) and message["type"] == msg_type, message
        return message

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_frame(OPCODE_TEXT, json.dumps(message).encode())

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        await self.stream.send_all(client_frame(opcode, payload))

    async def answer_close(self, close: CloseConnection) -> None:
        await self.stream.send_all(self.ws.send(close.response()))


async def raw_connect(harness: Harness, path: str, *, lockstep: bool = False) -> RawClient:
    """A RawClient over a fresh in-memory stream, upgraded and past its connection:ack."""
    client = RawClient(harness.listener.connect(lockstep=lockstep))
    with trio.fail_after(HANG):
        await client.upgrade(path)
    await client.expect("connection:ack")
    return client


# -- command lines of the benchmarks and tools ---------------------------------


def counts_argument(what: str, low: int, high: int) -> Callable[[str], list[int]]:
    """An argparse type: a comma-separated list of whole numbers in [low, high]."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
        if not values or any(not low <= v <= high for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}")
        return values

    return parse
