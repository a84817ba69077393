"""The pure protocol layer: handshake paths, decoding and validation."""

from __future__ import annotations

import gc
import json
import math
import unicodedata
import weakref
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any
from unittest import mock
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from collab_trio import protocol
from collab_trio.auth import redact
from collab_trio.config import normalize_base_path
from collab_trio.protocol import (
    CONTAINER_BYTES,
    MAX_CONTAINERS_FREE,
    MAX_DEPTH,
    MAX_ID_LENGTH,
    Command,
    Cursor,
    ErrorCode,
    FullState,
    HandshakeRejected,
    Ping,
    ProtocolError,
    SyncRequest,
    SyncUpdate,
    check_id,
    decode,
    encode,
    encode_bytes,
    nested_deeper_than,
    parse_client_message,
    parse_json,
    parse_target,
)

PURE = settings(derandomize=True, database=None, deadline=None, max_examples=300)


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


# -- base path, doubled slashes, token segment -------------------------------------


@pytest.mark.parametrize(
    ("path", "base", "token"),
    [
        ("//ws/s/u", "", None),  # Optiverse with "ws://host:8765/" as its server URL
        ("///ws/s/u", "", None),
        ("/collab/ws/s/u", "/collab", None),
        ("/collab//ws/s/u", "/collab", None),
        ("/a/b/ws/s/u", "/a/b", None),
        ("/t/s3cret-token/ws/s/u", "", "s3cret-token"),
        ("/t/s3cret-token//ws/s/u", "", "s3cret-token"),  # "ws://host/t/TOKEN/"
        ("//t/s3cret-token/ws/s/u", "", "s3cret-token"),
        ("/collab/t/s3cret-token/ws/s/u", "/collab", "s3cret-token"),
        ("/collab/t/s3cret-token//ws/s/u", "/collab", "s3cret-token"),
        ("/t/a%2Fb%20c%3F/ws/s/u", "", "a/b c?"),  # percent-decoded
        # The path segment wins over the query parameter.
        ("/t/path-token/ws/s/u?token=query-token", "", "path-token"),
        ("/ws/s/u?token=query-token", "", "query-token"),
        ("/ws/t/u", "", None),  # a session called "t" is a session
    ],
)
def test_paths_under_a_base_and_with_a_token(path: str, base: str, token: str | None) -> None:
    target = parse_target(path, base)
    assert (target.session_id, target.user_id, target.token) == (path.split("/")[-2], "u", token)


@pytest.mark.parametrize(
    ("path", "base", "status", "reason"),
    [
        ("/ws/s/u", "/collab", 404, "unknown path; connect to /collab/ws/{session_id}/{user_id}"),
        ("/collabx/ws/s/u", "/collab", 404, "unknown path"),
        ("/collab", "/collab", 404, "unknown path"),
        ("/other/ws/s/u", "", 404, "unknown path; connect to /ws/{session_id}/{user_id}"),
        ("/t/ws/s/u", "", 404, "unknown path"),  # "ws" taken as the token: no ws segment left
        ("/t/tok/tok2/ws/s/u", "", 404, "unknown path"),
        ("/ws/s/u/", "", 404, "unknown path"),  # doubled or trailing slashes only before "ws"
        ("/t//ws/s/u", "", 400, "token is empty"),
        ("/t/%FF%FE/ws/s/u", "", 400, "token is not valid UTF-8 after percent-decoding"),
    ],
)
def test_paths_refused_under_a_base_and_with_a_token(path: str, base: str, status: int, reason: str) -> None:
    with pytest.raises(HandshakeRejected) as info:
        parse_target(path, base)
    assert info.value.status == status and info.value.reason.startswith(reason), info.value.reason


