"""SQLiteStore: one Database, one data-directory lock and one writer, for a server.

Everything a session asks for becomes a job in one queue. The writer task
takes all queued jobs at once and runs them in one transaction in a worker
thread (group commit), so the event loop never waits on the disk and many
changes arriving together cost one commit. With fsync "normal" a small
commit is first made durable by one append to the pending log
(pending_log.py) and queued as a job nobody waits for: the writer lets such
jobs wait up to `pending_delay` (0.1 s) for company, so one transaction
stores many; a job someone waits for (a load, a snapshot) ends the wait,
and the queue keeps its order. Without the log (`pending_log=False`), a small commit
that finds the writer idle runs at once on the event loop, when that can't
wait on the disk or on a lock (WAL with synchronous=NORMAL doesn't fsync at
COMMIT; checkpoints, and the first write after one (which starts the WAL
over and syncs its header), are left to the thread; a write lock held by
another connection sends the commit to the thread instead). A thread round
trip costs five times such a transaction.

The rules that keep it honest:

- Every job gets exactly one outcome. The thread delivers its batch's
  outcomes itself (`start_thread_soon` + the trio token), so a cancelled
  writer can't lose a batch it has taken; jobs still queued when the writer
  is cancelled fail at once with "the store is closed".
- The queue is bounded in bytes (`queue_bytes`): a job costs the bytes of
  the messages that carried its ops plus a small fixed overhead, counted
  from admission until its outcome. `commit()` waits for room, first come
  first served, before anything is enqueued; a slow disk slows the senders
  instead of growing memory.
- Every wait of the store's own has a deadline (`close_timeout`): a
  transaction the thread can't be made to abandon is waited for that long
  when the writer stops, then its jobs fail with "may or may not be stored".
- One data directory, one server: run() holds an flock on
  `<data_dir>/collab.lock` (holding the PID) for as long as it runs; the OS
  drops it when the process dies, even by kill -9. Admin commands don't take it.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
import outcome
import trio

from ..config import ServerConfig
from ..document import DEFAULT_HISTORY_BYTES, DEFAULT_RETENTION, Op, SessionDocument
from ..history import DEFAULT_VERSIONS_BYTES, DEFAULT_VERSIONS_KEPT, KeptVersion
from .base import AdminRequest, LeaseChange, OutcomeUnknown, SessionReset, StoreError
from .database import (
    DATABASE_NAME,
    SCHEMA_VERSION,
    WAL_CHECKPOINT_BYTES,
    WAL_SIZE_LIMIT,
    Database,
    SessionInfo,
    TransactionAborted,
    database_path,
    describe_dir_error,
    op_record_text,
)
from .pending_log import (
    PendingLog,
    Segment,
    SetAside,
    delete_segments,
    encode_record,
    open_segment,
    refused_by_the_database,
    replay,
)

__all__ = [
    "DATABASE_NAME",
    "DataDirInUse",
    "LOCK_NAME",
    "SCHEMA_VERSION",
    "Database",
    "SQLiteStore",
    "SessionInfo",
    "database_path",
    "job_cost",
    "lock_data_dir",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

LOCK_NAME = "collab.lock"
# The same default as ServerConfig.store_queue_bytes.
DEFAULT_QUEUE_BYTES = ServerConfig().store_queue_bytes
# What a queued job costs besides its messages: the job, its closure and
# outcome, the Op objects (bytes; rough, deliberately not zero).
JOB_BYTES = 256
# Commits of at most this many bytes may run on the event loop, when the last
# commit ended at least INLINE_AFTER_IDLE seconds ago (SQLiteStore._commit_now).
INLINE_COMMIT_BYTES = 64 * 1024
INLINE_AFTER_IDLE = 0.002
# How long a change the pending log made durable waits for others to share
# its transaction (SQLiteStore.pending_delay).
PENDING_DELAY = 0.1
# Sessions remembered as reset under acknowledged changes (see _finish_logged).
RESETS_KEPT = 1024
# Logged changes the database refused are tried again after this long
# (doubling up to PENDING_RETRY_MAX); after PENDING_GIVE_UP seconds of
# failures the store stops taking commits (they wait in the log for a restart).
PENDING_RETRY = 0.1
PENDING_RETRY_MAX = 2.0
PENDING_GIVE_UP = 60.0
# The WAL is checkpointed after this many transactions that wrote (or
# database.WAL_CHECKPOINT_BYTES bytes of it, whichever comes first), in a
# thread and on a connection of its own (SQLiteStore._after_commit).
CHECKPOINT_EVERY = 1000
# An inline commit looks at the WAL file's size every this many transactions.
WAL_SIZE_CHECK_EVERY = 8
# A checkpoint that commits overtook (the WAL goes on) is tried again after
# this many more transactions.
CHECKPOINT_RETRY = 20
OP_BYTES = 128
# A snapshot handed over as items (encoded in the writer thread) is counted
# per item; one handed over as text (Session encodes it) by its length.
SNAPSHOT_ITEM_BYTES = 256
CLOSED = "the store is closed"
# Seconds between looks for admin requests (next_requests): one small read
# transaction in the writer's turn, never one per commit.
REQUEST_POLL = 1.0


class _Deferred(StoreError):
    """Not run: a logged change before it in its batch was refused (it goes
    back to the queue behind that change, in order)."""


class _SetAside(StoreError):
    """A logged change the database refused for good (an error of the change
    itself, not of the disk): kept in the running store's unapplied file."""


