"""The serving layer: listeners, accept loop, handshakes and the graceful stop.

Shared by `collab-trio serve` and the layer-1 echo server (tools/echo_server.py),
so both run trio-websocket the same way. What happens after a handshake is
the application's (a `WebSocketApp`):

    WebSocketServer.run()        server nursery
     ├─ app.run_app()              the application's own tasks (collab-trio: the sessions)
     ├─ accept loop              cancelling it closes the listening sockets: port freed
     └─ handshake(stream)        one per TCP connection: the upgrade, then app.handle(request)

Graceful stop: cancel the accept loop (the port is free at once), ask the
app to close every connection with 1001, then give the close handshakes
`shutdown_timeout` seconds by setting a deadline on the server nursery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream
from wsproto.utilities import LocalProtocolError

from .config import ServerConfig
from .counters import Counters
from .listen import interface_addresses
from .protocol import ENDPOINT_TEMPLATE, CloseCode
from .wire import WireStream

log = logging.getLogger(__name__)


class WebSocketApp(Protocol):
    """What the serving layer runs: background tasks, a handler, a way to stop."""

    async def run_app(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The app's own tasks; started before accepting, and must return after close_all()."""

    async def handle(self, request: WebSocketRequest, peer: str, wire: WireStream) -> None:
        """Accept or reject one handshake, then serve the connection until it ends.

        `wire` is the stream under the websocket: its write queue and frame
        counter (wire.py)."""

    def connection_count(self) -> int:
        """Connections that a graceful stop will close."""

    def close_all(self, code: int, reason: str) -> None:
        """Close every connection with this code (the graceful stop)."""


def _listener_socket(listener: trio.abc.Listener[trio.abc.Stream]) -> trio.socket.SocketType | None:
    transport = getattr(listener, "transport_listener", listener)  # unwrap TLS
    return getattr(transport, "socket", None)


def listener_url(listener: trio.abc.Listener[trio.abc.Stream], path: str = ENDPOINT_TEMPLATE) -> str:
    """The ws:// (or wss://) URL a client uses to reach this listener."""
    socket = _listener_socket(listener)
    if socket is None:
        return f"{listener!r}{path}"
    host, port = socket.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    scheme = "wss" if isinstance(listener, trio.SSLListener) else "ws"
    return f"{scheme}://{host}:{port}{path}"


def listener_urls(listener: trio.abc.Listener[trio.abc.Stream], path: str = ENDPOINT_TEMPLATE) -> list[str]:
    """The URLs clients can use for this listener: one per interface address
    when it listens on all of them (0.0.0.0 or ::), which no client can use."""
    socket = _listener_socket(listener)
    if socket is None:
        return [listener_url(listener, path)]
    host, port = socket.getsockname()[:2]
    if host not in ("0.0.0.0", "::"):
        return [listener_url(listener, path)]
    scheme = "wss" if isinstance(listener, trio.SSLListener) else "ws"
    return [
        f"{scheme}://{f'[{address}]' if ':' in address else address}:{port}{path}"
        for address in interface_addresses(socket.family)
    ]


def stream_address(stream: trio.abc.Stream) -> str:
    """The client's IP address, for per-address limits."""
    transport = getattr(stream, "transport_stream", stream)  # unwrap TLS
    socket = getattr(transport, "socket", None)
    if socket is None:
        return "in-memory"
    try:
        return str(socket.getpeername()[0])
    except OSError:
        return "unknown"  # already reset by the peer


def peer_name(stream: trio.abc.Stream) -> str:
    """`host:port` of the client, or a description for non-socket streams."""
    transport = getattr(stream, "transport_stream", stream)  # unwrap TLS
    socket = getattr(transport, "socket", None)
    if socket is None:
        return repr(stream)
    try:
        address, port = socket.getpeername()[:2]
    except OSError:
        return "unknown"  # the client reset the connection during the upgrade
    return f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"


async def reject(request: WebSocketRequest, status: int, reason: str) -> None:
    """Refuse a handshake with an HTTP status and a one-line plain-text body."""
    await request.reject(
        status,
        extra_headers=[(b"Content-Type", b"text/plain; charset=utf-8")],
        body=(reason + "\n").encode("utf-8"),
    )


# Bytes trio-websocket asks for per read (its default is 4 KiB): a 1 MiB
# message then takes 16 reads, not 256.
RECEIVE_BUFFER_SIZE = 64 * 1024

# What a client that went away mid-handshake makes trio-websocket raise.
CLIENT_GONE = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def log_client_gone(address: str, exc: BaseException) -> None:
    """The one debug line for a client that left during the handshake."""
    log.debug("Client %s went away during the handshake (%s)", address, _describe(exc))


