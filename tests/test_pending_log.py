"""The pending log (store/pending_log.py): a small commit is durable once
appended to it, the writer stores it in SQLite a little later with the
changes after it, and a restart replays whatever had not reached SQLite.

The record format is tested without trio (hypothesis for what a record may
hold); the store with real files, real SQLite and the real clock (its writer
works in a thread; see test_store_writer.py). A process killed with SIGKILL
is tests/test_crash.py's.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import outcome
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from collab_trio.document import COMMAND, Op
from collab_trio.history import KeptVersion
from collab_trio.store import SessionReset, SQLiteStore, StoreError
from collab_trio.store import pending_log
from collab_trio.store.database import Database, database_path, op_record_text
from collab_trio.store import sqlite as sqlite_module
from collab_trio.store.sqlite import LOCK_NAME
from collab_trio.store.pending_log import (
    UNAPPLIED_PREFIX,
    decode_records,
    encode_record,
    replay,
    segment_numbers,
    segment_path,
)
from collab_trio.testing import Harness

HANG = 10


real_append = Database.append


def add(item_id: str) -> dict:
    return {"type": "command", "command": {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {}}}


def op(seq: int, item_id: str) -> Op:
    command = {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {"x_mm": seq}}
    return Op(seq, "alice", COMMAND, "2026-01-01T00:00:00+00:00", command=command)


def stored(data_dir: Path, session_id: str) -> tuple[int, list[str]]:
    """(version, item ids) a fresh reader of the database finds."""
    reader = Database(database_path(data_dir), create=False, readonly=True)
    try:
        document = reader.read(lambda d: d.load(session_id))
        return document.version, sorted(document.items)
    finally:
        reader.close()


async def wait_until(predicate, step: float = 0.005) -> None:
    """Poll `predicate` until it holds (the callers run inside fail_after)."""
    while not predicate():
        await trio.sleep(step)


@asynccontextmanager
async def running(store: SQLiteStore) -> AsyncIterator[trio.Nursery]:
    """The store running in a nursery, all of it bounded by HANG (the writer
    works in a thread: the real clock)."""
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield nursery


@contextmanager
def locked_by_another_process(data_dir: Path) -> Iterator[None]:
    """The database's write lock, held by a connection of its own."""
    locker = sqlite3.connect(database_path(data_dir), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        locker.execute("ROLLBACK")
        locker.close()


# -- the record format ---------------------------------------------------------------------

texts = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=4)


@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20), texts), max_size=6))
def test_records_read_back_as_written_each_with_its_end(records: list[tuple[str, str, list[str]]]) -> None:
    data = b"".join(encode_record(*record) for record in records)
    found, end = decode_records(data)
    assert [(r.session_id, r.epoch, list(r.ops)) for r, _ in found] == records
    assert end == len(data)
    assert [past for _, past in found] == [
        sum(len(encode_record(*record)) for record in records[: n + 1]) for n in range(len(records))
    ]


@given(texts, st.data())
def test_a_record_cut_short_or_changed_ends_what_is_read(ops: list[str], data: st.DataObject) -> None:
    first, second = encode_record("s", "e", ops), encode_record("s", "e", ["x"])
    cut = data.draw(st.integers(min_value=0, max_value=len(second) - 1))
    found, end = decode_records(first + second[:cut])
    assert [r.ops for r, _ in found] == [tuple(ops)] and end == len(first)
    # One byte of the JSON changed: the checksum no longer matches.
    at = data.draw(st.integers(min_value=9, max_value=len(second) - 2))
    damaged = second[:at] + bytes([second[at] ^ 0x01]) + second[at + 1 :]
    found, end = decode_records(first + damaged + first)
    assert len(found) == 1 and end == len(first)


# -- replay ----------------------------------------------------------------------------------


def write_segment(data_dir: Path, number: int, *records: bytes) -> None:
    segment_path(data_dir, number).write_bytes(b"".join(records))


