"""The session document: the four actions, replacement, the Optiverse state, and its
size and history bounds."""

from __future__ import annotations

import json
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collab_trio.document import COMMAND, REPLACE, Op, SessionDocument, encode_command, item_size, make_item, message_size
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


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add_item", "move_item", "update_item", "remove_item"]),
            st.sampled_from(["a", "b", "c"]),
            st.integers(-5, 5),
        ),
        max_size=40,
    ),
    st.integers(0, 40),
)
def test_no_op_changes_an_item_in_place(ops: list[tuple[str, str, int]], taken_at: int) -> None:
    """A snapshot holds the document's own items, not copies: it stays that
    of its version however the document moves on, because every op puts a
    new item and none changes one in place."""
    doc = Doc()
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (item, its content when first seen)
    snapshot, expected = doc.snapshot(), []
    for i, (action, item_id, value) in enumerate(ops):
        if i == taken_at:
            snapshot, expected = doc.snapshot(), json.loads(json.dumps(list(doc.items.values())))
        fields = {} if action == "remove_item" else {"x_mm": value, "note": "n" * abs(value)}
        doc.apply(command(action, item_id=item_id, **fields))
        seen += [(item, dict(item)) for item in doc.items.values()]
    if taken_at >= len(ops):
        snapshot, expected = doc.snapshot(), json.loads(json.dumps(list(doc.items.values())))
    assert snapshot["items"] == expected
    assert all(item == content for item, content in seen)


# -- sizes -----------------------------------------------------------------------------


def items_json_size(doc: SessionDocument) -> int:
    """The document's size the slow way: encode every item again."""
    return len(orjson.dumps(list(doc.items.values())))


def test_size_follows_each_action_without_encoding_the_document() -> None:
    doc = Doc()
    assert doc.size == items_json_size(doc) == 2
    doc.apply(command("add_item", x_mm=1.0, focal_length_mm=100))
    doc.apply(command("add_item", item_id="b", note="ünïcödé"))
    assert doc.size == items_json_size(doc)
    doc.apply(command("move_item", x_mm=12345.678, y_mm=-1, angle_deg=90))  # two new fields
    assert doc.size == items_json_size(doc)
    doc.apply(command("update_item", item_id="b", item_type=None, note="n" * 100))
    assert doc.size == items_json_size(doc)
    assert doc.item_size("b") == len(orjson.dumps(doc.items["b"]))
    doc.apply(command("remove_item"))
    assert doc.size == items_json_size(doc) and doc.item_size("a") is None
    doc.replace([{"uuid": "x", "v": [1, 2, 3]}, {"item_uuid": "y"}])
    assert doc.size == items_json_size(doc)


def test_a_loaded_document_knows_its_size() -> None:
    doc = Doc()
    for i in range(5):
        doc.apply(command("add_item", item_id=f"i{i}", note="x" * i))
    copy = SessionDocument.from_snapshot(doc.snapshot())
    assert copy.size == doc.size == items_json_size(copy)
    # Assigning a whole new dict of items computes the sizes again.
    copy.items = {"z": {"uuid": "z"}}
    assert copy.size == items_json_size(copy)


def test_integers_beyond_64_bits_are_sized_too() -> None:
    doc = Doc()
    doc.apply(command("add_item", x_mm=10**30))
    doc.apply(command("move_item", x_mm=-(10**40)))
    assert doc.size == len(json.dumps(list(doc.items.values()), separators=(",", ":")))


# JSON values as a client may send them (floats finite, ints within 64 bits:
# see test_integers_beyond_64_bits_are_sized_too for the others).
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
DATA = st.dictionaries(st.sampled_from(["x_mm", "y_mm", "angle_deg", "note", "uuid", "item_type", "ø"]), JSON_VALUES, max_size=5)
NUMBERS = st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
MOVES = st.fixed_dictionaries({}, optional={f: NUMBERS for f in ("x_mm", "y_mm", "angle_deg")})
ITEM_IDS = st.sampled_from(["a", "b", "c", "λ"])
CHANGES = st.one_of(
    st.tuples(st.just("add_item"), ITEM_IDS, DATA),
    st.tuples(st.just("update_item"), ITEM_IDS, DATA),
    st.tuples(st.just("move_item"), ITEM_IDS, MOVES),
    st.tuples(st.just("remove_item"), ITEM_IDS, st.just({})),
    st.tuples(st.just("replace"), st.just(""), st.lists(DATA, max_size=3)),
)


