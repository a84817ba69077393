"""The ping behind a design to load, through real frames (found by review):
a change the client sent before its pong is corrected even when it reached
trio-websocket's slower path, one sent after is not, and the pong the server
asked for costs the client nothing of its rate limit."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import Ping

from collab_trio.testing import HANG, Harness, add_item, client_frame, move_item, raw_connect

OPCODE_TEXT, OPCODE_CONTINUATION, OPCODE_PONG = 0x1, 0x0, 0xA


async def _stock_member_with_the_design_and_its_ping(harness: Harness) -> Any:
    """cy (a raw client) asks as stock Optiverse does and reads the document
    and the ping behind it."""
    cy = await raw_connect(harness, "/ws/s/cy")
    await cy.send_json({"type": "sync:request", "user_id": "cy"})
    state = await cy.expect("sync:state")
    assert state["state"]["items"]
    with trio.fail_after(HANG):
        event = await cy.next_event()
    assert isinstance(event, Ping), event
    return cy


async def _messages_for(cy: Any, seconds: float) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    with trio.move_on_after(seconds):
        while True:
            message = await cy.next_message()
            if not isinstance(message, dict):
                break
            seen.append(message)
    return seen


ADD = json.dumps(add_item("N", {"x": 9}, op_id=7)).encode()
CURSOR = json.dumps({"type": "cursor", "x": 1.0, "y": 2.0}).encode()
PONG = client_frame(OPCODE_PONG, b"")


@pytest.mark.parametrize(
    ("frames", "corrections"),
    [
        # The add, in one frame, before the pong: it crossed the document
        # (the frame reader takes it out of the stream at once).
        pytest.param(client_frame(OPCODE_TEXT, ADD) + PONG, ["remove_item", "add_item"], id="one frame"),
        # The add in two frames (Qt splits what is over its outgoing frame
        # size), before the pong: handed on to trio-websocket, so it reaches
        # the session after the pong's header was seen.
        pytest.param(
            client_frame(OPCODE_TEXT, ADD[:20], fin=False) + client_frame(OPCODE_CONTINUATION, ADD[20:]) + PONG,
            ["remove_item", "add_item"],
            id="in two frames",
        ),
        # A message in two frames, then the add in one frame, then the pong:
        # the add is handed on too (a message before it is still unread).
        pytest.param(
            client_frame(OPCODE_TEXT, CURSOR[:10], fin=False)
            + client_frame(OPCODE_CONTINUATION, CURSOR[10:])
            + client_frame(OPCODE_TEXT, ADD)
            + PONG,
            ["remove_item", "add_item"],
            id="behind a handed-on message",
        ),
        # The pong, then the add, in one read (Nagle, a slow link): made after
        # the load; a correction would rebuild it as another's item in a stock
        # window (whose edits it then no longer sends).
        pytest.param(PONG + client_frame(OPCODE_TEXT, ADD), [], id="after the pong"),
    ],
)
async def test_a_change_sent_before_the_pong_is_corrected_one_sent_after_is_not(
    start_server: Any, autojump_clock: trio.abc.Clock, frames: bytes, corrections: list[str]
) -> None:
    # cy asks as stock Optiverse does; it has read the document and the ping
    # behind it when it sends `frames` (its add and its pong) in one write.
    harness: Harness = await start_server(correction_window=0.5)
    async with harness.joined("s", "ada") as ada:
        await ada.send(add_item("L1", {"x": 1}, op_id=1))
        await ada.expect("ack")
        cy = await _stock_member_with_the_design_and_its_ping(harness)
        await cy.stream.send_all(frames)
        seen = await _messages_for(cy, 6.0)
        assert [m["command"]["action"] for m in seen if m.get("correction")] == corrections, seen


async def test_the_pong_the_server_asked_for_is_not_counted_against_the_rate_limit(start_server: Any, autojump_clock: trio.abc.Clock) -> None:
    # cy drags faster than the rate: its moves are held and thinned, which is
    # no fault (no error, no strike). The pong to the server's own ping, which
    # it must send, must not be what gets it a rate_limited error (and a
    # strike towards 4002) either.
    harness: Harness = await start_server(rate_limit=2.0, rate_burst=2, correction_window=0.5)
    async with harness.joined("s", "ada") as ada:
        await ada.send(add_item("L1", {"x": 1}, op_id=1))
        await ada.expect("ack")
        cy = await raw_connect(harness, "/ws/s/cy")
        await cy.send_json({"type": "sync:request", "user_id": "cy"})
        for x in range(12):
            await cy.send_json({"type": "command", "command": {
                "action": "move_item", "item_type": "lens", "item_id": "L1", "data": {"x": x}}})
        await cy.expect("sync:state")
        with trio.fail_after(HANG):
            event = await cy.next_event()
        assert isinstance(event, Ping), event
        await cy.send_frame(OPCODE_PONG, b"")
        seen = await _messages_for(cy, 3.0)
        errors = [m for m in seen if m["type"] == "error"]
        assert errors == [], errors


async def _held_move_before_the_pong(start_server: Any, burst: int) -> list[dict[str, Any]]:
    harness: Harness = await start_server(correction_window=0.5, rate_limit=2.0, rate_burst=burst)
    async with harness.joined("s", "ada") as ada:
        await ada.send(add_item("L1", {"x": 1}, op_id=1))
        await ada.expect("ack")
        await ada.send(add_item("L2", {"x": 2}, op_id=2))
        await ada.expect("ack")
        await trio.sleep(2.0)  # ada's adds are out of the window: only the load counts
        cy = await raw_connect(harness, "/ws/s/cy")
        await cy.send_json({"type": "sync:request", "user_id": "cy"})
        await cy.expect("sync:state")
        with trio.fail_after(HANG):
            event = await cy.next_event()
        assert isinstance(event, Ping), event
        # Made before cy's window loaded the design (sent before the pong),
        # in one read: a move of L2 within the rate, a move of L1 over it
        # (held: a drag is thinned, not cut), then the pong.
        first = json.dumps(move_item("L2", {"x": 20})).encode()
        second = json.dumps(move_item("L1", {"x": 10})).encode()
        await cy.stream.send_all(
            client_frame(OPCODE_TEXT, first) + client_frame(OPCODE_TEXT, second) + client_frame(OPCODE_PONG, b"")
        )
        return await _messages_for(cy, 6.0)


@pytest.mark.parametrize("burst", [10, 2])
async def test_changes_sent_before_the_pong_are_corrected_held_or_not(
    start_server: Any, autojump_clock: trio.abc.Clock, burst: int
) -> None:
    # burst 10: nothing held, both moves predate the load. burst 2: the move
    # of L1 is held by the rate limit and reaches the session after the pong,
    # with the pong's time (same read): still made before the load, so
    # corrected (else cy's window shows L1 where the design put it and
    # everyone else where cy's move did).
    seen = await _held_move_before_the_pong(start_server, burst=burst)
    corrected = sorted({m["command"]["item_id"] for m in seen if m.get("correction")})
    assert corrected == ["L1", "L2"], seen
