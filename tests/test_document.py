"""The session document: the four actions, replacement and the Optiverse state."""

from __future__ import annotations

from typing import Any

import pytest

from collab_trio.document import COMMAND, REPLACE, Op, SessionDocument
from collab_trio.protocol import Command, parse_client_message


class Doc(SessionDocument):
    """A document whose apply() takes a command, as the session does after a commit."""

    def apply(self, op: Op | Command) -> int:  # type: ignore[override]
        if isinstance(op, Command):
            op = Op(self.version + 1, "alice", COMMAND, "t", command=op.command, op_id=op.op_id)
        super().apply(op)
        return self.version

    def replace(self, items: list[dict[str, Any]]) -> int:
        return self.apply(Op(self.version + 1, "alice", REPLACE, "t", items=items))


def command(action: str, item_id: str | None = "a", item_type: str | None = "lens", **data: Any) -> Command:
    body: dict[str, Any] = {"action": action}
    if item_id is not None:
        body["item_id"] = item_id
    if item_type is not None:
        body["item_type"] = item_type
    if action != "remove_item":
        body["data"] = data
    parsed = parse_client_message({"type": "command", "command": body})
    assert isinstance(parsed, Command)
    return parsed


def test_new_document_has_null_state() -> None:
    doc = Doc()
    assert doc.version == 0
    assert doc.state("t") is None


def test_add_move_update_remove() -> None:
    doc = Doc()
    assert doc.apply(command("add_item", x_mm=1.0, y_mm=2.0, angle_deg=0, focal_length_mm=100)) == 1
    assert doc.state("t") == {
        "items": [
            {"x_mm": 1.0, "y_mm": 2.0, "angle_deg": 0, "focal_length_mm": 100, "uuid": "a", "item_type": "lens"}
        ],
        "version": 1,
        "timestamp": "t",
    }
    # move merges only the position fields
    assert doc.apply(command("move_item", x_mm=5.0, y_mm=6.0, angle_deg=90, focal_length_mm=1)) == 2
    assert doc.items["a"]["x_mm"] == 5.0 and doc.items["a"]["angle_deg"] == 90
    assert doc.items["a"]["focal_length_mm"] == 100
    # update replaces the data but keeps uuid and item_type
    assert doc.apply(command("update_item", item_type="mirror", x_mm=7.0, note="n")) == 3
    assert doc.items["a"] == {"x_mm": 7.0, "note": "n", "uuid": "a", "item_type": "lens"}
    assert doc.apply(command("remove_item")) == 4
    assert doc.state("t") == {"items": [], "version": 4, "timestamp": "t"}


def test_items_keep_insertion_order() -> None:
    doc = Doc()
    for item_id in ("c", "a", "b"):
        doc.apply(command("add_item", item_id=item_id))
    doc.apply(command("update_item", item_id="a", v=1))
    assert [item["uuid"] for item in doc.state("t")["items"]] == ["c", "a", "b"]


def test_unknown_action_gets_a_seq_but_changes_nothing() -> None:
    doc = Doc()
    assert doc.apply(command("rotate_all", item_id=None, item_type=None)) == 1
    assert doc.version == 1
    assert doc.state("t") is None


def test_move_or_remove_of_unknown_item_is_harmless() -> None:
    doc = Doc()
    assert doc.apply(command("move_item", item_id="ghost", x_mm=1.0)) == 1
    assert doc.apply(command("remove_item", item_id="ghost")) == 2
    assert doc.items == {}


def test_update_of_unknown_item_adds_it() -> None:
    doc = Doc()
    doc.apply(command("update_item", item_id="h", item_type="source", x_mm=3.0))
    assert doc.items["h"] == {"x_mm": 3.0, "uuid": "h", "item_type": "source"}


def test_stored_item_is_a_copy_of_the_command_data() -> None:
    doc = Doc()
    cmd = command("add_item", x_mm=1.0)
    doc.apply(cmd)
    assert "uuid" not in cmd.command["data"], "the relayed command must stay unchanged"


def test_replace() -> None:
    doc = Doc()
    doc.apply(command("add_item"))
    seq = doc.replace([{"uuid": "x", "item_type": "lens"}, {"item_uuid": "y", "item_type": "mirror"}])
    assert seq == 2
    assert [item["uuid"] for item in doc.state("t")["items"]] == ["x", "y"]


def test_epochs_differ() -> None:
    assert Doc().epoch != Doc().epoch


def test_ops_must_follow_the_version() -> None:
    doc = Doc()
    with pytest.raises(ValueError, match="does not follow"):
        SessionDocument.apply(doc, Op(2, "alice", COMMAND, "t", command={"action": "x"}))


def test_ops_since_and_retention() -> None:
    doc = Doc(retention=3)
    for i in range(5):
        doc.apply(command("add_item", item_id=f"i{i}"))
    assert doc.ops_since(5) == []
    assert [op.seq for op in doc.ops_since(2)] == [3, 4, 5]
    assert doc.ops_since(1) is None  # seq 2 is no longer retained
    assert doc.ops_since(6) is None  # from the future: the client must resync
    doc.replace([])
    assert doc.ops_since(5) is None  # a replacement can't be sent as commands
    assert doc.ops_since(6) == []


def test_op_ids_are_remembered_per_user_within_retention() -> None:
    doc = Doc(retention=2)
    doc.apply(Op(1, "alice", COMMAND, "t", command={"action": "x"}, op_id="o1"))
    doc.apply(Op(2, "bob", COMMAND, "t", command={"action": "x"}, op_id=1))
    assert doc.seq_of("alice", "o1") == 1
    assert doc.seq_of("bob", 1) == 2
    assert doc.seq_of("bob", "1") is None  # 1 and "1" are different ids
    assert doc.seq_of("bob", "o1") is None
    doc.apply(Op(3, "alice", COMMAND, "t", command={"action": "x"}))
    assert doc.seq_of("alice", "o1") is None  # fell out of the retention window


def test_snapshot_round_trip() -> None:
    doc = Doc()
    doc.apply(command("add_item", item_id="a", x_mm=1.0))
    copy = SessionDocument.from_snapshot(doc.snapshot())
    assert (copy.epoch, copy.version, copy.written, copy.items) == (doc.epoch, 1, True, doc.items)


def test_op_record_round_trip() -> None:
    op = Op(7, "ada", COMMAND, "t", command={"action": "add_item", "item_id": "a"}, op_id="x")
    assert Op.from_record(op.to_record()) == op
    assert op.relayed() == {
        "type": "command", "command": op.command, "user_id": "ada", "timestamp": "t", "seq": 7, "op_id": "x",
    }


def test_snapshot_does_not_change_with_later_ops() -> None:
    doc = Doc()
    doc.apply(command("add_item", item_id="a", x_mm=1.0))
    snapshot = doc.snapshot()
    doc.apply(command("move_item", item_id="a", x_mm=9.0))
    doc.apply(command("add_item", item_id="b"))
    assert snapshot["items"] == [{"x_mm": 1.0, "uuid": "a", "item_type": "lens"}]
    assert snapshot["version"] == 1
