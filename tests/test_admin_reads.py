"""`sessions list/show/export` read beside a busy server without slowing it.

They use read transactions on a read-only connection (WAL readers never block
the writer), and `list` counts items in SQL instead of loading documents. A
session whose rows can't be read is reported on its row, not fatal.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from collab_trio.admin import run_sessions_command
from collab_trio.document import COMMAND, Op
from collab_trio.store import SQLiteStore, StoreError
from collab_trio.store.database import Database, database_path

SESSIONS = 2000
ITEMS = 1000  # ~100 bytes each: a ~100 KB snapshot per session
EVERY_TENTH_EXTRA = 1  # sessions with journal rows after the snapshot end with one more item
NOW = "2026-01-01T00:00:00+00:00"
LIST_TIMEOUT = 120


def item(n: int) -> dict[str, Any]:
    return {
        "uuid": f"item-{n:04d}",
        "item_type": "lens",
        "x_mm": n * 1.25,
        "y_mm": -n * 0.5,
        "label": f"lens number {n:04d} on the bench, 50 mm",
    }


def command_record(seq: int, action: str, item_id: str, **data: Any) -> str:
    command = {"action": action, "item_type": "lens", "item_id": item_id, "data": data}
    return json.dumps(Op(seq, "alice", COMMAND, NOW, command=command).to_record(), separators=(",", ":"))


def build_database(data_dir: Path, sessions: int) -> int:
    """A database of `sessions` sessions with ~100 KB snapshots, written directly; its size."""
    Database(database_path(data_dir)).close()  # the schema
    conn = sqlite3.connect(database_path(data_dir), isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=OFF")
    snapshot = json.dumps([item(n) for n in range(ITEMS)], separators=(",", ":"))
    # Every tenth session has three ops after its snapshot: two adds and a remove.
    tail = [
        (ITEMS + 1, command_record(ITEMS + 1, "add_item", "extra-1", x_mm=1.0)),
        (ITEMS + 2, command_record(ITEMS + 2, "move_item", "extra-1", x_mm=2.0)),
        (ITEMS + 3, command_record(ITEMS + 3, "add_item", "extra-2")),
        (ITEMS + 4, command_record(ITEMS + 4, "remove_item", "item-0000")),
    ]
    batch = 250
    for start in range(0, sessions, batch):
        ids = [f"s{n:04d}" for n in range(start, min(start + batch, sessions))]
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
            [(sid, f"epoch{sid}", ITEMS + (4 if int(sid[1:]) % 10 == 0 else 0), NOW, NOW) for sid in ids],
        )
        conn.executemany("INSERT INTO snapshots VALUES (?, ?, 1, ?)", [(sid, ITEMS, snapshot) for sid in ids])
        conn.executemany(
            "INSERT INTO journal VALUES (?, ?, ?)",
            [(sid, seq, text) for sid in ids if int(sid[1:]) % 10 == 0 for seq, text in tail],
        )
        conn.execute("COMMIT")
    conn.close()
    return database_path(data_dir).stat().st_size


def expected_items(session_id: str) -> int:
    return ITEMS + EVERY_TENTH_EXTRA if int(session_id[1:]) % 10 == 0 else ITEMS


def parse_list(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["SESSION", "ITEMS", "VERSION", "LAST ACTIVITY", "SIZE"]
    return {line.split()[0]: re.split(r"\s{2,}", line)[1:] for line in lines[1:]}


async def test_list_of_a_200_mb_database_never_blocks_live_commits(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    built_at = trio.current_time()
    size = build_database(data_dir, SESSIONS)
    build_time = trio.current_time() - built_at
    assert size >= 200 * 1_000_000
    # Commits on the event loop (no pending log), each a transaction beside the reader.
    store = SQLiteStore(data_dir, pending_log=False)
    stats = {"ok": 0, "failed": 0, "max_latency": 0.0, "during_list": 0}
    errors: list[str] = []
    listing = trio.Event()

    async def commit_continuously(task_status: trio.TaskStatus[None]) -> None:
        epoch = (await store.load("live")).epoch
        task_status.started()
        seq = 0
        while True:
            seq += 1
            started = trio.current_time()
            record = Op(seq, "bob", COMMAND, NOW, command={"action": "add_item", "item_id": f"live-{seq}", "data": {}})
            try:
                await store.commit("live", epoch, [record])
            except StoreError as exc:
                stats["failed"] += 1
                errors.append(str(exc))
                seq -= 1
                continue
            stats["ok"] += 1
            if listing.is_set():
                stats["during_list"] += 1
                stats["max_latency"] = max(stats["max_latency"], trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(commit_continuously)
        with trio.fail_after(LIST_TIMEOUT):
            listing.set()
            started = trio.current_time()
            done = await trio.run_process(
                [sys.executable, "-m", "collab_trio", "sessions", "list", "--data-dir", str(data_dir)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            list_time = trio.current_time() - started
            listing = trio.Event()  # stop counting
            # A mutating admin command beside the writer: a short write transaction.
            deleted = await trio.run_process(
                [sys.executable, "-m", "collab_trio", "sessions", "delete", "s0001", "--yes", "--data-dir", str(data_dir)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        nursery.cancel_scope.cancel()
    print(
        f"\nsessions list on {size / 1e6:.0f} MB ({SESSIONS} sessions, built in {build_time:.1f} s):"
        f" {list_time:.2f} s; commits meanwhile {stats['during_list']} (max latency"
        f" {stats['max_latency'] * 1000:.0f} ms), {stats['ok']} in all, {stats['failed']} failed"
    )
    assert (done.returncode, done.stderr) == (0, b""), done.stderr
    assert (deleted.returncode, deleted.stderr) == (0, b""), deleted.stderr
    assert stats["failed"] == 0, errors
    assert stats["during_list"] > 0
    rows = parse_list(done.stdout.decode())
    assert len(rows) == SESSIONS + 1
    for session_id, (items, version, activity, size_cell) in rows.items():
        if session_id == "live":
            assert items == version  # one new item per commit
            continue
        assert int(items) == expected_items(session_id), (session_id, items)
        assert int(version) == ITEMS + (4 if int(session_id[1:]) % 10 == 0 else 0)
        assert activity == NOW and size_cell.endswith("KiB")


def bad_database(data_dir: Path) -> None:
    """Sessions `good`, `bad-journal`, `bad-snapshot`, `not-a-list` and `gap`."""
    database = Database(database_path(data_dir))
    try:
        database.run(lambda d: d.import_state("good", [item(1), item(2)]))
        for session_id in ("bad-journal", "bad-snapshot", "not-a-list", "gap"):
            database.run(lambda d, s=session_id: d.import_state(s, [item(1)]))
        conn = database.conn
        conn.execute("INSERT INTO journal VALUES ('bad-journal', 2, '{not json')")
        conn.execute("UPDATE sessions SET version = 2 WHERE session_id = 'bad-journal'")
        conn.execute("UPDATE snapshots SET items = '[{\"uuid\": ' WHERE session_id = 'bad-snapshot'")
        conn.execute("UPDATE snapshots SET items = '{\"uuid\": \"x\"}' WHERE session_id = 'not-a-list'")
        conn.execute("INSERT INTO journal VALUES ('gap', 5, ?)", (command_record(5, "add_item", "late"),))
        conn.execute("UPDATE sessions SET version = 5 WHERE session_id = 'gap'")
    finally:
        database.close()


def sessions(capsys: pytest.CaptureFixture[str], data_dir: Path, action: str, *args: str) -> tuple[int, str, str]:
    namespace = argparse.Namespace(action=action, data_dir=str(data_dir), session_id=args[0] if args else None)
    status = run_sessions_command(namespace)
    out, err = capsys.readouterr()
    return status, out, err


def test_an_unreadable_session_is_reported_on_its_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    bad_database(data_dir)
    status, out, err = sessions(capsys, data_dir, "list")
    with capsys.disabled():
        print(f"\n{out}{err}", end="")
    assert status == 1
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert sorted(lines) == ["bad-journal", "bad-snapshot", "gap", "good", "not-a-list"]
    assert re.split(r"\s{2,}", lines["good"])[1:3] == ["2", "1"]
    assert "unreadable" not in lines["good"]
    assert lines["bad-journal"].endswith("unreadable: journal row 2 is not JSON")
    assert re.search(r"unreadable: the snapshot is not JSON \(malformed JSON\)$", lines["bad-snapshot"])
    assert lines["not-a-list"].endswith("unreadable: the snapshot is not a list of items")
    assert re.search(r"unreadable: journal row 5 can't be applied \(op 5 does not follow version 1\)$", lines["gap"])
    for name in ("bad-journal", "bad-snapshot", "not-a-list", "gap"):
        assert re.split(r"\s{2,}", lines[name])[1] == "?"
    assert err == "error: 4 session(s) unreadable: bad-journal, bad-snapshot, gap, not-a-list\n"
    # show and export of an unreadable session: one line, exit 1; of a good one, fine.
    status, out, err = sessions(capsys, data_dir, "show", "bad-journal")
    assert (status, out) == (1, "")
    assert err.startswith("error: session 'bad-journal': journal row 2 is not an op (") and err.count("\n") == 1
    status, out, err = sessions(capsys, data_dir, "show", "good")
    assert (status, err) == (0, "") and "items:         2" in out


def test_admin_reads_change_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only connection: list/show/export write no byte, create no session."""
    data_dir = tmp_path / "data"
    bad_database(data_dir)
    before = database_path(data_dir).read_bytes()
    for action, args in (("list", ()), ("show", ("good",)), ("show", ("nope",))):
        sessions(capsys, data_dir, action, *args)
    assert database_path(data_dir).read_bytes() == before
    reader = Database(database_path(data_dir), create=False, readonly=True)
    try:
        with pytest.raises(StoreError, match="readonly|read-only"):
            reader.run(lambda d: d.delete("good"))
    finally:
        reader.close()
