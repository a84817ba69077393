"""CPU cost of decoding and validating client frames, and of encoding server messages.

Prints CPU milliseconds (time.process_time, best of several runs) per 1 MiB
frame for the frames a hostile or careless client can send, and microseconds
for ordinary Optiverse messages; "old" is the stdlib-based decoder this
module replaced (kept below for the comparison), "new" is
collab_trio.protocol. Each figure is decode + parse_client_message, and
includes freeing the parsed value.

The last table is the store's share: encoding and loading the snapshot of
a 100k-item document in the writer thread, with the longest time the event
loop (here: a thread that wakes every millisecond) waited for the GIL.

    python benchmarks/validation_cpu.py [--repeat 5] [--items 100000]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from collab_trio.store.database import decode_items, encode_items
from collab_trio.protocol import (
    MAX_DEPTH,
    ErrorCode,
    ProtocolError,
    decode,
    encode,
    encode_bytes,
    parse_client_message,
)

MIB = 1 << 20

# -- the decoder before orjson (stdlib json, then a walk of the parsed value) ------------


def _old_reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _old_parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


_old_decoder = json.JSONDecoder(parse_constant=_old_reject_constant, parse_float=_old_parse_float)
_old_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _old_check_structure(value: Any, text: str) -> None:
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
            raise ProtocolError(ErrorCode.INVALID_JSON, "too deep")
        for key, child in children:
            for string in (key, child):
                if surrogates and isinstance(string, str):
                    try:
                        string.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ProtocolError(ErrorCode.INVALID_JSON, "lone surrogate") from None
            stack.append((child, depth + 1))


def old_decode(text: str) -> dict[str, Any]:
    try:
        value = _old_decoder.decode(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, str(exc)) from None
    _old_check_structure(value, text)
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "not a message")
    return value


def old_encode(message: dict[str, Any]) -> str:
    return _old_encoder.encode(message)


# -- frames ---------------------------------------------------------------------------------


def fill(prefix: str, unit: str, suffix: str, size: int = MIB) -> str:
    """prefix + unit, unit, ... + suffix, about `size` characters long."""
    count = max(1, (size - len(prefix) - len(suffix)) // (len(unit) + 1))
    return prefix + ",".join([unit] * count) + suffix


def nested(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


ITEM = {
    "uuid": "3f2b9c1e-7a44-4c1e-9a55-0c1d2e3f4a5b",
    "item_type": "lens",
    "x_mm": 125.5,
    "y_mm": -40.25,
    "angle_deg": 90.0,
    "efl_mm": 100.0,
    "object_height_mm": 25.4,
    "name": "Lens f=100 mm",
    "z_value": 3,
    "locked": False,
}

# Inside a command: the message is depth 1, command 2, data 3, the list 4.
COMMAND = '{"type":"command","command":{"action":"annotate","data":{"v":['
BIG_FRAMES: dict[str, str] = {
    "350k {} in a command": fill(COMMAND, "{}", "]}}}"),
    "ping with an array of small ints": fill('{"type":"ping","v":[', "7", "]}"),
    "ping with one long string": '{"type":"ping","v":"' + "x" * (MIB - 30) + '"}',
    "long string of escapes": '{"type":"ping","v":"' + "\\u00e9\\n" * ((MIB - 30) // 8) + '"}',
    "emoji as surrogate-pair escapes": '{"type":"ping","v":"' + "\\ud83d\\ude00" * ((MIB - 30) // 12) + '"}',
    "depth-64 groups (the limit)": fill(COMMAND, nested(MAX_DEPTH - 4), "]}}}"),
    "depth-65 nesting (refused)": COMMAND + nested(MIB // 2 - 40) + "]}}}",
    "ints + one 20-digit int (exact path)": fill('{"type":"ping","n":12345678901234567890,"v":[', "7", "]}"),
    "floats + one 400-digit int (exact path)": fill(
        '{"type":"ping","n":' + "9" * 400 + ',"v":[', "1.5", "]}"
    ),
    "sync:update, 1 MiB of Optiverse items": json.dumps(
        {
            "type": "sync:update",
            "state": {"items": [dict(ITEM, uuid=f"item-{i}") for i in range(MIB // len(json.dumps(ITEM)))]},
        }
    ),
}

SMALL_FRAMES: dict[str, str] = {
    "ping": json.dumps({"type": "ping", "user_id": "alice"}),
    "add_item (Optiverse)": json.dumps(
        {
            "type": "command",
            "command": {"action": "add_item", "item_type": "lens", "item_id": ITEM["uuid"], "data": ITEM},
            "timestamp": "2026-11-26T10:00:00.123456",
            "user_id": "Ada Lovelace",
        }
    ),
    "move_item (Optiverse)": json.dumps(
        {
            "type": "command",
            "command": {
                "action": "move_item",
                "item_type": "lens",
                "item_id": ITEM["uuid"],
                "data": dict(ITEM, x_mm=130.0),
            },
            "timestamp": "2026-11-26T10:00:00.123456",
            "user_id": "Ada Lovelace",
        }
    ),
    "cursor": json.dumps({"type": "cursor", "x": 1.5, "y": 2.0}),
    "sync:request (Optiverse)": json.dumps(
        {"type": "sync:request", "local_version": 4, "timestamp": "2026-11-26T10:00:00"}
    ),
}


def relayed(frame: str) -> dict[str, Any]:
    """A server message carrying a client's (valid) command, as relayed."""
    message = json.loads(frame)
    return {"type": "command", "command": message.get("command"), "user_id": "bob", "seq": 7, "timestamp": "t"}