def count_floats(value: Any) -> int:
    if isinstance(value, float):
        return 1
    if isinstance(value, dict):
        return sum(count_floats(v) for v in value.values())
    if isinstance(value, list):
        return sum(count_floats(v) for v in value)
    return 0


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(CHANGES, max_size=25), st.booleans(), st.booleans())
def test_size_tracking_agrees_with_the_encoded_document(
    changes: list[Any], ascii_only: bool, store_encoded: bool
) -> None:
    """`store_encoded`: each op is applied with its command's encoding, as
    the session does (the item's size is then told from those bytes)."""
    doc = Doc()
    for action, item_id, data in changes:
        before = doc.size
        if action == "replace":
            # As the protocol lets them through: each with a string uuid or item_uuid.
            items = [{k: v for k, v in d.items() if k != "uuid"} for d in data]
            items = [dict(d, uuid=f"r{i}") if i % 2 else dict(d, item_uuid=f"r{i}") for i, d in enumerate(items)]
            bound = SessionDocument.replacement_size(items)
            doc.replace(items)
            assert doc.size <= bound
        else:
            body: dict[str, Any] = {"action": action, "item_id": item_id, "item_type": "lens", "data": data}
            message = json.dumps({"type": "command", "command": body}, ensure_ascii=ascii_only)
            estimate = doc.estimate_growth(body, len(message.encode("utf-8")))
            op = Op(doc.version + 1, "alice", COMMAND, "t", command=body)
            SessionDocument.apply(doc, op, encode_command(body) if store_encoded else None)
            growth = doc.size - before
            if action in ("move_item", "remove_item"):
                assert growth == estimate  # exact
            else:
                # An upper bound, but for floats that encode longer than
                # Python spells them (at most 15 bytes each: 1e-05 is 0.00001).
                assert growth <= estimate + 15 * count_floats(data)
        assert doc.size == items_json_size(doc)


# -- history bounds ----------------------------------------------------------------------


def sized(seq: int, size: int, op_id: Any = None) -> Op:
    return Op(seq, "alice", COMMAND, "t", command={"action": "x"}, op_id=op_id, size=size)


def test_history_is_bounded_in_bytes_and_the_op_ids_go_with_it() -> None:
    doc = Doc(history_bytes=1000)
    for seq in range(1, 11):
        SessionDocument.apply(doc, sized(seq, 300, op_id=f"o{seq}"))
        assert doc.history_size <= 1000
    assert [op.seq for op in doc.history] == [8, 9, 10]
    assert doc.history_size == 900
    assert doc.seq_of("alice", "o7") is None and doc.seq_of("alice", "o8") == 8
    assert [op.seq for op in doc.ops_since(7)] == [8, 9, 10]
    assert doc.ops_since(6) is None  # the client must take the whole state


def test_the_newest_op_stays_however_large() -> None:
    doc = Doc(history_bytes=100)
    SessionDocument.apply(doc, sized(1, 50))
    SessionDocument.apply(doc, sized(2, 5000, op_id="big"))
    assert [op.seq for op in doc.history] == [2] and doc.seq_of("alice", "big") == 2
    assert doc.ops_since(1) is not None


def test_limit_history_trims_a_loaded_history() -> None:
    doc = Doc()
    for seq in range(1, 6):
        SessionDocument.apply(doc, sized(seq, 100))
    doc.limit_history(max_bytes=250)
    assert [op.seq for op in doc.history] == [4, 5] and doc.history_size == 200


def test_ops_loaded_without_a_size_get_one_when_remembered() -> None:
    # The journal doesn't keep the size of the message an op came in.
    command_ = {"action": "add_item", "item_type": "lens", "item_id": "a", "data": {"note": "n" * 500}}
    loaded = Op.from_record(Op(1, "alice", COMMAND, "t", command=command_, op_id="o1").to_record())
    assert loaded.size == 0
    doc = Doc(history_bytes=1000)
    doc.remember(loaded)
    [kept] = doc.history
    message = {"type": "command", "command": command_, "op_id": "o1"}
    assert kept == loaded and kept.size == message_size(loaded)
    assert abs(kept.size - len(orjson.dumps(message))) <= 4
    doc.remember(sized(2, 600))
    assert [op.seq for op in doc.history] == [2]  # the two together exceed 1000 bytes


ITEM_TYPES = st.none() | st.sampled_from(["lens", "mirror", "λ"]) | st.integers(0, 3)


@settings(max_examples=400, deadline=None)
@given(
    ITEM_IDS,
    ITEM_TYPES,
    st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=5) | DATA,
    st.dictionaries(st.sampled_from(["action", "item_id", "note", "zz"]), JSON_VALUES, max_size=3),
    st.booleans(),
)
def test_an_items_size_told_from_the_encoded_command_is_its_encoded_size(
    item_id: str, item_type: Any, data: dict[str, Any], extra: dict[str, Any], data_first: bool
) -> None:
    command = {"data": data, **extra} if data_first else {**extra, "data": data}
    command["item_type"] = item_type
    item = make_item(item_id, item_type, data)
    assert item_size(item, command, orjson.dumps(command)) == len(orjson.dumps(item))
    assert item_size(item, command, None) == len(orjson.dumps(item))


