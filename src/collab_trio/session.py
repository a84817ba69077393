"""The session runner and the registry: trio around the sans-io SessionCore.

`Session` runs one `SessionCore` (session_core.py): it owns the session
nursery, feeds the core what the connections read, awaits the store for the
core's batches, and carries out the effects the core returns, in order.
`SessionRegistry` owns the nursery all sessions run in and is their error
boundary: a bug in one session closes that session's members with 1011
and nothing else.

Effects are carried out one at a time from a queue. A close that happens
while a broadcast is going out (a member too slow for it) queues its
user:left behind that broadcast, so every member sees one order.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from trio_websocket import WebSocketConnection

from . import logs
from .config import ServerConfig
from .connection import Connection
from .counters import Counters
from .document import SessionDocument
from .messages import NOTICES, Forwarded, ServerMessage, encode_message_bytes, replace_key, server_message_type
from .protocol import CloseCode, SyncRequest
from .session_core import (
    RESET_REASON,
    Batch,
    Broadcast,
    Close,
    ConvergenceStats,
    Effect,
    Emptied,
    JoinRefused,
    PingAfterLoad,
    QueueCursor,
    Refuse,
    Restored,
    Send,
    SessionCore,
    WantCommit,
    WantCorrections,
    WantSnapshot,
)
from .store import AdminRequest, LeaseChange, LeaseLost, OutcomeUnknown, SessionElsewhere, SessionReset, Store, StoreError
from .store.database import item_pieces, items_json
from .wire import WireStream, text_frame

log = logging.getLogger(__name__)

# Why a node closes the members of a session another node took over, or that
# it hands over (postgres store).
MOVED = "session moved; reconnect"

# Server-side closes after which a member's held messages are still taken in:
# a graceful stop (1001) and a session moving to another node (1012), not a
# reset by an administrator (1001 too: its changes would go to what was deleted).
HAND_OVER_HELD_ON = frozenset({CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART})


def _served_elsewhere(exc: SessionElsewhere) -> JoinRefused:
    """The refusal of a join of a session another live node serves: retry (1013)."""
    return JoinRefused(CloseCode.TRY_AGAIN_LATER, f"session is served by {exc.owner}; retry")


@attrs.define(eq=False)
class RestoreTicket:
    """The outcome of one restore handed to a session's core (Restored)."""

    done: trio.Event = attrs.field(factory=trio.Event)
    seq: int | None = None
    error: str | None = None


