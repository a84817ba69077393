"""Layer 4 from the outside: tools/collab_integration.py and tools/run_tests.sh, run as a user runs them."""

from __future__ import annotations

import re
import shutil
import socket
import sys

import pytest

from collab_trio.testing import ProcessOutput, RunningServer, child_env

from .qt_tools import REPO, verdict_of

INTEGRATION_TOOL = REPO / "tools" / "collab_integration.py"
RUN_TESTS_SH = REPO / "tools" / "run_tests.sh"
# The tool bounds every step itself (5 s each); these only stop a hung child.
INTEGRATION_TIMEOUT_S = 120
RUN_TESTS_TIMEOUT_S = 240
USERS = ("ada", "grace hopper", "linus", "zoë", "edsger")
TABLE_HEADER_RE = re.compile(r"^\s*#\s+step\s+result\s+time$")
TABLE_ROW_RE = re.compile(r"^\s*\d+  (?P<step>.*?)\s+(?P<result>PASS|FAIL|SKIP)\s+(?P<time>\d+\.\d ms|-)$")


def run_to_end(name: str, args: list[str], timeout: float, **env: str) -> tuple[int, ProcessOutput]:
    """Run a child to its end (killed after ``timeout``); return its exit status and output."""
    output = ProcessOutput(name, args, {**child_env(), **env})
    try:
        returncode = output.wait(timeout)
    finally:
        output.stop()
    return returncode, output


def summary_table(lines: list[str]) -> list[tuple[str, str, str]]:
    """The (step, result, time) rows of the tool's summary table."""
    starts = [index for index, line in enumerate(lines) if TABLE_HEADER_RE.match(line)]
    assert len(starts) == 1, "\n".join(lines)
    rows = []
    for line in lines[starts[0] + 2:]:  # header, then a line of dashes
        match = TABLE_ROW_RE.match(line)
        if match is None:
            break
        rows.append((match["step"], match["result"], match["time"]))
    return rows


def test_five_clients_against_a_server_of_its_own() -> None:
    """The whole workflow with five QWebSocket clients; the tool starts and stops the server."""
    returncode, tool = run_to_end(
        "integration tool", [sys.executable, str(INTEGRATION_TOOL), "--clients", "5"], INTEGRATION_TIMEOUT_S
    )
    output = tool.text()
    assert returncode == 0, output
    assert verdict_of(tool.lines) == "PASS", output

    rows = summary_table(tool.lines)
    steps = [step for step, _, _ in rows]
    assert all(result == "PASS" for _, result, _ in rows), output
    assert all(time.endswith(" ms") for _, _, time in rows), output
    # One progress line per step before the table, numbered out of the same total.
    progress = [line for line in tool.lines if re.match(rf"\[\s*\d+/{len(rows)}\] PASS  ", line)]
    assert len(progress) == len(rows), output

    assert steps[0] == "start server" and steps[-1] == "stop server", output
    assert any("SIGTERM, exit status 0" in line for line in tool.lines), output
    for user in USERS:
        assert any(step.startswith(f"join {user!r}") for step in steps), (user, output)
        assert f"disconnect {user!r}" in steps, (user, output)
    for action in ("add_item", "move_item", "update_item", "remove_item"):
        assert any(action in step for step in steps), (action, output)
    for expected in (
        "concurrent add_item by all 5 clients",
        "sync:request on the new session by 'ada'",
        "leave 'grace hopper'",
        "rejoin 'grace hopper'",
        "sync:request after rejoin by 'grace hopper'",
    ):
        assert expected in steps, (expected, output)
    assert any(step.startswith("sync:request after the edits") for step in steps), output
    assert any(step.startswith("cursor from") for step in steps), output


def test_two_clients_against_a_running_server(server: RunningServer) -> None:  # noqa: F811
    """--url: the tool uses the given server, leaves it running, and its users come and go."""
    args = [sys.executable, str(INTEGRATION_TOOL), "--clients", "2", "--url", server.url]
    returncode, tool = run_to_end("integration tool", args, INTEGRATION_TIMEOUT_S)
    output = tool.text()
    assert returncode == 0, output
    assert verdict_of(tool.lines) == "PASS", output

    steps = [step for step, _, _ in summary_table(tool.lines)]
    assert "start server" not in steps and "stop server" not in steps, output
    assert "concurrent add_item by all 2 clients" in steps, output
    assert "disconnect 'grace hopper'" in steps, output

    assert server.output.process.poll() is None, server.output.text()
    session = re.search(r"session '(integration-[0-9a-f]+)'", output)
    assert session is not None, output
    log = server.output.text()
    for user in USERS[:2]:
        assert f"User {user} joined session {session[1]}" in log, log
        assert f"User {user} left session {session[1]} (disconnected, close code 1000)" in log, log


def test_fails_when_nothing_listens() -> None:
    """Exit status 1 and a FAIL verdict naming the first step when the server is not there."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Bound but never listened on, then closed: connecting is refused at once.
    args = [sys.executable, str(INTEGRATION_TOOL), "--url", f"ws://127.0.0.1:{port}", "--timeout", "3"]
    returncode, tool = run_to_end("integration tool", args, INTEGRATION_TIMEOUT_S)
    output = tool.text()
    assert returncode == 1, output
    verdict = verdict_of(tool.lines)
    assert verdict.startswith("FAIL: join 'ada' (first: host): "), output
    rows = summary_table(tool.lines)
    assert rows[0][1] == "FAIL" and all(result == "SKIP" for _, result, _ in rows[1:]), output


@pytest.mark.skipif(sys.platform == "win32" or shutil.which("bash") is None, reason="needs bash")
def test_run_tests_sh_on_a_free_port() -> None:
    """tools/run_tests.sh 0: server, smoke client, integration, SIGTERM, and the port free again."""
    returncode, script = run_to_end(
        "run_tests.sh", ["bash", str(RUN_TESTS_SH), "0"], RUN_TESTS_TIMEOUT_S, PYTHON=sys.executable
    )
    output = script.text()
    assert returncode == 0, output
    started = re.search(r"^\[1/4\] starting server on 127\.0\.0\.1 port 0 \.\.\. ok: ws://127\.0\.0\.1:(\d+) ", output, re.M)
    assert started is not None, output
    port = started[1]
    assert re.search(r"^\[2/4\] Qt smoke client \.\.\. ok ", output, re.M), output
    assert re.search(r"^\[3/4\] integration \.\.\. ok ", output, re.M), output
    assert re.search(
        rf"^\[4/4\] stopping server \(SIGTERM\) \.\.\. ok: exit status 0, port {port} released ", output, re.M
    ), output
    assert "      | PASS" in script.lines, output  # the tools' own verdicts, indented
    assert script.lines[-1] == "ALL 4 CHECKS PASSED", output
    for number, name in enumerate(("start server", "Qt smoke client", "integration", "stop server"), 1):
        assert re.search(rf"^  \[{number}/4\] {name}\s+ok$", output, re.M), output
