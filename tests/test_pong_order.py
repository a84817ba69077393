"""The ping behind a design to load, through real frames (found by review):
a change the client sent before its pong is corrected even when it reached
trio-websocket's slower path, one sent after is not, and the pong the server
asked for costs the client nothing of its rate limit."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing
from wsproto.events import Ping

from collab_trio.testing import HANG, Harness, add_item, client_frame, raw_connect

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


async def test_a_change_sent_before_the_pong_but_handed_on_to_trio_websocket_is_still_corrected(
    start_server: Any,
    autojump_clock: trio.abc.Clock,
) -> None:
    # cy's add, sent before its pong (a message the frame reader hands on to
    # trio-websocket: here, in two frames, as Qt sends a big one), crossed
    # the document: it must count as made before the load, like the same
    # add sent in one frame. The pong's header is seen (and was counted) as
    # soon as the bytes arrive, before the reader reads the add.
    harness: Harness = await start_server(correction_window=0.5)
    async with harness.joined("s", "ada") as ada:
        await ada.send(add_item("L1", {"x": 1}, op_id=1))
        await ada.expect("ack")
        cy = await _stock_member_with_the_design_and_its_ping(harness)
        payload = json.dumps(add_item("N", {"x": 9}, op_id=7)).encode()
        await cy.stream.send_all(
            client_frame(OPCODE_TEXT, payload[:20], fin=False)
            + client_frame(OPCODE_CONTINUATION, payload[20:])
            + client_frame(OPCODE_PONG, b"")
        )
        seen = await _messages_for(cy, 6.0)
        corrections = [m["command"]["action"] for m in seen if m.get("correction")]
        assert corrections == ["remove_item", "add_item"], seen


async def test_a_one_frame_change_behind_a_handed_on_message_and_before_the_pong_is_still_corrected(
    start_server: Any,
    autojump_clock: trio.abc.Clock,
) -> None:
    # As a Qt host sends it: a message in several frames (Qt splits what is
    # over its outgoing frame size), then a one-frame add made before the
    # design arrived, then the pong. The add is handed on too (a message
    # before it is still unread), so it reaches the session after the pong
    # header was counted.
    harness: Harness = await start_server(correction_window=0.5)
    async with harness.joined("s", "ada") as ada:
        await ada.send(add_item("L1", {"x": 1}, op_id=1))
        await ada.expect("ack")
        cy = await _stock_member_with_the_design_and_its_ping(harness)
        cursor = json.dumps({"type": "cursor", "x": 1.0, "y": 2.0}).encode()
        payload = json.dumps(add_item("N", {"x": 9}, op_id=7)).encode()
        await cy.stream.send_all(
            client_frame(OPCODE_TEXT, cursor[:10], fin=False)
            + client_frame(OPCODE_CONTINUATION, cursor[10:])
            + client_frame(OPCODE_TEXT, payload)
            + client_frame(OPCODE_PONG, b"")
        )
        seen = await _messages_for(cy, 6.0)
        corrections = [m["command"]["action"] for m in seen if m.get("correction")]
        assert corrections == ["remove_item", "add_item"], seen


async def test_the_same_add_in_one_frame_is_corrected(start_server: Any, autojump_clock: trio.abc.Clock) -> None:
    # (The reference: taken out of the stream by the frame reader.)
    harness: Harness = await start_server(correction_window=0.5)
    async with harness.joined("s", "ada") as ada:
        await ada.send(add_item("L1", {"x": 1}, op_id=1))
        await ada.expect("ack")
        cy = await _stock_member_with_the_design_and_its_ping(harness)
        payload = json.dumps(add_item("N", {"x": 9}, op_id=7)).encode()
        await cy.stream.send_all(client_frame(OPCODE_TEXT, payload) + client_frame(OPCODE_PONG, b""))
        seen = await _messages_for(cy, 6.0)
        corrections = [m["command"]["action"] for m in seen if m.get("correction")]
        assert corrections == ["remove_item", "add_item"], seen


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


async def test_a_change_sent_after_the_pong_in_the_same_read_is_not_corrected(start_server: Any, autojump_clock: trio.abc.Clock) -> None:
    # cy loads the design, answers the ping, then adds a lens: the pong and
    # the add come in one read (one TCP segment, as Nagle or a slow link
    # joins them). The add was made after the load: a correction would
    # rebuild it as another's item in a stock window (no edits of it sent).
    harness: Harness = await start_server(correction_window=0.5)
    async with harness.joined("s", "ada") as ada:
        await ada.send(add_item("L1", {"x": 1}, op_id=1))
        await ada.expect("ack")
        cy = await _stock_member_with_the_design_and_its_ping(harness)
        payload = json.dumps(add_item("N", {"x": 9}, op_id=7)).encode()
        await cy.stream.send_all(client_frame(OPCODE_PONG, b"") + client_frame(OPCODE_TEXT, payload))
        seen = await _messages_for(cy, 6.0)
        corrections = [m["command"]["action"] for m in seen if m.get("correction")]
        assert corrections == [], seen
