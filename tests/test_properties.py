"""Property tests of the message layer, and of the server fed whatever a client can send.

The parser's contract: for any input it returns a value or raises its own
error (ProtocolError for messages, HandshakeRejected for paths), never
anything else. The server's: one client's frames, however odd, never stop it
serving an honest client. Hypothesis runs derandomized and without an example
database, so every run tries the same inputs (CI included) and none depends
on an earlier one.

The last section pins server bugs these properties found (lone surrogates,
numbers out of float range, nesting near the recursion limit, an unexpected
error in the store's writer), all fixed: they stay as regression tests.
"""

from __future__ import annotations

import json
import math
import os
import signal
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from collab_trio.config import ServerConfig
from collab_trio.protocol import (
    KNOWN_ACTIONS,
    MAX_DEPTH,
    MAX_ID_LENGTH,
    Command,
    Cursor,
    FullState,
    HandshakeRejected,
    Ping,
    ProtocolError,
    SyncRequest,
    SyncUpdate,
    Target,
    decode,
    parse_client_message,
    parse_target,
)
from collab_trio.server import serve
from collab_trio.store.pending_log import UNAPPLIED_PREFIX, decode_records, segment_numbers
from collab_trio.testing import Client, HANG, Harness, MemoryListener, server_process, tcp_client
from collab_trio.testing import OPCODE_BINARY, OPCODE_TEXT, RawClient, raw_connect

from .test_faults import close_code

# Deterministic: the same examples on every run and every machine, nothing replayed from disk.
PURE = settings(derandomize=True, database=None, deadline=None, max_examples=300)
SERVER = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MESSAGE_TYPES = ["ping", "command", "sync:request", "sync:update", "sync:full_state", "cursor"]
PARSER_CODES = {
    "invalid_json",
    "invalid_message",
    "missing_type",
    "unknown_type",
    "binary_not_supported",
    "invalid_command",
    "invalid_state",
    "invalid_sync_request",
}

# -- strategies ----------------------------------------------------------------------------

# Everything a Python str can hold, lone surrogates included (JSON "\ud800" decodes to one).
any_text = st.text(st.characters(exclude_categories=()))


def json_values(text: st.SearchStrategy[str], floats: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | floats | text
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=5) | st.dictionaries(text, children, max_size=5),
        max_leaves=25,
    )


# What the parser must cope with: NaN and infinities (which JSON text can't hold but
# Python's json.dumps writes anyway), and any string.
wild_json = json_values(any_text, st.floats())
# What a server can relay back out: finite numbers and text free of lone surrogates.
relayable_json = json_values(st.text(max_size=20), st.floats(allow_nan=False, allow_infinity=False))


