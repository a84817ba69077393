"""The serving layer: listeners, accept loop, handshakes and the graceful stop.

Shared by `collab-trio serve` and the layer-1 echo server (tools/echo_server.py),
so both run trio-websocket the same way. What happens after a handshake is
the application's (a `WebSocketApp`):

    WebSocketServer.run()        server nursery
     ├─ app.run_app()              the application's own tasks (collab-trio: the sessions)
     ├─ accept loop              cancelling it closes the listening sockets: port freed
     └─ handshake(stream)        one per TCP connection: the request head (upgrade.py),
                                 the upgrade, then app.handle(request)

A handshake task reads the request head itself (h11) before trio-websocket
sees a byte: a connection closed before a complete request ends at once; a
plain HTTP request (a browser, a health check) gets a short text answer
saying where to connect; an upgrade wsproto would refuse gets wsproto's
status and reason; only a valid upgrade reaches trio-websocket. Behind a
trusted proxy (`trusted_proxies`) the client's address, for the per-address
limit and the logs, comes from X-Forwarded-For once the head is read.

Graceful stop: cancel the accept loop (the port is free at once), drop the
connections still waiting for their request head, ask the app to close every
connection with 1001, then give the close handshakes `shutdown_timeout`
seconds by setting a deadline on the server nursery.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream
from wsproto.utilities import LocalProtocolError

from .config import ServerConfig
from .auth import redact
from .counters import Counters
from .listen import interface_addresses
from .protocol import ENDPOINT_TEMPLATE, TOKEN_SEGMENT, CloseCode
from .proxies import forwarded_client, is_trusted, parse_address
from .upgrade import MalformedRequest, RequestHead, read_request_head
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
    # Tokens are required: the plain-HTTP answer shows where one goes (/t/TOKEN).
    tokens_required: bool = False
    # True from the moment a graceful stop starts: new handshakes are refused.
    closing: bool = False
    # Set when the listeners are closed (the port can be bound again).
    port_released: trio.Event = attrs.field(factory=trio.Event)
    _shutdown_requested: trio.Event = attrs.field(factory=trio.Event)
    # The server's counters (metrics.py): the wires add the bytes they write.
    counters: Counters = attrs.field(factory=Counters)
    # Open TCP connections per client address (handshakes included): the
    # TCP peer's, or once the request head is read, the forwarded client's.
    _per_address: dict[str, int] = attrs.field(factory=dict)
    # The cancel scopes of handshakes waiting for their request head: a
    # graceful stop drops them at once.
    _reading_heads: set[trio.CancelScope] = attrs.field(factory=set)
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
            for scope in self._reading_heads:
                scope.cancel()
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
        deadline = trio.current_time() + self.config.handshake_timeout
        address = stream_address(stream)
        self._count(address, 1)
        try:
            try:
                peer = peer_name(stream)
                if self._over_limit_before_head(address):
                    # Checked again once the head is read (a forwarded client's
                    # address is known only then); a connection that has not sent
                    # its head yet must not escape the limit meanwhile (slowloris).
                    log.warning("Refused %s: too many connections from this address", address)
                    # Dropped at once by a graceful stop, as a head being read
                    # is: a flood from one address must not hold the stop up.
                    with trio.CancelScope() as scope:
                        self._reading_heads.add(scope)
                        try:
                            if self.closing:
                                scope.cancel()
                            await self._send_answer(stream, _TOO_MANY_CONNECTIONS, peer)
                            await _linger(stream)
                        finally:
                            self._reading_heads.discard(scope)
                    return
                head = await self._read_head(stream, peer, deadline)
                if head is None:
                    return
                client = forwarded_client(address, head.headers, self.config.trusted_proxies)
                if client is not None:
                    # Counted under the client's address from now on (no await in between).
                    self._count(address, -1)
                    address = client
                    self._count(address, 1)
                    peer = f"{client} (via {peer})"
                if not head.is_upgrade:
                    await self._answer_plain_request(stream, head, peer, forwarded=client is not None)
                    return
                refusal = head.upgrade_refusal()
                if refusal is not None:
                    status, reason, headers = refusal
                    log.info("Refused %s from %s: %d %s", redact(head.target), peer, status, reason)
                    await self._send_answer(stream, head.response(status, reason + "\n", headers), peer)
                    return
                wire = WireStream(
                    stream,
                    write_timeout=self.config.write_timeout,
                    max_message_size=self.config.max_message_size,
                    counters=self.counters,
                    received=head.received[: head.head_size],
                    early=head.trailing,
                )
                async with trio.open_nursery() as ws_nursery:
                    request = None
                    try:
                        request = await self._upgrade(ws_nursery, wire, address, deadline)
                    except CLIENT_GONE as exc:
                        log_client_gone(peer, exc)
                    if request is not None:
                        # The app's own errors are its own: not taken for a client gone.
                        await self.app.handle(request, peer, wire)
                    # Stop trio-websocket's frame reader; the connection is over.
                    ws_nursery.cancel_scope.cancel()
            except* LocalProtocolError as group:
                # trio-websocket answers a ping that arrives after our close
                # frame, which wsproto refuses (trio-websocket issue #184).
                log.debug("Client %s pinged during the close handshake (%s)", address, group.exceptions[0])
        except Exception:
            log.exception("Unexpected error in a connection handler")
        finally:
            self._count(address, -1)
            # trio-websocket leaves the stream open after some closes (e.g. 1009).
            await trio.aclose_forcefully(stream)

    def _over_limit_before_head(self, address: str) -> bool:
        """Whether a new connection from `address` is over the per-address
        limit already (a trusted proxy's are counted once their head names
        the client)."""
        if self._per_address[address] <= self.config.max_connections_per_ip:
            return False
        parsed = parse_address(address)
        return parsed is None or not is_trusted(parsed, self.config.trusted_proxies)

    def _count(self, address: str, change: int) -> None:
        count = self._per_address.get(address, 0) + change
        if count:
            self._per_address[address] = count
        else:
            del self._per_address[address]

    async def _read_head(self, stream: trio.abc.Stream, peer: str, deadline: float) -> RequestHead | None:
        """The request head, or None when the client left, timed out, sent garbage or the server stops."""
        with trio.CancelScope(deadline=deadline) as scope:
            self._reading_heads.add(scope)
            try:
                if self.closing:
                    scope.cancel()
                head = await read_request_head(stream)
                if head is None:
                    log.debug("Dropped %s: closed before sending a request", peer)
                return head
            except MalformedRequest as exc:
                answer = exc
            except CLIENT_GONE as exc:
                log_client_gone(peer, exc)
                return None
            finally:
                self._reading_heads.discard(scope)
        if scope.cancelled_caught:
            if self.closing:
                log.debug("Dropped %s: the server stops before its request arrived", peer)
            else:
                log.debug("Dropped %s: no complete handshake within %g s", peer, self.config.handshake_timeout)
            return None
        # Not the request itself: it may hold a token.
        log.debug("Refused %s: not an HTTP/1.1 request (%s)", peer, answer)
        await self._send_answer(stream, answer.response, peer)
        return None

    async def _answer_plain_request(
        self, stream: trio.abc.Stream, head: RequestHead, peer: str, *, forwarded: bool
    ) -> None:
        """Tell a client that sent plain HTTP what this port is and where to connect."""
        path = head.target.partition("?")[0]
        root = path in ("/", self.config.base_path, f"{self.config.base_path}/")
        status = 200 if root and head.method in ("GET", "HEAD") else 426
        secure = isinstance(stream, trio.SSLStream) or (
            forwarded and (head.header(b"x-forwarded-proto") or "").lower() == "https"
        )
        host = head.header(b"host") or ""
        if not _HOST.fullmatch(host):
            host = "HOST:PORT"  # not repeated: it is not a host name
        endpoint, note = self.path, ""
        if self.tokens_required and endpoint.endswith(ENDPOINT_TEMPLATE):
            # The form stock Optiverse can send (protocol.TOKEN_SEGMENT).
            endpoint = f"{endpoint[: -len(ENDPOINT_TEMPLATE)]}/{TOKEN_SEGMENT}/TOKEN{ENDPOINT_TEMPLATE}"
            note = " (TOKEN: yours; or ?token=TOKEN)"
        url = f"{'wss' if secure else 'ws'}://{host}{endpoint}"
        text = (
            "This is a collab-trio WebSocket endpoint; it serves no web pages.\n"
            f"Connect a WebSocket client to {url}{note}\n"
        )
        if url.endswith(ENDPOINT_TEMPLATE):
            text += f"Optiverse: set the Server URL to {url[: -len(ENDPOINT_TEMPLATE)]}\n"
        headers = [(b"Upgrade", b"websocket")] if status == 426 else []
        log.info(
            "Plain HTTP request from %s: %s %s -> %d (not a WebSocket upgrade)",
            peer, head.method, redact(head.target), status,
        )
        await self._send_answer(stream, head.response(status, text, headers), peer)

    async def _send_answer(self, stream: trio.abc.Stream, data: bytes, peer: str) -> None:
        """Send a whole HTTP answer; the caller then closes the connection."""
        with trio.move_on_after(self.config.close_timeout):
            try:
                await stream.send_all(data)
            except CLIENT_GONE as exc:
                log_client_gone(peer, exc)

    async def _upgrade(
        self, ws_nursery: trio.Nursery, stream: WireStream, address: str, deadline: float
    ) -> WebSocketRequest | None:
        """The client's upgrade request, or None when it was refused or never came."""
        request: WebSocketRequest | None = None
        # trio-websocket finds the request already read: this takes no time.
        with trio.move_on_at(deadline):
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


_TOO_MANY_TEXT = b"too many connections from your address\n"
# The answer to a connection over the per-address limit before its request head is read.
_TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_TOO_MANY_TEXT)
) + _TOO_MANY_TEXT

# Seconds and bytes of what a refused client still sends that are read
# (and dropped) before its connection closes.
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024


async def _linger(stream: trio.abc.Stream) -> None:
    """Read and drop what the client sends, briefly, before the close: a
    socket closed with its request unread is reset, and the reset can
    reach the client before the answer it was sent (it sees no 429)."""
    received = 0
    with trio.move_on_after(LINGER_SECONDS):
        try:
            while received <= LINGER_BYTES:
                data = await stream.receive_some(16 * 1024)
                if not data:
                    return
                received += len(data)
        except CLIENT_GONE:
            return


# A Host header worth repeating in the plain-HTTP answer: a name or an address, and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
