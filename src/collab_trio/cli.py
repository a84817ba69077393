"""The `collab-trio` command line."""

from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import math
import importlib.metadata
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from . import __version__, settings
from .admin import run_sessions_command
from .auth import TokensFileError
from .config import (
    DATA_DIR_ENV,
    DATABASE_URL_ENV,
    DEFAULT_PORT,
    FSYNC_MODES,
    MIB,
    STORES,
    ServerConfig,
    normalize_base_path,
    split_address,
    trusted_network,
)
from .exceptions import leaf_exceptions
from .metrics import MetricsAddressError
from .logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from .server import CollabServer, serve, tls_context_from
from .store import StoreError
from .store.database import REQUEST_TTL
from .store.sqlite import database_path

log = logging.getLogger("collab_trio")

# Exit status after a second Ctrl+C (128 + SIGINT, as shells report it).
EXIT_FORCED = 130


def byte_size(text: str) -> int:
    """Parse a byte size such as 1048576, 512K, 1M or 1MiB."""
    units = {"": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": MIB, "mb": MIB, "mib": MIB}
    raw = text.strip().lower()
    number = raw.rstrip("kmib")
    unit = raw[len(number):]
    try:
        value = int(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1048576, 512K or 1M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def _positive_number(unit: str) -> Callable[[str], float]:
    """An argparse type: a positive number of `unit` ("seconds", ...)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{unit} must be positive")
        return value

    return parse


_seconds = _positive_number("seconds")
_rate = _positive_number("messages per second")


def _wait_seconds(text: str) -> float:
    """`sessions restore --timeout`: at most a day, as long as a request is kept (store.database.REQUEST_TTL)."""
    value = _seconds(text)
    if value > REQUEST_TTL.total_seconds():
        raise argparse.ArgumentTypeError(f"at most {REQUEST_TTL.total_seconds():g} seconds (a day)")
    return value


def _delay(text: str) -> float:
    """Seconds that may be 0 (fault injection: 0 means no delay)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError("seconds must not be negative")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("port must be between 0 and 65535 (0 picks a free one)")
    return value


def _address(text: str) -> str:
    try:
        split_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _base_path(text: str) -> str:
    try:
        return normalize_base_path(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _trusted_proxy(text: str) -> str:
    try:
        return str(trusted_network(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The most `--older-than` takes (a cutoff further back overflows datetime).
MAX_DAYS = 36500


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("days must be a number from 0 to 36500")
    if value > MAX_DAYS:
        raise argparse.ArgumentTypeError(f"at most {MAX_DAYS} days (100 years)")
    return value


def _add_data_dir(parser: argparse.ArgumentParser, *, from_env: bool = True) -> None:
    # `serve` reads $COLLAB_TRIO_DATA_DIR like every other COLLAB_TRIO_* variable
    # (settings.py), so that a config file can't override it.
    # (Empty counts as unset, as for `serve`: settings.py.)
    default = (os.environ.get(DATA_DIR_ENV, "").strip() if from_env else "") or ServerConfig().data_dir
    parser.add_argument(
        "--data-dir", default=default, metavar="DIR",
        help=f"where sessions are stored (default: ${DATA_DIR_ENV} or ./collab-data)",
    )


def _add_database_url(parser: argparse.ArgumentParser, *, from_env: bool = True) -> None:
    # `serve` reads $COLLAB_TRIO_DATABASE_URL through settings.py, like --data-dir.
    default = (os.environ.get(DATABASE_URL_ENV, "").strip() or None) if from_env else None
    parser.add_argument(
        "--database-url", default=default, metavar="URL",
        help="postgresql://... : the sessions of the postgres store"
        + (f" (default: ${DATABASE_URL_ENV}; else --data-dir)" if from_env else " (with --store postgres)"),
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (stable keys; see the README)")


def _add_yes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-y", "--yes", action="store_true",
        help="don't ask for confirmation (needed when stdin is not a terminal)",
    )


def _add_sessions_commands(commands: argparse._SubParsersAction) -> None:
    sessions = commands.add_parser(
        "sessions",
        help="list, show, export, import, delete, prune, back up or restore stored sessions",
        description="Manage stored sessions; safe while the server runs.",
    )
    actions = sessions.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="every stored session with its size")
    _add_json(listing)
    _add_data_dir(listing)
    _add_database_url(listing)
    show = actions.add_parser("show", help="one session's details and items")
    show.add_argument("session_id")
    _add_json(show)
    _add_data_dir(show)
    _add_database_url(show)
    history = actions.add_parser("history", help="the versions kept of a session's replaced documents")
    history.add_argument("session_id")
    _add_json(history)
    _add_data_dir(history)
    _add_database_url(history)
    restore = actions.add_parser(
        "restore", help="make a kept version the session's document again (also while it is live)"
    )
    restore.add_argument("session_id")
    restore.add_argument("--version", type=_count, required=True, metavar="N", help="the version (see history)")
    restore.add_argument(
        "--timeout", type=_wait_seconds, default=10.0, metavar="SECONDS",
        help="how long to wait for a running server to carry it out (default: %(default)g)",
    )
    _add_yes(restore)
    _add_data_dir(restore)
    _add_database_url(restore)
    export = actions.add_parser("export", help="a session's document as Optiverse state JSON")
    export.add_argument("session_id")
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    _add_data_dir(export)
    _add_database_url(export)
    load = actions.add_parser("import", help="make a JSON state the whole document of a session")
    load.add_argument("file", help="a JSON file from `sessions export` (or {\"items\": [...]})")
    load.add_argument("--as", dest="session_id", required=True, metavar="ID", help="the session to create or replace")
    _add_yes(load)
    _add_data_dir(load)
    _add_database_url(load)
    delete = actions.add_parser("delete", help="remove a session, its history and its versions")
    delete.add_argument("session_id")
    _add_yes(delete)
    _add_data_dir(delete)
    _add_database_url(delete)
    backup = actions.add_parser("backup", help="copy the whole database, consistently, while it is in use")
    backup.add_argument("file", help="the new database file to write")
    _add_data_dir(backup)
    _add_database_url(backup)
    prune = actions.add_parser("prune", help="delete sessions with no activity for a while")
    prune.add_argument("--older-than", type=_days, required=True, metavar="DAYS")
    prune.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    _add_yes(prune)
    _add_data_dir(prune)
    _add_database_url(prune)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="collab-trio",
        description="Real-time collaboration server for Optiverse (WebSocket, trio).",
    )
    parser.add_argument("--version", action="version", version=f"collab-trio {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    defaults = ServerConfig()
    run = commands.add_parser(
        "serve",
        help="run the collaboration server",
        description="Run the server. Clients connect to ws://HOST:PORT/ws/{session}/{user}.",
        epilog="Every option can also be set in the --config file (max-message-size = \"2M\") or as"
        " COLLAB_TRIO_<OPTION> (COLLAB_TRIO_MAX_MESSAGE_SIZE=2M): the command line wins, then the"
        " environment, then the file. SIGHUP reloads the --tokens file.",
    )
    run.add_argument(
        "--host", default=defaults.host,
        help="address to listen on; \"\" for every interface, IPv4 and IPv6 (default: %(default)s, every IPv4 one)",
    )
    run.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT,
        help="TCP port; 0 picks a free one (default: %(default)s)",
    )
    run.add_argument(
        "--config", metavar="FILE",
        help="read settings from this TOML file (docs/CONFIGURATION.md); also $COLLAB_TRIO_CONFIG",
    )
    run.add_argument(
        "--print-config", action="store_true",
        help="print the effective settings, and where each came from, as TOML; then exit",
    )
    run.add_argument(
        "--debug", action="store_true",
        help="log every connection event and error sent, with tracebacks (--log-level debug)",
    )
    run.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="least severe messages logged (default: %(default)s)"
    )
    run.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text",
        help="text lines, or one JSON object per line (default: %(default)s)",
    )
    run.add_argument(
        "--metrics-address", type=_address, metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /livez and /readyz over HTTP here; off by default."
        " Bind 127.0.0.1 or a private interface; port 0 picks a free one",
    )
    run.add_argument(
        "--max-message-size", type=byte_size, default=defaults.max_message_size, metavar="BYTES",
        help="largest message accepted; larger ones close with 1009 (default: 1M)",
    )
    run.add_argument(
        "--idle-timeout", type=_seconds, default=defaults.idle_timeout, metavar="SECONDS",
        help="close a client (4000) that sent nothing for this long (default: %(default)g)",
    )
    run.add_argument(
        "--shutdown-timeout", type=_seconds, default=defaults.shutdown_timeout, metavar="SECONDS",
        help="grace period for close handshakes on Ctrl+C/SIGTERM (default: %(default)g)",
    )
    run.add_argument(
        "--store", choices=STORES, default=defaults.store,
        help="sqlite: durable, in --data-dir (default); memory: lost on restart;"
        " postgres: in --database-url, shared by several nodes",
    )
    _add_data_dir(run, from_env=False)
    _add_database_url(run, from_env=False)
    run.add_argument(
        "--node-id", metavar="NAME",
        help="this node's name in session leases (postgres store; default: hostname:port)",
    )
    run.add_argument(
        "--lease-timeout", type=_seconds, default=defaults.lease_timeout, metavar="SECONDS",
        help="a session moves to another node this long after its node stopped"
        " renewing its lease (postgres store; default: %(default)g)",
    )
    run.add_argument(
        "--fsync", choices=FSYNC_MODES, default=defaults.fsync,
        help="normal: survives a crash of the process (default); full: also a power cut",
    )
    run.add_argument(
        "--snapshot-bytes", type=byte_size, default=defaults.snapshot_bytes, metavar="BYTES",
        help="snapshot a session once this many bytes of changes, or its document's size"
        f" if larger, went to the journal (default: {defaults.snapshot_bytes // MIB}M)",
    )
    run.add_argument(
        "--retention", type=_count, default=defaults.retention, metavar="OPS",
        help="changes kept per session for resume and op_id de-duplication (default: %(default)s)",
    )
    run.add_argument(
        "--history-bytes", type=byte_size, default=defaults.history_bytes, metavar="BYTES",
        help=f"at most this many bytes of those changes (default: {defaults.history_bytes // MIB}M)",
    )
    run.add_argument(
        "--versions-kept", type=_count, default=defaults.versions_kept, metavar="N",
        help="replaced documents kept per session for `sessions restore` (default: %(default)s)",
    )
    run.add_argument(
        "--versions-bytes", type=byte_size, default=defaults.versions_bytes, metavar="BYTES",
        help="at most this many bytes of them per session; the newest always stays"
        f" (default: {defaults.versions_bytes // MIB}M)",
    )
    security = run.add_argument_group("access control (off unless set)")
    security.add_argument(
        "--tokens", metavar="FILE", help="require a token (TOML or JSON file of tokens and roles)"
    )
    security.add_argument(
        "--allowed-origin", action="append", default=[], metavar="ORIGIN",
        help="allow browser clients from this Origin (repeatable); desktop clients send none",
    )
    security.add_argument("--certfile", metavar="PEM", help="serve wss:// with this certificate chain")
    security.add_argument("--keyfile", metavar="PEM", help="the private key of --certfile")
    proxy = run.add_argument_group("behind a reverse proxy (docs/DEPLOY.md)")
    proxy.add_argument(
        "--base-path", type=_base_path, default=defaults.base_path, metavar="PATH",
        help="serve under this path prefix: PATH/ws/{session}/{user} (default: none)",
    )
    proxy.add_argument(
        "--trusted-proxy", type=_trusted_proxy, action="append", default=[], metavar="CIDR",
        help="take the client's address from X-Forwarded-For when the connection comes"
        " from this network (repeatable; e.g. 127.0.0.1/32)",
    )
    limits = run.add_argument_group("limits")
    limits.add_argument(
        "--handshake-timeout", type=_seconds, default=defaults.handshake_timeout, metavar="SECONDS",
        help="drop clients that don't finish the upgrade in time (default: %(default)g)",
    )
    limits.add_argument(
        "--max-users-per-session", type=_count, default=defaults.max_users_per_session, metavar="N",
        help="more are closed with 4004 session full (default: %(default)s)",
    )
    limits.add_argument(
        "--max-sessions", type=_count, default=defaults.max_sessions, metavar="N",
        help="live sessions at once; new ones are refused with 503 (default: %(default)s)",
    )
    limits.add_argument(
        "--max-connections-per-ip", type=_count, default=defaults.max_connections_per_ip, metavar="N",
        help="more from one address are refused with 429 (default: %(default)s)",
    )
    limits.add_argument(
        "--rate-limit", type=_rate, default=defaults.rate_limit, metavar="MSGS_PER_S",
        help="messages per second per connection; more are dropped (default: %(default)g)",
    )
    limits.add_argument(
        "--rate-burst", type=_count, default=defaults.rate_burst, metavar="N",
        help="messages allowed at once above the rate (default: %(default)s)",
    )
    limits.add_argument(
        "--max-pending-bytes", type=byte_size, default=defaults.max_pending_bytes, metavar="BYTES",
        help="changes a session holds while the store catches up; past it, its clients"
        f" wait (default: {defaults.max_pending_bytes // MIB}M)",
    )
    limits.add_argument(
        "--store-queue-bytes", type=byte_size, default=defaults.store_queue_bytes, metavar="BYTES",
        help="changes queued for the disk, all sessions together; past it, commits"
        f" wait (default: {defaults.store_queue_bytes // MIB}M)",
    )
    limits.add_argument(
        "--max-document-size", type=byte_size, default=defaults.max_document_size, metavar="BYTES",
        help="largest session document; changes beyond it get error document_too_large"
        f" (default: {defaults.max_document_size // MIB}M)",
    )
    limits.add_argument(
        "--max-queue-bytes", type=byte_size, default=defaults.max_queue_bytes, metavar="BYTES",
        help="bytes queued for one client (beyond what later messages replace) before it is"
        f" closed with 1013 (default: {defaults.max_queue_bytes // MIB}M)",
    )
    limits.add_argument(
        "--write-timeout", type=_seconds, default=defaults.write_timeout, metavar="SECONDS",
        help="close a client (1013) whose socket accepts no bytes for this long (default: %(default)g)",
    )
    limits.add_argument(
        "--max-fragments", type=_count, default=defaults.max_fragments, metavar="N",
        help="frames one message may be split into; more close with 1009 (default: %(default)s)",
    )
    # Fault injection for tests and benchmarks: a disk this slow per commit.
    run.add_argument(
        "--fault-commit-delay", type=_delay, default=defaults.fault_commit_delay,
        metavar="SECONDS", help=argparse.SUPPRESS,
    )
    run.add_argument(
        "--pending-delay", type=_delay, default=defaults.pending_delay,
        metavar="SECONDS", help=argparse.SUPPRESS,
    )
    _add_sessions_commands(commands)
    commands.add_parser(
        "smoke",
        help="check a server with a headless PyQt6 QWebSocket client (needs the qt extra)",
        add_help=False,
    ).add_argument("smoke_args", nargs=argparse.REMAINDER, help="URL and options; see smoke --help")
    return parser


async def serve_until_signalled(
    serve_fn: Callable[..., Awaitable[None]],
    on_ready: Callable[[Any], None] | None = None,
    on_reload: Callable[[Any], None] | None = None,
) -> int:
    """Run `serve_fn(task_status=...)`; the first SIGINT/SIGTERM asks the server it
    started for a graceful stop, a second one cancels everything at once.
    With `on_reload`, SIGHUP calls it with the server (else SIGHUP keeps its
    default action).

    The server must have `closing` and `request_shutdown()`; returns the exit status.
    """
    forced = False
    # Set here, not read from server.closing: the server sets that only when
    # its task next runs, and a second signal may come before.
    stopping = False
    watched = [signal.SIGINT, signal.SIGTERM]
    if on_reload is not None and hasattr(signal, "SIGHUP"):  # Windows has none
        watched.append(signal.SIGHUP)
    with trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(*, task_status: trio.TaskStatus[Any]) -> None:
                await serve_fn(task_status=task_status)
                nursery.cancel_scope.cancel()  # graceful stop done: stop watching signals

            server = await nursery.start(serve_then_stop)
            if on_ready is not None:
                on_ready(server)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    assert on_reload is not None
                    log.info("Received %s: reloading", name)
                    on_reload(server)
                elif not (stopping or server.closing):
                    log.info("Received %s: shutting down (send it again to stop at once)", name)
                    stopping = True
                    server.request_shutdown()
                else:
                    log.warning("Received %s again: stopping now", name)
                    forced = True
                    nursery.cancel_scope.cancel()
    return EXIT_FORCED if forced else 0


async def run_until_signalled(config: ServerConfig) -> int:
    """Serve `config`; the first SIGINT/SIGTERM stops gracefully, a second one at once."""

    def ready(server: CollabServer) -> None:
        if config.tokens_file:
            log.info("Tokens required (%d defined in %s)", len(server.tokens or ()), config.tokens_file)
        if config.store == "memory":
            log.info("Sessions are kept in memory only: a restart loses them (--store memory)")
        elif config.store == "postgres":
            store = server.store
            log.info("Sessions are stored in %s (node %s)", store.path, store.node_id)  # type: ignore[attr-defined]
        else:
            log.info(
                "Sessions are stored in %s (fsync %s)",
                database_path(config.data_dir).resolve(),
                config.fsync,
            )
        log.info("collab-trio %s ready (Ctrl+C to stop)", __version__)
        # What is alive now (modules, classes, the configuration, the store)
        # lives as long as the process: out of the collector's scans. A full
        # collection walked these ~48k objects in 18-60 ms, each time a pause
        # of every session (a younger one walks only what came later).
        # Collected first: garbage frozen would stay for good.
        gc.collect()
        gc.freeze()
        log.debug("Startup objects left out of garbage collections: %d", gc.get_freeze_count())

    return await serve_until_signalled(partial(serve, config), ready, CollabServer.reload_tokens)


# glibc's malloc serves blocks of 128 KiB and more with mmap, and each time
# such a block is freed it raises that threshold (up to 32 MiB): from then on
# a big frame or sync:state (a document's size) comes from the heap, which
# keeps the pages once it is freed. With the threshold fixed, such a buffer
# goes back to the OS when it goes. benchmarks/abuse.py, 150 sync:request
# of a 9 MB document by a client that never reads: RSS growth 27.2 MB
# without, 9.1 MB with.
M_MMAP_THRESHOLD = -3
BIG_BUFFER_BYTES = 1024 * 1024


def give_big_buffers_back() -> bool:
    """Fix glibc's mmap threshold at BIG_BUFFER_BYTES; False where there is
    no mallopt (not glibc) or it refused."""
    try:
        # (On Windows CDLL(None) raises TypeError.)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, BIG_BUFFER_BYTES) == 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `collab-trio`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["smoke"]:
        # Everything after "smoke" belongs to the smoke client, --help included
        # (argparse.REMAINDER would stop at a leading option).
        return _smoke(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(argv)
    configure_logging(getattr(args, "debug", False))
    if args.command == "sessions":
        return run_sessions_command(args)
    raise AssertionError(f"unhandled command {args.command!r}")


def serve_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The parser of `collab-trio serve` (of a new build_parser() unless given)."""
    parser = parser or build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def serve_settings(argv: Sequence[str], environ: Mapping[str, str]) -> settings.Settings:
    """The settings of `collab-trio ARGV` (a serve command): command line, `environ`, file, defaults.

    Raises:
        settings.SettingsError: the file or the environment holds bad values.
    """
    run = serve_parser()
    explicit = settings.explicit_values(build_parser(), argv)
    dests = {action.dest for action in run._actions}
    given = {dest: value for dest, value in explicit.items() if dest in dests}
    return settings.resolve(run, given, environ)


# Serve options that are no ServerConfig field (every other option's dest is
# one, or is renamed here): tested in test_config_file.py.
CLI_ONLY_OPTIONS = frozenset({"config", "print_config", "log_level", "log_format", "help"})
CONFIG_FIELD_OF = {"tokens": "tokens_file", "allowed_origin": "allowed_origins", "trusted_proxy": "trusted_proxies"}


def config_from(values: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed serve settings: each option sets the field of its name."""
    fields = {field.name for field in attrs.fields(ServerConfig)}
    kwargs = {}
    for dest, value in vars(values).items():
        field = CONFIG_FIELD_OF.get(dest, dest)
        if field in fields:
            # Repeatable options give lists; settings are frozen: tuples.
            kwargs[field] = tuple(value) if isinstance(value, list) else value
    # --log-level debug is --debug: every event, and tracebacks of startup failures.
    kwargs["debug"] = bool(values.debug) or values.log_level == "debug"
    return ServerConfig(**kwargs)


def _serve(argv: Sequence[str]) -> int:
    try:
        resolved = serve_settings(argv, os.environ)
    except settings.SettingsError as exc:
        for problem in exc.problems:
            print(f"collab-trio serve: error: {problem}", file=sys.stderr)
        return 2
    args = resolved.values
    if args.print_config:
        title = f"collab-trio {__version__}: the settings `collab-trio serve` would use, with their source"
        sys.stdout.write(settings.format_settings(serve_parser(), resolved, title=title))
        return 0
    configure_logging(args.debug, level=args.log_level, log_format=args.log_format)
    if (args.certfile is None) != (args.keyfile is None):
        log.error("TLS needs both --certfile and --keyfile")
        return 2
    if args.certfile is not None:
        # Read the TLS files now, so a bad one is reported as such, naming both.
        try:
            tls_context_from(args.certfile, args.keyfile)
        except (OSError, ssl.SSLError) as exc:
            # ssl.SSLError is an OSError too: a file that reads but isn't usable.
            verb = "use" if isinstance(exc, ssl.SSLError) else "read"
            log.error(
                "Cannot %s the TLS certificate or key (--certfile %s, --keyfile %s): %s",
                verb,
                args.certfile,
                args.keyfile,
                exc.strerror if not isinstance(exc, ssl.SSLError) and exc.strerror else exc,
            )
            return 1
    try:
        config = config_from(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    status = 1
    if not give_big_buffers_back():
        log.debug("No mallopt here: freed big buffers may stay in the heap")
    try:
        status = trio.run(run_until_signalled, config)
    except* KeyboardInterrupt:
        # Ctrl+C before the signal handler was installed.
        log.warning("Interrupted")
        status = EXIT_FORCED
    except* Exception as group:
        # The cause arrives wrapped in one exception group per nursery it
        # crossed; the message of the group itself says nothing.
        cause, known = _first_cause(group)
        message = _one_line(describe_failure(cause, config))
        if known:
            log.error("%s", message)
            log.debug("The error in full:", exc_info=cause)
        elif config.debug:
            log.error("%s", message, exc_info=cause)
        else:
            log.error("%s (--debug shows the traceback)", message)
        status = 1
    return status


# What a startup failure can be, besides a bug: each has its one-line explanation.
_KNOWN_FAILURES = (TokensFileError, StoreError, OSError)


def _first_cause(group: BaseException) -> tuple[BaseException, bool]:
    """The leaf that explains the failure, and whether it is a known kind."""
    leaves = leaf_exceptions(group)
    for leaf in leaves:
        if isinstance(leaf, _KNOWN_FAILURES):
            return leaf, True
    return leaves[0], False


def describe_failure(exc: BaseException, config: ServerConfig) -> str:
    """The one-line reason `collab-trio serve` could not run."""
    if isinstance(exc, (TokensFileError, MetricsAddressError)):
        return str(exc)
    if isinstance(exc, ssl.SSLError):  # before OSError: it is one
        return f"Cannot use the TLS certificate or key: {exc}"
    if isinstance(exc, StoreError):
        message = str(exc)
        if config.store == "postgres":
            return f"Cannot use the database: {message}"
        if _names_path(message, config.data_dir):
            return message
        return f"Cannot use the data directory {config.data_dir}: {message}"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.filename is not None:
            # A file operation (the data directory), not the listening socket.
            if exc.errno == errno.EEXIST:  # mkdir(exist_ok=True) on a file
                reason = "it exists and is not a directory"
            return f"Cannot use the data directory {config.data_dir}: {reason}: {exc.filename}"
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is already in use"
        return f"Cannot listen on {config.host}:{config.port}: {reason}"
    return f"Stopped by an unexpected error: {type(exc).__name__}: {exc}"


def _names_path(message: str, path: str) -> bool:
    """Whether `message` mentions `path` (as given or absolute) as a whole path."""
    spellings = {os.fspath(path), os.path.abspath(path), os.path.realpath(path)}
    return any(
        re.search(rf"(?<![\w./-]){re.escape(spelling)}(?![\w-])", message)
        for spelling in spellings
        if spelling
    )


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _smoke(smoke_args: list[str]) -> int:
    try:
        from .qt_smoke import main as smoke_main
    except ImportError as exc:
        print(
            f"collab-trio smoke needs PyQt6 (the qt extra); install it with: {qt_install_hint()}\n"
            f"(import failed: {exc})",
            file=sys.stderr,
        )
        return 2
    return smoke_main(smoke_args, prog="collab-trio smoke")


def qt_install_hint() -> str:
    """The pip command that installs PyQt6 for this collab-trio: from its checkout, or PyQt6 itself."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src" / "collab_trio").is_dir():
        return f"pip install -e '{checkout}[qt]'"
    # Installed from a wheel: the qt extra's own requirement (no index need know collab-trio).
    try:
        requirements = importlib.metadata.requires("collab-trio") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    qt = [r.partition(";")[0].strip() for r in requirements if re.search(r"extra\s*==\s*.qt.", r)]
    return f"pip install '{qt[0] if qt else 'PyQt6'}'"
