"""Over the rate limit, a move, an update or a cursor that a later message
makes obsolete is held (replaced in its place by that later one) and
delivered as the rate allows, instead of dropped: stock Optiverse sends an
`update_item` and a `move_item` of every selected item at each mouse event,
so a multi-select drag runs over the limit without anything being wrong.
Order is kept; everything else over the limit is dropped as before, and a
flood is still cut (4002)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from collab_trio.limits import ALL, HOLD, HOLD_KEYS, ITEM, OTHER, HeldChanges, classify
from collab_trio.testing import Client

from .test_security import read_until_closed


def command(action: str, item_id: str, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "command", "command": {"action": action, "item_type": "lens", "item_id": item_id, "data": data},
            **extra}


def text(message: dict[str, Any]) -> str:
    return json.dumps(message)


# -- pure -------------------------------------------------------------------------


def test_how_a_message_meets_the_held_ones() -> None:
    move = text(command("move_item", "L1", {"x_mm": 1.0, "y_mm": 2.0}))
    assert classify(move) == (HOLD, ("move_item", "L1"), frozenset({"x_mm", "y_mm"}))
    assert classify(text(command("update_item", "L1", {"name": "x"}))) == (
        HOLD, ("update_item", "L1"), frozenset({"name"}))
    assert classify(text({"type": "cursor", "x": 1, "y": 2})) == (HOLD, ("cursor", ""), frozenset())
    for of_the_item in (
        text(command("add_item", "L1", {})),
        text(command("remove_item", "L1", {})),
        text(command("move_item", "L1", {"x_mm": 1.0}, op_id="a:1")),  # its sender waits for its ack
    ):
        assert classify(of_the_item) == (ITEM, ("", "L1"), frozenset()), of_the_item
    for commutes in (
        text({"type": "ping"}),
        text({"type": "sync:request"}),
        "not json",
        text(command("move_item", "L1", {"x_mm": "oops"})),  # refused: must not replace a valid one
        text(command("move_item", 7, {"x_mm": 1.0})),
    ):
        assert classify(commutes)[0] == OTHER, commutes
    for after_all in (
        text({"type": "sync:update", "state": {"items": []}}),
        text({"type": "sync:full_state", "state": {"items": []}}),
        text(command("update_item", "L1", {"pad": "p" * 20_000})),  # too large to look into
        b'{"type": "cursor"}',
    ):
        assert classify(after_all)[0] == ALL, after_all


def test_a_later_message_of_a_key_replaces_the_held_one_and_goes_to_the_end() -> None:
    held = HeldChanges()
    assert held.hold(("move_item", "A"), frozenset({"x_mm"}), "a1", 1.0)
    assert held.hold(("update_item", "A"), frozenset({"x_mm"}), "u2", 2.0)
    assert held.hold(("move_item", "A"), frozenset({"x_mm", "y_mm"}), "a3", 3.0)  # after the update now
    assert not held.hold(("move_item", "A"), frozenset({"y_mm"}), "a4", 4.0)  # would lose x_mm
    assert (held.superseded, held.size) == (1, 4)
    assert held.hold(("move_item", "B"), frozenset(), "b5", 5.0)
    assert held.take("A") == [("u2", 2.0), ("a3", 3.0)] and held.size == 2  # one item's only
    assert [held.pop()] == [("b5", 5.0)] and not held and held.size == 0


def test_held_messages_are_bounded_in_number_and_bytes() -> None:
    held = HeldChanges(max_bytes=10)
    assert held.hold(("move_item", "A"), frozenset(), "x" * 6)
    assert not held.hold(("move_item", "B"), frozenset(), "x" * 5)
    assert not held.hold(("move_item", "A"), frozenset(), "x" * 11)
    held = HeldChanges()
    for i in range(HOLD_KEYS):
        assert held.hold(("move_item", str(i)), frozenset(), "m")
    assert not held.hold(("move_item", "one more"), frozenset(), "m")
    assert held.hold(("move_item", "0"), frozenset(), "m2")  # a replacement needs no room


@given(st.lists(st.tuples(st.sampled_from(["move_item", "update_item"]), st.sampled_from("ABC")), max_size=60))
def test_what_is_held_is_the_subsequence_of_the_last_message_of_each_key(sent: list[tuple[str, str]]) -> None:
    held = HeldChanges()
    for n, key in enumerate(sent):
        assert held.hold(key, frozenset({"x_mm"}), f"{n}")
    last = {key: n for n, key in enumerate(sent)}
    assert [int(held.pop()[0]) for _ in range(len(held))] == sorted(last.values())


# -- through the server ------------------------------------------------------------


def lens(item_id: str, x: float, y: float) -> dict[str, Any]:
    return {"x_mm": x, "y_mm": y, "angle_deg": 0.0, "name": "Lens", "item_uuid": item_id,
            "interfaces": [{"element_type": "lens", "efl_mm": 100.0}]}


async def collect(client: Client, into: list[dict[str, Any]]) -> None:
    try:
        while True:
            into.append(json.loads(await client.ws.get_message()))
    except ConnectionClosed as exc:
        into.append({"type": "(closed)", "code": exc.reason.code})


async def test_a_stock_multi_select_drag_over_the_rate_limit_is_thinned_not_cut(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    # Four selected lenses dragged for 3 s at 60 mouse events a second: an
    # update_item and a move_item of each, 480 messages a second, with the
    # default limit (200/s, bursts of 400).
    harness = await start_server()
    items, hz, seconds = [f"lens-{i}" for i in range(4)], 60, 3
    async with harness.joined("lab", "alice") as alice, harness.joined("lab", "bob") as bob:
        await alice.expect("user:joined")
        for n, item_id in enumerate(items):
            await alice.send(command("add_item", item_id, lens(item_id, 10.0 * n, 0.0)))
            await alice.expect("ack")
            await bob.expect("command")
        got: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}
        t0 = trio.current_time()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, alice, got["alice"])
                nursery.start_soon(collect, bob, got["bob"])
                for step in range(hz * seconds):
                    await trio.sleep_until(t0 + step / hz)
                    for n, item_id in enumerate(items):
                        data = lens(item_id, 10.0 * n + step, float(step))
                        await alice.send(command("update_item", item_id, data))
                        await alice.send(command("move_item", item_id, data))
                await trio.sleep(2)
                nursery.cancel_scope.cancel()
        sent = 2 * len(items) * hz * seconds
        kinds = Counter(m["type"] for m in got["alice"])
        assert set(kinds) == {"ack"}, kinds  # no error, no close
        relayed = [m for m in got["bob"] if m["type"] == "command"]
        assert kinds["ack"] == len(relayed) < sent  # thinned: some were replaced before their turn
        assert len(relayed) >= 0.9 * (400 + 200 * seconds)  # at about the rate
        final = {m["command"]["item_id"]: m["command"]["data"]["y_mm"] for m in relayed}
        assert final == {item_id: float(hz * seconds - 1) for item_id in items}
        await alice.send({"type": "sync:request"})
        stored = {i["uuid"]: i["y_mm"] for i in (await alice.expect("sync:state"))["state"]["items"]}
        assert stored == final


async def test_held_moves_go_at_the_rate_each_items_latest_in_order(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(rate_limit=10, rate_burst=5)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        await alice.send(command("add_item", "L1", lens("L1", 0, 0)))
        await alice.send(command("add_item", "L2", lens("L2", 0, 0)))
        # Three within the burst, then held: each item's latest, in the order they came.
        for y in range(1, 11):
            await alice.send(command("move_item", "L1" if y % 2 else "L2", {"y_mm": float(y)}))
        t0 = trio.current_time()
        relayed = [(await bob.expect("command"))["command"] for _ in range(7)]
        assert [(c["action"], c["item_id"], c["data"].get("y_mm")) for c in relayed] == [
            ("add_item", "L1", 0.0), ("add_item", "L2", 0.0),
            ("move_item", "L1", 1.0), ("move_item", "L2", 2.0), ("move_item", "L1", 3.0),
            ("move_item", "L1", 9.0), ("move_item", "L2", 10.0),
        ]
        assert trio.current_time() - t0 == 0.2  # one a tenth of a second (the rate)
        assert Counter(m["type"] for m in [await alice.recv() for _ in range(7)]) == {"ack": 7}
        await trio.sleep(1)
        await alice.send(command("remove_item", "L1", {}))
        assert (await bob.expect("command"))["command"]["action"] == "remove_item"
        await alice.expect("ack")
        await alice.expect_silence()
        await bob.expect_silence()


async def test_a_flood_of_moves_is_still_cut_with_4002(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    # Held messages cost a parse each: past 25 times the rate they are
    # dropped and count toward 4002 like any other.
    harness = await start_server(rate_limit=10, rate_burst=20)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob"):
        await alice.expect("user:joined")
        await alice.send(command("add_item", "L1", lens("L1", 0, 0)))
        t0 = trio.current_time()
        with trio.fail_after(30):
            try:
                for second in range(10):
                    await trio.sleep_until(t0 + second)
                    for i in range(600):
                        await alice.send(command("move_item", "L1", {"x_mm": float(i)}))
            except ConnectionClosed:
                pass
            _, code, reason = await read_until_closed(alice)
        assert (code, reason) == (4002, "rate limit exceeded repeatedly")
        assert trio.current_time() - t0 < 2


# -- order, ends and edge cases ---------------------------------------------------


async def stored_items(client: Any) -> dict[str, dict[str, Any]]:
    await client.send({"type": "sync:request"})
    while True:
        m = await client.recv()
        if m["type"] == "sync:state":
            return {i["uuid"]: i for i in m["state"]["items"]}


async def test_held_keys_of_one_item_keep_the_last_position(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    # move(P1), update(P2), move(P3) over the rate: the client's last word is P3.
    harness = await start_server(rate_limit=10, rate_burst=2)
    with trio.fail_after(60):
        async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
            await alice.expect("user:joined")
            await trio.sleep(1)
            await alice.send(command("add_item", "L1", lens("L1", 0.0, 0.0)))
            await alice.send(command("move_item", "L1", {"x_mm": 0.5, "y_mm": 0.5}))  # burst used
            await alice.send(command("move_item", "L1", {"x_mm": 1.0, "y_mm": 1.0}))  # held
            await alice.send(command("update_item", "L1", lens("L1", 2.0, 2.0)))  # held
            await alice.send(command("move_item", "L1", {"x_mm": 3.0, "y_mm": 3.0}))  # replaces move
            await trio.sleep(2)
            item = (await stored_items(bob))["L1"]
            assert (item["x_mm"], item["y_mm"]) == (3.0, 3.0)


@pytest.mark.parametrize("end", ["close", "abrupt"])
async def test_held_drag_end_survives_the_clients_close(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock, end: str
) -> None:
    harness = await start_server(rate_limit=10, rate_burst=2)
    with trio.fail_after(60):
        async with harness.joined("s", "bob") as bob:
            async with harness.joined("s", "alice") as alice:
                await alice.send(command("add_item", "L1", lens("L1", 0.0, 0.0)))
                await alice.expect("ack")
                for x in range(1, 11):
                    await alice.send(command("move_item", "L1", {"x_mm": float(x)}))
                if end == "close":
                    await alice.ws.aclose()
                else:
                    await trio.sleep(0.05)
                    await trio.aclose_forcefully(alice.ws._stream)
            await trio.sleep(2)
            assert (await stored_items(bob))["L1"]["x_mm"] == 10.0


async def test_a_message_within_the_rate_behind_held_ones_does_not_pass_the_token_bucket(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock, monkeypatch: Any
) -> None:
    # Default limit (200/s, bursts of 400): at most 600 messages may be
    # processed within a second. An add_item within the rate that arrives
    # behind 250 held moves of other items goes in at once, and takes none of
    # them with it (they commute with it; they used to be flushed into debt).
    from collab_trio.session import Session

    times: list[float] = []
    original = Session.frame_received

    def counting(self: Any, conn: Any, frame: Any, arrived: Any = None) -> None:
        times.append(trio.current_time())
        original(self, conn, frame, arrived)

    monkeypatch.setattr(Session, "frame_received", counting)
    rate, burst = 200, 400
    harness = await start_server(rate_limit=rate, rate_burst=burst)
    with trio.fail_after(60):
        async with harness.joined("s", "alice") as alice:
            await trio.sleep(5)
            t0 = trio.current_time()
            for i in range(burst):
                await alice.send(command("move_item", f"B{i}", {"x_mm": 1.0}))
            await trio.sleep_until(t0 + 0.0045)  # 0.9 token
            for i in range(250):
                await alice.send(command("move_item", f"M{i}", {"x_mm": 1.0}))  # held
            await trio.sleep_until(t0 + 0.0052)  # 1.04 tokens; release armed for t0 + 0.0055
            await alice.send(command("add_item", "X", lens("X", 0.0, 0.0)))
            await trio.sleep(2)
            in_one_second = sum(1 for t in times if t0 <= t < t0 + 1)
            assert in_one_second <= rate + burst, in_one_second


async def test_an_invalid_move_does_not_erase_the_held_valid_one(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    # In order: move(x=5) is applied, the malformed move after it is refused
    # (invalid_command), the item stays at 5: the malformed one must not
    # replace the held valid one.
    harness = await start_server(rate_limit=10, rate_burst=2)
    with trio.fail_after(60):
        async with harness.joined("s", "bob") as bob, harness.joined("s", "alice") as alice:
            await trio.sleep(1)
            await alice.send(command("add_item", "L1", lens("L1", 0.0, 0.0)))
            await alice.send(command("move_item", "L1", {"x_mm": 1.0}))  # burst used
            await alice.send(command("move_item", "L1", {"x_mm": 5.0}))  # held
            await alice.send(command("move_item", "L1", {"x_mm": "oops"}))  # replaces it
            await trio.sleep(2)
            assert (await stored_items(bob))["L1"]["x_mm"] == 5.0


async def test_held_messages_are_not_released_past_the_back_pressure(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    # The store stalls: the session stops its readers at max_pending_bytes,
    # and the release of held updates waits for room too.
    from collab_trio.serving import RECEIVE_BUFFER_SIZE

    from .test_session_runner import GatedStore

    store = GatedStore()
    limit = 4000
    harness = await start_server(_store=store, max_pending_bytes=limit, rate_limit=10, rate_burst=5)
    with trio.fail_after(60):
        async with harness.joined("s", "alice") as alice:
            await trio.sleep(1)
            for n in range(5):
                await alice.send(command("add_item", f"S{n}", {"n": n}))  # small: within the limit
            big = 0
            for n in range(60):
                message = command("update_item", f"L{n}", {"note": "x" * 15_000})
                big = max(big, len(str(message)))
                await alice.send(message)
            await trio.sleep(10)
            session = harness.registry.sessions["s"]
            assert session.core is not None
            assert session.core.pending_bytes < limit + RECEIVE_BUFFER_SIZE + big, session.core.pending_bytes
            store.gate.set()


async def test_held_drag_end_survives_the_idle_close(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    # A slow limit (1/s): ten held updates of ten items take 10 s to go in;
    # the client is silent after its drag and is closed idle at 5 s (4000),
    # and the updates it sent before still count.
    harness = await start_server(rate_limit=1, rate_burst=1, idle_timeout=5)
    with trio.fail_after(60):
        async with harness.joined("s", "bob") as bob:
            async with harness.joined("s", "alice") as alice:
                await trio.sleep(2)
                await alice.send(command("add_item", "L0", lens("L0", 0.0, 0.0)))  # the burst
                for n in range(10):
                    await alice.send(command("update_item", f"L{n}", lens(f"L{n}", 7.0, 7.0)))
                code = None
                try:
                    while True:
                        await bob.send({"type": "ping"})
                        with trio.move_on_after(1):
                            while True:
                                await alice.recv()
                except Exception as exc:  # alice closed
                    code = getattr(getattr(exc, "reason", None), "code", None)
            assert code == 4000
            await trio.sleep(1.5)
            stored = await stored_items(bob)
            assert sorted(stored) == sorted(f"L{n}" for n in range(10)), sorted(stored)


async def test_a_held_whole_item_update_does_not_undo_a_concurrent_move(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    # Alice's update_item (the whole item, with the position she still shows)
    # arrives as Bob's move of the item does. In arrival order the merge knows
    # x=0 as what Bob's move replaced (based_on, 2 s) and keeps Bob's x=50.
    # Held behind 25 others at 10/s it reaches the core 2.6 s later: it is
    # judged by when it arrived, not when it was taken in.
    harness = await start_server(rate_limit=10, rate_burst=2)
    with trio.fail_after(60):
        async with harness.joined("s", "bob") as bob, harness.joined("s", "alice") as alice:
            await trio.sleep(1)
            await bob.expect("user:joined")
            await alice.send(command("add_item", "L1", lens("L1", 0.0, 0.0)))
            await bob.expect("command")
            await trio.sleep(1)
            await alice.send(command("add_item", "L2", lens("L2", 0.0, 0.0)))
            await alice.send(command("add_item", "L3", lens("L3", 0.0, 0.0)))  # burst used
            for n in range(25):
                await alice.send(command("move_item", f"M{n}", {"x_mm": 1.0}))  # held
            await alice.send(command("update_item", "L1", {**lens("L1", 0.0, 0.0), "name": "renamed"}))  # held
            await bob.send(command("move_item", "L1", {"x_mm": 50.0, "y_mm": 0.0}))
            await trio.sleep(5)
            item = (await stored_items(bob))["L1"]
            assert (item["name"], item["x_mm"]) == ("renamed", 50.0)





async def test_held_drag_end_survives_a_close_after_acks_are_pending(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(rate_limit=10, rate_burst=2)
    with trio.fail_after(60):
        async with harness.joined("s", "bob") as bob:
            async with harness.joined("s", "alice") as alice:
                await alice.send(command("add_item", "L1", lens("L1", 0.0, 0.0)))
                await alice.expect("ack")
                for x in range(1, 11):
                    await alice.send(command("move_item", "L1", {"x_mm": float(x)}))
                    await alice.send(command("move_item", "L2", {"x_mm": float(x)}))
                    await alice.send({"type": "cursor", "x": x, "y": x})
                await trio.sleep(0.35)
                await trio.aclose_forcefully(alice.ws._stream)
            await trio.sleep(2)
            assert (await stored_items(bob))["L1"]["x_mm"] == 10.0


async def test_held_release_after_a_stall_stays_within_the_back_pressure(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    # While the store stalls, tokens pile up to the burst; when room comes
    # back the release hands over a whole burst of large held updates at
    # once, checking the room only before the first.
    import attrs

    from collab_trio.serving import RECEIVE_BUFFER_SIZE

    from .test_session_runner import GatedStore

    @attrs.define(eq=False)
    class OneShotGate(GatedStore):
        passes: int = 0

        async def commit(self, session_id: str, epoch: str, ops: list[Any], replaced: Any = None) -> None:
            while self.passes <= 0:
                await self.gate.wait()
                self.gate = trio.Event()
            self.passes -= 1
            await GatedStore.__base__.commit(self, session_id, epoch, ops, replaced)  # type: ignore[attr-defined]
            self.commits += 1

    store = OneShotGate()
    limit = 4000
    harness = await start_server(_store=store, max_pending_bytes=limit, rate_limit=10, rate_burst=10)
    with trio.fail_after(60):
        async with harness.joined("s", "alice") as alice:
            await trio.sleep(1)
            for n in range(10):
                await alice.send(command("add_item", f"S{n}", {"n": n}))  # the burst, small
            big = 0
            for n in range(60):
                message = command("update_item", f"L{n}", {"note": "x" * 15_000})
                big = max(big, len(json.dumps(message)))
                await alice.send(message)  # held
            await trio.sleep(5)  # tokens back to the burst; no room meanwhile
            session = harness.registry.sessions["s"]
            assert session.core is not None
            store.passes = 2  # the small adds, then the one large update taken in
            store.gate.set()
            peak = 0
            for _ in range(50):
                await trio.sleep(0.01)
                peak = max(peak, session.core.pending_bytes)
            print("PEAK", peak, store.commits, session.core.pending_bytes)
            assert peak < limit + RECEIVE_BUFFER_SIZE + big, peak
