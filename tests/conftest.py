"""Fixtures: the whole server over in-memory streams, and WebSocket test clients."""

from __future__ import annotations

import json
import math
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from collab_trio.config import ServerConfig
from collab_trio.server import CollabServer, serve

from .processes import LISTENING_RE, SERVER_START_TIMEOUT_S, ProcessOutput, RunningServer, child_env

# Generous real-time bound for anything that could hang; virtual time under
# autojump_clock makes most tests finish in milliseconds.
HANG = 10


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

    server: CollabServer
    listener: MemoryListener
    nursery: trio.Nursery

    @property
    def registry(self):  # noqa: ANN201 - SessionRegistry
        assert self.server.registry is not None
        return self.server.registry

    @asynccontextmanager
    async def client(
        self, session: str = "s1", user: str = "alice", *, lockstep: bool = False, path: str | None = None
    ) -> AsyncIterator[Client]:
        """Connect over a fresh in-memory stream; close normally on exit."""
        stream = self.listener.connect(lockstep=lockstep)
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, "localhost", path or f"/ws/{session}/{user}",
                message_queue_size=1 if lockstep else 4096,
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


@asynccontextmanager
async def tcp_client(
    port: int,
    path: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    local_address: str | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client over loopback TCP (or TLS) whose socket is always closed on exit.

    trio-websocket's own open_websocket_url leaves the client socket open when
    the server starts the close, which the warning filter would report.
    """
    stream: trio.abc.Stream
    if ssl_context is not None:
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ssl_context)
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{port}", path)
            try:
                yield ws
            finally:
                with trio.move_on_after(HANG):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test, and every server process it starts, stores data in its own temp dir."""
    path = tmp_path / "collab-data"
    monkeypatch.setenv("COLLAB_TRIO_DATA_DIR", str(path))
    return path


@pytest.fixture
def start_server(nursery: trio.Nursery) -> Callable[..., Any]:
    """`harness = await start_server(idle_timeout=5, ...)`: a server with these settings."""

    async def start(**settings: Any) -> Harness:
        """Settings are ServerConfig fields; `_store=` passes a store object."""
        settings.setdefault("store", "memory")
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("port", 0)
        store = settings.pop("_store", None)
        listener = MemoryListener()
        server = await nursery.start(
            lambda task_status: serve(
                ServerConfig(**settings), store=store, listeners=[listener], task_status=task_status
            )
        )
        return Harness(server, listener, nursery)

    return start


@pytest.fixture
async def harness(start_server: Callable[..., Any]) -> Harness:
    """A server with default settings."""
    return await start_server()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    """A real server on a free port of 127.0.0.1, stopped (or killed) afterwards."""
    args = [sys.executable, "-m", "collab_trio", "serve", "--host", "127.0.0.1", "--port", "0"]
    output = ProcessOutput("server", args, child_env())
    try:
        match = output.wait_for(LISTENING_RE, SERVER_START_TIMEOUT_S)
        yield RunningServer(output, int(match.group(1)))
    finally:
        output.stop()
        # Shown by pytest only when the test failed.
        print(f"--- server output ---\n{output.text()}")
