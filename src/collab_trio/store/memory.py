"""In-memory store: documents live as long as the server process."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from ..document import DEFAULT_RETENTION, Op, SessionDocument


@attrs.define(eq=False)
class MemoryStore:
    """Keeps each session's document object, so a session that empties and is
    joined again finds its items; a restart loses everything."""

    retention: int = DEFAULT_RETENTION
    documents: dict[str, SessionDocument] = attrs.field(factory=dict)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background."""
        task_status.started()

    async def load(self, session_id: str) -> SessionDocument:
        """The session's document, created empty on first use."""
        await trio.lowlevel.checkpoint()
        document = self.documents.get(session_id)
        if document is None:
            document = self.documents[session_id] = SessionDocument(retention=self.retention)
        return document

    async def commit(self, session_id: str, epoch: str, ops: list[Op]) -> None:
        """Memory is the document itself: nothing to write."""
        await trio.lowlevel.checkpoint()

    async def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        """Nothing to write."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Nothing to release."""
        await trio.lowlevel.checkpoint()
