"""Randomized rounds of stock Optiverse windows (both roles) against SessionCore.

The window model follows QPG-MIT/optiverse collaboration_manager.py (HEAD
cef0820) more closely than test_stock_optiverse.Optiverse does:

- A window has a *scene* (QGraphicsItems, what the user sees) and a
  *map* (`item_uuid_map`, what commands and uploads use).  An add received
  for an id already mapped puts a second object on the scene (the old one
  stays, untracked).
- connection:ack: enabled, `sync:request` (+user_id by send_message), and
  `rebuild_uuid_map()` from the scene.
- A user's add: on the scene, and (own: `edited` is connected to
  broadcast_update_item) ; mapped and sent only when initial_sync_complete.
- A user's drag of any object: `edited` -> update_item (own objects only,
  whole item), then move_item (whole item), both only once enabled; neither
  checks the map nor initial_sync_complete.
- A user's property edit: update_item of the whole item, own objects only
  (an edit of another's object is never sent: excluded, no server can
  converge it).
- A user's remove: off the scene; map entry of its id deleted; remove_item sent.
- command (once enabled): add -> new (not own) object, mapped; move/update/
  remove -> of the mapped object, ignored if none.
- sync:state / sync:full_state with a non-null state: scene and map cleared,
  every item rebuilt (not own), initial_sync_complete.
- user:joined: a Host-mode window uploads `sync:full_state` of its map with
  `target_user`.  user:left, host:changed, ack, error: nothing.

Network: FIFO links, each with a latency drawn once (up to `max_delay`) and
a jitter of up to half of it per message (or, `jitter=None`, any delay up to
`max_delay` per message), the server committing at once, a correction timer.
A window answers a WebSocket ping when it gets there (after what came before
it), on its link back. Relays that cross a change are corrected within
`correction_window` (1 s): rounds whose round trips pass that (0.6 s one
way) are outside what the server promises.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import random
from collections import Counter
from typing import Any, Callable

from collab_trio.protocol import encode
from collab_trio.session_core import Broadcast, PingAfterLoad, Send, SessionCore, WantCommit

T0 = "2026-12-07T00:00:00.000+00:00"
IDENT = ("uuid", "item_uuid", "item_type")


def lens(item_id: str, x: float, y: float, efl: float = 100.0) -> dict[str, Any]:
    return {
        "x_mm": x, "y_mm": y, "angle_deg": 0.0, "name": "Lens", "item_uuid": item_id,
        "interfaces": [{"x1_mm": 0.0, "y1_mm": -30.0, "x2_mm": 0.0, "y2_mm": 30.0,
                        "element_type": "lens", "name": "L", "efl_mm": efl}],
    }


class Obj:
    """A QGraphicsItem on a window's scene."""

    _ids = itertools.count()

    def __init__(self, item_id: str, fields: dict[str, Any], own: bool) -> None:
        self.id = item_id
        self.fields = fields
        self.own = own  # its `edited` signal is connected to broadcast_update_item
        self.key = next(Obj._ids)

    def data(self) -> dict[str, Any]:
        return {**json.loads(json.dumps(self.fields)), "item_uuid": self.id}


