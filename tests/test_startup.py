"""`collab-trio serve` that can't start: one line naming the real cause, exit 1, no banner.

Each case runs the real command in a child process on port 0 with its data
directory inside tmp_path, and checks all of its output: every line is a log
line (no traceback, no continuation of a multi-line message), exactly one is
an ERROR, and it says what is wrong with what.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from collab_trio.auth import TokensFileError
from collab_trio.cli import _first_cause, build_parser, describe_failure
from collab_trio.config import ServerConfig
from collab_trio.store import StoreError
from collab_trio.store.sqlite import database_path
from collab_trio.testing import LISTENING_RE as LISTENING, START_TIMEOUT, server_process

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")
# What only a server that ran may print when it stops.
STOPPED_LINES = ("✓ Server closed", "✓ Port released", "Server stopped without a graceful shutdown")


# Root passes every permission check by its capabilities (tests and CI run as
# root): this runs a child without the two that override file permissions.
WITHOUT_DAC_OVERRIDE = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]


async def run_serve(data_dir: Path, *args: str, prefix: Sequence[str] = ()) -> tuple[int, list[str]]:
    """Run `collab-trio serve` (behind `prefix`) to its end; (exit status, output lines).

    A server that starts after all is killed at once and fails the test.
    """
    command = [
        *prefix,
        sys.executable, "-m", "collab_trio", "serve", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(data_dir), *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(START_TIMEOUT):
            async for chunk in process.stdout:
                output += chunk
                if LISTENING.search(output.decode("utf-8", "replace")):
                    pytest.fail(f"the server started:\n{output.decode('utf-8', 'replace')}")
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        await process.stdout.aclose()
    return process.returncode, output.decode("utf-8", "replace").splitlines()


def the_error_line(returncode: int, lines: list[str]) -> str:
    """Check what every failed start must look like; return its one ERROR line's message."""
    output = "\n".join(lines)
    assert returncode == 1, output
    assert "Traceback" not in output, output
    assert "Exceptions from Trio nursery" not in output, output
    not_logged = [line for line in lines if not LOG_LINE.match(line)]
    assert not not_logged, f"lines that are not log lines: {not_logged}\n{output}"
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, output
    for banner in STOPPED_LINES:
        assert banner not in output, f"{banner!r} printed by a server that never started:\n{output}"
    assert "Listening on" not in output, output
    return errors[0].split(" ERROR ", 1)[1].strip()


def names(message: str, path: Path) -> bool:
    """Whether the message names this path, as given or resolved."""
    return str(path) in message or str(path.resolve()) in message


async def test_data_dir_is_a_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("not a directory\n")
    message = the_error_line(*await run_serve(data_dir))
    assert names(message, data_dir), message
    assert "is not a directory" in message, message


async def test_database_that_is_not_a_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database_path(data_dir).write_bytes(b"this is no SQLite file\n" * 200)
    message = the_error_line(*await run_serve(data_dir))
    assert names(message, data_dir), message
    assert "file is not a database" in message, message
    # Left as it was: nothing overwrites what the server can't read.
    assert database_path(data_dir).read_bytes() == b"this is no SQLite file\n" * 200


async def test_database_of_a_newer_version(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with sqlite3.connect(database_path(data_dir)) as conn:
        conn.execute("PRAGMA user_version = 99")
    message = the_error_line(*await run_serve(data_dir))
    assert names(message, data_dir), message
    assert "was written by a newer collab-trio (schema 99)" in message, message


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="running as root, and no setpriv (util-linux) to drop the capability to override permissions",
)
async def test_data_dir_without_permission(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0)
    try:
        prefix = WITHOUT_DAC_OVERRIDE if os.geteuid() == 0 else []
        message = the_error_line(*await run_serve(data_dir, prefix=prefix))
    finally:
        data_dir.chmod(0o700)
    assert message == f"data directory {data_dir}: permission denied", message


async def test_second_server_on_the_same_port_and_data_dir_names_the_data_dir(tmp_path: Path) -> None:
    # The usual mistake: the same command twice (same port, same directory).
    # The data directory is checked before the port, so the message says who
    # holds it instead of "port already in use".
    data_dir = tmp_path / "data"
    async with server_process("--data-dir", str(data_dir)) as first:
        message = the_error_line(*await run_serve(data_dir, "--port", str(first.port)))
        assert f"is in use by another collab-trio server (pid {first.process.pid})" in message, message
        assert first.process.returncode is None


