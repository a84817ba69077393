"""The durable stores (SQLite, and Postgres where a test says so): journal,
snapshots, compaction, admin operations, and the server on top of it
(restart, resume, op_id de-duplication, store failures)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import attrs
import outcome
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from collab_trio.document import COMMAND, REPLACE, Op
from collab_trio.store import SessionReset, SQLiteStore, StoreError
from collab_trio.store.database import SNAPSHOT_LINE_BYTES, _parse_array_stepwise, decode_items, encode_items
from collab_trio.store.pending_log import decode_records, segment_numbers, segment_path
from collab_trio.store.sqlite import JOB_BYTES, Database, database_path, snapshot_cost
from collab_trio.testing import HANG, OPCODE_TEXT, Harness, client_frame, raw_connect, start_memory_server


def add(item_id: str, **data: Any) -> dict:
    return {
        "type": "command",
        "command": {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": dict(data)},
    }


def op(seq: int, item_id: str, user: str = "alice", op_id: Any = None) -> Op:
    command = {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {"x_mm": float(seq)}}
    return Op(seq, user, COMMAND, f"2026-01-01T00:00:{seq % 60:02d}+00:00", command=command, op_id=op_id)


def open_database(kind: str, request: pytest.FixtureRequest, data_dir: Path) -> Database:
    """A Database of either store, on this test's data directory or database."""
    if kind == "postgres":
        from collab_trio.store.postgres import PgDatabase

        return PgDatabase(request.getfixturevalue("database_url"), retention=5)
    return Database(database_path(data_dir), retention=5)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, data_dir: Path) -> Database:
    """The Store contract's rows, on SQLite and on Postgres."""
    database = open_database(request.param, request, data_dir)
    database.kind = request.param  # type: ignore[attr-defined]
    yield database
    database.close()


@pytest.fixture
def sqlite_db(data_dir: Path) -> Database:
    """What only SQLite has: rows earlier versions wrote, its JSON functions."""
    database = Database(database_path(data_dir), retention=5)
    yield database
    database.close()


# -- Database --------------------------------------------------------------------


def session_rows(data_dir: Path) -> list[str]:
    """The session ids `collab-trio sessions list` would show (a read-only connection)."""
    reader = Database(database_path(data_dir), create=False, readonly=True)
    try:
        return [info.session_id for info in reader.read(lambda d: d.summaries())]
    finally:
        reader.close()


def test_loading_an_unknown_session_writes_nothing(db: Database, data_dir: Path, request: pytest.FixtureRequest) -> None:
    first = db.run(lambda d: d.load("s"))
    again = db.run(lambda d: d.load("s"))
    assert first.version == again.version == 0
    assert first.state("t") is None and again.state("t") is None
    # No row: each load may have a new epoch, which no client can hold with a version > 0.
    assert db.read(lambda d: d.summaries()) == [] and db.session_ids() == []
    with pytest.raises(StoreError, match="no session 's'"):
        db.read(lambda d: d.info("s"))
    # Nor does a snapshot of the never-written document store anything.
    db.run(lambda d: d.save_snapshot("s", again.snapshot()))
    assert db.read(lambda d: d.summaries()) == []
    assert db.conn.execute("SELECT COUNT(*) FROM snapshots").fetchone() == (0,)
    # The first change stores the session, with the epoch of the document it changed.
    db.run(lambda d: d.append("s", again.epoch, [op(1, "a")]))
    assert [info.session_id for info in db.read(lambda d: d.summaries())] == ["s"]
    db.close()
    reopened = open_database(db.kind, request, data_dir)
    try:
        for _ in range(2):
            document = reopened.run(lambda d: d.load("s"))
            assert (document.epoch, document.version, list(document.items)) == (again.epoch, 1, ["a"])
    finally:
        reopened.close()


def test_a_session_visited_on_the_server_is_stored_only_once_changed(data_dir: Path) -> None:
    async def visit(*, change: bool) -> str:
        """One server run: join, ask, maybe change; the session's epoch as served."""
        store = SQLiteStore(data_dir)
        async with trio.open_nursery() as nursery:
            harness = await start_memory_server(nursery, store="sqlite", data_dir=str(data_dir), _store=store)
            async with harness.joined("visited", "alice") as alice:
                await alice.send({"type": "ping"})
                await alice.expect("pong")
                await alice.send({"type": "sync:request"})
                state = await alice.expect("sync:state")
                if change:
                    await alice.send(add("a"))
                    assert (await alice.expect("ack"))["seq"] == 1
            harness.server.request_shutdown()
        assert store.stopped.is_set()
        return state["epoch"]

    async def main() -> None:
        with trio.fail_after(HANG):
            await visit(change=False)
            assert session_rows(data_dir) == []
            await visit(change=False)
            assert session_rows(data_dir) == []
            epoch = await visit(change=True)
            assert session_rows(data_dir) == ["visited"]
            # Once written, the epoch survives restarts.
            assert await visit(change=False) == epoch
            assert session_rows(data_dir) == ["visited"]

    trio.run(main)


