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

In CI (env CI set) a missing HAProxy or Postgres fails these tests (.ci/run
provides both); elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from collab_trio.cluster_testing import Cluster, Editor, haproxy_binary, open_cluster, render_haproxy
from collab_trio.testing import HANG, expect_json, tcp_client

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
    for line in ("balance hash path,field(-2,/)", "hash-type consistent", "option httpchk GET /readyz"):
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
