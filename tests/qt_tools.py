"""Helpers for the tests that run the Qt tools (tools/qt_smoke_client.py and friends).

Process plumbing itself is in collab_trio.testing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from collab_trio.testing import ProcessOutput, RunningServer, child_env

REPO = Path(__file__).resolve().parents[1]
SMOKE_CLIENT = REPO / "tools" / "qt_smoke_client.py"  # a wrapper of collab_trio.qt_smoke
CLIENT_RUN_TIMEOUT_S = 60


def start_smoke_client(server: RunningServer, *extra: str) -> ProcessOutput:
    """Start tools/qt_smoke_client.py against ``server``."""
    return ProcessOutput("smoke client", [sys.executable, str(SMOKE_CLIENT), server.url, *extra], child_env())


def verdict_of(lines: list[str]) -> str:
    """The client's final PASS / FAIL line (Qt may log other lines around it)."""
    verdicts = [line for line in lines if line == "PASS" or line.startswith("FAIL")]
    return verdicts[-1] if verdicts else "(no verdict line)"
