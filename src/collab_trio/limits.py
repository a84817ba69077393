"""Rate limiting for one connection: a token bucket, a strike count, and the
messages held over the limit that a later one makes obsolete. Pure."""

from __future__ import annotations

import attrs

from .protocol import Command, Cursor, FullState, ProtocolError, SyncUpdate, decode, parse_client_message


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

# What a message over the rate is to the holding (classify()).
HOLD, ITEM, OTHER, ALL = "hold", "item", "other", "all"


def classify(message: str | bytes) -> tuple[str, Key | None, frozenset[str]]:
    """How a message meets the messages held before it: (kind, key, fields).

    - HOLD: a later message can make it obsolete: a valid `move_item` or
      `update_item` without `op_id` (its sender waits for no ack; key: the
      action and the item; a later one of the key that carries at least
      the same `data` fields holds every value this one would set, and
      Optiverse sends the whole item each time), or a `cursor` (the
      sender's next one);
    - ITEM: another command of one item (key ("", item)): it must follow
      what is held of that item, and commutes with the rest;
    - OTHER: commutes with every change held (a ping, a sync:request, a
      message the server refuses anyway);
    - ALL: a whole-document change (`sync:update`, `sync:full_state`), or
      a message too large to look into: it must follow everything held.

    Read only for messages over the rate limit or behind held ones.
    """
    if not isinstance(message, str) or len(message) > HOLD_MESSAGE_BYTES:
        return ALL, None, frozenset()
    try:
        parsed = parse_client_message(decode(message))
    except ProtocolError:
        return OTHER, None, frozenset()  # refused, whatever came before
    if isinstance(parsed, Cursor):
        return HOLD, ("cursor", ""), frozenset()
    if isinstance(parsed, Command):
        item_id = parsed.item_id
        if not isinstance(item_id, str):
            return OTHER, None, frozenset()
        if parsed.op_id is None and parsed.action in ("move_item", "update_item") and parsed.data is not None:
            return HOLD, (parsed.action, item_id), frozenset(parsed.data)
        return ITEM, ("", item_id), frozenset()
    if isinstance(parsed, (SyncUpdate, FullState)):
        return ALL, None, frozenset()
    return OTHER, None, frozenset()


@attrs.define(eq=False)
class HeldChanges:
    """A connection's messages over the rate limit that a later message may
    make obsolete (classify(): HOLD), delivered as the rate allows instead
    of being dropped. A later message of a held one's key replaces it and
    goes to the end: what is held is always the latest message of each key,
    in the order they arrived (a subsequence of what the client sent, so a
    move and an update of one item keep their order). So a stock client's
    multi-select drag (a move and an update of every selected item at each
    mouse event) is thinned to the rate, and its last positions arrive."""

    max_keys: int = HOLD_KEYS
    max_bytes: int = HOLD_BYTES
    # By key, in arrival order: the message, its `data` fields, and when it
    # arrived (what the merge of concurrent edits goes by).
    entries: dict[Key, tuple[str | bytes, frozenset[str], float]] = attrs.field(factory=dict)
    size: int = 0
    # Messages made obsolete while held.
    superseded: int = 0

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def hold(self, key: Key, fields: frozenset[str], message: str | bytes, arrived: float = 0.0) -> bool:
        """Hold `message` (it replaces the one of its key, if held); False if
        it can't be: the one of its key held has a field `message` lacks (a
        value would be lost), or holding it would pass max_keys or max_bytes."""
        earlier = self.entries.get(key)
        size = len(message)
        if earlier is not None:
            if not earlier[1] <= fields:
                return False
            if self.size - len(earlier[0]) + size > self.max_bytes:
                return False
            del self.entries[key]
            self.size -= len(earlier[0])
            self.superseded += 1
        elif len(self.entries) >= self.max_keys or self.size + size > self.max_bytes:
            return False
        self.entries[key] = (message, fields, arrived)
        self.size += size
        return True

    def pop(self) -> tuple[str | bytes, float]:
        """The first message held and when it arrived, taken."""
        key = next(iter(self.entries))
        message, _, arrived = self.entries.pop(key)
        self.size -= len(message)
        return message, arrived

    def take(self, item: str | None = None) -> list[tuple[str | bytes, float]]:
        """Every message held (or only the moves and updates of `item`) and
        when each arrived, taken, in order."""
        keys = [key for key in self.entries if item is None or (key[1] == item and key[0] != "cursor")]
        taken = []
        for key in keys:
            message, _, arrived = self.entries.pop(key)
            self.size -= len(message)
            taken.append((message, arrived))
        return taken
