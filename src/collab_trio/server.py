"""serve(): the root of the nursery tree, the listeners and the session registry.

    trio.run
     └─ serve()                     server nursery: listeners, session registry
         ├─ accept loop              cancelling it closes the listening socket: port freed
         ├─ handshake(stream)        one per TCP connection: the WebSocket upgrade and
         │                           trio-websocket's frame reader; parks until the
         │                           connection's tasks below are done, then closes the stream
         └─ Session.run()            one nursery per live session, gone when it empties
              ├─ reader(alice)       websocket -> session
              ├─ writer(alice)       bounded outbox channel -> websocket
              ├─ cursor(alice)       coalesced cursor forwarding
              └─ ...

Graceful stop: cancel the accept loop (the port is free at once), close every
connection with 1001, then give the close handshakes `shutdown_timeout`
seconds by setting a deadline on the server nursery.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream

from .auth import TokenTable, bearer_token, header, redact

from .config import ServerConfig
from .connection import Connection
from .protocol import (
    ENDPOINT_TEMPLATE,
    CloseCode,
    HandshakeRejected,
    SyncRequest,
    Target,
    parse_target,
)
from .session import SessionRegistry, SessionUnavailable
from .store import Store, make_store

log = logging.getLogger(__name__)


def _listener_socket(listener: trio.abc.Listener[trio.abc.Stream]) -> trio.socket.SocketType | None:
    transport = getattr(listener, "transport_listener", listener)  # unwrap TLS
    return getattr(transport, "socket", None)


def listener_url(listener: trio.abc.Listener[trio.abc.Stream]) -> str:
    """The ws:// (or wss://) URL template a client uses to reach this listener."""
    socket = _listener_socket(listener)
    if socket is None:
        return f"{listener!r}{ENDPOINT_TEMPLATE}"
    host, port = socket.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    scheme = "wss" if isinstance(listener, trio.SSLListener) else "ws"
    return f"{scheme}://{host}:{port}{ENDPOINT_TEMPLATE}"


