"""Access control and limits: tokens and roles, Origin, TLS, and what a hostile client runs into.

In-memory server with virtual time where time matters; real sockets and real
processes where they are the point (per-address limits, TLS, the CLI, Qt).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from collab_trio.config import ServerConfig
from collab_trio.server import serve
from collab_trio.testing import Client, HANG, Harness, server_process, tcp_client

REPO = Path(__file__).resolve().parents[1]
SMOKE_CLIENT = REPO / "tools" / "qt_smoke_client.py"
START_TIMEOUT = 30
QT_CLIENT_TIMEOUT = 60

EDITOR_TOKEN = "editor-token-0123"
VIEWER_TOKEN = "viewer-token-4567"
LAB_TOKEN = "lab-only-token-89"  # an editor, but only for session "lab"

TOKENS_TOML = f"""\
[tokens."{EDITOR_TOKEN}"]
role = "editor"

[tokens."{VIEWER_TOKEN}"]
role = "viewer"

[tokens."{LAB_TOKEN}"]
role = "editor"
sessions = ["lab"]
"""
# The JSON file uses both spellings of a grant: a plain role and a table.
TOKENS_JSON = json.dumps(
    {
        "tokens": {
            EDITOR_TOKEN: "editor",
            VIEWER_TOKEN: {"role": "viewer"},
            LAB_TOKEN: {"role": "editor", "sessions": ["lab"]},
        }
    }
)


def add(item_id: str, **data: float) -> dict[str, Any]:
    return {
        "type": "command",
        "command": {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": dict(data)},
    }


def upgrade_request(path: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: localhost",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def refusal(
    stream: trio.abc.Stream, path: str, headers: tuple[tuple[str, str], ...] = ()
) -> tuple[int, str]:
    """Send an upgrade request that must be refused; return (status, one-line reason)."""
    await stream.send_all(upgrade_request(path, headers))
    response = b""
    with trio.fail_after(HANG):
        while chunk := await stream.receive_some():
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), response
    assert b"text/plain" in head.lower(), response
    assert body.endswith(b"\n") and body.count(b"\n") == 1, body
    return int(status_line.split()[1]), body.decode().rstrip("\n")


async def read_until_closed(client: Client, limit: int = 1000) -> tuple[list[dict[str, Any]], int, str | None]:
    """Every message up to the server's close, then (messages, code, reason)."""
    messages = []
    with trio.fail_after(HANG):
        for _ in range(limit):
            try:
                messages.append(json.loads(await client.ws.get_message()))
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return messages, exc.reason.code, exc.reason.reason
    raise AssertionError(f"{client.name} still open after {limit} messages")


