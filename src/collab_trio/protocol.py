"""Wire protocol v1: handshake paths, client messages, server messages, close codes.

Pure: no trio, no I/O. Everything here is tested without an event loop.
See PROTOCOL.md for the contract this module implements.
"""

from __future__ import annotations

import enum
import json
import math
import re
import unicodedata
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, unquote

import attrs

PROTOCOL_VERSION = 1
MAX_ID_LENGTH = 64
ENDPOINT_TEMPLATE = "/ws/{session_id}/{user_id}"

# Actions that the session document applies; any other action is relayed only.
KNOWN_ACTIONS = frozenset({"add_item", "move_item", "update_item", "remove_item"})
# Fields of a move_item command that are merged into the stored item.
MOVE_FIELDS = ("x_mm", "y_mm", "angle_deg")


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by the server (PROTOCOL.md, "Close codes")."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TOO_SLOW = 1013
    IDLE_TIMEOUT = 4000
    REPLACED = 4001
    RATE_LIMITED = 4002
    FORBIDDEN = 4003
    SESSION_FULL = 4004


class ErrorCode(str, enum.Enum):
    """Stable `code` values of `error` messages."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    MISSING_TYPE = "missing_type"
    UNKNOWN_TYPE = "unknown_type"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    INVALID_COMMAND = "invalid_command"
    INVALID_STATE = "invalid_state"
    INVALID_SYNC_REQUEST = "invalid_sync_request"
    UNKNOWN_USER = "unknown_user"
    NOT_PERSISTED = "not_persisted"
    RATE_LIMITED = "rate_limited"
    FORBIDDEN = "forbidden"
    DOCUMENT_TOO_LARGE = "document_too_large"


class ProtocolError(Exception):
    """A client message that cannot be accepted; becomes an `error` message."""

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


class HandshakeRejected(Exception):
    """A handshake refused with an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# ---------------------------------------------------------------------------
# JSON


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; a strict peer (Qt's QJsonDocument) refuses them.
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 reads as inf, which no peer can be sent back as JSON.
        raise ValueError(f"number {text[:20]} is out of range")
    return value


_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)
# Deepest nesting of arrays and objects accepted. Optiverse items are a few
# levels deep; the limit keeps every accepted message far from Python's
# recursion limit when it is encoded again for relaying and storing.
MAX_DEPTH = 64
# A JSON escape of a UTF-16 surrogate; only these can produce a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_structure(value: Any, text: str) -> None:
    """Refuse nesting beyond MAX_DEPTH and lone surrogates (UTF-8 can't carry them)."""
    # Cheap tests first: most messages have few brackets and no surrogate escapes.
    deep = text.count("[") + text.count("{") > MAX_DEPTH
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    if not deep and not surrogates:
        return
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.items()
        elif isinstance(node, list):
            children = ((None, item) for item in node)
        else:
            continue
        if depth > MAX_DEPTH:
            raise ProtocolError(
                ErrorCode.INVALID_JSON, f"message is nested deeper than {MAX_DEPTH} levels"
            )
        for key, child in children:
            for string in (key, child):
                if surrogates and isinstance(string, str) and not _utf8_safe(string):
                    raise ProtocolError(
                        ErrorCode.INVALID_JSON, "message contains a lone UTF-16 surrogate escape"
                    )
            stack.append((child, depth + 1))


def _utf8_safe(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode(message: dict[str, Any]) -> str:
    """Encode one server message as the text of a text frame."""
    return _encoder.encode(message)


def decode(text: str) -> dict[str, Any]:
    """Decode a text frame into a message object with a string `type`.

    Raises:
        ProtocolError: for invalid JSON, a non-object, or a missing `type`.
    """
    try:
        value = _decoder.decode(text)
    except (ValueError, RecursionError) as exc:
        # RecursionError: deeply nested arrays; ValueError covers JSONDecodeError.
        raise ProtocolError(ErrorCode.INVALID_JSON, f"message is not valid JSON: {exc}") from None
    _check_structure(value, text)
    if not isinstance(value, dict):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"message must be a JSON object, not {type(value).__name__}",
        )
    msg_type = value.get("type")
    if msg_type is None:
        raise ProtocolError(ErrorCode.MISSING_TYPE, 'message has no "type" field')
    if not isinstance(msg_type, str):
        raise ProtocolError(ErrorCode.MISSING_TYPE, '"type" must be a string')
    return value


