"""Log output: text lines or JSON objects, and the session and user a line concerns.

The session and user come from `extra={"session": ..., "user": ...}` when a
log call passes them (None: none), else from two context variables. A trio task starts
with a copy of the context of the task that spawned it, so binding them in
the handshake task (server.py) carries them into that member's Connection
tasks; Session.run() binds its session and no user for its own tasks.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import sys

import orjson

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
TEXT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("collab_trio_session", default=None)
current_user: contextvars.ContextVar[str | None] = contextvars.ContextVar("collab_trio_user", default=None)


def bind(*, session: str | None, user: str | None) -> None:
    """The session and user that this task's log lines (and its children's) concern."""
    current_session.set(session)
    current_user.set(user)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, event, and session/user when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        # extra={"user": None} says the line concerns no user, whichever task logs it.
        fields = record.__dict__
        session = fields["session"] if "session" in fields else current_session.get()
        user = fields["user"] if "user" in fields else current_user.get()
        if session is not None:
            entry["session"] = session
        if user is not None:
            entry["user"] = user
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        # Non-string values (an exception object as an argument) become their str().
        return orjson.dumps(entry, default=str).decode("utf-8")


def configure_logging(debug: bool = False, *, level: str = "info", log_format: str = "text") -> None:
    """Log to stderr in `log_format`; trio-websocket's chatter only at the debug level.

    `debug` (the --debug switch) is the debug level.
    """
    if debug:
        level = "debug"
    # Never crash on a console that can't show "✓".
    if hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(errors="backslashreplace", line_buffering=True)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TEXT_DATE_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    logging.getLogger("trio-websocket").setLevel(logging.NOTSET if level == "debug" else logging.WARNING)
