"""The server-authoritative session document and its recent history. Pure: no trio, no I/O.

Every change is an `Op` with a `seq`. Ops are what the journal stores and
what a restart replays, so applying one must depend on nothing but the
document and the op itself.
"""

from __future__ import annotations

import secrets
from collections import deque
from typing import Any

import attrs

from .protocol import KNOWN_ACTIONS, MOVE_FIELDS

# Ops kept for resume (sync:ops) and op_id de-duplication, per session.
DEFAULT_RETENTION = 1000

COMMAND = "command"
REPLACE = "replace"


def new_epoch() -> str:
    """A fresh epoch id; it changes only when a session's history is discarded."""
    return secrets.token_hex(8)


def op_id_key(op_id: str | int) -> tuple[str, str | int]:
    """A hashable key that keeps 1 and "1" apart (op ids are strings or integers)."""
    return (type(op_id).__name__, op_id)


@attrs.frozen
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
    # costs); not part of the record.
    size: int = attrs.field(default=0, eq=False)

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
    holds the last `retention` ops for resume and op_id de-duplication.
    """

    epoch: str = attrs.field(factory=new_epoch)
    version: int = 0
    written: bool = False
    items: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    retention: int = DEFAULT_RETENTION
    history: deque[Op] = attrs.field(init=False)
    _op_seqs: dict[tuple[str, tuple[str, str | int]], int] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.history = deque()

    def apply(self, op: Op) -> None:
        """Apply the next op; its seq must be version + 1."""
        if op.seq != self.version + 1:
            raise ValueError(f"op {op.seq} does not follow version {self.version}")
        if op.kind == REPLACE:
            self._replace(op.items or [])
        elif op.kind == COMMAND:
            self._apply_command(op.command or {})
        else:
            raise ValueError(f"unknown op kind {op.kind!r}")
        self.version = op.seq
        self.remember(op)

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

        Items are copied one level deep, which makes the snapshot independent
        of later ops (they replace items or set their top-level fields), so a
        writer thread may serialise it while the document moves on.
        """
        return {
            "epoch": self.epoch,
            "version": self.version,
            "written": self.written,
            "items": [dict(item) for item in self.items.values()],
        }

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any], *, retention: int = DEFAULT_RETENTION) -> SessionDocument:
        """Inverse of snapshot()."""
        document = cls(
            epoch=snapshot["epoch"],
            version=snapshot["version"],
            written=snapshot["written"],
            retention=retention,
        )
        document.items = {item["uuid"]: item for item in snapshot["items"]}
        return document

    # -- internals -----------------------------------------------------------

    def remember(self, op: Op) -> None:
        """Keep an op for resume and de-duplication (apply() does this itself)."""
        self.history.append(op)
        if op.op_id is not None:
            self._op_seqs[(op.user_id, op_id_key(op.op_id))] = op.seq
        while len(self.history) > self.retention:
            old = self.history.popleft()
            if old.op_id is not None:
                self._op_seqs.pop((old.user_id, op_id_key(old.op_id)), None)

    def _apply_command(self, command: dict[str, Any]) -> None:
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
        if action == "add_item":
            self.items[item_id] = _make_item(item_id, command.get("item_type"), data)
        elif action == "update_item":
            # Replace the data but keep identity; an update of an item this
            # server never saw (a host canvas shared before joining) adds it.
            item_type = existing.get("item_type") if existing else None
            self.items[item_id] = _make_item(item_id, item_type or command.get("item_type"), data)
        elif action == "move_item":
            if existing is not None:
                for field in MOVE_FIELDS:
                    if field in data:
                        existing[field] = data[field]
        else:  # remove_item
            self.items.pop(item_id, None)

    def _replace(self, items: list[dict[str, Any]]) -> None:
        replaced: dict[str, dict[str, Any]] = {}
        for item in items:
            uuid = item.get("uuid", item.get("item_uuid"))
            stored = dict(item)
            stored["uuid"] = uuid
            replaced[uuid] = stored
        self.items = replaced
        self.written = True


def _make_item(item_id: str, item_type: Any, data: dict[str, Any]) -> dict[str, Any]:
    # Copy: the command's own data object is relayed unchanged to others.
    item = dict(data)
    item["uuid"] = item_id
    if item_type is not None:
        item["item_type"] = item_type
    return item