class Opti:
    """One stock Optiverse window."""

    def __init__(self, user: str, role: str, send: Callable[[dict[str, Any]], None]) -> None:
        self.user = user
        self.role = role
        self.send = send
        self.enabled = False
        self.synced = role == "host"
        self.scene: list[Obj] = []
        self.map: dict[str, Obj] = {}
        self.log: list[str] = []
        self.conn = ""  # its connection's id at the server
        self.pong: Callable[[], None] = lambda: None  # answers a WebSocket ping

    # -- what the user does --------------------------------------------------------------

    def add(self, item_id: str, fields: dict[str, Any]) -> None:
        obj = Obj(item_id, fields, own=True)
        self.scene.append(obj)
        self.log.append(f"add {item_id}")
        if not self.enabled or not self.synced:
            return
        self.map[item_id] = obj
        self._command("add_item", item_id, obj.data())

    def drag(self, obj: Obj, x: float, y: float, angle: float) -> None:
        obj.fields.update(x_mm=x, y_mm=y, angle_deg=angle)
        self.log.append(f"drag {obj.id} own={obj.own} mapped={self.map.get(obj.id) is obj}")
        if not self.enabled:
            return
        if obj.own:
            self._command("update_item", obj.id, obj.data())
        self._command("move_item", obj.id, obj.data())

    def edit(self, obj: Obj, **changes: Any) -> None:
        assert obj.own
        obj.fields.update(changes)
        self.log.append(f"edit {obj.id}")
        if self.enabled:
            self._command("update_item", obj.id, obj.data())

    def remove(self, obj: Obj) -> None:
        self.scene.remove(obj)
        self.log.append(f"remove {obj.id}")
        if not self.enabled:
            return
        self.map.pop(obj.id, None)
        self._command("remove_item", obj.id, {})

    def _command(self, action: str, item_id: str, data: dict[str, Any]) -> None:
        self.send({"type": "command", "command": {"action": action, "item_type": "lens", "item_id": item_id,
                                                  "data": data}, "user_id": self.user})

    # -- what it receives ----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"items": [{**o.data(), "uuid": i, "item_type": "lens"} for i, o in self.map.items()],
                "version": 0, "timestamp": T0}

    def _create(self, data: dict[str, Any], fallback: str) -> Obj:
        item_id = data.get("uuid") or data.get("item_uuid") or f"fresh-{fallback}"
        fields = {k: v for k, v in data.items() if k not in IDENT}
        return Obj(item_id, fields, own=False)

    def receive(self, m: dict[str, Any]) -> None:
        kind = m.get("type")
        self.log.append(f"<- {kind} {summary(m)}")
        if kind == "connection:ack":
            self.enabled = True
            self.send({"type": "sync:request", "user_id": self.user})
            self.map = {o.id: o for o in self.scene}  # rebuild_uuid_map()
        elif kind == "user:joined":
            if self.role == "host":
                self.send({"type": "sync:full_state", "state": self.state(), "target_user": m.get("user_id"),
                           "user_id": self.user})
        elif kind == "command":
            if not self.enabled:
                return
            c = m["command"]
            action, item_id, data = c.get("action"), c.get("item_id"), c.get("data") or {}
            if action == "add_item":
                obj = self._create(data, item_id)
                self.scene.append(obj)
                self.map[obj.id] = obj
            elif action == "move_item":
                obj = self.map.get(item_id)
                if obj is not None:
                    if "x_mm" in data and "y_mm" in data:
                        obj.fields["x_mm"], obj.fields["y_mm"] = data["x_mm"], data["y_mm"]
                    if "angle_deg" in data:
                        obj.fields["angle_deg"] = data["angle_deg"]
            elif action == "update_item":
                obj = self.map.get(item_id)
                if obj is not None:
                    obj.fields = {k: v for k, v in data.items() if k not in IDENT}
            elif action == "remove_item":
                obj = self.map.pop(item_id, None)
                if obj is not None:
                    self.scene.remove(obj)
        elif kind in ("sync:state", "sync:full_state"):
            state = m.get("state")
            if not state:
                return
            self.scene, self.map = [], {}
            for item in state.get("items", []):
                if item.get("item_type"):
                    obj = self._create(item, "state")
                    self.scene.append(obj)
                    self.map[obj.id] = obj
            self.synced = True

    def view(self) -> Counter[tuple[str, str]]:
        return Counter((o.id, json.dumps({k: v for k, v in o.fields.items() if k not in IDENT}, sort_keys=True))
                       for o in self.scene)


def summary(m: dict[str, Any]) -> str:
    if m.get("type") == "command":
        c = m["command"]
        d = c.get("data") or {}
        return (f"{c.get('action')} {c.get('item_id')} x={d.get('x_mm')} efl="
                f"{(d.get('interfaces') or [{}])[0].get('efl_mm')}{' CORR' if m.get('correction') else ''}"
                f" from={m.get('user_id')}")
    if m.get("type") in ("sync:state", "sync:full_state"):
        s = m.get("state")
        return "null" if s is None else str([(i.get("uuid"), i.get("x_mm")) for i in s.get("items", [])]) + (
            f" target={m.get('target_user')}" if m.get("target_user") else "")
    return str(m.get("user_id", ""))