def shaped_messages(values: st.SearchStrategy[Any], text: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    """Objects that look like client messages, with every field sometimes of the wrong kind."""
    data = st.dictionaries(
        st.sampled_from(["x_mm", "y_mm", "angle_deg", "uuid", "item_type", "name"]) | text, values, max_size=4
    )
    command = st.fixed_dictionaries(
        {},
        optional={
            "action": st.sampled_from(sorted(KNOWN_ACTIONS) + ["mirror_all", ""]) | values,
            "item_id": st.sampled_from(["a", "b", ""]) | text | values,
            "item_type": st.sampled_from(["lens", ""]) | values,
            "data": data | values,
        },
    )
    item = st.fixed_dictionaries(
        {},
        optional={
            "uuid": st.sampled_from(["a", "b", ""]) | values,
            "item_uuid": text,
            "item_type": text,
            "x_mm": values,
        },
    )
    state = st.fixed_dictionaries(
        {}, optional={"items": st.lists(item, max_size=3) | values, "version": values}
    )
    return st.fixed_dictionaries(
        {"type": st.sampled_from(MESSAGE_TYPES) | text},
        optional={
            "command": command | values,
            "state": state | values,
            "op_id": st.integers() | text | values,
            "since": st.integers(min_value=-3, max_value=10) | values,
            "epoch": text | values,
            "target_user": st.sampled_from(["honest", "evil", "nobody", ""]) | values,
            "user_id": text,
            "local_version": values,
            "x": values,
        },
    )


def well_formed_messages(
    values: st.SearchStrategy[Any], text: st.SearchStrategy[str]
) -> st.SearchStrategy[dict]:
    """Messages the parser accepts, with arbitrary payloads where the protocol allows any."""
    data = st.dictionaries(
        st.sampled_from(["x_mm", "y_mm", "angle_deg", "uuid", "name"]) | text, values, max_size=4
    )
    finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**300), 10**300)
    move_data = st.dictionaries(st.sampled_from(["x_mm", "y_mm", "angle_deg"]), finite, max_size=3)
    op_id = st.none() | st.integers(0, 3) | st.sampled_from(["o1", "o2"])

    def with_op_id(message: dict, op: Any) -> dict:
        return message if op is None else {**message, "op_id": op}

    item_ids = st.sampled_from(["a", "b", "c"])
    command = st.one_of(
        st.builds(
            lambda i, d: {"action": "add_item", "item_type": "lens", "item_id": i, "data": d}, item_ids, data
        ),
        st.builds(lambda i, d: {"action": "update_item", "item_id": i, "data": d}, item_ids, data),
        st.builds(lambda i, d: {"action": "move_item", "item_id": i, "data": d}, item_ids, move_data),
        st.builds(lambda i: {"action": "remove_item", "item_id": i}, item_ids),
        st.builds(
            lambda a, d: {"action": a, "data": d}, text.filter(lambda a: a and a not in KNOWN_ACTIONS), values
        ),
    )
    items = st.lists(st.builds(lambda i, d: {**d, "uuid": i}, item_ids, data), max_size=3)
    return st.one_of(
        st.builds(lambda c, op: with_op_id({"type": "command", "command": c}, op), command, op_id),
        st.builds(lambda i, op: with_op_id({"type": "sync:update", "state": {"items": i}}, op), items, op_id),
        st.builds(
            lambda i, t: {
                "type": "sync:full_state",
                "state": {"items": i},
                **({} if t is None else {"target_user": t}),
            },
            items,
            st.none() | st.sampled_from(["honest", "evil", "nobody"]),
        ),
        st.builds(
            lambda since, epoch: {"type": "sync:request", "since": since, "epoch": epoch},
            st.none() | st.integers(0, 5),
            st.none() | text,
        ),
        st.builds(lambda d: {**d, "type": "cursor"}, data),
        st.just({"type": "ping"}),
    )


wild_messages = shaped_messages(wild_json, any_text) | well_formed_messages(wild_json, any_text)
relayable_messages = shaped_messages(relayable_json, st.text(max_size=20)) | well_formed_messages(
    relayable_json, st.text(max_size=20)
)

number_literals = st.builds(
    lambda sign, digits, fraction, exponent: f"{sign}{digits}{fraction}{exponent}",
    st.sampled_from(["", "-"]),
    st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
    st.sampled_from(["", ".5", ".0000001"]),
    st.sampled_from(["", "e400", "E-400", "e99999", "e+308", "e-99999999"]),
)
nesting = st.builds(
    lambda depth, opener: (
        opener * depth + ("1" if opener.endswith(":") else "") + ("]" if opener == "[" else "}") * depth
    ),
    st.integers(min_value=1, max_value=100_000),
    st.sampled_from(["[", '{"a":']),
)
invalid_utf8 = st.builds(
    lambda before, bad, after: before.encode() + bad + after.encode(),
    st.text(max_size=20),
    st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc3"]),
    st.text(max_size=20),
)


def parse(text: str) -> object:
    """decode + parse_client_message, as the server does for a text frame."""
    return parse_client_message(decode(text))


def assert_parses_or_refuses(text: str) -> object | None:
    """The contract: a typed message, or ProtocolError with a stable code and a sentence."""
    try:
        message = parse(text)
    except ProtocolError as exc:
        assert exc.code.value in PARSER_CODES
        assert isinstance(exc.message, str) and exc.message
        return None
    assert isinstance(message, (Ping, Command, SyncRequest, SyncUpdate, FullState, Cursor))
    return message


# -- the parser: a value or ProtocolError, never anything else -------------------------------


@PURE
@given(any_text)
@example("")
@example("\x00")
@example('{"type": "\\ud800"}')
@example('{"type": "cursor", "x": NaN}')
@example('{"type": "command", "command": {"action": "move_item", "item_id": "a", "data": {"x_mm": 1e999}}}')
def test_any_string_parses_or_is_refused(text: str) -> None:
    assert_parses_or_refuses(text)


