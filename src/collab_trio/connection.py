"""One client's tasks: reader, writer and cursor pump, under the connection's own nursery.

    Connection.run()       in its session's nursery
     ├─ reader             websocket -> owner.frame_received(), with the idle deadline
     ├─ writer             bounded outbox channel -> websocket, then the close handshake
     └─ cursor             the latest cursor of this user, at most `cursor_rate` a second

A connection knows nothing of sessions: it is given an owner (anything with
the `ConnectionOwner` methods) when it is built. Fan-out never awaits: the
owner puts text into the outbox with `send()`; when it is full this
connection is closed with 1013 and nobody else waits.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .config import ServerConfig
from .limits import Strikes, TokenBucket
from .messages import Error, Forwarded, encode_message
from .protocol import CloseCode, ErrorCode, utc_timestamp

log = logging.getLogger(__name__)

# Seconds over which refusals are counted before a connection is closed.
STRIKE_WINDOW = 10.0

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

    def frame_received(self, conn: Connection, frame: str | bytes) -> None:
        """A frame arrived (within the rate limit)."""

    def cursor_due(self, conn: Connection, message: Forwarded) -> None:
        """The cursor pump lets this cursor through now."""

    def connection_closed(self, conn: Connection) -> None:
        """close() ran: the connection reads and queues nothing more."""

    async def wait_for_room(self) -> None:
        """Return when the owner can take another frame (back-pressure)."""


@attrs.define(eq=False)
class Connection:
    """A joined client: its websocket, its outbox and the state of its close."""

    ws: WebSocketConnection
    user_id: str
    config: ServerConfig
    owner: ConnectionOwner
    remote: str = "?"
    # False for a token with the viewer role: it may watch but not edit.
    can_write: bool = True
    connected_at: str = attrs.field(factory=utc_timestamp)
    # Set by close(): what the server sends (or the client sent) in the close frame.
    close_code: int | None = None
    close_reason: str | None = None
    # Set when run() has returned: reader, writer and cursor pump are done.
    finished: trio.Event = attrs.field(factory=trio.Event)
    _outbox_send: trio.MemorySendChannel[str] = attrs.field(init=False)
    _outbox_recv: trio.MemoryReceiveChannel[str] = attrs.field(init=False)
    _reader_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _writer_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _cursor_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _pending_cursor: Forwarded | None = None
    _cursor_ready: trio.Event = attrs.field(factory=trio.Event)
    _bucket: TokenBucket = attrs.field(init=False)
    _rate_strikes: Strikes = attrs.field(init=False)
    _forbidden_strikes: Strikes = attrs.field(init=False)
    _last_rate_error: float = -math.inf

    def __attrs_post_init__(self) -> None:
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[str](
            self.config.outbox_size
        )
        self._bucket = TokenBucket(self.config.rate_limit, self.config.rate_burst)
        self._rate_strikes = Strikes(self.config.rate_strikes, STRIKE_WINDOW)
        self._forbidden_strikes = Strikes(self.config.forbidden_strikes, STRIKE_WINDOW)

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
            self.finished.set()

    # -- called by the owner (never awaits) ----------------------------------

    def send(self, text: str) -> None:
        """Queue one encoded message; close with 1013 if the client can't keep up."""
        try:
            self._outbox_send.send_nowait(text)
        except trio.WouldBlock:
            log.warning(
                "User %s is too slow (%d messages queued); closing with 1013",
                self.user_id,
                self.config.outbox_size,
            )
            self.close(CloseCode.TOO_SLOW, "too slow: outbound queue overflowed", discard=True)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # already closing: the message is not for this connection any more

    def queue_cursor(self, message: Forwarded) -> None:
        """Remember the latest cursor; the pump forwards it when the rate allows."""
        self._pending_cursor = message
        self._cursor_ready.set()

    def close(self, code: int, reason: str, *, discard: bool = False) -> None:
        """Start closing: stop reading, let the writer flush then close the socket.

        With `discard`, queued messages are dropped (the client is too slow to
        take them anyway). Either way the writer has `close_timeout` seconds
        for what is left, including the close handshake.
        """
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = int(code), reason
        self._reader_scope.cancel()
        self._cursor_scope.cancel()
        if discard:
            self._outbox_recv.close()
        else:
            self._outbox_send.close()
        self._writer_scope.deadline = min(
            self._writer_scope.deadline, trio.current_time() + self.config.close_timeout
        )
        self.owner.connection_closed(self)

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
        self.send(encode_message(Error(ErrorCode.FORBIDDEN, "your token may only view this session", ref)))

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

    async def _read_loop(self) -> None:
        idle_timeout = self.config.idle_timeout
        while True:
            # Outside the idle deadline: waiting for the store is not the client's silence.
            await self.owner.wait_for_room()
            message: str | bytes | None = None
            with trio.move_on_after(idle_timeout):
                message = await self.ws.get_message()
            if message is None:
                log.info(
                    "User %s sent nothing for %g s; closing with 4000", self.user_id, idle_timeout
                )
                self.close(
                    CloseCode.IDLE_TIMEOUT,
                    f"heartbeat timeout: nothing received for {idle_timeout:g} s",
                )
                return
            if self._bucket.allow(trio.current_time()):
                self.owner.frame_received(self, message)
            else:
                self._rate_limited()

    def _rate_limited(self) -> None:
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
            self.send(encode_message(error))

    def _peer_closed(self, exc: ConnectionClosed) -> None:
        reason = exc.reason
        code = reason.code if reason is not None else 1006
        text = (reason.reason if reason is not None else None) or ""
        if self.close_code is None:
            self.close(code, text)

    async def _writer(self) -> None:
        ws = self.ws
        graceful = False
        try:
            with self._writer_scope:
                try:
                    async for text in self._outbox_recv:
                        await ws.send_message(text)
                except trio.ClosedResourceError:
                    pass  # close(discard=True): queued messages dropped
                except ConnectionClosed as exc:
                    self._peer_closed(exc)
                if self.close_code is None:
                    # The outbox can only end through close(); keep the invariant anyway.
                    self.close(CloseCode.INTERNAL_ERROR, "outbox closed unexpectedly")
                await ws.aclose(self.close_code or CloseCode.NORMAL, self.close_reason)
                graceful = True
        except Exception:
            log.exception("Internal error while sending to %s", self.user_id)
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")
        finally:
            self._outbox_recv.close()
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
                    if message is not None:
                        self.owner.cursor_due(self, message)
                    await trio.sleep(interval)
        except Exception:
            log.exception("Internal error while forwarding the cursor of %s", self.user_id)
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")