@pytest.mark.parametrize(
    ("path", "redacted"),
    [
        ("/t/s3cret/ws/s/u", "/t/***/ws/s/u"),
        ("/collab//t/s3cret//ws/s/u?since=3&token=other", "/collab//t/***//ws/s/u?since=3&token=***"),
        ("/t/s3cret", "/t/***"),  # no ws segment: still a token
        ("/t/s3cret/elsewhere", "/t/***/elsewhere"),
        ("/ws/t/alice", "/ws/t/alice"),  # after ws: ids, shown
        ("/ws/s/u", "/ws/s/u"),
        # A base path with a "ws" segment (--base-path /ws, /app/ws) is valid:
        # the token after it is still the one parse_target reads.
        ("/ws/t/s3cret/ws/s/u", "/ws/t/***/ws/s/u"),
        ("/app/ws//t/s3cret/ws/s/u?since=1", "/app/ws//t/***/ws/s/u?since=1"),
        ("/t/ws/ws/s/u", "/t/***/ws/s/u"),  # a token that reads "ws"
    ],
)
def test_redact_masks_the_token_segment(path: str, redacted: str) -> None:
    assert redact(path) == redacted


token_text = st.text(st.characters(codec="utf-8", exclude_characters="/?#%"), min_size=8, max_size=40)
base_paths = st.sampled_from(["", "/collab", "/a/b", "/t", "/ws", "/app/ws/x"])


@PURE
@given(base_paths, token_text, st.integers(0, 2), st.integers(0, 2), st.sampled_from(["", "?since=1", "?token=x"]))
def test_a_token_the_server_reads_from_the_path_is_never_in_the_redacted_path(
    base: str, token: str, slashes_before: int, slashes_after: int, query: str
) -> None:
    segment = quote(token, safe="")
    path = f"{base}{'/' * slashes_before}/t/{segment}{'/' * slashes_after}/ws/lab/ada{query}"
    target = parse_target(path, base)
    assert target.token == token
    shown = redact(path)
    assert segment not in shown and token not in shown
    assert shown.endswith(f"/***{'/' * slashes_after}/ws/lab/ada{query.replace('=x', '=***')}")