@PURE
@given(wild_json)
def test_any_json_value_parses_or_is_refused(value: Any) -> None:
    message = assert_parses_or_refuses(json.dumps(value))
    if message is not None:
        assert isinstance(value, dict) and value["type"] in MESSAGE_TYPES


@PURE
@given(wild_messages)
def test_message_shaped_objects_parse_or_are_refused(value: dict[str, Any]) -> None:
    message = assert_parses_or_refuses(json.dumps(value))
    # What the parser lets through is what the session code relies on.
    if isinstance(message, Command):
        assert isinstance(message.action, str) and message.action
        assert message.data is None or isinstance(message.data, dict)
        if message.action in KNOWN_ACTIONS:
            assert isinstance(message.item_id, str) and message.item_id
        if message.action == "move_item":
            for field in ("x_mm", "y_mm", "angle_deg"):
                number = message.data.get(field)
                assert number is None or (not isinstance(number, bool) and math.isfinite(number))
        assert message.op_id is None or type(message.op_id) in (int, str)
    elif isinstance(message, (SyncUpdate, FullState)):
        for item in message.items:
            uuid = item.get("uuid", item.get("item_uuid"))
            assert isinstance(uuid, str) and uuid
    elif isinstance(message, SyncRequest):
        assert message.since is None or (type(message.since) is int and message.since >= 0)
        assert message.epoch is None or isinstance(message.epoch, str)


@PURE
@given(
    nesting,
    st.sampled_from(
        [
            "{}",
            '{{"type": "cursor", "x": {}}}',
            '{{"type": "command", "command": {{"action": "add_item", "item_id": "a", "item_type": "t", "data": {{"v": {}}}}}}}',
        ]
    ),
)
@example(100_000, "{}")
def test_deep_nesting_parses_or_is_refused(nested: str, frame: str) -> None:
    assert_parses_or_refuses(frame.format(nested))


MOVE_X = '{{"type": "command", "command": {{"action": "move_item", "item_id": "a", "data": {{"x_mm": {}}}}}}}'


def overflows_float(literal: str) -> bool:
    """An integer literal beyond float range, which math.isfinite() below can't take.

    (By length first: int() refuses more than 4300 digits.)
    """
    digits = literal.lstrip("-")
    return digits.isdigit() and (len(digits) > 309 or int(digits) > 2**1023)


@PURE
@given(
    number_literals,
    st.sampled_from(["{}", '{{"type": "ping", "n": {}}}', '{{"type": "sync:request", "since": {}}}', MOVE_X]),
)
def test_huge_numbers_parse_or_are_refused(literal: str, frame: str) -> None:
    assume(not (frame == MOVE_X and overflows_float(literal)))
    message = assert_parses_or_refuses(frame.format(literal))
    if isinstance(message, SyncRequest):
        assert type(message.since) is int
    if isinstance(message, Command):
        assert math.isfinite(message.data["x_mm"])


@PURE
@given(
    st.binary(max_size=200)
    | invalid_utf8
    | st.builds(lambda m, b: json.dumps(m).encode()[:-1] + b + b"}", relayable_messages, invalid_utf8)
)
def test_invalid_utf8_parses_or_is_refused(raw: bytes) -> None:
    assert_parses_or_refuses(raw.decode("utf-8", errors="surrogateescape"))


# -- decode agrees with the stdlib decoder it replaced -------------------------------------
#
# The reference is the decoder before orjson, with its checks made complete:
# the stdlib's json (exact integers; NaN, Infinity and numbers out of float
# range refused by hooks), then a walk of the value for nesting beyond
# MAX_DEPTH and for strings UTF-8 can't carry (lone surrogates). The new
# decode must accept exactly what it accepts, with the same values and the
# same error codes.


def _reference_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _reference_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("out of range")
    return value


def _reference_int(text: str) -> int:
    # Beyond double range Qt refuses an integer as it refuses 1e400.
    if not math.isfinite(float(text)):
        raise ValueError("out of range")
    return int(text)


_reference_decoder = json.JSONDecoder(
    parse_constant=_reference_constant, parse_float=_reference_float, parse_int=_reference_int
)