def test_replay_stores_what_follows_skips_what_is_stored_and_sets_aside_the_rest(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    db = Database(database_path(data_dir))
    try:
        epoch = db.run(lambda d: d.load("s")).epoch
        db.run(lambda d: d.append("s", epoch, [op(1, "a"), op(2, "b")]))
        gone = db.run(lambda d: d.load("gone")).epoch
        db.run(lambda d: d.append("gone", gone, [op(1, "g")]))
        db.run(lambda d: d.delete("gone"))
        write_segment(
            data_dir,
            3,
            encode_record("s", epoch, [op_record_text(op(2, "b"))]),  # stored already
            encode_record("s", epoch, [op_record_text(op(3, "c")), op_record_text(op(4, "d"))]),
            encode_record("new", "e-new", [op_record_text(op(1, "n"))]),  # a session's first change
            encode_record("gone", gone, [op_record_text(op(2, "g2"))]),  # deleted meanwhile
        )
        write_segment(data_dir, 4, encode_record("s", epoch, [op_record_text(op(5, "e"))]), b"0000abcd [\"s\"")
        end_of_log = (4, segment_path(data_dir, 4).stat().st_size)
        report = replay(db, data_dir)
        assert (report.segments, report.applied, report.present, report.set_aside) == (2, 3, 1, 1)
        assert segment_numbers(data_dir) == []
        # The torn last line of the newest segment is dropped, not set aside;
        # the next segment is numbered past these.
        assert db.read(lambda d: d.pending_position()) == end_of_log
        assert report.unapplied_file is not None and report.unapplied_file.name.startswith(UNAPPLIED_PREFIX)
        kept, _ = decode_records(report.unapplied_file.read_bytes())
        assert [(r.session_id, r.ops) for r, _ in kept] == [("gone", (op_record_text(op(2, "g2")),))]
        # Run again (a crash right after): nothing left to do.
        assert replay(db, data_dir).segments == 0
    finally:
        db.close()
    assert stored(data_dir, "s") == (5, ["a", "b", "c", "d", "e"])
    assert stored(data_dir, "new") == (1, ["n"])


def test_replay_never_brings_back_what_the_database_had_and_lost_since(tmp_path: Path) -> None:
    """A record at or before the database's pending position was stored:
    a session deleted after that stays deleted, even its first change."""
    data_dir = tmp_path / "data"
    db = Database(database_path(data_dir))
    try:
        record = encode_record("s", "e1", [op_record_text(op(1, "a"))])
        write_segment(data_dir, 1, record)
        db.run(lambda d: d.append("s", "e1", [op(1, "a")]))
        db.run(lambda d: d.note_pending_position(1, len(record)))
        db.run(lambda d: d.delete("s"))
        report = replay(db, data_dir)
        assert (report.applied, report.present, report.set_aside) == (0, 1, 0)
        assert not db.read(lambda d: d.exists("s"))
    finally:
        db.close()


# -- the store -------------------------------------------------------------------------------


async def test_a_logged_change_is_durable_before_sqlite_has_it_and_replayed_after_a_stop(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, pending_delay=3600)
    async with running(store) as nursery:
        epoch = (await store.load("s")).epoch
        assert store.commit_now("s", epoch, [op(1, "a")])
        await store.commit("s", epoch, [op(2, "b")])
        assert stored(data_dir, "s") == (0, [])  # the log has them, SQLite not yet
        [number] = segment_numbers(data_dir)
        assert segment_path(data_dir, number).stat().st_size > 0
        # Stopped without draining (as a kill would): the writer's queue is lost.
        nursery.cancel_scope.cancel()
    assert stored(data_dir, "s") == (0, [])
    restarted = SQLiteStore(data_dir)
    async with running(restarted):
        assert stored(data_dir, "s") == (2, ["a", "b"])
        assert segment_numbers(data_dir) == [number + 1]  # a fresh segment, never a reused number
        document = await restarted.load("s")
        assert (document.epoch, document.version) == (epoch, 2)
        assert restarted.commit_now("s", epoch, [op(3, "c")])
        await restarted.aclose()
    # A clean stop stores everything and leaves no segment behind.
    assert stored(data_dir, "s") == (3, ["a", "b", "c"])
    assert segment_numbers(data_dir) == []


async def test_logged_changes_share_a_transaction_and_full_segments_go_once_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pending_log, "SEGMENT_BYTES", 2000)
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, pending_delay=0.05)
    async with running(store):
        epoch = (await store.load("s")).epoch
        before = store.transactions
        for seq in range(1, 41):
            assert store.commit_now("s", epoch, [op(seq, f"i{seq}")])
        first = segment_numbers(data_dir)
        assert len(first) == 1
        await wait_until(lambda: store.transactions != before)  # (counted once the thread reports back)
        assert store.transactions - before == 1  # forty changes, one transaction
        assert stored(data_dir, "s")[0] == 40
        # The full segment is set aside for a new one, then deleted, stored.
        await wait_until(lambda: segment_numbers(data_dir) != first)
        await wait_until(lambda: len(segment_numbers(data_dir)) <= 1)
        assert segment_numbers(data_dir)[0] > first[0]
        await store.aclose()


async def test_a_database_locked_by_another_process_holds_changes_back_not_their_acknowledgement(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, busy_timeout=0.1, pending_delay=0.01)
    async with running(store):
        epoch = (await store.load("s")).epoch
        with locked_by_another_process(data_dir):
            assert store.commit_now("s", epoch, [op(1, "i1")])
            await wait_until(lambda: store._failing_since is not None)  # the writer found the lock
            for seq in (2, 3):
                assert store.commit_now("s", epoch, [op(seq, f"i{seq}")])
            await wait_until(lambda: store._retry_delay >= 0.4)  # and twice more
            assert store.unreachable is None
        await wait_until(lambda: stored(data_dir, "s")[0] >= 3)
        assert stored(data_dir, "s") == (3, ["i1", "i2", "i3"])
        await store.aclose()
    assert segment_numbers(data_dir) == []


async def test_a_session_reset_under_a_logged_change_fails_its_next_commit(tmp_path: Path) -> None:
    """An administrator replaced the session while a change of it waited in
    the log: the change goes with the old document, the session's next
    commit says so (and the session closes its members), nothing is replayed."""
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, pending_delay=0.2)
    async with running(store) as nursery:
        epoch = (await store.load("s")).epoch
        await store.commit("s", epoch, [op(1, "a")])
        await wait_until(lambda: stored(data_dir, "s")[0] >= 1)
        assert store.commit_now("s", epoch, [op(2, "b")])
        admin = Database(database_path(data_dir), create=False)
        try:
            admin.run(lambda d: d.import_state("s", [{"uuid": "imported", "item_type": "lens"}]))
        finally:
            admin.close()
        await wait_until(lambda: ("s", epoch) in store._resets)  # the writer tried op 2
        with pytest.raises(SessionReset):
            store.commit_now("s", epoch, [op(3, "c")])
        assert store.unreachable is None
        new_epoch = (await store.load("s")).epoch
        assert store.commit_now("s", new_epoch, [op(2, "after")])
        nursery.cancel_scope.cancel()
    restarted = SQLiteStore(data_dir)
    async with running(restarted):
        await restarted.aclose()
    assert stored(data_dir, "s") == (2, ["after", "imported"])
    assert not any(name.startswith(UNAPPLIED_PREFIX) for name in os.listdir(data_dir))


async def test_a_change_the_log_cannot_take_is_refused_and_nothing_of_it_stays(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir)
    async with running(store):
        epoch = (await store.load("s")).epoch
        assert store.commit_now("s", epoch, [op(1, "a")])
        pending = store._pending
        assert pending is not None
        # The segment's descriptor now refuses writes, as a failing disk would.
        writable = pending.current.fd
        pending.current.fd = os.open(segment_path(data_dir, pending.current.number), os.O_RDONLY)
        try:
            with pytest.raises(StoreError, match="cannot write the pending log"):
                store.commit_now("s", epoch, [op(2, "b")])
        finally:
            os.close(pending.current.fd)
            pending.current.fd = writable
        assert store.commit_now("s", epoch, [op(2, "c")])
        await store.aclose()
    assert stored(data_dir, "s") == (2, ["a", "c"])