@attrs.define(eq=False)
class Session:
    """One live session: runs its core, its committer and its connections."""

    session_id: str
    config: ServerConfig
    store: Store
    # Called once the session takes no more joins, and once run() is over.
    on_closed: Callable[[Session], None] = lambda session: None
    on_finished: Callable[[Session], None] = lambda session: None
    # The server's counters (metrics.py), shared with the core and the connections.
    counters: Counters = attrs.field(factory=Counters)
    core: SessionCore | None = None
    # Set when the document is loaded and the nursery is open (or loading failed).
    ready: trio.Event = attrs.field(factory=trio.Event)
    load_failed: bool = False
    # Why it failed, for the joins that waited for it (SessionElsewhere: 1013).
    load_error: BaseException | None = None
    # Set when every change handed to the store has its outcome: a successor
    # may load the document from the store from then on.
    drained: trio.Event = attrs.field(factory=trio.Event)
    # Set when run() has returned: every connection task of the session is done.
    finished: trio.Event = attrs.field(factory=trio.Event)
    _emptied: trio.Event = attrs.field(factory=trio.Event)
    _nursery: trio.Nursery | None = None
    _commit_wanted: trio.Event = attrs.field(factory=trio.Event)
    # Set when the core may have a new correction due (WantCorrections), or closed.
    _corrections_wanted: trio.Event = attrs.field(factory=trio.Event)
    # Set whenever a batch is done: readers waiting for room look again.
    _room: trio.Event = attrs.field(factory=trio.Event)
    _effects: deque[Effect] = attrs.field(factory=deque)
    _executing: bool = False
    # close_all() called while the document was still loading.
    _close_requested: tuple[int, str] | None = None
    # The last message sent to one member, and its frame: the same answer to
    # many (sync requests at one version) is framed once.
    _last_sent: Any = None
    _last_frame: bytes = b""
    # Set once a bug closed the session: a second failure only logs.
    _closing_for_error: bool = False
    # Members written to while effects run; flushed when they are done.
    _corked: list[Connection] = attrs.field(factory=list)
    # Frames no later message replaces, per member, gathered while effects
    # run and handed over in one call each (a batch of 400 relays costs each
    # member one call, not 400); and the members some of them count for in
    # the queue budget (anything but join/leave notices).
    _gathered: dict[Connection, list[bytes]] = attrs.field(factory=dict)
    _gathered_count: set[Connection] = attrs.field(factory=set)
    # A message is being received (frame_received): a commit it wants is
    # made once the read it came in is handed over (input_done), at once in
    # the receiving task if it can (_commit_at_once).
    _receiving: bool = False
    _commit_deferred: bool = False
    # The committer waits for work; and a batch taken for a commit at once
    # that the store could not make without awaiting (the committer's next).
    _committer_idle: bool = False
    _handoff: Batch | None = None

    @property
    def document(self) -> SessionDocument:
        """The session's document (only changes the store has)."""
        assert self.core is not None
        return self.core.document

    @property
    def members(self) -> dict[str, Connection]:
        """The members' connections by user id, in join order."""
        if self.core is None:
            return {}
        return {uid: self.core.connection_of(uid) for uid in self.core.member_ids()}  # type: ignore[misc]

    @property
    def closing(self) -> bool:
        """True once the session takes no more joins."""
        return self.core is not None and self.core.closed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the document, then hold the connections' tasks until the last one ends."""
        # Spawned by the first joiner's task: its lines (and its tasks') are the session's, no user's.
        logs.bind(session=self.session_id, user=None)
        try:
            try:
                document = await self.store.load(self.session_id)
            except BaseException as exc:
                self.load_failed = True
                self.load_error = exc
                raise
            finally:
                self.ready.set()
            self.core = SessionCore(
                self.session_id,
                document,
                max_users=self.config.max_users_per_session,
                heartbeat_interval=self.config.heartbeat_interval,
                max_batch_ops=self.config.max_batch_ops,
                # What one commit sends a member fits in half its queue budget.
                max_batch_bytes=max(1, self.config.max_queue_bytes // 2),
                snapshot_bytes=self.config.snapshot_bytes,
                history_bytes=self.config.history_bytes,
                max_document_size=self.config.max_document_size,
                max_message_size=self.config.max_message_size,
                # trio.current_time(), one call instead of three (it asks the run's clock).
                now=trio.lowlevel.current_clock().current_time,
                corrections_enabled=self.config.corrections,
                correction_window=self.config.correction_window,
                correction_settle=self.config.correction_settle,
                counters=self.counters,
            )
            if self._close_requested is not None:
                self.close_all(*self._close_requested)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._guarded, self._committer, name=f"committer({self.session_id})")
                nursery.start_soon(self._guarded, self._correcter, name=f"corrections({self.session_id})")
                task_status.started()
                await self._emptied.wait()
            snapshot = self.core.snapshot_due()
            if snapshot is not None:
                await self._guarded(self._save_snapshot, snapshot)
            stats = self.core.stats
            if stats.corrections or stats.merges or stats.refusals:
                log.info(
                    "Session %s: %d correction(s), %d merged update(s), %d change(s) of removed items refused",
                    self.session_id,
                    stats.corrections,
                    stats.merges,
                    stats.refusals,
                )
            log.debug("Session %s unloaded", self.session_id)
        finally:
            self.drained.set()
            self.on_finished(self)
            self.finished.set()

    # -- membership ----------------------------------------------------------

    def try_join(
        self,
        ws: WebSocketConnection,
        wire: WireStream,
        user_id: str,
        *,
        remote: str = "?",
        can_write: bool = True,
        resume: SyncRequest | None = None,
    ) -> Connection | None:
        """A connection for this member, its tasks started; None if the session
        closed meanwhile (the caller loads a successor).

        Raises:
            JoinRefused: the session is full.
        """
        if self.core is None or self._nursery is None or self.core.closed:
            return None
        conn = Connection(
            ws, wire, user_id, self.config, self, remote=remote, can_write=can_write, counters=self.counters
        )
        previous = self.core.connection_of(user_id)
        reconnect = previous is not None
        if previous is not None:
            # Before the new connection takes its place: the old one's held
            # messages (the end of a drag) are still its user's.
            previous.hand_over_held()  # type: ignore[attr-defined]
            if self.core.closed:
                return None  # (a bug in them closed the session)
        try:
            effects = self.core.join(
                conn, user_id, connected_at=conn.connected_at, can_write=can_write, resume=resume
            )
        except BaseException as exc:
            conn.abandon()
            if isinstance(exc, JoinRefused) and exc.code != CloseCode.SESSION_FULL:
                return None
            raise
        self._nursery.start_soon(conn.run, name=f"connection({user_id})")
        if reconnect:
            log.info(
                "User %s reconnected to session %s; previous connection replaced",
                user_id,
                self.session_id,
            )
        else:
            log.info("User %s joined session %s", user_id, self.session_id)
        self._execute(effects)
        # Frames that came before the join count now: a flood closes a member.
        conn.claim_frames()
        return conn

    async def restore(self, items: list[dict[str, Any]], version: int) -> int:
        """Make these items (stored version `version`) the document, as a new
        op every member receives; the op's seq.

        Raises:
            StoreError: the session closed first, the store refused it, or no
                outcome within the commit timeout.
        """
        if self.core is None or self.core.closed:
            raise StoreError(f"session {self.session_id!r} closed before the restore")
        ticket = RestoreTicket()
        self._execute(self.core.restore(items, version, ticket))
        # Each commit has its own deadline (commit_timeout), but the restore
        # may wait behind several batches: a fixed deadline here reported a
        # restore that was carried out later as failed. The ticket is
        # answered when its batch is; if the session stops committing first
        # (a bug, an unknown outcome), `drained` says so.
        async with trio.open_nursery() as nursery:

            async def wait(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait, ticket.done)
            nursery.start_soon(wait, self.drained)
        if not ticket.done.is_set():
            raise StoreError(f"session {self.session_id!r} did not carry out the restore")
        if ticket.error is not None:
            raise StoreError(ticket.error)
        assert ticket.seq is not None
        return ticket.seq

    def close_all(self, code: int, reason: str) -> None:
        """Close every member with the same code, without a leave notice storm."""
        if self.core is None:
            self._close_requested = (code, reason)
        else:
            self._execute(self.core.close_all(code, reason))

    # -- ConnectionOwner -----------------------------------------------------

    def frame_received(self, conn: Connection, frame: str | bytes, arrived: float | None = None) -> None:
        assert self.core is not None
        self._receiving = True
        try:
            self._execute(self.core.receive(conn, conn.user_id, frame, arrived))
        finally:
            self._receiving = False

    def input_done(self, conn: Connection) -> None:
        # Everything one read brought is in the core: one transaction for all
        # of it (a burst of changes is one batch, not one commit each).
        if self._commit_deferred:
            self._commit_deferred = False
            try:
                done = self._committer_idle and self._commit_at_once()
            except Exception:
                self._failed("committing")
                return
            if not done:
                self._commit_wanted.set()

    def cursor_due(self, conn: Connection, message: Forwarded) -> None:
        self._execute([Broadcast(message, exclude=conn.user_id)])

    def pong_received(self, conn: Connection) -> None:
        if self.core is not None:
            self.core.pong_received(conn, conn.user_id)

    def connection_closed(self, conn: Connection) -> None:
        assert self.core is not None
        if not self.core.is_member(conn, conn.user_id):
            return
        log.info(
            "User %s left session %s (%s, close code %s)",
            conn.user_id,
            self.session_id,
            conn.leave_reason(),
            conn.close_code,
            extra={"user": conn.user_id},  # maybe in another member's task (a broadcast closed it)
        )
        host = self.core.host
        try:
            effects = self.core.leave(conn, conn.user_id, conn.leave_reason())
        except Exception:
            self._failed("a member leaving")
            return
        if self.core.host not in (host, None) and not self.core.closed:
            log.info(
                "User %s is now host of session %s", self.core.host, self.session_id, extra={"user": self.core.host}
            )
        self._execute(effects)

    def has_room(self) -> bool:
        assert self.core is not None
        return self.core.pending_bytes < self.config.max_pending_bytes

    async def wait_for_room(self) -> bool:
        assert self.core is not None
        waited = False
        while not self.has_room():
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
            waited = True
        return waited

    # -- effects -------------------------------------------------------------

    def _execute(self, effects: list[Effect]) -> None:
        """Carry out effects in order; effects raised meanwhile queue behind them.

        The error boundary of everything the session does synchronously: an
        effect that fails is logged and the session's members are closed with
        1011; the effects queued behind it still run.
        """
        self._effects.extend(effects)
        if self._executing:
            return
        self._executing = True
        try:
            while self._effects:
                effect = self._effects.popleft()
                try:
                    self._carry_out(effect)
                except Exception:
                    self._failed("carrying out %s" % type(effect).__name__)
        finally:
            self._executing = False
            if self._gathered:
                for conn in list(self._gathered):
                    try:
                        self._hand_over(conn)
                    except Exception:
                        self._failed("writing to %s" % conn.user_id)
            if self._corked:
                # Everything these effects sent a member goes out in one write.
                corked, self._corked = self._corked, []
                for conn in corked:
                    try:
                        conn.flush()
                    except Exception:
                        self._failed("writing to %s" % conn.user_id)

    def _failed(self, doing: str) -> None:
        """Log the exception being handled once, then close the session (1011)."""
        log.exception(
            "Internal error in session %s (%s); closing its connections with 1011",
            self.session_id,
            doing,
        )
        if self.core is not None and not self._closing_for_error:
            self._closing_for_error = True
            self._execute(self.core.close_all(CloseCode.INTERNAL_ERROR, "internal server error; reconnect"))

    def _hand_over(self, conn: Connection) -> None:
        """Queue what was gathered for `conn` now: something else for it comes next."""
        frames = self._gathered.pop(conn, None)
        if frames is not None:
            counts = conn in self._gathered_count
            self._gathered_count.discard(conn)
            conn.send_frames(frames, counts=counts, cork=self._corked)

    def _carry_out(self, effect: Effect) -> None:
        assert self.core is not None
        gathered = self._gathered
        if isinstance(effect, Send):
            message = effect.message
            if message is not self._last_sent:
                self._last_sent, self._last_frame = message, _frame(message)
            self.counters.count_sent(server_message_type(message))
            conn, key = effect.conn, replace_key(message)
            if key is None and not self._effects and not gathered and not self._corked:
                # The last effect, and nothing gathered (a change's ack): written at once.
                conn.send_frame(self._last_frame)  # type: ignore[attr-defined]
            elif key is None:
                gathered.setdefault(conn, []).append(self._last_frame)  # type: ignore[arg-type]
                self._gathered_count.add(conn)  # type: ignore[arg-type]
            else:
                self._hand_over(conn)  # type: ignore[arg-type]
                conn.send_frame(self._last_frame, key, cork=self._corked)  # type: ignore[attr-defined]
        elif isinstance(effect, Broadcast):
            recipients = self.core.connections(exclude=effect.exclude)
            if recipients:
                # Encoded and framed once: every member gets the same bytes.
                message = effect.message
                self.counters.count_sent(server_message_type(message), len(recipients))
                frame, key = _frame(message), replace_key(message)
                notice = isinstance(message, NOTICES)
                if key is None and not self._effects and not gathered and not self._corked:
                    # The last effect, and nothing gathered for anyone: nothing
                    # else goes to these members now, so each gets it written at
                    # once (the first before the others are looked at).
                    for conn in recipients:
                        try:
                            conn.send_frame(frame, notice=notice)  # type: ignore[attr-defined]
                        except Exception:
                            self._failed("writing to %s" % conn.user_id)
                elif key is None:
                    for conn in recipients:
                        gathered.setdefault(conn, []).append(frame)  # type: ignore[arg-type]
                    if not notice:
                        self._gathered_count.update(recipients)  # type: ignore[arg-type]
                else:
                    corked = self._corked
                    for conn in recipients:
                        self._hand_over(conn)  # type: ignore[arg-type]
                        conn.send_frame(frame, key, notice=notice, cork=corked)  # type: ignore[attr-defined]
        elif isinstance(effect, Close):
            if effect.code in HAND_OVER_HELD_ON and effect.reason != RESET_REASON:
                # Closed through no fault of its client: what it sent and is
                # held (the end of a drag) is taken in first, as on its own close.
                effect.conn.hand_over_held()  # type: ignore[attr-defined]
            self._hand_over(effect.conn)  # type: ignore[arg-type]
            effect.conn.close(effect.code, effect.reason)  # type: ignore[attr-defined]
        elif isinstance(effect, QueueCursor):
            effect.conn.queue_cursor(effect.message)  # type: ignore[attr-defined]
        elif isinstance(effect, Refuse):
            self._hand_over(effect.conn)  # type: ignore[arg-type]
            effect.conn.refuse_forbidden(effect.ref)  # type: ignore[attr-defined]
        elif isinstance(effect, WantCommit):
            if self._receiving:
                self._commit_deferred = True  # input_done commits it, or wakes the committer
            else:
                self._commit_wanted.set()
        elif isinstance(effect, WantCorrections):
            self._corrections_wanted.set()
        elif isinstance(effect, PingAfterLoad):  # (after the commoner ones: a check less per change)
            self._hand_over(effect.conn)  # type: ignore[arg-type]
            effect.conn.send_ping(self._corked)  # type: ignore[attr-defined]
        elif isinstance(effect, WantSnapshot):
            # In the background: commits go on while the snapshot is written.
            assert self._nursery is not None
            self._nursery.start_soon(self._guarded, self._save_snapshot, effect.snapshot)
        elif isinstance(effect, Restored):
            ticket = effect.ticket
            ticket.seq, ticket.error = effect.seq, effect.error
            ticket.done.set()
            if effect.seq is not None:
                log.info("Session %s: a stored version was restored as op %d", self.session_id, effect.seq)
        elif isinstance(effect, Emptied):
            if effect.last_user_left:
                # In the task of whoever left last: the line is the session's, not theirs.
                log.info("Session %s closed: its last user left", self.session_id, extra={"user": None})
            self.on_closed(self)
            self._emptied.set()
            self._commit_wanted.set()  # let the committer finish and stop
            self._corrections_wanted.set()  # and the correcter
        else:
            raise AssertionError(f"unknown effect {effect!r}")

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """The error boundary of the session's own tasks: a bug closes the session."""
        try:
            await fn(*args)
        except Exception:
            self._failed(getattr(fn, "__name__", "a task").lstrip("_"))

    # -- corrections ---------------------------------------------------------

    async def _correcter(self) -> None:
        """Send the corrections the core has due, when they are due."""
        assert self.core is not None
        while not self.core.closed:
            due = self.core.next_correction_due()
            if due is not None and due <= trio.current_time():
                self._execute(self.core.corrections())
                continue
            with trio.move_on_at(math.inf if due is None else due):
                await self._corrections_wanted.wait()
            self._corrections_wanted = trio.Event()

    # -- commits -------------------------------------------------------------

    async def _committer(self) -> None:
        """Commit pending changes in batches; only then do the others hear of them."""
        assert self.core is not None
        try:
            while True:
                batch, self._handoff = self._handoff, None
                if batch is None:
                    batch = self.core.take_batch()
                if batch is None:
                    if self.core.closed:
                        return
                    self._committer_idle = True
                    try:
                        await self._commit_wanted.wait()
                    finally:
                        self._committer_idle = False
                    self._commit_wanted = trio.Event()
                    continue
                effects = await self._commit(batch) if batch.ops else self.core.committed(batch)
                self._room.set()
                self._execute(effects)
        finally:
            self.drained.set()

    def _commit_at_once(self) -> bool:
        """Commit what a message just queued in the receiving task, while the
        committer is idle: one task switch and event-loop pass less per
        change when changes come one at a time. False if the store can't
        commit without awaiting (the committer gets the batch then).

        Only a store's cheap commit runs here (SQLiteStore: small, after a
        pause in commits, nothing else in flight; see commit_now), so the
        receiving task holds the loop no longer than it would for the fan-out.
        """
        assert self.core is not None
        batch = self.core.take_batch()
        if batch is None:
            return True
        if batch.ops:
            now = self.core.now
            started = now()
            try:
                done = self.store.commit_now(self.session_id, batch.epoch, list(batch.ops), batch.replaced)
            except StoreError as exc:
                effects = self._commit_error(batch, exc)
            else:
                if not done:
                    self._handoff = batch
                    return False
                self.counters.commit_succeeded(len(batch.ops), now() - started)
                effects = self._committed(batch)
        else:
            effects = self.core.committed(batch)
        self._room.set()
        self._execute(effects)
        return True

    def _committed(self, batch: Batch) -> list[Effect]:
        """The store has the batch: a batch of one change is relayed now
        (core.relays_first), then the core's effects of it."""
        assert self.core is not None
        relays = self.core.relays_first(batch)
        if relays:
            self._execute(relays)
        return self.core.committed(batch)

    async def _commit(self, batch: Batch) -> list[Effect]:
        assert self.core is not None
        # Shielded: once handed to the store the ops may be committed, so we
        # must learn the outcome or the document would fall behind. Bounded:
        # a store that doesn't answer must not hold the session for ever.
        with trio.CancelScope(shield=True) as scope:
            started = trio.current_time()
            scope.deadline = started + self.config.commit_timeout
            try:
                await self.store.commit(self.session_id, batch.epoch, list(batch.ops), batch.replaced)
            except StoreError as exc:
                return self._commit_error(batch, exc)
            self.counters.commit_succeeded(len(batch.ops), trio.current_time() - started)
            return self._committed(batch)
        log.error(
            "The store did not answer a commit of session %s within %g s; closing it",
            self.session_id,
            self.config.commit_timeout,
        )
        self.counters.commit_failed("the store did not answer a commit in time", trio.current_time())
        return self._outcome_unknown()

    def _commit_error(self, batch: Batch, exc: StoreError) -> list[Effect]:
        """The effects of a commit the store refused or lost track of."""
        assert self.core is not None
        if isinstance(exc, LeaseLost):
            # Another node serves the session now: this one never commits
            # for it again (the store refuses); its members reconnect there.
            log.warning("Session %s: %s; closing it", self.session_id, exc)
            return self.core.commit_failed(batch, error=str(exc)) + self.core.close_all(
                CloseCode.SERVICE_RESTART, MOVED
            )
        if not isinstance(exc, SessionReset):  # a reset is an administrator's doing, not a failure
            self.counters.commit_failed(str(exc), trio.current_time())
        if isinstance(exc, OutcomeUnknown):
            log.error("Session %s: %s; closing it", self.session_id, exc)
            return self._outcome_unknown()
        if isinstance(exc, SessionReset):
            log.warning("Session %s was reset by an administrator: %s", self.session_id, exc)
            return self.core.commit_failed(batch, reset=True, error=str(exc))
        log.error(
            "Could not store %d change(s) in session %s: %s", len(batch.ops), self.session_id, exc
        )
        return self.core.commit_failed(batch, error=str(exc))

    def _outcome_unknown(self) -> list[Effect]:
        # Nobody can know what is stored: everyone reconnects and loads it afresh.
        assert self.core is not None
        return self.core.close_all(CloseCode.INTERNAL_ERROR, "storage not answering; reconnect")

    async def _save_snapshot(self, snapshot: dict[str, Any]) -> None:
        assert self.core is not None
        saved: dict[str, Any] | None = None
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.config.commit_timeout
                if self.store.snapshot_text:
                    snapshot = await _encoded(snapshot)
                await self.store.save_snapshot(self.session_id, snapshot)
                saved = snapshot
            if scope.cancelled_caught:
                log.warning("No answer to a snapshot of session %s in time", self.session_id)
        except StoreError as exc:
            log.warning("Could not save a snapshot of session %s: %s", self.session_id, exc)
        finally:
            self.core.snapshot_saved(saved)


