"""Session leases of the postgres store: one owner per session, fenced.

Two nodes are two in-process servers on one database (the test's schema),
with real WebSocket clients over memory streams. Lease expiry is on the
database's clock, which is real: lease timeouts here are short, and every
wait is bounded with fail_after.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
from trio_websocket import ConnectionClosed

from collab_trio.document import COMMAND, Op
from collab_trio.store import LeaseLost, SessionElsewhere
from collab_trio.store.postgres import PgDatabase
from collab_trio.testing import HANG, Harness

from .test_metrics import http, metrics_port


def add(item_id: str) -> dict[str, Any]:
    return {"type": "command", "command": {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {}}}


def op(seq: int, item_id: str) -> Op:
    command = {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {}}
    return Op(seq, "alice", COMMAND, "2026-01-01T00:00:00+00:00", command=command)


def lease(url: str, session_id: str) -> tuple[str, int, str | None]:
    """The lease row: (owner, fence, wanted_by)."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT owner, fence, wanted_by FROM leases WHERE session_id = %s", (session_id,)
        ).fetchone()


def lock_waiters(url: str) -> int:
    """Wait (HANG at most) until a statement ... FOR UPDATE waits for a row
    lock in the database; how many do (0: none came)."""
    # Autocommit: pg_stat_activity is read once per transaction.
    with psycopg.connect(url, autocommit=True) as watcher:
        for _ in range(int(HANG / 0.01)):
            (waiting,) = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database() AND position('FOR UPDATE' in query) > 0"
            ).fetchone()
            if waiting:
                return int(waiting)
            threading.Event().wait(0.01)
    return 0


def expire(url: str, session_id: str) -> None:
    """What the others see of an owner paused past its lease."""
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE leases SET expires_at = now() - interval '1 second' WHERE session_id = %s", (session_id,))


async def node(start_server: Any, url: str, name: str, **settings: Any) -> Harness:
    settings.setdefault("lease_timeout", 60.0)  # no renewal during a test unless it asks
    return await start_server(store="postgres", database_url=url, node_id=name, **settings)


@asynccontextmanager
async def once_served(harness: Harness, session_id: str, user: str) -> AsyncIterator[Any]:
    """A member of `session_id` on `harness`, joined as soon as that node
    serves it: each 1013 (the lease still held elsewhere) is retried, as a
    client does, every 0.1 s (the lease expires on the database's clock)."""
    while True:
        async with harness.client(session_id, user) as client:
            try:
                assert (await client.recv())["type"] == "connection:ack"
            except ConnectionClosed as closed:
                assert closed.reason.code == 1013
            else:
                yield client
                return
        await trio.sleep(0.1)


# -- the database: fence checked in the commit's own transaction ------------------


def test_a_takeover_waits_for_a_commit_in_flight_and_loads_it(database_url: str) -> None:
    a = PgDatabase(database_url, node_id="node-a", lease_timeout=60)
    b = PgDatabase(database_url, node_id="node-b", lease_timeout=60)
    try:
        fence, owner, document = a.run(lambda d: d.load_leased("s"))
        assert (fence, owner) == (1, "node-a")
        # node-a was paused past its lease; it wakes up and commits: its
        # transaction is open, the fence checked (expired, but nobody took it)...
        expire(database_url, "s")
        a.conn.execute("BEGIN")
        a.check_fence("s", fence)
        a.append("s", document.epoch, [op(1, "late")])
        # node-a's renewal (another connection) does not wait for that commit.
        renewer = PgDatabase(database_url, node_id="node-a", lease_timeout=60)
        try:
            assert renewer.run(lambda d: d.renew({"s": fence}, [])) == {"s": None}
        finally:
            renewer.close()
        expire(database_url, "s")  # (the renewal renewed it: expired again)
        # ...when node-b takes the expired lease over: it must wait for that commit.
        taken: list[Any] = []
        takeover = threading.Thread(target=lambda: taken.append(b.run(lambda d: d.load_leased("s"))))
        takeover.start()
        assert lock_waiters(database_url) == 1 and not taken
        a.conn.execute("COMMIT")
        takeover.join(HANG)
        [(new_fence, owner, loaded)] = taken
        assert (new_fence, owner) == (2, "node-b")
        assert (loaded.version, list(loaded.items), loaded.epoch) == (1, ["late"], document.epoch)
        # From now on node-a's commits are refused, in their own transaction.
        with pytest.raises(LeaseLost):
            a.run(lambda d: (d.check_fence("s", fence), d.append("s", document.epoch, [op(2, "stale")])))
        assert b.run(lambda d: d.load("s")).version == 1
        # And node-a can't take it back while node-b's lease runs.
        assert a.run(lambda d: d.acquire("s")) == (None, "node-b")
        assert lease(database_url, "s") == ("node-b", 2, "node-a")
    finally:
        a.close()
        b.close()


