"""The internal endpoint (--metrics-address): /metrics, /livez and /readyz.

Real HTTP over loopback (an h11 client, or raw bytes for malformed input)
against a real server with real WebSocket clients; the exposition text is
parsed with prometheus_client's own parser. The readiness rules, the
address syntax and the histogram arithmetic are also tested as plain
functions.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected
from wsproto.events import CloseConnection

from collab_trio import __version__
from collab_trio.config import ServerConfig, split_address
from collab_trio.counters import Counters, Histogram
from collab_trio.httpd import MAX_HEAD_BYTES
from collab_trio.metrics import STORE_FAILURE_HOLD, Monitor, readiness
from collab_trio.server import CollabServer, serve
from collab_trio.store import SQLiteStore
from collab_trio.store.sqlite import database_path
from collab_trio.testing import (
    HANG,
    LOOPBACK,
    Harness,
    MemoryListener,
    add_item,
    assert_port_binds_again,
    expect_json,
    ping,
    raw_connect,
    server_process,
    tcp_client,
)

Samples = dict[str, float]


# ---------------------------------------------------------------------------
# An HTTP client (h11) and the exposition parsed


async def http(port: int, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh loopback connection: (status, headers, body)."""
    with trio.fail_after(HANG):
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method=method, target=target, headers=[("Host", "metrics")])
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            return await _response(stream, conn)


async def _response(stream: trio.abc.Stream, conn: h11.Connection) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body
        else:
            raise AssertionError(f"unexpected {event!r}")


async def raw_http(port: int, data: bytes) -> bytes:
    """Send these bytes, read until the server closes; everything it answered."""
    with trio.fail_after(HANG):
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            await stream.send_all(data)
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
            return received


def sample_key(name: str, labels: dict[str, str]) -> str:
    inside = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inside}}}" if inside else name


