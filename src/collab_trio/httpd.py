"""A small HTTP/1.1 server on trio, over h11: the internal endpoint's transport.

h11 parses and frames (sans-IO, like wsproto, which depends on it); this
module only moves bytes, and bounds everything a client controls:

- a request head of at most `MAX_HEAD_BYTES` (431 beyond), a body of at
  most `MAX_BODY_BYTES` (413 beyond; the endpoints take none);
- `request_timeout` seconds for each request, from the end of the previous
  response (or the accept) to the end of this one: a slow or idle
  keep-alive client is dropped then;
- at most `max_connections` connections at once; more are dropped at once.

A request h11 can't parse gets 400 (its status hint) and the connection is
closed; nothing a client sends gets further than its own connection. What
to answer is the `handler`'s: (method, target) -> `Response`.

    HTTPServer.run()      cancelling it closes the listeners: port freed
     ├─ accept loop       trio.serve_listeners
     └─ connection(s)     one task each, in the same nursery
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from collections.abc import Callable, Sequence

import attrs
import h11
import trio

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 8 * 1024
RECEIVE_BYTES = 8 * 1024
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 32
# Before closing, what the client still sends is read (and dropped) for at
# most this long and this much: closing a socket with unread bytes resets the
# connection, and the client may lose the answer (a 400, 413 or 431) with it.
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024

TEXT = "text/plain; charset=utf-8"


@attrs.frozen
class Response:
    """What a handler answers: a status, a body and its type, extra headers."""

    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


def text_response(status: int, line: str, *headers: tuple[str, str]) -> Response:
    """A one-line plain-text answer."""
    return Response(status, (line + "\n").encode("utf-8"), TEXT, headers)


# What a client that went away makes a read or write raise.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@attrs.define(eq=False)
class HTTPServer:
    """Serves `handler` on `listeners` until cancelled; see the module docstring."""

    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]]
    handler: Callable[[str, str], Response]
    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    # Connections being served now.
    active: int = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve until cancelled; the listeners are closed on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: trio.serve_listeners(
                        self._connection, list(self.listeners), handler_nursery=nursery, task_status=task_status
                    )
                )
                task_status.started()
        finally:
            # Shielded: when run() is cancelled the port must still be freed.
            with trio.CancelScope(shield=True):
                for listener in self.listeners:
                    await trio.aclose_forcefully(listener)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        if self.active >= self.max_connections:
            log.debug("Internal endpoint: more than %d connections; dropping one", self.max_connections)
            await trio.aclose_forcefully(stream)
            return
        self.active += 1
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            keep_going = True
            while keep_going:
                keep_going = False
                with trio.move_on_after(self.request_timeout):
                    keep_going = await self._one_request(stream, conn)
            await _linger(stream)
        except _GONE:
            pass  # the client went away
        except Exception:
            # This connection's error boundary: the endpoint and the server go on.
            log.exception("Internal endpoint: unexpected error in a connection")
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _one_request(self, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
        """Read one request and answer it; False when the connection must end."""
        try:
            request = await _next_request(stream, conn)
            if not isinstance(request, h11.Request):
                return False  # closed between requests
            body = 0
            while True:
                event = await _next_event(stream, conn)
                if isinstance(event, h11.EndOfMessage):
                    break
                if not isinstance(event, h11.Data):
                    return False  # closed mid-request
                body += len(event.data)
                if body > MAX_BODY_BYTES:
                    await _send(stream, conn, text_response(413, "request body too large"), close=True)
                    return False
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                await _send(stream, conn, text_response(status, f"bad request: {exc}"), close=True)
            return False
        method, target = request.method.decode("ascii", "replace"), request.target.decode("ascii", "replace")
        try:
            response = self.handler(method, target)
        except Exception:
            log.exception("Internal endpoint: error while answering %s %s", method, target)
            response = text_response(500, "internal error (see the server log)")
        await _send(stream, conn, response, head=method == "HEAD")
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then drop what the client still sends, within bounds (see LINGER_SECONDS)."""
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    with trio.move_on_after(LINGER_SECONDS):
        await stream.send_eof()
        left = LINGER_BYTES
        while left > 0:
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return
            left -= len(chunk)


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Event | type[h11.PAUSED]:
    """The next h11 event, reading as needed; ConnectionClosed at the end of the stream."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(RECEIVE_BYTES))


async def _next_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Event | type[h11.PAUSED]:
    """_next_event() for a request head, of at most MAX_HEAD_BYTES however it
    arrives: h11 bounds a head only while it is incomplete, so one completed
    by the read that took it past the limit would get through. Reads stop
    just past the limit, and a complete head over it is refused as h11 would.

    Raises:
        h11.RemoteProtocolError: 431 for a head over the limit.
    """
    while True:
        buffered = len(conn.trailing_data[0])
        event = conn.next_event()
        if isinstance(event, h11.Request):
            if buffered - len(conn.trailing_data[0]) > MAX_HEAD_BYTES:
                raise h11.RemoteProtocolError("the request head is too long", error_status_hint=431)
            return event
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(max(1, min(RECEIVE_BYTES, MAX_HEAD_BYTES + 1 - buffered))))


async def _send(
    stream: trio.abc.Stream, conn: h11.Connection, response: Response, *, head: bool = False, close: bool = False
) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Cache-Control", "no-store"),
        *response.headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    reason = HTTPStatus(response.status).phrase.encode("ascii")
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason)) or b""
    if not head:  # a HEAD answer has the headers of the GET one and no body
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
