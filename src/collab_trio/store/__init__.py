"""Where session documents live between loads.

The interface is deliberately small so that a durable store (SQLite) can
implement it later; the session never touches storage any other way.
"""

from __future__ import annotations

from typing import Protocol

from ..document import SessionDocument
from .memory import MemoryStore

__all__ = ["MemoryStore", "Store"]


class Store(Protocol):
    """Loads the document of a session when the session becomes live."""

    async def load(self, session_id: str) -> SessionDocument:
        """The session's document; a new empty one for an unknown session."""

    async def aclose(self) -> None:
        """Release resources; called once when the server stops."""