# Bytes of a snapshot's items encoded between two yields to the event loop.
SNAPSHOT_STEP_BYTES = 32 * 1024


async def _encoded(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot with its items as text, encoded here a piece at a time.

    The store's writer thread encoded them in one go, holding the GIL: ~5 ms
    for 3,600 items, every session's event loop stopped, and the commits
    queued behind the transaction. Here each piece is ~32 KiB (~0.1 ms)
    and the other tasks run in between; the items are the document's own
    (never changed in place), so they stay those of the snapshot's version.
    """
    pieces = []
    for piece in item_pieces(snapshot["items"], SNAPSHOT_STEP_BYTES):
        pieces.append(piece)
        await trio.lowlevel.checkpoint()
    encoded = {key: value for key, value in snapshot.items() if key != "items"}
    text = items_json(pieces)
    encoded["text"] = text.decode("utf-8")
    # What the store's queue counts it as (snapshot_cost): bytes, not characters.
    encoded["text_bytes"] = len(text)
    return encoded


def _frame(message: ServerMessage) -> bytes:
    return text_frame(encode_message_bytes(message))


@attrs.define(eq=False)
class SessionRegistry:
    """The live sessions of one server, by id; owns the nursery they run in."""

    config: ServerConfig
    store: Store
    sessions: dict[str, Session] = attrs.field(factory=dict)
    # Closed sessions whose last changes are still being committed, by id.
    draining: dict[str, Session] = attrs.field(factory=dict)
    closing: bool = False
    # What sessions that have finished did to keep clients converged.
    finished_stats: ConvergenceStats = attrs.field(factory=ConvergenceStats)
    # The server's counters (metrics.py), handed to every session.
    counters: Counters = attrs.field(factory=Counters)
    _nursery: trio.Nursery | None = None
    _closed: trio.Event = attrs.field(factory=trio.Event)
    # Sessions being restored in the store while not live: joins wait.
    _restoring: dict[str, trio.Event] = attrs.field(factory=dict)

    def _session_lost(self, session_id: str, epoch: str, why: str) -> None:
        """The store found, storing a change it had acknowledged already
        (SQLiteStore's pending log), that an administrator deleted or
        replaced the session meanwhile ("reset"), or that the database
        can't take the change ("refused"): the members saw it, so they
        reconnect to what is stored."""
        session = self.sessions.get(session_id)
        if session is None or session.core is None or session.core.document.epoch != epoch:
            return
        if why == "reset":
            log.warning("Session %s was reset by an administrator", session_id)
            session.close_all(CloseCode.GOING_AWAY, RESET_REASON)
        else:
            session.close_all(CloseCode.INTERNAL_ERROR, "a change could not be stored; reconnect")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the sessions' nursery (and the admin requests task); returns
        after close_all() once every session ended."""
        self.store.on_session_lost = self._session_lost
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            requests = trio.CancelScope()
            nursery.start_soon(self._serve_requests, requests, name="admin requests")
            leases = trio.CancelScope()
            nursery.start_soon(self._follow_leases, leases, name="leases")
            task_status.started()
            await self._closed.wait()
            requests.cancel()
            leases.cancel()

    async def _serve_requests(self, scope: trio.CancelScope) -> None:
        """Carry out what admin commands beside this server ask for (the
        store says when: SQLiteStore looks once a second), each in its own task."""
        with scope:
            while True:
                try:
                    requests = await self.store.next_requests()
                except StoreError as exc:
                    log.debug("No more admin requests: %s", exc)
                    return
                assert self._nursery is not None
                for request in requests:
                    self._nursery.start_soon(self._carry_out_request, request, name=f"restore({request.session_id})")

    async def _follow_leases(self, scope: trio.CancelScope) -> None:
        """Stop serving the sessions the store says this node must give up
        (postgres store): a lost lease at once (nothing more can be
        committed), a handoff after the pending commits; either way the
        members reconnect (1012) and land on the node that serves it."""
        with scope:
            while True:
                for change in await self.store.lease_changes():
                    self._move_away(change)

    def _move_away(self, change: LeaseChange) -> None:
        session = self.sessions.get(change.session_id)
        if session is None:
            return
        log.info("Session %s moves to another node (lease %s)", change.session_id, change.kind)
        session.close_all(CloseCode.SERVICE_RESTART, MOVED)
        self.discard(session)

    async def _carry_out_request(self, request: AdminRequest) -> None:
        """One admin request, its outcome recorded for the command that waits."""
        seq: int | None = None
        error: str | None = None
        try:
            if request.action != "restore":
                raise StoreError(f"unknown request {request.action!r}")
            seq = await self.restore(request.session_id, request.version)
        except StoreError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - the boundary of one request: logged, reported
            log.exception("Admin request %d failed", request.id)
            error = f"internal error: {type(exc).__name__}: {exc}"
        if error is None:
            log.info("Restored version %d of session %s (op %s)", request.version, request.session_id, seq)
        else:
            log.warning("Could not restore version %d of session %s: %s", request.version, request.session_id, error)
        try:
            await self.store.finish_request(request, seq=seq, error=error)
        except StoreError as exc:
            log.warning("Could not record the outcome of admin request %d: %s", request.id, exc)

    async def restore(self, session_id: str, version: int) -> int:
        """Make a stored version the session's document, as a new op; its seq.

        A live session restores through its core (its members receive the
        document); otherwise the store does it in one transaction while
        joins of that session wait.

        Raises:
            StoreError: unknown session or version, the server is stopping,
                or the change was not stored.
        """
        while True:
            if self.closing:
                raise StoreError("the server is shutting down")
            if await self._wait_for_predecessor(session_id):
                continue
            session = self.sessions.get(session_id)
            if session is None:
                done = self._restoring[session_id] = trio.Event()
                try:
                    return await self.store.restore(session_id, version)
                finally:
                    del self._restoring[session_id]
                    done.set()
            await session.ready.wait()
            if session.load_failed or session.closing:
                await trio.lowlevel.checkpoint()
                if session.closing:
                    await session.drained.wait()
                continue
            items = await self.store.version_items(session_id, version)
            if self.sessions.get(session_id) is not session or session.closing:
                continue  # it closed while the version was read
            return await session.restore(items, version)

    async def _wait_for_predecessor(self, session_id: str) -> bool:
        """Wait out what must end before `session_id` loads: a restore in the
        store (load after it), or, with no live session, the drain of its
        previous instance (its last changes are still being stored: load after
        them). True if it waited: look again."""
        restoring = self._restoring.get(session_id)
        if restoring is not None:
            await restoring.wait()
            return True
        if session_id not in self.sessions:
            predecessor = self.draining.get(session_id)
            if predecessor is not None:
                await predecessor.drained.wait()
                if self.draining.get(session_id) is predecessor:
                    del self.draining[session_id]
                return True
        return False

    async def join(
        self,
        session_id: str,
        ws: WebSocketConnection,
        wire: WireStream,
        user_id: str,
        *,
        remote: str = "?",
        can_write: bool = True,
        resume: SyncRequest | None = None,
    ) -> Connection:
        """Put a client into its session, loading the session if needed.

        Raises:
            JoinRefused: the server is stopping, the session is full or
                can't load.
        """
        while True:
            if self.closing or self._nursery is None:
                raise JoinRefused(CloseCode.GOING_AWAY, "server shutting down")
            if await self._wait_for_predecessor(session_id):
                continue
            session = self.sessions.get(session_id)
            if session is None:
                session = Session(
                    session_id,
                    self.config,
                    self.store,
                    on_closed=self.discard,
                    on_finished=self.forget,
                    counters=self.counters,
                )
                self.sessions[session_id] = session
                try:
                    await self._nursery.start(self._run_session, session)
                except SessionElsewhere as exc:
                    self.discard(session)
                    raise _served_elsewhere(exc) from None
                except Exception:
                    self.discard(session)
                    log.exception("Could not load session %s", session_id)
                    raise JoinRefused(
                        CloseCode.INTERNAL_ERROR, "could not load the session"
                    ) from None
                except BaseException:
                    self.discard(session)
                    raise
            else:
                await session.ready.wait()
                if session.load_failed:
                    if isinstance(session.load_error, SessionElsewhere):
                        raise _served_elsewhere(session.load_error)
                    raise JoinRefused(CloseCode.INTERNAL_ERROR, "could not load the session")
            conn = session.try_join(ws, wire, user_id, remote=remote, can_write=can_write, resume=resume)
            if conn is not None:
                return conn
            # The session closed while we waited: its successor loads afresh.
            self.discard(session)
            await trio.lowlevel.checkpoint()

    async def _run_session(self, session: Session, *, task_status: trio.TaskStatus[None]) -> None:
        """The error boundary of one session: what escapes it is logged, not raised."""
        try:
            await session.run(task_status=task_status)
        except Exception:
            if session.load_failed:
                raise  # before started(): the joiner hears of it, and logs it
            log.exception("Session %s failed", session.session_id)
            self.discard(session)

    def discard(self, session: Session) -> None:
        """Forget a closing session; it drains its pending changes before a successor loads."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
            if not session.drained.is_set():
                self.draining[session.session_id] = session

    def forget(self, session: Session) -> None:
        """Drop a finished session from the draining list (its statistics
        stay) and give up its lease: everything it committed is answered.
        Not if a successor has loaded meanwhile (it may once this one's
        commits were drained, while this one still stored its snapshot): the
        lease is the successor's then, also once that successor closed and
        still drains its own commits (giving the lease up under them would
        have them refused)."""
        session_id = session.session_id
        if self.sessions.get(session_id) in (None, session) and self.draining.get(session_id) in (None, session):
            self.store.release(session_id)
        if session.core is not None:
            self.finished_stats.add(session.core.stats)
        if self.draining.get(session.session_id) is session:
            del self.draining[session.session_id]

    def convergence_stats(self) -> ConvergenceStats:
        """Corrections, merged updates and refused changes of removed items,
        over every session since the server started."""
        total = ConvergenceStats()
        total.add(self.finished_stats)
        for session in (*self.sessions.values(), *self.draining.values()):
            if session.core is not None:
                total.add(session.core.stats)
        return total

    def close_all(self, code: int, reason: str) -> None:
        """Stop taking joins and close every connection of every session."""
        self.closing = True
        for session in list(self.sessions.values()):
            session.close_all(code, reason)
        self._closed.set()

    def connection_count(self) -> int:
        """Members of all live sessions."""
        return sum(len(s.members) for s in self.sessions.values())
