"""Several real `collab-trio serve` nodes behind HAProxy, from the committed deploy/haproxy-cluster.cfg.

- Routing (any store): every member of a session lands on one node; a node
  killed with SIGKILL is marked down by its /readyz check and only its
  sessions move, to the survivors (consistent hashing).
- Failover (Postgres store, leases): clients in 20 sessions edit
  continuously through HAProxy while one node is killed with SIGKILL; every
  session is served again within the lease timeout + 5 s, every
  acknowledged change is stored once in seq order, every client ends with
  the stored document.
- Fencing (Postgres store): an owner paused with SIGSTOP past its lease
  loses the session to another node; after SIGCONT its commits are refused
  (not_persisted), its member is closed with 1012, and nothing it accepted
  after the takeover is stored.

Postgres comes from conftest's `database_url` (a fresh schema on
$COLLAB_TRIO_TEST_DATABASE_URL, which tools/pg_cluster.sh and .ci/run
provide). In CI (env CI set) a missing HAProxy or Postgres fails these
tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from collab_trio.cluster_testing import Cluster, Editor, haproxy_binary, open_cluster, render_haproxy
from collab_trio.testing import HANG, add_item, child_env, expect_json, recv_json, server_process, tcp_client

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "deploy" / "haproxy-cluster.cfg"
SESSIONS = 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="HAProxy cluster tests run on Linux")


def need_haproxy() -> str:
    path = haproxy_binary()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed; .ci/run installs it")
        pytest.skip("haproxy is not installed (apt-get install haproxy); CI runs this test")
    return path


def test_committed_config_is_valid_with_its_placeholders_filled(tmp_path: Path) -> None:
    rendered = render_haproxy(CONFIG.read_text(), 18080, [(18001, 19001), (18002, 19002), (18003, 19003)])
    assert "bind 127.0.0.1:18080" in rendered
    for node in (1, 2, 3):
        assert f"server node{node} 127.0.0.1:1800{node} check port 1900{node}" in rendered
    # The routing this file is about: the session segment, consistent hashing, /readyz.
    for line in ("balance hash path,field(-2,/),url_dec", "hash-type consistent", "option httpchk GET /readyz"):
        assert line in rendered
    (tmp_path / "cluster.cfg").write_text(rendered)
    check = subprocess.run(
        [need_haproxy(), "-c", "-f", str(tmp_path / "cluster.cfg")], capture_output=True, text=True, timeout=HANG
    )
    assert check.returncode == 0, check.stdout + check.stderr


async def join(cluster: Cluster, session: str, user: str) -> None:
    """One member joins through HAProxy and leaves again."""
    async with tcp_client(cluster.port, f"/ws/{session}/{user}") as ws:
        await expect_json(ws, "connection:ack")


def placement(cluster: Cluster, sessions: list[str]) -> dict[str, set[str]]:
    """The nodes each session was joined on, from the nodes' logs."""
    return {s: {node.name for node in cluster.nodes if s in node.sessions_joined()} for s in sessions}


async def test_haproxy_routes_a_session_to_one_node_and_moves_only_a_dead_nodes_sessions(tmp_path: Path) -> None:
    need_haproxy()
    sessions = [f"room-{i}" for i in range(SESSIONS)]
    with trio.fail_after(60):
        async with open_cluster(CONFIG, tmp_path, lambda name: ["--store", "memory"]) as cluster:
            for session in sessions:
                # Two members each, also one behind a base-path-like prefix and a query.
                await join(cluster, session, "ada")
                await join(cluster, session, "bob")
                # The same session, its id percent-encoded (the server decodes
                # it): HAProxy must route it to the same node, or clients that
                # encode differently (or anyone on purpose) would make the
                # session flap between nodes (handoffs, 1012 for everyone).
                await join(cluster, "".join(f"%{byte:02X}" for byte in session.encode()), "cy")
            before = placement(cluster, sessions)
            assert all(len(nodes) == 1 for nodes in before.values()), before
            owner = {s: next(iter(nodes)) for s, nodes in before.items()}
            counts = {node.name: sum(1 for o in owner.values() if o == node.name) for node in cluster.nodes}
            assert sum(1 for c in counts.values() if c) >= 2, f"20 sessions all on one node: {counts}"
            print(f"\nsessions per node: {counts}")

            victim = cluster.node(max(counts, key=lambda name: counts[name]))
            victim.signal(signal.SIGKILL)
            await cluster.wait_haproxy(rf"Server collab_nodes/{victim.name} is DOWN")
            for session in sessions:
                await join(cluster, session, "carol")
            after = {s: nodes - before[s] for s, nodes in placement(cluster, sessions).items()}
            for session in sessions:
                if owner[session] == victim.name:
                    # Rehashed to a survivor.
                    assert len(after[session]) == 1 and victim.name not in after[session], (session, after)
                else:
                    # Consistent hashing: a survivor's sessions stay where they were.
                    assert after[session] == set(), (session, after)


