"""Stock Optiverse with tokens on: a real QWebSocket given only a server URL, as Optiverse builds it.

Optiverse (services/collaboration_service.py) connects to
`QUrl(f"{server_url}/ws/{session_id}/{user_id}")`: it can send neither a
query string nor a header, so the token goes into the server URL as a path
segment, `ws://HOST:PORT/t/TOKEN`. The client below does exactly that, in a
child process with a headless QCoreApplication, against a real
`collab-trio serve --tokens ... --debug`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from collab_trio.testing import START_TIMEOUT, child_env, server_process

TOKEN = "optiverse-lab-token-2718"
TOKENS_TOML = f'[tokens."{TOKEN}"]\nrole = "editor"\n'

OPTIVERSE_CLIENT = r"""
import sys
from PyQt6.QtCore import QCoreApplication, QTimer, QUrl
from PyQt6.QtWebSockets import QWebSocket

server_url, session_id, user_id = sys.argv[1:4]
app = QCoreApplication([])
ws = QWebSocket()
url = f"{server_url}/ws/{session_id}/{user_id}"  # as Optiverse's CollaborationService.connect_to_session

def received(text):
    if '"connection:ack"' in text:
        print("ACK", flush=True)
        ws.close()

def ended(*_):
    print(f"CLOSED {ws.closeCode().value} {ws.errorString()}", flush=True)
    app.quit()

ws.textMessageReceived.connect(received)
ws.disconnected.connect(ended)
QTimer.singleShot(20000, lambda: (print("TIMEOUT", flush=True), app.exit(2)))
ws.open(QUrl(url))
sys.exit(app.exec())
"""


async def optiverse_connects(server_url: str, session_id: str, user_id: str) -> str:
    """Run the client; its output."""
    pytest.importorskip("PyQt6.QtWebSockets")
    with trio.fail_after(START_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-c", OPTIVERSE_CLIENT, server_url, session_id, user_id],
            capture_stdout=True, stderr=subprocess.STDOUT, env=child_env(), check=False,
        )
    return result.stdout.decode("utf-8", "replace")


async def test_optiverse_server_url_with_a_token_segment(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML)
    async with server_process("--store", "memory", "--tokens", str(tokens), "--debug") as server:
        base = f"ws://127.0.0.1:{server.port}"
        # The server URL as typed into Optiverse's collaboration dialog, with and without a trailing slash.
        for server_url, user in [(f"{base}/t/{TOKEN}", "Ada Lovelace"), (f"{base}/t/{TOKEN}/", "grace")]:
            output = await optiverse_connects(server_url, "lab review", user)
            assert "ACK" in output, output
            await server.wait_for(f"User {user} joined session lab review")
        # A wrong token: refused at the upgrade, never joined.
        output = await optiverse_connects(f"{base}/t/not-the-token", "lab review", "mallory")
        assert "ACK" not in output and "CLOSED" in output, output
        await server.wait_for(r"Refused /t/\*\*\*/ws/lab%20review/mallory from .*: 401 missing or invalid token")
    assert "joined session lab review" in server.output
    assert TOKEN not in server.output and "not-the-token" not in server.output, server.output
