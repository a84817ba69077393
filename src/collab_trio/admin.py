"""`collab-trio sessions ...`: look after stored sessions, also while the server runs.

These run plain sqlite3 against the data directory, beside a running server
(they never take its data-directory lock). list, show, export and backup use
a read-only connection and read transactions: in WAL mode a reader never
blocks the server's commits, however big the database. import, delete and
prune are short write transactions that wait (busy timeout) for the
server's current commit to end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .protocol import HandshakeRejected, check_id
from .store import StoreError
from .store.database import Database, SessionInfo, database_path


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


READS = ("list", "show", "export", "backup")


def _open(data_dir: str, *, readonly: bool) -> Database:
    return Database(database_path(data_dir), create=False, readonly=readonly)


def _print_list(infos: list[SessionInfo]) -> int:
    """The table of `sessions list`; 1 if any session was unreadable (after printing all)."""
    rows = [("SESSION", "ITEMS", "VERSION", "LAST ACTIVITY", "SIZE")]
    rows += [
        (
            i.session_id,
            "?" if i.items is None else str(i.items),
            str(i.version),
            i.updated_at,
            _human_size(i.size_bytes),
        )
        for i in infos
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    problems = {i.session_id: i.unreadable for i in infos if i.unreadable is not None}
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths))
        if row[0] in problems and row is not rows[0]:
            line += f"  unreadable: {problems[row[0]]}"
        print(line.rstrip())
    if problems:
        sys.stdout.flush()
        print(f"error: {len(problems)} session(s) unreadable: {', '.join(problems)}", file=sys.stderr)
        return 1
    return 0


def _read_state(path: str) -> list[dict[str, Any]]:
    """Items of an exported state file (or of a bare list of items)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise StoreError(f"{path} is not a UTF-8 text file") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise StoreError(f"{path} is nested too deeply to be a session state") from None
    items = data.get("items") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise StoreError(f'{path} has no "items" list of objects')
    for index, item in enumerate(items):
        uuid = item.get("uuid", item.get("item_uuid"))
        if not isinstance(uuid, str) or not uuid:
            raise StoreError(f'{path}: item {index} has no "uuid"')
    return items


def run_sessions_command(args: argparse.Namespace) -> int:
    """Run one `sessions` action; print errors in one line and return 1."""
    try:
        return _run(args)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    action = args.action
    if action == "import":
        try:
            session_id = check_id(args.session_id, "session id")
        except HandshakeRejected as exc:
            raise StoreError(exc.reason) from None
        items = _read_state(args.file)
        db = Database(database_path(args.data_dir))
        try:
            epoch = db.run(lambda d: d.import_state(session_id, items))
        finally:
            db.close()
        print(f"Imported {len(items)} item(s) into session {session_id} (new epoch {epoch})")
        return 0
    db = _open(args.data_dir, readonly=action in READS)
    try:
        if action == "list":
            # One read transaction, no document loaded: see Database.summaries.
            infos = db.read(lambda d: d.summaries())
            if not infos:
                print(f"No sessions stored in {db.path}")
                return 0
            return _print_list(infos)
        elif action == "show":
            info, state = db.read(lambda d: (d.info(args.session_id), d.export(args.session_id)))
            print(f"session:       {info.session_id}")
            print(f"items:         {info.items}")
            print(f"version:       {info.version}")
            print(f"epoch:         {info.epoch}")
            print(f"created:       {info.created_at}")
            print(f"last activity: {info.updated_at}")
            print(f"size:          {_human_size(info.size_bytes)}")
            for item in state["items"]:
                print(f"  - {item.get('uuid')}  {item.get('item_type', '?')}")
        elif action == "export":
            state = db.read(lambda d: d.export(args.session_id))
            text = json.dumps(state, ensure_ascii=False, indent=2) + "\n"
            if args.output:
                Path(args.output).write_text(text, encoding="utf-8")
                print(f"Exported {len(state['items'])} item(s) of session {args.session_id} to {args.output}")
            else:
                sys.stdout.write(text)
        elif action == "delete":
            db.run(lambda d: d.delete(args.session_id))
            print(f"Deleted session {args.session_id}")
        elif action == "backup":
            db.backup(args.file)
            print(f"Backed up {db.path} to {args.file}")
        elif action == "prune":
            ids = db.run(lambda d: d.prune(args.older_than))
            print(f"Deleted {len(ids)} session(s) with no activity for {args.older_than:g} day(s)")
            for session_id in ids:
                print(f"  - {session_id}")
        else:
            raise AssertionError(f"unhandled action {action!r}")
    finally:
        db.close()
    return 0
