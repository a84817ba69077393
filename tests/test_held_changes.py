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

import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from collab_trio.limits import HOLD_KEYS, HeldChanges, superseding_key
from collab_trio.testing import Client

from .test_security import read_until_closed


def command(action: str, item_id: str, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "command", "command": {"action": action, "item_type": "lens", "item_id": item_id, "data": data},
            **extra}


def text(message: dict[str, Any]) -> str:
    return json.dumps(message)


# -- pure -------------------------------------------------------------------------


def test_what_a_later_message_can_make_obsolete() -> None:
    move = text(command("move_item", "L1", {"x_mm": 1.0, "y_mm": 2.0}))
    assert superseding_key(move) == (("move_item", "L1"), frozenset({"x_mm", "y_mm"}))
    assert superseding_key(text(command("update_item", "L1", {"name": "x"}))) == (
        ("update_item", "L1"), frozenset({"name"}))
    assert superseding_key(text({"type": "cursor", "x": 1, "y": 2})) == (("cursor", ""), frozenset())
    for never in (
        text(command("add_item", "L1", {})),
        text(command("remove_item", "L1", {})),
        text(command("move_item", "L1", {"x_mm": 1.0}, op_id="a:1")),  # its sender waits for its ack
        text(command("move_item", 7, {"x_mm": 1.0})),
        text({"type": "ping"}),
        "not json",
        b'{"type": "cursor"}',
        text(command("update_item", "L1", {"pad": "p" * 20_000})),  # too large to hold
    ):
        assert superseding_key(never) is None, never


def test_a_later_message_replaces_the_held_one_in_its_place_if_it_carries_its_fields() -> None:
    held = HeldChanges()
    assert held.hold(("move_item", "A"), frozenset({"x_mm"}), "a1")
    assert held.hold(("move_item", "B"), frozenset({"x_mm"}), "b1")
    assert held.hold(("move_item", "A"), frozenset({"x_mm", "y_mm"}), "a2")  # replaces a1, first still
    assert not held.hold(("move_item", "A"), frozenset({"y_mm"}), "a3")  # would lose x_mm
    assert (held.superseded, held.size) == (1, 4)
    assert [held.pop(), held.pop()] == ["a2", "b1"] and not held and held.size == 0


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


@given(st.lists(st.tuples(st.sampled_from("ABC"), st.integers(0, 99)), max_size=60))
def test_what_is_held_is_the_last_message_of_each_key_in_first_arrival_order(moves: list[tuple[str, int]]) -> None:
    held = HeldChanges()
    for item, n in moves:
        assert held.hold(("move_item", item), frozenset({"x_mm"}), f"{item}{n}")
    last: dict[str, str] = {}
    for item, n in moves:
        last[item] = f"{item}{n}"  # (a dict keeps each key's first place)
    assert [held.pop() for _ in range(len(held))] == list(last.values())


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


async def test_held_moves_go_in_first_arrival_order_with_their_latest_values(
    start_server: Callable[..., Any], autojump_clock: trio.abc.Clock
) -> None:
    harness = await start_server(rate_limit=10, rate_burst=5)
    async with harness.joined("s", "alice") as alice, harness.joined("s", "bob") as bob:
        await alice.expect("user:joined")
        await alice.send(command("add_item", "L1", lens("L1", 0, 0)))
        await alice.send(command("add_item", "L2", lens("L2", 0, 0)))
        # Three within the burst, then held: L2's latest first (it came first), then L1's.
        for y in range(1, 11):
            await alice.send(command("move_item", "L1" if y % 2 else "L2", {"y_mm": float(y)}))
        t0 = trio.current_time()
        relayed = [(await bob.expect("command"))["command"] for _ in range(7)]
        assert [(c["action"], c["item_id"], c["data"].get("y_mm")) for c in relayed] == [
            ("add_item", "L1", 0.0), ("add_item", "L2", 0.0),
            ("move_item", "L1", 1.0), ("move_item", "L2", 2.0), ("move_item", "L1", 3.0),
            ("move_item", "L2", 10.0), ("move_item", "L1", 9.0),
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
