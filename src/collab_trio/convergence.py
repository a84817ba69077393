"""What keeps stock Optiverse windows on the server's design. Pure: no trio, no I/O.

The Optiverse client applies its own change at once and every relayed
`command` as it arrives; it ignores `seq` and `ack`, and its `update_item`
carries the whole item. Two rules here make such clients converge:

- Per-field merge (`FieldHistory`, `merge_update`): an update changes only
  the fields whose values differ from every value the sender can have based
  it on (the current one, and those other members' changes set or replaced
  lately); the others keep the server's current value, so an edit of one
  property does not undo a concurrent drag.
- Corrections (`CorrectionTracker`): a client that committed a change of an
  item shortly after the server relayed it someone else's change of the same
  item (it may have applied that one after its own), or whose update the
  merge kept a value out of, is sent the item's authoritative state once its
  changes of that item settle.

Time is whatever the caller passes (seconds, monotonic); nothing here reads
a clock.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import attrs
import orjson

from .document import item_data

# Fields that name an item rather than describe it: never merged.
IDENTITY_FIELDS = frozenset({"uuid", "item_uuid", "item_type"})
# Values of one field kept (a drag at 60/s for the merge window, and then some).
FIELD_HISTORY = 256
# Values kept in all; past this the items recorded first are forgotten,
# whatever a client sends (an update of 50,000 fields, say).
HISTORY_VALUES = 16384
# Strings longer than this are not kept: a stale copy of one is taken for an
# edit (the later change wins). Each value kept counts one toward
# HISTORY_VALUES, and a list or object one more per this many bytes of JSON.
HISTORY_VALUE_CHARS = 256
# Lists and objects (Optiverse keeps a lens's optics in `interfaces`, a list
# of objects: a drag's whole-item update carries the one it last saw) are
# kept up to this many bytes of JSON, and this many elements at the top.
HISTORY_CONTAINER_BYTES = 8192
HISTORY_CONTAINER_ITEMS = 256
# An update or move of more fields than this is neither merged nor recorded
# (its fields all count as changed): per-field work stays bounded per
# message, whatever a client sends. Optiverse items have a few dozen.
MERGE_MAX_FIELDS = 512
_MISSING = object()

# What a correction must restore, in increasing order: the position, the
# whole item, the item's existence (it was added or removed meanwhile).
MOVE, UPDATE, EXISTENCE = 0, 1, 2


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values: Python's == (a cheap no first), but a boolean
    is not a number (True == 1 in Python), and lists and objects that ==
    calls equal are compared by their JSON ([1] and [true], [1] and [1.0]
    differ there), whatever the order of their keys."""
    if not a == b:
        return False
    if isinstance(a, (list, dict)):
        try:
            return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(b, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            return True
    return (type(a) is bool) == (type(b) is bool)


def _kept(value: Any) -> tuple[Any, int] | None:
    """How FieldHistory keeps `value`: what it is compared by, and what it
    counts toward HISTORY_VALUES; None if it is not kept. A list or object
    is compared by a digest of its JSON (a tuple, which no JSON value
    equals): a merge then costs the size of the update, not that times the
    copies kept."""
    if isinstance(value, bool):
        return ("bool", value), 1  # (True == 1 in Python, not in JSON)
    if value is None or isinstance(value, (int, float)):
        return value, 1
    if isinstance(value, str):
        return (value, 1) if len(value) <= HISTORY_VALUE_CHARS else None
    if isinstance(value, (list, dict)) and len(value) <= HISTORY_CONTAINER_ITEMS:
        try:
            encoded = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)  # the same object, whatever its key order
        except orjson.JSONEncodeError:  # nested too deep for orjson, or an integer beyond 64 bits
            return None
        if len(encoded) > HISTORY_CONTAINER_BYTES:
            return None
        return ("json", hashlib.blake2b(encoded, digest_size=16).digest()), 1 + len(encoded) // HISTORY_VALUE_CHARS
    return None


