"""The server-authoritative session document. Pure: no trio, no I/O."""

from __future__ import annotations

import secrets
from typing import Any

import attrs

from .protocol import KNOWN_ACTIONS, MOVE_FIELDS, Command


def new_epoch() -> str:
    """A fresh epoch id; it changes only when a session's history is discarded."""
    return secrets.token_hex(8)


@attrs.define(eq=False)
class SessionDocument:
    """Items of one session, in insertion order, and the version that counts edits.

    `version` is the `seq` of the last applied change. `written` stays False
    until some change touched the items, so that a never-written session
    answers `state: null` and Optiverse keeps the host's canvas.
    """

    epoch: str = attrs.field(factory=new_epoch)
    version: int = 0
    written: bool = False
    items: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def apply(self, command: Command) -> int:
        """Apply a command in arrival order and return its seq.

        Unknown actions are not applied but still get a seq, because they are
        relayed and a client may resume past them.
        """
        self.version += 1
        if command.action not in KNOWN_ACTIONS:
            return self.version
        item_id = command.item_id
        assert item_id is not None  # protocol.parse_client_message guarantees it
        self.written = True
        existing = self.items.get(item_id)
        if command.action == "add_item":
            self.items[item_id] = self._make_item(item_id, command.item_type, command.data)
        elif command.action == "update_item":
            # Replace the data but keep identity; an update of an item this
            # server never saw (a host canvas shared before joining) adds it.
            item_type = existing.get("item_type") if existing else None
            self.items[item_id] = self._make_item(
                item_id, item_type or command.item_type, command.data
            )
        elif command.action == "move_item":
            if existing is not None and command.data:
                for field in MOVE_FIELDS:
                    if field in command.data:
                        existing[field] = command.data[field]
        else:  # remove_item
            self.items.pop(item_id, None)
        return self.version

    def replace(self, items: list[dict[str, Any]]) -> int:
        """Replace every item (sync:update, host sync:full_state) and return the seq."""
        replaced: dict[str, dict[str, Any]] = {}
        for item in items:
            uuid = item.get("uuid", item.get("item_uuid"))
            stored = dict(item)
            stored["uuid"] = uuid
            replaced[uuid] = stored
        self.items = replaced
        self.version += 1
        self.written = True
        return self.version

    def state(self, timestamp: str) -> dict[str, Any] | None:
        """The Optiverse `state` object, or None for a never-written session."""
        if not self.written:
            return None
        return {"items": list(self.items.values()), "version": self.version, "timestamp": timestamp}

    @staticmethod
    def _make_item(
        item_id: str, item_type: str | None, data: dict[str, Any] | None
    ) -> dict[str, Any]:
        # Copy: the command's own data object is relayed unchanged to others.
        item = dict(data or {})
        item["uuid"] = item_id
        if item_type is not None:
            item["item_type"] = item_type
        return item