def tmp_file(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


async def run_cli(*args: str) -> tuple[int, str]:
    """`python -m collab_trio ARGS`: (exit status, stdout and stderr together)."""
    with trio.fail_after(START_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-m", "collab_trio", *args],
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return result.returncode, result.stdout.decode("utf-8", "replace")


def assert_one_line_error(output: str, expected: str) -> None:
    lines = output.strip().splitlines()
    assert "Traceback" not in output, output
    assert len(lines) == 1, output
    assert "ERROR" in lines[0] and expected in lines[0], output


# -- tokens and roles -------------------------------------------------------------


@pytest.fixture(params=["toml", "json"])
def tokens_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The same three tokens, as a TOML and as a JSON file."""
    text = TOKENS_TOML if request.param == "toml" else TOKENS_JSON
    return tmp_file(tmp_path, f"tokens.{request.param}", text)


@pytest.fixture
async def secured(start_server: Callable[..., Any], tokens_file: Path) -> Harness:
    """A server that requires a token."""
    return await start_server(tokens_file=str(tokens_file))


@pytest.mark.parametrize(
    ("path", "headers", "status", "reason"),
    [
        ("/ws/s/alice", (), 401, "missing or invalid token"),
        ("/ws/s/alice?token=", (), 401, "missing or invalid token"),
        ("/ws/s/alice?token=not-a-real-token", (), 401, "missing or invalid token"),
        ("/ws/s/alice", (("Authorization", "Bearer not-a-real-token"),), 401, "missing or invalid token"),
        # Only the Bearer scheme carries a token.
        ("/ws/s/alice", (("Authorization", f"Basic {EDITOR_TOKEN}"),), 401, "missing or invalid token"),
        (f"/ws/s/alice?token={LAB_TOKEN}", (), 403, "your token does not give access to this session"),
        ("/ws/s/alice", (("Authorization", f"Bearer {LAB_TOKEN}"),), 403, "does not give access"),
    ],
    ids=["missing", "empty", "wrong", "wrong-bearer", "basic-scheme", "other-session", "other-session-bearer"],
)
async def test_refused_at_handshake_without_a_valid_token(
    secured: Harness,
    autojump_clock: trio.abc.Clock,
    path: str,
    headers: tuple[tuple[str, str], ...],
    status: int,
    reason: str,
) -> None:
    got_status, got_reason = await refusal(secured.listener.connect(), path, headers)
    assert got_status == status
    assert reason in got_reason
    assert secured.registry.sessions == {}


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (f"/ws/s/alice?token={EDITOR_TOKEN}", []),
        ("/ws/s/alice", [(b"Authorization", f"Bearer {EDITOR_TOKEN}".encode())]),
        ("/ws/s/alice", [(b"Authorization", f"bearer  {VIEWER_TOKEN}".encode())]),
        (f"/ws/s/alice?since=0&token={VIEWER_TOKEN}", []),
        (f"/ws/lab/alice?token={LAB_TOKEN}", []),
    ],
    ids=["query", "bearer", "bearer-lowercase", "query-after-since", "session-restricted"],
)
async def test_valid_token_in_query_or_bearer_header_is_accepted(
    secured: Harness, autojump_clock: trio.abc.Clock, path: str, headers: list[tuple[bytes, bytes]]
) -> None:
    async with secured.client(path=path, headers=headers) as client:
        ack = await client.expect("connection:ack")
        assert ack["user_id"] == "alice"
        assert ack["session_id"] == path.split("/")[2]


async def test_editor_changes_viewer_watches_but_is_refused(
    secured: Harness, autojump_clock: trio.abc.Clock
) -> None:
    async with secured.joined("s", "ed", path=f"/ws/s/ed?token={EDITOR_TOKEN}") as ed, secured.joined(
        "s", "vi", path=f"/ws/s/vi?token={VIEWER_TOKEN}"
    ) as vi:
        await ed.expect("user:joined")
        # The viewer receives every change the editor makes.
        await ed.send(add("a", x_mm=1.0))
        relayed = await vi.expect("command")
        assert (relayed["user_id"], relayed["seq"], relayed["command"]["item_id"]) == ("ed", 1, "a")
        assert (await ed.expect("ack"))["seq"] == 1
        await ed.send({"type": "sync:update", "state": {"items": [{"uuid": "b", "item_type": "mirror"}]}})
        state = await vi.expect("sync:state")
        assert state["version"] == 2
        assert [item["uuid"] for item in state["state"]["items"]] == ["b"]
        assert (await ed.expect("ack"))["seq"] == 2
        await ed.send({"type": "sync:full_state", "state": {"items": [{"uuid": "c", "item_type": "lens"}]}})
        full = await vi.expect("sync:full_state")
        assert full["user_id"] == "ed"
        assert (await ed.expect("ack"))["seq"] == 3
        # Reading is allowed: sync:request and ping.
        await vi.send({"type": "sync:request"})
        state = await vi.expect("sync:state")
        assert (state["version"], [i["uuid"] for i in state["state"]["items"]]) == (3, ["c"])
        await vi.send({"type": "ping"})
        await vi.expect("pong")

        # Every kind of change is refused, and nothing reaches the editor.
        attempts = [
            add("x"),
            {"type": "sync:update", "state": {"items": []}},
            {"type": "sync:full_state", "state": {"items": []}},
            {"type": "sync:full_state", "state": {"items": []}, "target_user": "ed"},
        ]
        for attempt in attempts:
            await vi.send(attempt)
            error = await vi.expect("error")
            assert (error["code"], error["ref"]) == ("forbidden", attempt["type"])
            assert error["message"]
        await ed.expect_silence()
        await vi.send({"type": "sync:request"})
        state = await vi.expect("sync:state")
        assert (state["version"], [i["uuid"] for i in state["state"]["items"]]) == (3, ["c"])

        # The fifth refusal within 10 s closes the viewer with 4003.
        await vi.send(add("y"))
        code, reason = await vi.expect_closed()
        assert (code, reason) == (4003, "forbidden: this token may only view")
        left = await ed.expect("user:left")
        assert (left["user_id"], left["reason"]) == ("vi", "forbidden")
        await ed.expect_silence()


async def test_forbidden_strikes_count_within_ten_seconds(
    secured: Harness, autojump_clock: trio.abc.Clock
) -> None:
    async with secured.joined("s", "vi", path=f"/ws/s/vi?token={VIEWER_TOKEN}") as vi:
        t0 = trio.current_time()
        # One attempt every 3 s: never five within 10 s, so only errors.
        for attempt in range(5):
            await trio.sleep_until(t0 + 3 * attempt)
            await vi.send(add(f"x{attempt}"))
            assert (await vi.expect("error"))["code"] == "forbidden"
        # At t0+12 the window (t0+2, t0+12] holds four; one more makes five.
        await vi.send(add("x5"))
        code, _ = await vi.expect_closed()
        assert code == 4003
        assert trio.current_time() == t0 + 12


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("tokens.toml", '[tokens."long-enough-token"]\nrole = "admin"\n',
         "token #1 has role 'admin'; use one of editor, viewer"),
        ("tokens.json", '{"tokens": {"Zq9!x": "editor"}}', "token #1 is shorter than 8 characters"),
        ("tokens.toml", "this is = = not toml\n", "is not valid .toml"),
        ("tokens.json", "{not json", "is not valid .json"),
        ("tokens.toml", "[tokens]\n", "no tokens defined"),
        ("tokens.json", '{"tokens": {"long-enough-token": {"role": "editor", "sessions": "lab"}}}',
         "sessions must be a list of session ids"),
        ("missing.toml", None, "cannot read tokens file"),
        ("tokens.txt", '{"tokens": {"long-enough-token": "editor"}}',
         "tokens.txt: name it .toml or .json (the two accepted formats: TOML or JSON)"),
        ("tokens", '[tokens."long-enough-token"]\nrole = "editor"\n', "name it .toml or .json"),
        # Saved in Latin-1 (a comment with an umlaut): not UTF-8.
        ("tokens.toml", '# Zug\u00e4nge\n[tokens."long-enough-token"]\nrole = "editor"\n'.encode("latin-1"),
         "tokens file {path} is not UTF-8 text"),
        # A JSON escape that makes no UTF-8: a lone surrogate.
        ("tokens.json", '{"tokens": {"\\ud800long-enough": "editor"}}', "token #1 is not valid Unicode text"),
    ],
    ids=["bad-role", "short-token", "not-toml", "not-json", "no-tokens", "bad-sessions", "missing-file",
         "txt-suffix", "no-suffix", "latin-1", "lone-surrogate"],
)
async def test_malformed_tokens_file_is_a_one_line_error(
    tmp_path: Path, name: str, text: str | bytes | None, expected: str
) -> None:
    if isinstance(text, bytes):
        path = tmp_path / name
        path.write_bytes(text)
    else:
        path = tmp_path / name if text is None else tmp_file(tmp_path, name, text)
    expected = expected.format(path=path)
    status, output = await run_cli(
        "serve", "--host", "127.0.0.1", "--port", "0", "--store", "memory", "--tokens", str(path)
    )
    assert status == 1, output
    assert_one_line_error(output, expected)
    assert "Zq9!x" not in output  # a token is never echoed back


async def test_tokens_never_appear_in_logs(
    start_server: Callable[..., Any], tmp_path: Path, autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    harness = await start_server(tokens_file=str(tmp_file(tmp_path, "tokens.toml", TOKENS_TOML)))
    # Refused: a real token for the wrong session (403), and on a bad user id (400).
    assert (await refusal(harness.listener.connect(), f"/ws/other/alice?token={LAB_TOKEN}"))[0] == 403
    assert (await refusal(harness.listener.connect(), f"/ws/s/bad%07id?token={EDITOR_TOKEN}"))[0] == 400
    # Accepted, by query and by header; then some traffic and a normal leave.
    async with harness.joined("s", "alice", path=f"/ws/s/alice?since=0&token={EDITOR_TOKEN}") as alice:
        await alice.expect("sync:state")  # the answer to since=0
        session = harness.registry.sessions["s"]
        bearer = [(b"Authorization", f"Bearer {VIEWER_TOKEN}".encode())]
        async with harness.client(path="/ws/s/bob", headers=bearer) as bob:
            await bob.expect("connection:ack")
            await alice.expect("user:joined")
            await alice.send(add("a"))
            await bob.expect("command")
    with trio.fail_after(HANG):
        await session.finished.wait()  # everything about the session is logged by now

    assert "Refused /ws/other/alice?token=*** from" in caplog.text
    assert "?token=***" in caplog.text and "bad%07id" in caplog.text
    for record in caplog.records:
        text = " ".join([record.getMessage(), repr(record.args), record.exc_text or ""])
        for secret in (EDITOR_TOKEN, VIEWER_TOKEN, LAB_TOKEN):
            assert secret not in text, f"token in a log record: {record.name}: {text}"
    assert not any(secret in caplog.text for secret in (EDITOR_TOKEN, VIEWER_TOKEN, LAB_TOKEN))


async def test_percent_encoded_token_parameter_is_redacted_too(
    start_server: Callable[..., Any], tmp_path: Path, autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    harness = await start_server(tokens_file=str(tmp_file(tmp_path, "tokens.toml", TOKENS_TOML)))
    # 403, not 401: the server did read the token from the encoded key.
    assert (await refusal(harness.listener.connect(), f"/ws/other/alice?tok%65n={LAB_TOKEN}"))[0] == 403
    assert LAB_TOKEN not in caplog.text


# -- the token as a path segment (stock Optiverse) -----------------------------------


def assert_no_token_logged(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    """No record of any logger (trio-websocket's and wsproto's too) carries a secret, raw or encoded."""
    for record in caplog.records:
        text = " ".join([record.getMessage(), repr(record.args), record.exc_text or ""])
        for secret in secrets:
            for form in {secret, quote(secret, safe="")}:
                assert form not in text, f"token in a log record: {record.name}: {text}"


async def test_token_path_segment_as_optiverse_sends_it(
    start_server: Callable[..., Any], tmp_path: Path, autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    harness = await start_server(tokens_file=str(tmp_file(tmp_path, "tokens.toml", TOKENS_TOML)))
    # Optiverse builds f"{server_url}/ws/{session}/{user}": server URL ws://host:8765/t/TOKEN,
    # and with a trailing slash typed after the token, ws://host:8765/t/TOKEN/.
    async with harness.joined(path=f"/t/{EDITOR_TOKEN}/ws/s/alice") as alice:
        async with harness.joined(path=f"/t/{VIEWER_TOKEN}//ws/s/bob") as bob:
            await alice.expect("user:joined")
            await alice.send(add("a"))
            await alice.expect("ack")
            assert (await bob.expect("command"))["command"]["item_id"] == "a"
            await bob.send(add("b"))  # a viewer: refused
            assert (await bob.expect("error"))["code"] == "forbidden"
        await alice.expect("user:left")
    # Refused: a wrong token, a token for another session, a bad id, no ws segment.
    wrong = "not-a-token-at-all"
    assert await refusal(harness.listener.connect(), f"/t/{wrong}/ws/s/carol") == (401, "missing or invalid token")
    assert (await refusal(harness.listener.connect(), f"/t/{LAB_TOKEN}/ws/other/carol"))[0] == 403
    assert (await refusal(harness.listener.connect(), f"/t/{LAB_TOKEN}/ws/lab/bad%07id"))[0] == 400
    assert (await refusal(harness.listener.connect(), f"/t/{quote(LAB_TOKEN)}/nowhere"))[0] == 404
    # Allowed where the token is: the lab token in session lab.
    async with harness.joined(path=f"/t/{LAB_TOKEN}/ws/lab/dora"):
        pass
    # Plain HTTP and an upgrade wsproto refuses, both with a token in the path.
    stream = harness.listener.connect()
    await stream.send_all(f"GET /t/{EDITOR_TOKEN}/ws/s/u HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    with trio.fail_after(HANG):
        assert (await stream.receive_some()).startswith(b"HTTP/1.1 426 ")
    stream = harness.listener.connect()
    await stream.send_all(f"GET /t/{EDITOR_TOKEN}/ws/s/u HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n".encode())
    with trio.fail_after(HANG):
        assert (await stream.receive_some()).startswith(b"HTTP/1.1 400 ")
    await trio.testing.wait_all_tasks_blocked()

    assert "Refused /t/***/ws/s/carol from" in caplog.text
    assert "Plain HTTP request from" in caplog.text and "GET /t/***/ws/s/u -> 426" in caplog.text
    assert "Refused /t/***/ws/s/u from" in caplog.text  # wsproto's refusal
    assert any(r.name == "trio-websocket" for r in caplog.records)  # its debug lines were captured
    assert_no_token_logged(caplog, EDITOR_TOKEN, VIEWER_TOKEN, LAB_TOKEN, wrong)


# -- Origin ---------------------------------------------------------------------


async def test_origin_allow_list(start_server: Callable[..., Any], autojump_clock: trio.abc.Clock) -> None:
    harness = await start_server(allowed_origins=("https://ok.example",))
    status, reason = await refusal(
        harness.listener.connect(), "/ws/s/mallory", (("Origin", "https://evil.example"),)
    )
    assert (status, reason) == (403, "origin https://evil.example is not allowed")
    assert harness.registry.sessions == {}
    async with harness.client(path="/ws/s/web", headers=[(b"Origin", b"https://ok.example")]) as web:
        assert (await web.expect("connection:ack"))["user_id"] == "web"
        # Qt (Optiverse) sends no Origin header at all: never refused by the allow-list.
        async with harness.joined("s", "qt") as qt:
            assert [u["user_id"] for u in (await web.expect("user:joined"))["users"]] == ["web", "qt"]
            await qt.send({"type": "ping"})
            await qt.expect("pong")


# -- TLS ------------------------------------------------------------------------


@attrs.frozen
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 that it signed."""

    ca: Any  # trustme.CA
    cafile: Path
    certfile: Path
    keyfile: Path
    other_keyfile: Path  # a key that does not match certfile


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cafile, certfile, keyfile = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(cafile))
    certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    other_keyfile = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_keyfile))
    return TlsFiles(ca, cafile, certfile, keyfile, other_keyfile)