def utc_timestamp(now: datetime | None = None) -> str:
    """ISO 8601 UTC timestamp with millisecond precision."""
    now = now or datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------
# Handshake target


@attrs.frozen
class Target:
    """What a client asked for in its handshake path."""

    session_id: str
    user_id: str
    since: int | None = None
    epoch: str | None = None
    token: str | None = None


def validate_id(raw: str, what: str) -> str:
    """Percent-decode and check a session or user id.

    Raises:
        HandshakeRejected: 400 with the reason when the id is not valid.
    """
    try:
        value = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise HandshakeRejected(400, f"{what} is not valid UTF-8 after percent-decoding") from None
    return check_id(value, what)


def check_id(value: str, what: str) -> str:
    """Check an already decoded session or user id.

    Raises:
        HandshakeRejected: 400 with the reason when the id is not valid.
    """
    if not value:
        raise HandshakeRejected(400, f"{what} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise HandshakeRejected(
            400, f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}"
        )
    if "/" in value:
        raise HandshakeRejected(400, f"{what} must not contain '/'")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise HandshakeRejected(400, f"{what} must not contain control characters")
    return value


def parse_target(path: str) -> Target:
    """Parse `/ws/{session_id}/{user_id}[?since=N&epoch=E&token=T]`.

    Raises:
        HandshakeRejected: 404 for another path, 400 for a bad id or parameter.
    """
    raw_path, _, query = path.partition("?")
    parts = raw_path.split("/")
    # "/ws/a/b" splits into ["", "ws", "a", "b"]; a trailing slash adds "".
    if len(parts) != 4 or parts[0] != "" or parts[1] != "ws":
        raise HandshakeRejected(
            404, f"unknown path; connect to {ENDPOINT_TEMPLATE}"
        )
    session_id = validate_id(parts[2], "session id")
    user_id = validate_id(parts[3], "user id")
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except UnicodeDecodeError:
        raise HandshakeRejected(400, "query string is not valid UTF-8") from None
    for key, value in pairs:
        params[key] = value
    since: int | None = None
    if "since" in params:
        try:
            since = int(params["since"])
        except ValueError:
            raise HandshakeRejected(400, "since must be a whole number") from None
        if since < 0:
            raise HandshakeRejected(400, "since must not be negative")
    return Target(
        session_id=session_id,
        user_id=user_id,
        since=since,
        epoch=params.get("epoch"),
        token=params.get("token"),
    )


# ---------------------------------------------------------------------------
# Client messages


@attrs.frozen
class Ping:
    """`ping`: the application heartbeat."""


@attrs.frozen
class Command:
    """`command`: an edit of one item."""

    command: dict[str, Any]
    action: str
    item_id: str | None
    item_type: str | None
    data: dict[str, Any] | None
    op_id: Any = None


@attrs.frozen
class SyncRequest:
    """`sync:request`: ask for the session state, or the ops since a version."""

    since: int | None = None
    epoch: str | None = None


@attrs.frozen
class SyncUpdate:
    """`sync:update`: replace the whole session document."""

    items: list[dict[str, Any]]
    op_id: Any = None


@attrs.frozen
class FullState:
    """`sync:full_state`: a host's full state, forwarded (to `target_user` if given)."""

    raw: dict[str, Any]
    items: list[dict[str, Any]]
    target_user: str | None = None


@attrs.frozen
class Cursor:
    """`cursor`: presence data, relayed coalesced and never stored."""

    raw: dict[str, Any]


ClientMessage = Ping | Command | SyncRequest | SyncUpdate | FullState | Cursor

_MESSAGE_TYPES = {
    Ping: "ping",
    Command: "command",
    SyncRequest: "sync:request",
    SyncUpdate: "sync:update",
    FullState: "sync:full_state",
    Cursor: "cursor",
}


def message_type(message: ClientMessage) -> str:
    """The wire `type` of a parsed client message."""
    return _MESSAGE_TYPES[type(message)]


