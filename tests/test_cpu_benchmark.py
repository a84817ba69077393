"""benchmarks/cpu_per_change.py --short, run as CI runs it: it runs both servers and prints its table.

Nothing about speed is asserted. The script bounds every wait itself; the
timeout here only stops a hung run, and kills its whole process group.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from collab_trio.testing import child_env, run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "cpu_per_change.py"
TIMEOUT = 120
# Two servers started and run under valgrind (20-50 times slower).
INSTRUCTIONS_TIMEOUT = 600


def test_short_run_prints_cpu_per_change_of_both_servers() -> None:
    result = run_script("cpu_per_change.py --short", [sys.executable, str(SCRIPT), "--short"], TIMEOUT,
                        cwd=REPO, env=child_env())
    output = f"{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, output
    assert result.stdout.startswith("command: ") and "cpu_per_change.py --short" in result.stdout, output
    assert re.search(r"^all 2 runs ran$", result.stdout, re.M), output
    assert re.search(r"^== 3 users, 200 add_item one at a time$", result.stdout, re.M), output
    assert re.search(r"^\s+reference\s+collab-trio\s+collab/ref$", result.stdout, re.M), output
    figures = {}
    for line in result.stdout.splitlines():
        # (The ratio is "-" where the reference's figure is 0: its one thread has no others.)
        match = re.match(r"^\s+(\S.*?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+|-)$", line)
        if match:
            figures[match.group(1)] = [float(g) if g != "-" else None for g in match.group(2, 3, 4)]
    assert set(figures) == {
        "server CPU us/change", "user", "system", "event loop thread", "other threads", "round trip us/change (client)",
    }, output
    for label in ("server CPU us/change", "round trip us/change (client)"):
        reference, collab, ratio = figures[label]
        assert reference > 0 and collab > 0 and ratio > 0, output
    # The parts add up to the whole, for each server (to the tables' rounding).
    for column in (0, 1):
        whole = figures["server CPU us/change"][column]
        assert abs(figures["user"][column] + figures["system"][column] - whole) <= 0.2, output
        assert abs(figures["event loop thread"][column] + figures["other threads"][column] - whole) <= 0.2, output
    # Four progress lines: a start and a result for each server.
    assert len(re.findall(r"^\[ ?\d+/2\] (reference|collab-trio)", result.stderr, re.M)) == 4, output


def test_short_run_counts_the_instructions_per_change_of_both_servers() -> None:
    """--instructions --short: both servers under valgrind's callgrind; the
    event loop's and the other threads' counts add up to the whole."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        if os.environ.get("CI"):
            pytest.fail("valgrind is not installed; .ci/run installs it (apt-get install valgrind)")
        pytest.skip("valgrind is not installed (apt-get install valgrind); CI runs this test")
    command = [sys.executable, str(SCRIPT), "--short", "--instructions"]
    result = run_script("cpu_per_change.py --short --instructions", command, INSTRUCTIONS_TIMEOUT,
                        cwd=REPO, env=child_env())
    output = f"{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, output
    assert re.search(r"^all 2 runs ran$", result.stdout, re.M), output
    assert re.search(r"^== 3 users, 30 add_item one at a time, user-space instructions under valgrind$",
                     result.stdout, re.M), output
    figures = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^\s+(\S.*?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+|-)$", line)
        if match:
            figures[match.group(1)] = [float(g) if g != "-" else None for g in match.group(2, 3, 4)]
    assert set(figures) == {"instructions/change (thousands)", "event loop thread", "other threads"}, output
    reference, collab, ratio = figures["instructions/change (thousands)"]
    # A change costs a Python server tens of thousands of instructions at least.
    assert reference > 10 and collab > 10 and ratio > 0, output
    for column in (0, 1):
        whole = figures["instructions/change (thousands)"][column]
        assert abs(figures["event loop thread"][column] + figures["other threads"][column] - whole) <= 0.2, output
    assert figures["other threads"][0] == 0, output  # the reference relay has one thread