@attrs.define(eq=False)
class CollabServer:
    """A running server: what `nursery.start(serve, ...)` returns."""

    config: ServerConfig
    store: Store
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]]
    registry: SessionRegistry | None = None
    # True from the moment a graceful stop starts: new handshakes are refused.
    closing: bool = False
    # Set when the listeners are closed (the port can be bound again).
    port_released: trio.Event = attrs.field(factory=trio.Event)
    # Tokens and roles; None when authentication is off.
    tokens: TokenTable | None = None
    _shutdown_requested: trio.Event = attrs.field(factory=trio.Event)
    # Open TCP connections per client address (handshakes included).
    _per_address: dict[str, int] = attrs.field(factory=dict)
    # Accepted handshakes still joining, per session id (for max_sessions).
    _joining: dict[str, int] = attrs.field(factory=dict)

    @property
    def port(self) -> int:
        """The TCP port of the first listener (useful with port 0)."""
        for listener in self.listeners:
            socket = _listener_socket(listener)
            if socket is not None:
                return int(socket.getsockname()[1])
        raise RuntimeError("this server has no TCP listener")

    def request_shutdown(self) -> None:
        """Start a graceful stop; serve() returns when it is done."""
        self._shutdown_requested.set()

    async def run(self, *, task_status: trio.TaskStatus[CollabServer]) -> None:
        """Serve until request_shutdown(), then stop gracefully; or until cancelled."""
        forced = True
        try:
            async with trio.open_nursery() as store_nursery:
                # The store outlives the server nursery: sessions commit and
                # snapshot until their very end.
                await store_nursery.start(self.store.run)
                try:
                    await self._serve(task_status)
                    forced = False
                finally:
                    with trio.CancelScope(shield=True):
                        await self.store.aclose()
        finally:
            # Shielded: when serve() itself is cancelled, cleanup must still finish.
            with trio.CancelScope(shield=True):
                for listener in self.listeners:
                    await trio.aclose_forcefully(listener)
            if forced:
                log.warning("Server stopped without a graceful shutdown")
            log.info("✓ Server closed")
            log.info("✓ Port released")

    async def _serve(self, task_status: trio.TaskStatus[CollabServer]) -> None:
        async with trio.open_nursery() as nursery:
            self.registry = SessionRegistry(self.config, self.store, nursery)
            accept_scope = trio.CancelScope()
            await nursery.start(self._accept, accept_scope)
            for listener in self.listeners:
                log.info("Listening on %s", listener_url(listener))
            task_status.started(self)

            await self._shutdown_requested.wait()
            self.closing = True
            accept_scope.cancel()
            await self.port_released.wait()
            count = self.registry.connection_count()
            log.info("Shutting down: no new connections; closing %d connection(s) with 1001", count)
            self.registry.close_all(CloseCode.GOING_AWAY, "server shutting down")
            nursery.cancel_scope.deadline = trio.current_time() + self.config.shutdown_timeout
        if nursery.cancel_scope.cancelled_caught:
            log.warning(
                "Grace period of %g s over: remaining connections were cut",
                self.config.shutdown_timeout,
            )
        else:
            log.info("✓ All connections closed")

    async def _accept(
        self, accept_scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        assert self.registry is not None
        try:
            with accept_scope:
                # Handshakes run in the server nursery, not in serve_listeners'
                # own: cancelling the accept loop then closes only the listeners.
                await trio.serve_listeners(
                    self._handshake,
                    list(self.listeners),
                    handler_nursery=self.registry.nursery,
                    task_status=task_status,
                )
        finally:
            self.port_released.set()

    async def _handshake(self, stream: trio.abc.Stream) -> None:
        address = _stream_address(stream)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        try:
            async with trio.open_nursery() as ws_nursery:
                request: WebSocketRequest | None = None
                with trio.move_on_after(self.config.handshake_timeout):
                    request = await wrap_server_stream(
                        ws_nursery, stream, max_message_size=self.config.max_message_size
                    )
                if request is None:
                    log.debug(
                        "Dropped %s: no complete handshake within %g s",
                        address,
                        self.config.handshake_timeout,
                    )
                elif self._per_address[address] > self.config.max_connections_per_ip:
                    log.warning("Refused %s: too many connections from this address", address)
                    await _reject(request, 429, "too many connections from your address")
                else:
                    await self._handle_request(request)
                # Stop trio-websocket's frame reader; our writer already closed the socket.
                ws_nursery.cancel_scope.cancel()
        except ConnectionClosed:
            log.debug("Client %s went away during the handshake", address)
        except Exception:
            log.exception("Unexpected error in a connection handler")
        finally:
            self._per_address[address] -= 1
            if not self._per_address[address]:
                del self._per_address[address]
            # trio-websocket leaves the stream open after some closes (e.g. 1009).
            await trio.aclose_forcefully(stream)

    def _check_access(self, request: WebSocketRequest, target: Target) -> tuple[int, str] | bool:
        """(status, reason) to refuse the handshake with, or whether the client may write."""
        assert self.registry is not None
        if self.closing:
            return 503, "server shutting down"
        origin = header(request.headers, b"origin")
        if self.config.allowed_origins and origin is not None and origin not in self.config.allowed_origins:
            return 403, f"origin {origin} is not allowed"
        can_write = True
        if self.tokens is not None:
            grant = self.tokens.lookup(target.token or bearer_token(request.headers))
            if grant is None:
                return 401, "missing or invalid token"
            if not grant.allows(target.session_id):
                return 403, "your token does not give access to this session"
            can_write = grant.can_write
        # Sessions that handshakes in progress are about to create count too,
        # or concurrent handshakes could all slip under the limit.
        live = self.registry.sessions.keys() | self._joining.keys()
        if target.session_id not in live and len(live) >= self.config.max_sessions:
            return 503, f"too many live sessions (limit {self.config.max_sessions}); try again later"
        return can_write

    async def _handle_request(self, request: WebSocketRequest) -> None:
        assert self.registry is not None
        remote = _peer(request)
        path = redact(request.path)  # never log a token
        try:
            target = parse_target(request.path)
        except HandshakeRejected as exc:
            log.info("Refused %s from %s: %d %s", path, remote, exc.status, exc.reason)
            await _reject(request, exc.status, exc.reason)
            return
        access = self._check_access(request, target)
        if isinstance(access, tuple):
            status, reason = access
            log.info("Refused %s from %s: %d %s", path, remote, status, reason)
            await _reject(request, status, reason)
            return
        session_id = target.session_id
        self._joining[session_id] = self._joining.get(session_id, 0) + 1
        try:
            ws = await request.accept()
            conn = Connection(ws, target.user_id, self.config, remote=remote, can_write=access)
            resume = None
            if target.since is not None:
                resume = SyncRequest(since=target.since, epoch=target.epoch)
            try:
                await self.registry.join(session_id, conn, resume)
            except SessionUnavailable as exc:
                log.info("Closed %s from %s: %d %s", path, remote, exc.code, exc.reason)
                with trio.move_on_after(self.config.close_timeout):
                    await ws.aclose(exc.code, exc.reason)
                return
        finally:
            self._joining[session_id] -= 1
            if not self._joining[session_id]:
                del self._joining[session_id]
        await conn.finished.wait()


def _stream_address(stream: trio.abc.Stream) -> str:
    """The client's IP address, for per-address limits."""
    transport = getattr(stream, "transport_stream", stream)  # unwrap TLS
    socket = getattr(transport, "socket", None)
    if socket is None:
        return "in-memory"
    try:
        return str(socket.getpeername()[0])
    except OSError:
        return "unknown"


def _peer(request: WebSocketRequest) -> str:
    """`host:port` of the client, or a description for non-socket streams."""
    remote = request.remote
    address, port = getattr(remote, "address", None), getattr(remote, "port", None)
    if address is None:
        return str(remote)
    return f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"


async def _reject(request: WebSocketRequest, status: int, reason: str) -> None:
    await request.reject(
        status,
        extra_headers=[(b"Content-Type", b"text/plain; charset=utf-8")],
        body=(reason + "\n").encode("utf-8"),
    )


async def serve(
    config: ServerConfig,
    *,
    store: Store | None = None,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
    task_status: trio.TaskStatus[CollabServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a collab-trio server; `await nursery.start(serve, config)` returns it once bound.

    Args:
        config: the settings.
        store: where documents live; by default the one config asks for.
        listeners: listen on these instead of TCP on config.host/config.port
            (tests pass in-memory listeners).

    Raises:
        OSError: the address can't be bound (e.g. the port is in use), or the
            TLS files can't be read.
        TokensFileError: the tokens file is malformed.
    """
    tokens = TokenTable.load(config.tokens_file) if config.tokens_file else None
    if listeners is None:
        if config.certfile is not None:
            listeners = await trio.open_ssl_over_tcp_listeners(
                config.port, tls_context(config), host=config.host or None, https_compatible=True
            )
        else:
            listeners = await trio.open_tcp_listeners(config.port, host=config.host or None)
    server = CollabServer(
        config, store if store is not None else make_store(config), listeners, tokens=tokens
    )
    await server.run(task_status=task_status)


def tls_context(config: ServerConfig) -> ssl.SSLContext:
    """A server TLS context from the configured certificate and key."""
    assert config.certfile is not None and config.keyfile is not None
    return tls_context_from(config.certfile, config.keyfile)


def tls_context_from(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or newer) for this certificate chain and key.

    Raises:
        ssl.SSLError, OSError: unreadable or mismatched files.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context
