"""Version history of session documents: what is kept and what goes. Pure: no trio, no I/O.

When a `sync:update`, a host's `sync:full_state` or a restore replaces a
non-empty document, the document it replaces is kept as a *version*, in the
same transaction as the op that replaces it (see Database.append). Versions
are numbered per session from 1 and numbers are never reused; each session
keeps at most `kept` of them and at most `max_bytes` of their JSON, the
oldest dropped first. The newest version is always kept, even alone larger
than `max_bytes`: it is the design most likely wanted back, and a document
is at most `--max-document-size` anyway.

Two replacements keep nothing: one that leaves the document as it was (the
same items), and one whose replaced document is the newest version already
(a client re-uploading the same state in a reconnect loop). Neither writes
to the disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import attrs

# Defaults of `--versions-kept` and `--versions-bytes`.
DEFAULT_VERSIONS_KEPT = 20
DEFAULT_VERSIONS_BYTES = 64 * 1024 * 1024
# Who a restore is recorded as, in the journal and in the versions (as an
# import is "(import)"); informative only: nothing trusts a user id.
ADMIN_USER = "(admin)"


@attrs.frozen
class KeptVersion:
    """A document a replacing op displaces, to be kept as a version.

    `items` is a copy the caller no longer changes (the store encodes it,
    maybe in another thread); `seq` is the document's version when replaced;
    `size` its bytes of JSON (SessionDocument.size), for the store's queue.
    """

    seq: int
    items: list[dict[str, Any]]
    user_id: str
    reason: str
    replaced_at: str
    size: int = 0


@attrs.frozen
class VersionInfo:
    """One row of `collab-trio sessions history` (the document not loaded)."""

    number: int
    seq: int
    replaced_at: str
    user_id: str
    reason: str
    items: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        """The stable keys of `sessions history --json`."""
        return {
            "version": self.number,
            "seq": self.seq,
            "replaced_at": self.replaced_at,
            "user_id": self.user_id,
            "replaced_by": self.reason,
            "items": self.items,
            "bytes": self.bytes,
        }


def replace_reason(kind: str, user_id: str, *, host: bool = False, restored: int | None = None) -> str:
    """What replaced a document, as `sessions history` shows it."""
    if restored is not None:
        return f"restore of version {restored}"
    return f"{kind} by {user_id}" + (" (host)" if host else "")


def digest(text: str) -> str:
    """A fingerprint of a document's JSON text (equal texts, equal digests)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def worth_keeping(replaced: str, replacing: str, newest: str | None) -> bool:
    """Whether a replaced document (its digest) becomes a version: not when
    the replacement leaves it as it was, nor when the newest version is it."""
    return replaced != replacing and replaced != newest


def versions_to_drop(versions: Sequence[tuple[int, int]], *, kept: int, max_bytes: int) -> list[int]:
    """Numbers of the versions to drop, oldest first, from (number, bytes)
    pairs in any order: beyond the newest `kept`, then the oldest while they
    hold more than `max_bytes` together, the newest one always staying."""
    ordered = sorted(versions)
    drop = max(len(ordered) - max(kept, 1), 0)
    total = sum(size for _, size in ordered[drop:])
    while drop < len(ordered) - 1 and total > max_bytes:
        total -= ordered[drop][1]
        drop += 1
    return [number for number, _ in ordered[:drop]]
