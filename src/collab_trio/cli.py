"""The `collab-trio` command line."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .config import DEFAULT_PORT, MIB, ServerConfig
from .server import CollabServer, serve

log = logging.getLogger("collab_trio")

# Exit status after a second Ctrl+C (128 + SIGINT, as shells report it).
EXIT_FORCED = 130


def _size(text: str) -> int:
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("seconds must be positive")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("port must be between 0 and 65535 (0 picks a free one)")
    return value


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
    )
    run.add_argument("--host", default=defaults.host, help="address to listen on (default: %(default)s)")
    run.add_argument(
        "--port", type=_port, default=DEFAULT_PORT,
        help="TCP port; 0 picks a free one (default: %(default)s)",
    )
    run.add_argument("--debug", action="store_true", help="log every connection event and error sent")
    run.add_argument(
        "--max-message-size", type=_size, default=defaults.max_message_size, metavar="BYTES",
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
    commands.add_parser(
        "smoke",
        help="check a server with a headless PyQt6 QWebSocket client (needs the qt extra)",
        add_help=False,
    ).add_argument("smoke_args", nargs=argparse.REMAINDER, help="URL and options; see smoke --help")
    return parser


def configure_logging(debug: bool) -> None:
    """Plain timestamped lines on stderr; trio-websocket's chatter only with --debug."""
    # Never crash on a console that can't show "✓".
    if hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(errors="backslashreplace", line_buffering=True)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    if not debug:
        logging.getLogger("trio-websocket").setLevel(logging.WARNING)


async def run_until_signalled(config: ServerConfig) -> int:
    """Serve; the first SIGINT/SIGTERM stops gracefully, a second one at once."""
    forced = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(*, task_status: trio.TaskStatus[CollabServer]) -> None:
                await serve(config, task_status=task_status)
                nursery.cancel_scope.cancel()  # graceful stop done: stop watching signals

            server: CollabServer = await nursery.start(serve_then_stop)
            log.info("collab-trio %s ready (Ctrl+C to stop)", __version__)
            async for signum in signals:
                name = signal.Signals(signum).name
                if not server.closing:
                    log.info("Received %s: shutting down (send it again to stop at once)", name)
                    server.request_shutdown()
                else:
                    log.warning("Received %s again: stopping now", name)
                    forced = True
                    nursery.cancel_scope.cancel()
    return EXIT_FORCED if forced else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `collab-trio`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["smoke"]:
        # Everything after "smoke" belongs to the smoke client, --help included
        # (argparse.REMAINDER would stop at a leading option).
        return _smoke(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "debug", False))
    if args.command == "serve":
        return _serve(args)
    raise AssertionError(f"unhandled command {args.command!r}")


def _serve(args: argparse.Namespace) -> int:
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_message_size=args.max_message_size,
        idle_timeout=args.idle_timeout,
        shutdown_timeout=args.shutdown_timeout,
        debug=args.debug,
    )
    status = 1
    try:
        status = trio.run(run_until_signalled, config)
    except* KeyboardInterrupt:
        # Ctrl+C before the signal handler was installed.
        log.warning("Interrupted")
        status = EXIT_FORCED
    except* OSError as group:
        exc = group.exceptions[0]
        if getattr(exc, "errno", None) == errno.EADDRINUSE:
            log.error("Cannot listen on %s:%d: the port is already in use", config.host, config.port)
        else:
            log.error("Cannot listen on %s:%d: %s", config.host, config.port, exc)
    return status


def _smoke(smoke_args: list[str]) -> int:
    try:
        from .qt_smoke import main as smoke_main
    except ImportError as exc:
        print(
            "collab-trio smoke needs PyQt6; install it with: pip install 'collab-trio[qt]'\n"
            f"(import failed: {exc})",
            file=sys.stderr,
        )
        return 2
    return smoke_main(smoke_args, prog="collab-trio smoke")
