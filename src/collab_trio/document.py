"""The server-authoritative session document and its recent history. Pure: no trio, no I/O.

Every change is an `Op` with a `seq`. Ops are what the journal stores and
what a restart replays, so applying one must depend on nothing but the
document and the op itself.

Sizes. The document knows its size in bytes of compact UTF-8 JSON (as
orjson spells it) without encoding itself again: each item's size is
computed once when the item is written (an add, an update, a replacement,
a load) and a move adjusts it by the sizes of the fields it changes, so an
op costs time in proportion to the op, never to the document. `size` is the
exact length of the JSON list of the items (an item holding an integer
beyond 64 bits, which orjson can't encode, is measured with the stdlib
encoder, whose floats may be a byte or two longer). Before a change is
applied, `estimate_growth()` bounds what it will add from the message that
carries it (see there).
"""

from __future__ import annotations

import json
import secrets
from collections import deque
from typing import Any

import attrs
import orjson

from .protocol import KNOWN_ACTIONS, MOVE_FIELDS

# Ops kept for resume (sync:ops) and op_id de-duplication, per session, and
# the most bytes they may hold together (the newest op is always kept).
DEFAULT_RETENTION = 1000
DEFAULT_HISTORY_BYTES = 8 * 1024 * 1024
# What the message carrying an op costs beyond its command (or items):
# `{"type":"command","command":` and the closing brace. Used for ops loaded
# from the store, which don't know the size of the message they came in.
MESSAGE_ENVELOPE = 32

COMMAND = "command"
REPLACE = "replace"


def new_epoch() -> str:
    """A fresh epoch id; it changes only when a session's history is discarded."""
    return secrets.token_hex(8)


def op_id_key(op_id: str | int) -> tuple[str, str | int]:
    """A hashable key that keeps 1 and "1" apart (op ids are strings or integers)."""
    return (type(op_id).__name__, op_id)


_fallback_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encoded_size(value: Any) -> int:
    """Bytes of `value` as compact UTF-8 JSON."""
    try:
        return len(orjson.dumps(value))
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits
        return len(_fallback_encoder.encode(value).encode("utf-8", "surrogatepass"))


def message_size(op: Op) -> int:
    """About the bytes of the message that carried `op`, rebuilt from the op
    (for ops loaded from the store, whose `size` is 0)."""
    size = MESSAGE_ENVELOPE + encoded_size(op.command if op.kind == COMMAND else op.items)
    if op.op_id is not None:
        size += len(',"op_id":') + encoded_size(op.op_id)
    return size


