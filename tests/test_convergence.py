"""Stock Optiverse clients converge: corrections, per-field merge, deletes win.

The rounds below drive the real SessionCore (no trio) through a simulated
network with seeded random delays, and clients that behave like stock
Optiverse (its collaboration_manager): a change is applied locally first,
every relayed `command` is applied as it arrives (seq, ack and errors are
ignored), `move_item` and `update_item` carry the whole item.
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collab_trio.convergence import MOVE, UPDATE, CorrectionTracker, FieldHistory, merge_update
from collab_trio.document import COMMAND, Op, SessionDocument
from collab_trio.messages import Correction
from collab_trio.protocol import ErrorCode, encode
from collab_trio.session_core import (
    Broadcast,
    PingAfterLoad,
    Send,
    SessionCore,
    WantCommit,
    WantCorrections,
)

POSITION = ("x_mm", "y_mm", "angle_deg")


class StockClient:
    """What stock Optiverse does with its canvas (collaboration_manager.py)."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.items: dict[str, dict[str, Any]] = {}
        self.corrections = 0
        self.errors: list[str] = []

    def local_change(self, action: str, item_id: str, **changes: Any) -> dict[str, Any] | None:
        """Apply a change on the canvas and return the command it broadcasts."""
        if action == "remove_item":
            item = self.items.pop(item_id, None)
            if item is None:
                return None
            return {"action": action, "item_type": "lens", "item_id": item_id, "data": {}}
        item = self.items.get(item_id)
        if item is None:
            if action != "add_item":
                return None  # nothing on the canvas to drag or edit
            item = self.items[item_id] = {}
        item.update(changes)
        data = {**item, "item_uuid": item_id}  # to_dict() of the whole item
        return {"action": action, "item_type": "lens", "item_id": item_id, "data": data}

    def receive(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "error":
            self.errors.append(message["code"])
        if kind != "command":
            return  # ack, seq, errors: ignored, as Optiverse does
        self.corrections += bool(message.get("correction"))
        command = message["command"]
        action, item_id, data = command["action"], command["item_id"], command.get("data") or {}
        fields = {k: v for k, v in data.items() if k not in ("uuid", "item_uuid", "item_type")}
        if action == "add_item":
            self.items[item_id] = fields
        elif action == "move_item":
            item = self.items.get(item_id)
            if item is not None:  # an unknown item is not found: ignored
                if "x_mm" in data and "y_mm" in data:
                    item["x_mm"], item["y_mm"] = data["x_mm"], data["y_mm"]
                if "angle_deg" in data:
                    item["angle_deg"] = data["angle_deg"]
        elif action == "update_item":
            if item_id in self.items:
                self.items[item_id] = fields
        elif action == "remove_item":
            self.items.pop(item_id, None)


class Network:
    """SessionCore, stock clients and links with random delays; virtual time."""

    def __init__(self, seed: int, users: list[str], *, max_delay: float = 0.05, **core_settings: Any) -> None:
        self.rng = random.Random(seed)
        self.time = 0.0
        self.max_delay = max_delay
        self.core = SessionCore("s", now=lambda: self.time, clock=lambda: "2026-12-07T00:00:00.000+00:00",
                                **core_settings)
        self.clients = {user: StockClient(user) for user in users}
        self._events: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        # When the last message on each link arrives: links are FIFO (TCP).
        self._link_free: dict[tuple[str, str], float] = {}
        self._correction_timer: float | None = None
        for user in users:
            self._server_effects(self.core.join(user, user, connected_at="t"))

    def at(self, when: float, action: Any) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def client_does(self, when: float, user: str, action: str, item_id: str, **changes: Any) -> None:
        """At `when`, `user` changes its canvas and sends the command."""

        def act() -> None:
            command = self.clients[user].local_change(action, item_id, **changes)
            if command is not None:
                self._send_to_server(user, {"type": "command", "command": command})

        self.at(when, act)

    def run(self) -> None:
        """Until nothing is in flight and no correction is due."""
        while self._events:
            when, _, action = heapq.heappop(self._events)
            self.time = max(self.time, when)
            action()

    # -- links ----------------------------------------------------------------

    def _deliver(self, link: tuple[str, str], action: Any) -> None:
        arrival = max(self._link_free.get(link, 0.0), self.time + self.rng.uniform(0, self.max_delay))
        self._link_free[link] = arrival
        self.at(arrival, action)

    def _send_to_server(self, user: str, message: dict[str, Any]) -> None:
        text = encode(message)
        self._deliver((user, "server"), lambda: self._server_receives(user, text))

    def _send_to_client(self, user: str, message: Any) -> None:
        wire = message.to_wire()
        self._deliver(("server", user), lambda: self.clients[user].receive(wire))

    def _ping(self, user: str) -> None:
        """A WebSocket ping: the client's pong goes back behind what it sent before."""
        pong = lambda: self._deliver((user, "server"), lambda: self.core.pong_received(user, user))  # noqa: E731
        self._deliver(("server", user), pong)

    # -- the server: commits every change at once, as an idle store does -----

    def _server_receives(self, user: str, text: str) -> None:
        self._server_effects(self.core.receive(user, user, text))

    def _server_effects(self, effects: list[Any]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self._send_to_client(effect.conn, effect.message)
            elif isinstance(effect, Broadcast):
                for conn in self.core.connections(exclude=effect.exclude):
                    self._send_to_client(conn, effect.message)
            elif isinstance(effect, PingAfterLoad):
                self._ping(effect.conn)
            elif isinstance(effect, WantCommit):
                batch = self.core.take_batch()
                if batch is not None:
                    self._server_effects(self.core.committed(batch))
            elif isinstance(effect, WantCorrections):
                self._arm_corrections()

    def _arm_corrections(self) -> None:
        due = self.core.next_correction_due()
        if due is None or (self._correction_timer is not None and self._correction_timer <= due):
            return
        self._correction_timer = due

        def fire() -> None:
            self._correction_timer = None
            self._server_effects(self.core.corrections())
            self._arm_corrections()

        self.at(due, fire)

    # -- verdicts -------------------------------------------------------------

    def views(self, item_id: str, fields: tuple[str, ...]) -> dict[str, Any]:
        """Each window's and the server's values of these fields of one item."""
        def pick(item: dict[str, Any] | None) -> Any:
            return None if item is None else tuple(item.get(f) for f in fields)

        views = {user: pick(client.items.get(item_id)) for user, client in self.clients.items()}
        views["server"] = pick(self.core.document.items.get(item_id))
        return views


def start_with_item(net: Network, item_id: str, **fields: Any) -> None:
    """The first user adds the item; everyone has it before the round starts."""
    net.client_does(0.0, next(iter(net.clients)), "add_item", item_id, **fields)
    net.run()
    assert all(item_id in c.items for c in net.clients.values())
    net.time += 5.0  # a quiet moment: the round starts later


def drag_round(seed: int, **core_settings: Any) -> Network:
    """Three windows drag one lens at once, each a few moves."""
    net = Network(seed, ["ada", "bob", "cy"], **core_settings)
    start_with_item(net, "lens", x_mm=0.0, y_mm=0.0, angle_deg=0.0, efl_mm=100.0)
    rng = random.Random(seed * 7919 + 1)
    start = net.time
    for user in net.clients:
        when = start + rng.uniform(0, 0.05)
        for _ in range(rng.randint(1, 6)):
            when += rng.uniform(0.005, 0.04)
            x, y = round(rng.uniform(-100, 100), 2), round(rng.uniform(-100, 100), 2)
            net.client_does(when, user, "move_item", "lens", x_mm=x, y_mm=y, angle_deg=float(rng.randrange(360)))
    net.run()
    return net


def diverged(net: Network, item_id: str, fields: tuple[str, ...]) -> bool:
    return len(set(net.views(item_id, fields).values())) > 1


# -- the acceptance rounds -------------------------------------------------------------------------


def test_without_corrections_concurrent_drags_leave_windows_disagreeing() -> None:
    """The problem, shown first: stock clients diverge in most rounds."""
    rounds = [drag_round(seed, corrections_enabled=False) for seed in range(200)]
    split = sum(diverged(net, "lens", POSITION) for net in rounds)
    print(f"corrections off: {split} of 200 rounds diverged")
    assert split >= 50


def test_concurrent_drags_end_on_one_position_in_every_window() -> None:
    rounds = [drag_round(seed) for seed in range(200)]
    split = [seed for seed, net in enumerate(rounds) if diverged(net, "lens", POSITION)]
    corrections = sum(net.core.stats.corrections for net in rounds)
    print(f"corrections on: {200 - len(split)} of 200 rounds converged, {corrections} corrections sent")
    assert split == []
    assert corrections > 0


def edit_round(seed: int) -> tuple[Network, float, tuple[float, float]]:
    """Ada drags the lens while Bob edits its focal length (whole-item updates)."""
    net = Network(seed, ["ada", "bob", "cy"])
    start_with_item(net, "lens", x_mm=0.0, y_mm=0.0, angle_deg=0.0, efl_mm=100.0, name="L1")
    rng = random.Random(seed * 104729 + 3)
    when = net.time
    position = (0.0, 0.0)
    for _ in range(rng.randint(5, 30)):
        when += rng.uniform(0.005, 0.03)
        position = (round(rng.uniform(-100, 100), 2), round(rng.uniform(-100, 100), 2))
        net.client_does(when, "ada", "move_item", "lens", x_mm=position[0], y_mm=position[1])
    efl = 100.0
    edit = net.time
    for _ in range(rng.randint(1, 3)):
        edit += rng.uniform(0.01, 0.2)
        efl = float(rng.randrange(20, 500))
        net.client_does(edit, "bob", "update_item", "lens", efl_mm=efl)
    net.run()
    return net, efl, position


def test_an_edit_and_a_concurrent_drag_both_survive_everywhere() -> None:
    merges = 0
    for seed in range(200):
        net, efl, position = edit_round(seed)
        views = net.views("lens", ("efl_mm", "x_mm", "y_mm"))
        assert set(views.values()) == {(efl, *position)}, (seed, views)
        merges += net.core.stats.merges
    print(f"{merges} merged updates over 200 rounds")
    assert merges > 0


def test_a_removed_item_is_not_resurrected_and_a_stale_window_is_corrected() -> None:
    refused = 0
    for seed in range(100):
        net = Network(seed, ["ada", "bob", "cy"])
        start_with_item(net, "lens", x_mm=0.0, y_mm=0.0, angle_deg=0.0, efl_mm=100.0)
        rng = random.Random(seed)
        when = net.time
        net.client_does(when + rng.uniform(0, 0.03), "ada", "remove_item", "lens")
        for _ in range(rng.randint(1, 8)):
            when += rng.uniform(0.002, 0.02)
            net.client_does(when, "bob", "move_item", "lens", x_mm=rng.uniform(-9, 9), y_mm=1.0)
        net.client_does(when + 0.01, "cy", "update_item", "lens", efl_mm=55.0)
        net.run()
        assert "lens" not in net.core.document.items, seed
        assert all("lens" not in c.items for c in net.clients.values()), seed
        refused += net.core.stats.refusals
        if net.core.stats.refusals:
            assert ErrorCode.ITEM_REMOVED in net.clients["bob"].errors + net.clients["cy"].errors
    print(f"{refused} late changes of the removed item refused")
    assert refused > 0


def test_a_solo_drag_gets_no_corrections() -> None:
    net = Network(5, ["ada", "bob", "cy"])
    start_with_item(net, "lens", x_mm=0.0, y_mm=0.0, angle_deg=0.0)
    when = net.time
    for n in range(600):
        when += 1 / 60
        net.client_does(when, "ada", "move_item", "lens", x_mm=float(n), y_mm=float(-n))
    net.run()
    assert net.core.stats.corrections == 0
    assert sum(c.corrections for c in net.clients.values()) == 0
    assert set(net.views("lens", POSITION).values()) == {(599.0, -599.0, 0.0)}


def test_a_host_replacing_the_document_may_bring_a_removed_item_back() -> None:
    net = Network(1, ["ada", "bob"])
    start_with_item(net, "lens", x_mm=0.0, y_mm=0.0)
    net.client_does(net.time, "ada", "remove_item", "lens")
    net.run()
    assert net.core.document.is_removed("lens")
    item = {"uuid": "lens", "item_type": "lens", "x_mm": 3.0, "y_mm": 4.0}
    net._send_to_server("ada", {"type": "sync:full_state", "state": {"items": [item]}})
    net.run()
    assert not net.core.document.is_removed("lens")
    net.client_does(net.time, "bob", "move_item", "lens", x_mm=5.0, y_mm=6.0)  # bob has no lens: nothing sent
    net._send_to_server("bob", {"type": "command", "command": {
        "action": "move_item", "item_type": "lens", "item_id": "lens", "data": {"x_mm": 5.0, "y_mm": 6.0}}})
    net.run()
    assert net.core.document.items["lens"]["x_mm"] == 5.0
    assert net.core.stats.refusals == 0


# -- the pure rules ---------------------------------------------------------------------------------


def test_a_stale_field_keeps_the_current_value_and_an_edited_one_wins() -> None:
    history = FieldHistory()
    current = {"uuid": "l", "item_type": "lens", "x_mm": 1.0, "efl_mm": 100.0}
    history.record("l", None, current, "ada", now=0.0)  # an add: nothing to remember
    moved = {**current, "x_mm": 2.0}
    history.record("l", {"x_mm": 1.0}, {"x_mm": 2.0}, "bob", now=0.5)
    # Ada edits efl with the x she had (1.0, which Bob's move replaced): x stays 2.0.
    merged, changed, stale = merge_update(moved, {"x_mm": 1.0, "efl_mm": 80.0}, history, "l", "ada", arrived=0.6)
    assert merged == {"x_mm": 2.0, "efl_mm": 80.0} and changed == ["efl_mm"] and stale == ["x_mm"]
    # A value nobody showed her is her edit.
    merged, changed, _ = merge_update(moved, {"x_mm": 7.0}, history, "l", "ada", arrived=0.6)
    assert merged["x_mm"] == 7.0 and changed == ["x_mm"]
    # Bob's values are what she may have seen for `window` seconds only.
    later = {**moved, "x_mm": 3.0}
    history.record("l", {"x_mm": 2.0}, {"x_mm": 3.0}, "bob", now=0.7)
    merged, _, _ = merge_update(later, {"x_mm": 2.0}, history, "l", "ada", arrived=0.8)
    assert merged["x_mm"] == 3.0
    merged, _, _ = merge_update(later, {"x_mm": 2.0}, history, "l", "ada", arrived=0.7 + history.window + 1)
    assert merged["x_mm"] == 2.0


def test_setting_a_value_again_is_an_edit_when_nobody_else_changed_it_lately() -> None:
    """Ada sets efl 100 -> 80; long after, Bob sets 100; long after, Ada 80 again."""
    history = FieldHistory()
    history.record("l", {"efl_mm": 100.0}, {"efl_mm": 80.0}, "ada", now=0.0)
    history.record("l", {"efl_mm": 80.0}, {"efl_mm": 100.0}, "bob", now=10.0)
    merged, changed, _ = merge_update({"efl_mm": 100.0}, {"efl_mm": 80.0}, history, "l", "ada", arrived=20.0)
    assert merged == {"efl_mm": 80.0} and changed == ["efl_mm"]
    # Her own old value, just replaced by Bob, is stale, though.
    merged, _, stale = merge_update({"efl_mm": 100.0}, {"efl_mm": 80.0}, history, "l", "ada", arrived=10.5)
    assert merged == {"efl_mm": 100.0} and stale == ["efl_mm"]


values = st.one_of(st.integers(-5, 5), st.sampled_from(["a", "b"]), st.floats(-2, 2, allow_nan=False))
items = st.dictionaries(st.sampled_from(["x_mm", "y_mm", "efl_mm", "name"]), values, max_size=4)


@settings(max_examples=300, deadline=None)
@given(current=items, data=items, seen=st.lists(items, max_size=4))
def test_merge_keeps_every_field_it_does_not_take_from_the_update(
    current: dict[str, Any], data: dict[str, Any], seen: list[dict[str, Any]]
) -> None:
    history = FieldHistory()
    before: dict[str, Any] | None = None
    for n, item in enumerate([*seen, current]):
        history.record("i", before, item, "other", now=float(n) * 0.01)
        before = item
    merged, changed, stale = merge_update(current, data, history, "i", "me", arrived=0.1)
    assert set(merged) == set(current) | set(changed)
    assert not set(changed) & set(stale)
    for name, value in merged.items():
        assert value == (data[name] if name in changed else current[name])
    for name in changed:
        assert data[name] != current.get(name, object())  # taken only when it is news
    if seen:
        previous = seen[-1]
        for name, value in data.items():
            if name in previous and name in current and previous[name] != current[name]:
                if value == previous[name]:
                    assert name not in changed  # the value just replaced: stale, kept out
    assert merge_update(current, dict(current), history, "i", "me", arrived=0.1) == (current, [], [])


def test_corrections_only_for_a_change_near_someone_elses() -> None:
    tracker = CorrectionTracker(window=1.0, settle=0.15)
    assert not tracker.committed("ada", "l", arrived=0.0, now=0.0, level=MOVE)
    assert not tracker.committed("ada", "l", arrived=0.1, now=0.1, level=MOVE)  # alone
    assert not tracker.committed("bob", "l", arrived=5.0, now=5.0, level=MOVE)  # long after
    assert tracker.committed("ada", "l", arrived=5.2, now=5.2, level=MOVE)  # bob's relay was near
    assert tracker.next_due() == pytest.approx(5.35)
    tracker.committed("ada", "l", arrived=5.3, now=5.3, level=UPDATE)  # she goes on: it settles later
    assert tracker.take_due(5.4) == []
    assert tracker.take_due(5.45) == [("ada", "l", UPDATE)]
    assert tracker.next_due() is None
    # A merge that kept her value out: due whoever came before.
    assert tracker.committed("cy", "m", arrived=9.0, now=9.0, level=UPDATE, force=True)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["ada", "bob", "cy"]),
            st.sampled_from(["l1", "l2", "l3", "l4"]),
            st.floats(min_value=0.0, max_value=0.7),  # time since the previous change
            st.sampled_from([MOVE, UPDATE]),
            st.booleans(),  # a correction is taken right after
        ),
        max_size=300,
    )
)
def test_pruning_forgets_only_what_no_decision_needs(changes: list) -> None:
    """The tracker prunes from the oldest item on (not a walk over all of
    them); its decisions are those of one that never forgets anything."""
    window = 1.0
    tracker = CorrectionTracker(window=window, settle=0.15)
    latest: dict[tuple[str, str], float] = {}  # (author, item) -> latest change
    corrected: dict[tuple[str, str], float] = {}
    now = 0.0
    for user, item, gap, level, take in changes:
        now += gap
        cutoff = now - window
        expected = corrected.get((user, item), cutoff) > cutoff or any(
            author != user and when > cutoff for (author, other), when in latest.items() if other == item
        )
        assert tracker.committed(user, item, arrived=now, now=now, level=level) == expected
        latest[(user, item)] = now
        if take:
            for taken_user, taken_item, _ in tracker.take_due(now + 0.2):
                corrected[(taken_user, taken_item)] = now + 0.2
            now += 0.2
    # What is kept is bounded by the window: items changed within it.
    tracker.take_due(now)
    assert set(tracker._recent) <= {item for (_, item), when in latest.items() if when > now - window}


