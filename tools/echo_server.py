#!/usr/bin/env python3
"""Layer 1: an echo server on collab-trio's own serving layer and settings.

    python tools/echo_server.py [--host 0.0.0.0] [--port 8765] [--max-message-size 1M]

Every text frame comes back as text and every binary frame as binary, on any
path. Nothing of collab-trio's protocol runs here: what works against this
server and fails against `collab-trio serve` is a bug above the WebSocket layer.
It runs on `collab_trio.serving.WebSocketServer`, the layer `collab-trio serve`
runs on, and its limits and timeouts are read from `ServerConfig`, never
repeated here, so both servers always run trio-websocket the same way:

    max_message_size   -> wrap_server_stream(max_message_size=...)   (larger: close 1009)
    handshake_timeout  -> deadline for the HTTP upgrade (then the connection is dropped)
    close_timeout      -> deadline for a close handshake
    shutdown_timeout   -> grace period on Ctrl+C / SIGTERM (clients get 1001)

Ctrl+C or SIGTERM stops accepting at once (the port is free immediately),
closes every connection with 1001 and exits 0; a second one stops at once (130).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections import deque
from collections.abc import Sequence
from functools import partial

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketRequest

from collab_trio.cli import (
    EXIT_FORCED,
    byte_size,
    configure_logging,
    port_number,
    serve_until_signalled,
)
from collab_trio.config import DEFAULT_PORT, ServerConfig
from collab_trio.inbound import Event
from collab_trio.protocol import CloseCode
from collab_trio.serving import CLIENT_GONE, WebSocketServer, log_client_gone
from collab_trio.wire import WireStream

log = logging.getLogger("collab_trio.echo")

DEFAULTS = ServerConfig()


@attrs.define(eq=False)
class EchoApp:
    """Echoes every message back; the serving layer does the rest (see serving.py)."""

    config: ServerConfig
    # One scope per connection's echo loop; cancelling it starts that connection's 1001 close.
    _echo_scopes: set[trio.CancelScope] = attrs.field(factory=set)
    _closed: trio.Event = attrs.field(factory=trio.Event)

    async def run_app(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Nothing runs in the background; returns once close_all() ran."""
        task_status.started()
        await self._closed.wait()

    def connection_count(self) -> int:
        return len(self._echo_scopes)

    def close_all(self, code: int, reason: str) -> None:
        for scope in list(self._echo_scopes):
            scope.cancel()
        self._closed.set()

    async def handle(self, request: WebSocketRequest, peer: str, wire: WireStream) -> None:
        try:
            ws = await request.accept()
        except CLIENT_GONE as exc:
            log_client_gone(peer, exc)
            return
        log.info("Connected: %s path %s", peer, request.path)
        # Messages come as collab-trio's do: whole text messages taken by the
        # wire (inbound.py), the rest through trio-websocket, so the
        # conformance suite tests both paths. Echoes go through
        # trio-websocket's own send path, written as they are sent.
        inbox = Inbox()
        wire.claim(inbox.frames_arrived)
        wire.before_read = inbox.wait_for_room
        wire.taking = True

        async def pump() -> None:
            while True:
                await inbox.wait_for_room()
                message = await ws.get_message()
                wire.consumed += 1
                inbox.put(message)

        closed: CloseReason | None = None
        with trio.CancelScope() as echo_scope:
            self._echo_scopes.add(echo_scope)
            if self._closed.is_set():
                echo_scope.cancel()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump)
                    while True:
                        message = await inbox.get()
                        await ws.send_message(message)  # str -> text frame, bytes -> binary
            except* ConnectionClosed as group:
                closed = group.exceptions[0].reason  # type: ignore[attr-defined]
            finally:
                wire.taking = False
                self._echo_scopes.discard(echo_scope)
        if echo_scope.cancelled_caught:
            with trio.move_on_after(self.config.close_timeout):
                await ws.aclose(CloseCode.GOING_AWAY, "server shutting down")
        log.info("Closed: %s %s", peer, _describe(closed or ws.closed))


# Messages an echo connection holds before it stops reading.
INBOX_LIMIT = 16


@attrs.define(eq=False)
class Inbox:
    """One connection's incoming messages from both of the wire's paths, in order."""

    messages: deque[str | bytes] = attrs.field(factory=deque)
    _arrived: trio.Event = attrs.field(factory=trio.Event)
    _room: trio.Event = attrs.field(factory=trio.Event)

    def frames_arrived(self, events: list[Event]) -> None:
        for event in events:
            if type(event) is str:
                self.put(event)

    def put(self, message: str | bytes) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def get(self) -> str | bytes:
        while not self.messages:
            if self._arrived.is_set():
                self._arrived = trio.Event()
            await self._arrived.wait()
        self._room.set()
        return self.messages.popleft()

    async def wait_for_room(self) -> None:
        # Two tasks may wait (the pump and the wire): one event for both.
        while len(self.messages) >= INBOX_LIMIT:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()


def _describe(reason: CloseReason | None) -> str:
    if reason is None:
        return "without a close code"
    text = f"close code {reason.code} ({reason.name})"
    return text + (f" reason {reason.reason!r}" if reason.reason else "")


async def serve_echo(
    host: str | None = DEFAULTS.host,
    port: int = DEFAULT_PORT,
    *,
    max_message_size: int = DEFAULTS.max_message_size,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the echo server; `await nursery.start(serve_echo, host, port)` returns it once bound.

    The returned WebSocketServer has `config`, `port`, `closing` and
    `request_shutdown()`.

    Raises:
        OSError: the address can't be bound (e.g. the port is in use).
    """
    config = ServerConfig(host=host or "", port=port, max_message_size=max_message_size)
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    server = WebSocketServer(
        config, listeners, EchoApp(config), path="/", listening_message="Echo server listening on %s"
    )
    started = False

    def ready() -> None:
        nonlocal started
        started = True
        task_status.started(server)

    try:
        await server.run(ready)
    finally:
        if started:
            log.info("✓ Port released")


async def run_until_signalled(host: str, port: int, max_message_size: int) -> int:
    """Serve; the first SIGINT/SIGTERM stops gracefully, a second one at once."""
    return await serve_until_signalled(
        partial(serve_echo, host, port, max_message_size=max_message_size),
        lambda server: log.info("Echo server ready (Ctrl+C to stop)"),
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default comes from collab_trio.config."""
    parser = argparse.ArgumentParser(
        prog="echo_server.py",
        description="WebSocket echo server (any path) with collab-trio's server settings.",
    )
    parser.add_argument("--host", default=DEFAULTS.host,
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="TCP port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--max-message-size", type=byte_size, default=DEFAULTS.max_message_size,
                        metavar="BYTES",
                        help="largest message echoed; larger ones close with 1009 "
                             "(default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="also log trio-websocket's events")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the echo server until Ctrl+C / SIGTERM; return the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.debug)
    status = 1
    try:
        status = trio.run(run_until_signalled, args.host, args.port, args.max_message_size)
    except* KeyboardInterrupt:
        log.warning("Interrupted")  # Ctrl+C before the signal handler was installed
        status = EXIT_FORCED
    except* OSError as group:
        exc = group.exceptions[0]
        if getattr(exc, "errno", None) == errno.EADDRINUSE:
            log.error("Cannot listen on %s:%d: the port is already in use", args.host, args.port)
        else:
            log.error("Cannot listen on %s:%d: %s", args.host, args.port, exc)
    return status


if __name__ == "__main__":
    sys.exit(main())
