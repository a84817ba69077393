"""One client's tasks: reader, writer and cursor pump, under the connection's own nursery.

    Connection.run()       in its session's nursery
     ├─ reader             websocket -> owner.frame_received(), within the idle deadline
     │                     (most messages arrive in trio-websocket's reader task instead,
     │                     taken out of the byte stream by the wire: see inbound.py)
     ├─ writer             the client's byte queue (wire.py) -> socket, then the close handshake
     └─ cursor             the latest cursor of this user, at most `cursor_rate` a second

A connection knows nothing of sessions: it is given an owner (anything with
the `ConnectionOwner` methods) when it is built. Fan-out never awaits: the
owner hands it framed bytes with `send_frame()`, which go straight to the
socket when nothing is queued, else into the client's queue, where a later
cursor, move of the same item or sync:state replaces a waiting one. Only a
client whose queue holds more than `max_queue_bytes` that nothing can
replace, or whose socket takes no bytes for `write_timeout` seconds, is
closed with 1013 (at once beyond twice that, else after a second over
it); nobody else waits for it.

Every incoming frame (pings and continuation frames too) takes a token from
the rate limit; a message split into more than `max_fragments` frames
closes the connection with 1009.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Hashable
from typing import Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .config import ServerConfig
from .counters import Counters
from .limits import ALL, HOLD, HeldChanges, Strikes, TokenBucket, classify
from .messages import Error, Forwarded, ServerMessage, encode_message_bytes, server_message_type
from .protocol import CloseCode, ErrorCode, utc_timestamp
from .inbound import CLOSE, CONTINUATION, PING, PONG, Event
from .wire import PING_FRAME, WireStream, WriteTimeout, text_frame

log = logging.getLogger(__name__)

# Seconds over which refusals are counted before a connection is closed.
STRIKE_WINDOW = 10.0
# Messages over the rate limit that may be held (a drag thinned to the rate):
# up to this many times the rate (and burst); past it they are dropped and
# count toward 4002 like any other (each one held is parsed first).
SHED_FACTOR = 25

# Seconds a client may stay over its queue budget (up to twice it) before 1013.
OVER_BUDGET_GRACE = 1.0

# The close code of a connection that ended without a close frame (RFC 6455).
ABNORMAL_CLOSURE = 1006

# user:left `reason` for each way a connection can end.
LEAVE_REASONS = {
    CloseCode.NORMAL: "disconnected",
    CloseCode.GOING_AWAY: "disconnected",
    CloseCode.MESSAGE_TOO_BIG: "message_too_big",
    CloseCode.INTERNAL_ERROR: "internal_error",
    CloseCode.TOO_SLOW: "too_slow",
    CloseCode.IDLE_TIMEOUT: "idle_timeout",
    CloseCode.RATE_LIMITED: "rate_limited",
    CloseCode.FORBIDDEN: "forbidden",
}


class ConnectionOwner(Protocol):
    """What a connection calls; the session implements it. None of these await
    except wait_for_room()."""

    def frame_received(self, conn: Connection, frame: str | bytes, arrived: float | None = None) -> None:
        """A frame arrived (within the rate limit)."""

    def input_done(self, conn: Connection) -> None:
        """Every message of one read was handed over: what they changed may be
        committed now, in one transaction."""

    def cursor_due(self, conn: Connection, message: Forwarded) -> None:
        """The cursor pump lets this cursor through now."""

    def pong_received(self, conn: Connection) -> None:
        """The client answered a ping (in the order of what it was sent)."""

    def connection_closed(self, conn: Connection) -> None:
        """close() ran: the connection reads and queues nothing more."""

    def has_room(self) -> bool:
        """The owner can take another frame now (wait_for_room would not wait)."""

    async def wait_for_room(self) -> bool | None:
        """Return when the owner can take another frame (back-pressure);
        true if that meant waiting."""


@attrs.define(eq=False)
class Connection:
    """A joined client: its websocket, its byte queue and the state of its close."""

    ws: WebSocketConnection
    wire: WireStream
    user_id: str
    config: ServerConfig
    owner: ConnectionOwner
    remote: str = "?"
    # False for a token with the viewer role: it may watch but not edit.
    can_write: bool = True
    connected_at: str = attrs.field(factory=utc_timestamp)
    # The server's counters (metrics.py): slow clients, rate limit, errors sent.
    counters: Counters = attrs.field(factory=Counters)
    # Set by close(): what the server sends (or the client sent) in the close frame.
    close_code: int | None = None
    close_reason: str | None = None
    # Set when run() has returned: reader, writer and cursor pump are done.
    finished: trio.Event = attrs.field(factory=trio.Event)
    _reader_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _writer_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _cursor_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    # Set by close(): the writer writes what is left, then closes.
    _flushed: trio.Event = attrs.field(factory=trio.Event)
    _pending_cursor: Forwarded | None = None
    _cursor_ready: trio.Event = attrs.field(factory=trio.Event)
    _bucket: TokenBucket = attrs.field(init=False)
    _rate_strikes: Strikes = attrs.field(init=False)
    _forbidden_strikes: Strikes = attrs.field(init=False)
    _last_rate_error: float = -math.inf
    # Frames of the data message arriving now, and whether all got a token.
    _fragments: int = 0
    _message_allowed: bool = True
    # One verdict per complete incoming message, in order: within the rate?
    _verdicts: deque[bool] = attrs.field(factory=deque)
    # Messages over the rate that a later one may make obsolete (limits.py),
    # delivered as the rate allows from _release_at on; and the reader's
    # current wait, cut short for that.
    _held: HeldChanges = attrs.field(factory=HeldChanges)
    # Messages held over the rate, counted: past SHED_FACTOR times the rate
    # they count as dropped (each one is parsed to be held).
    _shed: TokenBucket = attrs.field(init=False)
    _release_at: float = math.inf
    _read_scope: trio.CancelScope | None = None
    # In its session's cork list (send_frame); and whether what waits there
    # counts toward the budget (anything but notices).
    _in_cork: bool = False
    _cork_counts: bool = False
    # Bytes of notices corked since: not counted at the flush's budget check
    # (a 1013 close's user:left, corked for a member whose flush comes after
    # it, must not be what tips that member over).
    _cork_notices: int = 0
    # When the backlog went over max_queue_bytes (None: within it).
    _over_budget_since: float | None = None
    _drains_then: int = 0
    # When the client was last heard from (the idle deadline counts from it),
    # and the waits for the owner's room under way (they are not silence).
    _heard: float = attrs.field(factory=trio.current_time)
    _waiting_room: int = 0
    # The wire's wait for room before it reads more (close() cancels it).
    _read_wait: trio.CancelScope | None = None
    # Pongs whose header came ahead of data messages the client sent before
    # them and trio-websocket still holds: reported once those are read
    # (`wire.consumed` reaches each), so a change sent before a pong is
    # never taken for one made after it.
    _pongs_due: deque[int] = attrs.field(factory=deque)
    # Pings sent (send_ping) not yet answered: their pongs take no token.
    _pings_out: int = 0

    def __attrs_post_init__(self) -> None:
        self._bucket = TokenBucket(self.config.rate_limit, self.config.rate_burst)
        self._shed = TokenBucket(SHED_FACTOR * self.config.rate_limit, SHED_FACTOR * self.config.rate_burst)
        self._rate_strikes = Strikes(self.config.rate_strikes, STRIKE_WINDOW)
        self._forbidden_strikes = Strikes(self.config.forbidden_strikes, STRIKE_WINDOW)
        self.wire.write_timeout = self.config.write_timeout
        # From now on the session's writes queue for this connection's writer.
        self.wire.attach()

    def claim_frames(self) -> None:
        """Count incoming frames from now on, those seen since the upgrade first.

        Called once the owner has made this connection a member: a close
        these frames cause (a flood before the join) is then a member's leave.
        """
        wire = self.wire
        earlier = wire.claim(self._frames_arrived)
        if earlier:
            self._frames_arrived(earlier)
        # From now on whole text messages come in trio-websocket's reader
        # task, through _frames_arrived, once the reader below has read what
        # trio-websocket holds: one task switch and wsproto's parse less each.
        wire.before_read = self._room_before_read
        wire.taking = self.close_code is None

    @property
    def closing(self) -> bool:
        """True once close() was called: nothing more is read or queued."""
        return self.close_code is not None

    async def run(self) -> None:
        """Read, write and pump cursors until the connection is closed."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, name=f"reader({self.user_id})")
                nursery.start_soon(self._writer, name=f"writer({self.user_id})")
                nursery.start_soon(self._cursor_pump, name=f"cursor({self.user_id})")
        finally:
            # Break the wire -> connection -> session cycle at once, so a
            # session's document is freed when it unloads, not at the next
            # full garbage collection.
            self.wire.unclaim()
            self.finished.set()

    # -- called by the owner (never awaits) ----------------------------------

    def send_frame(
        self,
        frame: bytes,
        key: Hashable | None = None,
        *,
        notice: bool = False,
        cork: list[Connection] | None = None,
    ) -> None:
        """Queue one framed message; close with 1013 if the client can't keep up.

        A queued message with the same `key` is replaced by this one. A
        `notice` (someone joined or left) never tips a client over its budget:
        a close for slowness must not cascade through the session. With
        `cork`, the frame waits for flush() (this connection joins the list):
        what one batch of changes sends a client goes out in one write, and
        the budget is checked then.
        """
        if self.close_code is not None:
            return  # closing: the message is not for this connection any more
        if key is None and cork is None and not self._in_cork:
            # The commonest case, per recipient of every relay: written at once.
            backlog = self.wire.send(frame)
            over = backlog > self.config.max_queue_bytes or self._over_budget_since is not None
            if over and not notice and backlog >= 0:
                self._check_budget()
            return
        # Corked already (by an execution whose flush is still to come): the
        # frame joins what that flush writes, whatever `cork` says.
        corked = cork is not None or self._in_cork
        if not self.wire.write(frame, key, corked=corked):
            return  # the writer is gone
        if corked:
            if not self._in_cork:
                self._in_cork = True
                cork.append(self)  # type: ignore[union-attr]
            self._cork_counts = self._cork_counts or not notice
            if notice:
                self._cork_notices += len(frame)
        elif not notice:
            self._check_budget()

    def send_frames(self, frames: list[bytes], *, counts: bool, cork: list[Connection]) -> None:
        """Queue framed messages no later one replaces, corked (see send_frame);
        `counts`: some of them count toward the budget (not only notices)."""
        if self.close_code is not None or not self.wire.write_many(frames):
            return
        if not self._in_cork:
            self._in_cork = True
            cork.append(self)
        if counts:
            self._cork_counts = True
        else:
            self._cork_notices += sum(map(len, frames))

    def flush(self) -> None:
        """Write what was corked (see send_frame), then check the budget."""
        self._in_cork = False
        counts, self._cork_counts = self._cork_counts, False
        notices, self._cork_notices = self._cork_notices, 0
        self.wire.flush()
        if counts and self.close_code is None:
            self._check_budget(notices)

    def _check_budget(self, notices: int = 0) -> None:
        """1013 for a client that stays over its budget, or goes far over it.

        A healthy client may be over for a moment (a commit's relays land
        while its socket buffer is full); one that is still over a second
        later, or holds twice the budget, is not keeping up.
        """
        wire, budget = self.wire, self.config.max_queue_bytes
        # Everything waiting, replaceable or not, is bounded too, whatever
        # the backlog: moves of ever new item ids never replace each other.
        # (Notices just corked are not what closes a client: see _cork_notices.)
        waiting = wire.waiting_bytes - notices
        if waiting > 2 * budget + self.config.max_document_size:
            self._too_slow(waiting)
            return
        backlog = max(0, wire.backlog - notices)
        if backlog <= budget:
            self._over_budget_since = None
            return
        now = trio.current_time()
        if self._over_budget_since is None or wire.drains != self._drains_then:
            # Over now; or over again after the queue was empty meanwhile.
            self._over_budget_since, self._drains_then = now, wire.drains
        if backlog > 2 * budget or now - self._over_budget_since >= OVER_BUDGET_GRACE:
            self._too_slow(backlog)

    def _too_slow(self, queued: int) -> None:
        log.warning("User %s is too slow (%d bytes queued); closing with 1013", self.user_id, queued)
        self.counters.slow_disconnects["queue_bytes"] += 1
        self.close(CloseCode.TOO_SLOW, "too slow: outbound queue overflowed", discard=True)

    def send_ping(self, cork: list[Connection]) -> None:
        """Queue a ping after everything queued (see session_core.PingAfterLoad)."""
        if self.close_code is None:
            self._pings_out += 1
        self.send_frame(PING_FRAME, notice=True, cork=cork)

    def send_message(self, message: ServerMessage) -> None:
        """Encode, frame and queue one message for this client only."""
        self.counters.count_sent(server_message_type(message))
        self.send_frame(text_frame(encode_message_bytes(message)))

    def queue_cursor(self, message: Forwarded) -> None:
        """Remember the latest cursor; the pump forwards it when the rate allows."""
        self._pending_cursor = message
        self._cursor_ready.set()

    def close(self, code: int, reason: str, *, discard: bool = False, peer_closed: bool = False) -> None:
        """Start closing: stop reading, let the writer flush then close the socket.

        With `discard`, queued messages are dropped (the client is too slow to
        take them anyway). Our close frame goes last (unless the client closed
        first: trio-websocket has answered it). Either way the writer has
        `close_timeout` seconds for what is left and the client's close frame.
        """
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = int(code), reason
        self.wire.unclaim()  # frames after this are trio-websocket's alone
        if self._read_wait is not None:
            # trio-websocket's reader must read on: the client's close frame.
            self._read_wait.cancel()
        self._reader_scope.cancel()
        self._cursor_scope.cancel()
        # A cursor that woke the pump in this same tick must not go out after
        # the user:left below (the pump's wait already returned: the cancel
        # reaches it only at its next checkpoint).
        self._pending_cursor = None
        if discard:
            self.wire.discard()
        if not peer_closed:
            self.wire.write_close(self.close_code, reason)
        self._flushed.set()
        self.wire.wake()
        self._writer_scope.deadline = min(
            self._writer_scope.deadline, trio.current_time() + self.config.close_timeout
        )
        self.owner.connection_closed(self)

    def abandon(self) -> None:
        """This connection never ran (its join was refused): release the wire."""
        self.wire.detach()

    def leave_reason(self) -> str:
        """The `reason` of the user:left notice for this connection's close."""
        if self.close_code is None:
            return "disconnected"
        return LEAVE_REASONS.get(self.close_code, "disconnected")

    def refuse_forbidden(self, ref: str) -> None:
        """A viewer tried to change the session: an error, then 4003 if it keeps trying."""
        if self._forbidden_strikes.add(trio.current_time()):
            self.close(CloseCode.FORBIDDEN, "forbidden: this token may only view")
            return
        self.send_message(Error(ErrorCode.FORBIDDEN, "your token may only view this session", ref))

    # -- incoming frames (called by the wire as bytes arrive) ----------------

    def _frames_arrived(self, events: list[Event]) -> None:
        # Runs in trio-websocket's reader task: nothing may escape into it.
        try:
            try:
                self._handle_input(events)
            finally:
                self.owner.input_done(self)
        except Exception:
            log.exception("Internal error while handling a message from %s", self.user_id)
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")

    def _handle_input(self, events: list[Event]) -> None:
        if self.close_code is not None:
            return
        now = trio.current_time()
        for event in events:
            if type(event) is str:
                # A whole message the wire took (its frame was counted just before).
                self._heard = now
                self._deliver(event, now)
                if self.close_code is not None:
                    return
                continue
            opcode, fin = event
            if opcode == CLOSE:
                continue
            allowed = self._bucket.allow(now)
            if opcode >= PING:  # ping or pong: answered by trio-websocket, counted here
                # A client's keepalive (many libraries ping on their own): not silence.
                self._heard = now
                if opcode == PONG:
                    after = self.wire.pong_after()
                    if self._pings_out:
                        # The answer to a ping of ours (send_ping): asked
                        # for, so free of the rate limit (a client dragging
                        # over the rate must not be struck for answering).
                        self._pings_out -= 1
                        if allowed:
                            self._bucket.give_back()
                        allowed = True
                        # It counts once what the client sent before it
                        # has been read (see _pongs_due).
                        if after <= self.wire.consumed and not self._pongs_due:
                            self.owner.pong_received(self)
                        else:
                            self._pongs_due.append(after)
                if not allowed:
                    self._rate_limited()
                    if self.close_code is not None:
                        return
                continue
            if opcode != CONTINUATION:
                self._fragments, self._message_allowed = 0, True
            self._fragments += 1
            self._message_allowed = self._message_allowed and allowed
            if self._fragments > self.config.max_fragments:
                log.warning(
                    "User %s split a message into more than %d frames; closing with 1009",
                    self.user_id,
                    self.config.max_fragments,
                )
                self.close(
                    CloseCode.MESSAGE_TOO_BIG,
                    f"message split into more than {self.config.max_fragments} frames",
                )
                return
            if fin:
                self._verdicts.append(self._message_allowed)
            if self.close_code is not None:
                return

    # -- tasks ---------------------------------------------------------------

    async def _reader(self) -> None:
        try:
            try:
                with self._reader_scope:
                    await self._read_loop()
            except ConnectionClosed as exc:
                self._peer_closed(exc)  # tells the owner, which may fail too
        except Exception:
            log.exception("Internal error while handling a message from %s", self.user_id)
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")

    def _deliver(self, message: str | bytes, now: float) -> None:
        """One whole message, from either path: to the owner if within the
        rate. Over it, held if a later one may make it obsolete (limits.py:
        a drag is thinned to the rate, not cut), else dropped. Behind held
        messages, a message within the rate goes after those it must follow
        (its item's, or all for a whole-document change; their tokens owed),
        and a message over it is held or dropped."""
        verdicts = self._verdicts
        allowed = verdicts.popleft() if verdicts else self._bucket.allow(now)
        held = self._held
        if allowed and not held.entries:  # (the dict itself: no call on the common path)
            self.owner.frame_received(self, message)
            return
        kind, key, fields = classify(message)
        superseded = held.superseded
        if kind == HOLD and self._shed.allow(now) and held.hold(key, fields, message, now):  # type: ignore[arg-type]
            counters = self.counters
            counters.held += 1
            counters.held_superseded += held.superseded - superseded
            if allowed:
                self._bucket.give_back()  # it waits behind the others: its token is taken then
            self._arm_release(now)
            return
        if not allowed:
            self._rate_limited()  # dropped; what is held stays
            return
        if kind == ALL:
            self._deliver_held(now)
        elif key is not None and key[0] != "cursor":
            self._deliver_held(now, item=key[1])
        self.owner.frame_received(self, message)

    def _deliver_held(self, now: float, *, item: str | None = None) -> None:
        """Deliver the held messages (of one item: those of `item`) now,
        whatever the rate: their tokens are owed, the messages after them wait."""
        for message, arrived in self._held.take(item):
            if self.close_code is not None:
                return
            self._bucket.take(now)
            self.owner.frame_received(self, message, arrived)
        if not self._held.entries:
            self._release_at = math.inf

    def _release_held(self, now: float) -> None:
        """Deliver held messages as far as the rate allows (the reader, when
        _release_at comes); none while the owner has no room (the reader
        arms the release again once it has)."""
        held = self._held
        self._release_at = math.inf
        if not self.owner.has_room():
            return
        try:
            while held.entries and self.close_code is None and self._bucket.allow(now):
                message, arrived = held.pop()
                self.owner.frame_received(self, message, arrived)
                if not self.owner.has_room():
                    return  # the reader arms the release again once there is room
        finally:
            self.owner.input_done(self)
        self._arm_release(now)

    def hand_over_held(self) -> None:
        """The client is gone or silent, or the server is about to close or
        replace this connection (a graceful stop, a session moving, a
        reconnect of the same user): what the client sent and is held counts
        (the end of a drag), delivered now, while the connection is still
        its user's."""
        if self._held.entries and self.close_code is None:
            self._deliver_held(trio.current_time())
            self.owner.input_done(self)

    def _arm_release(self, now: float) -> None:
        if not self._held.entries:
            return
        self._release_at = now + self._bucket.wait(now)
        scope = self._read_scope
        if scope is not None and scope.deadline > self._release_at:
            scope.deadline = self._release_at

    async def _wait_for_room(self) -> None:
        """The owner's back-pressure, before the wire reads more (see claim_frames)."""
        self._waiting_room += 1
        try:
            if await self.owner.wait_for_room():
                self._heard = trio.current_time()  # the wait was not silence
        finally:
            self._waiting_room -= 1

    async def _room_before_read(self) -> None:
        """_wait_for_room() for the wire (in trio-websocket's reader task),
        cut short by close()."""
        if self.close_code is not None or self.owner.has_room():
            return  # the common case: no cancel scope to set up
        scope = self._read_wait = trio.CancelScope()
        try:
            with scope:
                await self._wait_for_room()
        finally:
            self._read_wait = None

    async def _read_loop(self) -> None:
        idle_timeout = self.config.idle_timeout
        ws, wire = self.ws, self.wire
        # The idle deadline without a deadline change per message (each one
        # costs a heap update): every message moves `_heard` on, and the
        # scope is armed for `_heard + idle_timeout` only when it ends, which
        # is exact (a client is closed idle_timeout after its last message)
        # at one scope per idle_timeout.
        self._heard = trio.current_time()
        while True:
            waiting = False
            with trio.CancelScope(deadline=min(self._heard + idle_timeout, self._release_at)) as scope:
                self._read_scope = scope
                while True:
                    waiting = True
                    await self._wait_for_room()
                    waiting = False
                    if self._held.entries and self._release_at == math.inf:
                        self._arm_release(trio.current_time())  # room again: held ones go on
                    message = await ws.get_message()
                    wire.consumed += 1
                    self._heard = now = trio.current_time()
                    try:
                        self._deliver(message, now)
                        if self._pongs_due:
                            self._report_pongs()
                    finally:
                        self.owner.input_done(self)
                    if self.close_code is not None:
                        return
            self._read_scope = None
            now = trio.current_time()
            if now >= self._release_at:
                self._release_held(now)
                if self.close_code is not None:
                    return
                continue
            if waiting or self._waiting_room:
                self._heard = now  # waiting for the store is not the client's silence
                continue
            if now < self._heard + idle_timeout:
                continue  # a message came since the scope was armed
            log.info("User %s sent nothing for %g s; closing with 4000", self.user_id, idle_timeout)
            self.hand_over_held()
            self.close(
                CloseCode.IDLE_TIMEOUT,
                f"heartbeat timeout: nothing received for {idle_timeout:g} s",
            )
            return

    def _report_pongs(self) -> None:
        """The pongs whose earlier messages have all been read now count."""
        due, consumed = self._pongs_due, self.wire.consumed
        while due and due[0] <= consumed and self.close_code is None:
            due.popleft()
            self.owner.pong_received(self)

    def _rate_limited(self) -> None:
        self.counters.rate_limited += 1
        now = trio.current_time()
        if self._rate_strikes.add(now):
            log.warning("User %s kept exceeding the rate limit; closing with 4002", self.user_id)
            self.close(CloseCode.RATE_LIMITED, "rate limit exceeded repeatedly")
            return
        # One error a second at most: answering every dropped message would
        # let a flood amplify itself.
        if now - self._last_rate_error >= 1.0:
            self._last_rate_error = now
            error = Error(
                ErrorCode.RATE_LIMITED,
                f"too many messages (limit {self.config.rate_limit:g}/s); messages were dropped",
            )
            self.send_message(error)

    def _peer_closed(self, exc: ConnectionClosed) -> None:
        self.hand_over_held()
        reason = exc.reason
        code = reason.code if reason is not None else ABNORMAL_CLOSURE
        text = (reason.reason if reason is not None else None) or ""
        if self.close_code is None:
            self.close(code, text, peer_closed=True)

    async def _writer(self) -> None:
        ws = self.ws
        graceful = False
        try:
            with self._writer_scope:
                try:
                    # Until close(): then what is left, and our close frame last.
                    await self.wire.run_writer(self._flushed)
                except WriteTimeout:
                    log.warning(
                        "User %s took no bytes for %g s; closing with 1013",
                        self.user_id,
                        self.config.write_timeout,
                    )
                    if self.close_code is None:
                        self.counters.slow_disconnects["write_timeout"] += 1
                    self.close(CloseCode.TOO_SLOW, "too slow: nothing received for too long", discard=True)
                    return  # its socket takes nothing: no close handshake either
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The connection is gone (reset, or closed under us).
                    self.close(ABNORMAL_CLOSURE, "connection lost", peer_closed=True)
                    return
                if self.close_code is None:
                    # The writer only ends through close(); keep the invariant anyway.
                    self.close(CloseCode.INTERNAL_ERROR, "writer ended unexpectedly")
                # The close handshake: read (and drop) until the client's close
                # frame; trio-websocket then closes the TCP connection.
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed:
                    graceful = True
        except Exception:
            log.exception("Internal error while sending to %s", self.user_id)
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")
        finally:
            self._reader_scope.cancel()
            if not graceful:
                # Deadline passed or error: drop the transport without a handshake.
                await trio.aclose_forcefully(ws)

    async def _cursor_pump(self) -> None:
        interval = 1.0 / self.config.cursor_rate
        try:
            with self._cursor_scope:
                while True:
                    await self._cursor_ready.wait()
                    self._cursor_ready = trio.Event()
                    message, self._pending_cursor = self._pending_cursor, None
                    if message is not None and self.close_code is None:
                        self.owner.cursor_due(self, message)
                    await trio.sleep(interval)
        except Exception:
            log.exception("Internal error while forwarding the cursor of %s", self.user_id)
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")
