"""The store's own contract, without a server: every job gets an outcome (also
when the writer is cancelled), the queue is bounded in bytes, MemoryStore
hands out copies, one data directory has one writer, startup errors are one
line naming the cause.

The SQLite writer runs transactions in a worker thread, so tests that involve
it use the real clock (an autojump clock would jump while the thread works);
each such wait sits inside `trio.fail_after`.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing

from collab_trio.config import ServerConfig
from collab_trio.document import COMMAND, Op
from collab_trio.store import MemoryStore, SQLiteStore, StoreError, make_store
from collab_trio.store.database import WAL_CHECKPOINT_BYTES, WAL_SIZE_LIMIT
from collab_trio.store.sqlite import CHECKPOINT_EVERY, INLINE_AFTER_IDLE, LOCK_NAME, Database, database_path, job_cost

# Generous bound for waits that involve a real thread and a real disk.
HANG = 10


def op(seq: int, item_id: str, *, size: int = 0, x: float = 0.0) -> Op:
    command = {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {"x_mm": x}}
    return Op(seq, "alice", COMMAND, "2026-01-01T00:00:00+00:00", command=command, size=size)


def stored_version(data_dir: Path, session_id: str) -> int:
    reader = Database(database_path(data_dir), create=False, readonly=True)
    try:
        return reader.read(lambda d: d.load(session_id)).version
    finally:
        reader.close()


@attrs.define
class Durable:
    """A durable store of either kind, on this test's data directory or database."""

    kind: str
    data_dir: Path
    url: str | None

    def store(self, **settings: Any) -> SQLiteStore:
        if self.kind == "postgres":
            from collab_trio.store.postgres import PostgresStore

            return PostgresStore(database_url=self.url, node_id="node-a", **settings)
        return SQLiteStore(self.data_dir, **settings)

    def document(self, session_id: str) -> Any:
        """What a fresh reader loads of the session."""
        if self.kind == "postgres":
            from collab_trio.store.postgres import PgDatabase

            reader = PgDatabase(self.url)
        else:
            reader = Database(database_path(self.data_dir), create=False, readonly=True)
        try:
            return reader.read(lambda d: d.load(session_id))
        finally:
            reader.close()

    def version(self, session_id: str) -> int:
        return self.document(session_id).version


@pytest.fixture(params=["sqlite", "postgres"])
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> Durable:
    """The writer's contract holds for both durable stores (they share it)."""
    url = request.getfixturevalue("database_url") if request.param == "postgres" else None
    return Durable(request.param, tmp_path / "data", url)


async def capture(results: dict[str, Any], name: str, fn: Any, *args: Any) -> None:
    """Run fn(*args) shielded, as a session does; record its outcome and when it came."""
    with trio.CancelScope(shield=True):
        result = await outcome.acapture(fn, *args)
    results[name] = (result, trio.current_time())


# -- every job gets an outcome -----------------------------------------------------------


async def test_cancelled_writer_finishes_the_batch_in_flight_and_fails_the_queued(durable: Durable) -> None:
    store = durable.store(fault_commit_delay=0.3)
    results: dict[str, Any] = {}
    with trio.fail_after(HANG):
        async with trio.open_nursery() as callers:
            async with trio.open_nursery() as store_nursery:
                await store_nursery.start(store.run)
                epochs = {s: (await store.load(s)).epoch for s in ("a", "b", "c")}
                callers.start_soon(capture, results, "a", store.commit, "a", epochs["a"], [op(1, "x")])
                # The writer takes a's job and its thread starts: everyone else waits.
                await trio.testing.wait_all_tasks_blocked()
                callers.start_soon(capture, results, "b", store.commit, "b", epochs["b"], [op(1, "y")])
                callers.start_soon(capture, results, "c", store.save_snapshot, "c", {"epoch": epochs["c"], "version": 0, "written": False, "items": []})
                await trio.testing.wait_all_tasks_blocked()
                assert results == {}
                cancelled_at = trio.current_time()
                store_nursery.cancel_scope.cancel()
    # Queued: failed at once, as the writer stopped. In flight: its real outcome, later.
    result, in_flight_done = results["a"]
    assert result.unwrap() is None
    for name in ("b", "c"):
        result, when = results[name]
        with pytest.raises(StoreError, match="^the store is closed$"):
            result.unwrap()
        # At once: long before the 0.3 s transaction in flight was done.
        assert cancelled_at <= when < in_flight_done
    assert store.stopped.is_set() and store.queued_bytes == 0
    assert (durable.version("a"), durable.version("b")) == (1, 0)
    # A closed store says so; it never leaves a caller waiting.
    with pytest.raises(StoreError, match="closed"):
        await store.commit("a", epochs["a"], [op(2, "z")])


