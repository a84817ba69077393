"""The client's address behind trusted proxies (proxies.py), and the --trusted-proxy values. Pure."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collab_trio.config import ServerConfig, trusted_network
from collab_trio.proxies import forwarded_client, parse_address

PURE = settings(derandomize=True, database=None, deadline=None, max_examples=300)
TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"example")] + [(b"x-forwarded-for", value.encode()) for value in values]


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        # From a trusted proxy: the right-most address that is not a proxy.
        ("127.0.0.1", xff("203.0.113.7"), "203.0.113.7"),
        ("127.0.0.1", xff("198.51.100.1, 203.0.113.7"), "203.0.113.7"),  # the left one is the client's word
        ("127.0.0.1", xff("203.0.113.7, 10.1.2.3"), "203.0.113.7"),  # through a second, trusted proxy
        ("127.0.0.1", xff("203.0.113.7", "10.1.2.3"), "203.0.113.7"),  # two headers are one list
        ("127.0.0.1", xff("10.9.9.9, 10.1.2.3"), "10.9.9.9"),  # all proxies: the left-most
        ("127.0.0.1", xff("2001:db8::5"), "2001:db8::5"),
        ("127.0.0.1", xff("[2001:db8::5]"), "2001:db8::5"),
        ("127.0.0.1", xff("::ffff:203.0.113.7"), "203.0.113.7"),  # IPv4-mapped: one client, one count
        ("::ffff:127.0.0.1", xff("203.0.113.7"), "203.0.113.7"),  # a dual-stack socket's peer
        ("fd12::1", xff("203.0.113.7"), "203.0.113.7"),
        # Nothing usable: the peer itself is the best we know.
        ("127.0.0.1", xff("unknown"), None),
        ("127.0.0.1", xff("203.0.113.7, garbage"), None),
        ("127.0.0.1", xff("garbage, 10.1.2.3"), "10.1.2.3"),  # up to the garbage
        ("127.0.0.1", xff(""), None),
        ("127.0.0.1", xff(), None),
        # From anyone else the header is ignored.
        ("192.0.2.1", xff("203.0.113.7"), None),
        ("in-memory", xff("203.0.113.7"), None),
    ],
)
def test_forwarded_client(peer: str, headers: list[tuple[bytes, bytes]], client: str | None) -> None:
    assert forwarded_client(peer, headers, TRUSTED) == client


def test_no_trusted_proxies_no_forwarded_client() -> None:
    assert forwarded_client("127.0.0.1", xff("203.0.113.7"), ()) is None


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@PURE
@given(st.lists(addresses | st.sampled_from(["unknown", "", "1.2.3.4:80"]), max_size=6), addresses)
def test_the_answer_is_never_an_entry_left_of_the_first_untrusted_one(entries: list[str], peer: str) -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    client = forwarded_client(peer, xff(", ".join(entries)), trusted)
    peer_address = parse_address(peer)
    if peer_address is None or peer_address not in trusted[0]:
        assert client is None
        return
    # Walk as a proxy operator would: from the right, past proxies only.
    expected = None
    for entry in reversed(entries):
        address = parse_address(entry)
        if address is None:
            break
        expected = str(address)
        if address not in trusted[0]:
            break
    assert client == expected


@pytest.mark.parametrize(
    ("text", "network"),
    [("127.0.0.1", "127.0.0.1/32"), ("10.0.0.0/8", "10.0.0.0/8"), ("10.1.2.3/8", "10.0.0.0/8"), ("::1", "::1/128")],
)
def test_trusted_proxy_values(text: str, network: str) -> None:
    assert trusted_network(text) == ipaddress.ip_network(network)
    assert ServerConfig(trusted_proxies=[text]).trusted_proxies == (ipaddress.ip_network(network),)


@pytest.mark.parametrize("text", ["localhost", "10.0.0.0/33", "", "1.2.3.4:80"])
def test_bad_trusted_proxy_is_a_one_line_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"^not an IP address or network: .* \(try 10\.0\.0\.0/8 or 127\.0\.0\.1\)$"):
        trusted_network(text)
