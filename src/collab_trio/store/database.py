"""The database of a data directory: plain synchronous sqlite3, no trio.

`Database` is one connection; `SQLiteStore` (sqlite.py) drives one from a
writer thread, and the admin commands use their own, beside a running
server: WAL mode lets readers (`read()`, BEGIN DEFERRED) work without ever
blocking the writer, and a busy timeout makes short admin writes wait their
turn. `synchronous=NORMAL` survives a process crash, `FULL` also a power cut.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
import orjson
import outcome

from ..document import DEFAULT_HISTORY_BYTES, DEFAULT_RETENTION, REPLACE, Op, SessionDocument, new_epoch, replacement_items
from ..history import ADMIN_USER, KeptVersion, VersionInfo, digest, replace_reason, versions_to_drop, worth_keeping
from ..protocol import loads, utc_timestamp
from .base import SessionReset, StoreError

T = TypeVar("T")
log = logging.getLogger(__name__)

# Bytes of WAL after which the server checkpoints in the background, and the
# size the file is cut back to when it starts over (SQLite's own default is
# 1000 pages, ~4 MiB: each checkpoint syncs twice, so fewer, larger ones
# disturb the commits that run beside them less often).
WAL_CHECKPOINT_BYTES = 16 * 1024 * 1024
# Past this the writer checkpoints before its next transaction, whatever runs.
WAL_SIZE_LIMIT = 64 * 1024 * 1024

DATABASE_NAME = "collab.sqlite3"
# 2: versions and requests (readable by this version from 1 on: a data
# directory written by 1 is upgraded by the first connection that writes).
SCHEMA_VERSION = 3
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
CREATE TABLE IF NOT EXISTS versions (
    session_id  TEXT NOT NULL,
    number      INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    replaced_at TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    items       INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    digest      TEXT NOT NULL,
    document    TEXT NOT NULL,
    UNIQUE (session_id, number)
);
CREATE TABLE IF NOT EXISTS requests (
    id         INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    action     TEXT NOT NULL,
    version    INTEGER NOT NULL,
    state      TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    seq        INTEGER,
    error      TEXT
);
CREATE TABLE IF NOT EXISTS pending_position (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    segment INTEGER NOT NULL,
    end_at  INTEGER NOT NULL
);
"""
# pending_position (schema 3): how far the pending log (store/pending_log.py)
# is in this database, written in the transaction that stored it: a record
# at or before it is never replayed, whatever happened to its session since.
# Requests (admin commands a running server carries out, see admin.py):
# state PENDING until the server takes one (TAKEN), then DONE (seq) or FAILED
# (error). One not taken by `expires_at` (its command gave up) is never
# carried out: a server started days later must not restore behind anyone's back.
PENDING, TAKEN, DONE, FAILED = "pending", "taken", "done", "failed"
# Finished requests nobody collected are deleted after this long.
REQUEST_TTL = timedelta(days=1)


# Bytes of a session's rows (CAST AS BLOB: bytes, and no UTF-8 character count).
_SIZE_QUERY_1 = (
    "SELECT (SELECT COALESCE(SUM(LENGTH(CAST(op AS BLOB))), 0) FROM journal WHERE session_id = :id)"
    " + (SELECT COALESCE(SUM(LENGTH(CAST(items AS BLOB))), 0) FROM snapshots WHERE session_id = :id)"
)
_SIZE_QUERY = _SIZE_QUERY_1 + " + (SELECT COALESCE(SUM(bytes), 0) FROM versions WHERE session_id = :id)"


def database_path(data_dir: str | Path) -> Path:
    """Where the database file of a data directory is."""
    return Path(data_dir) / DATABASE_NAME


# -- JSON ----------------------------------------------------------------------
#
# Rows hold JSON text (TEXT columns: str, never bytes, which SQLite would keep
# as BLOBs). orjson does the work, several times faster than the stdlib: the
# writer thread holds the GIL while it encodes or parses, so a long call
# stalls the event loop. Exactly what the stdlib wrote and read before stays
# readable, and exact: integers beyond 64 bits (orjson would make floats of
# them) and anything else orjson refuses go through the stdlib.

_stdlib_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
# Digits become "0", everything else " " (one bytes.translate).
_DIGIT_MASK = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGITS = b"0" * 19  # may not fit in 64 bits


def _dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON. Stored values were validated on the way in (finite
    numbers, no lone surrogates); orjson would write a non-finite float as null."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits, nesting beyond orjson's limit, non-string keys.
        return _stdlib_encoder.encode(value).encode("utf-8")


def _loads(text: str) -> Any:
    """Parse stored JSON text as the stdlib does, at orjson's speed where that is the same.

    Raises:
        ValueError, RecursionError: not JSON (as json.loads raises them).
    """
    if _LONG_DIGITS in text.encode("utf-8", "surrogatepass").translate(_DIGIT_MASK):
        return json.loads(text)
    try:
        return loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # what orjson refuses and the stdlib read (or its own error)


# A snapshot's items are stored as a JSON array with a line break before and
# after every line of about this many bytes of items: loading parses it line
# by line, so the event loop gets the GIL back between lines however large
# the document (one orjson call on 100k items would hold it ~0.2 s).
SNAPSHOT_LINE_BYTES = 256 * 1024


def encode_items(items: list[Any]) -> str:
    """The JSON text of a snapshot's items: "[", lines of items, "]" (see above).

    JSON either way, so json.loads and SQLite's JSON functions read it; an
    array written on one line (by earlier versions) loads as well.
    """
    return items_json(list(item_pieces(items, SNAPSHOT_LINE_BYTES))).decode("utf-8")


