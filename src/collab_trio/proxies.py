"""The client behind a reverse proxy: X-Forwarded-For, believed only from trusted proxies. Pure.

Each proxy appends the address it got the request from, so the header reads
`client, proxy1, proxy2` and the TCP peer is the last proxy. Entries are
read from the right: the first one that is not itself a trusted proxy is the
client. Everything to its left was written by that client and proves
nothing, so it is never read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from .config import Network

FORWARDED_FOR = b"x-forwarded-for"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> Address | None:
    """An IP address ("192.0.2.7", "2001:db8::1", "[2001:db8::1]"), IPv4-mapped ones as IPv4; or None."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    """Whether `address` is in one of the trusted networks."""
    return any(address in network for network in trusted)


def forwarded_client(
    peer: str, headers: Iterable[tuple[bytes, bytes]], trusted: Sequence[Network]
) -> str | None:
    """The client's address from X-Forwarded-For when `peer` is a trusted proxy; else None.

    None too when the header is absent or its last entry is not an address
    (the peer is then the best we know). When every entry is a trusted
    proxy, the left-most one is the client.
    """
    if not trusted:
        return None
    peer_address = parse_address(peer)
    if peer_address is None or not is_trusted(peer_address, trusted):
        return None
    # Several X-Forwarded-For headers are one list, in order (RFC 9110 5.3).
    entries = b",".join(value for name, value in headers if name.lower() == FORWARDED_FOR)
    if not entries:
        return None
    client: Address | None = None
    for entry in reversed(entries.decode("latin-1").split(",")):
        address = parse_address(entry)
        if address is None:
            break  # "unknown", garbage: nothing further left can be believed
        client = address
        if not is_trusted(address, trusted):
            break
    return None if client is None else str(client)
