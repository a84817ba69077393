"""Whole-document replacements (sync:update, a host's sync:full_state, targeted
or not) racing changes still in flight, with clients that do what stock
Optiverse does: apply every relayed command as it arrives, reload the canvas
on sync:state and on sync:full_state. At quiescence (after the corrections)
every window shows the server's document.

Pure SessionCore, no trio; the links are FIFO queues delivered by hand.
"""

from __future__ import annotations

import json
from typing import Any

from collab_trio.convergence import MOVE, UPDATE, CorrectionTracker
from collab_trio.protocol import encode
from collab_trio.session_core import Broadcast, PingAfterLoad, Send, SessionCore, WantCommit

from .test_convergence import StockClient

T0 = "2026-12-07T00:00:00.000+00:00"
IDENT = ("uuid", "item_uuid", "item_type")
# A WebSocket ping in an inbox (the window answers it when it gets there).
PING: dict[str, Any] = {"type": "(a WebSocket ping)"}


class Window(StockClient):
    """Stock Optiverse (test_convergence.StockClient: commands applied as they
    arrive), which also reloads its whole canvas on sync:state and on
    sync:full_state, as collaboration_manager.py does."""

    def local(self, action: str, item_id: str, **changes: Any) -> dict[str, Any]:
        command = self.local_change(action, item_id, **changes)
        assert command is not None
        return {"type": "command", "command": command}

    def canvas(self) -> dict[str, Any]:
        return {"items": [{**v, "uuid": k, "item_type": "lens"} for k, v in self.items.items()],
                "version": 0, "timestamp": T0}

    def receive(self, message: dict[str, Any]) -> None:
        if message.get("type") not in ("sync:state", "sync:full_state"):
            super().receive(message)
            return
        state = message.get("state")
        if not state:
            return  # (a never-written session's null state: the canvas is kept)
        self.items = {
            item.get("uuid") or item.get("item_uuid"): {k: v for k, v in item.items() if k not in IDENT}
            for item in state.get("items", [])
            if item.get("item_type")
        }


class Wire:
    """SessionCore with FIFO links held by hand: nothing reaches a window until deliver()."""

    def __init__(self, users: list[str], **settings: Any) -> None:
        self.time = 0.0
        self.core = SessionCore("s", now=lambda: self.time, clock=lambda: T0, **settings)
        self.windows = {u: Window(u) for u in users}
        self.inbox: dict[str, list[dict[str, Any]]] = {u: [] for u in users}
        for u in users:
            self.effects(self.core.join(u, u, connected_at=T0))
        self.deliver_all()

    def effects(self, effects: list[Any]) -> None:
        for e in effects:
            if isinstance(e, Send):
                self.inbox[e.conn].append(json.loads(encode(e.message.to_wire())))
            elif isinstance(e, Broadcast):
                for conn in self.core.connections(exclude=e.exclude):
                    self.inbox[conn].append(json.loads(encode(e.message.to_wire())))
            elif isinstance(e, PingAfterLoad):
                self.inbox[e.conn].append(PING)
            elif isinstance(e, WantCommit):
                batch = self.core.take_batch()
                if batch is not None:
                    self.effects(self.core.committed(batch))

    def send(self, user: str, message: dict[str, Any]) -> None:
        """The server receives `message` from `user` now (and commits at once)."""
        self.effects(self.core.receive(user, user, json.dumps(message)))

    def does(self, user: str, action: str, item_id: str, **changes: Any) -> dict[str, Any]:
        """`user` changes its canvas; returns the message (not yet sent)."""
        return self.windows[user].local(action, item_id, **changes)

    def deliver(self, user: str) -> None:
        inbox, self.inbox[user] = self.inbox[user], []
        for message in inbox:
            if message is PING:
                self.core.pong_received(user, user)  # answered once what came before is taken in
            else:
                self.windows[user].receive(message)

    def deliver_all(self) -> None:
        for u in self.windows:
            self.deliver(u)

    def settle(self) -> None:
        """Let every correction come due and arrive."""
        self.time += 10.0
        self.effects(self.core.corrections())
        self.deliver_all()

    def server_items(self) -> dict[str, dict[str, Any]]:
        return {k: {f: v for f, v in item.items() if f not in IDENT} for k, item in self.core.document.items.items()}

    def views(self) -> dict[str, Any]:
        views = {u: w.items for u, w in self.windows.items()}
        views["server"] = self.server_items()
        return views






def setup(users=("ada", "bob")) -> Wire:
    w = Wire(list(users))
    w.send("ada", w.does("ada", "add_item", "lens", x_mm=0.0, y_mm=0.0, angle_deg=0.0, efl_mm=100.0))
    w.deliver_all()
    w.time += 5.0
    return w


