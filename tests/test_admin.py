"""`collab-trio sessions list|show|export|import|delete|prune` as real processes.

The data directory is filled by a real server through WebSocket clients; the
admin commands run while that server is still up (with its sessions live)
and again after it stopped.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from collab_trio.testing import HANG, ServerProcess, server_process, tcp_client

# One admin process: start Python, open SQLite, print.
ADMIN_TIMEOUT = 30
RESET_REASON = "session was reset by an administrator; reconnect"
SIZE = re.compile(r"^(\d+ B|\d+\.\d (KiB|MiB))$")


@attrs.frozen
class Result:
    """What an admin process did."""

    returncode: int
    stdout: str
    stderr: str


async def sessions(*args: str, stdin: bytes = b"") -> Result:
    """Run `collab-trio sessions ARGS` (data dir from $COLLAB_TRIO_DATA_DIR)."""
    with trio.fail_after(ADMIN_TIMEOUT):
        done = await trio.run_process(
            [sys.executable, "-m", "collab_trio", "sessions", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


async def ok(*args: str, stdin: bytes = b"") -> str:
    """stdout of an admin command that must succeed quietly."""
    result = await sessions(*args, stdin=stdin)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


async def fails(*args: str, stdin: bytes = b"") -> str:
    """The one-line error of an admin command that must fail cleanly."""
    result = await sessions(*args, stdin=stdin)
    assert result.returncode == 1, result
    assert result.stdout == "", result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- WebSocket clients ---------------------------------------------------------------


async def receive(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    """The next message of this type; presence notices on the way are skipped."""
    with trio.fail_after(HANG):
        while True:
            message = json.loads(await ws.get_message())
            if message["type"] == kind:
                return message
            assert message["type"] in ("user:joined", "user:left", "host:changed"), message


async def command(
    ws: WebSocketConnection, action: str, item_id: str, item_type: str = "lens", **data: Any
) -> int:
    """Send a command with an op_id; its seq once acknowledged."""
    op_id = secrets.token_hex(6)
    await ws.send_message(
        json.dumps(
            {
                "type": "command",
                "command": {"action": action, "item_type": item_type, "item_id": item_id, "data": data},
                "op_id": op_id,
            }
        )
    )
    ack = await receive(ws, "ack")
    assert ack["op_id"] == op_id
    return ack["seq"]


async def sync_state(ws: WebSocketConnection) -> dict[str, Any]:
    """Ask for the session state; the sync:state answer."""
    await ws.send_message(json.dumps({"type": "sync:request"}))
    return await receive(ws, "sync:state")


async def closed(ws: WebSocketConnection) -> tuple[int, str, list[dict[str, Any]]]:
    """Read until the server closes: (code, reason, messages read before)."""
    messages = []
    with trio.fail_after(HANG):
        while True:
            try:
                messages.append(json.loads(await ws.get_message()))
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason.code, exc.reason.reason or "", messages


@attrs.frozen
class Doc:
    """A session as a client saw it."""

    epoch: str
    version: int
    items: list[dict[str, Any]]


@attrs.define(eq=False)
class Populated:
    """A running server with stored sessions, and the clients still in them."""

    server: ServerProcess
    docs: dict[str, Doc]
    clients: dict[str, WebSocketConnection]

    @property
    def port(self) -> int:
        return self.server.port


async def stop(server: ServerProcess) -> None:
    """Graceful stop (SIGTERM); the server must exit 0."""
    if server.process.returncode is None:
        server.process.send_signal(signal.SIGTERM)
    with trio.fail_after(HANG):
        assert await server.process.wait() == 0, server.output


@asynccontextmanager
async def populated_server() -> AsyncIterator[Populated]:
    """A server with sessions `lab` (2 items, 3 changes) and `bench` (1 item).

    alice stays connected to lab and bob to bench: both sessions are live.
    """
    async with server_process() as server:
        async with (
            tcp_client(server.port, "/ws/lab/alice") as alice,
            tcp_client(server.port, "/ws/bench/bob") as bob,
        ):
            docs = {}
            for ws in (alice, bob):
                await receive(ws, "connection:ack")
            assert await command(alice, "add_item", "lens-1", x_mm=1.0, y_mm=2.0) == 1
            assert await command(alice, "add_item", "mirror-1", "mirror", x_mm=5.0, angle_deg=45.0) == 2
            assert await command(alice, "move_item", "lens-1", x_mm=3.5) == 3
            assert await command(bob, "add_item", "source-1", "source", x_mm=0.0, wavelength_nm=633.0) == 1
            for session, ws in (("lab", alice), ("bench", bob)):
                answer = await sync_state(ws)
                docs[session] = Doc(answer["epoch"], answer["version"], answer["state"]["items"])
            assert [i["uuid"] for i in docs["lab"].items] == ["lens-1", "mirror-1"]
            assert docs["lab"].items[0]["x_mm"] == 3.5
            yield Populated(server, docs, {"lab": alice, "bench": bob})
        await stop(server)


# -- list / show / export ------------------------------------------------------------


def parse_list(stdout: str) -> dict[str, dict[str, str]]:
    """The rows of `sessions list`, by session id."""
    lines = stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["SESSION", "ITEMS", "VERSION", "LAST ACTIVITY", "SIZE"], stdout
    rows = {}
    for line in lines[1:]:
        session, items, version, activity, size = re.split(r"\s{2,}", line)
        rows[session] = {"items": items, "version": version, "activity": activity, "size": size}
    return rows


def recent(timestamp: str) -> bool:
    """An ISO 8601 UTC timestamp of the last few minutes."""
    moment = datetime.fromisoformat(timestamp)
    age = datetime.now(timezone.utc) - moment
    return moment.utcoffset() == timedelta(0) and timedelta(0) <= age < timedelta(minutes=5)


def parse_show(stdout: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The `key: value` fields of `sessions show`, and its (uuid, item_type) lines."""
    fields: dict[str, str] = {}
    items: list[tuple[str, str]] = []
    for line in stdout.splitlines():
        if line.startswith("  - "):
            uuid, item_type = re.split(r"\s{2,}", line[4:])
            items.append((uuid, item_type))
        else:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields, items


