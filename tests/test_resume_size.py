"""What a resume is answered with, measured as sent: a sync:ops answer never
exceeds the maximum message size, the history's byte bound counts what the
history holds, and both hold alike after a restart (SQLite and Postgres)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from collab_trio.config import ServerConfig
from collab_trio.document import COMMAND, Op, SessionDocument, message_size
from collab_trio.messages import SyncOps, SyncState, encode_message_bytes
from collab_trio.protocol import SyncRequest
from collab_trio.session_core import Send, SessionCore
from collab_trio.store import make_store
from collab_trio.store.database import Database, database_path
from collab_trio.testing import Harness, add_item, update_item

NOW = "2026-12-08T10:00:00.000+00:00"
MIB = 1024 * 1024


def core(**kwargs: Any) -> SessionCore:
    return SessionCore("lab", clock=lambda: NOW, **kwargs)


def join(c: SessionCore, user: str, **kwargs: Any) -> list[Any]:
    return c.join(user, user, connected_at=NOW, **kwargs)


def sends(effects: list[Any], conn: str) -> list[Any]:
    return [e.message for e in effects if isinstance(e, Send) and e.conn == conn]


def commit_all(c: SessionCore) -> list[Any]:
    effects: list[Any] = []
    while (batch := c.take_batch()) is not None:
        effects += c.committed(batch)
    return effects


def command(action: str, item_id: str, data: dict[str, Any]) -> str:
    return json.dumps(
        {"type": "command", "command": {"action": action, "item_type": "lens", "item_id": item_id, "data": data}}
    )


def resume(c: SessionCore, user: str, since: int) -> Any:
    request = json.dumps({"type": "sync:request", "since": since, "epoch": c.document.epoch})
    [answer] = sends(c.receive(user, user, request), user)
    return answer


def big_item_then_small_updates(c: SessionCore, note: int, updates: int) -> None:
    join(c, "alice")
    c.receive("alice", "alice", command("add_item", "L1", {"note": "n" * note, "x_mm": 0}))
    commit_all(c)
    for i in range(updates):
        # ~100 bytes each; merged, each op holds (and relays) the whole item.
        c.receive("alice", "alice", command("update_item", "L1", {"focal_mm": i + 1}))
        commit_all(c)


def test_merged_updates_are_measured_as_the_whole_item_they_hold() -> None:
    c = core(max_message_size=4000)
    big_item_then_small_updates(c, note=3000, updates=3)
    for op in c.document.history:
        assert op.size >= message_size(op) > 3000
    # Three of them don't fit in 4000 bytes: the whole document instead.
    join(c, "bob")
    assert isinstance(resume(c, "bob", 1), SyncState)
    # One does, and is sent as measured.
    answer = resume(c, "bob", 3)
    assert isinstance(answer, SyncOps) and [op.seq for op in answer.ops] == [4]
    assert 3000 < len(encode_message_bytes(answer)) <= 4000


def test_at_default_settings_small_updates_of_a_large_item_get_the_state_not_megabytes_of_ops() -> None:
    c = core()
    big_item_then_small_updates(c, note=100_000, updates=30)
    join(c, "bob")
    answer = resume(c, "bob", 0)
    assert isinstance(answer, SyncState)
    assert len(encode_message_bytes(answer)) < 2 * 100_000


@pytest.mark.parametrize(
    "user, build, count",
    [
        # 256 bytes of user id in every relay: more than the ops' sizes allow for.
        ("\U0001f600" * 64, lambda i: command("move_item", "L1", {"x_mm": i}), 14),
        # "1e15" (4 bytes) is written out as 1000000000000000.0 (18 bytes).
        ("alice", lambda i: command("add_item", f"L{i}", {"v": [1e15] * 150}).replace("1000000000000000.0", "1e15"), 3),
    ],
    ids=["multi-byte user id", "floats in exponent form"],
)
def test_a_sync_ops_answer_is_measured_as_encoded(user: str, build: Any, count: int) -> None:
    c = core(max_message_size=4000)
    join(c, user)
    for i in range(count):
        c.receive(user, user, build(i))
    commit_all(c)
    assert sum(op.size for op in c.document.history) < 4000 - 100 - count * 160  # the estimate says it fits
    answer = resume(c, user, 0)
    assert isinstance(answer, SyncState)
    # Fewer ops fit, and are sent as they were measured.
    answer = resume(c, user, count - 1)
    assert isinstance(answer, SyncOps) and [op.seq for op in answer.ops] == [count]
    sent = encode_message_bytes(answer)
    assert len(sent) <= 4000
    assert json.loads(sent) == json.loads(json.dumps(answer.to_wire()))


def test_the_history_byte_bound_counts_merged_updates_and_holds_alike_after_a_restart() -> None:
    c = core(history_bytes=20_000)
    big_item_then_small_updates(c, note=3000, updates=50)
    history = list(c.document.history)
    assert sum(op.size for op in history) <= 20_000
    assert len(history) < 10  # about six whole items of 3 KB
    reloaded = SessionDocument(history_bytes=20_000)
    for op in history:
        reloaded.remember(Op(op.seq, op.user_id, COMMAND, op.timestamp, command=op.command, op_id=op.op_id))
    assert [op.seq for op in reloaded.history] == [op.seq for op in history]


def test_a_resume_does_not_cancel_the_state_owed_after_a_foreign_full_state() -> None:
    c = core()
    for user in ("alice", "bob", "carol"):  # alice is the host
        join(c, user)
    c.receive("alice", "alice", command("add_item", "A0", {"x_mm": 0}))
    commit_all(c)
    c.receive("alice", "alice", command("add_item", "A1", {"x_mm": 1}))  # pending
    foreign = {"type": "sync:full_state", "state": {"items": [{"uuid": "B1"}]}, "target_user": "carol"}
    c.receive("bob", "bob", json.dumps(foreign))
    # carol resumes meanwhile: by seq she missed nothing, but she shows bob's canvas.
    c.receive("carol", "carol", json.dumps({"type": "sync:request", "since": 0, "epoch": c.document.epoch}))
    answers = [m for m in sends(commit_all(c), "carol") if isinstance(m, (SyncOps, SyncState))]
    assert len(answers) == 1 and isinstance(answers[0], SyncState)
    assert [item["uuid"] for item in answers[0].state["items"]] == ["A0", "A1"]


def thirty_big_adds() -> list[Op]:
    return [
        Op(seq, "alice", COMMAND, NOW, command={
            "action": "add_item", "item_type": "lens", "item_id": f"a{seq}", "data": {"pad": "p" * 400_000}})
        for seq in range(1, 31)
    ]


def test_a_loaded_document_keeps_as_much_history_as_history_bytes_allows(tmp_path: Path) -> None:
    epoch = SessionDocument().epoch
    database = Database(database_path(tmp_path / "data"), history_bytes=64 * MIB)
    try:
        database.append("lab", epoch, thirty_big_adds())
        document = database.load("lab")
    finally:
        database.close()
    assert len(document.history) == 30  # 12 MB, over the 8 MiB default
    c = SessionCore("lab", document, history_bytes=64 * MIB, max_message_size=64 * MIB, clock=lambda: NOW)
    effects = c.join("bob", "bob", connected_at=NOW, resume=SyncRequest(since=0, epoch=epoch))
    assert [type(m) for m in sends(effects, "bob")][1] is SyncOps


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_the_durable_stores_take_history_bytes_from_the_settings(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("database_url") if store == "postgres" else None
    config = ServerConfig(store=store, data_dir=tmp_path / "data", database_url=url, history_bytes=64 * MIB)
    assert make_store(config).history_bytes == 64 * MIB  # type: ignore[attr-defined]


async def test_a_resume_after_small_updates_of_a_large_item_fits_the_clients_message_limit(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    async with harness.joined("s", "alice") as alice:
        await alice.send(add_item("L1", {"note": "n" * 200_000}))
        ack = await alice.expect("ack")
        for i in range(10):
            await alice.send(update_item("L1", {"focal_mm": i + 1}))
            await alice.expect("ack")
        await alice.send({"type": "sync:request"})
        epoch = (await alice.expect("sync:state"))["epoch"]
        # Ten small messages since the add, each relayed as the 200 KB item.
        async with harness.client("s", "bob", path=f"/ws/s/bob?since={ack['seq']}&epoch={epoch}") as bob:
            await bob.expect("connection:ack")
            with trio.fail_after(5):
                text = await bob.ws.get_message()  # trio-websocket's limit: 1 MiB
            answer = json.loads(text)
            assert answer["type"] == "sync:state" and answer["version"] == ack["seq"] + 10
            assert answer["state"]["items"][0]["focal_mm"] == 10