def _utf8_safe(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def reference_decode(text: str) -> tuple[str, Any]:
    """("ok", message) or ("error", code) as the stdlib-based decoder gives them."""
    try:
        value = _reference_decoder.decode(text)
    except (ValueError, RecursionError):
        return ("error", "invalid_json")
    if not _utf8_safe(text):
        return ("error", "invalid_json")
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str) and not _utf8_safe(node):
            return ("error", "invalid_json")
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                return ("error", "invalid_json")
            if isinstance(node, dict):
                stack.extend((key, depth + 1) for key in node)
                stack.extend((child, depth + 1) for child in node.values())
            else:
                stack.extend((child, depth + 1) for child in node)
    if not isinstance(value, dict):
        return ("error", "invalid_message")
    if not isinstance(value.get("type"), str):
        return ("error", "missing_type")
    return ("ok", value)


def new_decode(text: str) -> tuple[str, Any]:
    try:
        return ("ok", decode(text))
    except ProtocolError as exc:
        assert isinstance(exc.message, str) and exc.message and "\n" not in exc.message
        return ("error", exc.code.value)


def same_json(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_json(a[k], b[k]) for k in a)
    return a == b


def assert_decodes_like_the_reference(text: str) -> None:
    expected, got = reference_decode(text), new_decode(text)
    assert expected[0] == got[0], (expected, got, text[:200])
    if expected[0] == "ok":
        assert same_json(expected[1], got[1]), text[:200]
        event("accepted")
    else:
        assert expected[1] == got[1], text[:200]
        event(f"refused {got[1]}")


# Numbers of every kind: small, 64-bit edges, beyond 64 bits, beyond float range.
any_integers = (
    st.integers(-(2**70), 2**70)
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**18, 10**19])
    | st.integers(min_value=1, max_value=1200).map(lambda n: int("7" * n))
)
any_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -0.0, 0.1, 1e22, 1e23]
)
# Strings with escapes, surrogate pairs, lone surrogates (refused), brackets and quotes.
escape_pieces = st.sampled_from(
    [
        "a", "é", "😀", "[", "]", "{", "}", '"', "\\", "\\\\", '\\"', "\\n", "\\/", "\\u00e9",
        "\\ud83d\\ude00", "\\uD83D\\uDE00", "\\ud800", "\\udc00", "\\udbff\\udfff", "\\\\ud800",
        "\\ude00\\ud83d", "\\u0000", "1234567890123456789", "\\u005c",
    ]
)  # fmt: skip
string_literals = st.lists(escape_pieces, max_size=8).map(lambda parts: '"' + "".join(parts) + '"')
number_texts = st.one_of(
    any_integers.map(str),
    any_floats.map(repr),
    number_literals,
    st.builds(
        lambda m, f, e: f"{m}{f}{e}",
        st.sampled_from(["0", "-0", "1", "-1", "9" * 19, "1" * 320, "12345678901234567890"]),
        st.sampled_from(["", ".5", "." + "0" * 30 + "1", "." + "9" * 400]),
        st.sampled_from(["", "e5", "e-5", "E+308", "e309", "e-400", "e-" + "0" * 25 + "3", "e" + "1" * 20]),
    ),
)


