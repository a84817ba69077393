"""The inbound path's edges (found by review): a request head ended by bare
LFs, frames sent along with the request, integers beyond double range, and
connections still sending their head held to the per-address limit."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from wsproto.events import AcceptConnection, CloseConnection, Pong, Request, TextMessage

from collab_trio.inbound import PING, TEXT, FrameReader
from collab_trio.testing import HANG, OPCODE_TEXT, Harness, RawClient, client_frame

LF_REQUEST = (
    b"GET /ws/s/u HTTP/1.1\nHost: x\nConnection: Upgrade\nUpgrade: websocket\n"
    b"Sec-WebSocket-Version: 13\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\n\n"
)


# -- 1. A request head ended by bare LFs (h11 and wsproto accept it) ----------


def test_frame_reader_finds_frames_after_a_head_with_bare_lf_line_ends() -> None:
    reader = FrameReader(1 << 20)
    _, events = reader.feed(LF_REQUEST + client_frame(PING, b"x") * 3, 0)
    assert events == [(PING, True)] * 3


def test_frame_reader_finds_frames_after_a_head_ending_in_lf_crlf() -> None:
    # h11's end of head is the first b"\n\r?\n"; split over two reads too.
    head = LF_REQUEST[:-1] + b"\r\n"
    reader = FrameReader(1 << 20)
    _, first = reader.feed(head[:-2], 0)
    _, events = reader.feed(head[-2:] + client_frame(TEXT, b'{"type":"ping"}'), 0)
    assert first == [] and events == [(TEXT, True), '{"type":"ping"}']


async def _lf_connect(harness: Harness, path: str) -> RawClient:
    """A RawClient upgraded with a request head whose lines end in a bare LF."""
    client = RawClient(harness.listener.connect())
    request = client.ws.send(Request(host="localhost", target=path))
    with trio.fail_after(HANG):
        await client.stream.send_all(request.replace(b"\r\n", b"\n"))
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
    await client.expect("connection:ack")
    return client


async def _close_code(client: RawClient) -> int | None:
    with trio.fail_after(HANG):
        while (event := await client.next_event()) is not None:
            if isinstance(event, CloseConnection):
                return event.code
    return None


async def test_bare_lf_handshake_does_not_escape_the_fragment_limit(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(max_fragments=4)
    client = await _lf_connect(harness, "/ws/s/frag")
    text = b'{"type":"ping"}'
    frames = [client_frame(OPCODE_TEXT if i == 0 else 0x0, text[i : i + 1], fin=i == len(text) - 1)
              for i in range(len(text))]
    await client.stream.send_all(b"".join(frames))
    assert await _close_code(client) == 1009


async def test_bare_lf_handshake_does_not_escape_the_rate_limit_for_pings(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(rate_limit=0.001, rate_burst=5, rate_strikes=3)
    client = await _lf_connect(harness, "/ws/s/pinger")
    await client.stream.send_all(client_frame(PING, b"p") * 50)
    assert await _close_code(client) == 4002


# -- 2. Bytes sent with the request head, before the 101 ------------------------
#
# wsproto (1.2/1.3) drops whatever it is fed before the server accepts: the
# server's Connection starts empty (no trailing data). The frame reader must
# not parse those bytes as frames either, or it falls out of step with wsproto.


def _huge_frame_header() -> bytes:
    # A masked binary frame announcing 2**40 bytes, without them.
    return bytes([0x82, 0x80 | 127]) + (1 << 40).to_bytes(8, "big") + b"\x00\x00\x00\x00"


async def _pipelined_connect(harness: Harness, path: str, early: bytes) -> RawClient:
    client = RawClient(harness.listener.connect())
    request = client.ws.send(Request(host="localhost", target=path))
    with trio.fail_after(HANG):
        await client.stream.send_all(request + early)
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
    await client.expect("connection:ack")
    return client


async def _until_closed(client: RawClient) -> tuple[list[Any], int | None]:
    """Every event the server sends until its close frame (or EOF), and the close code."""
    seen: list[Any] = []
    with trio.fail_after(1000):  # virtual time: past the idle timeout
        while (event := await client.next_event()) is not None:
            if isinstance(event, CloseConnection):
                return seen, event.code
            seen.append(event)
    return seen, None


async def test_a_frame_header_sent_with_the_head_does_not_blind_the_rate_limit(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # The server and the frame reader must see the same frames: either the
    # 50 pings are frames to both (then 4002 after the burst), or payload of
    # the announced frame to both (no pong at all). Not pongs for all 50.
    harness: Harness = await start_server(rate_limit=0.001, rate_burst=5, rate_strikes=3)
    client = await _pipelined_connect(harness, "/ws/s/early", _huge_frame_header())
    await client.stream.send_all(client_frame(PING, b"p") * 50)
    seen, code = await _until_closed(client)
    pongs = [e for e in seen if isinstance(e, Pong)]
    assert len(pongs) <= 5, (len(pongs), code)


async def test_a_frame_header_sent_with_the_head_does_not_blind_the_fragment_limit(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(max_fragments=4)
    client = await _pipelined_connect(harness, "/ws/s/early", _huge_frame_header())
    text = b'{"type":"ping"}'
    frames = [client_frame(OPCODE_TEXT if i == 0 else 0x0, text[i : i + 1], fin=i == len(text) - 1)
              for i in range(len(text))]
    await client.stream.send_all(b"".join(frames))
    seen, code = await _until_closed(client)
    # A ping split into 15 frames is never answered (max_fragments=4).
    assert not any(isinstance(e, TextMessage) and "pong" in e.data for e in seen), (seen, code)


async def test_frames_sent_with_the_head_are_frames_to_the_server_too(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    # (RFC 6455 says a client waits for the 101; one that doesn't gets its
    # messages read, not silently dropped by wsproto while counted here.)
    harness: Harness = await start_server()
    client = await _pipelined_connect(harness, "/ws/s/eager", client_frame(TEXT, b'{"type":"ping"}'))
    await client.expect("pong")


# -- 3. Integer literals beyond double range are relayed and stored ------------
#
# Qt's QJsonDocument (Optiverse) refuses an integer literal beyond double
# range as it refuses 1e400 (QJsonParseError::IllegalNumber: the whole
# message is lost). Kept "exact", relayed and stored, it made every
# sync:state of the session unreadable to Optiverse.


def _qt_accepts(text: str) -> bool:
    """Whether Qt's JSON parser takes this text (its rule where PyQt6 is missing:
    every number within double range)."""
    try:
        from PyQt6.QtCore import QByteArray, QJsonDocument, QJsonParseError
    except ImportError:
        import json
        import math

        def finite(literal: str) -> float:
            value = float(literal)
            if not math.isfinite(value):
                raise ValueError(literal)
            return value

        try:
            json.loads(text, parse_int=finite, parse_float=finite)
        except ValueError:
            return False
        return True
    error = QJsonParseError()
    QJsonDocument.fromJson(QByteArray(text.encode("utf-8")), error)
    return error.error == QJsonParseError.ParseError.NoError


async def test_an_integer_beyond_double_range_never_reaches_a_qt_peer(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    huge = "9" * 400
    frame = ('{"type":"command","command":{"action":"add_item","item_type":"lens",'
             '"item_id":"a","data":{"v":' + huge + '}}}')
    assert not _qt_accepts(frame)
    async with harness.joined("s", "sender") as sender:
        await sender.send(frame)
        with trio.fail_after(HANG):
            reply = await sender.recv()
        async with harness.joined("s", "newcomer") as newcomer:
            await newcomer.send({"type": "sync:request"})
            with trio.fail_after(HANG):
                while True:
                    text = await newcomer.ws.get_message()
                    if '"sync:state"' in text:
                        break
    assert _qt_accepts(text), (reply, text[:200])


# -- 4. Connections still sending their request head escape the per-address limit
#
# The limit is checked only once a head is complete (serving._upgrade), so
# one address can hold any number of connections that trickle a head, each
# for the whole handshake timeout (a task, an h11 parser, up to 16 KiB, a
# file descriptor): a slowloris from one address fills the server's file
# descriptors while `--max-connections-per-ip` says 500.


async def test_heads_in_progress_are_held_to_the_per_address_limit(
    start_server: Any, autojump_clock: trio.abc.Clock
) -> None:
    harness: Harness = await start_server(max_connections_per_ip=2, handshake_timeout=10)
    streams = [harness.listener.connect() for _ in range(20)]
    for stream in streams:
        try:
            await stream.send_all(b"GET /ws/s/u HTTP/1.1\r\nHost: x\r\n")
        except trio.BrokenResourceError:
            pass  # refused already
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep(2)  # well within the handshake timeout
    assert harness.server.web.tcp_connections <= 2
    # The ones over the limit were told so (or just closed), not kept waiting.
    with trio.fail_after(1):
        answer = await streams[-1].receive_some(4096)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 429 "), answer


async def test_a_graceful_stop_does_not_wait_for_connections_refused_before_their_head(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A graceful stop drops the connections still sending their head at
    # once (_reading_heads). One refused before its head (over the
    # per-address limit: 429, then _linger) must not hold the stop up either:
    # under a flood from one address there are many of them.
    from collab_trio.testing import start_memory_server

    async with trio.open_nursery() as nursery:
        harness = await start_memory_server(nursery, max_connections_per_ip=1, handshake_timeout=30)
        first = harness.listener.connect()
        second = harness.listener.connect()
        await first.send_all(b"GET /ws/s/u HTTP/1.1\r\n")
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(1):
            answer = await second.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 429 "), answer
        started = trio.current_time()
        harness.server.request_shutdown()
    stopped = trio.current_time() - started
    assert stopped < 0.5, stopped
