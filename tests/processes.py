"""Process helpers for the tests: re-exports of collab_trio.testing, plus the Qt tools' paths.

The code lives in collab_trio.testing (tools/ and benchmarks/ use it too);
these names stay importable from here for the tests that import them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from collab_trio.testing import (  # noqa: F401 - re-exported
    LISTENING_RE,
    START_TIMEOUT,
    ProcessOutput,
    RunningServer,
    ServerProcess,
    assert_port_binds_again,
    child_env,
    server_process,
)
from collab_trio.testing import STOP_TIMEOUT as STOP_TIMEOUT_S

REPO = Path(__file__).resolve().parents[1]
SMOKE_CLIENT = REPO / "tools" / "qt_smoke_client.py"  # a wrapper of collab_trio.qt_smoke
# Old names of the one "Listening on" pattern and of the start deadline.
LISTENING = LISTENING_RE
SERVER_START_TIMEOUT_S = 20
CLIENT_RUN_TIMEOUT_S = 60


def start_smoke_client(server: RunningServer, *extra: str) -> ProcessOutput:
    """Start tools/qt_smoke_client.py against ``server``."""
    return ProcessOutput("smoke client", [sys.executable, str(SMOKE_CLIENT), server.url, *extra], child_env())


def verdict_of(lines: list[str]) -> str:
    """The client's final PASS / FAIL line (Qt may log other lines around it)."""
    verdicts = [line for line in lines if line == "PASS" or line.startswith("FAIL")]
    return verdicts[-1] if verdicts else "(no verdict line)"
