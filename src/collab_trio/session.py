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
from .document import COMMAND, REPLACE, Op, SessionDocument, op_id_key
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
    message_type,
    parse_client_message,
    pong_message,
    utc_timestamp,
)
from .store import SessionReset, Store, StoreError

log = logging.getLogger(__name__)

# A queued sync:request, answered after the changes queued before it.
SYNC = "sync"

SERVER_INFO = {"name": "collab-trio", "version": __version__, "protocol": PROTOCOL_VERSION}


class SessionUnavailable(Exception):
    """A join that cannot happen: the server is stopping or the session failed to load."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@attrs.define(eq=False)
class Pending:
    """A change waiting for its commit: what to apply, and whom to tell afterwards."""

    conn: Connection
    kind: str  # COMMAND, REPLACE, or SYNC (a sync:request answered in order)
    command: dict[str, Any] | None = None
    request: SyncRequest | None = None
    items: list[dict[str, Any]] | None = None
    op_id: Any = None
    # REPLACE from sync:full_state: the message to forward, and to whom (None: everyone).
    forward: dict[str, Any] | None = None
    target_user: str | None = None
    # Connections that sent the same op_id again before the first one committed.
    repeats: list[Connection] = attrs.field(factory=list)


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
    # Set when every change handed to the store has its outcome: a successor
    # may load the document from the store from then on.
    drained: trio.Event = attrs.field(factory=trio.Event)
    # Set when run() has returned: every connection task of the session is done.
    finished: trio.Event = attrs.field(factory=trio.Event)
    _emptied: trio.Event = attrs.field(factory=trio.Event)
    _nursery: trio.Nursery | None = None
    _pending: list[Pending] = attrs.field(factory=list)
    _pending_op_ids: dict[tuple[str, tuple[str, str | int]], Pending] = attrs.field(factory=dict)
    _commit_wanted: trio.Event = attrs.field(factory=trio.Event)
    _committing: bool = False
    _snapshot_version: int = 0
    _snapshotting: bool = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the document, then hold the connections' tasks until the last one ends."""
        try:
            try:
                self.document = await self.store.load(self.session_id)
            except Exception:
                self.load_failed = True
                self.drained.set()
                raise
            finally:
                self.ready.set()
            self._snapshot_version = self.document.version
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._committer, name=f"committer({self.session_id})")
                task_status.started()
                await self._emptied.wait()
            await self._snapshot()
            log.debug("Session %s unloaded", self.session_id)
        finally:
            self.drained.set()
            self.registry.forget(self)
            self.finished.set()

    # -- membership ----------------------------------------------------------

    def try_join(self, conn: Connection, resume: SyncRequest | None = None) -> bool:
        """Add a connection and start its tasks; False if the session is closing.

        With `resume` (since/epoch from the handshake), the ack is followed by
        the answer to that sync request.
        """
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
        if resume is not None:
            conn.send(encode(self._sync_answer(resume)))
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
                exclude=conn.user_id,
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
        host_left = self.host == conn.user_id
        if host_left:
            # Promote first, so the user list in user:left already shows the new host.
            self.host = next(iter(self.members), None)
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
            if host_left and self.host is not None:
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
        self._commit_wanted.set()  # let the committer finish and stop

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

    def broadcast(self, message: dict[str, Any], *, exclude: str | None = None) -> None:
        """Encode once, queue for every member but user `exclude`; never waits."""
        # list(): a member that overflows is closed, which edits self.members.
        recipients = [conn for conn in self.members.values() if conn.user_id != exclude]
        if recipients:
            text = encode(message)
            for conn in recipients:
                conn.send(text)

    # -- messages ------------------------------------------------------------

    def handle_frame(self, conn: Connection, frame: str | bytes) -> None:
        """Handle one frame from a member: answer it, or queue the change it makes."""
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
        if not conn.can_write and isinstance(message, (Command, SyncUpdate, FullState)):
            conn.refuse_forbidden(message_type(message))
            return
        if isinstance(message, Ping):
            conn.send(encode(pong_message(utc_timestamp())))
        elif isinstance(message, Command):
            self._command(conn, message)
        elif isinstance(message, Cursor):
            conn.queue_cursor({**message.raw, "user_id": conn.user_id})
        elif isinstance(message, SyncRequest):
            if self._pending or self._committing:
                # Changes this client (or anyone) sent earlier are not applied
                # yet: answer in arrival order, after them.
                self._pending.append(Pending(conn, SYNC, request=message))
            else:
                conn.send(encode(self._sync_answer(message)))
        elif isinstance(message, SyncUpdate):
            self._queue(Pending(conn, REPLACE, items=message.items, op_id=message.op_id))
        elif isinstance(message, FullState):
            self._full_state(conn, message)

    def _command(self, conn: Connection, command: Command) -> None:
        self._queue(Pending(conn, COMMAND, command=command.command, op_id=command.op_id))

    def _full_state(self, conn: Connection, message: FullState) -> None:
        if message.target_user is not None and message.target_user not in self.members:
            self._send_error(
                conn,
                ProtocolError(
                    ErrorCode.UNKNOWN_USER,
                    f"target_user {message.target_user!r} is not in this session",
                    "sync:full_state",
                ),
            )
            return
        forwarded = {**message.raw, "user_id": conn.user_id}
        if conn.user_id != self.host:
            # Only the host's full state becomes the session document: the host
            # is the one Optiverse treats as the owner of the canvas.
            self._forward(forwarded, message.target_user, exclude=conn.user_id)
            return
        self._queue(
            Pending(conn, REPLACE, items=message.items, forward=forwarded, target_user=message.target_user)
        )

    def _forward(self, message: dict[str, Any], target_user: str | None, *, exclude: str) -> None:
        if target_user is None:
            self.broadcast(message, exclude=exclude)
        elif (target := self.members.get(target_user)) is not None:
            target.send(encode(message))

    def _sync_answer(self, request: SyncRequest) -> dict[str, Any]:
        """sync:ops when the client can catch up op by op, else sync:state."""
        document = self.document
        if request.since is not None and request.epoch == document.epoch:
            ops = document.ops_since(request.since)
            if ops is not None:
                return {
                    "type": "sync:ops",
                    "ops": [op.relayed() for op in ops],
                    "version": document.version,
                    "epoch": document.epoch,
                }
        return self._sync_state()

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

    # -- commits -------------------------------------------------------------

    def _queue(self, pending: Pending) -> None:
        """Hand a change to the committer; a repeated op_id is only acknowledged again."""
        if pending.op_id is not None:
            key = (pending.conn.user_id, op_id_key(pending.op_id))
            seq = self.document.seq_of(pending.conn.user_id, pending.op_id)
            if seq is not None:
                pending.conn.send(encode(ack_message(seq, pending.op_id)))
                return
            earlier = self._pending_op_ids.get(key)
            if earlier is not None:
                earlier.repeats.append(pending.conn)
                return
            self._pending_op_ids[key] = pending
        self._pending.append(pending)
        self._commit_wanted.set()

    async def _committer(self) -> None:
        """Commit queued changes in batches, then apply, relay and acknowledge them.

        Nobody hears of a change before the store has it: relays and acks go
        out only after the commit, in seq order.
        """
        try:
            while True:
                if not self._pending:
                    if self.closing:
                        return
                    await self._commit_wanted.wait()
                    self._commit_wanted = trio.Event()
                    continue
                batch, self._pending = self._pending, []
                self._committing = True
                try:
                    await self._commit_batch(batch)
                finally:
                    self._committing = False
        except Exception:
            # A bug here leaves the document unsure; the store stays the truth.
            # Everyone reconnects and the session is loaded afresh.
            log.exception("Internal error while committing in session %s; closing it", self.session_id)
            self.close_all(CloseCode.INTERNAL_ERROR, "internal server error; reconnect")
        finally:
            self.drained.set()

    async def _commit_batch(self, batch: list[Pending]) -> None:
        changes = [p for p in batch if p.kind != SYNC]
        timestamp = utc_timestamp()
        first = self.document.version + 1
        ops = [
            Op(
                seq=first + i,
                user_id=p.conn.user_id,
                kind=p.kind,
                timestamp=timestamp,
                command=p.command,
                items=p.items,
                op_id=p.op_id,
            )
            for i, p in enumerate(changes)
        ]
        committed = True
        if ops:
            try:
                # Shielded: once handed to the store the ops may be committed, so
                # we must learn the outcome or the document would fall behind.
                with trio.CancelScope(shield=True):
                    await self.store.commit(self.session_id, self.document.epoch, ops)
            except StoreError as exc:
                committed = False
                self._commit_failed(changes, exc)
            finally:
                for p in changes:
                    if p.op_id is not None:
                        self._pending_op_ids.pop((p.conn.user_id, op_id_key(p.op_id)), None)
        op_of = dict(zip(map(id, changes), ops))
        for pending in batch:
            if pending.kind == SYNC:
                assert pending.request is not None
                pending.conn.send(encode(self._sync_answer(pending.request)))
            elif committed:
                self._applied(pending, op_of[id(pending)])
        if (
            committed
            and not self._snapshotting
            and self.document.version - self._snapshot_version >= self.config.snapshot_every
        ):
            # In the background: commits go on while the snapshot is written.
            assert self._nursery is not None
            self._snapshotting = True
            self._nursery.start_soon(self._snapshot)

    def _applied(self, pending: Pending, op: Op) -> None:
        """Apply a committed op, then tell everyone: relay to others, ack to the sender."""
        self.document.apply(op)
        if op.kind == COMMAND:
            self.broadcast(op.relayed(), exclude=op.user_id)
        elif pending.forward is not None:
            self._forward(pending.forward, pending.target_user, exclude=op.user_id)
        else:
            self.broadcast(self._sync_state(), exclude=op.user_id)
        ack = encode(ack_message(op.seq, op.op_id))
        for conn in (pending.conn, *pending.repeats):
            conn.send(ack)

    def _commit_failed(self, batch: list[Pending], exc: StoreError) -> None:
        log.error(
            "Could not store %d change(s) in session %s: %s", len(batch), self.session_id, exc
        )
        for pending in batch:
            ref = "command" if pending.kind == COMMAND else None
            error = encode(
                error_message(
                    ErrorCode.NOT_PERSISTED,
                    "the change was not stored and not sent to anyone; try again later",
                    ref,
                )
            )
            for conn in (pending.conn, *pending.repeats):
                conn.send(error)
        if isinstance(exc, SessionReset):
            # An administrator deleted or replaced this session: everyone must
            # reconnect to see what is stored now.
            self.close_all(CloseCode.GOING_AWAY, "session was reset by an administrator; reconnect")

    async def _snapshot(self) -> None:
        try:
            if self.document.version == self._snapshot_version:
                return
            snapshot = self.document.snapshot()
            try:
                with trio.CancelScope(shield=True):
                    await self.store.save_snapshot(self.session_id, snapshot)
            except StoreError as exc:
                log.warning("Could not save a snapshot of session %s: %s", self.session_id, exc)
                return
            self._snapshot_version = max(self._snapshot_version, snapshot["version"])
        finally:
            self._snapshotting = False


