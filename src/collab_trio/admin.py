"""`collab-trio sessions ...`: look after stored sessions, also while the server runs.

These run plain sqlite3 against the data directory, beside a running server
(they never take its data-directory lock). list, show, history, export and
backup use a read-only connection and read transactions: in WAL mode a
reader never blocks the server's commits, however big the database. import,
delete and prune are short write transactions that wait (busy timeout) for
the server's current commit to end; a live session they replace or delete
closes its members (1001) at its next commit (a change the server's
pending log had already acknowledged goes with the replaced document, and
its session's members are closed as soon as the writer finds out).

restore does not: when a server holds the data directory (its lock, see
store/sqlite.py) it adds a row to the `requests` table and waits, bounded,
for the server to carry it out through the live session (members receive
the document) and record the op's seq; with no server it takes the lock
itself (so none starts meanwhile) and restores in one transaction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .history import VersionInfo
from .protocol import HandshakeRejected, check_id
from .store import SessionElsewhere, StoreError
from .store.database import DONE, FAILED, Database, SessionInfo, database_path
from .store.pending_log import replay, segment_numbers
from .store.sqlite import DataDirInUse, data_dir_in_use, lock_data_dir


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


READS = ("list", "show", "history", "export", "backup")


def _open(args: argparse.Namespace, *, readonly: bool, create: bool = False) -> Database:
    """The data directory's database, or the Postgres store's with --database-url."""
    url = getattr(args, "database_url", None)
    if url:
        from .store.postgres import PgDatabase

        return PgDatabase(url)
    if create:
        return Database(database_path(args.data_dir))
    return Database(database_path(args.data_dir), create=False, readonly=readonly)


def _settle_pending(args: argparse.Namespace, db: Database) -> None:
    """Before a command writes the database of a data directory no server
    holds: store what the pending log of a server stopped by force still
    holds (acknowledged changes), as that server's next start would. A
    running server's log is its own."""
    if getattr(args, "database_url", None):
        return
    data_dir = Path(args.data_dir)
    if not segment_numbers(data_dir):
        return
    try:
        fd = lock_data_dir(data_dir)
    except DataDirInUse:
        return  # a running server's log is its own
    try:
        replay(db, data_dir)
    finally:
        os.close(fd)


def _warn_pending(args: argparse.Namespace) -> None:
    """A read of a data directory whose stopped server left acknowledged
    changes in its pending log: they are not in what is read."""
    if getattr(args, "database_url", None):
        return
    data_dir = Path(args.data_dir)
    if segment_numbers(data_dir) and not data_dir_in_use(data_dir):
        print(
            f"warning: {data_dir}/pending-*.log holds changes a server acknowledged before it was"
            " stopped by force; they are stored (and seen here) once a server starts on this"
            " directory, or a sessions command that writes runs",
            file=sys.stderr,
        )


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
        data = json.loads(text, parse_constant=_not_json)
    except ValueError as exc:
        raise StoreError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise StoreError(f"{path} is nested too deeply to be a session state") from None
    items = data.get("items") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise StoreError(f'{path} has no "items" list of objects')
    seen: set[str] = set()
    for index, item in enumerate(items):
        uuid = item.get("uuid", item.get("item_uuid"))
        if not isinstance(uuid, str) or not uuid:
            raise StoreError(f'{path}: item {index} has no "uuid"')
        if uuid in seen:
            raise StoreError(f"{path}: item {index} repeats uuid {uuid!r} (one item would replace the other)")
        seen.add(uuid)
    return items


def _not_json(constant: str) -> Any:
    # json.loads takes NaN and Infinity; the store would write them as null.
    raise ValueError(f"{constant} is not a JSON value")


class NeedsConfirmation(Exception):
    """A destructive command without --yes where nobody can be asked (exit 2)."""


class Declined(Exception):
    """The user answered no (nothing changed)."""