def test_an_op_keeps_no_encoding_and_one_orjson_cannot_write_is_measured_whole() -> None:
    """encode_command() is the session's, handed to the document and the
    relay: the op itself keeps nothing (ops stay in the history)."""
    doc = Doc()
    op = Op(1, "alice", COMMAND, "t", command={"action": "add_item", "item_id": "a", "data": {"x_mm": 1}})
    encoded = encode_command(op.command)
    assert encoded == orjson.dumps(op.command)
    SessionDocument.apply(doc, op, encoded)
    assert doc.size == items_json_size(doc)
    # Not encoded by orjson (an integer beyond 64 bits): everyone encodes their own.
    huge = Op(2, "alice", COMMAND, "t", command={"action": "add_item", "item_id": "c", "data": {"n": 2**70}})
    assert encode_command(huge.command) is None and encode_command(None) is None
    SessionDocument.apply(doc, huge, None)
    assert doc.size == len(json.dumps(list(doc.items.values()), separators=(",", ":")))


def test_an_update_keeping_an_item_type_beyond_64_bits_is_measured_as_the_whole_item() -> None:
    """An update keeps the item's own item_type; when that is an integer
    beyond 64 bits the item is measured whole by the stdlib encoder (whose
    floats are spelled differently from orjson's), also when the store
    encoded the command with orjson (the data's share of those bytes is
    orjson's spelling, so it can't be added to the stdlib's tail)."""
    doc = Doc()
    doc.apply(Op(1, "alice", COMMAND, "t", command={"action": "add_item", "item_id": "a", "item_type": 2**70, "data": {}}))
    update = Op(
        2,
        "alice",
        COMMAND,
        "t",
        command={"action": "update_item", "item_id": "a", "item_type": "lens", "data": {"f": 1e-05}},
    )
    encoded = encode_command(update.command)
    assert encoded is not None  # orjson wrote the command
    SessionDocument.apply(doc, update, encoded)
    item = doc.items["a"]
    assert item["item_type"] == 2**70
    stdlib = len(json.dumps([item], separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    assert doc.size == stdlib
    # What a reload of the same items measures.
    assert SessionDocument.from_snapshot(doc.snapshot()).size == doc.size
    command = update.command or {}
    assert item_size(item, command, orjson.dumps(command)) == len(json.dumps(item, separators=(",", ":")))


@settings(max_examples=300)
@given(
    data=DATA,
    # Beyond 64 bits too: orjson can't write those, the stdlib writes the record then.
    op_id=st.none() | st.integers(-(2**70), 2**70) | st.text(max_size=10),
    user=st.text(st.characters(codec="utf-8"), min_size=1, max_size=10),
)
def test_an_ops_record_with_its_command_encoded_already_is_the_same_text(data: dict, op_id: Any, user: str) -> None:
    """op_record_text() puts a large command's encoding (Op.command_json)
    in place: the text is exactly the one encoding the record whole gives,
    and it reads back as the same op."""
    from collab_trio.store.database import _op_from_json, op_record_text

    command = {"action": "add_item", "item_type": "lens", "item_id": "a", "data": data}
    plain = Op(7, user, COMMAND, "2026-12-07T10:00:00.000+00:00", command=command, op_id=op_id)
    encoded = attrs.evolve(plain, command_json=encode_command(command))
    assert encoded.command_json is not None
    assert op_record_text(encoded) == op_record_text(plain)
    assert _op_from_json(op_record_text(encoded)) == plain


def test_the_history_keeps_an_op_without_its_commands_encoding() -> None:
    """A large command's encoding serves its record and relay; the history
    (bounded by the messages' bytes) does not keep it as well."""
    document = SessionDocument()
    command = {"action": "add_item", "item_type": "lens", "item_id": "a", "data": {"x_mm": 1}}
    op = Op(1, "u", COMMAND, "t", command=command, size=100, command_json=encode_command(command))
    document.apply(op, op.command_json)
    assert document.items["a"]["x_mm"] == 1
    assert document.history[-1].command_json is None and document.history[-1] == op


def test_a_record_the_stdlib_writes_is_the_same_text_with_its_command_encoded_already() -> None:
    """An op_id beyond 64 bits makes the stdlib write the record, whose
    floats differ from orjson's (1e-07 against 1e-7): the spliced command
    must not be used then (found by review)."""
    from collab_trio.store.database import op_record_text

    command = {"action": "add_item", "item_type": "lens", "item_id": "a", "data": {"x_mm": 1e-07}}
    plain = Op(7, "u", COMMAND, "2026-12-07T10:00:00.000+00:00", command=command, op_id=2**64)
    encoded = attrs.evolve(plain, command_json=encode_command(command))
    assert op_record_text(encoded) == op_record_text(plain)
