"""The rules of one session, sans-io: members, host, pending changes, ordering.

`SessionCore` never awaits and does no I/O, like wsproto's connection or
websockets' `Protocol`: frames and events go in, effects come out, and the
trio `Session` (session.py) carries the effects out in the order given.

    core.join(conn, user_id, ...)  -> [Send(ack), Broadcast(user:joined) | Close(previous)]
    core.receive(conn, frame)      -> [Send(pong) | Send(error) | WantCommit() | ...]
    core.take_batch()              -> Batch: the ops the runner hands to the store
    core.committed(batch)          -> [Broadcast(relay), Send(ack), Send(sync answer), ...]
    core.commit_failed(batch, ..)  -> [Send(error not_persisted), ...]
    core.leave(conn, reason)       -> [Broadcast(user:left), Broadcast(host:changed)]

`conn` is whatever the runner uses to tell connections apart (its
`Connection` objects; tests pass strings). The rules that live here:

- The host is the longest-connected member; a reconnecting user keeps its
  place (and host role); the new connection replaces the old one (4001).
- Nobody hears of a change before the store has it: a change waits in the
  pending queue, is committed in a batch, and only then applied, relayed to
  the others and acknowledged to its sender, in seq order.
- An op_id already applied is only acknowledged again; one still pending is
  acknowledged together with the first when it commits.
- A sync:request that arrives while changes are pending is answered after
  them, in arrival order; a connection has at most one such request waiting
  (a later one takes its place), and every answer at one version of the
  document is the same `SyncState` object (the runner encodes it once).
- A `sync:ops` answer that would be larger than `max_message_size` is a
  `sync:state` instead.
- Budgets: a change that would make the document larger than
  `max_document_size` is refused (`document_too_large`), counting the
  changes still pending; removes, and moves of ordinary coordinates, always
  pass. A snapshot is asked for once the changes journaled since the last
  one reach `max(snapshot_bytes, document size)` bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import attrs

from .config import MIB
from .counters import Counters
from .convergence import EXISTENCE, MOVE, UPDATE, CorrectionTracker, FieldHistory, merge_update
from .document import (
    COMMAND,
    MESSAGE_ENVELOPE,
    REPLACE,
    Op,
    SessionDocument,
    encode_command,
    encoded_size,
    item_data,
    make_item,
    op_id_key,
    replacement_items,
)
from .history import ADMIN_USER, KeptVersion, replace_reason
from .messages import (
    Ack,
    ConnectionAck,
    Correction,
    Error,
    Forwarded,
    HostChanged,
    Pong,
    Relay,
    ServerMessage,
    SyncOps,
    SyncState,
    UserInfo,
    UserJoined,
    UserLeft,
    encode_message_bytes,
)
from .protocol import (
    MOVE_FIELDS,
    CloseCode,
    Command,
    Cursor,
    ErrorCode,
    FullState,
    Ping,
    ProtocolError,
    SyncRequest,
    SyncUpdate,
    decode,
    message_type,
    parse_client_message,
    utc_timestamp,
)

Conn = Hashable

# Seconds after a member was sent a design to load within which an upload
# of its own (sync:full_state) may have been made before it loaded it: a
# canvas on its way when another was taken, or crossed by the empty state
# of the canvas probe (SessionCore._sync_send).
RELOAD_WINDOW = 5.0
# What relaying an op adds to the message that carried it: `user_id` (up to
# 64 ASCII characters), `timestamp` and `seq`; an over-estimate, used to
# tell whether a sync:ops answer fits in one message.
RELAY_OVERHEAD = 160
# The sync:ops message around its ops: type, version, epoch.
SYNC_OPS_ENVELOPE = 96
# The most a move of float coordinates can add to an item (three new fields
# of 24-character floats): such moves pass even at the size limit.
MOVE_ALLOWANCE = 128

# -- effects -------------------------------------------------------------------


@attrs.define(unsafe_hash=True)  # a value: never changed (see "Per-change objects", ARCHITECTURE.md)
class Send:
    """Queue `message` for one connection."""

    conn: Conn
    message: ServerMessage


@attrs.define(unsafe_hash=True)  # a value: never changed (see "Per-change objects", ARCHITECTURE.md)
class Broadcast:
    """Queue `message` for every member but `exclude` (a user id), encoded once."""

    message: ServerMessage
    exclude: str | None = None


@attrs.frozen
class Close:
    """Close one connection with this code."""

    conn: Conn
    code: int
    reason: str


@attrs.frozen
class QueueCursor:
    """Hand the member's latest cursor to its rate-limited cursor pump."""

    conn: Conn
    message: Forwarded


@attrs.frozen
class Refuse:
    """A viewer tried to change the session (the connection counts strikes)."""

    conn: Conn
    ref: str


@attrs.define(unsafe_hash=True)  # a value: never changed (see "Per-change objects", ARCHITECTURE.md)
class WantCommit:
    """Changes are pending: the runner should take a batch when it can."""


# (No fields: one for all.)
WANT_COMMIT = WantCommit()


@attrs.frozen
class WantCorrections:
    """A correction is due at some time: the runner calls corrections() then
    (next_correction_due() says when)."""


@attrs.frozen
class PingAfterLoad:
    """Send `conn` a WebSocket ping, after everything sent to it so far: a
    client answers it (RFC 6455) once it has taken in all of that, so its
    pong (pong_received) tells when it had loaded what was sent before."""

    conn: Conn


@attrs.frozen
class WantSnapshot:
    """Enough ops since the last snapshot: store this one (see snapshot_saved)."""

    snapshot: dict[str, Any]


@attrs.frozen
class Restored:
    """A restore asked for with restore() is stored and sent (`seq`), or
    failed (`error`, one line); `ticket` is what the caller passed."""

    ticket: Any
    seq: int | None = None
    error: str | None = None


@attrs.frozen
class Emptied:
    """The session takes no more joins and can unload: its last member left
    (`last_user_left`), or close_all() closed everyone."""

    last_user_left: bool = False


Effect = (
    Send
    | Broadcast
    | Close
    | QueueCursor
    | Refuse
    | PingAfterLoad
    | WantCommit
    | WantCorrections
    | WantSnapshot
    | Restored
    | Emptied
)


