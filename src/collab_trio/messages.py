"""Server messages: one frozen class per message the server sends. Pure.

Each has `to_wire()`, the JSON object of PROTOCOL.md; the session encodes
it once however many members it goes to.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs
import orjson

from . import __version__
from .document import Op
from .protocol import PROTOCOL_VERSION, ErrorCode, encode, encode_bytes

SERVER_INFO = {"name": "collab-trio", "version": __version__, "protocol": PROTOCOL_VERSION}


@attrs.frozen
class UserInfo:
    """One entry of a `users` list."""

    user_id: str
    connected_at: str
    is_host: bool

    def to_wire(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "connected_at": self.connected_at, "is_host": self.is_host}


def _users(users: tuple[UserInfo, ...]) -> list[dict[str, Any]]:
    return [user.to_wire() for user in users]


@attrs.frozen
class ConnectionAck:
    """`connection:ack`: the first message of every connection."""

    session_id: str
    user_id: str
    is_host: bool
    users: tuple[UserInfo, ...]
    version: int
    epoch: str
    heartbeat_interval_s: float
    timestamp: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "connection:ack",
            "session_id": self.session_id,
            "user_id": self.user_id,
            "is_host": self.is_host,
            "users": _users(self.users),
            "version": self.version,
            "epoch": self.epoch,
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "server": SERVER_INFO,
            "timestamp": self.timestamp,
        }


@attrs.frozen
class UserJoined:
    """`user:joined`, to everyone but the newcomer."""

    user_id: str
    timestamp: str
    users: tuple[UserInfo, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "user:joined",
            "user_id": self.user_id,
            "timestamp": self.timestamp,
            "users": _users(self.users),
        }


@attrs.frozen
class UserLeft:
    """`user:left`; `users` already shows a newly promoted host."""

    user_id: str
    timestamp: str
    reason: str
    users: tuple[UserInfo, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "user:left",
            "user_id": self.user_id,
            "timestamp": self.timestamp,
            "reason": self.reason,
            "users": _users(self.users),
        }


@attrs.frozen
class HostChanged:
    """`host:changed`: the longest-connected remaining user is host now."""

    user_id: str
    timestamp: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "host:changed", "user_id": self.user_id, "timestamp": self.timestamp}


@attrs.frozen
class Pong:
    """The answer to a `ping`."""

    timestamp: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "pong", "timestamp": self.timestamp}


@attrs.define(unsafe_hash=True)  # a value: never changed (see "Per-change objects", ARCHITECTURE.md)
class Ack:
    """Tells a sender that its change was stored and applied as `seq`."""

    seq: int
    op_id: Any = None

    def to_wire(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "ack", "seq": self.seq}
        if self.op_id is not None:
            message["op_id"] = self.op_id
        return message


@attrs.frozen
class Error:
    """`error`: something the client sent was not accepted."""

    code: ErrorCode
    message: str
    ref: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code.value, "message": self.message, "ref": self.ref}


@attrs.define(unsafe_hash=True)  # a value: never changed (see "Per-change objects", ARCHITECTURE.md)
class Relay:
    """The `command` message other members receive for a committed op."""

    op: Op
    # The op's command as encode_command() wrote it, to embed as it is
    # (the document measured the item with it); None: encoded here.
    command_json: bytes | None = attrs.field(default=None, eq=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return self.op.relayed()

    def to_wire_bytes(self) -> bytes:
        """encode_message_bytes() of this message."""
        if self.command_json is not None:
            message = self.op.relayed()
            message["command"] = orjson.Fragment(self.command_json)
            try:
                return orjson.dumps(message)
            except orjson.JSONEncodeError:
                pass  # an op_id beyond 64 bits: the stdlib writes it
        return encode_bytes(self.to_wire())


@attrs.frozen
class SyncState:
    """`sync:state`: the whole document (`state` is None for a never-written one)."""

    state: dict[str, Any] | None
    version: int
    epoch: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "sync:state",
            "state": self.state,
            "version": self.version,
            "epoch": self.epoch,
            "from_server": True,
        }


@attrs.frozen
class SyncOps:
    """`sync:ops`: the commands a resuming client missed, in seq order."""

    ops: tuple[Op, ...]
    version: int
    epoch: str
    # Each op's relay as encode_message_bytes() wrote it (SessionCore
    # measured the answer with them), to embed as they are; None: encoded here.
    relays: tuple[bytes, ...] | None = attrs.field(default=None, eq=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "sync:ops",
            "ops": [op.relayed() for op in self.ops],
            "version": self.version,
            "epoch": self.epoch,
        }

    def to_wire_bytes(self) -> bytes:
        """encode_message_bytes() of this message."""
        if self.relays is None:
            return encode_bytes(self.to_wire())
        ops = [orjson.Fragment(relay) for relay in self.relays]
        return orjson.dumps({"type": "sync:ops", "ops": ops, "version": self.version, "epoch": self.epoch})


@attrs.frozen
class Forwarded:
    """A client's message passed on as sent, plus the sender's `user_id`
    (`cursor`, and `sync:full_state` from a member who is not the host)."""

    message: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return self.message


@attrs.frozen
class Correction:
    """A `command` with the server's state of one item, for a member that may
    show another (see convergence.py); stock Optiverse applies it like any
    relayed command. No `user_id`: the server sends it, nobody's edit."""

    command: dict[str, Any]
    seq: int
    timestamp: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "command",
            "command": self.command,
            "timestamp": self.timestamp,
            "seq": self.seq,
            "correction": True,
        }


