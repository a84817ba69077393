"""The pending log: acknowledged changes on their way into the database.

A small commit (SQLiteStore with fsync "normal") is made durable by one
append to a log file on the event loop, then relayed and acknowledged; the
writer thread copies it into SQLite later, together with the commits of the
next few milliseconds (one transaction for many). An append costs about a
tenth of a SQLite transaction, and it is the durability the transaction gave
with synchronous=NORMAL: the bytes are the kernel's once write() returns, so
they survive the process being killed, not a power cut.

The log is a series of segment files `pending-<n>.log` in the data
directory. A segment that is no longer written to is deleted once every
change in it is in the database. When a server starts, replay() copies what
the segments hold into the database (skipping what is already there) before
anything else reads it, then deletes them.

Each record is one line, `<crc32 as 8 hex digits> <JSON>\n`, the JSON being
`[session_id, epoch, [op record text, ...]]`. A line that is cut short or
fails its checksum ends the segment: a torn last line (a power cut) is
dropped with a warning; anything after such a line is kept aside for the
operator, as are records the database can no longer take (the session was
deleted or replaced meanwhile).

Everything here is synchronous and trio-free: appends run on the event loop
(a write() to the page cache), replay() in the thread that opens the store.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

import attrs
import orjson

from .base import StoreError

log = logging.getLogger(__name__)

# A segment takes appends until it is this big; then the writer opens the next.
SEGMENT_BYTES = 1024 * 1024
SEGMENT_RE = re.compile(r"pending-(\d+)\.log")
UNAPPLIED_PREFIX = "pending-unapplied-"


def segment_path(data_dir: Path, number: int) -> Path:
    return data_dir / f"pending-{number}.log"


def segment_numbers(data_dir: Path) -> list[int]:
    """The numbers of the segments in data_dir, oldest first."""
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(SEGMENT_RE.fullmatch, names) if m)


@attrs.frozen
class Record:
    """One commit: ops of one session that follow each other."""

    session_id: str
    epoch: str
    # Each op's stored record, as JSON text (database.op_record_text).
    ops: tuple[str, ...]


def encode_record(session_id: str, epoch: str, op_texts: list[str]) -> bytes:
    payload = orjson.dumps([session_id, epoch, op_texts])
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_records(data: bytes) -> tuple[list[tuple[Record, int]], int]:
    """The records at the start of data, each with the offset just past it,
    and the offset where the first line that is not a whole, intact record
    starts (len(data) if none)."""
    records: list[tuple[Record, int]] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:
            break
        line = data[offset:end]
        record = _decode_line(line)
        if record is None:
            break
        offset = end + 1
        records.append((record, offset))
    return records, offset


def _decode_line(line: bytes) -> Record | None:
    if len(line) < 10 or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    payload = line[9:]
    if zlib.crc32(payload) != crc:
        return None
    try:
        value = orjson.loads(payload)
        session_id, epoch, ops = value
        if not (isinstance(session_id, str) and isinstance(epoch, str) and isinstance(ops, list) and ops):
            return None
        if not all(isinstance(op, str) for op in ops):
            return None
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    return Record(session_id, epoch, tuple(ops))


@attrs.define(eq=False)
class Segment:
    number: int
    fd: int
    size: int = 0
    # Changes appended here that are not yet in the database.
    outstanding: int = 0


@attrs.define(eq=False)
class PendingLog:
    """The segments of a running store (event loop only, except open_segment).

    Segments the store no longer appends to and whose changes are all in the
    database are handed out by take_deletable(); the store deletes them in
    its writer thread (the event loop never waits on file system metadata).
    """

    data_dir: Path
    current: Segment
    _retired: list[Segment] = attrs.field(factory=list)
    # Set once the database refused a change of the log: appends stop.
    broken: str | None = None

    @classmethod
    def start(cls, data_dir: Path, position: tuple[int, int]) -> PendingLog:
        """A log whose first segment is numbered past any in data_dir and
        past the database's pending position (replay() ran first): a number
        is never used twice, so the position never covers a new record."""
        numbers = segment_numbers(data_dir)
        return cls(data_dir, open_segment(data_dir, max([position[0], *numbers]) + 1))

    def append(self, record: bytes) -> tuple[Segment, int]:
        """Append one record to the current segment; the segment (to give
        done() once the change is in the database) and the offset past it.

        Raises:
            StoreError: the record could not be written whole (disk full,
                I/O error); nothing of it is left in the log.
        """
        segment = self.current
        try:
            written = os.write(segment.fd, record)
        except OSError as exc:
            # (A write() that fails wrote nothing.)
            raise StoreError(f"cannot write the pending log: {exc.strerror or exc}") from None
        if written != len(record):
            self._cut_back(segment)
            raise StoreError("cannot write the pending log: the disk took only part of a change")
        segment.size += written
        segment.outstanding += 1
        return segment, segment.size

    def _cut_back(self, segment: Segment) -> None:
        # O_APPEND: the next record goes where this one started.
        try:
            os.ftruncate(segment.fd, segment.size)
        except OSError as exc:
            self.broken = f"a change cut short in {segment_path(self.data_dir, segment.number)}: {exc}"
            log.error("The pending log is unusable: %s", self.broken)

    def done(self, segment: Segment) -> None:
        """A change appended to segment is in the database."""
        segment.outstanding -= 1

    @property
    def full(self) -> bool:
        """The current segment is big enough to move on from."""
        return self.current.size >= SEGMENT_BYTES

    def switch_to(self, segment: Segment) -> None:
        """Append to segment (open_segment's, opened aside) from now on."""
        self._retired.append(self.current)
        self.current = segment

    def take_deletable(self) -> list[Segment]:
        """Retired segments whose changes are all in the database: the
        caller deletes them (delete_segments) and owns their descriptors."""
        if self.broken is not None:
            return []
        done = [segment for segment in self._retired if segment.outstanding == 0]
        if done:
            self._retired = [segment for segment in self._retired if segment.outstanding]
        return done

    def all_stored(self) -> bool:
        """Every change appended is in the database (and none was refused)."""
        return self.broken is None and all(segment.outstanding == 0 for segment in self.segments())

    def segments(self) -> list[Segment]:
        return [*self._retired, self.current]

    def next_number(self) -> int:
        return self.current.number + 1

    def close(self) -> None:
        """Close every descriptor; the files stay (replay() at the next start)."""
        for segment in self.segments():
            try:
                os.close(segment.fd)
            except OSError:
                pass


def open_segment(data_dir: Path, number: int) -> Segment:
    """Create segment `number` (a new, empty file) for appending."""
    path = segment_path(data_dir, number)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from None
    return Segment(number, fd)


def delete_segments(data_dir: Path, segments: list[Segment]) -> None:
    """Close and delete segments whose changes are all in the database."""
    for segment in segments:
        try:
            os.close(segment.fd)
        except OSError:
            pass
        try:
            os.unlink(segment_path(data_dir, segment.number))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("Could not delete %s: %s", segment_path(data_dir, segment.number), exc)


def refused_by_the_database(exc: BaseException) -> bool:
    """An error of the disk, a lock, memory or the database file (to try
    again), not of the change (IntegrityError, DataError, anything else)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError))


@attrs.define
class ReplayReport:
    """What replay() did."""

    segments: int = 0
    applied: int = 0  # records copied into the database
    applied_ops: int = 0  # the changes (ops) in them
    present: int = 0  # records the database already had
    set_aside: int = 0  # records (or damaged lines) kept in an unapplied file
    unapplied_file: Path | None = None


def replay(db: Any, data_dir: Path) -> ReplayReport:
    """Copy the changes the segments in data_dir hold into the database `db`
    (a store.database.Database; its lock on the data directory held), then
    delete the segments. Records at or before the database's pending
    position are in it already; the others are stored if they follow what
    it holds. Safe to run again after a crash at any point.

    Raises:
        StoreError: the database could not take them (the segments stay).
    """
    report = ReplayReport()
    numbers = segment_numbers(data_dir)
    if not numbers:
        return report
    report.segments = len(numbers)
    position = db.read(lambda database: database.pending_position())
    records: list[Record] = []
    damaged: list[bytes] = []
    end_of_log = position
    # The segment appends went to last: the newest that holds anything (the
    # next one is created while appends still go to the current one, so a
    # crash can leave it empty behind a torn append).
    newest = -1
    for index, number in enumerate(numbers):
        path = segment_path(data_dir, number)
        try:
            if path.stat().st_size:
                newest = index
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
    for index, number in enumerate(numbers):
        path = segment_path(data_dir, number)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        found, end = decode_records(data)
        end_of_log = max(end_of_log, (number, len(data)))
        for record, past in found:
            if (number, past) > position:
                records.append(record)
            else:
                report.present += 1
        rest = data[end:]
        if not rest:
            continue
        if (number, len(data)) <= position:
            # All of this segment is stored, or was kept aside by a replay
            # that committed (and was stopped before deleting the segments):
            # set aside again, it would overwrite that replay's file.
            log.warning("%s is damaged at byte %d; its changes are all stored already", path, end)
            continue
        if index >= newest and b"\n" not in rest:
            # The last line of the newest segment, cut short: its append never
            # returned (a power cut), so its change was never acknowledged.
            log.warning("Dropped a torn record (%d bytes) at the end of %s", len(rest), path)
            continue
        log.error("%s is damaged at byte %d: %d byte(s) after it are set aside", path, end, len(rest))
        damaged.append(rest if rest.endswith(b"\n") else rest + b"\n")
    unapplied: list[Record] = []

    def copy(database: Any) -> None:
        unapplied.clear()
        for record in records:
            state = database.pending_record_state(record.session_id, record.epoch, record.ops)
            if state == "present":
                report.present += 1
            elif state == "follows":
                database.conn.execute("SAVEPOINT record")
                try:
                    database.append_texts(record.session_id, record.epoch, list(record.ops))
                except Exception as exc:
                    if not database.conn.in_transaction or refused_by_the_database(exc):
                        raise  # (the disk, a lock: the next try may do)
                    database.conn.execute("ROLLBACK TO record")
                    database.conn.execute("RELEASE record")
                    # The change itself can't be stored: set aside, and its
                    # session gets a new epoch (its later records follow it aside).
                    log.error("Could not store a change of session %s: %s: %s", record.session_id, type(exc).__name__, exc)
                    database.new_epoch_for(record.session_id, record.epoch)
                    unapplied.append(record)
                    continue
                database.conn.execute("RELEASE record")
                report.applied += 1
                report.applied_ops += len(record.ops)
            else:
                unapplied.append(record)
        if unapplied or damaged:
            # Written before the position commits: a failure here rolls it
            # back. Named after the part of the log read, so that a replay
            # run again (this transaction failed) replaces it: each change
            # is kept once.
            report.unapplied_file = _set_aside(data_dir, (numbers[0], *end_of_log), unapplied, damaged)
        # Numbers go on past these segments (PendingLog.start).
        database.note_pending_position(*end_of_log)

    db.run(copy)
    report.set_aside = len(unapplied) + len(damaged)
    if report.unapplied_file is not None:
        log.error(
            "%d acknowledged change(s) from the pending log could not be stored"
            " (their session was deleted or replaced, or the log was damaged); kept in %s",
            report.set_aside,
            report.unapplied_file,
        )
    for number in numbers:
        try:
            os.unlink(segment_path(data_dir, number))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot delete {segment_path(data_dir, number)}: {exc.strerror or exc}") from None
    if report.applied:
        log.info(
            "Stored %d acknowledged change(s) from the pending log of the last run", report.applied_ops
        )
    return report


@attrs.define(eq=False)
class SetAside:
    """The running store's file of logged changes the database refused for
    good (not a lock or a full disk: an error of the change itself), each
    kept as its log line for the operator; created on first use. Writer
    thread only: a batch's records are added inside its transaction and
    withdrawn (cut off) if that transaction does not commit."""

    data_dir: Path
    path: Path | None = None
    # Bytes in the file when the current transaction began.
    _committed_size: int = 0
    # (session_id, epoch) given a new epoch: their later changes are set
    # aside too (the database would take them for a reset). The current
    # transaction's, until it commits.
    epochs_gone: set[tuple[str, str]] = attrs.field(factory=set)
    new_epochs_gone: set[tuple[str, str]] = attrs.field(factory=set)

    def add(self, record: bytes, session: tuple[str, str]) -> Path:
        """Append one record, synced; its session gets a new epoch in this
        transaction (the caller's note job).

        Raises:
            OSError: it is not on disk.
        """
        if self.path is None:
            self.path = _new_file(self.data_dir, _unapplied_stem(), "-running.log")
            self._committed_size = 0
        # Only this store writes its file (a name of its own): its size
        # before this record is where a failed write is cut back to.
        try:
            before = self.path.stat().st_size
        except FileNotFoundError:
            # Moved away meanwhile ("ab" makes it again): what it held is
            # not this file's, so a failed transaction cuts back to nothing.
            before = self._committed_size = 0
        try:
            with open(self.path, "ab") as file:
                file.write(record)
                file.flush()
                os.fsync(file.fileno())
        except OSError:
            # A full disk writes what fits, then fails: no half line may stay
            # in front of what is added next (it would hide it from reading).
            try:
                os.truncate(self.path, before)
            except OSError:
                pass
            raise
        self.new_epochs_gone.add(session)
        return self.path

    def gone(self, session: tuple[str, str]) -> bool:
        return session in self.epochs_gone or session in self.new_epochs_gone

    def transaction_ended(self, committed: bool) -> None:
        """Keep what this transaction added, or cut it off.

        Raises:
            OSError: the file could not be measured or cut back.
        """
        added, self.new_epochs_gone = self.new_epochs_gone, set()
        if committed:
            self.epochs_gone |= added
        if self.path is None:
            return
        if not self.path.exists():
            self._committed_size = 0
        elif committed:
            self._committed_size = self.path.stat().st_size
        else:
            os.truncate(self.path, self._committed_size)


def _new_file(data_dir: Path, stem: str, suffix: str) -> Path:
    """Create data_dir/<stem><suffix>, empty, or with -1, -2... before the
    suffix if that name is taken (another store of the same second and pid).

    Raises:
        OSError: none could be created.
    """
    for n in range(1000):
        path = data_dir / f"{stem}{'' if n == 0 else f'-{n}'}{suffix}"
        try:
            with open(path, "xb"):
                pass
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, f"no free name for {stem}{suffix} in {data_dir}")


def _unapplied_stem() -> str:
    """pending-unapplied-<UTC time>-<pid>: the start of a set-aside file's name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{UNAPPLIED_PREFIX}{stamp}-{os.getpid()}"


def _set_aside(data_dir: Path, read: tuple[int, int, int], unapplied: list[Record], damaged: list[bytes]) -> Path:
    """replay()'s file of what it could not store: pending-unapplied-
    replay-<first segment>-<last segment>-<its end>.log, written whole
    (a temporary file renamed) or not at all; a replay of the same segments
    run again replaces it."""
    lines = [encode_record(r.session_id, r.epoch, list(r.ops)) for r in unapplied] + damaged
    target = data_dir / f"{UNAPPLIED_PREFIX}replay-{read[0]}-{read[1]}-{read[2]}.log"
    temporary = data_dir / f".{target.name}.tmp"
    try:
        with open(temporary, "wb") as file:
            file.write(b"".join(lines))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
        _sync_dir(data_dir)
    except OSError as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def _sync_dir(path: Path) -> None:
    """fsync a directory (a rename in it made durable); where that can't be
    done (not POSIX), nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
