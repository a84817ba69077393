"""The per-field merge compares values as JSON values: a boolean is not a
number, [1] is not [1.0], and an object is the same whatever the order of
its keys."""

from __future__ import annotations

import orjson

from collab_trio.convergence import FieldHistory, merge_update


def test_list_of_true_replaces_list_of_one() -> None:
    history = FieldHistory()
    current = {"uuid": "A", "item_type": "lens", "flags": [1]}
    merged, changed, stale = merge_update(current, {"flags": [True]}, history, "A", "u1", 0.0)
    assert orjson.dumps(merged["flags"]) == b"[true]", (merged, changed, stale)


def test_float_in_list_replaces_int() -> None:
    history = FieldHistory()
    current = {"uuid": "A", "item_type": "lens", "v": [1]}
    merged, changed, stale = merge_update(current, {"v": [1.5 - 0.5]}, history, "A", "u1", 0.0)
    assert orjson.dumps(merged["v"]) == b"[1.0]", (merged, changed, stale)


def test_true_not_stale_because_other_set_one() -> None:
    history = FieldHistory()
    # u2 changed v from 1 to 2 just now; u1 sets v to true (an edit, not what it saw)
    history.record("A", {"v": 1}, {"v": 2}, "u2", 10.0)
    current = {"uuid": "A", "item_type": "lens", "v": 2}
    merged, changed, stale = merge_update(current, {"v": True}, history, "A", "u1", 10.5)
    assert merged["v"] is True, (merged, changed, stale)


def test_a_stale_object_value_with_its_keys_in_another_order_is_still_stale() -> None:
    # bob changed the lens's optics from V to W just now; alice's update
    # carries V as she last saw it, serialized with its keys in another order
    # (JSON objects are unordered): not her edit, W stays.
    history = FieldHistory()
    v = [{"element_type": "lens", "efl_mm": 100.0}]
    w = [{"element_type": "lens", "efl_mm": 50.0}]
    history.record("A", {"interfaces": v}, {"interfaces": w}, "bob", 10.0)
    current = {"uuid": "A", "item_type": "lens", "interfaces": w}
    same_as_v = [{"efl_mm": 100.0, "element_type": "lens"}]
    merged, changed, stale = merge_update(current, {"interfaces": same_as_v}, history, "A", "alice", 10.5)
    assert merged["interfaces"] == w, (merged, changed, stale)
