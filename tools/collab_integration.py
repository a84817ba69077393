#!/usr/bin/env python3
"""Layer 4: the whole collaboration workflow with several real PyQt6 QWebSocket clients.

    python tools/collab_integration.py [--clients N] [--url ws://HOST:PORT] [--timeout SECONDS]

Without --url it starts `python -m collab_trio serve --host 127.0.0.1 --port 0`,
reads the port from its "Listening on" line, and afterwards stops it (SIGTERM,
then kill after a timeout) and checks that it exited 0. With --url it talks to
that server and leaves it running.

N clients (2-5, default 3) join one fresh session with a random id, all from
one headless QCoreApplication: join, commands from different clients,
concurrent commands, sync, cursor, leave and rejoin, and a clean disconnect of
everyone. A small scenario runner drives them. Every step sends something and
says exactly which messages each client must receive, in which order. The step
passes when they have all arrived and a ping/pong round trip on every client
shows nothing else was queued for anyone. It fails on any other message, on an
unexpected disconnect, or after --timeout seconds.

Prints one line per step, then a summary table and `PASS` or `FAIL: <why>`;
exits 0 only on PASS.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

# Must be set before Qt is imported: the clients need no display.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

try:
    import attrs
    from PyQt6.QtCore import QCoreApplication, QObject, Qt, QTimer, QUrl
    from PyQt6.QtNetwork import QAbstractSocket
    from PyQt6.QtWebSockets import QWebSocket, QWebSocketProtocol

    from collab_trio.testing import HarnessError, ProcessOutput, child_env, start_server_output
except ImportError as exc:
    sys.exit(f"collab_integration.py needs collab-trio installed with PyQt6 (pip install 'collab-trio[qt]'): {exc}")

REPO = Path(__file__).resolve().parents[1]
# One id per client; a space and a non-ASCII letter travel percent-encoded, as Optiverse's do.
USER_IDS = ("ada", "grace hopper", "linus", "zoë", "edsger")
# Sent as `user_id` by a client; the server must replace it with the true sender.
SPOOFED_USER_ID = "mallory"
SERVER_START_TIMEOUT_S = 20.0
SERVER_STOP_TIMEOUT_S = 10.0
# Added to steps x timeout for the safety timer that ends a run whatever happens.
SAFETY_MARGIN_S = 10.0
# How often Python gets control back so a Ctrl+C handler can run inside Qt's event loop.
SIGNAL_WAKEUP_MS = 200
NORMAL_CLOSE = QWebSocketProtocol.CloseCode.CloseCodeNormal
SERVER_LOG_TAIL = 40

Message = dict[str, Any]
Check = Callable[[Message], list[str]]


# ---------------------------------------------------------------------------
# Small helpers


def utc_now() -> str:
    """An ISO 8601 UTC timestamp, as Optiverse puts in its commands."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def timestamp_problems(value: object, what: str) -> list[str]:
    """Problems with ``value`` as an ISO 8601 timestamp in UTC (none if it is one)."""
    if not isinstance(value, str):
        return [f"{what} is {value!r}, not an ISO 8601 string"]
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return [f"{what} {value!r} is not ISO 8601"]
    if stamp.utcoffset() != timedelta(0):
        return [f"{what} {value!r} is not in UTC"]
    return []


def short(value: object, limit: int = 300) -> str:
    """Compact JSON of ``value``, cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def close_code_of(ws: QWebSocket) -> int:
    """The socket's close code as a plain int."""
    code = ws.closeCode()
    # PyQt6 gives an enum member; stay lenient in case a code outside the enum comes back as int.
    return int(getattr(code, "value", code))


def format_ms(seconds: float | None) -> str:
    """A duration in milliseconds for the report, or '-' when there is none."""
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def client_url(base: str, session_id: str, user_id: str) -> QUrl:
    """``base/ws/{session_id}/{user_id}``, with the ids percent-encoded by QUrl like Optiverse's."""
    url = QUrl(base)
    path = url.path(QUrl.ComponentFormattingOption.FullyDecoded).rstrip("/")
    # DecodedMode: the ids are raw text, so QUrl encodes the space and 'ë' itself.
    url.setPath(f"{path}/ws/{session_id}/{user_id}", QUrl.ParsingMode.DecodedMode)
    return url


# ---------------------------------------------------------------------------
# The report: one line per step as it ends, a table at the end


@attrs.define
class Row:
    """The outcome of one step."""

    name: str
    result: str  # PASS, FAIL or SKIP
    seconds: float | None
    detail: str = ""