async def test_a_store_whose_database_refuses_logged_changes_for_long_is_unreachable_until_it_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collab_trio.store import sqlite

    monkeypatch.setattr(sqlite, "PENDING_GIVE_UP", 0.3)
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, busy_timeout=0.05, pending_delay=0.01)
    async with running(store):
        epoch = (await store.load("s")).epoch
        with locked_by_another_process(data_dir):
            assert store.commit_now("s", epoch, [op(1, "a")])
            await wait_until(lambda: store.unreachable is not None)
            assert "refused changes already acknowledged" in store.unreachable
            with pytest.raises(StoreError, match="refused changes already acknowledged"):
                store.commit_now("s", epoch, [op(2, "b")])
        await wait_until(lambda: store.unreachable is None)
        assert store.commit_now("s", epoch, [op(2, "b")])
        await store.aclose()
    assert stored(data_dir, "s") == (2, ["a", "b"])


def unapplied_files(data_dir: Path) -> list[str]:
    return [name for name in os.listdir(data_dir) if name.startswith(UNAPPLIED_PREFIX)]


async def restart(data_dir: Path) -> None:
    """A new server on the data directory: replay, then a clean stop. It
    waits for the last store to release the directory first: a close that
    outlasted close_timeout finishes in the background."""
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR)
    try:
        with trio.fail_after(10):
            await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)  # (releases it)
    store = SQLiteStore(data_dir)
    async with running(store):
        await store.aclose()


# -- refusals, stops and offline commands (found by review) ----------------------------


def fail_append_once(monkeypatch: pytest.MonkeyPatch, session_id: str, seq: int) -> list[int]:
    """Database.append of (session_id, first seq `seq`) raises once, as a
    statement SQLite rolled back alone would (SQLITE_FULL / IOERR inside a
    savepoint): the job fails, the transaction goes on."""
    real = Database.append
    calls: list[int] = []

    def append(self, sid, epoch, ops, replaced=None, texts=None):
        if sid == session_id and ops[0].seq == seq and not calls:
            calls.append(seq)
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, sid, epoch, ops, replaced, texts)

    monkeypatch.setattr(Database, "append", append)
    return calls


# -- a logged change refused while closing is skipped by the next replay ----------


async def test_a_logged_change_refused_during_shutdown_is_replayed_by_the_next_start(tmp_path: Path) -> None:
    """A's batch fails (the database locked by another process, a realistic
    refusal) after aclose() began: A is finished "closed" and left in the
    log. E, logged while A's batch ran, is then stored in the next batch and
    notes the pending position past A: the next start skips A as stored."""
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, busy_timeout=0.5, pending_delay=0.01)
    async with running(store) as nursery:
        a = (await store.load("a")).epoch
        e = (await store.load("e")).epoch
        with locked_by_another_process(data_dir):
            assert store.commit_now("a", a, [op(1, "a1")])  # acknowledged
            await wait_until(lambda: store._in_flight is not None)
            first = store._in_flight
            assert store.commit_now("e", e, [op(1, "e1")])  # acknowledged, queued behind A's batch
            nursery.start_soon(store.aclose)
            # A's batch fails on the lock (busy_timeout) while the store
            # closes: A stays in the log, and so does E behind it.
            await store.stopped.wait()
            assert first.done.is_set()
        await store.stopped.wait()
    assert segment_numbers(data_dir)  # A is still in the log...
    await restart(data_dir)
    # ...and the next start must store it: it was acknowledged.
    assert stored(data_dir, "e") == (1, ["e1"])
    assert stored(data_dir, "a") == (1, ["a1"])


# -- a batch that ends after the shutdown gave up on it crashes trio ------------


async def test_a_logged_batch_that_finishes_after_the_store_stopped_does_not_crash_the_event_loop(
    tmp_path: Path,
) -> None:
    """_shut_down gives an in-flight batch close_timeout, answers its jobs
    (OutcomeUnknown) and sets _pending to None; when the thread finally
    delivers, _finish_batch -> _finish_logged asserts `self._pending is not
    None` inside a run_sync_soon callback: TrioInternalError."""
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, busy_timeout=1.0, close_timeout=0.2, pending_delay=0.01)
    async with running(store):
        epoch = (await store.load("s")).epoch
        with locked_by_another_process(data_dir):
            assert store.commit_now("s", epoch, [op(1, "a")])
            await wait_until(lambda: store._in_flight is not None)
            batch = store._in_flight
            await store.aclose()  # gives up on the batch (close_timeout)
            assert store.stopped.is_set()
            await batch.done.wait()  # the thread's BEGIN times out and delivers
    # The event loop lived on; the change waits in the log for the next start.
    assert segment_numbers(data_dir)
    await restart(data_dir)
    assert stored(data_dir, "s") == (1, ["a"])


# -- a later change of a new session taken for a reset after its first failed ----


async def test_the_second_change_of_a_new_session_survives_its_first_failing_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seq 1 of a new session (no row yet) fails in its savepoint; seq 2, in
    the same batch, finds no row and gets SessionReset: it is finished as
    'reset' (dropped, the session poisoned) although nobody reset anything,
    and the retried seq 1 then moves the pending position past it."""
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, pending_delay=0.05)
    async with running(store):
        epoch = (await store.load("s")).epoch
        failed = fail_append_once(monkeypatch, "s", 1)
        assert store.commit_now("s", epoch, [op(1, "a")])
        assert store.commit_now("s", epoch, [op(2, "b")])
        await wait_until(lambda: failed and stored(data_dir, "s")[0] >= 2)
        # Nobody reset the session: its next change is taken...
        assert store.commit_now("s", epoch, [op(3, "c")])
        await store.aclose()
    # ...and both acknowledged changes are stored.
    assert stored(data_dir, "s") == (3, ["a", "b", "c"])


# -- a load behind a refused logged change does not see it ------------------------


async def test_a_load_after_an_acknowledged_change_sees_it_even_if_its_first_try_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session unloaded after its change 2 was acknowledged (logged);
    a member rejoins at once and the load is queued behind it. Change 2 fails
    in its savepoint (retried later), the load in the same transaction runs
    anyway and returns version 1: the new session gives seq 2 to another op,
    relayed too. The retried change 2 is stored; the new seq 2 is refused
    for ever (and skipped as 'present' by a replay)."""
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, pending_delay=0.05)
    async with running(store):
        epoch = (await store.load("s")).epoch
        await store.commit("s", epoch, [op(1, "a")])
        await wait_until(lambda: stored(data_dir, "s")[0] == 1)
        fail_append_once(monkeypatch, "s", 2)
        assert store.commit_now("s", epoch, [op(2, "b")])  # acknowledged, relayed
        document = await store.load("s")  # a successor session loads
        assert document.version == 2, "the load does not see an acknowledged change"
        await store.aclose()


