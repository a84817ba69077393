"""Log output: --log-format json carries session and user; --log-level; the startup URLs."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from collab_trio import logs
from collab_trio.logs import JsonFormatter
from collab_trio.testing import START_TIMEOUT, child_env, server_process, tcp_client


class JsonLines(logging.Handler):
    """Formats every record of the collab_trio loggers as the JSON log does, and keeps the lines."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def find(self, event: str) -> dict[str, Any]:
        return next(entry for entry in self.entries() if entry["event"].startswith(event))


@pytest.fixture
def json_lines() -> Iterator[JsonLines]:
    logger = logging.getLogger("collab_trio")
    handler = JsonLines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def record(message: str, *args: Any, **attributes: Any) -> logging.LogRecord:
    entry = logging.LogRecord("collab_trio.session", logging.WARNING, __file__, 1, message, args, None)
    entry.__dict__.update(attributes)
    return entry


def test_json_line_fields() -> None:
    line = JsonFormatter().format(record("User %s joined session %s", "émile", "lab \"1\"", session="lab", user="x"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry == {
        "time": entry["time"],
        "level": "warning",
        "logger": "collab_trio.session",
        "event": 'User émile joined session lab "1"',
        "session": "lab",
        "user": "x",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])


def test_json_takes_session_and_user_from_the_context() -> None:
    def format_in_context() -> dict[str, Any]:
        logs.bind(session="lab", user="bob")
        return json.loads(JsonFormatter().format(record("hello")))

    import contextvars

    entry = contextvars.copy_context().run(format_in_context)
    assert (entry["session"], entry["user"]) == ("lab", "bob")
    # Outside that context: neither key.
    assert {"session", "user"}.isdisjoint(json.loads(JsonFormatter().format(record("hello"))))


def test_json_traceback_stays_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        entry = record("failed")
        entry.exc_info = sys.exc_info()
    line = JsonFormatter().format(entry)
    assert "\n" not in line
    assert json.loads(line)["traceback"].endswith("ValueError: boom")


async def test_lines_of_a_member_carry_session_and_user(
    start_server: Callable[..., Any], json_lines: JsonLines, autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(idle_timeout=5)
    async with harness.joined("lab", "alice") as alice:
        async with harness.joined("lab", "bob") as bob:
            # Alice says nothing: her connection's own task closes her (4000); Bob pings.
            with trio.move_on_after(4.5):
                await bob.send({"type": "ping"})
                await bob.expect("pong")
                await trio.sleep_forever()
            await bob.send({"type": "ping"})
            assert (await alice.expect_closed())[0] == 4000
            assert trio.current_time() == 5
            await bob.expect("pong")
    await trio.testing.wait_all_tasks_blocked()
    joined = json_lines.find("User alice joined session lab")
    idle = json_lines.find("User alice sent nothing for 5 s")  # logged by her Connection's task
    left = json_lines.find("User alice left session lab")
    host = json_lines.find("User bob is now host of session lab")
    closed = json_lines.find("Session lab closed")
    for entry, user in ((joined, "alice"), (idle, "alice"), (left, "alice"), (host, "bob")):
        assert (entry["session"], entry["user"]) == ("lab", user), entry
    assert closed["session"] == "lab" and "user" not in closed
    assert {entry["level"] for entry in json_lines.entries()} <= {"info", "warning"}


async def test_json_log_of_a_real_server_process() -> None:
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process("--store", "memory", "--log-format", "json") as server:
            async with tcp_client(server.port, "/ws/lab/alice") as ws:
                assert '"connection:ack"' in await ws.get_message()
            await server.wait_for("User alice left session lab")
            assert await server.stop() == 0
    entries = [json.loads(line) for line in server.lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "event"} <= set(entry) for entry in entries)
    joined = next(entry for entry in entries if entry["event"] == "User alice joined session lab")
    assert (joined["session"], joined["user"], joined["level"]) == ("lab", "alice", "info")
    assert entries[-1]["event"] == "✓ Port released"


@pytest.mark.parametrize(
    ("args", "shown", "hidden"),
    [
        ((), ("User alice joined",), ("Session lab unloaded",)),
        (("--log-level", "debug"), ("User alice joined", "Session lab unloaded"), ()),
        (("--debug", "--log-level", "error"), ("Session lab unloaded",), ()),  # --debug wins
    ],
)
async def test_log_level_of_a_real_server(args: tuple[str, ...], shown: tuple[str, ...], hidden: tuple[str, ...]) -> None:
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process("--store", "memory", *args) as server:
            async with tcp_client(server.port, "/ws/lab/alice") as ws:
                assert '"connection:ack"' in await ws.get_message()
            await server.wait_for("User alice left session lab")
            assert await server.stop() == 0
    for text in shown:
        assert text in server.output, server.output
    for text in hidden:
        assert text not in server.output, server.output


def test_warning_level_hides_info() -> None:
    # A server at this level prints no listening line to wait for: the same
    # configure_logging() call, in a child process of its own.
    code = (
        "import logging; from collab_trio.logs import configure_logging; "
        "configure_logging(level='warning', log_format='json'); "
        "log = logging.getLogger('collab_trio.server'); log.info('quiet'); log.warning('loud')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, env=child_env()
    )
    assert [json.loads(line)["event"] for line in result.stderr.splitlines()] == ["loud"]