@attrs.define(eq=False)
class WebSocketServer:
    """Listens, upgrades, and hands each request to the app; stops gracefully."""

    config: ServerConfig
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]]
    app: WebSocketApp
    # The path shown in the "Listening on" lines, and the line itself.
    path: str = ENDPOINT_TEMPLATE
    listening_message: str = "Listening on %s"
    # True from the moment a graceful stop starts: new handshakes are refused.
    closing: bool = False
    # Set when the listeners are closed (the port can be bound again).
    port_released: trio.Event = attrs.field(factory=trio.Event)
    _shutdown_requested: trio.Event = attrs.field(factory=trio.Event)
    # The server's counters (metrics.py): the wires add the bytes they write.
    counters: Counters = attrs.field(factory=Counters)
    # Open TCP connections per client address (handshakes included).
    _per_address: dict[str, int] = attrs.field(factory=dict)
    # The TCP ports of the listeners, read while the sockets are open.
    _ports: list[int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        sockets = [_listener_socket(listener) for listener in self.listeners]
        self._ports = [int(s.getsockname()[1]) for s in sockets if s is not None]

    @property
    def port(self) -> int:
        """The TCP port of the first listener (useful with port 0); known after it closed."""
        if not self._ports:
            raise RuntimeError("this server has no TCP listener")
        return self._ports[0]

    @property
    def tcp_connections(self) -> int:
        """Open TCP connections, handshakes in progress included."""
        return sum(self._per_address.values())

    def request_shutdown(self) -> None:
        """Start a graceful stop; run() returns when it is done."""
        self._shutdown_requested.set()

    async def run(self, ready: Callable[[], None]) -> None:
        """Serve until request_shutdown(), then stop gracefully; or until cancelled.

        `ready()` is called once the listeners accept and the app runs.
        """
        try:
            await self._serve(ready)
        finally:
            # Shielded: when run() itself is cancelled, the port must still be freed.
            with trio.CancelScope(shield=True):
                for listener in self.listeners:
                    await trio.aclose_forcefully(listener)
            self.port_released.set()

    async def _serve(self, ready: Callable[[], None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.app.run_app)
            accept_scope = trio.CancelScope()
            await nursery.start(self._accept, accept_scope, nursery)
            for listener in self.listeners:
                for url in listener_urls(listener, self.path):
                    log.info(self.listening_message, url)
            ready()

            await self._shutdown_requested.wait()
            self.closing = True
            accept_scope.cancel()
            await self.port_released.wait()
            log.info(
                "Shutting down: no new connections; closing %d connection(s) with 1001",
                self.app.connection_count(),
            )
            self.app.close_all(CloseCode.GOING_AWAY, "server shutting down")
            nursery.cancel_scope.deadline = trio.current_time() + self.config.shutdown_timeout
        if nursery.cancel_scope.cancelled_caught:
            log.warning(
                "Grace period of %g s over: remaining connections were cut",
                self.config.shutdown_timeout,
            )
        else:
            log.info("✓ All connections closed")

    async def _accept(
        self,
        accept_scope: trio.CancelScope,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        try:
            with accept_scope:
                # Handshakes run in the server nursery, not in serve_listeners'
                # own: cancelling the accept loop then closes only the listeners.
                await trio.serve_listeners(
                    self._handshake,
                    list(self.listeners),
                    handler_nursery=handler_nursery,
                    task_status=task_status,
                )
        finally:
            self.port_released.set()

    async def _handshake(self, stream: trio.abc.Stream) -> None:
        address = stream_address(stream)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        wire = WireStream(
            stream,
            write_timeout=self.config.write_timeout,
            max_message_size=self.config.max_message_size,
            counters=self.counters,
        )
        try:
            try:
                async with trio.open_nursery() as ws_nursery:
                    request = None
                    try:
                        request = await self._upgrade(ws_nursery, wire, address)
                    except CLIENT_GONE as exc:
                        log_client_gone(address, exc)
                    if request is not None:
                        # The app's own errors are its own: not taken for a client gone.
                        await self.app.handle(request, peer_name(stream), wire)
                    # Stop trio-websocket's frame reader; the connection is over.
                    ws_nursery.cancel_scope.cancel()
            except* LocalProtocolError as group:
                # trio-websocket answers a ping that arrives after our close
                # frame, which wsproto refuses (trio-websocket issue #184).
                log.debug("Client %s pinged during the close handshake (%s)", address, group.exceptions[0])
        except Exception:
            log.exception("Unexpected error in a connection handler")
        finally:
            self._per_address[address] -= 1
            if not self._per_address[address]:
                del self._per_address[address]
            # trio-websocket leaves the stream open after some closes (e.g. 1009).
            await trio.aclose_forcefully(stream)

    async def _upgrade(
        self, ws_nursery: trio.Nursery, stream: WireStream, address: str
    ) -> WebSocketRequest | None:
        """The client's upgrade request, or None when it was refused or never came."""
        request: WebSocketRequest | None = None
        with trio.move_on_after(self.config.handshake_timeout):
            request = await wrap_server_stream(
                ws_nursery,
                stream,
                max_message_size=self.config.max_message_size,
                receive_buffer_size=RECEIVE_BUFFER_SIZE,
            )
        if request is None:
            log.debug(
                "Dropped %s: no complete handshake within %g s", address, self.config.handshake_timeout
            )
        elif self.closing:
            await reject(request, 503, "server shutting down")
        elif self._per_address[address] > self.config.max_connections_per_ip:
            log.warning("Refused %s: too many connections from this address", address)
            await reject(request, 429, "too many connections from your address")
        else:
            return request
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
