"""Where session documents live: the Store interface and its two implementations.

A session loads its document once, then commits every change (an `Op`)
before anyone hears of it. `MemoryStore` keeps documents for the life of
the process; `SQLiteStore` journals ops to disk in group-committed
transactions from a worker thread, with snapshots, so that nothing
acknowledged is ever lost; its job queue is bounded in bytes and it locks
its data directory against a second server. `Database` (database.py) is the
synchronous sqlite3 layer the writer and the admin commands share.
`PostgresStore` (postgres.py, imported only when asked for: psycopg is an
extra) keeps the same rows in Postgres for several nodes, each session
served by the node holding its lease.
"""

from __future__ import annotations

from ..config import ServerConfig
from .base import (
    AdminRequest,
    LeaseChange,
    LeaseLost,
    OutcomeUnknown,
    SessionElsewhere,
    SessionReset,
    Store,
    StoreError,
)
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = [
    "AdminRequest",
    "LeaseChange",
    "LeaseLost",
    "MemoryStore",
    "OutcomeUnknown",
    "SQLiteStore",
    "SessionElsewhere",
    "SessionReset",
    "Store",
    "StoreError",
    "make_store",
]


def make_store(config: ServerConfig) -> Store:
    """The store the settings ask for."""
    if config.store == "memory":
        return MemoryStore(
            retention=config.retention,
            history_bytes=config.history_bytes,
            fault_commit_delay=config.fault_commit_delay,
        )
    # What both durable stores take from the settings.
    durable = {
        "retention": config.retention,
        "history_bytes": config.history_bytes,
        "queue_bytes": config.store_queue_bytes,
        "fault_commit_delay": config.fault_commit_delay,
        "versions_kept": config.versions_kept,
        "versions_bytes": config.versions_bytes,
    }
    if config.store == "postgres":
        from .postgres import PostgresStore, node_id_default, require_psycopg

        require_psycopg()
        return PostgresStore(
            database_url=config.database_url or "",
            node_id=config.node_id or node_id_default(config.port),
            lease_timeout=config.lease_timeout,
            **durable,
        )
    return SQLiteStore(config.data_dir, fsync=config.fsync, pending_delay=config.pending_delay, **durable)
