"""What the server counts for /metrics: plain integers, no locks. Pure.

The fan-out path costs a few microseconds per delivery, so nothing on it
calls into prometheus_client (whose counters take a lock per increment).
Sessions, connections and wires add to one `Counters` object per server
instead, per message or per commit, never per delivery; metrics.py turns it
into the exposition format when Prometheus scrapes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

import attrs

# Label values of messages_received / messages_sent: the protocol's types,
# plus "other" (a message that failed to parse, a binary frame). Fixed sets,
# so a client can't grow the number of series.
CLIENT_TYPES = ("ping", "command", "sync:request", "sync:update", "sync:full_state", "cursor", "other")
SERVER_TYPES = (
    "connection:ack",
    "user:joined",
    "user:left",
    "host:changed",
    "pong",
    "ack",
    "error",
    "command",
    "sync:state",
    "sync:ops",
    "sync:full_state",
    "cursor",
    "other",
)
# Why a client was closed with 1013: its queue stayed over (or went far
# over) --max-queue-bytes, or its socket took nothing for --write-timeout.
SLOW_REASONS = ("queue_bytes", "write_timeout")
# What a resume (a sync request with `since`, in the URL or a message) was
# answered with: the ops it missed (maybe none), or the whole state because
# the epoch changed (the session was reset or lost), the ops can't be
# replayed (no longer kept, a replacement among them, `since` ahead of the
# document), or they would not fit in one message.
RESUME_OUTCOMES = ("ops", "state_epoch_changed", "state_ops_unavailable", "state_too_large")
# Handshakes refused by the access checks.
AUTH_FAILURES = ("invalid_token", "session_not_allowed", "origin_not_allowed")

# Histogram buckets (upper bounds). Seconds for durations; changes for batches
# (a batch holds at most --max-batch-ops, 512 by default).
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 512)


def _zeros(names: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(names, 0)


@attrs.define(eq=False)
class Histogram:
    """Counts per bucket and a sum; Prometheus' cumulative view is made at scrape time."""

    bounds: tuple[float, ...]
    # counts[i]: observations <= bounds[i] and > bounds[i - 1]; the last one is +Inf.
    counts: list[int] = attrs.field()
    total: float = 0.0

    @counts.default
    def _no_counts(self) -> list[int]:
        return [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +Inf last."""
        result, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            result.append((bound, running))
        return result


@attrs.define(eq=False)
class Counters:
    """Everything the server counts since it started (one object per server)."""

    received: dict[str, int] = attrs.field(factory=lambda: _zeros(CLIENT_TYPES))
    sent: dict[str, int] = attrs.field(factory=lambda: _zeros(SERVER_TYPES))
    # Bytes written to client sockets (frames, handshake answers, close frames).
    bytes_sent: int = 0
    slow_disconnects: dict[str, int] = attrs.field(factory=lambda: _zeros(SLOW_REASONS))
    resumes: dict[str, int] = attrs.field(factory=lambda: _zeros(RESUME_OUTCOMES))
    auth_failures: dict[str, int] = attrs.field(factory=lambda: _zeros(AUTH_FAILURES))
    # Messages and frames dropped for the per-connection rate limit.
    rate_limited: int = 0
    # Moves, updates and cursors held over the rate limit instead (limits.py),
    # and those of them a later one replaced before their turn.
    held: int = 0
    held_superseded: int = 0
    commit_failures: int = 0
    commit_batch_size: Histogram = attrs.field(factory=lambda: Histogram(BATCH_BUCKETS))
    commit_seconds: Histogram = attrs.field(factory=lambda: Histogram(SECONDS_BUCKETS))
    ack_seconds: Histogram = attrs.field(factory=lambda: Histogram(SECONDS_BUCKETS))
    # When the latest commit failed (trio time), if no commit succeeded since
    # (None: the latest one succeeded), and why: see metrics.readiness().
    commit_failed_at: float | None = None
    last_commit_error: str = ""

    def count_sent(self, message_type: str, recipients: int = 1) -> None:
        """One message of this type went to `recipients` members."""
        sent = self.sent
        if message_type not in sent:
            message_type = "other"
        sent[message_type] += recipients

    def commit_succeeded(self, changes: int, seconds: float) -> None:
        self.commit_batch_size.observe(changes)
        self.commit_seconds.observe(seconds)
        self.commit_failed_at = None

    def commit_failed(self, error: str, now: float) -> None:
        """A commit failed with the store at fault (not a reset by an administrator)."""
        self.commit_failures += 1
        self.last_commit_error = error
        self.commit_failed_at = now
