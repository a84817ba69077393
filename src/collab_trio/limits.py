"""Rate limiting for one connection: a token bucket, a strike count, and the
messages held over the limit that a later one makes obsolete. Pure."""

from __future__ import annotations

import attrs
import orjson


@attrs.define(eq=False)
class TokenBucket:
    """Allows `rate` messages per second on average and bursts of `burst`."""

    rate: float
    burst: float
    tokens: float = attrs.field(default=None)
    updated: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = self.burst

    def take(self, now: float) -> None:
        """Take one token, into debt if there is none (a message delivered
        whatever the rate: the messages after it wait for it)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate) - 1
        self.updated = now

    def give_back(self) -> None:
        """Return the token allow() took (its message was not delivered)."""
        self.tokens = min(self.burst, self.tokens + 1)

    def wait(self, now: float) -> float:
        """Seconds from `now` until allow() can take a token (at least a
        millisecond when it can't now: a wait too short to move the clock
        would be a busy loop)."""
        tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        return 0.0 if tokens >= 1 else max(0.001, (1 - tokens) / self.rate)

    def allow(self, now: float) -> bool:
        """Take one token if there is one."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@attrs.define(eq=False)
class Strikes:
    """Counts refusals in a sliding window; `add()` says when the limit is crossed."""

    limit: int
    window: float
    times: list[float] = attrs.field(factory=list)

    def add(self, now: float) -> bool:
        """Record one refusal; True when `limit` refusals fell within `window` seconds."""
        self.times.append(now)
        cutoff = now - self.window
        while self.times and self.times[0] <= cutoff:
            self.times.pop(0)
        return len(self.times) >= self.limit


# Held over the rate limit (HeldChanges): messages up to this size, this
# many at once, these many bytes in all. Larger or more are dropped as any
# other message over the limit.
HOLD_MESSAGE_BYTES = 16 * 1024
HOLD_KEYS = 256
HOLD_BYTES = 1024 * 1024

Key = tuple[str, str]


def superseding_key(message: str | bytes) -> tuple[Key, frozenset[str]] | None:
    """What a later message must share with `message` to make it obsolete,
    and the fields it must carry too; None if nothing does.

    A `move_item` or an `update_item` of an item (without an `op_id`: its
    sender waits for that op's ack): a later one of the same action and
    item that carries at least the same `data` fields holds every value this
    one would set (Optiverse sends the whole item each time). A `cursor`:
    the sender's next cursor. Read only for messages over the rate limit,
    of at most HOLD_MESSAGE_BYTES.
    """
    if not isinstance(message, str) or len(message) > HOLD_MESSAGE_BYTES:
        return None
    try:
        value = orjson.loads(message)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict) or "op_id" in value:
        return None
    kind = value.get("type")
    if kind == "cursor":
        return ("cursor", ""), frozenset()
    if kind != "command":
        return None
    command = value.get("command")
    if not isinstance(command, dict):
        return None
    action, item_id, data = command.get("action"), command.get("item_id"), command.get("data")
    if action not in ("move_item", "update_item") or not isinstance(item_id, str) or not isinstance(data, dict):
        return None
    return (action, item_id), frozenset(data)


@attrs.define(eq=False)
class HeldChanges:
    """A connection's messages over the rate limit that a later message may
    make obsolete (superseding_key): kept in arrival order, each replaced
    in its place by a later one of its key, and delivered as the rate
    allows, instead of being dropped. So a stock client's multi-select drag
    (a move and an update of every selected item at each mouse event) is
    thinned to the rate, and its last positions arrive."""

    max_keys: int = HOLD_KEYS
    max_bytes: int = HOLD_BYTES
    # By key, in arrival order: the message and its `data` fields.
    entries: dict[Key, tuple[str | bytes, frozenset[str]]] = attrs.field(factory=dict)
    size: int = 0
    # Messages made obsolete while held.
    superseded: int = 0

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def hold(self, key: Key, fields: frozenset[str], message: str | bytes) -> bool:
        """Hold `message` (in the place of the one of its key, if held);
        False if it can't be: the one of its key held has a field `message`
        lacks (a value would be lost: deliver what is held first), or holding
        it would pass max_keys or max_bytes."""
        earlier = self.entries.get(key)
        size = len(message)
        if earlier is not None:
            if not earlier[1] <= fields:
                return False
            if self.size - len(earlier[0]) + size > self.max_bytes:
                return False
            self.size += size - len(earlier[0])
            self.entries[key] = (message, fields)  # keeps its place
            self.superseded += 1
            return True
        if len(self.entries) >= self.max_keys or self.size + size > self.max_bytes:
            return False
        self.entries[key] = (message, fields)
        self.size += size
        return True

    def pop(self) -> str | bytes:
        """The first message held, taken."""
        key = next(iter(self.entries))
        message, _ = self.entries.pop(key)
        self.size -= len(message)
        return message

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0