def _with_pending_position(
    jobs: list[_Job], set_aside: SetAside, *, note_position: bool = True
) -> tuple[list[Callable[[Database], Any]], list[int]]:
    """The functions of a batch's jobs, then one that notes in the same
    transaction how far the pending log is stored: up to the last logged
    change of an unbroken run of them the database took, or refused for a
    reset (never to be replayed), or refused for good and kept in the
    unapplied file (an error of the change itself; its session's members
    reconnect, and the session gets a new epoch in this transaction, so no
    seq they saw goes to another op and its later logged changes are set
    aside too). One refused by the disk, a lock or the database itself
    (refused_by_the_database) ends the run: it and every job after it go
    back to the queue in order, and stay to be replayed should the server
    stop now. The caller calls set_aside.transaction_ended() (what was set
    aside is cut off if the transaction does not commit).

    Consecutive logged changes of one session run as one function (see
    together()): the second list holds how many jobs each function runs,
    and _per_job() gives the outcomes back one per job."""
    reached: list[tuple[int, int]] = []
    refused = False

    def defer_if_stopped() -> None:
        if refused or not note_position:
            raise _Deferred()

    def roll_back_change(db: Database) -> None:
        db.conn.execute("ROLLBACK TO change")
        db.conn.execute("RELEASE change")

    def deferrable(fn: Callable[[Database], Any]) -> Callable[[Database], Any]:
        def run(db: Database) -> Any:
            defer_if_stopped()
            return fn(db)

        return run

    def logged(fn: Callable[[Database], Any], logged: _Logged) -> Callable[[Database], Any]:
        mark, session = (logged.segment.number, logged.end), (logged.session_id, logged.epoch)

        def set_apart(db: Database, exc: BaseException) -> _SetAside:
            nonlocal refused
            # At once, in this job's savepoint: the jobs after it in this
            # batch (a load, a snapshot, the session's next change) see it.
            # First: should it fail, nothing is in the file yet.
            db.new_epoch_for(*session)
            try:
                where = set_aside.add(logged.record, session)
            except OSError as error:
                refused = True  # tried again (never taken for a reset)
                raise StoreError(f"{_describe_error(exc)}; could not be kept aside: {error}") from None
            reached.append(mark)
            # A value, not raised: raising would roll the epoch back with the savepoint.
            return _SetAside(f"{_describe_error(exc)}; kept in {where}")

        def run(db: Database) -> Any:
            nonlocal refused
            defer_if_stopped()
            db.conn.execute("SAVEPOINT change")
            try:
                value = fn(db)
            except SessionReset as exc:
                if not db.conn.in_transaction:
                    raise
                roll_back_change(db)
                if set_aside.gone(session):
                    # Its epoch is gone because an earlier change was set aside.
                    return set_apart(db, exc)
                reached.append(mark)
                raise
            except Exception as exc:
                if not db.conn.in_transaction or refused_by_the_database(exc):
                    refused = True  # tried again
                    raise
                roll_back_change(db)
                return set_apart(db, exc)
            except BaseException:
                refused = True
                raise
            db.conn.execute("RELEASE change")
            reached.append(mark)
            return value

        return run

    def note(db: Database) -> None:
        try:
            if reached and note_position:
                db.note_pending_position(*reached[-1])
        except BaseException:
            # Nothing of the batch may be stored without these: all is tried again.
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise

    def together(run: list[_Job]) -> Callable[[Database], Any]:
        # Consecutive changes of one session: one append (one UPDATE and one
        # INSERT of all their rows) instead of six statements each. Should
        # the database refuse it, each is tried on its own, as above: the
        # one at fault is refused alone.
        first, last = run[0].logged, run[-1].logged
        assert first is not None and last is not None
        ops = [op for job in run for op in job.logged.ops]  # type: ignore[union-attr]
        texts = [text for job in run for text in job.logged.texts]  # type: ignore[union-attr]

        def each_alone(db: Database) -> list[outcome.Outcome]:
            try:
                # Made only now (rarely): no closures, cells or tuples per
                # change on the event loop, nor young objects for the
                # collector. Inside the try: should making them fail (memory),
                # the batch is tried again, as below.
                singles = [logged(job.fn, job.logged) for job in run]  # type: ignore[arg-type]
                return db.run_each(singles)
            except TransactionAborted:
                raise
            except BaseException:
                # A savepoint statement itself failed (or memory ran out):
                # what the singles stored or set aside can't be told from
                # what was undone. Nothing of the batch may be stored then:
                # all is tried again (as when the note fails).
                if db.conn.in_transaction:
                    db.conn.execute("ROLLBACK")
                raise

        def run_together(db: Database) -> _Each:
            defer_if_stopped()
            db.conn.execute("SAVEPOINT together")
            try:
                db.append(first.session_id, first.epoch, ops, None, texts)
            except Exception:
                if not db.conn.in_transaction:
                    raise  # the whole transaction is gone: run_each reports it for every job
                db.conn.execute("ROLLBACK TO together")
                db.conn.execute("RELEASE together")
                return _Each(each_alone(db))
            db.conn.execute("RELEASE together")
            reached.append((last.segment.number, last.end))
            return _Each(outcome.Value(None) for _ in run)

        return run_together

    units: list[Callable[[Database], Any]] = []
    sizes: list[int] = []
    start = 0
    while start < len(jobs):
        end = start + 1
        if jobs[start].logged is not None:
            while end < len(jobs) and _appends_after(jobs[end], jobs[end - 1]):
                end += 1
        job = jobs[start]
        if end - start > 1:
            units.append(together(jobs[start:end]))
        elif job.logged is None:
            units.append(deferrable(job.fn))
        else:
            units.append(logged(job.fn, job.logged))
        sizes.append(end - start)
        start = end
    return [*units, note], [*sizes, 1]


def _appends_after(job: _Job, previous: _Job) -> bool:
    """`job` is a logged change that continues `previous`'s (see _Logged.follows)."""
    return job.logged is not None and previous.logged is not None and job.logged.follows(previous.logged)


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def job_cost(ops: list[Op], replaced: KeptVersion | None = None) -> int:
    """Bytes a commit of these ops (and of the version they displace) holds in the queue."""
    return (
        JOB_BYTES
        + sum(OP_BYTES + op.size + (0 if op.command_json is None else len(op.command_json)) for op in ops)
        + (0 if replaced is None else replaced.size)
    )


def snapshot_cost(snapshot: dict[str, Any]) -> int:
    """Bytes a snapshot job is counted as: its text's UTF-8 bytes (Session's
    `text_bytes`, else measured), or for items still to encode an estimate
    per item."""
    text = snapshot.get("text")
    if text is not None:
        size = snapshot.get("text_bytes")
        if size is None:
            # UTF-8 bytes, not characters (isascii() is O(1)).
            size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        return JOB_BYTES + size
    return JOB_BYTES + SNAPSHOT_ITEM_BYTES * len(snapshot.get("items", ()))