# -- measuring ------------------------------------------------------------------------------


def cpu(fn: Callable[[], Any], repeat: int, number: int = 1) -> float:
    """Best CPU seconds per call of fn over `repeat` rounds of `number` calls."""
    best = math.inf
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(number):
            fn()
        best = min(best, (time.process_time() - start) / number)
    return best


def receive(decoder: Callable[[str], Any], frame: str) -> Callable[[], str]:
    def run() -> str:
        try:
            parse_client_message(decoder(frame))
        except ProtocolError as exc:
            return f"refused {exc.code.value}"
        return "accepted"

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds per figure (the best counts)")
    parser.add_argument("--items", type=int, default=100_000, help="items of the stored document")
    args = parser.parse_args()

    print(f"Decode + validate, CPU ms per frame of about 1 MiB (best of {args.repeat})")
    print(f"{'frame':44} {'bytes':>8} {'old ms':>8} {'new ms':>8}  outcome (new)")
    for name, frame in BIG_FRAMES.items():
        new = receive(decode, frame)
        old = receive(old_decode, frame)
        outcome = new()
        print(
            f"{name:44} {len(frame.encode()):>8} {cpu(old, args.repeat) * 1e3:8.1f}"
            f" {cpu(new, args.repeat) * 1e3:8.1f}  {outcome}"
        )

    print()
    print("Ordinary messages, CPU µs each")
    print(f"{'frame':44} {'bytes':>8} {'old µs':>8} {'new µs':>8}")
    for name, frame in SMALL_FRAMES.items():
        new, old = receive(decode, frame), receive(old_decode, frame)
        print(
            f"{name:44} {len(frame):>8} {cpu(old, args.repeat, 2000) * 1e6:8.2f}"
            f" {cpu(new, args.repeat, 2000) * 1e6:8.2f}"
        )

    print()
    print("Encode a server message: CPU per message (old: stdlib str; new: encode() str / encode_bytes())")
    print(f"{'message':44} {'bytes':>8} {'old':>9} {'new str':>9} {'new bytes':>9}")
    encodes = {
        "relayed add_item (µs)": (relayed(SMALL_FRAMES["add_item (Optiverse)"]), 1e6, 2000),
        "pong (µs)": ({"type": "pong", "timestamp": "2026-11-26T10:00:00.000+00:00"}, 1e6, 2000),
        "sync:state, 1 MiB of items (ms)": (
            {"type": "sync:state", "state": json.loads(BIG_FRAMES["sync:update, 1 MiB of Optiverse items"])["state"]},
            1e3,
            1,
        ),
        "relay of 350k {} (ms)": (relayed(BIG_FRAMES["350k {} in a command"]), 1e3, 1),
    }
    for name, (message, scale, number) in encodes.items():
        size = len(encode_bytes(message))
        figures = [
            cpu(lambda: fn(message), args.repeat, number) * scale for fn in (old_encode, encode, encode_bytes)
        ]
        print(f"{name:44} {size:>8} " + " ".join(f"{f:9.2f}" for f in figures))

    print()
    store_table(args.items, args.repeat)


def longest_stall(work: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds of work() in a thread, longest gap between 1 ms wake-ups meanwhile)."""
    done = threading.Event()
    took: list[float] = []

    def run() -> None:
        start = time.perf_counter()
        work()
        took.append(time.perf_counter() - start)
        done.set()

    thread = threading.Thread(target=run)
    longest, last = 0.0, time.perf_counter()
    thread.start()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    thread.join()
    return took[0], longest


def store_table(count: int, repeat: int) -> None:
    items = [dict(ITEM, uuid=f"item-{i:06d}", x_mm=i * 0.5, z_value=i) for i in range(count)]
    old_text = json.dumps(items, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    new_text = encode_items(items)
    print(f"Store: snapshot of {count} items ({len(new_text.encode()) / MIB:.1f} MiB), in a thread")
    print(f"{'':44} {'CPU ms':>8} {'wall ms':>8} {'longest stall ms':>17}")
    rows = {
        "encode, old (json.dumps)": lambda: json.dumps(items, ensure_ascii=False, allow_nan=False, separators=(",", ":")),
        "encode, new (encode_items)": lambda: encode_items(items),
        "load, old (json.loads)": lambda: json.loads(old_text),
        "load, new (decode_items)": lambda: decode_items(new_text),
        "load, new, a snapshot written by the old code": lambda: decode_items(old_text),
    }
    for name, work in rows.items():
        figures = [longest_stall(work) for _ in range(max(1, repeat // 2))]
        wall = min(f[0] for f in figures)
        stall = min(f[1] for f in figures)
        print(f"{name:44} {cpu(work, max(1, repeat // 2)) * 1e3:8.1f} {wall * 1e3:8.1f} {stall * 1e3:17.1f}")


if __name__ == "__main__":
    main()
