"""What the WebSocket port does before the upgrade: plain HTTP, probes, the stop (serving.py, upgrade.py).

In-memory connections under the autojump clock, so "at once" is exact: no
virtual time passes. Responses are parsed with h11, the client side.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from collab_trio.testing import HANG, server_process, start_memory_server
from collab_trio.upgrade import MAX_HEAD_BYTES, MalformedRequest, RequestHead, read_request_head


def request_bytes(method: str, target: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    client = h11.Connection(h11.CLIENT)
    data = client.send(h11.Request(method=method, target=target, headers=headers or [("Host", "collab.example:8765")]))
    return data + client.send(h11.EndOfMessage())


async def http_exchange(stream: trio.abc.Stream, data: bytes, method: str = "GET") -> tuple[h11.Response, bytes, bool]:
    """Send a request; return the response, its body, and whether the server then closed."""
    client = h11.Connection(h11.CLIENT)
    # Only to put the client in the state of having sent this request.
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    await stream.send_all(data)
    response = None
    body = b""
    with trio.fail_after(HANG):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        closed = await stream.receive_some() == b""
    assert response is not None
    return response, body, closed


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((value for key, value in response.headers if key == name), None)


# -- plain HTTP on the WebSocket port ------------------------------------------------


async def test_plain_get_of_the_root_says_where_to_connect(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    harness = await start_server()
    t0 = trio.current_time()
    response, body, closed = await http_exchange(harness.listener.connect(), request_bytes("GET", "/"))
    assert response.status_code == 200
    assert header(response, b"content-type") == b"text/plain; charset=utf-8"
    text = body.decode()
    assert text == (
        "This is a collab-trio WebSocket endpoint; it serves no web pages.\n"
        "Connect a WebSocket client to ws://collab.example:8765/ws/{session_id}/{user_id}\n"
        "Optiverse: set the Server URL to ws://collab.example:8765\n"
    )
    assert closed
    assert trio.current_time() == t0
    lines = [r.getMessage() for r in caplog.records if r.name == "collab_trio.serving" and "Plain HTTP" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(": GET / -> 200 (not a WebSocket upgrade)"), lines


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/ws/s/alice", 426),  # the endpoint, without the upgrade
        ("GET", "/favicon.ico", 426),
        ("POST", "/", 426),
        ("HEAD", "/", 200),
    ],
)
async def test_plain_requests_get_a_status_and_the_text(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock, method: str, target: str, status: int
) -> None:
    harness = await start_server()
    response, body, closed = await http_exchange(harness.listener.connect(), request_bytes(method, target), method)
    assert response.status_code == status
    assert closed
    if status == 426:
        assert header(response, b"upgrade") == b"websocket"
    if method == "HEAD":
        assert body == b"" and int(header(response, b"content-length") or 0) > 0
    else:
        assert b"Connect a WebSocket client to ws://collab.example:8765/ws/" in body


async def test_plain_get_under_a_base_path(start_server: Callable[..., Any], autojump_clock: trio.abc.Clock) -> None:
    harness = await start_server(base_path="/collab")
    for target in ("/collab", "/collab/"):
        response, body, _ = await http_exchange(harness.listener.connect(), request_bytes("GET", target))
        assert response.status_code == 200
        assert b"ws://collab.example:8765/collab/ws/{session_id}/{user_id}\n" in body
        assert b"Server URL to ws://collab.example:8765/collab\n" in body
    # "/" answers too (a proxy's health check); other paths say 426.
    response, _, _ = await http_exchange(harness.listener.connect(), request_bytes("GET", "/"))
    assert response.status_code == 200
    response, _, _ = await http_exchange(harness.listener.connect(), request_bytes("GET", "/collab/ws/s/u"))
    assert response.status_code == 426


async def test_plain_get_with_tokens_on_says_where_the_token_goes(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    # Stock Optiverse can only be given a server URL: with --tokens, the one the
    # text names must carry the token (/t/TOKEN), or every join gets 401.
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[tokens."long-enough-token"]\nrole = "editor"\n', encoding="utf-8")
    harness = await start_server(base_path="/collab", tokens_file=str(tokens))
    response, body, _ = await http_exchange(harness.listener.connect(), request_bytes("GET", "/collab/"))
    assert response.status_code == 200
    assert body.decode() == (
        "This is a collab-trio WebSocket endpoint; it serves no web pages.\n"
        "Connect a WebSocket client to ws://collab.example:8765/collab/t/TOKEN/ws/{session_id}/{user_id}"
        " (TOKEN: yours; or ?token=TOKEN)\n"
        "Optiverse: set the Server URL to ws://collab.example:8765/collab/t/TOKEN\n"
    )
    assert b"long-enough-token" not in body


async def test_a_host_header_that_is_not_a_host_is_not_repeated(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server()
    data = request_bytes("GET", "/", [("Host", "<script>alert(1)</script>")])
    response, body, _ = await http_exchange(harness.listener.connect(), data)
    assert response.status_code == 200
    assert b"<script>" not in body and b"ws://HOST:PORT/ws/" in body


async def test_a_websocket_client_still_connects_after_plain_requests(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server()
    await http_exchange(harness.listener.connect(), request_bytes("GET", "/"))
    async with harness.joined("s", "alice") as alice:
        await alice.send({"type": "ping"})
        await alice.expect("pong")


# -- probes: connections that send nothing ---------------------------------------------


async def test_a_connect_and_close_is_dropped_at_once(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    # One connection per address: a probe still held would refuse the client (429).
    harness = await start_server(max_connections_per_ip=1)
    t0 = trio.current_time()
    for _ in range(3):
        probe = harness.listener.connect()
        await probe.aclose()
        await trio.testing.wait_all_tasks_blocked()
        async with harness.joined("s", "alice") as alice:
            await alice.send({"type": "ping"})
            await alice.expect("pong")
    assert trio.current_time() == t0


async def test_a_connect_and_close_during_shutdown_adds_no_delay(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        harness = await start_memory_server(nursery)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        probe = harness.listener.connect()
        harness.server.request_shutdown()
        await probe.aclose()
    assert trio.current_time() == t0
    assert "Grace period" not in caplog.text
    assert "✓ All connections closed" in caplog.text


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half a head"])
async def test_an_idle_connection_does_not_hold_the_shutdown(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        harness = await start_memory_server(nursery)
        idle = harness.listener.connect()
        await idle.send_all(sent)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        harness.server.request_shutdown()
        with trio.fail_after(HANG):
            assert await idle.receive_some() == b""  # dropped without a word
    assert trio.current_time() == t0
    assert "Dropped in-memory" not in caplog.text or "the server stops before its request arrived" in caplog.text
    assert "Grace period" not in caplog.text
    await idle.aclose()


async def test_a_member_still_gets_1001_when_an_idle_connection_is_dropped(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        harness = await start_memory_server(nursery)
        idle = harness.listener.connect()
        async with harness.joined("s", "alice") as alice:
            t0 = trio.current_time()
            harness.server.request_shutdown()
            assert await alice.expect_closed() == (1001, "server shutting down")
        assert trio.current_time() == t0
    await idle.aclose()
    assert "Grace period" not in caplog.text


# -- reading the head (upgrade.py) ----------------------------------------------------


async def read_head_of(data: bytes, *, chunk: int = 7) -> RequestHead | MalformedRequest | None:
    """read_request_head over a memory stream fed `data` in small pieces, then closed."""
    send, receive = trio.testing.memory_stream_pair()

    async def feed() -> None:
        for start in range(0, len(data), chunk):
            await send.send_all(data[start : start + chunk])
        await send.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        try:
            return await read_request_head(receive)
        except MalformedRequest as exc:
            return exc


async def test_the_head_and_what_follows_it_are_kept_for_trio_websocket() -> None:
    data = request_bytes("GET", "/ws/s/u", [("Host", "h"), ("Upgrade", "websocket")]) + b"\x81\x85frame"
    # In one piece: the frame that came with the head is kept too.
    head = await read_head_of(data, chunk=len(data))
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.is_upgrade) == ("GET", "/ws/s/u", True)
    assert head.received == data
    assert head.upgrade_refusal() == (400, "Missing header, 'Connection: Upgrade'", [])
    # In pieces: the head ends as soon as it is complete, and nothing read is lost.
    head = await read_head_of(data, chunk=7)
    assert isinstance(head, RequestHead) and head.target == "/ws/s/u"
    assert data.startswith(head.received) and b"\r\n\r\n" in head.received


async def test_a_closed_or_half_request_gives_none() -> None:
    assert await read_head_of(b"") is None
    assert await read_head_of(b"GET / HTTP/1.1\r\nHost") is None


async def test_a_head_over_the_limit_is_refused_431() -> None:
    # Longer than one read (64 KiB) too: never complete within the limit.
    data = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES + 65536) + b"\r\n\r\n"
    refused = await read_head_of(data, chunk=4096)
    assert isinstance(refused, MalformedRequest) and refused.status == 431
    assert refused.response.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


@pytest.mark.parametrize("pad", [MAX_HEAD_BYTES, MAX_HEAD_BYTES * 2 + 8000])
async def test_a_head_over_the_limit_arriving_in_one_read_is_refused_431_too(pad: int) -> None:
    # (As on loopback or behind a proxy: h11 bounds a head only while it is incomplete.)
    data = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n"
    refused = await read_head_of(data, chunk=len(data))
    assert isinstance(refused, MalformedRequest) and refused.status == 431
    # Just within the limit: read whole.
    fits = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES - 200) + b"\r\n\r\n"
    head = await read_head_of(fits, chunk=len(fits))
    assert isinstance(head, RequestHead) and head.received == fits


# -- the same with a real server process --------------------------------------------


async def test_probes_do_not_delay_a_real_servers_sigterm() -> None:
    async with server_process("--store", "memory", "--debug", "--shutdown-timeout", "5") as server:
        # An idle connection and half a request, then a connect-and-close.
        idle = await trio.open_tcp_stream("127.0.0.1", server.port)
        half = await trio.open_tcp_stream("127.0.0.1", server.port)
        await half.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        probe = await trio.open_tcp_stream("127.0.0.1", server.port)
        await probe.aclose()
        await server.wait_for("Dropped .*: closed before sending a request")
        started = trio.current_time()
        assert await server.stop(signal.SIGTERM) == 0
        took = trio.current_time() - started
        for stream in (idle, half):
            with trio.fail_after(HANG):
                assert await stream.receive_some() == b""  # dropped without a word
            await stream.aclose()
    assert "✓ All connections closed" in server.output
    assert "Grace period" not in server.output, server.output
    assert took < 5, f"the stop took {took:.2f} s: the probes held the 5 s grace period"
