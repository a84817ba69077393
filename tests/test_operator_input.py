"""Operator input and the front door's trust decisions: empty or deeply nested settings, passwords in conninfo, IPv4-mapped proxies, control bytes in an Origin."""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import HandshakeError

from collab_trio.cli import describe_failure, main
from collab_trio.config import ServerConfig
from collab_trio.proxies import forwarded_client
from collab_trio.store import StoreError
from collab_trio.testing import HANG, LISTENING_RE, START_TIMEOUT, child_env, serve_command, server_process, tcp_client


async def start_or_fail_to_start(*args: str, cwd: Path) -> tuple[int | None, str, bool | None]:
    """Run `collab-trio serve ARGS`: (exit status or None if it started, output,
    whether a client with no token joined when it started)."""
    process = await trio.lowlevel.open_process(
        serve_command("--store", "memory", *args),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=child_env(), cwd=cwd,
    )
    assert process.stdout is not None
    output = ""
    joined = None
    try:
        with trio.fail_after(START_TIMEOUT):
            async for chunk in process.stdout:
                output += chunk.decode("utf-8", "replace")
                match = LISTENING_RE.search(output)
                if match:
                    try:
                        async with tcp_client(int(match.group(1)), "/ws/lab/mallory") as ws:
                            await ws.send_message('{"type": "ping"}')
                            joined = True
                    except HandshakeError:
                        joined = False
                    return None, output, joined
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        await process.stdout.aclose()
    return process.returncode, output, joined


@pytest.mark.parametrize("where", ["command line", "config file"])
async def test_an_empty_tokens_path_does_not_turn_authentication_off(tmp_path: Path, where: str) -> None:
    # `--tokens "$TOKENS_FILE"` with the variable unset, or `tokens = ""` in
    # the file: the operator asked for tokens. The environment's empty value
    # is documented as "unset"; an explicit empty path must not be a silent
    # "no authentication" (--certfile "" is an error too).
    if where == "command line":
        args: tuple[str, ...] = ("--tokens", "")
    else:
        config = tmp_path / "collab.toml"
        config.write_text('tokens = ""\n')
        args = ("--config", str(config))
    status, output, joined = await start_or_fail_to_start(*args, cwd=tmp_path)
    assert status == 2 and joined is None, (
        f"expected a one-line error and exit status 2; the server started"
        f" (a client without a token {'joined' if joined else 'was refused'}):\n{output}"
    )


@pytest.mark.parametrize(
    "conninfo",
    [
        # libpq: "Spaces around the equal sign are optional"; a value with
        # spaces is written in single quotes.
        "host=db.example user=collab password = s3cret dbname=collab",
        "host=db.example user=collab password='s3cret words' dbname=collab",
    ],
)
def test_print_config_hides_a_conninfo_password(conninfo: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--store", "postgres", "--database-url", conninfo, "--port", "0", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "words" not in out, out


def test_a_trusted_proxy_written_as_an_ipv4_mapped_address_is_trusted() -> None:
    # The X-Forwarded-For side reads ::ffff:10.0.0.5 as 10.0.0.5
    # (proxies.parse_address); the --trusted-proxy side keeps it an IPv6
    # network that no address ever matches: accepted, silently never used.
    config = ServerConfig(trusted_proxies=["::ffff:10.0.0.5"])
    headers = [(b"x-forwarded-for", b"203.0.113.7")]
    assert forwarded_client("10.0.0.5", headers, config.trusted_proxies) == "203.0.113.7"
    assert forwarded_client("::ffff:10.0.0.5", headers, config.trusted_proxies) == "203.0.113.7"


# Nesting deeper than Python's recursion limit: tomllib and json raise
# RecursionError, which is no TOMLDecodeError or ValueError.
DEEP = 5000


def test_a_deeply_nested_config_file_is_a_one_line_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "collab.toml"
    path.write_text("port = " + "[" * DEEP + "]" * DEEP + "\n", encoding="utf-8")
    # One line, status 2 (it was a RecursionError traceback, status 1).
    assert main(["serve", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("collab-trio serve: error: ") and err.count("\n") == 1, err


async def test_sighup_with_a_deeply_nested_tokens_file_keeps_the_tokens_and_the_server(tmp_path: Path) -> None:
    token = "old-token-0001"
    path = tmp_path / "tokens.json"
    path.write_text(f'{{"tokens": {{"{token}": "editor"}}}}', encoding="utf-8")
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process("--store", "memory", "--tokens", str(path)) as server:
            # A file that can't be used keeps the previous tokens (docs/CONFIGURATION.md, Signals).
            path.write_text('{"tokens": ' + "[" * DEEP + "]" * DEEP + "}", encoding="utf-8")
            server.process.send_signal(signal.SIGHUP)
            await server.wait_for("Kept the previous tokens|Stopped by an unexpected error")
            assert "Kept the previous tokens" in server.output, server.output
            async with tcp_client(server.port, f"/ws/team/bob?token={token}") as bob:
                assert '"connection:ack"' in await bob.get_message()
            assert await server.stop(signal.SIGTERM) == 0


async def test_a_refused_origin_is_logged_on_one_line(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # h11 lets bytes 0x80-0xff through in header values; decoded as Latin-1,
    # 0x85 is U+0085 NEXT LINE (a line break to str.splitlines and many log
    # tools) and 0x9b the 8-bit CSI of terminal escapes. Ids refuse controls
    # for the log's sake; the Origin goes into the log line unescaped.
    caplog.set_level(logging.INFO, logger="collab_trio")
    harness = await start_server(allowed_origins=("https://ok.example",))
    stream = harness.listener.connect()
    forged = b"2026-12-08 10:00:00 INFO    User admin joined session lab"
    await stream.send_all(
        b"GET /ws/s/mallory HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Origin: https://evil.example\x85" + forged + b"\r\n\r\n"
    )
    with trio.fail_after(HANG):
        while await stream.receive_some():
            pass
    await trio.aclose_forcefully(stream)
    [line] = [r.getMessage() for r in caplog.records if "is not allowed" in r.getMessage()]
    assert len(line.splitlines()) == 1 and line.isprintable(), repr(line)


def test_a_postgres_store_failure_is_not_blamed_on_the_data_directory() -> None:
    # `serve --store postgres --database-url ...` with the database down said:
    # "Cannot use the data directory collab-data: cannot connect to postgresql://...",
    # a directory the postgres store never uses.
    url = "postgresql://collab:***@127.0.0.1:1/collab"
    config = ServerConfig(store="postgres", database_url=url)
    message = describe_failure(StoreError(f"cannot connect to {url}: connection refused"), config)
    assert "data directory" not in message, message


def test_an_unreachable_conninfo_database_is_named_without_its_password(tmp_path: Path) -> None:
    conninfo = "host=127.0.0.1 port=1 user=collab password = s3cret dbname=collab connect_timeout=2"
    serve = subprocess.run(
        [*serve_command("--store", "postgres", "--database-url", conninfo, "--lease-timeout", "3")],
        capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=3 * HANG,
    )
    assert serve.returncode == 1, serve.stderr
    assert "cannot connect to" in serve.stderr and "s3cret" not in serve.stderr, serve.stderr
