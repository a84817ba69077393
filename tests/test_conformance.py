"""Layer 1: the trio-websocket echo server (tools/echo_server.py), its Autobahn conformance, and Qt."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio
from trio_websocket import ConnectionClosed

from collab_trio.config import ServerConfig
from collab_trio.testing import HANG, ProcessOutput, RunningServer, child_env, tcp_client
from collab_trio.testing import START_TIMEOUT as SERVER_START_TIMEOUT_S
from collab_trio.testing import STOP_TIMEOUT as STOP_TIMEOUT_S

from .qt_tools import CLIENT_RUN_TIMEOUT_S, start_smoke_client, verdict_of

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
# The fast sections take about 7 s on a 2-core machine; this only stops a hang.
CONFORMANCE_TIMEOUT_S = 180
ECHO_LISTENING_RE = r"Echo server listening on ws://127\.0\.0\.1:(\d+)/"


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


echo_server = load_tool("echo_server")


def test_fast_conformance_passes(tmp_path: Path) -> None:
    """Autobahn sections 1-7 and 10 (kosoku) all pass against the echo server."""
    report_dir = tmp_path / "conformance"
    args = [sys.executable, str(TOOLS / "conformance.py"), "--fast", "--report-dir", str(report_dir)]
    try:
        run = subprocess.run(
            args, cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, encoding="utf-8", errors="replace", timeout=CONFORMANCE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"conformance.py still running after {CONFORMANCE_TIMEOUT_S}s:\n{exc.stdout}")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert output.rstrip().endswith("PASS"), output
    assert (report_dir / "index.html").is_file(), output
    assert (report_dir / "index.json").is_file(), output
    summary = json.loads((report_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["passed"] is True
    assert [row["section"] for row in summary["sections"]] == [1, 2, 3, 4, 5, 6, 7, 10]
    assert sum(row["cases"] for row in summary["sections"]) == 247, output


def test_echo_server_uses_collab_trio_settings() -> None:
    """The defaults come from ServerConfig, not from a second copy of the numbers."""
    defaults = ServerConfig()
    args = echo_server.build_parser().parse_args([])
    assert (args.host, args.port, args.max_message_size) == (
        defaults.host, defaults.port, defaults.max_message_size,
    )
    assert echo_server.build_parser().parse_args(["--max-message-size", "512K"]).max_message_size == 512 * 1024


async def test_echo_server_echoes_and_closes_1009_over_loopback() -> None:
    """Text comes back as text and binary as binary on any path; a message over the limit closes 1009."""
    limit = ServerConfig().max_message_size
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(echo_server.serve_echo, "127.0.0.1", 0)
            assert server.config.max_message_size == limit
            async with tcp_client(server.port, "/any/path?x=1") as ws:
                await ws.send_message("Grüße ✓ {\"type\":\"ping\"}")
                assert await ws.get_message() == "Grüße ✓ {\"type\":\"ping\"}"
                await ws.send_message(b"\x00\xff binary")
                assert await ws.get_message() == b"\x00\xff binary"
                exactly_limit = "x" * limit
                await ws.send_message(exactly_limit)
                assert await ws.get_message() == exactly_limit

            async with tcp_client(server.port, "/") as ws:
                await ws.send_message("x" * (limit + 1))
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1009

            # A client still connected at shutdown is told 1001, and the port is free again.
            async with tcp_client(server.port, "/late") as ws:
                await ws.send_message("still here")
                assert await ws.get_message() == "still here"
                server.request_shutdown()
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
        listeners = await trio.open_tcp_listeners(server.port, host="127.0.0.1")
        for listener in listeners:
            await listener.aclose()


def test_qt_smoke_client_passes_against_echo_server() -> None:
    """Layer 2 on Layer 1: QWebSocket's JSON text round-trips, then a clean 1000; SIGTERM frees the port."""
    args = [sys.executable, str(TOOLS / "echo_server.py"), "--host", "127.0.0.1", "--port", "0"]
    server_output = ProcessOutput("echo server", args, child_env())
    try:
        match = server_output.wait_for(ECHO_LISTENING_RE, SERVER_START_TIMEOUT_S)
        server = RunningServer(server_output, int(match.group(1)))
        client = start_smoke_client(server, "--echo", "--interval", "0.5", "--duration", "2")
        try:
            returncode = client.wait(CLIENT_RUN_TIMEOUT_S)
        finally:
            client.stop()
        output = client.text()
        assert returncode == 0, output
        assert verdict_of(client.lines) == "PASS", output
        echoes = [line for line in client.lines if "echo #" in line and "back in" in line]
        assert len(echoes) >= 4, output
        assert any("disconnected: close code 1000" in line for line in client.lines), output

        server_output.process.terminate()  # SIGTERM
        assert server_output.wait(STOP_TIMEOUT_S) == 0, server_output.text()
        assert "✓ Port released" in server_output.text()
        assert "close code 1000" in server_output.text()
    finally:
        server_output.stop()
        print(f"--- echo server output ---\n{server_output.text()}")
