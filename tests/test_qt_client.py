"""End to end: the PyQt6 smoke client (tools/qt_smoke_client.py) against a real server process."""

from __future__ import annotations

import re
import signal


from collab_trio.testing import RunningServer, STOP_TIMEOUT as STOP_TIMEOUT_S

from .qt_tools import CLIENT_RUN_TIMEOUT_S, start_smoke_client, verdict_of

def test_smoke_client_passes(server: RunningServer) -> None:
    """The 15 s run: ack, a pong every second, no drop, then a clean 1000 close."""
    client = start_smoke_client(server, "--interval", "1", "--duration", "15")
    try:
        returncode = client.wait(CLIENT_RUN_TIMEOUT_S)
    finally:
        client.stop()
    output = client.text()
    assert returncode == 0, output
    assert verdict_of(client.lines) == "PASS", output
    assert any("connection:ack: 1 user(s), host=True" in line for line in client.lines), output
    pongs = [line for line in client.lines if "ping -> pong in" in line]
    assert len(pongs) >= 15, output
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
