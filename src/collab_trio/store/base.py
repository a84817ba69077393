"""The Store interface shared by every store."""

from __future__ import annotations

from typing import Any, Protocol

import trio

from ..document import Op, SessionDocument


class StoreError(Exception):
    """The store could not do what was asked (disk full, locked, corrupt...)."""


class SessionReset(StoreError):
    """The session was deleted or replaced (by an admin command) under a live server."""


class Store(Protocol):
    """What serve() and sessions need from a store."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (the writer); serve() runs it and cancels it last."""

    async def load(self, session_id: str) -> SessionDocument:
        """The session's document; a new empty one for an unknown session."""

    async def commit(self, session_id: str, epoch: str, ops: list[Op]) -> None:
        """Make these ops durable, in order, all or nothing.

        Raises:
            StoreError: nothing was committed.
        """

    async def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        """Record the document at snapshot["version"] so loading skips older ops."""

    async def aclose(self) -> None:
        """Finish queued work and release resources; called once when serve() ends."""