def tls_server_process(tls: TlsFiles):  # noqa: ANN201 - an async context manager
    """`collab-trio serve` with TLS on a free port; killed on exit."""
    return server_process(
        "--store", "memory", "--certfile", str(tls.certfile), "--keyfile", str(tls.keyfile)
    )


async def test_tls_client_trusting_the_ca_is_served_others_fail(tls_files: TlsFiles) -> None:
    async with tls_server_process(tls_files) as server:
        trusting = ssl.create_default_context()
        tls_files.ca.configure_trust(trusting)
        with trio.fail_after(HANG):
            async with tcp_client(server.port, "/ws/secure/alice", ssl_context=trusting) as ws:
                ack = json.loads(await ws.get_message())
                assert (ack["type"], ack["session_id"], ack["user_id"]) == ("connection:ack", "secure", "alice")
                await ws.send_message(json.dumps({"type": "ping"}))
                assert json.loads(await ws.get_message())["type"] == "pong"

        # Trusting only the system CAs: the certificate does not verify.
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", server.port, ssl_context=ssl.create_default_context()
        )
        try:
            with trio.fail_after(HANG), pytest.raises(trio.BrokenResourceError) as failure:
                await stream.do_handshake()
            assert isinstance(failure.value.__cause__, ssl.SSLCertVerificationError)
        finally:
            await trio.aclose_forcefully(stream)

        # The server shrugs that off and keeps serving.
        with trio.fail_after(HANG):
            async with tcp_client(server.port, "/ws/secure/bob", ssl_context=trusting) as ws:
                assert json.loads(await ws.get_message())["type"] == "connection:ack"
        assert "Traceback" not in server.output