async def test_forced_stop_with_two_sessions_committing_returns_within_a_second(durable: Durable) -> None:
    """The second Ctrl+C: the whole tree is cancelled while two sessions wait in
    shielded commits on a slow disk (0.3 s a transaction)."""
    store = durable.store(fault_commit_delay=0.3)
    done: dict[str, list[str]] = {"s1": [], "s2": []}
    both_committed_twice = trio.Event()

    async def session(session_id: str) -> None:
        epoch = (await store.load(session_id)).epoch
        seq = 0
        while True:
            seq += 1
            try:
                # Shielded as in Session: once handed over, wait for the outcome.
                with trio.CancelScope(shield=True):
                    await store.commit(session_id, epoch, [op(seq, f"i{seq}")])
            except StoreError as exc:
                done[session_id].append(f"error: {exc}")
                return
            done[session_id].append("ok")
            if all(len(answers) >= 2 for answers in done.values()):
                both_committed_twice.set()

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            nursery.start_soon(session, "s1")
            nursery.start_soon(session, "s2")
            await both_committed_twice.wait()
            started = trio.current_time()
            with trio.fail_after(1):
                nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - started
    print(f"\nforced stop: {elapsed:.3f} s with fault_commit_delay=0.3; commits: {done}")
    assert elapsed < 1
    # Each session got an answer to every commit it made (its last is an error
    # or a success: the loop ended either way), and what succeeded is stored.
    for session_id, answers in done.items():
        assert answers and all(a == "ok" for a in answers[:-1])
        assert durable.version(session_id) == answers.count("ok")


async def test_aclose_drains_the_queue(durable: Durable) -> None:
    store = durable.store(fault_commit_delay=0.05)
    results: dict[str, Any] = {}
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            epoch = (await store.load("s")).epoch
            for n in range(1, 6):
                nursery.start_soon(capture, results, f"s{n}", store.commit, "s", epoch, [op(n, f"i{n}")])
                await trio.testing.wait_all_tasks_blocked()
            await store.aclose()
            assert store.stopped.is_set()
    assert [results[f"s{n}"][0] for n in range(1, 6)] == [outcome.Value(None)] * 5
    assert durable.version("s") == 5


async def test_a_stuck_transaction_is_answered_within_the_close_timeout(tmp_path: Path) -> None:
    """A disk that doesn't answer: aclose() gives up after its deadlines and
    every caller hears "may or may not be stored" instead of waiting forever."""
    data_dir = tmp_path / "data"
    store = SQLiteStore(data_dir, fault_commit_delay=1.5, close_timeout=0.2)
    results: dict[str, Any] = {}
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            epoch = (await store.load("s")).epoch
            nursery.start_soon(capture, results, "stuck", store.commit, "s", epoch, [op(1, "a")])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(capture, results, "queued", store.commit, "s", epoch, [op(2, "b")])
            await trio.testing.wait_all_tasks_blocked()
            started = trio.current_time()
            await store.aclose()
            elapsed = trio.current_time() - started
    # Drain (0.2) + the in-flight wait (0.2) + the close wait (0.2), not 1.5 s more.
    assert elapsed < 1.0, elapsed
    with pytest.raises(StoreError, match="may or may not be stored"):
        results["stuck"][0].unwrap()
    with pytest.raises(StoreError, match="^the store is closed$"):
        results["queued"][0].unwrap()
    # The thread finishes on its own, then closes the database and the lock:
    # wait for that (a blocking flock in a thread) so nothing outlives the test.
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR)
    try:
        with trio.fail_after(HANG):
            await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)
    assert stored_version(data_dir, "s") == 1  # it did commit, after everyone was told


# -- the queue is bounded in bytes ----------------------------------------------------------