def test_the_tracker_forgets_old_items_a_few_per_commit_not_all_at_once() -> None:
    """Items out of the window go 16 every 8th commit, from the oldest on:
    no commit walks them all (a periodic walk was a pause in busy sessions)."""
    tracker = CorrectionTracker(window=1.0, settle=0.15)
    for i in range(96):
        tracker.committed("ada", f"l{i}", arrived=i * 0.001, now=i * 0.001, level=MOVE)
    assert len(tracker._recent) == 96  # all within the window
    for k in range(1, 57):
        tracker.committed("bob", "x", arrived=10.0 + k * 0.001, now=10.0 + k * 0.001, level=MOVE)
        assert len(tracker._recent) == max(96 - 16 * (k // 8), 0) + 1
    assert list(tracker._recent) == ["x"]
    # An item changed within the window stops the forgetting: order is by latest change.
    tracker.committed("ada", "l0", arrived=10.5, now=10.5, level=MOVE)
    for k in range(7):  # the 8th commit from here forgets
        tracker.committed("cy", "y", arrived=11.2, now=11.2, level=MOVE)
    assert list(tracker._recent) == ["l0", "y"]


def test_a_removed_item_is_remembered_while_its_op_is_retained() -> None:
    doc = SessionDocument(retention=3)

    def op(seq: int, action: str) -> Op:
        command = {"action": action, "item_type": "lens", "item_id": "l", "data": {}}
        return Op(seq, "ada", COMMAND, "t", command=command)

    doc.apply(op(1, "add_item"))
    doc.apply(op(2, "remove_item"))
    assert doc.is_removed("l")
    doc.apply(op(3, "add_item"))
    assert not doc.is_removed("l")
    doc.apply(op(4, "remove_item"))
    for seq in range(5, 8):
        doc.apply(Op(seq, "ada", COMMAND, "t", command={"action": "noop", "item_id": "x"}))
    assert not doc.is_removed("l")  # its op left the history: forgotten


def test_a_correction_is_a_command_stock_optiverse_applies() -> None:
    wire = Correction({"action": "move_item", "item_type": "lens", "item_id": "l", "data": {"x_mm": 1.0}},
                      7, "t").to_wire()
    assert wire == {"type": "command", "command": {"action": "move_item", "item_type": "lens", "item_id": "l",
                    "data": {"x_mm": 1.0}}, "timestamp": "t", "seq": 7, "correction": True}


# -- through the server ------------------------------------------------------------------------------


async def test_a_window_that_may_show_a_stale_position_gets_a_correction(
    harness: Any, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Real frames: Bob moves the lens right after the server relayed him
    Ada's move; once his moves settle he gets the lens's state, marked."""
    import logging

    import trio

    from collab_trio.testing import HANG, add_item, move_item

    caplog.set_level(logging.INFO, logger="collab_trio")
    with trio.fail_after(HANG):
        async with harness.joined("s", "ada") as ada, harness.joined("s", "bob") as bob:
            await ada.expect("user:joined")
            session = harness.registry.sessions["s"]
            await ada.send(add_item("lens", {"x_mm": 0.0, "y_mm": 0.0, "angle_deg": 0.0}))
            await ada.expect("ack")
            await bob.expect("command")
            await trio.sleep(5)  # quiet: nothing near what follows
            await ada.send(move_item("lens", {"x_mm": 1.0, "y_mm": 1.0, "angle_deg": 0.0}))
            await ada.expect("ack")  # relayed to Bob, who has not read it yet
            await bob.send(move_item("lens", {"x_mm": 2.0, "y_mm": 2.0, "angle_deg": 0.0}))
            sent = trio.current_time()
            relay = await bob.expect("command")
            assert relay["command"]["data"]["x_mm"] == 1.0 and "correction" not in relay
            await bob.expect("ack")
            correction = await bob.expect("command")
            assert correction["correction"] is True
            assert correction["command"]["action"] == "move_item"
            assert correction["command"]["data"] == {"x_mm": 2.0, "y_mm": 2.0, "angle_deg": 0.0}
            assert trio.current_time() - sent == pytest.approx(harness.registry.config.correction_settle)
            moved = await ada.expect("command")
            assert moved["command"]["data"]["x_mm"] == 2.0
            await ada.expect_silence(1.0)  # Ada's own move was not near anyone else's
            assert harness.registry.convergence_stats().corrections == 1
    with trio.fail_after(HANG):
        await session.finished.wait()  # unloaded: its statistics are the server's now
    assert harness.registry.convergence_stats().corrections == 1
    assert any("1 correction(s)" in r.getMessage() for r in caplog.records)


def test_the_field_history_is_bounded_whatever_the_updates_hold() -> None:
    history = FieldHistory(max_values=1000)
    for n in range(50):
        before = {f"f{k}": 0 for k in range(300)}
        after = {f"f{k}": n + 1 for k in range(300)}  # 300 fields changed at once
        history.record(f"item{n}", before, after, "ada", now=float(n))
        assert history.size <= 1000
    assert len(history) <= 2
    history.record("item49", {"f0": 50}, None, "ada", now=60.0)  # removed: forgotten
    assert history.size <= 600


async def _stock_window(
    harness: Any, session: str, user: str, rng: random.Random, plan: list[tuple[float, str, dict[str, Any]]],
    done: Any, seed_item: bool, start: float, joined: list[str], all_joined: Any,
) -> StockClient:
    """One stock window over real frames: its sends and its receives each
    delayed at random (in order, like TCP), its plan of local changes."""
    import json

    import trio

    window = StockClient(user)
    outgoing_send, outgoing = trio.open_memory_channel[tuple[float, str]](1000)
    incoming_send, incoming = trio.open_memory_channel[tuple[float, dict[str, Any]]](10000)

    async def delayed_sender(ws: Any) -> None:
        async for when, text in outgoing:
            await trio.sleep_until(when)
            await ws.send_message(text)

    async def reader(ws: Any) -> None:
        last = 0.0
        while True:
            message = json.loads(await ws.get_message())
            last = max(last, trio.current_time() + rng.uniform(0, 0.05))
            incoming_send.send_nowait((last, message))

    async def applier() -> None:
        async for when, message in incoming:
            await trio.sleep_until(when)
            window.receive(message)

    async with harness.joined(session, user) as client:
        joined.append(user)
        if len(joined) == 3:
            all_joined.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(delayed_sender, client.ws)
            nursery.start_soon(reader, client.ws)
            nursery.start_soon(applier)
            if seed_item:
                await all_joined.wait()  # the others get the add
                window.items["lens"] = {}
                await client.send({"type": "command", "command": window.local_change(
                    "add_item", "lens", x_mm=0.0, y_mm=0.0, angle_deg=0.0, efl_mm=100.0)})
            last_send = 0.0
            for offset, action, changes in plan:
                await trio.sleep_until(start + offset)
                command = window.local_change(action, "lens", **changes)
                if command is not None:
                    last_send = max(last_send, trio.current_time() + rng.uniform(0, 0.05))
                    outgoing_send.send_nowait((last_send, json.dumps({"type": "command", "command": command})))
            await done.wait()
            nursery.cancel_scope.cancel()
    return window


@pytest.mark.parametrize("corrections", [False, True])
async def test_stock_windows_over_real_frames_converge(
    start_server: Any, autojump_clock: Any, corrections: bool
) -> None:
    """The same rounds through the trio server (batches, the correcter task):
    three windows drag and edit one lens with random delays; afterwards every
    window shows what the server stores (without corrections, not so)."""
    import trio

    from collab_trio.testing import HANG

    harness = await start_server(corrections=corrections)
    split = 0
    for seed in range(20):
        rng = random.Random(seed)
        session = f"round-{seed}"
        plans: dict[str, list[tuple[float, str, dict[str, Any]]]] = {}
        for user in ("ada", "bob", "cy"):
            offset, plan = rng.uniform(0, 0.05), []
            for _ in range(rng.randint(2, 8)):
                offset += rng.uniform(0.005, 0.04)
                if user == "cy" and rng.random() < 0.5:
                    plan.append((offset, "update_item", {"efl_mm": float(rng.randrange(20, 500))}))
                else:
                    plan.append((offset, "move_item", {"x_mm": rng.uniform(-50, 50), "y_mm": rng.uniform(-50, 50)}))
            plans[user] = plan
        done, all_joined = trio.Event(), trio.Event()
        joined: list[str] = []
        windows: dict[str, StockClient] = {}
        start = trio.current_time() + 1.0  # every window's plan starts then

        async def run(user: str, seed_item: bool) -> None:
            windows[user] = await _stock_window(
                harness, session, user, random.Random(f"{seed}-{user}"), plans[user], done, seed_item, start,
                joined, all_joined)

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "ada", True)
                nursery.start_soon(run, "bob", False)
                nursery.start_soon(run, "cy", False)
                await trio.sleep(5)  # every plan ran; delays, settle and corrections are over
                async with harness.joined(session, "probe") as probe:
                    await probe.send({"type": "sync:request"})
                    state = await probe.expect("sync:state")
                done.set()
        [stored] = [item for item in state["state"]["items"] if item["uuid"] == "lens"]
        views = {user: tuple(w.items["lens"].get(f) for f in ("x_mm", "y_mm", "efl_mm")) for user, w in windows.items()}
        split += set(views.values()) != {(stored["x_mm"], stored["y_mm"], stored["efl_mm"])}
    print(f"corrections {'on' if corrections else 'off'}: {split} of 20 rounds left a window disagreeing")
    if corrections:
        assert split == 0
    else:
        assert split >= 5


def test_mixed_rounds_with_removes_and_re_adds_converge() -> None:
    """Moves, whole-item updates, removes and re-adds (an undo) by four
    windows on two items, delays up to 200 ms: every window ends on the
    server's items, with each item present or absent alike."""
    split = []
    for seed in range(200):
        net = Network(seed, ["ada", "bob", "cy", "dee"], max_delay=0.2)
        start_with_item(net, "lens", x_mm=0.0, y_mm=0.0, angle_deg=0.0, efl_mm=100.0)
        net.client_does(net.time, "ada", "add_item", "mirror", x_mm=5.0, y_mm=5.0, angle_deg=0.0, efl_mm=1.0)
        net.run()
        net.time += 5.0
        rng = random.Random(seed * 31 + 7)
        start = net.time
        for _ in range(40):
            when = start + rng.uniform(0, 3.0)
            user = rng.choice(sorted(net.clients))
            item_id = rng.choice(["lens", "mirror"])
            kind = rng.choices(["move", "update", "remove", "add"], [5, 3, 1, 1])[0]
            if kind == "move":
                net.client_does(when, user, "move_item", item_id, x_mm=rng.uniform(-9, 9), y_mm=rng.uniform(-9, 9))
            elif kind == "update":
                net.client_does(when, user, "update_item", item_id, efl_mm=float(rng.randrange(3)))
            elif kind == "remove":
                net.client_does(when, user, "remove_item", item_id)
            else:  # put back, as an undo does, with what this window last had
                net.client_does(when, user, "add_item", item_id, x_mm=1.0, y_mm=1.0, angle_deg=0.0, efl_mm=9.0)
        net.run()
        for item_id in ("lens", "mirror"):
            if diverged(net, item_id, ("x_mm", "y_mm", "efl_mm")):
                split.append((seed, item_id))
    assert split == []


def test_a_refusal_on_a_remove_of_the_same_batch_is_not_persisted_if_the_batch_fails() -> None:
    net = Network(3, ["ada", "bob"])
    start_with_item(net, "lens", x_mm=0.0, y_mm=0.0)
    core = net.core
    core.receive("ada", "ada", encode({"type": "command", "command": {
        "action": "remove_item", "item_type": "lens", "item_id": "lens", "data": {}}}))
    core.receive("bob", "bob", encode({"type": "command", "command": {
        "action": "move_item", "item_type": "lens", "item_id": "lens", "data": {"x_mm": 1.0, "y_mm": 1.0}}}))
    batch = core.take_batch()
    assert batch is not None and len(batch.ops) == 1  # the move is refused in the batch
    effects = core.commit_failed(batch)
    codes = {e.conn: e.message.code for e in effects if isinstance(e, Send)}
    assert codes == {"ada": ErrorCode.NOT_PERSISTED, "bob": ErrorCode.NOT_PERSISTED}
    assert "lens" in core.document.items and core.stats.refusals == 0


def test_large_values_are_not_kept_in_the_field_history() -> None:
    history = FieldHistory()
    for n in range(300):
        history.record("l", {"blob": "x" * 200_000 + str(n)}, {"blob": "y" * 200_000 + str(n)}, "ada", now=n)
    assert history.size == 0


def test_a_correction_that_restores_an_item_carries_exactly_what_is_stored() -> None:
    net = Network(0, ["ada", "bob"], max_delay=0.0)
    start_with_item(net, "lens", x_mm=0.0, y_mm=0.0, efl_mm=100.0)
    core = net.core

    def command(user: str, action: str, data: dict[str, Any]) -> None:
        core.receive(user, user, encode({"type": "command", "command": {
            "action": action, "item_type": "lens", "item_id": "lens", "data": data}}))
        batch = core.take_batch()
        assert batch is not None
        core.committed(batch)

    command("bob", "move_item", {"x_mm": 1.0, "y_mm": 1.0})
    command("ada", "remove_item", {})
    command("ada", "add_item", {"x_mm": 5.0, "y_mm": 5.0, "efl_mm": 100.0})
    net.time += 1.0
    sent = [e.message.to_wire() for e in core.corrections() if isinstance(e, Send)]
    assert [m["command"]["action"] for m in sent] == ["remove_item", "add_item"]
    stored = {k: v for k, v in core.document.items["lens"].items() if k not in ("uuid", "item_type")}
    assert sent[1]["command"]["data"] == stored and all(m["correction"] for m in sent)


def test_an_update_of_very_many_fields_is_taken_whole_and_not_recorded() -> None:
    from collab_trio.convergence import MERGE_MAX_FIELDS

    history = FieldHistory()
    history.record("l", {"x_mm": 1.0}, {"x_mm": 2.0}, "bob", now=0.0)
    big = {f"f{n}": n for n in range(MERGE_MAX_FIELDS + 1)}
    merged, changed, stale = merge_update({"x_mm": 2.0}, {**big, "x_mm": 1.0}, history, "l", "ada", arrived=0.1)
    assert merged == {**big, "x_mm": 1.0} and stale == [] and len(changed) == len(big) + 1
    history.record("l", {"x_mm": 2.0}, {**big, "x_mm": 1.0}, "ada", now=0.2)
    assert history.size == 0  # too many fields to follow: forgotten
