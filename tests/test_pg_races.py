"""The Postgres store's transactions run READ COMMITTED (each statement
reads the latest commit): what one reads to write from must not change
between its statements. Each race below pauses one transaction between two
statements and runs the other side in that gap: an admin command (import,
delete, prune) against a node's snapshot, load or commit. SQLite's
BEGIN IMMEDIATE runs them one at a time; these hold on Postgres too.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import trio

from collab_trio.store.postgres import PgDatabase
from collab_trio.testing import HANG

from .test_leases import add, node, op
from .test_multinode import until


def _released(url: str, session_id: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT expires_at <= now() FROM leases WHERE session_id = %s", (session_id,)).fetchone()
    return row is None or bool(row[0])


async def test_a_deleted_or_pruned_session_keeps_no_lease_row(start_server, database_url: str) -> None:
    """SCALING.md: "A session left with nothing stored keeps no row" (the
    leases table must not grow for ever). After `sessions delete` or
    `sessions prune` of a session some node served and let go, nothing is
    stored of it: its lease row should be gone too."""
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a")
        for session_id in ("deleted", "pruned"):
            async with a.joined(session_id, "alice") as alice:
                await alice.send(add("one"))
                await alice.expect("ack")
        await until(  # (released in the background)
            lambda: _released(database_url, "deleted") and _released(database_url, "pruned"),
            "the node released both leases", HANG,
        )
        admin = PgDatabase(database_url)
        try:
            admin.run(lambda d: d.delete("deleted"))
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("UPDATE sessions SET updated_at = '2000-01-01T00:00:00.000+00:00'")
            assert admin.run(lambda d: d.prune(30)) == ["pruned"]
            assert admin.read(lambda d: d.session_ids()) == []
        finally:
            admin.close()
        with psycopg.connect(database_url, autocommit=True) as conn:
            rows = conn.execute("SELECT session_id, owner FROM leases ORDER BY session_id").fetchall()
        assert rows == [], f"lease rows of sessions that no longer exist: {rows}"


def finished_or_waiting(url: str, thread: threading.Thread) -> None:
    """Wait (HANG at most) until `thread` ended or a statement waits for a
    row lock in the database (the paused transaction holds it)."""
    deadline = time.monotonic() + HANG
    with psycopg.connect(url, autocommit=True) as watcher:
        while thread.is_alive() and time.monotonic() < deadline:
            (waiting,) = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            ).fetchone()
            if waiting:
                return
            thread.join(0.01)


def _admin_aside(url: str, job: Any) -> Any:
    """An admin command's transaction in a thread of its own, once it ended
    or waits for a lock the paused transaction holds; returns a function
    giving its result once it ended."""
    results: list[Any] = []

    def run() -> None:
        admin = PgDatabase(url)
        try:
            results.append(admin.run(job))
        finally:
            admin.close()

    thread = threading.Thread(target=run)
    thread.start()
    finished_or_waiting(url, thread)

    def result() -> Any:
        thread.join(HANG)
        assert results, "the admin command did not finish"
        return results[0]

    return result


def test_a_takeover_load_racing_an_import_never_mixes_two_epochs(database_url: str) -> None:
    """A node loads a session (load_leased: READ COMMITTED, one snapshot per
    statement) while `sessions import` replaces it (not fenced: it takes no
    lease lock). The document loaded must be the old one (old epoch, old
    items) or the imported one (new epoch): never the imported items under
    the old epoch, which clients that resume with since=1&epoch=OLD take
    for the document they already have."""
    setup = PgDatabase(database_url, node_id="node-a", lease_timeout=60)
    try:
        fence, _, document = setup.run(lambda d: d.load_leased("s"))
        setup.run(lambda d: (d.check_fence("s", fence), d.append("s", document.epoch, [op(1, "old")])))
        setup.run(lambda d: d.renew({}, [("s", fence)]))  # node-a lets it go
    finally:
        setup.close()
    old_epoch = document.epoch

    b = PgDatabase(database_url, node_id="node-b", lease_timeout=60)
    paused, resume = threading.Event(), threading.Event()
    real_execute = b.conn.execute

    def execute(sql: str, params: Any = ()) -> Any:
        result = real_execute(sql, params)
        if sql.startswith("SELECT epoch, version FROM sessions") and not paused.is_set():
            paused.set()
            resume.wait(HANG)
        return result

    b.conn.execute = execute  # type: ignore[method-assign]
    loaded: list[Any] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            loaded.append(b.run(lambda d: d.load_leased("s")))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        assert paused.wait(HANG)
        imported = _admin_aside(database_url, lambda d: d.import_state("s", [{"uuid": "imported", "item_type": "lens"}]))
    finally:
        resume.set()
        thread.join(HANG)
        b.close()
    new_epoch = imported()
    assert not errors, errors
    [(new_fence, owner, document)] = loaded
    state = (document.epoch, document.version, sorted(document.items))
    assert state in [(old_epoch, 1, ["old"]), (new_epoch, 1, ["imported"])], (
        f"loaded {state}: the imported items under the old epoch {old_epoch} (the import made {new_epoch})"
    )


def _paused_after(db: PgDatabase, prefix: str) -> tuple[threading.Event, threading.Event]:
    """Make `db` stop (in its thread) right after the first statement starting with `prefix`."""
    paused, resume = threading.Event(), threading.Event()
    real_execute = db.conn.execute

    def execute(sql: str, params: Any = ()) -> Any:
        result = real_execute(sql, params)
        if sql.startswith(prefix) and not paused.is_set():
            paused.set()
            resume.wait(HANG)
        return result

    db.conn.execute = execute  # type: ignore[method-assign]
    return paused, resume


def _commit_aside(db: PgDatabase, url: str, fence: int, epoch: str, change: Any) -> Any:
    """node-a's fenced commit of `change` in a thread of its own; returns a
    function giving its outcome once it ended (True: committed, acknowledged)."""
    outcome: list[Any] = []

    def commit() -> None:
        try:
            db.run(lambda d: (d.check_fence("s", fence), d.append("s", epoch, [change])))
            outcome.append(True)
        except Exception as exc:  # noqa: BLE001 - an outcome
            outcome.append(exc)

    thread = threading.Thread(target=commit)
    thread.start()
    finished_or_waiting(url, thread)  # committed at once, or waiting for the admin's locks

    def result() -> Any:
        thread.join(HANG)
        return outcome[0] if outcome else None

    return result


def _admin_paused_while_a_commits(
    admin: PgDatabase, prefix: str, job: Any, a: PgDatabase, url: str, fence: int, epoch: str, change: Any
) -> tuple[list[Any], Any]:
    """Run the admin's `job`, paused right after its statement starting with
    `prefix`; meanwhile node-a commits `change` (acknowledged if it
    succeeds; refused, unacknowledged, is fine too). The job's results (one,
    or none if it failed) and the commit's outcome (see _commit_aside)."""
    paused, resume = _paused_after(admin, prefix)
    done: list[Any] = []
    runner = threading.Thread(target=lambda: done.append(admin.run(job)))
    runner.start()
    try:
        assert paused.wait(HANG)
        committed = _commit_aside(a, url, fence, epoch, change)
    finally:
        resume.set()
        runner.join(HANG)
    return done, committed