class Net:
    """SessionCore, Optiverse windows, FIFO links with random delays, virtual time."""

    def __init__(self, seed: int, max_delay: float = 0.1, jitter: float | None = 0.5, **settings: Any) -> None:
        self.rng = random.Random(seed)
        self.time = 0.0
        self.max_delay = max_delay
        self.jitter = jitter
        self._latency: dict[tuple[str, str], float] = {}
        self.core = SessionCore("s", now=lambda: self.time, clock=lambda: T0, **settings)
        self.windows: dict[str, Opti] = {}
        self._events: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        self._link_free: dict[tuple[str, str], float] = {}
        self._timer: float | None = None
        self.trace: list[str] = []

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run(self) -> None:
        while self._events:
            when, _, action = heapq.heappop(self._events)
            self.time = max(self.time, when)
            action()

    def delay(self, link: tuple[str, str]) -> float:
        """A link's latency, drawn once per link (up to max_delay), and its jitter,
        up to `jitter` times that, per message; jitter None: any delay up to
        max_delay for each message."""
        if self.jitter is None:
            return self.rng.uniform(0, self.max_delay)
        latency = self._latency.get(link)
        if latency is None:
            latency = self._latency[link] = self.rng.uniform(0, self.max_delay)
        return latency * (1 + self.rng.uniform(0, self.jitter))

    def _link(self, link: tuple[str, str], action: Callable[[], None]) -> None:
        arrival = max(self._link_free.get(link, 0.0), self.time + self.delay(link))
        self._link_free[link] = arrival
        self.at(arrival, action)

    def join(self, user: str, role: str, canvas: dict[str, dict[str, Any]] | None = None) -> Opti:
        # One connection id per join: what an earlier window of the user sent
        # is not taken as the new connection's.
        conn = f"{user}#{len(self.trace)}"

        def send(message: dict[str, Any]) -> None:
            text = encode(message)
            self.trace.append(f"{self.time:.3f} {user} -> {message['type']} {summary(message)}")
            self._link((user, "server"), lambda: self._server(self.core.receive(conn, user, text)))

        def pong() -> None:  # a WebSocket pong: answered in order, like any message
            self._link((user, "server"), lambda: self.core.pong_received(conn, user))

        w = self.windows[user] = Opti(user, role, send)
        w.conn, w.pong = conn, pong
        for item_id, fields in (canvas or {}).items():
            w.scene.append(Obj(item_id, dict(fields), own=True))
        self.trace.append(f"{self.time:.3f} {user} joins as {role}")
        self._server(self.core.join(conn, user, connected_at=T0))
        return w

    def leave(self, user: str) -> None:
        self.trace.append(f"{self.time:.3f} {user} leaves")
        w = self.windows.pop(user)
        self._server(self.core.leave(w.conn, user, "closed"))

    def _to(self, conn: str, message: Any) -> None:
        user = conn.split("#")[0]
        wire = None if message is None else json.loads(encode(message.to_wire()))

        def arrive() -> None:
            w = self.windows.get(user)
            if w is None or w.conn != conn:
                return
            if wire is None:
                w.pong()
                return
            self.trace.append(f"{self.time:.3f} {user} <- {wire['type']} {summary(wire)}")
            w.receive(wire)

        self._link(("server", user), arrive)

    def _server(self, effects: list[Any]) -> None:
        for e in effects:
            if isinstance(e, Send):
                self._to(e.conn, e.message)
            elif isinstance(e, Broadcast):
                for conn in self.core.connections(exclude=e.exclude):
                    self._to(conn, e.message)
            elif isinstance(e, PingAfterLoad):
                self._to(e.conn, None)
            elif isinstance(e, WantCommit):
                batch = self.core.take_batch()
                if batch is not None:
                    self._server(self.core.committed(batch))
        self._arm()

    def _arm(self) -> None:
        due = self.core.next_correction_due()
        if due is None or (self._timer is not None and self._timer <= due):
            return
        self._timer = due

        def fire() -> None:
            self._timer = None
            self._server(self.core.corrections())

        self.at(due, fire)

    def server_view(self) -> Counter[tuple[str, str]]:
        return Counter((k, json.dumps({f: v for f, v in item.items() if f not in IDENT}, sort_keys=True))
                       for k, item in self.core.document.items.items())

    def diverged(self) -> dict[str, Any]:
        server = self.server_view()
        return {u: w.view() for u, w in self.windows.items() if w.view() != server}


# -- the random round ---------------------------------------------------------------------------


