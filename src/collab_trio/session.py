"""Sessions: members, host, the document and fan-out; each owns one nursery.

Everything that changes a session happens synchronously inside one task step
(a reader handling a frame, a join, a close), so no lock is needed and the
order in which messages are applied is the order they were read.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from . import __version__
from .config import ServerConfig
from .connection import Connection
from .document import SessionDocument
from .protocol import (
    PROTOCOL_VERSION,
    CloseCode,
    Command,
    Cursor,
    ErrorCode,
    FullState,
    Ping,
    ProtocolError,
    SyncRequest,
    SyncUpdate,
    ack_message,
    decode,
    encode,
    error_message,
    parse_client_message,
    pong_message,
    relayed_command,
    utc_timestamp,
)
from .store import Store

log = logging.getLogger(__name__)

SERVER_INFO = {"name": "collab-trio", "version": __version__, "protocol": PROTOCOL_VERSION}


class SessionUnavailable(Exception):
    """A join that cannot happen: the server is stopping or the session failed to load."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@attrs.define(eq=False)
class Session:
    """One live session: its members (in join order), host and document."""

    session_id: str
    config: ServerConfig
    store: Store
    registry: SessionRegistry
    document: SessionDocument = attrs.field(factory=SessionDocument)
    members: dict[str, Connection] = attrs.field(factory=dict)
    host: str | None = None
    # Once True the session takes no joins; a new Session object serves the id.
    closing: bool = False
    # Set when the document is loaded and the nursery is open (or loading failed).
    ready: trio.Event = attrs.field(factory=trio.Event)
    load_failed: bool = False
    # Set when run() has returned: every connection task of the session is done.
    finished: trio.Event = attrs.field(factory=trio.Event)
    _emptied: trio.Event = attrs.field(factory=trio.Event)
    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the document, then hold the connections' tasks until the last one ends."""
        try:
            try:
                self.document = await self.store.load(self.session_id)
            except Exception:
                self.load_failed = True
                raise
            finally:
                self.ready.set()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._emptied.wait()
            log.debug("Session %s unloaded", self.session_id)
        finally:
            self.finished.set()

    # -- membership ----------------------------------------------------------

    def try_join(self, conn: Connection) -> bool:
        """Add a connection and start its tasks; False if the session is closing."""
        if self.closing or self._nursery is None:
            return False
        conn.session = self
        previous = self.members.get(conn.user_id)
        # Assigning to an existing key keeps its place: a reconnecting user keeps
        # its seniority (and host role) instead of going to the back of the line.
        self.members[conn.user_id] = conn
        if self.host is None:
            self.host = conn.user_id
        conn.start(self._nursery)
        conn.send(encode(self._ack(conn)))
        if previous is not None:
            log.info(
                "User %s reconnected to session %s; previous connection replaced",
                conn.user_id,
                self.session_id,
            )
            previous.close(CloseCode.REPLACED, "replaced by a newer connection of the same user")
        else:
            log.info("User %s joined session %s", conn.user_id, self.session_id)
            self.broadcast(
                {
                    "type": "user:joined",
                    "user_id": conn.user_id,
                    "timestamp": conn.connected_at,
                    "users": self.users(),
                },
                exclude=conn,
            )
        return True

    def connection_closed(self, conn: Connection) -> None:
        """Called by Connection.close(): remove the member and tell the others."""
        if self.members.get(conn.user_id) is not conn:
            return  # replaced by a newer connection: nobody left
        del self.members[conn.user_id]
        reason = conn.leave_reason()
        log.info(
            "User %s left session %s (%s, close code %s)",
            conn.user_id,
            self.session_id,
            reason,
            conn.close_code,
        )
        if not self.closing:
            self.broadcast(
                {
                    "type": "user:left",
                    "user_id": conn.user_id,
                    "timestamp": utc_timestamp(),
                    "reason": reason,
                    "users": self.users(),
                }
            )
            if self.host == conn.user_id:
                self.host = next(iter(self.members), None)
                if self.host is not None:
                    log.info("User %s is now host of session %s", self.host, self.session_id)
                    self.broadcast(
                        {"type": "host:changed", "user_id": self.host, "timestamp": utc_timestamp()}
                    )
        if not self.members:
            self._close()

    def close_all(self, code: int, reason: str) -> None:
        """Close every member with the same code, without a leave notice storm."""
        self.closing = True
        for conn in list(self.members.values()):
            conn.close(code, reason)
        self._close()

    def _close(self) -> None:
        if not self.closing:
            log.info("Session %s closed: its last user left", self.session_id)
        self.closing = True
        self.registry.discard(self)
        self._emptied.set()

    def users(self) -> list[dict[str, Any]]:
        """The user list, in join order."""
        return [
            {"user_id": c.user_id, "connected_at": c.connected_at, "is_host": c.user_id == self.host}
            for c in self.members.values()
        ]

    def _ack(self, conn: Connection) -> dict[str, Any]:
        return {
            "type": "connection:ack",
            "session_id": self.session_id,
            "user_id": conn.user_id,
            "is_host": conn.user_id == self.host,
            "users": self.users(),
            "version": self.document.version,
            "epoch": self.document.epoch,
            "heartbeat_interval_s": self.config.heartbeat_interval,
            "server": SERVER_INFO,
            "timestamp": utc_timestamp(),
        }

    # -- fan-out -------------------------------------------------------------

    def broadcast(self, message: dict[str, Any], *, exclude: Connection | None = None) -> None:
        """Encode once, queue for every member but `exclude`; never waits."""
        text = encode(message)
        # list(): a member that overflows is closed, which edits self.members.
        for conn in list(self.members.values()):
            if conn is not exclude:
                conn.send(text)

    # -- messages ------------------------------------------------------------

    def handle_frame(self, conn: Connection, frame: str | bytes) -> None:
        """Apply one frame from a member: answer it, apply it, relay it."""
        if conn.closing or self.members.get(conn.user_id) is not conn:
            return
        if isinstance(frame, bytes):
            self._send_error(
                conn,
                ProtocolError(
                    ErrorCode.BINARY_NOT_SUPPORTED,
                    "binary frames are not supported; send JSON in text frames",
                ),
            )
            return
        try:
            message = parse_client_message(decode(frame))
        except ProtocolError as exc:
            self._send_error(conn, exc)
            return
        if isinstance(message, Ping):
            conn.send(encode(pong_message(utc_timestamp())))
        elif isinstance(message, Command):
            self._command(conn, message)
        elif isinstance(message, Cursor):
            conn.queue_cursor({**message.raw, "user_id": conn.user_id})
        elif isinstance(message, SyncRequest):
            conn.send(encode(self._sync_state()))
        elif isinstance(message, SyncUpdate):
            seq = self.document.replace(message.items)
            self.broadcast(self._sync_state(), exclude=conn)
            conn.send(encode(ack_message(seq, message.op_id)))
        elif isinstance(message, FullState):
            self._full_state(conn, message)

    def _command(self, conn: Connection, command: Command) -> None:
        seq = self.document.apply(command)
        self.broadcast(relayed_command(command, conn.user_id, seq, utc_timestamp()), exclude=conn)
        conn.send(encode(ack_message(seq, command.op_id)))

    def _full_state(self, conn: Connection, message: FullState) -> None:
        target: Connection | None = None
        if message.target_user is not None:
            target = self.members.get(message.target_user)
            if target is None:
                self._send_error(
                    conn,
                    ProtocolError(
                        ErrorCode.UNKNOWN_USER,
                        f"target_user {message.target_user!r} is not in this session",
                        "sync:full_state",
                    ),
                )
                return
        # Only the host's full state becomes the session document: the host is
        # the one Optiverse treats as the owner of the canvas.
        seq = self.document.replace(message.items) if conn.user_id == self.host else None
        forwarded = {**message.raw, "user_id": conn.user_id}
        if target is not None:
            target.send(encode(forwarded))
        else:
            self.broadcast(forwarded, exclude=conn)
        if seq is not None:
            conn.send(encode(ack_message(seq)))

    def _sync_state(self) -> dict[str, Any]:
        return {
            "type": "sync:state",
            "state": self.document.state(utc_timestamp()),
            "version": self.document.version,
            "epoch": self.document.epoch,
            "from_server": True,
        }

    def _send_error(self, conn: Connection, exc: ProtocolError) -> None:
        log.debug("Error for %s in session %s: %s", conn.user_id, self.session_id, exc.message)
        conn.send(encode(error_message(exc.code, exc.message, exc.ref)))