def test_an_import_keeps_as_a_version_every_change_acknowledged_before_it(database_url: str) -> None:
    """README: an import over a session keeps the document it replaces as a
    version. On Postgres it runs READ COMMITTED and locks nothing before it
    deletes: a change the serving node commits (and acknowledges) between the
    import's read of the document and its delete is in neither the kept
    version nor the journal: an acknowledged change gone without a trace.
    (SQLite's BEGIN IMMEDIATE serializes the two.)"""
    a = PgDatabase(database_url, node_id="node-a", lease_timeout=60)
    admin = PgDatabase(database_url)
    try:
        fence, _, document = a.run(lambda d: d.load_leased("s"))
        epoch = document.epoch
        a.run(lambda d: (d.check_fence("s", fence), d.append("s", epoch, [op(1, "one")])))
        done, committed = _admin_paused_while_a_commits(
            admin, "SELECT seq, op FROM journal", lambda d: d.import_state("s", [{"uuid": "new", "item_type": "lens"}]),
            a, database_url, fence, epoch, op(2, "two"),
        )
        assert done, "the import did not finish"
        if committed() is not True:
            return  # refused: never acknowledged
        [version] = admin.read(lambda d: d.history("s"))
        kept = sorted(item["uuid"] for item in admin.read(lambda d: d.version_items("s", version.number)))
        assert kept == ["one", "two"], f"the version kept of the replaced document: {kept} (seq {version.seq})"
    finally:
        a.close()
        admin.close()