@pytest.mark.parametrize(
    ("text", "normalized"),
    [("", ""), ("/", ""), ("collab", "/collab"), ("/collab/", "/collab"), ("//a/b//", "/a/b"), ("/v1.2/~x", "/v1.2/~x")],
)
def test_base_path_is_normalized(text: str, normalized: str) -> None:
    assert normalize_base_path(text) == normalized


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("/a//b", "has an empty segment"),
        ("/a/../b", "must not contain '..' segments"),
        ("/a b", "may contain only letters"),
        ("/a?b", "may contain only letters"),
        ("/caf%C3%A9", "may contain only letters"),
    ],
)
def test_bad_base_paths_are_one_line_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="^base path .*" + reason.replace("?", "\\?").replace(".", "\\.")):
        normalize_base_path(text)


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
        # A null position would be stored and relayed as one.
        ({"type": "command", "command": {"action": "move_item", "item_id": "a", "data": {"x_mm": None, "y_mm": 1}}},
         ErrorCode.INVALID_COMMAND),
        ({"type": "command", "command": {"action": "move_item", "item_id": "a", "data": {"angle_deg": None}}},
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
    assert "Björk ✓" in text and ": " not in text and ", " not in text
    assert json.loads(text) == message
    assert encode_bytes(message) == text.encode("utf-8")


@pytest.mark.parametrize(
    "message",
    [
        {"type": "x", "n": 2**64},  # beyond orjson's integers: the stdlib encoder
        {"type": "x", "n": -(10**400)},
        {"type": "x", "v": {1: "a"}},  # a non-string key (the stdlib writes "1")
        {"type": "x", "v": [[[[]]]], "s": "\u2028\x00\"\\é😀"},
    ],
)
def test_encode_writes_what_the_stdlib_would_read_back(message: dict) -> None:
    text = encode(message)
    assert json.loads(text) == json.loads(json.dumps(message))
    assert encode_bytes(message) == text.encode("utf-8")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_encode_never_writes_nan_or_infinity(value: float) -> None:
    # A non-finite float can't reach encode (decode and the store refuse
    # them); if one did, the frame is still strict JSON that Qt accepts.
    text = encode({"type": "x", "v": value})
    assert text == '{"type":"x","v":null}'
    json.loads(text, parse_constant=lambda name: pytest.fail(f"wrote {name}"))


# -- decode: orjson, with every guarantee the stdlib-based decoder gave --------------------


def nest(depth: int, inner: str = "0") -> str:
    return "[" * depth + inner + "]" * depth


def in_message(value: str) -> str:
    return '{"type": "x", "v": ' + value + "}"


@pytest.mark.parametrize(
    "value",
    [
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1E+400",
        "1.8e308",
        "9" * 309 + ".0",
        "9" * 400 + "e0",
        "1e" + "9" * 400,
        "9" * 309,  # integers too: Qt refuses them as it refuses 1e400
        "-" + "1" * 4300,
        # Lone surrogates: a high one alone or last, a low one alone or first.
        r'"\ud800"',
        r'"\uDBFF x"',
        r'"\udc00"',
        r'"\uDFFF"',
        r'"\ude00\ud83d"',
        r'"\ud83d\ud83d"',
        r'"\ud83d\\ude00"',  # an escaped backslash splits the pair
        r'"\\\ud800"',  # an escaped backslash, then a lone escape
        r'{"\ud800": 1}',
        '"\ud800"',  # not escaped: a Python str can hold one
        # Numbers JSON does not have.
        "01",
        "-",
        "1.",
        ".5",
        "+1",
        "0x10",
        "1_000",
    ],
)
def test_decode_refuses_what_no_strict_peer_reads(value: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(in_message(value))
    assert info.value.code == ErrorCode.INVALID_JSON
    assert info.value.message.startswith("message ")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (r'"\\ud800"', "\\ud800"),  # an escaped backslash: plain text
        (r'"\\\\ud800"', "\\\\ud800"),
        (r'"\ud83d\ude00"', "😀"),
        (r'"\uD83D\uDE00 \u00e9"', "😀 é"),
        ('"😀"', "😀"),
        (r'"\u0000"', "\x00"),
        ("1e-400", 0.0),
        ("-0", 0),
        ("-0.0", -0.0),
        ("1.7976931348623157e308", 1.7976931348623157e308),
        ("18446744073709551615", 2**64 - 1),
        ("18446744073709551616", 2**64),
        ("-9223372036854775808", -(2**63)),
        ("-9223372036854775809", -(2**63) - 1),
        ("9" * 308, int("9" * 308)),  # exact up to double range
        ("-" + "1" * 309, -int("1" * 309)),  # 1.1e308
        ("[" + ",".join(["123456789012345678901234567890"] * 3) + ", 1.5]", [123456789012345678901234567890] * 3 + [1.5]),
        ("0.1234567890123456789012", 0.1234567890123456789012),
        ("1" * 400 + "e-395", float("1" * 400 + "e-395")),
        ('{"big": ' + "7" * 300 + ', "s": "' + "1" * 350 + '"}', {"big": int("7" * 300), "s": "1" * 350}),
    ],
)
def test_decode_keeps_values_exact(value: str, expected: Any) -> None:
    decoded = decode(in_message(value))["v"]
    assert decoded == expected
    assert type(decoded) is type(expected)
    if isinstance(expected, float):
        assert math.copysign(1, decoded) == math.copysign(1, expected)


def test_decode_refuses_integers_beyond_pythons_conversion_limit() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(in_message("9" * 5000))
    assert info.value.code == ErrorCode.INVALID_JSON


def test_decode_takes_utf8_bytes_too() -> None:
    assert decode('{"type": "ping", "n": "é"}'.encode()) == {"type": "ping", "n": "é"}
    assert decode(b'{"type": "ping", "n": 123456789012345678901}')["n"] == 123456789012345678901
    for raw in (b'{"type": "\xff"}', b'{"type": "\xed\xa0\x80"}', b"\xef\xbb\xbf{}"):
        with pytest.raises(ProtocolError) as info:
            decode(raw)
        assert info.value.code == ErrorCode.INVALID_JSON