@attrs.define
class Report:
    """Step outcomes, printed as they come; the summary table at the end."""

    total: int
    rows: list[Row] = attrs.field(factory=list)
    # Things that are odd but outside the contract: reported, not failures.
    notes: dict[str, int] = attrs.field(factory=dict)

    def note(self, text: str) -> None:
        """Remember an observation; the same one again only counts."""
        self.notes[text] = self.notes.get(text, 0) + 1

    def add(self, name: str, result: str, seconds: float | None, detail: str = "") -> None:
        """Record one step and print its line right away."""
        self.rows.append(Row(name, result, seconds, detail))
        number = f"[{len(self.rows):>2}/{self.total}]"
        line = f"{number} {result:<4}  {name}  ({format_ms(seconds)})"
        if detail:
            line += f"  {detail}" if result == "PASS" else f"\n        -> {detail}"
        print(line, flush=True)

    def skip(self, names: list[str]) -> None:
        """Record steps that never ran, without a line each."""
        self.rows.extend(Row(name, "SKIP", None) for name in names)

    def table(self) -> str:
        """The summary: step, result, time."""
        width = max([len("step")] + [len(row.name) for row in self.rows])
        lines = [
            f"{'#':>3}  {'step':<{width}}  result  {'time':>10}",
            f"{'-' * 3}  {'-' * width}  ------  {'-' * 10}",
        ]
        for number, row in enumerate(self.rows, 1):
            lines.append(
                f"{number:>3}  {row.name:<{width}}  {row.result:<6}  {format_ms(row.seconds):>10}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# The server we start (when no --url is given)


def start_server(workdir: str) -> tuple[ProcessOutput, int]:
    """`collab-trio serve` on a free loopback port, working and storing in `workdir`.

    Raises:
        HarnessError: no "Listening on" line in time, or the server exited first.
    """
    # A server that stores sessions on disk keeps them in ./collab-data by
    # default: point it (and its working directory) at a throwaway directory.
    env = child_env(COLLAB_TRIO_DATA_DIR=str(Path(workdir) / "collab-data"))
    running = start_server_output(env=env, cwd=workdir, timeout=SERVER_START_TIMEOUT_S)
    return running.output, running.port


def error_lines(server: ProcessOutput) -> list[str]:
    """Log lines that show the server hit an error or an exception."""
    return [line for line in server.lines if " ERROR " in line or "Traceback" in line]


# ---------------------------------------------------------------------------
# The scenario runner


@attrs.define(eq=False)
class Expect:
    """One thing a client must receive during a step: a message, or the end of its connection."""

    peer: Peer
    what: str
    check: Check | None  # problems with a message (none: it matches); None expects a close
    close_code: int | None = None
    on_match: Callable[[Message], None] | None = None


@attrs.define(eq=False)
class Step:
    """Sends what it needs to in ``begin`` and registers what each client must receive."""

    name: str
    begin: Callable[[Runner], None]
    # False: each client gets its expected messages in exactly the listed order.
    any_order: bool = False


class Peer(QObject):
    """One Optiverse-like client: a QWebSocket in the shared event loop."""

    def __init__(self, runner: Runner, user_id: str) -> None:
        super().__init__()
        self.runner = runner
        self.user_id = user_id
        self.ws: QWebSocket | None = None
        self.connected = False
        # Every seq one client receives (relayed commands, acks) must be larger than the last.
        self.last_seq = 0

    def __str__(self) -> str:
        return repr(self.user_id)

    def open(self, url: QUrl) -> None:
        """Connect (again) with a fresh QWebSocket."""
        if self.ws is not None:
            self.ws.deleteLater()
        ws = QWebSocket(parent=self)
        self.ws = ws
        # Each slot checks the socket is still current: an old one may still emit while it is deleted.
        ws.connected.connect(lambda: self._on_connected(ws))
        ws.disconnected.connect(lambda: self._on_disconnected(ws))
        ws.errorOccurred.connect(lambda error: self._on_error(ws, error))
        ws.textMessageReceived.connect(lambda text: self._on_text(ws, text))
        ws.binaryMessageReceived.connect(lambda data: self._on_binary(ws, data))
        ws.open(url)

    def send(self, message: Message) -> None:
        """Send one JSON text frame."""
        if not self.connected or self.ws is None:
            self.runner.fail(f"{self} must send {message.get('type')} but is not connected")
            return
        self.ws.sendTextMessage(json.dumps(message, ensure_ascii=False))

    def close(self) -> None:
        """Start the closing handshake with 1000."""
        if self.ws is not None:
            self.ws.close(NORMAL_CLOSE, "integration test: leaving")

    def is_unconnected(self) -> bool:
        """True when there is no socket or it is fully closed."""
        return self.ws is None or self.ws.state() == QAbstractSocket.SocketState.UnconnectedState

    def _on_connected(self, ws: QWebSocket) -> None:
        if ws is self.ws:
            self.connected = True

    def _on_disconnected(self, ws: QWebSocket) -> None:
        if ws is not self.ws:
            return
        was_connected, self.connected = self.connected, False
        self.runner.on_disconnected(
            self, was_connected, close_code_of(ws), ws.closeReason(), ws.errorString()
        )

    def _on_error(self, ws: QWebSocket, error: QAbstractSocket.SocketError) -> None:
        if ws is self.ws:
            self.runner.on_socket_error(self, f"{error.name}: {ws.errorString()}")

    def _on_text(self, ws: QWebSocket, text: str) -> None:
        if ws is self.ws:
            self.runner.on_text(self, text)

    def _on_binary(self, ws: QWebSocket, data: Any) -> None:
        if ws is self.ws:
            self.runner.fail(f"{self} got a binary frame of {len(data)} bytes (the protocol is text only)")


class Runner(QObject):
    """Runs steps one after another inside the Qt event loop, each with a deadline."""

    def __init__(self, peers: list[Peer], report: Report, timeout: float) -> None:
        super().__init__()
        self.peers = peers
        self.report = report
        self.timeout = timeout
        self.steps: list[Step] = []
        self.failure: str | None = None
        self.state = "idle"  # idle -> running -> cleanup -> done
        self.detail = ""  # what the current step reports on its PASS line
        self.post_checks: list[Callable[[], str | None]] = []
        self._index = -1
        self._step: Step | None = None
        self._pending: dict[Peer, list[Expect]] = {}
        self._barrier_started = False
        self._started_at = 0.0
        self._step_timer = self._timer(self._on_step_timeout)
        self._cleanup_timer = self._timer(self._force_quit)
        self._safety_timer = self._timer(self._on_safety_timeout)

    def _timer(self, slot: Callable[[], None]) -> QTimer:
        timer = QTimer(self)
        timer.setTimerType(Qt.TimerType.PreciseTimer)
        timer.setSingleShot(True)
        timer.timeout.connect(slot)
        return timer

    # -- driving -------------------------------------------------------------

    def run(self, steps: list[Step]) -> None:
        """Start the first step once the event loop runs."""
        self.steps = steps
        self.state = "running"
        self._safety_timer.start(int(((len(steps) + 1) * self.timeout + SAFETY_MARGIN_S) * 1000))
        QTimer.singleShot(0, self._next_step)

    def expect(
        self,
        peer: Peer,
        what: str,
        check: Check,
        on_match: Callable[[Message], None] | None = None,
    ) -> None:
        """``peer`` must receive a message that ``check`` finds no problem with."""
        self._pending.setdefault(peer, []).append(Expect(peer, what, check, on_match=on_match))

    def expect_close(self, peer: Peer, code: int) -> None:
        """``peer``'s connection must end with close code ``code``."""
        self._pending.setdefault(peer, []).append(
            Expect(peer, f"disconnect with close code {code}", None, close_code=code)
        )

    def _next_step(self) -> None:
        if self.state != "running":
            return
        self._index += 1
        if self._index >= len(self.steps):
            self._safety_timer.stop()
            self._cleanup()
            return
        self._step = self.steps[self._index]
        self._pending = {}
        self.post_checks = []
        self.detail = ""
        self._barrier_started = False
        self._started_at = time.monotonic()
        self._step_timer.start(int(self.timeout * 1000))
        try:
            self._step.begin(self)
        except Exception as exc:  # a bug in this tool: report it as the step's failure
            self.fail(f"the step itself crashed: {exc!r}")
            return
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.state != "running" or any(self._pending.values()):
            return
        if not self._barrier_started:
            # A ping/pong round trip per client: whatever the server queued for a
            # client before answering its ping arrives before the pong, so an
            # extra message (an echo of one's own command, a duplicate) shows up now.
            self._barrier_started = True
            peers = [peer for peer in self.peers if peer.connected]
            for peer in peers:
                self.expect(peer, "pong (barrier)", check_pong)
            for peer in peers:
                peer.send({"type": "ping"})
            if peers:
                return
        for check in self.post_checks:
            problem = check()
            if problem:
                self.fail(problem)
                return
        self._step_timer.stop()
        assert self._step is not None
        self.report.add(self._step.name, "PASS", time.monotonic() - self._started_at, self.detail)
        QTimer.singleShot(0, self._next_step)

    def fail(self, reason: str) -> None:
        """End the run: the current step fails, the rest are skipped, every client disconnects."""
        if self.state != "running":
            return
        self._step_timer.stop()
        self._safety_timer.stop()
        name = self._step.name if self._step is not None else "(before the first step)"
        self.failure = f"{name}: {reason}"
        self.report.add(name, "FAIL", time.monotonic() - self._started_at, reason)
        self.report.skip([step.name for step in self.steps[self._index + 1:]])
        self._cleanup()

    def interrupt(self) -> None:
        """Ctrl+C or SIGTERM: fail, but still close every client politely."""
        self.fail("interrupted")

    # -- events from the clients ---------------------------------------------

    def on_text(self, peer: Peer, text: str) -> None:
        """Match one text frame against what ``peer`` must receive now."""
        if self.state != "running":
            return
        try:
            message = json.loads(text)
        except ValueError as exc:
            self.fail(f"{peer} got invalid JSON ({exc}): {text[:200]!r}")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.fail(f"{peer} got something that is not an object with a string type: {text[:200]!r}")
            return
        kind = message["type"]
        if kind in ("command", "ack"):
            seq = message.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                self.fail(f"{peer} got a {kind} whose seq is {seq!r}: {short(message)}")
                return
            if seq <= peer.last_seq:
                self.fail(f"{peer} got a {kind} with seq {seq} after seq {peer.last_seq}: seq must increase")
                return
            peer.last_seq = seq
            if kind == "command" and message.get("user_id") == peer.user_id:
                self.fail(f"{peer} received its own command back (seq {seq}): {short(message)}")
                return
        self._match(peer, message)

    def _match(self, peer: Peer, message: Message) -> None:
        assert self._step is not None
        expects = self._pending.get(peer, [])
        candidates = expects if self._step.any_order else expects[:1]
        closest: tuple[Expect, list[str]] | None = None
        for expect in candidates:
            if expect.check is None:
                continue
            problems = expect.check(message)
            if not problems:
                expects.remove(expect)
                if expect.on_match is not None:
                    expect.on_match(message)
                self._maybe_complete()
                return
            if closest is None:
                closest = (expect, problems)
        if closest is None:
            waiting = ", then ".join(e.what for e in expects) or "nothing"
            self.fail(f"{peer} got an unexpected {message['type']} (waiting for {waiting}): {short(message)}")
        else:
            expect, problems = closest
            self.fail(
                f"{peer} expected {expect.what}, got {message['type']}: "
                f"{'; '.join(problems)}; message: {short(message)}"
            )

    def on_disconnected(self, peer: Peer, was_connected: bool, code: int, reason: str, error: str) -> None:
        """A client's connection ended: expected in this step, or a failure."""
        if self.state == "cleanup":
            self._quit_if_all_closed()
            return
        if self.state != "running":
            return
        if not was_connected:
            # Qt may report the disconnect before errorOccurred: take the error from the socket.
            self.fail(f"{peer} could not connect: {error or f'close code {code}'}")
            return
        assert self._step is not None
        expects = self._pending.get(peer, [])
        candidates = expects if self._step.any_order else expects[:1]
        described = f"close code {code}" + (f" ({reason})" if reason else "")
        for expect in candidates:
            if expect.check is None:
                if code != expect.close_code:
                    self.fail(f"{peer} disconnected with {described}, expected {expect.close_code}")
                    return
                expects.remove(expect)
                self._maybe_complete()
                return
        waiting = ", then ".join(e.what for e in expects) or "nothing"
        self.fail(f"{peer} was disconnected unexpectedly: {described} (waiting for {waiting})")

    def on_socket_error(self, peer: Peer, description: str) -> None:
        """Before a client is connected a socket error is the failure; later, disconnected follows."""
        if self.state == "running" and not peer.connected:
            self.fail(f"{peer} could not connect: {description}")

    def _on_step_timeout(self) -> None:
        waiting = "; ".join(
            f"{peer}: {', then '.join(e.what for e in expects)}"
            for peer, expects in self._pending.items()
            if expects
        )
        self.fail(f"timed out after {self.timeout:g}s waiting for {waiting or 'the step to end'}")

    def _on_safety_timeout(self) -> None:
        self.fail("safety timeout: the run took far longer than its steps allow")
        self._force_quit()

    # -- the end ---------------------------------------------------------------

    def _cleanup(self) -> None:
        """Close whatever is still connected, then leave the event loop."""
        self.state = "cleanup"
        for peer in self.peers:
            if peer.connected:
                peer.close()
            elif peer.ws is not None and not peer.is_unconnected():
                peer.ws.abort()  # still connecting
        self._cleanup_timer.start(int(self.timeout * 1000))
        self._quit_if_all_closed()

    def _quit_if_all_closed(self) -> None:
        if all(peer.is_unconnected() for peer in self.peers):
            self._quit()

    def _force_quit(self) -> None:
        for peer in self.peers:
            if peer.ws is not None and not peer.is_unconnected():
                peer.ws.abort()
        self._quit()

    def _quit(self) -> None:
        if self.state != "done":
            self.state = "done"
            self._cleanup_timer.stop()
            QCoreApplication.quit()


# ---------------------------------------------------------------------------
# Message checks (each returns a list of problems; empty means the message is right)


def type_problems(message: Message, expected_type: str) -> list[str]:
    """A problem when the message has another type."""
    if message.get("type") != expected_type:
        return [f"type is {message.get('type')!r}, expected {expected_type!r}"]
    return []


def field_problems(message: Message, **expected: Any) -> list[str]:
    """A problem for each field that differs from ``expected`` (a missing field differs)."""
    missing = object()
    problems = []
    for key, value in expected.items():
        got = message.get(key, missing)
        if got is missing:
            problems.append(f"{key} is missing, expected {value!r}")
        elif got != value or type(got) is not type(value):
            problems.append(f"{key} is {got!r}, expected {value!r}")
    return problems


def check_pong(message: Message) -> list[str]:
    """A pong with a UTC timestamp."""
    return type_problems(message, "pong") or timestamp_problems(message.get("timestamp"), "timestamp")


def users_problems(users: object, members: list[Peer]) -> list[str]:
    """``users`` must list ``members`` in join order, the first one as host."""
    if not isinstance(users, list) or not all(isinstance(user, dict) for user in users):
        return [f"users is {short(users)}, not a list of objects"]
    problems = []
    got = [(user.get("user_id"), user.get("is_host")) for user in users]
    expected = [(peer.user_id, index == 0) for index, peer in enumerate(members)]
    if got != expected:
        problems.append(f"users (user_id, is_host) are {got}, expected {expected}")
    for user in users:
        problems += timestamp_problems(user.get("connected_at"), f"connected_at of {user.get('user_id')!r}")
    return problems


def relay_problems(command: Message, sender: Peer, seq: int | None, op_id: Any, message: Message) -> list[str]:
    """``command`` relayed unchanged, stamped with its true sender and ``seq`` (any seq if None)."""
    problems = type_problems(message, "command")
    if problems:
        return problems
    if message.get("command") != command:
        problems.append(f"command is {short(message.get('command'))}, expected {short(command)}")
    problems += field_problems(message, user_id=sender.user_id)
    if seq is not None:
        problems += field_problems(message, seq=seq)
    problems += timestamp_problems(message.get("timestamp"), "timestamp")
    if op_id is not None:
        problems += field_problems(message, op_id=op_id)
    elif "op_id" in message:
        problems.append(f"op_id {message['op_id']!r} present, but the sender gave none")
    return problems


def ack_problems(seq: int | None, op_id: Any, message: Message) -> list[str]:
    """An ack of ``seq`` (any seq if None), carrying ``op_id`` when one was given."""
    problems = type_problems(message, "ack")
    if problems:
        return problems
    if seq is not None:
        problems += field_problems(message, seq=seq)
    if op_id is not None:
        problems += field_problems(message, op_id=op_id)
    elif "op_id" in message:
        problems.append(f"op_id {message['op_id']!r} present, but the sender gave none")
    return problems


def exact_problems(expected: Message, message: Message) -> list[str]:
    """The message must be exactly ``expected``."""
    problems = type_problems(message, expected["type"])
    if problems:
        return problems
    if message != expected:
        return [f"expected exactly {short(expected)}"]
    return []


# ---------------------------------------------------------------------------
# The scenario: the workflow, and the model of what the server must hold


class Scenario:
    """Builds the steps and keeps the expected presence and document up to date as they run."""

    def __init__(self, base_url: str, session_id: str, peers: list[Peer], report: Report) -> None:
        self.base_url = base_url
        self.report = report
        self.session_id = session_id
        self.peers = peers
        self.members: list[Peer] = []  # join order; the first is the host
        self.items: dict[str, Message] = {}  # the expected session document, in insertion order
        self.written = False
        self.version = 0  # a brand-new session starts at 0
        self.epoch: str | None = None

    def steps(self) -> list[Step]:
        """The whole workflow for the number of peers given."""
        peers = self.peers

        def by(index: int) -> Peer:
            return peers[index % len(peers)]

        rejoiner = peers[1]
        steps = [self.join(peers[0]), self.sync(peers[0], "sync:request on the new session")]
        steps += [self.join(peer) for peer in peers[1:]]
        steps += [
            self.command(
                by(0), "add_item", "lens", "lens-1",
                {"x_mm": 10.0, "y_mm": 20.0, "angle_deg": 0.0, "focal_length_mm": 100.0, "name": "L1"},
            ),
            self.command(
                by(1), "add_item", "mirror", "mirror-1",
                {"x_mm": -50.0, "y_mm": 0.0, "angle_deg": 45.0, "coating": "silver", "name": "M1"},
                op_id="mirror-1-add",
            ),
            self.command(
                by(2), "add_item", "source", "source-1",
                {"x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0, "wavelength_nm": 633.0},
            ),
            self.command(
                by(3), "move_item", "lens", "lens-1",
                {"x_mm": 15.5, "y_mm": -3.25, "angle_deg": 45.0},
                spoof=True,
            ),
            # Only x_mm, y_mm and angle_deg are merged: the name must stay "L1".
            self.command(
                by(4), "move_item", "lens", "lens-1", {"angle_deg": 90.0, "name": "not merged"},
                label="partial ",
            ),
            self.command(
                by(5), "update_item", "mirror", "mirror-1",
                {"x_mm": -50.0, "y_mm": 5.0, "angle_deg": 30.0, "reflectivity": 0.5, "name": "M1b"},
                op_id=7,
            ),
            self.command(by(6), "remove_item", "source", "source-1", {}),
            self.concurrent_adds(),
            self.sync(by(len(peers) - 1), "sync:request after the edits"),
            self.cursor(by(2)),
            self.leave(rejoiner),
            self.join(rejoiner, again=True),
            self.sync(rejoiner, "sync:request after rejoin"),
            self.command(rejoiner, "move_item", "mirror", "mirror-1", {"x_mm": -40.0, "y_mm": 7.5}),
            self.sync(peers[0], "sync:request at the end"),
        ]
        # After the rejoin, the rejoiner is the newest member: everyone leaves in join order.
        for peer in [peers[0], *peers[2:], rejoiner]:
            steps.append(self.leave(peer, final=True))
        return steps

    # -- the model -------------------------------------------------------------

    def relayed(self, command: Message) -> Message:
        """The command as the others receive it: an update of an existing item
        carries the merged item (one editor at a time here, so every field it
        sends counts; those it leaves out keep their values)."""
        existing = self.items.get(command["item_id"])
        if command["action"] != "update_item" or existing is None:
            return command
        merged = {k: v for k, v in existing.items() if k not in ("uuid", "item_type")}
        return {**command, "data": {**merged, **(command.get("data") or {})}}

    def apply(self, command: Message) -> None:
        """What docs/PROTOCOL.md "Session document" says a command does to the document."""
        action, item_id, data = command["action"], command["item_id"], command.get("data") or {}
        self.written = True
        if action == "add_item":
            self.items[item_id] = {**data, "uuid": item_id, "item_type": command["item_type"]}
        elif action == "move_item":
            if item_id in self.items:
                for field in ("x_mm", "y_mm", "angle_deg"):
                    if field in data:
                        self.items[item_id][field] = data[field]
        elif action == "update_item":
            existing = self.items.get(item_id, {})
            item_type = existing.get("item_type", command.get("item_type"))
            merged = {k: v for k, v in existing.items() if k not in ("uuid", "item_type")}
            self.items[item_id] = {**merged, **data, "uuid": item_id, "item_type": item_type}
        elif action == "remove_item":
            self.items.pop(item_id, None)

    def remember_ack(self, message: Message) -> None:
        """The first connection:ack tells the session's epoch."""
        if self.epoch is None:
            self.epoch = message.get("epoch")

    # -- presence steps --------------------------------------------------------

    def join(self, peer: Peer, *, again: bool = False) -> Step:
        """``peer`` connects: it gets the ack, everyone already there gets user:joined."""
        role = " (first: host)" if not again and peer is self.peers[0] else ""
        name = f"{'rejoin' if again else 'join'} {peer}{role}"

        def begin(runner: Runner) -> None:
            self.members.append(peer)  # a (re)joining user goes to the back of the line
            members = list(self.members)
            runner.expect(
                peer, "connection:ack",
                functools.partial(self.ack_problems, peer, members),
                on_match=self.remember_ack,
            )
            for other in members[:-1]:
                runner.expect(
                    other, f"user:joined {peer}", functools.partial(self.joined_problems, peer, members)
                )
            peer.open(client_url(self.base_url, self.session_id, peer.user_id))
            runner.detail = f"{len(members)} user(s), host {members[0]}, version {self.version}"

        return Step(name, begin)

    def ack_problems(self, peer: Peer, members: list[Peer], message: Message) -> list[str]:
        """The connection:ack of ``peer`` when ``members`` are in the session."""
        problems = type_problems(message, "connection:ack")
        if problems:
            return problems
        problems += field_problems(
            message,
            session_id=self.session_id,
            user_id=peer.user_id,
            is_host=members[0] is peer,
            version=self.version,
        )
        problems += users_problems(message.get("users"), members)
        epoch = message.get("epoch")
        if not isinstance(epoch, str) or not epoch:
            problems.append(f"epoch is {epoch!r}, not a non-empty string")
        elif self.epoch is not None and epoch != self.epoch:
            problems.append(f"epoch is {epoch!r}, but the session's epoch was {self.epoch!r}")
        interval = message.get("heartbeat_interval_s")
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0:
            problems.append(f"heartbeat_interval_s is {interval!r}, not a positive number")
        if not isinstance(message.get("server"), dict):
            problems.append(f"server is {message.get('server')!r}, not an object")
        problems += timestamp_problems(message.get("timestamp"), "timestamp")
        return problems

    def joined_problems(self, peer: Peer, members: list[Peer], message: Message) -> list[str]:
        """user:joined for ``peer``, with the whole user list."""
        problems = type_problems(message, "user:joined")
        if problems:
            return problems
        problems += field_problems(message, user_id=peer.user_id)
        problems += timestamp_problems(message.get("timestamp"), "timestamp")
        problems += users_problems(message.get("users"), members)
        return problems

    def leave(self, peer: Peer, *, final: bool = False) -> Step:
        """``peer`` closes with 1000; the others get user:left (and host:changed if it was host)."""
        name = f"{'disconnect' if final else 'leave'} {peer}"

        def begin(runner: Runner) -> None:
            was_host = self.members[0] is peer
            self.members.remove(peer)
            remaining = list(self.members)
            runner.expect_close(peer, 1000)
            for other in remaining:
                runner.expect(
                    other, f"user:left {peer}", functools.partial(left_problems, peer, remaining),
                    on_match=functools.partial(self.note_left_hosts, remaining),
                )
                if was_host:
                    runner.expect(
                        other, f"host:changed to {remaining[0]}",
                        functools.partial(host_changed_problems, remaining[0]),
                    )
            peer.close()
            if was_host and remaining:
                runner.detail = f"host is now {remaining[0]}"
            runner.detail += f"{', ' if runner.detail else ''}{len(remaining)} user(s) left"

        return Step(name, begin)

    def note_left_hosts(self, remaining: list[Peer], message: Message) -> None:
        """Note a user:left whose (extra) user list disagrees with who is host afterwards."""
        users = message.get("users")
        if not remaining or not isinstance(users, list):
            return
        hosts = [user.get("user_id") for user in users if isinstance(user, dict) and user.get("is_host")]
        if hosts != [remaining[0].user_id]:
            self.report.note(
                "when the host leaves, user:left carries a `users` list (a field PROTOCOL.md does "
                f"not give user:left) that marks {hosts or 'nobody'} as host instead of the promoted "
                "user; only the host:changed that follows names the new host"
            )

    # -- document steps --------------------------------------------------------

    def command(
        self,
        sender: Peer,
        action: str,
        item_type: str,
        item_id: str,
        data: Message,
        *,
        op_id: Any = None,
        spoof: bool = False,
        label: str = "",
    ) -> Step:
        """``sender`` sends one command; every other member gets it relayed, the sender an ack."""
        name = f"{label}{action} {item_id} by {sender}"
        if op_id is not None:
            name += f" (op_id {op_id!r})"
        if spoof:
            name += " (spoofed user_id)"

        def begin(runner: Runner) -> None:
            command = {"action": action, "item_type": item_type, "item_id": item_id, "data": data}
            message: Message = {"type": "command", "command": command, "timestamp": utc_now()}
            if op_id is not None:
                message["op_id"] = op_id
            if spoof:
                message["user_id"] = SPOOFED_USER_ID  # the server must stamp the true sender
            seq = self.version + 1
            others = [peer for peer in self.members if peer is not sender]
            relayed = self.relayed(command)
            for other in others:
                runner.expect(
                    other, f"command {action} {item_id} seq {seq} from {sender}",
                    functools.partial(relay_problems, relayed, sender, seq, op_id),
                )
            runner.expect(sender, f"ack seq {seq}", functools.partial(ack_problems, seq, op_id))
            sender.send(message)
            self.version = seq
            self.apply(command)
            runner.detail = f"seq {seq}, relayed to {len(others)}"

        return Step(name, begin)

    def concurrent_adds(self) -> Step:
        """Every member adds an item at the same moment; seqs decide the order, and all must agree."""

        def begin(runner: Runner) -> None:
            senders = list(self.members)
            first, last = self.version + 1, self.version + len(senders)
            commands = {
                peer: {
                    "action": "add_item",
                    "item_type": "beam_splitter",
                    "item_id": f"bs-{index}",
                    "data": {"x_mm": 100.0 + 10 * index, "y_mm": 0.0, "angle_deg": 45.0, "ratio": 0.5},
                }
                for index, peer in enumerate(senders)
            }
            acked: dict[Peer, int] = {}
            relayed: dict[tuple[Peer, Peer], int] = {}

            def in_range(message: Message) -> list[str]:
                seq = message.get("seq")
                return [] if isinstance(seq, int) and first <= seq <= last else [
                    f"seq {seq!r} is outside {first}..{last}"
                ]

            def relay(command: Message, sender: Peer, message: Message) -> list[str]:
                return relay_problems(command, sender, None, None, message) or in_range(message)

            def ack(message: Message) -> list[str]:
                return ack_problems(None, None, message) or in_range(message)

            for sender in senders:
                for other in senders:
                    if other is not sender:
                        runner.expect(
                            other, f"command add_item {commands[sender]['item_id']} from {sender}",
                            functools.partial(relay, commands[sender], sender),
                            on_match=lambda m, o=other, s=sender: relayed.__setitem__((o, s), m["seq"]),
                        )
                runner.expect(
                    sender, "ack", ack, on_match=lambda m, s=sender: acked.__setitem__(s, m["seq"])
                )

            def settle() -> str | None:
                if sorted(acked.values()) != list(range(first, last + 1)):
                    return f"acked seqs are {sorted(acked.values())}, expected {first}..{last}"
                for (other, sender), seq in relayed.items():
                    if seq != acked[sender]:
                        return f"{other} got {sender}'s command as seq {seq}, but {sender} was acked seq {acked[sender]}"
                order = sorted(senders, key=acked.__getitem__)
                for sender in order:
                    self.apply(commands[sender])
                self.version = last
                runner.detail = f"seqs {first}..{last}, applied in order " + ", ".join(map(str, order))
                return None

            runner.post_checks.append(settle)
            for sender in senders:
                message = {"type": "command", "command": commands[sender], "timestamp": utc_now()}
                sender.send(message)

        return Step(f"concurrent add_item by all {len(self.peers)} clients", begin, any_order=True)

    def sync(self, peer: Peer, name: str) -> Step:
        """``peer`` sends sync:request; the sync:state must hold exactly the expected document."""

        def begin(runner: Runner) -> None:
            expected = [dict(item) for item in self.items.values()] if self.written else None
            version = self.version
            runner.expect(peer, "sync:state", functools.partial(self.state_problems, expected, version))
            # Optiverse sends its local version; the server ignores it.
            peer.send({"type": "sync:request", "local_version": 0})
            runner.detail = (
                "state null" if expected is None else f"{len(expected)} item(s) at version {version}"
            )

        return Step(f"{name} by {peer}", begin)

    def state_problems(self, expected: list[Message] | None, version: int, message: Message) -> list[str]:
        """A sync:state with ``expected`` items (None: state null) at ``version``."""
        problems = type_problems(message, "sync:state")
        if problems:
            return problems
        problems += field_problems(message, version=version, from_server=True)
        if self.epoch is not None:
            problems += field_problems(message, epoch=self.epoch)
        state = message.get("state", "(missing)")
        if expected is None:
            if state is not None:
                problems.append(f"state is {short(state)}, expected null for a session never written")
            return problems
        if not isinstance(state, dict):
            return problems + [f"state is {short(state)}, not an object"]
        items = state.get("items")
        if items != expected:
            problems.append(f"state.items differ: {items_difference(items, expected)}")
        problems += [f"state.{p}" for p in field_problems(state, version=version)]
        problems += timestamp_problems(state.get("timestamp"), "state.timestamp")
        return problems

    def cursor(self, sender: Peer) -> Step:
        """A cursor reaches every other member, stamped with the true sender."""

        def begin(runner: Runner) -> None:
            sent = {"type": "cursor", "x": 12.5, "y": -4.25, "user_id": SPOOFED_USER_ID}
            relayed = {**sent, "user_id": sender.user_id}
            others = [peer for peer in self.members if peer is not sender]
            for other in others:
                runner.expect(other, f"cursor from {sender}", functools.partial(exact_problems, relayed))
            sender.send(sent)
            runner.detail = f"relayed to {len(others)}"

        return Step(f"cursor from {sender} (spoofed user_id)", begin)


def items_difference(items: object, expected: list[Message]) -> str:
    """Say how ``items`` differ from ``expected``: which uuids, or the first differing item."""
    expected_ids = [item["uuid"] for item in expected]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        return f"got {short(items)}, expected a list of {len(expected)} item objects"
    got_ids = [item.get("uuid") for item in items]
    if got_ids != expected_ids:
        return f"uuids in order are {got_ids}, expected {expected_ids}"
    for got, want in zip(items, expected):
        if got != want:
            return f"item {want['uuid']!r} is {short(got)}, expected {short(want)}"
    return "(no difference found)"


def left_problems(peer: Peer, remaining: list[Peer], message: Message) -> list[str]:
    """user:left for ``peer`` with a reason."""
    problems = type_problems(message, "user:left")
    if problems:
        return problems
    problems += field_problems(message, user_id=peer.user_id)
    problems += timestamp_problems(message.get("timestamp"), "timestamp")
    reason = message.get("reason")
    if not isinstance(reason, str) or not reason:
        problems.append(f"reason is {reason!r}, not a non-empty string")
    users = message.get("users")
    if users is not None:
        # Not in PROTOCOL.md's user:left; when sent, it must at least name the right users.
        if not isinstance(users, list) or not all(isinstance(user, dict) for user in users):
            problems.append(f"users is {short(users)}, not a list of objects")
        elif [user.get("user_id") for user in users] != [p.user_id for p in remaining]:
            got = [user.get("user_id") for user in users]
            problems.append(f"users are {got}, expected {[p.user_id for p in remaining]}")
    return problems


def host_changed_problems(new_host: Peer, message: Message) -> list[str]:
    """host:changed naming ``new_host``."""
    return type_problems(message, "host:changed") or field_problems(message, user_id=new_host.user_id)


# ---------------------------------------------------------------------------
# Command line


def client_count(text: str) -> int:
    """--clients: a whole number from 2 to 5."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 2 <= value <= len(USER_IDS):
        raise argparse.ArgumentTypeError(f"must be 2 to {len(USER_IDS)}, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """--timeout: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def base_url(text: str) -> str:
    """--url: ws://HOST:PORT (the /ws/{session}/{user} part is added per client)."""
    url = QUrl(text)
    if url.scheme() not in ("ws", "wss") or not url.host():
        raise argparse.ArgumentTypeError(f"expected ws://HOST:PORT, got {text!r}")
    if "/ws/" in url.path() + "/":
        raise argparse.ArgumentTypeError("give the server's base URL ws://HOST:PORT, without /ws/...")
    return text.rstrip("/")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options."""
    parser = argparse.ArgumentParser(
        prog="collab_integration.py",
        description="Layer 4: several PyQt6 QWebSocket clients through the whole collab-trio workflow.",
    )
    parser.add_argument(
        "--clients", type=client_count, default=3,
        help=f"number of clients, 2 to {len(USER_IDS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--url", type=base_url,
        help="use this running server (ws://HOST:PORT) instead of starting one on a free port",
    )
    parser.add_argument(
        "--timeout", type=positive_seconds, default=5.0,
        help="seconds each step may take (default: %(default)g)",
    )
    return parser.parse_args(argv)


def run_scenario(app: QCoreApplication, runner: Runner, steps: list[Step]) -> None:
    """Drive the steps in Qt's event loop until they are done or one fails."""
    # Python runs signal handlers only between bytecodes, so wake it regularly while Qt waits.
    previous = {sig: signal.signal(sig, lambda *_: runner.interrupt()) for sig in (signal.SIGINT, signal.SIGTERM)}
    wakeup = QTimer(runner)
    wakeup.timeout.connect(lambda: None)
    wakeup.start(SIGNAL_WAKEUP_MS)
    try:
        runner.run(steps)
        app.exec()
    finally:
        wakeup.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the workflow; return 0 on PASS, 1 on FAIL."""
    args = parse_args(argv)
    # Never crash on a console that can't show "✓" (in the server's log) or "zoë".
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    app = QCoreApplication.instance() or QCoreApplication(sys.argv[:1])
    session_id = f"integration-{secrets.token_hex(6)}"
    own_server = args.url is None
    report = Report(total=0)
    runner = Runner([], report, args.timeout)
    peers = [Peer(runner, user_id) for user_id in USER_IDS[: args.clients]]
    runner.peers = peers
    scenario = Scenario(args.url or "", session_id, peers, report)
    steps = scenario.steps()
    report.total = len(steps) + (2 if own_server else 0)
    target = "a server of its own" if own_server else args.url
    print(
        f"collab_integration: {args.clients} clients ({', '.join(repr(p.user_id) for p in peers)}), "
        f"session {session_id!r}, {target}, step timeout {args.timeout:g}s",
        flush=True,
    )

    failure: str | None = None
    server: ProcessOutput | None = None
    workdir = tempfile.TemporaryDirectory(prefix="collab-integration-")
    try:
        if own_server:
            started = time.monotonic()
            try:
                server, port = start_server(workdir.name)
            except (OSError, HarnessError) as exc:
                failure = f"start server: {str(exc).splitlines()[0]}"
                report.add("start server", "FAIL", time.monotonic() - started, str(exc))
                report.skip([step.name for step in steps])
            else:
                scenario.base_url = f"ws://127.0.0.1:{port}"
                report.add("start server", "PASS", time.monotonic() - started, f"{scenario.base_url}, pid {server.process.pid}")
        if failure is None:
            run_scenario(app, runner, steps)
            failure = runner.failure
    finally:
        if server is not None:
            started = time.monotonic()
            already_exited = server.process.poll() is not None
            status, killed = server.stop(signal.SIGTERM, SERVER_STOP_TIMEOUT_S)
            how = "terminated" if os.name == "nt" else "SIGTERM"
            if already_exited:
                how = "had already exited"
            elif killed:
                how = f"killed: still running {SERVER_STOP_TIMEOUT_S:g}s after {how}"
            seconds = time.monotonic() - started
            errors = error_lines(server)
            if os.name == "nt" and how == "terminated":
                report.add("stop server", "PASS", seconds, "terminated (exit status not checked on Windows)")
            elif status != 0 or how != "SIGTERM":
                problem = f"server exit status {status} ({how}), expected 0 after SIGTERM"
                report.add("stop server", "FAIL", seconds, problem)
                failure = failure or f"stop server: {problem}"
            elif errors:
                problem = f"server logged {len(errors)} error line(s), first: {errors[0]}"
                report.add("stop server", "FAIL", seconds, problem)
                failure = failure or f"stop server: {problem}"
            else:
                report.add("stop server", "PASS", seconds, "SIGTERM, exit status 0")
            if failure is not None:
                print(f"--- last {SERVER_LOG_TAIL} lines of the server's log ---", flush=True)
                for line in server.lines[-SERVER_LOG_TAIL:]:
                    print(f"server| {line}", flush=True)
        workdir.cleanup()

    print("", flush=True)
    print(f"summary: {args.clients} clients, session {session_id!r}", flush=True)
    print(report.table(), flush=True)
    if report.notes:
        print("notes (not failures):", flush=True)
        for text, count in report.notes.items():
            print(f"  - {text}" + (f" ({count} messages)" if count > 1 else ""), flush=True)
    verdict = "PASS" if failure is None else f"FAIL: {failure}"
    print(verdict, flush=True)
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