def test_prune_never_deletes_a_session_changed_while_it_runs(database_url: str) -> None:
    """`sessions prune --older-than D` deletes sessions with no activity for D
    days. On Postgres it lists them, then deletes them one by one, READ
    COMMITTED, nothing locked: a session someone edits meanwhile (its
    change acknowledged, its last activity now) is deleted all the same,
    that change with it. (SQLite's BEGIN IMMEDIATE serializes the two.)"""
    a = PgDatabase(database_url, node_id="node-a", lease_timeout=60)
    admin = PgDatabase(database_url)
    try:
        fence, _, document = a.run(lambda d: d.load_leased("s"))
        epoch = document.epoch
        old = op(1, "one")
        old.timestamp = "2000-01-01T00:00:00.000+00:00"
        a.run(lambda d: (d.check_fence("s", fence), d.append("s", epoch, [old])))
        pruned, committed = _admin_paused_while_a_commits(
            admin, "SELECT session_id FROM sessions WHERE updated_at <", lambda d: d.prune(30),
            a, database_url, fence, epoch, op(2, "two"),
        )
        assert pruned, "prune did not finish"
        if committed() is not True:
            return  # refused: never acknowledged
        stored = admin.read(lambda d: d.exists("s") and sorted(d.load("s").items))
        assert stored == ["one", "two"], f"pruned {pruned[0]}; stored now: {stored}"
    finally:
        a.close()
        admin.close()


def test_a_snapshot_racing_an_import_leaves_the_session_loadable_with_the_imported_document(
    database_url: str,
) -> None:
    """The serving node stores a snapshot (fenced: it checks its lease, but
    reads the session row without locking it) while `sessions import`
    replaces the session. The snapshot of the old epoch must not land on the
    new one: the imported document has to stay, and the session loadable."""
    a = PgDatabase(database_url, node_id="node-a", lease_timeout=60)
    admin = PgDatabase(database_url)
    try:
        fence, _, document = a.run(lambda d: d.load_leased("s"))
        epoch = document.epoch
        a.run(lambda d: (d.check_fence("s", fence), d.append("s", epoch, [op(1, "one"), op(2, "two")])))
        document = a.run(lambda d: d.load("s"))
        snapshot = document.snapshot()
        paused, resume = _paused_after(a, "SELECT epoch, version FROM sessions")
        saved: list[Any] = []
        saver = threading.Thread(
            target=lambda: saved.append(a.run(lambda d: (d.check_fence("s", fence), d.save_snapshot("s", snapshot))))
        )
        saver.start()
        try:
            assert paused.wait(HANG)  # node-a's snapshot job has read the session row
            imported = _admin_aside(database_url, lambda d: d.import_state("s", [{"uuid": "imported", "item_type": "lens"}]))
        finally:
            resume.set()
            saver.join(HANG)
        new_epoch = imported()
        assert saved, "the snapshot job did not finish"
        try:
            loaded = admin.read(lambda d: d.load("s"))
        except Exception as exc:  # noqa: BLE001 - what the test reports
            raise AssertionError(f"the session can no longer be loaded: {exc}") from None
        assert (loaded.epoch, loaded.version, sorted(loaded.items)) == (new_epoch, 1, ["imported"])
    finally:
        a.close()
        admin.close()