def deep_variants(depth: int) -> list[str]:
    """Values nested exactly `depth` levels inside the message object."""
    inner = depth - 1  # the message object is the first level
    return [
        nest(inner),
        '{"a": ' * inner + "1" + "}" * inner,
        '[{"a": ' * (inner // 2) + ("[]" if inner % 2 else "1") + "}]" * (inner // 2),
        # Brackets and escaped quotes inside strings don't count.
        "[" * inner + r'"]]]\"[[[{{{\\"' + "]" * inner,
        "[" * (inner - 1) + '["[", "]", "\\"]"]' + "]" * (inner - 1),
        # Many shallow groups beside one deep one.
        "[" + ",".join([nest(3)] * 50 + [nest(inner - 1)]) + "]",
    ]


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 2, 1025, 4000])
def test_nesting_is_counted_exactly(depth: int) -> None:
    for value in deep_variants(depth):
        if depth <= MAX_DEPTH:
            decode(in_message(value))
        else:
            with pytest.raises(ProtocolError) as info:
                decode(in_message(value))
            assert info.value.code == ErrorCode.INVALID_JSON
            assert info.value.message == f"message is nested deeper than {MAX_DEPTH} levels"


def _with_arrays(arrays: int, size: int) -> str:
    """A ping of `size` characters holding `arrays` empty arrays (plus the
    message object itself), padded with zeros."""
    head, body = '{"type":"ping","pad":[', ",".join(["[]"] * arrays)
    zeros = (size - len(head) - len(body) - 2) // 2
    text = head + body + ",0" * zeros + "]}"
    return text + " " * (size - len(text))


def test_arrays_and_objects_are_bounded_by_size() -> None:
    size = 160_000
    limit = MAX_CONTAINERS_FREE + size // CONTAINER_BYTES  # the message and its pad count too
    assert decode(_with_arrays(limit - 2, size))["type"] == "ping"
    with pytest.raises(ProtocolError) as info:
        decode(_with_arrays(limit - 1, size))
    assert info.value.code == ErrorCode.INVALID_JSON
    assert info.value.message.startswith(f"message has more than {limit} arrays and objects")
    # Bracket characters in strings count too (nothing real holds that many),
    # and a crafted string is refused at C speed, whatever escapes it holds.
    text = '{"type":"ping","name":"' + '\\"' * 300_000 + "[" * 100_000 + '"}'
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert info.value.message.startswith("message has more than")
    assert decode('{"type":"ping","name":"' + "[{" * 1000 + '"}')["name"].startswith("[{[{")
    # A deep message is refused, by one bound or the other.
    with pytest.raises(ProtocolError) as info:
        decode("[" * 100_000 + "]" * 100_000)
    assert info.value.code == ErrorCode.INVALID_JSON


def test_nesting_is_counted_on_the_exact_path_too() -> None:
    # A 20-digit integer takes the stdlib path; the depth is checked all the same.
    big = "12345678901234567890"
    assert decode(in_message(nest(MAX_DEPTH - 1, big)))["v"] is not None
    for inner in (big, "9" * 400, "1" * 400 + ".5"):
        with pytest.raises(ProtocolError) as info:
            decode(in_message(nest(MAX_DEPTH, inner)))
        assert info.value.message == f"message is nested deeper than {MAX_DEPTH} levels"


def test_orjson_depth_limit_is_measured() -> None:
    # The padding relies on it; without one, nested_deeper_than is used instead.
    assert protocol._ORJSON_DEPTH is not None and protocol._ORJSON_DEPTH > MAX_DEPTH


