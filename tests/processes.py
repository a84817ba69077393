"""Helpers for tests that run real processes: `collab-trio serve`, the Qt tools.

Two flavours: ProcessOutput (threads; for plain sync tests that run the Qt
tools) and server_process (trio; for async tests with WebSocket clients).
Both read a child's output line by line with deadlines, never by sleeping.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

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


def start_smoke_client(server: RunningServer, *extra: str) -> ProcessOutput:
    """Start tools/qt_smoke_client.py against ``server``."""
    args = [sys.executable, str(SMOKE_CLIENT), server.url, *extra]
    return ProcessOutput("smoke client", args, child_env())


def verdict_of(lines: list[str]) -> str:
    """The client's final PASS / FAIL line (Qt may log other lines around it)."""
    verdicts = [line for line in lines if line == "PASS" or line.startswith("FAIL")]
    return verdicts[-1] if verdicts else "(no verdict line)"



LISTENING = re.compile(r"Listening on wss?://127\.0\.0\.1:(\d+)/ws/")
START_TIMEOUT = 30


async def assert_port_binds_again(port: int) -> None:
    """Bind the port the way a new server would (trio sets SO_REUSEADDR)."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    for listener in listeners:
        await listener.aclose()


@attrs.define(eq=False)
class ServerProcess:
    """A `collab-trio serve` child process and everything it printed."""

    process: trio.Process
    port: int = 0
    lines: list[str] = attrs.field(factory=list)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


async def _collect_lines(stream: trio.abc.ReceiveStream, server: ServerProcess, port_found: trio.Event) -> None:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            server.lines.append(line)
            match = LISTENING.search(line)
            if match and not port_found.is_set():
                server.port = int(match.group(1))
                port_found.set()
    if buffer:
        server.lines.append(buffer.decode("utf-8", "replace"))


@asynccontextmanager
async def server_process(*args: str) -> AsyncIterator[ServerProcess]:
    """Start the server on a free port; kill it at the end if it is still running.

    Its output stays in `lines` (shown by the test on failure via `output`).
    """
    command = [sys.executable, "-m", "collab_trio", "serve", "--host", "127.0.0.1", "--port", "0", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    server = ServerProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            port_found = trio.Event()
            assert process.stdout is not None
            nursery.start_soon(_collect_lines, process.stdout, server, port_found)
            with trio.fail_after(START_TIMEOUT):
                await port_found.wait()
            try:
                yield server
            finally:
                # Before the nursery waits for the output to end, which is when the child exits.
                if process.returncode is None:
                    process.kill()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