# -- with the Postgres store: failover and fencing ---------------------------------------------

# Short, so that the tests are short; long enough that a renewal (a third of
# it) gets its answer on a machine busy with the rest of the suite.
LEASE_TIMEOUT = 4.0


def postgres_node(database_url: str, *extra: str) -> Callable[[str], list[str]]:
    def args(name: str) -> list[str]:
        return [
            "--store", "postgres", "--database-url", database_url, "--node-id", name,
            "--lease-timeout", str(LEASE_TIMEOUT), *extra,
        ]
    return args


def live_owners(database_url: str) -> dict[str, str]:
    """The node holding each session's unexpired lease, as Postgres has it."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT session_id, owner FROM leases WHERE expires_at > now()").fetchall()
    return dict(rows)


def export(database_url: str, session: str) -> dict[str, Any]:
    """The stored document, read by the admin command (not through any node)."""
    result = subprocess.run(
        [sys.executable, "-m", "collab_trio", "sessions", "export", session, "--database-url", database_url],
        capture_output=True, text=True, timeout=HANG, env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def stored_ops(port: int, session: str, epoch: str) -> list[dict[str, Any]]:
    """Every op of the session in seq order, as a node loads them from the store (resume from 0)."""
    async with tcp_client(port, f"/ws/{session}/auditor") as ws:
        await expect_json(ws, "connection:ack")
        await ws.send_message(json.dumps({"type": "sync:request", "since": 0, "epoch": epoch}))
        while (message := await recv_json(ws))["type"] != "sync:ops":
            assert message["type"] not in ("sync:state", "error"), message
        return message["ops"]


async def until(condition: Callable[[], bool], what: str, timeout: float) -> float:
    """Wait (bounded) until `condition()` holds, checking every 20 ms; the time it took."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return trio.current_time() - start
    raise AssertionError(f"not within {timeout:g} s: {what}")


async def test_sigkill_of_a_node_loses_nothing_acknowledged(tmp_path: Path, database_url: str) -> None:
    need_haproxy()
    sessions = [f"room-{i}" for i in range(SESSIONS)]
    with trio.fail_after(90):
        async with open_cluster(CONFIG, tmp_path, postgres_node(database_url)) as cluster:
            stop = trio.Event()
            editors = [Editor(cluster.port, s, user, interval=0.2) for s in sessions for user in ("ada", "bob")]
            async with trio.open_nursery() as nursery:
                for editor in editors:
                    nursery.start_soon(editor.run, stop)
                await until(lambda: all(len(e.acked) >= 3 for e in editors), "every editor acknowledged", 20)
                owner = await trio.to_thread.run_sync(live_owners, database_url)
                counts = {n.name: sum(1 for o in owner.values() if o == n.name) for n in cluster.nodes}
                assert sum(1 for c in counts.values() if c) >= 2, f"20 sessions all on one node: {counts}"
                victim = cluster.node(max(counts, key=lambda name: counts[name]))
                moved = [s for s in sessions if owner.get(s) == victim.name]
                assert moved, owner

                victim.signal(signal.SIGKILL)
                killed_at = trio.current_time()
                affected = [e for e in editors if e.session in moved]
                await until(
                    lambda: all(e.served_again_after(killed_at) for e in affected),
                    "every session of the killed node served again", LEASE_TIMEOUT + 5,
                )
                recovery = {
                    s: max(e.served_again_after(killed_at) - killed_at for e in affected if e.session == s) for s in moved
                }
                print(
                    f"\nkilled {victim.name} (owner of {len(moved)} of {SESSIONS} sessions, {counts});"
                    f" served again after {min(recovery.values()):.2f}-{max(recovery.values()):.2f} s"
                    f" (lease timeout {LEASE_TIMEOUT:g} s)"
                )
                interrupted = sorted({e.session for e in editors if e.session not in moved and e.closes})
                print(f"sessions of the survivors interrupted meanwhile: {interrupted or 'none'}")
                await until(lambda: all(len(e.ack_times) >= 2 and e.ack_times[-2] > killed_at for e in editors),
                            "two more acks everywhere", 10)
                # The killed node's sessions are with survivors; the others (consistent
                # hashing) stayed where they were unless their node's /readyz failed meanwhile.
                after = await trio.to_thread.run_sync(live_owners, database_url)
                assert all(after.get(s) not in (None, victim.name) for s in moved), after
                stayed = sum(1 for s in sessions if s not in moved and after.get(s) == owner.get(s))
                print(f"survivors' sessions still on their node: {stayed} of {SESSIONS - len(moved)}")
                stop.set()
            # Each editor resumed once more when it stopped, but its partner's
            # last change may have been committed after that: once more, now
            # that nobody edits (a resume by seq, as after any reconnect).
            async with trio.open_nursery() as nursery:
                for editor in editors:
                    nursery.start_soon(editor.run, stop)
            acknowledged = sum(len(e.acked) for e in editors)
            closes = sorted({f"{code} {reason}" for e in editors for _, code, reason in e.closes})
            print(f"{acknowledged} changes acknowledged by {len(editors)} editors; closes seen: {closes}")
            for session in sessions:
                pair = [e for e in editors if e.session == session]
                assert not any(e.gaps for e in pair), [e.gaps for e in pair]
                ops = await stored_ops(cluster.port, session, pair[0].epoch)
                stored = export(database_url, session)
                seqs = [op["seq"] for op in ops]
                assert seqs == list(range(1, stored["version"] + 1)), (session, seqs)
                op_ids = [op["op_id"] for op in ops]
                assert len(op_ids) == len(set(op_ids)), f"{session}: a change stored twice"
                at_seq = dict(zip(seqs, op_ids))
                for editor in pair:
                    for op_id, seq in editor.acked:
                        assert at_seq.get(seq) == op_id, (session, op_id, seq)
                    # The client's copy (relays, acks, resumes) is the stored document.
                    assert editor.seq == stored["version"]
                    assert editor.items == {item["uuid"]: item for item in stored["items"]}


