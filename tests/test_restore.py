"""Version history and `collab-trio sessions history|restore` as real processes.

The acceptance case of the issue: an Optiverse host re-joins and uploads a
degraded `sync:full_state` (its client rebuilt the canvas without the
components' settings), which replaces the stored design; `sessions restore`
run beside the live server brings the design back, and every member sees it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from collab_trio.store.database import Database, database_path
from collab_trio.testing import HANG, ServerProcess, child_env, server_process, tcp_client
from tests.test_admin import command, fails, ok, receive, sessions, stop, sync_state

# The design a host built: every component with its settings.
DESIGN = [
    {"uuid": "lens-1", "item_type": "lens", "x_mm": 10.0, "y_mm": 0.0, "focal_length_mm": 50.0, "label": "L1"},
    {"uuid": "mirror-1", "item_type": "mirror", "x_mm": 40.0, "y_mm": 5.0, "angle_deg": 45.0, "coating": "Ag"},
]
# What the Optiverse host uploads after re-joining: the same components,
# their settings lost (the client bug the issue describes).
DEGRADED = [
    {"uuid": "lens-1", "item_type": "lens", "x_mm": 10.0, "y_mm": 0.0},
    {"uuid": "mirror-1", "item_type": "mirror", "x_mm": 40.0, "y_mm": 5.0},
]


def item_data(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in ("uuid", "item_type")}


async def build_design(host: WebSocketConnection) -> int:
    """The host adds DESIGN item by item; the last seq."""
    seq = 0
    for item in DESIGN:
        seq = await command(host, "add_item", item["uuid"], item["item_type"], **item_data(item))
    return seq


async def history(session: str) -> list[dict[str, Any]]:
    return json.loads(await ok("history", session, "--json"))


async def restore_by_server(server: ServerProcess, session: str, version: int) -> str:
    """`sessions restore` beside a running server: its stdout (stderr says it waits)."""
    result = await sessions("restore", session, "--version", str(version), "--yes")
    assert result.returncode == 0, result
    pid = server.process.pid
    # A Postgres node is named by its node id (hostname:pidPID with port 0).
    who = f"node {socket.gethostname()}:pid{pid}" if os.environ.get("COLLAB_TRIO_STORE") == "postgres" else f"(pid {pid})"
    first, *progress = result.stderr.splitlines()
    assert first == f"Asked the running server {who} to restore it; waiting up to 10 s"
    # A busy machine may take more than a second: then the command says it still waits.
    assert all(re.fullmatch(r"  still waiting for the server \(\d+ s\)", line) for line in progress), progress
    return result.stdout


async def test_a_design_overwritten_by_a_full_state_upload_is_restored_in_the_live_session(
    data_dir: Path, store_kind: str
) -> None:
    async with server_process() as server:
        port = server.port
        async with tcp_client(port, "/ws/design/alice") as first:
            ack = await receive(first, "connection:ack")
            assert ack["is_host"]
            epoch = ack["epoch"]
            async with tcp_client(port, "/ws/design/bob") as bob:
                await receive(bob, "connection:ack")
                assert await build_design(first) == 2
                for _ in DESIGN:
                    await receive(bob, "command")
                assert await history("design") == []  # nothing replaced yet

                # The host re-joins (the old connection is replaced, it stays host)
                # and uploads the degraded canvas as its full state.
                async with tcp_client(port, "/ws/design/alice") as alice:
                    ack = await receive(alice, "connection:ack")
                    assert (ack["is_host"], ack["version"], ack["epoch"]) == (True, 2, epoch)
                    await alice.send_message(json.dumps({"type": "sync:full_state", "state": {"items": DEGRADED}}))
                    assert (await receive(alice, "ack"))["seq"] == 3
                    forwarded = await receive(bob, "sync:full_state")
                    assert forwarded["state"]["items"] == DEGRADED
                    assert (await sync_state(bob))["state"]["items"] == DEGRADED  # the design is gone

                    [kept] = await history("design")
                    assert kept == {
                        "version": 1,
                        "seq": 2,
                        "replaced_at": kept["replaced_at"],
                        "user_id": "alice",
                        "replaced_by": "sync:full_state by alice (host)",
                        "items": 2,
                        "bytes": kept["bytes"],
                    }
                    assert kept["bytes"] > len(json.dumps(DEGRADED))

                    # Restore while the session is live, beside the running server.
                    restored = await restore_by_server(server, "design", 1)
                    assert restored == (
                        "Restored version 1 of session design as op 4 by the running server (members connected to the session received it)\n"
                    )
                    await server.wait_for("Session design: a stored version was restored as op 4")
                    # Both members receive the design at once, with the next seq.
                    for member in (alice, bob):
                        message = await receive(member, "sync:state")
                        assert (message["version"], message["epoch"]) == (4, epoch)
                        assert message["state"]["items"] == DESIGN
                    # The session goes on: its next change follows the restore.
                    assert await command(bob, "move_item", "lens-1", x_mm=12.0) == 5
                    assert (await receive(alice, "command"))["seq"] == 5

        # A fresh client, and a resume from before the restore, get the design.
        async with tcp_client(port, "/ws/design/carol") as carol:
            assert (await receive(carol, "connection:ack"))["version"] == 5
            state = await sync_state(carol)
            assert state["version"] == 5
            assert state["state"]["items"] == [{**DESIGN[0], "x_mm": 12.0}, DESIGN[1]]
            await carol.send_message(json.dumps({"type": "sync:request", "since": 3, "epoch": epoch}))
            resumed = await receive(carol, "sync:state")  # a replacement can't be replayed as commands
            assert resumed["state"]["items"] == state["state"]["items"]
            await carol.send_message(json.dumps({"type": "sync:request", "since": 4, "epoch": epoch}))
            ops = await receive(carol, "sync:ops")
            assert [op["seq"] for op in ops["ops"]] == [5]
        # The restore kept what it replaced: the degraded upload is version 2.
        versions = await history("design")
        assert [(v["version"], v["seq"], v["user_id"], v["replaced_by"]) for v in versions] == [
            (1, 2, "alice", "sync:full_state by alice (host)"),
            (2, 3, "(admin)", "restore of version 1"),
        ]
        await stop(server)
    # After a restart the design is still there.
    async with server_process() as server:
        async with tcp_client(server.port, "/ws/design/dave") as dave:
            await receive(dave, "connection:ack")
            state = await sync_state(dave)
            assert (state["version"], state["epoch"]) == (5, epoch)
            assert state["state"]["items"] == [{**DESIGN[0], "x_mm": 12.0}, DESIGN[1]]
        await stop(server)


async def test_restore_through_the_server_of_a_session_that_is_not_live(data_dir: Path) -> None:
    async with server_process() as server:
        async with tcp_client(server.port, "/ws/bench/alice") as alice:
            await receive(alice, "connection:ack")
            await build_design(alice)
            await alice.send_message(json.dumps({"type": "sync:update", "state": {"items": DEGRADED}}))
            assert (await receive(alice, "ack"))["seq"] == 3
        # alice left: the session unloads, and the server restores it in its store.
        await server.wait_for("Session bench closed: its last user left")
        assert [v["replaced_by"] for v in await history("bench")] == ["sync:update by alice"]
        assert await restore_by_server(server, "bench", 1) == (
            "Restored version 1 of session bench as op 4 by the running server (members connected to the session received it)\n"
        )
        await server.wait_for("Restored version 1 of session bench")
        assert "Session bench: a stored version was restored" not in server.output  # not through a session
        async with tcp_client(server.port, "/ws/bench/bob") as bob:
            assert (await receive(bob, "connection:ack"))["version"] == 4
            assert (await sync_state(bob))["state"]["items"] == DESIGN
        await stop(server)


async def test_restore_without_a_server_and_its_errors(data_dir: Path, store_kind: str) -> None:
    async with server_process() as server:
        async with tcp_client(server.port, "/ws/lab/alice") as alice:
            await receive(alice, "connection:ack")
            await build_design(alice)
            for n in range(3):  # a reconnect loop re-uploading the same state keeps one version
                await alice.send_message(json.dumps({"type": "sync:full_state", "state": {"items": DEGRADED}}))
                assert (await receive(alice, "ack"))["seq"] == 3 + n
        await stop(server)
    assert [v["replaced_by"] for v in await history("lab")] == ["sync:full_state by alice (host)"]
    table = (await ok("history", "lab")).splitlines()
    assert table[0].split() == ["VERSION", "REPLACED", "AT", "BY", "ITEMS", "SIZE", "REPLACED", "BY"]
    assert table[1].split()[0] == "1" and table[1].endswith("sync:full_state by alice (host)")
    assert await fails("history", "nope") == "error: no session 'nope'"
    assert await fails("restore", "nope", "--version", "1", "--yes") == "error: no session 'nope'"
    assert await fails("restore", "lab", "--version", "7", "--yes") == (
        "error: session 'lab' has no version 7 (it has versions 1-1)"
    )
    # Without a terminal to ask on, --yes is needed: exit status 2, nothing done.
    result = await sessions("restore", "lab", "--version", "1")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "error: `sessions restore` changes stored data and stdin is not a terminal to confirm on;"
        " add --yes to go ahead\n"
    )
    assert len(await history("lab")) == 1
    # No server: restored here, in one transaction (Postgres: with the
    # session's lease row locked, so that no node loads it meanwhile).
    nobody = "no node serves it" if store_kind == "postgres" else "no server running"
    assert await ok("restore", "lab", "--version", "1", "--yes") == (
        f"Restored version 1 of session lab as op 6 ({nobody})\n"
    )
    exported = json.loads(await ok("export", "lab"))
    assert (exported["version"], exported["items"]) == (6, DESIGN)
    assert [v["replaced_by"] for v in await history("lab")] == [
        "sync:full_state by alice (host)",
        "restore of version 1",
    ]


async def test_restore_says_so_when_the_server_does_not_answer(data_dir: Path, tmp_path: Path) -> None:
    """A process holds the data directory's lock but carries out no requests
    (a hung server): the command gives up after --timeout, withdraws its
    request, and nothing was restored."""
    database = Database(database_path(data_dir))
    try:
        database.run(lambda d: d.import_state("s", DESIGN))
        database.run(lambda d: d.import_state("s", DEGRADED))  # DESIGN is kept as version 1
    finally:
        database.close()
    holder = await trio.lowlevel.open_process(
        [sys.executable, "-c", HOLD_LOCK, str(data_dir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=child_env(),
    )
    try:
        assert holder.stdout is not None
        said = b""
        with trio.fail_after(HANG):
            while not said.endswith(b"\n"):
                chunk = await holder.stdout.receive_some(100)
                assert chunk, said  # the holder died
                said += chunk
        assert said == b"locked\n"
        result = await sessions("restore", "s", "--version", "1", "--yes", "--timeout", "1.5")
        assert (result.returncode, result.stdout) == (1, "")
        lines = result.stderr.splitlines()
        assert lines[0] == f"Asked the running server (pid {holder.pid}) to restore it; waiting up to 1.5 s"
        assert lines[-1] == f"error: the server (pid {holder.pid}) did not answer within 1.5 s; nothing was restored"
        assert "still waiting for the server (1 s)" in lines[1]
    finally:
        holder.kill()
        await holder.wait()
    database = Database(database_path(data_dir))
    try:
        assert database.read(lambda d: d.conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]) == 0
        document = database.read(lambda d: d.load("s"))
        assert list(document.items.values()) == DEGRADED  # nothing restored
    finally:
        database.close()


# Takes the data directory's lock as a server would, then does nothing.
HOLD_LOCK = """
import sys, time
from pathlib import Path
from collab_trio.store.sqlite import lock_data_dir
lock_data_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


