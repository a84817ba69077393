"""The Store interface shared by every store, and the contract it keeps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
import trio

from ..document import Op, SessionDocument
from ..history import KeptVersion


class StoreError(Exception):
    """The store could not do what was asked (disk full, locked, corrupt...).

    Its message is one line that names what is wrong with what, fit to be
    printed as `error: <message>`.
    """


class SessionReset(StoreError):
    """The session was deleted or replaced (by an admin command) under a live server."""


class OutcomeUnknown(StoreError):
    """The store gave up waiting for the disk: the change may or may not be stored."""


class LeaseLost(StoreError):
    """Another node took the session over (PostgresStore): this node must
    never commit for it again; its members reconnect (1012)."""


class SessionElsewhere(StoreError):
    """Another live node serves the session (PostgresStore): retry (1013)."""

    def __init__(self, session_id: str, owner: str) -> None:
        super().__init__(f"session {session_id!r} is served by {owner}")
        self.owner = owner


@attrs.frozen
class LeaseChange:
    """A session this node must stop serving: its lease was "lost", or another
    node "wanted" it (a graceful handoff)."""

    session_id: str
    kind: str


@attrs.frozen
class AdminRequest:
    """An admin command for the running server (see admin.py): restore
    `version` of `session_id`."""

    id: int
    session_id: str
    action: str
    version: int


class Store(Protocol):
    """What serve() and sessions need from a store.

    The contract, for every implementation:

    - Every awaited call returns or raises in bounded time while run() is
      running, and a job handed to the store always gets its outcome: no
      caller is ever left waiting on a store that stopped.
    - Calls made after run() ended (and, for SQLiteStore, before it started)
      raise StoreError ("the store is closed").
    - A call cancelled while waiting for room did nothing; one cancelled after
      its job was enqueued may still take effect. The caller can't tell the
      two apart, so a commit abandoned on a deadline has an unknown outcome
      (shield the wait to learn it; bound it with your own deadline).
    """

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open (and lock) the store, call task_status.started() only once it is
        usable, then do the background work until aclose() or cancellation.

        Cancelling it answers every queued job with StoreError at once; a
        transaction in flight finishes and delivers its real outcomes (for a
        bounded time).

        Raises:
            StoreError: before started(), the one-line reason the store can't
                be used (data directory in use, not a directory, not a database...).
        """

    async def load(self, session_id: str) -> SessionDocument:
        """A fresh document object for the session, sharing nothing mutable with
        what the store keeps; a new empty one for an unknown session. Loading
        need not store anything (SQLiteStore writes nothing: a session is stored
        from its first commit, and until then each load may give a new epoch)."""

    async def commit(self, session_id: str, epoch: str, ops: list[Op], replaced: KeptVersion | None = None) -> None:
        """Make these ops durable, in order, all or nothing. The first commit of
        an unknown session (ops from seq 1) stores it, with this epoch.
        `replaced`, the document the ops' replacement displaces, is kept as a
        version in the same transaction (a store may keep none: MemoryStore).

        May wait (cancellably, before anything is enqueued) for room in a
        queue bounded in bytes (the ops' `size`). The store keeps its own copy
        of the payloads: the caller's document may mutate them afterwards.

        Raises:
            SessionReset: the session was deleted or replaced by an admin.
            StoreError: nothing was committed.
        """

    def commit_now(self, session_id: str, epoch: str, ops: list[Op], replaced: KeptVersion | None = None) -> bool:
        """commit(), without awaiting, if the store can do that cheaply now;
        False (nothing done) if not: then use commit().

        Raises:
            SessionReset, StoreError: as commit() (nothing was committed).
        """

    # True if save_snapshot() writes the items as text: the caller may then
    # hand them over encoded (snapshot["text"] from encode_items() or
    # item_pieces() and items_json()) instead of as snapshot["items"], and
    # may add snapshot["text_bytes"], the text's length in UTF-8.
    snapshot_text: bool

    async def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        """Record the document at snapshot["version"] so loading skips older ops.

        Raises:
            StoreError: nothing was stored (the ops are still in the journal).
        """

    async def next_requests(self) -> list[AdminRequest]:
        """Wait for admin requests to carry out (MemoryStore: none, ever)."""

    async def finish_request(self, request: AdminRequest, *, seq: int | None = None, error: str | None = None) -> None:
        """Record a request's outcome (seq, or error) for whoever asked."""

    async def version_items(self, session_id: str, number: int) -> list[dict[str, Any]]:
        """The items of a stored version of a session.

        Raises:
            StoreError: unknown session or version.
        """

    async def restore(self, session_id: str, number: int) -> int:
        """Restore a version of a session that is not live; the seq of the op.

        Raises:
            StoreError: unknown session or version, or nothing stored.
        """

    # Why the store can't be reached (PostgresStore: its last lease renewal
    # failed), else None; /readyz is 503 meanwhile.
    unreachable: str | None

    # Told (session_id, epoch, "reset" or "refused") when the store finds,
    # after acknowledging a change (SQLiteStore's pending log), that the
    # session was reset under it or that the database refuses it for good;
    # the server sets it (SessionRegistry closes the session's members).
    on_session_lost: Callable[[str, str, str], None] | None

    def release(self, session_id: str) -> None:
        """The session was unloaded and everything it committed is answered:
        give up its lease (PostgresStore; the others hold no leases)."""

    async def lease_changes(self) -> list[LeaseChange]:
        """Wait for sessions this node must stop serving (never, for the
        stores of one node)."""

    async def aclose(self) -> None:
        """Finish queued work (within a deadline) and release resources; called
        once when serve() ends, before run() is cancelled."""