def qt_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QT_QPA_PLATFORM": "offscreen"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO / "src")]))
    return env


async def run_qt_smoke(*args: str) -> tuple[int, list[str]]:
    with trio.fail_after(QT_CLIENT_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, str(SMOKE_CLIENT), *args],
            capture_stdout=True, stderr=subprocess.STDOUT, check=False, env=qt_env(),
        )
    return result.returncode, result.stdout.decode("utf-8", "replace").splitlines()


async def test_qt_smoke_client_over_wss(tls_files: TlsFiles) -> None:
    async with tls_server_process(tls_files) as server:
        url = f"wss://127.0.0.1:{server.port}"
        status, lines = await run_qt_smoke(url, "--cafile", str(tls_files.cafile), "--interval", "0.5", "--duration", "2")
        output = "\n".join(lines)
        assert status == 0, output
        assert lines[-1] == "PASS", output
        assert any("connection:ack: 1 user(s), host=True" in line for line in lines), output
        assert len([line for line in lines if "ping -> pong in" in line]) >= 4, output
        assert any("disconnected: close code 1000" in line for line in lines), output

        # Without --cafile Qt does not trust the server and says so.
        status, lines = await run_qt_smoke(url, "--interval", "0.5", "--duration", "1")
        output = "\n".join(lines)
        assert status == 1, output
        assert lines[-1].startswith("FAIL: could not connect"), output