# -- admin ergonomics: --json, confirmation, --dry-run ---------------------------------------


def seed(data_dir: Path, sessions_items: dict[str, list[dict[str, Any]]]) -> None:
    """Store sessions with these items (by import), without a server."""
    database = Database(database_path(data_dir))
    try:
        for session_id, items in sessions_items.items():
            database.run(lambda d, s=session_id, i=items: d.import_state(s, i))
    finally:
        database.close()


async def test_list_and_show_print_json_with_stable_keys(data_dir: Path) -> None:
    seed(data_dir, {"lab": DESIGN, "bench": DEGRADED[:1]})
    seed(data_dir, {"lab": DEGRADED})  # DESIGN becomes version 1 of lab
    keys = ["session_id", "items", "version", "epoch", "created_at", "updated_at", "size_bytes", "versions",
            "unreadable"]
    listed = json.loads(await ok("list", "--json"))
    assert [list(row) for row in listed] == [keys, keys]
    assert [(r["session_id"], r["items"], r["version"], r["versions"], r["unreadable"]) for r in listed] == [
        ("bench", 1, 1, 0, None),
        ("lab", 2, 1, 1, None),
    ]
    shown = json.loads(await ok("show", "lab", "--json"))
    assert list(shown) == [*keys, "contents"]
    assert {k: shown[k] for k in keys} == listed[1]
    assert shown["contents"] == [{"uuid": "lens-1", "item_type": "lens"}, {"uuid": "mirror-1", "item_type": "mirror"}]
    assert json.loads(await ok("history", "bench", "--json")) == []
    assert "versions:      1 (sessions history)" in (await ok("show", "lab")).splitlines()