@attrs.define(eq=False)
class FieldHistory:
    """Values other members' recent changes set or replaced, per field of
    each item, with who and when: what an update can have been based on."""

    window: float = 2.0
    depth: int = FIELD_HISTORY
    max_values: int = HISTORY_VALUES
    # item -> field -> (when, author, value, weight), oldest first; items in
    # the order their first value was recorded.
    _items: dict[str, dict[str, deque[tuple[float, str, Any, int]]]] = attrs.field(factory=dict)
    _count: int = 0
    _item_counts: dict[str, int] = attrs.field(factory=dict)

    def record(
        self, item_id: str, before: dict[str, Any] | None, after: dict[str, Any] | None, author: str, now: float
    ) -> None:
        """`author` changed the fields of `item_id` from `before` to `after`
        at `now` (None: absent; an add records nothing, a remove forgets)."""
        if after is None:
            self._drop(item_id)
            return
        if before is None:
            return
        if len(after) > MERGE_MAX_FIELDS:
            self._drop(item_id)  # not followed: merges of it take every field
            return
        fields = self._items.get(item_id)
        cutoff = now - self.window
        added = 0
        for name, value in after.items():
            if name in IDENTITY_FIELDS:
                continue
            old = before.get(name, _MISSING)
            if old is not _MISSING and _same(old, value):
                continue
            if fields is None:
                fields = self._items[item_id] = {}
            values = fields.get(name)
            if values is None:
                values = fields[name] = deque(maxlen=self.depth)
            while values and values[0][0] <= cutoff:
                added -= values.popleft()[3]
            # The value this change replaced is one the others may still show
            # (not its author: it knows it changed it), and so is the new one.
            if old is not _MISSING:
                kept = _kept(old)
                if kept is not None and not (values and values[-1][1:3] == (author, kept[0])):
                    added += self._keep(values, now, author, kept)
            kept = _kept(value)
            if kept is not None:
                added += self._keep(values, now, author, kept)
        if added:
            self._count += added
            self._item_counts[item_id] = self._item_counts.get(item_id, 0) + added
            while self._count > self.max_values and self._items:
                self._drop(next(iter(self._items)))

    def _keep(self, values: deque[tuple[float, str, Any, int]], now: float, author: str, kept: tuple[Any, int]) -> int:
        """Append a value as _kept() gives it; what that adds to the count."""
        key, weight = kept
        added = weight
        if len(values) == self.depth:
            added -= values[0][3]  # pushed out by the append
        values.append((now, author, key, weight))
        return added

    def based_on(self, item_id: str, field: str, user_id: str, arrived: float) -> list[Any]:
        """Values of a field that a change by `user_id`, arriving at `arrived`,
        can have been based on besides the current one: those other members'
        changes set or replaced in the last `window` seconds (each as _kept()
        gives it: compare _kept(value)[0] with them)."""
        fields = self._items.get(item_id)
        values = None if fields is None else fields.get(field)
        if not values:
            return []
        cutoff = arrived - self.window
        return [v for when, author, v, _ in values if author != user_id and when > cutoff]

    def forget(self) -> None:
        """Drop every recorded value (the document was replaced)."""
        self._items.clear()
        self._item_counts.clear()
        self._count = 0

    @property
    def size(self) -> int:
        """Values held."""
        return self._count

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, item_id: str) -> None:
        if self._items.pop(item_id, None) is not None:
            self._count -= self._item_counts.pop(item_id, 0)


def merge_update(
    current: dict[str, Any],
    data: dict[str, Any],
    history: FieldHistory,
    item_id: str,
    user_id: str,
    arrived: float,
) -> tuple[dict[str, Any], list[str], list[str]]:
    """The data an update of an existing item should store, the fields it
    changed, and the fields whose differing value it kept out as stale.

    A field of `data` counts as changed when its value equals neither the
    item's current value nor any value the sender can have based its update
    on (FieldHistory.based_on): then the sender did not just carry along what
    it last saw. Changed fields take the sender's value; every other field
    keeps the current one (fields the sender left out included). Identity
    fields are the current item's.
    """
    merged = item_data(current)  # the server sets `uuid` and `item_type` itself
    if len(data) > MERGE_MAX_FIELDS:
        # Too many fields to weigh one by one: the sender's values all count.
        taken = {name: value for name, value in data.items() if name not in IDENTITY_FIELDS}
        merged.update(taken)
        return merged, [name for name, value in taken.items() if current.get(name, _MISSING) != value], []
    changed: list[str] = []
    stale: list[str] = []
    for name, value in data.items():
        if name in IDENTITY_FIELDS:
            continue
        now = current.get(name, _MISSING)
        if now is not _MISSING and _same(now, value):
            continue
        seen = history.based_on(item_id, name, user_id, arrived)
        kept = _kept(value) if seen else None
        if kept is not None and kept[0] in seen:
            stale.append(name)  # what the sender last saw: not its edit
            continue
        merged[name] = value
        changed.append(name)
    return merged, changed, stale


@attrs.define(eq=False)
class _Dirty:
    due: float
    # What the correction restores: MOVE, UPDATE or EXISTENCE.
    level: int


