"""Real sockets and real processes: port release, SIGINT/SIGTERM, SIGHUP, exit status, banner."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from collab_trio.config import ServerConfig
from collab_trio.server import serve
from collab_trio.testing import START_TIMEOUT, assert_port_binds_again, server_process, tcp_client


async def test_port_released_on_cancel(data_dir: Path) -> None:
    # The default store is SQLite: its files go to this test's own directory.
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=str(data_dir))
    with trio.fail_after(START_TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, config)
            port = server.port
            async with tcp_client(port, "/ws/s/alice") as ws:
                ack = await ws.get_message()
                assert '"connection:ack"' in ack
                nursery.cancel_scope.cancel()
        await assert_port_binds_again(port)


async def test_port_in_use_is_a_clear_error() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        result = await trio.run_process(
            [sys.executable, "-m", "collab_trio", "serve", "--host", "127.0.0.1", "--port", str(port)],
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
    finally:
        await listeners[0].aclose()
    output = result.stdout.decode()
    assert result.returncode == 1
    assert "the port is already in use" in output
    assert "Traceback" not in output


async def _client_until_closed(port: int, user: str, joined: trio.Event, codes: dict[str, tuple]) -> None:
    async with tcp_client(port, f"/ws/team/{user}") as ws:
        assert '"connection:ack"' in await ws.get_message()
        joined.set()
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            codes[user] = (exc.reason.code, exc.reason.reason)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_signal_closes_clients_1001_and_exits_0(signum: signal.Signals) -> None:
    codes: dict[str, tuple] = {}
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process() as server:
            async with trio.open_nursery() as nursery:
                for user in ("alice", "bob"):
                    joined = trio.Event()
                    nursery.start_soon(_client_until_closed, server.port, user, joined, codes)
                    await joined.wait()
                server.process.send_signal(signum)
                signalled_at = trio.current_time()
                with trio.fail_after(2):
                    returncode = await server.process.wait()
                exit_time = trio.current_time() - signalled_at
    assert returncode == 0, server.output
    assert codes == {"alice": (1001, "server shutting down"), "bob": (1001, "server shutting down")}
    await assert_port_binds_again(server.port)
    output = server.output
    assert f"Received {signum.name}: shutting down" in output
    assert "User alice joined session team" in output
    assert "User bob left session team" in output
    assert server.lines[-2].endswith("✓ Server closed"), output
    assert server.lines[-1].endswith("✓ Port released"), output
    print(f"{signum.name}: exited 0 in {exit_time:.3f} s")


async def test_second_signal_stops_at_once() -> None:
    # A client that never answers the close handshake keeps the graceful stop
    # waiting for the full (long) shutdown timeout; a second SIGINT cuts it short.
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process("--shutdown-timeout", "60") as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(
                b"GET /ws/team/mute HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            response = await stream.receive_some()
            assert response.startswith(b"HTTP/1.1 101")
            server.process.send_signal(signal.SIGINT)
            with trio.move_on_after(1):
                await server.process.wait()
            assert server.process.returncode is None, "graceful stop should still be waiting"
            server.process.send_signal(signal.SIGINT)
            with trio.fail_after(2):
                returncode = await server.process.wait()
            await stream.aclose()
    assert returncode == 130
    assert "Received SIGINT again: stopping now" in server.output
    assert server.lines[-1].endswith("✓ Port released")


def tokens_toml(*tokens: str) -> str:
    return "".join(f'[tokens."{token}"]\nrole = "editor"\n' for token in tokens)


async def assert_refused(port: int, token: str) -> None:
    with pytest.raises(ConnectionRejected) as info:
        async with tcp_client(port, f"/ws/team/late?token={token}"):
            pass
    assert info.value.status_code == 401


async def test_sighup_reloads_the_tokens_file(tmp_path: Path) -> None:
    old, new = "old-token-0001", "new-token-0002"
    path = tmp_path / "tokens.toml"
    path.write_text(tokens_toml(old), encoding="utf-8")
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process("--store", "memory", "--tokens", str(path)) as server:
            async with tcp_client(server.port, f"/ws/team/alice?token={old}") as alice:
                assert '"connection:ack"' in await alice.get_message()
                await assert_refused(server.port, new)

                path.write_text(tokens_toml(new, "another-token-3"), encoding="utf-8")
                server.process.send_signal(signal.SIGHUP)
                await server.wait_for(r"Reloaded tokens: 2 defined in .*tokens\.toml$")
                async with tcp_client(server.port, f"/ws/team/bob?token={new}") as bob:
                    assert '"connection:ack"' in await bob.get_message()
                await assert_refused(server.port, old)
                # Alice joined with the old token: her connection goes on.
                await alice.send_message('{"type": "ping"}')
                while '"pong"' not in await alice.get_message():  # after bob's joined and left
                    pass

                path.write_text('[tokens."short"]\nrole = "editor"\n', encoding="utf-8")
                server.process.send_signal(signal.SIGHUP)
                kept = await server.wait_for("Kept the previous tokens")
                async with tcp_client(server.port, f"/ws/team/carol?token={new}") as carol:
                    assert '"connection:ack"' in await carol.get_message()
            assert await server.stop(signal.SIGTERM) == 0
    assert kept.string.endswith(f"Kept the previous tokens (2 defined): {path}: token #1 is shorter than 8 characters")
    assert old not in server.output and new not in server.output  # no token is ever logged


async def test_sighup_with_a_tokens_file_that_is_not_utf8_keeps_the_tokens_and_the_server(tmp_path: Path) -> None:
    token = "old-token-0001"
    path = tmp_path / "tokens.toml"
    path.write_text(tokens_toml(token), encoding="utf-8")
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process("--store", "memory", "--tokens", str(path)) as server:
            async with tcp_client(server.port, f"/ws/team/alice?token={token}") as alice:
                assert '"connection:ack"' in await alice.get_message()
                # Edited and saved in Latin-1 (an umlaut in a comment).
                path.write_bytes("# Zug\u00e4nge\n".encode("latin-1") + tokens_toml("new-token-0002").encode())
                server.process.send_signal(signal.SIGHUP)
                kept = await server.wait_for("Kept the previous tokens")
                async with tcp_client(server.port, f"/ws/team/bob?token={token}") as bob:
                    assert '"connection:ack"' in await bob.get_message()
            assert await server.stop(signal.SIGTERM) == 0
    assert kept.string.endswith(f"Kept the previous tokens (1 defined): tokens file {path} is not UTF-8 text")


async def test_sighup_without_tokens_has_nothing_to_reload() -> None:
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process("--store", "memory") as server:
            server.process.send_signal(signal.SIGHUP)
            await server.wait_for("Nothing to reload: no tokens file")
            async with tcp_client(server.port, "/ws/team/alice") as ws:
                assert '"connection:ack"' in await ws.get_message()
            assert await server.stop(signal.SIGTERM) == 0
    assert server.lines[-1].endswith("✓ Port released")


async def test_the_objects_of_startup_are_left_out_of_garbage_collections() -> None:
    """Collections walk only what the server made after startup: a full
    collection over the modules and classes paused every session for 18-60 ms."""
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process("--store", "memory", "--log-level", "debug") as server:
            frozen = await server.wait_for(r"Startup objects left out of garbage collections: (\d+)$")
            async with tcp_client(server.port, "/ws/team/alice") as ws:
                assert '"connection:ack"' in await ws.get_message()
            assert await server.stop(signal.SIGTERM) == 0
    assert int(frozen.group(1)) > 10_000  # the modules' functions, classes and dicts