@attrs.define(eq=False)
class SessionRegistry:
    """The live sessions of one server, by id. Created and owned by serve()."""

    config: ServerConfig
    store: Store
    nursery: trio.Nursery
    sessions: dict[str, Session] = attrs.field(factory=dict)
    closing: bool = False

    async def join(self, session_id: str, conn: Connection) -> Session:
        """Put a connection into its session, loading the session if needed.

        Raises:
            SessionUnavailable: the server is stopping or the session can't load.
        """
        while True:
            if self.closing:
                raise SessionUnavailable(CloseCode.GOING_AWAY, "server shutting down")
            session = self.sessions.get(session_id)
            if session is None:
                session = Session(session_id, self.config, self.store, self)
                self.sessions[session_id] = session
                try:
                    await self.nursery.start(session.run)
                except Exception:
                    self.discard(session)
                    log.exception("Could not load session %s", session_id)
                    raise SessionUnavailable(
                        CloseCode.INTERNAL_ERROR, "could not load the session"
                    ) from None
                except BaseException:
                    self.discard(session)
                    raise
            else:
                await session.ready.wait()
                if session.load_failed:
                    raise SessionUnavailable(CloseCode.INTERNAL_ERROR, "could not load the session")
            if session.try_join(conn):
                return session
            # The session closed while we waited: its successor loads afresh.

    def discard(self, session: Session) -> None:
        """Forget a session that is closing (it may still be finishing its tasks)."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]

    def close_all(self, code: int, reason: str) -> None:
        """Stop taking joins and close every connection of every session."""
        self.closing = True
        for session in list(self.sessions.values()):
            session.close_all(code, reason)

    def connection_count(self) -> int:
        """Members of all live sessions."""
        return sum(len(s.members) for s in self.sessions.values())
