"""A real PyQt6 QWebSocket against `collab-trio serve`: the ping the server
sends after a design to load tells it when the window had loaded it.

Stock Optiverse replaces its canvas with every `sync:state` it gets, in the
slot of `textMessageReceived`; QWebSocket answers a ping as it reads it, so
after that slot ran. The client below behaves like that, in a child process
with a headless QCoreApplication:

- "after": it adds an item in the event-loop turn after loading the
  document. Made after the load: the server must not correct it (a
  correction rebuilds the item as another's in Optiverse, whose edits it
  then no longer sends).
- "crossing": it sends its add right behind its `sync:request`, before the
  document arrives; loading the document wipes the add from its canvas, so
  the server must correct it (remove, then add as stored).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trio
from trio_websocket import open_websocket_url

from collab_trio.testing import START_TIMEOUT, child_env, server_process

CLIENT = r"""
import json, sys
from PyQt6.QtCore import QCoreApplication, QTimer, QUrl
from PyQt6.QtWebSockets import QWebSocket

server_url, session_id, user_id, mode = sys.argv[1:5]
app = QCoreApplication([])
ws = QWebSocket()
canvas, corrections, added = {}, [], []

def send(message):
    message["user_id"] = user_id  # as Optiverse's send_message
    ws.sendTextMessage(json.dumps(message))

def add(item_id):
    canvas[item_id] = {"x_mm": 1.0}
    added.append(item_id)
    send({"type": "command", "command": {"action": "add_item", "item_type": "lens", "item_id": item_id,
                                         "data": {"x_mm": 1.0, "item_uuid": item_id}}})

def received(text):
    message = json.loads(text)
    kind = message.get("type")
    if kind == "connection:ack":
        send({"type": "sync:request"})
        if mode == "crossing":
            add("C")  # before the document arrives
    elif kind == "sync:state" and message.get("state"):
        canvas.clear()  # the whole canvas replaced, as Optiverse does
        canvas.update({item["uuid"]: item for item in message["state"]["items"]})
        if mode == "after":
            QTimer.singleShot(0, lambda: add("A"))  # the next turn: after the load
    elif kind == "command":
        command = message["command"]
        if message.get("correction"):
            corrections.append(command["action"])
        if command["action"] == "remove_item":
            canvas.pop(command["item_id"], None)
        elif command["action"] == "add_item":
            canvas[command["item_id"]] = command["data"]

def report():
    print("RESULT " + json.dumps({"canvas": sorted(canvas), "corrections": corrections}), flush=True)
    ws.close()

ws.textMessageReceived.connect(received)
ws.disconnected.connect(app.quit)
QTimer.singleShot(3000, report)  # corrections are due 0.15 s after a change
QTimer.singleShot(20000, lambda: (print("TIMEOUT", flush=True), app.exit(2)))
ws.open(QUrl(f"{server_url}/ws/{session_id}/{user_id}"))
sys.exit(app.exec())
"""


async def run_client(url: str, session: str, user: str, mode: str) -> dict:
    pytest.importorskip("PyQt6.QtWebSockets")
    with trio.fail_after(START_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-c", CLIENT, url, session, user, mode],
            capture_stdout=True, stderr=subprocess.STDOUT, env=child_env(), check=False,
        )
    output = result.stdout.decode("utf-8", "replace")
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output
    return json.loads(lines[-1][len("RESULT "):])


async def test_a_qt_window_is_corrected_only_for_an_add_that_crossed_the_document() -> None:
    async with server_process("--store", "memory") as server:
        url = f"ws://127.0.0.1:{server.port}"
        # A written session: its document holds S.
        with trio.fail_after(START_TIMEOUT):
            async with open_websocket_url(f"{url}/ws/lab/seed") as seed:
                assert json.loads(await seed.get_message())["type"] == "connection:ack"
                await seed.send_message(json.dumps({"type": "command", "command": {
                    "action": "add_item", "item_type": "lens", "item_id": "S", "data": {"x_mm": 0.0}}}))
                while json.loads(await seed.get_message())["type"] != "ack":
                    pass
        after = await run_client(url, "lab", "ada", "after")
        assert after == {"canvas": ["A", "S"], "corrections": []}
        crossing = await run_client(url, "lab", "bob", "crossing")
        assert crossing == {"canvas": ["A", "C", "S"], "corrections": ["remove_item", "add_item"]}
