"""Clients that reset the connection right after the upgrade request: no noise, no harm.

200 TCP connections to a real `collab-trio serve` each send a complete
WebSocket upgrade request and then reset (SO_LINGER 0, then close: an RST
instead of a FIN), half of them at once and half once the 101 response
arrived, so the server meets the reset both inside the handshake and just
after the join. The server must log no traceback and no ERROR, and still
serve a normal client afterwards; with --debug, each reset is exactly one
line of the server's own.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
from pathlib import Path

import pytest
import trio

from collab_trio.testing import HANG, START_TIMEOUT, expect_json, server_process, tcp_client

CONNECTIONS = 200
AT_ONCE = 20
SESSIONS = 10
# trio-websocket's debug lines name the connection like "server-17 received 200 bytes".
TRIO_WEBSOCKET_LINE = re.compile(r" DEBUG +server-\d+ ")
# How the server says a client went away (during the handshake, or once joined).
GONE = re.compile(r"went away|left session|disconnected|reset by peer")


def upgrade_request(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def connect_and_reset(port: int, number: int, limiter: trio.CapacityLimiter) -> tuple[int, bool]:
    """Send a whole upgrade request, then reset; (local port, whether it waited for the 101)."""
    wait_for_101 = number % 2 == 1
    async with limiter:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        local_port = stream.socket.getsockname()[1]
        try:
            await stream.send_all(upgrade_request(f"/ws/resets-{number % SESSIONS}/u{number}"))
            if wait_for_101:
                with trio.fail_after(HANG):
                    response = await stream.receive_some()
                assert response.startswith(b"HTTP/1.1 101"), response
        finally:
            # Linger on, timeout 0: close() discards unsent data and sends RST.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.socket.close()
    return local_port, wait_for_101


async def normal_client_works(port: int) -> None:
    async with tcp_client(port, "/ws/resets-0/normal") as ws:
        await expect_json(ws, "connection:ack")
        with trio.fail_after(HANG):
            command = {"action": "add_item", "item_type": "lens", "item_id": "after", "data": {"x_mm": 1}}
            await ws.send_message(json.dumps({"type": "command", "command": command, "op_id": "after-1"}))
            while (message := json.loads(await ws.get_message()))["type"] != "ack":
                assert message["type"] in ("user:joined", "user:left", "host:changed"), message
        assert message["op_id"] == "after-1", message


@pytest.mark.parametrize("debug", [False, True], ids=["default-logging", "debug"])
async def test_resets_after_the_upgrade_request_log_no_error(debug: bool, tmp_path: Path) -> None:
    args = ("--data-dir", str(tmp_path / "data"), *(["--debug"] if debug else []))
    with trio.fail_after(START_TIMEOUT + 6 * HANG):
        async with server_process(*args) as server:
            limiter = trio.CapacityLimiter(AT_ONCE)
            resets: list[tuple[int, bool]] = []

            async def one(number: int) -> None:
                resets.append(await connect_and_reset(server.port, number, limiter))

            async with trio.open_nursery() as nursery:
                for number in range(CONNECTIONS):
                    nursery.start_soon(one, number)
            await normal_client_works(server.port)
            # A graceful stop waits for every connection's task: whatever the
            # resets were going to log is in the output once the process is gone.
            server.process.send_signal(signal.SIGINT)
            with trio.fail_after(HANG):
                returncode = await server.process.wait()
    output = server.output
    assert returncode == 0, output
    assert len(resets) == CONNECTIONS
    tracebacks = output.count("Traceback")
    error_lines = [line for line in server.lines if " ERROR " in line]
    warning_lines = [line for line in server.lines if " WARNING " in line]
    debug_lines = [line for line in server.lines if " DEBUG " in line]
    print(
        f"\n{CONNECTIONS} resets ({'--debug' if debug else 'default logging'}): {tracebacks} tracebacks,"
        f" {len(error_lines)} ERROR, {len(warning_lines)} WARNING, {len(debug_lines)} DEBUG,"
        f" {len(server.lines)} lines in all"
    )
    assert tracebacks == 0, output
    assert not error_lines, "\n".join(error_lines)
    # A client that goes away is not something the operator must act on.
    assert not warning_lines, "\n".join(warning_lines)
    if debug:
        # trio-websocket's own frame-by-frame chatter is what --debug is for;
        # of the server's lines, each reset connection gets exactly one that
        # says it went away (the "left" line of those that had joined).
        own = [line for line in server.lines if not TRIO_WEBSOCKET_LINE.search(line)]
        went_away = [line for line in own if GONE.search(line) and "User normal " not in line]
        assert len(went_away) == CONNECTIONS, (
            f"{len(went_away)} lines about {CONNECTIONS} resets:\n" + "\n".join(own)
        )
