"""Server settings: one frozen object, built by the CLI or by tests."""

from __future__ import annotations

import ipaddress
import re

import attrs

DEFAULT_PORT = 8765
DATA_DIR_ENV = "COLLAB_TRIO_DATA_DIR"
DATABASE_URL_ENV = "COLLAB_TRIO_DATABASE_URL"
STORES = ("sqlite", "memory", "postgres")
FSYNC_MODES = ("normal", "full")
MIB = 1024 * 1024


def split_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9100` for IPv6) as (host, port).

    Raises:
        ValueError: one line saying what is wrong.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9100)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9100")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535 (0 picks a free one)")
    return host, int(port_text)


def _address(instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None:
        split_address(value)


def _named_file(instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    # An empty path is not "no file": `--tokens "$UNSET_VARIABLE"` asked for
    # tokens, and must not serve without them.
    if value is not None and not value.strip():
        option = {"tokens_file": "--tokens"}.get(attribute.name, attribute.name)
        raise ValueError(f"{option} is empty: name the file, or leave the option out")


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


# One path segment of a base path: RFC 3986 pchar without percent-encoding.
_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_base_path(text: str) -> str:
    """The path prefix the endpoint is served under: "collab/" -> "/collab"; "/" -> "".

    Raises:
        ValueError: a one-line reason (an empty, "." or ".." segment, a character
            that would need percent-encoding).
    """
    stripped = text.strip("/")
    if not stripped:
        return ""
    for segment in stripped.split("/"):
        if not segment:
            raise ValueError(f"base path {text!r} has an empty segment (//)")
        if segment in (".", ".."):
            raise ValueError(f"base path {text!r} must not contain {segment!r} segments")
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"base path {text!r} may contain only letters, digits and -._~!$&'()*+,;=:@ between slashes"
            )
    return "/" + stripped


def trusted_network(text: str | Network) -> Network:
    """A trusted proxy: "10.0.0.0/8", "2001:db8::/32", or one address ("127.0.0.1").

    Raises:
        ValueError: not an address or network (one line).
    """
    if isinstance(text, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return text
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {text!r} (try 10.0.0.0/8 or 127.0.0.1)") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        # ::ffff:10.0.0.5 is how a dual-stack socket shows 10.0.0.5, and
        # peers are compared as IPv4 (proxies.parse_address): so is this.
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
    return network


def _trusted_networks(values: object) -> tuple[Network, ...]:
    if isinstance(values, str):
        values = [values]
    return tuple(trusted_network(value) for value in values)  # type: ignore[attr-defined]


@attrs.frozen
class ServerConfig:
    """Everything `serve()` needs to know; defaults suit a real Optiverse session."""

    host: str = "0.0.0.0"
    port: int = attrs.field(default=DEFAULT_PORT)
    # Largest message accepted, in bytes of UTF-8 text; larger ones close with 1009.
    max_message_size: int = attrs.field(default=MIB, validator=_positive)
    # Seconds without any message from a client before it is closed with 4000.
    # Optiverse pings every 30 s, so 90 s tolerates two lost heartbeats.
    idle_timeout: float = attrs.field(default=90.0, validator=_positive)
    # Heartbeat interval advertised to clients in connection:ack.
    heartbeat_interval: float = attrs.field(default=30.0, validator=_positive)
    # Grace period for close handshakes when the server stops.
    shutdown_timeout: float = attrs.field(default=1.5, validator=_positive)
    # Seconds a client may take to finish the HTTP upgrade.
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    # Seconds to wait for a client's close handshake (and pending sends) when
    # the server closes one connection.
    close_timeout: float = attrs.field(default=5.0, validator=_positive)
    # Bytes queued for one client that no later message replaces (relays,
    # acks, notices) before it counts as too slow (1013). Cursors, moves of
    # the same item and sync:state answers replace their queued predecessor.
    max_queue_bytes: int = attrs.field(default=4 * MIB, validator=_positive)
    # Seconds a client's socket may accept no bytes at all while some are
    # queued for it before it counts as too slow (1013).
    write_timeout: float = attrs.field(default=10.0, validator=_positive)
    # Most changes in one commit batch (a commit releases at most this many
    # relays at once).
    max_batch_ops: int = attrs.field(default=512, validator=_positive)
    # Frames one message may be split into; more close the connection (1009).
    max_fragments: int = attrs.field(default=256, validator=_positive)
    # Cursor messages forwarded per second per user; the latest one wins.
    cursor_rate: float = attrs.field(default=20.0, validator=_positive)
    # Where documents live: "sqlite" (durable, in data_dir) or "memory".
    store: str = attrs.field(default="sqlite", validator=attrs.validators.in_(STORES))
    data_dir: str = "collab-data"
    # The postgres store's database (postgresql://...), shared by every node.
    database_url: str | None = attrs.field(default=None)
    # This node's name in session leases (postgres store); None: hostname:port.
    node_id: str | None = None
    # Seconds a node's session lease lasts unrenewed (renewed every third of it).
    lease_timeout: float = attrs.field(default=10.0, validator=_positive)
    # "normal": survives a process crash; "full": also a power cut (fsync per commit).
    fsync: str = attrs.field(default="normal", validator=attrs.validators.in_(FSYNC_MODES))
    # Snapshot a session's document once this many bytes of changes (or the
    # document's own size, if larger) went to the journal since the last
    # snapshot, and when it unloads: disk writes stay proportional to changes.
    snapshot_bytes: int = attrs.field(default=MIB, validator=_positive)
    # Ops kept per session for resume (sync:ops) and op_id de-duplication,
    # bounded by count and by their bytes.
    retention: int = attrs.field(default=1000, validator=_positive)
    history_bytes: int = attrs.field(default=8 * MIB, validator=_positive)
    # Largest session document, in bytes of JSON; changes that would make it
    # larger are refused with error document_too_large.
    max_document_size: int = attrs.field(default=16 * MIB, validator=_positive)
    # Versions of replaced documents kept per session (sessions history),
    # bounded by count and by bytes of JSON; the oldest go first, the newest
    # always stays (docs: history.py).
    versions_kept: int = attrs.field(default=20, validator=_positive)
    versions_bytes: int = attrs.field(default=64 * MIB, validator=_positive)
    # Corrections (docs/PROTOCOL.md; off: none are sent): a member's change of an item that
    # arrives within `correction_window` seconds of a relay of someone else's
    # change of it gets the item's state once its changes of it pause for
    # `correction_settle` seconds.
    corrections: bool = True
    correction_window: float = attrs.field(default=1.0, validator=_positive)
    correction_settle: float = attrs.field(default=0.15, validator=_positive)
    # Bytes of received changes a session holds while they wait for the store;
    # past this its members' readers stop reading until commits catch up.
    max_pending_bytes: int = attrs.field(default=MIB, validator=_positive)
    # Bytes of jobs the store holds queued for its writer (all sessions
    # together); past this, commits wait for room.
    store_queue_bytes: int = attrs.field(default=8 * MIB, validator=_positive)
    # Longest wait for the store's answer to one commit or snapshot; past it
    # the session can't know what is stored and closes its members with 1011.
    commit_timeout: float = attrs.field(default=30.0, validator=_positive)
    # Fault injection for tests and benchmarks: seconds each store transaction
    # is held up, as on a slow disk. 0 in production.
    fault_commit_delay: float = attrs.field(default=0.0)
    # Seconds a change the pending log made durable (SQLite store, fsync
    # "normal") waits for the changes after it to share its transaction.
    # Tests raise it to find changes only in the log after a kill -9.
    pending_delay: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    # -- access control (off unless set) --
    # A TOML or JSON file of tokens and roles; None: no authentication.
    tokens_file: str | None = attrs.field(default=None, validator=_named_file)
    # Browser origins allowed to connect; empty: any. Clients that send no
    # Origin header (Qt desktop apps) are never refused by this.
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    # TLS: serve wss:// with this certificate chain and private key.
    certfile: str | None = None
    keyfile: str | None = attrs.field(default=None)
    # -- behind a reverse proxy --
    # Serve the endpoint under this path prefix ("/collab": /collab/ws/{session}/{user}).
    base_path: str = attrs.field(default="", converter=normalize_base_path)
    # Proxies whose X-Forwarded-For gives the client's address (per-IP limit,
    # logs); from any other peer the header is ignored.
    trusted_proxies: tuple[Network, ...] = attrs.field(default=(), converter=_trusted_networks)
    # -- limits --
    max_users_per_session: int = attrs.field(default=50, validator=_positive)
    max_sessions: int = attrs.field(default=1000, validator=_positive)
    max_connections_per_ip: int = attrs.field(default=500, validator=_positive)
    # Messages per second per connection on average, and the burst allowed.
    # Optiverse drags send ~60 moves/s plus cursors; this leaves ample room.
    rate_limit: float = attrs.field(default=200.0, validator=_positive)
    rate_burst: int = attrs.field(default=400, validator=_positive)
    # Messages dropped for the rate limit within 10 s before closing with 4002.
    rate_strikes: int = attrs.field(default=50, validator=_positive)
    # Changes refused to a viewer within 10 s before closing with 4003.
    forbidden_strikes: int = attrs.field(default=5, validator=_positive)
    # Internal HTTP endpoint (/metrics, /livez, /readyz) at HOST:PORT; None: off.
    metrics_address: str | None = attrs.field(default=None, validator=_address)
    debug: bool = False

    @keyfile.validator
    def _check_tls(self, attribute: attrs.Attribute, value: str | None) -> None:
        if (self.certfile is None) != (value is None):
            raise ValueError("TLS needs both certfile and keyfile")

    @database_url.validator
    def _check_database_url(self, attribute: attrs.Attribute, value: str | None) -> None:
        if self.store == "postgres" and not value:
            raise ValueError("the postgres store needs a database URL (--database-url postgresql://...)")

    @port.validator
    def _check_port(self, attribute: attrs.Attribute, value: int) -> None:
        if not 0 <= value <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {value}")