@attrs.define(eq=False)
class SessionRegistry:
    """The live sessions of one server, by id. Created and owned by serve()."""

    config: ServerConfig
    store: Store
    nursery: trio.Nursery
    sessions: dict[str, Session] = attrs.field(factory=dict)
    # Closed sessions whose last changes are still being committed, by id.
    draining: dict[str, Session] = attrs.field(factory=dict)
    closing: bool = False

    async def join(
        self, session_id: str, conn: Connection, resume: SyncRequest | None = None
    ) -> Session:
        """Put a connection into its session, loading the session if needed.

        Raises:
            SessionUnavailable: the server is stopping or the session can't load.
        """
        while True:
            if self.closing:
                raise SessionUnavailable(CloseCode.GOING_AWAY, "server shutting down")
            session = self.sessions.get(session_id)
            if session is None:
                predecessor = self.draining.get(session_id)
                if predecessor is not None:
                    # Its last changes are still being stored: load after them.
                    await predecessor.drained.wait()
                    if self.draining.get(session_id) is predecessor:
                        del self.draining[session_id]
                    continue
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
            if (
                conn.user_id not in session.members
                and len(session.members) >= self.config.max_users_per_session
            ):
                raise SessionUnavailable(
                    CloseCode.SESSION_FULL,
                    f"session full ({self.config.max_users_per_session} users)",
                )
            if session.try_join(conn, resume):
                return session
            # The session closed while we waited: its successor loads afresh.

    def discard(self, session: Session) -> None:
        """Forget a closing session; it drains its pending changes before a successor loads."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
            if not session.drained.is_set():
                self.draining[session.session_id] = session

    def forget(self, session: Session) -> None:
        """Drop a finished session from the draining list."""
        if self.draining.get(session.session_id) is session:
            del self.draining[session.session_id]

    def close_all(self, code: int, reason: str) -> None:
        """Stop taking joins and close every connection of every session."""
        self.closing = True
        for session in list(self.sessions.values()):
            session.close_all(code, reason)

    def connection_count(self) -> int:
        """Members of all live sessions."""
        return sum(len(s.members) for s in self.sessions.values())