def test_a_node_stopped_inside_its_first_acquire_holds_up_nobody_for_long(database_url: str) -> None:
    a = PgDatabase(database_url, node_id="node-a", lease_timeout=2.0, timeout=2.0)
    b = PgDatabase(database_url, node_id="node-b", lease_timeout=2.0, timeout=2.0)
    try:
        # node-a is stopped inside the transaction that created the lease row.
        a.conn.execute("BEGIN")
        assert a.acquire("new") == (1, "node-a")
        answers: list[Any] = []

        def take_over() -> None:
            for _ in range(int(HANG / 0.1)):
                try:
                    answers.append(b.run(lambda d: d.acquire("new")))
                    return
                except SessionElsewhere as exc:
                    answers.append(exc.owner)
                threading.Event().wait(0.1)

        taker = threading.Thread(target=take_over)
        taker.start()
        taker.join(HANG)
        # Refused (1013) while node-a's transaction was younger than a lease;
        # then it was ended, and node-b got the lease (node-a's row never existed).
        assert answers and answers[-1] == (2, "node-b"), answers  # (fence 1 was node-a's, rolled back)
        assert set(answers[:-1]) <= {"another node"}
    finally:
        a.close()  # (unblocks node-b if it still waits)
        b.close()


# -- nodes and clients ---------------------------------------------------------------


async def test_a_stale_owners_commit_is_refused_and_its_members_move(start_server, database_url: str) -> None:
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a")
        b = await node(start_server, database_url, "node-b")
        async with a.joined("s", "alice") as alice:
            await alice.send(add("one"))
            assert (await alice.expect("ack"))["seq"] == 1
            epoch = a.registry.sessions["s"].document.epoch
            # node-a is "paused" past its lease: node-b takes the session over.
            expire(database_url, "s")
            async with b.joined("s", "bob") as bob:
                assert lease(database_url, "s")[:2] == ("node-b", 2)
                # node-a wakes up: its next commit is refused, its members move.
                await alice.send(add("stale"))
                error = await alice.expect("error")
                assert (error["code"], error["ref"]) == ("not_persisted", "command")
                assert await alice.expect_closed() == (1012, "session moved; reconnect")
                # The session is gone from node-a; nothing of its late change is stored.
                await bob.send({"type": "sync:request"})
                state = await bob.expect("sync:state")
                assert [i["uuid"] for i in state["state"]["items"]] == ["one"]
                # The epoch did not change with the move: clients resume by seq.
                assert (state["version"], state["epoch"]) == (1, epoch)
                assert "s" not in a.registry.sessions


async def test_a_node_asked_for_a_session_another_node_serves_says_who_and_it_is_handed_over(
    start_server, database_url: str
) -> None:
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=1.5)
        b = await node(start_server, database_url, "node-b")
        async with a.joined("s", "alice") as alice:
            await alice.send(add("one"))
            assert (await alice.expect("ack"))["seq"] == 1
            epoch = a.registry.sessions["s"].document.epoch
            async with b.client("s", "bob") as bob:
                # Accepted, then closed: a client retries.
                assert await bob.expect_closed() == (1013, "session is served by node-a; retry")
            # node-a's renewal sees the request, closes its members and lets go.
            assert await alice.expect_closed() == (1012, "session moved; reconnect")
        # ...once everything pending is committed (the session finished).
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not conn.execute("SELECT expires_at <= now() FROM leases").fetchone()[0]:
                await trio.sleep(0.05)
        assert "s" not in a.registry.sessions and "s" not in a.registry.draining
        async with b.joined("s", "bob") as bob:
            await bob.send({"type": "sync:request"})
            state = await bob.expect("sync:state")
            assert [i["uuid"] for i in state["state"]["items"]] == ["one"]
            assert (state["version"], state["epoch"]) == (1, epoch)
            assert lease(database_url, "s") == ("node-b", 2, None)


async def test_joins_that_wait_for_a_refused_load_are_told_the_owner_too(start_server, database_url: str) -> None:
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a")
        # node-b's transactions take 0.5 s: the second join surely arrives
        # while the first one's load (refused: node-a serves it) is in progress.
        b = await node(start_server, database_url, "node-b", fault_commit_delay=0.5)
        async with a.joined("s", "alice"):
            closes: dict[str, tuple[int, str | None]] = {}

            async def join(user: str) -> None:
                async with b.client("s", user) as client:
                    closes[user] = await client.expect_closed()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(join, "bob")
                await trio.sleep(0.1)
                nursery.start_soon(join, "carol")
            assert closes == {
                "bob": (1013, "session is served by node-a; retry"),
                "carol": (1013, "session is served by node-a; retry"),
            }


