"""End to end: the PyQt6 smoke client (tools/qt_smoke_client.py) against a real server process."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_CLIENT = REPO / "tools" / "qt_smoke_client.py"  # a wrapper of collab_trio.qt_smoke
LISTENING_RE = re.compile(r"ws://127\.0\.0\.1:(\d+)/ws/")
SERVER_START_TIMEOUT_S = 20
CLIENT_RUN_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10


class ProcessOutput:
    """A child process with stdout and stderr merged, read line by line by a thread."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        # Draining continuously means a chatty child never blocks on a full pipe.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Collect every line, then signal end of output with None."""
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                line = line.rstrip("\n")
                self.lines.append(line)
                self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float) -> re.Match[str]:
        """Return the match of the first new line matching ``pattern``; fail after ``timeout`` s."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0))
            except queue.Empty:
                pytest.fail(f"no line matching {regex.pattern!r} within {timeout}s:\n{self.text()}")
            if line is None:
                pytest.fail(f"output ended with no line matching {regex.pattern!r}:\n{self.text()}")
            match = regex.search(line)
            if match:
                return match

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and for its last line to be read; return the exit code."""
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout}s:\n{self.text()}")
        self._reader.join(timeout=STOP_TIMEOUT_S)
        return returncode

    def stop(self) -> None:
        """Terminate the process if it still runs, then kill it if it ignores that."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        self._reader.join(timeout=STOP_TIMEOUT_S)

    def text(self) -> str:
        """All output read so far."""
        return "\n".join(self.lines)


class RunningServer:
    """A `collab_trio serve` process and the port it listens on."""

    def __init__(self, output: ProcessOutput, port: int) -> None:
        self.output = output
        self.port = port

    @property
    def url(self) -> str:
        """The base URL the smoke client takes."""
        return f"ws://127.0.0.1:{self.port}"


def child_env() -> dict[str, str]:
    """The environment for child processes: unbuffered, headless Qt, src importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # so the "Listening on" line is not stuck in a buffer
    env["QT_QPA_PLATFORM"] = "offscreen"
    # Appended, so an installed package or an explicit PYTHONPATH still comes first.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO / "src")]))
    return env


@pytest.fixture
def server() -> Iterator[RunningServer]:
    """A real server on a free port of 127.0.0.1, stopped (or killed) afterwards."""
    args = [sys.executable, "-m", "collab_trio", "serve", "--host", "127.0.0.1", "--port", "0"]
    output = ProcessOutput("server", args, child_env())
    try:
        match = output.wait_for(LISTENING_RE, SERVER_START_TIMEOUT_S)
        yield RunningServer(output, int(match.group(1)))
    finally:
        output.stop()
        # Shown by pytest only when the test failed.
        print(f"--- server output ---\n{output.text()}")


def start_smoke_client(server: RunningServer, *extra: str) -> ProcessOutput:
    """Start tools/qt_smoke_client.py against ``server``."""
    args = [sys.executable, str(SMOKE_CLIENT), server.url, *extra]
    return ProcessOutput("smoke client", args, child_env())


def verdict_of(lines: list[str]) -> str:
    """The client's final PASS / FAIL line (Qt may log other lines around it)."""
    verdicts = [line for line in lines if line == "PASS" or line.startswith("FAIL")]
    return verdicts[-1] if verdicts else "(no verdict line)"


def test_smoke_client_passes(server: RunningServer) -> None:
    """Ack, a pong every second for six seconds, then a clean 1000 close."""
    client = start_smoke_client(server, "--interval", "1", "--duration", "6")
    try:
        returncode = client.wait(CLIENT_RUN_TIMEOUT_S)
    finally:
        client.stop()
    output = client.text()
    assert returncode == 0, output
    assert verdict_of(client.lines) == "PASS", output
    assert any("connection:ack: 1 user(s), host=True" in line for line in client.lines), output
    pongs = [line for line in client.lines if "ping -> pong in" in line]
    assert len(pongs) >= 5, output
    assert any("disconnected: close code 1000" in line for line in client.lines), output


def test_smoke_client_percent_encodes_display_name(server: RunningServer) -> None:
    """Ids with spaces travel percent-encoded and come back decoded in the ack."""
    # Optiverse users type display names; QUrl sends "Ada Lovelace" as "Ada%20Lovelace".
    names = ["--session", "team review", "--user", "Ada Lovelace"]
    client = start_smoke_client(server, *names, "--interval", "0.5", "--duration", "1")
    try:
        returncode = client.wait(CLIENT_RUN_TIMEOUT_S)
    finally:
        client.stop()
    output = client.text()
    assert returncode == 0, output
    assert any("/ws/team%20review/Ada%20Lovelace" in line for line in client.lines), output
    assert verdict_of(client.lines) == "PASS", output


def test_smoke_client_reports_1001_when_server_stops(server: RunningServer) -> None:
    """SIGTERM to the server closes the client with 1001, which the client reports as FAIL."""
    client = start_smoke_client(server, "--interval", "1", "--duration", "30")
    try:
        client.wait_for(r"connection:ack", CLIENT_RUN_TIMEOUT_S)
        server.output.process.send_signal(signal.SIGTERM)
        returncode = client.wait(CLIENT_RUN_TIMEOUT_S)
    finally:
        client.stop()
    output = client.text()
    assert returncode == 1, output
    verdict = verdict_of(client.lines)
    assert "FAIL" in output and "1001" in output, output
    assert re.match(r"FAIL: disconnected after .*: close code 1001 ", verdict), output
    # With its only client gone, a graceful stop must not hang.
    server.output.wait(STOP_TIMEOUT_S * 2)