class JoinRefused(Exception):
    """A join that cannot happen (session closed or full, server stopping, load
    failed); the connection is closed with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# -- pending changes -------------------------------------------------------------


# A committed command of this many bytes (its message) or more is encoded
# once, for the document's size of its item and for the relay, which embeds
# the bytes; a smaller one is measured and relayed as any (encoding it once
# more would cost as much as it saves). Every relay of a batch is made before
# any is framed: the bytes of a batch of small commands onto a slow disk (up
# to the store queue's 8 MiB) would all be held at once.
ENCODE_ONCE_FROM = 64 * 1024


@attrs.define(eq=False)
class _Change:
    """What every pending change has: who sent it and whom to acknowledge."""

    conn: Conn
    user_id: str
    size: int
    op_id: Any = None
    # Connections that sent the same op_id again before this one committed
    # (a tuple, so that the usual none costs no list per change).
    repeats: tuple[Conn, ...] = ()
    # Bytes this change is expected to add to the document (an upper bound;
    # negative only for a replacement that makes it smaller).
    growth: int = attrs.field(default=0, kw_only=True)


def merged_message_size(command_json: bytes, op_id: Any) -> int:
    """The bytes of the message a merged command would have come in (as
    document.message_size() measures an op loaded from the store)."""
    size = MESSAGE_ENVELOPE + len(command_json)
    if op_id is not None:
        size += len(',"op_id":') + encoded_size(op_id)
    return size


@attrs.define(eq=False)
class PendingCommand(_Change):
    """A `command`: applied, relayed to the others and acknowledged."""

    command: dict[str, Any] = attrs.field(kw_only=True)
    # When it arrived (the core's `now`), and the how-manieth message the
    # core received it was (SessionCore._received), for corrections.
    arrived: float = attrs.field(default=0.0, kw_only=True)
    order: int = attrs.field(default=0, kw_only=True)
    # Set by take_batch(): a move or update of a removed item (deletes win),
    # removed by the store's document ("document") or by an earlier change of
    # the same batch ("batch": if the batch fails, nothing was removed).
    refused: str | None = attrs.field(default=None, kw_only=True)
    # Set by take_batch(): the merge kept a stale value of this update out.
    stale: bool = attrs.field(default=False, kw_only=True)


@attrs.define(eq=False)
class PendingReplace(_Change):
    """A `sync:update`, or the host's `sync:full_state`: replaces every item.

    `forward`: the full_state message to pass on (to `target_user`, or to
    everyone when None); for a sync:update the others get sync:state instead.
    """

    items: list[dict[str, Any]] = attrs.field(kw_only=True)
    forward: Forwarded | None = attrs.field(default=None, kw_only=True)
    target_user: str | None = attrs.field(default=None, kw_only=True)
    # Its sender was sent another design to load shortly before this
    # arrived, maybe after making it: it is sent the document once this is
    # applied (its window may show the other design).
    reload_sender: bool = attrs.field(default=False, kw_only=True)


@attrs.define(eq=False)
class PendingRestore(PendingReplace):
    """An administrator's restore of `version` (`sessions restore`): replaces
    every item like a sync:update by ADMIN_USER, sent to every member; no
    connection (`conn` is None) is acknowledged, `ticket` learns the outcome."""

    version: int = attrs.field(kw_only=True)
    ticket: Any = attrs.field(kw_only=True)


@attrs.define(eq=False)
class PendingSync:
    """A `sync:request` that arrived behind pending changes (it counts
    against the same bounds as a change: it costs an answer). While it waits
    to be taken into a batch, a later request of the same connection replaces
    `request` (and `size`) instead of queueing another answer."""

    conn: Conn
    request: SyncRequest
    size: int = 0


Pending = PendingCommand | PendingReplace | PendingSync


@attrs.define(unsafe_hash=True)  # a value: never changed (see "Per-change objects", ARCHITECTURE.md)
class Batch:
    """Pending entries taken for one commit, and the ops of the changes among them."""

    entries: tuple[Pending, ...]
    ops: tuple[Op, ...]
    epoch: str
    # The document a replacement in the batch displaces (only ever the
    # first change of a batch), to keep as a version with the ops.
    replaced: KeptVersion | None = None

    @property
    def size(self) -> int:
        """Bytes of the changes in this batch, as received."""
        return sum(op.size for op in self.ops)


# -- the core --------------------------------------------------------------------

# What a correction after a conflicting change of each kind must restore.
_CHANGE_LEVELS = {"move_item": MOVE, "update_item": UPDATE, "add_item": EXISTENCE, "remove_item": EXISTENCE}


@attrs.define
class ConvergenceStats:
    """What the session did to keep stock clients on one design."""

    # Corrections sent (an item's state to a member that may show another).
    corrections: int = 0
    # Updates whose merge kept a field the sender had stale.
    merges: int = 0
    # Moves and updates of removed items refused.
    refusals: int = 0

    def add(self, other: ConvergenceStats) -> None:
        self.corrections += other.corrections
        self.merges += other.merges
        self.refusals += other.refusals


@attrs.define(eq=False)
class _Member:
    conn: Conn
    user_id: str
    connected_at: str
    can_write: bool
    # Asked for the document as stock Optiverse does (a sync:request with a
    # `user_id`): a design it loads replaces its canvas (see _loading).
    stock: bool = False
    # Pings sent after a design to load (PingAfterLoad), and pongs received since.
    pings: int = 0
    pongs: int = 0


# Seconds a member's changes count as made before a design it was sent to
# load while the pong to the ping sent after it is awaited (see _loading):
# the pong ends it sooner; this bounds it for a client that never answers.
PONG_WAIT = 5.0

# Why members are closed (1001) when an administrator deleted or replaced their session.
RESET_REASON = "session was reset by an administrator; reconnect"


@attrs.define(eq=False)
class SessionCore:
    """Members, host, document and pending changes of one session; never awaits."""

    session_id: str
    document: SessionDocument = attrs.field(factory=SessionDocument)
    max_users: int = 50
    heartbeat_interval: float = 30.0
    # Most changes in one batch: a commit releases at most this many relays to
    # each member (and acks to one sender) at once, well inside their outboxes.
    max_batch_ops: int = 512
    # Most bytes of changes in one batch (at least one change): what a commit
    # releases to each member at once stays well inside their queue budget.
    max_batch_bytes: int = 2 * 1024 * 1024
    # Ask for a snapshot once this many bytes of changes (or the document's
    # size, if larger) were committed since the last one.
    snapshot_bytes: int = MIB
    # Bytes of ops the document keeps for resume (set on the document).
    history_bytes: int = 8 * MIB
    # Largest document, in bytes of JSON (see SessionDocument.size).
    max_document_size: int = 16 * MIB
    # Largest message: a sync:ops answer above it is a sync:state instead.
    max_message_size: int = MIB
    clock: Callable[[], str] = utc_timestamp
    # Seconds, monotonic (the runner passes trio.current_time).
    now: Callable[[], float] = time.monotonic
    # Whole-item updates change only what the sender changed (convergence.py).
    merge_updates: bool = True
    # Corrections for members that may show a stale item (convergence.py).
    corrections_enabled: bool = True
    correction_window: float = 1.0
    correction_settle: float = 0.15
    # Seconds a stock Optiverse client answered `state: null` (a session
    # never written) has to upload its canvas before it is sent an empty
    # state instead (see _sync_send).
    canvas_wait: float = 2.0
    stats: ConvergenceStats = attrs.field(factory=ConvergenceStats)
    # The server's counters (metrics): messages by type, resumes, ack latency.
    counters: Counters = attrs.field(factory=Counters)
    _fields: FieldHistory = attrs.field(factory=FieldHistory)
    _tracker: CorrectionTracker = attrs.field(init=False)
    # Members by user id, in join order (a reconnect keeps its place).
    _members: dict[str, _Member] = attrs.field(factory=dict)
    # connections() by `exclude`, while the members stay.
    _recipients: dict[str | None, tuple[Conn, ...]] = attrs.field(factory=dict)
    host: str | None = None
    # True once the last member left or close_all() ran: no more joins.
    closed: bool = False
    _pending: list[Pending] = attrs.field(factory=list)
    _pending_op_ids: dict[tuple[str, tuple[str, str | int]], _Change] = attrs.field(factory=dict)
    # The PendingSync of each connection still in _pending (not yet in a batch).
    _waiting_syncs: dict[Conn, PendingSync] = attrs.field(factory=dict)
    _in_flight: Batch | None = None
    # The batch in flight whose relay relays_first() gave out already.
    _relayed_first: Batch | None = None
    # Bytes of changes received and not yet committed (queued or in flight).
    pending_bytes: int = 0
    # Sum of the `growth` of the changes queued or in flight.
    pending_growth: int = 0
    _snapshot_version: int = attrs.field(init=False)
    _snapshotting: bool = False
    # Bytes of changes committed since the last stored snapshot, and how many
    # of them the snapshot being written covers.
    journal_bytes: int = 0
    _snapshot_covers: int = 0
    # Connections probed for a canvas (_sync_send), and those whose upload
    # is awaited: by connection, the member and when the wait ends.
    _probed: set[Conn] = attrs.field(factory=set)
    _awaiting_canvas: dict[Conn, tuple[str, float]] = attrs.field(factory=dict)
    # When each connection was last sent a whole design to load (a non-null
    # sync:state, or a forwarded sync:full_state): an upload it makes soon
    # after may predate it (see PendingReplace.reload_sender).
    _loaded_at: dict[Conn, float] = attrs.field(factory=dict)
    # Commands received so far (each PendingCommand's `order`).
    _received: int = 0
    # The last sync answers given, reused while the document stands still.
    _state_answer: SyncState | None = None
    _ops_answer: tuple[tuple[str, int, int], SyncOps] | None = None

    def __attrs_post_init__(self) -> None:
        self._snapshot_version = self.document.version
        self.document.limit_history(max_bytes=self.history_bytes)
        self._tracker = CorrectionTracker(window=self.correction_window, settle=self.correction_settle)

    # -- membership ----------------------------------------------------------

    def users(self) -> tuple[UserInfo, ...]:
        """The user list, in join order."""
        return tuple(
            UserInfo(m.user_id, m.connected_at, m.user_id == self.host) for m in self._members.values()
        )

    def member_ids(self) -> list[str]:
        """User ids of the members, in join order."""
        return list(self._members)

    def connections(self, exclude: str | None = None) -> tuple[Conn, ...]:
        """The members' connections, in join order, but user `exclude`'s.

        The same tuple while the members stay: every relay asks for it,
        members come and go rarely."""
        recipients = self._recipients.get(exclude)
        if recipients is None:
            if len(self._recipients) >= len(self._members) + 1:
                self._recipients.clear()  # bounded: one per member, and one for all
            recipients = tuple(m.conn for m in self._members.values() if m.user_id != exclude)
            self._recipients[exclude] = recipients
        return recipients

    def connection_of(self, user_id: str) -> Conn | None:
        """The current connection of a member."""
        member = self._members.get(user_id)
        return None if member is None else member.conn

    def is_member(self, conn: Conn, user_id: str) -> bool:
        """True while `conn` is `user_id`'s current connection."""
        member = self._members.get(user_id)
        return member is not None and member.conn == conn

    def join(
        self,
        conn: Conn,
        user_id: str,
        *,
        connected_at: str,
        can_write: bool = True,
        resume: SyncRequest | None = None,
    ) -> list[Effect]:
        """Add a connection.

        Raises:
            JoinRefused: the session is closed (the caller loads a new one),
                or full.
        """
        if self.closed:
            raise JoinRefused(CloseCode.GOING_AWAY, "session closed")
        previous = self._members.get(user_id)
        if previous is None and len(self._members) >= self.max_users:
            raise JoinRefused(CloseCode.SESSION_FULL, f"session full ({self.max_users} users)")
        # Assigning to an existing key keeps its place: a reconnecting user keeps
        # its seniority (and host role) instead of going to the back of the line.
        self._members[user_id] = _Member(conn, user_id, connected_at, can_write)
        self._recipients.clear()
        if self.host is None:
            self.host = user_id
        effects: list[Effect] = [Send(conn, self._ack(user_id))]
        if resume is not None:
            effects.append(Send(conn, self._sync_answer(resume)))
        if previous is not None:
            self._forget_conn(previous.conn)
            self._tracker.forget_load(user_id)  # the new connection loads anew, or not at all
            effects.append(
                Close(previous.conn, CloseCode.REPLACED, "replaced by a newer connection of the same user")
            )
        else:
            effects.append(Broadcast(UserJoined(user_id, connected_at, self.users()), exclude=user_id))
        return effects

    def leave(self, conn: Conn, user_id: str, reason: str) -> list[Effect]:
        """A connection ended; `reason` is the user:left reason."""
        if not self.is_member(conn, user_id):
            return []  # replaced by a newer connection, or already gone
        del self._members[user_id]
        self._recipients.clear()
        self._tracker.forget_user(user_id)
        self._forget_conn(conn)
        effects: list[Effect] = []
        host_left = self.host == user_id
        if host_left:
            # Promote first, so the user list in user:left already shows the new host.
            self.host = next(iter(self._members), None)
        if not self.closed:
            now = self.clock()
            effects.append(Broadcast(UserLeft(user_id, now, reason, self.users())))
            if host_left and self.host is not None:
                effects.append(Broadcast(HostChanged(self.host, now)))
        if not self._members and not self.closed:
            self.closed = True
            effects.append(Emptied(last_user_left=True))
        return effects

    def _forget_conn(self, conn: Conn) -> None:
        self._probed.discard(conn)
        self._awaiting_canvas.pop(conn, None)
        self._loaded_at.pop(conn, None)

    def _loading(self, conns: Iterable[Conn], *, replaced: bool = True) -> list[Effect]:
        """These connections are sent a whole design to load now: no empty
        state is owed to them any more (it would undo what they did since).
        (Members only: an answer queued for one that left since is noted
        nowhere.) `replaced`: it replaces the document under them (not an
        answer to their own sync:request)."""
        now = self.now()
        loading = set(conns)
        pings: list[Effect] = []
        for member in self._members.values():
            conn = member.conn
            if conn in loading:
                self._awaiting_canvas.pop(conn, None)
                self._loaded_at[conn] = now
                # A change of its arriving before it answers the ping sent
                # behind the design may have been made before it loaded the
                # design, which then hid it (CorrectionTracker.loaded); one
                # arriving after was made after (links are FIFO). Pinged:
                # stock Optiverse (Qt answers pings as it reads), whose
                # corrections cost it most (an add corrected is rebuilt as
                # another's item). Others are not (a trio-websocket client
                # fails on a ping that arrives after it started closing), and
                # count only a document replaced under them (not a state they
                # asked for: they may keep their changes across it), for
                # correction_window.
                if member.stock:
                    member.pings += 1
                    pings.append(PingAfterLoad(conn))
                    self._tracker.loaded(member.user_id, now, PONG_WAIT)
                elif replaced:
                    self._tracker.loaded(member.user_id, now, self.correction_window)
        return pings

    def pong_received(self, conn: Conn, user_id: str) -> None:
        """A member's connection received the pong to one of its pings (the
        oldest not yet answered: a client answers in order). Once all are
        answered, what it was sent to load is loaded: its changes received
        from now on were made after that."""
        member = self._members.get(user_id)
        if member is None or member.conn != conn or member.pongs >= member.pings:
            return
        member.pongs += 1
        if member.pongs == member.pings:
            self._tracker.loaded_by(user_id, self.now(), self._received)

    def close_all(self, code: int, reason: str) -> list[Effect]:
        """Close every member with one code, without a storm of leave notices."""
        effects: list[Effect] = [Close(m.conn, code, reason) for m in self._members.values()]
        if not self.closed:
            self.closed = True
            effects.append(Emptied())
        return effects

    def _ack(self, user_id: str) -> ConnectionAck:
        return ConnectionAck(
            session_id=self.session_id,
            user_id=user_id,
            is_host=user_id == self.host,
            users=self.users(),
            version=self.document.version,
            epoch=self.document.epoch,
            heartbeat_interval_s=self.heartbeat_interval,
            timestamp=self.clock(),
        )

    # -- messages ------------------------------------------------------------

    def receive(self, conn: Conn, user_id: str, frame: str | bytes, arrived: float | None = None) -> list[Effect]:
        """Handle one frame from a member: answer it, or queue the change it
        makes. `arrived`: when it came (the core's `now` time; default now),
        for a message the connection held over the rate limit."""
        member = self._members.get(user_id)
        if member is None or member.conn != conn:
            return []
        if isinstance(frame, bytes):
            self.counters.received["other"] += 1
            return [
                Send(
                    conn,
                    Error(
                        ErrorCode.BINARY_NOT_SUPPORTED,
                        "binary frames are not supported; send JSON in text frames",
                    ),
                )
            ]
        try:
            message = parse_client_message(decode(frame))
        except ProtocolError as exc:
            self.counters.received["other"] += 1
            return [Send(conn, Error(exc.code, exc.message, exc.ref))]
        self.counters.received[message_type(message)] += 1
        if not member.can_write and isinstance(message, (Command, SyncUpdate, FullState)):
            return [Refuse(conn, message_type(message))]
        # Bytes as on the wire (UTF-8); isascii() is O(1) for str.
        size = len(frame) if frame.isascii() else len(frame.encode("utf-8", "surrogatepass"))
        if isinstance(message, Ping):
            return [Send(conn, Pong(self.clock()))]
        if isinstance(message, Command):
            self._received += 1
            change = PendingCommand(
                conn, user_id, size, message.op_id, command=message.command,
                arrived=self.now() if arrived is None else arrived,
                # A message held over the rate limit (`arrived` given) is
                # received late, after what came behind it (a pong among
                # them): its order among the messages of its own moment is
                # not known, so it counts as the first (a change in the same
                # read as the pong is taken as made before the load: a
                # correction too many restores what it already shows; one
                # too few leaves its window apart for good).
                order=self._received if arrived is None else 0,
            )
            return self._queue_command(change, message.action)
        if isinstance(message, Cursor):
            return [QueueCursor(conn, Forwarded({**message.raw, "user_id": user_id}))]
        if isinstance(message, SyncRequest):
            if message.stock:
                member.stock = True
            return self._answer_sync(conn, message, size)
        if isinstance(message, SyncUpdate):
            change = PendingReplace(conn, user_id, size, message.op_id, items=message.items)
            return self._queue_replace(change, "sync:update")
        assert isinstance(message, FullState)
        return self._full_state(conn, user_id, size, message)

    def _full_state(self, conn: Conn, user_id: str, size: int, message: FullState) -> list[Effect]:
        target = message.target_user
        if target is not None and target not in self._members:
            error = Error(
                ErrorCode.UNKNOWN_USER, f"target_user {target!r} is not in this session", "sync:full_state"
            )
            return [Send(conn, error)]
        self._awaiting_canvas.pop(conn, None)  # it answered the probe (or needs none)
        forwarded = Forwarded({**message.raw, "user_id": user_id})
        loaded = self._loaded_at.get(conn)
        # Sent another design shortly before: this upload may predate it.
        reload_sender = loaded is not None and self.now() - loaded <= RELOAD_WINDOW
        if user_id != self.host and (self.document.written or self._replacement_pending()):
            if target == user_id and not reload_sender and not self._pending and self._in_flight is None:
                if replacement_items(message.items) == self.document.items:
                    # Its own canvas, already the document (an Optiverse host
                    # answering the probe): reloading it would rebuild its
                    # items as others', whose edits it then no longer sends.
                    return []
            # Only the host's full state becomes the session document (or,
            # while nothing was ever written, any member's: an Optiverse host
            # that connected after a member in Join mode): the host
            # is the one Optiverse treats as the owner of the canvas. Whoever
            # loads another member's canvas then gets the document (after
            # the changes sent before), so that it ends on what is stored.
            # Without a target it goes nowhere: the sender gets the document
            # instead (each costs at most one answer, as a sync:request).
            effects = [] if target is None else self._forward(forwarded, target, exclude=user_id)
            recipient = self._members[target if target is not None else user_id].conn
            return effects + self._answer_sync(recipient, SyncRequest(), 0)
        change = PendingReplace(
            conn, user_id, size, items=message.items, forward=forwarded, target_user=target, reload_sender=reload_sender
        )
        return self._queue_replace(change, "sync:full_state")

    def _forward(self, message: Forwarded, target_user: str | None, *, exclude: str) -> list[Effect]:
        if target_user is None:
            pings = self._loading(self.connections(exclude=exclude))
            return [Broadcast(message, exclude=exclude), *pings]
        if target_user == exclude:
            return []  # its own canvas (an answer to the probe, see _sync_send)
        target = self._members.get(target_user)
        if target is None:
            return []
        return [Send(target.conn, message), *self._loading((target.conn,))]

    @property
    def projected_size(self) -> int:
        """About the document's size once every pending change is applied (at most)."""
        return self.document.size + self.pending_growth

    def _queue_command(self, change: PendingCommand, action: str) -> list[Effect]:
        repeated = self._repeated(change)
        if repeated is not None:
            return repeated
        growth = self.document.estimate_growth(change.command, change.size)
        item_id = change.command.get("item_id")
        merged = action == "update_item" and self.merge_updates and item_id in self.document.items
        if merged:
            # A merged item holds the current fields and the message's: it
            # grows by at most the message.
            growth = max(growth, change.size)
        # Removes always pass (growth <= 0); so do moves of float coordinates.
        allowance = MOVE_ALLOWANCE if action == "move_item" else 0
        if (
            merged
            and growth > allowance
            and self.projected_size + growth > self.max_document_size
            and not self._replacement_pending()
        ):
            # Near the limit: the merge's own bound (field by field; an
            # update that makes fields smaller adds nothing). Not behind a
            # replacement: the item it meets may be another, or none.
            data = change.command.get("data")
            growth = self.document.merge_growth(item_id, data if isinstance(data, dict) else {})
        if growth > allowance and self.projected_size + growth > self.max_document_size:
            error = Error(
                ErrorCode.DOCUMENT_TOO_LARGE,
                "the session document would grow beyond its limit of"
                f" {_describe_bytes(self.max_document_size)}; the change was not applied"
                " (remove items or make them smaller)",
                "command",
            )
            return [Send(change.conn, error)]
        # A shrinking change counts as 0 until it is applied: two of them can't
        # make room for one burst twice.
        change.growth = max(growth, 0)
        return self._queue(change)

    def _replacement_pending(self) -> bool:
        """A replacement is pending or being committed (looked at near the size limit only)."""
        in_flight = self._in_flight.entries if self._in_flight is not None else ()
        return any(isinstance(entry, PendingReplace) for entry in (*in_flight, *self._pending))

    def _queue_replace(self, change: PendingReplace, ref: str) -> list[Effect]:
        repeated = self._repeated(change)
        if repeated is not None:
            return repeated
        new_size = SessionDocument.replacement_size(change.items)
        if new_size > self.max_document_size:
            error = Error(
                ErrorCode.DOCUMENT_TOO_LARGE,
                f"this state is {_describe_bytes(new_size)} of JSON, more than the session"
                f" document's limit of {_describe_bytes(self.max_document_size)}; it was not applied",
                ref,
            )
            return [Send(change.conn, error)]
        # What follows it builds on this size, whatever was pending before.
        change.growth = new_size - self.projected_size
        return self._queue(change)

    def restore(self, items: list[dict[str, Any]], version: int, ticket: Any) -> list[Effect]:
        """Queue an administrator's restore of a stored version: committed like
        a sync:update by ADMIN_USER, then every member gets the sync:state."""
        size = SessionDocument.replacement_size(items)
        if size > self.max_document_size:
            error = (
                f"version {version} is {_describe_bytes(size)} of JSON, more than the session"
                f" document's limit of {_describe_bytes(self.max_document_size)}"
            )
            return [Restored(ticket, error=error)]
        change = PendingRestore(None, ADMIN_USER, 0, items=items, version=version, ticket=ticket)
        return self._queue_replace(change, "restore")

    def _repeated(self, change: PendingCommand | PendingReplace) -> list[Effect] | None:
        """The effects of a change whose op_id is applied or pending already, else None."""
        if change.op_id is None:
            return None
        seq = self.document.seq_of(change.user_id, change.op_id)
        if seq is not None:
            return [Send(change.conn, Ack(seq, change.op_id))]
        earlier = self._pending_op_ids.get((change.user_id, op_id_key(change.op_id)))
        if earlier is not None:
            earlier.repeats += (change.conn,)
            return []
        return None

    def _queue(self, change: PendingCommand | PendingReplace) -> list[Effect]:
        if change.op_id is not None:
            self._pending_op_ids[(change.user_id, op_id_key(change.op_id))] = change
        self._pending.append(change)
        self.pending_bytes += change.size
        self.pending_growth += change.growth
        return [WANT_COMMIT]

    def _answer_sync(self, conn: Conn, request: SyncRequest, size: int) -> list[Effect]:
        """The answer to `request` for `conn`: now, or, while changes sent
        earlier (by anyone) are not applied yet, queued after them (in
        arrival order)."""
        if self._pending or self._in_flight is not None:
            self._queue_sync(conn, request, size)
            return []
        return self._sync_send(conn, request)

    def _sync_send(self, conn: Conn, request: SyncRequest) -> list[Effect]:
        """The answer to `request`, sent to `conn` now.

        Stock Optiverse keeps its canvas on `state: null` (what a session
        never written is answered with), which is right for a host sharing
        its canvas; but in Join mode it then never completes its first sync,
        and drops every item it adds. The two ask alike. So such a member is
        also sent `user:joined` naming itself: an Optiverse host answers any
        `user:joined` with its canvas (`sync:full_state`), which becomes the
        document; a member in Join mode ignores it, and is sent the document
        after `canvas_wait` seconds, as an empty state if still never
        written (see corrections())."""
        answer = self._sync_answer(request)
        effects: list[Effect] = [Send(conn, answer)]
        if isinstance(answer, SyncState) and answer.state is not None:
            effects += self._loading((conn,), replaced=False)
        if (
            request.stock
            and isinstance(answer, SyncState)
            and answer.state is None
            and conn not in self._probed
        ):
            member = next((m for m in self._members.values() if m.conn == conn), None)
            if member is not None:
                self._probed.add(conn)
                self._awaiting_canvas[conn] = (member.user_id, self.now() + self.canvas_wait)
                effects += [Send(conn, UserJoined(member.user_id, member.connected_at, self.users())), WantCorrections()]
        return effects

    def _queue_sync(self, conn: Conn, request: SyncRequest, size: int) -> None:
        waiting = self._waiting_syncs.get(conn)
        if waiting is not None:
            # One answer per connection at a time: the latest request is what
            # the client wants now, answered where the first one waits (it
            # still follows every change sent before the first; later changes
            # reach the client as relays after it). But a whole document due
            # (asked for, or owed after a foreign sync:full_state) stays due:
            # it covers a resume, and a resume doesn't cover it.
            if waiting.request.since is None:
                if request.since is None and (request.empty_state or request.stock) and not waiting.request.empty_state:
                    waiting.request = attrs.evolve(
                        waiting.request,
                        stock=waiting.request.stock or request.stock,
                        empty_state=request.empty_state,
                    )
                return
            self.pending_bytes += size - waiting.size
            waiting.request, waiting.size = request, size
            return
        entry = self._waiting_syncs[conn] = PendingSync(conn, request, size)
        self._pending.append(entry)
        self.pending_bytes += size

    def _sync_answer(self, request: SyncRequest) -> SyncOps | SyncState:
        """sync:ops when the client can catch up op by op in one message, else
        sync:state. Either is the same object for the same question while the
        document stands still (the runner encodes it once)."""
        document = self.document
        if request.since is None:
            if request.empty_state and not document.written:
                # Not cached: once per member in Join mode of a new session.
                empty = {"items": [], "version": document.version, "timestamp": self.clock()}
                return SyncState(empty, document.version, document.epoch)
            return self._sync_state()
        resumes, outcome = self.counters.resumes, "state_epoch_changed"
        if request.epoch == document.epoch:
            key = (document.epoch, document.version, request.since)
            if self._ops_answer is not None and self._ops_answer[0] == key:
                resumes["ops"] += 1
                return self._ops_answer[1]
            ops = document.ops_since(request.since)
            relays = None if ops is None else self._relays_in_one_message(ops)
            if ops is not None and relays is not None:
                answer = SyncOps(tuple(ops), document.version, document.epoch, relays)
                self._ops_answer = (key, answer)
                resumes["ops"] += 1
                return answer
            outcome = "state_ops_unavailable" if ops is None else "state_too_large"
        resumes[outcome] += 1
        return self._sync_state()

    def _relays_in_one_message(self, ops: list[Op]) -> tuple[bytes, ...] | None:
        """Each op's relay, encoded, if a sync:ops of them fits in one message
        of max_message_size; else None. The ops' sizes tell first (without
        encoding) whether they can't; what they can't tell (a user id of
        multi-byte characters, a float sent as `1e15` and written out in
        full, anything the encoding makes longer than its message was) the
        encoding does. It stops once past the limit: at most one message's
        worth is encoded, and the answer embeds what was."""
        limit = self.max_message_size
        size = SYNC_OPS_ENVELOPE
        for op in ops:
            size += op.size + RELAY_OVERHEAD
            if size > limit:
                return None
        document = self.document
        # The message with no ops, then each op's relay and a comma (one too many).
        size = len(encode_message_bytes(SyncOps((), document.version, document.epoch))) - 1
        relays: list[bytes] = []
        for op in ops:
            relay = encode_message_bytes(Relay(op, op.command_json))
            size += len(relay) + 1
            if size > limit:
                return None
            relays.append(relay)
        return tuple(relays)

    def _sync_state(self) -> SyncState:
        """The whole document: one object per (epoch, version)."""
        document = self.document
        answer = self._state_answer
        if answer is None or answer.version != document.version or answer.epoch != document.epoch:
            answer = self._state_answer = SyncState(
                document.state(self.clock()), document.version, document.epoch
            )
        return answer

    # -- commits -------------------------------------------------------------

    @property
    def has_pending(self) -> bool:
        """True when take_batch() would return a batch."""
        return bool(self._pending)

    @property
    def committing(self) -> bool:
        """True while a batch is with the store."""
        return self._in_flight is not None

    def take_batch(self) -> Batch | None:
        """The oldest pending entries, with the ops the runner must commit (maybe none).

        At most `max_batch_ops` entries (changes and sync requests: each
        costs one answer) and `max_batch_bytes` of them (but at least one).
        Only one batch is out at a time; answer it with committed() or
        commit_failed() before taking the next.
        """
        if not self._pending or self._in_flight is not None:
            return None
        count, size = 0, 0
        # Merges and the deletes-win rule follow the items through the batch
        # (see _command_to_store); a replacement is not followed: a batch
        # ends before any command that comes after one.
        # A replacement is the first change of its batch (its store keeps
        # the document it displaces, which is then the core's document).
        replaced = False
        changes = 0
        # Items more than one change of the batch touches: only those are
        # followed (most batches touch each item once).
        seen: set[Any] = set()
        repeated: set[Any] = set()
        for entry in self._pending[: self.max_batch_ops]:
            if count and size + entry.size > self.max_batch_bytes:
                break
            if isinstance(entry, PendingCommand):
                if replaced:
                    break
                item_id = entry.command.get("item_id")
                if item_id in seen:
                    repeated.add(item_id)
                seen.add(item_id)
                changes += 1
            elif isinstance(entry, PendingReplace):
                if changes:
                    break
                replaced = True
                changes += 1
            count += 1
            size += entry.size
        entries = tuple(self._pending[:count])
        timestamp = self.clock()
        first = self.document.version + 1
        ops: list[Op] = []
        # Items as the earlier changes of this batch leave them (None: removed).
        view: dict[str, dict[str, Any] | None] = {}
        # What the ops relay: an update merged into the whole item relays
        # (and costs every member's queue) far more than it came in as, so
        # the batch is cut again at max_batch_bytes of that.
        relayed = 0
        # What an add or merged update earlier in this batch relays of an
        # item more than one change touches (the document doesn't have it yet,
        # or not as the batch leaves it).
        sizes: dict[str, int] = {}
        for index, entry in enumerate(entries):
            if ops and relayed + self._relay_estimate(entry, sizes) > self.max_batch_bytes:
                count = index  # the rest stays pending, untouched: the next batch's
                entries = entries[:index]
                break
            if isinstance(entry, PendingSync):
                # Taken: a further request of this connection queues anew.
                if self._waiting_syncs.get(entry.conn) is entry:
                    del self._waiting_syncs[entry.conn]
                continue
            command = None
            size, command_json = entry.size, None
            if isinstance(entry, PendingCommand):
                command = self._command_to_store(entry, view, repeated)
                if command is None:
                    continue  # refused
                if command is not entry.command:
                    # An update merged into the whole item: stored, relayed
                    # and kept for resume as that, so measured as that (the
                    # history's byte bound, a sync:ops answer's size).
                    command_json = encode_command(command)
                    if command_json is not None:
                        size = max(size, merged_message_size(command_json, entry.op_id))
                if repeated and command.get("item_id") in repeated and command.get("action") in ("add_item", "update_item"):
                    sizes[command["item_id"]] = size
            relayed += size
            if command_json is None and size >= ENCODE_ONCE_FROM:
                command_json = encode_command(command)
            ops.append(
                # Positional (a keyword call costs a dict per change): seq,
                # user_id, kind, timestamp, command, items, op_id, size and
                # command_json, the command encoded once for its record, the
                # document and the relay.
                Op(
                    first + len(ops),
                    entry.user_id,
                    COMMAND if isinstance(entry, PendingCommand) else REPLACE,
                    timestamp,
                    command,
                    entry.items if isinstance(entry, PendingReplace) else None,
                    entry.op_id,
                    size,
                    command_json,
                )
            )
        del self._pending[:count]
        displaced = self._displaced(entries, timestamp) if replaced else None
        batch = Batch(entries, tuple(ops), self.document.epoch, displaced)
        self._in_flight = batch
        return batch

    def _relay_estimate(self, entry: Pending, sizes: dict[str, int]) -> int:
        """About the bytes `entry`'s op relays, at most: an update merged
        into an existing item relays the whole item with the message's data."""
        size = entry.size
        if self.merge_updates and isinstance(entry, PendingCommand) and entry.command.get("action") == "update_item":
            item_id = entry.command.get("item_id")
            if isinstance(item_id, str):
                known = sizes.get(item_id)
                size += (self.document.item_size(item_id) or 0) if known is None else known
        return size

    def _displaced(self, entries: tuple[Pending, ...], timestamp: str) -> KeptVersion | None:
        """The document a replacement among `entries` displaces, to keep as a
        version (None: no replacement, or the document is empty)."""
        entry = next((e for e in entries if isinstance(e, PendingReplace)), None)
        if entry is None or not self.document.items:
            return None
        if isinstance(entry, PendingRestore):
            reason = replace_reason("restore", entry.user_id, restored=entry.version)
        elif entry.forward is not None:
            reason = replace_reason("sync:full_state", entry.user_id, host=True)
        else:
            reason = replace_reason("sync:update", entry.user_id)
        document = self.document
        # The document's own items, as for snapshots: no op changes one in
        # place, so the store may encode them in its thread while this
        # document moves on.
        items = list(document.items.values())
        return KeptVersion(document.version, items, entry.user_id, reason, timestamp, document.size)

    def _command_to_store(
        self, entry: PendingCommand, view: dict[str, dict[str, Any] | None], repeated: set[Any]
    ) -> dict[str, Any] | None:
        """The command an op stores for this change (an update merged), or
        None if it is refused: a move or update of a removed item. `view`
        holds the items in `repeated` (touched by more than one change of the
        batch) as the batch's earlier changes leave them; this change's effect
        is added to it, and its changed values to the field history (a batch
        that fails only adds candidates)."""
        command = entry.command
        action, item_id = command.get("action"), command.get("item_id")
        if action not in ("add_item", "move_item", "update_item", "remove_item") or not isinstance(item_id, str):
            return command
        follow = item_id in repeated
        current = view[item_id] if item_id in view else self.document.items.get(item_id)
        if action == "remove_item":
            if follow:
                view[item_id] = None
            self._fields.record(item_id, current, None, entry.user_id, self.now())
            return command
        data = command.get("data")
        data = data if isinstance(data, dict) else {}
        if action == "add_item":
            if follow:
                view[item_id] = make_item(item_id, command.get("item_type"), data)
            return command
        if current is None and item_id in view:
            entry.refused = "batch"  # deletes win
            return None
        if current is None and self.document.is_removed(item_id):
            entry.refused = "document"
            return None
        if action == "move_item":
            if current is not None:
                position = {f: data[f] for f in MOVE_FIELDS if f in data}
                if follow:
                    view[item_id] = {**current, **position}
                before = {f: current[f] for f in MOVE_FIELDS if f in current}
                self._fields.record(item_id, before, position, entry.user_id, self.now())
            return command
        # update_item
        if current is None or not self.merge_updates:
            item_type = None if current is None else current.get("item_type")
            if follow:
                view[item_id] = make_item(item_id, item_type or command.get("item_type"), data)
            self._fields.record(item_id, current, data, entry.user_id, self.now())
            return command
        merged, _, stale = merge_update(current, data, self._fields, item_id, entry.user_id, entry.arrived)
        entry.stale = bool(stale)
        if follow:
            view[item_id] = make_item(item_id, current.get("item_type"), merged)
        self._fields.record(item_id, current, merged, entry.user_id, self.now())
        return {**command, "data": merged}

    def relays_first(self, batch: Batch) -> list[Effect]:
        """The relay of a committed batch of one small command, to carry out
        before committed(batch), which then leaves it out: the others get the
        change without waiting for the document and its bookkeeping (~25 us
        per change, the commonest batch). [] for any other batch: committed()
        relays its ops in order with everything else."""
        if batch is not self._in_flight or len(batch.entries) != 1 or len(batch.ops) != 1:
            return []
        entry, op = batch.entries[0], batch.ops[0]
        if not isinstance(entry, PendingCommand) or op.size >= ENCODE_ONCE_FROM:
            return []
        self._relayed_first = batch
        return [Broadcast(Relay(op, op.command_json), exclude=op.user_id)]

    def committed(self, batch: Batch) -> list[Effect]:
        """The store has the batch: apply each op, relay it (unless
        relays_first() did), acknowledge it."""
        relayed, self._relayed_first = batch is self._relayed_first, None
        self._finish(batch)
        effects: list[Effect] = []
        ops = iter(batch.ops)
        due_before = self._tracker.pending
        now, ack_seconds = self.now(), self.counters.ack_seconds
        for entry in batch.entries:
            if isinstance(entry, PendingSync):
                effects += self._sync_send(entry.conn, entry.request)
                continue
            if isinstance(entry, PendingCommand) and entry.refused:
                effects += self._refused(entry)
                continue
            op = next(ops)
            if isinstance(entry, PendingCommand):
                if entry.stale:
                    self.stats.merges += 1  # a stale field of the sender's kept out
                command_json = self._apply_command(op, entry)
                if not relayed:
                    effects.append(Broadcast(Relay(op, command_json), exclude=op.user_id))
                ack_seconds.observe(now - entry.arrived)
                ack = Ack(op.seq, op.op_id)
                effects += [Send(conn, ack) for conn in (entry.conn, *entry.repeats)]
                continue
            before = self.document.items
            self.document.apply(op)
            targeted = entry.forward is not None and entry.target_user is not None
            # (Compared only for a targeted one: every member loads the others.)
            changed = not targeted or self.document.items != before
            others = set(self._members) - {op.user_id}
            # (A sender who left meanwhile is owed nothing.)
            sender = op.user_id if op.user_id in self._members else None
            if isinstance(entry, PendingRestore):
                sender, loaders = None, set(self._members)
            elif targeted:
                # The host's canvas for one newcomer (Optiverse sends one at
                # every join): the others load it too if it changed anything.
                loaders = others if changed else {entry.target_user} - {op.user_id}
            else:
                loaders = others
            if changed or not targeted:
                # The loaders reload the document whole: nothing of theirs to
                # merge; the sender and changes made before loading it may
                # still need correcting (CorrectionTracker.replaced).
                self._fields.forget()
                if self._tracker.replaced(sender, loaders, now):
                    due_before = -1
                due_before = min(due_before, self._tracker.pending)
            elif targeted:
                # Nothing changed, but the target loads it: a change of its
                # own crossing it may be lost from its window (corrected).
                self._tracker.replaced(None, loaders, now)
                due_before = min(due_before, self._tracker.pending)
            if isinstance(entry, PendingRestore):
                # Every member, as the others after a sync:update.
                pings = self._loading(self.connections())
                effects += [Broadcast(self._sync_state()), *pings, Restored(entry.ticket, op.seq)]
                continue
            if entry.forward is not None:
                effects += self._forward(entry.forward, entry.target_user, exclude=op.user_id)
                if targeted and changed:
                    state = self._sync_state()
                    conns = [
                        member.conn
                        for user_id, member in self._members.items()
                        if user_id not in (op.user_id, entry.target_user)
                    ]
                    effects += [Send(conn, state) for conn in conns]
                    effects += self._loading(conns)
            else:
                pings = self._loading(self.connections(exclude=op.user_id))
                effects += [Broadcast(self._sync_state(), exclude=op.user_id), *pings]
            if entry.reload_sender and self.document.items != before and self.is_member(entry.conn, op.user_id):
                # (Unchanged, the document is what its window shows already.)
                effects.append(Send(entry.conn, self._sync_state()))
                effects += self._loading((entry.conn,))
            ack = Ack(op.seq, op.op_id)
            effects += [Send(conn, ack) for conn in (entry.conn, *entry.repeats)]
        if self._tracker.pending > due_before:
            effects.append(WantCorrections())
        # Snapshots by the bytes journaled since the last one, and never more
        # often than the document's own size: disk writes stay proportional
        # to the changes, however large the document.
        self.journal_bytes += batch.size
        if (
            batch.ops
            and not self._snapshotting
            and self.journal_bytes >= max(self.snapshot_bytes, self.document.size)
        ):
            effects.append(WantSnapshot(self._take_snapshot()))
        if self._pending:
            effects.append(WANT_COMMIT)
        return effects

    def _apply_command(self, op: Op, entry: PendingCommand) -> bytes | None:
        """Apply a committed command; a move or update may make a correction
        due. Returns the command's encoding for the relay, made for a large
        command only (see ENCODE_ONCE_FROM)."""
        command_json = op.command_json
        if command_json is None and op.size >= ENCODE_ONCE_FROM:
            command_json = encode_command(op.command)
        command = op.command or {}
        action, item_id = command.get("action"), command.get("item_id")
        created = action == "update_item" and item_id not in self.document.items
        self.document.apply(op, command_json)
        level = _CHANGE_LEVELS.get(action)
        if self.corrections_enabled and level is not None and isinstance(item_id, str):
            # A merge that kept a value of the sender's out: it shows that value.
            self._tracker.committed(
                op.user_id,
                item_id,
                arrived=entry.arrived,
                now=self.now(),
                level=level,
                force=entry.stale,
                order=entry.order,
            )
            if created and item_id in self.document.items:
                # Relayed as an update, which a window without the item ignores.
                self._tracker.created(
                    op.user_id, item_id, self._members, self.now(), arrived=entry.arrived, order=entry.order
                )
        return command_json

    def _refused(self, entry: PendingCommand) -> list[Effect]:
        """A move or update of a removed item: an error, and the removal again."""
        item_id = entry.command.get("item_id")
        self.stats.refusals += 1
        self.stats.corrections += 1
        if isinstance(item_id, str):
            self._tracker.corrected(entry.user_id, item_id, self.now())
        error = Error(
            ErrorCode.ITEM_REMOVED,
            f"item {item_id!r} was removed; the change was not applied",
            "command",
        )
        remove = Correction(
            {"action": "remove_item", "item_type": entry.command.get("item_type"), "item_id": item_id, "data": {}},
            self.document.version,
            self.clock(),
        )
        effects: list[Effect] = []
        for conn in (entry.conn, *entry.repeats):
            effects += [Send(conn, error), Send(conn, remove)]
        return effects

    # -- corrections ---------------------------------------------------------

    def next_correction_due(self) -> float | None:
        """When corrections() has something to send (the core's `now` time), or None."""
        due = self._tracker.next_due()
        if self._awaiting_canvas:
            waits = min(until for _, until in self._awaiting_canvas.values())
            due = waits if due is None else min(due, waits)
        return due

    def corrections(self) -> list[Effect]:
        """The corrections due now: each member gets the server's state of
        the items it may show otherwise; and a member probed for a canvas
        that sent none within canvas_wait, the document (see _sync_send)."""
        effects: list[Effect] = []
        if self._awaiting_canvas:
            now = self.now()
            for conn, (user_id, until) in list(self._awaiting_canvas.items()):
                if until <= now:
                    del self._awaiting_canvas[conn]
                    if self.is_member(conn, user_id):
                        effects += self._answer_sync(conn, SyncRequest(empty_state=True), 0)
        for user_id, item_id, level in self._tracker.take_due(self.now()):
            member = self._members.get(user_id)
            if member is None:
                continue
            commands = self._correction_commands(item_id, level)
            if item_id not in self.document.items:
                self._tracker.removed_by_correction(user_id, item_id)
            if commands:
                self.stats.corrections += 1
            version, now = self.document.version, self.clock()
            effects += [Send(member.conn, Correction(command, version, now)) for command in commands]
        return effects

    def _correction_commands(self, item_id: str, level: int) -> list[dict[str, Any]]:
        """Commands that bring a stock window to the stored state of one item.

        MOVE: its position; UPDATE: the whole item; EXISTENCE (an add or a
        remove took part, so the window may lack the item or have it wrongly):
        a remove and, if the item exists, an add of it (Optiverse ignores a
        move or update of an item it does not have, and an add of one it has
        would show it twice). An item the document lacks is removed whatever
        the level (a window may have it from an add that a replacement
        undid, then moved: only the move was the author's latest change).
        """
        item = self.document.items.get(item_id)
        remove = {"action": "remove_item", "item_type": None, "item_id": item_id, "data": {}}
        if item is None:
            return [remove]
        item_type = item.get("item_type")
        data = item_data(item)
        if level == EXISTENCE:
            return [{**remove, "item_type": item_type}, {"action": "add_item", "item_type": item_type,
                                                          "item_id": item_id, "data": data}]
        if level == UPDATE:
            return [{"action": "update_item", "item_type": item_type, "item_id": item_id, "data": data}]
        data = {f: item[f] for f in MOVE_FIELDS if f in item}
        return [{"action": "move_item", "item_type": item_type, "item_id": item_id, "data": data}]

    def commit_failed(self, batch: Batch, *, reset: bool = False, error: str | None = None) -> list[Effect]:
        """Nothing of the batch was stored: tell each sender; nobody else hears of it.

        With `reset` (an administrator deleted or replaced the session) every
        member must reconnect to see what is stored now. `error` (the store's
        one line) goes to a restore's ticket.
        """
        self._finish(batch)
        effects: list[Effect] = []
        for entry in batch.entries:
            if isinstance(entry, PendingSync):
                effects += self._sync_send(entry.conn, entry.request)
                continue
            if isinstance(entry, PendingCommand) and entry.refused == "document":
                effects += self._refused(entry)
                continue
            if isinstance(entry, PendingRestore):
                effects.append(Restored(entry.ticket, error=f"the restore was not stored: {error or 'store error'}"))
                continue
            ref = "command" if isinstance(entry, PendingCommand) else None
            refusal = Error(
                ErrorCode.NOT_PERSISTED,
                "the change was not stored and not sent to anyone; try again later",
                ref,
            )
            effects += [Send(conn, refusal) for conn in (entry.conn, *entry.repeats)]
        if reset:
            effects += self.close_all(CloseCode.GOING_AWAY, RESET_REASON)
        elif self._pending:
            effects.append(WANT_COMMIT)
        return effects

    def _finish(self, batch: Batch) -> None:
        if batch is not self._in_flight:
            raise ValueError("not the batch in flight")
        self._in_flight = None
        for entry in batch.entries:
            self.pending_bytes -= entry.size
            if isinstance(entry, PendingSync):
                continue
            self.pending_growth -= entry.growth
            if entry.op_id is not None:
                self._pending_op_ids.pop((entry.user_id, op_id_key(entry.op_id)), None)

    # -- snapshots -----------------------------------------------------------

    def snapshot_due(self) -> dict[str, Any] | None:
        """A snapshot to store now (when the session unloads), or None if current."""
        if self.document.version == self._snapshot_version or self._snapshotting:
            return None
        return self._take_snapshot()

    def _take_snapshot(self) -> dict[str, Any]:
        self._snapshotting = True
        self._snapshot_covers = self.journal_bytes
        return self.document.snapshot()

    def snapshot_saved(self, snapshot: dict[str, Any] | None) -> None:
        """The snapshot from WantSnapshot/snapshot_due is stored (None: it failed)."""
        self._snapshotting = False
        if snapshot is not None:
            self._snapshot_version = max(self._snapshot_version, snapshot["version"])
            # What was committed while it was written still counts for the next.
            self.journal_bytes -= self._snapshot_covers
        self._snapshot_covers = 0


def _describe_bytes(size: int) -> str:
    """`16 MiB (16777216 bytes)`, `512 bytes`: a size for an error message."""
    for unit, factor in (("MiB", MIB), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.4g} {unit} ({size} bytes)"
    return f"{size} bytes"
