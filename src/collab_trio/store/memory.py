"""In-memory store: documents live as long as the server process."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import trio

from ..document import COMMAND, DEFAULT_HISTORY_BYTES, DEFAULT_RETENTION, REPLACE, Op, SessionDocument
from ..history import KeptVersion
from .base import AdminRequest, LeaseChange, StoreError

NO_VERSIONS = "the memory store keeps no versions (use --store sqlite)"


def _copy_op(op: Op) -> Op:
    # A JSON round trip is the journal's own copy, and cheaper than deepcopy.
    record = json.loads(json.dumps(op.to_record(), ensure_ascii=False, allow_nan=False))
    return attrs.evolve(Op.from_record(record), size=op.size)


@attrs.define(eq=False)
class MemoryStore:
    """Keeps a private copy of each session's document, so a session that empties
    and is joined again finds its items; a restart loses everything.

    Same contract as SQLiteStore: load() hands out a fresh copy, and commit()
    applies copies of the ops to the store's own document, so nothing a live
    session mutates later reaches what is stored. It keeps no versions of
    replaced documents (no admin command can reach it to list or restore
    them) and takes no admin requests.
    """

    retention: int = DEFAULT_RETENTION
    history_bytes: int = DEFAULT_HISTORY_BYTES
    # Fault injection: seconds each commit or snapshot takes, like a slow disk.
    fault_commit_delay: float = 0.0
    documents: dict[str, SessionDocument] = attrs.field(factory=dict)
    # Never set (see Store.unreachable).
    unreachable: str | None = None
    # Never called: every commit is answered when it is made (see Store.on_session_lost).
    on_session_lost: Callable[[str, str, str], None] | None = None
    # Snapshots are not written: nothing to encode (see Store.snapshot_text).
    snapshot_text: ClassVar[bool] = False
    _closed: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background: ready at once, returns after aclose()."""
        task_status.started()
        await self._closed.wait()

    async def load(self, session_id: str) -> SessionDocument:
        """A fresh copy of the session's document, created empty on first use."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        stored = self.documents.get(session_id)
        if stored is None:
            stored = self.documents[session_id] = SessionDocument(
                retention=self.retention, history_bytes=self.history_bytes
            )
        snapshot = json.loads(json.dumps(stored.snapshot(), ensure_ascii=False, allow_nan=False))
        document = SessionDocument.from_snapshot(
            snapshot, retention=self.retention, history_bytes=self.history_bytes
        )
        for op in stored.history:
            document.remember(_copy_op(op))
        return document

    def commit_now(self, session_id: str, epoch: str, ops: list[Op], replaced: KeptVersion | None = None) -> bool:
        """Never: every commit goes through commit(), where tests inject faults."""
        return False

    async def commit(self, session_id: str, epoch: str, ops: list[Op], replaced: KeptVersion | None = None) -> None:
        """Apply copies of the ops to the stored document (`replaced` is not kept).

        Raises:
            StoreError: the ops don't follow what is stored (nothing applied).
        """
        if self.fault_commit_delay > 0:
            await trio.sleep(self.fault_commit_delay)
        else:
            await trio.lowlevel.checkpoint()
        self._check_open()
        stored = self.documents.get(session_id)
        if stored is None or stored.epoch != epoch:
            raise StoreError(f"session {session_id!r} is not stored in epoch {epoch}")
        for expected, op in enumerate(ops, start=stored.version + 1):
            if op.seq != expected or op.kind not in (COMMAND, REPLACE):
                raise StoreError(
                    f"session {session_id!r}: op {op.seq} ({op.kind}) does not follow stored version"
                    f" {expected - 1}"
                )
        copies = [_copy_op(op) for op in ops]  # before applying any: all or nothing
        for op in copies:
            stored.apply(op)

    async def save_snapshot(self, session_id: str, snapshot: dict[str, Any]) -> None:
        """Nothing to write: the stored document is always current."""
        await trio.lowlevel.checkpoint()
        self._check_open()

    def release(self, session_id: str) -> None:
        """Nothing to give up: one node, no leases."""

    async def lease_changes(self) -> list[LeaseChange]:
        """Never any: one node, no leases."""
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def next_requests(self) -> list[AdminRequest]:
        """None ever come: waits until the store closes.

        Raises:
            StoreError: the store is closed.
        """
        await self._closed.wait()
        raise StoreError("the store is closed")

    async def finish_request(self, request: AdminRequest, *, seq: int | None = None, error: str | None = None) -> None:
        """Nothing to record."""
        await trio.lowlevel.checkpoint()

    async def version_items(self, session_id: str, number: int) -> list[dict[str, Any]]:
        """Raises StoreError: no versions here."""
        await trio.lowlevel.checkpoint()
        raise StoreError(NO_VERSIONS)

    async def restore(self, session_id: str, number: int) -> int:
        """Raises StoreError: no versions here."""
        await trio.lowlevel.checkpoint()
        raise StoreError(NO_VERSIONS)

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise StoreError("the store is closed")

    async def aclose(self) -> None:
        """Nothing to release; run() returns."""
        self._closed.set()
        await trio.lowlevel.checkpoint()