# -- an offline `sessions restore` after a kill takes the seq of a logged change ----


async def test_an_offline_restore_after_a_kill_does_not_make_the_next_start_drop_a_logged_change(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, pending_delay=0.01)
    async with running(store) as nursery:
        epoch = (await store.load("s")).epoch
        await store.commit("s", epoch, [op(1, "a")])
        await wait_until(lambda: stored(data_dir, "s")[0] == 1)
        # A replacing change keeps version 1 (goes to the database directly).
        replace = Op(2, "alice", "replace", "2026-01-01T00:00:00+00:00", items=[{"uuid": "r", "item_type": "lens"}])
        kept = KeptVersion(1, [{"uuid": "a", "item_type": "lens"}], "alice", "replace", "2026-01-01T00:00:00+00:00")
        await store.commit("s", epoch, [replace], kept)
        await wait_until(lambda: stored(data_dir, "s")[0] == 2)
        store.pending_delay = 3600
        assert store.commit_now("s", epoch, [op(3, "b")])  # acknowledged: in the log only
        nursery.cancel_scope.cancel()  # as a kill -9: the queue is lost, the log stays
    assert stored(data_dir, "s")[0] == 2 and segment_numbers(data_dir)
    # The operator restores version 1 with no server running (the real command).
    env = {**os.environ, "COLLAB_TRIO_DATA_DIR": str(data_dir)}
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "collab_trio", "sessions", "restore", "s", "--version", "1", "--yes"],
            env=env, capture_stdout=True, capture_stderr=True, check=False,
        )
    assert done.returncode == 0, done.stderr
    await restart(data_dir)
    # The restore stored the log's op 3 first, then became op 4.
    assert stored(data_dir, "s") == (4, ["a"])
    reader = sqlite3.connect(database_path(data_dir))
    try:
        [(text,)] = reader.execute("SELECT op FROM journal WHERE session_id = 's' AND seq = 3").fetchall()
    finally:
        reader.close()
    assert text == op_record_text(op(3, "b"))
    assert not unapplied_files(data_dir)


# -- replay is not safe against a failure after its transaction --------------------


def test_replay_that_cannot_write_its_unapplied_file_loses_nothing_when_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    db = Database(database_path(data_dir))
    try:
        gone = db.run(lambda d: d.load("gone")).epoch
        db.run(lambda d: d.append("gone", gone, [op(1, "g")]))
        db.run(lambda d: d.delete("gone"))
        segment_path(data_dir, 1).write_bytes(encode_record("gone", gone, [op_record_text(op(2, "g2"))]))
        def fsync(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(pending_log.os, "fsync", fsync)  # the disk fails writing the unapplied file
        with pytest.raises(StoreError):
            replay(db, data_dir)
        assert segment_numbers(data_dir) == [1]  # "the segments stay"
        monkeypatch.undo()
        report = replay(db, data_dir)  # the operator fixed the disk and restarts
        assert report.set_aside == 1, report
        kept, _ = decode_records(report.unapplied_file.read_bytes())
        assert len(kept) == 1
    finally:
        db.close()


async def test_nothing_after_a_refused_logged_change_is_stored_and_a_kill_then_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """y's change is refused at every try: x's first change, logged after
    it, waits behind it (stored past the pending position it could come
    back after an administrator deleted it). After a kill, a start without
    the fault stores both, in order."""
    data_dir = tmp_path / "data"
    real = Database.append

    def append(self, sid, epoch, ops, replaced=None, texts=None):
        if sid == "y":
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, sid, epoch, ops, replaced, texts)

    store = SQLiteStore(data_dir, pending_delay=0.05)
    async with running(store) as nursery:
        y = (await store.load("y")).epoch
        x = (await store.load("x")).epoch
        monkeypatch.setattr(Database, "append", append)
        assert store.commit_now("y", y, [op(1, "y1")])
        assert store.commit_now("x", x, [op(1, "x1")])
        await wait_until(lambda: store._failing_since is not None and store._retry_delay > 0.2)
        assert stored(data_dir, "x") == (0, [])  # tried three times, never past y
        nursery.cancel_scope.cancel()  # as a kill -9
    monkeypatch.undo()
    await restart(data_dir)
    assert stored(data_dir, "y") == (1, ["y1"]) and stored(data_dir, "x") == (1, ["x1"])


# -- changes the database refuses for good (found by a second review) ------------------


def unapplied_records(data_dir: Path) -> list:
    out = []
    for name in sorted(os.listdir(data_dir)):
        if name.startswith(UNAPPLIED_PREFIX):
            out += [r for r, _ in decode_records((data_dir / name).read_bytes())[0]]
    return out


def refuse_item(monkeypatch: pytest.MonkeyPatch, item_id: str) -> None:
    """Database.append raises a non-OperationalError for ops adding `item_id`
    (an error of the change itself): the writer sets the change aside."""

    def append(self, sid, epoch, ops, replaced=None, texts=None):
        if any((o.command or {}).get("item_id") == item_id for o in ops):
            raise RecursionError("injected: maximum recursion depth exceeded while encoding a JSON object")
        return real_append(self, sid, epoch, ops, replaced, texts)

    monkeypatch.setattr(Database, "append", append)


# -- a set-aside change leaves its session unusable ---------------------------