class DataDirInUse(StoreError):
    """Another process (a server, with `pid` if known) holds the data directory's lock."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def data_dir_in_use(data_dir: Path) -> bool:
    """True if a server holds data_dir's lock now (changes nothing: a shared
    try of the lock, released at once; False if there is no lock file)."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (releases the shared lock, if taken)
    return False


def lock_data_dir(data_dir: Path) -> int:
    """Create the data directory if needed and take its server lock; the lock's fd.

    Closing the fd (or the death of the process) releases the lock.

    Raises:
        DataDirInUse: in use by another server (the message names its PID).
        StoreError: one line: not a directory, permission denied.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(describe_dir_error(data_dir, exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        by = f" (pid {holder})" if holder else ""
        raise DataDirInUse(f"data directory {data_dir} is in use by another collab-trio server{by}", holder) from None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"data directory {data_dir}: cannot lock {LOCK_NAME}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise StoreError(describe_dir_error(data_dir, exc)) from None
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # empty while the holder writes it


@attrs.define(unsafe_hash=True)  # a value: never changed (see "Per-change objects", ARCHITECTURE.md)
class _Logged:
    """Where a logged change is: its session, its segment and the offset
    past its record, and the record itself (kept aside if refused for good);
    and what the job stores (Database.append of these ops, these records)."""

    session_id: str
    epoch: str
    segment: Segment
    end: int
    record: bytes
    ops: list[Op]
    texts: list[str]

    def store(self, db: Database) -> None:
        """The job: the change's ops, with the records the log holds."""
        db.append(self.session_id, self.epoch, self.ops, None, self.texts)

    def follows(self, other: _Logged) -> bool:
        """This change's ops come right after `other`'s, in the same session and epoch."""
        return (
            self.session_id == other.session_id
            and self.epoch == other.epoch
            and self.ops[0].seq == other.ops[-1].seq + 1
        )


class _Each(list):  # type: ignore[type-arg]
    """The outcomes of several jobs run as one (see _with_pending_position)."""


def _per_job(results: list[outcome.Outcome], sizes: list[int]) -> list[outcome.Outcome]:
    """One outcome per job, from those of `sizes` jobs run as one each."""
    out: list[outcome.Outcome] = []
    for result, size in zip(results, sizes):
        if size == 1:
            out.append(result)
        elif isinstance(result, outcome.Value) and isinstance(result.value, _Each):
            out += result.value
        else:
            out += [result] * size  # the same failure (deferred, transaction aborted) for each
    return out


@attrs.define(eq=False)
class _Job:
    fn: Callable[[Database], Any]
    cost: int
    # True once in the queue (its bytes counted); before that it waits for room.
    admitted: bool = False
    # Set with the outcome; made by _submit() (a logged change's job has
    # nobody waiting for it: one object less per change).
    done: trio.Event | None = None
    result: outcome.Outcome | None = None
    # A change already durable in the pending log, that nobody waits for.
    logged: _Logged | None = None
    # When it was queued (trio time).
    queued_at: float = 0.0
    # Someone waits for it, and the writer should not wait for company.
    urgent: bool = True


@attrs.define(eq=False)
class _Batch:
    """Jobs taken by the writer for one transaction."""

    jobs: list[_Job]
    # Set on the event loop once the thread is done and outcomes are delivered.
    done: trio.Event = attrs.field(factory=trio.Event)