def test_without_an_orjson_depth_limit_the_byte_check_gives_the_same_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(protocol, "_ORJSON_DEPTH", None)
    for depth in (MAX_DEPTH, MAX_DEPTH + 1):
        for value in deep_variants(depth):
            if depth <= MAX_DEPTH:
                decode(in_message(value))
            else:
                with pytest.raises(ProtocolError):
                    decode(in_message(value))


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("0", 0),
        ("[]", 1),
        ("{}", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[", "\\"[[[["]', 1),
        ('[[], [[]], [[[]]], []]', 4),
        ('[{"]": "}"}, [{}]]', 3),
        (nest(200), 200),
        ("[" + ",".join([nest(64)] * 100) + "]", 65),
    ],
)
def test_nested_deeper_than(text: str, depth: int) -> None:
    data = text.encode()
    assert nested_deeper_than(data, depth) is False
    if depth:
        assert nested_deeper_than(data, depth - 1) is True


def test_parse_json_takes_any_value() -> None:
    assert parse_json("[1, 2]") == [1, 2]
    assert parse_json('"x"') == "x"
    with pytest.raises(ProtocolError):
        parse_json("[NaN]")


# -- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user",
    [
        "Ada Lovelace",
        "  padded  ",  # spaces are kept as typed (Optiverse sends what the user typed)
        "Björk",
        "équipe-2.0_test",
        "山田\u3000太郎",  # an ideographic space, as Japanese keyboards type it
        "Ελένη",
        "Сергей",
        "محمد",
        "שלום",
        "नमस्ते",
        "김철수",
        "O'Brien (lab #3)",
        "x" * MAX_ID_LENGTH,
        "❤️",  # a variation selector after its heart
        "1️⃣",
        "👍🏽",  # a skin tone
        "👩‍💻",  # zero-width joiners between emoji
        "🏳️‍🌈",
        "🧑🏽‍🚀",
        "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # the flag of Scotland
        "e\u0301",  # a combining accent
    ],
)
def test_ids_typed_by_people_are_valid(user: str) -> None:
    assert check_id(user, "user id") == user
    assert parse_target(f"/ws/lab/{quote(user)}").user_id == user


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("a\u200bb", "U+200B ZERO WIDTH SPACE at position 2"),
        ("a\u200cb", "U+200C ZERO WIDTH NON-JOINER"),
        ("a\u200db", "U+200D ZERO WIDTH JOINER"),
        ("\u200d👩", "U+200D ZERO WIDTH JOINER at position 1"),
        ("👩\u200d", "U+200D ZERO WIDTH JOINER at position 2"),
        ("a\u2060b", "U+2060 WORD JOINER"),
        ("\ufeffalice", "U+FEFF ZERO WIDTH NO-BREAK SPACE at position 1"),
        ("alice\u200e", "U+200E LEFT-TO-RIGHT MARK"),
        ("alice\u200f", "U+200F RIGHT-TO-LEFT MARK"),
        ("evil\u202egpj.exe", "U+202E RIGHT-TO-LEFT OVERRIDE at position 5"),
        ("a\u202ab", "U+202A LEFT-TO-RIGHT EMBEDDING"),
        ("a\u202bb", "U+202B"),
        ("a\u202cb", "U+202C POP DIRECTIONAL FORMATTING"),
        ("a\u202db", "U+202D"),
        ("a\u2066b", "U+2066 LEFT-TO-RIGHT ISOLATE"),
        ("a\u2067b", "U+2067"),
        ("a\u2068b", "U+2068"),
        ("a\u2069b", "U+2069 POP DIRECTIONAL ISOLATE"),
        ("a\u061cb", "U+061C ARABIC LETTER MARK"),
        ("a\u00adb", "U+00AD SOFT HYPHEN"),
        ("a\u2028b", "U+2028 LINE SEPARATOR"),
        ("a\u2029b", "U+2029 PARAGRAPH SEPARATOR"),
        ("a\u180eb", "U+180E MONGOLIAN VOWEL SEPARATOR"),
        ("\u3164", "U+3164 HANGUL FILLER"),
        ("a\u034fb", "U+034F COMBINING GRAPHEME JOINER"),
        ("\ufe0falice", "U+FE0F VARIATION SELECTOR-16 at position 1"),
        ("a \ufe0f", "U+FE0F VARIATION SELECTOR-16 at position 3"),
        ("alice\U000e0041\U000e0042", "U+E0041 TAG LATIN CAPITAL LETTER A"),  # hidden text
        ("🏴\U000e0067\U000e0062", "U+E0067 TAG LATIN SMALL LETTER G at position 2"),  # no cancel tag
    ],
)
def test_invisible_characters_in_ids_are_refused(value: str, shown: str) -> None:
    for what in ("session id", "user id"):
        with pytest.raises(HandshakeRejected) as info:
            check_id(value, what)
        assert info.value.status == 400
        reason = info.value.reason
        assert reason.startswith(f"{what} must not contain invisible or formatting characters (")
        assert shown in reason and "\n" not in reason
    # The same through a handshake path, percent-encoded as Qt sends it.
    with pytest.raises(HandshakeRejected) as info:
        parse_target(f"/ws/{quote(value)}/bob")
    assert info.value.status == 400 and info.value.reason.startswith("session id must not contain")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (" ", "user id is only spaces"),
        ("\u3000\u00a0", "user id is only spaces"),
        ("a\x7fb", "user id must not contain control characters"),
        ("é\x85", "user id must not contain control characters"),
        ("é\udcff", "user id is not valid Unicode (a lone surrogate)"),
    ],
)
def test_other_ids_refused(value: str, reason: str) -> None:
    with pytest.raises(HandshakeRejected) as info:
        check_id(value, "user id")
    assert info.value.reason == reason