def _optional_str(obj: dict[str, Any], key: str, code: ErrorCode, ref: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(code, f'"{key}" must be a string', ref)
    return value


def _parse_op_id(message: dict[str, Any], ref: str) -> Any:
    op_id = message.get("op_id")
    if op_id is None or isinstance(op_id, str) or (
        isinstance(op_id, int) and not isinstance(op_id, bool)
    ):
        return op_id
    raise ProtocolError(ErrorCode.INVALID_MESSAGE, '"op_id" must be a string or an integer', ref)


def _parse_command(message: dict[str, Any]) -> Command:
    ref = "command"
    command = message.get("command")
    if not isinstance(command, dict):
        raise ProtocolError(ErrorCode.INVALID_COMMAND, '"command" must be an object', ref)
    action = command.get("action")
    if not isinstance(action, str) or not action:
        raise ProtocolError(
            ErrorCode.INVALID_COMMAND, '"command.action" must be a non-empty string', ref
        )
    item_id = _optional_str(command, "item_id", ErrorCode.INVALID_COMMAND, ref)
    item_type = _optional_str(command, "item_type", ErrorCode.INVALID_COMMAND, ref)
    data = command.get("data")
    if data is not None and not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_COMMAND, '"command.data" must be an object', ref)
    if action in KNOWN_ACTIONS:
        if not item_id:
            raise ProtocolError(
                ErrorCode.INVALID_COMMAND, f'{action} needs a non-empty "command.item_id"', ref
            )
        if action == "add_item" and not item_type:
            raise ProtocolError(
                ErrorCode.INVALID_COMMAND, 'add_item needs a non-empty "command.item_type"', ref
            )
        if action in ("add_item", "update_item", "move_item") and data is None:
            raise ProtocolError(
                ErrorCode.INVALID_COMMAND, f'{action} needs "command.data" (an object)', ref
            )
        if action == "move_item":
            for field in MOVE_FIELDS:
                value = data.get(field) if data else None
                if value is not None and not _is_finite_number(value):
                    raise ProtocolError(
                        ErrorCode.INVALID_COMMAND, f'"command.data.{field}" must be a number', ref
                    )
    return Command(
        command=command,
        action=action,
        item_id=item_id,
        item_type=item_type,
        data=data,
        op_id=_parse_op_id(message, ref),
    )


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    # Integers are always finite (math.isfinite overflows on huge ones).
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _parse_state_items(message: dict[str, Any], ref: str) -> list[dict[str, Any]]:
    state = message.get("state")
    if not isinstance(state, dict):
        raise ProtocolError(ErrorCode.INVALID_STATE, '"state" must be an object', ref)
    items = state.get("items", [])
    if not isinstance(items, list):
        raise ProtocolError(ErrorCode.INVALID_STATE, '"state.items" must be a list', ref)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ProtocolError(
                ErrorCode.INVALID_STATE, f'"state.items[{index}]" must be an object', ref
            )
        uuid = item.get("uuid", item.get("item_uuid"))
        if not isinstance(uuid, str) or not uuid:
            raise ProtocolError(
                ErrorCode.INVALID_STATE,
                f'"state.items[{index}]" needs a non-empty string "uuid"',
                ref,
            )
    return items


def _parse_sync_request(message: dict[str, Any]) -> SyncRequest:
    ref = "sync:request"
    since = message.get("since")
    if since is not None and (
        not isinstance(since, int) or isinstance(since, bool) or since < 0
    ):
        raise ProtocolError(
            ErrorCode.INVALID_SYNC_REQUEST, '"since" must be a non-negative integer', ref
        )
    epoch = _optional_str(message, "epoch", ErrorCode.INVALID_SYNC_REQUEST, ref)
    return SyncRequest(since=since, epoch=epoch)


def _parse_full_state(message: dict[str, Any]) -> FullState:
    ref = "sync:full_state"
    items = _parse_state_items(message, ref)
    target = _optional_str(message, "target_user", ErrorCode.INVALID_MESSAGE, ref)
    return FullState(raw=message, items=items, target_user=target or None)


def parse_client_message(message: dict[str, Any]) -> ClientMessage:
    """Turn a decoded message into a typed client message.

    Raises:
        ProtocolError: for an unknown type or malformed fields.
    """
    msg_type = message["type"]
    if msg_type == "ping":
        return Ping()
    if msg_type == "command":
        return _parse_command(message)
    if msg_type == "sync:request":
        return _parse_sync_request(message)
    if msg_type == "sync:update":
        return SyncUpdate(
            items=_parse_state_items(message, msg_type),
            op_id=_parse_op_id(message, msg_type),
        )
    if msg_type == "sync:full_state":
        return _parse_full_state(message)
    if msg_type == "cursor":
        return Cursor(raw=message)
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type!r}", msg_type)