@pytest.mark.parametrize(
    ("certfile", "keyfile", "expected"),
    [
        ("missing.pem", "keyfile", "Cannot read the TLS certificate or key"),
        ("certfile", "missing.pem", "Cannot read the TLS certificate or key"),
        ("certfile", "other_keyfile", "Cannot use the TLS certificate or key"),
        ("garbage.pem", "keyfile", "Cannot use the TLS certificate or key"),
        ("certfile", "garbage.pem", "Cannot use the TLS certificate or key"),
        ("certfile", "directory", "Cannot read the TLS certificate or key"),
    ],
    ids=["missing-cert", "missing-key", "mismatched-key", "garbage-cert", "garbage-key", "key-is-a-directory"],
)
async def test_bad_tls_files_are_a_one_line_error(
    tls_files: TlsFiles, tmp_path: Path, certfile: str, keyfile: str, expected: str
) -> None:
    tmp_file(tmp_path, "garbage.pem", "not a PEM file\n")
    (tmp_path / "directory").mkdir()

    def resolve(name: str) -> str:
        return str(getattr(tls_files, name)) if hasattr(tls_files, name) else str(tmp_path / name)

    status, output = await run_cli(
        "serve", "--host", "127.0.0.1", "--port", "0", "--store", "memory",
        "--certfile", resolve(certfile), "--keyfile", resolve(keyfile),
    )
    assert status == 1, output
    assert_one_line_error(output, expected)
    assert "Listening" not in output


# -- limits -----------------------------------------------------------------------


