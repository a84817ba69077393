#!/usr/bin/env python3
"""Layer 1: a plain trio-websocket echo server with collab-trio's own server settings.

    python tools/echo_server.py [--host 0.0.0.0] [--port 8765] [--max-message-size 1M]

Every text frame comes back as text and every binary frame as binary, on any
path. Nothing of collab-trio's protocol runs here: what works against this
server and fails against `collab-trio serve` is a bug above the WebSocket layer.
The limits and timeouts are read from `collab_trio.config.ServerConfig`, never
repeated here, so both servers always run trio-websocket the same way:

    max_message_size   -> wrap_server_stream(max_message_size=...)   (larger: close 1009)
    handshake_timeout  -> connect timeout of the HTTP upgrade
    close_timeout      -> disconnect timeout of a close handshake
    shutdown_timeout   -> grace period on Ctrl+C / SIGTERM (clients get 1001)

Ctrl+C or SIGTERM stops accepting at once (the port is free immediately),
closes every connection with 1001 and exits 0; a second one stops at once (130).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketRequest, wrap_server_stream

try:
    import collab_trio  # noqa: F401
except ImportError:  # a checkout that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from collab_trio.cli import (  # noqa: E402
    EXIT_FORCED,
    byte_size,
    configure_logging,
    port_number,
    serve_until_signalled,
)
from collab_trio.config import DEFAULT_PORT, ServerConfig  # noqa: E402

log = logging.getLogger("collab_trio.echo")

DEFAULTS = ServerConfig()
GOING_AWAY = 1001


@attrs.define(eq=False)
class EchoServer:
    """A running echo server: what `nursery.start(serve_echo, ...)` returns."""

    listeners: list[trio.SocketListener]
    config: ServerConfig
    # True from the moment a graceful stop starts.
    closing: bool = False
    _shutdown_requested: trio.Event = attrs.field(factory=trio.Event)
    # One scope per connection's echo loop; cancelling it starts that connection's 1001 close.
    _echo_scopes: set[trio.CancelScope] = attrs.field(factory=set)
    # (host, port) of every listener, read while the sockets are open.
    addresses: list[tuple[str, int]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.addresses = [tuple(lst.socket.getsockname()[:2]) for lst in self.listeners]

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        return int(self.addresses[0][1])

    @property
    def urls(self) -> list[str]:
        """ws://HOST:PORT/ for every listener."""
        return [
            f"ws://[{host}]:{port}/" if ":" in host else f"ws://{host}:{port}/"
            for host, port in self.addresses
        ]

    def request_shutdown(self) -> None:
        """Start a graceful stop; serve_echo() returns when it is done."""
        self._shutdown_requested.set()

    async def run(self, *, task_status: trio.TaskStatus[EchoServer]) -> None:
        """Serve until request_shutdown() (graceful) or until cancelled (at once)."""
        try:
            async with trio.open_nursery() as nursery:
                accept_scope = trio.CancelScope()
                await nursery.start(self._accept, accept_scope, nursery)
                for url in self.urls:
                    log.info("Echo server listening on %s", url)
                task_status.started(self)

                await self._shutdown_requested.wait()
                self.closing = True
                accept_scope.cancel()  # serve_listeners closes the listeners: port free
                log.info(
                    "Shutting down: closing %d connection(s) with 1001", len(self._echo_scopes)
                )
                for scope in list(self._echo_scopes):
                    scope.cancel()
                nursery.cancel_scope.deadline = trio.current_time() + self.config.shutdown_timeout
            if nursery.cancel_scope.cancelled_caught:
                log.warning("Grace period of %g s over: remaining connections were cut",
                            self.config.shutdown_timeout)
            else:
                log.info("✓ All connections closed")
        finally:
            # Shielded: when serve_echo() itself is cancelled, the port must still be freed.
            with trio.CancelScope(shield=True):
                for listener in self.listeners:
                    await trio.aclose_forcefully(listener)
            log.info("✓ Port released")

    async def _accept(
        self,
        accept_scope: trio.CancelScope,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        # Handlers run in the server nursery, so cancelling the accept loop
        # closes only the listeners and the connections get their 1001.
        with accept_scope:
            await trio.serve_listeners(
                self._handle_stream, list(self.listeners),
                handler_nursery=handler_nursery, task_status=task_status,
            )

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        try:
            async with trio.open_nursery() as ws_nursery:
                request: WebSocketRequest | None = None
                with trio.move_on_after(self.config.handshake_timeout):
                    request = await wrap_server_stream(
                        ws_nursery, stream, max_message_size=self.config.max_message_size
                    )
                if request is None:
                    log.debug("Handshake timed out after %g s", self.config.handshake_timeout)
                else:
                    await self._echo(request)
                ws_nursery.cancel_scope.cancel()  # stop trio-websocket's frame reader
        except Exception:
            log.exception("Unexpected error in a connection handler")
        finally:
            # trio-websocket leaves the stream open after a 1009 close: always close it here.
            await trio.aclose_forcefully(stream)

    async def _echo(self, request: WebSocketRequest) -> None:
        peer = _peer(request)
        try:
            ws = await request.accept()
        except ConnectionClosed:
            log.info("Client %s left during the handshake", peer)
            return
        log.info("Connected: %s path %s", peer, request.path)
        closed: CloseReason | None = None
        with trio.CancelScope() as echo_scope:
            self._echo_scopes.add(echo_scope)
            if self.closing:
                echo_scope.cancel()
            try:
                while True:
                    message = await ws.get_message()
                    await ws.send_message(message)  # str -> text frame, bytes -> binary
            except ConnectionClosed as exc:
                closed = exc.reason
            finally:
                self._echo_scopes.discard(echo_scope)
        if echo_scope.cancelled_caught:
            with trio.move_on_after(self.config.close_timeout):
                await ws.aclose(GOING_AWAY, "server shutting down")
        log.info("Closed: %s %s", peer, _describe(closed or ws.closed))


def _peer(request: WebSocketRequest) -> str:
    remote = request.remote
    address, port = getattr(remote, "address", None), getattr(remote, "port", None)
    if address is None:
        return str(remote)
    return f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"


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
    task_status: trio.TaskStatus[EchoServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the echo server; `await nursery.start(serve_echo, host, port)` returns it once bound.

    Raises:
        OSError: the address can't be bound (e.g. the port is in use).
    """
    config = ServerConfig(
        host=host or "", port=port, max_message_size=max_message_size
    )
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    await EchoServer(listeners, config).run(task_status=task_status)


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
