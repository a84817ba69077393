"""Wire protocol v1: handshake paths, client messages, server messages, close codes.

Pure: no trio, no I/O. Everything here is tested without an event loop.
See PROTOCOL.md for the contract this module implements.
"""

from __future__ import annotations

import enum
import functools
import gc
import json
import math
import operator
import re
import time
import unicodedata
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, unquote

import attrs
import orjson

PROTOCOL_VERSION = 1
MAX_ID_LENGTH = 64
ENDPOINT_TEMPLATE = "/ws/{session_id}/{user_id}"
# `/t/TOKEN/ws/...`: a token as a path segment before "ws", for clients that
# can only be given a server URL (Optiverse appends /ws/{session}/{user}).
TOKEN_SEGMENT = "t"

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
    # The session moved to another node (postgres store): reconnect.
    SERVICE_RESTART = 1012
    TOO_SLOW = 1013
    # The same code: another node serves the session; retry (postgres store).
    TRY_AGAIN_LATER = 1013
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
    ITEM_REMOVED = "item_removed"


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
#
# Every frame is decoded and validated at C speed: orjson parses, and the
# guarantees orjson does not give are added with byte operations that never
# walk the parsed value (a 1 MiB frame of small values costs milliseconds):
#
# - nesting: orjson refuses input nested deeper than its own fixed limit
#   (1024, measured at import). A frame with more than MAX_DEPTH brackets is
#   parsed inside `limit - MAX_DEPTH` extra arrays, so orjson's limit is ours;
# - exact integers: orjson reads integers beyond 64 bits as floats. A frame
#   with a run of 19 or more digits (anywhere, strings included) takes its
#   values from the stdlib decoder, after orjson has checked it;
# - orjson already refuses NaN, Infinity, numbers beyond float range (1e400)
#   and lone surrogates, escaped ("\ud800", "\udc00") or not.

# Deepest nesting of arrays and objects accepted. Optiverse items are a few
# levels deep; the limit keeps every accepted message far from Python's
# recursion limit when it is encoded again for relaying and storing.
MAX_DEPTH = 64


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; a strict peer (Qt's QJsonDocument) refuses them.
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 reads as inf, which no peer can be sent back as JSON.
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _parse_int(text: str) -> int:
    # Beyond double range (from 309 digits on) Qt's QJsonDocument refuses
    # an integer just as it refuses 1e400: the whole message would be lost.
    if len(text) >= 309 and not math.isfinite(float(text)):
        raise ValueError(f"number {text[:20]}... is out of range")
    return int(text)


# The stdlib decoders, for frames with long digit runs only: exact integers.
# Floats as checked by orjson need no hook; `_checked_decoder` is for frames
# whose huge numbers orjson could not read (see _validate).
_exact_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_checked_decoder = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_parse_float, parse_int=_parse_int
)
_stdlib_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))

# Byte masks, made with one bytes.translate: digits become "0", all else " ".
_DIGIT_MASK = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
# 19 digits can exceed a signed 64-bit integer (orjson would give a float).
_LONG_DIGITS = b"0" * 19
# From about 309 digits a number is beyond float range, which orjson refuses
# even for an integer (the stdlib reads it exactly); such runs are shortened
# before orjson checks the frame.
_HUGE_DIGITS = b"0" * 300
_KEPT_DIGITS = 18


def _orjson_depth_limit() -> tuple[int | None, str | None]:
    """The deepest nesting orjson.loads accepts (None if it has no usable
    limit), and how its error message for deeper input begins."""

    def error(depth: int) -> str | None:
        try:
            orjson.loads(b"[" * depth + b"]" * depth)
        except orjson.JSONDecodeError as exc:
            return str(exc)
        return None

    low, high = MAX_DEPTH, 1 << 16  # low must parse, high must not
    refusal = error(high)
    if error(low) is not None or refusal is None:
        return None, None
    while high - low > 1:
        middle = (low + high) // 2
        if error(middle) is None:
            low = middle
        else:
            high = middle
    # "depth limit exceeded: line 1 column 1026 (char 1025)": the part before the position.
    return low, refusal.partition(":")[0]