@asynccontextmanager
async def served(port: int, path: str, timeout: float, refusals: list[Any]) -> AsyncIterator[Any]:
    """A connection once the node serves the session; the closes before that go to `refusals`."""
    deadline = trio.current_time() + timeout
    while True:
        assert trio.current_time() < deadline, f"{path} not served within {timeout:g} s: {refusals}"
        async with tcp_client(port, path) as ws:
            try:
                await expect_json(ws, "connection:ack")
            except ConnectionClosed as exc:
                refusals.append(exc.reason)
            else:
                yield ws
                return
        await trio.sleep(0.2)


async def edit(ws: Any, item_id: str) -> dict[str, Any]:
    """Send one add_item (op_id = item_id); the answer to it (ack or error), skipping others' messages."""
    await ws.send_message(json.dumps(add_item(item_id, {"by": item_id}, op_id=item_id)))
    while (message := await recv_json(ws))["type"] not in ("ack", "error"):
        pass
    return message


async def test_a_paused_owner_is_fenced_when_its_lease_moves(database_url: str) -> None:
    args = postgres_node(database_url)
    with trio.fail_after(60):
        async with server_process(*args("nodeA")) as node_a, server_process(*args("nodeB")) as node_b:
            async with tcp_client(node_a.port, "/ws/fenced/ada") as ada:
                await expect_json(ada, "connection:ack")
                assert (await edit(ada, "before-pause"))["type"] == "ack"

                node_a.process.send_signal(signal.SIGSTOP)
                paused_at = trio.current_time()
                refusals: list[Any] = []
                try:
                    async with served(node_b.port, "/ws/fenced/bob", LEASE_TIMEOUT + 5, refusals) as bob:
                        took = trio.current_time() - paused_at
                        print(f"\nnodeB served the session {took:.2f} s after nodeA was paused, after {len(refusals)} refusals: {refusals[0]}")
                        # While nodeA's lease lasted, nodeB said who owns the session.
                        assert refusals and all(r.code == 1013 and "nodeA" in (r.reason or "") for r in refusals)
                        assert took >= LEASE_TIMEOUT * 0.5
                        assert (await edit(bob, "after-takeover"))["type"] == "ack"
                        # Queued in nodeA's socket while it is stopped: the first thing it reads.
                        await ada.send_message(json.dumps(add_item("stale", op_id="stale")))
                        node_a.process.send_signal(signal.SIGCONT)

                        # nodeA wakes up: it may not commit "stale"; its member is sent away.
                        answers = []
                        with pytest.raises(ConnectionClosed) as closed:
                            while True:
                                answers.append(await recv_json(ada))
                        assert closed.value.reason.code == 1012, closed.value.reason
                        assert not [a for a in answers if a["type"] == "ack"], answers
                        errors = [a for a in answers if a["type"] == "error"]
                        assert all(e["code"] == "not_persisted" for e in errors), errors
                        print(f"nodeA's member got {[a['type'] + ':' + a.get('code', '') for a in answers]},"
                              f" then {closed.value.reason}")

                        # nodeA serves the session no more: it names the new owner.
                        async with tcp_client(node_a.port, "/ws/fenced/ada") as again:
                            with pytest.raises(ConnectionClosed) as refused:
                                await expect_json(again, "connection:ack")
                        assert refused.value.reason.code == 1013 and "nodeB" in (refused.value.reason.reason or "")

                        assert (await edit(bob, "still-served"))["type"] == "ack"
                finally:
                    node_a.process.send_signal(signal.SIGCONT)
            stored = export(database_url, "fenced")
            assert sorted(item["uuid"] for item in stored["items"]) == ["after-takeover", "before-pause", "still-served"]
            assert node_a.process.returncode is None and node_b.process.returncode is None
