"""Version history without processes: the pure rules (history.py), the
session core's part (which document a replacement displaces, restores) and
the database's (a version is kept in the transaction of the op that replaces
the document, and only then; bounds; de-duplication; delete, import, backup)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from collab_trio.config import ServerConfig
from collab_trio.document import COMMAND, REPLACE, Op
from collab_trio.history import (
    ADMIN_USER,
    KeptVersion,
    replace_reason,
    versions_to_drop,
    worth_keeping,
)
from collab_trio.messages import Ack, Forwarded, SyncState
from collab_trio.session_core import Broadcast, Restored, Send, SessionCore
from collab_trio.store import SessionReset, StoreError, make_store
from collab_trio.store.database import SCHEMA_VERSION, Database, database_path

NOW = "2026-12-02T10:00:00.000+00:00"
DESIGN = [{"uuid": "lens-1", "item_type": "lens", "focal_length_mm": 50.0}, {"uuid": "m", "item_type": "mirror"}]
DEGRADED = [{"uuid": "lens-1", "item_type": "lens"}, {"uuid": "m", "item_type": "mirror"}]

# -- pure rules ----------------------------------------------------------------------


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=1000), max_size=30),
    kept=st.integers(min_value=1, max_value=40),
    max_bytes=st.integers(min_value=0, max_value=5000),
    first=st.integers(min_value=1, max_value=100),
)
def test_versions_to_drop_keeps_the_newest_within_both_bounds_and_drops_no_more(
    sizes: list[int], kept: int, max_bytes: int, first: int
) -> None:
    versions = [(first + index, size) for index, size in enumerate(sizes)]
    dropped = versions_to_drop(list(reversed(versions)), kept=kept, max_bytes=max_bytes)
    # The oldest go first, and the newest always stays.
    assert dropped == [number for number, _ in versions[: len(dropped)]]
    rest = versions[len(dropped):]
    assert bool(rest) == bool(versions)
    # Within both bounds (a lone newest version may pass the byte budget)...
    assert len(rest) <= kept
    assert len(rest) <= 1 or sum(size for _, size in rest) <= max_bytes
    # ...and nothing dropped that both bounds allowed.
    if dropped:
        one_more = versions[len(dropped) - 1:]
        assert len(one_more) > kept or sum(size for _, size in one_more) > max_bytes


def test_a_version_is_worth_keeping_unless_nothing_changes_or_it_is_the_newest_already() -> None:
    assert worth_keeping("a", "b", None)
    assert worth_keeping("a", "b", "c")
    assert not worth_keeping("a", "a", None)  # replaced by the same items
    assert not worth_keeping("a", "b", "a")  # the same upload again: kept once


def test_what_replaced_a_document_reads_as_history_shows_it() -> None:
    assert replace_reason("sync:full_state", "alice", host=True) == "sync:full_state by alice (host)"
    assert replace_reason("sync:update", "bob") == "sync:update by bob"
    assert replace_reason("restore", ADMIN_USER, restored=3) == "restore of version 3"


# -- the session core ------------------------------------------------------------------


def core_with_design() -> SessionCore:
    """alice (host) and bob in a session holding DESIGN (committed)."""
    c = SessionCore("lab", clock=lambda: NOW)
    c.join("alice", "alice", connected_at=NOW)
    c.join("bob", "bob", connected_at=NOW)
    c.receive("alice", "alice", json.dumps({"type": "sync:update", "state": {"items": DESIGN}}))
    batch = c.take_batch()
    assert batch is not None and batch.replaced is None  # the document was empty: nothing to keep
    c.committed(batch)
    return c


def command_frame(item_id: str) -> str:
    command = {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {}}
    return json.dumps({"type": "command", "command": command})


def test_a_replacement_is_the_first_change_of_its_batch_and_carries_the_document_it_displaces() -> None:
    c = core_with_design()
    c.receive("bob", "bob", command_frame("extra"))
    c.receive("alice", "alice", json.dumps({"type": "sync:full_state", "state": {"items": DEGRADED}}))
    c.receive("bob", "bob", command_frame("after"))
    first = c.take_batch()
    assert first is not None and [op.kind for op in first.ops] == [COMMAND] and first.replaced is None
    c.committed(first)
    second = c.take_batch()
    assert second is not None and [op.kind for op in second.ops] == [REPLACE]  # the command after waits
    assert second.replaced == KeptVersion(
        seq=2,
        items=[*DESIGN, {"uuid": "extra", "item_type": "lens"}],
        user_id="alice",
        reason="sync:full_state by alice (host)",
        replaced_at=NOW,
        size=c.document.size,
    )
    effects = c.committed(second)
    assert Broadcast(Forwarded({"type": "sync:full_state", "state": {"items": DEGRADED}, "user_id": "alice"}),
                     exclude="alice") in effects
    third = c.take_batch()
    assert third is not None and [op.seq for op in third.ops] == [4]


def test_a_restore_is_sent_to_every_member_and_reported_to_its_ticket() -> None:
    c = core_with_design()
    c.receive("bob", "bob", json.dumps({"type": "sync:update", "state": {"items": DEGRADED}}))
    c.committed(c.take_batch())  # type: ignore[arg-type]
    ticket = object()
    c.restore(DESIGN, 1, ticket)
    batch = c.take_batch()
    assert batch is not None
    [op] = batch.ops
    assert (op.seq, op.user_id, op.kind, op.items) == (3, ADMIN_USER, REPLACE, DESIGN)
    assert batch.replaced is not None
    assert (batch.replaced.reason, batch.replaced.user_id, batch.replaced.items) == (
        "restore of version 1", ADMIN_USER, DEGRADED
    )
    effects = c.committed(batch)
    state = SyncState({"items": DESIGN, "version": 3, "timestamp": NOW}, 3, c.document.epoch)
    assert effects == [Broadcast(state), Restored(ticket, 3)]  # everyone, no ack to anyone


def test_a_restore_that_is_not_stored_reports_why_and_changes_nothing() -> None:
    c = core_with_design()
    ticket = object()
    c.restore(DEGRADED, 4, ticket)
    batch = c.take_batch()
    assert batch is not None
    effects = c.commit_failed(batch, error="commit failed: disk I/O error")
    assert effects == [Restored(ticket, error="the restore was not stored: commit failed: disk I/O error")]
    assert list(c.document.items.values()) == DESIGN and c.document.version == 1


def test_a_restore_larger_than_the_document_limit_is_refused_at_once() -> None:
    c = SessionCore("lab", clock=lambda: NOW, max_document_size=100)
    ticket = object()
    [effect] = c.restore([{"uuid": "x", "pad": "p" * 200}], 2, ticket)
    assert isinstance(effect, Restored) and effect.seq is None
    assert effect.error is not None and effect.error.startswith("version 2 is 2")
    assert c.take_batch() is None


def test_the_sender_of_a_sync_update_is_acknowledged_and_the_others_get_the_state() -> None:
    c = core_with_design()
    c.receive("bob", "bob", json.dumps({"type": "sync:update", "state": {"items": DEGRADED}, "op_id": 7}))
    batch = c.take_batch()
    assert batch is not None and batch.replaced is not None
    assert batch.replaced.reason == "sync:update by bob"
    effects = c.committed(batch)
    assert Send("bob", Ack(2, 7)) in effects


# -- the database ------------------------------------------------------------------------


def replace_op(seq: int, items: list[dict[str, Any]], user: str = "alice") -> Op:
    return Op(seq=seq, user_id=user, kind=REPLACE, timestamp=NOW, items=items)


def kept(seq: int, items: list[dict[str, Any]], reason: str = "sync:update by alice") -> KeptVersion:
    return KeptVersion(seq, items, "alice", reason, NOW)


def numbered(n: int) -> list[dict[str, Any]]:
    return [{"uuid": f"item-{n}", "n": n}]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Versions in either store's database."""
    if request.param == "postgres":
        from collab_trio.store.postgres import PgDatabase

        database = PgDatabase(request.getfixturevalue("database_url"), versions_kept=3, versions_bytes=10_000)
    else:
        database = Database(database_path(tmp_path / "data"), versions_kept=3, versions_bytes=10_000)
    database.kind = request.param
    yield database
    database.close()


