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
from collections.abc import Sequence

import attrs
import trio
from trio_websocket import WebSocketRequest, wrap_server_stream

from .config import ServerConfig
from .connection import Connection
from .protocol import ENDPOINT_TEMPLATE, CloseCode, HandshakeRejected, SyncRequest, parse_target
from .session import SessionRegistry, SessionUnavailable
from .store import Store, make_store

log = logging.getLogger(__name__)


def listener_url(listener: trio.abc.Listener[trio.abc.Stream]) -> str:
    """The ws:// URL template a client uses to reach this listener."""
    socket = getattr(listener, "socket", None)
    if socket is None:
        return f"{listener!r}{ENDPOINT_TEMPLATE}"
    host, port = socket.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{port}{ENDPOINT_TEMPLATE}"


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
    _shutdown_requested: trio.Event = attrs.field(factory=trio.Event)

    @property
    def port(self) -> int:
        """The TCP port of the first listener (useful with port 0)."""
        for listener in self.listeners:
            socket = getattr(listener, "socket", None)
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
                    await self._handle_request(request)
                # Stop trio-websocket's frame reader; our writer already closed the socket.
                ws_nursery.cancel_scope.cancel()
        except Exception:
            log.exception("Unexpected error in a connection handler")
        finally:
            # trio-websocket leaves the stream open after some closes (e.g. 1009).
            await trio.aclose_forcefully(stream)

    async def _handle_request(self, request: WebSocketRequest) -> None:
        assert self.registry is not None
        remote = _peer(request)
        try:
            target = parse_target(request.path)
        except HandshakeRejected as exc:
            log.info("Refused %s from %s: %d %s", request.path, remote, exc.status, exc.reason)
            await _reject(request, exc.status, exc.reason)
            return
        if self.closing:
            await _reject(request, 503, "server shutting down")
            return
        ws = await request.accept()
        conn = Connection(ws, target.user_id, self.config, remote=remote)
        resume = None
        if target.since is not None:
            resume = SyncRequest(since=target.since, epoch=target.epoch)
        try:
            await self.registry.join(target.session_id, conn, resume)
        except SessionUnavailable as exc:
            with trio.move_on_after(self.config.close_timeout):
                await ws.aclose(exc.code, exc.reason)
            return
        await conn.finished.wait()


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
        OSError: the address can't be bound (e.g. the port is in use).
    """
    if listeners is None:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host or None)
    server = CollabServer(config, store if store is not None else make_store(config), listeners)
    await server.run(task_status=task_status)
