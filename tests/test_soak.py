"""The CI soak test: tools/soak.py for two minutes against a real server process.

4 sessions x 5 clients keep a 2-core machine busy at about 2000 messages a
second without saturating it. The tool starts its own `collab-trio serve`
child; it runs in a new process group so that a timeout kills the server too.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from collab_trio.testing import run_script

SOAK = Path(__file__).resolve().parents[1] / "tools" / "soak.py"
DURATION = 120
# Load, then the final probes and the server's stop (each bounded in soak.py).
TIMEOUT = DURATION + 120


def test_soak_two_minutes() -> None:
    command = [
        sys.executable, "-W", "always::ResourceWarning", str(SOAK),
        "--duration", str(DURATION), "--sessions", "4", "--clients", "5", "--seed", "1",
    ]
    result = run_script("soak.py", command, TIMEOUT)
    stdout, stderr = result.stdout, result.stderr
    output = f"{stdout}\n{stderr}"
    print(stdout)  # the progress lines and the report, shown by pytest -s or on failure

    assert result.returncode == 0, output
    report = stdout.split("=== soak report ===", 1)[1]
    lines = report.splitlines()
    assert "errors: 0" in lines, output
    assert "server log warnings/errors: 0" in lines, output
    assert "server exit status after SIGINT: 0" in lines, output
    assert lines[-1] == "RESULT: PASS", output
    assert re.search(r"^sessions left in the server registry: 0 \(capacity probe .*then 503", report, re.M), output
    commands = re.search(
        r"^commands: (\d+) sent, (\d+) acknowledged, (\d+) relays received, 0 relays missing$", report, re.M
    )
    assert commands, output
    sent, acked, relayed = map(int, commands.groups())
    assert sent == acked > 1000, output
    assert relayed > sent, output  # each command reaches several other members
    made = re.search(r"^connections made: (\d+)$", report, re.M)
    assert made and int(made.group(1)) > 20, output  # clients left and rejoined
    growth = re.search(r"^server RSS growth after warm-up: ([-+]\d+\.\d)% \(limit 10%\)$", report, re.M)
    assert growth and float(growth.group(1)) < 10.0, output
    assert "ResourceWarning" not in stderr, stderr
