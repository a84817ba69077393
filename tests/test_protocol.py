"""The pure protocol layer: handshake paths, decoding and validation."""

from __future__ import annotations

import json

import pytest

from collab_trio.protocol import (
    Command,
    Cursor,
    ErrorCode,
    FullState,
    HandshakeRejected,
    Ping,
    ProtocolError,
    SyncRequest,
    SyncUpdate,
    decode,
    encode,
    parse_client_message,
    parse_target,
)


@pytest.mark.parametrize(
    ("path", "session_id", "user_id"),
    [
        ("/ws/default/alice", "default", "alice"),
        ("/ws/lab%201/Ada%20Lovelace", "lab 1", "Ada Lovelace"),
        ("/ws/%C3%A9quipe/Bj%C3%B6rk", "équipe", "Björk"),
        ("/ws/" + "s" * 64 + "/u", "s" * 64, "u"),
        ("/ws/s/bob?local_version=3", "s", "bob"),
    ],
)
def test_valid_paths(path: str, session_id: str, user_id: str) -> None:
    target = parse_target(path)
    assert (target.session_id, target.user_id) == (session_id, user_id)


def test_query_parameters() -> None:
    target = parse_target("/ws/s/u?since=12&epoch=abc&token=t0k")
    assert (target.since, target.epoch, target.token) == (12, "abc", "t0k")


@pytest.mark.parametrize(
    ("path", "status", "reason_part"),
    [
        ("/", 404, "unknown path"),
        ("/ws", 404, "unknown path"),
        ("/ws/only-session", 404, "unknown path"),
        ("/ws/a/b/c", 404, "unknown path"),
        ("/ws/a/b/", 404, "unknown path"),
        ("/other/a/b", 404, "unknown path"),
        ("/ws//bob", 400, "session id is empty"),
        ("/ws/s/", 400, "user id is empty"),
        ("/ws/" + "s" * 65 + "/u", 400, "limit is 64"),
        ("/ws/s/a%2Fb", 400, "must not contain '/'"),
        ("/ws/s/a%0Ab", 400, "control characters"),
        ("/ws/s/a%00b", 400, "control characters"),
        ("/ws/s/%FF", 400, "not valid UTF-8"),
        ("/ws/s/u?since=abc", 400, "since must be a whole number"),
        ("/ws/s/u?since=-1", 400, "since must not be negative"),
    ],
)
def test_invalid_paths(path: str, status: int, reason_part: str) -> None:
    with pytest.raises(HandshakeRejected) as info:
        parse_target(path)
    assert info.value.status == status
    assert reason_part in info.value.reason
    assert "\n" not in info.value.reason


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", ErrorCode.INVALID_JSON),
        ("", ErrorCode.INVALID_JSON),
        ('{"type": "ping", "x": NaN}', ErrorCode.INVALID_JSON),
        ("[" * 100_000 + "]" * 100_000, ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.INVALID_MESSAGE),
        ('"ping"', ErrorCode.INVALID_MESSAGE),
        ("null", ErrorCode.INVALID_MESSAGE),
        ("{}", ErrorCode.MISSING_TYPE),
        ('{"type": 3}', ErrorCode.MISSING_TYPE),
    ],
)
def test_decode_errors(text: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "nope"}, ErrorCode.UNKNOWN_TYPE),
        ({"type": "command"}, ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": []}, ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": {}}, ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": {"action": "add_item", "item_type": "lens", "data": {}}},
         ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": {"action": "add_item", "item_id": "a", "data": {}}},
         ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": {"action": "add_item", "item_id": "a", "item_type": "lens"}},
         ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": {"action": "move_item", "item_id": "a", "data": {"x_mm": "1"}}},
         ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": {"action": "remove_item", "item_id": 5}},
         ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": {"action": "x", "data": 3}}, ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": {"action": "x"}, "op_id": [1]}, ErrorCode.INVALID_MESSAGE),
        ({"type": "sync:update"}, ErrorCode.INVALID_STATE),
        ({"type": "sync:update", "state": {"items": {}}}, ErrorCode.INVALID_STATE),
        ({"type": "sync:update", "state": {"items": [{"x_mm": 1}]}}, ErrorCode.INVALID_STATE),
        ({"type": "sync:full_state", "state": None}, ErrorCode.INVALID_STATE),
        ({"type": "sync:full_state", "state": {"items": []}, "target_user": 7}, ErrorCode.INVALID_MESSAGE),
        ({"type": "sync:request", "since": -1}, ErrorCode.INVALID_SYNC_REQUEST),
        ({"type": "sync:request", "since": True}, ErrorCode.INVALID_SYNC_REQUEST),
    ],
)
def test_invalid_client_messages(message: dict, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(message)
    assert info.value.code == code
    assert info.value.message


def test_optiverse_messages_parse() -> None:
    # Exactly what Optiverse's CollaborationService sends, user_id included.
    assert parse_client_message({"type": "ping", "user_id": "alice"}) == Ping()
    command = parse_client_message(
        {
            "type": "command",
            "command": {
                "action": "add_item",
                "item_type": "lens",
                "item_id": "u-1",
                "data": {"x_mm": 1.0, "y_mm": 2.0, "item_uuid": "u-1"},
            },
            "timestamp": "2026-11-26T10:00:00",
            "user_id": "alice",
        }
    )
    assert isinstance(command, Command)
    assert (command.action, command.item_id, command.item_type) == ("add_item", "u-1", "lens")
    request = parse_client_message({"type": "sync:request", "local_version": 4, "timestamp": "x"})
    assert request == SyncRequest()
    update = parse_client_message(
        {"type": "sync:update", "state": {"items": [{"uuid": "a", "item_type": "lens"}], "version": 2}}
    )
    assert isinstance(update, SyncUpdate) and len(update.items) == 1
    full = parse_client_message(
        {"type": "sync:full_state", "state": {"items": [], "version": 0}, "target_user": "bob"}
    )
    assert isinstance(full, FullState) and full.target_user == "bob"
    assert isinstance(parse_client_message({"type": "cursor", "x": 1.5, "y": 2.0}), Cursor)


def test_unknown_action_is_well_formed() -> None:
    command = parse_client_message({"type": "command", "command": {"action": "rotate_all"}})
    assert isinstance(command, Command) and command.item_id is None


def test_encode_round_trip_keeps_unicode_and_is_compact() -> None:
    message = {"type": "user:joined", "user_id": "Björk ✓", "users": []}
    text = encode(message)
    assert "Björk ✓" in text and ": " not in text
    assert json.loads(text) == message


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({"type": "x", "v": float("nan")})