def fuzz_round(seed: int, *, presync_drags: bool = True, leaves: bool = True, max_delay: float = 0.1,
               **settings: Any) -> Net:
    """One round: 2-4 windows (Host mode, some with a canvas, or Join mode)
    join within 3 s and add, drag, edit and remove at random for 8 s; some
    leave and open the session again."""
    rng = random.Random(seed)
    net = Net(seed, max_delay=max_delay, **settings)
    n_users = rng.randint(2, 4)
    users = [f"u{i}" for i in range(n_users)]
    ids = itertools.count()
    horizon = 8.0

    def act(user: str) -> None:
        w = net.windows.get(user)
        if w is None:
            return
        r = rng.random()
        if r < 0.25 or not w.scene:
            if not w.synced and not presync_drags:
                return
            w.add(f"N{next(ids)}", lens("", round(rng.uniform(-50, 50), 1), 0.0))
        elif r < 0.6:
            obj = rng.choice(w.scene)
            if (not w.synced or w.map.get(obj.id) is not obj) and not presync_drags:
                return
            # a drag: a few moves
            t = net.time
            for k in range(rng.randint(1, 4)):
                x, y, a = round(rng.uniform(-90, 90), 1), round(rng.uniform(-90, 90), 1), float(rng.randrange(360))
                net.at(t + 0.02 * k, lambda obj=obj, x=x, y=y, a=a: obj in w.scene and net.windows.get(user) is w
                       and w.drag(obj, x, y, a))
        elif r < 0.85:
            own = [o for o in w.scene if o.own and (w.synced or presync_drags)]
            if own:
                obj = rng.choice(own)
                interfaces = json.loads(json.dumps(obj.fields.get("interfaces") or lens("", 0, 0)["interfaces"]))
                interfaces[0]["efl_mm"] = float(rng.randrange(20, 500))
                if rng.random() < 0.5:
                    w.edit(obj, interfaces=interfaces)
                else:
                    w.edit(obj, name=f"L{rng.randrange(100)}")
        else:
            obj = rng.choice(w.scene)
            if (not w.synced or w.map.get(obj.id) is not obj) and not presync_drags:
                return
            w.remove(obj)

    for u in users:
        role = "host" if rng.random() < 0.4 else "client"
        canvas = None
        if role == "host" and rng.random() < 0.7:
            canvas = {}
            for _ in range(rng.randint(1, 2)):
                item_id = f"{u}-H{next(ids)}"
                canvas[item_id] = lens(item_id, round(rng.uniform(-50, 50), 1), 5.0)
        start = rng.uniform(0, 3.0)
        net.at(start, lambda u=u, role=role, canvas=canvas: net.join(u, role, canvas))
        for _ in range(rng.randint(2, 8)):
            net.at(start + rng.uniform(0.01, horizon - start), lambda u=u: act(u))
        if leaves and rng.random() < 0.2:
            gone = start + rng.uniform(0.5, horizon - start)
            net.at(gone, lambda u=u: u in net.windows and len(net.windows) > 1 and net.leave(u))
            # the user opens the session again (a new window, either mode)
            if rng.random() < 0.7:
                back_role = "host" if rng.random() < 0.5 else "client"
                back = gone + rng.uniform(0.1, 2.0)
                net.at(back, lambda u=u, r=back_role: u not in net.windows and net.join(u, r, None))
                for _ in range(rng.randint(0, 3)):
                    net.at(back + rng.uniform(0.05, 3.0), lambda u=u: act(u))
    net.run()
    return net


def survey(n: int, **kw: Any) -> list[int]:
    return [seed for seed in range(n) if fuzz_round(seed, **kw).diverged()]


def test_randomized_rounds_of_stock_optiverse_windows_end_on_the_document() -> None:
    """FUZZ_SEEDS rounds (default 400) at each setting: every window ends
    showing the server's document (before the fixes of 2026-12-08, 3-12% of
    rounds diverged here: changes crossing a plain sync:state, a host's
    upload to itself, a correction crossing a host's upload)."""
    n = int(os.environ.get("FUZZ_SEEDS", "400"))
    for settings in ({"max_delay": 0.1}, {"max_delay": 0.3}, {"max_delay": 0.1, "jitter": None}):
        bad = survey(n, **settings)
        assert bad == [], f"{settings}: {len(bad)} of {n} rounds diverged, e.g. seeds {bad[:10]}"
