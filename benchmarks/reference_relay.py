#!/usr/bin/env python3
"""The reference relay: the collaboration server a Python team would otherwise write.

    python benchmarks/reference_relay.py [--host 127.0.0.1] [--port 8765] [--json json|orjson]

asyncio and `websockets` (its asyncio API, `websockets.asyncio.server`) in
one process, with the standard json module, speaking the subset of
docs/PROTOCOL.md that Optiverse needs to collaborate, and nothing more:

- `ws://HOST:PORT/ws/{session_id}/{user_id}` (percent-decoded; anything else
  is refused at the upgrade with 404);
- `connection:ack` on connect (`session_id`, `user_id`, `is_host`, `users`,
  `version`), `user:joined` / `user:left` to the others; a second connection
  with the same user id replaces the first (closed with 4001);
- `command`: numbered with the session's next `seq`, relayed to the other
  members as `{"type":"command","command":…,"user_id":…,"timestamp":…,"seq":N}`
  (with the sender's `op_id` if it gave one) with `websockets.broadcast`, and
  acknowledged to the sender with `{"type":"ack","seq":N}`;
- `cursor`: relayed to the others with the sender's `user_id`;
- `ping` -> `pong`; anything else -> `error`.

No document, no persistence, no limits beyond the library's defaults (1 MiB
messages, a WebSocket ping every 20 s), no back-pressure towards slow
clients (`broadcast` buffers without bound): it is the baseline that
benchmarks/fanout.py compares collab-trio with, not a server to deploy.

At start it prints `Listening on ws://HOST:PORT/ws/{session_id}/{user_id}`
(the line collab-trio prints, so the same harness reads the port of `--port
0`); SIGINT or SIGTERM closes every connection with 1001 and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

PROTOCOL_VERSION = 1
SERVER_NAME = "reference-relay"
MAX_ID_LENGTH = 64
CLOSE_REPLACED = 4001


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def parse_path(path: str) -> tuple[str, str] | None:
    """(session_id, user_id) of `/ws/{session_id}/{user_id}[?query]`, or None."""
    parts = urlsplit(path).path.split("/")
    if len(parts) != 4 or parts[0] != "" or parts[1] != "ws":
        return None
    session_id, user_id = unquote(parts[2]), unquote(parts[3])
    for value in (session_id, user_id):
        if not 1 <= len(value) <= MAX_ID_LENGTH or "/" in value or any(ord(c) < 32 for c in value):
            return None
    return session_id, user_id


class Session:
    """The members of one session and its command counter."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.members: dict[str, ServerConnection] = {}
        self.seq = 0

    def others(self, ws: ServerConnection) -> list[ServerConnection]:
        return [member for member in self.members.values() if member is not ws]


class Relay:
    """Sessions by id, and one handler per connection."""

    def __init__(self, dumps: Callable[[Any], str], loads: Callable[[str | bytes], Any]) -> None:
        self.sessions: dict[str, Session] = {}
        self.dumps = dumps
        self.loads = loads

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if parse_path(request.path) is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "expected /ws/{session_id}/{user_id}\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        ids = parse_path(ws.request.path)
        assert ids is not None  # process_request refused the others
        session_id, user_id = ids
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = Session(session_id)
        previous = session.members.get(user_id)
        session.members[user_id] = ws
        dumps = self.dumps
        await ws.send(dumps({
            "type": "connection:ack",
            "session_id": session_id,
            "user_id": user_id,
            "is_host": len(session.members) == 1,
            "users": [{"user_id": member} for member in session.members],
            "version": session.seq,
            "server": {"name": SERVER_NAME, "protocol": PROTOCOL_VERSION},
            "timestamp": utc_now(),
        }))
        if previous is not None:
            await previous.close(CLOSE_REPLACED, "replaced by a newer connection")
        else:
            broadcast(session.others(ws), dumps({
                "type": "user:joined", "user_id": user_id, "timestamp": utc_now(),
                "users": [{"user_id": member} for member in session.members],
            }))
        try:
            async for text in ws:
                await self.on_message(session, user_id, ws, text)
        except ConnectionClosed:
            pass
        finally:
            if session.members.get(user_id) is ws:
                del session.members[user_id]
                if session.members:
                    broadcast(session.others(ws), dumps({
                        "type": "user:left", "user_id": user_id, "timestamp": utc_now(), "reason": "disconnected",
                    }))
                else:
                    del self.sessions[session_id]

    async def on_message(self, session: Session, user_id: str, ws: ServerConnection, text: str | bytes) -> None:
        dumps = self.dumps
        try:
            message = self.loads(text)
        except ValueError:
            await ws.send(dumps({"type": "error", "code": "invalid_json", "message": "not JSON"}))
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "command":
            session.seq += 1
            relay = {
                "type": "command",
                "command": message.get("command"),
                "user_id": user_id,
                "timestamp": utc_now(),
                "seq": session.seq,
            }
            ack: dict[str, Any] = {"type": "ack", "seq": session.seq}
            if "op_id" in message:
                relay["op_id"] = ack["op_id"] = message["op_id"]
            broadcast(session.others(ws), dumps(relay))
            await ws.send(dumps(ack))
        elif kind == "cursor":
            message["user_id"] = user_id
            broadcast(session.others(ws), dumps(message))
        elif kind == "ping":
            await ws.send(dumps({"type": "pong", "timestamp": utc_now()}))
        else:
            await ws.send(dumps({
                "type": "error", "code": "unsupported", "message": f"unsupported message type {kind!r}", "ref": kind,
            }))


def json_codec(name: str) -> tuple[Callable[[Any], str], Callable[[str | bytes], Any]]:
    if name == "orjson":
        import orjson

        return (lambda value: orjson.dumps(value).decode()), orjson.loads
    return (lambda value: json.dumps(value, separators=(",", ":"))), json.loads


async def run(args: argparse.Namespace) -> None:
    relay = Relay(*json_codec(args.json))
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    async with serve(relay.handler, args.host, args.port, process_request=relay.process_request) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"Listening on ws://{args.host}:{port}/ws/{{session_id}}/{{user_id}}", flush=True)
        await stop
        print("Shutting down: closing connections with 1001", flush=True)
    print("Server closed", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The asyncio + websockets reference relay of benchmarks/fanout.py.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port; 0 picks a free one (8765)")
    parser.add_argument("--json", choices=("json", "orjson"), default="json", help="JSON library (json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)-7s %(name)s: %(message)s")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
