"""Fault injection: slow and silent peers, resets, storms, deaf closers, handshake garbage.

Every scenario is bounded in count and time. Where time is the point
(idle limits, close and shutdown grace periods) the in-memory harness runs
under autojump_clock and the assertions name exact virtual times; where the
kernel is the point (buffers filling, RSTs, file descriptors, a process under
a connection storm) the traffic is real, on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import signal
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import CloseConnection

from collab_trio.config import ServerConfig
from collab_trio.server import CollabServer, serve
from collab_trio.testing import (
    HANG,
    OPCODE_TEXT,
    Harness,
    MemoryListener,
    RawClient,
    client_frame,
    raw_connect,
    server_process,
    tcp_client,
)

async def record_until_eof(client: RawClient, log: list[tuple[float, Any]]) -> None:
    """Read passively (a memory stream never pushes back), noting when each thing arrives."""
    while True:
        message = await client.next_message()
        log.append((trio.current_time(), message))
        if message is None:
            return


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The server met nothing it calls an internal error (log.exception and the like)."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def close_code(item: Any) -> int | None:
    return item.code if isinstance(item, CloseConnection) else None


async def settle_until(condition: Callable[[], bool], *, timeout: float, rounds: int = 2000) -> None:
    """Let the server run until `condition()` holds: settle, check, repeat (bounded)."""
    with trio.fail_after(timeout):
        for _ in range(rounds):
            if condition():
                return
            # Real sockets: an RST or FIN wakes a task only once the kernel has
            # delivered it, so give the run loop a short quiet spell each round.
            await trio.testing.wait_all_tasks_blocked(cushion=0.005)
    assert condition(), "condition still false after the bounded number of rounds"


@asynccontextmanager
async def loopback_server(**settings: Any) -> AsyncIterator[CollabServer]:
    """An in-process server on a real 127.0.0.1 socket with a port chosen by the kernel."""
    settings.setdefault("store", "memory")
    config = ServerConfig(host="127.0.0.1", port=0, **settings)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, config)
        yield server
        nursery.cancel_scope.cancel()


def command(sender: str, i: int, pad: str = "") -> dict[str, Any]:
    return {
        "type": "command",
        "command": {
            "action": "add_item",
            "item_type": "lens",
            "item_id": f"{sender}-{i}",
            "data": {"x_mm": float(i), "pad": pad},
        },
    }


# -- 1. a client that never reads --------------------------------------------------


async def test_never_reading_client_is_closed_1013_and_others_lose_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue_bytes = 16 * 32_768  # 16 commands queued beyond what the kernel holds
    pad = "p" * 32_768  # 32 KiB a command: kernel buffers fill after a few dozen
    per_sender_cap = 300  # bound: stop even if the kernel could swallow more
    after_close = 20  # keep broadcasting this long after the 1013, to see nothing is lost
    senders = ("alice", "bob")
    received: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": [], "carol": []}
    acked: dict[str, trio.MemorySendChannel[int]] = {}

    with trio.fail_after(60):
        async with loopback_server(max_queue_bytes=queue_bytes, close_timeout=HANG) as server:
            registry = server.registry
            assert registry is not None
            port = server.port

            # The never-reading client: a small receive buffer, upgrade by hand, then deaf.
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            slow = RawClient(trio.SocketStream(sock))
            try:
                await slow.upgrade("/ws/s/slow")

                async def reader(ws: WebSocketConnection, name: str) -> None:
                    try:
                        while True:
                            message = json.loads(await ws.get_message())
                            received[name].append(message)
                            if message["type"] == "ack":
                                acked[name].send_nowait(message["seq"])
                    except ConnectionClosed:
                        pass

                async with (
                    tcp_client(port, "/ws/s/alice") as alice,
                    tcp_client(port, "/ws/s/bob") as bob,
                    tcp_client(port, "/ws/s/carol") as carol,
                    trio.open_nursery() as readers,
                ):
                    clients = {"alice": alice, "bob": bob, "carol": carol}
                    ack_receivers = {}
                    for name, ws in clients.items():
                        acked[name], ack_receivers[name] = trio.open_memory_channel[int](1000)
                        readers.start_soon(reader, ws, name)
                    session = registry.sessions["s"]
                    slow_conn = session.members["slow"]
                    await settle_until(lambda: len(session.members) == 4, timeout=HANG)

                    sent: dict[str, int] = {}

                    async def send_lockstep(name: str) -> None:
                        # One command in flight per sender: the senders and carol
                        # always keep up, so only the deaf client can overflow.
                        extra = 0
                        for i in range(per_sender_cap):
                            await clients[name].send_message(json.dumps(command(name, i, pad)))
                            await ack_receivers[name].receive()
                            sent[name] = i + 1
                            if slow_conn.closing:
                                extra += 1
                                if extra > after_close:
                                    return

                    async with trio.open_nursery() as sending:
                        for name in senders:
                            sending.start_soon(send_lockstep, name)

                    assert slow_conn.close_code == 1013
                    assert "slow" not in session.members
                    total = sum(sent.values())

                    def everything_arrived() -> bool:
                        # Each client sees every seq once: as a relay or as its own ack.
                        return all(
                            len([m for m in messages if m["type"] in ("command", "ack")]) >= total
                            for messages in received.values()
                        )

                    await settle_until(everything_arrived, timeout=HANG)
                    readers.cancel_scope.cancel()

                # Now the deaf client reads: what was in flight, then the 1013 close.
                code = reason = None
                with trio.fail_after(HANG):
                    while (message := await slow.next_message()) is not None:
                        if isinstance(message, CloseConnection):
                            code, reason = message.code, message.reason
                            await slow.answer_close(message)
                            break
                assert code == 1013, code
                assert "too slow" in reason
            finally:
                await slow.stream.aclose()

    print(f"commands acknowledged per sender: {sent}")
    for name in ("alice", "bob", "carol"):
        messages = received[name]
        relayed = [m for m in messages if m["type"] == "command"]
        acks = [m["seq"] for m in messages if m["type"] == "ack"]
        # Relayed commands come in seq order with no gap: every seq is either
        # this client's own ack or a relay, exactly once.
        seqs = [m["seq"] for m in relayed]
        assert seqs == sorted(seqs)
        assert sorted(seqs + acks) == list(range(1, total + 1)), name
        others = [s for s in senders if s != name]
        for other in others:
            ids = [m["command"]["item_id"] for m in relayed if m["user_id"] == other]
            assert ids == [f"{other}-{i}" for i in range(sent[other])]
        assert all(m["command"]["data"]["pad"] == pad for m in relayed)
        left = [m for m in messages if m["type"] == "user:left"]
        assert [(m["user_id"], m["reason"]) for m in left] == [("slow", "too_slow")]
    assert_no_errors_logged(caplog)


# -- 2. a silent half-open client ----------------------------------------------------


@pytest.mark.parametrize("transport", ["buffered", "lockstep"])
async def test_silent_client_closed_at_idle_timeout_then_given_up_after_close_timeout(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock, transport: str
) -> None:
    # "buffered": the server's close frame lands in a buffer nobody answers from;
    # "lockstep": the peer reads nothing, so even the close frame can't be sent.
    idle_timeout, close_timeout = 10, 3
    # The write timeout is longer: this is about the idle limit (see
    # test_outbound.py for a socket that takes nothing).
    harness = await start_server(idle_timeout=idle_timeout, close_timeout=close_timeout, write_timeout=60)
    start = trio.current_time()
    mute = await raw_connect(harness, "/ws/s/mute", lockstep=transport == "lockstep")
    session = harness.registry.sessions["s"]
    mute_conn = session.members["mute"]
    mute_log: list[tuple[float, Any]] = []
    bob_log: list[tuple[float, dict[str, Any]]] = []

    async with harness.joined("s", "bob") as bob, trio.open_nursery() as nursery:
        if transport == "buffered":
            nursery.start_soon(record_until_eof, mute, mute_log)

        async def bob_reads() -> None:
            while True:
                message = await bob.recv()
                bob_log.append((trio.current_time() - start, message))

        async def bob_pings() -> None:
            for _ in range(10):  # bob stays alive well past mute's limit
                await trio.sleep(4)
                await bob.send({"type": "ping"})

        nursery.start_soon(bob_reads)
        nursery.start_soon(bob_pings)
        with trio.fail_after(idle_timeout + close_timeout + HANG):
            await mute_conn.finished.wait()
        finished_at = trio.current_time() - start
        nursery.cancel_scope.cancel()

    # Closed at the idle limit, given up exactly close_timeout later.
    assert mute_conn.close_code == 4000
    assert finished_at == idle_timeout + close_timeout
    events = [(t, m["type"], m.get("user_id"), m.get("reason")) for t, m in bob_log if m["type"] != "pong"]
    # mute joined first, so it was the host: bob takes over.
    assert events == [
        (idle_timeout, "user:left", "mute", "idle_timeout"),
        (idle_timeout, "host:changed", "bob", None),
    ]
    left = next(m for _, m in bob_log if m["type"] == "user:left")
    assert [u["user_id"] for u in left["users"]] == ["bob"]
    assert len([m for _, m in bob_log if m["type"] == "pong"]) >= 3
    if transport == "buffered":
        # What the silent peer would have found in its buffer: bob's arrival,
        # the 4000 close at the idle limit, then the transport dropped.
        assert [(t - start, m["type"] if isinstance(m, dict) else close_code(m)) for t, m in mute_log] == [
            (0, "user:joined"),
            (idle_timeout, 4000),
            (idle_timeout + close_timeout, None),
        ]
    with trio.fail_after(HANG):
        await session.finished.wait()
    assert harness.registry.sessions == {}
    assert harness.registry.connection_count() == 0
    await mute.stream.aclose()


# -- 3. abrupt resets mid-frame ---------------------------------------------------------


def reset_on_close(stream: trio.SocketStream) -> None:
    """SO_LINGER 0: closing sends an RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_abrupt_resets_mid_frame_leave_no_trace(caplog: pytest.LogCaptureFixture) -> None:
    mid_frame, mid_handshake = 200, 40
    clients = mid_frame + mid_handshake
    handshake_timeout = 2
    request = (
        b"GET /ws/resets/u HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    payload = json.dumps(command("x", 0, "p" * 2000)).encode()
    # Where each upgraded client is cut off (200 of them), after which 40 more are
    # cut off inside the handshake.
    cuts: dict[str, Callable[[], bytes]] = {
        "in the frame header": lambda: client_frame(OPCODE_TEXT, payload)[:3],
        "in the payload": lambda: client_frame(OPCODE_TEXT, payload)[:700],
        "after a frame, in the next": lambda: (
            client_frame(OPCODE_TEXT, payload) + client_frame(OPCODE_TEXT, payload)[:100]
        ),
        "in a fragmented message": lambda: client_frame(OPCODE_TEXT, payload[:50], fin=False) + b"\x80",
    }
    kinds = [*cuts] * (mid_frame // len(cuts)) + ["in the handshake"] * mid_handshake
    assert len(kinds) == clients
    with trio.fail_after(60):
        async with loopback_server(
            handshake_timeout=handshake_timeout, max_users_per_session=clients + 10
        ) as server:
            registry = server.registry
            assert registry is not None
            async with tcp_client(server.port, "/ws/resets/watcher") as watcher:
                assert json.loads(await watcher.get_message())["type"] == "connection:ack"
                left: list[str] = []
                joined: list[str] = []
                pongs: list[dict[str, Any]] = []

                async def watch() -> None:
                    while True:
                        message = json.loads(await watcher.get_message())
                        if message["type"] == "user:left":
                            left.append(message["user_id"])
                        elif message["type"] == "user:joined":
                            joined.append(message["user_id"])
                        elif message["type"] == "pong":
                            pongs.append(message)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    await settle_until(lambda: registry.connection_count() == 1, timeout=HANG)
                    baseline_fds = open_fds()
                    limiter = trio.CapacityLimiter(25)

                    async def reset_one(i: int) -> None:
                        kind = kinds[i]
                        async with limiter:
                            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                            try:
                                reset_on_close(stream)
                                if kind == "in the handshake":
                                    await stream.send_all(request[: 20 + i % 60])
                                else:
                                    client = RawClient(stream)
                                    await client.upgrade(f"/ws/resets/u{i}")
                                    await client.expect("connection:ack")
                                    await stream.send_all(cuts[kind]())
                            finally:
                                await stream.aclose()

                    async with trio.open_nursery() as resets:
                        for i in range(clients):
                            resets.start_soon(reset_one, i)

                    upgraded = {f"u{i}" for i in range(clients) if kinds[i] != "in the handshake"}
                    assert len(upgraded) == mid_frame
                    # Resets after the upgrade are noticed at once; cut handshakes
                    # hold their socket until the handshake timeout.
                    await settle_until(
                        lambda: registry.connection_count() == 1 and set(left) == upgraded,
                        timeout=HANG,
                    )
                    await settle_until(lambda: open_fds() == baseline_fds, timeout=handshake_timeout + HANG)
                    assert sorted(left) == sorted(upgraded)
                    assert sorted(joined) == sorted(upgraded)
                    assert list(registry.sessions) == ["resets"]
                    # The watcher's session carried on through all of it.
                    await watcher.send_message(json.dumps({"type": "ping"}))
                    await settle_until(lambda: len(pongs) == 1, timeout=HANG)
                    nursery.cancel_scope.cancel()
            # And new clients are served as usual.
            async with tcp_client(server.port, "/ws/resets/after") as after:
                assert json.loads(await after.get_message())["type"] == "connection:ack"
                await after.send_message(json.dumps({"type": "ping"}))
                assert json.loads(await after.get_message())["type"] == "pong"
    assert_no_errors_logged(caplog)


# -- 4. a reconnect storm against a real server process --------------------------------


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


@pytest.fixture
def fd_limit() -> Iterator[Callable[[int], None]]:
    """`fd_limit(n)`: make sure this process (and its children) may open n files."""
    original = resource.getrlimit(resource.RLIMIT_NOFILE)

    def ensure(needed: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < needed:
            pytest.skip(f"needs {needed} open files; the hard limit is {hard}")

    yield ensure
    resource.setrlimit(resource.RLIMIT_NOFILE, original)


async def test_reconnect_storm_all_accepted_with_correct_user_lists(fd_limit: Callable[[int], None]) -> None:
    sessions, per_session = 10, 30
    total = sessions * per_session
    window = 2.0  # every client starts connecting within this many seconds
    fd_limit(4 * total + 256)  # our sockets and the server's (it inherits the limit)
    acks: dict[str, dict[str, Any]] = {}
    all_joined = trio.Event()
    all_converged = trio.Event()
    converged: set[str] = set()
    quit_storm = trio.Event()
    observers_saw_everyone_leave = trio.Event()
    departed: dict[str, set[str]] = {f"storm-{s}": set() for s in range(sessions)}

    def users_of(message: dict[str, Any]) -> list[str]:
        return [u["user_id"] for u in message["users"]]

    async def storm_client(port: int, start_at: float, index: int) -> None:
        session, user = f"storm-{index % sessions}", f"user-{index}"
        await trio.sleep_until(start_at)
        async with tcp_client(port, f"/ws/{session}/{user}") as ws:
            ack = json.loads(await ws.get_message())
            assert ack["type"] == "connection:ack", ack
            acks[user] = ack
            if len(acks) == total:
                all_joined.set()
            users = users_of(ack)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_set, quit_storm, nursery.cancel_scope)
                while True:
                    if len(users) == per_session + 1:
                        # The joins after this one's ack all reached it.
                        converged.add(user)
                        if len(converged) == total:
                            all_converged.set()
                    message = json.loads(await ws.get_message())
                    if message["type"] == "user:joined":
                        users = users_of(message)

    async def observer(port: int, session: str, ready: trio.Event) -> None:
        # Joins first and stays: it sees every storm user arrive and leave.
        async with tcp_client(port, f"/ws/{session}/observer") as ws:
            assert json.loads(await ws.get_message())["type"] == "connection:ack"
            ready.set()
            while len(departed[session]) < per_session:
                message = json.loads(await ws.get_message())
                if message["type"] == "user:left":
                    departed[session].add(message["user_id"])
                    last_users = users_of(message)
            assert last_users == ["observer"]
            if all(len(d) == per_session for d in departed.values()):
                observers_saw_everyone_leave.set()

    with trio.fail_after(60):
        async with server_process("--store", "memory") as server, trio.open_nursery() as nursery:
            for s in range(sessions):
                ready = trio.Event()
                nursery.start_soon(observer, server.port, f"storm-{s}", ready)
                await ready.wait()
            start = trio.current_time()
            async with trio.open_nursery() as storm:
                for i in range(total):
                    storm.start_soon(storm_client, server.port, start + window * i / total, i)
                with trio.fail_after(30):
                    await all_joined.wait()
                accepted_in = trio.current_time() - start

                # Every session: a chain of acks, each the previous user list plus the newcomer.
                for s in range(sessions):
                    members = [f"user-{i}" for i in range(total) if i % sessions == s]
                    chain = sorted((acks[u] for u in members), key=lambda a: len(a["users"]))
                    assert [len(a["users"]) for a in chain] == list(range(2, per_session + 2))
                    previous = ["observer"]
                    for ack in chain:
                        assert ack["session_id"] == f"storm-{s}"
                        assert users_of(ack) == [*previous, ack["user_id"]]
                        # The observer joined first and stays host throughout.
                        assert [u["is_host"] for u in ack["users"]] == [True] + [False] * len(previous)
                        assert not ack["is_host"]
                        previous = users_of(ack)

                # The joins that came after each ack reached everyone: lists converge.
                with trio.fail_after(HANG):
                    await all_converged.wait()
                quit_storm.set()

            with trio.fail_after(HANG):
                await observers_saw_everyone_leave.wait()
            # The server still answers a newcomer, alone in a fresh session.
            async with tcp_client(server.port, "/ws/after-storm/late") as late:
                ack = json.loads(await late.get_message())
                assert users_of(ack) == ["late"] and ack["is_host"]
                await late.send_message(json.dumps({"type": "ping"}))
                assert json.loads(await late.get_message())["type"] == "pong"
            # server_process reads the output until the process ends: stop it cleanly.
            server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(HANG):
                assert await server.process.wait() == 0
    print(f"{total} clients accepted in {accepted_in:.2f} s")
    assert "Traceback" not in server.output
    assert server.output.count("joined session storm-") == total + sessions


# -- 5. a client that never answers the close handshake ------------------------------


async def test_deaf_client_replaced_4001_is_cut_after_close_timeout(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    close_timeout = 4
    harness = await start_server(close_timeout=close_timeout)
    deaf = await raw_connect(harness, "/ws/s/alice")
    session = harness.registry.sessions["s"]
    old = session.members["alice"]
    deaf_log: list[tuple[float, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(record_until_eof, deaf, deaf_log)
        async with harness.joined("s", "alice") as alice:
            replaced_at = trio.current_time()
            assert old.close_code == 4001 and not old.finished.is_set()
            # The new connection is fully served while the old one hangs on.
            await trio.sleep(1)
            await alice.send({"type": "ping"})
            await alice.expect("pong")
            with trio.fail_after(close_timeout + HANG):
                await old.finished.wait()
            assert trio.current_time() - replaced_at == close_timeout
            assert session.members["alice"] is not old
            await alice.send(command("alice", 1))
            assert (await alice.expect("ack"))["seq"] == 1
    assert [(t - replaced_at, close_code(m)) for t, m in deaf_log] == [(0, 4001), (close_timeout, None)]
    assert "replaced" in deaf_log[0][1].reason
    with trio.fail_after(HANG):
        await session.finished.wait()
    assert harness.registry.sessions == {}
    await deaf.stream.aclose()


@pytest.mark.parametrize(("close_timeout", "shutdown_timeout"), [(5, 2), (2, 5)])
async def test_deaf_client_at_shutdown_is_cut_at_the_first_deadline(
    autojump_clock: trio.abc.Clock, close_timeout: float, shutdown_timeout: float
) -> None:
    listener = MemoryListener()
    config = ServerConfig(store="memory", close_timeout=close_timeout, shutdown_timeout=shutdown_timeout)
    deaf_log: list[tuple[float, Any]] = []
    polite_close: tuple[float, int] | None = None
    with trio.fail_after(HANG + max(close_timeout, shutdown_timeout)):
        async with trio.open_nursery() as harness_nursery:
            server = await harness_nursery.start(partial(serve, config, listeners=[listener]))
            harness = Harness(server, listener, harness_nursery)
            deaf = await raw_connect(harness, "/ws/s/deaf")
            deaf_conn = harness.registry.sessions["s"].members["deaf"]
            async with trio.open_nursery() as clients:
                clients.start_soon(record_until_eof, deaf, deaf_log)
                async with harness.joined("s", "polite") as polite:
                    await trio.testing.wait_all_tasks_blocked()
                    requested_at = trio.current_time()
                    server.request_shutdown()
                    polite_close = (trio.current_time() - requested_at, (await polite.expect_closed())[0])
        stopped_after = trio.current_time() - requested_at
    # A polite client is let go at once; the deaf one holds the stop up until
    # the first of the two deadlines, never longer.
    first_deadline = min(close_timeout, shutdown_timeout)
    assert polite_close == (0, 1001)
    assert stopped_after == first_deadline
    assert deaf_conn.finished.is_set()
    assert server.registry is not None and server.registry.sessions == {}
    assert [(t - requested_at, m["type"] if isinstance(m, dict) else close_code(m)) for t, m in deaf_log] == [
        (0, "user:joined"),
        (0, 1001),
        (first_deadline, None),
    ]
    assert deaf_log[1][1].reason == "server shutting down"
    await deaf.stream.aclose()


# -- 6. handshake garbage -----------------------------------------------------------------

UPGRADE = (
    b"GET /ws/s/u HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
_garbage = random.Random(20261126).randbytes(3000)
BAD_HANDSHAKES = {
    # what the client sends: the status h11 or wsproto answers with (None: no answer, dropped)
    "random bytes": (_garbage + b"\r\n\r\n", 400),
    "random bytes, never finished": (_garbage.replace(b"\n", b"")[:1500], None),
    "64 KiB header": (UPGRADE + b"Sec-WebSocket-Version: 13\r\nX-Pad: " + b"a" * 65536 + b"\r\n\r\n", 431),
    "plain GET": (b"GET /ws/s/u HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n", 426),
    "Sec-WebSocket-Version: 8": (UPGRADE + b"Sec-WebSocket-Version: 8\r\n\r\n", 426),
    "no Sec-WebSocket-Version": (UPGRADE + b"\r\n", 400),
    "Host not a host name": (UPGRADE.replace(b"localhost", b"\xff\xfe") + b"Sec-WebSocket-Version: 13\r\n\r\n", 400),
    "Host not IDNA": (UPGRADE.replace(b"localhost", b"xn--a") + b"Sec-WebSocket-Version: 13\r\n\r\n", 400),
    "POST": (b"POST /ws/s/u HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}", 426),
}


async def send_and_read_all(port: int, data: bytes) -> tuple[bytes, str]:
    """Send `data` while reading until the server closes; returns (response, how it ended)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    response = b""

    async def send() -> None:
        # The server may answer and close before it has read everything we send.
        with suppress(trio.BrokenResourceError):
            await stream.send_all(data)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            try:
                while chunk := await stream.receive_some(65536):
                    response += chunk
            except trio.BrokenResourceError:
                # Closed with part of our request unread: the kernel resets the
                # connection, after delivering what the server sent before.
                return response, "reset"
            return response, "eof"
    finally:
        await stream.aclose()


@pytest.mark.parametrize("case", list(BAD_HANDSHAKES))
async def test_bad_handshake_is_refused_and_the_server_carries_on(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, status = BAD_HANDSHAKES[case]
    handshake_timeout = 1
    with trio.fail_after(HANG):
        async with loopback_server(handshake_timeout=handshake_timeout) as server:
            started = trio.current_time()
            response, ending = await send_and_read_all(server.port, data)
            took = trio.current_time() - started
            assert not response.startswith(b"HTTP/1.1 101")
            if status is None:
                # Never a complete request: dropped silently at the handshake timeout.
                assert response == b""
                assert handshake_timeout <= took < handshake_timeout + 2
            else:
                head = response.split(b"\r\n", 1)[0]
                assert head.startswith(f"HTTP/1.1 {status} ".encode()), response
                assert took < handshake_timeout, "refused at once, not at the timeout"
            assert server.registry is not None and server.registry.sessions == {}
            async with tcp_client(server.port, "/ws/s/honest") as honest:
                assert json.loads(await honest.get_message())["type"] == "connection:ack"
                await honest.send_message(json.dumps({"type": "ping"}))
                assert json.loads(await honest.get_message())["type"] == "pong"
    assert_no_errors_logged(caplog)
    status_line = response.split(b"\r\n", 1)[0]
    print(f"{case}: {status_line!r}, then {ending}, in {took:.3f} s")


async def test_garbage_after_the_upgrade_closes_only_that_client(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(HANG):
        async with loopback_server() as server, tcp_client(server.port, "/ws/s/honest") as honest:
            assert json.loads(await honest.get_message())["type"] == "connection:ack"
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            try:
                vandal = RawClient(stream)
                await vandal.upgrade("/ws/s/vandal")
                await vandal.expect("connection:ack")
                assert json.loads(await honest.get_message())["type"] == "user:joined"
                # Unmasked frames with reserved bits and opcodes: a protocol error.
                await stream.send_all(b"\xff\xff" + _garbage[:200])
                # wsproto reports the error as if the peer had closed with 1002,
                # so trio-websocket drops the transport without a close frame.
                ending = await vandal.next_message()
                assert ending is None or close_code(ending) == 1002, ending
            finally:
                await stream.aclose()
            left = json.loads(await honest.get_message())
            assert (left["type"], left["user_id"]) == ("user:left", "vandal")
            await honest.send_message(json.dumps({"type": "ping"}))
            assert json.loads(await honest.get_message())["type"] == "pong"
    assert_no_errors_logged(caplog)
