"""Headless PyQt6 QWebSocket smoke client: talks to a collab-trio server the way Optiverse does.

Usage (needs the `qt` extra, i.e. PyQt6):
    collab-trio smoke URL [--session S] [--user U] [--interval SECONDS]
        [--duration SECONDS] [--echo] [--timeout SECONDS] [--cafile PEM]
    python tools/qt_smoke_client.py URL ...      (the same client)

Prints one line per step, then ``PASS`` or ``FAIL: <why>``; exits 0 only on PASS.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import time
from datetime import datetime, timedelta

# Must be set before Qt is imported: the client needs no display.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PyQt6.QtCore import QCoreApplication, QObject, Qt, QTimer, QUrl  # noqa: E402
from PyQt6.QtNetwork import QAbstractSocket, QSslCertificate, QSslConfiguration  # noqa: E402
from PyQt6.QtWebSockets import QWebSocket, QWebSocketProtocol  # noqa: E402

DEFAULT_SESSION = "smoke"
NORMAL_CLOSE = QWebSocketProtocol.CloseCode.CloseCodeNormal
# Extra time on top of duration + timeout before the safety timer gives up.
SAFETY_MARGIN_S = 10.0
# How often Python gets control back so a Ctrl+C handler can run inside Qt's event loop.
SIGNAL_WAKEUP_MS = 200


def build_url(base: str, session: str, user: str) -> QUrl:
    """Return ``base/ws/{session}/{user}``, or ``base`` itself if it already has a /ws/ path."""
    url = QUrl(base)
    path = url.path(QUrl.ComponentFormattingOption.FullyDecoded)
    if "/ws/" in path:
        return url
    # DecodedMode: the ids are raw text, so QUrl percent-encodes spaces, '%', '?', '#', ...
    url.setPath(f"{path.rstrip('/')}/ws/{session}/{user}", QUrl.ParsingMode.DecodedMode)
    return url


def ids_from_url(url: QUrl) -> tuple[str, str] | None:
    """Return the decoded (session_id, user_id) that follow ``/ws/`` in ``url``, if exactly two."""
    path = url.path(QUrl.ComponentFormattingOption.FullyDecoded)
    _, sep, rest = path.partition("/ws/")
    parts = rest.split("/")
    if not sep or len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


def parse_utc_timestamp(value: object) -> datetime | None:
    """Return ``value`` as an aware datetime if it is an ISO 8601 string in UTC, else None."""
    if not isinstance(value, str):
        return None
    # datetime.fromisoformat only accepts a trailing 'Z' from Python 3.11 on.
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    if stamp.utcoffset() != timedelta(0):
        return None
    return stamp


def close_code_of(ws: QWebSocket) -> int:
    """Return the socket's close code as a plain int."""
    code = ws.closeCode()
    # PyQt6 gives an enum member; stay lenient in case a code outside the enum comes back as int.
    return int(getattr(code, "value", code))


