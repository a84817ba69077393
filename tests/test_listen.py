"""Listening: one port for IPv4 and IPv6 with --port 0, and startup URLs clients can use."""

from __future__ import annotations

import errno
import re
import socket
import sys

import pytest
import trio

from collab_trio.listen import _bind_all, interface_addresses, open_tcp_listeners
from collab_trio.serving import listener_urls
from collab_trio.testing import START_TIMEOUT, server_process, tcp_client


async def close_all(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        await listener.aclose()


async def test_port_0_on_all_interfaces_is_one_port_for_every_family() -> None:
    # trio's own gives one listener per family this machine has, each on a port of its own.
    theirs = await trio.open_tcp_listeners(0, host=None)
    families = {listener.socket.family for listener in theirs}
    await close_all(theirs)
    ours = await open_tcp_listeners(0, None)
    try:
        assert {listener.socket.family for listener in ours} == families
        assert len(ours) == len(families) >= 1
        assert len({listener.socket.getsockname()[1] for listener in ours}) == 1
    finally:
        await close_all(ours)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1"])
async def test_one_address(host: str) -> None:
    [listener] = await open_tcp_listeners(0, host)
    try:
        assert listener.socket.getsockname()[0] == host
    finally:
        await listener.aclose()


async def test_a_taken_port_on_a_later_address_frees_the_earlier_ones() -> None:
    [taken] = await trio.open_tcp_listeners(0, host="::1")
    port = taken.socket.getsockname()[1]
    try:
        with pytest.raises(OSError) as info:
            await _bind_all(["127.0.0.1", "::1"], port)
        assert info.value.errno == errno.EADDRINUSE
        # 127.0.0.1 was bound first and closed again.
        [again] = await trio.open_tcp_listeners(port, host="127.0.0.1")
        await again.aclose()
    finally:
        await taken.aclose()


def test_interface_addresses_are_this_machines() -> None:
    for family, loopback in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        addresses = interface_addresses(family)
        assert addresses[0] == loopback
        for address in addresses:
            # Bindable: an address of this machine, not of the wildcard or link-local kind.
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((address, 0))
            assert address not in ("0.0.0.0", "::")


@pytest.mark.parametrize(("host", "loopback"), [("0.0.0.0", "127.0.0.1"), ("::", "[::1]")])
async def test_wildcard_listener_lists_each_interface(host: str, loopback: str) -> None:
    [listener] = await trio.open_tcp_listeners(0, host=host)
    port = listener.socket.getsockname()[1]
    try:
        urls = listener_urls(listener, "/ws/")
    finally:
        await listener.aclose()
    assert urls[0] == f"ws://{loopback}:{port}/ws/"
    assert all(re.fullmatch(rf"ws://[^/]+:{port}/ws/", url) for url in urls), urls
    assert not any("0.0.0.0" in url or "[::]" in url for url in urls)


def serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "collab_trio", "serve", "--port", "0", "--store", "memory", *args]


async def test_default_host_lists_urls_clients_can_use() -> None:
    with trio.fail_after(START_TIMEOUT + 20):
        async with server_process(command=serve()) as server:  # the default host, 0.0.0.0
            await server.wait_for("ready")
            assert await server.stop() == 0
    assert "0.0.0.0" not in server.output
    urls = [m.group(1) for m in map(re.compile(r"Listening on (ws://\S+)").search, server.lines) if m]
    assert urls == [f"ws://{address}:{server.port}/ws/{{session_id}}/{{user_id}}"
                    for address in interface_addresses(socket.AF_INET)]


async def test_all_interfaces_answer_both_families_on_one_port() -> None:
    with trio.fail_after(START_TIMEOUT + 20):
        # --host "": every interface of both families (the default 0.0.0.0 is IPv4 only).
        async with server_process(command=serve("--host", "")) as server:
            await server.wait_for(re.escape(f"Listening on ws://[::1]:{server.port}/ws/"))
            for host in ("127.0.0.1", "::1"):
                async with tcp_client(server.port, "/ws/lab/alice", host=host) as ws:
                    assert '"connection:ack"' in await ws.get_message()
            assert await server.stop() == 0