async def test_an_owner_stopped_inside_a_commit_holds_up_neither_the_takeover_nor_the_new_owner(
    start_server, database_url: str
) -> None:
    a = PgDatabase(database_url, node_id="node-a", lease_timeout=2.0, timeout=2.0)
    try:
        fence, _, document = a.run(lambda d: d.load_leased("s"))
        # node-a is stopped (SIGSTOP, a partition) between its fence check and
        # its COMMIT: the transaction stays open, the lease row locked FOR KEY
        # SHARE, and nobody renews the lease.
        a.conn.execute("BEGIN")
        a.check_fence("s", fence)
        a.append("s", document.epoch, [op(1, "late")])
        expire(database_url, "s")
        with trio.fail_after(3 * HANG):
            b = await node(start_server, database_url, "node-b", lease_timeout=2.0)
            async with b.joined("t", "carol") as carol:
                started = trio.current_time()
                served: list[Any] = []

                async def bob_retries() -> None:
                    async with once_served(b, "s", "bob") as bob:
                        await bob.send({"type": "sync:request"})
                        state = await bob.expect("sync:state")
                        # (Read while bob is there: the lease goes when the session empties.)
                        served.append((state["version"], lease(database_url, "s")[:2]))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(bob_retries)
                    # Meanwhile node-b's other sessions commit as usual: a
                    # takeover waits for the lock only briefly, in its writer.
                    for i in range(10):
                        sent = trio.current_time()
                        await carol.send(add(f"c{i}"))
                        assert (await carol.expect("ack"))["seq"] == i + 1
                        assert trio.current_time() - sent < 3.0  # (before: for ever)
                        await trio.sleep(0.2)
                # node-a's open transaction was ended by node-b's takeover (idle
                # longer than a lease): node-b serves the session, without
                # the change node-a never committed (nor acknowledged).
                assert served == [(0, ("node-b", 3))]  # (fence 2: node-b's "t")
                assert trio.current_time() - started < 2.0 + 5
    finally:
        a.close()


async def test_a_session_left_with_nothing_stored_keeps_no_lease_row(start_server, database_url: str) -> None:
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a")
        # Any id a client makes up: joined, left, nothing stored.
        for attempt in range(2):
            async with a.joined(f"made-up-{attempt}", "mallory"):
                pass
        async with a.joined("kept", "alice") as alice:
            await alice.send(add("one"))
            await alice.expect("ack")
        with psycopg.connect(database_url, autocommit=True) as conn:
            while conn.execute("SELECT count(*) FROM leases WHERE expires_at > now()").fetchone()[0]:
                await trio.sleep(0.05)  # (released in the background)
            rows = conn.execute("SELECT session_id, fence FROM leases").fetchall()
        # The stored session's row stays (expired); the others are gone.
        assert rows == [("kept", 3)]
        # A made-up id joined again gets a fence no earlier holder had.
        async with a.joined("made-up-0", "mallory"):
            assert lease(database_url, "made-up-0")[:2] == ("node-a", 4)


async def test_a_renewal_that_finds_the_lease_lost_closes_the_members_at_once(
    start_server, database_url: str
) -> None:
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a", lease_timeout=1.5)
        async with a.joined("s", "alice") as alice:
            await alice.send(add("one"))
            await alice.expect("ack")
            with psycopg.connect(database_url) as conn:
                before = conn.execute("SELECT expires_at FROM leases").fetchone()[0]
                # Renewed in the background (every lease_timeout / 3).
                while conn.execute("SELECT expires_at FROM leases").fetchone()[0] == before:
                    await trio.sleep(0.05)
                # Another node took it over (node-a paused past it, say): no commit needed to notice.
                conn.execute("UPDATE leases SET owner = 'node-z', fence = fence + 1")
            assert await alice.expect_closed() == (1012, "session moved; reconnect")