def test_rows_of_sessions_an_earlier_version_created_on_load_are_removed(data_dir: Path) -> None:
    database = Database(database_path(data_dir))
    try:
        epoch = database.run(lambda d: d.load("kept")).epoch
        database.run(lambda d: d.append("kept", epoch, [op(1, "a")]))
        for legacy in ("visited-1", "visited-2"):
            database.conn.execute(
                "INSERT INTO sessions VALUES (?, 'e0', 0, '2025-01-01T00:00:00', '2025-01-01T00:00:00')", (legacy,)
            )
        database.conn.execute("INSERT INTO snapshots VALUES ('visited-1', 0, 0, '[]')")
    finally:
        database.close()
    assert session_rows(data_dir) == ["kept", "visited-1", "visited-2"]

    async def start_and_stop() -> None:
        store = SQLiteStore(data_dir)
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                await store.aclose()

    trio.run(start_and_stop)
    assert session_rows(data_dir) == ["kept"]
    reader = Database(database_path(data_dir), create=False, readonly=True)
    try:
        assert reader.conn.execute("SELECT session_id FROM snapshots").fetchall() == []
        assert reader.read(lambda d: d.load("kept")).epoch == epoch
    finally:
        reader.close()


def test_journal_replays_after_reopen(db: Database, data_dir: Path, request: pytest.FixtureRequest) -> None:
    epoch = db.run(lambda d: d.load("s")).epoch
    db.run(lambda d: d.append("s", epoch, [op(1, "a"), op(2, "b")]))
    db.run(lambda d: d.append("s", epoch, [op(3, "c", op_id="x")]))
    db.close()
    reopened = open_database(db.kind, request, data_dir)
    try:
        document = reopened.run(lambda d: d.load("s"))
    finally:
        reopened.close()
    assert (document.epoch, document.version) == (epoch, 3)
    assert list(document.items) == ["a", "b", "c"]
    assert document.seq_of("alice", "x") == 3
    assert [o.seq for o in document.ops_since(0)] == [1, 2, 3]


def test_append_refuses_gaps_and_stale_epochs(db: Database) -> None:
    epoch = db.run(lambda d: d.load("s")).epoch
    # No row and not the first change: the session was deleted under the live one.
    with pytest.raises(SessionReset):
        db.run(lambda d: d.append("s", epoch, [op(2, "a")]))
    db.run(lambda d: d.append("s", epoch, [op(1, "a")]))
    with pytest.raises(StoreError, match="does not follow"):
        db.run(lambda d: d.append("s", epoch, [op(3, "c")]))
    with pytest.raises(SessionReset):
        db.run(lambda d: d.append("s", "another-epoch", [op(2, "b")]))
    # Nothing was written by the failed jobs.
    assert db.run(lambda d: d.load("s")).version == 1