async def test_busy_data_dir_names_the_other_server_then_frees_on_sigkill(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with server_process("--data-dir", str(data_dir)) as first:
        message = the_error_line(*await run_serve(data_dir))
        assert names(message, data_dir), message
        assert f"is in use by another collab-trio server (pid {first.process.pid})" in message, message
        # The first server is unharmed by the attempt.
        assert first.process.returncode is None
        first.process.kill()
        with trio.fail_after(START_TIMEOUT):
            await first.process.wait()
    assert first.process.returncode == -signal.SIGKILL
    # A lock held by a dead process is no lock: the next server starts.
    async with server_process("--data-dir", str(data_dir)) as second:
        second.process.send_signal(signal.SIGINT)
        with trio.fail_after(START_TIMEOUT):
            assert await second.process.wait() == 0, second.output


async def run_serve_with_broken_server(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    """`collab-trio serve` whose serve() fails with a bug (RuntimeError) before it binds."""
    code = (
        "import sys, collab_trio.cli as cli\n"
        "async def broken(config, *, task_status):\n"
        "    raise RuntimeError('a bug')\n"
        "cli.serve = broken\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    command = [
        sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(tmp_path / "data"), *args,
    ]
    with trio.fail_after(START_TIMEOUT):
        result = await trio.run_process(
            command, capture_stdout=True, stderr=subprocess.STDOUT, check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return result.returncode, result.stdout.decode("utf-8", "replace").splitlines()


async def test_unexpected_error_is_one_line_and_the_traceback_only_with_debug(tmp_path: Path) -> None:
    message = the_error_line(*await run_serve_with_broken_server(tmp_path))
    assert message == "Stopped by an unexpected error: RuntimeError: a bug (--debug shows the traceback)"

    returncode, lines = await run_serve_with_broken_server(tmp_path, "--debug")
    output = "\n".join(lines)
    assert returncode == 1, output
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, output
    assert errors[0].endswith("Stopped by an unexpected error: RuntimeError: a bug"), output
    assert "Traceback (most recent call last)" in output, output
    assert lines[-1] == "RuntimeError: a bug", output


def test_tuning_options() -> None:
    args = build_parser().parse_args(
        ["serve", "--max-pending-bytes", "256K", "--store-queue-bytes", "2M", "--fault-commit-delay", "0.2"]
    )
    assert (args.max_pending_bytes, args.store_queue_bytes) == (256 * 1024, 2 * 1024 * 1024)
    assert args.fault_commit_delay == 0.2
    defaults = build_parser().parse_args(["serve"])
    config = ServerConfig()
    assert (defaults.max_pending_bytes, defaults.store_queue_bytes, defaults.fault_commit_delay) == (
        config.max_pending_bytes, config.store_queue_bytes, config.fault_commit_delay
    )


def test_fault_injection_is_not_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    assert "--max-pending-bytes" in text and "--store-queue-bytes" in text
    assert "--fault-commit-delay" not in text


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            StoreError("data directory /srv/d is in use by another collab-trio server (pid 42)"),
            "data directory /srv/d is in use by another collab-trio server (pid 42)",
        ),
        (StoreError("/srv/d is not a directory"), "/srv/d is not a directory"),
        (StoreError("permission denied"), "Cannot use the data directory /srv/d: permission denied"),
        # "/srv/dx" is another directory, not this one.
        (
            StoreError("/srv/dx is not a directory"),
            "Cannot use the data directory /srv/d: /srv/dx is not a directory",
        ),
        (
            OSError(errno.EADDRINUSE, "Address already in use"),
            "Cannot listen on 0.0.0.0:8765: the port is already in use",
        ),
        (OSError(errno.EACCES, "Permission denied"), "Cannot listen on 0.0.0.0:8765: Permission denied"),
        (TokensFileError("tokens.toml: no tokens defined"), "tokens.toml: no tokens defined"),
        (RuntimeError("a bug"), "Stopped by an unexpected error: RuntimeError: a bug"),
    ],
)
def test_the_cause_is_found_in_nested_groups(error: Exception, line: str) -> None:
    # As trio delivers it: one group per nursery the error crossed.
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [error])])
    cause, known = _first_cause(group)
    assert cause is error
    assert known == (not isinstance(error, RuntimeError))
    assert describe_failure(cause, ServerConfig(data_dir="/srv/d")) == line


def test_a_known_cause_wins_over_a_bug_next_to_it() -> None:
    store_error = StoreError("permission denied")
    group = ExceptionGroup("x", [RuntimeError("later"), ExceptionGroup("y", [store_error])])
    cause, known = _first_cause(group)
    assert (cause, known) == (store_error, True)
