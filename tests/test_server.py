"""The whole server over in-memory streams: real WebSocket frames, no sockets."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import pytest
import trio
import trio.testing

from collab_trio import __version__
from collab_trio.document import SessionDocument
from collab_trio.session_core import SessionCore
from collab_trio.testing import HANG, Harness


def add(item_id: str, **data: float) -> dict:
    return {
        "type": "command",
        "command": {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": dict(data)},
    }


# -- connection:ack and presence ----------------------------------------------


async def test_ack_contents(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.client("lab", "Ada Lovelace", path="/ws/lab/Ada%20Lovelace") as ada:
        ack = await ada.recv()
        assert ack["type"] == "connection:ack"
        assert ack["session_id"] == "lab"
        assert ack["user_id"] == "Ada Lovelace"
        assert ack["is_host"] is True
        assert [u["user_id"] for u in ack["users"]] == ["Ada Lovelace"]
        assert ack["users"][0]["is_host"] is True
        datetime.fromisoformat(ack["users"][0]["connected_at"])
        assert ack["version"] == 0
        assert isinstance(ack["epoch"], str) and ack["epoch"]
        assert ack["heartbeat_interval_s"] == 30
        assert ack["server"]["name"] == "collab-trio"
        assert ack["server"]["version"] == __version__
        assert datetime.fromisoformat(ack["timestamp"]).utcoffset().total_seconds() == 0

        async with harness.client("lab", "bob") as bob:
            ack = await bob.expect("connection:ack")
            assert ack["is_host"] is False
            assert [(u["user_id"], u["is_host"]) for u in ack["users"]] == [
                ("Ada Lovelace", True),
                ("bob", False),
            ]


async def test_join_leave_and_host_change(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("s", "alice") as alice:
        async with harness.joined("s", "bob") as bob:
            joined = await alice.expect("user:joined")
            assert joined["user_id"] == "bob"
            assert [u["user_id"] for u in joined["users"]] == ["alice", "bob"]
            datetime.fromisoformat(joined["timestamp"])
            async with harness.joined("s", "carol") as carol:
                assert (await alice.expect("user:joined"))["user_id"] == "carol"
                assert (await bob.expect("user:joined"))["user_id"] == "carol"

                # The host leaves: bob, the longest present, is promoted.
                await alice.ws.aclose()
                for peer in (bob, carol):
                    left = await peer.expect("user:left")
                    assert left["user_id"] == "alice"
                    assert left["reason"] == "disconnected"
                    assert [(u["user_id"], u["is_host"]) for u in left["users"]] == [
                        ("bob", True),
                        ("carol", False),
                    ]
                    changed = await peer.expect("host:changed")
                    assert changed["user_id"] == "bob"
                async with harness.joined("s", "dave"):
                    pass
                # dave's ack said bob is host; carol sees dave come and go.
                assert (await carol.expect("user:joined"))["user_id"] == "dave"
                left = await carol.expect("user:left")
                assert left["user_id"] == "dave"
                await carol.expect_silence()
            assert (await bob.expect("user:joined"))["user_id"] == "dave"
            assert (await bob.expect("user:left"))["user_id"] == "dave"
            assert (await bob.expect("user:left"))["user_id"] == "carol"
            await bob.expect_silence()


async def test_session_is_unloaded_when_last_user_leaves(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    async with harness.joined("s", "alice"):
        session = harness.registry.sessions["s"]
        assert not session.finished.is_set()
    with trio.fail_after(HANG):
        await session.finished.wait()
    assert harness.registry.sessions == {}
    # The document outlives the session, in the store.
    async with harness.joined("s", "alice") as alice:
        await alice.send(add("a"))
        await alice.expect("ack")
    async with harness.joined("s", "bob") as bob:
        await bob.send({"type": "sync:request"})
        state = await bob.expect("sync:state")
        assert [item["uuid"] for item in state["state"]["items"]] == ["a"]


async def test_takeover_by_same_user(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("s", "alice") as alice1:
        async with harness.joined("s", "bob") as bob:
            await alice1.expect("user:joined")
            async with harness.client("s", "alice") as alice2:
                ack = await alice2.expect("connection:ack")
                # The new connection keeps alice's place and host role.
                assert ack["is_host"] is True
                assert [u["user_id"] for u in ack["users"]] == ["alice", "bob"]
                code, reason = await alice1.expect_closed()
                assert code == 4001
                assert "replaced" in reason
                # No leave/join storm for bob.
                await bob.expect_silence()
                # Traffic now flows to the new connection.
                await bob.send(add("x"))
                relayed = await alice2.expect("command")
                assert relayed["user_id"] == "bob"
            assert (await bob.expect("ack"))["seq"] == 1
            left = await bob.expect("user:left")
            assert left["user_id"] == "alice"
            assert (await bob.expect("host:changed"))["user_id"] == "bob"


async def test_ping_pong(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined() as alice:
        await alice.send({"type": "ping", "user_id": "alice"})
        pong = await alice.expect("pong")
        assert datetime.fromisoformat(pong["timestamp"]).utcoffset().total_seconds() == 0


# -- commands and the document ------------------------------------------------


async def test_relay_with_true_sender_and_seq(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        message = add("lens-1", x_mm=1.0, y_mm=2.0)
        message["user_id"] = "mallory"  # a forged sender is ignored
        message["op_id"] = "op-1"
        message["timestamp"] = "2026-11-26T10:00:00"
        await alice.send(message)
        relayed = await bob.expect("command")
        assert relayed["user_id"] == "alice"
        assert relayed["command"] == message["command"]
        assert relayed["seq"] == 1
        assert relayed["op_id"] == "op-1"
        datetime.fromisoformat(relayed["timestamp"])
        assert await alice.expect("ack") == {"type": "ack", "seq": 1, "op_id": "op-1"}
        await bob.send(add("lens-2"))
        assert (await alice.expect("command"))["seq"] == 2
        assert await bob.expect("ack") == {"type": "ack", "seq": 2}
        # The sender never gets its own command back.
        await alice.expect_silence()


async def test_document_actions_and_sync_state(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("s", "alice") as alice:
        steps = [
            add("a", x_mm=1.0, y_mm=1.0, angle_deg=0.0),
            add("b", x_mm=2.0, y_mm=2.0, angle_deg=0.0),
            {"type": "command", "command": {"action": "move_item", "item_type": "lens", "item_id": "a",
                                            "data": {"x_mm": 10.0, "y_mm": 11.0, "angle_deg": 45.0,
                                                     "focal_length_mm": 999}}},
            {"type": "command", "command": {"action": "update_item", "item_type": "lens", "item_id": "b",
                                            "data": {"x_mm": 2.0, "y_mm": 2.0, "focal_length_mm": 50}}},
            {"type": "command", "command": {"action": "remove_item", "item_type": "lens", "item_id": "a",
                                            "data": {}}},
            {"type": "command", "command": {"action": "mirror_all", "item_type": "lens", "item_id": "b"}},
        ]
        expected_items = [
            [{"x_mm": 1.0, "y_mm": 1.0, "angle_deg": 0.0, "uuid": "a", "item_type": "lens"}],
            [{"x_mm": 1.0, "y_mm": 1.0, "angle_deg": 0.0, "uuid": "a", "item_type": "lens"},
             {"x_mm": 2.0, "y_mm": 2.0, "angle_deg": 0.0, "uuid": "b", "item_type": "lens"}],
            [{"x_mm": 10.0, "y_mm": 11.0, "angle_deg": 45.0, "uuid": "a", "item_type": "lens"},
             {"x_mm": 2.0, "y_mm": 2.0, "angle_deg": 0.0, "uuid": "b", "item_type": "lens"}],
            # an update sets the fields it changes; the others keep their values
            [{"x_mm": 10.0, "y_mm": 11.0, "angle_deg": 45.0, "uuid": "a", "item_type": "lens"},
             {"x_mm": 2.0, "y_mm": 2.0, "angle_deg": 0.0, "focal_length_mm": 50, "uuid": "b", "item_type": "lens"}],
            [{"x_mm": 2.0, "y_mm": 2.0, "angle_deg": 0.0, "focal_length_mm": 50, "uuid": "b", "item_type": "lens"}],
            # unknown action: relayed with a seq, document unchanged
            [{"x_mm": 2.0, "y_mm": 2.0, "angle_deg": 0.0, "focal_length_mm": 50, "uuid": "b", "item_type": "lens"}],
        ]
        for seq, (step, items) in enumerate(zip(steps, expected_items), start=1):
            await alice.send(step)
            assert (await alice.expect("ack"))["seq"] == seq
            await alice.send({"type": "sync:request", "local_version": 0})
            state = await alice.expect("sync:state")
            assert state["from_server"] is True
            assert state["version"] == seq
            assert state["state"]["version"] == seq
            assert state["state"]["items"] == items
            assert state["epoch"]


async def test_new_session_state_is_null(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("fresh", "alice") as alice:
        await alice.send({"type": "sync:request"})
        state = await alice.expect("sync:state")
        assert state["state"] is None
        assert state["version"] == 0


async def test_sync_update_replaces_and_broadcasts(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        await alice.send(add("old"))
        await alice.expect("ack")
        await bob.expect("command")
        items = [{"uuid": "n1", "item_type": "mirror", "x_mm": 0}, {"uuid": "n2", "item_type": "lens"}]
        await alice.send({"type": "sync:update", "state": {"items": items, "version": 99}})
        assert (await alice.expect("ack"))["seq"] == 2
        state = await bob.expect("sync:state")
        assert state["state"]["items"] == items
        assert state["version"] == 2


async def test_full_state_from_host_is_stored_and_targeted(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    async with harness.joined("s", "host") as host, harness.joined("s", "bob") as bob:
        async with harness.joined("s", "carol") as carol:
            await host.expect("user:joined")
            await host.expect("user:joined")
            await bob.expect("user:joined")
            full = {
                "type": "sync:full_state",
                "state": {"items": [{"uuid": "h1", "item_type": "lens"}], "version": 3, "timestamp": "t"},
                "target_user": "carol",
            }
            await host.send(full)
            forwarded = await carol.expect("sync:full_state")
            assert forwarded == {**full, "user_id": "host"}
            assert (await host.expect("ack"))["seq"] == 1
            # It became the session document, which bob loads too (it changed).
            assert (await bob.expect("sync:state"))["state"]["items"] == full["state"]["items"]
            await bob.send({"type": "sync:request"})
            assert (await bob.expect("sync:state"))["state"]["items"] == full["state"]["items"]
            # The same canvas again (Optiverse sends it at every join): bob reloads nothing.
            await host.send(full)
            await carol.expect("sync:full_state")
            assert (await host.expect("ack"))["seq"] == 2
            await bob.expect_silence()
            # Without a target it goes to everyone else.
            await host.send({"type": "sync:full_state", "state": {"items": []}})
            assert (await bob.expect("sync:full_state"))["user_id"] == "host"
            assert (await carol.expect("sync:full_state"))["user_id"] == "host"
            assert (await host.expect("ack"))["seq"] == 3
            # A target who is not here: a clear error, nothing forwarded.
            await host.send({**full, "target_user": "nobody"})
            error = await host.expect("error")
            assert error["code"] == "unknown_user"
            await bob.expect_silence()
            await carol.expect_silence()


async def test_full_state_from_non_host_is_not_stored(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("s", "host") as host, harness.joined("s", "bob") as bob:
        await host.expect("user:joined")
        await host.send(add("h1"))
        await host.expect("ack")
        await bob.expect("command")
        # Targeted: forwarded, then the target gets the document, so that it
        # ends on what is stored.
        await bob.send({"type": "sync:full_state", "state": {"items": [{"uuid": "b1"}]}, "target_user": "host"})
        assert (await host.expect("sync:full_state"))["user_id"] == "bob"
        assert [i["uuid"] for i in (await host.expect("sync:state"))["state"]["items"]] == ["h1"]
        await bob.expect_silence()
        # Without a target: not forwarded; the sender gets the document.
        await bob.send({"type": "sync:full_state", "state": {"items": [{"uuid": "b2"}]}})
        assert [i["uuid"] for i in (await bob.expect("sync:state"))["state"]["items"]] == ["h1"]
        await host.expect_silence()
        await bob.send({"type": "sync:request"})
        assert [i["uuid"] for i in (await bob.expect("sync:state"))["state"]["items"]] == ["h1"]


# -- cursors -------------------------------------------------------------------


async def test_cursor_coalescing(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        received: list[tuple[float, dict]] = []

        async def collect() -> None:
            while True:
                message = await bob.expect("cursor")
                received.append((trio.current_time(), message))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            start = trio.current_time()
            for i in range(100):  # 100 cursor messages in 1 s
                await alice.send({"type": "cursor", "x": float(i), "y": 2.0, "user_id": "forged"})
                await trio.sleep(0.01)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

        in_first_second = [m for t, m in received if t - start < 1.0]
        assert 1 <= len(in_first_second) <= 20
        # At most 20 in any one-second window, and the latest position always arrives.
        times = [t for t, _ in received]
        for i, t in enumerate(times):
            assert len([u for u in times[i:] if u - t < 1.0]) <= 20
        assert received[-1][1] == {"type": "cursor", "x": 99.0, "y": 2.0, "user_id": "alice"}
        # Cursors are never echoed to the sender nor stored.
        await alice.expect_silence()
        await alice.send({"type": "sync:request"})
        assert (await alice.expect("sync:state"))["state"] is None


async def test_cursor_rate_is_configurable(start_server, autojump_clock: trio.abc.Clock) -> None:
    harness = await start_server(cursor_rate=5)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        start = trio.current_time()
        count = 0

        async def count_first_second() -> None:
            nonlocal count
            with trio.move_on_at(start + 1.0):
                while True:
                    await bob.expect("cursor")
                    count += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_first_second)
            for i in range(50):
                await alice.send({"type": "cursor", "x": i})
                await trio.sleep(0.02)
        assert count == 5


# -- heartbeat and idle --------------------------------------------------------


async def test_idle_timeout_closes_at_exact_virtual_time(
    start_server, autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(idle_timeout=90)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        start = trio.current_time()

        async def heartbeat(times: int) -> None:
            # Optiverse's rhythm: a ping every 30 s.
            for _ in range(times):
                await trio.sleep(30)
                await bob.send({"type": "ping"})
                await bob.expect("pong")

        await heartbeat(2)
        # alice has been silent all along.
        code, reason = await alice.expect_closed(timeout=200)
        assert trio.current_time() - start == 90
        assert code == 4000
        assert "heartbeat timeout" in reason
        left = await bob.expect("user:left")
        assert (left["user_id"], left["reason"]) == ("alice", "idle_timeout")
        assert (await bob.expect("host:changed"))["user_id"] == "bob"
        # bob, who pings, stays connected long past the limit.
        await heartbeat(10)
        assert trio.current_time() - start == 90 + 300


async def test_websocket_pings_keep_an_otherwise_silent_client(start_server, autojump_clock: trio.abc.Clock) -> None:
    # Many client libraries keep a connection alive with WebSocket pings of
    # their own: a client that sends nothing else is not silent.
    harness = await start_server(idle_timeout=90)
    async with harness.joined("s", "bob") as bob:
        start = trio.current_time()
        for _ in range(10):
            await trio.sleep(30)
            with trio.fail_after(HANG):
                await bob.ws.ping()  # returns with the pong
        assert trio.current_time() - start >= 300
        await bob.send({"type": "ping"})
        await bob.expect("pong")


async def test_any_message_resets_idle_timer(start_server, autojump_clock: trio.abc.Clock) -> None:
    harness = await start_server(idle_timeout=10)
    async with harness.joined("s", "alice") as alice:
        start = trio.current_time()
        await trio.sleep(9)
        await alice.send({"type": "cursor", "x": 1})
        code, _ = await alice.expect_closed(timeout=60)
        assert code == 4000
        assert trio.current_time() - start == 19


# -- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("{nope", "invalid_json", None),
        ("[1,2,3]", "invalid_message", None),
        ('"ping"', "invalid_message", None),
        ('{"x": 1}', "missing_type", None),
        ('{"type": "teleport"}', "unknown_type", "teleport"),
        ('{"type": "command", "command": {"action": "add_item"}}', "invalid_command", "command"),
        ('{"type": "command", "command": "add"}', "invalid_command", "command"),
        ('{"type": "sync:update", "state": [1]}', "invalid_state", "sync:update"),
        (b"\x00\x01binary", "binary_not_supported", None),
        ("[" * 5000 + "]" * 5000, "invalid_json", None),
    ],
)
async def test_bad_input_answers_error_and_keeps_connection(
    harness: Harness, autojump_clock: trio.abc.Clock, frame: str | bytes, code: str, ref: str | None
) -> None:
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        await alice.send(frame)
        error = await alice.expect("error")
        assert error["code"] == code
        assert error["ref"] == ref
        assert isinstance(error["message"], str) and error["message"]
        await bob.expect_silence()  # nothing relayed
        # The connection is still fully usable.
        await alice.send({"type": "ping"})
        await alice.expect("pong")
        await alice.send(add("ok"))
        assert (await bob.expect("command"))["seq"] == 1


async def test_oversize_message_closes_1009(start_server, autojump_clock: trio.abc.Clock) -> None:
    harness = await start_server(max_message_size=1024)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        await alice.send({"type": "cursor", "pad": "x" * 900})  # just under the limit
        await bob.expect("cursor")
        await alice.send({"type": "cursor", "pad": "x" * 2000})
        code, _ = await alice.expect_closed()
        assert code == 1009
        left = await bob.expect("user:left")
        assert left["reason"] == "message_too_big"


async def test_sessions_are_isolated(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("one", "alice") as a1, harness.joined("two", "alice") as a2:
        async with harness.joined("one", "bob") as b1, harness.joined("two", "bob") as b2:
            await a1.expect("user:joined")
            await a2.expect("user:joined")
            await a1.send(add("only-in-one"))
            await a1.expect("ack")
            await a1.send({"type": "cursor", "x": 1})
            assert (await b1.expect("command"))["command"]["item_id"] == "only-in-one"
            await b1.expect("cursor")
            await b2.expect_silence()
            await a2.expect_silence()
            await b2.send({"type": "sync:request"})
            state = await b2.expect("sync:state")
            assert state["state"] is None and state["version"] == 0
        # bob leaving "one" is not news in "two".
        assert (await a1.expect("user:left"))["user_id"] == "bob"
        assert (await a2.expect("user:left"))["user_id"] == "bob"
        await a1.expect_silence()
        await a2.expect_silence()


# -- handshake -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "text"),
    [
        ("/", 404, b"unknown path"),
        ("/ws/only-session", 404, b"unknown path"),
        ("/ws/s/" + "u" * 65, 400, b"limit is 64"),
        ("/ws/s/a%2Fb", 400, b"must not contain '/'"),
        ("/ws/s/bad%07bell", 400, b"control characters"),
    ],
)
async def test_bad_path_refused_at_handshake(
    harness: Harness, autojump_clock: trio.abc.Clock, path: str, status: int, text: bytes
) -> None:
    stream = harness.listener.connect()
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    with trio.fail_after(HANG):
        while chunk := await stream.receive_some():
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"text/plain" in head.lower()
    assert text in body
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    assert harness.registry.sessions == {}


# -- slow consumers and failures ----------------------------------------------


async def test_slow_consumer_closed_1013_others_get_everything(start_server) -> None:
    # Real time here: the slow client's transport blocks, and under autojump the
    # close deadline would pass before the client gets a chance to read.
    harness = await start_server(max_queue_bytes=1200, close_timeout=HANG)
    async with harness.joined("s", "sender") as sender, harness.joined("s", "fast") as fast:
        await sender.expect("user:joined")
        async with harness.client("s", "slow", lockstep=True) as slow:
            await sender.expect("user:joined")
            await fast.expect("user:joined")
            # slow reads nothing from here on; its transport blocks the server.
            slow_member = harness.registry.sessions["s"].members["slow"]
            side_messages: dict[str, list[dict]] = {"sender": [], "fast": []}

            async def next_of(client, msg_type: str) -> dict:  # noqa: ANN001
                while True:
                    message = await client.recv()
                    if message["type"] == msg_type:
                        return message
                    side_messages[client.name].append(message)

            total = 60
            for i in range(total):
                await sender.send(add(f"item-{i}", x_mm=float(i)))
                assert (await next_of(fast, "command"))["seq"] == i + 1
                assert (await next_of(sender, "ack"))["seq"] == i + 1
            with trio.fail_after(HANG):
                await trio.testing.wait_all_tasks_blocked()
            assert slow_member.close_code == 1013
            assert "slow" not in harness.registry.sessions["s"].members
            # The others lost nothing and saw the slow user leave, once.
            for client in (sender, fast):
                if not side_messages[client.name]:
                    side_messages[client.name].append(await client.recv())
                [left] = side_messages[client.name]
                assert (left["type"], left["user_id"], left["reason"]) == ("user:left", "slow", "too_slow")
            # When slow finally reads, it gets what was already in flight, then 1013.
            code, reason = await slow.expect_closed()
            assert code == 1013
            assert "too slow" in reason
        await sender.send({"type": "ping"})
        await sender.expect("pong")


async def test_internal_error_closes_only_that_connection(
    harness: Harness, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Inject a bug into message handling for one item id.
    real_queue = SessionCore._queue

    def buggy_queue(self: SessionCore, change):  # noqa: ANN001, ANN202
        if getattr(change, "command", {}).get("item_id") == "boom":
            raise RuntimeError("injected bug")
        return real_queue(self, change)

    monkeypatch.setattr(SessionCore, "_queue", buggy_queue)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        with caplog.at_level(logging.ERROR):
            await alice.send(add("boom"))
            code, _ = await alice.expect_closed()
        assert code == 1011
        assert any(r.exc_info and "injected bug" in str(r.exc_info[1]) for r in caplog.records)
        left = await bob.expect("user:left")
        assert left["reason"] == "internal_error"
        assert (await bob.expect("host:changed"))["user_id"] == "bob"
        await bob.send(add("fine"))
        assert (await bob.expect("ack"))["seq"] == 1
        # A new connection in the same session works too.
        async with harness.joined("s", "carol") as carol:
            await carol.send({"type": "sync:request"})
            assert [i["uuid"] for i in (await carol.expect("sync:state"))["state"]["items"]] == ["fine"]


async def test_internal_error_in_commit_resets_only_that_session(
    harness: Harness, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_apply = SessionDocument.apply

    def buggy_apply(self: SessionDocument, op, *args: Any) -> None:  # noqa: ANN001
        if op.command and op.command.get("item_id") == "boom":
            raise RuntimeError("injected bug")
        real_apply(self, op, *args)

    monkeypatch.setattr(SessionDocument, "apply", buggy_apply)
    async with harness.joined("other", "zoe") as zoe:
        async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
            await alice.expect("user:joined")
            with caplog.at_level(logging.ERROR):
                await alice.send(add("boom"))
                for client in (alice, bob):
                    code, reason = await client.expect_closed()
                    assert code == 1011 and "reconnect" in reason
            assert any(r.exc_info and "injected bug" in str(r.exc_info[1]) for r in caplog.records)
        # Other sessions never noticed.
        await zoe.send(add("z"))
        assert (await zoe.expect("ack"))["seq"] == 1
        async with harness.joined("s", "alice") as alice:
            await alice.send(add("after"))
            assert (await alice.expect("ack"))["seq"] >= 1


# -- shutdown ------------------------------------------------------------------


async def test_graceful_shutdown_closes_everyone_1001(harness: Harness, autojump_clock: trio.abc.Clock) -> None:
    async with harness.joined("a", "alice") as alice, harness.joined("b", "bob") as bob:
        harness.server.request_shutdown()
        for client in (alice, bob):
            code, reason = await client.expect_closed()
            assert (code, reason) == (1001, "server shutting down")
        with trio.fail_after(HANG):
            await harness.server.port_released.wait()
        assert harness.registry.sessions == {}