async def check_list_show_export(docs: dict[str, Doc], tmp_path: Path) -> dict[str, dict[str, str]]:
    """list, show and export agree with what the clients saw; returns the list rows."""
    rows = parse_list(await ok("list"))
    assert sorted(rows) == ["bench", "lab"]
    for session, doc in docs.items():
        row = rows[session]
        assert (row["items"], row["version"]) == (str(len(doc.items)), str(doc.version))
        assert recent(row["activity"]), row
        assert SIZE.match(row["size"]) and row["size"] != "0 B", row

    fields, items = parse_show(await ok("show", "lab"))
    assert fields["session"] == "lab"
    assert (fields["items"], fields["version"], fields["epoch"]) == ("2", "3", docs["lab"].epoch)
    assert fields["last activity"] == rows["lab"]["activity"]
    assert recent(fields["created"]) and fields["created"] <= fields["last activity"]
    assert fields["size"] == rows["lab"]["size"]
    assert items == [("lens-1", "lens"), ("mirror-1", "mirror")]

    for session, doc in docs.items():
        exported = json.loads(await ok("export", session))
        assert sorted(exported) == ["items", "timestamp", "version"]
        assert exported["items"] == doc.items  # exactly what sync:state gives clients
        assert exported["version"] == doc.version
        assert recent(exported["timestamp"])

    target = tmp_path / "lab-export.json"
    message = await ok("export", "lab", "-o", str(target))
    assert message == f"Exported 2 item(s) of session lab to {target}\n"
    from_file = json.loads(target.read_text(encoding="utf-8"))
    assert (from_file["items"], from_file["version"]) == (docs["lab"].items, 3)
    return rows


async def test_list_show_export_while_running_and_after_stop(tmp_path: Path, store_kind: str) -> None:
    async with populated_server() as populated:
        # The sessions are live: alice and bob are still connected.
        running = await check_list_show_export(populated.docs, tmp_path)
        await stop(populated.server)
    stopped = await check_list_show_export(populated.docs, tmp_path)
    # The stop changes nothing but the size (the unload may store a snapshot).
    for session in running:
        assert {**running[session], "size": ""} == {**stopped[session], "size": ""}


async def test_list_of_an_empty_store(tmp_path: Path, store_kind: str) -> None:
    async with server_process() as server:
        # A server that never had a client has created the database, no session.
        where = os.environ["COLLAB_TRIO_DATABASE_URL"] if store_kind == "postgres" else tmp_path / "collab-data" / "collab.sqlite3"
        assert await ok("list") == f"No sessions stored in {where}\n"
        await stop(server)


# -- import ----------------------------------------------------------------------------

IMPORTED = re.compile(r"^Imported (\d+) item\(s\) into session (.+) \(new epoch (\w+)\)\n$")


async def import_state(path: Path | str, session: str, stdin: bytes = b"") -> tuple[int, str]:
    """(items, epoch) from `sessions import PATH --as SESSION`."""
    match = IMPORTED.match(await ok("import", str(path), "--as", session, "--yes", stdin=stdin))
    assert match is not None
    return int(match.group(1)), match.group(3)


async def joined_doc(port: int, path_session: str) -> Doc:
    """What a fresh client sees in a session: connection:ack, then sync:request."""
    async with tcp_client(port, f"/ws/{path_session}/reader") as ws:
        ack = await receive(ws, "connection:ack")
        answer = await sync_state(ws)
    assert (answer["epoch"], answer["version"]) == (ack["epoch"], ack["version"])
    assert answer["state"]["version"] == answer["version"]
    return Doc(answer["epoch"], answer["version"], answer["state"]["items"])


