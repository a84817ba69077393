"""Where session documents live: the Store interface and its two implementations.

A session loads its document once, then commits every change (an `Op`)
before anyone hears of it. `MemoryStore` keeps documents for the life of
the process; `SQLiteStore` journals ops to disk in group-committed
transactions from a worker thread, with snapshots, so that nothing
acknowledged is ever lost.
"""

from __future__ import annotations

from ..config import ServerConfig
from .base import SessionReset, Store, StoreError
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore", "SessionReset", "Store", "StoreError", "make_store"]


def make_store(config: ServerConfig) -> Store:
    """The store the settings ask for."""
    if config.store == "memory":
        return MemoryStore(retention=config.retention)
    return SQLiteStore(config.data_dir, fsync=config.fsync, retention=config.retention)