def json_texts(leaf: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """JSON texts (and near-JSON: `leaf` may be anything) built from `leaf` values."""
    return st.recursive(
        leaf,
        lambda children: st.lists(children, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")
        | st.lists(st.tuples(string_literals, children), max_size=4).map(
            lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"
        ),
        max_leaves=12,
    )


json_leaves = st.one_of(
    number_texts,
    string_literals,
    st.sampled_from(["null", "true", "false", "NaN", "Infinity", "-Infinity", "[]", "{}"]),
)
# Frames: a value as a message field, or as the whole frame.
frames_to_decode = st.one_of(
    json_texts(json_leaves).map(lambda v: '{"type": "x", "v": ' + v + "}"),
    st.builds(lambda t, v: '{"type": ' + t + ', "v": ' + v + "}", string_literals, json_texts(json_leaves)),
    json_texts(json_leaves),
)


@PURE
@given(frames_to_decode)
@example('{"type": "x", "v": "\\ud800"}')
@example('{"type": "x", "v": "\\udc00"}')
@example('{"type": "x", "v": "\\\\ud800"}')
@example('{"type": "x", "v": "\\ud83d\\\\ude00"}')
@example('{"type": "x", "v": ' + "9" * 400 + "}")
@example('{"type": "x", "v": ' + "1" * 400 + ".5}")
@example('{"type": "x", "v": ' + "1" * 400 + "e-395}")
@example('{"type": "x", "v": 1e-' + "0" * 400 + "5}")
@example('{"type": "x", "v": [0.' + "9" * 400 + ', "' + "1" * 300 + '"]}')
def test_decode_agrees_with_the_stdlib_reference(text: str) -> None:
    assert_decodes_like_the_reference(text)


@PURE
@given(st.recursive(
    st.none() | st.booleans() | any_integers | any_floats | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=20,
), st.booleans())
def test_decode_agrees_with_the_reference_on_stdlib_written_json(value: Any, ascii_only: bool) -> None:
    # json.dumps writes lone surrogates as escapes (ensure_ascii) or raw (not).
    assert_decodes_like_the_reference(json.dumps({"type": "x", "v": value}, ensure_ascii=ascii_only))


# Nesting around the limit, with brackets and escaped quotes in strings beside it.
bracket_strings = st.lists(
    st.sampled_from(["[", "]", "{", "}", '\\"', "\\\\", "a", ",", ":"]), max_size=6
).map(lambda parts: '"' + "".join(parts) + '"')


@st.composite
def nested_frames(draw: st.DrawFn) -> tuple[str, int]:
    """A frame nested exactly `depth` levels (the message object is level 1)."""
    depth = draw(st.integers(min_value=MAX_DEPTH - 4, max_value=MAX_DEPTH + 6))
    text = draw(st.sampled_from(["1", "[]", "{}", '"x"']))
    inner_depth = 0 if text in ("1", '"x"') else 1
    for level in range(inner_depth, depth - 1):
        # Siblings two levels deep only where the value beside them is as deep.
        shallow = bracket_strings | st.just("12345678901234567890")
        deep = shallow | st.sampled_from(["[[1]]", '{"k": []}'])
        siblings = draw(st.lists(deep if level >= 2 else shallow, max_size=2))
        if draw(st.booleans()):
            text = "[" + ", ".join([*siblings, text]) + "]"
        else:
            key = draw(bracket_strings)
            fields = [f"{draw(bracket_strings)}: {sib}" for sib in siblings]
            text = "{" + ", ".join([*fields, f"{key}: {text}"]) + "}"
    return '{"type": "x", "v": ' + text + "}", depth


@settings(PURE, max_examples=100)  # each example draws some 70 levels
@given(nested_frames())
def test_nesting_depth_is_counted_exactly(frame: tuple[str, int]) -> None:
    text, depth = frame
    result = new_decode(text)
    if depth <= MAX_DEPTH:
        assert result[0] == "ok", (depth, text)
    else:
        assert result == ("error", "invalid_json"), (depth, text)
    assert_decodes_like_the_reference(text)


# -- handshake paths: a Target or HandshakeRejected ----------------------------------------

percent_escapes = st.integers(min_value=0, max_value=255).map(lambda b: f"%{b:02X}")
path_segments = st.lists(
    st.sampled_from(["a", "Ada", "%20", "%2F", "%", "%zz", "/", "?", "é"]) | percent_escapes | any_text,
    max_size=8,
).map("".join)
queries = st.lists(
    st.tuples(
        st.sampled_from(["since", "epoch", "token", "x", ""]) | any_text,
        st.sampled_from(["0", "-1", "1_0", "٣", "9" * 5000, "%FF", ""]) | any_text,
    ),
    max_size=4,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))


def assert_target_or_rejected(path: str) -> Target | None:
    try:
        target = parse_target(path)
    except HandshakeRejected as exc:
        assert exc.status in (400, 404)
        assert isinstance(exc.reason, str) and exc.reason and "\n" not in exc.reason
        return None
    assert isinstance(target, Target)
    for value in (target.session_id, target.user_id):
        assert 1 <= len(value) <= MAX_ID_LENGTH and "/" not in value
    assert target.since is None or (type(target.since) is int and target.since >= 0)
    return target


@PURE
@given(any_text)
@example("")
@example("/ws//")
@example("/ws/%ff/u")
@example("/ws/s/u?since=" + "9" * 5000)
def test_any_path_gives_a_target_or_is_rejected(path: str) -> None:
    assert_target_or_rejected(path)


@PURE
@given(
    st.sampled_from(["/ws/", "/ws", "/", "", "ws/", "/WS/"]),
    path_segments,
    path_segments,
    st.sampled_from(["", "/", "?"]),
    queries,
)
def test_shaped_paths_give_a_target_or_are_rejected(
    prefix: str, session: str, user: str, mid: str, query: str
) -> None:
    assert_target_or_rejected(f"{prefix}{session}/{user}{mid}?{query}")


# Ids that draw what they are: no controls, format characters (zero-width,
# bidi), separators other than spaces, marks (a variation selector must follow
# something drawn), nor the Hangul fillers; not only spaces.
ids = st.text(
    st.characters(
        exclude_categories=("Cc", "Cs", "Cf", "Zl", "Zp", "Mn", "Mc", "Me", "Co", "Cn"),
        exclude_characters="/\u115f\u1160\u3164\uffa0",
    ),
    min_size=1,
    max_size=MAX_ID_LENGTH,
).filter(lambda s: not s.isspace())


@PURE
@given(ids, ids, st.none() | st.integers(min_value=0, max_value=10**30))
def test_valid_ids_round_trip_through_the_path(session: str, user: str, since: int | None) -> None:
    query = "" if since is None else f"?since={since}&epoch=e1"
    target = parse_target(f"/ws/{quote(session, safe='')}/{quote(user, safe='')}{query}")
    assert (target.session_id, target.user_id, target.since) == (session, user, since)


# -- the server: whatever one client sends, the other is still served ------------------------

frames = st.one_of(
    relayable_json.map(lambda v: ("text", json.dumps(v))),
    # NaN, infinities and lone surrogates too: the server must refuse them cleanly.
    wild_json.map(lambda v: ("text", json.dumps(v))),
    shaped_messages(wild_json, any_text).map(lambda m: ("text", json.dumps(m))),
    # Twice: message-shaped frames reach the deepest server code, so weight them up.
    relayable_messages.map(lambda m: ("text", json.dumps(m))),
    relayable_messages.map(lambda m: ("text", json.dumps(m))),
    st.text(max_size=100).map(lambda s: ("text", s)),
    nesting.map(lambda s: ("text", s)),
    number_literals.map(lambda s: ("text", s)),
    st.binary(max_size=100).map(lambda b: ("binary", b)),
)
fuzz_runs = st.tuples(st.lists(frames, min_size=1, max_size=8), st.none() | invalid_utf8)


def predicted_error(kind: str, payload: str | bytes) -> str | None:
    if kind == "binary":
        return "binary_not_supported"
    try:
        parse(payload)
    except ProtocolError as exc:
        return exc.code.value
    return None


async def until(
    client: Client | RawClient, msg_type: str, seen: list[dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """Read until a message of this type (and these fields); keep the rest in `seen`."""
    with trio.fail_after(HANG):
        while True:
            if isinstance(client, RawClient):
                message = await client.next_message()
                assert isinstance(message, dict), f"connection ended: {message}"
            else:
                message = await client.recv()
            if message["type"] == msg_type and all(message.get(k) == v for k, v in fields.items()):
                return message
            seen.append(message)


SENTINEL = "end-of-fuzz/sentinel"


def final_command(item_id: str) -> dict[str, Any]:
    return {
        "type": "command",
        "command": {"action": "add_item", "item_type": "lens", "item_id": item_id, "data": {"x_mm": 1.0}},
    }


async def fuzz_scenario(fuzz: list[tuple[str, Any]], bad_utf8: bytes | None) -> None:
    listener = MemoryListener()
    config = ServerConfig(store="memory")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve, config, listeners=[listener]))
        harness = Harness(server, listener, nursery)
        evil = await raw_connect(harness, "/ws/fuzz/evil")  # first: the host, whose full state counts
        async with harness.joined("fuzz", "honest") as honest:
            await evil.expect("user:joined")
            for kind, payload in fuzz:
                if kind == "binary":
                    await evil.send_frame(OPCODE_BINARY, payload)
                else:
                    await evil.send_frame(OPCODE_TEXT, payload.encode())
            seen: list[dict[str, Any]] = []
            honest_seen: list[dict[str, Any]] = []
            if bad_utf8 is None:
                # One error per refused frame, in order; then the one for a sentinel.
                await evil.send_json({"type": SENTINEL})
                await until(evil, "error", seen, ref=SENTINEL)
                errors = [m["code"] for m in seen if m["type"] == "error" and m["code"] in PARSER_CODES]
                assert errors == [code for kind, payload in fuzz if (code := predicted_error(kind, payload))]
                # evil's well-formed command still reaches honest, from evil.
                await evil.send_json(final_command("evil-final"))
                relayed = await until(honest, "command", honest_seen, user_id="evil")
                while relayed["command"].get("item_id") != "evil-final":
                    relayed = await until(honest, "command", honest_seen, user_id="evil")
            else:
                # Invalid UTF-8 in a text frame ends that connection (1007), and only that one.
                await evil.send_frame(OPCODE_TEXT, bad_utf8)
                with trio.fail_after(HANG):
                    while isinstance(ending := await evil.next_message(), dict):
                        pass
                assert ending is None or close_code(ending) == 1007
                left = await until(honest, "user:left", honest_seen, user_id="evil")
                assert [u["user_id"] for u in left["users"]] == ["honest"]
            # honest is served as before.
            await honest.send({"type": "ping"})
            await until(honest, "pong", honest_seen)
            await honest.send(final_command("honest-final"))
            ack = await until(honest, "ack", honest_seen)
            if bad_utf8 is None:
                relayed = await until(evil, "command", seen, user_id="honest")
                assert relayed["seq"] == ack["seq"]
            assert not any(m["type"] == "error" for m in honest_seen)
        nursery.cancel_scope.cancel()


@SERVER
@given(fuzz_runs)
def test_server_keeps_serving_an_honest_client_whatever_another_sends(run: tuple[list, bytes | None]) -> None:
    fuzz, bad_utf8 = run
    for kind, payload in fuzz:
        if kind == "text":
            try:
                event(f"accepted {type(parse(payload)).__name__}")
            except ProtocolError as exc:
                event(f"refused {exc.code.value}")
    trio.run(fuzz_scenario, fuzz, bad_utf8, clock=trio.testing.MockClock(autojump_threshold=0))


# -- regressions: inputs that once broke the server ------------------------------------------

UNRELAYABLE = {
    # JSON lets "\ud800" through as a lone surrogate, which UTF-8 cannot encode.
    "lone surrogate in a cursor": r'{"type": "cursor", "x": "\ud800"}',
    "lone surrogate in a command": r'{"type": "command", "command": {"action": "add_item", "item_type": "lens", "item_id": "\udc00", "data": {}}}',
    "lone surrogate as the type": r'{"type": "\ud800"}',
    # Python's json reads 1e400 as inf, which encode() (allow_nan=False) refuses.
    "1e400 in a command": '{"type": "command", "command": {"action": "add_item", "item_type": "lens", "item_id": "a", "data": {"v": 1e400}}}',
    "1e400 in a sync:update": '{"type": "sync:update", "state": {"items": [{"uuid": "a", "v": 1e400}]}}',
    "1e400 in a cursor": '{"type": "cursor", "x": 1e400}',
    # math.isfinite() of an int beyond float range raises OverflowError in the parser.
    "400-digit x_mm in a move_item": (
        '{"type": "command", "command": {"action": "move_item", "item_id": "a", "data": {"x_mm": '
        + "9" * 400
        + "}}}"
    ),
}


@pytest.mark.parametrize("frame", list(UNRELAYABLE.values()), ids=list(UNRELAYABLE))
async def test_unsendable_values_are_refused_and_nobody_is_disconnected(
    start_server: Any, autojump_clock: trio.abc.Clock, frame: str
) -> None:
    harness = await start_server()
    async with harness.joined("s", "sender") as sender, harness.joined("s", "honest") as honest:
        await sender.expect("user:joined")
        await sender.send(frame)
        seen: list[dict[str, Any]] = []
        # Whatever the fix (refuse with an error, or escape), nobody is disconnected...
        for client in (sender, honest):
            await client.send({"type": "ping"})
            await until(client, "pong", seen)
        # ...and the stored document doesn't disconnect whoever asks for it later.
        async with harness.joined("s", "newcomer") as newcomer:
            await newcomer.send({"type": "sync:request"})
            await until(newcomer, "sync:state", seen)


def deep_command(depth: int) -> str:
    nested = "[" * depth + "]" * depth
    return (
        '{"type":"command","command":{"action":"add_item","item_type":"lens","item_id":"a","data":{"v":'
        + nested
        + "}}}"
    )


def message_type(text: str) -> str:
    """The type of a server message without parsing it (it may be nested too deep for json)."""
    assert text.startswith('{"type":"'), text[:60]
    return text[9 : text.index('"', 9)]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_json_nested_too_deep_is_refused_before_it_is_stored(store: str) -> None:
    # A real process: its stack depth, and so the exact depth that breaks, is fixed.
    with trio.fail_after(60):
        async with server_process("--store", store) as server:
            async with (
                tcp_client(server.port, "/ws/deep/honest") as honest,
                tcp_client(server.port, "/ws/deep/sender") as sender,
            ):
                assert message_type(await honest.get_message()) == "connection:ack"
                assert message_type(await sender.get_message()) == "connection:ack"
                refused_in_a_row = 0
                for depth in range(850, 1001):
                    await sender.send_message(deep_command(depth))
                    with trio.fail_after(5):
                        while (reply := message_type(await sender.get_message())) not in ("ack", "error"):
                            pass
                    refused_in_a_row = refused_in_a_row + 1 if reply == "error" else 0
                    if refused_in_a_row == 3:
                        break  # well past the decoder's limit: refused as invalid_json
                await honest.send_message('{"type":"ping"}')
                with trio.fail_after(5):
                    while message_type(await honest.get_message()) != "pong":
                        pass
            with trio.fail_after(5):
                async with tcp_client(server.port, "/ws/deep/newcomer") as newcomer:
                    assert message_type(await newcomer.get_message()) == "connection:ack"
                    await newcomer.send_message('{"type":"sync:request"}')
                    assert message_type(await newcomer.get_message()) == "sync:state"
            server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                assert await server.process.wait() == 0


# Installed in the server process through PYTHONPATH: the sqlite journal write of one op
# raises what json.dumps raises for an op nested too deep for the writer thread's stack.
STORE_FAULT = """
from collab_trio.store import sqlite

_append = sqlite.Database.append


def append(self, session_id, epoch, ops, *args, **kwargs):
    if any((op.command or {}).get("item_id") == "boom" for op in ops):
        raise RecursionError("injected: maximum recursion depth exceeded while encoding a JSON object")
    return _append(self, session_id, epoch, ops, *args, **kwargs)


sqlite.Database.append = append
"""


@pytest.mark.parametrize("fsync", ["full", "normal"])
async def test_unexpected_store_error_fails_the_commit_not_the_server(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, fsync: str
) -> None:
    """fsync full: the commit fails (not_persisted). fsync normal: the pending
    log made the change durable (acknowledged, relayed); the database
    refuses it for good, so it is kept in an unapplied file and the
    session's members reconnect to what is stored; the server serves on."""
    (tmp_path / "sitecustomize.py").write_text(STORE_FAULT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    data_dir = str(tmp_path / "data")
    boom = '{"type":"command","command":{"action":"add_item","item_type":"lens","item_id":"boom","data":{}}}'
    with trio.fail_after(60):
        async with server_process("--store", "sqlite", "--fsync", fsync, "--data-dir", data_dir) as server:
            async with tcp_client(server.port, "/ws/s/alice") as alice:
                assert message_type(await alice.get_message()) == "connection:ack"
                await alice.send_message(boom)
                with trio.fail_after(5):
                    answer = json.loads(await alice.get_message())
                if fsync == "full":
                    # Like any failed commit: refused with not_persisted, nothing relayed.
                    assert (answer["type"], answer["code"]) == ("error", "not_persisted")
                else:
                    assert (answer["type"], answer["seq"]) == ("ack", 1)
                    with trio.fail_after(5):
                        with pytest.raises(ConnectionClosed) as closed:
                            await alice.get_message()
                    assert closed.value.reason.code == 1011
                    assert closed.value.reason.reason == "a change could not be stored; reconnect"
                    await server.wait_for("Could not store an acknowledged change of session s: RecursionError", 5)
            with trio.fail_after(5):
                async with tcp_client(server.port, "/ws/s/bob") as bob:
                    assert message_type(await bob.get_message()) == "connection:ack"
            server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                assert await server.process.wait() == 0
        if fsync == "normal":
            assert not segment_numbers(Path(data_dir))  # a clean stop: nothing left to replay
            [kept] = [name for name in os.listdir(data_dir) if name.startswith(UNAPPLIED_PREFIX)]
            [(record, _)], _ = decode_records((Path(data_dir) / kept).read_bytes())
            assert record.session_id == "s" and '"item_id":"boom"' in record.ops[0]
