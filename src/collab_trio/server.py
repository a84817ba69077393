"""serve(): the root of the nursery tree: store, serving layer, sessions.

    trio.run
     └─ serve()
         ├─ store.run()              started first: locks the data directory, then the
         │   │                       writer; outlives everything below, so sessions
         │   │                       commit and snapshot until their end
         │   └─ lease keeper         postgres store: renews this node's session leases
         │                           every lease_timeout/3; releases them all at the end
         ├─ metrics endpoint         with --metrics-address (metrics.py): /metrics, /livez,
         │                           /readyz from before the port opens until the graceful
         │                           stop is over; cancelled (its port freed) before the
         │                           store closes
         └─ CollabServer.run()       listeners opened once the store runs
             └─ WebSocketServer.run()   server nursery (serving.py)
                 ├─ SessionRegistry.run()   sessions nursery; the sessions' error boundary
                 │   ├─ admin requests      `sessions restore` beside the server: the store
                 │   │                      looks once a second; one task per restore
                 │   ├─ leases              sessions whose lease was lost or asked for: 1012
                 │   └─ Session.run()       one nursery per live session, gone when it empties
                 │       ├─ committer       pending changes -> store -> relays and acks
                 │       ├─ snapshot        now and then, in the background
                 │       └─ Connection.run()   one nursery per member
                 │           ├─ reader      websocket -> session core
                 │           ├─ writer      bounded outbox channel -> websocket
                 │           └─ cursor      coalesced cursor forwarding
                 ├─ accept loop             cancelling it closes the listening socket: port freed
                 └─ handshake(stream)       one per TCP connection: the request head, the
                                            upgrade, access checks, the join; then parks
                                            until the member's Connection.run() is over,
                                            and closes the stream

Graceful stop: cancel the accept loop (the port is free at once), close every
connection with 1001, then give the close handshakes `shutdown_timeout`
seconds by setting a deadline on the server nursery; then the store finishes
its queued work and closes.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

import attrs
import trio
from trio_websocket import WebSocketRequest

from . import logs
from .auth import TokensFileError, TokenTable, bearer_token, header, redact
from .config import ServerConfig
from .protocol import HandshakeRejected, SyncRequest, Target, endpoint_template, parse_target
from .connection import Connection
from .counters import Counters
from .httpd import HTTPServer
from .metrics import Monitor, run_endpoint
from .listen import open_tcp_listeners
from .serving import CLIENT_GONE, WebSocketServer, listener_url, log_client_gone, reject
from .session import SessionRegistry
from .session_core import JoinRefused
from .store import Store, make_store
from .wire import WireStream

__all__ = ["CollabServer", "listener_url", "serve", "tls_context", "tls_context_from"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class CollabServer:
    """A running server: what `nursery.start(serve, ...)` returns."""

    config: ServerConfig
    store: Store
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]]
    # Tokens and roles; None when authentication is off.
    tokens: TokenTable | None = None
    # What the server counts for /metrics (counters.py).
    counters: Counters = attrs.field(factory=Counters)
    # The internal endpoint serving /metrics, if --metrics-address is set.
    metrics: HTTPServer | None = None
    # True once the listeners accept (readiness), for good.
    accepting: bool = False
    registry: SessionRegistry = attrs.field(init=False)
    web: WebSocketServer = attrs.field(init=False)
    # Accepted handshakes still joining, per session id (for max_sessions).
    _joining: dict[str, int] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.registry = SessionRegistry(self.config, self.store, counters=self.counters)
        self.web = WebSocketServer(
            self.config,
            self.listeners,
            self,
            path=endpoint_template(self.config.base_path),
            counters=self.counters,
            tokens_required=self.tokens is not None,
        )

    @property
    def closing(self) -> bool:
        """True from the moment a graceful stop starts."""
        return self.web.closing

    @property
    def port_released(self) -> trio.Event:
        """Set when the listeners are closed (the port can be bound again)."""
        return self.web.port_released

    @property
    def port(self) -> int:
        """The TCP port of the first listener (useful with port 0)."""
        return self.web.port

    def request_shutdown(self) -> None:
        """Start a graceful stop; serve() returns when it is done."""
        self.web.request_shutdown()

    def reload_tokens(self) -> None:
        """Read the tokens file again (SIGHUP): new handshakes use it; a bad file keeps the old tokens."""
        path = self.config.tokens_file
        if path is None:
            log.info("Nothing to reload: no tokens file (--tokens)")
            return
        try:
            tokens = TokenTable.load(path)
        except TokensFileError as exc:
            log.error("Kept the previous tokens (%d defined): %s", len(self.tokens or ()), exc)
            return
        self.tokens = tokens
        log.info("Reloaded tokens: %d defined in %s", len(tokens), path)

    async def run(self, *, task_status: trio.TaskStatus[CollabServer]) -> None:
        """Serve until request_shutdown(), then stop gracefully; or until cancelled.

        The store must be running (serve() starts it first and closes it last).
        """
        started = graceful = False

        def ready() -> None:
            nonlocal started
            started = self.accepting = True
            task_status.started(self)

        try:
            await self.web.run(ready)
            graceful = True
        finally:
            # A server that never started has nothing to report closed.
            if started:
                if not graceful:
                    log.warning("Server stopped without a graceful shutdown")
                log.info("✓ Server closed")
                log.info("✓ Port released")

    # -- WebSocketApp ----------------------------------------------------------

    async def run_app(self, *, task_status: trio.TaskStatus[None]) -> None:
        await self.registry.run(task_status=task_status)

    def connection_count(self) -> int:
        return self.registry.connection_count()

    def close_all(self, code: int, reason: str) -> None:
        self.registry.close_all(code, reason)

    async def handle(self, request: WebSocketRequest, peer: str, wire: WireStream) -> None:
        try:
            conn = await self._join(request, peer, wire)
        except CLIENT_GONE as exc:
            log_client_gone(peer, exc)
            return
        if conn is not None:
            await conn.finished.wait()

    async def _join(self, request: WebSocketRequest, peer: str, wire: WireStream) -> Connection | None:
        """Check, accept and join a handshake; the member's connection, or None if refused."""
        path = redact(request.path)  # never log a token
        try:
            target = parse_target(request.path, self.config.base_path)
        except HandshakeRejected as exc:
            log.info("Refused %s from %s: %d %s", path, peer, exc.status, exc.reason)
            await reject(request, exc.status, exc.reason)
            return None
        # This task's log lines, and its member's Connection tasks' (which copy
        # this context when they start), are about this session and user.
        logs.bind(session=target.session_id, user=target.user_id)
        access = self._check_access(request, target)
        if isinstance(access, tuple):
            status, reason = access
            log.info("Refused %s from %s: %d %s", path, peer, status, reason)
            await reject(request, status, reason)
            return None
        session_id = target.session_id
        self._joining[session_id] = self._joining.get(session_id, 0) + 1
        try:
            ws = await request.accept()
            resume = None
            if target.since is not None:
                resume = SyncRequest(since=target.since, epoch=target.epoch)
            try:
                return await self.registry.join(
                    session_id, ws, wire, target.user_id, remote=peer, can_write=access, resume=resume
                )
            except JoinRefused as exc:
                log.info("Closed %s from %s: %d %s", path, peer, exc.code, exc.reason)
                with trio.move_on_after(self.config.close_timeout):
                    await ws.aclose(exc.code, exc.reason)
                return None
        finally:
            self._joining[session_id] -= 1
            if not self._joining[session_id]:
                del self._joining[session_id]

    def _check_access(self, request: WebSocketRequest, target: Target) -> tuple[int, str] | bool:
        """(status, reason) to refuse the handshake with, or whether the client may write."""
        origin = header(request.headers, b"origin")
        failures = self.counters.auth_failures
        if self.config.allowed_origins and origin is not None and origin not in self.config.allowed_origins:
            failures["origin_not_allowed"] += 1
            # Escaped: a header value may hold bytes 0x80-0xff (read as
            # Latin-1), such as U+0085, a line break to log readers.
            shown = origin if origin.isprintable() else origin.encode("unicode_escape").decode("ascii")
            return 403, f"origin {shown} is not allowed"
        can_write = True
        if self.tokens is not None:
            grant = self.tokens.lookup(target.token or bearer_token(request.headers))
            if grant is None:
                failures["invalid_token"] += 1
                return 401, "missing or invalid token"
            if not grant.allows(target.session_id):
                failures["session_not_allowed"] += 1
                return 403, "your token does not give access to this session"
            can_write = grant.can_write
        # Sessions that handshakes in progress are about to create count too,
        # or concurrent handshakes could all slip under the limit.
        live = self.registry.sessions.keys() | self._joining.keys()
        if target.session_id not in live and len(live) >= self.config.max_sessions:
            return 503, f"too many live sessions (limit {self.config.max_sessions}); try again later"
        return can_write


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
        StoreError: the store can't be opened (the message says why).
    """
    tokens = TokenTable.load(config.tokens_file) if config.tokens_file is not None else None
    if store is None:
        store = make_store(config)
    counters = Counters()
    monitor = Monitor(counters)
    endpoint_scope = trio.CancelScope()
    async with trio.open_nursery() as store_nursery:
        # The store first: a data directory in use must be reported as such,
        # not as the port being taken by the server that uses it. Its writer
        # outlives everything below, so sessions commit until their very end.
        await store_nursery.start(store.run)
        try:
            metrics = None
            if config.metrics_address is not None:
                # Up before the WebSocket port (/readyz says "starting"), down
                # after the graceful stop (it says "draining" meanwhile).
                metrics = await store_nursery.start(_run_endpoint, endpoint_scope, monitor, config.metrics_address)
            if listeners is None:
                listeners = await _open_listeners(config)
            server = CollabServer(config, store, listeners, tokens=tokens, counters=counters, metrics=metrics)
            monitor.server = server
            await server.run(task_status=task_status)
        finally:
            endpoint_scope.cancel()
            with trio.CancelScope(shield=True):
                await store.aclose()


async def _run_endpoint(
    scope: trio.CancelScope, monitor: Monitor, address: str, *, task_status: trio.TaskStatus[HTTPServer]
) -> None:
    with scope:
        await run_endpoint(monitor, address, task_status=task_status)


async def _open_listeners(config: ServerConfig) -> list[trio.abc.Listener[trio.abc.Stream]]:
    # One port for every address, also with port 0 (trio's would differ per family).
    listeners = await open_tcp_listeners(config.port, config.host or None)
    if config.certfile is not None:
        context = tls_context(config)
        return [trio.SSLListener(listener, context, https_compatible=True) for listener in listeners]
    return list(listeners)


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
