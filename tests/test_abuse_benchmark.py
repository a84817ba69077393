"""benchmarks/abuse.py --short runs to the end and reports every scenario.

The benchmark's figures are not asserted here (the server is measured, not
tested, by it): only that it completes, exits 0 and lists each scenario in
its final table, so that the script the engineers measure with keeps working.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from collab_trio import testing

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "abuse.py"
SCENARIOS = ("never_reader", "sync_flood", "resume_large", "small_values", "floods", "big_document")
TIMEOUT = 150
VERDICTS = ("PASS", "FAIL", "INFO", "ERROR")


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of the final table: the lines after `Results (...)` and the header's dashes."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Results (")]
    assert starts, f"no final table in the output:\n{stdout[-3000:]}"
    rows = []
    for line in lines[starts[-1] + 3:]:
        cells = line.split()
        if not cells or cells[-1] not in VERDICTS:
            break
        rows.append(cells)
    return rows


def test_abuse_short_lists_every_scenario(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--short"],
        cwd=tmp_path, env=testing.child_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    output = f"stdout:\n{done.stdout[-6000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, output
    # A traceback on stderr is a bug of the script itself (the server's own go into notes).
    assert "Traceback" not in done.stderr, output
    rows = table_rows(done.stdout)
    listed = {row[0] for row in rows}
    assert listed == set(SCENARIOS), (listed, output)
    # The run writes nothing into its working directory (temporary data dirs only).
    assert list(tmp_path.iterdir()) == []