async def test_import_creates_a_session_with_a_new_epoch(tmp_path: Path, store_kind: str) -> None:
    exported = tmp_path / "lab.json"
    async with populated_server() as populated:
        lab = populated.docs["lab"]
        await ok("export", "lab", "-o", str(exported))
        count, epoch = await import_state(exported, "lab-copy")
        assert count == 2 and epoch != lab.epoch
        copy = await joined_doc(populated.port, "lab-copy")
        assert copy == Doc(epoch, 1, lab.items)
        # The import's own export is the same document.
        assert json.loads(await ok("export", "lab-copy"))["items"] == lab.items
        fields, _ = parse_show(await ok("show", "lab-copy"))
        assert (fields["epoch"], fields["items"], fields["version"]) == (epoch, "2", "1")
        # From stdin, as a bare list of items, into an id Optiverse sends percent-encoded.
        bare = json.dumps(populated.docs["bench"].items).encode()
        count, spaced_epoch = await import_state("-", "bench copy", stdin=bare)
        assert count == 1
        assert await joined_doc(populated.port, "bench%20copy") == Doc(
            spaced_epoch, 1, populated.docs["bench"].items
        )
        assert sorted(parse_list(await ok("list"))) == ["bench", "bench copy", "lab", "lab-copy"]
        # The original is untouched.
        assert await joined_doc(populated.port, "lab") == lab
        await stop(populated.server)

    # With the server stopped; the next server serves what was imported.
    count, offline_epoch = await import_state(exported, "offline")
    assert count == 2
    async with server_process() as server:
        assert await joined_doc(server.port, "offline") == Doc(offline_epoch, 1, lab.items)
        assert (await joined_doc(server.port, "lab-copy")).epoch == epoch
        await stop(server)


async def test_import_into_a_live_session_makes_its_clients_reconnect(tmp_path: Path, store_kind: str) -> None:
    replacement = [
        {"uuid": "grating-9", "item_type": "grating", "x_mm": 9.0, "lines_per_mm": 600},
        {"uuid": "lens-1", "item_type": "lens", "x_mm": -1.0},
    ]
    state_file = tmp_path / "replacement.json"
    state = {"items": replacement, "version": 77, "timestamp": "2026-01-01T00:00:00.000+00:00"}
    state_file.write_text(json.dumps(state), encoding="utf-8")
    async with populated_server() as populated:
        port, alice = populated.port, populated.clients["lab"]
        async with tcp_client(port, "/ws/lab/carol") as carol:
            await receive(carol, "connection:ack")
            await receive(alice, "user:joined")
            _, epoch = await import_state(state_file, "lab")
            assert epoch != populated.docs["lab"].epoch
            # The next change in the session fails (it was not stored), and
            # every member is closed so that they reload what is stored now.
            await alice.send_message(
                json.dumps(
                    {
                        "type": "command",
                        "command": {"action": "add_item", "item_type": "lens", "item_id": "late", "data": {}},
                        "op_id": "late-1",
                    }
                )
            )
            code, reason, messages = await closed(alice)
            assert (code, reason) == (1001, RESET_REASON)
            if store_kind == "sqlite":
                # The pending log made it durable at once (acknowledged,
                # relayed); the writer, storing it, finds the session
                # replaced: it goes with the old document.
                assert [(m["type"], m["op_id"]) for m in messages] == [("ack", "late-1")]
                code, reason, messages = await closed(carol)
                assert (code, reason) == (1001, RESET_REASON)
                assert [(m["type"], m["command"]["item_id"]) for m in messages] == [("command", "late")]
            else:
                assert [(m["type"], m["code"], m["ref"]) for m in messages] == [
                    ("error", "not_persisted", "command")
                ]
                code, reason, messages = await closed(carol)
                assert (code, reason, messages) == (1001, RESET_REASON, [])  # nothing relayed
        # bench is another session: untouched, still live.
        bob = populated.clients["bench"]
        assert await command(bob, "add_item", "source-2", "source") == 2
        # Reconnected, the clients see the imported document, without the failed change.
        async with tcp_client(port, "/ws/lab/alice") as alice:
            ack = await receive(alice, "connection:ack")
            assert (ack["epoch"], ack["version"]) == (epoch, 1)
            answer = await sync_state(alice)
            assert answer["state"]["items"] == replacement
            assert await command(alice, "move_item", "grating-9", x_mm=10.0) == 2
        exported = json.loads(await ok("export", "lab"))
        assert exported["version"] == 2
        assert exported["items"] == [{**replacement[0], "x_mm": 10.0}, replacement[1]]
        await stop(populated.server)


