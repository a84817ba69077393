"""The postgres store's leases under a stopped or slow node, a restore past an
expired lease, a database whose default isolation is not READ COMMITTED, and a
connection the database ended while idle. Real Postgres (tools/pg_cluster.sh).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import psycopg
import trio
from trio_websocket import ConnectionClosed

from collab_trio.store.postgres import APPLICATION_NAME, PgDatabase
from collab_trio.testing import HANG

from .test_leases import add, expire, lease, lock_waiters, node, once_served, op


async def test_a_node_stopped_inside_a_refused_acquire_does_not_freeze_the_owner(
    start_server, database_url: str
) -> None:
    """node-b is asked for a session node-a serves (a misrouted client) and
    refused (1013); it is stopped (SIGSTOP) before its writer transaction
    ends. node-a, alive and renewing, must go on committing that session
    and its others (a refusal must leave no lock on the lease row)."""
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=3.0)
        async with a.joined("s", "alice") as alice, a.joined("t", "carol") as carol:
            await alice.send(add("one"))
            assert (await alice.expect("ack"))["seq"] == 1
            b = PgDatabase(database_url, node_id="node-b", lease_timeout=3.0, timeout=3.0)
            try:
                b.conn.execute("BEGIN")
                assert b.acquire("s") == (None, "node-a")  # refused; node-b now "stops"
                with trio.move_on_after(2.0) as scope:
                    await alice.send(add("two"))
                    assert (await alice.expect("ack"))["seq"] == 2
                    await carol.send(add("c1"))
                    assert (await carol.expect("ack"))["seq"] == 1
                assert not scope.cancelled_caught, "node-a's commits wait for a stopped node-b"
            finally:
                b.close()


async def test_a_node_stopped_inside_a_refused_acquire_does_not_make_the_owner_drop_its_other_sessions(
    start_server, database_url: str
) -> None:
    """The same, without any commit: node-a's renewal (one UPDATE of all its
    leases) waits for the row node-b locked, so node-a gives up every lease
    after lease_timeout and closes all its sessions, though nobody took them."""
    T = 2.0
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=T)
        async with a.joined("s", "alice"), a.joined("t", "carol") as carol:
            await carol.send(add("c1"))
            assert (await carol.expect("ack"))["seq"] == 1
            b = PgDatabase(database_url, node_id="node-b", lease_timeout=T, timeout=T)
            try:
                b.conn.execute("BEGIN")
                assert b.acquire("s") == (None, "node-a")  # refused; node-b now "stops"
                with trio.move_on_after(3 * T):
                    closed = await carol.expect_closed()
                    raise AssertionError(f"carol's session t closed {closed}; its lease: {lease(database_url, 't')}")
            finally:
                b.close()


async def test_an_owner_stopped_while_its_load_is_sent_to_it_does_not_hold_the_session_for_ever(
    start_server, database_url: str
) -> None:
    """node-a takes over a session and loads it in the same transaction; it
    is stopped (SIGSTOP) while Postgres sends it the document. Its backend
    is then 'active' (waiting to write to node-a), not 'idle in
    transaction', and keeps the lease row locked FOR UPDATE."""
    T = 2.0
    items = [{"uuid": f"i{n}", "type": "lens", "data": {"pad": "x" * 1000}} for n in range(20000)]
    setup = PgDatabase(database_url, node_id="node-x", lease_timeout=T)
    try:
        setup.run(lambda d: d.import_state("big", items))  # about 20 MB of snapshot
    finally:
        setup.close()
    a = PgDatabase(database_url, node_id="node-a", lease_timeout=T, timeout=T)
    try:
        a.conn.execute("BEGIN")
        fence, owner = a.acquire("big")
        assert owner == "node-a"
        # The load's first big read is sent, and node-a stops reading.
        a.conn.conn.pgconn.send_query_params(
            b"SELECT version, written, items FROM snapshots WHERE session_id = $1", [b"big"]
        )
        with psycopg.connect(database_url, autocommit=True) as watcher:
            for _ in range(int(HANG / 0.05)):
                row = watcher.execute(
                    "SELECT state, wait_event FROM pg_stat_activity WHERE pid = %s", (a.conn.conn.info.backend_pid,)
                ).fetchone()
                if row == ("active", "ClientWrite"):
                    break
                await trio.sleep(0.05)
            assert row == ("active", "ClientWrite")
        with trio.fail_after(4 * HANG):
            b = await node(start_server, database_url, "node-b", lease_timeout=T)
            with trio.move_on_after(5 * T) as scope:
                async with once_served(b, "big", "bob"):
                    pass
            assert not scope.cancelled_caught, f"never served; lease {lease(database_url, 'big')}"
    finally:
        a.conn.conn.pgconn.finish()  # (node-a "dies": its backend goes)
        a.close()


