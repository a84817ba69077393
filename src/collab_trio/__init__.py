"""collab-trio: a real-time collaboration server for Optiverse, on trio."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["CollabServer", "ServerConfig", "__version__", "serve"]


def __getattr__(name: str) -> Any:
    # Lazy, so that the pure modules (protocol, document, session_core) can be
    # imported without importing trio.
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    if name in ("CollabServer", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