async def test_commits_wait_for_room_and_the_queue_never_exceeds_its_bound(durable: Durable) -> None:
    size = 3000
    bound = 2 * job_cost([op(1, "x", size=size)])  # room for two commits
    store = durable.store(queue_bytes=bound, fault_commit_delay=0.02)
    peak = 0
    committed: dict[str, int] = {}

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, store.queued_bytes)
            await trio.lowlevel.checkpoint()

    async def sender(session_id: str, count: int) -> None:
        epoch = (await store.load(session_id)).epoch
        for seq in range(1, count + 1):
            await store.commit(session_id, epoch, [op(seq, f"i{seq}", size=size)])
            assert store.queued_bytes <= bound
            committed[session_id] = seq

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            nursery.start_soon(watch)
            async with trio.open_nursery() as senders:
                for n in range(6):
                    senders.start_soon(sender, f"s{n}", 5)
            assert store.queued_bytes == 0
            nursery.cancel_scope.cancel()
    print(f"\nbyte bound {bound} B: peak {peak} B queued, {store.transactions} transactions for 30 commits")
    assert 0 < peak <= bound
    # Six senders, room for two jobs: transactions carry at most two commits.
    assert store.transactions >= 15
    assert committed == {f"s{n}": 5 for n in range(6)}
    for n in range(6):
        assert durable.version(f"s{n}") == 5


async def test_a_job_larger_than_the_bound_runs_alone_and_waiting_is_first_come_first_served(durable: Durable) -> None:
    bound = 10_000
    store = durable.store(queue_bytes=bound, fault_commit_delay=0.1)
    epochs: dict[str, str] = {}
    done: list[str] = []
    names = ("huge", "first", "a", "b", "c")
    sizes = {"huge": 5 * bound, "first": 6000, "a": 6000, "b": 6000, "c": 100}
    ops = {name: op(1, "x", size=size) for name, size in sizes.items()}

    async def commit(name: str) -> None:
        await store.commit(name, epochs[name], [ops[name]])
        done.append(name)

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for name in names:
                epochs[name] = (await store.load(name)).epoch
            async with trio.open_nursery() as callers:
                # Larger than the whole bound: admitted, because the queue is empty.
                callers.start_soon(commit, "huge")
                await trio.testing.wait_all_tasks_blocked()
                assert store.queued_bytes == job_cost([ops["huge"]]) > bound
                # Anything else waits until it is answered.
                callers.start_soon(commit, "first")
                await trio.testing.wait_all_tasks_blocked()
                assert store.queued_bytes == job_cost([ops["huge"]])
            assert done == ["huge", "first"] and store.queued_bytes == 0
            async with trio.open_nursery() as callers:
                done.clear()
                callers.start_soon(commit, "a")
                await trio.testing.wait_all_tasks_blocked()
                callers.start_soon(commit, "b")  # doesn't fit beside a: waits
                await trio.testing.wait_all_tasks_blocked()
                callers.start_soon(commit, "c")  # would fit beside a, but b came first
                await trio.testing.wait_all_tasks_blocked()
                assert store.queued_bytes == job_cost([ops["a"]])
            assert sorted(done) == ["a", "b", "c"] and done[0] == "a"
            nursery.cancel_scope.cancel()
    for name in names:
        assert durable.version(name) == 1


async def test_a_commit_cancelled_while_waiting_for_room_enqueues_nothing(durable: Durable) -> None:
    store = durable.store(queue_bytes=1000, fault_commit_delay=0.1)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            epoch = (await store.load("s")).epoch
            other = (await store.load("t")).epoch
            nursery.start_soon(store.commit, "t", other, [op(1, "x", size=2000)])
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.01) as waited:
                await store.commit("s", epoch, [op(1, "never", size=100)])
            assert waited.cancelled_caught
            # Nothing of it is queued or counted; the store carries on.
            await store.commit("s", epoch, [op(1, "instead", size=100)])
            assert store.queued_bytes == 0
            nursery.cancel_scope.cancel()
    assert list(durable.document("s").items) == ["instead"]


def test_make_store_passes_the_queue_bound_and_the_fault_delay(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=str(tmp_path), store_queue_bytes=12345, fault_commit_delay=0.25)
    store = make_store(config)
    assert isinstance(store, SQLiteStore)
    assert (store.queue_bytes, store.fault_commit_delay) == (12345, 0.25)
    memory = make_store(attrs_evolve(config, store="memory"))
    assert isinstance(memory, MemoryStore) and memory.fault_commit_delay == 0.25


def attrs_evolve(config: ServerConfig, **changes: Any) -> ServerConfig:
    import attrs

    return attrs.evolve(config, **changes)


# -- small commits on an idle writer run at once ------------------------------------------------