def first_epoch(db: Database, items: list[dict[str, Any]] = DESIGN) -> str:
    """Store session `s` at seq 1 holding `items`; its epoch."""
    document = db.run(lambda d: d.load("s"))
    db.run(lambda d: d.append("s", document.epoch, [replace_op(1, items)]))
    return document.epoch


def test_a_version_is_kept_in_the_transaction_of_the_replacing_op_and_only_if_it_commits(db: Database) -> None:
    epoch = first_epoch(db)

    def replace_then_fail(d: Database) -> None:
        d.append("s", epoch, [replace_op(2, DEGRADED)], kept(1, DESIGN))
        raise RuntimeError("the disk is gone")

    with pytest.raises(StoreError, match="the disk is gone"):
        db.run(replace_then_fail)
    assert db.read(lambda d: d.history("s")) == []  # rolled back with the op
    assert db.read(lambda d: d.load("s").version) == 1
    # An op that does not follow (a deleted session) keeps nothing either.
    with pytest.raises(SessionReset):
        db.run(lambda d: d.append("s", "other-epoch", [replace_op(2, DEGRADED)], kept(1, DESIGN)))
    assert db.read(lambda d: d.history("s")) == []
    db.run(lambda d: d.append("s", epoch, [replace_op(2, DEGRADED)], kept(1, DESIGN)))
    [version] = db.read(lambda d: d.history("s"))
    assert (version.number, version.seq, version.user_id, version.reason, version.items) == (
        1, 1, "alice", "sync:update by alice", 2
    )
    assert db.read(lambda d: d.version_items("s", 1)) == DESIGN