def test_commits_on_the_event_loop_never_wait_and_leave_the_writers_settings_alone(data_dir: Path) -> None:
    """run_jobs_now (the server's commits on the event loop) uses a connection
    of its own: it gives way at once to another writer, while the writer
    thread's connection keeps its busy timeout; both count what they wrote."""
    db = Database(database_path(data_dir), busy_timeout=30.0, manual_checkpoints=True)
    try:
        epoch = db.run(lambda d: d.load("s")).epoch
        assert db.since_checkpoint == 0
        # An inline commit that writes counts toward the next checkpoint; one
        # that writes nothing (on either connection) does not.
        [done] = db.run_jobs_now([lambda d: d.append("s", epoch, [op(1, "a")])])
        done.unwrap()
        assert db.since_checkpoint == 1
        [done] = db.run_jobs_now([lambda d: None])
        done.unwrap()
        db.run(lambda d: None)
        assert db.since_checkpoint == 1
        db.run(lambda d: d.append("s", epoch, [op(2, "b")]))
        db.run_jobs_now([lambda d: d.append("s", epoch, [op(3, "c")])])[0].unwrap()
        assert db.since_checkpoint == 3
        # Each connection sees what the other committed.
        assert db.run(lambda d: d.load("s")).version == 3
        locker = sqlite3.connect(database_path(data_dir), isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            assert db.run_jobs_now([lambda d: d.append("s", epoch, [op(4, "d")])]) is None
            assert time.monotonic() - started < 10  # not the 30 s busy timeout
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
        # Nothing was written by the commit that gave way.
        assert db.run(lambda d: d.load("s")).version == 3
        # Inline commits never checkpoint by themselves (the server's thread
        # does): the WAL only grows.
        for seq in range(4, 1504):
            db.run_jobs_now([lambda d, seq=seq: d.append("s", epoch, [op(seq, f"i{seq}")])])[0].unwrap()
        checker = sqlite3.connect(database_path(data_dir))
        try:
            busy, frames, copied = checker.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            checker.close()
        assert frames > 1500, frames
    finally:
        db.close()


def test_a_read_only_database_writes_nothing_on_the_event_loop_either(data_dir: Path) -> None:
    """run_jobs_now on a read-only Database (the admin reads) gives way, as
    run_jobs fails: its connection of its own must not be a writing one."""
    writer = Database(database_path(data_dir))
    try:
        epoch = writer.run(lambda d: d.load("s")).epoch
        writer.run(lambda d: d.append("s", epoch, [op(1, "a")]))
    finally:
        writer.close()
    reader = Database(database_path(data_dir), create=False, readonly=True)
    try:
        results = reader.run_jobs_now([lambda d: d.append("s", epoch, [op(2, "b")])])
        assert results is None or isinstance(results[0], outcome.Error)
        assert reader.read(lambda d: d.load("s")).version == 1
    finally:
        reader.close()


def test_snapshot_then_compaction(db: Database) -> None:
    document = db.run(lambda d: d.load("s"))
    ops = [op(seq, f"i{seq}") for seq in range(1, 13)]
    db.run(lambda d: d.append("s", document.epoch, ops))
    for o in ops:
        document.apply(o)
    db.run(lambda d: d.save_snapshot("s", document.snapshot()))
    seqs = [r[0] for r in db.conn.execute("SELECT seq FROM journal ORDER BY seq")]
    assert seqs == [8, 9, 10, 11, 12]  # retention 5 behind the snapshot at 12
    loaded = db.run(lambda d: d.load("s"))
    assert loaded.version == 12 and list(loaded.items) == [f"i{n}" for n in range(1, 13)]
    assert [o.seq for o in loaded.ops_since(7)] == [8, 9, 10, 11, 12]
    assert loaded.ops_since(6) is None
    # An older snapshot never replaces a newer one.
    old = dict(document.snapshot(), version=3, items=[])
    db.run(lambda d: d.save_snapshot("s", old))
    assert len(db.run(lambda d: d.load("s")).items) == 12


def test_admin_operations(db: Database) -> None:
    epoch = db.run(lambda d: d.load("s")).epoch
    db.run(lambda d: d.append("s", epoch, [op(1, "a"), op(2, "b")]))
    info = db.run(lambda d: d.info("s"))
    assert (info.items, info.version, info.epoch) == (2, 2, epoch)
    assert info.size_bytes > 0
    exported = db.run(lambda d: d.export("s"))
    assert [i["uuid"] for i in exported["items"]] == ["a", "b"] and exported["version"] == 2
    new_epoch = db.run(lambda d: d.import_state("copy", exported["items"]))
    copy = db.run(lambda d: d.load("copy"))
    assert copy.epoch == new_epoch != epoch
    assert list(copy.items) == ["a", "b"]
    assert db.run(lambda d: d.session_ids()) == ["copy", "s"]
    db.run(lambda d: d.delete("s"))
    with pytest.raises(StoreError, match="no session 's'"):
        db.run(lambda d: d.info("s"))
    with pytest.raises(StoreError, match="no session 'nope'"):
        db.run(lambda d: d.delete("nope"))
    assert db.run(lambda d: d.prune(1)) == []
    assert db.run(lambda d: d.prune(0)) == ["copy"]


def test_failed_job_rolls_back_alone(db: Database) -> None:
    epoch = db.run(lambda d: d.load("s")).epoch
    results = db.run_jobs(
        [
            lambda d: d.append("s", epoch, [op(1, "a")]),
            lambda d: d.append("s", epoch, [op(5, "gap")]),
            lambda d: d.append("s", epoch, [op(2, "b")]),
        ]
    )
    assert [isinstance(r, outcome.Value) for r in results] == [True, False, True]
    assert list(db.run(lambda d: d.load("s")).items) == ["a", "b"]


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no collab-trio data"):
        Database(database_path(tmp_path / "nowhere"), create=False)


# -- the server on SQLite ----------------------------------------------------------


async def test_restart_keeps_the_document(start_server, data_dir: Path) -> None:
    with trio.fail_after(HANG):
        first_store = SQLiteStore(data_dir)
        first: Harness = await start_server(store="sqlite", data_dir=str(data_dir), _store=first_store)
        async with first.joined("lab", "alice") as alice:
            for i in range(3):
                await alice.send(add(f"item-{i}", x_mm=float(i)))
                assert (await alice.expect("ack"))["seq"] == i + 1
            epoch = first.registry.sessions["lab"].document.epoch
        first.server.request_shutdown()
        # One data directory, one server: the next one starts once this one's
        # store has let go of it (the port is released earlier).
        await first_store.stopped.wait()

        second: Harness = await start_server(store="sqlite", data_dir=str(data_dir))
        async with second.joined("lab", "bob") as bob:
            ack = second.registry.sessions["lab"].document
            assert (ack.version, ack.epoch) == (3, epoch)
            await bob.send({"type": "sync:request"})
            state = await bob.expect("sync:state")
            assert [i["uuid"] for i in state["state"]["items"]] == ["item-0", "item-1", "item-2"]
            assert state["version"] == 3 and state["epoch"] == epoch

        # The in-memory store is the old behaviour: nothing survives a restart.
        memory: Harness = await start_server(store="memory")
        async with memory.joined("lab", "carol") as carol:
            await carol.send({"type": "sync:request"})
            assert (await carol.expect("sync:state"))["state"] is None


async def test_commands_are_stored_before_anyone_hears_of_them(start_server, data_dir: Path) -> None:
    harness: Harness = await start_server(store="sqlite", data_dir=str(data_dir))
    with trio.fail_after(HANG):
        async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
            await alice.expect("user:joined")
            await alice.send(add("a"))
            relayed = await bob.expect("command")
            # By the time bob hears of it, it is on disk: in the database, or
            # in the pending log that the next start stores (test_pending_log.py).
            reader = Database(database_path(data_dir), create=False)
            try:
                stored = reader.run(lambda d: d.load("s"))
            finally:
                reader.close()
            logged = [
                record
                for number in segment_numbers(data_dir)
                for record, _ in decode_records(segment_path(data_dir, number).read_bytes())[0]
            ]
            assert relayed["seq"] == 1
            assert stored.version >= 1 or [(r.session_id, json.loads(r.ops[0])["seq"]) for r in logged] == [("s", 1)]
            assert (await alice.expect("ack"))["seq"] == 1


@pytest.mark.parametrize("store", ["memory", "sqlite", "postgres"])
async def test_resume_with_sync_ops(start_server, store_settings, store: str) -> None:
    harness: Harness = await start_server(**store_settings(store), retention=5)
    with trio.fail_after(HANG):
        async with harness.joined("s", "alice") as alice:
            ack_epoch = harness.registry.sessions["s"].document.epoch
            await alice.send(add("a"))
            await alice.expect("ack")
            async with harness.joined("s", "bob") as bob:
                # bob was away for seq 2..4
                for name in ("b", "c", "d"):
                    await bob.send(add(name))
                    await bob.expect("ack")
                await alice.send({"type": "sync:request", "since": 1, "epoch": ack_epoch})
                answer = await alice.recv()
                while answer["type"] != "sync:ops":
                    assert answer["type"] in ("user:joined", "command"), answer
                    answer = await alice.recv()
                assert [o["seq"] for o in answer["ops"]] == [2, 3, 4]
                assert [o["command"]["item_id"] for o in answer["ops"]] == ["b", "c", "d"]
                assert all(o["user_id"] == "bob" and o["type"] == "command" for o in answer["ops"])
                assert (answer["version"], answer["epoch"]) == (4, ack_epoch)
                # Up to date: no ops.
                await alice.send({"type": "sync:request", "since": 4, "epoch": ack_epoch})
                assert (await alice.expect("sync:ops"))["ops"] == []
                # Wrong epoch: the whole state.
                await alice.send({"type": "sync:request", "since": 1, "epoch": "stale"})
                assert (await alice.expect("sync:state"))["version"] == 4
                # Beyond retention (5 ops kept): the whole state.
                for name in ("e", "f", "g"):
                    await bob.send(add(name))
                    await bob.expect("ack")
                await alice.send({"type": "sync:request", "since": 1, "epoch": ack_epoch})
                answer = await alice.recv()
                while answer["type"] == "command":
                    answer = await alice.recv()
                assert answer["type"] == "sync:state" and answer["version"] == 7
        # Resume in the handshake: ?since=&epoch= is answered right after the ack.
        async with harness.client("s", "carol", path=f"/ws/s/carol?since=6&epoch={ack_epoch}") as carol:
            await carol.expect("connection:ack")
            ops = await carol.expect("sync:ops")
            assert [o["command"]["item_id"] for o in ops["ops"]] == ["g"]


@pytest.mark.parametrize("store", ["memory", "sqlite", "postgres"])
async def test_repeated_op_id_is_acknowledged_not_applied_twice(start_server, store_settings, store: str) -> None:
    harness: Harness = await start_server(**store_settings(store))
    with trio.fail_after(HANG):
        async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
            await alice.expect("user:joined")
            message = {**add("a"), "op_id": "alice-1"}
            await alice.send(message)
            await alice.send(message)  # a retry, maybe before the first commit
            assert await alice.expect("ack") == {"type": "ack", "seq": 1, "op_id": "alice-1"}
            assert await alice.expect("ack") == {"type": "ack", "seq": 1, "op_id": "alice-1"}
            assert (await bob.expect("command"))["seq"] == 1
            # After a reconnect the retry is still recognised.
            await alice.ws.aclose()
        async with harness.joined("s", "alice") as alice:
            await alice.send({**add("a"), "op_id": "alice-1"})
            assert await alice.expect("ack") == {"type": "ack", "seq": 1, "op_id": "alice-1"}
            # The same op_id from another user is a different op.
            async with harness.joined("s", "bob") as bob:
                await bob.send({**add("b"), "op_id": "alice-1"})
                assert (await bob.expect("ack"))["seq"] == 2
            await alice.send({"type": "sync:request"})
            answer = await alice.recv()
            while answer["type"] != "sync:state":
                answer = await alice.recv()
            assert [i["uuid"] for i in answer["state"]["items"]] == ["a", "b"]


async def test_store_failure_answers_not_persisted_and_others_carry_on(
    start_server, data_dir: Path
) -> None:
    store = SQLiteStore(data_dir, busy_timeout=0.2, pending_log=False)
    harness: Harness = await start_server(store="sqlite", data_dir=str(data_dir), _store=store)
    with trio.fail_after(HANG):
        async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
            await alice.expect("user:joined")
            async with harness.joined("t", "tom") as tom:
                await alice.send(add("before"))
                await alice.expect("ack")
                await bob.expect("command")
                # Another process takes the write lock: every commit now fails.
                locker = sqlite3.connect(database_path(data_dir), isolation_level=None)
                locker.execute("BEGIN EXCLUSIVE")
                try:
                    await alice.send(add("lost"))
                    error = await alice.expect("error")
                    assert (error["code"], error["ref"]) == ("not_persisted", "command")
                    await tom.send(add("also-lost"))
                    assert (await tom.expect("error"))["code"] == "not_persisted"
                    # The server keeps serving: pings, cursors, reads.
                    await bob.send({"type": "ping"})
                    await bob.expect("pong")
                    await bob.send({"type": "cursor", "x": 1})
                    assert (await alice.expect("cursor"))["user_id"] == "bob"
                    await bob.send({"type": "sync:request"})
                    state = await bob.expect("sync:state")
                    assert [i["uuid"] for i in state["state"]["items"]] == ["before"]
                finally:
                    locker.execute("ROLLBACK")
                    locker.close()
                # Nothing of the failed changes was relayed; once the disk is back, all is well.
                await alice.send(add("after"))
                assert (await alice.expect("ack"))["seq"] == 2
                relayed = await bob.expect("command")
                assert (relayed["command"]["item_id"], relayed["seq"]) == ("after", 2)
                await tom.send(add("t1"))
                assert (await tom.expect("ack"))["seq"] == 1


async def test_admin_reset_of_a_live_session_makes_clients_reconnect(
    start_server, data_dir: Path
) -> None:
    harness: Harness = await start_server(
        store="sqlite", data_dir=str(data_dir), _store=SQLiteStore(data_dir, pending_log=False)
    )
    with trio.fail_after(HANG):
        async with harness.joined("s", "alice") as alice:
            await alice.send(add("a"))
            await alice.expect("ack")
            admin = Database(database_path(data_dir), create=False)
            try:
                admin.run(lambda d: d.import_state("s", [{"uuid": "imported", "item_type": "lens"}]))
            finally:
                admin.close()
            await alice.send(add("b"))
            assert (await alice.expect("error"))["code"] == "not_persisted"
            code, reason = await alice.expect_closed()
            assert code == 1001 and "reset by an administrator" in reason
        async with harness.joined("s", "alice") as alice:
            await alice.send({"type": "sync:request"})
            state = await alice.expect("sync:state")
            assert [i["uuid"] for i in state["state"]["items"]] == ["imported"]


@attrs.define(eq=False)
class CountingStore(SQLiteStore):
    """SQLiteStore that counts what its commits at once did."""

    at_once: list[str] = attrs.field(factory=list)

    def commit_now(self, session_id: str, epoch: str, ops: list[Op], replaced: Any = None) -> bool:
        try:
            done = super().commit_now(session_id, epoch, ops, replaced)
        except StoreError as exc:
            self.at_once.append(type(exc).__name__)
            raise
        self.at_once.append("committed" if done else "handed over")
        return done


async def test_changes_one_at_a_time_are_committed_in_the_receiving_task(
    start_server, data_dir: Path
) -> None:
    """With the committer idle a change is committed at once (Store.commit_now),
    and a store error there is answered as one in the committer would be."""
    store = CountingStore(data_dir, pending_log=False)
    harness: Harness = await start_server(store="sqlite", data_dir=str(data_dir), _store=store)
    with trio.fail_after(HANG):
        async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
            await alice.expect("user:joined")
            for n in range(3):  # back to back: a change from a read needs no pause
                await alice.send(add(f"a{n}"))
                assert (await alice.expect("ack"))["seq"] == n + 1
                assert (await bob.expect("command"))["seq"] == n + 1
            assert store.at_once == ["committed"] * 3
            admin = Database(database_path(data_dir), create=False)
            try:
                admin.run(lambda d: d.import_state("s", [{"uuid": "imported", "item_type": "lens"}]))
            finally:
                admin.close()
            await alice.send(add("b"))  # committed at once, where the reset shows
            assert (await alice.expect("error"))["code"] == "not_persisted"
            code, reason = await alice.expect_closed()
            assert code == 1001 and "reset by an administrator" in reason
            assert store.at_once[-1] == "SessionReset"
    reopened = Database(database_path(data_dir), create=False)
    try:
        assert [i["uuid"] for i in reopened.run(lambda d: d.load("s")).snapshot()["items"]] == ["imported"]
    finally:
        reopened.close()


async def test_a_burst_of_changes_in_one_read_is_one_transaction(start_server, data_dir: Path) -> None:
    """Changes that arrive in one read are committed together, at once in
    the receiving task, and every one is acknowledged and relayed in order."""
    store = CountingStore(data_dir, pending_log=False)
    harness: Harness = await start_server(store="sqlite", data_dir=str(data_dir), _store=store)
    with trio.fail_after(HANG):
        async with harness.joined("s", "bob") as bob:
            alice = await raw_connect(harness, "/ws/s/alice")
            await bob.expect("user:joined")
            await alice.send_json(add("first"))
            assert (await alice.expect("ack"))["seq"] == 1
            before = store.transactions
            burst = b"".join(client_frame(OPCODE_TEXT, json.dumps(add(f"b{n}")).encode()) for n in range(5))
            await alice.stream.send_all(burst)
            assert [(await alice.expect("ack"))["seq"] for _ in range(5)] == [2, 3, 4, 5, 6]
            assert [(await bob.expect("command"))["command"]["item_id"] for _ in range(6)] == [
                "first", "b0", "b1", "b2", "b3", "b4"
            ]
            assert store.transactions == before + 1
            assert store.at_once == ["committed", "committed"]


def test_replace_ops_survive_a_reload(db: Database) -> None:
    epoch = db.run(lambda d: d.load("s")).epoch
    items = [{"uuid": "x", "item_type": "mirror"}]
    db.run(lambda d: d.append("s", epoch, [op(1, "a"), Op(2, "alice", REPLACE, "t", items=items)]))
    loaded = db.run(lambda d: d.load("s"))
    assert list(loaded.items) == ["x"] and loaded.version == 2


@pytest.mark.parametrize("store", ["memory", "sqlite", "postgres"])
async def test_sync_request_right_after_a_command_includes_it(start_server, store_settings, store: str) -> None:
    harness: Harness = await start_server(**store_settings(store))
    with trio.fail_after(HANG):
        async with harness.joined("s", "alice") as alice:
            await alice.send(add("a"))
            await alice.send({"type": "sync:request"})  # before the ack: arrival order rules
            assert (await alice.expect("ack"))["seq"] == 1
            state = await alice.expect("sync:state")
            assert state["version"] == 1
            assert [i["uuid"] for i in state["state"]["items"]] == ["a"]


# -- what is stored: JSON text, written and read by orjson, readable as before --------------


ODD_ITEMS = [
    {"uuid": "big", "n": 2**64 + 1, "m": -(10**40), "f": 0.1, "z": -0.0},
    {"uuid": "text", "s": "line\nbreak \u2028 \"quoted\" \\ é 😀 \x00", "nested": {"a": [1, [2, [3]]]}},
    {"uuid": "digits", "s": "1234567890123456789012345", "id": 12345678901234567890},
    {"uuid": "nulls", "label": None, "flag": True},
]


@pytest.mark.parametrize("count", [0, 1, 4, 5000])
def test_snapshot_items_round_trip_exactly(count: int) -> None:
    items = [dict(ODD_ITEMS[i % len(ODD_ITEMS)], uuid=f"item-{i}") for i in range(count)]
    text = encode_items(items)
    assert isinstance(text, str)
    assert decode_items(text) == items
    assert json.loads(text) == items  # plain JSON: what earlier versions read
    decoded = decode_items(text)
    for original, loaded in zip(items, decoded):
        assert [type(v) for v in loaded.values()] == [type(v) for v in original.values()]


def test_large_snapshots_are_stored_in_lines_parsed_one_at_a_time() -> None:
    items = [{"uuid": f"item-{i}", "item_type": "lens", "x_mm": i * 1.5, "name": "Lens é"} for i in range(20_000)]
    text = encode_items(items)
    lines = text.split("\n")
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) > 4
    # Each line is one bounded parse (the GIL is free between them).
    assert max(len(line.encode()) for line in lines) < 2 * SNAPSHOT_LINE_BYTES
    assert decode_items(text) == items