# NO_OP: data_dir's converter runs in __init__ only, so attribute assignments
# (several per commit) stay plain, not a Python-level __setattr__.
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class SQLiteStore:
    """The durable store: a Database driven by one writer task (see module doc)."""

    data_dir: Path = attrs.field(converter=Path)
    fsync: str = "normal"
    retention: int = DEFAULT_RETENTION
    # Bytes of ops a loaded document keeps for resume (--history-bytes).
    history_bytes: int = DEFAULT_HISTORY_BYTES
    busy_timeout: float = 5.0
    # Bytes of jobs admitted and not yet answered, all sessions together.
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    # Fault injection: seconds each transaction is held up in the thread.
    fault_commit_delay: float = 0.0
    # Longest wait, when the writer stops, for queued jobs to drain (aclose)
    # and for an in-flight transaction or the closing of the database.
    close_timeout: float = 10.0
    # Bounds of each session's versions (history.py).
    versions_kept: int = DEFAULT_VERSIONS_KEPT
    versions_bytes: int = DEFAULT_VERSIONS_BYTES
    # Seconds a change made durable by the pending log waits for the changes
    # after it before the writer stores them in one transaction.
    pending_delay: float = PENDING_DELAY
    # False: no pending log; small commits run on the event loop instead
    # (_commit_now), as they did before it.
    pending_log: bool = True
    _db: Database | None = None
    # Logged changes the database refused wait until then to be tried again.
    _retry_at: float = -math.inf
    _retry_delay: float = PENDING_RETRY
    _failing_since: float | None = None
    _closing_event: trio.Event = attrs.field(factory=trio.Event)
    # A logged change was given up (left in the log) while closing: no job
    # after it runs, and no batch notes a pending position past it.
    _position_frozen: bool = False
    # The pending log (fsync "normal" only; see pending_log.py).
    _pending: PendingLog | None = None
    # Queued urgent jobs (someone waits for them soon).
    _urgent_queued: int = 0
    # Set when a job someone waits for is queued, or the store closes: the
    # writer stops waiting for company for its logged jobs.
    _urgent: trio.Event = attrs.field(factory=trio.Event)
    # (session_id, epoch) an administrator deleted or replaced under changes
    # the pending log had acknowledged, or with a change the database
    # refused for good: that session's next commit fails.
    _resets: dict[tuple[str, str], StoreError] = attrs.field(factory=dict)
    # Where changes the database refused for good are kept (_SetAside).
    _set_aside: SetAside | None = None
    # The database has refused changes the pending log had acknowledged for
    # PENDING_GIVE_UP seconds: why. No commit is accepted until it takes them
    # (they are tried again meanwhile; the log keeps them for a restart).
    _broken: str | None = None
    # See Store.on_session_lost: the writer finds a session reset under a
    # logged change, or a logged change the database refuses for good.
    on_session_lost: Callable[[str, str, str], None] | None = None
    _lock_fd: int | None = None
    _queue: deque[_Job] = attrs.field(factory=deque)
    _queued_bytes: int = 0
    # Jobs waiting for room, first come first served.
    _waiting: deque[_Job] = attrs.field(factory=deque)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _in_flight: _Batch | None = None
    _started: bool = False
    # No new jobs (aclose() or the writer stopped); _closed: none will run.
    _closing: bool = False
    _closed: bool = False
    _stopped: trio.Event = attrs.field(factory=trio.Event)
    _writer_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    # Held by whichever thread uses the connection: a transaction, or the close.
    _db_lock: threading.Lock = attrs.field(factory=threading.Lock)
    # Set while a checkpoint runs (in its own thread, on its own connection).
    _checkpoint_done: trio.Event | None = None
    # A checkpoint is due and starts once the event loop gets to it.
    _checkpoint_soon: bool = False
    # The WAL file outgrew WAL_SIZE_LIMIT: the writer thread checkpoints,
    # holding the connection, before its next transaction.
    _wal_full: bool = False
    # How many transactions the writer has committed (for benchmarks).
    transactions: int = 0
    # Checkpoints that copied the whole WAL (the next write starts it over).
    checkpoints: int = 0
    # When the last commit() ended (see _commit_now).
    _last_commit: float = -math.inf
    # Never set: a local file is always reachable (see Store.unreachable).
    unreachable: str | None = None
    # Session hands snapshots over encoded (see Store.snapshot_text).
    snapshot_text: ClassVar[bool] = True

    @property
    def path(self) -> Path:
        """The database file."""
        return database_path(self.data_dir)

    @property
    def queued_bytes(self) -> int:
        """Bytes of jobs admitted and not yet answered (at most queue_bytes, or
        one job alone when it is larger)."""
        return self._queued_bytes

    @property
    def stopped(self) -> trio.Event:
        """Set once run() has ended: every job answered, the database closed,
        the data directory released (another server may open it now)."""
        return self._stopped

    # -- the writer ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Lock the data directory, open the database, then write until aclose().

        Raises:
            StoreError: before task_status.started(), the one-line reason the
                store can't be used (in use, not a directory, not a database...).
        """
        if self._started:
            raise RuntimeError("SQLiteStore.run() can be called once")
        self._started = True
        try:
            with self._writer_scope:
                self._db, self._lock_fd = await trio.to_thread.run_sync(self._open)
                task_status.started()
                await self._write_loop()
        finally:
            with trio.CancelScope(shield=True):
                await self._shut_down()
            self._stopped.set()

    def _open(self) -> tuple[Database, int]:
        fd = lock_data_dir(self.data_dir)
        try:
            database = Database(
                self.path,
                fsync=self.fsync,
                busy_timeout=self.busy_timeout,
                retention=self.retention,
                history_bytes=self.history_bytes,
                commit_delay=self.fault_commit_delay,
                manual_checkpoints=True,
                versions_kept=self.versions_kept,
                versions_bytes=self.versions_bytes,
            )
        except BaseException:
            os.close(fd)
            raise
        try:
            # What the last run acknowledged and had not stored yet, first.
            replay(database, self.data_dir)
            if self.fsync == "normal" and self.pending_log:
                self._pending = PendingLog.start(self.data_dir, database.read(lambda db: db.pending_position()))
        except BaseException:
            database.close()
            os.close(fd)
            raise
        try:
            # Rows an earlier version left for sessions that were only visited.
            forgotten = database.run(lambda db: db.forget_unwritten())
        except StoreError as exc:
            log.warning("Could not remove never-written sessions from %s: %s", self.path, exc)
        else:
            if forgotten:
                log.info("Removed %d stored session(s) that were visited but never written", forgotten)
        return database, fd

    async def _write_loop(self) -> None:
        while True:
            while not self._queue:
                self._start_checkpoint()
                if self._closing and not self._waiting:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
            if self._retry_at > trio.current_time() and not self._closing:
                with trio.move_on_at(self._retry_at):
                    await self._closing_event.wait()
            if not self._urgent_queued and not self._closing:
                # Only logged changes, durable already: let those of the next
                # few milliseconds share their transaction.
                with trio.move_on_at(self._queue[0].queued_at + self.pending_delay):
                    await self._urgent.wait()
                if self._urgent.is_set():
                    self._urgent = trio.Event()
            self._start_checkpoint()
            batch = _Batch(list(self._queue))
            self._queue.clear()
            self._urgent_queued = 0
            if self._urgent.is_set():
                self._urgent = trio.Event()  # set again by the next urgent job
            self._in_flight = batch
            self._start_transaction(batch)
            await batch.done.wait()
            self._in_flight = None
            if self._pending is not None:
                await self._tend_pending_log(self._pending)

    async def _tend_pending_log(self, pending: PendingLog) -> None:
        """Move on to a new segment once the current one is full, and delete
        those whose changes are all stored (in a thread: file system work)."""
        if pending.full and pending.broken is None:
            try:
                segment = await trio.to_thread.run_sync(open_segment, self.data_dir, pending.next_number())
            except StoreError as exc:
                log.warning("The pending log goes on in its current segment: %s", exc)
            else:
                pending.switch_to(segment)
        deletable = pending.take_deletable()
        if deletable:
            await trio.to_thread.run_sync(delete_segments, self.data_dir, deletable)

    def _start_transaction(self, batch: _Batch) -> None:
        # Synchronous on purpose: once taken, a batch is in the thread's
        # hands, and the thread reports back whether or not anyone still waits.
        assert self._db is not None
        database, token = self._db, trio.lowlevel.current_trio_token()
        jobs = [job.fn for job in batch.jobs]
        sizes = [1] * len(jobs)
        set_aside = None
        if any(job.logged is not None for job in batch.jobs):
            if self._set_aside is None:
                self._set_aside = SetAside(self.data_dir)
            set_aside = self._set_aside
            jobs, sizes = _with_pending_position(batch.jobs, set_aside, note_position=not self._position_frozen)
        wal_full, self._wal_full = self._wal_full, False

        def transact() -> list[outcome.Outcome]:
            with self._db_lock:
                if wal_full:
                    # No commit can overtake this one: the WAL starts over
                    # with the transaction below.
                    database.since_checkpoint = 0
                    database.checkpoint()
                try:
                    results = database.run_jobs(jobs)
                except Exception as exc:
                    # A bug in run_jobs itself: fail the batch, never leave a caller waiting.
                    log.exception("Store writer error; %d job(s) failed", len(jobs))
                    database.abort_transaction()
                    error = StoreError(f"internal store error: {type(exc).__name__}: {exc}")
                    results = [outcome.Error(error) for _ in jobs]
                if set_aside is not None:
                    # The note job runs last: its success means the transaction committed.
                    try:
                        set_aside.transaction_ended(committed=isinstance(results[-1], outcome.Value))
                    except OSError as exc:
                        log.error("Could not cut back %s: %s", set_aside.path, exc)
                return _per_job(results, sizes)[: len(batch.jobs)]

        def deliver(result: outcome.Outcome) -> None:
            try:
                token.run_sync_soon(self._finish_batch, batch, result)
            except trio.RunFinishedError:
                pass  # the event loop is gone, and with it everyone who waited

        trio.lowlevel.start_thread_soon(transact, deliver, name="collab-trio store writer")

    def _finish_batch(self, batch: _Batch, result: outcome.Outcome) -> None:
        self.transactions += 1
        if self._in_flight is batch:
            self._in_flight = None  # at once: a caller woken next may commit at once
        self._after_commit(check_size=True)
        try:
            results = result.unwrap()
        except BaseException as exc:  # noqa: BLE001 - reported to every job of the batch
            error = StoreError(f"internal store error: {type(exc).__name__}: {exc}")
            results = [outcome.Error(error) for _ in batch.jobs]
        if self._pending is None:
            # The store shut down and answered these jobs already (OutcomeUnknown).
            for job, job_result in zip(batch.jobs, results):
                self._finish(job, job_result)
            batch.done.set()
            return
        again: list[_Job] = []
        for job, job_result in zip(batch.jobs, results):
            if isinstance(job_result, outcome.Value) and isinstance(job_result.value, _SetAside):
                job_result = outcome.Error(job_result.value)
            if isinstance(job_result, outcome.Error) and isinstance(job_result.error, _Deferred):
                again.append(job)
                continue
            if job.logged is not None and not self._finish_logged(job.logged, job_result):
                again.append(job)  # stays admitted, its bytes counted
                continue
            self._finish(job, job_result)
        if any(job.logged is not None for job in batch.jobs):
            self._logged_outcome(again)
        batch.done.set()

    def _logged_outcome(self, again: list[_Job]) -> None:
        """Put logged changes the database refused back at the head of the
        queue, to be tried again a little later (in order: those behind them
        wait); give up after PENDING_GIVE_UP seconds of failures."""
        now = trio.current_time()
        if not again:
            if self._broken is not None:
                log.info("The database stores the acknowledged changes again")
                self._broken = self.unreachable = None
            self._failing_since, self._retry_delay = None, PENDING_RETRY
            return
        if self._closing:
            # No more tries: they stay in the pending log, for the next start.
            log.warning(
                "%d acknowledged change(s) are left in the pending log in %s for the next start",
                len(again),
                self.data_dir,
            )
            # Nothing after them may be stored either (their order): every job
            # still queued fails as on a cancelled stop.
            self._position_frozen = True
            for job in (*again, *self._queue, *self._waiting):
                self._finish(job, outcome.Error(StoreError(CLOSED)))
            self._queue.clear()
            self._waiting.clear()
            return
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since >= PENDING_GIVE_UP and self._broken is None:
            self._broken = (
                f"the database has refused changes already acknowledged for {PENDING_GIVE_UP:g} s;"
                f" they are kept in the pending log in {self.data_dir} for the next start"
            )
            self.unreachable = self._broken
            log.error("Store failing: %s", self._broken)
        for job in reversed(again):
            self._queue.appendleft(job)
            if job.urgent and job.logged is None:
                self._urgent_queued += 1
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(2 * self._retry_delay, PENDING_RETRY_MAX)

    def _finish_logged(self, logged: _Logged, result: outcome.Outcome) -> bool:
        """The transaction's outcome for a change the pending log had made
        durable (and the session relayed and acknowledged); False: the
        database refused it, try again (a lock held too long, a full disk)."""
        session_id, epoch, segment = logged.session_id, logged.epoch, logged.segment
        assert self._pending is not None
        if isinstance(result, outcome.Value):
            self._pending.done(segment)
            return True
        exc = result.error
        if isinstance(exc, (SessionReset, _SetAside)):
            # A reset: an administrator deleted or replaced the session
            # meanwhile, and the change went with it (as if made just
            # before). Set aside: the database can't take this change (kept
            # for the operator): the session's members saw it, so they
            # reconnect to what is stored. Either way the session's next
            # commit fails, and its members are closed now.
            self._pending.done(segment)
            if isinstance(exc, _SetAside):
                log.error("Could not store an acknowledged change of session %s: %s", session_id, exc)
            if len(self._resets) >= RESETS_KEPT:
                self._resets.pop(next(iter(self._resets)))
            self._resets[(session_id, epoch)] = exc
            if self.on_session_lost is not None:
                try:
                    self.on_session_lost(session_id, epoch, "reset" if isinstance(exc, SessionReset) else "refused")
                except Exception:  # (a callback of the event loop's: never let it through)
                    log.exception("Closing session %s failed", session_id)
            return True
        if self._failing_since is None:
            log.warning("The database refused acknowledged changes; trying again: %s", exc)
        return False

    def _finish(self, job: _Job, result: outcome.Outcome) -> None:
        """Give a job its outcome, once; the first one given counts."""
        if job.result is not None:
            return
        job.result = result
        if job.done is not None:
            job.done.set()
        if job.admitted:
            self._release(job.cost)

    async def _shut_down(self) -> None:
        """Answer every job and close; bounded by close_timeout per step (shielded)."""
        self._closing = self._closed = True
        queued, self._queue = self._queue, deque()
        for job in queued:
            self._finish(job, outcome.Error(StoreError(CLOSED)))  # an outcome unwraps once
        waiting, self._waiting = self._waiting, deque()
        for job in waiting:
            self._finish(job, outcome.Error(StoreError(CLOSED)))
        batch = self._in_flight
        if batch is not None:
            # The thread can't be interrupted; its real outcomes are worth a wait.
            with trio.move_on_after(self.close_timeout):
                await batch.done.wait()
            if not batch.done.is_set():
                log.error(
                    "The store's transaction did not finish within %g s; %d change(s) may or may not be stored",
                    self.close_timeout,
                    len(batch.jobs),
                )
                unknown = OutcomeUnknown(
                    f"the disk did not answer within {self.close_timeout:g} s;"
                    " the change may or may not be stored"
                )
                for job in batch.jobs:
                    self._finish(job, outcome.Error(unknown))
        if self._checkpoint_done is not None:
            # Its own connection: bounded like the rest, then closed anyway.
            with trio.move_on_after(self.close_timeout):
                await self._checkpoint_done.wait()
        database, fd = self._db, self._lock_fd
        self._db = self._lock_fd = None
        pending, self._pending = self._pending, None
        if database is None and fd is None:
            return
        token, released = trio.lowlevel.current_trio_token(), trio.Event()

        def close() -> None:
            # Waits for a transaction still running (one we stopped waiting for).
            with self._db_lock:
                try:
                    if pending is not None:
                        if pending.all_stored():
                            delete_segments(self.data_dir, pending.segments())
                        else:
                            pending.close()  # the next start replays the rest
                    if database is not None:
                        database.close()
                except sqlite3.Error as exc:
                    log.warning("Closing %s: %s", self.path, exc)
                finally:
                    if fd is not None:
                        os.close(fd)  # releases the data directory

        def deliver(result: outcome.Outcome) -> None:
            try:
                token.run_sync_soon(released.set)
            except trio.RunFinishedError:
                pass

        trio.lowlevel.start_thread_soon(close, deliver, name="collab-trio store close")
        with trio.move_on_after(self.close_timeout):
            await released.wait()
        if not released.is_set():
            log.error("Closing the database took longer than %g s; left to finish in the background", self.close_timeout)

    # -- the bounded queue ----------------------------------------------------------

    def _fits(self, cost: int) -> bool:
        return self._queued_bytes == 0 or self._queued_bytes + cost <= self.queue_bytes

    def _enqueue(self, job: _Job) -> None:
        job.admitted = True
        job.queued_at = trio.current_time()
        self._queued_bytes += job.cost
        self._queue.append(job)
        if job.urgent:
            self._urgent_queued += 1
            self._urgent.set()
        self._wake.set()

    def _release(self, cost: int) -> None:
        self._queued_bytes -= cost
        if self._closing:
            self._wake.set()  # a draining writer may be done now
        # Enqueued here, in order: whoever is woken first can't jump the line.
        while self._waiting and not self._closed and self._fits(self._waiting[0].cost):
            self._enqueue(self._waiting.popleft())

    async def _submit(self, fn: Callable[[Database], T], cost: int, *, urgent: bool = True) -> T:
        """Queue a job and wait for its outcome. Not `urgent`: it may wait up
        to pending_delay with the logged changes (a poll nobody waits on)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller enqueues nothing
        if self._closing or self._db is None:
            raise StoreError(CLOSED)
        job = _Job(fn, cost, done=trio.Event(), urgent=urgent)
        if not self._waiting and self._fits(cost):
            self._enqueue(job)
        else:
            self._waiting.append(job)
        try:
            await job.done.wait()  # type: ignore[union-attr]
        except BaseException:
            if not job.admitted and job in self._waiting:
                # Cancelled while waiting for room: nothing was enqueued.
                self._waiting.remove(job)
                self._release(0)  # the next one in line may fit now
            # Else the job is queued or in flight: it still gets its outcome,
            # and its bytes are released then.
            raise
        assert job.result is not None
        return job.result.unwrap()

    # -- the Store interface ------------------------------------------------------------

    async def load(self, session_id: str) -> SessionDocument:
        """The stored document (snapshot + journal), or a new one; always a fresh
        object. Writes nothing: an unknown session is stored from its first commit."""
        return await self._submit(lambda db: db.load(session_id), JOB_BYTES)

    async def commit(
        self, session_id: str, epoch: str, ops: list[Op], replaced: KeptVersion | None = None
    ) -> None:
        """Journal ops in the next group commit, once they fit in the queue;
        `replaced` is kept as a version in the same transaction.

        A small commit is made durable by the pending log (_log_commit), or
        without it, when it finds the writer idle, runs at once on the event
        loop (_commit_now); everything else goes through the writer. Those
        two are a cancellation point but not a schedule point: the caller
        (a session's committer) yields before its next batch anyway, and the
        task switch would cost as much as the commit.

        Raises:
            StoreError: nothing was committed (SessionReset if an admin replaced it).
        """
        cost = job_cost(ops, replaced)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._log_commit(session_id, epoch, ops, replaced, cost):
            return
        job = lambda db: db.append(session_id, epoch, ops, replaced)  # noqa: E731
        result = self._commit_now(job, cost, after_pause=True)
        try:
            if result is None:
                await self._submit(job, cost)
                return
            result.unwrap()
        finally:
            self._last_commit = trio.current_time()

    def commit_now(
        self, session_id: str, epoch: str, ops: list[Op], replaced: KeptVersion | None = None
    ) -> bool:
        """commit() on the event loop, without awaiting, when _commit_now can;
        False if not (nothing done). For a burst of changes that found the
        session's committer idle: no pause in commits is needed.

        Raises:
            StoreError: nothing was committed (SessionReset if an admin replaced it).
        """
        cost = job_cost(ops, replaced)
        if self._log_commit(session_id, epoch, ops, replaced, cost):
            return True
        result = self._commit_now(lambda db: db.append(session_id, epoch, ops, replaced), cost, after_pause=False)
        if result is None:
            return False
        self._last_commit = trio.current_time()
        result.unwrap()
        return True

    def _log_commit(
        self, session_id: str, epoch: str, ops: list[Op], replaced: KeptVersion | None, cost: int
    ) -> bool:
        """Make a small commit durable with one append to the pending log and
        queue it for the writer, who stores it within pending_delay with the
        changes after it; False if this commit can't go that way (nothing
        done): a version to keep, a big one, no room in the queue (it waits
        its turn), jobs waiting for room (they go first), no log.

        Raises:
            StoreError: nothing was committed: the log could not be written,
                the store is failing, or an administrator deleted or replaced
                the session under changes already acknowledged (SessionReset).
        """
        if self._broken is not None:
            raise StoreError(self._broken)
        lost = self._resets.get((session_id, epoch))
        if lost is not None:
            raise (SessionReset if isinstance(lost, SessionReset) else StoreError)(str(lost))
        pending = self._pending
        if (
            pending is None
            or pending.broken is not None
            or replaced is not None
            or self._closing
            or self._db is None
            or cost > INLINE_COMMIT_BYTES
            or self.fault_commit_delay > 0
            or self._waiting
            or not self._fits(cost)
        ):
            return False
        texts = [op_record_text(op) for op in ops]
        record = encode_record(session_id, epoch, texts)
        segment, end = pending.append(record)
        logged = _Logged(session_id, epoch, segment, end, record, ops, texts)
        job = _Job(logged.store, cost, logged=logged, urgent=False)
        self._enqueue(job)
        self._last_commit = job.queued_at
        return True

    def _commit_now(self, job: Callable[[Database], Any], cost: int, *, after_pause: bool) -> outcome.Outcome | None:
        """Run one small job on the event loop, if that is cheap and safe now.

        A thread round trip costs ~250 us of CPU and as much latency, five
        times a small SQLite transaction in WAL mode with synchronous=NORMAL
        (no fsync at COMMIT). So when nothing is queued or in flight (order
        is kept), the job is small, COMMIT doesn't fsync, no other connection
        holds the write lock (never waits for it), the WAL file is within
        WAL_SIZE_LIMIT and the WAL does not start over (a checkpoint under
        the lock and a WAL restart sync the disk: the thread does them), the
        job runs here. It still reads and writes pages (write(),
        no sync): the OS page cache's business. None: use the writer.
        Not while a checkpoint runs either: its syncs can hold a write to
        the WAL (ext4 here: one commit in four took 9 ms instead of 0.1),
        and the event loop must not wait for the disk.

        With `after_pause` (a session's committer, which has batches back to
        back) only after a pause in commits: in busy sessions the thread pays
        for itself. It runs the transaction beside the event loop while the
        next batch grows, and big batches mean few writes to each member.
        """
        database = self._db
        if (
            (after_pause and trio.current_time() - self._last_commit < INLINE_AFTER_IDLE)
            or database is None
            or self._closing
            or self._in_flight is not None
            or self._checkpoint_done is not None
            or self._queue
            or self._waiting
            or cost > INLINE_COMMIT_BYTES
            or self.fsync != "normal"
            or self.fault_commit_delay > 0
            or database.wal_restart_pending
            or self._wal_full
            or not self._db_lock.acquire(blocking=False)
        ):
            return None
        try:
            try:
                results = database.run_jobs_now([job])
            except BaseException as exc:
                database.abort_transaction()  # never leave the write lock held
                if not isinstance(exc, Exception):
                    raise
                log.exception("Store error in a commit")
                results = [outcome.Error(StoreError(f"internal store error: {type(exc).__name__}: {exc}"))]
        finally:
            self._db_lock.release()
        if results is None:
            return None  # another connection writes: the writer waits for it
        self.transactions += 1
        self._after_commit(check_size=not database.since_checkpoint % WAL_SIZE_CHECK_EVERY)
        return results[0]

    def _after_commit(self, *, check_size: bool) -> None:
        """Start a checkpoint after CHECKPOINT_EVERY transactions; with
        `check_size`, also once the WAL file passed WAL_CHECKPOINT_BYTES, and
        see whether it outgrew WAL_SIZE_LIMIT.

        A checkpoint copies the WAL into the database file and syncs it (~12
        ms for 1000 small commits here, more on a busy disk; 200 took ~3.7
        ms: the syncs are a good part of it, hence few), so it runs in a thread and on a
        connection of its own (a PASSIVE checkpoint takes no write lock):
        commits go on meanwhile and none waits for it. Commits that overtake
        it keep the WAL from starting over; it is tried again a little later,
        and should the WAL still outgrow WAL_SIZE_LIMIT, the writer thread
        checkpoints before its next transaction, the connection held (the
        old way: bounded, at the cost of that one commit's latency).
        The write after a checkpoint that copied everything starts the WAL
        over, which syncs its header: that write is the writer thread's. While
        the checkpoint runs a read transaction pins the WAL (Database.pin_wal),
        so commits meanwhile append; they are the writer thread's too (see
        _commit_now).

        The writer task starts the checkpoint, once the task that made it
        due has yielded: the commit that made it due is relayed first.
        Started at once, its thread took the GIL while that commit's relays
        were written, and they reached the members 2-3 ms late.
        """
        database = self._db
        if database is None or self._closing:
            return
        due = database.since_checkpoint >= CHECKPOINT_EVERY
        if check_size:
            size = database.wal_size()
            if size > WAL_SIZE_LIMIT:
                self._wal_full = True
                return
            due = due or size > WAL_CHECKPOINT_BYTES
        if self._checkpoint_done is not None or self._checkpoint_soon or not due:
            return
        self._checkpoint_soon = True
        self._wake.set()

    def _start_checkpoint(self) -> None:
        """_after_commit()'s checkpoint, started by the writer task."""
        if not self._checkpoint_soon:
            return
        self._checkpoint_soon = False
        database = self._db
        if database is None or self._closing or self._checkpoint_done is not None or self._wal_full:
            # (With the WAL past its limit the writer thread checkpoints before
            # its next transaction, the connection held: a pin would stop the
            # WAL from starting over then.)
            return
        database.since_checkpoint = 0
        # Pinned, no write starts the WAL over while the checkpoint runs: the
        # writer thread's commits meanwhile append, and after a checkpoint
        # they kept from copying everything, commits go on on the event loop
        # at once. Else none runs here until the writer thread has started
        # the WAL over.
        pinned = database.pin_wal()
        database.wal_restart_pending = not pinned
        token, done = trio.lowlevel.current_trio_token(), trio.Event()
        self._checkpoint_done = done

        def on_loop(result: outcome.Outcome) -> None:
            self._checkpoint_done = None
            done.set()
            if pinned and not self._closed:
                database.unpin_wal()  # (closing, Database.close() closes the pin)
            try:
                copied_all = result.unwrap()
            except Exception:  # noqa: BLE001 - logged; the next one may succeed
                log.exception("Checkpoint of %s failed", self.path)
                copied_all = False
            if copied_all:
                # The next write may start the WAL over (and sync): the writer
                # thread's. Also when commits came meanwhile (they may not
                # have written, or come before the checkpoint looked): at
                # worst one trip through the thread too many.
                database.wal_restart_pending = True
                self.checkpoints += 1
                if not self._closed and database.wal_size() > WAL_CHECKPOINT_BYTES:
                    # Writer-thread commits appended while the pin was held:
                    # the WAL could not start over then, nor can it now (the
                    # frames they added are not copied), and commits back to
                    # back would race every later checkpoint the same way. The
                    # writer thread copies the little that is left, the lock
                    # held, and its next write starts the WAL over.
                    self._wal_full = True
            else:
                # Not all copied (commits appended after the pin's snapshot):
                # nothing can start over. Try again soon; or, with the WAL
                # this large already (commits back to back never leave a
                # checkpoint the last word), the writer thread copies the
                # rest, the lock held, and starts it over: the bulk is copied.
                database.wal_restart_pending = False
                database.since_checkpoint = max(database.since_checkpoint, CHECKPOINT_EVERY - CHECKPOINT_RETRY)
                if not self._closed and database.wal_size() > WAL_CHECKPOINT_BYTES:
                    self._wal_full = True

        def finished(result: outcome.Outcome) -> None:
            try:
                token.run_sync_soon(on_loop, result)
            except trio.RunFinishedError:
                pass

        trio.lowlevel.start_thread_soon(database.checkpoint, finished, name="collab-trio checkpoint")

    @property
    def checkpointing(self) -> bool:
        """True while a checkpoint runs or is about to start (see _after_commit)."""
        return self._checkpoint_done is not None or self._checkpoint_soon

    async def checkpoint_finished(self) -> None:
        """Return once no checkpoint runs or is about to start (see _after_commit)."""
        while self._checkpoint_soon:
            await trio.sleep(0)  # the writer task starts it
        while self._checkpoint_done is not None:
            await self._checkpoint_done.wait()
        await trio.lowlevel.checkpoint()

    async def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        """Store a snapshot in the next group commit (encoded in the writer thread)."""
        await self._submit(lambda db: db.save_snapshot(session_id, snapshot), snapshot_cost(snapshot))

    # -- versions and admin requests -------------------------------------------------

    def release(self, session_id: str) -> None:
        """Nothing to give up: one node, no leases."""

    async def lease_changes(self) -> list[LeaseChange]:
        """Never any: one node, no leases."""
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def next_requests(self) -> list[AdminRequest]:
        """Wait for admin requests (`sessions restore` beside this server):
        looks every REQUEST_POLL seconds; the requests returned are marked taken.

        Raises:
            StoreError: the store is closing.
        """
        while True:
            try:
                # Not urgent: a poll, and it must not make every change wait for it.
                rows = await self._submit(lambda db: db.take_requests(), JOB_BYTES, urgent=False)
            except StoreError as exc:
                if self._closing:
                    raise
                # A lock held too long, a full disk: look again next time.
                log.warning("Could not look for admin requests: %s", exc)
                rows = []
            if rows:
                return [AdminRequest(*row) for row in rows]
            await trio.sleep(REQUEST_POLL)

    async def finish_request(self, request: AdminRequest, *, seq: int | None = None, error: str | None = None) -> None:
        """Record a request's outcome for the admin command that waits for it."""
        await self._submit(lambda db: db.finish_request(request.id, seq=seq, error=error), JOB_BYTES)

    async def version_items(self, session_id: str, number: int) -> list[dict[str, Any]]:
        """The items of a stored version.

        Raises:
            StoreError: unknown session or version.
        """
        return await self._submit(lambda db: db.version_items(session_id, number), JOB_BYTES)

    async def restore(self, session_id: str, number: int) -> int:
        """Restore a version of a session no session runner has loaded (see
        Database.restore); the seq of the op that did it.

        Raises:
            StoreError: unknown session or version, or nothing stored.
        """
        return await self._submit(lambda db: db.restore(session_id, number), JOB_BYTES)

    async def aclose(self) -> None:
        """Let the writer finish every queued job, then close the database.

        Bounded: after close_timeout the writer is cancelled (queued jobs fail
        with "the store is closed"), and that stop has its own deadlines.
        """
        self._closing = True
        self._wake.set()
        self._urgent.set()
        self._closing_event.set()
        if not self._started:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(self.close_timeout):
            await self._stopped.wait()
        if not self._stopped.is_set():
            log.warning("The store did not finish its queue within %g s; stopping it", self.close_timeout)
            self._writer_scope.cancel()
            with trio.move_on_after(3 * self.close_timeout):
                await self._stopped.wait()