async def test_a_session_whose_change_was_set_aside_can_be_rejoined_and_written(
    start_server, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 1011 close tells members to reconnect "to what is stored". They
    do: the session reloads (a new epoch, its unload snapshot refused as
    ahead of what is stored). Its next change is taken and stored."""
    store = SQLiteStore(data_dir, pending_delay=0.01)
    harness: Harness = await start_server(store="sqlite", data_dir=str(data_dir), _store=store)
    with trio.fail_after(HANG):
        async with harness.joined("s", "alice") as alice:
            await alice.send(add("a"))
            assert (await alice.expect("ack"))["seq"] == 1
            await wait_until(lambda: stored(data_dir, "s")[0] == 1)
            refuse_item(monkeypatch, "boom")
            await alice.send(add("boom"))
            assert (await alice.expect("ack"))["seq"] == 2  # acknowledged (logged)
            code, _ = await alice.expect_closed()
            assert code == 1011
        monkeypatch.undo()
        # The session unloads (its snapshot, ahead of what is stored, is not kept).
        await wait_until(lambda: "s" not in harness.registry.sessions and "s" not in harness.registry.draining)
        async with harness.joined("s", "alice") as alice:
            await alice.send(add("c"))
            answer = await alice.recv()
            assert answer["type"] == "ack", answer
        await wait_until(lambda: "c" in stored(data_dir, "s")[1])


async def test_after_a_set_aside_the_reloaded_session_is_not_refused_for_ever(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store level, without the unload snapshot of the test above: the
    successor session loads a new epoch and its commits are taken."""
    store = SQLiteStore(data_dir, pending_delay=0.01)
    async with running(store):
        epoch = (await store.load("s")).epoch
        await store.commit("s", epoch, [op(1, "a")])
        await wait_until(lambda: stored(data_dir, "s")[0] == 1)
        refuse_item(monkeypatch, "boom")
        lost: list[tuple[str, str, str]] = []
        store.on_session_lost = lambda *args: lost.append(args)
        assert store.commit_now("s", epoch, [op(2, "boom")])
        await wait_until(lambda: lost)
        monkeypatch.undo()
        document = await store.load("s")  # the members reconnect: a successor loads
        # A new epoch: no seq its members saw goes to another op.
        assert document.epoch != epoch and document.version == 1
        await store.commit("s", document.epoch, [op(2, "c")])
        await store.aclose()
    assert stored(data_dir, "s") == (2, ["a", "c"])


# -- set aside inside a transaction that then fails as a whole ---------------


def fault(monkeypatch: pytest.MonkeyPatch, *, boom_fails_always: bool) -> None:
    """'boom' is refused for good (always, or its first try only); the first
    change of session 'x' hits SQLITE_FULL in a way SQLite answers by rolling
    the whole transaction back (as it does for FULL/IOERR/NOMEM): every job
    of the batch fails, the transaction is gone."""
    tries = {"boom": 0, "x": 0}

    def append(self, sid, epoch, ops, replaced=None, texts=None):
        if any((o.command or {}).get("item_id") == "boom" for o in ops):
            tries["boom"] += 1
            if boom_fails_always or tries["boom"] == 1:
                raise RecursionError("injected: maximum recursion depth exceeded")
        if sid == "x" and not tries["x"]:
            tries["x"] += 1
            self.conn.execute("ROLLBACK")  # what SQLite did on its own
            raise sqlite3.OperationalError("database or disk is full")
        return real_append(self, sid, epoch, ops, replaced, texts)

    monkeypatch.setattr(Database, "append", append)


async def batch_of_boom_then_x(data_dir: Path, monkeypatch: pytest.MonkeyPatch, *, always: bool) -> list:
    store = SQLiteStore(data_dir, pending_delay=0.05)
    lost: list = []
    async with running(store):
        s = (await store.load("s")).epoch
        x = (await store.load("x")).epoch
        await store.commit("s", s, [op(1, "a")])
        await wait_until(lambda: stored(data_dir, "s")[0] == 1)
        store.on_session_lost = lambda *args: lost.append(args)
        fault(monkeypatch, boom_fails_always=always)
        assert store.commit_now("s", s, [op(2, "boom")])
        assert store.commit_now("x", x, [op(1, "x1")])  # same batch
        await wait_until(lambda: stored(data_dir, "x")[0] == 1)
        await store.aclose()
    return lost


async def test_a_change_set_aside_in_a_transaction_that_then_failed_is_kept_once(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = await batch_of_boom_then_x(data_dir, monkeypatch, always=True)
    assert [why for _, _, why in lost] == ["refused"]
    assert len(unapplied_records(data_dir)) == 1  # once, though tried twice


async def test_a_change_stored_at_its_retry_is_not_also_in_the_unapplied_file(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = await batch_of_boom_then_x(data_dir, monkeypatch, always=False)
    assert stored(data_dir, "s") == (2, ["a", "boom"]) and lost == []
    assert unapplied_records(data_dir) == []  # cut off with its transaction


# -- replay of a change the database refuses for good --------------------------


async def test_a_killed_servers_unstorable_change_does_not_stop_the_next_start(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed before the writer got to such a change, the next start sets it
    aside (its session gets a new epoch) and starts."""
    store = SQLiteStore(data_dir, pending_delay=3600)
    async with running(store) as nursery:
        s = (await store.load("s")).epoch
        t = (await store.load("t")).epoch
        assert store.commit_now("s", s, [op(1, "boom")])  # acknowledged
        assert store.commit_now("t", t, [op(1, "t1")])  # acknowledged
        nursery.cancel_scope.cancel()  # as a kill -9
    refuse_item(monkeypatch, "boom")
    restarted = SQLiteStore(data_dir)
    async with running(restarted):
        await restarted.aclose()
    assert stored(data_dir, "t") == (1, ["t1"])
    assert [r.session_id for r in unapplied_records(data_dir)] == ["s"]


# -- the note job's failure is dropped; its batch commits without the position ----


async def test_a_batch_whose_position_note_failed_does_not_commit_without_it(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed note job fails the whole transaction (tried again): no change
    is stored past the position, so a session an administrator deletes
    afterwards does not come back at the next start."""
    real_note = Database.note_pending_position
    failed: list[int] = []

    def note(self, segment, offset):
        if not failed:
            failed.append(1)
            raise sqlite3.OperationalError("database or disk is full")
        return real_note(self, segment, offset)

    store = SQLiteStore(data_dir, pending_delay=0.01)
    async with running(store) as nursery:
        x = (await store.load("x")).epoch
        monkeypatch.setattr(Database, "note_pending_position", note)
        assert store.commit_now("x", x, [op(1, "x1")])
        await wait_until(lambda: stored(data_dir, "x")[0] == 1)
        admin = Database(database_path(data_dir), create=False)
        try:
            admin.run(lambda d: d.delete("x"))  # `sessions delete x` beside the server
        finally:
            admin.close()
        # A kill -9 now: the segments stay as they are (a cancelled store
        # would delete them, everything being stored).
        kept = {n: segment_path(data_dir, n).read_bytes() for n in segment_numbers(data_dir)}
        nursery.cancel_scope.cancel()
    for n, data in kept.items():
        segment_path(data_dir, n).write_bytes(data)
    monkeypatch.undo()
    restarted = SQLiteStore(data_dir)
    async with running(restarted):
        await restarted.aclose()
    reader = Database(database_path(data_dir), create=False, readonly=True)
    try:
        assert not reader.read(lambda d: d.exists("x")), "a deleted session came back"
    finally:
        reader.close()


# -- a job after a set-aside in the same batch sees the old epoch ---------------


async def test_a_load_in_the_batch_of_a_set_aside_is_not_behind_it_in_the_same_epoch(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session unloaded right after its change 'boom' (seq 2) was
    acknowledged; a member reconnects within pending_delay, and its load
    joins the batch after 'boom'. 'boom' is set aside and the session's new
    epoch is written at once, so the load gets the new epoch (never the old
    one at version 1, behind an acknowledged change) and its commits are taken."""
    store = SQLiteStore(data_dir, pending_delay=0.5)
    async with running(store):
        epoch = (await store.load("s")).epoch
        await store.commit("s", epoch, [op(1, "a")])
        await wait_until(lambda: stored(data_dir, "s")[0] == 1)
        refuse_item(monkeypatch, "boom")
        assert store.commit_now("s", epoch, [op(2, "boom")])  # acknowledged (logged)
        document = await store.load("s")  # urgent: the same batch, after 'boom'
        monkeypatch.undo()
        assert [r.session_id for r in unapplied_records(data_dir)] == ["s"]
        assert (document.epoch, document.version) != (epoch, 1)
        await store.commit("s", document.epoch, [op(2, "c")])
        await store.aclose()
    assert stored(data_dir, "s") == (2, ["a", "c"])


# -- a gone epoch's change that can't be written aside is dropped as a reset ------


async def test_a_change_of_a_gone_epoch_is_not_lost_when_the_unapplied_file_cannot_be_written(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'boom' (seq 2) is set aside; 'b' (seq 3, same epoch) was logged while
    that batch ran. In the next batch 'b' finds its epoch gone and must be
    set aside too, but the file can't be written (a directory stands in its
    place): 'b' is tried again (never taken for an administrator's reset),
    and once the file is back it is kept aside, not lost."""
    store = SQLiteStore(data_dir, pending_delay=0.3)
    token = None
    lost: list[tuple[str, str, str]] = []
    saved: dict[str, object] = {}

    async with running(store):
        token = trio.lowlevel.current_trio_token()
        epoch = (await store.load("s")).epoch
        await store.commit("s", epoch, [op(1, "a")])
        await wait_until(lambda: stored(data_dir, "s")[0] == 1)

        def append(self, sid, ep, ops, replaced=None, texts=None):
            if any((o.command or {}).get("item_id") == "boom" for o in ops):
                # While this batch runs, the session's next change is acknowledged.
                trio.from_thread.run_sync(
                    lambda: store.commit_now("s", epoch, [op(3, "b")]), trio_token=token
                )
                raise RecursionError("injected: an error of the change itself")
            return real_append(self, sid, ep, ops, replaced, texts)

        monkeypatch.setattr(Database, "append", append)

        def on_lost(*args: str) -> None:
            lost.append(args)
            if len(lost) == 1:
                # The unapplied file can't be written for a while (a real
                # OSError: a directory where the file was).
                path = store._set_aside.path
                saved["path"], saved["data"] = path, path.read_bytes()
                path.unlink()
                path.mkdir()
                saved["transactions"] = store.transactions

        store.on_session_lost = on_lost
        assert store.commit_now("s", epoch, [op(2, "boom")])
        await wait_until(lambda: "transactions" in saved and store.transactions > saved["transactions"])
        # Writable again: a change tried again would now be set aside.
        path: Path = saved["path"]  # type: ignore[assignment]
        path.rmdir()
        path.write_bytes(saved["data"])  # type: ignore[arg-type]
        await wait_until(lambda: any('"b"' in t for r in unapplied_records(data_dir) for t in r.ops))
        await store.aclose()
    await restart(data_dir)  # nor does a replay bring it back
    kept = [text for record in unapplied_records(data_dir) for text in record.ops]
    assert any('"b"' in text for text in kept) or "b" in stored(data_dir, "s")[1], (lost, kept)


# -- consecutive logged changes of one session share one append ----------------------


async def test_consecutive_logged_changes_of_a_session_are_stored_with_one_append(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer stores a run of one session's logged changes with one
    Database.append (one UPDATE, one INSERT of all rows), not one each; a
    change of another session in between starts a new run."""
    appended: list[tuple[str, list[int]]] = []

    def append(self, sid, epoch, ops, replaced=None, texts=None):
        appended.append((sid, [o.seq for o in ops]))
        return real_append(self, sid, epoch, ops, replaced, texts)

    store = SQLiteStore(data_dir, pending_delay=3600)  # one transaction, at the close
    async with running(store):
        s = (await store.load("s")).epoch
        t = (await store.load("t")).epoch
        monkeypatch.setattr(Database, "append", append)
        for seq, item in enumerate(["s1", "s2", "s3"], start=1):
            assert store.commit_now("s", s, [op(seq, item)])
        assert store.commit_now("t", t, [op(1, "t1")])
        assert store.commit_now("s", s, [op(4, "s4")])
        assert store.commit_now("s", s, [op(5, "s5")])
        await store.aclose()
    assert appended == [("s", [1, 2, 3]), ("t", [1]), ("s", [4, 5])]
    assert stored(data_dir, "s") == (5, ["s1", "s2", "s3", "s4", "s5"])
    assert stored(data_dir, "t") == (1, ["t1"])
    assert not any(name.startswith(UNAPPLIED_PREFIX) for name in os.listdir(data_dir))


async def test_a_change_refused_among_consecutive_ones_is_set_aside_as_if_each_were_stored_alone(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's one append fails for 'boom': each change is then tried on
    its own. The one before it is stored; 'boom' is set aside, and with it
    the change after it (its session got a new epoch); the other session's
    change in the same transaction is stored."""
    lost: list = []
    store = SQLiteStore(data_dir, pending_delay=3600)
    async with running(store):
        s = (await store.load("s")).epoch
        t = (await store.load("t")).epoch
        store.on_session_lost = lambda *args: lost.append(args)
        refuse_item(monkeypatch, "boom")
        assert store.commit_now("s", s, [op(1, "a")])
        assert store.commit_now("s", s, [op(2, "boom")])
        assert store.commit_now("s", s, [op(3, "c")])
        assert store.commit_now("t", t, [op(1, "t1")])
        await store.aclose()
    assert stored(data_dir, "s")[1] == ["a"]
    assert stored(data_dir, "t") == (1, ["t1"])
    assert [(r.session_id, r.ops) for r in unapplied_records(data_dir)] == [
        ("s", (op_record_text(op(2, "boom")),)),
        ("s", (op_record_text(op(3, "c")),)),
    ]
    assert [(sid, why) for sid, _, why in lost] == [("s", "refused")] * 2  # reported for each


async def test_memory_running_out_while_a_run_is_split_up_tries_the_whole_batch_again(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's one append fails for 'boom', and making the run's
    change-by-change jobs then fails (memory ran out): nothing of the batch
    is stored, t1 after it included, and all of it is tried again; in the
    end the same as if each were stored alone."""
    making = sqlite_module._Job.__dict__["fn"]  # the slot: only the writer thread reads it off the loop
    failed: list[bool] = []

    def fn_once_failing(job: object) -> object:
        if threading.current_thread() is not threading.main_thread() and not failed:
            failed.append(True)
            raise MemoryError("while making the change-by-change jobs")
        return making.__get__(job, type(job))

    store = SQLiteStore(data_dir, pending_delay=3600)
    async with running(store):
        s = (await store.load("s")).epoch
        t = (await store.load("t")).epoch
        refuse_item(monkeypatch, "boom")
        monkeypatch.setattr(sqlite_module._Job, "fn", property(fn_once_failing, making.__set__))
        assert store.commit_now("s", s, [op(1, "a")])
        assert store.commit_now("s", s, [op(2, "boom")])
        assert store.commit_now("t", t, [op(1, "t1")])
        assert store.commit_now("s", s, [op(3, "c")])
        await store.aclose()  # one batch: its transaction is rolled back, all stays in the log
    assert failed
    assert stored(data_dir, "s") == (0, []) and stored(data_dir, "t") == (0, [])
    await restart(data_dir)  # replays the log
    assert stored(data_dir, "s")[1] == ["a"]
    assert stored(data_dir, "t") == (1, ["t1"])
    assert [(r.session_id, r.ops) for r in unapplied_records(data_dir)] == [
        ("s", (op_record_text(op(2, "boom")),)),
        ("s", (op_record_text(op(3, "c")),)),
    ]


async def test_a_run_of_changes_whose_transaction_sqlite_rolled_back_is_stored_at_the_retry(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite rolls the whole transaction back under the run's append (disk
    full): every change of it goes back to the queue, in order, and the
    retry stores them all; nothing is set aside."""
    lost: list = []
    store = SQLiteStore(data_dir, pending_delay=0.05)
    async with running(store):
        x = (await store.load("x")).epoch
        store.on_session_lost = lambda *args: lost.append(args)
        fault(monkeypatch, boom_fails_always=False)  # x's first append: the transaction is gone
        for seq, item in enumerate(["x1", "x2", "x3"], start=1):
            assert store.commit_now("x", x, [op(seq, item)])  # one batch
        await wait_until(lambda: stored(data_dir, "x")[0] == 3)
        await store.aclose()
    assert stored(data_dir, "x") == (3, ["x1", "x2", "x3"])
    assert lost == [] and unapplied_records(data_dir) == []


async def test_a_savepoint_failing_while_a_run_is_tried_change_by_change_rolls_the_batch_back(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's append fails for 'boom', and while its changes are tried
    one by one a statement of the savepoints fails after 'a' was stored and
    'boom' set aside: the whole transaction is rolled back (what was set
    aside is cut off with it) and tried again, which ends as if nothing had
    failed: 'boom' and the change after it are set aside once each."""
    refuse_item(monkeypatch, "boom")
    real_run_each = Database.run_each
    failed = []

    def run_each(self, jobs):
        # The run's changes one by one (the batch itself is the run, t's change and the note).
        if len(jobs) == 3 and all(job.__name__ == "run" for job in jobs) and not failed:
            failed.append(True)
            real_run_each(self, jobs[:2])
            raise MemoryError("injected: a savepoint statement failed")
        return real_run_each(self, jobs)

    monkeypatch.setattr(Database, "run_each", run_each)
    store = SQLiteStore(data_dir, pending_delay=0.05)
    async with running(store):
        s = (await store.load("s")).epoch
        t = (await store.load("t")).epoch
        for seq, item in enumerate(["a", "boom", "c"], start=1):
            assert store.commit_now("s", s, [op(seq, item)])  # one batch
        assert store.commit_now("t", t, [op(1, "t1")])
        await wait_until(lambda: stored(data_dir, "t")[0] == 1)
        await store.aclose()
    assert failed
    assert stored(data_dir, "s")[1] == ["a"]
    assert [(r.session_id, r.ops) for r in unapplied_records(data_dir)] == [
        ("s", (op_record_text(op(2, "boom")),)),
        ("s", (op_record_text(op(3, "c")),)),
    ]


# -- set-aside files: never shared, never cut in a line, never written twice ----------------


def refuse_items(monkeypatch: pytest.MonkeyPatch, *item_ids: str) -> None:
    """The database refuses, for good (an error of the change itself), every
    append carrying one of these item ids."""

    def append(self, session_id, epoch, ops, replaced=None, texts=None):  # type: ignore[no-untyped-def]
        if any((o.command or {}).get("item_id") in item_ids for o in ops):
            raise RecursionError("injected: an error of the change itself")
        return real_append(self, session_id, epoch, ops, replaced, texts)

    monkeypatch.setattr(Database, "append", append)


def unapplied_items(data_dir: Path) -> list[str]:
    """The item ids of the changes kept in every set-aside file, file by file."""
    found = []
    for name in sorted(unapplied_files(data_dir)):
        for record, _ in decode_records((data_dir / name).read_bytes())[0]:
            found += [json.loads(text)["command"]["item_id"] for text in record.ops]
    return found


real_commit = Database._commit


def commit_fails_once(failed: list[int]):  # type: ignore[no-untyped-def]
    """Database._commit rolling back (and failing every job) the first time."""

    def commit(self, results):  # type: ignore[no-untyped-def]
        if not failed and self.conn.in_transaction:
            failed.append(1)
            self.conn.execute("ROLLBACK")
            return [outcome.Error(StoreError("commit failed: injected")) for _ in results]
        return real_commit(self, results)

    return commit


async def set_aside_one_change(data_dir: Path, monkeypatch: pytest.MonkeyPatch, *, pending_delay: float) -> None:
    """A store stores "a", then the database refuses "boom" for good (it is
    set aside and its session reported lost); then the store closes."""
    store, lost = SQLiteStore(data_dir, pending_delay=pending_delay), []
    store.on_session_lost = lambda *args: lost.append(args)
    async with running(store):
        epoch = (await store.load("s")).epoch
        await store.commit("s", epoch, [op(1, "a")])
        refuse_items(monkeypatch, "boom")
        assert store.commit_now("s", epoch, [op(2, "boom")])
        await wait_until(lambda: lost)
        await store.aclose()


async def test_a_store_started_in_the_same_second_and_pid_keeps_the_earlier_stores_set_aside_changes(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (An in-process restart, or a container whose server is PID 1.) The
    # second store's failed transaction cuts its own file back, never the first's.
    monkeypatch.setattr(pending_log, "_unapplied_stem", lambda: f"{UNAPPLIED_PREFIX}20260101T000000Z-1")
    await set_aside_one_change(data_dir, monkeypatch, pending_delay=0.01)
    assert unapplied_items(data_dir) == ["boom"]
    refuse_items(monkeypatch, "boom", "boom2")
    failed: list[int] = []
    store, lost = SQLiteStore(data_dir, pending_delay=0.01), []
    store.on_session_lost = lambda *args: lost.append(args)
    async with running(store):
        document = await store.load("s")
        monkeypatch.setattr(Database, "_commit", commit_fails_once(failed))
        assert store.commit_now("s", document.epoch, [op(document.version + 1, "boom2")])
        await wait_until(lambda: lost)
        await store.aclose()
    assert failed
    assert sorted(unapplied_items(data_dir)) == ["boom", "boom2"]


async def test_a_set_aside_write_the_disk_cuts_short_leaves_no_half_line_before_the_retry(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cut: list[int] = []

    class FullDisk:
        """The first write puts half its bytes on disk, then fails (ENOSPC)."""

        def __init__(self, file) -> None:  # type: ignore[no-untyped-def]
            self.file = file

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, data: bytes) -> int:
            if not cut:
                cut.append(1)
                self.file.write(data[: len(data) // 2])
                self.file.flush()
                raise OSError(28, "No space left on device")
            return self.file.write(data)

        def flush(self) -> None:
            self.file.flush()

        def fileno(self) -> int:
            return self.file.fileno()

    monkeypatch.setattr(pending_log, "open", lambda path, mode: FullDisk(builtins.open(path, mode)), raising=False)
    await set_aside_one_change(data_dir, monkeypatch, pending_delay=0.05)
    assert cut
    assert unapplied_items(data_dir) == ["boom"]


def test_a_replay_run_again_after_its_transaction_failed_keeps_each_change_once(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Database(database_path(data_dir))
    try:
        segment_path(data_dir, 1).write_bytes(encode_record("gone", "e-old", [op_record_text(op(5, "orphan"))]))
        monkeypatch.setattr(Database, "_commit", commit_fails_once([]))
        with pytest.raises(StoreError):
            replay(database, data_dir)
        monkeypatch.undo()
        report = replay(database, data_dir)
    finally:
        database.close()
    assert report.set_aside == 1
    assert unapplied_items(data_dir) == ["orphan"]
    assert not [name for name in os.listdir(data_dir) if name.endswith(".tmp")]


def test_a_torn_append_before_an_empty_newer_segment_is_dropped_not_reported_lost(data_dir: Path) -> None:
    # The writer creates segment N+1 while appends still go to N: a crash
    # then can leave N ending in a torn (never acknowledged) append and N+1 empty.
    database = Database(database_path(data_dir))
    try:
        whole = encode_record("s", "e", [op_record_text(op(1, "a"))])
        torn = encode_record("s", "e", [op_record_text(op(2, "b"))])[:-7]
        segment_path(data_dir, 1).write_bytes(whole + torn)
        segment_path(data_dir, 2).write_bytes(b"")
        report = replay(database, data_dir)
    finally:
        database.close()
    assert (report.applied, report.set_aside, report.unapplied_file) == (1, 0, None)
    assert not unapplied_files(data_dir)


def test_a_replay_run_again_after_a_kill_before_it_deleted_the_segments_keeps_what_it_set_aside(
    data_dir: Path,
) -> None:
    database = Database(database_path(data_dir))
    # A change of a session the database doesn't have (set aside), then damage.
    orphan = encode_record("gone", "e-old", [op_record_text(op(5, "orphan"))])
    content = orphan + b"not a record\n"
    segment_path(data_dir, 1).write_bytes(content)
    try:
        assert replay(database, data_dir).set_aside == 2
        assert unapplied_items(data_dir) == ["orphan"]
        # Killed after the commit, before the segments were deleted.
        segment_path(data_dir, 1).write_bytes(content)
        again = replay(database, data_dir)
    finally:
        database.close()
    assert (again.set_aside, again.unapplied_file) == (0, None)
    assert unapplied_items(data_dir) == ["orphan"]
    assert segment_numbers(data_dir) == []