class SmokeClient(QObject):
    """One QWebSocket connection driven through connect, handshake, probes and a normal close."""

    def __init__(
        self,
        url: QUrl,
        *,
        expected_ids: tuple[str, str] | None,
        interval: float,
        duration: float,
        timeout: float,
        echo: bool,
        ssl_configuration: QSslConfiguration | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.expected_ids = expected_ids
        self.interval = interval
        self.duration = duration
        self.timeout = timeout
        self.echo = echo
        self.verdict: str | None = None  # "PASS" or "FAIL: ..."; set exactly once
        self.phase = "idle"  # idle -> connecting -> handshake -> running -> closing -> done
        self.step_name = ""  # what the step timer is waiting for
        self.started_at = time.monotonic()
        self.connected_at: float | None = None
        self.duration_over = False
        self.probes_sent = 0
        # Replies carry no id, so they match probes in send order: (number, text, sent_at).
        self.in_flight: collections.deque[tuple[int, str, float]] = collections.deque()

        self.ws = QWebSocket(parent=self)
        self.ws.connected.connect(self.on_connected)
        self.ws.disconnected.connect(self.on_disconnected)
        self.ws.errorOccurred.connect(self.on_error)
        self.ws.textMessageReceived.connect(self.on_text)
        self.ws.binaryMessageReceived.connect(self.on_binary)
        if ssl_configuration is not None:
            # Must be in place before open(): it is what the TLS handshake of wss:// trusts.
            self.ws.setSslConfiguration(ssl_configuration)

        self.step_timer = self.make_timer(self.on_step_timeout, single_shot=True)
        self.probe_timer = self.make_timer(self.send_probe, single_shot=False)
        self.duration_timer = self.make_timer(self.on_duration_over, single_shot=True)
        self.safety_timer = self.make_timer(self.on_safety_timeout, single_shot=True)

    def make_timer(self, slot, *, single_shot: bool) -> QTimer:
        """Return a precise timer owned by this object, connected to ``slot``."""
        timer = QTimer(self)
        # Coarse timers may fire 5% early or late, which would skew short --interval runs.
        timer.setTimerType(Qt.TimerType.PreciseTimer)
        timer.setSingleShot(single_shot)
        timer.timeout.connect(slot)
        return timer

    def log(self, text: str) -> None:
        """Print one timestamped step line right away."""
        print(f"[{time.monotonic() - self.started_at:6.2f}s] {text}", flush=True)

    # --- connection lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Open the connection and arm the overall safety timer."""
        self.started_at = time.monotonic()
        self.safety_timer.start(seconds_to_ms(self.duration + self.timeout + SAFETY_MARGIN_S))
        self.phase = "connecting"
        self.log(f"connecting to {self.url.toEncoded().data().decode()}")
        self.arm_step("connection")
        self.ws.open(self.url)

    def arm_step(self, name: str) -> None:
        """Fail unless the step ``name`` is over within --timeout."""
        self.step_name = name
        self.step_timer.start(seconds_to_ms(self.timeout))

    def on_connected(self) -> None:
        """Wait for the ack (collab) or start probing right away (echo)."""
        self.connected_at = time.monotonic()
        self.log("connected")
        if self.echo:
            self.start_running()
        else:
            self.phase = "handshake"
            self.arm_step("connection:ack")

    def start_running(self) -> None:
        """Send the first probe now, then one per interval, until the duration is over."""
        self.step_timer.stop()
        self.phase = "running"
        self.duration_timer.start(seconds_to_ms(self.duration))
        self.probe_timer.start(seconds_to_ms(self.interval))
        # Probing at once checks that the server answers straight after the handshake.
        self.send_probe()

    def on_duration_over(self) -> None:
        """Stop probing; close once the last probe is answered."""
        self.duration_over = True
        self.probe_timer.stop()
        self.log(f"duration of {self.duration:g}s over")
        if not self.in_flight:
            self.close_normally()

    def close_normally(self) -> None:
        """Start the closing handshake with 1000 and wait for the disconnected signal."""
        self.phase = "closing"
        self.log("closing with code 1000")
        self.arm_step("close handshake")
        self.ws.close(NORMAL_CLOSE, "smoke test done")

    def on_disconnected(self) -> None:
        """Pass after our own close; any other disconnect is a failure."""
        code, reason = close_code_of(self.ws), self.ws.closeReason()
        described = f"close code {code}" + (f" ({reason})" if reason else "")
        if self.phase == "done":
            if self.connected_at is not None:
                self.log(f"disconnected: {described}")
            QCoreApplication.quit()
        elif self.phase == "closing":
            self.log(f"disconnected: {described}")
            self.finish("PASS")
        elif self.connected_at is None:
            self.finish(f"FAIL: could not connect: {self.ws.errorString()}")
        else:
            lasted = time.monotonic() - self.connected_at
            self.finish(
                f"FAIL: disconnected after {lasted:.1f}s: "
                f"close code {code} ({reason or 'no reason given'})"
            )

    def on_error(self, error: QAbstractSocket.SocketError) -> None:
        """Log socket errors; before the connection is up, they are the failure."""
        message = self.ws.errorString()
        self.log(f"socket error: {error.name}: {message}")
        if self.connected_at is None:
            self.finish(f"FAIL: could not connect: {message}")
        # Once connected, the disconnected signal follows and reports the close code.

    def on_step_timeout(self) -> None:
        """The current step took longer than --timeout."""
        self.finish(f"FAIL: no {self.step_name} within {self.timeout:g}s")

    def on_safety_timeout(self) -> None:
        """Last resort so the client never hangs, whatever state it is in."""
        limit = self.safety_timer.interval() / 1000
        self.finish(f"FAIL: safety timeout: still running after {limit:g}s")
        self.ws.abort()
        QCoreApplication.quit()

    def interrupt(self) -> None:
        """Ctrl+C or SIGTERM: give up, but still close the socket politely."""
        self.finish("FAIL: interrupted")

    def finish(self, verdict: str) -> None:
        """Record the first verdict, stop probing and leave the event loop once closed."""
        if self.verdict is not None:
            return
        self.verdict = verdict
        previous, self.phase = self.phase, "done"
        for timer in (self.step_timer, self.probe_timer, self.duration_timer):
            timer.stop()
        connected = self.ws.state() == QAbstractSocket.SocketState.ConnectedState
        if connected and previous != "closing":
            # A failure while connected: say goodbye, then quit on disconnected or after a timeout.
            self.log("closing with code 1000 after the failure")
            self.ws.close(NORMAL_CLOSE, "smoke test failed")
            QTimer.singleShot(seconds_to_ms(self.timeout), self.force_quit)
        else:
            QCoreApplication.quit()

    def force_quit(self) -> None:
        """The peer did not finish the close handshake after a failure: drop the socket."""
        self.ws.abort()
        QCoreApplication.quit()

    # --- messages ---------------------------------------------------------------------

    def send_probe(self) -> None:
        """Send one ping (collab) or one JSON text message to be echoed back (echo)."""
        self.probes_sent += 1
        number = self.probes_sent
        if self.echo:
            # Non-ASCII on purpose: the echo must survive a UTF-8 round trip unchanged.
            payload = {"type": "smoke:echo", "n": number, "note": "Grüße ✓"}
            text = json.dumps(payload, ensure_ascii=False)
        else:
            text = json.dumps({"type": "ping"})
        self.in_flight.append((number, text, time.monotonic()))
        QTimer.singleShot(seconds_to_ms(self.timeout), lambda: self.check_answered(number))
        self.ws.sendTextMessage(text)

    def check_answered(self, number: int) -> None:
        """Fail if probe ``number`` is still waiting for its reply."""
        if self.phase != "done" and any(n == number for n, _, _ in self.in_flight):
            what = "echo" if self.echo else "pong"
            self.finish(f"FAIL: no {what} for probe #{number} within {self.timeout:g}s")

    def on_binary(self, data: bytes) -> None:
        """The protocol uses text frames only."""
        self.finish(f"FAIL: unexpected binary frame of {len(data)} bytes")

    def on_text(self, text: str) -> None:
        """Dispatch one text frame according to the current phase."""
        if self.phase == "done":
            return
        if self.echo:
            self.on_echo(text)
            return
        try:
            message = json.loads(text)
        except ValueError as exc:
            self.finish(f"FAIL: invalid JSON from server ({exc}): {text[:200]!r}")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.finish(f"FAIL: not an object with a string type: {text[:200]!r}")
        elif self.phase == "handshake":
            self.on_ack(message)
        elif message["type"] == "pong":
            self.on_pong(message)
        elif message["type"] == "error":
            self.finish(f"FAIL: server error {message.get('code')!r}: {message.get('message')!r}")
        else:
            # Other users' traffic in a shared session is normal; note it and carry on.
            self.log(f"received {message['type']} (ignored)")

    def on_ack(self, message: dict) -> None:
        """Check the first message is a connection:ack naming us and listing us among the users."""
        if message["type"] != "connection:ack":
            self.finish(f"FAIL: first message is {message['type']!r}, expected 'connection:ack'")
            return
        session_id, user_id = self.expected_ids
        for field, expected in (("session_id", session_id), ("user_id", user_id)):
            if message.get(field) != expected:
                got = message.get(field)
                self.finish(f"FAIL: connection:ack {field} is {got!r}, expected {expected!r}")
                return
        users = message.get("users")
        if not isinstance(users, list) or not any(
            isinstance(user, dict) and user.get("user_id") == user_id for user in users
        ):
            self.finish(f"FAIL: connection:ack users does not include {user_id!r}: {users!r}")
            return
        self.log(f"connection:ack: {len(users)} user(s), host={message.get('is_host')}")
        self.start_running()

    def take_reply(self) -> tuple[int, str, float] | None:
        """Pop the oldest probe awaiting a reply; a reply to nothing is a failure."""
        if not self.in_flight:
            self.finish("FAIL: reply received with no probe in flight")
            return None
        return self.in_flight.popleft()

    def on_pong(self, message: dict) -> None:
        """Check a pong's timestamp and report the round trip."""
        probe = self.take_reply()
        if probe is None:
            return
        _, _, sent_at = probe
        stamp = message.get("timestamp")
        if parse_utc_timestamp(stamp) is None:
            self.finish(f"FAIL: pong timestamp is not an ISO 8601 UTC string: {stamp!r}")
            return
        self.log(f"ping -> pong in {(time.monotonic() - sent_at) * 1000:.1f} ms")
        self.after_reply()

    def on_echo(self, text: str) -> None:
        """Check the echoed text is exactly what was sent."""
        probe = self.take_reply()
        if probe is None:
            return
        number, sent_text, sent_at = probe
        if text != sent_text:
            self.finish(f"FAIL: echo #{number} differs: sent {sent_text!r}, got {text[:200]!r}")
            return
        self.log(f"echo #{number} back in {(time.monotonic() - sent_at) * 1000:.1f} ms")
        self.after_reply()

    def after_reply(self) -> None:
        """Close once the duration is over and nothing is left in flight."""
        if self.duration_over and not self.in_flight and self.phase == "running":
            self.close_normally()


def seconds_to_ms(seconds: float) -> int:
    """Convert seconds to the whole milliseconds QTimer takes."""
    return max(0, round(seconds * 1000))


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds greater than zero."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("url", metavar="URL", help="ws://HOST:PORT, or a full .../ws/S/U URL")
    parser.add_argument("--session", default=DEFAULT_SESSION, help="session id (default: smoke)")
    parser.add_argument("--user", help="user id (default: qt-smoke-<pid>)")
    parser.add_argument("--interval", type=positive_seconds, default=5.0,
                        help="seconds between probes (default: 5)")
    parser.add_argument("--duration", type=positive_seconds, default=15.0,
                        help="seconds to stay connected (default: 15)")
    parser.add_argument("--timeout", type=positive_seconds, default=5.0,
                        help="seconds allowed per step (default: 5)")
    parser.add_argument("--echo", action="store_true",
                        help="talk to a plain echo server instead of collab-trio")
    parser.add_argument("--cafile", metavar="PEM",
                        help="also trust the CA certificate(s) in this PEM file for wss:// URLs")
    args = parser.parse_args(argv)
    if args.user is None:
        args.user = f"qt-smoke-{os.getpid()}"
    return args


def ssl_configuration_trusting(cafile: str) -> QSslConfiguration | None:
    """The default TLS configuration plus the CA certificates of ``cafile``; None if it has none."""
    certificates = QSslCertificate.fromPath(cafile)
    if not certificates:
        return None
    configuration = QSslConfiguration.defaultConfiguration()
    configuration.addCaCertificates(certificates)
    return configuration


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the smoke test; return 0 on PASS, 1 on FAIL."""
    args = parse_args(argv, prog)
    app = QCoreApplication.instance() or QCoreApplication(sys.argv[:1])
    url = build_url(args.url, args.session, args.user)
    ssl_configuration = None
    if args.cafile is not None:
        ssl_configuration = ssl_configuration_trusting(args.cafile)
        if ssl_configuration is None:
            print(f"FAIL: no PEM certificate could be read from --cafile {args.cafile}", flush=True)
            return 1
    client = SmokeClient(
        url,
        expected_ids=ids_from_url(url),
        interval=args.interval,
        duration=args.duration,
        timeout=args.timeout,
        echo=args.echo,
        ssl_configuration=ssl_configuration,
    )
    if not args.echo and client.expected_ids is None:
        print(f"FAIL: cannot find /ws/SESSION/USER in {url.toString()}", flush=True)
        return 1

    # Python runs signal handlers only between bytecodes, so wake it regularly while Qt waits.
    previous_handlers = {
        sig: signal.signal(sig, lambda *_: client.interrupt())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    wakeup = QTimer(client)
    wakeup.timeout.connect(lambda: None)
    wakeup.start(SIGNAL_WAKEUP_MS)
    try:
        QTimer.singleShot(0, client.start)
        app.exec()
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    verdict = client.verdict or "FAIL: event loop ended without a verdict"
    print(verdict, flush=True)
    return 0 if verdict == "PASS" else 1