def test_rows_written_by_the_stdlib_still_load(sqlite_db: Database, data_dir: Path) -> None:
    db = sqlite_db
    # What earlier versions stored: compact stdlib JSON, big integers exact.
    items = [dict(item, item_type="lens") for item in ODD_ITEMS]
    db.conn.execute(
        "INSERT INTO sessions VALUES ('old', 'e1', 2, '2025-01-01T00:00:00', '2025-01-01T00:00:00')"
    )
    db.conn.execute(
        "INSERT INTO snapshots VALUES ('old', 1, 1, ?)",
        (json.dumps(items, ensure_ascii=False, allow_nan=False, separators=(",", ":")),),
    )
    command = {"action": "add_item", "item_type": "lens", "item_id": "late", "data": {"n": 10**30}}
    record = Op(2, "alice", COMMAND, "t", command=command).to_record()
    db.conn.execute(
        "INSERT INTO journal VALUES ('old', 2, ?)",
        (json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")),),
    )
    document = db.read(lambda d: d.load("old"))
    assert list(document.items) == ["big", "text", "digits", "nulls", "late"]
    assert document.items["big"]["n"] == 2**64 + 1 and document.items["late"]["n"] == 10**30
    assert document.items["text"] == items[1]
    [info] = db.read(lambda d: d.summaries())
    assert (info.items, info.unreadable) == (5, None)


def test_what_is_stored_now_is_plain_json_for_sqlite_and_the_admin_commands(sqlite_db: Database) -> None:
    db = sqlite_db
    epoch = db.run(lambda d: d.load("s")).epoch
    items = [dict(ODD_ITEMS[i % 4], uuid=f"i{i}") for i in range(3000)]
    db.run(lambda d: d.append("s", epoch, [Op(1, "alice", REPLACE, "t", items=items)]))
    document = db.run(lambda d: d.load("s"))
    db.run(lambda d: d.save_snapshot("s", document.snapshot()))
    assert db.conn.execute("SELECT typeof(items), json_array_length(items) FROM snapshots").fetchone() == ("text", 3000)
    assert db.conn.execute("SELECT typeof(op), json_valid(op) FROM journal").fetchone() == ("text", 1)
    [info] = db.read(lambda d: d.summaries())
    assert info.items == 3000
    exported = db.read(lambda d: d.export("s"))
    assert exported["items"] == items
    assert db.run(lambda d: d.load("s")).items["i0"]["n"] == 2**64 + 1


async def test_a_session_encodes_its_snapshot_a_piece_at_a_time_as_of_its_version(data_dir: Path) -> None:
    """The session hands the store its snapshot as text (SQLiteStore.snapshot_text),
    encoded ~32 KiB at a time: other tasks run in between, the document moves
    on meanwhile, and what is stored is the document of the snapshot's version."""
    from collab_trio.session import SNAPSHOT_STEP_BYTES, _encoded

    store = SQLiteStore(data_dir)
    moves = 0
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            document = await store.load("s")
            items = [dict(ODD_ITEMS[i % 4], uuid=f"i{i}", item_type="lens") for i in range(3000)]
            await store.commit("s", document.epoch, [Op(1, "alice", REPLACE, "t", items=items)])
            document.apply(Op(1, "alice", REPLACE, "t", items=items))
            snapshot = document.snapshot()
            expected = json.loads(encode_items(snapshot["items"]))

            async def move_on() -> None:
                nonlocal moves
                while True:
                    seq = document.version + 1
                    command = {"action": "move_item", "item_id": f"i{seq % 3000}", "data": {"x_mm": seq}}
                    document.apply(Op(seq, "bob", COMMAND, "t", command=command))
                    moves += 1
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(move_on)
            encoded = await _encoded(snapshot)
            nursery.cancel_scope.cancel()
    assert "items" not in encoded and encoded["version"] == 1
    assert len(encoded["text"]) > 8 * SNAPSHOT_STEP_BYTES
    assert moves >= 8  # the event loop ran other tasks between the pieces
    assert json.loads(encoded["text"]) == expected  # as of version 1, not of the moves since
    assert decode_items(encoded["text"]) == expected
    assert snapshot_cost(encoded) == JOB_BYTES + len(encoded["text"].encode("utf-8"))  # counted by its text

    reopened = SQLiteStore(data_dir)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(reopened.run)
            await reopened.save_snapshot("s", encoded)
            loaded = await reopened.load("s")
            nursery.cancel_scope.cancel()
    assert list(loaded.items.values()) == expected


def test_a_large_snapshot_an_earlier_version_wrote_loads_item_by_item() -> None:
    items = [dict(ODD_ITEMS[i % 4], uuid=f"i{i}") for i in range(8000)]
    text = json.dumps(items, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    assert len(text) > SNAPSHOT_LINE_BYTES and "\n" not in text
    assert decode_items(text) == items
    for broken in (text[:-1], text + "]", text.replace("},{", "} {", 1), "[" + text):
        with pytest.raises(ValueError):
            decode_items(broken)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3), max_leaves=10
)