def _confirm(args: argparse.Namespace, question: str) -> None:
    """Ask on the terminal unless --yes; without a terminal, --yes is needed.

    Raises:
        NeedsConfirmation: stdin is not a terminal and --yes was not given.
        Declined: the answer was not yes.
    """
    if getattr(args, "yes", False):
        return
    if not sys.stdin.isatty():
        raise NeedsConfirmation(
            f"`sessions {args.action}` changes stored data and stdin is not a terminal to confirm on;"
            " add --yes to go ahead"
        )
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise Declined


def run_sessions_command(args: argparse.Namespace) -> int:
    """Run one `sessions` action; print errors in one line and return 1 (2: --yes needed)."""
    try:
        return _run(args)
    except NeedsConfirmation as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Declined:
        print("Cancelled; nothing was changed.", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def _run(args: argparse.Namespace) -> int:
    action = args.action
    if action == "import":
        try:
            session_id = check_id(args.session_id, "session id")
        except HandshakeRejected as exc:
            raise StoreError(exc.reason) from None
        items = _read_state(args.file)
        db = _open(args, readonly=False, create=True)
        try:
            if db.read(lambda d: d.exists(session_id)):
                _confirm(args, f"Replace the document of session {session_id} (it is kept as a version)?")
            _settle_pending(args, db)
            epoch = db.run(lambda d: d.import_state(session_id, items))
        finally:
            db.close()
        print(f"Imported {len(items)} item(s) into session {session_id} (new epoch {epoch})")
        return 0
    db = _open(args, readonly=action in READS)
    try:
        if action in READS:
            _warn_pending(args)
        if action == "list":
            # One read transaction, no document loaded: see Database.summaries.
            infos = db.read(lambda d: d.summaries())
            if getattr(args, "json", False):
                _print_json([i.to_json() for i in infos])
                return 1 if any(i.unreadable for i in infos) else 0
            if not infos:
                print(f"No sessions stored in {db.path}")
                return 0
            return _print_list(infos)
        elif action == "show":
            info, state = db.read(lambda d: (d.info(args.session_id), d.export(args.session_id)))
            if getattr(args, "json", False):
                contents = [{"uuid": i.get("uuid"), "item_type": i.get("item_type")} for i in state["items"]]
                _print_json({**info.to_json(), "contents": contents})
                return 0
            print(f"session:       {info.session_id}")
            print(f"items:         {info.items}")
            print(f"version:       {info.version}")
            print(f"epoch:         {info.epoch}")
            print(f"created:       {info.created_at}")
            print(f"last activity: {info.updated_at}")
            print(f"size:          {_human_size(info.size_bytes)}")
            print(f"versions:      {info.versions} (sessions history)")
            for item in state["items"]:
                print(f"  - {item.get('uuid')}  {item.get('item_type', '?')}")
        elif action == "history":
            versions = db.read(lambda d: d.history(args.session_id))
            if getattr(args, "json", False):
                _print_json([v.to_json() for v in versions])
                return 0
            _print_history(args.session_id, versions)
        elif action == "restore":
            return _restore(db, args)
        elif action == "export":
            state = db.read(lambda d: d.export(args.session_id))
            text = json.dumps(state, ensure_ascii=False, indent=2) + "\n"
            if args.output:
                Path(args.output).write_text(text, encoding="utf-8")
                print(f"Exported {len(state['items'])} item(s) of session {args.session_id} to {args.output}")
            else:
                sys.stdout.write(text)
        elif action == "delete":
            if not db.read(lambda d: d.exists(args.session_id)):
                raise StoreError(f"no session {args.session_id!r}")
            _confirm(args, f"Delete session {args.session_id}, its history and its versions?")
            _settle_pending(args, db)
            db.run(lambda d: d.delete(args.session_id))
            print(f"Deleted session {args.session_id}")
        elif action == "backup":
            db.backup(args.file)
            print(f"Backed up {db.path} to {args.file}")
        elif action == "prune":
            days = f"{args.older_than:g} day(s)"
            if getattr(args, "dry_run", False):
                ids = db.read(lambda d: d.stale(args.older_than))
                print(f"Would delete {len(ids)} session(s) with no activity for {days} (dry run: nothing deleted)")
            else:
                stale = db.read(lambda d: d.stale(args.older_than))
                if stale:
                    _confirm(args, f"Delete {len(stale)} session(s) with no activity for {days}?")
                _settle_pending(args, db)
                ids = db.run(lambda d: d.prune(args.older_than))
                print(f"Deleted {len(ids)} session(s) with no activity for {days}")
            for session_id in ids:
                print(f"  - {session_id}")
        else:
            raise AssertionError(f"unhandled action {action!r}")
    finally:
        db.close()
    return 0


def _print_history(session_id: str, versions: list[VersionInfo]) -> None:
    if not versions:
        print(f"No versions kept of session {session_id}")
        return
    rows = [("VERSION", "REPLACED AT", "BY", "ITEMS", "SIZE", "REPLACED BY")]
    rows += [
        (str(v.number), v.replaced_at, v.user_id, str(v.items), _human_size(v.bytes), v.reason)
        for v in versions
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# How often a restore waiting for the server looks at its request, and says it waits.
REQUEST_CHECK = 0.1
PROGRESS_EVERY = 1.0


def _restore(db: Database, args: argparse.Namespace) -> int:
    """Restore a version: by the running server if there is one (its live
    session's members get the document), else here in one transaction."""
    session_id, number = args.session_id, args.version
    # Unknown session or version: said at once, before asking anything.
    items = db.read(lambda d: d.version_items(session_id, number))
    _confirm(args, f"Make version {number} ({len(items)} item(s)) the document of session {session_id}?")
    if getattr(args, "database_url", None):
        # The lease row, locked, says whether a live node serves the session.
        try:
            seq = db.run(lambda d: d.restore(session_id, number))
        except SessionElsewhere as exc:
            return _restore_by_server(db, args, f"node {exc.owner}")
        print(f"Restored version {number} of session {session_id} as op {seq} (no node serves it)")
        return 0
    data_dir = Path(args.data_dir)
    try:
        fd = lock_data_dir(data_dir)
    except DataDirInUse as exc:
        return _restore_by_server(db, args, f"(pid {exc.pid})" if exc.pid else "(pid unknown)")
    try:
        # No server runs, and none can start on the directory until this is done.
        # What a server stopped by force left in its pending log goes first.
        replay(db, data_dir)
        seq = db.run(lambda d: d.restore(session_id, number))
    finally:
        os.close(fd)
    print(f"Restored version {number} of session {session_id} as op {seq} (no server running)")
    return 0


def _restore_by_server(db: Database, args: argparse.Namespace, server: str) -> int:
    """Ask the server holding the data directory (or the node serving the
    session) to restore, and wait for its answer."""
    session_id, number = args.session_id, args.version
    request = db.run(lambda d: d.add_request(session_id, "restore", number, timeout=args.timeout))
    started = time.monotonic()
    said = started
    print(f"Asked the running server {server} to restore it; waiting up to {args.timeout:g} s", file=sys.stderr)
    while True:
        state, seq, error = db.read(lambda d: d.request_outcome(request))
        if state in (DONE, FAILED):
            db.run(lambda d: d.withdraw_request(request))
            if error is not None:
                raise StoreError(f"the server could not restore version {number} of session {session_id}: {error}")
            print(f"Restored version {number} of session {session_id} as op {seq} by the running server (members connected to the session received it)")
            return 0
        now = time.monotonic()
        if now - started >= args.timeout:
            taken = not db.run(lambda d: d.withdraw_request(request))
            if taken:
                raise StoreError(
                    f"the server {server} took the request but did not finish within {args.timeout:g} s;"
                    f" see `sessions history {session_id}` for what happened"
                )
            raise StoreError(f"the server {server} did not answer within {args.timeout:g} s; nothing was restored")
        if now - said >= PROGRESS_EVERY:
            said = now
            print(f"  still waiting for the server ({now - started:.0f} s)", file=sys.stderr)
        time.sleep(REQUEST_CHECK)