# -- delete / prune ----------------------------------------------------------------------


@pytest.mark.parametrize("server_running", [True, False], ids=["server-running", "server-stopped"])
async def test_delete_and_prune(server_running: bool, store_kind: str) -> None:
    async with populated_server() as populated:
        async with tcp_client(populated.port, "/ws/scratch/eve") as eve:
            await receive(eve, "connection:ack")
            await command(eve, "add_item", "tmp", "lens")
        if not server_running:
            await stop(populated.server)
        assert sorted(parse_list(await ok("list"))) == ["bench", "lab", "scratch"]

        assert await ok("delete", "scratch", "--yes") == "Deleted session scratch\n"
        assert sorted(parse_list(await ok("list"))) == ["bench", "lab"]
        assert await fails("show", "scratch") == "error: no session 'scratch'"

        pruned = await ok("prune", "--older-than", "365", "--yes")
        assert pruned == "Deleted 0 session(s) with no activity for 365 day(s)\n"
        assert sorted(parse_list(await ok("list"))) == ["bench", "lab"]

        assert await ok("prune", "--older-than", "0", "--yes") == (
            "Deleted 2 session(s) with no activity for 0 day(s)\n  - bench\n  - lab\n"
        )
        assert (await ok("list")).startswith("No sessions stored in ")
        if server_running:
            # Live clients of a deleted session are closed on their next change.
            alice = populated.clients["lab"]
            await alice.send_message(
                json.dumps({"type": "command", "command": {"action": "remove_item", "item_id": "lens-1"}})
            )
            code, reason, _ = await closed(alice)
            assert (code, reason) == (1001, RESET_REASON)
            # A returning client finds a new, empty session.
            async with tcp_client(populated.port, "/ws/lab/alice") as alice:
                ack = await receive(alice, "connection:ack")
                assert ack["version"] == 0 and ack["epoch"] != populated.docs["lab"].epoch
                assert (await sync_state(alice))["state"] is None


# -- errors ------------------------------------------------------------------------------


async def check_errors(tmp_path: Path) -> None:
    """Every refused admin command says why in one line, and changes nothing."""
    for action in ("show", "export", "delete"):
        assert await fails(action, "nope") == "error: no session 'nope'", action
    assert await fails("export", "nope", "-o", str(tmp_path / "nope.json")) == "error: no session 'nope'"
    assert not (tmp_path / "nope.json").exists()

    missing = await fails("list", "--data-dir", "/nonexistent/x")
    assert missing == "error: no collab-trio data at /nonexistent/x/collab.sqlite3"
    assert not Path("/nonexistent").exists()

    not_json = tmp_path / "notes.txt"
    not_json.write_text("items: lens-1, mirror-1\n", encoding="utf-8")
    assert (await fails("import", str(not_json), "--as", "x")).startswith(f"error: {not_json} is not JSON: ")
    compressed = tmp_path / "lab.json.gz"
    compressed.write_bytes(gzip.compress(b'{"items": []}'))
    not_text = await fails("import", str(compressed), "--as", "x")
    assert not_text == f"error: {compressed} is not a UTF-8 text file"
    no_items = tmp_path / "no-items.json"
    for content in ({"version": 3}, {"items": "lens-1"}, {"items": [1, 2]}, 42):
        no_items.write_text(json.dumps(content), encoding="utf-8")
        error = await fails("import", str(no_items), "--as", "x")
        assert error == f'error: {no_items} has no "items" list of objects', content
    no_items.write_text(json.dumps({"items": [{"item_type": "lens"}]}), encoding="utf-8")
    assert await fails("import", str(no_items), "--as", "x") == f'error: {no_items}: item 0 has no "uuid"'
    assert (await fails("import", str(tmp_path / "absent.json"), "--as", "x")).startswith(
        f"error: cannot read {tmp_path / 'absent.json'}: "
    )
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"items": [{"uuid": "a", "item_type": "lens"}]}), encoding="utf-8")
    for bad_id, reason in (
        ("a/b", "session id must not contain '/'"),
        ("a\tb", "session id must not contain control characters"),
        ("", "session id is empty"),
        ("x" * 65, "session id is 65 characters long; the limit is 64"),
    ):
        assert await fails("import", str(good), "--as", bad_id) == f"error: {reason}", bad_id
    # None of the failures changed anything.
    assert sorted(parse_list(await ok("list"))) == ["bench", "lab"]


@pytest.mark.parametrize("server_running", [True, False], ids=["server-running", "server-stopped"])
async def test_errors_are_one_line_without_traceback(server_running: bool, tmp_path: Path) -> None:
    async with populated_server() as populated:
        if not server_running:
            await stop(populated.server)
        await check_errors(tmp_path)
        if server_running:
            # The server did not notice.
            assert await command(populated.clients["lab"], "add_item", "after-errors") == 4