VISIBLE_CATEGORIES = (
    "Lu", "Ll", "Lt", "Lm", "Lo", "Nd", "Nl", "No",
    "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs",
)  # fmt: skip
# Letters (Lo) that draw nothing: Hangul fillers.
FILLERS = "\u115f\u1160\u3164\uffa0"
visible_ids = st.text(
    st.characters(categories=VISIBLE_CATEGORIES, exclude_characters="/" + FILLERS),
    min_size=1,
    max_size=MAX_ID_LENGTH - 1,
).filter(lambda s: not s.isspace())
ZERO_WIDTH_JOINER = "\u200d"
invisible_characters = st.sampled_from(
    "\u200b\u200c\u2060\ufeff\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c\u2028\u2029"
) | st.characters(categories=("Cf", "Zl", "Zp")).filter(lambda c: c != ZERO_WIDTH_JOINER)


@PURE
@given(visible_ids)
@example("Ada Lovelace")
def test_ids_of_visible_characters_are_valid(value: str) -> None:
    assert check_id(value, "user id") == value


@PURE
@given(visible_ids, invisible_characters, st.integers(min_value=0))
def test_an_invisible_character_anywhere_makes_an_id_invalid(value: str, ch: str, at: int) -> None:
    at %= len(value) + 1
    with pytest.raises(HandshakeRejected) as info:
        check_id(value[:at] + ch + value[at:], "user id")
    assert info.value.status == 400
    assert f"U+{ord(ch):04X}" in info.value.reason
    assert unicodedata.category(ch) != "Cc"


# -- sync:full_state target_user ------------------------------------------------------------


def test_an_empty_target_user_names_nobody() -> None:
    # Not "everyone": "" is kept, and the session answers unknown_user.
    full = parse_client_message({"type": "sync:full_state", "state": {"items": []}, "target_user": ""})
    assert isinstance(full, FullState) and full.target_user == ""
    everyone = parse_client_message({"type": "sync:full_state", "state": {"items": []}})
    assert isinstance(everyone, FullState) and everyone.target_user is None
    assert parse_client_message(
        {"type": "sync:full_state", "state": {"items": []}, "target_user": None}
    ) == FullState(raw={"type": "sync:full_state", "state": {"items": []}, "target_user": None}, items=[])