@attrs.define(eq=False)
class CorrectionTracker:
    """Which member may show a stale item, and when to send it the truth.

    `window`: a relay sent this long before a member's change of the same
    item arrived (or any time after) may have been applied by that member
    after its own change (about the longest round trip expected).
    `settle`: the correction goes once the member has changed the item for
    this long no more; every later change of the item by that member while
    one is due moves it on, so there is at most one per settle interval.
    """

    window: float = 1.0
    settle: float = 0.15
    # Per item: when each author's latest change of it was committed (and
    # relayed to everyone else), and what kind of change it was. In the
    # order of the items' latest changes, oldest first (see _prune).
    _recent: dict[str, dict[str, tuple[float, int]]] = attrs.field(factory=dict)
    # When a correction of an item went to a member (it is a relay too).
    _corrected: dict[tuple[str, str], float] = attrs.field(factory=dict)
    # ... and of what kind (EXISTENCE when it removed the item), see replaced().
    _corrected_level: dict[tuple[str, str], int] = attrs.field(factory=dict)
    _dirty: dict[tuple[str, str], _Dirty] = attrs.field(factory=dict)
    _commits: int = 0
    # Per member sent a whole document to load (any sync:state or forwarded
    # sync:full_state): until when, and up to which message received, a
    # change of its may predate the load (see loaded()).
    _loaded_until: dict[str, tuple[float, float]] = attrs.field(factory=dict)

    def committed(
        self,
        user_id: str,
        item_id: str,
        *,
        arrived: float,
        now: float,
        level: int,
        force: bool = False,
        order: int = 0,
    ) -> bool:
        """`user_id`'s change of `item_id` (of kind `level`), received at
        `arrived`, is committed and relayed at `now`. True if it makes a
        correction due (`force`: due whatever came before). `order`: where it
        came among the messages received (see loaded_by())."""
        cutoff = arrived - self.window
        # Taken out and put back last: the item changed latest.
        authors = self._recent.pop(item_id, None)
        if authors is None:
            authors = {}
        self._recent[item_id] = authors
        conflict = force or self._corrected.get((user_id, item_id), cutoff) > cutoff
        own = level
        if self._loaded_until and self._loaded_before(user_id, arrived, order):
            # Made before this member loaded a document it was sent, perhaps,
            # and then lost from its window by loading it: the item as stored
            # (created() makes it an add when the change made the item).
            conflict = True
        for author, (when, kind) in authors.items():
            if author != user_id and when > cutoff:
                conflict = True
                level = max(level, kind)  # restore what the other change did too
        # The author's strongest change within the window, not only its
        # latest: a move after an update must not hide the update from a
        # replacement's sender (see replaced()).
        earlier = authors.get(user_id)
        if earlier is not None and earlier[1] > own and earlier[0] > now - self.window:
            own = earlier[1]
        authors[user_id] = (now, own)
        if conflict or (user_id, item_id) in self._dirty:
            self._mark(user_id, item_id, now, level)
        # Every 8th commit forgets up to 16 of the oldest items, if out of the
        # window (a commit adds at most one): _recent stays within the window
        # at a bounded cost per commit. A walk over every item out of it at
        # once, every 1024 commits, was a ~1 ms pause in a busy session.
        self._commits += 1
        if not self._commits % 8:
            self._forget_oldest(now - self.window, 16)
            if not self._commits % 1024:
                self._prune(now)
        return conflict

    def next_due(self) -> float | None:
        """When the earliest correction is due, or None."""
        if not self._dirty:
            return None
        return min(d.due for d in self._dirty.values())

    def take_due(self, now: float) -> list[tuple[str, str, int]]:
        """(user, item, level) of every correction due by `now`, taken."""
        due = [(key, d) for key, d in self._dirty.items() if d.due <= now]
        for key, d in due:
            del self._dirty[key]
            self._corrected[key] = now
            self._corrected_level[key] = d.level
        self._prune(now)
        return [(user_id, item_id, d.level) for (user_id, item_id), d in due]

    def corrected(self, user_id: str, item_id: str, now: float, level: int = EXISTENCE) -> None:
        """A correction of `item_id` went to `user_id` outside take_due()
        (a refusal's remove_item: it took the item's existence away)."""
        self._dirty.pop((user_id, item_id), None)
        self._corrected[(user_id, item_id)] = now
        self._corrected_level[(user_id, item_id)] = level

    def loaded(self, user_id: str, now: float, wait: float) -> None:
        """`user_id` is sent a whole document to load at `now`: a change of
        its arriving until it has loaded it (loaded_by(); at most `wait`
        after `now`) may have been made before, and then taken from its
        window by the load: it is corrected as stored."""
        self._loaded_until[user_id] = (now + wait, math.inf)

    def loaded_by(self, user_id: str, now: float, order: int) -> None:
        """`user_id` has loaded what it was sent (it answered the ping sent
        after it) at `now`, after the `order`-th message received: its
        changes received later were made after. (By order, not time alone:
        a change read with the pong, before or after it, has its time.)"""
        until = self._loaded_until.get(user_id)
        if until is not None and now <= until[0]:
            self._loaded_until[user_id] = (now, order)

    def forget_load(self, user_id: str) -> None:
        """`user_id`'s connection was replaced: what it was sent to load is not the new one's."""
        self._loaded_until.pop(user_id, None)

    def _loaded_before(self, user_id: str, arrived: float, order: int) -> bool:
        until = self._loaded_until.get(user_id)
        return until is not None and (arrived < until[0] or (arrived == until[0] and order <= until[1]))

    def removed_by_correction(self, user_id: str, item_id: str) -> None:
        """The correction just taken for `user_id` removed `item_id` (the
        document lacks it): it took the item's existence away."""
        if (user_id, item_id) in self._corrected_level:
            self._corrected_level[(user_id, item_id)] = EXISTENCE

    def forget_user(self, user_id: str) -> None:
        """The member left: nothing is due to it."""
        self._loaded_until.pop(user_id, None)
        for key in [k for k in self._dirty if k[0] == user_id]:
            del self._dirty[key]
        for key in [k for k in self._corrected if k[0] == user_id]:
            del self._corrected[key]
            self._corrected_level.pop(key, None)

    def replaced(self, sender: str | None, loaders: set[str], now: float) -> bool:
        """`sender` replaced the document with its own view at `now`, and
        `loaders` are sent the new document whole.

        The sender may apply, after its upload, relays of other members'
        changes it had not read yet, and corrections sent to it: each item
        another member changed, or it was corrected on, within the window is
        corrected for it (as stored), restoring what those did: the
        position, the whole item, or (an add or a remove) its existence.
        Only the last rebuilds the item in the sender's window (stock
        Optiverse then no longer sends property edits of an item it made
        itself). What was due to a loader is void (it loads everything); a
        loader's change arriving soon after may predate its load (see
        loaded()). True if a correction is due that was not (the sender's).
        """
        cutoff = now - self.window
        for key in [key for key in self._dirty if key[0] in loaders]:
            del self._dirty[key]
        marked = False
        if sender is not None:
            for item_id, authors in self._recent.items():
                levels = [kind for author, (when, kind) in authors.items() if author != sender and when > cutoff]
                if levels:
                    self._mark(sender, item_id, now, max(levels))
                    marked = True
            # A correction sent to the sender is a relay too: one on its way
            # when it uploaded is applied after (and may take the item away).
            for (user_id, item_id), when in self._corrected.items():
                if user_id == sender and when > cutoff:
                    self._mark(sender, item_id, now, self._corrected_level.get((user_id, item_id), MOVE))
                    marked = True
        return marked

    def created(
        self, author: str, item_id: str, members: Iterable[str], now: float, *, arrived: float, order: int = 0
    ) -> None:
        """`author`'s update made item `item_id`, which the document did not
        have (a replacement took it away): relayed as an update, which a
        window without the item ignores, so every other member gets it as stored."""
        for member in members:
            if member != author:
                self._mark(member, item_id, now, EXISTENCE)
        if self._loaded_before(author, arrived, order):
            # Its window may have lost the item by loading a document.
            self._mark(author, item_id, now, EXISTENCE)

    def _mark(self, user_id: str, item_id: str, now: float, level: int) -> None:
        dirty = self._dirty.get((user_id, item_id))
        if dirty is None:
            self._dirty[(user_id, item_id)] = _Dirty(now + self.settle, level)
        else:
            dirty.due, dirty.level = now + self.settle, max(dirty.level, level)

    @property
    def pending(self) -> int:
        """Corrections due or waiting to settle."""
        return len(self._dirty)

    def _prune(self, now: float) -> None:
        """Forget what is older than the window: items whose latest change is,
        from the front of _recent, up to the first item changed since (the
        cost is the items dropped, not all of them). Older authors of an item
        changed since stay until it goes: committed() looks at their times."""
        cutoff = now - self.window
        for key in [k for k, t in self._corrected.items() if t <= cutoff]:
            del self._corrected[key]
            self._corrected_level.pop(key, None)
        self._forget_oldest(cutoff, len(self._recent))

    def _forget_oldest(self, cutoff: float, limit: int) -> None:
        """Forget up to `limit` items from the front of _recent (the oldest
        latest change first) whose latest change is no later than `cutoff`."""
        recent = self._recent
        while limit > 0 and recent:
            item_id = next(iter(recent))
            if max((when for when, _ in recent[item_id].values()), default=cutoff) > cutoff:
                return
            del recent[item_id]
            limit -= 1