ServerMessage = (
    ConnectionAck
    | UserJoined
    | UserLeft
    | HostChanged
    | Pong
    | Ack
    | Error
    | Relay
    | Correction
    | SyncState
    | SyncOps
    | Forwarded
)


def encode_message(message: ServerMessage) -> str:
    """The text frame of one server message."""
    return encode(message.to_wire())


def encode_message_bytes(message: ServerMessage) -> bytes:
    """The UTF-8 payload of one server message's text frame."""
    if type(message) is Relay or type(message) is SyncOps:
        return message.to_wire_bytes()
    return encode_bytes(message.to_wire())


# Notices of who is in the session: small, and never the reason a client is cut.
NOTICES = (UserJoined, UserLeft, HostChanged)


def replace_key(message: ServerMessage) -> Hashable | None:
    """What a later message must share with a queued one to make it obsolete.

    - a cursor: the same user's next cursor;
    - a relayed move_item: the next move of the same item with the same
      fields in `data` (moves only set coordinates, so the later values win
      whatever came in between);
    - a sync:state: the next sync:state (it holds everything).
    Everything else is delivered, in order.
    """
    if isinstance(message, Relay):
        command = message.op.command
        if command is not None and command.get("action") == "move_item":
            data = command.get("data")
            if isinstance(data, dict):
                # Same item, same fields (coordinates and anything else sent
                # along): the later move holds every value the earlier one had.
                return ("move", command.get("item_id"), command.get("item_type"), tuple(sorted(data)))
        return None
    if isinstance(message, SyncState):
        return ("sync:state",)
    if isinstance(message, Forwarded) and message.message.get("type") == "cursor":
        return ("cursor", message.message.get("user_id"))
    return None


_SERVER_TYPES: dict[type, str] = {
    ConnectionAck: "connection:ack",
    UserJoined: "user:joined",
    UserLeft: "user:left",
    HostChanged: "host:changed",
    Pong: "pong",
    Ack: "ack",
    Error: "error",
    Relay: "command",
    Correction: "command",
    SyncState: "sync:state",
    SyncOps: "sync:ops",
}


def server_message_type(message: ServerMessage) -> str:
    """The wire `type` of a server message, without encoding it (for the counters)."""
    found = _SERVER_TYPES.get(type(message))
    if found is not None:
        return found
    wire_type = message.to_wire().get("type")  # Forwarded: a cursor or a sync:full_state
    return wire_type if isinstance(wire_type, str) else "other"