def test_versions_are_bounded_by_count_and_numbers_are_never_reused(db: Database) -> None:
    epoch = first_epoch(db, numbered(1))
    for seq in range(2, 8):
        db.run(lambda d, seq=seq: d.append("s", epoch, [replace_op(seq, numbered(seq))], kept(seq - 1, numbered(seq - 1))))
    versions = db.read(lambda d: d.history("s"))
    assert [(v.number, v.seq) for v in versions] == [(4, 4), (5, 5), (6, 6)]  # versions_kept=3
    assert db.read(lambda d: d.version_items("s", 6)) == numbered(6)
    with pytest.raises(StoreError, match=r"^session 's' has no version 1 \(it has versions 4-6\)$"):
        db.read(lambda d: d.version_items("s", 1))


def test_versions_are_bounded_by_bytes_and_the_newest_stays_even_alone_too_large(db: Database) -> None:
    epoch = first_epoch(db, numbered(1))
    big = [{"uuid": "big", "pad": "p" * 6_000}]
    db.run(lambda d: d.append("s", epoch, [replace_op(2, big)], kept(1, numbered(1))))
    db.run(lambda d: d.append("s", epoch, [replace_op(3, numbered(3))], kept(2, big)))
    assert [v.number for v in db.read(lambda d: d.history("s"))] == [1, 2]  # 6 KB together: within 10 KB
    huge = [{"uuid": "huge", "pad": "p" * 12_000}]
    db.run(lambda d: d.append("s", epoch, [replace_op(4, numbered(4))], kept(3, huge)))
    [alone] = db.read(lambda d: d.history("s"))
    assert (alone.number, alone.bytes > 10_000) == (3, True)


def test_the_same_document_is_kept_once_and_a_replacement_by_itself_keeps_nothing(db: Database) -> None:
    epoch = first_epoch(db)
    db.run(lambda d: d.append("s", epoch, [replace_op(2, DEGRADED)], kept(1, DESIGN)))
    # Re-uploading DEGRADED over DEGRADED (a reconnect loop): the same items, nothing kept.
    for seq in (3, 4, 5):
        db.run(lambda d, seq=seq: d.append("s", epoch, [replace_op(seq, DEGRADED)], kept(seq - 1, DEGRADED)))
    # A different document displacing DEGRADED twice: the second time it is the newest version.
    db.run(lambda d: d.append("s", epoch, [replace_op(6, DESIGN)], kept(5, DEGRADED)))
    db.run(lambda d: d.append("s", epoch, [replace_op(7, DEGRADED)], kept(6, DESIGN)))
    db.run(lambda d: d.append("s", epoch, [replace_op(8, DEGRADED)], kept(7, DESIGN)))
    versions = db.read(lambda d: d.history("s"))
    assert [(v.number, v.seq) for v in versions] == [(1, 1), (2, 5), (3, 6)]


def test_restore_in_the_database_is_a_new_op_that_keeps_what_it_replaces(db: Database) -> None:
    epoch = first_epoch(db)
    db.run(lambda d: d.append("s", epoch, [replace_op(2, DEGRADED)], kept(1, DESIGN)))
    assert db.run(lambda d: d.restore("s", 1)) == 3
    document = db.read(lambda d: d.load("s"))
    assert (document.epoch, document.version, list(document.items.values())) == (epoch, 3, DESIGN)
    assert document.history[-1].user_id == ADMIN_USER
    assert [(v.number, v.reason, v.user_id) for v in db.read(lambda d: d.history("s"))] == [
        (1, "sync:update by alice", "alice"),
        (2, "restore of version 1", ADMIN_USER),
    ]


