"""Size budgets of one session, driven by plain calls on SessionCore: no trio.

- max_document_size: a change that would make the document larger is refused
  at once (error document_too_large), counting the changes still pending;
  removes and moves always pass; a replacement is judged by its own items.
- snapshot_bytes: a snapshot is asked for once the bytes committed since the
  last one reach max(snapshot_bytes, document size).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from collab_trio.document import SessionDocument
from collab_trio.messages import Ack, Error, Relay
from collab_trio.protocol import ErrorCode
from collab_trio.session_core import Broadcast, Send, SessionCore, WantCommit, WantSnapshot

NOW = "2026-12-02T10:00:00.000+00:00"


def core(**kwargs: Any) -> SessionCore:
    kwargs.setdefault("clock", lambda: NOW)
    c = SessionCore("lab", **kwargs)
    for user in ("alice", "bob"):
        c.join(user, user, connected_at=NOW)
    return c


def command(action: str, item_id: str, op_id: Any = None, **data: Any) -> str:
    body: dict[str, Any] = {"action": action, "item_id": item_id, "item_type": "lens"}
    if action != "remove_item":
        body["data"] = data
    message: dict[str, Any] = {"type": "command", "command": body}
    if op_id is not None:
        message["op_id"] = op_id
    return json.dumps(message)


def add(item_id: str, note_size: int, op_id: Any = None) -> str:
    return command("add_item", item_id, op_id, note="n" * note_size)


def commit_all(c: SessionCore) -> list[Any]:
    effects: list[Any] = []
    while (batch := c.take_batch()) is not None:
        effects += c.committed(batch)
    return effects


def refusal(effects: list[Any]) -> Error:
    [effect] = effects
    assert isinstance(effect, Send) and effect.conn == "alice"
    assert isinstance(effect.message, Error) and effect.message.code == ErrorCode.DOCUMENT_TOO_LARGE
    return effect.message


def relays(effects: list[Any]) -> list[int]:
    return [e.message.op.seq for e in effects if isinstance(e, Broadcast) and isinstance(e.message, Relay)]


# -- max_document_size ------------------------------------------------------------------


def test_a_change_beyond_the_document_limit_is_refused_and_nothing_else_happens() -> None:
    c = core(max_document_size=1000)
    c.receive("alice", "alice", add("big", 600))
    commit_all(c)
    size = c.document.size
    error = refusal(c.receive("alice", "alice", add("more", 600, op_id="o1")))
    assert error.ref == "command" and "1000 bytes" in error.message
    # Nothing queued, nothing to commit, nobody told.
    assert not c.has_pending and c.pending_bytes == 0 and c.take_batch() is None
    assert c.document.size == size and list(c.document.items) == ["big"]
    # The session goes on: moves and removes pass, and then the add fits.
    assert c.receive("alice", "alice", command("move_item", "big", x_mm=1.5, y_mm=2.5)) == [WantCommit()]
    assert c.receive("alice", "alice", command("remove_item", "big")) == [WantCommit()]
    assert relays(commit_all(c)) == [2, 3]
    assert c.receive("alice", "alice", add("more", 600, op_id="o1")) == [WantCommit()]
    assert relays(commit_all(c)) == [4]


def test_at_the_limit_moves_of_coordinates_and_removes_still_pass() -> None:
    c = core()
    for item_id in ("a", "b"):
        c.receive("alice", "alice", command("add_item", item_id))  # no coordinates yet
    commit_all(c)
    c.max_document_size = c.document.size  # full
    refusal(c.receive("alice", "alice", command("add_item", "c")))
    # A move that adds three fields of long floats grows the document: it passes.
    move = command("move_item", "a", x_mm=-1.2345678901234567e-300, y_mm=1 / 3, angle_deg=2**62)
    assert c.receive("alice", "alice", move) == [WantCommit()]
    assert c.receive("alice", "alice", command("remove_item", "b")) == [WantCommit()]
    assert relays(commit_all(c)) == [3, 4]


def test_a_move_with_a_huge_integer_is_not_a_move_of_coordinates() -> None:
    # Moves always pass within what any float move can add; a 301-digit
    # integer would let moves alone grow the document without bound.
    c = core()
    c.receive("alice", "alice", command("add_item", "a"))
    commit_all(c)
    c.max_document_size = c.document.size
    refusal(c.receive("alice", "alice", command("move_item", "a", x_mm=10**300)))


def test_a_burst_counts_the_changes_still_pending() -> None:
    c = core(max_document_size=10_000)
    accepted = refused = 0
    for i in range(100):
        effects = c.receive("alice", "alice", add(f"i{i:03d}", 100))
        if effects == [WantCommit()]:
            accepted += 1
        else:
            refusal(effects)
            refused += 1
    assert accepted > 30 and refused > 0
    assert relays(commit_all(c)) == list(range(1, accepted + 1))
    assert c.document.size <= 10_000 and c.pending_growth == 0


def test_a_refused_change_leaves_its_op_id_free_but_an_applied_one_is_still_acknowledged() -> None:
    c = core(max_document_size=1000)
    c.receive("alice", "alice", add("a", 500, op_id="first"))
    commit_all(c)
    refusal(c.receive("alice", "alice", add("b", 500, op_id="second")))
    # A repeat of an applied change costs nothing: acknowledged again even now.
    assert c.receive("alice", "alice", add("a", 500, op_id="first")) == [Send("alice", Ack(1, "first"))]
    c.receive("alice", "alice", command("remove_item", "a"))
    commit_all(c)
    assert c.receive("alice", "alice", add("b", 500, op_id="second")) == [WantCommit()]


def state(kind: str, items: list[dict[str, Any]]) -> str:
    return json.dumps({"type": kind, "state": {"items": items}})


def test_a_replacement_is_judged_by_its_own_items() -> None:
    c = core(max_document_size=1000)
    big = [{"uuid": f"u{i}", "note": "n" * 100} for i in range(10)]
    error = refusal(c.receive("alice", "alice", state("sync:update", big)))
    assert error.ref == "sync:update" and "1000 bytes" in error.message
    # The host's full state too, and then it is not forwarded either.
    error = refusal(c.receive("alice", "alice", state("sync:full_state", big)))
    assert error.ref == "sync:full_state"
    assert not c.has_pending
    # At the limit, a smaller replacement passes: it replaces, it doesn't add.
    c.receive("alice", "alice", add("a", 800))
    commit_all(c)
    assert c.receive("alice", "alice", state("sync:update", big[:3])) == [WantCommit()]
    # What follows it is counted from its size, not from the document's.
    assert c.projected_size < 1000
    assert c.receive("alice", "alice", add("b", 300)) == [WantCommit()]
    commit_all(c)
    assert list(c.document.items) == ["u0", "u1", "u2", "b"]


def test_near_the_limit_an_update_that_makes_an_item_smaller_passes() -> None:
    # A merged update may grow the item by at most its message; near the
    # limit the bound is taken field by field, and a field made smaller adds nothing.
    c = core(max_document_size=300_000)
    c.receive("alice", "alice", add("big", 100_000))
    c.receive("alice", "alice", add("other", 150_000))
    commit_all(c)
    assert c.receive("alice", "alice", command("update_item", "big", note="m" * 60_000)) == [WantCommit()]
    commit_all(c)
    assert c.document.size < 250_000 and c.document.items["big"]["note"] == "m" * 60_000
    # One that adds a field the item lacks still counts it, and is refused.
    refusal(c.receive("alice", "alice", command("update_item", "big", note="m", extra="e" * 100_000)))
    # Without merging, the same shrinking update was always judged exactly.
    plain = core(max_document_size=300_000, merge_updates=False)
    plain.receive("alice", "alice", add("big", 100_000))
    plain.receive("alice", "alice", add("other", 150_000))
    commit_all(plain)
    assert plain.receive("alice", "alice", command("update_item", "big", note="m" * 60_000)) == [WantCommit()]


def test_a_merged_update_behind_a_pending_replacement_stays_within_the_limit() -> None:
    # The replacement may leave the item out: the update then makes it anew,
    # so its field-by-field bound against the current item does not hold.
    c = core(max_document_size=300_000)
    c.receive("alice", "alice", add("big", 100_000))
    c.receive("alice", "alice", add("other", 150_000))
    commit_all(c)
    items = [{"uuid": "other", "note": "n" * 150_000}, {"uuid": "filler", "note": "f" * 140_000}]
    update = json.dumps({"type": "sync:update", "state": {"items": items}})
    assert c.receive("bob", "bob", update) == [WantCommit()]
    c.receive("alice", "alice", command("update_item", "big", note="m" * 100_000))
    commit_all(c)
    assert c.document.size <= 300_000


CHANGES = st.lists(
    st.one_of(
        st.tuples(st.just("add_item"), st.integers(0, 9), st.integers(0, 300)),
        st.tuples(st.just("update_item"), st.integers(0, 9), st.integers(0, 300)),
        st.tuples(st.just("move_item"), st.integers(0, 9), st.floats(-1e6, 1e6)),
        st.tuples(st.just("remove_item"), st.integers(0, 9), st.just(0)),
        st.tuples(st.just("commit"), st.just(0), st.just(0)),
        # A sync:update of some of the items (by their number bits), fields of `value` bytes.
        st.tuples(st.just("replace"), st.integers(0, 1023), st.integers(0, 300)),
    ),
    max_size=60,
)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(CHANGES, st.integers(300, 3000))
def test_no_burst_overshoots_the_limit_but_by_its_moves(changes: list[Any], limit: int) -> None:
    c = core(max_document_size=limit)
    move_growth = 0
    for action, item, value in changes:
        if action == "commit":
            commit_all(c)
            continue
        if action == "replace":
            kept = [{"uuid": f"i{n}", "note": "r" * value} for n in range(10) if item >> n & 1]
            text = json.dumps({"type": "sync:update", "state": {"items": kept}})
            effects = c.receive("bob", "bob", text)
            if effects != [WantCommit()]:
                [refused] = effects
                assert isinstance(refused, Send) and refused.message.code == ErrorCode.DOCUMENT_TOO_LARGE
            continue
        if action == "move_item":
            text = command(action, f"i{item}", x_mm=value, y_mm=value)
        elif action == "remove_item":
            text = command(action, f"i{item}")
        elif action == "update_item" and value % 3:
            # Fields the item may not have yet: merged in, not replacing.
            text = command(action, f"i{item}", note="n" * (value // 2), **{f"f{value % 3}": "v" * value})
        else:
            text = command(action, f"i{item}", note="n" * value)
        effects = c.receive("alice", "alice", text)
        if effects != [WantCommit()]:
            assert action in ("add_item", "update_item")
            refusal(effects)
        elif action == "move_item":
            move_growth += 2 * 30  # two new fields at most, of floats of at most 24 bytes
        assert c.pending_bytes >= 0
    commit_all(c)
    assert c.document.size <= limit + move_growth
    assert c.pending_growth == 0 and c.pending_bytes == 0


# -- snapshots by journal bytes -----------------------------------------------------------


def test_small_changes_on_a_big_document_write_no_snapshot_of_it() -> None:
    # About 9 MB of items; 300 moves of ~100 bytes each journal ~30 KB.
    items = [{"uuid": f"u{i}", "item_type": "lens", "blob": "b" * 1_000_000} for i in range(9)]
    document = SessionDocument.from_snapshot({"epoch": "e", "version": 0, "written": True, "items": items})
    c = core(document=document, snapshot_bytes=1000)
    wanted = []
    for i in range(300):
        c.receive("alice", "alice", command("move_item", f"u{i % 9}", x_mm=float(i)))
        wanted += [e for e in commit_all(c) if isinstance(e, WantSnapshot)]
    assert wanted == []
    assert 300 * 90 < c.journal_bytes < 300 * 120
    # Once changes as large as the document itself are journaled, one snapshot.
    c.receive("alice", "alice", state("sync:update", items))
    wanted = [e for e in commit_all(c) if isinstance(e, WantSnapshot)]
    assert len(wanted) == 1 and wanted[0].snapshot["version"] == 301


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 400), st.booleans()), min_size=1, max_size=30),
    st.integers(1, 5000),
)
def test_a_snapshot_is_wanted_exactly_when_the_journal_crosses_the_threshold(
    changes: list[tuple[int, bool]], snapshot_bytes: int
) -> None:
    c = core(snapshot_bytes=snapshot_bytes)
    journaled = 0  # bytes committed since the last stored snapshot
    writing: tuple[dict[str, Any], int] | None = None
    for i, (note_size, save_now) in enumerate(changes):
        text = add(f"i{i}", note_size)
        c.receive("alice", "alice", text)
        wanted = [e for e in commit_all(c) if isinstance(e, WantSnapshot)]
        journaled += len(text)
        due = writing is None and journaled >= max(snapshot_bytes, c.document.size)
        assert len(wanted) == int(due)
        if due:
            writing = (wanted[0].snapshot, journaled)
            assert wanted[0].snapshot["version"] == c.document.version
        if writing is not None and save_now:
            c.snapshot_saved(writing[0])
            journaled -= writing[1]
            writing = None
        assert c.journal_bytes == journaled