_ORJSON_DEPTH, _ORJSON_TOO_DEEP = _orjson_depth_limit()
# Arrays around a frame so that orjson refuses exactly what is deeper than MAX_DEPTH.
_PADDING = 0 if _ORJSON_DEPTH is None else _ORJSON_DEPTH - MAX_DEPTH
_PAD_OPEN, _PAD_CLOSE, _UNPAD = b"[" * _PADDING, b"]" * _PADDING, (0,) * _PADDING

_TOO_DEEP = f"message is nested deeper than {MAX_DEPTH} levels"


def loads(data: bytes | str, *, containers: int = 0) -> Any:
    """orjson.loads with the cyclic garbage collector paused.

    Every array and object built counts towards the collector's next run,
    and each run walks the objects already alive: parsing 70k of them in a
    process that holds a few large documents cost 5-8 times the parse itself
    (60 ms instead of 8). The parse creates no cycles and holds the GIL
    throughout, so pausing the collector for it changes nothing else.

    `containers`: how many arrays and objects the text holds (counted by the
    caller); at least FREEZE_CONTAINERS, and what was parsed is left out of
    the collector's generations (see _leave_out_of_collections).
    """
    if not gc.isenabled():
        return orjson.loads(data)
    gc.disable()
    try:
        value = orjson.loads(data)
        if containers >= FREEZE_CONTAINERS:
            _leave_out_of_collections(containers)
        return value
    finally:
        gc.enable()


# A message of at least this many arrays and objects is left out of the
# collector's generations once parsed.
FREEZE_CONTAINERS = 8192
# The next release is due once the containers frozen since the last one
# reach a quarter of the objects alive (and frozen again) at it, CPython's
# own rule for full collections, and at least this many.
RELEASE_AFTER_CONTAINERS = 1 << 20


@attrs.define
class _Frozen:
    """What _leave_out_of_collections() froze since its last release."""

    containers: int = 0
    alive_at_release: int = 0
    releases: int = 0


_frozen = _Frozen()


