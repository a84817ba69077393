"""The session rules, driven by plain calls on SessionCore: no trio, no sockets.

Connections are plain strings here; effects are compared as values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collab_trio.document import COMMAND, Op, SessionDocument
from collab_trio.messages import (
    Ack,
    ConnectionAck,
    Error,
    Forwarded,
    HostChanged,
    Pong,
    Relay,
    SyncOps,
    SyncState,
    UserJoined,
    UserLeft,
    encode_message,
)
from collab_trio.protocol import CloseCode, ErrorCode, SyncRequest
from collab_trio.session_core import (
    Broadcast,
    Close,
    Emptied,
    JoinRefused,
    QueueCursor,
    Refuse,
    Send,
    SessionCore,
    WantCommit,
    WantSnapshot,
)

NOW = "2026-12-02T10:00:00.000+00:00"


def core(**kwargs: Any) -> SessionCore:
    kwargs.setdefault("clock", lambda: NOW)
    return SessionCore("lab", **kwargs)


def join(c: SessionCore, user: str, conn: str | None = None, **kwargs: Any) -> list[Any]:
    return c.join(conn or user, user, connected_at=NOW, **kwargs)


def frame(message: dict[str, Any]) -> str:
    return json.dumps(message)


def add(item_id: str, op_id: Any = None) -> str:
    message: dict[str, Any] = {
        "type": "command",
        "command": {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {"x_mm": 1}},
    }
    if op_id is not None:
        message["op_id"] = op_id
    return frame(message)


def sends(effects: list[Any], conn: str) -> list[Any]:
    return [e.message for e in effects if isinstance(e, Send) and e.conn == conn]


def broadcasts(effects: list[Any]) -> list[Any]:
    return [e for e in effects if isinstance(e, Broadcast)]


def commit_all(c: SessionCore) -> list[Any]:
    """Take every pending batch and report it stored, as the runner does."""
    effects: list[Any] = []
    while (batch := c.take_batch()) is not None:
        effects += c.committed(batch)
    return effects


def test_the_pure_core_does_not_import_trio() -> None:
    # A fresh interpreter: this test process has trio loaded by other tests.
    code = (
        "import sys, collab_trio.session_core, collab_trio.messages;"
        "print(sorted(m for m in ('trio', 'trio_websocket') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- presence --------------------------------------------------------------------


def test_first_member_is_host_and_gets_the_ack() -> None:
    c = core()
    effects = join(c, "alice")
    [ack] = sends(effects, "alice")
    assert isinstance(ack, ConnectionAck)
    assert (ack.user_id, ack.is_host, ack.version) == ("alice", True, 0)
    assert [u.user_id for u in ack.users] == ["alice"]
    assert broadcasts(effects) == [Broadcast(UserJoined("alice", NOW, c.users()), exclude="alice")]
    assert c.host == "alice"


def test_second_member_is_announced_to_the_others_not_to_itself() -> None:
    c = core()
    join(c, "alice")
    effects = join(c, "bob")
    [ack] = sends(effects, "bob")
    assert ack.is_host is False
    [joined] = broadcasts(effects)
    assert joined.exclude == "bob"
    assert [(u.user_id, u.is_host) for u in joined.message.users] == [("alice", True), ("bob", False)]


def test_host_leaving_promotes_the_longest_connected_member() -> None:
    c = core()
    for user in ("alice", "bob", "carol"):
        join(c, user)
    effects = c.leave("alice", "alice", "disconnected")
    left, changed = (b.message for b in broadcasts(effects))
    assert isinstance(left, UserLeft) and left.reason == "disconnected"
    # The list in user:left already shows the new host.
    assert [(u.user_id, u.is_host) for u in left.users] == [("bob", True), ("carol", False)]
    assert changed == HostChanged("bob", NOW)
    assert c.host == "bob"


def test_a_member_who_is_not_host_leaving_changes_no_host() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    effects = c.leave("bob", "bob", "too_slow")
    assert [type(b.message) for b in broadcasts(effects)] == [UserLeft]
    assert c.host == "alice"


def test_takeover_replaces_the_old_connection_and_keeps_the_place() -> None:
    c = core()
    join(c, "alice", "alice-1")
    join(c, "bob")
    effects = join(c, "alice", "alice-2")
    assert Close("alice-1", CloseCode.REPLACED, "replaced by a newer connection of the same user") in effects
    # No user:joined for a takeover; alice is still first and host.
    assert broadcasts(effects) == []
    assert c.member_ids() == ["alice", "bob"] and c.host == "alice"
    assert sends(effects, "alice-2")[0].is_host is True
    # The old connection's end is not a leave.
    assert c.leave("alice-1", "alice", "disconnected") == []
    assert c.connection_of("alice") == "alice-2"


def test_the_recipients_follow_joins_takeovers_and_leaves() -> None:
    """connections() keeps its list while the members stay, and never
    outlives a change of them."""
    c = core()
    join(c, "alice")
    join(c, "bob")
    assert c.connections(exclude="alice") == ("bob",) and c.connections() == ("alice", "bob")
    earlier = c.connections(exclude="alice")
    assert c.connections(exclude="alice") is earlier  # kept
    join(c, "carol")
    assert c.connections(exclude="alice") == ("bob", "carol")
    assert earlier == ("bob",)  # what a caller holds does not change under it
    join(c, "bob", "bob-2")  # a takeover: the new connection, in bob's place
    assert c.connections(exclude="alice") == ("bob-2", "carol") and c.connections(exclude="bob") == ("alice", "carol")
    c.leave("carol", "carol", "disconnected")
    assert c.connections(exclude="alice") == ("bob-2",) and c.connections() == ("alice", "bob-2")
    # Lists for ids that are no members (a user who left) stay bounded.
    for n in range(100):
        c.connections(exclude=f"gone-{n}")
    assert len(c._recipients) <= 3


def test_the_last_member_leaving_empties_the_session() -> None:
    c = core()
    join(c, "alice")
    effects = c.leave("alice", "alice", "disconnected")
    assert effects[-1] == Emptied(last_user_left=True)
    assert c.closed and c.host is None
    with pytest.raises(JoinRefused):
        join(c, "bob")


def test_a_full_session_refuses_a_newcomer_but_not_a_takeover() -> None:
    c = core(max_users=2)
    join(c, "alice")
    join(c, "bob")
    with pytest.raises(JoinRefused) as refused:
        join(c, "carol")
    assert refused.value.code == CloseCode.SESSION_FULL
    join(c, "bob", "bob-2")  # a reconnect is not a newcomer
    assert c.member_ids() == ["alice", "bob"]


def test_close_all_closes_everyone_without_leave_notices() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    effects = c.close_all(CloseCode.GOING_AWAY, "server shutting down")
    assert effects == [
        Close("alice", 1001, "server shutting down"),
        Close("bob", 1001, "server shutting down"),
        Emptied(),
    ]
    assert c.leave("alice", "alice", "disconnected") == []


# -- messages --------------------------------------------------------------------


def test_ping_is_answered_and_bad_input_gets_an_error() -> None:
    c = core()
    join(c, "alice")
    assert c.receive("alice", "alice", '{"type":"ping"}') == [Send("alice", Pong(NOW))]
    [error] = sends(c.receive("alice", "alice", "{nope"), "alice")
    assert error.code == ErrorCode.INVALID_JSON
    [error] = sends(c.receive("alice", "alice", b"\x00"), "alice")
    assert error.code == ErrorCode.BINARY_NOT_SUPPORTED


def test_frames_from_a_replaced_connection_are_ignored() -> None:
    c = core()
    join(c, "alice", "alice-1")
    join(c, "alice", "alice-2")
    assert c.receive("alice-1", "alice", '{"type":"ping"}') == []


def test_a_viewer_is_refused_changes_but_may_read() -> None:
    c = core()
    join(c, "eve", can_write=False)
    assert c.receive("eve", "eve", add("x")) == [Refuse("eve", "command")]
    assert c.receive("eve", "eve", '{"type":"ping"}') == [Send("eve", Pong(NOW))]
    assert not c.has_pending


def test_cursor_goes_to_the_pump_with_the_sender_id() -> None:
    c = core()
    join(c, "alice")
    effects = c.receive("alice", "alice", '{"type":"cursor","x":1}')
    assert effects == [QueueCursor("alice", Forwarded({"type": "cursor", "x": 1, "user_id": "alice"}))]


# -- commits and ordering ----------------------------------------------------------


def test_nobody_hears_of_a_change_before_it_is_committed() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    assert c.receive("alice", "alice", add("a1", op_id="o1")) == [WantCommit()]
    assert c.document.version == 0
    batch = c.take_batch()
    assert batch is not None and [op.seq for op in batch.ops] == [1]
    assert c.take_batch() is None  # one batch out at a time
    effects = c.committed(batch)
    [relay] = broadcasts(effects)
    assert relay.exclude == "alice" and isinstance(relay.message, Relay)
    assert relay.message.to_wire()["seq"] == 1
    assert sends(effects, "alice") == [Ack(1, "o1")]
    assert c.document.version == 1 and list(c.document.items) == ["a1"]


def test_relays_and_acks_go_out_in_seq_order() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    for i in range(3):
        c.receive("alice", "alice", add(f"a{i}"))
        c.receive("bob", "bob", add(f"b{i}"))
    effects = commit_all(c)
    seqs = [b.message.op.seq for b in broadcasts(effects)]
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert [a.seq for a in sends(effects, "alice")] == [1, 3, 5]
    assert [a.seq for a in sends(effects, "bob")] == [2, 4, 6]


def test_a_failed_commit_tells_only_the_sender_and_changes_nothing() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    c.receive("alice", "alice", add("a1", op_id=7))
    batch = c.take_batch()
    assert batch is not None
    effects = c.commit_failed(batch)
    [error] = sends(effects, "alice")
    assert isinstance(error, Error) and error.code == ErrorCode.NOT_PERSISTED
    assert broadcasts(effects) == [] and sends(effects, "bob") == []
    assert c.document.version == 0 and c.pending_bytes == 0
    # The op_id is free again: a retry is a new change.
    assert c.receive("alice", "alice", add("a1", op_id=7)) == [WantCommit()]


def test_a_reset_session_closes_everyone() -> None:
    c = core()
    join(c, "alice")
    c.receive("alice", "alice", add("a1"))
    batch = c.take_batch()
    assert batch is not None
    effects = c.commit_failed(batch, reset=True)
    assert Close("alice", CloseCode.GOING_AWAY, "session was reset by an administrator; reconnect") in effects
    assert c.closed


def test_an_applied_op_id_is_only_acknowledged_again() -> None:
    c = core()
    join(c, "alice")
    c.receive("alice", "alice", add("a1", op_id="x"))
    commit_all(c)
    assert c.receive("alice", "alice", add("a1", op_id="x")) == [Send("alice", Ack(1, "x"))]
    assert not c.has_pending


def test_a_repeat_of_a_pending_op_id_is_acknowledged_with_the_first() -> None:
    c = core()
    join(c, "alice", "alice-1")
    c.receive("alice-1", "alice", add("a1", op_id="x"))
    join(c, "alice", "alice-2")  # reconnected, and sends the same change again
    assert c.receive("alice-2", "alice", add("a1", op_id="x")) == []
    effects = commit_all(c)
    assert sends(effects, "alice-1") == [Ack(1, "x")]
    assert sends(effects, "alice-2") == [Ack(1, "x")]
    assert c.document.version == 1


def test_op_ids_of_different_users_or_types_are_different_changes() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    c.receive("alice", "alice", add("a", op_id=1))
    c.receive("alice", "alice", add("b", op_id="1"))
    c.receive("bob", "bob", add("c", op_id=1))
    commit_all(c)
    assert c.document.version == 3


def test_sync_request_behind_pending_changes_is_answered_after_them() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    c.receive("alice", "alice", add("a1"))
    # bob asks while alice's change is pending: no answer yet.
    assert c.receive("bob", "bob", '{"type":"sync:request"}') == []
    effects = commit_all(c)
    kinds = [(type(e.message).__name__, getattr(e, "conn", None)) for e in effects if isinstance(e, (Send, Broadcast))]
    assert kinds == [("Relay", None), ("Ack", "alice"), ("SyncState", "bob")]
    [state] = sends(effects, "bob")
    assert state.version == 1 and [i["uuid"] for i in state.state["items"]] == ["a1"]


def test_sync_request_during_a_commit_waits_for_the_next_batch() -> None:
    c = core()
    join(c, "alice")
    c.receive("alice", "alice", add("a1"))
    batch = c.take_batch()
    assert batch is not None
    # In flight: the answer must include it, so it queues.
    assert c.receive("alice", "alice", '{"type":"sync:request"}') == []
    effects = c.committed(batch)
    assert effects[-1] == WantCommit()
    second = c.take_batch()
    assert second is not None and second.ops == ()
    [answer] = sends(c.committed(second), "alice")
    assert isinstance(answer, SyncState) and answer.version == 1


def test_sync_request_with_nothing_pending_is_answered_at_once() -> None:
    c = core()
    join(c, "alice")
    [answer] = sends(c.receive("alice", "alice", '{"type":"sync:request"}'), "alice")
    assert isinstance(answer, SyncState) and answer.state is None  # never written


def test_resume_gets_the_missed_ops_in_order() -> None:
    c = core()
    join(c, "alice")
    for i in range(3):
        c.receive("alice", "alice", add(f"a{i}"))
    commit_all(c)
    epoch = c.document.epoch
    effects = join(c, "bob", resume=SyncRequest(since=1, epoch=epoch))
    answer = sends(effects, "bob")[1]
    assert isinstance(answer, SyncOps) and [op.seq for op in answer.ops] == [2, 3]
    # Another epoch: the whole state instead.
    effects = join(c, "carol", resume=SyncRequest(since=1, epoch="other"))
    assert isinstance(sends(effects, "carol")[1], SyncState)


def test_hosts_full_state_replaces_the_document_and_is_forwarded() -> None:
    c = core()
    join(c, "host")
    join(c, "guest")
    state = {"type": "sync:full_state", "state": {"items": [{"uuid": "u1", "x_mm": 0}]}}
    assert c.receive("host", "host", frame(state)) == [WantCommit()]
    effects = commit_all(c)
    [forward] = broadcasts(effects)
    assert forward.exclude == "host"
    assert forward.message.to_wire()["user_id"] == "host"
    assert list(c.document.items) == ["u1"]


def test_a_guests_full_state_is_forwarded_and_then_its_target_gets_the_document() -> None:
    c = core()
    join(c, "host")
    join(c, "guest")
    c.receive("host", "host", add("h1"))
    commit_all(c)
    state = {"type": "sync:full_state", "state": {"items": [{"uuid": "g"}]}, "target_user": "host"}
    effects = c.receive("guest", "guest", frame(state))
    assert [(type(e), e.conn) for e in effects] == [(Send, "host"), (Send, "host")]
    assert isinstance(effects[1].message, SyncState)
    assert [item["uuid"] for item in effects[1].message.state["items"]] == ["h1"]
    assert not c.has_pending and list(c.document.items) == ["h1"]


def test_while_nothing_was_written_a_guests_full_state_becomes_the_document() -> None:
    # An Optiverse host that connected after a member in Join mode (who is
    # the server's host): its canvas is the session's, as a host's would be.
    c = core()
    join(c, "joiner")
    join(c, "optiverse-host")
    state = {"type": "sync:full_state", "state": {"items": [{"uuid": "g"}]}, "target_user": "joiner"}
    assert c.receive("optiverse-host", "optiverse-host", frame(state)) == [WantCommit()]
    effects = commit_all(c)
    assert list(c.document.items) == ["g"]
    assert [type(m) for m in sends(effects, "joiner")] == [Forwarded]
    assert [type(m) for m in sends(effects, "optiverse-host")] == [Ack]


def test_full_state_for_an_unknown_target_is_an_error() -> None:
    c = core()
    join(c, "host")
    state = {"type": "sync:full_state", "state": {"items": []}, "target_user": "nobody"}
    [error] = sends(c.receive("host", "host", frame(state)), "host")
    assert error.code == ErrorCode.UNKNOWN_USER


def test_sync_update_replaces_and_the_others_get_the_state() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    c.receive("alice", "alice", frame({"type": "sync:update", "state": {"items": [{"uuid": "z"}]}}))
    effects = commit_all(c)
    [state] = broadcasts(effects)
    assert isinstance(state.message, SyncState) and state.exclude == "alice"


# -- bytes and snapshots -------------------------------------------------------------


def test_pending_bytes_count_what_waits_for_the_store() -> None:
    c = core()
    join(c, "alice")
    text = add("a1")
    c.receive("alice", "alice", text)
    c.receive("alice", "alice", text)
    assert c.pending_bytes == 2 * len(text)
    batch = c.take_batch()
    assert batch is not None and batch.size == 2 * len(text)
    assert c.pending_bytes == 2 * len(text)  # still held until the store answers
    c.committed(batch)
    assert c.pending_bytes == 0


def test_a_snapshot_is_wanted_once_snapshot_bytes_are_journaled_and_one_at_a_time() -> None:
    size = len(add("a1"))  # every add below has this size
    c = core(snapshot_bytes=2 * size)
    join(c, "alice")
    c.receive("alice", "alice", add("a1"))
    assert not any(isinstance(e, WantSnapshot) for e in commit_all(c))
    assert c.journal_bytes == size
    c.receive("alice", "alice", add("a2"))
    [want] = [e for e in commit_all(c) if isinstance(e, WantSnapshot)]
    assert want.snapshot["version"] == 2
    for i in range(3, 6):
        c.receive("alice", "alice", add(f"a{i}"))
        assert not any(isinstance(e, WantSnapshot) for e in commit_all(c))  # one is out
    c.snapshot_saved(want.snapshot)
    # What was committed while the snapshot was written counts for the next one.
    assert c.journal_bytes == 3 * size
    assert c.snapshot_due() is not None  # unload: versions 3..5 are not in a snapshot


def test_a_failed_snapshot_is_asked_for_again_at_the_next_commit() -> None:
    c = core(snapshot_bytes=1)
    join(c, "alice")
    c.receive("alice", "alice", add("a1"))
    [want] = [e for e in commit_all(c) if isinstance(e, WantSnapshot)]
    c.snapshot_saved(None)
    c.receive("alice", "alice", add("a2"))
    [again] = [e for e in commit_all(c) if isinstance(e, WantSnapshot)]
    assert again.snapshot["version"] == 2
    c.snapshot_saved(again.snapshot)
    assert c.journal_bytes == 0 and c.snapshot_due() is None


def test_snapshot_due_is_none_when_the_last_snapshot_is_current() -> None:
    document = SessionDocument()
    c = core(document=document)
    assert c.snapshot_due() is None


# -- properties ----------------------------------------------------------------------

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["join", "leave", "add", "sync", "commit"]),
        st.sampled_from(["a", "b", "c"]),
    ),
    max_size=40,
)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(ACTIONS)
def test_any_sequence_keeps_host_members_and_seq_order_consistent(actions: list[tuple[str, str]]) -> None:
    c = core()
    acked: dict[str, list[int]] = {}
    relayed: list[int] = []
    for action, user in actions:
        if c.closed:
            break
        effects: list[Any] = []
        if action == "join":
            effects = join(c, user)
        elif action == "leave":
            effects = c.leave(user, user, "disconnected")
        elif action == "add" and user in c.member_ids():
            effects = c.receive(user, user, add(f"{user}{len(relayed)}"))
        elif action == "sync" and user in c.member_ids():
            effects = c.receive(user, user, '{"type":"sync:request"}')
        elif action == "commit":
            effects = commit_all(c)
        for effect in effects:
            if isinstance(effect, Send) and isinstance(effect.message, Ack):
                acked.setdefault(str(effect.conn), []).append(effect.message.seq)
            if isinstance(effect, Broadcast) and isinstance(effect.message, Relay):
                relayed.append(effect.message.op.seq)
        members = c.member_ids()
        # The host is a member, and the first one, whenever there are members.
        assert c.host == (members[0] if members else None) or c.closed
    assert relayed == sorted(relayed) == list(range(1, len(relayed) + 1))
    for seqs in acked.values():
        assert seqs == sorted(seqs)


CHANGES = st.lists(
    st.tuples(
        st.sampled_from(["ada", "bob"]),
        st.sampled_from(["add_item", "move_item", "update_item", "remove_item", "sync", "commit"]),
        st.sampled_from(["l1", "l2"]),
    ),
    max_size=30,
)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(CHANGES)
def test_relaying_a_single_change_first_changes_nothing_but_the_order(changes: list[tuple[str, str, str]]) -> None:
    """relays_first() then committed() gives what committed() alone gives,
    but the relay of a batch of one change comes first; the documents agree."""
    plain, early = (core(document=SessionDocument(epoch="e")) for _ in range(2))
    for c in (plain, early):
        join(c, "ada")
        join(c, "bob")
    for user, action, item_id in [*changes, ("ada", "commit", "")]:
        if action == "commit":
            while (batch := plain.take_batch()) is not None:
                expected = plain.committed(batch)
                batch = early.take_batch()
                assert batch is not None
                relays = early.relays_first(batch)
                got = early.committed(batch)
                if relays:
                    [relay] = relays
                    assert len(batch.ops) == 1 and isinstance(relay.message, Relay)
                    assert got == [e for e in expected if e != relay] and relay in expected
                else:
                    assert got == expected
            assert early.take_batch() is None
        elif action == "sync":
            for c in (plain, early):
                c.receive(user, user, '{"type":"sync:request"}')
        else:
            command = {"action": action, "item_type": "lens", "item_id": item_id, "data": {"x_mm": len(changes)}}
            effects = [c.receive(user, user, frame({"type": "command", "command": command})) for c in (plain, early)]
            assert effects[0] == effects[1]
        assert plain.document.items == early.document.items
        assert plain.document.version == early.document.version


def test_a_batch_of_one_small_change_is_relayed_first_and_only_once() -> None:
    c = core()
    join(c, "ada")
    join(c, "bob")
    c.receive("ada", "ada", add("l1", op_id="o1"))
    batch = c.take_batch()
    assert batch is not None
    [relay] = c.relays_first(batch)
    assert relay.exclude == "ada" and relay.message.op.seq == 1
    effects = c.committed(batch)
    assert broadcasts(effects) == [] and sends(effects, "ada") == [Ack(1, "o1")]
    assert "l1" in c.document.items
    # Two changes in one batch: committed() relays them in order with their acks.
    c.receive("ada", "ada", add("l2"))
    c.receive("bob", "bob", add("l3"))
    batch = c.take_batch()
    assert batch is not None and c.relays_first(batch) == []
    assert [b.message.op.seq for b in broadcasts(c.committed(batch))] == [2, 3]


def test_a_batch_holds_at_most_max_batch_ops_changes_in_arrival_order() -> None:
    c = core(max_batch_ops=3)
    join(c, "alice")
    for i in range(4):
        c.receive("alice", "alice", add(f"a{i}"))
    c.receive("alice", "alice", '{"type":"sync:request"}')
    c.receive("alice", "alice", add("a4"))
    first = c.take_batch()
    assert first is not None and [op.seq for op in first.ops] == [1, 2, 3]
    effects = c.committed(first)
    assert effects[-1] == WantCommit()
    second = c.take_batch()
    assert second is not None and [op.seq for op in second.ops] == [4, 5]
    # The sync request between a3 and a4 is answered between their acks.
    answers = [e.message for e in c.committed(second) if isinstance(e, Send)]
    assert [type(m).__name__ for m in answers] == ["Ack", "SyncState", "Ack"]
    assert answers[1].version == 4


def test_pending_sync_requests_count_against_both_bounds_and_share_one_answer() -> None:
    c = core(max_batch_ops=4)
    users = [f"u{i}" for i in range(6)]
    for user in users:
        join(c, user)
    c.receive("u0", "u0", add("a1"))
    batch = c.take_batch()
    assert batch is not None
    request = '{"type":"sync:request"}'
    for user in users:
        c.receive(user, user, request)
    # Queued behind the commit in flight: they hold bytes like changes do.
    assert c.pending_bytes == len(add("a1")) + 6 * len(request)
    c.committed(batch)
    answers = [e.message for e in c.committed(c.take_batch()) if isinstance(e, Send)]  # type: ignore[arg-type]
    # A batch answers at most max_batch_ops of them, all with one message object.
    assert len(answers) == 4 and all(a is answers[0] for a in answers)
    rest = c.take_batch()
    assert rest is not None and len(rest.entries) == 2
    c.committed(rest)
    assert c.pending_bytes == 0


# -- sync answers: shared, coalesced, bounded ------------------------------------------

REQUEST = '{"type":"sync:request"}'


def resume_request(since: int, epoch: str) -> str:
    return frame({"type": "sync:request", "since": since, "epoch": epoch})


def test_every_sync_state_at_one_version_is_one_object_and_a_change_makes_a_new_one() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    [first] = sends(c.receive("alice", "alice", REQUEST), "alice")
    [again] = sends(c.receive("bob", "bob", REQUEST), "bob")
    resumed = sends(join(c, "carol", resume=SyncRequest(since=0, epoch="another epoch")), "carol")[1]
    assert isinstance(first, SyncState) and first is again is resumed
    c.receive("alice", "alice", add("a1"))
    commit_all(c)
    [after] = sends(c.receive("bob", "bob", REQUEST), "bob")
    assert after is not first and after.version == 1
    assert [i["uuid"] for i in after.state["items"]] == ["a1"]
    # The state broadcast after a sync:update is the answer at its version too.
    c.receive("alice", "alice", frame({"type": "sync:update", "state": {"items": [{"uuid": "z"}]}}))
    [broadcast] = broadcasts(commit_all(c))
    [answer] = sends(c.receive("bob", "bob", REQUEST), "bob")
    assert broadcast.message is answer and answer.version == 2


def test_the_same_resume_at_one_version_shares_one_sync_ops_object() -> None:
    c = core()
    join(c, "alice")
    for i in range(3):
        c.receive("alice", "alice", add(f"a{i}"))
    commit_all(c)
    epoch = c.document.epoch
    join(c, "bob")
    [first] = sends(c.receive("bob", "bob", resume_request(1, epoch)), "bob")
    [again] = sends(c.receive("alice", "alice", resume_request(1, epoch)), "alice")
    [other] = sends(c.receive("alice", "alice", resume_request(2, epoch)), "alice")
    assert isinstance(first, SyncOps) and first is again
    assert [op.seq for op in other.ops] == [3]


def test_sync_requests_of_one_connection_behind_a_change_leave_one_entry_and_one_answer() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")  # reads nothing, asks again and again
    c.receive("alice", "alice", add("a1"))
    epoch = c.document.epoch
    for _ in range(149):
        assert c.receive("bob", "bob", resume_request(0, epoch)) == []
    # The latest request is what bob wants now: the whole document.
    assert c.receive("bob", "bob", REQUEST) == []
    # A resume after it doesn't undo it (the document covers a resume).
    assert c.receive("bob", "bob", resume_request(0, epoch)) == []
    assert c.pending_bytes == len(add("a1")) + len(REQUEST)
    batch = c.take_batch()
    assert batch is not None and len(batch.entries) == 2
    effects = c.committed(batch)
    [answer] = sends(effects, "bob")
    assert isinstance(answer, SyncState) and [item["uuid"] for item in answer.state["items"]] == ["a1"]
    assert c.pending_bytes == 0 and not c.has_pending


def test_a_sync_request_while_its_predecessor_is_in_a_batch_queues_one_more() -> None:
    c = core()
    join(c, "alice")
    join(c, "bob")
    c.receive("alice", "alice", add("a1"))
    c.receive("bob", "bob", REQUEST)
    batch = c.take_batch()  # bob's first request is in it
    assert batch is not None
    for _ in range(10):
        c.receive("bob", "bob", REQUEST)
    [first] = sends(c.committed(batch), "bob")
    second = c.take_batch()
    assert second is not None and len(second.entries) == 1
    [answer] = sends(c.committed(second), "bob")
    assert answer is first  # nothing changed in between: the same state
    assert c.take_batch() is None and c.pending_bytes == 0


def test_requests_of_different_connections_are_not_coalesced() -> None:
    c = core()
    for user in ("alice", "bob", "carol"):
        join(c, user)
    c.receive("alice", "alice", add("a1"))
    c.receive("bob", "bob", REQUEST)
    c.receive("carol", "carol", REQUEST)
    c.receive("bob", "bob", REQUEST)
    effects = commit_all(c)
    assert len(sends(effects, "bob")) == 1 and len(sends(effects, "carol")) == 1


def big_add(item_id: str, size: int) -> str:
    message = {
        "type": "command",
        "command": {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {"note": "n" * size}},
    }
    return frame(message)


def test_sync_ops_larger_than_max_message_size_fall_back_to_sync_state() -> None:
    c = core(max_message_size=4000)
    join(c, "alice")
    for i in range(10):
        c.receive("alice", "alice", big_add(f"a{i}", 500))
    commit_all(c)
    epoch = c.document.epoch
    # Ten ~600-byte relays are more than 4000 bytes: the whole state instead.
    answer = sends(join(c, "bob", resume=SyncRequest(since=0, epoch=epoch)), "bob")[1]
    assert isinstance(answer, SyncState) and answer.version == 10
    # The last three fit.
    [answer] = sends(c.receive("bob", "bob", resume_request(7, epoch)), "bob")
    assert isinstance(answer, SyncOps) and [op.seq for op in answer.ops] == [8, 9, 10]
    assert len(encode_message(answer).encode()) <= 4000


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=12),
    max_message_size=st.integers(200, 3000),
    user=st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=64),
    data=st.data(),
)
def test_a_sync_ops_answer_always_fits_in_max_message_size(
    sizes: list[int], max_message_size: int, user: str, data: st.DataObject
) -> None:
    user = user.replace("/", "_")
    c = core(max_message_size=max_message_size)
    join(c, user)
    for i, size in enumerate(sizes):
        c.receive(user, user, big_add(f"a{i}", size))
    commit_all(c)
    since = data.draw(st.integers(0, len(sizes)))
    [answer] = sends(c.receive(user, user, resume_request(since, c.document.epoch)), user)
    if isinstance(answer, SyncOps):
        assert [op.seq for op in answer.ops] == list(range(since + 1, len(sizes) + 1))
        assert len(encode_message(answer).encode()) <= max_message_size
    else:
        assert isinstance(answer, SyncState) and since < len(sizes)


def test_ops_loaded_from_the_store_count_their_size_for_the_fallback() -> None:
    # A restart: the ops come back from the journal without the size of the
    # message they came in; the document gives them one.
    document = SessionDocument()
    for seq in range(1, 11):
        command = json.loads(big_add(f"a{seq}", 500))["command"]
        document.apply(Op(seq, "alice", COMMAND, NOW, command=command))
    assert all(op.size > 500 for op in document.history)
    c = core(document=document, max_message_size=4000)
    answer = sends(join(c, "bob", resume=SyncRequest(since=0, epoch=document.epoch)), "bob")[1]
    assert isinstance(answer, SyncState)


def test_pending_bytes_are_utf8_bytes() -> None:
    c = core()
    join(c, "alice")
    command = {"action": "add_item", "item_type": "lens", "item_id": "λ" * 10, "data": {}}
    text = json.dumps({"type": "command", "command": command}, ensure_ascii=False)
    c.receive("alice", "alice", text)
    assert c.pending_bytes == len(text.encode("utf-8")) > len(text)


def test_a_batch_holds_at_most_max_batch_bytes_but_always_one_change() -> None:
    c = core(max_batch_bytes=1000)
    join(c, "alice", "a")

    def padded(item_id: str, pad: int) -> str:
        command = {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {"pad": "p" * pad}}
        return frame({"type": "command", "command": command})

    big = padded("x", 2000)
    small = [padded(f"s{n}", 300) for n in range(5)]
    for text in [big, *small]:
        c.receive("a", "alice", text)
    sizes = []
    while (batch := c.take_batch()) is not None:
        sizes.append(len(batch.entries))
        assert len(batch.entries) == 1 or batch.size <= 1000
        c.committed(batch)
    assert sizes == [1, 2, 2, 1]


def test_loaded_at_not_leaked_for_a_conn_that_left_with_a_queued_sync() -> None:
    c = core()
    c.join("a", "alice", connected_at=NOW)
    c.join("b", "bob", connected_at=NOW)
    c.receive("a", "alice", add("L1"))          # pending change
    c.receive("b", "bob", json.dumps({"type": "sync:request"}))  # queued behind it
    c.leave("b", "bob", "disconnected")
    while (batch := c.take_batch()) is not None:
        c.committed(batch)
    assert "b" not in c._loaded_at, c._loaded_at


def test_loaded_at_not_leaked_for_a_replaced_conn() -> None:
    c = core()
    c.join("a", "alice", connected_at=NOW)
    c.join("b1", "bob", connected_at=NOW)
    c.receive("a", "alice", add("L1"))
    c.receive("b1", "bob", json.dumps({"type": "sync:request"}))
    c.join("b2", "bob", connected_at=NOW)  # replaces b1
    while (batch := c.take_batch()) is not None:
        c.committed(batch)
    assert "b1" not in c._loaded_at, c._loaded_at