def test_a_takeover_loads_the_commit_it_waited_for_whatever_the_default_isolation(database_url: str) -> None:
    """A database (or role) whose default_transaction_isolation is not READ
    COMMITTED: the takeover's load must still see the commit it waited for."""
    url = database_url + "%20-cdefault_transaction_isolation%3Drepeatable%5C%20read"
    with psycopg.connect(url) as conn:
        assert conn.execute("SHOW default_transaction_isolation").fetchone()[0] == "repeatable read"
    a = PgDatabase(url, node_id="node-a", lease_timeout=60)
    b = PgDatabase(url, node_id="node-b", lease_timeout=60)
    try:
        fence, _, document = a.run(lambda d: d.load_leased("s"))
        # node-a commits (acknowledged once COMMIT returns)...
        a.conn.execute("BEGIN")
        a.check_fence("s", fence)
        a.append("s", document.epoch, [op(1, "acked")])
        expire(url, "s")
        # ...while node-b takes the expired lease over: it waits for that commit.
        taken: list[Any] = []
        takeover = threading.Thread(target=lambda: taken.append(b.run(lambda d: d.load_leased("s"))))
        takeover.start()
        assert lock_waiters(url) == 1
        a.conn.execute("COMMIT")  # node-a acknowledges seq 1
        takeover.join(HANG)
        [(new_fence, owner, loaded)] = taken
        assert owner == "node-b"
        # The new owner must serve the acknowledged change, and be able to commit after it.
        assert (loaded.version, list(loaded.items)) == (1, ["acked"])
    finally:
        a.close()
        b.close()


async def test_a_restore_while_the_owner_is_paused_past_its_lease_does_not_leave_it_refusing_every_change(
    start_server, database_url: str
) -> None:
    admin = PgDatabase(database_url)  # what `sessions restore --database-url` opens
    try:
        admin.run(lambda d: d.import_state("s", [{"uuid": "v1", "type": "lens"}]))
        admin.run(lambda d: d.import_state("s", [{"uuid": "v2", "type": "lens"}]))  # v1 kept as version 1
        with trio.fail_after(3 * HANG):
            a = await node(start_server, database_url, "node-a")
            async with a.joined("s", "alice") as alice:
                await alice.send(add("one"))
                assert (await alice.expect("ack"))["seq"] == 2
                # node-a is paused past its lease; meanwhile an operator restores
                # version 1: no live node serves the session, so it is done at once.
                expire(database_url, "s")
                assert admin.run(lambda d: d.restore("s", 1)) == 3
                # node-a wakes up: the restore fenced it out, so it closes the
                # session (1012) rather than refusing every change on a
                # document that is no longer what is stored.
                answers = []
                for i in range(3):
                    try:
                        await alice.send(add(f"late{i}"))
                        reply = await alice.recv()
                    except ConnectionClosed as closed:
                        answers.append(("closed", closed.reason.code))
                        break
                    answers.append((reply["type"], reply.get("code") or reply.get("seq")))
                assert answers[-1] == ("closed", 1012), answers
    finally:
        admin.close()