@attrs.define(unsafe_hash=True)  # a value: never changed (see "Per-change objects", ARCHITECTURE.md)
class Op:
    """One applied change: a command, or a replacement of every item."""

    seq: int
    user_id: str
    kind: str  # COMMAND or REPLACE
    timestamp: str
    command: dict[str, Any] | None = None  # kind == COMMAND: the sender's command object
    items: list[dict[str, Any]] | None = None  # kind == REPLACE
    op_id: Any = None
    # Bytes of the message that carried this change (what a queue holding it
    # costs); not part of the record: 0 for an op loaded from the store until
    # a document remembers it (see message_size()).
    size: int = attrs.field(default=0, eq=False)
    # The command as compact JSON, made once for a large one (encode_command;
    # session_core.ENCODE_ONCE_FROM) and used by its stored record, the
    # document and the relay; None otherwise. Not part of the record.
    command_json: bytes | None = attrs.field(default=None, eq=False, repr=False)

    def relayed(self) -> dict[str, Any]:
        """The `command` message other members receive for this op."""
        message: dict[str, Any] = {
            "type": "command",
            "command": self.command,
            "user_id": self.user_id,
            "timestamp": self.timestamp,
            "seq": self.seq,
        }
        if self.op_id is not None:
            message["op_id"] = self.op_id
        return message

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready form for the journal (shares, doesn't copy, the payloads)."""
        return {
            "seq": self.seq,
            "user_id": self.user_id,
            "kind": self.kind,
            "timestamp": self.timestamp,
            "command": self.command,
            "items": self.items,
            "op_id": self.op_id,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Op:
        """Inverse of to_record()."""
        return cls(**record)


@attrs.define(eq=False)
class SessionDocument:
    """Items of one session, in insertion order, and the version that counts edits.

    `version` is the `seq` of the last applied op. `written` stays False
    until some change touched the items, so that a never-written session
    answers `state: null` and Optiverse keeps the host's canvas. `history`
    holds the last ops for resume and op_id de-duplication: at most
    `retention` of them, and while they hold more than `history_bytes`
    (their messages' sizes) the oldest go, the newest one always staying.

    Change `items` only through apply(), or by assigning a whole new dict
    (which computes the item sizes again): `size` follows those.
    """

    epoch: str = attrs.field(factory=new_epoch)
    version: int = 0
    written: bool = False
    # `items` (a property: assigning it computes the sizes once). Not an
    # on_setattr hook: that would make every attribute assignment of the
    # class go through a Python-level __setattr__, several per change.
    _items: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    retention: int = DEFAULT_RETENTION
    history_bytes: int = DEFAULT_HISTORY_BYTES
    history: deque[Op] = attrs.field(init=False)
    # Sum of the sizes of the ops in `history`.
    history_size: int = attrs.field(default=0, init=False)
    _op_seqs: dict[tuple[str, tuple[str, str | int]], int] = attrs.field(factory=dict, init=False)
    # Items removed by an op still in `history`, with that op's seq: a later
    # move or update of one is refused (deletes win; see is_removed()).
    tombstones: dict[str, int] = attrs.field(factory=dict, init=False)
    # Encoded bytes of each item, and their sum.
    _item_sizes: dict[str, int] = attrs.field(factory=dict, init=False)
    _items_bytes: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.history = deque()
        self.items = self._items

    @property
    def items(self) -> dict[str, dict[str, Any]]:
        """The items by uuid, in insertion order."""
        return self._items

    @items.setter
    def items(self, items: dict[str, dict[str, Any]]) -> None:
        # Whoever sets `items` (a load, a replacement) gets the sizes computed once.
        self._items = items
        self._item_sizes = {uuid: encoded_size(item) for uuid, item in items.items()}
        self._items_bytes = sum(self._item_sizes.values())

    @property
    def size(self) -> int:
        """Bytes of the items as a compact JSON list (`[item,item,...]`)."""
        return 2 + self._items_bytes + max(len(self.items) - 1, 0)

    def item_size(self, item_id: str) -> int | None:
        """Bytes of one item as compact JSON, or None if there is no such item."""
        if item_id not in self.items:
            return None
        return self._item_sizes.get(item_id, 0)

    def estimate_growth(self, command: dict[str, Any], message_bytes: int) -> int:
        """How many bytes applying `command` now would add to `size`, at most
        (negative: it shrinks the document), judged from the message of
        `message_bytes` bytes (UTF-8) that carries it.

        add_item / update_item: the new item is at most as long as the
        message (plus, for an update, the item_type the item keeps): the
        message holds its data and its id, and the server's JSON is never
        longer than a client's for strings, integers and whitespace. Only
        floats a client spells in exponent form can encode longer
        (`1e5` becomes `100000.0`), at most 15 bytes each, which the
        message's own envelope (over 40 bytes) mostly absorbs. move_item:
        exact. remove_item: exact (negative). Anything else: 0.
        """
        action = command.get("action")
        item_id = command.get("item_id")
        if action not in KNOWN_ACTIONS or not isinstance(item_id, str):
            return 0
        existing = self.items.get(item_id)
        if existing is None:
            if action in ("remove_item", "move_item"):
                return 0
            return message_bytes + (1 if self.items else 0)  # and a comma before it
        old = self._item_sizes.get(item_id, 0)
        if action == "remove_item":
            return -old - (1 if len(self.items) > 1 else 0)
        data = command.get("data")
        data = data if isinstance(data, dict) else {}
        if action == "move_item":
            return _move_growth(existing, data)
        new = message_bytes
        if action == "update_item" and existing.get("item_type") is not None:
            new += encoded_size(existing["item_type"])
        return new - old

    def merge_growth(self, item_id: str, data: dict[str, Any]) -> int:
        """At most how many bytes merging `data` into item `item_id` adds
        (convergence.merge_update: each field of `data` replaces the item's,
        or stays as it was, or is added): the sum of what each field may
        add, never below 0. Encodes every value: for an update the message
        bound (estimate_growth) would refuse."""
        existing = self.items.get(item_id)
        if existing is None:
            return 0
        growth = 0
        for key, value in data.items():
            new = encoded_size(value)
            if key in existing:
                growth += max(0, new - encoded_size(existing[key]))
            else:
                growth += encoded_size(key) + 2 + new  # "key":value and a comma
        return growth

    @staticmethod
    def replacement_size(items: list[dict[str, Any]]) -> int:
        """At most the `size` of a document replaced by these items: their
        JSON, plus the `uuid` given to those that only have `item_uuid`."""
        size = encoded_size(items)
        for item in items:
            if "uuid" not in item:
                size += len(',"uuid":') + encoded_size(item.get("item_uuid"))
        return size

    def limit_history(self, *, max_bytes: int) -> None:
        """Bound the history by bytes (the session's setting) and trim it now."""
        self.history_bytes = max_bytes
        self._trim_history()

    def apply(self, op: Op, command_json: bytes | None = None) -> None:
        """Apply the next op; its seq must be version + 1. `command_json`:
        encode_command() of its command, if the caller has it (the item's
        size is then told from it instead of encoding the item)."""
        if op.seq != self.version + 1:
            raise ValueError(f"op {op.seq} does not follow version {self.version}")
        if op.kind == REPLACE:
            self._replace(op.items or [])
        elif op.kind == COMMAND:
            self._apply_command(op.command or {}, command_json)
        else:
            raise ValueError(f"unknown op kind {op.kind!r}")
        self.version = op.seq
        self.remember(op)

    def is_removed(self, item_id: str) -> bool:
        """True if a retained op removed this item and nothing brought it back."""
        return item_id in self.tombstones and item_id not in self._items

    def seq_of(self, user_id: str, op_id: Any) -> int | None:
        """The seq an earlier op with this op_id from this user got, if still retained."""
        return self._op_seqs.get((user_id, op_id_key(op_id)))

    def ops_since(self, since: int) -> list[Op] | None:
        """Ops after `since`, or None when they are not all retained commands."""
        if since > self.version:
            return None
        if since == self.version:
            return []
        if not self.history or self.history[0].seq > since + 1:
            return None
        ops = [op for op in self.history if op.seq > since]
        if any(op.kind != COMMAND for op in ops):
            return None  # a replacement can't be replayed as commands
        return ops

    def state(self, timestamp: str) -> dict[str, Any] | None:
        """The Optiverse `state` object, or None for a never-written session."""
        if not self.written:
            return None
        return {"items": list(self.items.values()), "version": self.version, "timestamp": timestamp}

    def snapshot(self) -> dict[str, Any]:
        """What a store needs to rebuild this document without the ops.

        The items are the document's own: no op changes an item in place
        (each puts a new one), so the snapshot stays that of this version
        while the document moves on, and a writer thread or a task may
        encode it later. No copy: at 3,600 items one took ~1.5 ms of the
        event loop, and the young copies lengthened the next collections.
        """
        return {
            "epoch": self.epoch,
            "version": self.version,
            "written": self.written,
            "items": list(self.items.values()),
        }

    @classmethod
    def from_snapshot(
        cls,
        snapshot: dict[str, Any],
        *,
        retention: int = DEFAULT_RETENTION,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
    ) -> SessionDocument:
        """Inverse of snapshot(); each item's size is computed here, once."""
        return cls(
            epoch=snapshot["epoch"],
            version=snapshot["version"],
            written=snapshot["written"],
            items={item["uuid"]: item for item in snapshot["items"]},
            retention=retention,
            history_bytes=history_bytes,
        )

    # -- internals -----------------------------------------------------------

    def remember(self, op: Op) -> None:
        """Keep an op for resume and de-duplication (apply() does this itself).

        An op without a size (loaded from the store) is kept with the size
        of the message it would have come in, so the history's bounds hold
        after a restart as well.
        """
        if op.size <= 0:
            op = attrs.evolve(op, size=message_size(op))
        if op.command_json is not None:
            op = attrs.evolve(op, command_json=None)  # the history's bounds count the message only
        self.history.append(op)
        self.history_size += op.size
        if op.op_id is not None:
            self._op_seqs[(op.user_id, op_id_key(op.op_id))] = op.seq
        if op.kind == COMMAND and op.command is not None:
            action, item_id = op.command.get("action"), op.command.get("item_id")
            if isinstance(item_id, str):
                if action == "remove_item":
                    self.tombstones[item_id] = op.seq
                elif action == "add_item":
                    self.tombstones.pop(item_id, None)
        self._trim_history()

    def _trim_history(self) -> None:
        history = self.history
        while len(history) > self.retention or (len(history) > 1 and self.history_size > self.history_bytes):
            old = history.popleft()
            self.history_size -= old.size
            if old.op_id is not None:
                self._op_seqs.pop((old.user_id, op_id_key(old.op_id)), None)
            if old.kind == COMMAND and old.command is not None:
                item_id = old.command.get("item_id")
                if isinstance(item_id, str) and self.tombstones.get(item_id) == old.seq:
                    del self.tombstones[item_id]
        if not history:
            self.history_size = 0  # emptied from outside (history.clear())
            self.tombstones.clear()

    def _apply_command(self, command: dict[str, Any], command_json: bytes | None = None) -> None:
        # Unknown actions are not applied but still take a seq: they are
        # relayed, and a client may resume past them.
        action = command.get("action")
        item_id = command.get("item_id")
        if action not in KNOWN_ACTIONS or not isinstance(item_id, str):
            return
        self.written = True
        data = command.get("data")
        data = data if isinstance(data, dict) else {}
        existing = self.items.get(item_id)
        if action in ("add_item", "update_item"):
            item_type = command.get("item_type")
            if action == "update_item" and existing and existing.get("item_type"):
                # Replace the data but keep identity; an update of an item this
                # server never saw (a host canvas shared before joining) adds it.
                item_type = existing.get("item_type")
            item = make_item(item_id, item_type, data)
            self._store_item(item_id, item, item_size(item, command, command_json))
        elif action == "move_item":
            if existing is not None:
                growth = _move_growth(existing, data)
                self._items_bytes += growth
                self._item_sizes[item_id] = self._item_sizes.get(item_id, 0) + growth
                # A new dict: an item is never changed in place (snapshot()).
                moved = dict(existing)
                for field in MOVE_FIELDS:
                    if field in data:
                        moved[field] = data[field]
                self.items[item_id] = moved
        else:  # remove_item
            if self.items.pop(item_id, None) is not None:
                self._items_bytes -= self._item_sizes.pop(item_id, 0)

    def _store_item(self, item_id: str, item: dict[str, Any], size: int | None = None) -> None:
        if size is None:
            size = encoded_size(item)
        self._items_bytes += size - self._item_sizes.get(item_id, 0)
        self._item_sizes[item_id] = size
        self.items[item_id] = item

    def _replace(self, items: list[dict[str, Any]]) -> None:
        self.items = replacement_items(items)
        self.written = True


def replacement_items(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The items by uuid a replacement by `items` leaves (copies; an item
    with only `item_uuid` gets it as its `uuid`)."""
    replaced: dict[str, dict[str, Any]] = {}
    for item in items:
        uuid = item.get("uuid", item.get("item_uuid"))
        stored = dict(item)
        stored["uuid"] = uuid
        replaced[uuid] = stored
    return replaced


def _move_growth(item: dict[str, Any], data: dict[str, Any]) -> int:
    """Bytes a move of `data` adds to `item`'s JSON (fields are set, never removed)."""
    growth = 0
    for field in MOVE_FIELDS:
        if field in data:
            new = encoded_size(data[field])
            if field in item:
                growth += new - encoded_size(item[field])
            else:
                growth += len(field) + 4 + new  # ,"field":value
    return growth


def item_data(item: dict[str, Any]) -> dict[str, Any]:
    """Inverse of make_item(): an item's fields but the `uuid` and
    `item_type` the server sets (a copy)."""
    return {name: value for name, value in item.items() if name not in ("uuid", "item_type")}


def encode_command(command: dict[str, Any] | None) -> bytes | None:
    """A command as compact JSON, encoded once for its stored record, the
    document's size of its item and the relay (a 1 MiB command was encoded
    three times). None if there is no command or orjson can't write it (then
    each encodes its own)."""
    if command is None:
        return None
    try:
        encoded = orjson.dumps(command)
    except orjson.JSONEncodeError:
        return None
    # A copy of exactly its length: orjson returns its output in the buffer
    # it grew (~32 KiB for a 3 KiB command), and a batch's relays hold these
    # until they are framed (a flood onto a slow disk: hundreds at once).
    return bytes(memoryview(encoded))


def item_size(item: dict[str, Any], command: dict[str, Any], command_json: bytes | None) -> int:
    """encoded_size() of the item make_item() built from `command`'s data,
    from `command_json` (the command's encoding) when it can be told from
    it without encoding the data again.

    The data's own size is the command's minus the command with empty data
    (the same keys in the same order); the item is the data with `uuid` and
    `item_type` after it, unless the data has either key (make_item sets
    them in place then).
    """
    data = command.get("data")
    if command_json is None or not isinstance(data, dict) or "uuid" in data or "item_type" in data:
        return encoded_size(item)
    tail = {name: item[name] for name in ("uuid", "item_type") if name in item}
    try:
        tail_size = len(orjson.dumps(tail))
    except orjson.JSONEncodeError:
        # An item_type beyond 64 bits (an update keeps the item's own): the
        # whole item is measured by the stdlib encoder, whose floats are
        # not spelled as in the command's orjson bytes.
        return encoded_size(item)
    if not data:
        return tail_size
    data_size = len(command_json) - encoded_size({**command, "data": {}}) + len("{}")
    # "{" data's fields "," tail's fields "}"
    return data_size + tail_size - len("{}") + len(",")


def make_item(item_id: str, item_type: Any, data: dict[str, Any]) -> dict[str, Any]:
    """An item as the document stores it: a copy of `data`, with its `uuid`
    and `item_type` (the command's own data object is relayed unchanged)."""
    item = dict(data)
    item["uuid"] = item_id
    if item_type is not None:
        item["item_type"] = item_type
    return item
