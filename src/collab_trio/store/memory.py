"""In-memory store: documents live as long as the server process."""

from __future__ import annotations

import attrs

from ..document import SessionDocument


@attrs.define(eq=False)
class MemoryStore:
    """Keeps each session's document object, so a session that empties and is
    joined again finds its items; a restart loses everything."""

    documents: dict[str, SessionDocument] = attrs.field(factory=dict)

    async def load(self, session_id: str) -> SessionDocument:
        """The session's document, created empty on first use."""
        document = self.documents.get(session_id)
        if document is None:
            document = self.documents[session_id] = SessionDocument()
        return document

    async def aclose(self) -> None:
        """Nothing to release."""
