"""benchmarks/scale.py --short, as CI runs it: it completes and prints its table and the failover line.

Nothing about speed is asserted. The script bounds every wait itself; the
timeout here only stops a hung run, and kills its whole process group (the
nodes and HAProxy too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from collab_trio.cluster_testing import haproxy_binary
from collab_trio.testing import child_env, run_script

REPO = Path(__file__).resolve().parents[1]
SCALE = REPO / "benchmarks" / "scale.py"
TIMEOUT = 120

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the HAProxy cluster runs on Linux")


def run_short(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCALE), "--short", *args]
    return run_script("scale.py --short", command, TIMEOUT, cwd=REPO, env=child_env())


def test_scale_short_prints_both_node_counts_and_the_failover(database_url: str) -> None:
    if haproxy_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed; .ci/run installs it")
        pytest.skip("haproxy is not installed (apt-get install haproxy); CI runs this test")
    result = run_short("--database-url", database_url)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("nodes"))
    rows = {line.split()[0]: line.split() for line in lines[header + 2:header + 4]}
    assert set(rows) == {"1", "3"}, result.stdout
    for cells in rows.values():
        assert len(cells) == 11 and float(cells[1]) > 0, cells  # deliveries happened
    assert any(line.startswith("failover (3 nodes, SIGKILL") for line in lines), result.stdout
    assert any(line.startswith("limit: ") for line in lines), result.stdout
    print(result.stdout)


def test_scale_without_postgres_says_so_in_one_line() -> None:
    env = {k: v for k, v in child_env().items() if k != "COLLAB_TRIO_TEST_DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, str(SCALE), "--short"], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "scale.py: no Postgres: pass --database-url or set COLLAB_TRIO_TEST_DATABASE_URL"
    ] or "haproxy is not installed" in result.stderr