def test_an_empty_target_user_is_answered_unknown_user_by_the_session() -> None:
    # The session core is sans-io: plain calls, no trio.
    from collab_trio.session_core import Send, SessionCore

    now = "2026-12-02T10:00:00.000+00:00"
    core = SessionCore("lab", clock=lambda: now)
    core.join("host-conn", "host", connected_at=now)
    core.join("bob-conn", "bob", connected_at=now)
    frame = json.dumps({"type": "sync:full_state", "state": {"items": [{"uuid": "a"}]}, "target_user": ""})
    effects = core.receive("host-conn", "host", frame)
    assert all(isinstance(effect, Send) and effect.conn == "host-conn" for effect in effects), effects
    [answer] = [effect.message for effect in effects]
    assert (answer.code, answer.ref) == (ErrorCode.UNKNOWN_USER, "sync:full_state")
    assert core.document.version == 0  # nothing replaced, nothing forwarded


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=253402300799 * 10**9 + 999_999_999))
@example(1_796_622_373_999_999_999)  # the last nanosecond of a second
@example(0)
def test_utc_timestamp_is_the_iso_time_to_the_millisecond(ns: int) -> None:
    """The stamp of ops, acks and pongs, formatted once per second and then
    only its milliseconds: the same text as datetime's, for any time."""
    expected = (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=ns // 10**6)).isoformat(
        timespec="milliseconds"
    )
    with mock.patch.object(protocol, "time", SimpleNamespace(time_ns=lambda: ns)):
        assert protocol.utc_timestamp() == expected
    assert protocol.utc_timestamp(datetime.fromisoformat(expected)) == expected



# -- big messages and the garbage collector ------------------------------------------


def many_arrays(count: int) -> str:
    """A command holding `count` empty arrays, padded to be within the
    container limit (protocol.CONTAINER_BYTES per container)."""
    pad = "x" * (protocol.CONTAINER_BYTES * count)
    return (
        '{"type":"command","command":{"action":"add_item","item_type":"lens","item_id":"x",'
        '"data":{"pad":"%s","v":[%s]}}}' % (pad, ",".join(["[]"] * count))
    )


@pytest.fixture
def frozen_state(monkeypatch: pytest.MonkeyPatch):
    """A fresh _Frozen record, and the collector as it was afterwards."""
    monkeypatch.setattr(protocol, "_frozen", protocol._Frozen())
    gc.collect()
    yield protocol._frozen
    gc.unfreeze()
    gc.collect()


def test_a_message_of_many_containers_is_left_out_of_the_collectors_generations(frozen_state) -> None:
    before = gc.get_freeze_count()
    message = protocol.decode(many_arrays(protocol.FREEZE_CONTAINERS))
    assert len(message["command"]["data"]["v"]) == protocol.FREEZE_CONTAINERS
    assert gc.get_freeze_count() >= before + protocol.FREEZE_CONTAINERS
    assert frozen_state.containers >= protocol.FREEZE_CONTAINERS and frozen_state.releases == 0
    # A smaller one is not.
    frozen = gc.get_freeze_count()
    protocol.decode(many_arrays(protocol.FREEZE_CONTAINERS // 2))
    assert gc.get_freeze_count() == frozen


def test_garbage_frozen_with_a_message_is_collected_at_the_next_release(
    frozen_state, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "RELEASE_AFTER_CONTAINERS", 3 * protocol.FREEZE_CONTAINERS)

    class Node:
        pass

    cycle = Node()
    cycle.me = cycle  # type: ignore[attr-defined]
    alive = weakref.ref(cycle)
    del cycle
    protocol.decode(many_arrays(protocol.FREEZE_CONTAINERS))  # frozen with it: not collected
    gc.collect()
    assert alive() is not None and frozen_state.releases == 0
    for _ in range(2):  # 3 x FREEZE_CONTAINERS frozen: the release
        protocol.decode(many_arrays(protocol.FREEZE_CONTAINERS))
    assert frozen_state.releases == 1 and frozen_state.containers == 0
    assert alive() is None
    # What was alive at the release is frozen again, and sets when the next one is due.
    assert frozen_state.alive_at_release >= protocol.FREEZE_CONTAINERS and gc.get_freeze_count() > 0