def test_a_move_sent_before_a_host_full_state_arrived_is_corrected_for_the_mover() -> None:
    w = setup()
    move = w.does("bob", "move_item", "lens", x_mm=5.0, y_mm=5.0)  # bob drags (local first)
    # ada (host) uploads her canvas: the server commits it and forwards it to bob
    w.send("ada", {"type": "sync:full_state", "state": w.windows["ada"].canvas()})
    w.time += 0.01
    w.send("bob", move)            # bob's move arrives after the replacement: applied on top of it
    w.deliver_all()                # bob loads the forwarded state: his move is gone from his window
    w.settle()
    v = w.views()
    assert v["server"]["lens"]["x_mm"] == 5.0
    assert v["ada"] == v["server"]
    assert v["bob"] == v["server"], v


def test_a_move_sent_before_a_sync_update_arrived_is_corrected_for_the_mover() -> None:
    w = setup()
    move = w.does("bob", "move_item", "lens", x_mm=5.0, y_mm=5.0)
    w.send("ada", {"type": "sync:update", "state": w.windows["ada"].canvas()})
    w.time += 0.01
    w.send("bob", move)
    w.deliver_all()
    w.settle()
    v = w.views()
    assert v["bob"] == v["server"], v


def test_a_targeted_full_state_that_changes_the_document_is_loaded_by_everyone() -> None:
    """What Optiverse does on user:joined: the host sends its canvas to the newcomer only."""
    w = setup(("ada", "bob", "cy"))
    w.send("bob", w.does("bob", "move_item", "lens", x_mm=5.0, y_mm=5.0))  # relayed to ada, not read yet
    # cy joined a moment ago; ada's window answers user:joined with its canvas (lens still at 0)
    w.send("ada", {"type": "sync:full_state", "state": w.windows["ada"].canvas(), "target_user": "cy"})
    w.deliver_all()
    w.settle()
    v = w.views()
    assert v["ada"] == v["bob"]           # both show 5.0 ...
    assert v["bob"] == v["server"], v  


def test_a_targeted_full_state_that_changes_nothing_keeps_the_corrections_due() -> None:
    w = setup(("ada", "bob", "cy", "dee"))
    w.send("bob", w.does("bob", "move_item", "lens", x_mm=1.0, y_mm=1.0))
    cy_move = w.does("cy", "move_item", "lens", x_mm=2.0, y_mm=2.0)   # cy drags concurrently
    w.time += 0.02
    w.send("cy", cy_move)
    w.deliver("ada")
    w.deliver("bob")
    # cy's window: its own move, then bob's relay -> shows 1.0; the server has 2.0; a correction is due to cy
    w.deliver("cy")
    assert w.core.next_correction_due() is not None
    # dee (a newcomer) joined; ada sends it her canvas (which equals the server's document)
    assert w.windows["ada"].items == w.server_items()
    w.send("ada", {"type": "sync:full_state", "state": w.windows["ada"].canvas(), "target_user": "dee"})
    w.deliver_all()
    w.settle()
    v = w.views()
    assert v["cy"] == v["server"], v


def test_an_update_that_recreates_an_item_after_a_replacement_reaches_everyone() -> None:
    """An update of an item the server lacks (and has no tombstone of) adds it on the
    server, but is relayed as update_item, which stock windows without the item ignore."""
    w = setup(("ada", "bob", "cy"))
    w.send("bob", w.does("bob", "add_item", "m", x_mm=9.0, y_mm=9.0, efl_mm=1.0))   # relayed to ada, cy
    w.deliver("cy")
    # ada (host) has not read bob's add yet and uploads her canvas: "m" is not in it
    w.send("ada", {"type": "sync:full_state", "state": w.windows["ada"].canvas()})
    update = w.does("bob", "update_item", "m", efl_mm=2.0)   # bob edits "m" before the state reaches him
    w.time += 0.01
    w.send("bob", update)
    w.deliver_all()
    w.settle()
    v = w.views()
    assert "m" in v["server"]                      # the update re-created it on the server
    assert {u: "m" in v[u] for u in ("ada", "bob", "cy")} == {"ada": True, "bob": True, "cy": True}, v


def test_a_host_full_state_that_crosses_a_relay_is_corrected_for_the_host() -> None:
    w = setup()
    w.send("bob", w.does("bob", "move_item", "lens", x_mm=5.0, y_mm=5.0))   # committed, relayed to ada (unread)
    w.send("ada", {"type": "sync:full_state", "state": w.windows["ada"].canvas()})   # ada's canvas: x=0
    w.deliver_all()     # bob loads ada's canvas; ada applies bob's relay after her upload
    w.settle()
    v = w.views()
    assert v["bob"] == v["server"]
    assert v["ada"] == v["server"], v