def _leave_out_of_collections(containers: int) -> None:
    """Freeze every object the collector tracks (the message just parsed
    among them); release and collect them all once enough was frozen.

    Each array and object of a message that stays (a big item's data, a
    canvas uploaded whole) was walked by the collector at least three times:
    when it was young, when it was middle-aged, and at every full collection
    after. A 1 MiB command of 70k arrays cost ~4 ms at the first walk and
    ~10 at the second, on top of its parse (~15). Frozen
    (gc.freeze(): nothing is copied, reference counting still frees them),
    it is walked only when the frozen objects are released: unfrozen, one
    full collection, frozen again, once the containers frozen since the last
    release reach a quarter of what was alive then (at least
    RELEASE_AFTER_CONTAINERS). Cyclic garbage frozen with them waits for that
    release.
    """
    frozen = _frozen
    frozen.containers += containers
    if frozen.containers >= max(RELEASE_AFTER_CONTAINERS, frozen.alive_at_release // 4):
        gc.unfreeze()
        gc.collect()
        frozen.alive_at_release, frozen.containers = 0, 0
        frozen.releases += 1
        gc.freeze()
        frozen.alive_at_release = gc.get_freeze_count()
    else:
        gc.freeze()


def _invalid(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_JSON, reason)


def _not_json(exc: Exception) -> ProtocolError:
    return _invalid(f"message is not valid JSON: {exc}")


def _validate(data: bytes, deep: bool, containers: int = 0) -> Any:
    """orjson's parse of `data` (nesting checked when `deep`), or ProtocolError.
    `containers`: its arrays and objects (see loads)."""
    if not deep:
        try:
            return loads(data)
        except orjson.JSONDecodeError as exc:
            raise _not_json(exc) from None
    if _ORJSON_DEPTH is None:
        try:
            value = loads(data, containers=containers)
        except orjson.JSONDecodeError as exc:
            raise _not_json(exc) from None
        if nested_deeper_than(data, MAX_DEPTH):
            raise _invalid(_TOO_DEEP)
        return value
    try:
        padded = loads(_PAD_OPEN + data + _PAD_CLOSE, containers=containers)
    except orjson.JSONDecodeError:
        # The frame alone says what is wrong; if it parses, only the depth was.
        try:
            loads(data)
        except orjson.JSONDecodeError as exc:
            if str(exc).startswith(_ORJSON_TOO_DEEP):
                raise _invalid(_TOO_DEEP) from None  # deeper than orjson's limit too
            raise _not_json(exc) from None
        raise _invalid(_TOO_DEEP) from None
    return functools.reduce(operator.getitem, _UNPAD, padded)


def _shorten_huge_numbers(data: bytes, mask: bytes) -> tuple[bytes, bool]:
    """`data` with every run of _HUGE_DIGITS or more digits cut to its first 18,
    and whether any such run may belong to a float literal.

    The result is valid JSON exactly when `data` is (a leading zero stays
    first, fractions and exponents keep digits), with the same nesting and
    strings that differ only in digits; no number in it is beyond float
    range unless the same number in `data` is. A run next to ".", "e" or
    "E" (or "e+", "e-") may be part of a float, which the stdlib then has to
    check for range itself (a run in a string may be taken for one: slower,
    never wrong).
    """
    parts = []
    start = 0
    in_float = False
    run = mask.find(_HUGE_DIGITS)
    while run != -1:
        end = mask.find(b" ", run)
        if end == -1:
            end = len(mask)
        before = data[max(run - 2, 0) : run]
        in_float = (
            in_float
            or data[end : end + 1] in _FLOAT_AFTER
            or before[-1:] in _FLOAT_BEFORE
            or before in _EXPONENT_SIGNS
        )
        parts.append(data[start : run + _KEPT_DIGITS])
        start = end
        run = mask.find(_HUGE_DIGITS, end)
    parts.append(data[start:])
    return b"".join(parts), in_float


# What may surround the digits of a float literal.
_FLOAT_AFTER = (b".", b"e", b"E")
_FLOAT_BEFORE = (b".", b"e", b"E")
_EXPONENT_SIGNS = (b"e+", b"e-", b"E+", b"E-")


_STRING_LITERAL = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SQUARE = bytes.maketrans(b"{}", b"[]")


def nested_deeper_than(data: bytes, limit: int) -> bool:
    """Whether valid JSON `data` nests arrays and objects deeper than `limit`.

    Byte operations only (no parsed value): strings dropped, brackets kept,
    then innermost pairs removed `limit` times. Used only when orjson has
    no depth limit of its own: much slower than the padding in the worst
    case (about 0.1 s of CPU for a 1 MiB frame of depth-64 groups).
    """
    brackets = _STRING_LITERAL.sub(b"", data).translate(_SQUARE, _NOT_BRACKETS)
    if b"[" * (limit + 1) in brackets:
        return True
    for done in range(limit):
        # What is left is at most len/2 deep (and `done` levels are gone).
        if len(brackets) // 2 + done <= limit:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


# Arrays and objects are what parsing costs (an empty one takes ~0.1-0.2 us
# to build and free; a number or short string a tenth of that): a message
# may hold MAX_CONTAINERS_FREE of them plus one per CONTAINER_BYTES bytes,
# so decoding any message costs about one C-speed pass over its bytes. Real
# items (Optiverse's path points are the densest, ~20 bytes each) are
# below; 1 MiB of `{}` (350k objects, ~70 ms of CPU) is refused at once.
# Counted as `[` and `{` bytes, strings included: telling strings apart
# would take a scan that a crafted message (a long run of `\"`) makes slow,
# and no real message holds that many brackets in its text.
MAX_CONTAINERS_FREE = 4096
CONTAINER_BYTES = 16


def _utf8(text: str | bytes) -> bytes:
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            # Only a Python str can hold one (a text frame is valid UTF-8).
            raise _invalid("message contains a lone UTF-16 surrogate") from None
    return bytes(text)


def parse_json(text: str | bytes) -> Any:
    """Decode one JSON text as decode() does, without the message checks.

    Exact integers, finite numbers only, no lone surrogates, at most
    MAX_DEPTH levels of nesting.

    Raises:
        ProtocolError: INVALID_JSON, with a one-line reason.
    """
    data = _utf8(text)
    containers = data.count(b"[") + data.count(b"{")
    deep = containers > MAX_DEPTH
    limit = MAX_CONTAINERS_FREE + len(data) // CONTAINER_BYTES
    if containers > limit:
        raise _invalid(
            f"message has more than {limit} arrays and objects"
            f" (at most {MAX_CONTAINERS_FREE} plus one per {CONTAINER_BYTES} bytes)"
        )
    mask = data.translate(_DIGIT_MASK)
    if _LONG_DIGITS not in mask:
        return _validate(data, deep, containers)
    # A number may need more than 64 bits: orjson checks, the stdlib reads.
    decoder = _exact_decoder
    try:
        _validate(data, deep)
    except ProtocolError:
        if _HUGE_DIGITS not in mask:
            raise
        # orjson can't read a number beyond float range, even an integer.
        shortened, in_float = _shorten_huge_numbers(data, mask)
        _validate(shortened, deep)
        decoder = _checked_decoder  # a number orjson did not see whole
    try:
        return decoder.decode(text if isinstance(text, str) else data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError: a float out of range, or an integer beyond Python's
        # 4300-digit conversion limit.
        raise _not_json(exc) from None


def encode_bytes(message: dict[str, Any]) -> bytes:
    """Encode one server message as the UTF-8 payload of a text frame.

    Compact, non-ASCII characters as themselves. orjson writes a non-finite
    float as null, so the output is always strict JSON; none can reach here
    anyway (decode() and the store refuse them). Integers beyond 64 bits,
    and anything else orjson can't write (non-string keys, nesting beyond
    its limit), go through the stdlib encoder.

    Raises:
        TypeError: a value that is not JSON data.
        ValueError: a lone surrogate, or a non-finite float where the stdlib
            encoder was needed.
    """
    try:
        return orjson.dumps(message)
    except orjson.JSONEncodeError:
        return _stdlib_encoder.encode(message).encode("utf-8")


def encode(message: dict[str, Any]) -> str:
    """Encode one server message as the text of a text frame (see encode_bytes)."""
    try:
        return orjson.dumps(message).decode("utf-8")
    except orjson.JSONEncodeError:
        return _stdlib_encoder.encode(message)


def decode(text: str | bytes) -> dict[str, Any]:
    """Decode a text frame (str, or its UTF-8 bytes) into a message object with a string `type`.

    Raises:
        ProtocolError: for invalid JSON (see parse_json), a non-object, or a missing `type`.
    """
    value = parse_json(text)
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
    """ISO 8601 UTC timestamp with millisecond precision (now, by default)."""
    if now is not None:
        return now.isoformat(timespec="milliseconds")
    second, milli = divmod(time.time_ns() // 1_000_000, 1000)
    return f"{_second_stamp(second)}.{milli:03d}+00:00"


@functools.lru_cache(maxsize=4)
def _second_stamp(second: int) -> str:
    # Every op, ack and pong is stamped: the date and time of the second are
    # formatted once per second, not once per stamp (~3 us each).
    return datetime.fromtimestamp(second, timezone.utc).isoformat(timespec="seconds")[: -len("+00:00")]


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


# Characters an id must not contain besides controls (Cc), format characters
# (Cf: zero-width, bidi controls, BOM, tags...), line and paragraph separators
# (Zl, Zp) and surrogates (Cs): the rest of Unicode's default-ignorable code
# points, which render as nothing (fillers, variation selectors out of place).
_INVISIBLE = frozenset(
    {0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180E, 0x180F, 0x3164, 0xFFA0}
    | set(range(0x2060, 0x2070))
    | set(range(0xFFF0, 0xFFF9))
    | set(range(0xE0000, 0xE1000))
)
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
ZERO_WIDTH_JOINER = "\u200d"
# Emoji tag sequences (the flags of England, Scotland, Wales): a black flag,
# tag letters or digits, a cancel tag.
_BLACK_FLAG = "\U0001f3f4"
_TAG_CHARACTERS = frozenset(chr(c) for c in (*range(0xE0030, 0xE003A), *range(0xE0061, 0xE007B)))
_CANCEL_TAG = "\U000e007f"


def _variation_selector(ch: str) -> bool:
    return "\ufe00" <= ch <= "\ufe0f" or "\U000e0100" <= ch <= "\U000e01ef"


def _skin_tone(ch: str) -> bool:
    return "\U0001f3fb" <= ch <= "\U0001f3ff"


def _emoji_before(value: str, index: int) -> bool:
    """Whether an emoji (a symbol, with its variation selector or skin tone) ends before `index`."""
    index -= 1
    while index >= 0 and (_variation_selector(value[index]) or _skin_tone(value[index])):
        index -= 1
    return index >= 0 and unicodedata.category(value[index]) == "So"


def _invisible_at(value: str) -> int | None:
    """Index of the first character that makes `value` look like another id, or None.

    Refused: controls, format characters (zero-width spaces and joiners,
    bidi controls, the BOM...), line and paragraph separators, surrogates
    and the other default-ignorable code points. Allowed where they are part
    of what is drawn: a variation selector after a visible character (❤️,
    1️⃣), a zero-width joiner between emoji (👩‍💻, 🏳️‍🌈), tags in a
    flag tag sequence (🏴󠁧󠁢󠁳󠁣󠁴󠁿).
    """
    index = 0
    length = len(value)
    while index < length:
        ch = value[index]
        code = ord(ch)
        if _variation_selector(ch):
            # After something drawn, not after a space or another selector.
            # (Whatever came before is already known not to be invisible.)
            if index == 0 or value[index - 1].isspace() or _variation_selector(value[index - 1]):
                return index
        elif ch == ZERO_WIDTH_JOINER:
            following = value[index + 1 : index + 2]
            if not (_emoji_before(value, index) and following and unicodedata.category(following) == "So"):
                return index
        elif ch == _BLACK_FLAG and value[index + 1 : index + 2] in _TAG_CHARACTERS:
            end = index + 1
            while end < length and value[end] in _TAG_CHARACTERS:
                end += 1
            if value[end : end + 1] != _CANCEL_TAG:
                return index + 1  # tags that are not a flag: hidden text
            index = end  # the cancel tag is skipped below
        elif code in _INVISIBLE or unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return index
        index += 1
    return None


def _describe_character(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X} {name}".rstrip()


def check_id(value: str, what: str) -> str:
    """Check an already decoded session or user id.

    Valid: 1-64 characters, not only spaces, no "/", nothing invisible that
    would make two ids look the same (see _invisible_at). Letters of any
    script, digits, punctuation, symbols, emoji and spaces are fine.

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
    if value.isascii():
        if not value.isprintable():
            raise HandshakeRejected(400, f"{what} must not contain control characters")
    else:
        index = _invisible_at(value)
        if index is not None:
            ch = value[index]
            category = unicodedata.category(ch)
            if category == "Cc":
                raise HandshakeRejected(400, f"{what} must not contain control characters")
            if category == "Cs":
                raise HandshakeRejected(400, f"{what} is not valid Unicode (a lone surrogate)")
            raise HandshakeRejected(
                400,
                f"{what} must not contain invisible or formatting characters"
                f" ({_describe_character(ch)} at position {index + 1})",
            )
    if value.isspace():
        raise HandshakeRejected(400, f"{what} is only spaces")
    return value


def endpoint_template(base_path: str = "") -> str:
    """The endpoint's path as the docs and the startup lines show it."""
    return f"{base_path}{ENDPOINT_TEMPLATE}"


def _path_segments(raw_path: str, base_path: str) -> tuple[str | None, list[str]] | None:
    """(the raw token segment or None, the segments from "ws" on), or None for another path.

    `base_path` is normalised ("" or "/a/b", see config.normalize_base_path).
    Empty segments before "ws" are skipped: Optiverse appends "/ws/..." to
    its server URL, so a URL typed with a trailing slash gives "//ws/...".
    """
    if base_path:
        if not raw_path.startswith(base_path + "/"):
            return None
        raw_path = raw_path[len(base_path):]
    if not raw_path.startswith("/"):
        return None
    segments = raw_path.split("/")[1:]
    index = 0
    token = None
    while index < len(segments) and segments[index] == "":
        index += 1
    if segments[index : index + 1] == [TOKEN_SEGMENT] and index + 1 < len(segments):
        token = segments[index + 1]
        index += 2
        while index < len(segments) and segments[index] == "":
            index += 1
    return token, segments[index:]


def parse_target(path: str, base_path: str = "") -> Target:
    """Parse `{base}[/t/TOKEN]/ws/{session_id}/{user_id}[?since=N&epoch=E&token=T]`.

    Raises:
        HandshakeRejected: 404 for another path, 400 for a bad id or parameter.
    """
    raw_path, _, query = path.partition("?")
    found = _path_segments(raw_path, base_path)
    # "ws/a/b" splits into ["ws", "a", "b"]; a trailing slash adds "".
    if found is None or len(found[1]) != 3 or found[1][0] != "ws":
        raise HandshakeRejected(404, f"unknown path; connect to {endpoint_template(base_path)}")
    raw_token, (_, raw_session, raw_user) = found
    path_token = None
    if raw_token is not None:
        try:
            path_token = unquote(raw_token, errors="strict")
        except UnicodeDecodeError:
            raise HandshakeRejected(400, "token is not valid UTF-8 after percent-decoding") from None
        if not path_token:
            raise HandshakeRejected(400, "token is empty")
    session_id = validate_id(raw_session, "session id")
    user_id = validate_id(raw_user, "user id")
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
        # The path segment first: the form stock Optiverse can send.
        token=path_token if path_token is not None else params.get("token"),
    )


# ---------------------------------------------------------------------------
# Client messages


@attrs.frozen
class Ping:
    """`ping`: the application heartbeat."""


@attrs.define(unsafe_hash=True)  # a value: never changed (see "Per-change objects", ARCHITECTURE.md)
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
    """`sync:request`: ask for the session state, or the ops since a version.

    `stock`: sent as stock Optiverse sends it (with a `user_id` field, no
    `since`), which takes a `null` state for "keep your canvas" and any other
    as the state to load (see SessionCore's canvas probe). `empty_state`:
    answer a never-written session with an empty state, not `null` (the
    server's own request, never parsed).
    """

    since: int | None = None
    epoch: str | None = None
    stock: bool = False
    empty_state: bool = False


@attrs.frozen
class SyncUpdate:
    """`sync:update`: replace the whole session document."""

    items: list[dict[str, Any]]
    op_id: Any = None


@attrs.frozen
class FullState:
    """`sync:full_state`: a host's full state, forwarded (to `target_user` if given,
    None meaning everyone; "" is kept, and names no user)."""

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
                # Present means a number: a null would be stored and relayed
                # as the position (Optiverse's setPos(None, None) raises).
                if data and field in data and not _is_finite_number(data[field]):
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
    return SyncRequest(since=since, epoch=epoch, stock=since is None and "user_id" in message)


def _parse_full_state(message: dict[str, Any]) -> FullState:
    ref = "sync:full_state"
    items = _parse_state_items(message, ref)
    # "" names nobody (no user id is empty): the session answers unknown_user,
    # rather than sending the state to everyone.
    target = _optional_str(message, "target_user", ErrorCode.INVALID_MESSAGE, ref)
    return FullState(raw=message, items=items, target_user=target)


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