async def test_a_small_commit_on_an_idle_writer_never_waits_for_another_connection(tmp_path: Path) -> None:
    """A commit that runs on the event loop must not wait for SQLite's lock:
    while another connection writes, it goes to the thread, and the loop runs on."""
    store = SQLiteStore(tmp_path / "data", pending_log=False)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            epoch = (await store.load("s")).epoch
            before = store.transactions
            switched = False

            async def mark() -> None:
                nonlocal switched
                switched = True

            nursery.start_soon(mark)
            await store.commit("s", epoch, [op(1, "a")])  # idle writer: runs at once
            assert not switched  # no thread round trip: no other task ran meanwhile
            assert store.transactions == before + 1 and stored_version(tmp_path / "data", "s") == 1
            await trio.sleep(2 * INLINE_AFTER_IDLE)  # a pause: the next commit may run at once too
            # But an admin command holds the write lock.
            other = sqlite3.connect(database_path(tmp_path / "data"), isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            done = trio.Event()

            async def commit_b() -> None:
                await store.commit("s", epoch, [op(2, "b")])
                done.set()

            # Within a second (the busy timeout is 5 s): had the commit waited
            # for the lock on the event loop, the deadline would pass meanwhile.
            with trio.fail_after(1):
                nursery.start_soon(commit_b)
                await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # waiting in the thread for the lock
            other.execute("COMMIT")
            await done.wait()
            assert store.transactions == before + 2 and stored_version(tmp_path / "data", "s") == 2
            other.close()
            nursery.cancel_scope.cancel()


async def test_big_commits_keep_the_wal_bounded_in_bytes(tmp_path: Path) -> None:
    """Checkpoints come after WAL_CHECKPOINT_BYTES of WAL too, not only after
    CHECKPOINT_EVERY transactions: commits back to back (which never leave a
    background checkpoint the last word) still see the WAL start over and
    the file cut back, and it stays within WAL_SIZE_LIMIT."""
    store = SQLiteStore(tmp_path / "data")
    wal = Path(str(database_path(tmp_path / "data")) + "-wal")
    pad = "p" * 200_000
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            epoch = (await store.load("s")).epoch
            sizes = []
            for seq in range(1, 241):  # 48 MB of changes, far fewer than CHECKPOINT_EVERY commits
                big = Op(seq, "alice", COMMAND, "2026-01-01T00:00:00+00:00",
                         command={"action": "update_item", "item_id": "a", "data": {"pad": pad}}, size=200_000)
                await store.commit("s", epoch, [big])
                sizes.append(wal.stat().st_size)
            nursery.cancel_scope.cancel()
    assert stored_version(tmp_path / "data", "s") == 240
    assert max(sizes) <= WAL_SIZE_LIMIT + 1_000_000
    assert any(later < earlier for earlier, later in zip(sizes, sizes[1:]))  # cut back
    # Once past WAL_CHECKPOINT_BYTES it is cut back to it (the largest size
    # may be in a later round of growth, still going when the commits end).
    first_over = next(i for i, size in enumerate(sizes) if size > WAL_CHECKPOINT_BYTES)
    assert min(sizes[first_over:]) <= WAL_CHECKPOINT_BYTES


async def test_commits_on_the_event_loop_keep_the_wal_bounded(tmp_path: Path) -> None:
    """After CHECKPOINT_EVERY commits a checkpoint runs in a thread, on a
    connection of its own; once it copied the WAL back into the database
    the next write starts the WAL over: it stops growing."""
    store = SQLiteStore(tmp_path / "data", pending_log=False)
    wal = Path(str(database_path(tmp_path / "data")) + "-wal")

    seq, grown, again = 0, [], []
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            epoch = (await store.load("s")).epoch
            while not store.checkpointing:
                seq += 1
                await trio.sleep(INLINE_AFTER_IDLE)  # each one after a pause: at once
                await store.commit("s", epoch, [op(seq, f"i{seq}", size=200)])
                grown.append(wal.stat().st_size)
            assert CHECKPOINT_EVERY - 2 <= seq <= CHECKPOINT_EVERY
            await store.checkpoint_finished()  # nothing overtook it: it copied everything
            assert store.checkpoints == 1
            for _ in range(CHECKPOINT_EVERY - 2):
                seq += 1
                await trio.sleep(INLINE_AFTER_IDLE)
                await store.commit("s", epoch, [op(seq, f"i{seq}", size=200)])
                again.append(wal.stat().st_size)
            nursery.cancel_scope.cancel()
    assert stored_version(tmp_path / "data", "s") == seq
    # It started over: the first commits after the checkpoint wrote over old
    # frames (a WAL that goes on grows with every commit), and the file did
    # not double (later commits touch a few more pages as the tables grow).
    assert again[:10] == [grown[-1]] * 10
    assert max(again) < 1.5 * max(grown)


async def test_commits_go_on_while_a_checkpoint_runs(tmp_path: Path) -> None:
    """A checkpoint takes no write lock: commits made while it runs are
    stored, in order, and the WAL still starts over afterwards. (A
    transaction per commit: without the pending log, which would gather
    them.)"""
    store = SQLiteStore(tmp_path / "data", pending_log=False)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            epoch = (await store.load("s")).epoch
            seq = 0
            while store.checkpoints < 2:
                seq += 1
                await store.commit("s", epoch, [op(seq, f"i{seq}", size=200)])
                if seq % CHECKPOINT_EVERY == 0:
                    await store.checkpoint_finished()  # let one copy everything
            nursery.cancel_scope.cancel()
    assert stored_version(tmp_path / "data", "s") == seq


def wal_salt(wal: Path) -> bytes:
    """The WAL header's salts: they change when the WAL starts over."""
    with open(wal, "rb") as f:
        return f.read(24)[16:24]


async def test_commits_while_a_checkpoint_runs_are_the_writer_threads_and_never_start_the_wal_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a checkpoint runs (its syncs can hold writes to the WAL for
    milliseconds), commits go through the writer thread, never on the event
    loop, and a read transaction pins the WAL: they append (a WAL that
    started over would have synced its header there). The next write after
    it is the writer thread's too. The checkpoint starts only once the task
    whose commit made it due yields (its relays go first: the checkpoint's
    thread competes for the GIL)."""
    started, release = threading.Event(), threading.Event()
    checkpoint = Database.checkpoint

    def slow_checkpoint(self: Database) -> bool:
        started.set()
        assert release.wait(HANG)  # a slow disk
        return checkpoint(self)

    monkeypatch.setattr(Database, "checkpoint", slow_checkpoint)
    store = SQLiteStore(tmp_path / "data", pending_log=False)
    wal = Path(str(database_path(tmp_path / "data")) + "-wal")
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            epoch = (await store.load("s")).epoch
            seq = 0
            while not store.checkpointing:
                seq += 1
                # A burst's commit: no pause needed to run at once.
                assert store.commit_now("s", epoch, [op(seq, f"i{seq}", size=200)])
            # Due, it starts once this task yields (the writer task starts it).
            assert not started.is_set()
            while not started.is_set():
                await trio.sleep(0)
            salt, size = wal_salt(wal), wal.stat().st_size
            for _ in range(3):
                seq += 1
                assert not store.commit_now("s", epoch, [op(seq, f"i{seq}", size=200)])
                await store.commit("s", epoch, [op(seq, f"i{seq}", size=200)])  # while it runs
            assert wal_salt(wal) == salt and wal.stat().st_size > size  # appended
            release.set()
            await store.checkpoint_finished()
            # It could not copy what was committed after the pin: tried again
            # a few commits later, and then it copies everything.
            assert store.checkpoints == 0
            while store.checkpoints == 0:
                seq += 1
                await store.commit("s", epoch, [op(seq, f"i{seq}", size=200)])
                await store.checkpoint_finished()
            # The next write may start the WAL over: left to the writer thread.
            seq += 1
            assert not store.commit_now("s", epoch, [op(seq, f"i{seq}", size=200)])
            await store.load("t")  # a transaction that writes nothing changes nothing
            assert not store.commit_now("s", epoch, [op(seq, f"i{seq}", size=200)])
            await store.commit("s", epoch, [op(seq, f"i{seq}", size=200)])
            seq += 1
            assert store.commit_now("s", epoch, [op(seq, f"i{seq}", size=200)])
            nursery.cancel_scope.cancel()
    assert stored_version(tmp_path / "data", "s") == seq


# -- MemoryStore keeps its own copy ------------------------------------------------------------


async def test_memory_store_hands_out_copies_and_keeps_its_own(autojump_clock: Any) -> None:
    store = MemoryStore(retention=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        document = await store.load("s")
        first = op(1, "a", x=1.0)
        document.apply(first)
        await store.commit("s", document.epoch, [first])
        # The live document and the op's payload change after the commit
        # (move_item merges fields into the item dict in place).
        document.items["a"]["x_mm"] = 99.0
        first.command["data"]["x_mm"] = 42.0
        document.items["ghost"] = {"uuid": "ghost"}
        again = await store.load("s")
        assert again is not document
        assert again.items == {"a": {"uuid": "a", "item_type": "lens", "x_mm": 1.0}}
        assert again.version == 1 and again.epoch == document.epoch
        assert [o.command["data"]["x_mm"] for o in again.ops_since(0)] == [1.0]
        # What the caller does to a loaded copy never reaches the next one.
        again.items["a"]["x_mm"] = -1.0
        again.history.clear()
        third = await store.load("s")
        assert third.items["a"]["x_mm"] == 1.0 and len(third.ops_since(0)) == 1
        # A gap commits nothing; the next commit in order is visible on load.
        with pytest.raises(StoreError, match="does not follow"):
            await store.commit("s", document.epoch, [op(2, "b"), op(4, "d")])
        await store.commit("s", document.epoch, [op(2, "b", x=2.0)])
        assert list((await store.load("s")).items) == ["a", "b"]
        with pytest.raises(StoreError):
            await store.commit("s", "another-epoch", [op(3, "c")])
        # A slow "disk" for the memory store too.
        store.fault_commit_delay = 0.5
        before = trio.current_time()
        await store.commit("s", document.epoch, [op(3, "c")])
        assert trio.current_time() - before == 0.5
        await store.aclose()  # run() returns


# -- one data directory, one writer -----------------------------------------------------------


async def test_a_second_store_on_the_same_directory_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = SQLiteStore(data_dir)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            assert (data_dir / LOCK_NAME).read_text() == f"{os.getpid()}\n"
            with pytest.raises(StoreError) as refused:
                await nursery.start(SQLiteStore(data_dir).run)
            assert str(refused.value) == (
                f"data directory {data_dir} is in use by another collab-trio server (pid {os.getpid()})"
            )
            # Admin connections don't take the lock: they work beside the writer.
            admin = Database(database_path(data_dir), create=False)
            try:
                admin.run(lambda d: d.import_state("s", [{"uuid": "a"}]))
            finally:
                admin.close()
            await first.aclose()
        # Released: the next store starts and sees what was stored.
        async with trio.open_nursery() as nursery:
            second = SQLiteStore(data_dir)
            await nursery.start(second.run)
            assert list((await second.load("s")).items) == ["a"]
            await second.aclose()


# -- startup errors: one line naming the cause ---------------------------------------------------


async def start_error(data_dir: Path) -> str:
    store = SQLiteStore(data_dir)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            with pytest.raises(StoreError) as failed:
                await nursery.start(store.run)
    message = str(failed.value)
    assert "\n" not in message
    assert store.stopped.is_set()
    return message


async def test_startup_error_data_dir_is_a_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("not a directory\n")
    assert await start_error(data_dir) == f"data directory {data_dir} is not a directory"
    nested = data_dir / "inner"  # ENOTDIR: a parent is a regular file
    assert await start_error(nested) == f"data directory {nested}: {data_dir} is not a directory"


async def test_startup_error_not_a_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    garbage = b"this is no SQLite file\n" * 200
    database_path(data_dir).write_bytes(garbage)
    assert await start_error(data_dir) == f"cannot open {database_path(data_dir)}: file is not a database"
    assert database_path(data_dir).read_bytes() == garbage
    # The lock was released with the failure: a repaired directory starts.
    database_path(data_dir).unlink()
    store = SQLiteStore(data_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.aclose()


async def test_startup_error_newer_schema(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with sqlite3.connect(database_path(data_dir)) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    assert await start_error(data_dir) == (
        f"{database_path(data_dir)} was written by a newer collab-trio (schema 99)"
    )


async def test_startup_error_in_use(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / LOCK_NAME).write_text("4242\n")
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another server would
        assert await start_error(data_dir) == (
            f"data directory {data_dir} is in use by another collab-trio server (pid 4242)"
        )
    finally:
        os.close(fd)


async def test_memory_store_refuses_work_after_aclose() -> None:
    store = MemoryStore()
    document = await store.load("s")
    await store.aclose()
    for call in (
        lambda: store.load("s"),
        lambda: store.commit("s", document.epoch, []),
        lambda: store.save_snapshot("s", document.snapshot()),
    ):
        with pytest.raises(StoreError, match="the store is closed"):
            await call()