@settings(derandomize=True, database=None, deadline=None, max_examples=200)
@given(
    st.lists(json_values, max_size=6),
    st.sampled_from([(",", ":"), (", ", ": ")]),
    st.sampled_from(["", " ", "\t\r\n "]),
    st.sampled_from(["", "]", ",", " x", "[", ",]", "1"]),
)
def test_item_by_item_parsing_agrees_with_json_loads(items: list, separators: tuple, pad: str, junk: str) -> None:
    text = pad + json.dumps(items, separators=separators) + pad + junk
    try:
        expected: Any = ("ok", json.loads(text))
    except ValueError:
        expected = ("error",)
    try:
        got: Any = ("ok", _parse_array_stepwise(text))
    except ValueError:
        got = ("error",)
    assert repr(got) == repr(expected)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://collab:s3cret@db.internal/collab", "postgresql://collab:***@db.internal/collab"),
        ("postgresql://collab@db.internal/collab?password=s3cret&sslmode=require",
         "postgresql://collab@db.internal/collab?password=***&sslmode=require"),
        ("host=db.internal password=s3cret dbname=collab", "host=db.internal password=*** dbname=collab"),
        ("postgresql://collab@/collab?host=/run/postgresql", "postgresql://collab@/collab?host=/run/postgresql"),
    ],
)
def test_database_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    from collab_trio.store.postgres import redact_url

    assert redact_url(url) == shown