def test_a_non_host_full_state_is_followed_by_the_document_for_its_target() -> None:
    w = setup(("ada", "bob", "cy"))    # ada is the server's host; bob's Optiverse thinks it hosts
    w.send("ada", w.does("ada", "move_item", "lens", x_mm=5.0, y_mm=5.0))  # relayed to bob (unread) and cy
    w.deliver("cy")
    w.send("bob", {"type": "sync:full_state", "state": w.windows["bob"].canvas(), "target_user": "cy"})
    w.deliver_all()
    w.settle()
    v = w.views()
    assert v["cy"] == v["server"], v


def test_the_mover_is_corrected_with_a_move_not_a_remove_and_add() -> None:
    # A correction of a loader's own change has that change's kind: a
    # remove and add would take away the item it may still be dragging.
    w = setup()
    move = w.does("bob", "move_item", "lens", x_mm=5.0, y_mm=5.0)
    w.send("ada", {"type": "sync:full_state", "state": w.windows["ada"].canvas()})
    w.time += 0.01
    w.send("bob", move)
    w.deliver_all()
    w.time += 10.0
    w.effects(w.core.corrections())
    assert [m["command"]["action"] for m in w.inbox["bob"] if m.get("correction")] == ["move_item"]
    w.deliver_all()
    assert w.windows["bob"].items == w.server_items()


def test_the_sender_of_a_replacement_is_corrected_on_an_update_followed_by_a_move() -> None:
    # bob edits L1's properties (update_item) and then drags it (move_item);
    # ada, who read neither yet, uploads her canvas (the old properties):
    # it replaces the document, and she then applies bob's relays (the new
    # properties). Her correction must restore the whole item, not only its
    # position: bob's latest change (a move) hid the update before it.
    # (Found by tests/test_optiverse_fuzz.py's model with 4-6 users, 40 actions each,
    # max_delay 0.2, presync_drags=False: a window left with another name.)
    t = CorrectionTracker(window=1.0)
    t.committed("bob", "L1", arrived=0.00, now=0.00, level=UPDATE)
    t.committed("bob", "L1", arrived=0.05, now=0.05, level=MOVE)
    assert t.replaced("ada", {"bob", "cy"}, now=0.1)
    assert t.take_due(1.0) == [("ada", "L1", UPDATE)]


def test_a_refusals_remove_crossing_the_senders_upload_is_corrected_with_the_item() -> None:
    # bob removes L1. ada's move of L1 arrives 1.5 s later (a slow link; or
    # held over the rate limit): refused, and ada is sent error + remove_item.
    # Before reading them, ada uploads her canvas (sync:update), which still
    # has L1: the document has L1 again. She then applies the remove: L1 is
    # gone from her window. replaced() re-marks her for the correction in
    # flight, but corrected() (the refusal's path) records no kind, so it is
    # re-sent at MOVE: a move_item, which Optiverse ignores for an item it
    # lacks. (A correction that removed the item via take_due() is re-sent as
    # remove + add: removed_by_correction().)
    from collab_trio.document import SessionDocument
    from collab_trio.messages import Correction
    from collab_trio.session_core import Send
    from collab_trio.testing import add_item, move_item, remove_item, sync_update

    t = [0.0]
    core = SessionCore("s", SessionDocument(), now=lambda: t[0])
    core.join("a", "ada", connected_at="t")
    core.join("b", "bob", connected_at="t")

    def commit() -> list[Any]:
        effects = []
        while (batch := core.take_batch()) is not None:
            effects += core.committed(batch)
        return effects

    core.receive("a", "ada", json.dumps(add_item("L1", {"x_mm": 1.0, "y_mm": 1.0})))
    commit()
    t[0] = 5.0
    core.receive("b", "bob", json.dumps(remove_item("L1")))
    commit()
    t[0] = 6.5
    core.receive("a", "ada", json.dumps(move_item("L1", {"x_mm": 2.0, "y_mm": 2.0})))
    refused = [e.message.command["action"] for e in commit() if isinstance(e, Send) and isinstance(e.message, Correction)]
    assert refused == ["remove_item"]
    t[0] = 6.6
    core.receive("a", "ada", json.dumps(sync_update([{"uuid": "L1", "item_uuid": "L1", "item_type": "lens", "x_mm": 2.0, "y_mm": 2.0}])))
    commit()
    assert "L1" in core.document.items
    t[0] = 10.0
    sent = [e.message.command["action"] for e in core.corrections() if isinstance(e, Send) and e.conn == "a"]
    # ada's window lacks L1 once she applies the remove: only an add brings it back.
    assert "add_item" in sent, sent