async def test_a_connection_the_database_ended_while_idle_costs_no_change(start_server, database_url: str) -> None:
    """Postgres restarted, a failover of the database, an idle-session timeout,
    a DBA's pg_terminate_backend: the writer's pooled connection is dead, but
    nothing was in flight. The next change should be stored on a new connection."""
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a")
        async with a.joined("s", "alice") as alice:
            await alice.send(add("one"))
            assert (await alice.expect("ack"))["seq"] == 1
            writer_pid = a.registry.store._db.conn.conn.info.backend_pid
            with psycopg.connect(database_url, autocommit=True) as admin:
                assert admin.execute("SELECT pg_terminate_backend(%s)", (writer_pid,)).fetchone()[0]
                # Gone (pg_terminate_backend only signals it).
                while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (writer_pid,)).fetchone()[0]:
                    await trio.sleep(0.01)
            await alice.send(add("two"))
            reply = await alice.recv()
            assert (reply["type"], reply.get("seq")) == ("ack", 2), reply


class _StopAfterAskFor:
    """node-b's pool: its _ask_for connection 'stops' (SIGSTOP, or a network
    cut) right after the UPDATE, before its COMMIT is sent."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.stopped = threading.Event()
        self.resume = threading.Event()

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Any:
        with self.pool.connection(timeout=timeout) as conn:
            yield _Stopping(conn, self)


class _Stopping:
    def __init__(self, conn: Any, owner: _StopAfterAskFor) -> None:
        self.conn, self.owner = conn, owner

    def transaction(self) -> Any:
        return self.conn.transaction()

    def execute(self, sql: str, params: Any = None) -> Any:
        result = self.conn.execute(sql, params)
        if sql.startswith("UPDATE leases SET wanted_by"):
            self.owner.stopped.set()
            self.owner.resume.wait()
        return result


async def test_a_node_stopped_inside_its_ask_for_does_not_make_the_owner_drop_its_sessions(
    start_server, database_url: str
) -> None:
    T = 2.0
    with trio.fail_after(4 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=T)
        async with a.joined("s", "alice"), a.joined("t", "carol") as carol:
            await carol.send(add("c1"))
            assert (await carol.expect("ack"))["seq"] == 1
            b = PgDatabase(database_url, node_id="node-b", lease_timeout=T, timeout=T)
            stopper = _StopAfterAskFor(b.pool)
            b.pool = stopper
            answers: list[Any] = []

            def refused_acquire() -> None:
                b.conn.execute("BEGIN")
                answers.append(b.acquire("s"))
                b.conn.execute("ROLLBACK")

            thread = threading.Thread(target=refused_acquire)
            thread.start()
            try:
                await trio.to_thread.run_sync(stopper.stopped.wait)
                with trio.move_on_after(3 * T):
                    closed = await carol.expect_closed()
                    raise AssertionError(f"carol's session t closed {closed}; its lease: {lease(database_url, 't')}")
            finally:
                stopper.resume.set()
                await trio.to_thread.run_sync(thread.join)
                b.pool = stopper.pool
                b.close()
            assert answers == [(None, "node-a")]


async def test_a_database_restart_costs_no_change(start_server, database_url: str) -> None:
    """Every collab-trio backend ended at once (a database restart, a
    failover): the pool's idle connections are dead too, and the next change
    is still stored."""
    """Every collab-trio backend ended while idle (Postgres restarted): the
    writer's connection and the pool's idle ones are all dead."""
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=3.0)
        async with a.joined("s", "alice") as alice:
            await alice.send(add("one"))
            assert (await alice.expect("ack"))["seq"] == 1
            await trio.sleep(1.5)  # a renewal or two: the keeper's connection is idle in the pool
            with psycopg.connect(database_url, autocommit=True) as admin:
                pids = [r[0] for r in admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
                    (APPLICATION_NAME,),
                ).fetchall()]
                print("ending", pids)
                for pid in pids:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                while admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
                ).fetchone()[0]:
                    await trio.sleep(0.01)
            await alice.send(add("two"))
            reply = await alice.recv()
            assert (reply["type"], reply.get("seq")) == ("ack", 2), reply