def test_the_embedded_store_needs_no_postgres_driver() -> None:
    """`collab-trio serve` with no options (SQLite) never imports psycopg."""
    import subprocess
    import sys

    from collab_trio.testing import child_env

    code = (
        "import sys\n"
        "from collab_trio.cli import config_from, serve_settings\n"
        "from collab_trio.store import make_store\n"
        "store = make_store(config_from(serve_settings(['serve'], {}).values))\n"
        "print(type(store).__name__, 'psycopg' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=HANG)
    assert (done.returncode, done.stdout) == (0, "SQLiteStore False\n"), done.stderr


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["action", "item_id", "item_type", "data", "x"]), _VALUES, max_size=5),
    st.none() | st.integers() | st.text(max_size=8),
)
def test_a_relay_embedding_the_encoded_command_is_the_same_bytes(command: dict, op_id: Any) -> None:
    """A relay embeds the command's one encoding (encode_command); its bytes
    are those of encoding it whole, also where orjson can't (an integer
    beyond 64 bits) and the stdlib writes it."""
    from collab_trio.document import encode_command
    from collab_trio.messages import Relay, encode_message_bytes
    from collab_trio.protocol import encode_bytes

    op = Op(7, "alice", COMMAND, "2026-12-07T00:00:00.000+00:00", command=command, op_id=op_id)
    assert encode_message_bytes(Relay(op, encode_command(command))) == encode_bytes(op.relayed())
    assert encode_message_bytes(Relay(op)) == encode_bytes(op.relayed())


async def test_a_text_snapshot_is_counted_by_its_utf8_bytes_not_its_characters() -> None:
    """The store's queue is bounded in bytes: a snapshot handed over as text
    (Session._encoded) costs the bytes it is written as. Counted by its
    characters, a document in Chinese or of emoji was counted at a third or
    a quarter of its size, and the bound was overrun by that much."""
    from collab_trio.session import _encoded

    items = [{"uuid": f"i{i}", "item_type": "note", "label": "光学台" * 40 + "😀" * 20} for i in range(500)]
    snapshot = {"epoch": "e", "version": 1, "written": True, "items": items}
    encoded = await _encoded(snapshot)
    size = len(encoded["text"].encode("utf-8"))
    assert size > 2 * len(encoded["text"])
    assert snapshot_cost(encoded) == JOB_BYTES + size
    # Text handed over without its size (the Store protocol allows it).
    bare = {key: value for key, value in encoded.items() if key != "text_bytes"}
    assert snapshot_cost(bare) == JOB_BYTES + size
    assert snapshot_cost({**bare, "text": "[]"}) == JOB_BYTES + 2
