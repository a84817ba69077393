"""TCP listeners on one port for every address of a host, and this machine's addresses.

- `open_tcp_listeners(port, host)`: like trio's, but port 0 gives every
  listener (IPv4 and IPv6 of `--host ""` or `localhost`) the same free port,
  where trio binds each address to a port of its own.
- `interface_addresses(family)`: the addresses clients can reach a wildcard
  listener (0.0.0.0, ::) at, for the startup lines. No dependency: Linux's
  SIOCGIFADDR ioctl and /proc/net/if_inet6, else the addresses the host
  name resolves to; loopback always.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import sys
from pathlib import Path

import trio

# Attempts at one free port for all addresses, when another program takes
# the port between binding the first address and the next.
BIND_ATTEMPTS = 10
_SIOCGIFADDR = 0x8915  # Linux: the IPv4 address of an interface


async def open_tcp_listeners(port: int, host: str | None) -> list[trio.SocketListener]:
    """Listen on every address of `host` (None: all interfaces, IPv4 and IPv6) on one port.

    Raises:
        OSError: an address can't be bound (e.g. the port is in use).
    """
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for attempt in range(BIND_ATTEMPTS):
        try:
            return await _bind_all(addresses, port)
        except OSError as exc:
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt == BIND_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def _bind_all(addresses: list[str], port: int) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    skipped: list[OSError] = []
    try:
        for address in addresses:
            try:
                # trio's own setup per address: SO_REUSEADDR, IPV6_V6ONLY, backlog.
                bound = await trio.open_tcp_listeners(port, host=address)
            except OSError as exc:
                # A family this machine lacks (IPv6 off): skipped, as trio does.
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
                skipped.append(exc)
                continue
            listeners.extend(bound)
            if port == 0:
                port = bound[0].socket.getsockname()[1]  # the others take the same
        if not listeners:
            raise skipped[0]
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    return listeners


def interface_addresses(family: socket.AddressFamily) -> list[str]:
    """This machine's addresses in `family` that clients can use: loopback first, no link-local."""
    found: list[str] = []
    if sys.platform.startswith("linux"):
        found = _linux_ipv4() if family == socket.AF_INET else _linux_ipv6()
    if not found:
        try:
            infos = socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM)
        except OSError:
            infos = []
        found = [str(info[4][0]) for info in infos]
    found.append("127.0.0.1" if family == socket.AF_INET else "::1")
    usable = []
    for text in found:
        try:
            address = ipaddress.ip_address(text.partition("%")[0])
        except ValueError:
            continue
        if address.version == (4 if family == socket.AF_INET else 6) and not address.is_link_local:
            usable.append(address)
    return [str(a) for a in sorted(set(usable), key=lambda a: (not a.is_loopback, a))]


def _linux_ipv4() -> list[str]:
    import fcntl  # POSIX only

    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:  # down, or no IPv4 address
                continue
            found.append(socket.inet_ntoa(answer[20:24]))
    return found


def _linux_ipv6() -> list[str]:
    try:
        text = Path("/proc/net/if_inet6").read_text()
    except OSError:
        return []
    # Each line: 32 hex digits of address, interface index, prefix, scope, flags, name.
    return [
        str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
        for fields in (line.split() for line in text.splitlines())
        if fields
    ]