def test_a_snapshot_racing_a_delete_leaves_no_row_that_breaks_the_session_id_later(database_url: str) -> None:
    """The same race with `sessions delete`: the snapshot row of a deleted
    session must not survive it (an orphan row, and the next session of that
    id, created from seq 1, replays behind it and is `inconsistent`)."""
    a = PgDatabase(database_url, node_id="node-a", lease_timeout=60)
    admin = PgDatabase(database_url)
    try:
        fence, _, document = a.run(lambda d: d.load_leased("s"))
        epoch = document.epoch
        a.run(lambda d: (d.check_fence("s", fence), d.append("s", epoch, [op(1, "one"), op(2, "two")])))
        snapshot = a.run(lambda d: d.load("s")).snapshot()
        paused, resume = _paused_after(a, "SELECT epoch, version FROM sessions")
        saver = threading.Thread(target=lambda: a.run(lambda d: (d.check_fence("s", fence), d.save_snapshot("s", snapshot))))
        saver.start()
        try:
            assert paused.wait(HANG)
            deleted = _admin_aside(database_url, lambda d: d.delete("s"))
        finally:
            resume.set()
            saver.join(HANG)
        deleted()
        with psycopg.connect(database_url, autocommit=True) as conn:
            orphans = conn.execute("SELECT session_id, version FROM snapshots").fetchall()
        # The session id is used again: a new document, first change seq 1.
        fresh = a.run(lambda d: d.load("s"))
        a.run(lambda d: (d.check_fence("s", fence), d.append("s", fresh.epoch, [op(1, "again")])))
        try:
            loaded = admin.read(lambda d: d.load("s"))
        except Exception as exc:  # noqa: BLE001 - what the test reports
            raise AssertionError(f"snapshot rows left by the delete: {orphans}; the new session: {exc}") from None
        assert sorted(loaded.items) == ["again"] and orphans == []
    finally:
        a.close()
        admin.close()


async def test_a_client_resumes_by_seq_on_the_new_owner_after_snapshots_compacted_the_journal(
    start_server, database_url: str
) -> None:
    with trio.fail_after(4 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=1.5, snapshot_bytes=300, retention=5)
        b = await node(start_server, database_url, "node-b", snapshot_bytes=300, retention=5)
        async with a.joined("s", "alice") as alice:
            for n in range(12):
                await alice.send(add(f"x{n}"))
                await alice.expect("ack")
            epoch = a.registry.sessions["s"].document.epoch
            since = 12
            for n in range(12, 40):
                await alice.send(add(f"x{n}"))
                await alice.expect("ack")
            async with b.client("s", "bob") as bob:
                assert (await bob.expect_closed())[0] == 1013
            assert (await alice.expect_closed())[0] == 1012
        with psycopg.connect(database_url, autocommit=True) as conn:
            await until(
                lambda: conn.execute("SELECT expires_at <= now() FROM leases").fetchone()[0],
                "node-a's lease expired", HANG,
            )
            journal = conn.execute("SELECT min(seq), max(seq) FROM journal").fetchone()
            snap = conn.execute("SELECT version FROM snapshots").fetchone()
        async with b.joined("s", "carol") as carol:
            await carol.send({"type": "sync:request", "since": since, "epoch": epoch})
            reply = await carol.recv()
            if reply["type"] == "sync:ops":
                assert [o["seq"] for o in reply["ops"]] == list(range(since + 1, 41)), (journal, snap, reply)
            else:
                assert reply["type"] == "sync:state", reply
                assert reply["version"] == 40
                assert sorted(i["uuid"] for i in reply["state"]["items"]) == sorted(f"x{n}" for n in range(40))


# -- prune against a node's writer, which takes several sessions' rows in one transaction

OLD = "2000-01-01T00:00:00.000+00:00"


def _two_idle_sessions(url: str) -> None:
    setup = PgDatabase(url, node_id="node-a", lease_timeout=60)
    try:
        for sid in ("a", "b"):
            fence, _, document = setup.run(lambda d: d.load_leased(sid))
            first = op(1, "one")
            first.timestamp = OLD
            setup.run(lambda d: (d.check_fence(sid, fence), d.append(sid, document.epoch, [first])))
            setup.run(lambda d: d.renew({}, [(sid, fence)]))  # let go
    finally:
        setup.close()


def _race(url: str, first_job: Any, second_job: Any) -> tuple[list[Any], list[Any]]:
    """node-b's writer runs first_job, pauses, then second_job, in one
    transaction (run_jobs); prune runs in the gap."""
    b = PgDatabase(url, node_id="node-b", lease_timeout=60)
    admin = PgDatabase(url)
    paused, resume = threading.Event(), threading.Event()

    def pause(d: Any) -> None:
        paused.set()
        resume.wait(HANG)

    writer_out: list[Any] = []
    prune_out: list[Any] = []

    def writer() -> None:
        writer_out.extend(b.run_jobs([first_job, pause, second_job]))

    def pruner() -> None:
        try:
            prune_out.append(admin.run(lambda d: d.prune(30)))
        except Exception as exc:  # noqa: BLE001
            prune_out.append(exc)

    wt = threading.Thread(target=writer)
    wt.start()
    try:
        assert paused.wait(HANG)
        pt = threading.Thread(target=pruner)
        pt.start()
        finished_or_waiting(url, pt)  # prune done, or waiting for a lock
    finally:
        resume.set()
        wt.join(HANG)
        pt.join(HANG)
        b.close()
        admin.close()
    assert not wt.is_alive() and not pt.is_alive(), "hang"
    return writer_out, prune_out