async def scrape(port: int) -> Samples:
    """GET /metrics, parsed: every sample by `name{label="value",...}`."""
    status, headers, body = await http(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    return {
        sample_key(sample.name, sample.labels): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def moved(before: Samples, after: Samples, *keys: str) -> dict[str, float]:
    return {key: after[key] - before[key] for key in keys}


def metrics_port(server: CollabServer) -> int:
    assert server.metrics is not None
    return server.metrics.listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]


def received(kind: str) -> str:
    return f'collab_trio_messages_received_total{{type="{kind}"}}'


def sent(kind: str) -> str:
    return f'collab_trio_messages_sent_total{{type="{kind}"}}'


def config(**settings: Any) -> ServerConfig:
    settings = {"host": LOOPBACK, "port": 0, "store": "memory", "metrics_address": f"{LOOPBACK}:0", **settings}
    return ServerConfig(**settings)


# ---------------------------------------------------------------------------
# /metrics during a session


async def test_counters_move_between_two_scrapes_of_a_live_session() -> None:
    with trio.fail_after(3 * HANG):
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(serve, config())
            port = metrics_port(server)
            before = await scrape(port)
            assert before[sample_key("collab_trio_build_info", {"version": __version__})] == 1
            assert before["collab_trio_ready"] == 1
            async with tcp_client(server.port, "/ws/s/alice") as alice, tcp_client(server.port, "/ws/s/bob") as bob:
                ack = await expect_json(alice, "connection:ack")
                await expect_json(bob, "connection:ack")
                await expect_json(alice, "user:joined")
                await alice.send_message(json.dumps(add_item("lens-1")))
                await expect_json(alice, "ack")
                await expect_json(bob, "command")
                await bob.send_message(json.dumps(ping()))
                await expect_json(bob, "pong")
                await bob.send_message("not json")
                assert (await expect_json(bob, "error"))["code"] == "invalid_json"
                during = await scrape(port)
                assert {k: during[k] for k in ("collab_trio_connections", "collab_trio_sessions")} == {
                    "collab_trio_connections": 2,
                    "collab_trio_sessions": 1,
                }
                assert during["collab_trio_tcp_connections"] == 2
            # A resume that gets the op it missed, and one from another epoch.
            async with tcp_client(server.port, f"/ws/s/carol?since=0&epoch={ack['epoch']}") as carol:
                await expect_json(carol, "connection:ack")
                assert len((await expect_json(carol, "sync:ops"))["ops"]) == 1
            async with tcp_client(server.port, "/ws/s/dave?since=0&epoch=elsewhere") as dave:
                await expect_json(dave, "connection:ack")
                await expect_json(dave, "sync:state")
            after = await scrape(port)
            server.request_shutdown()

    assert moved(before, during, received("command"), received("ping"), received("other"), received("cursor")) == {
        received("command"): 1,
        received("ping"): 1,
        received("other"): 1,
        received("cursor"): 0,
    }
    assert moved(
        before, during, sent("connection:ack"), sent("user:joined"), sent("ack"), sent("command"), sent("pong"),
        sent("error"),
    ) == {
        sent("connection:ack"): 2,
        sent("user:joined"): 1,
        sent("ack"): 1,
        sent("command"): 1,  # the relay to bob
        sent("pong"): 1,
        sent("error"): 1,
    }
    # One commit of one change, acknowledged after it.
    assert moved(
        before, during, "collab_trio_commit_batch_size_count", "collab_trio_commit_batch_size_sum",
        "collab_trio_commit_duration_seconds_count", "collab_trio_ack_latency_seconds_count",
    ) == {
        "collab_trio_commit_batch_size_count": 1,
        "collab_trio_commit_batch_size_sum": 1,
        "collab_trio_commit_duration_seconds_count": 1,
        "collab_trio_ack_latency_seconds_count": 1,
    }
    assert during['collab_trio_commit_batch_size_bucket{le="1.0"}'] == 1
    assert during['collab_trio_ack_latency_seconds_bucket{le="+Inf"}'] == 1
    # At least the two handshake answers and every frame above went out.
    assert during["collab_trio_sent_bytes_total"] - before["collab_trio_sent_bytes_total"] > 2 * 129 + 6 * 20
    assert moved(
        during, after, 'collab_trio_resumes_total{outcome="ops"}', 'collab_trio_resumes_total{outcome="state_epoch_changed"}'
    ) == {'collab_trio_resumes_total{outcome="ops"}': 1, 'collab_trio_resumes_total{outcome="state_epoch_changed"}': 1}
    # Counters never go back; the process collector is there too.
    assert after["collab_trio_sent_bytes_total"] > during["collab_trio_sent_bytes_total"]
    assert after["process_resident_memory_bytes"] > 0


async def test_auth_failures_and_rate_limited_messages_are_counted(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[tokens."editor-token-1234"]\nrole = "editor"\nsessions = ["lab"]\n', encoding="utf-8")
    with trio.fail_after(3 * HANG):
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(
                serve, config(tokens_file=str(tokens), rate_limit=1, rate_burst=2)
            )
            port = metrics_port(server)
            before = await scrape(port)
            for path, status in (("/ws/lab/eve", 401), ("/ws/other/eve?token=editor-token-1234", 403)):
                with pytest.raises(ConnectionRejected) as refused:
                    async with tcp_client(server.port, path):
                        pass
                assert refused.value.status_code == status
            async with tcp_client(server.port, "/ws/lab/ann?token=editor-token-1234") as ann:
                await expect_json(ann, "connection:ack")
                for _ in range(4):  # a burst of 2 is allowed, then 1 a second
                    await ann.send_message(json.dumps(ping()))
                await expect_json(ann, "pong")
                await expect_json(ann, "pong")
                assert (await expect_json(ann, "error"))["code"] == "rate_limited"
                after = await scrape(port)
            server.request_shutdown()
    assert moved(
        before, after,
        'collab_trio_auth_failures_total{reason="invalid_token"}',
        'collab_trio_auth_failures_total{reason="session_not_allowed"}',
        'collab_trio_auth_failures_total{reason="origin_not_allowed"}',
        "collab_trio_rate_limited_messages_total",
    ) == {
        'collab_trio_auth_failures_total{reason="invalid_token"}': 1,
        'collab_trio_auth_failures_total{reason="session_not_allowed"}': 1,
        'collab_trio_auth_failures_total{reason="origin_not_allowed"}': 0,
        "collab_trio_rate_limited_messages_total": 2,
    }


async def test_moves_held_over_the_rate_limit_are_counted(tmp_path: Path) -> None:
    with trio.fail_after(3 * HANG):
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(serve, config(rate_limit=1, rate_burst=2))
            port = metrics_port(server)
            before = await scrape(port)
            async with tcp_client(server.port, "/ws/lab/ann") as ann:
                await expect_json(ann, "connection:ack")
                add = {"action": "add_item", "item_type": "lens", "item_id": "L1", "data": {"x_mm": 0.0}}
                await ann.send_message(json.dumps({"type": "command", "command": add}))
                await expect_json(ann, "ack")
                for x in range(1, 6):  # one within the burst, then held, each replacing the last
                    move = {**add, "action": "move_item", "data": {"x_mm": float(x)}}
                    await ann.send_message(json.dumps({"type": "command", "command": move}))
                await expect_json(ann, "ack")
                await expect_json(ann, "ack")  # the last move, at the rate
                after = await scrape(port)
            server.request_shutdown()
    assert moved(
        before, after,
        "collab_trio_held_messages_total", "collab_trio_held_superseded_messages_total",
        "collab_trio_rate_limited_messages_total",
    ) == {
        "collab_trio_held_messages_total": 4,
        "collab_trio_held_superseded_messages_total": 3,
        "collab_trio_rate_limited_messages_total": 0,
    }


async def test_a_slow_client_closed_with_1013_is_counted_by_reason(start_server: Any) -> None:
    harness: Harness = await start_server(max_queue_bytes=1200, close_timeout=HANG, metrics_address=f"{LOOPBACK}:0")
    port = metrics_port(harness.server)
    slow_closes = 'collab_trio_slow_client_disconnects_total{reason="queue_bytes"}'
    with trio.fail_after(3 * HANG):
        async with harness.joined("s", "sender") as sender:
            async with harness.client("s", "slow", lockstep=True) as slow:
                await sender.expect("user:joined")
                before = await scrape(port)
                assert before[slow_closes] == 0
                # slow reads nothing from here on; its transport blocks the server.
                member = harness.registry.sessions["s"].members["slow"]
                for i in range(60):
                    await sender.send(add_item(f"item-{i}"))
                    _, left = await sender.expect_ack()
                    assert left in ([], ["slow"])  # the relay of this change may close slow
                    if member.close_code is not None:
                        break
                assert member.close_code == 1013
                after = await scrape(port)
                assert (await slow.expect_closed())[0] == 1013
    assert after[slow_closes] == 1
    assert after['collab_trio_slow_client_disconnects_total{reason="write_timeout"}'] == 0


# ---------------------------------------------------------------------------
# /readyz and /livez


async def test_readyz_is_503_while_draining_and_the_endpoint_is_gone_after() -> None:
    listener = MemoryListener()
    with trio.fail_after(3 * HANG):
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(
                lambda task_status: serve(
                    config(shutdown_timeout=60), listeners=[listener], task_status=task_status
                )
            )
            port = metrics_port(server)
            assert await http(port, "/readyz") == (200, _headers(6), b"ready\n")
            # A client that does not answer the close: the graceful stop waits for it.
            deaf = await raw_connect(Harness(server, listener, nursery), "/ws/s/deaf")
            server.request_shutdown()
            close = await deaf.next_message()
            assert isinstance(close, CloseConnection) and close.code == 1001
            status, _, body = await http(port, "/readyz")
            assert (status, body) == (503, b"draining: the server is shutting down\n")
            assert (await http(port, "/livez"))[::2] == (200, b"ok\n")
            during = await scrape(port)
            assert during["collab_trio_ready"] == 0
            await deaf.answer_close(close)
        # serve() has returned: the endpoint is closed and its port free.
    with pytest.raises(OSError):
        await trio.open_tcp_stream(LOOPBACK, port)
    await assert_port_binds_again(port)


def _headers(length: int) -> dict[str, str]:
    return {"content-type": "text/plain; charset=utf-8", "content-length": str(length), "cache-control": "no-store"}


async def test_readyz_is_503_while_the_store_cannot_commit_then_200_again(
    start_server: Any, data_dir: Path
) -> None:
    # Without the pending log, which would take the changes and wait for the
    # lock (test_pending_log.py: its store is unreachable once it gives up).
    store = SQLiteStore(data_dir, busy_timeout=0.2, pending_log=False)
    harness: Harness = await start_server(
        store="sqlite", data_dir=str(data_dir), _store=store, metrics_address=f"{LOOPBACK}:0"
    )
    port = metrics_port(harness.server)
    with trio.fail_after(3 * HANG):
        async with harness.joined("s", "alice") as alice:
            await alice.send(add_item("before"))
            await alice.expect("ack")
            assert (await http(port, "/readyz"))[::2] == (200, b"ready\n")
            # Another process takes the write lock: commits fail, as on a failing disk.
            locker = sqlite3.connect(database_path(data_dir), isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                await alice.send(add_item("lost"))
                assert (await alice.expect("error"))["code"] == "not_persisted"
                status, _, body = await http(port, "/readyz")
                assert status == 503
                assert body.startswith(b"the store cannot commit: ") and body.count(b"\n") == 1
                failing = await scrape(port)
                assert failing["collab_trio_ready"] == 0
                assert failing["collab_trio_commit_failures_total"] == 1
                assert (await http(port, "/livez"))[::2] == (200, b"ok\n")
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            # The next commit succeeds: ready again at once.
            await alice.send(add_item("after"))
            await alice.expect("ack")
            assert (await http(port, "/readyz"))[::2] == (200, b"ready\n")


def test_readiness_rules() -> None:
    ok = dict(accepting=True, draining=False, commit_failed_at=None, commit_error="", now=100.0)
    assert readiness(**ok) == (True, "ready")
    assert readiness(**{**ok, "accepting": False}) == (
        False,
        "starting: the WebSocket port does not accept connections yet",
    )
    assert readiness(**{**ok, "draining": True}) == (False, "draining: the server is shutting down")
    failed = {**ok, "commit_failed_at": 90.0, "commit_error": "database is locked"}
    assert readiness(**failed) == (False, "the store cannot commit: database is locked")
    # With no commit to try again with, it is tried again after the hold.
    assert readiness(**{**failed, "now": 90.0 + STORE_FAILURE_HOLD})[0] is True
    # A successful commit clears the failure at once.
    counters = Counters()
    counters.commit_failed("database is locked", 90.0)
    assert (counters.commit_failed_at, counters.commit_failures) == (90.0, 1)
    counters.commit_succeeded(3, 0.002)
    assert counters.commit_failed_at is None


async def test_readyz_before_the_server_exists_says_starting() -> None:
    monitor = Monitor(Counters())
    response = monitor.respond("GET", "/readyz")
    assert (response.status, response.body) == (
        503,
        b"starting: the WebSocket port does not accept connections yet\n",
    )
    assert monitor.respond("GET", "/livez").status == 200


# ---------------------------------------------------------------------------
# HTTP: bad requests, methods, paths, limits


async def test_http_edge_cases_are_answered_and_nothing_breaks() -> None:
    with trio.fail_after(3 * HANG):
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(serve, config())
            port = metrics_port(server)
            status, _, body = await http(port, "/nope")
            assert (status, body) == (404, b"not found: /nope (try /metrics, /livez or /readyz)\n")
            status, headers, _ = await http(port, "/metrics", method="POST")
            assert (status, headers["allow"]) == (405, "GET, HEAD")
            status, headers, body = await http(port, "/metrics", method="HEAD")
            assert (status, body) == (200, b"") and int(headers["content-length"]) > 1000
            assert (await http(port, "/readyz?verbose=1"))[0] == 200
            # Malformed: 400 and the connection closed.
            answer = await raw_http(port, b"GARBAGE\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ") and b"bad request" in answer
            # A head over the limit: 431, not unbounded buffering.
            answer = await raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 431 ")
            # A body over the limit: 413.
            answer = await raw_http(
                port, b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 10000
            )
            assert answer.startswith(b"HTTP/1.1 413 ")
            # Keep-alive: two requests on one connection.
            stream = await trio.open_tcp_stream(LOOPBACK, port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                for target, expected in (("/livez", b"ok\n"), ("/readyz", b"ready\n")):
                    request = h11.Request(method="GET", target=target, headers=[("Host", "x")])
                    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                    assert (await _response(stream, conn))[::2] == (200, expected)
                    conn.start_next_cycle()
            # The endpoint and the WebSocket server carry on.
            async with tcp_client(server.port, "/ws/s/alice") as alice:
                await expect_json(alice, "connection:ack")
            assert (await http(port, "/livez"))[0] == 200
            server.request_shutdown()


async def test_the_head_limit_holds_however_the_head_arrives() -> None:
    # h11 bounds a head only while it is incomplete: one that completes in
    # the read after the limit was reached got through (up to ~16 KiB).
    with trio.fail_after(3 * HANG):
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(serve, config())
            port = metrics_port(server)

            def head(size: int) -> bytes:
                start = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: "
                return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"

            assert len(head(MAX_HEAD_BYTES)) == MAX_HEAD_BYTES
            last = head(100).replace(b"Host: x", b"Host: x\r\nConnection: close")
            answer = await raw_http(port, head(MAX_HEAD_BYTES) + last)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 200 ") == 2
            for size in (MAX_HEAD_BYTES + 1, MAX_HEAD_BYTES + 100, 12_000, 16_000):
                answer = await raw_http(port, head(size))
                assert answer.startswith(b"HTTP/1.1 431 "), (size, answer[:60])
            # The second request of a connection is bounded the same way.
            answer = await raw_http(port, head(200) + head(12_000))
            assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 431 " in answer
            assert (await http(port, "/livez"))[0] == 200
            server.request_shutdown()


async def test_a_silent_connection_is_dropped_after_the_request_timeout() -> None:
    with trio.fail_after(3 * HANG):
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(serve, config())
            assert server.metrics is not None
            server.metrics.request_timeout = 0.5
            # Before connecting: the server's timer starts once it accepted.
            started = trio.current_time()
            stream = await trio.open_tcp_stream(LOOPBACK, metrics_port(server))
            async with stream:
                await stream.send_all(b"GET /livez HTTP/1.1\r\n")  # and never the rest
                with trio.fail_after(HANG):
                    assert await stream.receive_some(100) == b""  # closed, without an answer
                assert trio.current_time() - started >= 0.5
            assert (await http(metrics_port(server), "/livez"))[0] == 200
            server.request_shutdown()


async def test_connections_over_the_cap_are_dropped_and_the_others_served() -> None:
    with trio.fail_after(3 * HANG):
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(serve, config())
            assert server.metrics is not None
            server.metrics.max_connections = 2
            port = metrics_port(server)
            streams = [await trio.open_tcp_stream(LOOPBACK, port) for _ in range(2)]
            conns = [h11.Connection(h11.CLIENT) for _ in streams]

            async def get(index: int) -> tuple[int, bytes]:
                request = h11.Request(method="GET", target="/livez", headers=[("Host", "x")])
                await streams[index].send_all(conns[index].send(request) + conns[index].send(h11.EndOfMessage()))
                status, _, body = await _response(streams[index], conns[index])
                conns[index].start_next_cycle()
                return status, body

            try:
                assert [await get(0), await get(1)] == [(200, b"ok\n")] * 2
                assert server.metrics.active == 2
                async with await trio.open_tcp_stream(LOOPBACK, port) as third:
                    assert await third.receive_some(100) == b""  # dropped at once
                assert [await get(0), await get(1)] == [(200, b"ok\n")] * 2
            finally:
                for stream in streams:
                    await stream.aclose()
            server.request_shutdown()


# ---------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:0", ("::1", 0)), ("localhost:65535", ("localhost", 65535))],
)
def test_split_address(text: str, expected: tuple[str, int]) -> None:
    assert split_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9100", "is not HOST:PORT"),
        (":9100", "is not HOST:PORT"),
        ("::1:9100", "IPv6 address in brackets"),
        ("127.0.0.1:http", "must be a number from 0 to 65535"),
        ("127.0.0.1:70000", "must be a number from 0 to 65535"),
    ],
)
def test_bad_addresses_get_one_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_address(text)
    with pytest.raises(ValueError, match=message):
        ServerConfig(metrics_address=text)


def test_histogram_buckets_are_upper_bounds_and_cumulative() -> None:
    histogram = Histogram((1.0, 5.0))
    for value in (0.5, 1.0, 3.0, 5.0, 7.0):
        histogram.observe(value)
    assert histogram.cumulative() == [(1.0, 2), (5.0, 4), (float("inf"), 5)]
    assert (histogram.count, histogram.total) == (5, 16.5)


def test_unknown_types_are_counted_as_other() -> None:
    counters = Counters()
    counters.count_sent("ack", 3)
    counters.count_sent("made-up")
    assert (counters.sent["ack"], counters.sent["other"]) == (3, 1)
    assert "made-up" not in counters.sent


# ---------------------------------------------------------------------------
# The command line


METRICS_RE = r"Metrics and health on http://127\.0\.0\.1:(\d+)/metrics"


async def test_cli_metrics_address_logs_the_url_and_serves() -> None:
    async with server_process("--store", "memory", "--metrics-address", f"{LOOPBACK}:0") as child:
        port = int((await child.wait_for(METRICS_RE)).group(1))
        assert (await http(port, "/livez"))[::2] == (200, b"ok\n")
        assert (await http(port, "/readyz"))[::2] == (200, b"ready\n")
        async with tcp_client(child.port, "/ws/s/alice") as alice:
            await expect_json(alice, "connection:ack")
            samples = await scrape(port)
        assert samples[sample_key("collab_trio_build_info", {"version": __version__})] == 1
        assert samples['collab_trio_messages_sent_total{type="connection:ack"}'] == 1
        assert await child.stop(signal.SIGTERM) == 0
    await assert_port_binds_again(port)


async def test_cli_metrics_port_in_use_is_one_clear_line() -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    try:
        result = await trio.run_process(
            [sys.executable, "-m", "collab_trio", "serve", "--host", LOOPBACK, "--port", "0",
             "--store", "memory", "--metrics-address", f"{LOOPBACK}:{port}"],
            capture_stdout=True, stderr=subprocess.STDOUT, check=False,
        )
    finally:
        await listeners[0].aclose()
    output = result.stdout.decode()
    assert result.returncode == 1
    assert f"Cannot serve metrics on {LOOPBACK}:{port}: the port is already in use" in output
    assert "Traceback" not in output


async def test_cli_bad_metrics_address_is_a_usage_error() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "collab_trio", "serve", "--metrics-address", "9100"],
        capture_stdout=True, stderr=subprocess.STDOUT, check=False,
    )
    assert result.returncode == 2
    assert "argument --metrics-address: '9100' is not HOST:PORT" in result.stdout.decode()
