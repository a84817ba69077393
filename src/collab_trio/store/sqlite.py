"""SQLite store: a journal of ops plus snapshots, written in group commits.

`Database` is plain synchronous sqlite3 (the admin commands use it directly).
`SQLiteStore` owns one Database and one writer task: everything a session
asks for is queued, and the writer runs all queued jobs in one transaction in
a worker thread, so the event loop never waits on the disk and many
commands arriving together cost one commit (group commit). WAL mode;
`synchronous=NORMAL` survives a process crash, `FULL` also a power cut.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import outcome
import trio

from ..document import DEFAULT_RETENTION, REPLACE, Op, SessionDocument
from ..protocol import utc_timestamp
from .base import SessionReset, StoreError

T = TypeVar("T")
log = logging.getLogger(__name__)

DATABASE_NAME = "collab.sqlite3"
SCHEMA_VERSION = 1
FSYNC_MODES = {"normal": "NORMAL", "full": "FULL"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    epoch      TEXT NOT NULL,
    version    INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    session_id TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    written    INTEGER NOT NULL,
    items      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    session_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    op         TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
"""


def database_path(data_dir: str | Path) -> Path:
    """Where the database file of a data directory is."""
    return Path(data_dir) / DATABASE_NAME


def _op_to_json(op: Op) -> str:
    return json.dumps(op.to_record(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _op_from_json(text: str) -> Op:
    return Op.from_record(json.loads(text))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@attrs.frozen
class SessionInfo:
    """One row of `collab-trio sessions list`."""

    session_id: str
    items: int
    version: int
    epoch: str
    created_at: str
    updated_at: str
    size_bytes: int


class Database:
    """One sqlite3 connection to a data directory's database; not thread-safe."""

    def __init__(
        self,
        path: str | Path,
        *,
        fsync: str = "normal",
        busy_timeout: float = 5.0,
        retention: int = DEFAULT_RETENTION,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        self.retention = retention
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {sorted(FSYNC_MODES)}, not {fsync!r}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise StoreError(f"no collab-trio data at {self.path}")
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            self.conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute(f"PRAGMA synchronous={FSYNC_MODES[fsync]}")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer collab-trio (schema {version})"
                )
            if version < SCHEMA_VERSION:
                self.conn.executescript(_SCHEMA)
                self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {_describe(exc)}") from exc

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    # -- transactions ----------------------------------------------------------

    def run_jobs(self, jobs: list[Callable[[Database], Any]]) -> list[outcome.Outcome]:
        """Run jobs in one transaction, each in its own savepoint; one outcome each.

        A job that fails is rolled back alone; a failed COMMIT fails them all.
        """
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            error = StoreError(f"cannot start a transaction: {_describe(exc)}")
            return [outcome.Error(error) for _ in jobs]
        results: list[outcome.Outcome] = []
        for job in jobs:
            self.conn.execute("SAVEPOINT job")
            try:
                value = job(self)
            except Exception as exc:  # noqa: BLE001 - any failure of one job stays that job's
                if not self.conn.in_transaction:
                    # SQLite rolled the whole transaction back (e.g. disk full):
                    # earlier jobs' work is gone too.
                    error = StoreError(f"transaction aborted: {_describe(exc)}")
                    return [outcome.Error(error) for _ in jobs]
                self.conn.execute("ROLLBACK TO job")
                self.conn.execute("RELEASE job")
                results.append(outcome.Error(exc if isinstance(exc, StoreError) else StoreError(_describe(exc))))
            else:
                self.conn.execute("RELEASE job")
                results.append(outcome.Value(value))
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            error = StoreError(f"commit failed: {_describe(exc)}")
            return [outcome.Error(error) for _ in jobs]
        return results

    def abort_transaction(self) -> None:
        """Roll back whatever transaction is open, after an unexpected error."""
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the connection is unusable; the next BEGIN will say so

    def run(self, job: Callable[[Database], T]) -> T:
        """Run one job in its own transaction (admin commands)."""
        [result] = self.run_jobs([job])
        return result.unwrap()

    # -- jobs (called inside run_jobs) -------------------------------------------

    def load(self, session_id: str) -> SessionDocument:
        """Latest snapshot + later ops; creates the session row on first use."""
        row = self.conn.execute(
            "SELECT epoch, version FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            document = SessionDocument(retention=self.retention)
            now = utc_timestamp()
            self.conn.execute(
                "INSERT INTO sessions (session_id, epoch, version, created_at, updated_at)"
                " VALUES (?, ?, 0, ?, ?)",
                (session_id, document.epoch, now, now),
            )
            return document
        epoch, version = row
        snapshot = self.conn.execute(
            "SELECT version, written, items FROM snapshots WHERE session_id = ?", (session_id,)
        ).fetchone()
        if snapshot is None:
            document = SessionDocument(epoch=epoch, retention=self.retention)
        else:
            document = SessionDocument.from_snapshot(
                {
                    "epoch": epoch,
                    "version": snapshot[0],
                    "written": bool(snapshot[1]),
                    "items": json.loads(snapshot[2]),
                },
                retention=self.retention,
            )
        for (text,) in self.conn.execute(
            "SELECT op FROM journal WHERE session_id = ? ORDER BY seq", (session_id,)
        ):
            op = _op_from_json(text)
            if op.seq <= document.version:
                document.remember(op)  # already in the snapshot; kept for resume
            else:
                document.apply(op)
        if document.version != version:
            raise StoreError(
                f"session {session_id!r} is inconsistent: journal ends at {document.version},"
                f" the session row says {version}"
            )
        return document

    def append(self, session_id: str, epoch: str, ops: list[Op]) -> None:
        """Journal ops that follow the stored version of this epoch."""
        row = self.conn.execute(
            "SELECT epoch, version FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None or row[0] != epoch:
            raise SessionReset(f"session {session_id!r} was deleted or replaced")
        if ops[0].seq != row[1] + 1:
            raise StoreError(
                f"session {session_id!r}: op {ops[0].seq} does not follow stored version {row[1]}"
            )
        self.conn.executemany(
            "INSERT INTO journal (session_id, seq, op) VALUES (?, ?, ?)",
            [(session_id, op.seq, _op_to_json(op)) for op in ops],
        )
        self.conn.execute(
            "UPDATE sessions SET version = ?, updated_at = ? WHERE session_id = ?",
            (ops[-1].seq, ops[-1].timestamp, session_id),
        )

    def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        """Store a snapshot (never an older one) and compact the journal behind it."""
        row = self.conn.execute(
            "SELECT epoch FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None or row[0] != snapshot["epoch"]:
            return  # deleted or replaced meanwhile: this snapshot describes nothing stored
        self.conn.execute(
            "INSERT INTO snapshots (session_id, version, written, items) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (session_id) DO UPDATE SET version = excluded.version,"
            " written = excluded.written, items = excluded.items"
            " WHERE excluded.version > snapshots.version",
            (
                session_id,
                snapshot["version"],
                int(snapshot["written"]),
                json.dumps(snapshot["items"], ensure_ascii=False, allow_nan=False, separators=(",", ":")),
            ),
        )
        # Ops older than the retention window are only needed for resume; drop them.
        self.conn.execute(
            "DELETE FROM journal WHERE session_id = ? AND seq <= ?",
            (session_id, snapshot["version"] - self.retention),
        )

    # -- admin -------------------------------------------------------------------

    def backup(self, target: str | Path) -> None:
        """Copy a consistent state of the whole database into a new file."""
        target = Path(target)
        if target.exists():
            raise StoreError(f"{target} already exists; choose a new file")
        try:
            with sqlite3.connect(target) as copy:
                self.conn.backup(copy)
            copy.close()
        except sqlite3.Error as exc:
            target.unlink(missing_ok=True)
            raise StoreError(f"backup to {target} failed: {_describe(exc)}") from exc

    def session_ids(self) -> list[str]:
        """Every stored session id, sorted."""
        return [r[0] for r in self.conn.execute("SELECT session_id FROM sessions ORDER BY session_id")]

    def info(self, session_id: str) -> SessionInfo:
        """Summary of one stored session.

        Raises:
            StoreError: unknown session id.
        """
        row = self.conn.execute(
            "SELECT epoch, version, created_at, updated_at FROM sessions WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"no session {session_id!r}")
        document = self.load(session_id)
        size = self.conn.execute(
            "SELECT (SELECT COALESCE(SUM(LENGTH(op)), 0) FROM journal WHERE session_id = ?)"
            " + (SELECT COALESCE(SUM(LENGTH(items)), 0) FROM snapshots WHERE session_id = ?)",
            (session_id, session_id),
        ).fetchone()[0]
        return SessionInfo(
            session_id=session_id,
            items=len(document.items),
            version=row[1],
            epoch=row[0],
            created_at=row[2],
            updated_at=row[3],
            size_bytes=int(size),
        )

    def export(self, session_id: str) -> dict[str, Any]:
        """The session's document in the Optiverse state format."""
        if self.conn.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone() is None:
            raise StoreError(f"no session {session_id!r}")
        document = self.load(session_id)
        return {
            "items": list(document.items.values()),
            "version": document.version,
            "timestamp": utc_timestamp(),
        }

    def import_state(self, session_id: str, items: list[dict[str, Any]]) -> str:
        """Make `items` the whole document of the session, with a new epoch; returns it."""
        self.delete(session_id, missing_ok=True)
        document = SessionDocument(retention=self.retention)
        document.apply(Op(seq=1, user_id="(import)", kind=REPLACE, timestamp=utc_timestamp(), items=items))
        now = utc_timestamp()
        self.conn.execute(
            "INSERT INTO sessions (session_id, epoch, version, created_at, updated_at)"
            " VALUES (?, ?, 1, ?, ?)",
            (session_id, document.epoch, now, now),
        )
        self.save_snapshot(session_id, document.snapshot())
        return document.epoch

    def delete(self, session_id: str, *, missing_ok: bool = False) -> None:
        """Remove a session and its history."""
        cursor = self.conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
        if cursor.rowcount == 0 and not missing_ok:
            raise StoreError(f"no session {session_id!r}")
        self.conn.execute("DELETE FROM snapshots WHERE session_id = ?", (session_id,))
        self.conn.execute("DELETE FROM journal WHERE session_id = ?", (session_id,))

    def prune(self, older_than_days: float) -> list[str]:
        """Delete sessions with no activity for this many days; returns their ids."""
        cutoff = (datetime.now(timezone.utc) - timedelta(days=older_than_days)).isoformat()
        ids = [
            r[0]
            for r in self.conn.execute(
                "SELECT session_id FROM sessions WHERE updated_at < ? ORDER BY session_id", (cutoff,)
            )
        ]
        for session_id in ids:
            self.delete(session_id)
        return ids


@attrs.define(eq=False)
class _Job:
    fn: Callable[[Database], Any]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: outcome.Outcome | None = None


@attrs.define(eq=False)
class SQLiteStore:
    """The durable store: a Database driven by one writer task (see module doc)."""

    data_dir: Path = attrs.field(converter=Path)
    fsync: str = "normal"
    retention: int = DEFAULT_RETENTION
    busy_timeout: float = 5.0
    _db: Database | None = None
    _jobs: list[_Job] = attrs.field(factory=list)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _closing: bool = False
    _stopped: trio.Event = attrs.field(factory=trio.Event)
    # How many transactions and ops the writer has committed (for benchmarks).
    transactions: int = 0

    @property
    def path(self) -> Path:
        """The database file."""
        return database_path(self.data_dir)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the database, then run queued jobs until aclose()."""
        try:
            self._db = await trio.to_thread.run_sync(
                partial(
                    Database,
                    self.path,
                    fsync=self.fsync,
                    busy_timeout=self.busy_timeout,
                    retention=self.retention,
                )
            )
            task_status.started()
            await self._write_loop()
        finally:
            self._closing = True
            for job in self._jobs:
                job.result = outcome.Error(StoreError("the store is closed"))
                job.done.set()
            self._jobs.clear()
            if self._db is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._db.close)
            self._stopped.set()

    async def _write_loop(self) -> None:
        assert self._db is not None
        while True:
            if not self._jobs:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            batch, self._jobs = self._jobs, []
            # Not cancellable: a transaction in flight always finishes, so every
            # job gets its true outcome.
            try:
                results = await trio.to_thread.run_sync(self._db.run_jobs, [job.fn for job in batch])
            except Exception as exc:
                # A bug in run_jobs itself: fail the batch, never leave a caller waiting.
                log.exception("Store writer error; %d job(s) failed", len(batch))
                await trio.to_thread.run_sync(self._db.abort_transaction)
                error = StoreError(f"internal store error: {_describe(exc)}")
                results = [outcome.Error(error) for _ in batch]
            self.transactions += 1
            for job, result in zip(batch, results):
                job.result = result
                job.done.set()

    async def _submit(self, fn: Callable[[Database], T]) -> T:
        if self._closing or self._db is None:
            raise StoreError("the store is closed")
        job = _Job(fn)
        self._jobs.append(job)
        self._wake.set()
        await job.done.wait()
        assert job.result is not None
        return job.result.unwrap()

    async def load(self, session_id: str) -> SessionDocument:
        """The stored document (snapshot + journal), or a new one."""
        return await self._submit(lambda db: db.load(session_id))

    async def commit(self, session_id: str, epoch: str, ops: list[Op]) -> None:
        """Journal ops in the next group commit.

        Raises:
            StoreError: nothing was committed (SessionReset if an admin replaced it).
        """
        await self._submit(lambda db: db.append(session_id, epoch, ops))

    async def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        """Store a snapshot in the next group commit."""
        await self._submit(lambda db: db.save_snapshot(session_id, snapshot))

    async def aclose(self) -> None:
        """Let the writer finish queued jobs, then close the database."""
        self._closing = True
        self._wake.set()
        if self._db is not None:
            await self._stopped.wait()