async def test_readyz_is_503_while_postgres_is_unreachable(start_server, database_url: str) -> None:
    # A database of its own, so that its connections can be refused.
    name = f"unreachable_{id(database_url) % 100000}"
    base = database_url.split("?", 1)
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    # The same server, without the test schema's search_path.
    query = "&".join(p for p in (base[1].split("&") if len(base) > 1 else []) if not p.startswith("options="))
    own = base[0].rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    try:
        with trio.fail_after(3 * HANG):
            a = await node(
                start_server, own, "node-a", lease_timeout=1.5, metrics_address="127.0.0.1:0"
            )
            port = metrics_port(a.server)
            assert (await http(port, "/readyz"))[::2] == (200, b"ready\n")
            with psycopg.connect(database_url, autocommit=True) as admin:
                admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
                admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            while (status := await http(port, "/readyz"))[0] == 200:
                await trio.sleep(0.05)
            assert status[0] == 503 and status[2].startswith(b"the store is unreachable: ")
            with psycopg.connect(database_url, autocommit=True) as admin:
                admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            while (status := await http(port, "/readyz"))[0] == 503:
                await trio.sleep(0.05)
            assert status[::2] == (200, b"ready\n")
            a.server.request_shutdown()
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_a_lease_nobody_renews_expires_on_the_database_clock_and_is_taken_over(
    start_server, database_url: str
) -> None:
    # A node that took the lease and died: nobody renews it.
    dead = PgDatabase(database_url, node_id="node-x", lease_timeout=3.0)
    try:
        assert dead.run(lambda d: d.acquire("s")) == (1, "node-x")
    finally:
        dead.close()
    with trio.fail_after(3 * HANG):
        b = await node(start_server, database_url, "node-b")
        async with b.client("s", "bob") as bob:
            assert await bob.expect_closed() == (1013, "session is served by node-x; retry")
        # Clients retry; once the lease expired (3 s after it was taken) one gets in.
        async with once_served(b, "s", "bob"):
            # (Read while bob is there: the lease goes when the session empties.)
            with psycopg.connect(database_url) as conn:
                owner, fence, expires_in = conn.execute(
                    "SELECT owner, fence, extract(epoch FROM expires_at - now()) FROM leases"
                ).fetchone()
            assert (owner, fence) == ("node-b", 2) and 50 < expires_in <= 60


async def test_a_graceful_stop_releases_the_leases_after_the_last_commit(start_server, database_url: str) -> None:
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a")
        async with a.joined("s", "alice") as alice:
            await alice.send(add("one"))
            await alice.expect("ack")
            a.server.request_shutdown()
            assert (await alice.expect_closed())[0] == 1001
        with psycopg.connect(database_url) as conn:
            while not conn.execute("SELECT expires_at <= now() FROM leases").fetchone()[0]:
                conn.rollback()
                await trio.sleep(0.05)
        b = await node(start_server, database_url, "node-b")
        async with b.joined("s", "bob") as bob:
            await bob.send({"type": "sync:request"})
            assert [i["uuid"] for i in (await bob.expect("sync:state"))["state"]["items"]] == ["one"]


def test_the_postgres_store_needs_a_url_and_says_which_database_it_cannot_reach(tmp_path) -> None:
    import subprocess
    import sys

    from collab_trio.testing import child_env

    serve = subprocess.run(
        [sys.executable, "-m", "collab_trio", "serve", "--port", "0", "--store", "postgres"],
        capture_output=True, text=True, env=child_env(), timeout=HANG,
    )
    assert serve.returncode == 2
    assert "the postgres store needs a database URL (--database-url postgresql://...)" in serve.stderr
    listing = subprocess.run(
        [sys.executable, "-m", "collab_trio", "sessions", "list",
         "--database-url", f"postgresql://collab:secret@/collab?host={tmp_path}&connect_timeout=2"],
        capture_output=True, text=True, env=child_env(), timeout=3 * HANG,
    )
    assert listing.returncode == 1 and listing.stdout == ""
    [line] = listing.stderr.splitlines()
    assert line.startswith(f"error: cannot connect to postgresql://collab:***@/collab?host={tmp_path}")
    assert "secret" not in line


async def test_a_session_joined_again_while_its_last_instance_unloads_keeps_its_lease(
    start_server: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance that unloads stores its snapshot after its last commit, and
    a member who joins meanwhile loads the session afresh (its changes are
    stored). The old instance then gives its lease up: not the new one's."""
    from collab_trio.store.postgres import PostgresStore

    saving, go_on = trio.Event(), trio.Event()
    save = PostgresStore.save_snapshot

    async def held_save(self: PostgresStore, session_id: str, snapshot: dict[str, Any]) -> None:
        saving.set()
        await go_on.wait()
        await save(self, session_id, snapshot)

    monkeypatch.setattr(PostgresStore, "save_snapshot", held_save)
    with trio.fail_after(3 * HANG):
        a = await node(start_server, database_url, "node-a")
        async with a.joined("s", "alice") as alice:
            await alice.send(add("one"))
            await alice.expect("ack")
            old = a.registry.sessions["s"]
        await saving.wait()  # the old instance unloads: its snapshot is held
        async with a.joined("s", "alice") as alice:
            assert a.registry.sessions["s"] is not old
            go_on.set()
            await old.finished.wait()
            await alice.send(add("two"))
            assert (await alice.expect("ack"))["seq"] == 2
        assert lease(database_url, "s")[0] == "node-a"
