"""The HTTP request that opens a connection, read before trio-websocket sees it.

trio-websocket 0.12 answers a request that is not a valid WebSocket upgrade
(a browser's GET, a health check) with a bare 400 and closes the stream, and
`wrap_server_stream()` then waits for a request that never comes; a client
that closes before sending anything is waited for the same way: either held
a handshake task for the whole handshake timeout. So the serving layer reads
the request head itself, with h11, and only a valid upgrade reaches
trio-websocket, which then finds every byte already read waiting for it
(`WireStream(received=...)`) and parses the same request again:

- the connection ends before a complete head: `read_request_head` returns None at once;
- a malformed head, or one over `MAX_HEAD_BYTES`: `MalformedRequest`, with h11's status;
- not an upgrade: the caller answers with `head.response()` (plain text);
- an upgrade wsproto would refuse: `head.upgrade_refusal()` gives wsproto's
  own status and reason (its public `WSConnection`, fed the same bytes).

Public API of h11 and wsproto only; the cost is one extra parse of a few
hundred bytes per connection.
"""

from __future__ import annotations

from http import HTTPStatus

import attrs
import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request
from wsproto.utilities import RemoteProtocolError

# Largest request head read (h11's default too); a larger one is refused with 431.
MAX_HEAD_BYTES = 16 * 1024
RECEIVE_BYTES = 64 * 1024


class MalformedRequest(Exception):
    """A request head h11 refuses; `response` is the answer to send."""

    def __init__(self, status: int, response: bytes) -> None:
        super().__init__(f"{status} {_phrase(status)}")
        self.status = status
        self.response = response


@attrs.define(eq=False)
class RequestHead:
    """A parsed request head and every byte read so far (the head, maybe
    frames after it: `trailing`)."""

    method: str
    target: str
    # Names in lower case, as h11 gives them.
    headers: list[tuple[bytes, bytes]]
    received: bytes
    _conn: h11.Connection
    # Bytes of `received` that are the head (up to and including its blank line).
    head_size: int = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.head_size is None:
            self.head_size = len(self.received)

    @property
    def trailing(self) -> bytes:
        """What was read after the head (frames a client sent before the 101)."""
        return self.received[self.head_size:]

    def header(self, name: bytes) -> str | None:
        """The first value of a header, or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    @property
    def is_upgrade(self) -> bool:
        """Whether the client asks for a WebSocket (valid or not: see upgrade_refusal)."""
        tokens = ",".join(value.decode("latin-1") for key, value in self.headers if key == b"upgrade")
        return any(token.strip().lower() == "websocket" for token in tokens.split(","))

    def upgrade_refusal(self) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        """(status, reason, headers) with which wsproto refuses this upgrade, or None if it accepts it."""
        server = WSConnection(ConnectionType.SERVER)
        try:
            server.receive_data(self.received)
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = getattr(hint, "status_code", 400)
            return status, str(exc), list(getattr(hint, "headers", []))
        except UnicodeError:
            # wsproto decodes the Host header as IDNA and lets this escape.
            return 400, "Host header is not a valid host name", []
        if not any(isinstance(event, Request) for event in server.events()):
            return 400, "not a complete WebSocket upgrade request", []
        return None

    def response(
        self, status: int, text: str, extra_headers: list[tuple[bytes, bytes]] | None = None
    ) -> bytes:
        """A whole plain-text response to this request (no body for HEAD); the connection then closes."""
        return _response(self._conn, status, text, extra_headers or [], head_only=self.method == "HEAD")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _response(
    conn: h11.Connection, status: int, text: str, extra_headers: list[tuple[bytes, bytes]], *, head_only: bool
) -> bytes:
    body = text.encode("utf-8")
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode("ascii")),
        (b"Connection", b"close"),
        *extra_headers,
    ]
    data = conn.send(h11.Response(status_code=status, headers=headers, reason=_phrase(status).encode()))
    if not head_only:
        data += conn.send(h11.Data(data=body))
    return data + conn.send(h11.EndOfMessage())


async def read_request_head(
    stream: trio.abc.ReceiveStream, max_bytes: int = MAX_HEAD_BYTES
) -> RequestHead | None:
    """Read up to the end of the request head; None if the connection ends first.

    Raises:
        MalformedRequest: not HTTP/1.x, or a head over `max_bytes`.
        trio.BrokenResourceError: the connection was reset.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_bytes)
    received = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            text = f"{_phrase(status)}: not a valid HTTP/1.1 request\n"
            raise MalformedRequest(status, _response(conn, status, text, [], head_only=False)) from None
        if isinstance(event, h11.Request):
            head_size = len(received) - len(conn.trailing_data[0])
            if head_size > max_bytes:
                # (h11 bounds a head only while it is incomplete.)
                status = 431
                text = f"{_phrase(status)}: the request head is over {max_bytes} bytes\n"
                raise MalformedRequest(status, _response(conn, status, text, [], head_only=False))
            return RequestHead(
                method=event.method.decode("ascii"),
                target=event.target.decode("ascii"),
                headers=[(name, value) for name, value in event.headers],
                received=bytes(received),
                conn=conn,
                head_size=head_size,
            )
        if event is not h11.NEED_DATA:  # ConnectionClosed: the client left first
            return None
        # Never much past the limit: a longer head can't complete, and h11 says 431.
        data = await stream.receive_some(max(1, min(RECEIVE_BYTES, max_bytes + 1 - len(received))))
        if not data:
            return None  # closed first (a port probe, a client that gave up): nothing to answer
        received += data
        conn.receive_data(bytes(data))