def item_pieces(items: list[Any], piece_bytes: int) -> Iterator[bytes]:
    """The items' JSON, without brackets, about `piece_bytes` at a time (the
    first piece is 64 items; the next ones are sized from the items so far).
    One orjson call each: a caller may yield the GIL or the event loop
    between pieces."""
    start, count = 0, 64
    while start < len(items):
        chunk = items[start : start + count]
        text = _dumps(chunk)
        yield text[1:-1]  # without the chunk's own brackets
        start += len(chunk)
        per_item = max(1, len(text) // len(chunk))
        count = max(1, min(65536, piece_bytes // per_item))


def items_json(pieces: list[bytes]) -> bytes:
    """encode_items()'s text, as UTF-8 bytes, from item_pieces(): the pieces
    grouped into lines of at least SNAPSHOT_LINE_BYTES (but the last)."""
    if not pieces:
        return b"[]"
    lines: list[bytes] = []
    line: list[bytes] = []
    size = 0
    for piece in pieces:
        line.append(piece)
        size += len(piece)
        if size >= SNAPSHOT_LINE_BYTES:
            lines.append(b",".join(line))
            line, size = [], 0
    if line:
        lines.append(b",".join(line))
    # Neither encoder writes a raw line break: every one is ours.
    return b"[\n" + b",\n".join(lines) + b"\n]"


def snapshot_text(snapshot: dict[str, Any]) -> str:
    """The text of a snapshot's items: as encoded by its taker ("text", see
    Session), or encoded here ("items")."""
    text = snapshot.get("text")
    return encode_items(snapshot["items"]) if text is None else text


def decode_items(text: str) -> Any:
    """Inverse of encode_items(). Any other JSON text is parsed as the stdlib
    does: whole if small; item by item if it is a large array written on one
    line by an earlier version (slower, but the GIL is free between items).

    Raises:
        ValueError, RecursionError: not JSON.
    """
    lines = text.split("\n") if "\n" in text else []
    if len(lines) < 3 or lines[0] != "[" or lines[-1] != "]":
        if len(text) > SNAPSHOT_LINE_BYTES and "\n" not in text:
            return _parse_array_stepwise(text)
        return _loads(text)
    items: list[Any] = []
    try:
        for line in lines[1:-1]:
            if line.endswith(","):
                line = line[:-1]
            items.extend(_loads("[" + line + "]"))
    except (ValueError, RecursionError):
        return _loads(text)  # not our layout after all: its own verdict
    return items


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_stdlib_decoder = json.JSONDecoder()


def _parse_array_stepwise(text: str) -> Any:
    """json.loads(text), one array item per call into the stdlib (a value that is
    not an array is parsed whole)."""
    index = _WHITESPACE.match(text).end()
    if not text.startswith("[", index):
        return json.loads(text)
    items: list[Any] = []
    index = _WHITESPACE.match(text, index + 1).end()
    if text.startswith("]", index):
        index += 1
    else:
        while True:
            item, index = _stdlib_decoder.raw_decode(text, index)
            items.append(item)
            index = _WHITESPACE.match(text, index).end()
            if text.startswith(",", index):
                index = _WHITESPACE.match(text, index + 1).end()
            elif text.startswith("]", index):
                index += 1
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
    if _WHITESPACE.match(text, index).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, index)
    return items


def op_record_text(op: Op) -> str:
    """An op's stored record (the journal's `op` column, the pending log's).

    A large command's encoding made already (Op.command_json) is put in
    place rather than encoded again: the same bytes as encoding the record
    whole (orjson writes the keys in order, compact).
    """
    if op.command_json is None or op.command is None:
        return _dumps(op.to_record()).decode("utf-8")
    try:
        head = orjson.dumps({"seq": op.seq, "user_id": op.user_id, "kind": op.kind, "timestamp": op.timestamp})
        tail = orjson.dumps({"items": op.items, "op_id": op.op_id})
    except orjson.JSONEncodeError:
        # (An op_id beyond 64 bits.) The stdlib then writes the whole record,
        # command included, as it always did: its floats differ from orjson's.
        return _dumps(op.to_record()).decode("utf-8")
    return b"".join((head[:-1], b',"command":', op.command_json, b",", tail[1:])).decode("utf-8")


def _op_from_json(text: str) -> Op:
    return Op.from_record(_loads(text))


class TransactionAborted(StoreError):
    """SQLite rolled the whole transaction back: nothing of it is stored."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _wrapped(exc: BaseException) -> StoreError:
    """A StoreError for an unexpected failure of a job, keeping it (and its
    traceback) as the cause, so that the log shows where it happened."""
    error = StoreError(_describe(exc))
    error.__cause__ = exc
    return error


def _describe_sqlite(exc: sqlite3.Error, path: Path) -> str:
    """Why sqlite3 could not open or set up `path`, in a few words."""
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_NOTADB":
        return "file is not a database"
    if name in ("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH") or (
        name == "SQLITE_CANTOPEN" and _denied(path)
    ):
        return "permission denied"
    return _describe(exc)


def _denied(path: Path) -> bool:
    directory = path.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        return True
    return path.exists() and not os.access(path, os.R_OK | os.W_OK)


def describe_dir_error(directory: Path, exc: OSError) -> str:
    """One line for an OSError met while creating or using a data directory."""
    if isinstance(exc, FileExistsError) or (
        isinstance(exc, NotADirectoryError) and directory.exists()
    ):
        return f"data directory {directory} is not a directory"
    if isinstance(exc, NotADirectoryError):
        # A parent is a regular file: name the first one that exists.
        parent = next((p for p in directory.parents if p.exists()), directory.parent)
        return f"data directory {directory}: {parent} is not a directory"
    if isinstance(exc, PermissionError):
        return f"data directory {directory}: permission denied"
    return f"data directory {directory}: {exc.strerror or exc}"


@attrs.frozen
class SessionInfo:
    """One row of `collab-trio sessions list`.

    `unreadable` says why the session's stored rows can't be read (then
    `items` is None); the server would fail to load such a session too.
    """

    session_id: str
    items: int | None
    version: int
    epoch: str
    created_at: str
    updated_at: str
    size_bytes: int
    unreadable: str | None = None
    # Versions kept of its document (sessions history).
    versions: int = 0

    def to_json(self) -> dict[str, Any]:
        """The stable keys of `sessions list --json` and `show --json`."""
        return {
            "session_id": self.session_id,
            "items": self.items,
            "version": self.version,
            "epoch": self.epoch,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "size_bytes": self.size_bytes,
            "versions": self.versions,
            "unreadable": self.unreadable,
        }


class Database:
    """One sqlite3 connection to a data directory's database; not thread-safe.

    Raises (from the constructor):
        StoreError: one line naming the file and the cause (not a database,
            written by a newer collab-trio, permission denied, missing...).
    """

    # What the driver raises (postgres.PgDatabase shares the transaction
    # code and the jobs below with another driver: only its errors differ).
    Error: type[Exception] = sqlite3.Error
    # run_jobs_now's connection (SQLite only) and its total_changes last seen.
    _now: sqlite3.Connection | None = None
    _now_changes_seen = 0

    def __init__(
        self,
        path: str | Path,
        *,
        fsync: str = "normal",
        busy_timeout: float = 5.0,
        retention: int = DEFAULT_RETENTION,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        create: bool = True,
        readonly: bool = False,
        commit_delay: float = 0.0,
        manual_checkpoints: bool = False,
        versions_kept: int | None = None,
        versions_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        # Bounds of each session's versions (history.py); None: none is
        # dropped (the admin commands: the server's settings are its own).
        self.versions_kept = versions_kept
        self.versions_bytes = versions_bytes
        # The schema of the file (a read-only connection reads one from 1 on).
        self.schema = SCHEMA_VERSION
        self.busy_timeout = busy_timeout
        # A connection that only holds a read transaction (pin_wal).
        self._pin: sqlite3.Connection | None = None
        # run_jobs_now's connection (opened on first use) has these settings too.
        self._fsync = fsync
        self._manual_checkpoints = manual_checkpoints
        # conn.total_changes after the last transaction that changed rows.
        self._changes_seen = 0
        # Transactions committed since the WAL was last checkpointed (with
        # manual_checkpoints, the caller checkpoints with checkpoint()).
        self.since_checkpoint = 0
        # A checkpoint copied the whole WAL: the next write starts it over,
        # which syncs the WAL header (even with synchronous=NORMAL).
        self.wal_restart_pending = False
        self.retention = retention
        # Bytes of ops a loaded document keeps for resume (--history-bytes).
        self.history_bytes = history_bytes
        self.readonly = readonly
        # Fault injection: seconds every transaction waits before COMMIT, as
        # on a slow disk (holding the write lock, in the caller's thread).
        self.commit_delay = commit_delay
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {sorted(FSYNC_MODES)}, not {fsync!r}")
        if create and not readonly:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(describe_dir_error(self.path.parent, exc)) from None
        elif not self.path.exists():
            raise StoreError(f"no collab-trio data at {self.path}")
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            if readonly:
                self.conn = sqlite3.connect(
                    f"{self.path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    timeout=busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                self.conn = sqlite3.connect(
                    self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {_describe_sqlite(exc, self.path)}") from None
        try:
            # The version first: nothing is changed in a file we can't read
            # or that a newer collab-trio wrote.
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer collab-trio (schema {version})")
            if readonly:
                self.conn.execute("PRAGMA query_only=1")
                if version < 1:
                    raise StoreError(f"no collab-trio data at {self.path}")
                self.schema = version
            else:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self._configure(self.conn)
                if version < SCHEMA_VERSION:
                    self.conn.executescript(
                        f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                    )
        except sqlite3.Error as exc:
            self.conn.close()
            raise StoreError(f"cannot open {self.path}: {_describe_sqlite(exc, self.path)}") from None
        except BaseException:
            self.conn.close()
            raise

    def _configure(self, conn: sqlite3.Connection) -> None:
        """The settings of a connection that writes (they are per connection)."""
        conn.execute(f"PRAGMA synchronous={FSYNC_MODES[self._fsync]}")
        if self._manual_checkpoints:
            # A checkpoint copies the WAL into the database file and
            # syncs it: the server does that in its worker thread,
            # never inside a commit run on the event loop; the file
            # is cut back to WAL_CHECKPOINT_BYTES when the WAL starts over.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={WAL_CHECKPOINT_BYTES}")

    def close(self) -> None:
        """Close the connection (and the pin's and run_jobs_now's)."""
        pin, self._pin = self._pin, None
        now, self._now = self._now, None
        try:
            for extra in (pin, now):
                if extra is not None:
                    extra.close()
        finally:
            self.conn.close()

    def pin_wal(self) -> bool:
        """Hold a read transaction on a connection of its own, so that no
        write starts the WAL over until unpin_wal() (a restart syncs the WAL
        header even with synchronous=NORMAL; an append does not). While a
        checkpoint runs, commits may then go on at no such cost. False if it
        could not (nothing held)."""
        try:
            if self._pin is None:
                self._pin = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            self._pin.execute("BEGIN")
            # The read transaction starts with the first read.
            self._pin.execute("SELECT 1 FROM sessions LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            log.warning("Could not pin the WAL of %s: %s", self.path, _describe(exc))
            self.unpin_wal()
            return False
        return True

    def unpin_wal(self) -> None:
        """End pin_wal()'s read transaction."""
        pin = self._pin
        if pin is None:
            return
        try:
            if pin.in_transaction:
                pin.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("Could not unpin the WAL of %s: %s", self.path, _describe(exc))
            self._pin = None
            pin.close()

    # -- transactions ----------------------------------------------------------

    def run_jobs(self, jobs: list[Callable[[Database], Any]]) -> list[outcome.Outcome]:
        """Run jobs in one transaction, each in its own savepoint; one outcome each.

        A job that fails is rolled back alone; a failed COMMIT fails them all.
        """
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except self.Error as exc:
            error = StoreError(f"cannot start a transaction: {_describe(exc)}")
            return [outcome.Error(error) for _ in jobs]
        return self._run_in_transaction(jobs)

    def run_jobs_now(self, jobs: list[Callable[[Database], Any]]) -> list[outcome.Outcome] | None:
        """run_jobs(), or None at once (nothing done) if another connection
        holds the write lock: never waits for the busy timeout.

        On a connection of its own whose busy timeout is 0 for good: setting
        it to 0 and back around every transaction on the one connection cost
        two statements, and under load the first SQLite call after a pause
        costs ~40 us (a good part of a small commit). The caller makes sure
        this never overlaps run_jobs() (SQLiteStore's lock); either
        connection sees what the other committed.
        """
        if self.readonly:
            return None  # (as before: BEGIN IMMEDIATE fails on a read-only connection)
        now = self._now
        if now is None:
            now = self._connection_aside("Opening a second connection")
            if now is None:
                return None
            try:
                self._configure(now)
            except sqlite3.Error as exc:
                now.close()
                log.warning("Could not set up a second connection to %s: %s", self.path, _describe(exc))
                return None
            self._now = now
        try:
            now.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return None
        # The jobs (and _commit) use self.conn: this connection for them.
        conn, self.conn = self.conn, now
        try:
            return self._run_in_transaction(jobs)
        except BaseException:
            self.abort_transaction()
            raise
        finally:
            self.conn = conn

    def _connection_aside(self, doing: str) -> sqlite3.Connection | None:
        """A connection of its own to the file (busy timeout 0, any thread);
        None, with a warning naming what it was for, if it can't be opened."""
        try:
            return sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.warning("%s of %s failed: %s", doing, self.path, _describe(exc))
            return None

    def wal_size(self) -> int:
        """Bytes of the WAL file (0 if there is none)."""
        try:
            return os.path.getsize(f"{self.path}-wal")
        except OSError:
            return 0

    def checkpoint(self) -> bool:
        """Copy the WAL into the database file (PASSIVE: never waits for
        readers), on a connection of its own: this one may commit meanwhile
        (a PASSIVE checkpoint takes no write lock). Safe in any thread. True
        if the whole WAL was copied: the next write starts it over. The
        caller resets since_checkpoint and wal_restart_pending.
        """
        conn = self._connection_aside("Checkpoint")
        if conn is None:
            return False
        try:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("Checkpoint of %s failed: %s", self.path, _describe(exc))
            return False
        finally:
            conn.close()
        return not busy and frames == copied

    def _run_in_transaction(self, jobs: list[Callable[[Database], Any]]) -> list[outcome.Outcome]:
        if len(jobs) == 1:
            return self._run_alone(jobs[0])
        try:
            results = self.run_each(jobs)
        except TransactionAborted as exc:
            return [outcome.Error(exc) for _ in jobs]
        return self._commit(results)

    def run_each(self, jobs: list[Callable[[Database], Any]]) -> list[outcome.Outcome]:
        """Run jobs in the open transaction, each in a savepoint of its own:
        one that fails is rolled back alone. One outcome each.

        Raises:
            TransactionAborted: SQLite rolled the whole transaction back
                (e.g. disk full): earlier jobs' work is gone too.
        """
        results: list[outcome.Outcome] = []
        for job in jobs:
            self.conn.execute("SAVEPOINT job")
            try:
                value = job(self)
            except Exception as exc:  # noqa: BLE001 - any failure of one job stays that job's
                if not self.conn.in_transaction:
                    if isinstance(exc, TransactionAborted):
                        raise
                    raise TransactionAborted(f"transaction aborted: {_describe(exc)}") from exc
                self.conn.execute("ROLLBACK TO job")
                self.conn.execute("RELEASE job")
                results.append(outcome.Error(exc if isinstance(exc, StoreError) else _wrapped(exc)))
            else:
                self.conn.execute("RELEASE job")
                results.append(outcome.Value(value))
        return results

    def _run_alone(self, job: Callable[[Database], Any]) -> list[outcome.Outcome]:
        """_run_in_transaction() of one job: no savepoint, the transaction is
        the job's (two statements less for most commits)."""
        try:
            value = job(self)
        except Exception as exc:  # noqa: BLE001 - the job's failure is its outcome
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
                return [outcome.Error(exc if isinstance(exc, StoreError) else _wrapped(exc))]
            return [outcome.Error(StoreError(f"transaction aborted: {_describe(exc)}"))]
        return self._commit([outcome.Value(value)])

    def _commit(self, results: list[outcome.Outcome]) -> list[outcome.Outcome]:
        if self.commit_delay > 0:
            time.sleep(self.commit_delay)  # fault injection: a slow disk
        try:
            self.conn.execute("COMMIT")
        except self.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            error = StoreError(f"commit failed: {_describe(exc)}")
            return [outcome.Error(error) for _ in results]
        # Counted per connection: run_jobs_now's has its own.
        changes = self.conn.total_changes
        inline = self.conn is self._now
        if changes != (self._now_changes_seen if inline else self._changes_seen):
            # It wrote (a transaction that changed no row writes no page, so
            # neither grows the WAL nor starts it over).
            if inline:
                self._now_changes_seen = changes
            else:
                self._changes_seen = changes
            self.since_checkpoint += 1
            self.wal_restart_pending = False
        return results

    def abort_transaction(self) -> None:
        """Roll back whatever transaction is open, after an unexpected error."""
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except self.Error:
            pass  # the connection is unusable; the next BEGIN will say so

    def run(self, job: Callable[[Database], T]) -> T:
        """Run one job in its own write transaction (admin commands)."""
        [result] = self.run_jobs([job])
        return result.unwrap()

    def read(self, job: Callable[[Database], T]) -> T:
        """Run a job that only reads in one read transaction (BEGIN DEFERRED).

        In WAL mode a reader sees one consistent state and never blocks the
        writer (nor waits for it), however long it takes.
        """
        try:
            self.conn.execute("BEGIN DEFERRED")
        except self.Error as exc:
            raise StoreError(f"cannot start a read transaction: {_describe(exc)}") from None
        try:
            return job(self)
        except self.Error as exc:
            raise StoreError(_describe(exc)) from None
        finally:
            if self.conn.in_transaction:
                self.conn.execute("COMMIT")  # a read transaction: nothing to write

    # -- jobs (called inside run_jobs) -------------------------------------------

    def load(self, session_id: str) -> SessionDocument:
        """Latest snapshot + later ops; writes nothing.

        An unknown session gets a new empty document with a new epoch, and
        no row: its row appears with its first change (append). Until then
        each load gives another epoch, which no client can have stored with
        a version above 0: resuming with it gets the (null) state.

        Raises:
            StoreError: the stored rows can't be read (bad JSON, inconsistent).
        """
        row = self.conn.execute(
            "SELECT epoch, version FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            return SessionDocument(retention=self.retention, history_bytes=self.history_bytes)
        epoch, version = row
        snapshot = self.conn.execute(
            "SELECT version, written, items FROM snapshots WHERE session_id = ?", (session_id,)
        ).fetchone()
        if snapshot is None:
            document = SessionDocument(epoch=epoch, retention=self.retention, history_bytes=self.history_bytes)
        else:
            items = _parse_snapshot_items(session_id, snapshot[2])
            document = SessionDocument.from_snapshot(
                {"epoch": epoch, "version": snapshot[0], "written": bool(snapshot[1]), "items": items},
                retention=self.retention,
                history_bytes=self.history_bytes,
            )
        rows = self.conn.execute(
            "SELECT seq, op FROM journal WHERE session_id = ? ORDER BY seq", (session_id,)
        )
        _replay(session_id, document, rows, version)
        return document

    def append(
        self,
        session_id: str,
        epoch: str,
        ops: list[Op],
        replaced: KeptVersion | None = None,
        texts: list[str] | None = None,
    ) -> None:
        """Journal ops that follow the stored version of this epoch, and keep
        the document their first replacement displaced (`replaced`) as a version.
        `texts`: the ops' records already encoded (op_record_text), if at hand.

        The first change of a session (seq 1, no row yet) creates its row,
        with the epoch the loaded document got.
        """
        # The common case in one statement: the row is there, in this epoch,
        # at the version these ops follow.
        moved = self.conn.execute(
            "UPDATE sessions SET version = ?, updated_at = ?"
            " WHERE session_id = ? AND epoch = ? AND version = ?",
            (ops[-1].seq, ops[-1].timestamp, session_id, epoch, ops[0].seq - 1),
        ).rowcount
        if not moved:
            self._first_append(session_id, epoch, ops)
        if texts is None:
            texts = [op_record_text(op) for op in ops]
        self.conn.executemany(
            "INSERT INTO journal (session_id, seq, op) VALUES (?, ?, ?)",
            [(session_id, op.seq, text) for op, text in zip(ops, texts)],
        )
        if replaced is not None:
            replacing = next((op for op in ops if op.kind == REPLACE), None)
            self.keep_version(session_id, replaced, None if replacing is None else replacing.items or [])

    # -- the pending log (store/pending_log.py) ---------------------------------

    def note_pending_position(self, segment: int, offset: int) -> None:
        """Everything of the pending log up to byte `offset` of segment
        `segment` is in this transaction (or was refused: never to replay)."""
        self.conn.execute(
            "INSERT INTO pending_position (id, segment, end_at) VALUES (1, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET segment = excluded.segment, end_at = excluded.end_at"
            " WHERE (excluded.segment, excluded.end_at) > (pending_position.segment, pending_position.end_at)",
            (segment, offset),
        )

    def pending_position(self) -> tuple[int, int]:
        """note_pending_position()'s latest (segment, offset); (0, 0) if none."""
        row = self.conn.execute("SELECT segment, end_at FROM pending_position WHERE id = 1").fetchone()
        return (0, 0) if row is None else (row[0], row[1])

    def pending_record_state(self, session_id: str, epoch: str, texts: tuple[str, ...]) -> str:
        """Where a pending log record past the position stands: "follows"
        (append_texts() stores it), "present" (already stored) or "orphan"
        (its session was deleted or replaced, or an op in between is missing)."""
        first, last = _op_from_json(texts[0]).seq, _op_from_json(texts[-1]).seq
        row = self.conn.execute(
            "SELECT epoch, version FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            return "follows" if first == 1 else "orphan"
        if row[0] != epoch:
            return "orphan"
        if row[1] >= last:
            kept = self.conn.execute(
                "SELECT op FROM journal WHERE session_id = ? AND seq = ?", (session_id, last)
            ).fetchone()
            # (A journal compacted behind a snapshot can't tell: take it as stored.)
            return "present" if kept is None or kept[0] == texts[-1] else "orphan"
        return "follows" if row[1] == first - 1 else "orphan"

    def new_epoch_for(self, session_id: str, epoch: str) -> None:
        """Give a stored session of this epoch a new one: its members saw a
        change the database could not take, so no seq they saw may be given
        to another op, and their session's later changes are refused."""
        self.conn.execute(
            "UPDATE sessions SET epoch = ? WHERE session_id = ? AND epoch = ?", (new_epoch(), session_id, epoch)
        )

    def append_texts(self, session_id: str, epoch: str, texts: list[str]) -> None:
        """append() of ops given as their stored records (the pending log's)."""
        self.append(session_id, epoch, [_op_from_json(text) for text in texts], texts=texts)

    def keep_version(
        self, session_id: str, kept: KeptVersion, replacing: list[dict[str, Any]] | None = None
    ) -> int | None:
        """Keep a replaced document as the session's next version, then drop
        what the bounds no longer allow; its number, or None if it was not
        worth keeping (history.worth_keeping: the same as `replacing`, the
        items that replace it, or as the newest version)."""
        text = encode_items(kept.items)
        fingerprint = digest(text)
        same = digest(encode_items(list(replacement_items(replacing).values()))) if replacing is not None else None
        newest = self.conn.execute(
            "SELECT number, digest FROM versions WHERE session_id = ? ORDER BY number DESC LIMIT 1", (session_id,)
        ).fetchone()
        if not worth_keeping(fingerprint, same or "", None if newest is None else newest[1]):
            return None
        number = 1 if newest is None else newest[0] + 1
        size = len(text.encode("utf-8", "surrogatepass"))
        self.conn.execute(
            "INSERT INTO versions (session_id, number, seq, replaced_at, user_id, reason, items, bytes, digest, document)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (session_id, number, kept.seq, kept.replaced_at, kept.user_id, kept.reason, len(kept.items), size,
             fingerprint, text),
        )
        if self.versions_kept is not None or self.versions_bytes is not None:
            sizes = self.conn.execute(
                "SELECT number, bytes FROM versions WHERE session_id = ?", (session_id,)
            ).fetchall()
            drop = versions_to_drop(
                sizes,
                kept=self.versions_kept if self.versions_kept is not None else len(sizes),
                max_bytes=self.versions_bytes if self.versions_bytes is not None else sum(b for _, b in sizes),
            )
            self.conn.executemany(
                "DELETE FROM versions WHERE session_id = ? AND number = ?", [(session_id, n) for n in drop]
            )
        return number

    def _first_append(self, session_id: str, epoch: str, ops: list[Op]) -> None:
        """append() when its UPDATE found no row to move on: create the row
        of a new session, or say what is wrong."""
        row = self.conn.execute(
            "SELECT epoch, version FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None and ops[0].seq == 1:
            # Created when its first change was made (a logged change reaches
            # the database a little later, or at the next start).
            self.conn.execute(
                "INSERT INTO sessions (session_id, epoch, version, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (session_id, epoch, ops[-1].seq, ops[0].timestamp, ops[-1].timestamp),
            )
            return
        if row is None or row[0] != epoch:
            # No row past seq 1: it was deleted under the live session.
            raise SessionReset(f"session {session_id!r} was deleted or replaced")
        raise StoreError(f"session {session_id!r}: op {ops[0].seq} does not follow stored version {row[1]}")

    # Whether a write transaction must lock the rows it reads before it
    # writes what it read them for (PgDatabase: READ COMMITTED, one snapshot
    # per statement); a SQLite write transaction (BEGIN IMMEDIATE) holds the
    # whole database already.
    locks_rows: ClassVar[bool] = False

    def lock_session(self, session_id: str, *, exclusive: bool = False) -> None:
        """Hold the session's row until the transaction ends (if it has one):
        nobody changes, replaces or deletes the session meanwhile; with
        `exclusive`, nobody commits to it either (a commit updates the row)."""
        if not self.locks_rows:
            return
        mode = "UPDATE" if exclusive else "SHARE"
        # Twice: a row deleted and inserted again (an import) after the first
        # statement's snapshot is not seen by it.
        for _ in range(2):
            found = self.conn.execute(
                f"SELECT 1 FROM sessions WHERE session_id = ? FOR {mode}", (session_id,)
            ).fetchone()
            if found is not None:
                return

    def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        """Store a snapshot (never an older one) and compact the journal behind it."""
        # Held: an import or a delete between the read below and the writes
        # would get this snapshot of the session it replaced.
        self.lock_session(session_id)
        row = self.conn.execute(
            "SELECT epoch, version FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None or row[0] != snapshot["epoch"] or snapshot["version"] > row[1]:
            # Never written (nothing to keep), or deleted or replaced meanwhile,
            # or ahead of what is stored (a change its session saw that the
            # database refused): this snapshot describes nothing stored.
            return
        self.conn.execute(
            "INSERT INTO snapshots (session_id, version, written, items) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (session_id) DO UPDATE SET version = excluded.version,"
            " written = excluded.written, items = excluded.items"
            " WHERE excluded.version > snapshots.version",
            (
                session_id,
                snapshot["version"],
                int(snapshot["written"]),
                snapshot_text(snapshot),
            ),
        )
        # Ops older than the retention window are only needed for resume; drop them.
        self.conn.execute(
            "DELETE FROM journal WHERE session_id = ? AND seq <= ?",
            (session_id, snapshot["version"] - self.retention),
        )

    def forget_unwritten(self) -> int:
        """Delete the rows of sessions that were only ever visited (version 0,
        no journal), which earlier versions created on every load; returns
        how many. Such a session has nothing to keep: loading it again gives
        the same empty document (with a new epoch, as for any unknown session).
        """
        unwritten = (
            "SELECT session_id FROM sessions WHERE version = 0"
            " AND NOT EXISTS (SELECT 1 FROM journal WHERE journal.session_id = sessions.session_id)"
        )
        self.conn.execute(f"DELETE FROM snapshots WHERE session_id IN ({unwritten})")
        return self.conn.execute(f"DELETE FROM sessions WHERE session_id IN ({unwritten})").rowcount

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
        return SessionInfo(
            session_id=session_id,
            items=len(document.items),
            version=row[1],
            epoch=row[0],
            created_at=row[2],
            updated_at=row[3],
            size_bytes=self._size(session_id),
            versions=self._version_count(session_id),
        )

    def _size(self, session_id: str) -> int:
        query = _SIZE_QUERY if self.schema >= 2 else _SIZE_QUERY_1
        return int(self.conn.execute(query, {"id": session_id}).fetchone()[0])

    def _version_count(self, session_id: str) -> int:
        if self.schema < 2:
            return 0
        return self.conn.execute("SELECT COUNT(*) FROM versions WHERE session_id = ?", (session_id,)).fetchone()[0]

    def summaries(self) -> list[SessionInfo]:
        """Every stored session's row for `sessions list`, without loading documents.

        The item count comes from SQLite's JSON functions (the snapshot's
        array length) plus a replay of only the few journal rows after the
        snapshot, on placeholder items; sizes are SQL sums. A session whose
        rows can't be read gets `unreadable` instead of failing the list.
        Call it inside read() for one consistent view.
        """
        sessions = self.conn.execute(
            "SELECT session_id, epoch, version, created_at, updated_at FROM sessions ORDER BY session_id"
        ).fetchall()
        return [self._summary(*row) for row in sessions]

    def _summary(
        self, session_id: str, epoch: str, version: int, created_at: str, updated_at: str
    ) -> SessionInfo:
        info = SessionInfo(
            session_id=session_id,
            items=None,
            version=version,
            epoch=epoch,
            created_at=created_at,
            updated_at=updated_at,
            size_bytes=self._size(session_id),
            versions=self._version_count(session_id),
        )
        try:
            items = self._count_items(session_id, epoch, version)
        except StoreError as exc:
            return attrs.evolve(info, unreadable=str(exc).removeprefix(f"session {session_id!r}: "))
        except self.Error as exc:
            return attrs.evolve(info, unreadable=_describe(exc))
        return attrs.evolve(info, items=items)

    def _count_items(self, session_id: str, epoch: str, version: int) -> int:
        bad = self.conn.execute(
            "SELECT seq FROM journal WHERE session_id = ? AND NOT json_valid(op) ORDER BY seq LIMIT 1",
            (session_id,),
        ).fetchone()
        if bad is not None:
            raise StoreError(f"session {session_id!r}: journal row {bad[0]} is not JSON")
        snapshot = self.conn.execute(
            "SELECT version, written FROM snapshots WHERE session_id = ?", (session_id,)
        ).fetchone()
        count = 0
        if snapshot is not None:
            try:
                # Parsed in SQLite's C code; nothing is built in Python.
                (count,) = self.conn.execute(
                    "SELECT json_array_length(items) FROM snapshots WHERE session_id = ?", (session_id,)
                ).fetchone()
            except sqlite3.OperationalError as exc:
                raise StoreError(f"session {session_id!r}: the snapshot is not JSON ({exc})") from None
            if count == 0:
                (kind,) = self.conn.execute(
                    "SELECT json_type(items) FROM snapshots WHERE session_id = ?", (session_id,)
                ).fetchone()
                if kind != "array":
                    raise StoreError(f"session {session_id!r}: the snapshot is not a list of items")
        after = snapshot[0] if snapshot is not None else 0
        rows = self.conn.execute(
            "SELECT seq, op FROM journal WHERE session_id = ? AND seq > ? ORDER BY seq",
            (session_id, after),
        ).fetchall()
        if not rows:
            if after != version:
                raise StoreError(
                    f"session {session_id!r} is inconsistent: journal ends at {after},"
                    f" the session row says {version}"
                )
            return count
        # Ops after the snapshot change which items exist: replay them on
        # placeholder items (the uuids only, read by SQLite).
        document = SessionDocument(epoch=epoch, retention=self.retention)
        if snapshot is not None:
            document = SessionDocument(
                epoch=epoch, version=snapshot[0], written=bool(snapshot[1]), retention=self.retention
            )
            document.items = {
                uuid: {"uuid": uuid}
                for (uuid,) in self.conn.execute(
                    "SELECT json_extract(value, '$.uuid') FROM snapshots, json_each(snapshots.items)"
                    " WHERE session_id = ?",
                    (session_id,),
                )
            }
        _replay(session_id, document, rows, version)
        return len(document.items)

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
        """Make `items` the whole document of the session, with a new epoch; returns it.

        A document it replaces is kept as a version (the session's versions stay).
        """
        # Held: a commit between the read of the document and the delete
        # would be in neither the version kept nor the new document.
        self.lock_session(session_id, exclusive=True)
        kept = None
        if self.exists(session_id):
            try:
                previous = self.load(session_id)
            except StoreError as exc:
                # Unreadable rows (what `sessions list` flags): importing an
                # export is how such a session is mended, so it is replaced,
                # with nothing of it kept as a version.
                log.warning("Session %s could not be read (%s); replaced without keeping a version", session_id, exc)
                previous = None
            if previous is not None and previous.items:
                kept = KeptVersion(
                    previous.version, list(previous.items.values()), ADMIN_USER, "import", utc_timestamp()
                )
        self.delete(session_id, missing_ok=True, versions=False)
        if kept is not None:
            self.keep_version(session_id, kept, items)
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

    def exists(self, session_id: str) -> bool:
        """True if the session is stored."""
        return self.conn.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone() is not None

    def delete(self, session_id: str, *, missing_ok: bool = False, versions: bool = True) -> None:
        """Remove a session and its history (and, with `versions`, its versions)."""
        cursor = self.conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
        if cursor.rowcount == 0 and not missing_ok:
            raise StoreError(f"no session {session_id!r}")
        self.conn.execute("DELETE FROM snapshots WHERE session_id = ?", (session_id,))
        self.conn.execute("DELETE FROM journal WHERE session_id = ?", (session_id,))
        if versions:
            self.conn.execute("DELETE FROM versions WHERE session_id = ?", (session_id,))

    def stale(self, older_than_days: float, *, lock: bool = False) -> list[str]:
        """Ids of the sessions with no activity for this many days (what prune
        deletes); with `lock`, their rows held until the transaction ends. A
        row locked now (a node loads, snapshots or commits the session: in
        use, not idle) is left out rather than waited for: a node's writer
        takes several sessions' rows in one transaction, in its own order,
        and waiting would be a deadlock."""
        cutoff = (datetime.now(timezone.utc) - timedelta(days=older_than_days)).isoformat()
        held = " FOR UPDATE SKIP LOCKED" if lock and self.locks_rows else ""
        return [
            r[0]
            for r in self.conn.execute(
                f"SELECT session_id FROM sessions WHERE updated_at < ? ORDER BY session_id{held}", (cutoff,)
            )
        ]

    def prune(self, older_than_days: float) -> list[str]:
        """Delete sessions with no activity for this many days; returns their ids."""
        ids = self.stale(older_than_days, lock=True)
        for session_id in ids:
            self.delete(session_id)
        return ids

    # -- versions ----------------------------------------------------------------

    def history(self, session_id: str) -> list[VersionInfo]:
        """The session's versions, oldest first.

        Raises:
            StoreError: unknown session (one with versions but deleted has none).
        """
        if not self.exists(session_id):
            raise StoreError(f"no session {session_id!r}")
        if self.schema < 2:
            return []
        rows = self.conn.execute(
            "SELECT number, seq, replaced_at, user_id, reason, items, bytes FROM versions"
            " WHERE session_id = ? ORDER BY number",
            (session_id,),
        )
        return [VersionInfo(*row) for row in rows]

    def version_items(self, session_id: str, number: int) -> list[dict[str, Any]]:
        """The items of one version of the session.

        Raises:
            StoreError: unknown session or version (one line naming what there is).
        """
        if not self.exists(session_id):
            raise StoreError(f"no session {session_id!r}")
        row = self.conn.execute(
            "SELECT document FROM versions WHERE session_id = ? AND number = ?", (session_id, number)
        ).fetchone()
        if row is None:
            numbers = [r[0] for r in self.conn.execute(
                "SELECT number FROM versions WHERE session_id = ? ORDER BY number", (session_id,)
            )]
            there = f"versions {numbers[0]}-{numbers[-1]}" if numbers else "no versions"
            raise StoreError(f"session {session_id!r} has no version {number} (it has {there})")
        return _parse_snapshot_items(session_id, row[0])

    def restore(self, session_id: str, number: int) -> int:
        """Make version `number` the session's document, as a new replace op
        by ADMIN_USER (the document it replaces kept as a version); its seq.

        For a session no server has live (a live one restores through its
        session, see SessionRegistry.restore): a live session's next commit
        would not follow.
        """
        items = self.version_items(session_id, number)
        epoch = self.conn.execute("SELECT epoch FROM sessions WHERE session_id = ?", (session_id,)).fetchone()[0]
        document = self.load(session_id)
        now = utc_timestamp()
        op = Op(seq=document.version + 1, user_id=ADMIN_USER, kind=REPLACE, timestamp=now, items=items)
        kept = None
        if document.items:
            kept = KeptVersion(
                document.version, list(document.items.values()), ADMIN_USER,
                replace_reason("restore", ADMIN_USER, restored=number), now,
            )
        self.append(session_id, epoch, [op], kept)
        return op.seq

    # -- requests to a running server ------------------------------------------------

    def add_request(self, session_id: str, action: str, version: int, *, timeout: float) -> int:
        """Ask a running server to carry out an admin action within `timeout`
        seconds (else never); the request's id."""
        now = datetime.now(timezone.utc)
        cursor = self.conn.execute(
            "INSERT INTO requests (session_id, action, version, state, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (session_id, action, version, PENDING, utc_timestamp(now),
             utc_timestamp(now + timedelta(seconds=timeout))),
        )
        return int(cursor.lastrowid or 0)

    def take_requests(self) -> list[tuple[int, str, str, int]]:
        """The pending requests (id, session, action, version) not expired, now
        marked taken; expired ones are dropped, and any older than REQUEST_TTL."""
        if not self.conn.execute("SELECT 1 FROM requests LIMIT 1").fetchone():
            return []  # the common case: one read of an empty table
        self.drop_expired_requests()
        rows = self.conn.execute(
            "SELECT id, session_id, action, version FROM requests WHERE state = ? ORDER BY id", (PENDING,)
        ).fetchall()
        if rows:
            self.conn.execute("UPDATE requests SET state = ? WHERE state = ?", (TAKEN, PENDING))
        return rows

    def drop_expired_requests(self) -> None:
        """Delete requests not taken in time, and any older than REQUEST_TTL."""
        now = datetime.now(timezone.utc)
        self.conn.execute("DELETE FROM requests WHERE state = ? AND expires_at <= ?", (PENDING, utc_timestamp(now)))
        self.conn.execute("DELETE FROM requests WHERE created_at < ?", (utc_timestamp(now - REQUEST_TTL),))

    def finish_request(self, request_id: int, *, seq: int | None = None, error: str | None = None) -> None:
        """Record a request's outcome: the seq it made, or why it failed."""
        self.conn.execute(
            "UPDATE requests SET state = ?, seq = ?, error = ? WHERE id = ?",
            (FAILED if error is not None else DONE, seq, error, request_id),
        )

    def request_outcome(self, request_id: int) -> tuple[str, int | None, str | None]:
        """A request's (state, seq, error)."""
        row = self.conn.execute("SELECT state, seq, error FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            return (FAILED, None, "the request is gone")
        return row

    def withdraw_request(self, request_id: int) -> bool:
        """Delete a request no server took yet (True), or one that is finished;
        False if a server is carrying it out."""
        state = self.request_outcome(request_id)[0]
        cursor = self.conn.execute(
            "DELETE FROM requests WHERE id = ? AND state != ?", (request_id, TAKEN)
        )
        return bool(cursor.rowcount) and state == PENDING


def _parse_snapshot_items(session_id: str, text: str) -> list[dict[str, Any]]:
    try:
        items = decode_items(text)
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"session {session_id!r}: the snapshot is not JSON ({exc})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "uuid" in i for i in items):
        raise StoreError(f"session {session_id!r}: the snapshot is not a list of items")
    return items


def _replay(session_id: str, document: SessionDocument, rows: Any, version: int) -> None:
    """Apply journal rows (seq, op text) after the document's version; remember older ones."""
    for seq, text in rows:
        try:
            op = _op_from_json(text)
        except (ValueError, TypeError, RecursionError) as exc:
            raise StoreError(f"session {session_id!r}: journal row {seq} is not an op ({exc})") from None
        try:
            if op.seq <= document.version:
                document.remember(op)  # already in the snapshot; kept for resume
            else:
                document.apply(op)
        except (ValueError, TypeError, AttributeError) as exc:
            raise StoreError(f"session {session_id!r}: journal row {seq} can't be applied ({exc})") from None
    if document.version != version:
        raise StoreError(
            f"session {session_id!r} is inconsistent: journal ends at {document.version},"
            f" the session row says {version}"
        )