def _deadlocks(writer_out: list[Any], prune_out: list[Any]) -> list[str]:
    texts = [str(o.error) for o in writer_out if hasattr(o, "error")]
    texts += [str(p) for p in prune_out if isinstance(p, Exception)]
    return [t for t in texts if "deadlock" in t]


def test_takeover_loads_of_two_idle_sessions_vs_prune_deadlock(database_url: str) -> None:
    """A node opening two idle sessions (b, then a) in one writer transaction
    (load_leased holds each session's row) while prune would lock a, then b."""
    _two_idle_sessions(database_url)
    writer_out, prune_out = _race(
        database_url, lambda d: d.load_leased("b"), lambda d: d.load_leased("a")
    )
    assert not _deadlocks(writer_out, prune_out), (writer_out, prune_out)


def test_snapshot_then_takeover_vs_prune_deadlock(database_url: str) -> None:
    """A snapshot of b (its row held), then a takeover load of a."""
    _two_idle_sessions(database_url)
    b = PgDatabase(database_url, node_id="node-b", lease_timeout=60)
    try:
        fence, _, document = b.run(lambda d: d.load_leased("b"))
    finally:
        b.close()
    snap = document.snapshot()
    writer_out, prune_out = _race(
        database_url,
        lambda d: (d.check_fence("b", fence), d.save_snapshot("b", snap)),
        lambda d: d.load_leased("a"),
    )
    assert not _deadlocks(writer_out, prune_out), (writer_out, prune_out)


def test_commits_of_two_idle_sessions_vs_prune_deadlock(database_url: str) -> None:
    """Two commits (b, then a) in one writer transaction vs prune (a, b)."""
    _two_idle_sessions(database_url)
    b = PgDatabase(database_url, node_id="node-b", lease_timeout=60)
    try:
        fb, _, db_ = b.run(lambda d: d.load_leased("b"))
        fa, _, da = b.run(lambda d: d.load_leased("a"))
    finally:
        b.close()
    writer_out, prune_out = _race(
        database_url,
        lambda d: (d.check_fence("b", fb), d.append("b", db_.epoch, [op(2, "two")])),
        lambda d: (d.check_fence("a", fa), d.append("a", da.epoch, [op(2, "two")])),
    )
    assert not _deadlocks(writer_out, prune_out), (writer_out, prune_out)


def test_snapshot_then_commit_of_one_session_vs_import(database_url: str) -> None:
    """save_snapshot's FOR SHARE, an import queued FOR UPDATE, then the same
    transaction's commit upgrades the lock."""
    _two_idle_sessions(database_url)
    b = PgDatabase(database_url, node_id="node-b", lease_timeout=60)
    admin = PgDatabase(database_url)
    try:
        fence, _, document = b.run(lambda d: d.load_leased("a"))
        snap = document.snapshot()
        paused, resume = threading.Event(), threading.Event()
        out: list[Any] = []
        imp: list[Any] = []

        def writer() -> None:
            out.extend(b.run_jobs([
                lambda d: (d.check_fence("a", fence), d.save_snapshot("a", snap)),
                lambda d: (paused.set(), resume.wait(HANG)),
                lambda d: (d.check_fence("a", fence), d.append("a", document.epoch, [op(2, "two")])),
            ]))

        def importer() -> None:
            try:
                imp.append(admin.run(lambda d: d.import_state("a", [{"uuid": "new", "item_type": "lens"}])))
            except Exception as exc:  # noqa: BLE001
                imp.append(exc)

        wt = threading.Thread(target=writer)
        wt.start()
        assert paused.wait(HANG)
        it = threading.Thread(target=importer)
        it.start()
        finished_or_waiting(database_url, it)
        resume.set()
        wt.join(HANG)
        it.join(HANG)
        assert not wt.is_alive() and not it.is_alive(), "hang"
        assert not _deadlocks(out, imp), (out, imp)
    finally:
        b.close()
        admin.close()