def test_delete_drops_the_versions_import_keeps_the_replaced_document_and_backup_copies_them(
    db: Database, tmp_path: Path
) -> None:
    epoch = first_epoch(db)
    db.run(lambda d: d.append("s", epoch, [replace_op(2, DEGRADED)], kept(1, DESIGN)))
    db.run(lambda d: d.import_state("s", numbered(9)))
    versions = db.read(lambda d: d.history("s"))
    assert [(v.number, v.reason, v.user_id, v.seq) for v in versions] == [
        (1, "sync:update by alice", "alice", 1),
        (2, "import", ADMIN_USER, 2),
    ]
    if db.kind == "sqlite":
        db.backup(tmp_path / "copy.sqlite3")
        copy = Database(tmp_path / "copy.sqlite3", create=False, readonly=True)
        try:
            assert copy.read(lambda d: d.history("s")) == versions
            assert copy.read(lambda d: d.version_items("s", 2)) == DEGRADED
        finally:
            copy.close()
    else:
        with pytest.raises(StoreError, match="pg_dump"):
            db.backup(tmp_path / "copy.sqlite3")
    assert db.read(lambda d: d.info("s")).versions == 2
    db.run(lambda d: d.delete("s"))
    assert db.read(lambda d: d.conn.execute("SELECT COUNT(*) FROM versions").fetchone()[0]) == 0


def test_a_data_directory_of_schema_1_is_read_as_it_is_and_upgraded_by_a_writer(tmp_path: Path) -> None:
    path = database_path(tmp_path / "old")
    path.parent.mkdir()
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, epoch TEXT NOT NULL, version INTEGER NOT NULL,"
        " created_at TEXT NOT NULL, updated_at TEXT NOT NULL);"
        "CREATE TABLE snapshots (session_id TEXT PRIMARY KEY, version INTEGER NOT NULL,"
        " written INTEGER NOT NULL, items TEXT NOT NULL);"
        "CREATE TABLE journal (session_id TEXT NOT NULL, seq INTEGER NOT NULL, op TEXT NOT NULL,"
        " PRIMARY KEY (session_id, seq)) WITHOUT ROWID;"
        f"INSERT INTO sessions VALUES ('s', 'e1', 0, '{NOW}', '{NOW}');"
        "PRAGMA user_version = 1;"
    )
    old.close()
    reader = Database(path, create=False, readonly=True)
    try:
        assert reader.schema == 1
        assert reader.read(lambda d: d.history("s")) == []
        assert [i.versions for i in reader.read(lambda d: d.summaries())] == [0]
    finally:
        reader.close()
    writer = Database(path, create=False)
    try:
        assert writer.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert writer.read(lambda d: d.history("s")) == []
    finally:
        writer.close()


# -- the store ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_the_store_keeps_versions_with_its_commits_and_hands_over_admin_requests(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """SQLiteStore or PostgresStore, real clock (the writer is a thread): a
    commit that fails keeps no version, the settings bound them, requests
    come out once."""
    if kind == "postgres":
        from collab_trio.store.postgres import PgDatabase

        url = request.getfixturevalue("database_url")
        config = ServerConfig(store="postgres", database_url=url, versions_kept=2)
        open_admin = lambda: PgDatabase(url)  # noqa: E731
    else:
        config = ServerConfig(data_dir=str(tmp_path / "data"), versions_kept=2)
        open_admin = lambda: Database(database_path(tmp_path / "data"))  # noqa: E731
    store = make_store(config)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            epoch = (await store.load("s")).epoch
            await store.commit("s", epoch, [replace_op(1, numbered(1))])
            with pytest.raises(StoreError, match="does not follow"):
                await store.commit("s", epoch, [replace_op(5, numbered(5))], kept(1, numbered(1)))
            with pytest.raises(StoreError, match=r"^session 's' has no version 1 \(it has no versions\)$"):
                await store.version_items("s", 1)  # the failed commit kept nothing
            for seq in range(2, 6):
                await store.commit("s", epoch, [replace_op(seq, numbered(seq))], kept(seq - 1, numbered(seq - 1)))
            assert await store.version_items("s", 4) == numbered(4)
            with pytest.raises(StoreError, match=r"has no version 2 \(it has versions 3-4\)"):
                await store.version_items("s", 2)
            admin = open_admin()
            try:
                expired = admin.run(lambda d: d.add_request("s", "restore", 4, timeout=0))
                request = admin.run(lambda d: d.add_request("s", "restore", 3, timeout=60))
                [taken] = await store.next_requests()
                assert (taken.id, taken.session_id, taken.action, taken.version) == (request, "s", "restore", 3)
                assert await store.restore("s", 3) == 6
                await store.finish_request(taken, seq=6)
                assert admin.read(lambda d: d.request_outcome(request)) == ("done", 6, None)
                # The one its command gave up on before the server looked is never carried out.
                assert admin.read(lambda d: d.request_outcome(expired)) == ("failed", None, "the request is gone")
            finally:
                admin.close()
            assert (await store.load("s")).items == {"item-3": numbered(3)[0]}
            with trio.move_on_after(1.5):
                await store.next_requests()  # taken once: nothing more comes
                pytest.fail("a request came twice")  # pragma: no cover
            nursery.cancel_scope.cancel()