async def test_half_a_handshake_is_dropped_at_the_handshake_timeout(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(handshake_timeout=5)
    request = upgrade_request("/ws/s/slowloris")
    t0 = trio.current_time()
    stream = harness.listener.connect()
    await stream.send_all(request[:40])
    with trio.fail_after(HANG):
        assert await stream.receive_some() == b""  # closed without a word
    assert trio.current_time() == t0 + 5
    assert harness.registry.sessions == {}

    # Slow but within the limit is fine.
    stream = harness.listener.connect()
    await stream.send_all(request[:40])
    await trio.sleep(4.5)
    await stream.send_all(request[40:])
    response = b""
    with trio.fail_after(HANG):
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some()
    assert response.startswith(b"HTTP/1.1 101 ")
    await stream.aclose()


async def test_full_session_closes_4004_but_a_reconnect_still_works(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(max_users_per_session=2)
    async with harness.joined("s", "alice") as alice1, harness.joined("s", "bob") as bob:
        await alice1.expect("user:joined")
        async with harness.client("s", "carol") as carol:
            assert await carol.expect_closed() == (4004, "session full (2 users)")
        await alice1.expect_silence()
        await bob.expect_silence()  # carol was never a member: no join or leave
        # Another session is not affected.
        async with harness.joined("t", "carol"):
            pass
        # A reconnect of a member takes its place even though the session is full.
        async with harness.joined("s", "alice") as alice2:
            assert await alice1.expect_closed() == (4001, "replaced by a newer connection of the same user")
            await bob.send(add("a"))
            assert (await alice2.expect("command"))["user_id"] == "bob"
            await bob.expect("ack")
            await bob.expect_silence()
    # With room again, carol gets in.
    async with harness.joined("s", "bob"), harness.joined("s", "carol") as carol:
        await carol.send({"type": "ping"})
        await carol.expect("pong")


async def test_too_many_sessions_refused_503_joining_one_still_works(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(max_sessions=2)
    async with harness.joined("a", "alice") as alice:
        async with harness.joined("b", "bob"):
            session_b = harness.registry.sessions["b"]
            status, reason = await refusal(harness.listener.connect(), "/ws/c/carol")
            assert (status, reason) == (503, "too many live sessions (limit 2); try again later")
            assert sorted(harness.registry.sessions) == ["a", "b"]
            async with harness.joined("a", "carol"):
                assert (await alice.expect("user:joined"))["user_id"] == "carol"
        with trio.fail_after(HANG):
            await session_b.finished.wait()
        async with harness.joined("c", "carol") as carol:
            await carol.send({"type": "ping"})
            await carol.expect("pong")


async def test_max_sessions_holds_for_concurrent_handshakes(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(max_sessions=2)
    async with harness.joined("a", "alice"):
        streams = [harness.listener.connect() for _ in range(3)]
        for number, stream in enumerate(streams):
            await stream.send_all(upgrade_request(f"/ws/new-{number}/u"))
        statuses = []
        for stream in streams:
            head = b""
            with trio.fail_after(HANG):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some()
            statuses.append(int(head.split()[1]))
        assert sorted(statuses) == [101, 503, 503], statuses
        assert len(harness.registry.sessions) <= 2


async def refusal_over_tcp(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        return await refusal(stream, path)
    finally:
        await trio.aclose_forcefully(stream)


async def expect_message(ws: WebSocketConnection, msg_type: str) -> dict[str, Any]:
    with trio.fail_after(HANG):
        message = json.loads(await ws.get_message())
    assert message["type"] == msg_type, message
    return message


async def expect_ack(ws: WebSocketConnection) -> dict[str, Any]:
    return await expect_message(ws, "connection:ack")


async def test_connections_per_address_limit_over_loopback() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, store="memory", max_connections_per_ip=3)
    with trio.fail_after(START_TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, config)
            port = server.port
            async with tcp_client(port, "/ws/s/u1") as u1, tcp_client(port, "/ws/t/u2") as u2:
                await expect_ack(u1)
                await expect_ack(u2)
                async with tcp_client(port, "/ws/s/u3") as u3:
                    await expect_ack(u3)
                    await expect_message(u1, "user:joined")
                    status, reason = await refusal_over_tcp(port, "/ws/s/u4")
                    assert (status, reason) == (429, "too many connections from your address")
                    # Refusals do not use up slots either.
                    assert (await refusal_over_tcp(port, "/ws/u/u5"))[0] == 429
                # Once u3's leave is announced, what is left of its teardown needs
                # no I/O: when every task is blocked, its slot is free.
                assert (await expect_message(u1, "user:left"))["user_id"] == "u3"
                await trio.testing.wait_all_tasks_blocked()
                async with tcp_client(port, "/ws/s/u4") as u4:
                    await expect_ack(u4)
                    assert (await refusal_over_tcp(port, "/ws/s/u5"))[0] == 429
            nursery.cancel_scope.cancel()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs all of 127/8 on loopback")
async def test_connections_per_address_limit_is_per_address() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, store="memory", max_connections_per_ip=1)
    with trio.fail_after(START_TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, config)
            async with tcp_client(server.port, "/ws/s/u1") as u1:
                await expect_ack(u1)
                assert (await refusal_over_tcp(server.port, "/ws/s/u2"))[0] == 429
                async with tcp_client(server.port, "/ws/s/u2", local_address="127.0.0.2") as u2:
                    await expect_ack(u2)
            nursery.cancel_scope.cancel()


def forwarded(address: str) -> list[tuple[bytes, bytes]]:
    return [(b"X-Forwarded-For", address.encode())]


async def rejected_status(port: int, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> int:
    with pytest.raises(ConnectionRejected) as info:
        async with tcp_client(port, path, extra_headers=headers):
            pass
    return info.value.status_code


async def test_forwarded_addresses_are_counted_behind_a_trusted_proxy(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = ServerConfig(
        host="127.0.0.1", port=0, store="memory", max_connections_per_ip=1, trusted_proxies=["127.0.0.1/32"]
    )
    with trio.fail_after(START_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = (await nursery.start(serve, config)).port
            async with tcp_client(port, "/ws/s/observer", extra_headers=forwarded("203.0.113.50")) as observer:
                await expect_ack(observer)
                async with tcp_client(port, "/ws/s/a", extra_headers=forwarded("203.0.113.1")) as a:
                    await expect_ack(a)
                    # The same client again: its address is at the limit.
                    assert await rejected_status(port, "/ws/s/a2", forwarded("203.0.113.1")) == 429
                    # Its own word to the left of what the proxy appended proves nothing.
                    assert await rejected_status(port, "/ws/s/a3", forwarded("198.51.100.9, 203.0.113.1")) == 429
                    # Another client through the same proxy, and the proxy's own address, have room.
                    async with tcp_client(port, "/ws/s/b", extra_headers=forwarded("203.0.113.2")) as b:
                        await expect_ack(b)
                        async with tcp_client(port, "/ws/s/direct") as direct:
                            await expect_ack(direct)
                            assert (await refusal_over_tcp(port, "/ws/s/direct2"))[0] == 429
                joined = [(await expect_message(observer, "user:joined"))["user_id"] for _ in range(3)]
                left = [(await expect_message(observer, "user:left"))["user_id"] for _ in range(3)]
                assert joined == ["a", "b", "direct"] and sorted(left) == ["a", "b", "direct"]
                # Once the leaves are announced, what is left of the teardown needs no
                # I/O: when every task is blocked, each address has its slot again.
                await trio.testing.wait_all_tasks_blocked()
                async with tcp_client(port, "/ws/s/a", extra_headers=forwarded("203.0.113.1")) as a:
                    await expect_ack(a)
                    async with tcp_client(port, "/ws/s/direct") as direct:
                        await expect_ack(direct)
            nursery.cancel_scope.cancel()
    assert "Refused 203.0.113.1: too many connections from this address" in caplog.text
    assert "Refused 127.0.0.1: too many connections from this address" in caplog.text


async def test_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, store="memory", max_connections_per_ip=1)
    with trio.fail_after(START_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = (await nursery.start(serve, config)).port
            async with tcp_client(port, "/ws/s/a", extra_headers=forwarded("203.0.113.1")) as a:
                await expect_ack(a)
                # Claiming another address changes nothing: both are 127.0.0.1.
                assert await rejected_status(port, "/ws/s/b", forwarded("203.0.113.2")) == 429
            nursery.cancel_scope.cancel()


async def test_burst_over_the_rate_limit_is_dropped_with_one_error_a_second(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(rate_limit=10, rate_burst=20)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        t0 = trio.current_time()
        relayed: list[str] = []

        async def burst(at: float, ids: list[str], allowed: int, errors: int) -> None:
            await trio.sleep_until(at)
            for item_id in ids:
                await alice.send(add(item_id))
            got = [await alice.recv() for _ in range(allowed + errors)]
            assert Counter(m["type"] for m in got) == Counter(ack=allowed, error=errors), got
            for error in (m for m in got if m["type"] == "error"):
                assert error["code"] == "rate_limited"
                assert "10/s" in error["message"]
            relayed.extend([(await bob.expect("command"))["command"]["item_id"] for _ in range(allowed)])
            assert trio.current_time() == at  # all of it without waiting

        # 30 at once: the burst of 20 goes through, 10 are dropped with one error.
        await burst(t0, [f"a{i}" for i in range(30)], allowed=20, errors=1)
        # Half a second refills 5; the other 5 are dropped, but the error was < 1 s ago.
        await burst(t0 + 0.5, [f"b{i}" for i in range(10)], allowed=5, errors=0)
        # A second after the first error, the next drop gets an error again.
        await burst(t0 + 1.0, [f"c{i}" for i in range(10)], allowed=5, errors=1)
        await alice.expect_silence()
        await bob.expect_silence()
        assert relayed == [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(5)] + [f"c{i}" for i in range(5)]
        # Still connected; the document has exactly what was let through.
        await alice.send({"type": "sync:request"})
        state = await alice.expect("sync:state")
        assert state["version"] == 30
        assert [item["uuid"] for item in state["state"]["items"]] == relayed


async def test_sustained_flood_closes_4002(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(rate_limit=10, rate_burst=20)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        t0 = trio.current_time()
        # 30 a second: drops are 10 at t0, 20 at t0+1, and the 50th strike comes
        # with the last message at t0+2.
        for second in range(3):
            await trio.sleep_until(t0 + second)
            for i in range(30):
                await alice.send(add(f"m{second}-{i}"))
        messages, code, reason = await read_until_closed(alice)
        assert (code, reason) == (4002, "rate limit exceeded repeatedly")
        assert trio.current_time() == t0 + 2
        errors = [m for m in messages if m["type"] == "error"]
        assert [e["code"] for e in errors] == ["rate_limited"] * 3  # one per second
        assert {m["type"] for m in messages} <= {"ack", "error"}

        got = [await bob.recv() for _ in range(42)]
        left = [m for m in got if m["type"] == "user:left"]
        assert [(m["user_id"], m["reason"]) for m in left] == [("alice", "rate_limited")]
        assert [m["user_id"] for m in got if m["type"] == "host:changed"] == ["bob"]
        relayed = [m["command"]["item_id"] for m in got if m["type"] == "command"]
        expected = [f"m0-{i}" for i in range(20)] + [f"m1-{i}" for i in range(10)] + [f"m2-{i}" for i in range(10)]
        assert relayed == expected
        await bob.expect_silence()


async def test_default_limits_never_bother_an_optiverse_session(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    # Optiverse pings every 30 s; a drag sends ~60 move_item/s plus the cursor at 60/s.
    minutes, every, drag_seconds, hz = 10, 30, 5, 60
    periods = minutes * 60 // every
    moves_per_drag = drag_seconds * hz
    got: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}

    async def collect(client: Client) -> None:
        try:
            while True:
                got[client.name].append(json.loads(await client.ws.get_message()))
        except ConnectionClosed as exc:
            got[client.name].append({"type": "(closed)", "reason": repr(exc.reason)})

    def move(n: int) -> dict[str, Any]:
        data = {"x_mm": float(n), "y_mm": -float(n), "angle_deg": float(n % 360)}
        return {
            "type": "command",
            "command": {"action": "move_item", "item_type": "lens", "item_id": "lens-1", "data": data},
            "timestamp": "2026-11-26T10:00:00",
        }

    async with harness.joined("lab", "alice") as alice, harness.joined("lab", "bob") as bob:
        await alice.expect("user:joined")
        await alice.send(add("lens-1", x_mm=0.0, y_mm=0.0, angle_deg=0.0))
        await alice.expect("ack")
        await bob.expect("command")
        t0 = trio.current_time()
        with trio.fail_after(minutes * 60 + 60):  # virtual seconds
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, alice)
                nursery.start_soon(collect, bob)

                async def bob_heartbeat() -> None:
                    for period in range(periods):
                        await trio.sleep_until(t0 + period * every + every / 2)
                        await bob.send({"type": "ping"})

                nursery.start_soon(bob_heartbeat)
                n = 0
                for period in range(periods):
                    start = t0 + period * every
                    await trio.sleep_until(start)
                    await alice.send({"type": "ping"})
                    for step in range(moves_per_drag):
                        await trio.sleep_until(start + 1 + step / hz)
                        await alice.send(move(n))
                        await alice.send({"type": "cursor", "x": float(n), "y": 1.5})
                        n += 1
                await trio.sleep_until(t0 + minutes * 60)
                nursery.cancel_scope.cancel()
        assert trio.current_time() == t0 + minutes * 60
        assert alice.ws.closed is None and bob.ws.closed is None

    total = periods * moves_per_drag
    alice_types = Counter(m["type"] for m in got["alice"])
    assert alice_types == {"ack": total, "pong": periods}, alice_types
    bob_types = Counter(m["type"] for m in got["bob"])
    assert set(bob_types) == {"command", "cursor", "pong"}, bob_types
    assert bob_types["pong"] == periods
    commands = [m for m in got["bob"] if m["type"] == "command"]
    assert [m["command"]["data"]["x_mm"] for m in commands] == [float(i) for i in range(total)]
    assert [m["seq"] for m in commands] == list(range(2, total + 2))
    # Cursors are coalesced to 20/s, and the last position of each drag arrives.
    cursors = [m["x"] for m in got["bob"] if m["type"] == "cursor"]
    assert 0 < len(cursors) <= periods * (drag_seconds * 20 + 2)
    ends = {float((period + 1) * moves_per_drag - 1) for period in range(periods)}
    assert ends <= set(cursors)