async def test_destructive_commands_need_yes_without_a_terminal(data_dir: Path, tmp_path: Path) -> None:
    seed(data_dir, {"lab": DESIGN})
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"items": DEGRADED}), encoding="utf-8")
    for args in (("delete", "lab"), ("prune", "--older-than", "0"), ("import", str(state), "--as", "lab")):
        result = await sessions(*args)
        assert (result.returncode, result.stdout) == (2, ""), result
        assert result.stderr == (
            f"error: `sessions {args[0]}` changes stored data and stdin is not a terminal to confirm on;"
            " add --yes to go ahead\n"
        )
    assert json.loads(await ok("export", "lab"))["items"] == DESIGN  # nothing changed
    # An import into a new session replaces nothing: no question.
    assert (await ok("import", str(state), "--as", "fresh")).startswith("Imported 2 item(s) into session fresh")
    # prune --dry-run lists and deletes nothing, also without --yes.
    assert await ok("prune", "--older-than", "0", "--dry-run") == (
        "Would delete 2 session(s) with no activity for 0 day(s) (dry run: nothing deleted)\n"
        "  - fresh\n"
        "  - lab\n"
    )
    assert [r["session_id"] for r in json.loads(await ok("list", "--json"))] == ["fresh", "lab"]
    assert await ok("delete", "lab", "--yes") == "Deleted session lab\n"


async def test_destructive_commands_ask_on_a_terminal(data_dir: Path) -> None:
    seed(data_dir, {"lab": DESIGN})

    async def answer(text: str) -> tuple[int, str, str]:
        primary, secondary = os.openpty()
        try:
            os.write(primary, text.encode())
            with trio.fail_after(HANG):
                done = await trio.run_process(
                    [sys.executable, "-m", "collab_trio", "sessions", "delete", "lab"],
                    stdin=secondary, capture_stdout=True, capture_stderr=True, check=False, env=child_env(),
                )
        finally:
            os.close(primary)
            os.close(secondary)
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    assert await answer("n\n") == (
        1, "Delete session lab, its history and its versions? [y/N] ", "Cancelled; nothing was changed.\n"
    )
    assert json.loads(await ok("export", "lab"))["items"] == DESIGN
    assert await answer("y\n") == (
        0, "Delete session lab, its history and its versions? [y/N] Deleted session lab\n", ""
    )
    assert await fails("show", "lab") == "error: no session 'lab'"
